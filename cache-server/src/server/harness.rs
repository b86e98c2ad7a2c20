//! The service without listeners, for fuzzing and tests (feature
//! `test-utils`): a request's bytes go through prost's decoding and the
//! same handler a client's call reaches, and the stream answers are
//! drained. The client-streaming calls (Store, Set) take a request body as
//! it comes off the wire: gRPC frames (see [`frame`]) that tonic's own
//! framing and prost decode. Every outcome but a panic is fine.

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
use tonic::{Request, Status, Streaming};

/// The calls a harness can make, by number (the fuzz input's first byte).
pub const CALLS: [&str; 20] = [
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
    "Store",
    "Set",
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
            "Store" => drop(c.store(streaming(body, self.max_message())).await?),
            "Set" => drop(c.set(streaming(body, self.max_message())).await?),
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

    /// The seed the default tenant's default namespace chains its page
    /// hashes from (what Info answers).
    pub fn namespace_seed(&self) -> crate::Result<radix_tree::PageHash> {
        let ns = self
            .state
            .namespaces
            .resolve(&self.state.cache, super::auth::DEFAULT_TENANT, None)
            .map_err(|s| crate::CacheError::InvalidArgument(s.message().to_string()))?;
        Ok(self.state.cache.index().namespace_key(ns)?.seed())
    }

    /// Stores a prompt's blocks directly, without a request body.
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

impl Harness {
    fn max_message(&self) -> usize {
        self.state.config.limits.max_message_bytes
    }
}

/// A client stream as the server receives it: `body` is the raw request
/// body, decoded by tonic's framing and prost as on the wire.
fn streaming<T: Message + Default + Send + 'static>(
    body: &[u8],
    max_message: usize,
) -> Request<Streaming<T>> {
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
        body,
    )));
    Request::new(Streaming::new_request(
        tonic_prost::ProstDecoder::<T>::default(),
        body,
        None,
        Some(max_message),
    ))
}

/// One message as a gRPC frame (uncompressed): what a client stream's body
/// is made of.
pub fn frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use radix_tree::Tier;

    const PAGE: usize = 4;
    const BLOCK: usize = 256;

    fn harness() -> Harness {
        Harness::new(ServerConfig {
            page_size: PAGE,
            block_bytes: BLOCK,
            host_bytes: 32 * BLOCK,
            disk_bytes: 0,
            ..ServerConfig::default()
        })
        .unwrap()
    }

    fn call_no(name: &str) -> u8 {
        CALLS.iter().position(|c| *c == name).unwrap() as u8
    }

    fn tokens(t: std::ops::Range<u32>) -> Vec<u8> {
        t.flat_map(|x| x.to_le_bytes()).collect()
    }

    fn host_pages(h: &Harness) -> u64 {
        h.cache().index().tier_pages(Tier::Host)
    }

    /// The client-stream calls decode frames as tonic does on the wire:
    /// a store split over two frames lands whole, a hash-keyed chain lands,
    /// and broken bodies are statuses, not panics.
    #[tokio::test]
    async fn client_streams_go_through_tonic_framing() {
        let h = harness();
        let mut store = frame(&StoreRequest {
            header: Some(StoreHeader {
                scope: None,
                tokens: tokens(0..12),
                first_page: 0,
                output_tokens: 0,
            }),
            data: vec![1; 2 * BLOCK].into(),
        });
        store.extend(frame(&StoreRequest {
            header: None,
            data: vec![2; BLOCK].into(),
        }));
        h.call(call_no("Store"), &store).await.unwrap();
        assert_eq!(host_pages(&h), 3);

        let seed = h.namespace_seed().unwrap();
        let (p0, p1): (Vec<u32>, Vec<u32>) = ((100..104).collect(), (104..108).collect());
        let (h0, h1) = (seed.chain(&p0), seed.chain(&p0).chain(&p1));
        let set = |hash: radix_tree::PageHash, parent: Option<radix_tree::PageHash>, t: &[u32]| {
            frame(&SetRequest {
                scope: None,
                hash: hash.to_le_bytes().to_vec(),
                parent: parent.map(|p| p.to_le_bytes().to_vec()).unwrap_or_default(),
                tokens: t.iter().flat_map(|x| x.to_le_bytes()).collect(),
                data: vec![3; BLOCK].into(),
            })
        };
        let mut chain = set(h0, None, &p0);
        chain.extend(set(h1, Some(h0), &p1));
        h.call(call_no("Set"), &chain).await.unwrap();
        assert_eq!(host_pages(&h), 5);
        // A page whose tokens do not chain to its hash is refused.
        let wrong = set(seed.chain(&p1), None, &p0);
        assert!(h.call(call_no("Set"), &wrong).await.is_err());
        assert_eq!(host_pages(&h), 5);

        // Blocks split across messages at odd offsets land byte-exact.
        let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i * 7 % 251) as u8).collect();
        let mut split = frame(&StoreRequest {
            header: Some(StoreHeader {
                scope: None,
                tokens: tokens(500..512),
                first_page: 0,
                output_tokens: 0,
            }),
            data: data[..100].to_vec().into(),
        });
        for range in [100..612, 612..613, 613..3 * BLOCK] {
            split.extend(frame(&StoreRequest {
                header: None,
                data: data[range].to_vec().into(),
            }));
        }
        h.call(call_no("Store"), &split).await.unwrap();
        assert_eq!(host_pages(&h), 8);
        let ns = h
            .state
            .namespaces
            .resolve(&h.state.cache, super::super::auth::DEFAULT_TENANT, None)
            .unwrap();
        let t: Vec<u32> = (500..512).collect();
        let hit = h
            .cache()
            .lookup(ns, &t, crate::LookupOptions::default())
            .unwrap();
        let mut page = vec![0u8; BLOCK];
        for p in 0..3 {
            h.cache().read(ns, &hit, p, &mut page).unwrap();
            assert_eq!(page, data[p * BLOCK..][..BLOCK], "page {p}");
        }

        // Broken bodies: a frame cut short, a compressed flag with no
        // compression agreed, a length past the message limit, garbage.
        let cut = &store[..store.len() - 7];
        let mut compressed = store.clone();
        compressed[0] = 1;
        let mut huge = vec![0u8];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        for (what, body) in [
            ("cut", cut.to_vec()),
            ("compressed", compressed),
            ("huge", huge),
            ("garbage", vec![0xff; 40]),
            ("empty", Vec::new()),
        ] {
            for c in ["Store", "Set"] {
                let r = h.call(call_no(c), &body).await;
                if c == "Set" && what == "empty" {
                    assert!(r.is_ok(), "an empty Set stores nothing");
                } else {
                    assert!(r.is_err(), "{c} of a {what} body: {r:?}");
                }
            }
        }
        assert_eq!(host_pages(&h), 8, "nothing half-stored");
        h.cache().index().check_invariants();
    }
}
