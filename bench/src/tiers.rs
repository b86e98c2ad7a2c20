//! `bench tiers`: the `Cache` facade over real pools (host RAM, a disk
//! directory on the real file system).
//!
//! - **Lookup latency under a demotion storm.** One thread matches a cached
//!   prompt over and over, first with the cache idle, then while a second
//!   thread stores a stream of new prompts into a full host tier, so that
//!   every store demotes pages host→disk (and the full disk evicts). Bytes
//!   never move under an index lock, so the lookups' tail should barely
//!   move: the target is p99 under the storm within 2× of idle.
//! - **Warm restart.** A disk tier holding many small blocks is closed and
//!   reopened; `Cache::open` reads the journal back and rebuilds the index.

use crate::report::Percentiles;
use anyhow::{ensure, Context, Result};
use cache_server::{Cache, CacheConfig, LookupOptions, WriteMode};
use radix_tree::{Match, NamespaceId, Tier};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tiers::BlockPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Lookup latency, idle and under a demotion storm.
    Latency,
    /// Warm restart from the disk tier.
    Restart,
}

#[derive(Debug, clap::Args)]
pub struct TiersArgs {
    /// Directory for the disk tiers' temporary files. Use a real file
    /// system (ext4, xfs: O_DIRECT), not tmpfs such as /dev/shm.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Run one part only.
    #[arg(long, value_enum)]
    pub only: Option<Part>,
    /// Tokens per page.
    #[arg(long, default_value_t = 16)]
    pub page_size: usize,
    /// Latency: host RAM, in blocks.
    #[arg(long, default_value_t = 4096)]
    pub host_blocks: usize,
    /// Latency: disk tier, in blocks.
    #[arg(long, default_value_t = 8192)]
    pub disk_blocks: usize,
    /// Latency: bytes per block.
    #[arg(long, default_value_t = 32 << 10)]
    pub block_bytes: usize,
    /// Latency: tokens of the cached prompt the lookups match.
    #[arg(long, default_value_t = 8192)]
    pub prompt_tokens: usize,
    /// Latency: tokens of each prompt the storm stores.
    #[arg(long, default_value_t = 1024)]
    pub storm_prompt_tokens: usize,
    /// Latency: the storm stores into another tenant's namespace instead of
    /// the prompt's own (separates index lock contention from the rest).
    #[arg(long)]
    pub separate_namespace: bool,
    /// Latency: cap the storm's stores at this many MB/s of new blocks (0:
    /// as fast as it goes), to compare runs at one demotion rate.
    #[arg(long, default_value_t = 0.0)]
    pub storm_mb_per_s: f64,
    /// Latency: seconds of each phase (idle, then storm).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Restart: blocks on disk.
    #[arg(long, default_value_t = 100_000)]
    pub restart_blocks: usize,
    /// Restart: bytes per block.
    #[arg(long, default_value_t = 4096)]
    pub restart_block_bytes: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct OpLatency {
    op: &'static str,
    idle: Percentiles,
    storm: Percentiles,
    /// p99 under the storm over p99 idle.
    p99_ratio: f64,
}

#[derive(Debug, Serialize)]
struct LatencyReport {
    page_size: usize,
    block_bytes: usize,
    host_blocks: u32,
    disk_blocks: u32,
    disk_direct_io: bool,
    prompt_pages: usize,
    ops: Vec<OpLatency>,
    storm_seconds: f64,
    storm_prompts: u64,
    storm_pages_stored: u64,
    demotions: u64,
    demoted_mb_per_s: f64,
    /// Disk write I/Os that carried the demoted blocks (adjacent slots of a
    /// demotion batch go in one).
    disk_write_ios: u64,
    disk_evictions: u64,
    io_errors: u64,
    /// Lookups that did not match the whole prompt (should be none).
    short_matches: u64,
    /// Pages of the prompt still on host after the storm.
    prompt_pages_on_host_after: usize,
}

#[derive(Debug, Serialize)]
struct RestartReport {
    blocks: usize,
    block_bytes: usize,
    page_size: usize,
    slot_bytes: u64,
    disk_direct_io: bool,
    build_seconds: f64,
    build_blocks_per_s: f64,
    journal_bytes: u64,
    close_seconds: f64,
    open_seconds: f64,
    open_blocks_per_s: f64,
    pages_back: u64,
}

#[derive(Debug, Default, Serialize)]
struct TiersReport {
    cores: usize,
    latency: Option<LatencyReport>,
    restart: Option<RestartReport>,
}

pub fn run(args: &TiersArgs) -> Result<()> {
    ensure!(args.page_size > 0, "--page-size must be above zero");
    let mut report = TiersReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..TiersReport::default()
    };
    if args.only != Some(Part::Restart) {
        let r = latency(args)?;
        print!("{}", latency_table(&r));
        report.latency = Some(r);
    }
    if args.only != Some(Part::Latency) {
        let r = restart(args)?;
        print!("{}", restart_table(&r));
        report.restart = Some(r);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Bytes of one disk slot for blocks of `block_bytes` (block, header and
/// metadata, rounded up), read from a throwaway pool.
pub(crate) fn slot_bytes(dir: &Path, page_size: usize, block_bytes: usize) -> Result<u64> {
    let probe = tempfile::tempdir_in(dir)?;
    let cache = Cache::open(
        CacheConfig::builder(page_size, block_bytes, "probe")
            .host_bytes(block_bytes)
            .disk(probe.path(), 64 * (block_bytes as u64 + (64 << 10)))
            .build()?,
    )?;
    Ok(cache.disk_pool().expect("configured").slot_bytes())
}

/// `pages` pages of distinct tokens, from `base`.
fn tokens(base: u32, pages: usize, page_size: usize) -> Vec<u32> {
    (0..(pages * page_size) as u32)
        .map(|i| base.wrapping_add(i))
        .collect()
}

// ---- lookup latency under a demotion storm ----------------------------------

fn latency(args: &TiersArgs) -> Result<LatencyReport> {
    let ps = args.page_size;
    let bb = args.block_bytes;
    let prompt_pages = args.prompt_tokens / ps;
    let storm_pages = (args.storm_prompt_tokens / ps).max(1);
    ensure!(prompt_pages > 0, "--prompt-tokens is less than a page");
    ensure!(
        prompt_pages + storm_pages <= args.host_blocks,
        "host ({} blocks) must hold the prompt ({prompt_pages} pages) and a storm prompt",
        args.host_blocks
    );
    let slot = slot_bytes(&args.dir, ps, bb)?;
    let dir = tempfile::tempdir_in(&args.dir).context("creating the disk tier's directory")?;
    let cache = Cache::open(
        CacheConfig::builder(ps, bb, "bench-tiers")
            .host_bytes(args.host_blocks * bb)
            .disk(dir.path(), args.disk_blocks as u64 * slot)
            .write_mode(WriteMode::WriteBack)
            .build()?,
    )?;
    let ns = cache.namespace("bench", "model", "")?;
    let storm_ns = if args.separate_namespace {
        cache.namespace("storm", "model", "")?
    } else {
        ns
    };
    let disk = cache.disk_pool().expect("configured");
    eprintln!(
        "latency: host {} x {} KiB blocks, disk {} blocks in {} (O_DIRECT: {})",
        cache.host_pool().capacity(),
        bb >> 10,
        disk.capacity(),
        dir.path().display(),
        disk.is_direct()
    );

    // Fill host and half the disk, then store the prompt the lookups match.
    let storm_data: Vec<u8> = (0..storm_pages * bb).map(|i| (i / 4096) as u8).collect();
    let mut next_prompt = 0u32;
    let mut store_storm_prompt = |cache: &Cache| -> Result<usize> {
        let t = tokens(
            next_prompt * storm_pages as u32 * ps as u32,
            storm_pages,
            ps,
        );
        next_prompt += 1;
        Ok(cache.store(storm_ns, &t, 0, &storm_data)?.stored_pages)
    };
    let mut filled = 0;
    while filled < args.host_blocks + args.disk_blocks / 2 {
        filled += store_storm_prompt(&cache)?;
    }
    let prompt = tokens(0xC000_0000, prompt_pages, ps);
    let prompt_data: Vec<u8> = (0..prompt_pages * bb).map(|i| (i >> 12) as u8).collect();
    cache.store(ns, &prompt, 0, &prompt_data)?;
    let m = cache.index().match_prefix(ns, &prompt)?;
    ensure!(m.pages == prompt_pages, "the prompt did not stay cached");
    ensure!(
        m.fastest_pages[Tier::Host.index()] == prompt_pages,
        "the prompt is not all on host"
    );

    let short = AtomicU64::new(0);
    let idle = measure(&cache, ns, &prompt, args.seconds, &short)?;
    eprintln!("latency: idle phase done, storm phase...");

    let stop = AtomicBool::new(false);
    let stats = cache.stats();
    let demotions_before = stats.demotions.load(Ordering::Relaxed);
    let evictions_before = cache.index().stats().evicted_copies[Tier::Disk.index()];
    let write_ios_before = disk.stats().write_ios;
    let (storm, storm_run) = std::thread::scope(|s| -> Result<_> {
        let writer = s.spawn(|| -> Result<(u64, u64, f64)> {
            let start = Instant::now();
            let (mut prompts, mut pages) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                pages += store_storm_prompt(&cache)? as u64;
                prompts += 1;
                if args.storm_mb_per_s > 0.0 {
                    let due = (pages * bb as u64) as f64 / (args.storm_mb_per_s * 1e6);
                    let ahead = due - start.elapsed().as_secs_f64();
                    if ahead > 0.0 {
                        std::thread::sleep(Duration::from_secs_f64(ahead));
                    }
                }
            }
            Ok((prompts, pages, start.elapsed().as_secs_f64()))
        });
        // Let the storm get going before measuring, looking the prompt up
        // meanwhile as the measurement will: a prompt left untouched that
        // long falls to the bottom of the LRU order and is demoted before
        // the measurement starts.
        let measured = measure(&cache, ns, &prompt, 0.2, &short)
            .and_then(|_| measure(&cache, ns, &prompt, args.seconds, &short));
        stop.store(true, Ordering::Relaxed);
        let run = writer.join().expect("the storm thread panicked")?;
        Ok((measured?, run))
    })?;
    let (storm_prompts, storm_pages_stored, storm_seconds) = storm_run;
    let demotions = stats.demotions.load(Ordering::Relaxed) - demotions_before;
    let after = cache.index().match_prefix(ns, &prompt)?;
    let ops = ["match_prefix", "lookup"]
        .into_iter()
        .zip(idle.into_iter().zip(storm))
        .map(|(op, (idle, storm))| {
            let idle = Percentiles::of(idle);
            let storm = Percentiles::of(storm);
            OpLatency {
                op,
                p99_ratio: storm.p99_us / idle.p99_us,
                idle,
                storm,
            }
        })
        .collect();
    Ok(LatencyReport {
        page_size: ps,
        block_bytes: bb,
        host_blocks: cache.host_pool().capacity(),
        disk_blocks: disk.capacity(),
        disk_direct_io: disk.is_direct(),
        prompt_pages,
        ops,
        storm_seconds,
        storm_prompts,
        storm_pages_stored,
        demotions,
        demoted_mb_per_s: (demotions * bb as u64) as f64 / storm_seconds / 1e6,
        disk_write_ios: disk.stats().write_ios - write_ios_before,
        disk_evictions: cache.index().stats().evicted_copies[Tier::Disk.index()] - evictions_before,
        io_errors: stats.io_errors.load(Ordering::Relaxed),
        short_matches: short.load(Ordering::Relaxed),
        prompt_pages_on_host_after: after.fastest_pages[Tier::Host.index()],
    })
}

/// For `seconds`, alternately matches the prompt in the index and looks it
/// up through the facade (no lease); returns the latencies of each, in ns.
fn measure(
    cache: &Cache,
    ns: NamespaceId,
    prompt: &[u32],
    seconds: f64,
    short: &AtomicU64,
) -> Result<[Vec<u64>; 2]> {
    let want = prompt.len() / cache.config().page_size();
    let mut m = Match::default();
    let mut out = [Vec::with_capacity(1 << 20), Vec::with_capacity(1 << 20)];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        for _ in 0..64 {
            let t = Instant::now();
            cache.index().match_prefix_into(ns, prompt, &mut m)?;
            out[0].push(t.elapsed().as_nanos() as u64);
            let t = Instant::now();
            let l = cache.lookup(ns, prompt, LookupOptions::default())?;
            out[1].push(t.elapsed().as_nanos() as u64);
            if m.pages != want || l.pages != want {
                short.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(out)
}

fn latency_table(r: &LatencyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "lookup latency: {}-token prompt ({} pages of {}), host {} x {} KiB blocks, disk {} blocks (O_DIRECT: {})",
        r.prompt_pages * r.page_size,
        r.prompt_pages,
        r.page_size,
        r.host_blocks,
        r.block_bytes >> 10,
        r.disk_blocks,
        r.disk_direct_io
    );
    let _ = writeln!(
        s,
        "{:<13} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "op", "phase", "samples", "p50 us", "p99 us", "p999 us", "max us"
    );
    for op in &r.ops {
        for (phase, p) in [("idle", &op.idle), ("storm", &op.storm)] {
            let _ = writeln!(
                s,
                "{:<13} {:<6} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                op.op, phase, p.samples, p.p50_us, p.p99_us, p.p999_us, p.max_us
            );
        }
    }
    let _ = writeln!(
        s,
        "storm: {} prompts, {} pages stored in {:.1} s; {} demotions host->disk ({:.0} MB/s, {} disk writes), {} disk evictions, {} I/O errors",
        r.storm_prompts,
        r.storm_pages_stored,
        r.storm_seconds,
        r.demotions,
        r.demoted_mb_per_s,
        r.disk_write_ios,
        r.disk_evictions,
        r.io_errors
    );
    // A storm that evicted the prompt made the lookups shorter, not the
    // index faster: such a ratio says nothing about the target.
    let verdict = |ratio: f64| match (r.short_matches > 0, ratio <= 2.0) {
        (true, _) => "  NOT VALID (the prompt was evicted during the storm)",
        (false, true) => "",
        (false, false) => "  MISSED",
    };
    for op in &r.ops {
        let _ = writeln!(
            s,
            "p99 storm / idle, {}: {:.2}x (target <= 2x){}",
            op.op,
            op.p99_ratio,
            verdict(op.p99_ratio)
        );
    }
    let _ = writeln!(
        s,
        "prompt pages on host after the storm: {} of {}",
        r.prompt_pages_on_host_after, r.prompt_pages
    );
    if r.short_matches > 0 {
        let _ = writeln!(
            s,
            "warning: {} lookups matched less than the whole prompt",
            r.short_matches
        );
    }
    s
}

// ---- warm restart ---------------------------------------------------------------

fn restart(args: &TiersArgs) -> Result<RestartReport> {
    let ps = args.page_size;
    let bb = args.restart_block_bytes;
    let blocks = args.restart_blocks;
    ensure!(blocks > 0, "--restart-blocks must be above zero");
    let slot = slot_bytes(&args.dir, ps, bb)?;
    let dir = tempfile::tempdir_in(&args.dir).context("creating the disk tier's directory")?;
    let host_blocks = blocks.min(8192);
    let config = CacheConfig::builder(ps, bb, "bench-restart")
        .host_bytes(host_blocks * bb)
        .disk(dir.path(), blocks as u64 * slot)
        .write_mode(WriteMode::WriteThrough)
        .build()?;

    // Prompts of 64 pages sharing an 8-page system prompt.
    const SYSTEM: usize = 8;
    const PROMPT: usize = 64;
    let page_data: Vec<u8> = (0..PROMPT * bb).map(|i| (i * 7 / 4096) as u8).collect();
    let build = Instant::now();
    let cache = Cache::open(config.clone())?;
    let ns = cache.namespace("bench", "model", "")?;
    let disk = cache.disk_pool().expect("configured");
    eprintln!(
        "restart: writing {blocks} blocks of {} KiB to {} (O_DIRECT: {})...",
        bb >> 10,
        dir.path().display(),
        disk.is_direct()
    );
    let system = tokens(0xF000_0000, SYSTEM.min(blocks), ps);
    cache.store(ns, &system, 0, &page_data[..system.len() / ps * bb])?;
    let mut stored = system.len() / ps;
    let mut id = 0u32;
    let mut first = None;
    while stored < blocks {
        let own = (PROMPT - SYSTEM).min(blocks - stored);
        let mut t = system.clone();
        t.extend(tokens(id * 4096, own, ps));
        id += 1;
        let out = cache.store(ns, &t, SYSTEM, &page_data[..own * bb])?;
        ensure!(
            out.stored_pages == own,
            "a store kept {} of {own} pages",
            out.stored_pages
        );
        stored += own;
        first.get_or_insert(t);
    }
    cache.flush();
    let build_seconds = build.elapsed().as_secs_f64();
    let on_disk = cache.index().tier_pages(Tier::Disk);
    ensure!(
        on_disk == blocks as u64 && disk.used() as usize == blocks,
        "{on_disk} pages on disk, {} slots used, {blocks} wanted ({} I/O errors)",
        disk.used(),
        cache.stats().io_errors.load(Ordering::Relaxed)
    );
    let journal_bytes = disk.stats().journal_bytes;
    let disk_direct_io = disk.is_direct();

    let close = Instant::now();
    drop(cache);
    let close_seconds = close.elapsed().as_secs_f64();

    let open = Instant::now();
    let cache = Cache::open(config)?;
    let open_seconds = open.elapsed().as_secs_f64();
    let pages_back = cache.index().stats().pages;
    ensure!(
        pages_back == blocks as u64,
        "{pages_back} of {blocks} pages came back"
    );
    if let Some(t) = first {
        let ns = cache.namespace("bench", "model", "")?;
        let l = cache.lookup(ns, &t, LookupOptions::default())?;
        ensure!(l.pages == t.len() / ps, "a prompt came back short");
        ensure!(
            l.fastest_pages()[Tier::Disk.index()] == l.pages,
            "a prompt is not on disk"
        );
    }
    Ok(RestartReport {
        blocks,
        block_bytes: bb,
        page_size: ps,
        slot_bytes: slot,
        disk_direct_io,
        build_seconds,
        build_blocks_per_s: blocks as f64 / build_seconds,
        journal_bytes,
        close_seconds,
        open_seconds,
        open_blocks_per_s: blocks as f64 / open_seconds,
        pages_back,
    })
}

fn restart_table(r: &RestartReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "warm restart: {} blocks of {} KiB (page {}, {} KiB slots, O_DIRECT: {}), journal {:.1} MB",
        r.blocks,
        r.block_bytes >> 10,
        r.page_size,
        r.slot_bytes >> 10,
        r.disk_direct_io,
        r.journal_bytes as f64 / 1e6
    );
    let _ = writeln!(s, "{:<34} {:>9} {:>12}", "step", "seconds", "blocks/s");
    let _ = writeln!(
        s,
        "{:<34} {:>9.3} {:>12.0}",
        "build (write-through, flushed)", r.build_seconds, r.build_blocks_per_s
    );
    let _ = writeln!(
        s,
        "{:<34} {:>9.3} {:>12}",
        "close (drop: flush, sync)", r.close_seconds, "-"
    );
    let _ = writeln!(
        s,
        "{:<34} {:>9.3} {:>12.0}",
        "Cache::open (journal -> index)", r.open_seconds, r.open_blocks_per_s
    );
    let _ = writeln!(s, "pages back: {} of {}", r.pages_back, r.blocks);
    s
}
