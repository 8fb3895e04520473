//! Attention of a whole step over the pooled KV cache (`kv_pages`), on tensors.
//!
//! What a step needs besides its activations (pool rows, rotary rows, gather
//! lists and masks) is built once on the host and uploaded once (`PagedStep`),
//! then every layer runs the same few kernels:
//! - rotate all the step's queries and keys at once (each row at its own
//!   position), and write the keys and values into the pool: one scatter for
//!   the single new positions, one copy per run of consecutive pages for a
//!   prefill chunk's;
//! - the sequences that decode one token: gather their cached positions
//!   (padded to the longest, the padding masked), and attend in batched
//!   matrix products, one kernel each for the whole group. Sequences less
//!   than half as long as the longest form groups of their own, so that a
//!   long one does not make every short one pay for its length;
//! - the sequences that prefill a chunk: gather their positions, and attend
//!   causally, one sequence at a time.
//!
//! Padding moves the sum orders of the softmax and the products a little, so
//! unlike the CPU's f32 path this one is not bit-identical alone and batched
//! (cuBLAS picks its kernels by shape anyway).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::config::TransformerConfig;
use super::decode_graph::{DecodingRow, GraphBuckets, StaticDecodeInputs};
use super::kv_pages::{KvPool, SeqPages};
use super::kv_cache::SeqChunk;

/// Pool rows to read: one run of consecutive rows (a view of the pool), or
/// a list (a gather).
enum PoolRows {
    Run { first: usize, count: usize },
    Listed(Tensor),
}

impl PoolRows {
    fn new(rows: &[u32], device: &Device) -> Result<PoolRows> {
        let first = rows.first().copied().unwrap_or(0);
        if rows.iter().enumerate().all(|(i, &r)| r == first + i as u32) {
            Ok(PoolRows::Run { first: first as usize, count: rows.len() })
        } else {
            Ok(PoolRows::Listed(Tensor::new(rows, device)?))
        }
    }

    /// These rows of `pool` ((rows, width) -> (count, width)).
    fn of(&self, pool: &Tensor) -> Result<Tensor> {
        match self {
            PoolRows::Run { first, count } => pool.narrow(0, *first, *count),
            PoolRows::Listed(rows) => pool.index_select(rows, 0),
        }
    }
}

/// A step's plan, the same for every layer of one kind (window and rope table).
pub struct PagedStep {
    pool: Arc<KvPool>,
    /// (tokens, 1, rotary_dim / 2): each token's rotary row; the queries'
    /// are scaled by 1/√head_dim, which spares the scores a kernel.
    cos: Tensor,
    sin: Tensor,
    cos_q: Tensor,
    sin_q: Tensor,
    decode: Vec<DecodeGroup>,
    prefills: Vec<Prefill>,
    /// For each step row, its row among the outputs (the decode groups'
    /// rows, then each prefill's), to put them back in step order; `None`
    /// when they are in step order already.
    restore: Option<Tensor>,
}

/// Sequences of the step that decode one token each, attended together.
struct DecodeGroup {
    count: usize,
    /// The longest one's positions, new one included.
    span: usize,
    /// (count, width) u32: each new position's pool row, repeated along the
    /// row, for `scatter_set`.
    write_rows: Tensor,
    /// (count × span) pool rows; a shorter sequence's padding repeats its first row.
    pool_rows: PoolRows,
    /// (count, 1, span): 0 on a sequence's positions, -inf on its padding;
    /// `None` when no sequence is padded.
    mask: Option<Tensor>,
    /// Their rows among the step's rows; `None` when they are all of them, in order.
    step_rows: Option<Tensor>,
}

/// A sequence of the step that runs a chunk of several tokens.
struct Prefill {
    /// Its first row among the step's rows, and its token count.
    first_step_row: usize,
    len: usize,
    /// Position of its first new token.
    start: usize,
    /// The attention window of its queries, if any.
    window: Option<usize>,
    /// Pool rows of positions 0..start + len.
    pool_rows: PoolRows,
    /// Where its new rows go, one run per stretch of consecutive pool rows.
    runs: Vec<Run>,
}

/// `count` step rows from `step_row` on, written at pool rows from `pool_row` on.
struct Run {
    step_row: usize,
    count: usize,
    pool_row: usize,
}

/// A decoding sequence while the plan is built: its step row and the pool
/// rows of all its positions, the new one last.
type Decoding = (usize, Vec<u32>);

impl PagedStep {
    /// Reserve the pages the step's new positions need, and build its plan:
    /// rotation by the tables `cos` and `sin`, and each query attending to
    /// the last `window` positions (itself included), or to all.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: &Arc<KvPool>,
        chunks: &mut [SeqChunk<'_>],
        cfg: &TransformerConfig,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<PagedStep> {
        let (width, head_dim, rotary_dim) = (cfg.n_kv_head * cfg.head_dim, cfg.head_dim, cfg.rotary_dim);
        let mut positions = Vec::new();
        let (mut decoding, mut prefills): (Vec<Decoding>, Vec<Prefill>) = (Vec::new(), Vec::new());
        let mut step_row = 0;
        for chunk in chunks.iter_mut() {
            let (start, len) = (chunk.cache.len(), chunk.tokens.len());
            let pages = reserved_pages(pool, chunk, cfg)?;
            positions.extend((start..start + len).map(|p| p as u32));
            if len == 1 {
                // Only the positions the window lets the query see.
                let first = window.map_or(0, |w| (start + 1).saturating_sub(w));
                decoding.push((step_row, (first..start + 1).map(|p| pages.row(p)).collect()));
            } else {
                let pool_rows: Vec<u32> = (0..start + len).map(|p| pages.row(p)).collect();
                prefills.push(Prefill::new(step_row, start, len, &pool_rows, window, device)?);
            }
            step_row += len;
        }
        let (cos, sin, cos_q, sin_q) = rotary_rows(cos, sin, &positions, head_dim, rotary_dim, device)?;
        let groups = group_by_span(decoding);
        let in_step_order = groups.len() == 1 && prefills.is_empty();
        let decode = groups.iter().map(|g| DecodeGroup::new(g, in_step_order, width, dtype, device)).collect::<Result<Vec<_>>>()?;
        let output_order: Vec<usize> = groups
            .iter()
            .flat_map(|g| g.iter().map(|(r, _)| *r))
            .chain(prefills.iter().flat_map(|p| p.first_step_row..p.first_step_row + p.len))
            .collect();
        let restore = inverse_permutation(&output_order).map(|inverse| Tensor::new(inverse.as_slice(), device)).transpose()?;
        Ok(PagedStep { pool: pool.clone(), cos, sin, cos_q, sin_q, decode, prefills, restore })
    }

    /// The plan of a decode step (every chunk one token) at a fixed shape:
    /// `batch` rows, each attending a span of `buckets`' (`decode_graph`),
    /// padding rows writing and reading `scratch`'s one row. The outputs'
    /// first rows are the chunks', in order.
    #[allow(clippy::too_many_arguments)]
    pub fn padded(
        pool: &Arc<KvPool>,
        chunks: &mut [SeqChunk<'_>],
        cfg: &TransformerConfig,
        cos: &Tensor,
        sin: &Tensor,
        window: Option<usize>,
        shape: (&GraphBuckets, usize),
        scratch: &SeqPages,
        dtype: DType,
        device: &Device,
    ) -> Result<PagedStep> {
        let (buckets, batch) = shape;
        let mut seen: Vec<(u32, Vec<u32>)> = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter_mut() {
            if chunk.tokens.len() != 1 {
                candle_core::bail!("a fixed-shape step decodes one token a sequence");
            }
            let start = chunk.cache.len();
            let pages = reserved_pages(pool, chunk, cfg)?;
            let first = window.map_or(0, |w| (start + 1).saturating_sub(w));
            seen.push((start as u32, (first..start + 1).map(|p| pages.row(p)).collect()));
        }
        let span = buckets.span_for(seen.iter().map(|(_, rows)| rows.len()).max().unwrap_or(1));
        let rows: Vec<DecodingRow<'_>> = seen.iter().map(|(position, rows)| DecodingRow { token: 0, position: *position, pool_rows: rows }).collect();
        let inputs = StaticDecodeInputs::layout(&rows, batch, span, scratch.row(0));
        let (cos, sin, cos_q, sin_q) = rotary_rows(cos, sin, &inputs.positions, cfg.head_dim, cfg.rotary_dim, device)?;
        let width = cfg.n_kv_head * cfg.head_dim;
        let write_rows: Vec<u32> = inputs.write_rows.iter().flat_map(|&r| std::iter::repeat_n(r, width)).collect();
        let group = DecodeGroup {
            count: batch,
            span,
            write_rows: Tensor::from_vec(write_rows, (batch, width), device)?,
            // Always a gather: a graph's step reads its rows from a buffer.
            pool_rows: PoolRows::Listed(Tensor::new(inputs.pool_rows.as_slice(), device)?),
            mask: Some(Tensor::from_vec(inputs.mask, (batch, 1, span), device)?.to_dtype(dtype)?),
            step_rows: None,
        };
        Ok(PagedStep { pool: pool.clone(), cos, sin, cos_q, sin_q, decode: vec![group], prefills: Vec::new(), restore: None })
    }

    /// One layer's attention: `q`, `k`, `v` are (tokens, heads × head_dim)
    /// before rotation; returns (tokens, q_heads × head_dim).
    pub fn attend(&self, layer: usize, cfg: &TransformerConfig, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let tokens = q.dim(0)?;
        let rot = cfg.rotary_dim;
        // `scale` is what the tables carry beyond the rotation (the queries'
        // 1/√head_dim), for the values that do not turn.
        let rotate = |x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor, scale: f64| -> Result<Tensor> {
            let x = x.contiguous()?.reshape((tokens, heads, 1, hd))?;
            let turn = |x: &Tensor| if cfg.rope_halves { candle_nn::rotary_emb::rope(x, cos, sin) } else { candle_nn::rotary_emb::rope_i(x, cos, sin) };
            let y = if rot == hd {
                turn(&x)?
            } else {
                // Only the first `rot` values of each head turn (Phi-3's family).
                let pass = x.narrow(3, rot, hd - rot)?;
                let pass = if scale == 1.0 { pass } else { (pass * scale)? };
                Tensor::cat(&[&turn(&x.narrow(3, 0, rot)?.contiguous()?)?, &pass], 3)?
            };
            y.reshape((tokens, heads * hd))
        };
        let q = rotate(q, nh, &self.cos_q, &self.sin_q, 1.0 / (hd as f64).sqrt())?; // scaled
        let (k, v) = (rotate(k, nkv, &self.cos, &self.sin, 1.0)?, v.contiguous()?);
        self.write(layer, &k, &v)?;
        let (keys, values) = self.pool.layer(layer);

        let mut outputs = Vec::with_capacity(self.decode.len() + self.prefills.len());
        for group in &self.decode {
            let q = match &group.step_rows {
                Some(rows) => q.index_select(rows, 0)?,
                None => q.clone(),
            };
            outputs.push(group.attend(&q, &keys, &values, cfg)?);
        }
        for p in &self.prefills {
            let q = q.narrow(0, p.first_step_row, p.len)?.reshape((p.len, nh, hd))?.transpose(0, 1)?.contiguous()?;
            let by_head = |pool: &Tensor| p.pool_rows.of(pool)?.reshape((p.start + p.len, nkv, hd))?.transpose(0, 1)?.contiguous();
            outputs.push(attend_causal(&q, &by_head(&keys)?, &by_head(&values)?, p.start, p.window, nkv, None)?);
        }
        let y = if outputs.len() == 1 { outputs.pop().expect("one output") } else { Tensor::cat(&outputs, 0)? };
        match &self.restore {
            Some(restore) => y.index_select(restore, 0),
            None => Ok(y),
        }
    }

    /// The step's rotated keys and its values ((tokens, width)) into the pool.
    fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        for group in &self.decode {
            match &group.step_rows {
                Some(rows) => self.pool.scatter(layer, &group.write_rows, &k.index_select(rows, 0)?, &v.index_select(rows, 0)?)?,
                None => self.pool.scatter(layer, &group.write_rows, k, v)?,
            }
        }
        for run in self.prefills.iter().flat_map(|p| &p.runs) {
            self.pool.write_run(layer, run.pool_row, &k.narrow(0, run.step_row, run.count)?, &v.narrow(0, run.step_row, run.count)?)?;
        }
        Ok(())
    }
}

/// A chunk's pages, with room reserved for its new positions.
fn reserved_pages<'c>(pool: &Arc<KvPool>, chunk: &'c mut SeqChunk<'_>, cfg: &TransformerConfig) -> Result<&'c mut SeqPages> {
    let end = chunk.cache.len() + chunk.tokens.len();
    if end > cfg.context_length {
        candle_core::bail!("positions up to {end} are past the context of {}", cfg.context_length);
    }
    let pages = match chunk.cache.pages_mut() {
        Some(pages) if Arc::ptr_eq(pages.pool(), pool) => pages,
        _ => candle_core::bail!("a sequence's KV cache is not in the model's pool: make caches with `Transformer::new_cache`"),
    };
    pages.reserve(end)?;
    Ok(pages)
}

/// The rotary rows of `positions` from the tables `cos` and `sin`, as
/// (tokens, 1, rotary_dim / 2), and the queries' (scaled by 1/√head_dim).
fn rotary_rows(cos: &Tensor, sin: &Tensor, positions: &[u32], head_dim: usize, rotary_dim: usize, device: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let tokens = positions.len();
    let positions = Tensor::new(positions, device)?;
    let rotary = |table: &Tensor| table.index_select(&positions, 0)?.reshape((tokens, 1, rotary_dim / 2));
    let (cos, sin) = (rotary(cos)?, rotary(sin)?);
    let scale = 1.0 / (head_dim as f64).sqrt();
    let (cos_q, sin_q) = ((&cos * scale)?, (&sin * scale)?);
    Ok((cos, sin, cos_q, sin_q))
}

/// Decoding sequences in groups of like length: longest first, a new group
/// wherever a sequence is less than half as long as its group's first, so
/// padding at most doubles what a group reads. One group, in step order,
/// when the lengths allow.
fn group_by_span(mut decoding: Vec<Decoding>) -> Vec<Vec<Decoding>> {
    let longest = decoding.iter().map(|(_, rows)| rows.len()).max().unwrap_or(0);
    if decoding.iter().all(|(_, rows)| 2 * rows.len() >= longest) {
        return if decoding.is_empty() { Vec::new() } else { vec![decoding] };
    }
    decoding.sort_by_key(|(_, rows)| std::cmp::Reverse(rows.len()));
    let mut groups: Vec<Vec<Decoding>> = Vec::new();
    for seq in decoding {
        match groups.last_mut() {
            Some(group) if 2 * seq.1.len() >= group[0].1.len() => group.push(seq),
            _ => groups.push(vec![seq]),
        }
    }
    groups
}

/// For `order` (a permutation of 0..n: the step row of each output row), each
/// step row's output row; `None` when `order` is the identity.
fn inverse_permutation(order: &[usize]) -> Option<Vec<u32>> {
    if order.iter().enumerate().all(|(i, &r)| i == r) {
        return None;
    }
    let mut inverse = vec![0u32; order.len()];
    for (i, &r) in order.iter().enumerate() {
        inverse[r] = i as u32;
    }
    Some(inverse)
}

impl Prefill {
    /// A chunk of `len` tokens at step row `first_step_row` and positions
    /// `start..`; `pool_rows` holds the pool rows of positions 0..start + len.
    fn new(first_step_row: usize, start: usize, len: usize, pool_rows: &[u32], window: Option<usize>, device: &Device) -> Result<Prefill> {
        let mut runs: Vec<Run> = Vec::new();
        for p in start..start + len {
            let pool_row = pool_rows[p] as usize;
            match runs.last_mut() {
                Some(run) if run.pool_row + run.count == pool_row => run.count += 1,
                _ => runs.push(Run { step_row: first_step_row + p - start, count: 1, pool_row }),
            }
        }
        Ok(Prefill { first_step_row, len, start, window, pool_rows: PoolRows::new(pool_rows, device)?, runs })
    }
}

impl DecodeGroup {
    /// `seqs` in the order they are attended; `in_step_order` when they are
    /// the step's only rows, in its order.
    fn new(seqs: &[Decoding], in_step_order: bool, width: usize, dtype: DType, device: &Device) -> Result<DecodeGroup> {
        let count = seqs.len();
        let span = seqs.iter().map(|(_, g)| g.len()).max().unwrap_or(1);
        let (mut pool_rows, mut mask, mut write_rows) = (Vec::with_capacity(count * span), Vec::with_capacity(count * span), Vec::with_capacity(count * width));
        for (_, g) in seqs {
            pool_rows.extend_from_slice(g);
            pool_rows.extend(std::iter::repeat_n(g[0], span - g.len()));
            mask.extend(std::iter::repeat_n(0f32, g.len()));
            mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, span - g.len()));
            write_rows.extend(std::iter::repeat_n(g[g.len() - 1], width));
        }
        let padded = seqs.iter().any(|(_, g)| g.len() < span);
        let step_rows: Vec<u32> = seqs.iter().map(|(r, _)| *r as u32).collect();
        Ok(DecodeGroup {
            count,
            span,
            write_rows: Tensor::from_vec(write_rows, (count, width), device)?,
            pool_rows: PoolRows::new(&pool_rows, device)?,
            mask: if padded { Some(Tensor::from_vec(mask, (count, 1, span), device)?.to_dtype(dtype)?) } else { None },
            step_rows: if in_step_order { None } else { Some(Tensor::new(step_rows.as_slice(), device)?) },
        })
    }

    /// `q` (count, q_heads × head_dim), rotated and scaled, against the
    /// group's gathered positions: every (sequence, KV head) pair is one
    /// entry of a batched product whose rows are the query heads sharing
    /// that KV head.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, cfg: &TransformerConfig) -> Result<Tensor> {
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_head, cfg.n_kv_head);
        let (count, span, group) = (self.count, self.span, nh / nkv);
        let q = q.reshape((count * nkv, group, hd))?;
        // (count × span, kv_heads × hd) -> (count × kv_heads, span, hd)
        let by_head = |pool: &Tensor| self.pool_rows.of(pool)?.reshape((count, span, nkv, hd))?.transpose(1, 2)?.contiguous()?.reshape((count * nkv, span, hd));
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
/// scaled by `scale` (`None` when they come scaled), over its keys and
/// values (kv_heads, total, hd), causal (and within `window`); returns (len, heads × hd).
#[allow(clippy::too_many_arguments)]
fn attend_causal(q: &Tensor, keys: &Tensor, values: &Tensor, start: usize, window: Option<usize>, kv_heads: usize, scale: Option<f64>) -> Result<Tensor> {
    let (nh, len, hd) = q.dims3()?;
    let group = nh / kv_heads;
    let total = start + len;
    // Grouped-query attention without copying keys: the `group` query heads that
    // share one KV head are stacked along the row axis.
    let q = q.reshape((kv_heads, group * len, hd))?;
    let scores = q.matmul(&keys.t()?)?; // (kv_heads, group*len, total)
    let scores = match scale {
        Some(scale) => (scores * scale)?,
        None => scores,
    };
    let scores = if len > 1 || window.is_some() {
        let mask = causal_mask(len, start, window, q.device())?.to_dtype(q.dtype())?; // (len, total)
        scores.reshape((kv_heads, group, len, total))?.broadcast_add(&mask)?.reshape((kv_heads, group * len, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&values.contiguous()?)?; // (kv_heads, group*len, hd)
    out.reshape((nh, len, hd))?.transpose(0, 1)?.reshape((len, nh * hd))
}

/// 0 where query `i` (at position start + i) may see key `j`: not after
/// it, and within the last `window` positions; -inf elsewhere.
fn causal_mask(len: usize, start: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = start + len;
    let sees = |i: usize, j: usize| j <= start + i && window.is_none_or(|w| start + i < j + w);
    let mask: Vec<f32> = (0..len).flat_map(|i| (0..total).map(move |j| if sees(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (len, total), device)
}
