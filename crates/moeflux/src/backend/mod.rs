//! Compute backends. The CPU backend, accumulating in f32, is the reference
//! every accelerated path is compared with.

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;

/// Which backend computes a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CPU reference backend (the library's default).
    #[default]
    Cpu,
    /// The wgpu backend, on whatever adapter exists (a software one too);
    /// an error when it is not built in, there is no adapter, or the
    /// model needs something it lacks.
    Gpu,
    /// The GPU when a hardware adapter exists and supports the model, else
    /// the CPU (the command line's default).
    Auto,
}

impl Backend {
    pub fn from_name(s: &str) -> Option<Backend> {
        match s {
            "cpu" => Some(Backend::Cpu),
            "gpu" => Some(Backend::Gpu),
            "auto" => Some(Backend::Auto),
            _ => None,
        }
    }
}
