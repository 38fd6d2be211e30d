//! The write-ahead log: segmented, checksummed, group-committed.
//!
//! Knows records, segments and files; nothing of sockets, sessions or OT. The bytes on
//! disk are specified in `wal-format.md`. Module map:
//! - [`record`]: record framing and the op record payload.
//! - [`segment`]: segment header, naming, preallocation, the record scan.
//! - [`commit`]: the group-commit handoff between appenders and the writer (loom-checked).
//! - `writer`: the writer and segment-preparer threads (or, with
//!   [`Background::Manual`], the same work run by the caller through [`Wal::step`]).
//! - [`index`]: (document, seq) → location, and what each segment holds.
//! - [`recovery`]: startup validation, torn-tail cut, corruption refusal.
//! - [`snapshot`]: per-document snapshot files.
//! - [`vfs`]: the file layer, real and simulated (fault injection).

pub mod commit;
pub mod index;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod snapshot;
pub mod stats;
pub mod vfs;
mod writer;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::watch;

use commit::{CommitQueue, Durability, DurableNotify, EnqueueError, IndexKey};
use index::{DocSlot, Index, IndexBuilder, Location};
use record::{
    decode_frame, Lsn, OpRecord, OpRecordRef, OpView, RecordType, TombstoneRecord, TombstoneView,
    MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN,
};
use recovery::{RecoveryOptions, RecoveryReport};
use segment::{segment_path, SegmentId, SEGMENT_HEADER_LEN, SEGMENT_SIZE_MIN};
use stats::WalStats;
use vfs::{Region, Vfs, VfsFile};
use writer::{Active, ManualWriter, Preparer, Writer};

/// Bytes asked for from the start of a record about to be read ([`Wal::will_read`]):
/// a page, rounded out to whole pages, which holds the record's header and an op of
/// up to a few KiB; a longer one's rest is read on demand.
const RECORD_READ_HINT_BYTES: usize = 4096;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Who runs the log's background work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Background {
    /// A writer thread and a segment-preparer thread (production).
    #[default]
    Threads,
    /// No thread: the caller runs the work with `Wal::step` (the deterministic simulator).
    /// Each step writes one batch on the caller's thread; a segment is prepared when
    /// the writer needs it, within that step; recovery reads each segment when the scan
    /// gets to it, on the caller's thread (the simulated disk starts no thread; a real
    /// disk's `read_file` keeps a second read in flight on a thread of its own for the
    /// length of the call).
    Manual,
}

#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Size of every segment file, preallocated. Default 64 MiB.
    pub segment_size: u64,
    /// Write zeros over the preallocated segment (see `segment::prepare_segment`).
    pub zero_fill: bool,
    /// Upper bound on the bytes of one group-commit write. Default 4 MiB.
    pub max_batch_bytes: usize,
    pub recovery: RecoveryOptions,
    /// Threads in production; [`Background::Manual`] for a simulation that must run
    /// every write itself, deterministically.
    pub background: Background,
    /// Where the startup scan reports the bytes of log it has read (`quire serve`: a
    /// bar or log lines).
    pub progress: Option<Arc<crate::progress::Progress>>,
}

impl WalConfig {
    /// The largest record payload this log takes: one record must fit in one segment,
    /// after its header (and its padding to 8 bytes), and within [`MAX_RECORD_PAYLOAD`].
    pub fn max_payload(&self) -> usize {
        MAX_RECORD_PAYLOAD.min(
            (self.segment_size as usize).saturating_sub(SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 8),
        )
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size: 64 << 20,
            zero_fill: true,
            max_batch_bytes: 4 << 20,
            recovery: RecoveryOptions::default(),
            background: Background::Threads,
            progress: None,
        }
    }
}

#[derive(Debug)]
pub enum WalError {
    Io {
        context: String,
        error: std::io::Error,
    },
    /// The log failed earlier and accepts nothing more (the reason names the cause).
    Failed(Arc<str>),
    Closed,
    /// Another process holds the directory.
    Locked(String),
    /// Recovery refused to start.
    Corrupt(String),
    /// A record larger than a segment can hold.
    RecordTooLarge {
        len: usize,
        max: usize,
    },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { context, error } => write!(f, "{context}: {error}"),
            WalError::Failed(reason) => write!(f, "{reason}"),
            WalError::Closed => write!(f, "the write-ahead log is closed"),
            WalError::Locked(m) | WalError::Corrupt(m) => f.write_str(m),
            WalError::RecordTooLarge { len, max } => {
                write!(f, "record of {len} bytes exceeds the limit of {max}")
            }
        }
    }
}

impl std::error::Error for WalError {}

impl From<EnqueueError> for WalError {
    fn from(e: EnqueueError) -> Self {
        match e {
            EnqueueError::Failed(reason) => WalError::Failed(reason),
            EnqueueError::Closed => WalError::Closed,
        }
    }
}

fn io_context(context: impl fmt::Display) -> impl FnOnce(std::io::Error) -> WalError {
    move |error| WalError::Io {
        context: context.to_string(),
        error,
    }
}

/// Publishes durability to async waiters through a tokio `watch`: one wake-up per
/// batch for however many appenders wait on it.
pub struct WatchNotify(watch::Sender<Durability>);

impl DurableNotify for WatchNotify {
    fn publish(&self, durability: Durability) {
        self.0.send_replace(durability);
    }
}

/// The open log. Shared by reference (`Arc<Wal>`); every method takes `&self`.
pub struct Wal {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    queue: Arc<CommitQueue<WatchNotify>>,
    durable: watch::Receiver<Durability>,
    index: Arc<RwLock<Index>>,
    active_id: Arc<AtomicU64>,
    /// Memory maps of sealed segments, opened on first read.
    maps: Mutex<HashMap<SegmentId, Arc<Region>>>,
    stats: Arc<WalStats>,
    preparer: Arc<Preparer>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The writer, when no thread runs it ([`Background::Manual`]).
    manual: Option<Mutex<ManualWriter>>,
    max_payload: usize,
    _lock: Box<dyn Any + Send + Sync>,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal").field("dir", &self.dir).finish()
    }
}

/// A log that [`Wal::scan`] has locked and validated, and nothing more: the directory
/// is as it was found. [`ScannedWal::start`] cuts the torn tail, if any, and starts the
/// writer; dropping it releases the lock and changes nothing.
pub struct ScannedWal {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    config: WalConfig,
    index: Index,
    scanned: recovery::Scanned,
    lock: Box<dyn Any + Send + Sync>,
}

impl fmt::Debug for ScannedWal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScannedWal")
            .field("dir", &self.dir)
            .field("report", &self.scanned.report)
            .finish()
    }
}

/// `ops` emptied, as a vector of any lifetime, keeping its allocation: collecting an
/// emptied vector's iterator into one of the same layout reuses its buffer (the map
/// never runs, since there is no element), so one buffer serves every segment while
/// each segment's views borrow only that segment.
fn recycle<'b>(mut ops: Vec<SegmentOp<'_>>) -> Vec<SegmentOp<'b>> {
    ops.clear();
    ops.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// An op or tombstone record found by the startup scan.
#[derive(Debug, Clone)]
pub struct SegmentOp<'a> {
    /// The document's [`DocSlot::ordinal`].
    pub ordinal: u32,
    pub location: Location,
    pub record: SegmentRecord<'a>,
}

/// What a [`SegmentOp`] holds.
#[derive(Debug, Clone)]
pub enum SegmentRecord<'a> {
    Op(OpView<'a>),
    /// The document was deleted at this version: what came before of it is gone.
    Tombstone {
        version: u64,
    },
}

/// The valid op records of one segment, shown once the whole segment is checked.
#[derive(Debug, Clone, Copy)]
pub struct SegmentOps<'s, 'a> {
    /// In LSN order.
    pub ops: &'s [SegmentOp<'a>],
    /// Indices into `ops` grouped by document, by ascending ordinal, and each
    /// document's in LSN order.
    pub by_document: &'s [u32],
    index: &'s IndexBuilder,
}

impl SegmentOps<'_, '_> {
    /// The document numbered `ordinal` (in this segment or an earlier one).
    pub fn slot(&self, ordinal: u32) -> DocSlot<'_> {
        self.index.slot(ordinal)
    }
}

fn recovery_error(e: recovery::RecoveryError) -> WalError {
    match e {
        recovery::RecoveryError::Corrupt(c) => WalError::Corrupt(c.to_string()),
        recovery::RecoveryError::Io { path, error } => WalError::Io {
            context: format!("recovering {}", path.display()),
            error,
        },
    }
}

fn corrupt_at(path: &Path, location: Location, what: impl fmt::Display) -> WalError {
    WalError::Corrupt(format!(
        "{} at offset {} (LSN {}): {what}",
        path.display(),
        location.offset,
        location.lsn
    ))
}

/// The op record at `location`, whose frame starts `bytes` (read from `path`).
fn decode_op_at(path: &Path, location: Location, bytes: &[u8]) -> Result<OpRecord, WalError> {
    let raw = decode_frame(bytes).map_err(|e| corrupt_at(path, location, e))?;
    if raw.lsn != location.lsn {
        return Err(corrupt_at(
            path,
            location,
            format_args!("found LSN {}", raw.lsn),
        ));
    }
    OpRecord::decode(raw.record_type, raw.payload).map_err(|e| corrupt_at(path, location, e))
}

/// The op record at `location`, read with pread (no map).
fn pread_op(vfs: &dyn Vfs, dir: &Path, location: Location) -> Result<OpRecord, WalError> {
    let path = segment_path(dir, location.segment_id);
    let file = vfs
        .open(&path)
        .map_err(io_context(format_args!("reading {}", path.display())))?;
    let mut head = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut head, location.offset)
        .map_err(io_context(format_args!("reading {}", path.display())))?;
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
    if len > MAX_RECORD_PAYLOAD {
        return Err(corrupt_at(&path, location, format_args!("length {len}")));
    }
    let mut bytes = vec![0u8; record::framed_len(len)];
    file.read_exact_at(&mut bytes, location.offset)
        .map_err(io_context(format_args!("reading {}", path.display())))?;
    decode_op_at(&path, location, &bytes)
}

impl ScannedWal {
    /// [`Wal::read_ops_after`] before the log is started (records the scan validated,
    /// read with pread; nothing is written).
    pub fn read_ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<OpRecord>, WalError> {
        self.index
            .ops_after(doc_id, after_seq, limit)
            .into_iter()
            .map(|(_, location)| pread_op(&*self.vfs, &self.dir, location))
            .collect()
    }

    /// What the scan found; a torn tail in it is planned, not yet cut.
    pub fn report(&self) -> &RecoveryReport {
        &self.scanned.report
    }

    /// The second half of [`Wal::open`]: cuts the torn tail the scan found, then starts
    /// the writer and the segment preparer. The first writes to the directory happen here.
    pub fn start(self) -> Result<(Wal, RecoveryReport), WalError> {
        let ScannedWal {
            vfs,
            dir,
            config,
            mut index,
            scanned,
            lock,
        } = self;
        let dir = dir.as_path();
        let report = recovery::apply(&*vfs, dir, scanned).map_err(recovery_error)?;
        for pair in report.segments.windows(2) {
            index.seal(pair[0].header.segment_id, pair[1].header.created_ms);
        }

        let next_segment_id = report
            .segments
            .last()
            .map(|s| s.header.segment_id + 1)
            .or_else(|| report.tail_cut.as_ref().map(|c| c.segment_id))
            .or_else(|| report.spares_removed.first().copied())
            .unwrap_or(1);
        // What recovery read may have been in the page cache only (the process died,
        // the machine did not): everything from here on is published as durable, so it
        // is made durable first. Only the last write can be unsynced, and a write never
        // spans segments: syncing the last two covers it.
        for segment in report.segments.iter().rev().take(2) {
            let path = segment_path(dir, segment.header.segment_id);
            vfs.open(&path)
                .and_then(|file| file.sync_data())
                .map_err(io_context(format_args!("syncing {}", path.display())))?;
        }
        let active = match report.segments.last() {
            Some(last) => {
                let path = segment_path(dir, last.header.segment_id);
                let file: Box<dyn VfsFile> = vfs
                    .open(&path)
                    .map_err(io_context(format_args!("opening {}", path.display())))?;
                Some(Active {
                    id: last.header.segment_id,
                    file,
                    offset: last.end_offset,
                })
            }
            None => None,
        };
        let active_id = Arc::new(AtomicU64::new(active.as_ref().map_or(0, |a| a.id)));
        let (tx, durable) = watch::channel(Durability {
            durable_lsn: report.next_lsn - 1,
            failed: false,
        });
        let queue = Arc::new(CommitQueue::new(report.next_lsn, WatchNotify(tx)));
        let index = Arc::new(RwLock::new(index));
        let stats = Arc::new(WalStats::default());
        let preparer = Arc::new(Preparer::new(
            vfs.clone(),
            dir.to_path_buf(),
            config.segment_size,
            config.zero_fill,
            next_segment_id,
            config.background == Background::Manual,
        ));
        let writer = Writer {
            wal_dir: dir.to_path_buf(),
            segment_size: config.segment_size,
            max_batch_bytes: config.max_batch_bytes,
            queue: queue.clone(),
            index: index.clone(),
            active_id: active_id.clone(),
            stats: stats.clone(),
            preparer: preparer.clone(),
            active,
        };
        let (threads, manual) = match config.background {
            Background::Threads => {
                let spawn_err = io_context("starting the WAL threads");
                let prep = preparer.clone();
                let prep_thread = std::thread::Builder::new()
                    .name("quire-wal-prepare".into())
                    .spawn(move || prep.run())
                    .map_err(spawn_err)?;
                let writer_thread = std::thread::Builder::new()
                    .name("quire-wal-writer".into())
                    .spawn(move || writer.run())
                    .map_err(io_context("starting the WAL writer thread"))?;
                (vec![writer_thread, prep_thread], None)
            }
            Background::Manual => (Vec::new(), Some(Mutex::new(ManualWriter::new(writer)))),
        };
        let max_payload = config.max_payload();
        Ok((
            Wal {
                vfs,
                dir: dir.to_path_buf(),
                queue,
                durable,
                index,
                active_id,
                maps: Mutex::new(HashMap::new()),
                stats,
                preparer,
                threads: Mutex::new(threads),
                manual,
                max_payload,
                _lock: lock,
            },
            report,
        ))
    }
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`: locks it, recovers it, and calls
    /// `visit` with every op record found, in LSN order, before any new append.
    pub fn open(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: WalConfig,
        visit: impl FnMut(&OpRecord, Location),
    ) -> Result<(Wal, RecoveryReport), WalError> {
        Wal::scan(vfs, dir, config, visit)?.start()
    }

    /// The first half of [`Wal::open`]: locks the log in `dir` (creating the directory if
    /// there is none), validates every record, classifies the end of the log, and calls
    /// `visit` with every op record in LSN order. Writes nothing to an existing log: a
    /// torn tail is only planned to be cut. The caller checks what it was shown, then
    /// calls [`ScannedWal::start`], or drops the result to leave the log as it was.
    pub fn scan(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: WalConfig,
        mut visit: impl FnMut(&OpRecord, Location),
    ) -> Result<ScannedWal, WalError> {
        Wal::scan_in(vfs, dir, config, |segment| {
            for op in segment.ops {
                if let SegmentRecord::Op(view) = &op.record {
                    visit(&view.to_record(), op.location)
                }
            }
        })
    }

    /// [`Wal::scan`] as replay wants it: each op decoded in place ([`OpView`]: its texts
    /// borrow the mapped segment, nothing is copied), with its document's [`DocSlot`]
    /// (a dense number and the interned id), so that the caller hashes no id per record.
    /// The ops come a segment at a time, and within a segment document by document
    /// (each document's in LSN, so seq, order): a document's state stays in cache across
    /// its ops instead of being fetched again for every record of a mixed log.
    pub fn scan_ops(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: WalConfig,
        mut visit: impl FnMut(&OpView<'_>, Location, DocSlot<'_>),
    ) -> Result<ScannedWal, WalError> {
        Wal::scan_segments(vfs, dir, config, |segment| {
            for &i in segment.by_document {
                let op = &segment.ops[i as usize];
                if let SegmentRecord::Op(view) = &op.record {
                    visit(view, op.location, segment.slot(op.ordinal));
                }
            }
        })
    }

    /// [`Wal::scan_ops`] a whole segment at a time ([`SegmentOps`]), for a caller that
    /// replays documents in parallel.
    pub fn scan_segments(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: WalConfig,
        visit: impl FnMut(SegmentOps<'_, '_>),
    ) -> Result<ScannedWal, WalError> {
        Wal::scan_in(vfs, dir, config, visit)
    }

    fn scan_in(
        vfs: Arc<dyn Vfs>,
        dir: &Path,
        config: WalConfig,
        mut visit: impl FnMut(SegmentOps<'_, '_>),
    ) -> Result<ScannedWal, WalError> {
        assert!(config.segment_size >= SEGMENT_SIZE_MIN);
        vfs.create_dir_all(dir)
            .map_err(io_context(format_args!("creating {}", dir.display())))?;
        let lock = vfs.lock_dir(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => WalError::Locked(format!(
                "{} is in use by another quire process (it holds the lock); stop it first",
                dir.display()
            )),
            _ => WalError::Io {
                context: format!("locking {}", dir.display()),
                error: e,
            },
        })?;

        let mut index = IndexBuilder::default();
        let mut payload_error: Option<String> = None;
        // Buffers of a segment's size, kept from one segment to the next: fresh ones
        // would be fresh pages (page faults) for every segment.
        let mut spare_ops: Vec<SegmentOp<'static>> = Vec::new();
        let mut grouped: Vec<(u32, u32)> = Vec::new();
        let mut by_document: Vec<u32> = Vec::new();
        // The segments are read on a thread of their own; a manual log starts none.
        let threads = config.background == Background::Threads;
        let progress = config.progress.clone();
        if let Some(progress) = &progress {
            let segments = recovery::list_segments(&*vfs, dir).map_err(recovery_error)?;
            progress.set_total(segments.len() as u64 * config.segment_size);
        }
        let scanned = recovery::scan_segments_with(
            &*vfs,
            dir,
            config.recovery,
            threads,
            |segment_id, records| {
                // Every record of the segment is decoded and indexed in LSN order first,
                // a chunk at a time as the chunks are checked (on a thread of their own
                // with `threads`: this decodes a chunk while the next is checked).
                let mut ops: Vec<SegmentOp<'_>> = recycle(std::mem::take(&mut spare_ops));
                let mut first_chunk = true;
                while let Some(chunk) = records.next_chunk() {
                    if let (true, Some((_, first))) = (first_chunk, chunk.first()) {
                        index.add_segment(segment_id, first.lsn);
                    }
                    first_chunk = false;
                    ops.reserve(chunk.len());
                    for &(offset, raw) in chunk {
                        let location = Location {
                            segment_id,
                            offset,
                            lsn: raw.lsn,
                        };
                        match raw.record_type {
                            RecordType::Op | RecordType::OpWithFingerprint => {
                                match OpView::decode(raw.record_type, raw.payload) {
                                    Ok(op) => {
                                        let doc =
                                            index.insert_op(location, op.doc_id, op.server_seq);
                                        ops.push(SegmentOp {
                                            ordinal: doc.ordinal,
                                            location,
                                            record: SegmentRecord::Op(op),
                                        });
                                    }
                                    Err(e) if payload_error.is_none() => {
                                        payload_error = Some(format!(
                                            "{} offset {offset} (LSN {}): {e}",
                                            segment_path(dir, segment_id).display(),
                                            raw.lsn
                                        ));
                                    }
                                    Err(_) => {}
                                }
                            }
                            RecordType::Tombstone => match TombstoneView::decode(raw.payload) {
                                Ok(tombstone) => {
                                    let doc = index.insert_tombstone(location, tombstone.doc_id);
                                    ops.push(SegmentOp {
                                        ordinal: doc.ordinal,
                                        location,
                                        record: SegmentRecord::Tombstone {
                                            version: tombstone.version,
                                        },
                                    });
                                }
                                Err(e) if payload_error.is_none() => {
                                    payload_error = Some(format!(
                                        "{} offset {offset} (LSN {}): {e}",
                                        segment_path(dir, segment_id).display(),
                                        raw.lsn
                                    ));
                                }
                                Err(_) => {}
                            },
                        }
                    }
                }
                // Then shown: in LSN order, and grouped by document (sorting (ordinal,
                // index) keeps each document's ops in LSN order).
                grouped.clear();
                grouped.extend(ops.iter().enumerate().map(|(i, op)| (op.ordinal, i as u32)));
                grouped.sort_unstable();
                by_document.clear();
                by_document.extend(grouped.iter().map(|&(_, i)| i));
                visit(SegmentOps {
                    ops: &ops,
                    by_document: &by_document,
                    index: &index,
                });
                spare_ops = recycle(ops);
                if let Some(progress) = &progress {
                    progress.add(config.segment_size);
                }
            },
        )
        .map_err(recovery_error)?;
        if let Some(progress) = &progress {
            progress.finish();
        }
        if let Some(e) = payload_error {
            return Err(WalError::Corrupt(format!("undecodable op record in {e}")));
        }
        Ok(ScannedWal {
            vfs,
            dir: dir.to_path_buf(),
            config,
            index: index.finish(),
            scanned,
            lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues an op record and returns its LSN; it is durable once
    /// [`Wal::wait_durable`] says so. Ops of one document must be appended in seq order
    /// (the caller serialises per document). Written as [`OpRecord::record_type`] says:
    /// type 2 (with the fingerprint), which is all the sequencer writes.
    pub fn append_op(&self, op: &OpRecord) -> Result<Lsn, WalError> {
        self.append_op_ref(op.borrowed())
    }

    /// [`Wal::append_op`] of a borrowed record.
    pub fn append_op_ref(&self, op: OpRecordRef<'_>) -> Result<Lsn, WalError> {
        let mut payload = Vec::with_capacity(op.encoded_len());
        op.encode(&mut payload);
        if payload.len() > self.max_payload {
            return Err(WalError::RecordTooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        let key = IndexKey {
            doc_id: Arc::from(op.doc_id),
            seq: op.server_seq,
        };
        Ok(self.queue.enqueue(op.record_type(), payload, Some(key))?)
    }

    /// Queues a tombstone record (`wal-format.md`, record type 3) and returns its LSN; it
    /// is durable once [`Wal::wait_durable`] says so. Once durable, the index forgets the
    /// document's ops before it (see [`Index::insert_tombstone`]).
    pub fn append_tombstone(&self, tombstone: &TombstoneRecord) -> Result<Lsn, WalError> {
        let mut payload = Vec::with_capacity(tombstone.encoded_len());
        tombstone.encode(&mut payload);
        let key = IndexKey {
            doc_id: Arc::from(tombstone.doc_id.as_str()),
            seq: tombstone.version,
        };
        Ok(self
            .queue
            .enqueue(RecordType::Tombstone, payload, Some(key))?)
    }

    /// Resolves once `lsn` is durable, or with the log's failure.
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), WalError> {
        let mut rx = self.durable.clone();
        let outcome = rx
            .wait_for(|d| d.outcome(lsn).is_some())
            .await
            .map_err(|_| WalError::Closed)?
            .outcome(lsn);
        match outcome {
            Some(true) => Ok(()),
            _ => Err(WalError::Failed(
                self.queue
                    .failure()
                    .unwrap_or_else(|| Arc::from("the write-ahead log failed")),
            )),
        }
    }

    /// Appends and waits for durability.
    pub async fn append_op_durable(&self, op: &OpRecord) -> Result<Lsn, WalError> {
        let lsn = self.append_op(op)?;
        self.wait_durable(lsn).await?;
        Ok(lsn)
    }

    pub fn durability(&self) -> Durability {
        self.queue.durability()
    }

    pub fn failure(&self) -> Option<Arc<str>> {
        self.queue.failure()
    }

    pub fn stats(&self) -> &WalStats {
        &self.stats
    }

    /// Wakes the writer if a record queued by this thread left its wake-up owed (see
    /// [`commit::defer_writer_wakes_on_this_thread`]): called by a runtime worker before
    /// it goes idle.
    pub fn pay_owed_writer_wake(&self) {
        self.queue.pay_owed_wake();
    }

    /// Writes the next batch of pending records, on the calling thread, exactly as the
    /// writer thread would: one write and sync (rolling to a new segment, prepared here,
    /// when the records do not fit), then the index, then durability for the waiters.
    /// Returns whether it did anything: `true` if a batch was written or the log failed
    /// trying (a write, sync or preparation error, or a panic, fails it for good, as in
    /// the thread); `false` if nothing was pending. Never waits for records. A batch is
    /// at most `max_batch_bytes` (at least one record): a step may leave records pending.
    ///
    /// Only for [`Background::Manual`]; with threads it does nothing and returns `false`.
    pub fn step(&self) -> bool {
        match &self.manual {
            Some(writer) => writer.lock().unwrap_or_else(|p| p.into_inner()).step(),
            None => false,
        }
    }

    /// Whether some record was appended but is not yet durable (nor failed): what a
    /// [`Wal::step`] would write, or a batch being written now.
    pub fn has_pending(&self) -> bool {
        self.queue.has_pending()
    }

    /// Why the next segment cannot be prepared (a full disk, most often), while it
    /// cannot: the log fails once the active segment is full, unless space returns
    /// first (the preparer tries again every second).
    pub fn next_segment_warning(&self) -> Option<String> {
        self.preparer.warning()
    }

    /// Whether the next segment is prepared: the active one rolls over to it without
    /// waiting. With threads the preparer works ahead, so this is often briefly false
    /// right after a roll; with [`Background::Manual`] it is false until a roll needs one.
    pub fn next_segment_prepared(&self) -> bool {
        self.preparer.is_ready()
    }

    /// Records and bytes waiting for the writer.
    pub fn queue_depth(&self) -> (usize, usize) {
        self.queue.pending()
    }

    /// Read access to the index (segment metadata for the truncation policy).
    pub fn with_index<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn active_segment(&self) -> SegmentId {
        self.active_id.load(Ordering::Acquire)
    }

    /// Up to `limit` durable ops of `doc_id` with seq > `after_seq`, in seq order.
    pub fn read_ops_after(
        &self,
        doc_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<OpRecord>, WalError> {
        let locations = self.with_index(|index| index.ops_after(doc_id, after_seq, limit));
        self.will_read(locations.iter().map(|&(_, location)| location));
        locations
            .into_iter()
            .map(|(_, location)| self.read_op(location))
            .collect()
    }

    /// Asks the disk for the records at `locations` in the sealed segments, all at once:
    /// a document's ops lie scattered over the log, and after a cold start the page
    /// cache holds none of them (recovery reads past it). Read one after another, each
    /// is a page fault that waits for its own disk read: 0.8 s for a document of 1,050
    /// ops spread over a 1.2 GB log, measured, against 7 ms with the log in memory.
    /// Records that touch (a document's ops written one after another) are asked for as
    /// one range: one system call rather than one per record.
    fn will_read(&self, locations: impl Iterator<Item = Location>) {
        let active = self.active_segment();
        let hint = |(segment_id, start, end): (SegmentId, usize, usize)| {
            if let Ok(region) = self.map_sealed(segment_id) {
                region.will_need(start, end - start);
            }
        };
        let mut range: Option<(SegmentId, usize, usize)> = None;
        for location in locations.filter(|location| location.segment_id < active) {
            let start = location.offset as usize;
            let end = start + RECORD_READ_HINT_BYTES;
            match &mut range {
                Some((segment_id, _, range_end))
                    if *segment_id == location.segment_id && start <= *range_end =>
                {
                    *range_end = (*range_end).max(end);
                }
                _ => {
                    if let Some(done) = range.replace((location.segment_id, start, end)) {
                        hint(done);
                    }
                }
            }
        }
        if let Some(done) = range {
            hint(done);
        }
    }

    fn read_op(&self, location: Location) -> Result<OpRecord, WalError> {
        if location.segment_id >= self.active_segment() {
            // The active segment is still being written: read it with pread.
            return pread_op(&*self.vfs, &self.dir, location);
        }
        let path = segment_path(&self.dir, location.segment_id);
        let region = self.map_sealed(location.segment_id)?;
        let bytes = region
            .get(location.offset as usize..)
            .ok_or_else(|| corrupt_at(&path, location, "offset past the end of the segment"))?;
        decode_op_at(&path, location, bytes)
    }

    fn map_sealed(&self, id: SegmentId) -> Result<Arc<Region>, WalError> {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(region) = maps.get(&id) {
            return Ok(region.clone());
        }
        let path = segment_path(&self.dir, id);
        let region = Arc::new(
            self.vfs
                .map(&path)
                .map_err(io_context(format_args!("mapping {}", path.display())))?,
        );
        maps.insert(id, region.clone());
        Ok(region)
    }

    /// Deletes every segment below `segment_id`, oldest first, then syncs the directory.
    /// The caller has checked that snapshots cover them. The newest sealed segment and
    /// the active one are never deleted: recovery needs a segment with a durable header
    /// to know where the log continues.
    pub fn remove_segments_before(&self, segment_id: SegmentId) -> Result<usize, WalError> {
        let limit = self.active_segment().saturating_sub(1);
        assert!(
            segment_id <= limit,
            "segment {segment_id} is not removable (active {})",
            self.active_segment()
        );
        let doomed: Vec<SegmentId> = self.with_index(|index| {
            index
                .segments()
                .range(..segment_id)
                .map(|(&id, _)| id)
                .collect()
        });
        if doomed.is_empty() {
            return Ok(0);
        }
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove_segments_before(segment_id);
        {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.retain(|&id, _| id >= segment_id);
        }
        for &id in &doomed {
            let path = segment_path(&self.dir, id);
            self.vfs
                .remove(&path)
                .map_err(io_context(format_args!("removing {}", path.display())))?;
        }
        self.vfs
            .sync_dir(&self.dir)
            .map_err(io_context(format_args!("syncing {}", self.dir.display())))?;
        self.stats
            .segments_removed
            .fetch_add(doomed.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            segments = doomed.len(),
            below = segment_id,
            "truncated the write-ahead log"
        );
        Ok(doomed.len())
    }

    /// Stops accepting appends, lets the writer finish what is queued, and joins the
    /// threads. Idempotent.
    ///
    /// With [`Background::Manual`] nothing more is written (the simulator drops a log to
    /// crash it): records still pending fail, their waiters with them, and later
    /// appends get that failure. Run [`Wal::step`] until [`Wal::has_pending`] is false
    /// first for a clean shutdown.
    pub fn close(&self) {
        if let Some(writer) = &self.manual {
            // Held so that no step is midway through a batch meanwhile.
            let _writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            let dropped = self.queue.abandon(&format!(
                "the write-ahead log in {} was closed with records not yet written",
                self.dir.display()
            ));
            if dropped > 0 {
                tracing::debug!(records = dropped, "closed with records not written");
            }
            self.preparer.stop();
            return;
        }
        self.queue.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        // The writer drains the queue and exits first; then the preparer is told to stop
        // (it may be zero-filling a spare) and joined.
        let mut threads = threads.into_iter();
        if let Some(writer) = threads.next() {
            let _ = writer.join();
        }
        self.preparer.stop();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Patch;
    use crate::wal::vfs::sim::{CrashMode, PanicAt, SimFs};

    const DIR: &str = "/data/wal";

    fn manual() -> WalConfig {
        WalConfig {
            segment_size: SEGMENT_SIZE_MIN,
            background: Background::Manual,
            ..WalConfig::default()
        }
    }

    fn op(seq: u64, text_len: usize) -> OpRecord {
        OpRecord {
            doc_id: "doc".into(),
            client_id: 7,
            local_seq: seq,
            server_seq: seq,
            base_version: seq - 1,
            timestamp_ms: seq,
            patches: vec![Patch::new(0, 0, "x".repeat(text_len))],
            fingerprint: Some(seq),
        }
    }

    fn open(fs: &SimFs) -> (Wal, Vec<OpRecord>) {
        let mut seen = Vec::new();
        let (wal, _) = Wal::open(Arc::new(fs.clone()), Path::new(DIR), manual(), |op, _| {
            seen.push(op.clone())
        })
        .unwrap();
        (wal, seen)
    }

    #[test]
    fn a_manual_log_writes_only_when_stepped() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        assert!(!wal.has_pending());
        assert!(!wal.step(), "nothing pending");
        let lsns: Vec<Lsn> = (1..=3)
            .map(|seq| wal.append_op(&op(seq, 10)).unwrap())
            .collect();
        let syncs = fs.sync_count();
        assert!(wal.has_pending());
        assert_eq!(wal.durability().durable_lsn, lsns[0] - 1);
        assert_eq!(fs.sync_count(), syncs, "no thread wrote anything");
        assert!(wal.step());
        assert!(!wal.has_pending());
        assert_eq!(wal.durability().durable_lsn, lsns[2]);
        let read = wal.read_ops_after("doc", 0, 10).unwrap();
        assert_eq!(read, (1..=3).map(|seq| op(seq, 10)).collect::<Vec<_>>());
        assert!(!wal.step(), "nothing pending");
        // A waiter is woken by the step that makes its record durable.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let lsn = wal.append_op(&op(4, 10)).unwrap();
        rt.block_on(async {
            use std::future::Future;
            use std::task::{Context, Waker};
            let mut waiter = std::pin::pin!(wal.wait_durable(lsn));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
            assert!(wal.step());
            waiter.await.unwrap();
        });
        drop(wal);
        let (_, seen) = open(&fs.crash(CrashMode::LoseUnsynced));
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn a_manual_step_prepares_the_next_segment_itself() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        // A quarter of a segment each: three fit, the fourth rolls to segment 2.
        let big = SEGMENT_SIZE_MIN as usize / 4;
        for seq in 1..=4 {
            wal.append_op(&op(seq, big)).unwrap();
            assert!(wal.step());
        }
        assert_eq!(wal.active_segment(), 2);
        assert!(!wal.has_pending());
        // A batch that rolls midway: the part before the roll and the part after.
        for seq in 5..=7 {
            wal.append_op(&op(seq, big)).unwrap();
        }
        assert!(wal.step());
        assert_eq!(wal.active_segment(), 3);
        assert!(wal.failure().is_none());
        drop(wal);
        let (wal, seen) = open(&fs.crash(CrashMode::LoseUnsynced));
        assert_eq!(seen.len(), 7);
        assert_eq!(wal.read_ops_after("doc", 0, 10).unwrap().len(), 7);
    }

    #[test]
    fn a_failed_sync_in_a_manual_step_fails_the_log_for_good() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        wal.append_op(&op(1, 10)).unwrap();
        assert!(wal.step());
        fs.fail_syncs_after(0);
        wal.append_op(&op(2, 10)).unwrap();
        assert!(wal.step(), "a failure is work done");
        let reason = wal.failure().expect("the log failed");
        assert!(reason.contains("failed at LSN 2..=2"), "{reason}");
        assert!(wal.durability().failed);
        assert!(!wal.has_pending());
        assert!(matches!(
            wal.append_op(&op(3, 10)),
            Err(WalError::Failed(_))
        ));
        assert!(!wal.step());
        assert_eq!(wal.durability().durable_lsn, 1);
    }

    #[test]
    fn a_panic_in_a_manual_step_fails_the_log_as_in_the_writer_thread() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        wal.append_op(&op(1, 10)).unwrap();
        assert!(wal.step());
        fs.panic_at_next(PanicAt::SyncData);
        wal.append_op(&op(2, 10)).unwrap();
        assert!(wal.step());
        let reason = wal.failure().expect("the log failed");
        assert!(reason.contains("writer in /data/wal panicked"), "{reason}");
        assert!(matches!(
            wal.append_op(&op(3, 10)),
            Err(WalError::Failed(_))
        ));
    }

    #[test]
    fn a_segment_that_cannot_be_prepared_in_a_manual_step_fails_the_log() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        // The fresh log's first segment is prepared by the first step.
        fs.fail_syncs_after(0);
        wal.append_op(&op(1, 10)).unwrap();
        assert!(wal.step());
        let reason = wal.failure().expect("the log failed");
        assert!(reason.contains("preparing segment"), "{reason}");
        assert!(!wal.step());
    }

    #[test]
    fn a_segment_whose_preparation_failed_once_is_tried_again_before_the_log_fails() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        // One attempt panics; the writer's own retry prepares the segment.
        fs.panic_at_next(PanicAt::Allocate);
        let lsn = wal.append_op(&op(1, 10)).unwrap();
        assert!(wal.step());
        assert_eq!(wal.failure(), None);
        assert!(wal.durability().durable_lsn >= lsn);
    }

    #[test]
    fn dropping_a_manual_log_writes_nothing_of_what_is_pending() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        wal.append_op(&op(1, 10)).unwrap();
        assert!(wal.step());
        for seq in 2..=4 {
            wal.append_op(&op(seq, 10)).unwrap();
        }
        let (syncs, files) = (fs.sync_count(), fs.files());
        drop(wal);
        assert_eq!((fs.sync_count(), fs.files()), (syncs, files));
        // Not even written unsynced: the disk as it is, crash or not, has one record.
        let (wal, seen) = open(&fs);
        assert_eq!(seen, vec![op(1, 10)]);
        drop(wal);
        let (_, seen) = open(&fs.crash(CrashMode::LoseUnsynced));
        assert_eq!(seen, vec![op(1, 10)]);
    }

    #[test]
    fn closing_a_manual_log_fails_what_is_pending() {
        let fs = SimFs::new();
        let (wal, _) = open(&fs);
        let lsn = wal.append_op(&op(1, 10)).unwrap();
        wal.close();
        assert!(!wal.step());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let waited = rt.block_on(wal.wait_durable(lsn));
        assert!(matches!(waited, Err(WalError::Failed(_))), "{waited:?}");
        assert!(wal.append_op(&op(2, 10)).is_err());
    }

    #[test]
    fn recycling_a_segment_buffer_keeps_its_allocation() {
        let ops: Vec<SegmentOp<'static>> = Vec::with_capacity(1000);
        let (buffer, capacity) = (ops.as_ptr() as usize, ops.capacity());
        let again: Vec<SegmentOp<'_>> = recycle(ops);
        assert_eq!(again.as_ptr() as usize, buffer);
        assert_eq!(again.capacity(), capacity);
        assert!(again.is_empty());
    }
}
