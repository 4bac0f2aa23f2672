//! The ops that read weight segments: embedding lookup and the matmuls, with the RMSNorm or
//! SiLU·up prologue folded into the matrix-vector kernel for small steps.
//!
//! Below [`MAT_MIN_TOKENS`] tokens a matmul runs `matmul_vec.wgsl` (rows of W per workgroup,
//! optionally with a prologue applied to x as it is read); from it on, the tiled
//! `matmul_mat.wgsl`, which reads each x row many times, so a prologue is run once as its own
//! dispatch instead. Every matmul dispatches once per weight segment.

use super::buffers::{GpuBuffer, WgpuTensor};
use super::params::*;
use super::pipelines::{Kernel, PipelineKey};
use super::weights::WgpuWeight;
use super::{WgpuBackend, WG};
use crate::backend::Batch;
use crate::quant::DType;

/// Token counts below this use the matrix-vector kernel; from it on, the tiled one.
const MAT_MIN_TOKENS: usize = 5;
/// Rows of W per workgroup of `matmul_vec.wgsl` (its `NR`).
const VEC_ROWS_PER_WG: usize = 4;
/// Tile of `matmul_mat.wgsl` (its `TM` = `TN`).
const MAT_TILE: usize = 64;

/// What the matrix-vector kernel applies to x before the product (see
/// `shaders/include/matmul_x.wgsl`).
#[derive(Clone, Copy)]
enum Prologue<'a> {
    /// x as is.
    None,
    /// RMSNorm with this epsilon and `[K]` f32 weight.
    Norm(f32, &'a GpuBuffer),
    /// x is gate_up `[T, 2K]`: silu(gate) · up.
    Silu,
}

impl WgpuBackend {
    /// Whether kernels reading `dtype` widen f16 bits (F16 elements or block scales).
    fn widens_f16(dtype: DType) -> bool {
        dtype == DType::F16 || dtype.is_quantized()
    }

    /// The rows of `table` named by the step's token ids: the trait's `embed`.
    pub(super) fn record_embed(&self, table: &WgpuWeight, batch: &Batch, out: &mut WgpuTensor) {
        let c = out.cols;
        let t = batch.num_tokens();
        assert_eq!(table.cols, c, "embedding width");
        assert!(t <= out.rows, "embed rows");
        let inner = &mut *self.lock();
        debug_assert_eq!(inner.step.num_tokens, t, "begin_step was not called");
        // The quantized kernel writes eight elements per thread.
        let per_thread = if table.segments.iter().any(|s| s.dtype.is_quantized()) {
            8
        } else {
            1
        };
        let groups = self.grid((t * c).div_ceil(WG * per_thread));
        for seg in &table.segments {
            let params = EmbedParams {
                num_tokens: t as u32,
                cols: c as u32,
                ks: seg.ks as u32,
                row0: seg.row0 as u32,
                seg_rows: seg.rows as u32,
                tokens_off: inner.step.tokens_off,
                _pad: [0; 2],
            };
            let key = PipelineKey {
                kernel: Kernel::Embed,
                weight: Some(seg.dtype),
                subgroup: false,
                f16_in_f32: Self::widens_f16(seg.dtype) && self.ctx.f16_in_f32,
                kv_f16: false,
            };
            let batch_buf = inner.batch_buf.clone();
            self.dispatch(
                inner,
                key,
                &[&seg.buf, &batch_buf, &out.buf],
                &params,
                (groups.0, groups.1, 1),
            );
        }
    }

    /// `rms_norm(x) · Wᵀ`: the trait's `rms_norm_matmul`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record_rms_norm_matmul(
        &self,
        x: &WgpuTensor,
        norm: &WgpuWeight,
        eps: f32,
        w: &WgpuWeight,
        rows: usize,
        xn: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) {
        if rows >= MAT_MIN_TOKENS {
            // Prefill: the tiled kernel reads each x row many times; normalise it once.
            self.record_rms_norm(x, norm, eps, rows, xn);
            self.record_matmul(xn, w, rows, out, false);
            return;
        }
        let nw = norm.vector.as_ref().expect("a norm weight is a vector");
        assert_eq!(norm.cols, x.cols, "rms_norm width");
        self.matmul_with(x, w, rows, out, false, Prologue::Norm(eps, nw));
    }

    /// `out += (silu(gate) · up) · Wᵀ`: the trait's `silu_mul_matmul_add`.
    pub(super) fn record_silu_mul_matmul_add(
        &self,
        gate_up: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        act: &mut WgpuTensor,
        out: &mut WgpuTensor,
    ) {
        if rows >= MAT_MIN_TOKENS {
            self.record_silu_mul(gate_up, rows, act);
            self.record_matmul(act, w, rows, out, true);
            return;
        }
        self.matmul_with(gate_up, w, rows, out, true, Prologue::Silu);
    }

    /// `out (+)= x · Wᵀ`: the trait's `matmul` and `matmul_add`.
    pub(super) fn record_matmul(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        out: &WgpuTensor,
        accumulate: bool,
    ) {
        self.matmul_with(x, w, rows, out, accumulate, Prologue::None);
    }

    /// `out (+)= f(x) · Wᵀ`, with `f` folded into the matrix-vector kernel (callers use a
    /// prologue only below `MAT_MIN_TOKENS` tokens).
    fn matmul_with(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        rows: usize,
        out: &WgpuTensor,
        accumulate: bool,
        prologue: Prologue,
    ) {
        let x_cols = match prologue {
            Prologue::Silu => x.cols / 2,
            _ => x.cols,
        };
        assert_eq!((x_cols, out.cols), (w.cols, w.rows), "matmul shapes");
        assert!(rows <= x.rows && rows <= out.rows, "matmul rows");
        assert!(w.vector.is_none(), "matmul with a vector weight");
        if rows == 0 {
            return;
        }
        let inner = &mut *self.lock();
        let vec = rows < MAT_MIN_TOKENS;
        assert!(
            vec || matches!(prologue, Prologue::None),
            "prologue on the tiled kernel"
        );
        let (eps, norm) = match prologue {
            Prologue::Norm(eps, nw) => (eps, Some(nw)),
            _ => (0.0, None),
        };
        for seg in &w.segments {
            let params = MatmulParams {
                num_tokens: rows as u32,
                k: w.cols as u32,
                n: w.rows as u32,
                ks: seg.ks as u32,
                seg_rows: seg.rows as u32,
                col0: seg.row0 as u32,
                accumulate: accumulate as u32,
                eps,
            };
            let (kernel, groups) = if vec {
                let (gx, gy) = self.grid(seg.rows.div_ceil(VEC_ROWS_PER_WG));
                let kernel = match prologue {
                    Prologue::None => Kernel::MatmulVec,
                    Prologue::Norm(..) => Kernel::MatmulVecNorm,
                    Prologue::Silu => Kernel::MatmulVecSilu,
                };
                (kernel, (gx, gy, rows as u32))
            } else {
                let gx = seg.rows.div_ceil(MAT_TILE) as u32;
                let gy = rows.div_ceil(MAT_TILE) as u32;
                (Kernel::MatmulMat, (gx, gy, 1))
            };
            let key = PipelineKey {
                kernel,
                weight: Some(seg.dtype),
                subgroup: vec && self.ctx.subgroup,
                f16_in_f32: Self::widens_f16(seg.dtype) && self.ctx.f16_in_f32,
                kv_f16: false,
            };
            match norm {
                Some(nw) => self.dispatch(
                    inner,
                    key,
                    &[&seg.buf, &x.buf, &out.buf, nw],
                    &params,
                    groups,
                ),
                None => self.dispatch(inner, key, &[&seg.buf, &x.buf, &out.buf], &params, groups),
            }
        }
    }
}
