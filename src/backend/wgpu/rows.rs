//! The per-row and element-wise ops over activations: RMSNorm, SiLU·up, gathering the rows
//! whose logits are wanted.

use super::buffers::WgpuTensor;
use super::params::*;
use super::pipelines::{Kernel, PipelineKey};
use super::weights::WgpuWeight;
use super::{WgpuBackend, WG};
use crate::backend::Batch;

impl WgpuBackend {
    /// `out = x / rms(x) · w` per row: the trait's `rms_norm`.
    pub(super) fn record_rms_norm(
        &self,
        x: &WgpuTensor,
        w: &WgpuWeight,
        eps: f32,
        rows: usize,
        out: &mut WgpuTensor,
    ) {
        let c = x.cols;
        let wv = w.vector.as_ref().expect("a norm weight is a vector");
        assert_eq!((w.cols, out.cols), (c, c), "rms_norm width");
        assert!(rows <= x.rows && rows <= out.rows, "rms_norm rows");
        if rows == 0 {
            return;
        }
        let params = RmsNormParams {
            rows: rows as u32,
            cols: c as u32,
            eps,
            _pad: 0,
        };
        let (gx, gy) = self.grid(rows);
        let inner = &mut *self.lock();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::RmsNorm),
            &[wv, &x.buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    /// `out = silu(gate) · up` from `gate_up [rows, 2F]`: the trait's `silu_mul`.
    pub(super) fn record_silu_mul(&self, gate_up: &WgpuTensor, rows: usize, out: &mut WgpuTensor) {
        let f = out.cols;
        assert_eq!(gate_up.cols, 2 * f, "gate_up width");
        assert!(rows <= gate_up.rows && rows <= out.rows, "silu_mul rows");
        if rows == 0 {
            return;
        }
        let params = SiluMulParams {
            rows: rows as u32,
            ffn: f as u32,
            _pad: [0; 2],
        };
        let (gx, gy) = self.grid((rows * f).div_ceil(WG));
        let inner = &mut *self.lock();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::SiluMul),
            &[&gate_up.buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }

    /// The step's logits rows of `x` into `out`: the trait's `gather_rows`.
    pub(super) fn record_gather_rows(&self, x: &WgpuTensor, batch: &Batch, out: &mut WgpuTensor) {
        let c = x.cols;
        let r = batch.logits_rows.len();
        assert_eq!(out.cols, c, "gather_rows width");
        assert!(r <= out.rows, "gather_rows rows");
        if r == 0 {
            return;
        }
        let (gx, gy) = self.grid((r * c).div_ceil(WG));
        let inner = &mut *self.lock();
        debug_assert_eq!(inner.step.num_rows, r, "begin_step was not called");
        let params = GatherRowsParams {
            num_rows: r as u32,
            cols: c as u32,
            logits_rows_off: inner.step.logits_rows_off,
            _pad: 0,
        };
        let batch_buf = inner.batch_buf.clone();
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::GatherRows),
            &[&x.buf, &batch_buf, &out.buf],
            &params,
            (gx, gy, 1),
        );
    }
}
