//! `bench`: replays KV-cache workloads through radixkv's index and reports
//! hit rates against the infinite-cache ceiling and the offline optimum.

mod belady;
mod capacity;
mod chart;
mod engine_bench;
mod openai;
#[cfg(feature = "dynamo")]
mod peer_dynamo;
mod peer_llama;
mod peer_redis;
mod policy_lab;
mod progress;
mod replay;
mod report;
mod sidecar;
mod svg;
mod tiered;
mod tiers;
mod trace;
mod workload;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use replay::PolicyChoice;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    version,
    about = "Benchmark radixkv's KV-cache index on real and generated workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a Mooncake-format trace, or a generated workload, through the
    /// index: hit rate per policy and capacity, beside the infinite-cache
    /// ceiling and the offline optimum (Belady).
    Replay(ReplayArgs),
    /// Replay a trace or generated workload through the real cache with
    /// device, host and disk tiers: hit tokens per tier, bytes moved per
    /// direction, demotions and promotions, and the time a cost model says
    /// was saved, per policy beside the infinite-cache ceiling and the
    /// offline optimum (Belady).
    Tiered(tiered::TieredArgs),
    /// Generate a workload (multi-round chat, agentic tool loops,
    /// long-document QA) and write it as a Mooncake-format trace, so that
    /// runs are repeatable. Deterministic for a seed.
    Gen(GenArgs),
    /// Benchmark the cache's tiers (host RAM and a disk directory): lookup
    /// latency percentiles over a cached 8k-token prompt, idle and while
    /// another thread's stores force continuous demotion host->disk
    /// (target: p99 under the storm within 2x of idle); and a warm restart,
    /// reopening a disk tier of 100k blocks and rebuilding the index.
    Tiers(tiers::TiersArgs),
    /// Benchmark the gRPC sidecar in this process through its Rust client:
    /// lookup latency of a cached 8k-token prompt over the Unix socket;
    /// load throughput over gRPC and shared memory beside memcpy and Redis
    /// GET of the same blocks (Redis is installed and started on loopback);
    /// and 64 concurrent clients mixing lookups, loads and stores.
    Sidecar(sidecar::SidecarArgs),
    /// radixkv's decode engine beside llama.cpp's server on the same GGUF
    /// (both started here, one after the other, 2 threads each): cold
    /// prefill, decode with one and many streams, warm TTFT over a cached
    /// system prompt, and agent sessions sharing a system prompt taking
    /// turns; each figure beside llama.cpp's with the ratio. llama.cpp is
    /// built by scripts/llama-cpp when missing.
    Engine(engine_bench::EngineArgs),
    /// Try eviction ideas in seconds: a block-level simulator with the
    /// replay's semantics (it reproduces the index's LRU and Belady hit
    /// rates) runs candidate policies that are not in the index, beside
    /// hindsight references. Prints hit rate per capacity and the ratio to
    /// Belady.
    PolicyLab(PolicyLabArgs),
    /// Draw a chart (SVG) from an earlier run's JSON: the latency CDF of
    /// each call of `bench sidecar --json`.
    Chart(chart::ChartArgs),
}

#[derive(Debug, clap::Args)]
struct GenArgs {
    /// The workload to generate.
    #[arg(value_enum)]
    workload: workload::Kind,
    /// Tokens per block of the trace's hash ids (Mooncake traces use 512).
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// The trace file to write (JSON lines).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    params: workload::WorkloadArgs,
}

#[derive(Debug, clap::Args, serde::Serialize)]
struct ReplayArgs {
    #[command(flatten)]
    source: workload::SourceArgs,
    /// Cache capacities in tokens, comma separated (SI suffixes: 1M = 10^6).
    #[arg(long, default_value = "1M,3M,10M")]
    capacity: String,
    /// Tokens per trace block (Mooncake traces use 512).
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// Policies to replay, comma separated, or `all`.
    #[arg(long, default_value = "all")]
    policy: String,
    /// Also replay the offline optimum (Belady) at each capacity.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    belady: bool,
    /// Replay each configuration this many times and keep the fastest
    /// (hit rates are identical across repeats; timings on a shared machine are not).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write the results as JSON to this file (and, unless --svg says
    /// otherwise, a chart next to it with the extension .svg).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the hit-rate chart (SVG) to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Also replay the trace through Dynamo's router index (needs the
    /// `dynamo` cargo feature).
    #[arg(long)]
    peer: bool,
}

#[derive(Debug, clap::Args)]
struct PolicyLabArgs {
    #[command(flatten)]
    source: workload::SourceArgs,
    /// Cache capacities in tokens, comma separated (SI suffixes: 1M = 10^6).
    #[arg(long, default_value = "1M,3M,10M")]
    capacity: String,
    /// Tokens per trace block (Mooncake traces use 512).
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// Candidates, comma separated, or `all` (`--list` names them).
    #[arg(long, default_value = "all")]
    policy: String,
    /// List the candidates and exit.
    #[arg(long)]
    list: bool,
    /// Also print, per candidate and capacity, the hit rate of first
    /// returns, second returns, ... (which reuse each policy catches).
    #[arg(long)]
    by_use: bool,
    /// Also print whether a document's past rate of use predicts the gap
    /// to its next use (its uses in thirds by rate, median gap in each).
    #[arg(long)]
    gaps: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Replay(args) => run_replay(args),
        Command::Tiered(args) => tiered::run(&args),
        Command::Gen(args) => run_gen(&args),
        Command::Tiers(args) => tiers::run(&args),
        Command::Sidecar(args) => sidecar::run(&args),
        Command::Engine(args) => engine_bench::run(&args),
        Command::Chart(args) => chart::run(&args),
        Command::PolicyLab(args) => run_policy_lab(&args),
    }
}

fn policies(list: &str) -> Result<Vec<PolicyChoice>> {
    if list == "all" {
        return Ok(radix_tree::policy::POLICY_NAMES
            .iter()
            .map(|n| PolicyChoice::Online(n.to_string()))
            .collect());
    }
    list.split(',')
        .map(|n| {
            let n = n.trim();
            if n == "belady" {
                Ok(PolicyChoice::Belady)
            } else if radix_tree::policy::by_name(n).is_some() {
                Ok(PolicyChoice::Online(n.to_string()))
            } else {
                bail!(
                    "unknown policy {n:?}; known: {}, belady",
                    radix_tree::policy::POLICY_NAMES.join(", ")
                )
            }
        })
        .collect()
}

fn run_replay(args: ReplayArgs) -> Result<()> {
    let caps = capacity::parse_list(&args.capacity, args.block_tokens)?;
    let mut choices = policies(&args.policy)?;
    if args.belady && !choices.contains(&PolicyChoice::Belady) {
        choices.push(PolicyChoice::Belady);
    }
    let run = report::RunInfo::collect(serde_json::to_value(&args)?);
    let source = args.source.load(args.block_tokens)?;
    let trace = &source.trace;
    let prep = replay::Prepared::new(trace.as_tokens()?)
        .with_output(trace.requests.iter().map(|r| r.output_length));
    eprintln!(
        "{}: {} requests, {} blocks, {} distinct",
        source.label,
        trace.requests.len(),
        trace.total_blocks(),
        trace.distinct_blocks()
    );
    let repeat = args.repeat.max(1);
    let best = |choice: &PolicyChoice, cap: Option<u64>| {
        (0..repeat)
            .map(|_| replay::replay(&prep, choice, cap))
            .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
            .expect("at least one run")
    };
    // The unbounded replay is also the speed figure; with a peer, the two
    // alternate run by run so that a busy moment hurts both alike.
    let unbounded = PolicyChoice::Online("lru".into());
    let (ceiling, peer) = if args.peer {
        let requests: Vec<Vec<u64>> = trace.requests.iter().map(|r| r.hash_ids.clone()).collect();
        let mut ours: Option<replay::ReplayResult> = None;
        let mut theirs: Option<report::PeerFigures> = None;
        for _ in 0..repeat {
            let r = replay::replay(&prep, &unbounded, None);
            if ours.as_ref().is_none_or(|b| r.seconds < b.seconds) {
                ours = Some(r);
            }
            let p = run_peer(&requests)?;
            if theirs.as_ref().is_none_or(|b| p.seconds < b.seconds) {
                theirs = Some(p);
            }
        }
        (ours.expect("at least one run"), theirs)
    } else {
        (best(&unbounded, None), None)
    };
    let mut results = Vec::new();
    let total = caps.len() * choices.len();
    let mut progress = progress::Progress::new();
    for cap in &caps {
        for choice in &choices {
            let k = results.len() + 1;
            progress.show(|| format!("[{k}/{total}] {} at {}", choice.name(), cap.label));
            results.push((cap.clone(), best(choice, Some(cap.blocks))));
        }
    }
    progress.clear();
    let report = report::Report::new(
        run,
        &source.label,
        source.workload,
        args.block_tokens,
        ceiling,
        results,
        peer,
    );
    print!("{}", report.table());
    report::write_outputs(
        &report,
        &report.chart(),
        args.json.as_deref(),
        args.svg.as_deref(),
    )
}

fn run_policy_lab(args: &PolicyLabArgs) -> Result<()> {
    if args.list {
        for (name, what) in policy_lab::CANDIDATES {
            println!("{name:18} {what}");
        }
        return Ok(());
    }
    let caps = capacity::parse_list(&args.capacity, args.block_tokens)?;
    let names: Vec<&str> = if args.policy == "all" {
        policy_lab::CANDIDATES.iter().map(|(n, _)| *n).collect()
    } else {
        args.policy.split(',').map(str::trim).collect()
    };
    let source = args.source.load(args.block_tokens)?;
    let w = policy_lab::World::with_output(
        &source.trace.as_tokens()?,
        source
            .trace
            .requests
            .iter()
            .map(|r| r.output_length)
            .collect(),
    );
    for name in &names {
        if policy_lab::candidate(name, &w, 1).is_none() {
            bail!("unknown candidate {name:?}; `bench policy-lab --list` names them");
        }
    }
    let bound: Vec<f64> = caps
        .iter()
        .map(|c| policy_lab::simulate(&w, &mut policy_lab::Belady, c.blocks).hit_rate())
        .collect();
    println!(
        "{}: {} requests, {} distinct blocks",
        source.label,
        w.reqs.len(),
        w.blocks()
    );
    print!("{:18}", "candidate");
    for c in &caps {
        print!(" {:>7}", c.label);
    }
    println!("   of belady at each");
    let mut by_use = Vec::new();
    for name in &names {
        print!("{name:18}");
        let mut ratios = Vec::new();
        for (c, b) in caps.iter().zip(&bound) {
            let mut p = policy_lab::candidate(name, &w, c.blocks).expect("checked above");
            let res = policy_lab::simulate(&w, p.as_mut(), c.blocks);
            let r = res.hit_rate();
            print!(" {r:7.3}");
            ratios.push(format!("{:.3}", r / b.max(f64::MIN_POSITIVE)));
            by_use.push((name, &c.label, res.by_use));
        }
        println!("   {}", ratios.join(" "));
    }
    if args.by_use {
        println!("\nhit rate by the family's use number (return 1 = its second request)");
        print!("{:18} {:>8}", "candidate", "capacity");
        for k in 1..policy_lab::USE_SLOTS {
            let plus = if k + 1 == policy_lab::USE_SLOTS {
                "+"
            } else {
                " "
            };
            print!("  return {k}{plus}");
        }
        println!();
        for (name, cap, slots) in by_use {
            print!("{name:18} {cap:>8}");
            for (hit, blocks) in &slots[1..] {
                print!(" {:>10.3}", *hit as f64 / (*blocks).max(1) as f64);
            }
            println!();
        }
    }
    if args.gaps {
        print_gaps_by_rate(&w);
    }
    Ok(())
}

fn print_gaps_by_rate(w: &policy_lab::World) {
    println!("\nnext use of a document used k or more times, by its past rate (thirds; the last quarter of the trace left out)");
    println!(
        "{:>3} {:>6} {:>10} {:>16} {:>6}",
        "k", "third", "past rate", "median next gap", "uses"
    );
    for k in [2, 4] {
        let Some(thirds) = policy_lab::next_gap_by_rate(w, k) else {
            println!("{k:>3}  too few returns");
            continue;
        };
        for (name, t) in ["low", "mid", "high"].iter().zip(thirds) {
            println!(
                "{k:>3} {name:>6} {:>10.4} {:>16} {:>6}",
                t.rate, t.gap, t.uses
            );
        }
    }
}

fn run_gen(args: &GenArgs) -> Result<()> {
    let w = args.params.generate(args.workload, args.block_tokens)?;
    workload::write_jsonl(&w.trace, &args.out)?;
    let prep = replay::Prepared::new(w.trace.as_tokens()?);
    let ceiling = replay::replay(&prep, &PolicyChoice::Online("lru".into()), None);
    let tokens: u64 = w.trace.requests.iter().map(|r| r.input_length).sum();
    println!(
        "{} workload: {} requests, {} input tokens, {} blocks of {} tokens ({} distinct); infinite-cache hit rate {:.3}",
        w.name,
        w.trace.requests.len(),
        tokens,
        w.trace.total_blocks(),
        w.block_tokens,
        w.trace.distinct_blocks(),
        ceiling.hit_rate
    );
    println!("parameters: {}", w.params);
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

#[cfg(feature = "dynamo")]
fn run_peer(requests: &[Vec<u64>]) -> Result<report::PeerFigures> {
    let r = peer_dynamo::replay_dynamo(requests)?;
    // Block operations as for radixkv: every block looked up, plus every block stored.
    let ops = r.blocks + (r.blocks - r.hit_blocks);
    Ok(report::PeerFigures {
        name: "dynamo-kv-router 1.6.1 RadixTree".into(),
        requests: r.requests,
        hit_blocks: r.hit_blocks,
        seconds: r.seconds,
        requests_per_second: r.requests as f64 / r.seconds,
        block_ops_per_second: ops as f64 / r.seconds,
    })
}

#[cfg(not(feature = "dynamo"))]
fn run_peer(_: &[Vec<u64>]) -> Result<report::PeerFigures> {
    bail!("--peer needs the peer compiled in: cargo run --release -p bench --features dynamo -- replay --peer")
}
