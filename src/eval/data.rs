//! Benchmark problems: the JSONL files `data/fetch` writes (`id`, `question`,
//! `answer`), and the subset an evaluation runs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Problem {
    pub id: String,
    pub question: String,
    /// The reference answer (a number for GSM8K, LaTeX for MATH-500).
    pub answer: String,
}

/// The data sets `data/fetch` provides.
pub const KNOWN: [&str; 2] = ["gsm8k", "math500"];

/// Where the project's `data/` folder is: `TERSE_DATA_DIR`, else `./data`, else
/// the one beside the crate sources (for `cargo run` and the tests).
pub fn data_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TERSE_DATA_DIR") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("data");
    if local.join("fetch").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// `spec` is a data set name (`gsm8k`, `math500`) or a path to a JSONL file;
/// returns the data set's name and its file.
pub fn resolve(spec: &str) -> Result<(String, PathBuf)> {
    let name = match spec {
        "math-500" | "MATH-500" => "math500",
        other => other,
    };
    if KNOWN.contains(&name) {
        let cache = std::env::var("TERSE_DATA_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| data_dir().join("cache"));
        let path = cache.join(format!("{name}.jsonl"));
        if !path.is_file() {
            bail!("data set `{name}` is not fetched yet: run `./data/fetch` first (expected {})", path.display());
        }
        return Ok((name.to_string(), path));
    }
    let path = PathBuf::from(spec);
    if !path.is_file() {
        bail!("unknown data set `{spec}`: not one of {} and not a JSONL file", KNOWN.join(", "));
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data").to_string();
    Ok((stem, path))
}

/// Every problem of a JSONL file, in file order; ids must be unique.
pub fn load(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seen = HashSet::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Problem = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a problem (`id`, `question`, `answer`)", path.display(), n + 1))?;
        if !seen.insert(p.id.clone()) {
            bail!("{}:{}: duplicate id `{}`", path.display(), n + 1, p.id);
        }
        problems.push(p);
    }
    if problems.is_empty() {
        bail!("{} holds no problems", path.display());
    }
    Ok(problems)
}

/// The subset to run: the first `limit` problems, in file order, or, with a
/// seed, of a seeded shuffle (so a larger limit with the same seed extends the
/// smaller subset rather than drawing a new one).
pub fn select(mut problems: Vec<Problem>, limit: Option<usize>, seed: Option<u64>) -> Vec<Problem> {
    if let Some(seed) = seed {
        problems.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    }
    if let Some(limit) = limit {
        problems.truncate(limit);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> Vec<Problem> {
        (0..n)
            .map(|i| Problem { id: format!("p{i}"), question: format!("q{i}"), answer: i.to_string() })
            .collect()
    }

    fn ids(ps: &[Problem]) -> Vec<&str> {
        ps.iter().map(|p| p.id.as_str()).collect()
    }

    #[test]
    fn subsets_are_stable() {
        assert_eq!(ids(&select(numbered(10), Some(3), None)), ["p0", "p1", "p2"]);
        let a = select(numbered(100), Some(5), Some(7));
        let b = select(numbered(100), Some(10), Some(7));
        assert_eq!(a, select(numbered(100), Some(5), Some(7)));
        assert_eq!(a[..], b[..5], "a larger limit extends the subset");
        assert_ne!(ids(&a), ["p0", "p1", "p2", "p3", "p4"], "the seed shuffles");
        assert_ne!(a, select(numbered(100), Some(5), Some(8)));
        assert_eq!(select(numbered(4), Some(10), None).len(), 4);
    }

    #[test]
    fn bad_files_say_where() {
        let dir = std::env::temp_dir().join(format!("terse-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.jsonl");
        std::fs::write(&f, "{\"id\":\"a\",\"question\":\"q\",\"answer\":\"1\"}\n{\"id\":\"a\",\"question\":\"q\",\"answer\":\"2\"}\n").unwrap();
        assert!(format!("{:#}", load(&f).unwrap_err()).contains("x.jsonl:2: duplicate id `a`"));
        std::fs::write(&f, "{\"id\":\"a\",\"question\":\"q\"}\n").unwrap();
        assert!(format!("{:#}", load(&f).unwrap_err()).contains("x.jsonl:1: not a problem"));
        std::fs::write(&f, "\n").unwrap();
        assert!(format!("{:#}", load(&f).unwrap_err()).contains("holds no problems"));
        let (name, path) = resolve(f.to_str().unwrap()).unwrap();
        assert_eq!((name.as_str(), path), ("x", f.clone()));
        assert!(format!("{:#}", resolve("gsm9k").unwrap_err()).contains("unknown data set `gsm9k`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
