//! Prompts and block bytes shared by the facade's tests: every page of
//! every prompt has distinct, checkable bytes.

#![allow(dead_code)] // each test file uses its own subset

/// Tokens per page in these tests.
pub const PAGE: usize = 4;
/// Bytes per block in these tests.
pub const BLOCK: usize = 4096;

/// The bytes of page `p` of prompt `id`: distinct for every page.
pub fn block(id: u32, p: usize) -> Vec<u8> {
    let seed = ((id as u64) << 32 | p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..BLOCK)
        .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ i as u8)
        .collect()
}

/// Prompt `id`: `pages` whole pages of tokens no other prompt shares.
pub fn prompt(id: u32, pages: usize) -> Vec<u32> {
    (0..(pages * PAGE) as u32)
        .map(|i| id * 100_000 + i)
        .collect()
}

/// The blocks of pages `pages` of prompt `id`, back to back.
pub fn data(id: u32, pages: std::ops::Range<usize>) -> Vec<u8> {
    pages.flat_map(|p| block(id, p)).collect()
}
