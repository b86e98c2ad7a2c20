//! Chained page hashes: a page is named by XXH3-128 over its parent's digest
//! and its own tokens, so a block can be named without its tokens.
//!
//! The algorithm, for clients that compute the same names:
//! - namespace seed = XXH3-128 (seed 0) of the namespace key bytes
//!   (see [`crate::NamespaceKey::to_bytes`]);
//! - page hash = XXH3-128 (seed 0) of `parent (16 bytes, little-endian u128)`
//!   followed by the page's tokens (each a little-endian `u32`), where the
//!   parent of the first page is the namespace seed.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// A 128-bit page name, stable across runs and platforms.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageHash(pub u128);

impl std::fmt::Debug for PageHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageHash({:032x})", self.0)
    }
}

impl std::fmt::Display for PageHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl PageHash {
    pub fn to_le_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    pub fn from_le_bytes(bytes: [u8; 16]) -> Self {
        PageHash(u128::from_le_bytes(bytes))
    }

    /// The hash of the page `tokens` whose parent page (or namespace seed) is `self`.
    pub fn chain(self, tokens: &[u32]) -> PageHash {
        // Hash from a stack buffer sized for the common page sizes, so the
        // hot path neither allocates nor clears a large buffer.
        if let [t] = tokens {
            // One-token pages (block-id traces): 20 bytes, no buffer to clear.
            let mut buf = [0u8; 20];
            buf[..16].copy_from_slice(&self.to_le_bytes());
            buf[16..].copy_from_slice(&t.to_le_bytes());
            return PageHash(xxh3_128(&buf));
        }
        const SMALL: usize = 16;
        if tokens.len() <= SMALL {
            let mut buf = [0u8; 16 + 4 * SMALL];
            return PageHash(xxh3_128(fill(&mut buf, self, tokens)));
        }
        let mut buf = [0u8; 16 + 4 * crate::MAX_PAGE_SIZE];
        debug_assert!(tokens.len() <= crate::MAX_PAGE_SIZE);
        PageHash(xxh3_128(fill(&mut buf, self, tokens)))
    }

    /// The low 64 bits, as a hash-map key.
    pub(crate) fn short(self) -> ShortHash {
        ShortHash([self.0 as u32, (self.0 >> 32) as u32])
    }
}

/// The low 64 bits of a page hash, stored as two `u32`s so that a map entry
/// with a `u32` value packs into 12 bytes instead of 16.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct ShortHash([u32; 2]);

impl std::hash::Hash for ShortHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.0[0]) | (u64::from(self.0[1]) << 32));
    }
}

/// Writes `parent ‖ tokens` (little-endian) into `buf`; returns the used part.
fn fill<'a>(buf: &'a mut [u8], parent: PageHash, tokens: &[u32]) -> &'a [u8] {
    buf[..16].copy_from_slice(&parent.to_le_bytes());
    for (chunk, t) in buf[16..].chunks_exact_mut(4).zip(tokens) {
        chunk.copy_from_slice(&t.to_le_bytes());
    }
    &buf[..16 + 4 * tokens.len()]
}

/// Hashes a namespace key into its seed.
pub(crate) fn namespace_seed(key_bytes: &[u8]) -> PageHash {
    PageHash(xxh3_128(key_bytes))
}

/// Key of a child edge: its first page. For one-token pages the token itself.
#[inline]
pub(crate) fn edge_key(first_page: &[u32]) -> u64 {
    if let [t] = first_page {
        return u64::from(*t);
    }
    const SMALL: usize = 16;
    if first_page.len() <= SMALL {
        let mut buf = [0u8; 4 * SMALL];
        return xxh3_64(le_bytes(&mut buf, first_page));
    }
    let mut buf = [0u8; 4 * crate::MAX_PAGE_SIZE];
    xxh3_64(le_bytes(&mut buf, first_page))
}

fn le_bytes<'a>(buf: &'a mut [u8], tokens: &[u32]) -> &'a [u8] {
    for (chunk, t) in buf.chunks_exact_mut(4).zip(tokens) {
        chunk.copy_from_slice(&t.to_le_bytes());
    }
    &buf[..4 * tokens.len()]
}

/// A hasher for maps keyed by values that are already uniformly random.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub(crate) type PassThroughBuild = std::hash::BuildHasherDefault<PassThroughHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_is_stable_and_order_sensitive() {
        let seed = namespace_seed(b"ns");
        let a = seed.chain(&[1, 2, 3]);
        assert_eq!(a, seed.chain(&[1, 2, 3]));
        assert_ne!(a, seed.chain(&[3, 2, 1]));
        assert_ne!(a, namespace_seed(b"other").chain(&[1, 2, 3]));
        // Pinned value: the hash is part of the on-disk and wire format.
        assert_eq!(
            PageHash(0).chain(&[1]),
            PageHash(xxh3_128(
                &[0u8; 16]
                    .iter()
                    .chain(&1u32.to_le_bytes())
                    .copied()
                    .collect::<Vec<_>>()
            ))
        );
    }
}
