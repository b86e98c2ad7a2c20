//! Write-back demotion in two phases: `eviction_candidates` names the copies
//! eviction would take, the caller copies them down and records the new
//! copy, then drops the old one.

use radix_tree::{BlockId, IndexError, NamespaceConfig, NamespaceKey, PinKind, RadixIndex, Tier};
use std::collections::BTreeSet;
use std::time::Duration;

fn build() -> (RadixIndex, radix_tree::NamespaceId, Vec<Vec<u32>>) {
    let index = RadixIndex::default();
    let ns = index
        .create_namespace(
            &NamespaceKey::new("t", "m", "l", ""),
            NamespaceConfig::new(2).unwrap(),
        )
        .unwrap();
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|p| {
            (0..12)
                .map(|i| if i < 4 { i } else { p * 100 + i })
                .collect()
        })
        .collect();
    for (p, prompt) in prompts.iter().enumerate() {
        let blocks: Vec<BlockId> = (0..6).map(|i| BlockId(p as u32 * 10 + i)).collect();
        index.insert(ns, prompt, Tier::Host, &blocks).unwrap();
    }
    // Touch the first prompt again: it becomes the most recently used.
    index.match_prefix(ns, &prompts[0]).unwrap();
    (index, ns, prompts)
}

#[test]
fn candidates_are_what_eviction_takes() {
    for k in [1, 3, 4, 7] {
        let (a, _, _) = build();
        let (b, _, _) = build();
        let named: BTreeSet<_> = a
            .eviction_candidates(Tier::Host, k)
            .iter()
            .map(|c| c.hash)
            .collect();
        let taken: BTreeSet<_> = b.evict(Tier::Host, k).iter().map(|e| e.hash).collect();
        assert_eq!(named.len(), k);
        assert_eq!(named, taken, "k={k}");
        // Nothing changed in `a`: 2 shared pages and 4 of each prompt's own.
        assert_eq!(a.stats().pages, 18);
        a.check_invariants();
    }
}

#[test]
fn demotion_keeps_the_page_on_the_lower_tier() {
    let (index, ns, prompts) = build();
    let victims = index.eviction_candidates(Tier::Host, 2);
    assert_eq!(victims.len(), 2);
    for (i, v) in victims.iter().enumerate() {
        assert!(v.location.has(Tier::Host) && !v.location.has(Tier::Disk));
        index
            .add_location(v.ns, v.hash, Tier::Disk, BlockId(500 + i as u32))
            .unwrap();
        let dropped = index.drop_location(v.ns, v.hash, Tier::Host).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            dropped[0].dropped.get(Tier::Host),
            v.location.get(Tier::Host)
        );
        assert_eq!(
            dropped[0].remaining.get(Tier::Disk),
            Some(BlockId(500 + i as u32))
        );
    }
    // Every prompt is still fully cached; the demoted pages now on disk only.
    let on_disk: usize = prompts
        .iter()
        .map(|p| {
            let m = index.match_prefix(ns, p).unwrap();
            assert_eq!(m.pages, 6);
            m.locations
                .iter()
                .filter(|l| l.has(Tier::Disk) && !l.has(Tier::Host))
                .count()
        })
        .sum();
    assert_eq!(on_disk, 2);
    index.check_invariants();
}

#[test]
fn a_lease_taken_between_the_phases_keeps_the_copy() {
    let (index, ns, _) = build();
    let v = index.eviction_candidates(Tier::Host, 1)[0];
    index
        .add_location(v.ns, v.hash, Tier::Disk, BlockId(900))
        .unwrap();
    let lease = index
        .pin_page(ns, v.hash, PinKind::Lease, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        index.drop_location(v.ns, v.hash, Tier::Host),
        Err(IndexError::Pinned)
    );
    index.release(lease.id).unwrap();
    assert_eq!(
        index.drop_location(v.ns, v.hash, Tier::Host).unwrap().len(),
        1
    );
    index.check_invariants();
}

#[test]
fn batched_location_calls_report_each_page() {
    let (index, ns, prompts) = build();
    let hashes = index.page_hashes(ns, &prompts[1]).unwrap();
    // Pages 2.. of prompt 1 are its own; give them disk copies in one call.
    let copies: Vec<_> = hashes[2..]
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, Tier::Disk, BlockId(700 + i as u32)))
        .collect();
    let mut with_bad = copies.clone();
    with_bad.push((hashes[2], Tier::Disk, BlockId(799))); // already there now
    let results = index.add_locations(ns, &with_bad).unwrap();
    assert!(results[..4].iter().all(Result::is_ok));
    assert_eq!(results[4], Err(IndexError::AlreadyPresent));
    // Hold the last page; drop every host copy of prompt 1's own pages.
    let lease = index
        .pin_page(ns, hashes[5], PinKind::Lease, Duration::from_secs(60))
        .unwrap();
    let drops: Vec<_> = hashes[2..].iter().map(|h| (*h, Tier::Host)).collect();
    let (dropped, results) = index.drop_locations(ns, &drops).unwrap();
    assert!(
        results.iter().all(|r| *r == Err(IndexError::Pinned)),
        "{results:?}"
    );
    assert!(dropped.is_empty());
    index.release(lease.id).unwrap();
    let (dropped, results) = index.drop_locations(ns, &drops).unwrap();
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(dropped.len(), 4);
    assert!(dropped
        .iter()
        .all(|e| e.remaining.has(Tier::Disk) && !e.page_removed()));
    index.check_invariants();
}
