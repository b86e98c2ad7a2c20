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
            return PageHash(xxh3_128_one_token(self.0, *t));
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

/// XXH3-128 (seed 0, default secret) of the 20 bytes `parent ‖ token`
/// (both little-endian): the hash of a one-token page, computed in
/// registers. It is the reference's 17-to-128-byte path with the length
/// fixed at 20 and the seed at 0; the input's words are assembled with
/// shifts instead of being written to a buffer and read back at offsets
/// that straddle the two writes (a stalled store-to-load forward on every
/// link of the chain). A test holds it to `xxh3_128` on random inputs.
#[inline]
fn xxh3_128_one_token(parent: u128, token: u32) -> u128 {
    // XXH64's primes, and the first 32 bytes of XXH3's default secret as
    // little-endian words.
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const SECRET: [u64; 4] = [
        0xbe4b_a423_396c_feb8,
        0x1cad_21f7_2c81_017c,
        0xdb97_9083_e96d_d4de,
        0x1f67_b3b7_a4a4_4072,
    ];
    const LEN: u64 = 20;
    fn mul128_fold64(a: u64, b: u64) -> u64 {
        let p = u128::from(a) * u128::from(b);
        p as u64 ^ (p >> 64) as u64
    }
    fn avalanche(mut h: u64) -> u64 {
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }
    // Bytes 0..16 and bytes 4..20 (the last 16) as two words each.
    let (a0, a1) = (parent as u64, (parent >> 64) as u64);
    let b0 = (parent >> 32) as u64;
    let b1 = (parent >> 96) as u64 | (u64::from(token) << 32);
    let mut lo = LEN.wrapping_mul(PRIME64_1);
    lo = lo.wrapping_add(mul128_fold64(a0 ^ SECRET[0], a1 ^ SECRET[1]));
    lo ^= b0.wrapping_add(b1);
    let mut hi = mul128_fold64(b0 ^ SECRET[2], b1 ^ SECRET[3]);
    hi ^= a0.wrapping_add(a1);
    let low = avalanche(lo.wrapping_add(hi));
    let high = 0u64.wrapping_sub(avalanche(
        lo.wrapping_mul(PRIME64_1)
            .wrapping_add(hi.wrapping_mul(PRIME64_4))
            .wrapping_add(LEN.wrapping_mul(PRIME64_2)),
    ));
    u128::from(low) | (u128::from(high) << 64)
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

    /// The one-token path computed in registers equals XXH3-128 of the
    /// 20 bytes it stands for, on edge values and on random ones.
    #[test]
    fn one_token_chain_is_xxh3_128_of_parent_and_token() {
        let reference = |parent: u128, token: u32| {
            let mut buf = [0u8; 20];
            buf[..16].copy_from_slice(&parent.to_le_bytes());
            buf[16..].copy_from_slice(&token.to_le_bytes());
            xxh3_128(&buf)
        };
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut parents = vec![0, 1, u128::MAX, 1 << 64, (1 << 64) - 1, 1 << 127];
        let mut tokens = vec![0, 1, u32::MAX, 1 << 31];
        for _ in 0..10_000 {
            parents.push(u128::from(next()) | (u128::from(next()) << 64));
            tokens.push(next() as u32);
        }
        for (i, &p) in parents.iter().enumerate() {
            for &t in tokens.iter().skip(i % 7).step_by(997) {
                assert_eq!(xxh3_128_one_token(p, t), reference(p, t), "{p:x} {t}");
                assert_eq!(PageHash(p).chain(&[t]), PageHash(reference(p, t)));
            }
        }
    }

    /// Literal values: page names are on disk and on the wire, so no
    /// rewrite of the hash may change them.
    #[test]
    fn chain_values_are_pinned() {
        let parent = PageHash(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(
            parent.chain(&[42]),
            PageHash(0x5907_5733_5579_3ded_4b2f_beff_0b0c_fe34)
        );
        let page: Vec<u32> = (0..16).map(|t| t * 1000).collect();
        assert_eq!(
            parent.chain(&page),
            PageHash(0x9c51_2531_56d2_023d_09b2_ab26_903f_416e)
        );
    }

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
