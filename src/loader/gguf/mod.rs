//! GGUF files (llama.cpp's format), read in place from a memory map: the format reader.
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
//! `fuzz/` holds a cargo-fuzz target for this parser ([`GgufFile::parse`]). Tensor bytes are
//! never copied: they stay [`Bytes`] slices of the map (except the Llama q/k rows, see
//! [`GgufFile::tensor_set`]).
//!
//! **Split files.** llama.cpp's `gguf-split` (and its Python writer's `split_max_tensors`)
//! cut a model into `NAME-00001-of-0000N.gguf` … `NAME-0000N-of-0000N.gguf`: the first part
//! holds the metadata, every part holds some tensors, and `split.no` / `split.count` /
//! `split.tensors.count` say how they fit. [`GgufFile::open`] on the first part opens the
//! others from the same directory, checks that they belong together, and presents one file:
//! each tensor's bytes stay in the map of the part that holds them.
//!
//! The rooms: this module holds [`GgufFile`] (the parsed file and its typed metadata and
//! tensor accessors), [`GgmlType`] (GGML's storage types) and [`GgufTensorInfo`]; `meta`
//! holds the metadata values ([`MetaValue`], [`MetaArray`]); `parse` the bounds-checked
//! reader of the header, metadata and tensor descriptions (what the fuzzer exercises); `model`
//! the mapping from GGUF names and metadata to wick's [`ModelConfig`] and
//! [`TensorSet`](super::TensorSet) ([`GgufFile::model_config`], [`GgufFile::tensor_set`]), so
//! the rest of wick never sees GGUF conventions.
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

mod meta;
mod model;
mod parse;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use self::meta::short_value;
pub use self::meta::{MetaArray, MetaValue};
pub use self::model::unpermute_llama_rows;
use self::parse::parse_layout;
use super::{Bytes, HostTensor};
#[cfg(doc)]
use crate::config::ModelConfig;
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
}
