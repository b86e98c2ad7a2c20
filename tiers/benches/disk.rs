//! Criterion benchmarks of the disk tier against the raw device.
//!
//! - `load/{pool,pool_unaligned,raw_odirect}/{64KiB,256KiB,1MiB,2MiB}`:
//!   `DiskPool::read` of a block into a 4096-aligned buffer (in place), into
//!   an unaligned one (through the bounce buffer), and a plain `O_DIRECT`
//!   `pread` of the same size from a file in the same directory (the
//!   baseline). Blocks are read round-robin over a 256 MiB working set, so
//!   consecutive reads are sequential on the device; `O_DIRECT` keeps the
//!   page cache out. Target: `pool` at least 70% of `raw_odirect`.
//! - `store/...`: `free` + `allocate` + `DiskPool::write` (so the journal's
//!   Free and Put records are included) against an `O_DIRECT` `pwrite`.
//! - Per size, after its criterion groups: the three ways again,
//!   interleaved op by op for 1.5 s, so that the pool/raw ratios printed
//!   at the end do not depend on background load drifting between
//!   criterion's runs. Then the recovery time of a pool holding 100k blocks of 4 KiB
//!   (journal replay; and with `verify_on_open`, which reads every slot).
//!
//! Files live in a temporary directory beside the bench binary (the target
//! directory, a real file system), or in `RADIXKV_BENCH_DIR`.
//!
//! Run: `cargo bench -p tiers --bench disk`.

mod common;

use common::SIZES;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use tiers::disk::{DiskPool, DiskPoolConfig};
use tiers::io::AlignedBuf;
use tiers::{BlockGeometry, BlockPool, SlotId};

const WORKING_SET: usize = 256 << 20;
const META: usize = 64;

/// One row of the paired measurement: (op, size label, pool, pool
/// unaligned, raw), in GB/s.
type Row = (&'static str, &'static str, f64, f64, f64);

static PAIRED: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// Time for each (op, size) of the paired measurement.
const PAIRED_TIME: Duration = Duration::from_millis(1500);

/// Runs `pool`, `unaligned` and `raw` in turn (rotating which goes first)
/// until `PAIRED_TIME` has passed, and returns the bandwidth of each in
/// GB/s. Interleaving keeps the ratio honest on a machine whose background
/// load drifts.
fn paired(
    size: usize,
    mut pool: impl FnMut(),
    mut unaligned: impl FnMut(),
    mut raw: impl FnMut(),
) -> (f64, f64, f64) {
    let mut t = [Duration::ZERO; 3];
    let mut rounds = 0u64;
    let start = Instant::now();
    while start.elapsed() < PAIRED_TIME || rounds < 5 {
        for k in 0..3 {
            let which = (k + rounds as usize) % 3;
            let s = Instant::now();
            match which {
                0 => pool(),
                1 => unaligned(),
                _ => raw(),
            }
            t[which] += s.elapsed();
        }
        rounds += 1;
    }
    let gbps = |d: Duration| rounds as f64 * size as f64 / d.as_secs_f64() / 1e9;
    (gbps(t[0]), gbps(t[1]), gbps(t[2]))
}

fn bench_root() -> PathBuf {
    if let Some(d) = std::env::var_os("RADIXKV_BENCH_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn raw_file(path: &Path, len: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("O_DIRECT open (the bench needs a file system that allows it)");
    f.set_len(len).unwrap();
    f
}

fn io_benches(c: &mut Criterion, dir: &Path) {
    for &(size, label) in &SIZES {
        let n = WORKING_SET / size;
        // The pool, filled once.
        let g = BlockGeometry::new(size, META, 0xBE7C).unwrap();
        let probe = DiskPoolConfig::builder(dir.join("pool"), g)
            .capacity_bytes(1 << 40)
            .build()
            .unwrap();
        let cfg = DiskPoolConfig::builder(dir.join("pool"), g)
            .capacity_bytes(n as u64 * probe.slot_bytes())
            .build()
            .unwrap();
        let (pool, _) = DiskPool::open(cfg).unwrap();
        assert!(pool.is_direct(), "the bench needs O_DIRECT");
        let mut buf = AlignedBuf::zeroed(size);
        let meta = [7u8; META];
        let slots: Vec<SlotId> = (0..n)
            .map(|i| {
                fill(&mut buf, i as u64);
                let s = pool.allocate().unwrap();
                pool.write(s, &buf, &meta).unwrap();
                s
            })
            .collect();
        // The baseline file, written once so reads hit written extents.
        let raw = raw_file(&dir.join("raw.dat"), WORKING_SET as u64);
        for i in 0..n {
            fill(&mut buf, i as u64);
            raw.write_all_at(&buf, (i * size) as u64).unwrap();
        }
        raw.sync_all().unwrap();
        let mut unaligned_store = vec![0u8; size + 64];
        fill(&mut unaligned_store, 1);

        let mut group = c.benchmark_group("load");
        group.throughput(Throughput::Bytes(size as u64));
        let mut i = 0usize;
        group.bench_function(BenchmarkId::new("pool", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    pool.read(slots[i % n], &mut buf).unwrap();
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("pool_unaligned", label), |b| {
            b.iter_custom(|iters| {
                let out = &mut unaligned_store[8..8 + size];
                let t = Instant::now();
                for _ in 0..iters {
                    pool.read(slots[i % n], out).unwrap();
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("raw_odirect", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    raw.read_exact_at(&mut buf, ((i % n) * size) as u64)
                        .unwrap();
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.finish();

        let mut group = c.benchmark_group("store");
        group.throughput(Throughput::Bytes(size as u64));
        let mut slots = slots;
        let mut store = |pool: &DiskPool, data: &[u8], i: usize| {
            let k = i % n;
            pool.free(slots[k]);
            slots[k] = pool.allocate().unwrap();
            pool.write(slots[k], data, &meta).unwrap();
        };
        group.bench_function(BenchmarkId::new("pool", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    store(&pool, &buf, i);
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("pool_unaligned", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    store(&pool, &unaligned_store[8..8 + size], i);
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("raw_odirect", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    raw.write_all_at(&buf, ((i % n) * size) as u64).unwrap();
                    i += 1;
                }
                t.elapsed()
            })
        });
        group.finish();

        // The same three ways, interleaved, for the ratio table.
        let cell = std::cell::RefCell::new((i, buf, unaligned_store));
        let next = |c: &mut (usize, AlignedBuf, Vec<u8>)| {
            c.0 += 1;
            c.0 % n
        };
        let (lp, lu, lr) = paired(
            size,
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                pool.read(slots[k], &mut c.1).unwrap();
            },
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                pool.read(slots[k], &mut c.2[8..8 + size]).unwrap();
            },
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                raw.read_exact_at(&mut c.1, (k * size) as u64).unwrap();
            },
        );
        let slots = std::cell::RefCell::new(slots);
        let store_one = |data: &[u8], k: usize| {
            let mut s = slots.borrow_mut();
            pool.free(s[k]);
            s[k] = pool.allocate().unwrap();
            pool.write(s[k], data, &meta).unwrap();
        };
        let (sp, su, sr) = paired(
            size,
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                store_one(&c.1, k);
            },
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                store_one(&c.2[8..8 + size], k);
            },
            || {
                let c = &mut *cell.borrow_mut();
                let k = next(c);
                raw.write_all_at(&c.1, (k * size) as u64).unwrap();
            },
        );
        PAIRED.lock().unwrap().push(("load", label, lp, lu, lr));
        PAIRED.lock().unwrap().push(("store", label, sp, su, sr));
        assert_eq!(pool.corrupt_blocks(), 0);
        drop(pool);
        drop(raw);
        std::fs::remove_dir_all(dir.join("pool")).unwrap();
        std::fs::remove_file(dir.join("raw.dat")).unwrap();
    }
}

fn print_ratios() {
    let rows = PAIRED.lock().unwrap();
    if rows.is_empty() {
        return;
    }
    println!("\npaired measurement (pool, unaligned pool and raw O_DIRECT interleaved), GB/s:");
    println!(
        "{:<6} {:>8} {:>8} {:>8} {:>7} {:>10}",
        "op", "size", "pool", "raw", "ratio", "unaligned"
    );
    for &(op, label, p, u, r) in rows.iter() {
        println!(
            "{op:<6} {label:>8} {p:>8.2} {r:>8.2} {:>6.0}% {u:>10.2}",
            100.0 * p / r
        );
    }
}

/// Fills a pool with 100k blocks of 4 KiB, closes it, and times reopening.
fn recovery(dir: &Path) {
    const BLOCKS: usize = 100_000;
    let g = BlockGeometry::new(4096, META, 0x4EC0).unwrap();
    let path = dir.join("recovery");
    let builder = || DiskPoolConfig::builder(&path, g);
    let slot_bytes = builder()
        .capacity_bytes(1 << 40)
        .build()
        .unwrap()
        .slot_bytes();
    let cfg = builder()
        .capacity_bytes(BLOCKS as u64 * slot_bytes)
        .build()
        .unwrap();
    let t = Instant::now();
    {
        let (pool, _) = DiskPool::open(cfg.clone()).unwrap();
        let mut buf = AlignedBuf::zeroed(4096);
        let mut meta = [0u8; META];
        for i in 0..BLOCKS {
            fill(&mut buf, i as u64);
            meta[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let s = pool.allocate().unwrap();
            pool.write(s, &buf, &meta).unwrap();
        }
        pool.close().unwrap();
    }
    println!(
        "\nrecovery: filled {BLOCKS} blocks of 4 KiB ({} MiB of slots) in {:.1?}",
        (BLOCKS as u64 * slot_bytes) >> 20,
        t.elapsed()
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (pool, rec) = DiskPool::open(cfg.clone()).unwrap();
        let e = t.elapsed();
        assert_eq!(rec.len(), BLOCKS);
        let journal = pool.stats().journal_bytes;
        drop(rec);
        drop(pool);
        times.push((e, journal));
    }
    times.sort();
    println!(
        "recovery: open with journal replay, {BLOCKS} blocks: median {:.1?} (min {:.1?}, max {:.1?}), journal {:.1} MiB",
        times[2].0,
        times[0].0,
        times[4].0,
        times[2].1 as f64 / (1 << 20) as f64
    );
    let verify = builder()
        .capacity_bytes(BLOCKS as u64 * slot_bytes)
        .verify_on_open(true)
        .build()
        .unwrap();
    let t = Instant::now();
    let (pool, rec) = DiskPool::open(verify).unwrap();
    let e = t.elapsed();
    assert_eq!(rec.len(), BLOCKS);
    assert_eq!(pool.open_report().dropped, 0);
    println!(
        "recovery: open with verify_on_open (reads every slot): {e:.1?} ({:.2} GB/s)",
        pool.stats().bytes_read as f64 / e.as_secs_f64() / 1e9
    );
    drop(pool);
    std::fs::remove_dir_all(&path).unwrap();
}

fn main() {
    let root = bench_root();
    let dir = tempfile::tempdir_in(&root).unwrap();
    println!("bench files in {}", dir.path().display());
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    if filters.is_empty() || filters.iter().any(|f| !"recovery".contains(f.as_str())) {
        io_benches(&mut c, dir.path());
        c.final_summary();
        print_ratios();
    }
    if filters.is_empty() || filters.iter().any(|f| "recovery".contains(f.as_str())) {
        recovery(dir.path());
    }
}
