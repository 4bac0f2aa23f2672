// Q8_0, repacked to 9 words: word 0 = f16 scale `d` (low half; high half zero),
// words 1..9 = qs[32] (i8, element j in byte j % 4 of word 1 + j / 4).
// Element j = qs[j] · d.

const QK: u32 = 32u;
const BLOCK_WORDS: u32 = 9u;

fn w_group8(b: u32, g: u32) -> Group8 {
    let d = half_lo(w[b]);
    let q = b + 1u + 2u * g;
    return Group8(i8x4(w[q]) * d, i8x4(w[q + 1u]) * d);
}
