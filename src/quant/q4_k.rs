//! `Q4_K`: 256-element super-blocks of eight 32-element sub-blocks, 4-bit quants, and a
//! 6-bit scale and 6-bit minimum per sub-block.
//!
//! Block layout (144 bytes, little-endian):
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | 0..2 | `d` | f16 super-scale of the sub-block scales |
//! | 2..4 | `dmin` | f16 super-scale of the sub-block minimums |
//! | 4..16 | `scales[12]` | eight 6-bit scales and eight 6-bit minimums, packed (below) |
//! | 16..144 | `qs[128]` | 4-bit quants, four chunks of 32 bytes |
//!
//! Packing of `scales` for sub-block `j` (see [`scale_min`]): for `j < 4` the scale is the low
//! 6 bits of byte `j` and the minimum the low 6 bits of byte `j + 4`; for `j >= 4` the low 4
//! bits come from the low (scale) and high (minimum) nibble of byte `j + 4`, and the top 2 bits
//! from the top 2 bits of byte `j - 4` (scale) and byte `j` (minimum).
//!
//! Quants: chunk `c` (bytes `32c..32c+32` of `qs`) holds sub-block `2c` in its low nibbles and
//! sub-block `2c + 1` in its high nibbles. Element `l` of sub-block `s` with scale `sc`,
//! minimum `mn` and quant `q` is `(d * sc) * q - dmin * mn`, each product rounded to f32 as
//! GGML does.

use half::f16;

/// Elements per super-block.
pub const BLOCK_ELEMS: usize = 256;
/// Bytes per super-block.
pub const BLOCK_BYTES: usize = 144;

/// The 6-bit scale and 6-bit minimum of sub-block `j` (0..8) from the 12 packed bytes.
///
/// Shared by `Q4_K` and `Q5_K`, which pack their scales identically.
pub fn scale_min(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        let mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, mn)
    }
}

/// Dequantizes one super-block.
pub fn dequantize_block(block: &[u8; BLOCK_BYTES], out: &mut [f32; BLOCK_ELEMS]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let scales: &[u8; 12] = block[4..16].try_into().unwrap();
    let qs = &block[16..];
    for c in 0..4 {
        let (sc1, m1) = scale_min(2 * c, scales);
        let (sc2, m2) = scale_min(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let y = &mut out[64 * c..64 * c + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Dequantizes `dst.len()` elements (a whole number of super-blocks) from `src`.
///
/// Panics if `dst.len()` is not a multiple of [`BLOCK_ELEMS`] or `src` is shorter than the
/// matching number of blocks: tensor sizes are validated when a file is loaded.
pub fn dequantize_row(src: &[u8], dst: &mut [f32]) {
    super::check_row_lengths("Q4_K", src, dst, BLOCK_BYTES, BLOCK_ELEMS);
    for (b, o) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK_ELEMS))
    {
        dequantize_block(b.try_into().unwrap(), o.try_into().unwrap());
    }
}

/// Reference quantizer, byte-exact with GGML's `quantize_row_q4_K_ref` (the quantizer
/// llama-quantize uses when no importance matrix is given).
///
/// Each 32-element sub-block gets a scale and a minimum from `fit_scale_min` (weights
/// `rms + |x|`), the eight scales and eight minimums are quantized to 6 bits against the
/// largest of each, and the elements are re-quantized with the rounded scales.
///
/// Panics under the same length rules as [`dequantize_row`].
pub fn quantize_row_ref(src: &[f32], dst: &mut [u8]) {
    super::check_row_lengths("Q4_K", dst, src, BLOCK_BYTES, BLOCK_ELEMS);
    for (x, b) in src
        .chunks_exact(BLOCK_ELEMS)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        quantize_block(x.try_into().unwrap(), b.try_into().unwrap());
    }
}

fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut l = [0u8; BLOCK_ELEMS];
    let (d, dmin, scales) = quantize_sub_blocks(x, 15, -1.0, 0.1, 20, &mut l);
    b[..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    b[4..16].copy_from_slice(&scales);
    for c in 0..4 {
        for i in 0..32 {
            b[16 + 32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

/// The shared first half of the `Q4_K` and `Q5_K` reference quantizers: fits each
/// 32-element sub-block, packs the 6-bit sub-block scales and minimums, and writes the final
/// quants (`0..=nmax`) of every element into `l`. Returns `(d, dmin, scales)`.
pub(crate) fn quantize_sub_blocks(
    x: &[f32; BLOCK_ELEMS],
    nmax: u8,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    l: &mut [u8; BLOCK_ELEMS],
) -> (f16, f16, [u8; 12]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().unwrap();
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let ls: &mut [u8; 32] = (&mut l[32 * j..32 * j + 32]).try_into().unwrap();
        let (scale, min) = fit_scale_min(xs, &weights, nmax, rmin, rdelta, nstep, ls);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // GGML stores the rounded value in a uint8_t before clamping: the same wrap here.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            // The sub-block keeps the quants the fit chose, as GGML does.
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            let q = nearest_int((x[32 * j + i] + dm) / dj);
            l[32 * j + i] = q.clamp(0, nmax as i32) as u8;
        }
    }
    (d, dmin, packed)
}

/// Rounds to the nearest integer, ties to even: what GGML's `nearest_int` computes with its
/// float-add trick (for the magnitudes quantizers see).
pub(crate) fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// GGML's `make_qkx2_quants`: fits `x ≈ scale * l + min` (`min <= 0`, `l` in `0..=nmax`)
/// minimising the weighted squared error, trying `nstep + 1` candidate scales around
/// `nmax / (max - min)` and refitting scale and minimum by least squares for each.
/// Returns `(scale, -min)`; the chosen quants are left in `l`.
///
/// The arithmetic follows GGML's operation for operation (all f32, same order), because a
/// different rounding anywhere can flip a quant and the files would differ.
pub(crate) fn fit_scale_min(
    x: &[f32; 32],
    weights: &[f32; 32],
    nmax: u8,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    l: &mut [u8; 32],
) -> (f32, f32) {
    let n = x.len();
    let nmaxf = nmax as f32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min));
        l[i] = q.clamp(0, nmax as i32) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax as i32);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs eight (scale, min) pairs the way the format stores them.
    pub(crate) fn pack(pairs: [(u8, u8); 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for (j, (sc, mn)) in pairs.into_iter().enumerate() {
            if j < 4 {
                s[j] |= sc;
                s[j + 4] |= mn;
            } else {
                s[j + 4] = (sc & 0xF) | ((mn & 0xF) << 4);
                s[j - 4] |= (sc >> 4) << 6;
                s[j] |= (mn >> 4) << 6;
            }
        }
        s
    }

    #[test]
    fn scale_min_unpacks_every_sub_block() {
        let pairs = [
            (1, 63),
            (63, 0),
            (17, 42),
            (32, 5),
            (63, 63),
            (48, 1),
            (15, 16),
            (0, 33),
        ];
        let s = pack(pairs);
        for (j, p) in pairs.iter().enumerate() {
            assert_eq!(scale_min(j, &s), *p, "sub-block {j}");
        }
    }

    #[test]
    fn dequantizes_hand_made_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        let s = pack([
            (2, 4),
            (3, 0),
            (1, 1),
            (1, 1),
            (1, 1),
            (1, 1),
            (10, 8),
            (1, 60),
        ]);
        b[4..16].copy_from_slice(&s);
        b[16] = 0x53; // sub-block 0 element 0: q=3; sub-block 1 element 0: q=5
        b[16 + 96 + 31] = 0xF7; // sub-block 6 element 31: q=7; sub-block 7 element 31: q=15
        let mut out = [0.0; BLOCK_ELEMS];
        dequantize_block(&b, &mut out);
        assert_eq!(out[0], 0.5 * 2.0 * 3.0 - 0.25 * 4.0);
        assert_eq!(out[32], 0.5 * 3.0 * 5.0);
        assert_eq!(out[1], -1.0);
        assert_eq!(out[192 + 31], 0.5 * 10.0 * 7.0 - 0.25 * 8.0);
        assert_eq!(out[255], 0.5 * 15.0 - 0.25 * 60.0);
    }

    #[test]
    fn round_trip_error_is_within_one_sub_block_step() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + (i % 7) as f32 * 0.002)
            .collect();
        let mut q = vec![0u8; 2 * BLOCK_BYTES];
        quantize_row_ref(&x, &mut q);
        let mut y = vec![0.0; 512];
        dequantize_row(&q, &mut y);
        for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
            let range =
                xs.iter().fold(0f32, |m, v| m.max(*v)) - xs.iter().fold(0f32, |m, v| m.min(*v));
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= range / 15.0, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn all_zero_block_quantizes_to_zero() {
        let mut q = vec![0xAAu8; BLOCK_BYTES];
        quantize_row_ref(&[0.0; BLOCK_ELEMS], &mut q);
        let mut y = [1.0; BLOCK_ELEMS];
        dequantize_row(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
