//! The facade's calls for the sidecar: stores through shared memory, stores
//! by page hash, persisting before a shutdown, quotas and invalidation.

mod support;

use cache_server::{Cache, CacheConfig, CacheError, LookupOptions};
use radix_tree::{IndexError, PageHash, Tier};
use std::io::{Seek, SeekFrom, Write};
use support::{block, data, prompt, BLOCK, PAGE};
use tiers::BlockPool;

fn config(dir: &std::path::Path) -> cache_server::CacheConfigBuilder {
    CacheConfig::builder(PAGE, BLOCK, "test-layout")
        .host_bytes(16 * BLOCK)
        .disk(dir.join("disk"), 64 * BLOCK as u64)
}

fn read_all(cache: &Cache, ns: radix_tree::NamespaceId, tokens: &[u32]) -> Vec<Vec<u8>> {
    let hit = cache.lookup(ns, tokens, LookupOptions::default()).unwrap();
    (0..hit.pages)
        .map(|p| {
            let mut out = vec![0; BLOCK];
            cache
                .read(ns, &hit, p, &mut out)
                .unwrap()
                .expect("a sound copy");
            out
        })
        .collect()
}

#[test]
fn shared_memory_stores_publish_what_the_client_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let shm = dir.path().join("host.shm");
    let cache = Cache::open(
        CacheConfig::builder(PAGE, BLOCK, "test-layout")
            .host_bytes(16 * BLOCK)
            .host_shm(&shm)
            .build()
            .unwrap(),
    )
    .unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let tokens = prompt(1, 3);
    // Page 0 through the socket, pages 1 and 2 through the file.
    cache.store(ns, &tokens[..PAGE], 0, &block(1, 0)).unwrap();
    let r = cache.reserve_host(3).unwrap();
    assert_eq!(r.slots.len(), 3);
    let mut file = std::fs::OpenOptions::new().write(true).open(&shm).unwrap();
    for (i, &offset) in r.offsets.iter().enumerate() {
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&block(1, i)).unwrap();
    }
    let used = cache.host_pool().used();
    // Slot 0 duplicates the cached page 0: freed, not stored.
    let out = cache.commit_host(ns, &tokens, 0, &r.slots).unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (1, 2));
    assert_eq!(cache.host_pool().used(), used - 1);
    assert_eq!(
        read_all(&cache, ns, &tokens),
        (0..3).map(|p| block(1, p)).collect::<Vec<_>>()
    );

    // Committing the same slots twice fails and frees nothing of theirs.
    let again = cache.commit_host(ns, &tokens, 1, &r.slots[1..]).unwrap();
    assert_eq!(again.stored_pages, 0);
    assert_eq!(read_all(&cache, ns, &tokens).len(), 3);

    // A wrong slot count is refused and frees the reservation.
    let r = cache.reserve_host(2).unwrap();
    let before = cache.host_pool().used();
    assert!(matches!(
        cache.commit_host(ns, &prompt(2, 1), 0, &r.slots),
        Err(CacheError::InvalidArgument(_))
    ));
    assert_eq!(cache.host_pool().used(), before - 2);
}

#[test]
fn reserving_without_shared_memory_is_refused() {
    let cache = Cache::open(
        CacheConfig::builder(PAGE, BLOCK, "l")
            .host_bytes(4 * BLOCK)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(matches!(
        cache.reserve_host(1),
        Err(CacheError::InvalidArgument(_))
    ));
}

#[test]
fn stores_by_page_hash_check_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path()).build().unwrap()).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    let tokens = prompt(3, 4);
    let seed = cache.index().namespace_key(ns).unwrap().seed();
    let mut hashes = Vec::new();
    let mut h = seed;
    for page in tokens.chunks(PAGE) {
        h = h.chain(page);
        hashes.push(h);
    }
    // The first two pages, then the next two after them.
    let out = cache
        .store_after(ns, None, &hashes[..2], &tokens[..2 * PAGE], &data(3, 0..2))
        .unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (0, 2));
    let out = cache
        .store_after(
            ns,
            Some(hashes[1]),
            &hashes[2..],
            &tokens[2 * PAGE..],
            &data(3, 2..4),
        )
        .unwrap();
    assert_eq!(out.stored_pages, 2);
    assert_eq!(cache.index().longest_cached_run(ns, &hashes).unwrap(), 4);
    // Same as a token-keyed store: a lookup finds it all.
    assert_eq!(
        read_all(&cache, ns, &tokens),
        (0..4).map(|p| block(3, p)).collect::<Vec<_>>()
    );
    let mut page = vec![0; BLOCK];
    assert_eq!(
        cache.read_page(ns, hashes[3], &mut page).unwrap(),
        Some(Tier::Host)
    );
    assert_eq!(page, block(3, 3));

    // Again: all cached.
    let out = cache
        .store_after(ns, None, &hashes[..2], &tokens[..2 * PAGE], &data(3, 0..2))
        .unwrap();
    assert_eq!((out.cached_pages, out.stored_pages), (2, 0));
    // Tokens that do not chain to the hash.
    let mut wrong = tokens[..PAGE].to_vec();
    wrong[0] += 1;
    assert!(matches!(
        cache.store_after(ns, None, &hashes[..1], &wrong, &block(3, 0)),
        Err(CacheError::InvalidArgument(m)) if m.contains("hash")
    ));
    // A parent that is not cached.
    let orphan = PageHash(12345);
    let next = orphan.chain(&tokens[..PAGE]);
    assert!(matches!(
        cache.store_after(ns, Some(orphan), &[next], &tokens[..PAGE], &block(3, 0)),
        Err(CacheError::Index(IndexError::UnknownPage(_)))
    ));
    // Lengths that do not fit.
    assert!(matches!(
        cache.store_after(ns, None, &hashes[..1], &tokens[..PAGE], &block(3, 0)[1..]),
        Err(CacheError::InvalidArgument(_))
    ));
}

#[test]
fn persist_makes_a_restart_find_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<Vec<u32>> = (0..4).map(|i| prompt(10 + i, 3)).collect();
    {
        let cache = Cache::open(config(dir.path()).build().unwrap()).unwrap();
        let ns = cache.namespace("t", "m", "").unwrap();
        for (i, t) in tokens.iter().enumerate() {
            cache.store(ns, t, 0, &data(10 + i as u32, 0..3)).unwrap();
        }
        // Write-back: nothing is on disk yet.
        assert_eq!(cache.index().stats().tier_pages[Tier::Disk.index()], 0);
        assert_eq!(cache.persist(), 12);
        assert_eq!(cache.index().stats().tier_pages[Tier::Disk.index()], 12);
        assert_eq!(cache.persist(), 0, "nothing left to write");
    }
    let cache = Cache::open(config(dir.path()).build().unwrap()).unwrap();
    let ns = cache.namespace("t", "m", "").unwrap();
    for (i, t) in tokens.iter().enumerate() {
        let expected: Vec<Vec<u8>> = (0..3).map(|p| block(10 + i as u32, p)).collect();
        assert_eq!(read_all(&cache, ns, t), expected);
    }
}

#[test]
fn trim_and_clear_touch_one_namespace_only() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path()).build().unwrap()).unwrap();
    let a = cache.namespace("a", "m", "").unwrap();
    let b = cache.namespace("b", "m", "").unwrap();
    cache.store(a, &prompt(1, 4), 0, &data(1, 0..4)).unwrap();
    cache.store(b, &prompt(1, 4), 0, &data(1, 0..4)).unwrap();
    assert_eq!(cache.trim(a, Tier::Host, 3).unwrap(), 3);
    assert_eq!(cache.index().namespace_pages(a).unwrap().0, 1);
    assert_eq!(cache.index().namespace_pages(b).unwrap().0, 4);
    let hit = cache
        .lookup(
            a,
            &prompt(1, 4),
            LookupOptions {
                lease: Some(std::time::Duration::from_secs(5)),
                promote: false,
            },
        )
        .unwrap();
    assert!(matches!(
        cache.clear(a),
        Err(CacheError::Index(IndexError::Pinned))
    ));
    cache.release(hit.lease.as_ref().unwrap()).unwrap();
    assert_eq!(cache.clear(a).unwrap(), 1);
    assert_eq!(cache.index().namespace_pages(a).unwrap().0, 0);
    assert_eq!(read_all(&cache, b, &prompt(1, 4)).len(), 4);
    assert_eq!(cache.host_pool().used(), 4);
}
