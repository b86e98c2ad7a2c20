//! What the tiers' benchmarks share: the block sizes the targets
//! name, and the bytes they copy.

/// Block sizes every copy benchmark measures, with their labels.
pub const SIZES: [(usize, &str); 4] = [
    (64 << 10, "64KiB"),
    (256 << 10, "256KiB"),
    (1 << 20, "1MiB"),
    (2 << 20, "2MiB"),
];

/// `len` bytes of a pattern that no block size repeats exactly.
#[allow(dead_code)] // not every benchmark fills its blocks with it
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}
