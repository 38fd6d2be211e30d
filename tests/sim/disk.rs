//! The sequencer as the simulated server sees it: the real [`LocalSequencer`], with a
//! disk task told when there is something to write (a log in `Background::Manual` has
//! no thread of its own), so that long idle stretches of simulated time cost nothing.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quire::sequencer::local::LocalSequencer;
use quire::sequencer::Sequencer;
use quire::sequencer::{DeleteRefused, Deletion, SubmitError, SubmitOp, Submitted};
use quire::wal::vfs::sim::SplitMix;
use tokio::sync::Notify;

use crate::wrapped::{Rules, Wrapped};

/// The local sequencer, whose appends tell the disk task there is work.
pub type SimSequencer = Wrapped<LocalSequencer, WakesDisk>;

/// Tells the disk task after each append (a submit, a deletion's tombstone).
pub struct WakesDisk {
    work: Arc<Notify>,
}

impl Rules<LocalSequencer> for WakesDisk {
    fn submit(
        &self,
        store: &LocalSequencer,
        doc_id: &str,
        op: &SubmitOp,
    ) -> Result<Submitted, SubmitError> {
        let submitted = store.submit(doc_id, op);
        self.work.notify_one();
        submitted
    }

    fn delete(
        &self,
        store: &LocalSequencer,
        doc_id: &str,
    ) -> Result<Option<Deletion>, DeleteRefused> {
        let deleted = store.delete(doc_id);
        self.work.notify_one();
        deleted
    }
}

/// The sequencer, and the disk task that writes and syncs each batch after a latency
/// drawn from `rng` (20 µs to 3 ms), and not while `paused` is set.
pub fn sim_sequencer(
    inner: Arc<LocalSequencer>,
    mut rng: SplitMix,
    paused: Arc<AtomicBool>,
) -> (SimSequencer, impl Future<Output = ()>) {
    let work = Arc::new(Notify::new());
    let disk = {
        let (inner, work) = (inner.clone(), work.clone());
        async move {
            loop {
                if !inner.wal().has_pending() {
                    work.notified().await;
                }
                let us = 20 + rng.below(3_000);
                tokio::time::sleep(Duration::from_micros(us)).await;
                while paused.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
                inner.step();
            }
        }
    };
    let sequencer = Wrapped {
        store: inner,
        rules: WakesDisk { work },
    };
    (sequencer, disk)
}
