//! The KV cache: keys and values of every position, per attention layer,
//! stored in f32, f16 or Q8_0 (`--kv-type`; f16 halves the memory and is
//! the default, Q8_0 takes 34 bytes per 32 values; accumulation stays in
//! f32 whatever the storage).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Element type of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    F32,
    #[default]
    F16,
    /// llama.cpp's `q8_0` cache type: blocks of 32 values with an f16
    /// scale `d = max|x| / 127` and codes `round(x / d)` (halves away from
    /// zero), bit for bit what gguf-py's and ggml's reference quantizers
    /// make. Each value is off by at most `d / 2` plus the scale's f16
    /// rounding, `|q| · |d − f16(d)| ≤ 127 · max(2⁻¹¹ · d, 2⁻²⁵)` (relative
    /// while `d` is a normal f16, at least 2⁻¹⁴; absolute below, where a
    /// block whose largest value is under ~4e-6 reads back as zeros).
    Q8_0,
}

/// Values per Q8_0 block.
pub const Q8_BLOCK: usize = 32;

impl KvType {
    pub fn from_name(s: &str) -> Option<KvType> {
        match s {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes of one row (position) of `dim` values. A Q8_0 row is cut
    /// into blocks of 32 from its start; a last, shorter block still has
    /// its own scale.
    pub fn row_bytes(self, dim: u64) -> u64 {
        match self {
            KvType::F32 => 4 * dim,
            KvType::F16 => 2 * dim,
            KvType::Q8_0 => dim + 2 * dim.div_ceil(Q8_BLOCK as u64),
        }
    }
}

/// Rows of `dim` values in one of the cache types.
#[derive(Clone, Debug, PartialEq)]
pub enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Q8_0(Q8Rows),
}

/// Q8_0 rows: row `r`'s value `c` is `q[r · dim + c] · d[r · bpr + c / 32]`
/// with `bpr = ceil(dim / 32)` blocks per row. Scales and codes are kept
/// apart (not ggml's interleaved 34-byte blocks) so a head's slice of a
/// row is a plain run of codes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Q8Rows {
    /// Values per row.
    pub dim: usize,
    pub d: Vec<f16>,
    pub q: Vec<i8>,
}

impl Q8Rows {
    /// Scales per row.
    pub fn blocks_per_row(&self) -> usize {
        self.dim.div_ceil(Q8_BLOCK)
    }

    /// Quantizes whole rows (`x.len()` a multiple of `dim`) onto the end.
    fn extend(&mut self, x: &[f32]) {
        debug_assert!(x.len().checked_rem(self.dim).unwrap_or(x.len()) == 0);
        if self.dim == 0 {
            return;
        }
        for row in x.chunks_exact(self.dim) {
            for block in row.chunks(Q8_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                self.d.push(f16::from_f32(d));
                self.q.extend(
                    block
                        .iter()
                        .map(|&v| crate::backend::cpu::quantize::q8(v, inv)),
                );
            }
        }
    }

    /// Keeps the first `n` values (whole rows).
    fn truncate(&mut self, n: usize) {
        debug_assert!(n.checked_rem(self.dim).unwrap_or(0) == 0);
        self.q.truncate(n);
        if let Some(rows) = n.checked_div(self.dim) {
            self.d.truncate(rows * self.blocks_per_row());
        }
    }

    /// The scale of value `i` (counted over all rows).
    #[inline]
    pub fn scale(&self, i: usize) -> f32 {
        let (r, c) = (i / self.dim, i % self.dim);
        self.d[r * self.blocks_per_row() + c / Q8_BLOCK].to_f32()
    }
}

impl Rows {
    fn new(ty: KvType, dim: usize) -> Rows {
        match ty {
            KvType::F32 => Rows::F32(Vec::new()),
            KvType::F16 => Rows::F16(Vec::new()),
            KvType::Q8_0 => Rows::Q8_0(Q8Rows {
                dim,
                ..Default::default()
            }),
        }
    }

    pub fn ty(&self) -> KvType {
        match self {
            Rows::F32(_) => KvType::F32,
            Rows::F16(_) => KvType::F16,
            Rows::Q8_0(_) => KvType::Q8_0,
        }
    }

    /// Values held.
    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16(v) => v.len(),
            Rows::Q8_0(r) => r.q.len(),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Rows::F32(v) => v.truncate(n),
            Rows::F16(v) => v.truncate(n),
            Rows::Q8_0(r) => r.truncate(n),
        }
    }

    /// Appends whole rows.
    fn extend(&mut self, x: &[f32]) {
        match self {
            Rows::F32(v) => v.extend_from_slice(x),
            Rows::F16(v) => {
                let start = v.len();
                v.resize(start + x.len(), f16::ZERO);
                v[start..].convert_from_f32_slice(x);
            }
            Rows::Q8_0(r) => r.extend(x),
        }
    }

    /// Values `at..at + out.len()` as f32.
    #[inline]
    pub fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            Rows::F32(v) => out.copy_from_slice(&v[at..at + out.len()]),
            Rows::F16(v) => crate::backend::cpu::kernels::f16_to_f32(&v[at..at + out.len()], out),
            Rows::Q8_0(r) => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = r.q[at + i] as f32 * r.scale(at + i);
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::F32(v) => 4 * v.len(),
            Rows::F16(v) => 2 * v.len(),
            Rows::Q8_0(r) => r.q.len() + 2 * r.d.len(),
        }
    }
}

/// Keys and values of one attention layer, `n_tokens × dim` each.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerKv {
    pub k: Rows,
    pub v: Rows,
    pub k_dim: usize,
    pub v_dim: usize,
}

impl LayerKv {
    /// Appends the keys and values of new positions (`n × dim` each).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        self.k.extend(k);
        self.v.extend(v);
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.len().checked_div(self.k_dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The whole cache. Layers without attention have an empty entry.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Positions held.
    pub len: usize,
    /// Most positions the cache may hold (the context length).
    pub capacity: usize,
    pub ty: KvType,
}

impl KvCache {
    /// `dims[l]` is `(k_dim, v_dim)` of layer `l`, or `None` for a layer
    /// without a KV cache. Memory grows as positions are added.
    pub fn new(dims: &[Option<(usize, usize)>], capacity: usize, ty: KvType) -> KvCache {
        KvCache {
            layers: dims
                .iter()
                .map(|d| {
                    let (k_dim, v_dim) = d.unwrap_or((0, 0));
                    LayerKv {
                        k: Rows::new(ty, k_dim),
                        v: Rows::new(ty, v_dim),
                        k_dim,
                        v_dim,
                    }
                })
                .collect(),
            len: 0,
            capacity,
            ty,
        }
    }

    /// Forgets positions from `n` on.
    pub fn truncate(&mut self, n: usize) {
        for l in &mut self.layers {
            l.k.truncate(n * l.k_dim);
            l.v.truncate(n * l.v_dim);
        }
        self.len = self.len.min(n);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.bytes() + l.v.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Rng;

    /// Every value read back from a Q8_0 cache is within the bound the
    /// format implies, rows of a width that is not a multiple of 32
    /// included, and truncating keeps whole rows.
    #[test]
    fn q8_0_rows_stay_within_their_quantization_bound() {
        let mut r = Rng::new(11);
        for dim in [32, 40, 128, 7] {
            let n = 9;
            let mut x: Vec<f32> = (0..n * dim).map(|_| r.normal() as f32).collect();
            // An outlier, a zero block, a block whose scale is a subnormal
            // f16 and one whose scale rounds to zero.
            x[3] = 40.0;
            x[dim..dim + dim.min(32)].fill(0.0);
            for i in 0..dim.min(32) {
                x[2 * dim + i] *= 1e-4;
                x[3 * dim + i] *= 1e-7;
            }
            let mut rows = Rows::new(KvType::Q8_0, dim);
            rows.extend(&x[..5 * dim]);
            rows.extend(&x[5 * dim..]);
            assert_eq!(rows.len(), n * dim);
            assert_eq!(
                rows.bytes() as u64,
                n as u64 * KvType::Q8_0.row_bytes(dim as u64)
            );
            let mut y = vec![0f32; n * dim];
            rows.read(0, &mut y);
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let (row, col) = (i / dim, i % dim);
                let block =
                    &x[row * dim + col / 32 * 32..row * dim + (col / 32 * 32 + 32).min(dim)];
                let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let bound = d / 2.0 + 127.0 * (d * 2f32.powi(-11)).max(2f32.powi(-25));
                assert!(
                    (a - b).abs() <= bound,
                    "dim {dim}, value {i}: {a} → {b}, bound {bound}"
                );
            }
            rows.truncate(4 * dim);
            let mut z = vec![0f32; 4 * dim];
            rows.read(0, &mut z);
            assert_eq!(z, y[..4 * dim]);
            rows.extend(&x[4 * dim..]);
            rows.read(0, &mut z);
            assert_eq!(z, y[..4 * dim]);
            let mut tail = vec![0f32; dim];
            rows.read(8 * dim, &mut tail);
            assert_eq!(tail, y[8 * dim..]);
        }
    }
}
