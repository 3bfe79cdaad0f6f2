//! The routed-expert FFN: router, top-k selection and the experts' SwiGLU,
//! computed through the expert store.
//!
//! The tokens of a chunk are grouped by expert, so each chosen expert's
//! weights are read once per chunk, and all experts' gate and up
//! projections run as one parallel job, then all down projections as
//! another. Each token's expert outputs are combined in router-rank order,
//! so the result never depends on which expert's weights arrived first.

use super::weights::WeightRef;
use crate::backend::cpu::kernels::{prepare, run_jobs, MatJob, OutPtr};
use crate::backend::cpu::ops::{silu, softmax};
use crate::backend::cpu::workspace::{recycle, sized, Workspace};
use crate::backend::cpu::Cpu;
use crate::experts::ExpertStore;
use crate::format::ModelFiles;

/// How router logits become expert choices and weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, the `k` largest kept, renormalised to sum
    /// to 1 when `norm` (Qwen3-MoE's `norm_topk_prob`).
    SoftmaxTopK { k: usize, norm: bool },
}

impl Routing {
    pub fn k(&self) -> usize {
        match *self {
            Routing::SoftmaxTopK { k, .. } => k,
        }
    }
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

impl Moe {
    /// Picks a token's experts from its router logits (in place: they become
    /// probabilities), best first, into `out` (`k` entries).
    pub fn route(&self, logits: &mut [f32], out: &mut [(u32, f32)]) {
        match self.routing {
            Routing::SoftmaxTopK { k, norm } => {
                softmax(logits);
                // Partial selection: the k best, descending probability,
                // lower expert id first on ties.
                for slot in 0..k {
                    let mut best: Option<usize> = None;
                    for (e, &p) in logits.iter().enumerate() {
                        if out[..slot].iter().any(|c| c.0 as usize == e) {
                            continue;
                        }
                        if best.is_none_or(|b| p > logits[b]) {
                            best = Some(e);
                        }
                    }
                    let e = best.unwrap_or(0);
                    out[slot] = (e as u32, logits[e]);
                }
                if norm {
                    let sum: f32 = out.iter().map(|c| c.1).sum();
                    out.iter_mut().for_each(|c| c.1 /= sum);
                }
            }
        }
    }

    /// The layer for `n` tokens of normalised hidden state `ws.h`; the
    /// weighted sum of the chosen experts goes to `ws.o` (`n × hidden`).
    pub fn forward(
        &self,
        files: &ModelFiles,
        cpu: &Cpu,
        store: &mut ExpertStore,
        ws: &mut Workspace,
        n: usize,
    ) {
        let hidden = self.router.cols;
        let (ne, ff, k) = (self.n_experts, self.expert_ff, self.routing.k());
        let level = cpu.level;
        let Workspace {
            h,
            o,
            router,
            moe_in,
            gate,
            up,
            down,
            y,
            acts,
            acts2,
            choice,
            by_expert,
            expert_start,
            jobs,
            ..
        } = ws;
        let h = &h[..n * hidden];

        // Route.
        let wr = self.router.view(files);
        let logits = sized(router, n * ne);
        {
            let input = prepare(h, hidden, &[&wr], acts, level);
            run_jobs(
                &cpu.pool,
                &[MatJob {
                    w: wr,
                    input,
                    y: OutPtr::new(logits),
                }],
                level,
            );
        }
        choice.resize(n * k, (0, 0.0));
        for t in 0..n {
            self.route(
                &mut logits[t * ne..(t + 1) * ne],
                &mut choice[t * k..(t + 1) * k],
            );
        }

        // Group (token, rank) pairs by expert (a counting sort).
        expert_start.clear();
        expert_start.resize(ne + 1, 0);
        for &(e, _) in choice.iter() {
            expert_start[e as usize + 1] += 1;
        }
        for e in 0..ne {
            expert_start[e + 1] += expert_start[e];
        }
        by_expert.resize(n * k, (0, 0));
        {
            let mut fill = expert_start.clone();
            for t in 0..n {
                for r in 0..k {
                    let e = choice[t * k + r].0 as usize;
                    by_expert[fill[e]] = (t as u32, r as u32);
                    fill[e] += 1;
                }
            }
        }
        let m_total = n * k;
        let xs = sized(moe_in, m_total * hidden);
        for (i, &(t, _)) in by_expert.iter().enumerate() {
            xs[i * hidden..(i + 1) * hidden]
                .copy_from_slice(&h[t as usize * hidden..(t as usize + 1) * hidden]);
        }

        // The chosen experts' weights, from the store.
        let used: Vec<usize> = (0..ne)
            .filter(|&e| expert_start[e + 1] > expert_start[e])
            .collect();
        let views: Vec<_> = used
            .iter()
            .map(|&e| store.view(files, self.layer, e))
            .collect();

        // Gate and up projections of every used expert: one job.
        let gate = sized(gate, m_total * ff);
        let up = sized(up, m_total * ff);
        {
            let weights: Vec<_> = views.iter().flat_map(|v| [&v.gate, &v.up]).collect();
            let input = prepare(xs, hidden, &weights, acts, level);
            let mut list: Vec<MatJob<'_>> = recycle(std::mem::take(jobs));
            for (v, &e) in views.iter().zip(&used) {
                let (s, m) = (expert_start[e], expert_start[e + 1] - expert_start[e]);
                let rows = input.rows(s, m);
                list.push(MatJob {
                    w: v.gate,
                    input: rows,
                    y: OutPtr::new(&mut gate[s * ff..(s + m) * ff]),
                });
                list.push(MatJob {
                    w: v.up,
                    input: rows,
                    y: OutPtr::new(&mut up[s * ff..(s + m) * ff]),
                });
            }
            run_jobs(&cpu.pool, &list, level);
            *jobs = recycle(list);
        }
        for (g, u) in gate.iter_mut().zip(up.iter()) {
            *g = silu(*g) * u;
        }

        // Down projections: a second job.
        let down = sized(down, m_total * hidden);
        {
            let weights: Vec<_> = views.iter().map(|v| &v.down).collect();
            let input = prepare(gate, ff, &weights, acts2, level);
            let mut list: Vec<MatJob<'_>> = recycle(std::mem::take(jobs));
            for (v, &e) in views.iter().zip(&used) {
                let (s, m) = (expert_start[e], expert_start[e + 1] - expert_start[e]);
                list.push(MatJob {
                    w: v.down,
                    input: input.rows(s, m),
                    y: OutPtr::new(&mut down[s * hidden..(s + m) * hidden]),
                });
            }
            run_jobs(&cpu.pool, &list, level);
            *jobs = recycle(list);
        }

        // Weighted combination in rank order.
        let ysum = sized(y, n * k * hidden);
        for (i, &(t, r)) in by_expert.iter().enumerate() {
            let at = (t as usize * k + r as usize) * hidden;
            ysum[at..at + hidden].copy_from_slice(&down[i * hidden..(i + 1) * hidden]);
        }
        let o = sized(o, n * hidden);
        for t in 0..n {
            let ot = &mut o[t * hidden..(t + 1) * hidden];
            ot.fill(0.0);
            for r in 0..k {
                let weight = choice[t * k + r].1;
                let yr = &ysum[(t * k + r) * hidden..(t * k + r + 1) * hidden];
                for (a, &b) in ot.iter_mut().zip(yr) {
                    *a += weight * b;
                }
            }
        }
    }
}
