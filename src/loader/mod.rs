//! Turning files on disk into named weight tensors.
//!
//! A checkpoint is read into a [`TensorSet`]: named [`HostTensor`]s whose bytes stay in the
//! memory map of the file they came from ([`Bytes`]). The model then looks tensors up by their
//! Hugging Face names; formats whose names differ (GGUF) translate through the single table in
//! [`names`]. Nothing is copied until a backend decides to (the CPU backend reads the map
//! in place; a GPU backend uploads once).
//!
//! - [`safetensors`]: Hugging Face `model.safetensors` and sharded checkpoints.
//! - [`quantization`]: `quantization_config` read, and the packed weights it describes
//!   converted: [`fp8`] (into Q8_0), [`gptq`], [`awq`] and [`compressed_tensors`] (through
//!   [`grouped`], into Q4_0, Q4_1 or Q8_0 where that is exact), the float embedding beside
//!   them into Q8_0; other methods refused.
//! - [`gguf`]: llama.cpp's GGUF files (quantized weights, tokenizer and template in one file).
//! - [`gguf_write`]: writing GGUF files (`wick quantize`).
//! - [`names`]: the GGUF → Hugging Face tensor name table.
//! - [`hub`]: resolving `--model` (a local directory or a Hub id) to files on disk.
//! - [`times`]: how long each phase of loading took ([`LoadTimes`]).
//!
//! Loading reports its progress to a [`Progress`] callback: Hub downloads (bytes), load-time
//! quantization and putting the weights on the device (tensors).
//!
//! Files are checked whole when they are loaded: every tensor must lie inside its file, so a
//! truncated file is refused, with the sizes, before anything runs. A file changed after
//! loading is another matter, since its bytes are the map's (`MAP_SHARED`, read-only). A new
//! file renamed over it (as downloaders, the Hub cache and `mv` do) leaves the mapped one
//! intact until it is unmapped. A file truncated in place takes the mapped pages away: the
//! next read of them raises SIGBUS, which no check at load can prevent (`wick serve` says so
//! before it dies, and a restart refuses the file). A file rewritten in place changes the
//! bytes the CPU backend reads in place.

pub mod awq;
pub mod checkpoint;
pub mod compressed_tensors;
pub mod fp8;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod gptq;
pub mod grouped;
pub mod hub;
pub mod names;
pub mod quantization;
pub mod safetensors;
pub mod times;

pub use self::times::LoadTimes;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::quant::DType;

/// A shared, immutable byte range: a slice of a memory map, or of an owned buffer.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Bytes {
    /// Bytes `range` of `owner`. Panics if the range is out of bounds (callers check first).
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= (*owner).as_ref().len());
        Bytes { owner, range }
    }

    /// Takes ownership of a vector.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes {
            owner: Arc::new(v),
            range: 0..len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

/// A weight tensor in host memory, as stored in its file.
///
/// `shape` is outermost-first as in PyTorch: a linear layer's weight is `[out, in]` and each
/// of its `out` rows holds `in` elements (whole quantization blocks).
#[derive(Clone, Debug)]
pub struct HostTensor {
    /// The tensor's Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Element storage format.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The raw bytes: exactly `dtype.bytes_for(shape.product())`.
    pub data: Bytes,
}

impl HostTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `[rows, cols]` of a tensor seen as a matrix (a vector is one row).
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r @ .., c] => (r.iter().product(), *c),
        }
    }

    /// Dequantizes the whole tensor to f32 with the scalar reference.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        crate::quant::dequantize_row(self.dtype, self.data.as_slice(), &mut out);
        out
    }
}

/// What loading has done so far, as a [`Progress`] callback sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadProgress {
    /// A file is being downloaded from the Hub: bytes of it done and in all.
    Download {
        /// The file's path in the repository.
        file: String,
        /// Bytes on disk.
        done: u64,
        /// The file's size.
        total: u64,
    },
    /// Float weights are being quantized at load: tensors done and in all.
    Quantize {
        /// Tensors done.
        done: usize,
        /// Tensors in all.
        total: usize,
    },
    /// The weights are being put on the device: tensors done and in all.
    Load {
        /// Tensors done.
        done: usize,
        /// Tensors in all.
        total: usize,
    },
}

/// A callback that receives [`LoadProgress`], from whichever thread does the work.
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn(&LoadProgress) + Send + Sync>);

impl Progress {
    /// Wraps a callback.
    pub fn new(f: impl Fn(&LoadProgress) + Send + Sync + 'static) -> Self {
        Progress(Arc::new(f))
    }

    /// Reports `p`.
    pub fn report(&self, p: LoadProgress) {
        (self.0)(&p)
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress(..)")
    }
}

impl PartialEq for Progress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Progress {}

/// Converts `t` to `dtype` (through f32), rows in parallel on the rayon pool.
///
/// Errors if the rows are not whole blocks of `dtype` or the tensor holds NaN or infinity
/// (the quantizers' scale searches would produce garbage).
pub fn convert_tensor(t: &HostTensor, dtype: DType) -> Result<HostTensor> {
    if t.dtype == dtype {
        return Ok(t.clone());
    }
    let (rows, cols) = t.rows_cols();
    let in_row = t.dtype.bytes_for(cols);
    let out_row = dtype.bytes_for(cols);
    let (Some(in_row), Some(out_row)) = (in_row, out_row) else {
        return Err(Error::InvalidRequest(format!(
            "cannot store tensor `{}` ({} per row) as {dtype}: rows are not whole blocks",
            t.name, cols
        )));
    };
    let src = t.data.as_slice();
    if src.len() < rows * in_row {
        return Err(Error::ShapeMismatch {
            name: t.name.clone(),
            expected: t.shape.clone(),
            found: vec![src.len()],
        });
    }
    let mut out = vec![0u8; rows * out_row];
    // Groups of rows big enough to amortise rayon's overhead on narrow matrices.
    let per_job = (65536 / cols.max(1)).max(1);
    out.par_chunks_mut(per_job * out_row)
        .zip(src[..rows * in_row].par_chunks(per_job * in_row))
        .try_for_each(|(dst, src)| {
            let mut f = vec![0f32; cols];
            for (d, s) in dst.chunks_exact_mut(out_row).zip(src.chunks_exact(in_row)) {
                crate::quant::dequantize_row(t.dtype, s, &mut f);
                if f.iter().any(|v| !v.is_finite()) {
                    return Err(Error::InvalidRequest(format!(
                        "cannot quantize tensor `{}`: it holds NaN or infinite values",
                        t.name
                    )));
                }
                crate::quant::quantize_row(dtype, &f, d);
            }
            Ok(())
        })?;
    Ok(HostTensor {
        name: t.name.clone(),
        dtype,
        shape: t.shape.clone(),
        data: Bytes::from_vec(out),
    })
}

/// The tensors of a checkpoint, by Hugging Face name.
#[derive(Default, Debug)]
pub struct TensorSet {
    tensors: BTreeMap<String, HostTensor>,
}

impl TensorSet {
    /// Adds a tensor; a second tensor with the same name is an error.
    pub fn insert(&mut self, t: HostTensor) -> Result<()> {
        if self.tensors.contains_key(&t.name) {
            return Err(Error::UnsupportedModel(format!(
                "tensor `{}` appears twice in the checkpoint",
                t.name
            )));
        }
        self.tensors.insert(t.name.clone(), t);
        Ok(())
    }

    /// The tensor called `name`, or [`Error::MissingTensor`].
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// The tensor called `name` if present.
    pub fn try_get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// The tensor called `name`, checked to have exactly `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Takes the tensor called `name` out of the set.
    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Bytes of every tensor's data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.data.len() as u64).sum()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}
