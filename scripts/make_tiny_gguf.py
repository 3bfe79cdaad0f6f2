#!/usr/bin/env python3
"""Write tests/data/tiny-qwen3moe.gguf (+ a 3-shard split copy) with gguf-py.

A tiny random-weight model of the qwen3moe shape (2 layers, hidden 256,
8 experts of ff 256, top-2) in mixed quant types, used to test the GGUF
reader and `moeflux inspect` against a file we did not write ourselves.
Byte totals computed by gguf-py's own GGUFReader go to
tests/data/tiny-qwen3moe.expected.json, so the test compares moeflux's
dense/expert accounting with an independent reader.

Usage: pip install gguf==0.19.0 numpy && python3 scripts/make_tiny_gguf.py
"""
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data")

HIDDEN, FF, N_EXP, TOP_K, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 256, 8, 2, 2, 4, 2, 64


def byte_level_alphabet():
    """GPT-2's byte-to-unicode map: the 256 single-byte tokens of a
    byte-level BPE vocabulary, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
TOKENS = byte_level_alphabet() + ["".join(m) for m in MERGES] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = len(TOKENS) + 5  # padded rows, as real vocabularies often are


def rand(rng, *shape, scale=None):
    fan_in = shape[-1]
    return (rng.standard_normal(shape) * (scale or fan_in ** -0.5)).astype(np.float32)


def random_blocks(rng, qtype, shape):
    """Random but valid blocks of a type gguf-py cannot quantize (k-quants)."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1]))
    n_blocks = rows * shape[-1] // bs
    blocks = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    scale_at = {T.Q4_K: [0, 2], T.Q6_K: [ts - 2]}[qtype]
    for off in scale_at:
        blocks[:, off:off + 2] = (rng.uniform(0.001, 0.01, n_blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], shape[-1] // bs * ts)


def add(w, rng, name, shape, qtype):
    if qtype in (T.F32, T.F16):
        data = rand(rng, *shape) if len(shape) > 1 else (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        w.add_tensor(name, data.astype(np.float16) if qtype == T.F16 else data)
    elif qtype in (T.Q8_0, T.Q4_0):
        q = gguf.quants.quantize(rand(rng, *shape), qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    else:
        q = random_blocks(rng, qtype, shape)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)


def build(path, split_max_tensors=0):
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(path, "qwen3moe", split_max_tensors=split_max_tensors)
    w.add_name("tiny-qwen3moe")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF * 3)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(N_EXP)
    w.add_expert_used_count(TOP_K)
    w.add_expert_feed_forward_length(FF)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (256 + len(MERGES)) + [3, 3, 3])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_eos_token_id(len(TOKENS) - 1)
    add(w, rng, "token_embd.weight", (VOCAB, HIDDEN), T.Q8_0)
    for l in range(LAYERS):
        p = f"blk.{l}."
        add(w, rng, p + "attn_norm.weight", (HIDDEN,), T.F32)
        add(w, rng, p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), T.F16)
        add(w, rng, p + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), T.F16)
        add(w, rng, p + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), T.F16)
        add(w, rng, p + "attn_q_norm.weight", (HEAD_DIM,), T.F32)
        add(w, rng, p + "attn_k_norm.weight", (HEAD_DIM,), T.F32)
        add(w, rng, p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), T.Q8_0)
        add(w, rng, p + "ffn_norm.weight", (HIDDEN,), T.F32)
        add(w, rng, p + "ffn_gate_inp.weight", (N_EXP, HIDDEN), T.F32)
        gate_up = T.Q4_K if l == 0 else T.Q4_0
        down = T.Q6_K if l == 0 else T.Q8_0
        add(w, rng, p + "ffn_gate_exps.weight", (N_EXP, FF, HIDDEN), gate_up)
        add(w, rng, p + "ffn_up_exps.weight", (N_EXP, FF, HIDDEN), gate_up)
        add(w, rng, p + "ffn_down_exps.weight", (N_EXP, HIDDEN, FF), down)
    add(w, rng, "output_norm.weight", (HIDDEN,), T.F32)
    add(w, rng, "output.weight", (VOCAB, HIDDEN), T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def totals(paths):
    dense = experts = count = 0
    per_layer = {}
    for p in paths:
        r = gguf.GGUFReader(p)
        for t in r.tensors:
            count += 1
            if "_exps." in t.name:
                experts += int(t.n_bytes)
                layer = int(t.name.split(".")[1])
                per_layer[layer] = per_layer.get(layer, 0) + int(t.n_bytes) // N_EXP
            else:
                dense += int(t.n_bytes)
    return {
        "tensor_count": count,
        "dense_bytes": dense,
        "expert_bytes": experts,
        "one_expert_bytes": [per_layer[l] for l in sorted(per_layer)],
        "n_layers": LAYERS,
        "n_experts": N_EXP,
        "top_k": TOP_K,
        "vocab": VOCAB,
        "tokenizer_tokens": len(TOKENS),
        "gguf": __import__("importlib.metadata").metadata.version("gguf"),
    }


def main():
    single = os.path.join(OUT, "tiny-qwen3moe.gguf")
    build(single)
    split_dir = os.path.join(OUT, "split")
    os.makedirs(split_dir, exist_ok=True)
    build(os.path.join(split_dir, "tiny-qwen3moe.gguf"), split_max_tensors=12)
    shards = sorted(os.path.join(split_dir, f) for f in os.listdir(split_dir) if f.endswith(".gguf"))
    t = totals([single])
    assert t == totals(shards), "split copy differs"
    t["split_shards"] = [os.path.basename(s) for s in shards]
    with open(os.path.join(OUT, "tiny-qwen3moe.expected.json"), "w") as f:
        json.dump(t, f, indent=2)
        f.write("\n")
    print(json.dumps(t))


if __name__ == "__main__":
    main()
