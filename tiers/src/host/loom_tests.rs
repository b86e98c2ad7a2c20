//! Loom model checks of the real [`SlotTable`]: every interleaving (up to a
//! bound on preemptions) of two or three threads racing `pin`, `free`,
//! writes, `seal`, `unreserve` and `allocate` over one or two slots.
//!
//! Each slot's bytes are a `loom::cell::UnsafeCell` beside the table,
//! written only where the protocol grants exclusive use (a reserved slot's
//! owner, a `begin_write` … `end_write` writer) and read only under a pin,
//! as `HostPool` does with its mapping: loom fails a test if two of those
//! accesses can overlap, or if the table's memory orderings leave them
//! unordered. After the threads join, the free list is walked and must hold
//! each free slot exactly once, and nothing else, with `used` counting the
//! rest.
//!
//! Run with (debug assertions on, so the table's own checks run too):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
//!     CARGO_TARGET_DIR=target/loom cargo test -p tiers --release --lib loom
//! ```
//!
//! `LOOM_MAX_PREEMPTIONS` overrides the default bound of 3 preemptions
//! (all pass at 6 too, in about a minute).

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicBool;
use loom::sync::Arc;
use loom::thread;

use super::{SlotTable, FREE, NIL, READABLE, RESERVED};
use crate::sync::{AtomicU32, Ordering};
use crate::{Result, SlotId, TierError};

/// Checks `f` under every interleaving loom explores.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// A slot table and the bytes of its slots: the host pool without the
/// mapping.
struct Pool {
    table: SlotTable,
    bytes: Box<[UnsafeCell<u64>]>,
}

// SAFETY: the cells are touched only as the slot protocol allows (written
// by the slot's one owner or writer, read under a pin), which is what these
// tests check: loom panics on any two accesses it can overlap.
unsafe impl Sync for Pool {}

impl Pool {
    fn new(slots: u32) -> Self {
        Self {
            table: SlotTable::new(slots),
            bytes: (0..slots).map(|_| UnsafeCell::new(0)).collect(),
        }
    }

    fn cell(&self, slot: SlotId) -> &UnsafeCell<u64> {
        &self.bytes[slot.0 as usize]
    }

    /// The owner of a reserved slot writing into it in place (as a
    /// shared-memory client does before `seal`).
    fn scribble(&self, slot: SlotId, value: u64) {
        // SAFETY: the caller holds the slot reserved; loom checks that
        // nobody else can be reading or writing it.
        self.cell(slot).with_mut(|p| unsafe { *p = value });
    }

    /// `HostPool::write`: whether the block was published.
    fn write(&self, slot: SlotId, value: u64) -> Result<bool> {
        self.table.begin_write(slot)?;
        // SAFETY: `begin_write` made us the slot's only writer.
        self.cell(slot).with_mut(|p| unsafe { *p = value });
        Ok(self.table.end_write(slot, true))
    }

    /// `HostPool::read`.
    fn read(&self, slot: SlotId) -> Result<u64> {
        self.table.pin(slot)?;
        // SAFETY: pinned readable: no writer until the unpin.
        let value = self.cell(slot).with(|p| unsafe { *p });
        self.table.unpin(slot);
        Ok(value)
    }

    /// The slot's bytes, once every other thread has joined.
    fn peek(&self, slot: SlotId) -> u64 {
        // SAFETY: called only after all threads joined.
        self.cell(slot).with(|p| unsafe { *p })
    }

    fn state(&self, slot: SlotId) -> u64 {
        self.table.states[slot.0 as usize].load(Ordering::Acquire)
    }

    /// Walks the free list (every other thread joined) and checks it
    /// against the states and `used`: each slot on it at most once, exactly
    /// the free slots on it, `used` counting the others. Returns the list.
    fn check_free_list(&self) -> Vec<u32> {
        let t = &self.table;
        let mut list = Vec::new();
        let mut at = t.head.load(Ordering::Acquire) as u32;
        while at != NIL {
            assert!(
                !list.contains(&at),
                "slot {at} twice on the free list {list:?}"
            );
            list.push(at);
            at = t.next[at as usize].load(Ordering::Acquire);
        }
        for slot in 0..t.capacity() {
            let state = self.state(SlotId(slot));
            assert_eq!(
                state == FREE,
                list.contains(&slot),
                "slot {slot} in state {state:#x} vs free list {list:?}"
            );
        }
        assert_eq!(
            t.used() as usize,
            t.capacity() as usize - list.len(),
            "used vs free list {list:?}"
        );
        list
    }
}

/// A pool of one slot holding a published block of `value`.
fn one_readable_slot(value: u64) -> (Arc<Pool>, SlotId) {
    let pool = Arc::new(Pool::new(1));
    let slot = pool.table.allocate().unwrap();
    assert!(matches!(pool.write(slot, value), Ok(true)));
    (pool, slot)
}

/// A reader pins a readable slot while another thread frees it and a third
/// allocates: the allocator never gets the slot while the pin is held, and
/// the last of unpin and free puts it back on the free list exactly once.
#[test]
fn pinned_slot_is_not_handed_out() {
    const OLD: u64 = 1;
    const NEW: u64 = 2;
    model(|| {
        let (pool, slot) = one_readable_slot(OLD);
        let pinned = Arc::new(AtomicBool::new(false));

        let reader = thread::spawn({
            let (pool, pinned) = (pool.clone(), pinned.clone());
            move || {
                pool.table.pin(slot).ok()?;
                pinned.store(true, Ordering::Relaxed);
                // SAFETY: pinned readable: no writer until the unpin.
                let value = pool.cell(slot).with(|p| unsafe { *p });
                pinned.store(false, Ordering::Relaxed);
                pool.table.unpin(slot);
                Some(value)
            }
        });
        let freer = thread::spawn({
            let pool = pool.clone();
            move || pool.table.free(slot)
        });
        let allocator = thread::spawn({
            let (pool, pinned) = (pool.clone(), pinned.clone());
            move || {
                let got = pool.table.allocate().ok()?;
                assert_eq!(got, slot);
                assert!(
                    !pinned.load(Ordering::Relaxed),
                    "slot handed out while pinned"
                );
                assert!(matches!(pool.write(got, NEW), Ok(true)));
                Some(got)
            }
        });
        let read = reader.join().unwrap();
        freer.join().unwrap();
        let got = allocator.join().unwrap();

        // A stale pin after the reallocation may see the new block, never
        // anything half written (loom would have flagged the overlap).
        match read {
            Some(NEW) => assert!(got.is_some()),
            Some(value) => assert_eq!(value, OLD),
            None => {}
        }
        let list = pool.check_free_list();
        if got.is_some() {
            assert!(list.is_empty());
            assert_eq!(pool.state(slot), READABLE);
            assert_eq!(pool.peek(slot), NEW);
        } else {
            assert_eq!(list, [slot.0]);
            assert_eq!(pool.table.allocate().unwrap(), slot);
            assert!(matches!(pool.table.allocate(), Err(TierError::Full)));
        }
    });
}

/// Two readers pin and unpin while the slot is freed: whichever of the
/// three goes last releases it, once.
#[test]
fn last_unpin_releases_once() {
    model(|| {
        let (pool, slot) = one_readable_slot(5);
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                thread::spawn(move || {
                    if let Ok(value) = pool.read(slot) {
                        assert_eq!(value, 5);
                    }
                })
            })
            .collect();
        pool.table.free(slot);
        for reader in readers {
            reader.join().unwrap();
        }
        assert_eq!(pool.check_free_list(), [slot.0]);
        assert!(pool.table.pin(slot).is_err());
        assert_eq!(pool.table.allocate().unwrap(), slot);
        assert!(matches!(pool.table.allocate(), Err(TierError::Full)));
    });
}

/// A free racing a whole write (`begin_write` … `end_write`): the write is
/// refused (freed first), cut short (freed mid-write) or published and then
/// freed, and in every case the slot ends free exactly once, never readable.
#[test]
fn free_racing_write_ends_free() {
    model(|| {
        let pool = Arc::new(Pool::new(1));
        let slot = pool.table.allocate().unwrap();

        let writer = thread::spawn({
            let pool = pool.clone();
            move || pool.write(slot, 7).ok()
        });
        pool.table.free(slot);
        let wrote = writer.join().unwrap();

        assert_eq!(pool.check_free_list(), [slot.0]);
        assert!(pool.table.pin(slot).is_err(), "freed, yet readable");
        // `Some(true)`: published before the free; `Some(false)`: freed
        // mid-write (released by `end_write`); `None`: freed first.
        let _ = wrote;
        assert_eq!(pool.table.allocate().unwrap(), slot);
        assert!(matches!(pool.table.allocate(), Err(TierError::Full)));
    });
}

/// A reader pins while the slot's block is being written and a third
/// thread frees it: the reader gets `Empty` or the whole block (the
/// publication orders the copy before the read), and the slot ends free
/// exactly once whoever goes last.
#[test]
fn pin_races_write_and_free() {
    const WRITTEN: u64 = 7;
    model(|| {
        let pool = Arc::new(Pool::new(1));
        let slot = pool.table.allocate().unwrap();

        let writer = thread::spawn({
            let pool = pool.clone();
            move || pool.write(slot, WRITTEN).ok()
        });
        let reader = thread::spawn({
            let pool = pool.clone();
            move || pool.read(slot).ok()
        });
        pool.table.free(slot);
        let wrote = writer.join().unwrap();
        let read = reader.join().unwrap();

        if let Some(value) = read {
            assert_eq!(value, WRITTEN);
            assert_eq!(wrote, Some(true), "read a block that was never published");
        }
        assert_eq!(pool.check_free_list(), [slot.0]);
        assert!(pool.table.pin(slot).is_err(), "freed, yet readable");
    });
}

/// A slot freed while its write is copying, with a third thread
/// allocating: the slot is not handed out again until the write ends (loom
/// would flag the allocator's write overlapping the copy), the write is
/// not published, and the slot ends reallocated or free, exactly once.
///
/// The write begins before the threads start. A write whose slot id went
/// stale before its `begin_write` (freed and reallocated in between) would
/// claim the new reservation: slot ids carry no generation, so keeping ids
/// fresh is the callers' part (the server hands each reservation to exactly
/// one of commit, cancel or expiry).
#[test]
fn freed_mid_write_is_not_handed_out() {
    const WRITTEN: u64 = 7;
    const OWNER: u64 = 9;
    model(|| {
        let pool = Arc::new(Pool::new(1));
        let slot = pool.table.allocate().unwrap();
        pool.table.begin_write(slot).unwrap();

        let writer = thread::spawn({
            let pool = pool.clone();
            move || {
                // SAFETY: `begin_write` above made this the only writer.
                pool.cell(slot).with_mut(|p| unsafe { *p = WRITTEN });
                pool.table.end_write(slot, true)
            }
        });
        let freer = thread::spawn({
            let pool = pool.clone();
            move || pool.table.free(slot)
        });
        let allocator = thread::spawn({
            let pool = pool.clone();
            move || {
                let got = pool.table.allocate().ok()?;
                pool.scribble(got, OWNER);
                Some(got)
            }
        });
        let published = writer.join().unwrap();
        freer.join().unwrap();
        let got = allocator.join().unwrap();

        let list = pool.check_free_list();
        assert_ne!(pool.state(slot), READABLE, "freed, yet readable");
        match got {
            Some(got) => {
                assert_eq!(got, slot);
                assert!(list.is_empty());
                assert_eq!(pool.state(slot), RESERVED);
                assert_eq!(pool.peek(slot), OWNER);
            }
            None => assert_eq!(list, [slot.0]),
        }
        // Published only if the free came after the write ended.
        let _ = published;
    });
}

/// Allocations and frees racing on the free stack of two slots, set up for
/// ABA (a pop that read `head` and `next` stalls while the other thread
/// pops both slots and pushes the first back): no slot is ever held by two
/// owners, and the stack ends consistent.
#[test]
fn free_stack_hands_out_each_slot_once() {
    model(|| {
        let pool = Arc::new(Pool::new(2));
        let owners = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);

        fn claim(pool: &Pool, owners: &[AtomicU32], slot: SlotId, me: u32) {
            let before = owners[slot.0 as usize].swap(me, Ordering::Relaxed);
            assert_eq!(
                before, 0,
                "slot {slot:?} handed to {me} while {before} held it"
            );
            pool.scribble(slot, u64::from(me));
        }
        fn give_back(pool: &Pool, owners: &[AtomicU32], slot: SlotId) {
            owners[slot.0 as usize].store(0, Ordering::Relaxed);
            pool.table.free(slot);
        }

        // Thread 1: allocate, free, allocate.
        let one = thread::spawn({
            let (pool, owners) = (pool.clone(), owners.clone());
            move || {
                if let Ok(a) = pool.table.allocate() {
                    claim(&pool, &owners[..], a, 1);
                    give_back(&pool, &owners[..], a);
                }
                let b = pool.table.allocate().ok()?;
                claim(&pool, &owners[..], b, 1);
                Some(b)
            }
        });
        // Thread 2: allocate both, free the first.
        let two = thread::spawn({
            let (pool, owners) = (pool.clone(), owners.clone());
            move || {
                let x = pool.table.allocate().ok();
                if let Some(x) = x {
                    claim(&pool, &owners[..], x, 2);
                }
                let y = pool.table.allocate().ok();
                if let Some(y) = y {
                    claim(&pool, &owners[..], y, 2);
                }
                if let Some(x) = x {
                    give_back(&pool, &owners[..], x);
                }
                y
            }
        });
        let held: Vec<(SlotId, u32)> = [(one.join().unwrap(), 1), (two.join().unwrap(), 2)]
            .into_iter()
            .filter_map(|(slot, me)| Some((slot?, me)))
            .collect();

        let list = pool.check_free_list();
        assert_eq!(pool.table.used() as usize, held.len());
        for &(slot, me) in &held {
            assert!(!list.contains(&slot.0));
            assert_eq!(pool.state(slot), RESERVED);
            assert_eq!(owners[slot.0 as usize].load(Ordering::Relaxed), me);
            assert_eq!(pool.peek(slot), u64::from(me));
        }
    });
}

/// `unreserve` racing `seal` on a reserved slot, with a reader trying to
/// pin it: exactly one of the two wins, and the slot ends published or
/// free, never both and never leaked; a reader sees only a sealed block.
#[test]
fn unreserve_races_seal() {
    const CLIENT: u64 = 3;
    model(|| {
        let pool = Arc::new(Pool::new(1));
        let slot = pool.table.allocate().unwrap();
        // The shared-memory client's write in place, before it commits.
        pool.scribble(slot, CLIENT);

        let sealer = thread::spawn({
            let pool = pool.clone();
            move || pool.table.seal(slot).is_ok()
        });
        let unreserver = thread::spawn({
            let pool = pool.clone();
            move || pool.table.unreserve(slot)
        });
        let reader = thread::spawn({
            let pool = pool.clone();
            move || pool.read(slot).ok()
        });
        let sealed = sealer.join().unwrap();
        let unreserved = unreserver.join().unwrap();
        let read = reader.join().unwrap();

        assert_ne!(sealed, unreserved, "exactly one of seal and unreserve wins");
        if let Some(value) = read {
            assert!(sealed, "read a block that was never sealed");
            assert_eq!(value, CLIENT);
        }
        let list = pool.check_free_list();
        if sealed {
            assert!(list.is_empty());
            assert_eq!(pool.state(slot), READABLE);
        } else {
            assert_eq!(list, [slot.0]);
        }
    });
}
