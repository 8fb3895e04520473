//! Model manifests (`models/NAME.toml`) and turning `--model NAME|PATH` into a file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::reasoning::modes::ModePresets;
use crate::reasoning::profile::ReasoningProfile;

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub display_name: Option<String>,
    /// `model` (servable) or `tokenizer` (a test fixture without weights).
    #[serde(default = "model_kind")]
    pub kind: String,
    pub arch: String,
    pub format: String,
    /// The assembled model file's name inside `models/cache/NAME/`.
    pub file: String,
    /// Pinned for fetched files; absent for models users bring themselves.
    pub sha256: Option<String>,
    /// Think delimiters and injected texts (`[reasoning]`).
    #[serde(default)]
    pub reasoning: ReasoningProfile,
    /// `[modes.short]`, `[modes.medium]`, `[modes.long]`.
    pub modes: Option<ModePresets>,
}

fn model_kind() -> String {
    "model".into()
}

impl Manifest {
    /// The reasoning profile with the manifest's mode presets (or the defaults), checked.
    pub fn reasoning_profile(&self) -> Result<ReasoningProfile> {
        let mut profile = self.reasoning.clone();
        profile.check().map_err(|e| anyhow!("manifest {}: {e}", self.name))?;
        profile.from_manifest = true;
        if let Some(modes) = &self.modes {
            modes.check().map_err(|e| anyhow!("manifest {}: {e}", self.name))?;
            profile.modes = modes.clone();
        }
        Ok(profile)
    }
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

/// A model to serve: its file, the name clients call it by, and how it reasons.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub served_name: String,
    pub reasoning: ReasoningProfile,
}

/// `spec` is a manifest name (e.g. `smollm2-135m`), a path to a .gguf file, or
/// a Hugging Face directory (with `config.json`).
pub fn resolve_model(spec: &str) -> Result<ResolvedModel> {
    resolve_model_with(spec, None)
}

/// Like [`resolve_model`]; `manifest` names the manifest whose reasoning profile and modes a file given
/// by path gets (e.g. a DeepSeek-R1-Distill GGUF the user brings).
pub fn resolve_model_with(spec: &str, manifest: Option<&str>) -> Result<ResolvedModel> {
    let as_path = Path::new(spec);
    let hf_dir = as_path.join("config.json").is_file();
    if as_path.extension().is_some_and(|e| e == "gguf") || as_path.is_file() || hf_dir {
        if !as_path.is_file() && !hf_dir {
            bail!("model file {} does not exist", as_path.display());
        }
        let served_name = as_path.file_stem().and_then(|s| s.to_str()).unwrap_or(spec).to_string();
        let reasoning = match manifest {
            Some(name) => servable(name)?.reasoning_profile()?,
            None => ReasoningProfile::default(),
        };
        return Ok(ResolvedModel { path: as_path.to_path_buf(), served_name, reasoning });
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
    if let Some(other) = manifest.filter(|m| *m != spec) {
        bail!("--manifest {other} applies to a model given by path; `{spec}` has its own manifest");
    }
    let manifest = servable(spec)?;
    let path = dir.join("cache").join(&manifest.name).join(&manifest.file);
    if !path.is_file() {
        if manifest.sha256.is_none() {
            bail!(
                "model `{spec}` is not published here: bring its file and put it at {}, or pass --model PATH --manifest {spec}",
                path.display()
            );
        }
        bail!("model `{spec}` is not fetched yet: run `./models/fetch {spec}` first (expected {})", path.display());
    }
    let reasoning = manifest.reasoning_profile()?;
    Ok(ResolvedModel { path, served_name: manifest.name, reasoning })
}

/// A manifest that describes a model to serve (not a tokenizer fixture).
fn servable(name: &str) -> Result<Manifest> {
    let manifest = load_manifest(name)?;
    if manifest.kind != "model" {
        bail!("`{name}` is a {} fixture for tests, not a model to serve", manifest.kind);
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every manifest in models/ parses and its presets pass their checks.
    #[test]
    fn all_manifests_parse() {
        let mut seen = 0;
        for entry in std::fs::read_dir(models_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_stem().unwrap().to_str().unwrap().to_string();
                let m = load_manifest(&name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                assert_eq!(m.name, name, "a manifest's name is its file name");
                assert!(["model", "tokenizer"].contains(&m.kind.as_str()), "{name}: kind {}", m.kind);
                m.reasoning_profile().unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 4);
    }

    #[test]
    fn fixtures_are_not_servable() {
        let err = resolve_model("qwen3-tokenizer").unwrap_err().to_string();
        assert!(err.contains("fixture"), "{err}");
    }
}
