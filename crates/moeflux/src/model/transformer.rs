//! A decoder-only MoE transformer as data: embedding, layers (token mixer +
//! FFN), final norm and LM head. The architecture files build a [`Model`];
//! [`Model::forward`] runs any of them.

use super::attention::Attention;
use super::moe::Moe;
use super::weights::WeightRef;
use super::ModelConfig;
use crate::backend::cpu::matmul;
use crate::backend::cpu::ops::{rms_norm, silu};
use crate::experts::ExpertStore;
use crate::format::ModelFiles;
use crate::state::KvCache;
use crate::tokenizer::TokenId;

/// A dense SwiGLU FFN (DeepSeek's first layers; shared experts).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseFfn {
    pub gate: WeightRef,
    pub up: WeightRef,
    pub down: WeightRef,
}

impl DenseFfn {
    pub fn forward(&self, files: &ModelFiles, x: &[f32], n: usize, out: &mut [f32]) {
        let ff = self.gate.rows;
        let mut g = vec![0f32; n * ff];
        let mut u = vec![0f32; n * ff];
        matmul(&self.gate.view(files), x, n, &mut g);
        matmul(&self.up.view(files), x, n, &mut u);
        for (a, b) in g.iter_mut().zip(&u) {
            *a = silu(*a) * b;
        }
        matmul(&self.down.view(files), &g, n, out);
    }
}

/// A layer's feed-forward part.
#[derive(Clone, Debug, PartialEq)]
pub enum Ffn {
    Moe(Moe),
    Dense(DenseFfn),
}

/// One decoder layer: pre-norm attention, then pre-norm FFN, each added to
/// the residual stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn: Attention,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
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

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    Last,
    All,
}

impl Model {
    /// KV dimensions per layer, for [`KvCache::new`].
    pub fn kv_dims(&self) -> Vec<Option<(usize, usize)>> {
        self.layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                Some((a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim))
            })
            .collect()
    }

    /// Runs `tokens` (at positions `kv.len..`) through the model, appending
    /// to the KV cache; returns the logits of the last position or of all
    /// (`n × vocab`). Token ids must be below the vocabulary size (checked
    /// by the caller).
    pub fn forward(
        &self,
        files: &ModelFiles,
        store: &mut ExpertStore,
        kv: &mut KvCache,
        tokens: &[TokenId],
        which: Logits,
    ) -> Vec<f32> {
        let n = tokens.len();
        let hidden = self.cfg.hidden;
        let eps = self.cfg.rms_eps;
        let pos0 = kv.len;

        let embed = self.embed.view(files);
        let mut x = vec![0f32; n * hidden];
        for (t, &id) in tokens.iter().enumerate() {
            embed.row(id as usize, &mut x[t * hidden..(t + 1) * hidden]);
        }

        let mut h = vec![0f32; n * hidden];
        let mut o = vec![0f32; n * hidden];
        for (l, layer) in self.layers.iter().enumerate() {
            for t in 0..n {
                rms_norm(
                    &x[t * hidden..(t + 1) * hidden],
                    &layer.attn_norm,
                    eps,
                    &mut h[t * hidden..(t + 1) * hidden],
                );
            }
            layer
                .attn
                .forward(files, &mut kv.layers[l], &h, n, pos0, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            for t in 0..n {
                rms_norm(
                    &x[t * hidden..(t + 1) * hidden],
                    &layer.ffn_norm,
                    eps,
                    &mut h[t * hidden..(t + 1) * hidden],
                );
            }
            match &layer.ffn {
                Ffn::Moe(m) => m.forward(files, store, &h, n, hidden, &mut o),
                Ffn::Dense(d) => d.forward(files, &h, n, &mut o),
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        kv.len = pos0 + n;

        let rows: Vec<usize> = match which {
            Logits::Last => vec![n - 1],
            Logits::All => (0..n).collect(),
        };
        let mut normed = vec![0f32; rows.len() * hidden];
        for (i, &t) in rows.iter().enumerate() {
            rms_norm(
                &x[t * hidden..(t + 1) * hidden],
                &self.output_norm,
                eps,
                &mut normed[i * hidden..(i + 1) * hidden],
            );
        }
        let vocab = self.lm_head.rows;
        let mut logits = vec![0f32; rows.len() * vocab];
        matmul(&self.lm_head.view(files), &normed, rows.len(), &mut logits);
        logits
    }
}
