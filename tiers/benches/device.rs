//! The GPU tier's copies against the copy engine's own speed (cargo
//! feature `cuda`; prints that it skipped where there is no GPU).
//!
//! For each block size, one group measures, on the same pool:
//! - `dma_h2d` / `dma_d2h`: the baseline, back-to-back async copies between
//!   one pinned host buffer and GPU memory on one stream
//!   ([`CudaBackend::pinned_copy_time`]);
//! - `store`: allocate a slot, copy a caller's (pageable) buffer into it
//!   through the pool's pinned staging lanes, free it;
//! - `load`: copy a written slot out into a caller's buffer.
//!
//! After the criterion groups, the same four (and a host memcpy of the
//! same bytes, the CPU half of a staged copy) run interleaved for a second
//! per block size and staging chunk size, and a table prints each pool copy
//! as a fraction of its baseline, so the ratios do not depend on load
//! drifting between criterion's runs. A last table does the same for moves
//! between a DMA-registered host tier and the GPU, as the cache's mover
//! makes them (`copy_into`): one DMA each, no staging.
//!
//! Run: `cargo bench -p tiers --features cuda --bench device`.

mod common;

use common::{pattern, SIZES};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use tiers::cuda::{CopyDirection, CudaPool};
use tiers::device::DevicePoolConfig;
use tiers::{BlockGeometry, BlockPool};

/// Staging chunk sizes the paired table compares (the pool's default is
/// one of them).
const CHUNKS: [usize; 3] = [64 << 10, 256 << 10, 1 << 20];

fn pool(size: usize) -> Option<CudaPool> {
    pool_with(size, None)
}

fn pool_with(size: usize, chunk: Option<usize>) -> Option<CudaPool> {
    let geometry = BlockGeometry::new(size, 256, 0xde71).expect("geometry");
    let mut config = DevicePoolConfig::builder(geometry).capacity_bytes(4 * size);
    if let Some(chunk) = chunk {
        config = config.staging_chunk_bytes(chunk);
    }
    let config = config.build().expect("config");
    match CudaPool::new(config) {
        Ok(p) => Some(p),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn baseline(p: &CudaPool, size: usize, iters: u64, dir: CopyDirection) -> Duration {
    p.backend()
        .pinned_copy_time(size, iters, dir)
        .expect("baseline copy")
}

fn device_copies(c: &mut Criterion, pools: &[(usize, &'static str, CudaPool)]) {
    for (size, label, pool) in pools {
        let size = *size;
        let src = pattern(size);
        let mut dst = vec![0u8; size];
        let mut group = c.benchmark_group(format!("device/{label}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter("dma_h2d"), |b| {
            b.iter_custom(|iters| baseline(pool, size, iters, CopyDirection::ToDevice))
        });
        group.bench_function(BenchmarkId::from_parameter("store"), |b| {
            b.iter(|| {
                let slot = pool.allocate().expect("a free slot");
                pool.write(slot, black_box(&src), b"meta").expect("write");
                pool.free(slot);
            })
        });
        group.bench_function(BenchmarkId::from_parameter("dma_d2h"), |b| {
            b.iter_custom(|iters| baseline(pool, size, iters, CopyDirection::FromDevice))
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
        pool.free(slot);
        group.finish();
    }
}

/// GB/s of each of the four, and of a plain host memcpy of the same bytes
/// (the CPU half of a staged copy), interleaved in rounds of `batch` ops.
fn paired(pool: &CudaPool, size: usize) -> [f64; 5] {
    let src = pattern(size);
    let mut dst = vec![0u8; size];
    let batch = (64 << 20) / size as u64;
    let mut time = [Duration::ZERO; 5];
    let end = Instant::now() + Duration::from_secs(1);
    let mut rounds = 0u64;
    while Instant::now() < end {
        time[0] += baseline(pool, size, batch, CopyDirection::ToDevice);
        let t = Instant::now();
        for _ in 0..batch {
            let slot = pool.allocate().expect("a free slot");
            pool.write(slot, &src, b"meta").expect("write");
            pool.free(slot);
        }
        time[1] += t.elapsed();
        time[2] += baseline(pool, size, batch, CopyDirection::FromDevice);
        let slot = pool.allocate().expect("a free slot");
        pool.write(slot, &src, b"meta").expect("write");
        let t = Instant::now();
        for _ in 0..batch {
            pool.read(slot, &mut dst).expect("read");
        }
        time[3] += t.elapsed();
        pool.free(slot);
        let t = Instant::now();
        for _ in 0..batch {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }
        time[4] += t.elapsed();
        rounds += 1;
    }
    assert!(dst == src, "load returned other bytes");
    let bytes = (rounds * batch * size as u64) as f64;
    time.map(|t| bytes / t.as_secs_f64() / 1e9)
}

/// GB/s of moves between an attached (DMA-registered) host tier and the
/// GPU, as the cache's mover makes them, beside the pinned DMA baselines:
/// [dma_h2d, host->gpu, dma_d2h, gpu->host].
fn moves(size: usize) -> Option<[f64; 4]> {
    let pool = pool(size)?;
    let geometry = *pool.geometry();
    let host = std::sync::Arc::new(
        tiers::host::HostPool::new(
            tiers::host::HostPoolConfig::builder(geometry)
                .capacity_bytes(4 * size)
                .build()
                .expect("host config"),
        )
        .expect("host pool"),
    );
    assert!(pool.attach_host(&host).expect("registering the host tier"));
    let mut buf = vec![0u8; size];
    let src = host.allocate().expect("a host slot");
    host.write(src, &pattern(size), b"meta").expect("write");
    let on_gpu = pool.allocate().expect("a device slot");
    host.copy_into(src, &pool, on_gpu, b"meta", &mut buf)
        .expect("host -> gpu");
    let batch = (64 << 20) / size as u64;
    let mut time = [Duration::ZERO; 4];
    let end = Instant::now() + Duration::from_secs(1);
    let mut rounds = 0u64;
    while Instant::now() < end {
        time[0] += baseline(&pool, size, batch, CopyDirection::ToDevice);
        let t = Instant::now();
        for _ in 0..batch {
            let d = pool.allocate().expect("a device slot");
            host.copy_into(src, &pool, d, b"meta", &mut buf)
                .expect("host -> gpu");
            pool.free(d);
        }
        time[1] += t.elapsed();
        time[2] += baseline(&pool, size, batch, CopyDirection::FromDevice);
        let t = Instant::now();
        for _ in 0..batch {
            let h = host.allocate().expect("a host slot");
            pool.copy_into(on_gpu, &*host, h, b"meta", &mut buf)
                .expect("gpu -> host");
            host.free(h);
        }
        time[3] += t.elapsed();
        rounds += 1;
    }
    assert!(pool.backend().direct_copies() > 0, "moves went straight");
    let bytes = (rounds * batch * size as u64) as f64;
    Some(time.map(|t| bytes / t.as_secs_f64() / 1e9))
}

fn main() {
    let pools: Vec<_> = SIZES
        .iter()
        .filter_map(|&(size, label)| pool(size).map(|p| (size, label, p)))
        .collect();
    if pools.is_empty() {
        return;
    }
    println!("CUDA device: {}", pools[0].2.backend().device_name());
    let mut criterion = Criterion::default().configure_from_args();
    device_copies(&mut criterion, &pools);
    criterion.final_summary();

    println!("\npaired, GB/s (pool copy as a fraction of the pinned DMA baseline):");
    println!(
        "{:>8} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>9}",
        "block", "staging", "dma_h2d", "store", "ratio", "dma_d2h", "load", "ratio", "memcpy"
    );
    for &(size, label) in &SIZES {
        for chunk in CHUNKS.into_iter().filter(|&c| c <= size) {
            let Some(pool) = pool_with(size, Some(chunk)) else {
                continue;
            };
            let [h2d, store, d2h, load, memcpy] = paired(&pool, size);
            println!(
                "{label:>8} {:>7}K {h2d:>9.2} {store:>9.2} {:>6.2} {d2h:>9.2} {load:>9.2} {:>6.2} {memcpy:>9.2}",
                chunk >> 10,
                store / h2d,
                load / d2h
            );
        }
    }

    println!("\nmoves with the host tier attached (one DMA each), GB/s:");
    println!(
        "{:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6}",
        "block", "dma_h2d", "host>gpu", "ratio", "dma_d2h", "gpu>host", "ratio"
    );
    for &(size, label) in &SIZES {
        let Some([h2d, up, d2h, down]) = moves(size) else {
            continue;
        };
        println!(
            "{label:>8} {h2d:>9.2} {up:>9.2} {:>6.2} {d2h:>9.2} {down:>9.2} {:>6.2}",
            up / h2d,
            down / d2h
        );
    }
}
