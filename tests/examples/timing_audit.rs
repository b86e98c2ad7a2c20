//! The tenant timing audit: can tenant B tell, by timing its own lookups,
//! whether tenant A has a prompt cached? Starts the sidecar in this process
//! with two tenants; A caches a long prompt. From B, lookups of A's prompt
//! and of a decoy (a random prompt of the same length that nobody cached,
//! looked up just as often, so caches and branch predictors treat both
//! alike) are timed, interleaved in random order; a two-sample
//! Kolmogorov–Smirnov test must not tell the two apart. As a
//! control, within A, hits and misses are timed the same way, and the test
//! must tell those apart (so the audit can see a difference when one
//! exists). Run: `scripts/timing-audit [SAMPLES]`.

use cache_server::client::{Client, Scope};
use cache_server::server::{Server, ServerConfig, TenantConfig};
use radixkv_tests::audit::{verdict, Xorshift};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args().nth(1).map_or(Ok(400), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let (ps, bb, pages) = (16, 4096, 256);
    let config = ServerConfig {
        listen: None,
        metrics_listen: None,
        data_dir: dir.path().to_path_buf(),
        page_size: ps,
        block_bytes: bb,
        host_bytes: 4 * pages * bb,
        disk_bytes: 0,
        tenants: vec![
            TenantConfig {
                name: "a".into(),
                token: "tenant-a-token".into(),
                quota_pages: 0,
                shm: false,
            },
            TenantConfig {
                name: "b".into(),
                token: "tenant-b-token".into(),
                quota_pages: 0,
                shm: false,
            },
        ],
        ..ServerConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = Server::start(config).await?;
        let target = format!("unix:{}", server.unix.as_ref().unwrap().display());
        let a = Client::connect(&target, Some("tenant-a-token")).await?;
        let b = Client::connect(&target, Some("tenant-b-token")).await?;
        let scope = Scope::model("m");
        let secret: Vec<u32> = (0..(pages * ps) as u32).map(|i| i * 7 % 49_000).collect();
        a.store(&scope, &secret, 0, vec![3u8; pages * bb].into(), bb)
            .await?;
        let mut random = Xorshift::new(0x2545_f491_4f6c_dd1d);
        async fn time(c: &Client, scope: &Scope, tokens: &[u32]) -> anyhow::Result<f64> {
            let t = Instant::now();
            c.lookup(scope, tokens, None, false).await?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        }
        let decoy = random.tokens(pages * ps, 49_000);
        let (mut b_secret, mut b_random, mut a_hit, mut a_miss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut coin = Xorshift::new(0x9e37_79b9_7f4a_7c15);
        // The first rounds warm up and are not kept.
        let warmup = 50;
        for round in 0..samples + warmup {
            if round == warmup {
                for v in [&mut b_secret, &mut b_random, &mut a_hit, &mut a_miss] {
                    v.clear();
                }
            }
            let flip = coin.next_u64();
            if flip & 1 == 0 {
                b_secret.push(time(&b, &scope, &secret).await?);
                b_random.push(time(&b, &scope, &decoy).await?);
            } else {
                b_random.push(time(&b, &scope, &decoy).await?);
                b_secret.push(time(&b, &scope, &secret).await?);
            }
            if flip & 2 == 0 {
                a_hit.push(time(&a, &scope, &secret).await?);
                a_miss.push(time(&a, &scope, &decoy).await?);
            } else {
                a_miss.push(time(&a, &scope, &decoy).await?);
                a_hit.push(time(&a, &scope, &secret).await?);
            }
        }
        server.shutdown().await?;
        verdict(
            &format!(
                "lookup timing audit, {samples} lookups of a {}-token prompt per group",
                pages * ps
            ),
            "us",
            (&b_secret, &b_random),
            (&a_hit, &a_miss),
        )
        .map_err(anyhow::Error::msg)?;
        Ok(())
    })
}
