//! Over real TCP, after the log segments holding a document's ops were truncated and the
//! server restarted: a retried op gets its original ack and changes nothing; a client
//! whose version is older than what is kept is told to reload (Open gets a Snapshot,
//! Fetch gets Reload); a client at a retained version gets just the ops it missed.

use crate::common;

use std::time::Duration;

use common::{open, read_back, start_with_store};
use quire::client::connection::Connection;
use quire::op::Patch;
use quire::protocol::message::Message;
use quire::sequencer::local::LocalConfig;
use quire::server::ServerConfig;
use quire::wal::WalConfig;

fn small_segments() -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: 64 * 1024,
            ..WalConfig::default()
        },
        retention: Duration::ZERO,
        // Snapshots and truncation only when the test asks.
        maintenance_interval: Duration::from_secs(3600),
        snapshot_every: Duration::from_secs(3600),
        ..LocalConfig::default()
    }
}

async fn next_reply(conn: &mut Connection) -> Message {
    loop {
        let message = conn.recv().await.unwrap().message;
        if !matches!(message, Message::Remote { .. }) {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_truncation_and_restart_a_retry_gets_its_original_ack_and_old_versions_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with_store(tmp.path(), small_segments(), ServerConfig::default()).await;
    // Client 5's op is seq 1 of "d"; then enough of another client's ops to fill
    // segments.
    let first = Message::Submit {
        doc: "d".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "first")],
    };
    let mut c5 = Connection::connect(server.addr, 5, "").await.unwrap();
    c5.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    c5.send(first.clone()).await.unwrap();
    while !matches!(next_reply(&mut c5).await, Message::Ack { seq: 1, .. }) {}
    let c6 = open(server.addr, "d").await;
    for _ in 0..600 {
        c6.edit_with(|view| vec![Patch::new(view.len_chars(), 0, "y".repeat(150))])
            .await
            .unwrap();
        c6.settle().await;
    }
    let text = c6.text();
    server.store.snapshot_now("d").unwrap();
    server.store.maintain_now().unwrap();
    assert!(
        server
            .store
            .wal()
            .with_index(|i| i.first_retained_seq("d"))
            .is_some_and(|first| first > 2),
        "the segments holding the first ops were truncated"
    );
    drop(c5);
    c6.close().await;
    server.stop().await;

    let server = start_with_store(tmp.path(), small_segments(), ServerConfig::default()).await;
    let mut c5 = Connection::connect(server.addr, 5, "").await.unwrap();
    // Reconnecting at version 1: those ops are gone, so the reply is a full snapshot.
    c5.send(Message::Open {
        doc: "d".into(),
        known_version: 1,
    })
    .await
    .unwrap();
    match next_reply(&mut c5).await {
        Message::Snapshot {
            version, text: t, ..
        } => {
            assert_eq!((version, t.as_str()), (601, text.as_str()))
        }
        other => panic!("expected a Snapshot (reload), got {other:?}"),
    }
    assert!(matches!(next_reply(&mut c5).await, Message::Ops { .. }));
    c5.send(Message::Fetch {
        doc: "d".into(),
        after_seq: 1,
        limit: 10,
    })
    .await
    .unwrap();
    assert!(
        matches!(next_reply(&mut c5).await, Message::Reload { .. }),
        "a fetch of truncated ops is told to reload"
    );
    // The retry of op (5, 1): its original ack, nothing applied again.
    c5.send(first).await.unwrap();
    match next_reply(&mut c5).await {
        Message::Ack { local_seq, seq, .. } => assert_eq!((local_seq, seq), (1, 1)),
        other => panic!("expected the original ack, got {other:?}"),
    }
    // A client at a retained version gets just what it missed.
    let mut c7 = Connection::connect(server.addr, 7, "").await.unwrap();
    c7.send(Message::Open {
        doc: "d".into(),
        known_version: 600,
    })
    .await
    .unwrap();
    match next_reply(&mut c7).await {
        Message::Ops { ops, .. } => {
            assert_eq!(ops.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![601])
        }
        other => panic!("expected the ops after 600, got {other:?}"),
    }
    assert_eq!(read_back(server.addr, "d").await, (text, 601));
    server.stop().await;
}
