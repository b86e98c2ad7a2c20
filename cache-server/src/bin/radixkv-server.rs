//! `radixkv-server`: the sidecar. Settings from a TOML file (`--config`),
//! each overridable by a flag; with neither, a useful cache on loopback.

use anyhow::Context as _;
use cache_server::server::{Server, ServerConfig};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "radixkv-server",
    version,
    about = "radixkv's KV-cache sidecar (gRPC on TCP and a Unix socket, a local socket for lookups, Prometheus metrics)."
)]
struct Flags {
    /// TOML settings file (see the README for every field).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC over TCP (default 127.0.0.1:50051; port 0 picks a free one).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve no TCP listener (Unix socket only).
    #[arg(long)]
    no_tcp: bool,
    /// gRPC over this Unix socket (default <data-dir>/radixkv.sock).
    #[arg(long)]
    unix_socket: Option<PathBuf>,
    /// The local socket, Lookup/Release/Renew/Health without HTTP/2 for
    /// engines on this machine (default <data-dir>/radixkv-local.sock).
    #[arg(long)]
    local_socket: Option<PathBuf>,
    /// Serve no local socket.
    #[arg(long)]
    no_local_socket: bool,
    /// Prometheus /metrics and /health (default 127.0.0.1:9464).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Where the disk tier and the socket live (default ./radixkv-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    page_size: Option<usize>,
    #[arg(long)]
    block_bytes: Option<usize>,
    #[arg(long)]
    layout: Option<String>,
    /// Host RAM for blocks, in bytes.
    #[arg(long)]
    host_bytes: Option<usize>,
    /// Disk tier capacity in bytes (0: none).
    #[arg(long)]
    disk_bytes: Option<u64>,
    /// GPU memory for blocks, in bytes (0: no GPU tier; needs the `cuda` build).
    #[arg(long)]
    device_bytes: Option<usize>,
    /// Which GPU (CUDA device ordinal).
    #[arg(long)]
    device_ordinal: Option<usize>,
    /// Keep the host tier in this shared-memory file (e.g. /dev/shm/radixkv).
    #[arg(long)]
    shm_path: Option<PathBuf>,
    /// Eviction policy: lru, lfu, slru, priority, cost.
    #[arg(long)]
    policy: Option<String>,
    /// write-back, write-through, or write-through-after-hits:N.
    #[arg(long)]
    write_mode: Option<String>,
    /// Token ids must be below this (0: no check).
    #[arg(long)]
    vocab_size: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    let mut config = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            ServerConfig::from_toml(&text)?
        }
        None => ServerConfig::default(),
    };
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = flags.$field.clone() {
                config.$field = v.into();
            }
        )*};
    }
    set!(listen, unix_socket, local_socket, metrics_listen, shm_path);
    if flags.no_local_socket {
        config.serve_local_socket = false;
    }
    if let Some(v) = flags.data_dir.clone() {
        config.data_dir = v;
    }
    if let Some(v) = flags.page_size {
        config.page_size = v;
    }
    if let Some(v) = flags.block_bytes {
        config.block_bytes = v;
    }
    if let Some(v) = flags.layout.clone() {
        config.layout = v;
    }
    if let Some(v) = flags.host_bytes {
        config.host_bytes = v;
    }
    if let Some(v) = flags.disk_bytes {
        config.disk_bytes = v;
    }
    if let Some(v) = flags.device_bytes {
        config.device_bytes = v;
    }
    if let Some(v) = flags.device_ordinal {
        config.device_ordinal = v;
    }
    if let Some(v) = flags.policy.clone() {
        config.policy = v;
    }
    if let Some(v) = flags.write_mode.clone() {
        config.write_mode = v;
    }
    if let Some(v) = flags.vocab_size {
        config.vocab_size = v;
    }
    if flags.no_tcp {
        config.listen = None;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("radixkv")
        .build()?;
    runtime.block_on(async move {
        let server = Server::start(config).await?;
        println!("{}", server.ready_line());
        tracing::info!("{}", server.ready_line());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing calls in flight, persisting the cache");
        let persisted = server.shutdown().await?;
        tracing::info!(persisted, "stopped");
        Ok(())
    })
}
