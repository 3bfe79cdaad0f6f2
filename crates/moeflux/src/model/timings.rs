//! Where a forward pass spends its time, by part of the layer: the
//! numbers `moeflux bench` splits a run into. Collected on every pass (a
//! handful of clock reads per layer).

use std::time::{Duration, Instant};

/// Accumulated wall time per part of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Gated DeltaNet layers: projections, conv, delta rule, output.
    pub linear_attn: Duration,
    /// Softmax attention layers.
    pub full_attn: Duration,
    /// Routed MoE: router, waiting for and computing the experts
    /// (the store's stall counter says how much of it was waiting).
    pub moe: Duration,
    /// Shared experts and dense FFNs.
    pub dense_ffn: Duration,
    /// Router lookahead for the next layer (GPU backend: submitting the
    /// copies of the guessed experts; the guess's product is in `moe`).
    pub prefetch: Duration,
    /// Embedding, norms, residual adds and the LM head.
    pub other: Duration,
    /// GPU backend: the host waiting for submitted work (the GPU's own
    /// compute time, as far as recording did not overlap it). The parts
    /// above then count the host's time to record and route.
    pub gpu_wait: Duration,
    /// GPU backend: encoding recorded dispatches and submitting them.
    pub gpu_submit: Duration,
}

impl Timings {
    /// `self − earlier`, part by part.
    pub fn since(&self, earlier: &Timings) -> Timings {
        Timings {
            linear_attn: self.linear_attn.saturating_sub(earlier.linear_attn),
            full_attn: self.full_attn.saturating_sub(earlier.full_attn),
            moe: self.moe.saturating_sub(earlier.moe),
            dense_ffn: self.dense_ffn.saturating_sub(earlier.dense_ffn),
            prefetch: self.prefetch.saturating_sub(earlier.prefetch),
            other: self.other.saturating_sub(earlier.other),
            gpu_wait: self.gpu_wait.saturating_sub(earlier.gpu_wait),
            gpu_submit: self.gpu_submit.saturating_sub(earlier.gpu_submit),
        }
    }

    pub fn total(&self) -> Duration {
        self.linear_attn
            + self.full_attn
            + self.moe
            + self.dense_ffn
            + self.prefetch
            + self.other
            + self.gpu_wait
            + self.gpu_submit
    }
}

/// A running clock that charges each lap to a part.
pub struct Lap(Instant);

impl Lap {
    pub fn start() -> Lap {
        Lap(Instant::now())
    }

    /// Adds the time since the last lap to `to` and starts the next.
    pub fn charge(&mut self, to: &mut Duration) {
        let now = Instant::now();
        *to += now - self.0;
        self.0 = now;
    }
}
