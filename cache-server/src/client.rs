//! The Rust client of the sidecar: typed and async, in domain types (no
//! protobuf types in its API). The engine's remote mode and the bench use
//! it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cache_server::client::ClientError> {
//! use cache_server::client::{Client, Scope};
//! let client = Client::connect("unix:/tmp/radixkv-data/radixkv.sock", None).await?;
//! let scope = Scope::model("my-model");
//! let hit = client.lookup(&scope, &[1, 2, 3, 4], Some(5_000), false).await?;
//! if let Some(lease) = hit.lease {
//!     let blocks = client.load(lease, 0, hit.pages).await?;
//!     client.release(lease).await?;
//! #   drop(blocks);
//! }
//! # Ok(()) }
//! ```

use bytes::Bytes;
use proto::v1::admin_client::AdminClient;
use proto::v1::cache_client::CacheClient;
use proto::v1::{self as pb};
use radix_tree::{PageHash, Tier};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tiers::host::ShmView;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use tonic::Code;

/// What went wrong in a call: the server's status, or the connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{code:?}: {message}")]
    Status { code: Code, message: String },
    #[error("connecting: {0}")]
    Connect(String),
    #[error("the server answered something malformed: {0}")]
    Protocol(String),
    #[error("shared memory: {0}")]
    Shm(String),
}

impl ClientError {
    /// The gRPC status code (`Unavailable` for connection failures).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Status { code, .. } => *code,
            ClientError::Connect(_) => Code::Unavailable,
            ClientError::Protocol(_) | ClientError::Shm(_) => Code::Internal,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The model and adapter a call is about (the tenant comes from the token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub model: String,
    pub adapter: String,
}

impl Scope {
    pub fn model(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            adapter: String::new(),
        }
    }

    fn wire(&self) -> pb::Scope {
        pb::Scope {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
        }
    }
}

/// The server's geometry and the caller's namespace.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub page_size: usize,
    pub block_bytes: usize,
    pub layout: String,
    pub shm_path: Option<PathBuf>,
    pub namespace_seed: PageHash,
    pub max_tokens_per_call: usize,
    pub max_message_bytes: usize,
    pub tenant: String,
}

impl ServerInfo {
    /// The chained hashes of the whole pages of `tokens` in this namespace
    /// (the same the server computes).
    pub fn page_hashes(&self, tokens: &[u32]) -> Vec<PageHash> {
        let mut h = self.namespace_seed;
        tokens
            .chunks_exact(self.page_size)
            .map(|page| {
                h = h.chain(page);
                h
            })
            .collect()
    }
}

/// A lease a lookup took: Load and LoadShm read under it; release it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseHandle {
    pub id: u64,
    pub expires_ms: u64,
}

/// The answer to a lookup.
#[derive(Debug, Clone)]
pub struct LookupReply {
    pub pages: usize,
    pub tokens: usize,
    /// The fastest tier of each page.
    pub tiers: Vec<Option<Tier>>,
    pub hashes: Vec<PageHash>,
    pub lease: Option<LeaseHandle>,
}

/// One block as loaded.
#[derive(Debug, Clone)]
pub struct LoadedBlock {
    pub page: usize,
    pub hash: PageHash,
    pub tier: Option<Tier>,
    pub data: Bytes,
}

/// What a store did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreReply {
    pub cached_pages: usize,
    pub stored_pages: usize,
}

/// One page for a hash-keyed set.
#[derive(Debug, Clone)]
pub struct PageToSet {
    pub hash: PageHash,
    pub parent: Option<PageHash>,
    pub tokens: Vec<u32>,
    pub data: Bytes,
}

/// A KV event as a subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    pub seq: u64,
    pub kind: KvEventKind,
    pub scope: Scope,
    pub hash: Option<PageHash>,
    pub parent: Option<PageHash>,
    pub tier: Option<Tier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvEventKind {
    Stored,
    Removed,
    Cleared,
}

/// A batch of events: a part of the snapshot, or live ones.
#[derive(Debug, Clone)]
pub struct KvEventBatch {
    pub snapshot: bool,
    pub seq: u64,
    pub events: Vec<KvEvent>,
    /// Non-zero when the subscriber was cut off for reading too slowly (the
    /// stream ends; subscribe again for a fresh snapshot).
    pub lagged: u64,
}

/// A tenant's figures.
#[derive(Debug, Clone, Default)]
pub struct TenantStats {
    pub tenant: String,
    pub lookups: u64,
    pub lookup_tokens: u64,
    pub hit_tokens: u64,
    pub pages: u64,
    /// Pages per tier: device, host, disk.
    pub tier_pages: [u64; radix_tree::TIERS],
    pub pinned_pages: u64,
    pub leases: u64,
    pub quota_pages: u64,
}

/// Adds the bearer token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Bearer>;

/// A connection to a radixkv server; cheap to clone (clones share it).
#[derive(Debug, Clone)]
pub struct Client {
    cache: CacheClient<Svc>,
    admin: AdminClient<Svc>,
}

/// The server's HTTP/2 settings on the client side: block-sized windows.
fn tuned(e: Endpoint) -> Endpoint {
    use crate::server::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
    e.initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

fn store_header(
    scope: &Scope,
    tokens: &[u32],
    first_page: usize,
    output_tokens: u32,
) -> pb::StoreHeader {
    pb::StoreHeader {
        scope: Some(scope.wire()),
        tokens: wire_tokens(tokens),
        first_page: first_page as u32,
        output_tokens,
    }
}

/// Token ids as the contract carries them: u32 little-endian.
fn wire_tokens(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn to_tier(t: i32) -> Option<Tier> {
    match pb::Tier::try_from(t).ok()? {
        pb::Tier::Device => Some(Tier::Device),
        pb::Tier::Host => Some(Tier::Host),
        pb::Tier::Disk => Some(Tier::Disk),
        pb::Tier::Unspecified => None,
    }
}

fn hash_of(bytes: &[u8]) -> Result<PageHash> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| ClientError::Protocol(format!("a hash of {} bytes", bytes.len())))?;
    Ok(PageHash::from_le_bytes(arr))
}

fn loaded(b: pb::Block) -> Result<LoadedBlock> {
    Ok(LoadedBlock {
        page: b.page as usize,
        hash: hash_of(&b.hash)?,
        tier: to_tier(b.tier),
        data: b.data,
    })
}

fn opt_hash(bytes: &[u8]) -> Result<Option<PageHash>> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        hash_of(bytes).map(Some)
    }
}

impl Client {
    /// Connects to `target`: `unix:/path/to.sock`, or `host:port` /
    /// `http://host:port` over TCP. `token` is the tenant's bearer token.
    pub async fn connect(target: &str, token: Option<&str>) -> Result<Client> {
        let channel = if let Some(path) = target.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            tuned(Endpoint::from_static("http://radixkv.local"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
        } else {
            let url = if target.contains("://") {
                target.to_string()
            } else {
                format!("http://{target}")
            };
            tuned(Endpoint::from_shared(url).map_err(|e| ClientError::Connect(e.to_string()))?)
                .tcp_nodelay(true)
                .connect()
                .await
        }
        .map_err(|e| ClientError::Connect(format!("{target}: {e}")))?;
        Self::over(channel, token)
    }

    /// Connects over TLS, trusting `ca_pem`, to a server whose certificate
    /// names `domain`.
    pub async fn connect_tls(
        addr: &str,
        domain: &str,
        ca_pem: &[u8],
        token: Option<&str>,
    ) -> Result<Client> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(domain);
        let channel = tuned(
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| ClientError::Connect(e.to_string()))?,
        )
        .tls_config(tls)
        .map_err(|e| ClientError::Connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
        Self::over(channel, token)
    }

    fn over(channel: Channel, token: Option<&str>) -> Result<Client> {
        let bearer = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Connect("a token must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let max = usize::MAX;
        let cache = CacheClient::with_interceptor(channel.clone(), Bearer(bearer.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin = AdminClient::with_interceptor(channel, Bearer(bearer))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        Ok(Client { cache, admin })
    }

    pub async fn info(&self, scope: &Scope) -> Result<ServerInfo> {
        let r = self
            .cache
            .clone()
            .info(pb::InfoRequest {
                scope: Some(scope.wire()),
            })
            .await?
            .into_inner();
        Ok(ServerInfo {
            page_size: r.page_size as usize,
            block_bytes: r.block_bytes as usize,
            layout: r.layout,
            shm_path: (!r.shm_path.is_empty()).then(|| PathBuf::from(r.shm_path)),
            namespace_seed: hash_of(&r.namespace_seed)?,
            max_tokens_per_call: r.max_tokens_per_call as usize,
            max_message_bytes: r.max_message_bytes as usize,
            tenant: r.tenant,
        })
    }

    /// The longest cached prefix of `tokens`; with `lease_ms`, leased for
    /// that long (Load reads under the lease); `prefetch` starts promoting
    /// disk pages.
    pub async fn lookup(
        &self,
        scope: &Scope,
        tokens: &[u32],
        lease_ms: Option<u64>,
        prefetch: bool,
    ) -> Result<LookupReply> {
        let r = self
            .cache
            .clone()
            .lookup(lookup_request(scope, tokens, lease_ms, prefetch))
            .await?
            .into_inner();
        lookup_reply(r)
    }

    /// Streams pages `first..first + pages` of a lease (0 pages: to its end).
    pub async fn load(
        &self,
        lease: LeaseHandle,
        first: usize,
        pages: usize,
    ) -> Result<Vec<LoadedBlock>> {
        let mut stream = self.load_stream(lease, first, pages).await?;
        let mut out = Vec::with_capacity(pages);
        while let Some(b) = stream.message().await? {
            out.push(loaded(b)?);
        }
        Ok(out)
    }

    /// Streams a lease's blocks to `each` as they arrive (no buffering of
    /// the whole range): for throughput-minded callers.
    pub async fn load_each(
        &self,
        lease: LeaseHandle,
        first: usize,
        pages: usize,
        mut each: impl FnMut(usize, &[u8]),
    ) -> Result<usize> {
        let mut stream = self.load_stream(lease, first, pages).await?;
        let mut n = 0;
        while let Some(b) = stream.message().await? {
            each(b.page as usize, &b.data);
            n += 1;
        }
        Ok(n)
    }

    async fn load_stream(
        &self,
        lease: LeaseHandle,
        first: usize,
        pages: usize,
    ) -> Result<tonic::Streaming<pb::Block>> {
        Ok(self
            .cache
            .clone()
            .load(pb::LoadRequest {
                lease_id: lease.id,
                first_page: first as u32,
                pages: pages as u32,
            })
            .await?
            .into_inner())
    }

    /// Where a lease's blocks sit in the shared-memory file.
    pub async fn load_shm(
        &self,
        lease: LeaseHandle,
        first: usize,
        pages: usize,
    ) -> Result<Vec<u64>> {
        let r = self
            .cache
            .clone()
            .load_shm(pb::LoadRequest {
                lease_id: lease.id,
                first_page: first as u32,
                pages: pages as u32,
            })
            .await?
            .into_inner();
        Ok(r.offsets)
    }

    /// Stores the blocks of pages `first_page..` of `tokens` (`data`: one
    /// block per page, back to back), streamed a block per message.
    pub async fn store(
        &self,
        scope: &Scope,
        tokens: &[u32],
        first_page: usize,
        data: Bytes,
        block_bytes: usize,
    ) -> Result<StoreReply> {
        self.store_with_output(scope, tokens, first_page, data, block_bytes, 0)
            .await
    }

    /// [`Client::store`] for a finished request that generated
    /// `output_tokens`: the server's `odds` policy learns from output
    /// lengths which prompts come back.
    pub async fn store_with_output(
        &self,
        scope: &Scope,
        tokens: &[u32],
        first_page: usize,
        data: Bytes,
        block_bytes: usize,
        output_tokens: u32,
    ) -> Result<StoreReply> {
        let header = store_header(scope, tokens, first_page, output_tokens);
        let step = block_bytes.max(1);
        let mut messages = Vec::with_capacity(data.len() / step + 1);
        let mut offset = 0;
        loop {
            let end = (offset + step).min(data.len());
            messages.push(pb::StoreRequest {
                header: (offset == 0).then(|| header.clone()),
                data: data.slice(offset..end),
            });
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        let r = self
            .cache
            .clone()
            .store(tokio_stream::iter(messages))
            .await?
            .into_inner();
        Ok(StoreReply {
            cached_pages: r.cached_pages as usize,
            stored_pages: r.stored_pages as usize,
        })
    }

    /// Reserves shared-memory slots: returns the reservation and the file
    /// offset of each slot.
    pub async fn reserve_shm(&self, pages: usize, ttl_ms: u64) -> Result<(u64, Vec<u64>)> {
        let r = self
            .cache
            .clone()
            .reserve_shm(pb::ReserveShmRequest {
                pages: pages as u32,
                ttl_ms,
            })
            .await?
            .into_inner();
        Ok((r.reservation_id, r.offsets))
    }

    /// Makes reserved slots, written in place, pages `first_page..` of `tokens`.
    pub async fn commit_shm(
        &self,
        reservation: u64,
        scope: &Scope,
        tokens: &[u32],
        first_page: usize,
    ) -> Result<StoreReply> {
        self.commit_shm_with_output(reservation, scope, tokens, first_page, 0)
            .await
    }

    /// [`Client::commit_shm`] for a finished request that generated
    /// `output_tokens` (see [`Client::store_with_output`]).
    pub async fn commit_shm_with_output(
        &self,
        reservation: u64,
        scope: &Scope,
        tokens: &[u32],
        first_page: usize,
        output_tokens: u32,
    ) -> Result<StoreReply> {
        let r = self
            .cache
            .clone()
            .commit_shm(pb::CommitShmRequest {
                reservation_id: reservation,
                header: Some(store_header(scope, tokens, first_page, output_tokens)),
            })
            .await?
            .into_inner();
        Ok(StoreReply {
            cached_pages: r.cached_pages as usize,
            stored_pages: r.stored_pages as usize,
        })
    }

    pub async fn release(&self, lease: LeaseHandle) -> Result<()> {
        self.cache
            .clone()
            .release(pb::ReleaseRequest { lease_id: lease.id })
            .await?;
        Ok(())
    }

    /// Extends a lease or pin to `ttl` from now; returns the new expiry.
    pub async fn renew(&self, id: u64, ttl: Duration) -> Result<u64> {
        Ok(self
            .cache
            .clone()
            .renew(pb::RenewRequest {
                lease_id: id,
                ttl_ms: ttl.as_millis() as u64,
            })
            .await?
            .into_inner()
            .expires_ms)
    }

    /// Keeps an agent session's cached prefix warm; returns (pin id, pages).
    pub async fn pin(
        &self,
        scope: &Scope,
        tokens: &[u32],
        ttl: Duration,
        priority: u8,
    ) -> Result<(u64, usize)> {
        let r = self
            .cache
            .clone()
            .pin(pb::PinRequest {
                scope: Some(scope.wire()),
                tokens: wire_tokens(tokens),
                ttl_ms: ttl.as_millis() as u64,
                priority: u32::from(priority),
            })
            .await?
            .into_inner();
        Ok((r.pin_id, r.pages as usize))
    }

    pub async fn unpin(&self, pin_id: u64) -> Result<()> {
        self.cache
            .clone()
            .unpin(pb::UnpinRequest { pin_id })
            .await?;
        Ok(())
    }

    /// How many of `hashes`, from the first, are cached.
    pub async fn exists(&self, scope: &Scope, hashes: &[PageHash]) -> Result<usize> {
        let r = self
            .cache
            .clone()
            .exists(pb::ExistsRequest {
                scope: Some(scope.wire()),
                hashes: hashes.iter().map(|h| h.to_le_bytes().to_vec()).collect(),
            })
            .await?
            .into_inner();
        Ok(r.pages as usize)
    }

    /// The blocks of `hashes`, up to the first that is not cached.
    pub async fn get(&self, scope: &Scope, hashes: &[PageHash]) -> Result<Vec<LoadedBlock>> {
        let mut stream = self
            .cache
            .clone()
            .get(pb::GetRequest {
                scope: Some(scope.wire()),
                hashes: hashes.iter().map(|h| h.to_le_bytes().to_vec()).collect(),
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(b) = stream.message().await? {
            out.push(loaded(b)?);
        }
        Ok(out)
    }

    /// Stores pages named by hash.
    pub async fn set(&self, scope: &Scope, pages: Vec<PageToSet>) -> Result<StoreReply> {
        let wire = scope.wire();
        let messages: Vec<pb::SetRequest> = pages
            .into_iter()
            .enumerate()
            .map(|(i, p)| pb::SetRequest {
                scope: (i == 0).then(|| wire.clone()),
                hash: p.hash.to_le_bytes().to_vec(),
                parent: p
                    .parent
                    .map(|h| h.to_le_bytes().to_vec())
                    .unwrap_or_default(),
                tokens: wire_tokens(&p.tokens),
                data: p.data,
            })
            .collect();
        let r = self
            .cache
            .clone()
            .set(tokio_stream::iter(messages))
            .await?
            .into_inner();
        Ok(StoreReply {
            cached_pages: r.cached_pages as usize,
            stored_pages: r.stored_pages as usize,
        })
    }

    pub async fn stats(&self) -> Result<TenantStats> {
        let r = self
            .cache
            .clone()
            .stats(pb::StatsRequest {})
            .await?
            .into_inner();
        Ok(tenant_stats(r))
    }

    /// Subscribes to the KV events of `scopes` (none: all the tenant's).
    pub async fn events(&self, scopes: &[Scope]) -> Result<EventStream> {
        let stream = self
            .cache
            .clone()
            .events(pb::EventsRequest {
                scopes: scopes.iter().map(Scope::wire).collect(),
            })
            .await?
            .into_inner();
        Ok(EventStream(stream))
    }

    pub async fn health(&self) -> Result<bool> {
        Ok(self
            .cache
            .clone()
            .health(pb::HealthRequest {})
            .await?
            .into_inner()
            .serving)
    }

    /// Every tenant's figures (admin token).
    pub async fn cluster_stats(&self) -> Result<Vec<TenantStats>> {
        let r = self
            .admin
            .clone()
            .cluster_stats(pb::ClusterStatsRequest {})
            .await?
            .into_inner();
        Ok(r.tenants.into_iter().map(tenant_stats).collect())
    }

    /// Drops every page of a tenant's namespace (admin token).
    pub async fn invalidate(&self, tenant: &str, scope: &Scope) -> Result<u64> {
        Ok(self
            .admin
            .clone()
            .invalidate(pb::InvalidateRequest {
                tenant: tenant.to_string(),
                scope: Some(scope.wire()),
            })
            .await?
            .into_inner()
            .removed_pages)
    }
}

pub(crate) fn lookup_request(
    scope: &Scope,
    tokens: &[u32],
    lease_ms: Option<u64>,
    prefetch: bool,
) -> pb::LookupRequest {
    pb::LookupRequest {
        scope: Some(scope.wire()),
        tokens: wire_tokens(tokens),
        lease_ms: lease_ms.unwrap_or(0),
        prefetch,
    }
}

pub(crate) fn lookup_reply(r: pb::LookupResponse) -> Result<LookupReply> {
    if r.hashes.len() != r.pages as usize * 16 {
        return Err(ClientError::Protocol("hashes do not match pages".into()));
    }
    Ok(LookupReply {
        pages: r.pages as usize,
        tokens: r.tokens as usize,
        tiers: r.tiers.iter().map(|&t| to_tier(t)).collect(),
        hashes: r
            .hashes
            .chunks_exact(16)
            .map(hash_of)
            .collect::<Result<_>>()?,
        lease: (r.lease_id != 0).then_some(LeaseHandle {
            id: r.lease_id,
            expires_ms: r.lease_expires_ms,
        }),
    })
}

fn tenant_stats(r: pb::StatsResponse) -> TenantStats {
    let mut tier_pages = [0; radix_tree::TIERS];
    for t in &r.tiers {
        if let Some(tier) = to_tier(t.tier) {
            tier_pages[tier.index()] = t.pages;
        }
    }
    TenantStats {
        tenant: r.tenant,
        lookups: r.lookups,
        lookup_tokens: r.lookup_tokens,
        hit_tokens: r.hit_tokens,
        pages: r.pages,
        tier_pages,
        pinned_pages: r.pinned_pages,
        leases: r.leases,
        quota_pages: r.quota_pages,
    }
}

/// A subscription to KV events.
#[derive(Debug)]
pub struct EventStream(tonic::Streaming<pb::EventBatch>);

impl EventStream {
    /// The next batch; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Result<Option<KvEventBatch>> {
        let Some(b) = self.0.message().await? else {
            return Ok(None);
        };
        let events = b
            .events
            .into_iter()
            .map(|e| {
                let kind = match pb::event::Kind::try_from(e.kind) {
                    Ok(pb::event::Kind::Stored) => KvEventKind::Stored,
                    Ok(pb::event::Kind::Removed) => KvEventKind::Removed,
                    Ok(pb::event::Kind::Cleared) => KvEventKind::Cleared,
                    _ => return Err(ClientError::Protocol(format!("event kind {}", e.kind))),
                };
                let scope = e.scope.unwrap_or_default();
                Ok(KvEvent {
                    seq: e.seq,
                    kind,
                    scope: Scope {
                        model: scope.model,
                        adapter: scope.adapter,
                    },
                    hash: opt_hash(&e.hash)?,
                    parent: opt_hash(&e.parent)?,
                    tier: to_tier(e.tier),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Some(KvEventBatch {
            snapshot: b.snapshot,
            seq: b.seq,
            events,
            lagged: b.lagged,
        }))
    }
}

/// The server's shared-memory host tier, mapped by a local client: reads
/// blocks in place (zero copies) and writes reserved slots.
#[derive(Debug)]
pub struct SharedTier {
    view: ShmView,
    file: std::fs::File,
    block_bytes: usize,
}

impl SharedTier {
    /// Maps the file `info.shm_path` names, checking it holds blocks of the
    /// server's geometry.
    pub fn open(info: &ServerInfo) -> Result<SharedTier> {
        let path = info
            .shm_path
            .as_deref()
            .ok_or_else(|| ClientError::Shm("the server offers no shared memory".into()))?;
        Self::open_path(path, info)
    }

    fn open_path(path: &Path, info: &ServerInfo) -> Result<SharedTier> {
        let geometry = crate::block_geometry(info.page_size, info.block_bytes, &info.layout)
            .map_err(|e| ClientError::Shm(e.to_string()))?;
        let view = ShmView::open(path, geometry).map_err(|e| ClientError::Shm(e.to_string()))?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| ClientError::Shm(format!("{}: {e}", path.display())))?;
        Ok(SharedTier {
            view,
            file,
            block_bytes: info.block_bytes,
        })
    }

    /// The block at `offset` (as LoadShm answers), in place. Valid while
    /// the lease that LoadShm read under lives.
    pub fn block(&self, offset: u64) -> Result<&[u8]> {
        self.view
            .block_at(offset)
            .map_err(|e| ClientError::Shm(e.to_string()))
    }

    /// Writes a block into a reserved slot at `offset` (as ReserveShm answers).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if data.len() != self.block_bytes {
            return Err(ClientError::Shm(format!(
                "a block is {} bytes, got {}",
                self.block_bytes,
                data.len()
            )));
        }
        // Checked against the layout: an offset that is not a slot's start
        // is refused before anything is written.
        self.view
            .block_at(offset)
            .map_err(|e| ClientError::Shm(e.to_string()))?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| ClientError::Shm(e.to_string()))
    }
}
