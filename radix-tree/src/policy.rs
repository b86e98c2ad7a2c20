//! Eviction order. The tree keeps, per tier, an ordered set of the nodes it
//! may evict from (leaves for that tier); a policy only says how to rank a
//! node, from statistics that the tree keeps for it.
//!
//! Rules every policy must follow, because the tree re-ranks lazily:
//! - `key` must not change between two accesses of a node except through
//!   [`NodeInfo`] (the tree re-ranks a node whose pages change);
//! - a lookup (shared lock) may only raise a node's key: the tree re-ranks a
//!   stale entry when it reaches the front of the order. An insert re-ranks
//!   exactly, so a key that falls on access is exact for nodes that are
//!   inserted after they are looked up (as engines and the replay do);
//! - `key` must stay below `2^KEY_BITS`; the tree puts the pin class above it.

use crate::hash::PageHash;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use std::fmt;

mod odds;
pub use odds::ReturnOdds;

/// Bits a policy key may use.
pub const KEY_BITS: u32 = 52;
/// Largest key a policy may return.
pub const KEY_MAX: u64 = (1 << KEY_BITS) - 1;

/// Access statistics of one node (all of its pages share them). Atomics,
/// because lookups record accesses under a shared lock.
#[derive(Debug, Default)]
pub struct NodeStats {
    last_access: AtomicU64,
    hits: AtomicU32,
    aux: AtomicU64,
    created: AtomicU64,
}

impl NodeStats {
    pub(crate) fn new(tick: u64) -> Self {
        Self {
            last_access: AtomicU64::new(tick),
            hits: AtomicU32::new(0),
            aux: AtomicU64::new(0),
            created: AtomicU64::new(tick),
        }
    }

    pub(crate) fn copy_from(other: &NodeStats) -> Self {
        Self {
            last_access: AtomicU64::new(other.last_access()),
            hits: AtomicU32::new(other.hits()),
            aux: AtomicU64::new(other.aux()),
            created: AtomicU64::new(other.created()),
        }
    }

    /// Logical time (the index's access counter) of the last access.
    pub fn last_access(&self) -> u64 {
        self.last_access.load(Ordering::Relaxed)
    }

    /// Lookups that matched all of this node's pages.
    pub fn hits(&self) -> u32 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Logical time the node's pages were first inserted.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// A policy's own per-node word.
    pub fn aux(&self) -> u64 {
        self.aux.load(Ordering::Relaxed)
    }

    pub fn set_aux(&self, v: u64) {
        self.aux.store(v, Ordering::Relaxed);
    }

    /// Best effort under concurrent lookups: plain loads and stores rather
    /// than read-modify-writes, so a hit costs no locked instruction; two
    /// racing lookups may count as one.
    pub(crate) fn record(&self, access: Access) {
        if self.last_access() < access.tick {
            self.last_access.store(access.tick, Ordering::Relaxed);
        }
        if access.kind == AccessKind::Hit {
            self.hits
                .store(self.hits().saturating_add(1), Ordering::Relaxed);
        }
    }
}

/// What the tree knows about a node's place, for policies that weigh it.
#[derive(Debug, Clone, Copy)]
pub struct NodeInfo {
    /// Pages before this node's first page (how deep in the prompt it starts).
    pub depth_pages: u32,
    /// Pages in this node.
    pub pages: u32,
    pub page_size: u32,
    /// Priority given at insert (0 = normal).
    pub priority: u8,
    /// Hash of the node's last page: the one an eviction takes first.
    pub last_page: PageHash,
    /// Hash of the node's first page.
    pub first_page: PageHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    /// The pages were (re)inserted.
    Insert,
    /// A lookup matched all of the node's pages.
    Hit,
}

#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub tick: u64,
    pub kind: AccessKind,
    /// The node's last access before this one (its creation tick if none).
    pub previous: u64,
    /// Where the request's prompt ends, in pages from the namespace's root:
    /// how far this node lies from the end of the request that used it.
    pub prompt_pages: u32,
    /// Tokens the request generated, when the caller said
    /// ([`InsertHints::output_tokens`]); 0 when not known (always on a lookup).
    pub output_tokens: u32,
}

/// What a caller may say about the request behind an insert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertHints {
    /// Ranked by the `priority` policy (higher outlives lower; 0 = normal).
    pub priority: u8,
    /// Tokens the request generated after this prompt (0 = not known).
    /// Engines that store a request's blocks when it finishes know it; the
    /// `odds` policy learns from it how likely a prompt is to come back.
    pub output_tokens: u32,
}

/// Ranks nodes for eviction; smaller keys go first.
pub trait EvictionPolicy: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;

    /// Called after the tree recorded an access in `stats` (last access, hits).
    fn on_access(&self, _stats: &NodeStats, _node: &NodeInfo, _access: Access) {}

    /// The node's rank; see the module rules.
    fn key(&self, stats: &NodeStats, node: &NodeInfo) -> u64;

    /// True when the key depends on which page of a node is last (through
    /// [`NodeInfo`]), so the tree must re-rank a node after each page it
    /// evicts from it instead of taking a run of its tail at once.
    fn ranks_each_page(&self) -> bool {
        false
    }

    /// True when the policy learns from what inserts say of their request
    /// ([`InsertHints`], and the prompt's end): callers that can should
    /// insert the whole prompt with
    /// [`insert_with_hints`](crate::RadixIndex::insert_with_hints), so that
    /// every node on its path records the use.
    fn reads_insert_hints(&self) -> bool {
        false
    }

    /// Called for each evicted page, with its node's rank at eviction and
    /// the index's logical time.
    fn on_evict(&self, _stats: &NodeStats, _node: &NodeInfo, _key: u64, _tick: u64) {}

    /// [`on_evict`](Self::on_evict) for each of `pages` pages of one node
    /// evicted together. The tree calls this once per run it evicts, so a
    /// policy that ignores evictions costs one dynamic call per run rather
    /// than one per page; override only to do the same work faster.
    fn on_evict_pages(
        &self,
        stats: &NodeStats,
        node: &NodeInfo,
        key: u64,
        tick: u64,
        pages: usize,
    ) {
        for _ in 0..pages {
            self.on_evict(stats, node, key, tick);
        }
    }
}

fn clamp(key: u64) -> u64 {
    key.min(KEY_MAX)
}

/// Least recently used.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lru;

impl EvictionPolicy for Lru {
    fn name(&self) -> &str {
        "lru"
    }
    fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
        clamp(stats.last_access())
    }
}

/// Least frequently used, ties broken by recency.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lfu;

const RECENCY_BITS: u32 = 40;
const RECENCY_MASK: u64 = (1 << RECENCY_BITS) - 1;

impl EvictionPolicy for Lfu {
    fn name(&self) -> &str {
        "lfu"
    }
    fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
        let freq = u64::from(stats.hits()).min((1 << (KEY_BITS - RECENCY_BITS)) - 1);
        (freq << RECENCY_BITS) | (stats.last_access() & RECENCY_MASK)
    }
}

/// Segmented LRU. Pages that were hit at least once form the protected
/// segment, the rest probation. A protected page ranks as if it had been
/// used one probation lifetime later than it was, where the probation
/// lifetime is the age at which the latest probation page was evicted: so
/// a reused page outlives a fresh one by about that much, whatever the
/// cache size, and an idle protected page still ages out.
#[derive(Debug, Default)]
pub struct Slru {
    probation_lifetime: AtomicU64,
}

impl EvictionPolicy for Slru {
    fn name(&self) -> &str {
        "slru"
    }
    fn on_access(&self, stats: &NodeStats, _: &NodeInfo, access: Access) {
        let bonus = if stats.hits() >= 1 {
            self.probation_lifetime.load(Ordering::Relaxed)
        } else {
            0
        };
        stats.set_aux(stats.aux().max(access.tick + bonus));
    }
    fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
        clamp(stats.aux().max(stats.last_access()))
    }
    fn on_evict(&self, stats: &NodeStats, _: &NodeInfo, _key: u64, tick: u64) {
        if stats.hits() == 0 {
            let age = tick.saturating_sub(stats.last_access());
            self.probation_lifetime.store(age, Ordering::Relaxed);
        }
    }
}

/// LRU within priority classes: a node inserted with a higher priority
/// outlives every lower-priority node. Agent sessions use soft pins, which
/// rank above all classes until their TTL passes.
#[derive(Debug, Default, Clone, Copy)]
pub struct PriorityLru;

impl EvictionPolicy for PriorityLru {
    fn name(&self) -> &str {
        "priority"
    }
    fn key(&self, stats: &NodeStats, node: &NodeInfo) -> u64 {
        (u64::from(node.priority) << (KEY_BITS - 8))
            | (stats.last_access() & ((1 << (KEY_BITS - 8)) - 1))
    }
}

/// Cost-aware (GreedyDual-Size-Frequency): a node's value is
/// `L + hits × recompute_cost / bytes`, where the recompute cost of a page
/// grows with its depth (attention over everything before it) and `L`
/// rises to the value of each evicted page, so old values age out.
#[derive(Debug)]
pub struct CostAware {
    /// Depth (tokens) at which attention costs as much as the rest of a
    /// token's forward pass; deeper pages cost proportionally more.
    pub attention_crossover_tokens: u32,
    inflation: AtomicU64,
}

impl Default for CostAware {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl CostAware {
    pub fn new(attention_crossover_tokens: u32) -> Self {
        Self {
            attention_crossover_tokens: attention_crossover_tokens.max(1),
            inflation: AtomicU64::new(0),
        }
    }

    /// Recompute cost of the node's last page, in units of 1/1024 of a
    /// shallow page, per page held (all pages of a namespace are equal size).
    fn cost(&self, node: &NodeInfo) -> u64 {
        let depth_tokens = u64::from(node.depth_pages + node.pages) * u64::from(node.page_size);
        1024 + depth_tokens * 1024 / u64::from(self.attention_crossover_tokens)
    }
}

impl EvictionPolicy for CostAware {
    fn name(&self) -> &str {
        "cost"
    }
    fn on_access(&self, stats: &NodeStats, node: &NodeInfo, _: Access) {
        let value = self.inflation.load(Ordering::Relaxed)
            + u64::from(stats.hits().max(1)) * self.cost(node);
        stats.set_aux(value.max(stats.aux()));
    }
    fn key(&self, stats: &NodeStats, _: &NodeInfo) -> u64 {
        clamp(stats.aux())
    }
    fn on_evict(&self, _: &NodeStats, _: &NodeInfo, key: u64, _: u64) {
        self.inflation.fetch_max(key & KEY_MAX, Ordering::Relaxed);
    }
}

/// The policies by name, for configuration files and the bench.
pub fn by_name(name: &str) -> Option<std::sync::Arc<dyn EvictionPolicy>> {
    use std::sync::Arc;
    Some(match name {
        "lru" => Arc::new(Lru),
        "lfu" => Arc::new(Lfu),
        "slru" => Arc::new(Slru::default()),
        "priority" => Arc::new(PriorityLru),
        "cost" => Arc::new(CostAware::default()),
        "odds" => Arc::new(ReturnOdds::default()),
        _ => return None,
    })
}

/// Names accepted by [`by_name`].
pub const POLICY_NAMES: &[&str] = &["lru", "lfu", "slru", "priority", "cost", "odds"];
