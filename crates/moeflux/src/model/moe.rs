//! The routed-expert FFN: router, top-k selection and the experts' SwiGLU,
//! computed through the expert store.
//!
//! The tokens of a chunk are grouped by expert, so each chosen expert's
//! weights are read once per chunk. Experts are computed in waves, as the
//! store can hold them: in each wave the resident experts are computed
//! first while the missing ones are read, then each batch of arrivals
//! (gate and up projections of the batch as one parallel job, then the down
//! projections as another). Each token's expert outputs are combined in
//! router-rank order, so the result never depends on which expert's weights
//! arrived first, how many slots there are, or how many threads computed.

use super::weights::WeightRef;
use crate::backend::cpu::kernels::{input_from, input_needs, project, run_jobs, MatJob, OutPtr};
use crate::backend::cpu::ops::{silu, softmax};
use crate::backend::cpu::workspace::{recycle, sized, Workspace};
use crate::backend::cpu::Cpu;
use crate::experts::{ExpertStore, StoreError};
use crate::format::{ModelFiles, ModelMetadata};
use crate::model::ModelConfig;

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

/// Whether a checkpoint renormalises its top-k weights: GGUF
/// `{arch}.expert_weights_norm`, Hugging Face `norm_topk_prob` (in the
/// `text_config` of multimodal checkpoints); when absent, the given default
/// of that format, recorded in `cfg.defaults_used`.
pub fn norm_topk(
    files: &ModelFiles,
    cfg: &mut ModelConfig,
    gguf_default: bool,
    hf_default: bool,
) -> bool {
    let (found, key, default) = match &files.metadata {
        ModelMetadata::Gguf(m) => {
            let key = format!("{}.expert_weights_norm", cfg.arch.gguf_name());
            (m.get_bool(&key), key, gguf_default)
        }
        ModelMetadata::Hf(c) => {
            let c = c.get("text_config").unwrap_or(c);
            let v = c.get("norm_topk_prob").and_then(serde_json::Value::as_bool);
            (v, "norm_topk_prob".to_string(), hf_default)
        }
    };
    found.unwrap_or_else(|| {
        cfg.defaults_used.push(format!("{key} = {default}"));
        default
    })
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

    /// Router logits for `n` rows of normalised hidden state `h` into
    /// `logits` (`n × n_experts`).
    pub fn router_logits(
        &self,
        files: &ModelFiles,
        cpu: &Cpu,
        ws_acts: &mut crate::backend::cpu::kernels::Acts,
        h: &[f32],
        logits: &mut [f32],
    ) {
        project(
            &cpu.pool,
            cpu.level,
            ws_acts,
            h,
            self.router.cols,
            [(self.router.view(files), logits)],
        );
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
    ) -> Result<(), StoreError> {
        let hidden = self.router.cols;
        let (ne, ff, k) = (self.n_experts, self.expert_ff, self.routing.k());
        let level = cpu.level;
        let layer = self.layer;
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
            experts_used,
            experts_granted,
            experts_todo,
            experts_ready,
            ..
        } = ws;
        let h = &h[..n * hidden];

        // Route.
        let logits = sized(router, n * ne);
        self.router_logits(files, cpu, acts, h, logits);
        choice.resize(n * k, (0, 0.0));
        for t in 0..n {
            self.route(
                &mut logits[t * ne..(t + 1) * ne],
                &mut choice[t * k..(t + 1) * k],
            );
        }

        // Group (token, rank) pairs by expert (a counting sort).
        expert_start.clear();
        expert_start.resize(ne + 2, 0);
        for &(e, _) in choice.iter() {
            expert_start[e as usize + 2] += 1;
        }
        for e in 0..ne {
            expert_start[e + 2] += expert_start[e + 1];
        }
        // expert_start[e + 1] is now where expert e's pairs go; filling
        // advances it to expert e's end, leaving expert_start[e] its start.
        by_expert.resize(n * k, (0, 0));
        for t in 0..n {
            for r in 0..k {
                let e = choice[t * k + r].0 as usize;
                by_expert[expert_start[e + 1]] = (t as u32, r as u32);
                expert_start[e + 1] += 1;
            }
        }
        let m_total = n * k;
        let xs = sized(moe_in, m_total * hidden);
        for (i, &(t, _)) in by_expert.iter().enumerate() {
            xs[i * hidden..(i + 1) * hidden]
                .copy_from_slice(&h[t as usize * hidden..(t as usize + 1) * hidden]);
        }

        // Inputs, quantized once for all experts (row by row, so in waves
        // or not the numbers are the same).
        let first = &store.experts(layer)[0];
        let (q8_in, pow2_in) = input_needs(&[first.gate.ty, first.up.ty], level);
        let (q8_mid, pow2_mid) = input_needs(&[first.down.ty], level);
        if q8_in {
            acts.q8.reserve_rows(m_total, hidden, pow2_in);
            acts.q8.quantize_rows(xs, 0, m_total);
        }
        if q8_mid {
            acts2.q8.reserve_rows(m_total, ff, pow2_mid);
        }
        let gate = sized(gate, m_total * ff);
        let up = sized(up, m_total * ff);
        let down = sized(down, m_total * hidden);
        let range = |e: u32| {
            let e = e as usize;
            (expert_start[e], expert_start[e + 1] - expert_start[e])
        };

        experts_used.clear();
        experts_used.extend((0..ne as u32).filter(|&e| range(e).1 > 0));
        while !experts_used.is_empty() {
            experts_granted.clear();
            store.acquire(layer, experts_used, experts_granted)?;
            if experts_granted.is_empty() {
                return Err(StoreError::Setup(
                    "no expert slot is free: the arena is smaller than one layer's experts".into(),
                ));
            }
            experts_todo.clear();
            experts_todo.extend_from_slice(experts_granted);
            while !experts_todo.is_empty() {
                experts_ready.clear();
                for &e in experts_todo.iter() {
                    if store.ready(layer, e)? {
                        experts_ready.push(e);
                    }
                }
                if experts_ready.is_empty() {
                    store.wait_any(layer, experts_todo);
                    continue;
                }
                {
                    let views: Vec<_> = experts_ready
                        .iter()
                        .map(|&e| store.view(layer, e))
                        .collect();
                    // Gate and up projections of the batch: one job.
                    let input = input_from(xs, hidden, q8_in.then_some(&*acts));
                    let mut list: Vec<MatJob<'_>> = recycle(std::mem::take(jobs));
                    for (v, &e) in views.iter().zip(experts_ready.iter()) {
                        let (s, m) = range(e);
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
                    list.clear();
                    for &e in experts_ready.iter() {
                        let (s, m) = range(e);
                        for (g, u) in gate[s * ff..(s + m) * ff]
                            .iter_mut()
                            .zip(&up[s * ff..(s + m) * ff])
                        {
                            *g = silu(*g) * u;
                        }
                        if q8_mid {
                            acts2.q8.quantize_rows(gate, s, s + m);
                        }
                    }
                    // Down projections: a second job.
                    let input = input_from(gate, ff, q8_mid.then_some(&*acts2));
                    for (v, &e) in views.iter().zip(experts_ready.iter()) {
                        let (s, m) = range(e);
                        list.push(MatJob {
                            w: v.down,
                            input: input.rows(s, m),
                            y: OutPtr::new(&mut down[s * hidden..(s + m) * hidden]),
                        });
                    }
                    run_jobs(&cpu.pool, &list, level);
                    *jobs = recycle(list);
                }
                store.release(layer, experts_ready);
                experts_todo.retain(|e| !experts_ready.contains(e));
            }
            experts_used.retain(|e| !experts_granted.contains(e));
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
        Ok(())
    }
}
