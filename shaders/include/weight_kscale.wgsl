// The 6-bit scale and minimum of sub-block `s` (0..8) of a Q4_K / Q5_K block whose packed
// scales[12] are words b+1 .. b+4 (see `q4_k::scale_min`). Returns (scale, minimum).
fn k_scale_min(b: u32, s: u32) -> vec2<f32> {
    let lo = byte_of(w[b + 1u + s / 4u], s % 4u);        // scales[s]
    let mid = byte_of(w[b + 2u + s / 4u], s % 4u);       // scales[s + 4]
    if s < 4u {
        return vec2<f32>(f32(lo & 63u), f32(mid & 63u));
    }
    let below = byte_of(w[b + 1u + (s - 4u) / 4u], s % 4u);  // scales[s - 4]
    let sc = (mid & 0xfu) | ((below >> 6u) << 4u);
    let mn = (mid >> 4u) | ((lo >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}
