#!/usr/bin/env python3
"""Record llama.cpp's tokens and logits on a model file, as the fixtures that
tests/llama_cpp.rs compares terse against (llama.cpp itself takes too long to
build for CI). Needs llama-cpp-python (benches/requirements.txt).

    python3 tests/python/record_llama_cpp.py MODEL.gguf TEXT_FILE OUT.json [--bos] [--steps 8] [--n-ctx 4096]

The text is tokenized by llama.cpp, fed in one batch, then `--steps` greedy
tokens are decoded one at a time; for the last prompt position and each step
the 64 largest logits are kept (ids and values)."""
import argparse
import json

import llama_cpp
import numpy as np

TOP = 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text_file")
    ap.add_argument("out")
    ap.add_argument("--bos", action="store_true", help="start with BOS, as llama.cpp's completion does")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=4096,
                    help="llama.cpp's context (LongRoPE picks its factor set by it)")
    args = ap.parse_args()
    text = open(args.text_file, encoding="utf-8").read()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_batch=4096, n_ubatch=4096, n_threads=2,
                          logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=args.bos, special=False)
    llm.eval(ids)
    rows, inputs = [], []
    for step in range(args.steps + 1):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top = np.argsort(-logits, kind="stable")[:TOP]
        rows.append({"ids": [int(i) for i in top], "logits": [float(logits[i]) for i in top]})
        if step < args.steps:
            inputs.append(int(top[0]))
            llm.eval([int(top[0])])
    json.dump({"model": args.model.rsplit("/", 1)[-1], "text": text, "bos": args.bos, "prompt": ids,
               "inputs": inputs, "top": rows, "n_ctx": args.n_ctx, "llama_cpp_python": llama_cpp.__version__}, open(args.out, "w"))
    print(f"{args.out}: {len(ids)} prompt tokens, {len(inputs)} steps")


if __name__ == "__main__":
    main()
