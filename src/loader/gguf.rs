//! GGUF files (llama.cpp's format), read in place from a memory map.
//!
//! A GGUF file is a header, a list of typed metadata key/values (hyper-parameters, the
//! tokenizer, the chat template), a list of tensor descriptions, and a data section holding
//! the tensors' bytes in GGML block formats. All integers are little-endian:
//!
//! ```text
//! "GGUF"  u32 version (2 or 3)  u64 n_tensors  u64 n_kv
//! n_kv ×      { string key, u32 value_type, value }
//! n_tensors × { string name, u32 n_dims, u64 ne[n_dims] (innermost first), u32 ggml_type,
//!               u64 offset (from the start of the data section) }
//! padding to `general.alignment` (default 32)
//! data section: tensor bytes, each tensor at an aligned offset
//! string = u64 length + UTF-8 bytes; array = u32 element type + u64 count + elements
//! ```
//!
//! The reader is written here rather than taken from a crate because it must be hardened and
//! zero-copy at once, which no well-kept crate offered: every length and count read from the
//! file is checked against the bytes that remain before anything is allocated, dimension
//! products are checked for overflow, tensors must be aligned, inside the data section and
//! disjoint, names and keys unique. A corrupt or hostile file yields
//! [`Error::MalformedWeights`] naming what is wrong, never a panic or an out-of-bounds read;
//! `fuzz/` holds a cargo-fuzz target for this parser. Tensor bytes are never copied: they stay
//! [`Bytes`] slices of the map (except the Llama q/k rows, see below).
//!
//! **Split files.** llama.cpp's `gguf-split` (and its Python writer's `split_max_tensors`)
//! cut a model into `NAME-00001-of-0000N.gguf` … `NAME-0000N-of-0000N.gguf`: the first part
//! holds the metadata, every part holds some tensors, and `split.no` / `split.count` /
//! `split.tensors.count` say how they fit. [`GgufFile::open`] on the first part opens the
//! others from the same directory, checks that they belong together, and presents one file:
//! each tensor's bytes stay in the map of the part that holds them.
//!
//! [`GgufFile::tensor_set`] hands tensors to the model under their Hugging Face names (through
//! [`super::names`]) with outermost-first shapes, and [`GgufFile::model_config`] fills a
//! [`ModelConfig`] from the metadata, so the rest of wick never sees GGUF conventions.
//!
//! **Llama q/k rows.** llama.cpp's converter reorders the rows of `attn_q` / `attn_k` of
//! `llama` models so that llama.cpp's interleaved ("normal") RoPE, which rotates adjacent
//! pairs, computes what the Hugging Face model's rotate-half RoPE computes. wick applies the
//! Hugging Face RoPE only, so [`GgufFile::tensor_set`] undoes the reordering for `llama`
//! files ([`unpermute_llama_rows`]). Rows are whole quantization blocks, so this is a row
//! shuffle of the raw bytes (into an owned buffer), not a requantization. `qwen3` files use
//! the rotate-half ("NEOX") RoPE in llama.cpp too and are left as stored.
//!
//! ```no_run
//! use wick::loader::gguf::GgufFile;
//! let file = GgufFile::open("qwen3-0.6b-q4_k_m.gguf")?;
//! let config = file.model_config()?;
//! let tensors = file.tensor_set(&config)?;
//! let embed = tensors.get("model.embed_tokens.weight")?;
//! assert_eq!(embed.shape, [config.vocab_size, config.hidden_size]);
//! # Ok::<(), wick::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::{names, Bytes, HostTensor, TensorSet};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::quant::DType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when the file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a GGML tensor can have.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays in metadata values. The format allows arrays of arrays; none of
/// the keys wick reads uses them, and the limit bounds the parser's recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

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

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL` (stored as one byte, 0 or 1).
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY`.
    Array(MetaArray),
}

/// A metadata array. Elements share one type, so each element type gets its own vector (a
/// 150k-token vocabulary is one `Vec<String>`, a token-type list one `Vec<i32>`).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// `UINT8` elements.
    U8(Vec<u8>),
    /// `INT8` elements.
    I8(Vec<i8>),
    /// `UINT16` elements.
    U16(Vec<u16>),
    /// `INT16` elements.
    I16(Vec<i16>),
    /// `UINT32` elements.
    U32(Vec<u32>),
    /// `INT32` elements.
    I32(Vec<i32>),
    /// `UINT64` elements.
    U64(Vec<u64>),
    /// `INT64` elements.
    I64(Vec<i64>),
    /// `FLOAT32` elements.
    F32(Vec<f32>),
    /// `FLOAT64` elements.
    F64(Vec<f64>),
    /// `BOOL` elements.
    Bool(Vec<bool>),
    /// `STRING` elements.
    Str(Vec<String>),
    /// Nested arrays (each may have its own element type).
    Array(Vec<MetaArray>),
}

impl MetaValue {
    /// The GGUF name of the value's type (`"u32"`, `"string"`, `"array of string"`...).
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::U8(_) => "u8".into(),
            MetaValue::I8(_) => "i8".into(),
            MetaValue::U16(_) => "u16".into(),
            MetaValue::I16(_) => "i16".into(),
            MetaValue::U32(_) => "u32".into(),
            MetaValue::I32(_) => "i32".into(),
            MetaValue::U64(_) => "u64".into(),
            MetaValue::I64(_) => "i64".into(),
            MetaValue::F32(_) => "f32".into(),
            MetaValue::F64(_) => "f64".into(),
            MetaValue::Bool(_) => "bool".into(),
            MetaValue::Str(_) => "string".into(),
            MetaValue::Array(a) => format!("array of {}", a.element_type_name()),
        }
    }

    /// The value as a signed 64-bit integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an unsigned 64-bit integer, for any non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// The value as a float, for `F32` and `F64` (narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The string, for `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The array, for `Array`.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::Str(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type (`"string"`, `"i32"`, `"array"`).
    pub fn element_type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F32(_) => "f32",
            MetaArray::F64(_) => "f64",
            MetaArray::Bool(_) => "bool",
            MetaArray::Str(_) => "string",
            MetaArray::Array(_) => "array",
        }
    }
}

/// A GGML tensor type: its id in the file, name and block geometry.
///
/// The table covers every storage type GGML defines, so a file is fully validated (sizes,
/// overlaps) even when wick cannot compute with some of its types; those are refused later,
/// by name, when a tensor is handed to the model ([`GgmlType::dtype`] is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType {
    id: u32,
    name: &'static str,
    block_elems: u32,
    block_bytes: u32,
}

const fn ggml(id: u32, name: &'static str, block_elems: u32, block_bytes: u32) -> GgmlType {
    GgmlType {
        id,
        name,
        block_elems,
        block_bytes,
    }
}

/// GGML's storage types. Ids 4, 5 and 31–33, 36–38 were removed from GGML and never appear in
/// current files; `Q8_1` and `Q8_K` only exist as in-memory activation formats.
const GGML_TYPES: &[GgmlType] = &[
    ggml(0, "F32", 1, 4),
    ggml(1, "F16", 1, 2),
    ggml(2, "Q4_0", 32, 18),
    ggml(3, "Q4_1", 32, 20),
    ggml(6, "Q5_0", 32, 22),
    ggml(7, "Q5_1", 32, 24),
    ggml(8, "Q8_0", 32, 34),
    ggml(10, "Q2_K", 256, 84),
    ggml(11, "Q3_K", 256, 110),
    ggml(12, "Q4_K", 256, 144),
    ggml(13, "Q5_K", 256, 176),
    ggml(14, "Q6_K", 256, 210),
    ggml(16, "IQ2_XXS", 256, 66),
    ggml(17, "IQ2_XS", 256, 74),
    ggml(18, "IQ3_XXS", 256, 98),
    ggml(19, "IQ1_S", 256, 50),
    ggml(20, "IQ4_NL", 32, 18),
    ggml(21, "IQ3_S", 256, 110),
    ggml(22, "IQ2_S", 256, 82),
    ggml(23, "IQ4_XS", 256, 136),
    ggml(24, "I8", 1, 1),
    ggml(25, "I16", 1, 2),
    ggml(26, "I32", 1, 4),
    ggml(27, "I64", 1, 8),
    ggml(28, "F64", 1, 8),
    ggml(29, "IQ1_M", 256, 56),
    ggml(30, "BF16", 1, 2),
    ggml(34, "TQ1_0", 256, 54),
    ggml(35, "TQ2_0", 256, 66),
    ggml(39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// The type with GGML id `id`, if it is a known storage type.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().copied().find(|t| t.id == id)
    }

    /// The GGML type storing `dtype`.
    pub fn from_dtype(dtype: DType) -> GgmlType {
        let id = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::BF16 => 30,
        };
        GgmlType::from_id(id).expect("every DType is in the GGML table")
    }

    /// The id stored in files.
    pub fn id(self) -> u32 {
        self.id
    }

    /// The GGML name (`"Q4_K"`).
    pub fn name(self) -> &'static str {
        self.name
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        self.block_elems.into()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        self.block_bytes.into()
    }

    /// The wick data type, if wick can compute with this type.
    pub fn dtype(self) -> Option<DType> {
        Some(match self.id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            30 => DType::BF16,
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The description of one tensor in a GGUF file, as stored (GGUF name and dimension order).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// GGML `ne`: dimensions innermost first (a `[out, in]` matrix is stored as `[in, out]`).
    pub dims: Vec<u64>,
    /// Byte offset from the start of the data section (a multiple of the alignment).
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
    /// Which part of a split model holds the bytes (0: the first, or only, file).
    pub part: usize,
}

impl GgufTensorInfo {
    /// Dimensions outermost first, as Hugging Face and [`HostTensor`] order them.
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension was checked to fit in usize when the file was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The bytes a [`GgufFile`] reads: a memory map, or a buffer handed to [`GgufFile::parse`].
type Owner = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A parsed GGUF file: metadata and tensor descriptions, with the bytes kept mapped.
pub struct GgufFile {
    path: PathBuf,
    owner: Owner,
    version: u32,
    alignment: u64,
    data_offset: usize,
    /// The other parts of a split model (map and data offset), for tensors with `part > 0`.
    parts: Vec<(Owner, usize)>,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const SPLIT_NO: &str = "split.no";
const SPLIT_COUNT: &str = "split.count";
const SPLIT_TENSORS: &str = "split.tensors.count";

/// The file name of part `n` of `count` of the split model `first` belongs to
/// (`NAME-00002-of-00003.gguf` for `NAME-00001-of-00003.gguf`), or `None` if `first` is not
/// named that way.
pub fn split_part_name(first: &Path, n: u32, count: u32) -> Option<String> {
    let name = first.file_name()?.to_str()?;
    let (stem, _) = split_suffix(name)?;
    Some(format!("{stem}-{n:05}-of-{count:05}.gguf"))
}

/// `("NAME", (k, n))` for a file named `NAME-0000k-of-0000n.gguf` (any case of `.gguf`).
pub fn split_suffix(name: &str) -> Option<(&str, (u32, u32))> {
    let dot = name.len().checked_sub(5)?;
    if !name.is_char_boundary(dot) || !name[dot..].eq_ignore_ascii_case(".gguf") {
        return None;
    }
    let rest = &name[..dot];
    // "-00001-of-00003": 15 bytes.
    let cut = rest.len().checked_sub(15)?;
    let (stem, suffix) = (rest.get(..cut)?, rest.get(cut..)?);
    let b = suffix.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b[0] != b'-' || &suffix[6..10] != "-of-" || !digits(1..6) || !digits(10..15) {
        return None;
    }
    let k = suffix[1..6].parse().ok()?;
    let n = suffix[10..15].parse().ok()?;
    (k >= 1 && k <= n).then_some((stem, (k, n)))
}

/// A memory map that can be shared by many [`Bytes`].
struct MappedFile(Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl GgufFile {
    /// Maps the file at `path` and parses it; the first part of a split model brings the
    /// other parts with it (see the module doc).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let mut file = GgufFile::open_one(path)?;
        let count = file.get_u32(SPLIT_COUNT)?.unwrap_or(1);
        if count > 1 {
            file.join_parts(count)?;
        }
        Ok(file)
    }

    fn open_one(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; wick never writes to model files, and a file
        // truncated by another process while mapped is outside what any mmap loader can defend.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        GgufFile::parse(Arc::new(MappedFile(mmap)), path)
    }

    /// Opens parts 2…`count` of a split model whose first part is `self`, and adds their
    /// tensors.
    fn join_parts(&mut self, count: u32) -> Result<()> {
        let no = self.get_u32(SPLIT_NO)?.unwrap_or(0);
        if no != 0 {
            return Err(self.malformed(format!(
                "is part {} of a model split in {count}: open the first part ({})",
                no + 1,
                split_part_name(&self.path, 1, count).unwrap_or_else(|| "…-00001-of-….gguf".into())
            )));
        }
        for n in 2..=count {
            let name = split_part_name(&self.path, n, count).ok_or_else(|| {
                self.malformed(format!(
                    "is the first of {count} parts, but its name does not end in \
                     `-00001-of-{count:05}.gguf`, so the other parts cannot be found"
                ))
            })?;
            let path = self.path.with_file_name(&name);
            if !path.exists() {
                return Err(self.malformed(format!(
                    "is the first of {count} parts, but part {n} ({}) is missing",
                    path.display()
                )));
            }
            let part = GgufFile::open_one(&path)?;
            let (pn, pc) = (part.get_u32(SPLIT_NO)?, part.get_u32(SPLIT_COUNT)?);
            if pn != Some(n - 1) || pc != Some(count) {
                return Err(part.malformed(format!(
                    "is not part {n} of {count} of {} (its split.no is {pn:?}, split.count {pc:?})",
                    self.path.display()
                )));
            }
            let index = self.parts.len() + 1;
            for mut info in part.tensors {
                if self.tensor_index.contains_key(&info.name) {
                    return Err(self.malformed(format!(
                        "tensor `{}` is in two parts (again in {})",
                        info.name,
                        path.display()
                    )));
                }
                info.part = index;
                self.tensor_index
                    .insert(info.name.clone(), self.tensors.len());
                self.tensors.push(info);
            }
            self.parts.push((part.owner, part.data_offset));
        }
        if let Some(total) = self.get_u64(SPLIT_TENSORS)? {
            if total != self.tensors.len() as u64 {
                return Err(self.malformed(format!(
                    "the {count} parts hold {} tensors, but split.tensors.count says {total}",
                    self.tensors.len()
                )));
            }
        }
        Ok(())
    }

    /// Parses the GGUF bytes of `owner`; `path` only labels errors. Tests and the fuzzer
    /// use this with an in-memory buffer.
    pub fn parse(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        path: impl Into<PathBuf>,
    ) -> Result<GgufFile> {
        let path = path.into();
        let parsed =
            parse_layout((*owner).as_ref()).map_err(|message| Error::MalformedWeights {
                path: path.clone(),
                message,
            })?;
        Ok(GgufFile {
            path,
            owner,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            parts: Vec::new(),
            metadata: parsed.metadata,
            meta_index: parsed.meta_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    /// The path the file was opened from (or the label given to [`GgufFile::parse`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts, in bytes from the start of the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Integer key `key` as u32: `Ok(None)` if absent, an error if it has another type or
    /// does not fit. Any integer type is accepted, since writers differ in widths.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "u32", |v| {
            v.as_u64().and_then(|x| u32::try_from(x).ok())
        })
    }

    /// Integer key `key` as u64 (see [`GgufFile::get_u32`]).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "u64", MetaValue::as_u64)
    }

    /// Integer key `key` as i64 (see [`GgufFile::get_u32`]).
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "i64", MetaValue::as_i64)
    }

    /// Float key `key` (`F32`, or `F64` narrowed).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "f32", MetaValue::as_f32)
    }

    /// Boolean key `key`.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "bool", |v| match v {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        })
    }

    /// String key `key`.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "string", MetaValue::as_str)
    }

    /// Array key `key`, of any element type.
    pub fn get_array(&self, key: &str) -> Result<Option<&MetaArray>> {
        self.typed(key, "array", MetaValue::as_array)
    }

    /// Array-of-strings key `key` (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        self.typed(key, "array of string", |v| match v {
            MetaValue::Array(MetaArray::Str(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// Array-of-i32 key `key` (`tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>> {
        self.typed(key, "array of i32", |v| match v {
            MetaValue::Array(MetaArray::I32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// Array-of-f32 key `key` (`tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        self.typed(key, "array of f32", |v| match v {
            MetaValue::Array(MetaArray::F32(a)) => Some(a.as_slice()),
            _ => None,
        })
    }

    /// The Jinja chat template (`tokenizer.chat_template`), if the file has one as a string.
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template")?.as_str()
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        f: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match f(v) {
            Some(x) => Ok(Some(x)),
            None => Err(self.malformed(format!(
                "metadata key `{key}` is {} {}, expected {expected}",
                v.type_name(),
                short_value(v)
            ))),
        }
    }

    fn malformed(&self, message: String) -> Error {
        Error::MalformedWeights {
            path: self.path.clone(),
            message,
        }
    }

    fn require<T>(&self, key: &str, v: Result<Option<T>>) -> Result<T> {
        v?.ok_or_else(|| self.malformed(format!("metadata key `{key}` is missing")))
    }

    /// All tensor descriptions, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The description of the tensor with GGUF name `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `info`, as a slice of the map.
    ///
    /// # Panics
    ///
    /// If `info` is not one of this file's [`GgufFile::tensors`] and lies outside the file:
    /// the bounds of the file's own tensors were checked when it was parsed.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Bytes {
        // Bounds were checked at parse time for every tensor of this file (and of each part).
        let (owner, data_offset) = match info.part {
            0 => (&self.owner, self.data_offset),
            p => {
                let (owner, offset) = &self.parts[p - 1];
                (owner, *offset)
            }
        };
        let start = data_offset + info.offset as usize;
        Bytes::new(owner.clone(), start..start + info.size as usize)
    }

    /// The tensor with GGUF name `name` exactly as stored: GGUF name, no row reordering,
    /// shape outermost first.
    pub fn raw_tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        Ok(HostTensor {
            name: info.name.clone(),
            dtype: dtype_of(info)?,
            shape: info.shape(),
            data: self.tensor_data(info),
        })
    }

    /// The model's hyper-parameters from the metadata.
    ///
    /// Reads `general.architecture` (`qwen3` or `llama`) and the `{arch}.*` keys; the vocabulary
    /// size is the row count of `token_embd.weight` (or the length of `tokenizer.ggml.tokens`),
    /// embeddings are tied when there is no `output.weight`, and the stop tokens are
    /// `tokenizer.ggml.eos_token_id` plus `tokenizer.ggml.eot_token_id` when it differs.
    /// Features wick does not implement (RoPE scaling, partial rotary dimensions, value heads
    /// wider than key heads) are refused rather than ignored.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.require("general.architecture", self.get_str("general.architecture"))?;
        let architecture = match arch {
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "{}: GGUF architecture `{other}`; wick runs qwen3 and llama",
                    self.path.display()
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            let k = key(k);
            match self.get_u64(&k)? {
                None => Ok(None),
                Some(v) => usize::try_from(v)
                    .map(Some)
                    .map_err(|_| self.malformed(format!("metadata key `{k}` = {v} is too large"))),
            }
        };
        let req_usize = |k: &str| self.require(&key(k), opt_usize(k));
        let unsupported =
            |m: String| Error::UnsupportedModel(format!("{}: {m}", self.path.display()));

        let hidden_size = req_usize("embedding_length")?;
        let num_hidden_layers = req_usize("block_count")?;
        let intermediate_size = req_usize("feed_forward_length")?;
        let num_attention_heads = req_usize("attention.head_count")?;
        let num_key_value_heads =
            opt_usize("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        if let Some(v) = opt_usize("attention.value_length")? {
            if v != head_dim {
                return Err(unsupported(format!(
                    "value head width {v} differs from key head width {head_dim}"
                )));
            }
        }
        if let Some(r) = opt_usize("rope.dimension_count")? {
            if r != head_dim {
                return Err(unsupported(format!(
                    "RoPE rotates {r} of {head_dim} head dimensions; partial rotary is not supported"
                )));
            }
        }
        if let Some(t) = self.get_str(&key("rope.scaling.type"))? {
            if t != "none" {
                return Err(unsupported(format!("RoPE scaling `{t}` is not supported")));
            }
        }
        let rms_norm_eps = self.require(
            &key("attention.layer_norm_rms_epsilon"),
            self.get_f32(&key("attention.layer_norm_rms_epsilon")),
        )?;
        let rope_theta = self.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let max_position_embeddings = req_usize("context_length")?;

        let vocab_size = match self.tensor_info("token_embd.weight") {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            Some(t) => {
                return Err(self.malformed(format!(
                    "token_embd.weight has {} dimensions, expected 2",
                    t.dims.len()
                )))
            }
            None => match self.get_str_array("tokenizer.ggml.tokens")? {
                Some(tokens) => tokens.len(),
                None => {
                    return Err(Error::MissingTensor {
                        name: "token_embd.weight".into(),
                    })
                }
            },
        };
        let bos_token_id = self.get_u32("tokenizer.ggml.bos_token_id")?;
        let mut eos_token_ids = Vec::new();
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.get_u32(k)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every tensor under its Hugging Face name, shapes outermost first, bytes mapped in place.
    ///
    /// Unknown tensor names and data types wick cannot compute with are refused by name, as
    /// are q/k norms in a `llama` file and tensors of layers beyond `config.num_hidden_layers`.
    /// For `llama` files the rows of the q and k projections are put back in Hugging Face
    /// order (see the module documentation); those two tensors per layer are copied, all
    /// others stay slices of the map.
    pub fn tensor_set(&self, config: &ModelConfig) -> Result<TensorSet> {
        let mut set = TensorSet::default();
        for info in &self.tensors {
            let Some(hf_name) = names::gguf_to_hf(&info.name) else {
                let why = names::unsupported_reason(&info.name)
                    .unwrap_or("it is not a tensor of the qwen3/llama architectures wick runs");
                return Err(Error::UnsupportedModel(format!(
                    "{}: tensor `{}`: {why}",
                    self.path.display(),
                    info.name
                )));
            };
            if let Some(layer) = names::layer_index(&info.name) {
                if layer >= config.num_hidden_layers {
                    return Err(self.malformed(format!(
                        "tensor `{}` belongs to layer {layer}, but the model has {} layers",
                        info.name, config.num_hidden_layers
                    )));
                }
            }
            let is_qk_norm =
                hf_name.contains(".self_attn.q_norm.") || hf_name.contains(".self_attn.k_norm.");
            if is_qk_norm && !config.has_qk_norm() {
                return Err(Error::UnsupportedModel(format!(
                    "{}: tensor `{}` (a q/k norm) in a {:?} model, which has none",
                    self.path.display(),
                    info.name,
                    config.architecture
                )));
            }
            let dtype = dtype_of(info)?;
            let shape = info.shape();
            let mut data = self.tensor_data(info);
            if config.architecture == Architecture::Llama {
                let n_head = if hf_name.contains(".self_attn.q_proj.") {
                    Some(config.num_attention_heads)
                } else if hf_name.contains(".self_attn.k_proj.") {
                    Some(config.num_key_value_heads)
                } else {
                    None
                };
                if let Some(n_head) = n_head {
                    data = self.unpermute(info, &hf_name, dtype, &shape, &data, n_head, config)?;
                }
            }
            set.insert(HostTensor {
                name: hf_name,
                dtype,
                shape,
                data,
            })?;
        }
        Ok(set)
    }

    /// Undoes the converter's q/k row order for one Llama projection (`n_head` heads).
    #[allow(clippy::too_many_arguments)]
    fn unpermute(
        &self,
        info: &GgufTensorInfo,
        hf_name: &str,
        dtype: DType,
        shape: &[usize],
        data: &Bytes,
        n_head: usize,
        config: &ModelConfig,
    ) -> Result<Bytes> {
        let rows = shape.first().copied().unwrap_or(0);
        let row_elems: usize = shape.iter().skip(1).product();
        let expected_rows = n_head * config.head_dim;
        if rows != expected_rows || dtype.bytes_for(row_elems).is_none() {
            let mut expected = shape.to_vec();
            if let Some(r) = expected.first_mut() {
                *r = expected_rows;
            }
            return Err(Error::ShapeMismatch {
                name: hf_name.to_string(),
                expected,
                found: shape.to_vec(),
            });
        }
        let permuted = unpermute_llama_rows(data.as_slice(), rows, n_head).ok_or_else(|| {
            self.malformed(format!(
                "tensor `{}`: cannot split {rows} rows into {n_head} heads of even width",
                info.name
            ))
        })?;
        Ok(Bytes::from_vec(permuted))
    }
}

/// The wick data type of a tensor, or [`Error::UnsupportedDType`] naming it.
fn dtype_of(info: &GgufTensorInfo) -> Result<DType> {
    info.ggml_type
        .dtype()
        .ok_or_else(|| Error::UnsupportedDType {
            name: info.name.clone(),
            dtype: info.ggml_type.name().to_string(),
        })
}

/// Puts the rows of a Llama q or k projection converted by llama.cpp back in Hugging Face
/// order. `src` is `rows` equal-sized rows (whole quantization blocks each) forming `n_head`
/// heads of `rows / n_head` rows; returns `None` if that split is not possible or the head
/// width is odd.
///
/// The converter stores, within each head of width `D`, Hugging Face row `j * D/2 + i` at
/// position `2 * i + j` (`i < D/2`, `j < 2`): it interleaves the two halves that rotate-half
/// RoPE pairs up, so that adjacent rows are RoPE pairs. This function applies the inverse.
pub fn unpermute_llama_rows(src: &[u8], rows: usize, n_head: usize) -> Option<Vec<u8>> {
    if rows == 0 || n_head == 0 || !rows.is_multiple_of(n_head) || !src.len().is_multiple_of(rows) {
        return None;
    }
    let head_dim = rows / n_head;
    if !head_dim.is_multiple_of(2) {
        return None;
    }
    let half = head_dim / 2;
    let row_bytes = src.len() / rows;
    let mut out = vec![0u8; src.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&src[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// A short rendering of a value for error messages (arrays by length only).
fn short_value(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => format!("of length {}", a.len()),
        MetaValue::Str(s) if s.len() > 40 => format!("{:?}…", &s[..s.floor_char_boundary(40)]),
        other => {
            let s = format!("{other:?}");
            format!("({s})")
        }
    }
}

/// What [`parse_layout`] finds.
struct Layout {
    version: u32,
    alignment: u64,
    data_offset: usize,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// Parses and validates everything but the tensor bytes; errors are messages for
/// [`Error::MalformedWeights`].
fn parse_layout(bytes: &[u8]) -> Result<Layout, String> {
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
    use super::*;

    #[test]
    fn split_names_are_read_and_made() {
        assert_eq!(
            split_suffix("m-Q4_0-00002-of-00003.gguf"),
            Some(("m-Q4_0", (2, 3)))
        );
        assert_eq!(
            split_suffix("dir/m-00001-of-00001.GGUF"),
            Some(("dir/m", (1, 1)))
        );
        for not in [
            "m-Q4_0.gguf",
            "m-00004-of-00003.gguf",
            "m-00000-of-00003.gguf",
            "m-0001-of-0003.gguf",
            "-00001-of-00002.gguf.bin",
            "é-00001-of-00002gguf",
        ] {
            assert_eq!(split_suffix(not), None, "{not}");
        }
        let first = Path::new("/x/m-00001-of-00003.gguf");
        assert_eq!(
            split_part_name(first, 3, 3).as_deref(),
            Some("m-00003-of-00003.gguf")
        );
        assert_eq!(split_part_name(Path::new("/x/m.gguf"), 2, 3), None);
    }

    /// The converter's row order, written as its reshape/swap of axes: viewing the rows as
    /// `[n_head, 2, D/2]` and swapping the last two axes gives `[n_head, D/2, 2]`.
    fn permute_like_converter(rows: &[u32], n_head: usize) -> Vec<u32> {
        let d = rows.len() / n_head;
        let half = d / 2;
        let mut out = vec![0; rows.len()];
        for h in 0..n_head {
            for a in 0..half {
                for b in 0..2 {
                    // out[h][a][b] = in[h][b][a]
                    out[h * d + a * 2 + b] = rows[h * d + b * half + a];
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter_on_a_synthetic_matrix() {
        for (n_head, head_dim, row_bytes) in [(1, 2, 1), (3, 8, 18), (4, 64, 34), (9, 64, 20)] {
            let rows = n_head * head_dim;
            let hf: Vec<u32> = (0..rows as u32).collect();
            let gguf_order = permute_like_converter(&hf, n_head);
            // Build a byte matrix whose row r is filled with a pattern naming HF row r.
            let mut bytes = Vec::new();
            for &r in &gguf_order {
                bytes.extend((0..row_bytes).map(|k| (r as usize * 7 + k) as u8));
            }
            let back = unpermute_llama_rows(&bytes, rows, n_head).unwrap();
            for (r, row) in back.chunks(row_bytes).enumerate() {
                let want: Vec<u8> = (0..row_bytes).map(|k| (r * 7 + k) as u8).collect();
                assert_eq!(row, want, "row {r} of {n_head}x{head_dim}");
            }
        }
        // A concrete case, head_dim 4: stored rows [0, 2, 1, 3] come back as [0, 1, 2, 3].
        assert_eq!(permute_like_converter(&[0, 1, 2, 3], 1), [0, 2, 1, 3]);
        assert_eq!(
            unpermute_llama_rows(&[0, 2, 1, 3], 4, 1).unwrap(),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn unpermute_refuses_impossible_splits() {
        assert!(unpermute_llama_rows(&[0; 12], 6, 4).is_none()); // 6 rows, 4 heads
        assert!(unpermute_llama_rows(&[0; 6], 6, 2).is_none()); // head width 3 is odd
        assert!(unpermute_llama_rows(&[0; 7], 4, 2).is_none()); // ragged rows
        assert!(unpermute_llama_rows(&[], 0, 1).is_none());
    }

    #[test]
    fn ggml_table_agrees_with_dtype_block_geometry() {
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
        ] {
            let t = GgmlType::from_dtype(dtype);
            assert_eq!(t.dtype(), Some(dtype));
            assert_eq!(t.name(), dtype.name());
            assert_eq!(t.block_elems(), dtype.block_elems() as u64);
            assert_eq!(t.block_bytes(), dtype.block_bytes() as u64);
        }
        let ids: Vec<u32> = GGML_TYPES.iter().map(|t| t.id).collect();
        let mut sorted = ids.clone();
        sorted.dedup();
        assert_eq!(ids, sorted, "ids are unique and ascending");
        assert_eq!(GgmlType::from_id(6).and_then(GgmlType::dtype), None); // Q5_0
        assert_eq!(GgmlType::from_id(4), None);
    }

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
