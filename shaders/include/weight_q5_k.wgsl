// Q5_K, 44 words (the GGUF block is already word-sized): word 0 = f16 `d` | f16 `dmin`,
// words 1..4 = packed scales[12] (as Q4_K), words 4..12 = qh[32] (bit s of byte l: fifth
// bit of element l of sub-block s), words 12..44 = qs[128] laid out as in Q4_K.
// Element l of sub-block s = (d · scale_s) · (nibble + 16 · bit) − dmin · min_s.

#include "include/weight_kscale.wgsl"

const QK: u32 = 256u;
const BLOCK_WORDS: u32 = 44u;

// The fifth bits (bit s of each byte of `word`) as 0.0 or 16.0.
fn fifth_bits(word: u32, s: u32) -> vec4<f32> {
    let v = (word >> s) & 0x01010101u;
    return vec4<f32>(vec4<u32>(v & 1u, (v >> 8u) & 1u, (v >> 16u) & 1u, v >> 24u)) * 16.0;
}

fn w_group8(b: u32, g: u32) -> Group8 {
    let c = g / 8u;
    let h = (g % 8u) / 4u;
    let s = 2u * c + h;
    let sm = k_scale_min(b, s);
    let dl = half_lo(w[b]) * sm.x;
    let ml = half_hi(w[b]) * sm.y;
    let qh = b + 4u + 2u * (g % 4u);
    let q = b + 12u + 8u * c + 2u * (g % 4u);
    return Group8(
        dl * (nibbles(w[q], 4u * h) + fifth_bits(w[qh], s)) - ml,
        dl * (nibbles(w[q + 1u], 4u * h) + fifth_bits(w[qh + 1u], s)) - ml,
    );
}
