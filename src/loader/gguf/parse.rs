//! The hardened reader: header, metadata and tensor descriptions, every length checked first.
//!
//! [`parse_layout`] walks the bytes with a bounds-checked cursor (`Reader`): every count read
//! from the file is checked against the bytes that remain (at the smallest encoding of what
//! it counts) before anything is allocated, strings must be UTF-8, arrays nest at most
//! [`MAX_ARRAY_DEPTH`] deep, dimension products and byte sizes are checked for overflow,
//! tensors must be aligned, inside the data section and disjoint, and keys and names unique.
//! Errors are messages that say what was being read and where; [`GgufFile::parse`] wraps them
//! in [`Error::MalformedWeights`](crate::Error::MalformedWeights) with the file's path. This is
//! the code `fuzz/fuzz_targets/gguf_parse.rs` drives with arbitrary bytes.

use std::collections::HashMap;

#[cfg(doc)]
use super::GgufFile;
use super::{
    GgmlType, GgufTensorInfo, MetaArray, MetaValue, DEFAULT_ALIGNMENT, MAGIC, MAX_ARRAY_DEPTH,
    MAX_DIMS,
};

// Metadata value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// Smallest encodings, used to bound counts before reading: a key/value is at least an empty
/// key (8), a type (4) and a one-byte value; a tensor description at least an empty name (8),
/// `n_dims` (4), a type (4) and an offset (8); a string its length (8); an array its element
/// type (4) and count (8).
const MIN_KV_BYTES: u64 = 13;
const MIN_TENSOR_INFO_BYTES: u64 = 24;
const MIN_STRING_BYTES: u64 = 8;
const MIN_ARRAY_BYTES: u64 = 12;

/// What [`parse_layout`] finds.
pub(super) struct Layout {
    pub(super) version: u32,
    pub(super) alignment: u64,
    pub(super) data_offset: usize,
    pub(super) metadata: Vec<(String, MetaValue)>,
    pub(super) meta_index: HashMap<String, usize>,
    pub(super) tensors: Vec<GgufTensorInfo>,
    pub(super) tensor_index: HashMap<String, usize>,
}

/// Parses and validates everything but the tensor bytes; errors are messages for
/// [`Error::MalformedWeights`].
pub(super) fn parse_layout(bytes: &[u8]) -> Result<Layout, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic = r.take(4).map_err(|e| format!("header: {e}"))?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: starts with {magic:02x?}, expected \"GGUF\""
        ));
    }
    let version = r.u32().map_err(|e| format!("header: {e}"))?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                "GGUF version 1 is not supported (it predates 64-bit counts); \
                 convert the model again with a current llama.cpp"
                    .into(),
            )
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(format!(
                "big-endian GGUF (version {}) is not supported; use a little-endian file",
                v.swap_bytes()
            ))
        }
        v => return Err(format!("unsupported GGUF version {v} (wick reads 2 and 3)")),
    }
    let n_tensors = r.u64().map_err(|e| format!("header: {e}"))?;
    let n_kv = r.u64().map_err(|e| format!("header: {e}"))?;
    r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES)
        .map_err(|e| format!("header: tensor count: {e}"))?;
    r.check_count(n_kv, MIN_KV_BYTES)
        .map_err(|e| format!("header: metadata count: {e}"))?;

    let mut metadata = Vec::new();
    let mut meta_index = HashMap::new();
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| format!("metadata entry {i} of {n_kv}: key: {e}"))?;
        let value = r
            .u32()
            .and_then(|ty| r.value(ty))
            .map_err(|e| format!("metadata key `{key}`: {e}"))?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(format!(
                "general.alignment must be a u32 power of two, found {other:?}"
            ))
        }
    };

    r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES)
        .map_err(|e| format!("tensor count: {e}"))?;
    let mut tensors: Vec<GgufTensorInfo> = Vec::new();
    let mut tensor_index = HashMap::new();
    for i in 0..n_tensors {
        let name = r
            .string()
            .map_err(|e| format!("tensor {i} of {n_tensors}: name: {e}"))?;
        let info = r
            .tensor_info(name.clone(), alignment)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
        tensors.push(info);
    }

    let data_offset = align_up(r.pos as u64, alignment)
        .and_then(|o| usize::try_from(o).ok())
        .ok_or("data section offset overflows")?;
    check_tensor_extents(&tensors, data_offset, bytes.len())?;
    Ok(Layout {
        version,
        alignment,
        data_offset,
        metadata,
        meta_index,
        tensors,
        tensor_index,
    })
}

/// Checks that every tensor lies inside the data section and that no two overlap.
fn check_tensor_extents(
    tensors: &[GgufTensorInfo],
    data_offset: usize,
    file_len: usize,
) -> Result<(), String> {
    let data_len = (file_len as u64).saturating_sub(data_offset as u64);
    for t in tensors {
        let end = t.offset.checked_add(t.size);
        if end.is_none_or(|end| end > data_len) || data_offset > file_len {
            return Err(format!(
                "tensor `{}`: bytes {}..{} of the data section lie outside it ({data_len} bytes \
                 from offset {data_offset}): the file is truncated or damaged",
                t.name,
                t.offset,
                end.map_or("overflow".into(), |e| e.to_string()),
            ));
        }
    }
    // Sort by start; a tensor overlaps the next one iff it ends after the next starts. Empty
    // tensors occupy nothing and are skipped.
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .filter(|t| t.size > 0)
        .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        let ((_, a_end, a), (b_start, _, b)) = (w[0], w[1]);
        if a_end > b_start {
            return Err(format!(
                "tensors `{a}` and `{b}` overlap in the data section (`{a}` ends at {a_end}, \
                 `{b}` starts at {b_start})"
            ));
        }
    }
    Ok(())
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    Some(x.checked_add(alignment - 1)? / alignment * alignment)
}

/// A bounds-checked little-endian cursor. Every read checks the bytes left first; errors
/// say what was needed and where, and callers add what was being read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(format!(
                "needs {n} bytes at offset {}, but the file has only {} left (truncated?)",
                self.pos,
                self.remaining()
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_bytes` each can fit in what is left, so a
    /// hostile count is refused before any loop or allocation sized by it.
    fn check_count(&self, count: u64, min_bytes: u64) -> Result<(), String> {
        match count.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() as u64 => Ok(()),
            _ => Err(format!(
                "{count} items of at least {min_bytes} bytes each cannot fit in the {} bytes \
                 left at offset {}",
                self.remaining(),
                self.pos
            )),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let s = self
            .take(len)
            .map_err(|e| format!("string of length {len}: {e}"))?;
        String::from_utf8(s.to_vec()).map_err(|e| {
            format!(
                "string at offset {} is not valid UTF-8 ({e})",
                self.pos - s.len()
            )
        })
    }

    /// A value of metadata type `ty`.
    fn value(&mut self, ty: u32) -> Result<MetaValue, String> {
        Ok(match ty {
            T_U8 => MetaValue::U8(self.array::<1>()?[0]),
            T_I8 => MetaValue::I8(self.array::<1>()?[0] as i8),
            T_U16 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            T_I16 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            T_U32 => MetaValue::U32(self.u32()?),
            T_I32 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            T_F32 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            T_BOOL => MetaValue::Bool(bool_of(self.array::<1>()?[0])?),
            T_STRING => MetaValue::Str(self.string()?),
            T_ARRAY => MetaValue::Array(self.meta_array(1)?),
            T_U64 => MetaValue::U64(self.u64()?),
            T_I64 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            T_F64 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }

    /// An array (element type, count, elements) nested `depth` arrays deep.
    fn meta_array(&mut self, depth: usize) -> Result<MetaArray, String> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!(
                "arrays nested more than {MAX_ARRAY_DEPTH} deep are not supported"
            ));
        }
        let ty = self.u32()?;
        let n = self.u64()?;
        // Fixed-size elements: one bounds check for the whole array, then decode.
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let need = n
                    .checked_mul(SIZE as u64)
                    .ok_or_else(|| format!("array of {n} {} elements overflows", stringify!($t)))?;
                let bytes = self
                    .take(need)
                    .map_err(|e| format!("array of {n} {}: {e}", stringify!($t)))?;
                MetaArray::$variant(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| <$t>::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            T_U8 => fixed!(U8, u8),
            T_I8 => fixed!(I8, i8),
            T_U16 => fixed!(U16, u16),
            T_I16 => fixed!(I16, i16),
            T_U32 => fixed!(U32, u32),
            T_I32 => fixed!(I32, i32),
            T_F32 => fixed!(F32, f32),
            T_U64 => fixed!(U64, u64),
            T_I64 => fixed!(I64, i64),
            T_F64 => fixed!(F64, f64),
            T_BOOL => {
                let bytes = self
                    .take(n)
                    .map_err(|e| format!("array of {n} bool: {e}"))?;
                MetaArray::Bool(
                    bytes
                        .iter()
                        .map(|&b| bool_of(b))
                        .collect::<Result<_, _>>()?,
                )
            }
            T_STRING => {
                self.check_count(n, MIN_STRING_BYTES)
                    .map_err(|e| format!("array of {n} strings: {e}"))?;
                let mut v = Vec::new();
                for i in 0..n {
                    v.push(
                        self.string()
                            .map_err(|e| format!("string element {i}: {e}"))?,
                    );
                }
                MetaArray::Str(v)
            }
            T_ARRAY => {
                self.check_count(n, MIN_ARRAY_BYTES)
                    .map_err(|e| format!("array of {n} arrays: {e}"))?;
                let mut v = Vec::new();
                for i in 0..n {
                    v.push(
                        self.meta_array(depth + 1)
                            .map_err(|e| format!("array element {i}: {e}"))?,
                    );
                }
                MetaArray::Array(v)
            }
            other => return Err(format!("array of unknown metadata value type {other}")),
        })
    }

    /// The rest of a tensor description after its name, validated.
    fn tensor_info(&mut self, name: String, alignment: u64) -> Result<GgufTensorInfo, String> {
        let n_dims = self.u32()?;
        if n_dims as usize > MAX_DIMS {
            return Err(format!(
                "{n_dims} dimensions; GGML tensors have at most {MAX_DIMS}"
            ));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let type_id = self.u32()?;
        let offset = self.u64()?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| format!("unknown GGML tensor type id {type_id}"))?;
        // GGML keeps dimensions and element counts as i64; the product must also fit usize.
        let mut numel: u64 = 1;
        for &d in &dims {
            numel = numel
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
                .ok_or_else(|| format!("dimensions {dims:?} overflow the element count"))?;
        }
        if dims
            .iter()
            .any(|&d| usize::try_from(d).is_err() || d > i64::MAX as u64)
        {
            return Err(format!("dimensions {dims:?} are too large"));
        }
        // Rows are whole blocks, so the innermost dimension is a multiple of the block size.
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_elems() != 0 {
            return Err(format!(
                "rows of {row} elements are not whole {ggml_type} blocks of {}",
                ggml_type.block_elems()
            ));
        }
        let size = (numel / ggml_type.block_elems())
            .checked_mul(ggml_type.block_bytes())
            .filter(|&s| usize::try_from(s).is_ok())
            .ok_or_else(|| format!("byte size of dimensions {dims:?} overflows"))?;
        if offset % alignment != 0 {
            return Err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        Ok(GgufTensorInfo {
            name,
            ggml_type,
            dims,
            offset,
            size,
            part: 0,
        })
    }
}

fn bool_of(b: u8) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(format!("bool value {other} is neither 0 nor 1")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::loader::gguf::GgufFile;

    /// The smallest valid file: header with no tensors and one key.
    fn tiny_file(version: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(version.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(b"k.a");
        b.extend(T_ARRAY.to_le_bytes());
        b.extend(T_ARRAY.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(T_BOOL.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend([1, 0]);
        b
    }

    #[test]
    fn parses_nested_arrays_in_a_tensorless_file() {
        for version in [2, 3] {
            let f = GgufFile::parse(Arc::new(tiny_file(version)), "tiny.gguf").unwrap();
            assert_eq!(f.version(), version);
            assert!(f.tensors().is_empty());
            let nested = MetaArray::Array(vec![MetaArray::Bool(vec![true, false])]);
            assert_eq!(f.get_array("k.a").unwrap(), Some(&nested));
            let err = f.get_u32("k.a").unwrap_err().to_string();
            assert!(
                err.contains("array of array") && err.contains("u32"),
                "{err}"
            );
            assert_eq!(f.get_u32("absent").unwrap(), None);
        }
    }

    #[test]
    fn refuses_arrays_nested_too_deep() {
        let mut b = Vec::new();
        b.extend(MAGIC);
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(b"k");
        b.extend(T_ARRAY.to_le_bytes());
        for _ in 0..MAX_ARRAY_DEPTH + 1 {
            b.extend(T_ARRAY.to_le_bytes());
            b.extend(1u64.to_le_bytes());
        }
        b.extend(T_U8.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let err = GgufFile::parse(Arc::new(b), "deep.gguf")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested"), "{err}");
    }
}
