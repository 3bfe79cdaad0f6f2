//! Per-session state: the KV cache of softmax-attention layers and the
//! recurrent state of linear-attention layers.

pub mod kv;
pub mod linear;
pub mod snapshot;

pub use kv::{KvCache, KvType};
pub use linear::LinearState;
pub use snapshot::{Snapshot, SnapshotError};

/// The recurrent state at an earlier position, kept so that a hybrid
/// model's session can be cut back to it (the KV cache can drop positions;
/// a recurrent state cannot).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Tokens evaluated when it was taken.
    pub pos: usize,
    pub linear: Vec<Option<LinearState>>,
    /// Logits after token `pos - 1` (empty at 0).
    pub logits: Vec<f32>,
}

/// Everything a session remembers about the tokens it has seen.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionState {
    pub kv: KvCache,
    /// One entry per layer; `Some` for linear-attention layers.
    pub linear: Vec<Option<LinearState>>,
}

impl SessionState {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.kv.len
    }

    pub fn is_empty(&self) -> bool {
        self.kv.len == 0
    }

    /// Whether the state can only move forward (a linear-attention layer's
    /// state cannot be truncated by dropping positions).
    pub fn is_recurrent(&self) -> bool {
        self.linear.iter().any(Option::is_some)
    }

    /// Back to the empty state.
    pub fn reset(&mut self) {
        self.kv.truncate(0);
        for l in self.linear.iter_mut().flatten() {
            l.reset();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.kv.bytes() + self.recurrent_bytes()
    }

    /// Bytes of the recurrent state alone (what a checkpoint copies).
    pub fn recurrent_bytes(&self) -> usize {
        self.linear.iter().flatten().map(LinearState::bytes).sum()
    }
}
