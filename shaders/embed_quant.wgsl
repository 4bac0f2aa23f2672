// out[T, C] = table[token_ids] for a block-quantized table (Q6_K / Q8_0 / Q4_0 embeddings;
// llama.cpp keeps `token_embd` in Q6_K in its Q4 files, where it doubles as the LM head).
//
// As embed.wgsl, one dispatch per row segment writing only the tokens whose id falls in it,
// but one thread per group of eight output elements, dequantized by weight_quant.wgsl.
// C is a multiple of QK (checked at upload).

#include "include/weight_quant.wgsl"

const WG: u32 = 64u;

struct Params {
    num_tokens: u32,  // T
    cols: u32,        // C
    ks: u32,          // C again (row stride of the segment in elements)
    row0: u32,        // first token id held by this segment
    seg_rows: u32,    // token ids held by this segment
    tokens_off: u32,  // offset of token_ids[T] in `batch`
    _pad0: u32,
    _pad1: u32,
}

// binding 0: the table segment `w` [seg_rows, C / QK, BLOCK_WORDS] (see weight_quant.wgsl)
@group(0) @binding(1) var<storage, read> batch: array<u32>;           // the step's batch words
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>; // [T, C / 4]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;  // group of eight in out
    let per_row = p.cols / 8u;
    if idx >= p.num_tokens * per_row {
        return;
    }
    let t = idx / per_row;
    let j = idx % per_row;
    let id = batch[p.tokens_off + t];
    if id < p.row0 || id >= p.row0 + p.seg_rows {
        return;
    }
    let row_words = (p.cols / QK) * BLOCK_WORDS;
    let v = w_group8((id - p.row0) * row_words + (j / (QK / 8u)) * BLOCK_WORDS, j % (QK / 8u));
    out[2u * idx] = v.lo;
    out[2u * idx + 1u] = v.hi;
}
