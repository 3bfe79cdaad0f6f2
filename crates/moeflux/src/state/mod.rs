//! Per-session state: the KV cache of softmax-attention layers (and, for
//! hybrid models, the recurrent state of linear-attention layers).

pub mod kv;

pub use kv::{KvCache, KvType};
