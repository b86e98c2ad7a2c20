use crate::error::{IndexError, Result};
use crate::hash::{namespace_seed, PageHash};

/// The identity of a cache namespace: blocks are shared only within one.
/// The server derives `tenant` from the caller's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct NamespaceKey {
    pub tenant: String,
    pub model: String,
    /// Digest of the KV layout (layers, heads, head dim, dtype, page size).
    pub layout: String,
    /// LoRA / adapter id; empty for the base model.
    pub adapter: String,
}

impl NamespaceKey {
    pub fn new(
        tenant: impl Into<String>,
        model: impl Into<String>,
        layout: impl Into<String>,
        adapter: impl Into<String>,
    ) -> Self {
        Self {
            tenant: tenant.into(),
            model: model.into(),
            layout: layout.into(),
            adapter: adapter.into(),
        }
    }

    /// Length-prefixed encoding (u32 little-endian length, then the bytes, per
    /// field), so two different tuples never produce the same bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let fields = [&self.tenant, &self.model, &self.layout, &self.adapter];
        let mut out = Vec::with_capacity(16 + fields.iter().map(|f| f.len()).sum::<usize>());
        for f in fields {
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        out
    }

    /// The seed the first page's hash chains from.
    pub fn seed(&self) -> PageHash {
        namespace_seed(&self.to_bytes())
    }
}

/// A namespace's handle inside one index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub u32);

/// Per-namespace settings, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceConfig {
    page_size: usize,
}

impl NamespaceConfig {
    pub fn new(page_size: usize) -> Result<Self> {
        if page_size == 0 || page_size > crate::MAX_PAGE_SIZE {
            return Err(IndexError::InvalidPageSize(page_size));
        }
        Ok(Self { page_size })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self { page_size: 16 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_never_collide_across_field_boundaries() {
        let a = NamespaceKey::new("ab", "c", "", "");
        let b = NamespaceKey::new("a", "bc", "", "");
        assert_ne!(a.to_bytes(), b.to_bytes());
        assert_ne!(a.seed(), b.seed());
    }

    #[test]
    fn page_size_is_validated() {
        assert_eq!(NamespaceConfig::new(0), Err(IndexError::InvalidPageSize(0)));
        assert_eq!(
            NamespaceConfig::new(257),
            Err(IndexError::InvalidPageSize(257))
        );
        assert_eq!(NamespaceConfig::new(256).unwrap().page_size(), 256);
    }
}
