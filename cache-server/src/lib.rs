//! radixkv's cache service. Its library holds the [`Cache`] facade: the
//! index (`radix-tree`) joined with the block pools (`tiers`) — the one
//! place where tokens meet bytes. The server, the engine and the bench embed
//! it.
//!
//! ```
//! use cache_server::{Cache, CacheConfig, LookupOptions};
//! use std::time::Duration;
//!
//! let cache = Cache::open(CacheConfig::builder(16, 4096, "demo-layout").host_bytes(1 << 20).build()?)?;
//! let ns = cache.namespace("tenant-a", "demo-model", "")?;
//! let prompt: Vec<u32> = (0..40).collect(); // two whole pages and a partial tail
//! let kv: Vec<u8> = (0..2 * 4096).map(|i| i as u8).collect();
//! assert_eq!(cache.store(ns, &prompt, 0, &kv)?.stored_pages, 2);
//! let hit = cache.lookup(ns, &prompt, LookupOptions { lease: Some(Duration::from_secs(5)), promote: false })?;
//! assert_eq!(hit.tokens(), 32);
//! let mut page = vec![0; 4096];
//! cache.read(ns, &hit, 1, &mut page)?;
//! assert_eq!(page, kv[4096..]);
//! assert_eq!(&*cache.borrow(ns, hit.hashes[0])?.unwrap(), &kv[..4096]); // in place
//! cache.release(hit.lease.as_ref().unwrap())?;
//! # Ok::<(), cache_server::CacheError>(())
//! ```
//!
//! What the facade promises:
//! - a stored page is readable until it is evicted; a leased page is never
//!   evicted or overwritten while the lease lives;
//! - a block that fails its checksum is a miss (dropped, counted), never data;
//! - a full or failing disk degrades to misses and counted errors, and the
//!   cache keeps serving;
//! - after a restart, every block that passes its checksum on disk is a hit
//!   again.

mod cache;
pub mod client;
mod config;
mod error;
pub mod local;
pub mod meta;
pub mod server;

pub use cache::{
    block_geometry, Cache, CacheStats, HostReservation, Lookup, LookupOptions, PrefetchId,
    StoreOutcome,
};
pub use config::{CacheConfig, CacheConfigBuilder, WriteMode};
pub use error::{CacheError, Result};
