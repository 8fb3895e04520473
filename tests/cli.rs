//! The `terse` binary as an operator runs it: settings from flags, environment
//! and a config file; JSON logs with one line per request; SIGTERM while a
//! request runs; a broken model file at start.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{client, MODEL};
use serde_json::{json, Value};

fn terse() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_terse"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "0");
    // Only what each test sets.
    for (key, _) in std::env::vars() {
        if key.starts_with("TERSE_") && key != "TERSE_MODELS_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("terse-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn flags_beat_environment_beat_config_file_beat_defaults() {
    let dir = scratch("precedence");
    let file = dir.join("terse.toml");
    std::fs::write(
        &file,
        "port = 9001\nmax_batch = 3\nmax-queue = 5\nlog_format = \"json\"\napi_key = [\"file-secret\"]\n",
    )
    .unwrap();
    let out = terse()
        .args(["serve", "--config", file.to_str().unwrap(), "--port", "9100", "--print-config"])
        .env("TERSE_MAX_BATCH", "6")
        .env("TERSE_API_KEY", "env-secret-1,env-secret-2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "port = 9100  # flag",
        "max_batch = 6  # environment",
        "max_queue = 5  # config file",
        "log_format = \"json\"  # config file",
        "prefill_chunk = 512  # default",
        "api_key = [\"<redacted>\", \"<redacted>\"]  # environment",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    assert!(!text.contains("secret"), "a key was printed:\n{text}");

    // `--help` names every setting's variable and default, and never a key's value.
    let out = terse().args(["serve", "--help"]).env("TERSE_API_KEY", "env-secret").output().unwrap();
    // (clap puts `[env: ...]` and `[default: ...]` on one line or two, by width.)
    let help = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for want in ["[env: TERSE_PORT=] [default: 8080]", "[env: TERSE_LOG_FORMAT=] [default: text]", "--config <FILE>"] {
        assert!(help.contains(want), "missing `{want}` in:\n{help}");
    }
    assert!(!help.contains("env-secret"), "{help}");

    // A typo in the file is an error that names it.
    std::fs::write(&file, "max_btach = 3\n").unwrap();
    let out = terse().args(["serve", "--config", file.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown setting `max_btach`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `terse serve` child whose stderr lines are collected on a thread.
struct Served {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = terse()
            .args(["serve", "--port", "0", "--log-format", "json"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Served { child, lines, log: Vec::new() }
    }

    /// The next log line as JSON (every line must be JSON); `None` when stderr closed.
    fn next_json(&mut self) -> Option<Value> {
        let line = self.lines.recv_timeout(Duration::from_secs(300)).ok()?;
        self.log.push(line.clone());
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}")))
    }

    /// Reads log lines until one satisfies `want`.
    fn wait_for(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = self.next_json().unwrap_or_else(|| panic!("the server stopped; log:\n{}", self.log.join("\n")));
            if want(&line) {
                return line;
            }
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_one_line_per_request_and_sigterm_lets_requests_finish() {
    let key = "cli-test-key-42";
    let mut served = Served::start(&["--api-key", key]);
    let listening = served.wait_for(|l| l["message"] == "listening");
    let url = format!("http://{}", listening["addr"].as_str().unwrap());
    served.wait_for(|l| l["message"].as_str().is_some_and(|m| m.contains("ready")));
    let http = client();

    // The container health check: `terse probe` exits 0 on 2xx only.
    let port = url.rsplit(':').next().unwrap().to_string();
    let probe = |path: &str| terse().args(["probe", path, "--port", &port]).output().unwrap();
    assert!(probe("/ready").status.success());
    let refused = probe("/v1/models");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));

    // A wrong key: logged as a 401, without the key.
    let r = http.get(format!("{url}/v1/models")).bearer_auth("wrong-key-777").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let line = served.wait_for(|l| l["message"] == "request");
    assert_eq!(line["status"], 401);
    assert_eq!(line["path"], "/v1/models");

    // A request in flight when SIGTERM comes runs to its end.
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": 200, "temperature": 0, "stream": true,
        "reasoning_effort": "low",
        // At least 150 tokens (early stops become "Wait"): the drain outlasts the checks below.
        "reasoning": {"strategy": "none", "min_thinking_tokens": 150, "max_thinking_tokens": 200},
    });
    let mut resp = http.post(format!("{url}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let first = resp.chunk().await.unwrap().unwrap();
    served.sigterm();
    // While it drains, the server still answers: not ready, and 503 to new work.
    let mut ready = http.get(format!("{url}/ready")).send().await.unwrap();
    for _ in 0..200 {
        if ready.status() == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ready = http.get(format!("{url}/ready")).send().await.unwrap();
    }
    assert_eq!(ready.status(), 503, "/ready turns 503 once SIGTERM is in");
    let late = http.post(format!("{url}/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    assert_eq!(late.status(), 503, "a request after SIGTERM is told, not refused");
    let error: serde_json::Value = late.json().await.unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");
    let mut stream = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        stream.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(stream.trim_end().ends_with("data: [DONE]"), "cut short: {stream}");
    assert!(stream.contains("\"finish_reason\":\"length\"") || stream.contains("\"finish_reason\":\"stop\""));

    // Its one log line has everything an operator asks about.
    let line = served.wait_for(|l| l["message"] == "request" && l["request_id"] == request_id.as_str());
    assert_eq!(line["model"], MODEL);
    assert_eq!(line["endpoint"], "chat_completions");
    assert_eq!(line["mode"], "short");
    assert_eq!(line["status"], 200);
    assert!(line["prompt_tokens"].as_u64().unwrap() > 0, "{line}");
    let (thinking, answer) = (line["thinking_tokens"].as_u64().unwrap(), line["answer_tokens"].as_u64().unwrap());
    assert_eq!(thinking + answer, line["completion_tokens"].as_u64().unwrap(), "{line}");
    assert!(answer > 0 && line["latency_ms"].as_f64().unwrap() > 0.0, "{line}");

    // Then the process exits 0, and no line ever held a key.
    while served.next_json().is_some() {}
    let status = served.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", served.log.join("\n"));
    assert!(!probe("/health").status.success(), "nothing listens any more");
    let log = served.log.join("\n");
    assert!(!log.contains(key) && !log.contains("wrong-key-777"), "a key was logged:\n{log}");
}

/// Copies the first `len` bytes of the default model to a scratch file.
fn truncated_model(len: u64) -> PathBuf {
    let model = terse::manifest::resolve_model(MODEL).unwrap();
    let dir = scratch("truncated");
    let path = dir.join(format!("truncated-{len}.gguf"));
    let mut src = std::fs::File::open(Path::new(&model.path)).unwrap();
    let mut dst = std::fs::File::create(&path).unwrap();
    std::io::copy(&mut std::io::Read::take(&mut src, len), &mut dst).unwrap();
    path
}

#[test]
fn a_truncated_or_garbage_model_file_fails_the_start_clearly() {
    let garbage = scratch("garbage").join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a GGUF file at all").unwrap();
    // Cut in the header, in the tensor index, and in the middle of the weights.
    for path in [truncated_model(64), truncated_model(300_000), truncated_model(40_000_000), garbage] {
        let out = terse()
            .args(["serve", "--port", "0", "--model", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: started anyway:\n{err}", path.display());
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("loading the model failed"), "{}:\n{err}", path.display());
        assert!(!err.contains("panicked"), "{}:\n{err}", path.display());
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn a_device_this_build_cannot_use_fails_the_start_in_one_line() {
    let out = terse().args(["serve", "--port", "0", "--device", "cuda:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started anyway:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    if cfg!(feature = "cuda") {
        assert!(err.contains("cannot use GPU cuda:0"), "{err}");
    } else {
        assert!(err.contains("built without CUDA") && err.contains("--features cuda"), "{err}");
    }
    let out = terse().args(["serve", "--port", "0", "--device", "tpu"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error:\n{err}");
    assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
    // CUDA graphs on the CPU: one line naming what is missing.
    let out = terse().args(["serve", "--port", "0", "--cuda-graphs", "on"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let refusals: Vec<&str> = err.lines().filter(|l| l.starts_with("Error:")).collect();
    assert_eq!(refusals.len(), 1, "{err}");
    assert!(refusals[0].contains(if cfg!(feature = "cuda") { "needs a GPU" } else { "built without CUDA" }), "{err}");
    let out = terse().args(["serve", "--port", "0", "--cuda-graphs", "always"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
}

/// A GGUF holding only `metadata` (no tensors).
fn metadata_only(name: &str, metadata: &[(&str, candle_core::quantized::gguf_file::Value)]) -> PathBuf {
    let path = scratch("metadata").join(format!("{name}.gguf"));
    let mut file = std::fs::File::create(&path).unwrap();
    let meta: Vec<(&str, &candle_core::quantized::gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    candle_core::quantized::gguf_file::write(&mut file, &meta, &[]).unwrap();
    path
}

#[test]
fn an_unknown_architecture_or_a_missing_key_fails_serve_generate_and_inspect_in_one_line() {
    use candle_core::quantized::gguf_file::Value;
    let unknown = metadata_only("mamba", &[("general.architecture", Value::String("mamba".into()))]);
    let lacking = metadata_only(
        "qwen3-lacking",
        &[("general.architecture", Value::String("qwen3".into())), ("qwen3.embedding_length", Value::U32(64))],
    );
    for (path, says) in [
        (&unknown, "unsupported architecture `mamba` (terse runs llama, qwen2, qwen3, gemma3, phi3)"),
        (&lacking, "GGUF metadata lacks qwen3.attention.head_count"),
    ] {
        let model = path.to_str().unwrap();
        for args in [vec!["serve", "--port", "0", "--model", model], vec!["generate", "--model", model, "hi"], vec!["inspect", model]] {
            let out = terse().args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}:\n{err}");
            assert!(err.contains(says), "{args:?}: expected {says:?} in:\n{err}");
            assert!(!err.contains("panicked"), "{args:?}:\n{err}");
        }
    }
}

/// A GGUF whose one tensor is in an IQ format (written by hand: candle's
/// writer has no IQ types).
fn iq_model() -> PathBuf {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // a string
    string(&mut b, "llama");
    string(&mut b, "blk.0.attn_q.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(16u32.to_le_bytes()); // IQ2_XXS
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 256 * 256, 0);
    let path = scratch("iq").join("iq2_xxs.gguf");
    std::fs::write(&path, b).unwrap();
    path
}

#[test]
fn a_file_in_a_format_terse_cannot_read_names_the_tensor_and_the_format() {
    let path = iq_model();
    let out = terse().args(["inspect", path.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("tensor blk.0.attn_q.weight is IQ2_XXS, which terse cannot read"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
