use radix_tree::IndexError;
use tiers::TierError;

/// Errors of the `Cache` facade. A corrupt block is never one of them: it
/// becomes a miss (and a counter).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Tier(#[from] TierError),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Every block of the tier is pinned or in flight: nothing can be evicted.
    #[error("the {0} tier is full of pinned blocks")]
    Full(&'static str),
}

pub type Result<T, E = CacheError> = std::result::Result<T, E>;
