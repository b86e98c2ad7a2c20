//! radixkv's cache service. Its library holds the [`Cache`] facade: the
//! index (`radix-tree`) joined with the block pools (`tiers`) — the one
//! place where tokens meet bytes. The server, the engine and the bench embed
//! it.
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
mod config;
mod error;
pub mod meta;

pub use cache::{Cache, CacheStats, Lookup, LookupOptions, PrefetchId, StoreOutcome};
pub use config::{CacheConfig, CacheConfigBuilder, WriteMode};
pub use error::{CacheError, Result};
