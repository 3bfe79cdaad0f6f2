//! Synthetic models at real shapes, for benchmarks: random weights in valid
//! quant blocks, a synthetic byte-level BPE tokenizer and the metadata
//! llama.cpp needs, so moeflux and llama.cpp read the same bytes.
//!
//! Weights are drawn symmetric around zero with a standard deviation of
//! `1/√fan_in` (raw random bytes would bias every weight the same way and
//! make every token's logits and routing nearly identical), with three
//! adjustments that keep tokens distinct through depth (see
//! `ATTN_OUT_SCALE`). Expert
//! popularity can be skewed to follow a Zipf law (`--skew zipf:S`): random
//! routers otherwise pick experts almost uniformly, the worst case for any
//! cache. The skew works through one residual dimension that every token's
//! embedding sets to a large constant; each router's weight on that
//! dimension acts as a per-expert bias, calibrated by simulation.

use std::io::{self, Write};

use half::f16;

use crate::format::gguf::{GgufWriter, MetaArray, MetaValue, StringArray};
use crate::quant::{GgmlType, QK_K};

/// Standard deviation of the embedding's elements: 1, so a token's own
/// vector is as large as what the layers add to it.
const EMBED_SIGMA: f32 = 1.0;
/// The attention output projection at this fraction of `1/√fan_in`, and
/// per-head q/k norm weights of 3 (sharper attention). Random attention is
/// nearly flat, so it adds the average of the context to every token; at
/// full scale that common vector swamps token identity within a few layers
/// and every token routes alike. Measured on the qwen3-30b-a3b shape (64
/// random tokens, distinct experts chosen per layer, of 128): with plain
/// `1/√fan_in` init 102, 66, 44, 48, 36, 29, 42, 38 over layers 0–7; with
/// these settings 122–127 in each of 24 layers, as uniform routing gives.
const ATTN_OUT_SCALE: f32 = 0.2;
const QK_NORM: f32 = 3.0;

/// A model shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// GGUF architecture.
    pub arch: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_ff: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_theta: f32,
    /// Rotated dimensions per head.
    pub rope_dims: usize,
    /// Hidden size of the shared expert (0: none).
    pub shared_ff: usize,
    /// Gated-DeltaNet layers (the Qwen hybrids).
    pub linear: Option<SynthLinear>,
}

/// The linear-attention shape of a hybrid preset. Every `interval`-th
/// layer is full attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SynthLinear {
    pub k_heads: usize,
    pub v_heads: usize,
    /// Key and value head dimension (equal in every released model).
    pub head_dim: usize,
    pub conv_kernel: usize,
    pub interval: usize,
}

/// A Qwen hybrid preset (Qwen3.5 and Qwen3-Next share these settings:
/// head_dim 256 with a quarter rotated, θ = 10⁷, 2 KV heads, linear heads
/// of 128 with a conv kernel of 4, full attention every 4th layer).
#[allow(clippy::too_many_arguments)]
const fn hybrid(
    name: &'static str,
    arch: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    experts: usize,
    top_k: usize,
    expert_ff: usize,
    vocab: usize,
    v_heads: usize,
) -> Preset {
    Preset {
        name,
        arch,
        hidden,
        layers,
        heads,
        kv_heads: 2,
        head_dim: 256,
        experts,
        top_k,
        expert_ff,
        vocab,
        context: 262_144,
        rope_theta: 10_000_000.0,
        rope_dims: 64,
        shared_ff: expert_ff,
        linear: Some(SynthLinear {
            k_heads: 16,
            v_heads,
            head_dim: 128,
            conv_kernel: 4,
            interval: 4,
        }),
    }
}

/// The shapes `moeflux synth` knows.
pub fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "qwen3-30b-a3b",
            arch: "qwen3moe",
            hidden: 2048,
            layers: 48,
            heads: 32,
            kv_heads: 4,
            head_dim: 128,
            experts: 128,
            top_k: 8,
            expert_ff: 768,
            vocab: 151_936,
            context: 40_960,
            rope_theta: 1_000_000.0,
            rope_dims: 128,
            shared_ff: 0,
            linear: None,
        },
        Preset {
            name: "qwen3-235b-a22b",
            arch: "qwen3moe",
            hidden: 4096,
            layers: 94,
            heads: 64,
            kv_heads: 4,
            head_dim: 128,
            experts: 128,
            top_k: 8,
            expert_ff: 1536,
            vocab: 151_936,
            context: 40_960,
            rope_theta: 1_000_000.0,
            rope_dims: 128,
            shared_ff: 0,
            linear: None,
        },
        // Shapes from the released configs (hidden, layers, heads, experts,
        // top-k, expert ff = shared expert ff, vocabulary, value heads).
        hybrid(
            "qwen3.5-35b-a3b",
            "qwen35moe",
            2048,
            40,
            16,
            256,
            8,
            512,
            248_320,
            32,
        ),
        hybrid(
            "qwen3.5-122b-a10b",
            "qwen35moe",
            3072,
            48,
            32,
            256,
            8,
            1024,
            248_320,
            64,
        ),
        hybrid(
            "qwen3.5-397b-a17b",
            "qwen35moe",
            4096,
            60,
            32,
            512,
            10,
            1024,
            248_320,
            64,
        ),
        hybrid(
            "qwen3-next-80b-a3b",
            "qwen3next",
            2048,
            48,
            16,
            512,
            10,
            512,
            151_936,
            32,
        ),
        // Small shapes for tests.
        Preset {
            name: "test-stream",
            arch: "qwen3moe",
            hidden: 512,
            layers: 8,
            heads: 8,
            kv_heads: 2,
            head_dim: 64,
            experts: 64,
            top_k: 4,
            expert_ff: 512,
            vocab: 2048,
            context: 4096,
            rope_theta: 1_000_000.0,
            rope_dims: 64,
            shared_ff: 0,
            linear: None,
        },
        Preset {
            name: "tiny-qwen3moe",
            arch: "qwen3moe",
            hidden: 256,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            experts: 16,
            top_k: 4,
            expert_ff: 256,
            vocab: 1024,
            context: 4096,
            rope_theta: 1_000_000.0,
            rope_dims: 64,
            shared_ff: 0,
            linear: None,
        },
        Preset {
            name: "tiny-qwen35moe",
            arch: "qwen35moe",
            hidden: 256,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            experts: 16,
            top_k: 4,
            expert_ff: 256,
            vocab: 1024,
            context: 4096,
            rope_theta: 10_000_000.0,
            rope_dims: 16,
            shared_ff: 256,
            linear: Some(SynthLinear {
                k_heads: 2,
                v_heads: 4,
                head_dim: 64,
                conv_kernel: 4,
                interval: 2,
            }),
        },
    ]
}

/// What to write.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub preset: Preset,
    /// Keep only the first N layers.
    pub layers: Option<usize>,
    /// Type of the large matrices (attention, experts, LM head).
    pub quant: GgmlType,
    /// Zipf exponent of expert popularity; `None` for plain random routers.
    pub skew: Option<f64>,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?} (known: {1})")]
    UnknownPreset(String, String),
    #[error(
        "synth cannot fill {0} blocks (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)"
    )]
    UnsupportedQuant(GgmlType),
    #[error("--skew {0:?} is not of the form zipf:S with S > 0")]
    BadSkew(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<Preset, SynthError> {
    let all = presets();
    all.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
        SynthError::UnknownPreset(
            name.into(),
            all.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        )
    })
}

/// Parses `zipf:S`.
pub fn parse_skew(s: &str) -> Result<f64, SynthError> {
    s.strip_prefix("zipf:")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| SynthError::BadSkew(s.into()))
}

/// wyrand: fast, good enough for weights.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-300);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Packs eight 6-bit scales and mins the way Q4_K/Q5_K store them.
pub fn pack_k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out
}

/// A 4-bit code symmetric around 7.5... mapped so that the code 0 (which
/// would make -8, unmatched by +8) is not used for zero-centred formats.
#[inline]
fn nibble_sym(b: u8) -> u8 {
    // 1..=15, i.e. -7..=7 after the -8 offset.
    let n = b & 15;
    if n == 0 {
        8
    } else {
        n
    }
}

/// Fills `out` (whole blocks of `ty`) with random weights of standard
/// deviation about `sigma`, symmetric around zero.
pub fn fill_blocks(
    ty: GgmlType,
    rng: &mut Rng,
    sigma: f32,
    out: &mut [u8],
) -> Result<(), SynthError> {
    let ts = ty.type_size();
    match ty {
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                let v = (rng.unit() as f32 * 2.0 - 1.0) * sigma * 3f32.sqrt();
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            for c in out.chunks_exact_mut(2) {
                let v = (rng.unit() as f32 * 2.0 - 1.0) * sigma * 3f32.sqrt();
                let bits = if ty == GgmlType::F16 {
                    f16::from_f32(v).to_bits()
                } else {
                    (v.to_bits() >> 16) as u16
                };
                c.copy_from_slice(&bits.to_le_bytes());
            }
        }
        GgmlType::Q8_0 => {
            // Uniform integers in -127..=127 have a standard deviation of 73.3.
            let d = f16::from_f32(sigma / 73.3).to_le_bytes();
            for b in out.chunks_exact_mut(ts) {
                b[..2].copy_from_slice(&d);
                rng.fill(&mut b[2..]);
                for q in &mut b[2..] {
                    if *q == 0x80 {
                        *q = 0;
                    }
                }
            }
        }
        GgmlType::Q4_0 => {
            // -7..=7: standard deviation 4.32.
            let d = f16::from_f32(sigma / 4.32).to_le_bytes();
            for b in out.chunks_exact_mut(ts) {
                b[..2].copy_from_slice(&d);
                rng.fill(&mut b[2..]);
                for q in &mut b[2..] {
                    *q = nibble_sym(*q) | (nibble_sym(*q >> 4) << 4);
                }
            }
        }
        GgmlType::Q4_K => {
            // value = d·8·q − d·60 = 8d(q − 7.5), q uniform in 0..=15
            // (standard deviation of q − 7.5: 4.61).
            let d = f16::from_f32(sigma / (8.0 * 4.61)).to_le_bytes();
            let scales = pack_k_scales([8; 8], [60; 8]);
            for b in out.chunks_exact_mut(ts) {
                b[0..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&d);
                b[4..16].copy_from_slice(&scales);
                rng.fill(&mut b[16..]);
            }
        }
        GgmlType::Q5_K => {
            // value = 4d(q − 15.5), q uniform in 0..=31 (std 9.23).
            let d = f16::from_f32(sigma / (4.0 * 9.23)).to_le_bytes();
            let scales = pack_k_scales([4; 8], [62; 8]);
            for b in out.chunks_exact_mut(ts) {
                b[0..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&d);
                b[4..16].copy_from_slice(&scales);
                rng.fill(&mut b[16..]);
            }
        }
        GgmlType::Q6_K => {
            // value = 16d(q − 32); low nibbles and high pairs random, so q is
            // uniform in 0..=63 (std 18.5); scales 16.
            let d = f16::from_f32(sigma / (16.0 * 18.5)).to_le_bytes();
            for b in out.chunks_exact_mut(ts) {
                rng.fill(&mut b[..192]);
                b[192..208].fill(16);
                b[208..210].copy_from_slice(&d);
            }
        }
        other => return Err(SynthError::UnsupportedQuant(other)),
    }
    Ok(())
}

/// GPT-2's byte-to-unicode alphabet: the 256 single-byte tokens.
pub fn byte_alphabet() -> Vec<String> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).map(String::from).unwrap_or_default()
        })
        .collect()
}

/// A synthetic byte-level BPE vocabulary of `n_normal` tokens: the 256 byte
/// tokens, then merges of lower-case words (with and without a leading
/// space), each merge joining two existing tokens. Returns tokens and merges.
pub fn synth_vocab(n_normal: usize, rng: &mut Rng) -> (Vec<String>, Vec<String>) {
    let bytes = byte_alphabet();
    let mut tokens = bytes.clone();
    let mut merges = Vec::new();
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let letters: Vec<&str> = (b'a'..=b'z').map(|c| &bytes[c as usize][..]).collect();
    let space = &bytes[b' ' as usize];
    // Level 1: a space or a letter followed by a letter.
    let mut frontier: Vec<String> = Vec::new();
    for first in std::iter::once(space.as_str()).chain(letters.iter().copied()) {
        for &second in &letters {
            if tokens.len() >= n_normal {
                break;
            }
            let t = format!("{first}{second}");
            if seen.insert(t.clone()) {
                merges.push(format!("{first} {second}"));
                tokens.push(t.clone());
                frontier.push(t);
            }
        }
    }
    // Longer tokens: an existing multi-byte token followed by a letter.
    let mut guard = 0usize;
    while tokens.len() < n_normal && guard < 50 * n_normal {
        guard += 1;
        let base = &frontier[(rng.next_u64() % frontier.len() as u64) as usize];
        let letter = letters[(rng.next_u64() % 26) as usize];
        let t = format!("{base}{letter}");
        if seen.insert(t.clone()) {
            merges.push(format!("{base} {letter}"));
            tokens.push(t.clone());
            frontier.push(t);
        }
    }
    (tokens, merges)
}

/// Per-expert router biases whose top-k selection frequencies follow a
/// Zipf law with exponent `s`, when each logit is `bias + N(0, noise²)`.
/// Calibrated by simulation (deterministic for a seed).
pub fn zipf_biases(n: usize, k: usize, s: f64, noise: f64, rng: &mut Rng) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-s)).collect();
    let total: f64 = weights.iter().sum();
    // Target selections per token of each expert (sums to k), capped at 1.
    let target: Vec<f64> = weights
        .iter()
        .map(|w| (w / total * k as f64).min(0.98))
        .collect();
    let mut bias = vec![0f64; n];
    let trials = 4000;
    let mut logits = vec![0f64; n];
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..60 {
        let mut count = vec![0f64; n];
        for _ in 0..trials {
            for (l, b) in logits.iter_mut().zip(&bias) {
                *l = b + noise * rng.normal();
            }
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            for &e in &order[..k] {
                count[e] += 1.0;
            }
        }
        for e in 0..n {
            let got = (count[e] / trials as f64).max(0.5 / trials as f64);
            bias[e] += 0.5 * noise * (target[e] / got).ln();
        }
    }
    bias
}

/// Writes a synthetic model; `progress(done, total)` is called as bytes are
/// written.
pub fn write(
    spec: &SynthSpec,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, SynthError> {
    let p = &spec.preset;
    let layers = spec.layers.unwrap_or(p.layers).min(p.layers).max(1);
    fill_blocks(
        spec.quant,
        &mut Rng::new(0),
        1.0,
        &mut vec![0u8; spec.quant.type_size()],
    )?;
    let (h, ff, ne) = (p.hidden, p.expert_ff, p.experts);
    let (q_dim, kv_dim) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let mut rng = Rng::new(spec.seed);

    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let (mut tokens, merges) = synth_vocab(p.vocab - specials.len(), &mut rng);
    let n_normal = tokens.len();
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let mut types = vec![1i32; n_normal];
    types.extend([3, 3, 3]);

    let mut w = GgufWriter::new();
    let a = p.arch;
    let s = |v: &str| MetaValue::String(v.into());
    let u = |v: usize| MetaValue::U32(v as u32);
    w.add("general.architecture", s(a));
    w.add(
        "general.name",
        s(&format!(
            "synthetic {} ({} layers, {})",
            p.name, layers, spec.quant
        )),
    );
    w.add("general.file_type", MetaValue::U32(0));
    w.add(format!("{a}.context_length"), u(p.context));
    w.add(format!("{a}.embedding_length"), u(h));
    w.add(format!("{a}.block_count"), u(layers));
    w.add(format!("{a}.feed_forward_length"), u(ff * 8));
    w.add(format!("{a}.attention.head_count"), u(p.heads));
    w.add(format!("{a}.attention.head_count_kv"), u(p.kv_heads));
    w.add(format!("{a}.attention.key_length"), u(p.head_dim));
    w.add(format!("{a}.attention.value_length"), u(p.head_dim));
    w.add(format!("{a}.rope.freq_base"), MetaValue::F32(p.rope_theta));
    w.add(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-6),
    );
    w.add(format!("{a}.expert_count"), u(ne));
    w.add(format!("{a}.expert_used_count"), u(p.top_k));
    w.add(format!("{a}.expert_feed_forward_length"), u(ff));
    if p.shared_ff > 0 {
        w.add(
            format!("{a}.expert_shared_feed_forward_length"),
            u(p.shared_ff),
        );
    }
    if p.rope_dims != p.head_dim {
        w.add(format!("{a}.rope.dimension_count"), u(p.rope_dims));
    }
    if let Some(lin) = p.linear {
        w.add(format!("{a}.ssm.conv_kernel"), u(lin.conv_kernel));
        w.add(format!("{a}.ssm.state_size"), u(lin.head_dim));
        w.add(format!("{a}.ssm.group_count"), u(lin.k_heads));
        w.add(format!("{a}.ssm.time_step_rank"), u(lin.v_heads));
        w.add(format!("{a}.ssm.inner_size"), u(lin.v_heads * lin.head_dim));
        w.add(format!("{a}.full_attention_interval"), u(lin.interval));
        if a == "qwen35moe" {
            // Multimodal RoPE sections (t, h, w, -) in rotated pairs; text
            // positions are equal in every section, so they change nothing.
            let pairs = (p.rope_dims / 2) as i32;
            let (t, hh) = (pairs * 3 / 8, pairs * 3 / 8);
            w.add(
                format!("{a}.rope.dimension_sections"),
                MetaValue::Array(MetaArray::I32(vec![t, hh, pairs - t - hh, 0])),
            );
        }
    }
    w.add("tokenizer.ggml.model", s("gpt2"));
    w.add("tokenizer.ggml.pre", s("qwen2"));
    w.add(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(StringArray::from_iter(
            tokens.iter().map(String::as_str),
        ))),
    );
    w.add(
        "tokenizer.ggml.token_type",
        MetaValue::Array(MetaArray::I32(types)),
    );
    w.add(
        "tokenizer.ggml.merges",
        MetaValue::Array(MetaArray::String(StringArray::from_iter(
            merges.iter().map(String::as_str),
        ))),
    );
    w.add("tokenizer.ggml.eos_token_id", u(n_normal + 2));
    w.add("tokenizer.ggml.padding_token_id", u(n_normal));
    w.add("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    w.add("tokenizer.chat_template", s(CHAT_TEMPLATE));
    w.add("moeflux.synth.seed", MetaValue::U64(spec.seed));
    if let Some(sk) = spec.skew {
        w.add("moeflux.synth.zipf", MetaValue::F64(sk));
    }

    let io = |e: io::Error| SynthError::Io(e);
    w.add_tensor(
        "token_embd.weight",
        GgmlType::Q8_0,
        &[p.vocab as u64, h as u64],
    )
    .map_err(io)?;
    for l in 0..layers {
        let t = |n: &str| format!("blk.{l}.{n}");
        let q = spec.quant;
        let mut add = |name: &str, ty: GgmlType, shape: &[usize]| -> Result<(), SynthError> {
            let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
            w.add_tensor(t(name), ty, &shape).map_err(io)
        };
        add("attn_norm.weight", GgmlType::F32, &[h])?;
        let linear_layer = p.linear.filter(|lin| (l + 1) % lin.interval != 0);
        if let Some(lin) = linear_layer {
            let (nk, nv, d) = (lin.k_heads, lin.v_heads, lin.head_dim);
            let ch = 2 * nk * d + nv * d;
            add("attn_qkv.weight", q, &[ch, h])?;
            add("attn_gate.weight", q, &[nv * d, h])?;
            if a == "qwen3next" {
                add("ssm_ba.weight", GgmlType::F32, &[2 * nv, h])?;
            } else {
                add("ssm_beta.weight", GgmlType::F32, &[nv, h])?;
                add("ssm_alpha.weight", GgmlType::F32, &[nv, h])?;
            }
            add("ssm_conv1d.weight", GgmlType::F32, &[ch, lin.conv_kernel])?;
            add("ssm_a", GgmlType::F32, &[nv])?;
            add("ssm_dt.bias", GgmlType::F32, &[nv])?;
            add("ssm_norm.weight", GgmlType::F32, &[d])?;
            add("ssm_out.weight", q, &[h, nv * d])?;
        } else {
            // The hybrids' query projection carries an output gate per head.
            let q_rows = if p.linear.is_some() { 2 * q_dim } else { q_dim };
            add("attn_q.weight", q, &[q_rows, h])?;
            add("attn_k.weight", q, &[kv_dim, h])?;
            add("attn_v.weight", q, &[kv_dim, h])?;
            add("attn_output.weight", q, &[h, q_dim])?;
            add("attn_q_norm.weight", GgmlType::F32, &[p.head_dim])?;
            add("attn_k_norm.weight", GgmlType::F32, &[p.head_dim])?;
        }
        let ffn_norm = if p.linear.is_some() {
            "post_attention_norm.weight"
        } else {
            "ffn_norm.weight"
        };
        add(ffn_norm, GgmlType::F32, &[h])?;
        add("ffn_gate_inp.weight", GgmlType::F32, &[ne, h])?;
        add("ffn_gate_exps.weight", q, &[ne, ff, h])?;
        add("ffn_up_exps.weight", q, &[ne, ff, h])?;
        add("ffn_down_exps.weight", q, &[ne, h, ff])?;
        if p.shared_ff > 0 {
            let sff = p.shared_ff;
            add("ffn_gate_shexp.weight", q, &[sff, h])?;
            add("ffn_up_shexp.weight", q, &[sff, h])?;
            add("ffn_down_shexp.weight", q, &[h, sff])?;
            add("ffn_gate_inp_shexp.weight", GgmlType::F32, &[h])?;
        }
    }
    w.add_tensor("output_norm.weight", GgmlType::F32, &[h as u64])
        .map_err(io)?;
    w.add_tensor("output.weight", spec.quant, &[p.vocab as u64, h as u64])
        .map_err(io)?;

    let total = w.file_size();
    // The constant every embedding puts in dimension 0 when skewed, and the
    // router noise it must dominate (see the module docs).
    let big = (h as f32).sqrt();
    let h0 = (h as f64 / 2.0).sqrt();
    let router_noise = (0.5f64).sqrt();
    let mut done = 0u64;
    let mut buf = Vec::new();
    w.write(out, |_, t, dst| {
        let size = t.size().unwrap_or(0) as usize;
        let cols = *t.shape.last().unwrap_or(&1) as usize;
        let rows = size / t.ty.row_bytes(cols as u64).unwrap_or(1).max(1) as usize;
        let name = t.name.as_str();
        let sigma = if name == "token_embd.weight" {
            EMBED_SIGMA
        } else if name.ends_with("attn_output.weight") || name.ends_with("ssm_out.weight") {
            ATTN_OUT_SCALE / (cols as f32).sqrt()
        } else {
            1.0 / (cols as f32).sqrt()
        };
        // Generate and write in pieces of whole rows, so memory stays small.
        let row_bytes = size / rows.max(1);
        let rows_per_piece = ((8 << 20) / row_bytes.max(1)).max(1);
        let mut row = 0;
        while row < rows {
            let n = rows_per_piece.min(rows - row);
            buf.resize(n * row_bytes, 0);
            if name.ends_with("ssm_a") || name.ends_with("ssm_dt.bias") {
                // Decay rates −exp(A_log) in [−1, −0.1] (A_log of real
                // checkpoints spans about that); dt bias 0.
                for c in buf.chunks_exact_mut(4) {
                    let v = if name.ends_with("ssm_a") {
                        -(0.1 + 0.9 * rng.unit() as f32)
                    } else {
                        0.0
                    };
                    c.copy_from_slice(&v.to_le_bytes());
                }
            } else if name.ends_with("norm.weight") {
                let v = if name.ends_with("q_norm.weight") || name.ends_with("k_norm.weight") {
                    QK_NORM
                } else {
                    1.0
                };
                for c in buf.chunks_exact_mut(4) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            } else if name.ends_with("ffn_gate_inp.weight") {
                let layer_seed = rng.next_u64();
                let mut lr = Rng::new(layer_seed);
                fill_blocks(GgmlType::F32, &mut lr, sigma, &mut buf).map_err(to_io)?;
                if let Some(sk) = spec.skew {
                    // Expert e gets the bias of popularity rank perm[e].
                    let bias = zipf_biases(ne, p.top_k, sk, router_noise, &mut lr);
                    let mut perm: Vec<usize> = (0..ne).collect();
                    for i in (1..ne).rev() {
                        perm.swap(i, (lr.next_u64() % (i as u64 + 1)) as usize);
                    }
                    for e in 0..n {
                        let wv = (bias[perm[row + e]] / h0) as f32;
                        buf[e * row_bytes..e * row_bytes + 4].copy_from_slice(&wv.to_le_bytes());
                    }
                }
            } else {
                fill_blocks(t.ty, &mut rng, sigma, &mut buf).map_err(to_io)?;
                if name == "token_embd.weight" && spec.skew.is_some() {
                    // First block of each row: [127, 0, …, 0] × big/127.
                    for r in buf.chunks_exact_mut(row_bytes) {
                        r[..2].copy_from_slice(&f16::from_f32(big / 127.0).to_le_bytes());
                        r[2] = 127;
                        r[3..34].fill(0);
                    }
                }
            }
            dst.write_all(&buf)?;
            done += buf.len() as u64;
            progress(done, total);
            row += n;
        }
        Ok(())
    })
    .map_err(io)?;
    Ok(total)
}

fn to_io(e: SynthError) -> io::Error {
    io::Error::other(e.to_string())
}

/// A minimal Qwen-style (ChatML) template for synthetic models.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Rows of `QK_K` elements a K-quant needs; synth shapes are multiples.
pub const fn k_quant_ok(cols: usize) -> bool {
    cols.is_multiple_of(QK_K)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::dequantize;

    #[test]
    fn packed_k_scales_decode() {
        let sc = [1, 2, 3, 40, 50, 61, 7, 63];
        let m = [9, 10, 11, 12, 33, 44, 55, 62];
        let packed = pack_k_scales(sc, m);
        // Decode through the Q4_K reference: a block with d = dmin = 1 and
        // all q = 0 gives −m per sub-block; all q = 1 gives sc − m.
        let mut block = vec![0u8; 144];
        block[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        block[4..16].copy_from_slice(&packed);
        block[16..].fill(0x11);
        let mut y = vec![0f32; 256];
        dequantize(GgmlType::Q4_K, &block, &mut y).unwrap();
        for s in 0..8 {
            assert_eq!(y[32 * s], sc[s] as f32 - m[s] as f32, "sub-block {s}");
        }
    }

    #[test]
    fn filled_blocks_are_centred_with_the_asked_spread() {
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::F16,
        ] {
            let n = 256 * 64;
            let mut bytes = vec![0u8; ty.row_bytes(n as u64).unwrap() as usize];
            fill_blocks(ty, &mut Rng::new(1), 0.05, &mut bytes).unwrap();
            let mut y = vec![0f32; n];
            dequantize(ty, &bytes, &mut y).unwrap();
            let mean = y.iter().sum::<f32>() / n as f32;
            let std = (y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32).sqrt();
            assert!(mean.abs() < 0.003, "{ty}: mean {mean}");
            assert!((std - 0.05).abs() < 0.005, "{ty}: std {std}");
        }
    }

    #[test]
    fn vocab_merges_are_consistent() {
        let (tokens, merges) = synth_vocab(2000, &mut Rng::new(3));
        assert_eq!(tokens.len(), 2000);
        let set: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(set.len(), tokens.len());
        for m in &merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(set.contains(&a.to_string()) && set.contains(&b.to_string()));
            assert!(set.contains(&format!("{a}{b}")));
        }
    }

    #[test]
    fn zipf_biases_follow_the_law() {
        let (n, k) = (32, 4);
        let b = zipf_biases(n, k, 1.0, 0.7, &mut Rng::new(5));
        let mut rng = Rng::new(9);
        let mut count = vec![0usize; n];
        for _ in 0..20000 {
            let l: Vec<f64> = b.iter().map(|x| x + 0.7 * rng.normal()).collect();
            let mut o: Vec<usize> = (0..n).collect();
            o.sort_by(|&x, &y| l[y].total_cmp(&l[x]));
            for &e in &o[..k] {
                count[e] += 1;
            }
        }
        // Rank 1 about twice rank 2, about four times rank 4.
        let r = |i: usize| count[i] as f64;
        assert!((r(0) / r(1) - 2.0).abs() < 0.4, "{count:?}");
        assert!((r(0) / r(3) - 4.0).abs() < 1.0, "{count:?}");
    }
}
