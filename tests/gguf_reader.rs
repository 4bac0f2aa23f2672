//! Golden tests of the GGUF reader and the block formats.
//!
//! The oracles are files and code wick did not produce: the llama.cpp-converted fixtures in
//! `../shared/fixtures`, the real SmolLM2 Q4_1 file (path in `WICK_SMOLLM2_GGUF`), the
//! bf16 Hugging Face checkpoint the fixtures were converted from, and llama.cpp's own Python
//! reader gguf-py (driven through `tests/gguf_py_dequant.py`). Dequantization is compared
//! bit for bit: wick and gguf-py perform the same f32 operations in the same order (f16 → f32
//! is exact), so any difference is a bug, not rounding.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wick::config::{Architecture, ModelConfig};
use wick::loader::gguf::GgufFile;
use wick::loader::names::gguf_to_hf;
use wick::quant::{self, DType};

mod common;

use common::{fixture, smollm2};

fn python() -> Command {
    Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
}

fn oracle_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gguf_py_dequant.py")
}

/// Fails loudly, with install instructions, when gguf-py cannot be imported.
fn require_gguf_py() {
    match python().args(["-c", "import gguf, numpy"]).output() {
        Err(e) => panic!(
            "cannot run python3 ({e}); these tests compare against llama.cpp's gguf-py: \
             install Python 3, then `pip install gguf numpy`"
        ),
        Ok(o) if !o.status.success() => panic!(
            "gguf-py is not importable:\n{}\ninstall it with `pip install gguf numpy`",
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
}

/// A scratch directory for files exchanged with the oracle script, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("wick-gguf-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_oracle(args: &[&std::ffi::OsStr]) {
    let out = python().arg(oracle_script()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "gguf_py_dequant.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_bits_equal(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: element count");
    let bad: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i].to_bits() != theirs[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} elements differ from gguf-py; first at {i}: wick {:e} vs gguf-py {:e}",
            bad.len(),
            ours.len(),
            ours[i],
            theirs[i]
        );
    }
}

/// One tensor dequantized by gguf-py.
struct Record {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn read_u32(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    match r.read_exact(&mut b) {
        Ok(()) => Some(u32::from_le_bytes(b)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
        Err(e) => panic!("reading gguf-py output: {e}"),
    }
}

fn read_u64(r: &mut impl Read) -> u64 {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).expect("gguf-py output cut short");
    u64::from_le_bytes(b)
}

fn read_record(r: &mut impl Read) -> Option<Record> {
    let name_len = read_u32(r)? as usize;
    let mut name = vec![0u8; name_len];
    r.read_exact(&mut name).expect("gguf-py output cut short");
    let n_dims = read_u32(r).expect("gguf-py output cut short");
    let shape = (0..n_dims).map(|_| read_u64(r) as usize).collect();
    let n = read_u64(r) as usize;
    let mut bytes = vec![0u8; n * 4];
    r.read_exact(&mut bytes).expect("gguf-py output cut short");
    Some(Record {
        name: String::from_utf8(name).unwrap(),
        shape,
        data: f32s(&bytes),
    })
}

/// Compares wick's view of every tensor of `path` with gguf-py's: shapes, and dequantized
/// values bit for bit, both as stored (GGUF names) and as handed to the model (Hugging Face
/// names, q/k rows reordered for Llama).
fn compare_every_tensor_with_gguf_py(path: &Path) {
    require_gguf_py();
    let file = GgufFile::open(path).unwrap();
    let config = file.model_config().unwrap();
    let set = file.tensor_set(&config).unwrap();
    assert_eq!(set.len(), file.tensors().len());
    let llama = config.architecture == Architecture::Llama;

    let mut child = python()
        .arg(oracle_script())
        .arg("dump")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().unwrap());
    let mut seen = HashSet::new();
    let mut hf_order_checked = 0;
    while let Some(rec) = read_record(&mut out) {
        if let Some(base) = rec.name.strip_suffix("#hf") {
            // gguf-py's tensor with the converter's permutation undone in numpy.
            let t = set.get(&gguf_to_hf(base).unwrap()).unwrap();
            assert_eq!(t.shape, rec.shape, "{base}");
            assert_bits_equal(
                &format!("{base} in Hugging Face row order"),
                &t.to_f32(),
                &rec.data,
            );
            hf_order_checked += 1;
            continue;
        }
        let raw = file.raw_tensor(&rec.name).unwrap();
        assert_eq!(raw.shape, rec.shape, "{}: shape", rec.name);
        assert_bits_equal(&rec.name, &raw.to_f32(), &rec.data);

        let hf = set.get(&gguf_to_hf(&rec.name).unwrap()).unwrap();
        assert_eq!(
            (hf.dtype, &hf.shape),
            (raw.dtype, &raw.shape),
            "{}",
            rec.name
        );
        let qk = rec.name.ends_with(".attn_q.weight") || rec.name.ends_with(".attn_k.weight");
        if llama && qk {
            assert_ne!(
                hf.data.as_slice(),
                raw.data.as_slice(),
                "{}: rows not reordered",
                rec.name
            );
        } else {
            // Same bytes at the same address: mapped in place, not copied, not reordered.
            assert_eq!(
                hf.data.as_slice().as_ptr(),
                raw.data.as_slice().as_ptr(),
                "{}",
                rec.name
            );
            assert_eq!(hf.data.len(), raw.data.len());
        }
        assert!(seen.insert(rec.name.clone()), "{} dumped twice", rec.name);
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "gguf_py_dequant.py dump {} failed",
        path.display()
    );
    assert_eq!(
        seen.len(),
        file.tensors().len(),
        "gguf-py dumped every tensor"
    );
    let expected_hf = if llama {
        2 * config.num_hidden_layers
    } else {
        0
    };
    assert_eq!(
        hf_order_checked, expected_hf,
        "q/k tensors checked in Hugging Face order"
    );
}

fn dtypes(file: &GgufFile) -> BTreeSet<&'static str> {
    file.tensors().iter().map(|t| t.ggml_type.name()).collect()
}

/// Shape checks of the tensors the model reads, by Hugging Face name.
fn check_hf_shapes(file: &GgufFile, c: &ModelConfig) {
    let set = file.tensor_set(c).unwrap();
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    set.get_shaped("model.embed_tokens.weight", &[v, h])
        .unwrap();
    set.get_shaped("model.norm.weight", &[h]).unwrap();
    assert_eq!(
        set.try_get("lm_head.weight").is_none(),
        c.tie_word_embeddings
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        let shaped = |n: &str, s: &[usize]| set.get_shaped(&format!("{p}{n}"), s).unwrap().dtype;
        shaped("input_layernorm.weight", &[h]);
        shaped("post_attention_layernorm.weight", &[h]);
        shaped("self_attn.q_proj.weight", &[c.q_dim(), h]);
        shaped("self_attn.k_proj.weight", &[c.kv_dim(), h]);
        shaped("self_attn.v_proj.weight", &[c.kv_dim(), h]);
        shaped("self_attn.o_proj.weight", &[h, c.q_dim()]);
        shaped("mlp.gate_proj.weight", &[f, h]);
        shaped("mlp.up_proj.weight", &[f, h]);
        shaped("mlp.down_proj.weight", &[h, f]);
        if c.has_qk_norm() {
            shaped("self_attn.q_norm.weight", &[c.head_dim]);
            shaped("self_attn.k_norm.weight", &[c.head_dim]);
        }
    }
    let per_layer = if c.has_qk_norm() { 11 } else { 9 };
    let global = if c.tie_word_embeddings { 2 } else { 3 };
    assert_eq!(set.len(), global + per_layer * c.num_hidden_layers);
}

#[test]
fn qwen3_q8_0_config_equals_the_hugging_face_config() {
    let file = GgufFile::open(fixture("qwen3-tiny-q8_0.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    let c = file.model_config().unwrap();
    let hf = ModelConfig::from_file(&fixture("qwen3-tiny/config.json")).unwrap();
    assert_eq!(c, hf);
    assert!(c.tie_word_embeddings, "no output.weight: tied");
    assert_eq!(dtypes(&file), BTreeSet::from(["F32", "Q8_0"]));
    assert_eq!(file.tensors().len(), 24);
    check_hf_shapes(&file, &c);
    let template = file.chat_template().expect("chat template in metadata");
    assert!(template.contains("<|im_start|>"), "{template}");
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")
        .unwrap()
        .unwrap();
    assert_eq!(tokens.len(), 151936);
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), Some("qwen2"));
    assert_eq!(
        file.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(false)
    );
}

#[test]
fn qwen3_q4_0_types_and_config() {
    let file = GgufFile::open(fixture("qwen3-tiny-q4_0.gguf")).unwrap();
    let c = file.model_config().unwrap();
    let hf = ModelConfig::from_file(&fixture("qwen3-tiny/config.json")).unwrap();
    assert_eq!(c, hf);
    assert_eq!(dtypes(&file), BTreeSet::from(["F32", "Q4_0", "Q8_0"]));
    assert_eq!(
        file.tensor_info("token_embd.weight")
            .unwrap()
            .ggml_type
            .name(),
        "Q8_0"
    );
    assert_eq!(
        file.tensor_info("blk.1.ffn_up.weight")
            .unwrap()
            .ggml_type
            .name(),
        "Q4_0"
    );
    check_hf_shapes(&file, &c);
}

#[test]
fn qwen3_tiny256_q4_k_m_types_and_config() {
    let file = GgufFile::open(fixture("qwen3-tiny256-q4_k_m.gguf")).unwrap();
    let c = file.model_config().unwrap();
    assert_eq!(c.architecture, Architecture::Qwen3);
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (256, 2, 4, 2)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (64, 768, 151936)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (1e6, 1e-6));
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.as_slice()),
        (Some(151643), &[151645][..])
    );
    assert_eq!(dtypes(&file), BTreeSet::from(["F32", "Q4_K", "Q6_K"]));
    assert_eq!(
        file.tensor_info("token_embd.weight")
            .unwrap()
            .ggml_type
            .name(),
        "Q6_K"
    );
    check_hf_shapes(&file, &c);
}

#[test]
fn smollm2_q4_1_config_types_and_tied_embeddings() {
    let file = GgufFile::open(smollm2()).unwrap();
    let c = file.model_config().unwrap();
    let expected = ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        vocab_size: 49152,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    assert_eq!(c, expected);
    assert_eq!(dtypes(&file), BTreeSet::from(["F32", "Q4_1", "Q8_0"]));
    assert_eq!(
        file.tensor_info("token_embd.weight")
            .unwrap()
            .ggml_type
            .name(),
        "Q8_0"
    );
    check_hf_shapes(&file, &c);
    assert_eq!(file.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    assert!(file.chat_template().unwrap().contains("<|im_start|>"));
}

#[test]
fn qwen3_q8_0_every_tensor_matches_gguf_py() {
    compare_every_tensor_with_gguf_py(&fixture("qwen3-tiny-q8_0.gguf"));
}

#[test]
fn qwen3_q4_0_every_tensor_matches_gguf_py() {
    compare_every_tensor_with_gguf_py(&fixture("qwen3-tiny-q4_0.gguf"));
}

#[test]
fn qwen3_tiny256_q4_k_m_every_tensor_matches_gguf_py() {
    compare_every_tensor_with_gguf_py(&fixture("qwen3-tiny256-q4_k_m.gguf"));
}

#[test]
fn smollm2_every_tensor_matches_gguf_py_and_qk_rows_are_in_hugging_face_order() {
    compare_every_tensor_with_gguf_py(&smollm2());
}

/// Against the bf16 checkpoint the fixture was converted from: every Hugging Face tensor is
/// present under the same name and shape, within Q8_0's rounding. A q/k projection left in
/// llama.cpp's permuted order (or any misnamed tensor) would be off by whole weights.
#[test]
fn qwen3_q8_0_tensors_match_the_original_checkpoint_within_quantization_error() {
    let file = GgufFile::open(fixture("qwen3-tiny-q8_0.gguf")).unwrap();
    let config = file.model_config().unwrap();
    let gguf = file.tensor_set(&config).unwrap();
    let hf = wick::loader::safetensors::load_dir(&fixture("qwen3-tiny")).unwrap();
    let hf_names: BTreeSet<&str> = hf.names().collect();
    let gguf_names: BTreeSet<&str> = gguf.names().collect();
    assert_eq!(gguf_names, hf_names);
    for name in hf.names() {
        let (a, b) = (hf.get(name).unwrap(), gguf.get(name).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        let (x, y) = (a.to_f32(), b.to_f32());
        match b.dtype {
            DType::F32 => assert_bits_equal(name, &y, &x),
            DType::Q8_0 => {
                for (k, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    // Half a step, plus the f16 rounding of the scale times |q| <= 127.
                    let tol = 0.5 * amax / 127.0 * 1.2 + 1e-12;
                    for (i, (p, q)) in xb.iter().zip(yb).enumerate() {
                        assert!(
                            (p - q).abs() <= tol,
                            "{name} block {k} elem {i}: {p} vs {q}"
                        );
                    }
                }
            }
            other => panic!("{name}: unexpected {other}"),
        }
    }
}

/// A deterministic xorshift generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Any finite f16 bit pattern (normal, subnormal, ±0), little-endian.
    fn finite_f16(&mut self) -> [u8; 2] {
        let mut bits = self.next() as u16;
        if bits & 0x7C00 == 0x7C00 {
            bits &= !0x4000;
        }
        bits.to_le_bytes()
    }

    /// Roughly normal with a per-call scale spanning several decades.
    fn weight(&mut self, scale: f32) -> f32 {
        let u: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (u - 2.0) * scale
    }
}

/// Byte offsets of the f16 fields of each block format.
fn f16_fields(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q8_0 | DType::Q4_0 => &[0],
        DType::Q4_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q6_K => &[208],
        _ => unreachable!(),
    }
}

/// Random blocks of every format (every quant, scale and min bit pattern; every finite f16
/// super-scale) dequantized by wick and by gguf-py. This is the only oracle for `Q5_K`, which
/// no fixture uses.
#[test]
fn block_formats_match_gguf_py_bit_for_bit_on_random_blocks() {
    require_gguf_py();
    let dir = Scratch::new("blocks");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for dtype in [
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
    ] {
        let n_blocks = 2048;
        let mut blocks: Vec<u8> = (0..n_blocks * dtype.block_bytes())
            .map(|_| rng.next() as u8)
            .collect();
        for b in blocks.chunks_mut(dtype.block_bytes()) {
            for &o in f16_fields(dtype) {
                b[o..o + 2].copy_from_slice(&rng.finite_f16());
            }
        }
        let (input, output) = (
            dir.0.join(format!("{dtype}.bin")),
            dir.0.join(format!("{dtype}.f32")),
        );
        std::fs::write(&input, &blocks).unwrap();
        let args: [&std::ffi::OsStr; 4] = [
            "dequant".as_ref(),
            dtype.name().as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ];
        run_oracle(&args);
        let theirs = f32s(&std::fs::read(&output).unwrap());
        let mut ours = vec![0.0; n_blocks * dtype.block_elems()];
        quant::dequantize_row(dtype, &blocks, &mut ours);
        assert_bits_equal(&format!("random {dtype} blocks"), &ours, &theirs);
    }
}

/// wick's reference quantizers produce the same bytes as gguf-py's, which follows GGML's
/// `quantize_row_*_ref` bit for bit.
#[test]
fn q8_0_and_q4_0_quantizers_match_gguf_py_byte_for_byte() {
    require_gguf_py();
    let dir = Scratch::new("quant");
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut x: Vec<f32> = Vec::new();
    for block in 0..512 {
        let scale = [1e-4, 0.02, 1.0, 300.0][block % 4];
        x.extend((0..32).map(|_| rng.weight(scale)));
    }
    // Edge blocks: all zero, one non-zero, exact ties between levels, equal magnitudes of
    // opposite sign (the first one sets the sign of the Q4_0 scale).
    x.extend([0.0; 32]);
    x.extend((0..32).map(|i| if i == 7 { -3.0 } else { 0.0 }));
    x.extend((0..32).map(|i| (i as f32 - 16.0) * 0.5));
    x.extend((0..32).map(|i| if i % 2 == 0 { 2.0 } else { -2.0 }));
    x.extend((0..32).map(|i| if i % 2 == 0 { -2.0 } else { 2.0 }));
    let input = dir.0.join("x.f32");
    std::fs::write(&input, bytemuck::cast_slice(&x)).unwrap();
    for dtype in [DType::Q8_0, DType::Q4_0] {
        let output = dir.0.join(format!("{dtype}.bin"));
        let args: [&std::ffi::OsStr; 4] = [
            "quant".as_ref(),
            dtype.name().as_ref(),
            input.as_os_str(),
            output.as_os_str(),
        ];
        run_oracle(&args);
        let theirs = std::fs::read(&output).unwrap();
        let mut ours = vec![0u8; dtype.bytes_for(x.len()).unwrap()];
        match dtype {
            DType::Q8_0 => quant::q8_0::quantize_row_ref(&x, &mut ours),
            _ => quant::q4_0::quantize_row_ref(&x, &mut ours),
        }
        let bad = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert_eq!(ours.len(), theirs.len(), "{dtype}: byte count");
        assert!(
            bad.is_none(),
            "{dtype}: first differing byte at {bad:?} (block {})",
            bad.unwrap_or(0) / dtype.block_bytes()
        );
    }
}
