#!/usr/bin/env python3
"""terse's speed against candle-transformers' reference model and llama.cpp.

    python3 benches/bench.py --runs 3                 # smollm2-135m and qwen2.5-0.5b
    python3 benches/bench.py qwen2.5-1.5b --runs 3
    python3 benches/bench.py synth:qwen3-0.6b:q8_0 synth:qwen3-1.7b:q4_k_m   # random weights, real shapes

For each model, in one run and one after another (never two engines at once):

1. in-process, single stream: `target/release/examples/bench_forward` for terse's
   own forward pass and for candle-transformers' reference model, one process
   each (so each peak RSS is its own): prefill tok/s of a 256-token prompt, greedy
   decode tok/s over 128 tokens; and, in a third process, terse decoding 8
   sequences together (aggregate tok/s, beside that process's single stream);
2. llama.cpp (llama-cpp-python, benches/requirements.txt) in a subprocess of its
   own, on the same file and the very same 256 prompt token ids, same figures;
3. the HTTP server (`target/release/terse serve --max-batch 8`): prefill tok/s
   from the time to the first streamed event of a 256-token prompt with
   max_tokens 1, single-stream decode tok/s over 128 streamed tokens, aggregate
   tok/s with 1, 4 and 8 concurrent streams (end to end: all completion tokens
   over the wall time, prompts included; and decode: each stream's tokens after
   its first over its time from first text to finish, summed over the streams),
   and the server's peak RSS.

Every figure is the median of --runs runs, after one warm-up. All engines get
2 threads (RAYON_NUM_THREADS=2, llama.cpp n_threads=2). Prints a table per model
and writes every figure to bench-results/bench-<timestamp>.json. Build first:
`cargo build --release && cargo build --release --example bench_forward`.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Another build's binaries (to compare two builds side by side) through
# TERSE_BENCH_BIN / TERSE_BENCH_FORWARD_BIN.
TERSE = Path(os.environ.get("TERSE_BENCH_BIN", ROOT / "target" / "release" / "terse"))
BENCH_FORWARD = Path(os.environ.get("TERSE_BENCH_FORWARD_BIN", ROOT / "target" / "release" / "examples" / "bench_forward"))
RESULTS = ROOT / "bench-results"
THREADS = 2

# A raw-text prompt that invites a long continuation, so that EOS is unlikely
# within 128 tokens (the actual completion token counts are reported).
STORY = (
    "Chapter One\n\nThe rain had not stopped for three days when Mara finally decided to leave the "
    "village. She packed her father's old compass, a loaf of bread and the letter she had never "
    "dared to open, and set out along the river road toward the mountains. This is the long story "
    "of her journey, told from the beginning, with every town, every stranger and every danger "
    "she met along the way.\n\nOn the first morning,"
)


def env():
    e = dict(os.environ)
    e["RAYON_NUM_THREADS"] = str(THREADS)
    e["OMP_NUM_THREADS"] = str(THREADS)
    return e


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def cpu_snapshot():
    """(wall, CPU-seconds used by the whole machine, by this process and its waited-for children)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.time(), busy, t.user + t.system + t.children_user + t.children_system


def others_cpu(before, after):
    """CPU use by other processes between two snapshots, as a share of all CPUs (0..1)."""
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, other) / (wall * (os.cpu_count() or 1)) if wall > 0 else None


def vm_hwm_kb(pid="self"):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in output")


def fetch_model(name):
    """The model file: fetched by its manifest name, or, for `synth:SHAPE:DTYPE`
    (e.g. `synth:qwen3-0.6b:q8_0`), written with random weights by `terse synth`
    into bench-results/ (once) for shapes no package here carries."""
    if name.startswith("synth:"):
        _, shape, dtype = name.split(":")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"synth-{shape}.{dtype}.gguf"
        if not path.exists():
            subprocess.run([str(TERSE), "synth", "--shape", shape, "--dtype", dtype, "--out", str(path)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        return str(path)
    out = subprocess.run([str(ROOT / "models" / "fetch"), name], cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1].strip()


# ---------------------------------------------------------------- in process

def bench_forward(path, engine, args, batch=0):
    cmd = [str(BENCH_FORWARD), path, "--engine", engine, "--prompt-tokens", str(args.prompt_tokens),
           "--decode-tokens", str(args.decode_tokens), "--runs", str(args.runs)]
    if batch:
        cmd += ["--batch", str(batch)]
    print(f"  [{engine}] {' '.join(cmd[1:])}", flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bench_forward --engine {engine} failed:\n{p.stderr[-3000:]}")
    return last_json_line(p.stdout)


# ---------------------------------------------------------------- llama.cpp

def llama_worker(args):
    """Runs in its own process: llama.cpp on `args.model_path`, prints one JSON line."""
    import numpy as np
    import llama_cpp

    ids = json.loads(Path(args.prompt_ids_file).read_text())
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model_path, n_threads=THREADS, n_threads_batch=THREADS,
                          n_ctx=2048, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits_argmax():
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def once(decode_tokens):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill_s = time.perf_counter() - t
        nxt = last_logits_argmax()
        t = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([nxt])
            nxt = last_logits_argmax()
        decode_s = time.perf_counter() - t
        return len(ids) / prefill_s, (decode_tokens / decode_s if decode_tokens else None)

    once(min(8, args.decode_tokens))  # warm-up
    prefill, decode = [], []
    for run in range(args.runs):
        p, d = once(args.decode_tokens)
        print(f"llama.cpp run {run + 1}: prefill {p:.1f} tok/s, decode {d:.1f} tok/s", file=sys.stderr)
        prefill.append(p)
        decode.append(d)
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python": getattr(llama_cpp, "__version__", None),
        "threads": THREADS,
        "prompt_tokens": len(ids),
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s_runs": decode,
        "load_s": load_s,
        "peak_rss_kb": vm_hwm_kb(),
    }), flush=True)


def bench_llama(path, prompt_ids, args, tag):
    ids_file = RESULTS / f"prompt-ids-{tag}.json"
    ids_file.write_text(json.dumps(prompt_ids))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--llama-worker", "--model-path", path,
           "--prompt-ids-file", str(ids_file), "--runs", str(args.runs),
           "--decode-tokens", str(args.decode_tokens)]
    print("  [llama.cpp] llama-cpp-python in a subprocess", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        ids_file.unlink(missing_ok=True)
    if p.returncode != 0:
        return {"engine": "llama.cpp", "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return last_json_line(p.stdout)


# ---------------------------------------------------------------- HTTP server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(port, path):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except OSError:
        return None


def sse_events(response):
    """The JSON events of a streamed response up to [DONE], each with its arrival time."""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        now = time.perf_counter()
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        obj = json.loads(payload)
        if "error" in obj:
            raise RuntimeError(f"stream error: {obj['error']}")
        yield now, obj


def stream_completion(port, body):
    """POST a streamed /v1/completions; returns the send time, the arrival time of
    every event (text, finish), and the usage from the final usage chunk."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps(body)
    sent = time.perf_counter()
    c.request("POST", "/v1/completions", body=data, headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    first = None     # first event of any kind
    first_text = None
    finish = None    # the event that carries finish_reason
    usage = None
    finish_reason = None
    for now, obj in sse_events(r):
        if first is None:
            first = now
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            if ch.get("text") and first_text is None:
                first_text = now
            if ch.get("finish_reason"):
                finish = now
                finish_reason = ch["finish_reason"]
    done = time.perf_counter()
    c.close()
    return {"sent": sent, "first": first, "first_text": first_text, "finish": finish or done, "done": done,
            "usage": usage or {}, "finish_reason": finish_reason}


def stop_process(proc, timeout=60):
    """SIGTERM (the server drains), then SIGKILL if it takes longer than `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def concurrent_streams(port, bodies, send=None):
    """Stream every body at once (released together by a barrier) with `send(port, body)`,
    `stream_completion` by default; their results."""
    send = send or stream_completion
    results, errors = [None] * len(bodies), []
    barrier = threading.Barrier(len(bodies))

    def worker(i):
        try:
            barrier.wait()
            results[i] = send(port, bodies[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} streams failed: {errors[0]}")
    return results


def decode_request(name, max_tokens, variant=0):
    prompt = STORY if variant == 0 else STORY.replace("Mara", ["Ilse", "Tomas", "Nadia", "Oren", "Lea",
                                                                 "Piet", "Saro", "Juno"][variant % 8])
    return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": []}


def bench_server(model, path, prompt_ids, args):
    port = free_port()
    RESULTS.mkdir(exist_ok=True)
    # A synthetic file is served by path, under its file name.
    spec, name = (path, Path(path).stem) if model.startswith("synth:") else (model, model)
    log_path = RESULTS / f"server-{name}-{port}.log"
    cmd = [str(TERSE), "serve", "--model", spec, "--port", str(port), "--max-batch", "8"]
    print(f"  [server] {' '.join(cmd[1:])}", flush=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    out = {"port": port, "log": str(log_path.relative_to(ROOT))}
    try:
        deadline = time.time() + 600
        while get_status(port, "/ready") != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
            if time.time() > deadline:
                raise RuntimeError("the server was not ready within 600 s")
            time.sleep(0.2)

        # Warm-up: one short prefill and a few decode steps.
        stream_completion(port, {"model": name, "prompt": prompt_ids, "max_tokens": 4, "temperature": 0})

        # Prefill: time to the first event of a max_tokens=1 stream.
        prefill = []
        for _ in range(args.runs):
            r = stream_completion(port, {"model": name, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0,
                                         "stop": []})
            n = r["usage"].get("prompt_tokens", len(prompt_ids))
            prefill.append(n / (r["first"] - r["sent"]))
        out["prefill_tok_s"] = median(prefill)
        out["prefill_tok_s_runs"] = prefill
        out["prefill_prompt_tokens"] = len(prompt_ids)

        # Single stream decode: from the first token to the finish event.
        decode, tokens, ttft = [], [], []
        for _ in range(args.runs):
            r = stream_completion(port, decode_request(name, args.decode_tokens))
            n = r["usage"].get("completion_tokens", 0)
            tokens.append(n)
            start = r["first_text"] or r["first"]
            ttft.append(start - r["sent"])
            if n > 1 and r["finish"] > start:
                decode.append((n - 1) / (r["finish"] - start))
        out["decode_tok_s"] = median(decode)
        out["decode_tok_s_runs"] = decode
        out["decode_completion_tokens"] = tokens
        out["decode_prompt_tokens"] = r["usage"].get("prompt_tokens")
        out["decode_ttft_s"] = median(ttft)

        # Aggregate decode: c concurrent streams, total tokens / wall time.
        out["aggregate"] = {}
        for c in args.concurrency:
            rates, decode_rates, totals, walls = [], [], [], []
            for _ in range(args.runs):
                results = concurrent_streams(port, [decode_request(name, args.decode_tokens, i) for i in range(c)])
                wall = max(r["done"] for r in results) - min(r["sent"] for r in results)
                total = sum(r["usage"].get("completion_tokens", 0) for r in results)
                rates.append(total / wall)
                # Decode alone, as the single-stream figure: each stream's
                # tokens after its first, over the time from its first text to
                # its finish, summed over the streams (all in flight together).
                decode_rates.append(sum((r["usage"].get("completion_tokens", 0) - 1) / (r["finish"] - r["first_text"])
                                        for r in results if r["first_text"] and r["finish"] > r["first_text"]))
                totals.append(total)
                walls.append(wall)
            out["aggregate"][str(c)] = {"tok_s": median(rates), "tok_s_runs": rates,
                                        "decode_tok_s": median(decode_rates), "decode_tok_s_runs": decode_rates,
                                        "completion_tokens": totals, "wall_s": walls}
            print(f"    concurrency {c}: {median(rates):.1f} tok/s end to end, "
                  f"{median(decode_rates):.1f} tok/s decoding", flush=True)
        out["peak_rss_kb"] = vm_hwm_kb(proc.pid)
    finally:
        stop_process(proc)
        log.close()
    return out


# ---------------------------------------------------------------- report

def ratio(a, b):
    return a / b if a and b else None


def fmt(x, spec=".1f"):
    return "n/a" if x is None else format(x, spec)


def mib(kb):
    return None if kb is None else kb / 1024


def report(model, res, args):
    lines = []
    lines.append(f"== {model}  ({res.get('arch', '?')}, {Path(res['path']).name}) ==")
    lines.append(f"   {THREADS} threads, {args.prompt_tokens}-token prompt, {args.decode_tokens} decode tokens, "
                 f"median of {args.runs} runs")
    lines.append(f"   1-min load average: before {res['loadavg_before'][0]}, after in-process "
                 f"{res['loadavg_after_forward'][0]}, after llama.cpp {res['loadavg_after_llama_cpp'][0]}, "
                 f"after server {res['loadavg_after'][0]} (above {THREADS} means something else competed for the CPUs)")
    share = ", ".join(f"{k} {fmt(100 * v if v is not None else None, '.0f')}%" for k, v in res["others_cpu_share"].items())
    lines.append(f"   CPU used by other processes during each phase (share of all {os.cpu_count()} CPUs): {share}")
    lines.append(f"   {'engine':<28}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak RSS MiB':>15}")
    rows = [("terse (in-process)", res.get("terse")), ("candle reference (in-proc.)", res.get("reference")),
            ("llama.cpp (in-process)", res.get("llama_cpp")), ("terse server (HTTP)", res.get("server"))]
    for label, r in rows:
        if r is None:
            continue
        if "error" in r:
            lines.append(f"   {label:<28}  error: {r['error']}")
            continue
        lines.append(f"   {label:<28}{fmt(r.get('prefill_tok_s')):>15}{fmt(r.get('decode_tok_s')):>15}"
                     f"{fmt(mib(r.get('peak_rss_kb'))):>15}")
    b8 = res.get("terse_batch8") or {}
    if b8.get("batch_decode_tok_s"):
        lines.append(f"   terse in-process, 8 sequences decoded together: {fmt(b8['batch_decode_tok_s'])} tok/s "
                     f"({fmt(ratio(b8['batch_decode_tok_s'], b8.get('decode_tok_s')), '.2f')}x its single-stream "
                     f"{fmt(b8.get('decode_tok_s'))} in the same process)")
    srv = res.get("server") or {}
    if srv.get("decode_completion_tokens"):
        lines.append(f"   HTTP single-stream completion tokens per run: {srv['decode_completion_tokens']} "
                     f"(prompt {srv.get('decode_prompt_tokens')} tokens, TTFT {fmt(srv.get('decode_ttft_s'), '.3f')} s)")
    agg = srv.get("aggregate") or {}
    if agg:
        parts = [f"{c} streams {fmt(a['tok_s'])} tok/s ({median(a['completion_tokens']):.0f} tokens)"
                 for c, a in agg.items()]
        lines.append("   HTTP aggregate, end to end (prompts included): " + "; ".join(parts))
        parts = [f"{c} streams {fmt(a.get('decode_tok_s'))} tok/s" for c, a in agg.items()]
        lines.append("   HTTP aggregate decode (each stream's tokens after its first): " + "; ".join(parts))
    r = res["ratios"]
    lines.append("   ratios:")
    lines.append(f"     terse / llama.cpp      prefill {fmt(r['terse_over_llama_cpp_prefill'], '.2f')}x"
                 f"   decode {fmt(r['terse_over_llama_cpp_decode'], '.2f')}x")
    lines.append(f"     terse / reference      prefill {fmt(r['terse_over_reference_prefill'], '.2f')}x"
                 f"   decode {fmt(r['terse_over_reference_decode'], '.2f')}x   (target >= 1.0x)")
    lines.append(f"     end to end: aggregate@8 / aggregate@1 {fmt(r['aggregate8_over_aggregate1'], '.2f')}x"
                 f"   aggregate@8 / HTTP single-stream decode {fmt(r['aggregate8_over_single_stream'], '.2f')}x")
    lines.append(f"     decode: aggregate@8 / aggregate@1 {fmt(r['decode8_over_decode1'], '.2f')}x   (target >= 3x)")
    return "\n".join(lines)


def ratios(res):
    t, ref, ll, srv = (res.get(k) or {} for k in ("terse", "reference", "llama_cpp", "server"))
    agg = srv.get("aggregate") or {}
    a1 = (agg.get("1") or {}).get("tok_s")
    a8 = (agg.get("8") or {}).get("tok_s")
    return {
        "terse_over_llama_cpp_prefill": ratio(t.get("prefill_tok_s"), ll.get("prefill_tok_s")),
        "terse_over_llama_cpp_decode": ratio(t.get("decode_tok_s"), ll.get("decode_tok_s")),
        "terse_over_reference_prefill": ratio(t.get("prefill_tok_s"), ref.get("prefill_tok_s")),
        "terse_over_reference_decode": ratio(t.get("decode_tok_s"), ref.get("decode_tok_s")),
        "aggregate8_over_aggregate1": ratio(a8, a1),
        "aggregate8_over_single_stream": ratio(a8, srv.get("decode_tok_s")),
        "decode8_over_decode1": ratio((agg.get("8") or {}).get("decode_tok_s"), (agg.get("1") or {}).get("decode_tok_s")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-0.5b"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated stream counts")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: forward,reference,llama,server")
    # Internal: the llama.cpp subprocess.
    ap.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_worker:
        return llama_worker(args)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    skip = set(s for s in args.skip.split(",") if s)

    for binary, build in ((TERSE, "cargo build --release"),
                          (BENCH_FORWARD, "cargo build --release --example bench_forward")):
        if not binary.exists():
            sys.exit(f"{binary.relative_to(ROOT)} is missing: run `{build}` first")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    all_results = {"timestamp": stamp, "threads": THREADS, "runs": args.runs, "prompt_tokens": args.prompt_tokens,
                   "decode_tokens": args.decode_tokens, "concurrency": args.concurrency,
                   "cpus": os.cpu_count(), "models": {}}
    reports = []
    for model in args.models:
        print(f"{model}:", flush=True)
        res = {"path": fetch_model(model), "loadavg_before": loadavg()}
        all_results["models"][model] = res
        prompt_ids = None
        snap = cpu_snapshot()
        res["others_cpu_share"] = {}

        def phase_done(name, ran):
            nonlocal snap
            now = cpu_snapshot()
            if ran:
                res["others_cpu_share"][name] = others_cpu(snap, now)
            snap = now

        if "forward" not in skip:
            res["terse"] = bench_forward(res["path"], "terse", args)
            prompt_ids = res["terse"].pop("prompt_ids")
            res["arch"] = res["terse"].get("arch")
            if "reference" not in skip:
                res["reference"] = bench_forward(res["path"], "reference", args)
                res["reference"].pop("prompt_ids", None)
            # A process of its own, so that the eight caches do not count in
            # the single-stream peak RSS above.
            batched = bench_forward(res["path"], "terse", args, batch=8)
            res["terse_batch8"] = {k: batched.get(k) for k in ("decode_tok_s", "batch_decode_tok_s",
                                                               "batch_decode_tok_s_runs", "peak_rss_kb")}
        if prompt_ids is None:
            out = subprocess.run([str(BENCH_FORWARD), res["path"], "--prompt-tokens", str(args.prompt_tokens),
                                  "--decode-tokens", "0", "--runs", "1", "--warmup", "0"], cwd=ROOT, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
            prompt_ids = last_json_line(out)["prompt_ids"]
        phase_done("in_process", "forward" not in skip)
        res["loadavg_after_forward"] = loadavg()
        if "llama" not in skip:
            res["llama_cpp"] = bench_llama(res["path"], prompt_ids, args, f"{model}-{stamp}")
        phase_done("llama_cpp", "llama" not in skip)
        res["loadavg_after_llama_cpp"] = loadavg()
        if "server" not in skip:
            res["server"] = bench_server(model, res["path"], prompt_ids, args)
        phase_done("server", "server" not in skip)
        res["loadavg_after"] = loadavg()
        res["ratios"] = ratios(res)
        text = report(model, res, args)
        reports.append(text)
        print(text, flush=True)
        out_path = RESULTS / f"bench-{stamp}.json"
        out_path.write_text(json.dumps(all_results, indent=2))

    if len(reports) > 1:
        print()
        print("\n\n".join(reports))
    print(f"\nwrote {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
