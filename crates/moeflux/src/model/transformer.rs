//! A decoder-only MoE transformer as data: embedding, layers (token mixer +
//! FFN), final norm and LM head. The architecture files build a [`Model`];
//! [`Model::forward`] runs any of them.

use super::attention::Attention;
use super::linear_attention::GatedDeltaNet;
use super::moe::Moe;
use super::timings::Lap;
use super::weights::WeightRef;
use super::ModelConfig;
use crate::backend::cpu::kernels::project;
use crate::backend::cpu::ops::{rms_norm, sigmoid, silu};
use crate::backend::cpu::workspace::{sized, Workspace};
use crate::backend::cpu::Cpu;
use crate::experts::{ExpertStore, StoreError};
use crate::format::ModelFiles;
use crate::state::{KvCache, KvType, SessionState};
use crate::tokenizer::TokenId;

/// A dense SwiGLU FFN (DeepSeek's first layers; shared experts).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseFfn {
    pub gate: WeightRef,
    pub up: WeightRef,
    pub down: WeightRef,
}

impl DenseFfn {
    /// `ws.h` (`n × hidden`) → `ws.o`.
    pub fn forward(&self, files: &ModelFiles, cpu: &Cpu, ws: &mut Workspace, n: usize) {
        let (ff, hidden) = (self.gate.rows, self.gate.cols);
        let level = cpu.level;
        let Workspace {
            h,
            o,
            gate,
            up,
            acts,
            ..
        } = ws;
        let (wg, wu, wd) = (
            self.gate.view(files),
            self.up.view(files),
            self.down.view(files),
        );
        let g = sized(gate, n * ff);
        let u = sized(up, n * ff);
        project(
            &cpu.pool,
            level,
            acts,
            &h[..n * hidden],
            hidden,
            [(wg, &mut *g), (wu, &mut *u)],
        );
        for (a, b) in g.iter_mut().zip(u.iter()) {
            *a = silu(*a) * b;
        }
        let o = sized(o, n * hidden);
        project(&cpu.pool, level, acts, g, ff, [(wd, o)]);
    }
}

/// A layer's feed-forward part.
#[derive(Clone, Debug, PartialEq)]
pub enum Ffn {
    Moe(Moe),
    Dense(DenseFfn),
}

/// A shared expert: a dense SwiGLU FFN every token goes through beside the
/// routed experts, its output optionally scaled by `σ(gate · h)` (the Qwen
/// hybrids' `shared_expert_gate`, a `[1, hidden]` weight).
#[derive(Clone, Debug, PartialEq)]
pub struct SharedExpert {
    pub ffn: DenseFfn,
    pub gate: Option<WeightRef>,
}

impl SharedExpert {
    /// Adds the shared expert's output for `ws.h` to `ws.o` (which holds
    /// the routed experts' sum).
    fn add_to(&self, files: &ModelFiles, cpu: &Cpu, ws: &mut Workspace, n: usize) {
        let hidden = self.ffn.gate.cols;
        std::mem::swap(&mut ws.o, &mut ws.shared);
        self.ffn.forward(files, cpu, ws, n);
        if let Some(g) = &self.gate {
            let scale = sized(&mut ws.router, n);
            project(
                &cpu.pool,
                cpu.level,
                &mut ws.acts,
                &ws.h[..n * hidden],
                hidden,
                [(g.view(files), &mut *scale)],
            );
            for (row, &s) in ws.o.chunks_exact_mut(hidden).zip(scale.iter()) {
                let s = sigmoid(s);
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        // ws.o = routed + shared.
        std::mem::swap(&mut ws.o, &mut ws.shared);
        add(&mut ws.o[..n * hidden], &ws.shared[..n * hidden]);
    }
}

/// A layer's token mixer.
#[derive(Clone, Debug, PartialEq)]
pub enum Mixer {
    /// Softmax attention with a KV cache.
    Attention(Attention),
    /// Gated DeltaNet with a fixed-size recurrent state.
    Linear(GatedDeltaNet),
}

/// One decoder layer: pre-norm token mixer, then pre-norm FFN (plus shared
/// expert), each added to the residual stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub mixer: Mixer,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
    pub shared: Option<SharedExpert>,
}

/// A whole model.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`
    pub embed: WeightRef,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `[vocab, hidden]`; the embedding itself when tied.
    pub lm_head: WeightRef,
}

/// What a forward pass computes with: the model's files, the CPU backend,
/// and whether to prefetch the next layer's predicted experts.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub files: &'a ModelFiles,
    pub cpu: &'a Cpu,
    pub prefetch: Prefetch,
}

/// Expert prefetch policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Read experts only when a layer asks for them. The default: on the
    /// shared disk it was measured on, lookahead's reads competed with the
    /// current layer's misses and did not win (bench/BENCHMARKS.md).
    #[default]
    Off,
    /// Router lookahead: as soon as a layer's output exists, apply the next
    /// layer's router to it and read the experts it picks.
    Lookahead,
}

impl Prefetch {
    pub fn from_name(s: &str) -> Option<Prefetch> {
        match s {
            "off" => Some(Prefetch::Off),
            "lookahead" => Some(Prefetch::Lookahead),
            _ => None,
        }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

impl Model {
    /// Every dense (non-expert) weight matrix.
    pub fn dense_weights(&self) -> Vec<&WeightRef> {
        let mut out = vec![&self.embed, &self.lm_head];
        for l in &self.layers {
            match &l.mixer {
                Mixer::Attention(a) => out.extend([&a.wq, &a.wk, &a.wv, &a.wo]),
                Mixer::Linear(g) => out.extend(g.weights()),
            }
            match &l.ffn {
                Ffn::Moe(m) => out.push(&m.router),
                Ffn::Dense(d) => out.extend([&d.gate, &d.up, &d.down]),
            }
            if let Some(s) = &l.shared {
                out.extend([&s.ffn.gate, &s.ffn.up, &s.ffn.down]);
                out.extend(s.gate.as_ref());
            }
        }
        out
    }

    /// The file spans of every dense weight matrix (what stays resident).
    pub fn dense_spans(&self) -> Vec<crate::format::Span> {
        self.dense_weights()
            .into_iter()
            .flat_map(|w| w.parts.iter().copied())
            .collect()
    }

    /// An empty session state: a KV cache for the attention layers (up to
    /// `ctx` positions, in `kv_type`) and a zeroed recurrent state for the
    /// linear-attention layers.
    pub fn new_state(&self, ctx: usize, kv_type: KvType) -> SessionState {
        let dims: Vec<_> = self
            .layers
            .iter()
            .map(|l| match &l.mixer {
                Mixer::Attention(a) => Some((a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim)),
                Mixer::Linear(_) => None,
            })
            .collect();
        SessionState {
            kv: KvCache::new(&dims, ctx, kv_type),
            linear: self
                .layers
                .iter()
                .map(|l| match &l.mixer {
                    Mixer::Linear(g) => Some(g.new_state()),
                    Mixer::Attention(_) => None,
                })
                .collect(),
        }
    }

    /// Runs `tokens` (at positions `state.len()..`) through the model,
    /// appending to the KV cache and advancing the recurrent state; returns the logits of the last position or of all
    /// (`n × vocab`), in `ws.logits`. Token ids must be below the vocabulary
    /// size (checked by the caller).
    pub fn forward<'w>(
        &self,
        cx: Context<'_>,
        store: &mut ExpertStore,
        state: &mut SessionState,
        ws: &'w mut Workspace,
        tokens: &[TokenId],
        which: Logits,
    ) -> Result<&'w [f32], StoreError> {
        let Context {
            files,
            cpu,
            prefetch,
        } = cx;
        let n = tokens.len();
        let hidden = self.cfg.hidden;
        let eps = self.cfg.rms_eps;
        let pos0 = state.kv.len;
        store.begin_step();
        let mut lap = Lap::start();

        let embed = self.embed.view(files);
        {
            let x = sized(&mut ws.x, n * hidden);
            for (t, &id) in tokens.iter().enumerate() {
                embed.row(id as usize, &mut x[t * hidden..(t + 1) * hidden]);
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            norm_rows(
                &ws.x,
                &layer.attn_norm,
                eps,
                hidden,
                sized(&mut ws.h, n * hidden),
            );
            lap.charge(&mut ws.timings.other);
            match (&layer.mixer, &mut state.linear[l]) {
                (Mixer::Attention(a), _) => {
                    a.forward(files, cpu, ws, &mut state.kv.layers[l], n, pos0);
                    lap.charge(&mut ws.timings.full_attn);
                }
                (Mixer::Linear(g), Some(st)) => {
                    g.forward(files, cpu, ws, st, n);
                    lap.charge(&mut ws.timings.linear_attn);
                }
                (Mixer::Linear(_), None) => {
                    unreachable!("the state was made by new_state for this model")
                }
            }
            add(&mut ws.x, &ws.o);

            norm_rows(
                &ws.x,
                &layer.ffn_norm,
                eps,
                hidden,
                sized(&mut ws.h, n * hidden),
            );
            lap.charge(&mut ws.timings.other);
            match &layer.ffn {
                Ffn::Moe(m) => {
                    m.forward(files, cpu, store, ws, n)?;
                    lap.charge(&mut ws.timings.moe);
                }
                Ffn::Dense(d) => {
                    d.forward(files, cpu, ws, n);
                    lap.charge(&mut ws.timings.dense_ffn);
                }
            }
            if let Some(shared) = &layer.shared {
                shared.add_to(files, cpu, ws, n);
                lap.charge(&mut ws.timings.dense_ffn);
            }
            add(&mut ws.x, &ws.o);
            if prefetch == Prefetch::Lookahead {
                if let Some(next) = self.layers.get(l + 1) {
                    lap.charge(&mut ws.timings.other);
                    self.prefetch_for(files, cpu, store, ws, l, next, n);
                    lap.charge(&mut ws.timings.prefetch);
                }
            }
        }
        state.kv.len = pos0 + n;

        let (first, rows) = match which {
            Logits::Last => (n - 1, 1),
            Logits::All => (0, n),
        };
        let x = &ws.x[first * hidden..(first + rows) * hidden];
        norm_rows(
            x,
            &self.output_norm,
            eps,
            hidden,
            sized(&mut ws.h, rows * hidden),
        );
        let vocab = self.lm_head.rows;
        let head = self.lm_head.view(files);
        let logits = sized(&mut ws.logits, rows * vocab);
        project(
            &cpu.pool,
            cpu.level,
            &mut ws.acts,
            &ws.h[..rows * hidden],
            hidden,
            [(head, logits)],
        );
        lap.charge(&mut ws.timings.other);
        Ok(&ws.logits[..rows * vocab])
    }

    /// Router lookahead: the next layer's router applied to the current
    /// hidden state `ws.x` (after layer `l`), and reads started for the
    /// experts it picks. At most `k` per token and never more than a
    /// quarter of the arena, so a prefetch cannot flush the cache.
    #[allow(clippy::too_many_arguments)]
    fn prefetch_for(
        &self,
        files: &ModelFiles,
        cpu: &Cpu,
        store: &mut ExpertStore,
        ws: &mut Workspace,
        l: usize,
        next: &Layer,
        n: usize,
    ) {
        let Ffn::Moe(m) = &next.ffn else {
            return;
        };
        let hidden = self.cfg.hidden;
        norm_rows(
            &ws.x,
            &next.ffn_norm,
            self.cfg.rms_eps,
            hidden,
            sized(&mut ws.h, n * hidden),
        );
        let (ne, k) = (m.n_experts, m.routing.k());
        let logits = sized(&mut ws.router, n * ne);
        m.router_logits(files, cpu, &mut ws.acts, &ws.h[..n * hidden], logits);
        ws.choice.resize(k, (0, 0.0));
        ws.experts_used.clear();
        for t in 0..n {
            m.route(&mut logits[t * ne..(t + 1) * ne], &mut ws.choice[..k]);
            for &(e, _) in &ws.choice[..k] {
                if !ws.experts_used.contains(&e) {
                    ws.experts_used.push(e);
                }
            }
        }
        let cap = (store.n_slots() / 4).max(k);
        ws.experts_used.truncate(cap);
        store.prefetch(m.layer, &ws.experts_used, Some(l));
    }
}

/// RMSNorm of each `hidden`-sized row of `x` into `out`.
fn norm_rows(x: &[f32], weight: &[f32], eps: f32, hidden: usize, out: &mut [f32]) {
    for (xi, oi) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        rms_norm(xi, weight, eps, oi);
    }
}

/// `x += o`.
fn add(x: &mut [f32], o: &[f32]) {
    x.iter_mut().zip(o).for_each(|(a, b)| *a += b);
}
