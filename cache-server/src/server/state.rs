//! What every call of the service shares: the cache, the tenants, the
//! leases, the namespaces, the event bus and the metrics, and the checks
//! every request goes through.

use super::auth::{Auth, Tenant};
use super::config::ServerConfig;
use super::events::EventBus;
use super::leases::Leases;
use super::metrics::Metrics;
use super::namespaces::Namespaces;
use super::status::invalid;
use crate::Cache;
use parking_lot::Mutex;
use radix_tree::{NamespaceId, PageHash, Tier};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tiers::SlotId;
use tonic::Status;

/// Shared-memory slots reserved by a client and not yet committed.
#[derive(Debug)]
pub struct Reservation {
    pub tenant: Arc<str>,
    pub slots: Vec<SlotId>,
    pub expires_ms: u64,
}

#[derive(Debug)]
pub struct State {
    pub cache: Arc<Cache>,
    pub config: ServerConfig,
    pub auth: Auth,
    pub leases: Leases,
    pub namespaces: Arc<Namespaces>,
    pub bus: Arc<EventBus>,
    pub metrics: Metrics,
    pub reservations: Mutex<HashMap<u64, Reservation>>,
    pub next_reservation: AtomicU64,
}

impl State {
    pub fn new(cache: Arc<Cache>, config: ServerConfig, bus: Arc<EventBus>) -> Self {
        let namespaces = Arc::new(Namespaces::from_cache(&cache));
        bus.set_namespaces(&namespaces);
        Self {
            auth: Auth::new(&config),
            leases: Leases::new(config.limits.max_leases_per_tenant),
            namespaces,
            bus,
            metrics: Metrics::default(),
            reservations: Mutex::new(HashMap::new()),
            next_reservation: AtomicU64::new(1),
            cache,
            config,
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.cache.now_ms()
    }

    pub fn page_size(&self) -> usize {
        self.config.page_size
    }

    pub fn block_bytes(&self) -> usize {
        self.config.block_bytes
    }

    /// The token ids of a request (u32 little-endian on the wire), checked:
    /// whole ids, in range, and not too many of them.
    pub fn tokens(&self, wire: &[u8]) -> Result<Vec<u32>, Status> {
        if wire.len() % 4 != 0 {
            return Err(invalid(format!(
                "tokens are 4 bytes each (u32 little-endian); got {} bytes",
                wire.len()
            )));
        }
        let max = self.config.limits.max_tokens_per_request;
        if wire.len() / 4 > max {
            return Err(invalid(format!(
                "{} tokens exceed the limit of {max} per request",
                wire.len() / 4
            )));
        }
        let tokens: Vec<u32> = wire
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let vocab = self.config.vocab_size;
        if vocab > 0 {
            if let Some(i) = tokens.iter().position(|&t| t >= vocab) {
                return Err(invalid(format!(
                    "token {} at position {i} is out of range (vocabulary of {vocab})",
                    tokens[i]
                )));
            }
        }
        Ok(tokens)
    }

    /// A lease or pin TTL within the limits.
    pub fn ttl(&self, ms: u64) -> Result<Duration, Status> {
        let max = self.config.limits.max_ttl_ms;
        if ms == 0 || ms > max {
            return Err(invalid(format!("a TTL must be 1 to {max} ms, got {ms}")));
        }
        Ok(Duration::from_millis(ms))
    }

    /// Gives up the tenant's coldest pages on the fastest tier until it is
    /// back within its quota.
    pub fn enforce_quota(&self, tenant: &Tenant) {
        if tenant.quota_pages == 0 {
            return;
        }
        let top = self.cache.top_tier();
        for _ in 0..8 {
            let held: Vec<(NamespaceId, u64)> = self
                .namespaces
                .of_tenant(&tenant.name)
                .into_iter()
                .filter_map(|ns| {
                    let (_, tiers) = self.cache.index().namespace_pages(ns).ok()?;
                    Some((ns, tiers[top.index()]))
                })
                .collect();
            let total: u64 = held.iter().map(|(_, n)| n).sum();
            if total <= tenant.quota_pages {
                return;
            }
            let Some(&(ns, n)) = held.iter().max_by_key(|(_, n)| *n) else {
                return;
            };
            let excess = (total - tenant.quota_pages).min(n) as usize;
            let dropped = self.cache.trim(ns, top, excess).unwrap_or(0);
            self.metrics
                .tenant(&tenant.name)
                .quota_evictions
                .fetch_add(dropped as u64, Ordering::Relaxed);
            if dropped == 0 {
                return;
            }
        }
    }

    /// Forgets expired leases and frees expired shared-memory reservations.
    pub fn sweep(&self) {
        let now = self.now_ms();
        self.leases.sweep(now);
        let expired: Vec<Reservation> = {
            let mut r = self.reservations.lock();
            let ids: Vec<u64> = r
                .iter()
                .filter(|(_, v)| v.expires_ms <= now)
                .map(|(&k, _)| k)
                .collect();
            ids.into_iter().filter_map(|id| r.remove(&id)).collect()
        };
        for r in expired {
            self.cache.cancel_host(&r.slots);
        }
        self.cache.reap();
    }
}

/// A page hash from its 16 wire bytes.
pub fn page_hash(bytes: &[u8]) -> Result<PageHash, Status> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| invalid(format!("a page hash is 16 bytes, got {}", bytes.len())))?;
    Ok(PageHash::from_le_bytes(arr))
}

pub fn wire_tier(t: Tier) -> proto::v1::Tier {
    match t {
        Tier::Device => proto::v1::Tier::Device,
        Tier::Host => proto::v1::Tier::Host,
        Tier::Disk => proto::v1::Tier::Disk,
    }
}
