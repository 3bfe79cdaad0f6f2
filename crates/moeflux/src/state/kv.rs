//! The KV cache: keys and values of every position, per attention layer.

/// Keys and values of one attention layer, `n_tokens × dim` each, f32.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub k_dim: usize,
    pub v_dim: usize,
}

impl LayerKv {
    /// Key row of position `p`.
    #[inline]
    pub fn key(&self, p: usize) -> &[f32] {
        &self.k[p * self.k_dim..(p + 1) * self.k_dim]
    }

    #[inline]
    pub fn value(&self, p: usize) -> &[f32] {
        &self.v[p * self.v_dim..(p + 1) * self.v_dim]
    }
}

/// The whole cache. Layers without attention have an empty entry.
#[derive(Clone, Debug, Default, PartialEq)]
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
    pub fn new(dims: &[Option<(usize, usize)>], capacity: usize) -> KvCache {
        KvCache {
            layers: dims
                .iter()
                .map(|d| {
                    let (k_dim, v_dim) = d.unwrap_or((0, 0));
                    LayerKv {
                        k: Vec::new(),
                        v: Vec::new(),
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
        self.layers
            .iter()
            .map(|l| 4 * (l.k.len() + l.v.len()))
            .sum()
    }
}
