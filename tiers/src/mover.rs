//! Moves blocks between pools on worker threads, so demotion, promotion and
//! prefetch never block the caller: each move hands back a [`Ticket`] that
//! the caller polls or waits on while it does its own work.

use crate::{BlockCopy, BlockPool, Result, SlotId, TierError};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One block to copy: read `slot` of `from`, write it with `meta` into a
/// newly allocated slot of `to`.
#[derive(Debug, Clone)]
pub struct Move {
    pub from: Arc<dyn BlockPool>,
    pub slot: SlotId,
    pub to: Arc<dyn BlockPool>,
    pub meta: Vec<u8>,
}

struct Job {
    moves: Vec<Move>,
    done: Sender<Vec<Result<SlotId>>>,
}

/// The outcome of a batch of moves, one result per move in order: the slot
/// written in the destination pool, or why it failed (in which case
/// nothing was left allocated there).
#[derive(Debug)]
pub struct Ticket {
    rx: Receiver<Vec<Result<SlotId>>>,
    ready: Option<Vec<Result<SlotId>>>,
}

impl Ticket {
    /// True once every move of the batch has finished.
    pub fn is_done(&mut self) -> bool {
        if self.ready.is_none() {
            if let Ok(r) = self.rx.try_recv() {
                self.ready = Some(r);
            }
        }
        self.ready.is_some()
    }

    /// Waits for the batch and returns its results.
    pub fn wait(mut self) -> Vec<Result<SlotId>> {
        if let Some(r) = self.ready.take() {
            return r;
        }
        // A worker that panicked dropped the sender: report it as failures.
        self.rx.recv().unwrap_or_default()
    }
}

/// Counters of the moves done.
#[derive(Debug, Default)]
pub struct MoverStats {
    pub blocks_moved: AtomicU64,
    pub bytes_moved: AtomicU64,
    pub failures: AtomicU64,
}

/// A pool of worker threads that copy blocks between pools.
#[derive(Debug)]
pub struct Mover {
    tx: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<MoverStats>,
}

impl Mover {
    /// Starts `workers` threads (at least one).
    pub fn new(workers: usize) -> Self {
        let (tx, rx) = unbounded::<Job>();
        let stats = Arc::new(MoverStats::default());
        let workers = (0..workers.max(1))
            .map(|i| {
                let rx = rx.clone();
                let stats = stats.clone();
                std::thread::Builder::new()
                    .name(format!("radixkv-mover-{i}"))
                    .spawn(move || worker(rx, stats))
                    .expect("spawning a mover thread")
            })
            .collect();
        Self {
            tx: Some(tx),
            workers,
            stats,
        }
    }

    pub fn stats(&self) -> &MoverStats {
        &self.stats
    }

    /// Queues a batch of moves; they run in order on one worker.
    pub fn submit(&self, moves: Vec<Move>) -> Ticket {
        let (done, rx) = bounded(1);
        let job = Job { moves, done };
        if let Some(tx) = &self.tx {
            // The workers live as long as `self`, so the queue is open.
            let _ = tx.send(job);
        }
        Ticket { rx, ready: None }
    }

    /// Runs one move on the calling thread.
    pub fn move_now(m: &Move) -> Result<SlotId> {
        let mut results = copy_group(std::slice::from_ref(m), &mut Vec::new());
        results.pop().expect("copy_group answers every move")
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        // Closing the queue lets each worker finish its jobs and exit.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(rx: Receiver<Job>, stats: Arc<MoverStats>) {
    let mut buf = Vec::new();
    for job in rx {
        let mut results = Vec::with_capacity(job.moves.len());
        // Moves between the same two pools go together, so the destination
        // can write adjacent slots in one transfer (see `copy_group`).
        for group in job
            .moves
            .chunk_by(|a, b| Arc::ptr_eq(&a.from, &b.from) && Arc::ptr_eq(&a.to, &b.to))
        {
            let bytes = group[0].from.geometry().block_bytes as u64;
            for r in copy_group(group, &mut buf) {
                match &r {
                    Ok(_) => {
                        stats.blocks_moved.fetch_add(1, Ordering::Relaxed);
                        stats.bytes_moved.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                results.push(r);
            }
        }
        // The caller may have dropped its ticket: nobody waits, that's fine.
        let _ = job.done.send(results);
    }
}

/// Copies moves that share their source and destination pools: allocates
/// every destination slot first, then hands the whole batch to the
/// source's [`copy_many_into`](BlockPool::copy_many_into). One result per
/// move, in order; a failed move leaves nothing allocated.
fn copy_group(group: &[Move], buf: &mut Vec<u8>) -> Vec<Result<SlotId>> {
    let (from, to) = (&group[0].from, &group[0].to);
    let bytes = from.geometry().block_bytes;
    if bytes != to.geometry().block_bytes {
        let expected = to.geometry().block_bytes;
        return group
            .iter()
            .map(|_| {
                Err(TierError::WrongLength {
                    got: bytes,
                    expected,
                })
            })
            .collect();
    }
    buf.resize(bytes, 0);
    let dests: Vec<Result<SlotId>> = group.iter().map(|_| to.allocate()).collect();
    let copies: Vec<BlockCopy<'_>> = group
        .iter()
        .zip(&dests)
        .filter_map(|(m, d)| {
            Some(BlockCopy {
                slot: m.slot,
                dest: *d.as_ref().ok()?,
                meta: &m.meta,
            })
        })
        .collect();
    let mut copied = from.copy_many_into(&copies, &**to, buf).into_iter();
    dests
        .into_iter()
        .map(|d| {
            let dest = d?;
            match copied.next().expect("copy_many_into answers every copy") {
                Ok(()) => Ok(dest),
                Err(e) => {
                    to.free(dest);
                    Err(e)
                }
            }
        })
        .collect()
}
