//! The GPU backend: WGSL compute kernels run through wgpu on Vulkan, Metal
//! or DX12 (feature `gpu`).
//!
//! - [`device`]: the shared [`Gpu`] context (adapter choice, limits read
//!   from the adapter, blocking helpers, buffers);

pub mod device;

/// The wgpu version the backend is built on, for callers that hold its
/// buffers.
pub use wgpu;

pub use device::{Gpu, GpuLimits, Reduce, Variant};

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
