//! `bench sidecar`: the gRPC sidecar, started in this process, driven by
//! the Rust client as an engine would, with baselines measured in the same
//! run.
//!
//! - **Lookup latency**: an 8k-token cached prompt looked up over the Unix
//!   socket, one call at a time (target: p50 at most 100 µs).
//! - **Load throughput** per block size, counting only bytes the client has
//!   copied into its own buffer: over gRPC streams, over shared memory, a
//!   plain `memcpy` of the same bytes, and Redis GET of the same blocks
//!   (the same Rust harness, the `redis` crate, the same connection count).
//!   Targets: shared memory at least 70% of memcpy and 2x Redis; gRPC at
//!   least Redis.
//! - **Mixed load**: many concurrent clients mixing lookups, loads and
//!   stores: errors, throughput, latency percentiles per call, and the
//!   process's memory against the configured caps.

use crate::peer_redis::RedisServer;
use crate::report::{self, Percentiles, RunInfo};
use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use cache_server::client::{Client, Scope, SharedTier};
use cache_server::local::LocalClient;
use cache_server::server::{Server, ServerConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Grpc,
    Shm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Lookup,
    Load,
    Mixed,
}

#[derive(Debug, clap::Args, Serialize)]
pub struct SidecarArgs {
    /// Run one part only.
    #[arg(long, value_enum)]
    pub only: Option<Part>,
    /// Load: block sizes, comma separated (K and M suffixes are KiB and MiB).
    #[arg(long, default_value = "256K,1M,2M")]
    pub block_sizes: String,
    /// Load: bytes of blocks each measurement cycles through.
    #[arg(long, default_value_t = 128 << 20)]
    pub load_bytes: usize,
    /// Load: concurrent clients (and Redis connections, and memcpy threads).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds per load measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Skip the Redis peer (no install, no server).
    #[arg(long)]
    pub no_redis: bool,
    /// Lookup: tokens of the cached prompt.
    #[arg(long, default_value_t = 8192)]
    pub prompt_tokens: usize,
    /// Lookup: calls measured.
    #[arg(long, default_value_t = 20_000)]
    pub lookups: usize,
    /// Mixed: concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub mixed_clients: usize,
    /// Mixed: seconds.
    #[arg(long, default_value_t = 60.0)]
    pub mixed_seconds: f64,
    /// Mixed: turns per second over all clients (each turn: lookup with a
    /// lease, load the tail, release, store the new pages); 0 runs closed
    /// loop, each client starting its next turn when the last ends. At a
    /// rate, a turn's lookup latency counts from when the turn was due, so
    /// a server that falls behind shows it (no coordinated omission).
    #[arg(long, default_value_t = 0.0)]
    pub mixed_rate: f64,
    /// Mixed: how blocks move: over gRPC streams, or through the
    /// shared-memory host tier (LoadShm and ReserveShm + CommitShm).
    #[arg(long, value_enum, default_value = "grpc")]
    pub transport: Transport,
    /// Directory for the servers' data (disk tier, socket).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Lookup and mixed: drive a running radixkv-server instead of one in
    /// this process (`unix:/path` or `host:port`, the server's default
    /// tenant; its page and block size are read from Info; lookup needs
    /// room for the prompt, mixed for its 64-page system prompt).
    #[arg(long)]
    pub connect: Option<String>,
    /// Lookup: with `--connect`, also measure that server's local socket
    /// (`cache_server::local`) at this path.
    #[arg(long)]
    pub connect_local: Option<PathBuf>,
    /// Worker threads of the runtime the server and the clients share.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// Write the results as JSON to this file (with the commit, the
    /// configuration and the machine), and the latency CDF chart beside it
    /// (extension .svg) unless --svg says where.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency CDF chart (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
struct Report {
    run: RunInfo,
    results: Results,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    lookup: Option<LookupResult>,
    load: Vec<LoadResult>,
    mixed: Option<MixedResult>,
}

#[derive(Debug, Serialize)]
struct LookupResult {
    prompt_tokens: usize,
    /// An empty call (Health): the transport's own round trip, measured
    /// in the same run as the floor the lookup is compared with.
    health: Percentiles,
    lookup: Percentiles,
    lookup_with_lease: Percentiles,
    /// The same three calls over the local socket (no HTTP/2), measured in
    /// blocks alternating with the gRPC ones.
    local: Option<LocalLookup>,
}

#[derive(Debug, Serialize)]
struct LocalLookup {
    health: Percentiles,
    lookup: Percentiles,
    lookup_with_lease: Percentiles,
}

#[derive(Debug, Serialize)]
struct LoadResult {
    block_bytes: usize,
    clients: usize,
    memcpy_gbps: f64,
    shm_gbps: f64,
    grpc_unix_gbps: f64,
    grpc_tcp_gbps: f64,
    redis_gbps: Option<f64>,
    /// Stores of new prompts (`store_pages` each, evicting old ones once
    /// the host tier is full), in GB/s handed to the server: streamed over gRPC
    /// on the Unix socket, and written into reserved shared-memory slots
    /// (ReserveShm + CommitShm); the peer is Redis SET of the same blocks.
    store_pages: usize,
    store_grpc_gbps: f64,
    store_shm_gbps: f64,
    redis_set_gbps: Option<f64>,
}

#[derive(Debug, Serialize)]
struct MixedResult {
    clients: usize,
    transport: Transport,
    /// Turns per second asked for (0: closed loop) and achieved.
    target_turns_per_s: f64,
    turns_per_s: f64,
    seconds: f64,
    calls: u64,
    errors: u64,
    calls_per_s: f64,
    lookup: Percentiles,
    load: Percentiles,
    store: Percentiles,
    peak_rss_bytes: u64,
    /// RSS after the first tenth of the run and at the end: flat memory
    /// means these stay close once the host tier has filled.
    rss_early_bytes: u64,
    rss_end_bytes: u64,
    /// The in-process server's host tier (unknown with --connect).
    cap_bytes: Option<u64>,
    /// Leases still held once every client finished (each released its
    /// own): anything but zero is a leak.
    leases_left: u64,
    /// Host slots in use at the end beyond the pages the index holds
    /// (unknown against a server in another process).
    slots_leaked: Option<i64>,
}

fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    Ok(num
        .parse::<usize>()
        .with_context(|| format!("size {s:?}"))?
        * mult)
}

/// A server in this process with one block size and shared memory.
async fn start_server(
    dir: &std::path::Path,
    page_size: usize,
    block_bytes: usize,
    host_bytes: usize,
) -> Result<Server> {
    let mut config = ServerConfig {
        listen: Some("127.0.0.1:0".parse()?),
        metrics_listen: None,
        data_dir: dir.to_path_buf(),
        page_size,
        block_bytes,
        host_bytes,
        disk_bytes: 0,
        ..ServerConfig::default()
    };
    config.limits.max_message_bytes = (block_bytes + (1 << 20)).max(64 << 20);
    let shm_dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        dir.to_path_buf()
    };
    config.shm_path = Some(shm_dir.join(format!(
        "radixkv-bench-{}-{block_bytes}",
        std::process::id()
    )));
    Server::start(config).await
}

pub fn run(args: &SidecarArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads)
        .enable_all()
        .build()?;
    let mut results = Results::default();
    let parts = |p: Part| args.only.is_none_or(|o| o == p);
    if parts(Part::Lookup) {
        let dir = tempfile::tempdir_in(&args.dir)?;
        let (ps, bb) = (16, 4096);
        let pages = args.prompt_tokens / ps;
        results.lookup = Some(runtime.block_on(async {
            if let Some(target) = &args.connect {
                return lookup_latency(args, target, args.connect_local.clone(), ps, bb).await;
            }
            let server = start_server(dir.path(), ps, bb, (pages + 64) * bb).await?;
            let unix = format!("unix:{}", server.unix.as_ref().unwrap().display());
            let r = lookup_latency(args, &unix, server.local.clone(), ps, bb).await;
            server.shutdown().await?;
            r
        })?);
    }
    if parts(Part::Load) {
        let redis = if args.no_redis {
            None
        } else {
            Some(RedisServer::start()?)
        };
        for size in args.block_sizes.split(',') {
            let bb = parse_size(size)?;
            results
                .load
                .push(runtime.block_on(load_throughput(args, bb, redis.as_ref()))?);
        }
    }
    if parts(Part::Mixed) {
        results.mixed = Some(runtime.block_on(mixed(args))?);
    }
    print!("{}", table(&results));
    let report = Report {
        run: RunInfo::collect(serde_json::to_value(args)?),
        results,
    };
    let chart = crate::chart::sidecar_cdf(&serde_json::to_value(&report)?);
    if !chart.series.is_empty() {
        report::write_outputs(&report, &chart, args.json.as_deref(), args.svg.as_deref())?;
    } else if let Some(path) = &args.json {
        // Load throughput only: no latencies to chart.
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

async fn lookup_latency(
    args: &SidecarArgs,
    target: &str,
    local: Option<PathBuf>,
    ps: usize,
    bb: usize,
) -> Result<LookupResult> {
    let pages = args.prompt_tokens / ps;
    let client = Client::connect(target, None).await?;
    let scope = Scope::model("bench");
    let tokens: Vec<u32> = (0..args.prompt_tokens as u32).collect();
    let data = Bytes::from(vec![7u8; pages * bb]);
    client.store(&scope, &tokens, 0, data, bb).await?;
    let mut grpc = [Vec::new(), Vec::new(), Vec::new()];
    let mut over_local = [Vec::new(), Vec::new(), Vec::new()];
    let mut local = match local {
        Some(path) => Some(LocalClient::connect(path, None)?),
        None => None,
    };
    // Blocks of calls alternate between the transports, so both see the
    // same moments of a noisy machine; each block's first calls warm up.
    const BLOCK: usize = 1000;
    const WARMUP: usize = 100;
    for _ in 0..args.lookups.div_ceil(BLOCK) {
        for i in 0..BLOCK + WARMUP {
            let t = Instant::now();
            let hit = client.lookup(&scope, &tokens, None, false).await?;
            let took = t.elapsed().as_nanos() as u64;
            ensure!(hit.pages == pages, "the prompt is cached");
            if i < WARMUP {
                continue;
            }
            grpc[1].push(took);
            if i % 4 == 1 {
                let t = Instant::now();
                client.health().await?;
                grpc[0].push(t.elapsed().as_nanos() as u64);
            }
            if i % 4 == 0 {
                let t = Instant::now();
                let hit = client.lookup(&scope, &tokens, Some(5_000), false).await?;
                client.release(hit.lease.unwrap()).await?;
                grpc[2].push(t.elapsed().as_nanos() as u64);
            }
        }
        if let Some(c) = local.take() {
            // A blocking client: off the runtime's workers, which the
            // server in this process needs.
            let (scope, tokens) = (scope.clone(), tokens.clone());
            let (c, samples) = tokio::task::spawn_blocking(move || {
                local_block(c, &scope, &tokens, pages, BLOCK, WARMUP)
            })
            .await??;
            for (all, block) in over_local.iter_mut().zip(samples) {
                all.extend(block);
            }
            local = Some(c);
        }
    }
    let [health, lookup, leased] = grpc;
    let [l_health, l_lookup, l_leased] = over_local;
    Ok(LookupResult {
        prompt_tokens: args.prompt_tokens,
        health: Percentiles::of(health),
        lookup: Percentiles::of(lookup),
        lookup_with_lease: Percentiles::of(leased),
        local: (!l_lookup.is_empty()).then(|| LocalLookup {
            health: Percentiles::of(l_health),
            lookup: Percentiles::of(l_lookup),
            lookup_with_lease: Percentiles::of(l_leased),
        }),
    })
}

/// One block of local-socket calls: (health, lookup, lookup+lease+release)
/// latencies in nanoseconds, after `warmup` unmeasured lookups.
fn local_block(
    mut c: LocalClient,
    scope: &Scope,
    tokens: &[u32],
    pages: usize,
    calls: usize,
    warmup: usize,
) -> Result<(LocalClient, [Vec<u64>; 3])> {
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for i in 0..calls + warmup {
        let t = Instant::now();
        let hit = c.lookup(scope, tokens, None, false)?;
        let took = t.elapsed().as_nanos() as u64;
        ensure!(hit.pages == pages, "the prompt is cached");
        if i < warmup {
            continue;
        }
        out[1].push(took);
        if i % 4 == 1 {
            let t = Instant::now();
            c.health()?;
            out[0].push(t.elapsed().as_nanos() as u64);
        }
        if i % 4 == 0 {
            let t = Instant::now();
            let hit = c.lookup(scope, tokens, Some(5_000), false)?;
            c.release(hit.lease.unwrap())?;
            out[2].push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok((c, out))
}

/// Bytes per second of `threads` threads each running `work` (which
/// returns bytes copied per call) for `seconds`.
fn rate_threads<F>(threads: usize, seconds: f64, work: F) -> f64
where
    F: Fn(usize) -> usize + Send + Sync,
{
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, total, work) = (&stop, &total, &work);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    total.fetch_add(work(t) as u64, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn load_throughput(
    args: &SidecarArgs,
    bb: usize,
    redis: Option<&RedisServer>,
) -> Result<LoadResult> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let ps = 16;
    let pages = (args.load_bytes / bb).max(4);
    let server = start_server(dir.path(), ps, bb, (pages + 8) * bb).await?;
    let unix = format!("unix:{}", server.unix.as_ref().unwrap().display());
    let tcp = server.tcp.unwrap().to_string();
    let client = Client::connect(&unix, None).await?;
    let scope = Scope::model("bench");
    let tokens: Vec<u32> = (0..(pages * ps) as u32).collect();
    let blocks: Vec<u8> = (0..pages * bb).map(|i| (i * 31 % 251) as u8).collect();
    let blocks = Bytes::from(blocks);
    // Store in parts that fit one message each.
    let step = (32 << 20) / bb;
    for first in (0..pages).step_by(step.max(1)) {
        let end = (first + step).min(pages);
        client
            .store(
                &scope,
                &tokens[..end * ps],
                first,
                blocks.slice(first * bb..end * bb),
                bb,
            )
            .await?;
    }
    let secs = args.seconds;
    let threads = args.clients;

    // memcpy: the same bytes, from a private buffer to another.
    let memcpy = {
        let src = blocks.clone();
        rate_threads(threads, secs, move |_| {
            let mut dst = vec![0u8; bb];
            let mut n = 0;
            for p in 0..pages {
                dst.copy_from_slice(&src[p * bb..(p + 1) * bb]);
                n += bb;
            }
            std::hint::black_box(&dst);
            n
        })
    };

    // Shared memory: LoadShm offsets under a lease, then copy from the mapping.
    let info = client.info(&scope).await?;
    let shm = Arc::new(SharedTier::open(&info)?);
    let shm_rate = {
        let mut leases = Vec::new();
        for _ in 0..threads {
            let hit = client.lookup(&scope, &tokens, Some(600_000), false).await?;
            ensure!(
                hit.pages == pages,
                "all pages cached ({} of {pages})",
                hit.pages
            );
            leases.push(hit.lease.unwrap());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for lease in leases.iter().copied() {
            let (client, shm, stop, total) =
                (client.clone(), shm.clone(), stop.clone(), total.clone());
            tasks.push(tokio::spawn(async move {
                let mut dst = vec![0u8; bb];
                while !stop.load(Ordering::Relaxed) {
                    let offsets = client.load_shm(lease, 0, 0).await?;
                    let shm = shm.clone();
                    let mut d = std::mem::take(&mut dst);
                    let n = tokio::task::spawn_blocking(move || {
                        for &o in &offsets {
                            d.copy_from_slice(shm.block(o).expect("a slot"));
                        }
                        (offsets.len() * bb, d)
                    })
                    .await?;
                    dst = n.1;
                    total.fetch_add(n.0 as u64, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        let rate = rate_after(secs, start, &stop, &total, tasks).await?;
        for l in leases {
            client.release(l).await?;
        }
        rate
    };

    let grpc_unix = grpc_rate(&unix, &scope, &tokens, pages, bb, threads, secs).await?;
    let grpc_tcp = grpc_rate(&tcp, &scope, &tokens, pages, bb, threads, secs).await?;
    // Stores last: they evict the pages the loads read. Up to 8 pages a
    // call, fewer where all clients' reservations would not fit the tier.
    let store_pages = ((pages + 8) / (2 * threads)).clamp(1, 8);
    let store_grpc = store_rate(&unix, None, bb, store_pages, threads, secs).await?;
    let store_shm = store_rate(&unix, Some(shm.clone()), bb, store_pages, threads, secs).await?;
    server.shutdown().await?;

    let redis_rate = match redis {
        None => None,
        Some(r) => {
            let mut c = r.connection()?;
            let _: () = redis::cmd("FLUSHALL").query(&mut c)?;
            for p in 0..pages {
                let _: () = redis::cmd("SET")
                    .arg(format!("block:{bb}:{p}"))
                    .arg(&blocks[p * bb..(p + 1) * bb])
                    .query(&mut c)?;
            }
            let conns: Vec<parking_lot::Mutex<redis::Connection>> = (0..threads)
                .map(|_| r.connection().map(parking_lot::Mutex::new))
                .collect::<Result<_>>()?;
            let rate = rate_threads(threads, secs, |t| {
                let mut conn = conns[t].lock();
                let mut dst = vec![0u8; bb];
                let mut n = 0;
                for p in 0..pages {
                    let v: Vec<u8> = redis::cmd("GET")
                        .arg(format!("block:{bb}:{p}"))
                        .query(&mut *conn)
                        .expect("redis GET");
                    dst.copy_from_slice(&v);
                    n += v.len();
                }
                n
            });
            // SET: each connection overwrites its own cycle of keys.
            let set_rate = rate_threads(threads, secs, |t| {
                let mut conn = conns[t].lock();
                let mut n = 0;
                for p in 0..store_pages {
                    let _: () = redis::cmd("SET")
                        .arg(format!("set:{bb}:{t}:{p}"))
                        .arg(&blocks[p * bb % blocks.len()..][..bb])
                        .query(&mut *conn)
                        .expect("redis SET");
                    n += bb;
                }
                n
            });
            let _: () = redis::cmd("FLUSHALL").query(&mut c)?;
            Some((rate, set_rate))
        }
    };
    Ok(LoadResult {
        block_bytes: bb,
        clients: threads,
        memcpy_gbps: memcpy / 1e9,
        shm_gbps: shm_rate / 1e9,
        grpc_unix_gbps: grpc_unix / 1e9,
        grpc_tcp_gbps: grpc_tcp / 1e9,
        redis_gbps: redis_rate.map(|r| r.0 / 1e9),
        store_pages,
        store_grpc_gbps: store_grpc / 1e9,
        store_shm_gbps: store_shm / 1e9,
        redis_set_gbps: redis_rate.map(|r| r.1 / 1e9),
    })
}

/// Bytes per second that `threads` clients hand the server as stores of
/// new `pages`-page prompts: gRPC streams, or (with `shm`) writes into
/// reserved shared-memory slots committed by CommitShm.
async fn store_rate(
    target: &str,
    shm: Option<Arc<SharedTier>>,
    bb: usize,
    pages: usize,
    threads: usize,
    secs: f64,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let scope = Scope::model("bench-store");
    let mut tasks = Vec::new();
    let start = Instant::now();
    for t in 0..threads {
        let client = Client::connect(target, None).await?;
        let (stop, total, scope, shm) = (stop.clone(), total.clone(), scope.clone(), shm.clone());
        tasks.push(tokio::spawn(async move {
            let block = vec![t as u8; bb];
            let data = Bytes::from(block.repeat(pages));
            let mut round = 0u32;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                // A prompt nobody stored: its first token is new.
                let first = (t as u32) << 24 | round;
                let tokens: Vec<u32> = std::iter::once(first)
                    .chain(1..(pages * 16) as u32)
                    .collect();
                let stored = match &shm {
                    None => client.store(&scope, &tokens, 0, data.clone(), bb).await?,
                    Some(shm) => {
                        let (reservation, offsets) = client.reserve_shm(pages, 10_000).await?;
                        for &o in &offsets {
                            shm.write(o, &block)?;
                        }
                        client.commit_shm(reservation, &scope, &tokens, 0).await?
                    }
                };
                ensure!(stored.stored_pages == pages, "a new prompt is stored whole");
                total.fetch_add((pages * bb) as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    rate_after(secs, start, &stop, &total, tasks).await
}

/// Lets `tasks` run for `secs`, stops them through `stop`, and returns the
/// bytes per second they added to `total` since `start`.
async fn rate_after(
    secs: f64,
    start: Instant,
    stop: &AtomicBool,
    total: &AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
) -> Result<f64> {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Bytes per second that `threads` clients (one connection each) copy
/// out of Load streams over the whole cached range.
async fn grpc_rate(
    target: &str,
    scope: &Scope,
    tokens: &[u32],
    pages: usize,
    bb: usize,
    threads: usize,
    secs: f64,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..threads {
        let client = Client::connect(target, None).await?;
        let hit = client.lookup(scope, tokens, Some(600_000), false).await?;
        ensure!(hit.pages == pages, "all pages cached");
        let lease = hit.lease.unwrap();
        let (stop, total) = (stop.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut dst = vec![0u8; bb];
            while !stop.load(Ordering::Relaxed) {
                let n = client
                    .load_each(lease, 0, 0, |_, data| dst.copy_from_slice(data))
                    .await?;
                total.fetch_add((n * bb) as u64, Ordering::Relaxed);
            }
            client.release(lease).await?;
            anyhow::Ok(())
        }));
    }
    rate_after(secs, start, &stop, &total, tasks).await
}

/// A client's latency samples, at most `SAMPLES_KEPT` of them (a uniform
/// reservoir), so that a long soak measures the server's memory, not a
/// growing list of samples.
#[derive(Debug, Default)]
struct Samples {
    kept: Vec<u64>,
    seen: u64,
    rng: u64,
}

const SAMPLES_KEPT: usize = 20_000;

impl Samples {
    fn add(&mut self, ns: u64) {
        self.seen += 1;
        if self.kept.len() < SAMPLES_KEPT {
            self.kept.push(ns);
            return;
        }
        // xorshift64*, seeded by the count: reproducible, cheap.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ self.seen;
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let pick = x.wrapping_mul(0x2545_F491_4F6C_DD1D) % self.seen;
        if (pick as usize) < SAMPLES_KEPT {
            self.kept[pick as usize] = ns;
        }
    }
}

/// The resident set size of this process, in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn mixed(args: &SidecarArgs) -> Result<MixedResult> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let host_bytes = 256 << 20;
    let server = match args.connect {
        Some(_) => None,
        None => Some(start_server(dir.path(), 16, 64 << 10, host_bytes).await?),
    };
    let target = match (&args.connect, &server) {
        (Some(t), _) => t.clone(),
        (None, Some(s)) => format!("unix:{}", s.unix.as_ref().unwrap().display()),
        (None, None) => unreachable!("a server was started"),
    };
    let scope = Scope::model("bench");
    let setup = Client::connect(&target, None).await?;
    let info = setup.info(&scope).await?;
    let (ps, bb) = (info.page_size, info.block_bytes);
    let shm = match args.transport {
        Transport::Grpc => None,
        Transport::Shm => Some(Arc::new(SharedTier::open(&info).context(
            "--transport shm needs the server's shared-memory host tier (shm_path)",
        )?)),
    };
    // A shared system prompt of 64 pages, and per-client suffixes.
    let system: Vec<u32> = (0..64 * ps as u32).collect();
    setup
        .store(&scope, &system, 0, Bytes::from(vec![1u8; 64 * bb]), bb)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let turns = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(rss_bytes()));
    // Open loop: each client's turns fall due at an even share of the rate,
    // the clients' schedules staggered across one interval.
    let interval = (args.mixed_rate > 0.0)
        .then(|| Duration::from_secs_f64(args.mixed_clients as f64 / args.mixed_rate));
    let began = tokio::time::Instant::now();
    let clients = args.mixed_clients as f64;
    let mut tasks = Vec::new();
    for c in 0..args.mixed_clients {
        let client = Client::connect(&target, None).await?;
        let (stop, errors, calls, turns, scope, system, shm) = (
            stop.clone(),
            errors.clone(),
            calls.clone(),
            turns.clone(),
            scope.clone(),
            system.clone(),
            shm.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat: [Samples; 3] = Default::default();
            let mut round = 0u32;
            let mut due = interval.map(|iv| began + iv.mul_f64(c as f64 / clients));
            let fail = |ok: bool| {
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let t = match (due, interval) {
                    (Some(at), Some(iv)) => {
                        tokio::time::sleep_until(at).await;
                        due = Some(at + iv);
                        at.into_std()
                    }
                    _ => Instant::now(),
                };
                round += 1;
                // This client's next turn: the system prompt, then 4 pages of its own.
                let mut tokens = system.clone();
                tokens.extend(
                    (0..4 * ps as u32).map(|i| 1_000_000 + c as u32 * 100_000 + round * 100 + i),
                );
                let hit = client.lookup(&scope, &tokens, Some(10_000), false).await;
                lat[0].add(t.elapsed().as_nanos() as u64);
                calls.fetch_add(1, Ordering::Relaxed);
                let Ok(hit) = hit else {
                    fail(false);
                    continue;
                };
                if let Some(lease) = hit.lease {
                    let t = Instant::now();
                    let first = hit.pages.saturating_sub(8);
                    let n = hit.pages - first;
                    let ok = match &shm {
                        None => client
                            .load_each(lease, first, n, |_, d| {
                                std::hint::black_box(d);
                            })
                            .await
                            .is_ok(),
                        Some(shm) => match client.load_shm(lease, first, n).await {
                            Ok(offsets) => offsets
                                .iter()
                                .all(|&o| shm.block(o).map(std::hint::black_box).is_ok()),
                            Err(_) => false,
                        },
                    };
                    fail(ok);
                    lat[1].add(t.elapsed().as_nanos() as u64);
                    fail(client.release(lease).await.is_ok());
                    calls.fetch_add(2, Ordering::Relaxed);
                }
                let pages = tokens.len() / ps;
                if hit.pages < pages {
                    let t = Instant::now();
                    let block = vec![round as u8; bb];
                    let n = pages - hit.pages;
                    let ok = match &shm {
                        None => {
                            let data = Bytes::from(block.repeat(n));
                            client
                                .store(&scope, &tokens, hit.pages, data, bb)
                                .await
                                .is_ok()
                        }
                        Some(shm) => match client.reserve_shm(n, 10_000).await {
                            Ok((reservation, offsets)) => {
                                offsets.iter().all(|&o| shm.write(o, &block).is_ok())
                                    && client
                                        .commit_shm(reservation, &scope, &tokens, hit.pages)
                                        .await
                                        .is_ok()
                            }
                            Err(_) => false,
                        },
                    };
                    fail(ok);
                    lat[2].add(t.elapsed().as_nanos() as u64);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                turns.fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.mixed_seconds);
    let early_at = start + Duration::from_secs_f64(args.mixed_seconds / 10.0);
    let mut rss_early = 0;
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = rss_bytes();
        peak.fetch_max(rss, Ordering::Relaxed);
        if rss_early == 0 && Instant::now() >= early_at {
            rss_early = rss;
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "mixed: {:.0} s, {} calls, {} errors, RSS {} MiB",
                start.elapsed().as_secs_f64(),
                calls.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                rss >> 20
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut all: [Vec<u64>; 3] = Default::default();
    for t in tasks {
        let lat = t.await?;
        for (a, l) in all.iter_mut().zip(lat) {
            a.extend(l.kept);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let rss_end = rss_bytes();
    let stats = setup.stats().await?;
    let mut slots_leaked = None;
    if let Some(server) = server {
        use tiers::BlockPool;
        let host_used = i64::from(server.cache().host_pool().used());
        slots_leaked = Some(host_used - stats.tier_pages[radix_tree::Tier::Host.index()] as i64);
        server.shutdown().await?;
    }
    let [lookup, load, store] = all;
    let calls = calls.load(Ordering::Relaxed);
    Ok(MixedResult {
        clients: args.mixed_clients,
        transport: args.transport,
        target_turns_per_s: args.mixed_rate,
        turns_per_s: turns.load(Ordering::Relaxed) as f64 / seconds,
        seconds,
        calls,
        errors: errors.load(Ordering::Relaxed),
        calls_per_s: calls as f64 / seconds,
        lookup: Percentiles::of(lookup),
        load: Percentiles::of(load),
        store: Percentiles::of(store),
        peak_rss_bytes: peak.load(Ordering::Relaxed),
        rss_early_bytes: rss_early,
        rss_end_bytes: rss_end,
        cap_bytes: args.connect.is_none().then_some(host_bytes as u64),
        leases_left: stats.leases,
        slots_leaked,
    })
}

fn table(r: &Results) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(l) = &r.lookup {
        let _ = writeln!(
            out,
            "lookup of a cached {}-token prompt over the Unix socket (target p50 <= 100 us)",
            l.prompt_tokens
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "call", "p50 us", "p90 us", "p99 us", "p999 us", "max us"
        );
        let mut rows = vec![
            ("grpc health (floor)", &l.health),
            ("grpc lookup", &l.lookup),
            ("grpc lookup+lease+rel", &l.lookup_with_lease),
        ];
        if let Some(local) = &l.local {
            rows.extend([
                ("local health (floor)", &local.health),
                ("local lookup", &local.lookup),
                ("local lookup+lease+rel", &local.lookup_with_lease),
            ]);
        }
        for (name, p) in rows {
            let _ = writeln!(
                out,
                "  {name:<22} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us
            );
        }
        let verdict = |p50: f64| {
            if p50 <= 100.0 {
                "meets the target"
            } else {
                "MISSES the target"
            }
        };
        let _ = writeln!(
            out,
            "  grpc lookup p50 {}; {:.1}x its empty call's",
            verdict(l.lookup.p50_us),
            l.lookup.p50_us / l.health.p50_us
        );
        if let Some(local) = &l.local {
            let _ = writeln!(
                out,
                "  local lookup p50 {}; {:.1}x its empty call's, {:.2}x the grpc lookup's",
                verdict(local.lookup.p50_us),
                local.lookup.p50_us / local.health.p50_us,
                local.lookup.p50_us / l.lookup.p50_us
            );
        }
    }
    if !r.load.is_empty() {
        let _ = writeln!(
            out,
            "\nload throughput, GB/s copied into the client's buffer ({} clients)",
            r.load[0].clients
        );
        let _ = writeln!(
            out,
            "  {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>11}",
            "block",
            "memcpy",
            "shm",
            "grpc-uds",
            "grpc-tcp",
            "redis",
            "shm/memcpy",
            "shm/redis",
            "grpc/redis"
        );
        for l in &r.load {
            let redis = l.redis_gbps.unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "  {:>7}K {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8.2} {:>10.2} {:>10.2} {:>11.2}",
                l.block_bytes >> 10,
                l.memcpy_gbps,
                l.shm_gbps,
                l.grpc_unix_gbps,
                l.grpc_tcp_gbps,
                redis,
                l.shm_gbps / l.memcpy_gbps,
                l.shm_gbps / redis,
                l.grpc_unix_gbps.max(l.grpc_tcp_gbps) / redis
            );
        }
        let _ = writeln!(
            out,
            "  targets: shm/memcpy >= 0.70, shm/redis >= 2, grpc/redis >= 1"
        );
        let _ = writeln!(
            out,
            "\nstore throughput, GB/s handed to the server (new prompts of up to 8 pages, evicting)"
        );
        let _ = writeln!(
            out,
            "  {:>8} {:>9} {:>9} {:>9} {:>10} {:>11}",
            "block", "shm", "grpc-uds", "redis SET", "shm/redis", "grpc/redis"
        );
        for l in &r.load {
            let redis = l.redis_set_gbps.unwrap_or(f64::NAN);
            let _ = writeln!(
                out,
                "  {:>7}K {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>11.2}",
                l.block_bytes >> 10,
                l.store_shm_gbps,
                l.store_grpc_gbps,
                redis,
                l.store_shm_gbps / redis,
                l.store_grpc_gbps / redis
            );
        }
    }
    if let Some(m) = &r.mixed {
        let pace = if m.target_turns_per_s > 0.0 {
            format!("{:.0} turns/s asked", m.target_turns_per_s)
        } else {
            "closed loop".into()
        };
        let _ = writeln!(
            out,
            "\nmixed load over {:?}: {} clients for {:.0} s, {pace}: {:.0} turns/s, {} calls ({:.0}/s), {} errors; peak RSS {:.0} MiB{}",
            m.transport,
            m.clients,
            m.seconds,
            m.turns_per_s,
            m.calls,
            m.calls_per_s,
            m.errors,
            m.peak_rss_bytes as f64 / (1 << 20) as f64,
            m.cap_bytes.map_or(" (this process only)".into(), |c| format!(
                " (host tier {} MiB)",
                c >> 20
            ))
        );
        let leaked = m
            .slots_leaked
            .map_or("unknown (server in another process)".to_string(), |n| {
                n.to_string()
            });
        let _ = writeln!(
            out,
            "  RSS {:.0} MiB after a tenth of the run, {:.0} MiB at the end; leases left {}, host slots leaked {leaked}",
            m.rss_early_bytes as f64 / (1 << 20) as f64,
            m.rss_end_bytes as f64 / (1 << 20) as f64,
            m.leases_left,
        );
        for (name, p) in [
            ("lookup", &m.lookup),
            ("load", &m.load),
            ("store", &m.store),
        ] {
            let _ = writeln!(
                out,
                "  {name:<8} p50 {:>8.1} us  p90 {:>8.1}  p99 {:>8.1}  p999 {:>8.1}  ({} samples)",
                p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.samples
            );
        }
    }
    out
}
