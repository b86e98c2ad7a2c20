//! The atomics of the slot table ([`SlotTable`](crate::host::SlotTable)),
//! from one place so that a model checker (loom) can swap them for
//! instrumented versions: built with `--cfg loom`, the crate's unit tests
//! run the real slot table under loom's atomics (see `host::loom_tests`).
//!
//! Only the tests swap them (loom is a dev-dependency): a `--cfg loom`
//! build of the library itself keeps std's. The rest of the crate (mmaps,
//! disk, the mover) takes its atomics from std directly.

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
