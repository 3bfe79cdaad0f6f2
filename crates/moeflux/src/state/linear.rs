//! The recurrent state of a linear-attention (Gated DeltaNet) layer: the
//! causal convolution's window of recent inputs and the delta rule's
//! per-head `k_dim × v_dim` matrix, both f32. Unlike a KV cache it has a
//! fixed size and cannot be rewound by dropping positions (see
//! `Session::truncate`).

/// One layer's state.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearState {
    /// The last `kernel - 1` conv inputs, oldest first, `channels` each.
    pub conv: Vec<f32>,
    /// `n_v_heads × k_dim × v_dim`.
    pub recurrent: Vec<f32>,
}

impl LinearState {
    pub fn new(conv_len: usize, recurrent_len: usize) -> LinearState {
        LinearState {
            conv: vec![0.0; conv_len],
            recurrent: vec![0.0; recurrent_len],
        }
    }

    pub fn reset(&mut self) {
        self.conv.fill(0.0);
        self.recurrent.fill(0.0);
    }

    pub fn bytes(&self) -> usize {
        4 * (self.conv.len() + self.recurrent.len())
    }
}
