//! Checks of the `BlockPool` contract that every in-memory pool must pass;
//! `tests/host.rs` and `tests/device.rs` run them on their pools.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::RwLock;

use tiers::{BlockPool, SlotId, TierError};

/// Deterministic bytes for a block: a 16-byte header naming the slot and
/// generation, then a stream seeded by both. A torn or misplaced block
/// fails [`check_pattern`].
pub fn pattern(len: usize, slot: u32, generation: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pattern(&mut out, slot, generation);
    out
}

pub fn fill_pattern(out: &mut [u8], slot: u32, generation: u64) {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&slot.to_le_bytes());
    head[8..].copy_from_slice(&generation.to_le_bytes());
    let n = out.len().min(16);
    out[..n].copy_from_slice(&head[..n]);
    let mut state = (u64::from(slot) << 40) ^ generation ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[n..].chunks_mut(8) {
        state = splitmix(state);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Checks that `bytes` is a whole block written by [`pattern`] for
/// `slot`, and returns its generation.
pub fn check_pattern(bytes: &[u8], slot: u32) -> u64 {
    assert!(bytes.len() >= 16, "blocks under 16 bytes carry no header");
    let got_slot = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    let generation = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert_eq!(got_slot, slot, "block names another slot");
    let expected = pattern(bytes.len(), slot, generation);
    assert!(
        bytes == expected,
        "torn or corrupt block in slot {slot} (generation {generation})"
    );
    generation
}

/// A small PRNG for the stress tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = splitmix(self.0);
        self.0 % n
    }
}

pub fn block_bytes(pool: &dyn BlockPool) -> usize {
    pool.geometry().block_bytes
}

/// Store then read returns the same bytes, for several slots at once.
pub fn round_trip(pool: &dyn BlockPool) {
    let len = block_bytes(pool);
    let slots: Vec<SlotId> = (0..pool.capacity().min(3))
        .map(|_| pool.allocate().unwrap())
        .collect();
    for (i, &slot) in slots.iter().enumerate() {
        pool.write(slot, &pattern(len, slot.0, i as u64), b"meta")
            .unwrap();
    }
    let mut out = vec![0u8; len];
    for (i, &slot) in slots.iter().enumerate() {
        pool.read(slot, &mut out).unwrap();
        assert_eq!(check_pattern(&out, slot.0), i as u64);
    }
    for slot in slots {
        pool.free(slot);
    }
    assert_eq!(pool.used(), 0);
}

/// Reads of slots holding nothing are `Empty`; outside the pool, `NoSuchSlot`.
pub fn empty_reads(pool: &dyn BlockPool) {
    let len = block_bytes(pool);
    let mut out = vec![0u8; len];
    let slot = pool.allocate().unwrap();
    assert!(matches!(pool.read(slot, &mut out), Err(TierError::Empty(s)) if s == slot));
    pool.write(slot, &pattern(len, slot.0, 1), &[]).unwrap();
    pool.read(slot, &mut out).unwrap();
    pool.free(slot);
    assert!(matches!(
        pool.read(slot, &mut out),
        Err(TierError::Empty(_))
    ));
    let outside = SlotId(pool.capacity());
    assert!(matches!(
        pool.read(outside, &mut out),
        Err(TierError::NoSuchSlot { slot, capacity }) if slot == outside && capacity == pool.capacity()
    ));
    assert!(matches!(
        pool.write(outside, &out, &[]),
        Err(TierError::NoSuchSlot { .. })
    ));
    pool.free(outside); // no effect
    assert_eq!(pool.used(), 0);
}

/// Wrong lengths and oversize metadata are errors that leave the slot
/// writable and unreadable.
pub fn bad_arguments(pool: &dyn BlockPool) {
    let len = block_bytes(pool);
    let limit = pool.geometry().max_meta_bytes;
    let slot = pool.allocate().unwrap();
    let good = pattern(len, slot.0, 7);
    for bad_len in [0, len - 1, len + 1] {
        let data = vec![0u8; bad_len];
        assert!(matches!(
            pool.write(slot, &data, &[]),
            Err(TierError::WrongLength { got, expected }) if got == bad_len && expected == len
        ));
    }
    let meta = vec![0u8; limit + 1];
    assert!(matches!(
        pool.write(slot, &good, &meta),
        Err(TierError::MetaTooLarge { got, limit: l }) if got == limit + 1 && l == limit
    ));
    let mut out = vec![0u8; len];
    assert!(matches!(
        pool.read(slot, &mut out),
        Err(TierError::Empty(_))
    ));
    pool.write(slot, &good, &vec![1u8; limit]).unwrap();
    let mut short = vec![0u8; len - 1];
    assert!(matches!(
        pool.read(slot, &mut short),
        Err(TierError::WrongLength { .. })
    ));
    pool.read(slot, &mut out).unwrap();
    assert_eq!(out, good);
    pool.free(slot);
}

/// A slot is written once per allocation; writing a free slot is refused.
pub fn write_once(pool: &dyn BlockPool) {
    let len = block_bytes(pool);
    let slot = pool.allocate().unwrap();
    let first = pattern(len, slot.0, 1);
    pool.write(slot, &first, &[]).unwrap();
    assert!(matches!(
        pool.write(slot, &pattern(len, slot.0, 2), &[]),
        Err(TierError::Empty(_))
    ));
    let mut out = vec![0u8; len];
    pool.read(slot, &mut out).unwrap();
    assert_eq!(out, first);
    pool.free(slot);
    assert!(matches!(
        pool.write(slot, &first, &[]),
        Err(TierError::Empty(_))
    ));
}

/// `Full` when every slot is out; a freed slot can be allocated again;
/// double frees change nothing.
pub fn full_then_free(pool: &dyn BlockPool) {
    let capacity = pool.capacity();
    let mut slots: Vec<SlotId> = (0..capacity).map(|_| pool.allocate().unwrap()).collect();
    assert_eq!(pool.used(), capacity);
    let mut ids: Vec<u32> = slots.iter().map(|s| s.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..capacity).collect::<Vec<_>>(), "each slot once");
    assert!(matches!(pool.allocate(), Err(TierError::Full)));
    let victim = slots.pop().unwrap();
    pool.free(victim);
    pool.free(victim);
    assert_eq!(pool.used(), capacity - 1);
    let again = pool.allocate().unwrap();
    assert_eq!(again, victim);
    assert!(matches!(pool.allocate(), Err(TierError::Full)));
    slots.push(again);
    for slot in slots {
        pool.free(slot);
    }
    assert_eq!(pool.used(), 0);
}

/// Threads allocate, write, read and free at random. Readers read other
/// threads' blocks while holding a shared "lease" (a read lock the owner
/// must take exclusively to retire the block), and check the exact
/// generation and every byte. Slots are never handed to two owners and
/// `used` never exceeds the capacity. Write errors (from fault-injecting
/// backends) must leave the slot unreadable.
pub fn stress(pool: &dyn BlockPool, threads: usize, steps: usize) {
    let capacity = pool.capacity();
    let len = block_bytes(pool);
    let owned: Vec<AtomicBool> = (0..capacity).map(|_| AtomicBool::new(false)).collect();
    let live = AtomicU32::new(0);
    let published = RwLock::new(HashMap::<u32, u64>::new());
    let next_generation = AtomicU64::new(1);
    let reads_checked = AtomicU64::new(0);
    let write_faults = AtomicU64::new(0);

    std::thread::scope(|scope| {
        for t in 0..threads {
            let (owned, live, published) = (&owned, &live, &published);
            let (next_generation, reads_checked, write_faults) =
                (&next_generation, &reads_checked, &write_faults);
            scope.spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let mut held: Vec<SlotId> = Vec::new();
                let mut buf = vec![0u8; len];
                let release = |slot: SlotId| {
                    published.write().unwrap().remove(&slot.0);
                    assert!(owned[slot.0 as usize].swap(false, Ordering::SeqCst));
                    live.fetch_sub(1, Ordering::SeqCst);
                    pool.free(slot);
                };
                for _ in 0..steps {
                    assert!(pool.used() <= capacity);
                    match rng.below(10) {
                        0..=3 => match pool.allocate() {
                            Ok(slot) => {
                                assert!(
                                    !owned[slot.0 as usize].swap(true, Ordering::SeqCst),
                                    "slot {slot:?} handed out twice"
                                );
                                assert!(live.fetch_add(1, Ordering::SeqCst) < capacity);
                                if rng.below(8) == 0 {
                                    // Injected caller fault: a short buffer.
                                    let short = &buf[..len - 1];
                                    assert!(matches!(
                                        pool.write(slot, short, &[]),
                                        Err(TierError::WrongLength { .. })
                                    ));
                                }
                                let generation = next_generation.fetch_add(1, Ordering::Relaxed);
                                fill_pattern(&mut buf, slot.0, generation);
                                match pool.write(slot, &buf, &[]) {
                                    Ok(()) => {
                                        published.write().unwrap().insert(slot.0, generation);
                                        held.push(slot);
                                    }
                                    Err(TierError::Device(_)) => {
                                        write_faults.fetch_add(1, Ordering::Relaxed);
                                        assert!(matches!(
                                            pool.read(slot, &mut buf),
                                            Err(TierError::Empty(_))
                                        ));
                                        release(slot);
                                    }
                                    Err(e) => panic!("write failed: {e}"),
                                }
                            }
                            Err(TierError::Full) => {
                                if !held.is_empty() {
                                    let i = rng.below(held.len() as u64) as usize;
                                    release(held.swap_remove(i));
                                } else {
                                    std::thread::yield_now();
                                }
                            }
                            Err(e) => panic!("allocate failed: {e}"),
                        },
                        4..=7 => {
                            let lease = published.read().unwrap();
                            if lease.is_empty() {
                                continue;
                            }
                            let pick = rng.below(lease.len() as u64) as usize;
                            let (&slot, &generation) = lease.iter().nth(pick).unwrap();
                            match pool.read(SlotId(slot), &mut buf) {
                                Ok(()) => {
                                    assert_eq!(check_pattern(&buf, slot), generation);
                                    reads_checked.fetch_add(1, Ordering::Relaxed);
                                }
                                // Read faults from a fault-injecting backend.
                                Err(TierError::Device(_)) => {}
                                Err(e) => panic!("leased read of slot {slot} failed: {e}"),
                            }
                        }
                        _ => {
                            if !held.is_empty() {
                                let i = rng.below(held.len() as u64) as usize;
                                release(held.swap_remove(i));
                            }
                        }
                    }
                }
                for slot in held.drain(..) {
                    release(slot);
                }
            });
        }
    });
    assert_eq!(pool.used(), 0, "every slot back on the free list");
    assert!(
        reads_checked.load(Ordering::Relaxed) > 0,
        "the stress test read nothing"
    );
    // Every slot can be allocated again.
    full_then_free(pool);
}
