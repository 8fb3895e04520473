//! Attention on the CPU in f32, straight on the KV cache's own pages (kept
//! in f32 or f16).
//!
//! Through candle ops, one sequence's attention in one layer was some twenty
//! small tensor ops (splits, copies, two rotary calls, two matmuls, a softmax, a
//! copy of the whole value cache to make it contiguous) costing a few
//! microseconds each, paid again for every sequence of a batch. Here rotation,
//! the cache append and attention are plain loops over slices: each cached key
//! and value is read once for all the query heads that share it, nothing is
//! copied, and the (token, KV head) work items of all sequences of a step go to the thread pool at once.
//!
//! Every output depends only on its own sequence's tokens and cache, so a
//! sequence gets the same bits alone or batched.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernel::Value;
use super::page_book::PAGE_POSITIONS;

/// What a cache keeps keys and values in. f16 halves the cache (and what
/// attention reads per step); the arithmetic stays f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvPrecision {
    #[default]
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

    /// One (row, KV head) item of `attend_into`: `out` (group × head_dim) is the
    /// attention of the group's query heads `q` over positions `first..visible`
    /// of the sequence whose pages are `pages`.
    #[allow(clippy::too_many_arguments)]
    fn attend_item(&self, kernel: super::kernel::Kernel, q: &[f32], kv_head: usize, pages: &[u32], first: usize, visible: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
        match &self.store {
            Store::F32 { keys, values } => self.attend_pages(kernel, q, kv_head, pages, first, visible, scale, scores, out, keys, values),
            Store::F16 { keys, values } => self.attend_pages(kernel, q, kv_head, pages, first, visible, scale, scores, out, keys, values),
        }
    }

    /// Scores page by page, one softmax over them all, then the weighted
    /// values page by page into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attend_pages<E: Value>(
        &self,
        kernel: super::kernel::Kernel,
        q: &[f32],
        kv_head: usize,
        pages: &[u32],
        first: usize,
        visible: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
        keys: &[E],
        values: &[E],
    ) {
        let hd = self.head_dim;
        let group = q.len() / hd;
        // The part of page `j` (positions lo..hi) a query sees, as value ranges.
        let spans = (first / PAGE_POSITIONS..visible.div_ceil(PAGE_POSITIONS)).map(|j| {
            let (lo, hi) = (first.max(j * PAGE_POSITIONS), visible.min((j + 1) * PAGE_POSITIONS));
            let head = (pages[j] as usize * self.kv_heads + kv_head) * PAGE_POSITIONS;
            (lo, (head + lo - j * PAGE_POSITIONS) * hd..(head + hi - j * PAGE_POSITIONS) * hd)
        });
        // scores[p·group + g]: query head g of the group against position first + p.
        scores.resize((visible - first) * group, 0.0);
        for (lo, range) in spans.clone() {
            kernel.scores(q, &keys[range], hd, scale, &mut scores[(lo - first) * group..]);
        }
        softmax_columns(scores, group);
        for (i, (lo, range)) in spans.enumerate() {
            kernel.weighted_values(&scores[(lo - first) * group..], &values[range], hd, out, i > 0);
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

thread_local! {
    /// Each thread's scores of one item, kept between items and steps.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's softmax scratch: the span-long maxima and sums and the
    /// columns' own.
    static SOFTMAX: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Room for `values` in every pool thread's scratch (`SCORES`, `SOFTMAX`),
/// reserved on all the threads at once when the calling thread's is short.
/// Which threads take a step's items varies from step to step, so a thread
/// that has taken none so far must not be the one to allocate later, in the
/// middle of a step. Every thread's room is at least the largest any caller
/// asked for, so the caller's own room says whether all have enough.
fn grow_scratch(values: usize) {
    if SCORES.with_borrow(|s| s.capacity()) >= values {
        return;
    }
    candle_core::utils::barrier_pool().execute(|_| {
        for scratch in [&SCORES, &SOFTMAX] {
            scratch.with_borrow_mut(|s| s.reserve(values.saturating_sub(s.len())));
        }
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
    assert_eq!(seqs.row_starts.last().copied(), Some(tokens), "the sequences' rows cover the queries");
    // Every item writes its whole part: resizing only keeps the length right.
    out.resize(queries.len(), 0.0);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // One item per (row, KV head): the outputs of the `group` query heads that
    // share that KV head, `group × head_dim` values in a row. Each cached key
    // and value is loaded once for the whole group, not once per query head.
    let item_width = group * head_dim;
    // The scores of as many positions as the most pages of a sequence hold,
    // to the next power of two (so they grow now and then, not a page at a
    // time), and softmax's spans.
    let positions = (0..seqs.positions.len()).map(|s| (seqs.pages)(s).len() * PAGE_POSITIONS).max().unwrap_or(0);
    grow_scratch((positions * group).next_power_of_two().max(SOFTMAX_SCRATCH * group));
    let kernel = super::kernel::Kernel::detect();
    let work = |first_item: usize, out: &mut [f32]| {
        SCORES.with_borrow_mut(|scores| {
            for (item, out) in (first_item..).zip(out.chunks_exact_mut(item_width)) {
                let (row, kv_head) = (item / kv_heads, item % kv_heads);
                let s = seqs.row_starts.partition_point(|&start| start <= row) - 1;
                let visible = seqs.positions[s] + (row - seqs.row_starts[s]) + 1;
                let first = seqs.window.map_or(0, |w| visible.saturating_sub(w));
                let q = &queries[item * item_width..(item + 1) * item_width];
                store.attend_item(kernel, q, kv_head, (seqs.pages)(s), first, visible, scale, scores, out);
            }
        })
    };
    let longest = seqs.positions.iter().zip(seqs.row_starts.windows(2)).map(|(&p, rows)| p + rows[1] - rows[0]).max().unwrap_or(0);
    // A few short items are not worth waking the pool for.
    if tokens * q_heads * longest < 2048 {
        work(0, out);
    } else {
        super::threads::on_candles_threads(out, item_width, 1, work);
    }
}

impl super::kernel::Kernel {
    /// `scores[p·group + g]` = scale · (query head g of `q` · key p), for the
    /// `group` query heads in `q` (group × head_dim) and every key in `keys`.
    fn scores<E: Value>(self, q: &[f32], keys: &[E], head_dim: usize, scale: f32, scores: &mut [f32]) {
        match self {
            // SAFETY: `detect` saw AVX2, FMA and F16C on this CPU.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 { .. } if head_dim.is_multiple_of(8) => unsafe { avx2::scores(q, keys, head_dim, scale, scores) },
            _ => {
                let dots = keys.chunks_exact(head_dim).flat_map(|k| q.chunks_exact(head_dim).map(move |q| dot(q, k) * scale));
                for (s, d) in scores.iter_mut().zip(dots) {
                    *s = d;
                }
            }
        }
    }

    /// `out` (group × head_dim) = for each query head g, Σ_p probs[p·group + g]
    /// · value p, added to what `out` holds when `add` (one page after another).
    fn weighted_values<E: Value>(self, probs: &[f32], values: &[E], head_dim: usize, out: &mut [f32], add: bool) {
        match self {
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 { .. } if head_dim.is_multiple_of(8) => unsafe { avx2::weighted_values(probs, values, head_dim, out, add) },
            _ => {
                let group = out.len() / head_dim;
                if !add {
                    out.fill(0.0);
                }
                for (p, v) in probs.chunks_exact(group).zip(values.chunks_exact(head_dim)) {
                    for (&p, out) in p.iter().zip(out.chunks_exact_mut(head_dim)) {
                        for (o, &v) in out.iter_mut().zip(v) {
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
/// are a multiple of eight. Scalar loops left half of a batched decode step's
/// attention time in horizontal sums and separate multiplies and adds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::model::kernel::avx2::sum_eight;
    use crate::model::kernel::Value;

    /// Eight dot products at a time, each as eight lanes of fused
    /// multiply-adds; the eight are then summed across lanes together (three
    /// rounds of pairwise adds), not one by one.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<E: Value>(q: &[f32], keys: &[E], head_dim: usize, scale: f32, scores: &mut [f32]) {
        let group = q.len() / head_dim;
        let total = keys.len() / head_dim * group;
        assert!(scores.len() >= total && q.len() == group * head_dim && head_dim.is_multiple_of(8));
        let dot = |t: usize| -> __m256 {
            let (key, g) = (t / group, t % group);
            let (k, q) = (keys.as_ptr().add(key * head_dim), q.as_ptr().add(g * head_dim));
            let mut acc = _mm256_setzero_ps();
            for j in (0..head_dim).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(j)), E::load8(k.add(j)), acc);
            }
            acc
        };
        let scale = _mm256_set1_ps(scale);
        let mut t = 0;
        while t + 8 <= total {
            let a: [__m256; 8] = std::array::from_fn(|i| dot(t + i));
            _mm256_storeu_ps(scores.as_mut_ptr().add(t), _mm256_mul_ps(sum_eight(a), scale));
            t += 8;
        }
        let mut lanes = [0f32; 8];
        for t in t..total {
            _mm256_storeu_ps(lanes.as_mut_ptr(), dot(t));
            scores[t] = lanes.iter().sum::<f32>() * _mm256_cvtss_f32(scale);
        }
    }

    /// For each query head, its output (head_dim values, up to 64 in registers
    /// at a time) accumulates probability × value over the positions.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_values<E: Value>(probs: &[f32], values: &[E], head_dim: usize, out: &mut [f32], add: bool) {
        let group = out.len() / head_dim;
        let positions = values.len() / head_dim;
        assert!(probs.len() >= positions * group && head_dim.is_multiple_of(8));
        for g in 0..group {
            for d in (0..head_dim).step_by(64) {
                let width = (head_dim - d).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                if add {
                    for (j, acc) in acc.iter_mut().enumerate().take(width) {
                        *acc = _mm256_loadu_ps(out.as_ptr().add(g * head_dim + d + 8 * j));
                    }
                }
                for p in 0..positions {
                    let w = _mm256_set1_ps(*probs.get_unchecked(p * group + g));
                    let v = values.as_ptr().add(p * head_dim + d);
                    for (j, acc) in acc.iter_mut().enumerate().take(width) {
                        *acc = _mm256_fmadd_ps(w, E::load8(v.add(8 * j)), *acc);
                    }
                }
                for (j, acc) in acc.iter().enumerate().take(width) {
                    _mm256_storeu_ps(out.as_mut_ptr().add(g * head_dim + d + 8 * j), *acc);
                }
            }
        }
    }
}

/// Softmax of each of the `columns` interleaved columns of `xs` (row-major,
/// `columns` values a row), each column in its own place.
///
/// Every pass walks the slice in spans of eight rows against a span-long
/// pattern (the span is a multiple of eight values, so the compiler keeps
/// each pass in vector registers); the exponentials take the whole slice at
/// once. Value j of a span belongs to column j mod `columns`.
fn softmax_columns(xs: &mut [f32], columns: usize) {
    let span = 8 * columns;
    SOFTMAX.with_borrow_mut(|scratch| {
        scratch.resize(SOFTMAX_SCRATCH * columns, 0.0);
        let (max, rest) = scratch.split_at_mut(span);
        let (sum, rest) = rest.split_at_mut(span);
        let (column_max, column_sums) = rest.split_at_mut(columns);
        softmax_columns_in(xs, columns, [max, sum, column_max, column_sums]);
    })
}

/// Softmax's scratch per column: two spans of eight and the column's own two.
const SOFTMAX_SCRATCH: usize = 2 * 8 + 2;

fn softmax_columns_in(xs: &mut [f32], columns: usize, [max, sum, column_max, column_sums]: [&mut [f32]; 4]) {
    let span = 8 * columns;
    let whole = xs.len() / span * span;
    max.fill(f32::NEG_INFINITY);
    for part in xs[..whole].chunks_exact(span) {
        for (m, &x) in max.iter_mut().zip(part) {
            *m = m.max(x);
        }
    }
    for (m, &x) in max.iter_mut().zip(&xs[whole..]) {
        *m = m.max(x);
    }
    for (c, to) in column_max.iter_mut().enumerate() {
        *to = max.iter().skip(c).step_by(columns).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    }
    for (j, m) in max.iter_mut().enumerate() {
        *m = column_max[j % columns];
    }
    for part in xs.chunks_mut(span) {
        for (x, &m) in part.iter_mut().zip(&*max) {
            *x -= m;
        }
    }
    super::row_ops::exp_in_place(xs);
    sum.fill(0.0);
    for part in xs[..whole].chunks_exact(span) {
        for (s, &x) in sum.iter_mut().zip(part) {
            *s += x;
        }
    }
    for (s, &x) in sum.iter_mut().zip(&xs[whole..]) {
        *s += x;
    }
    for (c, to) in column_sums.iter_mut().enumerate() {
        *to = sum.iter().skip(c).step_by(columns).sum();
    }
    for (j, s) in sum.iter_mut().enumerate() {
        *s = column_sums[j % columns];
    }
    for part in xs.chunks_mut(span) {
        for (x, &s) in part.iter_mut().zip(&*sum) {
            *x /= s;
        }
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
        for (group, head_dim, positions) in [(3, 64, 1), (3, 64, 13), (7, 64, 40), (2, 128, 9), (6, 128, 9), (4, 40, 7), (1, 8, 5)] {
            let q = random(&mut rng, group * head_dim);
            let keys = random(&mut rng, positions * head_dim);
            let values = random(&mut rng, positions * head_dim);
            let (mut want, mut got) = (vec![0f32; positions * group], vec![0f32; positions * group]);
            Kernel::Scalar.scores(&q, &keys, head_dim, 0.125, &mut want);
            Kernel::detect().scores(&q, &keys, head_dim, 0.125, &mut got);
            for (w, g) in want.iter().zip(&got) {
                assert!((w - g).abs() < 1e-5, "scores: {w} vs {g} (group {group}, head {head_dim}, {positions} positions)");
            }
            softmax_columns(&mut want, group);
            let (mut want_out, mut got_out) = (vec![1f32; group * head_dim], vec![1f32; group * head_dim]);
            Kernel::Scalar.weighted_values(&want, &values, head_dim, &mut want_out, false);
            Kernel::detect().weighted_values(&want, &values, head_dim, &mut got_out, false);
            for (w, g) in want_out.iter().zip(&got_out) {
                assert!((w - g).abs() < 1e-5, "values: {w} vs {g} (group {group}, head {head_dim}, {positions} positions)");
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
