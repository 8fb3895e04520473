//! The output of an evaluation: one JSON line per (problem, setting), appended
//! as each answer arrives, so that an interrupted run loses at most the line
//! being written and a re-run skips every finished pair.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The problem's id in its data set.
    pub id: String,
    /// The setting's name.
    pub setting: String,
    pub dataset: String,
    /// The model the server reported.
    pub model: String,
    /// Everything that shapes the request besides the question (model, prompt,
    /// limits, setting): rows are reused only under the same fingerprint.
    pub fingerprint: String,
    pub reference: String,
    pub extracted: Option<String>,
    /// `boxed | hashes | phrase | last_number`.
    pub extracted_from: Option<String>,
    pub correct: bool,
    pub completion_tokens: usize,
    /// `usage.completion_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: usize,
    pub thinking_tokens: usize,
    pub answer_tokens: usize,
    pub forced_tokens: usize,
    /// `terse.probe_tokens`: spent by answer probes, not in `completion_tokens`
    /// (0 in rows written before probing existed).
    #[serde(default)]
    pub probe_tokens: usize,
    /// `terse.think_stop_reason` as sent (null for a completion without a thinking phase).
    pub think_stop_reason: Option<String>,
    /// `choices[0].finish_reason`.
    pub finish_reason: String,
    /// Why the controlled phase ended: `think_stop_reason`, else `natural` or
    /// `length` from the finish reason.
    pub stop_reason: String,
    /// `terse.mode` as the server applied it.
    pub mode: Option<String>,
    pub latency_s: f64,
    pub content: String,
    pub reasoning_content: Option<String>,
}

/// The rows already in an output file, keyed by (problem id, setting name).
pub struct Existing {
    pub rows: HashMap<(String, String), Row>,
}

impl Existing {
    /// Read `path` if it exists. A last line cut off by an interrupted run is
    /// dropped from the file, so that appending starts on a fresh line.
    pub fn load(path: &Path) -> Result<Existing> {
        let mut rows = HashMap::new();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing { rows }),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        if complete.len() != text.len() {
            tracing::warn!("{}: dropping an unfinished last line", path.display());
            std::fs::write(path, complete).with_context(|| format!("rewriting {}", path.display()))?;
        }
        for (n, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Row = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not an eval row; use another --out", path.display(), n + 1))?;
            rows.insert((row.id.clone(), row.setting.clone()), row);
        }
        Ok(Existing { rows })
    }

    /// The finished row of a pair, if it was made under the same fingerprint;
    /// a row made under another is an error (the same setting name now means
    /// something else, or the model or prompt changed).
    pub fn finished(&self, id: &str, setting: &str, fingerprint: &str) -> Result<Option<&Row>> {
        match self.rows.get(&(id.to_string(), setting.to_string())) {
            None => Ok(None),
            Some(row) if row.fingerprint == fingerprint => Ok(Some(row)),
            Some(row) => bail!(
                "the output already holds problem `{id}` under setting `{setting}` made with another model, \
                 prompt, limit or setting (model `{}`); use another --out, or rename the setting",
                row.model
            ),
        }
    }
}

/// Appends rows to the output file, one flushed line each.
pub struct RowWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl RowWriter {
    pub fn open(path: &Path) -> Result<RowWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(RowWriter { file, path: path.to_path_buf() })
    }

    pub fn append(&mut self, row: &Row) -> Result<()> {
        let mut line = serde_json::to_vec(row)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// A stable 64-bit FNV-1a hash, in hex (std's hasher may change between releases).
pub fn fingerprint(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(id: &str, setting: &str, fingerprint: &str) -> Row {
        Row {
            id: id.into(),
            setting: setting.into(),
            dataset: "gsm8k".into(),
            model: "m".into(),
            fingerprint: fingerprint.into(),
            reference: "18".into(),
            extracted: Some("18".into()),
            extracted_from: Some("boxed".into()),
            correct: true,
            completion_tokens: 10,
            reasoning_tokens: 0,
            thinking_tokens: 0,
            answer_tokens: 10,
            forced_tokens: 0,
            probe_tokens: 0,
            think_stop_reason: None,
            finish_reason: "stop".into(),
            stop_reason: "natural".into(),
            mode: Some("none".into()),
            latency_s: 0.5,
            content: "\\boxed{18}".into(),
            reasoning_content: None,
        }
    }

    #[test]
    fn resume_drops_a_cut_line_and_checks_fingerprints() {
        let dir = std::env::temp_dir().join(format!("terse-rows-{}", std::process::id()));
        let path = dir.join("rows.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Existing::load(&path).unwrap().rows.is_empty());
        let mut w = RowWriter::open(&path).unwrap();
        w.append(&row("a", "baseline", "f1")).unwrap();
        w.append(&row("b", "baseline", "f1")).unwrap();
        drop(w);
        // An interrupted write leaves half a line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\": \"c\", \"sett").unwrap();
        drop(f);
        let existing = Existing::load(&path).unwrap();
        assert_eq!(existing.rows.len(), 2);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
        assert_eq!(existing.finished("a", "baseline", "f1").unwrap().unwrap().id, "a");
        assert!(existing.finished("c", "baseline", "f1").unwrap().is_none());
        assert!(existing.finished("a", "ts=2", "f1").unwrap().is_none());
        let err = existing.finished("a", "baseline", "f2").unwrap_err();
        assert!(format!("{err}").contains("use another --out"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprints_are_stable() {
        assert_eq!(fingerprint(""), "cbf29ce484222325");
        assert_eq!(fingerprint("a"), "af63dc4c8601ec8c");
        assert_ne!(fingerprint("ab"), fingerprint("ba"));
    }
}
