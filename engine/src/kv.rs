//! Paged KV: the layout of one page's block, the pages a sequence computed
//! itself, and reading cached blocks in place.
//!
//! # Block layout (version 1)
//!
//! One block holds the KV of one page (`page_size` consecutive positions)
//! for every layer: `layers × 2 × kv_heads × head_dim × page_size` native
//! little-endian `f32` values (737,280 bytes for SmolLM2-135M at 16-token
//! pages), in this order:
//!
//! ```text
//! for layer in 0..layers:
//!     K: for head in 0..kv_heads: [head_dim][page_size]   (dimension-major)
//!     V: for head in 0..kv_heads: [page_size][head_dim]   (token-major)
//! ```
//!
//! K is stored after RoPE and transposed, so that one query's scores
//! against a page are an outer product over dimensions (a page's keys side
//! by side in vector lanes); V stays token-major so that the weighted sum
//! runs along dimensions. Positions of a partial page past its last token
//! are zero. [`KvLayout::digest`] names the layout with the model geometry
//! and the dtype; the cache keeps blocks of different digests apart.
//!
//! # In place
//!
//! A cached page is read where the host tier keeps it: [`as_f32`] views a
//! borrowed block's bytes as `f32` without copying when they are 4-byte
//! aligned, which host slots always are (the pool's memory is page-aligned
//! and so is its slot stride for blocks of 4 KiB or more). Only a misaligned
//! block (never seen from the host tier) is copied.

use crate::gguf::ModelConfig;
use std::borrow::Cow;

#[cfg(target_endian = "big")]
compile_error!("KV blocks are little-endian f32: big-endian targets are not supported");

/// The shape of a KV block; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
}

impl KvLayout {
    pub fn new(config: &ModelConfig, page_size: usize) -> Self {
        Self {
            layers: config.layers,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            page_size,
        }
    }

    /// `f32` values in one head's K (or V) of one layer of a page.
    pub fn head_floats(&self) -> usize {
        self.head_dim * self.page_size
    }

    /// `f32` values in one block.
    pub fn page_floats(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_floats()
    }

    pub fn block_bytes(&self) -> usize {
        self.page_floats() * 4
    }

    /// Where K of `(layer, head)` starts in a block, in `f32`s.
    pub fn k_offset(&self, layer: usize, head: usize) -> usize {
        (layer * 2 * self.kv_heads + head) * self.head_floats()
    }

    /// Where V of `(layer, head)` starts in a block, in `f32`s.
    pub fn v_offset(&self, layer: usize, head: usize) -> usize {
        ((layer * 2 + 1) * self.kv_heads + head) * self.head_floats()
    }

    /// The layout's name, given to the cache so that blocks of another
    /// layout, geometry or dtype are never mixed in.
    pub fn digest(&self) -> String {
        format!(
            "radixkv-kv/1 llama f32le layers={} kv_heads={} head_dim={} page={} \
             k=post-rope[dim][token] v=[token][dim]",
            self.layers, self.kv_heads, self.head_dim, self.page_size
        )
    }
}

/// The pages a sequence computed itself, from page `first_page` on (the
/// ones before came from the cache), one block's worth of `f32`s each.
#[derive(Debug)]
pub(crate) struct PrivatePages {
    first_page: usize,
    page_floats: usize,
    data: Vec<f32>,
}

impl PrivatePages {
    pub fn new(first_page: usize, layout: &KvLayout) -> Self {
        Self {
            first_page,
            page_floats: layout.page_floats(),
            data: Vec::new(),
        }
    }

    pub fn first_page(&self) -> usize {
        self.first_page
    }

    /// Pages held.
    pub fn held(&self) -> usize {
        self.data.len() / self.page_floats
    }

    /// Makes room for pages up to `page` (zeroed).
    pub fn ensure(&mut self, page: usize) {
        assert!(page >= self.first_page, "page {page} is a cached page");
        let len = (page + 1 - self.first_page) * self.page_floats;
        if self.data.len() < len {
            self.data.resize(len, 0.0);
        }
    }

    pub fn page(&self, page: usize) -> &[f32] {
        &self.data[(page - self.first_page) * self.page_floats..][..self.page_floats]
    }

    pub fn page_mut(&mut self, page: usize) -> &mut [f32] {
        &mut self.data[(page - self.first_page) * self.page_floats..][..self.page_floats]
    }

    /// The blocks of pages `pages` (all held), as bytes: what the cache stores.
    pub fn bytes(&self, pages: std::ops::Range<usize>) -> &[u8] {
        let floats = &self.data[(pages.start - self.first_page) * self.page_floats
            ..(pages.end - self.first_page) * self.page_floats];
        f32_bytes(floats)
    }
}

/// `f32`s as their native bytes.
fn f32_bytes(floats: &[f32]) -> &[u8] {
    // SAFETY: `u8` has alignment 1 and every byte of an `f32` is
    // initialized, so the `4 × len` bytes at the same address are a valid
    // `[u8]` for the same lifetime (shared, like `floats`).
    unsafe {
        std::slice::from_raw_parts(floats.as_ptr().cast::<u8>(), std::mem::size_of_val(floats))
    }
}

/// A block's bytes as `f32`s: in place when 4-byte aligned (host slots
/// always are), copied otherwise.
pub(crate) fn as_f32(bytes: &[u8]) -> Cow<'_, [f32]> {
    // SAFETY: every bit pattern is a valid `f32`; `align_to` only puts into
    // the middle slice what is correctly aligned for `f32`.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    if head.is_empty() && tail.is_empty() {
        Cow::Borrowed(mid)
    } else {
        Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> KvLayout {
        KvLayout {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            page_size: 16,
        }
    }

    #[test]
    fn smollm2_blocks_are_737280_bytes_and_sections_tile_the_block() {
        let l = smollm2();
        assert_eq!(l.block_bytes(), 737_280);
        let mut starts: Vec<usize> = (0..l.layers)
            .flat_map(|layer| {
                (0..l.kv_heads).flat_map(move |h| [l.k_offset(layer, h), l.v_offset(layer, h)])
            })
            .collect();
        starts.sort_unstable();
        let expected: Vec<usize> = (0..2 * l.layers * l.kv_heads)
            .map(|i| i * l.head_floats())
            .collect();
        assert_eq!(starts, expected);
    }

    #[test]
    fn private_pages_round_trip_as_bytes_in_place() {
        let l = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            page_size: 2,
        };
        let mut p = PrivatePages::new(3, &l);
        p.ensure(4);
        p.page_mut(4)[1] = 1.5;
        let bytes = p.bytes(4..5);
        assert_eq!(bytes.len(), l.block_bytes());
        let back = as_f32(bytes);
        assert!(matches!(back, Cow::Borrowed(_)));
        assert_eq!(back[1], 1.5);
        // Misaligned bytes are copied, not misread.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(as_f32(&shifted[1..])[1], 1.5);
    }
}
