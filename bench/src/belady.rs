//! The offline optimum: evict the cached leaf whose next use is furthest
//! ahead (Belady's MIN, restricted to leaves so every cached page keeps its
//! prefix). It reads the whole trace in advance, so it is a bound, not a policy.

use radix_tree::policy::{Access, EvictionPolicy, NodeInfo, NodeStats, KEY_MAX};
use radix_tree::PageHash;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Belady {
    /// Request indices that use each page, ascending.
    uses: HashMap<PageHash, Vec<u32>>,
    /// The request being replayed; the replay loop advances it.
    now: Arc<AtomicU64>,
}

impl Belady {
    /// `pages[i]` are the page hashes of request `i`, in order.
    pub fn new(pages: &[Vec<PageHash>], now: Arc<AtomicU64>) -> Self {
        let mut uses: HashMap<PageHash, Vec<u32>> = HashMap::new();
        for (i, req) in pages.iter().enumerate() {
            for h in req {
                uses.entry(*h).or_default().push(i as u32);
            }
        }
        Self { uses, now }
    }

    fn next_use(&self, page: PageHash, after: u64) -> u64 {
        let Some(list) = self.uses.get(&page) else {
            return KEY_MAX;
        };
        let i = list.partition_point(|&r| u64::from(r) <= after);
        list.get(i).map_or(KEY_MAX, |&r| u64::from(r))
    }
}

impl EvictionPolicy for Belady {
    fn name(&self) -> &str {
        "belady"
    }

    fn ranks_each_page(&self) -> bool {
        true
    }

    fn on_access(&self, stats: &NodeStats, _: &NodeInfo, _: Access) {
        stats.set_aux(self.now.load(Ordering::Relaxed));
    }

    fn key(&self, stats: &NodeStats, node: &NodeInfo) -> u64 {
        // The index evicts the smallest key first and Belady the furthest
        // next use. The key falls when a page is used (its next use moves
        // away); the replay inserts every request, which re-ranks exactly.
        KEY_MAX - self.next_use(node.last_page, stats.aux())
    }
}
