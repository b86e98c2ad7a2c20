//! The `Cache`: the index and the block pools behind one handle.
//!
//! Bytes never move while an index lock is held: the index only records
//! where copies are, and a new copy is recorded only once fully written.
//! A move's source slot cannot be freed and reused under it: promotions and
//! write-throughs pin their pages with leases, and demotions run under the
//! tier's demoter lock, held by the only code that drops copies of a tier
//! with a tier below it.

use crate::config::{CacheConfig, WriteMode};
use crate::error::{CacheError, Result};
use crate::meta;

mod maintenance;
mod shm;
use parking_lot::Mutex;
use radix_tree::{
    BlockId, Candidate, EvictedPage, IndexConfig, IndexError, InsertHints, Lease, NamespaceConfig,
    NamespaceId, NamespaceKey, PageHash, PageLocation, PinKind, RadixIndex, Tier, TIERS,
};
pub use shm::HostReservation;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tiers::disk::{DiskPool, DiskPoolConfig};
use tiers::host::{BlockRef, HostPool, HostPoolConfig};
use tiers::mover::{Move, Mover, Ticket};
use tiers::{BlockGeometry, BlockPool, SlotId, TierError};

/// Longest namespace key a block's metadata may carry.
const MAX_KEY_BYTES: usize = 1024;
/// Pages evicted at once when a tier is full.
const ROOM_BATCH: usize = 32;
/// Most pages one locked index call changes while making room: short
/// holds let lookups spin past a demotion instead of sleeping behind it.
const LOCK_CHUNK: usize = 8;

/// Most pages one store inserts under one lock.
const STORE_CHUNK: usize = 16;

/// `total` split into lock-sized chunks.
fn chunks(total: usize) -> impl Iterator<Item = usize> {
    (0..total)
        .step_by(LOCK_CHUNK)
        .map(move |start| LOCK_CHUNK.min(total - start))
}
/// How long a move holds its pages pinned at most (a stuck disk must not
/// wedge the cache).
const MOVE_LEASE: Duration = Duration::from_secs(60);

/// The geometry of a cache's blocks: what a shared-memory client checks
/// the host tier's file against.
pub fn block_geometry(page_size: usize, block_bytes: usize, layout: &str) -> Result<BlockGeometry> {
    let layout_digest = xxhash_rust::xxh3::xxh3_64(layout.as_bytes());
    let max_meta = meta::max_len(
        &NamespaceKey::new("x".repeat(MAX_KEY_BYTES), "", "", ""),
        page_size,
    );
    Ok(BlockGeometry::new(block_bytes, max_meta, layout_digest)?)
}

/// Counters of the facade (the index and the pools keep their own).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Blocks that failed their checksum on read and became misses.
    pub corrupt_blocks: AtomicU64,
    /// Tier reads or writes that failed with an I/O error.
    pub io_errors: AtomicU64,
    pub demotions: AtomicU64,
    pub promotions: AtomicU64,
    pub write_throughs: AtomicU64,
    /// Pages a store could not keep because a tier was full of pinned pages.
    pub store_rejections: AtomicU64,
    /// Pages stored through shared memory (reserved, written in place,
    /// committed).
    pub shm_commits: AtomicU64,
}

/// What a lookup may do besides matching.
#[derive(Debug, Clone, Copy, Default)]
pub struct LookupOptions {
    /// Pin the matched pages for this long (a hard lease).
    pub lease: Option<Duration>,
    /// Start copying matched pages that are only on disk into host RAM.
    pub promote: bool,
}

/// The answer to a lookup.
#[derive(Debug)]
pub struct Lookup {
    /// Whole pages cached from the start of the prompt (the leased ones, if
    /// a lease was asked for).
    pub pages: usize,
    pub page_size: usize,
    /// Each page's copies.
    pub locations: Vec<PageLocation>,
    /// Each page's hash.
    pub hashes: Vec<PageHash>,
    pub lease: Option<Lease>,
    /// Promotions under way; wait with [`Cache::wait`].
    pub prefetch: Option<PrefetchId>,
}

impl Lookup {
    pub fn tokens(&self) -> usize {
        self.pages * self.page_size
    }

    /// Pages whose fastest copy is on each tier.
    pub fn fastest_pages(&self) -> [usize; TIERS] {
        let mut counts = [0; TIERS];
        for l in &self.locations {
            if let Some(t) = l.fastest() {
                counts[t.index()] += 1;
            }
        }
        counts
    }
}

/// What a store did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOutcome {
    /// Leading pages that were cached already.
    pub cached_pages: usize,
    /// Pages written by this store.
    pub stored_pages: usize,
}

/// A batch of moves in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefetchId(u64);

#[derive(Debug)]
struct Pending {
    id: u64,
    ticket: Ticket,
    /// For each move: the page, the tier it is read from and the tier its
    /// new copy lands on.
    targets: Vec<MoveTarget>,
    leases: Vec<Lease>,
    kind: MoveKind,
}

/// A move's page, source tier and destination tier.
type MoveTarget = (NamespaceId, PageHash, Tier, Tier);

#[derive(Debug, Clone, Copy)]
enum MoveKind {
    Promotion,
    WriteThrough,
}

/// The index and the pools behind one handle; see the crate docs.
#[derive(Debug)]
pub struct Cache {
    config: CacheConfig,
    index: RadixIndex,
    host: Arc<HostPool>,
    disk: Option<Arc<DiskPool>>,
    pools: [Option<Arc<dyn BlockPool>>; TIERS],
    mover: Mover,
    pending: Mutex<Vec<Pending>>,
    next_pending: AtomicU64,
    namespaces: Mutex<HashMap<NamespaceId, Vec<u8>>>,
    /// Held by the one caller making room on each tier.
    room_locks: [Mutex<()>; TIERS],
    /// Copies that failed their checks while a lease covered their page
    /// (a leased page's copies cannot be dropped): dropped once none does.
    bad_copies: Mutex<Vec<(NamespaceId, PageHash, Tier, BlockId)>>,
    stats: CacheStats,
}

impl Cache {
    /// Builds the pools, and rebuilds the index from the disk tier's blocks
    /// when there is one (a warm restart).
    pub fn open(config: CacheConfig) -> Result<Cache> {
        let geometry = block_geometry(config.page_size, config.block_bytes, &config.layout)?;
        let max_meta = geometry.max_meta_bytes;
        if let Some(device) = &config.device {
            if device.geometry().max_meta_bytes < max_meta {
                return Err(CacheError::InvalidConfig(format!(
                    "the device pool takes metadata up to {} bytes; blocks carry up to {max_meta}",
                    device.geometry().max_meta_bytes
                )));
            }
        }
        let mut host_config = HostPoolConfig::builder(geometry).capacity_bytes(config.host_bytes);
        if let Some(path) = &config.host_shm {
            host_config = host_config.shared_memory(path);
        }
        let host = Arc::new(HostPool::new(host_config.build()?)?);
        if let Some(device) = &config.device {
            // Moves between host and GPU become one DMA each; without it
            // they still work, staged through the device pool's buffers.
            if let Err(e) = device.attach_host(&host) {
                tracing::warn!("device tier: host memory not registered for DMA: {e}");
            }
        }
        let (disk, recovered) = match &config.disk {
            Some((dir, bytes)) => {
                let mut builder = DiskPoolConfig::builder(dir, geometry).capacity_bytes(*bytes);
                if let Some(io) = &config.disk_io {
                    builder = builder.io(io.clone());
                }
                let (pool, recovered) = DiskPool::open(builder.build()?)?;
                (Some(Arc::new(pool)), recovered)
            }
            None => (None, Vec::new()),
        };
        let policy =
            radix_tree::policy::by_name(&config.policy).expect("checked by the config builder");
        let mut index_config = IndexConfig::builder()
            .policy(policy)
            .max_tokens_per_call(config.max_tokens_per_call)
            .max_pinned_pages_per_tenant(config.max_pinned_pages_per_tenant);
        if let Some(clock) = &config.clock {
            index_config = index_config.clock(clock.clone());
        }
        if let Some(sink) = &config.events {
            index_config = index_config.events(sink.clone());
        }
        let index = RadixIndex::new(index_config.build()?);
        let pools: [Option<Arc<dyn BlockPool>>; TIERS] = [
            config.device.clone(),
            Some(host.clone() as Arc<dyn BlockPool>),
            disk.clone().map(|d| d as Arc<dyn BlockPool>),
        ];
        let cache = Cache {
            mover: Mover::new(config.movers),
            config,
            index,
            host,
            disk,
            pools,
            pending: Mutex::new(Vec::new()),
            next_pending: AtomicU64::new(1),
            namespaces: Mutex::new(HashMap::new()),
            room_locks: Default::default(),
            bad_copies: Mutex::new(Vec::new()),
            stats: CacheStats::default(),
        };
        cache.recover(recovered.into_iter().map(|r| (r.slot, r.meta)).collect());
        Ok(cache)
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn index(&self) -> &RadixIndex {
        &self.index
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn host_pool(&self) -> &HostPool {
        &self.host
    }

    /// The GPU-memory tier, when one is configured.
    pub fn device_pool(&self) -> Option<&dyn BlockPool> {
        self.pool(Tier::Device).map(|p| &**p)
    }

    pub fn disk_pool(&self) -> Option<&DiskPool> {
        self.disk.as_deref()
    }

    /// The namespace of a tenant's model and adapter, created on first use.
    /// The caller (the server) derives `tenant` from credentials.
    pub fn namespace(&self, tenant: &str, model: &str, adapter: &str) -> Result<NamespaceId> {
        let key = NamespaceKey::new(tenant, model, self.config.layout.as_str(), adapter);
        self.namespace_for(&key)
    }

    fn namespace_for(&self, key: &NamespaceKey) -> Result<NamespaceId> {
        let bytes = key.to_bytes();
        if bytes.len() > MAX_KEY_BYTES {
            return Err(CacheError::InvalidArgument(format!(
                "namespace key of {} bytes exceeds {MAX_KEY_BYTES}",
                bytes.len()
            )));
        }
        let ns = self
            .index
            .create_namespace(key, NamespaceConfig::new(self.config.page_size)?)?;
        self.namespaces.lock().entry(ns).or_insert(bytes);
        Ok(ns)
    }

    fn key_bytes(&self, ns: NamespaceId) -> Result<Vec<u8>> {
        match self.namespaces.lock().get(&ns) {
            Some(k) => Ok(k.clone()),
            None => Err(IndexError::UnknownNamespace(ns).into()),
        }
    }

    fn pool(&self, tier: Tier) -> Option<&Arc<dyn BlockPool>> {
        self.pools[tier.index()].as_ref()
    }

    /// The fastest tier: new blocks land there and promotions go there.
    fn top(&self) -> Tier {
        if self.pools[Tier::Device.index()].is_some() {
            Tier::Device
        } else {
            Tier::Host
        }
    }

    /// The tier a copy moves down to when `tier` is full.
    fn below(&self, tier: Tier) -> Option<Tier> {
        let mut t = tier.below();
        while let Some(x) = t {
            if self.pool(x).is_some() {
                return Some(x);
            }
            t = x.below();
        }
        None
    }

    // ---- store ---------------------------------------------------------------

    /// Stores the KV blocks of pages `first_page..` of `tokens` (whole pages;
    /// a partial tail is ignored): `data` holds one block per page, in
    /// order. Pages already cached are skipped. Pages can only extend a
    /// cached prefix: if pages before `first_page` are missing, nothing is
    /// stored.
    pub fn store(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        data: &[u8],
    ) -> Result<StoreOutcome> {
        self.store_with_hints(ns, tokens, first_page, data, InsertHints::default())
    }

    /// [`Cache::store`] with what the caller knows of the request (its
    /// output length, for the `odds` policy).
    pub fn store_with_hints(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        data: &[u8],
        hints: InsertHints,
    ) -> Result<StoreOutcome> {
        self.reap();
        let ps = self.config.page_size;
        let bb = self.config.block_bytes;
        let pages = tokens.len() / ps;
        if first_page > pages {
            return Err(CacheError::InvalidArgument(format!(
                "first page {first_page} is past the prompt's {pages} whole pages"
            )));
        }
        if data.len() != (pages - first_page) * bb {
            return Err(CacheError::InvalidArgument(format!(
                "{} bytes of data for {} pages of {bb}-byte blocks",
                data.len(),
                pages - first_page
            )));
        }
        self.store_with(ns, tokens, first_page, &|i| &data[i * bb..][..bb], hints)
    }

    /// [`Cache::store`] with one slice per page instead of one buffer, so
    /// a caller holding blocks apart (a server's received messages) need
    /// not copy them together first.
    pub fn store_blocks(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        blocks: &[&[u8]],
    ) -> Result<StoreOutcome> {
        self.store_blocks_with_hints(ns, tokens, first_page, blocks, InsertHints::default())
    }

    /// [`Cache::store_blocks`] with what the caller knows of the request.
    pub fn store_blocks_with_hints(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        blocks: &[&[u8]],
        hints: InsertHints,
    ) -> Result<StoreOutcome> {
        self.reap();
        let bb = self.config.block_bytes;
        let pages = tokens.len() / self.config.page_size;
        if first_page > pages {
            return Err(CacheError::InvalidArgument(format!(
                "first page {first_page} is past the prompt's {pages} whole pages"
            )));
        }
        if blocks.len() != pages - first_page {
            return Err(CacheError::InvalidArgument(format!(
                "{} blocks for {} pages",
                blocks.len(),
                pages - first_page
            )));
        }
        if let Some(b) = blocks.iter().find(|b| b.len() != bb) {
            return Err(CacheError::InvalidArgument(format!(
                "a block of {} bytes; blocks are {bb} bytes",
                b.len()
            )));
        }
        self.store_with(ns, tokens, first_page, &|i| blocks[i], hints)
    }

    /// The store itself, once the input is checked: `block(i)` is the
    /// block of page `first_page + i`.
    fn store_with<'d>(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        block: &dyn Fn(usize) -> &'d [u8],
        hints: InsertHints,
    ) -> Result<StoreOutcome> {
        let ps = self.config.page_size;
        let pages = tokens.len() / ps;
        let key = self.key_bytes(ns)?;
        let cached = self.index.cached_pages(ns, tokens)?;
        if cached >= pages && pages > 0 && hints != InsertHints::default() {
            // Nothing to store, but the request's hints (a finished
            // request's output length) still reach the cached prompt.
            self.tell_hints(ns, &tokens[..pages * ps], hints)?;
        }
        if cached < first_page || cached >= pages {
            return Ok(StoreOutcome {
                cached_pages: cached,
                stored_pages: 0,
            });
        }
        let hashes = self.index.page_hashes(ns, &tokens[..pages * ps])?;
        let parent = cached.checked_sub(1).map(|i| hashes[i]);
        let new_tokens = &tokens[cached * ps..pages * ps];
        let skip = cached - first_page;
        let top = self.top();
        let slots = self.write_blocks(
            &key,
            parent,
            new_tokens,
            &hashes[cached..],
            &|p| block(skip + p),
            top,
        )?;
        let stored =
            self.insert_written(ns, parent, new_tokens, &hashes[cached..], top, slots, hints)?;
        if self.config.write_mode == WriteMode::WriteThrough {
            self.write_through(ns, &hashes[cached..pages]);
        }
        Ok(StoreOutcome {
            cached_pages: cached,
            stored_pages: stored,
        })
    }

    /// Records `hints` on the cached prompt `tokens` (whole pages) as an
    /// insert of nothing after its last page: the policy hears of the
    /// request (its output length) without a block moving. A prompt that
    /// left the cache meanwhile is not an error.
    fn tell_hints(&self, ns: NamespaceId, tokens: &[u32], hints: InsertHints) -> Result<()> {
        let hashes = self.index.page_hashes(ns, tokens)?;
        let last = hashes.last().copied();
        match self
            .index
            .insert_after_with_hints(ns, last, &[], self.top(), &[], hints)
        {
            Ok(_) | Err(IndexError::UnknownPage(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores pages named by hash (SGLang HiCache's `batch_set`): the pages
    /// that follow the cached page `parent` (`None`: the namespace's first
    /// pages), whose tokens must chain to `hashes`. Pages cached already
    /// are skipped. Fails with `UnknownPage` if `parent` is not cached.
    pub fn store_after(
        &self,
        ns: NamespaceId,
        parent: Option<PageHash>,
        hashes: &[PageHash],
        tokens: &[u32],
        data: &[u8],
    ) -> Result<StoreOutcome> {
        self.reap();
        let ps = self.config.page_size;
        let bb = self.config.block_bytes;
        if tokens.len() != hashes.len() * ps || data.len() != hashes.len() * bb {
            return Err(CacheError::InvalidArgument(format!(
                "{} hashes need {} tokens and {} bytes; got {} and {}",
                hashes.len(),
                hashes.len() * ps,
                hashes.len() * bb,
                tokens.len(),
                data.len()
            )));
        }
        let key = self.key_bytes(ns)?;
        let seed = self.index.namespace_key(ns)?.seed();
        let mut chained = parent.unwrap_or(seed);
        for (i, (page, &hash)) in tokens.chunks(ps).zip(hashes).enumerate() {
            chained = chained.chain(page);
            if chained != hash {
                return Err(CacheError::InvalidArgument(format!(
                    "page {i}: its tokens hash to {chained}, not {hash}"
                )));
            }
        }
        if let Some(p) = parent {
            if self.index.location(ns, p)?.is_none() {
                return Err(IndexError::UnknownPage(p).into());
            }
        }
        let mut cached = 0;
        while cached < hashes.len() && self.index.location(ns, hashes[cached])?.is_some() {
            cached += 1;
        }
        if cached == hashes.len() {
            return Ok(StoreOutcome {
                cached_pages: cached,
                stored_pages: 0,
            });
        }
        let first_parent = cached.checked_sub(1).map(|i| hashes[i]).or(parent);
        let new_tokens = &tokens[cached * ps..];
        let top = self.top();
        let slots = self.write_blocks(
            &key,
            first_parent,
            new_tokens,
            &hashes[cached..],
            &|p| &data[(cached + p) * bb..][..bb],
            top,
        )?;
        let stored = self.insert_written(
            ns,
            first_parent,
            new_tokens,
            &hashes[cached..],
            top,
            slots,
            InsertHints::default(),
        )?;
        if self.config.write_mode == WriteMode::WriteThrough {
            self.write_through(ns, &hashes[cached..]);
        }
        Ok(StoreOutcome {
            cached_pages: cached,
            stored_pages: stored,
        })
    }

    /// Writes one block per page of `tokens` (the pages after `parent`,
    /// named `hashes`) into fresh slots of `tier`. On failure no slot is
    /// left allocated.
    fn write_blocks<'d>(
        &self,
        key: &[u8],
        parent: Option<PageHash>,
        tokens: &[u32],
        hashes: &[PageHash],
        block: &dyn Fn(usize) -> &'d [u8],
        tier: Tier,
    ) -> Result<Vec<BlockId>> {
        let ps = self.config.page_size;
        let pages = tokens.len() / ps;
        let pool = self.pool(tier).expect("the tier exists").clone();
        let mut slots = Vec::with_capacity(pages);
        let mut meta_buf = Vec::new();
        for p in 0..pages {
            let slot = match self.allocate(tier) {
                Ok(s) => s,
                Err(e) => {
                    self.free_all(tier, &slots);
                    self.stats
                        .store_rejections
                        .fetch_add((pages - p) as u64, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let page_parent = if p == 0 { parent } else { Some(hashes[p - 1]) };
            meta::encode(
                key,
                page_parent,
                &tokens[p * ps..(p + 1) * ps],
                &mut meta_buf,
            );
            if let Err(e) = pool.write(slot, block(p), &meta_buf) {
                pool.free(slot);
                self.free_all(tier, &slots);
                return Err(e.into());
            }
            slots.push(BlockId(slot.0));
        }
        Ok(slots)
    }

    /// Records written blocks (one per page of `tokens`, the pages after
    /// `parent`, named `hashes`) on `tier`, in chunks so that no lookup waits long behind
    /// one store. Blocks the index does not take are freed. Returns the
    /// pages stored.
    #[allow(clippy::too_many_arguments)]
    fn insert_written(
        &self,
        ns: NamespaceId,
        parent: Option<PageHash>,
        tokens: &[u32],
        hashes: &[PageHash],
        tier: Tier,
        slots: Vec<BlockId>,
        hints: InsertHints,
    ) -> Result<usize> {
        let ps = self.config.page_size;
        let mut stored = 0;
        for (c, chunk) in slots.chunks(STORE_CHUNK).enumerate() {
            let first = c * STORE_CHUNK;
            let parent = first.checked_sub(1).map(|i| hashes[i]).or(parent);
            let span = &tokens[first * ps..(first + chunk.len()) * ps];
            match self
                .index
                .insert_after_with_hints(ns, parent, span, tier, chunk, hints)
            {
                Ok(out) => {
                    stored += out.new_pages;
                    self.free_all(tier, &out.rejected);
                }
                Err(e) => {
                    // The prefix was evicted meanwhile (the pages have no
                    // parent), or the call failed: the rest is not stored.
                    self.free_all(tier, &slots[first..]);
                    if stored == 0 && !matches!(e, IndexError::UnknownPage(_)) {
                        return Err(e.into());
                    }
                    return Ok(stored);
                }
            }
        }
        Ok(stored)
    }

    fn free_all(&self, tier: Tier, blocks: &[BlockId]) {
        if let Some(pool) = self.pool(tier) {
            for b in blocks {
                pool.free(SlotId(b.0));
            }
        }
    }

    /// Frees every copy the index dropped.
    fn free_dropped(&self, evicted: &[EvictedPage]) {
        for e in evicted {
            for (tier, block) in e.dropped.copies() {
                if let Some(pool) = self.pool(tier) {
                    pool.free(SlotId(block.0));
                }
            }
        }
    }

    /// A free slot on `tier`, making room (demoting or evicting) if needed.
    fn allocate(&self, tier: Tier) -> Result<SlotId> {
        let pool = self
            .pool(tier)
            .ok_or(CacheError::InvalidArgument(format!("no {tier} tier")))?;
        loop {
            match pool.allocate() {
                Ok(slot) => return Ok(slot),
                Err(TierError::Full) => {
                    if self.make_room(tier, 1)? > 0 {
                        continue;
                    }
                    // Pages pinned by moves in flight free up once those land.
                    if self.pending.lock().is_empty() {
                        return Err(CacheError::Full(tier.name()));
                    }
                    self.flush();
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Frees slots on `tier` until `want` are free (or nothing more can
    /// go), evicting at least a batch at a time: copies without a lower copy
    /// move down first (write-back), the rest are dropped. Returns the slots
    /// found free or freed (0: nothing could go).
    fn make_room(&self, tier: Tier, want: usize) -> Result<usize> {
        // One demoter per tier: only this function drops copies of a tier
        // that has a tier below it, so while it copies a block down, nothing
        // else can free that block's slot (and readers hold leases, which
        // make the drop fail instead).
        let _demoter = self.room_locks[tier.index()].lock();
        let Some(pool) = self.pool(tier) else {
            return Ok(0);
        };
        let free = pool.capacity().saturating_sub(pool.used()) as usize;
        if free >= want {
            // Another caller made room while this one waited.
            return Ok(free);
        }
        // A batch, but never most of a small tier at once.
        let pages = (want - free).max(ROOM_BATCH.min(pool.capacity() as usize / 8).max(1));
        let Some(lower) = self.below(tier) else {
            let mut freed = 0;
            for chunk in chunks(pages) {
                let evicted = self.index.evict(tier, chunk);
                self.free_dropped(&evicted);
                let n = evicted.iter().filter(|e| e.dropped.has(tier)).count();
                freed += n;
                if n < chunk {
                    break;
                }
            }
            return Ok(freed);
        };
        // One round takes the batch where the candidates allow. Candidates
        // are the tails of the lowest-ranked leaves, and a page above them
        // becomes one only once they are gone, so a prefix cut into short
        // nodes (leases end nodes) may take more rounds: those go on only
        // until what was asked is free, never to fill the batch.
        let need = want - free;
        let mut freed = self.demote_round(tier, lower, pages)?;
        while freed < need {
            let round = self.demote_round(tier, lower, need - freed)?;
            if round == 0 {
                break;
            }
            freed += round;
        }
        Ok(freed)
    }

    /// One round of [`make_room`](Self::make_room) on a tier with a tier
    /// below: copies up to `pages` candidates down (those without a copy
    /// there yet), then drops their copies on `tier`. Returns how many
    /// slots of `tier` it freed.
    fn demote_round(&self, tier: Tier, lower: Tier, pages: usize) -> Result<usize> {
        let mut candidates = self.index.eviction_candidates(tier, pages);
        // Expired leases are reclaimed by writes to their namespace, and
        // candidates are read under a shared lock: a lease that was never
        // released would keep its pages out of reach until then.
        if candidates.is_empty() && self.index.reclaim_expired() > 0 {
            candidates = self.index.eviction_candidates(tier, pages);
        }
        let unsaved: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !c.location.has(lower))
            .collect();
        if !unsaved.is_empty() {
            self.demote(&unsaved, tier, lower);
        }
        // Drop this tier's copies, one locked call per namespace.
        let mut freed = 0;
        let mut by_ns: HashMap<NamespaceId, Vec<(PageHash, Tier)>> = HashMap::new();
        for c in &candidates {
            by_ns.entry(c.ns).or_default().push((c.hash, tier));
        }
        for (ns, copies) in by_ns {
            // Leased pages keep their copy; pages gone since are not ours.
            for part in copies.chunks(LOCK_CHUNK) {
                let (dropped, _) = self.index.drop_locations(ns, part)?;
                freed += dropped.iter().filter(|e| e.dropped.has(tier)).count();
                self.free_dropped(&dropped);
            }
        }
        Ok(freed)
    }

    /// Copies a round of eviction candidates from `tier` to `lower` in one
    /// batch of moves and records the new copies; a page whose copy fails
    /// simply has no lower copy.
    fn demote(&self, candidates: &[&Candidate], tier: Tier, lower: Tier) {
        let (Some(from), Some(to)) = (self.pool(tier).cloned(), self.pool(lower).cloned()) else {
            return;
        };
        // Room below first, so the moves do not fail on a full pool.
        let _ = self.make_room(lower, candidates.len());
        let mut moves = Vec::with_capacity(candidates.len());
        let mut pages = Vec::with_capacity(candidates.len());
        for c in candidates {
            let (Some(block), Some(meta)) = (c.location.get(tier), self.page_meta(c.ns, c.hash))
            else {
                continue;
            };
            moves.push(Move {
                from: from.clone(),
                slot: SlotId(block.0),
                to: to.clone(),
                meta,
            });
            pages.push((c.ns, c.hash));
        }
        let results = self.mover.submit(moves).wait();
        let mut by_ns: HashMap<NamespaceId, Vec<(PageHash, Tier, BlockId)>> = HashMap::new();
        for (&(ns, hash), r) in pages.iter().zip(results) {
            match r {
                Ok(dest) => by_ns
                    .entry(ns)
                    .or_default()
                    .push((hash, lower, BlockId(dest.0))),
                Err(e) => self.count_error(&e),
            }
        }
        for (ns, copies) in by_ns {
            for part in copies.chunks(LOCK_CHUNK) {
                self.record_demotions(ns, part, &to);
            }
        }
    }

    /// Records demoted copies; frees those the index no longer wants.
    fn record_demotions(
        &self,
        ns: NamespaceId,
        copies: &[(PageHash, Tier, BlockId)],
        to: &Arc<dyn BlockPool>,
    ) {
        {
            let recorded = self
                .index
                .add_locations(ns, copies)
                .unwrap_or_else(|e| vec![Err(e); copies.len()]);
            for ((_, _, dest), r) in copies.iter().zip(recorded) {
                match r {
                    Ok(()) => {
                        self.stats.demotions.fetch_add(1, Ordering::Relaxed);
                    }
                    // The page left meanwhile, or has a copy there already.
                    Err(_) => to.free(SlotId(dest.0)),
                }
            }
        }
    }

    fn page_meta(&self, ns: NamespaceId, hash: PageHash) -> Option<Vec<u8>> {
        let key = self.key_bytes(ns).ok()?;
        let (parent, tokens) = self.index.page_tokens(ns, hash).ok()??;
        let mut buf = Vec::new();
        meta::encode(&key, parent, &tokens, &mut buf);
        Some(buf)
    }

    fn count_error(&self, e: &TierError) {
        match e {
            TierError::Corrupt(_) => self.stats.corrupt_blocks.fetch_add(1, Ordering::Relaxed),
            // A move into a tier with no free slot (all pinned or in flight)
            // is skipped, not an I/O error.
            TierError::Full => return,
            _ => self.stats.io_errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Queues copies of pages to disk from their fastest copy (freshly
    /// stored pages: the top tier).
    fn write_through(&self, ns: NamespaceId, hashes: &[PageHash]) {
        let Some(disk) = self.pool(Tier::Disk).cloned() else {
            return;
        };
        let mut moves = Vec::new();
        let mut targets = Vec::new();
        let mut leases = Vec::new();
        for &hash in hashes {
            let Ok(Some(loc)) = self.index.location(ns, hash) else {
                continue;
            };
            let Some((from, block)) = loc.copies().next().filter(|_| !loc.has(Tier::Disk)) else {
                continue;
            };
            let Some(source) = self.pool(from).cloned() else {
                continue;
            };
            let Ok(lease) = self
                .index
                .pin_page_node(ns, hash, PinKind::Lease, MOVE_LEASE)
            else {
                continue;
            };
            let Some(meta) = self.page_meta(ns, hash) else {
                let _ = self.index.release(lease.id);
                continue;
            };
            let _ = self.make_room(Tier::Disk, 1);
            moves.push(Move {
                from: source,
                slot: SlotId(block.0),
                to: disk.clone(),
                meta,
            });
            targets.push((ns, hash, from, Tier::Disk));
            leases.push(lease);
        }
        if !moves.is_empty() {
            self.queue(moves, targets, leases, MoveKind::WriteThrough);
        }
    }

    fn queue(
        &self,
        moves: Vec<Move>,
        targets: Vec<MoveTarget>,
        leases: Vec<Lease>,
        kind: MoveKind,
    ) -> PrefetchId {
        let id = self.next_pending.fetch_add(1, Ordering::Relaxed);
        let ticket = self.mover.submit(moves);
        self.pending.lock().push(Pending {
            id,
            ticket,
            targets,
            leases,
            kind,
        });
        PrefetchId(id)
    }

    /// Records finished moves (without waiting for unfinished ones).
    pub fn reap(&self) {
        self.drop_bad_copies();
        let done: Vec<Pending> = {
            let mut pending = self.pending.lock();
            let mut done = Vec::new();
            let mut i = 0;
            while i < pending.len() {
                if pending[i].ticket.is_done() {
                    done.push(pending.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            done
        };
        for p in done {
            self.finish(p);
        }
    }

    /// Waits for a batch of moves (a lookup's prefetch) and records it.
    pub fn wait(&self, id: PrefetchId) {
        let found = {
            let mut pending = self.pending.lock();
            pending
                .iter()
                .position(|p| p.id == id.0)
                .map(|i| pending.swap_remove(i))
        };
        if let Some(p) = found {
            self.finish(p);
        }
    }

    /// Waits for every move in flight.
    pub fn flush(&self) {
        let all: Vec<Pending> = std::mem::take(&mut *self.pending.lock());
        for p in all {
            self.finish(p);
        }
    }

    fn finish(&self, p: Pending) {
        let results = p.ticket.wait();
        for (&(ns, hash, from, to), r) in p.targets.iter().zip(results) {
            match r {
                Ok(dest) => {
                    if self
                        .index
                        .add_location(ns, hash, to, BlockId(dest.0))
                        .is_ok()
                    {
                        let counter = match p.kind {
                            MoveKind::Promotion => &self.stats.promotions,
                            MoveKind::WriteThrough => &self.stats.write_throughs,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(pool) = self.pool(to) {
                        pool.free(dest);
                    }
                }
                Err(e) => {
                    self.count_error(&e);
                    if let TierError::Corrupt(_) = e {
                        // The source failed its checks: never move it again.
                        if let Ok(Some(loc)) = self.index.location(ns, hash) {
                            if let Some(block) = loc.get(from) {
                                self.bad_copies.lock().push((ns, hash, from, block));
                            }
                        }
                    }
                }
            }
        }
        for lease in p.leases {
            let _ = self.index.release(lease.id);
        }
        self.drop_bad_copies();
    }

    // ---- lookup and load ---------------------------------------------------------

    /// The longest cached prefix of `tokens`, where each page is, and
    /// optionally a lease on it and the promotion of disk-only pages.
    pub fn lookup(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        options: LookupOptions,
    ) -> Result<Lookup> {
        self.reap();
        let lease = match options.lease {
            Some(ttl) => match self.index.pin(ns, tokens, PinKind::Lease, ttl) {
                Ok(l) => Some(l),
                Err(IndexError::NotCached) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let mut m = radix_tree::Match::with_hashes();
        self.index.match_prefix_into(ns, tokens, &mut m)?;
        let pages = lease.map_or(m.pages, |l| l.pages.min(m.pages));
        let ps = self.config.page_size;
        let mut hashes = m.hashes;
        hashes.truncate(pages);
        let mut locations = m.locations;
        locations.truncate(pages);
        let prefetch = if options.promote {
            self.promote(ns, &hashes, &locations)
        } else {
            None
        };
        if let WriteMode::WriteThroughAfterHits(min_hits) = self.config.write_mode {
            // Pages reused often enough earn a disk copy.
            let earned: Vec<PageHash> = hashes
                .iter()
                .zip(&locations)
                .filter(|(_, l)| l.has(self.top()) && !l.has(Tier::Disk))
                .filter(
                    |(h, _)| matches!(self.index.page_hits(ns, **h), Ok(Some(n)) if n >= min_hits),
                )
                .map(|(h, _)| *h)
                .collect();
            if !earned.is_empty() {
                self.write_through(ns, &earned);
            }
        }
        Ok(Lookup {
            pages,
            page_size: ps,
            locations,
            hashes,
            lease,
            prefetch,
        })
    }

    /// Starts copying pages that lack a copy on the top tier (device where
    /// there is one, else host) up from their fastest copy.
    fn promote(
        &self,
        ns: NamespaceId,
        hashes: &[PageHash],
        locations: &[PageLocation],
    ) -> Option<PrefetchId> {
        let top = self.top();
        let up = self.pool(top)?.clone();
        let wanted: Vec<usize> = (0..locations.len())
            .filter(|&i| !locations[i].is_empty() && !locations[i].has(top))
            .collect();
        if wanted.is_empty() {
            return None;
        }
        let _ = self.make_room(top, wanted.len());
        let mut moves = Vec::new();
        let mut targets = Vec::new();
        let mut leases = Vec::new();
        for i in wanted {
            let hash = hashes[i];
            let Ok(lease) = self
                .index
                .pin_page_node(ns, hash, PinKind::Lease, MOVE_LEASE)
            else {
                continue;
            };
            let Ok(Some(loc)) = self.index.location(ns, hash) else {
                let _ = self.index.release(lease.id);
                continue;
            };
            let source = loc.fastest().filter(|t| *t != top);
            let (Some(from), Some(meta)) = (source, self.page_meta(ns, hash)) else {
                let _ = self.index.release(lease.id);
                continue;
            };
            let (Some(block), Some(from_pool)) = (loc.get(from), self.pool(from).cloned()) else {
                let _ = self.index.release(lease.id);
                continue;
            };
            moves.push(Move {
                from: from_pool,
                slot: SlotId(block.0),
                to: up.clone(),
                meta,
            });
            targets.push((ns, hash, from, top));
            leases.push(lease);
        }
        (!moves.is_empty()).then(|| self.queue(moves, targets, leases, MoveKind::Promotion))
    }

    /// Copies page `page` of a lookup into `out`, from the fastest tier that
    /// holds a sound copy. A copy that fails its checksum is dropped and
    /// counted, and the next tier is tried; `Ok(None)` means no sound copy
    /// is left (a miss). Read under the lookup's lease.
    pub fn read(
        &self,
        ns: NamespaceId,
        lookup: &Lookup,
        page: usize,
        out: &mut [u8],
    ) -> Result<Option<Tier>> {
        let hash = *lookup.hashes.get(page).ok_or_else(|| {
            CacheError::InvalidArgument(format!(
                "page {page} is past the lookup's {}",
                lookup.pages
            ))
        })?;
        self.read_page(ns, hash, out)
    }

    /// [`read`](Self::read) by page hash.
    pub fn read_page(
        &self,
        ns: NamespaceId,
        hash: PageHash,
        out: &mut [u8],
    ) -> Result<Option<Tier>> {
        if out.len() != self.config.block_bytes {
            return Err(CacheError::InvalidArgument(format!(
                "buffer of {} bytes, blocks are {}",
                out.len(),
                self.config.block_bytes
            )));
        }
        let Some(loc) = self.index.location(ns, hash)? else {
            return Ok(None);
        };
        for (tier, block) in loc.copies() {
            let Some(pool) = self.pool(tier) else {
                continue;
            };
            match pool.read(SlotId(block.0), out) {
                Ok(()) => return Ok(Some(tier)),
                Err(e) => {
                    self.count_error(&e);
                    if matches!(e, TierError::Corrupt(_) | TierError::Empty(_)) {
                        // Never serve it again (under a lease: once released).
                        let bad = (ns, hash, tier, block);
                        let mut bad_copies = self.bad_copies.lock();
                        if !bad_copies.contains(&bad) {
                            bad_copies.push(bad);
                        }
                        drop(bad_copies);
                        self.drop_bad_copies();
                    }
                }
            }
        }
        Ok(None)
    }

    /// The host copy of a page, in place (no copy), while the caller holds
    /// a lease on it.
    pub fn borrow(&self, ns: NamespaceId, hash: PageHash) -> Result<Option<BlockRef<'_>>> {
        let Some(loc) = self.index.location(ns, hash)? else {
            return Ok(None);
        };
        let Some(block) = loc.get(Tier::Host) else {
            return Ok(None);
        };
        Ok(Some(self.host.block(SlotId(block.0))?))
    }

    /// Releases a lookup's lease.
    pub fn release(&self, lease: &Lease) -> Result<()> {
        self.index.release(lease.id)?;
        self.drop_bad_copies();
        Ok(())
    }

    /// Drops the copies that failed their checks, except those a lease
    /// still covers (kept for later) and those gone or replaced since.
    fn drop_bad_copies(&self) {
        let bad = std::mem::take(&mut *self.bad_copies.lock());
        let mut kept = Vec::new();
        for (ns, hash, tier, block) in bad {
            if !matches!(self.index.location(ns, hash), Ok(Some(l)) if l.get(tier) == Some(block)) {
                continue;
            }
            match self.index.drop_location(ns, hash, tier) {
                Ok(dropped) => self.free_dropped(&dropped),
                Err(IndexError::Pinned) => kept.push((ns, hash, tier, block)),
                Err(_) => {}
            }
        }
        if !kept.is_empty() {
            self.bad_copies.lock().extend(kept);
        }
    }

    // ---- restart -------------------------------------------------------------------

    /// Puts the disk tier's blocks back into the index: each page after its
    /// parent; blocks whose metadata is unreadable, whose layout differs or
    /// whose parent is gone are freed.
    fn recover(&self, blocks: Vec<(SlotId, Vec<u8>)>) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        struct Rec {
            slot: SlotId,
            ns: NamespaceId,
            parent: Option<PageHash>,
            tokens: Vec<u32>,
            hash: PageHash,
        }
        let mut children: HashMap<(NamespaceId, Option<PageHash>), Vec<Rec>> = HashMap::new();
        for (slot, bytes) in blocks {
            let Ok(m) = meta::decode(&bytes) else {
                disk.free(slot);
                continue;
            };
            if m.namespace.layout != self.config.layout || m.tokens.len() != self.config.page_size {
                disk.free(slot);
                continue;
            }
            let Ok(ns) = self.namespace_for(&m.namespace) else {
                disk.free(slot);
                continue;
            };
            let hash = m
                .parent
                .unwrap_or_else(|| m.namespace.seed())
                .chain(&m.tokens);
            children.entry((ns, m.parent)).or_default().push(Rec {
                slot,
                ns,
                parent: m.parent,
                tokens: m.tokens,
                hash,
            });
        }
        // Breadth first from each namespace's root.
        let mut queue: Vec<Rec> = children
            .keys()
            .filter(|(_, p)| p.is_none())
            .copied()
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|k| children.remove(&k).unwrap_or_default())
            .collect();
        while let Some(rec) = queue.pop() {
            match self.index.insert_after(
                rec.ns,
                rec.parent,
                &rec.tokens,
                Tier::Disk,
                &[BlockId(rec.slot.0)],
            ) {
                Ok(out) if out.new_pages == 1 => {
                    if let Some(kids) = children.remove(&(rec.ns, Some(rec.hash))) {
                        queue.extend(kids);
                    }
                }
                _ => disk.free(rec.slot),
            }
        }
        // Whatever was never reached has no parent on disk.
        for recs in children.into_values() {
            for rec in recs {
                disk.free(rec.slot);
            }
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.flush();
    }
}
