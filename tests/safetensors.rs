//! Hugging Face directories and 2:4 sparse checkpoints, made from the real
//! default model: `terse convert` writes SmolLM2's GGUF as a dense directory,
//! `terse prune` makes a 2:4 copy of it, and terse loads all of them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::DType;
use terse::engine::argmax;
use terse::model::{
    convert_gguf_to_hf, load_gguf_dequantized, GraphBuckets, load_hf_dir, prune_hf_dir, LoadedModel, Rows, SeqChunk, SeqKvCache,
    SparseMode, Transformer,
};
use terse::tokenize::ChatMessage;

const PROMPTS: [&str; 3] = ["What is the capital of France?", "Write a haiku about rain.", "2+2="];

fn gguf() -> PathBuf {
    terse::manifest::resolve_model("smollm2-135m").expect("run ./models/fetch smollm2-135m").path
}

fn work_dir() -> PathBuf {
    // One fixed place, cleared by each run: the converted copies are large.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-safetensors")
}

/// The converted copies take about 1.5 GB of disk: each test holds one of
/// these, and the last of the file's tests to finish, passed or failed,
/// removes them. (A filtered run leaves them for the next run to clear.)
struct RemovesCopiesWhenLast;

const TESTS: usize = 7;
static UNFINISHED: AtomicUsize = AtomicUsize::new(TESTS);

impl Drop for RemovesCopiesWhenLast {
    fn drop(&mut self) {
        if UNFINISHED.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = std::fs::remove_dir_all(work_dir());
        }
    }
}

/// The converted f32 and bf16 directories and the 2:4-pruned copy of the f32
/// one, made once.
fn dirs() -> &'static (PathBuf, PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = work_dir();
        let _ = std::fs::remove_dir_all(&base);
        let (f32_dir, bf16_dir, sparse_dir) = (base.join("f32"), base.join("bf16"), base.join("sparse"));
        convert_gguf_to_hf(&gguf(), &f32_dir, DType::F32).unwrap();
        convert_gguf_to_hf(&gguf(), &bf16_dir, DType::BF16).unwrap();
        assert_eq!(prune_hf_dir(&f32_dir, &sparse_dir).unwrap(), 30 * 7, "every projection of 30 layers");
        (f32_dir, bf16_dir, sparse_dir)
    })
}

/// The bf16 directory pruned to 2:4, made once.
fn bf16_sparse_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let (_, bf16_dir, _) = dirs();
        let dir = work_dir().join("bf16-sparse");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(prune_hf_dir(bf16_dir, &dir).unwrap(), 30 * 7);
        dir
    })
}

fn prompt(model: &LoadedModel, text: &str) -> Vec<u32> {
    let chat = [ChatMessage::new("user", text)];
    model.tokenizer.encode(&model.tokenizer.apply_chat_template(&chat, true).unwrap()).unwrap()
}

/// Greedy decoding: the logits of each step and the tokens chosen.
fn greedy(model: &LoadedModel, prompt: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut cache = model.transformer.new_cache();
    let (mut all, mut tokens) = (Vec::new(), Vec::new());
    let mut feed = prompt.to_vec();
    for _ in 0..steps {
        let logits = model.transformer.forward(&mut [SeqChunk { tokens: &feed, cache: &mut cache }]).unwrap();
        let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let next = argmax(&logits);
        all.push(logits);
        tokens.push(next);
        feed = vec![next];
    }
    (all, tokens)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn a_converted_directory_computes_what_its_gguf_computes() {
    let _copies = RemovesCopiesWhenLast;
    let (f32_dir, _, _) = dirs();
    let (hf, report) = load_hf_dir(f32_dir, "smol-hf", SparseMode::Auto).unwrap();
    assert_eq!(report.sparse_fraction(), 0.0, "a dense checkpoint stays dense");
    assert_eq!((hf.info.format.as_str(), hf.info.dtype.as_str()), ("safetensors", "f32"));
    // The GGUF's own weights, dequantized: the same numbers, no activation quantization.
    let reference = load_gguf_dequantized(&gguf(), "smol-gguf").unwrap();
    for text in PROMPTS {
        let p = prompt(&hf, text);
        assert_eq!(p, prompt(&reference, text), "tokenizer and template survive the conversion");
        let (ours, our_tokens) = greedy(&hf, &p, 8);
        let (theirs, their_tokens) = greedy(&reference, &p, 8);
        assert_eq!(our_tokens, their_tokens, "{text}");
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(max_diff(a, b) < 1e-3, "{text}: logits differ by {}", max_diff(a, b));
        }
    }
}

#[test]
fn bf16_weights_load_and_stay_close() {
    let _copies = RemovesCopiesWhenLast;
    let (f32_dir, bf16_dir, _) = dirs();
    let (bf16, _) = load_hf_dir(bf16_dir, "smol-bf16", SparseMode::Auto).unwrap();
    assert_eq!(bf16.info.dtype, "bf16");
    let (full, _) = load_hf_dir(f32_dir, "smol-f32", SparseMode::Auto).unwrap();
    let p = prompt(&full, PROMPTS[0]);
    let (a, _) = greedy(&full, &p, 1);
    let (b, _) = greedy(&bf16, &p, 1);
    // bf16 keeps 8 bits of mantissa: logits move, but not far.
    assert!(max_diff(&a[0], &b[0]) < 2.0, "bf16 logits differ by {}", max_diff(&a[0], &b[0]));
}

#[test]
fn a_2_4_checkpoint_runs_compressed_and_matches_its_dense_computation() {
    let _copies = RemovesCopiesWhenLast;
    let (_, _, sparse_dir) = dirs();
    let (sparse, report) = load_hf_dir(sparse_dir, "smol-24", SparseMode::Auto).unwrap();
    assert_eq!(report.sparse_fraction(), 1.0);
    assert!(report.projections.iter().all(|(_, zeros, stored)| *stored && *zeros >= 0.5));
    assert_eq!(report.stored_bytes * 16, report.dense_bytes * 9, "9 bytes per group of four instead of 16");
    let (dense, dense_report) = load_hf_dir(sparse_dir, "smol-24-dense", SparseMode::Off).unwrap();
    assert_eq!(dense_report.sparse_fraction(), 0.0);
    assert!(sparse.info.weight_bytes < dense.info.weight_bytes);
    same_greedy_computation(&sparse, &dense, 4);
}

/// A bf16 2:4 checkpoint keeps its values in bf16: 5 bytes per group of four
/// instead of the 16 the dense f32 computation holds, and the same results as
/// that dense computation (the values are the same numbers).
#[test]
fn a_bf16_2_4_checkpoint_stores_bf16_values_and_matches_its_dense_computation() {
    let _copies = RemovesCopiesWhenLast;
    let dir = bf16_sparse_dir();
    let (sparse, report) = load_hf_dir(dir, "smol-24-bf16", SparseMode::Auto).unwrap();
    assert_eq!(report.sparse_fraction(), 1.0);
    assert_eq!(report.stored_bytes * 16, report.dense_bytes * 5, "5 bytes per group of four instead of 16");
    let (dense, _) = load_hf_dir(dir, "smol-24-bf16-dense", SparseMode::Off).unwrap();
    same_greedy_computation(&sparse, &dense, 4);
}

/// The tensor path (every model on a GPU) keeps all sequences' keys and
/// values in one pool of pages and attends for all decoding sequences at
/// once. Run on the CPU in f32, it computes what the host path computes, on
/// a schedule that takes every branch of the pooled plan: prompts in chunks
/// (one of 130 tokens, over pages and across steps), a sequence joining
/// part-way ahead of the others in the step's order (steps that mix chunks
/// and single tokens, outputs put back in order), and decoding sequences of
/// lengths far enough apart to be attended in two groups.
#[test]
fn the_pooled_kv_cache_computes_what_the_host_path_computes() {
    let _copies = RemovesCopiesWhenLast;
    let (f32_dir, _, _) = dirs();
    let (model, _) = load_hf_dir(f32_dir, "smol-f32-pooled", SparseMode::Auto).unwrap();
    assert!(model.transformer.runs_on_host() && !model.transformer.pooled_kv());
    let long: String = PROMPTS.iter().cycle().take(20).copied().collect::<Vec<_>>().join(" ");
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], &long, PROMPTS[2]].iter().map(|t| prompt(&model, t)).collect();
    assert!(prompts[1].len() > 2 * PAGE && prompts[1].len() > 2 * (prompts[0].len() + 24), "the long prompt spans pages and outgrows the others");
    let on_host = batched_greedy(&model.transformer, &prompts, 24);
    let pooled_model = model.transformer.into_tensor_path().unwrap();
    assert!(!pooled_model.runs_on_host() && pooled_model.pooled_kv());
    let pooled = batched_greedy(&pooled_model, &prompts, 24);
    for (seq, ((logits, tokens), (host_logits, host_tokens))) in pooled.iter().zip(&on_host).enumerate() {
        assert_eq!(tokens, host_tokens, "sequence {seq}");
        for (step, (a, b)) in logits.iter().zip(host_logits).enumerate() {
            // Differently ordered f32 sums, not a different computation.
            assert!(max_diff(a, b) < 1e-3, "sequence {seq}, step {step}: logits differ by {}", max_diff(a, b));
        }
    }
    // Every position's logits of a chunk, on the tensor path: the last is the
    // one a step returns, and each earlier one is that prefix's own last.
    every_position_is_its_prefixs_last(&pooled_model, &prompts[0], 1e-3);
}

/// Decode steps padded to fixed shapes (what a CUDA graph is captured at,
/// `model::decode_graph`) compute what steps at their own shapes compute,
/// on the same schedule: three sequences padded to four rows, one to two,
/// spans of 16 positions and up, pages of both prompts' and the scratch
/// row's in one gather.
#[test]
fn decode_steps_at_fixed_shapes_compute_what_steps_at_their_own_shapes_compute() {
    let _copies = RemovesCopiesWhenLast;
    let (f32_dir, _, _) = dirs();
    let (model, _) = load_hf_dir(f32_dir, "smol-f32-fixed", SparseMode::Auto).unwrap();
    let long: String = PROMPTS.iter().cycle().take(20).copied().collect::<Vec<_>>().join(" ");
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], &long, PROMPTS[2]].iter().map(|t| prompt(&model, t)).collect();
    let mut pooled = model.transformer.into_tensor_path().unwrap();
    let own_shapes = batched_greedy(&pooled, &prompts, 24);
    assert!(model_refuses_fixed_shapes_on_the_host_path(f32_dir));
    pooled.set_static_decode_shapes(Some(GraphBuckets::new(vec![2, 4, 8], 16))).unwrap();
    let fixed = batched_greedy(&pooled, &prompts, 24);
    let mut worst = 0f32;
    for (seq, ((logits, tokens), (own_logits, own_tokens))) in fixed.iter().zip(&own_shapes).enumerate() {
        assert_eq!(tokens, own_tokens, "sequence {seq}");
        for (step, (a, b)) in logits.iter().zip(own_logits).enumerate() {
            worst = worst.max(max_diff(a, b));
            // The same sums over longer rows (padding adds exact zeros), blocked differently.
            assert!(max_diff(a, b) < 1e-3, "sequence {seq}, step {step}: logits differ by {}", max_diff(a, b));
        }
    }
    eprintln!("fixed shapes against own shapes: logits differ by up to {worst:e}");
}

fn model_refuses_fixed_shapes_on_the_host_path(dir: &Path) -> bool {
    let (mut model, _) = load_hf_dir(dir, "smol-f32-host", SparseMode::Auto).unwrap();
    let err = model.transformer.set_static_decode_shapes(Some(GraphBuckets::default())).unwrap_err();
    err.to_string().contains("tensor path")
}

/// The logits of every position of one chunk (`Rows::All`) against the
/// logits of each prefix run alone, within `tolerance`.
fn every_position_is_its_prefixs_last(model: &Transformer, prompt: &[u32], tolerance: f32) {
    let mut cache = model.new_cache();
    let all = model.forward_rows(&mut [SeqChunk { tokens: prompt, cache: &mut cache }], Rows::All).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(all.len(), prompt.len());
    for end in [1, prompt.len() / 2, prompt.len()] {
        let mut cache = model.new_cache();
        let last = model.forward(&mut [SeqChunk { tokens: &prompt[..end], cache: &mut cache }]).unwrap().to_vec2::<f32>().unwrap();
        let diff = max_diff(&all[end - 1], &last[0]);
        assert!(diff <= tolerance, "position {}: {diff}", end - 1);
    }
}

/// On the host path too; dense f32 products go through candle's matmul,
/// whose sums are blocked by the number of rows, so rows agree within float
/// rounding rather than bit for bit (the quantized kernels' rows are
/// bit-exact: `tests/reference.rs`).
#[test]
fn every_position_of_a_chunk_on_the_host_path_is_its_prefixs_last() {
    let _copies = RemovesCopiesWhenLast;
    let (f32_dir, _, _) = dirs();
    let (model, _) = load_hf_dir(f32_dir, "smol-f32-rows", SparseMode::Auto).unwrap();
    assert!(model.transformer.runs_on_host());
    every_position_is_its_prefixs_last(&model.transformer, &prompt(&model, PROMPTS[1]), 1e-3);
}

/// Positions per page of the pooled KV cache.
const PAGE: usize = 64;

/// Greedy decoding of `prompts` in shared steps, as the scheduler runs them:
/// prompts go in chunks of at most 48 tokens, sequence 0 joins at the third
/// step (first in the step's order), and each sequence decodes `steps`
/// tokens. Each sequence's logits once its prompt is in, and its tokens.
fn batched_greedy(model: &Transformer, prompts: &[Vec<u32>], steps: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    const CHUNK: usize = 48;
    let mut caches: Vec<SeqKvCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut pending: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<(Vec<Vec<f32>>, Vec<u32>)> = prompts.iter().map(|_| Default::default()).collect();
    for step in 0.. {
        let active: Vec<usize> = (0..prompts.len()).filter(|&s| (s != 0 || step >= 3) && out[s].1.len() < steps).collect();
        if active.is_empty() {
            break;
        }
        let feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|&s| {
                let n = pending[s].len().min(CHUNK);
                pending[s].drain(..n).collect()
            })
            .collect();
        let mut chunks: Vec<SeqChunk> = caches
            .iter_mut()
            .enumerate()
            .filter(|(s, _)| active.contains(s))
            .zip(&feeds)
            .map(|((_, cache), feed)| SeqChunk { tokens: feed, cache })
            .collect();
        let logits = model.forward(&mut chunks).unwrap().to_vec2::<f32>().unwrap();
        for (&s, row) in active.iter().zip(logits) {
            if pending[s].is_empty() {
                let next = argmax(&row);
                out[s].0.push(row);
                out[s].1.push(next);
                pending[s] = vec![next];
            }
        }
    }
    out
}

/// `a` and `b` pick the same greedy tokens for the first `steps` tokens of
/// every prompt, with logits within 1e-3 (the same numbers, computed two ways).
fn same_greedy_computation(a: &LoadedModel, b: &LoadedModel, steps: usize) {
    for text in PROMPTS {
        let p = prompt(a, text);
        let (la, ta) = greedy(a, &p, steps);
        let (lb, tb) = greedy(b, &p, steps);
        assert_eq!(ta, tb, "{text}");
        for (x, y) in la.iter().zip(&lb) {
            assert!(max_diff(x, y) < 1e-3, "{text}: logits differ by {}", max_diff(x, y));
        }
    }
}

/// A directory that shares the converted files by link, with `config.json` replaced.
fn variant(name: &str, edit_config: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let (f32_dir, _, _) = dirs();
    let dir = work_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let _ = std::fs::remove_file(dir.join(file));
        std::os::unix::fs::symlink(f32_dir.join(file), dir.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f32_dir.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match load_hf_dir(dir, "broken", SparseMode::Auto) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_directories_get_one_clear_error_naming_the_file_and_tensor() {
    let _copies = RemovesCopiesWhenLast;
    let wrong_shape = variant("wrong-shape", |c| c["intermediate_size"] = 1535.into());
    let e = load_error(&wrong_shape);
    assert!(e.contains("model.safetensors") && e.contains("gate_proj.weight") && e.contains("1535"), "{e}");

    let unknown = variant("unknown-arch", |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        c["model_type"] = "gpt2".into();
    });
    let e = load_error(&unknown);
    assert!(e.contains("gpt2") && e.contains("config.json"), "{e}");

    let missing_shard = variant("missing-shard", |_| {});
    std::fs::rename(missing_shard.join("model.safetensors"), missing_shard.join("model-00001-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(missing_shard.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_error(&missing_shard);
    assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("missing"), "{e}");

    let truncated = variant("truncated", |_| {});
    let whole = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::remove_file(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &whole[..whole.len() / 3]).unwrap();
    let e = load_error(&truncated);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");

    let no_config = variant("no-config", |_| {});
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    let e = load_error(&no_config);
    assert!(e.contains("config.json"), "{e}");
}
