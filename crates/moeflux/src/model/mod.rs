//! Model descriptions: which architecture, what shape, which tensors are
//! routed experts. One file per architecture family computes its layers;
//! this module holds what they share.

pub mod config;
pub mod names;

pub use config::{Architecture, ConfigError, LayerKind, LinearAttention, Mla, ModelConfig};
