//! The library's top-level error.

use crate::chat::ChatError;
use crate::experts::{PlanError, StoreError};
use crate::format::FormatError;
use crate::model::{ConfigError, LoadError};
use crate::tokenizer::{TokenId, TokenizerError};

/// Anything that can go wrong opening or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("model configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Snapshot(#[from] crate::state::SnapshotError),
    #[error("the model has no usable tokenizer ({0})")]
    NoTokenizer(String),
    #[error("the context is full: {have} tokens held + {adding} new > context size {ctx}; raise --ctx-size (the model allows up to {model_max}) or shorten the prompt")]
    ContextFull {
        ctx: usize,
        have: usize,
        adding: usize,
        model_max: usize,
    },
    #[error("token id {token} is out of range: the vocabulary has {vocab} entries")]
    TokenOutOfRange { token: TokenId, vocab: usize },
    #[error("nothing to generate from: the session is empty and the prompt has no tokens")]
    EmptyPrompt,
    #[error("this CPU cannot run the {0} kernels")]
    CpuLevel(&'static str),
    #[error("this moeflux was built without the GPU backend: rebuild with `--features gpu` (e.g. `cargo build --release --features gpu`), or use --backend cpu")]
    GpuNotBuilt,
    #[cfg(feature = "gpu")]
    #[error(transparent)]
    Gpu(#[from] crate::backend::gpu::GpuError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
