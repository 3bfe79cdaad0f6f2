//! Weight rows interleaved in groups of eight, so a kernel computes eight
//! rows at once with one lane per row.
//!
//! # Why
//! Decode multiplies every weight once with one activation row, and on a
//! machine whose cores are busy (two threads here run at about 1.3× one)
//! the instructions spent per weight byte set the speed, not the memory.
//! A row-at-a-time kernel ends each block with a horizontal step (lane
//! sums, a per-block scale broadcast); with eight rows side by side in the
//! lanes of a register, one activation broadcast serves eight rows, the
//! eight rows' scales are one vector load, and the eight results come out
//! in the lanes of one register: fewer instructions per byte
//! (`kernels::x86::q4_0_avx2_x8`, `q4_k_avx2_x8`; bench/BENCHMARKS.md has
//! the numbers). Prompts use the same kernels token by token while a group
//! stays in L1, which measured faster than the plain rows' four-token
//! kernels. llama.cpp repacks (`Q4_0_8x8`, `Q4_K_8x8`) for the same reason.
//!
//! # Layout
//! A matrix of `rows` (a multiple of 8) rows keeps its size: rows
//! `8g..8g + 8` still occupy bytes `8g · row_bytes ..`, and within them
//! block column `b` is one *tile* of `8 · block_bytes` bytes, tiles in
//! column order. Within a tile (row `j` of the group, block bytes `qs`):
//! - **Q4_0** (18-byte blocks): the eight f16 scales (`2j`), then for
//!   `k` in 0..4 and `j` in 0..8 the four code bytes `qs[4k..4k + 4]` of
//!   row `j` at `16 + 32k + 4j`. A 32-byte load at `16 + 32k` thus holds,
//!   in 32-bit lane `j`, row `j`'s codes of columns `4k..4k + 4` (low
//!   nibbles) and `16 + 4k..` (high nibbles).
//! - **Q4_K** (144-byte super-blocks): the eight `d` (`2j`), the eight
//!   `dmin` (`16 + 2j`), the 64 six-bit scales at 32 and the 64 mins at 80
//!   (each 48 bytes, see `put6`: scale of sub-block `s` of row `j` is
//!   value `8s + j`, its min value `16(s / 2) + 2j + s % 2`, the orders the
//!   kernel multiplies in), then for each 32-byte code chunk `c`
//!   (sub-blocks `2c`, `2c + 1`), `k` in 0..8 and `j` in 0..8 the bytes
//!   `qs[32c + 4k..][..4]` of row `j` at `128 + 256c + 32k + 4j`. The
//!   scales are re-encoded rather than moved (the k-quant packing of one
//!   row's 12 bytes is a bijection, so is this one): same 96 bytes.
//!
//! Only the resident copies are rewritten: dense weights after they are
//! read into memory, experts after their read into a cache slot. The model
//! file is never touched.

use crate::quant::dequant::k_scale_min;
use crate::quant::GgmlType;

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// Largest row (bytes) that is interleaved: where no eight-row kernel
/// exists, a group is copied back to plain rows in a buffer of `ROWS`
/// rows on the stack.
pub const MAX_ROW_BYTES: usize = 8192;

/// Whether a `rows × cols` matrix of `ty` has an interleaved layout.
pub fn supports(ty: GgmlType, rows: usize, cols: usize) -> bool {
    let Some(row_bytes) = ty.row_bytes(cols as u64) else {
        return false;
    };
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_K)
        && rows.is_multiple_of(ROWS)
        && rows > 0
        && row_bytes as usize <= MAX_ROW_BYTES
}

/// Runs of bytes of one block, `(offset in the block, length, offset of
/// row 0's run in the tile, distance between rows' runs)`.
fn runs(ty: GgmlType, mut f: impl FnMut(usize, usize, usize, usize)) {
    match ty {
        GgmlType::Q4_0 => {
            f(0, 2, 0, 2);
            for k in 0..4 {
                f(2 + 4 * k, 4, 16 + 32 * k, 4);
            }
        }
        GgmlType::Q4_K => {
            f(0, 2, 0, 2);
            f(2, 2, 16, 2);
            // Bytes 4..16 (scales and mins): see `k_scales_to_tile`.
            for c in 0..4 {
                for k in 0..8 {
                    f(16 + 32 * c + 4 * k, 4, 128 + 256 * c + 32 * k, 4);
                }
            }
        }
        _ => unreachable!("checked by supports()"),
    }
}

/// Rewrites `bytes` (`rows` plain rows of `ty`, `supports` true) into the
/// interleaved layout, in place. `scratch` holds one group meanwhile.
pub fn interleave(ty: GgmlType, cols: usize, bytes: &mut [u8], scratch: &mut Vec<u8>) {
    let Some(row_bytes) = ty.row_bytes(cols as u64).map(|b| b as usize) else {
        return;
    };
    let (bb, group) = (ty.type_size(), ROWS * row_bytes);
    scratch.resize(group, 0);
    for g in bytes.chunks_exact_mut(group) {
        scratch.copy_from_slice(g);
        for (b, tile) in g.chunks_exact_mut(ROWS * bb).enumerate() {
            for j in 0..ROWS {
                let block = &scratch[j * row_bytes + b * bb..][..bb];
                runs(ty, |src, len, dst, step| {
                    tile[dst + j * step..][..len].copy_from_slice(&block[src..src + len]);
                });
            }
            if ty == GgmlType::Q4_K {
                let block = |j: usize| &scratch[j * row_bytes + b * bb..][..bb];
                k_scales_to_tile(std::array::from_fn(|j| &block(j)[4..16]), tile);
            }
        }
    }
}

/// Q4_K: the 6-bit scales and mins of the eight rows (their packed 12
/// bytes, `sc`) into a tile's bytes 32..128.
fn k_scales_to_tile(sc: [&[u8]; ROWS], tile: &mut [u8]) {
    let (mut scales, mut mins) = ([0u8; 64], [0u8; 64]);
    for (j, sc) in sc.iter().enumerate() {
        for s in 0..8 {
            let (d, m) = k_scale_min(sc, s);
            scales[8 * s + j] = d;
            mins[16 * (s / 2) + 2 * j + s % 2] = m;
        }
    }
    put6(&scales, &mut tile[32..80]);
    put6(&mins, &mut tile[80..128]);
}

/// Q4_K: a tile's scales and mins (decoded with [`get6`]), as each row's
/// packed 12 bytes.
struct KScales {
    scales: [u8; 64],
    mins: [u8; 64],
}

impl KScales {
    fn of(tile: &[u8]) -> KScales {
        KScales {
            scales: get6(&tile[32..80]),
            mins: get6(&tile[80..128]),
        }
    }

    /// Row `j`'s 12 bytes in the k-quant packing.
    fn row(&self, j: usize) -> [u8; 12] {
        let (scales, mins) = (&self.scales, &self.mins);
        let sc: [u8; 8] = std::array::from_fn(|s| scales[8 * s + j]);
        let m: [u8; 8] = std::array::from_fn(|s| mins[16 * (s / 2) + 2 * j + s % 2]);
        let mut out = [0u8; 12];
        for s in 0..4 {
            out[s] = (sc[s] & 63) | ((sc[s + 4] >> 4) << 6);
            out[s + 4] = (m[s] & 63) | ((m[s + 4] >> 4) << 6);
            out[s + 8] = (sc[s + 4] & 15) | ((m[s + 4] & 15) << 4);
        }
        out
    }
}

/// 64 six-bit values in 48 bytes, laid out for vector decoding: byte `i`
/// of the first 32 holds value `i` (low nibble) and `32 + i` (high nibble)
/// by their low four bits; byte `i` of the last 16 holds the top two bits
/// of values `i`, `16 + i`, `32 + i`, `48 + i` at bits 0, 2, 4, 6.
fn put6(v: &[u8; 64], out: &mut [u8]) {
    for i in 0..32 {
        out[i] = (v[i] & 15) | ((v[32 + i] & 15) << 4);
    }
    for i in 0..16 {
        out[32 + i] = (0..4).fold(0, |b, q| b | ((v[16 * q + i] >> 4) & 3) << (2 * q));
    }
}

/// The inverse of [`put6`].
fn get6(p: &[u8]) -> [u8; 64] {
    std::array::from_fn(|v| {
        let low = if v < 32 { p[v] & 15 } else { p[v - 32] >> 4 };
        let high = (p[32 + v % 16] >> (2 * (v / 16))) & 3;
        low | (high << 4)
    })
}

/// Copies the `ROWS` rows of one interleaved group back to plain rows in
/// `out` (`ROWS · row_bytes`).
pub fn group_to_rows(ty: GgmlType, group: &[u8], out: &mut [u8]) {
    let (bb, row_bytes) = (ty.type_size(), group.len() / ROWS);
    for (b, tile) in group.chunks_exact(ROWS * bb).enumerate() {
        let k = (ty == GgmlType::Q4_K).then(|| KScales::of(tile));
        for j in 0..ROWS {
            let block = &mut out[j * row_bytes + b * bb..][..bb];
            block_of_row(ty, tile, j, block, k.as_ref());
        }
    }
}

/// Copies row `r` of an interleaved matrix (`row_bytes` per row) to `out`.
pub fn row_of(ty: GgmlType, bytes: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    let (bb, j) = (ty.type_size(), r % ROWS);
    let group = &bytes[(r - j) * row_bytes..][..ROWS * row_bytes];
    for (b, tile) in group.chunks_exact(ROWS * bb).enumerate() {
        let k = (ty == GgmlType::Q4_K).then(|| KScales::of(tile));
        block_of_row(ty, tile, j, &mut out[b * bb..][..bb], k.as_ref());
    }
}

/// Row `j`'s block of a tile, in the file's layout (`k`: the tile's
/// decoded scales, for Q4_K).
fn block_of_row(ty: GgmlType, tile: &[u8], j: usize, block: &mut [u8], k: Option<&KScales>) {
    runs(ty, |src, len, dst, step| {
        block[src..src + len].copy_from_slice(&tile[dst + j * step..][..len]);
    });
    if let Some(k) = k {
        block[4..16].copy_from_slice(&k.row(j));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{fill_blocks, Rng};

    #[test]
    fn interleaving_is_a_permutation_that_round_trips() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_K] {
            let (rows, cols) = (24, 512);
            assert!(supports(ty, rows, cols));
            let rb = ty.row_bytes(cols as u64).unwrap() as usize;
            let mut plain = vec![0u8; rows * rb];
            fill_blocks(ty, &mut Rng::new(7), 0.1, &mut plain).unwrap();
            // Distinct bytes where the scales are, so a misplaced run shows.
            for (i, b) in plain.iter_mut().enumerate() {
                *b ^= (i % 251) as u8;
            }
            let mut x = plain.clone();
            interleave(ty, cols, &mut x, &mut Vec::new());
            assert_ne!(x, plain, "{ty}");
            if ty == GgmlType::Q4_0 {
                let (mut a, mut b) = (plain.clone(), x.clone());
                a.sort_unstable();
                b.sort_unstable();
                assert_eq!(a, b, "{ty}: same bytes, other order");
            }
            let mut back = vec![0u8; rows * rb];
            for (g, o) in x
                .chunks_exact(ROWS * rb)
                .zip(back.chunks_exact_mut(ROWS * rb))
            {
                group_to_rows(ty, g, o);
            }
            assert_eq!(back, plain, "{ty}");
            let mut row = vec![0u8; rb];
            for r in 0..rows {
                row_of(ty, &x, rb, r, &mut row);
                assert_eq!(row, plain[r * rb..(r + 1) * rb], "{ty} row {r}");
            }
        }
    }

    #[test]
    fn six_bit_values_round_trip() {
        let v: [u8; 64] = std::array::from_fn(|i| ((i * 37 + 11) % 64) as u8);
        let mut p = [0u8; 48];
        put6(&v, &mut p);
        assert_eq!(get6(&p), v);
    }

    #[test]
    fn q4_k_tile_holds_every_scale_and_min() {
        // Each row's scales and mins, as ggml decodes them, where the
        // kernel looks for them.
        let ty = GgmlType::Q4_K;
        let mut plain = vec![0u8; ROWS * 144];
        fill_blocks(ty, &mut Rng::new(3), 0.1, &mut plain).unwrap();
        for (i, b) in plain.iter_mut().enumerate() {
            *b ^= (i * 7 % 256) as u8;
        }
        let mut x = plain.clone();
        interleave(ty, 256, &mut x, &mut Vec::new());
        let (scales, mins) = (get6(&x[32..80]), get6(&x[80..128]));
        for j in 0..ROWS {
            for s in 0..8 {
                let (d, m) = k_scale_min(&plain[144 * j + 4..144 * j + 16], s);
                assert_eq!(scales[8 * s + j], d);
                assert_eq!(mins[16 * (s / 2) + 2 * j + s % 2], m);
            }
        }
    }

    #[test]
    fn q4_0_tile_puts_row_codes_in_lanes() {
        // Row j's scale at 2j; its qs[4k..4k + 4] in lane j of the k-th vector.
        let ty = GgmlType::Q4_0;
        let mut plain = vec![0u8; ROWS * 18];
        for j in 0..ROWS {
            for i in 0..18 {
                plain[j * 18 + i] = (j * 18 + i) as u8;
            }
        }
        let mut x = plain.clone();
        interleave(ty, 32, &mut x, &mut Vec::new());
        for j in 0..ROWS {
            assert_eq!(x[2 * j..2 * j + 2], plain[j * 18..j * 18 + 2]);
            for k in 0..4 {
                let at = 16 + 32 * k + 4 * j;
                assert_eq!(x[at..at + 4], plain[j * 18 + 2 + 4 * k..][..4]);
            }
        }
    }
}
