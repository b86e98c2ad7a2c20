//! KV events: the index's changes, numbered, fanned out to subscribers.
//!
//! The index calls [`EventBus::emit`] under the namespace's lock, so events
//! are numbered in the order they happened, and a snapshot read under the
//! same lock (with [`EventBus::seq`]) is exact as of its number. Each
//! subscriber has a bounded backlog: one that falls behind is cut off (its
//! stream ends with the count it missed) rather than growing memory.

use super::namespaces::Namespaces;
use parking_lot::Mutex;
use radix_tree::{EventSink, IndexEvent, NamespaceId};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;

/// Which namespaces a subscriber follows.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Every namespace of the tenant, present and future.
    Tenant(Arc<str>),
    Namespaces(HashSet<NamespaceId>),
}

/// What a subscriber receives: numbered events.
pub type Numbered = Vec<(u64, IndexEvent)>;

/// The receiving end of a subscription.
#[derive(Debug)]
pub struct Subscription {
    pub rx: mpsc::UnboundedReceiver<Numbered>,
    /// Events queued and not yet taken; the receiver subtracts what it takes.
    pub backlog: Arc<AtomicUsize>,
    /// Events dropped when the subscriber was cut off.
    pub lagged: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Subscriber {
    filter: Filter,
    tx: mpsc::UnboundedSender<Numbered>,
    backlog: Arc<AtomicUsize>,
    lagged: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Inner {
    seq: u64,
    subscribers: Vec<Subscriber>,
}

#[derive(Debug)]
pub struct EventBus {
    inner: Mutex<Inner>,
    namespaces: Mutex<Weak<Namespaces>>,
    max_backlog: usize,
    max_subscribers: usize,
    /// Subscribers cut off for reading too slowly.
    pub cut_off: AtomicU64,
}

impl EventBus {
    pub fn new(max_backlog: usize, max_subscribers: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            namespaces: Mutex::new(Weak::new()),
            max_backlog,
            max_subscribers,
            cut_off: AtomicU64::new(0),
        }
    }

    /// Where tenant filters look namespaces up (set once the registry exists).
    pub fn set_namespaces(&self, namespaces: &Arc<Namespaces>) {
        *self.namespaces.lock() = Arc::downgrade(namespaces);
    }

    /// The number of the last event emitted.
    pub fn seq(&self) -> u64 {
        self.inner.lock().seq
    }

    pub fn subscribe(&self, filter: Filter) -> Option<Subscription> {
        let mut inner = self.inner.lock();
        inner.subscribers.retain(|s| !s.tx.is_closed());
        if inner.subscribers.len() >= self.max_subscribers {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let lagged = Arc::new(AtomicU64::new(0));
        inner.subscribers.push(Subscriber {
            filter,
            tx,
            backlog: backlog.clone(),
            lagged: lagged.clone(),
        });
        Some(Subscription {
            rx,
            backlog,
            lagged,
        })
    }

    pub fn subscribers(&self) -> usize {
        self.inner.lock().subscribers.len()
    }
}

fn event_ns(e: &IndexEvent) -> NamespaceId {
    match *e {
        IndexEvent::Stored { ns, .. }
        | IndexEvent::Removed { ns, .. }
        | IndexEvent::Cleared { ns } => ns,
    }
}

impl EventSink for EventBus {
    fn emit(&self, events: &[IndexEvent]) {
        let mut inner = self.inner.lock();
        let first = inner.seq + 1;
        inner.seq += events.len() as u64;
        if inner.subscribers.is_empty() {
            return;
        }
        let namespaces = self.namespaces.lock().upgrade();
        let max_backlog = self.max_backlog;
        let cut_off = &self.cut_off;
        inner.subscribers.retain(|s| {
            let batch: Numbered = events
                .iter()
                .zip(first..)
                .filter(|(e, _)| match &s.filter {
                    Filter::Namespaces(set) => set.contains(&event_ns(e)),
                    Filter::Tenant(t) => namespaces
                        .as_ref()
                        .is_some_and(|n| n.owned_by(event_ns(e), t)),
                })
                .map(|(e, seq)| (seq, *e))
                .collect();
            if batch.is_empty() {
                return !s.tx.is_closed();
            }
            let n = batch.len();
            if s.backlog.load(Ordering::Relaxed) + n > max_backlog {
                // Too slow: cut off (dropping the sender ends its stream).
                s.lagged.store(n as u64, Ordering::Relaxed);
                cut_off.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            s.backlog.fetch_add(n, Ordering::Relaxed);
            s.tx.send(batch).is_ok()
        });
    }
}
