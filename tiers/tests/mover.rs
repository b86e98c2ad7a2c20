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
