//! The CPU backend: matrix–vector products over quantized weights and the
//! small fused operations a transformer layer needs.

pub mod interleave;
pub mod kernels;
pub mod matrix;
pub mod ops;
pub mod pool;
pub mod quantize;
pub mod workspace;

pub use matrix::{Matrix, MatrixData};

use kernels::Level;
use pool::ThreadPool;

/// The CPU backend: a thread pool and the kernel level in use.
#[derive(Debug)]
pub struct Cpu {
    pub pool: ThreadPool,
    pub level: Level,
}

impl Cpu {
    /// `threads` compute threads (0: one per physical core), at `level`
    /// (None: detected or `MOEFLUX_CPU`).
    pub fn new(threads: usize, level: Option<Level>) -> Result<Cpu, crate::Error> {
        let level = match level {
            Some(l) if !l.supported() => return Err(crate::Error::CpuLevel(l.name())),
            Some(l) => l,
            None => kernels::level(),
        };
        let n = if threads == 0 {
            pool::physical_cores()
        } else {
            threads
        };
        Ok(Cpu {
            pool: ThreadPool::new(n),
            level,
        })
    }
}
