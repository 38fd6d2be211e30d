//! Synchronisation primitives, swapped for loom's by the `loom` feature so that the
//! group-commit handoff can be model-checked: `cargo test --release --features loom --lib
//! loom`. (A feature of ours rather than `--cfg loom`, which would also switch tokio into
//! its own loom mode; and rather than a `--cfg` of our own in `RUSTFLAGS`, which would
//! rebuild every dependency, 3 min 24 s of a CI run.)

//! Only the library's own unit tests take loom's: the tests' dev-dependency on the crate
//! itself builds the library once more as an ordinary dependency, without loom. With the
//! feature on, the library's other unit tests would run on loom's primitives outside a
//! model and fail, so it is for the command above only (never `--all-features`).

#[cfg(all(feature = "loom", test))]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(all(feature = "loom", test)))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Locks, ignoring poisoning: every critical section here leaves the state consistent
/// before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
