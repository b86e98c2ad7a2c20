//! The service without listeners, for fuzzing and tests (feature
//! `test-utils`): a request's bytes go through prost's decoding and the
//! same handler a client's call reaches, and the stream answers are
//! drained. Every outcome but a panic is fine.

use super::admin::AdminService;
use super::config::ServerConfig;
use super::events::EventBus;
use super::service::CacheService;
use super::state::State;
use crate::Cache;
use prost::Message;
use proto::v1::admin_server::Admin as AdminRpc;
use proto::v1::cache_server::Cache as CacheRpc;
use proto::v1::*;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::{Request, Status};

/// The calls a harness can make, by number (the fuzz input's first byte).
pub const CALLS: [&str; 18] = [
    "Info",
    "Lookup",
    "Load",
    "LoadShm",
    "ReserveShm",
    "CommitShm",
    "Release",
    "Renew",
    "Pin",
    "Unpin",
    "Exists",
    "Get",
    "Stats",
    "Events",
    "Health",
    "ClusterStats",
    "Invalidate",
    "LookupLeased",
];

/// The service over a cache, with no sockets.
#[derive(Debug)]
pub struct Harness {
    state: Arc<State>,
    cache: CacheService,
    admin: AdminService,
}

impl Harness {
    /// A service over a fresh cache described by `config` (its listeners
    /// are ignored).
    pub fn new(config: ServerConfig) -> crate::Result<Harness> {
        let bus = Arc::new(EventBus::new(
            config.limits.event_buffer,
            config.limits.max_subscribers,
        ));
        let cache = Cache::open(config.cache_config()?.events(bus.clone()).build()?)?;
        let state = Arc::new(State::new(Arc::new(cache), config, bus));
        Ok(Harness {
            cache: CacheService::new(state.clone()),
            admin: AdminService::new(state.clone()),
            state,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.state.cache
    }

    /// Decodes `body` as call `call`'s request and runs it; stream answers
    /// are read to their end (events: the first batch).
    pub async fn call(&self, call: u8, body: &[u8]) -> Result<(), Status> {
        let bad = |e: prost::DecodeError| Status::invalid_argument(e.to_string());
        let c = &self.cache;
        match CALLS[usize::from(call) % CALLS.len()] {
            "Info" => drop(c.info(req(InfoRequest::decode(body).map_err(bad)?)).await?),
            "Lookup" => drop(
                c.lookup(req(LookupRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "LookupLeased" => {
                // A lookup with a lease, then a load of it: reaches the
                // lease-holding paths with a lease that exists.
                let mut r = LookupRequest::decode(body).map_err(bad)?;
                r.lease_ms = r.lease_ms.clamp(1, 10_000);
                let hit = c.lookup(req(r)).await?.into_inner();
                if hit.lease_id != 0 {
                    let load = LoadRequest {
                        lease_id: hit.lease_id,
                        first_page: 0,
                        pages: 0,
                    };
                    let mut s = c.load(req(load)).await?.into_inner();
                    while let Some(b) = s.next().await {
                        b?;
                    }
                }
            }
            "Load" => {
                let mut s = c
                    .load(req(LoadRequest::decode(body).map_err(bad)?))
                    .await?
                    .into_inner();
                while let Some(b) = s.next().await {
                    b?;
                }
            }
            "LoadShm" => drop(
                c.load_shm(req(LoadRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "ReserveShm" => drop(
                c.reserve_shm(req(ReserveShmRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "CommitShm" => drop(
                c.commit_shm(req(CommitShmRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Release" => drop(
                c.release(req(ReleaseRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Renew" => drop(
                c.renew(req(RenewRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Pin" => drop(c.pin(req(PinRequest::decode(body).map_err(bad)?)).await?),
            "Unpin" => drop(
                c.unpin(req(UnpinRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Exists" => drop(
                c.exists(req(ExistsRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Get" => {
                let mut s = c
                    .get(req(GetRequest::decode(body).map_err(bad)?))
                    .await?
                    .into_inner();
                while let Some(b) = s.next().await {
                    b?;
                }
            }
            "Stats" => drop(
                c.stats(req(StatsRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "Events" => {
                let mut s = c
                    .events(req(EventsRequest::decode(body).map_err(bad)?))
                    .await?
                    .into_inner();
                if let Some(b) = s.next().await {
                    b?;
                }
            }
            "Health" => drop(
                c.health(req(HealthRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            "ClusterStats" => drop(
                self.admin
                    .cluster_stats(req(ClusterStatsRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
            _ => drop(
                self.admin
                    .invalidate(req(InvalidateRequest::decode(body).map_err(bad)?))
                    .await?,
            ),
        }
        Ok(())
    }

    /// Stores a prompt's blocks directly (the harness has no Store stream).
    pub fn store(&self, tokens: &[u32], data: &[u8]) -> crate::Result<()> {
        let ns = self
            .state
            .namespaces
            .resolve(&self.state.cache, super::auth::DEFAULT_TENANT, None)
            .map_err(|s| crate::CacheError::InvalidArgument(s.message().to_string()))?;
        self.state.cache.store(ns, tokens, 0, data)?;
        Ok(())
    }
}

fn req<T>(m: T) -> Request<T> {
    Request::new(m)
}
