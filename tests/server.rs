//! The server over real TCP: traces through clients, convergence of concurrent clients,
//! a restart in the middle of a run, and bad input from one client while another works.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common;

use common::{
    client_config, concurrent_trace_json, long_lived_branches_trace, mint, open, open_with,
    read_back, start, start_with, store_config, Opened, Pipelined,
};

/// The secret of the servers that check tokens.
const SECRET: &str = "a secret of the tests";
use quire::auth::Access;
use quire::client::connection::Connection;
use quire::client::{ConnectionState, Event};
use quire::op::Patch;
use quire::protocol::message::{Envelope, ErrorCode, Message};
use quire::sequencer::local::LocalSequencer;
use quire::server::{Server, ServerConfig};
use quire::trace::{load, sha256_hex, traces_dir};
use quire::wal::vfs::sim::SplitMix;
use tokio::sync::oneshot;

/// Prefix checks published in the traces README (patches, sha256 of the text).
const AUTOMERGE_PREFIXES: [(usize, &str); 4] = [
    (
        1_000,
        "21955e0a6ec8c50c95aff940189242f90de1e4803a314cc62da9ad966689822d",
    ),
    (
        3_000,
        "abd36341546a1fbeaabb3db64390d0730585e64356b7973a1294d6f203699cb7",
    ),
    (
        10_000,
        "37d73212ba84af57a71919fca982b1a83f10a7750f4b05222f6b109c71ab9d9d",
    ),
    (
        20_000,
        "9d4114b210b2cca71082e7f6f5ce65a195a95e82b63756cb2f227a667fe37270",
    ),
];

/// The trace folder, or `None` after reporting `test` as skipped. Written to the real
/// stderr, past the test harness's capture, so that a run without the traces names every
/// test it skipped.
fn traces_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let dir = traces_dir();
    if dir.is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: the shared editing traces are not in ../shared/traces (set QUIRE_TRACES)"
        );
    }
    dir
}

fn automerge_patches(test: &str) -> Option<Vec<Patch>> {
    let dir = traces_or_skip(test)?;
    let trace = load(&dir.join("automerge-paper.json.gz")).unwrap();
    Some(
        trace
            .txns
            .into_iter()
            .flat_map(|t| t.patches)
            .take(20_000)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_automerge_paper_prefix_through_one_composing_client_matches_the_published_hashes() {
    let Some(patches) = automerge_patches(
        "trace_automerge_paper_prefix_through_one_composing_client_matches_the_published_hashes",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut client = open(server.addr, "paper").await;
    replay_checking_prefixes(&mut client, server.addr, &patches).await;
    // Composing: far fewer ops than patches (the only writer: the server's version
    // counts its ops).
    assert!(
        client.version() < patches.len() as u64 / 2,
        "{} ops for {} patches",
        client.version(),
        patches.len()
    );
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_automerge_paper_prefix_through_one_pipelining_client_matches_the_published_hashes() {
    let Some(patches) = automerge_patches(
        "trace_automerge_paper_prefix_through_one_pipelining_client_matches_the_published_hashes",
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    // The client never pipelines: this one is driven over the raw protocol.
    let mut client = Pipelined::open(server.addr, "paper", 8).await;
    replay_checking_prefixes(&mut client, server.addr, &patches).await;
    // One op per patch (the trace has no empty patch).
    assert_eq!(client.ops_sent, patches.len() as u64);
    assert_eq!(client.doc.version(), patches.len() as u64);
    server.stop().await;
}

/// What `replay_checking_prefixes` edits through: the client, or a document
/// pipelined by hand.
trait Replayer {
    async fn replay(&mut self, patch: &Patch);
    /// Applies what the server sent meanwhile, without waiting.
    async fn look(&mut self);
    /// Waits until every edit is acknowledged.
    async fn wait_acked(&mut self);
    fn local_text(&self) -> String;
}

impl Replayer for Opened {
    async fn replay(&mut self, patch: &Patch) {
        self.doc.edit(std::slice::from_ref(patch)).await.unwrap();
    }
    async fn look(&mut self) {
        // The client's task reads and sends by itself.
    }
    async fn wait_acked(&mut self) {
        self.settle().await;
    }
    fn local_text(&self) -> String {
        self.doc.text()
    }
}

impl Replayer for Pipelined {
    async fn replay(&mut self, patch: &Patch) {
        self.edit(std::slice::from_ref(patch)).await;
    }
    async fn look(&mut self) {
        self.poll().await;
    }
    async fn wait_acked(&mut self) {
        self.settle().await;
    }
    fn local_text(&self) -> String {
        self.doc.text()
    }
}

/// Edits `patches` through `client`, checking the published hashes of the prefixes
/// locally and read back from the server.
async fn replay_checking_prefixes(client: &mut impl Replayer, addr: SocketAddr, patches: &[Patch]) {
    let mut checks = AUTOMERGE_PREFIXES.iter().peekable();
    for (i, patch) in patches.iter().enumerate() {
        client.replay(patch).await;
        if i % 64 == 63 {
            client.wait_acked().await;
        } else {
            client.look().await;
        }
        if let Some((n, sha)) = checks.peek() {
            if i + 1 == *n {
                client.wait_acked().await;
                assert_eq!(
                    sha256_hex(client.local_text()),
                    *sha,
                    "local text after {n} patches"
                );
                // Read back from the server by a fresh client.
                let (text, _) = read_back(addr, "paper").await;
                assert_eq!(sha256_hex(text), *sha, "server text after {n} patches");
                checks.next();
            }
        }
    }
    assert!(checks.next().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_server_restart_mid_run_loses_no_acked_op_and_the_run_still_converges() {
    // The trace's first 10,000 patches and their published hash; without the traces,
    // 10,000 seeded synthetic patches and the hash of applying them to a plain string.
    let (patches, expected) = match traces_dir() {
        Some(_) => {
            let patches = automerge_patches("restart").unwrap();
            (
                patches[..10_000].to_vec(),
                AUTOMERGE_PREFIXES[2].1.to_string(),
            )
        }
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "trace_server_restart_mid_run_loses_no_acked_op_and_the_run_still_converges: \
                 no shared traces, running on seeded synthetic edits"
            );
            let patches = synthetic_patches(10_000, 41);
            let text = quire::ot::apply_patches("", &patches).unwrap();
            (patches, sha256_hex(&text))
        }
    };
    let patches = &patches[..];
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let client = open(server.addr, "paper").await;
    let mut events = client.events();
    for (i, patch) in patches[..5_000].iter().enumerate() {
        client.edit(std::slice::from_ref(patch)).await.unwrap();
        if i % 32 == 31 {
            client.synced().await.unwrap();
        }
    }
    // Stop the server with an op possibly in flight; keep editing offline.
    let acked_version = client.version();
    server.stop().await;
    for patch in &patches[5_000..6_000] {
        client.edit(std::slice::from_ref(patch)).await.unwrap();
    }
    let server = start(tmp.path(), "").await;
    let recovered = quire::sequencer::Sequencer::version(&*server.store, "paper");
    assert!(
        recovered >= acked_version,
        "acked ops survived the restart ({recovered} < {acked_version})"
    );
    // The client reconnects to the restarted server, reopens the document at its
    // version and resends what was in flight under the same op ids.
    client.link.point_at(server.addr);
    for (i, patch) in patches[6_000..].iter().enumerate() {
        client.edit(std::slice::from_ref(patch)).await.unwrap();
        if i % 32 == 31 {
            client.synced().await.unwrap();
        }
    }
    client.synced().await.unwrap();
    assert_eq!(sha256_hex(client.text()), expected);
    let (text, _) = read_back(server.addr, "paper").await;
    assert_eq!(sha256_hex(text), expected);
    // It was caught up with the ops it missed, not reloaded from a snapshot (which a
    // server that lost acked ops would have had to send), and connected again once.
    let mut reconnects = 0;
    while let Some(event) = events.try_recv() {
        assert!(!matches!(event, Event::Reloaded { .. }), "{event:?}");
        reconnects += usize::from(event == Event::Connection(ConnectionState::Connected));
    }
    assert_eq!(reconnects, 1);
    client.close().await;
    server.stop().await;
}

/// `n` single-patch edits, valid one after another from an empty text, from `seed`.
fn synthetic_patches(n: usize, seed: u64) -> Vec<Patch> {
    let mut rng = SplitMix(seed);
    let mut len = 0u32;
    (0..n)
        .map(|_| {
            let pos = rng.below(u64::from(len) + 1) as u32;
            let del = if rng.below(4) == 0 {
                rng.below(u64::from((len - pos).min(3)) + 1) as u32
            } else {
                0
            };
            let ins = match rng.below(5) {
                0 => String::new(),
                1 => "\u{1F600}".to_string(),
                _ => ((b'a' + rng.below(26) as u8) as char).to_string(),
            };
            if del == 0 && ins.is_empty() {
                len += 1;
                return Patch::new(pos, 0, "x");
            }
            len = len - del + ins.chars().count() as u32;
            Patch::new(pos, del, ins)
        })
        .collect()
}

const ALPHABET: [char; 5] = ['a', 'b', '\u{1F600}', '\u{10348}', ' '];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_one_document_converge_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(open(server.addr, "shared").await);
    }
    let mut rng = SplitMix(11);
    for _ in 0..400 {
        let c = rng.below(clients.len() as u64) as usize;
        clients[c]
            .edit_with(|view| {
                let len = u64::from(view.len_chars());
                let pos = rng.below(len + 1);
                let del = rng.below((len - pos).min(3) + 1);
                let ins: String = (0..rng.below(4))
                    .map(|_| ALPHABET[rng.below(5) as usize])
                    .collect();
                vec![Patch::new(pos as u32, del as u32, ins)]
            })
            .await
            .unwrap();
        // Sometimes wait for a client's round trip; meanwhile the others edit on
        // whatever version has reached them (stale ones).
        if rng.below(3) == 0 {
            let d = rng.below(clients.len() as u64) as usize;
            clients[d].synced().await.unwrap();
        }
    }
    for client in &clients {
        client.settle().await;
    }
    // Everyone reads until at the server's version.
    let (text, version) = read_back(server.addr, "shared").await;
    for client in clients {
        common::wait_for_version(&client, version).await;
        assert_eq!(client.text(), text);
        client.close().await;
    }
    server.stop().await;
}

/// A bystander keeps editing and syncing while another client misbehaves.
async fn bystander_works(doc: &Opened) {
    doc.edit_with(|view| vec![Patch::new(view.len_chars(), 0, "ok")])
        .await
        .unwrap();
    doc.settle().await;
    assert!(doc.text().ends_with("ok"));
}

async fn expect_error(conn: &mut Connection, code: ErrorCode) {
    loop {
        match conn.recv().await {
            Ok(Envelope {
                message: Message::Error { code: got, message },
                ..
            }) => {
                assert_eq!(got, code, "{message}");
                assert!(!message.is_empty());
                return;
            }
            Ok(Envelope {
                message:
                    Message::Reject {
                        code: got, message, ..
                    },
                ..
            }) => {
                assert_eq!(got, code, "{message}");
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("connection ended before the error {code:?}: {e}"),
        }
    }
}

async fn expect_closed(conn: &mut Connection) {
    loop {
        if conn.recv().await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_other_clients_are_unaffected() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), SECRET).await;
    let token = mint(SECRET, "*", Access::Write);
    let with_token = || client_config(server.addr).token(token.clone());
    let bystander = open_with(with_token(), "doc").await;
    bystander.edit(&[Patch::new(0, 0, "hello")]).await.unwrap();
    bystander.settle().await;
    let before = bystander.text();

    // A token that is not one: refused at the handshake.
    let err = Connection::connect(server.addr, 2, "nope")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("InvalidToken"), "{err}");
    bystander_works(&bystander).await;

    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    // Oversize frame: refused from the length field alone, connection closed.
    let mut bad = Connection::connect(server.addr, 3, &token).await.unwrap();
    bad.send_raw(&(64u32 << 20).to_le_bytes()).await.unwrap();
    expect_error(&mut bad, ErrorCode::FrameTooLarge).await;
    expect_closed(&mut bad).await;
    bystander_works(&bystander).await;

    // Unknown message type.
    let mut bad = Connection::connect(server.addr, 3, &token).await.unwrap();
    bad.send_raw(&frame(&[0x5A, 1, 0, 0, 0])).await.unwrap();
    expect_error(&mut bad, ErrorCode::UnknownType).await;
    expect_closed(&mut bad).await;

    // Malformed: a Ping with a short body.
    let mut bad = Connection::connect(server.addr, 3, &token).await.unwrap();
    bad.send_raw(&frame(&[0x15, 1, 0, 0, 0, 9, 9]))
        .await
        .unwrap();
    expect_error(&mut bad, ErrorCode::Malformed).await;
    expect_closed(&mut bad).await;

    // Invalid UTF-8 in a document id.
    let mut bad = Connection::connect(server.addr, 3, &token).await.unwrap();
    bad.send_raw(&frame(&[0x14, 1, 0, 0, 0, 2, 0, 0xC3, 0x28]))
        .await
        .unwrap();
    expect_error(&mut bad, ErrorCode::BadUtf8).await;
    expect_closed(&mut bad).await;
    bystander_works(&bystander).await;

    // Requests that are refused but leave the connection usable.
    let mut bad = Connection::connect(server.addr, 4, &token).await.unwrap();
    bad.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "x")],
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::UnknownDocument).await;
    bad.send(Message::Open {
        doc: "doc".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    bad.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(9999, 0, "x")],
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::OutOfRange).await;
    // After a refused op, the connection's later ops to the document are refused (they
    // may have been made on top of it) until it opens the document again.
    bad.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 2,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "x")],
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::PipelineConflict).await;
    let reopen = Message::Open {
        doc: "doc".into(),
        known_version: 0,
    };
    bad.send(reopen.clone()).await.unwrap();
    bad.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 2,
        base_version: 0,
        patches: vec![Patch::new(0, 99, "")],
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::OutOfRange).await;
    bad.send(reopen).await.unwrap();
    bad.send(Message::Submit {
        doc: "doc".into(),
        local_seq: 3,
        base_version: 1_000,
        patches: vec![Patch::new(0, 0, "x")],
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::FutureVersion).await;
    bad.send(Message::Open {
        doc: "a\u{7}b".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    expect_error(&mut bad, ErrorCode::InvalidDocId).await;
    bad.send(Message::Ping { nonce: 5 }).await.unwrap();
    loop {
        if let Message::Pong { nonce } = bad.recv().await.unwrap().message {
            assert_eq!(
                nonce, 5,
                "the connection still works after refused requests"
            );
            break;
        }
    }
    // Nothing the bad clients sent changed the document.
    bystander.settle().await;
    let reader = open_with(with_token(), "doc").await;
    assert_eq!(reader.text(), bystander.text());
    assert!(reader.text().starts_with(&before));
    assert!(!reader.text().contains('x'));
    reader.close().await;
    bystander.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_op_is_acked_with_its_original_seq_and_applied_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut conn = Connection::connect(server.addr, 5, "").await.unwrap();
    conn.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    let submit = Message::Submit {
        doc: "d".into(),
        local_seq: 1,
        base_version: 0,
        patches: vec![Patch::new(0, 0, "once")],
    };
    conn.send(submit.clone()).await.unwrap();
    conn.send(submit).await.unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let Message::Ack { seq, .. } = conn.recv().await.unwrap().message {
            acks.push(seq);
        }
    }
    assert_eq!(acks, vec![1, 1]);
    assert_eq!(read_back(server.addr, "d").await, ("once".to_string(), 1));
    server.stop().await;
}

/// A session finds its open documents by comparing ids while it has a few, and in its map
/// beyond: with one to eight documents open, and again as they are closed, an op to each
/// open one is sequenced there and one to a document not open is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_reach_each_open_document_however_many_the_session_has_open() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut conn = Connection::connect(server.addr, 5, "").await.unwrap();
    let name = |i: usize| format!("d{i}");
    let mut local_seq = 0;
    let mut versions = [0u64; 8];
    // Opened one by one, then closed one by one (newest first).
    let counts = (1..=8).chain((1..8).rev());
    for (round, open) in counts.enumerate() {
        if round < 8 {
            conn.send(Message::Open {
                doc: name(open - 1),
                known_version: 0,
            })
            .await
            .unwrap();
        } else {
            conn.send(Message::Close { doc: name(open) }).await.unwrap();
        }
        for (i, version) in versions.iter_mut().enumerate().take(open) {
            local_seq += 1;
            conn.send(Message::Submit {
                doc: name(i),
                local_seq,
                base_version: *version,
                patches: vec![Patch::new(0, 0, "x")],
            })
            .await
            .unwrap();
            let seq = loop {
                match conn.recv().await.unwrap().message {
                    Message::Ack { doc, seq, .. } => {
                        assert_eq!(doc, name(i), "with {open} open");
                        break seq;
                    }
                    Message::Reject {
                        doc, code, message, ..
                    } => {
                        panic!("{doc} with {open} open: {code:?} {message}")
                    }
                    _ => {}
                }
            };
            *version += 1;
            assert_eq!(seq, *version, "{} with {open} open", name(i));
        }
        local_seq += 1;
        conn.send(Message::Submit {
            doc: name(open),
            local_seq,
            base_version: 0,
            patches: vec![Patch::new(0, 0, "x")],
        })
        .await
        .unwrap();
        expect_error(&mut conn, ErrorCode::UnknownDocument).await;
    }
    for (i, version) in versions.iter().enumerate() {
        let text = "x".repeat(*version as usize);
        assert_eq!(read_back(server.addr, &name(i)).await, (text, *version));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_broadcast_and_gone_when_the_client_disconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut watcher = Connection::connect(server.addr, 1, "").await.unwrap();
    watcher
        .send(Message::Open {
            doc: "p".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    let mut cursor = Connection::connect(server.addr, 2, "").await.unwrap();
    cursor
        .send(Message::Open {
            doc: "p".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    let sel = quire::protocol::message::Selection { anchor: 0, head: 0 };
    cursor
        .send(Message::Presence {
            doc: "p".into(),
            selections: vec![sel],
        })
        .await
        .unwrap();
    loop {
        if let Message::PresenceState {
            client_id,
            selections,
            ..
        } = watcher.recv().await.unwrap().message
        {
            assert_eq!((client_id, selections), (2, vec![sel]));
            break;
        }
    }
    drop(cursor);
    loop {
        if let Message::PresenceState {
            client_id,
            selections,
            ..
        } = watcher.recv().await.unwrap().message
        {
            assert_eq!(
                (client_id, selections.len()),
                (2, 0),
                "presence gone on disconnect"
            );
            break;
        }
    }
    assert_eq!(
        server.store.wal().durability().durable_lsn,
        0,
        "presence never reaches the log"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_friendsforever_with_two_emulated_clients_ends_with_the_published_sha256() {
    let Some(dir) = traces_or_skip(
        "trace_friendsforever_with_two_emulated_clients_ends_with_the_published_sha256",
    ) else {
        return;
    };
    let trace = load(&dir.join("friendsforever.json.gz")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let report = quire::trace::replay_concurrent(server.addr, "", &trace, "friends", 500)
        .await
        .unwrap();
    assert_eq!(
        report.unreachable, 0,
        "every txn saw exactly its parent version"
    );
    assert_eq!(report.replicas, 3);
    assert_eq!(report.ops, 26_078);
    assert_eq!(report.text.chars().count(), 21_362);
    assert_eq!(
        sha256_hex(&report.text),
        "4720ec330c91e288c00b71cab318f7a1cdde689dfc401f269c353acfd6cb03f6"
    );
    // And the server's own copy, read back by another client.
    assert_eq!(read_back(server.addr, "friends").await.0, report.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_trace_whose_last_txn_has_no_patches_replays_to_its_end() {
    // Two agents; the last txn merges both branches and edits nothing (the format allows
    // that of the last txn), and one txn has two patches.
    let json = concurrent_trace_json(
        "Hello, big world!",
        &[
            (0, &[], &[(0, 0, "hello world")]),
            (1, &[0], &[(5, 0, ",")]),
            (0, &[0], &[(11, 0, "!")]),
            (1, &[1], &[(7, 0, "big "), (0, 1, "H")]),
            (0, &[2, 3], &[]),
        ],
    );
    let trace = quire::trace::parse(&json).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let report = quire::trace::replay_concurrent(server.addr, "", &trace, "merged", 500)
        .await
        .unwrap();
    assert_eq!(report.ops, 4, "the empty txn sends no op");
    assert_eq!(report.unreachable, 0);
    assert_eq!(report.text, "Hello, big world!");
    assert_eq!(read_back(server.addr, "merged").await.0, report.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_trace_with_a_txn_no_client_can_reach_finishes_counts_it_and_converges() {
    // See `long_lived_branches_trace`: C's txn t6 cannot see exactly its parent version.
    let (json, end) = long_lived_branches_trace();
    let trace = quire::trace::parse(&json).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let report = quire::trace::replay_concurrent(server.addr, "", &trace, "branches", 500)
        .await
        .unwrap();
    assert_eq!(report.unreachable, 1);
    assert_eq!(report.unreachable_by_agent, [0, 0, 1]);
    assert_eq!(report.ops, 8);
    assert_eq!(report.replicas, 4, "three clients and the server's copy");
    // The unreachable txn was rebased onto its client's version, so its intent holds.
    assert_eq!(report.text, end);
    assert_eq!(read_back(server.addr, "branches").await.0, end);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_opening_while_others_edit_catch_up_without_a_gap() {
    // Broadcasts can reach a new subscriber before its snapshot; none may be lost.
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let addr = server.addr;
    let editor = tokio::spawn(async move {
        let writer = open(addr, "busy").await;
        for i in 0..3000u32 {
            writer.edit(&[Patch::new(i, 0, "w")]).await.unwrap();
            // One op in flight, each edit its own op: many seqs while readers open.
            writer.settle().await;
        }
        let version = writer.version();
        writer.close().await;
        version
    });
    let mut readers = Vec::new();
    for _ in 0..12 {
        readers.push(open(addr, "busy").await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let final_version = editor.await.unwrap();
    for reader in readers {
        common::wait_for_version(&reader, final_version).await;
        assert_eq!(final_version, 3000);
        assert_eq!(reader.text(), "w".repeat(3000));
        // A gap (a broadcast lost, or one out of order) fails the client's document
        // and makes it reconnect.
        reader.assert_one_connection();
        reader.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_is_disconnected_and_the_writer_is_unaffected() {
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
    // ~12 MB of broadcasts: more than the socket buffers hold, so the slow reader's
    // bounded queue fills and the server drops it instead of growing without bound.
    let chunk = "z".repeat(4096);
    for _ in 0..3000 {
        writer
            .edit(&[Patch::new(0, 0, chunk.clone())])
            .await
            .unwrap();
        writer.settle().await;
    }
    assert_eq!(writer.version(), 3000, "the writer kept working throughout");
    // The slow connection ends (after whatever was already in flight to it).
    // (The bound is a guard against a hang, not a performance threshold.)
    let mut got = 0u64;
    let mut last = None;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(env) = slow.recv().await {
            got += 1;
            last = Some(env.message);
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow connection was never closed");
    assert!(
        got < 3000,
        "the slow reader was cut off ({got} messages reached it)"
    );
    assert!(
        matches!(
            last,
            Some(Message::Error {
                code: ErrorCode::TooSlow,
                ..
            })
        ),
        "the slow reader is told why (code 8), last got {last:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_fsync_fails_the_client_is_refused_and_nothing_more_is_acked() {
    use quire::wal::vfs::sim::SimFs;
    let fs = SimFs::new();
    let (store, _) =
        LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), store_config())
            .unwrap();
    let store = Arc::new(store);
    let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(store.clone(), ServerConfig::default());
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    let client = open(addr, "d").await;
    client.edit(&[Patch::new(0, 0, "kept")]).await.unwrap();
    client.settle().await;
    fs.fail_syncs_after(0);
    let mut conn = Connection::connect(addr, 2, "").await.unwrap();
    conn.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    for local_seq in 1..=2 {
        conn.send(Message::Submit {
            doc: "d".into(),
            local_seq,
            base_version: 1,
            patches: vec![Patch::new(0, 0, "lost")],
        })
        .await
        .unwrap();
        // (A guard against a hang when no reply comes, not a performance threshold.)
        let told = tokio::time::timeout(
            Duration::from_secs(60),
            expect_error(&mut conn, ErrorCode::StorageFailed),
        )
        .await;
        assert!(
            told.is_ok(),
            "the client was never told that storage failed"
        );
    }
    let _ = tx.send(());
    task.await.unwrap();
    store.close();
    assert_eq!(client.text(), "kept");
}

/// At shutdown every session stops reading at once (its stop signal is fired) and
/// finishes: an idle connection, one with a document open and one that has not sent its
/// `Hello` yet are all closed, and none is left for the grace period to cut off. (If
/// the sessions were not told, each would wait for its next frame, and the server would
/// cut all three off after `SHUTDOWN_GRACE`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_session_without_cutting_any_off() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path(), "").await;
    let mut idle = Connection::connect(server.addr, 1, "").await.unwrap();
    let editing = open(server.addr, "doc").await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // The third connection is accepted (its session runs) before the server stops.
    let mut reader = Connection::connect(server.addr, 3, "").await.unwrap();
    reader
        .send(Message::Open {
            doc: "doc".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    while !matches!(
        reader.recv().await.unwrap().message,
        Message::Snapshot { .. }
    ) {}
    assert_eq!(
        server.stop().await,
        0,
        "sessions cut off at the grace's end"
    );
    expect_closed(&mut idle).await;
    expect_closed(&mut reader).await;
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).await.unwrap();
    editing.close().await;
}
