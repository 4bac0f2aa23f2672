// The activation x a matrix-vector kernel reads, with the neighbouring op folded in.
//
// Decode runs a handful of tiny kernels per layer, so the row-wise op in front of a product
// is folded into it instead of having its own dispatch (and its own trip through memory):
//
// - plain:  x [T, K] as is.
// - NORM:   rmsnorm(x) · x_norm, x [T, K]; every workgroup recomputes the row's mean square
//           (K reads, from cache) — the RMSNorm in front of the q/k/v and gate/up products.
// - SILU:   silu(gate) · up with x = gate_up [T, 2K]; the SwiGLU in front of down_proj.
//
// The arithmetic is the CPU backend's (and rms_norm.wgsl's / silu_mul.wgsl's): x · inv · w
// with inv = 1 / sqrt(mean(x²) + eps), and g / (1 + exp(-g)) · u. The including kernel
// defines WG, `p.k` and `p.eps`, and calls `x_begin` in uniform control flow.

#ifdef SILU
@group(0) @binding(1) var<storage, read> x: array<f32>;       // [T, 2K] gate | up
#else
@group(0) @binding(1) var<storage, read> x: array<f32>;       // [T, K]
#endif
#ifdef NORM
@group(0) @binding(3) var<storage, read> x_norm: array<f32>;  // [K] RMSNorm weight (f32)

var<workgroup> norm_red: array<f32, WG>;
// 1 / rms of the token's row, set by x_begin.
var<private> x_inv: f32;
#endif

// Prepares token t's row: every thread of the workgroup must call it.
fn x_begin(t: u32, lid: u32) {
#ifdef NORM
    var ss = 0.0;
    for (var k = lid; k < p.k; k += WG) {
        let v = x[t * p.k + k];
        ss += v * v;
    }
    norm_red[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            norm_red[lid] = norm_red[lid] + norm_red[lid + s];
        }
        workgroupBarrier();
    }
    x_inv = 1.0 / sqrt(norm_red[0] / f32(p.k) + p.eps);
#endif
}

// Element k of token t's (transformed) row.
fn x_at(t: u32, k: u32) -> f32 {
#ifdef NORM
    return x[t * p.k + k] * x_inv * x_norm[k];
#else
#ifdef SILU
    let g = x[t * 2u * p.k + k];
    return g / (1.0 + exp(-g)) * x[t * 2u * p.k + p.k + k];
#else
    return x[t * p.k + k];
#endif
#endif
}

// Elements 4q .. 4q+4 of token t's row.
fn x_at4(t: u32, q: u32) -> vec4<f32> {
    let k = 4u * q;
    return vec4<f32>(x_at(t, k), x_at(t, k + 1u), x_at(t, k + 2u), x_at(t, k + 3u));
}
