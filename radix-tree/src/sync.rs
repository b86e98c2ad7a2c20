//! Every lock and atomic the index uses comes from here, so that a model
//! checker (loom) can swap them for instrumented versions in one place.

pub(crate) use parking_lot::{RwLock, RwLockWriteGuard};
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
pub(crate) use std::sync::{Arc, OnceLock};
