//! The server's table of leases and pins: which tenant holds each, what it
//! covers, and how many each tenant holds (capped).

use parking_lot::Mutex;
use radix_tree::{Lease, NamespaceId, PageHash};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::Status;

/// A lease (from Lookup) or a pin (from Pin), as a client names it.
#[derive(Debug, Clone)]
pub struct Held {
    pub tenant: Arc<str>,
    pub ns: NamespaceId,
    pub lease: Lease,
    /// The leased pages' hashes, in prefix order (empty for pins).
    pub hashes: Arc<Vec<PageHash>>,
}

/// How long an expired lease is remembered (so a late Load hears
/// "expired", not "unknown").
const REMEMBER_EXPIRED_MS: u64 = 10 * 60 * 1000;
/// Most expired leases remembered.
const MAX_REMEMBERED: usize = 1 << 16;

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<u64, Held>,
    /// Expired leases swept from `by_id`: owner and when it expired.
    expired: HashMap<u64, (Arc<str>, u64)>,
    per_tenant: HashMap<Arc<str>, usize>,
    next: u64,
}

/// Every lease and pin handed out, with a per-tenant cap.
#[derive(Debug)]
pub struct Leases {
    table: Mutex<Table>,
    cap: usize,
}

impl Leases {
    pub fn new(cap_per_tenant: usize) -> Self {
        Self {
            table: Mutex::new(Table {
                next: 1,
                ..Table::default()
            }),
            cap: cap_per_tenant,
        }
    }

    /// Checks the tenant may take one more.
    pub fn admit(&self, tenant: &str) -> Result<(), Status> {
        let t = self.table.lock();
        if t.per_tenant.get(tenant).copied().unwrap_or(0) >= self.cap {
            return Err(Status::resource_exhausted(format!(
                "the tenant holds its maximum of {} leases and pins; release some",
                self.cap
            )));
        }
        Ok(())
    }

    /// Records a lease; returns the id a client names it by.
    pub fn insert(&self, held: Held) -> u64 {
        let mut t = self.table.lock();
        let id = t.next;
        t.next += 1;
        *t.per_tenant.entry(held.tenant.clone()).or_default() += 1;
        t.by_id.insert(id, held);
        id
    }

    /// The caller's lease `id`: NOT_FOUND if it is not the caller's (another
    /// tenant's lease is indistinguishable from none) or was released;
    /// FAILED_PRECONDITION if it expired.
    pub fn get(&self, tenant: &str, id: u64, now_ms: u64) -> Result<Held, Status> {
        let t = self.table.lock();
        match t.by_id.get(&id) {
            Some(h) if &*h.tenant == tenant => {
                if h.lease.expires_ms <= now_ms {
                    Err(expired(id))
                } else {
                    Ok(h.clone())
                }
            }
            _ => match t.expired.get(&id) {
                Some((owner, _)) if &**owner == tenant => Err(expired(id)),
                _ => Err(Status::not_found(format!("no lease {id}"))),
            },
        }
    }

    /// Removes the caller's lease `id` and hands it back.
    pub fn remove(&self, tenant: &str, id: u64) -> Result<Held, Status> {
        let mut t = self.table.lock();
        match t.by_id.get(&id) {
            Some(h) if &*h.tenant == tenant => {}
            _ => return Err(Status::not_found(format!("no lease {id}"))),
        }
        let held = t.by_id.remove(&id).expect("checked above");
        Self::uncount(&mut t, &held.tenant);
        Ok(held)
    }

    pub fn set_expiry(&self, id: u64, expires_ms: u64) {
        if let Some(h) = self.table.lock().by_id.get_mut(&id) {
            h.lease.expires_ms = expires_ms;
        }
    }

    /// Forgets leases that expired (the index reclaims their pins itself).
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut t = self.table.lock();
        let expired: Vec<u64> = t
            .by_id
            .iter()
            .filter(|(_, h)| h.lease.expires_ms <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        for id in &expired {
            if let Some(h) = t.by_id.remove(id) {
                Self::uncount(&mut t, &h.tenant);
                t.expired.insert(*id, (h.tenant, h.lease.expires_ms));
            }
        }
        let forget_before = now_ms.saturating_sub(REMEMBER_EXPIRED_MS);
        t.expired.retain(|_, (_, at)| *at > forget_before);
        if t.expired.len() > MAX_REMEMBERED {
            t.expired.clear();
        }
        expired.len()
    }

    pub fn count(&self, tenant: &str) -> usize {
        self.table
            .lock()
            .per_tenant
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.table.lock().by_id.len()
    }

    fn uncount(t: &mut Table, tenant: &Arc<str>) {
        if let Some(n) = t.per_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                t.per_tenant.remove(tenant);
            }
        }
    }
}

fn expired(id: u64) -> Status {
    Status::failed_precondition(format!("lease {id} has expired; look the prompt up again"))
}
