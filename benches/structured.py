#!/usr/bin/env python3
"""Decode speed with a JSON-schema grammar against without, side by side in one run.

    cargo build --release
    python3 benches/structured.py                        # qwen2.5-0.5b, 3 rounds, 1 and 8 streams
    python3 benches/structured.py smollm2-135m --rounds 5

One terse server. Each round, at each concurrency, C streamed chat requests
(greedy, 128 tokens at most) run without a grammar, then with
`response_format: json_schema` (a list of twelve short strings, so the answer
runs to the token limit like the free one), alternating which goes first. Decode tok/s per stream = its tokens
after the first over the time from its first to its last text event;
aggregate = every stream's decode tokens over the span of the run. Mask time
per token = `terse_grammar_mask_seconds` sum over count across the run, and
its share of the engine's step time (`terse_engine_step_seconds`).
Medians over the rounds; every figure goes to bench-results/structured-<timestamp>.json.
"""
import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, ROOT, TERSE, THREADS, concurrent_streams, fetch_model, free_port, get_status, sse_events, stop_process  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"facts": {"type": "array", "items": {"type": "string", "maxLength": 48}, "minItems": 12, "maxItems": 12}},
    "required": ["facts"],
    "additionalProperties": False,
}
TOPICS = ["the sea", "volcanoes", "the moon", "bees", "rivers", "deserts", "glaciers", "forests"]


def body(variant, constrained):
    topic = TOPICS[variant % len(TOPICS)]
    b = {"messages": [{"role": "user", "content": f"{variant}. List twelve short facts about {topic}."}],
         "max_tokens": 128, "temperature": 0, "stream": True}
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}}
    return b


def stream(port, b):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
    c.request("POST", "/v1/chat/completions", body=json.dumps(b), headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, text, finish = [], [], None
    for now, obj in sse_events(r):
        for ch in obj.get("choices") or []:
            finish = ch.get("finish_reason") or finish
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                times.append(now)
                text.append(piece)
    c.close()
    return {"times": times, "text": "".join(text), "finish": finish}


def metric(port, name):
    """The sum of a metric's samples (e.g. `..._sum` over every label set)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


def run(port, concurrency, constrained, variant):
    before = {k: metric(port, k) for k in ("terse_grammar_mask_seconds_sum", "terse_grammar_mask_seconds_count",
                                           "terse_engine_step_seconds_sum")}
    results = concurrent_streams(port, [body(variant * 10 + i, constrained) for i in range(concurrency)], send=stream)
    after = {k: metric(port, k) for k in before}
    per_stream, tokens, first, last = [], 0, None, None
    for r in results:
        t = r["times"]
        if len(t) >= 2:
            per_stream.append((len(t) - 1) / (t[-1] - t[0]))
            tokens += len(t) - 1
            first = t[0] if first is None else min(first, t[0])
            last = t[-1] if last is None else max(last, t[-1])
        if constrained and r["finish"] == "stop":
            json.loads(r["text"])  # the grammar's promise
    masks = after["terse_grammar_mask_seconds_count"] - before["terse_grammar_mask_seconds_count"]
    mask_s = after["terse_grammar_mask_seconds_sum"] - before["terse_grammar_mask_seconds_sum"]
    step_s = after["terse_engine_step_seconds_sum"] - before["terse_engine_step_seconds_sum"]
    return {"per_stream_tok_s": statistics.median(per_stream), "aggregate_tok_s": tokens / (last - first),
            "mask_us_per_token": 1e6 * mask_s / masks if masks else None, "mask_share_of_steps": mask_s / step_s if step_s else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="the forward pass's threads (1 leaves a core of this machine to the mask thread)")
    args = ap.parse_args()
    path = fetch_model(args.model)
    port = free_port()
    RESULTS.mkdir(exist_ok=True)
    log = open(RESULTS / f"structured-{port}.log", "w")
    env = dict(__import__("os").environ, RAYON_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([str(TERSE), "serve", "--model", path, "--port", str(port), "--max-batch", "8"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        while get_status(port, "/ready") != 200:
            time.sleep(0.5)
        levels = [int(c) for c in args.concurrency.split(",")]
        runs = {(c, k): [] for c in levels for k in ("free", "json_schema")}
        for rnd in range(args.rounds):
            for c in levels:
                order = [False, True] if rnd % 2 == 0 else [True, False]
                for constrained in order:
                    r = run(port, c, constrained, rnd)
                    runs[(c, "json_schema" if constrained else "free")].append(r)
                    print(f"round {rnd} c={c} {'json_schema' if constrained else 'free':11} {r}", flush=True)
        summary = {}
        print(f"\n{args.model}, {args.threads} forward threads, medians of {args.rounds} rounds")
        print(f"{'streams':>7} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6} {'agg free':>9} {'agg schema':>11} {'ratio':>6} {'mask us/tok':>12} {'mask share':>11}")
        for c in levels:
            f, s = runs[(c, "free")], runs[(c, "json_schema")]
            med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)
            row = {"free_per_stream": med(f, "per_stream_tok_s"), "schema_per_stream": med(s, "per_stream_tok_s"),
                   "free_aggregate": med(f, "aggregate_tok_s"), "schema_aggregate": med(s, "aggregate_tok_s"),
                   "mask_us_per_token": med(s, "mask_us_per_token"), "mask_share_of_steps": med(s, "mask_share_of_steps")}
            summary[c] = row
            print(f"{c:>7} {row['free_per_stream']:>11.1f} {row['schema_per_stream']:>13.1f} {row['schema_per_stream'] / row['free_per_stream']:>6.2f}"
                  f" {row['free_aggregate']:>9.1f} {row['schema_aggregate']:>11.1f} {row['schema_aggregate'] / row['free_aggregate']:>6.2f}"
                  f" {row['mask_us_per_token']:>12.0f} {100 * row['mask_share_of_steps']:>10.1f}%")
        out = RESULTS / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"model": args.model, "rounds": args.rounds, "threads": args.threads, "summary": summary,
                                   "runs": {f"{c}:{k}": v for (c, k), v in runs.items()}}, indent=1))
        print(f"wrote {out}")
    finally:
        stop_process(proc)


if __name__ == "__main__":
    main()
