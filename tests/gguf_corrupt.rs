//! Corrupt and hostile GGUF files must be refused with an error that names the problem, never
//! a panic, an out-of-bounds read or an allocation sized by an untrusted count.
//!
//! The files are built here, in memory, from a small but complete Qwen3 model (so the valid
//! file goes all the way through `model_config` and `tensor_set`), then damaged field by
//! field at positions the builder records. A deterministic mutation loop adds breadth; the
//! cargo-fuzz target in `fuzz/` goes further.

use std::sync::Arc;

use wick::loader::gguf::GgufFile;
use wick::Error;

const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

const GGML_F32: u32 = 0;
const GGML_Q4_0: u32 = 2;
const GGML_Q4_1: u32 = 3;
const GGML_Q5_0: u32 = 6;
const GGML_Q8_0: u32 = 8;

#[derive(Clone)]
struct Kv {
    key: Vec<u8>,
    ty: u32,
    value: Vec<u8>,
}

#[derive(Clone)]
struct Tensor {
    name: Vec<u8>,
    /// GGML `ne`, innermost first.
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Offset in the data section; `None` places the tensor after the previous one.
    offset: Option<u64>,
}

#[derive(Clone)]
struct Gguf {
    version: u32,
    kvs: Vec<Kv>,
    tensors: Vec<Tensor>,
    alignment: u64,
}

/// A serialized file and where its fields are.
struct Built {
    bytes: Vec<u8>,
    /// Start of each key/value (its key length).
    kv_at: Vec<usize>,
    /// Start of each tensor description (its name length).
    info_at: Vec<usize>,
    /// End of the tensor descriptions (before the padding).
    infos_end: usize,
    data_start: usize,
    /// Absolute start of each tensor's data.
    tensor_at: Vec<usize>,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s);
    b
}

fn kv(key: &str, ty: u32, value: Vec<u8>) -> Kv {
    Kv {
        key: key.as_bytes().to_vec(),
        ty,
        value,
    }
}

fn kv_u32(key: &str, v: u32) -> Kv {
    kv(key, T_U32, v.to_le_bytes().to_vec())
}

fn kv_f32(key: &str, v: f32) -> Kv {
    kv(key, T_F32, v.to_le_bytes().to_vec())
}

fn kv_str(key: &str, v: &str) -> Kv {
    kv(key, T_STRING, string(v.as_bytes()))
}

fn array(elem_ty: u32, n: u64, elems: &[u8]) -> Vec<u8> {
    let mut b = elem_ty.to_le_bytes().to_vec();
    b.extend(n.to_le_bytes());
    b.extend(elems);
    b
}

/// Deterministic tensor bytes for `dims` of GGML type `ty`, with a sane f16 scale (0.01) in
/// every block so dequantization yields finite numbers.
fn tensor_bytes(dims: &[u64], ty: u32) -> Vec<u8> {
    let n: u64 = dims.iter().product();
    let (block_elems, block_bytes, f16_at): (u64, usize, &[usize]) = match ty {
        GGML_F32 => (1, 4, &[]),
        GGML_Q8_0 => (32, 34, &[0]),
        GGML_Q4_0 => (32, 18, &[0]),
        GGML_Q4_1 => (32, 20, &[0, 2]),
        GGML_Q5_0 => (32, 22, &[0]),
        _ => unreachable!(),
    };
    if ty == GGML_F32 {
        return (0..n)
            .flat_map(|i| (1.0 + i as f32 * 1e-3).to_le_bytes())
            .collect();
    }
    let mut b: Vec<u8> = (0..n / block_elems * block_bytes as u64)
        .map(|i| (i * 131 % 251) as u8)
        .collect();
    for block in b.chunks_mut(block_bytes) {
        for &o in f16_at {
            block[o..o + 2].copy_from_slice(&[0x1F, 0x21]); // f16 0.01
        }
    }
    b
}

fn tensor(name: &str, dims: &[u64], ty: u32) -> Tensor {
    Tensor {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        ty,
        data: tensor_bytes(dims, ty),
        offset: None,
    }
}

impl Gguf {
    /// A one-layer Qwen3: C=32, H=2, Hkv=1, D=16, F=32, V=4, tied embeddings, with metadata of
    /// every shape the parser handles (strings, arrays of strings and i32, a nested array, a
    /// bool, an explicit alignment).
    fn qwen3() -> Gguf {
        let tokens: Vec<u8> = (0..4)
            .flat_map(|i| string(format!("tok{i}").as_bytes()))
            .collect();
        let types: Vec<u8> = [1i32, 1, 3, 3]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        let mut nested = array(T_U8, 2, &[7, 8]);
        nested.extend(array(T_STRING, 1, &string(b"x")));
        let kvs = vec![
            kv_str("general.architecture", "qwen3"),
            kv_u32("general.alignment", 32),
            kv_u32("qwen3.block_count", 1),
            kv_u32("qwen3.context_length", 256),
            kv_u32("qwen3.embedding_length", 32),
            kv_u32("qwen3.feed_forward_length", 32),
            kv_u32("qwen3.attention.head_count", 2),
            kv_u32("qwen3.attention.head_count_kv", 1),
            kv_u32("qwen3.attention.key_length", 16),
            kv_f32("qwen3.rope.freq_base", 1e6),
            kv_f32("qwen3.attention.layer_norm_rms_epsilon", 1e-6),
            kv_str("tokenizer.ggml.model", "gpt2"),
            kv(
                "tokenizer.ggml.tokens",
                T_ARRAY,
                array(T_STRING, 4, &tokens),
            ),
            kv(
                "tokenizer.ggml.token_type",
                T_ARRAY,
                array(T_I32, 4, &types),
            ),
            kv("test.nested", T_ARRAY, array(T_ARRAY, 2, &nested)),
            kv("tokenizer.ggml.add_bos_token", T_BOOL, vec![0]),
            kv_u32("tokenizer.ggml.eos_token_id", 3),
            kv_str("tokenizer.chat_template", "{{ messages }}"),
        ];
        let tensors = vec![
            tensor("token_embd.weight", &[32, 4], GGML_Q8_0),
            tensor("output_norm.weight", &[32], GGML_F32),
            tensor("blk.0.attn_norm.weight", &[32], GGML_F32),
            tensor("blk.0.attn_q.weight", &[32, 32], GGML_Q8_0),
            tensor("blk.0.attn_k.weight", &[32, 16], GGML_Q4_0),
            tensor("blk.0.attn_v.weight", &[32, 16], GGML_Q4_0),
            tensor("blk.0.attn_output.weight", &[32, 32], GGML_Q8_0),
            tensor("blk.0.attn_q_norm.weight", &[16], GGML_F32),
            tensor("blk.0.attn_k_norm.weight", &[16], GGML_F32),
            tensor("blk.0.ffn_norm.weight", &[32], GGML_F32),
            tensor("blk.0.ffn_gate.weight", &[32, 32], GGML_Q8_0),
            tensor("blk.0.ffn_up.weight", &[32, 32], GGML_Q8_0),
            tensor("blk.0.ffn_down.weight", &[32, 32], GGML_Q4_1),
        ];
        Gguf {
            version: 3,
            kvs,
            tensors,
            alignment: 32,
        }
    }

    /// The same model as a `llama` file (no q/k norms), with the q and k projections in F32
    /// so each row can be recognised after reordering: element `c` of stored row `r` is
    /// `r + c / 1000`.
    fn llama() -> Gguf {
        let mut g = Gguf::qwen3();
        g.tensors
            .retain(|t| !t.name.ends_with(b"_norm.weight") || !t.name.starts_with(b"blk.0.attn_"));
        for kv in &mut g.kvs {
            if let Some(rest) = kv.key.strip_prefix(b"qwen3.") {
                kv.key = [b"llama.".as_slice(), rest].concat();
            }
            if kv.key == b"general.architecture" {
                kv.value = string(b"llama");
            }
        }
        for t in &mut g.tensors {
            if t.name == b"blk.0.attn_q.weight" || t.name == b"blk.0.attn_k.weight" {
                let (cols, rows) = (t.dims[0], t.dims[1]);
                t.ty = GGML_F32;
                t.data = (0..rows)
                    .flat_map(|r| (0..cols).map(move |c| r as f32 + c as f32 / 1000.0))
                    .flat_map(f32::to_le_bytes)
                    .collect();
            }
        }
        g
    }

    fn build(&self) -> Built {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kvs.len() as u64).to_le_bytes());
        let mut kv_at = Vec::new();
        for kv in &self.kvs {
            kv_at.push(b.len());
            b.extend(string(&kv.key));
            b.extend(kv.ty.to_le_bytes());
            b.extend(&kv.value);
        }
        let mut info_at = Vec::new();
        let mut offsets = Vec::new();
        let mut next = 0u64;
        for t in &self.tensors {
            info_at.push(b.len());
            let offset = t.offset.unwrap_or(next);
            offsets.push(offset);
            next = (offset + t.data.len() as u64).div_ceil(self.alignment) * self.alignment;
            b.extend(string(&t.name));
            b.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        let infos_end = b.len();
        let data_start =
            (b.len() as u64).div_ceil(self.alignment) as usize * self.alignment as usize;
        b.resize(data_start, 0);
        let mut tensor_at = Vec::new();
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            let at = data_start + o as usize;
            tensor_at.push(at);
            if b.len() < at + t.data.len() {
                b.resize(at + t.data.len(), 0);
            }
            b[at..at + t.data.len()].copy_from_slice(&t.data);
        }
        Built {
            bytes: b,
            kv_at,
            info_at,
            infos_end,
            data_start,
            tensor_at,
        }
    }
}

impl Built {
    /// Position of tensor `i`'s `n_dims` field.
    fn n_dims_at(&self, g: &Gguf, i: usize) -> usize {
        self.info_at[i] + 8 + g.tensors[i].name.len()
    }

    fn dims_at(&self, g: &Gguf, i: usize) -> usize {
        self.n_dims_at(g, i) + 4
    }

    fn type_at(&self, g: &Gguf, i: usize) -> usize {
        self.dims_at(g, i) + 8 * g.tensors[i].dims.len()
    }

    fn offset_at(&self, g: &Gguf, i: usize) -> usize {
        self.type_at(g, i) + 4
    }

    /// Position of key/value `i`'s value (after key and type).
    fn value_at(&self, g: &Gguf, i: usize) -> usize {
        self.kv_at[i] + 8 + g.kvs[i].key.len() + 4
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn parse(bytes: &[u8]) -> wick::Result<GgufFile> {
    GgufFile::parse(Arc::new(bytes.to_vec()), "corrupt.gguf")
}

/// The whole loading path; any error is fine, a panic is not.
fn load(bytes: &[u8]) -> wick::Result<()> {
    let file = parse(bytes)?;
    let config = file.model_config()?;
    let set = file.tensor_set(&config)?;
    for name in set.names() {
        set.get(name)?.to_f32();
    }
    Ok(())
}

/// Asserts `bytes` is refused as malformed with a message containing every one of `needles`.
#[track_caller]
fn assert_malformed(bytes: &[u8], needles: &[&str]) {
    match parse(bytes) {
        Ok(_) => panic!("parsed a file that should be refused (expected {needles:?})"),
        Err(Error::MalformedWeights { path, message }) => {
            assert_eq!(path.to_str(), Some("corrupt.gguf"));
            for n in needles {
                assert!(message.contains(n), "message {message:?} lacks {n:?}");
            }
        }
        Err(other) => panic!("expected MalformedWeights with {needles:?}, got {other}"),
    }
}

#[test]
fn the_valid_base_files_load_completely() {
    // If these failed, every refusal below could be for the wrong reason.
    load(&Gguf::qwen3().build().bytes).unwrap();
    let file = parse(&Gguf::qwen3().build().bytes).unwrap();
    assert_eq!(file.tensors().len(), 13);
    assert_eq!(file.chat_template(), Some("{{ messages }}"));
    load(&Gguf::llama().build().bytes).unwrap();
}

#[test]
fn llama_q_and_k_rows_come_back_in_hugging_face_order() {
    let file = parse(&Gguf::llama().build().bytes).unwrap();
    let config = file.model_config().unwrap();
    let set = file.tensor_set(&config).unwrap();
    // q: 2 heads of D=16; k: 1 head. Hugging Face row j*8 + i of a head is stored at 2i + j.
    for (name, rows, n_head) in [("q_proj", 32, 2), ("k_proj", 16, 1)] {
        let t = set
            .get(&format!("model.layers.0.self_attn.{name}.weight"))
            .unwrap();
        assert_eq!(t.shape, [rows, 32]);
        let x = t.to_f32();
        let d = rows / n_head;
        for r in 0..rows {
            let (h, within) = (r / d, r % d);
            let (j, i) = (within / (d / 2), within % (d / 2));
            let stored = h * d + 2 * i + j;
            assert_eq!(x[r * 32], stored as f32, "{name} row {r}");
            assert_eq!(x[r * 32 + 5], stored as f32 + 0.005, "{name} row {r}");
        }
    }
    // The same file read as qwen3 keeps the stored order.
    let qwen = parse(&Gguf::qwen3().build().bytes).unwrap();
    let raw = qwen.raw_tensor("blk.0.attn_q.weight").unwrap();
    let set = qwen.tensor_set(&qwen.model_config().unwrap()).unwrap();
    let q = set.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.data.as_slice(), raw.data.as_slice());
}

#[test]
fn every_truncation_of_a_small_file_is_refused() {
    let built = Gguf::qwen3().build();
    let b = &built.bytes;
    // The last tensor ends exactly at the end of the file, so every strict prefix lacks data.
    for len in 0..b.len() {
        match parse(&b[..len]) {
            Err(Error::MalformedWeights { message, .. }) => {
                let named = ["truncated", "outside", "cannot fit"];
                assert!(
                    named.iter().any(|n| message.contains(n)),
                    "prefix {len}: {message}"
                );
            }
            Err(e) => panic!("prefix {len}: unexpected error kind {e}"),
            Ok(_) => panic!("prefix {len} of {} parsed", b.len()),
        }
    }
    // Section boundaries get the specific message.
    assert_malformed(&b[..0], &["header", "needs 4 bytes", "truncated"]);
    assert_malformed(&b[..8], &["header", "truncated"]);
    // With nothing after the header, the counts themselves are refused.
    assert_malformed(
        &b[..built.kv_at[0]],
        &["header", "tensor count", "cannot fit"],
    );
    assert_malformed(
        &b[..built.kv_at[12] + 3],
        &["metadata entry 12", "truncated"],
    );
    assert_malformed(&b[..built.info_at[0]], &["tensor count", "cannot fit"]);
    assert_malformed(&b[..built.infos_end], &["outside"]);
    assert_malformed(&b[..built.data_start], &["outside"]);
    assert_malformed(
        &b[..built.tensor_at[12] + 1],
        &["blk.0.ffn_down.weight", "outside"],
    );
}

#[test]
fn truncations_of_the_fixture_are_refused() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/qwen3-tiny-q4_0.gguf");
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    let file = parse(&b).unwrap();
    let data_end = file
        .tensors()
        .iter()
        .map(|t| file.data_offset() + (t.offset + t.size) as usize)
        .max()
        .unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut cuts = vec![
        0,
        3,
        4,
        8,
        16,
        24,
        25,
        file.data_offset() - 1,
        file.data_offset(),
        data_end - 1,
    ];
    for _ in 0..60 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        cuts.push((state % data_end as u64) as usize);
    }
    for len in cuts {
        assert!(
            parse(&b[..len]).is_err(),
            "prefix {len} of the fixture parsed"
        );
    }
}

#[test]
fn huge_counts_and_lengths_are_refused_before_allocating() {
    let g = Gguf::qwen3();
    let built = g.build();
    let huge = [
        u64::MAX,
        u64::MAX / 2,
        1 << 60,
        1 << 40,
        built.bytes.len() as u64,
    ];
    for n in huge {
        let mut b = built.bytes.clone();
        put_u64(&mut b, 8, n);
        assert_malformed(&b, &["tensor count", "cannot fit"]);
        let mut b = built.bytes.clone();
        put_u64(&mut b, 16, n);
        assert_malformed(&b, &["metadata count", "cannot fit"]);
        // Key length.
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.kv_at[3], n);
        assert_malformed(&b, &["metadata entry 3", "string of length"]);
        // String value length (general.architecture).
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.value_at(&g, 0), n);
        assert_malformed(&b, &["general.architecture", "string of length"]);
        // Array counts: of strings, of i32, of arrays.
        for (kv, what) in [(12, "strings"), (13, "i32"), (14, "arrays")] {
            let mut b = built.bytes.clone();
            put_u64(&mut b, built.value_at(&g, kv) + 4, n);
            let key = std::str::from_utf8(&g.kvs[kv].key).unwrap();
            assert_malformed(&b, &[key, what]);
        }
        // Tensor name length.
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.info_at[5], n);
        assert_malformed(&b, &["tensor 5 of 13", "string of length"]);
    }
}

#[test]
fn overlapping_tensors_are_refused() {
    let mut g = Gguf::qwen3();
    let first = g.build();
    // Put attn_v where attn_k is (both 288 bytes).
    let k_offset = (first.tensor_at[4] - first.data_start) as u64;
    g.tensors[5].offset = Some(k_offset);
    assert_malformed(
        &g.build().bytes,
        &["blk.0.attn_k.weight", "blk.0.attn_v.weight", "overlap"],
    );
    // Partial overlap: the next aligned slot inside a larger tensor.
    let mut g = Gguf::qwen3();
    g.tensors[1].offset = Some(32);
    assert_malformed(
        &g.build().bytes,
        &["token_embd.weight", "output_norm.weight", "overlap"],
    );
}

#[test]
fn out_of_range_and_misaligned_offsets_are_refused() {
    let g = Gguf::qwen3();
    let built = g.build();
    let last = g.tensors.len() - 1;
    let data_len = (built.bytes.len() - built.data_start) as u64;
    for offset in [
        !31u64, // the largest aligned offset
        1 << 62,
        data_len.div_ceil(32) * 32,
        data_len - data_len % 32,
    ] {
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.offset_at(&g, last), offset);
        assert_malformed(&b, &["blk.0.ffn_down.weight", "outside"]);
    }
    for offset in [1, 16, 33] {
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.offset_at(&g, 2), offset);
        assert_malformed(
            &b,
            &[
                "blk.0.attn_norm.weight",
                "not a multiple of the alignment 32",
            ],
        );
    }
}

#[test]
fn bad_dimensions_are_refused() {
    let g = Gguf::qwen3();
    let built = g.build();
    for n_dims in [5, 8, u32::MAX] {
        let mut b = built.bytes.clone();
        put_u32(&mut b, built.n_dims_at(&g, 3), n_dims);
        assert_malformed(&b, &["blk.0.attn_q.weight", "at most 4"]);
    }
    // attn_q has dims [32, 32]: make the product overflow u64 / i64 / usize.
    for (d0, d1) in [
        (u64::MAX, 2),
        (1 << 32, 1 << 32),
        (32, 1 << 63),
        (1 << 62, 4),
    ] {
        let mut b = built.bytes.clone();
        put_u64(&mut b, built.dims_at(&g, 3), d0);
        put_u64(&mut b, built.dims_at(&g, 3) + 8, d1);
        assert_malformed(&b, &["blk.0.attn_q.weight", "overflow"]);
    }
    // A dimension over i64::MAX is refused even when the product is zero.
    let mut b = built.bytes.clone();
    put_u64(&mut b, built.dims_at(&g, 3), 0);
    put_u64(&mut b, built.dims_at(&g, 3) + 8, u64::MAX);
    assert_malformed(&b, &["blk.0.attn_q.weight", "too large"]);
    // Rows must be whole blocks.
    let mut b = built.bytes.clone();
    put_u64(&mut b, built.dims_at(&g, 3), 33);
    assert_malformed(&b, &["blk.0.attn_q.weight", "whole Q8_0 blocks"]);
    // Sizes that are valid but larger than the data are caught by the extent check.
    let mut b = built.bytes.clone();
    put_u64(&mut b, built.dims_at(&g, 12) + 8, 1 << 20);
    assert_malformed(&b, &["blk.0.ffn_down.weight", "outside"]);
}

#[test]
fn unknown_tensor_types_are_refused_by_number_and_name() {
    let g = Gguf::qwen3();
    let built = g.build();
    for ty in [4, 5, 9, 15, 31, 1000, u32::MAX] {
        let mut b = built.bytes.clone();
        put_u32(&mut b, built.type_at(&g, 2), ty);
        assert_malformed(
            &b,
            &[
                "blk.0.attn_norm.weight",
                &format!("unknown GGML tensor type id {ty}"),
            ],
        );
    }
}

#[test]
fn known_types_wick_cannot_compute_with_are_refused_when_loading() {
    // Q5_0 parses (its geometry is known) but the tensor set refuses it by name and type.
    let mut g = Gguf::qwen3();
    g.tensors[12].ty = GGML_Q5_0;
    g.tensors[12].data = tensor_bytes(&[32, 32], GGML_Q5_0);
    let bytes = g.build().bytes;
    let file = parse(&bytes).unwrap();
    assert_eq!(file.tensors()[12].ggml_type.name(), "Q5_0");
    match file.tensor_set(&file.model_config().unwrap()) {
        Err(Error::UnsupportedDType { name, dtype }) => {
            assert_eq!(
                (name.as_str(), dtype.as_str()),
                ("blk.0.ffn_down.weight", "Q5_0")
            );
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
}

#[test]
fn duplicate_tensor_names_and_keys_are_refused() {
    let mut g = Gguf::qwen3();
    g.tensors[6].name = b"blk.0.attn_q.weight".to_vec();
    assert_malformed(
        &g.build().bytes,
        &["tensor `blk.0.attn_q.weight` appears twice"],
    );
    let mut g = Gguf::qwen3();
    g.kvs.push(kv_u32("qwen3.block_count", 2));
    assert_malformed(
        &g.build().bytes,
        &["metadata key `qwen3.block_count` appears twice"],
    );
}

#[test]
fn bad_magic_and_versions_are_refused() {
    let built = Gguf::qwen3().build();
    for magic in [*b"GGML", *b"ggml", *b"GGJT", [0; 4], *b"FUGG"] {
        let mut b = built.bytes.clone();
        b[..4].copy_from_slice(&magic);
        assert_malformed(&b, &["not a GGUF file"]);
    }
    let cases: [(u32, &str); 6] = [
        (0, "unsupported GGUF version 0"),
        (1, "version 1 is not supported"),
        (4, "unsupported GGUF version 4"),
        (u32::MAX, "unsupported GGUF version"),
        (3u32.swap_bytes(), "big-endian"),
        (2u32.swap_bytes(), "big-endian"),
    ];
    for (version, needle) in cases {
        let mut b = built.bytes.clone();
        put_u32(&mut b, 4, version);
        assert_malformed(&b, &[needle]);
    }
    let mut g = Gguf::qwen3();
    g.version = 2;
    load(&g.build().bytes).unwrap();
}

#[test]
fn bad_metadata_values_are_refused() {
    let g = Gguf::qwen3();
    let built = g.build();
    // Unknown value type, and unknown array element type.
    let mut b = built.bytes.clone();
    put_u32(&mut b, built.value_at(&g, 2) - 4, 13);
    assert_malformed(&b, &["qwen3.block_count", "unknown metadata value type 13"]);
    let mut b = built.bytes.clone();
    put_u32(&mut b, built.value_at(&g, 13), 99);
    assert_malformed(
        &b,
        &[
            "tokenizer.ggml.token_type",
            "array of unknown metadata value type 99",
        ],
    );
    // Invalid UTF-8 in a key, in a value, in an array element.
    let mut b = built.bytes.clone();
    b[built.kv_at[2] + 8] = 0xFF;
    assert_malformed(&b, &["metadata entry 2", "UTF-8"]);
    let mut b = built.bytes.clone();
    b[built.value_at(&g, 0) + 8] = 0xC3;
    assert_malformed(&b, &["general.architecture", "UTF-8"]);
    let mut b = built.bytes.clone();
    b[built.value_at(&g, 12) + 12 + 8] = 0x80;
    assert_malformed(&b, &["tokenizer.ggml.tokens", "string element 0", "UTF-8"]);
    // A bool that is neither 0 nor 1.
    let mut b = built.bytes.clone();
    b[built.value_at(&g, 15)] = 2;
    assert_malformed(&b, &["tokenizer.ggml.add_bos_token", "neither 0 nor 1"]);
}

#[test]
fn bad_alignments_are_refused() {
    for value in [0u32, 3, 48, u32::MAX] {
        let mut g = Gguf::qwen3();
        g.kvs[1] = kv_u32("general.alignment", value);
        assert_malformed(&g.build().bytes, &["general.alignment", "power of two"]);
    }
    let mut g = Gguf::qwen3();
    g.kvs[1] = kv("general.alignment", T_U64, 32u64.to_le_bytes().to_vec());
    assert_malformed(&g.build().bytes, &["general.alignment", "u32"]);
    // A different valid alignment is honoured.
    let mut g = Gguf::qwen3();
    g.kvs[1] = kv_u32("general.alignment", 64);
    g.alignment = 64;
    let bytes = g.build().bytes;
    assert_eq!(parse(&bytes).unwrap().alignment(), 64);
    load(&bytes).unwrap();
}

#[test]
fn models_wick_cannot_run_are_refused_by_name() {
    let unsupported = |g: &Gguf| -> String {
        let bytes = g.build().bytes;
        let file = parse(&bytes).unwrap();
        let err = file
            .model_config()
            .and_then(|c| file.tensor_set(&c).map(|_| ()))
            .expect_err("should be refused");
        assert!(matches!(err, Error::UnsupportedModel(_)), "{err}");
        err.to_string()
    };
    let mut g = Gguf::qwen3();
    g.kvs[0] = kv_str("general.architecture", "gpt2");
    assert!(unsupported(&g).contains("`gpt2`"));
    let mut g = Gguf::qwen3();
    g.tensors
        .push(tensor("blk.0.attn_qkv.weight", &[32, 32], GGML_Q8_0));
    assert!(unsupported(&g).contains("blk.0.attn_qkv.weight"));
    let mut g = Gguf::qwen3();
    g.tensors.push(tensor("rope_freqs.weight", &[8], GGML_F32));
    assert!(unsupported(&g).contains("RoPE"));
    let mut g = Gguf::qwen3();
    g.kvs.push(kv_str("qwen3.rope.scaling.type", "yarn"));
    assert!(unsupported(&g).contains("yarn"));
    let mut g = Gguf::qwen3();
    g.kvs.push(kv_u32("qwen3.rope.dimension_count", 8));
    assert!(unsupported(&g).contains("partial rotary"));
    let mut g = Gguf::llama();
    g.tensors
        .push(tensor("blk.0.attn_q_norm.weight", &[16], GGML_F32));
    assert!(unsupported(&g).contains("blk.0.attn_q_norm.weight"));
}

#[test]
fn semantic_errors_name_the_problem() {
    // A tensor of a layer the model does not have.
    let mut g = Gguf::qwen3();
    g.tensors
        .push(tensor("blk.1.ffn_up.weight", &[32, 32], GGML_Q8_0));
    let bytes = g.build().bytes;
    let file = parse(&bytes).unwrap();
    let err = file
        .tensor_set(&file.model_config().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.1.ffn_up.weight") && err.contains("1 layers"),
        "{err}"
    );
    // A missing required key, and a key of the wrong type.
    let mut g = Gguf::qwen3();
    g.kvs.remove(4);
    let err = parse(&g.build().bytes)
        .unwrap()
        .model_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qwen3.embedding_length") && err.contains("missing"),
        "{err}"
    );
    let mut g = Gguf::qwen3();
    g.kvs[4] = kv_str("qwen3.embedding_length", "32");
    let err = parse(&g.build().bytes)
        .unwrap()
        .model_config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qwen3.embedding_length") && err.contains("string"),
        "{err}"
    );
    // Llama q rows that cannot be split into the configured heads.
    let mut g = Gguf::llama();
    g.kvs[8] = kv_u32("llama.attention.key_length", 8);
    g.kvs.push(kv_u32("llama.attention.value_length", 8));
    let bytes = g.build().bytes;
    let file = parse(&bytes).unwrap();
    let config = file.model_config().unwrap();
    match file.tensor_set(&config) {
        Err(Error::ShapeMismatch {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "model.layers.0.self_attn.q_proj.weight");
            assert_eq!((expected, found), (vec![16, 32], vec![32, 32]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

/// Breadth beyond the hand-picked cases: random byte flips, field-sized overwrites with
/// boundary values, truncations, insertions and deletions of the valid file, from a fixed
/// seed. Runs the whole loading path on whatever parses. `WICK_GGUF_MUTATIONS` sets the count
/// (the default keeps the test quick in debug builds).
#[test]
fn random_mutations_never_panic() {
    let iterations: usize = std::env::var("WICK_GGUF_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let bases = [Gguf::qwen3().build().bytes, Gguf::llama().build().bytes];
    let mut state = 0x853C_49E6_748F_EA9Bu64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let specials = [
        0,
        1,
        2,
        3,
        4,
        5,
        8,
        13,
        31,
        32,
        33,
        255,
        256,
        1 << 31,
        u32::MAX as u64,
        1 << 32,
        1 << 62,
        i64::MAX as u64,
        u64::MAX,
    ];
    let mut parsed = 0;
    for it in 0..iterations {
        let mut b = bases[it % 2].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % b.len().max(1);
            match next() % 6 {
                0 => b[at] ^= 1 << (next() % 8),
                1 => b[at] = next() as u8,
                2 if at + 8 <= b.len() => {
                    let v = specials[next() as usize % specials.len()];
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                3 if at + 4 <= b.len() => {
                    let v = specials[next() as usize % specials.len()] as u32;
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                4 => b.truncate(at),
                _ => {
                    let n = (next() % 16) as usize;
                    if next() % 2 == 0 {
                        b.splice(at..at, (0..n).map(|_| next() as u8));
                    } else {
                        b.drain(at..(at + n).min(b.len()));
                    }
                }
            }
            if b.is_empty() {
                break;
            }
        }
        if load(&b).is_ok() {
            parsed += 1;
        }
    }
    // Most single-byte flips in tensor data leave a valid file: the loop does exercise the
    // full path, not only early refusals.
    assert!(
        parsed > iterations / 50,
        "only {parsed} of {iterations} mutants loaded"
    );
}
