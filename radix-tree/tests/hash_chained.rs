//! Calls that name pages by chained hash: `insert_after` (store what a lookup
//! missed, after the page where the hit ended), `pin_page` and
//! `pin_page_node`.

use radix_tree::{BlockId, IndexError, NamespaceConfig, NamespaceKey, PinKind, RadixIndex, Tier};
use std::time::Duration;

fn index(page_size: usize) -> (RadixIndex, radix_tree::NamespaceId) {
    let index = RadixIndex::default();
    let ns = index
        .create_namespace(
            &NamespaceKey::new("t", "m", "l", ""),
            NamespaceConfig::new(page_size).unwrap(),
        )
        .unwrap();
    (index, ns)
}

fn blocks(n: usize, base: u32) -> Vec<BlockId> {
    (0..n as u32).map(|i| BlockId(base + i)).collect()
}

#[test]
fn insert_after_a_hit_builds_the_same_tree_as_a_full_insert() {
    let prompt_a: Vec<u32> = (0..64).collect();
    let mut prompt_b = prompt_a[..40].to_vec();
    prompt_b.extend(1000..1024);
    let (full, ns_full) = index(4);
    let (after, ns_after) = index(4);
    full.insert(ns_full, &prompt_a, Tier::Host, &blocks(16, 0))
        .unwrap();
    after
        .insert(ns_after, &prompt_a, Tier::Host, &blocks(16, 0))
        .unwrap();
    full.insert(ns_full, &prompt_b, Tier::Host, &blocks(16, 100))
        .unwrap();
    // The engine's way: look up, then store only the missed pages.
    let hit = after.match_prefix(ns_after, &prompt_b).unwrap();
    assert_eq!(hit.pages, 10);
    let out = after
        .insert_after(
            ns_after,
            hit.last_page,
            &prompt_b[40..],
            Tier::Host,
            &blocks(6, 110),
        )
        .unwrap();
    assert_eq!(out.new_pages, 6);
    assert_eq!(out.cached_pages, 0);
    assert_eq!(
        out.last_page,
        Some(
            *after
                .page_hashes(ns_after, &prompt_b)
                .unwrap()
                .last()
                .unwrap()
        )
    );
    for prompt in [&prompt_a, &prompt_b] {
        assert_eq!(
            full.match_prefix(ns_full, prompt).unwrap(),
            after.match_prefix(ns_after, prompt).unwrap()
        );
    }
    after.check_invariants();
    assert_eq!(full.stats().pages, after.stats().pages);
}

#[test]
fn insert_after_the_root_and_after_unknown_pages() {
    let (idx, ns) = index(2);
    let prompt: Vec<u32> = (0..8).collect();
    let out = idx
        .insert_after(ns, None, &prompt, Tier::Disk, &blocks(4, 0))
        .unwrap();
    assert_eq!(out.new_pages, 4);
    assert_eq!(idx.match_prefix(ns, &prompt).unwrap().pages, 4);
    // Pages already there are reported as cached, not added twice.
    let again = idx
        .insert_after(ns, None, &prompt, Tier::Disk, &blocks(4, 0))
        .unwrap();
    assert_eq!((again.cached_pages, again.new_pages), (4, 0));
    let stranger = radix_tree::PageHash(12345);
    assert_eq!(
        idx.insert_after(ns, Some(stranger), &prompt, Tier::Disk, &blocks(4, 0)),
        Err(IndexError::UnknownPage(stranger))
    );
    assert!(matches!(
        idx.insert_after(ns, None, &prompt, Tier::Disk, &blocks(3, 0)),
        Err(IndexError::BlockCountMismatch {
            pages: 4,
            blocks: 3
        })
    ));
    idx.check_invariants();
}

#[test]
fn pin_page_holds_exactly_the_path_to_that_page() {
    let (idx, ns) = index(1);
    let prompt: Vec<u32> = (0..10).collect();
    idx.insert(ns, &prompt, Tier::Host, &blocks(10, 0)).unwrap();
    let hashes = idx.page_hashes(ns, &prompt).unwrap();
    let lease = idx
        .pin_page(ns, hashes[5], PinKind::Lease, Duration::from_secs(60))
        .unwrap();
    assert_eq!(lease.pages, 6);
    // Only the four pages after the pinned one can go.
    let evicted = idx.evict(Tier::Host, 100);
    assert_eq!(evicted.len(), 4);
    assert!(evicted.iter().all(|e| hashes[6..].contains(&e.hash)));
    assert_eq!(idx.match_prefix(ns, &prompt).unwrap().pages, 6);
    idx.check_invariants();
    idx.release(lease.id).unwrap();
    assert_eq!(idx.evict(Tier::Host, 100).len(), 6);
    assert_eq!(
        idx.pin_page(ns, hashes[0], PinKind::Lease, Duration::from_secs(60)),
        Err(IndexError::UnknownPage(hashes[0]))
    );
    idx.check_invariants();
}

/// Pinning page by page, as block copies do, pins whole nodes and never
/// splits them: the tree keeps its shape however many short holds come and
/// go, and each hold keeps its page (and the rest of its node) in place.
#[test]
fn pin_page_node_holds_the_whole_node_and_never_splits_it() {
    let (idx, ns) = index(1);
    let prompt: Vec<u32> = (0..10).collect();
    idx.insert(ns, &prompt, Tier::Host, &blocks(10, 0)).unwrap();
    let hashes = idx.page_hashes(ns, &prompt).unwrap();
    let nodes = idx.stats().nodes;
    let ttl = Duration::from_secs(60);
    for round in 0..3 {
        let leases: Vec<_> = hashes
            .iter()
            .map(|&h| idx.pin_page_node(ns, h, PinKind::Lease, ttl).unwrap())
            .collect();
        assert!(leases.iter().all(|l| l.pages == 10), "round {round}");
        assert_eq!(idx.stats().nodes, nodes, "no node was split");
        assert!(idx.evict(Tier::Host, 100).is_empty(), "all pinned");
        for l in leases {
            idx.release(l.id).unwrap();
        }
        idx.check_invariants();
    }
    // Under the per-page pin, the same holds would have cut the prefix.
    let lease = idx.pin_page(ns, hashes[4], PinKind::Lease, ttl).unwrap();
    assert_eq!(idx.stats().nodes, nodes + 1);
    idx.release(lease.id).unwrap();
    assert_eq!(idx.evict(Tier::Host, 100).len(), 10);
    assert_eq!(
        idx.pin_page_node(ns, hashes[0], PinKind::Lease, ttl),
        Err(IndexError::UnknownPage(hashes[0]))
    );
    idx.check_invariants();
}

#[test]
fn a_match_with_hashes_names_each_matched_page() {
    let (idx, ns) = index(4);
    let prompt: Vec<u32> = (0..40).collect();
    idx.insert(ns, &prompt[..32], Tier::Host, &blocks(8, 0))
        .unwrap();
    let mut m = radix_tree::Match::with_hashes();
    idx.match_prefix_into(ns, &prompt, &mut m).unwrap();
    assert_eq!(m.pages, 8);
    assert_eq!(m.hashes, idx.page_hashes(ns, &prompt[..32]).unwrap());
    // A plain match leaves them out.
    assert!(idx.match_prefix(ns, &prompt).unwrap().hashes.is_empty());
}

#[test]
fn evict_protecting_never_takes_the_protected_path() {
    let (idx, ns) = index(1);
    let old: Vec<u32> = (0..6).collect();
    let new: Vec<u32> = (100..106).collect();
    idx.insert(ns, &old, Tier::Host, &blocks(6, 0)).unwrap();
    idx.insert(ns, &new, Tier::Host, &blocks(6, 10)).unwrap();
    // LRU would take `new` last anyway; touch `old` so it ranks above `new`.
    idx.match_prefix(ns, &old).unwrap();
    idx.insert(ns, &old, Tier::Host, &blocks(6, 0)).unwrap();
    let last = *idx.page_hashes(ns, &new).unwrap().last().unwrap();
    let evicted = idx.evict_protecting(ns, last, Tier::Host, 100).unwrap();
    let old_hashes = idx.page_hashes(ns, &old).unwrap();
    assert_eq!(evicted.len(), 6, "only the unprotected prompt can go");
    assert!(evicted.iter().all(|e| old_hashes.contains(&e.hash)));
    assert_eq!(idx.match_prefix(ns, &new).unwrap().pages, 6);
    // Nothing stays pinned afterwards.
    assert_eq!(idx.stats().pinned_pages, 0);
    assert_eq!(idx.evict(Tier::Host, 100).len(), 6);
    assert_eq!(
        idx.evict_protecting(ns, last, Tier::Host, 1),
        Err(IndexError::UnknownPage(last))
    );
    idx.check_invariants();
}

/// `evict_protecting` evicts exactly what it does with a pin on the
/// protected path for the call (as a hard lease on the page's node, an
/// eviction and a release would): same pages, same order, same tree
/// afterwards. Prompts share prefixes of random lengths, so the
/// protected page sits in leaves and in inner nodes, and on a tier that
/// the eviction does or does not take from.
#[test]
fn evict_protecting_evicts_what_a_pin_on_the_path_would() {
    let mut rng = 0x5eed_u64;
    let mut next = |below: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % below
    };
    for policy in radix_tree::policy::POLICY_NAMES {
        let new_index = || {
            let config = radix_tree::IndexConfig::builder()
                .policy(radix_tree::policy::by_name(policy).unwrap())
                .build()
                .unwrap();
            let idx = RadixIndex::new(config);
            let ns = idx
                .create_namespace(
                    &NamespaceKey::new("t", "m", "l", ""),
                    NamespaceConfig::new(1).unwrap(),
                )
                .unwrap();
            (idx, ns)
        };
        let (a, ns_a) = new_index();
        let (b, ns_b) = new_index();
        let bases: Vec<Vec<u32>> = (0..8)
            .map(|i| (0..40).map(|j| i * 1000 + j).collect())
            .collect();
        for round in 0..400u32 {
            let base = &bases[next(8) as usize];
            let mut prompt = base[..next(40) as usize + 1].to_vec();
            prompt.extend((0..next(12) as u32).map(|j| 100_000 + round * 100 + j));
            let tier = if next(4) == 0 {
                Tier::Device
            } else {
                Tier::Host
            };
            let blocks = blocks(prompt.len(), round * 100);
            for (idx, ns) in [(&a, ns_a), (&b, ns_b)] {
                idx.match_prefix(ns, &prompt).unwrap();
                // A copy on this tier may already be there: that is fine.
                let _ = idx.insert(ns, &prompt, tier, &blocks);
            }
            let hashes = a.page_hashes(ns_a, &prompt).unwrap();
            let protect = hashes[next(hashes.len() as u64) as usize];
            let evict_tier = if next(3) == 0 {
                Tier::Device
            } else {
                Tier::Host
            };
            let held = a.tier_pages(evict_tier);
            if held <= 60 {
                continue;
            }
            let want = (held - 60) as usize;
            let got_a = a.evict_protecting(ns_a, protect, evict_tier, want).unwrap();
            let got_b = b
                .evict_protecting_by_pin(ns_b, protect, evict_tier, want)
                .unwrap();
            assert_eq!(got_a, got_b, "{policy}, round {round}");
            a.check_invariants();
            b.check_invariants();
        }
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(
            (sa.pages, sa.tier_pages, sa.nodes, sa.evicted_copies),
            (sb.pages, sb.tier_pages, sb.nodes, sb.evicted_copies),
            "{policy}"
        );
        assert!(
            sa.evicted_copies.iter().sum::<u64>() > 0,
            "{policy} never evicted"
        );
    }
}
