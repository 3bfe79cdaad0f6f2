//! Scratch memory for a forward pass, owned by a session and reused: after
//! the first chunk of a given size, a forward pass allocates nothing.

use std::sync::Mutex;

use super::kernels::{Acts, MatJob};

/// Named scratch buffers. Each grows to the largest size asked of it.
#[derive(Default)]
pub struct Workspace {
    pub acts: Acts,
    /// A second activation buffer, for products whose input is computed
    /// from the first's output (the experts' down projections).
    pub acts2: Acts,
    pub x: Vec<f32>,
    pub h: Vec<f32>,
    pub o: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: Vec<f32>,
    pub router: Vec<f32>,
    pub moe_in: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
    pub y: Vec<f32>,
    /// The routed experts' sum while a shared expert is computed.
    pub shared: Vec<f32>,
    pub logits: Vec<f32>,
    /// Per-thread scratch (attention scores, a decoded key row).
    pub per_thread: Vec<Mutex<Vec<f32>>>,
    /// Each token's chosen experts and weights, `n × k`, best first.
    pub choice: Vec<(u32, f32)>,
    /// `(token, rank)` pairs sorted by expert, and where each expert's
    /// pairs start (`n_experts + 1` entries).
    pub by_expert: Vec<(u32, u32)>,
    pub expert_start: Vec<usize>,
    /// The allocation of a job list, kept between layers.
    pub jobs: Vec<MatJob<'static>>,
    /// Expert lists of the MoE loop: used by the chunk, granted by the
    /// store in this wave, still to compute, ready now.
    pub experts_used: Vec<u32>,
    pub experts_granted: Vec<u32>,
    pub experts_todo: Vec<u32>,
    pub experts_ready: Vec<u32>,
    /// Time spent per part of the model, accumulated over passes.
    pub timings: crate::model::Timings,
}

/// Reuses a vector's allocation for elements of another lifetime (the
/// in-place `collect` keeps the buffer; nothing is kept but capacity).
pub fn recycle<T, U>(v: Vec<T>) -> Vec<U> {
    v.into_iter().filter_map(|_| None).collect()
}

/// `v` resized to exactly `n` values (growing its capacity at most once
/// per new maximum), as a slice.
#[inline]
pub fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() != n {
        v.resize(n, 0.0);
    }
    &mut v[..]
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("x", &self.x.len())
            .finish_non_exhaustive()
    }
}

impl Workspace {
    pub fn new(n_threads: usize) -> Workspace {
        Workspace {
            per_thread: (0..n_threads).map(|_| Mutex::new(Vec::new())).collect(),
            ..Default::default()
        }
    }
}
