//! Sampling on the GPU: one token id per row read back instead of the logits.
//!
//! Each row's [`RowSampling`] choices and the step's token masks (grammar constraints) go up in
//! two small buffers that grow to the most rows seen; `sample.wgsl` writes one id per row, and
//! that is the step's one read-back.

use super::params::*;
use super::pipelines::{Kernel, PipelineKey};
use super::{WgpuBackend, WgpuTensor};
use crate::backend::RowSampling;

impl WgpuBackend {
    /// Picks one token per row of `logits`: the trait's `sample`.
    pub(super) fn sample_rows(
        &self,
        logits: &WgpuTensor,
        rows: usize,
        params: &[RowSampling],
        masks: &[u32],
        out: &mut [u32],
    ) {
        assert!(rows <= logits.rows, "sample rows");
        assert_eq!(params.len(), rows, "one RowSampling per row");
        assert_eq!(out.len(), rows, "one id per row");
        let inner = &mut *self.lock();
        if rows == 0 {
            self.submit(inner);
            return;
        }
        // Per-row choices in, ids out: two small buffers that grow to the most rows seen.
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let choice_bytes = size_of_val(params) as u64;
        if inner
            .sampling
            .as_ref()
            .is_none_or(|b| b.buf.size() < choice_bytes)
        {
            let new = self.buffer(choice_bytes.next_power_of_two(), usage, "wick sampling");
            // The old buffer's bind groups go with it.
            inner.sampling = Some(new);
        }
        let id_bytes = (rows * 4) as u64;
        if inner
            .sample_ids
            .as_ref()
            .is_none_or(|b| b.buf.size() < id_bytes)
        {
            let new = self.buffer(
                id_bytes.next_power_of_two(),
                usage | wgpu::BufferUsages::COPY_SRC,
                "wick sampled ids",
            );
            // The old buffer's bind groups go with it.
            inner.sample_ids = Some(new);
        }
        // Masks only for the rows that have one; a word stands in when no row has.
        let mask_bytes = (size_of_val(masks) as u64).max(4);
        if inner
            .sample_masks
            .as_ref()
            .is_none_or(|b| b.buf.size() < mask_bytes)
        {
            let new = self.buffer(mask_bytes.next_power_of_two(), usage, "wick token masks");
            // The old buffer's bind groups go with it.
            inner.sample_masks = Some(new);
        }
        let sampling = inner.sampling.clone().expect("made above");
        let ids = inner.sample_ids.clone().expect("made above");
        let mask_buf = inner.sample_masks.clone().expect("made above");
        // Lands before the submit below, so before the dispatch runs.
        self.ctx
            .queue
            .write_buffer(&sampling.buf, 0, bytemuck::cast_slice(params));
        if !masks.is_empty() {
            self.ctx
                .queue
                .write_buffer(&mask_buf.buf, 0, bytemuck::cast_slice(masks));
        }
        let sp = SampleParams {
            num_rows: rows as u32,
            vocab: logits.cols as u32,
            _pad: [0; 2],
        };
        let (gx, gy) = self.grid(rows);
        self.dispatch(
            inner,
            PipelineKey::plain(Kernel::Sample),
            &[&logits.buf, &sampling, &ids, &mask_buf],
            &sp,
            (gx, gy, 1),
        );
        self.read_back(inner, &ids.buf, out);
    }
}
