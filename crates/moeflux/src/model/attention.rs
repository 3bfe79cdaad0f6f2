//! Softmax attention with grouped KV heads (GQA), per-head q/k RMSNorm,
//! rotary position embedding and, for the Qwen hybrids, a sigmoid output
//! gate: the token mixer of Qwen3-MoE's layers and of the hybrids' full
//! attention layers.

use super::weights::WeightRef;
use crate::backend::cpu::kernels::{self, project};
use crate::backend::cpu::ops::{rms_norm_chunks, rope_neox, sigmoid, softmax};
use crate::backend::cpu::workspace::{sized, Workspace};
use crate::backend::cpu::Cpu;
use crate::format::ModelFiles;
use crate::state::kv::{LayerKv, Rows};

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

/// Positions per K/V tile: rows converted to f32 once per task and reused
/// by every query of the task (16 KiB at head_dim 128, so the tile stays in
/// L1/L2 while the queries sweep it).
const TILE: usize = 32;

/// Most attention scores (f32) one task keeps: bounds the token block of a
/// prefill task, since each query keeps its scores over the whole context
/// for the exact (two-pass) softmax.
const SCORE_BUDGET: usize = 1 << 18;

/// Causal GQA attention of `n` new queries (`q`: `n × nh × hd`, at
/// positions `pos0..pos0 + n`) over the cache `kv`, which already holds their
/// own keys and values; writes `out` (`n × nh × hd`).
///
/// A task is a block of tokens × the heads of one KV group (or a slice of
/// them when tasks would be too few to feed the threads): the f16 cache rows
/// are converted once per task and shared by all its queries, instead of
/// once per query head. Each query's arithmetic — scores in position
/// order, softmax over positions `0..=p`, weighted sum of values in position
/// order — depends only on its own position, so results are bit-identical
/// however the tokens are chunked or the tasks spread over threads.
/// `per_thread` is one scratch vector per pool thread (grown as needed).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cpu: &Cpu,
    per_thread: &[std::sync::Mutex<Vec<f32>>],
    q: &[f32],
    kv: &LayerKv,
    out: &mut [f32],
    [nh, nkv, hd]: [usize; 3],
    n: usize,
    pos0: usize,
) {
    let scale = 1.0 / (hd as f32).sqrt();
    let level = cpu.level;
    let group = nh / nkv;
    let ctx = pos0 + n;
    let tb = (SCORE_BUDGET / (group * ctx).max(1)).clamp(1, 16);
    let n_blocks = n.div_ceil(tb);
    // Split a group's heads over tasks while there are too few tasks for
    // the threads, or one task's scores would exceed the budget (long
    // contexts): a thread then holds at most max(ctx, SCORE_BUDGET) scores.
    let mut split = 1;
    while group % (2 * split) == 0
        && (nkv * split * n_blocks < 2 * cpu.pool.n_threads()
            || tb * (group / split) * ctx > SCORE_BUDGET)
    {
        split *= 2;
    }
    let hpt = group / split;
    let heads_out = Heads(out.as_mut_ptr());
    cpu.pool.run(n_blocks * nkv * split, &|task, thread| {
        let (b, g, part) = (
            task / (nkv * split),
            task % (nkv * split) / split,
            task % split,
        );
        let (t0, t1) = (b * tb, (b * tb + tb).min(n));
        let h0 = g * group + part * hpt;
        // Scores of query (t, h) are at ((t - t0) · hpt + h - h0) · len.
        let len = pos0 + t1;
        let mut scratch = per_thread[thread].lock().unwrap_or_else(|e| e.into_inner());
        let need = TILE * hd + (t1 - t0) * hpt * len;
        if scratch.len() < need {
            scratch.resize(need, 0.0);
        }
        let (tile, scores) = scratch.split_at_mut(TILE * hd);
        let queries =
            || (t0..t1).flat_map(move |t| (0..hpt).map(move |i| (t, h0 + i, (t - t0) * hpt + i)));
        // Rows j0..j1 of this group's keys or values, as f32, into the
        // tile; the next tile's f16 or Q8_0 rows are prefetched after them.
        let load = |rows: &Rows, dim: usize, j0: usize, j1: usize, tile: &mut [f32]| {
            let s = kernels::Strided {
                at: j0 * dim + g * hd,
                stride: dim,
                width: hd,
                rows: j1 - j0,
            };
            let (ahead, tile) = (TILE.min(len - j1), &mut tile[..(j1 - j0) * hd]);
            match rows {
                Rows::F16(v) => kernels::f16_rows_to_f32(level, v, s, ahead, tile),
                Rows::Q8_0(r) => kernels::q8_0_rows_to_f32(level, r, s, ahead, tile),
                Rows::F32(_) => {
                    for (j, row) in (j0..j1).zip(tile.chunks_exact_mut(hd)) {
                        rows.read(j * dim + g * hd, row);
                    }
                }
            }
        };
        // Pass 1: scores, tile by tile of keys.
        for j0 in (0..len).step_by(TILE) {
            let j1 = (j0 + TILE).min(len);
            load(&kv.k, kv.k_dim, j0, j1, tile);
            for (t, h, i) in queries() {
                let p = pos0 + t;
                let qh = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                let end = j1.min(p + 1);
                if end > j0 {
                    let sc = &mut scores[i * len + j0..i * len + end];
                    kernels::scores(level, qh, tile, scale, sc);
                }
            }
        }
        for (t, h, i) in queries() {
            softmax(&mut scores[i * len..i * len + pos0 + t + 1]);
            // SAFETY: query (t, h) belongs to this task only.
            unsafe { heads_out.slice((t * nh + h) * hd, hd) }.fill(0.0);
        }
        // Pass 2: the weighted sum, tile by tile of values.
        for j0 in (0..len).step_by(TILE) {
            let j1 = (j0 + TILE).min(len);
            load(&kv.v, kv.v_dim, j0, j1, tile);
            for (t, h, i) in queries() {
                // SAFETY: as above.
                let o = unsafe { heads_out.slice((t * nh + h) * hd, hd) };
                let end = j1.min(pos0 + t + 1);
                if end > j0 {
                    let sc = &scores[i * len + j0..i * len + end];
                    kernels::weighted_rows(level, sc, tile, o);
                }
            }
        }
    });
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
// SAFETY: each (token, head) query belongs to one task, which alone writes
// its `head_dim` values, and `pool.run` returns after all tasks are done.
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

        let attn = sized(attn, n * nh * hd);
        attend(cpu, per_thread, &*q, &*kv, attn, [nh, nkv, hd], n, pos0);
        if self.output_gate {
            for (a, &g) in attn.iter_mut().zip(gate.iter()) {
                *a *= sigmoid(g);
            }
        }
        let o = sized(o, n * hidden);
        project(&cpu.pool, level, acts, attn, nh * hd, [(wo, o)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::Level;
    use crate::state::kv::{KvCache, KvType};
    use crate::synth::Rng;

    /// Attention of one query head, written the plain way: one key row at a
    /// time, softmax, then the values in position order.
    fn naive(level: Level, q: &[f32], kv: &LayerKv, g: usize, hd: usize, p: usize) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut row = vec![0.0; hd];
        let mut scores: Vec<f32> = (0..=p)
            .map(|j| {
                kv.k.read(j * kv.k_dim + g * hd, &mut row);
                kernels::dot(level, q, &row) * scale
            })
            .collect();
        softmax(&mut scores);
        let mut o = vec![0.0; hd];
        for (j, &s) in scores.iter().enumerate() {
            kv.v.read(j * kv.v_dim + g * hd, &mut row);
            kernels::axpy(level, s, &row, &mut o);
        }
        o
    }

    /// The tiled, grouped kernel equals the plain one bit for bit, for
    /// every split of tokens into calls and any thread count (the exactness
    /// of chunked prefill and of thread counts rests on this).
    #[test]
    fn tiled_attention_is_bit_identical_to_plain() {
        // A head size with a whole 32-lane chunk and an 8-lane tail (Q8_0
        // blocks then straddle heads), and one of whole Q8_0 blocks.
        for hd in [40, 64] {
            check_tiled_attention(hd);
        }
    }

    fn check_tiled_attention(hd: usize) {
        let (nh, nkv) = (8, 2);
        let total = 3 * TILE + 5;
        let mut rng = Rng::new(7);
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect()
        };
        let q = rand(total * nh * hd);
        let (k, v) = (rand(total * nkv * hd), rand(total * nkv * hd));
        let levels = [
            Level::Reference,
            Level::Scalar,
            Level::Neon,
            Level::Avx2,
            Level::Avx512,
        ];
        for (kv_type, level) in [KvType::F16, KvType::F32, KvType::Q8_0]
            .into_iter()
            .flat_map(|t| {
                levels
                    .into_iter()
                    .filter(|l| l.supported())
                    .map(move |l| (t, l))
            })
        {
            let mut cache = KvCache::new(&[Some((nkv * hd, nkv * hd))], total, kv_type);
            cache.layers[0].push(&k, &v);
            let kv = &cache.layers[0];
            let mut want = Vec::with_capacity(total * nh * hd);
            for t in 0..total {
                for h in 0..nh {
                    let qh = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                    want.extend(naive(level, qh, kv, h / (nh / nkv), hd, t));
                }
            }
            for threads in [1, 3] {
                let cpu = Cpu::new(threads, Some(level)).unwrap();
                let per_thread: Vec<_> = (0..threads).map(|_| Default::default()).collect();
                // Chunks as prefill and decode would issue them.
                for chunk in [total, 17, 1] {
                    let mut got = vec![f32::NAN; total * nh * hd];
                    for pos0 in (0..total).step_by(chunk) {
                        let n = chunk.min(total - pos0);
                        // The cache as it stands after pushing this chunk.
                        let mut part = KvCache::new(&[Some((nkv * hd, nkv * hd))], total, kv_type);
                        let end = (pos0 + n) * nkv * hd;
                        part.layers[0].push(&k[..end], &v[..end]);
                        let at = pos0 * nh * hd..(pos0 + n) * nh * hd;
                        attend(
                            &cpu,
                            &per_thread,
                            &q[at.clone()],
                            &part.layers[0],
                            &mut got[at],
                            [nh, nkv, hd],
                            n,
                            pos0,
                        );
                    }
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "head_dim {hd}, {kv_type:?}, {}, {threads} threads, chunks of {chunk}",
                        level.name()
                    );
                }
            }
        }
    }
}
