// ids[R]: the token chosen from each row of logits[R, V], so that a step reads back R ids
// instead of R·V logits.
//
// One workgroup per row, following the host algorithm of src/backend/sample.rs step by step:
// 1. Argmax (lowest id among ties, NaN skipped). It is the answer for greedy rows and for
//    rows whose largest logit is infinite, and the maximum the weights are relative to.
// 2. min-p is a floor on the logit: l >= max + T·ln(min_p).
// 3. top-k and top-p each cut the rank order (logit descending by total order, ties to the
//    lower id) at the token where a running measure over the survivors first reaches a
//    goal: the count reaching k, or the weight exp((l - max)/T) reaching (top_p - slack) of
//    the survivors' mass. The cut is found without sorting, by a radix search: 8 passes over
//    the row pin the cut's 32-bit order key 4 bits at a time (each step sums the measure per
//    4-bit digit of the keys still in range, then picks the digit where the running sum
//    crosses the goal), then up to 8 more pin its id among the tokens with exactly that key.
//    The survivors are the tokens ranked at or above the cut.
// 4. The draw: an exponential race. Each survivor i gets an Exp(1) variate E_i hashed from
//    the row's seed and i, and the largest (l_i - max)/T - ln(E_i) wins (ties to the lower
//    id): token i with probability proportional to exp((l_i - max)/T). One more argmax pass,
//    and, unlike a running sum over the row, it agrees with the host's draw unless two
//    scores are within rounding of each other.
//
// The top-p mass is summed in f32 in a fixed order where the host sums in f64: the nucleus
// can differ only when its edge falls within rounding of a token's cumulative mass.

const WG: u32 = 128u;
// Digits per radix step (4 bits).
const BINS: u32 = 16u;
const NONE: u32 = 0xffffffffu;
// Keep in step with GREEDY_TEMPERATURE and TOP_P_SLACK in src/backend/sample.rs.
const GREEDY_TEMPERATURE: f32 = 1e-5;
const TOP_P_SLACK: f32 = 1e-6;
// f32::MIN: the floor when min-p is off (masked -inf logits stay out).
const F32_MIN: f32 = -3.40282347e38;

struct Params {
    num_rows: u32,  // R
    vocab: u32,     // V, the row stride of `logits`
    _pad0: u32,
    _pad1: u32,
}

// Mirrors RowSampling in src/backend/sample.rs.
struct RowSampling {
    temperature: f32,
    top_k: u32,     // 0 = off
    top_p: f32,     // >= 1 = off
    min_p: f32,     // <= 0 = off
    seed: u32,      // 32 random bits drawn on the host: seed the race noise
    mask: u32,      // index of the row's token mask in `masks`; NONE = every token allowed
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;            // [R, V]
@group(0) @binding(1) var<storage, read> sampling: array<RowSampling>;  // [R]
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;         // [R]
@group(0) @binding(3) var<storage, read> masks: array<u32>;             // [M, ceil(V / 32)]
@group(1) @binding(0) var<uniform> p: Params;

// [BINS, WG] per-thread measures of each digit, reduced into sums[d · WG]; [WG] for wg_sum.
var<workgroup> sums: array<f32, 2048>;
var<workgroup> arg_v: array<f32, WG>;
var<workgroup> arg_i: array<u32, WG>;
// Values thread 0 hands to the whole workgroup (through workgroupUniformLoad).
var<workgroup> bcast_u: u32;
var<workgroup> bcast_f: f32;

// This thread's index and the row's state; the row state is the same in every thread.
var<private> lid: u32;
var<private> base: u32;
// First word of the row's token mask in `masks`, NONE when the row has none.
var<private> mask_base: u32;
var<private> max_l: f32;
var<private> inv_t: f32;
var<private> floor_l: f32;
var<private> has_k: bool;
var<private> k_key: u32;
var<private> k_id: u32;
var<private> has_p: bool;
var<private> p_key: u32;
var<private> p_id: u32;

// By bits: drivers may assume away NaN in float comparisons.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// A key that orders like f32::total_cmp: a larger float has a larger key.
fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x80000000u) != 0u {
        return ~b;
    }
    return b | 0x80000000u;
}

// exp((l - max) / T), 0 below e^-87 (as the host).
fn weight(l: f32) -> f32 {
    let x = (l - max_l) * inv_t;
    if x >= -87.0 {
        return exp(x);
    }
    return 0.0;
}

// Whether (key, i) is ranked at or above the cut (ckey, cid).
fn within(key: u32, i: u32, ckey: u32, cid: u32) -> bool {
    return key > ckey || (key == ckey && i <= cid);
}

// Logit i of the row; -inf for a token the row's mask bans.
fn logit(i: u32) -> f32 {
    if mask_base != NONE && ((masks[mask_base + (i >> 5u)] >> (i & 31u)) & 1u) == 0u {
        return bitcast<f32>(0xff800000u);
    }
    return logits[base + i];
}

// Whether token i with logit l survives min-p and the cuts made so far.
fn survives(i: u32, l: f32) -> bool {
    if is_nan(l) || !(l >= floor_l) {
        return false;
    }
    let key = order_key(l);
    if has_k && !within(key, i, k_key, k_id) {
        return false;
    }
    if has_p && !within(key, i, p_key, p_id) {
        return false;
    }
    return true;
}

fn measure(l: f32, by_weight: bool) -> f32 {
    if by_weight {
        return weight(l);
    }
    return 1.0;
}

// Sum over the workgroup of each thread's acc[d], into sums[d · WG].
fn reduce_bins(acc: array<f32, BINS>) {
    workgroupBarrier();
    for (var d = 0u; d < BINS; d++) {
        sums[d * WG + lid] = acc[d];
    }
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if lid < s {
            for (var d = 0u; d < BINS; d++) {
                sums[d * WG + lid] += sums[d * WG + lid + s];
            }
        }
    }
    workgroupBarrier();
}

// Sum of v over the workgroup, returned to every thread.
fn wg_sum(v: f32) -> f32 {
    workgroupBarrier();
    sums[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        workgroupBarrier();
        if lid < s {
            sums[lid] += sums[lid + s];
        }
    }
    workgroupBarrier();
    if lid == 0u {
        bcast_f = sums[0];
    }
    return workgroupUniformLoad(&bcast_f);
}

// The (value, id) pair with the largest value over the workgroup, ties to the lower id; ids
// of NONE are empty. Returns the id to every thread and leaves the value in bcast_f.
fn wg_argmax(v: f32, i: u32) -> u32 {
    workgroupBarrier();
    arg_v[lid] = v;
    arg_i[lid] = i;
    for (var st = WG / 2u; st > 0u; st = st / 2u) {
        workgroupBarrier();
        if lid < st {
            let ov = arg_v[lid + st];
            let oi = arg_i[lid + st];
            let mi = arg_i[lid];
            if oi != NONE && (mi == NONE || ov > arg_v[lid] || (ov == arg_v[lid] && oi < mi)) {
                arg_v[lid] = ov;
                arg_i[lid] = oi;
            }
        }
    }
    workgroupBarrier();
    if lid == 0u {
        bcast_u = arg_i[0];
        bcast_f = arg_v[0];
    }
    return workgroupUniformLoad(&bcast_u);
}

// Wellons' lowbias32 mixer (as `mix` in src/backend/sample.rs).
fn mix(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// The Exp(1) race noise of token `id` under `seed` (as `race_noise` in src/backend/sample.rs):
// -ln(u) for a hashed u in (0, 1), summed as the series of -ln(1 - x) for x = 1 - u < 1/4,
// where log loses absolute precision.
fn race_noise(seed: u32, id: u32) -> f32 {
    let h = mix(id + mix(seed));
    let u = (f32(h >> 9u) + 0.5) * (1.0 / 8388608.0);
    let x = 1.0 - u;
    if x < 0.25 {
        var e = 1.0 / 14.0;
        for (var n = 13u; n >= 1u; n--) {
            e = e * x + 1.0 / f32(n);
        }
        return e * x;
    }
    return -log(u);
}

// Walks the reduced digits in rank order (15 → 0 when `descending`) from `above`, the
// measure ranked above them all, and picks the first non-empty digit where the running
// measure reaches `goal`. When none does: the last non-empty digit if `fallback` (rounding
// between passes), else NONE. Leaves the measure ranked above the pick in bcast_f.
fn pick(above: f32, goal: f32, descending: bool, fallback: bool) -> u32 {
    if lid == 0u {
        var cum = above;
        var chosen = NONE;
        var last = NONE;
        var last_above = above;
        for (var j = 0u; j < BINS; j++) {
            let d = select(j, BINS - 1u - j, descending);
            let m = sums[d * WG];
            if m > 0.0 {
                if cum + m >= goal {
                    chosen = d;
                    break;
                }
                last = d;
                last_above = cum;
            }
            cum += m;
        }
        if chosen == NONE && fallback {
            chosen = last;
            cum = last_above;
        }
        bcast_u = chosen;
        bcast_f = cum;
    }
    return workgroupUniformLoad(&bcast_u);
}

// The cut where the running measure (count, or weight when `by_weight`) over the survivors,
// in rank order, first reaches `goal`: (1, key, id), or (0, 0, 0) when the survivors never
// reach it (then nothing is cut).
fn find_cut(goal: f32, by_weight: bool) -> vec3<u32> {
    let v = p.vocab;
    var above = 0.0;
    var key = 0u;
    for (var step = 0u; step < 8u; step++) {
        let shift = 28u - 4u * step;
        var acc: array<f32, BINS>;
        for (var i = lid; i < v; i += WG) {
            let l = logit(i);
            if survives(i, l) {
                let k = order_key(l);
                if step == 0u || (k >> (shift + 4u)) == (key >> (shift + 4u)) {
                    acc[(k >> shift) & 15u] += measure(l, by_weight);
                }
            }
        }
        reduce_bins(acc);
        let d = pick(above, goal, true, step > 0u);
        if d == NONE {
            return vec3<u32>(0u, 0u, 0u);
        }
        above = workgroupUniformLoad(&bcast_f);
        key |= d << shift;
    }
    // Ties on the key: lower ids rank higher.
    let id_bits = 32u - countLeadingZeros(max(v - 1u, 1u));
    let passes = (id_bits + 3u) / 4u;
    var id = 0u;
    for (var step = 0u; step < passes; step++) {
        let shift = 4u * (passes - 1u - step);
        var acc: array<f32, BINS>;
        for (var i = lid; i < v; i += WG) {
            let l = logit(i);
            if survives(i, l) && order_key(l) == key {
                if step == 0u || (i >> (shift + 4u)) == (id >> (shift + 4u)) {
                    acc[(i >> shift) & 15u] += measure(l, by_weight);
                }
            }
        }
        reduce_bins(acc);
        let d = pick(above, goal, false, true);
        if d == NONE {
            return vec3<u32>(1u, key, NONE);
        }
        above = workgroupUniformLoad(&bcast_f);
        id |= d << shift;
    }
    return vec3<u32>(1u, key, id);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.num_rows {
        return;
    }
    lid = li;
    let v = p.vocab;
    base = row * v;
    let s = sampling[row];
    mask_base = select(s.mask * ((v + 31u) / 32u), NONE, s.mask == NONE);

    // 1. Argmax: each thread's best (its lowest id among ties), then a tree.
    var bv = 0.0;
    var bi = NONE;
    for (var i = li; i < v; i += WG) {
        let l = logit(i);
        if !is_nan(l) && (bi == NONE || l > bv) {
            bv = l;
            bi = i;
        }
    }
    let best_raw = wg_argmax(bv, bi);
    max_l = workgroupUniformLoad(&bcast_f);
    let best = select(best_raw, 0u, best_raw == NONE);
    let greedy = is_nan(s.temperature) || s.temperature < GREEDY_TEMPERATURE;
    if greedy || best_raw == NONE || !is_finite(max_l) {
        if li == 0u {
            ids[row] = best;
        }
        return;
    }

    // 2. min-p.
    inv_t = 1.0 / s.temperature;
    floor_l = F32_MIN;
    if s.min_p > 0.0 {
        floor_l = max_l + s.temperature * log(s.min_p);
    }
    has_k = false;
    has_p = false;

    // 3. top-k, then top-p over what top-k and min-p left.
    if s.top_k > 0u && s.top_k < v {
        let cut = find_cut(f32(s.top_k), false);
        has_k = cut.x == 1u;
        k_key = cut.y;
        k_id = cut.z;
    }
    if s.top_p < 1.0 {
        var m = 0.0;
        for (var i = li; i < v; i += WG) {
            let l = logit(i);
            if survives(i, l) {
                m += weight(l);
            }
        }
        let z = wg_sum(m);
        let cut = find_cut((s.top_p - TOP_P_SLACK) * z, true);
        has_p = cut.x == 1u;
        p_key = cut.y;
        p_id = cut.z;
    }

    // 4. The draw: an exponential race among the survivors with any weight.
    bv = 0.0;
    bi = NONE;
    for (var i = li; i < v; i += WG) {
        let l = logit(i);
        if survives(i, l) {
            let x = (l - max_l) * inv_t;
            if x >= -87.0 {
                let score = x - log(race_noise(s.seed, i));
                if bi == NONE || score > bv {
                    bv = score;
                    bi = i;
                }
            }
        }
    }
    let winner = wg_argmax(bv, bi);
    if li == 0u {
        ids[row] = select(winner, best, winner == NONE);
    }
}
