//! Prefix caching on the real default model: on the host path, a prompt
//! whose start another sequence has computed takes that sequence's pages
//! (the very same ones) and computes only the rest, and its logits are the
//! same bits as a model without the cache gives; a pool too small for what
//! it has cached evicts the oldest idle pages and every answer stays right;
//! the tensor path (the GPU's, run on the CPU) shares pages and tokens too;
//! over HTTP, repeated requests (greedy, seeded sampling with a stop string,
//! a reasoning control) answer the same with and without the cache, and
//! report their cached prompt tokens.

mod common;

use common::*;
use serde_json::{json, Value};
use terse::engine::{argmax, EngineConfig};
use terse::model::{load_gguf, KvPrecision, SeqChunk, SeqKvCache, Transformer};

/// Positions per page (the pool's unit of caching).
const PAGE: usize = 64;

fn model(prefix_cache: bool, precision: KvPrecision) -> Transformer {
    let path = terse::manifest::resolve_model(MODEL).expect("model fetched").path;
    let mut loaded = load_gguf(&path, MODEL).expect("model loads");
    loaded.transformer.set_kv_precision(precision);
    loaded.transformer.set_prefix_cache(prefix_cache).expect("a new pool");
    assert!(loaded.transformer.runs_on_host());
    loaded.transformer
}

/// A prompt of `len` ordinary token ids, different for each `seed`.
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|t| 200 + (t * 7 + seed * 131) % 3000).collect()
}

/// Feed what `prompt` has past the cache's positions in chunks of `chunk`,
/// then `steps` greedy tokens; the logits of the prompt's last token and of
/// every decoded one.
fn run(model: &Transformer, cache: &mut SeqKvCache, prompt: &[u32], chunk: usize, steps: usize) -> Vec<Vec<f32>> {
    let mut logits = Vec::new();
    while cache.len() < prompt.len() {
        let end = (cache.len() + chunk).min(prompt.len());
        let tokens = &prompt[cache.len()..end];
        model.forward_into(&mut [SeqChunk { tokens, cache: &mut *cache }], &mut logits).expect("prefill");
    }
    let mut out = vec![logits.clone()];
    for _ in 0..steps {
        let next = argmax(&logits);
        model.forward_into(&mut [SeqChunk { tokens: &[next], cache: &mut *cache }], &mut logits).expect("decode");
        out.push(logits.clone());
    }
    out
}

/// Logits compared bit for bit; a failure names the first row and entry that differ.
#[track_caller]
fn assert_same_bits(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (row, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {row}'s length");
        if let Some(i) = g.iter().zip(w).position(|(a, b)| a.to_bits() != b.to_bits()) {
            panic!("{what}: row {row}, logit {i}: {} where {} was expected", g[i], w[i]);
        }
    }
}

#[test]
fn a_hit_shares_the_pages_and_gives_the_bits_of_computing_the_prompt() {
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        let plain = model(false, precision);
        let cached = model(true, precision);
        let p = prompt(1, 300);
        let want = run(&plain, &mut plain.new_cache_for(&p), &p, 512, 6);

        // The first sequence computes everything (in small chunks) and registers its full pages.
        let mut first = cached.new_cache_for(&p);
        assert_eq!(first.len(), 0, "nothing cached yet");
        assert_same_bits(&run(&cached, &mut first, &p, 64, 6), &want, &format!("{precision:?}: the first computation"));
        // Six decoded tokens made 306 positions: four full pages of the prompt are registered.
        let stats = cached.prefix_cache_stats().expect("the cache is on");
        assert_eq!(stats.cached_pages, 4);

        // The second holds the same four pages and computes only the last 44 positions.
        let mut second = cached.new_cache_for(&p);
        assert_eq!(second.len(), 4 * PAGE);
        let (a, b) = (first.host_pages().unwrap().pages(), second.host_pages().unwrap().pages());
        assert_eq!(a[..4], b[..4], "the very same pages");
        assert_same_bits(&run(&cached, &mut second, &p, 512, 6), &want, &format!("{precision:?}: a hit gives the same bits"));

        // A prompt that starts the same and goes on otherwise shares only the pages it agrees on.
        let mut other = p[..150].to_vec();
        other.extend(prompt(9, 100));
        // (Two whole pages, and the 22 rows of the third that agree, copied.)
        let mut third = cached.new_cache_for(&other);
        assert_eq!(third.len(), 150);
        let other_want = run(&plain, &mut plain.new_cache_for(&other), &other, 512, 4);

        // In a batch with an unrelated sequence, the hit still gives its own bits.
        let lone = prompt(5, 40);
        let lone_want = run(&plain, &mut plain.new_cache_for(&lone), &lone, 512, 0);
        let mut lone_cache = cached.new_cache_for(&lone);
        let mut logits = Vec::new();
        cached
            .forward_into(
                &mut [SeqChunk { tokens: &other[150..], cache: &mut third }, SeqChunk { tokens: &lone, cache: &mut lone_cache }],
                &mut logits,
            )
            .expect("a batched step");
        let vocab = logits.len() / 2;
        assert_same_bits(&[logits[..vocab].to_vec()], &other_want[..1], &format!("{precision:?}: a hit batched"));
        assert_same_bits(&[logits[vocab..].to_vec()], &lone_want, &format!("{precision:?}: its neighbour"));
        let stats = cached.prefix_cache_stats().unwrap();
        assert_eq!(stats.hit_tokens, 4 * PAGE as u64 + 150);
        assert_eq!(stats.queried_tokens, (300 + 300 + 250 + 40) as u64);
    }
}

#[test]
fn a_tiny_pool_evicts_the_oldest_idle_pages_and_keeps_every_answer_right() {
    let plain = model(false, KvPrecision::F32);
    let cached = model(true, KvPrecision::F32);
    // Room for 8 pages: two 200-token prompts (4 pages each) fill it.
    let page_bytes = cached.kv_bytes_per_token() * PAGE as u64;
    cached.set_kv_capacity(7 * page_bytes, 1);
    let prompts: Vec<Vec<u32>> = (0..4).map(|seed| prompt(seed, 200)).collect();
    let want: Vec<_> = prompts.iter().map(|p| run(&plain, &mut plain.new_cache_for(p), p, 512, 3)).collect();
    // Round after round over four prompts, one at a time: each round evicts what the next needs.
    let mut hits = 0;
    for round in 0..3 {
        for (i, p) in prompts.iter().enumerate() {
            let mut cache = cached.new_cache_for(p);
            hits += usize::from(!cache.is_empty());
            assert_same_bits(&run(&cached, &mut cache, p, 128, 3), &want[i], &format!("round {round}, prompt {i}"));
        }
        // The same prompt right after itself always hits.
        let mut again = cached.new_cache_for(&prompts[3]);
        assert_eq!(again.len(), 199, "round {round}: the last prompt is still cached, all but its last token");
        assert_same_bits(&run(&cached, &mut again, &prompts[3], 128, 3), &want[3], "the last prompt again");
    }
    let stats = cached.prefix_cache_stats().unwrap();
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.pool_bytes <= 8 * page_bytes, "the pool stayed within its capacity: {stats:?}");
    assert_eq!(stats.held_bytes, 0, "every cache was dropped");
    eprintln!("{hits} hits among 12 sequences of four prompts; {stats:?}");
}

/// The tensor path under a tiny budget: its pool stops doubling at the
/// capacity, evicts the oldest idle pages, and every greedy answer stays the
/// one computed without a cache.
#[test]
fn the_tensor_paths_pool_evicts_within_its_capacity_and_answers_stay_right() {
    let plain = model(false, KvPrecision::F32).into_tensor_path().expect("tensor path");
    let cached = model(true, KvPrecision::F32).into_tensor_path().expect("tensor path");
    let page_bytes = cached.kv_bytes_per_token() * PAGE as u64;
    cached.set_kv_capacity(7 * page_bytes, 1);
    let prompts: Vec<Vec<u32>> = (0..4).map(|seed| prompt(seed + 20, 200)).collect();
    let tokens = |rows: &[Vec<f32>]| rows.iter().map(|l| argmax(l)).collect::<Vec<_>>();
    let want: Vec<_> = prompts.iter().map(|p| tokens(&run(&plain, &mut plain.new_cache_for(p), p, 512, 3))).collect();
    for round in 0..2 {
        for (i, p) in prompts.iter().enumerate() {
            let mut cache = cached.new_cache_for(p);
            assert_eq!(tokens(&run(&cached, &mut cache, p, 128, 3)), want[i], "round {round}, prompt {i}");
        }
    }
    let stats = cached.prefix_cache_stats().unwrap();
    assert!(stats.evictions > 0, "{stats:?}");
    // The pool starts at 16 pages and never grows past them: 8 pages are all a sequence needs here.
    assert!(stats.pool_bytes <= 16 * page_bytes, "{stats:?}");
    assert_eq!(stats.held_bytes, 0, "every cache was dropped");
}

/// A chat's next turn: the last, partly written page of a finished sequence
/// is kept, and a prompt that goes on from its tokens (the prompt, the reply
/// it decoded, then more) copies the rows they share; the rest computes to
/// the same bits as without a cache.
#[test]
fn a_next_turn_continues_from_the_last_page_of_the_finished_one() {
    for precision in [KvPrecision::F32, KvPrecision::F16] {
        let plain = model(false, precision);
        let cached = model(true, precision);
        let first_turn = prompt(2, 100);
        let mut first = cached.new_cache_for(&first_turn);
        let reply: Vec<u32> = run(&cached, &mut first, &first_turn, 512, 5).iter().map(|l| argmax(l)).collect();
        drop(first);
        // The first turn's 100 prompt positions and 4 of its reply's 5 tokens were written.
        let mut next_turn = first_turn.clone();
        next_turn.extend(&reply[..4]);
        next_turn.extend(prompt(8, 30));
        let mut second = cached.new_cache_for(&next_turn);
        assert_eq!(second.len(), 104, "{precision:?}: the whole first turn is reused");
        let want = run(&plain, &mut plain.new_cache_for(&next_turn), &next_turn, 512, 4);
        assert_same_bits(&run(&cached, &mut second, &next_turn, 512, 4), &want, &format!("{precision:?}: the same bits"));
        // A prompt that leaves the first turn's tokens mid-page copies only the rows they agree on.
        let mut elsewhere = first_turn[..80].to_vec();
        elsewhere.extend(prompt(4, 20));
        let mut third = cached.new_cache_for(&elsewhere);
        assert_eq!(third.len(), 80);
        let want = run(&plain, &mut plain.new_cache_for(&elsewhere), &elsewhere, 512, 3);
        assert_same_bits(&run(&cached, &mut third, &elsewhere, 512, 3), &want, &format!("{precision:?}: a copy mid-page"));
    }
}

/// The GPU's path, run on the CPU: a hit holds the same pool pages and
/// decodes the same tokens; its logits agree within the tensor path's own
/// chunking tolerance (its matrix products are blocked by the row count, so
/// computing fewer rows need not give the same bits).
#[test]
fn the_tensor_path_shares_pages_too_and_decodes_the_same_tokens() {
    let plain = model(false, KvPrecision::F32).into_tensor_path().expect("tensor path");
    let cached = model(true, KvPrecision::F32).into_tensor_path().expect("tensor path");
    assert!(cached.pooled_kv() && cached.prefix_cache() && !plain.prefix_cache());
    let p = prompt(3, 230);
    let want = run(&plain, &mut plain.new_cache_for(&p), &p, 512, 8);
    let mut first = cached.new_cache_for(&p);
    assert_eq!(first.len(), 0);
    run(&cached, &mut first, &p, 512, 8);
    let mut second = cached.new_cache_for(&p);
    assert_eq!(second.len(), 3 * PAGE, "three full pages of the prompt are cached");
    let (a, b) = (first.pages_mut().unwrap().pages().to_vec(), second.pages_mut().unwrap().pages().to_vec());
    assert_eq!(a[..3], b[..3], "the very same pool pages");
    let got = run(&cached, &mut second, &p, 512, 8);
    let tokens = |rows: &[Vec<f32>]| rows.iter().map(|l| argmax(l)).collect::<Vec<_>>();
    assert_eq!(tokens(&got), tokens(&want), "the same greedy tokens");
    for (g, w) in got.iter().zip(&want) {
        let diff = g.iter().zip(w).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-3, "logits within 1e-3 of computing the whole prompt: {diff}");
    }
    let stats = cached.prefix_cache_stats().unwrap();
    assert_eq!((stats.hit_tokens, stats.queried_tokens), (3 * PAGE as u64, 2 * 230));
    drop((first, second));
    assert_eq!(cached.prefix_cache_stats().unwrap().held_bytes, 0, "dropped caches hold nothing");
    // The three full pages, and one tail: the second's last page held what the first's did.
    assert_eq!(cached.prefix_cache_stats().unwrap().cached_pages, 4, "the prompt's pages stay cached, idle");
}

fn chat(prompt: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": 24,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A system prompt of a few pages, as agents send before every turn.
const SYSTEM: &str = "You are a careful assistant for a shipping company. Answer in plain words, \
name the document a rule comes from, never invent tracking numbers, and say when you are unsure. \
Parcels above 30 kg go by freight; below it by courier. Returns within 14 days are free for \
members and cost 4 euros otherwise. Customs forms are needed outside the union. Damaged goods \
are reported with a photo within 48 hours. Opening hours are 8 to 18 on weekdays and 9 to 13 on \
Saturdays. Holidays follow the national calendar. Refunds take up to ten working days and go \
back to the card that paid. Addresses can change until the parcel leaves the depot.";

#[tokio::test]
async fn repeated_requests_answer_the_same_with_and_without_the_cache() {
    let on = TestServer::start(EngineConfig::default());
    let off = TestServer::start(EngineConfig { prefix_cache: false, ..EngineConfig::default() });
    let requests = [
        chat("When do refunds arrive?", json!({})),
        chat("Tell me about returns.", json!({"temperature": 0.9, "seed": 17, "stop": ["."]})),
        chat("Describe customs.", json!({"max_tokens": 64, "reasoning": {"strategy": "ts", "stop_temperature": 4.0}})),
    ];
    for (i, body) in requests.iter().enumerate() {
        let reference = post_json(&off.url(CHAT), body).await;
        assert_eq!(reference.status, 200, "{}", reference.json);
        assert_eq!(reference.json["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "no cache, nothing cached");
        for turn in 0..2 {
            let r = post_json(&on.url(CHAT), body).await;
            assert_eq!(r.status, 200, "{}", r.json);
            for field in ["content", "finish_reason"] {
                let (got, want) = (&r.json["choices"][0], &reference.json["choices"][0]);
                let (got, want) = if field == "content" { (&got["message"]["content"], &want["message"]["content"]) } else { (&got[field], &want[field]) };
                assert_eq!(got, want, "request {i}, turn {turn}: {field}");
            }
            assert_eq!(r.json["usage"]["completion_tokens"], reference.json["usage"]["completion_tokens"]);
            assert_eq!(r.json["terse"], reference.json["terse"], "request {i}, turn {turn}: the reasoning record");
            let cached = r.json["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
            let prompt_tokens = r.json["usage"]["prompt_tokens"].as_u64().unwrap();
            if turn == 1 {
                // The same request again: everything but the last token (whose logits are needed) is reused.
                assert_eq!(cached, prompt_tokens - 1, "request {i}, turn {turn}");
            } else if i > 0 {
                // The system prompt's pages were cached by the first request.
                assert!(cached >= PAGE as u64 && cached < prompt_tokens, "request {i}, turn {turn}: {cached} of {prompt_tokens} cached");
            }
        }
    }
    let text = metrics_text(&on).await;
    let hits = metric_value(&text, "terse_prefix_cache_hit_tokens_total").unwrap();
    let queried = metric_value(&text, "terse_prefix_cache_queried_tokens_total").unwrap();
    assert!(hits > 0.0 && hits < queried, "{hits} of {queried}");
    assert!(metric_value(&text, "terse_prefix_cache_pages").unwrap() > 0.0);
    // Once the engine has taken in that the last sequence ended, it holds no page.
    let mut held = None;
    for _ in 0..200 {
        held = metric_value(&metrics_text(&on).await, "terse_kv_cache_held_bytes");
        if held == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(held, Some(0.0), "nothing runs");
    let off_text = metrics_text(&off).await;
    assert_eq!(metric_value(&off_text, "terse_prefix_cache_queried_tokens_total"), Some(0.0));
    on.shutdown_and_wait().unwrap();
    off.shutdown_and_wait().unwrap();
}
