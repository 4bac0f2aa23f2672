// Q6_K, repacked to 53 words (the 210-byte GGUF block plus two zero bytes): words 0..32 =
// ql[128] (low 4 bits), words 32..48 = qh[64] (high 2 bits), words 48..52 = scales[16] (i8),
// word 52 = f16 `d` (low half). Two halves of 128 elements; in half n, element 32r + l
// (r = 0..4, l = 0..32) has low bits from nibble r / 2 of ql[64n + 32(r % 2) + l], high bits
// from bits 2r..2r+2 of qh[32n + l], and scale scales[8n + 2r + l / 16].
// Element = (d · scale) · (q − 32).

const QK: u32 = 256u;
const BLOCK_WORDS: u32 = 53u;

// The low two bits of each byte of `word`.
fn crumbs(word: u32) -> vec4<f32> {
    let v = word & 0x03030303u;
    return vec4<f32>(vec4<u32>(v & 3u, (v >> 8u) & 3u, (v >> 16u) & 3u, v >> 24u));
}

fn w_group8(b: u32, g: u32) -> Group8 {
    let n = g / 16u;
    let r = (g % 16u) / 4u;
    let l = 8u * (g % 4u);
    let ql = b + 16u * n + 8u * (r & 1u) + l / 4u;
    let qh = b + 32u + 8u * n + l / 4u;
    let is = 8u * n + 2u * r + l / 16u;
    let sc = f32((bitcast<i32>(byte_of(w[b + 48u + is / 4u], is % 4u) << 24u)) >> 24u);
    let dl = half_lo(w[b + 52u]) * sc;
    let shift = 4u * (r >> 1u);
    let q0 = nibbles(w[ql], shift) + 16.0 * crumbs(w[qh] >> (2u * r));
    let q1 = nibbles(w[ql + 1u], shift) + 16.0 * crumbs(w[qh + 1u] >> (2u * r));
    return Group8(dl * (q0 - 32.0), dl * (q1 - 32.0));
}
