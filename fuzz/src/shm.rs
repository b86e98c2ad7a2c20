//! `shm_header`: the host pool's shared-memory file as a local engine maps
//! it (`tiers::host::ShmView::open`). The header parser is private, so the
//! harness writes the input to a file (in `/dev/shm` where it exists) and
//! opens that, with a fixed expected geometry.
//!
//! Input: a mode byte (bit 0: recompute the header checksum; bit 1: expect
//! the geometry the header itself claims, so the fuzzer can explore slot
//! counts, strides and offsets of any geometry), a `u32` of extra file
//! length (the file is the rest of the input, then that many zero bytes,
//! up to 1 MiB, sparse), then the file's bytes. Properties:
//! - `open` never panics;
//! - a view that opens has the expected geometry, and every block it hands
//!   out (by slot or by offset) lies inside the file, is `block_bytes`
//!   long, starts at `data_offset + slot × stride`, and holds the file's
//!   bytes there; offsets that are not a slot's start are refused.

use crate::Input;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use tiers::host::{ShmView, SHM_FORMAT_VERSION, SHM_HEADER_BYTES, SHM_MAGIC};
use tiers::{BlockGeometry, SlotId};
use xxhash_rust::xxh3::xxh3_64;

/// The geometry the harness expects unless the mode says otherwise.
pub const BLOCK_BYTES: usize = 64;
pub const MAX_META_BYTES: usize = 256;
pub const LAYOUT_DIGEST: u64 = 0x5241_4449_584b_5631;

pub const FIX: u8 = 1;
pub const SELF_GEOMETRY: u8 = 2;
const HEADER_CHECKED: usize = 64;
const MAX_EXTRA: u32 = 1 << 20;

fn scratch_path() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    // Unique per call: tests run targets on several threads at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("radixkv-fuzz-shm-{}-{n}", std::process::id()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

pub fn run(data: &[u8]) {
    let mut u = Input::new(data);
    let mode = u.byte();
    let extra = u.u32() % (MAX_EXTRA + 1);
    let mut content = u.rest().to_vec();
    if mode & FIX != 0 && content.len() >= HEADER_CHECKED + 8 {
        let sum = xxh3_64(&content[..HEADER_CHECKED]);
        content[HEADER_CHECKED..HEADER_CHECKED + 8].copy_from_slice(&sum.to_le_bytes());
    }
    let expected = if mode & SELF_GEOMETRY != 0 {
        match BlockGeometry::new(
            u64_at(&content, 16).min(usize::MAX as u64) as usize,
            u64_at(&content, 24).min(usize::MAX as u64) as usize,
            u64_at(&content, 32),
        ) {
            Ok(g) => g,
            Err(_) => return,
        }
    } else {
        BlockGeometry::new(BLOCK_BYTES, MAX_META_BYTES, LAYOUT_DIGEST).unwrap()
    };
    let file_len = content.len() as u64 + u64::from(extra);

    let path = scratch_path();
    {
        let mut f = File::create(&path).expect("scratch file");
        f.write_all(&content).expect("write scratch file");
        f.set_len(file_len).expect("size scratch file");
    }
    let opened = ShmView::open(&path, expected);
    // The mapping outlives the name.
    let _ = std::fs::remove_file(&path);
    let Ok(view) = opened else {
        return;
    };

    // What the file holds at `at..at + len` (zeros past the content).
    let file_bytes = |at: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|i| content.get((at + i) as usize).copied().unwrap_or(0))
            .collect()
    };
    assert!(file_len >= SHM_HEADER_BYTES as u64);
    assert_eq!(view.as_bytes().len() as u64, file_len);
    assert_eq!(view.geometry(), &expected);
    assert_eq!(content[..8], SHM_MAGIC);
    assert_eq!(u64_at(&content, 8) as u32, SHM_FORMAT_VERSION);
    let (count, stride, base) = (view.slot_count(), view.slot_stride(), view.data_offset());
    let block = expected.block_bytes;
    assert!(count > 0);
    assert!(
        stride >= block as u64,
        "slots overlap: stride {stride} < block {block}"
    );
    assert!(
        base >= (HEADER_CHECKED + 8) as u64,
        "slot 0 at {base} overlaps the checked header"
    );
    let end = base + u64::from(count - 1) * stride + block as u64;
    assert!(
        end <= file_len,
        "slots end at {end}, past the file's {file_len} bytes"
    );

    let mut slots = vec![
        0,
        1,
        count / 2,
        count - 1,
        count,
        count.saturating_add(1),
        u32::MAX,
    ];
    slots.push(u.u32());
    for slot in slots {
        let by_slot = view.block(SlotId(slot));
        let offset = view.slot_offset(SlotId(slot));
        if slot >= count {
            assert!(
                by_slot.is_err() && offset.is_err(),
                "slot {slot} of {count} answered"
            );
            continue;
        }
        let (b, off) = (by_slot.unwrap(), offset.unwrap());
        assert_eq!(off, base + u64::from(slot) * stride);
        assert_eq!(b.len(), block);
        // Compare a bounded sample (blocks may be large).
        let n = block.min(256);
        assert_eq!(b[..n], file_bytes(off, n)[..], "slot {slot} bytes");
        assert_eq!(b[block - n..], file_bytes(off + (block - n) as u64, n)[..]);
        assert_eq!(view.block_at(off).unwrap().as_ptr(), b.as_ptr());
    }
    // Offsets near slot starts: only a slot's start is accepted.
    for probe in [
        0,
        base.wrapping_sub(1),
        base + 1,
        base + stride,
        end,
        u64::MAX,
    ] {
        if let Ok(b) = view.block_at(probe) {
            let rel = probe - base;
            assert!(
                rel % stride == 0 && rel / stride < u64::from(count),
                "offset {probe}"
            );
            assert_eq!(b.len(), block);
        }
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    fn header(block: u64, meta: u64, digest: u64, slots: u64, stride: u64, base: u64) -> Vec<u8> {
        let mut h = vec![0u8; SHM_HEADER_BYTES];
        h[..8].copy_from_slice(&SHM_MAGIC);
        h[8..12].copy_from_slice(&SHM_FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(SHM_HEADER_BYTES as u32).to_le_bytes());
        for (i, v) in [block, meta, digest, slots, stride, base]
            .iter()
            .enumerate()
        {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let sum = xxh3_64(&h[..HEADER_CHECKED]);
        h[HEADER_CHECKED..HEADER_CHECKED + 8].copy_from_slice(&sum.to_le_bytes());
        h
    }
    let seed = |mode: u8, extra: u32, mut file: Vec<u8>, data: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(&extra.to_le_bytes());
        file.extend_from_slice(data);
        v.extend_from_slice(&file);
        v
    };
    let b = BLOCK_BYTES as u64;
    let slot_bytes: Vec<u8> = (0..=255u8).cycle().take(4 * BLOCK_BYTES).collect();
    vec![
        // Four 64-byte slots right after the header page, data in the file.
        seed(
            0,
            0,
            header(b, MAX_META_BYTES as u64, LAYOUT_DIGEST, 4, b, 4096),
            &slot_bytes,
        ),
        // The same, slot area sparse (zeros).
        seed(
            0,
            4 * 64,
            header(b, MAX_META_BYTES as u64, LAYOUT_DIGEST, 4, b, 4096),
            &[],
        ),
        // Cache-line stride above the block size, checksum to be fixed.
        seed(
            FIX,
            10 * 128,
            header(b, MAX_META_BYTES as u64, LAYOUT_DIGEST, 10, 128, 4096),
            &[],
        ),
        // A geometry of the file's own: 4 KiB blocks, page stride.
        seed(
            SELF_GEOMETRY,
            3 * 4096,
            header(4096, 1024, 7, 3, 4096, 4096),
            &[],
        ),
        // Truncated: the slot area runs past the file.
        seed(
            0,
            100,
            header(b, MAX_META_BYTES as u64, LAYOUT_DIGEST, 4, b, 4096),
            &[],
        ),
    ]
}
