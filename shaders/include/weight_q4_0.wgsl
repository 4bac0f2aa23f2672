// Q4_0, repacked to 5 words: word 0 = f16 scale `d` (low half; high half zero),
// words 1..5 = qs[16]: byte j holds element j (low nibble) and element j + 16 (high nibble).
// Element = (nibble - 8) · d.

const QK: u32 = 32u;
const BLOCK_WORDS: u32 = 5u;

fn w_group8(b: u32, g: u32) -> Group8 {
    let d = half_lo(w[b]);
    // Groups 0, 1 are the low nibbles of bytes 0..16; groups 2, 3 the high nibbles.
    let q = b + 1u + 2u * (g & 1u);
    let shift = 4u * (g >> 1u);
    return Group8(
        (nibbles(w[q], shift) - 8.0) * d,
        (nibbles(w[q + 1u], shift) - 8.0) * d,
    );
}
