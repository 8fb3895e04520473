//! The grid of reasoning settings an evaluation compares.
//!
//! A setting is written as a short spec, a comma-separated list of items:
//!
//! | item | meaning |
//! |---|---|
//! | `baseline` | no control at all (`reasoning.strategy: "none"`) |
//! | `short`, `medium`, `long` (or `mode=NAME`) | `reasoning_effort`: the model's mode preset |
//! | `ts=T` | temperature-scaled stopping with stop temperature T ≥ 1 |
//! | `ramp` | with `ts`: τ grows from 1 to T over the thinking budget |
//! | `budget=N` | budget forcing: end the thinking after N tokens |
//! | `max-thinking=N` | the thinking budget without choosing budget forcing (e.g. the ramp's horizon) |
//! | `min-thinking=N` | replace a stop before N thinking tokens by the continuation text |
//! | `probe` or `probe=N` | answer probing, every N controlled tokens |
//! | `probe-tokens=N` | most answer tokens one probe decodes |
//! | `at-reflection` | `probe`: probe before a reflection word (then `probe=N` is the least gap) |
//! | `words=W1\|W2` | `at-reflection`: these reflection words, not the model's |
//! | `agree=N` | `probe`: stop when N probes in a row agree |
//! | `confidence=C` | `probe`: stop when a probe's mean top-1 probability reaches C |
//! | `wrap-up` | with `ts`: a stop TS made becomes the wrap-up text and a short answer |
//! | `strategy=none\|ts\|budget\|probe` | the strategy, explicitly |
//! | `name=LABEL` | the setting's label (default: the spec itself) |
//!
//! e.g. `baseline`, `ts=4`, `ts=4,ramp,max-thinking=256`, `budget=128`,
//! `medium`, `medium,ts=2,name=medium-ts2`. A grid file is TOML with one list:
//! `settings = ["baseline", "ts=2", "budget=256", "medium"]`.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::reasoning::control::Strategy;
use crate::reasoning::modes::{Mode, ReasoningFields, MODE_VALUES};
use crate::reasoning::probing::ProbeAt;

#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub name: String,
    /// `reasoning_effort`.
    pub effort: Option<Mode>,
    /// The `reasoning` object, as the server defines it.
    pub reasoning: ReasoningFields,
}


impl Setting {
    /// Parse one spec (see the module documentation).
    pub fn parse(spec: &str) -> Result<Setting> {
        let spec = spec.trim();
        if spec.is_empty() {
            bail!("empty setting");
        }
        let mut name = String::new();
        let mut effort: Option<Mode> = None;
        let mut r = ReasoningFields::default();
        let mut label_items = Vec::new();
        let mut baseline = false;
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            let need = |what: &str| value.with_context(|| format!("`{key}` needs a value: `{key}={what}`"));
            match key {
                "name" => {
                    name = need("LABEL")?.to_string();
                    continue;
                }
                "baseline" => baseline = true,
                m if value.is_none() && Mode::parse(m).is_some() => set_once(&mut effort, Mode::parse(m).expect("checked"), "mode")?,
                "mode" => {
                    let m = need("short|medium|long")?;
                    let Some(mode) = Mode::parse(m) else { bail!("unknown mode `{m}` (one of {MODE_VALUES})") };
                    set_once(&mut effort, mode, "mode")?;
                }
                "ts" => {
                    let t: f32 = parse_number(key, need("T")?)?;
                    if !(t >= 1.0 && t.is_finite()) {
                        bail!("`ts` must be a stop temperature >= 1, got {t}");
                    }
                    set_once(&mut r.strategy, Strategy::Ts, "strategy")?;
                    r.stop_temperature = Some(t);
                }
                "ramp" => {
                    r.ramp = match value {
                        None | Some("true") => Some(true),
                        Some("false") => None,
                        Some(v) => bail!("`ramp` is true or false, got `{v}`"),
                    }
                }
                "budget" => {
                    set_once(&mut r.strategy, Strategy::Budget, "strategy")?;
                    r.max_thinking_tokens = Some(parse_count(key, need("N")?)?);
                }
                "probe" => {
                    set_once(&mut r.strategy, Strategy::Probe, "strategy")?;
                    if let Some(v) = value {
                        r.probe_interval = Some(parse_count(key, v)?);
                    }
                }
                "probe-tokens" => r.probe_tokens = Some(parse_count(key, need("N")?)?),
                "at-reflection" => r.probe_at = Some(ProbeAt::Reflection),
                "words" => r.probe_words = Some(need("W1|W2")?.split('|').map(str::to_string).collect()),
                "agree" => r.probe_agreement = Some(parse_count(key, need("N")?)?),
                "confidence" => r.probe_confidence = Some(parse_number(key, need("C")?)?),
                "wrap-up" => r.wrap_up = Some(true),
                "max-thinking" => r.max_thinking_tokens = Some(parse_count(key, need("N")?)?),
                "min-thinking" => r.min_thinking_tokens = Some(parse_count(key, need("N")?)?),
                "strategy" => {
                    let name = need("none|ts|budget|probe")?;
                    let Some(st) = Strategy::parse(name) else { bail!("unknown strategy `{name}` (none, ts, budget or probe)") };
                    set_once(&mut r.strategy, st, "strategy")?;
                }
                other => bail!(
                    "unknown item `{other}` in setting `{spec}` (known: baseline, short, medium, long, mode=, ts=, ramp, budget=, probe, probe=, probe-tokens=, at-reflection, words=, agree=, confidence=, wrap-up, max-thinking=, min-thinking=, strategy=, name=)"
                ),
            }
            label_items.push(item);
        }
        if baseline {
            if r.strategy.is_some() || effort.is_some() || r.ramp.is_some() || r.max_thinking_tokens.is_some() {
                bail!("`baseline` means no control and cannot be combined with other items (in `{spec}`)");
            }
            r.strategy = Some(Strategy::None);
        }
        if r.ramp.is_some() && r.strategy != Some(Strategy::Ts) {
            bail!("`ramp` only applies to TS: add `ts=T` (in `{spec}`)");
        }
        if r.strategy == Some(Strategy::Budget) && r.max_thinking_tokens == Some(0) {
            bail!("`budget` must be at least 1 token (in `{spec}`)");
        }
        if let (Some(min), Some(max)) = (r.min_thinking_tokens, r.max_thinking_tokens) {
            if min > max {
                bail!("min-thinking ({min}) exceeds the thinking budget ({max}) in `{spec}`");
            }
        }
        if label_items.is_empty() {
            bail!("setting `{spec}` has a name but no control: use `baseline` for no control");
        }
        if name.is_empty() {
            name = label_items.join(",");
        }
        Ok(Setting { name, effort, reasoning: r })
    }

    /// The request fields that apply this setting: `reasoning_effort` and the `reasoning` object.
    pub fn request_fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        if let Some(mode) = self.effort {
            fields.insert("reasoning_effort".into(), json!(mode.label()));
        }
        if self.reasoning != ReasoningFields::default() {
            fields.insert("reasoning".into(), serde_json::to_value(&self.reasoning).expect("plain fields serialize"));
        }
        fields
    }
}

fn set_once<T: PartialEq + std::fmt::Debug>(slot: &mut Option<T>, value: T, what: &str) -> Result<()> {
    match slot {
        Some(old) if *old != value => bail!("two different {what} values in one setting: {old:?} and {value:?}"),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

fn parse_number(key: &str, v: &str) -> Result<f32> {
    v.parse().with_context(|| format!("`{key}` needs a number, got `{v}`"))
}

fn parse_count(key: &str, v: &str) -> Result<usize> {
    v.parse().with_context(|| format!("`{key}` needs a whole number of tokens, got `{v}`"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    settings: Vec<String>,
}

/// The settings of a grid file: TOML with `settings = ["spec", ...]`.
pub fn read_grid_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let grid: GridFile = toml::from_str(&text).with_context(|| format!("parsing grid file {}", path.display()))?;
    Ok(grid.settings)
}

/// Parse every spec; names must be unique, and an empty grid means `baseline`.
pub fn parse_grid(specs: &[String]) -> Result<Vec<Setting>> {
    if specs.is_empty() {
        return Ok(vec![Setting::parse("baseline")?]);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for spec in specs {
        let s = Setting::parse(spec).with_context(|| format!("setting `{spec}`"))?;
        if !seen.insert(s.name.clone()) {
            bail!("two settings are named `{}`: give one a `name=`", s.name);
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(spec: &str) -> Value {
        Value::Object(Setting::parse(spec).unwrap().request_fields())
    }

    #[test]
    fn specs_become_request_fields() {
        assert_eq!(fields("baseline"), json!({"reasoning": {"strategy": "none"}}));
        assert_eq!(fields("medium"), json!({"reasoning_effort": "medium"}));
        assert_eq!(fields("mode=short"), json!({"reasoning_effort": "short"}));
        assert_eq!(fields("ts=4"), json!({"reasoning": {"strategy": "ts", "stop_temperature": 4.0}}));
        assert_eq!(
            fields("ts=8,ramp,max-thinking=256"),
            json!({"reasoning": {"strategy": "ts", "stop_temperature": 8.0, "ramp": true, "max_thinking_tokens": 256}})
        );
        assert_eq!(
            fields("budget=128,min-thinking=16"),
            json!({"reasoning": {"strategy": "budget", "max_thinking_tokens": 128, "min_thinking_tokens": 16}})
        );
        assert_eq!(
            fields("probe=32,agree=2,confidence=0.75,probe-tokens=10"),
            json!({"reasoning": {"strategy": "probe", "probe_interval": 32, "probe_tokens": 10, "probe_agreement": 2, "probe_confidence": 0.75}})
        );
        assert_eq!(fields("probe"), json!({"reasoning": {"strategy": "probe"}}));
        assert_eq!(
            fields("probe=16,at-reflection,words=So|Thus"),
            json!({"reasoning": {"strategy": "probe", "probe_interval": 16, "probe_at": "reflection", "probe_words": ["So", "Thus"]}})
        );
        assert_eq!(fields("ts=10,wrap-up"), json!({"reasoning": {"strategy": "ts", "stop_temperature": 10.0, "wrap_up": true}}));
        assert_eq!(
            fields("long,strategy=none"),
            json!({"reasoning_effort": "long", "reasoning": {"strategy": "none"}})
        );
    }

    #[test]
    fn names_default_to_the_spec() {
        assert_eq!(Setting::parse(" ts=4, ramp ").unwrap().name, "ts=4,ramp");
        assert_eq!(Setting::parse("medium,ts=2,name=med-ts2").unwrap().name, "med-ts2");
        let err = parse_grid(&["ts=4".into(), "ts=4".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("two settings are named `ts=4`"), "{err:#}");
        assert_eq!(parse_grid(&[]).unwrap()[0].name, "baseline");
    }

    #[test]
    fn bad_specs_say_why() {
        for (spec, why) in [
            ("", "empty"),
            ("ts=0.5", ">= 1"),
            ("ts=abc", "needs a number"),
            ("ts", "needs a value"),
            ("budget=-3", "whole number"),
            ("budget=0", "at least 1"),
            ("ramp", "only applies to TS"),
            ("baseline,ts=2", "cannot be combined"),
            ("ts=2,budget=64", "two different strategy values"),
            ("short,long", "two different mode values"),
            ("mode=fast", "unknown mode"),
            ("turbo", "unknown item `turbo`"),
            ("budget=64,min-thinking=100", "exceeds"),
            ("name=x", "no control"),
        ] {
            let err = format!("{:#}", Setting::parse(spec).unwrap_err());
            assert!(err.contains(why), "`{spec}`: {err}");
        }
    }

    #[test]
    fn grid_files() {
        let dir = std::env::temp_dir().join(format!("terse-grid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "# a grid\nsettings = [\"baseline\", \"ts=2\", \"budget=64\"]\n").unwrap();
        assert_eq!(read_grid_file(&good).unwrap(), vec!["baseline", "ts=2", "budget=64"]);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "setting = [\"baseline\"]\n").unwrap();
        assert!(read_grid_file(&bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
