//! The sidecar's settings: one TOML file, every field optional (the
//! defaults start a useful cache), flags override it.

use crate::config::{CacheConfig, WriteMode};
use crate::error::{CacheError, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything `radixkv-server` is configured with.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP address of the gRPC service; `None` for none. Loopback by
    /// default; any other address needs tenants with tokens and TLS (or
    /// `insecure = true`).
    pub listen: Option<SocketAddr>,
    /// Unix socket of the gRPC service (default `<data_dir>/radixkv.sock`).
    pub unix_socket: Option<PathBuf>,
    /// The local socket: Lookup, Release, Renew and Health without HTTP/2,
    /// for engines on this machine (see `cache_server::local`); default
    /// `<data_dir>/radixkv-local.sock`.
    pub local_socket: Option<PathBuf>,
    /// Serve the local socket (on by default).
    pub serve_local_socket: bool,
    /// Prometheus `/metrics` and `/health` over HTTP; `None` for none.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the disk tier and the socket live.
    pub data_dir: PathBuf,
    pub page_size: usize,
    pub block_bytes: usize,
    /// Digest of the KV layout the blocks have (model, layers, heads,
    /// dtype): blocks of another layout are never mixed in.
    pub layout: String,
    pub host_bytes: usize,
    /// Disk tier capacity; 0 for no disk tier.
    pub disk_bytes: u64,
    /// GPU-memory tier capacity above host; 0 for none. Needs a build with
    /// the cargo feature `cuda` and a CUDA GPU; the server refuses to start
    /// otherwise rather than silently run without it.
    pub device_bytes: usize,
    /// Which GPU holds the device tier (CUDA device ordinal).
    pub device_ordinal: usize,
    /// Put the host tier in this shared-memory file, so local clients can
    /// map it (tenants with `shm = true` are told where it is).
    pub shm_path: Option<PathBuf>,
    pub policy: String,
    /// `write-back`, `write-through`, or `write-through-after-hits:N`.
    pub write_mode: String,
    /// Token ids must be below this (0: no check).
    pub vocab_size: u32,
    pub admin_token: Option<String>,
    pub tenants: Vec<TenantConfig>,
    pub tls: Option<TlsConfig>,
    /// Allow a non-loopback listener without tokens or TLS.
    pub insecure: bool,
    pub limits: Limits,
}

/// A tenant and the bearer token that names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub token: String,
    /// Most pages the tenant may keep on the fastest tier (0: no quota);
    /// past it, its stores evict its own pages, never another tenant's.
    #[serde(default)]
    pub quota_pages: u64,
    /// May map the shared-memory host tier (which shows every tenant's
    /// blocks: only for trusted, co-located engines).
    #[serde(default)]
    pub shm: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Caps on what one request or one tenant can ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest gRPC message in either direction.
    pub max_message_bytes: usize,
    pub max_tokens_per_request: usize,
    /// Leases and pins a tenant may hold at once.
    pub max_leases_per_tenant: usize,
    pub max_pinned_pages_per_tenant: u64,
    /// Longest lease or pin TTL, in milliseconds.
    pub max_ttl_ms: u64,
    /// Events buffered per subscriber before it is cut off as too slow.
    pub event_buffer: usize,
    pub max_subscribers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 << 20,
            max_tokens_per_request: 1 << 20,
            max_leases_per_tenant: 4096,
            max_pinned_pages_per_tenant: u64::MAX,
            max_ttl_ms: 3_600_000,
            event_buffer: 65_536,
            max_subscribers: 64,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
            unix_socket: None,
            local_socket: None,
            serve_local_socket: true,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            data_dir: PathBuf::from("radixkv-data"),
            page_size: 16,
            // SmolLM2-135M's KV for 16 tokens in f32 (the bundled engine's
            // layout): 30 layers x 2 x 3 heads x 64 x 16 x 4 bytes.
            block_bytes: 737_280,
            layout: "default".into(),
            host_bytes: 1 << 30,
            disk_bytes: 4 << 30,
            device_bytes: 0,
            device_ordinal: 0,
            shm_path: None,
            policy: "lru".into(),
            write_mode: "write-back".into(),
            vocab_size: 0,
            admin_token: None,
            tenants: Vec::new(),
            tls: None,
            insecure: false,
            limits: Limits::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| CacheError::InvalidConfig(e.to_string()))
    }

    pub fn unix_socket_path(&self) -> PathBuf {
        self.unix_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("radixkv.sock"))
    }

    pub fn local_socket_path(&self) -> Option<PathBuf> {
        self.serve_local_socket.then(|| {
            self.local_socket
                .clone()
                .unwrap_or_else(|| self.data_dir.join("radixkv-local.sock"))
        })
    }

    /// Checks the settings that do not depend on the cache: security
    /// first (a listener beyond loopback needs tokens and TLS).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CacheError::InvalidConfig(m));
        if let Some(addr) = self.listen {
            if !addr.ip().is_loopback() && !self.insecure {
                if self.tenants.is_empty() {
                    return bad(format!(
                        "listening on {addr} (not loopback) needs [[tenants]] with tokens \
                         (or insecure = true)"
                    ));
                }
                if self.tls.is_none() {
                    return bad(format!(
                        "listening on {addr} (not loopback) needs [tls] cert and key \
                         (or insecure = true)"
                    ));
                }
            }
        }
        if let Some(addr) = self.metrics_listen {
            if !addr.ip().is_loopback() && !self.insecure {
                return bad(format!(
                    "metrics on {addr} (not loopback) would show every tenant's figures; \
                     set insecure = true to allow it"
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty() || t.token.len() < 8 {
                return bad(format!(
                    "tenant {:?}: a name and a token of at least 8 characters are needed",
                    t.name
                ));
            }
            if !names.insert(&t.name) || !tokens.insert(&t.token) {
                return bad(format!("tenant {:?}: name or token used twice", t.name));
            }
            if Some(&t.token) == self.admin_token.as_ref() {
                return bad(format!("tenant {:?} has the admin token", t.name));
            }
        }
        if self.limits.max_message_bytes < self.block_bytes + 4096 {
            return bad(format!(
                "max_message_bytes {} cannot carry one block of {} bytes",
                self.limits.max_message_bytes, self.block_bytes
            ));
        }
        parse_write_mode(&self.write_mode)?;
        Ok(())
    }

    /// The cache these settings describe (without its event sink).
    pub fn cache_config(&self) -> Result<crate::CacheConfigBuilder> {
        let mut b = CacheConfig::builder(self.page_size, self.block_bytes, self.layout.clone())
            .host_bytes(self.host_bytes)
            .policy(self.policy.clone())
            .write_mode(parse_write_mode(&self.write_mode)?)
            .max_tokens_per_call(self.limits.max_tokens_per_request)
            .max_pinned_pages_per_tenant(self.limits.max_pinned_pages_per_tenant);
        if self.disk_bytes > 0 {
            b = b.disk(self.data_dir.join("disk"), self.disk_bytes);
        }
        if let Some(p) = &self.shm_path {
            b = b.host_shm(p);
        }
        if self.device_bytes > 0 {
            b = b.device(self.device_pool()?);
        }
        Ok(b)
    }

    /// The GPU tier `device_bytes` asks for.
    #[cfg(feature = "cuda")]
    fn device_pool(&self) -> Result<std::sync::Arc<dyn tiers::BlockPool>> {
        let geometry = crate::block_geometry(self.page_size, self.block_bytes, &self.layout)?;
        let config = tiers::device::DevicePoolConfig::builder(geometry)
            .capacity_bytes(self.device_bytes)
            .ordinal(self.device_ordinal)
            .build()?;
        Ok(std::sync::Arc::new(tiers::cuda::CudaPool::new(config)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn device_pool(&self) -> Result<std::sync::Arc<dyn tiers::BlockPool>> {
        Err(CacheError::InvalidConfig(format!(
            "device_bytes = {} asks for a GPU tier, but this build has no CUDA support \
             (build with --features cuda)",
            self.device_bytes
        )))
    }
}

fn parse_write_mode(s: &str) -> Result<WriteMode> {
    match s {
        "write-back" => Ok(WriteMode::WriteBack),
        "write-through" => Ok(WriteMode::WriteThrough),
        other => match other
            .strip_prefix("write-through-after-hits:")
            .and_then(|n| n.parse().ok())
        {
            Some(n) => Ok(WriteMode::WriteThroughAfterHits(n)),
            None => Err(CacheError::InvalidConfig(format!(
                "write_mode {other:?}: expected write-back, write-through or \
                 write-through-after-hits:N"
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults_and_they_are_valid() {
        let c = ServerConfig::from_toml("").unwrap();
        c.validate().unwrap();
        assert!(c.listen.unwrap().ip().is_loopback());
        assert!(c.cache_config().unwrap().build().is_ok());
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_device_tier_needs_the_cuda_build() {
        let c = ServerConfig::from_toml("device_bytes = 1048576").unwrap();
        let err = c.cache_config().unwrap_err();
        assert!(
            matches!(&err, CacheError::InvalidConfig(m) if m.contains("--features cuda")),
            "{err}"
        );
    }

    /// With the feature, the tier opens on a GPU, and where there is none
    /// the server gets a device error, not a panic and not a silent
    /// cache without the tier it was asked for.
    #[test]
    #[cfg(feature = "cuda")]
    fn a_device_tier_opens_a_gpu_or_says_why_not() {
        let c = ServerConfig::from_toml("device_bytes = 7372800").unwrap();
        match c.cache_config() {
            Ok(b) => assert!(b.build().unwrap().device.is_some()),
            Err(CacheError::Tier(tiers::TierError::Device(why))) => {
                println!("skipped: no CUDA device ({why})");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn beyond_loopback_needs_tokens_and_tls() {
        let open = ServerConfig::from_toml("listen = \"0.0.0.0:1\"").unwrap();
        assert!(open.validate().unwrap_err().to_string().contains("tenants"));
        let tokens = ServerConfig::from_toml(
            "listen = \"0.0.0.0:1\"\n[[tenants]]\nname = \"a\"\ntoken = \"aaaaaaaa\"",
        )
        .unwrap();
        assert!(tokens.validate().unwrap_err().to_string().contains("tls"));
        let insecure = ServerConfig::from_toml("listen = \"0.0.0.0:1\"\ninsecure = true").unwrap();
        insecure.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, needle) in [
            ("bogus = 1", "unknown field"),
            ("write_mode = \"sometimes\"", "write_mode"),
            ("[[tenants]]\nname = \"a\"\ntoken = \"short\"", "8 characters"),
            (
                "[[tenants]]\nname = \"a\"\ntoken = \"aaaaaaaa\"\n[[tenants]]\nname = \"b\"\ntoken = \"aaaaaaaa\"",
                "twice",
            ),
            ("block_bytes = 1000000\n[limits]\nmax_message_bytes = 1000", "max_message_bytes"),
        ] {
            let err = ServerConfig::from_toml(text)
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
