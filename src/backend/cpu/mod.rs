//! The CPU backend: f32 activations in host memory, weights read in place from the memory
//! map, work spread over a rayon pool of `--threads` threads.
//!
//! Kernels: [`matmul`] (all weight formats), [`attention`] (paged, causal, GQA), and the
//! row-wise ops in this file. Quantized weights meet 8-bit activations ([`q8`], the default)
//! or 16-bit ones ([`qdot`], [`ActQuant::Q16`]); float work is in [`simd`]. The instruction-set
//! tier of every kernel ([`isa::Isa`]) is chosen once per process.

pub mod attention;
pub mod isa;
pub mod matmul;
pub mod q8;
pub mod qdot;
pub mod simd;

use rayon::prelude::*;

use super::{AttentionDims, Backend, Batch, KvLayout, RowSampling};
use crate::error::{Error, Result};
use crate::loader::HostTensor;
use crate::quant::dequantize_row;

/// How activations are quantized before they meet quantized weights in a matmul.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// 8 bits per value, a scale per 32 (llama.cpp's choice): the fastest; moves logits by
    /// a few hundredths (measured in the GGUF oracle tests and by `wick perplexity
    /// --kl-divergence`).
    #[default]
    Q8,
    /// 16 bits per value, a scale per 32: logits within about 1e-4 of f32 math on the
    /// dequantized weights.
    Q16,
    /// No quantization: weights are widened to f32 (exact, slowest).
    F32,
}

impl ActQuant {
    /// Parses `q8`, `q16` or `f32`.
    pub fn parse(s: &str) -> Option<ActQuant> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8" | "int8" | "8" => Some(ActQuant::Q8),
            "q16" | "int16" | "16" => Some(ActQuant::Q16),
            "f32" | "exact" => Some(ActQuant::F32),
            _ => None,
        }
    }

    /// `q8`, `q16` or `f32`.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::Q8 => "q8",
            ActQuant::Q16 => "q16",
            ActQuant::F32 => "f32",
        }
    }
}

/// `x.round() as i32` (half away from zero) without a call into libm, whose `roundf` is a
/// slow software routine in musl (static builds) and blocks vectorization everywhere. Exact
/// for |x| < 2^31: the truncation is exact and so is the fraction it leaves; NaN gives 0.
#[inline(always)]
pub(crate) fn round_half_away(x: f32) -> i32 {
    let t = x as i32;
    let frac = x - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

/// The CPU backend.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
    /// Activation precision of quantized matmuls.
    act: ActQuant,
    /// Survivors of the sampling filters, up to `[V]`, kept across steps.
    sample_scratch: std::sync::Mutex<Vec<(u32, f32)>>,
    /// Time spent making weights (all of it re-layout: the CPU reads the map in place).
    weight_times: std::sync::Mutex<crate::loader::LoadTimes>,
}

impl CpuBackend {
    /// A backend on `threads` threads with 8-bit activations; 0 takes one per CPU the
    /// process may use ([`crate::resources::Fences::default_threads`]: the affinity mask
    /// and the cgroup CPU quota).
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_act(threads, ActQuant::default())
    }

    /// A backend on `threads` threads whose quantized matmuls quantize activations as `act`.
    pub fn with_act(threads: usize, act: ActQuant) -> Result<Self> {
        let threads = match threads {
            0 => crate::resources::Fences::detect().default_threads(),
            n => n,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("wick-cpu-{i}"))
            .build()
            .map_err(|e| Error::Device(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            pool,
            act,
            sample_scratch: Default::default(),
            weight_times: Default::default(),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// The activation precision of quantized matmuls.
    pub fn act(&self) -> ActQuant {
        self.act
    }
}

/// An f32 activation matrix.
pub struct CpuTensor {
    data: Vec<f32>,
    cols: usize,
}

impl CpuTensor {
    /// The first `rows` rows.
    pub fn rows(&self, rows: usize) -> &[f32] {
        &self.data[..rows * self.cols]
    }
}

/// A weight: one or more stored tensors stacked by rows, read in place.
pub struct CpuWeight {
    parts: Vec<HostTensor>,
    /// Total rows (N of a matmul).
    rows: usize,
    /// Columns (K of a matmul).
    cols: usize,
    /// An f32 copy when the weight is a single vector (norm weights are read every step).
    vector: Option<Vec<f32>>,
    /// Each part re-laid with rows interleaved for the 8-bit kernels ([`q8::interleave`]),
    /// where the tier and format have that layout; then the stored bytes are not read by
    /// matmuls.
    interleaved: Vec<Option<q8::interleave::Interleaved>>,
}

impl CpuWeight {
    /// Stacks `parts` by rows; they must agree on the number of columns.
    pub fn new(parts: &[&HostTensor]) -> Result<Self> {
        let (rows, cols) = super::stacked_shape(parts)?;
        let first = parts[0];
        let vector = (parts.len() == 1 && first.shape.len() == 1).then(|| first.to_f32());
        Ok(CpuWeight {
            parts: parts.iter().map(|p| (*p).clone()).collect(),
            rows,
            cols,
            vector,
            interleaved: parts.iter().map(|_| None).collect(),
        })
    }

    /// Interleaves every part whose format has an interleaved layout on `isa` (matrices
    /// only).
    fn interleave(&mut self, isa: isa::Isa) {
        let Some(r) = q8::interleave_rows(isa) else {
            return;
        };
        for (p, slot) in self.parts.iter().zip(&mut self.interleaved) {
            if p.shape.len() == 2 && q8::interleave::Interleaved::supported(p.dtype) {
                let (n, k) = p.rows_cols();
                if k.is_multiple_of(p.dtype.block_elems()) {
                    *slot = Some(q8::interleave::Interleaved::new(
                        p.dtype,
                        p.data.as_slice(),
                        n,
                        k,
                        r,
                    ));
                }
            }
        }
    }

    /// Dequantizes row `r` into `dst`.
    fn row_to_f32(&self, mut r: usize, dst: &mut [f32]) {
        for p in &self.parts {
            let pr = p.rows_cols().0;
            if r < pr {
                let rb = p.dtype.bytes_for(self.cols).expect("validated");
                dequantize_row(p.dtype, &p.data.as_slice()[r * rb..(r + 1) * rb], dst);
                return;
            }
            r -= pr;
        }
        panic!("row out of range");
    }

    fn vector(&self) -> &[f32] {
        self.vector.as_deref().expect("a norm weight is a vector")
    }
}

/// K and V pools of every layer ([`attention::KvPool`]).
pub struct CpuKvCache {
    layout: KvLayout,
    k: Vec<attention::KvPool>,
    v: Vec<attention::KvPool>,
}

/// `out = x / rms(x) * w` on one row.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * inv * wi;
    }
}

/// Rotate-half RoPE of one head at angles given by `cos`/`sin` (`[D/2]` each).
fn rope_head(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;

    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {}, {} activations)",
            self.threads(),
            simd::isa_name(),
            self.act.name()
        )
    }

    fn weight(&self, parts: &[&HostTensor]) -> Result<CpuWeight> {
        let start = std::time::Instant::now();
        let mut w = CpuWeight::new(parts)?;
        if self.act == ActQuant::Q8 {
            self.pool.install(|| w.interleave(isa::Isa::current()));
        }
        let mut t = self.weight_times.lock().unwrap_or_else(|e| e.into_inner());
        t.repack += start.elapsed();
        Ok(w)
    }

    fn weight_times(&self) -> crate::loader::LoadTimes {
        *self.weight_times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tensor(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            data: vec![0.0; rows * cols],
            cols,
        }
    }

    fn kv_cache(&self, layout: KvLayout) -> Result<CpuKvCache> {
        Ok(CpuKvCache {
            layout,
            k: (0..layout.num_layers)
                .map(|_| attention::KvPool::zeroed(&layout))
                .collect(),
            v: (0..layout.num_layers)
                .map(|_| attention::KvPool::zeroed(&layout))
                .collect(),
        })
    }

    fn run_step(&self, step: &mut (dyn FnMut() + Send)) {
        self.pool.install(step)
    }

    fn begin_step(&self, batch: &Batch) {
        debug_assert!(batch.num_tokens() > 0);
    }

    fn embed(&self, table: &CpuWeight, batch: &Batch, out: &mut CpuTensor) {
        let c = out.cols;
        assert_eq!(table.cols, c);
        self.pool.install(|| {
            out.data[..batch.num_tokens() * c]
                .par_chunks_mut(c)
                .zip(&batch.token_ids)
                .for_each(|(o, &id)| table.row_to_f32(id as usize, o));
        });
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32, rows: usize, out: &mut CpuTensor) {
        let c = x.cols;
        let w = w.vector();
        assert_eq!(w.len(), c);
        self.pool.install(|| {
            out.data[..rows * c]
                .par_chunks_mut(c)
                .zip(x.data[..rows * c].par_chunks(c))
                .for_each(|(o, xr)| rms_norm_row(xr, w, eps, o));
        });
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight, rows: usize, out: &mut CpuTensor) {
        assert_eq!((x.cols, out.cols), (w.cols, w.rows));
        self.pool
            .install(|| matmul::matmul(&x.data, w, rows, &mut out.data, false, self.act));
    }

    fn matmul_add(&self, x: &CpuTensor, w: &CpuWeight, rows: usize, out: &mut CpuTensor) {
        assert_eq!((x.cols, out.cols), (w.cols, w.rows));
        self.pool
            .install(|| matmul::matmul(&x.data, w, rows, &mut out.data, true, self.act));
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CpuTensor,
        q_norm: Option<&CpuWeight>,
        k_norm: Option<&CpuWeight>,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        let d = dims.head_dim;
        let width = dims.qkv_width();
        assert_eq!(qkv.cols, width);
        let qk_heads = dims.num_heads + dims.num_kv_heads;
        // Inverse frequencies in f32, computed as transformers does, so that angles at long
        // positions round the same way.
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / dims.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let (qn, kn) = (q_norm.map(CpuWeight::vector), k_norm.map(CpuWeight::vector));
        self.pool.install(|| {
            qkv.data[..batch.num_tokens() * width]
                .par_chunks_mut(width)
                .zip(&batch.positions)
                .for_each_init(
                    || (vec![0.0f32; d / 2], vec![0.0f32; d / 2], vec![0.0f32; d]),
                    |(cos, sin, tmp), (row, &pos)| {
                        for i in 0..d / 2 {
                            let angle = pos as f32 * inv_freq[i];
                            cos[i] = angle.cos();
                            sin[i] = angle.sin();
                        }
                        for (hd, head) in row[..qk_heads * d].chunks_exact_mut(d).enumerate() {
                            let norm = if hd < dims.num_heads { qn } else { kn };
                            if let Some(w) = norm {
                                tmp.copy_from_slice(head);
                                rms_norm_row(tmp, w, dims.eps, head);
                            }
                            rope_head(head, cos, sin);
                        }
                    },
                );
        });
    }

    fn kv_write(
        &self,
        qkv: &CpuTensor,
        cache: &mut CpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
    ) {
        assert_eq!(qkv.cols, dims.qkv_width());
        let (k, v) = (&mut cache.k[layer], &mut cache.v[layer]);
        attention::kv_write(&qkv.data, k, v, &cache.layout, dims, batch);
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        dims: AttentionDims,
        batch: &Batch,
        out: &mut CpuTensor,
    ) {
        assert_eq!(out.cols, dims.num_heads * dims.head_dim);
        self.pool.install(|| {
            attention::attention(
                &qkv.data,
                &cache.k[layer],
                &cache.v[layer],
                &cache.layout,
                dims,
                batch,
                &mut out.data,
            )
        });
    }

    fn silu_mul(&self, gate_up: &CpuTensor, rows: usize, out: &mut CpuTensor) {
        let f = out.cols;
        assert_eq!(gate_up.cols, 2 * f);
        self.pool.install(|| {
            out.data[..rows * f]
                .par_chunks_mut(f)
                .zip(gate_up.data[..rows * 2 * f].par_chunks(2 * f))
                .for_each(|(o, gu)| {
                    let (g, u) = gu.split_at(f);
                    simd::silu_mul(g, u, o);
                });
        });
    }

    fn gather_rows(&self, x: &CpuTensor, batch: &Batch, out: &mut CpuTensor) {
        let c = x.cols;
        assert_eq!(out.cols, c);
        for (i, &r) in batch.logits_rows.iter().enumerate() {
            let r = r as usize;
            out.data[i * c..(i + 1) * c].copy_from_slice(&x.data[r * c..(r + 1) * c]);
        }
    }

    fn read(&self, t: &CpuTensor, rows: usize, dst: &mut [f32]) {
        dst.copy_from_slice(&t.data[..rows * t.cols]);
    }

    fn tensor_cols(&self, t: &CpuTensor) -> usize {
        t.cols
    }

    fn sample(
        &self,
        logits: &CpuTensor,
        rows: usize,
        params: &[RowSampling],
        masks: &[u32],
        out: &mut [u32],
    ) {
        assert_eq!(params.len(), rows, "one RowSampling per row");
        assert_eq!(out.len(), rows, "one id per row");
        // The logits are already on the host: sample them in place.
        let mut scratch = self
            .sample_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        super::sample::sample_rows(
            logits.rows(rows),
            logits.cols,
            params,
            masks,
            out,
            &mut scratch,
        );
    }
}

#[cfg(test)]
mod round_tests {
    use super::round_half_away;

    #[test]
    fn round_half_away_is_f32_round() {
        let mut x = -140.0f32;
        while x <= 140.0 {
            for v in [
                x,
                x + 0.5,
                x - 0.5,
                x + 0.499_999_97,
                f32::from_bits(x.to_bits() + 1),
            ] {
                assert_eq!(round_half_away(v), v.round() as i32, "{v}");
            }
            x += 0.125;
        }
        for v in [
            0.499_999_97f32,
            -0.499_999_97,
            2.5,
            -2.5,
            1e9,
            -1e9,
            0.0,
            -0.0,
        ] {
            assert_eq!(round_half_away(v), v.round() as i32, "{v}");
        }
        assert_eq!(round_half_away(f32::NAN), 0);
    }
}
