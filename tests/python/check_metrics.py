"""Parse terse's /metrics with the official Prometheus text-format parser.

Usage: check_metrics.py URL   (exits non-zero when a check fails)
"""
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# Family names as the parser reports them (counters without `_total`).
EXPECTED = {
    "terse_requests": "counter",
    "terse_request_duration_seconds": "histogram",
    "terse_time_to_first_token_seconds": "histogram",
    "terse_time_per_output_token_seconds": "histogram",
    "terse_prompt_tokens": "counter",
    "terse_completion_tokens": "counter",
    "terse_queue_depth": "gauge",
    "terse_running_sequences": "gauge",
    "terse_batch_size": "histogram",
    "terse_engine_step_seconds": "histogram",
    "terse_kv_cache_used_bytes": "gauge",
    "terse_kv_cache_budget_bytes": "gauge",
    "terse_model_info": "gauge",
    "terse_model_weight_bytes": "gauge",
}


def main(url: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as resp:
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode("utf-8")
    assert content_type.startswith("text/plain; version=0.0.4"), content_type

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert name in families, f"missing family {name}; have {sorted(families)}"
        assert families[name].type == kind, f"{name} is a {families[name].type}, expected {kind}"
    for f in families.values():
        assert f.documentation, f"{f.name} has no HELP text"

    requests = [
        s for s in families["terse_requests"].samples
        if s.name == "terse_requests_total" and s.labels.get("status") == "200"
    ]
    assert requests and sum(s.value for s in requests) >= 1, "no successful request counted"
    for s in requests:
        assert set(s.labels) == {"model", "endpoint", "mode", "status"}, s.labels
    ttft = [s for s in families["terse_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and sum(s.value for s in ttft) >= 1, "no time-to-first-token observed"
    phases = {s.labels["phase"]: s.value for s in families["terse_engine_step_seconds"].samples if s.name.endswith("_count")}
    assert set(phases) == {"forward", "pick", "deliver"} and min(phases.values()) >= 1, phases
    info = families["terse_model_info"].samples
    assert info and info[0].value == 1 and info[0].labels.get("arch"), info
    assert info[0].labels.get("device") == "cpu", info
    assert families["terse_model_weight_bytes"].samples[0].value > 0
    assert families["terse_kv_cache_budget_bytes"].samples[0].value > 0

    print(f"ok: {len(families)} metric families parsed")


if __name__ == "__main__":
    main(sys.argv[1])
