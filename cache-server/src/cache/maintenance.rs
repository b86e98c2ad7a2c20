//! Whole-cache and whole-namespace operations: persisting before a planned
//! shutdown, trimming a tenant to its quota, clearing a namespace.

use super::Cache;
use crate::error::Result;
use radix_tree::{NamespaceId, PageHash, Tier};

impl Cache {
    /// Copies every page that has no disk copy to disk and waits for the
    /// copies, so that a restart finds the whole cache (what a graceful
    /// shutdown does). Returns the pages written; 0 without a disk tier.
    pub fn persist(&self) -> usize {
        if self.disk.is_none() {
            return 0;
        }
        self.flush();
        let namespaces: Vec<NamespaceId> = self.namespaces.lock().keys().copied().collect();
        let before = self
            .stats()
            .write_throughs
            .load(std::sync::atomic::Ordering::Relaxed);
        for ns in namespaces {
            let Ok((pages, ())) = self.index.snapshot(ns, || ()) else {
                continue;
            };
            let unsaved: Vec<PageHash> = pages
                .iter()
                .filter(|p| !p.location.has(Tier::Disk))
                .map(|p| p.hash)
                .collect();
            // Parents before children, in batches the movers can overlap.
            for part in unsaved.chunks(256) {
                self.write_through(ns, part);
            }
            self.flush();
        }
        let after = self
            .stats()
            .write_throughs
            .load(std::sync::atomic::Ordering::Relaxed);
        (after - before) as usize
    }

    /// Evicts up to `pages` of one namespace's copies on `tier` (a tenant
    /// over its quota gives up its own pages). A page whose copy on `tier`
    /// was its last leaves the cache. Returns the copies dropped.
    pub fn trim(&self, ns: NamespaceId, tier: Tier, pages: usize) -> Result<usize> {
        let evicted = self.index.evict_namespace(ns, tier, pages)?;
        self.free_dropped(&evicted);
        Ok(evicted.iter().filter(|e| e.dropped.has(tier)).count())
    }

    /// Drops every page of a namespace (admin invalidation). Fails with
    /// `Pinned` while a lease is held there. Returns the pages dropped.
    pub fn clear(&self, ns: NamespaceId) -> Result<usize> {
        self.flush();
        let evicted = self.index.clear_namespace(ns)?;
        self.free_dropped(&evicted);
        Ok(evicted.len())
    }

    /// The fastest tier: new blocks land there and promotions go there.
    pub fn top_tier(&self) -> Tier {
        self.top()
    }
}

impl Cache {
    /// Every namespace the cache knows (those recovered from disk too),
    /// with its key.
    pub fn namespaces(&self) -> Vec<(NamespaceId, radix_tree::NamespaceKey)> {
        let ids: Vec<NamespaceId> = self.namespaces.lock().keys().copied().collect();
        ids.into_iter()
            .filter_map(|ns| Some((ns, self.index.namespace_key(ns).ok()?)))
            .collect()
    }

    /// Now, on the clock lease expiry times are read on.
    pub fn now_ms(&self) -> u64 {
        self.index.config().clock().now_ms()
    }
}
