//! Stores through shared memory: a local client reserves host slots, writes
//! its blocks straight into the mapped file, and commits them — the bytes
//! cross no socket and are copied once, by the client.

use super::{Cache, StoreOutcome};
use crate::config::WriteMode;
use crate::error::{CacheError, Result};
use radix_tree::{BlockId, InsertHints, NamespaceId, Tier};
use std::sync::atomic::Ordering;
use tiers::{BlockPool, SlotId};

/// Host slots reserved for a client to write; each with its offset in the
/// shared-memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReservation {
    pub slots: Vec<SlotId>,
    pub offsets: Vec<u64>,
}

impl Cache {
    /// Reserves `pages` host slots (making room as a store would). The
    /// caller writes them through the shared-memory file, then
    /// [`commit_host`](Self::commit_host)s or [`cancel_host`](Self::cancel_host)s.
    pub fn reserve_host(&self, pages: usize) -> Result<HostReservation> {
        if self.host.shm_path().is_none() {
            return Err(CacheError::InvalidArgument(
                "the host tier is not in shared memory".into(),
            ));
        }
        let mut slots = Vec::with_capacity(pages);
        for _ in 0..pages {
            match self.allocate(Tier::Host) {
                Ok(s) => slots.push(s),
                Err(e) => {
                    self.cancel_host(&slots);
                    return Err(e);
                }
            }
        }
        let offsets = slots
            .iter()
            .map(|&s| self.host.slot_offset(s))
            .collect::<std::result::Result<_, _>>()?;
        Ok(HostReservation { slots, offsets })
    }

    /// Frees reserved slots that will not be committed. Slots that are not
    /// reserved (published meanwhile, or never ours) are left alone.
    pub fn cancel_host(&self, slots: &[SlotId]) {
        for &s in slots {
            self.host.unreserve(s);
        }
    }

    /// Makes reserved slots, written in place, the blocks of pages
    /// `first_page..` of `tokens` (one slot per page, in order). Pages
    /// cached already keep their copy and their slot is freed; every slot
    /// is either taken by the index or freed when this returns.
    pub fn commit_host(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        slots: &[SlotId],
    ) -> Result<StoreOutcome> {
        self.commit_host_with_hints(ns, tokens, first_page, slots, InsertHints::default())
    }

    /// [`Cache::commit_host`] with what the caller knows of the request
    /// (its output length, for the `odds` policy).
    pub fn commit_host_with_hints(
        &self,
        ns: NamespaceId,
        tokens: &[u32],
        first_page: usize,
        slots: &[SlotId],
        hints: InsertHints,
    ) -> Result<StoreOutcome> {
        self.reap();
        let ps = self.config.page_size;
        let pages = tokens.len() / ps;
        if first_page > pages || slots.len() != pages - first_page {
            self.cancel_host(slots);
            return Err(CacheError::InvalidArgument(format!(
                "{} slots for pages {first_page}..{pages}",
                slots.len()
            )));
        }
        let cached = match self.index.cached_pages(ns, tokens) {
            Ok(c) => c,
            Err(e) => {
                self.cancel_host(slots);
                return Err(e.into());
            }
        };
        if cached < first_page || cached >= pages {
            self.cancel_host(slots);
            return Ok(StoreOutcome {
                cached_pages: cached,
                stored_pages: 0,
            });
        }
        let (dup, new) = slots.split_at(cached - first_page);
        self.cancel_host(dup);
        for (i, &slot) in new.iter().enumerate() {
            if let Err(e) = self.host.seal(slot) {
                // Not a reserved slot (committed before, or never ours):
                // give back the rest, and the ones this call sealed.
                self.cancel_host(&new[i..]);
                for &s in &new[..i] {
                    self.host.free(s);
                }
                return Err(e.into());
            }
        }
        let hashes = match self.index.page_hashes(ns, &tokens[..pages * ps]) {
            Ok(h) => h,
            Err(e) => {
                self.cancel_host(new);
                return Err(e.into());
            }
        };
        let parent = cached.checked_sub(1).map(|i| hashes[i]);
        let blocks: Vec<BlockId> = new.iter().map(|s| BlockId(s.0)).collect();
        let stored = self.insert_written(
            ns,
            parent,
            &tokens[cached * ps..pages * ps],
            &hashes[cached..],
            Tier::Host,
            blocks,
            hints,
        )?;
        self.stats
            .shm_commits
            .fetch_add(stored as u64, Ordering::Relaxed);
        if self.config.write_mode == WriteMode::WriteThrough {
            self.write_through(ns, &hashes[cached..pages]);
        }
        Ok(StoreOutcome {
            cached_pages: cached,
            stored_pages: stored,
        })
    }
}

impl Cache {
    /// Where each page's host copy sits in the shared-memory file, copying
    /// pages that have none up from their fastest copy first (a
    /// synchronous promotion). The caller holds a lease on the pages.
    /// `None` from the first page that has no sound copy left (a miss).
    pub fn host_offsets(
        &self,
        ns: NamespaceId,
        hashes: &[radix_tree::PageHash],
    ) -> Result<Vec<Option<u64>>> {
        if self.host.shm_path().is_none() {
            return Err(CacheError::InvalidArgument(
                "the host tier is not in shared memory".into(),
            ));
        }
        let mut out = Vec::with_capacity(hashes.len());
        let mut buf = Vec::new();
        for &hash in hashes {
            let offset = match self
                .index
                .location(ns, hash)?
                .and_then(|l| l.get(Tier::Host))
            {
                Some(block) => Some(self.host.slot_offset(SlotId(block.0))?),
                None => self.promote_to_host(ns, hash, &mut buf)?,
            };
            let missing = offset.is_none();
            out.push(offset);
            if missing {
                // A prefix ends at its first miss.
                out.resize(hashes.len(), None);
                break;
            }
        }
        Ok(out)
    }

    fn promote_to_host(
        &self,
        ns: NamespaceId,
        hash: radix_tree::PageHash,
        buf: &mut Vec<u8>,
    ) -> Result<Option<u64>> {
        buf.resize(self.config.block_bytes, 0);
        if self.read_page(ns, hash, buf)?.is_none() {
            return Ok(None);
        }
        let slot = self.allocate(Tier::Host)?;
        if let Err(e) = self.host.write(slot, buf, &[]) {
            self.host.free(slot);
            return Err(e.into());
        }
        match self
            .index
            .add_location(ns, hash, Tier::Host, BlockId(slot.0))
        {
            Ok(()) => {
                self.stats.promotions.fetch_add(1, Ordering::Relaxed);
                Ok(Some(self.host.slot_offset(slot)?))
            }
            Err(_) => {
                // A copy landed meanwhile (a prefetch): use that one.
                self.host.free(slot);
                let loc = self.index.location(ns, hash)?;
                match loc.and_then(|l| l.get(Tier::Host)) {
                    Some(b) => Ok(Some(self.host.slot_offset(SlotId(b.0))?)),
                    None => Ok(None),
                }
            }
        }
    }
}
