//! A session's state in GPU memory: per attention layer, a key and a
//! value buffer of `capacity × dim` values, f16 (two per word) or f32 —
//! the CPU cache's layout (`state::kv`), so its contents can be read back
//! into a [`crate::state::KvCache`] (snapshots) or filled from one; per
//! linear-attention layer, its recurrent state ([`GpuLinearState`]) in
//! the layout of [`LinearState`].

use super::device::Gpu;
use super::GpuError;
use crate::state::kv::{KvCache, Rows};
use crate::state::{KvType, LinearState};

/// One layer's keys and values.
pub struct GpuLayerKv {
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    /// Values per position.
    pub dim: usize,
}

/// A Gated DeltaNet layer's recurrent state (see `delta_net.wgsl`).
pub struct GpuLinearState {
    /// Two copies of the conv window ([`LinearState::conv`]'s layout),
    /// one after the other: each chunk reads one and writes the other.
    pub window: wgpu::Buffer,
    /// Whether the second copy is the current window.
    pub cur: bool,
    /// [`LinearState::recurrent`].
    pub state: wgpu::Buffer,
    /// Values of one window copy and of the recurrent state.
    pub lens: (usize, usize),
}

/// The cache: `layers[l]` is `None` for a layer without attention,
/// `linear[l]` for one without a recurrent state.
pub struct GpuKv {
    pub layers: Vec<Option<GpuLayerKv>>,
    pub linear: Vec<Option<GpuLinearState>>,
    pub kv_f16: bool,
    /// Positions it can hold.
    pub capacity: usize,
}

impl GpuKv {
    /// Whether a cache of `ty` is stored as f16 (else f32); an error for
    /// a type the GPU kernels cannot read.
    pub fn stores_f16(ty: KvType) -> Result<bool, GpuError> {
        match ty {
            KvType::F16 => Ok(true),
            KvType::F32 => Ok(false),
            KvType::Q8_0 => Err(GpuError::Unsupported(
                "a q8_0 KV cache (use --kv-type f16 on the GPU, or --backend cpu)".into(),
            )),
        }
    }

    /// A cache for `capacity` positions; `dims[l]` is layer `l`'s values
    /// per position (keys and values alike), `None` without attention;
    /// `linear[l]` the values of a linear-attention layer's conv window
    /// and recurrent state (zeroed).
    pub fn new(
        gpu: &Gpu,
        dims: &[Option<usize>],
        linear: &[Option<(usize, usize)>],
        capacity: usize,
        ty: KvType,
    ) -> Result<GpuKv, GpuError> {
        let linear = linear
            .iter()
            .map(|l| {
                l.map(|(window, state)| {
                    Ok(GpuLinearState {
                        window: gpu.zeros_f32("conv window", 2 * window)?,
                        cur: false,
                        state: gpu.zeros_f32("recurrent state", state)?,
                        lens: (window, state),
                    })
                })
                .transpose()
            })
            .collect::<Result<_, GpuError>>()?;
        let kv_f16 = GpuKv::stores_f16(ty)?;
        let layers = dims
            .iter()
            .map(|d| {
                d.map(|dim| {
                    let bytes = (capacity as u64).saturating_mul(ty.row_bytes(dim as u64));
                    if bytes > gpu.limits.max_binding {
                        return Err(GpuError::TooLarge {
                            what: format!("a KV cache layer of {capacity} positions × {dim}"),
                            bytes,
                            limit: gpu.limits.max_binding,
                        });
                    }
                    Ok(GpuLayerKv {
                        k: gpu.storage("kv keys", &[], bytes)?,
                        v: gpu.storage("kv values", &[], bytes)?,
                        dim,
                    })
                })
                .transpose()
            })
            .collect::<Result<_, _>>()?;
        Ok(GpuKv {
            layers,
            linear,
            kv_f16,
            capacity,
        })
    }

    /// Copies the first `len` positions into `cache` (whose layers must
    /// match), replacing its rows: what a snapshot of a GPU session holds.
    pub fn read_into(&self, gpu: &Gpu, cache: &mut KvCache, len: usize) -> Result<(), GpuError> {
        for (g, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let Some(g) = g else { continue };
            let n = len * g.dim;
            for (buf, rows) in [(&g.k, &mut c.k), (&g.v, &mut c.v)] {
                *rows = if self.kv_f16 {
                    let words = gpu.read_f32(buf, n.div_ceil(2))?;
                    let mut v = Vec::with_capacity(n);
                    for w in words {
                        let b = w.to_bits();
                        v.push(half::f16::from_bits(b as u16));
                        v.push(half::f16::from_bits((b >> 16) as u16));
                    }
                    v.truncate(n);
                    Rows::F16(v)
                } else {
                    Rows::F32(gpu.read_f32(buf, n)?)
                };
            }
        }
        cache.len = len;
        Ok(())
    }

    /// Uploads the rows of `cache` (a snapshot being restored).
    pub fn write_from(&self, gpu: &Gpu, cache: &KvCache) -> Result<(), GpuError> {
        for (g, c) in self.layers.iter().zip(cache.layers.iter()) {
            let Some(g) = g else { continue };
            for (buf, rows) in [(&g.k, &c.k), (&g.v, &c.v)] {
                let bytes: Vec<u8> = match rows {
                    Rows::F32(v) if !self.kv_f16 => bytemuck::cast_slice(v).to_vec(),
                    Rows::F16(v) if self.kv_f16 => v.iter().flat_map(|h| h.to_le_bytes()).collect(),
                    _ => {
                        return Err(GpuError::Shape {
                            kernel: "kv cache",
                            detail: "the snapshot's KV type differs from the session's".into(),
                        })
                    }
                };
                gpu.write_padded(buf, &bytes)?;
            }
        }
        Ok(())
    }

    /// The recurrent states, read back into `into` (whose layers must
    /// match): what a snapshot or checkpoint of a GPU session holds.
    pub fn read_linear(&self, gpu: &Gpu, into: &mut [Option<LinearState>]) -> Result<(), GpuError> {
        for (g, c) in self.linear.iter().zip(into.iter_mut()) {
            let (Some(g), Some(c)) = (g, c) else { continue };
            let (w, s) = g.lens;
            let both = gpu.read_f32(&g.window, 2 * w)?;
            let at = if g.cur { w } else { 0 };
            c.conv.clear();
            c.conv.extend_from_slice(&both[at..at + w]);
            c.recurrent = gpu.read_f32(&g.state, s)?;
        }
        Ok(())
    }

    /// Uploads the recurrent states of `from` (a snapshot or checkpoint
    /// restored, or a reset); the window goes to the first copy.
    pub fn write_linear(
        &mut self,
        gpu: &Gpu,
        from: &[Option<LinearState>],
    ) -> Result<(), GpuError> {
        for (g, c) in self.linear.iter_mut().zip(from.iter()) {
            let (Some(g), Some(c)) = (g, c) else { continue };
            if (c.conv.len(), c.recurrent.len()) != g.lens {
                return Err(GpuError::Shape {
                    kernel: "recurrent state",
                    detail: format!(
                        "{} + {} values for a layer of {} + {}",
                        c.conv.len(),
                        c.recurrent.len(),
                        g.lens.0,
                        g.lens.1
                    ),
                });
            }
            gpu.write_padded(&g.window, bytemuck::cast_slice(&c.conv))?;
            gpu.write_padded(&g.state, bytemuck::cast_slice(&c.recurrent))?;
            g.cur = false;
        }
        Ok(())
    }
}
