#!/usr/bin/env python3
"""Time llama.cpp (through the llama-cpp-python PyPI package) on a GGUF:
prompt processing and decode tok/s, the way `moeflux bench` measures them.

Prints one JSON object. Usage:
  python3 scripts/bench/llama_cpp_bench.py -m model.gguf -p 512 -n 64 -t 2 [--no-mmap] [--repack 0] [--kv-type q8_0]
"""
import argparse
import json
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=0)
    ap.add_argument("--no-mmap", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-r", "--repetitions", type=int, default=1,
                    help="measure prompt and decode this many times (the same tokens, the KV cache reset) and report the medians, as `moeflux bench -r`")
    ap.add_argument("--repack", type=int, default=1, help="llama.cpp's weight repacking (extra buffer types); 1 is its default")
    ap.add_argument("--kv-type", default="f16", choices=["f16", "f32", "q8_0"],
                    help="KV cache type (type_k and type_v); q8_0 turns flash attention on, which llama.cpp needs for a quantized V cache")
    a = ap.parse_args()
    kv = {"f32": 0, "f16": 1, "q8_0": 8}[a.kv_type]

    if not a.repack:
        # llama-cpp-python has no argument for it: patch the default model
        # parameters the constructor starts from.
        # (llama.py calls it through the inner llama_cpp.llama_cpp module.)
        inner = llama_cpp.llama_cpp
        default = inner.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        inner.llama_model_default_params = no_repack

    t0 = time.time()
    llm = Llama(
        model_path=a.model,
        n_ctx=a.ctx or (a.prompt + a.n_gen + 16),
        n_batch=512,
        n_ubatch=512,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        use_mmap=not a.no_mmap,
        logits_all=False,
        type_k=kv,
        type_v=kv,
        **({"flash_attn": True} if a.kv_type == "q8_0" else {}),
        verbose=False,
    )
    load_s = time.time() - t0
    vocab = llm.n_vocab()
    rng = np.random.default_rng(a.seed)
    prompt = [int(x) for x in rng.integers(300, min(vocab, 100000), size=a.prompt)]

    # Like llama-bench, feed random tokens while generating (greedy decoding
    # of a random-weight model repeats one token and routes identically).
    gen_tokens = [int(x) for x in rng.integers(300, min(vocab, 100000), size=a.n_gen)]
    prompt_runs, gen_runs = [], []
    for _ in range(max(1, a.repetitions)):
        llm.reset()
        t = time.time()
        llm.eval(prompt)
        prompt_runs.append(time.time() - t)
        t = time.time()
        for tok in gen_tokens:
            llm.eval([tok])
        gen_runs.append(time.time() - t)
    prompt_s, gen_s = float(np.median(prompt_runs)), float(np.median(gen_runs))
    print(json.dumps({
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "model": a.model,
        "threads": a.threads,
        "mmap": not a.no_mmap,
        "repack": bool(a.repack),
        "kv_type": a.kv_type,
        "load_s": round(load_s, 3),
        "prompt_tokens": a.prompt,
        "prompt_tok_s": round(a.prompt / prompt_s, 3),
        "gen_tokens": a.n_gen,
        "decode_tok_s": round(a.n_gen / gen_s, 3),
        "repetitions": len(prompt_runs),
        "prompt_tok_s_runs": [round(a.prompt / s, 3) for s in prompt_runs],
        "decode_tok_s_runs": [round(a.n_gen / s, 3) for s in gen_runs],
    }))


if __name__ == "__main__":
    main()
