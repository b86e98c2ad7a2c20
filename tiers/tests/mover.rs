//! The mover copies blocks between pools on worker threads; tickets resolve
//! asynchronously, failures leave nothing allocated in the destination.

use crossbeam_channel::{bounded, Receiver};
use parking_lot::Mutex;
use std::sync::Arc;
use tiers::mover::{Move, Mover};
use tiers::{BlockGeometry, BlockPool, Medium, Result, SlotId, TierError};

/// A stored block and its metadata.
type Stored = Option<(Vec<u8>, Vec<u8>)>;

/// A small in-memory pool; its reads can be held back by a gate so a test
/// controls when a move's I/O completes.
#[derive(Debug)]
struct TestPool {
    medium: Medium,
    geometry: BlockGeometry,
    slots: Mutex<Vec<Stored>>,
    free: Mutex<Vec<u32>>,
    gate: Option<Receiver<()>>,
    fail_writes: bool,
}

impl TestPool {
    fn new(medium: Medium, capacity: u32) -> Self {
        Self {
            medium,
            geometry: BlockGeometry::new(64, 16, 7).unwrap(),
            slots: Mutex::new(vec![None; capacity as usize]),
            free: Mutex::new((0..capacity).rev().collect()),
            gate: None,
            fail_writes: false,
        }
    }
}

impl BlockPool for TestPool {
    fn medium(&self) -> Medium {
        self.medium
    }
    fn geometry(&self) -> &BlockGeometry {
        &self.geometry
    }
    fn capacity(&self) -> u32 {
        self.slots.lock().len() as u32
    }
    fn used(&self) -> u32 {
        self.capacity() - self.free.lock().len() as u32
    }
    fn allocate(&self) -> Result<SlotId> {
        self.free.lock().pop().map(SlotId).ok_or(TierError::Full)
    }
    fn write(&self, slot: SlotId, data: &[u8], meta: &[u8]) -> Result<()> {
        if self.fail_writes {
            return Err(TierError::Io(std::io::ErrorKind::StorageFull.into()));
        }
        self.slots.lock()[slot.0 as usize] = Some((data.to_vec(), meta.to_vec()));
        Ok(())
    }
    fn read(&self, slot: SlotId, out: &mut [u8]) -> Result<()> {
        if let Some(gate) = &self.gate {
            gate.recv().expect("the test opens the gate");
        }
        let slots = self.slots.lock();
        let (data, _) = slots[slot.0 as usize]
            .as_ref()
            .ok_or(TierError::Empty(slot))?;
        out.copy_from_slice(data);
        Ok(())
    }
    fn free(&self, slot: SlotId) {
        self.slots.lock()[slot.0 as usize] = None;
        self.free.lock().push(slot.0);
    }
}

fn block(seed: u8) -> Vec<u8> {
    (0..64)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i))
        .collect()
}

#[test]
fn moves_copy_bytes_and_metadata() {
    let from: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Host, 8));
    let to = Arc::new(TestPool::new(Medium::Disk, 8));
    let to_dyn: Arc<dyn BlockPool> = to.clone();
    let mut moves = Vec::new();
    for i in 0..4u8 {
        let s = from.allocate().unwrap();
        from.write(s, &block(i), &[i]).unwrap();
        moves.push(Move {
            from: from.clone(),
            slot: s,
            to: to_dyn.clone(),
            meta: vec![i, 100],
        });
    }
    let mover = Mover::new(2);
    let results = mover.submit(moves).wait();
    assert_eq!(results.len(), 4);
    for (i, r) in results.into_iter().enumerate() {
        let dest = r.unwrap();
        let mut out = vec![0; 64];
        to.read(dest, &mut out).unwrap();
        assert_eq!(out, block(i as u8));
        assert_eq!(
            to.slots.lock()[dest.0 as usize].as_ref().unwrap().1,
            vec![i as u8, 100]
        );
    }
    assert_eq!(
        mover
            .stats()
            .blocks_moved
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[test]
fn the_caller_runs_while_a_move_is_in_flight() {
    let (open, gate) = bounded(0);
    let mut slow = TestPool::new(Medium::Disk, 4);
    slow.gate = Some(gate);
    let slow = Arc::new(slow);
    let s = slow.allocate().unwrap();
    slow.slots.lock()[s.0 as usize] = Some((block(9), vec![]));
    let to: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Host, 4));
    let mover = Mover::new(1);
    let mut ticket = mover.submit(vec![Move {
        from: slow.clone(),
        slot: s,
        to,
        meta: vec![],
    }]);
    // The read is blocked on the gate: the caller keeps working meanwhile.
    let mut work = 0u64;
    for i in 0..1000u64 {
        work = work.wrapping_add(i * i);
        assert!(
            !ticket.is_done(),
            "the move cannot finish before its read does"
        );
    }
    assert!(work > 0);
    open.send(()).unwrap();
    let results = ticket.wait();
    assert!(results[0].is_ok());
}

#[test]
fn a_failed_write_leaves_nothing_allocated() {
    let from: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Host, 2));
    let mut full = TestPool::new(Medium::Disk, 2);
    full.fail_writes = true;
    let full = Arc::new(full);
    let s = from.allocate().unwrap();
    from.write(s, &block(1), &[]).unwrap();
    let mover = Mover::new(1);
    let r = mover
        .submit(vec![Move {
            from: from.clone(),
            slot: s,
            to: full.clone(),
            meta: vec![],
        }])
        .wait();
    assert!(matches!(r[0], Err(TierError::Io(_))));
    assert_eq!(full.used(), 0, "the destination slot was given back");
    assert_eq!(
        mover
            .stats()
            .failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A move into a full pool fails with Full, and a read of an empty slot with Empty.
    let tiny: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Disk, 0));
    let r = Mover::move_now(&Move {
        from: from.clone(),
        slot: s,
        to: tiny,
        meta: vec![],
    });
    assert!(matches!(r, Err(TierError::Full)));
    from.free(s);
    let r = Mover::move_now(&Move {
        from: from.clone(),
        slot: s,
        to: full,
        meta: vec![],
    });
    assert!(matches!(r, Err(TierError::Empty(_))));
}

#[test]
fn a_batch_from_host_to_disk_goes_in_few_large_writes_and_mixed_pools_keep_their_order() {
    use tiers::disk::{DiskPool, DiskPoolConfig};
    use tiers::host::{HostPool, HostPoolConfig};
    let g = BlockGeometry::new(16 << 10, 64, 3).unwrap();
    let host = Arc::new(
        HostPool::new(
            HostPoolConfig::builder(g)
                .capacity_bytes(64 * g.block_bytes)
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(
        DiskPool::open(
            DiskPoolConfig::builder(dir.path(), g)
                .capacity_bytes(64 << 20)
                .build()
                .unwrap(),
        )
        .unwrap()
        .0,
    );
    let other: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Disk, 8));
    let small: Arc<dyn BlockPool> = Arc::new(TestPool::new(Medium::Host, 8));
    let data = |i: usize| -> Vec<u8> { (0..g.block_bytes).map(|b| (b / 64 + i) as u8).collect() };
    let mut moves = Vec::new();
    for i in 0..32 {
        let s = host.allocate().unwrap();
        host.write(s, &data(i), &[]).unwrap();
        moves.push(Move {
            from: host.clone(),
            slot: s,
            to: disk.clone(),
            meta: vec![i as u8],
        });
    }
    // A move between other pools in the middle, with its own block size:
    // it fails on its own and splits the batch in two groups.
    let s = small.allocate().unwrap();
    small.write(s, &block(7), &[]).unwrap();
    moves.insert(
        16,
        Move {
            from: small.clone(),
            slot: s,
            to: other.clone(),
            meta: vec![],
        },
    );
    moves.insert(
        17,
        Move {
            from: host.clone(),
            slot: moves[0].slot,
            to: other.clone(),
            meta: vec![],
        },
    );
    let before = disk.stats();
    let results = Mover::new(1).submit(moves).wait();
    assert_eq!(results.len(), 34);
    assert!(results[16].is_ok(), "{:?}", results[16]);
    assert!(matches!(results[17], Err(TierError::WrongLength { .. })));
    let stats = disk.stats();
    assert_eq!(stats.writes - before.writes, 32);
    assert!(
        stats.write_ios - before.write_ios <= 2,
        "32 adjacent blocks in {} writes",
        stats.write_ios - before.write_ios
    );
    let to_disk = results
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != 16 && k != 17);
    for (i, (_, r)) in to_disk.enumerate() {
        let mut out = vec![0u8; g.block_bytes];
        disk.read(*r.as_ref().unwrap(), &mut out).unwrap();
        assert_eq!(out, data(i), "block {i}");
    }
}
