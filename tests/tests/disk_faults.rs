//! Disk faults seen through the server: a full disk, failing reads, short
//! reads and flipped bits on the disk tier, injected under a server that
//! clients reach over loopback gRPC. The promises: every call answers (an
//! OK, or a miss as NOT_FOUND, never wrong bytes), the server stays up and
//! within its host capacity, the failures appear in `/metrics`, and the
//! disk tier works again once the fault is gone.
//!
//! The server runs in this process (`Server::start_with_disk_io`, feature
//! `test-utils`) because the fault injector sits behind the disk tier's
//! file I/O; everything else is the real server: its listeners, service,
//! status mapping and metrics page.

use cache_server::client::Code;
use cache_server::server::{Server, ServerConfig};
use radix_tree::Tier;
use radixkv_tests::*;
use std::sync::Arc;
use tiers::io::{Fault, FaultyIo, IoOp, RealIo};

/// Host slots of the server under test: small, so stores demote to disk.
const HOST_BLOCKS: usize = 8;
/// Pages per prompt.
const PAGES: usize = 4;
/// `EIO` on Linux.
const EIO: i32 = 5;

struct Rig {
    _dir: tempfile::TempDir,
    server: Server,
    faulty: FaultyIo,
    client: Client,
    scope: Scope,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::from_toml(&base_config(dir.path(), "")).unwrap();
    config.host_bytes = HOST_BLOCKS * BLOCK;
    let faulty = FaultyIo::new(Arc::new(RealIo::new()));
    let server = Server::start_with_disk_io(config, faulty.shared())
        .await
        .unwrap();
    let client = Client::connect(&format!("http://{}", server.tcp.unwrap()), None)
        .await
        .unwrap();
    Rig {
        _dir: dir,
        server,
        faulty,
        client,
        scope: Scope::model("m"),
    }
}

/// What reading a prompt through the server gave.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// The lookup's fastest tier of each page, and every page was loaded
    /// and byte-exact.
    Whole(Vec<Option<Tier>>),
    /// Nothing cached.
    Miss,
    /// Cached, but the load ended with this status before its end (each
    /// block it did give was byte-exact).
    Failed(Code),
}

impl Rig {
    async fn store(&self, ids: std::ops::Range<u32>) {
        for id in ids {
            let out = self
                .client
                .store(
                    &self.scope,
                    &prompt(id, PAGES),
                    0,
                    blocks(id, 0..PAGES),
                    BLOCK,
                )
                .await
                .unwrap_or_else(|e| panic!("store {id}: {e}"));
            assert_eq!(out.stored_pages, PAGES, "store {id}");
        }
    }

    /// Looks prompt `id` up under a lease and loads what it matched,
    /// checking every block served against the bytes stored.
    async fn read(&self, id: u32) -> Read {
        let hit = self
            .client
            .lookup(&self.scope, &prompt(id, PAGES), Some(30_000), false)
            .await
            .unwrap();
        let Some(lease) = hit.lease else {
            assert_eq!(hit.pages, 0);
            return Read::Miss;
        };
        let outcome = self
            .client
            .load_each(lease, 0, 0, |page, data| {
                assert_eq!(
                    data,
                    block(id, page),
                    "prompt {id} page {page}: wrong bytes"
                );
            })
            .await;
        let _ = self.client.release(lease).await;
        match outcome {
            Ok(n) => {
                assert_eq!(
                    n, hit.pages,
                    "prompt {id}: a load ends early only with a status"
                );
                Read::Whole(hit.tiers)
            }
            Err(e) => Read::Failed(e.code()),
        }
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&metrics_text(self.server.metrics.unwrap()), series)
    }

    async fn assert_serving_within_capacity(&self) {
        assert!(self.client.health().await.unwrap(), "the server is healthy");
        let stats = self.client.stats().await.unwrap();
        assert!(
            stats.tier_pages[Tier::Host.index()] <= HOST_BLOCKS as u64,
            "host holds {} pages, over its {HOST_BLOCKS}",
            stats.tier_pages[Tier::Host.index()]
        );
        assert_eq!(stats.leases, 0, "every lease was released");
    }
}

/// ENOSPC on every disk slot write: stores still succeed in host RAM,
/// each failed demotion is counted in `radixkv_io_errors_total`, evicted
/// pages become misses, and the disk takes blocks again once it has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_behind_the_server_degrades_to_misses_and_shows_in_metrics() {
    let r = rig().await;
    r.faulty.fail_writes(".dat", u64::MAX, Fault::NoSpace);
    // 10 prompts of 4 pages through 8 host slots: 32 evictions, each a
    // demotion that found the disk full.
    r.store(0..10).await;
    assert_eq!(r.metric("radixkv_io_errors_total"), 32.0);
    assert_eq!(r.metric("radixkv_pages{tier=\"disk\"}"), 0.0);
    assert_eq!(r.metric("radixkv_pages{tier=\"host\"}"), 8.0);
    for id in 0..8 {
        assert_eq!(r.read(id).await, Read::Miss, "prompt {id}");
    }
    for id in 8..10 {
        assert_eq!(
            r.read(id).await,
            Read::Whole(vec![Some(Tier::Host); PAGES]),
            "prompt {id}"
        );
    }
    r.assert_serving_within_capacity().await;

    // Room again: the next demotions land on disk and read back exact.
    r.faulty.clear_plan();
    r.store(10..14).await;
    assert_eq!(r.metric("radixkv_pages{tier=\"disk\"}"), 16.0);
    assert_eq!(r.metric("radixkv_io_errors_total"), 32.0, "no new errors");
    for id in 8..12 {
        assert_eq!(
            r.read(id).await,
            Read::Whole(vec![Some(Tier::Disk); PAGES]),
            "prompt {id}"
        );
    }
    r.assert_serving_within_capacity().await;
    r.server.shutdown().await.unwrap();
}

/// Failing, short and bit-flipped disk reads under Load: every load gives
/// byte-exact blocks or ends with NOT_FOUND (a miss), the failures are
/// counted, and once the disk is sound again the pages that were only
/// unreadable (not corrupt) read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_disk_reads_behind_the_server_are_misses_never_data() {
    let r = rig().await;
    // 20 prompts: 0..18 end up on disk only, 18 and 19 on host.
    r.store(0..20).await;
    assert_eq!(r.metric("radixkv_pages{tier=\"disk\"}"), 72.0);

    // EIO on every disk read: disk-only prompts answer NOT_FOUND from
    // Load, host prompts are untouched.
    r.faulty.set_plan(|c| {
        if c.op == IoOp::Read && c.file_ends_with(".dat") {
            Fault::Errno(EIO)
        } else {
            Fault::None
        }
    });
    let io_before = r.metric("radixkv_io_errors_total");
    for id in 0..6 {
        assert_eq!(
            r.read(id).await,
            Read::Failed(Code::NotFound),
            "prompt {id}"
        );
    }
    assert_eq!(r.read(19).await, Read::Whole(vec![Some(Tier::Host); PAGES]));
    assert!(r.metric("radixkv_io_errors_total") >= io_before + 6.0);
    assert!(r.metric("radixkv_request_errors_total{method=\"Load\"}") >= 6.0);
    // I/O errors are transient: once the disk reads again, those pages
    // are still cached and read back exact.
    r.faulty.clear_plan();
    for id in 0..6 {
        assert_eq!(
            r.read(id).await,
            Read::Whole(vec![Some(Tier::Disk); PAGES]),
            "prompt {id} after the disk recovered"
        );
    }

    // Short reads are finished by the pool's loop: whole and exact.
    r.faulty.set_plan(|c| {
        if c.op == IoOp::Read && c.file_ends_with(".dat") {
            Fault::Short(4096)
        } else {
            Fault::None
        }
    });
    for id in 6..10 {
        assert_eq!(
            r.read(id).await,
            Read::Whole(vec![Some(Tier::Disk); PAGES]),
            "prompt {id} under short reads"
        );
    }

    // A bit flipped in every read (data, header or metadata): never
    // served; counted as corrupt.
    let corrupt_before = r.metric("radixkv_corrupt_blocks_total");
    for (id, at) in [(10u32, 7usize), (11, BLOCK + 20), (12, BLOCK + 70)] {
        r.faulty.set_plan(move |c| {
            if c.op == IoOp::Read && c.file_ends_with(".dat") {
                Fault::FlipBit(at)
            } else {
                Fault::None
            }
        });
        assert_eq!(
            r.read(id).await,
            Read::Failed(Code::NotFound),
            "prompt {id}, flip at {at}"
        );
    }
    assert!(r.metric("radixkv_corrupt_blocks_total") >= corrupt_before + 3.0);
    r.faulty.clear_plan();

    // A mix of every fault over all prompts, twice: exact or NOT_FOUND.
    let mut n = 0u64;
    r.faulty.set_plan(move |c| {
        if c.op != IoOp::Read || !c.file_ends_with(".dat") {
            return Fault::None;
        }
        n += 1;
        match n % 4 {
            0 => Fault::Errno(EIO),
            1 => Fault::Short(BLOCK / 2),
            2 => Fault::FlipBit((n as usize * 97) % BLOCK),
            _ => Fault::None,
        }
    });
    let (mut whole, mut failed) = (0, 0);
    for _ in 0..2 {
        for id in 0..20 {
            match r.read(id).await {
                Read::Whole(_) => whole += 1,
                Read::Failed(Code::NotFound) => failed += 1,
                Read::Miss => {}
                other => panic!("prompt {id}: {other:?}"),
            }
        }
    }
    assert!(
        whole > 0 && failed > 0,
        "{whole} whole, {failed} failed: the mix bit"
    );
    r.faulty.clear_plan();
    r.assert_serving_within_capacity().await;
    r.server.cache().index().check_invariants();
    r.server.shutdown().await.unwrap();
}
