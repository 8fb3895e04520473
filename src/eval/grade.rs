//! Answer extraction and grading for math problems (GSM8K, MATH-500).
//!
//! A completion's answer is, in order of trust: the last complete `\boxed{...}`
//! (braces balanced), the text after the last `####`, the text after the last
//! "final answer is" / "the answer is" / "answer:" phrase, else the last number.
//! Two answers match when both read as the same number (thousands commas,
//! trailing `.0`, units words, `%`, `$`, fractions), or else when their
//! normalised LaTeX is the same (`\dfrac` → `\frac`, `\left(` → `(`, `\text{}`
//! unwrapped, spaces and degree signs dropped).

use std::sync::LazyLock;

use regex::Regex;

/// Where an extracted answer came from (kept in the output rows for audits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Boxed,
    Hashes,
    Phrase,
    LastNumber,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Boxed => "boxed",
            Source::Hashes => "hashes",
            Source::Phrase => "phrase",
            Source::LastNumber => "last_number",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub answer: String,
    pub source: Source,
}

/// A number as written in prose: thousands commas, an optional fraction part,
/// or a simple `a/b` fraction.
const NUMBER: &str = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+";

static NUMBER_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(NUMBER).unwrap());
static PHRASE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:final\s+answer|answer)\b\s*(?:is\b\s*[:=]?|[:=])\s*").unwrap()
});
static WORD_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?:^|[^\\a-zA-Z])[a-zA-Z]{3,}").unwrap());

/// The answer a completion gives, or `None` when it gives none at all.
pub fn extract_answer(text: &str) -> Option<Extracted> {
    let found = |answer: String, source| {
        let answer = answer.trim().to_string();
        (!answer.is_empty()).then_some(Extracted { answer, source })
    };
    if let Some(b) = last_boxed(text) {
        if let Some(e) = found(b.to_string(), Source::Boxed) {
            return Some(e);
        }
    }
    if let Some(pos) = text.rfind("####") {
        let rest = text[pos + 4..].lines().next().unwrap_or("");
        if let Some(e) = found(clean_phrase(rest), Source::Hashes) {
            return Some(e);
        }
    }
    if let Some(m) = PHRASE_RE.find_iter(text).last() {
        if let Some(e) = found(clean_phrase(&text[m.end()..]), Source::Phrase) {
            return Some(e);
        }
    }
    let last = NUMBER_RE.find_iter(text).last()?;
    found(last.as_str().to_string(), Source::LastNumber)
}

/// The content of the last complete `\boxed{...}` or `\fbox{...}` (nested
/// braces allowed); `\boxed 5` without braces gives the next word. A box cut
/// off by the token limit is skipped in favour of an earlier complete one.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut starts: Vec<(usize, usize)> = ["\\boxed", "\\fbox"]
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(move |(i, _)| (i, i + cmd.len())))
        .collect();
    starts.sort_unstable();
    for &(_, after) in starts.iter().rev() {
        let rest = &text[after..];
        let body = rest.trim_start();
        if let Some(inner) = body.strip_prefix('{') {
            if let Some(end) = matching_brace(inner) {
                return Some(&inner[..end]);
            }
        } else if rest.starts_with(char::is_whitespace) {
            let word = body.split(|c: char| c.is_whitespace() || c == '$').next().unwrap_or("");
            if !word.is_empty() {
                return Some(word);
            }
        }
    }
    None
}

/// The byte offset of the `}` closing an already opened brace.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 1usize;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The answer in the text after an answer phrase: a `$...$` span if it opens
/// with one, else the rest of the sentence (after its last `=`); a sentence
/// with words in it ("Janet makes $18 a day") gives its first number.
fn clean_phrase(rest: &str) -> String {
    let line = rest.lines().next().unwrap_or("").trim().trim_matches('*').trim();
    for (open, close) in [("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if let Some(inner) = line.strip_prefix(open) {
            if let Some(end) = inner.find(close) {
                return inner[..end].to_string();
            }
        }
    }
    let sentence = end_of_sentence(line);
    // "56 + 2 = 58 points": the result is after the last `=`.
    let sentence = match sentence.rsplit_once('=') {
        Some((_, result)) if !result.trim().is_empty() => result,
        _ => sentence,
    };
    let sentence = sentence.trim().trim_end_matches(['.', ',', ';', '!']).trim();
    let unwrapped = unwrap_text_commands(sentence);
    if WORD_RE.is_match(&unwrapped) && number_value(sentence).is_none() {
        if let Some(m) = NUMBER_RE.find(sentence) {
            return m.as_str().to_string();
        }
    }
    sentence.to_string()
}

/// The text up to a full stop that ends a sentence (a `.` not followed by a digit).
fn end_of_sentence(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'.' && !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return &line[..i];
        }
    }
    line
}

/// Whether a candidate answer matches the reference answer.
pub fn answers_match(candidate: &str, reference: &str) -> bool {
    let (c, r) = (normalize(candidate), normalize(reference));
    match (number_value(&c), number_value(&r)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0),
        (None, None) => !c.is_empty() && squash(&c) == squash(&r),
        _ => false,
    }
}

static TEXT_CMD_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}").unwrap());
static FRAC_SHORT_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\\frac\s*(\d)\s*(\d)").unwrap());
static FRAC_NUM_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\\frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}").unwrap());
static SQRT_SHORT_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\\sqrt\s*([0-9a-zA-Z])").unwrap());
static SUBSCRIPT_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"_\{([^{}]*)\}").unwrap());
static ASSIGNMENT_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-zA-Z]\s*=\s*").unwrap());

fn unwrap_text_commands(s: &str) -> String {
    TEXT_CMD_RE.replace_all(s, " $1 ").into_owned()
}

/// Light LaTeX normalisation; spaces are kept (collapsed) so that units stay
/// separate words for [`number_value`].
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for (from, to) in [
        ("\\$", ""),
        ("$", ""),
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("~", " "),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("°", ""),
        ("\\%", ""),
        ("%", ""),
    ] {
        s = s.replace(from, to);
    }
    s = unwrap_text_commands(&s);
    s = FRAC_SHORT_RE.replace_all(&s, "\\frac{$1}{$2}").into_owned();
    s = FRAC_NUM_RE.replace_all(&s, "$1/$2").into_owned();
    s = SQRT_SHORT_RE.replace_all(&s, "\\sqrt{$1}").into_owned();
    s = SUBSCRIPT_RE.replace_all(&s, "_$1").into_owned();
    s = ASSIGNMENT_RE.replace(s.trim(), "").into_owned();
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.trim_end_matches('.').trim().to_string()
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

static PLAIN_NUMBER_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?(?:\s+[a-zA-Z]{2,}\.?(?:\s+[a-zA-Z]+\.?)*(?:\^\{?[23]\}?)?)?$")
        .unwrap()
});

/// The value of a normalised answer that is a number, a simple fraction or a
/// number followed by unit words ("18 dollars"); `None` for anything else.
pub fn number_value(s: &str) -> Option<f64> {
    let caps = PLAIN_NUMBER_RE.captures(s.trim())?;
    let value: f64 = caps[1].replace(',', "").parse().ok()?;
    match caps.get(2) {
        None => Some(value),
        Some(d) => {
            let d: f64 = d.as_str().parse().ok()?;
            (d != 0.0).then(|| value / d)
        }
    }
}

/// Extract and grade in one step: the extracted answer (if any) and whether it is right.
pub fn grade(completion: &str, reference: &str) -> (Option<Extracted>, bool) {
    let extracted = extract_answer(completion);
    let correct = extracted.as_ref().is_some_and(|e| answers_match(&e.answer, reference));
    (extracted, correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extracted(text: &str) -> Option<(String, Source)> {
        extract_answer(text).map(|e| (e.answer, e.source))
    }

    // ---- extraction ----

    #[test]
    fn boxed_with_nested_braces() {
        // math500-0's reference solution.
        let solution = "Therefore, the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$";
        assert_eq!(last_boxed(solution), Some("\\left( 3, \\frac{\\pi}{2} \\right)"));
        assert_eq!(
            extracted("so $\\boxed{\\frac{3\\sqrt{3}}{4}}$"),
            Some(("\\frac{3\\sqrt{3}}{4}".into(), Source::Boxed))
        );
    }

    #[test]
    fn the_last_complete_box_wins() {
        // math500's "15\frac{39}{40}, or \frac{639}{40}" solution boxes twice.
        let two = "$d = \\boxed{15\\frac{39}{40}},$ or $\\boxed{\\frac{639}{40}}$ inches.";
        assert_eq!(last_boxed(two), Some("\\frac{639}{40}"));
        // A box cut off by max_tokens is skipped.
        let cut = "first \\boxed{12} then \\boxed{\\frac{1}{";
        assert_eq!(last_boxed(cut), Some("12"));
        assert_eq!(last_boxed("\\boxed 5 is it"), Some("5"));
        assert_eq!(last_boxed("\\fbox{7}"), Some("7"));
        assert_eq!(last_boxed("no box here, 42"), None);
        assert_eq!(last_boxed("\\boxed{}"), Some(""));
    }

    #[test]
    fn gsm8k_hashes_and_phrases() {
        // gsm8k-0's reference solution, and its few-shot style answer.
        let reference = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18";
        assert_eq!(extracted(reference), Some(("18".into(), Source::Hashes)));
        let cot = "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day at the farmer’s market. So the answer is 18.";
        assert_eq!(extracted(cot), Some(("18".into(), Source::Phrase)));
        assert_eq!(extracted("The final answer is $24$. I hope it is correct."), Some(("24".into(), Source::Phrase)));
        assert_eq!(extracted("Final Answer: 3.5 hours"), Some(("3.5 hours".into(), Source::Phrase)));
        assert_eq!(extracted("**Answer:** 1,600"), Some(("1,600".into(), Source::Phrase)));
        assert_eq!(
            extracted("The answer is that Janet makes $18 per day."),
            Some(("18".into(), Source::Phrase))
        );
        assert_eq!(extracted("Final answer: 56 + 2 = 58 points."), Some(("58 points".into(), Source::Phrase)));
        assert_eq!(extracted("#### 9 * 2 = 18"), Some(("18".into(), Source::Hashes)));
        // An answer phrase with nothing after it falls back to the last number.
        assert_eq!(extracted("We get 7 and then 9. The answer is"), Some(("9".into(), Source::LastNumber)));
    }

    #[test]
    fn last_number_fallback() {
        assert_eq!(extracted("2 + 3 = 5, then 5 * 20 = 100"), Some(("100".into(), Source::LastNumber)));
        assert_eq!(extracted("It costs $114,200 in total"), Some(("114,200".into(), Source::LastNumber)));
        assert_eq!(extracted("a third, so 1/3"), Some(("1/3".into(), Source::LastNumber)));
        assert_eq!(extracted("the temperature drops to -4."), Some(("-4".into(), Source::LastNumber)));
        assert_eq!(extracted("I do not know."), None);
        assert_eq!(extracted(""), None);
    }

    // ---- matching, on references from the data sets ----

    #[test]
    fn gsm8k_numbers() {
        assert!(answers_match("18", "18"));
        assert!(answers_match("18.00", "18"));
        assert!(answers_match("$18", "18"));
        assert!(answers_match("\\$18", "18"));
        assert!(answers_match("18 dollars", "18"));
        assert!(answers_match("18 \\text{ dollars}", "18"));
        assert!(answers_match("2125", "2,125"));
        assert!(answers_match("2,125.0", "2,125"));
        assert!(answers_match("1450000", "1,450,000"));
        assert!(answers_match("25\\%", "25"));
        assert!(answers_match("25%", "25"));
        assert!(answers_match("x = 5", "5"));
    }

    #[test]
    fn gsm8k_must_not_match() {
        assert!(!answers_match("9", "18"));
        assert!(!answers_match("2.125", "2,125"));
        assert!(!answers_match("180", "18"));
        assert!(!answers_match("1.8", "18"));
        assert!(!answers_match("-18", "18"));
        assert!(!answers_match("18x", "18"));
        assert!(!answers_match("18 + 2", "18"));
        assert!(!answers_match("", "18"));
        // A boxed wrong answer is not rescued by a right number after it.
        let (e, correct) = grade("The answer is \\boxed{16}. Check: 9 * 2 = 18", "18");
        assert_eq!(e.unwrap().answer, "16");
        assert!(!correct);
    }

    #[test]
    fn math500_latex() {
        assert!(answers_match("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"));
        assert!(answers_match("\\dfrac{14}{3}", "\\frac{14}{3}"));
        assert!(answers_match("14/3", "\\frac{14}{3}"));
        assert!(answers_match("\\frac43", "\\frac{4}{3}"));
        assert!(answers_match("1.25", "\\frac{5}{4}"));
        assert!(answers_match("-\\frac{2}{3}", "\\frac{-2}{3}"));
        assert!(answers_match("Evelyn", "\\text{Evelyn}"));
        assert!(answers_match("90", "90^\\circ"));
        assert!(answers_match("90^{\\circ}", "90^\\circ"));
        assert!(answers_match("3 \\sqrt{13}", "3\\sqrt{13}"));
        assert!(answers_match("11\\sqrt{2}", "11\\sqrt2"));
        assert!(answers_match("6-5i", "6 - 5i"));
        assert!(answers_match("x=5", "x=5"));
        assert!(answers_match("5", "x=5"));
        assert!(answers_match("1, -2", "1,-2"));
        assert!(answers_match("4210_5", "4210_{5}"));
        assert!(answers_match("13,535", "13535"));
        assert!(answers_match(
            "\\begin{pmatrix}-1/3\\\\2/3\\\\5/3\\end{pmatrix}",
            "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"
        ));
    }

    #[test]
    fn math500_must_not_match() {
        assert!(!answers_match("(3, \\frac{\\pi}{3})", "\\left( 3, \\frac{\\pi}{2} \\right)"));
        assert!(!answers_match("\\frac{3}{14}", "\\frac{14}{3}"));
        assert!(!answers_match("4.67", "\\frac{14}{3}"));
        assert!(!answers_match("6", "6 - 5i"));
        assert!(!answers_match("6+5i", "6 - 5i"));
        assert!(!answers_match("1", "1,-2"));
        assert!(!answers_match("-2, 1", "1,-2"));
        assert!(!answers_match("\\sqrt{13}", "3\\sqrt{13}"));
        assert!(!answers_match("Eve", "\\text{Evelyn}"));
        assert!(!answers_match("x^3+3x+6", "x^3+3x-6"));
        assert!(!answers_match("\\pi", "-\\frac{\\pi}{6}"));
        assert!(!answers_match("4210", "4210_{5}"));
    }

    #[test]
    fn whole_completions_graded() {
        let completion = "The point (0,3) lies on the positive y-axis, so r = 3 and the angle is pi/2.\n\
                          Final answer: $\\boxed{(3,\\dfrac{\\pi}{2})}$";
        let (e, correct) = grade(completion, "\\left( 3, \\frac{\\pi}{2} \\right)");
        assert_eq!(e.unwrap().source, Source::Boxed);
        assert!(correct);
        let (_, correct) = grade("Janet makes 9 * 2 = 18 dollars.\n#### 18", "18");
        assert!(correct);
        let (e, correct) = grade("I cannot solve this.", "18");
        assert!(e.is_none() && !correct);
    }

    #[test]
    fn number_values() {
        assert_eq!(number_value("1,450,000"), Some(1_450_000.0));
        assert_eq!(number_value(".5"), Some(0.5));
        assert_eq!(number_value("-3/4"), Some(-0.75));
        assert_eq!(number_value("10 inches^2"), Some(10.0));
        assert_eq!(number_value("3/0"), None);
        assert_eq!(number_value("1,2"), None);
        assert_eq!(number_value("5 x"), None);
        assert_eq!(number_value("2 \\pi"), None);
    }
}
