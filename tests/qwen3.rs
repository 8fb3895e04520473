//! A Qwen3 file served without a manifest: random weights in a small Qwen3
//! layout (q/k norms, a head size that is not hidden / heads) with the real
//! Qwen3 tokenizer and thinking template (`./models/fetch qwen3-tokenizer`).
//! terse must load the architecture, detect the model's thinking from the
//! file, say so in `/v1/models`, and honour the template's thinking switch.

mod common;

use common::*;
use serde_json::json;
use terse::model::{write_random_gguf, Arch, SyntheticSpec};

const NAME: &str = "qwen3-tiny";

/// A tiny Qwen3 file of the test's own (`name`), so tests do not share one.
fn tiny_qwen3(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("terse-qwen3");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let tokenizer = terse::manifest::models_dir().join("cache/qwen3-tokenizer/tokenizer.json");
    assert!(tokenizer.is_file(), "run ./models/fetch qwen3-tokenizer");
    let spec = SyntheticSpec { arch: Arch::Qwen3, head_dim: 32, seed: 3, ..SyntheticSpec::tiny_qwen2(151_936) };
    write_random_gguf(&path, &spec, &tokenizer).unwrap();
    path
}

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({
        "model": NAME,
        "messages": [{"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn a_qwen3_file_without_a_manifest_is_served_with_its_thinking_detected() {
    let path = tiny_qwen3("served");
    let server = TestServer::start_with(|c| {
        c.model_path = path.clone();
        c.served_name = NAME.into();
        c.engine.reasoning = terse::reasoning::profile::ReasoningProfile::default();
    });
    let models = get(&server.url("/v1/models")).await;
    let details = &models.json["data"][0]["terse"];
    assert_eq!(details["arch"], "qwen3", "{details}");
    let reasoning = &details["reasoning"];
    assert_eq!(reasoning["source"], "detected", "{details}");
    assert_eq!((reasoning["think_open"].as_str(), reasoning["think_close"].as_str()), (Some("<think>"), Some("</think>")));
    assert_eq!(reasoning["thinking_by_default"], true);

    // Thinking on: the random model does not open a thought, but it is served.
    let on = post_json(&server.url(CHAT), &chat(json!({}))).await;
    assert_eq!(on.status, 200, "{}", on.json);
    assert_eq!(on.json["usage"]["completion_tokens"], 8, "{}", on.json);

    // `none` renders the template with enable_thinking=false: the thought is
    // closed in the prompt, so everything generated is answer.
    let off = post_json(&server.url(CHAT), &chat(json!({"reasoning_effort": "none"}))).await;
    assert_eq!(off.status, 200, "{}", off.json);
    assert_eq!(off.json["terse"]["mode"], "none");
    assert_eq!(off.json["terse"]["thinking_tokens"], 0, "{}", off.json);
    assert_eq!(off.json["terse"]["answer_tokens"], 8, "{}", off.json);
    assert_eq!(off.json["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
    server.shutdown_and_wait().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// The same Qwen3 as a Hugging Face directory (`terse convert`, f32) computes
/// what its GGUF computes: `Qwen3ForCausalLM`'s q/k norms are read.
#[test]
fn a_qwen3_hugging_face_directory_computes_what_its_gguf_computes() {
    use terse::model::{convert_gguf_to_hf, load_gguf, load_hf_dir, SeqChunk, SparseMode};
    let path = tiny_qwen3("converted");
    let dir = path.with_extension("hf");
    let _ = std::fs::remove_dir_all(&dir);
    convert_gguf_to_hf(&path, &dir, candle_core::DType::F32).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("Qwen3ForCausalLM"), "{config}");
    let gguf = load_gguf(&path, NAME).unwrap();
    let (hf, _) = load_hf_dir(&dir, NAME, SparseMode::Off).unwrap();
    let prompt = gguf.tokenizer.encode("What is the capital of France?").unwrap();
    let logits = |m: &terse::model::Transformer| {
        let mut cache = m.new_cache();
        m.forward(&mut [SeqChunk { tokens: &prompt, cache: &mut cache }]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(&gguf.transformer), logits(&hf.transformer));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "logits differ by {diff}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&path);
}
