//! The sidecar: the gRPC services over the [`Cache`](crate::Cache), on TCP
//! (TLS when configured) and a Unix socket, with Prometheus metrics over
//! HTTP. [`Server::start`] binds everything and returns the addresses;
//! [`Server::shutdown`] stops accepting, waits for calls in flight, and
//! persists the cache so the next start is warm.

mod admin;
mod auth;
pub mod config;
mod events;
#[cfg(feature = "test-utils")]
pub mod harness;
mod http;
mod leases;
mod local;
mod metrics;
mod namespaces;
mod service;
mod state;
mod status;

pub use auth::DEFAULT_TENANT;
pub use config::{Limits, ServerConfig, TenantConfig, TlsConfig};

use crate::Cache;
use anyhow::Context as _;
use events::EventBus;
use proto::v1::admin_server::AdminServer;
use proto::v1::cache_server::CacheServer;
use radix_tree::Tier;
use state::State;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Identity, ServerTlsConfig};

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    /// The local socket (`cache_server::local`).
    pub local: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// Opens the cache (recovering the disk tier) and starts every
    /// listener. Call from within a tokio runtime.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Server> {
        Self::start_inner(config, TestHooks::default()).await
    }

    /// [`Server::start`] with the disk tier's file I/O going through `io`
    /// (a fault injector in tests), so faults are seen through the gRPC
    /// stack, its statuses and its metrics.
    #[cfg(feature = "test-utils")]
    pub async fn start_with_disk_io(
        config: ServerConfig,
        io: Arc<dyn tiers::io::FileIo>,
    ) -> anyhow::Result<Server> {
        let hooks = TestHooks {
            disk_io: Some(io),
            ..TestHooks::default()
        };
        Self::start_inner(config, hooks).await
    }

    /// [`Server::start`] with `device` as its device tier (a host-memory
    /// stand-in in tests), so the GPU tier's paths through the server run
    /// on machines without a GPU.
    #[cfg(feature = "test-utils")]
    pub async fn start_with_device(
        config: ServerConfig,
        device: Arc<dyn tiers::BlockPool>,
    ) -> anyhow::Result<Server> {
        let hooks = TestHooks {
            device: Some(device),
            ..TestHooks::default()
        };
        Self::start_inner(config, hooks).await
    }

    async fn start_inner(config: ServerConfig, hooks: TestHooks) -> anyhow::Result<Server> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let bus = Arc::new(EventBus::new(
            config.limits.event_buffer,
            config.limits.max_subscribers,
        ));
        let mut cache_config = config.cache_config()?.events(bus.clone());
        if let Some(io) = hooks.disk_io {
            cache_config = cache_config.disk_io(io);
        }
        if let Some(device) = hooks.device {
            cache_config = cache_config.device(device);
        }
        let cache_config = cache_config.build()?;
        let cache = tokio::task::spawn_blocking(move || Cache::open(cache_config))
            .await
            .context("opening the cache")??;
        let state = Arc::new(State::new(Arc::new(cache), config.clone(), bus));
        let (stop, stopped) = watch::channel(false);
        let max = config.limits.max_message_bytes;
        let cache_svc = CacheServer::new(service::CacheService::new(state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin_svc = AdminServer::new(admin::AdminService::new(state.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let mut tasks = Vec::new();

        let mut tcp = None;
        if let Some(addr) = config.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            tcp = Some(listener.local_addr()?);
            let mut builder = transport().tcp_nodelay(true);
            if let Some(tls) = &config.tls {
                let cert = std::fs::read(&tls.cert)
                    .with_context(|| format!("reading {}", tls.cert.display()))?;
                let key = std::fs::read(&tls.key)
                    .with_context(|| format!("reading {}", tls.key.display()))?;
                builder = builder
                    .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                    .context("TLS settings")?;
            }
            let router = builder
                .add_service(cache_svc.clone())
                .add_service(admin_svc.clone());
            let incoming = TcpListenerStream::new(listener);
            tasks.push(tokio::spawn(
                router.serve_with_incoming_shutdown(incoming, wait_for(stopped.clone())),
            ));
        }

        let unix_path = config.unix_socket_path();
        let _ = std::fs::remove_file(&unix_path);
        let unix_listener = tokio::net::UnixListener::bind(&unix_path)
            .with_context(|| format!("binding {}", unix_path.display()))?;
        let router = transport().add_service(cache_svc).add_service(admin_svc);
        tasks.push(tokio::spawn(router.serve_with_incoming_shutdown(
            UnixListenerStream::new(unix_listener),
            wait_for(stopped.clone()),
        )));

        let mut background = Vec::new();
        let local_path = config.local_socket_path();
        if let Some(path) = &local_path {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            background.push(tokio::spawn(local::serve(
                listener,
                service::CacheService::new(state.clone()),
                max,
                stopped.clone(),
            )));
        }
        let mut metrics = None;
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            metrics = Some(listener.local_addr()?);
            let st = state.clone();
            let render: http::Render = Arc::new(move || render_metrics(&st));
            background.push(tokio::spawn(http::serve(listener, render)));
        }
        let st = state.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let st = st.clone();
                let _ = tokio::task::spawn_blocking(move || st.sweep()).await;
            }
        }));
        Ok(Server {
            tcp,
            unix: Some(unix_path),
            local: local_path,
            metrics,
            state,
            stop,
            tasks,
            background,
        })
    }

    /// The line a supervisor (or a test) waits for.
    pub fn ready_line(&self) -> String {
        let mut line = String::from("READY");
        if let Some(a) = self.tcp {
            let _ = write!(line, " tcp={a}");
        }
        if let Some(p) = &self.unix {
            let _ = write!(line, " unix={}", p.display());
        }
        if let Some(p) = &self.local {
            let _ = write!(line, " local={}", p.display());
        }
        if let Some(a) = self.metrics {
            let _ = write!(line, " metrics={a}");
        }
        line
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.state.cache
    }

    /// Stops accepting, lets calls in flight finish, writes every page that
    /// has no disk copy to disk, and releases the listeners.
    pub async fn shutdown(self) -> anyhow::Result<usize> {
        let _ = self.stop.send(true);
        // Calls in flight get a grace period; a client that keeps an idle
        // connection open must not hold the shutdown (and the persist) up.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for mut t in self.tasks {
            match tokio::time::timeout_at(deadline, &mut t).await {
                Ok(joined) => joined.context("a listener task failed")??,
                Err(_) => {
                    tracing::warn!("connections still open after the grace period: closing them");
                    t.abort();
                }
            }
        }
        for b in self.background {
            b.abort();
        }
        for p in [&self.unix, &self.local].into_iter().flatten() {
            let _ = std::fs::remove_file(p);
        }
        let cache = self.state.cache.clone();
        let persisted = tokio::task::spawn_blocking(move || cache.persist()).await?;
        Ok(persisted)
    }
}

/// HTTP/2 settings for block-sized messages: windows far above h2's 64 KiB
/// default (which would throttle a stream of MiB blocks to a trickle) and
/// large frames.
fn transport() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// How long a shutdown waits for calls in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Per-stream HTTP/2 flow-control window.
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Per-connection HTTP/2 flow-control window.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame.
pub const MAX_FRAME: u32 = 1 << 20;

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// What tests put in place of the real disk I/O or GPU.
#[derive(Default)]
struct TestHooks {
    disk_io: Option<Arc<dyn tiers::io::FileIo>>,
    device: Option<Arc<dyn tiers::BlockPool>>,
}

fn render_metrics(state: &State) -> String {
    let mut out = String::new();
    state.metrics.render(&mut out);
    let index = state.cache.index().stats();
    let cs = state.cache.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metrics::gauge_header(&mut out, "radixkv_pages", "Cached pages, by tier.");
    for t in Tier::ALL {
        let _ = writeln!(
            out,
            "radixkv_pages{{tier=\"{}\"}} {}",
            t.name(),
            index.tier_pages[t.index()]
        );
    }
    // The pools' own count: equal to radixkv_pages per tier when the index
    // and the tiers agree (no block leaked, none indexed without a slot).
    metrics::gauge_header(
        &mut out,
        "radixkv_blocks_used",
        "Block slots in use in each tier's pool.",
    );
    let cache = &state.cache;
    if let Some(device) = cache.device_pool() {
        let _ = writeln!(
            out,
            "radixkv_blocks_used{{tier=\"device\"}} {}",
            device.used()
        );
    }
    let _ = writeln!(
        out,
        "radixkv_blocks_used{{tier=\"host\"}} {}",
        tiers::BlockPool::used(cache.host_pool())
    );
    if let Some(disk) = cache.disk_pool() {
        let _ = writeln!(
            out,
            "radixkv_blocks_used{{tier=\"disk\"}} {}",
            tiers::BlockPool::used(disk)
        );
    }
    metrics::counter_header(
        &mut out,
        "radixkv_evictions_total",
        "Copies dropped by eviction, by tier.",
    );
    for t in Tier::ALL {
        let _ = writeln!(
            out,
            "radixkv_evictions_total{{tier=\"{}\"}} {}",
            t.name(),
            index.evicted_copies[t.index()]
        );
    }
    let bb = state.block_bytes() as u64;
    metrics::counter_header(
        &mut out,
        "radixkv_moved_bytes_total",
        "Block bytes moved between tiers, by direction.",
    );
    for (dir, n) in [
        ("down", load(&cs.demotions)),
        ("up", load(&cs.promotions)),
        ("write_through", load(&cs.write_throughs)),
    ] {
        let _ = writeln!(
            out,
            "radixkv_moved_bytes_total{{direction=\"{dir}\"}} {}",
            n * bb
        );
    }
    metrics::counter_header(
        &mut out,
        "radixkv_corrupt_blocks_total",
        "Blocks that failed their checksum and became misses.",
    );
    let _ = writeln!(
        out,
        "radixkv_corrupt_blocks_total {}",
        load(&cs.corrupt_blocks)
    );
    metrics::counter_header(&mut out, "radixkv_io_errors_total", "Tier I/O errors.");
    let _ = writeln!(out, "radixkv_io_errors_total {}", load(&cs.io_errors));
    metrics::gauge_header(
        &mut out,
        "radixkv_pinned_bytes",
        "Bytes of pages pinned by leases and session pins, by tenant.",
    );
    for t in state.namespaces.tenants() {
        let pinned = state.cache.index().tenant_pinned_pages(&t);
        let _ = writeln!(
            out,
            "radixkv_pinned_bytes{{tenant=\"{t}\"}} {}",
            pinned * bb
        );
    }
    metrics::gauge_header(&mut out, "radixkv_leases", "Leases and pins held.");
    let _ = writeln!(out, "radixkv_leases {}", state.leases.total());
    metrics::gauge_header(&mut out, "radixkv_event_subscribers", "Events subscribers.");
    let _ = writeln!(out, "radixkv_event_subscribers {}", state.bus.subscribers());
    metrics::counter_header(
        &mut out,
        "radixkv_event_subscribers_cut_off_total",
        "Subscribers cut off for reading too slowly.",
    );
    let _ = writeln!(
        out,
        "radixkv_event_subscribers_cut_off_total {}",
        state.bus.cut_off.load(Ordering::Relaxed)
    );
    metrics::gauge_header(&mut out, "radixkv_index_memory_bytes", "The index's heap.");
    let _ = writeln!(out, "radixkv_index_memory_bytes {}", index.memory_bytes);
    out
}
