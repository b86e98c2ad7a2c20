//! Host tier copy speed against plain memcpy.
//!
//! For each block size, one group measures three copies of the same bytes:
//! `memcpy` (`copy_from_slice` between two caller buffers), `store`
//! (allocate a slot, write the caller's buffer into it, free it) and `load`
//! (read a written slot into a caller's buffer), so the ratios come from
//! one run on one machine. Target: store and load ≥ 80% of memcpy.
//!
//! `host/*` reuses one source, one destination and one slot, so the bytes
//! stay in cache. `host-cold/*` rotates through 64 MiB of sources, slots
//! and destinations (more than the last-level cache of the reference
//! machine), so memcpy, store and load all run at memory speed.

mod common;

use common::{pattern, SIZES};
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tiers::host::{HostPool, HostPoolConfig};
use tiers::{BlockGeometry, BlockPool};

fn host_copies(c: &mut Criterion) {
    for (size, label) in SIZES {
        let geometry = BlockGeometry::new(size, 256, 0xbe7c).expect("geometry");
        let config = HostPoolConfig::builder(geometry)
            .capacity_bytes(4 * size)
            .build()
            .expect("config");
        let pool = HostPool::new(config).expect("pool");
        let src = pattern(size);
        let mut dst = vec![0u8; size];

        let mut group = c.benchmark_group(format!("host/{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Bytes(size as u64));

        group.bench_function(BenchmarkId::from_parameter("memcpy"), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&mut dst);
            })
        });

        group.bench_function(BenchmarkId::from_parameter("store"), |b| {
            b.iter(|| {
                let slot = pool.allocate().expect("a free slot");
                pool.write(slot, black_box(&src), b"meta").expect("write");
                pool.free(slot);
            })
        });

        let slot = pool.allocate().expect("a free slot");
        pool.write(slot, &src, b"meta").expect("write");
        pool.read(slot, &mut dst).expect("read");
        assert!(dst == src, "load returned other bytes");
        group.bench_function(BenchmarkId::from_parameter("load"), |b| {
            b.iter(|| {
                pool.read(black_box(slot), &mut dst).expect("read");
                black_box(&mut dst);
            })
        });
        group.finish();
    }
}

/// Working set of each side of the cold copies.
const COLD_BYTES: usize = 64 << 20;

fn host_copies_cold(c: &mut Criterion) {
    for (size, label) in [SIZES[1], SIZES[3]] {
        let n = COLD_BYTES / size;
        let geometry = BlockGeometry::new(size, 256, 0xbe7c).expect("geometry");
        let config = HostPoolConfig::builder(geometry)
            .capacity_bytes(n * size)
            .build()
            .expect("config");
        let pool = HostPool::new(config).expect("pool");
        let srcs: Vec<Vec<u8>> = (0..n).map(|_| pattern(size)).collect();
        let mut dsts: Vec<Vec<u8>> = (0..n).map(|_| vec![1u8; size]).collect();
        // Every slot written once, so that the load side reads real blocks.
        let mut slots: Vec<_> = (0..n)
            .map(|i| {
                let slot = pool.allocate().expect("a free slot");
                pool.write(slot, &srcs[i], b"meta").expect("write");
                slot
            })
            .collect();
        pool.read(slots[n - 1], &mut dsts[n - 1]).expect("read");
        assert!(dsts[n - 1] == srcs[n - 1], "load returned other bytes");

        let mut group = c.benchmark_group(format!("host-cold/{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Bytes(size as u64));

        let mut i = 0;
        group.bench_function(BenchmarkId::from_parameter("memcpy"), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                dsts[i].copy_from_slice(black_box(&srcs[i]));
            })
        });

        // With every other slot held, a freed slot is the next one handed
        // out, so store rotates through all slots.
        group.bench_function(BenchmarkId::from_parameter("store"), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                pool.free(slots[i]);
                slots[i] = pool.allocate().expect("a free slot");
                pool.write(slots[i], black_box(&srcs[i]), b"meta")
                    .expect("write");
            })
        });

        group.bench_function(BenchmarkId::from_parameter("load"), |b| {
            b.iter(|| {
                i = (i + 1) % n;
                pool.read(black_box(slots[i]), &mut dsts[i]).expect("read");
            })
        });
        assert!(
            dsts.iter().all(|d| d == &srcs[0]),
            "load returned other bytes"
        );
        group.finish();
    }
}

criterion_group!(benches, host_copies, host_copies_cold);
criterion_main!(benches);
