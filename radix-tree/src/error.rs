use crate::namespace::NamespaceId;

/// Everything that can go wrong in an index call. Bad input is an error,
/// never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("page size {0} is out of range (1..={max})", max = crate::MAX_PAGE_SIZE)]
    InvalidPageSize(usize),
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
    #[error("the index holds its maximum of {0} namespaces")]
    TooManyNamespaces(usize),
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(NamespaceId),
    #[error("namespace already exists with page size {existing}, asked for {requested}")]
    NamespaceConflict { existing: usize, requested: usize },
    #[error("{tokens} tokens exceed the per-call limit of {limit}")]
    TooManyTokens { tokens: usize, limit: usize },
    #[error("{pages} whole pages need {pages} block ids, got {blocks}")]
    BlockCountMismatch { pages: usize, blocks: usize },
    #[error("block id {0} is reserved")]
    InvalidBlock(u32),
    #[error("nothing of this prompt is cached")]
    NotCached,
    #[error("page {0} is not in this namespace")]
    UnknownPage(crate::PageHash),
    #[error("page already has a copy on this tier")]
    AlreadyPresent,
    #[error("page has no copy on this tier")]
    NotPresent,
    #[error("page is pinned by a lease")]
    Pinned,
    #[error("pin cap reached: tenant holds {pinned} pinned pages, asked for {requested} more, cap {cap}")]
    PinCapExceeded {
        pinned: u64,
        requested: u64,
        cap: u64,
    },
    #[error("lease {0:?} has expired or was released")]
    LeaseGone(crate::LeaseId),
    #[error("lease {0:?} was never issued")]
    UnknownLease(crate::LeaseId),
    #[error("a lease needs a TTL above zero")]
    ZeroTtl,
}

pub type Result<T, E = IndexError> = std::result::Result<T, E>;
