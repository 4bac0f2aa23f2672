//! A step: the batch upload, the recorded dispatches and the one submit and read-back.
//!
//! `upload_batch` (the trait's `begin_step`) writes the batch into one u32 buffer, laid out as
//! `StepLayout` says:
//!
//! ```text
//! token_ids[T] | positions[T] | slot_mapping[T] | row_seq[T] | logits_rows[R] | block_tables[S, stride]
//! ```
//!
//! and kernels get the offsets in their parameters. Every op then appends a compute pass to
//! one command encoder. Each dispatch writes its uniform struct into its own slot of a params
//! page (`SLOTS_PER_PAGE` slots, bound with a dynamic offset); the pages are uploaded just
//! before `submit`, and a new page is made only when a step needs more slots than any before.
//! `read_back` submits the step and does its single blocking read-back. Group-0 bind groups
//! are cached by the ids of the buffers they bind (`BindKey`).

use bytemuck::Pod;

use super::buffers::GpuBuffer;
use super::pipelines::{self, PipelineKey};
use super::{Inner, WgpuBackend, WgpuTensor};
use crate::backend::Batch;

/// Parameter slots per params page.
const SLOTS_PER_PAGE: usize = 64;

/// Where the sections of the batch buffer start (in u32 words) for the current step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StepLayout {
    /// T.
    pub(super) num_tokens: usize,
    /// R.
    pub(super) num_rows: usize,
    pub(super) tokens_off: u32,
    pub(super) positions_off: u32,
    pub(super) slots_off: u32,
    pub(super) row_seq_off: u32,
    pub(super) logits_rows_off: u32,
    pub(super) block_tables_off: u32,
    /// Entries per block-table row: the longest table of the step (at least 1).
    pub(super) block_table_stride: u32,
    /// The largest position of the step (the RoPE table must reach it).
    pub(super) max_position: u32,
}

impl StepLayout {
    /// Writes `batch` into `words` (cleared first) and says where each section starts.
    fn pack(batch: &Batch, words: &mut Vec<u32>) -> StepLayout {
        let t = batch.num_tokens();
        let r = batch.logits_rows.len();
        let stride = batch
            .seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let w = words;
        w.clear();
        w.extend_from_slice(&batch.token_ids);
        w.extend_from_slice(&batch.positions);
        w.extend_from_slice(&batch.slot_mapping);
        for (s, seq) in batch.seqs.iter().enumerate() {
            w.extend(std::iter::repeat_n(s as u32, seq.len as usize));
        }
        // Rows not covered by a sequence (an inconsistent batch) read sequence 0.
        w.resize(4 * t, 0);
        w.extend_from_slice(&batch.logits_rows);
        let bt_off = w.len();
        for seq in &batch.seqs {
            w.extend_from_slice(&seq.block_table);
            w.extend(std::iter::repeat_n(0, stride - seq.block_table.len()));
        }
        StepLayout {
            num_tokens: t,
            num_rows: r,
            tokens_off: 0,
            positions_off: t as u32,
            slots_off: 2 * t as u32,
            row_seq_off: 3 * t as u32,
            logits_rows_off: 4 * t as u32,
            block_tables_off: bt_off as u32,
            block_table_stride: stride as u32,
            max_position: batch.positions.iter().copied().max().unwrap_or(0),
        }
    }
}

/// One page of parameter slots and its bind group.
pub(super) struct ParamsPage {
    buf: GpuBuffer,
    bind_group: wgpu::BindGroup,
    host: Vec<u8>,
}

/// The page and the slot within it of a step's `slot`-th dispatch.
fn slot_place(slot: usize) -> (usize, usize) {
    (slot / SLOTS_PER_PAGE, slot % SLOTS_PER_PAGE)
}

/// Slots of page `page` that `used` slots fill (0 once the page is past them): the part of
/// the page that submit uploads.
fn slots_filled(page: usize, used: usize) -> usize {
    used.saturating_sub(page * SLOTS_PER_PAGE)
        .min(SLOTS_PER_PAGE)
}

/// Workgroup grid for `n` workgroups with at most `max` per dimension: x up to `max`, the rest
/// in y (at least one workgroup).
fn grid_for(n: usize, max: usize) -> (u32, u32) {
    if n <= max {
        (n.max(1) as u32, 1)
    } else {
        (max as u32, n.div_ceil(max) as u32)
    }
}

/// Key of a cached group-0 bind group: the binding signature and the buffers bound.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct BindKey {
    kernel_bindings: &'static [pipelines::Access],
    /// The [`GpuBuffer::id`]s bound, in binding order.
    pub(super) ids: Vec<u64>,
}

impl WgpuBackend {
    /// Writes `batch` into the batch buffer (growing it if needed): the trait's `begin_step`.
    pub(super) fn upload_batch(&self, batch: &Batch) {
        let inner = &mut *self.lock();
        // Work of a step that read nothing back (a prompt chunk without logits) must run
        // before this step's batch overwrites the batch buffer.
        self.submit(inner);
        inner.step = StepLayout::pack(batch, &mut inner.batch_words);
        let bytes = (inner.batch_words.len() * 4) as u64;
        if bytes > inner.batch_buf.buf.size() {
            let new = self.buffer(
                bytes.next_power_of_two(),
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                "wick batch",
            );
            // The old buffer's bind groups go with it.
            inner.batch_buf = new;
        }
        if !inner.batch_words.is_empty() {
            self.ctx.queue.write_buffer(
                &inner.batch_buf.buf,
                0,
                bytemuck::cast_slice(&inner.batch_words),
            );
        }
        inner.stats.steps += 1;
    }

    /// Workgroup grid for `n` workgroups: x up to the per-dimension limit, the rest in y.
    /// Kernels linearise `wid.x + wid.y · num_workgroups.x` and ignore ids past `n`.
    pub(super) fn grid(&self, n: usize) -> (u32, u32) {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension.max(1) as usize;
        grid_for(n, max)
    }

    /// Records one dispatch of `key` with `buffers` as group 0 and `params` as group 1.
    pub(super) fn dispatch<P: Pod>(
        &self,
        inner: &mut Inner,
        key: PipelineKey,
        buffers: &[&GpuBuffer],
        params: &P,
        groups: (u32, u32, u32),
    ) {
        let device = &self.ctx.device;
        let Inner {
            pipelines,
            encoder,
            pages,
            slots_used,
            stats,
            ..
        } = inner;
        let pipe = pipelines.get(device, key);
        let bind_key = BindKey {
            kernel_bindings: key.kernel.bindings(),
            ids: buffers.iter().map(|b| b.id).collect(),
        };
        debug_assert_eq!(buffers.len(), key.kernel.bindings().len());
        let mut cache = self
            .alloc
            .bind_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let group0 = cache
            .entry(bind_key)
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupEntry> = buffers
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: b.buf.as_entire_binding(),
                    })
                    .collect();
                device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &pipe.group0,
                    entries: &entries,
                })
            })
            .clone();
        drop(cache);
        // A slot for the parameters; a new page only when a step needs more than ever before.
        let slot = *slots_used;
        *slots_used += 1;
        let (page, index) = slot_place(slot);
        if page == pages.len() {
            let size = (SLOTS_PER_PAGE * self.slot_bytes) as u64;
            let buf = self.alloc.create(
                device,
                &wgpu::BufferDescriptor {
                    label: Some("wick params"),
                    size,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            );
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("wick params"),
                layout: &pipelines.params_layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &buf.buf,
                        offset: 0,
                        size: wgpu::BufferSize::new(self.slot_bytes as u64),
                    }),
                }],
            });
            pages.push(ParamsPage {
                buf,
                bind_group,
                host: vec![0; size as usize],
            });
        }
        let offset = index * self.slot_bytes;
        let bytes = bytemuck::bytes_of(params);
        pages[page].host[offset..offset + bytes.len()].copy_from_slice(bytes);
        let pipe = pipelines.get(device, key);
        let encoder = encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &group0, &[]);
        pass.set_bind_group(1, &pages[page].bind_group, &[offset as u32]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        stats.dispatches += 1;
    }

    /// Uploads the parameter pages of the recorded work and submits it (no wait).
    pub(super) fn submit(&self, inner: &mut Inner) {
        let Some(encoder) = inner.encoder.take() else {
            return;
        };
        let used = inner.slots_used;
        for (p, page) in inner.pages.iter().enumerate() {
            let n = slots_filled(p, used);
            if n == 0 {
                break;
            }
            self.ctx
                .queue
                .write_buffer(&page.buf.buf, 0, &page.host[..n * self.slot_bytes]);
        }
        inner.slots_used = 0;
        self.ctx.queue.submit([encoder.finish()]);
        inner.stats.submits += 1;
    }

    /// Submits the recorded work, copies the start of `src` into `dst` through the staging
    /// buffer and waits for it: the step's one blocking read-back.
    pub(super) fn read_back<T: Pod>(&self, inner: &mut Inner, src: &wgpu::Buffer, dst: &mut [T]) {
        let bytes = size_of_val(dst) as u64;
        if bytes == 0 {
            self.submit(inner);
            return;
        }
        if inner.staging.as_ref().is_none_or(|s| s.buf.size() < bytes) {
            // The old one (if any) is dropped first, so the count never holds both.
            inner.staging = None;
            inner.staging = Some(self.alloc.create(
                &self.ctx.device,
                &wgpu::BufferDescriptor {
                    label: Some("wick staging"),
                    size: bytes.next_power_of_two().max(1 << 16),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            ));
        }
        let staging = inner.staging.as_ref().expect("made above").buf.clone();
        let device = &self.ctx.device;
        inner
            .encoder
            .get_or_insert_with(|| {
                device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
            })
            .copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        self.submit(inner);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("the GPU device was lost");
        rx.recv()
            .expect("map callback ran")
            .expect("mapping the staging buffer");
        {
            let view = staging.get_mapped_range(0..bytes).expect("mapped above");
            // The mapped range may not be aligned for T: copy bytes.
            bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(&view);
        }
        staging.unmap();
        inner.stats.readbacks += 1;
        inner.stats.readback_bytes += bytes;
    }

    /// The first `rows` rows of `t` into `dst`: the trait's `read`.
    pub(super) fn read_tensor(&self, t: &WgpuTensor, rows: usize, dst: &mut [f32]) {
        assert!(rows <= t.rows, "read rows");
        assert_eq!(dst.len(), rows * t.cols, "read destination length");
        let inner = &mut *self.lock();
        self.read_back(inner, &t.buf.buf, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_layout_places_each_section_after_the_last() {
        // Two sequences: a 3-token prompt chunk at 5..8 and one decode token at position 20.
        let mut batch = Batch::default();
        batch.push_seq(&[11, 12, 13], 5, &[7], 16);
        batch.push_seq(&[14], 20, &[2, 9], 16);
        batch.logits_rows.extend([2, 3]);
        batch.check(16).unwrap();
        let mut words = vec![99; 3];
        let s = StepLayout::pack(&batch, &mut words);
        assert_eq!(
            s,
            StepLayout {
                num_tokens: 4,
                num_rows: 2,
                tokens_off: 0,
                positions_off: 4,
                slots_off: 8,
                row_seq_off: 12,
                logits_rows_off: 16,
                block_tables_off: 18,
                block_table_stride: 2,
                max_position: 20,
            }
        );
        #[rustfmt::skip]
        let expected = [
            11, 12, 13, 14,           // token_ids
            5, 6, 7, 20,              // positions
            117, 118, 119, 9 * 16 + 4, // slot_mapping: block 7 offsets 5..8; block 9 offset 4
            0, 0, 0, 1,               // row_seq
            2, 3,                     // logits_rows
            7, 0, 2, 9,               // block_tables, padded to the longest
        ];
        assert_eq!(words, expected);
        // Each offset points at its section's first word.
        assert_eq!(words[s.positions_off as usize], 5);
        assert_eq!(words[s.slots_off as usize], 117);
        assert_eq!(words[s.logits_rows_off as usize], 2);
        let bt = s.block_tables_off as usize + s.block_table_stride as usize;
        assert_eq!(&words[bt..bt + 2], &[2, 9]);
    }

    #[test]
    fn an_empty_step_still_has_a_block_table_stride() {
        let mut words = Vec::new();
        let s = StepLayout::pack(&Batch::default(), &mut words);
        assert!(words.is_empty());
        assert_eq!(
            (s.num_tokens, s.block_table_stride, s.max_position),
            (0, 1, 0)
        );
    }

    #[test]
    fn params_slots_fill_pages_in_order() {
        assert_eq!(slot_place(0), (0, 0));
        assert_eq!(slot_place(SLOTS_PER_PAGE - 1), (0, SLOTS_PER_PAGE - 1));
        assert_eq!(slot_place(SLOTS_PER_PAGE), (1, 0));
        assert_eq!(slot_place(2 * SLOTS_PER_PAGE + 5), (2, 5));
        // Submit uploads exactly the slots used, page by page.
        let used = SLOTS_PER_PAGE + 3;
        assert_eq!(slots_filled(0, used), SLOTS_PER_PAGE);
        assert_eq!(slots_filled(1, used), 3);
        assert_eq!(slots_filled(2, used), 0);
        assert_eq!(slots_filled(0, 0), 0);
        for used in [1, 7, 64, 65, 200] {
            let total: usize = (0..10).map(|p| slots_filled(p, used)).sum();
            assert_eq!(total, used);
            let last = slot_place(used - 1);
            assert_eq!(slots_filled(last.0, used), last.1 + 1);
        }
    }

    #[test]
    fn grids_spill_into_y_past_the_dimension_limit() {
        assert_eq!(grid_for(0, 65535), (1, 1));
        assert_eq!(grid_for(65535, 65535), (65535, 1));
        assert_eq!(grid_for(65536, 65535), (65535, 2));
        let (x, y) = grid_for(1_000_000, 100);
        assert!((x * y) as usize >= 1_000_000 && x == 100);
    }
}
