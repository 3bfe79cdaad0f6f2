//! The GPU backend: WGSL compute kernels run through wgpu on Vulkan, Metal
//! or DX12 (feature `gpu`).
//!
//! - [`device`]: the shared [`Gpu`] context (adapter choice, limits read
//!   from the adapter, blocking helpers, buffers);
//! - [`kernels`]: the WGSL sources and their pipelines, compiled once;
//! - [`matrix`]: weights resident on the GPU, split by rows to fit the
//!   adapter's largest storage binding;
//! - [`pass`]: kernel dispatches recorded and submitted as one compute pass.
//!
//! Every kernel is checked against the CPU reference in
//! `tests/gpu_kernels.rs` (on lavapipe in CI), and every WGSL module is
//! translated to MSL there, so the Metal path compiles on every commit.

pub mod device;
pub mod kernels;
pub mod matrix;
pub mod pass;

/// The wgpu version the backend is built on, for callers that hold its
/// buffers.
pub use wgpu;

pub use device::{Gpu, GpuLimits, Reduce, Variant};
pub use kernels::{Kernel, WeightKind};
pub use matrix::GpuMatrix;
pub use pass::{rope_table, AttentionShape, Pass};

/// Why the GPU backend could not do something.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found: wgpu sees no Vulkan, Metal or DX12 device. Install the GPU's driver (on Linux without a GPU, Mesa's software Vulkan driver: `apt-get install mesa-vulkan-drivers`), check `WGPU_BACKEND` if set, or use the CPU backend")]
    NoAdapter,
    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),
    #[error("GPU error: {0}")]
    Wgpu(String),
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),
    #[error("{what} needs {bytes} bytes, more than this GPU allows in one buffer ({limit})")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    #[error("the GPU backend has no kernel for {0}")]
    Unsupported(String),
    #[error("GPU kernel {kernel}: {detail}")]
    Shape {
        kernel: &'static str,
        detail: String,
    },
}
