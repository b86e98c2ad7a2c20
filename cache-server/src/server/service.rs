//! The `radixkv.v1.Cache` service: requests in, domain calls on the
//! [`Cache`](crate::Cache) facade, answers out. Calls that may wait on
//! disk run on the blocking pool; lookups run inline (they only touch the
//! index).

use super::events::{Filter, Numbered};
use super::metrics::METHODS;
use super::state::{page_hash, wire_tier, Reservation, State};
use super::status::invalid;
use crate::LookupOptions;
use bytes::{Bytes, BytesMut};
use proto::v1::cache_server::Cache as CacheRpc;
use proto::v1::*;
use radix_tree::{IndexError, IndexEvent, InsertHints, NamespaceId, PageHash, PinKind, Tier};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Pages a streamed store hands to the cache at once.
const STORE_BATCH: usize = 16;
/// How long a Load or Get pins the pages it streams at most.
const READ_LEASE: Duration = Duration::from_secs(60);
/// Most pages one shared-memory reservation may take.
const MAX_RESERVE_PAGES: u32 = 4096;
/// Events per snapshot message.
const SNAPSHOT_BATCH: usize = 1024;

type BlockStream = Pin<Box<dyn Stream<Item = Result<Block, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<EventBatch, Status>> + Send>>;

/// The service; cheap to clone (one per listener).
#[derive(Debug, Clone)]
pub struct CacheService {
    state: Arc<State>,
}

impl CacheService {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn method(name: &str) -> usize {
    METHODS
        .iter()
        .position(|m| *m == name)
        .expect("a known method")
}

/// Runs a call and records its latency and outcome.
macro_rules! timed {
    ($self:ident, $name:literal, $body:expr) => {{
        let start = Instant::now();
        let out = $body;
        $self
            .state
            .metrics
            .observe(method($name), start.elapsed(), out.is_ok());
        out
    }};
}

/// Runs blocking cache work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

#[tonic::async_trait]
impl CacheRpc for CacheService {
    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        timed!(self, "Info", self.info_call(request))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        timed!(self, "Lookup", self.lookup_call(request))
    }

    type LoadStream = BlockStream;

    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<BlockStream>, Status> {
        timed!(self, "Load", self.load_call(request))
    }

    async fn load_shm(
        &self,
        request: Request<LoadRequest>,
    ) -> Result<Response<ShmLocations>, Status> {
        timed!(self, "LoadShm", self.load_shm_call(request).await)
    }

    async fn store(
        &self,
        request: Request<Streaming<StoreRequest>>,
    ) -> Result<Response<StoreResponse>, Status> {
        timed!(self, "Store", self.store_call(request).await)
    }

    async fn reserve_shm(
        &self,
        request: Request<ReserveShmRequest>,
    ) -> Result<Response<ShmReservation>, Status> {
        timed!(self, "ReserveShm", self.reserve_shm_call(request).await)
    }

    async fn commit_shm(
        &self,
        request: Request<CommitShmRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        timed!(self, "CommitShm", self.commit_shm_call(request).await)
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        timed!(self, "Release", {
            let tenant = self.state.auth.tenant(&request)?;
            self.end_lease(&tenant.name, request.get_ref().lease_id)
                .map(|()| Response::new(ReleaseResponse {}))
        })
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        timed!(self, "Renew", self.renew_call(request))
    }

    async fn pin(&self, request: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        timed!(self, "Pin", self.pin_call(request))
    }

    async fn unpin(
        &self,
        request: Request<UnpinRequest>,
    ) -> Result<Response<UnpinResponse>, Status> {
        timed!(self, "Unpin", {
            let tenant = self.state.auth.tenant(&request)?;
            self.end_lease(&tenant.name, request.get_ref().pin_id)
                .map(|()| Response::new(UnpinResponse {}))
        })
    }

    async fn exists(
        &self,
        request: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        timed!(self, "Exists", self.exists_call(request))
    }

    type GetStream = BlockStream;

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<BlockStream>, Status> {
        timed!(self, "Get", self.get_call(request))
    }

    async fn set(
        &self,
        request: Request<Streaming<SetRequest>>,
    ) -> Result<Response<SetResponse>, Status> {
        timed!(self, "Set", self.set_call(request).await)
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        timed!(self, "Stats", {
            let tenant = self.state.auth.tenant(&request)?;
            Ok(Response::new(tenant_stats(
                &self.state,
                &tenant.name,
                tenant.quota_pages,
            )))
        })
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        timed!(self, "Events", self.events_call(request))
    }

    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        timed!(self, "Health", {
            let _ = request;
            Ok(Response::new(HealthResponse {
                serving: true,
                version: env!("CARGO_PKG_VERSION").into(),
            }))
        })
    }
}

impl CacheService {
    /// UNAUTHENTICATED unless the request's token names a tenant.
    pub(super) fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.state.auth.tenant(request).map(drop)
    }

    fn info_call(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let ns = s
            .namespaces
            .resolve(&s.cache, &tenant.name, request.get_ref().scope.as_ref())?;
        let seed = s
            .cache
            .index()
            .namespace_key(ns)
            .map_err(crate::CacheError::from)?
            .seed();
        let shm = tenant
            .shm
            .then(|| {
                s.cache
                    .host_pool()
                    .shm_path()
                    .map(|p| p.display().to_string())
            })
            .flatten();
        Ok(Response::new(InfoResponse {
            page_size: s.page_size() as u32,
            block_bytes: s.block_bytes() as u64,
            layout: s.config.layout.clone(),
            shm_slot_stride: if shm.is_some() {
                s.cache.host_pool().slot_stride() as u64
            } else {
                0
            },
            shm_path: shm.unwrap_or_default(),
            namespace_seed: seed.to_le_bytes().to_vec(),
            max_tokens_per_call: s.config.limits.max_tokens_per_request as u64,
            max_message_bytes: s.config.limits.max_message_bytes as u64,
            tenant: tenant.name.clone(),
        }))
    }

    fn lookup_call(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let tokens = s.tokens(&r.tokens)?;
        let ns = s
            .namespaces
            .resolve(&s.cache, &tenant.name, r.scope.as_ref())?;
        let lease = if r.lease_ms > 0 {
            s.leases.admit(&tenant.name)?;
            Some(s.ttl(r.lease_ms)?)
        } else {
            None
        };
        let hit = s.cache.lookup(
            ns,
            &tokens,
            LookupOptions {
                lease,
                promote: r.prefetch,
            },
        )?;
        let counters = s.metrics.tenant(&tenant.name);
        counters.lookups.fetch_add(1, Ordering::Relaxed);
        let whole = (tokens.len() / hit.page_size * hit.page_size) as u64;
        counters.lookup_tokens.fetch_add(whole, Ordering::Relaxed);
        let per_tier = hit.fastest_pages();
        for t in Tier::ALL {
            counters.hit_tokens[t.index()].fetch_add(
                (per_tier[t.index()] * hit.page_size) as u64,
                Ordering::Relaxed,
            );
        }
        let tiers: Vec<i32> = hit
            .locations
            .iter()
            .map(|l| l.fastest().map_or(proto::v1::Tier::Unspecified, wire_tier) as i32)
            .collect();
        let mut hashes = Vec::with_capacity(hit.hashes.len() * 16);
        for h in &hit.hashes {
            hashes.extend_from_slice(&h.to_le_bytes());
        }
        let (lease_id, lease_expires_ms) = match &hit.lease {
            Some(l) => {
                let id = s.leases.insert(super::leases::Held {
                    tenant: Arc::from(tenant.name.as_str()),
                    ns,
                    lease: *l,
                    hashes: Arc::new(hit.hashes.clone()),
                });
                (id, l.expires_ms)
            }
            None => (0, 0),
        };
        Ok(Response::new(LookupResponse {
            pages: hit.pages as u32,
            tokens: hit.tokens() as u64,
            tiers,
            device_pages: per_tier[Tier::Device.index()] as u32,
            host_pages: per_tier[Tier::Host.index()] as u32,
            disk_pages: per_tier[Tier::Disk.index()] as u32,
            hashes,
            lease_id,
            lease_expires_ms,
        }))
    }

    /// The pages of a lease a Load asks for.
    fn leased_range(
        &self,
        tenant: &str,
        r: &LoadRequest,
    ) -> Result<(NamespaceId, u32, Vec<PageHash>), Status> {
        let held = self
            .state
            .leases
            .get(tenant, r.lease_id, self.state.now_ms())?;
        let len = held.hashes.len() as u64;
        let first = u64::from(r.first_page);
        let count = if r.pages == 0 {
            len.saturating_sub(first)
        } else {
            u64::from(r.pages)
        };
        if first + count > len || count == 0 {
            return Err(Status::out_of_range(format!(
                "pages {first}..{} are outside the lease's {len}",
                first + count
            )));
        }
        let hashes = held.hashes[first as usize..(first + count) as usize].to_vec();
        Ok((held.ns, r.first_page, hashes))
    }

    fn load_call(&self, request: Request<LoadRequest>) -> Result<Response<BlockStream>, Status> {
        let tenant = self.state.auth.tenant(&request)?;
        let (ns, first, hashes) = self.leased_range(&tenant.name, request.get_ref())?;
        let stream = self.stream_blocks("Load", &tenant.name, ns, first, hashes, true);
        Ok(Response::new(stream))
    }

    /// Streams pages' blocks from a blocking worker, under a pin of its own
    /// (so a lease that expires mid-stream cannot free a block being
    /// read). A page with no sound copy left ends the stream with NOT_FOUND
    /// if `all_or_error`, or quietly (a hash-keyed Get ends at its first miss);
    /// an error ending the stream counts against `call` in the metrics.
    fn stream_blocks(
        &self,
        call: &'static str,
        tenant: &str,
        ns: NamespaceId,
        first: u32,
        hashes: Vec<PageHash>,
        all_or_error: bool,
    ) -> BlockStream {
        let (tx, rx) = mpsc::channel::<Result<Block, Status>>(4);
        let state = self.state.clone();
        let counters = state.metrics.tenant(tenant);
        tokio::task::spawn_blocking(move || {
            let cache = &state.cache;
            let bb = state.block_bytes();
            for (i, hash) in hashes.into_iter().enumerate() {
                let page = first + i as u32;
                let pin = cache
                    .index()
                    .pin_page_node(ns, hash, PinKind::Lease, READ_LEASE)
                    .ok();
                let mut buf = BytesMut::zeroed(bb);
                let read = if pin.is_some() {
                    cache.read_page(ns, hash, &mut buf)
                } else {
                    Ok(None)
                };
                if let Some(p) = pin {
                    let _ = cache.release(&p);
                }
                let block = match read {
                    Ok(Some(tier)) => Block {
                        page,
                        hash: hash.to_le_bytes().to_vec(),
                        tier: wire_tier(tier) as i32,
                        data: buf.freeze(),
                    },
                    Ok(None) if all_or_error => {
                        state.metrics.stream_failed(method(call));
                        let _ = tx.blocking_send(Err(Status::not_found(format!(
                            "page {page} has no readable copy (a failed check, counted in \
                             radixkv_corrupt_blocks_total, or an I/O error, in \
                             radixkv_io_errors_total)"
                        ))));
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        state.metrics.stream_failed(method(call));
                        let _ = tx.blocking_send(Err(e.into()));
                        return;
                    }
                };
                counters
                    .loaded_bytes
                    .fetch_add(bb as u64, Ordering::Relaxed);
                state
                    .metrics
                    .grpc_load_bytes
                    .fetch_add(bb as u64, Ordering::Relaxed);
                if tx.blocking_send(Ok(block)).is_err() {
                    // The client went away: stop reading.
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    async fn load_shm_call(
        &self,
        request: Request<LoadRequest>,
    ) -> Result<Response<ShmLocations>, Status> {
        let tenant = self.state.auth.tenant(&request)?;
        let shm_path = self.shm_path(&tenant)?;
        let (ns, _, hashes) = self.leased_range(&tenant.name, request.get_ref())?;
        let state = self.state.clone();
        let offsets = blocking(move || Ok(state.cache.host_offsets(ns, &hashes)?)).await?;
        let found: Vec<u64> = offsets.iter().map_while(|o| *o).collect();
        if found.len() < offsets.len() {
            return Err(Status::not_found(format!(
                "page {} of the range is no longer cached (its copies failed their checks)",
                found.len()
            )));
        }
        let bytes = (found.len() * self.state.block_bytes()) as u64;
        self.state
            .metrics
            .shm_load_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.state
            .metrics
            .tenant(&tenant.name)
            .loaded_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        Ok(Response::new(ShmLocations {
            shm_path,
            offsets: found,
            block_bytes: self.state.block_bytes() as u64,
        }))
    }

    fn shm_path(&self, tenant: &super::auth::Tenant) -> Result<String, Status> {
        if !tenant.shm {
            return Err(Status::permission_denied(
                "this tenant may not map the shared-memory tier",
            ));
        }
        self.state
            .cache
            .host_pool()
            .shm_path()
            .map(|p| p.display().to_string())
            .ok_or_else(|| {
                Status::failed_precondition("the server's host tier is not in shared memory")
            })
    }

    async fn store_call(
        &self,
        request: Request<Streaming<StoreRequest>>,
    ) -> Result<Response<StoreResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| invalid("an empty store stream"))?;
        let header = first
            .header
            .ok_or_else(|| invalid("the first message of a store needs a header"))?;
        let tokens = s.tokens(&header.tokens)?;
        let ns = s
            .namespaces
            .resolve(&s.cache, &tenant.name, header.scope.as_ref())?;
        let (ps, bb) = (s.page_size(), s.block_bytes());
        let pages = tokens.len() / ps;
        let first_page = header.first_page as usize;
        if first_page > pages {
            return Err(invalid(format!(
                "first page {first_page} is past the prompt's {pages} whole pages"
            )));
        }
        let expected = (pages - first_page) * bb;
        let target = StoreTarget {
            tenant: &tenant.name,
            ns,
            tokens: Arc::new(tokens),
            hints: store_hints(&header),
        };
        // Whole blocks as received (slices of the messages, not copies),
        // and the start of a block split across messages.
        let mut blocks: Vec<Bytes> = Vec::with_capacity(STORE_BATCH);
        let mut partial = BytesMut::new();
        let mut received = 0usize;
        let mut next = first_page;
        let mut outcome: Option<StoreResponse> = None;
        let mut data = first.data;
        let mut stopped = false;
        loop {
            received += data.len();
            if received > expected {
                return Err(invalid(format!(
                    "more than the {expected} bytes of {} pages of {bb}-byte blocks",
                    pages - first_page
                )));
            }
            if !partial.is_empty() {
                let take = (bb - partial.len()).min(data.len());
                partial.extend_from_slice(&data.split_to(take));
                if partial.len() == bb {
                    blocks.push(partial.split().freeze());
                }
            }
            while data.len() >= bb {
                blocks.push(data.split_to(bb));
            }
            partial.extend_from_slice(&data);
            while blocks.len() >= STORE_BATCH && !stopped {
                let chunk: Vec<Bytes> = blocks.drain(..STORE_BATCH).collect();
                stopped = self.store_batch(&target, next, chunk, &mut outcome).await?;
                next += STORE_BATCH;
            }
            if stopped {
                // The rest is read to check its length, not kept.
                blocks.clear();
            }
            match stream.message().await? {
                Some(m) if m.header.is_some() => {
                    return Err(invalid("only the first message of a store has a header"))
                }
                Some(m) => data = m.data,
                None => break,
            }
        }
        if received != expected {
            return Err(invalid(format!(
                "{received} bytes for {} pages of {bb}-byte blocks ({expected} bytes)",
                pages - first_page
            )));
        }
        // `received == expected`: whole blocks only, nothing partial left.
        if !blocks.is_empty() && !stopped {
            self.store_batch(&target, next, blocks, &mut outcome)
                .await?;
        }
        if expected == 0 && target.hints != InsertHints::default() {
            // No blocks, only what the request says of itself (a finished
            // request's output length): the cached prompt hears of it.
            let state = s.clone();
            let (tokens, hints) = (target.tokens.clone(), target.hints);
            blocking(move || {
                Ok(state
                    .cache
                    .store_blocks_with_hints(ns, &tokens, first_page, &[], hints)?)
            })
            .await?;
        }
        s.metrics
            .grpc_store_bytes
            .fetch_add(received as u64, Ordering::Relaxed);
        s.enforce_quota(&tenant);
        Ok(Response::new(outcome.unwrap_or(StoreResponse {
            cached_pages: first_page as u32,
            stored_pages: 0,
        })))
    }

    /// Stores one batch of whole pages starting at page `start`; returns
    /// whether storing must stop (the prefix left the cache meanwhile).
    async fn store_batch(
        &self,
        target: &StoreTarget<'_>,
        start: usize,
        chunk: Vec<Bytes>,
        outcome: &mut Option<StoreResponse>,
    ) -> Result<bool, Status> {
        let ps = self.state.page_size();
        let end = start + chunk.len();
        let state = self.state.clone();
        let (ns, hints) = (target.ns, target.hints);
        let tokens = target.tokens.clone();
        let out = blocking(move || {
            let blocks: Vec<&[u8]> = chunk.iter().map(|b| &b[..]).collect();
            Ok(state.cache.store_blocks_with_hints(
                ns,
                &tokens[..end * ps],
                start,
                &blocks,
                hints,
            )?)
        })
        .await?;
        if out.cached_pages < start {
            if outcome.is_none() {
                return Err(Status::failed_precondition(format!(
                    "pages before page {start} are not cached (cached: {}); store them first",
                    out.cached_pages
                )));
            }
            return Ok(true);
        }
        self.state
            .metrics
            .tenant(target.tenant)
            .add_stored(out.stored_pages);
        let o = outcome.get_or_insert(StoreResponse {
            cached_pages: out.cached_pages.min(end) as u32,
            stored_pages: 0,
        });
        o.stored_pages += out.stored_pages as u32;
        Ok(false)
    }

    async fn reserve_shm_call(
        &self,
        request: Request<ReserveShmRequest>,
    ) -> Result<Response<ShmReservation>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let shm_path = self.shm_path(&tenant)?;
        let r = request.into_inner();
        if r.pages == 0 || r.pages > MAX_RESERVE_PAGES {
            return Err(invalid(format!(
                "a reservation is 1 to {MAX_RESERVE_PAGES} pages, asked for {}",
                r.pages
            )));
        }
        let ttl = s.ttl(r.ttl_ms)?;
        let held = s
            .reservations
            .lock()
            .values()
            .filter(|v| *v.tenant == *tenant.name)
            .count();
        if held >= s.config.limits.max_leases_per_tenant {
            return Err(Status::resource_exhausted(
                "the tenant holds its maximum of open reservations; commit some",
            ));
        }
        let state = s.clone();
        let pages = r.pages as usize;
        let reserved = blocking(move || Ok(state.cache.reserve_host(pages)?)).await?;
        let id = s.next_reservation.fetch_add(1, Ordering::Relaxed);
        s.reservations.lock().insert(
            id,
            Reservation {
                tenant: Arc::from(tenant.name.as_str()),
                slots: reserved.slots,
                expires_ms: s.now_ms() + ttl.as_millis() as u64,
            },
        );
        Ok(Response::new(ShmReservation {
            reservation_id: id,
            shm_path,
            offsets: reserved.offsets,
            block_bytes: s.block_bytes() as u64,
        }))
    }

    async fn commit_shm_call(
        &self,
        request: Request<CommitShmRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let reservation = {
            let mut all = s.reservations.lock();
            match all.get(&r.reservation_id) {
                Some(v) if *v.tenant == *tenant.name => all.remove(&r.reservation_id),
                _ => None,
            }
        }
        .ok_or_else(|| {
            Status::not_found(format!(
                "no reservation {} (expired, committed, or not this tenant's)",
                r.reservation_id
            ))
        })?;
        let header = match r.header {
            Some(h) => h,
            None => {
                s.cache.cancel_host(&reservation.slots);
                return Err(invalid("a commit needs a header"));
            }
        };
        let checked = s.tokens(&header.tokens).and_then(|tokens| {
            s.namespaces
                .resolve(&s.cache, &tenant.name, header.scope.as_ref())
                .map(|ns| (ns, tokens))
        });
        let (ns, tokens) = match checked {
            Ok(x) => x,
            Err(e) => {
                s.cache.cancel_host(&reservation.slots);
                return Err(e);
            }
        };
        let state = s.clone();
        let first_page = header.first_page as usize;
        let hints = store_hints(&header);
        let slots = reservation.slots;
        let out = blocking(move || {
            Ok(state
                .cache
                .commit_host_with_hints(ns, &tokens, first_page, &slots, hints)?)
        })
        .await?;
        let bytes = (out.stored_pages * s.block_bytes()) as u64;
        s.metrics
            .shm_store_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        s.metrics.tenant(&tenant.name).add_stored(out.stored_pages);
        s.enforce_quota(&tenant);
        Ok(Response::new(StoreResponse {
            cached_pages: out.cached_pages as u32,
            stored_pages: out.stored_pages as u32,
        }))
    }

    /// Ends the caller's lease or pin `id`.
    fn end_lease(&self, tenant: &str, id: u64) -> Result<(), Status> {
        let held = self.state.leases.remove(tenant, id)?;
        match self.state.cache.release(&held.lease) {
            // Expired already: the index reclaimed it.
            Ok(()) | Err(crate::CacheError::Index(IndexError::LeaseGone(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn renew_call(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let ttl = s.ttl(r.ttl_ms)?;
        let held = s.leases.get(&tenant.name, r.lease_id, s.now_ms())?;
        let expires_ms = s
            .cache
            .index()
            .renew(held.lease.id, ttl)
            .map_err(crate::CacheError::from)?;
        s.leases.set_expiry(r.lease_id, expires_ms);
        Ok(Response::new(RenewResponse { expires_ms }))
    }

    fn pin_call(&self, request: Request<PinRequest>) -> Result<Response<PinResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let tokens = s.tokens(&r.tokens)?;
        let ttl = s.ttl(r.ttl_ms)?;
        let priority = u8::try_from(r.priority)
            .map_err(|_| invalid(format!("priority {} is above 255", r.priority)))?;
        s.leases.admit(&tenant.name)?;
        let ns = s
            .namespaces
            .resolve(&s.cache, &tenant.name, r.scope.as_ref())?;
        let lease = s
            .cache
            .index()
            .pin(ns, &tokens, PinKind::Session { priority }, ttl)
            .map_err(crate::CacheError::from)?;
        let id = s.leases.insert(super::leases::Held {
            tenant: Arc::from(tenant.name.as_str()),
            ns,
            lease,
            hashes: Arc::new(Vec::new()),
        });
        Ok(Response::new(PinResponse {
            pin_id: id,
            pages: lease.pages as u32,
            expires_ms: lease.expires_ms,
        }))
    }

    fn exists_call(
        &self,
        request: Request<ExistsRequest>,
    ) -> Result<Response<ExistsResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let hashes = parse_hashes(&r.hashes, s.config.limits.max_tokens_per_request)?;
        let Some(ns) = s.namespaces.find(&tenant.name, r.scope.as_ref())? else {
            return Ok(Response::new(ExistsResponse { pages: 0 }));
        };
        let pages = s
            .cache
            .index()
            .longest_cached_run(ns, &hashes)
            .map_err(crate::CacheError::from)?;
        Ok(Response::new(ExistsResponse {
            pages: pages as u32,
        }))
    }

    fn get_call(&self, request: Request<GetRequest>) -> Result<Response<BlockStream>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let hashes = parse_hashes(&r.hashes, s.config.limits.max_tokens_per_request)?;
        let Some(ns) = s.namespaces.find(&tenant.name, r.scope.as_ref())? else {
            return Ok(Response::new(Box::pin(tokio_stream::empty())));
        };
        Ok(Response::new(self.stream_blocks(
            "Get",
            &tenant.name,
            ns,
            0,
            hashes,
            false,
        )))
    }

    async fn set_call(
        &self,
        request: Request<Streaming<SetRequest>>,
    ) -> Result<Response<SetResponse>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let mut stream = request.into_inner();
        let (ps, bb) = (s.page_size(), s.block_bytes());
        let mut ns = None;
        // A run of pages, each the child of the one before.
        let mut run = SetRun::default();
        let mut total = SetResponse::default();
        while let Some(m) = stream.message().await? {
            let ns = match ns {
                Some(ns) => ns,
                None => {
                    let n = s
                        .namespaces
                        .resolve(&s.cache, &tenant.name, m.scope.as_ref())?;
                    ns = Some(n);
                    n
                }
            };
            let tokens = s.tokens(&m.tokens)?;
            if tokens.len() != ps || m.data.len() != bb {
                return Err(invalid(format!(
                    "a page is {ps} tokens and a {bb}-byte block; got {} tokens and {} bytes",
                    tokens.len(),
                    m.data.len()
                )));
            }
            let hash = page_hash(&m.hash)?;
            let parent = if m.parent.is_empty() {
                None
            } else {
                Some(page_hash(&m.parent)?)
            };
            let follows = run.hashes.last().copied() == parent && !run.hashes.is_empty();
            if !follows || run.hashes.len() == STORE_BATCH {
                self.flush_set(&tenant.name, ns, &mut run, &mut total)
                    .await?;
                run.parent = parent;
            }
            run.hashes.push(hash);
            run.tokens.extend_from_slice(&tokens);
            run.data.extend_from_slice(&m.data);
        }
        if let Some(ns) = ns {
            self.flush_set(&tenant.name, ns, &mut run, &mut total)
                .await?;
            s.enforce_quota(&tenant);
        }
        Ok(Response::new(total))
    }

    async fn flush_set(
        &self,
        tenant: &str,
        ns: NamespaceId,
        run: &mut SetRun,
        total: &mut SetResponse,
    ) -> Result<(), Status> {
        if run.hashes.is_empty() {
            return Ok(());
        }
        let SetRun {
            parent,
            hashes,
            tokens,
            data,
        } = std::mem::take(run);
        let state = self.state.clone();
        let bytes = data.len() as u64;
        let out = blocking(move || {
            Ok(state
                .cache
                .store_after(ns, parent, &hashes, &tokens, &data)?)
        })
        .await?;
        total.stored_pages += out.stored_pages as u32;
        total.cached_pages += out.cached_pages as u32;
        let metrics = &self.state.metrics;
        metrics.grpc_store_bytes.fetch_add(bytes, Ordering::Relaxed);
        metrics.tenant(tenant).add_stored(out.stored_pages);
        Ok(())
    }

    fn events_call(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let s = &self.state;
        let tenant = s.auth.tenant(&request)?;
        let r = request.into_inner();
        let tenant_name: Arc<str> = Arc::from(tenant.name.as_str());
        let (filter, snapshot_of) = if r.scopes.is_empty() {
            (Filter::Tenant(tenant_name.clone()), None)
        } else {
            let set = r
                .scopes
                .iter()
                .map(|sc| s.namespaces.resolve(&s.cache, &tenant.name, Some(sc)))
                .collect::<Result<HashSet<_>, _>>()?;
            (Filter::Namespaces(set.clone()), Some(set))
        };
        let mut sub = s.bus.subscribe(filter).ok_or_else(|| {
            Status::resource_exhausted("the server has its maximum of event subscribers")
        })?;
        // Namespaces listed after subscribing: one created in between shows
        // up in the live events in full.
        let namespaces: Vec<NamespaceId> = match snapshot_of {
            Some(set) => set.into_iter().collect(),
            None => s.namespaces.of_tenant(&tenant.name),
        };
        let (tx, rx) = mpsc::channel::<Result<EventBatch, Status>>(16);
        let state = s.clone();
        tokio::spawn(async move {
            let mut as_of: HashMap<NamespaceId, u64> = HashMap::new();
            let mut sent_snapshot = false;
            for ns in namespaces {
                let Ok((pages, seq)) = state.cache.index().snapshot(ns, || state.bus.seq()) else {
                    continue;
                };
                as_of.insert(ns, seq);
                let scope = state.namespaces.info(ns).map(|i| i.scope());
                let events: Vec<Event> = pages
                    .iter()
                    .flat_map(|p| {
                        let scope = scope.clone();
                        p.location.copies().map(move |(tier, _)| Event {
                            seq,
                            kind: event::Kind::Stored as i32,
                            scope: scope.clone(),
                            hash: p.hash.to_le_bytes().to_vec(),
                            parent: p
                                .parent
                                .map(|h| h.to_le_bytes().to_vec())
                                .unwrap_or_default(),
                            tier: wire_tier(tier) as i32,
                        })
                    })
                    .collect();
                for part in events.chunks(SNAPSHOT_BATCH) {
                    let batch = EventBatch {
                        snapshot: true,
                        events: part.to_vec(),
                        lagged: 0,
                        seq,
                    };
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                    sent_snapshot = true;
                }
            }
            if !sent_snapshot {
                // An empty snapshot still tells the client where live starts.
                let batch = EventBatch {
                    snapshot: true,
                    events: Vec::new(),
                    lagged: 0,
                    seq: state.bus.seq(),
                };
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            loop {
                let Some(batch) = sub.rx.recv().await else {
                    let lagged = sub.lagged.load(Ordering::Relaxed);
                    let _ = tx
                        .send(Ok(EventBatch {
                            snapshot: false,
                            events: Vec::new(),
                            lagged: lagged.max(1),
                            seq: state.bus.seq(),
                        }))
                        .await;
                    return;
                };
                sub.backlog.fetch_sub(batch.len(), Ordering::Relaxed);
                let Some(msg) = live_batch(&state, &as_of, batch) else {
                    continue;
                };
                if tx.send(Ok(msg)).await.is_err() {
                    // The subscriber left; dropping `sub` unsubscribes.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Pages of a Set waiting to be stored together.
#[derive(Debug, Default)]
struct SetRun {
    parent: Option<PageHash>,
    hashes: Vec<PageHash>,
    tokens: Vec<u32>,
    data: Vec<u8>,
}

fn parse_hashes(raw: &[Vec<u8>], max: usize) -> Result<Vec<PageHash>, Status> {
    if raw.len() > max {
        return Err(invalid(format!(
            "{} hashes exceed the limit of {max} per request",
            raw.len()
        )));
    }
    raw.iter().map(|h| page_hash(h)).collect()
}

/// Live events as a message, less those a snapshot already covered.
fn live_batch(
    state: &State,
    as_of: &HashMap<NamespaceId, u64>,
    batch: Numbered,
) -> Option<EventBatch> {
    let last = batch.last().map(|(seq, _)| *seq)?;
    let events: Vec<Event> = batch
        .into_iter()
        .filter_map(|(seq, e)| {
            let (ns, kind, hash, parent, tier) = match e {
                IndexEvent::Stored {
                    ns,
                    hash,
                    parent,
                    tier,
                } => (ns, event::Kind::Stored, Some(hash), parent, Some(tier)),
                IndexEvent::Removed { ns, hash, tier } => {
                    (ns, event::Kind::Removed, Some(hash), None, Some(tier))
                }
                IndexEvent::Cleared { ns } => (ns, event::Kind::Cleared, None, None, None),
            };
            if as_of.get(&ns).is_some_and(|&s| seq <= s) {
                return None;
            }
            Some(Event {
                seq,
                kind: kind as i32,
                scope: state.namespaces.info(ns).map(|i| i.scope()),
                hash: hash.map(|h| h.to_le_bytes().to_vec()).unwrap_or_default(),
                parent: parent.map(|h| h.to_le_bytes().to_vec()).unwrap_or_default(),
                tier: tier.map_or(proto::v1::Tier::Unspecified, wire_tier) as i32,
            })
        })
        .collect();
    (!events.is_empty()).then_some(EventBatch {
        snapshot: false,
        events,
        lagged: 0,
        seq: last,
    })
}

/// One tenant's figures.
pub fn tenant_stats(state: &State, tenant: &str, quota_pages: u64) -> StatsResponse {
    let c = state.metrics.tenant(tenant);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut pages = 0;
    let mut tier_pages = [0u64; radix_tree::TIERS];
    for ns in state.namespaces.of_tenant(tenant) {
        if let Ok((p, t)) = state.cache.index().namespace_pages(ns) {
            pages += p;
            for (acc, n) in tier_pages.iter_mut().zip(t) {
                *acc += n;
            }
        }
    }
    StatsResponse {
        tenant: tenant.to_string(),
        lookups: load(&c.lookups),
        lookup_tokens: load(&c.lookup_tokens),
        hit_tokens: c.hit_total(),
        tiers: Tier::ALL
            .iter()
            .map(|&t| TierStats {
                tier: wire_tier(t) as i32,
                pages: tier_pages[t.index()],
                hit_tokens: load(&c.hit_tokens[t.index()]),
            })
            .collect(),
        pages,
        pinned_pages: state.cache.index().tenant_pinned_pages(tenant),
        leases: state.leases.count(tenant) as u64,
        quota_pages,
    }
}

/// Where a streamed store goes, fixed by its header.
struct StoreTarget<'a> {
    tenant: &'a str,
    ns: NamespaceId,
    tokens: Arc<Vec<u32>>,
    hints: InsertHints,
}

/// What a store's header says of its request, for the eviction policy.
fn store_hints(header: &StoreHeader) -> InsertHints {
    InsertHints {
        output_tokens: header.output_tokens,
        ..InsertHints::default()
    }
}
