//! The `Cache` facade end to end: index and real pools (host RAM, a disk
//! directory), demotion on pressure, promotion on hit, leases, corruption
//! as a miss, and warm restarts.

mod support;
use cache_server::{Cache, CacheConfig, LookupOptions, WriteMode};
use radix_tree::Tier;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{block, data, prompt, BLOCK, PAGE};
use tiers::BlockPool;

fn config(host_blocks: usize, disk: Option<(&std::path::Path, usize)>) -> CacheConfig {
    let mut b = CacheConfig::builder(PAGE, BLOCK, "test-layout").host_bytes(host_blocks * BLOCK);
    if let Some((dir, blocks)) = disk {
        // A disk slot holds the block, a header and up to ~1 KiB of metadata.
        b = b.disk(dir, (blocks * (BLOCK + 4096 + 1024)) as u64);
    }
    b.build().unwrap()
}

fn read_all(
    cache: &Cache,
    ns: radix_tree::NamespaceId,
    tokens: &[u32],
    id: u32,
) -> Vec<Option<Tier>> {
    let lookup = cache
        .lookup(
            ns,
            tokens,
            LookupOptions {
                lease: Some(Duration::from_secs(30)),
                promote: false,
            },
        )
        .unwrap();
    let mut out = vec![0; BLOCK];
    let tiers = (0..lookup.pages)
        .map(|p| {
            let tier = cache.read(ns, &lookup, p, &mut out).unwrap();
            if tier.is_some() {
                assert_eq!(out, block(id, p), "page {p} of prompt {id} came back wrong");
            }
            tier
        })
        .collect();
    if let Some(l) = &lookup.lease {
        cache.release(l).unwrap();
    }
    tiers
}

#[test]
fn store_then_lookup_and_read_returns_the_same_bytes() {
    let cache = Cache::open(config(64, None)).unwrap();
    let ns = cache.namespace("tenant", "model", "").unwrap();
    let tokens = prompt(1, 6);
    let out = cache.store(ns, &tokens, 0, &data(1, 0..6)).unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (0, 6));
    assert_eq!(read_all(&cache, ns, &tokens, 1), vec![Some(Tier::Host); 6]);
    // Extending the prompt stores only the new pages.
    let longer = prompt(1, 8);
    let out = cache.store(ns, &longer, 6, &data(1, 6..8)).unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (6, 2));
    assert_eq!(read_all(&cache, ns, &longer, 1).len(), 8);
    // A store after a gap stores nothing; bad sizes are errors.
    let other = prompt(2, 4);
    assert_eq!(
        cache
            .store(ns, &other, 2, &data(2, 2..4))
            .unwrap()
            .stored_pages,
        0
    );
    assert!(cache.store(ns, &other, 0, &data(2, 0..3)).is_err());
    assert!(cache.store(ns, &other, 5, &[]).is_err());
    cache.index().check_invariants();
}

#[test]
fn blocks_stored_one_slice_per_page_read_back_as_stored() {
    let cache = Cache::open(config(64, None)).unwrap();
    let ns = cache.namespace("tenant", "model", "").unwrap();
    let tokens = prompt(3, 5);
    let blocks: Vec<Vec<u8>> = (0..5).map(|p| block(3, p)).collect();
    let slices: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    // Pages 0..2 first, then the rest after them (one page overlaps).
    let out = cache
        .store_blocks(ns, &tokens[..2 * PAGE], 0, &slices[..2])
        .unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (0, 2));
    let out = cache.store_blocks(ns, &tokens, 1, &slices[1..]).unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (2, 3));
    assert_eq!(read_all(&cache, ns, &tokens, 3), vec![Some(Tier::Host); 5]);
    // Wrong counts and sizes are errors and store nothing.
    let other = prompt(4, 2);
    let short = &block(4, 0)[..BLOCK - 1];
    for bad in [&slices[..1], &[short, slices[1]][..], &slices[..3]] {
        assert!(cache.store_blocks(ns, &other, 0, bad).is_err());
    }
    assert!(cache.store_blocks(ns, &other, 3, &[]).is_err());
    assert_eq!(read_all(&cache, ns, &other, 4), Vec::<Option<Tier>>::new());
    cache.index().check_invariants();
}

#[test]
fn tenants_never_see_each_others_pages() {
    let cache = Cache::open(config(64, None)).unwrap();
    let a = cache.namespace("a", "model", "").unwrap();
    let b = cache.namespace("b", "model", "").unwrap();
    let tokens = prompt(3, 4);
    cache.store(a, &tokens, 0, &data(3, 0..4)).unwrap();
    assert_eq!(
        cache
            .lookup(a, &tokens, LookupOptions::default())
            .unwrap()
            .pages,
        4
    );
    assert_eq!(
        cache
            .lookup(b, &tokens, LookupOptions::default())
            .unwrap()
            .pages,
        0
    );
    cache.store(b, &tokens, 0, &data(3, 0..4)).unwrap();
    assert_eq!(
        cache
            .lookup(b, &tokens, LookupOptions::default())
            .unwrap()
            .pages,
        4
    );
}

#[test]
fn host_pressure_demotes_to_disk_and_hits_promote_back() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(8, Some((dir.path(), 64)))).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    for id in 0..6 {
        cache.store(ns, &prompt(id, 4), 0, &data(id, 0..4)).unwrap();
        assert!(cache.host_pool().used() <= 8, "host capacity exceeded");
    }
    assert!(cache.stats().demotions.load(Ordering::Relaxed) >= 16);
    // Every prompt is still whole, the old ones on disk.
    for id in 0..6 {
        let tiers = read_all(&cache, ns, &prompt(id, 4), id);
        assert_eq!(tiers.len(), 4, "prompt {id} lost pages");
        assert!(tiers.iter().all(Option::is_some));
    }
    let first = prompt(0, 4);
    let l = cache
        .lookup(
            ns,
            &first,
            LookupOptions {
                lease: None,
                promote: true,
            },
        )
        .unwrap();
    assert_eq!(l.fastest_pages()[Tier::Disk.index()], 4);
    cache.wait(l.prefetch.expect("disk-only pages are promoted"));
    let l = cache.lookup(ns, &first, LookupOptions::default()).unwrap();
    assert_eq!(l.fastest_pages()[Tier::Host.index()], 4);
    assert_eq!(read_all(&cache, ns, &first, 0), vec![Some(Tier::Host); 4]);
    cache.index().check_invariants();
}

#[test]
fn leased_pages_are_never_evicted() {
    let cache = Cache::open(config(8, None)).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let kept = prompt(9, 4);
    cache.store(ns, &kept, 0, &data(9, 0..4)).unwrap();
    let l = cache
        .lookup(
            ns,
            &kept,
            LookupOptions {
                lease: Some(Duration::from_secs(60)),
                promote: false,
            },
        )
        .unwrap();
    assert_eq!(l.pages, 4);
    for id in 10..20 {
        cache.store(ns, &prompt(id, 4), 0, &data(id, 0..4)).unwrap();
    }
    let mut out = vec![0; BLOCK];
    for p in 0..4 {
        assert_eq!(cache.read(ns, &l, p, &mut out).unwrap(), Some(Tier::Host));
        assert_eq!(out, block(9, p));
        // Zero-copy access under the lease.
        let borrowed = cache.borrow(ns, l.hashes[p]).unwrap().expect("on host");
        assert_eq!(&*borrowed, block(9, p).as_slice());
    }
    cache.release(l.lease.as_ref().unwrap()).unwrap();
    // With everything leased and no disk, a store that needs room fails cleanly.
    let all = cache
        .lookup(
            ns,
            &prompt(19, 4),
            LookupOptions {
                lease: Some(Duration::from_secs(60)),
                promote: false,
            },
        )
        .unwrap();
    assert_eq!(all.pages, 4);
    cache.index().check_invariants();
}

#[test]
fn a_corrupt_disk_block_is_a_miss_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(64, Some((dir.path(), 64))).clone()).unwrap();
    drop(cache);
    let cfg = CacheConfig::builder(PAGE, BLOCK, "test-layout")
        .host_bytes(64 * BLOCK)
        .disk(dir.path(), (64 * (BLOCK + 4096 + 1024)) as u64)
        .write_mode(WriteMode::WriteThrough)
        .build()
        .unwrap();
    let cache = Cache::open(cfg.clone()).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let tokens = prompt(5, 3);
    cache.store(ns, &tokens, 0, &data(5, 0..3)).unwrap();
    cache.flush();
    assert_eq!(cache.stats().write_throughs.load(Ordering::Relaxed), 3);
    let slot_bytes = cache.disk_pool().unwrap().slot_bytes();
    drop(cache);
    // Flip a byte in the data of every slot on disk.
    let file = dir.path().join("slots-0000.dat");
    let mut bytes = std::fs::read(&file).unwrap();
    for s in 0..3u64 {
        bytes[(s * slot_bytes + 100) as usize] ^= 0xFF;
    }
    std::fs::write(&file, &bytes).unwrap();
    let cache = Cache::open(cfg).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let l = cache.lookup(ns, &tokens, LookupOptions::default()).unwrap();
    assert_eq!(l.pages, 3, "the index came back from the journal");
    let mut out = vec![0; BLOCK];
    assert_eq!(
        cache.read(ns, &l, 0, &mut out).unwrap(),
        None,
        "a corrupt block must be a miss"
    );
    assert!(cache.stats().corrupt_blocks.load(Ordering::Relaxed) >= 1);
    // The bad page (and so everything after it) is gone from the index.
    assert_eq!(
        cache
            .lookup(ns, &tokens, LookupOptions::default())
            .unwrap()
            .pages,
        0
    );
    cache.index().check_invariants();
}

#[test]
fn a_restart_comes_back_warm_and_a_new_layout_comes_back_cold() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |layout: &str| {
        CacheConfig::builder(PAGE, BLOCK, layout)
            .host_bytes(16 * BLOCK)
            .disk(dir.path(), (64 * (BLOCK + 4096 + 1024)) as u64)
            .write_mode(WriteMode::WriteThrough)
            .build()
            .unwrap()
    };
    {
        let cache = Cache::open(cfg("v1")).unwrap();
        let ns = cache.namespace("t", "m", "").unwrap();
        for id in 0..4 {
            cache.store(ns, &prompt(id, 5), 0, &data(id, 0..5)).unwrap();
        }
        // A prompt sharing prompt 0's first two pages.
        let mut branch = prompt(0, 2);
        branch.extend(prompt(7, 3)[8..].iter());
        let mut bytes = data(0, 0..2);
        bytes.extend(data(7, 2..3));
        assert_eq!(
            cache
                .store(ns, &branch, 2, &bytes[2 * BLOCK..])
                .unwrap()
                .stored_pages,
            1
        );
        cache.flush();
    }
    let cache = Cache::open(cfg("v1")).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    assert_eq!(cache.index().stats().pages, 21);
    for id in 0..4 {
        let tiers = read_all(&cache, ns, &prompt(id, 5), id);
        assert_eq!(
            tiers,
            vec![Some(Tier::Disk); 5],
            "prompt {id} after restart"
        );
    }
    cache.index().check_invariants();
    drop(cache);
    let cold = Cache::open(cfg("v2")).unwrap();
    assert_eq!(cold.index().stats().pages, 0);
    let ns = cold.namespace("t", "m", "").unwrap();
    assert_eq!(
        cold.lookup(ns, &prompt(0, 5), LookupOptions::default())
            .unwrap()
            .pages,
        0
    );
}

#[test]
fn write_through_after_hits_copies_only_reused_pages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig::builder(PAGE, BLOCK, "test-layout")
        .host_bytes(64 * BLOCK)
        .disk(dir.path(), (64 * (BLOCK + 4096 + 1024)) as u64)
        .write_mode(WriteMode::WriteThroughAfterHits(2))
        .build()
        .unwrap();
    let cache = Cache::open(cfg).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let reused = prompt(1, 3);
    let once = prompt(2, 3);
    cache.store(ns, &reused, 0, &data(1, 0..3)).unwrap();
    cache.store(ns, &once, 0, &data(2, 0..3)).unwrap();
    cache.lookup(ns, &once, LookupOptions::default()).unwrap();
    cache.lookup(ns, &reused, LookupOptions::default()).unwrap();
    cache.flush();
    assert_eq!(
        cache.disk_pool().unwrap().used(),
        0,
        "one hit earns no disk copy"
    );
    cache.lookup(ns, &reused, LookupOptions::default()).unwrap();
    cache.flush();
    assert_eq!(cache.stats().write_throughs.load(Ordering::Relaxed), 3);
    let l = cache.lookup(ns, &reused, LookupOptions::default()).unwrap();
    assert!(l
        .locations
        .iter()
        .all(|loc| loc.has(Tier::Disk) && loc.has(Tier::Host)));
    let l = cache.lookup(ns, &once, LookupOptions::default()).unwrap();
    assert!(l.locations.iter().all(|loc| !loc.has(Tier::Disk)));
}
