//! `wal-format.md` and the code agree: `tests/data/sample/` was written by
//! `tools/make-sample-wal.py`, a writer made from the document alone, and quire's own
//! reader must decode it to the ops that script wrote.

use std::path::Path;
use std::sync::Arc;

use quire::op::OpId;
use quire::op::Patch;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{fingerprint, Sequencer, SubmitError};
use quire::wal::record::{OpRecord, RecordType};
use quire::wal::recovery::{recover, RecoveryOptions};
use quire::wal::snapshot::load_snapshots;
use quire::wal::vfs::OsFs;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sample");

fn op(lsn: u64, seq: u64, client: u64, doc: &str, patches: Vec<Patch>) -> (u64, OpRecord) {
    (
        lsn,
        OpRecord {
            doc_id: doc.into(),
            client_id: client,
            local_seq: seq,
            server_seq: seq,
            base_version: seq - 1,
            timestamp_ms: 1_700_000_000_000 + lsn,
            patches,
            // The sample is type-1 records, as quire wrote them before fingerprints.
            fingerprint: None,
        },
    )
}

#[test]
fn the_documented_layout_written_by_an_independent_encoder_decodes_to_its_ops() {
    let mut seen = Vec::new();
    let report = recover(
        &OsFs,
        &Path::new(SAMPLE).join("wal"),
        RecoveryOptions::default(),
        true,
        |_, _, raw| {
            assert_eq!(raw.record_type, RecordType::Op);
            seen.push((
                raw.lsn,
                OpRecord::decode(raw.record_type, raw.payload).unwrap(),
            ))
        },
    )
    .unwrap();
    assert!(report.tail_cut.is_none());
    let expected = vec![
        op(1, 1, 7, "notes", vec![Patch::new(0, 0, "hello")]),
        op(
            2,
            1,
            9,
            "b/\u{1F600}",
            vec![Patch::new(0, 0, "x\u{1F600}y")],
        ),
        op(
            3,
            2,
            7,
            "notes",
            vec![Patch::new(5, 0, " w\u{f6}rld"), Patch::new(0, 1, "H")],
        ),
        op(4, 2, 9, "b/\u{1F600}", vec![Patch::new(1, 1, "")]),
    ];
    assert_eq!(seen, expected);
    let snapshots = load_snapshots(&OsFs, &Path::new(SAMPLE).join("snapshots")).unwrap();
    let notes = &snapshots.by_doc["notes"];
    assert_eq!((notes.last_included_seq, notes.text.as_str()), (1, "hello"));
    assert_eq!(notes.dedupe.len(), 1);
}

#[test]
fn the_sample_opens_as_a_data_directory_with_snapshot_plus_replay() {
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["wal", "snapshots"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(Path::new(SAMPLE).join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), tmp.path().join(sub).join(entry.file_name())).unwrap();
        }
    }
    let (store, _) =
        LocalSequencer::open_with(Arc::new(OsFs), tmp.path(), LocalConfig::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let notes = rt.block_on(store.read("notes")).unwrap().unwrap();
    assert_eq!(
        (notes.text.as_str(), notes.version),
        ("Hello w\u{f6}rld", 2)
    );
    let b = rt.block_on(store.read("b/\u{1F600}")).unwrap().unwrap();
    assert_eq!((b.text.as_str(), b.version), ("xy", 2));
    // Written by an older quire: no fingerprints (a version 1 snapshot, type-1 records).
    // A resend of any of its ops, even with the very content sent, is refused (code 26)
    // rather than acked: an ack could drop a different op sent under the same id.
    let notes_ops = [
        (1, 0, vec![Patch::new(0, 0, "hello")]),
        (
            2,
            1,
            vec![Patch::new(5, 0, " w\u{f6}rld"), Patch::new(0, 1, "H")],
        ),
    ];
    for (local_seq, base_version, patches) in notes_ops {
        let id = OpId {
            client_id: 7,
            local_seq,
        };
        match store.applied("notes", id, fingerprint(base_version, &patches)) {
            Some(Err(SubmitError::OpIdReused(_))) => {}
            other => panic!("op {id} from before fingerprints: {other:?}"),
        }
    }
    // A new op id is still new.
    let next = OpId {
        client_id: 7,
        local_seq: 3,
    };
    assert!(store.applied("notes", next, 0).is_none());
}

const SAMPLE_DELETED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sample-deleted");

#[test]
fn a_documented_tombstone_decodes_and_recovery_starts_its_document_anew() {
    use quire::wal::record::TombstoneRecord;
    let mut types = Vec::new();
    recover(
        &OsFs,
        &Path::new(SAMPLE_DELETED).join("wal"),
        RecoveryOptions::default(),
        true,
        |_, _, raw| {
            types.push(raw.record_type);
            if raw.record_type == RecordType::Tombstone {
                let tombstone = TombstoneRecord::decode(raw.payload).unwrap();
                assert_eq!(
                    tombstone,
                    TombstoneRecord {
                        doc_id: "gone".into(),
                        version: 1,
                        timestamp_ms: 1_700_000_000_002,
                    }
                );
            }
        },
    )
    .unwrap();
    assert_eq!(
        types,
        [RecordType::Op, RecordType::Tombstone, RecordType::Op]
    );
    // Opened: only the op after the tombstone counts, and the deleted incarnation's
    // snapshot (at seq 1, "old") is neither used nor kept.
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["wal", "snapshots"] {
        std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(Path::new(SAMPLE_DELETED).join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), tmp.path().join(sub).join(entry.file_name())).unwrap();
        }
    }
    let (store, _) =
        LocalSequencer::open_with(Arc::new(OsFs), tmp.path(), LocalConfig::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let gone = rt.block_on(store.read("gone")).unwrap().unwrap();
    assert_eq!((gone.text.as_str(), gone.version), ("anew", 1));
    let left = std::fs::read_dir(tmp.path().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "the deleted incarnation's snapshot is removed");
    // The new document's op 1 is the one after the tombstone (the old one's id is
    // the same: only the content tells).
    let id = OpId {
        client_id: 7,
        local_seq: 1,
    };
    match store.applied("gone", id, fingerprint(0, &[Patch::new(0, 0, "anew")])) {
        // Type-1 records: the fingerprint is unknown, so a resend is refused.
        Some(Err(SubmitError::OpIdReused(_))) => {}
        other => panic!("{other:?}"),
    }
    store.close();
}
