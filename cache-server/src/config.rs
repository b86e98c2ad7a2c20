use crate::error::{CacheError, Result};
use std::path::PathBuf;
use std::sync::Arc;
use tiers::BlockPool;

/// When new blocks get a disk copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Only when evicted from host (demotion on pressure).
    WriteBack,
    /// As soon as they are stored.
    WriteThrough,
    /// Once a page has been hit `n` times (so one-off pages never cost disk
    /// bandwidth); then as write-through.
    WriteThroughAfterHits(u32),
}

/// Settings of a [`Cache`](crate::Cache). Build with [`CacheConfig::builder`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub(crate) page_size: usize,
    pub(crate) block_bytes: usize,
    pub(crate) layout: String,
    pub(crate) host_bytes: usize,
    pub(crate) disk: Option<(PathBuf, u64)>,
    pub(crate) disk_io: Option<Arc<dyn tiers::io::FileIo>>,
    pub(crate) device: Option<Arc<dyn BlockPool>>,
    pub(crate) policy: String,
    pub(crate) write_mode: WriteMode,
    pub(crate) movers: usize,
    pub(crate) max_tokens_per_call: usize,
    pub(crate) max_pinned_pages_per_tenant: u64,
    pub(crate) clock: Option<Arc<dyn radix_tree::Clock>>,
    pub(crate) host_shm: Option<PathBuf>,
    pub(crate) events: Option<Arc<dyn radix_tree::EventSink>>,
}

impl CacheConfig {
    /// A cache of `block_bytes`-byte blocks, one per `page_size` tokens, laid
    /// out as `layout` (a digest of model, layers, heads, dtype: blocks of
    /// another layout are never mixed in).
    pub fn builder(
        page_size: usize,
        block_bytes: usize,
        layout: impl Into<String>,
    ) -> CacheConfigBuilder {
        CacheConfigBuilder(CacheConfig {
            page_size,
            block_bytes,
            layout: layout.into(),
            host_bytes: 1 << 30,
            disk: None,
            disk_io: None,
            device: None,
            policy: "lru".into(),
            write_mode: WriteMode::WriteBack,
            movers: 2,
            max_tokens_per_call: 1 << 20,
            max_pinned_pages_per_tenant: u64::MAX,
            clock: None,
            host_shm: None,
            events: None,
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    pub fn layout(&self) -> &str {
        &self.layout
    }

    pub fn max_tokens_per_call(&self) -> usize {
        self.max_tokens_per_call
    }
}

/// Builder for [`CacheConfig`].
#[derive(Debug, Clone)]
pub struct CacheConfigBuilder(CacheConfig);

impl CacheConfigBuilder {
    /// Host RAM for blocks, in bytes (default 1 GiB).
    pub fn host_bytes(mut self, bytes: usize) -> Self {
        self.0.host_bytes = bytes;
        self
    }

    /// A disk tier of `bytes` under `dir` (none by default).
    pub fn disk(mut self, dir: impl Into<PathBuf>, bytes: u64) -> Self {
        self.0.disk = Some((dir.into(), bytes));
        self
    }

    /// The file I/O the disk tier uses (default: real files; tests inject
    /// faults here).
    pub fn disk_io(mut self, io: Arc<dyn tiers::io::FileIo>) -> Self {
        self.0.disk_io = Some(io);
        self
    }

    /// A device-memory tier above host (for example a CUDA pool).
    pub fn device(mut self, pool: Arc<dyn BlockPool>) -> Self {
        self.0.device = Some(pool);
        self
    }

    /// Eviction policy by name (see `radix_tree::policy::POLICY_NAMES`).
    pub fn policy(mut self, name: impl Into<String>) -> Self {
        self.0.policy = name.into();
        self
    }

    pub fn write_mode(mut self, mode: WriteMode) -> Self {
        self.0.write_mode = mode;
        self
    }

    /// Worker threads that move blocks between tiers (default 2).
    pub fn movers(mut self, n: usize) -> Self {
        self.0.movers = n;
        self
    }

    pub fn max_tokens_per_call(mut self, n: usize) -> Self {
        self.0.max_tokens_per_call = n;
        self
    }

    pub fn max_pinned_pages_per_tenant(mut self, n: u64) -> Self {
        self.0.max_pinned_pages_per_tenant = n;
        self
    }

    /// The clock lease TTLs run on (default: the monotonic wall clock;
    /// tests pass a `radix_tree::ManualClock`).
    pub fn clock(mut self, clock: Arc<dyn radix_tree::Clock>) -> Self {
        self.0.clock = Some(clock);
        self
    }

    /// Keeps the host tier in a shared-memory file at `path` (for example
    /// under `/dev/shm`), so local clients can map it and read and write
    /// blocks in place. Anyone who can open the file sees every block: it
    /// is created `0600`, for clients running as the server's user.
    pub fn host_shm(mut self, path: impl Into<PathBuf>) -> Self {
        self.0.host_shm = Some(path.into());
        self
    }

    /// Where the index reports blocks stored and removed (KV events).
    pub fn events(mut self, sink: Arc<dyn radix_tree::EventSink>) -> Self {
        self.0.events = Some(sink);
        self
    }

    pub fn build(self) -> Result<CacheConfig> {
        let c = &self.0;
        radix_tree::NamespaceConfig::new(c.page_size)?;
        if c.block_bytes == 0 {
            return Err(CacheError::InvalidConfig(
                "block size must be above zero".into(),
            ));
        }
        if radix_tree::policy::by_name(&c.policy).is_none() {
            return Err(CacheError::InvalidConfig(format!(
                "unknown policy {:?}; known: {}",
                c.policy,
                radix_tree::policy::POLICY_NAMES.join(", ")
            )));
        }
        if c.movers == 0 {
            return Err(CacheError::InvalidConfig(
                "at least one mover thread is needed".into(),
            ));
        }
        if let Some(device) = &c.device {
            if device.geometry().block_bytes != c.block_bytes {
                return Err(CacheError::InvalidConfig(
                    "the device pool's block size differs".into(),
                ));
            }
        }
        Ok(self.0)
    }
}
