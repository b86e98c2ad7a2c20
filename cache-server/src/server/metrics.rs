//! Counters and latency histograms, rendered in Prometheus' text format.

use parking_lot::Mutex;
use radix_tree::{Tier, TIERS};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 16] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 5.0,
];

/// The calls whose latency is measured.
pub const METHODS: [&str; 17] = [
    "Info",
    "Lookup",
    "Load",
    "LoadShm",
    "Store",
    "ReserveShm",
    "CommitShm",
    "Release",
    "Renew",
    "Pin",
    "Unpin",
    "Exists",
    "Get",
    "Set",
    "Stats",
    "Events",
    "Health",
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Per-tenant counters.
#[derive(Debug, Default)]
pub struct TenantCounters {
    pub lookups: AtomicU64,
    pub lookup_tokens: AtomicU64,
    /// Hit tokens by the fastest tier holding each page.
    pub hit_tokens: [AtomicU64; TIERS],
    pub loaded_bytes: AtomicU64,
    pub stored_pages: AtomicU64,
    pub quota_evictions: AtomicU64,
}

impl TenantCounters {
    /// Counts `pages` new pages, however they came in.
    pub fn add_stored(&self, pages: usize) {
        self.stored_pages.fetch_add(pages as u64, Ordering::Relaxed);
    }

    pub fn hit_total(&self) -> u64 {
        self.hit_tokens
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    tenants: Mutex<HashMap<Arc<str>, Arc<TenantCounters>>>,
    latency: [Histogram; METHODS.len()],
    errors: [AtomicU64; METHODS.len()],
    /// Bytes clients took over gRPC streams and through shared memory.
    pub grpc_load_bytes: AtomicU64,
    pub shm_load_bytes: AtomicU64,
    pub grpc_store_bytes: AtomicU64,
    pub shm_store_bytes: AtomicU64,
}

impl Metrics {
    pub fn tenant(&self, name: &str) -> Arc<TenantCounters> {
        let mut t = self.tenants.lock();
        if let Some(c) = t.get(name) {
            return c.clone();
        }
        let c = Arc::new(TenantCounters::default());
        t.insert(Arc::from(name), c.clone());
        c
    }

    pub fn tenant_names(&self) -> Vec<Arc<str>> {
        self.tenants.lock().keys().cloned().collect()
    }

    /// Records one call's latency and outcome.
    pub fn observe(&self, method: usize, took: Duration, ok: bool) {
        self.latency[method].observe(took);
        if !ok {
            self.errors[method].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a streamed answer that ended with an error status after
    /// its call was answered OK (and observed as such).
    pub fn stream_failed(&self, method: usize) {
        self.errors[method].fetch_add(1, Ordering::Relaxed);
    }

    /// The per-call and per-tenant series; the caller appends the cache's.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP radixkv_request_seconds Latency of each gRPC call.\n");
        out.push_str("# TYPE radixkv_request_seconds histogram\n");
        for (m, h) in METHODS.iter().zip(&self.latency) {
            let count = h.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let mut cumulative = 0;
            for (b, n) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "radixkv_request_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "radixkv_request_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {count}"
            );
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "radixkv_request_seconds_sum{{method=\"{m}\"}} {sum}");
            let _ = writeln!(
                out,
                "radixkv_request_seconds_count{{method=\"{m}\"}} {count}"
            );
        }
        counter_header(
            out,
            "radixkv_request_errors_total",
            "Calls answered with an error status.",
        );
        for (m, e) in METHODS.iter().zip(&self.errors) {
            let n = e.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "radixkv_request_errors_total{{method=\"{m}\"}} {n}");
            }
        }
        let tenants: Vec<(Arc<str>, Arc<TenantCounters>)> = self
            .tenants
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter_header(
            out,
            "radixkv_lookup_tokens_total",
            "Tokens asked for by lookups.",
        );
        for (t, c) in &tenants {
            let _ = writeln!(
                out,
                "radixkv_lookup_tokens_total{{tenant=\"{t}\"}} {}",
                load(&c.lookup_tokens)
            );
        }
        counter_header(
            out,
            "radixkv_hit_tokens_total",
            "Tokens found cached, by the fastest tier holding them.",
        );
        for (t, c) in &tenants {
            for tier in Tier::ALL {
                let _ = writeln!(
                    out,
                    "radixkv_hit_tokens_total{{tenant=\"{t}\",tier=\"{}\"}} {}",
                    tier.name(),
                    load(&c.hit_tokens[tier.index()])
                );
            }
        }
        counter_header(
            out,
            "radixkv_miss_tokens_total",
            "Tokens asked for and not cached.",
        );
        for (t, c) in &tenants {
            let miss = load(&c.lookup_tokens).saturating_sub(c.hit_total());
            let _ = writeln!(out, "radixkv_miss_tokens_total{{tenant=\"{t}\"}} {miss}");
        }
        counter_header(
            out,
            "radixkv_stored_pages_total",
            "New pages a tenant stored (Store, CommitShm, Set).",
        );
        for (t, c) in &tenants {
            let _ = writeln!(
                out,
                "radixkv_stored_pages_total{{tenant=\"{t}\"}} {}",
                load(&c.stored_pages)
            );
        }
        counter_header(
            out,
            "radixkv_loaded_bytes_total",
            "Block bytes a tenant loaded over gRPC (Load, Get).",
        );
        for (t, c) in &tenants {
            let _ = writeln!(
                out,
                "radixkv_loaded_bytes_total{{tenant=\"{t}\"}} {}",
                load(&c.loaded_bytes)
            );
        }
        counter_header(
            out,
            "radixkv_quota_evictions_total",
            "Pages a tenant gave up to stay within its quota.",
        );
        for (t, c) in &tenants {
            let _ = writeln!(
                out,
                "radixkv_quota_evictions_total{{tenant=\"{t}\"}} {}",
                load(&c.quota_evictions)
            );
        }
        counter_header(
            out,
            "radixkv_client_bytes_total",
            "Block bytes clients loaded and stored, by path.",
        );
        for (dir, path, a) in [
            ("load", "grpc", &self.grpc_load_bytes),
            ("load", "shm", &self.shm_load_bytes),
            ("store", "grpc", &self.grpc_store_bytes),
            ("store", "shm", &self.shm_store_bytes),
        ] {
            let _ = writeln!(
                out,
                "radixkv_client_bytes_total{{direction=\"{dir}\",path=\"{path}\"}} {}",
                load(a)
            );
        }
    }
}

pub fn counter_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
}

pub fn gauge_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}
