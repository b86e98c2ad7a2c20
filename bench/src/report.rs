//! Results as a terminal table, JSON (with the run's commit, configuration
//! and machine) and an SVG chart.

use crate::capacity::Capacity;
use crate::replay::ReplayResult;
use serde::Serialize;
use std::fmt::Write;

/// A peer index's replay of the same trace (unbounded), for speed.
#[derive(Debug, Clone, Serialize)]
pub struct PeerFigures {
    pub name: String,
    pub requests: usize,
    pub hit_blocks: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub block_ops_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct CapacityRow {
    pub capacity: String,
    pub capacity_tokens: u64,
    pub capacity_blocks: u64,
    pub results: Vec<ReplayResult>,
}

/// What a run was: the commit, the full configuration, the machine.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `git rev-parse HEAD` at run time, or "unknown".
    pub commit: String,
    /// Uncommitted changes in the working tree (unknown without git).
    pub dirty: Option<bool>,
    pub bench_version: &'static str,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
    /// The command line as given.
    pub argv: Vec<String>,
    /// Every parameter, defaults included.
    pub config: serde_json::Value,
    pub machine: Machine,
}

/// The machine a run ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: usize,
    /// Processors listed in /proc/cpuinfo.
    pub cpus: Option<usize>,
    pub cpu_model: Option<String>,
    /// MemTotal from /proc/meminfo.
    pub memory_bytes: Option<u64>,
    pub os: &'static str,
    pub arch: &'static str,
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |line: &str, name: &str| {
            line.strip_prefix(name)
                .and_then(|r| r.trim_start().strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let cpus = cpuinfo
            .lines()
            .filter(|l| field(l, "processor").is_some())
            .count();
        let cpu_model = cpuinfo.lines().find_map(|l| field(l, "model name"));
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let kb = field(l, "MemTotal")?;
                    kb.trim_end_matches("kB").trim().parse::<u64>().ok()
                })
            })
            .map(|kb| kb * 1024);
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpus: (cpus > 0).then_some(cpus),
            cpu_model,
            memory_bytes,
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        }
    }
}

impl RunInfo {
    /// The run's facts, with `config` (the parsed arguments) as given.
    pub fn collect(config: serde_json::Value) -> Self {
        let commit = git(&["rev-parse", "HEAD"]);
        let dirty = commit
            .as_ref()
            .and_then(|_| git(&["status", "--porcelain", "--untracked-files=no"]))
            .map(|s| !s.is_empty());
        Self {
            commit: commit.unwrap_or_else(|| "unknown".into()),
            dirty,
            bench_version: env!("CARGO_PKG_VERSION"),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            argv: std::env::args().collect(),
            config,
            machine: Machine::detect(),
        }
    }
}

/// Writes `report` as JSON to `json` and `chart` as SVG to `svg`, or next
/// to the JSON file (extension `.svg`) when only `json` is given.
pub fn write_outputs<T: Serialize>(
    report: &T,
    chart: &crate::svg::Chart,
    json: Option<&std::path::Path>,
    svg: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(report)?)?;
        eprintln!("wrote {}", path.display());
    }
    let svg = svg
        .map(std::path::Path::to_path_buf)
        .or_else(|| json.map(|j| j.with_extension("svg")));
    if let Some(path) = svg {
        std::fs::write(&path, chart.render())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: RunInfo,
    pub trace: String,
    /// The generator's name and parameters, for a generated workload.
    pub workload: Option<crate::workload::Workload>,
    pub block_tokens: u64,
    /// The infinite cache: hit rate ceiling and unbounded replay speed.
    pub ceiling: ReplayResult,
    pub capacities: Vec<CapacityRow>,
    pub peer: Option<PeerFigures>,
}

impl Report {
    pub fn new(
        run: RunInfo,
        trace: &str,
        workload: Option<crate::workload::Workload>,
        block_tokens: u64,
        ceiling: ReplayResult,
        results: Vec<(Capacity, ReplayResult)>,
        peer: Option<PeerFigures>,
    ) -> Self {
        let mut capacities: Vec<CapacityRow> = Vec::new();
        for (cap, r) in results {
            match capacities.iter_mut().find(|c| c.capacity == cap.label) {
                Some(row) => row.results.push(r),
                None => capacities.push(CapacityRow {
                    capacity: cap.label,
                    capacity_tokens: cap.tokens,
                    capacity_blocks: cap.blocks,
                    results: vec![r],
                }),
            }
        }
        Self {
            run,
            trace: trace.to_string(),
            workload,
            block_tokens,
            ceiling,
            capacities,
            peer,
        }
    }

    /// Hit rate of the offline bound at a capacity, if it was replayed.
    pub fn belady(&self, row: &CapacityRow) -> Option<f64> {
        row.results
            .iter()
            .find(|r| r.policy == "belady")
            .map(|r| r.hit_rate)
    }

    /// Hit rate against capacity, per policy, with the ceiling.
    pub fn chart(&self) -> crate::svg::Chart {
        let mut series = Vec::new();
        for row in &self.capacities {
            for r in &row.results {
                let (name, bound) = if r.policy == "belady" {
                    ("belady (bound)", true)
                } else {
                    (r.policy.as_str(), false)
                };
                crate::svg::push_point(
                    &mut series,
                    name,
                    bound,
                    row.capacity_tokens as f64,
                    r.hit_rate,
                );
            }
        }
        crate::svg::Chart {
            title: format!("Replay: {}", self.trace),
            x_label: "capacity, tokens".into(),
            y_label: "hit rate".into(),
            series,
            hlines: vec![("infinite cache".into(), self.ceiling.hit_rate)],
        }
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "infinite cache: hit rate {:.3} ({} of {} blocks), unbounded replay {:.0} requests/s, {:.1}M block-ops/s",
            self.ceiling.hit_rate,
            self.ceiling.hit_blocks,
            self.ceiling.blocks,
            self.ceiling.requests_per_second,
            self.ceiling.block_ops_per_second / 1e6
        );
        if let Some(p) = &self.peer {
            let _ = writeln!(
                s,
                "peer {}: unbounded replay {:.0} requests/s, {:.1}M block-ops/s (radixkv/peer: {:.2}x)",
                p.name,
                p.requests_per_second,
                p.block_ops_per_second / 1e6,
                self.ceiling.requests_per_second / p.requests_per_second
            );
        }
        // With a peer, each bounded replay's speed also as a share of the
        // peer's unbounded one (the peer has no capacity limit to run at).
        let _ = write!(
            s,
            "{:<10} {:<10} {:>9} {:>10} {:>10} {:>13}",
            "capacity", "policy", "hit rate", "of belady", "of ceiling", "requests/s"
        );
        let _ = writeln!(s, "{}", if self.peer.is_some() { "  of peer" } else { "" });
        for row in &self.capacities {
            let bound = self.belady(row);
            for r in &row.results {
                let of_bound = bound.map_or("-".to_string(), |b| format!("{:.3}", r.hit_rate / b));
                let _ = write!(
                    s,
                    "{:<10} {:<10} {:>9.3} {:>10} {:>10.3} {:>13.0}",
                    row.capacity,
                    r.policy,
                    r.hit_rate,
                    of_bound,
                    r.hit_rate / self.ceiling.hit_rate,
                    r.requests_per_second
                );
                match &self.peer {
                    Some(p) => {
                        let of_peer = r.requests_per_second / p.requests_per_second;
                        let _ = writeln!(s, " {of_peer:>8.2}x");
                    }
                    None => s.push('\n'),
                }
            }
        }
        s
    }
}

/// Latency percentiles, in microseconds, and the CDF they come from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// `[quantile, microseconds]` at [`CDF_QUANTILES`] (those the samples
    /// can resolve): what a latency CDF chart draws.
    pub cdf: Vec<[f64; 2]>,
}

/// The quantiles a [`Percentiles::cdf`] keeps: every 5% through the body,
/// then denser into the tail, and the maximum.
pub const CDF_QUANTILES: [f64; 29] = [
    0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75,
    0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 0.995, 0.998, 0.999, 0.9999, 1.0,
];

impl Percentiles {
    /// Percentiles of latencies given in nanoseconds (at least one).
    pub fn of(mut ns: Vec<u64>) -> Self {
        assert!(!ns.is_empty(), "percentiles of no samples");
        ns.sort_unstable();
        let at = |q: f64| {
            let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1e3
        };
        // A tail quantile needs enough samples to differ from the maximum.
        let resolvable = |q: f64| q == 1.0 || (1.0 - q) * ns.len() as f64 >= 1.0 - 1e-9;
        Self {
            samples: ns.len(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
            cdf: CDF_QUANTILES
                .iter()
                .filter(|&&q| resolvable(q))
                .map(|&q| [q, at(q)])
                .collect(),
        }
    }
}
