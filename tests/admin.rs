//! The admin endpoint over real HTTP: `/metrics` parsed as Prometheus text with values
//! that move when ops are sent, `/healthz`, and `/readyz` with its reasons (recovering,
//! free disk under the threshold, the log failed).

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{open, start, start_on_sim, Running};
use quire::admin::{Admin, AdminConfig};
use quire::client::connection::Connection;
use quire::op::Patch;
use quire::protocol::message::{ErrorCode, Message, Selection};
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::wal::vfs::sim::SimFs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `admin` on a port of its own; returns its address.
async fn serve_admin<S: Sequencer>(admin: &Arc<Admin<S>>) -> SocketAddr {
    let listener = quire::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quire::admin::serve(
        admin.clone(),
        listener,
        std::future::pending(),
    ));
    addr
}

/// `GET path`: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_with(addr, path, "").await
}

const ADMIN_TOKEN: &str = "an-admin-token-of-some-length";

/// `GET path` with extra header lines (each ending in CRLF).
async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (u16, String) {
    request(addr, "GET", path, headers).await
}

/// `method path` with extra header lines (each ending in CRLF): the status and body.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: quire\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body.to_string())
}

/// Every sample of a scrape of `/metrics`, by metric name and label set (`code=24`).
/// A histogram is its sample count (its `+Inf` bucket).
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus text format");
    let mut out = HashMap::new();
    for sample in scrape.samples {
        let labels = sample.labels.to_string();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{labels}}}", sample.metric)
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .expect("a +Inf bucket")
                    .count
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(key, value);
    }
    out
}

fn admin_for<S: Sequencer>(dir: &std::path::Path, min_free_bytes: u64) -> Arc<Admin<S>> {
    Admin::new(AdminConfig {
        data_dir: dir.to_path_buf(),
        min_free_bytes,
        admin_token: Some(ADMIN_TOKEN.into()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_move_when_ops_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), "").await;
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::from_millis(3));
    let at = serve_admin(&admin).await;

    let before = scrape(at).await;
    for name in [
        "quire_ops_accepted_total",
        "quire_ack_latency_seconds",
        "quire_fsync_seconds",
        "quire_group_commit_records",
        "quire_log_bytes_written_total",
        "quire_log_append_queue_depth",
        "quire_snapshots_written_total",
        "quire_snapshot_write_seconds",
        "quire_segments_truncated_total",
        "quire_recovery_seconds",
        "quire_connected_clients",
        "quire_open_connections",
        "quire_open_documents",
        "quire_presence_in_total",
        "quire_presence_out_total",
        "quire_slow_reader_disconnects_total",
        "quire_disk_used_bytes",
        "quire_disk_free_bytes",
        "quire_log_writable",
        "quire_ready",
    ] {
        assert!(before.contains_key(name), "{name} missing from {before:?}");
    }
    assert_eq!(before["quire_ops_accepted_total"], 0.0);
    assert_eq!(before["quire_recovery_seconds"], 0.003);
    assert_eq!(before["quire_ready"], 1.0);
    assert_eq!(before["quire_log_writable"], 1.0);

    // Two clients on one document: five ops from one, a presence update from each.
    let alice = open(running.addr, "notes").await;
    let bob = open(running.addr, "notes").await;
    for i in 0..5 {
        alice.edit(&[Patch::new(i, 0, "x")]).await.unwrap();
        alice.synced().await.unwrap();
    }
    bob.set_presence(vec![Selection { anchor: 1, head: 1 }]);
    common::wait_for_version(&bob, 5).await;
    // Bob's presence went in to the server and out to Alice.
    let mut waited = 0;
    while alice.presence().is_empty() {
        assert!(waited < 1000, "Alice never saw Bob's presence");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    let during = scrape(at).await;
    assert_eq!(during["quire_ops_accepted_total"], 5.0);
    assert_eq!(during["quire_ack_latency_seconds"], 5.0);
    assert!(during["quire_fsync_seconds"] >= before["quire_fsync_seconds"] + 1.0);
    assert!(during["quire_group_commit_records"] >= 1.0);
    assert!(during["quire_log_records_written_total"] >= 5.0);
    assert!(during["quire_log_bytes_written_total"] > before["quire_log_bytes_written_total"]);
    assert_eq!(during["quire_connected_clients"], 2.0);
    assert_eq!(during["quire_open_connections"], 2.0);
    assert_eq!(during["quire_open_documents"], 1.0);
    assert!(during["quire_disk_used_bytes"] > 0.0);

    // A refused op is counted under its code.
    let mut raw = Connection::connect(running.addr, 0, "").await.unwrap();
    raw.send(Message::Submit {
        doc: "never-opened".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "x")],
    })
    .await
    .unwrap();
    let reply = common::next_reply(&mut raw).await;
    assert!(
        matches!(
            reply,
            Message::Reject {
                code: ErrorCode::UnknownDocument,
                ..
            }
        ),
        "{reply:?}"
    );
    let code = ErrorCode::UnknownDocument.to_u16();
    let after = scrape(at).await;
    assert_eq!(
        after[&format!("quire_ops_rejected_total{{code=\"{code}\"}}")],
        1.0
    );
    assert_eq!(after["quire_ops_accepted_total"], 5.0);
    assert!(after["quire_presence_in_total"] >= 1.0, "{after:?}");
    assert!(after["quire_presence_out_total"] >= 1.0, "{after:?}");

    alice.close().await;
    bob.close().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_and_readyz_says_why_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), "").await;
    let admin = admin_for(dir.path(), 0);
    let at = serve_admin(&admin).await;

    assert_eq!(get(at, "/healthz").await, (200, "ok\n".to_string()));
    // Before the server is attached, recovery is still running.
    let (status, body) = get(at, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], false);
    assert!(
        json["reasons"][0].as_str().unwrap().contains("recovering"),
        "{body}"
    );
    // /metrics answers meanwhile, with what it knows.
    assert_eq!(scrape(at).await["quire_ready"], 0.0);

    admin.serving(running.server.clone(), Duration::ZERO);
    let (status, body) = get(at, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], true);

    // The same server, watched with a free-space threshold no disk meets.
    let strict = admin_for(dir.path(), u64::MAX);
    strict.serving(running.server.clone(), Duration::ZERO);
    let strict_at = serve_admin(&strict).await;
    let (status, body) = get(strict_at, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--min-free-mib"), "{body}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_turns_readiness_red_and_the_metric_to_zero() {
    let fs = SimFs::new();
    let running = start_on_sim(&fs, ServerConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let at = serve_admin(&admin).await;
    assert_eq!(get(at, "/readyz").await.0, 200);

    // Opened first: a client id is written (and synced) to the data directory.
    let doc = open(running.addr, "doomed").await;
    fs.fail_syncs_after(0);
    doc.edit(&[Patch::new(0, 0, "lost")]).await.unwrap();
    let mut waited = 0;
    while running.store.wal().failure().is_none() {
        assert!(waited < 1000, "the log never failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
    }
    let (status, body) = get(at, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not writable"), "{body}");
    let metrics = scrape(at).await;
    assert_eq!(metrics["quire_log_writable"], 0.0);
    assert_eq!(metrics["quire_ready"], 0.0);
    // The client keeps its unacknowledged edit; nothing to wait for.
    drop(doc);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_routes_need_the_admin_token_and_list_and_read_documents() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), "").await;
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let at = serve_admin(&admin).await;
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");

    // Three documents, one of them with a slash in its id; one opened and never
    // written, which the log does not hold (it is not listed).
    for (name, text) in [("b", "bee"), ("a/x", "ex ☃"), ("c", "c"), ("d", "")] {
        let doc = open(running.addr, name).await;
        if !text.is_empty() {
            doc.edit(&[Patch::new(0, 0, text)]).await.unwrap();
        }
        doc.synced().await.unwrap();
        doc.close().await;
    }

    // Without the token, or with a wrong one: refused, and nothing is said of documents.
    let (status, body) = get(at, "/docs").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get_with(at, "/docs/b", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("bee"));
    // A server without an admin token refuses the routes altogether.
    let open_admin: Arc<Admin<_>> = Admin::new(AdminConfig {
        data_dir: dir.path().to_path_buf(),
        min_free_bytes: 0,
        admin_token: None,
    });
    open_admin.serving(running.server.clone(), Duration::ZERO);
    let open_at = serve_admin(&open_admin).await;
    let (status, body) = get_with(open_at, "/docs", &bearer).await;
    assert_eq!(status, 403, "{body}");

    // Pages of two, in id order, the last without `next`.
    let (status, body) = get_with(at, "/docs?limit=2", &bearer).await;
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = page["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a/x", "b"]);
    assert_eq!(page["documents"][0]["chars"], 4);
    assert_eq!(page["documents"][0]["version"], 1);
    assert_eq!(page["next"], "b");
    let (_, body) = get_with(at, "/docs?limit=2&after=b", &bearer).await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["documents"][0]["id"], "c");
    assert_eq!(page["documents"][0]["version"], 1);
    assert_eq!(page["documents"].as_array().unwrap().len(), 1, "{body}");
    assert!(page["next"].is_null(), "{body}");

    // A document's text and version; a missing document is a 404, not an empty text.
    let (status, body) = get_with(at, "/docs/a/x", &bearer).await;
    assert_eq!((status, body.as_str()), (200, "ex ☃"));
    // Older versions while the log holds them; a version not reached yet is a 404.
    let (status, body) = get_with(at, "/docs/a/x?at=0", &bearer).await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, body) = get_with(at, "/docs/a/x?at=1", &bearer).await;
    assert_eq!((status, body.as_str()), (200, "ex ☃"));
    let (status, body) = get_with(at, "/docs/a/x?at=2", &bearer).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("newest durable version is 1"), "{body}");
    for missing in ["/docs/nope", "/docs/d"] {
        let (status, body) = get_with(at, missing, &bearer).await;
        assert_eq!(status, 404, "{body}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_version_is_read_from_a_snapshot_and_a_truncated_one_is_gone() {
    use quire::sequencer::local::LocalConfig;
    use quire::wal::WalConfig;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalConfig {
        wal: WalConfig {
            segment_size: 64 * 1024,
            ..WalConfig::default()
        },
        snapshot_every_ops: 5,
        retention: Duration::ZERO,
        maintenance_interval: Duration::from_millis(10),
        ..LocalConfig::default()
    };
    let running = common::start_with_store(dir.path(), store, ServerConfig::default()).await;
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let at = serve_admin(&admin).await;
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    // Ops of 8 KiB: a segment holds about seven, so truncation soon removes the first.
    // 42 of them: the newest snapshot is then the one of version 40 (or, not yet taken,
    // 35), and op 41 stays in the log whenever maintenance runs (no snapshot covers it),
    // so version 41 is readable from a snapshot and the log whatever the timing. (Version
    // 39 is not: the snapshot of 40 lets the segment holding ops 36 to 39 go.)
    let doc = open(running.addr, "long").await;
    for i in 0..42 {
        let c = char::from(b'a' + (i % 26) as u8);
        doc.edit(&[Patch::new(0, 0, c.to_string().repeat(8192))])
            .await
            .unwrap();
        doc.synced().await.unwrap();
    }
    let mut waited = 0;
    while running.store.storage_stats().segments_truncated == 0 {
        assert!(waited < 1000, "nothing was truncated");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    // Version 1 is gone: 410, naming the oldest version available.
    let (status, body) = get_with(at, "/docs/long?at=1", &bearer).await;
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("oldest version available"), "{body}");
    // The head, and a version past the newest snapshot (taken every 5 ops).
    let (status, head) = get_with(at, "/docs/long?at=42", &bearer).await;
    assert_eq!(status, 200);
    let (_, latest) = get_with(at, "/docs/long", &bearer).await;
    assert_eq!(head, latest);
    let (status, body) = get_with(at, "/docs/long?at=41", &bearer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.chars().count(), 41 * 8192);
    assert!(body.starts_with('o'), "op 41 inserted 'o's at 0");
    doc.close().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_bounds_its_connections_and_closes_idle_ones() {
    let dir = tempfile::tempdir().unwrap();
    let admin: Arc<Admin<quire::sequencer::local::LocalSequencer>> = admin_for(dir.path(), 0);
    let listener = quire::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let at = listener.local_addr().unwrap();
    // One connection at a time, closed after 300 ms without a byte moved.
    tokio::spawn(quire::admin::serve_bounded(
        admin.clone(),
        listener,
        1,
        Duration::from_millis(300),
        std::future::pending(),
    ));
    let mut idle = tokio::net::TcpStream::connect(at).await.unwrap();
    // Let the server accept it first, so that it holds the one slot.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(get(at, "/healthz"));
    // Not served while the idle connection holds the slot (it holds it for 300 ms).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served beside the first"
    );
    // The idle connection is closed by the server (read gives end of file or an error),
    // which frees the slot: the second request is then served.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut byte))
        .await
        .expect("the server closes an idle admin connection");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("served once the slot is free")
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

/// [`serve_admin`] until the sender is used or dropped: then the endpoint lets go of
/// the server (and so of its data directory).
async fn serve_admin_until<S: Sequencer>(
    admin: Arc<Admin<S>>,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = quire::admin::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = quire::admin::serve(admin, listener, async move {
            let _ = stopped.await;
        })
        .await;
    });
    (addr, task, stop)
}

/// A raw connection that opened `doc` (its reply read to the end): the version it got.
async fn open_raw(conn: &mut Connection, doc: &str) -> u64 {
    conn.send(Message::Open {
        doc: doc.into(),
        known_version: 0,
    })
    .await
    .unwrap();
    let mut version = 0;
    loop {
        match conn.recv().await.unwrap().message {
            Message::Snapshot { version: v, .. } => version = v,
            Message::Ops { more: false, .. } => return version,
            Message::Ops { .. } => {}
            other => panic!("opening {doc}: {other:?}"),
        }
    }
}

/// Submits one insert at 0 and returns the reply (`Ack` or `Reject`), skipping
/// broadcasts and presence.
async fn submit_raw(
    conn: &mut Connection,
    doc: &str,
    local_seq: u64,
    base: u64,
    text: &str,
) -> Message {
    conn.send(Message::Submit {
        doc: doc.into(),
        local_seq,
        base_version: base,
        patches: vec![Patch::new(0, 0, text)],
    })
    .await
    .unwrap();
    loop {
        match conn.recv().await.unwrap().message {
            reply @ (Message::Ack { .. } | Message::Reject { .. }) => return reply,
            Message::Error { code, message } => panic!("{code:?}: {message}"),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_document_tells_its_sessions_and_it_stays_gone_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path(), "").await;
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let (at, served, stop) = serve_admin_until(admin).await;
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");

    // One client on the document to delete, a bystander on another.
    let mut gone = Connection::connect(running.addr, 0, "").await.unwrap();
    assert_eq!(open_raw(&mut gone, "gone").await, 0);
    let acked = submit_raw(&mut gone, "gone", 1, 0, "hello").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");
    let mut bystander = Connection::connect(running.addr, 0, "").await.unwrap();
    open_raw(&mut bystander, "stay").await;
    let acked = submit_raw(&mut bystander, "stay", 1, 0, "kept").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");

    // The admin token, as for the other document routes: 401 without it or with a
    // wrong one, 403 on a server without one; the document is untouched.
    let (status, body) = request(at, "DELETE", "/docs/gone", "").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = request(
        at,
        "DELETE",
        "/docs/gone",
        "Authorization: Bearer wrong\r\n",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let open_admin: Arc<Admin<_>> = Admin::new(AdminConfig {
        data_dir: dir.path().to_path_buf(),
        min_free_bytes: 0,
        admin_token: None,
    });
    open_admin.serving(running.server.clone(), Duration::ZERO);
    let (open_at, open_served, open_stop) = serve_admin_until(open_admin).await;
    let (status, body) = request(open_at, "DELETE", "/docs/gone", &bearer).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = get_with(at, "/docs/gone", &bearer).await;
    assert_eq!((status, body.as_str()), (200, "hello"));
    // A document the log does not hold: 404.
    let (status, body) = request(at, "DELETE", "/docs/nope", &bearer).await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = request(at, "DELETE", "/docs/gone", &bearer).await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["id"], "gone");
    assert_eq!(reply["deleted_at_version"], 1);

    // The subscribed session is told (unasked, code 32), and an op it sends after is
    // refused with that code, never acknowledged.
    let told = gone.recv().await.unwrap();
    match &told.message {
        Message::Error { code, message } => {
            assert_eq!(*code, ErrorCode::DocumentDeleted);
            assert_eq!(code.to_u16(), 32);
            assert!(message.contains("deleted at version 1"), "{message}");
        }
        other => panic!("expected Error 32, got {other:?}"),
    }
    assert_eq!(told.request_id, 0);
    match submit_raw(&mut gone, "gone", 2, 1, "late").await {
        Message::Reject { code, .. } => assert_eq!(code, ErrorCode::DocumentDeleted),
        other => panic!("expected Reject 32, got {other:?}"),
    }
    // The bystander keeps being served.
    let acked = submit_raw(&mut bystander, "stay", 2, 1, "still ").await;
    assert!(matches!(acked, Message::Ack { seq: 2, .. }), "{acked:?}");
    // Gone from the routes: no text, not listed, deleted once only.
    let (status, body) = get_with(at, "/docs/gone", &bearer).await;
    assert_eq!(status, 404, "{body}");
    let (_, body) = get_with(at, "/docs", &bearer).await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["documents"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(page["documents"][0]["id"], "stay");
    let (status, body) = request(at, "DELETE", "/docs/gone", &bearer).await;
    assert_eq!(status, 404, "{body}");
    drop((gone, bystander, stop, open_stop));
    served.await.unwrap();
    open_served.await.unwrap();
    running.stop().await;

    // After a restart: still gone; the bystander's text kept.
    let running = start(dir.path(), "").await;
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let at = serve_admin(&admin).await;
    let (status, body) = get_with(at, "/docs/gone", &bearer).await;
    assert_eq!(status, 404, "{body}");
    let (_, body) = get_with(at, "/docs", &bearer).await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["documents"].as_array().unwrap().len(), 1, "{body}");
    let (status, body) = get_with(at, "/docs/stay", &bearer).await;
    assert_eq!((status, body.as_str()), (200, "still kept"));
    // The id again: a new, empty document at version 0, the old op ids unknown to it.
    let mut again = Connection::connect(running.addr, 0, "").await.unwrap();
    assert_eq!(open_raw(&mut again, "gone").await, 0);
    let acked = submit_raw(&mut again, "gone", 1, 0, "new").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");
    let (status, body) = get_with(at, "/docs/gone", &bearer).await;
    assert_eq!((status, body.as_str()), (200, "new"));
    drop(again);
    running.stop().await;
}

/// Holds the simulated disk's syncs until dropped: a failing assertion releases them, so
/// that the log's writer thread, and the test with it, can end.
struct HeldSyncs<'a>(&'a SimFs);

impl<'a> HeldSyncs<'a> {
    fn hold(fs: &'a SimFs) -> Self {
        fs.hold_syncs();
        HeldSyncs(fs)
    }
}

impl Drop for HeldSyncs<'_> {
    fn drop(&mut self) {
        self.0.release_syncs();
    }
}

/// A deletion whose caller stops waiting once the tombstone is in (an HTTP client that
/// hangs up: its handler's future is dropped) is finished all the same: its sessions are
/// told (`Error` 32) and its id is free again. Before, the document was left out of the
/// server's map, refusing ops as deleted, with its sessions never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_whose_caller_stops_waiting_is_finished_and_told() {
    let fs = SimFs::new();
    let running = start_on_sim(&fs, ServerConfig::default()).await;
    let mut gone = Connection::connect(running.addr, 0, "").await.unwrap();
    assert_eq!(open_raw(&mut gone, "gone").await, 0);
    let acked = submit_raw(&mut gone, "gone", 1, 0, "hello").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");
    // Polled once: the tombstone goes in, not durable yet, and the caller is gone.
    let _held = HeldSyncs::hold(&fs);
    let abandoned =
        tokio::time::timeout(Duration::ZERO, running.server.delete_document("gone")).await;
    assert!(abandoned.is_err(), "{abandoned:?}");
    fs.release_syncs();
    let told = tokio::time::timeout(Duration::from_secs(60), gone.recv())
        .await
        .expect("the session is told")
        .unwrap();
    match &told.message {
        Message::Error { code, message } => {
            assert_eq!(*code, ErrorCode::DocumentDeleted, "{message}")
        }
        other => panic!("expected Error 32, got {other:?}"),
    }
    // Deleting it again gives nothing to delete, or (its snapshot files being removed
    // still) the same deletion, once done: then the id is a new document at version 0.
    let again = running.server.delete_document("gone").await;
    assert!(matches!(again, Ok(None | Some(1))), "{again:?}");
    let mut fresh = Connection::connect(running.addr, 0, "").await.unwrap();
    assert_eq!(open_raw(&mut fresh, "gone").await, 0);
    let acked = submit_raw(&mut fresh, "gone", 1, 0, "new").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");
    drop((gone, fresh));
    running.stop().await;
}

/// An op that reaches a document while its deletion is not durable yet is answered by
/// the deletion's outcome: here the log fails first, so the document was not deleted
/// and the op is refused as a storage failure (code 30: kept, resent after a restart),
/// not as deleted (code 32: the client would drop it). Before, it got code 32 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_during_a_deletion_that_fails_is_not_refused_as_deleted() {
    let (fs, running, mut conn, deleting) = a_deletion_under_way().await;
    let _held = HeldSyncs::hold(&fs);
    conn.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 2,
        base_version: 1,
        patches: vec![Patch::new(0, 0, "late ")],
    })
    .await
    .unwrap();
    // Not answered while the deletion's outcome is not known.
    let early = tokio::time::timeout(Duration::from_millis(200), conn.recv()).await;
    assert!(
        early.is_err(),
        "answered before the deletion's outcome: {early:?}"
    );
    fs.fail_syncs_after(0);
    fs.release_syncs();
    let answer = loop {
        if let reply @ (Message::Ack { .. } | Message::Reject { .. }) =
            conn.recv().await.unwrap().message
        {
            break reply;
        }
    };
    match answer {
        Message::Reject { code, message, .. } => {
            assert_eq!(code, ErrorCode::StorageFailed, "{message}")
        }
        other => panic!("expected Reject 30, got {other:?}"),
    }
    let failed = deleting.await.unwrap();
    assert!(failed.is_err(), "{failed:?}");
    drop(conn);
    running.stop().await;
}

/// A session that opens a document while its deletion is not durable yet, and sends an
/// op to it, is told to retry (`Reject` 33), not that the document was deleted (32): the
/// deletion may still fail, as here where the log fails under its tombstone, and a
/// client told 32 drops its edits to a document that was not deleted. Before, it got 32
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_on_a_fresh_open_during_a_deletion_is_told_to_retry() {
    let (fs, running, _conn, deleting) = a_deletion_under_way().await;
    let held = HeldSyncs::hold(&fs);
    let (code, message) = refusal_on_a_fresh_open(&running).await;
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    fs.fail_syncs_after(0);
    drop(held);
    let failed = deleting.await.unwrap();
    assert!(failed.is_err(), "{failed:?}");
    running.stop().await;
}

/// A client whose op is told to retry (code 33) while its document is being deleted is
/// served the document on each connection and refused the op again: its reconnect
/// backoff keeps growing across those connections instead of starting over at each
/// `Welcome` (before, it asked again every `backoff_min`, attempt 1 each time), and its
/// edit gets in once the deletion is done. Another document it has open, served on
/// each of those connections, does not start the backoff over either (it did, after
/// the first fix: the review of 0904b4c).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_told_to_retry_during_a_deletion_backs_off_and_gets_there_after_it() {
    let (fs, running, _conn, deleting) = a_deletion_under_way().await;
    let held = HeldSyncs::hold(&fs);
    let client = quire::client::Client::connect(common::client_config(running.addr))
        .await
        .unwrap();
    client.wait_connected().await.unwrap();
    let idle = client.open("idle").await.unwrap();
    let (doc, mut events) = client.open_with_events("doc").await.unwrap();
    doc.edit(&[Patch::new(0, 0, "kept")]).await.unwrap();
    let attempts = common::reconnect_attempts(&mut events, 4).await;
    assert_eq!(attempts, vec![1, 2, 3, 4]);
    assert!(!doc.is_synced());

    drop(held);
    deleting.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(30), doc.synced())
        .await
        .expect("synced once the deletion is done")
        .unwrap();
    assert_eq!(doc.text(), "kept");
    assert!(idle.is_synced());
    let ops = running.store.ops_after("doc", 0, 1).unwrap().unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].patches, vec![Patch::new(0, 0, "kept")]);
    drop((doc, idle));
    client.shutdown().await;
    running.stop().await;
}

/// A deletion that failed with the log leaves the session that had the document open
/// with a copy the server dropped: an op to it is refused as a storage failure (30),
/// not as deleted (32), and does not reach the sequencer, which no longer holds the
/// document as that copy knew it (the review of 065e5da found a worker panicking there,
/// the op never answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_after_a_deletion_that_failed_is_refused_as_a_storage_failure() {
    let (running, mut conn) = a_deletion_that_failed().await;
    conn.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 2,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "late ")],
    })
    .await
    .unwrap();
    let answer = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), conn.recv())
            .await
            .expect("an answer within 10 s")
            .expect("the connection works")
            .message;
        if let reply @ (Message::Ack { .. } | Message::Reject { .. }) = m {
            break reply;
        }
    };
    match answer {
        Message::Reject { code, message, .. } => {
            assert_eq!(code, ErrorCode::StorageFailed, "{message}")
        }
        other => panic!("expected Reject 30, got {other:?}"),
    }
    drop(conn);
    running.stop().await;
}

/// `POST /backup` while a document is being deleted: 409 (start it again: the deletion
/// ends within milliseconds) while its tombstone waits for the disk, and 503 naming the
/// restart once the log failed under it (the deletion stays under way until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_during_a_deletion_is_refused_409_and_503_once_the_log_failed_under_it() {
    let (fs, running, conn, deleting) = a_deletion_under_way().await;
    let held = HeldSyncs::hold(&fs);
    let dir = tempfile::tempdir().unwrap();
    let admin = admin_for(dir.path(), 0);
    admin.serving(running.server.clone(), Duration::ZERO);
    let at = serve_admin(&admin).await;
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let (status, body) = request(at, "POST", "/backup", &bearer).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("start it again"), "{body}");

    fs.fail_syncs_after(0);
    drop(held);
    assert!(deleting.await.unwrap().is_err());
    let (status, body) = request(at, "POST", "/backup", &bearer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("log failed") && body.contains("after the restart"),
        "{body}"
    );
    drop(conn);
    running.stop().await;
}

/// After a deletion that failed with the log, an op on a fresh `Open` of the document is
/// refused as a storage failure too, not as deleted: the deletion may never be durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_on_a_fresh_open_after_a_deletion_that_failed_is_refused_as_a_storage_failure() {
    let (running, _conn) = a_deletion_that_failed().await;
    let (code, message) = refusal_on_a_fresh_open(&running).await;
    assert_eq!(code, ErrorCode::StorageFailed, "{message}");
}

/// The `Reject` (code and message) of an op sent to "doc" on a new connection that opens
/// it; anything else, or no answer within 10 s, fails the test.
async fn refusal_on_a_fresh_open(running: &Running) -> (ErrorCode, String) {
    let mut fresh = Connection::connect(running.addr, 0, "").await.unwrap();
    let v = open_raw(&mut fresh, "doc").await;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        submit_raw(&mut fresh, "doc", 1, v, "x"),
    )
    .await
    .expect("answered within 10 s");
    match answer {
        Message::Reject { code, message, .. } => (code, message),
        other => panic!("expected a Reject, got {other:?}"),
    }
}

/// A server on the simulated disk whose document "doc" (op 1 acknowledged, open on the
/// connection returned) is being deleted: its tombstone is in the log, and the disk
/// holds its syncs (the caller releases them, best with a [`HeldSyncs`]).
async fn a_deletion_under_way() -> (
    SimFs,
    Running,
    Connection,
    tokio::task::JoinHandle<Result<Option<u64>, quire::server::DeleteError>>,
) {
    let fs = SimFs::new();
    let running = start_on_sim(&fs, ServerConfig::default()).await;
    let mut conn = Connection::connect(running.addr, 0, "").await.unwrap();
    assert_eq!(open_raw(&mut conn, "doc").await, 0);
    let acked = submit_raw(&mut conn, "doc", 1, 0, "hello").await;
    assert!(matches!(acked, Message::Ack { seq: 1, .. }), "{acked:?}");
    fs.hold_syncs();
    let deleting = tokio::spawn({
        let server = running.server.clone();
        async move { server.delete_document("doc").await }
    });
    // The tombstone is in once the storage forgot the document.
    while running.store.version("doc") != 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (fs, running, conn, deleting)
}

/// A server on the simulated disk whose document "doc" (op 1 acknowledged, open on the
/// connection returned) was being deleted when the log failed under the tombstone:
/// the deletion returned an error.
async fn a_deletion_that_failed() -> (Running, Connection) {
    let (fs, running, conn, deleting) = a_deletion_under_way().await;
    let _held = HeldSyncs::hold(&fs);
    fs.fail_syncs_after(0);
    fs.release_syncs();
    let failed = deleting.await.unwrap();
    assert!(failed.is_err(), "{failed:?}");
    (running, conn)
}
