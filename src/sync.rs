//! Synchronisation primitives, swapped for loom's under `--cfg quire_loom` so that the
//! group-commit handoff can be model-checked. (A crate-specific cfg name, because
//! `cfg(loom)` would also switch tokio into its own loom mode.)

#[cfg(quire_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(quire_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks, ignoring poisoning: every critical section here leaves the state consistent
/// before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
