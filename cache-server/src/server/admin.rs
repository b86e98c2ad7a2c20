//! The `radixkv.v1.Admin` service: every tenant's figures, invalidation.
//! Every call needs the admin token.

use super::service::tenant_stats;
use super::state::{wire_tier, State};
use proto::v1::admin_server::Admin as AdminRpc;
use proto::v1::*;
use radix_tree::Tier;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    async fn cluster_stats(
        &self,
        request: Request<ClusterStatsRequest>,
    ) -> Result<Response<ClusterStatsResponse>, Status> {
        let s = &self.state;
        s.auth.admin(&request)?;
        let quota = |name: &str| {
            s.config
                .tenants
                .iter()
                .find(|t| t.name == name)
                .map_or(0, |t| t.quota_pages)
        };
        let names: BTreeSet<String> = s
            .namespaces
            .tenants()
            .iter()
            .chain(s.metrics.tenant_names().iter())
            .map(|t| t.to_string())
            .collect();
        let index = s.cache.index().stats();
        let cs = s.cache.stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(ClusterStatsResponse {
            tenants: names.iter().map(|n| tenant_stats(s, n, quota(n))).collect(),
            namespaces: index.namespaces as u64,
            pages: index.pages,
            tiers: Tier::ALL
                .iter()
                .map(|&t| TierStats {
                    tier: wire_tier(t) as i32,
                    pages: index.tier_pages[t.index()],
                    hit_tokens: index.hit_tokens[t.index()],
                })
                .collect(),
            corrupt_blocks: load(&cs.corrupt_blocks),
            io_errors: load(&cs.io_errors),
            demotions: load(&cs.demotions),
            promotions: load(&cs.promotions),
            index_memory_bytes: index.memory_bytes,
        }))
    }

    async fn invalidate(
        &self,
        request: Request<InvalidateRequest>,
    ) -> Result<Response<InvalidateResponse>, Status> {
        let s = &self.state;
        s.auth.admin(&request)?;
        let r = request.into_inner();
        let Some(ns) = s.namespaces.find(&r.tenant, r.scope.as_ref())? else {
            return Ok(Response::new(InvalidateResponse { removed_pages: 0 }));
        };
        let state = s.clone();
        let removed = tokio::task::spawn_blocking(move || state.cache.clear(ns))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(InvalidateResponse {
            removed_pages: removed as u64,
        }))
    }
}
