//! Hugging Face safetensors checkpoints, memory-mapped.
//!
//! A model directory holds either one `model.safetensors` or an index
//! `model.safetensors.index.json` whose `weight_map` names the shard of every tensor. Each
//! file is mapped once; tensors are [`Bytes`] ranges of the map, so a bf16 checkpoint costs
//! no copy and no extra memory. The header is parsed by the `safetensors` crate, which checks
//! offsets against the file size.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::quantization::QuantScheme;
use super::{Bytes, HostTensor, LoadTimes, TensorSet};
use crate::error::{Error, Result};
use crate::quant::DType;

/// A memory map that can be shared by many [`Bytes`].
struct MappedFile(Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Loads every tensor of the checkpoint in `dir` (single file or sharded). With a
/// quantization scheme, its packed weights become tensors wick computes with
/// ([`super::quantization`]).
pub fn load_dir_with(dir: &Path, scheme: Option<QuantScheme>) -> Result<TensorSet> {
    load_dir_timed(dir, scheme, &mut LoadTimes::default())
}

/// [`load_dir_with`], adding the time the conversion of quantized weights takes to
/// `times.repack`.
pub fn load_dir_timed(
    dir: &Path,
    scheme: Option<QuantScheme>,
    times: &mut LoadTimes,
) -> Result<TensorSet> {
    let mut raw = Vec::new();
    let mut set = load_files(dir, &mut raw)?;
    match scheme {
        Some(scheme) => {
            let start = std::time::Instant::now();
            super::quantization::convert(scheme, raw, &mut set)?;
            times.repack += start.elapsed();
        }
        None => {
            if let Some(t) = raw.first() {
                return Err(Error::UnsupportedDType {
                    name: t.name.clone(),
                    dtype: format!(
                        "{:?} (a quantized tensor, but config.json has no quantization_config)",
                        t.dtype
                    ),
                });
            }
        }
    }
    Ok(set)
}

/// Loads every tensor of the checkpoint in `dir` (single file or sharded); quantized
/// tensors (FP8, packed integers) are refused.
pub fn load_dir(dir: &Path) -> Result<TensorSet> {
    load_dir_with(dir, None)
}

/// A tensor of a type wick does not compute with, as read: FP8 (`F8_E4M3`) weights and the
/// integer tensors of packed formats (`I32` `qweight`, `I64` `weight_shape`, …). The
/// quantization readers turn them into [`HostTensor`]s.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// The tensor's name, with the `model.` prefix as for [`HostTensor`]s.
    pub name: String,
    /// Its type in the file.
    pub dtype: RawDType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The bytes, `shape.product() * dtype.size()` of them.
    pub data: Bytes,
}

/// The element types a [`RawTensor`] may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum RawDType {
    /// float8 e4m3 (`float8_e4m3fn`).
    F8_E4M3,
    /// Signed 8-bit integers.
    I8,
    /// Unsigned 8-bit integers.
    U8,
    /// Signed 16-bit integers.
    I16,
    /// Signed 32-bit integers (packed integer weights).
    I32,
    /// Signed 64-bit integers.
    I64,
}

impl RawDType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            RawDType::F8_E4M3 | RawDType::I8 | RawDType::U8 => 1,
            RawDType::I16 => 2,
            RawDType::I32 => 4,
            RawDType::I64 => 8,
        }
    }
}

impl RawTensor {
    /// The elements as i64, whatever the integer type (`None` for FP8).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let b = self.data.as_slice();
        Some(match self.dtype {
            RawDType::F8_E4M3 => return None,
            RawDType::I8 => b.iter().map(|&v| v as i8 as i64).collect(),
            RawDType::U8 => b.iter().map(|&v| v as i64).collect(),
            RawDType::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            RawDType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            RawDType::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        })
    }
}

fn load_files(dir: &Path, raw: &mut Vec<RawTensor>) -> Result<TensorSet> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut set = TensorSet::default();
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::json(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::json(&index, "no `weight_map` object"))?;
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        for shard in shards {
            // Shard names come from a file; refuse anything that would leave the directory.
            if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                return Err(Error::json(
                    &index,
                    format!("bad shard file name `{shard}`"),
                ));
            }
            load_file(&dir.join(shard), &mut set, raw)?;
        }
    } else if single.exists() {
        load_file(&single, &mut set, raw)?;
    } else {
        return Err(Error::UnsupportedModel(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )));
    }
    Ok(set)
}

/// Maps one `.safetensors` file and adds its tensors to `set`.
pub fn load_file_into(path: &Path, set: &mut TensorSet) -> Result<()> {
    let mut raw = Vec::new();
    load_file(path, set, &mut raw)?;
    match raw.first() {
        Some(t) => Err(Error::UnsupportedDType {
            name: t.name.clone(),
            dtype: format!("{:?}", t.dtype),
        }),
        None => Ok(()),
    }
}

/// [`load_file_into`], keeping FP8 and integer tensors aside in `raw`.
fn load_file(path: &Path, set: &mut TensorSet, raw: &mut Vec<RawTensor>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only; wick never writes to checkpoint files, and a file
    // truncated by another process while mapped is outside what any mmap loader can defend.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let owner = Arc::new(MappedFile(mmap));
    let bytes: &[u8] = (*owner).as_ref();
    let malformed = |message: String| Error::MalformedWeights {
        path: path.to_path_buf(),
        message,
    };
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| malformed(describe_header_error(&e, bytes)))?;
    let data_start = 8 + header_len;
    for (name, info) in meta.tensors() {
        // `Err`: an FP8 or integer tensor, kept aside for [`super::quantization`].
        use safetensors::Dtype as S;
        let dtype = match info.dtype {
            S::F32 => Ok(DType::F32),
            S::F16 => Ok(DType::F16),
            S::BF16 => Ok(DType::BF16),
            S::F8_E4M3 => Err(RawDType::F8_E4M3),
            S::I8 => Err(RawDType::I8),
            S::U8 => Err(RawDType::U8),
            S::I16 => Err(RawDType::I16),
            S::I32 => Err(RawDType::I32),
            S::I64 => Err(RawDType::I64),
            other => {
                return Err(Error::UnsupportedDType {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| malformed(format!("tensor `{name}`: shape overflows")))?;
        let expected = match dtype {
            Ok(d) => d.bytes_for(numel),
            Err(r) => numel.checked_mul(r.size()),
        };
        if expected != Some(end.saturating_sub(start)) {
            let dtype = match dtype {
                Ok(d) => d.to_string(),
                Err(r) => format!("{r:?}"),
            };
            return Err(malformed(format!(
                "tensor `{name}`: {} bytes for shape {:?} of {dtype}",
                end.saturating_sub(start),
                info.shape
            )));
        }
        let range = data_start + start..data_start + end;
        if range.end > bytes.len() || start > end {
            return Err(malformed(format!("tensor `{name}`: data outside the file")));
        }
        // Bare-model exports (Qwen3-Embedding) name tensors without `model.`.
        let name = super::names::with_model_prefix(&name);
        let data = Bytes::new(owner.clone(), range);
        match dtype {
            Ok(dtype) => set.insert(HostTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                data,
            })?,
            Err(dtype) => raw.push(RawTensor {
                name,
                dtype,
                shape: info.shape.clone(),
                data,
            }),
        }
    }
    Ok(())
}

/// The `safetensors` crate's refusal of a file, said so that a truncated file is called
/// truncated, with the sizes.
fn describe_header_error(e: &safetensors::SafeTensorError, bytes: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let len = bytes.len() as u64;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    match e {
        E::HeaderTooSmall => {
            format!("the file has {len} bytes, fewer than the 8 of the header length (truncated?)")
        }
        E::InvalidHeaderLength => format!(
            "the header is {} bytes long, but the file has only {} after the length \
             (truncated, or not a safetensors file)",
            header_len.unwrap_or(0),
            len.saturating_sub(8)
        ),
        E::MetadataIncompleteBuffer => match header_len.and_then(|n| declared_len(bytes, n)) {
            Some(want) if want > len => {
                format!("truncated: the header describes {want} bytes, the file has {len}")
            }
            Some(want) => format!(
                "the header describes {want} bytes, but the file has {len} (the tensors do \
                 not cover it)"
            ),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// The file size a safetensors header implies: length, header, and up to the last tensor's
/// end; `None` if the header cannot be read that far.
fn declared_len(bytes: &[u8], header_len: u64) -> Option<u64> {
    let end = 8usize.checked_add(usize::try_from(header_len).ok()?)?;
    let header: Value = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let data_end = header
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    (end as u64).checked_add(data_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qwen3-tiny")
    }

    #[test]
    fn loads_fixture_zero_copy() {
        let set = load_dir(&fixture_dir()).expect("fixture qwen3-tiny");
        let t = set
            .get_shaped("model.layers.0.self_attn.q_proj.weight", &[128, 64])
            .unwrap();
        assert_eq!(t.dtype, DType::BF16);
        assert_eq!(t.data.len(), 128 * 64 * 2);
        assert!(set.try_get("model.embed_tokens.weight").is_some());
    }

    #[test]
    fn shape_mismatch_names_tensor_and_shapes() {
        let set = load_dir(&fixture_dir()).unwrap();
        let err = set
            .get_shaped("model.norm.weight", &[65])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.norm.weight") && err.contains("[65]") && err.contains("[64]"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_an_error() {
        let src = std::fs::read(fixture_dir().join("model.safetensors")).unwrap();
        let dir = std::env::temp_dir().join(format!("wick-st-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for cut in [0usize, 7, 100, src.len() / 2, src.len() - 1] {
            let p = dir.join("model.safetensors");
            std::fs::write(&p, &src[..cut]).unwrap();
            let mut set = TensorSet::default();
            let e = load_file_into(&p, &mut set).unwrap_err().to_string();
            assert!(
                e.contains("model.safetensors") && e.contains("truncated"),
                "cut at {cut}: {e}"
            );
        }
        // Past the header, the message has both sizes.
        let p = dir.join("model.safetensors");
        std::fs::write(&p, &src[..src.len() / 2]).unwrap();
        let e = load_file_into(&p, &mut TensorSet::default())
            .unwrap_err()
            .to_string();
        let want = format!(
            "describes {} bytes, the file has {}",
            src.len(),
            src.len() / 2
        );
        assert!(e.contains(&want), "{e}");
        // Bytes appended are not a truncation, and not accepted either.
        let mut longer = src.clone();
        longer.extend_from_slice(&[0; 5]);
        std::fs::write(&p, &longer).unwrap();
        let e = load_file_into(&p, &mut TensorSet::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not cover it"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
