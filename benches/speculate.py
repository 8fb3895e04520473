#!/usr/bin/env python3
"""Speculative decoding by prompt lookup (`terse serve --speculate ngram`)
against the plain engine and llama.cpp's server, side by side in one run.

    cargo build --release
    python3 benches/speculate.py qwen2.5-0.5b --rounds 3
    python3 benches/speculate.py qwen2.5-1.5b --rounds 3 --concurrency 1,4,8

Three servers on the same GGUF file and threads (2): terse `--speculate off`,
terse `--speculate ngram`, llama-server (plain, one slot per stream). The
loads are chat requests, greedy, streamed, one kind at a time:
- `cot`: grade-school math solved step by step (chain of thought: little of
  the answer repeats the prompt or itself);
- `code`: a function returned with its names changed (most of the answer
  copies the prompt);
- `summary`: a passage summarised by quoting its key sentences.
Decode tok/s is each stream's tokens after its first over the time from its
first to its last, summed over the streams; the median over the rounds. For
the speculating server the drafted and kept tokens come from its metrics.
The replies of the two terse servers are compared: speculation must not
change them. Every figure goes to bench-results/speculate-<timestamp>.json.
"""
import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RESULTS, TERSE, THREADS, fetch_model, free_port  # noqa: E402
from llama_server import ensure_llama_server  # noqa: E402
from vs_llama_server import Server, concurrent  # noqa: E402

CODE = '''def load_rows(path, skip_blank=True):
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle):
            line = line.rstrip("\\n")
            if skip_blank and not line.strip():
                continue
            rows.append((number, line))
    return rows


def count_words(rows):
    total = 0
    for number, line in rows:
        total += len(line.split())
    return total
'''

PASSAGE = (
    "The river town of Ellsworth grew around a single mill. In 1851 the mill burned, and for two years the town "
    "had no work. The council borrowed money to build a bridge instead of a new mill. The bridge brought farmers "
    "from the far bank to the Saturday market. By 1860 the market was the largest in the county. Merchants opened "
    "shops along the bridge road, and the town doubled in size. A new mill was finally built in 1872, but by then "
    "Ellsworth lived from trade, not from flour."
)

PROMPTS = {
    "cot": [
        "A baker made 48 muffins in the morning and half as many in the afternoon. She sold 50 of them. How many are left? Solve it step by step.",
        "Tom reads 12 pages a day for 5 days and then 20 pages a day for 3 days. How many pages did he read? Solve it step by step.",
        "A train travels 60 km an hour for 2 hours and 80 km an hour for 3 hours. How far does it go? Solve it step by step.",
    ],
    "code": [
        "Rename load_rows to read_records and count_words to word_total in this code, and return the whole code:\n\n" + CODE,
        "Rename the variable rows to records everywhere in this code, and return the whole code:\n\n" + CODE,
        "Add a docstring to each function in this code, and return the whole code:\n\n" + CODE,
    ],
    "summary": [
        "Summarise this passage in three sentences, quoting its key sentences word for word:\n\n" + PASSAGE,
        "List the events of this passage in order, one line each, using its own words:\n\n" + PASSAGE,
        "Which sentences of this passage are about the bridge? Quote them exactly:\n\n" + PASSAGE,
    ],
}


def metric(port, name):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def load(server, kind, streams, round_no, max_tokens):
    prompts = PROMPTS[kind]
    bodies = [server.body({"messages": [{"role": "user", "content": prompts[(round_no + i) % len(prompts)]}],
                           "max_tokens": max_tokens, "temperature": 0}) for i in range(streams)]
    results = concurrent(server.port, "/v1/chat/completions", bodies)
    decode = sum((r["tokens"] - 1) / (r["times"][-1] - r["times"][0]) for r in results if len(r["times"]) > 1)
    return decode, [r["text"] for r in results]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["qwen2.5-0.5b"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=192)
    args = ap.parse_args()
    out = {"threads": THREADS, "rounds": args.rounds, "max_tokens": args.max_tokens, "models": {}}
    for model in args.models:
        path = fetch_model(model)
        terse = lambda label, mode: Server(label, [TERSE, "serve", "--model", path, "--port", free_port(), "--speculate", mode])
        servers = [terse("terse-off", "off"), terse("terse-ngram", "ngram"),
                   Server("llama-server", [ensure_llama_server(), "-m", path, "--port", free_port(), "-t", THREADS, "-tb", THREADS,
                                           "-np", 8, "-c", 8 * 4096, "--cont-batching", "--jinja", "--alias", model, "--no-webui"])]
        for s in servers:
            s.wait_ready()
        figures, mismatches = {}, 0
        try:
            for kind in PROMPTS:
                for streams in [int(c) for c in args.concurrency.split(",")]:
                    rows = {s.label: [] for s in servers}
                    counted = {"proposed": 0.0, "accepted": 0.0, "steps": 0.0}
                    for r in range(args.rounds):
                        texts = {}
                        # Alternate which server goes first.
                        for s in (servers if r % 2 == 0 else servers[::-1]):
                            before = [metric(s.port, f"terse_speculative_{m}_total") for m in ("proposed_tokens", "accepted_tokens", "steps")] if s.label == "terse-ngram" else None
                            tok_s, texts[s.label] = load(s, kind, streams, r, args.max_tokens)
                            rows[s.label].append(tok_s)
                            if before is not None:
                                after = [metric(s.port, f"terse_speculative_{m}_total") for m in ("proposed_tokens", "accepted_tokens", "steps")]
                                for key, a, b in zip(counted, after, before):
                                    counted[key] += a - b
                        if texts["terse-off"] != texts["terse-ngram"]:
                            mismatches += 1
                    med = {label: statistics.median(v) for label, v in rows.items()}
                    steps = counted["steps"] or 1.0
                    figures[f"{kind}@{streams}"] = {
                        "decode_tok_s": med, "runs": rows,
                        "ngram_vs_off": med["terse-ngram"] / med["terse-off"],
                        "ngram_vs_llama": med["terse-ngram"] / med["llama-server"],
                        "off_vs_llama": med["terse-off"] / med["llama-server"],
                        "acceptance": counted["accepted"] / (counted["proposed"] or 1.0),
                        "tokens_per_verifying_step": (counted["accepted"] + counted["steps"]) / steps,
                        **counted,
                    }
                    f = figures[f"{kind}@{streams}"]
                    print(f"  {model} {kind:8s} x{streams}: off {med['terse-off']:7.1f}  ngram {med['terse-ngram']:7.1f}  "
                          f"llama-server {med['llama-server']:7.1f} tok/s | ngram/off {f['ngram_vs_off']:.2f}x  "
                          f"ngram/llama {f['ngram_vs_llama']:.2f}x | kept {f['acceptance']:.0%} of drafts, "
                          f"{f['tokens_per_verifying_step']:.2f} tokens a verifying step", flush=True)
        finally:
            for s in servers:
                s.stop()
        out["models"][model] = {"figures": figures, "reply_mismatches": mismatches}
        print(f"  {model}: replies that differed between terse-off and terse-ngram: {mismatches}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"speculate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
