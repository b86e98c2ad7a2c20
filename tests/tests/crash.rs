//! Crashes: SIGKILL the server at random points while clients store, then
//! restart it and check that every block it serves is byte-exact with what
//! was stored (the expected bytes are a function of the prompt), that
//! nothing torn is served, and that the index and the tiers agree (every
//! indexed page has its block slot and no slot is in use unindexed).

use cache_server::client::Code;
use radixkv_tests::*;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Write-through, so blocks reach the disk tier while the load runs.
const WRITE_THROUGH: &str = "write_mode = \"write-through\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_served_after_a_sigkill_are_the_ones_stored() {
    let root = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(root.path(), WRITE_THROUGH);
    let scope = Scope::model("m");
    let next = Arc::new(AtomicU32::new(1));
    // A fixed sequence of kill delays (reproducible, and varied).
    let delays_ms = [35u64, 80, 10, 150, 55];
    for (round, delay) in delays_ms.iter().enumerate() {
        let mut writers = Vec::new();
        for _ in 0..3 {
            let client = server.unix_client(None).await;
            let (scope, next) = (scope.clone(), next.clone());
            writers.push(tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let r = client
                        .store(&scope, &prompt(id, 3), 0, blocks(id, 0..3), BLOCK)
                        .await;
                    if r.is_err() {
                        return; // the server died under us
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        server.kill();
        for w in writers {
            let _ = w.await;
        }
        server = server.restart();
        assert_index_and_tiers_agree(&server, round, "after the restart");
        // Every prompt stored so far: a hit must be exact, a miss is fine.
        let client = server.tcp_client(None).await;
        let stored = next.load(Ordering::Relaxed);
        let mut hits = 0;
        for id in 1..stored {
            let tokens = prompt(id, 3);
            let hit = client
                .lookup(&scope, &tokens, Some(30_000), false)
                .await
                .unwrap();
            let Some(lease) = hit.lease else { continue };
            match client.load(lease, 0, 0).await {
                Ok(got) => {
                    for b in &got {
                        assert_eq!(
                            &b.data[..],
                            &block(id, b.page)[..],
                            "round {round} prompt {id} page {}",
                            b.page
                        );
                    }
                    hits += 1;
                }
                // A copy that failed its checksum became a miss.
                Err(e) => assert_eq!(e.code(), Code::NotFound, "{e}"),
            }
            client.release(lease).await.unwrap();
        }
        assert_index_and_tiers_agree(&server, round, "after reading everything back");
        eprintln!(
            "round {round}: {} prompts stored, {hits} hit after the crash",
            stored - 1
        );
    }
}

/// Every page the index lists on a tier has a block slot there, and no
/// slot is in use that the index does not list.
fn assert_index_and_tiers_agree(server: &ServerProcess, round: usize, when: &str) {
    let page = server.metrics_text();
    for tier in ["host", "disk"] {
        assert_eq!(
            metric(&page, &format!("radixkv_pages{{tier=\"{tier}\"}}")),
            metric(&page, &format!("radixkv_blocks_used{{tier=\"{tier}\"}}")),
            "round {round}, {when}: the index and the {tier} tier disagree"
        );
    }
}
