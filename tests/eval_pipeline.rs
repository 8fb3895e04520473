//! `terse eval` end to end: the real binary against the real server on the real
//! default model, on a handful of GSM8K problems (`./data/fetch` must have run),
//! with a short token limit so the whole run takes well under a minute.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;
use terse::engine::EngineConfig;
use terse::eval::grade::{answers_match, extract_answer, grade, number_value};

fn terse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_terse"))
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("terse-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running terse eval");
    eprintln!("--- stdout\n{}--- stderr\n{}", text(&out.stdout), text(&out.stderr));
    out
}

fn rows(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("rows.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn data_file(name: &str) -> Vec<Value> {
    let path = terse::eval::data::resolve(name).unwrap_or_else(|e| panic!("{e:#}")).1;
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_reference_answer_grades_as_itself() {
    let gsm8k = data_file("gsm8k");
    assert_eq!(gsm8k.len(), 1319);
    let math = data_file("math500");
    assert_eq!(math.len(), 500);
    for row in gsm8k.iter().chain(&math) {
        let reference = row["answer"].as_str().unwrap();
        assert!(!reference.is_empty(), "{row}");
        assert!(answers_match(reference, reference), "{row}");
        // A model that boxes the reference is graded right.
        let boxed = format!("So the result is $\\boxed{{{reference}}}$.");
        assert_eq!(extract_answer(&boxed).unwrap().answer, reference.trim(), "{row}");
        assert!(grade(&boxed, reference).1, "{row}");
    }
    for row in &gsm8k {
        let reference = row["answer"].as_str().unwrap();
        assert!(number_value(reference).is_some(), "GSM8K answers are numbers: {row}");
        assert!(grade(&format!("The answer is {reference}."), reference).1, "{row}");
        assert!(!grade("The answer is 0.123456.", reference).1, "{row}");
    }
}

#[test]
fn eval_runs_a_grid_resumes_and_reports() {
    let server = TestServer::start(EngineConfig::default());
    let dir = out_dir("grid");
    let eval = |limit: &str, max_tokens: &str| {
        let mut cmd = terse();
        cmd.args(["eval", "--server", &server.url, "--data", "gsm8k", "--limit", limit])
            .args(["-s", "baseline", "-s", "budget=16,name=capped"])
            .args(["--max-tokens", max_tokens, "--concurrency", "8", "--quiet", "--out"])
            .arg(&dir);
        cmd
    };

    let first = run(&mut eval("3", "48"));
    assert!(first.status.success());
    let stdout = text(&first.stdout);
    assert!(stdout.contains("| setting | n | accuracy (95% CI) |"), "{stdout}");
    assert!(stdout.contains("| baseline | 3 |") && stdout.contains("| capped | 3 |"), "{stdout}");
    assert!(text(&first.stderr).contains("6 answered, 0 already done, 0 failed"));

    let rows = rows(&dir);
    assert_eq!(rows.len(), 6);
    let pairs: HashSet<(String, String)> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r["setting"].as_str().unwrap().to_string()))
        .collect();
    for id in ["gsm8k-0", "gsm8k-1", "gsm8k-2"] {
        for setting in ["baseline", "capped"] {
            assert!(pairs.contains(&(id.to_string(), setting.to_string())), "{id} {setting} missing");
        }
    }
    for r in &rows {
        let tokens = r["completion_tokens"].as_u64().unwrap();
        assert!((1..=48).contains(&tokens), "{r}");
        assert_eq!(r["model"], MODEL);
        assert!(r["latency_s"].as_f64().unwrap() > 0.0, "{r}");
        // The stored grade is the grader's verdict on the stored answer.
        let content = r["content"].as_str().unwrap();
        let reference = r["reference"].as_str().unwrap();
        assert_eq!(r["correct"].as_bool().unwrap(), grade(content, reference).1, "{r}");
        match r["setting"].as_str().unwrap() {
            "baseline" => {
                assert_eq!(r["forced_tokens"], 0, "{r}");
                assert!(["natural", "length"].contains(&r["stop_reason"].as_str().unwrap()), "{r}");
            }
            _ if tokens > 16 => {
                // SmolLM2 has no think tokens: the cap appends the wrap-up text to the answer.
                assert_eq!(r["stop_reason"], "budget", "{r}");
                assert!(r["forced_tokens"].as_u64().unwrap() > 0, "{r}");
                assert!(content.contains("Final answer:"), "{r}");
            }
            _ => {}
        }
    }

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let settings = summary["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 2);
    for s in settings {
        let name = s["setting"].as_str().unwrap();
        let mine: Vec<&Value> = rows.iter().filter(|r| r["setting"] == name).collect();
        let mean = mine.iter().map(|r| r["completion_tokens"].as_f64().unwrap()).sum::<f64>() / 3.0;
        let correct = mine.iter().filter(|r| r["correct"] == true).count();
        assert_eq!(s["n"], 3, "{s}");
        assert_eq!(s["correct"].as_u64().unwrap() as usize, correct, "{s}");
        assert!((s["mean_tokens"].as_f64().unwrap() - mean).abs() < 1e-9, "{s}");
        let (lo, hi) = (s["accuracy_low"].as_f64().unwrap(), s["accuracy_high"].as_f64().unwrap());
        assert!(0.0 <= lo && lo <= s["accuracy"].as_f64().unwrap() && hi <= 1.0 && hi > lo, "{s}");
        let shares: f64 = s["stops"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((shares - 1.0).abs() < 1e-9, "{s}");
    }
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(md.contains("| capped | 3 |") && md.contains("Command: `terse eval --server"), "{md}");
    let png = std::fs::read(dir.join("pareto.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000, "{} bytes", png.len());
    let svg = std::fs::read_to_string(dir.join("pareto.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("capped") && svg.contains("Pareto front"), "{svg}");
    assert!(svg.len() > 5_000);

    // A re-run finds every pair done and sends nothing.
    let before = std::fs::read(dir.join("rows.jsonl")).unwrap();
    let again = run(&mut eval("3", "48"));
    assert!(again.status.success());
    assert!(text(&again.stderr).contains("0 answered, 6 already done, 0 failed"));
    assert_eq!(std::fs::read(dir.join("rows.jsonl")).unwrap(), before);

    // A larger limit only runs the new problems.
    let more = run(&mut eval("4", "48"));
    assert!(more.status.success());
    assert!(text(&more.stderr).contains("2 answered, 6 already done, 0 failed"));
    assert_eq!(self::rows(&dir).len(), 8);
    assert!(text(&more.stdout).contains("| baseline | 4 |"));

    // Other request options under the same setting names are refused, not mixed in.
    let changed = run(&mut eval("4", "40"));
    assert!(!changed.status.success());
    assert!(text(&changed.stderr).contains("use another --out"));
    assert_eq!(self::rows(&dir).len(), 8);

    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_can_serve_the_model_itself() {
    let dir = out_dir("local");
    let out = run(terse()
        .args(["eval", "--model", MODEL, "--limit", "1", "--max-tokens", "8", "-s", "baseline", "--quiet", "--out"])
        .arg(&dir));
    assert!(out.status.success());
    let rows = rows(&dir);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["model"], MODEL);
    assert!((1..=8).contains(&rows[0]["completion_tokens"].as_u64().unwrap()), "{}", rows[0]);
    assert!(dir.join("pareto.png").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_options_fail_before_any_request() {
    let dir = out_dir("bad");
    for (args, why) in [
        (vec!["-s", "ts=0.5"], "stop temperature >= 1"),
        (vec!["-s", "ts=2", "-s", "ts=2"], "two settings are named `ts=2`"),
        (vec!["--data", "gsm9k"], "unknown data set `gsm9k`"),
        (vec!["--prompt", "no placeholder"], "{question}"),
        (vec!["--server", "http://127.0.0.1:9"], "cannot reach a terse server at http://127.0.0.1:9"),
        (vec!["--model", "no-such-model"], "unknown model `no-such-model`"),
        (vec!["--model", MODEL, "--server", "http://127.0.0.1:9"], "cannot be used with"),
    ] {
        let out = run(terse().args(["eval", "--quiet", "--limit", "1"]).args(&args).arg("--out").arg(&dir));
        assert!(!out.status.success(), "{args:?}");
        assert!(text(&out.stderr).contains(why), "{args:?}: {}", text(&out.stderr));
    }
    assert!(!dir.join("rows.jsonl").exists());
}
