//! The disk (NVMe) tier: fixed-size block slots in preallocated files, each
//! slot self-checking, and a journal of live slots so that a restarted pool
//! comes back warm.
//!
//! # Files
//!
//! A pool owns one directory:
//!
//! - `pool.hdr` — the pool header ([`PoolHeader`]): format version, the
//!   geometry (block size, metadata limit, layout digest), the slot layout
//!   (slot size, slots per file, capacity) and a random pool id chosen when
//!   the files were created. Replaced atomically (temporary file, `fsync`,
//!   `rename`, directory `fsync`).
//! - `slots-0000.dat`, `slots-0001.dat`, ... — the slot files, preallocated
//!   with `fallocate` at creation (so a write inside them never needs new
//!   space), `slots_per_file × slot_bytes` each (the last may be shorter).
//! - `journal.log` — the journal ([`parse_journal`]): a header (pool id,
//!   next write generation) and then records, `Put(slot, generation,
//!   checksum, meta)` appended after a block is written and `Free(slot,
//!   generation)` appended when the caller frees it.
//! - `LOCK` — held with `flock` while the pool is open, so two pools never
//!   share a directory.
//!
//! # A slot
//!
//! `slot_bytes = round_up(block_bytes + 64 + max_meta_bytes, 4096)`. The
//! block's bytes come first, at offset 0 of the slot, then the 64-byte slot
//! header ([`SlotHeader`]), then the metadata record:
//!
//! ```text
//! | data (block_bytes) | header (64) | meta (meta_len) | unused ... |
//! header: magic "RKVSLOT1" | version u32 | header length u32 |
//!         geometry digest u64 | generation u64 | slot u32 | meta_len u32 |
//!         data_len u64 | pool id u64 | checksum u64
//! checksum = XXH3-64(header bytes 0..56 ++ meta ++ data)
//! ```
//!
//! All integers are little-endian. The geometry digest is XXH3-64 of the
//! format version, block size, metadata limit and layout digest. Putting
//! the data first lets a caller's 4096-aligned buffer go to the device as
//! it is (`preadv`/`pwritev` of the caller's buffer plus a small header
//! buffer, no copy); other buffers go through an aligned bounce buffer.
//! A write is one `pwritev` of the whole slot image. A batch
//! ([`BlockPool::write_many`], which the mover uses for a demotion round)
//! puts slots that follow each other in one file into one `pwritev` of
//! their images: each completion is a device interrupt and a thread wakeup,
//! and on a small machine those land on the cores that serve lookups, so
//! fewer, larger I/Os keep lookup latency flat while blocks stream down.
//!
//! # Reads never return a bad block
//!
//! [`DiskPool::read`] reads data, header and metadata and checks magic,
//! version, header length, geometry digest, pool id, slot number, data and
//! metadata lengths, the generation and checksum it expects for that slot
//! (kept in memory), the metadata bytes themselves, and finally the
//! checksum over everything. Any mismatch is [`TierError::Corrupt`]: the
//! output buffer is zeroed, the corrupt counter rises, and the caller drops
//! the block (a miss). A torn write (new data, old header, or the reverse),
//! a flipped bit, a stale block from an earlier generation, a block of
//! another geometry or pool incarnation: none of them can pass.
//!
//! # Recovery, and why it is safe
//!
//! [`DiskPool::open`] reads `pool.hdr`. If it is missing, unreadable, or
//! differs from the config in format version, geometry or slot layout, every
//! old file is removed and the pool starts empty (a new pool id), so old
//! blocks are never read with the wrong shape. Otherwise it reads the
//! journal in one sequential read, replays it (a `Put` makes a slot live, a
//! `Free` of the same generation makes it free again), stops at the first
//! record whose checksum fails (a torn tail; the file is cut there), and
//! returns every live slot as a [`RecoveredBlock`] (its metadata from the
//! journal). Recovery of 100k blocks is therefore one read of a few MiB plus
//! parsing, whatever the block size. With
//! [`verify_on_open`](DiskPoolConfigBuilder::verify_on_open) it also reads
//! every live slot (in large batched reads over two threads) and drops the
//! ones that fail their checks.
//!
//! Ordering makes this safe:
//! - A `Put` is appended only after the slot's `pwrite` returned, so a
//!   journal that lists a block lists one the kernel holds in full. A
//!   process crash (SIGKILL, panic) keeps everything the kernel accepted
//!   (page cache, or `O_DIRECT` writes already on the device). A write that
//!   was in flight at the kill has no `Put`, whatever part of it reached
//!   the file, and its slot was free in the journal before (allocation
//!   only hands out free slots, and a freed block's `Free` is appended
//!   before the slot can be handed out again). So after a crash the journal
//!   lists exactly the blocks whose `write` returned `Ok` and were not
//!   freed, plus at most the few whose `write` was about to return `Ok`
//!   (`tests/disk_crash.rs` checks this against a SIGKILLed writer).
//! - Record checksums are seeded with the pool id and the record's index,
//!   so a stale record left beyond the journal's end, or a journal of an
//!   earlier incarnation, never parses as live.
//! - After a power loss, writes after the last [`DiskPool::sync`] may be
//!   missing or torn on the device even where their journal record
//!   survived; such a block fails its checks at read (or at open with
//!   `verify_on_open`) and is a miss. Never data.
//! - A write's failure (I/O error, `ENOSPC`, short write) leaves the slot
//!   unreadable in memory and unlisted in the journal; the pool keeps serving
//!   other slots.
//!
//! Frees: `free` appends a `Free` record (a buffered append, no device
//! write), and overwriting a live slot appends one first, so a freed block
//! never comes back after a process crash. After a power loss, frees after
//! the last `sync` may be lost and the freed block may come back: intact,
//! with its own metadata (reads check both), which is harmless for a cache
//! of blocks that are a pure function of their metadata. A caller that frees
//! for policy reasons (a tenant's data removed) calls [`DiskPool::sync`]
//! afterwards.
//!
//! The journal is compacted when it grows past twice its live size (and a
//! configurable floor, 16 MiB by default): the data files are synced, the
//! live records are written to `journal.log.tmp`, synced, and renamed over
//! the journal; a crash leaves either the old journal or the new one. The
//! pool's lock is held meanwhile (tens of milliseconds for 100k live
//! blocks), amortised over at least as many appends as the journal holds.
//!
//! The parsing functions ([`parse_pool_header`], [`parse_slot_header`],
//! [`check_slot`], [`parse_journal`]) are pure functions over bytes that
//! return errors and never panic, whatever the input.

use crate::io::{
    align_up, is_direct_aligned, read_exact_at, read_exact_vectored_at, read_whole_file,
    remove_if_exists, replace_file, tmp_path, write_all_at, write_all_vectored_at, AlignedBuf,
    FileIo, IoFile, OpenFlags, RealIo,
};
use crate::{
    BlockGeometry, BlockPool, BlockWrite, Medium, Result, SlotId, TierError, MAX_BLOCK_BYTES,
    MAX_META_BYTES,
};
use parking_lot::Mutex;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

/// Version of the on-disk format (pool header, slots, journal).
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a slot header.
pub const SLOT_HEADER_LEN: usize = 64;
/// Bytes of the pool header file.
pub const POOL_HEADER_LEN: usize = 72;
/// Bytes of the journal header.
pub const JOURNAL_HEADER_LEN: usize = 64;
/// Bytes of a journal record before its metadata.
pub const RECORD_HEAD_LEN: usize = 32;
/// Bytes of a journal record after its metadata (its checksum).
pub const RECORD_TAIL_LEN: usize = 8;

const POOL_MAGIC: [u8; 8] = *b"RKVPOOL1";
const SLOT_MAGIC: [u8; 8] = *b"RKVSLOT1";
const JOURNAL_MAGIC: [u8; 8] = *b"RKVJRNL1";

const POOL_FILE: &str = "pool.hdr";
const JOURNAL_FILE: &str = "journal.log";
const LOCK_FILE: &str = "LOCK";
const SLOT_FILE_PREFIX: &str = "slots-";
const SLOT_FILE_SUFFIX: &str = ".dat";

/// Default largest slot file (1 GiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;
/// Default floor below which the journal is never compacted (16 MiB).
pub const DEFAULT_JOURNAL_COMPACT_BYTES: u64 = 16 << 20;
/// Bytes per read when `verify_on_open` scans the slot files.
const VERIFY_CHUNK_BYTES: usize = 8 << 20;
/// Spare aligned buffers kept per size.
const SPARE_BUFFERS: usize = 16;
/// Most slots one batched write puts in one I/O.
pub const RUN_SLOTS: usize = 64;
/// Most bytes one batched write puts in one I/O.
pub const RUN_BYTES: usize = 8 << 20;

fn slot_file_name(index: usize) -> String {
    format!("{SLOT_FILE_PREFIX}{index:04}{SLOT_FILE_SUFFIX}")
}

// ---- pure parsing and encoding -----------------------------------------------

/// Why bytes from outside did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("bad magic")]
    BadMagic,
    #[error("format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u32),
    #[error("header length {0} is not this version's")]
    HeaderLen(u32),
    #[error("checksum mismatch")]
    Checksum,
    #[error("{0} out of range")]
    Range(&'static str),
}

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    Some(u64::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checks magic, version and header length of a header that starts `b`.
fn check_preamble(
    b: &[u8],
    magic: &[u8; 8],
    len: usize,
    what: &'static str,
) -> std::result::Result<(), FormatError> {
    if b.get(..8).ok_or(FormatError::Truncated(what))? != magic {
        return Err(FormatError::BadMagic);
    }
    let version = get_u32(b, 8).ok_or(FormatError::Truncated(what))?;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let hlen = get_u32(b, 12).ok_or(FormatError::Truncated(what))?;
    if hlen as usize != len {
        return Err(FormatError::HeaderLen(hlen));
    }
    if b.len() < len {
        return Err(FormatError::Truncated(what));
    }
    Ok(())
}

/// The digest slot headers carry of the format version and geometry.
pub fn geometry_digest(g: &BlockGeometry) -> u64 {
    let mut b = [0u8; 28];
    put_u32(&mut b, 0, FORMAT_VERSION);
    put_u64(&mut b, 4, g.block_bytes as u64);
    put_u64(&mut b, 12, g.max_meta_bytes as u64);
    put_u64(&mut b, 20, g.layout_digest);
    xxh3_64(&b)
}

/// The contents of `pool.hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolHeader {
    pub version: u32,
    pub block_bytes: u64,
    pub max_meta_bytes: u64,
    pub layout_digest: u64,
    pub slot_bytes: u64,
    pub slots_per_file: u32,
    pub capacity: u32,
    pub pool_id: u64,
}

impl PoolHeader {
    /// `magic | version | header length | block_bytes | max_meta_bytes |
    /// layout_digest | slot_bytes | slots_per_file u32 | capacity u32 |
    /// pool_id | XXH3-64 of the 64 bytes before`.
    pub fn encode(&self) -> [u8; POOL_HEADER_LEN] {
        let mut b = [0u8; POOL_HEADER_LEN];
        b[..8].copy_from_slice(&POOL_MAGIC);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, POOL_HEADER_LEN as u32);
        put_u64(&mut b, 16, self.block_bytes);
        put_u64(&mut b, 24, self.max_meta_bytes);
        put_u64(&mut b, 32, self.layout_digest);
        put_u64(&mut b, 40, self.slot_bytes);
        put_u32(&mut b, 48, self.slots_per_file);
        put_u32(&mut b, 52, self.capacity);
        put_u64(&mut b, 56, self.pool_id);
        let sum = xxh3_64(&b[..64]);
        put_u64(&mut b, 64, sum);
        b
    }
}

/// Parses `pool.hdr`. Never panics.
pub fn parse_pool_header(b: &[u8]) -> std::result::Result<PoolHeader, FormatError> {
    const T: FormatError = FormatError::Truncated("pool header");
    check_preamble(b, &POOL_MAGIC, POOL_HEADER_LEN, "pool header")?;
    if get_u64(b, 64).ok_or(T)? != xxh3_64(b.get(..64).ok_or(T)?) {
        return Err(FormatError::Checksum);
    }
    Ok(PoolHeader {
        version: FORMAT_VERSION,
        block_bytes: get_u64(b, 16).ok_or(T)?,
        max_meta_bytes: get_u64(b, 24).ok_or(T)?,
        layout_digest: get_u64(b, 32).ok_or(T)?,
        slot_bytes: get_u64(b, 40).ok_or(T)?,
        slots_per_file: get_u32(b, 48).ok_or(T)?,
        capacity: get_u32(b, 52).ok_or(T)?,
        pool_id: get_u64(b, 56).ok_or(T)?,
    })
}

/// The header stored after a block's data in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotHeader {
    pub geometry_digest: u64,
    pub generation: u64,
    pub slot: u32,
    pub meta_len: u32,
    pub data_len: u64,
    pub pool_id: u64,
    pub checksum: u64,
}

impl SlotHeader {
    /// The 64 header bytes (the checksum field as given).
    pub fn encode(&self) -> [u8; SLOT_HEADER_LEN] {
        let mut b = [0u8; SLOT_HEADER_LEN];
        b[..8].copy_from_slice(&SLOT_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, SLOT_HEADER_LEN as u32);
        put_u64(&mut b, 16, self.geometry_digest);
        put_u64(&mut b, 24, self.generation);
        put_u32(&mut b, 32, self.slot);
        put_u32(&mut b, 36, self.meta_len);
        put_u64(&mut b, 40, self.data_len);
        put_u64(&mut b, 48, self.pool_id);
        put_u64(&mut b, 56, self.checksum);
        b
    }
}

/// The slot checksum: XXH3-64 over the first 56 header bytes (everything
/// but the checksum), then the metadata, then the data.
pub fn slot_checksum(header56: &[u8], meta: &[u8], data: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(header56);
    h.update(meta);
    h.update(data);
    h.digest()
}

/// Parses a slot header (magic, version, length, and lengths within the
/// crate's limits). Checks no checksum. Never panics.
pub fn parse_slot_header(b: &[u8]) -> std::result::Result<SlotHeader, FormatError> {
    const T: FormatError = FormatError::Truncated("slot header");
    check_preamble(b, &SLOT_MAGIC, SLOT_HEADER_LEN, "slot header")?;
    let h = SlotHeader {
        geometry_digest: get_u64(b, 16).ok_or(T)?,
        generation: get_u64(b, 24).ok_or(T)?,
        slot: get_u32(b, 32).ok_or(T)?,
        meta_len: get_u32(b, 36).ok_or(T)?,
        data_len: get_u64(b, 40).ok_or(T)?,
        pool_id: get_u64(b, 48).ok_or(T)?,
        checksum: get_u64(b, 56).ok_or(T)?,
    };
    if h.meta_len as usize > MAX_META_BYTES {
        return Err(FormatError::Range("metadata length"));
    }
    if h.data_len > MAX_BLOCK_BYTES as u64 {
        return Err(FormatError::Range("data length"));
    }
    Ok(h)
}

/// Checks a whole slot: `trailer` holds the header and then the metadata
/// (anything after is ignored), `data` the block. Returns the header and the
/// metadata if everything, checksum included, holds. Never panics.
pub fn check_slot<'a>(
    trailer: &'a [u8],
    data: &[u8],
) -> std::result::Result<(SlotHeader, &'a [u8]), FormatError> {
    let h = parse_slot_header(trailer)?;
    let meta = trailer
        .get(SLOT_HEADER_LEN..SLOT_HEADER_LEN + h.meta_len as usize)
        .ok_or(FormatError::Truncated("slot metadata"))?;
    if h.data_len != data.len() as u64 {
        return Err(FormatError::Range("data length"));
    }
    if slot_checksum(&trailer[..56], meta, data) != h.checksum {
        return Err(FormatError::Checksum);
    }
    Ok((h, meta))
}

/// The journal's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Must equal the pool header's, or the journal is of another
    /// incarnation of the pool.
    pub pool_id: u64,
    /// No block in the pool has a generation at or above this one... as of
    /// when the header was written; records may raise it.
    pub next_generation: u64,
}

impl JournalHeader {
    /// `magic | version | header length | pool_id | next_generation |
    /// 24 zero bytes | XXH3-64 of the 56 bytes before`.
    pub fn encode(&self) -> [u8; JOURNAL_HEADER_LEN] {
        let mut b = [0u8; JOURNAL_HEADER_LEN];
        b[..8].copy_from_slice(&JOURNAL_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, JOURNAL_HEADER_LEN as u32);
        put_u64(&mut b, 16, self.pool_id);
        put_u64(&mut b, 24, self.next_generation);
        let sum = xxh3_64(&b[..56]);
        put_u64(&mut b, 56, sum);
        b
    }
}

/// Kinds of journal records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A block was fully written to the slot.
    Put = 1,
    /// The block of that generation in the slot was freed.
    Free = 2,
}

/// One journal record.
///
/// Encoding: `kind u8 | 3 zero bytes | meta_len u32 | slot u32 | 4 zero
/// bytes | generation u64 | slot checksum u64 (0 for Free) | meta |
/// XXH3-64 of all of the above, seeded with pool_id ^ (index × φ)`, where
/// index counts records from the journal's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord<'a> {
    pub kind: RecordKind,
    pub slot: u32,
    pub generation: u64,
    pub checksum: u64,
    pub meta: &'a [u8],
}

impl JournalRecord<'_> {
    /// Encoded length.
    pub fn len(&self) -> usize {
        RECORD_HEAD_LEN + self.meta.len() + RECORD_TAIL_LEN
    }

    /// Never: a record has a fixed head.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>, pool_id: u64, index: u64) {
        let start = out.len();
        out.resize(start + RECORD_HEAD_LEN, 0);
        let head = &mut out[start..];
        head[0] = self.kind as u8;
        put_u32(head, 4, self.meta.len() as u32);
        put_u32(head, 8, self.slot);
        put_u64(head, 16, self.generation);
        put_u64(head, 24, self.checksum);
        out.extend_from_slice(self.meta);
        let sum = xxh3_64_with_seed(&out[start..], record_seed(pool_id, index));
        out.extend_from_slice(&sum.to_le_bytes());
    }
}

fn record_seed(pool_id: u64, index: u64) -> u64 {
    pool_id ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A parsed journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalScan<'a> {
    pub header: JournalHeader,
    /// The valid records, in order.
    pub records: Vec<JournalRecord<'a>>,
    /// Bytes of header and valid records; anything after is a torn or
    /// stale tail.
    pub valid_len: usize,
}

/// Parses a journal header.
pub fn parse_journal_header(b: &[u8]) -> std::result::Result<JournalHeader, FormatError> {
    const T: FormatError = FormatError::Truncated("journal header");
    check_preamble(b, &JOURNAL_MAGIC, JOURNAL_HEADER_LEN, "journal header")?;
    if get_u64(b, 56).ok_or(T)? != xxh3_64(b.get(..56).ok_or(T)?) {
        return Err(FormatError::Checksum);
    }
    if b.get(32..56).ok_or(T)?.iter().any(|&x| x != 0) {
        return Err(FormatError::Range("journal header reserved bytes"));
    }
    Ok(JournalHeader {
        pool_id: get_u64(b, 16).ok_or(T)?,
        next_generation: get_u64(b, 24).ok_or(T)?,
    })
}

/// Parses a whole journal: the header (an error if it is bad), then records
/// up to the first one that is incomplete or fails its checks. Never panics.
pub fn parse_journal(b: &[u8]) -> std::result::Result<JournalScan<'_>, FormatError> {
    let header = parse_journal_header(b)?;
    let mut records = Vec::new();
    let mut at = JOURNAL_HEADER_LEN;
    while let Some((rec, next)) = parse_record(b, at, header.pool_id, records.len() as u64) {
        records.push(rec);
        at = next;
    }
    Ok(JournalScan {
        header,
        records,
        valid_len: at,
    })
}

/// Parses the record at `at`; `None` if it is incomplete or invalid.
fn parse_record(
    b: &[u8],
    at: usize,
    pool_id: u64,
    index: u64,
) -> Option<(JournalRecord<'_>, usize)> {
    let head = b.get(at..at.checked_add(RECORD_HEAD_LEN)?)?;
    let kind = match head[0] {
        1 => RecordKind::Put,
        2 => RecordKind::Free,
        _ => return None,
    };
    if head[1..4] != [0; 3] || head[12..16] != [0; 4] {
        return None;
    }
    let meta_len = get_u32(head, 4)? as usize;
    if meta_len > MAX_META_BYTES || (kind == RecordKind::Free && meta_len != 0) {
        return None;
    }
    let meta_start = at + RECORD_HEAD_LEN;
    let meta_end = meta_start.checked_add(meta_len)?;
    let meta = b.get(meta_start..meta_end)?;
    let sum = get_u64(b, meta_end)?;
    if xxh3_64_with_seed(b.get(at..meta_end)?, record_seed(pool_id, index)) != sum {
        return None;
    }
    let rec = JournalRecord {
        kind,
        slot: get_u32(head, 8)?,
        generation: get_u64(head, 16)?,
        checksum: get_u64(head, 24)?,
        meta,
    };
    Some((rec, meta_end + RECORD_TAIL_LEN))
}

// ---- configuration -----------------------------------------------------------

/// How slots map onto files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotLayout {
    slot_bytes: u64,
    slots_per_file: u32,
    capacity: u32,
}

impl SlotLayout {
    fn files(&self) -> usize {
        self.capacity.div_ceil(self.slots_per_file) as usize
    }

    fn file_len(&self, file: usize) -> u64 {
        let first = file as u64 * self.slots_per_file as u64;
        let n = (self.capacity as u64 - first).min(self.slots_per_file as u64);
        n * self.slot_bytes
    }

    /// (file, byte offset) of a slot.
    fn place(&self, slot: u32) -> (usize, u64) {
        let file = (slot / self.slots_per_file) as usize;
        let off = (slot % self.slots_per_file) as u64 * self.slot_bytes;
        (file, off)
    }
}

/// Configuration of a [`DiskPool`]; build it with [`DiskPoolConfig::builder`].
#[derive(Debug, Clone)]
pub struct DiskPoolConfig {
    dir: PathBuf,
    geometry: BlockGeometry,
    layout: SlotLayout,
    capacity_bytes: u64,
    io: Arc<dyn FileIo>,
    verify_on_open: bool,
    journal_compact_bytes: u64,
}

impl DiskPoolConfig {
    /// Starts a config for a pool in `dir` with blocks of `geometry`.
    pub fn builder(dir: impl Into<PathBuf>, geometry: BlockGeometry) -> DiskPoolConfigBuilder {
        DiskPoolConfigBuilder {
            dir: dir.into(),
            geometry,
            capacity_bytes: 0,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            io: None,
            verify_on_open: false,
            journal_compact_bytes: DEFAULT_JOURNAL_COMPACT_BYTES,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn geometry(&self) -> &BlockGeometry {
        &self.geometry
    }

    /// Bytes of one slot (block, header, metadata, rounded up to 4096).
    pub fn slot_bytes(&self) -> u64 {
        self.layout.slot_bytes
    }

    /// Number of slots.
    pub fn capacity(&self) -> u32 {
        self.layout.capacity
    }

    /// The capacity asked for; the slot files take at most this much.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }
}

/// Builder of [`DiskPoolConfig`].
#[derive(Debug, Clone)]
pub struct DiskPoolConfigBuilder {
    dir: PathBuf,
    geometry: BlockGeometry,
    capacity_bytes: u64,
    max_file_bytes: u64,
    io: Option<Arc<dyn FileIo>>,
    verify_on_open: bool,
    journal_compact_bytes: u64,
}

impl DiskPoolConfigBuilder {
    /// Most bytes the slot files may take together (required). The pool
    /// holds `capacity_bytes / slot_bytes` slots.
    pub fn capacity_bytes(mut self, bytes: u64) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Largest slot file (default 1 GiB); capacity beyond it takes more
    /// files. Must hold at least one slot.
    pub fn max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = bytes;
        self
    }

    /// The file I/O to use (default [`RealIo::new`]).
    pub fn io(mut self, io: Arc<dyn FileIo>) -> Self {
        self.io = Some(io);
        self
    }

    /// At open, also read and check every recovered slot, dropping the bad
    /// ones (default off: reads check every block anyway).
    pub fn verify_on_open(mut self, verify: bool) -> Self {
        self.verify_on_open = verify;
        self
    }

    /// The journal is never compacted below this size (default 16 MiB).
    pub fn journal_compact_bytes(mut self, bytes: u64) -> Self {
        self.journal_compact_bytes = bytes;
        self
    }

    pub fn build(self) -> Result<DiskPoolConfig> {
        let g = self.geometry;
        if g.block_bytes == 0 || g.block_bytes > MAX_BLOCK_BYTES {
            return Err(TierError::InvalidConfig(format!(
                "block size {} is outside 1..={MAX_BLOCK_BYTES}",
                g.block_bytes
            )));
        }
        if g.max_meta_bytes > MAX_META_BYTES {
            return Err(TierError::InvalidConfig(format!(
                "metadata limit {} exceeds {MAX_META_BYTES}",
                g.max_meta_bytes
            )));
        }
        let slot_bytes = align_up(g.block_bytes + SLOT_HEADER_LEN + g.max_meta_bytes) as u64;
        let slots = self.capacity_bytes / slot_bytes;
        if slots == 0 {
            return Err(TierError::InvalidConfig(format!(
                "capacity of {} bytes holds no slot of {slot_bytes} bytes",
                self.capacity_bytes
            )));
        }
        let capacity = u32::try_from(slots).map_err(|_| {
            TierError::InvalidConfig(format!("{slots} slots exceed the limit of {}", u32::MAX))
        })?;
        let per_file = self.max_file_bytes / slot_bytes;
        if per_file == 0 {
            return Err(TierError::InvalidConfig(format!(
                "a file of at most {} bytes holds no slot of {slot_bytes} bytes",
                self.max_file_bytes
            )));
        }
        let slots_per_file = per_file.min(capacity as u64) as u32;
        Ok(DiskPoolConfig {
            dir: self.dir,
            geometry: g,
            layout: SlotLayout {
                slot_bytes,
                slots_per_file,
                capacity,
            },
            capacity_bytes: self.capacity_bytes,
            io: self.io.unwrap_or_else(|| RealIo::new().shared()),
            verify_on_open: self.verify_on_open,
            journal_compact_bytes: self.journal_compact_bytes,
        })
    }
}

// ---- the pool ----------------------------------------------------------------

/// A block found at open, for the caller to put back into its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredBlock {
    pub slot: SlotId,
    /// The metadata record the caller handed to `write`.
    pub meta: Vec<u8>,
}

/// How [`DiskPool::open`] found the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    /// No pool was there: files created.
    Created,
    /// The pool's files were read back.
    Recovered,
    /// A pool of another format, geometry or layout (or a damaged one) was
    /// there; its files were removed and the pool starts empty.
    Discarded(String),
}

/// What [`DiskPool::open`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub outcome: OpenOutcome,
    /// Blocks handed back as [`RecoveredBlock`]s.
    pub recovered: usize,
    /// Journal-listed blocks dropped because they failed `verify_on_open`.
    pub dropped: usize,
    /// Bytes of torn or stale journal tail cut off.
    pub journal_tail_dropped: u64,
}

/// Counters of a pool's life since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Reads (or open-time checks) that found a block failing its checks.
    pub corrupt_blocks: u64,
    /// Failed I/O calls (reads, writes, journal appends, syncs).
    pub io_errors: u64,
    pub reads: u64,
    /// Blocks written.
    pub writes: u64,
    /// Write calls to the device that carried them (a batch of adjacent
    /// slots is one).
    pub write_ios: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Current journal length.
    pub journal_bytes: u64,
    pub journal_compactions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    corrupt: AtomicU64,
    io_errors: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    write_ios: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    compactions: AtomicU64,
}

/// What the pool expects to find in a live slot.
#[derive(Debug)]
struct Expect {
    generation: u64,
    checksum: u64,
    meta: Box<[u8]>,
}

#[derive(Debug)]
enum SlotState {
    Free,
    /// Allocated, not yet written.
    Reserved,
    /// A write is under way.
    Writing,
    /// Freed while a write was under way: the write frees it when it ends.
    Abandoned,
    /// Allocated; the last write failed (the caller may retry or free it).
    Failed,
    Ready(Arc<Expect>),
}

#[derive(Debug)]
struct Journal {
    file: Box<dyn IoFile>,
    /// Length of header and valid records; the next record goes here.
    end: u64,
    /// Index of the next record.
    index: u64,
    /// Encoded bytes of the records a compaction would keep.
    live_bytes: u64,
    scratch: Vec<u8>,
}

#[derive(Debug)]
struct Inner {
    slots: Vec<SlotState>,
    /// Free slots; the next allocation pops from the end.
    free: Vec<u32>,
    journal: Journal,
}

/// Spare aligned buffers of one size.
#[derive(Debug)]
struct BufPool {
    len: usize,
    /// Most buffers kept for reuse.
    keep: usize,
    spare: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    fn new(len: usize, keep: usize) -> Self {
        Self {
            len,
            keep,
            spare: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> AlignedBuf {
        let mut b = self
            .spare
            .lock()
            .pop()
            .unwrap_or_else(|| AlignedBuf::zeroed(self.len));
        b.set_len(self.len);
        b
    }

    fn give(&self, b: AlignedBuf) {
        let mut spare = self.spare.lock();
        if spare.len() < self.keep {
            spare.push(b);
        }
    }
}

/// The disk tier: a [`BlockPool`] of checksummed slots in preallocated
/// files, recovered after a restart. See the module docs for the format and
/// the crash-safety argument.
pub struct DiskPool {
    dir: PathBuf,
    geometry: BlockGeometry,
    geometry_digest: u64,
    layout: SlotLayout,
    pool_id: u64,
    io: Arc<dyn FileIo>,
    files: Vec<Box<dyn IoFile>>,
    direct: bool,
    inner: Mutex<Inner>,
    next_generation: AtomicU64,
    /// Buffers for the header and metadata part of a slot.
    trailers: BufPool,
    /// Buffers for a whole slot (writes and reads that cannot go in place).
    bounces: BufPool,
    counters: Counters,
    report: OpenReport,
    journal_compact_bytes: u64,
    closed: AtomicBool,
    _lock: Box<dyn IoFile>,
}

impl fmt::Debug for DiskPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskPool")
            .field("dir", &self.dir)
            .field("geometry", &self.geometry)
            .field("slot_bytes", &self.layout.slot_bytes)
            .field("capacity", &self.layout.capacity)
            .field("used", &self.used())
            .field("direct", &self.direct)
            .finish()
    }
}

/// What recovery read from an existing pool.
struct Recovered {
    files: Vec<Box<dyn IoFile>>,
    journal: Journal,
    slots: Vec<SlotState>,
    next_generation: u64,
    tail_dropped: u64,
}

fn new_pool_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn damaged(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn record_len(meta_len: usize) -> u64 {
    (RECORD_HEAD_LEN + meta_len + RECORD_TAIL_LEN) as u64
}

impl DiskPool {
    /// Opens (or creates) the pool in the config's directory and returns
    /// the blocks it still holds; their slots come back allocated, all
    /// others free. A pool of another format version, geometry or slot
    /// layout is discarded (see [`OpenReport`]).
    pub fn open(config: DiskPoolConfig) -> Result<(DiskPool, Vec<RecoveredBlock>)> {
        let io = config.io.clone();
        let dir = config.dir.clone();
        io.create_dir_all(&dir)?;
        let lock = io.open(
            &dir.join(LOCK_FILE),
            OpenFlags {
                create: true,
                ..OpenFlags::EXISTING
            },
        )?;
        lock.try_lock_exclusive().map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                TierError::Io(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("disk pool directory {} is in use", dir.display()),
                ))
            } else {
                TierError::Io(e)
            }
        })?;
        remove_if_exists(&*io, &tmp_path(&dir.join(JOURNAL_FILE)))?;
        remove_if_exists(&*io, &tmp_path(&dir.join(POOL_FILE)))?;

        let g = config.geometry;
        let mut expected = PoolHeader {
            version: FORMAT_VERSION,
            block_bytes: g.block_bytes as u64,
            max_meta_bytes: g.max_meta_bytes as u64,
            layout_digest: g.layout_digest,
            slot_bytes: config.layout.slot_bytes,
            slots_per_file: config.layout.slots_per_file,
            capacity: config.layout.capacity,
            pool_id: 0,
        };
        let (outcome, recovered) = match read_whole_file(&*io, &dir.join(POOL_FILE))? {
            None => (OpenOutcome::Created, None),
            Some(bytes) => match parse_pool_header(&bytes) {
                Err(e) => (OpenOutcome::Discarded(format!("pool header: {e}")), None),
                Ok(found)
                    if PoolHeader {
                        pool_id: 0,
                        ..found
                    } != expected =>
                {
                    (
                        OpenOutcome::Discarded(format!(
                            "pool geometry or layout changed: found {found:?}, want {expected:?}"
                        )),
                        None,
                    )
                }
                Ok(found) => {
                    expected.pool_id = found.pool_id;
                    match Self::recover(&config, found.pool_id) {
                        Ok(r) => (OpenOutcome::Recovered, Some(r)),
                        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                            (OpenOutcome::Discarded(e.to_string()), None)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            },
        };
        let rec = match recovered {
            Some(r) => r,
            None => {
                expected.pool_id = new_pool_id();
                Self::create(&config, &expected)?
            }
        };
        let trailer_len = align_up(SLOT_HEADER_LEN + g.max_meta_bytes);
        let direct = rec.files.iter().all(|f| f.is_direct());
        let cap = config.layout.capacity;
        let free: Vec<u32> = (0..cap)
            .rev()
            .filter(|&s| matches!(rec.slots[s as usize], SlotState::Free))
            .collect();
        let mut pool = DiskPool {
            dir,
            geometry: g,
            geometry_digest: geometry_digest(&g),
            layout: config.layout,
            pool_id: expected.pool_id,
            io,
            files: rec.files,
            direct,
            inner: Mutex::new(Inner {
                slots: rec.slots,
                free,
                journal: rec.journal,
            }),
            next_generation: AtomicU64::new(rec.next_generation),
            // A batched write takes a trailer per slot of its run.
            trailers: BufPool::new(trailer_len, RUN_SLOTS),
            bounces: BufPool::new(config.layout.slot_bytes as usize, SPARE_BUFFERS),
            counters: Counters::default(),
            report: OpenReport {
                outcome,
                recovered: 0,
                dropped: 0,
                journal_tail_dropped: rec.tail_dropped,
            },
            journal_compact_bytes: config.journal_compact_bytes,
            closed: AtomicBool::new(false),
            _lock: lock,
        };
        if config.verify_on_open {
            let bad = pool.verify_live();
            pool.report.dropped = bad.len();
            for s in bad {
                pool.free(SlotId(s));
            }
        }
        let blocks: Vec<RecoveredBlock> = {
            let mut inner = pool.inner.lock();
            pool.maybe_compact(&mut inner);
            inner
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| match s {
                    SlotState::Ready(e) => Some(RecoveredBlock {
                        slot: SlotId(i as u32),
                        meta: e.meta.to_vec(),
                    }),
                    _ => None,
                })
                .collect()
        };
        pool.report.recovered = blocks.len();
        Ok((pool, blocks))
    }

    /// Reads an existing pool's files. `InvalidData` errors mean the pool is
    /// damaged (discard it); other errors are real I/O failures.
    fn recover(config: &DiskPoolConfig, pool_id: u64) -> io::Result<Recovered> {
        let io = &*config.io;
        let layout = config.layout;
        let mut files = Vec::with_capacity(layout.files());
        for i in 0..layout.files() {
            let path = config.dir.join(slot_file_name(i));
            let flags = OpenFlags {
                direct: true,
                ..OpenFlags::EXISTING
            };
            let file = match io.open(&path, flags) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(damaged(format!("slot file {} is missing", path.display())))
                }
                Err(e) => return Err(e),
            };
            if file.size()? != layout.file_len(i) {
                return Err(damaged(format!(
                    "slot file {} has the wrong size",
                    path.display()
                )));
            }
            files.push(file);
        }
        let jpath = config.dir.join(JOURNAL_FILE);
        let bytes = read_whole_file(io, &jpath)?.ok_or_else(|| damaged("journal is missing"))?;
        let scan = parse_journal(&bytes).map_err(|e| damaged(format!("journal: {e}")))?;
        if scan.header.pool_id != pool_id {
            return Err(damaged("journal belongs to another pool"));
        }
        let cap = layout.capacity as usize;
        let mut slots: Vec<SlotState> = (0..cap).map(|_| SlotState::Free).collect();
        let mut next_generation = scan.header.next_generation;
        let mut valid_len = JOURNAL_HEADER_LEN as u64;
        let mut index = 0u64;
        for rec in &scan.records {
            let slot = rec.slot as usize;
            if slot >= cap || rec.meta.len() > config.geometry.max_meta_bytes {
                break; // Not a record this pool wrote: treat as the tail.
            }
            match rec.kind {
                RecordKind::Put => {
                    slots[slot] = SlotState::Ready(Arc::new(Expect {
                        generation: rec.generation,
                        checksum: rec.checksum,
                        meta: rec.meta.into(),
                    }))
                }
                RecordKind::Free => {
                    if matches!(&slots[slot], SlotState::Ready(e) if e.generation == rec.generation)
                    {
                        slots[slot] = SlotState::Free;
                    }
                }
            }
            next_generation = next_generation.max(rec.generation.saturating_add(1));
            valid_len += rec.len() as u64;
            index += 1;
        }
        let file = io.open(&jpath, OpenFlags::EXISTING)?;
        let tail_dropped = bytes.len() as u64 - valid_len;
        if tail_dropped > 0 {
            file.set_len(valid_len)?;
        }
        let live_bytes = slots
            .iter()
            .map(|s| match s {
                SlotState::Ready(e) => record_len(e.meta.len()),
                _ => 0,
            })
            .sum();
        Ok(Recovered {
            files,
            journal: Journal {
                file,
                end: valid_len,
                index,
                live_bytes,
                scratch: Vec::new(),
            },
            slots,
            next_generation,
            tail_dropped,
        })
    }

    /// Removes whatever is in the directory and creates an empty pool.
    fn create(config: &DiskPoolConfig, header: &PoolHeader) -> io::Result<Recovered> {
        let io = &*config.io;
        let dir = &config.dir;
        // The pool header goes first and comes back last: a crash anywhere
        // in between leaves no header, and the next open starts over.
        remove_if_exists(io, &dir.join(POOL_FILE))?;
        io.sync_dir(dir)?;
        remove_if_exists(io, &dir.join(JOURNAL_FILE))?;
        for path in io.list_dir(dir)? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(SLOT_FILE_PREFIX) && name.ends_with(SLOT_FILE_SUFFIX) {
                io.remove_file(&path)?;
            }
        }
        let layout = config.layout;
        let mut files = Vec::with_capacity(layout.files());
        for i in 0..layout.files() {
            let flags = OpenFlags {
                create: true,
                truncate: true,
                direct: true,
            };
            let file = io.open(&dir.join(slot_file_name(i)), flags)?;
            file.allocate(layout.file_len(i))?;
            file.sync_data()?;
            files.push(file);
        }
        let jheader = JournalHeader {
            pool_id: header.pool_id,
            next_generation: 1,
        };
        let jpath = dir.join(JOURNAL_FILE);
        replace_file(io, &jpath, &jheader.encode())?;
        replace_file(io, &dir.join(POOL_FILE), &header.encode())?;
        let file = io.open(&jpath, OpenFlags::EXISTING)?;
        Ok(Recovered {
            files,
            journal: Journal {
                file,
                end: JOURNAL_HEADER_LEN as u64,
                index: 0,
                live_bytes: 0,
                scratch: Vec::new(),
            },
            slots: (0..layout.capacity).map(|_| SlotState::Free).collect(),
            next_generation: 1,
            tail_dropped: 0,
        })
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the slot files use `O_DIRECT` (false: the file system
    /// refused it, or the config's I/O is buffered).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Bytes of one slot on disk.
    pub fn slot_bytes(&self) -> u64 {
        self.layout.slot_bytes
    }

    /// What open did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Blocks that failed their checks since open.
    pub fn corrupt_blocks(&self) -> u64 {
        self.counters.corrupt.load(Ordering::Relaxed)
    }

    /// Failed I/O calls since open.
    pub fn io_errors(&self) -> u64 {
        self.counters.io_errors.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        DiskStats {
            corrupt_blocks: c.corrupt.load(Ordering::Relaxed),
            io_errors: c.io_errors.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            write_ios: c.write_ios.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            journal_bytes: self.inner.lock().journal.end,
            journal_compactions: c.compactions.load(Ordering::Relaxed),
        }
    }

    /// Makes every completed write and free durable (data files, then the
    /// journal).
    pub fn sync(&self) -> Result<()> {
        let r = self.sync_inner();
        if r.is_err() {
            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(TierError::Io)
    }

    fn sync_inner(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        self.inner.lock().journal.file.sync_data()
    }

    /// Syncs and closes the pool (dropping it does the same, ignoring
    /// errors).
    pub fn close(self) -> Result<()> {
        self.closed.store(true, Ordering::Relaxed);
        self.sync()
    }

    fn io_error(&self, e: io::Error) -> TierError {
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        TierError::Io(e)
    }

    fn check_slot_id(&self, slot: SlotId) -> Result<u32> {
        if slot.0 >= self.layout.capacity {
            return Err(TierError::NoSuchSlot {
                slot,
                capacity: self.layout.capacity,
            });
        }
        Ok(slot.0)
    }

    /// Whether `buf` (a whole block) can go to the device in place.
    fn in_place(&self, buf: &[u8]) -> bool {
        !self.direct || is_direct_aligned(buf)
    }

    /// Bytes of header and metadata to transfer for a block with `meta_len`
    /// bytes of metadata, when the data goes in place.
    fn trailer_io_len(&self, meta_len: usize) -> usize {
        let n = SLOT_HEADER_LEN + meta_len;
        if self.direct {
            align_up(n)
        } else {
            n
        }
    }

    /// Whether `trailer` and `data` are the block the pool expects in
    /// `slot`. Compares cheap fields first, the checksum last.
    fn matches(&self, slot: u32, exp: &Expect, data: &[u8], trailer: &[u8]) -> bool {
        let Ok(h) = parse_slot_header(trailer) else {
            return false;
        };
        let meta_end = SLOT_HEADER_LEN + exp.meta.len();
        h.geometry_digest == self.geometry_digest
            && h.pool_id == self.pool_id
            && h.slot == slot
            && h.generation == exp.generation
            && h.checksum == exp.checksum
            && h.meta_len as usize == exp.meta.len()
            && h.data_len == data.len() as u64
            && trailer.get(SLOT_HEADER_LEN..meta_end) == Some(&exp.meta[..])
            && slot_checksum(&trailer[..56], &exp.meta, data) == exp.checksum
    }

    /// Appends a record to the journal; on failure the journal is cut back
    /// to its end so the next record lands where this one should have.
    fn append(&self, journal: &mut Journal, rec: &JournalRecord<'_>) -> io::Result<()> {
        let mut buf = std::mem::take(&mut journal.scratch);
        buf.clear();
        rec.encode_into(&mut buf, self.pool_id, journal.index);
        let r = write_all_at(&*journal.file, &buf, journal.end);
        match &r {
            Ok(()) => {
                journal.end += buf.len() as u64;
                journal.index += 1;
            }
            Err(_) => {
                let _ = journal.file.set_len(journal.end);
            }
        }
        journal.scratch = buf;
        r
    }

    /// Compacts the journal if it is past twice its live size and the floor.
    fn maybe_compact(&self, inner: &mut Inner) {
        let j = &inner.journal;
        let live = JOURNAL_HEADER_LEN as u64 + j.live_bytes;
        if j.end > self.journal_compact_bytes.max(2 * live) {
            if let Err(e) = self.compact(inner) {
                self.io_error(e);
            }
        }
    }

    /// Rewrites the journal as a header and one `Put` per live slot.
    fn compact(&self, inner: &mut Inner) -> io::Result<()> {
        // Records of the new journal claim their blocks are on the device:
        // make it so before the new journal can be durable.
        for f in &self.files {
            f.sync_data()?;
        }
        let header = JournalHeader {
            pool_id: self.pool_id,
            next_generation: self.next_generation.load(Ordering::Relaxed),
        };
        let mut buf =
            Vec::with_capacity((JOURNAL_HEADER_LEN as u64 + inner.journal.live_bytes) as usize);
        buf.extend_from_slice(&header.encode());
        let mut index = 0u64;
        for (slot, s) in inner.slots.iter().enumerate() {
            if let SlotState::Ready(e) = s {
                JournalRecord {
                    kind: RecordKind::Put,
                    slot: slot as u32,
                    generation: e.generation,
                    checksum: e.checksum,
                    meta: &e.meta,
                }
                .encode_into(&mut buf, self.pool_id, index);
                index += 1;
            }
        }
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = tmp_path(&path);
        let flags = OpenFlags {
            create: true,
            truncate: true,
            direct: false,
        };
        let file = self.io.open(&tmp, flags)?;
        write_all_at(&*file, &buf, 0)?;
        file.sync_data()?;
        self.io.rename(&tmp, &path)?;
        // From here the new file is the journal, whatever happens next.
        inner.journal.file = file;
        inner.journal.end = buf.len() as u64;
        inner.journal.index = index;
        inner.journal.live_bytes = buf.len() as u64 - JOURNAL_HEADER_LEN as u64;
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.io.sync_dir(&self.dir)
    }

    /// Reads every live slot in large batches and returns those that fail.
    fn verify_live(&self) -> Vec<u32> {
        let expects: Vec<Option<Arc<Expect>>> = self
            .inner
            .lock()
            .slots
            .iter()
            .map(|s| match s {
                SlotState::Ready(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        let layout = self.layout;
        let slot_bytes = layout.slot_bytes as usize;
        let per_chunk = (VERIFY_CHUNK_BYTES / slot_bytes).max(1) as u32;
        // Chunks: (first slot, slot count), never across a file boundary.
        let mut chunks = Vec::new();
        for f in 0..layout.files() as u32 {
            let first = f * layout.slots_per_file;
            let end = (first + layout.slots_per_file).min(layout.capacity);
            let mut s = first;
            while s < end {
                let n = per_chunk.min(end - s);
                if expects[s as usize..(s + n) as usize]
                    .iter()
                    .any(Option::is_some)
                {
                    chunks.push((s, n));
                }
                s += n;
            }
        }
        let next = AtomicUsize::new(0);
        let bad = Mutex::new(Vec::new());
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(2, 4)
            .min(chunks.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    let mut buf = AlignedBuf::zeroed(per_chunk as usize * slot_bytes);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(first, n)) = chunks.get(i) else {
                            break;
                        };
                        let len = n as usize * slot_bytes;
                        buf.set_len(len);
                        let (file, off) = layout.place(first);
                        let ok = match read_exact_at(&*self.files[file], &mut buf, off) {
                            Ok(()) => true,
                            Err(_) => {
                                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                                false
                            }
                        };
                        self.counters
                            .bytes_read
                            .fetch_add(len as u64, Ordering::Relaxed);
                        for j in 0..n {
                            let slot = first + j;
                            let Some(exp) = &expects[slot as usize] else {
                                continue;
                            };
                            let image =
                                &buf[j as usize * slot_bytes..(j as usize + 1) * slot_bytes];
                            let (data, trailer) = image.split_at(self.geometry.block_bytes);
                            if !ok || !self.matches(slot, exp, data, trailer) {
                                if ok {
                                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                                }
                                bad.lock().push(slot);
                            }
                        }
                    }
                });
            }
        });
        bad.into_inner()
    }

    /// The slot header of a block, and its checksum.
    fn slot_header(
        &self,
        slot: u32,
        data: &[u8],
        meta: &[u8],
        generation: u64,
    ) -> ([u8; SLOT_HEADER_LEN], u64) {
        let mut header = SlotHeader {
            geometry_digest: self.geometry_digest,
            generation,
            slot,
            meta_len: meta.len() as u32,
            data_len: data.len() as u64,
            pool_id: self.pool_id,
            checksum: 0,
        }
        .encode();
        let checksum = slot_checksum(&header[..56], meta, data);
        header[56..].copy_from_slice(&checksum.to_le_bytes());
        (header, checksum)
    }

    fn write_io(&self, slot: u32, data: &[u8], meta: &[u8], generation: u64) -> io::Result<u64> {
        let (header, checksum) = self.slot_header(slot, data, meta, generation);
        self.counters.write_ios.fetch_add(1, Ordering::Relaxed);
        let (file, off) = self.layout.place(slot);
        let file = &*self.files[file];
        let tlen = SLOT_HEADER_LEN + meta.len();
        if self.in_place(data) {
            let mut t = self.trailers.take();
            let io_len = self.trailer_io_len(meta.len());
            t.set_len(io_len);
            t[..SLOT_HEADER_LEN].copy_from_slice(&header);
            t[SLOT_HEADER_LEN..tlen].copy_from_slice(meta);
            t[tlen..].fill(0);
            let r = write_all_vectored_at(file, &[data, &t], off);
            self.trailers.give(t);
            r?;
            self.counters
                .bytes_written
                .fetch_add((data.len() + io_len) as u64, Ordering::Relaxed);
        } else {
            let mut b = self.bounces.take();
            let block = data.len();
            let len = align_up(block + tlen);
            b.set_len(len);
            b[..block].copy_from_slice(data);
            b[block..block + SLOT_HEADER_LEN].copy_from_slice(&header);
            b[block + SLOT_HEADER_LEN..block + tlen].copy_from_slice(meta);
            b[block + tlen..].fill(0);
            let r = write_all_at(file, &b, off);
            self.bounces.give(b);
            r?;
            self.counters
                .bytes_written
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(checksum)
    }

    /// Marks a freshly allocated (or failed) slot as being written: a slot
    /// is written once per allocation.
    fn claim(&self, inner: &mut Inner, s: u32) -> Result<()> {
        let state = &mut inner.slots[s as usize];
        if !matches!(state, SlotState::Reserved | SlotState::Failed) {
            return Err(TierError::Empty(SlotId(s)));
        }
        *state = SlotState::Writing;
        Ok(())
    }

    /// Ends a write of slot `s`: records a block that reached the file in
    /// the journal and makes it readable, releases a slot freed meanwhile,
    /// or marks the slot failed.
    fn finish_write(
        &self,
        inner: &mut Inner,
        s: u32,
        generation: u64,
        written: Result<u64>,
        meta: &[u8],
    ) -> Result<()> {
        if matches!(inner.slots[s as usize], SlotState::Abandoned) {
            // Freed under the write: nothing to record, release it now.
            inner.slots[s as usize] = SlotState::Free;
            inner.free.push(s);
            return written.and(Err(TierError::Empty(SlotId(s))));
        }
        debug_assert!(matches!(inner.slots[s as usize], SlotState::Writing));
        let checksum = match written {
            Ok(c) => c,
            Err(e) => {
                inner.slots[s as usize] = SlotState::Failed;
                return Err(e);
            }
        };
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        let rec = JournalRecord {
            kind: RecordKind::Put,
            slot: s,
            generation,
            checksum,
            meta,
        };
        if let Err(e) = self.append(&mut inner.journal, &rec) {
            inner.slots[s as usize] = SlotState::Failed;
            return Err(self.io_error(e));
        }
        inner.journal.live_bytes += rec.len() as u64;
        inner.slots[s as usize] = SlotState::Ready(Arc::new(Expect {
            generation,
            checksum,
            meta: meta.into(),
        }));
        Ok(())
    }

    /// How many of `claimed` (sorted by slot) go in the first I/O: slots
    /// that follow each other in one file, each block aligned for
    /// `O_DIRECT` where the pool uses it, within the run's limits.
    fn run_len(&self, claimed: &[(u32, usize, u64)], writes: &[BlockWrite<'_>]) -> usize {
        let first = claimed[0].0;
        let (file, _) = self.layout.place(first);
        let per_run_bytes = (RUN_BYTES as u64 / self.layout.slot_bytes).max(1) as usize;
        let max = RUN_SLOTS.min(per_run_bytes);
        // A run's blocks sit at the start of their slot images, so the
        // space between two blocks must be exactly one full trailer.
        if self.geometry.block_bytes as u64 + self.trailers.len as u64 != self.layout.slot_bytes {
            return 1;
        }
        let mut n = 0;
        for &(s, i, _) in claimed.iter().take(max) {
            if s != first + n as u32
                || self.layout.place(s).0 != file
                || !self.in_place(writes[i].data)
            {
                break;
            }
            n += 1;
        }
        n.max(1)
    }

    /// Writes a run of adjacent slots as one vectored write straight from
    /// the callers' buffers, each followed by its header and metadata; one
    /// result per slot pushed onto `written`. A failed I/O fails the whole
    /// run (counted as one I/O error).
    fn write_run(
        &self,
        run: &[(u32, usize, u64)],
        writes: &[BlockWrite<'_>],
        written: &mut Vec<Result<u64>>,
    ) {
        let mut trailers: Vec<AlignedBuf> = Vec::with_capacity(run.len());
        let mut checksums: Vec<u64> = Vec::with_capacity(run.len());
        for (k, &(s, i, generation)) in run.iter().enumerate() {
            let w = &writes[i];
            let (header, checksum) = self.slot_header(s, w.data, w.meta, generation);
            let mut t = self.trailers.take();
            // The last trailer ends the I/O; the others fill their slot up
            // to the next block.
            if k + 1 == run.len() {
                t.set_len(self.trailer_io_len(w.meta.len()));
            }
            let tlen = SLOT_HEADER_LEN + w.meta.len();
            t[..SLOT_HEADER_LEN].copy_from_slice(&header);
            t[SLOT_HEADER_LEN..tlen].copy_from_slice(w.meta);
            t[tlen..].fill(0);
            trailers.push(t);
            checksums.push(checksum);
        }
        let mut iov: Vec<&[u8]> = Vec::with_capacity(2 * run.len());
        for (&(_, i, _), t) in run.iter().zip(&trailers) {
            iov.push(writes[i].data);
            iov.push(t);
        }
        let bytes: usize = iov.iter().map(|b| b.len()).sum();
        let (file, off) = self.layout.place(run[0].0);
        let r = write_all_vectored_at(&*self.files[file], &iov, off);
        drop(iov);
        for t in trailers {
            self.trailers.give(t);
        }
        self.counters.write_ios.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) => {
                self.counters
                    .bytes_written
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                written.extend(checksums.into_iter().map(Ok));
            }
            Err(e) => {
                let kind = e.kind();
                let message = e.to_string();
                written.push(Err(self.io_error(e)));
                written.extend(
                    (1..run.len())
                        .map(|_| Err(TierError::Io(io::Error::new(kind, message.clone())))),
                );
            }
        }
    }

    /// Reads a slot into `out`; `Ok(false)` if it is not the expected block.
    fn read_io(&self, slot: u32, exp: &Expect, out: &mut [u8]) -> io::Result<bool> {
        let (file, off) = self.layout.place(slot);
        let file = &*self.files[file];
        if self.in_place(out) {
            let mut t = self.trailers.take();
            let io_len = self.trailer_io_len(exp.meta.len());
            t.set_len(io_len);
            let r = read_exact_vectored_at(file, &mut [&mut *out, &mut t], off);
            let ok = r.is_ok() && self.matches(slot, exp, out, &t);
            self.trailers.give(t);
            r?;
            self.counters
                .bytes_read
                .fetch_add((out.len() + io_len) as u64, Ordering::Relaxed);
            Ok(ok)
        } else {
            let mut b = self.bounces.take();
            let block = out.len();
            let len = align_up(block + SLOT_HEADER_LEN + exp.meta.len());
            b.set_len(len);
            let r = read_exact_at(file, &mut b, off);
            let ok = r.is_ok() && {
                let (data, trailer) = b.split_at(block);
                self.matches(slot, exp, data, trailer)
            };
            if ok {
                out.copy_from_slice(&b[..block]);
            }
            self.bounces.give(b);
            r?;
            self.counters
                .bytes_read
                .fetch_add(len as u64, Ordering::Relaxed);
            Ok(ok)
        }
    }
}

impl BlockPool for DiskPool {
    fn medium(&self) -> Medium {
        Medium::Disk
    }

    fn geometry(&self) -> &BlockGeometry {
        &self.geometry
    }

    fn capacity(&self) -> u32 {
        self.layout.capacity
    }

    fn used(&self) -> u32 {
        self.layout.capacity - self.inner.lock().free.len() as u32
    }

    fn allocate(&self) -> Result<SlotId> {
        let mut inner = self.inner.lock();
        let slot = inner.free.pop().ok_or(TierError::Full)?;
        debug_assert!(matches!(inner.slots[slot as usize], SlotState::Free));
        inner.slots[slot as usize] = SlotState::Reserved;
        Ok(SlotId(slot))
    }

    /// Writes a block (one `pwritev` of the slot image), then records it in
    /// the journal. A slot is written once per allocation (again only after
    /// a failed write): a write into a slot that is free, being written or
    /// already holds a block is [`TierError::Empty`].
    fn write(&self, slot: SlotId, data: &[u8], meta: &[u8]) -> Result<()> {
        let s = self.check_slot_id(slot)?;
        self.geometry.check_write(data, meta)?;
        self.claim(&mut self.inner.lock(), s)?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let written = self
            .write_io(s, data, meta, generation)
            .map_err(|e| self.io_error(e));
        let mut inner = self.inner.lock();
        let r = self.finish_write(&mut inner, s, generation, written, meta);
        self.maybe_compact(&mut inner);
        r
    }

    /// Writes many blocks, slots next to each other in one file as one
    /// `pwritev` (up to [`RUN_SLOTS`] slots, [`RUN_BYTES`] bytes): a
    /// demotion batch costs a few large I/Os and their completions instead
    /// of one per block. Each block is recorded in the journal only after
    /// the I/O that carried it returned, as with [`write`](Self::write).
    fn write_many(&self, writes: &[BlockWrite<'_>]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(writes.len());
        // (slot, index into `writes`, generation) of the blocks claimed.
        let mut claimed: Vec<(u32, usize, u64)> = Vec::with_capacity(writes.len());
        {
            let mut inner = self.inner.lock();
            for (i, w) in writes.iter().enumerate() {
                let r = self.check_slot_id(w.slot).and_then(|s| {
                    self.geometry.check_write(w.data, w.meta)?;
                    self.claim(&mut inner, s)?;
                    Ok(s)
                });
                match r {
                    Ok(s) => {
                        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                        claimed.push((s, i, generation));
                        results.push(Ok(()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
        }
        claimed.sort_unstable_by_key(|c| c.0);
        let mut written: Vec<Result<u64>> = Vec::with_capacity(claimed.len());
        let mut rest = &claimed[..];
        while !rest.is_empty() {
            let run = self.run_len(rest, writes);
            if run == 1 {
                let (s, i, generation) = rest[0];
                let w = &writes[i];
                written.push(
                    self.write_io(s, w.data, w.meta, generation)
                        .map_err(|e| self.io_error(e)),
                );
            } else {
                self.write_run(&rest[..run], writes, &mut written);
            }
            rest = &rest[run..];
        }
        let mut inner = self.inner.lock();
        for (&(s, i, generation), w) in claimed.iter().zip(written) {
            results[i] = self.finish_write(&mut inner, s, generation, w, writes[i].meta);
        }
        self.maybe_compact(&mut inner);
        results
    }

    /// Reads and checks a block. On [`TierError::Corrupt`] or an I/O error
    /// `out` is zeroed.
    fn read(&self, slot: SlotId, out: &mut [u8]) -> Result<()> {
        let s = self.check_slot_id(slot)?;
        self.geometry.check_block_len(out.len())?;
        let exp = match &self.inner.lock().slots[s as usize] {
            SlotState::Ready(e) => e.clone(),
            _ => return Err(TierError::Empty(slot)),
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        match self.read_io(s, &exp, out) {
            Ok(true) => Ok(()),
            Ok(false) => {
                out.fill(0);
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                Err(TierError::Corrupt(slot))
            }
            Err(e) => {
                out.fill(0);
                Err(self.io_error(e))
            }
        }
    }

    /// Frees a slot; a block in it is recorded as freed in the journal, so
    /// it does not come back after a restart. A slot freed while a write to
    /// it is under way is released when that write ends.
    fn free(&self, slot: SlotId) {
        let Ok(s) = self.check_slot_id(slot) else {
            debug_assert!(false, "free of {slot:?} outside the pool");
            return;
        };
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        match std::mem::replace(&mut inner.slots[s as usize], SlotState::Free) {
            SlotState::Free => {
                debug_assert!(false, "double free of {slot:?}");
                return;
            }
            SlotState::Abandoned => {
                inner.slots[s as usize] = SlotState::Abandoned;
                debug_assert!(false, "double free of {slot:?}");
                return;
            }
            SlotState::Writing => {
                // The write releases the slot when it ends.
                inner.slots[s as usize] = SlotState::Abandoned;
                return;
            }
            SlotState::Ready(e) => {
                let rec = JournalRecord {
                    kind: RecordKind::Free,
                    slot: s,
                    generation: e.generation,
                    checksum: 0,
                    meta: &[],
                };
                inner.journal.live_bytes -= record_len(e.meta.len());
                if let Err(err) = self.append(&mut inner.journal, &rec) {
                    // The block may come back after a restart: intact and
                    // with its own metadata, so harmless (module docs).
                    self.io_error(err);
                }
            }
            SlotState::Reserved | SlotState::Failed => {}
        }
        inner.free.push(s);
        self.maybe_compact(inner);
    }
}

impl Drop for DiskPool {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Relaxed) {
            let _ = self.sync_inner();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_journal() -> Vec<u8> {
        let mut b = JournalHeader {
            pool_id: 42,
            next_generation: 7,
        }
        .encode()
        .to_vec();
        for i in 0..5u32 {
            let meta = vec![i as u8; i as usize * 3];
            JournalRecord {
                kind: if i % 2 == 0 {
                    RecordKind::Put
                } else {
                    RecordKind::Free
                },
                slot: i,
                generation: 10 + i as u64,
                checksum: 99,
                meta: if i % 2 == 0 { &meta } else { &[] },
            }
            .encode_into(&mut b, 42, i as u64);
        }
        b
    }

    #[test]
    fn headers_round_trip() {
        let p = PoolHeader {
            version: FORMAT_VERSION,
            block_bytes: 5000,
            max_meta_bytes: 300,
            layout_digest: 0xfeed,
            slot_bytes: 8192,
            slots_per_file: 10,
            capacity: 25,
            pool_id: 77,
        };
        assert_eq!(parse_pool_header(&p.encode()), Ok(p));
        let mut other = p;
        other.version = 2;
        assert_eq!(
            parse_pool_header(&other.encode()),
            Err(FormatError::Version(2))
        );
        let s = SlotHeader {
            geometry_digest: 1,
            generation: 2,
            slot: 3,
            meta_len: 4,
            data_len: 5,
            pool_id: 6,
            checksum: 7,
        };
        assert_eq!(parse_slot_header(&s.encode()), Ok(s));
    }

    #[test]
    fn check_slot_catches_every_flip() {
        let data = vec![5u8; 100];
        let meta = b"meta!".to_vec();
        let mut trailer = SlotHeader {
            geometry_digest: 1,
            generation: 2,
            slot: 3,
            meta_len: meta.len() as u32,
            data_len: data.len() as u64,
            pool_id: 6,
            checksum: 0,
        }
        .encode()
        .to_vec();
        trailer.extend_from_slice(&meta);
        let sum = slot_checksum(&trailer[..56], &meta, &data);
        trailer[56..64].copy_from_slice(&sum.to_le_bytes());
        assert!(check_slot(&trailer, &data).is_ok());
        for i in 0..trailer.len() {
            let mut t = trailer.clone();
            t[i] ^= 0x10;
            assert!(check_slot(&t, &data).is_err(), "flip at {i}");
        }
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 1;
            assert!(check_slot(&trailer, &d).is_err());
        }
    }

    #[test]
    fn journal_parses_and_stops_at_damage() {
        let b = sample_journal();
        let scan = parse_journal(&b).unwrap();
        assert_eq!(scan.records.len(), 5);
        assert_eq!(scan.valid_len, b.len());
        assert_eq!(scan.records[2].meta, &[2u8; 6][..]);
        // Any truncation keeps a prefix of the records.
        for cut in JOURNAL_HEADER_LEN..b.len() {
            let s = parse_journal(&b[..cut]).unwrap();
            assert!(s.valid_len <= cut);
            assert_eq!(s.records[..], scan.records[..s.records.len()]);
        }
        // A flipped byte in a record ends the journal there.
        let mut d = b.clone();
        let second = JOURNAL_HEADER_LEN + scan.records[0].len();
        d[second + 9] ^= 1;
        assert_eq!(parse_journal(&d).unwrap().records.len(), 1);
        // Records of another pool (or at another index) do not parse.
        let mut other = JournalHeader {
            pool_id: 43,
            next_generation: 7,
        }
        .encode()
        .to_vec();
        other.extend_from_slice(&b[JOURNAL_HEADER_LEN..]);
        assert_eq!(parse_journal(&other).unwrap().records.len(), 0);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_pool_header(&bytes);
            let _ = parse_slot_header(&bytes);
            let _ = check_slot(&bytes, &bytes[bytes.len() / 2..]);
            let _ = parse_journal(&bytes);
        }

        #[test]
        fn damaged_journals_never_panic(cut in 0usize..400, flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..4)) {
            let mut b = sample_journal();
            for (at, x) in flips {
                if let Some(v) = b.get_mut(at) {
                    *v ^= x;
                }
            }
            b.truncate(cut);
            if let Ok(s) = parse_journal(&b) {
                prop_assert!(s.valid_len <= b.len());
            }
        }
    }
}
