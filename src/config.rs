//! Settings of a subcommand from four places, highest precedence first:
//! a command-line flag, its `TERSE_*` environment variable, a TOML file named
//! by `--config FILE` (`TERSE_CONFIG`), and the built-in default.
//!
//! clap already ranks flags over environment variables over defaults, so a
//! config file is applied by making its values the arguments' defaults: the
//! command line is parsed once to find `--config`, then again with the file's
//! values as defaults. A key of the file is an argument's long name, in
//! snake_case or kebab-case (`max_batch` or `max-batch`); a key that names no
//! argument is an error, so a typo does not go unnoticed.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// The id of the argument that names the config file.
pub const CONFIG_ARG: &str = "config";

/// Arguments that a config file may not set (they steer the parsing itself).
const NOT_IN_FILE: &[&str] = &[CONFIG_ARG, "print_config", "help", "version"];

/// Parse the process's command line into `P`, taking the defaults of
/// `subcommand` from its `--config` file when one is given. Exits on `--help`
/// and on usage errors of the command line, as clap does; a bad config file
/// is an error.
pub fn parse<P: clap::Parser>(subcommand: &str) -> Result<Parsed<P>> {
    match parse_from::<P>(subcommand, std::env::args_os()) {
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(usage) => usage.exit(),
            Err(e) => Err(e),
        },
        ok => ok,
    }
}

/// [`parse`] over explicit arguments (the first is the program name), never
/// exiting: a usage error of the command line is returned as a `clap::Error`.
pub fn parse_from<P: clap::Parser>(
    subcommand: &str,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Parsed<P>> {
    let args: Vec<_> = args.into_iter().collect();
    let mut command = P::command();
    let order = command
        .find_subcommand(subcommand)
        .map(|sub| sub.get_arguments().map(|a| a.get_id().to_string()).collect())
        .unwrap_or_default();
    let mut matches = command.clone().try_get_matches_from(&args)?;
    let mut from_file = BTreeSet::new();
    let config_path = match matches.subcommand() {
        Some((name, sub)) if name == subcommand => sub.get_one::<PathBuf>(CONFIG_ARG).cloned(),
        _ => None,
    };
    if let Some(path) = &config_path {
        let table = read_table(path)?;
        let (with_file, applied) = apply_file_defaults(command, subcommand, &table, path)?;
        command = with_file;
        from_file = applied;
        // A value of the file that its argument refuses.
        matches = command.clone().try_get_matches_from(&args).map_err(|e| {
            anyhow::anyhow!("{} (a default from the config file {})", e.render().to_string().trim_end(), path.display())
        })?;
    }
    let value = P::from_arg_matches(&matches)?;
    Ok(Parsed { value, command, matches, config_path, from_file, order })
}

/// A parsed command line and where each of its values came from.
pub struct Parsed<P> {
    pub value: P,
    command: Command,
    matches: ArgMatches,
    config_path: Option<PathBuf>,
    /// Ids of the arguments whose value came from the config file.
    from_file: BTreeSet<String>,
    /// The subcommand's argument ids in declaration order (changing a default moves an argument last).
    order: Vec<String>,
}

impl<P> Parsed<P> {
    /// The resolved settings of `subcommand` as TOML, each with where its
    /// value came from; values of secret arguments (those whose environment
    /// value `--help` hides) are replaced by `<redacted>`.
    pub fn describe(&self, subcommand: &str) -> String {
        let (Some(command), Some((_, matches))) = (self.command.find_subcommand(subcommand), self.matches.subcommand())
        else {
            return String::new();
        };
        let mut out = String::new();
        let mut args: Vec<_> = command.get_arguments().collect();
        args.sort_by_key(|a| self.order.iter().position(|id| id == a.get_id().as_str()));
        for arg in args {
            let id = arg.get_id().as_str();
            if NOT_IN_FILE.contains(&id) {
                continue;
            }
            let Some(raw) = matches.get_raw(id) else {
                let _ = writeln!(out, "# {id}: not set");
                continue;
            };
            let values: Vec<String> = raw
                .map(|v| {
                    if arg.is_hide_env_values_set() {
                        "\"<redacted>\"".to_string()
                    } else {
                        toml_scalar(&v.to_string_lossy())
                    }
                })
                .collect();
            let value = if matches!(arg.get_action(), ArgAction::Append) {
                format!("[{}]", values.join(", "))
            } else {
                values.join(", ")
            };
            let source = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "flag".to_string(),
                Some(ValueSource::EnvVariable) => "environment".to_string(),
                Some(ValueSource::DefaultValue) if self.from_file.contains(id) => match &self.config_path {
                    Some(p) => format!("config file {}", p.display()),
                    None => "config file".to_string(),
                },
                _ => "default".to_string(),
            };
            let _ = writeln!(out, "{id} = {value}  # {source}");
        }
        out
    }
}

/// A number or boolean as it is, anything else as a quoted TOML string.
fn toml_scalar(raw: &str) -> String {
    if raw.parse::<i64>().is_ok() || raw.parse::<f64>().is_ok_and(f64::is_finite) || raw == "true" || raw == "false" {
        raw.to_string()
    } else {
        toml::Value::String(raw.to_string()).to_string()
    }
}

fn read_table(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("parsing the config file {} as TOML", path.display()))
}

/// `command` with the arguments of `subcommand` defaulting to the values of
/// `table`; also the ids of the arguments it set.
pub fn apply_file_defaults(
    command: Command,
    subcommand: &str,
    table: &toml::Table,
    path: &Path,
) -> Result<(Command, BTreeSet<String>)> {
    let Some(sub) = command.find_subcommand(subcommand) else {
        bail!("no subcommand `{subcommand}`");
    };
    let known: Vec<(String, bool)> = sub
        .get_arguments()
        .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
        .map(|a| (a.get_id().to_string(), matches!(a.get_action(), ArgAction::Append)))
        .collect();
    let mut defaults: Vec<(String, Vec<String>)> = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let Some((_, many)) = known.iter().find(|(k, _)| *k == id) else {
            let names: Vec<&str> = known.iter().map(|(k, _)| k.as_str()).collect();
            bail!(
                "{}: unknown setting `{key}`; the settings of `{subcommand}` are: {}",
                path.display(),
                names.join(", ")
            );
        };
        let values = match value {
            toml::Value::Array(items) if *many => items
                .iter()
                .map(|v| scalar(v).with_context(|| format!("{}: `{key}`", path.display())))
                .collect::<Result<Vec<_>>>()?,
            toml::Value::Array(_) => bail!("{}: `{key}` takes one value, not an array", path.display()),
            v => vec![scalar(v).with_context(|| format!("{}: `{key}`", path.display()))?],
        };
        defaults.push((id, values));
    }
    let applied = defaults.iter().map(|(id, _)| id.clone()).collect();
    let command = command.mut_subcommand(subcommand, |mut sub| {
        for (id, values) in defaults {
            sub = sub.mut_arg(id, |arg| arg.default_values(values.into_iter().map(clap::builder::Str::from)));
        }
        sub
    });
    Ok((command, applied))
}

fn scalar(value: &toml::Value) -> Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("expected a string, number or boolean, not {}", other.type_str()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Serve(Serve),
    }

    #[derive(Args, Debug)]
    struct Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long = "api-key", hide_env_values = true)]
        api_key: Vec<String>,
        #[arg(long)]
        max_tokens_limit: Option<usize>,
    }

    fn write(text: &str) -> (PathBuf, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("terse.toml");
        std::fs::write(&path, text).unwrap();
        (path, dir)
    }

    /// A scratch folder removed on drop (std only: no tempfile crate for one test).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "terse-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn parse(args: &[&str]) -> Result<Parsed<Cli>> {
        parse_from::<Cli>("serve", args.iter().map(Into::into))
    }

    fn serve(p: &Parsed<Cli>) -> &Serve {
        let Cmd::Serve(s) = &p.value.command;
        s
    }

    #[test]
    fn file_values_beat_defaults_and_flags_beat_the_file() {
        let (path, _dir) = write("port = 9000\nmax-tokens-limit = 64\napi_key = [\"k1\", \"k2\"]\nhost = \"0.0.0.0\"\n");
        let path = path.to_str().unwrap();
        let p = parse(&["terse", "serve", "--config", path, "--port", "9100"]).unwrap();
        let s = serve(&p);
        assert_eq!(s.port, 9100, "a flag beats the file");
        assert_eq!(s.host, "0.0.0.0", "the file beats the default");
        assert_eq!(s.max_tokens_limit, Some(64), "kebab-case keys work");
        assert_eq!(s.api_key, vec!["k1", "k2"]);

        let described = p.describe("serve");
        assert!(described.contains("port = 9100  # flag"), "{described}");
        assert!(described.contains("host = \"0.0.0.0\"  # config file"), "{described}");
        assert!(!described.contains("k1"), "secrets must not be printed: {described}");
        assert!(described.contains("<redacted>"), "{described}");

        let p = parse(&["terse", "serve"]).unwrap();
        assert_eq!(serve(&p).port, 8080);
        assert!(p.describe("serve").contains("port = 8080  # default"));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let (path, _dir) = write("prot = 9000\n");
        let e = format!("{:#}", parse(&["terse", "serve", "--config", path.to_str().unwrap()]).err().unwrap());
        assert!(e.contains("unknown setting `prot`") && e.contains("port"), "{e}");

        let (path, _dir) = write("port = [1, 2]\n");
        let e = format!("{:#}", parse(&["terse", "serve", "--config", path.to_str().unwrap()]).err().unwrap());
        assert!(e.contains("`port` takes one value"), "{e}");

        let (path, _dir) = write("port = \n");
        let e = format!("{:#}", parse(&["terse", "serve", "--config", path.to_str().unwrap()]).err().unwrap());
        assert!(e.contains("as TOML"), "{e}");

        let (path, _dir) = write("port = \"eighty\"\n");
        let e = format!("{:#}", parse(&["terse", "serve", "--config", path.to_str().unwrap()]).err().unwrap());
        assert!(e.contains("eighty") && e.contains("config file"), "{e}");

        let (path, _dir) = write("config = \"other.toml\"\n");
        assert!(parse(&["terse", "serve", "--config", path.to_str().unwrap()]).is_err());

        let e = format!("{:#}", parse(&["terse", "serve", "--config", "/nonexistent/terse.toml"]).err().unwrap());
        assert!(e.contains("reading the config file"), "{e}");
    }
}
