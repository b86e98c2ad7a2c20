//! Concurrent stress: several threads share one index and mix lookups,
//! inserts, capacity evictions, hard and soft leases and location changes.
//! While a thread holds a hard lease, no other thread may see its pages
//! evicted or dropped; at the end every count adds up, every block handed
//! to the index comes back exactly once, and no lease is leaked.

use radix_tree::{
    BlockId, EventSink, EvictedPage, IndexConfig, IndexError, IndexEvent, LeaseId, ManualClock,
    NamespaceConfig, NamespaceId, NamespaceKey, PageHash, PinKind, RadixIndex, Tier, TIERS,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const THREADS: usize = 6;
const ITERS: usize = 3_000;
/// Pages a tier may hold before an insert evicts it back down.
const CAP: u64 = 96;
const HOUR: Duration = Duration::from_secs(3600);

/// Counts events per tier, so the totals can be checked against the index.
#[derive(Debug, Default)]
struct CountingSink {
    stored: [AtomicU64; TIERS],
    removed: [AtomicU64; TIERS],
    cleared: AtomicU64,
    bad_parent: AtomicU64,
}

impl EventSink for CountingSink {
    fn emit(&self, events: &[IndexEvent]) {
        for e in events {
            match *e {
                IndexEvent::Stored {
                    hash, parent, tier, ..
                } => {
                    if parent == Some(hash) {
                        self.bad_parent.fetch_add(1, Ordering::Relaxed);
                    }
                    self.stored[tier.index()].fetch_add(1, Ordering::Relaxed);
                }
                IndexEvent::Removed { tier, .. } => {
                    self.removed[tier.index()].fetch_add(1, Ordering::Relaxed);
                }
                IndexEvent::Cleared { .. } => {
                    self.cleared.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The hard leases holding one page, each with when it was recorded.
type Holders = Vec<(LeaseId, u64)>;

/// Pages under a hard lease: (namespace, page hash) -> (lease, when recorded).
/// A lease's pages are recorded after `pin` returns and removed before
/// `release` is called, so an entry recorded before an eviction started
/// was held for the whole eviction.
#[derive(Default)]
struct Leased {
    map: Mutex<HashMap<(u32, u128), Holders>>,
    clock: AtomicU64,
}

impl Leased {
    fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    fn add(&self, ns: NamespaceId, lease: LeaseId, hashes: &[PageHash]) {
        let mut map = self.map.lock().unwrap();
        let at = self.now();
        for h in hashes {
            map.entry((ns.0, h.0)).or_default().push((lease, at));
        }
    }

    fn remove(&self, ns: NamespaceId, lease: LeaseId, hashes: &[PageHash]) {
        let mut map = self.map.lock().unwrap();
        for h in hashes {
            let v = map.get_mut(&(ns.0, h.0)).expect("recorded");
            v.retain(|(l, _)| *l != lease);
            if v.is_empty() {
                map.remove(&(ns.0, h.0));
            }
        }
    }

    /// No page in `dropped` may be under a hard lease recorded before `started`.
    fn check(&self, started: u64, dropped: &[EvictedPage], what: &str) {
        let map = self.map.lock().unwrap();
        for e in dropped {
            if let Some(holders) = map.get(&(e.ns.0, e.hash.0)) {
                assert!(
                    holders.iter().all(|&(_, at)| at > started),
                    "{what} dropped page {:?} of {:?} while hard lease(s) {holders:?} held it",
                    e.hash,
                    e.ns
                );
            }
        }
    }
}

struct Shared {
    index: RadixIndex,
    clock: Arc<ManualClock>,
    sink: Arc<CountingSink>,
    namespaces: Vec<(NamespaceId, usize)>,
    next_block: AtomicU32,
    leased: Leased,
}

/// What one thread did, for the final accounting.
#[derive(Default)]
struct Tally {
    /// Copies the index took: (tier, block).
    given: Vec<(usize, u32)>,
    /// Copies it handed back: rejected at insert, dropped, evicted.
    returned: Vec<(usize, u32)>,
    /// Of `returned`, the blocks an insert rejected (never stored).
    rejected: u64,
    lookups: u64,
    evicted_on_tier: [u64; TIERS],
}

struct HardLease {
    ns: NamespaceId,
    id: LeaseId,
    prompt: Vec<u32>,
    hashes: Vec<PageHash>,
    /// Copies the pages had when pinned: they must stay while it is held.
    copies: Vec<(PageHash, Tier, BlockId)>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const CHUNKS: [[u32; 4]; 6] = [
    [1, 2, 3, 4],
    [1, 2, 5, 6],
    [7, 8, 9, 10],
    [7, 8, 1, 2],
    [11, 12, 13, 14],
    [3, 4, 1, 2],
];

fn prompt(rng: &mut Rng) -> Vec<u32> {
    let segments = 1 + rng.below(8);
    let mut p = Vec::new();
    for _ in 0..segments {
        if rng.below(6) == 0 {
            p.push(rng.below(4) as u32);
        } else {
            p.extend_from_slice(&CHUNKS[rng.below(CHUNKS.len() as u64) as usize]);
        }
    }
    p
}

fn tier(rng: &mut Rng) -> Tier {
    Tier::ALL[rng.below(TIERS as u64) as usize]
}

impl Shared {
    fn blocks(&self, n: usize) -> Vec<BlockId> {
        (0..n)
            .map(|_| BlockId(self.next_block.fetch_add(1, Ordering::Relaxed)))
            .collect()
    }

    fn note_dropped(&self, tally: &mut Tally, dropped: &[EvictedPage]) {
        for e in dropped {
            assert!(!e.dropped.is_empty());
            for t in Tier::ALL {
                assert!(
                    !(e.dropped.has(t) && e.remaining.has(t)),
                    "a copy both dropped and remaining"
                );
            }
            for (t, b) in e.dropped.copies() {
                tally.returned.push((t.index(), b.0));
            }
        }
    }

    fn evict(&self, tally: &mut Tally, tier: Tier, n: usize) {
        let started = self.leased.now();
        let res = self.index.evict(tier, n);
        self.leased.check(started, &res, "evict");
        let on_tier = res.iter().filter(|e| e.dropped.has(tier)).count();
        assert!(
            on_tier <= n,
            "evicted {on_tier} copies from {tier}, asked for {n}"
        );
        tally.evicted_on_tier[tier.index()] += on_tier as u64;
        self.note_dropped(tally, &res);
    }

    fn pin_hard(&self, ns: NamespaceId, prompt: &[u32]) -> Option<HardLease> {
        let lease = match self.index.pin(ns, prompt, PinKind::Lease, HOUR) {
            Ok(l) => l,
            Err(IndexError::NotCached) => return None,
            Err(e) => panic!("pin: {e}"),
        };
        let hashes = self.index.page_hashes(ns, prompt).unwrap()[..lease.pages].to_vec();
        self.leased.add(ns, lease.id, &hashes);
        let mut copies = Vec::new();
        for h in &hashes {
            let loc = self
                .index
                .location(ns, *h)
                .unwrap()
                .expect("a hard-leased page is cached");
            copies.extend(loc.copies().map(|(t, b)| (*h, t, b)));
        }
        Some(HardLease {
            ns,
            id: lease.id,
            prompt: prompt.to_vec(),
            hashes,
            copies,
        })
    }

    fn check_held(&self, l: &HardLease) {
        assert!(
            self.index.cached_pages(l.ns, &l.prompt).unwrap() >= l.hashes.len(),
            "a hard-leased prefix is no longer cached"
        );
        for &(h, t, b) in &l.copies {
            let loc = self
                .index
                .location(l.ns, h)
                .unwrap()
                .expect("leased page cached");
            assert_eq!(loc.get(t), Some(b), "a hard-leased copy changed");
        }
    }

    fn release_hard(&self, l: HardLease) {
        self.check_held(&l);
        self.leased.remove(l.ns, l.id, &l.hashes);
        self.index
            .release(l.id)
            .expect("a held hard lease releases");
    }
}

fn worker(shared: &Shared, seed: u64) -> Tally {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut tally = Tally::default();
    let mut held: Vec<HardLease> = Vec::new();
    let mut soft: Vec<LeaseId> = Vec::new();
    let index = &shared.index;
    for _ in 0..ITERS {
        let (ns, ps) = shared.namespaces[rng.below(shared.namespaces.len() as u64) as usize];
        let p = prompt(&mut rng);
        let pages = p.len() / ps;
        match rng.below(100) {
            0..=24 => {
                let m = index.match_prefix(ns, &p).unwrap();
                tally.lookups += 1;
                assert!(m.pages <= pages);
                assert_eq!(m.locations.len(), m.pages);
                assert!(
                    m.locations.iter().all(|l| !l.is_empty()),
                    "a matched page without a copy"
                );
                for t in Tier::ALL {
                    let n = m.locations.iter().filter(|l| l.has(t)).count();
                    assert_eq!(m.tier_pages[t.index()], n);
                }
                if m.pages > 0 {
                    let hashes = index.page_hashes(ns, &p).unwrap();
                    assert_eq!(m.last_page, Some(hashes[m.pages - 1]));
                }
            }
            25..=49 => {
                let t = tier(&mut rng);
                let blocks = shared.blocks(pages);
                let out = index.insert(ns, &p, t, &blocks).unwrap();
                assert!(out.cached_pages + out.new_pages == pages);
                for b in &blocks {
                    tally.given.push((t.index(), b.0));
                }
                for b in &out.rejected {
                    tally.returned.push((t.index(), b.0));
                    tally.rejected += 1;
                }
                // Keep the tier within its capacity, the request pinned.
                let held_pages = index.tier_pages(t);
                if held_pages > CAP {
                    let request = shared.pin_hard(ns, &p);
                    shared.evict(&mut tally, t, (held_pages - CAP) as usize);
                    if let Some(l) = request {
                        shared.release_hard(l);
                    }
                }
            }
            50..=59 => {
                let t = tier(&mut rng);
                shared.evict(&mut tally, t, 1 + rng.below(8) as usize);
            }
            60..=67 => {
                if held.len() < 4 {
                    if let Some(l) = shared.pin_hard(ns, &p) {
                        held.push(l);
                    }
                }
            }
            68..=74 => {
                if !held.is_empty() {
                    let i = rng.below(held.len() as u64) as usize;
                    let l = held.swap_remove(i);
                    shared.release_hard(l);
                }
            }
            75..=81 => {
                let priority = rng.below(4) as u8;
                match index.pin(
                    ns,
                    &p,
                    PinKind::Session { priority },
                    Duration::from_millis(20),
                ) {
                    Ok(l) => soft.push(l.id),
                    Err(IndexError::NotCached) => {}
                    Err(e) => panic!("soft pin: {e}"),
                }
                if soft.len() > 8 {
                    let id = soft.remove(0);
                    match index.release(id) {
                        Ok(()) | Err(IndexError::LeaseGone(_)) => {}
                        Err(e) => panic!("soft release: {e}"),
                    }
                }
            }
            82..=88 => {
                if pages == 0 {
                    continue;
                }
                let h = index.page_hashes(ns, &p).unwrap()[rng.below(pages as u64) as usize];
                let t = tier(&mut rng);
                let b = shared.blocks(1)[0];
                match index.add_location(ns, h, t, b) {
                    Ok(()) => tally.given.push((t.index(), b.0)),
                    Err(IndexError::AlreadyPresent | IndexError::UnknownPage(_)) => {}
                    Err(e) => panic!("add_location: {e}"),
                }
            }
            89..=95 => {
                // Drop a copy: either one of a page we hold (must be refused)
                // or of any page.
                let t = tier(&mut rng);
                if let (Some(l), true) = (held.first(), rng.below(3) == 0) {
                    if let Some(&(h, t, _)) = l.copies.first() {
                        assert_eq!(
                            index.drop_location(l.ns, h, t),
                            Err(IndexError::Pinned),
                            "dropped a copy under our own hard lease"
                        );
                    }
                    continue;
                }
                if pages == 0 {
                    continue;
                }
                let h = index.page_hashes(ns, &p).unwrap()[rng.below(pages as u64) as usize];
                let started = shared.leased.now();
                match index.drop_location(ns, h, t) {
                    Ok(dropped) => {
                        shared.leased.check(started, &dropped, "drop_location");
                        assert!(dropped.iter().any(|e| e.hash == h && e.dropped.has(t)));
                        shared.note_dropped(&mut tally, &dropped);
                    }
                    Err(
                        IndexError::Pinned | IndexError::NotPresent | IndexError::UnknownPage(_),
                    ) => {}
                    Err(e) => panic!("drop_location: {e}"),
                }
            }
            _ => {
                shared.clock.advance_ms(1 + rng.below(5));
                if rng.below(2) == 0 {
                    index.reclaim_expired();
                }
            }
        }
        for l in &held {
            shared.check_held(l);
        }
    }
    for l in held {
        shared.release_hard(l);
    }
    for id in soft {
        match index.release(id) {
            Ok(()) | Err(IndexError::LeaseGone(_)) => {}
            Err(e) => panic!("soft release: {e}"),
        }
    }
    tally
}

#[test]
fn concurrent_mixed_operations() {
    for policy in radix_tree::policy::POLICY_NAMES {
        stress(policy);
    }
}

fn stress(policy: &str) {
    let clock = Arc::new(ManualClock::new(0));
    let sink = Arc::new(CountingSink::default());
    let index = RadixIndex::new(
        IndexConfig::builder()
            .clock(clock.clone())
            .events(sink.clone())
            .policy(radix_tree::policy::by_name(policy).unwrap())
            .build()
            .unwrap(),
    );
    let namespaces = [("a", 1usize), ("b", 4), ("c", 2)]
        .iter()
        .map(|&(tenant, ps)| {
            let id = index
                .create_namespace(
                    &NamespaceKey::new(tenant, "m", "l", ""),
                    NamespaceConfig::new(ps).unwrap(),
                )
                .unwrap();
            (id, ps)
        })
        .collect();
    let shared = Arc::new(Shared {
        index,
        clock,
        sink,
        namespaces,
        next_block: AtomicU32::new(0),
        leased: Leased::default(),
    });
    let handles: Vec<_> = (0..THREADS as u64)
        .map(|seed| {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || worker(&shared, seed + 1))
        })
        .collect();
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().expect("worker"))
        .collect();

    let index = &shared.index;
    index.check_invariants();
    assert!(shared.leased.map.lock().unwrap().is_empty());
    // Every soft lease ends with its TTL; no lease is left.
    shared.clock.advance_ms(HOUR.as_millis() as u64 + 1);
    index.reclaim_expired();
    let s = index.stats();
    assert_eq!(s.leases, 0, "leases leaked");
    assert_eq!(s.pinned_pages, 0);
    for tenant in ["a", "b", "c"] {
        assert_eq!(
            index.tenant_pinned_pages(tenant),
            0,
            "pins leaked for {tenant}"
        );
    }
    index.check_invariants();

    // Counts add up.
    let sink = &shared.sink;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    assert_eq!(s.pages, s.inserted_pages - s.removed_pages);
    assert_eq!(s.lookups, tallies.iter().map(|t| t.lookups).sum::<u64>());
    for t in 0..TIERS {
        assert_eq!(
            s.tier_pages[t],
            load(&sink.stored[t]) - load(&sink.removed[t]),
            "stored - removed events vs tier {t} pages"
        );
        assert_eq!(
            s.evicted_copies[t],
            tallies.iter().map(|x| x.evicted_on_tier[t]).sum::<u64>()
        );
    }
    assert_eq!(load(&sink.bad_parent), 0);
    let given: u64 = tallies.iter().map(|t| t.given.len() as u64).sum();
    let rejected: u64 = tallies.iter().map(|t| t.rejected).sum();
    let stored: u64 = sink.stored.iter().map(load).sum();
    assert_eq!(
        stored,
        given - rejected,
        "one Stored event per copy the index took"
    );
    assert!(
        s.pages > 0 && s.removed_pages > 0,
        "the run should both fill and evict"
    );
    assert!(rejected > 0 && s.evicted_copies.iter().sum::<u64>() > 0);

    // Clear everything: every block handed in comes back exactly once.
    let mut returned: Vec<(usize, u32)> = tallies
        .iter()
        .flat_map(|t| t.returned.iter().copied())
        .collect();
    for &(ns, _) in &shared.namespaces {
        for e in index.clear_namespace(ns).unwrap() {
            assert!(e.page_removed());
            returned.extend(e.dropped.copies().map(|(t, b)| (t.index(), b.0)));
        }
    }
    let mut given: Vec<(usize, u32)> = tallies
        .iter()
        .flat_map(|t| t.given.iter().copied())
        .collect();
    given.sort_unstable();
    returned.sort_unstable();
    assert_eq!(returned.len(), given.len(), "blocks lost or returned twice");
    assert_eq!(returned, given, "blocks returned differ from blocks given");
    let s = index.stats();
    assert_eq!((s.pages, s.tier_pages, s.nodes), (0, [0; TIERS], 0));
    assert_eq!(load(&sink.cleared), shared.namespaces.len() as u64);
    let removed: u64 = sink.removed.iter().map(load).sum();
    assert_eq!(stored, removed, "every stored copy was removed once");
    index.check_invariants();
}
