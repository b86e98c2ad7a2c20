//! The shared handle: the namespace registry, per-namespace locks, leases'
//! clock, the tenant pin caps, counters and the event hook.

use crate::clock::{Clock, MonotonicClock};
use crate::error::{IndexError, Result};
use crate::events::EventSink;
use crate::namespace::{NamespaceConfig, NamespaceId, NamespaceKey};
use crate::policy::{EvictionPolicy, InsertHints, Lru};
use crate::sync::{
    spin_loop, yield_now, Arc, AtomicU64, OnceLock, Ordering, RwLock, RwLockReadGuard,
    RwLockWriteGuard,
};
use crate::tree::{Candidate, OpCtx, PageSnapshot, Tree};
use crate::{
    BlockId, EvictedPage, InsertOutcome, Lease, LeaseId, Match, PageHash, PageLocation, PinKind,
    Tier, TIERS,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A TTL in milliseconds, saturating: `as u64` would wrap a huge TTL to a
/// short (even zero) one.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// How long a writer waits for a moment with no reader inside a namespace
/// before it queues for the lock. parking_lot's lock is fair to writers: a
/// queued writer makes every reader that comes after it wait until it has
/// waited out the readers inside, run and left, and a reader that waits
/// long enough sleeps, so a write that queued behind a lookup cost the next
/// lookup two thread wake-ups. A writer that waits for a gap first lets
/// lookups pass while it waits; this bounds how long a stream of
/// overlapping readers can hold it off before it queues as before.
const WRITER_PATIENCE: Duration = Duration::from_micros(100);

/// How long a reader spins while a writer is inside before it sleeps:
/// writes are short (a bounded number of pages each), and waking a sleeping
/// thread costs more than most of them.
const READER_SPIN: Duration = Duration::from_micros(30);

/// Takes a namespace's lock exclusively, waiting for a moment with no
/// reader inside (see [`WRITER_PATIENCE`]) before it queues.
fn write_lock(lock: &RwLock<Tree>) -> RwLockWriteGuard<'_, Tree> {
    if let Some(guard) = lock.try_write() {
        return guard;
    }
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        if round < 6 {
            for _ in 0..(2u32 << round) {
                spin_loop();
            }
            round += 1;
        } else {
            yield_now();
        }
        if let Some(guard) = lock.try_write() {
            return guard;
        }
        if start.elapsed() >= WRITER_PATIENCE {
            return lock.write();
        }
    }
}

/// Takes a namespace's lock shared, spinning for a while (see
/// [`READER_SPIN`]) before it sleeps behind a writer.
fn read_lock(lock: &RwLock<Tree>) -> RwLockReadGuard<'_, Tree> {
    if let Some(guard) = lock.try_read() {
        return guard;
    }
    let start = Instant::now();
    loop {
        spin_loop();
        if let Some(guard) = lock.try_read() {
            return guard;
        }
        if start.elapsed() >= READER_SPIN {
            return lock.read();
        }
    }
}

/// The chained hashes of the whole pages of `tokens`, the first chained
/// from `parent`: computed before an insert takes its lock, so that the
/// lock covers only the tree's changes.
fn chain_hashes(parent: PageHash, tokens: &[u32], page_size: usize) -> Vec<PageHash> {
    let mut out = vec![PageHash(0); tokens.len() / page_size];
    fill_chain_hashes(parent, tokens, page_size, &mut out);
    out
}

fn fill_chain_hashes(parent: PageHash, tokens: &[u32], page_size: usize, out: &mut [PageHash]) {
    let mut prev = parent;
    for (page, slot) in tokens.chunks_exact(page_size).zip(out) {
        prev = prev.chain(page);
        *slot = prev;
    }
}

/// Inserts of up to this many pages keep their hashes on the stack (most
/// stores are the few pages after a hit); longer ones use the heap.
const STACK_HASHES: usize = 64;

/// Calls `f` with [`chain_hashes`], without a heap allocation for a short
/// insert: the allocator is a visible share of a store's cost.
fn with_chain_hashes<R>(
    parent: PageHash,
    tokens: &[u32],
    page_size: usize,
    f: impl FnOnce(&[PageHash]) -> R,
) -> R {
    let pages = tokens.len() / page_size;
    if pages <= STACK_HASHES {
        let mut buf = [PageHash(0); STACK_HASHES];
        fill_chain_hashes(parent, tokens, page_size, &mut buf[..pages]);
        f(&buf[..pages])
    } else {
        f(&chain_hashes(parent, tokens, page_size))
    }
}

/// Index-wide settings. Build with [`IndexConfig::builder`].
#[derive(Debug, Clone)]
pub struct IndexConfig {
    policy: Arc<dyn EvictionPolicy>,
    clock: Arc<dyn Clock>,
    events: Option<Arc<dyn EventSink>>,
    max_tokens_per_call: usize,
    max_pinned_pages_per_tenant: u64,
    max_namespaces: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            policy: Arc::new(Lru),
            clock: Arc::new(MonotonicClock::default()),
            events: None,
            max_tokens_per_call: 1 << 22,
            max_pinned_pages_per_tenant: u64::MAX,
            max_namespaces: 4096,
        }
    }
}

impl IndexConfig {
    pub fn builder() -> IndexConfigBuilder {
        IndexConfigBuilder(IndexConfig::default())
    }

    pub fn policy(&self) -> &dyn EvictionPolicy {
        &*self.policy
    }

    /// The clock lease expiry times are read on.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }
}

/// Builder for [`IndexConfig`].
#[derive(Debug, Clone)]
pub struct IndexConfigBuilder(IndexConfig);

impl IndexConfigBuilder {
    /// Eviction ranking (default LRU).
    pub fn policy(mut self, policy: Arc<dyn EvictionPolicy>) -> Self {
        self.0.policy = policy;
        self
    }

    /// Clock for lease TTLs (default: monotonic wall clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.0.clock = clock;
        self
    }

    /// Receives every stored / removed / cleared event.
    pub fn events(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.0.events = Some(sink);
        self
    }

    /// Longest prompt one call accepts (default 4Mi tokens).
    pub fn max_tokens_per_call(mut self, tokens: usize) -> Self {
        self.0.max_tokens_per_call = tokens;
        self
    }

    /// Cap on pages one tenant may hold pinned (hard or soft) at once.
    pub fn max_pinned_pages_per_tenant(mut self, pages: u64) -> Self {
        self.0.max_pinned_pages_per_tenant = pages;
        self
    }

    /// Most namespaces the index holds (default 4096).
    pub fn max_namespaces(mut self, n: usize) -> Self {
        self.0.max_namespaces = n;
        self
    }

    pub fn build(self) -> Result<IndexConfig> {
        if self.0.max_namespaces == 0 || self.0.max_namespaces > u32::MAX as usize {
            return Err(IndexError::InvalidConfig(
                "max_namespaces must be in 1..=u32::MAX",
            ));
        }
        if self.0.max_tokens_per_call == 0 {
            return Err(IndexError::InvalidConfig(
                "max_tokens_per_call must be above zero",
            ));
        }
        if self.0.max_pinned_pages_per_tenant == 0 {
            return Err(IndexError::InvalidConfig(
                "max_pinned_pages_per_tenant must be above zero",
            ));
        }
        Ok(self.0)
    }
}

#[derive(Debug)]
struct Tenant {
    pinned_pages: AtomicU64,
}

#[derive(Debug)]
struct NamespaceEntry {
    key: NamespaceKey,
    /// What the namespace's first page chains from.
    seed: PageHash,
    tenant: Arc<Tenant>,
    page_size: usize,
    tree: RwLock<Tree>,
}

/// Namespace creation bookkeeping; lookups by id never touch it.
#[derive(Debug, Default)]
struct Registry {
    by_key: HashMap<Vec<u8>, NamespaceId>,
    tenants: HashMap<String, Arc<Tenant>>,
}

#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    lookup_tokens: AtomicU64,
    hit_tokens: [AtomicU64; TIERS],
    inserted_pages: AtomicU64,
    evicted_copies: [AtomicU64; TIERS],
    removed_pages: AtomicU64,
}

/// A snapshot of the index's counters and sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub namespaces: usize,
    pub lookups: u64,
    /// Tokens asked for by lookups.
    pub lookup_tokens: u64,
    /// Tokens hit, counted on the fastest tier holding each page.
    pub hit_tokens: [u64; TIERS],
    pub inserted_pages: u64,
    /// Copies dropped by eviction, per tier.
    pub evicted_copies: [u64; TIERS],
    /// Pages that left the tree (no copy left).
    pub removed_pages: u64,
    pub pages: u64,
    pub tier_pages: [u64; TIERS],
    pub nodes: u64,
    pub pinned_pages: u64,
    pub leases: usize,
    /// The index's own heap memory (tokens, hashes, locations, maps).
    pub memory_bytes: u64,
}

impl IndexStats {
    pub fn hit_tokens_total(&self) -> u64 {
        self.hit_tokens.iter().sum()
    }
}

/// The shared, thread-safe index. See the crate docs for the model.
#[derive(Debug)]
pub struct RadixIndex {
    config: IndexConfig,
    /// Namespaces by id, each set once: a lookup finds its namespace with
    /// one atomic load and no lock.
    slots: Box<[OnceLock<Box<NamespaceEntry>>]>,
    created: AtomicU64,
    registry: RwLock<Registry>,
    tick: AtomicU64,
    counters: Counters,
}

impl Default for RadixIndex {
    fn default() -> Self {
        Self::new(IndexConfig::default())
    }
}

impl RadixIndex {
    pub fn new(config: IndexConfig) -> Self {
        Self {
            slots: (0..config.max_namespaces)
                .map(|_| OnceLock::new())
                .collect(),
            created: AtomicU64::new(0),
            config,
            registry: RwLock::new(Registry::default()),
            tick: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates a namespace, or returns the existing one with the same key
    /// (its page size must agree).
    pub fn create_namespace(
        &self,
        key: &NamespaceKey,
        config: NamespaceConfig,
    ) -> Result<NamespaceId> {
        let bytes = key.to_bytes();
        let mut reg = self.registry.write();
        if let Some(&id) = reg.by_key.get(&bytes) {
            let existing = self.entry(id)?.page_size;
            if existing != config.page_size() {
                return Err(IndexError::NamespaceConflict {
                    existing,
                    requested: config.page_size(),
                });
            }
            return Ok(id);
        }
        let index = self.created.load(Ordering::Acquire) as usize;
        if index >= self.slots.len() {
            return Err(IndexError::TooManyNamespaces(self.slots.len()));
        }
        let id = NamespaceId(index as u32);
        let tenant = reg
            .tenants
            .entry(key.tenant.clone())
            .or_insert_with(|| {
                Arc::new(Tenant {
                    pinned_pages: AtomicU64::new(0),
                })
            })
            .clone();
        let seed = key.seed();
        let entry = NamespaceEntry {
            key: key.clone(),
            seed,
            tenant,
            page_size: config.page_size(),
            tree: RwLock::new(Tree::new(id, config.page_size(), seed)),
        };
        if self.slots[index].set(Box::new(entry)).is_err() {
            unreachable!("slots are filled in order under the registry lock");
        }
        self.created.store(index as u64 + 1, Ordering::Release);
        reg.by_key.insert(bytes, id);
        Ok(id)
    }

    /// The id of an existing namespace.
    pub fn namespace(&self, key: &NamespaceKey) -> Option<NamespaceId> {
        self.registry.read().by_key.get(&key.to_bytes()).copied()
    }

    pub fn namespace_key(&self, ns: NamespaceId) -> Result<NamespaceKey> {
        Ok(self.entry(ns)?.key.clone())
    }

    pub fn page_size(&self, ns: NamespaceId) -> Result<usize> {
        Ok(self.entry(ns)?.page_size)
    }

    fn entry(&self, ns: NamespaceId) -> Result<&NamespaceEntry> {
        self.slots
            .get(ns.0 as usize)
            .and_then(OnceLock::get)
            .map(|b| &**b)
            .ok_or(IndexError::UnknownNamespace(ns))
    }

    fn entries(&self) -> impl Iterator<Item = &NamespaceEntry> {
        let created = self.created.load(Ordering::Acquire) as usize;
        self.slots[..created]
            .iter()
            .filter_map(|s| s.get().map(|b| &**b))
    }

    fn check_len(&self, tokens: &[u32]) -> Result<()> {
        if tokens.len() > self.config.max_tokens_per_call {
            return Err(IndexError::TooManyTokens {
                tokens: tokens.len(),
                limit: self.config.max_tokens_per_call,
            });
        }
        Ok(())
    }

    /// Runs a mutating operation on one namespace: reclaims expired leases
    /// first, hands out an op context, keeps the tenant's pin count and
    /// emits the events the operation produced.
    fn write_op<R>(
        &self,
        entry: &NamespaceEntry,
        op: impl FnOnce(&mut Tree, &mut OpCtx<'_>) -> R,
    ) -> R {
        let mut tree = write_lock(&entry.tree);
        self.write_op_locked(entry, &mut tree, op)
    }

    fn write_op_locked<R>(
        &self,
        entry: &NamespaceEntry,
        tree: &mut RwLockWriteGuard<'_, Tree>,
        op: impl FnOnce(&mut Tree, &mut OpCtx<'_>) -> R,
    ) -> R {
        let mut pinned_before = tree.pinned_pages;
        let pages_before = tree.pages;
        let mut events = Vec::new();
        let sink = self.config.events.as_deref();
        let mut ctx = OpCtx {
            policy: &*self.config.policy,
            tick: self.next_tick(),
            events: sink.map(|_| &mut events),
        };
        let update_tenant = |before: u64, after: u64| {
            if after > before {
                entry
                    .tenant
                    .pinned_pages
                    .fetch_add(after - before, Ordering::Relaxed);
            } else if after < before {
                entry
                    .tenant
                    .pinned_pages
                    .fetch_sub(before - after, Ordering::Relaxed);
            }
        };
        if tree
            .next_expiry()
            .is_some_and(|e| e <= self.config.clock.now_ms())
        {
            tree.reclaim_expired(self.config.clock.now_ms(), &*self.config.policy);
            // Before `op` runs: a pin checks the tenant's count against its cap.
            update_tenant(pinned_before, tree.pinned_pages);
            pinned_before = tree.pinned_pages;
        }
        let r = op(tree, &mut ctx);
        update_tenant(pinned_before, tree.pinned_pages);
        if tree.pages < pages_before {
            self.counters
                .removed_pages
                .fetch_add(pages_before - tree.pages, Ordering::Relaxed);
        }
        if let Some(sink) = sink {
            if !events.is_empty() {
                sink.emit(&events);
            }
        }
        r
    }

    /// The longest cached prefix of `tokens`, in whole pages, with each
    /// page's copies. Never splits nodes; records the access.
    pub fn match_prefix(&self, ns: NamespaceId, tokens: &[u32]) -> Result<Match> {
        let mut out = Match::default();
        self.match_prefix_into(ns, tokens, &mut out)?;
        Ok(out)
    }

    /// [`match_prefix`](Self::match_prefix) into a caller's buffer, so a hit
    /// allocates nothing once the buffer has grown.
    pub fn match_prefix_into(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        out: &mut Match,
    ) -> Result<()> {
        self.check_len(tokens)?;
        let entry = self.entry(ns)?;
        let tree = read_lock(&entry.tree);
        tree.match_into(tokens, &*self.config.policy, self.next_tick(), out);
        drop(tree);
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        self.counters
            .lookup_tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        for (count, pages) in self.counters.hit_tokens.iter().zip(out.fastest_pages) {
            if pages > 0 {
                count.fetch_add((pages * out.page_size) as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Cached whole pages at the start of `tokens`; records nothing.
    pub fn cached_pages(&self, ns: NamespaceId, tokens: &[u32]) -> Result<usize> {
        self.check_len(tokens)?;
        Ok(read_lock(&self.entry(ns)?.tree).match_len(tokens))
    }

    /// Records `blocks` (one per whole page of `tokens`; a partial tail is
    /// ignored) as copies on `tier`. Splits edges as needed.
    pub fn insert(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        tier: Tier,
        blocks: &[BlockId],
    ) -> Result<InsertOutcome> {
        self.insert_with_priority(ns, tokens, tier, blocks, 0)
    }

    /// [`insert`](Self::insert) with a priority that the `priority` policy
    /// ranks by (higher outlives lower).
    pub fn insert_with_priority(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        tier: Tier,
        blocks: &[BlockId],
        priority: u8,
    ) -> Result<InsertOutcome> {
        let hints = InsertHints {
            priority,
            ..InsertHints::default()
        };
        self.insert_with_hints(ns, tokens, tier, blocks, hints)
    }

    /// [`insert`](Self::insert) with what the caller knows of the request
    /// (its priority, the tokens it generated) for policies that weigh it.
    /// Every node on the prompt's path records the access.
    pub fn insert_with_hints(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        tier: Tier,
        blocks: &[BlockId],
        hints: InsertHints,
    ) -> Result<InsertOutcome> {
        let entry = self.entry(ns)?;
        self.check_insert(entry, tokens, blocks)?;
        let out = with_chain_hashes(entry.seed, tokens, entry.page_size, |hashes| {
            self.write_op(entry, |tree, ctx| {
                tree.insert(tokens, hashes, tier, blocks, hints, ctx)
            })
        });
        self.counters
            .inserted_pages
            .fetch_add(out.new_pages as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Inserts the pages that follow the cached page `parent` (`None`: the
    /// namespace's first pages): after a lookup, an engine stores what it
    /// computed beyond the hit without the index walking the prefix again.
    /// `tokens` and `blocks` cover only the new pages. Fails with
    /// [`IndexError::UnknownPage`] if `parent` is no longer cached.
    pub fn insert_after(
        &self,
        ns: NamespaceId,
        parent: Option<PageHash>,
        tokens: &[u32],
        tier: Tier,
        blocks: &[BlockId],
    ) -> Result<InsertOutcome> {
        self.insert_after_with_hints(ns, parent, tokens, tier, blocks, InsertHints::default())
    }

    /// [`insert_after`](Self::insert_after) with what the caller knows of
    /// the request. For a policy that reads hints, every node from the root
    /// to `parent` records the access too, as if the whole prompt had been
    /// inserted. With no pages (`tokens` empty) it only records that access:
    /// how a caller reports a finished request's output length for a
    /// prompt it stored before.
    pub fn insert_after_with_hints(
        &self,
        ns: NamespaceId,
        parent: Option<PageHash>,
        tokens: &[u32],
        tier: Tier,
        blocks: &[BlockId],
        hints: InsertHints,
    ) -> Result<InsertOutcome> {
        let entry = self.entry(ns)?;
        self.check_insert(entry, tokens, blocks)?;
        let seed = parent.unwrap_or(entry.seed);
        let out = with_chain_hashes(seed, tokens, entry.page_size, |hashes| {
            self.write_op(entry, |tree, ctx| {
                tree.insert_after(parent, tokens, hashes, tier, blocks, hints, ctx)
            })
        })?;
        self.counters
            .inserted_pages
            .fetch_add(out.new_pages as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn check_insert(
        &self,
        entry: &NamespaceEntry,
        tokens: &[u32],
        blocks: &[BlockId],
    ) -> Result<()> {
        self.check_len(tokens)?;
        let pages = tokens.len() / entry.page_size;
        if blocks.len() != pages {
            return Err(IndexError::BlockCountMismatch {
                pages,
                blocks: blocks.len(),
            });
        }
        if let Some(b) = blocks.iter().find(|b| b.0 == BlockId::NONE_RAW) {
            return Err(IndexError::InvalidBlock(b.0));
        }
        Ok(())
    }

    /// Chained hashes of every whole page of `tokens` in this namespace.
    pub fn page_hashes(&self, ns: NamespaceId, tokens: &[u32]) -> Result<Vec<PageHash>> {
        self.check_len(tokens)?;
        let entry = self.entry(ns)?;
        Ok(chain_hashes(entry.seed, tokens, entry.page_size))
    }

    /// Every cached page of a namespace, parents before children, and what
    /// `at` returns when called under the same lock: events are emitted
    /// under that lock too, so a subscriber that reads its event sequence
    /// number in `at` gets the snapshot exactly as of that number.
    pub fn snapshot<T>(
        &self,
        ns: NamespaceId,
        at: impl FnOnce() -> T,
    ) -> Result<(Vec<PageSnapshot>, T)> {
        let entry = self.entry(ns)?;
        let tree = read_lock(&entry.tree);
        let mut pages = Vec::with_capacity(tree.pages as usize);
        tree.snapshot(&mut pages);
        Ok((pages, at()))
    }

    /// Pages of one namespace: in all, and per tier.
    pub fn namespace_pages(&self, ns: NamespaceId) -> Result<(u64, [u64; TIERS])> {
        let tree = read_lock(&self.entry(ns)?.tree);
        Ok((tree.pages, tree.tier_pages))
    }

    /// Where a page (named by hash) has copies, if it is cached.
    pub fn location(&self, ns: NamespaceId, hash: PageHash) -> Result<Option<PageLocation>> {
        Ok(read_lock(&self.entry(ns)?.tree).location_of(hash))
    }

    /// How many lookups have hit a page (counted for the run of pages it
    /// shares a node with); `None` if it is not cached.
    pub fn page_hits(&self, ns: NamespaceId, hash: PageHash) -> Result<Option<u32>> {
        Ok(read_lock(&self.entry(ns)?.tree).page_hits(hash))
    }

    /// A cached page's parent page and tokens (what a tier needs to store
    /// with a block so that the page can be indexed again after a restart).
    pub fn page_tokens(
        &self,
        ns: NamespaceId,
        hash: PageHash,
    ) -> Result<Option<(Option<PageHash>, Vec<u32>)>> {
        Ok(read_lock(&self.entry(ns)?.tree).page_tokens(hash))
    }

    /// How many of `hashes`, from the first, are cached (a run of hits).
    pub fn longest_cached_run(&self, ns: NamespaceId, hashes: &[PageHash]) -> Result<usize> {
        let entry = self.entry(ns)?;
        let tree = read_lock(&entry.tree);
        Ok(hashes
            .iter()
            .take_while(|h| tree.location_of(**h).is_some())
            .count())
    }

    /// Records a new copy of a cached page on `tier` (after a promotion or
    /// demotion wrote it there).
    pub fn add_location(
        &self,
        ns: NamespaceId,
        hash: PageHash,
        tier: Tier,
        block: BlockId,
    ) -> Result<()> {
        if block.0 == BlockId::NONE_RAW {
            return Err(IndexError::InvalidBlock(block.0));
        }
        let entry = self.entry(ns)?;
        self.write_op(entry, |tree, ctx| tree.add_location(hash, tier, block, ctx))
    }

    /// Drops a page's copy on `tier` (a tier lost or moved it). If that was
    /// its last copy the page, and every page after it, leave the tree; all
    /// dropped copies are returned for the caller to free. Fails with
    /// [`IndexError::Pinned`] under a hard lease.
    pub fn drop_location(
        &self,
        ns: NamespaceId,
        hash: PageHash,
        tier: Tier,
    ) -> Result<Vec<EvictedPage>> {
        let entry = self.entry(ns)?;
        let mut out = Vec::new();
        self.write_op(entry, |tree, ctx| {
            tree.drop_location(hash, tier, ctx, &mut out)
        })?;
        Ok(out)
    }

    /// [`add_location`](Self::add_location) for many pages of one
    /// namespace under one lock (a batch of demotions or promotions lands
    /// without making lookups wait once per page). One result per page.
    pub fn add_locations(
        &self,
        ns: NamespaceId,
        copies: &[(PageHash, Tier, BlockId)],
    ) -> Result<Vec<Result<()>>> {
        let entry = self.entry(ns)?;
        Ok(self.write_op(entry, |tree, ctx| {
            copies
                .iter()
                .map(|&(hash, tier, block)| {
                    if block.0 == BlockId::NONE_RAW {
                        return Err(IndexError::InvalidBlock(block.0));
                    }
                    tree.add_location(hash, tier, block, ctx)
                })
                .collect()
        }))
    }

    /// [`drop_location`](Self::drop_location) for many pages of one
    /// namespace under one lock. Returns every dropped copy (for the caller
    /// to free) and one result per page (`Pinned` pages keep their copy).
    pub fn drop_locations(
        &self,
        ns: NamespaceId,
        copies: &[(PageHash, Tier)],
    ) -> Result<(Vec<EvictedPage>, Vec<Result<()>>)> {
        let entry = self.entry(ns)?;
        let mut out = Vec::with_capacity(copies.len());
        let results = self.write_op(entry, |tree, ctx| {
            copies
                .iter()
                .map(|&(hash, tier)| tree.drop_location(hash, tier, ctx, &mut out))
                .collect()
        });
        Ok((out, results))
    }

    /// Evicts up to `pages` copies from `tier`, across all namespaces,
    /// lowest rank first. Each returned entry says which copies were dropped
    /// (the caller frees or demotes them) and which remain.
    pub fn evict(&self, tier: Tier, pages: usize) -> Vec<EvictedPage> {
        // Usually one entry per evicted copy; more only when a page's last
        // copy goes and takes the pages after it.
        let mut out = Vec::with_capacity(pages.min(1 << 16));
        let mut done = 0;
        let mut namespaces = self.entries();
        if let (Some(entry), None) = (namespaces.next(), namespaces.next()) {
            done += self.write_op(entry, |tree, ctx| {
                tree.evict(tier, pages, u64::MAX, ctx, &mut out)
            });
        } else {
            let entries: Vec<&NamespaceEntry> = self.entries().collect();
            // Merge across namespaces: evict from the one with the lowest
            // rank until it passes the runner-up's.
            while done < pages {
                let mut best: Option<(u64, usize)> = None;
                let mut second = u64::MAX;
                for (i, e) in entries.iter().enumerate() {
                    // Expired leases must not keep pages out of (or, soft,
                    // ranked above) the merge: reclaim them first, as every
                    // write on a namespace does. Otherwise a shared lock is
                    // enough to read the namespace's lowest rank, so other
                    // tenants' lookups do not wait on this merge.
                    let expired = read_lock(&e.tree)
                        .next_expiry()
                        .is_some_and(|x| x <= self.config.clock.now_ms());
                    if expired {
                        let mut tree = write_lock(&e.tree);
                        self.write_op_locked(e, &mut tree, |_, _| ());
                    }
                    let key = read_lock(&e.tree).peek_min_key(tier, &*self.config.policy);
                    let Some(k) = key else {
                        continue;
                    };
                    match best {
                        Some((b, _)) if k >= b => second = second.min(k),
                        _ => {
                            if let Some((b, _)) = best {
                                second = second.min(b);
                            }
                            best = Some((k, i));
                        }
                    }
                }
                let Some((_, i)) = best else { break };
                let n = self.write_op(entries[i], |tree, ctx| {
                    tree.evict(tier, pages - done, second, ctx, &mut out)
                });
                if n == 0 {
                    break;
                }
                done += n;
            }
        }
        self.counters.evicted_copies[tier.index()].fetch_add(done as u64, Ordering::Relaxed);
        out
    }

    /// The copies on `tier` that eviction would take first (up to `max`,
    /// across namespaces, lowest rank first), changing nothing. For
    /// write-back: copy each one down, [`add_location`](Self::add_location)
    /// the new copy, then [`drop_location`](Self::drop_location) this one.
    pub fn eviction_candidates(&self, tier: Tier, max: usize) -> Vec<Candidate> {
        let mut ranked = Vec::new();
        for e in self.entries() {
            read_lock(&e.tree).eviction_candidates(tier, max, &*self.config.policy, &mut ranked);
        }
        ranked.sort_by_key(|(key, _)| *key);
        ranked.truncate(max);
        ranked.into_iter().map(|(_, c)| c).collect()
    }

    /// Evicts up to `pages` copies from `tier` within one namespace (a
    /// tenant over its quota evicts its own pages).
    pub fn evict_namespace(
        &self,
        ns: NamespaceId,
        tier: Tier,
        pages: usize,
    ) -> Result<Vec<EvictedPage>> {
        let entry = self.entry(ns)?;
        let mut out = Vec::new();
        let done = self.write_op(entry, |tree, ctx| {
            tree.evict(tier, pages, u64::MAX, ctx, &mut out)
        });
        self.counters.evicted_copies[tier.index()].fetch_add(done as u64, Ordering::Relaxed);
        Ok(out)
    }

    /// Evicts up to `pages` copies from `tier` within one namespace, never
    /// taking the page `protect` or any page before it (nor the rest of its
    /// node): what a store does to make room for the request it is storing,
    /// in one locked call instead of a lease, an eviction and a release.
    pub fn evict_protecting(
        &self,
        ns: NamespaceId,
        protect: PageHash,
        tier: Tier,
        pages: usize,
    ) -> Result<Vec<EvictedPage>> {
        let mut out = Vec::with_capacity(pages.min(1 << 16));
        self.evict_protecting_into(ns, protect, tier, pages, &mut out)?;
        Ok(out)
    }

    /// [`evict_protecting`](Self::evict_protecting) that appends to a
    /// caller's buffer, so a caller that stores and evicts request after
    /// request allocates no list per request once the buffer has grown.
    /// Returns how many copies it dropped from `tier`.
    pub fn evict_protecting_into(
        &self,
        ns: NamespaceId,
        protect: PageHash,
        tier: Tier,
        pages: usize,
        out: &mut Vec<EvictedPage>,
    ) -> Result<usize> {
        self.evict_protecting_impl(ns, protect, tier, pages, false, out)
    }

    /// [`evict_protecting`](Self::evict_protecting) the general way, with a
    /// pin on the protected path for the call, even where skipping the
    /// protected node is enough: for tests that check the two agree.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn evict_protecting_by_pin(
        &self,
        ns: NamespaceId,
        protect: PageHash,
        tier: Tier,
        pages: usize,
    ) -> Result<Vec<EvictedPage>> {
        let mut out = Vec::new();
        self.evict_protecting_impl(ns, protect, tier, pages, true, &mut out)?;
        Ok(out)
    }

    fn evict_protecting_impl(
        &self,
        ns: NamespaceId,
        protect: PageHash,
        tier: Tier,
        pages: usize,
        by_pin: bool,
        out: &mut Vec<EvictedPage>,
    ) -> Result<usize> {
        let entry = self.entry(ns)?;
        let done = self.write_op(entry, |tree, ctx| {
            tree.evict_protecting(protect, tier, pages, by_pin, ctx, out)
        })?;
        self.counters.evicted_copies[tier.index()].fetch_add(done as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// Pins the longest cached prefix of `tokens` for `ttl`.
    pub fn pin(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        kind: PinKind,
        ttl: Duration,
    ) -> Result<Lease> {
        self.check_len(tokens)?;
        self.pin_with(ns, ttl, |tree, expires_ms, policy, admit| {
            tree.pin(tokens, kind, expires_ms, policy, admit)
        })
    }

    /// Pins the path from the namespace's first page to the page `hash`
    /// (for example an insert's `last_page`) for `ttl`.
    pub fn pin_page(
        &self,
        ns: NamespaceId,
        hash: PageHash,
        kind: PinKind,
        ttl: Duration,
    ) -> Result<Lease> {
        self.pin_with(ns, ttl, |tree, expires_ms, policy, admit| {
            tree.pin_page(hash, false, kind, expires_ms, policy, admit)
        })
    }

    /// Like [`pin_page`](Self::pin_page), but pins the whole node that holds
    /// the page instead of splitting it there, so some pages after `hash`
    /// are pinned too (the lease's `pages` says how many in all). Meant for
    /// short holds, a copy or a read of one block: pinning one page at a
    /// time with `pin_page` would leave the prefix cut into one-page nodes.
    pub fn pin_page_node(
        &self,
        ns: NamespaceId,
        hash: PageHash,
        kind: PinKind,
        ttl: Duration,
    ) -> Result<Lease> {
        self.pin_with(ns, ttl, |tree, expires_ms, policy, admit| {
            tree.pin_page(hash, true, kind, expires_ms, policy, admit)
        })
    }

    /// Runs a pin under the tenant's cap.
    fn pin_with(
        &self,
        ns: NamespaceId,
        ttl: Duration,
        pin: impl FnOnce(
            &mut Tree,
            u64,
            &dyn EvictionPolicy,
            &dyn Fn(u64) -> Result<()>,
        ) -> Result<(LeaseId, usize)>,
    ) -> Result<Lease> {
        if ttl.is_zero() {
            return Err(IndexError::ZeroTtl);
        }
        let entry = self.entry(ns)?;
        let cap = self.config.max_pinned_pages_per_tenant;
        let expires_ms = self.config.clock.now_ms().saturating_add(ttl_ms(ttl));
        let tenant = &entry.tenant;
        let admit = |newly: u64| {
            let pinned = tenant.pinned_pages.load(Ordering::Relaxed);
            if pinned.saturating_add(newly) > cap {
                return Err(IndexError::PinCapExceeded {
                    pinned,
                    requested: newly,
                    cap,
                });
            }
            Ok(())
        };
        let (id, pages) =
            self.write_op(entry, |tree, ctx| pin(tree, expires_ms, ctx.policy, &admit))?;
        Ok(Lease {
            id,
            pages,
            expires_ms,
        })
    }

    /// Extends a lease to `ttl` from now (keepalive).
    pub fn renew(&self, lease: LeaseId, ttl: Duration) -> Result<u64> {
        if ttl.is_zero() {
            return Err(IndexError::ZeroTtl);
        }
        let entry = self.entry(lease.ns)?;
        let expires_ms = self.config.clock.now_ms().saturating_add(ttl_ms(ttl));
        self.write_op(entry, |tree, _| tree.renew(lease.seq, expires_ms))?;
        Ok(expires_ms)
    }

    /// Releases a lease. Its pages become evictable again.
    pub fn release(&self, lease: LeaseId) -> Result<()> {
        let entry = self.entry(lease.ns)?;
        self.write_op(entry, |tree, ctx| tree.release(lease.seq, ctx.policy))?;
        Ok(())
    }

    /// Releases every expired lease in every namespace. Returns how many.
    /// (Mutating calls on a namespace also do this for it first.)
    pub fn reclaim_expired(&self) -> usize {
        let now = self.config.clock.now_ms();
        self.entries()
            .map(|e| {
                let mut tree = write_lock(&e.tree);
                if tree.next_expiry().is_some_and(|x| x <= now) {
                    // write_op_locked reclaims expired leases before it runs
                    // its op, so count what the whole call released.
                    let before = tree.active_leases();
                    self.write_op_locked(e, &mut tree, |tree, ctx| {
                        tree.reclaim_expired(now, ctx.policy)
                    });
                    before - tree.active_leases()
                } else {
                    0
                }
            })
            .sum()
    }

    /// Drops every page of a namespace (admin flush). Fails with
    /// [`IndexError::Pinned`] while a hard lease is held there.
    pub fn clear_namespace(&self, ns: NamespaceId) -> Result<Vec<EvictedPage>> {
        let entry = self.entry(ns)?;
        let mut out = Vec::new();
        self.write_op(entry, |tree, ctx| tree.clear(ctx, &mut out))?;
        Ok(out)
    }

    /// Pages pinned by all of a tenant's namespaces.
    pub fn tenant_pinned_pages(&self, tenant: &str) -> u64 {
        self.registry
            .read()
            .tenants
            .get(tenant)
            .map_or(0, |t| t.pinned_pages.load(Ordering::Relaxed))
    }

    /// Pages held on `tier` across all namespaces.
    pub fn tier_pages(&self, tier: Tier) -> u64 {
        self.entries()
            .map(|e| read_lock(&e.tree).tier_pages[tier.index()])
            .sum()
    }

    pub fn stats(&self) -> IndexStats {
        let entries: Vec<&NamespaceEntry> = self.entries().collect();
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = IndexStats {
            namespaces: entries.len(),
            lookups: load(&c.lookups),
            lookup_tokens: load(&c.lookup_tokens),
            hit_tokens: std::array::from_fn(|t| load(&c.hit_tokens[t])),
            inserted_pages: load(&c.inserted_pages),
            evicted_copies: std::array::from_fn(|t| load(&c.evicted_copies[t])),
            removed_pages: load(&c.removed_pages),
            ..IndexStats::default()
        };
        for e in entries {
            let tree = read_lock(&e.tree);
            s.pages += tree.pages;
            for t in 0..TIERS {
                s.tier_pages[t] += tree.tier_pages[t];
            }
            s.nodes += tree.live_nodes;
            s.pinned_pages += tree.pinned_pages;
            s.leases += tree.active_leases();
            s.memory_bytes += tree.heap_bytes() as u64;
        }
        s
    }

    /// Checks every structural invariant of every namespace; panics with a
    /// description when one fails. For tests: linear in the index's size.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn check_invariants(&self) {
        let entries: Vec<&NamespaceEntry> = self.entries().collect();
        let mut by_tenant: HashMap<*const Tenant, u64> = HashMap::new();
        for e in &entries {
            let tree = read_lock(&e.tree);
            tree.check_invariants(&*self.config.policy);
            *by_tenant.entry(Arc::as_ptr(&e.tenant)).or_default() += tree.pinned_pages;
        }
        for e in &entries {
            assert_eq!(
                e.tenant.pinned_pages.load(Ordering::Relaxed),
                by_tenant[&Arc::as_ptr(&e.tenant)],
                "tenant pinned pages"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_send_and_sync() {
        fn is<T: Send + Sync>() {}
        is::<RadixIndex>();
    }

    /// An insert of no pages after a cached page reports the request's hints
    /// to a policy that reads them, on every node from the root to that
    /// page, and leaves the tree as it was (no split at a page mid-node).
    #[test]
    fn an_insert_of_nothing_tells_the_policy_and_changes_nothing() {
        use crate::policy::{Access, NodeInfo, NodeStats};
        use crate::sync::Mutex;

        #[derive(Debug, Default)]
        struct Heard(Mutex<Vec<(u32, u32)>>);
        impl EvictionPolicy for Heard {
            fn name(&self) -> &str {
                "heard"
            }
            fn on_access(&self, _: &NodeStats, node: &NodeInfo, access: Access) {
                self.0.lock().push((node.depth_pages, access.output_tokens));
            }
            fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
                stats.last_access()
            }
            fn reads_insert_hints(&self) -> bool {
                true
            }
        }

        let heard = Arc::new(Heard::default());
        let index = RadixIndex::new(
            IndexConfig::builder()
                .policy(heard.clone())
                .build()
                .unwrap(),
        );
        let key = NamespaceKey::new("t", "m", "l", "");
        let ns = index
            .create_namespace(&key, NamespaceConfig::new(2).unwrap())
            .unwrap();
        let prompt: Vec<u32> = (0..8).collect();
        let blocks = [BlockId(1); 4];
        index
            .insert(ns, &prompt[..4], Tier::Host, &blocks[..2])
            .unwrap();
        index.insert(ns, &prompt, Tier::Host, &blocks).unwrap();
        let nodes = index.stats().nodes;
        heard.0.lock().clear();

        // The second node holds pages 2 and 3: page 2 ends mid-node.
        let hashes = index.page_hashes(ns, &prompt).unwrap();
        let hints = InsertHints {
            output_tokens: 42,
            ..InsertHints::default()
        };
        let out = index
            .insert_after_with_hints(ns, Some(hashes[2]), &[], Tier::Host, &[], hints)
            .unwrap();
        assert_eq!(out.new_pages, 0);
        assert_eq!(index.stats().nodes, nodes, "no split");
        let told = heard.0.lock().clone();
        assert!(told.contains(&(0, 42)), "the first node: {told:?}");
        assert!(told.contains(&(2, 42)), "the node holding page 2: {told:?}");
        assert_eq!(index.match_prefix(ns, &prompt).unwrap().pages, 4);
    }

    /// Readers that always overlap leave a writer no gap: once its patience
    /// runs out it queues, and the lock's fairness lets it in.
    #[test]
    fn a_writer_gets_past_readers_that_always_overlap() {
        use std::sync::atomic::AtomicBool;
        let lock = RwLock::new(Tree::new(NamespaceId(0), 16, PageHash(1)));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let _guard = read_lock(&lock);
                        std::thread::sleep(Duration::from_micros(300));
                    }
                });
            }
            for _ in 0..20 {
                drop(write_lock(&lock));
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
}
