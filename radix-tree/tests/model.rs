//! Model-based property tests: random operation sequences run against the
//! index and against a naive model (a map from whole-page prompt prefixes to
//! per-tier blocks, plus a list of leases). After every operation the index
//! must agree with the model on what is cached, where, what is pinned, which
//! events were emitted and what its counters say, and `check_invariants`
//! must pass.

use proptest::prelude::*;
use radix_tree::policy::{by_name, POLICY_NAMES};
use radix_tree::{
    BlockId, EventSink, EvictedPage, IndexConfig, IndexError, IndexEvent, InsertOutcome, LeaseId,
    ManualClock, NamespaceConfig, NamespaceId, NamespaceKey, PageHash, PageLocation, PinKind,
    RadixIndex, Tier, TIERS,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Locs = [Option<BlockId>; TIERS];

const HOUR_MS: u64 = 3_600_000;

// ---- strategies --------------------------------------------------------------

/// Prompts are built from a few shared 4-token chunks (two of them share
/// their first half) and single tokens that also occur inside the chunks, so
/// prompts share prefixes at every page size and edges get split.
const CHUNKS: [[u32; 4]; 3] = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 1, 2]];

fn prompt() -> impl Strategy<Value = Vec<u32>> {
    let segment = prop_oneof![
        3 => (0..CHUNKS.len()).prop_map(|c| CHUNKS[c].to_vec()),
        1 => (0..3u32).prop_map(|t| vec![t]),
    ];
    prop::collection::vec(segment, 0..6).prop_map(|segs| segs.concat())
}

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

/// Picks one of `n` things (modulo `n`); shrinks towards the first.
#[derive(Debug, Clone, Copy)]
struct Pick(usize);

impl Pick {
    fn index(&self, n: usize) -> usize {
        self.0 % n
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<usize>().prop_map(Pick)
}

#[derive(Debug, Clone)]
enum Target {
    /// A page the model holds (the n-th, in key order).
    Cached(Pick),
    /// The n-th page of a prompt, cached or not.
    Prompt(Vec<u32>, Pick),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => pick().prop_map(Target::Cached),
        1 => (prompt(), pick()).prop_map(|(p, i)| Target::Prompt(p, i)),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Insert {
        ns: usize,
        prompt: Vec<u32>,
        tier: Tier,
        priority: u8,
    },
    Match {
        ns: usize,
        prompt: Vec<u32>,
    },
    Evict {
        tier: Tier,
        n: usize,
    },
    EvictNamespace {
        ns: usize,
        tier: Tier,
        n: usize,
    },
    Pin {
        ns: usize,
        prompt: Vec<u32>,
        hard: bool,
        priority: u8,
        ttl_ms: u64,
    },
    Renew {
        lease: Pick,
        ttl_ms: u64,
    },
    Release {
        lease: Pick,
    },
    Advance {
        ms: u64,
        reclaim: bool,
    },
    AddLocation {
        ns: usize,
        target: Target,
        tier: Tier,
    },
    DropLocation {
        ns: usize,
        target: Target,
        tier: Tier,
    },
    Clear {
        ns: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..2usize, prompt(), tier(), 0..3u8)
            .prop_map(|(ns, prompt, tier, priority)| Op::Insert { ns, prompt, tier, priority }),
        4 => (0..2usize, prompt()).prop_map(|(ns, prompt)| Op::Match { ns, prompt }),
        3 => (tier(), 0..6usize).prop_map(|(tier, n)| Op::Evict { tier, n }),
        1 => (0..2usize, tier(), 0..4usize).prop_map(|(ns, tier, n)| Op::EvictNamespace { ns, tier, n }),
        4 => (0..2usize, prompt(), any::<bool>(), 0..3u8, 1..100u64).prop_map(|(ns, prompt, hard, priority, ttl_ms)| {
            Op::Pin { ns, prompt, hard, priority, ttl_ms }
        }),
        1 => (pick(), 1..100u64).prop_map(|(lease, ttl_ms)| Op::Renew { lease, ttl_ms }),
        2 => pick().prop_map(|lease| Op::Release { lease }),
        2 => (0..60u64, any::<bool>()).prop_map(|(ms, reclaim)| Op::Advance { ms, reclaim }),
        2 => (0..2usize, target(), tier()).prop_map(|(ns, target, tier)| Op::AddLocation { ns, target, tier }),
        2 => (0..2usize, target(), tier()).prop_map(|(ns, target, tier)| Op::DropLocation { ns, target, tier }),
        1 => (0..2usize).prop_map(|ns| Op::Clear { ns }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    page_sizes: [usize; 2],
    /// Per-tenant pin cap (`max_pinned_pages_per_tenant`).
    pin_cap: Option<u64>,
    ops: Vec<Op>,
}

fn page_size() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 4])
}

fn case() -> impl Strategy<Value = Case> {
    (
        page_size(),
        page_size(),
        prop::option::weighted(0.3, 2..12u64),
        prop::collection::vec(op(), 1..60),
    )
        .prop_map(|(a, b, pin_cap, ops)| Case {
            page_sizes: [a, b],
            pin_cap,
            ops,
        })
}

// ---- the model -----------------------------------------------------------------

#[derive(Debug, Default)]
struct Collect(Mutex<Vec<IndexEvent>>);

impl EventSink for Collect {
    fn emit(&self, events: &[IndexEvent]) {
        self.0.lock().unwrap().extend_from_slice(events);
    }
}

#[derive(Debug, Clone)]
struct MPage {
    hash: PageHash,
    parent: Option<PageHash>,
    locs: Locs,
}

#[derive(Debug)]
struct MNamespace {
    id: NamespaceId,
    tenant: String,
    ps: usize,
    seed: PageHash,
    /// Whole-page prompt prefix -> page. Prefix-closed.
    pages: BTreeMap<Vec<u32>, MPage>,
}

impl MNamespace {
    /// Page hashes computed from the documented algorithm, independently of the index.
    fn hashes(&self, prompt: &[u32]) -> Vec<PageHash> {
        let mut h = self.seed;
        prompt
            .chunks_exact(self.ps)
            .map(|p| {
                h = h.chain(p);
                h
            })
            .collect()
    }

    fn longest(&self, prompt: &[u32]) -> usize {
        (1..=prompt.len() / self.ps)
            .take_while(|&k| self.pages.contains_key(&prompt[..k * self.ps]))
            .count()
    }

    fn prefix_of(&self, hash: PageHash) -> Option<Vec<u32>> {
        self.pages
            .iter()
            .find(|(_, p)| p.hash == hash)
            .map(|(k, _)| k.clone())
    }
}

#[derive(Debug)]
struct MLease {
    id: LeaseId,
    ns: usize,
    /// The pages it still holds (shrinks when its pages leave the tree).
    prefix: Vec<u32>,
    hard: bool,
    expires: u64,
    /// Not released, reclaimed or cleared.
    live: bool,
}

#[derive(Debug, Default)]
struct Counters {
    lookups: u64,
    lookup_tokens: u64,
    hit_tokens: [u64; TIERS],
    inserted_pages: u64,
    evicted_copies: [u64; TIERS],
    removed_pages: u64,
}

/// (namespace, page hash, tier) -> parent page of every copy the model holds.
type Snapshot = BTreeMap<(u32, u128, usize), Option<PageHash>>;

struct Harness {
    index: RadixIndex,
    clock: Arc<ManualClock>,
    sink: Arc<Collect>,
    ns: Vec<MNamespace>,
    leases: Vec<MLease>,
    now: u64,
    next_block: u32,
    pin_cap: u64,
    /// When set, every insert pins its request and evicts its tier down to this.
    cap: Option<u64>,
    expect: Counters,
}

fn locs_of(l: &PageLocation) -> Locs {
    std::array::from_fn(|t| l.get(Tier::ALL[t]))
}

fn is_empty(locs: &Locs) -> bool {
    locs.iter().all(Option::is_none)
}

impl Harness {
    fn new(policy: &str, case: &Case, cap: Option<u64>) -> Self {
        let clock = Arc::new(ManualClock::new(1_000));
        let sink = Arc::new(Collect::default());
        let mut config = IndexConfig::builder()
            .policy(by_name(policy).expect("known policy"))
            .clock(clock.clone())
            .events(sink.clone());
        if let Some(c) = case.pin_cap {
            config = config.max_pinned_pages_per_tenant(c);
        }
        let index = RadixIndex::new(config.build().expect("valid config"));
        let ns = (0..2)
            .map(|i| {
                let key = NamespaceKey::new(format!("tenant-{i}"), "model", "layout", "");
                let ps = case.page_sizes[i];
                let id = index
                    .create_namespace(&key, NamespaceConfig::new(ps).unwrap())
                    .unwrap();
                MNamespace {
                    id,
                    tenant: key.tenant.clone(),
                    ps,
                    seed: key.seed(),
                    pages: BTreeMap::new(),
                }
            })
            .collect();
        Self {
            index,
            clock,
            sink,
            ns,
            leases: Vec::new(),
            now: 1_000,
            next_block: 0,
            pin_cap: case.pin_cap.unwrap_or(u64::MAX),
            cap,
            expect: Counters::default(),
        }
    }

    fn fresh_block(&mut self) -> BlockId {
        self.next_block += 1;
        BlockId(self.next_block)
    }

    fn ns_index(&self, id: NamespaceId) -> usize {
        self.ns
            .iter()
            .position(|m| m.id == id)
            .unwrap_or_else(|| panic!("unknown namespace {id:?} reported"))
    }

    // ---- model bookkeeping ----

    /// What every mutating call on one namespace does first.
    fn reclaim_ns(&mut self, ns: usize) {
        let now = self.now;
        for l in self
            .leases
            .iter_mut()
            .filter(|l| l.live && l.ns == ns && l.expires <= now)
        {
            l.live = false;
        }
    }

    /// Covered by a hard lease that is still in force.
    fn hard_pinned(&self, ns: usize, prefix: &[u32]) -> bool {
        self.leases.iter().any(|l| {
            l.live && l.hard && l.ns == ns && l.expires > self.now && l.prefix.starts_with(prefix)
        })
    }

    /// Pages of `ns` that some registered lease (hard or soft, expired or
    /// not, as long as it was not reclaimed) holds.
    fn pinned_set(&self, ns: usize) -> BTreeSet<Vec<u32>> {
        let ps = self.ns[ns].ps;
        let mut set = BTreeSet::new();
        for l in self.leases.iter().filter(|l| l.live && l.ns == ns) {
            for k in 1..=l.prefix.len() / ps {
                let p = &l.prefix[..k * ps];
                assert!(
                    self.ns[ns].pages.contains_key(p),
                    "model: a live lease holds a page that left"
                );
                set.insert(p.to_vec());
            }
        }
        set
    }

    fn tier_pages(&self, t: Tier) -> u64 {
        self.ns
            .iter()
            .flat_map(|m| m.pages.values())
            .filter(|p| p.locs[t.index()].is_some())
            .count() as u64
    }

    fn remove_page(&mut self, ns: usize, prefix: &[u32]) {
        self.ns[ns].pages.remove(prefix);
        let ps = self.ns[ns].ps;
        for l in self.leases.iter_mut().filter(|l| l.ns == ns) {
            if l.prefix.starts_with(prefix) {
                assert!(
                    !(l.live && l.hard && l.expires > self.now),
                    "a hard-leased page left the tree"
                );
                l.prefix.truncate(prefix.len() - ps);
            }
        }
        self.expect.removed_pages += 1;
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::new();
        for m in &self.ns {
            for p in m.pages.values() {
                for t in 0..TIERS {
                    if p.locs[t].is_some() {
                        s.insert((m.id.0, p.hash.0, t), p.parent);
                    }
                }
            }
        }
        s
    }

    /// Checks that the events emitted since the last call are exactly the
    /// model's copy changes since `before`: a Stored (with the right parent)
    /// for each new copy, a Removed for each dropped one.
    fn sync_events(&mut self, before: &Snapshot, cleared: Option<NamespaceId>) {
        let after = self.snapshot();
        let events = std::mem::take(&mut *self.sink.0.lock().unwrap());
        let (mut stored, mut removed, mut clears) = (Vec::new(), Vec::new(), Vec::new());
        for e in events {
            match e {
                IndexEvent::Stored {
                    ns,
                    hash,
                    parent,
                    tier,
                } => {
                    let key = (ns.0, hash.0, tier.index());
                    assert_eq!(
                        after.get(&key).copied(),
                        Some(parent),
                        "Stored event for a copy the model lacks, or with the wrong parent"
                    );
                    stored.push(key);
                }
                IndexEvent::Removed { ns, hash, tier } => {
                    removed.push((ns.0, hash.0, tier.index()))
                }
                IndexEvent::Cleared { ns } => clears.push(ns),
            }
        }
        stored.sort_unstable();
        removed.sort_unstable();
        let new: Vec<_> = after
            .keys()
            .filter(|k| !before.contains_key(k))
            .copied()
            .collect();
        let gone: Vec<_> = before
            .keys()
            .filter(|k| !after.contains_key(k))
            .copied()
            .collect();
        assert_eq!(stored, new, "Stored events vs new copies");
        assert_eq!(removed, gone, "Removed events vs dropped copies");
        assert_eq!(
            clears,
            cleared.into_iter().collect::<Vec<_>>(),
            "Cleared events"
        );
    }

    /// Applies reported drops to the model, checking each against it.
    /// Returns the pages that left the tree.
    fn apply_drops(&mut self, res: &[EvictedPage]) -> Vec<(usize, Vec<u32>)> {
        let mut left = Vec::new();
        for ep in res {
            let ns = self.ns_index(ep.ns);
            let prefix = self.ns[ns].prefix_of(ep.hash).unwrap_or_else(|| {
                panic!(
                    "dropped page {:?} is not cached (or was reported gone twice)",
                    ep.hash
                )
            });
            assert!(
                !self.hard_pinned(ns, &prefix),
                "a hard-pinned page was dropped"
            );
            assert!(!ep.dropped.is_empty(), "an entry that drops nothing");
            let page = self.ns[ns].pages.get_mut(&prefix).unwrap();
            for t in Tier::ALL {
                if let Some(b) = ep.dropped.get(t) {
                    assert_eq!(
                        page.locs[t.index()],
                        Some(b),
                        "dropped block is not the page's block on {t}"
                    );
                    page.locs[t.index()] = None;
                }
            }
            assert_eq!(locs_of(&ep.remaining), page.locs, "remaining copies");
            assert_eq!(ep.page_removed(), is_empty(&page.locs));
            if is_empty(&page.locs) {
                self.remove_page(ns, &prefix);
                left.push((ns, prefix));
            }
        }
        for (ns, p) in &left {
            assert!(
                !self.ns[*ns]
                    .pages
                    .keys()
                    .any(|k| k.len() > p.len() && k.starts_with(p)),
                "a page left the tree but a page after it stayed"
            );
        }
        left
    }

    // ---- operations ----

    fn run(&mut self, op: &Op) {
        match op {
            Op::Insert {
                ns,
                prompt,
                tier,
                priority,
            } => self.insert(*ns, prompt, *tier, *priority),
            Op::Match { ns, prompt } => self.match_prefix(*ns, prompt),
            Op::Evict { tier, n } => self.evict(None, *tier, *n),
            Op::EvictNamespace { ns, tier, n } => self.evict(Some(*ns), *tier, *n),
            Op::Pin {
                ns,
                prompt,
                hard,
                priority,
                ttl_ms,
            } => {
                self.pin(*ns, prompt, *hard, *priority, *ttl_ms);
            }
            Op::Renew { lease, ttl_ms } => self.renew(lease, *ttl_ms),
            Op::Release { lease } => {
                if !self.leases.is_empty() {
                    self.release(lease.index(self.leases.len()));
                }
            }
            Op::Advance { ms, reclaim } => self.advance(*ms, *reclaim),
            Op::AddLocation { ns, target, tier } => self.add_location(*ns, target, *tier),
            Op::DropLocation { ns, target, tier } => self.drop_location(*ns, target, *tier),
            Op::Clear { ns } => self.clear(*ns),
        }
        self.check();
    }

    fn insert(&mut self, ns: usize, prompt: &[u32], tier: Tier, priority: u8) {
        self.reclaim_ns(ns);
        let before = self.snapshot();
        let ps = self.ns[ns].ps;
        let pages = prompt.len() / ps;
        let blocks: Vec<BlockId> = (0..pages).map(|_| self.fresh_block()).collect();
        let hashes = self.ns[ns].hashes(prompt);
        let cached = self.ns[ns].longest(prompt);
        let mut rejected = Vec::new();
        for i in 0..pages {
            let page = self.ns[ns]
                .pages
                .entry(prompt[..(i + 1) * ps].to_vec())
                .or_insert(MPage {
                    hash: hashes[i],
                    parent: i.checked_sub(1).map(|j| hashes[j]),
                    locs: [None; TIERS],
                });
            match page.locs[tier.index()] {
                Some(_) => rejected.push(blocks[i]),
                None => page.locs[tier.index()] = Some(blocks[i]),
            }
        }
        let out = self
            .index
            .insert_with_priority(self.ns[ns].id, prompt, tier, &blocks, priority)
            .expect("a valid insert");
        assert_eq!(
            out,
            InsertOutcome {
                cached_pages: cached,
                new_pages: pages - cached,
                rejected,
                last_page: hashes.last().copied(),
            }
        );
        self.expect.inserted_pages += (pages - cached) as u64;
        self.sync_events(&before, None);
        if let (Some(cap), true) = (self.cap, pages > 0) {
            self.enforce_cap(ns, prompt, tier, cap);
        }
    }

    /// What a cache in front of the index does after an insert: pin the
    /// request, evict the tier down to its capacity, release the request.
    fn enforce_cap(&mut self, ns: usize, prompt: &[u32], tier: Tier, cap: u64) {
        let lease = self.pin(ns, prompt, true, 0, HOUR_MS);
        let held = self.index.tier_pages(tier);
        if held > cap {
            self.evict(None, tier, (held - cap) as usize);
        }
        let hard_on_tier = (0..self.ns.len())
            .map(|ns| {
                self.ns[ns]
                    .pages
                    .iter()
                    .filter(|(k, p)| p.locs[tier.index()].is_some() && self.hard_pinned(ns, k))
                    .count() as u64
            })
            .sum::<u64>();
        let after = self.index.tier_pages(tier);
        assert!(
            after <= cap.max(hard_on_tier),
            "{tier} holds {after} pages after evicting down to {cap} with {hard_on_tier} hard-pinned"
        );
        if let Some(l) = lease {
            self.release(l);
        }
    }

    fn match_prefix(&mut self, ns: usize, prompt: &[u32]) {
        let m = &self.ns[ns];
        let ps = m.ps;
        let pages = m.longest(prompt);
        let hashes = m.hashes(prompt);
        let got = self
            .index
            .match_prefix(m.id, prompt)
            .expect("a valid lookup");
        assert_eq!(got.pages, pages, "matched pages");
        assert_eq!(got.page_size, ps);
        assert_eq!(got.tokens(), pages * ps);
        assert_eq!(got.locations.len(), pages);
        let mut tier_pages = [0usize; TIERS];
        for (k, loc) in got.locations.iter().enumerate() {
            let page = &m.pages[&prompt[..(k + 1) * ps]];
            assert_eq!(locs_of(loc), page.locs, "locations of page {k}");
            for (count, copy) in tier_pages.iter_mut().zip(&page.locs) {
                *count += usize::from(copy.is_some());
            }
            let fastest = page
                .locs
                .iter()
                .position(Option::is_some)
                .expect("a cached page has a copy");
            self.expect.hit_tokens[fastest] += ps as u64;
        }
        assert_eq!(got.tier_pages, tier_pages);
        assert_eq!(got.last_page, pages.checked_sub(1).map(|k| hashes[k]));
        for t in Tier::ALL {
            let run = (0..pages)
                .take_while(|&k| m.pages[&prompt[..(k + 1) * ps]].locs[t.index()].is_some())
                .count();
            assert_eq!(got.tier_prefix(t), run);
        }
        assert_eq!(self.index.cached_pages(m.id, prompt), Ok(pages));
        assert_eq!(self.index.longest_cached_run(m.id, &hashes), Ok(pages));
        assert_eq!(self.index.page_hashes(m.id, prompt), Ok(hashes.clone()));
        for (k, h) in hashes.iter().enumerate() {
            let want = m.pages.get(&prompt[..(k + 1) * ps]).map(|p| p.locs);
            let got = self.index.location(m.id, *h).unwrap().map(|l| locs_of(&l));
            assert_eq!(got, want, "location of page {k}");
        }
        self.expect.lookups += 1;
        self.expect.lookup_tokens += prompt.len() as u64;
    }

    /// `index.evict` (all namespaces) or `evict_namespace` (one).
    fn evict(&mut self, only: Option<usize>, tier: Tier, n: usize) {
        if let Some(ns) = only {
            self.reclaim_ns(ns);
        }
        let before = self.snapshot();
        let evictable = (0..self.ns.len())
            .filter(|ns| only.is_none_or(|o| o == *ns))
            .map(|ns| {
                self.ns[ns]
                    .pages
                    .iter()
                    .filter(|(k, p)| p.locs[tier.index()].is_some() && !self.hard_pinned(ns, k))
                    .count()
            })
            .sum::<usize>();
        let res = match only {
            None => self.index.evict(tier, n),
            Some(ns) => self.index.evict_namespace(self.ns[ns].id, tier, n).unwrap(),
        };
        if let Some(ns) = only {
            assert!(
                res.iter().all(|e| e.ns == self.ns[ns].id),
                "evict_namespace left its namespace"
            );
        }
        let on_tier = res.iter().filter(|e| e.dropped.has(tier)).count();
        assert_eq!(
            on_tier,
            n.min(evictable),
            "evict({tier}, {n}) dropped {on_tier} copies there with {evictable} evictable"
        );
        // Pages cascade out only when their last copy went; every entry
        // not on the evicted tier must be such a cascade.
        for e in res.iter().filter(|e| !e.dropped.has(tier)) {
            assert!(
                e.page_removed(),
                "an entry off the evicted tier that is not a removal"
            );
        }
        self.apply_drops(&res);
        self.expect.evicted_copies[tier.index()] += on_tier as u64;
        self.sync_events(&before, None);
        if only.is_none() {
            // Evicting reclaims expired leases in the namespaces it touches;
            // reclaim the rest so the model knows which leases remain.
            let pending: Vec<usize> = (0..self.leases.len())
                .filter(|&i| self.leases[i].live && self.leases[i].expires <= self.now)
                .collect();
            let r = self.index.reclaim_expired();
            assert!(
                r <= pending.len(),
                "reclaimed {r} leases with {} expired",
                pending.len()
            );
            for i in pending {
                self.leases[i].live = false;
            }
        }
    }

    fn pin(
        &mut self,
        ns: usize,
        prompt: &[u32],
        hard: bool,
        priority: u8,
        ttl_ms: u64,
    ) -> Option<usize> {
        self.reclaim_ns(ns);
        let before = self.snapshot();
        let kind = if hard {
            PinKind::Lease
        } else {
            PinKind::Session { priority }
        };
        let id = self.ns[ns].id;
        let r = self
            .index
            .pin(id, prompt, kind, Duration::from_millis(ttl_ms));
        self.sync_events(&before, None);
        let ps = self.ns[ns].ps;
        let matched = self.ns[ns].longest(prompt);
        if matched == 0 {
            assert_eq!(r, Err(IndexError::NotCached));
            return None;
        }
        let pinned = self.pinned_set(ns);
        let newly = (1..=matched)
            .filter(|k| !pinned.contains(&prompt[..k * ps]))
            .count() as u64;
        let tenant_pinned = pinned.len() as u64;
        if tenant_pinned + newly > self.pin_cap {
            assert_eq!(
                r,
                Err(IndexError::PinCapExceeded {
                    pinned: tenant_pinned,
                    requested: newly,
                    cap: self.pin_cap,
                })
            );
            return None;
        }
        let lease = r.expect("pin of a cached prefix within the cap");
        assert_eq!(lease.pages, matched, "lease pages");
        assert_eq!(lease.expires_ms, self.now + ttl_ms);
        assert_eq!(lease.id.ns, id);
        assert!(
            self.leases.iter().all(|l| l.id != lease.id),
            "lease id reused"
        );
        self.leases.push(MLease {
            id: lease.id,
            ns,
            prefix: prompt[..matched * ps].to_vec(),
            hard,
            expires: self.now + ttl_ms,
            live: true,
        });
        Some(self.leases.len() - 1)
    }

    fn renew(&mut self, pick: &Pick, ttl_ms: u64) {
        if self.leases.is_empty() {
            return;
        }
        let i = pick.index(self.leases.len());
        self.reclaim_ns(self.leases[i].ns);
        let r = self
            .index
            .renew(self.leases[i].id, Duration::from_millis(ttl_ms));
        let l = &mut self.leases[i];
        if l.live {
            assert_eq!(r, Ok(self.now + ttl_ms));
            l.expires = self.now + ttl_ms;
        } else {
            assert_eq!(r, Err(IndexError::LeaseGone(l.id)));
        }
    }

    fn release(&mut self, i: usize) {
        self.reclaim_ns(self.leases[i].ns);
        let r = self.index.release(self.leases[i].id);
        let l = &mut self.leases[i];
        if l.live {
            assert_eq!(r, Ok(()));
            l.live = false;
        } else {
            assert_eq!(r, Err(IndexError::LeaseGone(l.id)));
        }
    }

    fn advance(&mut self, ms: u64, reclaim: bool) {
        self.clock.advance_ms(ms);
        self.now += ms;
        if reclaim {
            let now = self.now;
            let mut expired = 0;
            for l in self
                .leases
                .iter_mut()
                .filter(|l| l.live && l.expires <= now)
            {
                l.live = false;
                expired += 1;
            }
            assert_eq!(self.index.reclaim_expired(), expired, "reclaimed leases");
        }
    }

    /// The page hash a target names and, if the model holds it, its prefix.
    fn resolve(&self, ns: usize, target: &Target) -> Option<(PageHash, Option<Vec<u32>>)> {
        let m = &self.ns[ns];
        match target {
            Target::Cached(pick) => {
                if m.pages.is_empty() {
                    return None;
                }
                let (k, p) = m.pages.iter().nth(pick.index(m.pages.len())).unwrap();
                Some((p.hash, Some(k.clone())))
            }
            Target::Prompt(prompt, pick) => {
                let pages = prompt.len() / m.ps;
                if pages == 0 {
                    return None;
                }
                let k = pick.index(pages);
                let hash = m.hashes(prompt)[k];
                let prefix = &prompt[..(k + 1) * m.ps];
                Some((hash, m.pages.contains_key(prefix).then(|| prefix.to_vec())))
            }
        }
    }

    fn add_location(&mut self, ns: usize, target: &Target, tier: Tier) {
        let Some((hash, prefix)) = self.resolve(ns, target) else {
            return;
        };
        self.reclaim_ns(ns);
        let before = self.snapshot();
        let block = self.fresh_block();
        let r = self.index.add_location(self.ns[ns].id, hash, tier, block);
        match prefix {
            None => assert_eq!(r, Err(IndexError::UnknownPage(hash))),
            Some(p) => {
                let page = self.ns[ns].pages.get_mut(&p).unwrap();
                if page.locs[tier.index()].is_some() {
                    assert_eq!(r, Err(IndexError::AlreadyPresent));
                } else {
                    assert_eq!(r, Ok(()));
                    page.locs[tier.index()] = Some(block);
                }
            }
        }
        self.sync_events(&before, None);
    }

    fn drop_location(&mut self, ns: usize, target: &Target, tier: Tier) {
        let Some((hash, prefix)) = self.resolve(ns, target) else {
            return;
        };
        self.reclaim_ns(ns);
        let before = self.snapshot();
        let r = self.index.drop_location(self.ns[ns].id, hash, tier);
        let Some(prefix) = prefix else {
            assert_eq!(r, Err(IndexError::UnknownPage(hash)));
            return;
        };
        let page = self.ns[ns].pages[&prefix].clone();
        if page.locs[tier.index()].is_none() {
            assert_eq!(r, Err(IndexError::NotPresent));
            return;
        }
        if self.hard_pinned(ns, &prefix) {
            assert_eq!(r, Err(IndexError::Pinned));
            return;
        }
        let res = r.expect("dropping an unpinned copy");
        // Expected: the one copy, or (for a last copy) the page and every
        // page after it, with all their copies.
        let mut remaining = page.locs;
        remaining[tier.index()] = None;
        let mut want: Vec<(u128, Locs, Locs)> = if is_empty(&remaining) {
            self.ns[ns]
                .pages
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, p)| (p.hash.0, p.locs, [None; TIERS]))
                .collect()
        } else {
            let mut dropped = [None; TIERS];
            dropped[tier.index()] = page.locs[tier.index()];
            vec![(hash.0, dropped, remaining)]
        };
        let mut got: Vec<(u128, Locs, Locs)> = res
            .iter()
            .map(|e| (e.hash.0, locs_of(&e.dropped), locs_of(&e.remaining)))
            .collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "drop_location result");
        assert!(res.iter().all(|e| e.ns == self.ns[ns].id));
        self.apply_drops(&res);
        self.sync_events(&before, None);
    }

    fn clear(&mut self, ns: usize) {
        self.reclaim_ns(ns);
        let before = self.snapshot();
        let id = self.ns[ns].id;
        let r = self.index.clear_namespace(id);
        if self.leases.iter().any(|l| l.live && l.hard && l.ns == ns) {
            assert_eq!(r, Err(IndexError::Pinned));
            self.sync_events(&before, None);
            return;
        }
        let res = r.expect("clear without hard leases");
        let mut want: Vec<(u128, Locs)> = self.ns[ns]
            .pages
            .values()
            .map(|p| (p.hash.0, p.locs))
            .collect();
        let mut got: Vec<(u128, Locs)> = res
            .iter()
            .map(|e| (e.hash.0, locs_of(&e.dropped)))
            .collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want, "clear_namespace result");
        assert!(res.iter().all(|e| e.page_removed()));
        self.expect.removed_pages += self.ns[ns].pages.len() as u64;
        self.ns[ns].pages.clear();
        for l in self.leases.iter_mut().filter(|l| l.ns == ns) {
            l.live = false;
            l.prefix.clear();
        }
        self.sync_events(&before, Some(id));
    }

    /// Everything the index reports must agree with the model.
    fn check(&self) {
        self.index.check_invariants();
        let s = self.index.stats();
        assert_eq!(s.namespaces, self.ns.len());
        let pages: usize = self.ns.iter().map(|m| m.pages.len()).sum();
        assert_eq!(s.pages, pages as u64, "stats().pages");
        for t in Tier::ALL {
            assert_eq!(
                s.tier_pages[t.index()],
                self.tier_pages(t),
                "stats().tier_pages[{t}]"
            );
            assert_eq!(
                self.index.tier_pages(t),
                self.tier_pages(t),
                "tier_pages({t})"
            );
        }
        let mut pinned = 0;
        for (i, m) in self.ns.iter().enumerate() {
            let n = self.pinned_set(i).len() as u64;
            assert_eq!(
                self.index.tenant_pinned_pages(&m.tenant),
                n,
                "pinned pages of {}",
                m.tenant
            );
            pinned += n;
            // The model stays prefix-closed.
            for k in m.pages.keys() {
                assert!(k.len() == m.ps || m.pages.contains_key(&k[..k.len() - m.ps]));
            }
        }
        assert_eq!(s.pinned_pages, pinned, "stats().pinned_pages");
        assert_eq!(
            s.leases,
            self.leases.iter().filter(|l| l.live).count(),
            "stats().leases"
        );
        let e = &self.expect;
        assert_eq!(s.lookups, e.lookups);
        assert_eq!(s.lookup_tokens, e.lookup_tokens);
        assert_eq!(s.hit_tokens, e.hit_tokens);
        assert_eq!(s.inserted_pages, e.inserted_pages);
        assert_eq!(s.evicted_copies, e.evicted_copies);
        assert_eq!(s.removed_pages, e.removed_pages);
        assert_eq!(s.inserted_pages - s.removed_pages, s.pages);
    }
}

fn run_case(case: &Case, cap: Option<u64>) {
    for policy in POLICY_NAMES {
        let mut h = Harness::new(policy, case, cap);
        for op in &case.ops {
            h.run(op);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random operations, every policy: the index agrees with the model.
    #[test]
    fn index_matches_model(case in case()) {
        run_case(&case, None);
    }

    /// The same, with a capacity enforced after every insert while the
    /// request is pinned: the tier never holds more than the cap except by
    /// hard-pinned pages.
    #[test]
    fn capacity_is_enforced(case in case(), cap in 2..10u64) {
        run_case(&case, Some(cap));
    }
}

/// A fixed scenario that exercises each operation at least once, so a
/// strategy that stops producing some operation cannot hide it.
#[test]
fn scripted_sequence_matches_model() {
    let p = |v: &[u32]| v.to_vec();
    let all = [1, 2, 3, 4, 1, 2, 5, 6];
    let ops = vec![
        Op::Insert {
            ns: 0,
            prompt: p(&all),
            tier: Tier::Device,
            priority: 0,
        },
        Op::Insert {
            ns: 0,
            prompt: p(&[1, 2, 3, 4, 7, 8, 1, 2]),
            tier: Tier::Host,
            priority: 1,
        },
        Op::Insert {
            ns: 1,
            prompt: p(&all),
            tier: Tier::Disk,
            priority: 0,
        },
        Op::Match {
            ns: 0,
            prompt: p(&[1, 2, 3, 4, 1, 2, 9]),
        },
        Op::Pin {
            ns: 0,
            prompt: p(&[1, 2, 3, 4, 1, 2]),
            hard: true,
            priority: 0,
            ttl_ms: 50,
        },
        Op::Pin {
            ns: 0,
            prompt: p(&[1, 2, 3, 4, 7, 8]),
            hard: false,
            priority: 2,
            ttl_ms: 20,
        },
        Op::DropLocation {
            ns: 0,
            target: Target::Prompt(p(&all), Pick(0)),
            tier: Tier::Device,
        },
        Op::AddLocation {
            ns: 0,
            target: Target::Prompt(p(&all), Pick(usize::MAX)),
            tier: Tier::Disk,
        },
        Op::Evict {
            tier: Tier::Device,
            n: 100,
        },
        Op::EvictNamespace {
            ns: 1,
            tier: Tier::Disk,
            n: 1,
        },
        Op::Clear { ns: 0 },
        Op::Advance {
            ms: 30,
            reclaim: true,
        },
        Op::Renew {
            lease: Pick(0),
            ttl_ms: 10,
        },
        Op::Release { lease: Pick(0) },
        Op::Evict {
            tier: Tier::Host,
            n: 100,
        },
        Op::DropLocation {
            ns: 0,
            target: Target::Cached(Pick(0)),
            tier: Tier::Host,
        },
        Op::Clear { ns: 0 },
        Op::Clear { ns: 1 },
    ];
    for page_sizes in [[1, 4], [2, 2], [4, 1]] {
        run_case(
            &Case {
                page_sizes,
                pin_cap: None,
                ops: ops.clone(),
            },
            None,
        );
        run_case(
            &Case {
                page_sizes,
                pin_cap: Some(3),
                ops: ops.clone(),
            },
            Some(3),
        );
    }
}
