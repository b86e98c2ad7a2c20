//! The GPU tier (cargo feature `cuda`): block slots in GPU memory through
//! cudarc, with the CUDA driver loaded at run time.
//!
//! [`CudaPool`] is the device tier's [`DevicePool`] over a [`CudaBackend`]:
//! one device allocation (the slab) of `capacity × stride` bytes, and a few
//! copy lanes, each a CUDA stream with two pinned (page-locked) staging
//! chunks. A block moves in chunks, double buffered: while the DMA engine
//! copies one chunk the CPU fills (or drains) the other. Staging memory is
//! allocated cacheable, not write-combined, since the CPU reads it back on
//! device-to-host copies. A transfer waits for a free lane.
//!
//! When the host tier is attached ([`BlockPool::attach_host`], which the
//! cache does), its memory is registered with the driver (page-locked), so
//! a block moving between host RAM and the GPU is one DMA straight from or
//! into its host slot: no staging copy on the CPU.
//!
//! Every driver failure is [`TierError::Device`]; [`CudaPool::new`]
//! returns an error, never panics, where there is no driver or no GPU.
//! This module is the only place that names `cudarc`.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream, DriverError};

use crate::device::{DeviceBackend, DevicePool, DevicePoolConfig};
use crate::host::HostPool;
use crate::{Result, TierError};

/// The device tier on a CUDA GPU.
pub type CudaPool = DevicePool<CudaBackend>;

impl DevicePool<CudaBackend> {
    /// Opens the configured GPU and allocates the slab and staging buffers.
    /// `Device` error (not a panic) when the driver library is missing, no
    /// GPU is present, or an allocation fails.
    pub fn new(config: DevicePoolConfig) -> Result<Self> {
        let backend = CudaBackend::new(&config)?;
        Self::with_backend(&config, backend)
    }
}

fn device_error(what: &'static str) -> impl Fn(DriverError) -> TierError {
    move |e| TierError::Device(format!("{what}: {e}"))
}

/// Which way [`CudaBackend::pinned_copy_time`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    ToDevice,
    FromDevice,
}

/// A slab of GPU memory with pinned staging lanes. See the module docs.
pub struct CudaBackend {
    // Field order is drop order: host registrations, lanes (streams,
    // events, staging), then the slab, then the context they belong to.
    registered: parking_lot::RwLock<Vec<Registered>>,
    /// Copies that went straight between registered host memory and the
    /// GPU (no staging).
    direct_copies: AtomicU64,
    lanes_in: Sender<Lane>,
    lanes_out: Receiver<Lane>,
    slab: DeviceSlab,
    chunk: usize,
    name: String,
    ctx: Arc<CudaContext>,
}

impl CudaBackend {
    /// Opens the GPU `config.ordinal()` and allocates `config.slab_bytes()`
    /// of device memory and `config.lanes()` staging lanes.
    pub fn new(config: &DevicePoolConfig) -> Result<Self> {
        // SAFETY: only tries to load the driver library, calling nothing in it.
        if !unsafe { sys::is_culib_present() } {
            return Err(TierError::Device(
                "no CUDA driver: libcuda could not be loaded".into(),
            ));
        }
        // cudarc panics (rather than erring) on a driver without a symbol it
        // expects; keep that an error too.
        std::panic::catch_unwind(|| Self::open(config)).unwrap_or_else(|_| {
            Err(TierError::Device(
                "the CUDA driver failed during setup (missing symbol?)".into(),
            ))
        })
    }

    fn open(config: &DevicePoolConfig) -> Result<Self> {
        let count = CudaContext::device_count().map_err(device_error("counting CUDA devices"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if config.ordinal() >= count {
            return Err(TierError::Device(format!(
                "CUDA device {} requested, {count} present",
                config.ordinal()
            )));
        }
        let ctx = CudaContext::new(config.ordinal()).map_err(device_error("opening the device"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let bytes = config.slab_bytes();
        // SAFETY: `CudaContext::new` made the context current on this
        // thread; the memory is only reached through the copies below.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            TierError::Device(format!("allocating {bytes} bytes of device memory: {e}"))
        })?;
        let slab = DeviceSlab {
            ptr,
            bytes,
            ctx: ctx.clone(),
        };
        let chunk = config.staging_chunk_bytes();
        let (lanes_in, lanes_out) = crossbeam_channel::bounded(config.lanes());
        for _ in 0..config.lanes() {
            let lane = Lane::new(&ctx, chunk)?;
            lanes_in.send(lane).expect("the channel holds every lane");
        }
        Ok(Self {
            registered: parking_lot::RwLock::new(Vec::new()),
            direct_copies: AtomicU64::new(0),
            lanes_in,
            lanes_out,
            slab,
            chunk,
            name,
            ctx,
        })
    }

    /// The GPU's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Copies that went straight between registered host memory and the
    /// GPU, without staging.
    pub fn direct_copies(&self) -> u64 {
        self.direct_copies.load(Ordering::Relaxed)
    }

    /// Whether `len` bytes at `ptr` lie in registered host memory.
    fn registered(&self, ptr: *const u8, len: usize) -> bool {
        let (start, end) = (ptr as usize, ptr as usize + len);
        self.registered
            .read()
            .iter()
            .any(|r| start >= r.ptr as usize && end <= r.ptr as usize + r.len)
    }

    /// The slab's device address (slot offsets are relative to it).
    pub fn device_ptr(&self) -> u64 {
        self.slab.ptr
    }

    /// The copy engine's own speed, the baseline the pool's copies are
    /// measured against: `iterations` async copies of `bytes` between one
    /// pinned host buffer and the start of the slab, on one stream, timed
    /// from the first enqueue to the stream's end. No staging or pageable
    /// memory is involved, so no pool copy can beat it.
    pub fn pinned_copy_time(
        &self,
        bytes: usize,
        iterations: u64,
        direction: CopyDirection,
    ) -> Result<std::time::Duration> {
        let dst = self.device_range(0, bytes);
        self.ctx
            .bind_to_thread()
            .map_err(device_error("binding the CUDA context"))?;
        let stream = self
            .ctx
            .new_stream()
            .map_err(device_error("creating a CUDA stream"))?;
        let mut pinned = PinnedChunk::new(&self.ctx, bytes)?;
        let buf = pinned.bytes_mut(bytes);
        buf.fill(0x5a);
        let copy = |buf: &mut [u8]| {
            // SAFETY: the device range lies in the slab (`device_range`);
            // the pinned buffer outlives the copies, which the stream
            // synchronization below waits for before it is touched again.
            unsafe {
                match direction {
                    CopyDirection::ToDevice => {
                        result::memcpy_htod_async(dst, &*buf, stream.cu_stream())
                    }
                    CopyDirection::FromDevice => {
                        result::memcpy_dtoh_async(buf, dst, stream.cu_stream())
                    }
                }
            }
        };
        let start = std::time::Instant::now();
        for _ in 0..iterations {
            copy(buf).map_err(device_error("a baseline copy"))?;
        }
        stream
            .synchronize()
            .map_err(device_error("waiting for the baseline copies"))?;
        Ok(start.elapsed())
    }

    fn lane(&self) -> Result<LaneGuard<'_>> {
        let lane = self
            .lanes_out
            .recv()
            .map_err(|_| TierError::Device("copy lanes are gone".into()))?;
        self.ctx
            .bind_to_thread()
            .map_err(device_error("binding the CUDA context"))?;
        Ok(LaneGuard {
            lane: Some(lane),
            home: &self.lanes_in,
        })
    }

    fn device_range(&self, offset: usize, len: usize) -> sys::CUdeviceptr {
        assert!(
            offset <= self.slab.bytes && len <= self.slab.bytes - offset,
            "range {offset}+{len} outside a slab of {} bytes",
            self.slab.bytes
        );
        self.slab.ptr + offset as u64
    }
}

impl DeviceBackend for CudaBackend {
    fn slab_bytes(&self) -> usize {
        self.slab.bytes
    }

    unsafe fn copy_in(&self, offset: usize, data: &[u8]) -> Result<()> {
        let dst = self.device_range(offset, data.len());
        let mut guard = self.lane()?;
        let lane = guard.get();
        let copied = if self.registered(data.as_ptr(), data.len()) {
            self.direct_copies.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the destination lies in the slab (`device_range`);
            // the source is page-locked host memory borrowed for this call,
            // which synchronizes the stream below before returning.
            unsafe { result::memcpy_htod_async(dst, data, lane.stream.cu_stream()) }
        } else {
            lane.upload(dst, data, self.chunk)
        };
        // Always drain the stream, even after an error: the staging chunks
        // must be idle before the lane is handed to another transfer.
        let drained = lane.stream.synchronize();
        copied
            .and(drained)
            .map_err(device_error("copying a block to the device"))
    }

    unsafe fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = self.device_range(offset, out.len());
        let mut guard = self.lane()?;
        let lane = guard.get();
        let copied = if self.registered(out.as_ptr(), out.len()) {
            self.direct_copies.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the source lies in the slab; `out` is page-locked
            // host memory borrowed exclusively for this call, which
            // synchronizes the stream below before returning.
            unsafe { result::memcpy_dtoh_async(out, src, lane.stream.cu_stream()) }
        } else {
            lane.download(src, out, self.chunk)
        };
        let drained = lane.stream.synchronize();
        copied
            .and(drained)
            .map_err(device_error("copying a block from the device"))
    }

    fn attach_host(&self, host: &Arc<HostPool>) -> Result<bool> {
        let (ptr, len) = host.memory();
        let mut registered = self.registered.write();
        if registered.iter().any(|r| r.ptr == ptr) {
            return Ok(true);
        }
        self.ctx
            .bind_to_thread()
            .map_err(device_error("binding the CUDA context"))?;
        // SAFETY: `ptr..ptr + len` is the host pool's whole mapping, which
        // the `Registered` record keeps alive (it holds the pool) until its
        // drop unregisters it. Portable: every context may DMA to it.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(device_error("registering the host tier for DMA"))?;
        registered.push(Registered {
            ptr,
            len,
            ctx: self.ctx.clone(),
            _host: host.clone(),
        });
        Ok(true)
    }
}

/// Host memory registered (page-locked) with the driver. Holds the pool
/// that owns the memory, so the memory outlives the registration.
struct Registered {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
    _host: Arc<HostPool>,
}

// SAFETY: the pointer is only compared and handed to the driver; the
// memory it names is the host pool's, which is itself shared across threads.
unsafe impl Send for Registered {}
// SAFETY: as for `Send`.
unsafe impl Sync for Registered {}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: registered by `attach_host` and unregistered once;
            // no copy is in flight (each copy synchronizes before it
            // returns, and the backend is being dropped).
            let _ = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        }
    }
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("slab_bytes", &self.slab.bytes)
            .field("staging_chunk", &self.chunk)
            .finish()
    }
}

/// The device allocation; freed on drop.
struct DeviceSlab {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl Drop for DeviceSlab {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `malloc_sync` in this context and is
            // freed once; every copy into or out of it was synchronized
            // before its lane was returned, and the lanes drop first.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory; freed on drop.
struct PinnedChunk {
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory owned by one lane, which one transfer at a time
// holds (moved between threads through the lane channel).
unsafe impl Send for PinnedChunk {}

impl PinnedChunk {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        // SAFETY: the context is current on this thread (`Lane::new`
        // callers bind it); flags 0 asks for cacheable page-locked memory.
        let ptr = unsafe { result::malloc_host(len, 0) }.map_err(|e| {
            TierError::Device(format!("allocating {len} bytes of pinned memory: {e}"))
        })?;
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| TierError::Device("pinned allocation returned null".into()))?;
        Ok(Self {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The first `len` bytes, to fill or drain. The caller makes sure no
    /// DMA into or out of the chunk is in flight (its lane's event for the
    /// chunk has completed).
    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.len);
        // SAFETY: `ptr` points to `self.len` bytes we own; `&mut self`
        // makes this the only Rust reference; the caller (a lane method)
        // has waited for the DMA engine to be done with them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for PinnedChunk {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_host`, freed once, and idle: the
            // lane's stream was synchronized after its last transfer.
            let _ = unsafe { result::free_host(self.ptr.as_ptr().cast()) };
        }
    }
}

/// One stream with two staging chunks and an event per chunk that marks
/// when its last DMA finished.
struct Lane {
    stream: Arc<CudaStream>,
    staging: [PinnedChunk; 2],
    done: [CudaEvent; 2],
}

impl Lane {
    fn new(ctx: &Arc<CudaContext>, chunk: usize) -> Result<Self> {
        let stream = ctx
            .new_stream()
            .map_err(device_error("creating a CUDA stream"))?;
        ctx.bind_to_thread()
            .map_err(device_error("binding the CUDA context"))?;
        let staging = [PinnedChunk::new(ctx, chunk)?, PinnedChunk::new(ctx, chunk)?];
        let event = || {
            ctx.new_event(None)
                .map_err(device_error("creating a CUDA event"))
        };
        let done = [event()?, event()?];
        Ok(Self {
            stream,
            staging,
            done,
        })
    }

    /// Queues `data` to `dst` chunk by chunk. On return copies may still be
    /// in flight: the caller synchronizes the stream.
    fn upload(
        &mut self,
        dst: sys::CUdeviceptr,
        data: &[u8],
        chunk: usize,
    ) -> std::result::Result<(), DriverError> {
        let pieces = data.len().div_ceil(chunk);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let b = i % 2;
            if i >= 2 {
                // Chunk `b` still feeds the copy of piece i-2.
                self.done[b].synchronize()?;
            }
            let staging = self.staging[b].bytes_mut(piece.len());
            staging.copy_from_slice(piece);
            // SAFETY: the destination range lies in the slab (checked by
            // `device_range`); the source is pinned memory that stays
            // allocated and untouched until `done[b]` (recorded next) fires.
            unsafe {
                result::memcpy_htod_async(
                    dst + (i * chunk) as u64,
                    &*staging,
                    self.stream.cu_stream(),
                )
            }?;
            // Only a piece two ahead waits on this chunk; the caller's
            // stream synchronization covers the last two.
            if i + 2 < pieces {
                self.done[b].record(&self.stream)?;
            }
        }
        Ok(())
    }

    /// Copies from `src` into `out` chunk by chunk, the next chunk's DMA
    /// overlapping the CPU's copy-out of the current one.
    fn download(
        &mut self,
        src: sys::CUdeviceptr,
        out: &mut [u8],
        chunk: usize,
    ) -> std::result::Result<(), DriverError> {
        let total = out.len();
        let pieces = total.div_ceil(chunk);
        let piece_len = |i: usize| chunk.min(total - i * chunk);
        if pieces > 0 {
            self.queue_download(0, src, piece_len(0), chunk)?;
        }
        for (i, piece) in out.chunks_mut(chunk).enumerate() {
            if i + 1 < pieces {
                // Chunk (i+1)%2 last held piece i-1, already drained.
                self.queue_download(i + 1, src, piece_len(i + 1), chunk)?;
            }
            let b = i % 2;
            self.done[b].synchronize()?;
            piece.copy_from_slice(self.staging[b].bytes_mut(piece.len()));
        }
        Ok(())
    }

    fn queue_download(
        &mut self,
        i: usize,
        src: sys::CUdeviceptr,
        len: usize,
        chunk: usize,
    ) -> std::result::Result<(), DriverError> {
        let b = i % 2;
        let staging = self.staging[b].bytes_mut(len);
        // SAFETY: the source range lies in the slab; the pinned destination
        // is not read until `done[b]`, recorded next, has completed.
        unsafe {
            result::memcpy_dtoh_async(staging, src + (i * chunk) as u64, self.stream.cu_stream())
        }?;
        self.done[b].record(&self.stream)
    }
}

/// A lane checked out for one transfer; goes back to the channel on drop.
struct LaneGuard<'a> {
    lane: Option<Lane>,
    home: &'a Sender<Lane>,
}

impl LaneGuard<'_> {
    fn get(&mut self) -> &mut Lane {
        self.lane
            .as_mut()
            .expect("a guard holds its lane until dropped")
    }
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if let Some(lane) = self.lane.take() {
            // The receiver lives as long as the backend that lent the lane.
            let _ = self.home.send(lane);
        }
    }
}
