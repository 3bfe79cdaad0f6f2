//! The CPU backend: matrix–vector products over quantized weights and the
//! small fused operations a transformer layer needs.

pub mod matrix;
pub mod ops;

pub use matrix::{matmul, matvec, Matrix, MatrixData};
