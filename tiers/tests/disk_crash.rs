//! A real crash in the middle of writes: this test binary re-executes
//! itself as a child process that writes, frees and reads blocks in a loop
//! (two threads), logging each step; the parent SIGKILLs it at a random
//! moment, reopens the pool and checks that
//! - every recovered block reads back `Ok` and byte-exact with what its
//!   metadata says it should be (nothing torn is served),
//! - every block whose write had returned and that was not being freed is
//!   recovered, and no block whose free had returned comes back.
//!
//! The kill delays come from a seed printed at the start; set
//! `RADIXKV_DISK_CRASH_SEED` to replay one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiers::disk::{DiskPool, DiskPoolConfig};
use tiers::io::{AlignedBuf, RealIo};
use tiers::{BlockGeometry, BlockPool, BlockWrite, SlotId, TierError};

const CHILD_DIR: &str = "RADIXKV_DISK_CRASH_CHILD";
const CHILD_LOG: &str = "RADIXKV_DISK_CRASH_LOG";
const CHILD_MODE: &str = "RADIXKV_DISK_CRASH_MODE";
const CHILD_ITER: &str = "RADIXKV_DISK_CRASH_ITER";

const BLOCK: usize = 32 << 10;
const SLOTS: u64 = 48;

fn geometry() -> BlockGeometry {
    BlockGeometry::new(BLOCK, 128, 0xC0FFEE).unwrap()
}

fn config(dir: &Path, buffered: bool) -> DiskPoolConfig {
    let g = geometry();
    let slot = DiskPoolConfig::builder(dir, g)
        .capacity_bytes(1 << 40)
        .build()
        .unwrap()
        .slot_bytes();
    let io = if buffered {
        RealIo::buffered()
    } else {
        RealIo::new()
    };
    DiskPoolConfig::builder(dir, g)
        .capacity_bytes(SLOTS * slot)
        .max_file_bytes(12 * slot)
        .journal_compact_bytes(8 << 10) // compact often, so kills land in it
        .io(io.shared())
        .build()
        .unwrap()
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The block for (slot, tag): the parent recomputes it from the metadata.
fn block_bytes(slot: SlotId, tag: u64) -> Vec<u8> {
    let mut x = mix(tag ^ ((slot.0 as u64) << 48)) | 1;
    (0..BLOCK / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Metadata: the tag, then `tag % 64` bytes derived from it.
fn meta_of(tag: u64) -> Vec<u8> {
    let mut m = tag.to_le_bytes().to_vec();
    m.extend((0..tag % 64).map(|i| mix(tag + i) as u8));
    m
}

fn tag_of(meta: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(meta.get(..8)?.try_into().ok()?);
    (meta_of(tag) == meta).then_some(tag)
}

// ---- the child -----------------------------------------------------------

/// The writer process. Does nothing unless the parent test started this
/// binary with `RADIXKV_DISK_CRASH_CHILD` set.
#[test]
fn crash_child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let log_path = std::env::var(CHILD_LOG).unwrap();
    let buffered = std::env::var(CHILD_MODE).unwrap() == "buffered";
    let iter: u64 = std::env::var(CHILD_ITER).unwrap().parse().unwrap();
    let log = Arc::new(Mutex::new(
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(log_path)
            .unwrap(),
    ));
    // One `write` per line on an O_APPEND file: a line is in the file (page
    // cache) as soon as it returns, and a kill keeps whole lines or none.
    let say = |log: &mut File, line: String| log.write_all(line.as_bytes()).unwrap();

    let (pool, recovered) = DiskPool::open(config(Path::new(&dir), buffered)).unwrap();
    let pool = Arc::new(pool);
    let mut owned: [Vec<(SlotId, u64)>; 2] = [Vec::new(), Vec::new()];
    {
        let mut l = log.lock().unwrap();
        for r in &recovered {
            let tag = tag_of(&r.meta).expect("recovered metadata is ours");
            say(&mut l, format!("L {} {tag}\n", r.slot.0));
            owned[(r.slot.0 % 2) as usize].push((r.slot, tag));
        }
        say(&mut l, "READY\n".into());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        for (t, mut mine) in owned.into_iter().enumerate() {
            let pool = pool.clone();
            let log = log.clone();
            s.spawn(move || {
                let mut counter = 0u64;
                let mut rng = mix(iter * 7 + t as u64 + 1);
                let mut aligned = AlignedBuf::zeroed(BLOCK);
                while Instant::now() < deadline {
                    rng = mix(rng);
                    counter += 1;
                    let tag = (iter << 40) | ((t as u64) << 32) | counter;
                    if (rng % 4 == 0 || mine.len() >= (SLOTS / 2) as usize) && !mine.is_empty() {
                        let (slot, old) = mine.remove((rng >> 8) as usize % mine.len());
                        // Free and log under the log lock, so the next owner's
                        // lines for this slot come after ours.
                        let mut l = log.lock().unwrap();
                        say(&mut l, format!("f {} {old}\n", slot.0));
                        pool.free(slot);
                        say(&mut l, format!("F {} {old}\n", slot.0));
                        continue;
                    }
                    if rng % 3 == 0 {
                        // A batch of adjacent (or not) slots through
                        // `write_many`, as the mover demotes: each block is
                        // journaled only after the I/O that carried it.
                        let n = 2 + (rng >> 16) as usize % 7;
                        let mut batch: Vec<(SlotId, u64, AlignedBuf)> = Vec::new();
                        {
                            let mut l = log.lock().unwrap();
                            for i in 0..n as u64 {
                                let Ok(slot) = pool.allocate() else { break };
                                let tag = tag | (i << 24);
                                say(&mut l, format!("B {} {tag}\n", slot.0));
                                let mut buf = AlignedBuf::zeroed(BLOCK);
                                buf.copy_from_slice(&block_bytes(slot, tag));
                                batch.push((slot, tag, buf));
                            }
                        }
                        let metas: Vec<Vec<u8>> =
                            batch.iter().map(|(_, tag, _)| meta_of(*tag)).collect();
                        let writes: Vec<BlockWrite<'_>> = batch
                            .iter()
                            .zip(&metas)
                            .map(|((slot, _, buf), meta)| BlockWrite {
                                slot: *slot,
                                data: buf,
                                meta,
                            })
                            .collect();
                        for r in pool.write_many(&writes) {
                            r.unwrap();
                        }
                        let mut l = log.lock().unwrap();
                        for (slot, tag, _) in batch {
                            say(&mut l, format!("W {} {tag}\n", slot.0));
                            mine.push((slot, tag));
                        }
                        continue;
                    }
                    let slot = {
                        let mut l = log.lock().unwrap();
                        match pool.allocate() {
                            Ok(slot) => {
                                say(&mut l, format!("B {} {tag}\n", slot.0));
                                slot
                            }
                            Err(TierError::Full) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    };
                    let data = block_bytes(slot, tag);
                    if rng % 2 == 0 {
                        aligned.copy_from_slice(&data);
                        pool.write(slot, &aligned, &meta_of(tag)).unwrap();
                    } else {
                        pool.write(slot, &data, &meta_of(tag)).unwrap();
                    }
                    say(&mut log.lock().unwrap(), format!("W {} {tag}\n", slot.0));
                    mine.push((slot, tag));
                    if rng % 5 == 0 {
                        let mut out = vec![0u8; BLOCK];
                        pool.read(slot, &mut out).unwrap();
                        assert!(out == data, "child read back other bytes");
                    }
                }
            });
        }
    });
}

// ---- the parent ----------------------------------------------------------

/// What the log says about a slot when the child died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Write of this tag begun, not known to have returned.
    Writing(u64),
    /// Holds this tag.
    Live(u64),
    /// Free of this tag begun, not known to have returned.
    Freeing(u64),
}

/// Applies one child's log to the model of the pool.
fn apply_log(log: &str, model: &mut HashMap<u32, Known>) -> (usize, bool) {
    let mut writes = 0;
    let mut ready = false;
    for line in log.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break; // the kill cut this line (cannot happen with one write, but be safe)
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts == ["READY"] {
            ready = true;
            continue;
        }
        let [op, slot, tag] = parts[..] else {
            panic!("bad log line {line:?}");
        };
        let slot: u32 = slot.parse().unwrap();
        let tag: u64 = tag.parse().unwrap();
        let prev = model.get(&slot).copied();
        match op {
            "L" => assert_eq!(prev, Some(Known::Live(tag)), "child recovered other blocks"),
            "B" => {
                assert_eq!(prev, None, "slot {slot} allocated while in use");
                model.insert(slot, Known::Writing(tag));
            }
            "W" => {
                assert_eq!(prev, Some(Known::Writing(tag)));
                model.insert(slot, Known::Live(tag));
                writes += 1;
            }
            "f" => {
                assert_eq!(prev, Some(Known::Live(tag)));
                model.insert(slot, Known::Freeing(tag));
            }
            "F" => {
                assert_eq!(prev, Some(Known::Freeing(tag)));
                model.remove(&slot);
            }
            _ => panic!("bad log line {line:?}"),
        }
    }
    (writes, ready)
}

#[test]
fn sigkill_mid_write_never_serves_torn_blocks() {
    let start = Instant::now();
    let seed: u64 = std::env::var("RADIXKV_DISK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test seed {seed} (RADIXKV_DISK_CRASH_SEED to replay)");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("pool");
    let exe = std::env::current_exe().unwrap();
    let mut model: HashMap<u32, Known> = HashMap::new();
    let mut total_writes = 0;
    let mut in_flight_seen = 0;
    let mut rng = seed;
    for iter in 1..=8u64 {
        let buffered = iter % 2 == 0;
        let log_path = root.path().join(format!("log-{iter}.txt"));
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir)
            .env(CHILD_LOG, &log_path)
            .env(CHILD_MODE, if buffered { "buffered" } else { "direct" })
            .env(CHILD_ITER, iter.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until it has opened the pool, then let it run a random while.
        let ready_by = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("READY\n")
        {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("child exited early ({status}): {err}");
            }
            assert!(Instant::now() < ready_by, "child never became ready");
            std::thread::sleep(Duration::from_millis(2));
        }
        rng = mix(rng);
        let delay = Duration::from_micros(2_000 + rng % 250_000);
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("child died before the kill ({status}): {err}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let log = std::fs::read_to_string(&log_path).unwrap();
        let (writes, ready) = apply_log(&log, &mut model);
        assert!(ready);
        total_writes += writes;

        let (pool, recovered) = DiskPool::open(config(&dir, false)).unwrap();
        let mut got: HashMap<u32, u64> = HashMap::new();
        for r in &recovered {
            let tag = tag_of(&r.meta).expect("recovered metadata is one we wrote");
            let mut out = AlignedBuf::zeroed(BLOCK);
            pool.read(r.slot, &mut out)
                .unwrap_or_else(|e| panic!("iteration {iter}: recovered {:?}: {e}", r.slot));
            assert!(
                out[..] == block_bytes(r.slot, tag)[..],
                "iteration {iter}: slot {:?} is not the block its metadata names",
                r.slot
            );
            got.insert(r.slot.0, tag);
        }
        for slot in 0..SLOTS as u32 {
            let ok = match (model.get(&slot), got.get(&slot)) {
                (None, None) => true,
                (Some(Known::Live(t)), Some(g)) => t == g,
                (Some(Known::Writing(t) | Known::Freeing(t)), g) => {
                    in_flight_seen += 1;
                    g.is_none() || g == Some(t)
                }
                _ => false,
            };
            assert!(
                ok,
                "iteration {iter}, slot {slot}: log says {:?}, recovered {:?}",
                model.get(&slot),
                got.get(&slot)
            );
        }
        assert_eq!(pool.corrupt_blocks(), 0);
        println!(
            "iteration {iter} ({}): killed after {delay:?}, {writes} writes, {} blocks recovered",
            if buffered { "buffered" } else { "O_DIRECT" },
            recovered.len()
        );
        drop(pool);
        // The next child starts from what was recovered.
        model = got.into_iter().map(|(s, t)| (s, Known::Live(t))).collect();
    }
    println!("{total_writes} writes in all, {in_flight_seen} slots in flight at a kill");
    assert!(total_writes > 0);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
}
