//! One namespace's radix tree: an arena of nodes whose edges are runs of
//! whole pages, per-tier eviction sets, and the namespace's leases.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - every page in the tree has at least one copy, and its parent page too
//!   (the tree is prefix-closed);
//! - a node's `tier_pages[t]` counts its pages with a copy on `t`, and
//!   `tier_children[t]` counts children whose subtree holds a copy on `t`;
//! - a node is in `sets[t]` exactly when it is alive, not the root, holds a
//!   copy on `t`, no descendant does, and no hard lease covers it;
//! - a lease adds one to the pin count of every node from its target to the
//!   root (exclusive), so a pinned node's ancestors are pinned too.

use crate::arena::Arena;
use crate::children::Children;
use crate::error::{IndexError, Result};
use crate::events::IndexEvent;
use crate::hash::{edge_key, PageHash, PassThroughBuild, ShortHash};
use crate::policy::{
    Access, AccessKind, EvictionPolicy, InsertHints, NodeInfo, NodeStats, KEY_BITS, KEY_MAX,
};
use crate::{BlockId, LeaseId, NamespaceId, PageLocation, PinKind, Tier, TIERS};
use std::collections::{BTreeSet, HashMap};

pub(crate) const ROOT: u32 = 0;
const NOT_IN_SET: u64 = u64::MAX;
/// The page-hash map grows four-fold while that makes room for at most this
/// many entries (see `Tree::reserve_hashes`): a table of at most 2^16
/// buckets (under 1 MiB), so four-fold growth costs a namespace under
/// 3/4 MiB of slack at worst.
const FOURFOLD_MAP: usize = 1 << 15;
/// Freed nodes keep page buffers up to this many pages for reuse.
const RECYCLED_PAGES: usize = 64;

#[derive(Debug)]
pub(crate) struct Node {
    parent: u32,
    alive: bool,
    depth_pages: u32,
    tokens: Vec<u32>,
    /// One slot per page: its hash and where its copies are.
    slots: Vec<PageSlot>,
    /// Sorted by edge key (the first page's key); equal keys are possible.
    children: Children,
    stats: NodeStats,
    priority: u8,
    hard_pins: u32,
    soft_pins: u32,
    soft_priority: u8,
    tier_pages: [u32; TIERS],
    tier_children: [u32; TIERS],
    set_key: [u64; TIERS],
}

impl Node {
    fn new(parent: u32, depth_pages: u32, tick: u64) -> Self {
        Self {
            parent,
            alive: true,
            depth_pages,
            tokens: Vec::new(),
            slots: Vec::new(),
            children: Children::None,
            stats: NodeStats::new(tick),
            priority: 0,
            hard_pins: 0,
            soft_pins: 0,
            soft_priority: 0,
            tier_pages: [0; TIERS],
            tier_children: [0; TIERS],
            set_key: [NOT_IN_SET; TIERS],
        }
    }

    fn pages(&self) -> usize {
        self.slots.len()
    }

    /// A split half inherits the node's pins and access statistics: every
    /// lease and access that covered the node covered both halves.
    fn copy_pins_and_stats(&mut self, from: &Node) {
        self.stats = NodeStats::copy_from(&from.stats);
        self.priority = from.priority;
        self.hard_pins = from.hard_pins;
        self.soft_pins = from.soft_pins;
        self.soft_priority = from.soft_priority;
    }

    fn last_hash(&self) -> Option<PageHash> {
        self.slots.last().map(PageSlot::hash)
    }

    fn has_subtree_copy(&self, t: usize) -> bool {
        self.tier_pages[t] > 0 || self.tier_children[t] > 0
    }

    fn pinned(&self) -> bool {
        self.hard_pins > 0 || self.soft_pins > 0
    }

    fn heap_bytes(&self) -> usize {
        self.tokens.capacity() * 4
            + self.slots.capacity() * std::mem::size_of::<PageSlot>()
            + self.children.heap_bytes()
    }
}

/// Gives back a node's spare capacity once it is at least half wasted, so
/// memory stays near the live size without a reallocation per evicted page.
fn trim(node: &mut Node) {
    if node.slots.capacity() >= 2 * node.slots.len().max(1) {
        node.tokens.shrink_to_fit();
        node.slots.shrink_to_fit();
    }
}

/// A page's hash and locations, packed to 28 bytes (a `u128` field would
/// align the slot to 32).
#[derive(Debug, Clone, Copy)]
struct PageSlot {
    hash: [u32; 4],
    loc: PageLocation,
}

impl PageSlot {
    fn new(hash: PageHash, loc: PageLocation) -> Self {
        let h = hash.0;
        Self {
            hash: [
                h as u32,
                (h >> 32) as u32,
                (h >> 64) as u32,
                (h >> 96) as u32,
            ],
            loc,
        }
    }

    fn hash(&self) -> PageHash {
        let [a, b, c, d] = self.hash.map(u128::from);
        PageHash(a | (b << 32) | (c << 64) | (d << 96))
    }
}

#[derive(Debug, Clone, Copy)]
struct LeaseRecord {
    target: u32,
    kind: PinKind,
    expires_ms: u64,
    pages: usize,
}

/// The answer to a lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Match {
    /// Whole pages matched from the start of the prompt.
    pub pages: usize,
    pub page_size: usize,
    /// Where each matched page's copies are.
    pub locations: Vec<PageLocation>,
    /// Matched pages with a copy on each tier.
    pub tier_pages: [usize; TIERS],
    /// Hash of the last matched page.
    pub last_page: Option<PageHash>,
    /// Matched pages by the fastest tier holding them (sums to `pages`).
    pub fastest_pages: [usize; TIERS],
    /// Each matched page's hash, when the match was made with
    /// [`Match::with_hashes`] (empty otherwise, to keep lookups lean).
    pub hashes: Vec<PageHash>,
    collect_hashes: bool,
}

impl Match {
    pub fn tokens(&self) -> usize {
        self.pages * self.page_size
    }

    /// Leading pages that all have a copy on `tier`.
    pub fn tier_prefix(&self, tier: Tier) -> usize {
        self.locations.iter().take_while(|l| l.has(tier)).count()
    }

    /// A buffer whose matches also list each page's hash.
    pub fn with_hashes() -> Self {
        Self {
            collect_hashes: true,
            ..Self::default()
        }
    }

    pub(crate) fn reset(&mut self, page_size: usize) {
        self.hashes.clear();
        self.pages = 0;
        self.page_size = page_size;
        self.locations.clear();
        self.tier_pages = [0; TIERS];
        self.fastest_pages = [0; TIERS];
        self.last_page = None;
    }
}

/// What an insert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Leading pages that were already in the tree before this insert.
    pub cached_pages: usize,
    /// Pages added to the tree.
    pub new_pages: usize,
    /// Caller blocks the index did not take because the page already had a
    /// copy on that tier: the caller frees them.
    pub rejected: Vec<BlockId>,
    /// Hash of the last whole page of the inserted prompt.
    pub last_page: Option<PageHash>,
}

/// A copy that eviction would take: the page and all of its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub ns: NamespaceId,
    pub hash: PageHash,
    pub location: PageLocation,
}

/// A cached page as a snapshot lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSnapshot {
    pub hash: PageHash,
    /// `None` for a namespace's first page.
    pub parent: Option<PageHash>,
    pub location: PageLocation,
}

/// One page copy (or several) that left the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictedPage {
    pub ns: NamespaceId,
    pub hash: PageHash,
    /// The copies dropped from the index: the caller frees (or demotes) them.
    pub dropped: PageLocation,
    /// The copies still indexed. Empty when the page left the tree.
    pub remaining: PageLocation,
}

impl EvictedPage {
    pub fn page_removed(&self) -> bool {
        self.remaining.is_empty()
    }
}

pub(crate) struct Tree {
    ns: NamespaceId,
    page_size: usize,
    seed: PageHash,
    nodes: Arena<Node>,
    free: Vec<u32>,
    by_hash: HashMap<ShortHash, u32, PassThroughBuild>,
    /// The most entries `by_hash` has been asked to hold.
    hash_peak: usize,
    sets: [BTreeSet<(u64, u32)>; TIERS],
    leases: HashMap<u64, LeaseRecord>,
    lease_expiry: BTreeSet<(u64, u64)>,
    soft_targets: HashMap<u32, Vec<u64>>,
    next_lease: u64,
    pub(crate) pages: u64,
    pub(crate) tier_pages: [u64; TIERS],
    pub(crate) pinned_pages: u64,
    pub(crate) live_nodes: u64,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("ns", &self.ns)
            .field("page_size", &self.page_size)
            .field("pages", &self.pages)
            .field("nodes", &self.live_nodes)
            .finish()
    }
}

/// Per-operation context handed down from the index.
pub(crate) struct OpCtx<'a> {
    pub policy: &'a dyn EvictionPolicy,
    pub tick: u64,
    pub events: Option<&'a mut Vec<IndexEvent>>,
}

impl OpCtx<'_> {
    fn emit(&mut self, ev: IndexEvent) {
        if let Some(events) = self.events.as_deref_mut() {
            events.push(ev);
        }
    }
}

impl Tree {
    pub(crate) fn new(ns: NamespaceId, page_size: usize, seed: PageHash) -> Self {
        Self {
            ns,
            page_size,
            seed,
            nodes: {
                let mut nodes = Arena::new();
                nodes.push(Node::new(ROOT, 0, 0));
                nodes
            },
            free: Vec::new(),
            by_hash: HashMap::default(),
            hash_peak: 0,
            sets: Default::default(),
            leases: HashMap::new(),
            lease_expiry: BTreeSet::new(),
            soft_targets: HashMap::new(),
            next_lease: 1,
            pages: 0,
            tier_pages: [0; TIERS],
            pinned_pages: 0,
            live_nodes: 0,
        }
    }

    // ---- lookups ---------------------------------------------------------

    fn find_child(&self, node: u32, page: &[u32]) -> Option<u32> {
        let key = edge_key(page);
        let mut children = self.nodes[node as usize].children.with_key(key);
        if page.len() == 1 {
            // One-token pages: the edge key is the token itself, so a child
            // with the key starts with the page (no need to load its tokens).
            let child = children.next();
            debug_assert!(child.is_none_or(|c| self.nodes[c as usize].tokens[..1] == *page));
            return child;
        }
        children.find(|&c| &self.nodes[c as usize].tokens[..self.page_size] == page)
    }

    /// Whole pages in common between an edge and the rest of a prompt,
    /// given that their first pages are equal.
    fn common_pages(&self, edge: &[u32], rest: &[u32]) -> usize {
        let ps = self.page_size;
        let len = edge.len().min(rest.len()) / ps * ps;
        // Whole runs compare with memcmp; find the first differing page only
        // when they differ.
        if edge[..len] == rest[..len] {
            return len / ps;
        }
        let first_diff = edge[..len]
            .iter()
            .zip(&rest[..len])
            .position(|(a, b)| a != b)
            .unwrap_or(len);
        first_diff / ps
    }

    fn info(&self, n: u32) -> NodeInfo {
        let node = &self.nodes[n as usize];
        NodeInfo {
            depth_pages: node.depth_pages,
            pages: node.pages() as u32,
            page_size: self.page_size as u32,
            priority: node.priority,
            last_page: node.last_hash().unwrap_or(self.seed),
            first_page: node.slots.first().map_or(self.seed, PageSlot::hash),
        }
    }

    /// The access an insert of `pages` pages below node `start` records.
    fn insert_access(&self, start: u32, pages: usize, hints: InsertHints, tick: u64) -> Access {
        let before = if start == ROOT {
            0
        } else {
            let node = &self.nodes[start as usize];
            node.depth_pages as usize + node.pages()
        };
        Access {
            tick,
            kind: AccessKind::Insert,
            previous: 0,
            prompt_pages: (before + pages).min(u32::MAX as usize) as u32,
            output_tokens: hints.output_tokens,
        }
    }

    fn touch(&self, n: u32, policy: &dyn EvictionPolicy, mut access: Access) {
        let node = &self.nodes[n as usize];
        access.previous = node.stats.last_access();
        node.stats.record(access);
        policy.on_access(&node.stats, &self.info(n), access);
    }

    /// Walks the prompt; calls `visit(node, matched_pages_of_node, full)` for
    /// each node it matches. Returns the deepest node touched (or ROOT).
    fn walk(&self, tokens: &[u32], mut visit: impl FnMut(u32, usize, bool)) -> u32 {
        let ps = self.page_size;
        let usable = tokens.len() / ps * ps;
        let mut node = ROOT;
        let mut pos = 0;
        while pos < usable {
            let Some(child) = self.find_child(node, &tokens[pos..pos + ps]) else {
                break;
            };
            let edge = &self.nodes[child as usize].tokens;
            let n = self.common_pages(edge, &tokens[pos..usable]);
            let full = n == self.nodes[child as usize].pages();
            visit(child, n, full);
            node = child;
            if !full {
                break;
            }
            pos += n * ps;
        }
        node
    }

    /// Fills `out` with the longest cached prefix of `tokens`. Records a hit
    /// on every node matched in full (not on a node matched in part: its
    /// tail was not used).
    pub(crate) fn match_into(
        &self,
        tokens: &[u32],
        policy: &dyn EvictionPolicy,
        tick: u64,
        out: &mut Match,
    ) {
        out.reset(self.page_size);
        let access = Access {
            tick,
            kind: AccessKind::Hit,
            previous: 0,
            prompt_pages: (tokens.len() / self.page_size).min(u32::MAX as usize) as u32,
            output_tokens: 0,
        };
        self.walk(tokens, |n, count, full| {
            let node = &self.nodes[n as usize];
            let pages = node.pages() as u32;
            if node.tier_pages.iter().all(|&c| c == 0 || c == pages) {
                // Every page of the node has copies on the same tiers (the
                // usual case): count them from the node's own counts.
                let on = |t: usize| node.tier_pages[t] == pages;
                for t in (0..TIERS).filter(|&t| on(t)) {
                    out.tier_pages[t] += count;
                }
                if let Some(t) = (0..TIERS).find(|&t| on(t)) {
                    out.fastest_pages[t] += count;
                }
            } else {
                for loc in node.slots[..count].iter().map(|s| &s.loc) {
                    for t in 0..TIERS {
                        out.tier_pages[t] += usize::from(loc.has(Tier::ALL[t]));
                    }
                    if let Some(t) = loc.fastest() {
                        out.fastest_pages[t.index()] += 1;
                    }
                }
            }
            out.locations
                .extend(node.slots[..count].iter().map(|s| s.loc));
            if out.collect_hashes {
                out.hashes
                    .extend(node.slots[..count].iter().map(PageSlot::hash));
            }
            out.pages += count;
            out.last_page = Some(node.slots[count - 1].hash());
            if full {
                self.touch(n, policy, access);
            }
        });
    }

    /// Pages of the longest cached prefix, without touching anything.
    pub(crate) fn match_len(&self, tokens: &[u32]) -> usize {
        let mut pages = 0;
        self.walk(tokens, |_, count, _| pages += count);
        pages
    }

    fn locate(&self, hash: PageHash) -> Option<(u32, usize)> {
        let &n = self.by_hash.get(&hash.short())?;
        // The map names the node; find the page in it comparing one word
        // first (a long node is scanned, so keep the scan cheap).
        let word = hash.0 as u32;
        // From the end: the page where a hit ended (what `insert_after`
        // names) is most often a node's last.
        let off = self.nodes[n as usize]
            .slots
            .iter()
            .rposition(|s| s.hash[0] == word && s.hash() == hash)?;
        Some((n, off))
    }

    pub(crate) fn location_of(&self, hash: PageHash) -> Option<PageLocation> {
        self.locate(hash)
            .map(|(n, off)| self.nodes[n as usize].slots[off].loc)
    }

    /// Lookups that matched the whole node holding a page.
    pub(crate) fn page_hits(&self, hash: PageHash) -> Option<u32> {
        let (n, _) = self.locate(hash)?;
        Some(self.nodes[n as usize].stats.hits())
    }

    /// A cached page's parent and tokens.
    pub(crate) fn page_tokens(&self, hash: PageHash) -> Option<(Option<PageHash>, Vec<u32>)> {
        let (n, off) = self.locate(hash)?;
        let ps = self.page_size;
        let tokens = self.nodes[n as usize].tokens[off * ps..(off + 1) * ps].to_vec();
        Some((self.parent_hash(n, off), tokens))
    }

    /// Every cached page, parents before children: its hash, its parent's
    /// and where its copies are (for a KV-events subscriber's snapshot).
    pub(crate) fn snapshot(&self, out: &mut Vec<PageSnapshot>) {
        let mut stack: Vec<u32> = self.nodes[ROOT as usize]
            .children
            .iter()
            .map(|(_, c)| c)
            .collect();
        while let Some(n) = stack.pop() {
            let node = &self.nodes[n as usize];
            let mut parent = self.nodes[node.parent as usize].last_hash();
            for slot in &node.slots {
                let hash = slot.hash();
                out.push(PageSnapshot {
                    hash,
                    parent,
                    location: slot.loc,
                });
                parent = Some(hash);
            }
            stack.extend(node.children.iter().map(|(_, c)| c));
        }
    }

    /// The parent page of a page: `None` for a namespace's first page.
    fn parent_hash(&self, n: u32, off: usize) -> Option<PageHash> {
        if off > 0 {
            return Some(self.nodes[n as usize].slots[off - 1].hash());
        }
        let p = self.nodes[n as usize].parent;
        self.nodes[p as usize].last_hash()
    }

    // ---- allocation and eviction sets -----------------------------------

    #[inline]
    fn alloc(&mut self, node: Node) -> u32 {
        self.live_nodes += 1;
        if let Some(i) = self.free.pop() {
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node) as u32
        }
    }

    fn full_key(&self, n: u32, policy: &dyn EvictionPolicy) -> u64 {
        let node = &self.nodes[n as usize];
        let class = if node.soft_pins > 0 {
            1 + u64::from(node.soft_priority)
        } else {
            0
        };
        (class << KEY_BITS) | (policy.key(&node.stats, &self.info(n)) & KEY_MAX)
    }

    fn should_be_in_set(&self, n: u32, t: usize) -> bool {
        let node = &self.nodes[n as usize];
        n != ROOT
            && node.alive
            && node.tier_pages[t] > 0
            && node.tier_children[t] == 0
            && node.hard_pins == 0
    }

    /// Puts `n` into or out of tier `t`'s eviction set as its state says.
    fn refresh(&mut self, n: u32, t: usize, policy: &dyn EvictionPolicy) {
        let want = self.should_be_in_set(n, t);
        let have = self.nodes[n as usize].set_key[t];
        if want && have == NOT_IN_SET {
            let key = self.full_key(n, policy);
            self.sets[t].insert((key, n));
            self.nodes[n as usize].set_key[t] = key;
        } else if !want && have != NOT_IN_SET {
            self.sets[t].remove(&(have, n));
            self.nodes[n as usize].set_key[t] = NOT_IN_SET;
        }
    }

    /// Re-ranks `n` in every set it is in (its pin class changed).
    fn rekey(&mut self, n: u32, policy: &dyn EvictionPolicy) {
        for t in 0..TIERS {
            let have = self.nodes[n as usize].set_key[t];
            if have != NOT_IN_SET {
                self.sets[t].remove(&(have, n));
                let key = self.full_key(n, policy);
                self.sets[t].insert((key, n));
                self.nodes[n as usize].set_key[t] = key;
            }
        }
    }

    /// Ranks `n` exactly in every set it is in (after an access under the
    /// write lock, so policies whose key can fall on access stay exact).
    fn rekey_in_sets(&mut self, n: u32, policy: &dyn EvictionPolicy) {
        for t in 0..TIERS {
            if self.nodes[n as usize].set_key[t] != NOT_IN_SET {
                self.rekey_tier(n, t, policy);
            }
        }
    }

    fn rekey_tier(&mut self, n: u32, t: usize, policy: &dyn EvictionPolicy) {
        let have = self.nodes[n as usize].set_key[t];
        let key = self.full_key(n, policy);
        if key != have {
            self.sets[t].remove(&(have, n));
            self.sets[t].insert((key, n));
            self.nodes[n as usize].set_key[t] = key;
        }
    }

    fn presence(&self, n: u32) -> [bool; TIERS] {
        let node = &self.nodes[n as usize];
        std::array::from_fn(|t| node.has_subtree_copy(t))
    }

    /// After `n`'s own copies or children changed: fixes set membership of
    /// `n` and, while subtree presence flips, of its ancestors.
    fn propagate(&mut self, mut n: u32, before: [bool; TIERS], policy: &dyn EvictionPolicy) {
        let mut before = before;
        loop {
            let after = self.presence(n);
            for t in 0..TIERS {
                self.refresh(n, t, policy);
            }
            if n == ROOT || before == after {
                return;
            }
            let p = self.nodes[n as usize].parent;
            let parent_before = self.presence(p);
            for t in 0..TIERS {
                match (before[t], after[t]) {
                    (false, true) => self.nodes[p as usize].tier_children[t] += 1,
                    (true, false) => self.nodes[p as usize].tier_children[t] -= 1,
                    _ => {}
                }
            }
            before = parent_before;
            n = p;
        }
    }

    /// The lowest-ranked node of tier `t`'s set, re-ranking stale entries
    /// (nodes accessed since they were ranked) on the way.
    /// `skip` names a node that is never chosen (see `evict_protecting`).
    fn min_victim(
        &mut self,
        t: usize,
        policy: &dyn EvictionPolicy,
        skip: Option<u32>,
    ) -> Option<(u64, u32)> {
        loop {
            let &(key, n) = match skip {
                None => self.sets[t].first()?,
                Some(s) => self.sets[t].iter().find(|&&(_, n)| n != s)?,
            };
            let current = self.full_key(n, policy);
            if current <= key {
                return Some((key, n));
            }
            self.sets[t].remove(&(key, n));
            self.sets[t].insert((current, n));
            self.nodes[n as usize].set_key[t] = current;
        }
    }

    /// The lowest current rank on `tier`, found under a shared lock: stale
    /// entries rank at or below their current rank, so the scan stops at
    /// the first stored rank that cannot beat the best current one.
    pub(crate) fn peek_min_key(&self, tier: Tier, policy: &dyn EvictionPolicy) -> Option<u64> {
        let mut best: Option<u64> = None;
        for &(stored, n) in &self.sets[tier.index()] {
            if best.is_some_and(|b| b <= stored) {
                break;
            }
            let current = self.full_key(n, policy);
            best = Some(best.map_or(current, |b| b.min(current)));
        }
        best
    }

    /// The copies on `tier` that eviction would take first, up to `max`,
    /// with their rank, without changing anything: a caller that must
    /// demote before dropping (write-back) copies them down, records the
    /// new copy, then drops this one.
    pub(crate) fn eviction_candidates(
        &self,
        tier: Tier,
        max: usize,
        policy: &dyn EvictionPolicy,
        out: &mut Vec<(u64, Candidate)>,
    ) {
        let t = tier.index();
        let mut found: Vec<(u64, Candidate)> = Vec::new();
        for &(stored, n) in &self.sets[t] {
            // Stored ranks are never above current ones, so once `max`
            // copies rank below every later entry's stored rank, they are
            // the first `max`.
            if found.len() >= max {
                found.sort_by_key(|(k, _)| *k);
                found.truncate(max);
                if found.last().is_some_and(|(k, _)| *k <= stored) {
                    break;
                }
            }
            let key = self.full_key(n, policy);
            let node = &self.nodes[n as usize];
            for slot in node
                .slots
                .iter()
                .rev()
                .filter(|s| s.loc.has(tier))
                .take(max)
            {
                let candidate = Candidate {
                    ns: self.ns,
                    hash: slot.hash(),
                    location: slot.loc,
                };
                found.push((key, candidate));
            }
        }
        found.sort_by_key(|(k, _)| *k);
        found.truncate(max);
        out.extend(found);
    }

    // ---- insert -----------------------------------------------------------

    /// Splits `n` after `at` pages and returns the node that holds the head.
    /// The smaller side moves into a new node, so the cost (copying pages,
    /// re-pointing their hash entries) is that of the smaller side.
    fn split(&mut self, n: u32, at: usize, policy: &dyn EvictionPolicy) -> u32 {
        if 2 * at >= self.nodes[n as usize].pages() {
            self.split_moving_tail(n, at, policy);
            n
        } else {
            self.split_moving_head(n, at, policy)
        }
    }

    /// A new node takes the head and sits between `n` and its parent.
    fn split_moving_head(&mut self, n: u32, at: usize, policy: &dyn EvictionPolicy) -> u32 {
        let ps = self.page_size;
        let old = &mut self.nodes[n as usize];
        debug_assert!(at > 0 && at < old.pages());
        let mut head = Node::new(old.parent, old.depth_pages, 0);
        head.copy_pins_and_stats(old);
        head.tokens = old.tokens[..at * ps].to_vec();
        head.slots = old.slots[..at].to_vec();
        old.tokens.drain(..at * ps);
        old.slots.drain(..at);
        trim(old);
        old.depth_pages += at as u32;
        for t in 0..TIERS {
            let moved = head
                .slots
                .iter()
                .filter(|s| s.loc.has(Tier::ALL[t]))
                .count() as u32;
            head.tier_pages[t] = moved;
            old.tier_pages[t] -= moved;
        }
        let parent = old.parent;
        let tail_key = edge_key(&old.tokens[..ps]);
        for t in 0..TIERS {
            head.tier_children[t] = u32::from(old.has_subtree_copy(t));
        }
        let h = self.alloc(head);
        self.nodes[h as usize].children.insert(tail_key, n);
        self.nodes[n as usize].parent = h;
        // The head starts with the same page, so it keeps `n`'s edge key.
        let key = edge_key(&self.nodes[h as usize].tokens[..ps]);
        self.nodes[parent as usize].children.replace(key, n, h);
        self.repoint_hashes(h, n);
        for t in 0..TIERS {
            self.refresh(n, t, policy);
            self.refresh(h, t, policy);
        }
        h
    }

    /// A new node takes the tail and `n`'s children; leases that targeted
    /// `n` now target the new node, the deepest part of what they pinned.
    fn split_moving_tail(&mut self, n: u32, at: usize, policy: &dyn EvictionPolicy) {
        let ps = self.page_size;
        let old = &mut self.nodes[n as usize];
        debug_assert!(at > 0 && at < old.pages());
        let mut tail = Node::new(n, old.depth_pages + at as u32, 0);
        tail.copy_pins_and_stats(old);
        tail.tokens = old.tokens.split_off(at * ps);
        tail.slots = old.slots.split_off(at);
        trim(old);
        tail.children = std::mem::take(&mut old.children);
        tail.tier_children = old.tier_children;
        for t in 0..TIERS {
            let moved = tail
                .slots
                .iter()
                .filter(|s| s.loc.has(Tier::ALL[t]))
                .count() as u32;
            tail.tier_pages[t] = moved;
            old.tier_pages[t] -= moved;
            old.tier_children[t] = u32::from(tail.has_subtree_copy(t));
        }
        let pinned = old.pinned();
        let tail_key = edge_key(&tail.tokens[..ps]);
        let t_id = self.alloc(tail);
        let moved = std::mem::take(&mut self.nodes[t_id as usize].children);
        for (_, c) in moved.iter() {
            self.nodes[c as usize].parent = t_id;
        }
        self.nodes[t_id as usize].children = moved;
        self.nodes[n as usize].children.insert(tail_key, t_id);
        self.repoint_hashes(t_id, n);
        if pinned {
            for rec in self.leases.values_mut() {
                if rec.target == n {
                    rec.target = t_id;
                }
            }
            if let Some(pins) = self.soft_targets.remove(&n) {
                self.soft_targets.insert(t_id, pins);
            }
        }
        for t in 0..TIERS {
            self.refresh(n, t, policy);
            self.refresh(t_id, t, policy);
        }
        // `n`'s last page changed: policies may rank it differently.
        self.rekey_in_sets(n, policy);
    }

    /// Hash entries of `to`'s pages that still name `from` now name `to`.
    fn repoint_hashes(&mut self, to: u32, from: u32) {
        for slot in &self.nodes[to as usize].slots {
            if let Some(v) = self.by_hash.get_mut(&slot.hash().short()) {
                if *v == from {
                    *v = to;
                }
            }
        }
    }

    /// Makes room in the page-hash map for `pages` more entries. Growing
    /// moves every entry, so a small map grows four-fold instead of two-fold
    /// (while a namespace fills, an entry moves about a third of a time on
    /// average instead of about once); past [`FOURFOLD_MAP`] entries, where
    /// slack costs real memory, it doubles as usual.
    ///
    /// Only a map reaching a new size grows so: one refilling after
    /// removals (its tombstones take from its capacity) is left to the
    /// map, which clears them in place when it is at most half full.
    fn reserve_hashes(&mut self, pages: usize) {
        let len = self.by_hash.len();
        if len + pages > self.by_hash.capacity() {
            let extra = if len >= self.hash_peak && 4 * len <= FOURFOLD_MAP {
                3 * len
            } else {
                0
            };
            self.by_hash.reserve(pages.max(extra));
        }
        self.hash_peak = self.hash_peak.max(len + pages);
    }

    fn add_child(&mut self, parent: u32, child: u32) {
        let key = edge_key(&self.nodes[child as usize].tokens[..self.page_size]);
        self.nodes[parent as usize].children.insert(key, child);
    }

    /// `hashes` names each whole page of `tokens` (chained from the
    /// namespace's seed), computed by the caller before it took the lock.
    pub(crate) fn insert(
        &mut self,
        tokens: &[u32],
        hashes: &[PageHash],
        tier: Tier,
        blocks: &[BlockId],
        hints: InsertHints,
        ctx: &mut OpCtx<'_>,
    ) -> InsertOutcome {
        self.insert_from(ROOT, tokens, hashes, tier, blocks, hints, ctx)
    }

    /// Inserts the pages that follow the cached page `parent` (`None`: the
    /// namespace's first pages), without walking the prefix again. `hashes`
    /// names each whole page of `tokens`, chained from `parent`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn insert_after(
        &mut self,
        parent: Option<PageHash>,
        tokens: &[u32],
        hashes: &[PageHash],
        tier: Tier,
        blocks: &[BlockId],
        hints: InsertHints,
        ctx: &mut OpCtx<'_>,
    ) -> Result<InsertOutcome> {
        let start = match parent {
            None => ROOT,
            Some(hash) => {
                let (n, off) = self.locate(hash).ok_or(IndexError::UnknownPage(hash))?;
                // An insert of no whole page (hints alone) needs no split.
                let inserts = tokens.len() >= self.page_size;
                let n = if off + 1 < self.nodes[n as usize].pages() && inserts {
                    self.split(n, off + 1, ctx.policy)
                } else {
                    n
                };
                let access = self.insert_access(n, tokens.len() / self.page_size, hints, ctx.tick);
                self.touch(n, ctx.policy, access);
                if ctx.policy.reads_insert_hints() {
                    // The prefix above was used too: tell the policy of each
                    // node on it, as an insert from the root would.
                    let mut up = self.nodes[n as usize].parent;
                    while up != ROOT {
                        self.touch(up, ctx.policy, access);
                        self.rekey_in_sets(up, ctx.policy);
                        up = self.nodes[up as usize].parent;
                    }
                }
                n
            }
        };
        let out = self.insert_from(start, tokens, hashes, tier, blocks, hints, ctx);
        // Re-rank the parent after the insert, not before: a parent that
        // just gained a child with copies has left its eviction sets, and
        // ranking it first would move it in a set only to take it out.
        if start != ROOT {
            self.rekey_in_sets(start, ctx.policy);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_from(
        &mut self,
        start: u32,
        tokens: &[u32],
        hashes: &[PageHash],
        tier: Tier,
        blocks: &[BlockId],
        hints: InsertHints,
        ctx: &mut OpCtx<'_>,
    ) -> InsertOutcome {
        let ps = self.page_size;
        let total = tokens.len() / ps;
        let t = tier.index();
        let mut out = InsertOutcome::default();
        let access = self.insert_access(start, total, hints, ctx.tick);
        let priority = hints.priority;
        let mut node = start;
        let mut page = 0;
        while page < total {
            let rest = &tokens[page * ps..total * ps];
            let Some(mut child) = self.find_child(node, &rest[..ps]) else {
                break;
            };
            let n = self.common_pages(&self.nodes[child as usize].tokens, rest);
            if n < self.nodes[child as usize].pages() {
                child = self.split(child, n, ctx.policy);
            }
            let before = self.presence(child);
            let mut adopted = false;
            for off in 0..n {
                let block = blocks[page + off];
                let loc = &mut self.nodes[child as usize].slots[off].loc;
                if let Some(existing) = loc.get(tier) {
                    if existing != block {
                        out.rejected.push(block);
                    }
                    continue;
                }
                adopted = true;
                loc.set(tier, Some(block));
                self.nodes[child as usize].tier_pages[t] += 1;
                self.tier_pages[t] += 1;
                let hash = self.nodes[child as usize].slots[off].hash();
                let parent = self.parent_hash(child, off);
                ctx.emit(IndexEvent::Stored {
                    ns: self.ns,
                    hash,
                    parent,
                    tier,
                });
            }
            self.nodes[child as usize].priority = self.nodes[child as usize].priority.max(priority);
            if adopted {
                self.propagate(child, before, ctx.policy);
            }
            self.touch(child, ctx.policy, access);
            self.rekey_in_sets(child, ctx.policy);
            node = child;
            page += n;
        }
        out.cached_pages = page;
        if page < total {
            out.new_pages = total - page;
            node = self.append_new(
                node,
                &tokens[page * ps..total * ps],
                &hashes[page..total],
                &blocks[page..total],
                tier,
                priority,
                access,
                ctx,
            );
        }
        out.last_page = self.nodes[node as usize].last_hash();
        out
    }

    /// Adds a new leaf under `parent` holding `tokens` (whole pages), named
    /// `hashes`.
    #[allow(clippy::too_many_arguments)]
    fn append_new(
        &mut self,
        parent: u32,
        tokens: &[u32],
        hashes: &[PageHash],
        blocks: &[BlockId],
        tier: Tier,
        priority: u8,
        access: Access,
        ctx: &mut OpCtx<'_>,
    ) -> u32 {
        let ps = self.page_size;
        let pages = tokens.len() / ps;
        let t = tier.index();
        let parent_node = &self.nodes[parent as usize];
        let depth = parent_node.depth_pages + parent_node.pages() as u32;
        let prev = parent_node.last_hash().unwrap_or(self.seed);
        let parent_before = self.presence(parent);
        let mut node = Node::new(parent, depth, ctx.tick);
        node.priority = priority;
        // Reuse the buffers of the node slot this one will take, if any and
        // if they fit: growing one would copy its old contents for nothing.
        if let Some(&free) = self.free.last() {
            let old = &mut self.nodes[free as usize];
            if old.slots.capacity() >= pages && old.tokens.capacity() >= tokens.len() {
                node.tokens = std::mem::take(&mut old.tokens);
                node.slots = std::mem::take(&mut old.slots);
            }
        }
        node.tokens.extend_from_slice(tokens);
        node.slots.reserve_exact(pages);
        let first_parent = (parent != ROOT).then_some(prev);
        debug_assert_eq!(hashes.len(), pages);
        debug_assert!(tokens
            .chunks_exact(ps)
            .zip(hashes)
            .try_fold(prev, |p, (page, &h)| (p.chain(page) == h).then_some(h))
            .is_some());
        for (&hash, &block) in hashes.iter().zip(blocks) {
            let mut loc = PageLocation::EMPTY;
            loc.set(tier, Some(block));
            node.slots.push(PageSlot::new(hash, loc));
        }
        node.tier_pages[t] = pages as u32;
        let n = self.alloc(node);
        self.reserve_hashes(pages);
        for slot in &self.nodes[n as usize].slots {
            self.by_hash.entry(slot.hash().short()).or_insert(n);
        }
        if ctx.events.is_some() {
            for i in 0..pages {
                let hash = self.nodes[n as usize].slots[i].hash();
                let parent_hash = if i == 0 {
                    first_parent
                } else {
                    Some(self.nodes[n as usize].slots[i - 1].hash())
                };
                ctx.emit(IndexEvent::Stored {
                    ns: self.ns,
                    hash,
                    parent: parent_hash,
                    tier,
                });
            }
        }
        self.pages += pages as u64;
        self.tier_pages[t] += pages as u64;
        self.add_child(parent, n);
        // The new leaf holds copies on `tier`: one more child with presence.
        self.nodes[parent as usize].tier_children[t] += 1;
        self.touch(n, ctx.policy, access);
        self.refresh(n, t, ctx.policy);
        self.propagate(parent, parent_before, ctx.policy);
        n
    }

    // ---- locations ----------------------------------------------------------

    pub(crate) fn add_location(
        &mut self,
        hash: PageHash,
        tier: Tier,
        block: BlockId,
        ctx: &mut OpCtx<'_>,
    ) -> Result<()> {
        let (n, off) = self.locate(hash).ok_or(IndexError::UnknownPage(hash))?;
        let t = tier.index();
        if self.nodes[n as usize].slots[off].loc.has(tier) {
            return Err(IndexError::AlreadyPresent);
        }
        let before = self.presence(n);
        self.nodes[n as usize].slots[off].loc.set(tier, Some(block));
        self.nodes[n as usize].tier_pages[t] += 1;
        self.tier_pages[t] += 1;
        let parent = self.parent_hash(n, off);
        ctx.emit(IndexEvent::Stored {
            ns: self.ns,
            hash,
            parent,
            tier,
        });
        self.propagate(n, before, ctx.policy);
        Ok(())
    }

    /// Drops one copy of a page. If it was the last copy, the page and every
    /// page after it leave the tree (they are no longer reachable).
    pub(crate) fn drop_location(
        &mut self,
        hash: PageHash,
        tier: Tier,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<EvictedPage>,
    ) -> Result<()> {
        let (n, off) = self.locate(hash).ok_or(IndexError::UnknownPage(hash))?;
        if !self.nodes[n as usize].slots[off].loc.has(tier) {
            return Err(IndexError::NotPresent);
        }
        if self.nodes[n as usize].hard_pins > 0 {
            return Err(IndexError::Pinned);
        }
        self.drop_copy(n, off, tier, ctx, out);
        Ok(())
    }

    fn drop_copy(
        &mut self,
        n: u32,
        off: usize,
        tier: Tier,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<EvictedPage>,
    ) {
        let t = tier.index();
        let node = &self.nodes[n as usize];
        let loc = node.slots[off].loc;
        let mut remaining = loc;
        remaining.set(tier, None);
        if remaining.is_empty() {
            // The last copy: the page leaves, and so does everything below it
            // (no descendant is hard-pinned, or this node would be too).
            debug_assert_eq!(node.hard_pins, 0);
            self.remove_from(n, off, ctx, out);
            return;
        }
        let before = self.presence(n);
        let hash = node.slots[off].hash();
        let mut dropped = PageLocation::EMPTY;
        dropped.set(tier, loc.get(tier));
        self.nodes[n as usize].slots[off].loc = remaining;
        self.nodes[n as usize].tier_pages[t] -= 1;
        self.tier_pages[t] -= 1;
        ctx.emit(IndexEvent::Removed {
            ns: self.ns,
            hash,
            tier,
        });
        out.push(EvictedPage {
            ns: self.ns,
            hash,
            dropped,
            remaining,
        });
        self.propagate(n, before, ctx.policy);
    }

    /// Removes pages `off..` of node `n` and every descendant.
    fn remove_from(&mut self, n: u32, off: usize, ctx: &mut OpCtx<'_>, out: &mut Vec<EvictedPage>) {
        let before = self.presence(n);
        let survivor = if off > 0 {
            n
        } else {
            self.nodes[n as usize].parent
        };
        let children = std::mem::take(&mut self.nodes[n as usize].children);
        let mut stack: Vec<u32> = children.iter().map(|(_, c)| c).collect();
        while let Some(d) = stack.pop() {
            stack.extend(self.nodes[d as usize].children.iter().map(|(_, c)| c));
            self.drop_pages(d, 0, ctx, out);
            self.free_node(d, survivor);
        }
        self.nodes[n as usize].tier_children = [0; TIERS];
        let key = edge_key(&self.nodes[n as usize].tokens[..self.page_size]);
        self.drop_pages(n, off, ctx, out);
        if off == 0 {
            let parent = self.nodes[n as usize].parent;
            let parent_before = self.presence(parent);
            self.nodes[parent as usize].children.remove(key, n);
            for (count, had) in self.nodes[parent as usize]
                .tier_children
                .iter_mut()
                .zip(before)
            {
                *count -= u32::from(had);
            }
            self.free_node(n, survivor);
            self.propagate(parent, parent_before, ctx.policy);
        } else {
            self.propagate(n, before, ctx.policy);
            // Its last page changed: policies may rank it differently.
            self.rekey_in_sets(n, ctx.policy);
        }
    }

    /// Drops pages `off..` of `n` from every tier and from the hash map.
    fn drop_pages(&mut self, n: u32, off: usize, ctx: &mut OpCtx<'_>, out: &mut Vec<EvictedPage>) {
        let ps = self.page_size;
        let node = &mut self.nodes[n as usize];
        let removed = node.pages() - off;
        // The map's entries for evicted pages are rarely in cache (the pages
        // are old): remove them in a loop of their own, short enough for the
        // CPU to overlap the misses of consecutive removals.
        for slot in &node.slots[off..] {
            let short = slot.hash().short();
            if let Some(owner) = self.by_hash.remove(&short) {
                if owner != n {
                    // Another page with the same short hash owns the entry.
                    self.by_hash.insert(short, owner);
                }
            }
        }
        out.reserve(removed);
        for i in off..node.pages() {
            let hash = node.slots[i].hash();
            let loc = node.slots[i].loc;
            for (tier, _) in loc.copies() {
                node.tier_pages[tier.index()] -= 1;
                self.tier_pages[tier.index()] -= 1;
                if let Some(events) = ctx.events.as_deref_mut() {
                    events.push(IndexEvent::Removed {
                        ns: self.ns,
                        hash,
                        tier,
                    });
                }
            }
            out.push(EvictedPage {
                ns: self.ns,
                hash,
                dropped: loc,
                remaining: PageLocation::EMPTY,
            });
        }
        node.tokens.truncate(off * ps);
        node.slots.truncate(off);
        self.pages -= removed as u64;
        if node.pinned() {
            self.pinned_pages -= removed as u64;
        }
        // An emptied node is freed next, and `free_node` keeps its buffers
        // for the next node to take the slot: trimming here would free them
        // first, and the next insert would allocate new, cold ones.
        if off > 0 {
            trim(node);
        }
    }

    /// Frees an emptied node; its soft pins move to `survivor`, which
    /// already counts them.
    fn free_node(&mut self, n: u32, survivor: u32) {
        debug_assert_eq!(self.nodes[n as usize].hard_pins, 0);
        for t in 0..TIERS {
            let key = self.nodes[n as usize].set_key[t];
            if key != NOT_IN_SET {
                self.sets[t].remove(&(key, n));
            }
        }
        // Most freed nodes carry no soft pin: skip hashing into an empty map.
        let pins = if self.soft_targets.is_empty() {
            None
        } else {
            self.soft_targets.remove(&n)
        };
        if let Some(pins) = pins {
            for seq in &pins {
                if let Some(rec) = self.leases.get_mut(seq) {
                    rec.target = survivor;
                }
            }
            if survivor != ROOT {
                self.soft_targets.entry(survivor).or_default().extend(pins);
            }
        }
        let node = &mut self.nodes[n as usize];
        // Keep small buffers (emptied) for the next node to take this slot:
        // the churn of evicting and inserting short prompts then costs no
        // allocation. Large ones go back to the allocator.
        let mut tokens = std::mem::take(&mut node.tokens);
        let mut slots = std::mem::take(&mut node.slots);
        *node = Node::new(ROOT, 0, 0);
        node.alive = false;
        if slots.capacity() <= RECYCLED_PAGES {
            tokens.clear();
            slots.clear();
            node.tokens = tokens;
            node.slots = slots;
        }
        self.free.push(n);
        self.live_nodes -= 1;
    }

    // ---- eviction -------------------------------------------------------------

    /// Evicts up to `pages` copies from `tier`, lowest rank first, stopping
    /// early once the lowest rank exceeds `stop_above`.
    pub(crate) fn evict(
        &mut self,
        tier: Tier,
        pages: usize,
        stop_above: u64,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<EvictedPage>,
    ) -> usize {
        self.evict_skipping(tier, pages, stop_above, None, ctx, out)
    }

    /// [`evict`](Self::evict), never choosing the node `skip`.
    fn evict_skipping(
        &mut self,
        tier: Tier,
        pages: usize,
        stop_above: u64,
        skip: Option<u32>,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<EvictedPage>,
    ) -> usize {
        let t = tier.index();
        let mut done = 0;
        while done < pages {
            let Some((key, n)) = self.min_victim(t, ctx.policy, skip) else {
                break;
            };
            if key > stop_above {
                break;
            }
            let node = &self.nodes[n as usize];
            let len = node.pages();
            // Fast path: the tail pages of a childless node whose only copy
            // is on this tier leave together, unless the policy ranks each
            // page on its own.
            let mut run = 0;
            if node.children.is_empty() && !ctx.policy.ranks_each_page() {
                while run < pages - done && run < len && node.slots[len - 1 - run].loc.only_on(tier)
                {
                    run += 1;
                }
            }
            let info = self.info(n);
            ctx.policy.on_evict_pages(
                &self.nodes[n as usize].stats,
                &info,
                key,
                ctx.tick,
                run.max(1),
            );
            if run > 0 {
                self.remove_from(n, len - run, ctx, out);
                done += run;
                continue;
            }
            let off = self.nodes[n as usize]
                .slots
                .iter()
                .rposition(|s| s.loc.has(tier))
                .expect("a node in a tier's set holds a copy on it");
            let before = out.len();
            self.drop_copy(n, off, tier, ctx, out);
            done += out[before..].iter().filter(|e| e.dropped.has(tier)).count();
            // The node's last page changed: policies may rank it differently.
            if self.nodes[n as usize].alive && self.nodes[n as usize].set_key[t] != NOT_IN_SET {
                self.rekey_tier(n, t, ctx.policy);
            }
        }
        done
    }

    /// [`evict`](Self::evict), never taking a page of the path that leads
    /// to `protect` (held only for this call: no lease is recorded).
    /// `by_pin` forces the general path (tests compare the two).
    pub(crate) fn evict_protecting(
        &mut self,
        protect: PageHash,
        tier: Tier,
        pages: usize,
        by_pin: bool,
        ctx: &mut OpCtx<'_>,
        out: &mut Vec<EvictedPage>,
    ) -> Result<usize> {
        let (n, _) = self
            .locate(protect)
            .ok_or(IndexError::UnknownPage(protect))?;
        if !by_pin && self.nodes[n as usize].tier_pages[tier.index()] > 0 {
            // `n` holds a copy on `tier`. Never chosen, it keeps it, so
            // every node above it keeps a child with a copy there and stays
            // out of the set: skipping `n` protects the whole path. A pin
            // would walk to the root and re-rank `n` out of the set and back
            // in, on every store that evicts.
            return Ok(self.evict_skipping(tier, pages, u64::MAX, Some(n), ctx, out));
        }
        self.apply_pin(n, PinKind::Lease, 1, ctx.policy);
        let done = self.evict(tier, pages, u64::MAX, ctx, out);
        self.apply_pin(n, PinKind::Lease, -1, ctx.policy);
        Ok(done)
    }

    // ---- leases -----------------------------------------------------------------

    /// Pins the longest cached prefix of `tokens`. `admit` sees how many
    /// pages become newly pinned and may refuse (the tenant's cap).
    pub(crate) fn pin(
        &mut self,
        tokens: &[u32],
        kind: PinKind,
        expires_ms: u64,
        policy: &dyn EvictionPolicy,
        admit: impl FnOnce(u64) -> Result<()>,
    ) -> Result<(LeaseId, usize)> {
        let mut matched = 0;
        // Pages matched of the last node, when it was matched only in part.
        let mut partial = None;
        let target = self.walk(tokens, |_, count, full| {
            matched += count;
            if !full {
                partial = Some(count);
            }
        });
        if target == ROOT {
            return Err(IndexError::NotCached);
        }
        self.pin_at(target, partial, matched, kind, expires_ms, policy, admit)
    }

    /// Pins the path from the root to the page named `hash`. With
    /// `whole_node`, to the end of the node holding it instead, without
    /// splitting that node (a few pages past `hash` stay pinned too): for
    /// short holds (a block being copied or read), where splitting per page
    /// would cut prefixes into one-page nodes that no release joins again.
    pub(crate) fn pin_page(
        &mut self,
        hash: PageHash,
        whole_node: bool,
        kind: PinKind,
        expires_ms: u64,
        policy: &dyn EvictionPolicy,
        admit: impl FnOnce(u64) -> Result<()>,
    ) -> Result<(LeaseId, usize)> {
        let (n, off) = self.locate(hash).ok_or(IndexError::UnknownPage(hash))?;
        let node = &self.nodes[n as usize];
        let pages = if whole_node { node.pages() } else { off + 1 };
        let partial = (pages < node.pages()).then_some(pages);
        let matched = node.depth_pages as usize + pages;
        self.pin_at(n, partial, matched, kind, expires_ms, policy, admit)
    }

    /// Pins the path to `target`, or to its first `partial` pages.
    #[allow(clippy::too_many_arguments)]
    fn pin_at(
        &mut self,
        target: u32,
        partial: Option<usize>,
        matched: usize,
        kind: PinKind,
        expires_ms: u64,
        policy: &dyn EvictionPolicy,
        admit: impl FnOnce(u64) -> Result<()>,
    ) -> Result<(LeaseId, usize)> {
        let mut newly = 0u64;
        let mut n = target;
        while n != ROOT {
            let node = &self.nodes[n as usize];
            if !node.pinned() {
                let pages = if n == target {
                    partial.unwrap_or(node.pages())
                } else {
                    node.pages()
                };
                newly += pages as u64;
            }
            n = node.parent;
        }
        admit(newly)?;
        // A lease holds only the matched pages: split off the unmatched tail
        // of a node matched in part, so the lease does not pin it.
        let target = match partial {
            Some(count) => self.split(target, count, policy),
            None => target,
        };
        self.apply_pin(target, kind, 1, policy);
        let seq = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            seq,
            LeaseRecord {
                target,
                kind,
                expires_ms,
                pages: matched,
            },
        );
        self.lease_expiry.insert((expires_ms, seq));
        if matches!(kind, PinKind::Session { .. }) {
            self.soft_targets.entry(target).or_default().push(seq);
        }
        Ok((LeaseId { ns: self.ns, seq }, matched))
    }

    /// Adds (`delta` = 1) or removes (-1) one pin on the path target..root.
    fn apply_pin(&mut self, target: u32, kind: PinKind, delta: i32, policy: &dyn EvictionPolicy) {
        let mut n = target;
        while n != ROOT {
            let was_pinned = self.nodes[n as usize].pinned();
            let node = &mut self.nodes[n as usize];
            let mut recompute = false;
            match kind {
                PinKind::Lease => node.hard_pins = node.hard_pins.wrapping_add_signed(delta),
                PinKind::Session { priority } => {
                    node.soft_pins = node.soft_pins.wrapping_add_signed(delta);
                    if delta > 0 {
                        node.soft_priority = node.soft_priority.max(priority);
                    } else if node.soft_pins == 0 {
                        node.soft_priority = 0;
                    } else {
                        // The released pin may have set the node's
                        // priority: the remaining ones decide it now.
                        recompute = priority >= node.soft_priority;
                    }
                }
            }
            if recompute {
                self.nodes[n as usize].soft_priority = self.held_soft_priority(n);
            }
            let node = &self.nodes[n as usize];
            let pages = node.pages() as u64;
            match (was_pinned, node.pinned()) {
                (false, true) => self.pinned_pages += pages,
                (true, false) => self.pinned_pages -= pages,
                _ => {}
            }
            match kind {
                PinKind::Lease => {
                    for t in 0..TIERS {
                        self.refresh(n, t, policy);
                    }
                }
                PinKind::Session { .. } => self.rekey(n, policy),
            }
            n = self.nodes[n as usize].parent;
        }
    }

    /// The highest priority of the soft leases held on `n` or below it.
    fn held_soft_priority(&self, n: u32) -> u8 {
        let covers = |mut target: u32| {
            while target != ROOT {
                if target == n {
                    return true;
                }
                target = self.nodes[target as usize].parent;
            }
            false
        };
        let mut best = 0;
        for (&target, seqs) in &self.soft_targets {
            if covers(target) {
                for seq in seqs {
                    if let Some(LeaseRecord {
                        kind: PinKind::Session { priority },
                        ..
                    }) = self.leases.get(seq)
                    {
                        best = best.max(*priority);
                    }
                }
            }
        }
        best
    }

    pub(crate) fn lease_state(&self, seq: u64) -> Result<()> {
        let id = LeaseId { ns: self.ns, seq };
        if self.leases.contains_key(&seq) {
            Ok(())
        } else if seq < self.next_lease && seq > 0 {
            Err(IndexError::LeaseGone(id))
        } else {
            Err(IndexError::UnknownLease(id))
        }
    }

    pub(crate) fn renew(&mut self, seq: u64, expires_ms: u64) -> Result<()> {
        self.lease_state(seq)?;
        let rec = self.leases.get_mut(&seq).expect("checked above");
        self.lease_expiry.remove(&(rec.expires_ms, seq));
        rec.expires_ms = expires_ms;
        self.lease_expiry.insert((expires_ms, seq));
        Ok(())
    }

    pub(crate) fn release(&mut self, seq: u64, policy: &dyn EvictionPolicy) -> Result<usize> {
        self.lease_state(seq)?;
        let rec = self.leases.remove(&seq).expect("checked above");
        self.lease_expiry.remove(&(rec.expires_ms, seq));
        if matches!(rec.kind, PinKind::Session { .. }) && rec.target != ROOT {
            if let Some(list) = self.soft_targets.get_mut(&rec.target) {
                list.retain(|s| *s != seq);
                if list.is_empty() {
                    self.soft_targets.remove(&rec.target);
                }
            }
        }
        if rec.target != ROOT {
            self.apply_pin(rec.target, rec.kind, -1, policy);
        }
        Ok(rec.pages)
    }

    /// Releases every lease whose TTL has passed. Returns how many.
    pub(crate) fn reclaim_expired(&mut self, now_ms: u64, policy: &dyn EvictionPolicy) -> usize {
        let mut released = 0;
        while let Some(&(expires, seq)) = self.lease_expiry.first() {
            if expires > now_ms {
                break;
            }
            let _ = self.release(seq, policy);
            released += 1;
        }
        released
    }

    pub(crate) fn next_expiry(&self) -> Option<u64> {
        self.lease_expiry.first().map(|(e, _)| *e)
    }

    pub(crate) fn active_leases(&self) -> usize {
        self.leases.len()
    }

    /// Drops every page. Fails if a hard lease is held.
    pub(crate) fn clear(&mut self, ctx: &mut OpCtx<'_>, out: &mut Vec<EvictedPage>) -> Result<()> {
        if self.leases.values().any(|l| l.kind == PinKind::Lease) {
            return Err(IndexError::Pinned);
        }
        let seqs: Vec<u64> = self.leases.keys().copied().collect();
        for seq in seqs {
            let _ = self.release(seq, ctx.policy);
        }
        let children: Vec<u32> = self.nodes[ROOT as usize]
            .children
            .iter()
            .map(|(_, c)| c)
            .collect();
        for c in children {
            self.remove_from(c, 0, ctx, out);
        }
        ctx.emit(IndexEvent::Cleared { ns: self.ns });
        Ok(())
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let nodes: usize = self.nodes.iter().map(Node::heap_bytes).sum();
        nodes
            + self.nodes.capacity_bytes()
            + self.free.capacity() * 4
            + self.by_hash.capacity() * (std::mem::size_of::<(ShortHash, u32)>() + 1)
            + self.sets.iter().map(|s| s.len() * 24).sum::<usize>()
    }

    // ---- invariants (tests) -------------------------------------------------------

    /// Checks every structural invariant; panics with a description if one
    /// fails. Linear in the tree's size.
    #[cfg(any(test, feature = "test-utils"))]
    pub(crate) fn check_invariants(&self, policy: &dyn EvictionPolicy) {
        let ps = self.page_size;
        let mut seen_nodes = 0u64;
        let mut seen_pages = 0u64;
        let mut tier_pages = [0u64; TIERS];
        let mut pinned = 0u64;
        let mut stack = vec![(ROOT, self.seed)];
        while let Some((n, parent_hash)) = stack.pop() {
            let node = &self.nodes[n as usize];
            assert!(node.alive || n == ROOT, "reachable node {n} is dead");
            if n != ROOT {
                seen_nodes += 1;
                assert!(node.pages() > 0, "empty node {n}");
                assert_eq!(node.tokens.len(), node.pages() * ps);
                let parent = &self.nodes[node.parent as usize];
                assert!(
                    parent.children.iter().any(|(_, c)| c == n),
                    "node {n} not among its parent's children"
                );
                assert_eq!(node.depth_pages, parent.depth_pages + parent.pages() as u32);
                assert!(
                    parent.hard_pins >= node.hard_pins || node.parent == ROOT,
                    "pin path broken at {n}"
                );
                assert_eq!(
                    node.soft_priority,
                    self.held_soft_priority(n),
                    "soft priority of node {n}"
                );
            }
            let mut h = parent_hash;
            for (i, page) in node.tokens.chunks_exact(ps).enumerate() {
                h = h.chain(page);
                assert_eq!(
                    node.slots[i].hash(),
                    h,
                    "page hash chain broken in node {n}"
                );
                assert!(
                    !node.slots[i].loc.is_empty(),
                    "page without a copy in node {n}"
                );
                assert!(
                    self.locate(h).is_some(),
                    "page of node {n} not in the hash map"
                );
            }
            seen_pages += node.pages() as u64;
            if node.pinned() && n != ROOT {
                pinned += node.pages() as u64;
            }
            for (t, total) in tier_pages.iter_mut().enumerate() {
                let own = node
                    .slots
                    .iter()
                    .filter(|s| s.loc.has(Tier::ALL[t]))
                    .count() as u32;
                assert_eq!(node.tier_pages[t], own, "tier_pages of node {n}");
                *total += u64::from(own);
                let kids = node
                    .children
                    .iter()
                    .filter(|&(_, c)| self.nodes[c as usize].has_subtree_copy(t))
                    .count() as u32;
                assert_eq!(node.tier_children[t], kids, "tier_children of node {n}");
                let in_set = node.set_key[t] != NOT_IN_SET;
                assert_eq!(
                    in_set,
                    self.should_be_in_set(n, t),
                    "set membership of node {n} tier {t}"
                );
                if in_set {
                    assert!(self.sets[t].contains(&(node.set_key[t], n)));
                    assert!(
                        node.set_key[t] <= self.full_key(n, policy),
                        "set key above current rank"
                    );
                }
            }
            assert_eq!(node.children.iter().count(), node.children.len());
            for (k, c) in node.children.iter() {
                assert_eq!(self.nodes[c as usize].parent, n);
                assert_eq!(k, edge_key(&self.nodes[c as usize].tokens[..ps]));
                stack.push((c, node.last_hash().unwrap_or(self.seed)));
            }
        }
        assert_eq!(seen_nodes, self.live_nodes, "live node count");
        assert_eq!(seen_pages, self.pages, "page count");
        assert_eq!(tier_pages, self.tier_pages, "tier page counts");
        assert_eq!(pinned, self.pinned_pages, "pinned page count");
        for t in 0..TIERS {
            for &(_, n) in &self.sets[t] {
                assert!(self.nodes[n as usize].alive, "dead node in a set");
            }
        }
        for rec in self.leases.values() {
            if rec.target != ROOT {
                let node = &self.nodes[rec.target as usize];
                assert!(node.alive, "lease on a dead node");
                match rec.kind {
                    PinKind::Lease => assert!(node.hard_pins > 0),
                    PinKind::Session { .. } => assert!(node.soft_pins > 0),
                }
            }
        }
    }
}
