//! Stop strings: end generation before the first match, never emit any of it.

/// Holds back text that might be the start of a stop string until it is known
/// not to be one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

pub enum StopOutcome {
    /// Text that is safe to emit (may be empty).
    Continue(String),
    /// A stop string was found: emit this text, then finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher { stops, held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_string());
        }
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(out);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let emit_len = self.held.len() - keep;
        let out = self.held[..emit_len].to_string();
        self.held.drain(..emit_len);
        StopOutcome::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`,
/// cut at a character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out += &t,
                StopOutcome::Stopped(t) => return (out + &t, true),
            }
        }
        (out + &m.flush(), false)
    }

    #[test]
    fn stops_across_pieces() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".to_string(), true));
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["END"], &["E", "N", "x"]), ("ENx".to_string(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".to_string(), true));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".to_string(), false));
    }
}
