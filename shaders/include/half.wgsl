// IEEE half ↔ single, for the f16 scales of block-quantized weights and the f16 KV cache.
//
// `half_lo(word)` widens the f16 in the low 16 bits of a word, `half_hi(word)` the one in the
// high 16 bits. With F16_IN_F32 the device's `unpack2x16float` does it; otherwise integer
// operations on the bits (exact as well: every f16 is an f32). `pack_half2` and `round_half`
// go the other way: `pack2x16float` with F16_IN_F32, else `f32_to_half_bits` (round to
// nearest even, like the CPU's conversion).

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

// Single → IEEE half bits (in the low 16 bits), rounding to nearest, ties to even; overflow
// gives infinity, NaN stays NaN. Integer operations only, so it runs on any device.
fn f32_to_half_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let exp8 = (b >> 23u) & 0xffu;
    let man = b & 0x7fffffu;
    if exp8 == 0xffu {
        return sign | 0x7c00u | select(0u, 0x200u, man != 0u);
    }
    let e = i32(exp8) - 112;  // the half's biased exponent
    if e >= 31 {
        return sign | 0x7c00u;
    }
    var m = man;
    var shift = 13u;
    var base = sign | (u32(max(e, 0)) << 10u);
    if e <= 0 {
        // A subnormal half (or zero): the implicit bit joins the mantissa.
        if e < -10 {
            return sign;
        }
        m = man | 0x800000u;
        shift = u32(14 - e);
        base = sign;
    }
    let rem = m & ((1u << shift) - 1u);
    let halfway = 1u << (shift - 1u);
    var h = base | (m >> shift);
    // A carry out of the mantissa steps the exponent up, which is the right result.
    if rem > halfway || (rem == halfway && (h & 1u) == 1u) {
        h += 1u;
    }
    return h;
}

#ifdef F16_IN_F32
// Two singles as halves in one word (`a` in the low bits).
fn pack_half2(a: f32, b: f32) -> u32 {
    return pack2x16float(vec2<f32>(a, b));
}

// `x` rounded to half precision (what a half cache hands back).
fn round_half(x: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}
#else
fn pack_half2(a: f32, b: f32) -> u32 {
    return f32_to_half_bits(a) | (f32_to_half_bits(b) << 16u);
}

fn round_half(x: f32) -> f32 {
    return half_bits_to_f32(f32_to_half_bits(x));
}
#endif
