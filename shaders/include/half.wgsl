// IEEE half → single, for the f16 scales of block-quantized weights.
//
// `half_lo(word)` widens the f16 in the low 16 bits of a word, `half_hi(word)` the one in the
// high 16 bits. With F16_IN_F32 the device's `unpack2x16float` does it; otherwise integer
// operations on the bits (exact as well: every f16 is an f32).

#ifdef F16_IN_F32
fn half_lo(word: u32) -> f32 {
    return unpack2x16float(word).x;
}

fn half_hi(word: u32) -> f32 {
    return unpack2x16float(word).y;
}
#else
fn half_lo(word: u32) -> f32 {
    return half_bits_to_f32(word & 0xffffu);
}

fn half_hi(word: u32) -> f32 {
    return half_bits_to_f32(word >> 16u);
}

// The f16 whose 16 bits are the low half of `h`.
fn half_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exp = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if exp == 0u {
        // Zero or subnormal: man · 2^-24, exactly representable in f32.
        return bitcast<f32>(sign | bitcast<u32>(f32(man) * 5.9604645e-8));
    }
    if exp == 31u {
        return bitcast<f32>(sign | 0x7f800000u | (man << 13u));
    }
    return bitcast<f32>(sign | ((exp + 112u) << 23u) | (man << 13u));
}
#endif

// Byte `i` (0..4) of a word, zero-extended.
fn byte_of(word: u32, i: u32) -> u32 {
    return (word >> (8u * i)) & 0xffu;
}

// The four bytes of a word as signed integers, widened to f32.
fn i8x4(word: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word));
    return vec4<f32>(v >> vec4<u32>(24u));
}

// The low nibbles (hi = 0u) or high nibbles (hi = 4u) of the four bytes of a word.
fn nibbles(word: u32, hi: u32) -> vec4<f32> {
    let w = word >> hi;
    return vec4<f32>(vec4<u32>(w & 0xfu, (w >> 8u) & 0xfu, (w >> 16u) & 0xfu, (w >> 24u) & 0xfu));
}
