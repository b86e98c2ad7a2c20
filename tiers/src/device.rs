//! The device tier's logic, independent of CUDA.
//!
//! [`DevicePool`] keeps the slot bookkeeping of a GPU-memory pool — the
//! free list, per-slot states (a block is readable only once fully
//! written; a slot is reused only after it is freed and no read is under
//! way), length checks — and leaves moving bytes to a [`DeviceBackend`]:
//! one slab of `capacity × stride` bytes that the pool copies into and out
//! of by offset.
//!
//! Two backends exist:
//! - [`SimulatedBackend`] keeps the slab in host memory, so the device
//!   tier's behaviour ([`SimulatedDevice`]) is testable on any machine;
//! - `CudaBackend` (in `crate::cuda`, cargo feature `cuda`) keeps it in GPU
//!   memory and copies through pinned host staging buffers; its pool is
//!   `CudaPool`.
//!
//! Both are built from one [`DevicePoolConfig`], so callers configure the
//! device tier the same way with or without the feature.
//!
//! The slot states are the host tier's (see [`crate::host`]); metadata
//! records are checked against the geometry's limit but not kept.

use std::fmt;

use crate::host::{round_up, slots_for_budget, Region, SlotTable};
use crate::{BlockGeometry, BlockPool, Medium, Result, SlotId, TierError};

/// Alignment of device slots: every block starts on a 256-byte boundary,
/// which CUDA copies and kernels reading the blocks in place prefer.
pub const DEVICE_SLOT_ALIGN: usize = 256;

/// Default size of one pinned staging chunk (each copy lane has two).
/// Measured on an H100 host (`benches/device.rs`): 256 KiB chunks copy
/// 256 KiB to 2 MiB blocks as fast as 1 MiB chunks or faster (1 MiB blocks
/// 9.3 vs 8.4 GB/s), since a block's CPU copy into one chunk overlaps the
/// DMA of the last; 64 KiB chunks are slower at every size.
pub const DEFAULT_STAGING_CHUNK_BYTES: usize = 256 << 10;
/// Default number of copy lanes (concurrent transfers).
pub const DEFAULT_LANES: usize = 2;

/// How to build a device pool ([`SimulatedDevice`] or `CudaPool`); made by
/// [`DevicePoolConfig::builder`].
#[derive(Debug, Clone)]
pub struct DevicePoolConfig {
    geometry: BlockGeometry,
    capacity_bytes: usize,
    slots: u32,
    ordinal: usize,
    lanes: usize,
    staging_chunk_bytes: usize,
}

/// Builder for [`DevicePoolConfig`].
#[derive(Debug, Clone)]
pub struct DevicePoolConfigBuilder {
    geometry: BlockGeometry,
    capacity_bytes: usize,
    ordinal: usize,
    lanes: usize,
    staging_chunk_bytes: usize,
}

impl DevicePoolConfig {
    /// Starts a configuration for blocks of `geometry`. Set at least
    /// [`capacity_bytes`](DevicePoolConfigBuilder::capacity_bytes).
    pub fn builder(geometry: BlockGeometry) -> DevicePoolConfigBuilder {
        DevicePoolConfigBuilder {
            geometry,
            capacity_bytes: 0,
            ordinal: 0,
            lanes: DEFAULT_LANES,
            staging_chunk_bytes: DEFAULT_STAGING_CHUNK_BYTES,
        }
    }

    pub fn geometry(&self) -> &BlockGeometry {
        &self.geometry
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    /// Number of slots: `capacity_bytes / block_bytes`.
    pub fn slot_count(&self) -> u32 {
        self.slots
    }

    /// Bytes from one slot to the next ([`DEVICE_SLOT_ALIGN`]-aligned).
    pub fn slot_stride(&self) -> usize {
        round_up(self.geometry.block_bytes, DEVICE_SLOT_ALIGN)
    }

    /// Size of the slab a backend must provide.
    pub fn slab_bytes(&self) -> usize {
        self.slots as usize * self.slot_stride()
    }

    /// Which GPU (CUDA device ordinal).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Concurrent copy lanes (each a stream with its own staging buffers).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Bytes of one pinned staging chunk (at most one block).
    pub fn staging_chunk_bytes(&self) -> usize {
        self.staging_chunk_bytes.min(self.geometry.block_bytes)
    }
}

impl DevicePoolConfigBuilder {
    /// The byte budget; the pool holds `capacity_bytes / block_bytes` slots.
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// The GPU to use (CUDA device ordinal; default 0).
    pub fn ordinal(mut self, ordinal: usize) -> Self {
        self.ordinal = ordinal;
        self
    }

    /// Concurrent copy lanes (default [`DEFAULT_LANES`]); a transfer waits
    /// for a free lane.
    pub fn lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes;
        self
    }

    /// Size of each pinned staging chunk (default
    /// [`DEFAULT_STAGING_CHUNK_BYTES`]). A block moves in chunks, double
    /// buffered: the CPU fills one while the other is in flight.
    pub fn staging_chunk_bytes(mut self, bytes: usize) -> Self {
        self.staging_chunk_bytes = bytes;
        self
    }

    /// Checks the configuration: `InvalidConfig` if the budget holds no
    /// slot or a lane or staging size is zero.
    pub fn build(self) -> Result<DevicePoolConfig> {
        let slots = slots_for_budget(&self.geometry, self.capacity_bytes)?;
        if self.lanes == 0 {
            return Err(TierError::InvalidConfig(
                "a device pool needs at least one copy lane".into(),
            ));
        }
        if self.staging_chunk_bytes == 0 {
            return Err(TierError::InvalidConfig(
                "staging chunks must be above zero bytes".into(),
            ));
        }
        let config = DevicePoolConfig {
            geometry: self.geometry,
            capacity_bytes: self.capacity_bytes,
            slots,
            ordinal: self.ordinal,
            lanes: self.lanes,
            staging_chunk_bytes: self.staging_chunk_bytes,
        };
        if (slots as usize).checked_mul(config.slot_stride()).is_none() {
            return Err(TierError::InvalidConfig(format!(
                "{slots} slots of {} bytes overflow",
                config.slot_stride()
            )));
        }
        Ok(config)
    }
}

/// Where a device pool's bytes live: a slab the pool copies into and out
/// of by byte offset. The pool does all slot bookkeeping; a backend only
/// moves bytes, and reports failures as [`TierError::Device`].
pub trait DeviceBackend: Send + Sync + fmt::Debug {
    /// Size of the slab in bytes.
    fn slab_bytes(&self) -> usize;

    /// Copies `data` into the slab at `offset`, complete when this returns.
    ///
    /// # Safety
    /// `offset + data.len() <= self.slab_bytes()`, and while the call runs
    /// no other `copy_in` or `copy_out` touches any of those slab bytes.
    unsafe fn copy_in(&self, offset: usize, data: &[u8]) -> Result<()>;

    /// Copies `out.len()` slab bytes at `offset` into `out`.
    ///
    /// # Safety
    /// `offset + out.len() <= self.slab_bytes()`, and while the call runs
    /// no `copy_in` touches any of those slab bytes.
    unsafe fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<()>;

    /// See [`BlockPool::attach_host`]; the default does nothing.
    fn attach_host(&self, host: &std::sync::Arc<crate::host::HostPool>) -> Result<bool> {
        let _ = host;
        Ok(false)
    }
}

/// A pool of device block slots over a [`DeviceBackend`]; medium
/// [`Medium::Device`].
pub struct DevicePool<B> {
    geometry: BlockGeometry,
    slots: SlotTable,
    stride: usize,
    backend: B,
}

impl<B: DeviceBackend> DevicePool<B> {
    /// A pool over `backend`, whose slab must hold
    /// [`config.slab_bytes()`](DevicePoolConfig::slab_bytes).
    pub fn with_backend(config: &DevicePoolConfig, backend: B) -> Result<Self> {
        if backend.slab_bytes() < config.slab_bytes() {
            return Err(TierError::InvalidConfig(format!(
                "backend slab of {} bytes is smaller than the {} bytes of {} slots",
                backend.slab_bytes(),
                config.slab_bytes(),
                config.slot_count()
            )));
        }
        Ok(Self {
            geometry: config.geometry,
            slots: SlotTable::new(config.slot_count()),
            stride: config.slot_stride(),
            backend,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Bytes from one slot's start to the next.
    pub fn slot_stride(&self) -> usize {
        self.stride
    }

    /// Where the slot's bytes start in the backend's slab (for a GPU pool,
    /// the offset from the slab's device address).
    pub fn slot_offset(&self, slot: SlotId) -> Result<u64> {
        self.slots.check(slot)?;
        Ok(self.offset(slot) as u64)
    }

    fn offset(&self, slot: SlotId) -> usize {
        slot.0 as usize * self.stride
    }
}

impl<B: DeviceBackend> BlockPool for DevicePool<B> {
    fn medium(&self) -> Medium {
        Medium::Device
    }

    fn geometry(&self) -> &BlockGeometry {
        &self.geometry
    }

    fn capacity(&self) -> u32 {
        self.slots.capacity()
    }

    fn used(&self) -> u32 {
        self.slots.used()
    }

    fn allocate(&self) -> Result<SlotId> {
        self.slots.allocate()
    }

    /// Copies `data` into the slot. `Empty` if the slot is not reserved for
    /// writing (free, already written, or another write is under way); a
    /// backend failure is `Device` and leaves the slot reserved and empty.
    fn write(&self, slot: SlotId, data: &[u8], meta: &[u8]) -> Result<()> {
        self.slots.check(slot)?;
        self.geometry.check_write(data, meta)?;
        self.slots.begin_write(slot)?;
        // SAFETY: the slot's range lies in the slab (`with_backend` checked
        // the slab holds every slot), and `begin_write` gave this call the
        // slot alone: no other write, and no read (reads pin only readable
        // slots), until `end_write`.
        let copied = unsafe { self.backend.copy_in(self.offset(slot), data) };
        let published = self.slots.end_write(slot, copied.is_ok());
        copied?;
        if published {
            Ok(())
        } else {
            Err(TierError::Empty(slot))
        }
    }

    fn read(&self, slot: SlotId, out: &mut [u8]) -> Result<()> {
        self.slots.check(slot)?;
        self.geometry.check_block_len(out.len())?;
        self.slots.pin(slot)?;
        // SAFETY: in the slab (as above); pinned readable, so no write to
        // the slot starts until the unpin below.
        let copied = unsafe { self.backend.copy_out(self.offset(slot), out) };
        self.slots.unpin(slot);
        copied
    }

    fn free(&self, slot: SlotId) {
        self.slots.free(slot);
    }

    fn attach_host(&self, host: &std::sync::Arc<crate::host::HostPool>) -> Result<bool> {
        self.backend.attach_host(host)
    }
}

impl<B: fmt::Debug> fmt::Debug for DevicePool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevicePool")
            .field("geometry", &self.geometry)
            .field("slots", &self.slots)
            .field("stride", &self.stride)
            .field("backend", &self.backend)
            .finish()
    }
}

/// A device slab simulated in host memory.
#[derive(Debug)]
pub struct SimulatedBackend {
    region: Region,
}

impl SimulatedBackend {
    /// A zeroed slab of `bytes` bytes.
    pub fn new(bytes: usize) -> Result<Self> {
        if bytes == 0 {
            return Err(TierError::InvalidConfig("empty slab".into()));
        }
        Ok(Self {
            region: Region::anonymous(bytes, false, false)?,
        })
    }
}

impl DeviceBackend for SimulatedBackend {
    fn slab_bytes(&self) -> usize {
        self.region.len()
    }

    unsafe fn copy_in(&self, offset: usize, data: &[u8]) -> Result<()> {
        // SAFETY: the caller gives this call the range alone.
        unsafe { self.region.copy_in(offset, data) };
        Ok(())
    }

    unsafe fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        // SAFETY: the caller keeps writers off the range.
        unsafe { self.region.copy_out(offset, out) };
        Ok(())
    }
}

/// The device tier without a GPU: slots in host memory behind the device
/// tier's logic. Medium [`Medium::Device`].
pub type SimulatedDevice = DevicePool<SimulatedBackend>;

impl DevicePool<SimulatedBackend> {
    /// A simulated device pool; the GPU-only settings (ordinal, lanes,
    /// staging) are ignored.
    pub fn new(config: DevicePoolConfig) -> Result<Self> {
        let backend = SimulatedBackend::new(config.slab_bytes())?;
        Self::with_backend(&config, backend)
    }
}
