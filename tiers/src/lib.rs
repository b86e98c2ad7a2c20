//! radixkv's block storage: fixed-size slots of KV-cache blocks on three
//! media — GPU memory ([`device`], feature `cuda`), host RAM ([`host`]) and
//! disk ([`disk`]) — and the moves between them.
//!
//! This crate knows bytes and devices, never tokens: a block is opaque bytes
//! of a fixed size, plus an opaque metadata record that the caller hands
//! down and gets back after a restart. It never decides what to evict; the
//! index does, and the caller tells the pools what to write, read and free.
//!
//! Promises every pool keeps:
//! - a block is readable only once it was fully written;
//! - a block that fails its checksum is [`TierError::Corrupt`], never data;
//! - a slot is reused only after the caller frees it (so a leased block is
//!   never overwritten while the caller holds its lease).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod disk;
mod error;
pub mod host;
pub mod io;
pub mod mover;
mod sync;

pub use error::{Result, TierError};

/// The medium a pool keeps its blocks on, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    Device,
    Host,
    Disk,
}

impl Medium {
    pub fn name(self) -> &'static str {
        match self {
            Medium::Device => "device",
            Medium::Host => "host",
            Medium::Disk => "disk",
        }
    }
}

/// A slot in one pool. Slots are numbered from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

/// The fixed shape of a pool's blocks. A pool reopened (or a shared-memory
/// region mapped) with a different geometry holds nothing of the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockGeometry {
    /// Bytes of one block (one page of KV, all layers).
    pub block_bytes: usize,
    /// Largest metadata record a block carries (disk keeps it for recovery).
    pub max_meta_bytes: usize,
    /// A digest of the KV layout the bytes follow (model, layers, heads,
    /// dtype, page size), chosen by the caller.
    pub layout_digest: u64,
}

impl BlockGeometry {
    pub fn new(block_bytes: usize, max_meta_bytes: usize, layout_digest: u64) -> Result<Self> {
        if block_bytes == 0 {
            return Err(TierError::InvalidConfig(
                "block size must be above zero".into(),
            ));
        }
        if block_bytes > MAX_BLOCK_BYTES {
            return Err(TierError::InvalidConfig(format!(
                "block size {block_bytes} exceeds the limit of {MAX_BLOCK_BYTES} bytes"
            )));
        }
        if max_meta_bytes > MAX_META_BYTES {
            return Err(TierError::InvalidConfig(format!(
                "metadata size {max_meta_bytes} exceeds the limit of {MAX_META_BYTES} bytes"
            )));
        }
        Ok(Self {
            block_bytes,
            max_meta_bytes,
            layout_digest,
        })
    }
}

impl BlockGeometry {
    /// `WrongLength` unless a buffer of `got` bytes holds exactly one block.
    pub fn check_block_len(&self, got: usize) -> Result<()> {
        if got != self.block_bytes {
            return Err(TierError::WrongLength {
                got,
                expected: self.block_bytes,
            });
        }
        Ok(())
    }

    /// The checks every pool's `write` makes on its arguments.
    pub fn check_write(&self, data: &[u8], meta: &[u8]) -> Result<()> {
        self.check_block_len(data.len())?;
        self.check_meta(meta)
    }

    /// `MetaTooLarge` if a metadata record is over the limit.
    pub fn check_meta(&self, meta: &[u8]) -> Result<()> {
        if meta.len() > self.max_meta_bytes {
            return Err(TierError::MetaTooLarge {
                got: meta.len(),
                limit: self.max_meta_bytes,
            });
        }
        Ok(())
    }
}

/// Largest block a pool accepts (256 MiB).
pub const MAX_BLOCK_BYTES: usize = 256 << 20;
/// Largest metadata record (64 KiB).
pub const MAX_META_BYTES: usize = 64 << 10;

/// One block of a [`BlockPool::write_many`]: what
/// [`write`](BlockPool::write) takes.
#[derive(Debug, Clone, Copy)]
pub struct BlockWrite<'a> {
    pub slot: SlotId,
    pub data: &'a [u8],
    pub meta: &'a [u8],
}

/// One block of a [`BlockPool::copy_many_into`]: what
/// [`copy_into`](BlockPool::copy_into) takes.
#[derive(Debug, Clone, Copy)]
pub struct BlockCopy<'a> {
    /// The block to copy, in this pool.
    pub slot: SlotId,
    /// Where it goes, a slot of the destination from its `allocate`.
    pub dest: SlotId,
    pub meta: &'a [u8],
}

/// A pool of fixed-size block slots on one medium. Implementations are
/// shared across threads; each slot is written by one caller at a time.
pub trait BlockPool: Send + Sync + std::fmt::Debug {
    fn medium(&self) -> Medium;

    fn geometry(&self) -> &BlockGeometry;

    /// Number of slots.
    fn capacity(&self) -> u32;

    /// Slots allocated (being written or holding a block).
    fn used(&self) -> u32;

    /// Reserves a free slot to write, or [`TierError::Full`].
    fn allocate(&self) -> Result<SlotId>;

    /// Writes a whole block (exactly `block_bytes`) and its metadata into a
    /// slot from [`allocate`](Self::allocate). The block is readable once
    /// this returns `Ok`; after an error the slot holds nothing readable
    /// (the caller frees it).
    fn write(&self, slot: SlotId, data: &[u8], meta: &[u8]) -> Result<()>;

    /// Copies a block into `out` (exactly `block_bytes`), checking its
    /// checksum where the medium keeps one.
    fn read(&self, slot: SlotId, out: &mut [u8]) -> Result<()>;

    /// Returns a slot to the free list. The caller guarantees that nobody
    /// reads it any more.
    fn free(&self, slot: SlotId);

    /// [`write`](Self::write) with the bytes produced by `fill`: into the
    /// slot itself where the medium is plain memory (host RAM, so a block
    /// coming from another tier lands without passing through a buffer),
    /// otherwise into `buf` (exactly `block_bytes`), which is then written.
    /// An error from `fill` leaves the slot holding nothing readable, as a
    /// failed `write` does.
    fn write_with(
        &self,
        slot: SlotId,
        meta: &[u8],
        buf: &mut [u8],
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        fill(buf)?;
        self.write(slot, buf, meta)
    }

    /// Copies the block in `slot` into slot `dest` (from
    /// [`allocate`](Self::allocate)) of `to`: a move between tiers. `buf`
    /// (exactly `block_bytes`) is used only where neither pool can lend or
    /// take the bytes in place. After an error `dest` holds nothing
    /// readable (the caller frees it).
    fn copy_into(
        &self,
        slot: SlotId,
        to: &dyn BlockPool,
        dest: SlotId,
        meta: &[u8],
        buf: &mut [u8],
    ) -> Result<()> {
        to.write_with(dest, meta, buf, &mut |out| self.read(slot, out))
    }

    /// [`write`](Self::write) of many blocks, one result per block in
    /// order. A medium where one large transfer costs less than many small
    /// ones (disk: one I/O, one completion interrupt) writes adjacent slots
    /// together; the default writes them one by one.
    fn write_many(&self, writes: &[BlockWrite<'_>]) -> Vec<Result<()>> {
        writes
            .iter()
            .map(|w| self.write(w.slot, w.data, w.meta))
            .collect()
    }

    /// [`copy_into`](Self::copy_into) of many blocks into `to`, one result
    /// per block in order, so that a pool lending its bytes in place can
    /// hand them to `to`'s [`write_many`](Self::write_many) together.
    fn copy_many_into(
        &self,
        copies: &[BlockCopy<'_>],
        to: &dyn BlockPool,
        buf: &mut [u8],
    ) -> Vec<Result<()>> {
        copies
            .iter()
            .map(|c| self.copy_into(c.slot, to, c.dest, c.meta, buf))
            .collect()
    }

    /// Lets this pool copy to and from the host tier's memory directly (a
    /// GPU pool registers it with the driver, so copies between the two
    /// tiers are one DMA, with no staging copy on the CPU). Returns whether
    /// it did; the default does nothing. The pool keeps `host` alive for as
    /// long as it uses its memory.
    fn attach_host(&self, host: &std::sync::Arc<host::HostPool>) -> Result<bool> {
        let _ = host;
        Ok(false)
    }
}
