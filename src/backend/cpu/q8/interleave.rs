//! Weight matrices re-laid at load time with `R` rows interleaved, for the VNNI tiers.
//!
//! The row dots of [`super::dot`] reduce each 32-element block of one row to a scalar: per
//! block a horizontal sum's worth of work, a scale conversion and a broadcast, about as much
//! work as the multiply-adds themselves. Interleaving `R` rows (16 on AVX-512, 8 on AVX-VNNI)
//! four bytes at a time turns that around: one SIMD lane is one row, a `vpdpbusd` with four
//! broadcast activation bytes advances all `R` rows by four columns, and the per-block scales
//! of the `R` rows are one vector load. No horizontal sums at all, and decode and prompt
//! processing run the same kernel (a prompt chunk takes four tokens per pass over the
//! weights). This is the layout llama.cpp's CPU "repack" buffers use, for the same reason.
//!
//! The bytes are the stored ones, moved, not re-quantized: results are exactly those of the
//! row kernels (the same integer sums; only the order of float additions differs). Sizes stay
//! within 3% of the stored format:
//!
//! | format | per group of `R` rows and one block | bytes per row-block (stored) |
//! |---|---|---|
//! | Q4_0 | `d[R]` f16, `qs[4][R][4]` | 18 (18) |
//! | Q4_1 | `d[R]`, `m[R]` f16, `qs[4][R][4]` | 20 (20) |
//! | Q8_0 | `d[R]` f16, `qs[8][R][4]` as `q + 128` (u8) | 34 (34) |
//! | Q4_K | `d[R]`, `dmin[R]` f16, `sc[8][R]`, `mn[4][R][2]` u8 (6-bit values unpacked), `qs[32][R][4]` | 148 (144) |
//! | Q6_K | `d[R]` f16, `sc[8][R][2]` i8, `ql[32][R][4]`, `qh[16][R][4]` | 210 (210) |
//!
//! The `Q4_K` minimums and the `Q6_K` scales are stored in pairs per row (`[R][2]`: two
//! sub-blocks, or the two halves of a 32-run), so that one widening load gives each lane a
//! pair of i16 for a 16-bit pair multiply-add against the activations' paired sums
//! ([`super::Q8KAct`]).
//!
//! Rows past the end of the matrix are zero (their results are not stored). The original
//! memory-mapped bytes are no longer read once a weight is interleaved, so the kernel can drop
//! them from memory; the interleaved copy is what stays resident.

use rayon::prelude::*;

use crate::quant::DType;

/// A `[N, K]` weight, `R` rows interleaved (see the module doc).
pub struct Interleaved {
    /// Stored format.
    pub dtype: DType,
    /// Rows per group.
    pub r: usize,
    /// Rows.
    pub n: usize,
    /// Columns.
    pub k: usize,
    /// Groups of `r` rows, each `k / block_elems` blocks of [`Self::block_bytes`].
    pub data: Vec<u8>,
}

impl Interleaved {
    /// Whether `dtype` has an interleaved layout.
    pub fn supported(dtype: DType) -> bool {
        matches!(
            dtype,
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4_K | DType::Q6_K
        )
    }

    /// Bytes of one block of a group of `r` rows.
    pub fn block_bytes(dtype: DType, r: usize) -> usize {
        r * match dtype {
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q8_0 => 34,
            DType::Q4_K => 148,
            DType::Q6_K => 210,
            _ => panic!("no interleaved layout for {dtype}"),
        }
    }

    /// Bytes of one group of `r` rows.
    pub fn group_bytes(&self) -> usize {
        Self::block_bytes(self.dtype, self.r) * (self.k / self.dtype.block_elems())
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.n.div_ceil(self.r)
    }

    /// The bytes of group `g`.
    pub fn group(&self, g: usize) -> &[u8] {
        let gb = self.group_bytes();
        &self.data[g * gb..(g + 1) * gb]
    }

    /// Interleaves `n` stored rows of `k` elements (`rows`, row-major) in groups of `r`.
    pub fn new(dtype: DType, rows: &[u8], n: usize, k: usize, r: usize) -> Interleaved {
        let be = dtype.block_elems();
        let sb = dtype.block_bytes();
        assert!(Self::supported(dtype) && k.is_multiple_of(be));
        let row_bytes = k / be * sb;
        assert!(rows.len() >= n * row_bytes);
        let blocks = k / be;
        let bb = Self::block_bytes(dtype, r);
        let mut data = vec![0u8; n.div_ceil(r) * blocks * bb];
        // Interleaves 4-byte chunk `c` of each row's run `src` into `dst` (`[chunks][r][4]`).
        let chunks4 = |dst: &mut [u8], i: usize, src: &[u8], xor: u8| {
            for (c, w) in src.chunks_exact(4).enumerate() {
                for (o, b) in dst[(c * r + i) * 4..(c * r + i) * 4 + 4].iter_mut().zip(w) {
                    *o = b ^ xor;
                }
            }
        };
        // Groups are independent: spread them over the pool (a 0.6B model moves ~0.4 GB).
        data.par_chunks_mut(blocks * bb)
            .enumerate()
            .for_each(|(g, group)| {
                for b in 0..blocks {
                    let out = &mut group[b * bb..(b + 1) * bb];
                    if dtype == DType::Q8_0 {
                        // Zero rows must read as zero weights: q = 0 is the byte 128.
                        out[2 * r..].fill(128);
                    }
                    for i in 0..r.min(n - g * r) {
                        let row = g * r + i;
                        let blk = &rows[row * row_bytes + b * sb..row * row_bytes + (b + 1) * sb];
                        match dtype {
                            DType::Q4_0 => {
                                out[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
                                chunks4(&mut out[2 * r..], i, &blk[2..18], 0);
                            }
                            DType::Q4_1 => {
                                out[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
                                out[2 * r + 2 * i..2 * r + 2 * i + 2].copy_from_slice(&blk[2..4]);
                                chunks4(&mut out[4 * r..], i, &blk[4..20], 0);
                            }
                            DType::Q8_0 => {
                                out[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
                                chunks4(&mut out[2 * r..], i, &blk[2..34], 0x80);
                            }
                            DType::Q4_K => {
                                out[2 * i..2 * i + 2].copy_from_slice(&blk[0..2]);
                                out[2 * r + 2 * i..2 * r + 2 * i + 2].copy_from_slice(&blk[2..4]);
                                let scales: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
                                for j in 0..8 {
                                    let (sc, mn) = crate::quant::q4_k::scale_min(j, scales);
                                    out[4 * r + j * r + i] = sc;
                                    // Pairs of sub-blocks, for 16-bit pair multiply-adds.
                                    out[12 * r + (j / 2) * 2 * r + 2 * i + j % 2] = mn;
                                }
                                chunks4(&mut out[20 * r..], i, &blk[16..144], 0);
                            }
                            DType::Q6_K => {
                                out[2 * i..2 * i + 2].copy_from_slice(&blk[208..210]);
                                // Scale pairs: the two 16-element halves of a 32-run.
                                for j in 0..16 {
                                    out[2 * r + (j / 2) * 2 * r + 2 * i + j % 2] = blk[192 + j];
                                }
                                chunks4(&mut out[18 * r..], i, &blk[0..128], 0);
                                chunks4(&mut out[146 * r..], i, &blk[128..192], 0);
                            }
                            _ => unreachable!(),
                        }
                    }
                }
            });
        Interleaved {
            dtype,
            r,
            n,
            k,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::q8::{dot_scalar, dot_scalar_k, interleaved_wants_q8k, Q8Act, Q8KAct};

    fn row(data: &[u8], i: usize, rb: usize) -> &[u8] {
        &data[i * rb..(i + 1) * rb]
    }

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        bytes(n, seed)
            .iter()
            .map(|&b| b as f32 / 127.5 - 1.0)
            .collect()
    }

    /// Rows of random blocks with sane f16 scales.
    fn rows(dtype: DType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let sb = dtype.block_bytes();
        let mut v = bytes(n * k / dtype.block_elems() * sb, seed);
        for (i, blk) in v.chunks_exact_mut(sb).enumerate() {
            let d = half::f16::from_f32(0.01 + 0.001 * (i % 5) as f32).to_le_bytes();
            match dtype {
                DType::Q4_0 | DType::Q8_0 => blk[0..2].copy_from_slice(&d),
                DType::Q4_1 => {
                    blk[0..2].copy_from_slice(&d);
                    let m = half::f16::from_f32(-0.05 + 0.02 * (i % 7) as f32).to_le_bytes();
                    blk[2..4].copy_from_slice(&m);
                }
                DType::Q4_K => {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&d);
                }
                DType::Q6_K => blk[208..210].copy_from_slice(&d),
                _ => unreachable!(),
            }
        }
        v
    }

    /// Every VNNI tier this CPU has, against the scalar row dots, on partial groups and token
    /// counts around the tile of four.
    #[test]
    fn interleaved_kernels_match_scalar_row_dots() {
        let tiers: Vec<Isa> = Isa::supported()
            .into_iter()
            .filter(|&i| super::super::interleave_rows(i).is_some())
            .collect();
        for dtype in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4_K,
            DType::Q6_K,
        ] {
            let (n, k) = (21, 512);
            let data = rows(dtype, n, k, 3);
            let rb = k / dtype.block_elems() * dtype.block_bytes();
            for t in [1usize, 3, 4, 6] {
                let vals: Vec<Vec<f32>> = (0..t).map(|j| values(k, 10 + j as u64)).collect();
                for &isa in &tiers {
                    let r = super::super::interleave_rows(isa).unwrap();
                    let w = Interleaved::new(dtype, &data, n, k, r);
                    let mut out = vec![f32::NAN; t * r];
                    for g in 0..w.groups() {
                        // The K-quants read per-256 activations, the others per-32 ones.
                        let want: Vec<Vec<f32>> = if interleaved_wants_q8k(dtype) {
                            let xs: Vec<Q8KAct> = vals
                                .iter()
                                .map(|v| {
                                    let mut q = Q8KAct::default();
                                    q.quantize(v);
                                    q
                                })
                                .collect();
                            super::super::gemm_interleaved_k(isa, &w, g, &xs, &mut out);
                            let rows = |x: &Q8KAct| -> Vec<f32> {
                                (0..r.min(n - g * r))
                                    .map(|i| dot_scalar_k(dtype, row(&data, g * r + i, rb), x))
                                    .collect()
                            };
                            xs.iter().map(rows).collect()
                        } else {
                            let xs: Vec<Q8Act> = vals
                                .iter()
                                .map(|v| {
                                    let mut q = Q8Act::default();
                                    q.quantize(v);
                                    q
                                })
                                .collect();
                            super::super::gemm_interleaved(isa, &w, g, &xs, &mut out);
                            let rows = |x: &Q8Act| -> Vec<f32> {
                                (0..r.min(n - g * r))
                                    .map(|i| dot_scalar(dtype, row(&data, g * r + i, rb), x))
                                    .collect()
                            };
                            xs.iter().map(rows).collect()
                        };
                        for (tt, want) in want.iter().enumerate() {
                            for (i, &want) in want.iter().enumerate() {
                                let got = out[tt * r + i];
                                assert!(
                                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                    "{isa} {dtype} t={t} token {tt} row {}: {got} vs {want}",
                                    g * r + i
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
