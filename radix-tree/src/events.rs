use crate::{NamespaceId, PageHash, Tier};

/// A change to what the index holds, in the spirit of vLLM's KV events.
/// The index emits them in order per namespace; a sink numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexEvent {
    /// A copy of the page now exists on `tier`.
    Stored {
        ns: NamespaceId,
        hash: PageHash,
        /// The parent page, or `None` for a namespace's first page.
        parent: Option<PageHash>,
        tier: Tier,
    },
    /// The page's copy on `tier` is gone.
    Removed {
        ns: NamespaceId,
        hash: PageHash,
        tier: Tier,
    },
    /// Every page of the namespace is gone.
    Cleared { ns: NamespaceId },
}

/// Receives events. It is called while the namespace's lock is held (so
/// events arrive in order): it must be quick and must not call the index.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    fn emit(&self, events: &[IndexEvent]);
}
