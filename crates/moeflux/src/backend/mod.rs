//! Compute backends. The CPU backend, accumulating in f32, is the reference
//! every accelerated path is compared with.

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;
