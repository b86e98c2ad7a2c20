//! The disk tier through its public API: round trips, corruption, restart
//! and recovery, geometry changes, injected I/O faults, capacity.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tiers::disk::{
    parse_pool_header, DiskPool, DiskPoolConfig, OpenOutcome, RecoveredBlock, SLOT_HEADER_LEN,
};
use tiers::io::{AlignedBuf, Fault, FaultyIo, FileIo, IoOp, RealIo};
use tiers::{BlockGeometry, BlockPool, BlockWrite, Medium, SlotId, TierError};

/// Deterministic bytes from a seed (xorshift).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn geometry(block: usize) -> BlockGeometry {
    BlockGeometry::new(block, 256, 0xABCD).unwrap()
}

fn config(dir: &Path, g: BlockGeometry, slots: u64) -> tiers::disk::DiskPoolConfigBuilder {
    let probe = DiskPoolConfig::builder(dir, g)
        .capacity_bytes(1 << 40)
        .build()
        .unwrap();
    DiskPoolConfig::builder(dir, g).capacity_bytes(slots * probe.slot_bytes())
}

fn open(dir: &Path, g: BlockGeometry, slots: u64) -> (DiskPool, Vec<RecoveredBlock>) {
    DiskPool::open(config(dir, g, slots).build().unwrap()).unwrap()
}

fn open_with(
    dir: &Path,
    g: BlockGeometry,
    slots: u64,
    io: Arc<dyn FileIo>,
) -> (DiskPool, Vec<RecoveredBlock>) {
    DiskPool::open(config(dir, g, slots).io(io).build().unwrap()).unwrap()
}

fn store(pool: &DiskPool, seed: u64) -> SlotId {
    let g = *pool.geometry();
    let slot = pool.allocate().unwrap();
    pool.write(slot, &bytes(seed, g.block_bytes), &seed.to_le_bytes())
        .unwrap();
    slot
}

fn read_vec(pool: &DiskPool, slot: SlotId) -> Result<Vec<u8>, TierError> {
    let mut out = vec![0u8; pool.geometry().block_bytes];
    pool.read(slot, &mut out).map(|()| out)
}

fn slot_file(dir: &Path, file: usize) -> PathBuf {
    dir.join(format!("slots-{file:04}.dat"))
}

/// XORs `mask` into the byte at `offset` of a slot file.
fn flip(path: &Path, offset: u64, mask: u8) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn round_trip_of_several_sizes_aligned_or_not() {
    for io in [RealIo::new(), RealIo::buffered()] {
        for block in [4096, 5000, 64 << 10, (1 << 20) + 123] {
            let dir = tempfile::tempdir().unwrap();
            let g = geometry(block);
            let (pool, rec) = open_with(dir.path(), g, 6, io.shared());
            assert!(rec.is_empty());
            assert_eq!(pool.medium(), Medium::Disk);
            assert_eq!(pool.capacity(), 6);
            assert_eq!(pool.slot_bytes() % 4096, 0);
            assert!(pool.slot_bytes() as usize >= block + SLOT_HEADER_LEN + 256);
            let mut slots = Vec::new();
            for seed in 0..4u64 {
                let slot = pool.allocate().unwrap();
                let data = bytes(seed, block);
                let meta = bytes(seed + 100, seed as usize * 80);
                if seed % 2 == 0 {
                    // A 4096-aligned buffer: the in-place path where allowed.
                    let mut a = AlignedBuf::zeroed(block);
                    a.copy_from_slice(&data);
                    pool.write(slot, &a, &meta).unwrap();
                } else {
                    pool.write(slot, &data, &meta).unwrap();
                }
                slots.push((slot, data));
            }
            assert_eq!(pool.used(), 4);
            for (i, (slot, data)) in slots.iter().enumerate() {
                if i % 2 == 0 {
                    let mut a = AlignedBuf::zeroed(block);
                    pool.read(*slot, &mut a).unwrap();
                    assert_eq!(&a[..], &data[..], "block {block}, slot {slot:?}");
                } else {
                    assert_eq!(&read_vec(&pool, *slot).unwrap(), data);
                }
            }
            assert_eq!(pool.corrupt_blocks(), 0);
            assert_eq!(pool.io_errors(), 0);
            let st = pool.stats();
            assert_eq!((st.writes, st.reads), (4, 4));
        }
    }
}

#[test]
fn direct_io_where_the_file_system_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = open(dir.path(), geometry(8192), 2);
    let fs_direct = probe_direct(dir.path());
    assert_eq!(pool.is_direct(), fs_direct);
    println!("temp dir O_DIRECT: {fs_direct}");
    drop(pool);
    let (pool, _) = open_with(dir.path(), geometry(8192), 2, RealIo::buffered().shared());
    assert!(!pool.is_direct());

    // Older tmpfs refuses O_DIRECT: the pool falls back to buffered I/O.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && !probe_direct(shm) {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let (pool, _) = open(dir.path(), geometry(5000), 2);
        assert!(!pool.is_direct());
        let s = store(&pool, 9);
        assert_eq!(read_vec(&pool, s).unwrap(), bytes(9, 5000));
    } else {
        // Kernels from 6.6 on give tmpfs O_DIRECT; io.rs unit-tests the
        // fallback itself.
        println!("skipped the tmpfs fallback check: /dev/shm accepts O_DIRECT here");
    }
}

/// Whether a file in `dir` can be opened with `O_DIRECT`.
fn probe_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("probe");
    let r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(p);
    r
}

#[test]
fn bad_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = open(dir.path(), geometry(4096), 2);
    let s = pool.allocate().unwrap();
    assert!(matches!(
        pool.write(s, &[0; 100], b""),
        Err(TierError::WrongLength {
            got: 100,
            expected: 4096
        })
    ));
    assert!(matches!(
        pool.write(s, &[0; 4096], &[0; 257]),
        Err(TierError::MetaTooLarge {
            got: 257,
            limit: 256
        })
    ));
    assert!(matches!(
        pool.read(s, &mut [0; 4096]),
        Err(TierError::Empty(_))
    ));
    assert!(matches!(
        pool.read(SlotId(2), &mut [0; 4096]),
        Err(TierError::NoSuchSlot { capacity: 2, .. })
    ));
    // A slot is written once per allocation, and never while free.
    pool.write(s, &[1; 4096], b"m").unwrap();
    assert!(matches!(
        pool.write(s, &[2; 4096], b"m"),
        Err(TierError::Empty(_))
    ));
    assert!(matches!(
        pool.write(SlotId(1), &[2; 4096], b""),
        Err(TierError::Empty(_))
    ));
    let _ = pool.allocate().unwrap();
    assert!(matches!(pool.allocate(), Err(TierError::Full)));
    assert!(matches!(
        DiskPoolConfig::builder(dir.path(), geometry(4096))
            .capacity_bytes(4096)
            .build(),
        Err(TierError::InvalidConfig(_))
    ));
    assert!(matches!(
        DiskPoolConfig::builder(dir.path(), geometry(4096))
            .capacity_bytes(1 << 20)
            .max_file_bytes(4096)
            .build(),
        Err(TierError::InvalidConfig(_))
    ));
}

#[test]
fn flipped_or_damaged_bytes_are_corrupt_never_data() {
    let block = 5000; // not a multiple of 4096
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = open(dir.path(), geometry(block), 8);
    let sb = pool.slot_bytes();
    let file = slot_file(dir.path(), 0);
    let meta_len = 8u64; // `store` writes 8 bytes of metadata
    let b = block as u64;
    // (what, offset inside the slot, mask)
    let damage = [
        ("data, first byte", 0, 0x01),
        ("data, last byte", b - 1, 0x80),
        ("header, magic", b, 0xFF),
        ("header, generation", b + 24, 0x01),
        ("header, checksum", b + 60, 0x10),
        ("meta", b + SLOT_HEADER_LEN as u64 + meta_len - 1, 0x04),
    ];
    for (i, (what, off, mask)) in damage.iter().enumerate() {
        let slot = store(&pool, i as u64);
        assert_eq!(read_vec(&pool, slot).unwrap(), bytes(i as u64, block));
        flip(&file, slot.0 as u64 * sb + off, *mask);
        let before = pool.corrupt_blocks();
        let mut out = vec![0xEEu8; block];
        match pool.read(slot, &mut out) {
            Err(TierError::Corrupt(s)) => assert_eq!(s, slot),
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        assert!(out.iter().all(|&x| x == 0), "{what}: output not cleared");
        assert_eq!(pool.corrupt_blocks(), before + 1, "{what}");
        // Also through an aligned buffer.
        let mut a = AlignedBuf::zeroed(block);
        assert!(matches!(
            pool.read(slot, &mut a),
            Err(TierError::Corrupt(_))
        ));
    }
    // Undamaged neighbours still read.
    let fine = store(&pool, 77);
    assert_eq!(read_vec(&pool, fine).unwrap(), bytes(77, block));
}

#[test]
fn a_block_moved_to_another_slot_is_corrupt() {
    // A misdirected write (right bytes, wrong place) must not pass.
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = open(dir.path(), geometry(4096), 4);
    let sb = pool.slot_bytes();
    let a = store(&pool, 1);
    let b = store(&pool, 2);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(slot_file(dir.path(), 0))
        .unwrap();
    let mut img = vec![0u8; sb as usize];
    f.read_exact_at(&mut img, a.0 as u64 * sb).unwrap();
    f.write_all_at(&img, b.0 as u64 * sb).unwrap();
    assert!(matches!(read_vec(&pool, b), Err(TierError::Corrupt(_))));
    assert_eq!(read_vec(&pool, a).unwrap(), bytes(1, 4096));
}

#[test]
fn restart_returns_every_live_block_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(3 * 4096 + 100);
    let mut live = std::collections::BTreeMap::new();
    {
        let (pool, rec) = open(dir.path(), g, 40);
        assert!(rec.is_empty());
        assert_eq!(pool.open_report().outcome, OpenOutcome::Created);
        for seed in 0..30u64 {
            let slot = store(&pool, seed);
            live.insert(slot, seed);
        }
        // Free every third: those must not come back.
        for seed in (0..30u64).step_by(3) {
            let slot = *live.iter().find(|(_, &s)| s == seed).unwrap().0;
            pool.free(slot);
            live.remove(&slot);
        }
        // A reserved slot that was never written does not come back either.
        let _reserved = pool.allocate().unwrap();
    }
    for round in 0..2 {
        let (pool, rec) = open(dir.path(), g, 40);
        assert_eq!(pool.open_report().outcome, OpenOutcome::Recovered);
        assert_eq!(rec.len(), live.len(), "round {round}");
        assert_eq!(pool.used() as usize, live.len());
        for r in &rec {
            let seed = live[&r.slot];
            assert_eq!(r.meta, seed.to_le_bytes());
            assert_eq!(read_vec(&pool, r.slot).unwrap(), bytes(seed, g.block_bytes));
        }
        // Recovered slots are allocated: new blocks go elsewhere.
        let fresh = store(&pool, 1000 + round);
        assert!(!live.contains_key(&fresh));
        live.insert(fresh, 1000 + round);
        pool.close().unwrap();
    }
}

#[test]
fn geometry_or_version_change_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(8192);
    let fill = |g: BlockGeometry| {
        let (pool, _) = open(dir.path(), g, 8);
        store(&pool, 1);
        store(&pool, 2);
    };
    fill(g);
    // Another block size.
    let (pool, rec) = open(dir.path(), geometry(4096), 8);
    assert!(rec.is_empty());
    assert!(matches!(
        pool.open_report().outcome,
        OpenOutcome::Discarded(_)
    ));
    assert_eq!(pool.used(), 0);
    drop(pool);
    // Another layout digest.
    fill(g);
    let g2 = BlockGeometry::new(8192, 256, 0xABCE).unwrap();
    let (pool, rec) = open(dir.path(), g2, 8);
    assert!(rec.is_empty());
    assert!(matches!(
        pool.open_report().outcome,
        OpenOutcome::Discarded(_)
    ));
    drop(pool);
    // Another metadata limit.
    fill(g);
    let (_, rec) = open(
        dir.path(),
        BlockGeometry::new(8192, 100, 0xABCD).unwrap(),
        8,
    );
    assert!(rec.is_empty());
    // Another capacity (slot layout).
    fill(g);
    let (_, rec) = open(dir.path(), g, 9);
    assert!(rec.is_empty());
    // Another format version: rewrite the pool header as a future build
    // would have written it.
    fill(g);
    let hdr_path = dir.path().join("pool.hdr");
    let mut h = parse_pool_header(&std::fs::read(&hdr_path).unwrap()).unwrap();
    h.version = 2;
    std::fs::write(&hdr_path, h.encode()).unwrap();
    let (pool, rec) = open(dir.path(), g, 8);
    assert!(rec.is_empty());
    match &pool.open_report().outcome {
        OpenOutcome::Discarded(why) => assert!(why.contains("version"), "{why}"),
        o => panic!("{o:?}"),
    }
    drop(pool);
    // A damaged pool header.
    fill(g);
    std::fs::write(&hdr_path, b"garbage").unwrap();
    let (_, rec) = open(dir.path(), g, 8);
    assert!(rec.is_empty());
    // And the same geometry again keeps its blocks.
    fill(g);
    let (_, rec) = open(dir.path(), g, 8);
    assert_eq!(rec.len(), 2);
}

#[test]
fn a_lost_or_foreign_journal_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(4096);
    {
        let (pool, _) = open(dir.path(), g, 4);
        store(&pool, 1);
    }
    std::fs::remove_file(dir.path().join("journal.log")).unwrap();
    let (pool, rec) = open(dir.path(), g, 4);
    assert!(rec.is_empty());
    assert!(matches!(
        pool.open_report().outcome,
        OpenOutcome::Discarded(_)
    ));
    store(&pool, 2);
    drop(pool);
    // A torn journal tail is cut off, the rest kept.
    let j = dir.path().join("journal.log");
    let mut bytes = std::fs::read(&j).unwrap();
    bytes.extend_from_slice(&[1, 0, 0, 0, 9, 9]);
    std::fs::write(&j, &bytes).unwrap();
    let (pool, rec) = open(dir.path(), g, 4);
    assert_eq!(rec.len(), 1);
    assert_eq!(pool.open_report().journal_tail_dropped, 6);
}

#[test]
fn only_one_pool_per_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_pool, _) = open(dir.path(), geometry(4096), 4);
    let second = DiskPool::open(config(dir.path(), geometry(4096), 4).build().unwrap());
    match second {
        Err(TierError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("{other:?}"),
    }
}

#[test]
fn write_faults_fail_the_write_and_the_pool_keeps_serving() {
    for inner in [RealIo::new(), RealIo::buffered()] {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry(16 << 10);
        let faulty = FaultyIo::new(inner.shared());
        let (pool, _) = open_with(dir.path(), g, 8, faulty.shared());
        let good = store(&pool, 1);

        // A block that lived in slot X, freed; X is handed out again and
        // the new write into it fails in each of these ways.
        let faults = [
            Fault::NoSpace,
            Fault::Errno(5),
            Fault::Torn(4096),
            Fault::Torn(8192 + 4096),
            Fault::Short(4096), // then ENOSPC on the rest, below
        ];
        for (i, fault) in faults.into_iter().enumerate() {
            let old = store(&pool, 100 + i as u64);
            pool.free(old);
            let slot = pool.allocate().unwrap();
            assert_eq!(slot, old, "free slots are reused last-in first-out");
            if let Fault::Short(_) = fault {
                let mut n = 0;
                faulty.set_plan(move |c| {
                    if c.op == IoOp::Write && c.file_ends_with(".dat") {
                        n += 1;
                        if n == 1 {
                            return Fault::Short(4096);
                        }
                        return Fault::NoSpace;
                    }
                    Fault::None
                });
            } else {
                faulty.fail_writes(".dat", 1, fault);
            }
            let errs = pool.io_errors();
            let r = pool.write(slot, &bytes(200 + i as u64, g.block_bytes), b"x");
            faulty.clear_plan();
            assert!(matches!(r, Err(TierError::Io(_))), "{fault:?}: {r:?}");
            assert_eq!(pool.io_errors(), errs + 1);
            // Never garbage: the slot holds nothing readable.
            assert!(matches!(read_vec(&pool, slot), Err(TierError::Empty(_))));
            // Other slots still serve, new writes still work.
            assert_eq!(read_vec(&pool, good).unwrap(), bytes(1, g.block_bytes));
            let s2 = store(&pool, 300 + i as u64);
            assert_eq!(
                read_vec(&pool, s2).unwrap(),
                bytes(300 + i as u64, g.block_bytes)
            );
            pool.free(s2);
            // The caller may retry the failed slot (or free it).
            if i % 2 == 0 {
                pool.write(slot, &bytes(400, g.block_bytes), b"retry")
                    .unwrap();
                assert_eq!(read_vec(&pool, slot).unwrap(), bytes(400, g.block_bytes));
            }
            pool.free(slot);
        }
        // A short write that the loop finishes is a success.
        faulty.fail_writes(".dat", 1, Fault::Short(4096));
        let s = store(&pool, 500);
        assert!(faulty.injected() > 0);
        assert_eq!(read_vec(&pool, s).unwrap(), bytes(500, g.block_bytes));
        drop(pool);

        // After a restart: the good blocks, nothing torn, nothing freed.
        let (pool, rec) = open(dir.path(), g, 8);
        let mut slots: Vec<SlotId> = rec.iter().map(|r| r.slot).collect();
        slots.sort();
        let mut want = vec![good, s];
        want.sort();
        assert_eq!(slots, want);
        for r in rec {
            let seed = u64::from_le_bytes(r.meta.try_into().unwrap());
            assert_eq!(read_vec(&pool, r.slot).unwrap(), bytes(seed, g.block_bytes));
        }
    }
}

#[test]
fn journal_faults_fail_the_write_and_never_list_a_block() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(4096);
    let faulty = FaultyIo::new(RealIo::new().shared());
    let (pool, _) = open_with(dir.path(), g, 8, faulty.shared());
    let a = store(&pool, 1);
    // The slot write goes through, the journal append tears.
    faulty.fail_writes("journal.log", 1, Fault::Torn(20));
    let b = pool.allocate().unwrap();
    assert!(matches!(
        pool.write(b, &bytes(2, 4096), b"b"),
        Err(TierError::Io(_))
    ));
    assert!(matches!(read_vec(&pool, b), Err(TierError::Empty(_))));
    let c = store(&pool, 3);
    // A free whose record cannot be written still frees the slot.
    faulty.fail_writes("journal.log", 1, Fault::NoSpace);
    pool.free(a);
    assert!(pool.io_errors() >= 2);
    drop(pool);
    let (pool, rec) = open(dir.path(), g, 8);
    assert_eq!(pool.open_report().journal_tail_dropped, 0);
    let mut got: Vec<SlotId> = rec.iter().map(|r| r.slot).collect();
    got.sort();
    // `a`'s free was lost, so `a` comes back (intact, harmless); `b` never.
    assert_eq!(got, vec![a, c]);
    assert_eq!(read_vec(&pool, a).unwrap(), bytes(1, 4096));
    assert_eq!(read_vec(&pool, c).unwrap(), bytes(3, 4096));
}

#[test]
fn read_faults_are_errors_never_data() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(64 << 10);
    let faulty = FaultyIo::new(RealIo::new().shared());
    let (pool, _) = open_with(dir.path(), g, 4, faulty.shared());
    let s = store(&pool, 7);
    let mut out = vec![1u8; g.block_bytes];
    faulty.set_plan(|c| {
        if c.op == IoOp::Read {
            Fault::Errno(5)
        } else {
            Fault::None
        }
    });
    assert!(matches!(pool.read(s, &mut out), Err(TierError::Io(_))));
    assert!(out.iter().all(|&x| x == 0));
    // A bit flipped on the way from the device.
    for at in [
        0,
        4000,
        g.block_bytes + 3,
        g.block_bytes + SLOT_HEADER_LEN + 2,
    ] {
        faulty.set_plan(move |c| {
            if c.op == IoOp::Read {
                Fault::FlipBit(at)
            } else {
                Fault::None
            }
        });
        assert!(
            matches!(pool.read(s, &mut out), Err(TierError::Corrupt(_))),
            "{at}"
        );
        let mut a = AlignedBuf::zeroed(g.block_bytes);
        assert!(
            matches!(pool.read(s, &mut a), Err(TierError::Corrupt(_))),
            "{at}"
        );
    }
    // Short reads are finished by the loop.
    faulty.set_plan(|c| {
        if c.op == IoOp::Read {
            Fault::Short(4096)
        } else {
            Fault::None
        }
    });
    assert_eq!(read_vec(&pool, s).unwrap(), bytes(7, g.block_bytes));
    faulty.clear_plan();
    assert_eq!(read_vec(&pool, s).unwrap(), bytes(7, g.block_bytes));
    assert_eq!(pool.corrupt_blocks(), 8);
    assert_eq!(pool.io_errors(), 1);
}

#[test]
fn no_space_at_creation_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = FaultyIo::new(RealIo::new().shared());
    faulty.set_plan(|c| {
        if c.op == IoOp::Allocate {
            Fault::NoSpace
        } else {
            Fault::None
        }
    });
    let r = DiskPool::open(
        config(dir.path(), geometry(4096), 4)
            .io(faulty.shared())
            .build()
            .unwrap(),
    );
    match r {
        Err(TierError::Io(e)) => assert_eq!(e.raw_os_error(), Some(28)),
        other => panic!("{other:?}"),
    }
    // Nothing half-made is taken for a pool afterwards.
    let (pool, rec) = open(dir.path(), geometry(4096), 4);
    assert!(rec.is_empty());
    assert!(matches!(pool.open_report().outcome, OpenOutcome::Created));
}

#[test]
fn capacity_caps_hold_across_several_files() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(10_000);
    let probe = config(dir.path(), g, 1).build().unwrap();
    let sb = probe.slot_bytes();
    let cap_bytes = 10 * sb + sb / 2;
    let cfg = DiskPoolConfig::builder(dir.path(), g)
        .capacity_bytes(cap_bytes)
        .max_file_bytes(3 * sb + 100)
        .build()
        .unwrap();
    let (pool, _) = DiskPool::open(cfg.clone()).unwrap();
    assert_eq!(pool.capacity(), 10);
    let total: u64 = (0..4)
        .map(|i| std::fs::metadata(slot_file(dir.path(), i)).unwrap().len())
        .sum();
    assert!(total <= cap_bytes);
    assert_eq!(total, 10 * sb);
    assert!(!slot_file(dir.path(), 4).exists());
    let slots: Vec<SlotId> = (0..10).map(|i| store(&pool, i)).collect();
    assert!(matches!(pool.allocate(), Err(TierError::Full)));
    assert_eq!(pool.used(), 10);
    for (i, s) in slots.iter().enumerate() {
        assert_eq!(read_vec(&pool, *s).unwrap(), bytes(i as u64, g.block_bytes));
    }
    pool.free(slots[9]);
    assert_eq!(pool.allocate().unwrap(), slots[9]);
    drop(pool);
    let (pool, rec) = DiskPool::open(cfg).unwrap();
    assert_eq!(rec.len(), 9);
    assert_eq!(pool.used(), 9);
}

#[test]
fn the_journal_compacts_and_recovery_still_exact() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(4096);
    let cfg = config(dir.path(), g, 16)
        .journal_compact_bytes(4096)
        .build()
        .unwrap();
    let mut live = std::collections::HashMap::new();
    {
        let (pool, _) = DiskPool::open(cfg.clone()).unwrap();
        for seed in 0..400u64 {
            if live.len() == 16 || (seed % 3 == 0 && !live.is_empty()) {
                let victim = *live.keys().next().unwrap();
                pool.free(victim);
                live.remove(&victim);
            }
            let s = store(&pool, seed);
            live.insert(s, seed);
        }
        let st = pool.stats();
        assert!(st.journal_compactions > 0, "{st:?}");
        assert!(st.journal_bytes < 8192, "{st:?}");
    }
    let (pool, rec) = DiskPool::open(cfg).unwrap();
    assert_eq!(rec.len(), live.len());
    for r in rec {
        let seed = live[&r.slot];
        assert_eq!(u64::from_le_bytes(r.meta.try_into().unwrap()), seed);
        assert_eq!(read_vec(&pool, r.slot).unwrap(), bytes(seed, 4096));
    }
}

#[test]
fn verify_on_open_drops_damaged_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(4096);
    let (a, b);
    {
        let (pool, _) = open(dir.path(), g, 8);
        a = store(&pool, 1);
        b = store(&pool, 2);
    }
    let sb = config(dir.path(), g, 8).build().unwrap().slot_bytes();
    flip(&slot_file(dir.path(), 0), b.0 as u64 * sb + 17, 0x40);
    // Without the check, the damaged block is listed but reads as corrupt.
    {
        let (pool, rec) = open(dir.path(), g, 8);
        assert_eq!(rec.len(), 2);
        assert!(matches!(read_vec(&pool, b), Err(TierError::Corrupt(_))));
    }
    // With it, it is dropped (and stays dropped).
    for _ in 0..2 {
        let cfg = config(dir.path(), g, 8)
            .verify_on_open(true)
            .build()
            .unwrap();
        let (pool, rec) = DiskPool::open(cfg).unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].slot, a);
        assert_eq!(read_vec(&pool, a).unwrap(), bytes(1, 4096));
        assert_eq!(pool.used(), 1);
    }
}

#[test]
fn concurrent_writers_readers_and_frees() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(8192);
    let (pool, _) = open(dir.path(), g, 64);
    let pool = Arc::new(pool);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let pool = pool.clone();
            s.spawn(move || {
                let mut mine = Vec::new();
                for i in 0..100u64 {
                    let seed = t * 1000 + i;
                    match pool.allocate() {
                        Ok(slot) => {
                            pool.write(slot, &bytes(seed, 8192), &seed.to_le_bytes())
                                .unwrap();
                            mine.push((slot, seed));
                        }
                        Err(TierError::Full) => {}
                        Err(e) => panic!("{e}"),
                    }
                    for (slot, seed) in mine.iter().rev().take(2) {
                        assert_eq!(read_vec(&pool, *slot).unwrap(), bytes(*seed, 8192));
                    }
                    if mine.len() > 10 {
                        let (slot, _) = mine.remove(0);
                        pool.free(slot);
                    }
                }
            });
        }
    });
    assert_eq!(pool.corrupt_blocks(), 0);
    let used = pool.used();
    drop(pool);
    let (_, rec) = open(dir.path(), g, 64);
    assert_eq!(rec.len() as u32, used);
}

// ---- batched writes -----------------------------------------------------------

/// A block of `seed` in a buffer aligned for `O_DIRECT`, so a batched write
/// can take it in place.
fn aligned(seed: u64, len: usize) -> AlignedBuf {
    let mut a = AlignedBuf::zeroed(len);
    a.copy_from_slice(&bytes(seed, len));
    a
}

#[test]
fn write_many_puts_adjacent_slots_in_one_io_and_reads_back_exact() {
    for inner in [RealIo::new(), RealIo::buffered()] {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry(16 << 10);
        let (pool, _) = open_with(dir.path(), g, 64, inner.shared());
        let slots: Vec<SlotId> = (0..40).map(|_| pool.allocate().unwrap()).collect();
        let blocks: Vec<AlignedBuf> = (0..40).map(|i| aligned(i, g.block_bytes)).collect();
        let metas: Vec<[u8; 8]> = (0..40u64).map(|i| i.to_le_bytes()).collect();
        // Handed over in reverse: the pool sorts by slot to find the run.
        let writes: Vec<BlockWrite<'_>> = (0..40)
            .rev()
            .map(|i| BlockWrite {
                slot: slots[i],
                data: &blocks[i],
                meta: &metas[i],
            })
            .collect();
        let before = pool.stats();
        let results = pool.write_many(&writes);
        let after = pool.stats();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        assert_eq!(after.writes - before.writes, 40);
        assert_eq!(after.write_ios - before.write_ios, 1, "one run, one I/O");
        for (i, &s) in slots.iter().enumerate() {
            assert_eq!(read_vec(&pool, s).unwrap(), bytes(i as u64, g.block_bytes));
        }
        drop(pool);
        let (pool, rec) = open(dir.path(), g, 64);
        assert_eq!(rec.len(), 40);
        for r in rec {
            let seed = u64::from_le_bytes(r.meta.try_into().unwrap());
            assert_eq!(r.slot, slots[seed as usize]);
            assert_eq!(read_vec(&pool, r.slot).unwrap(), bytes(seed, g.block_bytes));
        }
    }
}

#[test]
fn write_many_answers_each_block_and_splits_runs_where_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let g = geometry(16 << 10);
    let (pool, _) = open(dir.path(), g, 32);
    let slots: Vec<SlotId> = (0..12).map(|_| pool.allocate().unwrap()).collect();
    let mut sorted = slots.clone();
    sorted.sort();
    let blocks: Vec<AlignedBuf> = (0..12).map(|i| aligned(i, g.block_bytes)).collect();
    let short = vec![0u8; 100];
    let written = store(&pool, 99);
    let mut writes: Vec<BlockWrite<'_>> = Vec::new();
    // Slots 0..5 and 7..12 of the sorted allocation (a gap at 5 and 6),
    // plus bad calls among them.
    for (k, &s) in sorted.iter().enumerate() {
        if k == 5 || k == 6 {
            continue;
        }
        writes.push(BlockWrite {
            slot: s,
            data: &blocks[k],
            meta: b"m",
        });
    }
    writes.insert(
        3,
        BlockWrite {
            slot: written,
            data: &blocks[0],
            meta: b"x",
        },
    );
    writes.insert(
        6,
        BlockWrite {
            slot: SlotId(1000),
            data: &blocks[0],
            meta: b"x",
        },
    );
    writes.insert(
        8,
        BlockWrite {
            slot: sorted[5],
            data: &short,
            meta: b"x",
        },
    );
    // The same slot twice: the second is refused, the first stands.
    writes.push(BlockWrite {
        slot: sorted[0],
        data: &blocks[1],
        meta: b"x",
    });
    let before = pool.stats();
    let results = pool.write_many(&writes);
    assert_eq!(results.len(), writes.len());
    assert!(
        matches!(results[3], Err(TierError::Empty(_))),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(results[6], Err(TierError::NoSuchSlot { .. })),
        "{:?}",
        results[6]
    );
    assert!(
        matches!(results[8], Err(TierError::WrongLength { .. })),
        "{:?}",
        results[8]
    );
    assert!(matches!(results.last().unwrap(), Err(TierError::Empty(_))));
    let oks = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 10);
    let stats = pool.stats();
    assert_eq!(stats.writes - before.writes, 10);
    // The aligned blocks go in place: two runs, two I/Os.
    assert_eq!(stats.write_ios - before.write_ios, 2);
    for (k, &s) in sorted.iter().enumerate() {
        match k {
            5 => assert!(matches!(read_vec(&pool, s), Err(TierError::Empty(_)))),
            6 => assert!(matches!(read_vec(&pool, s), Err(TierError::Empty(_)))),
            _ => assert_eq!(read_vec(&pool, s).unwrap(), bytes(k as u64, g.block_bytes)),
        }
    }
    assert_eq!(read_vec(&pool, written).unwrap(), bytes(99, g.block_bytes));
    // Unaligned buffers under O_DIRECT go one by one, still exact.
    if pool.is_direct() {
        let s1 = sorted[5];
        let s2 = sorted[6];
        let (b1, b2) = (bytes(5, g.block_bytes), bytes(6, g.block_bytes));
        let before = pool.stats();
        let r = pool.write_many(&[
            BlockWrite {
                slot: s1,
                data: &b1[..],
                meta: b"u",
            },
            BlockWrite {
                slot: s2,
                data: &b2[..],
                meta: b"u",
            },
        ]);
        assert!(r.iter().all(|r| r.is_ok()));
        let ios = pool.stats().write_ios - before.write_ios;
        let in_place = b1.as_ptr() as usize % 4096 == 0 && b2.as_ptr() as usize % 4096 == 0;
        assert_eq!(ios, if in_place { 1 } else { 2 });
        assert_eq!(read_vec(&pool, s1).unwrap(), b1);
        assert_eq!(read_vec(&pool, s2).unwrap(), b2);
    }
}

#[test]
fn a_failed_batched_write_fails_its_run_and_nothing_else() {
    for fault in [Fault::Torn(4096), Fault::NoSpace, Fault::Short(8192)] {
        let dir = tempfile::tempdir().unwrap();
        let g = geometry(16 << 10);
        let faulty = FaultyIo::new(RealIo::new().shared());
        let (pool, _) = open_with(dir.path(), g, 32, faulty.shared());
        let mut slots: Vec<SlotId> = (0..10).map(|_| pool.allocate().unwrap()).collect();
        slots.sort();
        let blocks: Vec<AlignedBuf> = (0..10).map(|i| aligned(i, g.block_bytes)).collect();
        let metas: Vec<[u8; 8]> = (0..10u64).map(|i| i.to_le_bytes()).collect();
        // Two runs: slots 0..4 and 5..9 with slot 4 left out.
        let writes: Vec<BlockWrite<'_>> = (0..10)
            .filter(|&i| i != 4)
            .map(|i| BlockWrite {
                slot: slots[i],
                data: &blocks[i],
                meta: &metas[i],
            })
            .collect();
        // The first data-file write (the lower run) fails; a short write
        // is finished by the write loop, then ENOSPC ends it.
        let mut n = 0;
        faulty.set_plan(move |c| {
            if c.op == IoOp::Write && c.file_ends_with(".dat") {
                n += 1;
                if n == 1 {
                    return fault;
                }
                if n == 2 && matches!(fault, Fault::Short(_)) {
                    return Fault::NoSpace;
                }
            }
            Fault::None
        });
        let errs = pool.io_errors();
        let results = pool.write_many(&writes);
        faulty.clear_plan();
        assert!(faulty.injected() > 0);
        for (r, i) in results.iter().zip((0..10).filter(|&i| i != 4)) {
            if i < 4 {
                assert!(matches!(r, Err(TierError::Io(_))), "{fault:?} {i}: {r:?}");
                assert!(matches!(
                    read_vec(&pool, slots[i]),
                    Err(TierError::Empty(_))
                ));
            } else {
                assert!(r.is_ok(), "{fault:?} {i}: {r:?}");
                assert_eq!(
                    read_vec(&pool, slots[i]).unwrap(),
                    bytes(i as u64, g.block_bytes)
                );
            }
        }
        assert_eq!(pool.io_errors(), errs + 1, "one failed I/O");
        // A failed slot may be written again.
        pool.write(slots[0], &blocks[0], &metas[0]).unwrap();
        drop(pool);
        // After a restart: the second run and the retried block, nothing torn.
        let (pool, rec) = open(dir.path(), g, 32);
        let mut seeds: Vec<u64> = rec
            .iter()
            .map(|r| u64::from_le_bytes(r.meta.clone().try_into().unwrap()))
            .collect();
        seeds.sort();
        assert_eq!(seeds, vec![0, 5, 6, 7, 8, 9], "{fault:?}");
        for r in rec {
            let seed = u64::from_le_bytes(r.meta.try_into().unwrap());
            assert_eq!(read_vec(&pool, r.slot).unwrap(), bytes(seed, g.block_bytes));
        }
    }
}
