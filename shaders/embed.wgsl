// out[T, C] = table[token_ids]: gathers embedding rows from one row segment of the table.
//
// A table larger than one storage binding is split by rows into segments; one dispatch per
// segment writes only the tokens whose id falls in it. One thread per output element.

#include "include/weight_float.wgsl"

const WG: u32 = 64u;

struct Params {
    num_tokens: u32,  // T
    cols: u32,        // C
    ks: u32,          // row stride of the segment in elements (C rounded up to even)
    row0: u32,        // first token id held by this segment
    seg_rows: u32,    // token ids held by this segment
    tokens_off: u32,  // offset of token_ids[T] in `batch`
    _pad0: u32,
    _pad1: u32,
}

// binding 0: the table segment `w` [seg_rows, ks] (see weight_float.wgsl)
@group(0) @binding(1) var<storage, read> batch: array<u32>;     // the step's batch words
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // [T, C]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if idx >= p.num_tokens * p.cols {
        return;
    }
    let t = idx / p.cols;
    let c = idx % p.cols;
    let id = batch[p.tokens_off + t];
    if id < p.row0 || id >= p.row0 + p.seg_rows {
        return;
    }
    out[idx] = w_elem((id - p.row0) * p.ks + c);
}
