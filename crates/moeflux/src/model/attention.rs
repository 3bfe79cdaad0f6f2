//! Softmax attention with grouped KV heads (GQA), per-head q/k RMSNorm,
//! rotary position embedding and, for the Qwen hybrids, a sigmoid output
//! gate: the token mixer of Qwen3-MoE's layers and of the hybrids' full
//! attention layers.

use super::weights::WeightRef;
use crate::backend::cpu::kernels::project;
use crate::backend::cpu::matrix::dot;
use crate::backend::cpu::ops::{rms_norm_chunks, rope_neox, sigmoid, softmax};
use crate::backend::cpu::workspace::{sized, Workspace};
use crate::backend::cpu::Cpu;
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
    /// The query projection yields `[q | gate]` per head (`2 · head_dim`
    /// rows each), and each head's output is multiplied by `σ(gate)`
    /// (Qwen3.5 / Qwen3-Next).
    pub output_gate: bool,
}

/// A raw pointer to the attention output, written by head tasks.
#[derive(Clone, Copy)]
struct Heads(*mut f32);

impl Heads {
    /// The `len` outputs from `at`.
    ///
    /// # Safety
    /// The range must be inside the output and written by one task only.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per the contract above.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}
// SAFETY: each (token, head) task writes its own `head_dim` values only, and
// `pool.run` returns after all tasks are done.
unsafe impl Send for Heads {}
unsafe impl Sync for Heads {}

impl Attention {
    /// Runs the layer for `n` tokens at positions `pos0..pos0 + n`, whose
    /// normalised hidden states are `ws.h` (`n × hidden`). Appends their keys
    /// and values to `kv`; the output projection goes to `ws.o`.
    pub fn forward(
        &self,
        files: &ModelFiles,
        cpu: &Cpu,
        ws: &mut Workspace,
        kv: &mut LayerKv,
        n: usize,
        pos0: usize,
    ) {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let hidden = self.wq.cols;
        let level = cpu.level;
        let Workspace {
            h,
            o,
            q,
            k,
            v,
            attn,
            gate,
            acts,
            per_thread,
            ..
        } = ws;
        let (wq, wk, wv, wo) = (
            self.wq.view(files),
            self.wk.view(files),
            self.wv.view(files),
            self.wo.view(files),
        );
        let q_rows = if self.output_gate {
            2 * nh * hd
        } else {
            nh * hd
        };
        let q = sized(q, n * q_rows);
        let k = sized(k, n * nkv * hd);
        let v = sized(v, n * nkv * hd);
        project(
            &cpu.pool,
            level,
            acts,
            &h[..n * hidden],
            hidden,
            [(wq, &mut *q), (wk, &mut *k), (wv, &mut *v)],
        );
        let gate = sized(gate, if self.output_gate { n * nh * hd } else { 0 });
        if self.output_gate {
            // [q_h | gate_h] per head → q packed in place, gates aside.
            for t in 0..n {
                for hh in 0..nh {
                    let src = (t * nh + hh) * 2 * hd;
                    let dst = (t * nh + hh) * hd;
                    gate[dst..dst + hd].copy_from_slice(&q[src + hd..src + 2 * hd]);
                    q.copy_within(src..src + hd, dst);
                }
            }
        }
        let q = &mut q[..n * nh * hd];
        if let Some(w) = &self.q_norm {
            rms_norm_chunks(q, hd, w, self.norm_eps);
        }
        if let Some(w) = &self.k_norm {
            rms_norm_chunks(k, hd, w, self.norm_eps);
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
        debug_assert_eq!(kv.len(), pos0);
        kv.push(k, v);

        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let attn = sized(attn, n * nh * hd);
        let out = Heads(attn.as_mut_ptr());
        let q = &*q;
        let kv = &*kv;
        cpu.pool.run(n * nh, &|task, thread| {
            let (t, hh) = (task / nh, task % nh);
            let p = pos0 + t;
            let g = hh / group;
            let qh = &q[(t * nh + hh) * hd..(t * nh + hh + 1) * hd];
            let mut scratch = per_thread[thread].lock().unwrap_or_else(|e| e.into_inner());
            let need = p + 1 + hd;
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            let (scores, row) = scratch.split_at_mut(p + 1);
            let row = &mut row[..hd];
            for (j, s) in scores.iter_mut().enumerate() {
                kv.k.read(j * kv.k_dim + g * hd, row);
                *s = dot(qh, row) * scale;
            }
            softmax(scores);
            // SAFETY: task (t, hh) owns these `hd` outputs.
            let o = unsafe { out.slice((t * nh + hh) * hd, hd) };
            o.fill(0.0);
            for (j, &s) in scores.iter().enumerate() {
                kv.v.read(j * kv.v_dim + g * hd, row);
                for (a, &b) in o.iter_mut().zip(row.iter()) {
                    *a += s * b;
                }
            }
        });
        if self.output_gate {
            for (a, &g) in attn.iter_mut().zip(gate.iter()) {
                *a *= sigmoid(g);
            }
        }
        let o = sized(o, n * hidden);
        project(&cpu.pool, level, acts, attn, nh * hd, [(wo, o)]);
    }
}
