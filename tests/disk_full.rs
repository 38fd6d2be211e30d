//! A full disk, end to end on the simulated disk: it is noticed while the active
//! segment still takes records (readiness red, the metric at 0, ops still
//! acknowledged), forgotten when space returns before it matters; once the log cannot
//! go on, submits are refused with code 30 (storage failed), nothing acknowledged is
//! lost, and a restart with space serves again.

use crate::common;

use std::time::Duration;

use common::{read_back, start_on_sim_with, store_config, Running};
use quire::admin::{Admin, AdminConfig};
use quire::client::connection::Connection;
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::wal::vfs::sim::{CrashMode, SimFs};
use quire::wal::WalConfig;

const SEGMENT: u64 = 256 * 1024;
const OP_CHARS: usize = 20_000;

fn small_segments() -> LocalConfig {
    let mut config = store_config();
    // Snapshots too: the reads after the failure start from one.
    config.snapshot_every_ops = 8;
    config.wal = WalConfig {
        segment_size: SEGMENT,
        ..config.wal
    };
    config
}

/// One writer over a bare connection: each op inserts `OP_CHARS` characters at 0 on
/// the version of the previous ack.
struct Writer {
    conn: Connection,
    local_seq: u64,
    version: u64,
    acked_chars: usize,
}

impl Writer {
    async fn open(running: &Running) -> Writer {
        let mut conn = Connection::connect(running.addr, 0, "").await.unwrap();
        conn.send(Message::Open {
            doc: "big".into(),
            known_version: 0,
        })
        .await
        .unwrap();
        // The snapshot of an empty document, then its (empty) catch-up.
        loop {
            if let Message::Ops { more: false, .. } = conn.recv().await.unwrap().message {
                break;
            }
        }
        Writer {
            conn,
            local_seq: 0,
            version: 0,
            acked_chars: 0,
        }
    }

    /// Submits one op; the server's answer: `Ok(seq)` or the reject's code.
    async fn write(&mut self) -> Result<u64, ErrorCode> {
        self.local_seq += 1;
        let text = char::from(b'a' + (self.local_seq % 26) as u8)
            .to_string()
            .repeat(OP_CHARS);
        self.conn
            .send(Message::Submit {
                doc: "big".into(),
                local_seq: self.local_seq,
                base_version: self.version,
                patches: vec![Patch::new(0, 0, text)],
            })
            .await
            .unwrap();
        match common::next_reply(&mut self.conn).await {
            Message::Ack { seq, .. } => {
                self.version = seq;
                self.acked_chars += OP_CHARS;
                Ok(seq)
            }
            Message::Reject { code, .. } => Err(code),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until the log's segment preparer is idle: the next segment prepared, or why
/// it cannot be reported.
async fn settled(running: &Running) {
    for _ in 0..3000 {
        let stats = running.store.storage_stats();
        if stats.next_segment_prepared || stats.next_segment_warning.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the segment preparer never settled");
}

fn readiness(admin: &Admin<LocalSequencer>) -> Vec<String> {
    admin.not_ready()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_before_it_stops_the_log_and_nothing_acked_is_lost() {
    let fs = SimFs::new();
    let running = start_on_sim_with(&fs, small_segments(), ServerConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = Admin::new(AdminConfig {
        data_dir: dir.path().to_path_buf(),
        min_free_bytes: 0,
        admin_token: None,
    });
    admin.serving(running.server.clone(), Duration::ZERO);
    let mut writer = Writer::open(&running).await;
    writer.write().await.unwrap();
    assert!(readiness(&admin).is_empty());
    // Another document, all of it durable before the disk fills.
    let small = common::open(running.addr, "small").await;
    small
        .edit(&[Patch::new(0, 0, "written before")])
        .await
        .unwrap();
    small.synced().await.unwrap();
    small.close().await;

    // No room for another segment: the spare already prepared is used, and preparing
    // the one after it fails while records still go into the active segment. The
    // preparer works on its own thread: the disk fills once the spare is ready, and
    // each write waits for the preparer to settle (a spare ready, or its failure
    // reported), so that no schedule lets the writer catch up with it.
    settled(&running).await;
    assert!(running.store.storage_stats().next_segment_prepared);
    fs.fill_after(0);
    let max_ops = 3 * SEGMENT as usize / OP_CHARS;
    let mut ops = 0;
    while running.store.storage_stats().next_segment_warning.is_none() {
        assert!(ops < max_ops, "the full disk was never noticed");
        writer.write().await.expect("the active segment has room");
        ops += 1;
        settled(&running).await;
    }
    let reasons = readiness(&admin);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("next segment cannot be prepared"),
        "{reasons:?}"
    );
    writer
        .write()
        .await
        .expect("acknowledged while the warning is up");

    // Space returns before the segment is full: the preparer's retry finds it, and
    // nothing failed.
    fs.fill_after(u64::MAX);
    for _ in 0..3000 {
        if running.store.storage_stats().next_segment_warning.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(readiness(&admin).is_empty(), "{:?}", readiness(&admin));

    // Full again, for good: once the active segment is full, the log stops.
    fs.fill_after(0);
    let code = loop {
        assert!(ops < 4 * max_ops, "the log never stopped");
        ops += 1;
        if let Err(code) = writer.write().await {
            break code;
        }
    };
    assert_eq!(code, ErrorCode::StorageFailed);
    assert_eq!(writer.write().await, Err(ErrorCode::StorageFailed));
    let reasons = readiness(&admin);
    assert!(
        reasons.iter().any(|r| r.contains("not writable")),
        "{reasons:?}"
    );
    // Reads keep working: a new client opens each document with every acked op, and
    // without the op the log failed under.
    let (text, version) = read_back(running.addr, "small").await;
    assert_eq!((text.as_str(), version), ("written before", 1));
    let (text, version) = read_back(running.addr, "big").await;
    assert_eq!(
        (text.chars().count(), version),
        (writer.acked_chars, writer.version)
    );
    // Except for the client whose op it is: that op may yet be found in the log after
    // a restart, and a view without it would mislead that client's next op.
    writer
        .conn
        .send(Message::Open {
            doc: "big".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    loop {
        match writer.conn.recv().await.unwrap().message {
            Message::Error { code, .. } => {
                assert_eq!(code, ErrorCode::StorageFailed);
                break;
            }
            // Replies to the ops it sent before may still be on their way.
            Message::Reject { code, .. } => assert_eq!(code, ErrorCode::StorageFailed),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    // A restart on a disk with room (what was synced) serves every acknowledged op.
    let (acked_chars, acked_version) = (writer.acked_chars, writer.version);
    drop(writer);
    running.stop().await;
    let restarted = fs.crash(CrashMode::LoseUnsynced);
    let running = start_on_sim_with(&restarted, small_segments(), ServerConfig::default()).await;
    let (text, version) = read_back(running.addr, "big").await;
    assert_eq!(version, acked_version);
    assert_eq!(text.chars().count(), acked_chars);
    let mut writer = Writer::open(&running).await;
    writer.version = version;
    writer.write().await.expect("serving again");
    drop(writer);
    running.stop().await;
}
