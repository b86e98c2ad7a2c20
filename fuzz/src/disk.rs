//! `disk_headers`: the disk tier's pure parsers of bytes read back from the
//! device (`tiers::disk`): the pool header, slot headers, whole slots and
//! the journal.
//!
//! Input: a mode byte, then the bytes. The low bits pick the parser; bit 7
//! asks the harness to recompute the checksums in the bytes first (so the
//! fuzzer gets past them to the checks behind). Properties:
//! - no parser panics, whatever the bytes;
//! - what parses re-encodes to the same bytes (pool and slot headers,
//!   journal records), or at least to the same fields (journal header,
//!   whose 24 reserved bytes are covered by the checksum but not checked);
//! - `check_slot` accepts only a slot whose checksum and lengths hold;
//! - `parse_journal` stops at the first bad record, and what it returns
//!   re-encodes to exactly the bytes it consumed.

use crate::Input;
use tiers::disk::{
    check_slot, parse_journal, parse_journal_header, parse_pool_header, parse_slot_header,
    slot_checksum, JournalHeader, JournalRecord, PoolHeader, RecordKind, SlotHeader,
    FORMAT_VERSION, JOURNAL_HEADER_LEN, POOL_HEADER_LEN, RECORD_HEAD_LEN, RECORD_TAIL_LEN,
    SLOT_HEADER_LEN,
};
use tiers::{MAX_BLOCK_BYTES, MAX_META_BYTES};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

pub const MODE_POOL: u8 = 0;
pub const MODE_SLOT_HEADER: u8 = 1;
pub const MODE_SLOT: u8 = 2;
pub const MODE_JOURNAL_HEADER: u8 = 3;
pub const MODE_JOURNAL: u8 = 4;
pub const MODE_ALL: u8 = 5;
const MODES: u8 = 6;
/// Mode bit: recompute checksums before parsing.
pub const FIX: u8 = 0x80;

pub fn run(data: &[u8]) {
    let mut u = Input::new(data);
    let mode = u.byte();
    let fix = mode & FIX != 0;
    match (mode & !FIX) % MODES {
        MODE_POOL => pool(u.rest(), fix),
        MODE_SLOT_HEADER => slot_header(u.rest()),
        MODE_SLOT => {
            let data_len = usize::from(u.u16());
            let block = u.bytes(data_len).to_vec();
            slot(u.rest(), &block, fix)
        }
        MODE_JOURNAL_HEADER => journal_header(u.rest(), fix),
        MODE_JOURNAL => journal(u.rest(), fix),
        _ => {
            let b = u.rest();
            let _ = parse_pool_header(b);
            let _ = parse_slot_header(b);
            let _ = parse_journal_header(b);
            let _ = parse_journal(b);
            let half = b.len() / 2;
            let _ = check_slot(&b[..half], &b[half..]);
            let _ = check_slot(&b[half..], &b[..half]);
        }
    }
}

fn set_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn pool(b: &[u8], fix: bool) {
    let mut b = b.to_vec();
    if fix && b.len() >= POOL_HEADER_LEN {
        let sum = xxh3_64(&b[..64]);
        set_u64(&mut b, 64, sum);
    }
    if let Ok(h) = parse_pool_header(&b) {
        assert_eq!(h.version, FORMAT_VERSION);
        assert_eq!(
            h.encode()[..],
            b[..POOL_HEADER_LEN],
            "a parsed pool header re-encodes to other bytes: {h:?}"
        );
    }
    // Encode → parse for a header built from the input's bytes.
    let mut u = Input::new(&b);
    let h = PoolHeader {
        version: FORMAT_VERSION,
        block_bytes: u.u64(),
        max_meta_bytes: u.u64(),
        layout_digest: u.u64(),
        slot_bytes: u.u64(),
        slots_per_file: u.u32(),
        capacity: u.u32(),
        pool_id: u.u64(),
    };
    let enc = h.encode();
    assert_eq!(parse_pool_header(&enc), Ok(h));
    for cut in [0, 8, 16, POOL_HEADER_LEN - 1] {
        assert!(parse_pool_header(&enc[..cut]).is_err());
    }
    // A header of another version does not parse.
    let other = PoolHeader {
        version: FORMAT_VERSION + 1 + (h.capacity % 7),
        ..h
    };
    assert!(parse_pool_header(&other.encode()).is_err());
}

fn slot_header(b: &[u8]) {
    if let Ok(h) = parse_slot_header(b) {
        assert_eq!(
            h.encode()[..],
            b[..SLOT_HEADER_LEN],
            "a parsed slot header re-encodes to other bytes: {h:?}"
        );
        assert!(h.meta_len as usize <= MAX_META_BYTES);
        assert!(h.data_len <= MAX_BLOCK_BYTES as u64);
    }
    let mut u = Input::new(b);
    let h = SlotHeader {
        geometry_digest: u.u64(),
        generation: u.u64(),
        slot: u.u32(),
        meta_len: u.u32() % (MAX_META_BYTES as u32 + 2),
        data_len: u.u64() % (MAX_BLOCK_BYTES as u64 + 2),
        pool_id: u.u64(),
        checksum: u.u64(),
    };
    let in_range = h.meta_len as usize <= MAX_META_BYTES && h.data_len <= MAX_BLOCK_BYTES as u64;
    match parse_slot_header(&h.encode()) {
        Ok(p) => {
            assert!(in_range, "out-of-range lengths parsed: {h:?}");
            assert_eq!(p, h);
        }
        Err(e) => assert!(!in_range, "an encoded slot header failed: {e} {h:?}"),
    }
}

fn slot(trailer: &[u8], data: &[u8], fix: bool) {
    let mut trailer = trailer.to_vec();
    if fix && trailer.len() >= SLOT_HEADER_LEN {
        let meta_len = get_u32(&trailer, 36).unwrap() as usize;
        if let Some(meta) = trailer.get(SLOT_HEADER_LEN..SLOT_HEADER_LEN.saturating_add(meta_len)) {
            let sum = slot_checksum(&trailer[..56], meta, data);
            set_u64(&mut trailer, 56, sum);
        }
    }
    match check_slot(&trailer, data) {
        Ok((h, meta)) => {
            assert_eq!(parse_slot_header(&trailer), Ok(h));
            assert_eq!(h.data_len, data.len() as u64);
            assert_eq!(
                meta,
                &trailer[SLOT_HEADER_LEN..SLOT_HEADER_LEN + h.meta_len as usize]
            );
            assert_eq!(slot_checksum(&trailer[..56], meta, data), h.checksum);
            // One flipped bit anywhere in header, metadata or data fails.
            let at = (h.generation as usize) % (SLOT_HEADER_LEN + meta.len() + data.len());
            let bit = 1u8 << (h.slot % 8);
            let (mut t2, mut d2) = (trailer.clone(), data.to_vec());
            if at < SLOT_HEADER_LEN + meta.len() {
                t2[at] ^= bit;
            } else {
                d2[at - SLOT_HEADER_LEN - meta.len()] ^= bit;
            }
            assert!(
                check_slot(&t2, &d2).is_err(),
                "a slot with a flipped bit at {at} passed its checks"
            );
        }
        Err(_) => {
            if let Ok(h) = parse_slot_header(&trailer) {
                // The header parsed, so the slot failed on lengths or checksum.
                let meta_ok = trailer.len() >= SLOT_HEADER_LEN + h.meta_len as usize;
                let sum_ok = meta_ok
                    && slot_checksum(
                        &trailer[..56],
                        &trailer[SLOT_HEADER_LEN..SLOT_HEADER_LEN + h.meta_len as usize],
                        data,
                    ) == h.checksum;
                assert!(
                    !(meta_ok && sum_ok && h.data_len == data.len() as u64),
                    "check_slot refused a slot whose checks all hold: {h:?}"
                );
            }
        }
    }
}

fn journal_header(b: &[u8], fix: bool) {
    let mut b = b.to_vec();
    if fix && b.len() >= JOURNAL_HEADER_LEN {
        let sum = xxh3_64(&b[..56]);
        set_u64(&mut b, 56, sum);
    }
    if let Ok(h) = parse_journal_header(&b) {
        let enc = h.encode();
        assert_eq!(
            enc[..32],
            b[..32],
            "a parsed journal header re-encodes to other bytes: {h:?}"
        );
        assert_eq!(parse_journal_header(&enc), Ok(h));
    }
    let mut u = Input::new(&b);
    let h = JournalHeader {
        pool_id: u.u64(),
        next_generation: u.u64(),
    };
    let enc = h.encode();
    assert_eq!(parse_journal_header(&enc), Ok(h));
    assert!(parse_journal_header(&enc[..JOURNAL_HEADER_LEN - 1]).is_err());
}

/// `pool_id ^ (index × φ)`: the record checksum seed (module docs of
/// `tiers::disk`).
fn record_seed(pool_id: u64, index: u64) -> u64 {
    pool_id ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Recomputes the header checksum and then each record's, in order, as far
/// as the record lengths lead.
fn fix_journal(b: &mut [u8]) {
    if b.len() < JOURNAL_HEADER_LEN {
        return;
    }
    let sum = xxh3_64(&b[..56]);
    set_u64(b, 56, sum);
    let pool_id = get_u64(b, 16).unwrap();
    let mut at = JOURNAL_HEADER_LEN;
    let mut index = 0u64;
    while let Some(meta_len) = get_u32(b, at + 4) {
        let Some(end) = (at + RECORD_HEAD_LEN).checked_add(meta_len as usize) else {
            return;
        };
        if end + RECORD_TAIL_LEN > b.len() {
            return;
        }
        let sum = xxh3_64_with_seed(&b[at..end], record_seed(pool_id, index));
        set_u64(b, end, sum);
        at = end + RECORD_TAIL_LEN;
        index += 1;
    }
}

fn journal(b: &[u8], fix: bool) {
    let mut b = b.to_vec();
    if fix {
        fix_journal(&mut b);
    }
    let Ok(scan) = parse_journal(&b) else {
        assert!(parse_journal_header(&b).is_err());
        return;
    };
    assert_eq!(parse_journal_header(&b), Ok(scan.header));
    assert!(scan.valid_len >= JOURNAL_HEADER_LEN && scan.valid_len <= b.len());
    // The records re-encode to exactly the bytes they were parsed from.
    let mut enc = Vec::new();
    for (i, r) in scan.records.iter().enumerate() {
        assert!(r.meta.len() <= MAX_META_BYTES);
        if r.kind == RecordKind::Free {
            assert!(r.meta.is_empty(), "a Free record with metadata: {r:?}");
        }
        r.encode_into(&mut enc, scan.header.pool_id, i as u64);
    }
    assert!(
        enc[..] == b[JOURNAL_HEADER_LEN..scan.valid_len],
        "journal records re-encode to other bytes"
    );
    // The valid prefix parses to the same scan; cutting its last record
    // loses that record and nothing else.
    let again = parse_journal(&b[..scan.valid_len]).unwrap();
    assert_eq!(again, scan);
    if let Some(last) = scan.records.last() {
        let cut = parse_journal(&b[..scan.valid_len - 1]).unwrap();
        assert_eq!(cut.records.len(), scan.records.len() - 1);
        assert_eq!(cut.valid_len, scan.valid_len - last.len());
    }
    // A journal of another pool incarnation (other pool id, same records)
    // has no valid record.
    let mut other = b[..scan.valid_len].to_vec();
    let other_id = scan.header.pool_id ^ 1;
    other[..JOURNAL_HEADER_LEN].copy_from_slice(
        &JournalHeader {
            pool_id: other_id,
            ..scan.header
        }
        .encode(),
    );
    let o = parse_journal(&other).unwrap();
    assert!(
        o.records.is_empty(),
        "records of pool {:#x} parsed under pool {other_id:#x}",
        scan.header.pool_id
    );
}

// ---- seeds -------------------------------------------------------------------

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let pool_id = 0x5eed_0000_0000_0001;
    let ph = PoolHeader {
        version: FORMAT_VERSION,
        block_bytes: 4096,
        max_meta_bytes: 512,
        layout_digest: 0xabcd,
        slot_bytes: 8192,
        slots_per_file: 128,
        capacity: 1000,
        pool_id,
    };
    out.push(with_mode(MODE_POOL, &ph.encode()));
    out.push(with_mode(MODE_POOL | FIX, &ph.encode()));

    let meta = b"meta record bytes".to_vec();
    let data: Vec<u8> = (0..64u8).collect();
    let mut sh = SlotHeader {
        geometry_digest: 0x1234,
        generation: 9,
        slot: 3,
        meta_len: meta.len() as u32,
        data_len: data.len() as u64,
        pool_id,
        checksum: 0,
    };
    let head = sh.encode();
    sh.checksum = slot_checksum(&head[..56], &meta, &data);
    out.push(with_mode(MODE_SLOT_HEADER, &sh.encode()));
    let mut s = vec![MODE_SLOT];
    s.extend_from_slice(&(data.len() as u16).to_le_bytes());
    s.extend_from_slice(&data);
    s.extend_from_slice(&sh.encode());
    s.extend_from_slice(&meta);
    out.push(s.clone());
    s[0] |= FIX;
    out.push(s);

    let jh = JournalHeader {
        pool_id,
        next_generation: 42,
    };
    out.push(with_mode(MODE_JOURNAL_HEADER, &jh.encode()));
    let mut j = jh.encode().to_vec();
    let recs = [
        JournalRecord {
            kind: RecordKind::Put,
            slot: 3,
            generation: 9,
            checksum: sh.checksum,
            meta: &meta,
        },
        JournalRecord {
            kind: RecordKind::Put,
            slot: 4,
            generation: 10,
            checksum: 77,
            meta: b"",
        },
        JournalRecord {
            kind: RecordKind::Free,
            slot: 3,
            generation: 9,
            checksum: 0,
            meta: b"",
        },
    ];
    for (i, r) in recs.iter().enumerate() {
        r.encode_into(&mut j, pool_id, i as u64);
    }
    out.push(with_mode(MODE_JOURNAL, &j));
    let mut torn = j.clone();
    torn.truncate(j.len() - 3);
    out.push(with_mode(MODE_JOURNAL, &torn));
    out.push(with_mode(MODE_JOURNAL | FIX, &j));
    out.push(with_mode(MODE_ALL, &j));
    out
}
