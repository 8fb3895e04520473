//! Attention of a whole step over the pooled KV cache (`kv_pages`), on tensors.
//!
//! What a step needs besides its activations (pool rows, rotary rows, gather
//! lists and masks) is built once on the host and uploaded once (`PagedStep`),
//! then every layer runs the same few kernels:
//! - rotate all the step's queries and keys at once (each row at its own
//!   position), and write the keys and values into the pool: one scatter for
//!   the single new positions, one copy per page for a prefill chunk's;
//! - the sequences that decode one token: gather their cached positions
//!   (padded to the longest, the padding masked), and attend in batched
//!   matrix products, one kernel each for the whole batch;
//! - the sequences that prefill a chunk: gather their positions, and attend
//!   causally, one sequence at a time.
//!
//! Padding moves the sum orders of the softmax and the products a little, so
//! unlike the CPU's f32 path this one is not bit-identical alone and batched
//! (cuBLAS picks its kernels by shape anyway).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::config::TransformerConfig;
use super::kv_pages::KvPool;
use super::transformer::SeqChunk;

/// Pool rows to read: one run of consecutive rows (a view of the pool), or
/// a list (a gather).
enum Rows {
    Run { first: usize, count: usize },
    Listed(Tensor),
}

impl Rows {
    fn new(rows: &[u32], device: &Device) -> Result<Rows> {
        let first = rows.first().copied().unwrap_or(0);
        if rows.iter().enumerate().all(|(i, &r)| r == first + i as u32) {
            Ok(Rows::Run { first: first as usize, count: rows.len() })
        } else {
            Ok(Rows::Listed(Tensor::new(rows, device)?))
        }
    }

    /// These rows of `pool` ((rows, width) -> (count, width)).
    fn of(&self, pool: &Tensor) -> Result<Tensor> {
        match self {
            Rows::Run { first, count } => pool.narrow(0, *first, *count),
            Rows::Listed(rows) => pool.index_select(rows, 0),
        }
    }
}

/// A step's plan, the same for every layer.
pub struct PagedStep {
    pool: Arc<KvPool>,
    /// (tokens, 1, head_dim / 2): each token's rotary row; the queries'
    /// are scaled by 1/√head_dim, which spares the scores a kernel.
    cos: Tensor,
    sin: Tensor,
    cos_q: Tensor,
    sin_q: Tensor,
    decode: Option<DecodeGroup>,
    prefills: Vec<Prefill>,
    /// Step rows in the order of [decode group, prefills...], to put the
    /// outputs back in step order; `None` when they already are.
    order: Option<Tensor>,
}

/// The sequences of the step that decode one token each.
struct DecodeGroup {
    count: usize,
    /// The longest one's positions, new one included.
    span: usize,
    /// (count, width) u32: each new position's pool row, repeated along the
    /// row, for `scatter_set`.
    write_rows: Tensor,
    /// (count × span) pool rows; a shorter sequence's padding repeats its first row.
    gather: Rows,
    /// (count, 1, span): 0 on a sequence's positions, -inf on its padding;
    /// `None` when no sequence is padded.
    mask: Option<Tensor>,
    /// Their rows among the step's rows; `None` when they are all of them.
    rows: Option<Tensor>,
}

/// A sequence of the step that runs a chunk of several tokens.
struct Prefill {
    /// Its first row among the step's rows, and its token count.
    row: usize,
    len: usize,
    /// Position of its first new token.
    start: usize,
    /// Pool rows of positions 0..start + len.
    gather: Rows,
    /// Where its new rows go: (first step row, count, first pool row), one
    /// run per page it touches.
    runs: Vec<(usize, usize, usize)>,
}

impl Prefill {
    /// A chunk of `len` tokens at step row `row` and positions `start..`;
    /// `gather` holds the pool rows of positions 0..start + len.
    fn new(row: usize, start: usize, len: usize, gather: &[u32], device: &Device) -> Result<Prefill> {
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for p in start..start + len {
            match runs.last_mut() {
                Some((_, n, first)) if *first + *n == gather[p] as usize => *n += 1,
                _ => runs.push((row + p - start, 1, gather[p] as usize)),
            }
        }
        Ok(Prefill { row, len, start, gather: Rows::new(gather, device)?, runs })
    }
}

impl PagedStep {
    /// Reserve the pages the step's new positions need, and build its plan.
    pub fn new(pool: &Arc<KvPool>, chunks: &mut [SeqChunk<'_>], cfg: &TransformerConfig, cos: &Tensor, sin: &Tensor, dtype: DType, device: &Device) -> Result<PagedStep> {
        let (width, head_dim) = (cfg.n_kv_head * cfg.head_dim, cfg.head_dim);
        let mut positions = Vec::new();
        let (mut decode_seqs, mut prefills) = (Vec::new(), Vec::new());
        let mut row = 0;
        for chunk in chunks.iter_mut() {
            let (start, len) = (chunk.cache.len(), chunk.tokens.len());
            if start + len > cfg.context_length {
                candle_core::bail!("positions up to {} are past the context of {}", start + len, cfg.context_length);
            }
            let pages = match chunk.cache.pages_mut() {
                Some(pages) if Arc::ptr_eq(pages.pool(), pool) => pages,
                _ => candle_core::bail!("a sequence's KV cache is not in the model's pool: make caches with `Transformer::new_cache`"),
            };
            pages.reserve(start + len)?;
            positions.extend((start..start + len).map(|p| p as u32));
            let gather: Vec<u32> = (0..start + len).map(|p| pages.row(p)).collect();
            if len == 1 {
                decode_seqs.push((row, gather));
            } else {
                prefills.push(Prefill::new(row, start, len, &gather, device)?);
            }
            row += len;
        }
        let tokens = row;
        let positions = Tensor::new(positions.as_slice(), device)?;
        let rotary = |table: &Tensor| table.index_select(&positions, 0)?.reshape((tokens, 1, head_dim / 2));
        let (cos, sin) = (rotary(cos)?, rotary(sin)?);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let (cos_q, sin_q) = ((&cos * scale)?, (&sin * scale)?);

        let decode = if decode_seqs.is_empty() { None } else { Some(DecodeGroup::new(&decode_seqs, tokens, width, dtype, device)?) };
        // Step rows in output order: the decode group's, then each prefill's.
        let order: Vec<u32> = decode_seqs.iter().map(|(r, _)| *r as u32).chain(prefills.iter().flat_map(|p| p.row as u32..(p.row + p.len) as u32)).collect();
        let in_order = order.iter().enumerate().all(|(i, &r)| i == r as usize);
        let order = if in_order {
            None
        } else {
            // Its inverse puts the outputs back in step order.
            let mut inverse = vec![0u32; tokens];
            for (i, &r) in order.iter().enumerate() {
                inverse[r as usize] = i as u32;
            }
            Some(Tensor::new(inverse.as_slice(), device)?)
        };
        Ok(PagedStep { pool: pool.clone(), cos, sin, cos_q, sin_q, decode, prefills, order })
    }

    /// One layer's attention: `q`, `k`, `v` are (tokens, heads × head_dim)
    /// before rotation; returns (tokens, q_heads × head_dim).
    pub fn attend(&self, layer: usize, cfg: &TransformerConfig, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let tokens = q.dim(0)?;
        let rotate = |x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor| -> Result<Tensor> {
            let x = x.contiguous()?.reshape((tokens, heads, 1, hd))?;
            let y = if cfg.rope_halves { candle_nn::rotary_emb::rope(&x, cos, sin)? } else { candle_nn::rotary_emb::rope_i(&x, cos, sin)? };
            y.reshape((tokens, heads * hd))
        };
        let q = rotate(q, nh, &self.cos_q, &self.sin_q)?; // scaled
        let (k, v) = (rotate(k, nkv, &self.cos, &self.sin)?, v.contiguous()?);
        let pool = &self.pool;
        if let Some(group) = &self.decode {
            match &group.rows {
                Some(rows) => pool.scatter(layer, &group.write_rows, &k.index_select(rows, 0)?, &v.index_select(rows, 0)?)?,
                None => pool.scatter(layer, &group.write_rows, &k, &v)?,
            }
        }
        for p in &self.prefills {
            for &(row, n, first) in &p.runs {
                pool.write_run(layer, first, &k.narrow(0, row, n)?, &v.narrow(0, row, n)?)?;
            }
        }
        let (keys, values) = pool.layer(layer);

        let mut outputs = Vec::with_capacity(1 + self.prefills.len());
        if let Some(group) = &self.decode {
            let q = match &group.rows {
                Some(rows) => q.index_select(rows, 0)?,
                None => q.clone(),
            };
            outputs.push(group.attend(&q, &keys, &values, cfg)?);
        }
        for p in &self.prefills {
            let q = q.narrow(0, p.row, p.len)?.reshape((p.len, nh, hd))?.transpose(0, 1)?.contiguous()?;
            let by_head = |pool: &Tensor| p.gather.of(pool)?.reshape((p.start + p.len, nkv, hd))?.transpose(0, 1)?.contiguous();
            outputs.push(attend_causal(&q, &by_head(&keys)?, &by_head(&values)?, p.start, nkv, 1.0)?);
        }
        let y = if outputs.len() == 1 { outputs.pop().expect("one output") } else { Tensor::cat(&outputs, 0)? };
        match &self.order {
            Some(order) => y.index_select(order, 0),
            None => Ok(y),
        }
    }
}

impl DecodeGroup {
    /// `seqs`: each decoding sequence's step row and the pool rows of all
    /// its positions, the new one last.
    fn new(seqs: &[(usize, Vec<u32>)], tokens: usize, width: usize, dtype: DType, device: &Device) -> Result<DecodeGroup> {
        let count = seqs.len();
        let span = seqs.iter().map(|(_, g)| g.len()).max().unwrap_or(1);
        let (mut gather, mut mask, mut write_rows) = (Vec::with_capacity(count * span), Vec::with_capacity(count * span), Vec::with_capacity(count * width));
        for (_, g) in seqs {
            gather.extend_from_slice(g);
            gather.extend(std::iter::repeat_n(g[0], span - g.len()));
            mask.extend(std::iter::repeat_n(0f32, g.len()));
            mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, span - g.len()));
            write_rows.extend(std::iter::repeat_n(g[g.len() - 1], width));
        }
        let padded = seqs.iter().any(|(_, g)| g.len() < span);
        let rows: Vec<u32> = seqs.iter().map(|(r, _)| *r as u32).collect();
        Ok(DecodeGroup {
            count,
            span,
            write_rows: Tensor::from_vec(write_rows, (count, width), device)?,
            gather: Rows::new(&gather, device)?,
            mask: if padded { Some(Tensor::from_vec(mask, (count, 1, span), device)?.to_dtype(dtype)?) } else { None },
            rows: if count == tokens { None } else { Some(Tensor::new(rows.as_slice(), device)?) },
        })
    }

    /// `q` (count, q_heads × head_dim), rotated and scaled, against the group's gathered
    /// positions: every (sequence, KV head) pair is one entry of a batched
    /// product whose rows are the query heads sharing that KV head.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, cfg: &TransformerConfig) -> Result<Tensor> {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let (count, span, group) = (self.count, self.span, nh / nkv);
        let q = q.reshape((count * nkv, group, hd))?;
        // (count × span, kv_heads × hd) -> (count × kv_heads, span, hd)
        let by_head = |pool: &Tensor| self.gather.of(pool)?.reshape((count, span, nkv, hd))?.transpose(1, 2)?.contiguous()?.reshape((count * nkv, span, hd));
        let (keys, values) = (by_head(keys)?, by_head(values)?);
        let scores = q.matmul(&keys.t()?)?; // (count·nkv, group, span); `q` came scaled
        let scores = match &self.mask {
            Some(mask) => scores.reshape((count, nkv * group, span))?.broadcast_add(mask)?.reshape((count * nkv, group, span))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&values)?.reshape((count, nh * hd)) // (count·nkv, group, hd), heads in order
    }
}

/// Dot-product attention of one sequence's new queries (heads, len, hd),
/// scaled by `scale` (1 when they come scaled), over its keys and values
/// (kv_heads, total, hd), causal; returns (len, heads × hd).
pub fn attend_causal(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize, kv_heads: usize, scale: f64) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let group = nh / kv_heads;
    let total = start + len;
    // Grouped-query attention without copying keys: the `group` query heads that
    // share one KV head are stacked along the row axis.
    let q = q.reshape((kv_heads, group * len, hd))?;
    let scores = q.matmul(&keys.t()?)?; // (kv_heads, group*len, total)
    let scores = if scale == 1.0 { scores } else { (scores * scale)? };
    let scores = if len > 1 {
        let mask = causal_mask(len, start, q.device())?.to_dtype(q.dtype())?; // (len, total)
        scores.reshape((kv_heads, group, len, total))?.broadcast_add(&mask)?.reshape((kv_heads, group * len, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&values.contiguous()?)?; // (kv_heads, group*len, hd)
    out.reshape((nh, len, hd))?.transpose(0, 1)?.reshape((len, nh * hd))
}

/// 0 where query `i` (at position start + i) may see key `j`, -inf after it.
fn causal_mask(len: usize, start: usize, device: &Device) -> Result<Tensor> {
    let total = start + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (len, total), device)
}
