//! The tenant timing audit through the engine: can tenant B tell, from the
//! time to first token of its own requests, whether tenant A has a prompt
//! cached? A radixkv server runs in this process with two tenants, and two
//! engines (one per tenant's token) keep their KV in it over the Unix
//! socket and shared memory, as a deployment with one engine per tenant
//! would.
//!
//! A first caches `SAMPLES` prompts. Then, round by round, in a random
//! order within each round: B asks for one of A's prompts (each once, so
//! B's own cache never has it) and for a decoy of the same length that
//! nobody asked for; A asks for one of its cached prompts again (a hit)
//! and for a fresh prompt (a miss). A two-sample Kolmogorov–Smirnov test
//! must not tell B's two groups apart, and must tell A's apart (the
//! control: the audit sees a difference when one exists).
//!
//! Run: `scripts/timing-audit [SAMPLES]` (this audit follows the lookup
//! audit), or `cargo run --release -p radixkv-tests --example ttft_audit --
//! [SAMPLES] [PROMPT_TOKENS]`.

use anyhow::Context as _;
use cache_server::server::{Server, ServerConfig, TenantConfig};
use engine::{
    default_model_path, Engine, EngineConfig, GenerateOptions, KvLayout, ModelConfig, RemoteStore,
};
use radixkv_tests::audit::{verdict, Xorshift};
use std::sync::Arc;

/// Rounds run first and not kept (the allocator, the page cache and the
/// branch predictors settle).
const WARMUP: usize = 8;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let samples: usize = args.next().map_or(Ok(150), |s| s.parse())?;
    let prompt_tokens: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let model = default_model_path();
    anyhow::ensure!(
        model.exists(),
        "{} is missing: run scripts/fetch-model",
        model.display()
    );
    let layout = KvLayout::new(&ModelConfig::read(&model)?, 16);
    let rounds = samples + WARMUP;
    // Room for every prompt this audit stores (A's, B's, the decoys and
    // A's misses), so nothing is evicted and a hit is a hit.
    let pages = 4 * rounds * prompt_tokens.div_ceil(layout.page_size) + 64;
    let dir = tempfile::tempdir()?;
    let tenant = |name: &str| TenantConfig {
        name: name.into(),
        token: format!("tenant-{name}-token"),
        quota_pages: 0,
        shm: true,
    };
    let config = ServerConfig {
        listen: None,
        metrics_listen: None,
        data_dir: dir.path().to_path_buf(),
        page_size: layout.page_size,
        block_bytes: layout.block_bytes(),
        layout: layout.digest(),
        host_bytes: pages * layout.block_bytes(),
        disk_bytes: 0,
        shm_path: Some(dir.path().join("host.shm")),
        tenants: vec![tenant("a"), tenant("b")],
        ..ServerConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = runtime.block_on(Server::start(config))?;
    let target = format!("unix:{}", server.unix.as_ref().unwrap().display());
    let engine_for = |token: &str| -> anyhow::Result<Engine> {
        let store = RemoteStore::connect(&target, Some(token))?;
        anyhow::ensure!(store.uses_shm(), "the engine maps the host tier");
        Ok(Engine::load(
            EngineConfig::builder()
                .model_path(&model)
                .store(Arc::new(store))
                .build()?,
        )?)
    };
    let a = engine_for("tenant-a-token").context("tenant A's engine")?;
    let b = engine_for("tenant-b-token").context("tenant B's engine")?;
    let vocab = a.model().config().vocab as u32;

    let mut options = GenerateOptions::new(1);
    options.stop_at_eos = false;
    // The time to first token, in milliseconds, and whether it was a hit.
    let ttft = |e: &Engine, prompt: &[u32]| -> anyhow::Result<(f64, bool)> {
        let g = e.generate(prompt, &options)?;
        Ok((g.ttft.as_secs_f64() * 1e3, g.cached_tokens > 0))
    };

    let mut random = Xorshift::new(0x5eed_a0d1_7000_0001);
    let mut prompt = || random.tokens(prompt_tokens, vocab);
    let secrets: Vec<Vec<u32>> = (0..rounds).map(|_| prompt()).collect();
    eprintln!("tenant A caches {rounds} prompts of {prompt_tokens} tokens");
    for s in &secrets {
        let (_, hit) = ttft(&a, s)?;
        anyhow::ensure!(!hit, "a fresh prompt was a hit");
    }

    let (mut b_secret, mut b_decoy, mut a_hit, mut a_miss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut coin = Xorshift::new(0x9e37_79b9_7f4a_7c15);
    for (round, secret) in secrets.iter().enumerate() {
        if round == WARMUP {
            for v in [&mut b_secret, &mut b_decoy, &mut a_hit, &mut a_miss] {
                v.clear();
            }
        }
        if round % 25 == 0 {
            eprintln!("round {round}/{rounds}");
        }
        let (decoy, fresh) = (prompt(), prompt());
        let flip = coin.next_u64();
        // Each group's request, and whether it must hit.
        let mut b_pair = [(secret, &mut b_secret), (&decoy, &mut b_decoy)];
        if flip & 1 == 1 {
            b_pair.reverse();
        }
        for (p, out) in b_pair {
            let (t, hit) = ttft(&b, p)?;
            anyhow::ensure!(!hit, "tenant B hit a prompt it never asked for");
            out.push(t);
        }
        let mut a_pair = [(secret, true, &mut a_hit), (&fresh, false, &mut a_miss)];
        if flip & 2 == 2 {
            a_pair.reverse();
        }
        for (p, should_hit, out) in a_pair {
            let (t, hit) = ttft(&a, p)?;
            anyhow::ensure!(
                hit == should_hit,
                "tenant A: hit {hit}, expected {should_hit}"
            );
            out.push(t);
        }
    }
    runtime.block_on(server.shutdown())?;
    verdict(
        &format!(
            "engine TTFT timing audit, {samples} requests of a {prompt_tokens}-token prompt per group"
        ),
        "ms",
        (&b_secret, &b_decoy),
        (&a_hit, &a_miss),
    )
    .map_err(anyhow::Error::msg)
}
