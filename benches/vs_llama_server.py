#!/usr/bin/env python3
"""terse's server against llama.cpp's own server, `llama-server`, on the same
GGUF file and threads, side by side in one run.

    cargo build --release
    python3 benches/vs_llama_server.py                       # smollm2-135m, 3 rounds
    python3 benches/vs_llama_server.py qwen2.5-0.5b --rounds 3 --concurrency 1,8

llama-server is built once from the llama.cpp source the pinned
llama-cpp-python source package vendors (benches/llama_server.py). Three
servers run for each model, one request load at a time (an idle server takes
no CPU): terse with its prefix cache, terse with `--prefix-cache off`, and
llama-server with `-np SLOTS` slots and continuous batching. Each round runs
every load on each server in turn, alternating which goes first; figures are
the medians over the rounds.

Loads:
- streams: C concurrent streamed /v1/completions of a raw-text story opening,
  128 greedy tokens each (stop: []); aggregate tok/s = all completion tokens over
  the wall time from the first request sent to the last finished (end to end,
  prompts included); decode alone = each stream's tokens after its first over
  the time from its first to its last, summed over the streams; TTFT = time
  from sending to the first text event, p50 and p99 over the streams of all
  rounds (terse with the prefix cache only: the prompts share no page).
- multi-turn: one conversation of 8 turns on a ~1,400-token system prompt
  (different in each round, so turn 1 is never cached), 32 greedy tokens a
  reply, each reply sent back as the assistant's turn; TTFT per turn.
  llama-server gets `cache_prompt: true` (its slot keeps the prompt's KV).
- a long prompt among decoders: 4 streams decode 384 tokens; once each has its
  first, a ~1,400-token prompt arrives. The longest gap between two tokens of
  any decoder while it is prefilled (chunked prefill keeps it short), and its
  own TTFT.

Memory: terse gets the KV bytes llama-server's cache takes (`--kv-cache-bytes`
= ctx x slots positions in f16, as many positions in terse's f16 cache, its
default); a prefix cache fills its budget before it evicts.

Threads: 2 for every server (RAYON_NUM_THREADS=2; llama-server -t 2 -tb 2).
Every figure goes to bench-results/vs-llama-server-<timestamp>.json.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (RESULTS, ROOT, STORY, TERSE, THREADS, concurrent_streams, fetch_model, free_port,  # noqa: E402
                   get_status, sse_events, stop_process, vm_hwm_kb)
from llama_server import ensure_llama_server  # noqa: E402

# A policy handbook of about 1,400 tokens, as an agent's system prompt.
HANDBOOK_LINES = [
    "Parcels above {n} kg travel by freight and below it by courier.",
    "Returns within {n} days are free for members.",
    "A damaged parcel is reported with a photo within {n} hours.",
    "Depot {n} opens at eight and closes at six on weekdays.",
    "Refunds for order class {n} go back to the card that paid.",
    "Customs form {n} is needed for parcels leaving the union.",
    "Route {n} is served twice a week in winter.",
    "Insurance up to {n} euros is included in the standard rate.",
]
QUESTIONS = [
    "When do refunds arrive?", "What does freight cost?", "Which form do I need for Norway?",
    "Can I change the address?", "What if the parcel is damaged?", "Is insurance included?",
    "When is the depot open?", "How do returns work?",
]


def handbook(round_no, target_words=1050):
    words, lines, n = 0, [f"Session {round_no}. You are the support assistant of a shipping company."], 0
    while words < target_words:
        line = HANDBOOK_LINES[n % len(HANDBOOK_LINES)].format(n=n + 3)
        lines.append(line)
        words += len(line.split())
        n += 1
    return " ".join(lines)


def env():
    return dict(os.environ, RAYON_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS))


def stream(port, path, body, on_first=None):
    """POST a streamed request; the send time, the first text event's, the end's, and the completion tokens
    (from the usage chunk, else one per text event)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=1200)
    sent = time.perf_counter()
    c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    first_text, events, usage, text, times = None, 0, None, [], []
    for now, obj in sse_events(r):
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            piece = ch.get("text") or (ch.get("delta") or {}).get("content") or (ch.get("delta") or {}).get("reasoning_content")
            if piece:
                events += 1
                text.append(piece)
                times.append(now)
                if first_text is None:
                    first_text = now
                    if on_first:
                        on_first()
    done = time.perf_counter()
    c.close()
    tokens = (usage or {}).get("completion_tokens") or events
    return {"sent": sent, "ttft": (first_text or done) - sent, "done": done, "tokens": tokens, "text": "".join(text),
            "times": times, "cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")}


def concurrent(port, path, bodies):
    return concurrent_streams(port, bodies, send=lambda p, body: stream(p, path, body))


def story_body(max_tokens, variant):
    # A number of its own first, so that no two requests of a run share a
    # page (or, for llama-server, more than a token of a slot's prompt).
    prompt = f"{variant}. " + STORY
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": []}


def interference(s, variant, decoders, decode_tokens):
    """`decoders` streams decode; once each has its first token, a long prompt
    (a ~1,400-token handbook) arrives. Returns the longest gap between two
    tokens of any decoder while that prompt was being prefilled, the decoders'
    median gap otherwise, and the long prompt's TTFT."""
    started = [threading.Event() for _ in range(decoders)]
    results = [None] * decoders

    def decode(i):
        results[i] = stream(s.port, "/v1/completions", s.body(story_body(decode_tokens, variant * 100 + i)),
                            on_first=started[i].set)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(decoders)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(600)
    long = stream(s.port, "/v1/completions", s.body({"prompt": handbook(variant), "max_tokens": 8, "temperature": 0,
                                                     "stop": []}))
    for t in threads:
        t.join()
    start, end = long["sent"], long["sent"] + long["ttft"]
    during, other = [0.0], []
    for r in results:
        for a, b in zip(r["times"], r["times"][1:]):
            (during if b > start and a < end else other).append(b - a)
    return max(during), statistics.median(other or [0.0]), long["ttft"]


class Server:
    def __init__(self, label, cmd, extra_body=None):
        self.label, self.cmd, self.extra = label, cmd, extra_body or {}
        self.port = int(cmd[cmd.index("--port") + 1])
        RESULTS.mkdir(exist_ok=True)
        self.log_path = RESULTS / f"vs-{label}-{self.port}.log"
        self.log = open(self.log_path, "w")
        print(f"  [{label}] {' '.join(str(c) for c in cmd)}", flush=True)
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self):
        deadline = time.time() + 900
        while get_status(self.port, "/health") != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.proc.returncode}); see {self.log_path}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.label} was not ready within 900 s")
            time.sleep(0.3)
        if self.label.startswith("terse"):
            while get_status(self.port, "/ready") != 200:
                time.sleep(0.3)
        # Each server names the model its own way.
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", "/v1/models")
        self.model = json.loads(c.getresponse().read())["data"][0]["id"]
        c.close()

    def body(self, body):
        return dict(body, model=self.model, **self.extra)

    def stop(self):
        self.rss_kb = vm_hwm_kb(self.proc.pid)
        stop_process(self.proc)
        self.log.close()


def kv_bytes_per_token(model_path):
    """terse's f32 KV bytes per position of a llama-shaped model, from `terse inspect`."""
    text = subprocess.run([str(TERSE), "inspect", str(model_path)], capture_output=True, text=True, check=True).stdout
    layers = int(re.search(r"layers: (\d+)", text).group(1))
    hidden = int(re.search(r"hidden: (\d+)", text).group(1))
    heads, kv_heads = map(int, re.search(r"heads: (\d+) / (\d+) kv", text).groups())
    return layers * 2 * kv_heads * (hidden // heads) * 4


def start_servers(model_path, name, slots, ctx, prefill_chunk=None):
    # The bytes of llama-server's KV cache (-c ctx x slots positions in f16):
    # as many positions in terse's f16 cache (its default).
    kv_bytes = ctx * slots * kv_bytes_per_token(model_path) // 2
    terse = lambda label, cache: Server(label, [TERSE, "serve", "--model", model_path, "--port", free_port(),
                                                "--max-batch", slots, "--prefix-cache", cache,
                                                "--kv-cache-bytes", kv_bytes]
                                        + (["--prefill-chunk", prefill_chunk] if prefill_chunk else []))
    llama = Server("llama-server", [ensure_llama_server(), "-m", model_path, "--port", free_port(), "-t", THREADS,
                                    "-tb", THREADS, "-np", slots, "-c", ctx * slots, "--cont-batching", "--jinja",
                                    "--alias", name, "--no-webui"],
                   extra_body={"cache_prompt": True})
    servers = [terse("terse", "on"), terse("terse-no-cache", "off"), llama]
    for s in servers:
        s.wait_ready()
    return servers


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_model(model, args):
    path = fetch_model(model)
    name = Path(path).stem if model.startswith("synth:") else model
    servers = start_servers(path, name, args.slots, args.ctx, args.prefill_chunk)
    out = {"model": model, "file": path, "streams": {}, "multi_turn": {}, "interference": {}}
    try:
        for s in servers:  # warm-up
            stream(s.port, "/v1/completions", s.body(story_body(4, 999_999)))
        streams = {c: {s.label: {"tok_s": [], "decode_tok_s": [], "ttft": []} for s in servers
                       if s.label != "terse-no-cache"} for c in args.concurrency}
        turns = {s.label: [[] for _ in range(args.turns)] for s in servers}
        cached = {s.label: [[] for _ in range(args.turns)] for s in servers}  # prompt tokens the server reused
        stalls = {s.label: [] for s in servers if s.label != "terse-no-cache"}
        for rnd in range(args.rounds):
            order = servers[rnd % len(servers):] + servers[:rnd % len(servers)]
            for c in args.concurrency:
                for s in order:
                    if s.label == "terse-no-cache":
                        continue
                    rs = concurrent(s.port, "/v1/completions",
                                    [s.body(story_body(args.decode_tokens, (rnd * 100 + c) * 100 + i)) for i in range(c)])
                    wall = max(r["done"] for r in rs) - min(r["sent"] for r in rs)
                    streams[c][s.label]["tok_s"].append(sum(r["tokens"] for r in rs) / wall)
                    # Decode alone: each stream's tokens after its first over their time, summed.
                    streams[c][s.label]["decode_tok_s"].append(
                        sum((len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in rs if len(r["times"]) > 1))
                    streams[c][s.label]["ttft"].extend(r["ttft"] for r in rs)
                print(f"    round {rnd + 1}, {c} streams: "
                      + ", ".join(f"{lbl} {v['tok_s'][-1]:.1f} tok/s" for lbl, v in streams[c].items()), flush=True)
            for s in order:
                system = handbook(rnd * 10 + servers.index(s))
                messages = [{"role": "system", "content": system}]
                for t in range(args.turns):
                    messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
                    r = stream(s.port, "/v1/chat/completions",
                               s.body({"messages": messages, "max_tokens": args.reply_tokens, "temperature": 0}))
                    turns[s.label][t].append(r["ttft"])
                    cached[s.label][t].append(r["cached"])
                    messages.append({"role": "assistant", "content": r["text"]})
            print(f"    round {rnd + 1}, multi-turn TTFT: "
                  + "; ".join(f"{lbl} " + " ".join(f"{v[-1]:.2f}" for v in tt) for lbl, tt in turns.items()), flush=True)
            if args.interference:
                for s in order:
                    if s.label in stalls:
                        stalls[s.label].append(interference(s, 1000 + rnd * 10 + servers.index(s), args.interference,
                                                            args.interference_tokens))
                print(f"    round {rnd + 1}, a long prompt among {args.interference} decoders (stall, usual gap, its TTFT): "
                      + "; ".join(f"{lbl} " + " / ".join(f"{x:.2f}" for x in v[-1]) for lbl, v in stalls.items()),
                      flush=True)
        for c, per in streams.items():
            out["streams"][str(c)] = {lbl: {"tok_s": statistics.median(v["tok_s"]), "tok_s_runs": v["tok_s"],
                                            "decode_tok_s": statistics.median(v["decode_tok_s"]),
                                            "ttft_p50": percentile(v["ttft"], 0.5), "ttft_p99": percentile(v["ttft"], 0.99)}
                                      for lbl, v in per.items()}
        out["multi_turn"] = {lbl: [statistics.median(t) for t in tt] for lbl, tt in turns.items()}
        out["multi_turn_runs"] = turns
        out["multi_turn_cached_tokens"] = cached
        out["interference"] = {lbl: {"stall_s": statistics.median(x[0] for x in v),
                                     "usual_gap_s": statistics.median(x[1] for x in v),
                                     "long_ttft_s": statistics.median(x[2] for x in v), "runs": v}
                               for lbl, v in stalls.items() if v}
    finally:
        for s in servers:
            s.stop()
    out["peak_rss_mib"] = {s.label: (s.rss_kb or 0) / 1024 for s in servers}
    report(out)
    return out


def report(out):
    print(f"\n## {out['model']}\n")
    print("| streams | terse tok/s | llama-server tok/s | ratio | decode alone, ratio | terse TTFT p50 / p99 "
          "| llama-server TTFT p50 / p99 |")
    print("|---|---|---|---|---|---|---|")
    for c, per in out["streams"].items():
        t, l = per["terse"], per["llama-server"]
        td, ld = t.get("decode_tok_s", 0), l.get("decode_tok_s", 0)
        print(f"| {c} | {t['tok_s']:.1f} | {l['tok_s']:.1f} | {t['tok_s'] / l['tok_s']:.2f}x | "
              f"{td:.1f} / {ld:.1f}, {td / max(ld, 1e-9):.2f}x | "
              f"{t['ttft_p50'] * 1e3:.0f} / {t['ttft_p99'] * 1e3:.0f} ms | {l['ttft_p50'] * 1e3:.0f} / {l['ttft_p99'] * 1e3:.0f} ms |")
    print("\nmulti-turn TTFT per turn (s, medians):\n")
    for lbl, tt in out["multi_turn"].items():
        print(f"  {lbl:15} " + " ".join(f"{x:.3f}" for x in tt))
    for lbl, v in out.get("interference", {}).items():
        print(f"\na long prompt among decoders, {lbl}: longest gap {v['stall_s'] * 1e3:.0f} ms "
              f"(usual {v['usual_gap_s'] * 1e3:.0f} ms), its TTFT {v['long_ttft_s']:.2f} s")
    print("\npeak RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in out["peak_rss_mib"].items()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8, help="terse --max-batch and llama-server -np")
    ap.add_argument("--ctx", type=int, default=4096, help="llama-server's context per slot")
    ap.add_argument("--interference", type=int, default=4, help="decoders a long prompt arrives among (0: skip)")
    ap.add_argument("--interference-tokens", type=int, default=384, help="tokens each of those decoders generates")
    ap.add_argument("--prefill-chunk", type=int, help="terse's --prefill-chunk (default: terse's own)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]  # "" for none
    if not TERSE.exists():
        sys.exit(f"{TERSE} is missing: cargo build --release")
    ensure_llama_server()
    results = [bench_model(m, args) for m in args.models]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"vs-llama-server-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
