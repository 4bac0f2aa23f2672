// Block-quantized weights, dequantized eight elements at a time inside the kernels.
//
// GGUF blocks are 18, 34, 210... bytes: not whole 32-bit words, so they are repacked at
// upload (see `src/backend/wgpu/repack.rs`) into blocks of BLOCK_WORDS words, padded so that
// every quant array starts on a word boundary. A weight segment is then
//
//     w: [rows, K / QK, BLOCK_WORDS] u32     (row r, block b at word (r · K/QK + b) · BLOCK_WORDS)
//
// and each format file below provides
//
//     const QK: u32            elements per block (32 or 256)
//     const BLOCK_WORDS: u32   words per repacked block
//     fn w_group8(b: u32, g: u32) -> Group8
//         elements 8g .. 8g+8 of the block whose first word is `b`, as f32
//
// computed with exactly the arithmetic (and rounding order) of the scalar reference
// `dequantize_row` in `src/quant/`. The including kernel binds the segment at
// @group(0) @binding(0).

#include "include/half.wgsl"

// Eight consecutive elements of a block.
struct Group8 {
    lo: vec4<f32>,  // elements 8g .. 8g+4
    hi: vec4<f32>,  // elements 8g+4 .. 8g+8
}

@group(0) @binding(0) var<storage, read> w: array<u32>;

#ifdef W_Q8_0
#include "include/weight_q8_0.wgsl"
#endif
#ifdef W_Q4_0
#include "include/weight_q4_0.wgsl"
#endif
#ifdef W_Q4_1
#include "include/weight_q4_1.wgsl"
#endif
#ifdef W_Q4_K
#include "include/weight_q4_k.wgsl"
#endif
#ifdef W_Q5_K
#include "include/weight_q5_k.wgsl"
#endif
#ifdef W_Q6_K
#include "include/weight_q6_k.wgsl"
#endif
