#!/usr/bin/env python3
"""llama.cpp's own Python reader (gguf-py) as an oracle for wick's GGUF tests.

Needs `pip install gguf numpy`. Called by tests/gguf_reader.rs; nothing here is wick code.

Modes:
  dump FILE.gguf
      Dequantizes every tensor of FILE with gguf.GGUFReader + gguf.quants.dequantize and writes
      them to stdout as records (all integers little-endian):
        u32 name_len, name (UTF-8), u32 n_dims, u64 dims[n_dims] (outermost first),
        u64 n_floats, f32 data[n_floats]
      For `llama` files it also writes, for every attn_q / attn_k weight, a record named
      "<name>#hf": the same tensor with llama.cpp's converter row permutation undone in numpy
      (the Hugging Face row order), so wick's own un-permutation is checked independently.
  dequant TYPE IN OUT
      Dequantizes the raw blocks of GGML type TYPE (e.g. Q5_K) in file IN to raw f32 in OUT.
  quant TYPE IN OUT
      Quantizes the raw f32 of IN to GGML type TYPE with gguf-py's reference quantizer.
"""
import struct
import sys

try:
    import numpy as np
    import gguf
    from gguf.constants import GGMLQuantizationType
except ImportError as e:  # the Rust test prints install instructions on this exit code
    sys.stderr.write(f"gguf-py is not importable ({e}); run: pip install gguf numpy\n")
    sys.exit(3)


def write_record(out, name, arr):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    nb = name.encode()
    out.write(struct.pack("<I", len(nb)))
    out.write(nb)
    out.write(struct.pack("<I", arr.ndim))
    for d in arr.shape:
        out.write(struct.pack("<Q", d))
    out.write(struct.pack("<Q", arr.size))
    out.write(arr.tobytes())


def hf_rows(w, n_head):
    """Undoes convert_hf_to_gguf.py's LlamaModel.permute: stored rows within a head are
    [n_head, D/2, 2]; Hugging Face order is [n_head, 2, D/2]."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def field_int(reader, key):
    return int(reader.fields[key].contents())


def dump(path):
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    out = sys.stdout.buffer
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        write_record(out, t.name, w)
        if arch == "llama" and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
            head_key = "attention.head_count" if ".attn_q." in t.name else "attention.head_count_kv"
            n_head = field_int(reader, f"llama.{head_key}")
            write_record(out, t.name + "#hf", hf_rows(w, n_head))
    out.flush()


def main():
    mode = sys.argv[1]
    if mode == "dump":
        dump(sys.argv[2])
    elif mode in ("dequant", "quant"):
        qtype = GGMLQuantizationType[sys.argv[2]]
        if mode == "dequant":
            blocks = np.fromfile(sys.argv[3], dtype=np.uint8)
            block_elems, block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype]
            blocks = blocks.reshape(-1, block_bytes)
            gguf.quants.dequantize(blocks, qtype).astype("<f4").tofile(sys.argv[4])
        else:
            x = np.fromfile(sys.argv[3], dtype="<f4").reshape(1, -1)
            gguf.quants.quantize(x, qtype).tofile(sys.argv[4])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
