// Q4_1, 5 words (the GGUF block is already word-sized): word 0 = f16 scale `d` (low half)
// and f16 minimum `m` (high half), words 1..5 = qs[16] laid out as in Q4_0.
// Element = nibble · d + m.

const QK: u32 = 32u;
const BLOCK_WORDS: u32 = 5u;

fn w_group8(b: u32, g: u32) -> Group8 {
    let d = half_lo(w[b]);
    let m = half_hi(w[b]);
    let q = b + 1u + 2u * (g & 1u);
    let shift = 4u * (g >> 1u);
    return Group8(nibbles(w[q], shift) * d + m, nibbles(w[q + 1u], shift) * d + m);
}
