//! The one sampling algorithm: the per-row parameters of [`Backend::sample`] and the host
//! reference every backend reproduces (the CPU backend calls it, `shaders/sample.wgsl`
//! mirrors it step by step).
//!
//! A backend that samples where the logits live (the GPU) reads back R token ids per step
//! instead of `[R, V]` logits. What needs a request's history or the logits on the host
//! (penalties, logprobs) is done by [`crate::sampler::Sampler`] before and beside this draw,
//! never by another algorithm.
//!
//! The filters follow vLLM v1's order: temperature → min-p → top-k → top-p → draw, with a
//! greedy cut-off ([`GREEDY_TEMPERATURE`]), one ranking (logit descending by
//! `f32::total_cmp`, ties to the lower id), a top-p slack ([`TOP_P_SLACK`]), and one fallback
//! (an infinite maximum logit takes the argmax).
//!
//! The draw is an exponential race. Every surviving token `i` gets an Exp(1) variate `E_i`
//! from a hash of the row's 32-bit `seed` and `i` ([`race_noise`]), and the token with the
//! largest `(l_i - max) / T - ln E_i` wins (ties to the lower id). That picks token `i` with
//! probability `w_i / Σ w` for weights `w_i = exp((l_i - max) / T)`, but as an argmax, not a
//! running sum over up to V tokens: a backend that sums in another order or precision agrees
//! with the host unless two scores are within rounding of each other, so a seed gives the
//! same token on every backend.
//!
//! [`Backend::sample`]: super::Backend::sample

use std::cmp::Ordering;

/// Temperatures below this sample greedily. Dividing by a tiny temperature only overflows on
/// the way to the same argmax; vLLM uses the same cut-off.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// Slack when deciding where the top-p nucleus ends, relative to the total probability, so
/// that a cumulative probability landing exactly on `top_p` (0.5 + 0.3 for `top_p = 0.8`) is
/// not decided by rounding in the softmax.
pub const TOP_P_SLACK: f32 = 1e-6;

/// How to choose the token of one row of logits. Mirrored field for field by `RowSampling`
/// in `shaders/sample.wgsl` (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowSampling {
    /// Softmax temperature; below [`GREEDY_TEMPERATURE`] (or NaN) the argmax is taken.
    pub temperature: f32,
    /// Keep the `top_k` highest-ranked tokens; 0 (or ≥ V) = off.
    pub top_k: u32,
    /// Keep the highest-ranked tokens whose probability first adds up to `top_p`; ≥ 1 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the largest; ≤ 0 = off.
    pub min_p: f32,
    /// 32 random bits drawn on the host from the request's seeded generator, one draw per
    /// step: they seed the race noise that picks the token. Unused when greedy.
    pub seed: u32,
    /// Which of the step's token masks holds for this row ([`NO_MASK`]: none). A mask is
    /// [`mask_words`] u32 words, bit `i % 32` of word `i / 32` set when token `i` may be
    /// drawn (a grammar's allowed tokens, [`crate::grammar`]).
    pub mask: u32,
    /// Padding to 32 bytes.
    pub _pad: [u32; 2],
}

/// [`RowSampling::mask`] of a row every token of which may be drawn.
pub const NO_MASK: u32 = u32::MAX;

/// Words of one token mask over a vocabulary of `vocab` tokens.
pub fn mask_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

impl RowSampling {
    /// Always the most likely token (lowest id on ties).
    pub fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            mask: NO_MASK,
            _pad: [0; 2],
        }
    }

    /// Temperature sampling with the given filters and seed.
    pub fn new(temperature: f32, top_k: u32, top_p: f32, min_p: f32, seed: u32) -> Self {
        RowSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            mask: NO_MASK,
            _pad: [0; 2],
        }
    }

    /// Whether the argmax is taken.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE
    }

    /// Whether min-p, top-k and top-p all let every token of a `vocab`-token row through.
    fn filters_off(&self, vocab: usize) -> bool {
        self.min_p <= 0.0 && (self.top_k == 0 || self.top_k as usize >= vocab) && self.top_p >= 1.0
    }
}

const _: () = assert!(size_of::<RowSampling>() == 32);

/// Index of the largest logit, the lowest among ties; NaN skipped; 0 when every logit is NaN.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Unnormalised probability `exp((l - max) / T)`, 0 below `e^-87`.
fn weight(l: f32, max: f32, inv_t: f32) -> f32 {
    let x = (l - max) * inv_t;
    if x >= -87.0 {
        x.exp()
    } else {
        0.0
    }
}

/// A strong 32-bit mixer (Wellons' `lowbias32`): every output bit depends on every input bit.
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The Exp(1) variate `E` of token `id` in a row drawn with `seed` (`shaders/sample.wgsl` has
/// the same function).
///
/// A uniform `u = (k + ½) / 2^23` in (0, 1) from 23 hashed bits, then `E = -ln u`. Small `E`
/// (u near 1) decide races, and there `ln` loses absolute precision, so for `x = 1 - u < ¼`
/// (exact in f32) `E = -ln(1 - x)` is summed as its series `x + x²/2 + x³/3 + …`.
pub fn race_noise(seed: u32, id: u32) -> f32 {
    let h = mix(id.wrapping_add(mix(seed)));
    let u = ((h >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0);
    let x = 1.0 - u;
    if x < 0.25 {
        // 14 terms: x^15 / 15 < 1e-10 for x < ¼.
        let mut e = 1.0 / 14.0;
        for n in (1..14).rev() {
            e = e * x + 1.0 / n as f32;
        }
        e * x
    } else {
        -u.ln()
    }
}

/// The race score of a logit: `(l - max) / T - ln E`; `None` for a token of no weight
/// (`(l - max) / T < -87`, as in [`weight`]).
fn race_score(l: f32, max: f32, inv_t: f32, seed: u32, id: u32) -> Option<f32> {
    let x = (l - max) * inv_t;
    (x >= -87.0).then(|| x - race_noise(seed, id).ln())
}

/// Rank order: logit descending (`total_cmp`), ties to the lower id.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Chooses the token of one row of logits `[V]` (see the module docs for the algorithm).
/// `scratch` holds the survivors (up to `[V]`); it is reused across calls.
pub fn sample_row(logits: &[f32], p: &RowSampling, scratch: &mut Vec<(u32, f32)>) -> u32 {
    sample_row_with(logits, p, scratch, false)
}

/// [`sample_row`]; with `parallel`, a row without filters runs its race on the current rayon
/// pool, in chunks (the winner does not depend on how the row is cut).
fn sample_row_with(
    logits: &[f32],
    p: &RowSampling,
    scratch: &mut Vec<(u32, f32)>,
    parallel: bool,
) -> u32 {
    assert!(!logits.is_empty(), "sampling an empty row");
    let best = argmax(logits);
    let max = logits[best as usize];
    if p.is_greedy() || !max.is_finite() {
        return best;
    }
    let race = Race {
        max,
        inv_t: 1.0 / p.temperature,
        seed: p.seed,
    };
    // The argmax survives every filter; its score is where the race starts.
    let start = race.enter(None, best, max);
    let winner = if p.filters_off(logits.len()) {
        // Every token races: straight from the logits, without copying them.
        let run = |base: usize, chunk: &[f32]| {
            chunk
                .iter()
                .enumerate()
                .fold(start, |w, (i, &l)| race.enter(w, (base + i) as u32, l))
        };
        if parallel && logits.len() >= 2 * RACE_CHUNK {
            use rayon::prelude::*;
            logits
                .par_chunks(RACE_CHUNK)
                .enumerate()
                .map(|(c, chunk)| run(c * RACE_CHUNK, chunk))
                .reduce(|| start, Race::better)
        } else {
            run(0, logits)
        }
    } else {
        filter(logits, p, max, scratch);
        scratch
            .iter()
            .fold(start, |w, &(id, l)| race.enter(w, id, l))
    };
    winner.map_or(best, |(id, _)| id)
}

/// Logits per chunk of a parallel race.
const RACE_CHUNK: usize = 16384;

/// An upper bound of `-ln E` over every noise [`race_noise`] gives: its smallest `E` is
/// about `2^-24` (`u` one half-step below 1), so `-ln E ≤ 16.64`. A token whose
/// `(l - max) / T` is more than this below the best score so far cannot win, and its noise
/// is not computed; on a trained model that is most of the vocabulary.
const MAX_NEG_LN_NOISE: f32 = 17.0;

/// The exponential race of one row.
#[derive(Clone, Copy)]
struct Race {
    max: f32,
    inv_t: f32,
    seed: u32,
}

impl Race {
    /// The leader after token `id` with logit `l` enters against `leader`: the larger
    /// [`race_score`], ties to the lower id. Tokens that cannot beat the leader are
    /// skipped without their noise (see [`MAX_NEG_LN_NOISE`]).
    fn enter(self, leader: Option<(u32, f32)>, id: u32, l: f32) -> Option<(u32, f32)> {
        if let Some((_, ws)) = leader {
            if (l - self.max) * self.inv_t + MAX_NEG_LN_NOISE < ws {
                return leader;
            }
        }
        match race_score(l, self.max, self.inv_t, self.seed, id) {
            Some(score) => Race::better(leader, Some((id, score))),
            None => leader,
        }
    }

    /// The better of two leaders: the higher score, ties to the lower id.
    fn better(a: Option<(u32, f32)>, b: Option<(u32, f32)>) -> Option<(u32, f32)> {
        match (a, b) {
            (Some((ai, a_s)), Some((bi, b_s))) => {
                if b_s > a_s || (b_s == a_s && bi < ai) {
                    b
                } else {
                    a
                }
            }
            (None, x) | (x, None) => x,
        }
    }
}

/// The filters of a row that is not greedy and whose largest logit `max` is finite: leaves
/// in `cands` the `(id, logit)` of the tokens min-p, top-k and top-p let through, in no
/// particular order.
pub(crate) fn filter(logits: &[f32], p: &RowSampling, max: f32, cands: &mut Vec<(u32, f32)>) {
    let t = p.temperature;
    let inv_t = 1.0 / t;
    // min-p in logit space: p_i >= min_p · p_max  ⇔  l_i >= max + T ln(min_p).
    let floor = if p.min_p > 0.0 {
        max + t * p.min_p.ln()
    } else {
        f32::MIN
    };
    cands.clear();
    cands.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, &l)| l >= floor)
            .map(|(i, &l)| (i as u32, l)),
    );
    let k = p.top_k as usize;
    if k > 0 && k < cands.len() {
        cands.select_nth_unstable_by(k - 1, by_rank);
        cands.truncate(k);
    }
    if p.top_p < 1.0 {
        // The nucleus: the highest-ranked survivors whose weights first reach
        // (top_p - slack) of the survivors' mass.
        let total: f64 = cands.iter().map(|c| weight(c.1, max, inv_t) as f64).sum();
        let target = (p.top_p - TOP_P_SLACK) as f64 * total;
        cands.sort_unstable_by(by_rank);
        let mut cum = 0.0f64;
        for i in 0..cands.len() {
            let w = weight(cands[i].1, max, inv_t);
            cum += w as f64;
            if w > 0.0 && cum >= target {
                cands.truncate(i + 1);
                break;
            }
        }
    }
}

/// [`sample_row`] over `rows` rows of `logits` (`[rows, V]`), writing `out[rows]`; a row's
/// race runs on the current rayon pool (the CPU backend's, inside its step).
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    params: &[RowSampling],
    masks: &[u32],
    out: &mut [u32],
    scratch: &mut Vec<(u32, f32)>,
) {
    let words = mask_words(vocab);
    for ((row, p), o) in logits.chunks_exact(vocab).zip(params).zip(out.iter_mut()) {
        *o = match masks.get(p.mask as usize * words..(p.mask as usize + 1) * words) {
            Some(mask) if p.mask != NO_MASK => {
                let mut masked = row.to_vec();
                apply_mask(&mut masked, mask);
                sample_row_with(&masked, p, scratch, true)
            }
            _ => sample_row_with(row, p, scratch, true),
        };
    }
}

/// Sets every logit whose bit in `mask` is clear (or past its end) to -inf: the token
/// cannot be drawn.
pub fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (c, chunk) in logits.chunks_mut(32).enumerate() {
        let word = mask.get(c).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (j, l) in chunk.iter_mut().enumerate() {
            if word >> j & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_lowest_id_among_ties_and_skips_nan() {
        let g = RowSampling::greedy();
        let mut s = Vec::new();
        assert_eq!(sample_row(&[1.0, 3.0, 3.0, 2.0], &g, &mut s), 1);
        assert_eq!(sample_row(&[f32::NAN, 0.5, 0.5], &g, &mut s), 1);
        assert_eq!(sample_row(&[f32::NAN, f32::NAN], &g, &mut s), 0);
        assert_eq!(
            sample_row(&[f32::NEG_INFINITY, f32::NEG_INFINITY], &g, &mut s),
            0
        );
    }

    /// The race without shortcuts: every token's score, the best one (ties to the lower id).
    fn full_race(l: &[f32], p: &RowSampling) -> u32 {
        let max = l[argmax(l) as usize];
        let mut w: Option<(u32, f32)> = None;
        for (i, &x) in l.iter().enumerate() {
            if let Some(s) = race_score(x, max, 1.0 / p.temperature, p.seed, i as u32) {
                if w.is_none_or(|(wi, ws)| s > ws || (s == ws && (i as u32) < wi)) {
                    w = Some((i as u32, s));
                }
            }
        }
        w.unwrap().0
    }

    #[test]
    fn the_pruned_and_parallel_race_picks_what_the_full_race_picks() {
        // Logits spread as a trained model's (a few high, a long tail 20+ below: the bound
        // skips most) and as a random model's (all close: it skips none), over 3 chunks.
        let n = 3 * RACE_CHUNK + 77;
        let mut state = 12345u32;
        let mut next = || {
            state = mix(state.wrapping_add(0x9e37_79b9));
            state as f32 / u32::MAX as f32
        };
        let wide: Vec<f32> = (0..n)
            .map(|i| {
                if i % 997 == 0 {
                    20.0 + 5.0 * next()
                } else {
                    10.0 * next() - 5.0
                }
            })
            .collect();
        let narrow: Vec<f32> = (0..n).map(|_| next()).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let mut scratch = Vec::new();
        for l in [&wide, &narrow] {
            for seed in 0..40 {
                for t in [0.3, 1.0, 2.5] {
                    let p = RowSampling::new(t, 0, 1.0, 0.0, seed);
                    let want = full_race(l, &p);
                    assert_eq!(sample_row(l, &p, &mut scratch), want, "seed {seed} T {t}");
                    let mut out = [0u32];
                    pool.install(|| sample_rows(l, n, &[p], &[], &mut out, &mut scratch));
                    assert_eq!(out[0], want, "parallel, seed {seed} T {t}");
                }
            }
        }
    }

    /// How often each id is drawn over `n` seeds.
    fn frequencies(l: &[f32], p: impl Fn(u32) -> RowSampling, n: u32) -> Vec<f64> {
        let mut s = Vec::new();
        let mut count = vec![0.0; l.len()];
        for seed in 0..n {
            count[sample_row(l, &p(seed), &mut s) as usize] += 1.0 / n as f64;
        }
        count
    }

    #[track_caller]
    fn assert_near(got: &[f64], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            // 20000 draws: a standard deviation of at most 0.0036.
            assert!((g - w).abs() < 0.015, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn filters_follow_the_sampler_and_the_race_draws_by_weight() {
        // Weights at T = 1: e^-3, e^-1, e^0, e^-2, i.e. 0.032, 0.237, 0.644, 0.087 of the mass.
        let l = [-3.0f32, -1.0, 0.0, -2.0];
        let n = 20_000;
        // Top-k 1 is the argmax whatever the seed.
        assert_near(
            &frequencies(&l, |s| RowSampling::new(1.0, 1, 1.0, 0.0, s), n),
            &[0.0, 0.0, 1.0, 0.0],
        );
        // Top-p 0.7 keeps ids 2 and 1 (0.644 < 0.7 ≤ 0.881), renormalised.
        let two = [0.0, 0.269, 0.731, 0.0];
        assert_near(
            &frequencies(&l, |s| RowSampling::new(1.0, 0, 0.7, 0.0, s), n),
            &two,
        );
        // min-p 0.3 drops e^-2 / e^0 = 0.135 and below: the same two remain.
        assert_near(
            &frequencies(&l, |s| RowSampling::new(1.0, 0, 1.0, 0.3, s), n),
            &two,
        );
        // Top-k 3 drops id 0.
        let three = [0.0, 0.245, 0.665, 0.090];
        assert_near(
            &frequencies(&l, |s| RowSampling::new(1.0, 3, 1.0, 0.0, s), n),
            &three,
        );
        // Unfiltered at T = 2: weights e^(l/2).
        let z: f64 = l.iter().map(|&x| (x as f64 / 2.0).exp()).sum();
        let soft: Vec<f64> = l.iter().map(|&x| (x as f64 / 2.0).exp() / z).collect();
        assert_near(
            &frequencies(&l, |s| RowSampling::new(2.0, 0, 1.0, 0.0, s), n),
            &soft,
        );
    }

    #[test]
    fn race_noise_is_exponential_and_continuous_across_its_two_branches() {
        let n = 200_000u32;
        let (mut mean, mut below_ln2) = (0.0f64, 0u32);
        for id in 0..n {
            let e = race_noise(12345, id) as f64;
            assert!(e > 0.0 && e.is_finite());
            mean += e / n as f64;
            below_ln2 += (e < std::f64::consts::LN_2) as u32;
        }
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // P(E < ln 2) = 1/2.
        assert!((below_ln2 as f64 / n as f64 - 0.5).abs() < 0.005);
        // The series at x just under ¼ agrees with -ln(u) at u = ¾.
        let series_at = |x: f32| {
            let mut e = 1.0 / 14.0;
            for k in (1..14).rev() {
                e = e * x + 1.0 / k as f32;
            }
            e * x
        };
        let x = 0.25 - 1.0 / 8_388_608.0;
        assert!((series_at(x) - -(1.0f32 - x).ln()).abs() < 2e-7);
    }
}
