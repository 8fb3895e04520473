#!/usr/bin/env python3
"""Speculative decoding (`terse serve --speculate ngram | draft:MODEL`)
against the plain engine and llama.cpp's server, side by side in one run.

    cargo build --release
    python3 benches/speculate.py qwen2.5-0.5b --rounds 3
    python3 benches/speculate.py qwen2.5-1.5b --rounds 3 --concurrency 1,4,8
    python3 benches/speculate.py qwen2.5-1.5b --draft qwen2.5-0.5b --concurrency 1,4

Servers on the same GGUF file and threads (2): terse `--speculate off`,
terse `--speculate ngram`, llama-server (plain, one slot per stream); with
`--draft`, also terse `--speculate draft:MODEL` and llama-server `-md MODEL`
(its default draft length). The
loads are chat requests, greedy, streamed, one kind at a time:
- `cot`: grade-school math solved step by step (chain of thought: little of
  the answer repeats the prompt or itself);
- `code`: a function returned with its names changed (most of the answer
  copies the prompt);
- `summary`: a passage summarised by quoting its key sentences.
Decode tok/s is each stream's tokens after its first over the time from its
first to its last, summed over the streams; the median over the rounds. For
the speculating server the drafted and kept tokens come from its metrics.
The replies of each speculating terse server are compared with the plain
one's: speculation must not change them. Every figure goes to bench-results/speculate-<timestamp>.json.
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


SPEC_COUNTERS = ("proposed_tokens", "accepted_tokens", "steps")


def spec_counts(server):
    return [metric(server.port, f"terse_speculative_{m}_total") for m in SPEC_COUNTERS]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["qwen2.5-0.5b"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--draft", help="a draft model for terse (--speculate draft:MODEL) and llama-server (-md)")
    ap.add_argument("--draft-tokens", type=int, help="terse's --speculate-draft-tokens (default: adaptive)")
    ap.add_argument("--no-ngram", action="store_true", help="leave out terse --speculate ngram")
    ap.add_argument("--draft-vocab", default="",
                    help="comma-separated N: also a terse draft server with --speculate-draft-vocab N for each (its head cut to the first N token ids)")
    ap.add_argument("--no-llama", action="store_true", help="leave out llama-server (terse's settings against each other only)")
    args = ap.parse_args()
    out = {"threads": THREADS, "rounds": args.rounds, "max_tokens": args.max_tokens, "draft": args.draft, "models": {}}
    for model in args.models:
        path = fetch_model(model)
        terse = lambda label, mode, *extra: Server(label, [TERSE, "serve", "--model", path, "--port", free_port(), "--speculate", mode, *extra])
        llama = lambda label, *extra: Server(label, [ensure_llama_server(), "-m", path, "--port", free_port(), "-t", THREADS, "-tb", THREADS,
                                                     "-np", 8, "-c", 8 * 4096, "--cont-batching", "--jinja", "--alias", model, "--no-webui", *extra])
        servers = [terse("terse-off", "off")]
        if not args.no_ngram:
            servers.append(terse("terse-ngram", "ngram"))
        if not args.no_llama:
            servers.append(llama("llama-server"))
        if args.draft:
            draft_path = fetch_model(args.draft)
            fixed = ["--speculate-draft-tokens", args.draft_tokens] if args.draft_tokens else []
            servers.append(terse("terse-draft", f"draft:{draft_path}", *fixed))
            for rows in filter(None, args.draft_vocab.split(",")):
                servers.append(terse(f"terse-draft-vocab{rows}", f"draft:{draft_path}", *fixed, "--speculate-draft-vocab", rows))
            if not args.no_llama:
                servers.append(llama("llama-server-draft", "-md", draft_path, "-td", THREADS, "-tbd", THREADS))
        speculating = [s.label for s in servers if s.label.startswith("terse-") and s.label != "terse-off"]
        for s in servers:
            s.wait_ready()
        figures, mismatches = {}, {label: 0 for label in speculating}
        try:
            for kind in PROMPTS:
                for streams in [int(c) for c in args.concurrency.split(",")]:
                    rows = {s.label: [] for s in servers}
                    counted = {label: dict.fromkeys(SPEC_COUNTERS, 0.0) for label in speculating}
                    for r in range(args.rounds):
                        texts = {}
                        # Alternate which server goes first.
                        for s in (servers if r % 2 == 0 else servers[::-1]):
                            before = spec_counts(s) if s.label in speculating else None
                            tok_s, texts[s.label] = load(s, kind, streams, r, args.max_tokens)
                            rows[s.label].append(tok_s)
                            if before is not None:
                                for key, a, b in zip(SPEC_COUNTERS, spec_counts(s), before):
                                    counted[s.label][key] += a - b
                        for label in speculating:
                            mismatches[label] += texts[label] != texts["terse-off"]
                    med = {label: statistics.median(v) for label, v in rows.items()}
                    f = figures[f"{kind}@{streams}"] = {"decode_tok_s": med, "runs": rows, "speculation": {}}
                    line = f"  {model} {kind:8s} x{streams}: " + "  ".join(f"{label} {v:6.1f}" for label, v in med.items()) + " tok/s"
                    for label in speculating:
                        c = counted[label]
                        steps = c["steps"] or 1.0
                        vs_llama = med[label] / med["llama-server"] if "llama-server" in med else None
                        f["speculation"][label] = {
                            "vs_off": med[label] / med["terse-off"], "vs_llama_server": vs_llama,
                            "acceptance": c["accepted_tokens"] / (c["proposed_tokens"] or 1.0),
                            "tokens_per_verifying_step": (c["accepted_tokens"] + c["steps"]) / steps, **c,
                        }
                        g = f["speculation"][label]
                        against_llama = f", {vs_llama:.2f}x llama-server" if vs_llama else ""
                        line += (f" | {label}: {g['vs_off']:.2f}x off{against_llama}, kept {g['acceptance']:.0%}, "
                                 f"{g['tokens_per_verifying_step']:.2f} a verifying step")
                    if "llama-server-draft" in med:
                        f["llama_draft_vs_llama"] = med["llama-server-draft"] / med["llama-server"]
                        line += f" | llama-server -md: {f['llama_draft_vs_llama']:.2f}x llama-server"
                    print(line, flush=True)
        finally:
            for s in servers:
                s.stop()
        out["models"][model] = {"figures": figures, "reply_mismatches": mismatches}
        print(f"  {model}: replies that differed from terse-off's: {mismatches}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"speculate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
