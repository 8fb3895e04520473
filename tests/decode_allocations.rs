//! A warm decode step on the CPU allocates nothing: the forward pass keeps
//! its buffers from step to step (issue 7). A counting global allocator sees
//! every allocation of this test binary, on every thread, so this file holds
//! one test only.
//!
//! Qwen2.5-0.5B runs when its file is fetched (`./models/fetch qwen2.5-0.5b`);
//! set TERSE_REQUIRE_QWEN=1 to make a missing file a failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use terse::engine::argmax;
use terse::model::{load_gguf, KvPrecision, SeqChunk, SeqKvCache, Transformer};

/// Counts allocations (and reallocations) while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn note() {
    if COUNTING.load(Ordering::SeqCst) {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Eight sequences, as eight streams would be: long enough prompts that
/// attention goes to the thread pool (as it does in service), short enough
/// that no KV cache doubles during the steps counted (64 positions first).
const SEQUENCES: usize = 8;
const WARM_STEPS: usize = 3;
const COUNTED_STEPS: usize = 4;

/// One step of every sequence, each fed its `next` token; returns the
/// allocations made during the step when `count`.
fn step(model: &Transformer, caches: &mut [SeqKvCache; SEQUENCES], next: &mut [u32; SEQUENCES], logits: &mut Vec<f32>, count: bool) -> usize {
    let fed = *next;
    let mut caches = caches.iter_mut();
    let mut chunks: [SeqChunk<'_>; SEQUENCES] =
        std::array::from_fn(|i| SeqChunk { tokens: std::slice::from_ref(&fed[i]), cache: caches.next().expect("one cache a sequence") });
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(count, Ordering::SeqCst);
    model.forward_into(&mut chunks, logits).expect("a step");
    let vocab = logits.len() / SEQUENCES;
    for (i, next) in next.iter_mut().enumerate() {
        *next = argmax(&logits[i * vocab..(i + 1) * vocab]);
    }
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn check(name: &str, precision: KvPrecision) {
    let path = terse::manifest::resolve_model(name).expect("model fetched").path;
    let mut loaded = load_gguf(&path, name).expect("model loads");
    loaded.transformer.set_kv_precision(precision);
    let model = &loaded.transformer;
    assert!(model.runs_on_host(), "f32 on the CPU runs on the host path");
    let mut caches: [SeqKvCache; SEQUENCES] = std::array::from_fn(|_| model.new_cache());
    let mut logits = Vec::new();
    // Prompts of 30 to 37 tokens, prefilled together.
    let prompts: Vec<Vec<u32>> = (0..SEQUENCES).map(|i| (0..30 + i as u32).map(|t| 100 + 7 * t + 13 * i as u32).collect()).collect();
    let mut next = [0u32; SEQUENCES];
    {
        let mut chunks: Vec<SeqChunk<'_>> = prompts.iter().zip(caches.iter_mut()).map(|(p, cache)| SeqChunk { tokens: p, cache }).collect();
        model.forward_into(&mut chunks, &mut logits).expect("prefill");
        let vocab = logits.len() / SEQUENCES;
        for (i, next) in next.iter_mut().enumerate() {
            *next = argmax(&logits[i * vocab..(i + 1) * vocab]);
        }
    }
    for _ in 0..WARM_STEPS {
        step(model, &mut caches, &mut next, &mut logits, false);
    }
    for s in 0..COUNTED_STEPS {
        let allocations = step(model, &mut caches, &mut next, &mut logits, true);
        assert_eq!(allocations, 0, "{name}, {precision:?} cache: decode step {s} after warm-up allocated {allocations} times");
    }
    assert!(caches.iter().all(|c| c.len() < 64), "no cache grew past its first capacity");
}

#[test]
fn a_warm_decode_step_allocates_nothing() {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    std::hint::black_box(vec![0u8; 16]);
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 1, "the counter sees an allocation");
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        check("smollm2-135m", precision);
    }
    if terse::manifest::resolve_model("qwen2.5-0.5b").is_ok() || std::env::var("TERSE_REQUIRE_QWEN").is_ok_and(|v| v == "1") {
        check("qwen2.5-0.5b", KvPrecision::F32);
    } else {
        eprintln!("qwen2.5-0.5b not fetched: checked SmolLM2 only");
    }
}
