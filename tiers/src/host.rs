//! The host tier: fixed-size block slots in one large allocation of host RAM.
//!
//! [`HostPool`] keeps `capacity` slots in a single mapping — anonymous
//! memory by default, or a shared-memory file (for instance under
//! `/dev/shm`) that a local engine maps with [`ShmView`] to read blocks with
//! zero copies: the service hands out slot offsets, not bytes.
//!
//! # Slot life cycle
//!
//! Each slot has one atomic state word: `free → reserved` ([`allocate`]),
//! `reserved → writing → readable` ([`write`]), and back to `free`
//! ([`free`]). Readers ([`read`], [`HostPool::block`]) pin a readable slot
//! for the length of their access; a slot freed while pinned stays
//! unavailable ("retiring") until its last pin is dropped, so a borrowed
//! block is never overwritten under a reader, and a reader never sees a
//! slot that is free or half written: it gets [`TierError::Empty`]. A slot
//! is written once per allocation; a write into a slot that is free, being
//! written or already holds a block is refused with `Empty`.
//!
//! Free slots sit on a lock-free stack (LIFO, so a freed slot, still warm
//! in cache, is the next one handed out). Data moves with one `memcpy`
//! straight between the caller's buffer and the slot.
//!
//! Metadata records are checked against the geometry's limit but not kept:
//! host memory does not outlive the process, so nothing is rebuilt from it.
//!
//! # Shared-memory format (version 1)
//!
//! A shared-memory pool file starts with a header page of
//! [`SHM_HEADER_BYTES`]; all integers little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic, the bytes `RDXKVHST` ([`SHM_MAGIC`]) |
//! | 8 | 4 | format version ([`SHM_FORMAT_VERSION`]) |
//! | 12 | 4 | header size in bytes (4096) |
//! | 16 | 8 | `block_bytes` |
//! | 24 | 8 | `max_meta_bytes` |
//! | 32 | 8 | `layout_digest` |
//! | 40 | 8 | slot count |
//! | 48 | 8 | slot stride: bytes from one slot to the next (≥ `block_bytes`) |
//! | 56 | 8 | data offset: where slot 0 starts |
//! | 64 | 8 | XXH3-64 of bytes 0..64 |
//!
//! Slot `i` is the `block_bytes` bytes at `data offset + i × stride`. The
//! file is built under a temporary name and renamed into place complete,
//! so an opener never sees a half-written header; a pool recreated at the
//! same path replaces the file (old mappings keep the old one) and a pool
//! removes its file when dropped. The file is created with mode `0600`.
//!
//! [`allocate`]: BlockPool::allocate
//! [`write`]: BlockPool::write
//! [`read`]: BlockPool::read
//! [`free`]: BlockPool::free

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};

use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::{BlockCopy, BlockGeometry, BlockPool, BlockWrite, Medium, Result, SlotId, TierError};

/// The first eight bytes of a shared-memory pool file.
pub const SHM_MAGIC: [u8; 8] = *b"RDXKVHST";
/// The shared-memory format this build writes and reads.
pub const SHM_FORMAT_VERSION: u32 = 1;
/// Size of the header page at the start of a shared-memory pool file.
pub const SHM_HEADER_BYTES: usize = 4096;

const PAGE: usize = 4096;
const CACHE_LINE: usize = 64;
/// Header bytes covered by the checksum; the checksum follows them.
const HEADER_CHECKED: usize = 64;

/// `n` rounded up to a multiple of `align`.
pub(crate) fn round_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

/// Bytes from one host slot to the next: blocks of a page or more start on
/// a page boundary (so they can go to disk with O_DIRECT straight from the
/// slot), smaller ones on a cache line.
fn host_stride(block_bytes: usize) -> usize {
    let align = if block_bytes >= PAGE {
        PAGE
    } else {
        CACHE_LINE
    };
    round_up(block_bytes, align)
}

/// Slots that a byte budget buys: `capacity_bytes / block_bytes`.
pub(crate) fn slots_for_budget(geometry: &BlockGeometry, capacity_bytes: usize) -> Result<u32> {
    let slots = capacity_bytes / geometry.block_bytes;
    if slots == 0 {
        return Err(TierError::InvalidConfig(format!(
            "a capacity of {capacity_bytes} bytes holds no block of {} bytes",
            geometry.block_bytes
        )));
    }
    // u32::MAX is the free list's end marker.
    if slots >= u32::MAX as usize {
        return Err(TierError::InvalidConfig(format!(
            "{slots} slots exceed the limit of {} per pool",
            u32::MAX - 1
        )));
    }
    Ok(slots as u32)
}

// ---------------------------------------------------------------------------
// Slot states and the free list (shared with the device pools).

const STATE_MASK: u64 = 0xff;
const FREE: u64 = 0;
const RESERVED: u64 = 1;
const WRITING: u64 = 2;
const READABLE: u64 = 3;
/// Freed while pinned (or while a write was still copying): released to the
/// free list by whoever drops the last pin.
const RETIRING: u64 = 4;
/// One pin; the pin count sits above the state byte.
const PIN: u64 = 1 << 8;
const NIL: u32 = u32::MAX;

/// Per-slot states and the free list: the bookkeeping every pool of
/// fixed-size slots in memory shares. All operations are lock-free.
pub(crate) struct SlotTable {
    states: Box<[AtomicU64]>,
    /// Next free slot below each free slot on the stack.
    next: Box<[AtomicU32]>,
    /// Top of the free stack: `tag << 32 | slot` (the tag defeats ABA).
    head: AtomicU64,
    used: AtomicU32,
    capacity: u32,
}

impl SlotTable {
    pub(crate) fn new(capacity: u32) -> Self {
        let states = (0..capacity).map(|_| AtomicU64::new(FREE)).collect();
        let next = (0..capacity)
            .map(|i| AtomicU32::new(if i + 1 < capacity { i + 1 } else { NIL }))
            .collect();
        let head = if capacity == 0 { NIL } else { 0 };
        Self {
            states,
            next,
            head: AtomicU64::new(u64::from(head)),
            used: AtomicU32::new(0),
            capacity,
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// The slot's state word, or `NoSuchSlot`.
    pub(crate) fn check(&self, slot: SlotId) -> Result<&AtomicU64> {
        self.states
            .get(slot.0 as usize)
            .ok_or(TierError::NoSuchSlot {
                slot,
                capacity: self.capacity,
            })
    }

    pub(crate) fn allocate(&self) -> Result<SlotId> {
        let slot = self.pop().ok_or(TierError::Full)?;
        self.used.fetch_add(1, Ordering::Relaxed);
        let prev = self.states[slot as usize].swap(RESERVED, Ordering::AcqRel);
        debug_assert_eq!(prev, FREE, "slot {slot} on the free list was not free");
        Ok(SlotId(slot))
    }

    /// Claims a reserved slot for writing: nobody else writes or reads it
    /// until [`end_write`](Self::end_write).
    pub(crate) fn begin_write(&self, slot: SlotId) -> Result<()> {
        self.check(slot)?
            .compare_exchange(RESERVED, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .map(drop)
            .map_err(|_| TierError::Empty(slot))
    }

    /// Ends a write: publishes the block (`ok`) or leaves the slot reserved
    /// and empty. Returns whether the block was published: `false` also when
    /// the slot was freed during the write (it is released now).
    pub(crate) fn end_write(&self, slot: SlotId, ok: bool) -> bool {
        let state = &self.states[slot.0 as usize];
        let target = if ok { READABLE } else { RESERVED };
        match state.compare_exchange(WRITING, target, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => ok,
            Err(current) => {
                // Freed mid-write: `free` turned the write into a pin.
                debug_assert_eq!(current & STATE_MASK, RETIRING);
                self.unpin(slot);
                false
            }
        }
    }

    /// Pins a readable slot: it cannot be written or handed out again until
    /// [`unpin`](Self::unpin).
    pub(crate) fn pin(&self, slot: SlotId) -> Result<()> {
        let state = self.check(slot)?;
        let mut current = state.load(Ordering::Relaxed);
        loop {
            if current & STATE_MASK != READABLE {
                return Err(TierError::Empty(slot));
            }
            debug_assert!(current < u64::MAX - PIN, "pin count overflow");
            match state.compare_exchange_weak(
                current,
                current + PIN,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    pub(crate) fn unpin(&self, slot: SlotId) {
        let state = &self.states[slot.0 as usize];
        let mut current = state.load(Ordering::Relaxed);
        loop {
            debug_assert!(current >= PIN, "unpin of slot {slot:?} without a pin");
            let mut new = current - PIN;
            if new == RETIRING {
                new = FREE;
            }
            match state.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    if new == FREE {
                        self.release(slot.0);
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Frees a slot; a pinned one (or one being written) is released when
    /// its last pin goes. Freeing a free or out-of-range slot does nothing.
    pub(crate) fn free(&self, slot: SlotId) {
        let Ok(state) = self.check(slot) else {
            return;
        };
        let mut current = state.load(Ordering::Relaxed);
        loop {
            let pins = current & !STATE_MASK;
            let new = match current & STATE_MASK {
                FREE | RETIRING => return,
                RESERVED => FREE,
                READABLE if pins == 0 => FREE,
                READABLE => RETIRING | pins,
                // The writer holds the slot until `end_write`: count it as a pin.
                WRITING => RETIRING | PIN,
                other => unreachable!("slot state {other}"),
            };
            match state.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    if new == FREE {
                        self.release(slot.0);
                    }
                    return;
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Publishes a reserved slot as it stands (its bytes written in place
    /// by someone else): `Empty` unless the slot was reserved and is now
    /// readable. See [`HostPool::seal`].
    pub(crate) fn seal(&self, slot: SlotId) -> Result<()> {
        self.begin_write(slot)?;
        if self.end_write(slot, true) {
            Ok(())
        } else {
            Err(TierError::Empty(slot))
        }
    }

    /// Frees a slot only if it is reserved and unwritten: `false` (and no
    /// change) for any other state, so a caller that may hold a stale slot
    /// id can never free a published block.
    pub(crate) fn unreserve(&self, slot: SlotId) -> bool {
        let Ok(state) = self.check(slot) else {
            return false;
        };
        let freed = state
            .compare_exchange(RESERVED, FREE, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if freed {
            self.release(slot.0);
        }
        freed
    }

    fn release(&self, slot: u32) {
        self.used.fetch_sub(1, Ordering::Relaxed);
        self.push(slot);
    }

    fn pop(&self) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let top = head as u32;
            if top == NIL {
                return None;
            }
            // A stale read (the slot was popped meanwhile) is harmless: the
            // tag has moved on, so the exchange below fails.
            let below = self.next[top as usize].load(Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(below);
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return Some(top),
                Err(actual) => head = actual,
            }
        }
    }

    fn push(&self, slot: u32) {
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            self.next[slot as usize].store(head as u32, Ordering::Relaxed);
            let new = ((head >> 32).wrapping_add(1) << 32) | u64::from(slot);
            match self
                .head
                .compare_exchange_weak(head, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => head = actual,
            }
        }
    }
}

impl fmt::Debug for SlotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotTable")
            .field("capacity", &self.capacity)
            .field("used", &self.used())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Memory regions.

/// A mapping of plain bytes that threads share, each touching only the
/// ranges the slot protocol gives it.
pub(crate) struct Region {
    base: NonNull<u8>,
    len: usize,
    /// Owns the mapping `base` points into; never touched through `&mut`
    /// after construction.
    _map: MmapMut,
}

// SAFETY: a `Region` is a pointer into a mapping it owns; every access goes
// through the `unsafe` methods below, whose callers guarantee that no two
// threads touch the same bytes at once with one of them writing.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: shared access is governed by the callers' contract.
unsafe impl Sync for Region {}

impl Region {
    /// Anonymous memory of `len` bytes, zeroed.
    pub(crate) fn anonymous(len: usize, prefault: bool, huge_pages: bool) -> io::Result<Self> {
        let map = MmapOptions::new().len(len).map_anon()?;
        Ok(Self::from_map(map, prefault, huge_pages))
    }

    fn from_map(mut map: MmapMut, prefault: bool, huge_pages: bool) -> Self {
        if huge_pages {
            // Best effort: fewer TLB misses on large copies where THP allows.
            let _ = map.advise(Advice::HugePage);
        }
        if prefault && map.advise(Advice::PopulateWrite).is_err() {
            // Kernels before 5.14: touch every page by hand (writing back
            // what is there) so the hot path takes no page faults.
            for offset in (0..map.len()).step_by(PAGE) {
                map[offset] = std::hint::black_box(map[offset]);
            }
        }
        let len = map.len();
        let base = NonNull::new(map.as_mut_ptr()).expect("mappings are never null");
        Self {
            base,
            len,
            _map: map,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn range_ptr(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset <= self.len && len <= self.len - offset,
            "range {offset}+{len} outside a region of {} bytes",
            self.len
        );
        // SAFETY: `offset <= self.len`, so the result stays inside (or one
        // past the end of) the mapping.
        unsafe { self.base.as_ptr().add(offset) }
    }

    /// Copies `data` to `offset`. Panics if the range is out of bounds.
    ///
    /// # Safety
    /// No other thread reads or writes any of these bytes during the call.
    pub(crate) unsafe fn copy_in(&self, offset: usize, data: &[u8]) {
        let dst = self.range_ptr(offset, data.len());
        // SAFETY: `dst..dst+len` is inside the mapping (checked above), the
        // caller guarantees exclusive access to it, and `data` cannot overlap
        // it (the caller could not hold a `&[u8]` into bytes it has
        // exclusive use of).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// Copies the bytes at `offset` into `out`. Panics if out of bounds.
    ///
    /// # Safety
    /// No other thread writes any of these bytes during the call.
    pub(crate) unsafe fn copy_out(&self, offset: usize, out: &mut [u8]) {
        let src = self.range_ptr(offset, out.len());
        // SAFETY: in bounds (checked), no concurrent writer (caller), and
        // `out` is an exclusive borrow so it cannot alias the source.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// Borrows `len` bytes at `offset` to write them in place. Panics if
    /// out of bounds.
    ///
    /// # Safety
    /// Nobody else reads or writes these bytes while the returned slice
    /// lives.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's contract
    pub(crate) unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        let ptr = self.range_ptr(offset, len);
        // SAFETY: in bounds, the mapping lives as long as `self`, and the
        // caller guarantees exclusive access for the slice's lifetime.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// The whole mapping's address and length (to register it with a
    /// device driver for DMA).
    #[cfg(feature = "cuda")]
    pub(crate) fn bounds(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.len)
    }

    /// Borrows `len` bytes at `offset`. Panics if out of bounds.
    ///
    /// # Safety
    /// Nobody writes these bytes while the returned slice lives.
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        let ptr = self.range_ptr(offset, len);
        // SAFETY: in bounds, the mapping lives as long as `self`, and the
        // caller keeps writers away for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Configuration.

/// How to build a [`HostPool`]; made by [`HostPoolConfig::builder`].
#[derive(Debug, Clone)]
pub struct HostPoolConfig {
    geometry: BlockGeometry,
    capacity_bytes: usize,
    slots: u32,
    shm_path: Option<PathBuf>,
    prefault: bool,
    huge_pages: bool,
}

/// Builder for [`HostPoolConfig`].
#[derive(Debug, Clone)]
pub struct HostPoolConfigBuilder {
    geometry: BlockGeometry,
    capacity_bytes: usize,
    shm_path: Option<PathBuf>,
    prefault: bool,
    huge_pages: bool,
}

impl HostPoolConfig {
    /// Starts a configuration for blocks of `geometry`. Set at least
    /// [`capacity_bytes`](HostPoolConfigBuilder::capacity_bytes).
    pub fn builder(geometry: BlockGeometry) -> HostPoolConfigBuilder {
        HostPoolConfigBuilder {
            geometry,
            capacity_bytes: 0,
            shm_path: None,
            prefault: true,
            huge_pages: true,
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

    pub fn shm_path(&self) -> Option<&Path> {
        self.shm_path.as_deref()
    }
}

impl HostPoolConfigBuilder {
    /// The byte budget; the pool holds `capacity_bytes / block_bytes`
    /// slots. (Slots are padded to a page, or a cache line for blocks under
    /// a page, so the mapping can exceed the budget by that padding.)
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Back the pool with a shared-memory file at `path` (for instance under
    /// `/dev/shm`) instead of anonymous memory, so that [`ShmView`] can map it.
    pub fn shared_memory(mut self, path: impl Into<PathBuf>) -> Self {
        self.shm_path = Some(path.into());
        self
    }

    /// Touch every page when the pool is built, so that no store pays for a
    /// page fault (default on). Off: pages are allocated on first write.
    pub fn prefault(mut self, yes: bool) -> Self {
        self.prefault = yes;
        self
    }

    /// Ask for transparent huge pages on anonymous memory (default on; best
    /// effort).
    pub fn huge_pages(mut self, yes: bool) -> Self {
        self.huge_pages = yes;
        self
    }

    /// Checks the configuration: `InvalidConfig` if the budget holds no slot.
    pub fn build(self) -> Result<HostPoolConfig> {
        let slots = slots_for_budget(&self.geometry, self.capacity_bytes)?;
        if let Some(path) = &self.shm_path {
            if path.file_name().is_none() {
                return Err(TierError::InvalidConfig(format!(
                    "shared-memory path {} names no file",
                    path.display()
                )));
            }
        }
        Ok(HostPoolConfig {
            geometry: self.geometry,
            capacity_bytes: self.capacity_bytes,
            slots,
            shm_path: self.shm_path,
            prefault: self.prefault,
            huge_pages: self.huge_pages,
        })
    }
}

// ---------------------------------------------------------------------------
// The pool.

/// Host-RAM block slots in one allocation. See the [module docs](self).
pub struct HostPool {
    geometry: BlockGeometry,
    slots: SlotTable,
    region: Region,
    stride: usize,
    data_offset: usize,
    shm: Option<ShmFile>,
}

/// The file behind a shared-memory pool, removed on drop if still ours.
#[derive(Debug)]
struct ShmFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl HostPool {
    pub fn new(config: HostPoolConfig) -> Result<Self> {
        let geometry = config.geometry;
        let slots = config.slots;
        let stride = host_stride(geometry.block_bytes);
        let data_bytes = (slots as usize).checked_mul(stride).ok_or_else(|| {
            TierError::InvalidConfig(format!("{slots} slots of {stride} bytes overflow"))
        })?;
        let (region, data_offset, shm) = match &config.shm_path {
            None => {
                let region = Region::anonymous(data_bytes, config.prefault, config.huge_pages)?;
                (region, 0, None)
            }
            Some(path) => {
                let header = ShmHeader {
                    geometry,
                    slots: u64::from(slots),
                    stride: stride as u64,
                    data_offset: SHM_HEADER_BYTES as u64,
                };
                let (map, file) = create_shm(path, &header, SHM_HEADER_BYTES + data_bytes)?;
                let region = Region::from_map(map, config.prefault, false);
                (region, SHM_HEADER_BYTES, Some(file))
            }
        };
        Ok(Self {
            geometry,
            slots: SlotTable::new(slots),
            region,
            stride,
            data_offset,
            shm,
        })
    }

    /// Bytes from one slot's start to the next.
    pub fn slot_stride(&self) -> usize {
        self.stride
    }

    /// Where the slot's bytes start, from the start of the pool's memory —
    /// for a shared-memory pool, the offset in its file, which
    /// [`ShmView::block_at`] takes.
    pub fn slot_offset(&self, slot: SlotId) -> Result<u64> {
        self.slots.check(slot)?;
        Ok(self.offset(slot) as u64)
    }

    /// The shared-memory file backing the pool, if any.
    pub fn shm_path(&self) -> Option<&Path> {
        self.shm.as_ref().map(|shm| shm.path.as_path())
    }

    /// Borrows a readable block in place, without copying. The returned
    /// guard pins the slot: while it lives the block cannot be written, and
    /// a [`free`](BlockPool::free) of the slot takes effect only once the
    /// last guard is dropped (so the borrow stays valid however the caller
    /// orders its lease and free). A slot that is free, reserved or being
    /// written is `Empty`.
    ///
    /// Keep guards short-lived: a pinned slot is not handed out again.
    pub fn block(&self, slot: SlotId) -> Result<BlockRef<'_>> {
        self.slots.pin(slot)?;
        // SAFETY: the slot is pinned readable: no write can begin and the
        // slot cannot be reallocated until `BlockRef::drop` unpins it.
        let bytes = unsafe {
            self.region
                .slice(self.offset(slot), self.geometry.block_bytes)
        };
        Ok(BlockRef {
            bytes,
            slots: &self.slots,
            slot,
        })
    }

    /// Publishes a reserved slot whose bytes were written in place by a
    /// shared-memory client (not through [`write`](BlockPool::write)): the
    /// slot becomes readable as it stands. `Empty` if the slot is not
    /// reserved (never allocated, freed, or already published).
    pub fn seal(&self, slot: SlotId) -> Result<()> {
        self.slots.seal(slot)
    }

    /// Frees a slot that is reserved and unwritten (a shared-memory
    /// reservation given up); any other slot is left alone: `false`.
    pub fn unreserve(&self, slot: SlotId) -> bool {
        self.slots.unreserve(slot)
    }

    fn offset(&self, slot: SlotId) -> usize {
        self.data_offset + slot.0 as usize * self.stride
    }
}

impl BlockPool for HostPool {
    fn medium(&self) -> Medium {
        Medium::Host
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
    /// writing (free, already written, or another write is under way).
    fn write(&self, slot: SlotId, data: &[u8], meta: &[u8]) -> Result<()> {
        self.slots.check(slot)?;
        self.geometry.check_write(data, meta)?;
        self.slots.begin_write(slot)?;
        // SAFETY: `begin_write` moved the slot from reserved to writing,
        // which only one caller can do; readers pin only readable slots, so
        // nobody else touches these bytes until `end_write`.
        unsafe { self.region.copy_in(self.offset(slot), data) };
        if self.slots.end_write(slot, true) {
            Ok(())
        } else {
            Err(TierError::Empty(slot))
        }
    }

    fn read(&self, slot: SlotId, out: &mut [u8]) -> Result<()> {
        self.slots.check(slot)?;
        self.geometry.check_block_len(out.len())?;
        self.slots.pin(slot)?;
        // SAFETY: pinned readable: no writer until the unpin below.
        unsafe { self.region.copy_out(self.offset(slot), out) };
        self.slots.unpin(slot);
        Ok(())
    }

    fn free(&self, slot: SlotId) {
        self.slots.free(slot);
    }

    /// `fill` writes straight into the slot.
    fn write_with(
        &self,
        slot: SlotId,
        meta: &[u8],
        _buf: &mut [u8],
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.slots.check(slot)?;
        self.geometry.check_meta(meta)?;
        self.slots.begin_write(slot)?;
        // SAFETY: as in `write`: `begin_write` gave this call the slot
        // alone until `end_write`, and the slice does not outlive `fill`.
        let bytes = unsafe {
            self.region
                .slice_mut(self.offset(slot), self.geometry.block_bytes)
        };
        let filled = fill(bytes);
        let published = self.slots.end_write(slot, filled.is_ok());
        filled?;
        if published {
            Ok(())
        } else {
            Err(TierError::Empty(slot))
        }
    }

    /// The block is lent in place (pinned while `to` copies it).
    fn copy_into(
        &self,
        slot: SlotId,
        to: &dyn BlockPool,
        dest: SlotId,
        meta: &[u8],
        _buf: &mut [u8],
    ) -> Result<()> {
        let block = self.block(slot)?;
        to.write(dest, &block, meta)
    }

    /// Lends every block in place at once, so the destination writes them
    /// in as few transfers as it can.
    fn copy_many_into(
        &self,
        copies: &[BlockCopy<'_>],
        to: &dyn BlockPool,
        _buf: &mut [u8],
    ) -> Vec<Result<()>> {
        let blocks: Vec<Result<BlockRef<'_>>> = copies.iter().map(|c| self.block(c.slot)).collect();
        let writes: Vec<BlockWrite<'_>> = copies
            .iter()
            .zip(&blocks)
            .filter_map(|(c, b)| {
                let b = b.as_ref().ok()?;
                Some(BlockWrite {
                    slot: c.dest,
                    data: b,
                    meta: c.meta,
                })
            })
            .collect();
        let mut written = to.write_many(&writes).into_iter();
        blocks
            .into_iter()
            .map(|b| match b {
                Ok(_) => written.next().expect("write_many answers every write"),
                Err(e) => Err(e),
            })
            .collect()
    }
}

impl HostPool {
    /// The pool's memory (slots and any header), for DMA registration.
    #[cfg(feature = "cuda")]
    pub(crate) fn memory(&self) -> (*mut u8, usize) {
        self.region.bounds()
    }
}

impl fmt::Debug for HostPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostPool")
            .field("geometry", &self.geometry)
            .field("capacity", &self.slots.capacity())
            .field("used", &self.slots.used())
            .field("stride", &self.stride)
            .field("bytes", &self.region.len())
            .field("shm_path", &self.shm_path())
            .finish()
    }
}

/// A pinned, readable block borrowed in place from a [`HostPool`]; derefs
/// to the block's bytes. Dropping it unpins the slot.
pub struct BlockRef<'a> {
    bytes: &'a [u8],
    slots: &'a SlotTable,
    slot: SlotId,
}

impl BlockRef<'_> {
    pub fn slot(&self) -> SlotId {
        self.slot
    }
}

impl Deref for BlockRef<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl AsRef<[u8]> for BlockRef<'_> {
    fn as_ref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for BlockRef<'_> {
    fn drop(&mut self) {
        self.slots.unpin(self.slot);
    }
}

impl fmt::Debug for BlockRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockRef")
            .field("slot", &self.slot)
            .field("len", &self.bytes.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Shared memory.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ShmHeader {
    geometry: BlockGeometry,
    slots: u64,
    stride: u64,
    data_offset: u64,
}

impl ShmHeader {
    fn encode(&self) -> [u8; HEADER_CHECKED + 8] {
        let mut out = [0u8; HEADER_CHECKED + 8];
        out[0..8].copy_from_slice(&SHM_MAGIC);
        out[8..12].copy_from_slice(&SHM_FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(SHM_HEADER_BYTES as u32).to_le_bytes());
        let fields = [
            self.geometry.block_bytes as u64,
            self.geometry.max_meta_bytes as u64,
            self.geometry.layout_digest,
            self.slots,
            self.stride,
            self.data_offset,
        ];
        for (i, field) in fields.iter().enumerate() {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&field.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out[..HEADER_CHECKED]);
        out[HEADER_CHECKED..].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses and checks a header read from outside; `file_len` is the
    /// size of the file it came from. The error says what is wrong.
    fn decode(bytes: &[u8], file_len: u64) -> std::result::Result<Self, String> {
        if bytes.len() < HEADER_CHECKED + 8 {
            return Err(format!("{} bytes are too short for a header", bytes.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        if bytes[0..8] != SHM_MAGIC {
            return Err("not a radixkv host pool (bad magic)".into());
        }
        let version = u32_at(8);
        if version != SHM_FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this build reads {SHM_FORMAT_VERSION}"
            ));
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes[..HEADER_CHECKED]);
        if sum != u64_at(HEADER_CHECKED) {
            return Err("header checksum mismatch (corrupt header)".into());
        }
        let header_bytes = u64::from(u32_at(12));
        if header_bytes != SHM_HEADER_BYTES as u64 {
            return Err(format!(
                "header size {header_bytes}, this format's is {SHM_HEADER_BYTES}"
            ));
        }
        let too_big = |v: u64| usize::try_from(v).map_err(|_| format!("field {v} overflows"));
        let geometry = BlockGeometry::new(too_big(u64_at(16))?, too_big(u64_at(24))?, u64_at(32))
            .map_err(|e| format!("bad geometry: {e}"))?;
        let header = Self {
            geometry,
            slots: u64_at(40),
            stride: u64_at(48),
            data_offset: u64_at(56),
        };
        if header.slots == 0 || header.slots >= u64::from(u32::MAX) {
            return Err(format!("bad slot count {}", header.slots));
        }
        if header.stride < geometry.block_bytes as u64 {
            return Err(format!(
                "slot stride {} is below the block size {}",
                header.stride, geometry.block_bytes
            ));
        }
        if header.data_offset < header_bytes || header_bytes < (HEADER_CHECKED + 8) as u64 {
            return Err(format!(
                "data offset {} overlaps the header of {header_bytes} bytes",
                header.data_offset
            ));
        }
        let end = header
            .slots
            .checked_mul(header.stride)
            .and_then(|data| data.checked_add(header.data_offset))
            .ok_or("slot area overflows")?;
        if end > file_len {
            return Err(format!(
                "file of {file_len} bytes is shorter than its {end} bytes of slots (truncated)"
            ));
        }
        Ok(header)
    }
}

/// Creates the pool file: built under a temporary name, space reserved
/// (so a full tmpfs is an error now, not a SIGBUS on first write), header
/// written, then renamed into place.
fn create_shm(path: &Path, header: &ShmHeader, len: usize) -> Result<(MmapMut, ShmFile)> {
    // A plain std atomic (a static, outside the slot table's model checks).
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.set_len(len as u64)?;
        reserve(&file, len)?;
        // SAFETY: we just created this file under a unique name and nobody
        // else knows it yet; it is never truncated while mapped (a pool
        // recreated at the same path renames a new file over the name).
        let mut map = unsafe { MmapOptions::new().len(len).map_mut(&file)? };
        map[..HEADER_CHECKED + 8].copy_from_slice(&header.encode());
        let meta = file.metadata()?;
        std::fs::rename(&tmp, path)?;
        Ok::<_, io::Error>((
            map,
            ShmFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        ))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(TierError::from)
}

fn reserve(file: &File, len: usize) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a file descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // File systems without fallocate: fall back to sparse pages.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// A read-only mapping of a [`HostPool`]'s shared-memory file, for a local
/// engine: checks that the file is a pool of the expected geometry, then
/// hands out blocks by slot or by the offsets the service returns, with
/// zero copies.
///
/// The bytes are only meaningful while the service holds the block for the
/// reader (a lease): a slot the service frees may be rewritten in place.
/// The mapping stays valid for the view's life even if the service drops
/// or recreates its pool (the old file lives on while mapped).
pub struct ShmView {
    map: Mmap,
    header: ShmHeader,
    path: PathBuf,
}

impl ShmView {
    /// Maps the pool file at `path` read-only and checks its header against
    /// `expected`: a missing file is `Io`; a file that is not a pool, of
    /// another format version, corrupt, truncated or of another geometry is
    /// `InvalidConfig` with the reason.
    pub fn open(path: impl AsRef<Path>, expected: BlockGeometry) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let bad = |why: String| {
            TierError::InvalidConfig(format!("shared-memory pool {}: {why}", path.display()))
        };
        if file_len < SHM_HEADER_BYTES as u64 {
            return Err(bad(format!("file of {file_len} bytes holds no header")));
        }
        // SAFETY: a pool file is only ever written in place (never
        // truncated) by its service, which writes only slots it does not
        // lease out; we map it read-only and hand out `&[u8]` only.
        let map = unsafe { Mmap::map(&file)? };
        let header = ShmHeader::decode(&map[..SHM_HEADER_BYTES], map.len() as u64).map_err(bad)?;
        if header.geometry != expected {
            let g = header.geometry;
            return Err(bad(format!(
                "geometry mismatch: the file holds blocks of {} bytes, metadata up to {}, \
                 layout {:#018x}; expected {} bytes, {}, {:#018x}",
                g.block_bytes,
                g.max_meta_bytes,
                g.layout_digest,
                expected.block_bytes,
                expected.max_meta_bytes,
                expected.layout_digest
            )));
        }
        Ok(Self {
            map,
            header,
            path: path.to_path_buf(),
        })
    }

    pub fn geometry(&self) -> &BlockGeometry {
        &self.header.geometry
    }

    pub fn slot_count(&self) -> u32 {
        self.header.slots as u32
    }

    pub fn slot_stride(&self) -> u64 {
        self.header.stride
    }

    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole mapping, header included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map
    }

    /// The offset of a slot's bytes in the file.
    pub fn slot_offset(&self, slot: SlotId) -> Result<u64> {
        if u64::from(slot.0) >= self.header.slots {
            return Err(TierError::NoSuchSlot {
                slot,
                capacity: self.slot_count(),
            });
        }
        Ok(self.header.data_offset + u64::from(slot.0) * self.header.stride)
    }

    /// The block of a slot, in place.
    pub fn block(&self, slot: SlotId) -> Result<&[u8]> {
        let offset = self.slot_offset(slot)?;
        Ok(self.bytes_at(offset))
    }

    /// The block at `offset` (as [`HostPool::slot_offset`] gives it), in
    /// place. `InvalidConfig` unless the offset is a slot's start.
    pub fn block_at(&self, offset: u64) -> Result<&[u8]> {
        let h = &self.header;
        let rel = offset.checked_sub(h.data_offset);
        match rel {
            Some(rel) if rel % h.stride == 0 && rel / h.stride < h.slots => {
                Ok(self.bytes_at(offset))
            }
            _ => Err(TierError::InvalidConfig(format!(
                "offset {offset} is not the start of a slot in {}",
                self.path.display()
            ))),
        }
    }

    fn bytes_at(&self, offset: u64) -> &[u8] {
        // In bounds: `decode` checked that every slot lies inside the file.
        let start = offset as usize;
        &self.map[start..start + self.header.geometry.block_bytes]
    }
}

impl fmt::Debug for ShmView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmView")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

/// Model checks of the slot table's races (pin / free / reallocate) under
/// loom; the command is in the module's docs.
#[cfg(all(test, loom))]
mod loom_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ShmHeader {
        ShmHeader {
            geometry: BlockGeometry::new(8192, 128, 7).unwrap(),
            slots: 4,
            stride: 8192,
            data_offset: SHM_HEADER_BYTES as u64,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        let len = SHM_HEADER_BYTES as u64 + 4 * 8192;
        assert_eq!(ShmHeader::decode(&h.encode(), len), Ok(h));
    }

    #[test]
    fn header_rejects_damage() {
        let h = header();
        let len = SHM_HEADER_BYTES as u64 + 4 * 8192;
        assert!(ShmHeader::decode(&h.encode(), len - 1)
            .unwrap_err()
            .contains("truncated"));
        assert!(ShmHeader::decode(&h.encode()[..40], len).is_err());
        for at in 0..HEADER_CHECKED + 8 {
            let mut bytes = h.encode();
            bytes[at] ^= 0x10;
            assert!(ShmHeader::decode(&bytes, len).is_err(), "flip at {at}");
        }
    }

    #[test]
    #[cfg_attr(loom, ignore = "loom's atomics work only inside loom::model")]
    fn free_list_hands_out_each_slot_once() {
        let t = SlotTable::new(3);
        let mut got: Vec<u32> = (0..3).map(|_| t.allocate().unwrap().0).collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
        assert!(matches!(t.allocate(), Err(TierError::Full)));
        t.free(SlotId(1));
        t.free(SlotId(1));
        assert_eq!(t.used(), 2);
        assert_eq!(t.allocate().unwrap(), SlotId(1));
        assert!(matches!(t.allocate(), Err(TierError::Full)));
    }

    #[test]
    #[cfg_attr(loom, ignore = "loom's atomics work only inside loom::model")]
    fn free_while_writing_releases_at_end_of_write() {
        let t = SlotTable::new(1);
        let s = t.allocate().unwrap();
        t.begin_write(s).unwrap();
        t.free(s);
        assert_eq!(t.used(), 1);
        assert!(!t.end_write(s, true));
        assert_eq!(t.used(), 0);
        assert_eq!(t.allocate().unwrap(), s);
    }

    #[test]
    fn strides() {
        assert_eq!(host_stride(100), 128);
        assert_eq!(host_stride(4096), 4096);
        assert_eq!(host_stride(65536 + 1), 65536 + 4096);
        assert_eq!(round_up(300, 256), 512);
        assert_eq!(round_up(1024, 256), 1024);
    }
}
