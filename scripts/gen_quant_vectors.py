#!/usr/bin/env python3
"""Generate the quant-format test vectors in tests/data/quant/.

For every GGUF block type moeflux decodes, random blocks (random payload
bits, finite random scales) are dequantized by gguf-py's numpy reference
(the `gguf` PyPI package) and both are saved as .npy:

    <TYPE>.blocks.npy    uint8   [n_blocks, type_size]
    <TYPE>.expected.npy  float32 [n_blocks, block_size]

MLX affine quantization has no gguf-py implementation; it is checked against
a direct numpy transcription of its formula (w = q * scale + bias per group,
q packed little-endian in u32 words), in float32:

    mlx_q<bits>_g<group>.{weight,scales,biases,expected}.npy

Quantization to Q8_0 (what moeflux's q8_0 KV cache stores) is checked against gguf-py's
quantizer, which follows ggml's reference `quantize_row_q8_0_ref` bit for bit: rows of f32
values of varied scale (with zero blocks, outliers, exact halves) and their blocks,

    Q8_0.quantize.input.npy   float32 [n_rows, 128]
    Q8_0.quantize.blocks.npy  uint8   [n_rows * 4, 34]

The Rust test `tests/quant_vectors.rs` requires bit-for-bit equality.

Usage: pip install gguf==0.19.0 numpy && python3 scripts/gen_quant_vectors.py
"""
import importlib.metadata
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "quant")

# Byte offsets of the f16 scale fields of each block type.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.MXFP4: [],
}


def random_f16(rng, n):
    """Finite f16 values spanning several orders of magnitude, both signs."""
    mag = 10.0 ** rng.uniform(-5, 2, size=n)
    sign = rng.choice([-1.0, 1.0], size=n)
    return (mag * sign).astype(np.float16)


def finite_bits16(rng, n, exp_mask, exp_all_ones):
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    bad = (bits & exp_mask) == exp_all_ones  # inf / NaN patterns
    bits[bad] &= np.uint16(~exp_mask & 0xFFFF)
    return bits


def gen_ggml(rng, qtype, n_blocks):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        vals = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-6, 6, n_blocks)).astype(np.float32)
        blocks = vals.view(np.uint8).reshape(n_blocks, 4)
    elif qtype == T.F16:
        blocks = finite_bits16(rng, n_blocks, 0x7C00, 0x7C00).view(np.uint8).reshape(n_blocks, 2)
    elif qtype == T.BF16:
        blocks = finite_bits16(rng, n_blocks, 0x7F80, 0x7F80).view(np.uint8).reshape(n_blocks, 2)
    else:
        blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            blocks[:, off:off + 2] = random_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    blocks = np.ascontiguousarray(blocks)
    expected = dequantize(blocks.reshape(1, -1), qtype).reshape(n_blocks, block_size).astype(np.float32)
    return blocks, expected


def gen_q8_0_quantize(rng, n_rows, dim):
    x = rng.standard_normal((n_rows, dim)) * 10.0 ** rng.uniform(-4, 3, (n_rows, 1))
    x[0, :32] = 0.0                                   # a zero block
    x[1, 5] = 1e4 * np.abs(x[1]).max()                # an outlier
    x[2, :32] = np.arange(-16, 16) + 0.5              # step 1 (max 127): every code a tie
    x[2, 0] = 127.0
    x = x.astype(np.float32)
    blocks = quantize(x, T.Q8_0).reshape(n_rows * dim // 32, 34)
    return x, np.ascontiguousarray(blocks)


def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def gen_mlx(rng, bits, group, rows, cols):
    per_word = 32 // bits
    weight = rng.integers(0, 1 << 32, size=(rows, cols // per_word), dtype=np.uint64).astype(np.uint32)
    scales = bf16_bits(rng.standard_normal((rows, cols // group)) * 0.02)
    biases = bf16_bits(rng.standard_normal((rows, cols // group)) * 0.05)
    # Unpack: element j of a word sits in bits [j*bits, (j+1)*bits).
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).reshape(1, 1, per_word)
    q = ((weight[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(rows, cols).astype(np.float32)
    s = (scales.astype(np.uint32) << 16).view(np.float32)
    b = (biases.astype(np.uint32) << 16).view(np.float32)
    s = np.repeat(s, group, axis=1)
    b = np.repeat(b, group, axis=1)
    expected = (q * s + b).astype(np.float32)
    return weight, scales, biases, expected


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20261125)
    types = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.MXFP4]
    for qtype in types:
        block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = 48 if block_size == 256 else (256 if block_size == 32 else 512)
        blocks, expected = gen_ggml(rng, qtype, n_blocks)
        np.save(os.path.join(OUT, f"{qtype.name}.blocks.npy"), blocks)
        np.save(os.path.join(OUT, f"{qtype.name}.expected.npy"), expected)
        print(f"{qtype.name:6s} {n_blocks} blocks")
    for bits, group in [(4, 64), (8, 64), (4, 32), (8, 32)]:
        w, s, b, e = gen_mlx(rng, bits, group, rows=8, cols=256)
        base = os.path.join(OUT, f"mlx_q{bits}_g{group}")
        np.save(base + ".weight.npy", w)
        np.save(base + ".scales.npy", s)
        np.save(base + ".biases.npy", b)
        np.save(base + ".expected.npy", e)
        print(f"mlx q{bits} g{group}")
    x, blocks = gen_q8_0_quantize(np.random.default_rng(20261127), 24, 128)
    np.save(os.path.join(OUT, "Q8_0.quantize.input.npy"), x)
    np.save(os.path.join(OUT, "Q8_0.quantize.blocks.npy"), blocks)
    print(f"Q8_0 quantize: {x.shape[0]} rows")
    with open(os.path.join(OUT, "VERSION"), "w") as f:
        f.write(f"gguf {importlib.metadata.version('gguf')}; numpy {np.__version__}; python {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
