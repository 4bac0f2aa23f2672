//! Writing GGUF files (version 3), the layout [`super::gguf`] reads.
//!
//! Written here because no well-kept crate writes GGUF, and the format is small: a header,
//! the metadata key/values, the tensor descriptions, padding to the alignment, then each
//! tensor's bytes at an aligned offset (zero padding between and after them). The writer
//! does what llama.cpp's `gguf` writer does: alignment 32 (the default, so no
//! `general.alignment` key), tensor offsets relative to the data section, dimensions
//! innermost first.
//!
//! ```no_run
//! use wick::loader::gguf::MetaValue;
//! use wick::loader::gguf_write::GgufWriter;
//! use wick::loader::Bytes;
//! use wick::quant::DType;
//!
//! let mut w = GgufWriter::new();
//! w.add_meta("general.architecture", MetaValue::Str("qwen3".into()));
//! let norm: Vec<u8> = [1.0f32; 64].iter().flat_map(|v| v.to_le_bytes()).collect();
//! w.add_tensor("output_norm.weight", DType::F32, &[64], Bytes::from_vec(norm))?;
//! w.write_file("out.gguf")?;
//! # Ok::<(), wick::Error>(())
//! ```

use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::gguf::{GgmlType, MetaArray, MetaValue, DEFAULT_ALIGNMENT, MAGIC};
use super::Bytes;
use crate::error::{Error, Result};
use crate::quant::DType;

/// The GGUF version written.
pub const VERSION: u32 = 3;

/// One tensor to write: GGUF name, storage type, shape outermost first, raw bytes.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
}

/// A GGUF file being assembled in memory (tensor bytes are shared [`Bytes`], not copied).
#[derive(Default, Debug)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<Entry>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a metadata key (order is kept); a key given twice replaces the first value in
    /// place.
    pub fn add_meta(&mut self, key: &str, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    /// The metadata so far.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Appends a tensor under its GGUF name with `shape` outermost first (`[out, in]` for a
    /// linear layer). Errors if the name is taken or `data` is not exactly the tensor's size.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        data: Bytes,
    ) -> Result<()> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidRequest(format!(
                "tensor `{name}` written twice"
            )));
        }
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = n.and_then(|n| dtype.bytes_for(n));
        let rows_ok = shape.last().is_none_or(|&c| dtype.bytes_for(c).is_some());
        if shape.is_empty()
            || shape.len() > super::gguf::MAX_DIMS
            || !rows_ok
            || want != Some(data.len())
        {
            return Err(Error::InvalidRequest(format!(
                "tensor `{name}`: {} bytes of {dtype} do not make shape {shape:?}",
                data.len()
            )));
        }
        self.tensors.push(Entry {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        });
        Ok(())
    }

    /// Writes the file to `w`.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<()> {
        let align = DEFAULT_ALIGNMENT;
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut head, k);
            head.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut head, v);
        }
        let mut offset: u64 = 0;
        for t in &self.tensors {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&GgmlType::from_dtype(t.dtype).id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).next_multiple_of(align);
        }
        let zeros = [0u8; DEFAULT_ALIGNMENT as usize];
        let pad = |len: usize| &zeros[..len.next_multiple_of(align as usize) - len];
        w.write_all(&head)?;
        w.write_all(pad(head.len()))?;
        for t in &self.tensors {
            w.write_all(t.data.as_slice())?;
            w.write_all(pad(t.data.len()))?;
        }
        Ok(())
    }

    /// Writes the file to `path` (through a temporary file in the same directory, renamed
    /// when complete, so a failed run leaves no half-written model behind).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            self.write_to(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

// Metadata value type ids (GGUF's `gguf_type`).
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

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => T_U8,
        MetaValue::I8(_) => T_I8,
        MetaValue::U16(_) => T_U16,
        MetaValue::I16(_) => T_I16,
        MetaValue::U32(_) => T_U32,
        MetaValue::I32(_) => T_I32,
        MetaValue::U64(_) => T_U64,
        MetaValue::I64(_) => T_I64,
        MetaValue::F32(_) => T_F32,
        MetaValue::F64(_) => T_F64,
        MetaValue::Bool(_) => T_BOOL,
        MetaValue::Str(_) => T_STRING,
        MetaValue::Array(_) => T_ARRAY,
    }
}

fn array_type_id(a: &MetaArray) -> u32 {
    match a {
        MetaArray::U8(_) => T_U8,
        MetaArray::I8(_) => T_I8,
        MetaArray::U16(_) => T_U16,
        MetaArray::I16(_) => T_I16,
        MetaArray::U32(_) => T_U32,
        MetaArray::I32(_) => T_I32,
        MetaArray::U64(_) => T_U64,
        MetaArray::I64(_) => T_I64,
        MetaArray::F32(_) => T_F32,
        MetaArray::F64(_) => T_F64,
        MetaArray::Bool(_) => T_BOOL,
        MetaArray::Str(_) => T_STRING,
        MetaArray::Array(_) => T_ARRAY,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_string(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&array_type_id(a).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr, $f:expr) => {
            for x in $v {
                $f(out, x)
            }
        };
    }
    match a {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => each!(v, |o: &mut Vec<u8>, x: &i8| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::U16(v) => each!(v, |o: &mut Vec<u8>, x: &u16| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I16(v) => each!(v, |o: &mut Vec<u8>, x: &i16| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::U32(v) => each!(v, |o: &mut Vec<u8>, x: &u32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I32(v) => each!(v, |o: &mut Vec<u8>, x: &i32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::U64(v) => each!(v, |o: &mut Vec<u8>, x: &u64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::I64(v) => each!(v, |o: &mut Vec<u8>, x: &i64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::F32(v) => each!(v, |o: &mut Vec<u8>, x: &f32| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::F64(v) => each!(v, |o: &mut Vec<u8>, x: &f64| o
            .extend_from_slice(&x.to_le_bytes())),
        MetaArray::Bool(v) => each!(v, |o: &mut Vec<u8>, x: &bool| o.push(*x as u8)),
        MetaArray::Str(v) => each!(v, |o: &mut Vec<u8>, x: &String| put_string(o, x)),
        MetaArray::Array(v) => each!(v, put_array),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::gguf::GgufFile;

    #[test]
    fn written_file_reads_back() {
        let mut w = GgufWriter::new();
        w.add_meta("general.architecture", MetaValue::Str("qwen3".into()));
        w.add_meta("a.u32", MetaValue::U32(7));
        w.add_meta(
            "a.list",
            MetaValue::Array(MetaArray::Str(vec!["x".into(), "yz".into()])),
        );
        w.add_meta("a.ints", MetaValue::Array(MetaArray::I32(vec![1, -2, 3])));
        w.add_meta("a.u32", MetaValue::U32(8));
        let v: Vec<u8> = (0..3 * 34).map(|i| i as u8).collect();
        w.add_tensor("t.q", DType::Q8_0, &[3, 32], Bytes::from_vec(v.clone()))
            .unwrap();
        w.add_tensor("t.f", DType::F32, &[5], Bytes::from_vec(vec![0; 20]))
            .unwrap();
        assert!(w
            .add_tensor("t.f", DType::F32, &[5], Bytes::from_vec(vec![0; 20]))
            .is_err());
        assert!(w
            .add_tensor("t.g", DType::Q8_0, &[2, 16], Bytes::from_vec(vec![0; 34]))
            .is_err());
        assert!(w
            .add_tensor("t.h", DType::F32, &[5], Bytes::from_vec(vec![0; 16]))
            .is_err());
        let mut buf = Vec::new();
        w.write_to(&mut buf).unwrap();
        assert_eq!(buf.len() % 32, 0);
        let f = GgufFile::parse(std::sync::Arc::new(buf), "mem.gguf").unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.get_u32("a.u32").unwrap(), Some(8));
        assert_eq!(f.get_str_array("a.list").unwrap().unwrap(), ["x", "yz"]);
        assert_eq!(f.get_i32_array("a.ints").unwrap().unwrap(), [1, -2, 3]);
        let t = f.tensor_info("t.q").unwrap();
        assert_eq!((t.dims.clone(), t.ggml_type.name()), (vec![32, 3], "Q8_0"));
        assert_eq!(f.tensor_data(t).as_slice(), v.as_slice());
        assert_eq!(f.tensor_info("t.f").unwrap().offset % 32, 0);
    }
}
