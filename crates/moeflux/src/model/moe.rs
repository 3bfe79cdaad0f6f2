//! The routed-expert FFN: router, top-k selection and the experts' SwiGLU,
//! computed through the expert store.
//!
//! Each token's expert outputs are combined in router-rank order, so the
//! result never depends on which expert's weights arrived first.

use super::weights::WeightRef;
use crate::backend::cpu::matmul;
use crate::backend::cpu::ops::{silu, softmax};
use crate::experts::ExpertStore;
use crate::format::ModelFiles;

/// How router logits become expert choices and weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, the `k` largest kept, renormalised to sum
    /// to 1 when `norm` (Qwen3-MoE's `norm_topk_prob`).
    SoftmaxTopK { k: usize, norm: bool },
}

/// One MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    /// Index of the layer (the expert store's key).
    pub layer: usize,
    /// `[n_experts, hidden]`.
    pub router: WeightRef,
    pub routing: Routing,
    pub n_experts: usize,
    pub expert_ff: usize,
}

/// The experts chosen for one token, best first, with their weights.
pub type Choice = Vec<(u32, f32)>;

impl Moe {
    /// Picks each token's experts from its router logits.
    pub fn route(&self, logits: &mut [f32]) -> Choice {
        match self.routing {
            Routing::SoftmaxTopK { k, norm } => {
                softmax(logits);
                let mut order: Vec<u32> = (0..logits.len() as u32).collect();
                // Descending probability; lower expert id first on ties.
                order.sort_by(|&a, &b| {
                    logits[b as usize]
                        .total_cmp(&logits[a as usize])
                        .then(a.cmp(&b))
                });
                let mut choice: Choice = order[..k]
                    .iter()
                    .map(|&e| (e, logits[e as usize]))
                    .collect();
                if norm {
                    let sum: f32 = choice.iter().map(|c| c.1).sum();
                    choice.iter_mut().for_each(|c| c.1 /= sum);
                }
                choice
            }
        }
    }

    /// The layer for `n` tokens of normalised hidden state `x`; the weighted
    /// sum of the chosen experts goes to `out` (`n × hidden`).
    pub fn forward(
        &self,
        files: &ModelFiles,
        store: &mut ExpertStore,
        x: &[f32],
        n: usize,
        hidden: usize,
        out: &mut [f32],
    ) {
        let mut logits = vec![0f32; n * self.n_experts];
        matmul(&self.router.view(files), x, n, &mut logits);
        let choices: Vec<Choice> = logits
            .chunks_exact_mut(self.n_experts)
            .map(|l| self.route(l))
            .collect();
        let k = choices.first().map_or(0, Vec::len);

        // Group (token, rank) pairs by expert, so each expert's weights are
        // used once for all the tokens that chose it.
        let mut by_expert: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.n_experts];
        for (t, c) in choices.iter().enumerate() {
            for (r, &(e, _)) in c.iter().enumerate() {
                by_expert[e as usize].push((t, r));
            }
        }
        let ff = self.expert_ff;
        // One output row per (token, rank).
        let mut y = vec![0f32; n * k * hidden];
        for (e, users) in by_expert.iter().enumerate() {
            if users.is_empty() {
                continue;
            }
            let m = users.len();
            let mut xs = Vec::with_capacity(m * hidden);
            for &(t, _) in users {
                xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let w = store.view(files, self.layer, e);
            let mut gate = vec![0f32; m * ff];
            let mut up = vec![0f32; m * ff];
            matmul(&w.gate, &xs, m, &mut gate);
            matmul(&w.up, &xs, m, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            let mut down = vec![0f32; m * hidden];
            matmul(&w.down, &gate, m, &mut down);
            for (i, &(t, r)) in users.iter().enumerate() {
                y[(t * k + r) * hidden..(t * k + r + 1) * hidden]
                    .copy_from_slice(&down[i * hidden..(i + 1) * hidden]);
            }
        }
        for (t, c) in choices.iter().enumerate() {
            let o = &mut out[t * hidden..(t + 1) * hidden];
            o.fill(0.0);
            for (r, &(_, weight)) in c.iter().enumerate() {
                let yr = &y[(t * k + r) * hidden..(t * k + r + 1) * hidden];
                for (a, &b) in o.iter_mut().zip(yr) {
                    *a += weight * b;
                }
            }
        }
    }
}
