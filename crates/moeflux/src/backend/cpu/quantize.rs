//! Activations quantized to 8 bits for integer dot products.
//!
//! The integer kernels multiply weight codes by 8-bit activation codes and
//! scale once per block, which is how the block formats are meant to be
//! used. One layout serves every format: blocks of 32 with an f32 scale and
//! code sums per 32 and per 16 ([`Q8Acts`]).
//!
//! For the k-quants (super-blocks of 256) the block scales are constrained
//! to `D · 2^s` with one `D` per 256 values and a shift `s` in `0..=4` per
//! block of 32: the kernels then fold `2^s` into the weights' integer
//! sub-block scales and apply one f32 scale per 256 values, as llama.cpp
//! does. llama.cpp uses a single scale per 256 activations, so one outlier
//! coarsens its 255 neighbours (on activations with outliers, which real
//! hidden states have, that cost 3e-4 of cosine similarity in our tests);
//! with the per-block shift, a block's step is at most twice its own best
//! unless the super-block's largest value exceeds 16 times the block's.
//!
//! Each value is `q · d` with `d = max|x| / 127` over its block and `q`
//! rounded to nearest, so the error of one activation is at most `d / 2`;
//! a dot product with weights `w` is off by at most `Σ |w| · d / 2` over
//! each block. The kernel tests check exactly that bound.

/// Rounds to nearest, halves away from zero, as C's `roundf` (written out:
/// `f32::round` is a libm call where SSE4.1 is not assumed).
#[inline]
pub(crate) fn q8(x: f32, inv_d: f32) -> i8 {
    let v = x * inv_d;
    let r = (v.abs() + 0.5).floor().min(127.0);
    (if v < 0.0 { -r } else { r }) as i8
}

/// `qs[i] = round(block[i] · inv)` for a block of 32, rounding to nearest
/// (ties to even; any rounding to nearest keeps the error within half a
/// step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_block_avx2(block: &[f32], inv: f32, qs: &mut [i8]) {
    use std::arch::x86_64::*;
    debug_assert!(block.len() == 32 && qs.len() == 32);
    let s = _mm256_set1_ps(inv);
    let lim = _mm256_set1_ps(127.0);
    let q = |i: usize| {
        let v = _mm256_mul_ps(_mm256_loadu_ps(block.as_ptr().add(8 * i)), s);
        let v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0)), lim);
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v))
    };
    // Pack 4 × 8 i32 to 32 i8, undoing the lane interleave of the packs.
    let p16a = _mm256_packs_epi32(q(0), q(1));
    let p16b = _mm256_packs_epi32(q(2), q(3));
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, p8);
}

/// Activations in blocks of 32 (rows of `cols` values each).
#[derive(Clone, Debug, Default)]
pub struct Q8Acts {
    pub cols: usize,
    /// Scale per block.
    pub d: Vec<f32>,
    /// Sum of the codes per block.
    pub sum: Vec<i32>,
    /// Sum of the codes per 16 values (two per block).
    pub sum16: Vec<i16>,
    /// Codes, row-major.
    pub qs: Vec<i8>,
    /// With power-of-two block scales (see the module docs): the shift of
    /// each block of 32 and the base scale of each 256, so that
    /// `d[b] = base[b / 8] · 2^shift[b]`. Empty otherwise.
    pub shift: Vec<u8>,
    /// The same shifts as i32 (the kernels broadcast one per block).
    pub shift32: Vec<i32>,
    pub base: Vec<f32>,
}

/// Largest shift of a block scale over its super-block's base.
pub const MAX_SHIFT: u32 = 4;

impl Q8Acts {
    /// Quantizes `n` rows of `cols` values (`cols` a multiple of 32) with a
    /// free scale per block, reusing this buffer's memory.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        self.quantize_with(x, cols, false);
    }

    /// Quantizes with power-of-two block scales within each 256 values
    /// (`cols` a multiple of 256), for the k-quant kernels; the free-scale
    /// kernels work on the result too.
    pub fn quantize_pow2(&mut self, x: &[f32], cols: usize) {
        self.quantize_with(x, cols, true);
    }

    fn quantize_with(&mut self, x: &[f32], cols: usize, pow2: bool) {
        let n = x.len() / cols.max(1);
        self.reserve_rows(n, cols, pow2);
        self.quantize_rows(x, 0, n);
    }

    /// Sizes the buffers for `n` rows of `cols` values (with power-of-two
    /// block scales when `pow2`), for [`Q8Acts::quantize_rows`].
    pub fn reserve_rows(&mut self, n: usize, cols: usize, pow2: bool) {
        debug_assert_eq!(cols % if pow2 { 256 } else { 32 }, 0);
        let nb = n * cols / 32;
        self.cols = cols;
        self.d.resize(nb, 0.0);
        self.sum.resize(nb, 0);
        self.sum16.resize(2 * nb, 0);
        self.qs.resize(n * cols, 0);
        if pow2 {
            self.shift.resize(nb, 0);
            self.shift32.resize(nb, 0);
            self.base.resize(nb / 8, 0.0);
        } else {
            self.shift.clear();
            self.shift32.clear();
            self.base.clear();
        }
    }

    /// Quantizes rows `r0..r1` of `x` (all rows, `rows × cols`) into the
    /// buffers sized by [`Q8Acts::reserve_rows`]; other rows are left as
    /// they are. Each row is quantized on its own, so the result does not
    /// depend on which rows are quantized together.
    pub fn quantize_rows(&mut self, x: &[f32], r0: usize, r1: usize) {
        let cols = self.cols;
        let x = &x[r0 * cols..r1 * cols];
        let b0 = r0 * cols / 32;
        let amax = |block: &[f32]| block.iter().fold(0f32, |m, v| m.max(v.abs()));
        if !self.shift.is_empty() {
            for (i, sup) in x.chunks_exact(256).enumerate() {
                let sb = b0 / 8 + i;
                let maxes: [f32; 8] = std::array::from_fn(|i| amax(&sup[32 * i..32 * i + 32]));
                let top = maxes.iter().fold(0f32, |m, &v| m.max(v));
                // d = top/127 · 2^-e with e the largest in 0..=MAX_SHIFT
                // that still covers the block's maximum.
                let base = top / 127.0 / (1 << MAX_SHIFT) as f32;
                self.base[sb] = base;
                for (i, &m) in maxes.iter().enumerate() {
                    let mut e = 0;
                    while e < MAX_SHIFT && m * (2 << e) as f32 <= top {
                        e += 1;
                    }
                    let shift = MAX_SHIFT - e;
                    self.shift[8 * sb + i] = shift as u8;
                    self.shift32[8 * sb + i] = shift as i32;
                    self.d[8 * sb + i] = base * (1 << shift) as f32;
                }
            }
        } else {
            for (i, block) in x.chunks_exact(32).enumerate() {
                self.d[b0 + i] = amax(block) / 127.0;
            }
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2");
        for (i, block) in x.chunks_exact(32).enumerate() {
            let b = b0 + i;
            let d = self.d[b];
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let qs = &mut self.qs[b * 32..(b + 1) * 32];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected above.
                unsafe { round_block_avx2(block, inv, qs) };
            } else {
                for (q, &v) in qs.iter_mut().zip(block) {
                    *q = q8(v, inv);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            for (q, &v) in qs.iter_mut().zip(block) {
                *q = q8(v, inv);
            }
            let s0: i16 = qs[..16].iter().map(|&q| q as i16).sum();
            let s1: i16 = qs[16..].iter().map(|&q| q as i16).sum();
            self.sum16[2 * b] = s0;
            self.sum16[2 * b + 1] = s1;
            self.sum[b] = s0 as i32 + s1 as i32;
        }
    }

    /// Row `r` as block slices.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let nb = self.cols / 32;
        let (shift, shift32, base): (&[u8], &[i32], &[f32]) = if self.shift.is_empty() {
            (&[], &[], &[])
        } else {
            (
                &self.shift[r * nb..(r + 1) * nb],
                &self.shift32[r * nb..(r + 1) * nb],
                &self.base[r * nb / 8..(r + 1) * nb / 8],
            )
        };
        Q8Row {
            d: &self.d[r * nb..(r + 1) * nb],
            sum: &self.sum[r * nb..(r + 1) * nb],
            sum16: &self.sum16[2 * r * nb..2 * (r + 1) * nb],
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
            shift,
            shift32,
            base,
        }
    }

    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.cols).unwrap_or(0)
    }
}

/// One row of [`Q8Acts`].
#[derive(Clone, Copy, Debug)]
pub struct Q8Row<'a> {
    pub d: &'a [f32],
    pub sum: &'a [i32],
    pub sum16: &'a [i16],
    pub qs: &'a [i8],
    /// Power-of-two scales (empty unless quantized with `quantize_pow2`).
    pub shift: &'a [u8],
    pub shift32: &'a [i32],
    pub base: &'a [f32],
}

impl<'a> Q8Row<'a> {
    /// The row from block `b` on.
    pub fn from_block(&self, b: usize) -> Q8Row<'a> {
        Q8Row {
            d: &self.d[b..],
            sum: &self.sum[b..],
            sum16: &self.sum16[2 * b..],
            qs: &self.qs[32 * b..],
            shift: self.shift.get(b..).unwrap_or(&[]),
            shift32: self.shift32.get(b..).unwrap_or(&[]),
            base: self.base.get(b / 8..).unwrap_or(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut a = Q8Acts::default();
        a.quantize(&x, 256);
        for (i, &v) in x.iter().enumerate() {
            let d = a.d[i / 32];
            assert!((a.qs[i] as f32 * d - v).abs() <= d / 2.0 * 1.0001);
        }
        assert_eq!(
            a.sum[3],
            a.qs[96..128].iter().map(|&q| q as i32).sum::<i32>()
        );
        assert_eq!(
            a.sum16[7],
            a.qs[112..128].iter().map(|&q| q as i16).sum::<i16>()
        );
        assert_eq!(a.rows(), 2);
        // Power-of-two scales: still within half a step, and the steps are
        // base · 2^shift.
        let mut p = Q8Acts::default();
        p.quantize_pow2(&x, 256);
        for (i, &v) in x.iter().enumerate() {
            let d = p.d[i / 32];
            assert_eq!(d, p.base[i / 256] * (1u32 << p.shift[i / 32]) as f32);
            assert!((p.qs[i] as f32 * d - v).abs() <= d / 2.0 * 1.0001);
        }
    }
}
