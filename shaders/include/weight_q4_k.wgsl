// Q4_K, 36 words (the GGUF block is already word-sized): word 0 = f16 `d` (low half) and
// f16 `dmin` (high half), words 1..4 = packed scales[12], words 4..36 = qs[128]: chunk c
// (bytes 32c..32c+32) holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
// Element l of sub-block s = (d · scale_s) · q − dmin · min_s.

#include "include/weight_kscale.wgsl"

const QK: u32 = 256u;
const BLOCK_WORDS: u32 = 36u;

fn w_group8(b: u32, g: u32) -> Group8 {
    let c = g / 8u;              // 64-element chunk
    let h = (g % 8u) / 4u;       // 0: low nibbles (sub-block 2c), 1: high (2c+1)
    let sm = k_scale_min(b, 2u * c + h);
    let dl = half_lo(w[b]) * sm.x;
    let ml = half_hi(w[b]) * sm.y;
    let q = b + 4u + 8u * c + 2u * (g % 4u);
    return Group8(
        dl * nibbles(w[q], 4u * h) - ml,
        dl * nibbles(w[q + 1u], 4u * h) - ml,
    );
}
