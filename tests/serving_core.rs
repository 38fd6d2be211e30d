//! The serving core keeps its promises under every input a client may send: each test
//! here reproduces, over TCP, a failure found by probing the server from outside
//! (issue "serving core"), and tests a limit at and just past its value with a
//! bystander client that must stay unaffected.

use crate::common;

use std::time::Duration;

use common::{next_reply, open, start_on_sim, start_with};
use quire::client::connection::Connection;
use quire::client::Event;
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message, Selection};
use quire::protocol::{
    max_op_bytes, MAX_OPEN_DOCS, MAX_OPS_IN_FLIGHT, MAX_OP_PATCHES, MAX_SELECTIONS,
};
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::wal::vfs::sim::SimFs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A guard against a hang (not a performance threshold).
const HANG: Duration = Duration::from_secs(60);

async fn submit(conn: &mut Connection, doc: &str, local_seq: u64, base: u64, patches: Vec<Patch>) {
    conn.send(Message::Submit {
        doc: doc.into(),
        local_seq,
        base_version: base,
        patches,
    })
    .await
    .unwrap();
}

/// Opens `doc` on a raw connection and reads the whole reply (snapshot pieces, then
/// every `Ops` frame): the text and version it describes.
async fn open_raw(
    conn: &mut Connection,
    doc: &str,
    known_version: u64,
) -> (Option<String>, u64, usize) {
    conn.send(Message::Open {
        doc: doc.into(),
        known_version,
    })
    .await
    .unwrap();
    let mut text: Option<String> = None;
    let mut version = known_version;
    let mut frames = 0;
    loop {
        frames += 1;
        match next_reply(conn).await {
            Message::Snapshot {
                text: piece,
                version: v,
                total_len,
                ..
            } => {
                let t = text.get_or_insert_with(String::new);
                t.push_str(&piece);
                assert!(t.len() as u64 <= total_len);
                version = v;
            }
            Message::Ops { ops, more, .. } => {
                for op in ops {
                    assert_eq!(op.seq, version + 1, "catch-up ops are consecutive");
                    version = op.seq;
                    if let Some(t) = text.as_mut() {
                        let mut rope = quire::text::Text::from(t.as_str());
                        rope.apply(&op.patches).unwrap();
                        *t = rope.to_string();
                    }
                }
                if !more {
                    return (text, version, frames);
                }
            }
            other => panic!("unexpected reply to Open: {other:?}"),
        }
    }
}

async fn expect_closed_with(conn: &mut TcpStream, code: u16) {
    let mut got = Vec::new();
    tokio::time::timeout(HANG, conn.read_to_end(&mut got))
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert!(
        got.len() >= 11,
        "an Error frame arrives before the close: {got:?}"
    );
    // The last frame is the Error: type 0x7f, request id, code.
    let mut at = 0;
    let mut last = None;
    while at + 4 <= got.len() {
        let len = u32::from_le_bytes(got[at..at + 4].try_into().unwrap()) as usize;
        last = Some(&got[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    let last = last.unwrap();
    assert_eq!(last[0], 0x7f, "the last frame is an Error");
    assert_eq!(u16::from_le_bytes([last[5], last[6]]), code);
}

fn hello_frame(client_id: u64) -> Vec<u8> {
    let mut body = vec![0x01, 0, 0, 0, 0];
    body.extend_from_slice(b"QUIR");
    body.extend_from_slice(&quire::protocol::PROTOCOL_VERSION.to_le_bytes());
    body.extend_from_slice(&client_id.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Failure 1: after a restart a late op read the ops it missed from the log index,
/// which holds only durable ops, and skipped the ones sequenced but not yet durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_op_after_a_restart_is_transformed_over_ops_not_yet_durable() {
    let fs = SimFs::new();
    {
        let server = start_on_sim(&fs, ServerConfig::default()).await;
        let a = open(server.addr, "d").await;
        a.edit(&[Patch::new(0, 0, "0123456789")]).await.unwrap();
        a.settle().await;
        a.edit(&[Patch::new(10, 0, "Y")]).await.unwrap();
        a.settle().await;
        a.close().await;
        server.stop().await;
    }
    let server = start_on_sim(&fs, ServerConfig::default()).await;
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    assert_eq!(open_raw(&mut b, "d", 0).await.1, 2);
    let mut c = Connection::connect(server.addr, 3, "").await.unwrap();
    open_raw(&mut c, "d", 0).await;
    // B's op is sequenced (its Ping is answered after it) but cannot become durable.
    fs.hold_syncs();
    submit(&mut b, "d", 1, 2, vec![Patch::new(0, 0, "b")]).await;
    b.send(Message::Ping { nonce: 1 }).await.unwrap();
    assert!(matches!(
        next_reply(&mut b).await,
        Message::Pong { nonce: 1 }
    ));
    // C made its op on version 1: it missed "Y" (durable) and "b" (not yet).
    submit(&mut c, "d", 1, 1, vec![Patch::new(5, 0, "c")]).await;
    c.send(Message::Ping { nonce: 2 }).await.unwrap();
    assert!(matches!(
        next_reply(&mut c).await,
        Message::Pong { nonce: 2 }
    ));
    fs.release_syncs();
    assert!(matches!(
        next_reply(&mut b).await,
        Message::Ack { seq: 3, .. }
    ));
    assert!(matches!(
        next_reply(&mut c).await,
        Message::Ack { seq: 4, .. }
    ));
    let view = server.store.read("d").await.unwrap().unwrap();
    assert_eq!(view.text, "b01234c56789Y");
    server.stop().await;
}

/// Failure 2: a reply larger than the frame limit closed the receiving connection, and
/// a document larger than a frame could not be opened. Ops are limited so that every
/// message carrying one fits; snapshots and catch-ups go in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reply_fits_a_frame_and_a_document_larger_than_a_frame_opens_in_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let max_frame = 4096;
    let config = ServerConfig {
        max_frame,
        outbox_bytes: 64 * 1024,
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    open_raw(&mut b, "d", 0).await;
    // An op at the limit: accepted, and its broadcast reaches B.
    let limit = max_op_bytes(max_frame);
    let at_limit = "x".repeat(limit - 4 - 12);
    submit(&mut a, "d", 1, 0, vec![Patch::new(0, 0, at_limit.clone())]).await;
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack { seq: 1, .. }
    ));
    match b.recv().await.unwrap().message {
        Message::Remote { op, .. } => assert_eq!(op.patches[0].ins, at_limit),
        other => panic!("B gets the broadcast, got {other:?}"),
    }
    // One byte more: refused with code 24; both connections go on.
    submit(
        &mut a,
        "d",
        2,
        1,
        vec![Patch::new(0, 0, "x".repeat(limit - 4 - 12 + 1))],
    )
    .await;
    match next_reply(&mut a).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected a Reject, got {other:?}"),
    }
    open_raw(&mut a, "d", 1).await;
    // Grow the document to many frames.
    let mut version = 1;
    for i in 0..40u64 {
        submit(
            &mut a,
            "d",
            3 + i,
            version,
            vec![Patch::new(0, 0, "é".repeat(1500))],
        )
        .await;
        assert!(matches!(next_reply(&mut a).await, Message::Ack { .. }));
        version += 1;
    }
    b.send(Message::Ping { nonce: 9 }).await.unwrap();
    assert!(matches!(
        next_reply(&mut b).await,
        Message::Pong { nonce: 9 }
    ));
    let expected = server.store.read("d").await.unwrap().unwrap();
    assert!(expected.text.len() > 30 * max_frame);
    // A new client opens it from a snapshot in pieces.
    let mut c = Connection::connect(server.addr, 3, "").await.unwrap();
    let (text, v, frames) = open_raw(&mut c, "d", 0).await;
    assert_eq!(text.as_deref(), Some(expected.text.as_str()));
    assert_eq!(v, version);
    assert!(frames > 30, "the snapshot came in {frames} frames");
    // A client at version 1 catches up with many Ops frames.
    let mut d = Connection::connect(server.addr, 4, "").await.unwrap();
    let (text, v, frames) = open_raw(&mut d, "d", 1).await;
    assert_eq!((text, v), (None, version));
    assert!(frames > 10, "the catch-up came in {frames} frames");
    // So does a Fetch.
    d.send(Message::Fetch {
        doc: "d".into(),
        after_seq: 1,
        limit: u32::MAX,
    })
    .await
    .unwrap();
    let mut seq = 1;
    loop {
        match next_reply(&mut d).await {
            Message::Ops { ops, more, .. } => {
                for op in ops {
                    assert_eq!(op.seq, seq + 1);
                    seq = op.seq;
                }
                if !more {
                    break;
                }
            }
            other => panic!("expected Ops, got {other:?}"),
        }
    }
    assert_eq!(seq, version);
    server.stop().await;
}

/// Failure 3: an op of 60,000 patches took a minute (quadratic) and stalled every
/// document. It is applied (the same result as the patches one by one), and one patch
/// past the limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_with_the_most_patches_is_applied_and_one_more_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(tmp.path(), ServerConfig::default()).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "big", 0).await;
    submit(
        &mut a,
        "big",
        1,
        0,
        vec![Patch::new(0, 0, "ab".repeat(11_500))],
    )
    .await;
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack { seq: 1, .. }
    ));
    let mut text = quire::text::Text::from("ab".repeat(11_500).as_str());
    let mut rng = quire::wal::vfs::sim::SplitMix(7);
    let mut patches = Vec::new();
    for _ in 0..MAX_OP_PATCHES {
        let len = u64::from(text.len_chars());
        let p = Patch::new(rng.below(len + 1) as u32, 0, "z");
        text.apply(std::slice::from_ref(&p)).unwrap();
        patches.push(p);
    }
    let mut too_many = patches.clone();
    too_many.push(Patch::new(0, 0, "z"));
    submit(&mut a, "big", 2, 1, too_many).await;
    match next_reply(&mut a).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected a Reject, got {other:?}"),
    }
    open_raw(&mut a, "big", 1).await;
    submit(&mut a, "big", 3, 1, patches).await;
    // A bystander on another document is served meanwhile.
    let bystander = open(server.addr, "small").await;
    bystander.edit(&[Patch::new(0, 0, "fine")]).await.unwrap();
    bystander.settle().await;
    match tokio::time::timeout(HANG, next_reply(&mut a))
        .await
        .unwrap()
    {
        Message::Ack { seq: 2, .. } => {}
        other => panic!("expected the Ack, got {other:?}"),
    }
    let view = server.store.read("big").await.unwrap().unwrap();
    assert_eq!(view.text, text.to_string());
    server.stop().await;
}

/// Failure 4: with the log failed, Open answered an empty document at version 0. Now
/// another client gets the document as of its last durable op; the client whose op the
/// log failed under gets the error (that op may yet be found in the log after a
/// restart, and a view without it would mislead that client's next op).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_log_fails_open_reports_the_error_not_an_empty_document() {
    let fs = SimFs::new();
    let server = start_on_sim(&fs, ServerConfig::default()).await;
    // The client's op is answered with the error's code (a client keeps such an op in
    // flight and retries it once the server is back: the raw protocol shows the code).
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    submit(&mut a, "d", 1, 0, vec![Patch::new(0, 0, "kept")]).await;
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack { seq: 1, .. }
    ));
    fs.fail_syncs_after(0);
    submit(&mut a, "d", 2, 1, vec![Patch::new(0, 0, "lost")]).await;
    match next_reply(&mut a).await {
        Message::Reject { code, .. } | Message::Error { code, .. } => {
            assert_eq!(code, ErrorCode::StorageFailed)
        }
        other => panic!("the op is refused, not {other:?}"),
    }
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    b.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    match next_reply(&mut b).await {
        Message::Snapshot { version, text, .. } => {
            assert_eq!((version, text.as_str()), (1, "kept"))
        }
        other => panic!("the durable document, not {other:?}"),
    }
    a.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    match next_reply(&mut a).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::StorageFailed),
        other => panic!("an error, not a document: {other:?}"),
    }
    // The connection stays usable.
    a.send(Message::Ping { nonce: 3 }).await.unwrap();
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Pong { nonce: 3 }
    ));
    server.stop().await;
}

/// Failure 5: a different op under a used op id was acked as a duplicate and dropped;
/// a local seq below the client's newest was acked with seq 0 and dropped; two live
/// connections could share a client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_op_id_is_refused_and_a_true_resend_gets_its_original_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(tmp.path(), ServerConfig::default()).await;
    // The README's example, run once: a client's first edit, its op id (`id`,
    // `local_seq`).
    let first = open(server.addr, "notes").await;
    let local_seq = first
        .edit_with(|_| vec![Patch::new(0, 0, "hello")])
        .await
        .unwrap();
    first.settle().await;
    let id = first.client.client_id();
    first.close().await;
    // Run again (on the raw protocol): the same client id and local seq, another edit.
    let mut again = Connection::connect(server.addr, id, "").await.unwrap();
    let (_, version, _) = open_raw(&mut again, "notes", 0).await;
    submit(
        &mut again,
        "notes",
        local_seq,
        version,
        vec![Patch::new(0, 0, "bye ")],
    )
    .await;
    match next_reply(&mut again).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::OpIdReused),
        other => panic!("a reused id is refused, got {other:?}"),
    }
    // After a Reject the client opens the document again before its next op.
    open_raw(&mut again, "notes", version).await;
    // The true resend (same base, same patches) gets its original ack.
    submit(
        &mut again,
        "notes",
        local_seq,
        0,
        vec![Patch::new(0, 0, "hello")],
    )
    .await;
    assert!(matches!(
        next_reply(&mut again).await,
        Message::Ack { seq: 1, .. }
    ));
    // An id below the newest that was never used: refused, not acked with seq 0.
    submit(
        &mut again,
        "notes",
        local_seq + 4,
        1,
        vec![Patch::new(5, 0, "!")],
    )
    .await;
    assert!(matches!(
        next_reply(&mut again).await,
        Message::Ack { seq: 2, .. }
    ));
    submit(
        &mut again,
        "notes",
        local_seq + 2,
        2,
        vec![Patch::new(0, 0, "?")],
    )
    .await;
    match next_reply(&mut again).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::OpIdReused),
        other => panic!("expected a Reject, got {other:?}"),
    }
    assert_eq!(
        server.store.read("notes").await.unwrap().unwrap().text,
        "hello!"
    );
    // A second live connection with the same client id replaces the first (code 11).
    let mut twin = Connection::connect(server.addr, id, "").await.unwrap();
    let mut closed_with = None;
    while let Ok(env) = tokio::time::timeout(HANG, again.recv()).await.unwrap() {
        closed_with = Some(env.message);
    }
    assert!(
        matches!(
            closed_with,
            Some(Message::Error {
                code: ErrorCode::Replaced,
                ..
            })
        ),
        "{closed_with:?}"
    );
    twin.send(Message::Ping { nonce: 1 }).await.unwrap();
    assert!(matches!(
        next_reply(&mut twin).await,
        Message::Pong { nonce: 1 }
    ));
    server.stop().await;
}

fn short_deadlines() -> ServerConfig {
    ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..ServerConfig::default()
    }
}

/// Failure 6: connections that never sent a byte, a half-sent Hello or a half-sent
/// Submit stayed open for ever. Each gets Error code 10 and is closed; a client that
/// pings within the idle deadline stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_are_timed_out_and_a_pinging_client_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(tmp.path(), short_deadlines()).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half_hello = TcpStream::connect(server.addr).await.unwrap();
    half_hello.write_all(&hello_frame(5)[..9]).await.unwrap();
    let mut half_submit = TcpStream::connect(server.addr).await.unwrap();
    half_submit.write_all(&hello_frame(6)).await.unwrap();
    half_submit
        .write_all(&[200, 0, 0, 0, 0x11, 0, 0])
        .await
        .unwrap();
    let mut pinger = Connection::connect(server.addr, 7, "").await.unwrap();
    let pinging = tokio::spawn(async move {
        // Three idle deadlines long, a ping every half deadline.
        for nonce in 0..6 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pinger.send(Message::Ping { nonce }).await.unwrap();
            assert!(matches!(
                pinger.recv().await.unwrap().message,
                Message::Pong { .. }
            ));
        }
    });
    expect_closed_with(&mut silent, 10).await;
    expect_closed_with(&mut half_hello, 10).await;
    expect_closed_with(&mut half_submit, 10).await;
    pinging.await.unwrap();
    server.stop().await;
}

/// Failure 6 (continued): at the connection limit a new client was left without an
/// answer. One past the limit gets Error code 9; after one leaves, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_past_the_limit_gets_busy_and_a_slot_frees_when_one_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_connections: 3,
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let a = Connection::connect(server.addr, 1, "").await.unwrap();
    let _b = Connection::connect(server.addr, 2, "").await.unwrap();
    let mut c = Connection::connect(server.addr, 3, "").await.unwrap();
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    expect_closed_with(&mut over, 9).await;
    c.send(Message::Ping { nonce: 1 }).await.unwrap();
    assert!(matches!(next_reply(&mut c).await, Message::Pong { .. }));
    drop(a);
    // The slot frees once the server sees the close.
    let served = tokio::time::timeout(HANG, async {
        loop {
            if let Ok(conn) = Connection::connect(server.addr, 4, "").await {
                break conn;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(served.is_ok());
    server.stop().await;
}

/// A refused client that sent its Hello at once (as every client does) and reads a
/// moment later still reads the Error: the server does not close with the Hello unread,
/// which makes the kernel reset the connection and drop the Error before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_that_already_sent_its_hello_still_reads_busy() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let _a = Connection::connect(server.addr, 1, "").await.unwrap();
    for id in 0..3u64 {
        let mut over = TcpStream::connect(server.addr).await.unwrap();
        over.write_all(&hello_frame(100 + id)).await.unwrap();
        // Long enough for the server to have answered and closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        expect_closed_with(&mut over, 9).await;
    }
    server.stop().await;
}

/// Failure 6 (continued): 300 connections each holding most of a 1 MiB frame held
/// 324 MB. Large frames being received share a server-wide budget: one past it gets
/// code 9, small frames of other clients are unaffected, and the budget is returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_large_frames_share_a_budget_and_small_ones_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let max_frame = 256 * 1024;
    let config = ServerConfig {
        max_frame,
        large_frame_budget: 2 * (max_frame + 4),
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let mut holders = Vec::new();
    for id in 0..3u64 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(&hello_frame(100 + id)).await.unwrap();
        let mut header = (max_frame as u32).to_le_bytes().to_vec();
        header.push(0x11);
        header.extend_from_slice(&[0u8; 1000]);
        s.write_all(&header).await.unwrap();
        holders.push(s);
        if id < 2 {
            // Taken in order: wait until the server holds room for this one.
            tokio::time::timeout(HANG, async {
                while server.server.large_frame_bytes_in_use() < (id as usize + 1) * max_frame {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap();
        }
    }
    // Two fit in the budget; the third is refused.
    let mut third = holders.pop().unwrap();
    expect_closed_with(&mut third, 9).await;
    assert_eq!(server.server.large_frame_bytes_in_use(), 2 * max_frame);
    let bystander = open(server.addr, "b").await;
    bystander.edit(&[Patch::new(0, 0, "fine")]).await.unwrap();
    bystander.settle().await;
    bystander.close().await;
    drop(holders);
    tokio::time::timeout(HANG, async {
        while server.server.large_frame_bytes_in_use() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the budget is returned when the connections close");
    server.stop().await;
}

/// The ops-in-flight limit: the 64th op in flight is taken, the 65th refused (code
/// 28), and all taken ones are acked once the disk catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_in_flight_are_limited_per_connection() {
    let fs = SimFs::new();
    let server = start_on_sim(&fs, ServerConfig::default()).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    open_raw(&mut b, "d", 0).await;
    fs.hold_syncs();
    for i in 0..MAX_OPS_IN_FLIGHT as u64 + 1 {
        a.queue(Message::Submit {
            doc: "d".into(),
            local_seq: i + 1,
            base_version: 0,
            patches: vec![Patch::new(0, 0, "x")],
        })
        .unwrap();
    }
    a.flush().await.unwrap();
    match next_reply(&mut a).await {
        Message::Reject {
            code, local_seq, ..
        } => {
            assert_eq!(code, ErrorCode::TooManyInFlight);
            assert_eq!(local_seq, MAX_OPS_IN_FLIGHT as u64 + 1);
        }
        other => panic!("expected a Reject, got {other:?}"),
    }
    // Another connection of another client has its own allowance.
    submit(&mut b, "d", 1, 0, vec![Patch::new(0, 0, "y")]).await;
    fs.release_syncs();
    assert!(matches!(next_reply(&mut b).await, Message::Ack { .. }));
    for seq in 1..=MAX_OPS_IN_FLIGHT as u64 {
        match next_reply(&mut a).await {
            Message::Ack { seq: s, .. } => assert_eq!(s, seq),
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
    server.stop().await;
}

/// Documents open per connection: MAX_OPEN_DOCS are served; one more is refused with
/// code 34 and its request id, the connection stays and keeps serving the open ones (an
/// `Open` of one of them again is served too), and a `Close` makes room for it. Another
/// connection has its own allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_open_per_connection_are_limited_and_a_close_makes_room() {
    let fs = SimFs::new();
    let server = start_on_sim(&fs, ServerConfig::default()).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    let name = |i: usize| format!("doc-{i}");
    for i in 0..MAX_OPEN_DOCS {
        a.queue(Message::Open {
            doc: name(i),
            known_version: 0,
        })
        .unwrap();
    }
    a.flush().await.unwrap();
    // Every one answered (a snapshot, then an empty `Ops`), in order.
    for i in 0..MAX_OPEN_DOCS {
        loop {
            match next_reply(&mut a).await {
                Message::Snapshot { doc, .. } => assert_eq!(doc, name(i)),
                Message::Ops {
                    doc, more: false, ..
                } => {
                    assert_eq!(doc, name(i));
                    break;
                }
                other => panic!("opening {}: {other:?}", name(i)),
            }
        }
    }
    let past = name(MAX_OPEN_DOCS);
    let rid = a
        .send(Message::Open {
            doc: past.clone(),
            known_version: 0,
        })
        .await
        .unwrap();
    let refused = a.recv().await.unwrap();
    assert_eq!(refused.request_id, rid);
    match refused.message {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::TooManyOpen);
            assert!(message.contains(&past), "{message}");
        }
        other => panic!("expected Error 34, got {other:?}"),
    }
    // Still served: an op on the last one opened, and an `Open` of an open one.
    submit(
        &mut a,
        &name(MAX_OPEN_DOCS - 1),
        1,
        0,
        vec![Patch::new(0, 0, "x")],
    )
    .await;
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack { seq: 1, .. }
    ));
    let (text, version, _) = open_raw(&mut a, &name(0), 0).await;
    assert_eq!((text.as_deref(), version), (Some(""), 0));
    // The refused one was never opened: an op on it is refused as on any unopened one.
    submit(&mut a, &past, 2, 0, vec![Patch::new(0, 0, "y")]).await;
    match next_reply(&mut a).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::UnknownDocument),
        other => panic!("expected Reject 20, got {other:?}"),
    }
    // Another connection opens it, past a's count.
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    open_raw(&mut b, &past, 0).await;
    submit(&mut b, &past, 1, 0, vec![Patch::new(0, 0, "b")]).await;
    assert!(matches!(
        next_reply(&mut b).await,
        Message::Ack { seq: 1, .. }
    ));
    // A close makes room: then it opens on a, with b's op.
    a.send(Message::Close { doc: name(7) }).await.unwrap();
    let (text, version, _) = open_raw(&mut a, &past, 0).await;
    assert_eq!((text.as_deref(), version), (Some("b"), 1));
    // And the count is full again.
    a.send(Message::Open {
        doc: name(7),
        known_version: 0,
    })
    .await
    .unwrap();
    match next_reply(&mut a).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TooManyOpen),
        other => panic!("expected Error 34, got {other:?}"),
    }
    server.stop().await;
}

/// Presence: at most MAX_SELECTIONS per message; more is refused with code 24 and the
/// connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_selections_are_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(tmp.path(), ServerConfig::default()).await;
    // A sends on the raw protocol (the client sends at most MAX_SELECTIONS); B is a
    // client that shows the cursors.
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    let b = open(server.addr, "d").await;
    let mut events = b.events();
    let sel = Selection { anchor: 0, head: 0 };
    let presence = |n: usize| Message::Presence {
        doc: "d".into(),
        selections: vec![sel; n],
    };
    a.send(presence(MAX_SELECTIONS + 1)).await.unwrap();
    match next_reply(&mut a).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected an Error, got {other:?}"),
    }
    a.send(presence(MAX_SELECTIONS)).await.unwrap();
    loop {
        match events.recv().await.unwrap() {
            Event::Presence {
                client_id,
                selections,
            } => {
                assert_eq!(client_id, 1);
                assert_eq!(selections.len(), MAX_SELECTIONS);
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(b.presence()[&1].len(), MAX_SELECTIONS);
    b.close().await;
    server.stop().await;
}

/// Failure 7: after a slow reader was cut off, its session waited on a write that never
/// completed, and SIGTERM (the server's stop) hung until that client went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_does_not_wait_for_a_client_that_never_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        max_frame: 64 * 1024,
        outbox_bytes: 256 * 1024,
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let mut slow = Connection::connect(server.addr, 1, "").await.unwrap();
    slow.send(Message::Open {
        doc: "big".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    let writer = open(server.addr, "big").await;
    for _ in 0..400 {
        writer
            .edit(&[Patch::new(0, 0, "z".repeat(30_000))])
            .await
            .unwrap();
        writer.settle().await;
    }
    // `slow` is still connected and reads nothing.
    tokio::time::timeout(HANG, server.stop())
        .await
        .expect("stop returns while a client does not read");
    drop(slow);
}

/// Bytes of ops waiting for the disk are bounded server-wide: an op that fits in what is
/// left is sequenced; one past it waits (it is not refused, not dropped) until the disk
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_past_the_unsynced_budget_wait_for_the_disk() {
    let fs = SimFs::new();
    let config = ServerConfig {
        max_frame: 4096,
        outbox_bytes: 64 * 1024,
        unsynced_bytes: 4096,
        ..ServerConfig::default()
    };
    let server = start_on_sim(&fs, config).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    let mut b = Connection::connect(server.addr, 2, "").await.unwrap();
    open_raw(&mut b, "e", 0).await;
    fs.hold_syncs();
    // 4 + 12 + 2064 = 2080 bytes: two of them fill the budget of 4096 but for 64 bytes.
    let op = || vec![Patch::new(0, 0, "x".repeat(2064))];
    submit(&mut a, "d", 1, 0, op()).await;
    a.send(Message::Ping { nonce: 1 }).await.unwrap();
    assert!(matches!(next_reply(&mut a).await, Message::Pong { .. }));
    submit(&mut b, "e", 1, 0, op()).await;
    b.send(Message::Ping { nonce: 2 }).await.unwrap();
    // B's op waits for room: its session answers nothing meanwhile, and it is not
    // sequenced.
    let waited = tokio::time::timeout(Duration::from_millis(300), next_reply(&mut b)).await;
    assert!(
        waited.is_err(),
        "B's op should wait for the disk: {waited:?}"
    );
    assert_eq!(server.store.version("e"), 0);
    fs.release_syncs();
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack { seq: 1, .. }
    ));
    // The Pong follows the submit's sequencing; the Ack, its fsync: either comes first.
    let (mut acked, mut ponged) = (false, false);
    while !(acked && ponged) {
        match next_reply(&mut b).await {
            Message::Ack { seq: 1, .. } => acked = true,
            Message::Pong { nonce: 2 } => ponged = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    server.stop().await;
}

/// The frame limit, at and past its value: a frame of exactly `max_frame` bytes is read
/// (its op is too large to keep, so it gets Reject 24, on an open connection); one byte
/// more gets Error 2 and the connection is closed. A bystander is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_exactly_max_frame_is_read_and_one_byte_more_closes_the_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let max_frame = 8192;
    let config = ServerConfig {
        max_frame,
        outbox_bytes: 64 * 1024,
        ..ServerConfig::default()
    };
    let server = start_with(tmp.path(), config).await;
    let bystander = open(server.addr, "other").await;
    // A Submit frame: type, request id, doc "d", local seq, base, one patch.
    let submit_frame = |frame_len: usize| {
        let fixed = 1 + 4 + (2 + 1) + 8 + 8 + 4 + 12;
        let ins = "x".repeat(frame_len - fixed);
        let mut body = vec![0x11, 0, 0, 0, 0];
        body.extend_from_slice(&1u16.to_le_bytes());
        body.push(b'd');
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&(ins.len() as u32).to_le_bytes());
        body.extend_from_slice(ins.as_bytes());
        assert_eq!(body.len(), frame_len);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    };
    let mut at = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut at, "d", 0).await;
    at.send_raw(&submit_frame(max_frame)).await.unwrap();
    match next_reply(&mut at).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("expected a Reject, got {other:?}"),
    }
    at.send(Message::Ping { nonce: 1 }).await.unwrap();
    assert!(matches!(next_reply(&mut at).await, Message::Pong { .. }));
    let mut past = Connection::connect(server.addr, 2, "").await.unwrap();
    past.send_raw(&submit_frame(max_frame + 1)).await.unwrap();
    match next_reply(&mut past).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::FrameTooLarge),
        other => panic!("expected an Error, got {other:?}"),
    }
    assert!(past.recv().await.is_err(), "the connection is closed");
    bystander.edit(&[Patch::new(0, 0, "ok")]).await.unwrap();
    bystander.settle().await;
    bystander.close().await;
    server.stop().await;
}

/// Catch-up and Fetch are bounded: 10,000 ops behind is caught up with ops, 10,001 gets
/// a snapshot; a Fetch returns at most 10,000 ops whatever its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_past_its_limit_is_a_snapshot_and_fetch_is_capped() {
    use quire::server::session::{CATCHUP_MAX_OPS, FETCH_MAX_OPS};
    let fs = SimFs::new();
    let server = start_on_sim(&fs, ServerConfig::default()).await;
    let mut a = Connection::connect(server.addr, 1, "").await.unwrap();
    open_raw(&mut a, "d", 0).await;
    let total = CATCHUP_MAX_OPS + 2;
    let mut acked = 0;
    let mut sent = 0;
    while acked < total {
        // Pipelined, one char each, each made on the version the client has seen.
        while sent < total && sent - acked < MAX_OPS_IN_FLIGHT as u64 {
            sent += 1;
            a.queue(Message::Submit {
                doc: "d".into(),
                local_seq: sent,
                base_version: acked,
                patches: vec![Patch::new(0, 0, "x")],
            })
            .unwrap();
        }
        a.flush().await.unwrap();
        match next_reply(&mut a).await {
            Message::Ack { .. } => acked += 1,
            other => panic!("expected an Ack, got {other:?}"),
        }
    }
    let mut c = Connection::connect(server.addr, 2, "").await.unwrap();
    let (text, version, _) = open_raw(&mut c, "d", total - CATCHUP_MAX_OPS).await;
    assert_eq!((text, version), (None, total), "at the limit: ops only");
    let mut d = Connection::connect(server.addr, 3, "").await.unwrap();
    let (text, version, _) = open_raw(&mut d, "d", total - CATCHUP_MAX_OPS - 1).await;
    assert_eq!(version, total);
    assert_eq!(
        text.map(|t| t.len() as u64),
        Some(total),
        "past it: a snapshot"
    );
    d.send(Message::Fetch {
        doc: "d".into(),
        after_seq: 0,
        limit: u32::MAX,
    })
    .await
    .unwrap();
    let mut got = 0u64;
    loop {
        match next_reply(&mut d).await {
            Message::Ops { ops, more, .. } => {
                got += ops.len() as u64;
                if !more {
                    break;
                }
            }
            other => panic!("expected Ops, got {other:?}"),
        }
    }
    assert_eq!(got, u64::from(FETCH_MAX_OPS));
    // An op made 10,001 ops behind is refused (27); 10,000 behind is transformed.
    use quire::server::document::MAX_OPS_BEHIND;
    let mut e = Connection::connect(server.addr, 5, "").await.unwrap();
    open_raw(&mut e, "d", 0).await;
    submit(
        &mut e,
        "d",
        1,
        total - MAX_OPS_BEHIND - 1,
        vec![Patch::new(0, 0, "y")],
    )
    .await;
    match next_reply(&mut e).await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::TooOld),
        other => panic!("expected a Reject, got {other:?}"),
    }
    open_raw(&mut e, "d", total).await;
    submit(
        &mut e,
        "d",
        2,
        total - MAX_OPS_BEHIND,
        vec![Patch::new(0, 0, "y")],
    )
    .await;
    match next_reply(&mut e).await {
        Message::Ack { seq, .. } => assert_eq!(seq, total + 1),
        other => panic!("expected an Ack, got {other:?}"),
    }
    server.stop().await;
}
