//! The one place where errors become gRPC statuses.

use crate::error::CacheError;
use radix_tree::IndexError;
use tiers::TierError;
use tonic::{Code, Status};

impl From<CacheError> for Status {
    fn from(e: CacheError) -> Status {
        let code = match &e {
            CacheError::InvalidArgument(_) => Code::InvalidArgument,
            CacheError::InvalidConfig(_) => Code::Internal,
            CacheError::Full(_) => Code::ResourceExhausted,
            CacheError::Index(i) => match i {
                IndexError::TooManyTokens { .. }
                | IndexError::InvalidPageSize(_)
                | IndexError::BlockCountMismatch { .. }
                | IndexError::InvalidBlock(_)
                | IndexError::ZeroTtl => Code::InvalidArgument,
                IndexError::PinCapExceeded { .. } | IndexError::TooManyNamespaces(_) => {
                    Code::ResourceExhausted
                }
                IndexError::LeaseGone(_)
                | IndexError::UnknownPage(_)
                | IndexError::Pinned
                | IndexError::NamespaceConflict { .. } => Code::FailedPrecondition,
                IndexError::UnknownLease(_) | IndexError::UnknownNamespace(_) => Code::NotFound,
                IndexError::NotCached | IndexError::NotPresent => Code::NotFound,
                IndexError::AlreadyPresent => Code::AlreadyExists,
                IndexError::InvalidConfig(_) => Code::Internal,
            },
            CacheError::Tier(t) => match t {
                TierError::Full => Code::ResourceExhausted,
                TierError::WrongLength { .. } | TierError::MetaTooLarge { .. } => {
                    Code::InvalidArgument
                }
                // A corrupt or vanished block is a miss to callers; here it
                // means the block left between the lookup and the read.
                TierError::Corrupt(_) | TierError::Empty(_) | TierError::NoSuchSlot { .. } => {
                    Code::NotFound
                }
                TierError::Io(_) | TierError::Device(_) => Code::Unavailable,
                TierError::InvalidConfig(_) => Code::Internal,
            },
        };
        Status::new(code, e.to_string())
    }
}

/// INVALID_ARGUMENT with a message.
pub(crate) fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}
