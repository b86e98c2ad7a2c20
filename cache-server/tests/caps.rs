//! Property test of the `Cache` facade's capacity and lease promises over a
//! small cache (8–16 host blocks, 32–64 disk blocks; write-back,
//! write-through, write-through after hits): random sequences of store, lookup with a lease, release,
//! read, promote and flush. After every step:
//! - no pool holds more blocks than its capacity;
//! - every page under a lease reads back, with exactly its bytes, until the
//!   lease is released;
//! - every read that succeeds returns exactly the bytes stored;
//! - the index's invariants hold;
//!
//! and whenever no move is in flight, every allocated slot is a copy the
//! index knows (no leak, no double free).

use cache_server::{Cache, CacheConfig, CacheError, Lookup, LookupOptions, WriteMode};
use proptest::prelude::*;
use radix_tree::{NamespaceId, Tier};
use std::hash::{Hash, Hasher};
use std::sync::OnceLock;
use std::time::Duration;
use tiers::BlockPool;

const PAGE: usize = 4;
const BLOCK: usize = 1024;
/// Leases in the test never expire on their own.
const LONG: Duration = Duration::from_secs(600);
/// Most leases held at once (so that some room is always left to evict).
const MAX_LEASES: usize = 3;

/// Prompts as sequences of page labels; a label is one page's tokens.
/// Shared label prefixes are shared token prefixes: each family has a
/// system prompt, turns that extend the previous turn, and branches from
/// the system prompt. About 100 distinct pages, more than the disk holds.
fn catalog() -> &'static [Vec<u32>] {
    static CATALOG: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let mut next = 1u32;
        let mut fresh = |n: usize| -> Vec<u32> {
            let labels = (next..next + n as u32).collect();
            next += n as u32;
            labels
        };
        let mut prompts = Vec::new();
        for family in 0..5 {
            let system = fresh(1 + family % 3);
            let mut previous = system.clone();
            for turn in 0..8 {
                let base = if turn % 3 == 2 { &system } else { &previous };
                let mut prompt = base.clone();
                prompt.extend(fresh(1 + (family + turn) % 3));
                prompts.push(prompt.clone());
                previous = prompt;
            }
        }
        prompts
    })
}

fn tokens(p: usize) -> Vec<u32> {
    catalog()[p]
        .iter()
        .flat_map(|&label| (0..PAGE as u32).map(move |j| label * 16 + j))
        .collect()
}

/// The bytes of page `i` of prompt `p`: a function of the page's whole
/// prefix, as real KV is, so shared pages have one value.
fn block(p: usize, i: usize) -> Vec<u8> {
    let mut h = std::hash::DefaultHasher::new();
    catalog()[p][..=i].hash(&mut h);
    let mut x = h.finish() | 1;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn data(p: usize, pages: std::ops::Range<usize>) -> Vec<u8> {
    pages.flat_map(|i| block(p, i)).collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Store a prompt: all of it, or only what is not cached yet.
    Store { p: usize, only_new: bool },
    /// Look a prompt up and keep a lease on what matched.
    Lease { p: usize },
    /// Release one of the held leases.
    Release { i: usize },
    /// Look up without a lease and read every matched page.
    Read { p: usize },
    /// Look up with promotion of disk-only pages, maybe waiting for it.
    Promote { p: usize, wait: bool },
    /// Wait for every move in flight.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..catalog().len();
    prop_oneof![
        4 => (p.clone(), any::<bool>()).prop_map(|(p, only_new)| Op::Store { p, only_new }),
        2 => p.clone().prop_map(|p| Op::Lease { p }),
        2 => (0..MAX_LEASES).prop_map(|i| Op::Release { i }),
        2 => p.clone().prop_map(|p| Op::Read { p }),
        2 => (p, any::<bool>()).prop_map(|(p, wait)| Op::Promote { p, wait }),
        1 => Just(Op::Flush),
    ]
}

fn mode() -> impl Strategy<Value = WriteMode> {
    prop_oneof![
        Just(WriteMode::WriteBack),
        Just(WriteMode::WriteThrough),
        (1u32..3).prop_map(WriteMode::WriteThroughAfterHits),
    ]
}

/// Reads page `i` of a lookup of prompt `p`; a hit must be exact.
fn read(cache: &Cache, ns: NamespaceId, lookup: &Lookup, p: usize, i: usize) -> Option<Tier> {
    let mut out = vec![0xA5; BLOCK];
    let tier = cache.read(ns, lookup, i, &mut out).unwrap();
    if tier.is_some() {
        assert!(out == block(p, i), "page {i} of prompt {p} came back wrong");
    }
    tier
}

fn check(cache: &Cache, ns: NamespaceId, held: &[(usize, Lookup)]) {
    let host = cache.host_pool();
    assert!(host.used() <= host.capacity(), "host over capacity");
    let disk = cache.disk_pool().unwrap();
    assert!(disk.used() <= disk.capacity(), "disk over capacity");
    for (p, lookup) in held {
        assert!(cache.index().cached_pages(ns, &tokens(*p)).unwrap() >= lookup.pages);
        for i in 0..lookup.pages {
            assert!(
                read(cache, ns, lookup, *p, i).is_some(),
                "leased page {i} of prompt {p} is unreadable"
            );
        }
    }
    cache.index().check_invariants();
}

fn no_leaks(cache: &Cache) {
    cache.flush();
    let disk = cache.disk_pool().unwrap();
    assert_eq!(
        cache.host_pool().used() as u64,
        cache.index().tier_pages(Tier::Host)
    );
    assert_eq!(disk.used() as u64, cache.index().tier_pages(Tier::Disk));
}

/// What a run did, to check that the interesting paths ran.
#[derive(Debug, Default)]
struct Ran {
    demotions: u64,
    promotions: u64,
    write_throughs: u64,
    disk_evictions: u64,
    leases: usize,
}

fn run(mode: WriteMode, host: usize, disk: usize, ops: &[Op]) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(
        CacheConfig::builder(PAGE, BLOCK, "caps-layout")
            .host_bytes(host * BLOCK)
            // A disk slot of a 1 KiB block with its header and metadata
            // rounds up to 4 KiB.
            .disk(dir.path(), (disk * 4096) as u64)
            .write_mode(mode)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(cache.host_pool().capacity() as usize, host);
    assert_eq!(cache.disk_pool().unwrap().capacity() as usize, disk);
    let ns = cache.namespace("tenant", "model", "").unwrap();
    let mut held: Vec<(usize, Lookup)> = Vec::new();
    let mut leases = 0;
    for op in ops {
        match *op {
            Op::Store { p, only_new } => {
                let t = tokens(p);
                let pages = catalog()[p].len();
                let first = if only_new {
                    cache.index().cached_pages(ns, &t).unwrap()
                } else {
                    0
                };
                match cache.store(ns, &t, first, &data(p, first..pages)) {
                    Ok(out) => {
                        assert!(out.cached_pages + out.stored_pages <= pages);
                        if out.stored_pages > 0 {
                            assert_eq!(out.cached_pages + out.stored_pages, pages);
                        }
                    }
                    // Every evictable page is leased or in flight.
                    Err(CacheError::Full(_)) => {}
                    Err(e) => panic!("store of prompt {p}: {e}"),
                }
            }
            Op::Lease { p } => {
                if held.len() < MAX_LEASES {
                    let options = LookupOptions {
                        lease: Some(LONG),
                        promote: false,
                    };
                    let lookup = cache.lookup(ns, &tokens(p), options).unwrap();
                    assert!(lookup.pages <= catalog()[p].len());
                    if lookup.lease.is_some() {
                        leases += 1;
                        held.push((p, lookup));
                    }
                }
            }
            Op::Release { i } => {
                if !held.is_empty() {
                    let (_, lookup) = held.swap_remove(i % held.len());
                    cache.release(lookup.lease.as_ref().unwrap()).unwrap();
                }
            }
            Op::Read { p } => {
                let lookup = cache
                    .lookup(ns, &tokens(p), LookupOptions::default())
                    .unwrap();
                for i in 0..lookup.pages {
                    // Nothing fails here: every matched page is readable.
                    assert!(read(&cache, ns, &lookup, p, i).is_some());
                }
            }
            Op::Promote { p, wait } => {
                let options = LookupOptions {
                    lease: None,
                    promote: true,
                };
                let lookup = cache.lookup(ns, &tokens(p), options).unwrap();
                if let (Some(id), true) = (lookup.prefetch, wait) {
                    cache.wait(id);
                }
            }
            Op::Flush => no_leaks(&cache),
        }
        check(&cache, ns, &held);
    }
    for (_, lookup) in held.drain(..) {
        cache.release(lookup.lease.as_ref().unwrap()).unwrap();
    }
    no_leaks(&cache);
    check(&cache, ns, &[]);
    assert_eq!(cache.index().stats().leases, 0);
    let s = cache.stats();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&s.corrupt_blocks), 0, "no fault was injected");
    assert_eq!(load(&s.io_errors), 0, "no fault was injected");
    Ran {
        demotions: load(&s.demotions),
        promotions: load(&s.promotions),
        write_throughs: load(&s.write_throughs),
        disk_evictions: cache.index().stats().evicted_copies[Tier::Disk.index()],
        leases,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn capacities_leases_and_bytes_hold(
        mode in mode(),
        host in 8usize..=16,
        disk in 32usize..=64,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(mode, host, disk, &ops);
    }
}

/// A fixed sequence that fills both tiers with leases held, so that the
/// interesting paths (demotion, promotion into a full host, disk eviction)
/// run on every test run, whatever proptest draws.
#[test]
fn a_full_cache_with_leases_held() {
    for mode in [
        WriteMode::WriteBack,
        WriteMode::WriteThrough,
        WriteMode::WriteThroughAfterHits(1),
    ] {
        let mut ops = Vec::new();
        for round in 0..4 {
            for p in 0..catalog().len() {
                ops.push(Op::Store {
                    p,
                    only_new: p % 2 == 0,
                });
                if p % 3 == round % 3 {
                    ops.push(Op::Lease {
                        p: (p + 3) % catalog().len(),
                    });
                }
                ops.push(Op::Promote {
                    p: (p + 5) % catalog().len(),
                    wait: p % 2 == 1,
                });
                if p % 4 == 0 {
                    ops.push(Op::Release { i: p });
                }
                ops.push(Op::Read {
                    p: (p + 7) % catalog().len(),
                });
            }
            ops.push(Op::Flush);
        }
        let ran = run(mode, 8, 64, &ops);
        assert!(ran.demotions > 0, "{mode:?}: {ran:?}");
        assert!(ran.promotions > 0, "{mode:?}: {ran:?}");
        assert!(ran.disk_evictions > 0, "{mode:?}: {ran:?}");
        assert!(ran.leases > 0, "{mode:?}: {ran:?}");
        if mode != WriteMode::WriteBack {
            assert!(ran.write_throughs > 0, "{mode:?}: {ran:?}");
        }
    }
}
