//! Reasoning control over real HTTP on the real default model. SmolLM2 has no
//! think tokens, so its whole response is the controlled phase: TS raises the
//! end-of-turn probability, budget forcing appends the wrap-up text.

mod common;

use common::*;
use serde_json::{json, Value};
use terse::engine::EngineConfig;

const PROMPTS: [&str; 5] = [
    "Tell me about the history of Rome.",
    "Explain how a steam engine works.",
    "Write a short story about a lost cat.",
    "What are the benefits of exercise?",
    "Describe the water cycle.",
];

fn body(prompt: &str, reasoning: Option<Value>) -> Value {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 128,
        "temperature": 0,
    });
    if let Some(r) = reasoning {
        b["reasoning"] = r;
    }
    b
}

async fn ask(server: &TestServer, body: &Value) -> Value {
    let r = post_json(&server.url(CHAT), body).await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

fn completion_tokens(reply: &Value) -> u64 {
    reply["usage"]["completion_tokens"].as_u64().unwrap()
}

/// Sum of the samples of `name` whose labels include every pair in `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One server for this file: several engines in one process on two cores
/// would only fight over the cores.
fn server() -> &'static TestServer {
    static SERVER: std::sync::OnceLock<TestServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(EngineConfig::default()))
}

#[tokio::test]
async fn ts_shortens_answers_and_tau_one_changes_nothing() {
    let server = server();
    let (mut base_total, mut ts_total) = (0, 0);
    for prompt in PROMPTS {
        let base = ask(server, &body(prompt, None)).await;
        let tau_one = ask(server, &body(prompt, Some(json!({"strategy": "ts", "stop_temperature": 1.0})))).await;
        assert_eq!(base["choices"][0]["message"]["content"], tau_one["choices"][0]["message"]["content"], "τ = 1 changes nothing");
        assert_eq!(completion_tokens(&base), completion_tokens(&tau_one));
        let ts = ask(server, &body(prompt, Some(json!({"strategy": "ts", "stop_temperature": 4.0})))).await;
        if ts["choices"][0]["finish_reason"] == "stop" && completion_tokens(&ts) < completion_tokens(&base) {
            assert_eq!(ts["terse"]["think_stop_reason"], "stop_temperature", "{ts}");
        }
        assert_eq!(ts["usage"]["completion_tokens_details"]["reasoning_tokens"], 0, "no think block in SmolLM2");
        assert_eq!(ts["terse"]["answer_tokens"].as_u64().unwrap(), completion_tokens(&ts));
        base_total += completion_tokens(&base);
        ts_total += completion_tokens(&ts);
    }
    eprintln!("mean completion tokens: τ=1 {:.1}, τ=4 {:.1}", base_total as f64 / 5.0, ts_total as f64 / 5.0);
    assert!(ts_total < base_total, "TS at τ = 4 must shorten answers: {ts_total} vs {base_total} tokens");
}

#[tokio::test]
async fn budget_forcing_wraps_up_at_the_cap_and_metrics_count_it_exactly() {
    let server = server();
    // The `long` label is this test's alone, so the other tests' requests do not
    // move the series it counts.
    let before = metrics_text(server).await;
    let mut sums = [0u64; 3]; // answer, forced, reasoning
    for prompt in &PROMPTS[..3] {
        let mut b = body(prompt, Some(json!({"max_thinking_tokens": 8})));
        b["reasoning_effort"] = json!("long");
        let reply = ask(server, &b).await;
        let t = &reply["terse"];
        assert_eq!(t["think_stop_reason"], "budget", "{reply}");
        assert_eq!(t["mode"], "long");
        let forced = t["forced_tokens"].as_u64().unwrap();
        assert!(forced > 0, "the wrap-up text is injected: {reply}");
        let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.contains("\nFinal answer:"), "the wrap-up text is part of the answer: {content:?}");
        // 8 tokens, the wrap-up, then at most 64 tokens (the default allowance).
        let total = completion_tokens(&reply);
        assert!(total <= 8 + forced + 64, "{total} tokens");
        assert_eq!(t["answer_tokens"].as_u64().unwrap(), total);
        sums[0] += t["answer_tokens"].as_u64().unwrap();
        sums[1] += forced;
        sums[2] += t["thinking_tokens"].as_u64().unwrap();
    }
    let after = metrics_text(server).await;
    let labels = [("model", MODEL), ("mode", "long")];
    let delta = |name: &str| metric_sum(&after, name, &labels) - metric_sum(&before, name, &labels);
    assert_eq!(delta("terse_answer_tokens_total"), sums[0] as f64);
    assert_eq!(delta("terse_forced_tokens_total"), sums[1] as f64);
    let by_kind = |kind: &str| {
        let labels = [("model", MODEL), ("mode", "long"), ("kind", kind)];
        metric_sum(&after, "terse_forced_tokens_total", &labels) - metric_sum(&before, "terse_forced_tokens_total", &labels)
    };
    assert_eq!(by_kind("end_of_thinking"), sums[1] as f64, "the budget's wrap-up");
    assert_eq!(by_kind("continuation"), 0.0);
    assert_eq!(delta("terse_reasoning_tokens_total"), sums[2] as f64);
    assert_eq!(delta("terse_answer_tokens_per_request_count"), 3.0);
    let stops = |t: &str| metric_sum(t, "terse_think_stops_total", &[("model", MODEL), ("mode", "long"), ("reason", "budget")]);
    assert_eq!(stops(&after) - stops(&before), 3.0);
}

#[tokio::test]
async fn streamed_and_whole_answers_agree_under_control() {
    let server = server();
    for reasoning in [json!({"strategy": "ts", "stop_temperature": 3.0}), json!({"max_thinking_tokens": 6})] {
        let mut b = body(PROMPTS[1], Some(reasoning.clone()));
        let whole = ask(server, &b).await;
        b["stream"] = json!(true);
        let (status, chunks) = post_sse(&server.url(CHAT), &b).await;
        assert_eq!(status, 200);
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
            .collect();
        assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap(), "{reasoning}");
        let last = chunks.iter().rev().find(|c| c.get("terse").is_some()).expect("a chunk carries `terse`");
        assert_eq!(last["terse"], whole["terse"], "{reasoning}");
    }
}

fn prompt_tokens(reply: &Value) -> u64 {
    reply["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn modes_apply_the_manifest_presets_and_request_fields_override_them() {
    let server = server();
    let (mut base_total, mut short_total) = (0, 0);
    for prompt in PROMPTS {
        let base = ask(server, &body(prompt, None)).await;
        assert_eq!(base["terse"]["mode"], "default");
        let mut b = body(prompt, None);
        b["reasoning_effort"] = json!("short");
        let short = ask(server, &b).await;
        assert_eq!(short["terse"]["mode"], "short");
        assert!(prompt_tokens(&short) > prompt_tokens(&base), "short's level prompt joins the user turn");
        base_total += completion_tokens(&base);
        short_total += completion_tokens(&short);

        // `none`: SmolLM2 cannot stop thinking, so it is the uncontrolled answer.
        b["reasoning_effort"] = json!("none");
        let none = ask(server, &b).await;
        assert_eq!(none["terse"]["mode"], "none");
        assert_eq!(prompt_tokens(&none), prompt_tokens(&base));
        assert_eq!(none["choices"][0]["message"]["content"], base["choices"][0]["message"]["content"]);
    }
    eprintln!("mean completion tokens: default {:.1}, short {:.1}", base_total as f64 / 5.0, short_total as f64 / 5.0);
    assert!(short_total < base_total, "short answers are shorter: {short_total} vs {base_total} tokens");

    // The request's own fields win over the preset (short is TS; here a cap of 4).
    let mut b = body(PROMPTS[0], Some(json!({"strategy": "budget", "max_thinking_tokens": 4})));
    b["reasoning_effort"] = json!("low");
    let capped = ask(server, &b).await;
    assert_eq!(capped["terse"]["mode"], "short", "low is short's alias");
    assert_eq!(capped["terse"]["think_stop_reason"], "budget", "{capped}");

    // A minimum above the preset's budget is the request's mistake.
    let mut b = body(PROMPTS[0], Some(json!({"min_thinking_tokens": 100})));
    b["reasoning_effort"] = json!("short");
    let reply = post_json(&server.url(CHAT), &b).await;
    let error = assert_openai_error(&reply, 400);
    assert_eq!(error["param"], "reasoning.min_thinking_tokens", "{error}");
}

#[tokio::test]
async fn a_client_leaving_mid_thought_counts_as_a_cancelled_stop() {
    let server = server();
    // `medium` is this test's alone among the tests of this file.
    let labels = [("model", MODEL), ("mode", "medium"), ("reason", "cancelled")];
    let before = metric_sum(&metrics_text(server).await, "terse_think_stops_total", &labels);
    let mut b = body(PROMPTS[2], None);
    b["reasoning_effort"] = json!("medium");
    b["stream"] = json!(true);
    b["max_tokens"] = json!(512);
    let mut response = client().post(server.url(CHAT)).json(&b).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    drop(response);
    // The server notices at its next write; wait for the record (bounded, not timed).
    let mut after = before;
    for _ in 0..600 {
        after = metric_sum(&metrics_text(server).await, "terse_think_stops_total", &labels);
        if after > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(after - before, 1.0, "one cancelled stop for mode medium");
}

#[tokio::test]
async fn greedy_choice_on_the_device_path_gives_the_host_paths_tokens() {
    // On the CPU `auto` keeps the host path; `on` takes the path a GPU takes:
    // argmax and TS reduced where the logits are, a few numbers copied out.
    let device_path = TestServer::start(EngineConfig { pick_on_device: terse::engine::PickOnDevice::On, ..EngineConfig::default() });
    let mut bodies = vec![
        body(PROMPTS[0], None),
        // Settings under which these prompts end by TS well within 48 tokens
        // (at 16 and 34 tokens when written), so TS is exercised.
        body(PROMPTS[1], Some(json!({"strategy": "ts", "stop_temperature": 8}))),
        body(PROMPTS[0], Some(json!({"strategy": "ts", "stop_temperature": 8, "ramp": true, "max_thinking_tokens": 16}))),
        body(PROMPTS[3], Some(json!({"strategy": "budget", "max_thinking_tokens": 12}))),
    ];
    // Rows the host still samples, in the same steps as the device's rows.
    let mut sampled = body(PROMPTS[4], Some(json!({"strategy": "ts", "stop_temperature": 2})));
    sampled["temperature"] = json!(0.8);
    sampled["seed"] = json!(5);
    let mut penalised = body(PROMPTS[0], None);
    penalised["frequency_penalty"] = json!(0.5);
    bodies.extend([sampled, penalised]);
    for b in bodies.iter_mut() {
        b["max_tokens"] = json!(48);
    }
    let on_device = futures::future::join_all(bodies.iter().map(|b| ask(&device_path, b))).await;
    for (b, got) in bodies.iter().zip(&on_device) {
        let want = ask(server(), b).await;
        {
            let field = "content";
            assert_eq!(got["choices"][0]["message"][field], want["choices"][0]["message"][field], "{b}");
        }
        assert_eq!(got["terse"], want["terse"], "{b}");
        assert_eq!(usage_counts(&got["usage"]), usage_counts(&want["usage"]), "{b}");
    }
    let ts_stops = on_device.iter().filter(|r| r["terse"]["think_stop_reason"] == "stop_temperature").count();
    assert!(ts_stops >= 1, "no request ended by TS: the device path's TS went untested: {on_device:?}");
}

fn content(reply: &Value) -> &str {
    reply["choices"][0]["message"]["content"].as_str().unwrap()
}

fn terse_count(reply: &Value, field: &str) -> u64 {
    reply["terse"][field].as_u64().unwrap_or_else(|| panic!("terse.{field} in {reply}"))
}

/// Every probe request of this file is here, so the probe metrics' deltas are its own.
#[tokio::test]
async fn answer_probes_are_rolled_back_unseen_and_counted_exactly() {
    let server = server();
    let before = metrics_text(server).await;
    let mut probe_replies = Vec::new();
    // Probes that never come (the interval is past max_tokens) change nothing.
    let plain = ask(server, &body(PROMPTS[3], Some(json!({"strategy": "none"})))).await;
    let never = ask(server, &body(PROMPTS[3], Some(json!({"strategy": "probe", "probe_interval": 1000})))).await;
    assert_eq!(content(&never), content(&plain));
    assert_eq!((terse_count(&never, "probe_tokens"), terse_count(&never, "probes")), (0, 0));
    // Probes that come but never settle leave the same text, token for token.
    let unsettled = json!({"strategy": "probe", "probe_interval": 8, "probe_tokens": 4, "probe_agreement": 16});
    let probed = ask(server, &body(PROMPTS[3], Some(unsettled))).await;
    assert_eq!(content(&probed), content(&plain), "a rolled-back probe leaves no trace");
    assert_eq!(completion_tokens(&probed), completion_tokens(&plain), "nor in the usage");
    let made = completion_tokens(&plain).saturating_sub(1) / 8;
    assert!(made >= 2, "enough tokens for probes: {plain}");
    assert_eq!(terse_count(&probed, "probes"), made, "one probe every 8 tokens: {probed}");
    assert!(terse_count(&probed, "probe_tokens") > made * 4, "{probed}");
    assert_eq!(probed["terse"]["think_stop_reason"], plain["terse"]["think_stop_reason"]);
    // So do probes before reflection words (here the reply's common words).
    let words = json!(["The", "This", "It", "In", "A", "Exercise"]);
    let at_words = json!({"strategy": "probe", "probe_at": "reflection", "probe_words": words, "probe_interval": 1, "probe_tokens": 4, "probe_agreement": 16});
    let reflected = ask(server, &body(PROMPTS[3], Some(at_words))).await;
    assert_eq!(content(&reflected), content(&plain), "a held word is taken in after its probe");
    assert_eq!(completion_tokens(&reflected), completion_tokens(&plain));
    assert!(terse_count(&reflected, "probes") >= 2, "{reflected}");
    probe_replies.extend([never, probed, reflected]);
    // A settled probe before a reflection word ends the reply there: the
    // word is dropped and the wrap-up said in its place.
    let question = |reasoning: Value| {
        json!({
            "model": MODEL, "max_tokens": 128, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 7 times 6?"}], "reasoning": reasoning,
        })
    };
    let unprobed = ask(server, &question(json!({"strategy": "none"}))).await;
    let unprobed = content(&unprobed);
    let words = ["The", "So", "Therefore"];
    let settled = ask(server, &question(json!({"strategy": "probe", "probe_at": "reflection", "probe_words": words, "probe_interval": 1, "probe_agreement": 1}))).await;
    assert_eq!(settled["terse"]["think_stop_reason"], "probe", "{settled}");
    let said = content(&settled);
    let cut = said.find("\nFinal answer:").unwrap_or_else(|| panic!("the wrap-up is forced: {said:?}"));
    assert!(unprobed.starts_with(&said[..cut]), "the reply up to the probe is the unprobed one: {said:?} / {unprobed:?}");
    let next = unprobed[cut..].trim_start();
    assert!(words.iter().any(|w| next.starts_with(w)), "where a reflection word came next: {next:?}");
    probe_replies.push(settled);
    // A probe whose first answer counts ends the reply with the wrap-up, streamed or not alike.
    let mut settles = json!({
        "model": MODEL, "max_tokens": 128, "temperature": 0,
        "messages": [{"role": "user", "content": "What is 7 times 6?"}],
        "reasoning": {"strategy": "probe", "probe_interval": 8, "probe_agreement": 1},
    });
    let whole = ask(server, &settles).await;
    assert_eq!(whole["terse"]["think_stop_reason"], "probe", "{whole}");
    assert!(content(&whole).contains("\nFinal answer:"), "the wrap-up is forced at exit: {whole}");
    assert!(terse_count(&whole, "forced_tokens") > 0);
    settles["stream"] = json!(true);
    let (status, chunks) = post_sse(&server.url(CHAT), &settles).await;
    assert_eq!(status, 200);
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(text, content(&whole));
    let streamed = chunks.iter().rev().find(|c| c.get("terse").is_some()).expect("a chunk carries `terse`").clone();
    assert_eq!(streamed["terse"], whole["terse"]);
    probe_replies.extend([whole, streamed]);

    let after = metrics_text(server).await;
    let delta = |name: &str, labels: &[(&str, &str)]| metric_sum(&after, name, labels) - metric_sum(&before, name, labels);
    let sum = |field: &str| probe_replies.iter().map(|r| terse_count(r, field)).sum::<u64>() as f64;
    assert_eq!(delta("terse_probe_tokens_total", &[("model", MODEL)]), sum("probe_tokens"));
    assert_eq!(delta("terse_probes_total", &[("model", MODEL)]), sum("probes"));
    assert_eq!(delta("terse_probes_total", &[("model", MODEL), ("outcome", "settled")]), 3.0);
    assert_eq!(delta("terse_think_stops_total", &[("model", MODEL), ("reason", "probe")]), 3.0);
}

#[tokio::test]
async fn wrap_up_turns_a_stop_ts_made_into_a_short_answer() {
    let server = server();
    let ts = json!({"strategy": "ts", "stop_temperature": 4.0});
    let wrap = json!({"strategy": "ts", "stop_temperature": 4.0, "wrap_up": true});
    let mut wrapped_some = false;
    for prompt in PROMPTS {
        let cut = ask(server, &body(prompt, Some(ts.clone()))).await;
        let wrapped = ask(server, &body(prompt, Some(wrap.clone()))).await;
        if cut["terse"]["think_stop_reason"] != "stop_temperature" {
            // The model stopped on its own, or ran out of tokens: wrap_up has nothing to do.
            assert_eq!(content(&wrapped), content(&cut), "{prompt}");
            continue;
        }
        wrapped_some = true;
        assert_eq!(wrapped["terse"]["think_stop_reason"], "stop_temperature");
        let text = content(&wrapped);
        assert!(text.starts_with(content(&cut)), "the same reply up to TS's stop: {text:?}");
        assert!(text[content(&cut).len()..].starts_with("\nFinal answer:"), "then the wrap-up: {text:?}");
        assert!(terse_count(&wrapped, "forced_tokens") > 0);
        assert!(completion_tokens(&wrapped) <= completion_tokens(&cut) + terse_count(&wrapped, "forced_tokens") + 64);
    }
    assert!(wrapped_some, "TS at τ = 4 made at least one stop on these prompts");
    // A client naming `wrap_up` without TS is told so.
    let r = post_json(&server.url(CHAT), &body(PROMPTS[0], Some(json!({"strategy": "budget", "max_thinking_tokens": 8, "wrap_up": true})))).await;
    assert_eq!(assert_openai_error(&r, 400)["param"], "reasoning.wrap_up");
}
