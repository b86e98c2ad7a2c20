//! The namespaces the service has handed out: (tenant, model, adapter) to
//! the index's id and back, so events and stats can be told per tenant.

use crate::Cache;
use parking_lot::RwLock;
use proto::v1::Scope;
use radix_tree::NamespaceId;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::Status;

/// Longest model or adapter name.
const MAX_NAME_BYTES: usize = 256;
/// Most namespaces one tenant may create (each costs index memory).
const MAX_PER_TENANT: usize = 1024;

/// A namespace's owner and names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsInfo {
    pub tenant: Arc<str>,
    pub model: String,
    pub adapter: String,
}

impl NsInfo {
    pub fn scope(&self) -> Scope {
        Scope {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_key: HashMap<(Arc<str>, String, String), NamespaceId>,
    info: HashMap<NamespaceId, NsInfo>,
    per_tenant: HashMap<Arc<str>, Vec<NamespaceId>>,
}

#[derive(Debug, Default)]
pub struct Namespaces {
    maps: RwLock<Maps>,
}

impl Namespaces {
    /// Registers the namespaces the cache already has (recovered from disk).
    pub fn from_cache(cache: &Cache) -> Self {
        let me = Self::default();
        for (ns, key) in cache.namespaces() {
            me.record(ns, Arc::from(key.tenant.as_str()), key.model, key.adapter);
        }
        me
    }

    /// The tenant's namespace for `scope`, created on first use.
    pub fn resolve(
        &self,
        cache: &Cache,
        tenant: &str,
        scope: Option<&Scope>,
    ) -> Result<NamespaceId, Status> {
        let (model, adapter) = names(scope)?;
        if let Some(ns) = self.find_names(tenant, model, adapter) {
            return Ok(ns);
        }
        if self
            .maps
            .read()
            .per_tenant
            .get(tenant)
            .is_some_and(|v| v.len() >= MAX_PER_TENANT)
        {
            return Err(Status::resource_exhausted(format!(
                "the tenant has its maximum of {MAX_PER_TENANT} namespaces"
            )));
        }
        let ns = cache.namespace(tenant, model, adapter)?;
        self.record(
            ns,
            Arc::from(tenant),
            model.to_string(),
            adapter.to_string(),
        );
        Ok(ns)
    }

    /// The tenant's namespace for `scope` if it exists (never creates one).
    pub fn find(&self, tenant: &str, scope: Option<&Scope>) -> Result<Option<NamespaceId>, Status> {
        let (model, adapter) = names(scope)?;
        Ok(self.find_names(tenant, model, adapter))
    }

    fn find_names(&self, tenant: &str, model: &str, adapter: &str) -> Option<NamespaceId> {
        let maps = self.maps.read();
        // Keyed by owned strings; a miss costs one lookup with a temporary.
        maps.by_key
            .get(&(Arc::from(tenant), model.to_string(), adapter.to_string()))
            .copied()
    }

    fn record(&self, ns: NamespaceId, tenant: Arc<str>, model: String, adapter: String) {
        let mut maps = self.maps.write();
        if maps.info.contains_key(&ns) {
            return;
        }
        maps.by_key
            .insert((tenant.clone(), model.clone(), adapter.clone()), ns);
        maps.per_tenant.entry(tenant.clone()).or_default().push(ns);
        maps.info.insert(
            ns,
            NsInfo {
                tenant,
                model,
                adapter,
            },
        );
    }

    pub fn info(&self, ns: NamespaceId) -> Option<NsInfo> {
        self.maps.read().info.get(&ns).cloned()
    }

    /// Whether `ns` belongs to `tenant` (cheap: for the event filter).
    pub fn owned_by(&self, ns: NamespaceId, tenant: &str) -> bool {
        self.maps
            .read()
            .info
            .get(&ns)
            .is_some_and(|i| &*i.tenant == tenant)
    }

    pub fn of_tenant(&self, tenant: &str) -> Vec<NamespaceId> {
        self.maps
            .read()
            .per_tenant
            .get(tenant)
            .cloned()
            .unwrap_or_default()
    }

    pub fn tenants(&self) -> Vec<Arc<str>> {
        self.maps.read().per_tenant.keys().cloned().collect()
    }
}

fn names(scope: Option<&Scope>) -> Result<(&str, &str), Status> {
    let (model, adapter) = scope.map_or(("", ""), |s| (s.model.as_str(), s.adapter.as_str()));
    if model.len() > MAX_NAME_BYTES || adapter.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "model and adapter names are at most {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok((model, adapter))
}
