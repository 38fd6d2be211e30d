//! Startup recovery of the log: validate every record in every segment, cut a torn
//! tail, refuse corruption in the middle of the log.
//!
//! The distinction (protocol-aware recovery, FAST'18): after a crash, only the last
//! write can be incomplete, and nothing in it was acknowledged (acks follow the
//! `fdatasync` that completes the write). So a bad record is a *torn tail* when every
//! valid record after it belongs to that same unsynced write; each record names its
//! write by `lsn - batch_index`. A valid record from a *later* write means the bad one
//! was synced once and went bad since: *corruption*, which may hide acknowledged data.
//! Recovery refuses to start on it (unless the operator asks for a repair), naming the
//! segment and offset. A torn tail is cut: its bytes are zeroed and synced, and any
//! later segment files (spares, or a segment whose first write never completed) are
//! removed, so that the next crash cannot resurrect them.
//!
//! Two steps, so that a start refused for any reason leaves the directory untouched:
//! [`scan`] validates and classifies everything and plans the cut, writing nothing;
//! [`apply`] makes the cut, once the caller has no objection left.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::record::{framed_len, intact_header_len, FrameError, Lsn, RawRecord, RECORD_HEADER_LEN};
use super::segment::{
    all_zero, find_valid_record_after, last_nonzero, parse_segment_file_name, scan_records,
    segment_path, ScanStop, SegmentHeader, SegmentId, SEGMENT_HEADER_LEN,
};
use super::vfs::{FileBuf, Region, Vfs};

#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryOptions {
    /// Cut the log at the first bad record even when valid records follow it. Loses
    /// whatever follows; only for an operator who has no backup to restore.
    pub repair: bool,
}

/// A segment that survived recovery.
#[derive(Debug, Clone)]
pub struct RecoveredSegment {
    pub header: SegmentHeader,
    /// Offset just past the last valid record.
    pub end_offset: u64,
    pub records: u64,
    pub last_lsn: Option<Lsn>,
}

/// What was cut from the tail.
#[derive(Debug, Clone)]
pub struct TailCut {
    pub segment_id: SegmentId,
    pub offset: u64,
    pub reason: String,
    /// Bytes zeroed in that segment.
    pub bytes_zeroed: u64,
    /// Whole segment files removed after it.
    pub segments_removed: Vec<SegmentId>,
    /// Whether valid records of later writes were discarded (only with `repair`).
    pub discarded_later_records: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub segments: Vec<RecoveredSegment>,
    pub records: u64,
    pub bytes_scanned: u64,
    /// The LSN the next record gets.
    pub next_lsn: Lsn,
    /// Trailing unused (all-zero) segment files that were removed.
    pub spares_removed: Vec<SegmentId>,
    pub tail_cut: Option<TailCut>,
    pub elapsed: Duration,
}

/// Recovery refused to go on.
#[derive(Debug, Clone)]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "write-ahead log corrupted in {} at byte offset {}: {}. \
             The records after this point may include acknowledged edits, so quire will not \
             start. Inspect with `wal-inspect verify <data-dir>`; restore the data directory \
             from a backup, or, accepting the loss of everything after this point, start with \
             `--repair-wal`.",
            self.path.display(),
            self.offset,
            self.reason
        )
    }
}

#[derive(Debug)]
pub enum RecoveryError {
    Corrupt(Corruption),
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryError::Corrupt(c) => c.fmt(f),
            RecoveryError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> RecoveryError {
    RecoveryError::Corrupt(Corruption {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecoveryError + '_ {
    move |error| RecoveryError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The segment ids in `wal_dir`, sorted. Other files are reported and left alone.
pub fn list_segments(vfs: &dyn Vfs, wal_dir: &Path) -> Result<Vec<SegmentId>, RecoveryError> {
    let mut ids = Vec::new();
    for name in vfs.list(wal_dir).map_err(io_err(wal_dir))? {
        match parse_segment_file_name(&name) {
            Some(id) => ids.push(id),
            None => {
                tracing::warn!(file = %name, dir = %wal_dir.display(), "ignoring a file that is not a WAL segment")
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The unit in which a disk persists a write: a torn write leaves whole sectors
/// unwritten. 512 bytes is the smallest sector of any disk quire runs on; a disk with
/// 4 KiB sectors tears at coarser boundaries, which are also 512-byte boundaries.
pub const SECTOR_SIZE: usize = 512;

/// Where the valid log ends.
struct Break {
    /// Index into the segment list.
    position: usize,
    offset: u64,
    reason: String,
    /// The bytes show a sector that never reached the disk (see [`shows_missing_sector`]).
    missing_sector: bool,
}

/// Whether the damaged record at `offset` shows a sector that never reached the disk.
/// Segments are preallocated with zeros and never reused, so an unwritten sector reads
/// as zeros: a torn record has, between its start or a sector boundary and the next
/// boundary (or its end), a whole piece of zeros. A flipped bit leaves no such piece, so a
/// damaged record without one is corruption, not a torn write. (A record whose own
/// content is zero from a sector boundary to its end would be taken for torn: an op
/// inserting hundreds of NUL characters. Documented in `wal-format.md`.)
///
/// Bytes past the end of the file were never written either: a file that ends inside
/// the record's extent (its 24 header bytes, or the framed length an intact header
/// claims) shows a missing sector. Whether that may be cut as a torn tail (only at the
/// end of the log) is the caller's rule, as for any other torn record.
pub fn shows_missing_sector(bytes: &[u8], offset: usize) -> bool {
    let Some(rest) = bytes.get(offset..) else {
        return false;
    };
    // The extent the record claims, if its header is intact; else only the header.
    let claimed_end = match intact_header_len(rest) {
        Some(len) => offset + framed_len(len as usize),
        None => offset + RECORD_HEADER_LEN,
    };
    if claimed_end > bytes.len() {
        return true;
    }
    let header_end = offset + RECORD_HEADER_LEN;
    if bytes[offset..header_end].iter().all(|&b| b == 0) {
        return true;
    }
    // Padding is not checked for zeros: it is zero in every record, written or not.
    let extent_end = match intact_header_len(rest) {
        Some(len) => offset + RECORD_HEADER_LEN + len as usize,
        None => header_end,
    };
    // The piece before the first sector boundary starts with the length field, never
    // zero in a written record; each later piece is checked whole.
    let first_boundary = (offset / SECTOR_SIZE + 1) * SECTOR_SIZE;
    if bytes[offset..first_boundary.min(extent_end)]
        .iter()
        .all(|&b| b == 0)
    {
        return true;
    }
    let mut boundary = first_boundary;
    while boundary < extent_end {
        let piece_end = (boundary + SECTOR_SIZE).min(extent_end);
        if bytes[boundary..piece_end].iter().all(|&b| b == 0) {
            return true;
        }
        boundary += SECTOR_SIZE;
    }
    false
}

/// Scans the log in `wal_dir`, calling `visit(segment_id, offset, record)` for every
/// valid record in LSN order, then cuts a torn tail. Read-only when `dry_run` (for
/// `wal-inspect verify`): the report then says what would be cut.
pub fn recover(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    options: RecoveryOptions,
    dry_run: bool,
    visit: impl FnMut(SegmentId, u64, RawRecord<'_>),
) -> Result<RecoveryReport, RecoveryError> {
    let scanned = scan(vfs, wal_dir, options, visit)?;
    if dry_run {
        return Ok(scanned.report);
    }
    apply(vfs, wal_dir, scanned)
}

/// What a read-only [`scan`] found: every record validated, the end of the log
/// classified. `report` describes the log as it will be once [`apply`] has made the
/// planned cut (`tail_cut`, `spares_removed`); nothing has been written yet.
#[derive(Debug)]
pub struct Scanned {
    pub report: RecoveryReport,
    cut: Option<PlannedCut>,
}

/// The writes that cut a torn tail (or a repaired break): every one of them is decided
/// before the first is made.
#[derive(Debug)]
struct PlannedCut {
    segment_id: SegmentId,
    offset: u64,
    bytes_zeroed: u64,
    /// The break segment itself goes (no record would be left in it).
    remove_break_segment: bool,
    /// Every file removed, the break segment included if it goes.
    removed: Vec<SegmentId>,
}

/// Scans and validates the log in `wal_dir` without writing anything, calling
/// `visit(segment_id, offset, record)` for every valid record in LSN order. A torn tail
/// (or, with `repair`, the first bad record) is classified and its cut planned; a
/// corruption is refused here, before any byte of the directory has changed.
pub fn scan(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    options: RecoveryOptions,
    mut visit: impl FnMut(SegmentId, u64, RawRecord<'_>),
) -> Result<Scanned, RecoveryError> {
    scan_segments(vfs, wal_dir, options, |segment_id, records| {
        while let Some(chunk) = records.next_chunk() {
            for &(offset, record) in chunk {
                visit(segment_id, offset, record);
            }
        }
    })
}

/// [`scan`], handing over the valid records of one segment at a time, in LSN order, as
/// `(offset, record)` in chunks ([`SegmentRecords`]): once the visit has taken the last
/// chunk, the whole segment is checked, and its records may be taken in any order
/// (replay takes them document by document, while each document's state is in cache).
/// `visit` is called for each segment that holds a valid record.
pub fn scan_segments(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    options: RecoveryOptions,
    visit: impl FnMut(SegmentId, &mut SegmentRecords<'_>),
) -> Result<Scanned, RecoveryError> {
    // A read-ahead thread only where reads wait on a device (not the simulated disk,
    // whose fuzz target would otherwise start a thread per input).
    scan_segments_with(vfs, wal_dir, options, vfs.reads_wait(), visit)
}

/// [`scan_segments`] on threads, only if `threads`: the segments are read on a thread
/// of their own, one segment ahead of the scan (`SegmentReader`), and each segment's
/// records are checked (checksums, framing, LSN sequence) on a thread of their own, a
/// chunk ahead of `visit` ([`SegmentRecords`]), so that the checksums of a chunk are
/// computed on one core while `visit` decodes the chunk before it on the other. A
/// caller that must start no thread (`Background::Manual`) passes `false`: each
/// segment is then read when its turn comes, and checked whole before `visit` sees
/// it, in one chunk. Either way `visit` sees the same records in the same order, and
/// the report is the same.
pub fn scan_segments_with(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    options: RecoveryOptions,
    threads: bool,
    visit: impl FnMut(SegmentId, &mut SegmentRecords<'_>),
) -> Result<Scanned, RecoveryError> {
    let started = Instant::now();
    let ids = list_segments(vfs, wal_dir)?;
    for pair in ids.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(corrupt(
                &segment_path(wal_dir, pair[0] + 1),
                0,
                format!(
                    "segment file missing: segments {} and {} are not consecutive",
                    pair[0], pair[1]
                ),
            ));
        }
    }
    if !threads {
        let reader = SegmentReader::inline(vfs, wal_dir, &ids);
        return scan_in_order(wal_dir, &ids, options, reader, false, started, visit);
    }
    // The reader borrows the caller's file system: a scoped thread, which has ended
    // when the scan returns (dropping the reader's channels stops it).
    std::thread::scope(|scope| {
        let reader = SegmentReader::spawn(scope, vfs, wal_dir, &ids)
            .unwrap_or_else(|_| SegmentReader::inline(vfs, wal_dir, &ids));
        scan_in_order(wal_dir, &ids, options, reader, true, started, visit)
    })
}

/// A chunk of a segment's valid records, `(offset, record)` in LSN order.
type Chunk<'r> = Vec<(u64, RawRecord<'r>)>;

/// A checking thread hands its records over in chunks of at most this many records...
const CHUNK_RECORDS: usize = 4096;
/// ...or of records spanning at least this many bytes of the segment, whichever comes
/// first: small enough that `visit` starts on a segment soon after its checking does
/// (a 64 MiB segment is some 64 chunks), large enough that handing a chunk over (a
/// channel send, a wake-up) costs nothing next to checking it (some 0.5 ms).
const CHUNK_BYTES: usize = 1 << 20;

/// The valid records of one segment, in LSN order, a chunk at a time as they are
/// checked ([`SegmentRecords::next_chunk`]). Once `next_chunk` has returned `None`,
/// every record of the segment has been checked and shown.
pub struct SegmentRecords<'r> {
    /// The chunk last returned, or the first one, not yet returned.
    current: Option<Chunk<'r>>,
    /// Whether `current` has been returned already.
    shown: bool,
    /// The checking thread's chunks, and the way back for the spent ones (their
    /// buffers reused); `None` when the segment was checked whole, in one chunk.
    checker: Option<(mpsc::Receiver<Chunk<'r>>, mpsc::Sender<Chunk<'r>>)>,
}

impl<'r> SegmentRecords<'r> {
    /// The next chunk of records, in LSN order, or `None` at the end of the segment's
    /// valid records. Waits for the checking thread to have checked it.
    pub fn next_chunk(&mut self) -> Option<&[(u64, RawRecord<'r>)]> {
        if self.shown {
            let spent = self.current.take();
            if let (Some(mut spent), Some((_, free))) = (spent, &self.checker) {
                spent.clear();
                // Fails only once the checking thread is done: the buffer is dropped.
                let _ = free.send(spent);
            }
            self.current = self
                .checker
                .as_ref()
                .and_then(|(chunks, _)| chunks.recv().ok());
        }
        self.shown = true;
        self.current.as_deref()
    }
}

/// What checking a segment's records found.
struct Checked {
    stop: ScanStop,
    records: u64,
    last_lsn: Option<Lsn>,
}

/// Checks the records of a segment whose header is `first_lsn`'s ([`scan_records`]),
/// handing them to `send`: if `chunked`, in chunks of at most [`CHUNK_RECORDS`] records
/// or of records spanning [`CHUNK_BYTES`], each taken from `spare` where it has a
/// spent one; else all in one.
fn check_records<'r>(
    bytes: &'r [u8],
    first_lsn: Lsn,
    chunked: bool,
    mut spare: impl FnMut() -> Option<Chunk<'r>>,
    mut send: impl FnMut(Chunk<'r>),
) -> Checked {
    let mut records = 0u64;
    let mut last_lsn = None;
    let mut chunk: Chunk<'r> = Vec::new();
    let mut chunk_start = SEGMENT_HEADER_LEN;
    let stop = scan_records(bytes, first_lsn, |offset, record| {
        if chunked && (chunk.len() >= CHUNK_RECORDS || offset - chunk_start >= CHUNK_BYTES) {
            let next = spare().unwrap_or_default();
            send(std::mem::replace(&mut chunk, next));
            chunk_start = offset;
        }
        chunk.push((offset as u64, record));
        records += 1;
        last_lsn = Some(record.lsn);
    });
    if !chunk.is_empty() {
        send(chunk);
    }
    Checked {
        stop,
        records,
        last_lsn,
    }
}

/// Checks the records of the segment `bytes` (its header says `first_lsn`), showing
/// them to `visit(id, records)` if there is any valid one: on a thread of its own a
/// chunk ahead of `visit` if `threads` (and one can be started), else whole first.
fn check_and_visit(
    id: SegmentId,
    bytes: &[u8],
    first_lsn: Lsn,
    threads: bool,
    visit: &mut impl FnMut(SegmentId, &mut SegmentRecords<'_>),
) -> Checked {
    let inline = |visit: &mut dyn FnMut(SegmentId, &mut SegmentRecords<'_>)| {
        let mut whole = None;
        let checked = check_records(bytes, first_lsn, false, || None, |c| whole = Some(c));
        if whole.is_some() {
            visit(
                id,
                &mut SegmentRecords {
                    current: whole,
                    shown: false,
                    checker: None,
                },
            );
        }
        checked
    };
    if !threads {
        return inline(visit);
    }
    // The checker borrows the segment's bytes: a scoped thread, one per segment (its
    // start costs some 50 µs, against tens of milliseconds to check a segment).
    std::thread::scope(|scope| {
        let (chunks_sender, chunks) = mpsc::channel::<Chunk<'_>>();
        let (free, free_receiver) = mpsc::channel::<Chunk<'_>>();
        let checker = std::thread::Builder::new()
            .name("quire-wal-check".into())
            .spawn_scoped(scope, move || {
                check_records(
                    bytes,
                    first_lsn,
                    true,
                    || free_receiver.try_recv().ok(),
                    // Fails only if the scan has stopped (a panic in `visit`): the
                    // rest is checked for nothing, and the panic raised again.
                    |chunk| {
                        let _ = chunks_sender.send(chunk);
                    },
                )
            });
        let Ok(checker) = checker else {
            return inline(visit);
        };
        let mut records = SegmentRecords {
            current: chunks.recv().ok(),
            shown: false,
            checker: Some((chunks, free)),
        };
        if records.current.is_some() {
            visit(id, &mut records);
        }
        // Whatever `visit` left is taken (and dropped) here: the checker has then
        // checked the whole segment.
        while records.next_chunk().is_some() {}
        checker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Buffers of a segment's size that the reader thread fills in turn: one being scanned
/// while the next is read. More would not make the disk or the scan faster, only use
/// more memory (each is a segment's size: 64 MiB by default).
const READ_AHEAD_BUFFERS: usize = 2;

/// One segment's bytes as read, or why they could not be.
struct ReadSegment {
    id: SegmentId,
    bytes: io::Result<Region>,
}

/// Reads the segments in id order for the scan, each whole into a buffer
/// ([`Vfs::read_file`]), and takes the buffers back for the next ones once the scan is
/// done with them.
enum SegmentReader<'a> {
    /// On the scan's thread, when the scan asks.
    Inline {
        vfs: &'a dyn Vfs,
        wal_dir: &'a Path,
        ids: &'a [SegmentId],
        next: usize,
        free: Vec<FileBuf>,
    },
    /// On a thread of its own, which reads the next segment while this one is scanned,
    /// so that the disk is kept busy through the scan: it waits only for a free buffer.
    Ahead {
        filled: mpsc::Receiver<ReadSegment>,
        free: mpsc::Sender<FileBuf>,
    },
}

impl<'a> SegmentReader<'a> {
    fn inline(vfs: &'a dyn Vfs, wal_dir: &'a Path, ids: &'a [SegmentId]) -> SegmentReader<'a> {
        SegmentReader::Inline {
            vfs,
            wal_dir,
            ids,
            next: 0,
            free: Vec::new(),
        }
    }

    fn spawn<'scope>(
        scope: &'scope std::thread::Scope<'scope, 'a>,
        vfs: &'a dyn Vfs,
        wal_dir: &'a Path,
        ids: &'a [SegmentId],
    ) -> io::Result<SegmentReader<'a>> {
        let (free_sender, free) = mpsc::channel::<FileBuf>();
        let (filled, filled_receiver) = mpsc::channel::<ReadSegment>();
        for _ in 0..READ_AHEAD_BUFFERS {
            free_sender
                .send(FileBuf::new())
                .expect("the receiver is here");
        }
        std::thread::Builder::new()
            .name("quire-wal-read".into())
            .spawn_scoped(scope, move || {
                for &id in ids {
                    // Either channel closed: the scan has stopped, and so does this.
                    let Ok(buf) = free.recv() else {
                        return;
                    };
                    let bytes = vfs.read_file(&segment_path(wal_dir, id), buf);
                    let failed = bytes.is_err();
                    if filled.send(ReadSegment { id, bytes }).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(SegmentReader::Ahead {
            filled: filled_receiver,
            free: free_sender,
        })
    }

    /// The next segment in id order: `expected` is its id.
    fn next(&mut self, expected: SegmentId) -> ReadSegment {
        let read = match self {
            SegmentReader::Inline {
                vfs,
                wal_dir,
                ids,
                next,
                free,
            } => {
                let id = ids[*next];
                *next += 1;
                let buf = free.pop().unwrap_or_default();
                let bytes = vfs.read_file(&segment_path(wal_dir, id), buf);
                ReadSegment { id, bytes }
            }
            SegmentReader::Ahead { filled, .. } => match filled.recv() {
                Ok(read) => read,
                // The thread ended without sending this segment: it panicked (the
                // panic is raised again when the scope ends).
                Err(_) => ReadSegment {
                    id: expected,
                    bytes: Err(io::Error::other("the segment reader thread stopped")),
                },
            },
        };
        assert_eq!(read.id, expected, "segments are read in id order");
        read
    }

    /// A buffer for the next segments: the one a segment the scan is done with was
    /// read into, or an empty one in place of one the scan keeps or that never was
    /// (the reader waits for a buffer before each segment).
    fn recycle(&mut self, bytes: Option<Region>) {
        let bytes = bytes.and_then(Region::into_buffer).unwrap_or_default();
        match self {
            SegmentReader::Inline { free, .. } => free.push(bytes),
            // A send fails only if the thread has ended: nothing left to read.
            SegmentReader::Ahead { free, .. } => {
                let _ = free.send(bytes);
            }
        }
    }
}

/// Scans the segments `ids` as `reader` reads them: [`scan_segments`]'s work.
fn scan_in_order(
    wal_dir: &Path,
    ids: &[SegmentId],
    options: RecoveryOptions,
    mut reader: SegmentReader<'_>,
    threads: bool,
    started: Instant,
    mut visit: impl FnMut(SegmentId, &mut SegmentRecords<'_>),
) -> Result<Scanned, RecoveryError> {
    let mut report = RecoveryReport::default();
    let mut last_lsn: Option<Lsn> = None;
    // The LSN the first record of the unfinished write would have: known from the last
    // record, or from the first segment's header, or 1 for a log that never had one.
    let mut expected_next: Option<Lsn> = if ids.first().is_none_or(|&id| id == 1) {
        Some(1)
    } else {
        None
    };
    // The bytes of the segment where the valid log ends and of every one after it,
    // which the classification of the break reads again; the others are let go (their
    // buffer reused) once scanned.
    let mut kept: Vec<Region> = Vec::new();
    let mut found_break: Option<Break> = None;

    for (position, &id) in ids.iter().enumerate() {
        let path = segment_path(wal_dir, id);
        let bytes = reader.next(id).bytes.map_err(io_err(&path))?;
        report.bytes_scanned += bytes.len() as u64;
        let header = match SegmentHeader::decode(&bytes) {
            Ok(Some(header)) => header,
            Ok(None) => {
                kept.push(bytes);
                reader.recycle(None);
                found_break = Some(Break {
                    position,
                    offset: 0,
                    reason: "segment header never written".into(),
                    missing_sector: true,
                });
                break;
            }
            Err(error) => return Err(corrupt(&path, 0, error.to_string())),
        };
        if header.segment_id != id {
            return Err(corrupt(
                &path,
                0,
                format!(
                    "header names segment {} but the file is {id}",
                    header.segment_id
                ),
            ));
        }
        if let Some(last) = last_lsn {
            if header.first_lsn != last + 1 {
                return Err(corrupt(
                    &path,
                    0,
                    format!(
                        "segment starts at LSN {} but the previous one ended at {last}: records are missing",
                        header.first_lsn
                    ),
                ));
            }
        } else if position > 0 {
            return Err(corrupt(&path, 0, "an earlier segment holds no records"));
        }
        expected_next = Some(header.first_lsn);
        let Checked {
            stop,
            records,
            last_lsn: segment_last,
        } = check_and_visit(id, &bytes, header.first_lsn, threads, &mut visit);
        report.records += records;
        if let Some(l) = segment_last {
            last_lsn = Some(l);
            expected_next = Some(l + 1);
        }
        report.segments.push(RecoveredSegment {
            header,
            end_offset: stop.offset() as u64,
            records,
            last_lsn: segment_last,
        });
        let brk = match stop {
            ScanStop::Zeros { offset } if offset == SEGMENT_HEADER_LEN && records == 0 => {
                // A header and nothing else: its first write was torn after the header.
                // Nothing in it was acknowledged; the whole file goes.
                Some(Break {
                    position,
                    offset: 0,
                    reason: "segment has a header but no records".into(),
                    missing_sector: true,
                })
            }
            ScanStop::Zeros { .. } => None,
            ScanStop::Invalid { offset, error } => Some(Break {
                position,
                offset: offset as u64,
                reason: describe(error),
                missing_sector: shows_missing_sector(&bytes, offset),
            }),
        };
        if brk.is_some() {
            kept.push(bytes);
            reader.recycle(None);
            found_break = brk;
            break;
        }
        reader.recycle(Some(bytes));
    }

    let mut cut = None;
    if let Some(brk) = found_break {
        // Read the segments after the break too: they are checked for later writes.
        for &id in &ids[brk.position + 1..] {
            let path = segment_path(wal_dir, id);
            let bytes = reader.next(id).bytes.map_err(io_err(&path))?;
            report.bytes_scanned += bytes.len() as u64;
            kept.push(bytes);
            reader.recycle(None);
        }
        cut = plan_cut(
            wal_dir,
            ids,
            &kept,
            brk,
            expected_next,
            options,
            &mut report,
        )?;
    }
    report.next_lsn = last_lsn.map_or(expected_next.unwrap_or(1), |l| l + 1);
    report.elapsed = started.elapsed();
    Ok(Scanned { report, cut })
}

fn describe(error: FrameError) -> String {
    format!("invalid record ({error})")
}

/// Classifies the break (torn tail, or corruption refused unless `repair`) and plans
/// the cut; records it in `report`. Writes nothing. `regions` holds the bytes of the
/// break's segment and of every segment after it.
fn plan_cut(
    wal_dir: &Path,
    ids: &[SegmentId],
    regions: &[Region],
    brk: Break,
    expected_next: Option<Lsn>,
    options: RecoveryOptions,
    report: &mut RecoveryReport,
) -> Result<Option<PlannedCut>, RecoveryError> {
    // Find any valid record after the break that is not part of the unfinished write.
    let mut later_write: Option<(SegmentId, u64, Lsn)> = None;
    let mut anything_nonzero = false;
    assert_eq!(regions.len(), ids.len() - brk.position);
    'scan: for (position, region) in (brk.position..).zip(regions) {
        let id = ids[position];
        let start = if position == brk.position {
            brk.offset as usize
        } else {
            if SegmentHeader::decode(region).ok() != Some(None) {
                later_write = Some((id, 0, 0));
                break 'scan;
            }
            0
        };
        let search_from = start.max(SEGMENT_HEADER_LEN);
        if region.get(start..).is_none_or(all_zero) {
            // Nothing written here, so no record to find (a record's length is never 0).
            continue;
        }
        anything_nonzero = true;
        let mut from = search_from;
        while let Some((offset, record)) = find_valid_record_after(region, from) {
            let write_start = record.lsn.saturating_sub(u64::from(record.batch_index));
            let same_write =
                expected_next.is_some_and(|next| record.lsn >= next && write_start <= next);
            if !same_write {
                later_write = Some((id, offset as u64, record.lsn));
                break 'scan;
            }
            from = offset + record.framed_len;
        }
    }

    let break_id = ids[brk.position];
    let break_path = segment_path(wal_dir, break_id);
    let not_torn = if let Some((id, offset, lsn)) = later_write {
        Some(format!(
            "{} (a valid record of a later write follows: LSN {lsn} in {} at offset {offset})",
            brk.reason,
            segment_path(wal_dir, id).display()
        ))
    } else if !brk.missing_sector {
        Some(format!(
            "{} (every sector of the record is present, so this is damage, not a torn write)",
            brk.reason
        ))
    } else {
        None
    };
    if let Some(detail) = not_torn {
        if !options.repair {
            return Err(corrupt(&break_path, brk.offset, detail));
        }
        tracing::error!(
            segment = %break_path.display(),
            offset = brk.offset,
            "repairing the WAL as asked: discarding everything after the first bad record: {detail}"
        );
    }

    // Whole files to remove: the break segment itself when no record would be left in
    // it (a segment must never be left with a header and nothing after it), and every
    // segment after it.
    let remove_break_segment = brk.offset as usize <= SEGMENT_HEADER_LEN;
    let first_removed = if remove_break_segment {
        brk.position
    } else {
        brk.position + 1
    };
    let removed: Vec<SegmentId> = ids[first_removed..].to_vec();
    let mut bytes_zeroed = 0u64;
    if !remove_break_segment {
        let region = &regions[0];
        if let Some(last) = last_nonzero(region).filter(|&l| l as u64 >= brk.offset) {
            bytes_zeroed = last as u64 + 1 - brk.offset;
        }
    }
    if !anything_nonzero && later_write.is_none() {
        // A clean end: only unused, all-zero spares follow.
        report.spares_removed = removed.clone();
    } else {
        report.tail_cut = Some(TailCut {
            segment_id: break_id,
            offset: brk.offset,
            reason: brk.reason,
            bytes_zeroed,
            segments_removed: removed.clone(),
            discarded_later_records: later_write.is_some() || !brk.missing_sector,
        });
    }
    Ok(Some(PlannedCut {
        segment_id: break_id,
        offset: brk.offset,
        bytes_zeroed,
        remove_break_segment,
        removed,
    }))
}

/// Makes the cut that [`scan`] planned: zeroes the torn bytes and syncs them, removes
/// the files after the break and syncs the directory. Returns the report of the log as
/// it now is.
pub fn apply(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    scanned: Scanned,
) -> Result<RecoveryReport, RecoveryError> {
    let Scanned { mut report, cut } = scanned;
    let Some(cut) = cut else {
        return Ok(report);
    };
    let break_path = segment_path(wal_dir, cut.segment_id);
    if cut.bytes_zeroed > 0 {
        let file = vfs.open(&break_path).map_err(io_err(&break_path))?;
        let zeros = vec![0u8; cut.bytes_zeroed.min(1 << 20) as usize];
        let mut offset = cut.offset;
        let end = cut.offset + cut.bytes_zeroed;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], offset)
                .map_err(io_err(&break_path))?;
            offset += n as u64;
        }
        file.sync_data().map_err(io_err(&break_path))?;
    }
    if cut.remove_break_segment {
        report
            .segments
            .retain(|s| s.header.segment_id != cut.segment_id);
    }
    // Remove from the newest down, so that a crash in between leaves a consecutive run.
    for &id in cut.removed.iter().rev() {
        let path = segment_path(wal_dir, id);
        vfs.remove(&path).map_err(io_err(&path))?;
    }
    if !cut.removed.is_empty() {
        vfs.sync_dir(wal_dir).map_err(io_err(wal_dir))?;
    }
    if let Some(tail) = &report.tail_cut {
        tracing::warn!(
            segment = %break_path.display(),
            offset = tail.offset,
            bytes_zeroed = tail.bytes_zeroed,
            segments_removed = tail.segments_removed.len(),
            "cut the torn tail of the write-ahead log: {}",
            tail.reason
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::{encode_frame, RecordType};
    use crate::wal::vfs::sim::SimFs;

    const DIR: &str = "/wal";

    /// A segment holding records `first_lsn..first_lsn + count`, one write each, of
    /// 100-byte payloads, in a file of `size` bytes (zeros after the records).
    fn segment_bytes(id: SegmentId, first_lsn: Lsn, count: u64, size: usize) -> Vec<u8> {
        let header = SegmentHeader {
            segment_id: id,
            first_lsn,
            created_ms: 0,
        };
        let mut bytes = header.encode().to_vec();
        for lsn in first_lsn..first_lsn + count {
            encode_frame(&mut bytes, lsn, 0, RecordType::Op, &[0xA5; 100]);
        }
        assert!(bytes.len() <= size);
        bytes.resize(size, 0);
        bytes
    }

    fn disk(segments: &[Vec<u8>]) -> SimFs {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new(DIR)).unwrap();
        for (i, bytes) in segments.iter().enumerate() {
            let path = segment_path(Path::new(DIR), i as SegmentId + 1);
            fs.create(&path).unwrap().write_all_at(bytes, 0).unwrap();
        }
        fs
    }

    fn scan(fs: &SimFs, dry_run: bool) -> Result<RecoveryReport, RecoveryError> {
        recover(
            fs,
            Path::new(DIR),
            RecoveryOptions::default(),
            dry_run,
            |_, _, _| {},
        )
    }

    const RECORD: usize = RECORD_HEADER_LEN + 100 + 4; // framed: 128 bytes

    #[test]
    fn a_last_segment_that_ends_inside_a_record_is_a_torn_tail_and_is_cut() {
        assert_eq!(framed_len(100), RECORD);
        // Ends inside the payload of record 5, inside its header, inside its padding.
        for cut_at in [
            SEGMENT_HEADER_LEN + 4 * RECORD + 60,
            SEGMENT_HEADER_LEN + 4 * RECORD + 10,
            SEGMENT_HEADER_LEN + 5 * RECORD - 2,
        ] {
            let mut bytes = segment_bytes(1, 1, 5, 4096);
            bytes.truncate(cut_at);
            let fs = disk(&[bytes]);
            let report = scan(&fs, true)
                .unwrap_or_else(|e| panic!("file ending at {cut_at}: torn, not corrupt: {e}"));
            let cut = report.tail_cut.expect("the partial record is a torn tail");
            assert_eq!(cut.offset, (SEGMENT_HEADER_LEN + 4 * RECORD) as u64);
            assert_eq!(report.records, 4);
            assert_eq!(report.next_lsn, 5);
            // Cut for real, the log then recovers cleanly to the same four records.
            let cut = scan(&fs, false).unwrap();
            assert!(cut.tail_cut.is_some());
            let again = scan(&fs, false).unwrap();
            assert!(again.tail_cut.is_none(), "{:?}", again.tail_cut);
            assert_eq!(again.records, 4);
        }
    }

    #[test]
    fn more_segments_after_the_break_than_read_buffers_are_all_checked_with_or_without_threads() {
        // A torn record in segment 2, then spares: more files kept for the
        // classification than the reader thread has buffers of its own.
        let mut torn = segment_bytes(2, 4, 2, 4096);
        let torn_at = SEGMENT_HEADER_LEN + RECORD;
        torn.truncate(torn_at + 60);
        let spares = READ_AHEAD_BUFFERS + 2;
        let mut segments = vec![segment_bytes(1, 1, 3, 4096), torn];
        segments.extend((0..spares).map(|_| vec![0u8; 4096]));
        for threads in [true, false] {
            let fs = disk(&segments);
            let scanned = scan_segments_with(
                &fs,
                Path::new(DIR),
                RecoveryOptions::default(),
                threads,
                |_, _| {},
            )
            .unwrap();
            let cut = scanned.report.tail_cut.as_ref().expect("a torn tail");
            assert_eq!((cut.segment_id, cut.offset), (2, torn_at as u64));
            assert_eq!(
                cut.segments_removed,
                (3..3 + spares as u64).collect::<Vec<_>>()
            );
            assert_eq!(scanned.report.records, 4);
            let bytes = 4096 + torn_at as u64 + 60 + 4096 * spares as u64;
            assert_eq!(scanned.report.bytes_scanned, bytes);

            // A valid record of a later write in the last file makes it corruption.
            let mut later = segments.clone();
            *later.last_mut().unwrap() = segment_bytes(2 + spares as u64, 99, 1, 4096);
            let fs = disk(&later);
            let refused = scan_segments_with(
                &fs,
                Path::new(DIR),
                RecoveryOptions::default(),
                threads,
                |_, _| {},
            );
            assert!(
                matches!(refused, Err(RecoveryError::Corrupt(_))),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_segment_that_ends_inside_a_record_before_a_later_segment_is_corruption() {
        let mut first = segment_bytes(1, 1, 5, 4096);
        first.truncate(SEGMENT_HEADER_LEN + 4 * RECORD + 60);
        let second = segment_bytes(2, 5, 3, 4096);
        let fs = disk(&[first, second]);
        match scan(&fs, true) {
            Err(RecoveryError::Corrupt(c)) => {
                assert_eq!(c.offset, (SEGMENT_HEADER_LEN + 4 * RECORD) as u64);
                assert!(c.reason.contains("later write"), "{}", c.reason);
            }
            other => panic!("a short segment in the middle of the log is corruption: {other:?}"),
        }
    }

    /// A segment of `count` records from `first_lsn` with payloads of `payload_len`
    /// bytes (each its own LSN's pattern), written three to a write (`batch_index` 0, 1,
    /// 2), in a file of `size` bytes.
    fn segment_of(
        id: SegmentId,
        first_lsn: Lsn,
        count: u64,
        payload_len: usize,
        size: usize,
    ) -> Vec<u8> {
        let header = SegmentHeader {
            segment_id: id,
            first_lsn,
            created_ms: 0,
        };
        let mut bytes = header.encode().to_vec();
        for lsn in first_lsn..first_lsn + count {
            let payload: Vec<u8> = (0..payload_len)
                .map(|i| (lsn as usize + i) as u8 | 1)
                .collect();
            let batch_index = ((lsn - first_lsn) % 3) as u32;
            encode_frame(&mut bytes, lsn, batch_index, RecordType::Op, &payload);
        }
        assert!(bytes.len() <= size);
        bytes.resize(size, 0);
        bytes
    }

    /// What a scan showed and found: each record as `(segment, offset, lsn,
    /// batch_index, payload)` in the order shown, the number of chunks, and the report
    /// and planned cut (elapsed time left out), or the error.
    type Outcome = (Vec<Shown>, usize, String);
    type Shown = (SegmentId, u64, Lsn, u32, Vec<u8>);

    fn scan_with(fs: &SimFs, options: RecoveryOptions, threads: bool) -> Outcome {
        let mut shown = Vec::new();
        let mut chunks = 0;
        let result = scan_segments_with(fs, Path::new(DIR), options, threads, |id, records| {
            while let Some(chunk) = records.next_chunk() {
                chunks += 1;
                assert!(!chunk.is_empty(), "no empty chunk is shown");
                for &(offset, r) in chunk {
                    shown.push((id, offset, r.lsn, r.batch_index, r.payload.to_vec()));
                }
            }
        });
        let found = match result {
            Ok(mut scanned) => {
                scanned.report.elapsed = Duration::ZERO;
                format!("{:?} {:?}", scanned.report, scanned.cut)
            }
            Err(e) => format!("error: {e}"),
        };
        (shown, chunks, found)
    }

    #[test]
    fn a_scan_checking_on_threads_shows_and_finds_what_a_scan_without_threads_does() {
        const SIZE: usize = 4 << 20;
        // Segment 1: 10,000 small records (chunks end on the record count); segment 2:
        // 3,000 of 1,000 bytes (chunks end on the bytes); then an unused spare.
        let first = segment_of(1, 1, 10_000, 100, SIZE);
        let second = segment_of(2, 10_001, 3_000, 1_000, SIZE);
        let record_2 = framed_len(1_000);
        let spare = vec![0u8; SIZE];
        let clean = vec![first.clone(), second.clone(), spare.clone()];
        let mut logs = vec![("clean", clean.clone())];
        // Torn tails: the last segment ends inside its record 2,500 (its write's
        // first); or that record has a sector of zeros and the two after it (its
        // write's) are intact.
        let torn_at = SEGMENT_HEADER_LEN + 2_499 * record_2;
        let mut short = second.clone();
        short.truncate(torn_at + 700);
        logs.push(("file ends in a record", vec![first.clone(), short]));
        let mut holed = second.clone();
        let sector = torn_at.next_multiple_of(SECTOR_SIZE);
        holed[sector..sector + SECTOR_SIZE].fill(0);
        holed[SEGMENT_HEADER_LEN + 2_502 * record_2..].fill(0);
        logs.push(("missing sector", vec![first.clone(), holed, spare.clone()]));
        // Corruption: a flipped bit in segment 1 (later writes follow), and in the last
        // segment's last record (every sector present).
        let mut flipped = first.clone();
        flipped[SEGMENT_HEADER_LEN + 5_000 * RECORD + 40] ^= 4;
        logs.push(("flipped bit", vec![flipped, second.clone(), spare.clone()]));
        let mut last_flipped = second.clone();
        last_flipped[SEGMENT_HEADER_LEN + 2_999 * record_2 + 30] ^= 1;
        logs.push(("flipped bit at the end", vec![first.clone(), last_flipped]));
        // A segment whose header is all that was written, after the others.
        let mut header_only = vec![0u8; SIZE];
        header_only[..SEGMENT_HEADER_LEN]
            .copy_from_slice(&segment_of(3, 13_001, 0, 1, SIZE)[..SEGMENT_HEADER_LEN]);
        logs.push(("header only", vec![first, second, header_only]));

        for (name, log) in &logs {
            for repair in [false, true] {
                let options = RecoveryOptions { repair };
                let fs = disk(log);
                let (shown, chunks, found) = scan_with(&fs, options, true);
                let (shown_inline, chunks_inline, found_inline) = scan_with(&fs, options, false);
                assert_eq!(found, found_inline, "{name}, repair {repair}");
                if shown != shown_inline {
                    let at = shown.iter().zip(&shown_inline).position(|(a, b)| a != b);
                    let lsn = |shown: &[Shown], i: Option<usize>| i.map(|i| shown[i].2);
                    panic!(
                        "{name}, repair {repair}: {} records shown with threads, {} without; \
                         first difference at {at:?} (LSN {:?} against {:?})",
                        shown.len(),
                        shown_inline.len(),
                        lsn(&shown, at),
                        lsn(&shown_inline, at),
                    );
                }
                // Without threads a segment is one chunk; with them, several.
                let segments_shown = {
                    let mut ids: Vec<_> = shown.iter().map(|r| r.0).collect();
                    ids.dedup();
                    ids.len()
                };
                assert_eq!(chunks_inline, segments_shown, "{name}");
                assert!(chunks > segments_shown, "{name}: {chunks} chunks");
            }
        }
        // And the scans found what each log holds.
        let (shown, _, found) = scan_with(&disk(&clean), RecoveryOptions::default(), true);
        assert_eq!(shown.len(), 13_000);
        assert!(shown.iter().map(|r| r.2).eq(1..=13_000), "LSN order");
        assert!(found.contains("spares_removed: [3]"), "{found}");
        let (shown, _, found) = scan_with(&disk(&logs[1].1), RecoveryOptions::default(), true);
        assert_eq!(shown.len(), 12_499);
        assert!(found.contains(&format!("offset: {torn_at}")), "{found}");
        let (_, _, found) = scan_with(&disk(&logs[3].1), RecoveryOptions::default(), true);
        assert!(
            found.starts_with("error:") && found.contains("later write"),
            "{found}"
        );
    }
}
