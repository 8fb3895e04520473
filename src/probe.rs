//! `terse probe PATH`: a GET to the local server for container health checks
//! (Docker's `HEALTHCHECK`, Kubernetes `exec` probes), so that the runtime
//! image needs no curl. HTTP/1.1 over a plain socket is all it takes.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// The status code of `GET path` on `host:port`, within `timeout`.
pub fn http_status(host: &str, port: u16, path: &str, timeout: Duration) -> Result<u16> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host}:{port} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream.read(&mut head[len..]).with_context(|| format!("reading the answer of {addr}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&head[..len]);
    let code = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match code {
        Some(code) => Ok(code),
        None => bail!("{addr} did not answer HTTP: {line:?}"),
    }
}
