//! Speculative decoding by prompt lookup: the tokens that followed the
//! latest earlier occurrence of the sequence's last few tokens are proposed
//! as its next ones, fed in one forward pass with its last token, and kept
//! as far as the model, sampling each position as it would have anyway,
//! agrees with them.
//!
//! A draft is a guess, never a distribution: each verified position is
//! sampled from its own logits, after every logit processor, with the same
//! sampler draws as plain decoding. So the output, greedy or sampled with a
//! seed, is the plain engine's token for token, and only the number of
//! forward passes changes.

/// What `--speculate` asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Speculation {
    /// Plain decoding, one token a step.
    #[default]
    Off,
    /// Prompt lookup (n-grams of the prompt and the output so far).
    Ngram,
}

impl std::str::FromStr for Speculation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Speculation::Off),
            "ngram" => Ok(Speculation::Ngram),
            other if other.starts_with("draft:") => {
                Err("`draft:MODEL` (a draft model) is not built yet; use `ngram` or `off`".into())
            }
            other => Err(format!("`{other}` is not a speculation mode: use `ngram` or `off`")),
        }
    }
}

/// Longest and shortest suffix looked up.
const MAX_NGRAM: usize = 4;
const MIN_NGRAM: usize = 2;
/// Most tokens proposed at once.
pub const MAX_DRAFT: usize = 8;

/// The tokens that followed the latest earlier occurrence of the longest
/// suffix of `tokens` (of `MAX_NGRAM` down to `MIN_NGRAM` tokens), at most
/// `len`; empty when no suffix occurs earlier.
pub fn propose(tokens: &[u32], len: usize) -> Vec<u32> {
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        // Latest first: recent text predicts best. The match must end
        // before the suffix starts, so that something follows it.
        let found = (0..tokens.len() - n).rev().find(|&at| &tokens[at..at + n] == suffix);
        if let Some(at) = found {
            let from = at + n;
            return tokens[from..(from + len).min(tokens.len())].to_vec();
        }
    }
    Vec::new()
}

/// One sequence's draft length, grown while drafts are kept whole and
/// shrunk when they are not, so a sequence whose text does not repeat stops
/// paying for rows it throws away.
#[derive(Debug, Clone)]
pub struct DraftLength {
    len: usize,
}

impl Default for DraftLength {
    fn default() -> Self {
        DraftLength { len: 4 }
    }
}

impl DraftLength {
    pub fn get(&self) -> usize {
        self.len
    }

    /// `accepted` of `proposed` drafted tokens were kept.
    pub fn update(&mut self, proposed: usize, accepted: usize) {
        self.len = if accepted == proposed { (self.len + 2).min(MAX_DRAFT) } else { (accepted + 1).clamp(1, MAX_DRAFT) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_longest_match_proposes_what_followed_it() {
        // "1 2 3 4 9 ... 1 2 3" → 4 9 (the 3-gram's latest match).
        let tokens = [1, 2, 3, 4, 9, 7, 1, 2, 3];
        assert_eq!(propose(&tokens, 2), vec![4, 9]);
        assert_eq!(propose(&tokens, 8), vec![4, 9, 7, 1, 2, 3]);
        // The latest of two matches wins.
        assert_eq!(propose(&[5, 6, 1, 5, 6, 2, 5, 6], 1), vec![2]);
        // A longer suffix beats a later shorter one.
        assert_eq!(propose(&[7, 5, 6, 1, 9, 5, 6, 2, 7, 5, 6], 1), vec![1]);
        // Nothing repeats: no draft; a lone token is no suffix.
        assert!(propose(&[1, 2, 3, 4], 4).is_empty());
        assert!(propose(&[1, 1], 4).is_empty());
        assert_eq!(propose(&[1, 2, 1, 2], 4), vec![1, 2]);
        assert!(propose(&[], 4).is_empty());
    }

    #[test]
    fn the_draft_grows_while_kept_whole_and_shrinks_to_what_was_kept() {
        let mut d = DraftLength::default();
        d.update(4, 4);
        assert_eq!(d.get(), 6);
        d.update(6, 6);
        d.update(8, 8);
        assert_eq!(d.get(), MAX_DRAFT);
        d.update(8, 2);
        assert_eq!(d.get(), 3);
        d.update(3, 0);
        assert_eq!(d.get(), 1);
    }

    #[test]
    fn modes_parse_and_a_draft_model_is_refused_by_name() {
        assert_eq!("ngram".parse::<Speculation>(), Ok(Speculation::Ngram));
        assert_eq!("off".parse::<Speculation>(), Ok(Speculation::Off));
        assert!("draft:qwen2.5-0.5b".parse::<Speculation>().unwrap_err().contains("not built yet"));
        assert!("fast".parse::<Speculation>().is_err());
    }
}
