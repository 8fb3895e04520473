#!/usr/bin/env python3
"""2:4 sparse against dense, side by side, on the same pruned checkpoint.

    python3 benches/sparse.py --runs 5                # smollm2-135m, f32 and bf16
    python3 benches/sparse.py qwen2.5-0.5b --runs 3 --dtypes bf16

For each dtype, converts the model's GGUF to a dense Hugging Face directory in
that dtype (`terse convert --dtype`), prunes it to 2:4 by magnitude (`terse
prune`, which keeps the dtype), then runs `bench_forward` on the pruned
directory twice per round, once with the sparse kernel (`--sparse auto`) and
once with the same weights dense (`--sparse off`: f32 through candle's matmul),
alternating so both see the same machine state. Each run gives prefill tok/s,
single-stream decode tok/s and the aggregate decode tok/s of 8 sequences
stepped together. Prints the medians, the sparse/dense ratios, each process's
peak RSS, the projection bytes dense and as stored (`terse inspect`), and
whether the two greedy outputs of the benchmark prompt are identical.
Build first: `cargo build --release && cargo build --release --example bench_forward`.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TERSE = ROOT / "target" / "release" / "terse"
BENCH_FORWARD = ROOT / "target" / "release" / "examples" / "bench_forward"
WORK = ROOT / "bench-results" / "sparse"


def run(cmd, **kw):
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    return subprocess.run(cmd, check=True, text=True, capture_output=True, env=env, **kw).stdout


def prepare(model, dtype):
    dense, pruned = WORK / f"{model}-{dtype}", WORK / f"{model}-{dtype}-2of4"
    if not (pruned / "config.json").is_file():
        run([str(TERSE), "convert", model, "--out", str(dense), "--dtype", dtype])
        run([str(TERSE), "prune", str(dense), "--out", str(pruned)])
    return pruned


def bench(path, sparse, args):
    out = run([str(BENCH_FORWARD), str(path), "--sparse", sparse, "--runs", "1", "--warmup", "1",
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
               "--batch", "8"])
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def projection_bytes(path):
    """(dense, as stored) projection bytes, from `terse inspect`."""
    out = run([str(TERSE), "inspect", str(path)])
    m = re.search(r"projection bytes: (\d+) dense, (\d+) as stored", out)
    return int(m.group(1)), int(m.group(2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"], choices=["f32", "bf16"])
    args = p.parse_args()
    for binary in (TERSE, BENCH_FORWARD):
        if not binary.is_file():
            sys.exit(f"{binary} is missing: cargo build --release && cargo build --release --example bench_forward")
    for dtype in args.dtypes:
        pruned = prepare(args.model, dtype)
        dense_bytes, stored_bytes = projection_bytes(pruned)
        figures = {"auto": [], "off": []}
        for _ in range(args.runs):
            for mode in ("auto", "off"):
                figures[mode].append(bench(pruned, mode, args))

        def med(mode, key):
            return statistics.median(f[key] for f in figures[mode])

        keys = ("prefill_tok_s", "decode_tok_s", "batch_decode_tok_s", "peak_rss_kb")
        print(f"\n{args.model}, magnitude-pruned 2:4, {dtype} checkpoint, 2 threads, "
              f"median of {args.runs} alternating rounds")
        print(f"{'':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'8 seqs tok/s':>13} {'peak RSS MiB':>13}")
        for mode, label in (("auto", "sparse"), ("off", "dense")):
            print(f"{label:>8} {med(mode, keys[0]):>14.1f} {med(mode, keys[1]):>13.1f} {med(mode, keys[2]):>13.1f} "
                  f"{med(mode, keys[3]) / 1024:>13.0f}")
        print(f"{'ratio':>8} " + " ".join(f"{med('auto', k) / med('off', k):>{w}.2f}"
                                          for k, w in zip(keys, (14, 13, 13, 13))))
        print(f"projection weights: {stored_bytes / 2**20:.0f} MiB stored 2:4 against {dense_bytes / 2**20:.0f} MiB "
              f"dense f32 ({stored_bytes / dense_bytes:.2f}x)")
        # The same prompt, greedy: how far the sparse and dense tokens agree.
        sparse_ids, dense_ids = figures["auto"][-1]["greedy_ids"], figures["off"][-1]["greedy_ids"]
        same = next((i for i, (a, b) in enumerate(zip(sparse_ids, dense_ids)) if a != b), len(sparse_ids))
        verdict = "identical" if same == len(sparse_ids) == len(dense_ids) else f"first difference at token {same}"
        print(f"greedy output, sparse against dense: {verdict} ({len(sparse_ids)} tokens)")
        print("runs:", json.dumps({m: [{k: f.get(k) for k in keys} for f in figures[m]] for m in figures}))


if __name__ == "__main__":
    main()
