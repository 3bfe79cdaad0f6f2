//! Model descriptions: which architecture, what shape, which tensors are
//! routed experts. One file per architecture family computes its layers;
//! this module holds what they share.

pub mod attention;
pub mod config;
pub mod linear_attention;
pub mod moe;
pub mod names;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod timings;
pub mod transformer;
pub mod weights;

pub use config::{Architecture, ConfigError, LayerKind, LinearAttention, Mla, ModelConfig};
pub use timings::Timings;
pub use transformer::{Context, Logits, Mixer, Model, Prefetch};
pub use weights::WeightError;

use crate::experts::ExpertRef;
use crate::format::ModelFiles;

/// Builds the model an architecture describes, and its expert table.
pub fn load(
    files: &ModelFiles,
    cfg: ModelConfig,
) -> Result<(Model, Vec<Vec<ExpertRef>>), LoadError> {
    match cfg.arch {
        Architecture::Qwen3Moe => Ok(qwen3_moe::load(files, cfg)?),
        Architecture::Qwen35Moe | Architecture::Qwen3Next => Ok(qwen3_5::load(files, cfg)?),
        other => Err(LoadError::NotYet(other)),
    }
}

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("running {0:?} models is not supported yet (inspect works; text generation supports qwen3moe, qwen35moe and qwen3next)")]
    NotYet(Architecture),
}
