//! The device tier: the `BlockPool` contract on the simulated device (runs
//! everywhere), with an injected-fault backend, and on a real GPU through
//! `CudaPool` (feature `cuda`; skipped, saying so, where there is none).

#[path = "support/pool_contract.rs"]
mod pool_contract;

use std::sync::atomic::{AtomicU64, Ordering};

use pool_contract::pattern;
use tiers::device::{
    DeviceBackend, DevicePool, DevicePoolConfig, SimulatedBackend, SimulatedDevice,
    DEVICE_SLOT_ALIGN,
};
use tiers::{BlockGeometry, BlockPool, Medium, Result, TierError};

fn config(block_bytes: usize, slots: usize) -> DevicePoolConfig {
    let g = BlockGeometry::new(block_bytes, 64, 0xd3_u64).unwrap();
    DevicePoolConfig::builder(g)
        .capacity_bytes(block_bytes * slots)
        .build()
        .unwrap()
}

fn simulated(block_bytes: usize, slots: usize) -> SimulatedDevice {
    SimulatedDevice::new(config(block_bytes, slots)).unwrap()
}

#[test]
fn medium_capacity_and_layout() {
    let p = simulated(1000, 5);
    assert_eq!(p.medium(), Medium::Device);
    assert_eq!(p.capacity(), 5);
    assert_eq!(p.slot_stride(), 1024);
    assert_eq!(p.slot_offset(tiers::SlotId(3)).unwrap(), 3 * 1024);
    assert_eq!(p.slot_stride() % DEVICE_SLOT_ALIGN, 0);
    assert!(p.slot_offset(tiers::SlotId(5)).is_err());

    let g = BlockGeometry::new(1000, 0, 0).unwrap();
    for (bytes, lanes, chunk) in [(999, 1, 1), (1000, 0, 1), (1000, 1, 0)] {
        let err = DevicePoolConfig::builder(g)
            .capacity_bytes(bytes)
            .lanes(lanes)
            .staging_chunk_bytes(chunk)
            .build()
            .unwrap_err();
        assert!(matches!(err, TierError::InvalidConfig(_)), "{err}");
    }
    // A staging chunk is never larger than a block.
    let c = DevicePoolConfig::builder(g)
        .capacity_bytes(1000)
        .staging_chunk_bytes(1 << 20)
        .build()
        .unwrap();
    assert_eq!(c.staging_chunk_bytes(), 1000);
}

#[test]
fn backend_too_small_is_refused() {
    let c = config(4096, 4);
    let small = SimulatedBackend::new(c.slab_bytes() - 1).unwrap();
    assert!(matches!(
        DevicePool::with_backend(&c, small),
        Err(TierError::InvalidConfig(_))
    ));
}

#[test]
fn round_trip() {
    pool_contract::round_trip(&simulated(4096, 4));
    pool_contract::round_trip(&simulated(100, 3));
}

#[test]
fn empty_reads() {
    pool_contract::empty_reads(&simulated(4096, 4));
}

#[test]
fn bad_arguments() {
    pool_contract::bad_arguments(&simulated(4096, 2));
}

#[test]
fn write_once() {
    pool_contract::write_once(&simulated(512, 2));
}

#[test]
fn full_then_free() {
    pool_contract::full_then_free(&simulated(512, 7));
}

#[test]
fn stress() {
    pool_contract::stress(&simulated(4096 + 16, 8), 4, 3_000);
}

/// A backend that fails every `every`-th copy in and out.
#[derive(Debug)]
struct Faulty {
    inner: SimulatedBackend,
    every: u64,
    calls: AtomicU64,
}

impl Faulty {
    fn new(c: &DevicePoolConfig, every: u64) -> Self {
        Self {
            inner: SimulatedBackend::new(c.slab_bytes()).unwrap(),
            every,
            calls: AtomicU64::new(0),
        }
    }

    fn fault(&self) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed) % self.every == self.every - 1
    }
}

impl DeviceBackend for Faulty {
    fn slab_bytes(&self) -> usize {
        self.inner.slab_bytes()
    }

    unsafe fn copy_in(&self, offset: usize, data: &[u8]) -> Result<()> {
        if self.fault() {
            // Half a copy, then the failure: the block must stay unreadable.
            // SAFETY: forwarded under the caller's contract, on a sub-range.
            unsafe { self.inner.copy_in(offset, &data[..data.len() / 2]) }?;
            return Err(TierError::Device("injected copy-in fault".into()));
        }
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.copy_in(offset, data) }
    }

    unsafe fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        if self.fault() {
            return Err(TierError::Device("injected copy-out fault".into()));
        }
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.copy_out(offset, out) }
    }
}

#[test]
fn failed_write_leaves_the_slot_empty_and_reusable() {
    let c = config(4096, 2);
    let p = DevicePool::with_backend(&c, Faulty::new(&c, 1)).unwrap();
    let slot = p.allocate().unwrap();
    let data = pattern(4096, slot.0, 1);
    assert!(matches!(
        p.write(slot, &data, &[]),
        Err(TierError::Device(_))
    ));
    let mut out = vec![0u8; 4096];
    assert!(matches!(p.read(slot, &mut out), Err(TierError::Empty(_))));
    p.free(slot);
    assert_eq!(p.used(), 0);
}

#[test]
fn stress_with_injected_faults() {
    let c = config(2048, 6);
    let p = DevicePool::with_backend(&c, Faulty::new(&c, 7)).unwrap();
    pool_contract::stress(&p, 4, 2_000);
}

/// A host pool of `slots` blocks with the device pools' geometry.
fn host(block_bytes: usize, slots: usize) -> std::sync::Arc<tiers::host::HostPool> {
    let g = BlockGeometry::new(block_bytes, 64, 0xd3_u64).unwrap();
    let config = tiers::host::HostPoolConfig::builder(g)
        .capacity_bytes(block_bytes * slots)
        .build()
        .unwrap();
    std::sync::Arc::new(tiers::host::HostPool::new(config).unwrap())
}

/// Moves a block host → device → host with `copy_into` (the mover's way)
/// and checks the bytes; a source that cannot be read leaves the
/// destination empty and reusable.
fn host_device_moves(host: &tiers::host::HostPool, device: &dyn BlockPool) {
    let bb = host.geometry().block_bytes;
    let mut buf = vec![0u8; bb];
    let block = pattern(bb, 7, 1);
    let h = host.allocate().unwrap();
    host.write(h, &block, b"meta").unwrap();
    let d = device.allocate().unwrap();
    host.copy_into(h, device, d, b"meta", &mut buf).unwrap();
    let back = host.allocate().unwrap();
    device.copy_into(d, host, back, b"meta", &mut buf).unwrap();
    assert!(
        *host.block(back).unwrap() == block[..],
        "host -> device -> host"
    );
    // A free source slot: the copy fails and the destination stays empty.
    let empty = host.allocate().unwrap();
    let d2 = device.allocate().unwrap();
    assert!(host.copy_into(empty, device, d2, b"", &mut buf).is_err());
    assert!(matches!(
        device.read(d2, &mut buf),
        Err(TierError::Empty(_))
    ));
    device.free(d2);
    let h2 = host.allocate().unwrap();
    assert!(device.copy_into(d2, host, h2, b"", &mut buf).is_err());
    assert!(host.block(h2).is_err(), "a failed fill publishes nothing");
    for slot in [h, back, empty, h2] {
        host.free(slot);
    }
    device.free(d);
}

#[test]
fn moves_between_host_and_device() {
    let host = host(4096, 8);
    let device = simulated(4096, 4);
    assert!(
        !device.attach_host(&host).unwrap(),
        "the stand-in has no DMA"
    );
    host_device_moves(&host, &device);
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::pool_contract;
    use tiers::cuda::CudaPool;
    use tiers::device::DevicePoolConfig;
    use tiers::{BlockGeometry, BlockPool, Medium};

    /// The GPU pool, or `None` (after saying so) where there is no GPU.
    fn gpu_pool(block_bytes: usize, slots: usize, chunk: usize, lanes: usize) -> Option<CudaPool> {
        let g = BlockGeometry::new(block_bytes, 64, 0xc0da).unwrap();
        let config = DevicePoolConfig::builder(g)
            .capacity_bytes(block_bytes * slots)
            .staging_chunk_bytes(chunk)
            .lanes(lanes)
            .build()
            .unwrap();
        match CudaPool::new(config) {
            Ok(pool) => {
                println!("CUDA device: {}", pool.backend().device_name());
                Some(pool)
            }
            Err(e) => {
                println!("skipped: no CUDA device ({e})");
                None
            }
        }
    }

    #[test]
    fn cuda_contract() {
        let Some(p) = gpu_pool(64 << 10, 8, 1 << 20, 2) else {
            return;
        };
        assert_eq!(p.medium(), Medium::Device);
        pool_contract::round_trip(&p);
        pool_contract::empty_reads(&p);
        pool_contract::bad_arguments(&p);
        pool_contract::write_once(&p);
        pool_contract::full_then_free(&p);
    }

    /// Blocks spanning several staging chunks, with a ragged last chunk,
    /// exercise the double-buffered pipeline both ways.
    #[test]
    fn cuda_multi_chunk_blocks() {
        let block = (3 << 20) + 1000;
        let Some(p) = gpu_pool(block, 4, 1 << 20, 1) else {
            return;
        };
        pool_contract::round_trip(&p);
        let Some(p) = gpu_pool(block, 4, 4096, 2) else {
            return;
        };
        pool_contract::round_trip(&p);
    }

    #[test]
    fn cuda_stress() {
        let Some(p) = gpu_pool((256 << 10) + 256, 8, 64 << 10, 2) else {
            return;
        };
        pool_contract::stress(&p, 4, 500);
    }

    /// With the host tier attached, moves between it and the GPU are one
    /// DMA each (no staging), and exact.
    #[test]
    fn cuda_moves_with_an_attached_host_tier() {
        let Some(p) = gpu_pool((256 << 10) + 4096, 4, 64 << 10, 2) else {
            return;
        };
        let host = super::host((256 << 10) + 4096, 8);
        super::host_device_moves(&host, &p);
        assert_eq!(p.backend().direct_copies(), 0, "not attached yet");
        assert!(p.attach_host(&host).unwrap());
        assert!(p.attach_host(&host).unwrap(), "attaching twice is fine");
        super::host_device_moves(&host, &p);
        assert!(
            p.backend().direct_copies() >= 2,
            "host <-> GPU moves went straight: {}",
            p.backend().direct_copies()
        );
        drop(host); // the pool keeps the registered memory alive
        pool_contract::round_trip(&p);
    }

    #[test]
    fn cuda_missing_ordinal_is_an_error() {
        let g = BlockGeometry::new(4096, 0, 0).unwrap();
        let config = DevicePoolConfig::builder(g)
            .capacity_bytes(4096)
            .ordinal(1 << 20)
            .build()
            .unwrap();
        let err = CudaPool::new(config).unwrap_err();
        assert!(matches!(err, tiers::TierError::Device(_)), "{err}");
    }
}
