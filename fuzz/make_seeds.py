"""Writes the small GGUF seed files in seeds/gguf_parse/ with llama.cpp's gguf-py writer.

Usage: pip install gguf numpy && python3 fuzz/make_seeds.py
Seeds are tiny but complete models (every tensor kind wick maps, several block formats,
array and nested-array metadata), so mutations start from inputs that reach deep code.
"""
import os

import numpy as np
import gguf
from gguf.constants import GGMLQuantizationType as T, GGML_QUANT_SIZES

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "gguf_parse")
rng = np.random.default_rng(0)


def raw(shape, qtype):
    """Random bytes for a tensor of `shape` (outermost first) in block format `qtype`, with
    every f16 scale set to a small finite value."""
    rows, cols = shape
    be, bb = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, cols // be, bb), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    offs = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [bb - 2]}
    for o in offs[qtype]:
        b[:, :, o:o + 2] = scale
    return b.reshape(rows, -1)


def model(path, arch, hidden, heads, kv_heads, ffn, vocab, qtype, qk_norm, tied, down_qtype=None):
    down_qtype = down_qtype or qtype
    w = gguf.GGUFWriter(path, arch)
    head_dim = hidden // heads
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    w.add_array("test.nested", [[1, 2], ["a", "b"], [True]])
    w.add_tensor("token_embd.weight", raw((vocab, hidden), qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", raw((vocab, hidden), qtype), raw_dtype=qtype)
    p = "blk.0."
    w.add_tensor(p + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor(p + "attn_q.weight", raw((heads * head_dim, hidden), qtype), raw_dtype=qtype)
    w.add_tensor(p + "attn_k.weight", raw((kv_heads * head_dim, hidden), qtype), raw_dtype=qtype)
    w.add_tensor(p + "attn_v.weight", raw((kv_heads * head_dim, hidden), qtype), raw_dtype=qtype)
    w.add_tensor(p + "attn_output.weight", raw((hidden, heads * head_dim), qtype), raw_dtype=qtype)
    if qk_norm:
        w.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
        w.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
    w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor(p + "ffn_gate.weight", raw((ffn, hidden), qtype), raw_dtype=qtype)
    w.add_tensor(p + "ffn_up.weight", raw((ffn, hidden), qtype), raw_dtype=qtype)
    w.add_tensor(p + "ffn_down.weight", raw((hidden, ffn), down_qtype), raw_dtype=down_qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


os.makedirs(OUT, exist_ok=True)
model(f"{OUT}/qwen3_q8_0.gguf", "qwen3", 32, 2, 1, 32, 8, T.Q8_0, True, True)
model(f"{OUT}/llama_q4_1.gguf", "llama", 32, 2, 2, 64, 8, T.Q4_1, False, False)
model(f"{OUT}/llama_q4_0.gguf", "llama", 64, 4, 2, 32, 4, T.Q4_0, False, True)
# The K formats need rows of 256: only the FFN down projection (rows of F = 256) uses them.
model(f"{OUT}/qwen3_q4_k.gguf", "qwen3", 32, 2, 1, 256, 2, T.Q8_0, True, True, T.Q4_K)
model(f"{OUT}/qwen3_q5_k.gguf", "qwen3", 32, 4, 2, 256, 1, T.Q8_0, True, False, T.Q5_K)
model(f"{OUT}/qwen3_q6_k.gguf", "qwen3", 32, 2, 2, 256, 1, T.Q4_0, True, True, T.Q6_K)
