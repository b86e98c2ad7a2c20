//! `index_ops`: the input is a program of operations on a
//! `radix_tree::RadixIndex` (two namespaces with page sizes 1–4, a small
//! token alphabet, a `ManualClock`, any eviction policy, an optional
//! per-tenant pin cap). After every operation the harness calls
//! `check_invariants()` and checks what the index promises callers:
//!
//! - an event mirror (every `Stored` / `Removed` / `Cleared` applied in
//!   order) agrees with `location()` and with the per-tier page counts, and
//!   never sees a copy stored twice or removed when absent;
//! - every page is named by its chained hash (`parent.chain(tokens)`);
//! - a live hard lease (not released, TTL not passed) keeps every copy its
//!   pages had when it was granted; `release` succeeds exactly on a lease
//!   that is live and says `LeaseGone` otherwise;
//! - no tenant holds more pinned pages than its cap;
//! - `insert` / `match_prefix` / `pin` agree with `cached_pages`;
//! - `evict(tier, n)` drops at most `n` copies from `tier`, and drops `n`
//!   unless nothing on `tier` is evictable.
//!
//! Errors from bad arguments are fine; a panic is a finding.
//!
//! Program: 3 header bytes (policy; page sizes and namespace set-up; pin
//! cap), then operations of an opcode byte and its arguments. Prompts are
//! a length byte (whose top bits can reuse a recent prompt) and two bits a
//! token.

use crate::Input;
use radix_tree::policy::{by_name, POLICY_NAMES};
use radix_tree::{
    BlockId, EventSink, IndexConfig, IndexError, IndexEvent, LeaseId, ManualClock, NamespaceConfig,
    NamespaceId, NamespaceKey, PageHash, PageLocation, PinKind, RadixIndex, Tier, TIERS,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most operations one input runs (keeps every input fast).
const MAX_OPS: usize = 256;
const MAX_PROMPT: usize = 24;

#[derive(Debug, Default)]
struct Events(Mutex<Vec<IndexEvent>>);

impl EventSink for Events {
    fn emit(&self, events: &[IndexEvent]) {
        self.0.lock().unwrap().extend_from_slice(events);
    }
}

#[derive(Debug)]
struct TrackedLease {
    id: LeaseId,
    hard: bool,
    expires_ms: u64,
    /// Hard leases: each pinned page and its copies when granted.
    pages: Vec<(PageHash, PageLocation)>,
    /// Released by us, or dropped with its namespace's pages (`clear`).
    gone: bool,
}

/// A mirror entry: copies per tier, and the parent the `Stored` named.
#[derive(Debug, Clone, Copy)]
struct Mirrored {
    tiers: [bool; TIERS],
    parent: Option<PageHash>,
}

struct Harness {
    index: RadixIndex,
    clock: Arc<ManualClock>,
    events: Arc<Events>,
    keys: [NamespaceKey; 2],
    page_sizes: [usize; 2],
    created: [bool; 2],
    pin_cap: Option<u64>,
    next_block: u32,
    prompts: Vec<Vec<u32>>,
    hashes: Vec<(NamespaceId, PageHash)>,
    leases: Vec<TrackedLease>,
    mirror: HashMap<(NamespaceId, PageHash), Mirrored>,
}

fn tier(b: u8) -> Tier {
    Tier::ALL[usize::from(b) % TIERS]
}

fn ttl(b: u8) -> Duration {
    match b {
        0 => Duration::ZERO,
        255 => Duration::MAX,
        254 => Duration::from_secs(u64::MAX / 1000),
        _ => Duration::from_millis(u64::from(b % 96)),
    }
}

fn pin_kind(b: u8) -> PinKind {
    if b & 1 == 0 {
        PinKind::Lease
    } else {
        PinKind::Session { priority: b >> 5 }
    }
}

pub fn run(data: &[u8]) {
    let mut u = Input::new(data);
    let policy_name = POLICY_NAMES[usize::from(u.byte()) % POLICY_NAMES.len()];
    let setup = u.byte();
    let page_sizes = [
        1 + usize::from(setup & 3),
        1 + usize::from((setup >> 2) & 3),
    ];
    let same_tenant = setup & 0x10 != 0;
    let create_second = setup & 0x20 != 0;
    let cap_byte = u.byte();
    let pin_cap = (cap_byte & 0x80 != 0).then_some(1 + u64::from(cap_byte & 0x0f));

    let clock = Arc::new(ManualClock::new(1_000));
    let events = Arc::new(Events::default());
    let mut builder = IndexConfig::builder()
        .policy(by_name(policy_name).expect("a listed policy"))
        .clock(clock.clone())
        .events(events.clone());
    if let Some(cap) = pin_cap {
        builder = builder.max_pinned_pages_per_tenant(cap);
    }
    let index = RadixIndex::new(builder.build().expect("valid config"));
    let keys = [
        NamespaceKey::new("tenant-0", "model", "layout", ""),
        NamespaceKey::new(
            if same_tenant { "tenant-0" } else { "tenant-1" },
            "model",
            "layout",
            "lora",
        ),
    ];
    let mut h = Harness {
        index,
        clock,
        events,
        keys,
        page_sizes,
        created: [false; 2],
        pin_cap,
        next_block: 0,
        prompts: Vec::new(),
        hashes: Vec::new(),
        leases: Vec::new(),
        mirror: HashMap::new(),
    };
    h.create(0, page_sizes[0]);
    if create_second {
        h.create(1, page_sizes[1]);
    }
    h.check();
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        h.step(&mut u);
        h.check();
    }
}

impl Harness {
    fn ns(&self, b: u8) -> (NamespaceId, usize) {
        let i = usize::from(b & 1);
        (NamespaceId(i as u32), self.page_sizes[i])
    }

    fn create(&mut self, i: usize, page_size: usize) {
        let r = self
            .index
            .create_namespace(&self.keys[i], NamespaceConfig::new(page_size).unwrap());
        match r {
            Ok(id) => {
                assert_eq!(
                    id,
                    NamespaceId(i as u32),
                    "namespaces are numbered in order"
                );
                if self.created[i] {
                    assert_eq!(page_size, self.page_sizes[i], "page size conflict accepted");
                }
                self.created[i] = true;
                self.page_sizes[i] = page_size;
            }
            Err(IndexError::NamespaceConflict {
                existing,
                requested,
            }) => {
                assert!(self.created[i]);
                assert_eq!((existing, requested), (self.page_sizes[i], page_size));
            }
            Err(e) => panic!("create_namespace: {e}"),
        }
    }

    fn prompt(&mut self, u: &mut Input<'_>) -> Vec<u32> {
        let head = u.byte();
        let fresh = |u: &mut Input<'_>, n: usize| -> Vec<u32> {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let b = u.byte();
                for k in 0..4 {
                    if out.len() < n {
                        out.push(u32::from((b >> (2 * k)) & 3));
                    }
                }
            }
            out
        };
        let n = usize::from(head & 0x1f) % (MAX_PROMPT + 1);
        let p = match (head >> 5, self.prompts.is_empty()) {
            // A recent prompt, cut to `n` tokens.
            (1 | 2, false) => {
                let pick = usize::from(u.byte()) % self.prompts.len();
                let mut p = self.prompts[pick].clone();
                p.truncate(n.max(1));
                p
            }
            // A recent prompt extended by `n % 9` fresh tokens.
            (3 | 4, false) => {
                let pick = usize::from(u.byte()) % self.prompts.len();
                let mut p = self.prompts[pick].clone();
                p.extend(fresh(u, n % 9));
                p.truncate(MAX_PROMPT);
                p
            }
            _ => fresh(u, n),
        };
        if self.prompts.len() >= 8 {
            self.prompts.remove(0);
        }
        self.prompts.push(p.clone());
        p
    }

    fn blocks(&mut self, n: usize) -> Vec<BlockId> {
        (0..n)
            .map(|_| {
                let b = BlockId(self.next_block);
                self.next_block += 1;
                b
            })
            .collect()
    }

    fn remember(&mut self, ns: NamespaceId, hash: PageHash) {
        if self.hashes.len() >= 64 {
            self.hashes.swap_remove(usize::from(hash.0 as u8) % 64);
        }
        self.hashes.push((ns, hash));
    }

    /// A page hash to aim at: a remembered one (maybe stale, maybe of the
    /// other namespace) or one that never existed.
    fn target(&mut self, u: &mut Input<'_>) -> (NamespaceId, PageHash) {
        let b = u.byte();
        let (ns, _) = self.ns(b);
        if self.hashes.is_empty() || b == 0xff {
            return (ns, PageHash(u128::from(u.u32())));
        }
        let (hns, hash) = self.hashes[usize::from(b >> 1) % self.hashes.len()];
        if b & 0x80 != 0 {
            (ns, hash)
        } else {
            (hns, hash)
        }
    }

    fn now(&self) -> u64 {
        use radix_tree::Clock;
        self.clock.now_ms()
    }

    fn page_hashes(&self, ns: NamespaceId, tokens: &[u32]) -> Option<Vec<PageHash>> {
        let hashes = self.index.page_hashes(ns, tokens).ok()?;
        // The documented algorithm.
        let i = ns.0 as usize;
        let mut parent = self.keys[i].seed();
        for (page, h) in tokens.chunks_exact(self.page_sizes[i]).zip(&hashes) {
            parent = parent.chain(page);
            assert_eq!(*h, parent, "page hash is not the documented chain");
        }
        assert_eq!(hashes.len(), tokens.len() / self.page_sizes[i]);
        Some(hashes)
    }

    fn step(&mut self, u: &mut Input<'_>) {
        let op = u.byte();
        match op % 16 {
            0 | 1 => self.insert(u),
            2 => self.lookup(u),
            3 => self.insert_after(u),
            4 => {
                let t = tier(u.byte());
                let n = usize::from(u.byte() % 8);
                let out = self.index.evict(t, n);
                self.check_evicted(t, n, &out, true);
            }
            5 => {
                let (ns, _) = self.ns(u.byte());
                let t = tier(u.byte());
                let n = usize::from(u.byte() % 8);
                if let Ok(out) = self.index.evict_namespace(ns, t, n) {
                    self.check_evicted(t, n, &out, false);
                }
            }
            6 => self.pin(u),
            7 => self.pin_page(u),
            8 => self.release(u),
            9 => self.renew(u),
            10 => {
                let b = u.byte();
                let ms = if b == 255 { 1 << 40 } else { u64::from(b % 80) };
                self.clock.advance_ms(ms);
            }
            11 => {
                let now = self.now();
                let expect = self
                    .leases
                    .iter()
                    .filter(|l| !l.gone && l.expires_ms <= now)
                    .count();
                let n = self.index.reclaim_expired();
                // Leases may have been reclaimed already by other calls;
                // never more than are due.
                assert!(n <= expect, "reclaimed {n} leases, {expect} were due");
                for l in &mut self.leases {
                    if l.expires_ms <= now {
                        l.gone = true;
                    }
                }
            }
            12 => {
                let (ns, hash) = self.target(u);
                let t = tier(u.byte());
                let block = self.blocks(1)[0];
                let before = self.index.location(ns, hash).ok().flatten();
                let r = self.index.add_location(ns, hash, t, block);
                match before {
                    None => assert!(r.is_err(), "add_location on an unknown page"),
                    Some(l) if l.has(t) => {
                        assert_eq!(r, Err(IndexError::AlreadyPresent))
                    }
                    Some(_) => assert_eq!(r, Ok(()), "add_location"),
                }
            }
            13 => {
                let (ns, hash) = self.target(u);
                let t = tier(u.byte());
                let before = self.index.location(ns, hash).ok().flatten();
                let r = self.index.drop_location(ns, hash, t);
                match (&r, before) {
                    (Ok(out), Some(l)) => {
                        assert!(l.has(t));
                        assert!(
                            out.iter().any(|e| e.hash == hash && e.dropped.has(t)),
                            "drop_location did not report the dropped copy"
                        );
                        for e in out {
                            self.remember(e.ns, e.hash);
                        }
                    }
                    (Ok(_), None) => panic!("drop_location of an unknown page succeeded"),
                    (Err(IndexError::Pinned), Some(l)) => assert!(l.has(t)),
                    (Err(IndexError::NotPresent), Some(l)) => assert!(!l.has(t)),
                    (Err(_), _) => {}
                }
            }
            14 => {
                let b = u.byte();
                if b & 0x80 != 0 {
                    let i = usize::from(b & 1);
                    let ps = 1 + usize::from((b >> 1) & 3);
                    self.create(i, ps);
                } else {
                    let (ns, _) = self.ns(b);
                    if self.index.clear_namespace(ns).is_ok() {
                        let now = self.now();
                        assert_eq!(self.index.cached_pages(ns, &[0; 8]), Ok(0));
                        for l in &mut self.leases {
                            if l.id.ns == ns {
                                assert!(
                                    l.gone || l.expires_ms <= now || !l.hard,
                                    "clear_namespace succeeded under a live hard lease"
                                );
                                l.gone = true;
                            }
                        }
                    }
                }
            }
            _ => self.write_back(u),
        }
    }

    fn insert(&mut self, u: &mut Input<'_>) {
        let flags = u.byte();
        let (ns, ps) = self.ns(flags);
        let t = tier(flags >> 1);
        let priority = (flags >> 3) & 3;
        let prompt = self.prompt(u);
        let pages = prompt.len() / ps;
        let mut blocks = self.blocks(pages);
        // 1 in 8: a wrong block count, or the reserved block id.
        let bad = if flags >> 5 == 7 {
            1 + ((flags >> 3) & 1)
        } else {
            0
        };
        match bad {
            1 => blocks.push(BlockId(0)),
            2 if !blocks.is_empty() => blocks[0] = BlockId(u32::MAX),
            _ => {}
        }
        let r = self
            .index
            .insert_with_priority(ns, &prompt, t, &blocks, priority);
        let Ok(out) = r else {
            assert!(
                bad != 0 || !self.created[ns.0 as usize],
                "insert failed: {r:?}"
            );
            return;
        };
        assert!(bad == 0 || pages == 0 && bad == 2, "a bad insert succeeded");
        assert_eq!(
            out.cached_pages + out.new_pages,
            pages,
            "insert outcome: {out:?}"
        );
        assert!(out.rejected.iter().all(|b| blocks.contains(b)));
        assert_eq!(self.index.cached_pages(ns, &prompt), Ok(pages));
        let hashes = self.page_hashes(ns, &prompt).unwrap();
        assert_eq!(out.last_page, hashes.last().copied());
        for (i, hash) in hashes.iter().enumerate() {
            let loc = self
                .index
                .location(ns, *hash)
                .unwrap()
                .expect("inserted page");
            assert!(loc.has(t));
            if !out.rejected.contains(&blocks[i]) {
                assert_eq!(loc.get(t), Some(blocks[i]), "page {i} on {t:?}");
            }
        }
        if let Some(&last) = hashes.last() {
            self.remember(ns, last);
        }
        if let Some(&first) = hashes.first() {
            self.remember(ns, first);
        }
    }

    fn lookup(&mut self, u: &mut Input<'_>) {
        let (ns, ps) = self.ns(u.byte());
        let prompt = self.prompt(u);
        let expect = self.index.cached_pages(ns, &prompt);
        let Ok(m) = self.index.match_prefix(ns, &prompt) else {
            assert!(expect.is_err());
            return;
        };
        let expect = expect.unwrap();
        assert_eq!(m.pages, expect, "match_prefix vs cached_pages");
        assert_eq!(m.page_size, ps);
        assert_eq!(m.locations.len(), m.pages);
        assert_eq!(m.fastest_pages.iter().sum::<usize>(), m.pages);
        for t in Tier::ALL {
            let n = m.locations.iter().filter(|l| l.has(t)).count();
            assert_eq!(m.tier_pages[t.index()], n);
        }
        let hashes = self.page_hashes(ns, &prompt).unwrap();
        for (loc, hash) in m.locations.iter().zip(&hashes) {
            assert!(!loc.is_empty());
            assert_eq!(self.index.location(ns, *hash), Ok(Some(*loc)));
        }
        assert_eq!(m.last_page, m.pages.checked_sub(1).map(|i| hashes[i]));
        if let Some(h) = m.last_page {
            self.remember(ns, h);
        }
        let run = self.index.longest_cached_run(ns, &hashes).unwrap();
        assert_eq!(run, m.pages, "longest_cached_run vs match_prefix");
    }

    fn insert_after(&mut self, u: &mut Input<'_>) {
        let flags = u.byte();
        let t = tier(flags >> 1);
        let (ns, parent) = if flags & 0x80 != 0 {
            (self.ns(flags).0, None)
        } else {
            let (ns, h) = self.target(u);
            (ns, Some(h))
        };
        let ps = self.page_sizes[ns.0 as usize];
        let tokens = self.prompt(u);
        let pages = tokens.len() / ps;
        let blocks = self.blocks(pages);
        let parent_known = match parent {
            None => true,
            Some(p) => matches!(self.index.location(ns, p), Ok(Some(_))),
        };
        let r = self.index.insert_after(ns, parent, &tokens, t, &blocks);
        let out = match r {
            Ok(out) => out,
            Err(e) => {
                assert!(
                    !parent_known || !self.created[ns.0 as usize],
                    "insert_after on a cached parent failed: {e}"
                );
                return;
            }
        };
        assert!(parent_known, "insert_after on an unknown parent succeeded");
        assert_eq!(out.cached_pages + out.new_pages, pages);
        // Walk the new pages: each chains from the one before.
        let mut prev = parent;
        for (i, page) in tokens.chunks_exact(ps).enumerate() {
            let hash = prev.unwrap_or(self.keys[ns.0 as usize].seed()).chain(page);
            let (p, toks) = self
                .index
                .page_tokens(ns, hash)
                .unwrap()
                .expect("a page insert_after stored");
            assert_eq!((p, &toks[..]), (prev, page), "page {i}");
            assert!(self.index.location(ns, hash).unwrap().unwrap().has(t));
            prev = Some(hash);
        }
        assert_eq!(out.last_page, if pages > 0 { prev } else { out.last_page });
        if let Some(h) = out.last_page {
            self.remember(ns, h);
        }
    }

    fn pin(&mut self, u: &mut Input<'_>) {
        let flags = u.byte();
        let (ns, _) = self.ns(flags);
        let kind = pin_kind(flags >> 1);
        let ttl = ttl(u.byte());
        let prompt = self.prompt(u);
        let cached = self.index.cached_pages(ns, &prompt);
        let r = self.index.pin(ns, &prompt, kind, ttl);
        let lease = match r {
            Ok(l) => l,
            Err(IndexError::NotCached) => {
                assert_eq!(cached, Ok(0));
                return;
            }
            Err(IndexError::PinCapExceeded { .. }) => {
                assert!(self.pin_cap.is_some(), "pin cap error without a cap");
                return;
            }
            Err(IndexError::ZeroTtl) => {
                assert!(ttl.is_zero());
                return;
            }
            Err(e) => {
                assert!(!self.created[ns.0 as usize], "pin: {e}");
                return;
            }
        };
        assert_eq!(Ok(lease.pages), cached, "a lease pins the cached prefix");
        assert!(lease.pages > 0);
        let hashes = self.page_hashes(ns, &prompt).unwrap();
        self.track(lease, kind, &hashes[..lease.pages]);
    }

    fn pin_page(&mut self, u: &mut Input<'_>) {
        let kind = pin_kind(u.byte());
        let ttl = ttl(u.byte());
        let (ns, hash) = self.target(u);
        // The path to the page, root first, from its parents.
        let mut path = Vec::new();
        let mut at = Some(hash);
        while let Some(h) = at {
            match self.index.page_tokens(ns, h) {
                Ok(Some((parent, toks))) => {
                    assert_eq!(toks.len(), self.page_sizes[ns.0 as usize]);
                    path.push(h);
                    at = parent;
                }
                _ => break,
            }
            assert!(path.len() <= 1 + MAX_PROMPT * MAX_OPS, "parent chain loops");
        }
        path.reverse();
        match self.index.pin_page(ns, hash, kind, ttl) {
            Ok(lease) => {
                assert_eq!(
                    lease.pages,
                    path.len(),
                    "pin_page pins the path to the page"
                );
                self.track(lease, kind, &path);
            }
            Err(IndexError::UnknownPage(_)) => assert!(path.is_empty()),
            Err(IndexError::PinCapExceeded { .. }) => assert!(self.pin_cap.is_some()),
            Err(IndexError::ZeroTtl) => assert!(ttl.is_zero()),
            Err(e) => assert!(!self.created[ns.0 as usize], "pin_page: {e}"),
        }
    }

    fn track(&mut self, lease: radix_tree::Lease, kind: PinKind, hashes: &[PageHash]) {
        let hard = kind == PinKind::Lease;
        let pages = if hard {
            hashes
                .iter()
                .map(|h| {
                    let loc = self.index.location(lease.id.ns, *h).unwrap();
                    (*h, loc.expect("a pinned page is cached"))
                })
                .collect()
        } else {
            Vec::new()
        };
        assert!(lease.expires_ms > self.now());
        self.leases.push(TrackedLease {
            id: lease.id,
            hard,
            expires_ms: lease.expires_ms,
            pages,
            gone: false,
        });
    }

    /// A tracked lease, or a made-up id that was never issued.
    fn pick_lease(&mut self, u: &mut Input<'_>) -> (LeaseId, Option<usize>) {
        let b = u.byte();
        if self.leases.is_empty() || b == 0xff {
            let (ns, _) = self.ns(u.byte());
            let seq = match u.byte() % 3 {
                0 => 0,
                1 => u64::MAX,
                _ => (1 << 40) + u64::from(u.byte()),
            };
            return (LeaseId { ns, seq }, None);
        }
        let i = usize::from(b) % self.leases.len();
        (self.leases[i].id, Some(i))
    }

    fn release(&mut self, u: &mut Input<'_>) {
        let (id, tracked) = self.pick_lease(u);
        let r = self.index.release(id);
        let Some(i) = tracked else {
            return;
        };
        let now = self.now();
        let l = &mut self.leases[i];
        let live = !l.gone && l.expires_ms > now;
        if live {
            assert_eq!(r, Ok(()), "release of a live lease");
        } else {
            assert_eq!(r, Err(IndexError::LeaseGone(id)), "release of a gone lease");
        }
        l.gone = true;
    }

    fn renew(&mut self, u: &mut Input<'_>) {
        let (id, tracked) = self.pick_lease(u);
        let ttl = ttl(u.byte());
        let r = self.index.renew(id, ttl);
        let Some(i) = tracked else {
            return;
        };
        let now = self.now();
        let l = &mut self.leases[i];
        let live = !l.gone && l.expires_ms > now;
        match r {
            Ok(expires) => {
                assert!(live, "renew of a gone lease succeeded");
                assert!(!ttl.is_zero());
                assert!(expires > now);
                l.expires_ms = expires;
            }
            Err(IndexError::ZeroTtl) => assert!(ttl.is_zero()),
            Err(e) => {
                assert!(!live, "renew of a live lease: {e}");
                assert_eq!(e, IndexError::LeaseGone(id));
                l.gone = true;
            }
        }
    }

    /// Two-phase write-back, as the facade does it: copy each candidate
    /// down a tier, record the copy, drop the original.
    fn write_back(&mut self, u: &mut Input<'_>) {
        let t = tier(u.byte());
        let max = usize::from(u.byte() % 6);
        let cands = self.index.eviction_candidates(t, max);
        assert!(cands.len() <= max);
        for c in &cands {
            assert!(c.location.has(t));
            assert_eq!(self.index.location(c.ns, c.hash), Ok(Some(c.location)));
        }
        for c in cands {
            let Ok(Some(loc)) = self.index.location(c.ns, c.hash) else {
                continue; // an earlier drop took it
            };
            if let Some(below) = t.below() {
                if !loc.has(below) {
                    let block = self.blocks(1)[0];
                    assert_eq!(self.index.add_location(c.ns, c.hash, below, block), Ok(()));
                }
            }
            if loc.has(t) {
                let r = self.index.drop_location(c.ns, c.hash, t);
                assert!(r.is_ok(), "dropping a candidate: {r:?}");
            }
        }
    }

    fn check_evicted(&mut self, t: Tier, n: usize, out: &[radix_tree::EvictedPage], global: bool) {
        let copies = out.iter().filter(|e| e.dropped.has(t)).count();
        assert!(copies <= n, "evict({t:?}, {n}) dropped {copies} copies");
        if global && copies < n {
            assert!(
                self.index.eviction_candidates(t, 1).is_empty(),
                "evict({t:?}, {n}) stopped after {copies} copies with candidates left"
            );
        }
        let mut seen = std::collections::HashSet::new();
        for e in out.iter().rev() {
            assert!(!e.dropped.is_empty());
            if seen.insert((e.ns, e.hash)) {
                let now = self.index.location(e.ns, e.hash).unwrap();
                let expect = (!e.page_removed()).then_some(e.remaining);
                assert_eq!(now, expect, "evicted page {:?}", e.hash);
            }
        }
        for e in out {
            self.remember(e.ns, e.hash);
        }
    }

    /// Everything checked after every operation.
    fn check(&mut self) {
        self.index.check_invariants();

        // Apply the events to the mirror.
        let events = std::mem::take(&mut *self.events.0.lock().unwrap());
        for ev in events {
            match ev {
                IndexEvent::Stored {
                    ns,
                    hash,
                    parent,
                    tier,
                } => {
                    let m = self.mirror.entry((ns, hash)).or_insert(Mirrored {
                        tiers: [false; TIERS],
                        parent,
                    });
                    assert!(!m.tiers[tier.index()], "Stored twice: {ev:?}");
                    assert_eq!(m.parent, parent, "Stored names another parent: {ev:?}");
                    m.tiers[tier.index()] = true;
                }
                IndexEvent::Removed { ns, hash, tier } => {
                    let m = self
                        .mirror
                        .get_mut(&(ns, hash))
                        .unwrap_or_else(|| panic!("Removed a page never stored: {ev:?}"));
                    assert!(m.tiers[tier.index()], "Removed an absent copy: {ev:?}");
                    m.tiers[tier.index()] = false;
                    if !m.tiers.iter().any(|x| *x) {
                        self.mirror.remove(&(ns, hash));
                    }
                }
                IndexEvent::Cleared { ns } => self.mirror.retain(|(n, _), _| *n != ns),
            }
        }

        // The mirror is the index.
        let stats = self.index.stats();
        assert_eq!(stats.pages, self.mirror.len() as u64, "pages vs events");
        for t in Tier::ALL {
            let n = self.mirror.values().filter(|m| m.tiers[t.index()]).count() as u64;
            assert_eq!(stats.tier_pages[t.index()], n, "{t:?} pages vs events");
            assert_eq!(self.index.tier_pages(t), n);
        }
        for (&(ns, hash), m) in &self.mirror {
            let loc = self.index.location(ns, hash).unwrap();
            let loc = loc.unwrap_or_else(|| panic!("page {hash:?} stored, not removed, not found"));
            for t in Tier::ALL {
                assert_eq!(
                    loc.has(t),
                    m.tiers[t.index()],
                    "{hash:?} on {t:?} vs events"
                );
            }
            let (parent, toks) = self.index.page_tokens(ns, hash).unwrap().unwrap();
            assert_eq!(parent, m.parent);
            let seed = self.keys[ns.0 as usize].seed();
            assert_eq!(parent.unwrap_or(seed).chain(&toks), hash, "page name");
            if let Some(p) = parent {
                assert!(
                    self.mirror.contains_key(&(ns, p)),
                    "parent of a cached page is gone"
                );
            }
        }

        // Live hard leases keep their copies.
        let now = self.now();
        for l in &self.leases {
            if l.gone || !l.hard || l.expires_ms <= now {
                continue;
            }
            for (hash, was) in &l.pages {
                let loc = self
                    .index
                    .location(l.id.ns, *hash)
                    .unwrap()
                    .unwrap_or_else(|| panic!("hard-leased page {hash:?} left the index"));
                for (t, b) in was.copies() {
                    assert_eq!(loc.get(t), Some(b), "hard-leased copy on {t:?} of {hash:?}");
                }
            }
        }

        // Pin caps.
        if let Some(cap) = self.pin_cap {
            for key in &self.keys {
                let pinned = self.index.tenant_pinned_pages(&key.tenant);
                assert!(
                    pinned <= cap,
                    "tenant {} pins {pinned} > cap {cap}",
                    key.tenant
                );
            }
        }
    }
}

// ---- seeds -------------------------------------------------------------------

/// Builds programs byte by byte (for the seed corpus).
#[derive(Default)]
struct Program(Vec<u8>);

impl Program {
    fn new(policy: u8, setup: u8, cap: u8) -> Self {
        Self(vec![policy, setup, cap])
    }
    fn op(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// A fresh prompt of `tokens` (each 0..4).
    fn fresh(mut self, tokens: &[u8]) -> Self {
        self.0.push(tokens.len() as u8);
        for chunk in tokens.chunks(4) {
            let mut b = 0u8;
            for (k, t) in chunk.iter().enumerate() {
                b |= (t & 3) << (2 * k);
            }
            self.0.push(b);
        }
        self
    }
    /// A recent prompt (pick) cut to `n` tokens.
    fn recent(mut self, pick: u8, n: u8) -> Self {
        self.0.extend_from_slice(&[0x20 | (n & 0x1f), pick]);
        self
    }
    /// A recent prompt (pick) extended by fresh tokens.
    fn extend(mut self, pick: u8, tokens: &[u8]) -> Self {
        self.0.extend_from_slice(&[0x60 | tokens.len() as u8, pick]);
        for chunk in tokens.chunks(4) {
            let mut b = 0u8;
            for (k, t) in chunk.iter().enumerate() {
                b |= (t & 3) << (2 * k);
            }
            self.0.push(b);
        }
        self
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    const SYS: &[u8] = &[1, 2, 3, 0, 1, 2, 3, 0];
    let mut out = Vec::new();
    for policy in 0..POLICY_NAMES.len() as u8 {
        // Two namespaces (page sizes 2 and 4), a shared system prompt,
        // turns that extend it, lookups, pins, eviction and write-back.
        let p = Program::new(policy, 0x21 | 0x0c, 0)
            .op(&[0, 0x02])
            .fresh(SYS) // insert ns0 host
            .op(&[0, 0x02])
            .extend(0, &[2, 2, 1, 1]) // turn 2
            .op(&[1, 0x01])
            .fresh(&[3, 3, 3, 3, 2, 2, 2, 2]) // ns1 device
            .op(&[2, 0])
            .recent(1, 10) // lookup
            .op(&[6, 0, 20])
            .recent(1, 12) // hard pin
            .op(&[6, 0x02, 40])
            .recent(0, 8) // soft pin
            .op(&[4, 1, 3]) // evict host 3
            .op(&[15, 1, 2]) // write-back host -> disk
            .op(&[10, 30]) // clock +30ms
            .op(&[11]) // reclaim
            .op(&[4, 1, 7])
            .op(&[8, 0]) // release
            .op(&[3, 0x80])
            .fresh(&[0, 0, 1, 1]) // insert_after(None)
            .op(&[3, 0x02, 0x01])
            .fresh(&[2, 2, 2, 2]) // insert_after(hash)
            .op(&[12, 0x01, 2]) // add_location disk
            .op(&[13, 0x01, 1]) // drop_location host
            .op(&[7, 0, 50, 0x02]) // pin_page
            .op(&[9, 0, 60]) // renew
            .op(&[5, 1, 0, 4]) // evict_namespace
            .op(&[14, 0]) // clear ns0
            .op(&[14, 0x83]); // create ns1 with page size 2 (a conflict)
        out.push(p.0);
    }
    // Page size 1, one namespace, a pin cap of 3.
    out.push(
        Program::new(0, 0x00, 0x82)
            .op(&[0, 0])
            .fresh(&[1, 2, 3])
            .op(&[0, 0])
            .extend(0, &[1])
            .op(&[6, 0, 90])
            .recent(1, 4)
            .op(&[6, 0, 90])
            .recent(0, 2)
            .op(&[4, 0, 7])
            .op(&[10, 200])
            .op(&[4, 0, 7])
            .0,
    );
    // Single namespace, page size 3, inserts on every tier, bad inputs.
    out.push(
        Program::new(3, 0x02, 0)
            .op(&[0, 0x00])
            .fresh(&[1, 1, 1, 2, 2, 2, 3])
            .op(&[0, 0x02])
            .recent(0, 6)
            .op(&[0, 0x04])
            .recent(0, 3)
            .op(&[0, 0xe0])
            .fresh(&[1, 1, 1]) // one block too many
            .op(&[0, 0xe8])
            .fresh(&[1, 1, 1]) // the reserved block id
            .op(&[4, 2, 5])
            .op(&[4, 0, 5])
            .0,
    );
    out
}
