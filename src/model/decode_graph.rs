//! Decode steps at fixed shapes: what a captured CUDA graph needs.
//!
//! A graph replays the kernels it recorded, on the buffers it recorded them
//! with: every tensor shape of the step must be the same at each replay,
//! and every input must sit in a buffer that outlives the graph, written
//! before each replay. So a decode step is padded to a bucket: its batch to
//! one of a few sizes, each sequence's attended positions to a span that is
//! a power of two. Padding rows feed token 0 at position 0, write their key
//! and value into a scratch row of the pool that no sequence owns, and
//! attend to that row alone; their logits are dropped. The real rows'
//! padding positions are masked.
//!
//! [`StaticDecodeInputs`] is the host side of those buffers: token ids,
//! positions, write rows, gathered pool rows and the mask, laid out at the
//! bucket's shape. On the tensor path (`Transformer::set_static_decode_shapes`)
//! the same layout runs eagerly, on any device, which is how the CPU tests
//! check it against the step planned at its own shape. Capturing and
//! replaying the graphs themselves is GPU work not built yet (docs/gpu.md).

/// `--cuda-graphs`: whether decode steps are run as captured CUDA graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CudaGraphs {
    /// Off until capture is built; then on a GPU.
    #[default]
    Auto,
    /// On a GPU only: for now decode steps at the graphs' fixed shapes, run
    /// eagerly (capture is not built), so their padding can be measured.
    On,
    Off,
}

impl CudaGraphs {
    /// The buckets to pad decode steps to on `device`, or why `on` cannot be had.
    pub fn buckets(self, device: &candle_core::Device) -> Result<Option<GraphBuckets>, String> {
        match self {
            CudaGraphs::Auto | CudaGraphs::Off => Ok(None),
            CudaGraphs::On if !cfg!(feature = "cuda") => {
                Err("--cuda-graphs on: this terse was built without CUDA; build it with `--features cuda`".into())
            }
            CudaGraphs::On if !device.is_cuda() => Err("--cuda-graphs on needs a GPU (`--device cuda`)".into()),
            CudaGraphs::On => Ok(Some(GraphBuckets::default())),
        }
    }
}

/// The batch sizes and spans decode steps are padded to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphBuckets {
    /// Ascending batch sizes; a larger batch runs at its own shape.
    batches: Vec<usize>,
    /// The shortest span; spans are it times a power of two.
    min_span: usize,
}

impl Default for GraphBuckets {
    /// Batches of 1 to 8, 16, 32 and 64 (small batches exactly, where a
    /// padded row would cost the most, then powers of two); spans from 64
    /// positions (one KV page) up.
    fn default() -> Self {
        GraphBuckets { batches: (1..=8).chain([16, 32, 64]).collect(), min_span: 64 }
    }
}

impl GraphBuckets {
    /// `batches` ascending and non-empty; `min_span` at least 1.
    pub fn new(mut batches: Vec<usize>, min_span: usize) -> Self {
        batches.sort_unstable();
        batches.dedup();
        batches.retain(|&b| b > 0);
        assert!(!batches.is_empty(), "at least one batch bucket");
        GraphBuckets { batches, min_span: min_span.max(1) }
    }

    /// The bucket a decode batch of `n` sequences pads to; `None` past the largest.
    pub fn batch_for(&self, n: usize) -> Option<usize> {
        self.batches.iter().copied().find(|&b| b >= n.max(1))
    }

    /// The span `longest` attended positions pad to.
    pub fn span_for(&self, longest: usize) -> usize {
        let mut span = self.min_span;
        while span < longest {
            span *= 2;
        }
        span
    }

    /// How many graphs cover decode steps of up to `context` positions: one
    /// per batch and span bucket (what capture would hold in memory).
    pub fn graph_count(&self, context: usize) -> usize {
        let mut spans = 1;
        while self.min_span << (spans - 1) < context {
            spans += 1;
        }
        self.batches.len() * spans
    }
}

/// One decoding sequence of a step: its new token, its position, and the
/// pool rows of the positions it attends, the new one last.
pub struct DecodingRow<'a> {
    pub token: u32,
    pub position: u32,
    pub pool_rows: &'a [u32],
}

/// A decode step's inputs at a bucket's shape (`batch` rows, `span`
/// positions each), in the order a graph's static buffers hold them.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticDecodeInputs {
    pub batch: usize,
    pub span: usize,
    /// The real rows, the first `live` of the batch.
    pub live: usize,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Where each row's new key and value go.
    pub write_rows: Vec<u32>,
    /// (batch × span) pool rows to attend; padding repeats the scratch row.
    pub pool_rows: Vec<u32>,
    /// (batch × span): 0 where a row attends, -inf on padding.
    pub mask: Vec<f32>,
}

impl StaticDecodeInputs {
    /// `rows` padded to `batch` rows of `span` positions, padding pointing
    /// at `scratch_row`. `batch` ≥ `rows.len()` and `span` ≥ every row's
    /// attended positions.
    pub fn layout(rows: &[DecodingRow<'_>], batch: usize, span: usize, scratch_row: u32) -> StaticDecodeInputs {
        assert!(batch >= rows.len(), "a batch bucket of {batch} for {} rows", rows.len());
        let mut inputs = StaticDecodeInputs {
            batch,
            span,
            live: rows.len(),
            tokens: Vec::with_capacity(batch),
            positions: Vec::with_capacity(batch),
            write_rows: Vec::with_capacity(batch),
            pool_rows: Vec::with_capacity(batch * span),
            mask: Vec::with_capacity(batch * span),
        };
        for row in rows {
            let seen = row.pool_rows.len();
            assert!((1..=span).contains(&seen), "a row attends {seen} positions in a span of {span}");
            inputs.tokens.push(row.token);
            inputs.positions.push(row.position);
            inputs.write_rows.push(row.pool_rows[seen - 1]);
            inputs.pool_rows.extend_from_slice(row.pool_rows);
            inputs.pool_rows.extend(std::iter::repeat_n(scratch_row, span - seen));
            inputs.mask.extend(std::iter::repeat_n(0.0, seen));
            inputs.mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, span - seen));
        }
        // Padding rows see their own scratch position only, so their softmax stays finite.
        for _ in rows.len()..batch {
            inputs.tokens.push(0);
            inputs.positions.push(0);
            inputs.write_rows.push(scratch_row);
            inputs.pool_rows.extend(std::iter::repeat_n(scratch_row, span));
            inputs.mask.push(0.0);
            inputs.mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, span - 1));
        }
        inputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_graphs_on_is_refused_without_a_gpu() {
        let cpu = candle_core::Device::Cpu;
        assert_eq!(CudaGraphs::Auto.buckets(&cpu), Ok(None));
        assert_eq!(CudaGraphs::Off.buckets(&cpu), Ok(None));
        let refused = CudaGraphs::On.buckets(&cpu).unwrap_err();
        assert!(refused.contains(if cfg!(feature = "cuda") { "needs a GPU" } else { "built without CUDA" }), "{refused}");
    }

    #[test]
    fn batches_and_spans_pad_to_their_buckets() {
        let b = GraphBuckets::default();
        assert_eq!((1..=9).map(|n| b.batch_for(n).unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6, 7, 8, 16]);
        assert_eq!(b.batch_for(0), Some(1));
        assert_eq!(b.batch_for(33), Some(64));
        assert_eq!(b.batch_for(65), None, "past the largest bucket a step runs at its own shape");
        assert_eq!([1, 64, 65, 128, 129, 4000].map(|s| b.span_for(s)), [64, 64, 128, 128, 256, 4096]);
        // 11 batch buckets × spans 64..32768 (10).
        assert_eq!(b.graph_count(32_768), 110);
        assert_eq!(GraphBuckets::new(vec![8, 2, 2, 0], 16).batch_for(3), Some(8));
    }

    #[test]
    fn rows_and_padding_are_laid_out_at_the_buckets_shape() {
        let (a, b) = ([10u32, 11, 12], [20u32]);
        let rows = [DecodingRow { token: 5, position: 2, pool_rows: &a }, DecodingRow { token: 6, position: 0, pool_rows: &b }];
        let inputs = StaticDecodeInputs::layout(&rows, 3, 4, 99);
        let inf = f32::NEG_INFINITY;
        assert_eq!(inputs.live, 2);
        assert_eq!(inputs.tokens, [5, 6, 0]);
        assert_eq!(inputs.positions, [2, 0, 0]);
        assert_eq!(inputs.write_rows, [12, 20, 99]);
        assert_eq!(inputs.pool_rows, [10, 11, 12, 99, 20, 99, 99, 99, 99, 99, 99, 99]);
        assert_eq!(inputs.mask, [0.0, 0.0, 0.0, inf, 0.0, inf, inf, inf, 0.0, inf, inf, inf]);
        // The same rows at the same bucket: the same buffers, whatever changed before.
        assert_eq!(StaticDecodeInputs::layout(&rows, 3, 4, 99), inputs);
    }
}
