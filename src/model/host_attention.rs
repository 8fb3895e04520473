//! Attention on the CPU in f32, straight on the KV cache's own pages (kept
//! in f32 or f16).
//!
//! Through candle ops, one sequence's attention in one layer was some twenty
//! small tensor ops (splits, copies, two rotary calls, two matmuls, a softmax, a
//! copy of the whole value cache to make it contiguous) costing a few
//! microseconds each, paid again for every sequence of a batch. Here rotation,
//! the cache append and attention are plain loops over slices: each cached key
//! and value is loaded once for the query heads of up to four rows that share
//! it, and the (block of rows, KV head) work items of all sequences of a step
//! go to the thread pool at once.
//!
//! Every output depends only on its own sequence's tokens and cache, so a
//! sequence gets the same bits alone or batched.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernel::Value;
use super::page_book::PAGE_POSITIONS;

/// What a cache keeps keys and values in. f16 halves the cache (and what
/// attention reads per step); the arithmetic stays f32. The server keeps f16
/// unless told otherwise; a `Transformer` on its own starts in f32 (the
/// reference checks compare it bit by bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvPrecision {
    F32,
    F16,
}

/// One layer's keys and values of every sequence, in pages of
/// `PAGE_POSITIONS` positions (`page_book` says which sequence holds which):
/// page p's head h is one contiguous run of `PAGE_POSITIONS × head_dim`
/// values, so a head's keys on a page are read as one slice.
pub struct PageStore {
    store: Store,
    kv_heads: usize,
    head_dim: usize,
}

enum Store {
    F32 { keys: Vec<f32>, values: Vec<f32> },
    F16 { keys: Vec<f16>, values: Vec<f16> },
}

impl PageStore {
    pub fn new(precision: KvPrecision, kv_heads: usize, head_dim: usize) -> PageStore {
        let store = match precision {
            KvPrecision::F32 => Store::F32 { keys: Vec::new(), values: Vec::new() },
            KvPrecision::F16 => Store::F16 { keys: Vec::new(), values: Vec::new() },
        };
        PageStore { store, kv_heads, head_dim }
    }

    fn page_values(&self) -> usize {
        self.kv_heads * PAGE_POSITIONS * self.head_dim
    }

    /// Room for `pages` pages (what was written stays).
    pub fn grow(&mut self, pages: usize) {
        let values = pages * self.page_values();
        match &mut self.store {
            Store::F32 { keys, values: v } => {
                keys.resize(values, 0.0);
                v.resize(values, 0.0);
            }
            Store::F16 { keys, values: v } => {
                keys.resize(values, f16::ZERO);
                v.resize(values, f16::ZERO);
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        (match &self.store {
            Store::F32 { keys, values } => (keys.len() + values.len()) * 4,
            Store::F16 { keys, values } => (keys.len() + values.len()) * 2,
        }) as u64
    }

    /// Bytes one page takes, keys and values.
    pub fn page_bytes(precision: KvPrecision, kv_heads: usize, head_dim: usize) -> u64 {
        let size = if precision == KvPrecision::F16 { 2 } else { 4 };
        (2 * kv_heads * PAGE_POSITIONS * head_dim * size) as u64
    }

    /// Copy the first `rows` positions of page `from` into page `to`.
    pub fn copy_rows(&mut self, from: u32, to: u32, rows: usize) {
        let (page, run, hd) = (self.page_values(), PAGE_POSITIONS * self.head_dim, self.head_dim);
        for h in 0..self.kv_heads {
            let src = from as usize * page + h * run;
            let dst = to as usize * page + h * run;
            match &mut self.store {
                Store::F32 { keys, values } => {
                    keys.copy_within(src..src + rows * hd, dst);
                    values.copy_within(src..src + rows * hd, dst);
                }
                Store::F16 { keys, values } => {
                    keys.copy_within(src..src + rows * hd, dst);
                    values.copy_within(src..src + rows * hd, dst);
                }
            }
        }
    }

    /// Store one position's `keys` and `values` (kv_heads × head_dim each) at
    /// `slot` of `page`.
    pub fn write(&mut self, page: u32, slot: usize, keys: &[f32], values: &[f32]) {
        let (hd, kv_heads) = (self.head_dim, self.kv_heads);
        let base = page as usize * kv_heads * PAGE_POSITIONS;
        for h in 0..kv_heads {
            let to = ((base + h * PAGE_POSITIONS + slot) * hd)..((base + h * PAGE_POSITIONS + slot + 1) * hd);
            let from = h * hd..(h + 1) * hd;
            match &mut self.store {
                Store::F32 { keys: k, values: v } => {
                    k[to.clone()].copy_from_slice(&keys[from.clone()]);
                    v[to].copy_from_slice(&values[from]);
                }
                Store::F16 { keys: k, values: v } => {
                    k[to.clone()].convert_from_f32_slice(&keys[from.clone()]);
                    v[to].convert_from_f32_slice(&values[from]);
                }
            }
        }
    }

    /// One item of `attend_into`: the rows of `block` attended, for one KV
    /// head, into `out`.
    fn attend_block(&self, kernel: super::kernel::Kernel, block: &BlockItem<'_>, scratch: &mut Vec<f32>, out: &super::threads::SharedOut) {
        match &self.store {
            Store::F32 { keys, values } => self.attend_block_in(kernel, block, scratch, out, keys, values),
            Store::F16 { keys, values } => self.attend_block_in(kernel, block, scratch, out, keys, values),
        }
    }

    /// The block's queries copied side by side, their scores over every
    /// position any of its rows sees (page by page), each query's softmax over
    /// its own row's positions, then the weighted values, position by position
    /// in order, of the queries whose row sees each position.
    fn attend_block_in<E: Value>(&self, kernel: super::kernel::Kernel, block: &BlockItem<'_>, scratch: &mut Vec<f32>, out: &super::threads::SharedOut, keys: &[E], values: &[E]) {
        let (hd, group, rows) = (self.head_dim, block.group, block.rows.len());
        let queries = rows * group;
        let first = |i: usize| block.window.map_or(0, |w| (block.first_visible + i).saturating_sub(w));
        let visible = |i: usize| block.first_visible + i;
        let (lo, hi) = (first(0), visible(rows - 1));
        let span = hi - lo;
        // Scratch: the queries (queries × head_dim), their scores
        // (queries × span) and their outputs (queries × head_dim).
        scratch.resize(queries * (2 * hd + span), 0.0);
        let (qs, rest) = scratch.split_at_mut(queries * hd);
        let (scores, acc) = rest.split_at_mut(queries * span);
        let item_width = group * hd;
        for (i, row) in block.rows.clone().enumerate() {
            let at = row * block.row_width + block.kv_head * item_width;
            qs[i * item_width..(i + 1) * item_width].copy_from_slice(&block.queries[at..at + item_width]);
        }
        // Page j's positions a..b of this KV head, as a range of values.
        let pages = (lo / PAGE_POSITIONS..hi.div_ceil(PAGE_POSITIONS)).map(|j| {
            let (a, b) = (lo.max(j * PAGE_POSITIONS), hi.min((j + 1) * PAGE_POSITIONS));
            let head = (block.pages[j] as usize * self.kv_heads + block.kv_head) * PAGE_POSITIONS;
            (a, b, (head + a - j * PAGE_POSITIONS) * hd..(head + b - j * PAGE_POSITIONS) * hd)
        });
        for (a, _, range) in pages.clone() {
            kernel.scores(qs, &keys[range], hd, block.scale, scores, span, a - lo);
        }
        for (q, row_scores) in scores.chunks_exact_mut(span).enumerate() {
            let i = q / group;
            softmax(&mut row_scores[first(i) - lo..visible(i) - lo]);
        }
        acc.fill(0.0);
        // Rows i0..=i1 see every position from s to e when no row's first or
        // last position falls between: cut each page at those positions.
        let mut cuts = [0usize; 2 * BLOCK_ROWS];
        for i in 0..rows {
            (cuts[2 * i], cuts[2 * i + 1]) = (first(i), visible(i));
        }
        let cuts = &mut cuts[..2 * rows];
        cuts.sort_unstable();
        for (a, b, range) in pages {
            let mut s = a;
            for e in cuts.iter().copied().filter(|&c| c > a && c < b).chain([b]) {
                if e == s {
                    continue;
                }
                let i0 = (0..rows).find(|&i| visible(i) >= e);
                let i1 = (0..rows).rev().find(|&i| first(i) <= s);
                if let Some((i0, i1)) = i0.zip(i1).filter(|(i0, i1)| i0 <= i1) {
                    let seen = &values[range.start + (s - a) * hd..range.start + (e - a) * hd];
                    let (from, to) = (i0 * group, (i1 + 1) * group);
                    kernel.weighted_values(&scores[from * span..to * span], span, s - lo, seen, hd, &mut acc[from * hd..to * hd]);
                }
                s = e;
            }
        }
        for (i, row) in block.rows.clone().enumerate() {
            // SAFETY: each (row, KV head) belongs to one item, so no other
            // thread writes these values; `out` outlives the pool's run.
            unsafe { out.put(row * block.row_width + block.kv_head * item_width, &acc[i * item_width..(i + 1) * item_width]) };
        }
    }
}

/// How a layer rotates each head: the first `rotary_dim` of its `head_dim`
/// values (all of them but in Phi-3's family), in halves or in adjacent pairs.
#[derive(Clone, Copy)]
pub struct Rotary {
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub halves: bool,
}

impl Rotary {
    /// Rotate each head of one row (`heads × head_dim` values) to position
    /// `pos`, as candle's `rope` (halves) or `rope_i` (interleaved pairs)
    /// does on the rotated part, with the same expressions; the rest of each
    /// head is left as it is. `cos` and `sin` are the tables' rows for `pos`
    /// (rotary_dim / 2).
    pub fn rotate(&self, row: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.rotary_dim / 2;
        for head in row.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = if self.halves { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x, y) = (head[a], head[b]);
                head[a] = x * cos[i] - y * sin[i];
                head[b] = x * sin[i] + y * cos[i];
            }
        }
    }
}

/// The shapes of a layer's attention.
#[derive(Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence in a step: its rows of the step's queries, the position of the
/// first, and its pages (already holding those rows' keys and values).
#[cfg(test)]
pub struct SeqQueries<'a> {
    pub rows: std::ops::Range<usize>,
    pub start: usize,
    pub pages: &'a [u32],
}

/// `attend_into` for sequences listed one by one, into a new vector.
#[cfg(test)]
pub fn attend(queries: &[f32], seqs: &[SeqQueries<'_>], store: &PageStore, window: Option<usize>, heads: Heads) -> Vec<f32> {
    let mut row_starts: Vec<usize> = seqs.iter().map(|s| s.rows.start).collect();
    row_starts.push(seqs.last().map_or(0, |s| s.rows.end));
    let positions: Vec<usize> = seqs.iter().map(|s| s.start).collect();
    let mut out = Vec::new();
    let step = StepSeqs { row_starts: &row_starts, positions: &positions, window, pages: |s: usize| seqs[s].pages };
    attend_into(queries, step, store, heads, &mut out);
    out
}

/// The sequences of a step as attention sees them: sequence s owns query
/// rows `row_starts[s]..row_starts[s + 1]` (so `row_starts` has one entry
/// more than there are sequences), the first at position `positions[s]`,
/// and its keys and values are on pages `pages(s)` (already holding those
/// rows' own).
pub struct StepSeqs<'a, P> {
    pub row_starts: &'a [usize],
    pub positions: &'a [usize],
    /// Each query sees only the last this many positions (itself included).
    pub window: Option<usize>,
    pub pages: P,
}

/// Rows of one sequence attended together, per KV head: each key and value
/// loaded serves all their query heads. Every row's scores, softmax and
/// weighted sum are still its own, in the same order in any block, so how
/// rows are grouped changes no bits (alone, batched, or a token at a time).
const BLOCK_ROWS: usize = 4;

/// One work item: a block of rows of one sequence, for one KV head.
struct BlockItem<'a> {
    /// The step's queries, `row_width` values a row.
    queries: &'a [f32],
    row_width: usize,
    rows: std::ops::Range<usize>,
    /// The positions the block's first row sees (itself included); each
    /// next row sees one more.
    first_visible: usize,
    window: Option<usize>,
    kv_head: usize,
    group: usize,
    pages: &'a [u32],
    scale: f32,
}

thread_local! {
    /// Each thread's scratch for one item (queries, scores, outputs), kept
    /// between items and steps.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The calling thread's row blocks of a step: (sequence, rows).
    static BLOCKS: std::cell::RefCell<Vec<(usize, std::ops::Range<usize>)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Room for `values` in every pool thread's `SCRATCH`, reserved on all the
/// threads at once when the calling thread's is short. Which threads take a
/// step's items varies from step to step, so a thread that has taken none so
/// far must not be the one to allocate later, in the middle of a step. Every
/// thread's room is at least the largest any caller asked for, so the
/// caller's own room says whether all have enough.
fn grow_scratch(values: usize) {
    if SCRATCH.with_borrow(|s| s.capacity()) >= values {
        return;
    }
    candle_core::utils::barrier_pool().execute(|_| {
        SCRATCH.with_borrow_mut(|s| s.reserve(values.saturating_sub(s.len())));
    });
}

/// Causal attention of every query row (rotated, `tokens × q_heads·head_dim`)
/// over its own sequence's pages of `store`, into `out` (`tokens ×
/// q_heads·head_dim`; its buffer reused, so a step no larger than an earlier
/// one allocates nothing).
pub fn attend_into<'p, P: Fn(usize) -> &'p [u32] + Sync>(queries: &[f32], seqs: StepSeqs<'_, P>, store: &PageStore, heads: Heads, out: &mut Vec<f32>) {
    let Heads { q_heads, kv_heads, head_dim } = heads;
    let group = q_heads / kv_heads;
    let tokens = queries.len() / (q_heads * head_dim);
    // The items must cover every output value: `set_len` below relies on it.
    assert!(q_heads.is_multiple_of(kv_heads) && queries.len() == tokens * q_heads * head_dim, "whole rows of whole groups");
    assert_eq!(seqs.row_starts.first().copied(), Some(0), "the sequences' rows start at the first query");
    assert!(seqs.row_starts.windows(2).all(|r| r[0] <= r[1]), "the sequences' rows in order");
    assert_eq!(seqs.row_starts.last().copied(), Some(tokens), "the sequences' rows cover the queries");
    // The most positions a row of the step sees, to the next power of two
    // (so the scratch grows now and then, not a page at a time).
    let positions = (0..seqs.positions.len()).map(|s| (seqs.pages)(s).len() * PAGE_POSITIONS).max().unwrap_or(0);
    grow_scratch((BLOCK_ROWS * group * (positions + 2 * head_dim)).next_power_of_two());
    let mut blocks = BLOCKS.take();
    blocks.clear();
    // Never more blocks than rows: a step with no more rows than an earlier one allocates nothing.
    blocks.reserve(tokens);
    for (s, rows) in seqs.row_starts.windows(2).enumerate() {
        blocks.extend((rows[0]..rows[1]).step_by(BLOCK_ROWS).map(|start| (s, start..(start + BLOCK_ROWS).min(rows[1]))));
    }
    let kernel = super::kernel::Kernel::detect();
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.clear();
    out.reserve(queries.len());
    let shared = super::threads::SharedOut::spare(out);
    let work = |items: std::ops::Range<usize>| {
        SCRATCH.with_borrow_mut(|scratch| {
            for item in items {
                let (s, rows) = blocks[item / kv_heads].clone();
                let item = BlockItem {
                    queries,
                    row_width: q_heads * head_dim,
                    first_visible: seqs.positions[s] + (rows.start - seqs.row_starts[s]) + 1,
                    rows,
                    window: seqs.window,
                    kv_head: item % kv_heads,
                    group,
                    pages: (seqs.pages)(s),
                    scale,
                };
                store.attend_block(kernel, &item, scratch, &shared);
            }
        })
    };
    let items = blocks.len() * kv_heads;
    let longest = seqs.positions.iter().zip(seqs.row_starts.windows(2)).map(|(&p, rows)| p + rows[1] - rows[0]).max().unwrap_or(0);
    // A few short items are not worth waking the pool for.
    if tokens * q_heads * longest < 2048 {
        work(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    }
    // SAFETY: the items cover every (row, KV head), each writing all of its
    // values, and every thread is done.
    unsafe { out.set_len(queries.len()) };
    BLOCKS.set(blocks);
}

impl super::kernel::Kernel {
    /// For each query q of `qs` (head_dim values each) and key p of `keys`:
    /// `scores[q·stride + offset + p]` = scale · (query q · key p).
    #[allow(clippy::too_many_arguments)]
    fn scores<E: Value>(self, qs: &[f32], keys: &[E], head_dim: usize, scale: f32, scores: &mut [f32], stride: usize, offset: usize) {
        let positions = keys.len() / head_dim;
        assert!(qs.len() / head_dim * stride <= scores.len() && offset + positions <= stride);
        match self {
            // SAFETY: `detect` saw AVX2, FMA and F16C on this CPU; the lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 { .. } if head_dim.is_multiple_of(8) => unsafe { avx2::scores(qs, keys, head_dim, scale, scores, stride, offset) },
            _ => {
                for (q, row) in qs.chunks_exact(head_dim).zip(scores.chunks_exact_mut(stride)) {
                    for (s, k) in row[offset..offset + positions].iter_mut().zip(keys.chunks_exact(head_dim)) {
                        *s = dot(q, k) * scale;
                    }
                }
            }
        }
    }

    /// For each query q: `out[q·head_dim..]` += Σ_p probs[q·stride + offset
    /// + p] · value p, over the positions of `values` in order.
    fn weighted_values<E: Value>(self, probs: &[f32], stride: usize, offset: usize, values: &[E], head_dim: usize, out: &mut [f32]) {
        let positions = values.len() / head_dim;
        assert!(out.len() / head_dim * stride <= probs.len() && offset + positions <= stride);
        match self {
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 { .. } if head_dim.is_multiple_of(8) => unsafe { avx2::weighted_values(probs, stride, offset, values, head_dim, out) },
            _ => {
                for (o, p) in out.chunks_exact_mut(head_dim).zip(probs.chunks(stride)) {
                    for (&p, v) in p[offset..offset + positions].iter().zip(values.chunks_exact(head_dim)) {
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += p * v.to_f32();
                        }
                    }
                }
            }
        }
    }
}

/// Eight partial sums, so the compiler can keep them in one vector register.
fn dot<E: Value>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y.to_f32()).sum();
    for (x, y) in a8.zip(b8) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k].to_f32();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The same two steps with AVX2 and fused multiply-adds, for head sizes that
/// are a multiple of eight, in register tiles: up to four queries against two
/// keys (each loaded vector serves two or four products where one each would
/// leave the loads, not the multiply-adds, as the limit), and up to four
/// queries against two vectors of values.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::model::kernel::avx2::sum_eight;
    use crate::model::kernel::Value;

    /// Queries per tile.
    const QUERIES: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<E: Value>(qs: &[f32], keys: &[E], head_dim: usize, scale: f32, scores: &mut [f32], stride: usize, offset: usize) {
        let (queries, positions) = (qs.len() / head_dim, keys.len() / head_dim);
        for q in (0..queries).step_by(QUERIES) {
            let q_at = qs.as_ptr().add(q * head_dim);
            let out = scores.as_mut_ptr().add(q * stride + offset);
            match (queries - q).min(QUERIES) {
                1 => score_rows::<E, 1>(q_at, keys, positions, head_dim, scale, out, stride),
                2 => score_rows::<E, 2>(q_at, keys, positions, head_dim, scale, out, stride),
                3 => score_rows::<E, 3>(q_at, keys, positions, head_dim, scale, out, stride),
                _ => score_rows::<E, 4>(q_at, keys, positions, head_dim, scale, out, stride),
            }
        }
    }

    /// `Q` queries (side by side from `qs`) against every key, two at a time.
    #[inline(always)]
    unsafe fn score_rows<E: Value, const Q: usize>(qs: *const f32, keys: &[E], positions: usize, head_dim: usize, scale: f32, out: *mut f32, stride: usize) {
        let mut p = 0;
        while p + 2 <= positions {
            score_tile::<E, Q, 2>(qs, keys.as_ptr().add(p * head_dim), head_dim, scale, out.add(p), stride);
            p += 2;
        }
        if p < positions {
            score_tile::<E, Q, 1>(qs, keys.as_ptr().add(p * head_dim), head_dim, scale, out.add(p), stride);
        }
    }

    /// `Q` queries against `K` keys: each product is eight lanes of fused
    /// multiply-adds along the head, then the lanes summed in `sum_eight`'s
    /// order, the same for every product whatever tile it falls in.
    #[inline(always)]
    unsafe fn score_tile<E: Value, const Q: usize, const K: usize>(qs: *const f32, keys: *const E, head_dim: usize, scale: f32, out: *mut f32, stride: usize) {
        let mut acc = [[_mm256_setzero_ps(); K]; Q];
        for j in (0..head_dim).step_by(8) {
            let k: [__m256; K] = std::array::from_fn(|t| E::load8(keys.add(t * head_dim + j)));
            for (q, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(qs.add(q * head_dim + j));
                for t in 0..K {
                    acc[t] = _mm256_fmadd_ps(x, k[t], acc[t]);
                }
            }
        }
        let mut sums = [_mm256_setzero_ps(); 8];
        for q in 0..Q {
            for t in 0..K {
                sums[q * K + t] = acc[q][t];
            }
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_mul_ps(sum_eight(sums), _mm256_set1_ps(scale)));
        for q in 0..Q {
            for t in 0..K {
                *out.add(q * stride + t) = lanes[q * K + t];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_values<E: Value>(probs: &[f32], stride: usize, offset: usize, values: &[E], head_dim: usize, out: &mut [f32]) {
        let (queries, positions) = (out.len() / head_dim, values.len() / head_dim);
        for q in (0..queries).step_by(QUERIES) {
            let p_at = probs.as_ptr().add(q * stride + offset);
            let o_at = out.as_mut_ptr().add(q * head_dim);
            match (queries - q).min(QUERIES) {
                1 => weigh_rows::<E, 1>(p_at, stride, values, positions, head_dim, o_at),
                2 => weigh_rows::<E, 2>(p_at, stride, values, positions, head_dim, o_at),
                3 => weigh_rows::<E, 3>(p_at, stride, values, positions, head_dim, o_at),
                _ => weigh_rows::<E, 4>(p_at, stride, values, positions, head_dim, o_at),
            }
        }
    }

    /// `Q` queries' outputs, sixteen values of the head at a time (eight for
    /// the last, where the head is not a multiple of sixteen).
    #[inline(always)]
    unsafe fn weigh_rows<E: Value, const Q: usize>(probs: *const f32, stride: usize, values: &[E], positions: usize, head_dim: usize, out: *mut f32) {
        let mut d = 0;
        while d + 16 <= head_dim {
            weigh_tile::<E, Q, 2>(probs, stride, values.as_ptr().add(d), positions, head_dim, out.add(d));
            d += 16;
        }
        if d < head_dim {
            weigh_tile::<E, Q, 1>(probs, stride, values.as_ptr().add(d), positions, head_dim, out.add(d));
        }
    }

    /// `W` vectors of each of `Q` outputs accumulate probability × value over
    /// the positions in order: the same steps, value by value, as any tile.
    #[inline(always)]
    unsafe fn weigh_tile<E: Value, const Q: usize, const W: usize>(probs: *const f32, stride: usize, values: *const E, positions: usize, head_dim: usize, out: *mut f32) {
        let mut acc: [[__m256; W]; Q] = std::array::from_fn(|q| std::array::from_fn(|w| _mm256_loadu_ps(out.add(q * head_dim + 8 * w))));
        for p in 0..positions {
            let v: [__m256; W] = std::array::from_fn(|w| E::load8(values.add(p * head_dim + 8 * w)));
            for (q, acc) in acc.iter_mut().enumerate() {
                let weight = _mm256_set1_ps(*probs.add(q * stride + p));
                for w in 0..W {
                    acc[w] = _mm256_fmadd_ps(weight, v[w], acc[w]);
                }
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            for (w, &acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(q * head_dim + 8 * w), acc);
            }
        }
    }
}

/// Softmax of `xs` in place: its maximum taken off, exponentials, then each
/// divided by their sum (summed in eight lanes, then across them).
fn softmax(xs: &mut [f32]) {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in xs.iter_mut() {
        *x -= max;
    }
    super::row_ops::exp_in_place(xs);
    let mut lanes = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for k in 0..8 {
            lanes[k] += chunk[k];
        }
    }
    let sum = lanes.iter().sum::<f32>() + tail;
    for x in xs.iter_mut() {
        *x /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Plain attention in f64 for one query row of one head.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
        let scale = 1.0 / (q.len() as f64).sqrt();
        let scores: Vec<f64> = keys.iter().map(|k| q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale).collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..q.len()).map(|d| e.iter().zip(values).map(|(p, v)| p / sum * v[d] as f64).sum()).collect()
    }

    /// Head size 12 takes the scalar loops; 64 (a multiple of eight) the
    /// detected kernel where the CPU has AVX2. Caches in f32 and in f16 (whose
    /// reference takes the keys and values rounded to f16).
    #[test]
    fn batched_causal_grouped_attention_matches_plain_attention_and_keeps_the_bits() {
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            batched_attention_case(Heads { q_heads: 6, kv_heads: 2, head_dim: 12 }, precision);
            batched_attention_case(Heads { q_heads: 6, kv_heads: 2, head_dim: 64 }, precision);
            batched_attention_case(Heads { q_heads: 14, kv_heads: 2, head_dim: 64 }, precision);
            // Qwen3's shapes: a head of 128, two query heads to a KV head.
            batched_attention_case(Heads { q_heads: 4, kv_heads: 2, head_dim: 128 }, precision);
            // Sixteen-value tiles and an eight-value tail.
            batched_attention_case(Heads { q_heads: 3, kv_heads: 3, head_dim: 40 }, precision);
        }
    }

    #[test]
    fn an_f16_store_takes_half_the_bytes() {
        let mut sizes = Vec::new();
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            let mut store = PageStore::new(precision, 2, 8);
            store.grow(3);
            store.write(2, 5, &[0.5; 16], &[0.25; 16]);
            assert_eq!(store.bytes(), 3 * PageStore::page_bytes(precision, 2, 8));
            sizes.push(store.bytes());
        }
        assert_eq!(sizes, vec![3 * 2 * 2 * PAGE_POSITIONS as u64 * 8 * 4, 3 * 2 * 2 * PAGE_POSITIONS as u64 * 8 * 2]);
    }

    #[test]
    fn detected_attention_kernel_agrees_with_the_scalar_loops() {
        use crate::model::kernel::Kernel;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        // Queries: one tile, three, and a tail; keys in pairs and one left.
        for (queries, head_dim, positions) in [(3, 64, 1), (3, 64, 13), (9, 64, 40), (2, 128, 9), (6, 128, 9), (4, 40, 7), (1, 8, 5)] {
            let q = random(&mut rng, queries * head_dim);
            let keys = random(&mut rng, positions * head_dim);
            let values = random(&mut rng, positions * head_dim);
            // Each query's scores in a row of its own, two positions in.
            let (stride, offset) = (positions + 3, 2);
            let (mut want, mut got) = (vec![0f32; queries * stride], vec![0f32; queries * stride]);
            Kernel::Scalar.scores(&q, &keys, head_dim, 0.125, &mut want, stride, offset);
            Kernel::detect().scores(&q, &keys, head_dim, 0.125, &mut got, stride, offset);
            for (w, g) in want.iter().zip(&got) {
                assert!((w - g).abs() < 1e-5, "scores: {w} vs {g} ({queries} queries, head {head_dim}, {positions} positions)");
            }
            for row in want.chunks_exact_mut(stride) {
                softmax(&mut row[offset..offset + positions]);
            }
            // Added to what the outputs hold.
            let (mut want_out, mut got_out) = (vec![1f32; queries * head_dim], vec![1f32; queries * head_dim]);
            Kernel::Scalar.weighted_values(&want, stride, offset, &values, head_dim, &mut want_out);
            Kernel::detect().weighted_values(&want, stride, offset, &values, head_dim, &mut got_out);
            for (w, g) in want_out.iter().zip(&got_out) {
                assert!((w - g).abs() < 1e-5, "values: {w} vs {g} ({queries} queries, head {head_dim}, {positions} positions)");
            }
        }
    }

    /// Two sequences on pages of one store, not in order and not side by
    /// side: one with 5 cached positions and 3 new, one with 150 new (over
    /// three pages); with and without a window of 70 positions.
    fn batched_attention_case(heads: Heads, precision: KvPrecision) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (qw, kvw) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        let mut store = PageStore::new(precision, heads.kv_heads, heads.head_dim);
        store.grow(6);
        let pages: [Vec<u32>; 2] = [vec![4], vec![2, 0, 5]];
        // What the store holds of a value.
        let kept = |x: Vec<f32>| -> Vec<f32> {
            match precision {
                KvPrecision::F32 => x,
                KvPrecision::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            }
        };
        let (starts, news) = ([5usize, 0], [3usize, 150]);
        let mut all_keys = [Vec::new(), Vec::new()];
        let mut all_values = [Vec::new(), Vec::new()];
        for s in 0..2 {
            let total = starts[s] + news[s];
            let (k, v) = (random(&mut rng, total * kvw), random(&mut rng, total * kvw));
            for p in 0..total {
                let (page, slot) = (pages[s][p / PAGE_POSITIONS], p % PAGE_POSITIONS);
                store.write(page, slot, &k[p * kvw..(p + 1) * kvw], &v[p * kvw..(p + 1) * kvw]);
            }
            all_keys[s] = kept(k);
            all_values[s] = kept(v);
        }
        let queries = random(&mut rng, (news[0] + news[1]) * qw);
        let seqs = [
            SeqQueries { rows: 0..3, start: 5, pages: &pages[0] },
            SeqQueries { rows: 3..153, start: 0, pages: &pages[1] },
        ];
        for window in [None, Some(70)] {
            let out = attend(&queries, &seqs, &store, window, heads);
            for (s, seq) in seqs.iter().enumerate() {
                for row in seq.rows.clone() {
                    let visible = seq.start + row - seq.rows.start + 1;
                    let first = window.map_or(0, |w| visible.saturating_sub(w));
                    for h in 0..heads.q_heads {
                        let kv = h / (heads.q_heads / heads.kv_heads);
                        let pick = |all: &Vec<f32>| -> Vec<Vec<f32>> {
                            (first..visible).map(|p| all[p * kvw + kv * heads.head_dim..][..heads.head_dim].to_vec()).collect()
                        };
                        let want = reference(&queries[row * qw + h * heads.head_dim..][..heads.head_dim], &pick(&all_keys[s]), &pick(&all_values[s]));
                        for (d, w) in want.iter().enumerate() {
                            let got = out[row * qw + h * heads.head_dim + d] as f64;
                            assert!((got - w).abs() < 1e-5, "seq {s} row {row} head {h} window {window:?}: {got} vs {w}");
                        }
                    }
                }
            }
            // The second sequence alone gives the same bits as in the batch.
            let alone = attend(&queries[3 * qw..], &[SeqQueries { rows: 0..150, start: 0, pages: &pages[1] }], &store, window, heads);
            assert_eq!(alone, out[3 * qw..].to_vec(), "window {window:?}");
            // And its rows taken in chunks of 1, 3 and 7 (as decoding and
            // chunked prefill take them) give those bits too.
            for chunk in [1, 3, 7] {
                for start in (0..150).step_by(chunk) {
                    let end = (start + chunk).min(150);
                    let rows = &queries[(3 + start) * qw..(3 + end) * qw];
                    let part = attend(rows, &[SeqQueries { rows: 0..end - start, start, pages: &pages[1] }], &store, window, heads);
                    assert_eq!(part, out[(3 + start) * qw..(3 + end) * qw].to_vec(), "rows {start}..{end}, window {window:?}");
                }
            }
        }
    }

    #[test]
    fn rotation_is_candles_rope_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (heads, hd, pos) = (3, 16, 5);
        let x = random(&mut rng, heads * hd);
        let dev = Device::Cpu;
        let t = Tensor::from_vec(x.clone(), (1, heads, 1, hd), &dev).unwrap();
        // Whole heads, and the first 12 of 16 values (the rest pass through).
        for rotary_dim in [hd, 12] {
            let cos = random(&mut rng, rotary_dim / 2);
            let sin = random(&mut rng, rotary_dim / 2);
            let c = Tensor::from_vec(cos.clone(), (1, rotary_dim / 2), &dev).unwrap();
            let s = Tensor::from_vec(sin.clone(), (1, rotary_dim / 2), &dev).unwrap();
            let part = t.narrow(3, 0, rotary_dim).unwrap().contiguous().unwrap();
            for halves in [true, false] {
                let turned = if halves { candle_nn::rotary_emb::rope(&part, &c, &s) } else { candle_nn::rotary_emb::rope_i(&part, &c, &s) };
                let want = Tensor::cat(&[&turned.unwrap(), &t.narrow(3, rotary_dim, hd - rotary_dim).unwrap()], 3).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut got = x.clone();
                Rotary { head_dim: hd, rotary_dim, halves }.rotate(&mut got, &cos, &sin);
                assert_eq!(got, want, "halves = {halves}, rotary_dim {rotary_dim}, position {pos}");
            }
        }
    }
}
