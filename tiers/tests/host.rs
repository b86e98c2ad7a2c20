//! The host tier: the `BlockPool` contract, zero-copy borrows, a concurrent
//! stress test, and shared memory seen from an engine's `ShmView`.

#[path = "support/pool_contract.rs"]
mod pool_contract;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use pool_contract::{check_pattern, pattern, Rng};
use tiers::host::{HostPool, HostPoolConfig, ShmView, SHM_HEADER_BYTES};
use tiers::{BlockGeometry, BlockPool, Medium, SlotId, TierError};

fn geometry(block_bytes: usize) -> BlockGeometry {
    BlockGeometry::new(block_bytes, 64, 0x1a40_u64).unwrap()
}

fn pool(block_bytes: usize, slots: usize) -> HostPool {
    let config = HostPoolConfig::builder(geometry(block_bytes))
        .capacity_bytes(block_bytes * slots)
        .build()
        .unwrap();
    HostPool::new(config).unwrap()
}

/// A directory on tmpfs where there is one (shared memory proper).
fn shm_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("radixkv-test")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn shm_pool(dir: &Path, g: BlockGeometry, slots: usize) -> (HostPool, PathBuf) {
    let path = dir.join("pool");
    let config = HostPoolConfig::builder(g)
        .capacity_bytes(g.block_bytes * slots)
        .shared_memory(&path)
        .build()
        .unwrap();
    (HostPool::new(config).unwrap(), path)
}

#[test]
fn medium_and_capacity_from_budget() {
    let p = pool(1000, 5);
    assert_eq!(p.medium(), Medium::Host);
    assert_eq!(p.capacity(), 5);
    assert_eq!(p.used(), 0);
    assert_eq!(p.geometry().block_bytes, 1000);
    // 1000-byte blocks are padded to a cache line, big ones to a page.
    assert_eq!(p.slot_stride(), 1024);
    assert_eq!(pool(8192, 1).slot_stride(), 8192);

    let budget = HostPoolConfig::builder(geometry(1000))
        .capacity_bytes(4999)
        .build()
        .unwrap();
    assert_eq!(budget.slot_count(), 4);
    for bytes in [0, 999] {
        let err = HostPoolConfig::builder(geometry(1000))
            .capacity_bytes(bytes)
            .build()
            .unwrap_err();
        assert!(matches!(err, TierError::InvalidConfig(_)), "{err}");
    }
}

#[test]
fn round_trip() {
    pool_contract::round_trip(&pool(4096, 4));
    pool_contract::round_trip(&pool(100, 4));
}

#[test]
fn empty_reads() {
    pool_contract::empty_reads(&pool(4096, 4));
}

#[test]
fn bad_arguments() {
    pool_contract::bad_arguments(&pool(4096, 2));
}

#[test]
fn write_once() {
    pool_contract::write_once(&pool(256, 2));
}

#[test]
fn full_then_free() {
    pool_contract::full_then_free(&pool(512, 7));
    pool_contract::full_then_free(&pool(512, 1));
}

#[test]
fn works_as_a_trait_object() {
    let pools: Vec<Box<dyn BlockPool>> = vec![Box::new(pool(64, 2))];
    for p in &pools {
        pool_contract::round_trip(p.as_ref());
    }
}

#[test]
fn block_borrows_in_place() {
    let p = pool(8192, 2);
    let slot = p.allocate().unwrap();
    assert!(matches!(p.block(slot), Err(TierError::Empty(_))));
    let data = pattern(8192, slot.0, 3);
    p.write(slot, &data, &[]).unwrap();
    let a = p.block(slot).unwrap();
    let b = p.block(slot).unwrap();
    assert_eq!(&*a, &data[..]);
    assert_eq!(a.as_ptr(), b.as_ptr(), "both borrows point at the slot");
    assert_eq!(a.slot(), slot);
    drop((a, b));
    p.free(slot);
    assert!(matches!(p.block(slot), Err(TierError::Empty(_))));
    assert!(matches!(
        p.block(SlotId(9)),
        Err(TierError::NoSuchSlot { .. })
    ));
}

#[test]
fn free_while_borrowed_waits_for_the_borrow() {
    let p = pool(4096, 1);
    let slot = p.allocate().unwrap();
    let data = pattern(4096, slot.0, 11);
    p.write(slot, &data, &[]).unwrap();
    let borrowed = p.block(slot).unwrap();
    p.free(slot);
    // Freed but pinned: no new reader, not handed out, bytes unchanged.
    assert!(matches!(p.block(slot), Err(TierError::Empty(_))));
    assert!(matches!(p.allocate(), Err(TierError::Full)));
    assert_eq!(p.used(), 1);
    assert_eq!(&*borrowed, &data[..]);
    drop(borrowed);
    assert_eq!(p.used(), 0);
    assert_eq!(p.allocate().unwrap(), slot);
}

#[test]
fn stress_with_leased_readers() {
    let p = pool(4096 + 64, 8);
    pool_contract::stress(&p, 4, 3_000);
}

/// Readers without leases: they borrow any slot at random while owners
/// free and rewrite. A borrow either fails (`Empty`) or sees one whole,
/// unchanging block; it never sees bytes change under it.
#[test]
fn stress_unleased_borrows_are_never_torn() {
    let len = 2048;
    let p = pool(len, 6);
    let capacity = p.capacity();
    let writers_done = AtomicU32::new(0);
    std::thread::scope(|scope| {
        for t in 0..2u64 {
            let (p, writers_done) = (&p, &writers_done);
            scope.spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut generation = t << 40;
                let mut held = Vec::new();
                for _ in 0..4_000 {
                    match p.allocate() {
                        Ok(slot) => {
                            generation += 1;
                            p.write(slot, &pattern(len, slot.0, generation), &[])
                                .unwrap();
                            held.push(slot);
                        }
                        Err(TierError::Full) => {}
                        Err(e) => panic!("{e}"),
                    }
                    if !held.is_empty() && rng.below(2) == 0 {
                        let i = rng.below(held.len() as u64) as usize;
                        p.free(held.swap_remove(i));
                    }
                }
                for slot in held {
                    p.free(slot);
                }
                writers_done.fetch_add(1, Ordering::Release);
            });
        }
        for t in 0..2u64 {
            let (p, writers_done) = (&p, &writers_done);
            scope.spawn(move || {
                let mut rng = Rng::new(200 + t);
                while writers_done.load(Ordering::Acquire) < 2 {
                    let slot = rng.below(u64::from(capacity)) as u32;
                    if let Ok(block) = p.block(SlotId(slot)) {
                        let generation = check_pattern(&block, slot);
                        std::thread::yield_now();
                        assert_eq!(check_pattern(&block, slot), generation);
                    }
                }
            });
        }
    });
    assert_eq!(p.used(), 0);
}

#[test]
fn shm_view_reads_the_pools_bytes_in_place() {
    let dir = shm_dir();
    let g = geometry(8192);
    let (p, path) = shm_pool(dir.path(), g, 4);
    assert_eq!(p.shm_path(), Some(path.as_path()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let view = ShmView::open(&path, g).unwrap();
    assert_eq!(view.geometry(), &g);
    assert_eq!(view.slot_count(), 4);
    let slots: Vec<SlotId> = (0..3).map(|_| p.allocate().unwrap()).collect();
    for (i, &slot) in slots.iter().enumerate() {
        p.write(slot, &pattern(8192, slot.0, i as u64), &[])
            .unwrap();
    }
    let mapping = view.as_bytes().as_ptr_range();
    for (i, &slot) in slots.iter().enumerate() {
        let offset = p.slot_offset(slot).unwrap();
        assert_eq!(view.slot_offset(slot).unwrap(), offset);
        assert!(offset >= SHM_HEADER_BYTES as u64);
        let bytes = view.block_at(offset).unwrap();
        assert_eq!(check_pattern(bytes, slot.0), i as u64);
        assert_eq!(view.block(slot).unwrap(), bytes);
        // Zero copy: the slice is the mapping's own memory at that offset.
        assert_eq!(bytes.as_ptr(), view.as_bytes()[offset as usize..].as_ptr());
        assert!(mapping.contains(&bytes.as_ptr()));
        assert_eq!(&*p.block(slot).unwrap(), bytes);
    }
    // Offsets that are not a slot's start.
    let first = p.slot_offset(SlotId(0)).unwrap();
    for bad in [0, first + 1, first + 4 * view.slot_stride(), u64::MAX] {
        assert!(view.block_at(bad).is_err(), "offset {bad}");
    }
    assert!(matches!(
        view.block(SlotId(4)),
        Err(TierError::NoSuchSlot { .. })
    ));

    // The view outlives the pool; the pool's file goes with the pool.
    drop(p);
    assert!(!path.exists());
    assert_eq!(check_pattern(view.block(slots[1]).unwrap(), slots[1].0), 1);
}

/// A client writes a reserved slot through the file and the pool seals it:
/// the block becomes readable as written, exactly once.
#[test]
fn sealing_publishes_bytes_written_in_place() {
    let dir = shm_dir();
    let g = geometry(8192);
    let (p, path) = shm_pool(dir.path(), g, 2);
    let slot = p.allocate().unwrap();
    assert!(
        matches!(p.block(slot), Err(TierError::Empty(_))),
        "a reserved slot is not readable"
    );
    patch(
        &path,
        p.slot_offset(slot).unwrap(),
        &pattern(8192, slot.0, 9),
    );
    p.seal(slot).unwrap();
    assert_eq!(check_pattern(&p.block(slot).unwrap(), slot.0), 9);
    assert!(
        matches!(p.seal(slot), Err(TierError::Empty(_))),
        "sealed twice"
    );
    assert!(
        matches!(p.seal(SlotId(1)), Err(TierError::Empty(_))),
        "never reserved"
    );
    assert!(!p.unreserve(slot), "a published block is not a reservation");
    assert_eq!(p.used(), 1);
    p.free(slot);
    assert!(matches!(p.seal(slot), Err(TierError::Empty(_))), "freed");
    let other = p.allocate().unwrap();
    assert!(p.unreserve(other));
    assert!(!p.unreserve(other), "once");
    assert_eq!(p.used(), 0);
}

#[test]
fn shm_view_rejects_the_wrong_geometry() {
    let dir = shm_dir();
    let g = geometry(4096);
    let (_p, path) = shm_pool(dir.path(), g, 2);
    let others = [
        BlockGeometry::new(8192, g.max_meta_bytes, g.layout_digest).unwrap(),
        BlockGeometry::new(4096, g.max_meta_bytes + 1, g.layout_digest).unwrap(),
        BlockGeometry::new(4096, g.max_meta_bytes, g.layout_digest ^ 1).unwrap(),
    ];
    for other in others {
        let err = ShmView::open(&path, other).unwrap_err();
        assert!(
            matches!(&err, TierError::InvalidConfig(m) if m.contains("geometry mismatch")),
            "{err}"
        );
    }
    ShmView::open(&path, g).unwrap();
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn open_error(path: &Path, g: BlockGeometry) -> String {
    match ShmView::open(path, g) {
        Err(TierError::InvalidConfig(m)) => m,
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("a damaged file opened"),
    }
}

#[test]
fn shm_view_rejects_damaged_headers() {
    let dir = shm_dir();
    let g = geometry(4096);

    // A flipped geometry byte fails the checksum.
    let (_p, path) = shm_pool(dir.path(), g, 2);
    patch(&path, 16, &[0xff]);
    assert!(open_error(&path, g).contains("checksum"));

    // Another magic.
    let (_p, path) = shm_pool(dir.path(), g, 2);
    patch(&path, 0, b"NOTAPOOL");
    assert!(open_error(&path, g).contains("magic"));

    // Another format version, with a checksum that matches it.
    let (_p, path) = shm_pool(dir.path(), g, 2);
    let mut header = std::fs::read(&path).unwrap()[..72].to_vec();
    header[8..12].copy_from_slice(&2u32.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&header[..64]);
    header[64..72].copy_from_slice(&sum.to_le_bytes());
    patch(&path, 0, &header);
    assert!(open_error(&path, g).contains("version 2"));

    // A file cut short.
    let (_p, path) = shm_pool(dir.path(), g, 2);
    let copy = dir.path().join("cut");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&copy, &bytes[..bytes.len() - 1]).unwrap();
    assert!(open_error(&copy, g).contains("truncated"));
    std::fs::write(&copy, &bytes[..100]).unwrap();
    assert!(open_error(&copy, g).contains("no header"));

    // Not a pool at all; no file at all.
    std::fs::write(&copy, vec![0u8; 3 * 4096]).unwrap();
    assert!(open_error(&copy, g).contains("magic"));
    assert!(matches!(
        ShmView::open(dir.path().join("missing"), g),
        Err(TierError::Io(_))
    ));
}

#[test]
fn shm_pool_recreated_at_a_path_leaves_old_views_intact() {
    let dir = shm_dir();
    let g = geometry(4096);
    let (first, path) = shm_pool(dir.path(), g, 2);
    let slot = first.allocate().unwrap();
    first.write(slot, &pattern(4096, slot.0, 1), &[]).unwrap();
    let old_view = ShmView::open(&path, g).unwrap();

    let (second, again) = shm_pool(dir.path(), g, 2);
    assert_eq!(again, path);
    let new_view = ShmView::open(&path, g).unwrap();
    assert!(new_view.block(slot).unwrap().iter().all(|&b| b == 0));
    assert_eq!(check_pattern(old_view.block(slot).unwrap(), slot.0), 1);

    // Dropping the first pool must not remove the second one's file.
    drop(first);
    assert!(path.exists());
    drop(second);
    assert!(!path.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn shm_pool_without_prefault_or_huge_pages() {
    let dir = shm_dir();
    let g = geometry(4096);
    let config = HostPoolConfig::builder(g)
        .capacity_bytes(4096 * 3)
        .shared_memory(dir.path().join("lazy"))
        .prefault(false)
        .huge_pages(false)
        .build()
        .unwrap();
    let p = HostPool::new(config).unwrap();
    pool_contract::round_trip(&p);
    pool_contract::stress(&p, 2, 500);
}

#[test]
fn shm_pool_in_a_missing_directory_is_an_io_error() {
    let dir = shm_dir();
    let config = HostPoolConfig::builder(geometry(4096))
        .capacity_bytes(4096)
        .shared_memory(dir.path().join("no/such/dir/pool"))
        .build()
        .unwrap();
    assert!(matches!(HostPool::new(config), Err(TierError::Io(_))));
}

mod model {
    //! The pool's slot states against a naive model, over random sequences
    //! of allocate / write / read / borrow / drop borrow / free.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Allocate,
        Write(u32),
        Read(u32),
        Borrow(u32),
        DropBorrow(usize),
        Free(u32),
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Free,
        Reserved,
        Readable(u64),
        Retiring,
    }

    fn no_such_slot<T>(r: &Result<T, TierError>) -> bool {
        matches!(r, Err(TierError::NoSuchSlot { .. }))
    }

    const SLOTS: u32 = 4;
    const LEN: usize = 64;

    fn op() -> impl Strategy<Value = Op> {
        // Slot numbers reach one past the end to cover NoSuchSlot.
        prop_oneof![
            3 => Just(Op::Allocate),
            3 => (0..=SLOTS).prop_map(Op::Write),
            2 => (0..=SLOTS).prop_map(Op::Read),
            2 => (0..=SLOTS).prop_map(Op::Borrow),
            2 => (0..8usize).prop_map(Op::DropBorrow),
            3 => (0..=SLOTS).prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
            let p = pool(LEN, SLOTS as usize);
            let mut states = [State::Free; SLOTS as usize];
            let mut pins = [0u32; SLOTS as usize];
            let mut borrows = Vec::new();
            let mut generation = 0u64;
            let mut out = vec![0u8; LEN];
            for op in ops {
                match op {
                    Op::Allocate => match p.allocate() {
                        Ok(s) => {
                            prop_assert_eq!(states[s.0 as usize], State::Free);
                            states[s.0 as usize] = State::Reserved;
                        }
                        Err(TierError::Full) => {
                            prop_assert!(!states.contains(&State::Free));
                        }
                        Err(e) => prop_assert!(false, "allocate: {}", e),
                    },
                    Op::Write(s) => {
                        generation += 1;
                        let r = p.write(SlotId(s), &pattern(LEN, s, generation), &[]);
                        match states.get(s as usize) {
                            None => prop_assert!(no_such_slot(&r)),
                            Some(State::Reserved) => {
                                prop_assert!(r.is_ok());
                                states[s as usize] = State::Readable(generation);
                            }
                            Some(_) => prop_assert!(matches!(r, Err(TierError::Empty(_)))),
                        }
                    }
                    Op::Read(s) | Op::Borrow(s) => {
                        let got = if matches!(op, Op::Read(_)) {
                            p.read(SlotId(s), &mut out).map(|()| out.clone())
                        } else {
                            p.block(SlotId(s)).map(|b| {
                                let bytes = b.to_vec();
                                borrows.push(b);
                                bytes
                            })
                        };
                        match states.get(s as usize) {
                            None => prop_assert!(no_such_slot(&got)),
                            Some(State::Readable(g)) => {
                                prop_assert_eq!(got.unwrap(), pattern(LEN, s, *g));
                                if matches!(op, Op::Borrow(_)) {
                                    pins[s as usize] += 1;
                                }
                            }
                            Some(_) => prop_assert!(matches!(got, Err(TierError::Empty(_)))),
                        }
                    }
                    Op::DropBorrow(i) => {
                        if i < borrows.len() {
                            let b = borrows.swap_remove(i);
                            let s = b.slot().0 as usize;
                            drop(b);
                            pins[s] -= 1;
                            if pins[s] == 0 && states[s] == State::Retiring {
                                states[s] = State::Free;
                            }
                        }
                    }
                    Op::Free(s) => {
                        p.free(SlotId(s));
                        if let Some(state) = states.get_mut(s as usize) {
                            *state = match *state {
                                State::Reserved => State::Free,
                                State::Readable(_) if pins[s as usize] == 0 => State::Free,
                                State::Readable(_) => State::Retiring,
                                other => other,
                            };
                        }
                    }
                }
                let used = states.iter().filter(|s| **s != State::Free).count();
                prop_assert_eq!(p.used() as usize, used);
                for b in &borrows {
                    // A live borrow always sees the block it borrowed.
                    check_pattern(b, b.slot().0);
                }
            }
            drop(borrows);
            prop_assert!(p.used() as usize <= SLOTS as usize);
        }
    }
}
