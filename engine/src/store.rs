//! Where the engine's KV pages are cached: the [`KvStore`] trait, with the
//! embedded [`Cache`] ([`EmbeddedStore`]) and a radixkv server reached
//! through its client ([`RemoteStore`]) as its two implementations. The
//! forward pass only sees page bytes ([`PageBytes`]), read in place where
//! the store allows it (the embedded host tier, the server's shared-memory
//! host tier).

use crate::error::{EngineError, Result};
use cache_server::client::{Client, Code, LeaseHandle, Scope, ServerInfo, SharedTier};
use cache_server::{Cache, LookupOptions};
use radix_tree::{InsertHints, Lease, NamespaceId, PageHash};
use std::fmt::Debug;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

/// A cache of KV pages.
pub trait KvStore: Send + Sync + Debug {
    /// Tokens per page.
    fn page_size(&self) -> usize;
    /// Bytes per block (one page's KV).
    fn block_bytes(&self) -> usize;
    /// The name of the blocks' layout ([`KvLayout::digest`](crate::KvLayout::digest)).
    fn layout(&self) -> String;
    /// The namespace of a tenant's model (a remote store's tenant is its
    /// token's, whatever `tenant` says).
    fn namespace(&self, tenant: &str, model: &str) -> Result<Arc<dyn KvNamespace>>;
}

/// One namespace of a [`KvStore`].
pub trait KvNamespace: Send + Sync + Debug {
    /// The longest cached prefix of `tokens` (whole pages), leased for at
    /// most `ttl`; `None` when nothing is cached.
    fn lookup(&self, tokens: &[u32], ttl: Duration) -> Result<Option<Box<dyn CachedPrefix>>>;
    /// Stores pages `first_page..` of `tokens` (whole pages; `data` holds
    /// their blocks back to back, and only theirs: the pages before must
    /// be cached already).
    fn store(&self, tokens: &[u32], first_page: usize, data: &[u8]) -> Result<Stored>;
    /// The request whose pages of `tokens` (whole pages, cached) were
    /// stored has finished, having generated `output_tokens`: a store whose
    /// eviction policy learns from output lengths (`odds`) hears of it.
    /// Stores with nothing to learn ignore it.
    fn finished(&self, _tokens: &[u32], _output_tokens: u32) -> Result<()> {
        Ok(())
    }
}

/// What a [`KvNamespace::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The pages before `first_page` are cached, and this many of the
    /// pages given were newly stored (the rest were cached already).
    Pages(usize),
    /// A page before `first_page` is not cached (evicted since it was
    /// stored): nothing was stored.
    PrefixMissing,
}

/// A leased cached prefix: its pages stay readable until it is dropped,
/// which releases the lease.
pub trait CachedPrefix: Send + Sync + Debug {
    fn pages(&self) -> usize;
    /// Page `i`'s block, in place where possible.
    fn page(&self, i: usize) -> Result<PageBytes<'_>>;
}

/// A block's bytes: borrowed in place, or a copy.
pub struct PageBytes<'a>(PageInner<'a>);

enum PageInner<'a> {
    Guard(Box<dyn Deref<Target = [u8]> + 'a>),
    Slice(&'a [u8]),
    Owned(Vec<u8>),
}

impl Debug for PageBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PageBytes({} bytes, in place: {})",
            self.len(),
            self.in_place()
        )
    }
}

impl Deref for PageBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            PageInner::Guard(g) => g,
            PageInner::Slice(s) => s,
            PageInner::Owned(v) => v,
        }
    }
}

impl PageBytes<'_> {
    /// Whether the bytes are the store's own, not a copy.
    pub fn in_place(&self) -> bool {
        !matches!(self.0, PageInner::Owned(_))
    }
}

// ---- embedded ------------------------------------------------------------------

/// The in-process [`Cache`].
#[derive(Debug, Clone)]
pub struct EmbeddedStore(pub Arc<Cache>);

#[derive(Debug)]
struct EmbeddedNs {
    cache: Arc<Cache>,
    ns: NamespaceId,
}

#[derive(Debug)]
struct EmbeddedPrefix {
    cache: Arc<Cache>,
    ns: NamespaceId,
    lease: Lease,
    hashes: Vec<PageHash>,
}

impl KvStore for EmbeddedStore {
    fn page_size(&self) -> usize {
        self.0.config().page_size()
    }

    fn block_bytes(&self) -> usize {
        self.0.config().block_bytes()
    }

    fn layout(&self) -> String {
        self.0.config().layout().to_string()
    }

    fn namespace(&self, tenant: &str, model: &str) -> Result<Arc<dyn KvNamespace>> {
        Ok(Arc::new(EmbeddedNs {
            cache: self.0.clone(),
            ns: self.0.namespace(tenant, model, "")?,
        }))
    }
}

impl KvNamespace for EmbeddedNs {
    fn lookup(&self, tokens: &[u32], ttl: Duration) -> Result<Option<Box<dyn CachedPrefix>>> {
        let options = LookupOptions {
            lease: Some(ttl),
            promote: true,
        };
        let hit = self.cache.lookup(self.ns, tokens, options)?;
        if let Some(id) = hit.prefetch {
            self.cache.wait(id);
        }
        Ok(hit.lease.map(|lease| {
            Box::new(EmbeddedPrefix {
                cache: self.cache.clone(),
                ns: self.ns,
                lease,
                hashes: hit.hashes,
            }) as Box<dyn CachedPrefix>
        }))
    }

    fn store(&self, tokens: &[u32], first_page: usize, data: &[u8]) -> Result<Stored> {
        let out = self.cache.store(self.ns, tokens, first_page, data)?;
        Ok(if out.cached_pages < first_page {
            Stored::PrefixMissing
        } else {
            Stored::Pages(out.stored_pages)
        })
    }

    /// A store of no blocks that says the output length.
    fn finished(&self, tokens: &[u32], output_tokens: u32) -> Result<()> {
        let pages = tokens.len() / self.cache.config().page_size();
        let hints = InsertHints {
            output_tokens,
            ..InsertHints::default()
        };
        self.cache
            .store_with_hints(self.ns, tokens, pages, &[], hints)?;
        Ok(())
    }
}

impl CachedPrefix for EmbeddedPrefix {
    fn pages(&self) -> usize {
        self.hashes.len()
    }

    fn page(&self, i: usize) -> Result<PageBytes<'_>> {
        let hash = self.hashes[i];
        if let Some(block) = self.cache.borrow(self.ns, hash)? {
            return Ok(PageBytes(PageInner::Guard(Box::new(block))));
        }
        // Not in host RAM after all: a copy from wherever it is.
        let mut buf = vec![0u8; self.cache.config().block_bytes()];
        match self.cache.read_page(self.ns, hash, &mut buf)? {
            Some(_) => Ok(PageBytes(PageInner::Owned(buf))),
            None => Err(EngineError::KvLost { page: i }),
        }
    }
}

impl Drop for EmbeddedPrefix {
    fn drop(&mut self) {
        // An expired lease is already gone; nothing else can fail here.
        let _ = self.cache.release(&self.lease);
    }
}

// ---- remote --------------------------------------------------------------------

/// A radixkv server, through [`Client`]: lookups lease on the server; a
/// prefix's blocks are read in place from the server's shared-memory host
/// tier when it offers one (a local server), or streamed over gRPC.
#[derive(Debug)]
pub struct RemoteStore {
    inner: Arc<Remote>,
}

#[derive(Debug)]
struct Remote {
    /// The client's own runtime (the engine's threads are not async).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    client: Client,
    info: ServerInfo,
    shm: Option<SharedTier>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Remote {
    /// Runs a call on the client's runtime and waits for it (from any
    /// thread, async ones included).
    fn call<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("the client's runtime outlives its calls")
    }
}

fn remote_err(e: cache_server::client::ClientError) -> EngineError {
    EngineError::Remote(e.to_string())
}

impl RemoteStore {
    /// Connects to a server (`unix:/path` or `host:port`) with a tenant's
    /// token, and maps its shared-memory host tier if it offers one.
    pub fn connect(target: &str, token: Option<&str>) -> Result<RemoteStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("radixkv-engine-client")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Remote(format!("starting the client's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (target, token) = (target.to_string(), token.map(str::to_string));
        let (client, info) = runtime
            .block_on(async move {
                let client = Client::connect(&target, token.as_deref()).await?;
                let info = client.info(&Scope::model("")).await?;
                Ok::<_, cache_server::client::ClientError>((client, info))
            })
            .map_err(remote_err)?;
        let shm = info
            .shm_path
            .is_some()
            .then(|| SharedTier::open(&info).ok())
            .flatten();
        Ok(RemoteStore {
            inner: Arc::new(Remote {
                runtime: Some(runtime),
                handle,
                client,
                info,
                shm,
            }),
        })
    }

    /// Whether blocks are read in place from the server's shared memory.
    pub fn uses_shm(&self) -> bool {
        self.inner.shm.is_some()
    }
}

#[derive(Debug)]
struct RemoteNs {
    remote: Arc<Remote>,
    scope: Scope,
}

#[derive(Debug)]
struct RemotePrefix {
    remote: Arc<Remote>,
    lease: LeaseHandle,
    blocks: RemoteBlocks,
}

#[derive(Debug)]
enum RemoteBlocks {
    /// Offsets in the shared-memory file.
    Shm(Vec<u64>),
    Loaded(Vec<bytes::Bytes>),
}

impl KvStore for RemoteStore {
    fn page_size(&self) -> usize {
        self.inner.info.page_size
    }

    fn block_bytes(&self) -> usize {
        self.inner.info.block_bytes
    }

    fn layout(&self) -> String {
        self.inner.info.layout.clone()
    }

    fn namespace(&self, _tenant: &str, model: &str) -> Result<Arc<dyn KvNamespace>> {
        Ok(Arc::new(RemoteNs {
            remote: self.inner.clone(),
            scope: Scope::model(model),
        }))
    }
}

impl KvNamespace for RemoteNs {
    fn lookup(&self, tokens: &[u32], ttl: Duration) -> Result<Option<Box<dyn CachedPrefix>>> {
        let (client, scope, tokens) = (
            self.remote.client.clone(),
            self.scope.clone(),
            tokens.to_vec(),
        );
        let shm = self.remote.shm.is_some();
        let ttl_ms = ttl.as_millis() as u64;
        let found = self.remote.call(async move {
            let hit = client.lookup(&scope, &tokens, Some(ttl_ms), true).await?;
            let Some(lease) = hit.lease.filter(|_| hit.pages > 0) else {
                return Ok(None);
            };
            let blocks = if shm {
                match client.load_shm(lease, 0, hit.pages).await {
                    Ok(offsets) if offsets.len() == hit.pages => Some(RemoteBlocks::Shm(offsets)),
                    _ => None,
                }
            } else {
                None
            };
            let blocks = match blocks {
                Some(b) => b,
                None => match client.load(lease, 0, hit.pages).await {
                    Ok(loaded) if loaded.len() == hit.pages => {
                        RemoteBlocks::Loaded(loaded.into_iter().map(|b| b.data).collect())
                    }
                    Ok(_) | Err(_) => {
                        let _ = client.release(lease).await;
                        return Ok(None);
                    }
                },
            };
            Ok(Some((lease, blocks)))
        });
        let found = found.map_err(remote_err)?;
        Ok(found.map(|(lease, blocks)| {
            Box::new(RemotePrefix {
                remote: self.remote.clone(),
                lease,
                blocks,
            }) as Box<dyn CachedPrefix>
        }))
    }

    /// A `Store` call with the blocks of pages `first_page..` only (the
    /// tokens go whole: the server names pages by their prefix).
    fn store(&self, tokens: &[u32], first_page: usize, data: &[u8]) -> Result<Stored> {
        let (client, scope, tokens) = (
            self.remote.client.clone(),
            self.scope.clone(),
            tokens.to_vec(),
        );
        let data = bytes::Bytes::copy_from_slice(data);
        let block = self.remote.info.block_bytes;
        let reply = self
            .remote
            .call(async move { client.store(&scope, &tokens, first_page, data, block).await });
        match reply {
            Ok(r) => Ok(Stored::Pages(r.stored_pages)),
            // The server's answer when the pages before `first_page` are
            // not cached.
            Err(e) if e.code() == Code::FailedPrecondition => Ok(Stored::PrefixMissing),
            Err(e) => Err(remote_err(e)),
        }
    }

    /// A `Store` call of no blocks with the output length.
    fn finished(&self, tokens: &[u32], output_tokens: u32) -> Result<()> {
        let (client, scope, tokens) = (
            self.remote.client.clone(),
            self.scope.clone(),
            tokens.to_vec(),
        );
        let (block, page_size) = (self.remote.info.block_bytes, self.remote.info.page_size);
        let pages = tokens.len() / page_size.max(1);
        self.remote
            .call(async move {
                let empty = bytes::Bytes::new();
                client
                    .store_with_output(&scope, &tokens, pages, empty, block, output_tokens)
                    .await
            })
            .map_err(remote_err)?;
        Ok(())
    }
}

impl CachedPrefix for RemotePrefix {
    fn pages(&self) -> usize {
        match &self.blocks {
            RemoteBlocks::Shm(o) => o.len(),
            RemoteBlocks::Loaded(b) => b.len(),
        }
    }

    fn page(&self, i: usize) -> Result<PageBytes<'_>> {
        match &self.blocks {
            RemoteBlocks::Shm(offsets) => {
                let shm = self
                    .remote
                    .shm
                    .as_ref()
                    .expect("shm blocks come with the mapping");
                let block = shm
                    .block(offsets[i])
                    .map_err(|_| EngineError::KvLost { page: i })?;
                Ok(PageBytes(PageInner::Slice(block)))
            }
            RemoteBlocks::Loaded(b) => Ok(PageBytes(PageInner::Slice(&b[i]))),
        }
    }
}

impl Drop for RemotePrefix {
    fn drop(&mut self) {
        // Fire and forget: an unreleased lease expires on its own.
        let (client, lease) = (self.remote.client.clone(), self.lease);
        self.remote.handle.spawn(async move {
            let _ = client.release(lease).await;
        });
    }
}
