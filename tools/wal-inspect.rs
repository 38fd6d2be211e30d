//! wal-inspect: read a quire data directory without changing it.
//!
//! ```text
//! wal-inspect summary DIR            segments, records, documents, seq ranges, snapshots, bytes
//! wal-inspect dump DIR [--json]      every record, readable or as JSON lines
//! wal-inspect verify DIR             check every checksum; exit 0 clean, 1 corrupt, 3 torn tail
//! wal-inspect doc DIR ID [--at SEQ]  a document's text at a seq (default: the latest)
//! ```
//!
//! DIR is the data directory (the one holding `wal/` and `snapshots/`). Reading goes
//! through recovery in dry-run mode: the same checks the server makes at startup, with
//! no lock taken and no byte written, so it can run beside a live server.
//!
//! Output whose reader has gone (`wal-inspect dump DIR | head`) is dropped quietly and
//! the command ends with its own exit status; any other error writing it is reported.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use quire::progress::Progress;
use quire::text::Text;
use quire::wal::record::{
    framed_len, intact_header_len, OpRecord, RecordType, TombstoneRecord, RECORD_HEADER_LEN,
};
use quire::wal::recovery::{recover, RecoveryError, RecoveryOptions, RecoveryReport};
use quire::wal::segment::{parse_segment_file_name, segment_path};
use quire::wal::snapshot::{load_snapshots, parse_snapshot_file_name, Snapshot};
use quire::wal::vfs::{at_path, OsFs, Vfs};

#[derive(Parser)]
#[command(
    name = "wal-inspect",
    about = "Read a quire data directory without changing it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Segments, records, documents and their seq ranges, snapshots, bytes.
    Summary { dir: PathBuf },
    /// Every record in LSN order.
    Dump {
        dir: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum. Exit 0: clean; 1: corruption (the server will refuse to
    /// start); 3: a torn tail (the server will cut it at startup).
    Verify { dir: PathBuf },
    /// Print a document's text at a seq.
    Doc {
        dir: PathBuf,
        id: String,
        #[arg(long)]
        at: Option<u64>,
    },
}

struct Failure(String, u8);

/// Standard output for the commands, used through `write!`/`writeln!`. Writes never
/// fail the caller: after a closed pipe (EPIPE) the rest is dropped, after any other
/// error too, and [`Out::finish`] reports that one.
struct Out {
    stdout: BufWriter<io::StdoutLock<'static>>,
    closed: bool,
    error: Option<io::Error>,
}

impl Out {
    fn new() -> Out {
        Out {
            stdout: BufWriter::new(io::stdout().lock()),
            closed: false,
            error: None,
        }
    }

    fn write_fmt(&mut self, args: fmt::Arguments<'_>) {
        if self.closed {
            return;
        }
        if let Err(e) = self.stdout.write_fmt(args) {
            self.fail(e);
        }
    }

    fn fail(&mut self, error: io::Error) {
        self.closed = true;
        if error.kind() != io::ErrorKind::BrokenPipe {
            self.error = Some(error);
        }
    }

    /// Flushes; the first write error other than a closed pipe, if there was one.
    fn finish(mut self) -> Result<(), Failure> {
        if !self.closed {
            if let Err(e) = self.stdout.flush() {
                self.fail(e);
            }
        }
        match self.error {
            Some(e) => Err(fail(format!("writing to standard output: {e}"))),
            None => Ok(()),
        }
    }
}

fn fail(message: impl Into<String>) -> Failure {
    Failure(message.into(), 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = Out::new();
    let result = match cli.command {
        Command::Summary { dir } => summary(&mut out, &dir),
        Command::Dump { dir, json } => dump(&mut out, &dir, json),
        Command::Verify { dir } => verify(&mut out, &dir),
        Command::Doc { dir, id, at } => doc(&mut out, &dir, &id, at),
    };
    // Flushed before any message on stderr, so that the two arrive in order.
    let written = out.finish();
    match result.and(written) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, code)) => {
            // Not eprintln!: a closed stderr must not turn into a panic either.
            let _ = writeln!(io::stderr(), "wal-inspect: {message}");
            ExitCode::from(code)
        }
    }
}

/// The `wal/` directory of a data directory, with clear errors for a missing or foreign one.
fn wal_dir(dir: &Path) -> Result<PathBuf, Failure> {
    if !dir.exists() {
        return Err(fail(format!("{} does not exist", dir.display())));
    }
    if !dir.is_dir() {
        return Err(fail(format!("{} is not a directory", dir.display())));
    }
    let wal = dir.join("wal");
    if !wal.is_dir() {
        return Err(fail(format!(
            "{} is not a quire data directory (it has no wal/ subdirectory)",
            dir.display()
        )));
    }
    Ok(wal)
}

/// Reads every valid record (dry run: nothing is cut or written).
fn read_log(
    dir: &Path,
    mut visit: impl FnMut(u64, u64, u64, RecordType, &[u8]),
) -> Result<RecoveryReport, Failure> {
    let wal = wal_dir(dir)?;
    recover(
        &OsFs,
        &wal,
        RecoveryOptions::default(),
        true,
        |segment, offset, raw| visit(segment, offset, raw.lsn, raw.record_type, raw.payload),
    )
    .map_err(|e| match e {
        RecoveryError::Corrupt(c) => Failure(c.to_string(), 1),
        RecoveryError::Io { path, error } => fail(format!("{}: {error}", path.display())),
    })
}

fn decode_op(
    segment: u64,
    offset: u64,
    record_type: RecordType,
    payload: &[u8],
) -> Result<OpRecord, Failure> {
    OpRecord::decode(record_type, payload)
        .map_err(|e| Failure(format!("segment {segment} offset {offset}: {e}"), 1))
}

/// The tombstone a record holds, if it is one (record type 3).
fn decode_tombstone(
    segment: u64,
    offset: u64,
    record_type: RecordType,
    payload: &[u8],
) -> Option<Result<TombstoneRecord, Failure>> {
    (record_type == RecordType::Tombstone).then(|| {
        TombstoneRecord::decode(payload)
            .map_err(|e| Failure(format!("segment {segment} offset {offset}: {e}"), 1))
    })
}

fn summary(out: &mut Out, dir: &Path) -> Result<(), Failure> {
    let mut docs: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut op_error = None;
    let report = read_log(
        dir,
        |segment, offset, _, record_type, payload| match decode_tombstone(
            segment,
            offset,
            record_type,
            payload,
        ) {
            // Deleted: its ops so far are gone; an op after it starts it anew.
            Some(Ok(tombstone)) => {
                docs.remove(&tombstone.doc_id);
            }
            Some(Err(e)) => op_error = op_error.take().or(Some(e)),
            None => match decode_op(segment, offset, record_type, payload) {
                Ok(op) => {
                    let e = docs
                        .entry(op.doc_id)
                        .or_insert((op.server_seq, op.server_seq, 0));
                    e.1 = op.server_seq;
                    e.2 += 1;
                }
                Err(e) => op_error = op_error.take().or(Some(e)),
            },
        },
    )?;
    if let Some(e) = op_error {
        return Err(e);
    }
    let snapshots =
        load_snapshots(&OsFs, &dir.join("snapshots")).map_err(|e| fail(e.to_string()))?;
    let wal = dir.join("wal");
    writeln!(out, "data directory {}", dir.display());
    writeln!(out, "segments: {}", report.segments.len());
    let mut used = 0u64;
    for s in &report.segments {
        used += s.end_offset;
        writeln!(
            out,
            "  {}  LSN {}..{}  {} records  {} bytes used",
            segment_path(&wal, s.header.segment_id).display(),
            s.header.first_lsn,
            s.last_lsn.map_or("-".to_string(), |l| l.to_string()),
            s.records,
            s.end_offset
        );
    }
    writeln!(
        out,
        "records: {}  bytes in segment files: {}  bytes used: {used}  next LSN: {}",
        report.records, report.bytes_scanned, report.next_lsn
    );
    if let Some(cut) = &report.tail_cut {
        writeln!(
            out,
            "torn tail: segment {} offset {} ({}); the server cuts it at startup",
            cut.segment_id, cut.offset, cut.reason
        );
    }
    // Per document: (first seq, last seq, ops) in the log, and the snapshot's seq.
    type LogRange = Option<(u64, u64, u64)>;
    let mut all: BTreeMap<&str, (LogRange, Option<u64>)> = BTreeMap::new();
    for (doc, range) in &docs {
        all.entry(doc).or_default().0 = Some(*range);
    }
    for (doc, snap) in &snapshots.by_doc {
        all.entry(doc).or_default().1 = Some(snap.last_included_seq);
    }
    writeln!(out, "documents: {}", all.len());
    for (doc, (range, snap)) in all {
        let log = range.map_or("none".to_string(), |(a, b, n)| {
            format!("seq {a}..{b} ({n} ops)")
        });
        let snap = snap.map_or("none".to_string(), |s| format!("at seq {s}"));
        writeln!(out, "  {doc:?}: log {log}; snapshot {snap}");
    }
    writeln!(
        out,
        "snapshots: {} valid, {} invalid",
        snapshots.by_doc.len(),
        snapshots.invalid.len()
    );
    for (path, reason) in &snapshots.invalid {
        writeln!(out, "  INVALID {}: {reason}", path.display());
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn dump(out: &mut Out, dir: &Path, json: bool) -> Result<(), Failure> {
    let mut op_error = None;
    read_log(dir, |segment, offset, lsn, record_type, payload| {
        if let Some(tombstone) = decode_tombstone(segment, offset, record_type, payload) {
            match tombstone {
                Ok(t) if out.closed => {
                    let _ = t;
                }
                Ok(t) if json => {
                    writeln!(
                        out,
                        "{{\"lsn\":{lsn},\"segment\":{segment},\"offset\":{offset},\"type\":\"{record_type:?}\",\"doc\":{},\"version\":{},\"timestamp_ms\":{}}}",
                        json_string(&t.doc_id),
                        t.version,
                        t.timestamp_ms
                    );
                }
                Ok(t) => {
                    writeln!(
                        out,
                        "lsn {lsn} seg {segment} off {offset} {record_type:?} doc {:?} deleted at version {} t {}",
                        t.doc_id, t.version, t.timestamp_ms
                    );
                }
                Err(e) => op_error = op_error.take().or(Some(e)),
            }
            return;
        }
        let op = match decode_op(segment, offset, record_type, payload) {
            Ok(op) => op,
            Err(e) => {
                op_error = op_error.take().or(Some(e));
                return;
            }
        };
        if out.closed {
            return; // nobody reads on; the rest is still checked for the exit status
        }
        if json {
            let patches: Vec<String> = op
                .patches
                .iter()
                .map(|p| format!("[{},{},{}]", p.pos, p.del, json_string(&p.ins)))
                .collect();
            writeln!(
                out,
                "{{\"lsn\":{lsn},\"segment\":{segment},\"offset\":{offset},\"type\":\"{record_type:?}\",\"doc\":{},\"seq\":{},\"client\":{},\"local_seq\":{},\"base_version\":{},\"timestamp_ms\":{},\"fingerprint\":{},\"patches\":[{}]}}",
                json_string(&op.doc_id),
                op.server_seq,
                op.client_id,
                op.local_seq,
                op.base_version,
                op.timestamp_ms,
                op.fingerprint
                    .map_or("null".into(), |f| format!("\"{f:016x}\"")),
                patches.join(",")
            );
        } else {
            let patches: Vec<String> = op
                .patches
                .iter()
                .map(|p| format!("[{} {} {:?}]", p.pos, p.del, p.ins))
                .collect();
            writeln!(
                out,
                "lsn {lsn} seg {segment} off {offset} {record_type:?} doc {:?} seq {} op {:x}:{} base {} t {} fp {} {}",
                op.doc_id,
                op.server_seq,
                op.client_id,
                op.local_seq,
                op.base_version,
                op.timestamp_ms,
                op.fingerprint
                    .map_or("unknown".into(), |f| format!("{f:016x}")),
                patches.join(" ")
            );
        }
    })?;
    match op_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The byte range of the damaged record at `offset`: its whole extent if its header
/// is intact, else its header.
fn bad_range(path: &Path, offset: u64) -> String {
    let end = OsFs
        .map(path)
        .ok()
        .and_then(|bytes| {
            let rest = bytes.get(offset as usize..)?;
            Some(match intact_header_len(rest) {
                Some(len) => offset + framed_len(len as usize) as u64,
                None => offset + RECORD_HEADER_LEN as u64,
            })
        })
        .unwrap_or(offset + RECORD_HEADER_LEN as u64);
    format!("{}: bytes {offset}..{end}", path.display())
}

fn verify(out: &mut Out, dir: &Path) -> Result<(), Failure> {
    let wal = wal_dir(dir)?;
    let mut op_error = None;
    // Progress over the segments' bytes: those of the segments before the one being
    // read, plus the offset reached in it.
    let sizes: std::collections::BTreeMap<u64, u64> = std::fs::read_dir(&wal)
        .map_err(|e| fail(format!("{}: {e}", wal.display())))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let id = parse_segment_file_name(entry.file_name().to_str()?)?;
            Some((id, entry.metadata().ok()?.len()))
        })
        .collect();
    let progress = Progress::new("verifying the log", sizes.values().sum());
    let mut before_segment = std::collections::HashMap::new();
    let mut sum = 0;
    for (&id, &len) in &sizes {
        before_segment.insert(id, sum);
        sum += len;
    }
    let result = recover(
        &OsFs,
        &wal,
        RecoveryOptions::default(),
        true,
        |segment, offset, raw| {
            progress.set(before_segment.get(&segment).copied().unwrap_or(0) + offset);
            let decoded = match raw.record_type {
                RecordType::Tombstone => TombstoneRecord::decode(raw.payload).map(|_| ()),
                _ => OpRecord::decode(raw.record_type, raw.payload).map(|_| ()),
            };
            if let Err(e) = decoded {
                op_error.get_or_insert(
                    bad_range(&segment_path(&wal, segment), offset).to_string() + &format!(": {e}"),
                );
            }
        },
    );
    progress.finish();
    let report = match result {
        Ok(report) => report,
        Err(RecoveryError::Corrupt(c)) => {
            writeln!(
                out,
                "CORRUPT {}: {}",
                bad_range(&c.path, c.offset),
                c.reason
            );
            return Err(Failure(
                "the log is corrupted: the server will refuse to start. Restore from a backup, \
                 or start with --repair-wal to cut the log at this point (losing what follows)"
                    .into(),
                1,
            ));
        }
        Err(RecoveryError::Io { path, error }) => {
            return Err(fail(format!("{}: {error}", path.display())))
        }
    };
    if let Some(e) = op_error {
        writeln!(out, "CORRUPT {e}");
        return Err(Failure("an op record does not decode".into(), 1));
    }
    let snapshot_dir = dir.join("snapshots");
    let mut bad_snapshots = 0;
    if snapshot_dir.is_dir() {
        for name in OsFs
            .list(&snapshot_dir)
            .map_err(|e| fail(at_path("reading", &snapshot_dir)(e).to_string()))?
        {
            let path = snapshot_dir.join(&name);
            if parse_snapshot_file_name(&name).is_none() {
                continue;
            }
            let bytes = OsFs
                .map(&path)
                .map_err(|e| fail(at_path("reading", &path)(e).to_string()))?;
            if let Err(e) = Snapshot::decode(&bytes) {
                writeln!(
                    out,
                    "CORRUPT {}: bytes 0..{}: {e}",
                    path.display(),
                    bytes.len()
                );
                bad_snapshots += 1;
            }
        }
    }
    writeln!(
        out,
        "checked {} records in {} segments ({} bytes)",
        report.records,
        report.segments.len(),
        report.bytes_scanned
    );
    if bad_snapshots > 0 {
        return Err(Failure(
            format!("{bad_snapshots} snapshot file(s) are corrupt"),
            1,
        ));
    }
    if let Some(cut) = &report.tail_cut {
        writeln!(
            out,
            "TORN {}: {} (not acknowledged data; the server cuts it at startup)",
            bad_range(&segment_path(&wal, cut.segment_id), cut.offset),
            cut.reason
        );
        return Err(Failure("the log ends in a torn write".into(), 3));
    }
    writeln!(out, "OK");
    Ok(())
}

fn doc(out: &mut Out, dir: &Path, id: &str, at: Option<u64>) -> Result<(), Failure> {
    let snapshots_dir = dir.join("snapshots");
    let _ = wal_dir(dir)?;
    // Every valid snapshot of this document, newest first.
    let mut snapshots: Vec<Snapshot> = Vec::new();
    if snapshots_dir.is_dir() {
        for name in OsFs
            .list(&snapshots_dir)
            .map_err(|e| fail(at_path("reading", &snapshots_dir)(e).to_string()))?
        {
            if let Some((doc, _)) = parse_snapshot_file_name(&name) {
                if doc == id {
                    let path = snapshots_dir.join(&name);
                    let bytes = OsFs
                        .map(&path)
                        .map_err(|e| fail(at_path("reading", &path)(e).to_string()))?;
                    if let Ok(s) = Snapshot::decode(&bytes) {
                        snapshots.push(s);
                    }
                }
            }
        }
    }
    snapshots.sort_by_key(|s| std::cmp::Reverse(s.last_included_seq));
    let mut ops: Vec<OpRecord> = Vec::new();
    let mut op_error = None;
    read_log(
        dir,
        |segment, offset, _, record_type, payload| match decode_tombstone(
            segment,
            offset,
            record_type,
            payload,
        ) {
            // Deleted: what came before (ops and snapshots) is gone.
            Some(Ok(tombstone)) if tombstone.doc_id == id => {
                ops.clear();
                snapshots.clear();
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => op_error = op_error.take().or(Some(e)),
            None => match decode_op(segment, offset, record_type, payload) {
                Ok(op) if op.doc_id == id => ops.push(op),
                Ok(_) => {}
                Err(e) => op_error = op_error.take().or(Some(e)),
            },
        },
    )?;
    if let Some(e) = op_error {
        return Err(e);
    }
    let latest = ops
        .last()
        .map(|o| o.server_seq)
        .into_iter()
        .chain(snapshots.first().map(|s| s.last_included_seq))
        .max()
        .ok_or_else(|| fail(format!("no document {id:?} in {}", dir.display())))?;
    let at = at.unwrap_or(latest);
    if at > latest {
        return Err(fail(format!(
            "document {id:?} is at seq {latest}; there is no seq {at}"
        )));
    }
    let base = snapshots.iter().find(|s| s.last_included_seq <= at);
    let (mut text, mut version) = match base {
        Some(s) => (Text::from(s.text.as_str()), s.last_included_seq),
        None => (Text::new(), 0),
    };
    let start = version;
    for op in ops
        .iter()
        .filter(|o| o.server_seq > start && o.server_seq <= at)
    {
        if op.server_seq != version + 1 {
            break;
        }
        text.apply(&op.patches).map_err(|e| {
            Failure(
                format!("op at seq {} does not apply: {e}", op.server_seq),
                1,
            )
        })?;
        version = op.server_seq;
    }
    if version != at {
        return Err(fail(format!(
            "document {id:?} cannot be rebuilt at seq {at}: the log keeps seq {}.. and the snapshots are at {:?}",
            ops.first().map_or(0, |o| o.server_seq),
            snapshots.iter().map(|s| s.last_included_seq).collect::<Vec<_>>()
        )));
    }
    write!(out, "{text}");
    Ok(())
}
