//! Weight matrices resident on the GPU, split by rows into parts that each
//! fit one storage binding.

use super::copy_queue::Region;
use super::device::Gpu;
use super::host_memory::HostMemory;
use super::kernels::WeightKind;
use super::GpuError;
use crate::backend::cpu::{Matrix, MatrixData};
use crate::quant::mlx::ScaleType;

/// Byte addresses inside a kernel are u32: a part never exceeds 2 GiB,
/// whatever binding size the adapter allows.
pub(super) const MAX_PART_BYTES: u64 = 1 << 31;

/// A `rows × cols` weight on the GPU, in its file format (no conversion:
/// the kernels decode the same bytes the CPU reference does).
#[derive(Debug)]
pub struct GpuMatrix {
    pub shape: MatShape,
    pub(super) parts: Vec<Part>,
}

/// A matrix's format and sizes: what a product kernel needs besides the
/// bytes (an expert batch's matrices lie in a pool at offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatShape {
    pub rows: usize,
    pub cols: usize,
    pub kind: WeightKind,
    /// GGML: bytes of one row.
    pub(super) row_bytes: usize,
    /// MLX: columns per scale group and whether scales are f16 (else bf16).
    pub(super) group: u32,
    pub(super) scale_f16: bool,
}

/// Rows `row0..row0 + rows` of a matrix, in buffers of their own.
#[derive(Debug)]
pub(super) struct Part {
    pub row0: usize,
    pub rows: usize,
    /// The rows' weight bytes (GGML blocks, or MLX packed words).
    pub weight: wgpu::Buffer,
    /// MLX: the rows' scales and biases.
    pub scales: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

impl GpuMatrix {
    /// Bytes of its buffers.
    pub fn bytes(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| p.weight.size() + p.scales.as_ref().map_or(0, |(s, b)| s.size() + b.size()))
            .sum()
    }

    /// Uploads `m`, split so that every buffer fits the adapter's largest
    /// storage binding.
    pub fn upload(gpu: &Gpu, m: &Matrix<'_>) -> Result<GpuMatrix, GpuError> {
        GpuMatrix::upload_split(gpu, m, gpu.limits.max_binding)
    }

    /// Uploads `m` in parts of at most `max_part_bytes` per buffer (tests
    /// force small parts to exercise the split on any adapter).
    pub fn upload_split(
        gpu: &Gpu,
        m: &Matrix<'_>,
        max_part_bytes: u64,
    ) -> Result<GpuMatrix, GpuError> {
        let limit = max_part_bytes
            .min(gpu.limits.max_binding)
            .min(gpu.limits.max_buffer)
            .min(MAX_PART_BYTES);
        let (rows, cols) = (m.rows, m.cols);
        if rows == 0 || cols == 0 {
            return Err(GpuError::Shape {
                kernel: "matmul",
                detail: format!("empty {rows} × {cols} matrix"),
            });
        }
        let (kind, group, scale_f16, weight, scales) = layout(m)?;
        if !kind.supported() {
            return Err(GpuError::Unsupported(kind.name()));
        }
        whole_units(kind, cols)?;
        let widest = weight
            .row_bytes
            .max(scales.map_or(0, |(s, b)| s.row_bytes.max(b.row_bytes)))
            as u64;
        if widest > limit {
            return Err(GpuError::TooLarge {
                what: format!("one row of a {rows} × {cols} {} matrix", kind.name()),
                bytes: widest,
                limit,
            });
        }
        let per_part = (limit / widest.max(1)).min(rows as u64) as usize;
        let mut parts = Vec::with_capacity(rows.div_ceil(per_part));
        for row0 in (0..rows).step_by(per_part) {
            let n = per_part.min(rows - row0);
            let upload = |a: Array<'_>| gpu.storage("weights", a.range(row0, n), 0);
            let scales = match scales {
                Some((s, b)) => Some((upload(s)?, upload(b)?)),
                None => None,
            };
            parts.push(Part {
                row0,
                rows: n,
                weight: upload(weight)?,
                scales,
            });
        }
        Ok(GpuMatrix {
            shape: MatShape {
                rows,
                cols,
                kind,
                row_bytes: weight.row_bytes,
                group,
                scale_f16,
            },
            parts,
        })
    }

    /// Uploads matrices of one format and width stacked by rows into one
    /// (`ms[0]`'s rows, then `ms[1]`'s, ...): one dispatch computes them
    /// all (an attention block's q, k and v projections). `None` when they
    /// differ in format or width.
    pub fn upload_stacked<'a>(
        gpu: &Gpu,
        ms: &[&Matrix<'a>],
    ) -> Result<Option<GpuMatrix>, GpuError> {
        let Some(first) = ms.first() else {
            return Ok(None);
        };
        let rows: usize = ms.iter().map(|m| m.rows).sum();
        let cols = first.cols;
        if ms.iter().any(|m| m.cols != cols) {
            return Ok(None);
        }
        let bad = |e: crate::backend::cpu::matrix::MatrixError| GpuError::Shape {
            kernel: "matmul",
            detail: format!("stacked matrices: {e}"),
        };
        match first.data {
            MatrixData::Ggml { ty, .. } => {
                let Some(bytes) = concat(ms, |d| match *d {
                    MatrixData::Ggml { ty: t, bytes } if t == ty => Some(bytes),
                    _ => None,
                }) else {
                    return Ok(None);
                };
                let m = Matrix::ggml(ty, rows, cols, &bytes).map_err(bad)?;
                GpuMatrix::upload(gpu, &m).map(Some)
            }
            MatrixData::Mlx { q, .. } => {
                let arrays: Vec<Option<Vec<u8>>> = (0..3)
                    .map(|i| {
                        concat(ms, |d| match *d {
                            MatrixData::Mlx {
                                q: q2,
                                weight,
                                scales,
                                biases,
                            } if q2 == q => Some([weight, scales, biases][i]),
                            _ => None,
                        })
                    })
                    .collect();
                let (Some(w), Some(sc), Some(bi)) = (&arrays[0], &arrays[1], &arrays[2]) else {
                    return Ok(None);
                };
                let m = Matrix::mlx(q, rows, cols, w, sc, bi).map_err(bad)?;
                GpuMatrix::upload(gpu, &m).map(Some)
            }
            MatrixData::Interleaved { .. } => Ok(None),
        }
    }

    /// Writes `m`'s arrays into `buf` at byte offsets `at` (weights, then
    /// MLX scales and biases; each a multiple of 4, the weights of the
    /// format's [`WeightKind::alignment`], with room for its array
    /// rounded up to whole words: see [`GpuMatrix::array_bytes`]) — an
    /// expert slot of a pool. The write is queued (`Queue::write_buffer`):
    /// it lands before the next submission, so no submitted-but-unfinished
    /// work may still read the old contents after that submission starts —
    /// the caller's slot pinning guarantees it.
    ///
    /// With `copies`, arrays that lie in imported host memory are copied by
    /// the GPU instead: the copies are added to `copies.regions`, which the
    /// caller submits (on wgpu's queue or the copy queue) and waits for
    /// before the host bytes may change.
    pub fn write_at(
        gpu: &Gpu,
        m: &Matrix<'_>,
        buf: &wgpu::Buffer,
        at: &[u64],
        room: &[u64],
        mut copies: Option<&mut Copies<'_>>,
    ) -> Result<MatShape, GpuError> {
        let (rows, cols) = (m.rows, m.cols);
        let (shape, arrays) = GpuMatrix::expert_arrays(m)?;
        let kind = shape.kind;
        if arrays.len() > at.len() || arrays.len() > room.len() {
            return Err(GpuError::Shape {
                kernel: "expert arena",
                detail: format!(
                    "{} arrays of a {} expert matrix in a slot of {}",
                    arrays.len(),
                    kind.name(),
                    at.len()
                ),
            });
        }
        for ((a, &off), &room) in arrays.iter().zip(at).zip(room) {
            let need = (a.len() as u64).next_multiple_of(4);
            if need > room {
                return Err(GpuError::TooLarge {
                    what: format!(
                        "an array of a {rows} × {cols} {} expert matrix",
                        kind.name()
                    ),
                    bytes: need,
                    limit: room,
                });
            }
            let len = a.len() as u64;
            let from = copies.as_deref_mut().and_then(|c| {
                let (src, at) = c.host.locate(a)?;
                // Copies move whole words.
                (len.is_multiple_of(4) && at.is_multiple_of(4)).then_some((c, src, at))
            });
            match from {
                Some((c, src, at)) => c.regions.push(Region {
                    src: src.clone(),
                    src_at: at,
                    dst: buf.clone(),
                    dst_at: off,
                    len,
                }),
                None => gpu.write_padded_at(buf, off, a)?,
            }
        }
        Ok(shape)
    }

    /// An expert matrix's shape for the product kernels and its arrays
    /// (weights, then MLX scales and biases): what an expert slot holds,
    /// or what kernels read in place from the host store's slot
    /// ([`HostMemory::in_place`]). Errors for what the kernels cannot take.
    pub fn expert_arrays<'a>(m: &Matrix<'a>) -> Result<(MatShape, Vec<&'a [u8]>), GpuError> {
        let (kind, group, scale_f16, w, sb) = layout(m)?;
        if !kind.supported() {
            return Err(GpuError::Unsupported(kind.name()));
        }
        whole_units(kind, m.cols)?;
        let mut arrays = vec![w.bytes];
        if let Some((s, b)) = sb {
            arrays.extend([s.bytes, b.bytes]);
        }
        let shape = MatShape {
            rows: m.rows,
            cols: m.cols,
            kind,
            row_bytes: w.row_bytes,
            group,
            scale_f16,
        };
        Ok((shape, arrays))
    }

    /// Bytes of each array of `m` as [`GpuMatrix::write_at`] stores them
    /// (weights, then MLX scales and biases), rounded up to whole words.
    pub fn array_bytes(m: &Matrix<'_>) -> Vec<u64> {
        let r = |b: &[u8]| (b.len() as u64).next_multiple_of(4).max(4);
        match m.data {
            MatrixData::Ggml { bytes, .. } | MatrixData::Interleaved { bytes, .. } => {
                vec![r(bytes)]
            }
            MatrixData::Mlx {
                weight,
                scales,
                biases,
                ..
            } => vec![r(weight), r(scales), r(biases)],
        }
    }

    /// Buffers (row ranges) the matrix is split into.
    pub fn n_parts(&self) -> usize {
        self.parts.len()
    }
}

/// Copies collected by [`GpuMatrix::write_at`] from `host` (the expert
/// store's imported arena), for the caller to record on a queue.
pub struct Copies<'a> {
    pub host: &'a HostMemory,
    pub regions: Vec<Region>,
}

impl Copies<'_> {
    /// Bytes the regions copy.
    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// The bytes `pick` chooses of each matrix, one after the other; `None` if
/// it declines any.
fn concat<'a>(
    ms: &[&Matrix<'a>],
    pick: impl Fn(&MatrixData<'a>) -> Option<&'a [u8]>,
) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    for m in ms {
        v.extend_from_slice(pick(&m.data)?);
    }
    Some(v)
}

/// The kernels take rows of whole 32-column units (every quantized format's
/// blocks are; float weights of real models are too).
fn whole_units(kind: WeightKind, cols: usize) -> Result<(), GpuError> {
    if !cols.is_multiple_of(WeightKind::UNIT) {
        return Err(GpuError::Unsupported(format!(
            "{} rows of {cols} columns (the GPU kernels take multiples of {})",
            kind.name(),
            WeightKind::UNIT
        )));
    }
    Ok(())
}

/// What the kernels need to know of `m`: its format, MLX group size and
/// scale type, and its arrays (weights; MLX scales and biases).
#[allow(clippy::type_complexity)]
fn layout<'a>(
    m: &Matrix<'a>,
) -> Result<
    (
        WeightKind,
        u32,
        bool,
        Array<'a>,
        Option<(Array<'a>, Array<'a>)>,
    ),
    GpuError,
> {
    let rows = m.rows;
    Ok(match m.data {
        MatrixData::Ggml { ty, bytes } => {
            (WeightKind::Ggml(ty), 0, false, Array::of(bytes, rows), None)
        }
        MatrixData::Interleaved { ty, .. } => {
            // The CPU backend's layout: the engine does not interleave
            // what the GPU backend computes with.
            return Err(GpuError::Unsupported(format!(
                "{ty} weights interleaved for the CPU's eight-row kernels"
            )));
        }
        MatrixData::Mlx {
            q,
            weight,
            scales,
            biases,
        } => {
            let scale_f16 = match q.scale_type {
                ScaleType::BF16 => false,
                ScaleType::F16 => true,
                ScaleType::F32 => {
                    return Err(GpuError::Unsupported(format!("{q} with f32 scales")))
                }
            };
            (
                WeightKind::Mlx { bits: q.bits },
                q.group_size,
                scale_f16,
                Array::of(weight, rows),
                Some((Array::of(scales, rows), Array::of(biases, rows))),
            )
        }
    })
}

/// One array of a matrix (weights, scales or biases): `rows` equal rows.
#[derive(Clone, Copy)]
struct Array<'a> {
    bytes: &'a [u8],
    row_bytes: usize,
}

impl<'a> Array<'a> {
    /// `bytes` as `rows` rows (the matrix checked the sizes when it was made).
    fn of(bytes: &'a [u8], rows: usize) -> Array<'a> {
        Array {
            bytes,
            row_bytes: bytes.len() / rows,
        }
    }

    /// Rows `row0..row0 + n`.
    fn range(self, row0: usize, n: usize) -> &'a [u8] {
        &self.bytes[row0 * self.row_bytes..(row0 + n) * self.row_bytes]
    }
}
