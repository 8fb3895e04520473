//! Short / medium / long modes: per-model presets (from the model's manifest)
//! merged with the request's own `reasoning` fields into the settings one
//! sequence runs with.
//!
//! Merge rules: every field the request gives replaces the preset's. The
//! strategy, when the request does not name one, is the preset's; where the
//! mode has none (or no mode was asked for) it follows from the request's
//! fields: τ > 1 → `ts`, a lone `max_thinking_tokens` → `budget`.
//! Under `ts`, `max_thinking_tokens` is the ramp's horizon, not a hard cap.

use serde::Deserialize;

use super::control::{ReasoningSettings, Strategy};
use crate::tokenize::ChatMessage;

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

/// What a mode means for one model (a `[modes.NAME]` table of its manifest).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModePreset {
    /// The instruction a length-trained checkpoint was trained with.
    #[serde(default)]
    pub level_prompt: Option<String>,
    #[serde(default)]
    pub placement: LevelPlacement,
    #[serde(default = "no_strategy", deserialize_with = "strategy_name")]
    pub strategy: Strategy,
    #[serde(default = "one")]
    pub stop_temperature: f32,
    #[serde(default)]
    pub ramp: bool,
    #[serde(default)]
    pub max_thinking_tokens: Option<usize>,
    #[serde(default)]
    pub min_thinking_tokens: Option<usize>,
}

fn no_strategy() -> Strategy {
    Strategy::None
}

fn one() -> f32 {
    1.0
}

fn strategy_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Strategy, D::Error> {
    let name = String::deserialize(d)?;
    Strategy::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown strategy `{name}` (ts, budget or none)")))
}

impl ModePreset {
    pub fn settings(&self) -> ReasoningSettings {
        ReasoningSettings {
            strategy: self.strategy,
            stop_temperature: self.stop_temperature,
            ramp: self.ramp,
            max_thinking_tokens: self.max_thinking_tokens,
            min_thinking_tokens: self.min_thinking_tokens,
        }
    }

    /// Check a preset as it is read, so a bad manifest fails at start.
    pub fn check(&self, mode: &str) -> Result<(), String> {
        if !(self.stop_temperature >= 1.0) {
            return Err(format!("modes.{mode}.stop_temperature must be >= 1, got {}", self.stop_temperature));
        }
        // The same consistency rules as a request merged with no fields of its own.
        merge(Some(self), &ReasoningOverrides::default())
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
        let ts = |tau: f32, budget: usize| ModePreset {
            level_prompt: None,
            placement: LevelPlacement::UserSuffix,
            strategy: Strategy::Ts,
            stop_temperature: tau,
            ramp: true,
            max_thinking_tokens: Some(budget),
            min_thinking_tokens: None,
        };
        ModePresets {
            short: ts(4.0, 256),
            medium: ts(2.0, 1024),
            long: ModePreset { strategy: Strategy::Budget, stop_temperature: 1.0, ramp: false, ..ts(1.0, 4096) },
        }
    }
}

/// The `reasoning` fields a request gave, not yet merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReasoningOverrides {
    pub strategy: Option<Strategy>,
    pub stop_temperature: Option<f32>,
    pub ramp: Option<bool>,
    pub max_thinking_tokens: Option<usize>,
    pub min_thinking_tokens: Option<usize>,
}

/// A merge whose result is inconsistent; `field` names the request field at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeError {
    pub field: &'static str,
    pub message: String,
}

/// The settings a request runs with: its mode's preset, then its own fields.
pub fn merge(preset: Option<&ModePreset>, req: &ReasoningOverrides) -> Result<ReasoningSettings, MergeError> {
    let base = preset.map(ModePreset::settings).unwrap_or_default();
    let preset_strategy = preset.map_or(Strategy::None, |p| p.strategy);
    let strategy = match req.strategy {
        Some(s) => s,
        None if preset_strategy != Strategy::None => preset_strategy,
        None => match (req.stop_temperature, req.max_thinking_tokens) {
            (Some(t), _) if t > 1.0 => Strategy::Ts,
            (_, Some(_)) => Strategy::Budget,
            _ => Strategy::None,
        },
    };
    let settings = ReasoningSettings {
        strategy,
        stop_temperature: req.stop_temperature.unwrap_or(base.stop_temperature),
        ramp: req.ramp.unwrap_or(base.ramp),
        max_thinking_tokens: req.max_thinking_tokens.or(base.max_thinking_tokens),
        min_thinking_tokens: req.min_thinking_tokens.or(base.min_thinking_tokens),
    };
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

/// Put a mode's level prompt into the chat, where its preset says.
pub fn apply_level_prompt(messages: &mut Vec<ChatMessage>, preset: &ModePreset) {
    let Some(prompt) = preset.level_prompt.as_deref().filter(|p| !p.is_empty()) else { return };
    let append = |m: &mut ChatMessage| {
        if m.content.is_empty() {
            m.content = prompt.to_string();
        } else {
            m.content = format!("{}\n\n{prompt}", m.content.trim_end());
        }
    };
    match preset.placement {
        LevelPlacement::UserSuffix => match messages.iter_mut().rev().find(|m| m.role == "user") {
            Some(last_user) => append(last_user),
            None => messages.push(ChatMessage { role: "user".into(), content: prompt.to_string() }),
        },
        LevelPlacement::System => match messages.first_mut().filter(|m| m.role == "system" || m.role == "developer") {
            Some(system) => append(system),
            None => messages.insert(0, ChatMessage { role: "system".into(), content: prompt.to_string() }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(strategy: Strategy) -> ModePreset {
        ModePreset {
            level_prompt: Some("Be brief.".into()),
            placement: LevelPlacement::UserSuffix,
            strategy,
            stop_temperature: 3.0,
            ramp: true,
            max_thinking_tokens: Some(100),
            min_thinking_tokens: Some(10),
        }
    }

    #[test]
    fn request_fields_override_the_preset_one_by_one() {
        let p = preset(Strategy::Ts);
        let req = ReasoningOverrides { max_thinking_tokens: Some(40), ramp: Some(false), ..Default::default() };
        let s = merge(Some(&p), &req).unwrap();
        assert_eq!(s.strategy, Strategy::Ts, "the preset's strategy stays");
        assert_eq!((s.stop_temperature, s.ramp, s.max_thinking_tokens, s.min_thinking_tokens), (3.0, false, Some(40), Some(10)));
        let s = merge(Some(&p), &ReasoningOverrides { strategy: Some(Strategy::Budget), ..Default::default() }).unwrap();
        assert_eq!((s.strategy, s.max_thinking_tokens), (Strategy::Budget, Some(100)));
    }

    #[test]
    fn without_a_mode_the_strategy_follows_the_fields() {
        let ts = merge(None, &ReasoningOverrides { stop_temperature: Some(2.0), ..Default::default() }).unwrap();
        assert_eq!(ts.strategy, Strategy::Ts);
        let cap = merge(None, &ReasoningOverrides { max_thinking_tokens: Some(8), ..Default::default() }).unwrap();
        assert_eq!(cap.strategy, Strategy::Budget);
        assert_eq!(merge(None, &ReasoningOverrides::default()).unwrap(), ReasoningSettings::default());
        // A mode without control of its own does not silence the request's fields.
        let uncontrolled = ModePreset { max_thinking_tokens: None, min_thinking_tokens: None, ..preset(Strategy::None) };
        let cap = merge(Some(&uncontrolled), &ReasoningOverrides { max_thinking_tokens: Some(8), ..Default::default() });
        assert_eq!(cap.unwrap().strategy, Strategy::Budget);
    }

    #[test]
    fn a_minimum_above_the_presets_cap_names_the_request_field() {
        let p = preset(Strategy::Budget);
        let err = merge(Some(&p), &ReasoningOverrides { min_thinking_tokens: Some(500), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "min_thinking_tokens");
        let err = merge(Some(&p), &ReasoningOverrides { max_thinking_tokens: Some(5), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "max_thinking_tokens");
        let err = merge(None, &ReasoningOverrides { strategy: Some(Strategy::Budget), ..Default::default() }).unwrap_err();
        assert_eq!(err.field, "max_thinking_tokens");
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    #[test]
    fn level_prompt_goes_after_the_last_user_turn_or_into_the_system_prompt() {
        let mut chat = vec![msg("user", "a"), msg("assistant", "b"), msg("user", "What is 2+2? ")];
        apply_level_prompt(&mut chat, &preset(Strategy::Ts));
        assert_eq!(chat[2].content, "What is 2+2?\n\nBe brief.");
        assert_eq!(chat[0].content, "a");

        let system = ModePreset { placement: LevelPlacement::System, ..preset(Strategy::Ts) };
        let mut chat = vec![msg("user", "q")];
        apply_level_prompt(&mut chat, &system);
        assert_eq!(chat, vec![msg("system", "Be brief."), msg("user", "q")]);
        let mut chat = vec![msg("system", "You help."), msg("user", "q")];
        apply_level_prompt(&mut chat, &system);
        assert_eq!(chat[0].content, "You help.\n\nBe brief.");

        let silent = ModePreset { level_prompt: None, ..preset(Strategy::Ts) };
        let mut chat = vec![msg("user", "q")];
        apply_level_prompt(&mut chat, &silent);
        assert_eq!(chat, vec![msg("user", "q")]);
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
        assert_eq!(p.short.strategy, Strategy::Ts);
        assert_eq!(p.medium.stop_temperature, 1.0);
        assert_eq!(p.long.strategy, Strategy::None);
        p.check().unwrap();
        let bad: ModePresets = toml::from_str(&text.replace("stop_temperature = 4.0", "stop_temperature = 0.5")).unwrap();
        assert!(bad.check().unwrap_err().contains("modes.short.stop_temperature"));
        assert!(toml::from_str::<ModePresets>(&text.replace("\"ts\"", "\"fast\"")).is_err());
        ModePresets::default().check().unwrap();
    }
}
