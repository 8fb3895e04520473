#!/usr/bin/env python3
"""terse's HTTP benchmark on a GPU, and one request per reasoning strategy.

    python3 benches/gpu.py --terse target/gpu-bundle/terse --model DIR_OR_GGUF \\
        --device cuda --label bf16 --out results/gpu-bf16.json

Starts `terse serve` on --model with --device, waits for /ready, then measures
(medians of --runs, after one warm-up):
- prefill: tok/s of a --prompt-tokens prompt, from the time to the first
  streamed event of a max_tokens=1 request (also reported as time to first token);
- decode: aggregate completion tok/s with each of --concurrency concurrent
  greedy streams of --decode-tokens tokens (total tokens / wall time; a
  single stream from its first token to its finish);
- one chat request per reasoning strategy (none, ts, budget) at temperature 0:
  thinking / answer / forced token counts and the think stop reason, so that
  runs on different devices can be compared request by request.
Each decode figure is also shown as a fraction of the bound that reading the
weights once per step sets (weight bytes from /v1/models, --bandwidth-tb-s).
Only the standard library: it runs on a machine where nothing can be installed.
Writes every figure as JSON to --out and prints a table.
"""
import argparse
import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import concurrent_streams, decode_request, free_port, get_status, median, stop_process, stream_completion  # noqa: E402

STRATEGIES = {
    "baseline": {"strategy": "none"},
    "ts": {"strategy": "ts", "stop_temperature": 4},
    "budget": {"strategy": "budget", "max_thinking_tokens": 32},
}
QUESTION = "A train travels 120 km in 1.5 hours. What is its average speed in km/h?"


def post_json(port, path, body, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {data[:300]!r}")
    return json.loads(data)


def get_json(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    data = r.read()
    c.close()
    return json.loads(data)


def step_phases(port):
    """(sum, count) of terse_engine_step_seconds per phase, from /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            prefix = f"terse_engine_step_seconds_{part}{{phase=\""
            if line.startswith(prefix):
                phase = line[len(prefix):line.index('"', len(prefix))]
                out.setdefault(phase, [0.0, 0.0])[part == "count"] = float(line.rsplit(" ", 1)[1])
    return out


def phase_means_ms(before, after):
    """Mean milliseconds per step of each phase between two `step_phases`."""
    means = {}
    for phase, (total, count) in after.items():
        t0, c0 = before.get(phase, [0.0, 0.0])
        if count > c0:
            means[phase] = round((total - t0) / (count - c0) * 1000, 3)
    return means


def concurrent_decode(port, name, streams, decode_tokens):
    results = concurrent_streams(port, [decode_request(name, decode_tokens, i) for i in range(streams)])
    start = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    tokens = sum(r["usage"].get("completion_tokens", 0) for r in results)
    if streams == 1:
        r = results[0]
        first = r["first_text"] or r["first"]
        return (tokens - 1) / (r["finish"] - first), tokens
    return tokens / (end - start), tokens


def strategy_requests(port, name, max_tokens):
    out = {}
    for label, reasoning in STRATEGIES.items():
        body = {"model": name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
                "temperature": 0, "reasoning": reasoning}
        reply = post_json(port, "/v1/chat/completions", body)
        t = reply.get("terse", {})
        out[label] = {k: t.get(k) for k in ("thinking_tokens", "answer_tokens", "forced_tokens", "think_stop_reason")}
        out[label]["completion_tokens"] = reply["usage"]["completion_tokens"]
        out[label]["finish_reason"] = reply["choices"][0]["finish_reason"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--terse", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", default="deepseek-r1-distill-qwen-1.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--label", default="")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-id-range", type=int, default=100000, help="prompt token ids are 1000 + (i * 7919) %% this")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--strategy-tokens", type=int, default=96)
    p.add_argument("--no-speed", action="store_true", help="only the strategy requests")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--serve-arg", action="append", default=[], help="one more argument for `terse serve` (repeatable)")
    p.add_argument("--bandwidth-tb-s", type=float, default=4.3, help="memory bandwidth of the device (H200: ~4.3)")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    # A `timeout` around this script stops it with SIGTERM: stop the server too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"[{args.label}] stopped by SIGTERM"))

    port = free_port()
    max_batch = max(args.concurrency + [1])
    cmd = [args.terse, "serve", "--model", args.model, "--manifest", args.manifest, "--device", args.device,
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    if args.kv_cache_bytes:
        cmd += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    cmd += args.serve_arg
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = out_path.with_suffix(".server.log")
    print(f"[{args.label}] {' '.join(cmd[1:])}", flush=True)
    log = open(log_path, "w")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    res = {"label": args.label, "device": args.device, "model": args.model, "cmd": cmd[1:]}
    try:
        while get_status(port, "/ready") != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.time() - started > args.ready_timeout:
                raise RuntimeError(f"not ready within {args.ready_timeout} s")
            time.sleep(0.2)
        res["ready_s"] = time.time() - started
        details = get_json(port, "/v1/models")["data"][0].get("terse", {})
        res["model_details"] = details
        name = get_json(port, "/v1/models")["data"][0]["id"]
        weight_bytes = details.get("weight_bytes") or 0
        bound = args.bandwidth_tb_s * 1e12 / weight_bytes if weight_bytes else None
        res["decode_bound_tok_s"] = bound

        if not args.no_speed:
            prompt_ids = [1000 + (i * 7919) % args.prompt_id_range for i in range(args.prompt_tokens)]
            stream_completion(port, {"model": name, "prompt": prompt_ids, "max_tokens": 4, "temperature": 0})
            concurrent_decode(port, name, min(8, max_batch), 8)  # warm every batch shape a little
            prefill, ttft = [], []
            for _ in range(args.runs):
                r = stream_completion(port, {"model": name, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0,
                                             "stop": []})
                ttft.append(r["first"] - r["sent"])
                prefill.append(r["usage"].get("prompt_tokens", len(prompt_ids)) / ttft[-1])
            res["prefill_tok_s"], res["ttft_s"] = median(prefill), median(ttft)
            print(f"[{args.label}] (so far) ready in {res['ready_s']:.1f} s, prefill {[round(p) for p in prefill]} tok/s", flush=True)
            res["decode"] = {}
            for c in args.concurrency:
                rates, tokens = [], []
                phases_before = step_phases(port)
                for _ in range(args.runs):
                    rate, n = concurrent_decode(port, name, c, args.decode_tokens)
                    rates.append(rate)
                    tokens.append(n)
                phases = phase_means_ms(phases_before, step_phases(port))
                res["decode"][str(c)] = {"tok_s": median(rates), "runs": rates, "tokens": tokens,
                                         "fraction_of_bound_per_stream": (median(rates) / c / bound) if bound else None,
                                         "step_phase_ms": phases}
                print(f"[{args.label}] (so far) x{c}: mean ms per step by phase {phases}", flush=True)
                print(f"[{args.label}] (so far) x{c}: {[round(r, 1) for r in rates]} tok/s", flush=True)
        res["strategies"] = strategy_requests(port, name, args.strategy_tokens)
    finally:
        stop_process(proc, timeout=30)
        log.close()
    out_path.write_text(json.dumps(res, indent=2))

    print(f"[{args.label}] ready in {res['ready_s']:.1f} s; weights {weight_bytes / 1e9:.2f} GB; "
          f"decode bound {bound or 0:.0f} tok/s per stream at {args.bandwidth_tb_s} TB/s")
    if "decode" in res:
        print(f"[{args.label}] prefill {res['prefill_tok_s']:.0f} tok/s ({args.prompt_tokens} tokens), "
              f"time to first token {res['ttft_s'] * 1000:.1f} ms")
        for c, d in res["decode"].items():
            frac = d["fraction_of_bound_per_stream"]
            print(f"[{args.label}] decode x{c}: {d['tok_s']:.1f} tok/s aggregate"
                  + (f", {frac:.1%} of the bound per stream" if frac is not None else ""))
    for label, s in res["strategies"].items():
        print(f"[{args.label}] {label:>6}: {json.dumps(s)}")


if __name__ == "__main__":
    main()
