//! The `Cache` facade's reliability promises under injected faults: a full
//! or failing disk (through `FaultyIo`) degrades to misses and counted
//! errors while the cache keeps serving; a block that fails its checks is
//! never data, on a read or on a promotion; a lease that is never released
//! expires; and a device pool configured above host is the top tier.
//!
//! Every read in this file is checked against the bytes that were stored:
//! a read may miss (`Ok(None)`), it may never return wrong bytes.

mod support;
use cache_server::{Cache, CacheConfig, CacheError, LookupOptions, WriteMode};
use radix_tree::{NamespaceId, Tier};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::{block, data, prompt, BLOCK, PAGE};
use tiers::device::{DevicePoolConfig, SimulatedDevice};
use tiers::io::{Fault, FaultyIo, IoOp, RealIo};
use tiers::{BlockGeometry, BlockPool};

/// `EIO` on Linux.
const EIO: i32 = 5;
/// Long enough that no lease in these tests expires unless it is meant to.
const LONG: Duration = Duration::from_secs(120);

fn load(n: &std::sync::atomic::AtomicU64) -> u64 {
    n.load(Ordering::Relaxed)
}

/// A cache with a disk tier whose file I/O goes through a fault injector.
struct Rig {
    dir: tempfile::TempDir,
    faulty: FaultyIo,
    cache: Cache,
    ns: NamespaceId,
    /// Lease TTLs run on this clock: it moves only when a test says so.
    clock: Arc<radix_tree::ManualClock>,
}

fn disk_config(
    dir: &Path,
    io: &FaultyIo,
    host: usize,
    disk: usize,
    mode: WriteMode,
) -> CacheConfig {
    disk_config_builder(dir, io, host, disk, mode)
        .build()
        .unwrap()
}

fn disk_config_builder(
    dir: &Path,
    io: &FaultyIo,
    host: usize,
    disk: usize,
    mode: WriteMode,
) -> cache_server::CacheConfigBuilder {
    // A disk slot is the block plus a header and up to ~1 KiB of metadata,
    // rounded to 4 KiB: 8 KiB here.
    CacheConfig::builder(PAGE, BLOCK, "faults-layout")
        .host_bytes(host * BLOCK)
        .disk(dir, (disk * 2 * BLOCK) as u64)
        .disk_io(io.shared())
        .write_mode(mode)
}

impl Rig {
    /// Stores the 4-page prompts `ids`, each whole.
    fn store_prompts(&self, ids: std::ops::Range<u32>) {
        for id in ids {
            self.cache
                .store(self.ns, &prompt(id, 4), 0, &data(id, 0..4))
                .unwrap();
        }
    }
}

fn rig(host: usize, disk: usize, mode: WriteMode) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let faulty = FaultyIo::new(Arc::new(RealIo::new()));
    let clock = Arc::new(radix_tree::ManualClock::new(0));
    let cache = Cache::open(
        disk_config_builder(dir.path(), &faulty, host, disk, mode)
            .clock(clock.clone())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(cache.host_pool().capacity() as usize, host);
    assert_eq!(cache.disk_pool().unwrap().capacity() as usize, disk);
    let ns = cache.namespace("tenant", "model", "").unwrap();
    Rig {
        dir,
        faulty,
        cache,
        ns,
        clock,
    }
}

/// What reading a prompt gave.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reads {
    /// Pages the lookup matched (and leased).
    matched: usize,
    /// Tier each matched page was read from; `None` = a miss.
    tiers: Vec<Option<Tier>>,
}

impl Reads {
    fn served(&self) -> usize {
        self.tiers.iter().filter(|t| t.is_some()).count()
    }
}

/// Looks a prompt up under a lease and reads every matched page, checking
/// the bytes of every page served.
fn read_prompt(cache: &Cache, ns: NamespaceId, id: u32, pages: usize) -> Reads {
    let tokens = prompt(id, pages);
    let options = LookupOptions {
        lease: Some(LONG),
        promote: false,
    };
    let lookup = cache.lookup(ns, &tokens, options).unwrap();
    let mut out = vec![0; BLOCK];
    let tiers = (0..lookup.pages)
        .map(|p| {
            out.fill(0xA5);
            let tier = cache.read(ns, &lookup, p, &mut out).unwrap();
            if tier.is_some() {
                assert!(
                    out == block(id, p),
                    "page {p} of prompt {id} came back wrong"
                );
            }
            tier
        })
        .collect();
    if let Some(l) = &lookup.lease {
        cache.release(l).unwrap();
    }
    Reads {
        matched: lookup.pages,
        tiers,
    }
}

fn assert_within_capacity(cache: &Cache) {
    let host = cache.host_pool();
    assert!(host.used() <= host.capacity(), "host over capacity");
    if let Some(disk) = cache.disk_pool() {
        assert!(disk.used() <= disk.capacity(), "disk over capacity");
    }
}

/// With no move in flight, every allocated slot is a copy the index knows
/// (nothing leaked, nothing freed twice).
fn assert_no_leaks(cache: &Cache) {
    cache.flush();
    assert_eq!(
        cache.host_pool().used() as u64,
        cache.index().tier_pages(Tier::Host),
        "host slots vs. host copies in the index"
    );
    if let Some(disk) = cache.disk_pool() {
        assert_eq!(
            disk.used() as u64,
            cache.index().tier_pages(Tier::Disk),
            "disk slots vs. disk copies in the index"
        );
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- a full disk ---------------------------------------------------------------

/// ENOSPC on every slot write, or on every journal append: demotions fail,
/// stores still land in host RAM, the failures are counted on both sides,
/// evicted pages become misses, and the disk works again once it has room.
#[test]
fn a_full_disk_during_demotion_degrades_to_misses_and_counted_errors() {
    for file in [".dat", "journal.log"] {
        let r = rig(8, 64, WriteMode::WriteBack);
        r.faulty.fail_writes(file, u64::MAX, Fault::NoSpace);
        for id in 0..10 {
            let out = r
                .cache
                .store(r.ns, &prompt(id, 4), 0, &data(id, 0..4))
                .unwrap();
            assert_eq!(out.stored_pages, 4, "store {id} with {file} full");
            assert_within_capacity(&r.cache);
        }
        let stats = r.cache.stats();
        let disk = r.cache.disk_pool().unwrap();
        assert_eq!(load(&stats.demotions), 0);
        // 40 pages through 8 host slots: 32 evictions, each a failed demotion.
        assert_eq!(load(&stats.io_errors), 32, "{file}");
        assert_eq!(
            disk.io_errors(),
            32,
            "the disk pool counts the same failures ({file})"
        );
        assert_eq!(
            disk.used(),
            0,
            "a failed write leaves no slot allocated ({file})"
        );
        assert_eq!(r.cache.index().tier_pages(Tier::Disk), 0);
        // The newest prompts are whole on host; the older ones are misses.
        for id in 8..10 {
            assert_eq!(
                read_prompt(&r.cache, r.ns, id, 4).tiers,
                vec![Some(Tier::Host); 4]
            );
        }
        for id in 0..8 {
            assert_eq!(
                read_prompt(&r.cache, r.ns, id, 4),
                Reads::default(),
                "prompt {id}"
            );
        }
        assert_no_leaks(&r.cache);

        // Room again: demotions work and their pages read back from disk.
        r.faulty.clear_plan();
        for id in 10..14 {
            r.cache
                .store(r.ns, &prompt(id, 4), 0, &data(id, 0..4))
                .unwrap();
        }
        assert_eq!(load(&r.cache.stats().demotions), 16);
        for id in 8..12 {
            assert_eq!(
                read_prompt(&r.cache, r.ns, id, 4).tiers,
                vec![Some(Tier::Disk); 4],
                "prompt {id}"
            );
        }
        for id in 12..14 {
            assert_eq!(
                read_prompt(&r.cache, r.ns, id, 4).tiers,
                vec![Some(Tier::Host); 4]
            );
        }
        assert_no_leaks(&r.cache);
        r.cache.index().check_invariants();
    }
}

/// Write-through to a full disk: every store succeeds on host and stays
/// readable there; each failed copy is counted; nothing lands on disk.
#[test]
fn a_full_disk_during_write_through_keeps_host_copies() {
    let r = rig(16, 64, WriteMode::WriteThrough);
    r.faulty.fail_writes(".dat", u64::MAX, Fault::NoSpace);
    for id in 0..3 {
        let out = r
            .cache
            .store(r.ns, &prompt(id, 4), 0, &data(id, 0..4))
            .unwrap();
        assert_eq!(out.stored_pages, 4);
    }
    r.cache.flush();
    let stats = r.cache.stats();
    assert_eq!(load(&stats.write_throughs), 0);
    assert_eq!(load(&stats.io_errors), 12);
    // The pool counts failed I/Os: each store's 4 adjacent blocks went to
    // disk in one write.
    assert_eq!(r.cache.disk_pool().unwrap().io_errors(), 3);
    assert_eq!(r.cache.disk_pool().unwrap().used(), 0);
    for id in 0..3 {
        assert_eq!(
            read_prompt(&r.cache, r.ns, id, 4).tiers,
            vec![Some(Tier::Host); 4]
        );
    }
    assert_no_leaks(&r.cache);
    r.faulty.clear_plan();
    r.cache
        .store(r.ns, &prompt(3, 4), 0, &data(3, 0..4))
        .unwrap();
    r.cache.flush();
    assert_eq!(load(&r.cache.stats().write_throughs), 4);
    let l = r
        .cache
        .lookup(r.ns, &prompt(3, 4), LookupOptions::default())
        .unwrap();
    assert!(l
        .locations
        .iter()
        .all(|l| l.has(Tier::Host) && l.has(Tier::Disk)));
    assert_no_leaks(&r.cache);
    r.cache.index().check_invariants();
}

/// Random write faults (EIO, torn writes, short writes, ENOSPC) on slot
/// files and the journal, through demotion and write-through: stores never
/// fail, no read is ever wrong, the pools leak nothing, and after a restart
/// every block that comes back reads back exactly (a torn write is never
/// recovered as data).
#[test]
fn random_write_faults_never_corrupt_what_is_served_or_recovered() {
    for (mode, seed) in [(WriteMode::WriteBack, 7u64), (WriteMode::WriteThrough, 11)] {
        let r = rig(8, 48, mode);
        let mut rng = Rng(seed);
        r.faulty.set_plan(move |c| {
            if c.op != IoOp::Write {
                return Fault::None;
            }
            match rng.below(8) {
                0 => Fault::Errno(EIO),
                1 => Fault::Torn(4096),
                2 => Fault::Short(4096),
                3 => Fault::NoSpace,
                _ => Fault::None,
            }
        });
        let prompts = 30u32;
        for id in 0..prompts {
            let out = r
                .cache
                .store(r.ns, &prompt(id, 3), 0, &data(id, 0..3))
                .unwrap();
            assert_eq!(out.stored_pages, 3);
            assert_within_capacity(&r.cache);
            if id % 5 == 4 {
                for old in 0..=id {
                    read_prompt(&r.cache, r.ns, old, 3);
                }
            }
        }
        r.cache.flush();
        assert!(r.faulty.injected() > 0);
        let stats = r.cache.stats();
        assert!(load(&stats.io_errors) > 0, "{mode:?}: failures are counted");
        assert!(r.cache.disk_pool().unwrap().io_errors() > 0);
        assert!(
            load(&stats.demotions) + load(&stats.write_throughs) > 0,
            "{mode:?}: some writes got through"
        );
        let mut served_before = 0;
        for id in 0..prompts {
            served_before += read_prompt(&r.cache, r.ns, id, 3).served();
        }
        assert!(served_before >= 8, "at least what host holds is served");
        assert_no_leaks(&r.cache);
        r.cache.index().check_invariants();

        // Restart on clean I/O. Every page whose whole prefix is on disk
        // comes back and reads back exactly. (A page on disk whose parent is
        // not comes back cold; a block whose free could not be journaled
        // may come back too, intact or as a miss. Write-through can leave a
        // page on disk twice, and then the copy recovery keeps may be such
        // a stale one: a miss, so only write-back is held to the count.)
        let expected: Vec<usize> = (0..prompts)
            .map(|id| {
                let l = r
                    .cache
                    .lookup(r.ns, &prompt(id, 3), LookupOptions::default())
                    .unwrap();
                l.locations.iter().take_while(|l| l.has(Tier::Disk)).count()
            })
            .collect();
        let Rig {
            dir, faulty, cache, ..
        } = r;
        drop(cache);
        faulty.clear_plan();
        let cache = Cache::open(disk_config(dir.path(), &faulty, 8, 48, mode)).unwrap();
        let ns = cache.namespace("tenant", "model", "").unwrap();
        let mut served = 0;
        for id in 0..prompts {
            let reads = read_prompt(&cache, ns, id, 3);
            if mode == WriteMode::WriteBack {
                assert!(
                    reads.served() >= expected[id as usize],
                    "{mode:?}: prompt {id} came back with {reads:?}, {} pages were on disk",
                    expected[id as usize]
                );
            }
            served += reads.served();
        }
        assert!(served > 0, "{mode:?}: the disk comes back warm");
        assert_no_leaks(&cache);
        cache.index().check_invariants();
    }
}

// ---- failing reads -------------------------------------------------------------

/// I/O errors reading disk-only pages are misses, counted, and transient:
/// the pages are not dropped and read back once the disk recovers. Flipped
/// bits on the way in are corrupt blocks, never data.
#[test]
fn read_errors_on_disk_only_pages_are_misses_never_data() {
    let r = rig(8, 64, WriteMode::WriteBack);
    r.store_prompts(0..6);
    // Prompts 0..4 are on disk only, 4 and 5 on host.
    r.faulty.set_plan(|c| {
        if c.op == IoOp::Read && c.file_ends_with(".dat") {
            Fault::Errno(EIO)
        } else {
            Fault::None
        }
    });
    for id in 0..4 {
        let reads = read_prompt(&r.cache, r.ns, id, 4);
        assert_eq!(
            reads.tiers,
            vec![None; 4],
            "prompt {id}: a failed read is a miss"
        );
    }
    for id in 4..6 {
        assert_eq!(
            read_prompt(&r.cache, r.ns, id, 4).tiers,
            vec![Some(Tier::Host); 4]
        );
    }
    assert_eq!(load(&r.cache.stats().io_errors), 16);
    assert_eq!(r.cache.disk_pool().unwrap().io_errors(), 16);

    // A promotion that cannot read is counted and promotes nothing.
    let first = prompt(0, 4);
    let l = r
        .cache
        .lookup(
            r.ns,
            &first,
            LookupOptions {
                lease: None,
                promote: true,
            },
        )
        .unwrap();
    r.cache
        .wait(l.prefetch.expect("disk-only pages are promoted"));
    assert_eq!(load(&r.cache.stats().promotions), 0);
    assert_eq!(load(&r.cache.stats().io_errors), 20);
    let l = r
        .cache
        .lookup(r.ns, &first, LookupOptions::default())
        .unwrap();
    assert_eq!(
        l.fastest_pages()[Tier::Disk.index()],
        4,
        "still on disk, nothing half promoted"
    );

    // I/O errors are transient: the pages were kept and read back.
    r.faulty.clear_plan();
    for id in 0..4 {
        assert_eq!(
            read_prompt(&r.cache, r.ns, id, 4).tiers,
            vec![Some(Tier::Disk); 4]
        );
    }

    // Bits flipped on the way in (data, header or metadata) fail the checks.
    // (Read under a lease; each flip on its own prompt, as a corrupt page
    // may be dropped once the lease is released.)
    for (id, at) in [(0u32, 7usize), (1, BLOCK + 20), (2, BLOCK + 70)] {
        r.faulty.set_plan(move |c| {
            if c.op == IoOp::Read && c.file_ends_with(".dat") {
                Fault::FlipBit(at)
            } else {
                Fault::None
            }
        });
        let corrupt_before = load(&r.cache.stats().corrupt_blocks);
        let reads = read_prompt(&r.cache, r.ns, id, 4);
        assert_eq!(reads.matched, 4);
        assert_eq!(reads.served(), 0, "flip at {at}: served from a bad read");
        assert!(
            load(&r.cache.stats().corrupt_blocks) > corrupt_before,
            "flip at {at} counted"
        );
    }
    r.faulty.clear_plan();
    // Short reads are finished by the pool's loop: not even a miss.
    r.faulty.set_plan(|c| {
        if c.op == IoOp::Read && c.file_ends_with(".dat") {
            Fault::Short(4096)
        } else {
            Fault::None
        }
    });
    for id in 0..4 {
        let reads = read_prompt(&r.cache, r.ns, id, 4);
        assert_eq!(reads.served(), reads.matched);
    }
    r.faulty.clear_plan();
    assert_no_leaks(&r.cache);
    r.cache.index().check_invariants();
}

/// Flips a byte of a disk slot's data on the device, under the open pool.
fn corrupt_slot(dir: &Path, slot_bytes: u64, slot: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("slots-0000.dat"))
        .unwrap();
    let at = slot as u64 * slot_bytes + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xFF], at).unwrap();
    f.sync_data().unwrap();
}

/// A disk block that rots after it was written is never promoted into host
/// RAM as data, is counted, and stops being advertised as cached.
#[test]
fn a_corrupt_block_is_never_promoted() {
    let r = rig(8, 64, WriteMode::WriteBack);
    r.store_prompts(0..4);
    let first = prompt(0, 4);
    let l = r
        .cache
        .lookup(r.ns, &first, LookupOptions::default())
        .unwrap();
    assert_eq!(l.fastest_pages()[Tier::Disk.index()], 4);
    let slot = l.locations[1].get(Tier::Disk).unwrap().0;
    corrupt_slot(
        r.dir.path(),
        r.cache.disk_pool().unwrap().slot_bytes(),
        slot,
    );

    let l = r
        .cache
        .lookup(
            r.ns,
            &first,
            LookupOptions {
                lease: None,
                promote: true,
            },
        )
        .unwrap();
    r.cache
        .wait(l.prefetch.expect("disk-only pages are promoted"));
    assert_eq!(load(&r.cache.stats().corrupt_blocks), 1);
    assert_eq!(r.cache.disk_pool().unwrap().corrupt_blocks(), 1);
    let l = r
        .cache
        .lookup(r.ns, &first, LookupOptions::default())
        .unwrap();
    assert!(
        l.locations.get(1).is_none_or(|loc| !loc.has(Tier::Host)),
        "the corrupt page was promoted"
    );
    // The page is dropped (and with it every page after it): page 0 alone
    // is left, promoted.
    assert_eq!(l.pages, 1, "a corrupt block stays advertised as cached");
    assert_eq!(
        read_prompt(&r.cache, r.ns, 0, 4).tiers,
        vec![Some(Tier::Host)]
    );
    assert_no_leaks(&r.cache);
    r.cache.index().check_invariants();
}

/// A corrupt block read under the reader's own lease (how an engine reads)
/// is a miss, and is dropped once the lease is gone rather than advertised
/// (and re-read, and re-counted) for ever.
#[test]
fn a_corrupt_block_read_under_a_lease_is_dropped() {
    let r = rig(8, 64, WriteMode::WriteBack);
    r.store_prompts(0..4);
    let first = prompt(0, 4);
    let l = r
        .cache
        .lookup(r.ns, &first, LookupOptions::default())
        .unwrap();
    let slot = l.locations[2].get(Tier::Disk).unwrap().0;
    corrupt_slot(
        r.dir.path(),
        r.cache.disk_pool().unwrap().slot_bytes(),
        slot,
    );
    assert_eq!(
        read_prompt(&r.cache, r.ns, 0, 4).tiers,
        vec![Some(Tier::Disk), Some(Tier::Disk), None, Some(Tier::Disk)]
    );
    assert_eq!(load(&r.cache.stats().corrupt_blocks), 1);
    let again = read_prompt(&r.cache, r.ns, 0, 4);
    assert_eq!(
        again.tiers,
        vec![Some(Tier::Disk); 2],
        "the corrupt page is still advertised"
    );
    assert_eq!(load(&r.cache.stats().corrupt_blocks), 1);
    assert_no_leaks(&r.cache);
    r.cache.index().check_invariants();
}

// ---- leases --------------------------------------------------------------------

/// A lease holder that never releases: its pages are kept while the lease
/// lives (a store needing their room fails cleanly), and once the TTL has
/// passed they are evictable again. Without a disk tier (eviction) and with
/// one (demotion).
#[test]
fn an_abandoned_lease_expires_and_its_pages_become_evictable() {
    let ttl = Duration::from_millis(500);
    // No disk: the pages are evicted. Time runs on a manual clock.
    {
        let clock = Arc::new(radix_tree::ManualClock::new(0));
        let cache = Cache::open(
            CacheConfig::builder(PAGE, BLOCK, "faults-layout")
                .host_bytes(8 * BLOCK)
                .clock(clock.clone())
                .build()
                .unwrap(),
        )
        .unwrap();
        let ns = cache.namespace("t", "m", "").unwrap();
        cache.store(ns, &prompt(0, 4), 0, &data(0, 0..4)).unwrap();
        let abandoned = cache
            .lookup(
                ns,
                &prompt(0, 4),
                LookupOptions {
                    lease: Some(ttl),
                    promote: false,
                },
            )
            .unwrap();
        assert_eq!(abandoned.pages, 4);
        drop(abandoned);
        for id in 1..4 {
            cache.store(ns, &prompt(id, 4), 0, &data(id, 0..4)).unwrap();
        }
        assert_eq!(
            read_prompt(&cache, ns, 0, 4).tiers,
            vec![Some(Tier::Host); 4]
        );
        let big = prompt(9, 8);
        assert!(
            matches!(
                cache.store(ns, &big, 0, &data(9, 0..8)),
                Err(CacheError::Full(_))
            ),
            "8 free slots are not there while 4 are leased"
        );
        assert!(load(&cache.stats().store_rejections) > 0);
        assert_eq!(
            cache.host_pool().used() as u64,
            cache.index().tier_pages(Tier::Host)
        );
        clock.advance_ms(ttl.as_millis() as u64 + 1);
        assert_eq!(
            cache
                .store(ns, &big, 0, &data(9, 0..8))
                .unwrap()
                .stored_pages,
            8
        );
        assert_eq!(
            cache
                .lookup(ns, &prompt(0, 4), LookupOptions::default())
                .unwrap()
                .pages,
            0
        );
        let s = cache.index().stats();
        assert_eq!((s.leases, s.pinned_pages), (0, 0));
        assert_eq!(cache.index().tenant_pinned_pages("t"), 0);
        cache.index().check_invariants();
    }
    // With a disk: the pages are demoted.
    {
        let r = rig(4, 64, WriteMode::WriteBack);
        r.cache
            .store(r.ns, &prompt(0, 4), 0, &data(0, 0..4))
            .unwrap();
        let abandoned = r
            .cache
            .lookup(
                r.ns,
                &prompt(0, 4),
                LookupOptions {
                    lease: Some(ttl),
                    promote: false,
                },
            )
            .unwrap();
        drop(abandoned);
        assert!(
            matches!(
                r.cache.store(r.ns, &prompt(1, 4), 0, &data(1, 0..4)),
                Err(CacheError::Full(_))
            ),
            "host is all leased"
        );
        r.clock.advance_ms(ttl.as_millis() as u64 + 1);
        let out = r.cache.store(r.ns, &prompt(1, 4), 0, &data(1, 0..4));
        assert_eq!(
            out.unwrap().stored_pages,
            4,
            "the expired lease still holds host"
        );
        assert_eq!(
            read_prompt(&r.cache, r.ns, 0, 4).tiers,
            vec![Some(Tier::Disk); 4]
        );
        assert_eq!(
            read_prompt(&r.cache, r.ns, 1, 4).tiers,
            vec![Some(Tier::Host); 4]
        );
        assert_eq!(r.cache.index().stats().leases, 0);
        assert_no_leaks(&r.cache);
        r.cache.index().check_invariants();
    }
}

// ---- everything at once ----------------------------------------------------------

/// Three threads store, look up, lease, read, promote and release over a
/// small cache while the disk fails at random (errors, torn and short
/// writes, ENOSPC, flipped bits on reads). No panic, no wrong byte, no
/// leaked slot.
#[test]
fn concurrent_traffic_over_a_failing_disk_never_returns_wrong_bytes() {
    for mode in [WriteMode::WriteBack, WriteMode::WriteThrough] {
        let r = rig(16, 48, mode);
        let mut rng = Rng(0xFEED);
        r.faulty.set_plan(move |c| {
            if !matches!(c.op, IoOp::Read | IoOp::Write) || rng.below(5) != 0 {
                return Fault::None;
            }
            match (c.op, rng.below(4)) {
                (IoOp::Read, 0) => Fault::FlipBit(rng.below(c.len.max(1)) as usize),
                (IoOp::Read, 1) => Fault::Short(4096),
                (IoOp::Read, _) => Fault::Errno(EIO),
                (_, 0) => Fault::NoSpace,
                (_, 1) => Fault::Torn(4096),
                (_, 2) => Fault::Short(4096),
                _ => Fault::Errno(EIO),
            }
        });
        let cache = Arc::new(r.cache);
        let ns = r.ns;
        let served: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3u64)
                .map(|t| {
                    let cache = cache.clone();
                    s.spawn(move || {
                        let mut rng = Rng(0x1234_5678 + t);
                        let mut served = 0u64;
                        for _ in 0..120 {
                            // Prompts 0..4 are shared by every thread.
                            let id = match rng.below(3) {
                                0 => rng.below(4) as u32,
                                _ => 10 + t as u32 * 10 + rng.below(8) as u32,
                            };
                            let pages = 1 + rng.below(5) as usize;
                            match rng.below(3) {
                                0 => match cache.store(
                                    ns,
                                    &prompt(id, pages),
                                    0,
                                    &data(id, 0..pages),
                                ) {
                                    Ok(_) | Err(CacheError::Full(_)) => {}
                                    Err(e) => panic!("store failed: {e}"),
                                },
                                1 => served += read_prompt(&cache, ns, id, pages).served() as u64,
                                _ => {
                                    let options = LookupOptions {
                                        lease: Some(LONG),
                                        promote: true,
                                    };
                                    let l = cache.lookup(ns, &prompt(id, pages), options).unwrap();
                                    if let Some(p) = l.prefetch {
                                        cache.wait(p);
                                    }
                                    let mut out = vec![0; BLOCK];
                                    for p in 0..l.pages {
                                        if cache.read(ns, &l, p, &mut out).unwrap().is_some() {
                                            assert!(out == block(id, p), "prompt {id} page {p}");
                                            served += 1;
                                        }
                                    }
                                    if let Some(lease) = &l.lease {
                                        cache.release(lease).unwrap();
                                    }
                                }
                            }
                            assert_within_capacity(&cache);
                        }
                        served
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert!(served > 0);
        assert!(r.faulty.injected() > 0);
        let s = cache.stats();
        assert!(
            load(&s.io_errors) + load(&s.corrupt_blocks) > 0,
            "{mode:?}: faults are counted"
        );
        // (Moves still in flight hold leases until they are recorded.)
        assert_no_leaks(&cache);
        assert_eq!(cache.index().stats().leases, 0);
        cache.index().check_invariants();
        r.faulty.clear_plan();
    }
}

// ---- the device tier -------------------------------------------------------------

/// With a device pool configured, it is the top tier: stores land there,
/// device pressure demotes to host and host pressure to disk, promotion
/// brings pages back up to the device, and every read stays exact.
#[test]
fn a_device_pool_is_the_top_tier() {
    let device = Arc::new(SimulatedDevice::new(device_config(8)).unwrap());
    device_pool_is_the_top_tier(device);
}

/// The same on a real GPU (cargo feature `cuda`), or skipped, saying so.
#[cfg(feature = "cuda")]
#[test]
fn a_cuda_pool_is_the_top_tier() {
    match tiers::cuda::CudaPool::new(device_config(8)) {
        Ok(pool) => {
            println!("CUDA device: {}", pool.backend().device_name());
            let pool = Arc::new(pool);
            device_pool_is_the_top_tier(pool.clone());
            // The cache attached its host tier: moves were single DMAs.
            assert!(pool.backend().direct_copies() > 0);
        }
        Err(e) => println!("skipped: no CUDA device ({e})"),
    }
}

fn device_config(slots: usize) -> DevicePoolConfig {
    let geometry = BlockGeometry::new(BLOCK, 4096, 0).unwrap();
    DevicePoolConfig::builder(geometry)
        .capacity_bytes(slots * BLOCK)
        .build()
        .unwrap()
}

/// A cache over `device`, `host_blocks` of host RAM and a disk tier in
/// `dir`.
fn device_cache(device: Arc<dyn BlockPool>, host_blocks: usize, dir: &Path) -> Cache {
    Cache::open(
        CacheConfig::builder(PAGE, BLOCK, "faults-layout")
            .host_bytes(host_blocks * BLOCK)
            .disk(dir, (64 * 2 * BLOCK) as u64)
            .device(device)
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn device_pool_is_the_top_tier(device: Arc<dyn BlockPool>) {
    let dir = tempfile::tempdir().unwrap();
    let cache = device_cache(device.clone(), 8, dir.path());
    let ns = cache.namespace("t", "m", "").unwrap();
    for id in 0..5 {
        let out = cache.store(ns, &prompt(id, 4), 0, &data(id, 0..4)).unwrap();
        assert_eq!(out.stored_pages, 4);
        let l = cache
            .lookup(ns, &prompt(id, 4), LookupOptions::default())
            .unwrap();
        assert_eq!(
            l.fastest_pages()[Tier::Device.index()],
            4,
            "a store lands on the device"
        );
        assert!(device.used() <= 8 && cache.host_pool().used() <= 8);
    }
    // 20 pages over 8 device and 8 host slots: the oldest went down twice.
    assert!(load(&cache.stats().demotions) >= 12 + 4);
    for id in 0..5 {
        assert!(read_prompt(&cache, ns, id, 4)
            .tiers
            .iter()
            .all(Option::is_some));
    }
    let first = prompt(0, 4);
    let l = cache
        .lookup(
            ns,
            &first,
            LookupOptions {
                lease: None,
                promote: true,
            },
        )
        .unwrap();
    assert_eq!(l.fastest_pages()[Tier::Disk.index()], 4);
    cache.wait(l.prefetch.expect("pages below the device are promoted"));
    let l = cache.lookup(ns, &first, LookupOptions::default()).unwrap();
    assert_eq!(
        l.fastest_pages()[Tier::Device.index()],
        4,
        "promoted to the top tier"
    );
    assert_eq!(
        read_prompt(&cache, ns, 0, 4).tiers,
        vec![Some(Tier::Device); 4]
    );
    assert!(device.used() <= 8 && cache.host_pool().used() <= 8);
    cache.index().check_invariants();

    // A device pool of another block size is refused.
    let other = BlockGeometry::new(2 * BLOCK, 4096, 0).unwrap();
    let wrong = Arc::new(
        SimulatedDevice::new(
            DevicePoolConfig::builder(other)
                .capacity_bytes(4 * 2 * BLOCK)
                .build()
                .unwrap(),
        )
        .unwrap(),
    );
    assert!(matches!(
        CacheConfig::builder(PAGE, BLOCK, "faults-layout")
            .device(wrong)
            .build(),
        Err(CacheError::InvalidConfig(_))
    ));
}

/// A disk that cannot even be opened fails `Cache::open` with an error,
/// not a panic.
#[test]
fn a_disk_that_cannot_be_opened_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = FaultyIo::new(Arc::new(RealIo::new()));
    faulty.set_plan(|c| {
        if c.op == IoOp::Open {
            Fault::Errno(EIO)
        } else {
            Fault::None
        }
    });
    let r = Cache::open(disk_config(
        dir.path(),
        &faulty,
        8,
        16,
        WriteMode::WriteBack,
    ));
    assert!(matches!(r, Err(CacheError::Tier(_))), "{r:?}");
    faulty.clear_plan();
    assert!(Cache::open(disk_config(
        dir.path(),
        &faulty,
        8,
        16,
        WriteMode::WriteBack
    ))
    .is_ok());
}

/// Making room on a tier frees as many slots as asked even when the
/// victims sit in many short nodes (leases on prefixes split nodes, and
/// only a leaf's pages are candidates until the leaf is gone).
#[test]
fn making_room_reaches_past_short_nodes() {
    let device = Arc::new(SimulatedDevice::new(device_config(8)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cache = device_cache(device, 32, dir.path());
    let ns = cache.namespace("t", "m", "").unwrap();
    let (a, b) = (prompt(1, 8), prompt(2, 8));
    cache.store(ns, &b, 0, &data(2, 0..8)).unwrap();
    cache.store(ns, &a, 0, &data(1, 0..8)).unwrap();
    let nodes = cache.index().stats().nodes;
    // Leases on each prefix of `a` cut it into one-page nodes.
    for pages in 1..8 {
        let options = LookupOptions {
            lease: Some(LONG),
            promote: false,
        };
        let l = cache.lookup(ns, &a[..pages * PAGE], options).unwrap();
        cache.release(l.lease.as_ref().unwrap()).unwrap();
    }
    assert_eq!(cache.index().stats().nodes, nodes + 7);
    let on = |tokens: &[u32]| cache.lookup(ns, tokens, LookupOptions::default()).unwrap();
    assert_eq!(on(&a).fastest_pages()[Tier::Device.index()], 8);
    assert_eq!(on(&b).fastest_pages()[Tier::Host.index()], 8);
    let promote = LookupOptions {
        lease: None,
        promote: true,
    };
    let l = cache.lookup(ns, &b, promote).unwrap();
    cache.wait(l.prefetch.expect("b is below the device"));
    assert_eq!(
        on(&b).fastest_pages()[Tier::Device.index()],
        8,
        "all of b promoted: room was made past a's one-page nodes"
    );
    assert_eq!(on(&a).fastest_pages()[Tier::Host.index()], 8);
    assert_eq!(read_prompt(&cache, ns, 1, 8).matched, 8);
    cache.index().check_invariants();
}
