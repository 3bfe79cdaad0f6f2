//! moeflux: run Mixture-of-Experts language models larger than memory.
//!
//! Dense weights (embeddings, attention, norms, routers, shared experts, LM
//! head) stay resident; routed experts are streamed from disk or host memory
//! through a budgeted cache, overlapped with compute.
//!
//! Module map (see `DESIGN.md`, Layout):
//! - [`format`](mod@format): containers — GGUF and safetensors (+ MLX affine), tensor spans;
//! - [`quant`]: block formats and their reference dequantizers;
//! - [`model`]: `ModelConfig` and the architecture families;
//! - [`experts`]: the streaming expert store and its memory plan;
//! - [`inspect`]: the report behind `moeflux inspect`;
//! - [`npy`]: `.npy` arrays, for reference data and `moeflux logits`.

pub mod backend;
pub mod chat;
pub mod engine;
pub mod error;
pub mod experts;
pub mod format;
mod huge_pages;
pub mod inspect;
pub mod model;
pub mod npy;
pub mod quant;
pub mod sampling;
pub mod state;
pub mod synth;
pub mod tokenizer;

pub use engine::{Engine, EngineOptions, Generation, Session, StopReason};
pub use error::{Error, Result};
