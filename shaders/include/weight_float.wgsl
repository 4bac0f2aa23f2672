// Float weights, read two elements at a time.
//
// A weight segment is `[rows, ks]` with `ks` = K rounded up to even (the padding column of an
// odd K is zero), so element pairs never straddle rows and one pair is one 32-bit word for
// 16-bit formats. F16 and BF16 stay in their stored bits and are widened here: bf16 by moving
// its bits into the top half of an f32 (exact); f16 with `unpack2x16float` where the device
// allows it (F16_IN_F32: some drivers, llvmpipe among them, only do with shader-f16), else
// with integer operations on the bits (also exact).
//
// The including kernel binds the segment at @group(0) @binding(0).

#ifdef W_F32
// [rows · ks / 2] pairs of f32.
@group(0) @binding(0) var<storage, read> w: array<vec2<f32>>;

fn w_pair(i: u32) -> vec2<f32> {
    return w[i];
}
#endif

#ifdef W_F16
// [rows · ks / 2] words, each two f16 (element 2i in the low half).
@group(0) @binding(0) var<storage, read> w: array<u32>;

#ifdef F16_IN_F32
fn w_pair(i: u32) -> vec2<f32> {
    return unpack2x16float(w[i]);
}
#else
fn w_pair(i: u32) -> vec2<f32> {
    let b = w[i];
    return vec2<f32>(f16_bits_to_f32(b & 0xffffu), f16_bits_to_f32(b >> 16u));
}

// IEEE half → single from the 16 bits in the low half of `h`.
fn f16_bits_to_f32(h: u32) -> f32 {
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
#endif

#ifdef W_BF16
// [rows · ks / 2] words, each two bf16 (element 2i in the low half).
@group(0) @binding(0) var<storage, read> w: array<u32>;

fn w_pair(i: u32) -> vec2<f32> {
    let b = w[i];
    return vec2<f32>(bitcast<f32>(b << 16u), bitcast<f32>(b & 0xffff0000u));
}
#endif

// Element `e` of the segment (row-major with stride ks).
fn w_elem(e: u32) -> f32 {
    let p = w_pair(e >> 1u);
    return select(p.x, p.y, (e & 1u) == 1u);
}
