//! Softmax attention with grouped KV heads (GQA), per-head q/k RMSNorm and
//! rotary position embedding: the token mixer of Qwen3-MoE's layers.

use super::weights::WeightRef;
use crate::backend::cpu::ops::{rms_norm_chunks, rope_neox, softmax};
use crate::backend::cpu::{matmul, matrix::dot};
use crate::format::ModelFiles;
use crate::state::kv::LayerKv;

/// Rotary embedding of the first `2 * inv_freq.len()` dimensions of each
/// head, pairs taken from the two halves of that span ("NEOX" layout, which
/// Hugging Face checkpoints and llama.cpp's Qwen GGUFs share).
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

/// The weights and shape of one attention layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub wq: WeightRef,
    pub wk: WeightRef,
    pub wv: WeightRef,
    pub wo: WeightRef,
    /// Per-head RMSNorm of queries and keys, applied before RoPE.
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    pub rope: Rope,
}

impl Attention {
    /// Runs the layer for `n` tokens at positions `pos0..pos0 + n`, whose
    /// normalised hidden states are `x` (`n × hidden`). Appends their keys
    /// and values to `kv` and writes the output projection to `out`.
    pub fn forward(
        &self,
        files: &ModelFiles,
        kv: &mut LayerKv,
        x: &[f32],
        n: usize,
        pos0: usize,
        out: &mut [f32],
    ) {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let mut q = vec![0f32; n * nh * hd];
        let mut k = vec![0f32; n * nkv * hd];
        let mut v = vec![0f32; n * nkv * hd];
        matmul(&self.wq.view(files), x, n, &mut q);
        matmul(&self.wk.view(files), x, n, &mut k);
        matmul(&self.wv.view(files), x, n, &mut v);
        if let Some(w) = &self.q_norm {
            rms_norm_chunks(&mut q, hd, w, self.norm_eps);
        }
        if let Some(w) = &self.k_norm {
            rms_norm_chunks(&mut k, hd, w, self.norm_eps);
        }
        for t in 0..n {
            rope_neox(
                &mut q[t * nh * hd..(t + 1) * nh * hd],
                hd,
                pos0 + t,
                &self.rope.inv_freq,
            );
            rope_neox(
                &mut k[t * nkv * hd..(t + 1) * nkv * hd],
                hd,
                pos0 + t,
                &self.rope.inv_freq,
            );
        }
        debug_assert_eq!(kv.k.len(), pos0 * kv.k_dim);
        kv.k.extend_from_slice(&k);
        kv.v.extend_from_slice(&v);

        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let mut attn = vec![0f32; n * nh * hd];
        let mut scores = Vec::with_capacity(pos0 + n);
        for t in 0..n {
            let p = pos0 + t;
            for h in 0..nh {
                let g = h / group;
                let qh = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                scores.clear();
                scores.extend((0..=p).map(|j| dot(qh, &kv.key(j)[g * hd..(g + 1) * hd]) * scale));
                softmax(&mut scores);
                let o = &mut attn[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                for (j, &s) in scores.iter().enumerate() {
                    let vj = &kv.value(j)[g * hd..(g + 1) * hd];
                    for (a, &b) in o.iter_mut().zip(vj) {
                        *a += s * b;
                    }
                }
            }
        }
        matmul(&self.wo.view(files), &attn, n, out);
    }
}
