#!/usr/bin/env python3
"""2:4 sparse against dense, side by side, on the same pruned checkpoint.

    python3 benches/sparse.py --runs 5                # smollm2-135m
    python3 benches/sparse.py qwen2.5-0.5b --runs 3

Converts the model's GGUF to a dense f32 Hugging Face directory (`terse
convert`), prunes it to 2:4 by magnitude (`terse prune`), then runs
`bench_forward` on the pruned directory twice per round, once with the sparse
kernel (`--sparse auto`) and once with the same weights dense (`--sparse off`),
alternating so both see the same machine state. Prints the medians of prefill
and decode tok/s, their sparse/dense ratios, and each process's peak RSS.
Build first: `cargo build --release && cargo build --release --example bench_forward`.
"""
import argparse
import json
import os
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


def prepare(model):
    dense, pruned = WORK / f"{model}-f32", WORK / f"{model}-2of4"
    if not (pruned / "config.json").is_file():
        run([str(TERSE), "convert", model, "--out", str(dense)])
        run([str(TERSE), "prune", str(dense), "--out", str(pruned)])
    return pruned


def bench(path, sparse, args):
    out = run([str(BENCH_FORWARD), str(path), "--sparse", sparse, "--runs", "1", "--warmup", "1",
               "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)])
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()
    for binary in (TERSE, BENCH_FORWARD):
        if not binary.is_file():
            sys.exit(f"{binary} is missing: cargo build --release && cargo build --release --example bench_forward")
    pruned = prepare(args.model)
    figures = {"auto": [], "off": []}
    for _ in range(args.runs):
        for mode in ("auto", "off"):
            figures[mode].append(bench(pruned, mode, args))

    def med(mode, key):
        return statistics.median(f[key] for f in figures[mode])

    print(f"{args.model}, magnitude-pruned 2:4, f32, 2 threads, median of {args.runs} alternating rounds")
    print(f"{'':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13}")
    for mode, label in (("auto", "sparse"), ("off", "dense")):
        print(f"{label:>8} {med(mode, 'prefill_tok_s'):>14.1f} {med(mode, 'decode_tok_s'):>13.1f} "
              f"{med(mode, 'peak_rss_kb') / 1024:>13.0f}")
    print(f"{'ratio':>8} {med('auto', 'prefill_tok_s') / med('off', 'prefill_tok_s'):>14.2f} "
          f"{med('auto', 'decode_tok_s') / med('off', 'decode_tok_s'):>13.2f} "
          f"{med('auto', 'peak_rss_kb') / med('off', 'peak_rss_kb'):>13.2f}")


if __name__ == "__main__":
    main()
