//! Synchronisation primitives, swapped for loom's under `--cfg quire_loom` so that the
//! group-commit handoff can be model-checked. (A crate-specific cfg name, because
//! `cfg(loom)` would also switch tokio into its own loom mode.)

//! Only the library's own unit tests take loom's: the tests' dev-dependency on the crate
//! itself builds the library once more as an ordinary dependency, without loom.

#[cfg(all(quire_loom, test))]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(all(quire_loom, test)))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks, ignoring poisoning: every critical section here leaves the state consistent
/// before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
