//! Who is calling: bearer tokens name tenants. The tenant part of every
//! namespace comes from here, never from a request body.

use super::config::ServerConfig;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Status};

/// A tenant as the service sees it.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// Most pages on the fastest tier (0: no quota).
    pub quota_pages: u64,
    /// May map the shared-memory host tier.
    pub shm: bool,
}

/// Maps credentials to tenants.
#[derive(Debug)]
pub struct Auth {
    by_token: HashMap<String, Arc<Tenant>>,
    /// Everyone, when no tenants are configured.
    anonymous: Option<Arc<Tenant>>,
    admin_token: Option<String>,
}

/// The tenant every caller is when the server has no tokens.
pub const DEFAULT_TENANT: &str = "default";

impl Auth {
    pub fn new(config: &ServerConfig) -> Self {
        let by_token = config
            .tenants
            .iter()
            .map(|t| {
                let tenant = Tenant {
                    name: t.name.clone(),
                    quota_pages: t.quota_pages,
                    shm: t.shm,
                };
                (t.token.clone(), Arc::new(tenant))
            })
            .collect::<HashMap<_, _>>();
        let anonymous = by_token.is_empty().then(|| {
            Arc::new(Tenant {
                name: DEFAULT_TENANT.into(),
                quota_pages: 0,
                shm: true,
            })
        });
        Self {
            by_token,
            anonymous,
            admin_token: config.admin_token.clone(),
        }
    }

    /// The caller's tenant. UNAUTHENTICATED without a known token on a
    /// server that has tokens.
    pub fn tenant<T>(&self, request: &Request<T>) -> Result<Arc<Tenant>, Status> {
        if let Some(t) = &self.anonymous {
            return Ok(t.clone());
        }
        let token = bearer(request)?;
        // A constant-time walk over every token: how long the check takes
        // says nothing about how close a guess was.
        let mut found = None;
        for (known, tenant) in &self.by_token {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(tenant.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// Admits only the admin token.
    pub fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(admin) = &self.admin_token else {
            return Err(Status::permission_denied(
                "this server has no admin token configured",
            ));
        };
        let token = bearer(request)?;
        if constant_time_eq(admin.as_bytes(), token.as_bytes()) {
            Ok(())
        } else if self.by_token.keys().any(|k| k == token) {
            Err(Status::permission_denied(
                "an admin call needs the admin token",
            ))
        } else {
            Err(Status::unauthenticated("unknown token"))
        }
    }
}

fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <token>\""))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
