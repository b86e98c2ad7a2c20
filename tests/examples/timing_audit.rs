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
use std::time::Instant;

/// The two-sample KS statistic and its asymptotic p-value.
fn ks(mut a: Vec<f64>, mut b: Vec<f64>) -> (f64, f64) {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n - j as f64 / m).abs());
    }
    let en = (n * m / (n + m)).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    // Q_KS(lambda) = 2 sum (-1)^(k-1) exp(-2 k^2 lambda^2)
    let mut p = 0.0;
    for k in 1..=100 {
        let k = f64::from(k);
        p += 2.0 * (-1f64).powf(k - 1.0) * (-2.0 * k * k * lambda * lambda).exp();
    }
    (d, p.clamp(0.0, 1.0))
}

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
        a.store(&scope, &secret, 0, vec![3u8; pages * bb].into(), bb).await?;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random_prompt = || -> Vec<u32> {
            (0..pages * ps)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 49_000) as u32
                })
                .collect()
        };
        async fn time(c: &Client, scope: &Scope, tokens: &[u32]) -> anyhow::Result<f64> {
            let t = Instant::now();
            c.lookup(scope, tokens, None, false).await?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        }
        let decoy = random_prompt();
        let (mut b_secret, mut b_random, mut a_hit, mut a_miss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut coin = 0x9e37_79b9_7f4a_7c15_u64;
        // The first rounds warm up and are not kept.
        let warmup = 50;
        for round in 0..samples + warmup {
            if round == warmup {
                for v in [&mut b_secret, &mut b_random, &mut a_hit, &mut a_miss] {
                    v.clear();
                }
            }
            coin ^= coin << 13;
            coin ^= coin >> 7;
            coin ^= coin << 17;
            if coin & 1 == 0 {
                b_secret.push(time(&b, &scope, &secret).await?);
                b_random.push(time(&b, &scope, &decoy).await?);
            } else {
                b_random.push(time(&b, &scope, &decoy).await?);
                b_secret.push(time(&b, &scope, &secret).await?);
            }
            if coin & 2 == 0 {
                a_hit.push(time(&a, &scope, &secret).await?);
                a_miss.push(time(&a, &scope, &decoy).await?);
            } else {
                a_miss.push(time(&a, &scope, &decoy).await?);
                a_hit.push(time(&a, &scope, &secret).await?);
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (d_across, p_across) = ks(b_secret.clone(), b_random.clone());
        let (d_within, p_within) = ks(a_hit.clone(), a_miss.clone());
        println!("timing audit, {samples} lookups of a {}-token prompt per group", pages * ps);
        println!(
            "  tenant B, A's cached prompt vs a decoy: median {:.1} vs {:.1} us, KS D = {d_across:.3}, p = {p_across:.3}",
            median(&b_secret),
            median(&b_random)
        );
        println!(
            "  tenant A, its hit vs the decoy (control): median {:.1} vs {:.1} us, KS D = {d_within:.3}, p = {p_within:.2e}",
            median(&a_hit),
            median(&a_miss)
        );
        let leak = p_across < 0.01;
        let control = p_within < 0.01;
        println!(
            "  across tenants: {}; control: {}",
            if leak { "DISTINGUISHABLE (p < 0.01): a timing leak" } else { "indistinguishable (p >= 0.01)" },
            if control { "hits and misses distinguishable, as they should be" } else { "hits and misses NOT distinguishable: the audit is blind" }
        );
        server.shutdown().await?;
        anyhow::ensure!(!leak && control, "the timing audit failed");
        Ok(())
    })
}
