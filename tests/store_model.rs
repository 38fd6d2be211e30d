//! Model-based test of the storage engine (the local sequencer over the WAL): any
//! sequence of appends, retries, snapshots, truncations, clean reopens and crashes
//! gives back exactly what was acknowledged. Checked against a model: each document's
//! text and version, the ops still in the log (exactly the acked ones, in order), and
//! the original ack for a retried op, across restarts and truncation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};
use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{Sequencer, SubmitOp, Submitted};
use quire::wal::vfs::sim::{CrashMode, SimFs};
use quire::wal::WalConfig;

const DOCS: [&str; 3] = ["alpha", "b/\u{1F600}", "gamma"];

#[derive(Clone, Debug)]
enum Action {
    Submit {
        doc: usize,
        at: u16,
        del: u8,
        ins: String,
    },
    Retry {
        doc: usize,
    },
    Snapshot {
        doc: usize,
    },
    Maintain,
    Reopen,
    Crash,
}

impl Arbitrary for Action {
    fn arbitrary(g: &mut Gen) -> Self {
        let doc = usize::arbitrary(g) % DOCS.len();
        match u8::arbitrary(g) % 20 {
            0..=11 => {
                let len = usize::arbitrary(g) % 2500;
                // Mostly ASCII, with astral-plane and multi-byte characters mixed in.
                let ins = (0..len)
                    .map(|i| match (i + usize::arbitrary(g)) % 13 {
                        0 => '\u{1F600}',
                        1 => 'é',
                        _ => char::from(b'a' + (i % 26) as u8),
                    })
                    .collect();
                Action::Submit {
                    doc,
                    at: u16::arbitrary(g),
                    del: u8::arbitrary(g),
                    ins,
                }
            }
            12 | 13 => Action::Retry { doc },
            14 | 15 => Action::Snapshot { doc },
            16 | 17 => Action::Maintain,
            18 => Action::Reopen,
            _ => Action::Crash,
        }
    }
}

#[derive(Default, Clone)]
struct ModelDoc {
    text: Vec<char>,
    ops: Vec<(u64, OpId, Vec<Patch>)>,
    local_seq: u64,
}

fn config() -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: 64 * 1024,
            ..WalConfig::default()
        },
        snapshot_every_ops: 1_000_000,
        snapshot_every: Duration::from_secs(3600),
        retention: Duration::ZERO,
        maintenance_interval: Duration::from_secs(3600),
    }
}

fn open(fs: &SimFs) -> LocalSequencer {
    LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), config())
        .unwrap_or_else(|e| panic!("reopen failed: {e}"))
        .0
}

fn check(store: &LocalSequencer, rt: &tokio::runtime::Runtime, model: &BTreeMap<usize, ModelDoc>) {
    for (&d, doc) in model {
        let view = rt.block_on(store.read(DOCS[d])).expect("the log works");
        let version = doc.ops.len() as u64;
        match view {
            Some(view) => {
                assert_eq!(view.version, version, "{}", DOCS[d]);
                assert_eq!(
                    view.text,
                    doc.text.iter().collect::<String>(),
                    "{}",
                    DOCS[d]
                );
            }
            None => assert_eq!(version, 0),
        }
        // The ops the log still holds are exactly the tail of the acked ones.
        let first = store.wal().with_index(|i| i.first_retained_seq(DOCS[d]));
        if let Some(first) = first {
            let ops = store
                .ops_after(DOCS[d], first - 1, usize::MAX)
                .expect("the log works")
                .expect("retained");
            let expected = &doc.ops[(first - 1) as usize..];
            assert_eq!(ops.len(), expected.len());
            for (op, (seq, id, patches)) in ops.iter().zip(expected) {
                assert_eq!(op.seq, *seq);
                assert_eq!(op.id, *id);
                assert_eq!(&op.patches, patches);
            }
        }
    }
}

fn run(actions: Vec<Action>) -> TestResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut fs = SimFs::new();
    let mut store = open(&fs);
    let mut model: BTreeMap<usize, ModelDoc> = BTreeMap::new();
    for action in actions {
        match action {
            Action::Submit { doc, at, del, ins } => {
                let m = model.entry(doc).or_default();
                let len = m.text.len();
                let pos = if len == 0 { 0 } else { at as usize % (len + 1) };
                let del = (del as usize).min(len - pos);
                if del == 0 && ins.is_empty() {
                    continue;
                }
                m.local_seq += 1;
                let op_id = OpId {
                    client_id: 100 + doc as u64,
                    local_seq: m.local_seq,
                };
                let patches = vec![Patch::new(pos as u32, del as u32, ins.clone())];
                let version = m.ops.len() as u64;
                let submitted = store
                    .submit(
                        DOCS[doc],
                        &SubmitOp {
                            op_id,
                            base_version: version,
                            expected_version: version,
                            expected_incarnation: None,
                            fingerprint: 0,
                            patches: patches.clone(),
                        },
                    )
                    .unwrap();
                let Submitted::Applied { seq, ticket } = submitted else {
                    panic!("a new op is applied: {submitted:?}");
                };
                assert_eq!(seq, version + 1);
                rt.block_on(store.wait_durable(ticket)).unwrap();
                m.text.splice(pos..pos + del, ins.chars());
                m.ops.push((seq, op_id, patches));
            }
            Action::Retry { doc } => {
                let Some(m) = model.get(&doc) else { continue };
                let Some((seq, op_id, patches)) = m.ops.last().cloned() else {
                    continue;
                };
                let submitted = store
                    .submit(
                        DOCS[doc],
                        &SubmitOp {
                            op_id,
                            base_version: seq - 1,
                            expected_version: seq - 1,
                            expected_incarnation: None,
                            fingerprint: 0,
                            patches,
                        },
                    )
                    .unwrap();
                match submitted {
                    Submitted::Duplicate { seq: s, ticket } => {
                        assert_eq!(s, seq, "a retry gets the original seq");
                        rt.block_on(store.wait_durable(ticket)).unwrap();
                    }
                    other => panic!("retry of {op_id} was not recognised: {other:?}"),
                }
            }
            Action::Snapshot { doc } => {
                store.snapshot_now(DOCS[doc]).unwrap();
            }
            Action::Maintain => {
                store.maintain_now().unwrap();
            }
            Action::Reopen => {
                drop(store);
                store = open(&fs);
                check(&store, &rt, &model);
            }
            Action::Crash => {
                // Everything acked was synced: a power loss now keeps all of it.
                let crashed = fs.crash(CrashMode::LoseUnsynced);
                drop(store);
                fs = crashed;
                store = open(&fs);
                check(&store, &rt, &model);
            }
        }
    }
    check(&store, &rt, &model);
    drop(store);
    let store = open(&fs.crash(CrashMode::LoseUnsynced));
    check(&store, &rt, &model);
    TestResult::passed()
}

#[test]
fn any_mix_of_appends_snapshots_truncation_and_restarts_gives_back_exactly_what_was_acked() {
    QuickCheck::new()
        .tests(60)
        .rng(Gen::new(200))
        .quickcheck(run as fn(Vec<Action>) -> TestResult);
}

#[test]
fn truncation_keeps_disk_bounded_and_idempotence_survives_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let fs = SimFs::new();
    let store = open(&fs);
    // A rarely edited document: one op, early.
    let quiet = SubmitOp {
        op_id: OpId {
            client_id: 1,
            local_seq: 1,
        },
        base_version: 0,
        expected_version: 0,
        expected_incarnation: None,
        fingerprint: 0,
        patches: vec![Patch::new(0, 0, "quiet")],
    };
    let Submitted::Applied { ticket, .. } = store.submit("quiet", &quiet).unwrap() else {
        panic!()
    };
    rt.block_on(store.wait_durable(ticket)).unwrap();
    let mut max_segments = 0;
    for i in 0..3000u64 {
        let op = SubmitOp {
            op_id: OpId {
                client_id: 2,
                local_seq: i + 1,
            },
            base_version: i,
            expected_version: i,
            expected_incarnation: None,
            fingerprint: 0,
            patches: vec![Patch::new(0, if i == 0 { 0 } else { 1 }, "x".repeat(100))],
        };
        let Submitted::Applied { ticket, .. } = store.submit("busy", &op).unwrap() else {
            panic!()
        };
        rt.block_on(store.wait_durable(ticket)).unwrap();
        if i % 100 == 99 {
            store.snapshot_now("busy").unwrap();
            store.maintain_now().unwrap();
            max_segments = max_segments.max(store.wal().with_index(|i| i.segments().len()));
        }
    }
    // ~3000 × 150 bytes = 450 KB of log through 64 KiB segments: without truncation that
    // is 7+ segments. The quiet document was snapshotted when it pinned the oldest one.
    assert!(max_segments <= 4, "segments grew to {max_segments}");
    assert_eq!(
        store.wal().with_index(|i| i.first_retained_seq("quiet")),
        None
    );
    drop(store);
    let store = open(&fs.crash(CrashMode::LoseUnsynced));
    assert_eq!(
        store.submit("quiet", &quiet).unwrap(),
        Submitted::Duplicate {
            seq: 1,
            ticket: quire::sequencer::Ticket(0)
        },
        "the dedupe table came back from the snapshot after the op's segment was deleted"
    );
    assert_eq!(
        rt.block_on(store.read("quiet")).unwrap().unwrap().text,
        "quiet"
    );
    assert_eq!(
        rt.block_on(store.read("busy")).unwrap().unwrap().version,
        3000
    );
}

/// A client's pipelined ops covered by a snapshot are still recognised after a restart:
/// a resend of an older one gets its original seq (the snapshot keeps the client's
/// remembered ops, not only its newest).
#[test]
fn after_a_restart_a_resend_of_an_older_op_covered_by_a_snapshot_gets_its_seq() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let fs = SimFs::new();
    let store = open(&fs);
    let op = |local_seq: u64, text: &str| SubmitOp {
        op_id: OpId {
            client_id: 7,
            local_seq,
        },
        base_version: local_seq - 1,
        expected_version: local_seq - 1,
        expected_incarnation: None,
        fingerprint: local_seq,
        patches: vec![Patch::new(0, 0, text)],
    };
    for i in 1..=3 {
        let Submitted::Applied { ticket, .. } = store.submit("p", &op(i, "x")).unwrap() else {
            panic!("applied")
        };
        rt.block_on(store.wait_durable(ticket)).unwrap();
    }
    assert!(store.snapshot_now("p").unwrap());
    drop(store);
    let store = open(&fs);
    match store.submit("p", &op(1, "x")) {
        Ok(Submitted::Duplicate { seq, .. }) => assert_eq!(seq, 1),
        other => panic!("a resend of op 1 gets its seq, got {other:?}"),
    }
    match store.submit("p", &op(2, "x")) {
        Ok(Submitted::Duplicate { seq, .. }) => assert_eq!(seq, 2),
        other => panic!("a resend of op 2 gets its seq, got {other:?}"),
    }
}
