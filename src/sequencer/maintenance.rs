//! The snapshot and truncation policy, run by one background thread; or, with
//! `Background::Manual`, by the caller (`LocalSequencer::run_maintenance`).
//!
//! Snapshots: a document is snapshotted after `snapshot_every_ops` ops (requested by the
//! submit path) or `snapshot_every` after its last snapshot if it changed (found by the
//! periodic tick). Truncation: on every tick, the oldest sealed segments are deleted
//! while each is older than `retention` and every document with ops in it has a
//! snapshot at or past its highest seq there. A document that holds back the oldest
//! segment that way is snapshotted at once, so a rarely edited document cannot pin old
//! segments forever and disk use stays bounded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use super::state::{lock_doc, Deferred, DocText, Shared};
use crate::wal::snapshot::{write_snapshot, Snapshot};
use crate::wal::{now_ms, Background};

pub(crate) enum Request {
    Snapshot(Arc<str>),
    Stop,
}

pub(crate) fn run(shared: Arc<Shared>, requests: Receiver<Request>) {
    let mut last_tick = Instant::now();
    loop {
        match requests.recv_timeout(shared.config.maintenance_interval) {
            Ok(Request::Snapshot(doc_id)) => {
                if let Err(e) = snapshot_doc(&shared, &doc_id) {
                    report(&e, &doc_id);
                }
            }
            Ok(Request::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if last_tick.elapsed() >= shared.config.maintenance_interval {
            last_tick = Instant::now();
            if let Err(e) = tick(&shared) {
                report(&e, "(truncation)");
            }
        }
    }
}

fn report(error: &std::io::Error, what: &str) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    // A failing disk fails every tick; say it loudly once, then at debug level.
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::error!(%error, what, "snapshot or truncation failed; the log keeps growing until this is fixed");
    } else {
        tracing::debug!(%error, what, "snapshot or truncation failed again");
    }
}

/// Snapshots `doc_id` if it changed since its last snapshot. Returns whether it wrote one.
pub(crate) fn snapshot_doc(shared: &Shared, doc_id: &str) -> std::io::Result<bool> {
    // Until the file is written: a deletion removes the document's files after this.
    let _files = shared
        .snapshot_files
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let Some(doc) = shared
        .docs
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(doc_id)
        .cloned()
    else {
        return Ok(false);
    };
    let (snapshot, lsn) = {
        let mut state = lock_doc(&doc);
        state.snapshot_queued = false;
        if state.version == state.snapshot_seq || state.deleted {
            return Ok(false);
        }
        let text = match &state.text {
            DocText::Built(text) => text.to_string(),
            // Built for the snapshot alone (a blocking read of the log, on this thread):
            // the document stays deferred, on the snapshot once written (below), so that
            // snapshots bring no text into memory that no client asked for.
            DocText::Deferred(deferred) => deferred
                .build(doc_id, state.version, |after, limit| {
                    shared.wal.read_ops_after(doc_id, after, limit)
                })
                .map_err(std::io::Error::other)?
                .to_string(),
        };
        let snapshot = Snapshot {
            doc_id: doc_id.to_owned(),
            last_included_seq: state.version,
            created_ms: now_ms(),
            text,
            dedupe: state.dedupe_entries(),
        };
        (snapshot, state.last_lsn)
    };
    // Only durable ops go into a snapshot.
    wait_durable_blocking(shared, lsn)?;
    let started = Instant::now();
    write_snapshot(&*shared.vfs, &shared.snapshot_dir, &snapshot)?;
    let micros = started.elapsed().as_micros() as u64;
    shared
        .snapshots_written
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = shared
        .snapshot_us
        .lock()
        .map(|mut h| h.record(micros.clamp(1, 600_000_000)));
    let mut state = lock_doc(&doc);
    state.snapshot_seq = state.snapshot_seq.max(snapshot.last_included_seq);
    state.last_snapshot_ms = snapshot.created_ms;
    // A deferred text moves on to the snapshot: truncation may now remove the ops
    // before it. (Still deferred, it has no op since: any op builds it first.)
    if let DocText::Deferred(deferred) = &state.text {
        if deferred.base_seq < snapshot.last_included_seq {
            assert_eq!(
                state.version, snapshot.last_included_seq,
                "a deferred text changed without being built"
            );
            state.text =
                DocText::Deferred(Deferred::new(snapshot.text, snapshot.last_included_seq));
        }
    }
    Ok(true)
}

/// One pass: time-based snapshots, then truncation. Returns segments removed.
pub(crate) fn tick(shared: &Shared) -> std::io::Result<usize> {
    let now = now_ms();
    let every_ms = shared.config.snapshot_every.as_millis() as u64;
    let due: Vec<Arc<str>> = shared
        .docs
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, doc)| {
            let state = lock_doc(doc);
            state.version > state.snapshot_seq
                && now.saturating_sub(state.last_snapshot_ms) >= every_ms
        })
        .map(|(id, _)| id.clone())
        .collect();
    for doc_id in due {
        snapshot_doc(shared, &doc_id)?;
    }
    truncate(shared, now)
}

fn snapshot_seq(shared: &Shared, doc_id: &str) -> u64 {
    shared
        .docs
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(doc_id)
        .map_or(0, |doc| lock_doc(doc).snapshot_seq)
}

/// A sealed segment: its id, when it was sealed, and each document's highest seq in it.
type SegmentDocs = (u64, Option<u64>, Vec<(Arc<str>, u64)>);

fn truncate(shared: &Shared, now: u64) -> std::io::Result<usize> {
    let retention_ms = shared.config.retention.as_millis() as u64;
    // Held to the last deletion: a backup pinning the log waits for this pass, then
    // finds every segment it pins (see `Shared::backup_pins`).
    let mut pins = shared.backup_pins.lock().unwrap_or_else(|p| p.into_inner());
    let instant = Instant::now();
    pins.retain(|id, pin| {
        let live = pin.expires > instant;
        if !live {
            tracing::warn!(
                pin = id,
                "a backup's lease expired; the log is no longer held for it"
            );
        }
        live
    });
    // The newest sealed segment is always kept (see `Wal::remove_segments_before`), and
    // every segment a backup pins.
    let mut limit = shared.wal.active_segment().saturating_sub(1);
    if let Some(pinned) = pins.values().map(|pin| pin.first_segment).min() {
        limit = limit.min(pinned);
    }
    // A tombstone stays while what it cancels may: the segment holding it (and so
    // every later one) is kept until its document's snapshot files are removed. The
    // older segments holding the document's ops may go (they are deleted first).
    let tombstones: Vec<crate::wal::record::Lsn> = shared
        .deleting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|&(lsn, _)| lsn)
        .collect();
    if !tombstones.is_empty() {
        shared.wal.with_index(|index| {
            for lsn in tombstones {
                let holding = index
                    .segments()
                    .iter()
                    .rev()
                    .find(|(_, meta)| meta.first_lsn <= lsn)
                    .map(|(&id, _)| id);
                if let Some(id) = holding {
                    limit = limit.min(id);
                }
            }
        });
    }
    let candidates: Vec<SegmentDocs> = shared.wal.with_index(|index| {
        index
            .segments()
            .range(..limit)
            .map(|(&id, meta)| (id, meta.sealed_ms, index.max_seqs_in(id)))
            .collect()
    });
    let mut cut = None;
    let mut pinning = Vec::new();
    for (id, sealed_ms, docs) in candidates {
        let Some(sealed_ms) = sealed_ms else { break };
        if now.saturating_sub(sealed_ms) < retention_ms {
            break;
        }
        pinning = docs
            .into_iter()
            .filter(|(doc_id, max_seq)| snapshot_seq(shared, doc_id) < *max_seq)
            .map(|(doc_id, _)| doc_id)
            .collect();
        if !pinning.is_empty() {
            break;
        }
        cut = Some(id + 1);
    }
    let removed = match cut {
        Some(below) => shared
            .wal
            .remove_segments_before(below)
            .map_err(std::io::Error::other)?,
        None => 0,
    };
    drop(pins);
    for doc_id in pinning {
        snapshot_doc(shared, &doc_id)?;
    }
    Ok(removed)
}

/// Waits on this thread until `lsn` is durable (an error if the log failed). The wait
/// is at most one group commit, and this runs off the request path, so polling is
/// simpler than a second wake-up channel on the writer's hot path.
pub(crate) fn wait_durable_blocking(
    shared: &Shared,
    lsn: crate::wal::record::Lsn,
) -> std::io::Result<()> {
    loop {
        match shared.wal.durability().outcome(lsn) {
            Some(true) => return Ok(()),
            Some(false) => {
                let reason = shared
                    .wal
                    .failure()
                    .unwrap_or_else(|| Arc::from("log failed"));
                return Err(std::io::Error::other(reason.to_string()));
            }
            // Without a writer thread (`Background::Manual`) the caller writes the log
            // itself: the wait becomes the steps the writer thread would have taken. A
            // step that finds nothing met another caller's step midway; it is done now.
            None if shared.config.wal.background == Background::Manual => {
                if !shared.wal.step() {
                    std::thread::yield_now();
                }
            }
            None => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
    }
}
