//! Model manifests (`models/NAME.toml`) and turning `--model NAME|PATH` into a file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub display_name: Option<String>,
    pub arch: String,
    pub format: String,
    /// The assembled model file's name inside `models/cache/NAME/`.
    pub file: String,
    pub sha256: String,
}

/// Where the project's `models/` folder is: `TERSE_MODELS_DIR`, else `./models`,
/// else the one beside the crate sources (for `cargo run` / tests).
pub fn models_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TERSE_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("models");
    if local.join("fetch").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn load_manifest(name: &str) -> Result<Manifest> {
    let path = models_dir().join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A model to serve: its file and the name clients call it by.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub served_name: String,
}

/// `spec` is a manifest name (e.g. `smollm2-135m`) or a path to a .gguf file.
pub fn resolve_model(spec: &str) -> Result<ResolvedModel> {
    let as_path = Path::new(spec);
    if as_path.extension().is_some_and(|e| e == "gguf") || as_path.is_file() {
        if !as_path.is_file() {
            bail!("model file {} does not exist", as_path.display());
        }
        let served_name = as_path.file_stem().and_then(|s| s.to_str()).unwrap_or(spec).to_string();
        return Ok(ResolvedModel { path: as_path.to_path_buf(), served_name });
    }
    let dir = models_dir();
    if !dir.join(format!("{spec}.toml")).is_file() {
        let known: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".toml")).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        bail!("unknown model `{spec}`: not a file and no manifest {}/{spec}.toml (known: {})", dir.display(), known.join(", "));
    }
    let manifest = load_manifest(spec)?;
    let path = dir.join("cache").join(&manifest.name).join(&manifest.file);
    if !path.is_file() {
        bail!("model `{spec}` is not fetched yet: run `./models/fetch {spec}` first (expected {})", path.display());
    }
    Ok(ResolvedModel { path, served_name: manifest.name })
}
