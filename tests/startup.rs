//! Starting on a data directory: a start that is refused leaves every file as it was,
//! and a fresh directory is durable from the first acknowledged op.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer, OpenError};
use quire::sequencer::{Sequencer, SubmitOp, Submitted};
use quire::wal::record::{encode_frame, OpRecord, RecordType};
use quire::wal::recovery::{recover, RecoveryOptions};
use quire::wal::segment::segment_path;
use quire::wal::snapshot::{write_snapshot, Snapshot};
use quire::wal::vfs::sim::{CrashMode, SimFs};
use quire::wal::vfs::OsFs;
use quire::wal::{Wal, WalConfig};

fn config() -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: 64 * 1024,
            ..WalConfig::default()
        },
        ..LocalConfig::default()
    }
}

/// Every file and directory under `dir`, with the bytes of each file.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.insert(path.clone(), None);
                pending.push(path);
            } else {
                found.insert(path.clone(), Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

fn op(seq: u64) -> OpRecord {
    OpRecord {
        doc_id: "a".into(),
        client_id: 1,
        local_seq: seq,
        server_seq: seq,
        base_version: seq - 1,
        timestamp_ms: 0,
        patches: vec![Patch::new(seq as u32 - 1, 0, "x")],
        fingerprint: Some(seq),
    }
}

/// A data directory whose snapshot of "a" ends at seq 2 while its log continues at
/// seq 5 (ops 3 and 4 are nowhere), whose log ends in a torn write, and which holds
/// the temp file of a snapshot a crash interrupted.
fn disagreeing_data_dir_with_a_torn_tail(data: &Path) {
    let wal_dir = data.join("wal");
    let snapshots = data.join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    let snapshot = Snapshot {
        doc_id: "a".into(),
        last_included_seq: 2,
        created_ms: 0,
        text: "xx".into(),
        dedupe: Vec::new(),
    };
    write_snapshot(&OsFs, &snapshots, &snapshot).unwrap();
    std::fs::write(snapshots.join("61.00000000000000000009.snap.tmp"), b"half").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (wal, _) = Wal::open(Arc::new(OsFs), &wal_dir, config().wal, |_, _| {}).unwrap();
    for seq in 5..=8 {
        rt.block_on(wal.append_op_durable(&op(seq))).unwrap();
    }
    drop(wal);
    // The next write, 1 KiB, reached the disk except for its first sector.
    let report = recover(
        &OsFs,
        &wal_dir,
        RecoveryOptions::default(),
        true,
        |_, _, _| {},
    )
    .unwrap();
    let last = report.segments.last().unwrap();
    let end = last.end_offset as usize;
    let mut torn = Vec::new();
    encode_frame(&mut torn, report.next_lsn, 0, RecordType::Op, &[b'y'; 1000]);
    let first_sector_end = end.next_multiple_of(512) - end;
    torn[..first_sector_end].fill(0);
    let path = segment_path(&wal_dir, last.header.segment_id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    std::fs::write(&path, &bytes).unwrap();
    let report = recover(
        &OsFs,
        &wal_dir,
        RecoveryOptions::default(),
        true,
        |_, _, _| {},
    )
    .unwrap();
    assert!(report.tail_cut.is_some(), "the log ends in a torn write");
}

#[test]
fn a_start_refused_for_a_snapshot_and_log_that_disagree_changes_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    disagreeing_data_dir_with_a_torn_tail(tmp.path());
    let before = tree(tmp.path());

    let Err(err) = LocalSequencer::open_with(Arc::new(OsFs), tmp.path(), config()) else {
        panic!("a snapshot and a log that disagree must refuse the start");
    };
    assert!(matches!(err, OpenError::Inconsistent(_)), "{err}");
    assert!(err.to_string().contains("ops 3..4"), "{err}");

    let after = tree(tmp.path());
    let names = |t: &BTreeMap<PathBuf, Option<Vec<u8>>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&after), names(&before), "no file added or removed");
    for (path, bytes) in &before {
        assert!(after[path] == *bytes, "{} changed", path.display());
    }
}

#[test]
fn an_op_acked_in_a_fresh_data_directory_survives_a_power_cut_right_after() {
    let fs = SimFs::new();
    let data = Path::new("/srv/quire");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (store, _) = LocalSequencer::open_with(Arc::new(fs.clone()), data, config()).unwrap();
    let op = SubmitOp {
        op_id: OpId {
            client_id: 1,
            local_seq: 1,
        },
        base_version: 0,
        expected_version: 0,
        expected_incarnation: None,
        fingerprint: 0,
        patches: vec![Patch::new(0, 0, "kept")],
    };
    let Submitted::Applied { ticket, .. } = store.submit("a", &op).unwrap() else {
        panic!("a new op is applied");
    };
    rt.block_on(store.wait_durable(ticket)).unwrap();
    let crashed = fs.crash(CrashMode::LoseUnsynced);
    drop(store);

    // The directories' entries were synced when they were created, so the acked op's
    // segment is still reachable.
    let (store, _) = LocalSequencer::open_with(Arc::new(crashed), data, config()).unwrap();
    let view = rt.block_on(store.read("a")).unwrap();
    assert_eq!(view.map(|v| v.text), Some("kept".to_string()));
}

#[test]
fn an_unusable_snapshots_or_wal_directory_is_named_in_the_error() {
    for sub in ["snapshots", "wal"] {
        let tmp = tempfile::tempdir().unwrap();
        // A regular file where the directory belongs (permission bits would not stop
        // root, who runs the tests; this fails for everybody).
        let path = tmp.path().join(sub);
        std::fs::write(&path, b"not a directory").unwrap();
        let Err(err) = LocalSequencer::open_with(Arc::new(OsFs), tmp.path(), config()) else {
            panic!("{sub} is a regular file: the start must fail");
        };
        let message = err.to_string();
        assert!(
            message.contains(path.to_str().unwrap()),
            "{sub}: the error must name {}: {message}",
            path.display()
        );
    }
}

/// After the process dies (not the machine), recovery reads records that were written
/// but never synced (they are in the page cache) and serves them as durable: it must
/// make them durable first, or a power cut afterwards would lose what was served.
#[test]
fn records_recovered_from_the_page_cache_are_synced_before_they_are_served() {
    let fs = SimFs::new();
    let data = Path::new("/srv/quire");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (store, _) = LocalSequencer::open_with(Arc::new(fs.clone()), data, config()).unwrap();
    let op = |local_seq: u64, base: u64, text: &str| SubmitOp {
        op_id: OpId {
            client_id: 1,
            local_seq,
        },
        base_version: base,
        expected_version: base,
        expected_incarnation: None,
        fingerprint: 0,
        patches: vec![Patch::new(0, 0, text)],
    };
    let Submitted::Applied { ticket, .. } = store.submit("a", &op(1, 0, "synced ")).unwrap() else {
        panic!("applied");
    };
    rt.block_on(store.wait_durable(ticket)).unwrap();
    // The next op is written, but its sync fails: never acked, only in the "page cache".
    fs.fail_syncs_after(0);
    let Submitted::Applied { ticket, .. } = store.submit("a", &op(2, 1, "cached ")).unwrap() else {
        panic!("applied");
    };
    assert!(rt.block_on(store.wait_durable(ticket)).is_err());
    drop(store);
    // The process restarts on the same disk (syncs work again) and serves the op.
    fs.fail_syncs_after(u64::MAX);
    let (store, _) = LocalSequencer::open_with(Arc::new(fs.clone()), data, config()).unwrap();
    let served = rt.block_on(store.read("a")).unwrap().unwrap();
    assert_eq!(served.text, "cached synced ");
    drop(store);
    // Then the machine loses power: what was served is still there.
    let after = fs.crash(CrashMode::LoseUnsynced);
    let (store, _) = LocalSequencer::open_with(Arc::new(after), data, config()).unwrap();
    let view = rt.block_on(store.read("a")).unwrap().unwrap();
    assert_eq!(view.text, served.text, "served as durable, then lost");
}
