//! Policy lab: a block-level cache simulator for trying eviction ideas in
//! seconds, outside the index.
//!
//! It follows the replay's semantics (`replay.rs`) block by block: a
//! request's hit is its longest cached prefix; then every block of the
//! request is cached; then leaves (cached blocks with no cached child) are
//! evicted, lowest key first, until the cache is back within capacity,
//! never a block of the running request. Keys are re-ranked lazily as in
//! the tree: a leaf's key is computed when it becomes a leaf or its own
//! block is used, and recomputed when it reaches the front of the order (a
//! key that rose is put back). It reproduces the index's LRU and Belady hit
//! rates on the bundled trace exactly (a test checks it), so a candidate's
//! figures here are what the index would give, give or take tie-breaks.
//!
//! A candidate sees only the past: `on_request` is called with the request
//! being served (its blocks and its hit) before its blocks are cached, and
//! `key` with the current time. Only the `belady` bound reads the future.
//!
//! What it showed on the bundled trace (3M tokens, Belady 0.550, LRU 0.309):
//! hits come from ~400 documents (a root block and its requests, which
//! share ~94% of their blocks); a document's arrivals are close to Poisson
//! (gap CV ≈ 1.2) and its past gaps do not predict its future rate. What
//! does predict reuse is the shape of the request: the output length (a
//! document whose first request produced under 16 tokens returns 70–80% of
//! the time, one that produced 128 or more 3–6%), the first request's
//! length (one or two blocks: under 15%; 8 or more with a short output:
//! ~90%), and a block's distance from its request's end (the last block is
//! used again 5% of the time, the fourth from the end 39%). Belady serves
//! 74% of first returns' blocks (LRU 23%, `return-odds` 40%), which come
//! ~700 requests after the first use, far past LRU's reach; but returns of
//! documents used four times or more are more of the trace's blocks (27%
//! against 15%), and there Belady serves 92%, LRU 70%, `return-odds` 62%.
//!
//! Per-document tables of future arrivals fitted in hindsight (`fitted-table`,
//! `fitted-shape`) stop near 0.63 of Belady; per-block reuse odds by class
//! fitted in hindsight over the other documents, ranked as `return-odds`
//! ranks, reach 0.644 (`fitted-odds`; fitted in sample they reach 0.708,
//! but only because a fine class holding a few documents then carries
//! their own futures). Online, `shape-rate-out` and `return-odds` reach
//! 0.617: close to what the population's odds are worth. What is left to
//! Belady is not in the trace's fields: after a document's second use,
//! whether it comes once more is 0.79–0.85 at every use count, output
//! length, gap and time, so a finished document cannot be told from a
//! live one but by its idle time. `oracle-after-2` (0.713) knows each
//! document's total count, i.e. the future, once a block was used twice;
//! that is where its edge over the online candidates comes from.
//! `hindsight.rs` bounds what each kind of foresight is worth: told only
//! which new documents never return, `return-odds` reaches 0.668; told
//! whether every block is used again, LRU reaches 0.810. `--by-use` prints
//! which returns each candidate catches, `--gaps` whether a document's
//! past rate predicts its next use (it does not).

use std::collections::{BTreeSet, HashMap};

mod hindsight;
mod return_odds;
pub use hindsight::next_gap_by_rate;
pub use return_odds::ReturnOdds;

const NONE: u32 = u32::MAX;

/// The trace as dense block ids with the prefix tree they form.
pub struct World {
    /// Requests as dense block ids.
    pub reqs: Vec<Vec<u32>>,
    /// Parent block of each block (`NONE` for a root).
    pub parent: Vec<u32>,
    /// Root block of each block's path: its family (document).
    pub root: Vec<u32>,
    /// Request indices using each block, ascending (for the bound only).
    uses: Vec<Vec<u32>>,
    /// Output tokens of each request (0 where the trace does not say).
    pub output: Vec<u64>,
}

impl World {
    /// `reqs`: block ids per request; an id always has the same parent.
    pub fn new(raw: &[Vec<u32>]) -> Self {
        let mut dense: HashMap<u32, u32> = HashMap::new();
        let mut parent = Vec::new();
        let mut root = Vec::new();
        let mut uses: Vec<Vec<u32>> = Vec::new();
        let mut reqs = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let mut p = NONE;
            let mut out = Vec::with_capacity(r.len());
            for &id in r {
                let b = *dense.entry(id).or_insert_with(|| {
                    parent.push(p);
                    root.push(if p == NONE {
                        parent.len() as u32 - 1
                    } else {
                        root[p as usize]
                    });
                    uses.push(Vec::new());
                    parent.len() as u32 - 1
                });
                if uses[b as usize].last() != Some(&(i as u32)) {
                    uses[b as usize].push(i as u32);
                }
                out.push(b);
                p = b;
            }
            reqs.push(out);
        }
        Self {
            output: vec![0; reqs.len()],
            reqs,
            parent,
            root,
            uses,
        }
    }

    /// [`World::new`] with each request's output length.
    pub fn with_output(raw: &[Vec<u32>], output: Vec<u64>) -> Self {
        assert_eq!(raw.len(), output.len());
        Self {
            output,
            ..Self::new(raw)
        }
    }

    pub fn blocks(&self) -> usize {
        self.parent.len()
    }

    /// The first request after `t` that uses `b` (`u32::MAX` if none).
    pub fn next_use(&self, b: u32, t: usize) -> u32 {
        let list = &self.uses[b as usize];
        let i = list.partition_point(|&r| r as usize <= t);
        list.get(i).copied().unwrap_or(u32::MAX)
    }
}

/// A candidate eviction policy. Smaller keys are evicted first.
pub trait LabPolicy {
    /// Request `t` arrives: its blocks and how many leading ones hit.
    /// Called before the request's blocks are cached.
    fn on_request(&mut self, _w: &World, _t: usize, _req: &[u32], _hit: usize) {}
    /// The rank of cached block `b` at time `t`.
    fn key(&self, w: &World, b: u32, t: usize) -> u64;
    /// Block `b` left the cache with rank `key`.
    fn on_evict(&mut self, _w: &World, _b: u32, _key: u64, _t: usize) {}
    /// True when keys change with time alone: every eviction then ranks
    /// every leaf afresh (a scan; for exploring what an ideal ranking
    /// would reach, not for the index).
    fn dynamic(&self) -> bool {
        false
    }
}

/// An order-preserving key for a non-negative score.
pub fn fkey(x: f64) -> u64 {
    x.max(0.0).to_bits()
}

/// One simulation's outcome.
#[derive(Debug, Clone, Copy)]
pub struct LabResult {
    pub hit_blocks: u64,
    pub blocks: u64,
    pub evicted: u64,
    /// Hit and requested blocks by the family's use number: `[0]` first
    /// requests (never hits), `[1]` first returns, ... `[USE_SLOTS - 1]`
    /// that return and every later one.
    pub by_use: [(u64, u64); USE_SLOTS],
}

/// Slots of [`LabResult::by_use`].
pub const USE_SLOTS: usize = 5;

impl LabResult {
    pub fn hit_rate(&self) -> f64 {
        self.hit_blocks as f64 / self.blocks.max(1) as f64
    }
}

/// Replays the world through `policy` at `capacity` blocks.
pub fn simulate(w: &World, policy: &mut dyn LabPolicy, capacity: u64) -> LabResult {
    let n = w.blocks();
    let mut cached = vec![false; n];
    let mut children = vec![0u32; n];
    // The key each leaf is filed under (meaningful only for leaves).
    let mut filed = vec![0u64; n];
    let mut leaves: BTreeSet<(u64, u32)> = BTreeSet::new();
    let mut size = 0u64;
    let mut res = LabResult {
        hit_blocks: 0,
        blocks: 0,
        evicted: 0,
        by_use: [(0, 0); USE_SLOTS],
    };
    let mut family_uses = vec![0usize; n];
    for (t, req) in w.reqs.iter().enumerate() {
        let hit = req.iter().take_while(|&&b| cached[b as usize]).count();
        res.hit_blocks += hit as u64;
        res.blocks += req.len() as u64;
        let uses = &mut family_uses[w.root[req[0] as usize] as usize];
        let slot = &mut res.by_use[(*uses).min(USE_SLOTS - 1)];
        *uses += 1;
        slot.0 += hit as u64;
        slot.1 += req.len() as u64;
        policy.on_request(w, t, req, hit);
        for &b in req {
            let bi = b as usize;
            if cached[bi] {
                // Its key may have changed with this use: re-file it.
                if children[bi] == 0 {
                    leaves.remove(&(filed[bi], b));
                    filed[bi] = policy.key(w, b, t);
                    leaves.insert((filed[bi], b));
                }
                continue;
            }
            cached[bi] = true;
            size += 1;
            let p = w.parent[bi];
            if p != NONE {
                let pi = p as usize;
                if children[pi] == 0 {
                    leaves.remove(&(filed[pi], p));
                }
                children[pi] += 1;
            }
            filed[bi] = policy.key(w, b, t);
            leaves.insert((filed[bi], b));
        }
        if size <= capacity {
            continue;
        }
        // The request's last block is its only leaf; hold it out.
        let last = *req.last().expect("requests are not empty");
        let held = children[last as usize] == 0 && leaves.remove(&(filed[last as usize], last));
        while size > capacity {
            let Some((k, b)) = (if policy.dynamic() {
                leaves
                    .iter()
                    .map(|&(_, b)| (policy.key(w, b, t), b))
                    .min()
                    .inspect(|&(_, b)| {
                        leaves.remove(&(filed[b as usize], b));
                        filed[b as usize] = policy.key(w, b, t);
                    })
            } else {
                leaves.pop_first()
            }) else {
                break;
            };
            let now = policy.key(w, b, t);
            if now != k {
                filed[b as usize] = now;
                leaves.insert((now, b));
                continue;
            }
            policy.on_evict(w, b, k, t);
            cached[b as usize] = false;
            size -= 1;
            res.evicted += 1;
            let p = w.parent[b as usize];
            if p != NONE {
                let pi = p as usize;
                children[pi] -= 1;
                if children[pi] == 0 {
                    filed[pi] = policy.key(w, p, t);
                    leaves.insert((filed[pi], p));
                }
            }
        }
        if held {
            leaves.insert((filed[last as usize], last));
        }
    }
    res
}

// ---- shared history ------------------------------------------------------------

/// What an online candidate may remember: per block and per family (root
/// block), how many requests used it and when last. Kept for every block and
/// family ever seen (a ghost as long as the trace: the lab measures what such
/// history is worth, not what it costs).
#[derive(Debug, Clone)]
struct History {
    block_uses: Vec<u32>,
    block_last: Vec<u32>,
    block_first: Vec<u32>,
    fam_uses: Vec<u32>,
    fam_last: Vec<u32>,
}

impl History {
    fn new(w: &World) -> Self {
        let n = w.blocks();
        Self {
            block_uses: vec![0; n],
            block_last: vec![0; n],
            block_first: vec![0; n],
            fam_uses: vec![0; n],
            fam_last: vec![0; n],
        }
    }

    fn record(&mut self, w: &World, t: usize, req: &[u32]) {
        for &b in req {
            let b = b as usize;
            if self.block_uses[b] == 0 {
                self.block_first[b] = t as u32;
            }
            self.block_uses[b] += 1;
            self.block_last[b] = t as u32;
        }
        let f = w.root[req[0] as usize] as usize;
        self.fam_uses[f] += 1;
        self.fam_last[f] = t as u32;
    }

    /// A known tail: a block used once in a family used more often (the
    /// request-specific end of a shared document).
    fn is_tail(&self, w: &World, b: usize) -> bool {
        let f = w.root[b] as usize;
        self.block_uses[b] == 1 && self.fam_uses[f] > 1
    }

    /// The block's count class and the time its clock started: its
    /// family's, or its own for a tail.
    fn class(&self, w: &World, b: usize, cap: u32) -> (usize, u32) {
        if self.is_tail(w, b) {
            (1, self.block_last[b])
        } else {
            let f = w.root[b] as usize;
            (self.fam_uses[f].min(cap) as usize, self.fam_last[f])
        }
    }
}

/// Arrival rate per family class, learned online: arrivals of families in
/// class `c` over the time families spent in class `c` (Nelson–Aalen; the
/// maximum-likelihood rate of exponential waits). A family moves between
/// classes as it arrives.
#[derive(Debug, Clone)]
struct RateTable {
    in_class: Vec<f64>,
    arrivals: Vec<f64>,
    exposure: Vec<f64>,
    last_t: usize,
}

impl RateTable {
    fn new(n: usize) -> Self {
        Self {
            in_class: vec![0.0; n],
            arrivals: vec![0.0; n],
            exposure: vec![0.0; n],
            last_t: 0,
        }
    }

    /// A family in class `from` (none: first seen) arrives at `t` and moves to `to`.
    fn arrive(&mut self, t: usize, from: Option<usize>, to: usize) {
        let dt = (t - self.last_t) as f64;
        for (e, n) in self.exposure.iter_mut().zip(&self.in_class) {
            *e += n * dt;
        }
        self.last_t = t;
        if let Some(c) = from {
            self.arrivals[c] += 1.0;
            self.in_class[c] -= 1.0;
        }
        self.in_class[to] += 1.0;
    }

    fn pooled(&self, classes: std::ops::Range<usize>) -> f64 {
        (self.arrivals[classes.clone()].iter().sum::<f64>() + 1.0)
            / (self.exposure[classes].iter().sum::<f64>() + 1.0)
    }

    /// The class's rate, shrunk toward `prior` by one pseudo-arrival.
    fn rate(&self, c: usize, prior: f64) -> f64 {
        (self.arrivals[c] + 1.0) / (self.exposure[c] + 1.0 / prior)
    }
}

/// Use-count classes of families: 1, 2, ... `CLASSES` and more.
const CLASSES: u32 = 8;

/// The residence time of once-used blocks: a moving average of the age at
/// which they are evicted (in requests).
#[derive(Debug, Clone, Copy)]
struct Residence(f64);

impl Default for Residence {
    fn default() -> Self {
        Self(100.0)
    }
}

impl Residence {
    fn on_evict(&mut self, hist: &History, w: &World, b: u32, t: usize) {
        let (k, last) = hist.class(w, b as usize, CLASSES);
        if k == 1 {
            self.0 = 0.99 * self.0 + 0.01 * (t - last as usize) as f64;
        }
    }
}

// ---- reference policies ----------------------------------------------------

/// Least recently used (block-level).
#[derive(Debug, Default)]
pub struct Lru {
    last: Vec<u32>,
}

impl LabPolicy for Lru {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.last.resize(w.blocks(), 0);
        for &b in req {
            self.last[b as usize] = t as u32;
        }
    }
    fn key(&self, _: &World, b: u32, _: usize) -> u64 {
        u64::from(self.last[b as usize])
    }
}

/// The offline bound: the leaf used furthest ahead goes first.
#[derive(Debug)]
pub struct Belady;

impl LabPolicy for Belady {
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        u64::MAX - u64::from(w.next_use(b, t))
    }
}

/// Hindsight: each block's total uses in the trace (`after_second`: only
/// once the block was used twice; before, it ranks below every such block,
/// by recency).
#[derive(Debug)]
pub struct OracleCount {
    total: Vec<u32>,
    hist: History,
    after_second: bool,
}

impl OracleCount {
    pub fn new(w: &World, after_second: bool) -> Self {
        let mut total = vec![0u32; w.blocks()];
        for r in &w.reqs {
            for &b in r {
                total[b as usize] += 1;
            }
        }
        Self {
            total,
            hist: History::new(w),
            after_second,
        }
    }
}

impl LabPolicy for OracleCount {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.hist.record(w, t, req);
    }
    fn key(&self, _: &World, b: u32, _: usize) -> u64 {
        let b = b as usize;
        let recency = u64::from(self.hist.block_last[b]);
        if self.after_second && self.hist.block_uses[b] < 2 {
            recency
        } else {
            (1 << 62) + (u64::from(self.total[b]) << 32) + recency
        }
    }
}

// ---- online candidates ----------------------------------------------------------

/// Frequency with full history: blocks used once go first (by recency),
/// then by uses so far, ties by recency.
#[derive(Debug)]
pub struct LfuGhost {
    hist: History,
}

impl LabPolicy for LfuGhost {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.hist.record(w, t, req);
    }
    fn key(&self, _: &World, b: u32, _: usize) -> u64 {
        let b = b as usize;
        (u64::from(self.hist.block_uses[b]) << 32) + u64::from(self.hist.block_last[b])
    }
}

/// Empirical Bayes: each block arrives as a Poisson process; its rate's
/// posterior mean after `k` uses in `T` requests since its first is
/// `(a + k − 1) / (a / m + T)`, with `m` the population's rate learned
/// online and shape `a = 1`. Ranked exactly at every eviction (the rate
/// falls with time).
#[derive(Debug)]
pub struct EbRate {
    hist: History,
    arrivals: f64,
    exposure: f64,
    seen: f64,
    last_t: usize,
}

impl LabPolicy for EbRate {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.exposure += self.seen * (t - self.last_t) as f64;
        self.last_t = t;
        for &b in req {
            if self.hist.block_uses[b as usize] == 0 {
                self.seen += 1.0;
            } else {
                self.arrivals += 1.0;
            }
        }
        self.hist.record(w, t, req);
    }
    fn key(&self, _: &World, b: u32, t: usize) -> u64 {
        let b = b as usize;
        let m = (self.arrivals + 1.0) / (self.exposure + 1.0);
        let k = f64::from(self.hist.block_uses[b]);
        let age = (t - self.hist.block_first[b] as usize) as f64;
        fkey((k) / (1.0 / m + age))
    }
    fn dynamic(&self) -> bool {
        true
    }
}

/// Learned hazard by (family count class, log₂ idle time): arrivals over
/// exposure in each state, counted online for every family ever seen;
/// a block ranks by its state's hazard now (tails as families used once).
#[derive(Debug)]
pub struct Hazard {
    hist: History,
    seen: Vec<u32>,
    arrivals: Vec<f64>,
    exposure: Vec<f64>,
}

const IDLE_BUCKETS: usize = 14;

impl Hazard {
    fn state(k: u32, idle: usize) -> usize {
        let ib = ((usize::BITS - idle.leading_zeros()) as usize).min(IDLE_BUCKETS - 1);
        k.min(CLASSES) as usize * IDLE_BUCKETS + ib
    }
}

impl LabPolicy for Hazard {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        for &f in &self.seen {
            let f = f as usize;
            let st = Self::state(self.hist.fam_uses[f], t - self.hist.fam_last[f] as usize);
            self.exposure[st] += 1.0;
        }
        let f = w.root[req[0] as usize] as usize;
        if self.hist.fam_uses[f] == 0 {
            self.seen.push(f as u32);
        } else {
            let st = Self::state(self.hist.fam_uses[f], t - self.hist.fam_last[f] as usize);
            self.arrivals[st] += 1.0;
        }
        self.hist.record(w, t, req);
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        let (k, last) = self.hist.class(w, b as usize, CLASSES);
        let st = Self::state(k as u32, t - last as usize);
        fkey((self.arrivals[st] + 0.5) / (self.exposure[st] + 5000.0))
    }
    fn dynamic(&self) -> bool {
        true
    }
}

/// An information ceiling for ranking by count and idle time: the mean
/// number of family arrivals in the next `horizon` requests for each
/// (count class, log₂ idle) state, fitted on the whole trace in advance
/// (hindsight about the population, none about any one family).
#[derive(Debug)]
pub struct FittedTable {
    hist: History,
    table: Vec<f64>,
}

impl FittedTable {
    pub fn new(w: &World, horizon: usize) -> Self {
        let n = (CLASSES as usize + 1) * IDLE_BUCKETS;
        Self {
            hist: History::new(w),
            table: fit_table(w, horizon, n, |uses, _, idle| Hazard::state(uses, idle)),
        }
    }
}

/// The mean number of family arrivals in the next `horizon` requests per
/// state, over the whole trace (sampled every 25 requests): `state` maps a
/// family's uses so far, the index of its latest request and its idle time
/// to one of `states` slots.
fn fit_table(
    w: &World,
    horizon: usize,
    states: usize,
    state: impl Fn(u32, usize, usize) -> usize,
) -> Vec<f64> {
    let mut arrivals: Vec<Vec<u32>> = vec![Vec::new(); w.blocks()];
    for (t, r) in w.reqs.iter().enumerate() {
        arrivals[w.root[r[0] as usize] as usize].push(t as u32);
    }
    let (mut sum, mut count) = (vec![0f64; states], vec![0f64; states]);
    for t in (0..w.reqs.len().saturating_sub(horizon)).step_by(25) {
        for v in arrivals
            .iter()
            .filter(|v| v.first().is_some_and(|&a| a as usize <= t))
        {
            let j = v.partition_point(|&x| x as usize <= t);
            let last = v[j - 1] as usize;
            let st = state(j as u32, last, t - last);
            sum[st] += (v.partition_point(|&x| x as usize <= t + horizon) - j) as f64;
            count[st] += 1.0;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, c)| (s + 0.1) / (c + 1.0))
        .collect()
}

impl LabPolicy for FittedTable {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.hist.record(w, t, req);
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        let (k, last) = self.hist.class(w, b as usize, CLASSES);
        fkey(self.table[Hazard::state(k as u32, t - last as usize)])
    }
    fn dynamic(&self) -> bool {
        true
    }
}

/// LRU by family: a block's recency is its family's last use, except known
/// tails (own last use, ranked below every other block). Families used
/// twice or more rank `bonus` × the residence time later, where the
/// residence time is the moving average age at which once-used blocks are
/// evicted (`bonus` 0: tails first, otherwise LRU).
#[derive(Debug)]
pub struct FamilyLru {
    hist: History,
    bonus: f64,
    residence: Residence,
}

impl FamilyLru {
    pub fn new(w: &World, bonus: f64) -> Self {
        Self {
            hist: History::new(w),
            bonus,
            residence: Residence::default(),
        }
    }
}

impl LabPolicy for FamilyLru {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.hist.record(w, t, req);
    }
    fn key(&self, w: &World, b: u32, _: usize) -> u64 {
        let b = b as usize;
        if self.hist.is_tail(w, b) {
            return u64::from(self.hist.block_last[b]);
        }
        let f = w.root[b] as usize;
        let shift = if self.hist.fam_uses[f] >= 2 {
            self.bonus * self.residence.0
        } else {
            0.0
        };
        (1 << 32) + u64::from(self.hist.fam_last[f]) + shift as u64
    }
    fn on_evict(&mut self, w: &World, b: u32, _: u64, t: usize) {
        self.residence.on_evict(&self.hist, w, b, t);
    }
}

/// Class-rate LRU: recency by family (tails on their own clock), shifted
/// by `R × (r_k / r_1 − 1)`: `r_k` is the learned arrival rate of families
/// used `k` times ([`RateTable`]), `R` the residence time of once-used
/// blocks. A class that returns no more often than a first-seen family
/// gets no shift, so where counts do not predict reuse this is LRU.
/// `fixed`: the key is computed at the block's last use and kept (as the
/// index would), instead of recomputed with the current rates when it
/// reaches the front.
#[derive(Debug)]
pub struct ClassRateLru {
    hist: History,
    rates: RateTable,
    residence: Residence,
    fixed: Option<Vec<u64>>,
}

impl ClassRateLru {
    pub fn new(w: &World, fixed: bool) -> Self {
        Self {
            hist: History::new(w),
            rates: RateTable::new(CLASSES as usize + 1),
            residence: Residence::default(),
            fixed: fixed.then(|| vec![0; w.blocks()]),
        }
    }

    fn current_key(&self, w: &World, b: u32) -> u64 {
        let (c, last) = self.hist.class(w, b as usize, CLASSES);
        let shift = if c <= 1 {
            0.0
        } else {
            let pooled = self.rates.pooled(0..CLASSES as usize + 1);
            let ratio = self.rates.rate(c, pooled) / self.rates.rate(1, pooled);
            self.residence.0 * (ratio - 1.0).max(0.0)
        };
        fkey(f64::from(last) + shift)
    }
}

impl LabPolicy for ClassRateLru {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        let f = w.root[req[0] as usize] as usize;
        let uses = self.hist.fam_uses[f];
        let from = (uses > 0).then(|| uses.min(CLASSES) as usize);
        self.rates.arrive(t, from, (uses + 1).min(CLASSES) as usize);
        self.hist.record(w, t, req);
        let keys: Option<Vec<u64>> = self
            .fixed
            .as_ref()
            .map(|_| req.iter().map(|&b| self.current_key(w, b)).collect());
        if let (Some(fixed), Some(keys)) = (&mut self.fixed, keys) {
            for (&b, k) in req.iter().zip(keys) {
                fixed[b as usize] = k;
            }
        }
    }
    fn key(&self, w: &World, b: u32, _: usize) -> u64 {
        match &self.fixed {
            Some(keys) => keys[b as usize],
            None => self.current_key(w, b),
        }
    }
    fn on_evict(&mut self, w: &World, b: u32, _: u64, t: usize) {
        self.residence.on_evict(&self.hist, w, b, t);
    }
}

/// ARC over families: T1 holds blocks of families used once (and tails),
/// T2 those of families used twice or more; LRU within each. T1's target
/// size adapts: a family that returns within `ghost` caches' worth of
/// evictions after leaving T1 grows it by its length, after leaving T2
/// shrinks it.
#[derive(Debug)]
pub struct FamilyArc {
    hist: History,
    capacity: f64,
    ghost: f64,
    target_t1: f64,
    t1: f64,
    in_t1: Vec<bool>,
    evicted: u64,
    left: Vec<Option<(u64, bool)>>,
}

impl FamilyArc {
    pub fn new(w: &World, capacity: u64, ghost: f64) -> Self {
        Self {
            hist: History::new(w),
            capacity: capacity as f64,
            ghost,
            target_t1: capacity as f64 / 2.0,
            t1: 0.0,
            in_t1: vec![false; w.blocks()],
            evicted: 0,
            left: vec![None; w.blocks()],
        }
    }
}

impl LabPolicy for FamilyArc {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], hit: usize) {
        let f = w.root[req[0] as usize] as usize;
        if let Some((at, from_t1)) = self.left[f].take() {
            if hit < req.len() && ((self.evicted - at) as f64) < self.ghost * self.capacity {
                let d = req.len() as f64;
                self.target_t1 = if from_t1 {
                    (self.target_t1 + d).min(self.capacity)
                } else {
                    (self.target_t1 - d).max(0.0)
                };
            }
        }
        self.hist.record(w, t, req);
        for &b in req {
            let b = b as usize;
            let now_t1 = self.hist.class(w, b, CLASSES).0 == 1;
            if now_t1 != self.in_t1[b] {
                self.t1 += if now_t1 { 1.0 } else { -1.0 };
                self.in_t1[b] = now_t1;
            }
        }
    }
    fn key(&self, w: &World, b: u32, _: usize) -> u64 {
        let (_, last) = self.hist.class(w, b as usize, CLASSES);
        let from_t1 = self.t1 > self.target_t1;
        if self.in_t1[b as usize] == from_t1 {
            u64::from(last)
        } else {
            (1 << 40) + u64::from(last)
        }
    }
    fn on_evict(&mut self, w: &World, b: u32, _: u64, _: usize) {
        let b = b as usize;
        let was_t1 = self.in_t1[b];
        if was_t1 {
            self.t1 -= 1.0;
            self.in_t1[b] = false;
        }
        self.evicted += 1;
        self.left[w.root[b] as usize] = Some((self.evicted, was_t1));
    }
    fn dynamic(&self) -> bool {
        true
    }
}

/// Log₂ bucket of a request's output length (0 when not known).
fn output_bucket(output: Option<u64>) -> usize {
    output.map_or(0, |o| {
        (u64::BITS - o.leading_zeros()).min(OUTPUT_BUCKETS as u32 - 1) as usize
    })
}

const OUTPUT_BUCKETS: usize = 13;
const LENGTH_BUCKETS: usize = 9;
/// Use-count classes of families seen more than once: 2, 3, 4 and more.
const REUSED_COUNTS: usize = 3;

/// Shape-rate LRU: recency by family, shifted by `R × ln(r_c / r_1)`,
/// where `r_c` is the arrival rate learned online ([`RateTable`]) for the
/// family's class, `r_1` the pooled rate of families seen once, and `R`
/// the residence time of once-used blocks: each e-fold of expected rate
/// buys one more residence time, and a class that returns less often than
/// the average first-seen family ranks below LRU. A family seen once is
/// classed by the shape of its request (log₂ length, and log₂ output when
/// `output`); a family seen more often by its use count and (when
/// `output`) its latest output. Known tails keep their own clock and rank
/// as the average once-used family. Keys are fixed at each use, as the
/// index keeps them.
///
/// On the bundled trace the output length is the one request feature that
/// predicts a first return (families whose first request produced under 16
/// tokens return 70–80% of the time, those that produced 128 or more
/// 3–6%), so `shape-rate-out` is the best online candidate here;
/// `fitted-shape` bounds what any ranking by those features can reach.
#[derive(Debug)]
pub struct ShapeRateLru {
    hist: History,
    rates: RateTable,
    fam_class: Vec<usize>,
    residence: Residence,
    output: bool,
    keys: Vec<u64>,
}

impl ShapeRateLru {
    const FIRST_SEEN: std::ops::Range<usize> = 0..LENGTH_BUCKETS * OUTPUT_BUCKETS;

    pub fn new(w: &World, output: bool) -> Self {
        let classes = (LENGTH_BUCKETS + REUSED_COUNTS) * OUTPUT_BUCKETS;
        Self {
            hist: History::new(w),
            rates: RateTable::new(classes),
            fam_class: vec![0; w.blocks()],
            residence: Residence::default(),
            output,
            keys: vec![0; w.blocks()],
        }
    }

    /// The class a family enters when request `t` (its use number `uses`,
    /// from 0) arrives.
    fn class(&self, w: &World, t: usize, uses: u32) -> usize {
        let out = output_bucket(self.output.then(|| w.output[t]));
        let row = if uses == 0 {
            let len = w.reqs[t].len();
            ((usize::BITS - len.leading_zeros()) as usize).min(LENGTH_BUCKETS - 1)
        } else {
            LENGTH_BUCKETS + (uses as usize - 1).min(REUSED_COUNTS - 1)
        };
        row * OUTPUT_BUCKETS + out
    }

    /// The key of the blocks of family `f` that are not known tails.
    fn family_key(&self, f: usize) -> u64 {
        let reference = self.rates.pooled(Self::FIRST_SEEN);
        let ratio = self.rates.rate(self.fam_class[f], reference) / reference;
        fkey(Self::BASE + f64::from(self.hist.fam_last[f]) + self.residence.0 * ratio.ln())
    }

    /// Offset so that shifts below zero keep keys positive.
    const BASE: f64 = 1e9;
}

impl LabPolicy for ShapeRateLru {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        let f = w.root[req[0] as usize] as usize;
        let uses = self.hist.fam_uses[f];
        let to = self.class(w, t, uses);
        self.rates
            .arrive(t, (uses > 0).then_some(self.fam_class[f]), to);
        self.fam_class[f] = to;
        self.hist.record(w, t, req);
        let family = self.family_key(f);
        for &b in req {
            let b = b as usize;
            self.keys[b] = if self.hist.is_tail(w, b) {
                fkey(Self::BASE + f64::from(self.hist.block_last[b]))
            } else {
                family
            };
        }
    }
    fn key(&self, _: &World, b: u32, _: usize) -> u64 {
        self.keys[b as usize]
    }
    fn on_evict(&mut self, w: &World, b: u32, _: u64, t: usize) {
        self.residence.on_evict(&self.hist, w, b, t);
    }
}

/// Hindsight ceiling for rankings by (uses so far, latest output length,
/// idle time): the mean arrivals in the next `horizon` requests per state,
/// fitted on the whole trace in advance.
#[derive(Debug)]
pub struct FittedShapeTable {
    hist: History,
    fam_out: Vec<usize>,
    table: Vec<f64>,
}

impl FittedShapeTable {
    fn state(k: u32, ob: usize, idle: usize) -> usize {
        let ib = ((usize::BITS - idle.leading_zeros()) as usize).min(IDLE_BUCKETS - 1);
        (k.min(4) as usize * OUTPUT_BUCKETS + ob) * IDLE_BUCKETS + ib
    }

    pub fn new(w: &World, horizon: usize) -> Self {
        let n = 5 * OUTPUT_BUCKETS * IDLE_BUCKETS;
        Self {
            hist: History::new(w),
            fam_out: vec![0; w.blocks()],
            table: fit_table(w, horizon, n, |uses, last, idle| {
                Self::state(uses, output_bucket(Some(w.output[last])), idle)
            }),
        }
    }
}

impl LabPolicy for FittedShapeTable {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], _: usize) {
        self.hist.record(w, t, req);
        self.fam_out[w.root[req[0] as usize] as usize] = output_bucket(Some(w.output[t]));
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        let (k, last) = self.hist.class(w, b as usize, CLASSES);
        let f = w.root[b as usize] as usize;
        fkey(self.table[Self::state(k as u32, self.fam_out[f], t - last as usize)])
    }
    fn dynamic(&self) -> bool {
        true
    }
}

/// Least hit density (Beckmann et al., NSDI '18): per class and age
/// (requests since the block's last use), the blocks hit and evicted at
/// that age are counted online (decaying by 0.9 every 50 requests); a
/// block's rank is its class's expected hits over expected remaining
/// lifetime, given that it reached its age. Classes: the family's uses
/// (1, 2, 3+) × its latest output length (under 16, under 128, more
/// tokens), and known tails. Few classes on purpose: finer ones (as in
/// `shape-rate-out`) leave each age's counts too sparse.
#[derive(Debug)]
pub struct Lhd {
    hist: History,
    block_class: Vec<u8>,
    hits: Vec<f64>,
    evictions: Vec<f64>,
    density: Vec<f64>,
}

const LHD_CLASSES: usize = 10;
const LHD_TAIL: usize = LHD_CLASSES - 1;
const LHD_AGES: usize = 512;
const LHD_AGE_WIDTH: usize = 8;

impl Lhd {
    pub fn new(w: &World) -> Self {
        let n = LHD_CLASSES * LHD_AGES;
        Self {
            hist: History::new(w),
            block_class: vec![0; w.blocks()],
            hits: vec![0.0; n],
            evictions: vec![0.0; n],
            density: vec![1.0; n],
        }
    }

    fn slot(&self, w: &World, b: usize, t: usize) -> usize {
        let class = if self.hist.is_tail(w, b) {
            LHD_TAIL
        } else {
            usize::from(self.block_class[b])
        };
        let age = (t - self.hist.block_last[b] as usize) / LHD_AGE_WIDTH;
        class * LHD_AGES + age.min(LHD_AGES - 1)
    }

    fn refresh(&mut self) {
        for c in 0..LHD_CLASSES {
            let (mut hits, mut events, mut life) = (0.0, 0.0, 0.0);
            for a in (0..LHD_AGES).rev() {
                let i = c * LHD_AGES + a;
                hits += self.hits[i];
                events += self.hits[i] + self.evictions[i];
                life += events;
                self.density[i] = (hits + 1e-3) / (life + 1.0);
                self.hits[i] *= 0.9;
                self.evictions[i] *= 0.9;
            }
        }
    }
}

impl LabPolicy for Lhd {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], hit: usize) {
        for &b in &req[..hit] {
            let i = self.slot(w, b as usize, t);
            self.hits[i] += 1.0;
        }
        self.hist.record(w, t, req);
        let f = w.root[req[0] as usize] as usize;
        let uses = self.hist.fam_uses[f].min(3) as usize - 1;
        let out = match w.output[t] {
            0..16 => 0,
            16..128 => 1,
            _ => 2,
        };
        for &b in req {
            self.block_class[b as usize] = (uses * 3 + out) as u8;
        }
        if t % 50 == 0 {
            self.refresh();
        }
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        fkey(self.density[self.slot(w, b as usize, t)])
    }
    fn on_evict(&mut self, w: &World, b: u32, _: u64, t: usize) {
        let i = self.slot(w, b as usize, t);
        self.evictions[i] += 1.0;
    }
    fn dynamic(&self) -> bool {
        true
    }
}

// ---- the command ---------------------------------------------------------------

/// Candidates by name, with what each is (for `--help` and reports).
pub const CANDIDATES: &[(&str, &str)] = &[
    ("lru", "least recently used (validates the simulator)"),
    (
        "lfu-ghost",
        "once-used first, then uses so far (full history)",
    ),
    (
        "eb-rate",
        "empirical-Bayes Poisson rate per block, ranked exactly",
    ),
    ("hazard", "learned hazard by (family uses, log2 idle), now"),
    ("family-lru", "LRU by family, known tails first"),
    (
        "family-lru-2",
        "family-lru, reused families 2 residence times later",
    ),
    (
        "class-rate",
        "family LRU shifted by R x (r_k/r_1 - 1), learned rates",
    ),
    (
        "class-rate-fixed",
        "class-rate with keys fixed at last use (as the index would)",
    ),
    ("family-arc", "ARC over families, ghosts of 2 caches"),
    (
        "shape-rate",
        "LRU shifted by ln of the learned rate of the family's class (shape, uses)",
    ),
    (
        "shape-rate-out",
        "shape-rate, classes split by output length",
    ),
    (
        "return-odds",
        "LRU shifted by mu x log-odds of reuse, learned per class with censoring",
    ),
    (
        "fitted-odds",
        "hindsight: return-odds with reuse odds fitted on the other documents",
    ),
    (
        "fitted-table",
        "hindsight: (uses, idle) table of next-100 arrivals, fitted in advance",
    ),
    (
        "fitted-shape",
        "hindsight: (uses, latest output length, idle) table, fitted in advance",
    ),
    (
        "fitted-belady",
        "hindsight: return-odds with per-class odds that Belady serves the next use",
    ),
    (
        "oracle-first-use",
        "hindsight: return-odds told which once-used blocks never return",
    ),
    (
        "oracle-alive",
        "hindsight: whether a block is used again (not when), LRU otherwise",
    ),
    (
        "oracle-after-2",
        "hindsight: total uses, once a block was used twice",
    ),
    ("oracle-count", "hindsight: total uses"),
    ("belady", "offline optimum (next use furthest ahead)"),
];

/// Builds the candidate `name` for a run at `capacity` blocks.
pub fn candidate(name: &str, w: &World, capacity: u64) -> Option<Box<dyn LabPolicy>> {
    let hist = || History::new(w);
    Some(match name {
        "lru" => Box::new(Lru::default()),
        "lfu-ghost" => Box::new(LfuGhost { hist: hist() }),
        "eb-rate" => Box::new(EbRate {
            hist: hist(),
            arrivals: 0.0,
            exposure: 0.0,
            seen: 0.0,
            last_t: 0,
        }),
        "hazard" => Box::new(Hazard {
            hist: hist(),
            seen: Vec::new(),
            arrivals: vec![0.0; (CLASSES as usize + 1) * IDLE_BUCKETS],
            exposure: vec![0.0; (CLASSES as usize + 1) * IDLE_BUCKETS],
        }),
        "family-lru" => Box::new(FamilyLru::new(w, 0.0)),
        "family-lru-2" => Box::new(FamilyLru::new(w, 2.0)),
        "class-rate" => Box::new(ClassRateLru::new(w, false)),
        "class-rate-fixed" => Box::new(ClassRateLru::new(w, true)),
        "family-arc" => Box::new(FamilyArc::new(w, capacity, 2.0)),
        "shape-rate" => Box::new(ShapeRateLru::new(w, false)),
        "fitted-shape" => Box::new(FittedShapeTable::new(w, 100)),
        "shape-rate-out" => Box::new(ShapeRateLru::new(w, true)),
        "lhd" => Box::new(Lhd::new(w)),
        "fitted-table" => Box::new(FittedTable::new(w, 100)),
        "fitted-belady" => Box::new(hindsight::fitted_belady(w, capacity)),
        "oracle-first-use" => Box::new(hindsight::OracleFirstUse::new(w)),
        "oracle-alive" => Box::new(hindsight::OracleAlive::default()),
        "oracle-after-2" => Box::new(OracleCount::new(w, true)),
        "oracle-count" => Box::new(OracleCount::new(w, false)),
        "return-odds" => Box::new(ReturnOdds::online(w)),
        "fitted-odds" => Box::new(ReturnOdds::fitted(w)),
        "belady" => Box::new(Belady),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    /// The simulator reproduces the index's replay (LRU and the offline
    /// bound, `replay.rs`'s pinned figures) at 1M / 3M / 10M tokens.
    #[test]
    fn reproduces_the_replay_on_the_bundled_trace() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/traces/synthetic_trace.jsonl");
        let w = World::new(&Trace::load(&path).unwrap().as_tokens().unwrap());
        let rates = |name: &str| -> Vec<String> {
            [1953, 5859, 19531]
                .iter()
                .map(|&c| {
                    let mut p = candidate(name, &w, c).unwrap();
                    format!("{:.3}", simulate(&w, p.as_mut(), c).hit_rate())
                })
                .collect()
        };
        assert_eq!(rates("lru"), ["0.142", "0.309", "0.567"]);
        assert_eq!(rates("belady"), ["0.370", "0.550", "0.640"]);
    }

    /// One-off documents with long outputs stream past documents with
    /// short outputs that come back once, 30 requests later, beyond LRU's
    /// reach. Classing families by output length learns that and keeps the
    /// returning ones; without the output length it cannot tell them apart.
    #[test]
    fn shape_rate_learns_which_output_lengths_return() {
        let (mut reqs, mut output) = (Vec::new(), Vec::new());
        let doc = |id: u32| -> Vec<u32> { (0..10).map(|d| id * 16 + d).collect() };
        for t in 0..3000u32 {
            if t % 3 == 0 {
                reqs.push(doc(1_000_000 + t));
                output.push(5);
            }
            if t % 3 == 0 && t >= 30 {
                reqs.push(doc(1_000_000 + t - 30));
                output.push(5);
            }
            reqs.push(doc(t));
            output.push(500);
        }
        let w = World::with_output(&reqs, output);
        let rate = |name: &str| {
            let mut p = candidate(name, &w, 200).unwrap();
            simulate(&w, p.as_mut(), 200).hit_rate()
        };
        let (lru, blind, out) = (rate("lru"), rate("shape-rate"), rate("shape-rate-out"));
        let odds = rate("return-odds");
        // Returns are 1/6 of the blocks: LRU catches none, the learned class most.
        assert!(lru < 0.01, "lru {lru}");
        assert!(blind < 0.05, "shape-rate {blind}");
        assert!(out > 0.12, "shape-rate-out {out}");
        assert!(odds > 0.12, "return-odds {odds}");
    }

    #[test]
    fn every_candidate_runs_and_stays_under_the_ceiling() {
        let reqs: Vec<Vec<u32>> = (0..400u32)
            .map(|i| {
                let root = (i * 7919) % 13;
                (0..(root % 5 + 2))
                    .map(|d| root * 100 + d)
                    .chain([10_000 + i])
                    .collect()
            })
            .collect();
        let w = World::new(&reqs);
        let bound = simulate(&w, &mut Belady, u64::MAX).hit_blocks;
        for (name, _) in CANDIDATES {
            let mut p = candidate(name, &w, 12).unwrap();
            let r = simulate(&w, p.as_mut(), 12);
            assert!(r.hit_blocks <= bound, "{name}: {} > {bound}", r.hit_blocks);
            assert!(r.evicted > 0, "{name}");
        }
    }
}
