//! GPU memory: every buffer wick makes, its id and its share of the bookkeeping.
//!
//! `Allocator` makes every buffer, so [`GpuStats::memory_bytes`](crate::backend::GpuStats::memory_bytes) counts every byte wick holds
//! on the device; a `GpuBuffer`'s id keys the bind-group cache, and the cache entries that
//! bind a buffer are dropped with its last handle (a bind group would otherwise keep the
//! buffer, and its memory, alive). Activations ([`WgpuTensor`]) are dense row-major f32
//! `[rows, cols]` storage buffers: the CPU backend's layout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::step::BindKey;
use super::WgpuBackend;

/// A GPU buffer with an id that bind-group caching can key on (cloning shares the buffer).
/// Its bytes count in [`GpuStats::memory_bytes`](crate::backend::GpuStats::memory_bytes) until the last clone is dropped.
#[derive(Clone)]
pub(super) struct GpuBuffer {
    pub(super) id: u64,
    pub(super) buf: wgpu::Buffer,
    _mem: Arc<MemShare>,
}

/// Cached bind groups by the buffers they bind. A bind group keeps its buffers alive, so
/// the entries that bind a buffer go when the buffer's last handle does.
pub(super) type BindCache = Mutex<HashMap<BindKey, wgpu::BindGroup>>;

/// A buffer's share of the backend's bookkeeping, given back when its last handle drops:
/// its bytes in the count of live GPU memory, and the cached bind groups that bind it
/// (which would otherwise keep the buffer, and its memory, alive).
struct MemShare {
    id: u64,
    bytes: u64,
    live: Arc<AtomicU64>,
    bind_groups: std::sync::Weak<BindCache>,
}

impl Drop for MemShare {
    fn drop(&mut self) {
        self.live.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(cache) = self.bind_groups.upgrade() {
            // Never reached with the cache locked: nothing drops a buffer while holding it.
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|k, _| !k.ids.contains(&self.id));
        }
    }
}

/// Where buffers get their ids and their bytes counted: every GPU buffer wick makes is made
/// here, so the count is every byte wick holds on the device.
pub(super) struct Allocator {
    next_id: AtomicU64,
    live: Arc<AtomicU64>,
    pub(super) bind_groups: Arc<BindCache>,
}

impl Allocator {
    /// An allocator that has made nothing yet.
    pub(super) fn new() -> Self {
        Allocator {
            next_id: AtomicU64::new(0),
            live: Arc::new(AtomicU64::new(0)),
            bind_groups: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Bytes of the buffers alive now.
    pub(super) fn live_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// A buffer described by `desc`, counted until its last handle drops.
    pub(super) fn create(&self, device: &wgpu::Device, desc: &wgpu::BufferDescriptor) -> GpuBuffer {
        let buf = device.create_buffer(desc);
        self.live.fetch_add(desc.size, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        GpuBuffer {
            id,
            buf,
            _mem: Arc::new(MemShare {
                id,
                bytes: desc.size,
                live: self.live.clone(),
                bind_groups: Arc::downgrade(&self.bind_groups),
            }),
        }
    }
}

/// An f32 activation matrix `[rows, cols]` in a storage buffer.
pub struct WgpuTensor {
    pub(super) buf: GpuBuffer,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl WgpuTensor {
    /// Row capacity.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl WgpuBackend {
    /// An uninitialised buffer of at least `size` bytes (at least 16, a multiple of 4).
    pub(super) fn buffer(&self, size: u64, usage: wgpu::BufferUsages, label: &str) -> GpuBuffer {
        self.alloc.create(
            &self.ctx.device,
            &wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(16).next_multiple_of(4),
                usage,
                mapped_at_creation: false,
            },
        )
    }

    /// A storage buffer filled with `bytes` (padded to 4).
    pub(super) fn upload(&self, bytes: &[u8], label: &str) -> GpuBuffer {
        let size = (bytes.len() as u64).max(16).next_multiple_of(4);
        let b = self.alloc.create(
            &self.ctx.device,
            &wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: true,
            },
        );
        b.buf
            .slice(..)
            .get_mapped_range_mut()
            .expect("freshly mapped")
            .slice(..bytes.len())
            .copy_from_slice(bytes);
        b.buf.unmap();
        b
    }

    /// An f32 activation `[rows, cols]`.
    pub(super) fn new_tensor(&self, rows: usize, cols: usize) -> WgpuTensor {
        let bytes = (rows * cols * 4) as u64;
        // Activation sizes follow from the model's configuration and the step size the
        // caller chose; one that cannot be bound is a configuration the GPU cannot run.
        assert!(
            bytes <= self.ctx.limits.max_storage_buffer_binding_size,
            "an activation of {rows}×{cols} f32 ({bytes} bytes) exceeds the adapter's \
             max_storage_buffer_binding_size ({} bytes); use a smaller prefill chunk",
            self.ctx.limits.max_storage_buffer_binding_size
        );
        WgpuTensor {
            buf: self.buffer(
                bytes,
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                "wick activation",
            ),
            rows,
            cols,
        }
    }
}
