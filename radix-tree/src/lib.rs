//! radixkv's index: a compressed radix tree over token ids with page-granular
//! edges that maps prompt prefixes to the KV blocks holding them, on each tier
//! (device, host, disk), and decides what to evict.
//!
//! This crate does no I/O and never sees a block's bytes: blocks are opaque
//! [`BlockId`]s that the tiers hand in and get back.
//!
//! # Model
//! - A [`NamespaceKey`] (tenant, model, layout, adapter) names a namespace;
//!   each has its own root and a fixed page size. Only whole pages are
//!   matched and stored.
//! - Every page is named by a chained 128-bit [`PageHash`] (see [`hash`]).
//! - A page may have a copy on several tiers; a page with no copy left leaves
//!   the tree, together with every page after it.
//! - Leases pin a matched prefix for a TTL: a hard lease ([`PinKind::Lease`])
//!   is never evicted; a soft pin ([`PinKind::Session`]) ranks above every
//!   unpinned page but can be evicted under real pressure.
//! - Eviction takes, per tier, the lowest-ranked node that holds a copy on
//!   that tier while no descendant does, page by page from its tail. The
//!   ranking comes from an [`EvictionPolicy`].
//!
//! # Example
//! ```
//! use radix_tree::{BlockId, NamespaceConfig, NamespaceKey, PinKind, RadixIndex, Tier};
//! use std::time::Duration;
//!
//! let index = RadixIndex::default();
//! let ns = index.create_namespace(
//!     &NamespaceKey::new("tenant-a", "smollm2-135m", "layout-digest", ""),
//!     NamespaceConfig::new(16)?,
//! )?;
//! let prompt: Vec<u32> = (0..64).collect();
//! let blocks = [BlockId(0), BlockId(1), BlockId(2), BlockId(3)];
//! assert_eq!(index.insert(ns, &prompt, Tier::Host, &blocks)?.new_pages, 4);
//! let hit = index.match_prefix(ns, &prompt[..40])?;
//! assert_eq!((hit.pages, hit.tokens()), (2, 32));
//! assert_eq!(hit.locations[1].get(Tier::Host), Some(BlockId(1)));
//! let lease = index.pin(ns, &prompt, PinKind::Lease, Duration::from_secs(10))?;
//! assert!(index.evict(Tier::Host, 1).is_empty()); // every page is leased
//! index.release(lease.id)?;
//! assert_eq!(index.evict(Tier::Host, 1)[0].dropped.get(Tier::Host), Some(BlockId(3)));
//! # Ok::<(), radix_tree::IndexError>(())
//! ```
//!
//! # Concurrency
//! [`RadixIndex`] is shared by reference across threads. Each namespace has
//! its own reader-writer lock: lookups take it shared (they record accesses
//! in atomics), inserts, evictions and pins take it exclusive. A writer
//! first waits, up to a bound, for a moment with no reader inside instead
//! of queueing at once (a queued writer blocks every later reader), and a
//! reader spins a while before it sleeps behind a writer; past those bounds
//! both fall back to the lock's own fair queueing, so neither side starves.
//! Eviction across namespaces locks one namespace at a time. The namespace
//! registry has its own lock, taken exclusively only to create a namespace.
//! All locks and atomics come from the `sync` module, so a model checker
//! can swap them.

mod arena;
mod children;
mod clock;
mod error;
mod events;
pub mod hash;
mod index;
mod namespace;
pub mod policy;
mod sync;
mod tier;
mod tree;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use error::{IndexError, Result};
pub use events::{EventSink, IndexEvent};
pub use hash::PageHash;
pub use index::{IndexConfig, IndexConfigBuilder, IndexStats, RadixIndex};
pub use namespace::{NamespaceConfig, NamespaceId, NamespaceKey};
pub use policy::{EvictionPolicy, InsertHints};
pub use tier::{BlockId, PageLocation, Tier, TIERS};
pub use tree::{Candidate, EvictedPage, InsertOutcome, Match, PageSnapshot};

/// Largest page size a namespace may use, in tokens.
pub const MAX_PAGE_SIZE: usize = 256;

/// How a lease holds its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinKind {
    /// A reader is using the blocks: never evicted until released or expired.
    Lease,
    /// An agent session between turns: ranked above unpinned pages (higher
    /// priority above lower) until its TTL passes, but evictable when
    /// nothing else is left.
    Session { priority: u8 },
}

/// A lease handed out by [`RadixIndex::pin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId {
    pub ns: NamespaceId,
    pub seq: u64,
}

/// A granted lease: its id and how many whole pages it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub pages: usize,
    pub expires_ms: u64,
}
