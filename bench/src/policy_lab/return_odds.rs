//! Return odds: LRU shifted by the log-odds that a block is used again.
//!
//! Model: a block used in class `c` comes back with probability `p_c`, and
//! if it does, after an exponential wait of mean `μ` (the trace's return
//! gaps fit one: coefficient of variation ≈ 1.2, quartiles 244 / 560 / 1054
//! requests for a document's first return). After `a` requests idle, the
//! log-odds that it is still coming back are `logit(p_c) − a / μ`, so
//! ranking by them is LRU with each block shifted later by
//! `μ · logit(p_c)`: no tuned weight, and a block whose class rarely
//! returns ranks below LRU.
//!
//! A block's class at each use: its document's uses so far (1, 2, 3, 4+),
//! the log₂ length of the document's first request, the log₂ output length
//! of the request, and how close the block is to the request's end (the
//! last blocks of a request are its own: the last one is used again 5% of
//! the time, the fourth from the end 39%). `μ` is learned per use count.
//!
//! `p_c` is learned online with censoring accounted for: a use `a` requests
//! old counts as `1 − e^{−a/μ}` of a trial (the chance a returning block
//! would have returned by now), so a young class is not taken for one that
//! never returns. Sparse classes borrow strength from (use count, output)
//! and then from the use count alone, by `PSEUDO` pseudo-trials each.

use std::collections::HashMap;

use super::{fkey, output_bucket, LabPolicy, World, NONE, OUTPUT_BUCKETS};

const USES: usize = 4;
const LENGTHS: usize = 10;
const DEPTHS: usize = 5;
const FINE: usize = USES * LENGTHS * OUTPUT_BUCKETS * DEPTHS;
const COARSE: usize = USES * OUTPUT_BUCKETS;
/// Pseudo-trials a class borrows from its parent.
const PSEUDO: f64 = 4.0;
/// The most a class is trusted: odds of 9 to 1 (a shift of 2.2 μ). Beyond
/// it, a handful of documents could pin their class for thousands of requests.
const P_MAX: f64 = 0.9;
const P_MIN: f64 = 0.01;

/// A block's class at one use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Class {
    uses: usize,
    fine: usize,
    coarse: usize,
}

impl Class {
    fn new(family_uses: u32, first_len: usize, output: u64, from_end: usize) -> Self {
        let uses = (family_uses as usize).clamp(1, USES) - 1;
        let len = ((usize::BITS - first_len.leading_zeros()) as usize).min(LENGTHS - 1);
        let out = output_bucket(Some(output));
        let coarse = uses * OUTPUT_BUCKETS + out;
        Self {
            uses,
            fine: (coarse * LENGTHS + len) * DEPTHS + from_end.min(DEPTHS - 1),
            coarse,
        }
    }
}

/// Uses and returns of one class: uses as (time, blocks), so that the
/// censoring weight can follow `μ` as it is learned.
#[derive(Debug, Clone, Default)]
struct Tally {
    uses: Vec<(u32, f64)>,
    returns: f64,
}

impl Tally {
    fn used(&mut self, t: usize) {
        match self.uses.last_mut() {
            Some((at, n)) if *at as usize == t => *n += 1.0,
            _ => self.uses.push((t as u32, 1.0)),
        }
    }

    /// Uses weighted by the chance a returning block would be back by `now`.
    fn trials(&self, now: usize, mu: f64) -> f64 {
        let trials: f64 = self
            .uses
            .iter()
            .map(|&(t, n)| n * (1.0 - (-((now - t as usize) as f64) / mu).exp()))
            .sum();
        trials.max(self.returns)
    }

    fn estimate(&self, now: usize, mu: f64, prior: f64) -> f64 {
        (self.returns + PSEUDO * prior) / (self.trials(now, mu) + PSEUDO)
    }
}

/// Where `p_c` and `μ` come from.
#[derive(Debug)]
enum Source {
    /// Learned as the trace plays.
    Online {
        fine: Vec<Tally>,
        coarse: Vec<Tally>,
        by_uses: Vec<Tally>,
        /// Sum and count of return gaps per use count.
        gaps: Vec<(f64, f64)>,
    },
    /// Hindsight about the population: each class's uses and the share of
    /// them followed by another use, and mean gaps, over the whole trace.
    /// A block's odds leave out its own document (see [`ReturnOdds::fitted`]).
    Fitted {
        uses: Vec<f64>,
        again: Vec<f64>,
        own: HashMap<(usize, usize), (f64, f64)>,
        mu: Vec<f64>,
    },
}

/// See the module docs.
#[derive(Debug)]
pub struct ReturnOdds {
    source: Source,
    fam_uses: Vec<u32>,
    first_len: Vec<usize>,
    /// Each block's class and time at its latest use (`NONE`: never used).
    last_class: Vec<Class>,
    last_use: Vec<u32>,
    keys: Vec<u64>,
}

/// Mean gap before any is seen, and its weight in gaps.
const PRIOR_GAP: (f64, f64) = (100.0, 1.0);

impl ReturnOdds {
    /// The online candidate.
    pub fn online(w: &World) -> Self {
        Self::with(
            w,
            Source::Online {
                fine: vec![Tally::default(); FINE],
                coarse: vec![Tally::default(); COARSE],
                by_uses: vec![Tally::default(); USES],
                gaps: vec![(0.0, 0.0); USES],
            },
        )
    }

    /// The same ranking with `p_c` and `μ` fitted on the whole trace, each
    /// document's odds taken from the other documents' outcomes. Fitted in
    /// sample instead, a fine class holding a handful of documents would
    /// carry each one's own future: that version reaches 0.708 of Belady at
    /// 3M tokens, this one 0.644, what population odds are worth.
    pub fn fitted(w: &World) -> Self {
        Self::fitted_to(w, |_, _| true)
    }

    /// [`ReturnOdds::fitted`] with `p_c` the share of a class's uses whose
    /// next use is `wanted(block, next)`, e.g. one that Belady serves from
    /// the cache. `μ` stays the mean gap to any next use.
    pub fn fitted_to(w: &World, wanted: impl Fn(u32, u32) -> bool) -> Self {
        let (mut uses, mut again) = (vec![0f64; FINE], vec![0f64; FINE]);
        let mut own: HashMap<(usize, usize), (f64, f64)> = HashMap::new();
        let mut gaps = [(0f64, 0f64); USES];
        let mut fam_uses = vec![0u32; w.blocks()];
        let mut first_len = vec![0usize; w.blocks()];
        for (t, req) in w.reqs.iter().enumerate() {
            let f = w.root[req[0] as usize] as usize;
            if fam_uses[f] == 0 {
                first_len[f] = req.len();
            }
            fam_uses[f] += 1;
            for (i, &b) in req.iter().enumerate() {
                let c = Class::new(fam_uses[f], first_len[f], w.output[t], req.len() - 1 - i);
                uses[c.fine] += 1.0;
                let mine = own.entry((f, c.fine)).or_default();
                mine.0 += 1.0;
                let next = w.next_use(b, t);
                if next != NONE {
                    if wanted(b, next) {
                        again[c.fine] += 1.0;
                        mine.1 += 1.0;
                    }
                    gaps[c.uses].0 += f64::from(next) - t as f64;
                    gaps[c.uses].1 += 1.0;
                }
            }
        }
        let mu = gaps.iter().map(|g| mean_gap(*g)).collect();
        Self::with(
            w,
            Source::Fitted {
                uses,
                again,
                own,
                mu,
            },
        )
    }

    fn with(w: &World, source: Source) -> Self {
        let n = w.blocks();
        Self {
            source,
            fam_uses: vec![0; n],
            first_len: vec![0; n],
            last_class: vec![Class::new(1, 0, 0, 0); n],
            last_use: vec![NONE; n],
            keys: vec![0; n],
        }
    }

    /// `p_c` and `μ` for class `c` at time `now`, for a block of document `doc`.
    fn estimate(&self, c: Class, now: usize, doc: usize) -> (f64, f64) {
        match &self.source {
            Source::Fitted {
                uses,
                again,
                own,
                mu,
            } => {
                let (n, a) = own.get(&(doc, c.fine)).copied().unwrap_or_default();
                let p = (again[c.fine] - a + 0.5) / (uses[c.fine] - n + 1.0);
                (p, mu[c.uses])
            }
            Source::Online {
                fine,
                coarse,
                by_uses,
                gaps,
            } => {
                let mu = mean_gap(gaps[c.uses]);
                let p = by_uses[c.uses].estimate(now, mu, 0.5);
                let p = coarse[c.coarse].estimate(now, mu, p);
                (fine[c.fine].estimate(now, mu, p), mu)
            }
        }
    }
}

fn mean_gap((sum, n): (f64, f64)) -> f64 {
    (sum + PRIOR_GAP.0 * PRIOR_GAP.1) / (n + PRIOR_GAP.1)
}

impl LabPolicy for ReturnOdds {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        let f = w.root[req[0] as usize] as usize;
        if self.fam_uses[f] == 0 {
            self.first_len[f] = req.len();
        }
        self.fam_uses[f] += 1;
        let mut memo: Option<(Class, u64)> = None;
        for (i, &b) in req.iter().enumerate() {
            let b = b as usize;
            let c = Class::new(
                self.fam_uses[f],
                self.first_len[f],
                w.output[t],
                req.len() - 1 - i,
            );
            if let Source::Online {
                fine,
                coarse,
                by_uses,
                gaps,
            } = &mut self.source
            {
                if self.last_use[b] != NONE {
                    let was = self.last_class[b];
                    fine[was.fine].returns += 1.0;
                    coarse[was.coarse].returns += 1.0;
                    by_uses[was.uses].returns += 1.0;
                    gaps[was.uses].0 += (t - self.last_use[b] as usize) as f64;
                    gaps[was.uses].1 += 1.0;
                }
                fine[c.fine].used(t);
                coarse[c.coarse].used(t);
                by_uses[c.uses].used(t);
            }
            self.last_class[b] = c;
            self.last_use[b] = t as u32;
            // Blocks of one class in a row share a key: most of a request.
            self.keys[b] = match memo {
                Some((m, key)) if m == c => key,
                _ => {
                    let (p, mu) = self.estimate(c, t, f);
                    let p = p.clamp(P_MIN, P_MAX);
                    let key = fkey(BASE + t as f64 + mu * (p / (1.0 - p)).ln());
                    memo = Some((c, key));
                    key
                }
            };
        }
    }

    fn key(&self, _: &World, b: u32, _: usize) -> u64 {
        self.keys[b as usize]
    }
}

/// Offset that keeps shifted keys positive.
const BASE: f64 = 1e9;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_lab::{simulate, Lru};

    /// Young uses count as fractions of a trial: a class whose uses are too
    /// recent to have come back yet keeps its prior, instead of reading as
    /// a class that never returns.
    #[test]
    fn young_uses_without_returns_keep_the_prior() {
        let mut young = Tally::default();
        for t in 990..1000 {
            young.used(t);
        }
        let p = young.estimate(1000, 500.0, 0.5);
        assert!(p > 0.45, "young class read as {p}");

        let mut old = Tally::default();
        for t in 0..10 {
            old.used(t);
        }
        let p = old.estimate(5000, 500.0, 0.5);
        assert!(p < 0.2, "old class without returns read as {p}");

        // Returns count in full however young: p can only reach 1.
        young.returns = 10.0;
        let p = young.estimate(1000, 500.0, 0.5);
        assert!(p > 0.8 && p < 1.0, "returned class read as {p}");
    }

    /// Hindsight odds judge a document by the others in its class: two
    /// documents of one shape, one coming back and one not, each get the
    /// other's outcome, never their own.
    #[test]
    fn fitted_odds_leave_the_document_out() {
        let (a, b): (Vec<u32>, Vec<u32>) = ((0..4).collect(), (10..14).collect());
        let w = World::with_output(&[a.clone(), b, a], vec![5, 5, 5]);
        let fitted = ReturnOdds::fitted(&w);
        let first_use = Class::new(1, 4, 5, 0);
        let (returns, _) = fitted.estimate(first_use, 0, w.root[0] as usize);
        let (stays_away, _) = fitted.estimate(first_use, 1, w.root[4] as usize);
        // Add-half smoothing over the other document's one use.
        assert!(
            (returns - 0.25).abs() < 1e-9,
            "returning document read as {returns}"
        );
        assert!(
            (stays_away - 0.75).abs() < 1e-9,
            "one-off read as {stays_away}"
        );
    }

    /// A document that keeps coming back, every 40 requests, outlives a
    /// stream of one-off requests that would flush it from an LRU cache
    /// of 10 requests: its class learns that it returns, theirs that they
    /// do not.
    #[test]
    fn a_returning_document_outlives_a_stream_of_one_offs() {
        let shared: Vec<u32> = (0..8).collect();
        let mut reqs = Vec::new();
        for t in 0..2000u32 {
            // The shared document returns every 40 requests; between, a
            // stream of one-off requests passes through.
            if t % 40 == 0 {
                let mut r = shared.clone();
                r.extend([100_000 + 2 * t, 100_001 + 2 * t]);
                reqs.push(r);
            } else {
                reqs.push((0..6).map(|d| 1_000_000 + 8 * t + d).collect());
            }
        }
        let w = World::with_output(&reqs, vec![20; reqs.len()]);
        let rate = |p: &mut dyn LabPolicy| simulate(&w, p, 60).hit_rate();
        let lru = rate(&mut Lru::default());
        let odds = rate(&mut ReturnOdds::online(&w));
        // The shared document is 8 of the ~6.05 blocks per request every
        // 40 requests: catching it is worth 0.033.
        assert!(lru < 0.005, "lru {lru}");
        assert!(odds > 0.025, "return-odds {odds}");
    }
}
