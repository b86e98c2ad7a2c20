//! Soft pins (agent sessions) versus eviction order, and the event stream.

use radix_tree::policy::{by_name, POLICY_NAMES};
use radix_tree::{
    BlockId, EventSink, EvictedPage, IndexConfig, IndexEvent, ManualClock, NamespaceConfig,
    NamespaceId, NamespaceKey, PageHash, PinKind, RadixIndex, Tier,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---- soft pins -------------------------------------------------------------------

const PROMPTS: u32 = 8;
const TTL: Duration = Duration::from_millis(1_000);

/// Soft-pinned prompts and their priorities. They are the coldest prompts
/// (oldest, fewest hits), so every policy would evict them first unpinned.
const SOFT: [(u32, u8); 3] = [(0, 0), (1, 2), (2, 1)];

struct Scene {
    index: RadixIndex,
    clock: Arc<ManualClock>,
    /// Page hash -> the prompt it belongs to.
    owner: HashMap<(NamespaceId, PageHash), u32>,
}

fn prompt(i: u32) -> Vec<u32> {
    vec![100 + i, 200 + i]
}

/// Eight two-page prompts over two namespaces, on device and host, hit
/// more the later they come; the `SOFT` ones soft-pinned if `pin`.
fn scene(policy: &str, pin: bool) -> Scene {
    let clock = Arc::new(ManualClock::new(0));
    let index = RadixIndex::new(
        IndexConfig::builder()
            .policy(by_name(policy).unwrap())
            .clock(clock.clone())
            .build()
            .unwrap(),
    );
    let ns: Vec<NamespaceId> = ["a", "b"]
        .iter()
        .map(|t| {
            index
                .create_namespace(
                    &NamespaceKey::new(*t, "m", "l", ""),
                    NamespaceConfig::new(1).unwrap(),
                )
                .unwrap()
        })
        .collect();
    let mut owner = HashMap::new();
    for i in 0..PROMPTS {
        let n = ns[i as usize % 2];
        index
            .insert(
                n,
                &prompt(i),
                Tier::Device,
                &[BlockId(10 * i), BlockId(10 * i + 1)],
            )
            .unwrap();
        index
            .insert(
                n,
                &prompt(i),
                Tier::Host,
                &[BlockId(10 * i + 2), BlockId(10 * i + 3)],
            )
            .unwrap();
        for h in index.page_hashes(n, &prompt(i)).unwrap() {
            owner.insert((n, h), i);
        }
    }
    for i in 0..PROMPTS {
        for _ in 0..i {
            assert_eq!(
                index
                    .match_prefix(ns[i as usize % 2], &prompt(i))
                    .unwrap()
                    .pages,
                2
            );
        }
    }
    if pin {
        for (i, priority) in SOFT {
            let lease = index
                .pin(
                    ns[i as usize % 2],
                    &prompt(i),
                    PinKind::Session { priority },
                    TTL,
                )
                .unwrap();
            assert_eq!(lease.pages, 2);
        }
    }
    Scene {
        index,
        clock,
        owner,
    }
}

/// Evicts `tier` one copy at a time until nothing evictable is left there;
/// returns the prompt of each evicted copy, in order.
fn drain(scene: &Scene, tier: Tier) -> Vec<u32> {
    let mut order = Vec::new();
    loop {
        let out = scene.index.evict(tier, 1);
        if out.is_empty() {
            break;
        }
        for e in &out {
            assert!(
                e.dropped.has(tier),
                "evicting {tier} dropped a copy elsewhere"
            );
            order.push(scene.owner[&(e.ns, e.hash)]);
        }
        scene.index.check_invariants();
    }
    order
}

fn is_soft(i: u32) -> bool {
    SOFT.iter().any(|&(p, _)| p == i)
}

#[test]
fn soft_pinned_pages_go_after_every_unpinned_page() {
    for policy in POLICY_NAMES {
        let scene = scene(policy, true);
        for tier in [Tier::Device, Tier::Host] {
            let order = drain(&scene, tier);
            assert_eq!(
                order.len(),
                2 * PROMPTS as usize,
                "{policy}: every copy on {tier} evicted"
            );
            assert_eq!(scene.index.tier_pages(tier), 0);
            let unpinned = order.iter().filter(|i| !is_soft(**i)).count();
            assert!(
                order[..unpinned].iter().all(|i| !is_soft(*i)),
                "{policy}, {tier}: a soft-pinned page went before an unpinned one: {order:?}"
            );
            // Among soft pins, lower priority goes first.
            let soft: Vec<u32> = order[unpinned..].to_vec();
            assert_eq!(
                soft,
                vec![0, 0, 2, 2, 1, 1],
                "{policy}, {tier}: soft pins by priority"
            );
        }
        // The pins held through both drains; the pages left with their last copy.
        assert_eq!(scene.index.stats().pages, 0);
        assert_eq!(scene.index.stats().leases, SOFT.len());
    }
}

#[test]
fn soft_pins_rank_normally_after_their_ttl() {
    for policy in POLICY_NAMES {
        let pinned = scene(policy, true);
        let plain = scene(policy, false);
        // While the pins hold, the order differs from the unpinned one...
        let held = scene(policy, true);
        let held_order = drain(&held, Tier::Device);
        let plain_order = drain(&plain, Tier::Device);
        assert_ne!(
            held_order, plain_order,
            "{policy}: the soft pins changed nothing"
        );
        // ...and once their TTL has passed, it is the same.
        pinned.clock.advance_ms(TTL.as_millis() as u64);
        let expired_order = drain(&pinned, Tier::Device);
        assert_eq!(
            expired_order, plain_order,
            "{policy}: expired soft pins still rank apart"
        );
        assert_eq!(
            pinned.index.stats().leases,
            0,
            "{policy}: expired leases were reclaimed"
        );
        // The scene's premise, for the policies that rank by recency and
        // hits alone (`odds` ranks by what it has learned, which in a fresh
        // index is mostly its prior).
        assert!(
            *policy == "odds" || !is_soft(*plain_order.last().unwrap()) && is_soft(plain_order[0]),
            "{policy}: the soft-pinned prompts should be the coldest: {plain_order:?}"
        );
    }
}

#[test]
fn hard_leases_outlast_soft_pins_and_are_never_evicted() {
    for policy in POLICY_NAMES {
        let scene = scene(policy, true);
        // A hard lease on the hottest prompt (in namespace b).
        let b = NamespaceId(1);
        let hard = scene.index.pin(b, &prompt(7), PinKind::Lease, TTL).unwrap();
        let order = drain(&scene, Tier::Device);
        assert_eq!(order.len(), 2 * PROMPTS as usize - 2, "{policy}");
        assert!(
            !order.contains(&7),
            "{policy}: a hard-leased page was evicted"
        );
        assert_eq!(
            scene.index.match_prefix(b, &prompt(7)).unwrap().tier_pages[Tier::Device.index()],
            2
        );
        scene.index.release(hard.id).unwrap();
        assert_eq!(drain(&scene, Tier::Device), vec![7, 7], "{policy}");
        assert_eq!(scene.index.tier_pages(Tier::Device), 0);
    }
}

// ---- events ----------------------------------------------------------------------

#[derive(Debug, Default)]
struct Collect(Mutex<Vec<IndexEvent>>);

impl EventSink for Collect {
    fn emit(&self, events: &[IndexEvent]) {
        self.0.lock().unwrap().extend_from_slice(events);
    }
}

impl Collect {
    fn take(&self) -> Vec<IndexEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn stored(ns: NamespaceId, hash: PageHash, parent: Option<PageHash>, tier: Tier) -> IndexEvent {
    IndexEvent::Stored {
        ns,
        hash,
        parent,
        tier,
    }
}

fn removed(ns: NamespaceId, hash: PageHash, tier: Tier) -> IndexEvent {
    IndexEvent::Removed { ns, hash, tier }
}

/// The Removed events are exactly one per dropped copy.
fn assert_removed_match(events: &[IndexEvent], dropped: &[EvictedPage]) {
    let mut from_events: Vec<(u32, u128, Tier)> = events
        .iter()
        .map(|e| match *e {
            IndexEvent::Removed { ns, hash, tier } => (ns.0, hash.0, tier),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    let mut from_drops: Vec<(u32, u128, Tier)> = dropped
        .iter()
        .flat_map(|e| e.dropped.copies().map(move |(t, _)| (e.ns.0, e.hash.0, t)))
        .collect();
    from_events.sort_unstable();
    from_drops.sort_unstable();
    assert_eq!(from_events, from_drops);
}

#[test]
fn events_report_stored_pages_and_removed_copies() {
    let sink = Arc::new(Collect::default());
    let index = RadixIndex::new(
        IndexConfig::builder()
            .events(sink.clone())
            .clock(Arc::new(ManualClock::new(0)))
            .build()
            .unwrap(),
    );
    let key = NamespaceKey::new("a", "m", "l", "");
    let ns = index
        .create_namespace(&key, NamespaceConfig::new(2).unwrap())
        .unwrap();
    let other = index
        .create_namespace(
            &NamespaceKey::new("b", "m", "l", ""),
            NamespaceConfig::new(2).unwrap(),
        )
        .unwrap();
    assert!(sink.take().is_empty(), "creating namespaces stores nothing");

    let p1 = [1, 2, 3, 4, 5, 6, 9];
    let h = index.page_hashes(ns, &p1).unwrap();
    // The chain is the documented one: seed, then each page's tokens.
    let seed = key.seed();
    assert_eq!(h[0], seed.chain(&[1, 2]));
    assert_eq!(h[1], h[0].chain(&[3, 4]));
    assert_eq!(h[2], h[1].chain(&[5, 6]));

    index
        .insert(ns, &p1, Tier::Device, &[BlockId(0), BlockId(1), BlockId(2)])
        .unwrap();
    assert_eq!(
        sink.take(),
        vec![
            stored(ns, h[0], None, Tier::Device),
            stored(ns, h[1], Some(h[0]), Tier::Device),
            stored(ns, h[2], Some(h[1]), Tier::Device),
        ]
    );

    // A branch: new copies of the shared pages on host, one new page.
    let p2 = [1, 2, 3, 4, 7, 8];
    let g = index.page_hashes(ns, &p2).unwrap();
    assert_eq!(&g[..2], &h[..2]);
    index
        .insert(
            ns,
            &p2,
            Tier::Host,
            &[BlockId(10), BlockId(11), BlockId(12)],
        )
        .unwrap();
    let mut ev = sink.take();
    ev.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![
        stored(ns, h[0], None, Tier::Host),
        stored(ns, h[1], Some(h[0]), Tier::Host),
        stored(ns, g[2], Some(h[1]), Tier::Host),
    ];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(ev, want);

    // Copies already there: rejected, no events.
    let out = index
        .insert(ns, &p1[..4], Tier::Device, &[BlockId(20), BlockId(21)])
        .unwrap();
    assert_eq!(out.rejected, vec![BlockId(20), BlockId(21)]);
    assert!(sink.take().is_empty());
    // Lookups and pins store nothing.
    index.match_prefix(ns, &p1).unwrap();
    let lease = index
        .pin(
            ns,
            &p1,
            PinKind::Session { priority: 1 },
            Duration::from_secs(1),
        )
        .unwrap();
    index.release(lease.id).unwrap();
    assert!(sink.take().is_empty());

    // A new location, then dropping a copy that is not the last.
    index
        .add_location(ns, h[2], Tier::Disk, BlockId(30))
        .unwrap();
    assert_eq!(sink.take(), vec![stored(ns, h[2], Some(h[1]), Tier::Disk)]);
    let d = index.drop_location(ns, h[2], Tier::Device).unwrap();
    assert_eq!(sink.take(), vec![removed(ns, h[2], Tier::Device)]);
    assert_eq!(d.len(), 1);
    // Evicting its last copy removes the page.
    let d = index.evict(Tier::Disk, 1);
    assert_eq!(d.len(), 1);
    assert!(d[0].page_removed());
    assert_eq!(sink.take(), vec![removed(ns, h[2], Tier::Disk)]);

    // Another namespace's events carry its id.
    index
        .insert(
            other,
            &p1,
            Tier::Device,
            &[BlockId(40), BlockId(41), BlockId(42)],
        )
        .unwrap();
    let oh = index.page_hashes(other, &p1).unwrap();
    let ev = sink.take();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0], stored(other, oh[0], None, Tier::Device));
    assert!(ev
        .iter()
        .all(|e| matches!(e, IndexEvent::Stored { ns, .. } if *ns == other)));

    // Dropping the last copy of a page removes every copy of it and of
    // every page after it, each with one event.
    index.drop_location(ns, h[1], Tier::Device).unwrap();
    assert_eq!(sink.take(), vec![removed(ns, h[1], Tier::Device)]);
    let d = index.drop_location(ns, h[1], Tier::Host).unwrap();
    assert_eq!(d.len(), 2, "h1 and the page after it on the branch");
    assert_removed_match(&sink.take(), &d);

    // Eviction across namespaces: one Removed per dropped copy.
    let d = index.evict(Tier::Device, 100);
    assert!(!d.is_empty());
    assert_removed_match(&sink.take(), &d);

    // Clearing: Removed per copy, then Cleared.
    let d = index.clear_namespace(ns).unwrap();
    let mut ev = sink.take();
    assert_eq!(ev.pop(), Some(IndexEvent::Cleared { ns }));
    assert_removed_match(&ev, &d);
    let d = index.clear_namespace(other).unwrap();
    assert!(d.is_empty(), "other was emptied by the eviction");
    assert_eq!(sink.take(), vec![IndexEvent::Cleared { ns: other }]);
    assert_eq!(index.stats().pages, 0);
    index.check_invariants();
}

#[test]
fn a_released_soft_pin_stops_raising_the_rank() {
    for policy in POLICY_NAMES {
        let clock = Arc::new(ManualClock::new(0));
        let index = RadixIndex::new(
            IndexConfig::builder()
                .policy(by_name(policy).unwrap())
                .clock(clock)
                .build()
                .unwrap(),
        );
        let ns = index
            .create_namespace(
                &NamespaceKey::new("a", "m", "l", ""),
                NamespaceConfig::new(1).unwrap(),
            )
            .unwrap();
        let (a, b) = ([1, 2], [3, 4]);
        index
            .insert(ns, &a, Tier::Device, &[BlockId(0), BlockId(1)])
            .unwrap();
        index
            .insert(ns, &b, Tier::Device, &[BlockId(2), BlockId(3)])
            .unwrap();
        let session = |p: &[u32], priority| {
            index
                .pin(ns, p, PinKind::Session { priority }, TTL)
                .unwrap()
        };
        // `a`: two sessions, priorities 5 and 1; `b`: one, priority 3.
        let high = session(&a, 5);
        let _low = session(&a, 1);
        let _mid = session(&b, 3);
        index.release(high.id).unwrap();
        // `a` is now held at priority 1 only: it goes before `b`.
        let first = index.evict(Tier::Device, 1);
        let a_hashes = index.page_hashes(ns, &a).unwrap();
        assert_eq!(first.len(), 1);
        assert!(
            a_hashes.contains(&first[0].hash),
            "{policy}: a page held at priority 1 outranked one held at 3"
        );
        index.check_invariants();
    }
}

/// A subscriber that applies every event to a set of (page, tier) copies
/// ends up with exactly what a snapshot lists, parents before children.
#[test]
fn a_snapshot_equals_the_replayed_events() {
    let sink = Arc::new(Collect::default());
    let index = RadixIndex::new(IndexConfig::builder().events(sink.clone()).build().unwrap());
    let ns = index
        .create_namespace(
            &NamespaceKey::new("t", "m", "l", ""),
            NamespaceConfig::new(2).unwrap(),
        )
        .unwrap();
    let mut next = 0u32;
    for round in 0..40u32 {
        // Prompts sharing prefixes of varying length, so edges split.
        let shared = (round % 5) * 2;
        let tokens: Vec<u32> = (0..shared)
            .chain(1000 + round * 10..1006 + round * 10)
            .collect();
        let blocks: Vec<BlockId> = (0..tokens.len() / 2)
            .map(|_| {
                next += 1;
                BlockId(next)
            })
            .collect();
        let tier = if round % 3 == 0 {
            Tier::Disk
        } else {
            Tier::Host
        };
        index.insert(ns, &tokens, tier, &blocks).unwrap();
        if round % 4 == 3 {
            index.evict(Tier::Host, 3);
        }
    }
    let mut copies: std::collections::BTreeSet<(PageHash, Tier)> = Default::default();
    let mut parents: HashMap<PageHash, Option<PageHash>> = HashMap::new();
    for e in sink.take() {
        match e {
            IndexEvent::Stored {
                hash, parent, tier, ..
            } => {
                copies.insert((hash, tier));
                parents.insert(hash, parent);
            }
            IndexEvent::Removed { hash, tier, .. } => {
                copies.remove(&(hash, tier));
            }
            IndexEvent::Cleared { .. } => copies.clear(),
        }
    }
    let (pages, marker) = index.snapshot(ns, || 7).unwrap();
    assert_eq!(marker, 7);
    let mut seen = std::collections::HashSet::new();
    let mut listed = std::collections::BTreeSet::new();
    for p in &pages {
        if let Some(parent) = p.parent {
            assert!(seen.contains(&parent), "a parent comes before its child");
        }
        assert_eq!(parents[&p.hash], p.parent);
        seen.insert(p.hash);
        for (tier, _) in p.location.copies() {
            listed.insert((p.hash, tier));
        }
    }
    assert!(!pages.is_empty());
    assert_eq!(listed, copies);
    let (total, per_tier) = index.namespace_pages(ns).unwrap();
    assert_eq!(total, pages.len() as u64);
    assert_eq!(per_tier.iter().sum::<u64>(), copies.len() as u64);
}
