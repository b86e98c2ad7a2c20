//! `radixkv-engine serve`: the engine behind an OpenAI-compatible HTTP API
//! (see the `engine::http` docs), on loopback unless told otherwise. Its
//! KV pages live in an embedded cache, or with `--remote` in a
//! radixkv-server (the tenant's token from `--token` or `RADIXKV_TOKEN`).
//! Once serving it prints `READY http=<address>` on stdout.

use anyhow::Context;
use clap::{Parser, Subcommand};
use engine::http::{serve, HttpConfig};
use engine::{default_model_path, Engine, EngineConfig, Scheduler, SchedulerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "radixkv's decode engine (SmolLM2 on CPU, KV in the radixkv cache)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The GGUF model (default: models/ as scripts/fetch-model leaves it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The model name the API answers to.
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model_name: String,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16)]
    page_size: usize,
    /// Host RAM of the embedded cache, in MiB.
    #[arg(long, default_value_t = 1024, conflicts_with = "remote")]
    cache_mib: usize,
    /// Keep the KV pages in a radixkv-server (`unix:/path` or `host:port`)
    /// instead of an embedded cache.
    #[arg(long, value_name = "TARGET")]
    remote: Option<String>,
    /// The tenant's bearer token for `--remote`.
    #[arg(long, env = "RADIXKV_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Most sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most prompt tokens per forward pass (chunked prefill).
    #[arg(long, default_value_t = 256)]
    prefill_tokens: usize,
    /// Most private KV pages over all running sequences.
    #[arg(long, default_value_t = 2048)]
    kv_pages: usize,
    /// `max_tokens` of requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Threads of the forward pass (default: rayon's, one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Dequantize the weights to F32 at load and compute in exact F32
    /// (about six times the bytes per decode step, slower) instead of
    /// multiplying the file's quantized weights by 8-bit activations.
    #[arg(long)]
    f32_weights: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Serve(args) = Cli::parse().command;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("sizing the thread pool")?;
    }
    let mut config = EngineConfig::builder()
        .model_path(args.model.unwrap_or_else(default_model_path))
        .page_size(args.page_size)
        .host_bytes(args.cache_mib << 20)
        .f32_weights(args.f32_weights);
    if let Some(target) = &args.remote {
        config = config.remote(target, args.token.clone());
    }
    let config = config.build()?;
    let began = std::time::Instant::now();
    let engine = Arc::new(Engine::load(config).with_context(|| match &args.remote {
        Some(target) => format!("starting the engine with the cache at {target}"),
        None => "starting the engine".into(),
    })?);
    tracing::info!(
        model = engine.model().id(),
        took = ?began.elapsed(),
        cache = args.remote.as_deref().unwrap_or("embedded"),
        "model loaded"
    );
    let scheduler = Arc::new(Scheduler::start(
        engine,
        SchedulerConfig {
            max_batch: args.max_batch,
            prefill_tokens: args.prefill_tokens,
            kv_pages: args.kv_pages,
            ..SchedulerConfig::default()
        },
    )?);
    let mut http = HttpConfig::new(args.model_name);
    http.default_max_tokens = args.default_max_tokens;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving the OpenAI-compatible API");
        println!("READY http={addr}");
        tokio::select! {
            r = serve(listener, scheduler, http) => r.context("serving")?,
            _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        }
        anyhow::Ok(())
    })
}
