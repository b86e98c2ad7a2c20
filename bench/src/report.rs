//! Replay results as a terminal table and as JSON.

use crate::capacity::Capacity;
use crate::replay::ReplayResult;
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

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

#[derive(Debug, Serialize)]
pub struct Report {
    pub trace: String,
    pub block_tokens: u64,
    pub cores: usize,
    /// The infinite cache: hit rate ceiling and unbounded replay speed.
    pub ceiling: ReplayResult,
    pub capacities: Vec<CapacityRow>,
    pub peer: Option<PeerFigures>,
}

impl Report {
    pub fn new(
        trace: &Path,
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
            trace: trace.display().to_string(),
            block_tokens,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
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
        let _ = writeln!(
            s,
            "{:<10} {:<10} {:>9} {:>10} {:>10} {:>13}",
            "capacity", "policy", "hit rate", "of belady", "of ceiling", "requests/s"
        );
        for row in &self.capacities {
            let bound = self.belady(row);
            for r in &row.results {
                let of_bound = bound.map_or("-".to_string(), |b| format!("{:.3}", r.hit_rate / b));
                let _ = writeln!(
                    s,
                    "{:<10} {:<10} {:>9.3} {:>10} {:>10.3} {:>13.0}",
                    row.capacity,
                    r.policy,
                    r.hit_rate,
                    of_bound,
                    r.hit_rate / self.ceiling.hit_rate,
                    r.requests_per_second
                );
            }
        }
        s
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Percentiles of latencies given in nanoseconds.
    pub fn of(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        let at = |q: f64| {
            let i = ((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1e3
        };
        Self {
            samples: ns.len(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: ns.last().map_or(0.0, |&x| x as f64 / 1e3),
        }
    }
}
