//! Element-wise and small fused operations, in f32.

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// RMSNorm in place, for each `dim`-sized chunk of `x` (per-head norms).
pub fn rms_norm_chunks(x: &mut [f32], dim: usize, weight: &[f32], eps: f32) {
    for chunk in x.chunks_exact_mut(dim) {
        let mean_sq = chunk.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for (v, &w) in chunk.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// `x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax in place (max-subtracted, f32).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Rotary-embedding frequencies for the first `n_rot` dimensions of a head:
/// `inv_freq[i] = theta^(-2i / n_rot)`.
pub fn rope_inv_freq(n_rot: usize, theta: f32) -> Vec<f32> {
    (0..n_rot / 2)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / n_rot as f64) as f32)
        .collect()
}

/// Rotates each `head_dim` chunk of `x` in "NEOX" layout (the first and
/// second halves of the rotated part form the pairs), at position `pos`.
/// Only the first `2 * inv_freq.len()` dimensions of a head rotate.
pub fn rope_neox(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        let (sin, cos) = (pos as f32 * f).sin_cos();
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit() {
        let mut out = [0.0; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let s = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / s).abs() < 1e-6 && (out[1] - 8.0 / s).abs() < 1e-6);
    }

    #[test]
    fn rope_at_zero_is_identity_and_preserves_norm() {
        let f = rope_inv_freq(4, 10000.0);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rope_neox(&mut x, 4, 0, &f);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        rope_neox(&mut x, 4, 7, &f);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}
