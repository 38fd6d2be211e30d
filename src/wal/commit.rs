//! The group-commit handoff between appenders and the one writer.
//!
//! Appenders call [`CommitQueue::enqueue`]: under one mutex the record gets the next
//! LSN and joins the pending batch, so LSN order is queue order. The writer thread
//! takes everything pending with [`CommitQueue::next_batch`], writes it with one
//! `write` and one `fdatasync`, then publishes the new durable LSN with
//! [`CommitQueue::complete`]; each appender waits for the durable LSN to reach its own.
//! An fsync error is fatal: [`CommitQueue::fail`] fails every pending and later append
//! and the durable LSN never moves again. This module does no I/O, which is what lets
//! `loom` check it (see the `loom_tests` module, run by `.ci/run`).
//!
//! **Deferred wake-ups.** A thread that promises to call [`CommitQueue::pay_owed_wake`]
//! before it goes idle (the server's runtime workers, from their park hook) can mark
//! itself with [`defer_writer_wakes_on_this_thread`]: a record it queues while the
//! writer waits then owes the writer its wake-up instead of waking it at once, so that
//! the writer starts its batch once the worker has queued every op it had to read (a
//! wave of requests is one batch and one `fdatasync`, not several). The debt is paid
//! when the worker parks, or at once by the record that makes
//! [`DEFERRED_RECORDS_MAX`] wait, so that a worker that never goes idle cannot hold
//! records back. A record a deferring thread queues while the writer is busy with a
//! batch owes the wake too: done with its batch, the writer waits for the debt to be
//! paid before it takes the next, so that the acks of one batch and the requests they
//! set off make one batch rather than a few smaller ones (measured 2026-12-03 with 64
//! clients on 64 documents, one tokio worker, three runs each: 24-26 ops per
//! `fdatasync` when the writer took whatever was pending at once, 30-31 when it waits;
//! about 16.9 against 16.0 us of server CPU per op, median of 8 alternated runs). A
//! thread that does not defer pays any debt at once with its own record.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;

use super::record::{framed_len, Lsn, RecordType};
use crate::sync::{lock, Condvar, Mutex};

/// Records that may wait for a deferred wake-up of the writer; the record that makes
/// this many pending wakes it at once.
pub const DEFERRED_RECORDS_MAX: usize = 256;

#[cfg(not(all(feature = "loom", test)))]
std::thread_local! {
    /// This thread pays the writer's owed wake-ups before it goes idle.
    static DEFERS_WAKES: Cell<bool> = const { Cell::new(false) };
}

// Under loom, one per modelled thread: loom runs them all on one OS thread, where a
// std thread-local would be shared (and no model could mix deferring threads with
// others).
#[cfg(all(feature = "loom", test))]
loom::thread_local! {
    static DEFERS_WAKES: Cell<bool> = Cell::new(false);
}

/// Marks the calling thread as one that calls [`CommitQueue::pay_owed_wake`] before it
/// goes idle: the records it queues wake the writer then (see the module's notes).
pub fn defer_writer_wakes_on_this_thread() {
    DEFERS_WAKES.with(|defers| defers.set(true));
}

/// What the writer must know about a record besides its bytes: the op it carries, for
/// the (document, seq) index. `None` for records that index nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexKey {
    pub doc_id: Arc<str>,
    pub seq: u64,
}

#[derive(Debug)]
pub struct Entry {
    pub lsn: Lsn,
    pub record_type: RecordType,
    pub payload: Vec<u8>,
    pub key: Option<IndexKey>,
}

/// The durable LSN, and whether the log has failed. Published after every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durability {
    /// Every record with an LSN at or below this is durable.
    pub durable_lsn: Lsn,
    /// The log has failed: records above `durable_lsn` will never be durable.
    pub failed: bool,
}

impl Durability {
    /// `Some(true)` once `lsn` is durable, `Some(false)` once it never will be.
    pub fn outcome(&self, lsn: Lsn) -> Option<bool> {
        if self.durable_lsn >= lsn {
            Some(true)
        } else if self.failed {
            Some(false)
        } else {
            None
        }
    }
}

/// How waiters learn of a new [`Durability`]. Production uses a tokio `watch`; the loom
/// model uses a condition variable.
pub trait DurableNotify: Send + Sync {
    fn publish(&self, durability: Durability);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueError {
    /// The log failed earlier (an fsync or write error); it accepts nothing more.
    Failed(Arc<str>),
    /// The log is shutting down.
    Closed,
}

struct State {
    next_lsn: Lsn,
    pending: VecDeque<Entry>,
    pending_bytes: usize,
    durability: Durability,
    failure: Option<Arc<str>>,
    closed: bool,
    /// Records are pending and the writer, waiting for them, was not woken: a deferring
    /// thread owes the wake-up.
    wake_owed: bool,
    /// The writer waits on `writer_wake` and nobody has woken it yet. Only then is it
    /// notified: `Condvar::notify_one` costs a `futex` call whether or not anyone waits,
    /// and a busy writer looks at the queue anyway before it waits.
    writer_waiting: bool,
}

pub struct CommitQueue<N> {
    state: Mutex<State>,
    writer_wake: Condvar,
    notify: N,
    /// [`DEFERRED_RECORDS_MAX`], smaller in the loom model (which cannot queue hundreds
    /// of records) so that it checks the record that wakes the writer at the cap.
    deferred_max: usize,
}

impl<N: DurableNotify> CommitQueue<N> {
    /// `next_lsn` is the LSN the next record gets; everything below it is durable.
    pub fn new(next_lsn: Lsn, notify: N) -> Self {
        assert!(next_lsn >= 1);
        CommitQueue {
            state: Mutex::new(State {
                next_lsn,
                pending: VecDeque::new(),
                pending_bytes: 0,
                durability: Durability {
                    durable_lsn: next_lsn - 1,
                    failed: false,
                },
                failure: None,
                closed: false,
                wake_owed: false,
                writer_waiting: false,
            }),
            writer_wake: Condvar::new(),
            notify,
            deferred_max: DEFERRED_RECORDS_MAX,
        }
    }

    /// A queue whose deferred wake-ups are capped at `deferred_max` records.
    #[cfg(all(test, feature = "loom"))]
    fn with_deferred_max(next_lsn: Lsn, notify: N, deferred_max: usize) -> Self {
        assert!(deferred_max >= 1);
        CommitQueue {
            deferred_max,
            ..Self::new(next_lsn, notify)
        }
    }

    /// Queues a record and returns its LSN. Callers that need LSN order to match some
    /// order of their own (a document's seq) call this under their own lock.
    pub fn enqueue(
        &self,
        record_type: RecordType,
        payload: Vec<u8>,
        key: Option<IndexKey>,
    ) -> Result<Lsn, EnqueueError> {
        let mut state = lock(&self.state);
        if let Some(failure) = &state.failure {
            return Err(EnqueueError::Failed(failure.clone()));
        }
        if state.closed {
            return Err(EnqueueError::Closed);
        }
        let lsn = state.next_lsn;
        state.next_lsn += 1;
        state.pending_bytes += framed_len(payload.len());
        // The writer waits only while nothing is pending, so only the record that finds
        // the queue empty has to wake it (or leave the wake owed).
        let was_empty = state.pending.is_empty();
        state.pending.push_back(Entry {
            lsn,
            record_type,
            payload,
            key,
        });
        let wake = if DEFERS_WAKES.with(Cell::get) && state.pending.len() < self.deferred_max {
            // Owed even if the writer is busy: done with its batch, it waits for this
            // thread to go idle before taking the next one.
            state.wake_owed = true;
            false
        } else {
            let owed = std::mem::take(&mut state.wake_owed);
            (was_empty || owed) && std::mem::take(&mut state.writer_waiting)
        };
        drop(state);
        if wake {
            self.writer_wake.notify_one();
        }
        Ok(lsn)
    }

    /// Wakes the writer if a record queued by a deferring thread left its wake-up owed
    /// (called by such a thread before it goes idle; only a waiting writer is notified).
    /// Returns whether a wake-up was owed.
    pub fn pay_owed_wake(&self) -> bool {
        let mut state = lock(&self.state);
        let owed = std::mem::take(&mut state.wake_owed);
        let wake = owed && std::mem::take(&mut state.writer_waiting);
        drop(state);
        if wake {
            self.writer_wake.notify_one();
        }
        owed
    }

    /// Writer: waits for pending records and moves up to `max_bytes` of them (at least
    /// one) into `batch`, in LSN order. Returns `false` when the queue is closed and
    /// drained, or failed: the writer then exits.
    pub fn next_batch(&self, batch: &mut Vec<Entry>, max_bytes: usize) -> bool {
        assert!(batch.is_empty());
        let mut state = lock(&self.state);
        loop {
            if state.failure.is_some() {
                return false;
            }
            if Self::batch_ready(&state) {
                break;
            }
            if state.closed {
                return false;
            }
            state.writer_waiting = true;
            state = self
                .writer_wake
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
            // Woken (the waker cleared the flag), or a spurious wake-up.
            state.writer_waiting = false;
        }
        Self::take_batch(&mut state, batch, max_bytes);
        true
    }

    /// Whether the waiting writer takes a batch now: records are pending and none owes
    /// its wake to a thread that has not gone idle yet (unless the queue is closed).
    fn batch_ready(state: &State) -> bool {
        !state.pending.is_empty() && (!state.wake_owed || state.closed)
    }

    /// [`CommitQueue::next_batch`] without the wait, for a writer run by its caller
    /// (`wal::Background::Manual`): `false` at once when nothing is pending (or the log
    /// failed), whether or not the queue is closed.
    pub fn try_next_batch(&self, batch: &mut Vec<Entry>, max_bytes: usize) -> bool {
        assert!(batch.is_empty());
        let mut state = lock(&self.state);
        if state.failure.is_some() || state.pending.is_empty() {
            return false;
        }
        Self::take_batch(&mut state, batch, max_bytes);
        true
    }

    /// Moves up to `max_bytes` of pending records (at least one) into `batch`.
    fn take_batch(state: &mut State, batch: &mut Vec<Entry>, max_bytes: usize) {
        // The writer is awake: whatever wake was owed is moot.
        state.wake_owed = false;
        let mut bytes = 0;
        while let Some(entry) = state.pending.front() {
            let len = framed_len(entry.payload.len());
            if !batch.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            batch.push(state.pending.pop_front().expect("front exists"));
        }
        state.pending_bytes -= bytes;
    }

    /// Writer: every record up to `lsn` is durable.
    pub fn complete(&self, lsn: Lsn) {
        let durability = {
            let mut state = lock(&self.state);
            assert!(lsn > state.durability.durable_lsn, "durable LSN only rises");
            assert!(
                lsn < state.next_lsn,
                "cannot complete an LSN never handed out"
            );
            assert!(!state.durability.failed, "no completion after a failure");
            state.durability.durable_lsn = lsn;
            state.durability
        };
        self.notify.publish(durability);
    }

    /// Writer: the log failed. Pending and future appends fail; the durable LSN stays.
    pub fn fail(&self, reason: &str) {
        let durability = {
            let mut state = lock(&self.state);
            state.failure = Some(Arc::from(reason));
            state.durability.failed = true;
            state.pending.clear();
            state.pending_bytes = 0;
            state.durability
        };
        self.notify.publish(durability);
        self.writer_wake.notify_all();
    }

    /// No more appends; the writer finishes what is pending, then stops.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.writer_wake.notify_all();
    }

    /// No more appends, and nothing pending will be written: a writer run by its caller
    /// is not run on close (a simulated crash drops the log with records in flight).
    /// If records were pending, they fail with `reason`, as do later appends, so that no
    /// waiter waits for a write that will not come. Returns how many were dropped.
    pub fn abandon(&self, reason: &str) -> usize {
        let (dropped, durability) = {
            let mut state = lock(&self.state);
            state.closed = true;
            let dropped = state.pending.len();
            if dropped == 0 || state.failure.is_some() {
                return 0;
            }
            state.failure = Some(Arc::from(reason));
            state.durability.failed = true;
            state.pending.clear();
            state.pending_bytes = 0;
            (dropped, state.durability)
        };
        self.notify.publish(durability);
        self.writer_wake.notify_all();
        dropped
    }

    /// Whether some record was given an LSN but is neither durable nor failed: queued,
    /// or in the batch being written.
    pub fn has_pending(&self) -> bool {
        let state = lock(&self.state);
        !state.durability.failed && state.durability.durable_lsn + 1 < state.next_lsn
    }

    pub fn durability(&self) -> Durability {
        lock(&self.state).durability
    }

    /// The reason the log failed, if it did.
    pub fn failure(&self) -> Option<Arc<str>> {
        lock(&self.state).failure.clone()
    }

    /// Records and bytes waiting for the writer (a gauge for metrics).
    pub fn pending(&self) -> (usize, usize) {
        let state = lock(&self.state);
        (state.pending.len(), state.pending_bytes)
    }

    /// The LSN the next record will get.
    pub fn next_lsn(&self) -> Lsn {
        lock(&self.state).next_lsn
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    struct Quiet;

    impl DurableNotify for Quiet {
        fn publish(&self, _: Durability) {}
    }

    fn enqueue(queue: &CommitQueue<Quiet>) {
        queue
            .enqueue(RecordType::OpWithFingerprint, vec![1, 2, 3], None)
            .expect("open");
    }

    fn owed(queue: &CommitQueue<Quiet>) -> bool {
        lock(&queue.state).wake_owed
    }

    #[test]
    fn a_deferring_thread_owes_the_wake_until_it_pays_or_the_writer_takes_the_batch() {
        std::thread::spawn(|| {
            defer_writer_wakes_on_this_thread();
            let queue = CommitQueue::new(1, Quiet);
            enqueue(&queue);
            enqueue(&queue);
            assert!(
                owed(&queue),
                "the first record into an empty queue owes the wake"
            );
            assert!(queue.pay_owed_wake());
            assert!(!queue.pay_owed_wake(), "paid once");
            // A record queued after the wake was paid (the writer is waking) owes it
            // again: the thread has not gone idle since, and pays again when it does.
            enqueue(&queue);
            assert!(owed(&queue));
            assert!(queue.pay_owed_wake());
            let mut batch = Vec::new();
            assert!(queue.next_batch(&mut batch, usize::MAX));
            assert_eq!(batch.len(), 3);
            // The writer is busy with the batch: a record queued meanwhile owes the
            // wake all the same (the writer waits for it before its next batch), and
            // taking the next batch makes it moot.
            enqueue(&queue);
            assert!(owed(&queue));
            batch.clear();
            assert!(queue.try_next_batch(&mut batch, usize::MAX));
            assert!(!owed(&queue));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn deferred_records_wake_the_writer_at_once_when_too_many_wait() {
        std::thread::spawn(|| {
            defer_writer_wakes_on_this_thread();
            let queue = CommitQueue::new(1, Quiet);
            for _ in 1..DEFERRED_RECORDS_MAX {
                enqueue(&queue);
            }
            assert!(owed(&queue));
            enqueue(&queue);
            assert!(
                !owed(&queue),
                "the record that makes the limit pays the debt"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_writer_takes_no_batch_while_its_wake_is_owed() {
        std::thread::spawn(|| {
            defer_writer_wakes_on_this_thread();
            let queue = Arc::new(CommitQueue::new(1, Quiet));
            enqueue(&queue);
            enqueue(&queue);
            let writer = {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    let mut batch = Vec::new();
                    assert!(queue.next_batch(&mut batch, usize::MAX));
                    batch.len()
                })
            };
            // The writer cannot take the first two records before this thread pays,
            // whenever it runs: the third is in its batch.
            assert!(!CommitQueue::<Quiet>::batch_ready(&lock(&queue.state)));
            enqueue(&queue);
            assert!(!CommitQueue::<Quiet>::batch_ready(&lock(&queue.state)));
            assert!(queue.pay_owed_wake());
            assert!(CommitQueue::<Quiet>::batch_ready(&lock(&queue.state)));
            assert_eq!(writer.join().unwrap(), 3);
            // Closing hands owed records to the writer: nothing waits for a debt that a
            // thread shutting down will not pay.
            enqueue(&queue);
            assert!(!CommitQueue::<Quiet>::batch_ready(&lock(&queue.state)));
            queue.close();
            assert!(CommitQueue::<Quiet>::batch_ready(&lock(&queue.state)));
            let mut batch = Vec::new();
            assert!(queue.next_batch(&mut batch, usize::MAX));
            assert_eq!(batch.len(), 1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_not_deferring_wakes_the_writer_at_once() {
        let queue = CommitQueue::new(1, Quiet);
        enqueue(&queue);
        assert!(!owed(&queue));
        assert!(!queue.pay_owed_wake());
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    //! Model of the handoff: appender threads enqueue and wait; a writer thread takes
    //! batches, "writes" them to a shared disk vector, and completes or fails. Checked in
    //! every interleaving loom explores: an appender told "durable" finds its record on
    //! the disk; after a failure nothing more is completed; nobody waits forever. The
    //! deferring variants have the appenders owe the writer its wake-up and pay it before
    //! they wait, as a runtime worker pays it before it parks; in the mixed ones only one
    //! of them defers. At the cap, neither pays: only the record that reaches it wakes
    //! the writer (a queue that ignored the cap deadlocks there).
    use super::*;
    use loom::sync::Arc as LoomArc;
    use loom::thread;

    struct CondNotify {
        seen: Mutex<Durability>,
        changed: Condvar,
    }

    impl DurableNotify for LoomArc<CondNotify> {
        fn publish(&self, durability: Durability) {
            *lock(&self.seen) = durability;
            self.changed.notify_all();
        }
    }

    fn wait(notify: &CondNotify, lsn: Lsn) -> bool {
        let mut seen = lock(&notify.seen);
        loop {
            if let Some(ok) = seen.outcome(lsn) {
                return ok;
            }
            seen = notify.changed.wait(seen).unwrap();
        }
    }

    /// Whether each of the two appenders defers its wake-ups, whether those that defer
    /// pay what they owe before they wait (as a worker pays before it parks), and the
    /// cap on records waiting for a deferred wake-up.
    #[derive(Clone, Copy)]
    struct Appenders {
        defer: [bool; 2],
        pay: bool,
        deferred_max: usize,
    }

    const NOT_DEFERRING: Appenders = Appenders {
        defer: [false, false],
        pay: false,
        deferred_max: DEFERRED_RECORDS_MAX,
    };
    const DEFERRING: Appenders = Appenders {
        defer: [true, true],
        pay: true,
        deferred_max: DEFERRED_RECORDS_MAX,
    };
    /// One appender defers (and pays before it waits), the other does not.
    const MIXED: Appenders = Appenders {
        defer: [true, false],
        pay: true,
        deferred_max: DEFERRED_RECORDS_MAX,
    };
    /// Both defer and neither pays (a worker that never goes idle): only the record that
    /// reaches the cap, the second, wakes the writer.
    const DEFERRING_AT_THE_CAP: Appenders = Appenders {
        defer: [true, true],
        pay: false,
        deferred_max: 2,
    };

    fn model(fail_first_batch: bool, appenders: Appenders) {
        // A preemption bound keeps the search finite in CI time; loom's documentation
        // finds that most concurrency bugs need only two or three preemptions.
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(move || {
            let notify = LoomArc::new(CondNotify {
                seen: Mutex::new(Durability::default()),
                changed: Condvar::new(),
            });
            let queue = LoomArc::new(CommitQueue::with_deferred_max(
                1,
                notify.clone(),
                appenders.deferred_max,
            ));
            let disk = LoomArc::new(Mutex::new(Vec::<Lsn>::new()));

            let writer = {
                let (queue, disk) = (queue.clone(), disk.clone());
                thread::spawn(move || {
                    let mut batch = Vec::new();
                    while queue.next_batch(&mut batch, 1 << 20) {
                        let last = batch.last().unwrap().lsn;
                        if fail_first_batch {
                            queue.fail("simulated EIO");
                            return;
                        }
                        lock(&disk).extend(batch.drain(..).map(|e| e.lsn));
                        queue.complete(last);
                    }
                })
            };
            let appenders: Vec<_> = (0..2)
                .map(|i| {
                    let (queue, notify, disk) = (queue.clone(), notify.clone(), disk.clone());
                    let defer = appenders.defer[usize::from(i)];
                    thread::spawn(move || {
                        if defer {
                            defer_writer_wakes_on_this_thread();
                        }
                        let queued = queue.enqueue(RecordType::Op, vec![i], None);
                        if defer && appenders.pay {
                            queue.pay_owed_wake();
                        }
                        match queued {
                            Ok(lsn) => {
                                let durable = wait(&notify, lsn);
                                if durable {
                                    assert!(lock(&disk).contains(&lsn), "acked but not on disk");
                                }
                                assert!(!(durable && fail_first_batch));
                            }
                            Err(EnqueueError::Failed(_)) => assert!(fail_first_batch),
                            Err(EnqueueError::Closed) => panic!("not closed"),
                        }
                    })
                })
                .collect();
            for a in appenders {
                a.join().unwrap();
            }
            queue.close();
            writer.join().unwrap();
            let disk = lock(&disk);
            let mut sorted = disk.clone();
            sorted.sort();
            assert_eq!(*disk, sorted, "written in LSN order");
        });
    }

    #[test]
    fn loom_every_acked_append_is_on_disk() {
        model(false, NOT_DEFERRING);
    }

    #[test]
    fn loom_after_a_sync_failure_nothing_is_acked_and_nobody_hangs() {
        model(true, NOT_DEFERRING);
    }

    #[test]
    fn loom_deferred_wakes_every_acked_append_is_on_disk() {
        model(false, DEFERRING);
    }

    #[test]
    fn loom_deferred_wakes_after_a_sync_failure_nobody_hangs() {
        model(true, DEFERRING);
    }

    #[test]
    fn loom_one_appender_deferring_every_acked_append_is_on_disk() {
        model(false, MIXED);
    }

    #[test]
    fn loom_one_appender_deferring_after_a_sync_failure_nobody_hangs() {
        model(true, MIXED);
    }

    #[test]
    fn loom_deferred_wakes_at_the_cap_every_acked_append_is_on_disk() {
        model(false, DEFERRING_AT_THE_CAP);
    }
}
