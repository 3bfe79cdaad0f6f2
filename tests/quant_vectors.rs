//! Every reference dequantizer against gguf-py's numpy output (and MLX
//! affine against a numpy transcription of its formula), bit for bit.
//! Vectors: `scripts/gen_quant_vectors.py` → `tests/data/quant/`.

mod common;

use moeflux::quant::dequant::dequantize;
use moeflux::quant::mlx::ScaleType;
use moeflux::quant::{GgmlType, MlxAffine};

fn check_ggml(ty: GgmlType) {
    let blocks = common::npy(&common::data(&format!("quant/{}.blocks.npy", ty.name())));
    let expected = common::npy(&common::data(&format!("quant/{}.expected.npy", ty.name())));
    let expected = expected.to_f32().unwrap();
    assert_eq!(blocks.shape[1], ty.type_size());
    let n_blocks = blocks.shape[0];
    assert!(n_blocks >= 48, "too few vectors for {ty}");
    let mut out = vec![0f32; n_blocks * ty.block_size()];
    dequantize(ty, &blocks.data, &mut out).unwrap();
    for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{ty}: element {i} (block {}): moeflux {a} vs gguf-py {b}",
            i / ty.block_size()
        );
    }
}

macro_rules! ggml_tests {
    ($($name:ident => $ty:ident),* $(,)?) => {
        $(#[test] fn $name() { check_ggml(GgmlType::$ty); })*
    };
}

ggml_tests! {
    f32 => F32, f16 => F16, bf16 => BF16, q8_0 => Q8_0, q4_0 => Q4_0, q4_1 => Q4_1,
    q5_0 => Q5_0, q5_1 => Q5_1, q2_k => Q2_K, q3_k => Q3_K, q4_k => Q4_K,
    q5_k => Q5_K, q6_k => Q6_K, mxfp4 => MXFP4,
}

/// The list of GGUF types must all be covered by vectors.
#[test]
fn every_reference_type_has_vectors() {
    for ty in GgmlType::ALL
        .into_iter()
        .filter(|t| t.has_reference_dequant())
    {
        let p = common::data(&format!("quant/{}.blocks.npy", ty.name()));
        assert!(p.is_file(), "no gguf-py vectors for {ty}");
    }
}

fn check_mlx(bits: u8, group: u32) {
    let base = format!("quant/mlx_q{bits}_g{group}");
    let w = common::npy(&common::data(&format!("{base}.weight.npy")));
    let s = common::npy(&common::data(&format!("{base}.scales.npy")));
    let b = common::npy(&common::data(&format!("{base}.biases.npy")));
    let e = common::npy(&common::data(&format!("{base}.expected.npy")));
    let expected = e.to_f32().unwrap();
    let m = MlxAffine {
        bits,
        group_size: group,
        scale_type: ScaleType::BF16,
    };
    let mut out = vec![0f32; expected.len()];
    m.dequantize(&w.data, &s.data, &b.data, &mut out).unwrap();
    for (i, (x, y)) in out.iter().zip(&expected).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "MLX q{bits} g{group}: element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn mlx_affine_4bit_g64() {
    check_mlx(4, 64);
}

#[test]
fn mlx_affine_8bit_g64() {
    check_mlx(8, 64);
}

#[test]
fn mlx_affine_4bit_g32() {
    check_mlx(4, 32);
}

#[test]
fn mlx_affine_8bit_g32() {
    check_mlx(8, 32);
}

/// The q8_0 KV cache quantizes as gguf-py does (which follows ggml's
/// reference quantizer): every scale and code equal, on rows with a zero
/// block, an outlier and rounding ties.
#[test]
fn q8_0_kv_cache_quantizes_like_gguf_py() {
    use moeflux::state::kv::{KvCache, Rows};
    use moeflux::state::KvType;
    let x = common::npy(&common::data("quant/Q8_0.quantize.input.npy"));
    let blocks = common::npy(&common::data("quant/Q8_0.quantize.blocks.npy"));
    let (rows, dim) = (x.shape[0], x.shape[1]);
    let x = x.to_f32().unwrap();
    assert_eq!(blocks.shape, vec![rows * dim / 32, 34]);
    let mut cache = KvCache::new(&[Some((dim, dim))], rows, KvType::Q8_0);
    cache.layers[0].push(&x, &x);
    let Rows::Q8_0(q) = &cache.layers[0].k else {
        panic!("not a q8_0 cache")
    };
    for (b, want) in blocks.data.chunks_exact(34).enumerate() {
        assert_eq!(q.d[b].to_le_bytes(), [want[0], want[1]], "block {b}: scale");
        let codes: Vec<u8> = q.q[32 * b..32 * b + 32].iter().map(|&c| c as u8).collect();
        assert_eq!(codes, want[2..], "block {b}: codes");
    }
}
