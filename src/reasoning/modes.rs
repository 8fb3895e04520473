//! Short / medium / long modes: per-model presets (from the model's manifest)
//! merged with the request's own `reasoning` fields into the settings one
//! sequence runs with.
//!
//! Merge rules: every field the request gives replaces the preset's. The
//! strategy, when the request does not name one, is the preset's; where the
//! mode has none (or no mode was asked for) it follows from the request's
//! fields: τ > 1 → `ts`, a lone `max_thinking_tokens` → `budget`.
//! Under `ts`, `max_thinking_tokens` is the ramp's horizon, not a hard cap.

use serde::{Deserialize, Serialize};

use super::control::{ReasoningSettings, Strategy};
use super::probing::{ProbeAt, ProbeSettings};

/// The length level a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No mode named: no preset, no level prompt.
    Default,
    /// Thinking off where the model can (empty think block), no control.
    None,
    Short,
    Medium,
    Long,
}

impl Mode {
    /// `reasoning_effort` / `reasoning.mode` values; `low` and `high` are aliases.
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "none" => Mode::None,
            "short" | "low" => Mode::Short,
            "medium" => Mode::Medium,
            "long" | "high" => Mode::Long,
            _ => return None,
        })
    }

    /// The `mode` label of the metrics and of the response's `terse` object.
    pub fn label(&self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::None => "none",
            Mode::Short => "short",
            Mode::Medium => "medium",
            Mode::Long => "long",
        }
    }
}

/// The `reasoning_effort` / `reasoning.mode` values, for error messages.
pub const MODE_VALUES: &str = "short, medium, long, low, high or none";

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Mode::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("must be one of {MODE_VALUES}, got \"{name}\"")))
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

/// Where a mode's level prompt goes in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LevelPlacement {
    /// Appended to the last user turn, after a blank line.
    #[default]
    UserSuffix,
    /// Appended to the system prompt (one is added if the chat has none).
    System,
}

/// The reasoning fields a request's `reasoning` object and a manifest's
/// `[modes.NAME]` table may set, each optional: their one definition. A
/// preset may not name a `mode` (it is one).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// τ ≥ 1 of TS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_thinking_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_thinking_tokens: Option<usize>,
    /// `probe`: controlled tokens between probes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<usize>,
    /// `probe`: most answer tokens a probe decodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_tokens: Option<usize>,
    /// `probe`: stop when this many probes in a row agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_agreement: Option<usize>,
    /// `probe`: stop when a probe's mean top-1 probability reaches this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_confidence: Option<f32>,
    /// `probe`: every `probe_interval` tokens, or before a reflection word.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_at: Option<ProbeAt>,
    /// `probe` at `reflection`: the words to probe before, in place of the model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_words: Option<Vec<String>>,
    /// `ts` on a model without think tokens: a stop TS made becomes the wrap-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrap_up: Option<bool>,
}

impl ReasoningFields {
    /// The checks of a field on its own (ranges serde's types do not carry).
    pub fn check(&self) -> Result<(), MergeError> {
        let out_of_range = |field: &'static str, what: &str, got: String| MergeError { field, message: format!("`reasoning.{field}` must be {what}, got {got}") };
        if self.probe_interval == Some(0) {
            return Err(out_of_range("probe_interval", "at least 1", "0".into()));
        }
        if let Some(n) = self.probe_tokens.filter(|n| !(1..=ProbeSettings::MAX_TOKENS).contains(n)) {
            return Err(out_of_range("probe_tokens", &format!("between 1 and {}", ProbeSettings::MAX_TOKENS), n.to_string()));
        }
        if let Some(n) = self.probe_agreement.filter(|n| !(1..=ProbeSettings::MAX_AGREEMENT).contains(n)) {
            return Err(out_of_range("probe_agreement", &format!("between 1 and {}", ProbeSettings::MAX_AGREEMENT), n.to_string()));
        }
        if let Some(c) = self.probe_confidence.filter(|c| !(*c > 0.0 && *c <= 1.0)) {
            return Err(out_of_range("probe_confidence", "a probability in (0, 1]", c.to_string()));
        }
        if let Some(words) = &self.probe_words {
            if !(1..=ProbeSettings::MAX_WORDS).contains(&words.len()) {
                return Err(out_of_range("probe_words", &format!("a list of 1 to {} words", ProbeSettings::MAX_WORDS), format!("{} words", words.len())));
            }
            if let Some(bad) = words.iter().find(|w| w.trim().is_empty() || w.chars().count() > ProbeSettings::MAX_WORD_CHARS) {
                let what = format!("words of 1 to {} characters, not only spaces", ProbeSettings::MAX_WORD_CHARS);
                return Err(out_of_range("probe_words", &what, format!("{bad:?}")));
            }
        }
        if let Some(t) = self.stop_temperature {
            if !(t >= 1.0 && t.is_finite()) {
                return Err(MergeError {
                    field: "stop_temperature",
                    message: format!("`reasoning.stop_temperature` must be a finite number >= 1, got {t}"),
                });
            }
        }
        Ok(())
    }
}

/// What a mode means for one model (a `[modes.NAME]` table of its manifest):
/// where its level prompt goes, and its reasoning fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModePreset {
    /// The instruction a length-trained checkpoint was trained with.
    pub level_prompt: Option<String>,
    pub placement: LevelPlacement,
    pub reasoning: ReasoningFields,
}

impl<'de> Deserialize<'de> for ModePreset {
    /// The table's `level_prompt` and `placement`, and the rest as
    /// [`ReasoningFields`] (so an unknown key is an error, as it is in a request).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let level_prompt = table.remove("level_prompt").map(serde_json::from_value).transpose().map_err(D::Error::custom)?;
        let placement = table.remove("placement").map(serde_json::from_value).transpose().map_err(D::Error::custom)?.unwrap_or_default();
        if table.contains_key("mode") {
            return Err(D::Error::custom("a mode's preset cannot name a `mode`"));
        }
        let reasoning = serde_json::from_value(serde_json::Value::Object(table)).map_err(D::Error::custom)?;
        Ok(ModePreset { level_prompt, placement, reasoning })
    }
}

impl ModePreset {
    /// A preset of these reasoning fields, without a level prompt.
    pub fn of(reasoning: ReasoningFields) -> Self {
        ModePreset { reasoning, ..Default::default() }
    }

    /// Check a preset as it is read, so a bad manifest fails at start.
    pub fn check(&self, mode: &str) -> Result<(), String> {
        let tau = self.reasoning.stop_temperature.unwrap_or(1.0);
        if !(tau >= 1.0 && tau.is_finite()) {
            return Err(format!("modes.{mode}.stop_temperature must be a finite number >= 1, got {tau}"));
        }
        // The same rules as a request's own fields, and merged with none.
        self.reasoning.check().map_err(|e| format!("modes.{mode}: {}", e.message.replace("`reasoning.", "`")))?;
        merge(Some(self), &ReasoningFields::default())
            .map(|_| ())
            .map_err(|e| format!("modes.{mode}: {}", e.message.replace("`reasoning.", "`")))
    }
}

/// The three presets of a model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModePresets {
    pub short: ModePreset,
    pub medium: ModePreset,
    pub long: ModePreset,
}

impl ModePresets {
    /// The preset of `mode`; `Default` and `None` have none.
    pub fn get(&self, mode: Mode) -> Option<&ModePreset> {
        match mode {
            Mode::Short => Some(&self.short),
            Mode::Medium => Some(&self.medium),
            Mode::Long => Some(&self.long),
            Mode::Default | Mode::None => None,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        self.short.check("short")?;
        self.medium.check("medium")?;
        self.long.check("long")
    }
}

impl Default for ModePresets {
    /// For a model whose manifest names none: soft TS toward a budget for short
    /// and medium, a generous hard cap for long. Placeholders until `terse eval`
    /// has measured the model; manifests override them.
    fn default() -> Self {
        let ts = |tau: f32, budget: usize| {
            ModePreset::of(ReasoningFields {
                strategy: Some(Strategy::Ts),
                stop_temperature: Some(tau),
                ramp: Some(true),
                max_thinking_tokens: Some(budget),
                ..Default::default()
            })
        };
        ModePresets {
            short: ts(4.0, 256),
            medium: ts(2.0, 1024),
            long: ModePreset::of(ReasoningFields { strategy: Some(Strategy::Budget), max_thinking_tokens: Some(4096), ..Default::default() }),
        }
    }
}

/// The probe settings: the request's fields over the preset's over the
/// defaults. Agreement is the default rule only when neither rule is set.
fn merge_probe(base: &ReasoningFields, req: &ReasoningFields) -> ProbeSettings {
    let confidence = req.probe_confidence.or(base.probe_confidence);
    let agreement = req.probe_agreement.or(base.probe_agreement);
    ProbeSettings {
        at: req.probe_at.or(base.probe_at).unwrap_or_default(),
        interval: req.probe_interval.or(base.probe_interval).unwrap_or(ProbeSettings::DEFAULT_INTERVAL),
        tokens: req.probe_tokens.or(base.probe_tokens).unwrap_or(ProbeSettings::DEFAULT_TOKENS),
        agreement: agreement.or(confidence.is_none().then_some(ProbeSettings::DEFAULT_AGREEMENT)),
        confidence,
    }
}

/// A merge whose result is inconsistent; `field` names the request field at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeError {
    pub field: &'static str,
    pub message: String,
}

/// The settings a request runs with: its mode's preset, then its own fields.
pub fn merge(preset: Option<&ModePreset>, req: &ReasoningFields) -> Result<ReasoningSettings, MergeError> {
    req.check()?;
    let base = preset.map(|p| p.reasoning.clone()).unwrap_or_default();
    let strategy = match (req.strategy, base.strategy) {
        (Some(s), _) => s,
        (None, Some(s)) if s != Strategy::None => s,
        (None, _) => match (req.stop_temperature, req.max_thinking_tokens) {
            (Some(t), _) if t > 1.0 => Strategy::Ts,
            (_, Some(_)) => Strategy::Budget,
            _ => Strategy::None,
        },
    };
    let settings = ReasoningSettings {
        strategy,
        stop_temperature: req.stop_temperature.or(base.stop_temperature).unwrap_or(1.0),
        ramp: req.ramp.or(base.ramp).unwrap_or(false),
        max_thinking_tokens: req.max_thinking_tokens.or(base.max_thinking_tokens),
        min_thinking_tokens: req.min_thinking_tokens.or(base.min_thinking_tokens),
        probe: merge_probe(&base, req),
        probe_words: None,
        wrap_up: req.wrap_up.or(base.wrap_up).unwrap_or(false),
    };
    let probe_fields = [
        ("probe_interval", req.probe_interval.is_some()),
        ("probe_tokens", req.probe_tokens.is_some()),
        ("probe_agreement", req.probe_agreement.is_some()),
        ("probe_confidence", req.probe_confidence.is_some()),
        ("probe_at", req.probe_at.is_some()),
        ("probe_words", req.probe_words.is_some()),
    ];
    if let Some((field, _)) = probe_fields.iter().find(|(_, given)| *given).filter(|_| strategy != Strategy::Probe) {
        return Err(MergeError { field, message: format!("`reasoning.{field}` applies to strategy probe only, not {}", strategy.name()) });
    }
    if req.probe_words.is_some() && settings.probe.at != ProbeAt::Reflection {
        return Err(MergeError { field: "probe_words", message: "`reasoning.probe_words` applies to probe_at reflection only, not interval".into() });
    }
    // A preset's words go with its probes at reflection, not with a request's interval.
    let mut settings = settings;
    if settings.probe.at == ProbeAt::Reflection {
        settings.probe_words = req.probe_words.clone().or(base.probe_words);
    }
    if req.wrap_up.is_some() && strategy != Strategy::Ts {
        return Err(MergeError { field: "wrap_up", message: format!("`reasoning.wrap_up` applies to strategy ts only, not {}", strategy.name()) });
    }
    if let (Some(min), Some(max)) = (settings.min_thinking_tokens, settings.max_thinking_tokens) {
        if min > max {
            let field = if req.min_thinking_tokens.is_some() { "min_thinking_tokens" } else { "max_thinking_tokens" };
            return Err(MergeError {
                field,
                message: format!(
                    "`reasoning.min_thinking_tokens` ({min}) exceeds `reasoning.max_thinking_tokens` ({max}){}",
                    if preset.is_some() { " once merged with the mode's preset" } else { "" }
                ),
            });
        }
    }
    if settings.strategy == Strategy::Budget && settings.max_thinking_tokens.is_none() {
        return Err(MergeError {
            field: "max_thinking_tokens",
            message: "`reasoning.strategy` budget needs `reasoning.max_thinking_tokens`".into(),
        });
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(strategy: Strategy) -> ModePreset {
        ModePreset {
            level_prompt: Some("Be brief.".into()),
            placement: LevelPlacement::UserSuffix,
            reasoning: ReasoningFields {
                strategy: Some(strategy),
                stop_temperature: Some(3.0),
                ramp: Some(true),
                max_thinking_tokens: Some(100),
                min_thinking_tokens: Some(10),
                ..Default::default()
            },
        }
    }

    #[test]
    fn request_fields_override_the_preset_one_by_one() {
        let p = preset(Strategy::Ts);
        let req = ReasoningFields { max_thinking_tokens: Some(40), ramp: Some(false), ..Default::default() };
        let s = merge(Some(&p), &req).unwrap();
        assert_eq!(s.strategy, Strategy::Ts, "the preset's strategy stays");
        assert_eq!((s.stop_temperature, s.ramp, s.max_thinking_tokens, s.min_thinking_tokens), (3.0, false, Some(40), Some(10)));
        let s = merge(Some(&p), &ReasoningFields { strategy: Some(Strategy::Budget), ..Default::default() }).unwrap();
        assert_eq!((s.strategy, s.max_thinking_tokens), (Strategy::Budget, Some(100)));
    }

    #[test]
    fn without_a_mode_the_strategy_follows_the_fields() {
        let ts = merge(None, &ReasoningFields { stop_temperature: Some(2.0), ..Default::default() }).unwrap();
        assert_eq!(ts.strategy, Strategy::Ts);
        let cap = merge(None, &ReasoningFields { max_thinking_tokens: Some(8), ..Default::default() }).unwrap();
        assert_eq!(cap.strategy, Strategy::Budget);
        assert_eq!(merge(None, &ReasoningFields::default()).unwrap(), ReasoningSettings::default());
        // A mode without control of its own does not silence the request's fields.
        let mut uncontrolled = preset(Strategy::None);
        (uncontrolled.reasoning.max_thinking_tokens, uncontrolled.reasoning.min_thinking_tokens) = (None, None);
        let cap = merge(Some(&uncontrolled), &ReasoningFields { max_thinking_tokens: Some(8), ..Default::default() });
        assert_eq!(cap.unwrap().strategy, Strategy::Budget);
    }

    #[test]
    fn a_minimum_above_the_presets_cap_names_the_request_field() {
        let p = preset(Strategy::Budget);
        let err = merge(Some(&p), &ReasoningFields { min_thinking_tokens: Some(500), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "min_thinking_tokens");
        let err = merge(Some(&p), &ReasoningFields { max_thinking_tokens: Some(5), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "max_thinking_tokens");
        let err = merge(None, &ReasoningFields { strategy: Some(Strategy::Budget), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "max_thinking_tokens");
        let err = merge(None, &ReasoningFields { stop_temperature: Some(f32::INFINITY), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "stop_temperature");
    }

    #[test]
    fn probe_fields_merge_over_defaults_and_belong_to_their_strategy() {
        let probe = |fields: ReasoningFields| merge(None, &ReasoningFields { strategy: Some(Strategy::Probe), ..fields });
        let s = probe(ReasoningFields::default()).unwrap();
        assert_eq!(s.probe, ProbeSettings::default());
        // A confidence alone replaces the default agreement rule; both given, both stand.
        let s = probe(ReasoningFields { probe_confidence: Some(0.9), probe_interval: Some(16), ..Default::default() }).unwrap();
        assert_eq!((s.probe.interval, s.probe.agreement, s.probe.confidence), (16, None, Some(0.9)));
        let s = probe(ReasoningFields { probe_confidence: Some(0.9), probe_agreement: Some(2), ..Default::default() }).unwrap();
        assert_eq!((s.probe.agreement, s.probe.confidence), (Some(2), Some(0.9)));
        // A preset's probe settings hold unless the request overrides them.
        let p = ModePreset::of(ReasoningFields { strategy: Some(Strategy::Probe), probe_interval: Some(48), probe_tokens: Some(8), ..Default::default() });
        let s = merge(Some(&p), &ReasoningFields { probe_tokens: Some(6), ..Default::default() }).unwrap();
        assert_eq!((s.strategy, s.probe.interval, s.probe.tokens), (Strategy::Probe, 48, 6));
        let field = |fields: ReasoningFields| merge(None, &fields).unwrap_err().field;
        assert_eq!(field(ReasoningFields { stop_temperature: Some(2.0), probe_interval: Some(8), ..Default::default() }), "probe_interval");
        assert_eq!(field(ReasoningFields { max_thinking_tokens: Some(8), wrap_up: Some(true), ..Default::default() }), "wrap_up");
        assert_eq!(field(ReasoningFields { strategy: Some(Strategy::Probe), probe_interval: Some(0), ..Default::default() }), "probe_interval");
        assert_eq!(field(ReasoningFields { strategy: Some(Strategy::Probe), probe_tokens: Some(65), ..Default::default() }), "probe_tokens");
        assert_eq!(field(ReasoningFields { strategy: Some(Strategy::Probe), probe_confidence: Some(1.5), ..Default::default() }), "probe_confidence");
        assert_eq!(field(ReasoningFields { strategy: Some(Strategy::Probe), probe_agreement: Some(0), ..Default::default() }), "probe_agreement");
        let wrap = merge(None, &ReasoningFields { stop_temperature: Some(4.0), wrap_up: Some(true), ..Default::default() }).unwrap();
        assert!(wrap.wrap_up && wrap.strategy == Strategy::Ts);
    }

    #[test]
    fn reflection_words_go_with_probes_at_reflection() {
        let words = |w: &[&str]| Some(w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let probe = |fields: ReasoningFields| merge(None, &ReasoningFields { strategy: Some(Strategy::Probe), ..fields });
        let s = probe(ReasoningFields { probe_at: Some(ProbeAt::Reflection), probe_words: words(&["So"]), ..Default::default() }).unwrap();
        assert_eq!((s.probe.at, s.probe_words), (ProbeAt::Reflection, words(&["So"])));
        let field = |fields: ReasoningFields| probe(fields).unwrap_err().field;
        assert_eq!(field(ReasoningFields { probe_words: words(&["So"]), ..Default::default() }), "probe_words", "words without probes at reflection");
        assert_eq!(field(ReasoningFields { probe_at: Some(ProbeAt::Reflection), probe_words: words(&[" "]), ..Default::default() }), "probe_words");
        assert_eq!(field(ReasoningFields { probe_at: Some(ProbeAt::Reflection), probe_words: words(&[]), ..Default::default() }), "probe_words");
        let long = "w".repeat(ProbeSettings::MAX_WORD_CHARS + 1);
        assert_eq!(field(ReasoningFields { probe_at: Some(ProbeAt::Reflection), probe_words: words(&[&long]), ..Default::default() }), "probe_words");
        let ts = merge(None, &ReasoningFields { stop_temperature: Some(2.0), probe_at: Some(ProbeAt::Reflection), ..Default::default() });
        assert_eq!(ts.unwrap_err().field, "probe_at", "probe fields belong to probe");
        // A preset's words go with its probes at reflection, and not with a request's interval.
        let p = ModePreset::of(ReasoningFields { strategy: Some(Strategy::Probe), probe_at: Some(ProbeAt::Reflection), probe_words: words(&["Hmm"]), ..Default::default() });
        assert_eq!(merge(Some(&p), &ReasoningFields::default()).unwrap().probe_words, words(&["Hmm"]));
        let s = merge(Some(&p), &ReasoningFields { probe_at: Some(ProbeAt::Interval), ..Default::default() }).unwrap();
        assert_eq!((s.probe.at, s.probe_words), (ProbeAt::Interval, None));
        let bad = ModePreset::of(ReasoningFields { strategy: Some(Strategy::Probe), probe_at: Some(ProbeAt::Reflection), probe_words: words(&[]), ..Default::default() });
        assert!(bad.check("medium").unwrap_err().contains("probe_words"), "a preset's fields are checked as a request's");
        let s: ReasoningFields = serde_json::from_str(r#"{"probe_at": "reflection"}"#).unwrap();
        assert_eq!(s.probe_at, Some(ProbeAt::Reflection));
        assert!(serde_json::from_str::<ReasoningFields>(r#"{"probe_at": "often"}"#).is_err());
    }

    #[test]
    fn presets_parse_from_a_manifest_table_and_are_checked() {
        let text = r#"
            [short]
            level_prompt = "Think briefly."
            placement = "system"
            strategy = "ts"
            stop_temperature = 4.0
            ramp = true
            max_thinking_tokens = 256
            [medium]
            strategy = "budget"
            max_thinking_tokens = 1024
            [long]
        "#;
        let p: ModePresets = toml::from_str(text).unwrap();
        assert_eq!(p.short.placement, LevelPlacement::System);
        assert_eq!(p.short.level_prompt.as_deref(), Some("Think briefly."));
        assert_eq!(p.short.reasoning.strategy, Some(Strategy::Ts));
        assert_eq!(merge(Some(&p.medium), &ReasoningFields::default()).unwrap().stop_temperature, 1.0);
        assert_eq!(p.long.reasoning.strategy, None);
        assert_eq!(merge(Some(&p.long), &ReasoningFields::default()).unwrap().strategy, Strategy::None);
        p.check().unwrap();
        let bad: ModePresets = toml::from_str(&text.replace("stop_temperature = 4.0", "stop_temperature = 0.5")).unwrap();
        assert!(bad.check().unwrap_err().contains("modes.short.stop_temperature"));
        assert!(toml::from_str::<ModePresets>(&text.replace("\"ts\"", "\"fast\"")).is_err());
        // A misspelt key is an error, not a silently ignored setting; a preset names no mode.
        assert!(toml::from_str::<ModePresets>(&text.replace("ramp = true", "rmap = true")).is_err());
        assert!(toml::from_str::<ModePresets>(&text.replace("ramp = true", "mode = \"long\"")).is_err());
        ModePresets::default().check().unwrap();
    }

    #[test]
    fn the_fields_read_and_write_as_a_request_names_them() {
        let fields: ReasoningFields = serde_json::from_value(serde_json::json!({"mode": "high", "strategy": "ts", "stop_temperature": 4, "max_thinking_tokens": 64})).unwrap();
        assert_eq!((fields.mode, fields.strategy, fields.stop_temperature), (Some(Mode::Long), Some(Strategy::Ts), Some(4.0)));
        let written = serde_json::to_value(&fields).unwrap();
        assert_eq!(written, serde_json::json!({"mode": "long", "strategy": "ts", "stop_temperature": 4.0, "max_thinking_tokens": 64}));
        let err = serde_json::from_value::<ReasoningFields>(serde_json::json!({"strategy": "magic"})).unwrap_err().to_string();
        assert!(err.contains("must be one of ts, budget, probe or none"), "{err}");
    }
}
