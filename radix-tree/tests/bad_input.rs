//! Bad input gets a typed error (never a panic) and leaves the index as it
//! was; edge-case input that is valid (empty prompts, partial pages, very
//! long prompts) works.

use radix_tree::{
    BlockId, IndexConfig, IndexError, LeaseId, ManualClock, NamespaceConfig, NamespaceId,
    NamespaceKey, PageHash, PinKind, RadixIndex, Tier, MAX_PAGE_SIZE,
};
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn key(tenant: &str) -> NamespaceKey {
    NamespaceKey::new(tenant, "model", "layout", "")
}

fn blocks(n: usize, base: u32) -> Vec<BlockId> {
    (0..n as u32).map(|i| BlockId(base + i)).collect()
}

fn index_with(config: radix_tree::IndexConfigBuilder) -> (RadixIndex, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000));
    let index = RadixIndex::new(config.clock(clock.clone()).build().unwrap());
    (index, clock)
}

fn index() -> (RadixIndex, Arc<ManualClock>) {
    index_with(IndexConfig::builder())
}

fn ns(index: &RadixIndex, tenant: &str, page_size: usize) -> NamespaceId {
    index
        .create_namespace(&key(tenant), NamespaceConfig::new(page_size).unwrap())
        .unwrap()
}

#[test]
fn page_size_out_of_range_is_an_error() {
    assert_eq!(NamespaceConfig::new(0), Err(IndexError::InvalidPageSize(0)));
    assert_eq!(
        NamespaceConfig::new(257),
        Err(IndexError::InvalidPageSize(257))
    );
    assert_eq!(
        NamespaceConfig::new(MAX_PAGE_SIZE + 1),
        Err(IndexError::InvalidPageSize(MAX_PAGE_SIZE + 1))
    );
    assert_eq!(
        NamespaceConfig::new(usize::MAX),
        Err(IndexError::InvalidPageSize(usize::MAX))
    );
    assert_eq!(NamespaceConfig::new(1).unwrap().page_size(), 1);
    // The largest page size works end to end.
    let (index, _) = index();
    let id = ns(&index, "a", MAX_PAGE_SIZE);
    let prompt: Vec<u32> = (0..2 * MAX_PAGE_SIZE as u32 + 7).collect();
    let out = index
        .insert(id, &prompt, Tier::Device, &blocks(2, 0))
        .unwrap();
    assert_eq!(out.new_pages, 2);
    assert_eq!(index.match_prefix(id, &prompt).unwrap().pages, 2);
    index.check_invariants();
}

#[test]
fn config_limits_of_zero_are_errors() {
    assert!(matches!(
        IndexConfig::builder().max_tokens_per_call(0).build(),
        Err(IndexError::InvalidConfig(_))
    ));
    assert!(matches!(
        IndexConfig::builder()
            .max_pinned_pages_per_tenant(0)
            .build(),
        Err(IndexError::InvalidConfig(_))
    ));
    assert!(IndexConfig::builder()
        .max_tokens_per_call(1)
        .build()
        .is_ok());
}

#[test]
fn unknown_namespace_is_an_error_everywhere() {
    let (index, _) = index();
    let real = ns(&index, "a", 2);
    index
        .insert(real, &[1, 2], Tier::Device, &blocks(1, 0))
        .unwrap();
    let hash = index.page_hashes(real, &[1, 2]).unwrap()[0];
    for bogus in [NamespaceId(1), NamespaceId(42), NamespaceId(u32::MAX)] {
        let err = IndexError::UnknownNamespace(bogus);
        assert_eq!(index.match_prefix(bogus, &[1, 2]).unwrap_err(), err);
        assert_eq!(index.cached_pages(bogus, &[1, 2]).unwrap_err(), err);
        assert_eq!(
            index
                .insert(bogus, &[1, 2], Tier::Device, &blocks(1, 9))
                .unwrap_err(),
            err
        );
        assert_eq!(index.page_hashes(bogus, &[1, 2]).unwrap_err(), err);
        assert_eq!(index.location(bogus, hash).unwrap_err(), err);
        assert_eq!(index.longest_cached_run(bogus, &[hash]).unwrap_err(), err);
        assert_eq!(
            index
                .add_location(bogus, hash, Tier::Host, BlockId(5))
                .unwrap_err(),
            err
        );
        assert_eq!(
            index.drop_location(bogus, hash, Tier::Device).unwrap_err(),
            err
        );
        assert_eq!(
            index.evict_namespace(bogus, Tier::Device, 1).unwrap_err(),
            err
        );
        assert_eq!(index.clear_namespace(bogus).unwrap_err(), err);
        assert_eq!(
            index.pin(bogus, &[1, 2], PinKind::Lease, HOUR).unwrap_err(),
            err
        );
        let lease = LeaseId { ns: bogus, seq: 1 };
        assert_eq!(index.renew(lease, HOUR).unwrap_err(), err);
        assert_eq!(index.release(lease).unwrap_err(), err);
        assert_eq!(index.page_size(bogus).unwrap_err(), err);
        assert_eq!(index.namespace_key(bogus).unwrap_err(), err);
    }
    // Nothing changed.
    assert_eq!(index.stats().pages, 1);
    assert_eq!(
        index
            .location(real, hash)
            .unwrap()
            .unwrap()
            .get(Tier::Device),
        Some(BlockId(0))
    );
    index.check_invariants();
}

#[test]
fn empty_prompt_is_a_miss() {
    let (index, _) = index();
    let id = ns(&index, "a", 4);
    let m = index.match_prefix(id, &[]).unwrap();
    assert_eq!((m.pages, m.tokens(), m.last_page), (0, 0, None));
    assert!(m.locations.is_empty());
    let out = index.insert(id, &[], Tier::Device, &[]).unwrap();
    assert_eq!((out.cached_pages, out.new_pages), (0, 0));
    assert_eq!(index.cached_pages(id, &[]), Ok(0));
    assert_eq!(index.page_hashes(id, &[]), Ok(vec![]));
    assert_eq!(
        index.pin(id, &[], PinKind::Lease, HOUR),
        Err(IndexError::NotCached)
    );
    assert_eq!(
        index.insert(id, &[], Tier::Device, &blocks(1, 0)),
        Err(IndexError::BlockCountMismatch {
            pages: 0,
            blocks: 1
        })
    );
    // With pages cached, an empty prompt still matches nothing.
    index
        .insert(id, &[1, 2, 3, 4], Tier::Device, &blocks(1, 0))
        .unwrap();
    assert_eq!(index.match_prefix(id, &[]).unwrap().pages, 0);
    assert_eq!(
        index.pin(id, &[], PinKind::Lease, HOUR),
        Err(IndexError::NotCached)
    );
    assert_eq!(index.stats().pages, 1);
    index.check_invariants();
}

#[test]
fn prompt_shorter_than_a_page_is_a_miss_and_adds_nothing() {
    let (index, _) = index();
    let id = ns(&index, "a", 4);
    let out = index.insert(id, &[1, 2, 3], Tier::Device, &[]).unwrap();
    assert_eq!((out.cached_pages, out.new_pages), (0, 0));
    assert!(out.rejected.is_empty());
    assert_eq!(index.stats().pages, 0);
    assert_eq!(
        index.insert(id, &[1, 2, 3], Tier::Device, &blocks(1, 0)),
        Err(IndexError::BlockCountMismatch {
            pages: 0,
            blocks: 1
        })
    );
    index
        .insert(id, &[1, 2, 3, 4, 5, 6], Tier::Device, &blocks(1, 0))
        .unwrap();
    // A cached first page does not make a shorter prompt hit.
    assert_eq!(index.match_prefix(id, &[1, 2, 3]).unwrap().pages, 0);
    assert_eq!(
        index.pin(id, &[1, 2, 3], PinKind::Lease, HOUR),
        Err(IndexError::NotCached)
    );
    // The partial tail of a prompt is ignored.
    assert_eq!(index.match_prefix(id, &[1, 2, 3, 4, 9]).unwrap().pages, 1);
    assert_eq!(index.stats().pages, 1);
    index.check_invariants();
}

fn million_tokens(page_size: usize) {
    const TOKENS: usize = 1_000_000;
    let (index, _) = index();
    let id = ns(&index, "a", page_size);
    let prompt: Vec<u32> = (0..TOKENS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 50_000)
        .collect();
    let pages = TOKENS / page_size;
    let out = index
        .insert(id, &prompt, Tier::Device, &blocks(pages, 0))
        .unwrap();
    assert_eq!((out.cached_pages, out.new_pages), (0, pages));
    let m = index.match_prefix(id, &prompt).unwrap();
    assert_eq!(m.pages, pages);
    assert_eq!(m.tokens(), pages * page_size);
    assert!(m
        .locations
        .iter()
        .enumerate()
        .all(|(i, l)| l.get(Tier::Device) == Some(BlockId(i as u32)) && !l.has(Tier::Host)));
    let hashes = index.page_hashes(id, &prompt).unwrap();
    assert_eq!(hashes.len(), pages);
    assert_eq!(m.last_page, hashes.last().copied());
    assert_eq!(index.cached_pages(id, &prompt), Ok(pages));
    // Inserting it again adds nothing and hands every block back.
    let again = index
        .insert(id, &prompt, Tier::Device, &blocks(pages, 10_000_000))
        .unwrap();
    assert_eq!(
        (again.cached_pages, again.new_pages, again.rejected.len()),
        (pages, 0, pages)
    );
    // A hard lease holds all of it.
    let lease = index.pin(id, &prompt, PinKind::Lease, HOUR).unwrap();
    assert_eq!(lease.pages, pages);
    assert!(index.evict(Tier::Device, 10).is_empty());
    index.release(lease.id).unwrap();
    let evicted = index.evict(Tier::Device, 10);
    assert_eq!(evicted.len(), 10);
    let mut got: Vec<PageHash> = evicted.iter().map(|e| e.hash).collect();
    got.sort_unstable();
    let mut tail = hashes[pages - 10..].to_vec();
    tail.sort_unstable();
    assert_eq!(got, tail, "eviction takes the tail first");
    assert!(evicted.iter().all(|e| e.page_removed()));
    assert_eq!(index.match_prefix(id, &prompt).unwrap().pages, pages - 10);
    let s = index.stats();
    assert_eq!(
        (s.pages, s.tier_pages[0], s.pinned_pages, s.leases),
        (pages as u64 - 10, pages as u64 - 10, 0, 0)
    );
    // (No check_invariants here: it locates each page by a scan of its node,
    // quadratic in a node this long.)

    // Past a configured per-call limit: a typed error from every call that takes tokens.
    let (index, _) = index_with(IndexConfig::builder().max_tokens_per_call(TOKENS - 1));
    let id = ns(&index, "a", page_size);
    let err = IndexError::TooManyTokens {
        tokens: TOKENS,
        limit: TOKENS - 1,
    };
    assert_eq!(
        index
            .insert(id, &prompt, Tier::Device, &blocks(pages, 0))
            .unwrap_err(),
        err
    );
    assert_eq!(index.match_prefix(id, &prompt).unwrap_err(), err);
    assert_eq!(index.cached_pages(id, &prompt).unwrap_err(), err);
    assert_eq!(index.page_hashes(id, &prompt).unwrap_err(), err);
    assert_eq!(
        index.pin(id, &prompt, PinKind::Lease, HOUR).unwrap_err(),
        err
    );
    assert_eq!(index.stats().pages, 0);
    // At the limit it works.
    let at_limit = &prompt[..TOKENS - 1];
    let n = at_limit.len() / page_size;
    index
        .insert(id, at_limit, Tier::Host, &blocks(n, 0))
        .unwrap();
    assert_eq!(index.match_prefix(id, at_limit).unwrap().pages, n);
}

#[test]
fn million_token_prompt_page_16() {
    million_tokens(16);
}

#[test]
fn million_token_prompt_page_1() {
    million_tokens(1);
}

#[test]
fn wrong_block_count_is_an_error_and_inserts_nothing() {
    let (index, _) = index();
    let id = ns(&index, "a", 2);
    let prompt = [1, 2, 3, 4, 5, 6, 7];
    for n in [0, 2, 4, 100] {
        assert_eq!(
            index.insert(id, &prompt, Tier::Device, &blocks(n, 0)),
            Err(IndexError::BlockCountMismatch {
                pages: 3,
                blocks: n
            })
        );
    }
    assert_eq!(index.stats().pages, 0);
    assert_eq!(index.stats().inserted_pages, 0);
    assert_eq!(
        index
            .insert(id, &prompt, Tier::Device, &blocks(3, 0))
            .unwrap()
            .new_pages,
        3
    );
    index.check_invariants();
}

#[test]
fn reserved_block_id_is_an_error() {
    let (index, _) = index();
    let id = ns(&index, "a", 1);
    let mut b = blocks(3, 0);
    b[1] = BlockId(u32::MAX);
    assert_eq!(
        index.insert(id, &[1, 2, 3], Tier::Device, &b),
        Err(IndexError::InvalidBlock(u32::MAX))
    );
    assert_eq!(index.stats().pages, 0, "a rejected insert stores nothing");
    // The largest usable id is fine.
    b[1] = BlockId(u32::MAX - 1);
    index.insert(id, &[1, 2, 3], Tier::Device, &b).unwrap();
    let h = index.page_hashes(id, &[1, 2]).unwrap()[1];
    assert_eq!(
        index.location(id, h).unwrap().unwrap().get(Tier::Device),
        Some(BlockId(u32::MAX - 1))
    );
    assert_eq!(
        index.add_location(id, h, Tier::Host, BlockId(u32::MAX)),
        Err(IndexError::InvalidBlock(u32::MAX))
    );
    assert!(!index.location(id, h).unwrap().unwrap().has(Tier::Host));
    index.check_invariants();
}

#[test]
fn location_errors() {
    let (index, _) = index();
    let id = ns(&index, "a", 1);
    index
        .insert(id, &[1, 2], Tier::Device, &blocks(2, 0))
        .unwrap();
    let h = index.page_hashes(id, &[1, 2]).unwrap();
    let missing = index.page_hashes(id, &[1, 3]).unwrap()[1];
    assert_eq!(
        index.add_location(id, missing, Tier::Host, BlockId(9)),
        Err(IndexError::UnknownPage(missing))
    );
    assert_eq!(
        index.drop_location(id, missing, Tier::Host),
        Err(IndexError::UnknownPage(missing))
    );
    assert_eq!(
        index.add_location(id, PageHash(0), Tier::Host, BlockId(9)),
        Err(IndexError::UnknownPage(PageHash(0)))
    );
    assert_eq!(
        index.add_location(id, h[0], Tier::Device, BlockId(9)),
        Err(IndexError::AlreadyPresent)
    );
    assert_eq!(
        index.drop_location(id, h[0], Tier::Disk),
        Err(IndexError::NotPresent)
    );
    let lease = index.pin(id, &[1, 2], PinKind::Lease, HOUR).unwrap();
    assert_eq!(
        index.drop_location(id, h[1], Tier::Device),
        Err(IndexError::Pinned)
    );
    assert_eq!(
        index.drop_location(id, h[0], Tier::Device),
        Err(IndexError::Pinned)
    );
    index.release(lease.id).unwrap();
    assert_eq!(
        index.drop_location(id, h[0], Tier::Device).unwrap().len(),
        2
    );
    assert_eq!(index.stats().pages, 0);
    index.check_invariants();
}

#[test]
fn zero_ttl_is_an_error() {
    let (index, _) = index();
    let id = ns(&index, "a", 1);
    index
        .insert(id, &[1, 2], Tier::Device, &blocks(2, 0))
        .unwrap();
    assert_eq!(
        index.pin(id, &[1, 2], PinKind::Lease, Duration::ZERO),
        Err(IndexError::ZeroTtl)
    );
    assert_eq!(
        index.pin(
            id,
            &[1, 2],
            PinKind::Session { priority: 1 },
            Duration::ZERO
        ),
        Err(IndexError::ZeroTtl)
    );
    assert_eq!(index.stats().leases, 0);
    assert_eq!(index.stats().pinned_pages, 0);
    let lease = index
        .pin(id, &[1, 2], PinKind::Lease, Duration::from_millis(1))
        .unwrap();
    assert_eq!(
        index.renew(lease.id, Duration::ZERO),
        Err(IndexError::ZeroTtl)
    );
    // The lease is untouched by the failed renew.
    assert_eq!(index.stats().leases, 1);
    index.release(lease.id).unwrap();
}

#[test]
fn huge_ttl_saturates_instead_of_wrapping() {
    let (index, clock) = index();
    let id = ns(&index, "a", 1);
    index
        .insert(id, &[1, 2], Tier::Device, &blocks(2, 0))
        .unwrap();
    // 2^62 s is 2^64 * 250 ms: truncated to u64 it would be 0 ms.
    let ttl = Duration::from_secs(1 << 62);
    let lease = index.pin(id, &[1, 2], PinKind::Lease, ttl).unwrap();
    assert_eq!(lease.expires_ms, u64::MAX);
    clock.advance_ms(86_400_000);
    assert_eq!(index.reclaim_expired(), 0);
    assert_eq!(index.renew(lease.id, Duration::MAX), Ok(u64::MAX));
    assert!(
        index.evict(Tier::Device, 2).is_empty(),
        "the lease still holds its pages"
    );
    index.release(lease.id).unwrap();
}

#[test]
fn released_expired_and_unknown_leases() {
    let (index, clock) = index();
    let id = ns(&index, "a", 1);
    let other = ns(&index, "b", 1);
    index
        .insert(id, &[1, 2], Tier::Device, &blocks(2, 0))
        .unwrap();
    let lease = index.pin(id, &[1, 2], PinKind::Lease, HOUR).unwrap();
    assert_eq!(lease.pages, 2);
    assert_eq!(lease.expires_ms, 1_000 + 3_600_000);
    assert_eq!(index.renew(lease.id, HOUR), Ok(1_000 + 3_600_000));
    index.release(lease.id).unwrap();
    assert_eq!(
        index.release(lease.id),
        Err(IndexError::LeaseGone(lease.id))
    );
    assert_eq!(
        index.renew(lease.id, HOUR),
        Err(IndexError::LeaseGone(lease.id))
    );
    // Never issued: a later sequence number, zero, or another namespace's.
    for never in [
        LeaseId {
            ns: id,
            seq: lease.id.seq + 1,
        },
        LeaseId { ns: id, seq: 0 },
        LeaseId {
            ns: id,
            seq: u64::MAX,
        },
        LeaseId {
            ns: other,
            seq: lease.id.seq,
        },
    ] {
        assert_eq!(index.release(never), Err(IndexError::UnknownLease(never)));
        assert_eq!(
            index.renew(never, HOUR),
            Err(IndexError::UnknownLease(never))
        );
    }
    // Expired (reclaimed lazily by the call itself).
    let soft = index
        .pin(
            id,
            &[1],
            PinKind::Session { priority: 3 },
            Duration::from_millis(10),
        )
        .unwrap();
    let hard = index
        .pin(id, &[1, 2], PinKind::Lease, Duration::from_millis(10))
        .unwrap();
    clock.advance_ms(9);
    assert_eq!(index.renew(hard.id, Duration::from_millis(5)), Ok(1_014));
    clock.advance_ms(1);
    assert_eq!(index.release(soft.id), Err(IndexError::LeaseGone(soft.id)));
    assert_eq!(
        index.stats().leases,
        1,
        "the renewed lease outlives its first TTL"
    );
    clock.advance_ms(4);
    assert_eq!(
        index.renew(hard.id, HOUR),
        Err(IndexError::LeaseGone(hard.id))
    );
    assert_eq!(index.release(hard.id), Err(IndexError::LeaseGone(hard.id)));
    let s = index.stats();
    assert_eq!((s.leases, s.pinned_pages), (0, 0));
    assert_eq!(index.tenant_pinned_pages("a"), 0);
    index.check_invariants();
}

#[test]
fn pin_cap_per_tenant() {
    let (index, clock) = index_with(IndexConfig::builder().max_pinned_pages_per_tenant(4));
    let a1 = ns(&index, "a", 1);
    let a2 = index
        .create_namespace(
            &NamespaceKey::new("a", "other-model", "layout", ""),
            NamespaceConfig::new(1).unwrap(),
        )
        .unwrap();
    let b = ns(&index, "b", 1);
    for n in [a1, a2, b] {
        index
            .insert(n, &[1, 2, 3, 4, 5], Tier::Device, &blocks(5, 0))
            .unwrap();
    }
    let l1 = index.pin(a1, &[1, 2, 3], PinKind::Lease, HOUR).unwrap();
    assert_eq!(index.tenant_pinned_pages("a"), 3);
    // The cap is per tenant, across its namespaces, and counts soft pins.
    assert_eq!(
        index.pin(a2, &[1, 2], PinKind::Session { priority: 0 }, HOUR),
        Err(IndexError::PinCapExceeded {
            pinned: 3,
            requested: 2,
            cap: 4
        })
    );
    assert_eq!(
        index.tenant_pinned_pages("a"),
        3,
        "a refused pin holds nothing"
    );
    let l2 = index.pin(a2, &[1], PinKind::Lease, HOUR).unwrap();
    assert_eq!(index.tenant_pinned_pages("a"), 4);
    // Pages already pinned cost nothing.
    let l3 = index
        .pin(a1, &[1, 2], PinKind::Session { priority: 1 }, HOUR)
        .unwrap();
    assert_eq!(l3.pages, 2);
    assert_eq!(index.tenant_pinned_pages("a"), 4);
    // Another tenant has its own budget.
    let lb = index.pin(b, &[1, 2, 3, 4], PinKind::Lease, HOUR).unwrap();
    assert_eq!(index.tenant_pinned_pages("b"), 4);
    assert_eq!(
        index.pin(b, &[1, 2, 3, 4, 5], PinKind::Lease, HOUR),
        Err(IndexError::PinCapExceeded {
            pinned: 4,
            requested: 1,
            cap: 4
        })
    );
    // Releasing frees budget.
    index.release(l1.id).unwrap();
    assert_eq!(
        index.tenant_pinned_pages("a"),
        3,
        "the soft pin still holds two pages"
    );
    index.release(l3.id).unwrap();
    assert_eq!(index.tenant_pinned_pages("a"), 1);
    let l4 = index.pin(a1, &[1, 2, 3], PinKind::Lease, HOUR).unwrap();
    assert_eq!(index.tenant_pinned_pages("a"), 4);
    // An expired lease no longer counts against the cap.
    index.release(l4.id).unwrap();
    let short = index
        .pin(a1, &[1, 2, 3], PinKind::Lease, Duration::from_millis(5))
        .unwrap();
    clock.advance_ms(5);
    let l5 = index.pin(a1, &[1, 2, 3], PinKind::Lease, HOUR).unwrap();
    assert_eq!(index.tenant_pinned_pages("a"), 4);
    assert_eq!(
        index.release(short.id),
        Err(IndexError::LeaseGone(short.id))
    );
    for l in [l2, l5, lb] {
        index.release(l.id).unwrap();
    }
    assert_eq!(index.tenant_pinned_pages("a"), 0);
    assert_eq!(index.tenant_pinned_pages("b"), 0);
    assert_eq!(index.tenant_pinned_pages("nobody"), 0);
    index.check_invariants();
}

#[test]
fn a_lease_pins_only_the_matched_pages_of_a_node() {
    let (index, _) = index_with(IndexConfig::builder().max_pinned_pages_per_tenant(2));
    let id = ns(&index, "a", 1);
    // One node of four pages; the lease matches its first two.
    index
        .insert(id, &[1, 2, 3, 4], Tier::Device, &blocks(4, 0))
        .unwrap();
    let lease = index.pin(id, &[1, 2, 9], PinKind::Lease, HOUR).unwrap();
    assert_eq!(lease.pages, 2);
    assert_eq!(index.tenant_pinned_pages("a"), 2);
    assert_eq!(index.stats().pinned_pages, 2);
    // The unmatched tail stays evictable and droppable.
    let h = index.page_hashes(id, &[1, 2, 3, 4]).unwrap();
    let evicted = index.evict(Tier::Device, 10);
    let mut got: Vec<PageHash> = evicted.iter().map(|e| e.hash).collect();
    got.sort_unstable();
    let mut tail = vec![h[2], h[3]];
    tail.sort_unstable();
    assert_eq!(got, tail);
    assert_eq!(index.match_prefix(id, &[1, 2, 3, 4]).unwrap().pages, 2);
    assert_eq!(
        index.drop_location(id, h[1], Tier::Device),
        Err(IndexError::Pinned)
    );
    index.release(lease.id).unwrap();
    index.check_invariants();
}

#[test]
fn clear_namespace_is_refused_while_a_hard_lease_is_held() {
    let (index, _) = index();
    let id = ns(&index, "a", 1);
    let other = ns(&index, "b", 1);
    index
        .insert(id, &[1, 2, 3], Tier::Device, &blocks(3, 0))
        .unwrap();
    index
        .insert(id, &[1, 5], Tier::Host, &blocks(2, 10))
        .unwrap();
    index
        .insert(other, &[1, 2, 3], Tier::Device, &blocks(3, 20))
        .unwrap();
    let hard = index.pin(id, &[1, 2], PinKind::Lease, HOUR).unwrap();
    let soft = index
        .pin(id, &[1, 5], PinKind::Session { priority: 9 }, HOUR)
        .unwrap();
    assert_eq!(index.clear_namespace(id), Err(IndexError::Pinned));
    assert_eq!(index.stats().pages, 4 + 3, "a refused clear drops nothing");
    assert_eq!(index.stats().leases, 2);
    index.release(hard.id).unwrap();
    // A soft pin does not block it; the clear ends the soft lease.
    let mut dropped: Vec<_> = index
        .clear_namespace(id)
        .unwrap()
        .iter()
        .flat_map(|e| {
            e.dropped
                .copies()
                .map(|(t, b)| (t, b.0))
                .collect::<Vec<_>>()
        })
        .collect();
    dropped.sort_unstable();
    assert_eq!(
        dropped,
        vec![
            (Tier::Device, 0),
            (Tier::Device, 1),
            (Tier::Device, 2),
            (Tier::Host, 10),
            (Tier::Host, 11)
        ],
        "every copy of the namespace, once"
    );
    assert_eq!(index.release(soft.id), Err(IndexError::LeaseGone(soft.id)));
    assert_eq!(index.match_prefix(id, &[1, 2, 3]).unwrap().pages, 0);
    assert_eq!(
        index.match_prefix(other, &[1, 2, 3]).unwrap().pages,
        3,
        "other namespaces keep theirs"
    );
    let s = index.stats();
    assert_eq!((s.pages, s.leases, s.pinned_pages), (3, 0, 0));
    index.check_invariants();
}

#[test]
fn namespace_conflict_on_other_page_size() {
    let (index, _) = index();
    let k = key("a");
    let id = index
        .create_namespace(&k, NamespaceConfig::new(4).unwrap())
        .unwrap();
    assert_eq!(
        index.create_namespace(&k, NamespaceConfig::new(8).unwrap()),
        Err(IndexError::NamespaceConflict {
            existing: 4,
            requested: 8
        })
    );
    assert_eq!(
        index.create_namespace(&k, NamespaceConfig::new(4).unwrap()),
        Ok(id)
    );
    assert_eq!(index.namespace(&k), Some(id));
    assert_eq!(index.namespace(&key("b")), None);
    assert_eq!(index.page_size(id), Ok(4));
    assert_eq!(index.namespace_key(id), Ok(k));
    assert_eq!(index.stats().namespaces, 1);
}

#[test]
fn namespaces_are_isolated_by_key() {
    let (index, _) = index();
    // Two tenants, and keys that differ only where one field ends.
    let keys = [
        key("alice"),
        key("bob"),
        NamespaceKey::new("ab", "c", "", ""),
        NamespaceKey::new("a", "bc", "", ""),
    ];
    let ids: Vec<NamespaceId> = keys
        .iter()
        .map(|k| {
            index
                .create_namespace(k, NamespaceConfig::new(2).unwrap())
                .unwrap()
        })
        .collect();
    let prompt = [1, 2, 3, 4, 5, 6];
    let hashes: Vec<Vec<PageHash>> = ids
        .iter()
        .map(|&id| index.page_hashes(id, &prompt).unwrap())
        .collect();
    for (i, &a) in ids.iter().enumerate() {
        // Only namespace `a` holds the prompt.
        index
            .insert(a, &prompt, Tier::Device, &blocks(3, 100 * i as u32))
            .unwrap();
        for (j, &b) in ids.iter().enumerate() {
            if j == i {
                continue;
            }
            assert_ne!(
                hashes[i], hashes[j],
                "same tokens, different namespace, same names"
            );
            let cached_in_b = j < i;
            assert_eq!(
                index.match_prefix(b, &prompt).unwrap().pages,
                if cached_in_b { 3 } else { 0 }
            );
            for h in &hashes[i] {
                assert_eq!(index.location(b, *h), Ok(None), "{j} sees a page of {i}");
                assert_eq!(
                    index.add_location(b, *h, Tier::Host, BlockId(7)),
                    Err(IndexError::UnknownPage(*h))
                );
                assert_eq!(
                    index.drop_location(b, *h, Tier::Device),
                    Err(IndexError::UnknownPage(*h))
                );
            }
            assert_eq!(index.longest_cached_run(b, &hashes[i]), Ok(0));
            if !cached_in_b {
                assert_eq!(
                    index.pin(b, &prompt, PinKind::Lease, HOUR),
                    Err(IndexError::NotCached)
                );
            }
        }
    }
    // Each namespace sees its own blocks.
    for (i, &id) in ids.iter().enumerate() {
        let m = index.match_prefix(id, &prompt).unwrap();
        let got: Vec<_> = m.locations.iter().map(|l| l.get(Tier::Device)).collect();
        assert_eq!(
            got,
            blocks(3, 100 * i as u32)
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>()
        );
    }
    // Evicting or clearing one namespace leaves the others alone.
    let evicted = index.evict_namespace(ids[0], Tier::Device, 100).unwrap();
    assert_eq!(evicted.len(), 3);
    assert!(evicted.iter().all(|e| e.ns == ids[0]));
    index.clear_namespace(ids[1]).unwrap();
    assert_eq!(index.match_prefix(ids[0], &prompt).unwrap().pages, 0);
    assert_eq!(index.match_prefix(ids[1], &prompt).unwrap().pages, 0);
    assert_eq!(index.match_prefix(ids[2], &prompt).unwrap().pages, 3);
    assert_eq!(index.match_prefix(ids[3], &prompt).unwrap().pages, 3);
    index.check_invariants();
}

#[test]
fn errors_render() {
    // Every error has a message (they go to logs and API responses).
    let errors = [
        IndexError::InvalidPageSize(0),
        IndexError::InvalidConfig("x"),
        IndexError::UnknownNamespace(NamespaceId(3)),
        IndexError::NamespaceConflict {
            existing: 1,
            requested: 2,
        },
        IndexError::TooManyTokens {
            tokens: 2,
            limit: 1,
        },
        IndexError::BlockCountMismatch {
            pages: 1,
            blocks: 2,
        },
        IndexError::InvalidBlock(u32::MAX),
        IndexError::NotCached,
        IndexError::UnknownPage(PageHash(1)),
        IndexError::AlreadyPresent,
        IndexError::NotPresent,
        IndexError::Pinned,
        IndexError::PinCapExceeded {
            pinned: 1,
            requested: 2,
            cap: 2,
        },
        IndexError::LeaseGone(LeaseId {
            ns: NamespaceId(0),
            seq: 1,
        }),
        IndexError::UnknownLease(LeaseId {
            ns: NamespaceId(0),
            seq: 1,
        }),
        IndexError::ZeroTtl,
    ];
    for e in errors {
        assert!(!e.to_string().is_empty(), "{e:?}");
    }
}
