//! Every lock and atomic the index uses comes from here, so that a model
//! checker (loom) can swap them for instrumented versions in one place.

pub(crate) use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub(crate) use std::hint::spin_loop;
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
pub(crate) use std::sync::{Arc, OnceLock};
pub(crate) use std::thread::yield_now;
