//! SentencePiece vocabularies of GGUF files (`tokenizer.ggml.model = "llama"`:
//! Gemma, Llama 2, Mistral), which candle's GGUF tokenizer does not read.
//!
//! llama.cpp tokenizes them by SentencePiece's rule: spaces become `▁`, then
//! the adjacent pair whose joined piece has the highest score is merged,
//! again and again; a character no piece covers becomes its UTF-8 bytes
//! (`<0xNN>`). A byte-level-free BPE of the `tokenizers` crate does the same
//! when its merges are ranked by the joined piece's score: every way to write
//! a piece as two pieces is a merge, the highest scores first (ties by the
//! piece's id, then its halves'), as Hugging Face's own conversion of
//! SentencePiece models ranks them.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::{AddedToken, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn array<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a Vec<gguf_file::Value>> {
    content.metadata.get(key).with_context(|| format!("GGUF metadata lacks {key}"))?.to_vec().map_err(|e| anyhow!("{key}: {e}"))
}

/// The tokenizer of a GGUF with a SentencePiece vocabulary.
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
    let tokens: Vec<String> = array(content, "tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| anyhow!("tokenizer.ggml.tokens: {e}")))
        .collect::<Result<_>>()?;
    let scores: Vec<f32> = array(content, "tokenizer.ggml.scores")?.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect();
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map_err(|e| anyhow!("tokenizer.ggml.token_type: {e}"))?.iter().map(|t| t.to_i32().unwrap_or(NORMAL)).collect(),
        None => vec![NORMAL; tokens.len()],
    };
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        anyhow::bail!("GGUF tokenizer: {} tokens but {} scores and {} types", tokens.len(), scores.len(), types.len());
    }
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
    let merges = merges_by_score(&tokens, &scores, &types, &vocab);
    let unk = content.metadata.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok()).and_then(|id| tokens.get(id as usize));
    let vocab: Vocab = vocab.into_iter().collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| anyhow!("building the SentencePiece tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    // Spaces are `▁`; a leading one is added only where the file asks.
    let prefix = content.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    let replace = Replace::new(" ", "▁").map_err(|e| anyhow!("{e}"))?;
    if prefix {
        let prepend = tokenizers::normalizers::prepend::Prepend::new("▁".into());
        tokenizer.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![prepend.into(), replace.into()]))).map_err(|e| anyhow!("{e}"))?;
    } else {
        tokenizer.with_normalizer(Some(replace)).map_err(|e| anyhow!("{e}"))?;
    }
    let unspace = Replace::new("▁", " ").map_err(|e| anyhow!("{e}"))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![unspace.into(), ByteFallback::default().into(), Fuse::default().into()])));
    // Control and user-defined tokens are matched whole in text (templates
    // write `<start_of_turn>`); control ones are left out when decoding.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED || t == UNKNOWN)
        .map(|(text, &t)| AddedToken::from(text.clone(), t != USER_DEFINED))
        .collect();
    tokenizer.add_special_tokens(added).map_err(|e| anyhow!("{e}"))?;
    Ok(tokenizer)
}

/// Every (left, right) pair of pieces that joins into a normal piece, ranked
/// by that piece's score, highest first.
fn merges_by_score(tokens: &[String], scores: &[f32], types: &[i32], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !matches!(types[id], NORMAL | USER_DEFINED) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((scores[id], id as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    ranked.into_iter().map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone())).collect()
}
