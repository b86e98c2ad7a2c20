//! `odds`: LRU shifted by the learned log-odds that a node is used again.
//!
//! Model: pages used in class `c` come back with probability `p_c` and, if
//! they do, after a roughly exponential wait of mean `μ` (on the bundled
//! Mooncake trace the gaps fit one: coefficient of variation ≈ 1.2). After
//! `a` ticks idle, the log-odds that a node is still coming back are
//! `logit(p_c) − a / μ`; ranking by them is LRU with each node's key moved
//! later by `μ · logit(p_c)` at each use. No weight is tuned: a class that
//! rarely returns ranks below LRU, one that nearly always does above it.
//!
//! A node's class at an insert: its uses so far (1, 2, 3, 4+), the log₂
//! length in pages of the prompt that created it, the log₂ output length
//! the caller gave ([`InsertHints::output_tokens`], over gRPC a store's
//! `output_tokens`; on the trace a short answer predicts a follow-up), and
//! how far the node's first page is from the end of the prompt (a
//! request's last pages are its own; the first page, because a node that
//! ends a prompt is often all of a new prompt).
//!
//! `p_c` is learned online with censoring accounted for: a use `a` ticks
//! old counts as `1 − e^{−a/μ}` of a trial (the chance a returning page
//! would have come back by now), so a young class is not taken for one that
//! never returns. Sparse classes borrow `PSEUDO` pseudo-trials from (uses,
//! output), which borrows from the use count alone. Evicted nodes leave a
//! ghost (their class and last use, by first page, in a bounded FIFO) so
//! that a return after eviction is still credited to its class.
//!
//! A use is a lookup that finds the node: it credits the return of the
//! last use and starts a new one, classed with the last output length
//! known. The insert that follows (the request's blocks stored, with
//! [`InsertHints::output_tokens`]) moves that use to the class of its real
//! output; until an insert says the output, the use stays open, so an
//! engine that stores while it prefills can say it when the request ends
//! (an insert of no pages, see `insert_after_with_hints`). Any other
//! insert (another tier's copy, a duplicate) is not a use. With
//! `insert_after`, the index touches every node from the root to the
//! parent for policies that read hints, so a store of the new pages alone
//! refines the whole prompt's use.
//!
//! Cost: one short critical section per access to learn and price the
//! class (a lookup takes it too, to credit a return). Keys are fixed at
//! each access, as the tree requires; a lookup only raises them.

use super::{Access, AccessKind, EvictionPolicy, NodeInfo, NodeStats, KEY_BITS};
use crate::hash::PageHash;
use crate::sync::Mutex;
use std::collections::{HashMap, VecDeque};

const USES: usize = 4;
const LENGTHS: usize = 10;
const OUTPUTS: usize = 13;
const DEPTHS: usize = 5;
const FINE: usize = USES * LENGTHS * OUTPUTS * DEPTHS;
const COARSE: usize = USES * OUTPUTS;
/// Pseudo-trials a class borrows from its parent.
const PSEUDO: f64 = 4.0;
/// Odds beyond 9 to 1 are not trusted (a shift of 2.2 μ): a handful of
/// prompts could otherwise hold their class for many times its wait.
const P_MAX: f64 = 0.9;
const P_MIN: f64 = 0.01;
/// Mean wait (ticks) before any return is seen; it weighs as one return.
const PRIOR_GAP: f64 = 200.0;
/// Ghosts remembered (a few bytes each).
const GHOSTS: usize = 1 << 16;

// A node's policy word: bit 63 = its current use is open (it began at a
// lookup, or was stored without an output length: an insert that says the
// output refines it); bits KEY_BITS-1..63 = class + 1 (0: none yet); the
// rest = key.
const OPEN: u64 = 1 << 63;
const CLASS_SHIFT: u32 = KEY_BITS - 1;
const KEY_MASK: u64 = (1 << CLASS_SHIFT) - 1;
// Class + 1 fits between the flag and the key.
const _: () = assert!(FINE < 1 << (64 - CLASS_SHIFT - 1));
/// Keys start here, so that shifts below zero stay positive.
const BASE: f64 = (1u64 << 46) as f64;

/// A node's class at one use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Class(u16);

impl Class {
    fn new(uses: u32, length_bucket: usize, output_tokens: u32, from_end: u32) -> Self {
        let uses = (uses as usize).clamp(1, USES) - 1;
        let out = log2_bucket(output_tokens as usize, OUTPUTS);
        Self::from_parts(uses, out, length_bucket, from_end)
    }
    fn fine(self) -> usize {
        usize::from(self.0)
    }
    fn coarse(self) -> usize {
        self.fine() / DEPTHS / LENGTHS
    }
    fn uses(self) -> usize {
        self.coarse() / OUTPUTS
    }
    fn length_bucket(self) -> usize {
        self.fine() / DEPTHS % LENGTHS
    }
    fn output_bucket(self) -> usize {
        self.coarse() % OUTPUTS
    }
    /// The class of a later use of the same node: `uses` so far, the output
    /// if known (0: keep the last one known), and its distance from the end.
    fn next(self, uses: u32, output_tokens: u32, from_end: u32) -> Self {
        let out = match output_tokens {
            0 => self.output_bucket(),
            o => log2_bucket(o as usize, OUTPUTS),
        };
        let uses = (uses as usize).clamp(1, USES) - 1;
        Self::from_parts(uses, out, self.length_bucket(), from_end)
    }
    fn from_parts(uses: usize, out: usize, length_bucket: usize, from_end: u32) -> Self {
        let fine = ((uses * OUTPUTS + out) * LENGTHS + length_bucket) * DEPTHS
            + (from_end as usize).min(DEPTHS - 1);
        Self(fine as u16)
    }
}

fn log2_bucket(x: usize, buckets: usize) -> usize {
    ((usize::BITS - x.leading_zeros()) as usize).min(buckets - 1)
}

/// Uses and returns of one class. `decayed` is `Σ e^{−(at − t_i)/μ}` over
/// its uses, so `uses − decayed·e^{−(now − at)/μ}` is the censoring-weighted
/// trial count without keeping each use.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    uses: f64,
    decayed: f64,
    at: u64,
    returns: f64,
}

impl Tally {
    fn decay_to(&mut self, now: u64, mu: f64) {
        if now > self.at {
            self.decayed *= (-((now - self.at) as f64) / mu).exp();
            self.at = now;
        }
    }
    fn used(&mut self, now: u64, mu: f64, pages: f64) {
        self.decay_to(now, mu);
        self.uses += pages;
        self.decayed += pages;
    }
    /// Takes back a use made at `then` (a lookup's, refined by its insert).
    fn unused(&mut self, now: u64, mu: f64, pages: f64, then: u64) {
        self.decay_to(now, mu);
        self.uses = (self.uses - pages).max(0.0);
        let left = pages * (-(now.saturating_sub(then) as f64) / mu).exp();
        self.decayed = (self.decayed - left).max(0.0);
    }
    fn estimate(&mut self, now: u64, mu: f64, prior: f64) -> f64 {
        self.decay_to(now, mu);
        let trials = (self.uses - self.decayed).max(self.returns);
        (self.returns + PSEUDO * prior) / (trials + PSEUDO)
    }
}

#[derive(Debug)]
struct Learner {
    fine: Vec<Tally>,
    coarse: Vec<Tally>,
    by_uses: [Tally; USES],
    /// Sum and count of return gaps per use count (ticks × pages, pages).
    gaps: [(f64, f64); USES],
    ghosts: HashMap<PageHash, (Class, u64)>,
    ghost_order: VecDeque<PageHash>,
}

impl Learner {
    fn mu(&self, uses: usize) -> f64 {
        let (sum, n) = self.gaps[uses];
        (sum + PRIOR_GAP) / (n + 1.0)
    }

    fn returned(&mut self, c: Class, pages: f64, gap: u64) {
        self.fine[c.fine()].returns += pages;
        self.coarse[c.coarse()].returns += pages;
        self.by_uses[c.uses()].returns += pages;
        self.gaps[c.uses()].0 += gap as f64 * pages;
        self.gaps[c.uses()].1 += pages;
    }

    fn used(&mut self, c: Class, pages: f64, now: u64) {
        let mu = self.mu(c.uses());
        self.fine[c.fine()].used(now, mu, pages);
        self.coarse[c.coarse()].used(now, mu, pages);
        self.by_uses[c.uses()].used(now, mu, pages);
    }

    fn unused(&mut self, c: Class, pages: f64, now: u64, then: u64) {
        let mu = self.mu(c.uses());
        self.fine[c.fine()].unused(now, mu, pages, then);
        self.coarse[c.coarse()].unused(now, mu, pages, then);
        self.by_uses[c.uses()].unused(now, mu, pages, then);
    }

    /// The key of a node used at `now` in class `c`.
    fn key(&mut self, c: Class, now: u64) -> u64 {
        let mu = self.mu(c.uses());
        let p = self.by_uses[c.uses()].estimate(now, mu, 0.5);
        let p = self.coarse[c.coarse()].estimate(now, mu, p);
        let p = self.fine[c.fine()].estimate(now, mu, p).clamp(P_MIN, P_MAX);
        let key = BASE + now as f64 + mu * (p / (1.0 - p)).ln();
        (key.max(0.0) as u64).min(KEY_MASK)
    }

    fn remember(&mut self, page: PageHash, c: Class, last: u64) {
        if self.ghosts.insert(page, (c, last)).is_none() {
            self.ghost_order.push_back(page);
            if self.ghost_order.len() > GHOSTS {
                let old = self.ghost_order.pop_front().expect("over the bound");
                self.ghosts.remove(&old);
            }
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ReturnOdds {
    learner: Mutex<Learner>,
}

impl Default for ReturnOdds {
    fn default() -> Self {
        Self {
            learner: Mutex::new(Learner {
                fine: vec![Tally::default(); FINE],
                coarse: vec![Tally::default(); COARSE],
                by_uses: [Tally::default(); USES],
                gaps: [(0.0, 0.0); USES],
                ghosts: HashMap::new(),
                ghost_order: VecDeque::new(),
            }),
        }
    }
}

fn unpack(aux: u64) -> (bool, Option<Class>, u64) {
    let class = ((aux & !OPEN) >> CLASS_SHIFT) as u16;
    (
        aux & OPEN != 0,
        class.checked_sub(1).map(Class),
        aux & KEY_MASK,
    )
}

fn pack(open: bool, class: Class, key: u64) -> u64 {
    (if open { OPEN } else { 0 }) | (u64::from(class.0 + 1) << CLASS_SHIFT) | key
}

impl EvictionPolicy for ReturnOdds {
    fn name(&self) -> &str {
        "odds"
    }

    fn on_access(&self, stats: &NodeStats, node: &NodeInfo, access: Access) {
        let (open, class, key) = unpack(stats.aux());
        let pages = f64::from(node.pages);
        // From the node's first page: a node that ends a prompt is often
        // the whole of a new prompt, not only its tail.
        let from_end = access.prompt_pages.saturating_sub(node.depth_pages + 1);
        let mut l = self.learner.lock();
        let c = match (access.kind, class) {
            // A lookup that finds the node is a use: it credits the return
            // of the last one and starts a new one, in the last use's class
            // updated (the output is not known yet). It may only raise the key.
            (AccessKind::Hit, Some(was)) => {
                l.returned(was, pages, access.tick.saturating_sub(access.previous));
                let c = was.next(stats.hits().saturating_add(1), 0, from_end);
                l.used(c, pages, access.tick);
                let now = l.key(c, access.tick);
                stats.set_aux(pack(true, c, key.max(now)));
                return;
            }
            (AccessKind::Hit, None) => return,
            // The insert that follows a lookup says the rest of that use's
            // class (the output); the use moves to it. An insert that does
            // not know the output leaves the use open for one that does
            // (an engine that stores while it prefills says the output
            // when the request ends).
            (AccessKind::Insert, Some(was)) if open => {
                let c = was.next(was.uses() as u32 + 1, access.output_tokens, from_end);
                if c != was {
                    l.unused(was, pages, access.tick, access.previous);
                    l.used(c, pages, access.tick);
                }
                c
            }
            // Inserted again once the use is closed (another tier's copy, a
            // duplicate): not a use.
            (AccessKind::Insert, Some(_)) => return,
            // A new node: a ghost says whether it was here before.
            (AccessKind::Insert, None) => {
                let c = match l.ghosts.remove(&node.first_page) {
                    Some((ghost, last)) => {
                        l.returned(ghost, pages, access.tick.saturating_sub(last));
                        ghost.next(ghost.uses() as u32 + 2, access.output_tokens, from_end)
                    }
                    None => Class::new(
                        1,
                        log2_bucket(access.prompt_pages as usize, LENGTHS),
                        access.output_tokens,
                        from_end,
                    ),
                };
                l.used(c, pages, access.tick);
                c
            }
        };
        let key = l.key(c, access.tick);
        stats.set_aux(pack(access.output_tokens == 0, c, key));
    }

    fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
        stats.aux() & KEY_MASK
    }

    fn on_evict_pages(&self, stats: &NodeStats, node: &NodeInfo, _: u64, _: u64, pages: usize) {
        if pages < node.pages as usize {
            return;
        }
        if let (_, Some(c), _) = unpack(stats.aux()) {
            self.learner
                .lock()
                .remember(node.first_page, c, stats.last_access());
        }
    }

    fn reads_insert_hints(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_word_round_trips() {
        let c = Class::new(3, 7, 40, 2);
        for open in [false, true] {
            for key in [0, 1, KEY_MASK / 3, KEY_MASK] {
                assert_eq!(unpack(pack(open, c, key)), (open, Some(c), key));
            }
        }
        assert_eq!(unpack(0), (false, None, 0));
        let last = Class((FINE - 1) as u16);
        assert_eq!(unpack(pack(true, last, KEY_MASK)).1, Some(last));
    }

    #[test]
    fn classes_keep_their_features_apart() {
        let c = Class::new(9, 6, 100, 1);
        assert_eq!(c.uses(), USES - 1);
        assert_eq!(c.length_bucket(), 6);
        assert_eq!(c.coarse(), (USES - 1) * OUTPUTS + log2_bucket(100, OUTPUTS));
        assert_ne!(Class::new(1, 6, 100, 1), Class::new(1, 6, 100, 2));
        assert_ne!(Class::new(1, 6, 10, 1), Class::new(1, 6, 100, 1));
    }

    /// Through the index: prompts answered briefly come back 60 requests
    /// later, while prompts with long answers stream past once. A cache of
    /// ~20 requests under LRU loses every return; `odds` learns from the
    /// output hints which prompts return and keeps them.
    #[test]
    fn prompts_that_return_outlive_a_stream_of_one_offs() {
        use crate::{BlockId, IndexConfig, InsertHints, NamespaceConfig, NamespaceKey};
        use crate::{RadixIndex, Tier};
        use std::sync::Arc;

        let run = |policy: Arc<dyn EvictionPolicy>| {
            let index = RadixIndex::new(IndexConfig::builder().policy(policy).build().unwrap());
            let key = NamespaceKey::new("t", "m", "l", "");
            let ns = index
                .create_namespace(&key, NamespaceConfig::new(1).unwrap())
                .unwrap();
            let blocks = [BlockId(1); 8];
            let (mut hit, mut returning) = (0, 0);
            for t in 0..6000u32 {
                let (prompt, output): (Vec<u32>, u32) = match t % 4 {
                    // A brief answer, asked again 60 requests later.
                    0 => ((0..8).map(|d| (t / 4) * 8 + d).collect(), 5),
                    1 if t >= 61 => ((0..8).map(|d| ((t - 61) / 4) * 8 + d).collect(), 5),
                    _ => ((0..8).map(|d| 1_000_000 + t * 8 + d).collect(), 500),
                };
                let m = index.match_prefix(ns, &prompt).unwrap();
                if t % 4 == 1 && t >= 61 {
                    returning += 8;
                    hit += m.pages;
                }
                let hints = InsertHints {
                    output_tokens: output,
                    ..InsertHints::default()
                };
                index
                    .insert_with_hints(ns, &prompt, Tier::Host, &blocks, hints)
                    .unwrap();
                let held = index.tier_pages(Tier::Host) as usize;
                if held > 160 {
                    index.evict(Tier::Host, held - 160);
                }
            }
            hit as f64 / returning as f64
        };
        let lru = run(Arc::new(crate::policy::Lru));
        let odds = run(Arc::new(ReturnOdds::default()));
        assert!(lru < 0.01, "lru {lru}");
        assert!(odds > 0.5, "odds {odds}");
    }

    /// The accounting of uses: a lookup credits a return and starts a use;
    /// the insert that follows refines that use (no second one); an insert
    /// with no lookup before it is not a use.
    #[test]
    fn lookups_are_uses_and_inserts_refine_them() {
        let odds = ReturnOdds::default();
        let stats = NodeStats::new(0);
        let info = NodeInfo {
            depth_pages: 0,
            pages: 4,
            page_size: 16,
            priority: 0,
            last_page: PageHash::from_le_bytes([1; 16]),
            first_page: PageHash::from_le_bytes([2; 16]),
        };
        let access = |tick, kind, output_tokens| Access {
            tick,
            kind,
            previous: stats.last_access(),
            prompt_pages: 6,
            output_tokens,
        };
        let touch = |a: Access| {
            stats.record(a);
            odds.on_access(&stats, &info, a);
        };
        let totals = || {
            let l = odds.learner.lock();
            let uses: f64 = l.by_uses.iter().map(|t| t.uses).sum();
            let returns: f64 = l.by_uses.iter().map(|t| t.returns).sum();
            (uses, returns)
        };
        touch(access(0, AccessKind::Insert, 500));
        assert_eq!(totals(), (4.0, 0.0));
        // Another tier's copy, no lookup between: nothing learned.
        touch(access(1, AccessKind::Insert, 500));
        assert_eq!(totals(), (4.0, 0.0));
        // Two requests that only look the prompt up: two returns, two uses.
        touch(access(10, AccessKind::Hit, 0));
        touch(access(20, AccessKind::Hit, 0));
        assert_eq!(totals(), (12.0, 8.0));
        // A third request stores after its lookup with a short answer: one
        // more use, moved to the short answer's class.
        touch(access(30, AccessKind::Hit, 0));
        let before = unpack(stats.aux()).1.unwrap();
        touch(access(31, AccessKind::Insert, 5));
        let after = unpack(stats.aux()).1.unwrap();
        assert_eq!(totals(), (16.0, 12.0));
        assert_eq!(before.uses(), after.uses());
        assert_ne!(before.output_bucket(), after.output_bucket());
        assert_eq!(after.output_bucket(), log2_bucket(5, OUTPUTS));
        let l = odds.learner.lock();
        assert_eq!(
            (l.fine[before.fine()].uses, l.fine[after.fine()].uses),
            (0.0, 4.0)
        );
    }

    /// Young uses count as fractions of a trial: a class too recent to have
    /// come back keeps its prior instead of reading as one that never does.
    #[test]
    fn young_uses_without_returns_keep_the_prior() {
        let mut young = Tally::default();
        for t in 990..1000 {
            young.used(t, 500.0, 1.0);
        }
        assert!(young.estimate(1000, 500.0, 0.5) > 0.45);
        let mut old = Tally::default();
        for t in 0..10 {
            old.used(t, 500.0, 1.0);
        }
        assert!(old.estimate(5000, 500.0, 0.5) < 0.2);
    }
}
