//! Weights on the GPU: stored bits kept, rows split into segments that each fit a binding.
//!
//! F16 and BF16 stay two elements per 32-bit word (widened to f32 in the shader), F32 as is;
//! float rows are padded to an even length so that a word never straddles two rows, block
//! formats are repacked to whole words ([`super::repack`]). Parts stacked by rows (q, k, v;
//! gate, up) are concatenated when they share a format, and the result is split by rows into
//! segments, one buffer each, that each fit one storage binding
//! (`max_storage_buffer_binding_size`: 128 MiB on lavapipe, below the 311 MB embedding of
//! Qwen3-0.6B in f16); a matmul dispatches once per segment. Norm weights (vectors) are widened
//! to f32 once.

use std::time::{Duration, Instant};

use super::buffers::GpuBuffer;
use super::pipelines::WEIGHT_DTYPES;
use super::{repack, WgpuBackend};
use crate::error::{Error, Result};
use crate::loader::HostTensor;
use crate::quant::DType;

/// Rows `row0..row0 + rows` of a weight in one buffer: `[rows, ks]` elements of `dtype`.
pub(super) struct Segment {
    pub(super) dtype: DType,
    pub(super) buf: GpuBuffer,
    /// First row (= first output column of a matmul).
    pub(super) row0: usize,
    pub(super) rows: usize,
    /// Row stride in elements: the column count rounded up to even (float formats), or the
    /// column count (block formats).
    pub(super) ks: usize,
}

/// A weight: row segments on the GPU, or an f32 vector for norm weights.
pub struct WgpuWeight {
    /// N.
    pub(super) rows: usize,
    /// K.
    pub(super) cols: usize,
    pub(super) segments: Vec<Segment>,
    /// `[K]` f32, when the weight is a single vector.
    pub(super) vector: Option<GpuBuffer>,
}

impl WgpuWeight {
    /// Number of buffers the rows are split into (0 for a vector).
    pub fn num_segments(&self) -> usize {
        self.segments.len()
    }
}

/// How one row of a weight is stored, on the host and in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowLayout {
    /// Row stride in elements ([`Segment::ks`]).
    ks: usize,
    /// Bytes of a row in a segment.
    gpu_bytes: usize,
    /// Bytes of a row as loaded.
    host_bytes: usize,
}

/// The row layout of `cols` elements of `dtype`: float rows padded to an even length, block
/// rows repacked to whole words.
fn row_layout(dtype: DType, cols: usize) -> RowLayout {
    match repack::block_words(dtype) {
        None => {
            let ks = cols.next_multiple_of(2);
            RowLayout {
                ks,
                gpu_bytes: ks * dtype.block_bytes(),
                host_bytes: cols * dtype.block_bytes(),
            }
        }
        Some(words) => {
            let blocks = cols / dtype.block_elems();
            RowLayout {
                ks: cols,
                gpu_bytes: blocks * words * 4,
                host_bytes: blocks * dtype.block_bytes(),
            }
        }
    }
}

/// Rows of `row_bytes` that fit one segment of at most `limit` bytes; `None` when not even
/// one does.
fn rows_per_segment(row_bytes: usize, limit: u64) -> Option<usize> {
    let rows = limit as usize / row_bytes.max(1);
    (rows > 0).then_some(rows)
}

/// `(first row, rows)` of each segment of `total` rows cut `per_segment` at a time.
fn segment_spans(total: usize, per_segment: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(per_segment)
        .map(move |done| (done, per_segment.min(total - done)))
}

impl WgpuBackend {
    /// Uploads `parts` stacked by rows (see the module doc), or widens a lone vector to f32;
    /// the time spent converting and repacking on the host is added to `repack`.
    pub(super) fn upload_weight(
        &self,
        parts: &[&HostTensor],
        repack: &mut Duration,
    ) -> Result<WgpuWeight> {
        let (rows, cols) = crate::backend::stacked_shape(parts)?;
        let first = parts[0];
        for p in parts {
            if !WEIGHT_DTYPES.contains(&p.dtype) {
                return Err(Error::UnsupportedDType {
                    name: p.name.clone(),
                    dtype: format!("{} (not readable by the GPU backend)", p.dtype),
                });
            }
        }
        if rows > u32::MAX as usize / 2 || cols > u32::MAX as usize / 2 {
            return Err(Error::UnsupportedModel(format!(
                "tensor `{}` is too large for 32-bit indexing",
                first.name
            )));
        }
        if parts.len() == 1 && first.shape.len() == 1 {
            let start = Instant::now();
            let v = first.to_f32();
            *repack += start.elapsed();
            let vector = Some(self.upload(bytemuck::cast_slice(&v), &first.name));
            return Ok(WgpuWeight {
                rows,
                cols,
                segments: Vec::new(),
                vector,
            });
        }
        // Runs of consecutive parts that share a format are stored together.
        let mut segments = Vec::new();
        let mut row0 = 0;
        let mut start = 0;
        while start < parts.len() {
            let dtype = parts[start].dtype;
            let mut end = start + 1;
            while end < parts.len() && parts[end].dtype == dtype {
                end += 1;
            }
            self.upload_rows(&parts[start..end], dtype, row0, cols, &mut segments, repack)?;
            row0 += parts[start..end]
                .iter()
                .map(|p| p.rows_cols().0)
                .sum::<usize>();
            start = end;
        }
        Ok(WgpuWeight {
            rows,
            cols,
            segments,
            vector: None,
        })
    }

    /// Uploads stacked parts of one format as row segments starting at row `row0`.
    fn upload_rows(
        &self,
        parts: &[&HostTensor],
        dtype: DType,
        row0: usize,
        cols: usize,
        segments: &mut Vec<Segment>,
        repack: &mut Duration,
    ) -> Result<()> {
        let RowLayout {
            ks,
            gpu_bytes: row_bytes,
            host_bytes: src_row_bytes,
        } = row_layout(dtype, cols);
        let Some(max_rows) = rows_per_segment(row_bytes, self.segment_limit) else {
            return Err(Error::UnsupportedModel(format!(
                "tensor `{}`: one row of {cols} {dtype} elements exceeds the adapter's \
                 max_storage_buffer_binding_size ({} bytes)",
                parts[0].name, self.segment_limit
            )));
        };
        // Rows of all parts, in order, as (part, row in part).
        let total: usize = parts.iter().map(|p| p.rows_cols().0).sum();
        let mut part = 0;
        let mut part_row = 0;
        for (done, rows) in segment_spans(total, max_rows) {
            let size = (rows * row_bytes) as u64;
            let gbuf = self.alloc.create(
                &self.ctx.device,
                &wgpu::BufferDescriptor {
                    label: Some(&parts[part].name),
                    size: size.max(16).next_multiple_of(4),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: true,
                },
            );
            let buf = &gbuf.buf;
            {
                let mut view = buf
                    .slice(..)
                    .get_mapped_range_mut()
                    .expect("freshly mapped");
                let mut filled = 0;
                while filled < rows {
                    let p = parts[part];
                    let prows = p.rows_cols().0;
                    let n = (prows - part_row).min(rows - filled);
                    let src = &p.data.as_slice()
                        [part_row * src_row_bytes..(part_row + n) * src_row_bytes];
                    let at = filled * row_bytes;
                    if dtype.is_quantized() {
                        // The mapped range is write-only: repack through a small host buffer.
                        const ROWS: usize = 64;
                        let mut tmp = vec![0u8; ROWS.min(n) * row_bytes];
                        for (i, s) in src.chunks(ROWS * src_row_bytes).enumerate() {
                            let d = &mut tmp[..s.len() / src_row_bytes * row_bytes];
                            let start = Instant::now();
                            repack::repack_blocks(dtype, s, d);
                            *repack += start.elapsed();
                            let a = at + i * ROWS * row_bytes;
                            view.slice(a..a + d.len()).copy_from_slice(d);
                        }
                    } else if ks == cols {
                        view.slice(at..at + n * row_bytes).copy_from_slice(src);
                    } else {
                        // Odd K: row by row; the padding element stays zero (buffers are
                        // zeroed at creation).
                        for (i, s) in src.chunks_exact(src_row_bytes).enumerate() {
                            let a = at + i * row_bytes;
                            view.slice(a..a + src_row_bytes).copy_from_slice(s);
                        }
                    }
                    filled += n;
                    part_row += n;
                    if part_row == prows {
                        part += 1;
                        part_row = 0;
                    }
                }
            }
            buf.unmap();
            segments.push(Segment {
                dtype,
                buf: gbuf,
                row0: row0 + done,
                rows,
                ks,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_rows_are_padded_to_an_even_length() {
        let odd = row_layout(DType::F16, 7);
        assert_eq!(
            odd,
            RowLayout {
                ks: 8,
                gpu_bytes: 16,
                host_bytes: 14
            }
        );
        let even = row_layout(DType::BF16, 6);
        assert_eq!((even.ks, even.gpu_bytes, even.host_bytes), (6, 12, 12));
        let f32_odd = row_layout(DType::F32, 3);
        assert_eq!(
            (f32_odd.ks, f32_odd.gpu_bytes, f32_odd.host_bytes),
            (4, 16, 12)
        );
    }

    #[test]
    fn block_rows_are_repacked_to_whole_words() {
        // Q4_0: 18-byte blocks of 32 elements become 5 words; Q6_K: 210 bytes of 256 → 53.
        let q4 = row_layout(DType::Q4_0, 64);
        assert_eq!((q4.ks, q4.gpu_bytes, q4.host_bytes), (64, 2 * 20, 2 * 18));
        let q6 = row_layout(DType::Q6_K, 512);
        assert_eq!(
            (q6.ks, q6.gpu_bytes, q6.host_bytes),
            (512, 2 * 212, 2 * 210)
        );
    }

    #[test]
    fn segments_cover_every_row_once_within_the_limit() {
        // 10 rows of 24 bytes under a 100-byte binding: 4 rows a segment.
        let per = rows_per_segment(24, 100).unwrap();
        assert_eq!(per, 4);
        let spans: Vec<_> = segment_spans(10, per).collect();
        assert_eq!(spans, [(0, 4), (4, 4), (8, 2)]);
        // Exactly divisible: no empty tail segment.
        assert_eq!(segment_spans(8, 4).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        // Everything fits: one segment.
        assert_eq!(
            segment_spans(10, rows_per_segment(24, 1 << 20).unwrap()).collect::<Vec<_>>(),
            [(0, 10)]
        );
        for (total, per) in [(1, 1), (7, 3), (33, 5), (4097, 64)] {
            let spans: Vec<_> = segment_spans(total, per).collect();
            let mut next = 0;
            for &(row0, rows) in &spans {
                assert_eq!(row0, next, "segments are contiguous");
                assert!(rows > 0 && rows <= per, "{rows} rows of at most {per}");
                next += rows;
            }
            assert_eq!(next, total, "every row in a segment");
        }
    }

    #[test]
    fn a_row_wider_than_the_limit_has_no_segment() {
        assert_eq!(rows_per_segment(101, 100), None);
        assert_eq!(rows_per_segment(100, 100), Some(1));
    }
}
