//! Choosing the next token from the logits: greedy (the default), or
//! sampled with a temperature and nucleus (`top_p`) from a seeded
//! per-sequence generator.
//!
//! Reproducible by construction: a token depends only on its logits (which
//! the batch-invariant forward pass makes independent of batching and of
//! the cache) and on the request's seed and the token's index in the
//! output. The generator is SplitMix64, whose state is a counter, so a
//! preempted request that resumes skips the draws of the tokens it already
//! has in O(1) ([`Sampler::new`]'s `skip`). Each sampled token takes
//! exactly one draw; greedy tokens take none.
//!
//! A sampled token is drawn from `softmax(logits / temperature)`, restricted
//! to the nucleus: the fewest highest-logit tokens (ties by lower id) whose
//! probability reaches `top_p`. The nucleus always holds the greedy token,
//! so a tiny `top_p` decodes greedily.

use crate::error::{EngineError, Result};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The largest temperature accepted (OpenAI's bound).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// How a request's tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy; otherwise in `(0, 2]`.
    pub temperature: f32,
    /// The nucleus' probability mass, in `(0, 1]`.
    pub top_p: f32,
    /// Seeds the sequence's generator (unused when greedy).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    /// Always the highest logit (ties: the lowest id).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Sampling at `temperature` from the `top_p` nucleus, seeded; checked.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Self> {
        let s = Self {
            temperature,
            top_p,
            seed,
        };
        s.check()?;
        Ok(s)
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Temperature in `[0, 2]`, `top_p` in `(0, 1]`.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(EngineError::InvalidArgument(format!(
                "temperature {} is outside [0, {MAX_TEMPERATURE}]",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidArgument(format!(
                "top_p {} is outside (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A seed for a request that gives none: different on every call.
pub fn random_seed() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    // std's per-process random hash keys, a counter and the clock.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 (Steele, Lea and Flood): the state is a counter, each output
/// a mix of it.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform `f64` in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One sequence's token chooser.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    /// The chooser of a request's tokens from its `skip`th on (a resumed
    /// request skips the draws of the tokens it has).
    pub fn new(sampling: Sampling, skip: usize) -> Self {
        let start = sampling
            .seed
            .wrapping_add((skip as u64).wrapping_mul(GOLDEN));
        Self {
            sampling,
            rng: SplitMix64(start),
        }
    }

    /// The next token after `logits`.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.is_greedy() {
            return argmax(logits);
        }
        let u = self.rng.unit();
        sample(logits, self.sampling.temperature, self.sampling.top_p, u)
    }
}

/// The first index of the largest logit (greedy decoding).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The token that the uniform draw `u` in `[0, 1)` picks from the nucleus
/// of `softmax(logits / temperature)`.
fn sample(logits: &[f32], temperature: f32, top_p: f32, u: f64) -> u32 {
    let best = argmax(logits) as usize;
    let (max, t) = (f64::from(logits[best]), f64::from(temperature));
    // Unnormalised probabilities: the greedy token's is 1.
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if top_p >= 1.0 {
        // The whole vocabulary, in id order.
        let target = u * total;
        let mut acc = 0.0;
        for (i, &w) in weights.iter().enumerate() {
            acc += w;
            if acc > target {
                return i as u32;
            }
        }
        return best as u32;
    }
    let nucleus = nucleus(logits, &weights, total * f64::from(top_p));
    let mass: f64 = nucleus.iter().map(|&i| weights[i as usize]).sum();
    let target = u * mass;
    let mut acc = 0.0;
    for &i in &nucleus {
        acc += weights[i as usize];
        if acc > target {
            return i;
        }
    }
    nucleus.last().copied().unwrap_or(best as u32)
}

/// The fewest highest-logit tokens (ties: lower id first) whose weights sum
/// to at least `want`, in that order.
fn nucleus(logits: &[f32], weights: &[f64], want: f64) -> Vec<u32> {
    // Sorting the whole vocabulary for every token is slow; the nucleus is
    // within any top set (every token whose weight is at or above a cut)
    // that reaches `want`, so try cuts from near the top down (the last
    // one takes every token).
    for cut in [1e-3, 1e-6, 1e-12, 0.0] {
        let mut top: Vec<u32> = (0..weights.len() as u32)
            .filter(|&i| weights[i as usize] >= cut)
            .collect();
        let sum: f64 = top.iter().map(|&i| weights[i as usize]).sum();
        if sum < want && cut > 0.0 {
            continue;
        }
        top.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let mut acc = 0.0;
        let mut end = top.len();
        for (k, &i) in top.iter().enumerate() {
            acc += weights[i as usize];
            if acc >= want {
                end = k + 1;
                break;
            }
        }
        top.truncate(end);
        return top;
    }
    unreachable!("the last cut takes every token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_are_refused() {
        assert!(Sampling::new(0.0, 1.0, 0).is_ok());
        assert!(Sampling::new(2.0, 0.01, 0).is_ok());
        for (t, p) in [
            (-0.1, 1.0),
            (2.01, 1.0),
            (f32::NAN, 1.0),
            (1.0, 0.0),
            (1.0, 1.5),
            (1.0, f32::NAN),
        ] {
            assert!(Sampling::new(t, p, 0).is_err(), "{t} {p}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_and_skipping_resumes_the_stream() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 / 3.0).collect();
        let s = Sampling::new(1.0, 0.9, 42).unwrap();
        let run = |skip: usize, n: usize| {
            let mut sampler = Sampler::new(s, skip);
            (0..n).map(|_| sampler.next(&logits)).collect::<Vec<_>>()
        };
        let all = run(0, 40);
        assert_eq!(all, run(0, 40));
        assert_eq!(&all[25..], &run(25, 15)[..]);
        let other = Sampler::new(Sampling { seed: 43, ..s }, 0);
        let mut other = other;
        let theirs: Vec<u32> = (0..40).map(|_| other.next(&logits)).collect();
        assert_ne!(all, theirs);
    }

    #[test]
    fn a_tiny_nucleus_is_greedy_and_ties_go_to_the_lower_id() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.9];
        for seed in 0..100 {
            let mut s = Sampler::new(Sampling::new(2.0, 1e-6, seed).unwrap(), 0);
            assert_eq!(s.next(&logits), 1);
        }
    }

    #[test]
    fn draws_follow_the_distribution_within_the_nucleus() {
        // Probabilities at temperature 1: about 0.665, 0.245, 0.090.
        let logits = [2.0f32, 1.0, 0.0];
        let mut counts = [0usize; 3];
        let mut s = Sampler::new(Sampling::new(1.0, 1.0, 7).unwrap(), 0);
        let n = 20_000;
        for _ in 0..n {
            counts[s.next(&logits) as usize] += 1;
        }
        let p: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
        assert!((p[0] - 0.665).abs() < 0.02, "{p:?}");
        assert!((p[1] - 0.245).abs() < 0.02, "{p:?}");
        assert!((p[2] - 0.090).abs() < 0.02, "{p:?}");
        // top_p 0.8 keeps the first two (0.665 < 0.8 <= 0.91), renormalised.
        let mut counts = [0usize; 3];
        let mut s = Sampler::new(Sampling::new(1.0, 0.8, 7).unwrap(), 0);
        for _ in 0..n {
            counts[s.next(&logits) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let p0 = counts[0] as f64 / n as f64;
        assert!((p0 - 0.665 / 0.91).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn the_nucleus_search_takes_lower_cuts_when_the_top_falls_short() {
        // One token of weight 1 and 100,000 of weight e^-10 (4.5e-5, below
        // the first cut): the nucleus of 0.9 needs most of the small ones.
        let mut logits = vec![-10.0f32; 100_001];
        logits[500] = 0.0;
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let total: f64 = weights.iter().sum();
        let n = nucleus(&logits, &weights, 0.9 * total);
        assert_eq!(n[0], 500);
        assert_eq!(&n[1..4], &[0, 1, 2]);
        let mass: f64 = n.iter().map(|&i| weights[i as usize]).sum();
        assert!(mass >= 0.9 * total);
        assert!(mass - weights[*n.last().unwrap() as usize] < 0.9 * total);
    }
}
