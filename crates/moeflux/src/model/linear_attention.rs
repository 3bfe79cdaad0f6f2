//! Gated DeltaNet, the linear-attention token mixer of the Qwen3.5 / Qwen3.6
//! MoE and Qwen3-Next hybrids.
//!
//! Per token: project to q, k, v (key heads for q and k, value heads for
//! v), z (the output gate), b and a; run q|k|v through a causal depthwise
//! conv1d (with a rolling window of earlier inputs) and SiLU; L2-normalise q
//! and k per head and scale q by `1/√k_dim`; then for every value head `j`
//! (which reads key head `key_head(j)`), with decay `g = exp(−exp(A_log) ·
//! softplus(a + dt_bias))` and `β = σ(b)`:
//!
//! ```text
//! S ← g·S;  δ = β·(v − Sᵀk);  S ← S + k δᵀ;  o = Sᵀq
//! ```
//!
//! then `RMSNorm(o) · SiLU(z)` per head and the output projection. The
//! recurrent form is computed for every token (prefill included), so prompt
//! and decode give the same numbers.

use super::weights::WeightRef;
use crate::backend::cpu::kernels::project;
use crate::backend::cpu::ops::{sigmoid, silu};
use crate::backend::cpu::workspace::{sized, Workspace};
use crate::backend::cpu::Cpu;
use crate::format::ModelFiles;
use crate::model::config::LinearAttention;
use crate::state::LinearState;

/// Which key head a value head reads, when there are more value heads than
/// key heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueHeads {
    /// Value head `j` uses key head `j / (n_v / n_k)` (Hugging Face order,
    /// and qwen3next GGUFs).
    Grouped,
    /// Value head `j` uses key head `j % n_k` (qwen35moe GGUFs, whose
    /// converter reorders the value heads).
    Tiled,
}

/// The input projections, in the split the checkpoint uses.
#[derive(Clone, Debug, PartialEq)]
pub enum LinearInput {
    /// `qkv` = [q (all key heads) | k | v (all value heads)], `z`, `b`, `a`
    /// (Qwen3.5 checkpoints; every GGUF).
    Split {
        qkv: WeightRef,
        z: WeightRef,
        b: WeightRef,
        a: WeightRef,
    },
    /// Qwen3.5 GGUF-style split with `b` and `a` fused per key head as
    /// `[b (r) | a (r)]`, r = n_v / n_k (qwen3next GGUFs).
    SplitBa {
        qkv: WeightRef,
        z: WeightRef,
        ba: WeightRef,
    },
    /// Qwen3-Next Hugging Face: `qkvz` grouped per key head as
    /// `[q | k | v (r heads) | z (r heads)]`, and `ba` as above.
    Fused { qkvz: WeightRef, ba: WeightRef },
}

/// One Gated DeltaNet layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedDeltaNet {
    pub input: LinearInput,
    /// Depthwise conv weights, `channels × kernel` (taps oldest first).
    pub conv: Vec<f32>,
    /// `−exp(A_log)` per value head.
    pub a: Vec<f32>,
    pub dt_bias: Vec<f32>,
    /// The gated RMSNorm's weight, `v_dim` (never zero-centred).
    pub norm: Vec<f32>,
    /// `[hidden, n_v · v_dim]`.
    pub out: WeightRef,
    pub dims: LinearAttention,
    pub heads: ValueHeads,
    /// Epsilon of the gated RMSNorm and of the q/k L2 normalisation
    /// (`x / √(Σx² + ε)`; Hugging Face uses 1e-6 there, llama.cpp the RMS
    /// epsilon — the same value in every released checkpoint).
    pub eps: f32,
}

#[inline]
fn softplus(x: f32) -> f32 {
    // log(1 + e^x), without overflow for large x (torch's threshold is 20).
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl GatedDeltaNet {
    /// Conv channels: q and k of every key head, v of every value head.
    pub fn channels(&self) -> usize {
        self.dims.conv_channels()
    }

    /// The layer's weight matrices.
    pub fn weights(&self) -> Vec<&WeightRef> {
        let mut out = match &self.input {
            LinearInput::Split { qkv, z, b, a } => vec![qkv, z, b, a],
            LinearInput::SplitBa { qkv, z, ba } => vec![qkv, z, ba],
            LinearInput::Fused { qkvz, ba } => vec![qkvz, ba],
        };
        out.push(&self.out);
        out
    }

    /// A zeroed state for this layer.
    pub fn new_state(&self) -> LinearState {
        let d = &self.dims;
        LinearState::new(
            (d.conv_kernel - 1) * self.channels(),
            d.n_v_heads * d.k_head_dim * d.v_head_dim,
        )
    }

    fn key_head(&self, j: usize) -> usize {
        let d = &self.dims;
        match self.heads {
            ValueHeads::Grouped => j / (d.n_v_heads / d.n_k_heads).max(1),
            ValueHeads::Tiled => j % d.n_k_heads,
        }
    }

    /// Runs `n` tokens of normalised hidden state `ws.h` through the layer,
    /// updating `state`; the output projection goes to `ws.o`.
    pub fn forward(
        &self,
        files: &ModelFiles,
        cpu: &Cpu,
        ws: &mut Workspace,
        state: &mut LinearState,
        n: usize,
    ) {
        let d = self.dims;
        let (nk, nv, dk, dv) = (d.n_k_heads, d.n_v_heads, d.k_head_dim, d.v_head_dim);
        let r = (nv / nk).max(1);
        let ch = self.channels();
        let hidden = self.out.rows;
        let level = cpu.level;
        let Workspace {
            h,
            o,
            q,
            k,
            v,
            attn,
            gate,
            up,
            down,
            acts,
            per_thread,
            ..
        } = ws;
        // Projections into q (conv input, ch per token), k (z, nv·dv per
        // token) and v (b then a, 2·nv per token): three buffers of the
        // workspace reused under other names.
        let qkv = sized(q, n * ch);
        let z = sized(k, n * nv * dv);
        let ba = sized(v, n * 2 * nv);
        let h = &h[..n * hidden];
        let (pool, acts) = (&cpu.pool, &mut *acts);
        match &self.input {
            LinearInput::Split {
                qkv: wq,
                z: wz,
                b,
                a,
            } => {
                let (b_out, a_out) = (sized(gate, n * nv), sized(up, n * nv));
                project(
                    pool,
                    level,
                    acts,
                    h,
                    hidden,
                    [
                        (wq.view(files), &mut *qkv),
                        (wz.view(files), &mut *z),
                        (b.view(files), &mut *b_out),
                        (a.view(files), &mut *a_out),
                    ],
                );
                for t in 0..n {
                    let row = &mut ba[t * 2 * nv..(t + 1) * 2 * nv];
                    row[..nv].copy_from_slice(&b_out[t * nv..(t + 1) * nv]);
                    row[nv..].copy_from_slice(&a_out[t * nv..(t + 1) * nv]);
                }
            }
            LinearInput::SplitBa {
                qkv: wq,
                z: wz,
                ba: wba,
            } => {
                let grouped = sized(gate, n * 2 * nv);
                project(
                    pool,
                    level,
                    acts,
                    h,
                    hidden,
                    [
                        (wq.view(files), &mut *qkv),
                        (wz.view(files), &mut *z),
                        (wba.view(files), &mut *grouped),
                    ],
                );
                ungroup_ba(grouped, ba, n, nk, r);
            }
            LinearInput::Fused { qkvz, ba: wba } => {
                let per_group = 2 * dk + 2 * r * dv;
                let fused = sized(up, n * nk * per_group);
                let grouped = sized(gate, n * 2 * nv);
                project(
                    pool,
                    level,
                    acts,
                    h,
                    hidden,
                    [
                        (qkvz.view(files), &mut *fused),
                        (wba.view(files), &mut *grouped),
                    ],
                );
                ungroup_ba(grouped, ba, n, nk, r);
                // [q | k | v | z] per key group → [q all | k all | v all], z all.
                for t in 0..n {
                    let src = &fused[t * nk * per_group..(t + 1) * nk * per_group];
                    let dst = &mut qkv[t * ch..(t + 1) * ch];
                    let zt = &mut z[t * nv * dv..(t + 1) * nv * dv];
                    for (g, s) in src.chunks_exact(per_group).enumerate() {
                        dst[g * dk..(g + 1) * dk].copy_from_slice(&s[..dk]);
                        dst[(nk + g) * dk..(nk + g + 1) * dk].copy_from_slice(&s[dk..2 * dk]);
                        let vbase = 2 * nk * dk + g * r * dv;
                        dst[vbase..vbase + r * dv].copy_from_slice(&s[2 * dk..2 * dk + r * dv]);
                        zt[g * r * dv..(g + 1) * r * dv].copy_from_slice(&s[2 * dk + r * dv..]);
                    }
                }
            }
        }

        // The causal conv, token by token (cheap), with SiLU; then q and k
        // L2-normalised per key head, q scaled by 1/√d_k.
        let kernel = d.conv_kernel;
        let mixed = sized(down, n * ch);
        let q_scale = 1.0 / (dk as f32).sqrt();
        for t in 0..n {
            let x = &qkv[t * ch..(t + 1) * ch];
            let y = &mut mixed[t * ch..(t + 1) * ch];
            for (c, (yc, &xc)) in y.iter_mut().zip(x).enumerate() {
                let w = &self.conv[c * kernel..(c + 1) * kernel];
                let window = state.conv.iter().skip(c).step_by(ch);
                let acc = w.iter().zip(window).map(|(a, b)| a * b).sum::<f32>();
                *yc = silu(acc + w[kernel - 1] * xc);
            }
            // Slide the window: drop the oldest input, append x.
            if kernel > 1 {
                state.conv.copy_within(ch.., 0);
                let last = (kernel - 2) * ch;
                state.conv[last..last + ch].copy_from_slice(x);
            }
            for (hd, chunk) in y[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
                let inv = 1.0 / (chunk.iter().map(|v| v * v).sum::<f32>() + self.eps).sqrt();
                let s = if hd < nk { inv * q_scale } else { inv };
                chunk.iter_mut().for_each(|v| *v *= s);
            }
        }

        // The delta rule: value heads are independent, so each task runs
        // one head over every token of the chunk, in order.
        let out = sized(attn, n * nv * dv);
        let heads = HeadPtrs {
            state: state.recurrent.as_mut_ptr(),
            out: out.as_mut_ptr(),
        };
        let (mixed, z, ba) = (&*mixed, &*z, &*ba);
        cpu.pool.run(nv, &|j, thread| {
            let kh = self.key_head(j);
            let mut scratch = per_thread[thread].lock().unwrap_or_else(|e| e.into_inner());
            if scratch.len() < dv {
                scratch.resize(dv, 0.0);
            }
            let kv_mem = &mut scratch[..dv];
            // SAFETY: head j owns its state block and its outputs.
            let s = unsafe { heads.state(j * dk * dv, dk * dv) };
            for t in 0..n {
                let m = &mixed[t * ch..(t + 1) * ch];
                let qj = &m[kh * dk..(kh + 1) * dk];
                let kj = &m[nk * dk + kh * dk..nk * dk + (kh + 1) * dk];
                let vj = &m[2 * nk * dk + j * dv..2 * nk * dk + (j + 1) * dv];
                let (b, a) = (ba[t * 2 * nv + j], ba[t * 2 * nv + nv + j]);
                let g = (self.a[j] * softplus(a + self.dt_bias[j])).exp();
                let beta = sigmoid(b);
                // S ← g S;  kv_mem = Sᵀ k.
                kv_mem.fill(0.0);
                for (row, &ki) in s.chunks_exact_mut(dv).zip(kj) {
                    for (mm, sv) in kv_mem.iter_mut().zip(row.iter_mut()) {
                        *sv *= g;
                        *mm += *sv * ki;
                    }
                }
                // δ = β (v − kv_mem);  S ← S + k δᵀ;  o = Sᵀ q.
                for (mm, &vv) in kv_mem.iter_mut().zip(vj) {
                    *mm = (vv - *mm) * beta;
                }
                // SAFETY: (t, j) is this task's output.
                let o = unsafe { heads.out((t * nv + j) * dv, dv) };
                o.fill(0.0);
                for ((row, &ki), &qi) in s.chunks_exact_mut(dv).zip(kj).zip(qj) {
                    for ((sv, &dl), ov) in row.iter_mut().zip(kv_mem.iter()).zip(o.iter_mut()) {
                        *sv += ki * dl;
                        *ov += *sv * qi;
                    }
                }
                // Gated RMSNorm: RMSNorm(o)·w·SiLU(z).
                let zj = &z[(t * nv + j) * dv..(t * nv + j + 1) * dv];
                let ms = o.iter().map(|v| v * v).sum::<f32>() / dv as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for ((ov, &w), &zz) in o.iter_mut().zip(&self.norm).zip(zj) {
                    *ov = *ov * inv * w * silu(zz);
                }
            }
        });
        let o = sized(o, n * hidden);
        project(pool, level, acts, out, nv * dv, [(self.out.view(files), o)]);
    }
}

/// Raw pointers to the recurrent state and the output, shared by the head
/// tasks.
#[derive(Clone, Copy)]
struct HeadPtrs {
    state: *mut f32,
    out: *mut f32,
}

impl HeadPtrs {
    /// # Safety
    /// The range must lie in the state and be used by one task only.
    unsafe fn state<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per the contract above.
        unsafe { std::slice::from_raw_parts_mut(self.state.add(at), len) }
    }

    /// # Safety
    /// The range must lie in the output and be written by one task only.
    unsafe fn out<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: per the contract above.
        unsafe { std::slice::from_raw_parts_mut(self.out.add(at), len) }
    }
}
// SAFETY: task j touches only head j's state block and the outputs
// (t, j); `pool.run` returns after every task is done, while the borrows
// the pointers came from are still held.
unsafe impl Send for HeadPtrs {}
unsafe impl Sync for HeadPtrs {}

/// `[b (r) | a (r)]` per key group → `[b (all n_v) | a (all n_v)]` per token.
fn ungroup_ba(grouped: &[f32], ba: &mut [f32], n: usize, nk: usize, r: usize) {
    let nv = nk * r;
    for t in 0..n {
        let src = &grouped[t * 2 * nv..(t + 1) * 2 * nv];
        for g in 0..nk {
            ba[t * 2 * nv + g * r..t * 2 * nv + (g + 1) * r]
                .copy_from_slice(&src[g * 2 * r..g * 2 * r + r]);
            ba[t * 2 * nv + nv + g * r..t * 2 * nv + nv + (g + 1) * r]
                .copy_from_slice(&src[g * 2 * r + r..(g + 1) * 2 * r]);
        }
    }
}
