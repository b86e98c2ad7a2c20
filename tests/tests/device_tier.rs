//! The device tier through the server, over gRPC: on a host-memory
//! stand-in (`Server::start_with_device`, in this process) everywhere, and
//! on a real GPU with the real binary started with `device_bytes` (cargo
//! feature `cuda` of this crate, which builds the server with the GPU
//! tier; skipped, saying so, where no CUDA GPU is present).

use cache_server::server::{Server, ServerConfig};
use radix_tree::Tier;
use radixkv_tests::*;
use std::net::SocketAddr;
use std::sync::Arc;
use tiers::device::{DevicePoolConfig, SimulatedDevice};
#[cfg(feature = "cuda")]
use tiers::BlockGeometry;

const DEVICE_BLOCKS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stand_in_device_tier_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig::from_toml(&base_config(dir.path(), "")).unwrap();
    let geometry =
        cache_server::block_geometry(config.page_size, config.block_bytes, &config.layout).unwrap();
    let device = SimulatedDevice::new(
        DevicePoolConfig::builder(geometry)
            .capacity_bytes(DEVICE_BLOCKS * BLOCK)
            .build()
            .unwrap(),
    )
    .unwrap();
    let server = Server::start_with_device(config, Arc::new(device))
        .await
        .unwrap();
    let client = Client::connect(&format!("http://{}", server.tcp.unwrap()), None)
        .await
        .unwrap();
    blocks_live_on_the_device_move_down_and_come_back(&client, server.metrics.unwrap()).await;
}

#[cfg(feature = "cuda")]
fn gpu_present() -> bool {
    let g = BlockGeometry::new(4096, 0, 0).unwrap();
    let config = DevicePoolConfig::builder(g)
        .capacity_bytes(4096)
        .build()
        .unwrap();
    match tiers::cuda::CudaPool::new(config) {
        Ok(p) => {
            println!("CUDA device: {}", p.backend().device_name());
            true
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            false
        }
    }
}

#[cfg(feature = "cuda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_tier_through_the_server_binary() {
    if !gpu_present() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        root.path(),
        &format!("device_bytes = {}", DEVICE_BLOCKS * BLOCK),
    );
    let client = server.tcp_client(None).await;
    blocks_live_on_the_device_move_down_and_come_back(&client, server.metrics).await;
}

/// Stores land in device memory; when it fills they move to host RAM and
/// still load exactly; a prefetching lookup brings them back up; the
/// pools' counts match the index's throughout.
async fn blocks_live_on_the_device_move_down_and_come_back(client: &Client, metrics: SocketAddr) {
    let scope = Scope::model("gpu");

    let first = prompt(1, 8);
    client
        .store(&scope, &first, 0, blocks(1, 0..8), BLOCK)
        .await
        .unwrap();
    let hit = client.lookup(&scope, &first, None, false).await.unwrap();
    assert_eq!(hit.pages, 8);
    assert!(
        hit.tiers.iter().all(|t| *t == Some(Tier::Device)),
        "a store lands on the GPU: {:?}",
        hit.tiers
    );
    let page = metrics_text(metrics);
    assert_eq!(metric(&page, "radixkv_blocks_used{tier=\"device\"}"), 8.0);
    assert_loads(client, &scope, &first, 1).await;

    // Four more prompts of 8 pages over 16 device slots: the first one
    // is demoted to host RAM.
    for id in 2..6 {
        client
            .store(&scope, &prompt(id, 8), 0, blocks(id, 0..8), BLOCK)
            .await
            .unwrap();
    }
    let page = metrics_text(metrics);
    assert!(metric(&page, "radixkv_blocks_used{tier=\"device\"}") <= DEVICE_BLOCKS as f64);
    let hit = client.lookup(&scope, &first, None, false).await.unwrap();
    assert_eq!(hit.pages, 8, "demoted, not lost");
    assert!(
        hit.tiers.iter().all(|t| *t == Some(Tier::Host)),
        "the oldest prompt moved down: {:?}",
        hit.tiers
    );
    assert_loads(client, &scope, &first, 1).await;
    for id in 2..6 {
        assert_loads(client, &scope, &prompt(id, 8), id).await;
    }

    // A prefetching lookup promotes it back to the GPU.
    client.lookup(&scope, &first, None, true).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let hit = client.lookup(&scope, &first, None, false).await.unwrap();
        if hit.tiers.iter().all(|t| *t == Some(Tier::Device)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never promoted: {:?}\n{}",
            hit.tiers,
            metrics_text(metrics)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_loads(client, &scope, &first, 1).await;
    let page = metrics_text(metrics);
    for tier in ["device", "host"] {
        assert_eq!(
            metric(&page, &format!("radixkv_blocks_used{{tier=\"{tier}\"}}")),
            metric(&page, &format!("radixkv_pages{{tier=\"{tier}\"}}")),
            "pool and index agree on the {tier} tier"
        );
    }
}

/// Leases `tokens` and checks every page loads as prompt `id`'s bytes.
async fn assert_loads(client: &Client, scope: &Scope, tokens: &[u32], id: u32) {
    let hit = client
        .lookup(scope, tokens, Some(10_000), false)
        .await
        .unwrap();
    let lease = hit.lease.expect("a lease");
    let loaded = client.load(lease, 0, 0).await.unwrap();
    assert_eq!(loaded.len(), tokens.len() / PAGE);
    for (p, b) in loaded.iter().enumerate() {
        assert_eq!(&b.data[..], &block(id, p)[..], "prompt {id} page {p}");
    }
    client.release(lease).await.unwrap();
}
