//! The KV cache: keys and values of every position, per attention layer,
//! stored in f32 or f16 (`--kv-type`; f16 halves the memory and is the
//! default, accumulation stays in f32).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Element type of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    F32,
    #[default]
    F16,
}

impl KvType {
    pub fn from_name(s: &str) -> Option<KvType> {
        match s {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            _ => None,
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// Rows of `dim` values in one of the cache types.
#[derive(Clone, Debug, PartialEq)]
pub enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Rows {
    fn new(ty: KvType) -> Rows {
        match ty {
            KvType::F32 => Rows::F32(Vec::new()),
            KvType::F16 => Rows::F16(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16(v) => v.len(),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Rows::F32(v) => v.truncate(n),
            Rows::F16(v) => v.truncate(n),
        }
    }

    fn extend(&mut self, x: &[f32]) {
        match self {
            Rows::F32(v) => v.extend_from_slice(x),
            Rows::F16(v) => {
                let start = v.len();
                v.resize(start + x.len(), f16::ZERO);
                v[start..].convert_from_f32_slice(x);
            }
        }
    }

    /// Values `at..at + out.len()` as f32.
    #[inline]
    pub fn read(&self, at: usize, out: &mut [f32]) {
        match self {
            Rows::F32(v) => out.copy_from_slice(&v[at..at + out.len()]),
            Rows::F16(v) => crate::backend::cpu::kernels::f16_to_f32(&v[at..at + out.len()], out),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Rows::F32(v) => 4 * v.len(),
            Rows::F16(v) => 2 * v.len(),
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
                        k: Rows::new(ty),
                        v: Rows::new(ty),
                        k_dim,
                        v_dim,
                    }
                })
                .collect(),
            len: 0,
            capacity,
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
