//! The summary of an evaluation, one line per setting: accuracy with its 95%
//! Wilson interval, completion tokens (mean, median), the tokens answer
//! probes spent beside them, all tokens spent per correct answer, latency,
//! and why the controlled phase stopped.

use std::collections::BTreeMap;

use serde::Serialize;

use super::rows::Row;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SettingSummary {
    pub setting: String,
    /// Problems answered under this setting.
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// The 95% Wilson score interval of the accuracy.
    pub accuracy_low: f64,
    pub accuracy_high: f64,
    pub mean_tokens: f64,
    pub median_tokens: f64,
    /// All tokens spent (completion and probe) over the correct answers; `None` with no correct answer.
    pub tokens_per_correct: Option<f64>,
    pub mean_thinking_tokens: f64,
    pub mean_forced_tokens: f64,
    /// Tokens answer probes fed through the model, not returned.
    pub mean_probe_tokens: f64,
    /// End-to-end seconds per request, under the run's concurrency (the
    /// settings share the batch, so this is where a setting's extra compute shows).
    pub mean_latency_s: f64,
    /// Share of rows by stop reason (`natural`, `stop_temperature`, `budget`, `length`, ...).
    pub stops: BTreeMap<String, f64>,
}

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval for `k` successes in `n` trials (the normal
/// approximation misbehaves at small n and near 0 or 1; this one stays in [0, 1]).
pub fn wilson_interval(k: usize, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

fn median(values: &mut [usize]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid] as f64
    } else {
        (values[mid - 1] + values[mid]) as f64 / 2.0
    }
}

/// Summarise the rows of one setting.
pub fn summarize(setting: &str, rows: &[&Row]) -> SettingSummary {
    let n = rows.len();
    let correct = rows.iter().filter(|r| r.correct).count();
    let total: usize = rows.iter().map(|r| r.completion_tokens + r.probe_tokens).sum();
    let mean = |f: fn(&Row) -> usize| if n == 0 { 0.0 } else { rows.iter().map(|r| f(r)).sum::<usize>() as f64 / n as f64 };
    let mut tokens: Vec<usize> = rows.iter().map(|r| r.completion_tokens).collect();
    let mut stops = BTreeMap::new();
    for r in rows {
        *stops.entry(r.stop_reason.clone()).or_insert(0.0) += 1.0 / n as f64;
    }
    let (accuracy_low, accuracy_high) = wilson_interval(correct, n, Z95);
    SettingSummary {
        setting: setting.to_string(),
        n,
        correct,
        accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        accuracy_low,
        accuracy_high,
        mean_tokens: mean(|r| r.completion_tokens),
        median_tokens: median(&mut tokens),
        tokens_per_correct: (correct > 0).then(|| total as f64 / correct as f64),
        mean_thinking_tokens: mean(|r| r.thinking_tokens),
        mean_forced_tokens: mean(|r| r.forced_tokens),
        mean_probe_tokens: mean(|r| r.probe_tokens),
        mean_latency_s: if n == 0 { 0.0 } else { rows.iter().map(|r| r.latency_s).sum::<f64>() / n as f64 },
        stops,
    }
}

/// A Markdown table of the summaries, in the order given.
pub fn markdown_table(summaries: &[SettingSummary]) -> String {
    let mut out = String::from(
        "| setting | n | accuracy (95% CI) | mean tokens | median tokens | mean probe | tokens / correct | mean thinking | mean forced | latency s | stops |\n\
         |---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in summaries {
        let per_correct = s.tokens_per_correct.map_or("–".to_string(), |t| format!("{t:.0}"));
        let stops: Vec<String> = s.stops.iter().map(|(k, v)| format!("{k} {:.0}%", v * 100.0)).collect();
        out.push_str(&format!(
            "| {} | {} | {:.1}% ({:.1}–{:.1}) | {:.1} | {:.0} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {} |\n",
            s.setting.replace('|', "\\|"),
            s.n,
            100.0 * s.accuracy,
            100.0 * s.accuracy_low,
            100.0 * s.accuracy_high,
            s.mean_tokens,
            s.median_tokens,
            s.mean_probe_tokens,
            per_correct,
            s.mean_thinking_tokens,
            s.mean_forced_tokens,
            s.mean_latency_s,
            stops.join(", "),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::rows::tests::row;

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10: the textbook interval is (0.490, 0.943).
        let (lo, hi) = wilson_interval(8, 10, Z95);
        assert!((lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3, "{lo} {hi}");
        let (lo, hi) = wilson_interval(0, 20, Z95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.1611).abs() < 1e-3, "{hi}");
        let (lo, hi) = wilson_interval(20, 20, Z95);
        assert!((lo - 0.8389).abs() < 1e-3 && (hi - 1.0).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
    }

    #[test]
    fn summaries_count_tokens_and_stops() {
        let mut rows = Vec::new();
        for (i, (tokens, correct, stop)) in
            [(10, true, "natural"), (20, false, "length"), (30, true, "natural"), (100, false, "budget")].into_iter().enumerate()
        {
            let mut r = row(&i.to_string(), "ts=2", "f");
            r.completion_tokens = tokens;
            r.correct = correct;
            r.stop_reason = stop.into();
            r.forced_tokens = if stop == "budget" { 4 } else { 0 };
            r.probe_tokens = if stop == "budget" { 8 } else { 0 };
            rows.push(r);
        }
        let refs: Vec<&Row> = rows.iter().collect();
        let s = summarize("ts=2", &refs);
        assert_eq!((s.n, s.correct), (4, 2));
        assert_eq!(s.accuracy, 0.5);
        assert_eq!(s.mean_tokens, 40.0);
        assert_eq!(s.median_tokens, 25.0);
        assert_eq!(s.tokens_per_correct, Some(84.0), "probe tokens count as spent");
        assert_eq!(s.mean_probe_tokens, 2.0);
        assert_eq!(s.mean_forced_tokens, 1.0);
        assert_eq!(s.stops["natural"], 0.5);
        assert_eq!(s.stops["budget"], 0.25);
        let table = markdown_table(&[s]);
        assert!(table.contains("| ts=2 | 4 | 50.0% (15.0–85.0) | 40.0 | 25 | 2.0 | 84 | 0.0 | 1.0 | 0.5 | budget 25%, length 25%, natural 50% |"), "{table}");

        let none = summarize("x", &[]);
        assert_eq!((none.n, none.tokens_per_correct), (0, None));
    }
}
