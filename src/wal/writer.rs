//! The one writer thread, and the preparer thread that keeps the next segment ready.
//! Without threads (`Background::Manual`), [`ManualWriter`] runs the same writer one
//! batch per call and the preparer makes each segment when the writer needs it.
//!
//! The writer loops: take every pending record ([`CommitQueue::next_batch`]), frame
//! them into one buffer, one `pwrite`, one `fdatasync`, update the index, publish the
//! durable LSN. When a record does not fit in the active segment, the part written so
//! far is synced (sealing the segment) and the writer continues in the spare the
//! preparer made, writing that segment's header together with its first records.
//! Any write or sync error ends the log: it is logged with its cause, every pending and
//! later append fails, and nothing is retried (after a failed fsync the kernel may have
//! dropped the dirty pages; retrying would report durability that does not exist).
//! A panic in the writer (a bug here or in the file layer) ends the log the same way:
//! it is caught at the top of the thread, so that no waiter is left waiting for a
//! writer that is gone.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use super::commit::{CommitQueue, Entry};
use super::index::{Index, Location};
use super::record::{encode_frame, framed_len, RecordType};
use super::segment::{
    prepare_segment, segment_file_name, segment_path, SegmentHeader, SegmentId, SEGMENT_HEADER_LEN,
};
use super::stats::WalStats;
use super::vfs::{Vfs, VfsFile};
use super::WatchNotify;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The segment receiving records.
pub(crate) struct Active {
    pub id: SegmentId,
    pub file: Box<dyn VfsFile>,
    /// Where the next byte goes. 0 means the header is not written yet.
    pub offset: u64,
}

pub(crate) struct Writer {
    pub wal_dir: PathBuf,
    pub segment_size: u64,
    pub max_batch_bytes: usize,
    pub queue: Arc<CommitQueue<WatchNotify>>,
    pub index: Arc<RwLock<Index>>,
    pub active_id: Arc<std::sync::atomic::AtomicU64>,
    pub stats: Arc<WalStats>,
    pub preparer: Arc<Preparer>,
    /// `None` until the first record of a fresh log: then the first spare is activated.
    pub active: Option<Active>,
}

/// The message a panic carried, for the log and for the failure reason.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "a panic without a message"
    }
}

/// The reason a panic in the writer fails the log with, whichever runs it.
fn panic_reason(wal_dir: &std::path::Path, payload: &(dyn Any + Send)) -> String {
    format!(
        "write-ahead log writer in {} panicked: {}; no further appends are accepted \
         (restart to recover)",
        wal_dir.display(),
        panic_message(payload)
    )
}

/// The writer's buffers, kept from one batch to the next.
pub(crate) struct Scratch {
    batch: Vec<Entry>,
    buf: Vec<u8>,
    locations: Vec<Location>,
}

impl Scratch {
    fn new(max_batch_bytes: usize) -> Self {
        Scratch {
            batch: Vec::new(),
            buf: Vec::with_capacity(max_batch_bytes + SEGMENT_HEADER_LEN),
            locations: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.batch.clear();
        self.buf.clear();
        self.locations.clear();
    }
}

impl Writer {
    /// Writes batches until the queue is closed and drained, or the log fails. A panic
    /// fails the log: pending and later appends get the reason, and it is logged.
    pub fn run(self) {
        let queue = self.queue.clone();
        let preparer = self.preparer.clone();
        let wal_dir = self.wal_dir.clone();
        // Unwind safety: the writer's own state is dropped with the panic. The queue's
        // critical sections never panic midway (`crate::sync::lock`); the index may keep
        // part of the failed batch, which nothing reads as durable once the log failed.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.write_batches()));
        if let Err(payload) = outcome {
            let reason = panic_reason(&wal_dir, &*payload);
            tracing::error!("{reason}");
            queue.fail(&reason);
            preparer.stop();
        }
    }

    fn write_batches(mut self) {
        let mut scratch = Scratch::new(self.max_batch_bytes);
        while self
            .queue
            .next_batch(&mut scratch.batch, self.max_batch_bytes)
        {
            if !self.commit(&mut scratch) {
                break;
            }
        }
        self.preparer.stop();
    }

    /// Writes and syncs the batch in `scratch`, then indexes it and publishes it as
    /// durable; or fails the log. Returns `false` if the log failed.
    fn commit(&mut self, scratch: &mut Scratch) -> bool {
        let Scratch {
            batch,
            buf,
            locations,
        } = scratch;
        let started = Instant::now();
        let last_lsn = batch.last().expect("batch is never empty").lsn;
        let committed = match self.write_batch(batch, buf, locations) {
            Ok(sync_ns) => {
                {
                    let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
                    for (entry, location) in batch.iter().zip(locations.iter()) {
                        match (&entry.key, entry.record_type) {
                            (Some(k), RecordType::Tombstone) => {
                                index.insert_tombstone(*location, &k.doc_id)
                            }
                            (key, _) => {
                                index.insert(*location, key.as_ref().map(|k| (&k.doc_id, k.seq)))
                            }
                        }
                    }
                }
                let bytes: u64 = batch
                    .iter()
                    .map(|e| framed_len(e.payload.len()) as u64)
                    .sum();
                self.stats
                    .record_batch(batch.len(), bytes, sync_ns, started.elapsed());
                self.queue.complete(last_lsn);
                true
            }
            Err(error) => {
                let reason = format!(
                    "write-ahead log failed at LSN {}..={last_lsn} in {}: {error}; \
                     no further appends are accepted (restart to recover)",
                    batch[0].lsn,
                    self.wal_dir.display()
                );
                tracing::error!("{reason}");
                self.queue.fail(&reason);
                false
            }
        };
        scratch.clear();
        committed
    }

    /// Writes and syncs one batch; returns the nanoseconds spent in `fdatasync`.
    fn write_batch(
        &mut self,
        batch: &[Entry],
        buf: &mut Vec<u8>,
        locations: &mut Vec<Location>,
    ) -> io::Result<u64> {
        buf.clear();
        let mut sync_ns = 0;
        for (batch_index, entry) in batch.iter().enumerate() {
            let need = framed_len(entry.payload.len()) as u64;
            let fits = self.active.as_ref().is_some_and(|a| {
                let start = a.offset.max(SEGMENT_HEADER_LEN as u64);
                start + buf.len() as u64 + need <= self.segment_size
            });
            if !fits {
                sync_ns += self.flush(buf)?;
                self.roll(entry.lsn)?;
            }
            let active = self.active.as_ref().expect("an active segment");
            if active.offset == 0 && buf.is_empty() {
                let header = SegmentHeader {
                    segment_id: active.id,
                    first_lsn: entry.lsn,
                    created_ms: super::now_ms(),
                };
                buf.extend_from_slice(&header.encode());
            }
            locations.push(Location {
                segment_id: active.id,
                offset: active.offset + buf.len() as u64,
                lsn: entry.lsn,
            });
            let batch_index = u32::try_from(batch_index).expect("batch bounded by max_batch_bytes");
            encode_frame(
                buf,
                entry.lsn,
                batch_index,
                entry.record_type,
                &entry.payload,
            );
        }
        sync_ns += self.flush(buf)?;
        Ok(sync_ns)
    }

    /// Writes `buf` at the active segment's end and syncs it.
    fn flush(&mut self, buf: &mut Vec<u8>) -> io::Result<u64> {
        if buf.is_empty() {
            return Ok(0);
        }
        let active = self.active.as_mut().expect("flush needs an active segment");
        assert!(active.offset + buf.len() as u64 <= self.segment_size);
        active.file.write_all_at(buf, active.offset)?;
        let t = Instant::now();
        active.file.sync_data()?;
        let sync_ns = t.elapsed().as_nanos() as u64;
        active.offset += buf.len() as u64;
        buf.clear();
        Ok(sync_ns)
    }

    /// Seals the active segment (already synced by `flush`) and activates the next.
    fn roll(&mut self, first_lsn: u64) -> io::Result<()> {
        let next_id = self
            .active
            .as_ref()
            .map_or(self.preparer.first_id(), |a| a.id + 1);
        let file = self.preparer.take(next_id)?;
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .add_segment(next_id, first_lsn);
        self.active = Some(Active {
            id: next_id,
            file,
            offset: 0,
        });
        self.active_id
            .store(next_id, std::sync::atomic::Ordering::Release);
        tracing::debug!(segment = %segment_file_name(next_id), first_lsn, "segment activated");
        Ok(())
    }
}

/// The writer without its thread (`Background::Manual`): its caller runs one batch at a
/// time with [`ManualWriter::step`], on the caller's thread.
pub(crate) struct ManualWriter {
    writer: Writer,
    scratch: Scratch,
}

impl ManualWriter {
    pub fn new(writer: Writer) -> Self {
        let scratch = Scratch::new(writer.max_batch_bytes);
        ManualWriter { writer, scratch }
    }

    /// Writes the next batch of pending records, as the writer thread would. `false`:
    /// nothing was pending (or the log failed earlier); it never waits for records. A
    /// panic fails the log as one in the writer thread does.
    pub fn step(&mut self) -> bool {
        let writer = &mut self.writer;
        if !writer
            .queue
            .try_next_batch(&mut self.scratch.batch, writer.max_batch_bytes)
        {
            return false;
        }
        // Unwind safety: as in `Writer::run`; the batch and the buffers are cleared, the
        // log is failed, and no later step writes anything.
        let scratch = &mut self.scratch;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| writer.commit(scratch)));
        match outcome {
            Ok(true) => {}
            // As the thread does once the log failed.
            Ok(false) => self.writer.preparer.stop(),
            Err(payload) => {
                self.scratch.clear();
                let reason = panic_reason(&self.writer.wal_dir, &*payload);
                tracing::error!("{reason}");
                self.writer.queue.fail(&reason);
                self.writer.preparer.stop();
            }
        }
        true
    }
}

/// How long the preparer waits before trying again to prepare a segment it failed to.
const PREPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps one spare segment prepared ahead of the writer, so that rolling over costs a
/// pointer swap, not 64 MiB of zeros.
pub(crate) struct Preparer {
    state: Mutex<PrepState>,
    changed: Condvar,
    vfs: Arc<dyn Vfs>,
    wal_dir: PathBuf,
    segment_size: u64,
    zero_fill: bool,
    first_id: SegmentId,
    /// No thread runs [`Preparer::run`]: `take` prepares each segment when the writer
    /// needs it (`Background::Manual`).
    inline: bool,
}

struct PrepState {
    next_id: SegmentId,
    ready: Option<(SegmentId, Box<dyn VfsFile>)>,
    error: Option<String>,
    stop: bool,
}

impl Preparer {
    pub fn new(
        vfs: Arc<dyn Vfs>,
        wal_dir: PathBuf,
        segment_size: u64,
        zero_fill: bool,
        first_id: SegmentId,
        inline: bool,
    ) -> Self {
        Preparer {
            state: Mutex::new(PrepState {
                next_id: first_id,
                ready: None,
                error: None,
                stop: false,
            }),
            changed: Condvar::new(),
            vfs,
            wal_dir,
            segment_size,
            zero_fill,
            first_id,
            inline,
        }
    }

    pub fn first_id(&self) -> SegmentId {
        self.first_id
    }

    pub fn run(&self) {
        debug_assert!(!self.inline, "an inline preparer has no thread");
        loop {
            let id = {
                let mut state = lock(&self.state);
                loop {
                    if state.stop {
                        return;
                    }
                    if state.ready.is_some() {
                        state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                    } else if state.error.is_some() {
                        // A failure (a full disk, most often) is tried again now and
                        // then: space freed before the writer needs the segment means
                        // nothing failed. Until then the error is reported (readiness,
                        // metrics) while the active segment still takes records.
                        let (next, waited) = self
                            .changed
                            .wait_timeout(state, PREPARE_RETRY)
                            .unwrap_or_else(|p| p.into_inner());
                        state = next;
                        if waited.timed_out() {
                            state.error = None;
                        }
                    } else {
                        break;
                    }
                }
                state.next_id
            };
            let result = self.prepare(id);
            let mut state = lock(&self.state);
            self.settle(&mut state, id, result);
        }
    }

    /// Prepares segment `id`. A panic (a bug here or in the file layer) becomes this
    /// segment's error, which the writer's `take` returns and which fails the log: a
    /// preparer thread that died would leave the writer waiting for its next segment
    /// forever.
    fn prepare(&self, id: SegmentId) -> io::Result<Box<dyn VfsFile>> {
        panic::catch_unwind(AssertUnwindSafe(|| {
            prepare_segment(
                &*self.vfs,
                &self.wal_dir,
                id,
                self.segment_size,
                self.zero_fill,
            )
        }))
        .unwrap_or_else(|payload| {
            // As for an error: the segment holds no record; the next attempt makes it anew.
            let _ = self.vfs.remove(&segment_path(&self.wal_dir, id));
            Err(io::Error::other(format!(
                "panicked: {}",
                panic_message(&*payload)
            )))
        })
    }

    /// Records what preparing segment `id` gave, for `take`.
    fn settle(&self, state: &mut PrepState, id: SegmentId, result: io::Result<Box<dyn VfsFile>>) {
        match result {
            Ok(file) => {
                state.ready = Some((id, file));
                state.next_id = id + 1;
            }
            Err(error) => {
                tracing::error!(segment = id, %error, "could not prepare the next WAL segment");
                state.error = Some(format!(
                    "preparing segment {}: {error}",
                    segment_path(&self.wal_dir, id).display()
                ));
            }
        }
        self.changed.notify_all();
    }

    /// Why the next segment could not be prepared, while it cannot: the log fails when
    /// the writer needs that segment, unless a retry succeeds first.
    pub fn warning(&self) -> Option<String> {
        lock(&self.state).error.clone()
    }

    /// Whether the next segment is prepared and waiting for the writer.
    pub fn is_ready(&self) -> bool {
        lock(&self.state).ready.is_some()
    }

    /// The prepared segment `id`, waiting for it if needed; an inline preparer prepares
    /// it here, on the caller's thread. A segment that failed to be prepared is tried
    /// once more at once (the disk may have room again) before its error is returned.
    pub fn take(&self, id: SegmentId) -> io::Result<Box<dyn VfsFile>> {
        let mut state = lock(&self.state);
        let mut retried = false;
        loop {
            if let Some(error) = &state.error {
                if retried {
                    return Err(io::Error::other(error.clone()));
                }
                retried = true;
                state.error = None;
                self.changed.notify_all();
                continue;
            }
            if state.ready.is_some() {
                break;
            }
            if state.stop {
                return Err(io::Error::other("segment preparer stopped"));
            }
            if self.inline {
                let next = state.next_id;
                drop(state);
                let result = self.prepare(next);
                state = lock(&self.state);
                self.settle(&mut state, next, result);
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let (ready_id, file) = state.ready.take().expect("checked above");
        assert_eq!(ready_id, id, "segments are activated in id order");
        self.changed.notify_all();
        Ok(file)
    }

    pub fn stop(&self) {
        lock(&self.state).stop = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::wal::segment::SEGMENT_SIZE_MIN;
    use crate::wal::vfs::sim::{PanicAt, SimFs};

    /// A preparer of minimum-size segments in `/wal` on `fs`, from segment 1; `inline`
    /// for `Background::Manual`, else its thread is started with `spawn`.
    fn preparer_on(fs: &SimFs, inline: bool) -> Arc<Preparer> {
        let dir = Path::new("/wal");
        fs.create_dir_all(dir).unwrap();
        Arc::new(Preparer::new(
            Arc::new(fs.clone()),
            dir.to_path_buf(),
            SEGMENT_SIZE_MIN,
            true,
            1,
            inline,
        ))
    }

    fn spawn(preparer: &Arc<Preparer>) -> std::thread::JoinHandle<()> {
        let preparer = preparer.clone();
        std::thread::spawn(move || preparer.run())
    }

    #[test]
    fn a_panic_while_preparing_a_segment_becomes_the_error_the_writer_is_given() {
        let fs = SimFs::new();
        fs.panic_at_next(PanicAt::Allocate);
        let preparer = preparer_on(&fs, false);
        let thread = spawn(&preparer);
        // Until the attempt has ended one way or the other: an error recorded, or the
        // thread gone.
        while preparer.warning().is_none() && !thread.is_finished() {
            std::thread::yield_now();
        }
        let error = preparer
            .warning()
            .expect("the panic is recorded as the preparer's error");
        assert!(error.contains("panicked: simulated panic"), "{error}");
        assert!(error.contains("/wal/00000000000000000001.wal"), "{error}");
        // The writer's `take` tries once more at once; that attempt fails too here, and
        // the writer is given its error.
        fs.panic_at_next(PanicAt::Allocate);
        let taken = preparer
            .take(1)
            .err()
            .expect("the writer is given the error");
        assert!(taken.to_string().contains("panicked"), "{taken}");
        preparer.stop();
        thread.join().unwrap();
    }

    #[test]
    fn the_preparer_thread_keeps_the_next_segment_ready_and_says_so() {
        let fs = SimFs::new();
        let preparer = preparer_on(&fs, false);
        assert!(
            !preparer.is_ready(),
            "nothing is prepared before the thread runs"
        );
        let thread = spawn(&preparer);
        for id in 1..=3 {
            while !preparer.is_ready() {
                std::thread::yield_now();
            }
            // Ready means taken without waiting: its file is there already.
            assert!(fs.files().contains(&segment_path(Path::new("/wal"), id)));
            preparer.take(id).expect("prepared ahead");
        }
        assert_eq!(preparer.warning(), None);
        preparer.stop();
        thread.join().unwrap();
    }

    #[test]
    fn a_segment_that_failed_to_be_prepared_is_prepared_when_the_disk_has_room_again() {
        let fs = SimFs::new();
        let preparer = preparer_on(&fs, true);
        fs.fill_after(SEGMENT_SIZE_MIN / 2);
        let full = preparer.take(1).err().expect("no room for a segment");
        assert!(full.to_string().contains("no space left"), "{full}");
        assert!(preparer.warning().is_some());
        // The failed attempt left no file behind that the next one would trip on.
        assert_eq!(fs.files(), Vec::<std::path::PathBuf>::new());
        fs.fill_after(u64::MAX);
        preparer.take(1).expect("prepared once there is room");
        assert_eq!(preparer.warning(), None);
    }
}
