//! End-to-end behaviour of the log on the real file system and on the simulated disk.

use std::path::Path;
use std::sync::Arc;

use quire::op::Patch;
use quire::wal::record::OpRecord;
use quire::wal::vfs::sim::{CrashMode, PanicAt, SimFs};
use quire::wal::vfs::{OsFs, Vfs};
use quire::wal::{Wal, WalConfig, WalError};

fn op(doc: &str, seq: u64, text: &str) -> OpRecord {
    OpRecord {
        doc_id: doc.into(),
        client_id: 1,
        local_seq: seq,
        server_seq: seq,
        base_version: seq - 1,
        timestamp_ms: 0,
        patches: vec![Patch::new(0, 0, text)],
        fingerprint: Some(seq),
    }
}

fn small() -> WalConfig {
    WalConfig {
        segment_size: 64 * 1024,
        ..WalConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn reopen(vfs: Arc<dyn Vfs>, dir: &Path) -> (Wal, Vec<OpRecord>) {
    let mut seen = Vec::new();
    let (wal, _) = Wal::open(vfs, dir, small(), |op, _| seen.push(op.clone())).unwrap();
    (wal, seen)
}

#[test]
fn acked_records_survive_reopen_across_many_segments_on_a_real_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let rt = runtime();
    let mut expected = Vec::new();
    {
        let (wal, seen) = reopen(Arc::new(OsFs), &dir);
        assert!(seen.is_empty());
        for i in 1..=600u64 {
            let record = op("doc", i, &"x".repeat((i % 300) as usize + 1));
            rt.block_on(wal.append_op_durable(&record)).unwrap();
            expected.push(record);
        }
        // 600 records of up to ~400 bytes do not fit in one 64 KiB segment.
        assert!(wal.active_segment() > 2);
        assert_eq!(
            wal.read_ops_after("doc", 590, 100).unwrap(),
            expected[590..]
        );
        assert_eq!(wal.read_ops_after("doc", 0, 3).unwrap(), expected[..3]);
    }
    let (wal, seen) = reopen(Arc::new(OsFs), &dir);
    assert_eq!(seen, expected);
    // Appending continues after the recovered end.
    let next = op("doc", 601, "y");
    rt.block_on(wal.append_op_durable(&next)).unwrap();
    drop(wal);
    let (_, seen) = reopen(Arc::new(OsFs), &dir);
    assert_eq!(seen.len(), 601);
    assert_eq!(seen.last(), Some(&next));
}

#[test]
fn a_second_open_of_the_same_directory_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (_wal, _) = reopen(Arc::new(OsFs), tmp.path());
    let err = Wal::open(Arc::new(OsFs), tmp.path(), small(), |_, _| {}).unwrap_err();
    assert!(matches!(err, WalError::Locked(_)), "{err}");
    assert!(err.to_string().contains("another quire process"));
}

#[test]
fn an_fsync_error_fails_this_and_every_later_append_and_acks_nothing() {
    let fs = SimFs::new();
    let dir = Path::new("/data/wal");
    let rt = runtime();
    let (wal, _) = reopen(Arc::new(fs.clone()), dir);
    rt.block_on(wal.append_op_durable(&op("d", 1, "a")))
        .unwrap();
    fs.fail_syncs_after(0);
    let err = rt
        .block_on(wal.append_op_durable(&op("d", 2, "b")))
        .unwrap_err();
    assert!(matches!(err, WalError::Failed(_)), "{err}");
    assert!(err.to_string().contains("simulated EIO"), "{err}");
    let err = wal.append_op(&op("d", 3, "c")).unwrap_err();
    assert!(matches!(err, WalError::Failed(_)));
    assert_eq!(wal.durability().durable_lsn, 1);
    assert!(wal.durability().failed);
    drop(wal);
    let (_, seen) = reopen(Arc::new(fs.crash(CrashMode::LoseUnsynced)), dir);
    assert_eq!(seen, vec![op("d", 1, "a")]);
}

#[test]
fn truncation_removes_old_segments_and_recovery_starts_after_them() {
    let fs = SimFs::new();
    let dir = Path::new("/data/wal");
    let rt = runtime();
    let (wal, _) = reopen(Arc::new(fs.clone()), dir);
    for i in 1..=800u64 {
        rt.block_on(wal.append_op_durable(&op("d", i, &"z".repeat(200))))
            .unwrap();
    }
    let active = wal.active_segment();
    assert!(active >= 3);
    let removed = wal.remove_segments_before(active - 1).unwrap();
    assert_eq!(removed as u64, active - 2);
    let first_kept = wal.with_index(|i| i.first_retained_seq("d")).unwrap();
    assert!(first_kept > 1);
    drop(wal);
    let (_, seen) = reopen(Arc::new(fs.crash(CrashMode::LoseUnsynced)), dir);
    assert_eq!(seen.first().unwrap().server_seq, first_kept);
    assert_eq!(seen.last().unwrap().server_seq, 800);
}

#[test]
fn a_panic_in_the_writer_fails_the_log_and_every_waiter_instead_of_leaving_them_waiting() {
    let fs = SimFs::new();
    let dir = Path::new("/data/wal");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (wal, _) = reopen(Arc::new(fs.clone()), dir);
    let wal = Arc::new(wal);
    rt.block_on(wal.append_op_durable(&op("d", 1, "a")))
        .unwrap();
    fs.panic_at_next(PanicAt::SyncData);
    // Op 2 is appended before the sync that panics (the writer syncs what was appended);
    // op 3 either also waits, or, the writer having panicked already, is refused.
    let waiters: Vec<_> = (2..=3)
        .filter_map(|seq| match wal.append_op(&op("d", seq, "b")) {
            Ok(lsn) => {
                let wal = wal.clone();
                Some(rt.spawn(async move { wal.wait_durable(lsn).await }))
            }
            Err(err) => {
                assert_eq!(seq, 3, "op 2 goes before the sync: {err}");
                assert!(matches!(err, WalError::Failed(_)), "{err}");
                assert!(err.to_string().contains("simulated panic"), "{err}");
                None
            }
        })
        .collect();
    assert!(!waiters.is_empty());
    // Closing joins the writer thread: once it returns, the writer has met the panic.
    wal.close();
    assert!(
        wal.durability().failed,
        "a writer that panicked must fail the log"
    );
    for waiter in waiters {
        let err = rt.block_on(waiter).unwrap().unwrap_err();
        assert!(matches!(err, WalError::Failed(_)), "{err}");
        assert!(err.to_string().contains("panicked"), "{err}");
        assert!(err.to_string().contains("simulated panic"), "{err}");
    }
    let err = wal.append_op(&op("d", 4, "c")).unwrap_err();
    assert!(matches!(err, WalError::Failed(_)), "{err}");
    assert_eq!(wal.durability().durable_lsn, 1);
}

#[test]
fn scan_ops_shows_each_document_its_ops_in_seq_order_as_scan_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let rt = runtime();
    {
        let (wal, _) = reopen(Arc::new(OsFs), &dir);
        // Three documents interleaved over several segments.
        for i in 1..=300u64 {
            for doc in ["a", "b", "c"] {
                if doc != "c" || i % 3 == 0 {
                    let seq = if doc == "c" { i / 3 } else { i };
                    let record = op(doc, seq, &"y".repeat((i % 250) as usize + 1));
                    rt.block_on(wal.append_op_durable(&record)).unwrap();
                }
            }
        }
        assert!(wal.active_segment() > 2);
    }
    let (_, in_lsn_order) = reopen(Arc::new(OsFs), &dir);
    let mut by_document = Vec::new();
    let mut last_lsn_by_ordinal = std::collections::HashMap::new();
    let scanned = Wal::scan_ops(Arc::new(OsFs), &dir, small(), |view, location, doc| {
        assert_eq!(&**doc.id, view.doc_id);
        let last = last_lsn_by_ordinal.insert(doc.ordinal, location.lsn);
        assert!(last.is_none_or(|l| l < location.lsn));
        by_document.push(view.to_record());
    })
    .unwrap();
    drop(scanned);
    assert_eq!(by_document.len(), in_lsn_order.len());
    for doc in ["a", "b", "c"] {
        let of = |ops: &[OpRecord]| -> Vec<OpRecord> {
            ops.iter().filter(|o| o.doc_id == doc).cloned().collect()
        };
        assert_eq!(of(&by_document), of(&in_lsn_order), "document {doc}");
    }
}
