//! Cluster redirects (protocol.md, Redirects) with two in-process nodes over one shared
//! store: a test sequencer routes documents by a switchable table, so that the owner of
//! a document can change in the middle of a session while its state (text, seqs, op ids
//! seen) stays, as a cluster's handover keeps it.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use common::wrapped::{Rules, Wrapped};
use common::{next_reply, store_config};
use quire::client::connection::Connection;
use quire::op::{OpId, Patch};
use quire::protocol::message::{ErrorCode, Message, Selection};
use quire::sequencer::local::LocalSequencer;
use quire::sequencer::{Owner, Route, RouteError, Sequencer, SubmitError, SubmitOp, Submitted};
use quire::server::{Server, ServerConfig};
use tokio::sync::{oneshot, watch};

/// A guard against a hang (not a performance threshold).
const HANG: Duration = Duration::from_secs(60);

/// Who serves a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owned {
    /// Node `n`; `ready` once it took the document over (until then its `route` waits,
    /// as a node claiming a document in its coordination store would).
    By { node: usize, ready: bool },
    /// Nobody right now.
    Nobody,
    /// Each node says the other one serves it (a misconfigured cluster).
    PingPong,
}

/// The routing table both nodes share.
struct Table {
    owners: RwLock<HashMap<String, Owned>>,
    /// Each node's addresses, once it listens.
    nodes: RwLock<Vec<Owner>>,
    /// Bumped at each change: routes waiting for a takeover look again.
    changed: watch::Sender<u64>,
    /// Documents whose next read fails and leaves them with this owner: a tenure that
    /// ends while a reply is being read (as the cluster's sequencer fails a read once
    /// the node lost the document).
    fail_read: RwLock<HashMap<String, Owned>>,
}

impl Table {
    fn owned(&self, doc: &str) -> Owned {
        let owners = self.owners.read().unwrap();
        owners.get(doc).copied().unwrap_or(Owned::By {
            node: 0,
            ready: true,
        })
    }

    fn set(&self, doc: &str, owned: Owned) {
        self.owners.write().unwrap().insert(doc.to_owned(), owned);
        self.changed.send_modify(|n| *n += 1);
    }

    fn owner(&self, node: usize) -> Owner {
        self.nodes.read().unwrap()[node].clone()
    }

    /// Fails this read of `doc` if one is to fail (see `fail_read`).
    fn read(&self, doc: &str) -> Result<(), Arc<str>> {
        match self.fail_read.write().unwrap().remove(doc) {
            Some(owned) => {
                self.set(doc, owned);
                Err(Arc::from(format!("{doc:?}: this node's tenure ended")))
            }
            None => Ok(()),
        }
    }
}

/// One node's view of the shared store: the real [`LocalSequencer`], answering for the
/// documents the table gives this node and refusing submits to the others with
/// [`SubmitError::Moved`]. Test-only code.
struct Routed {
    me: usize,
    table: Arc<Table>,
}

impl Rules<LocalSequencer> for Routed {
    async fn route(&self, _store: &LocalSequencer, doc_id: &str) -> Result<Route, RouteError> {
        let mut changed = self.table.changed.subscribe();
        loop {
            match self.table.owned(doc_id) {
                Owned::Nobody => {
                    return Err(RouteError::Unavailable(format!(
                        "no node serves {doc_id:?} right now; retry later"
                    )))
                }
                Owned::By { node, .. } if node != self.me => {
                    return Ok(Route::Elsewhere(self.table.owner(node)))
                }
                Owned::By { ready: true, .. } => return Ok(Route::Here),
                Owned::By { ready: false, .. } => {
                    let _ = changed.changed().await;
                }
                Owned::PingPong => return Ok(Route::Elsewhere(self.table.owner(1 - self.me))),
            }
        }
    }

    fn submit(
        &self,
        store: &LocalSequencer,
        doc_id: &str,
        op: &SubmitOp,
    ) -> Result<Submitted, SubmitError> {
        // Held across the check and the submit: a switch waits for a submit that passed
        // the check, and none passes after it.
        let owners = self.table.owners.read().unwrap();
        let owned = owners.get(doc_id).copied().unwrap_or(Owned::By {
            node: 0,
            ready: true,
        });
        match owned {
            Owned::By { node, .. } if node == self.me => store.submit(doc_id, op),
            Owned::By { node, .. } => Err(SubmitError::Moved(self.table.owner(node))),
            Owned::PingPong => Err(SubmitError::Moved(self.table.owner(1 - self.me))),
            Owned::Nobody => Err(SubmitError::Storage(Arc::from("no owner"))),
        }
    }

    fn before_read(&self, doc_id: &str) -> Result<(), Arc<str>> {
        self.table.read(doc_id)
    }
}

struct Node {
    addr: SocketAddr,
    server: Arc<Server<Wrapped<LocalSequencer, Routed>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<usize>,
}

/// Two nodes serving one store.
struct Cluster {
    nodes: Vec<Node>,
    table: Arc<Table>,
    store: Arc<LocalSequencer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LocalSequencer::open(dir.path(), store_config()).unwrap();
        let store = Arc::new(store);
        let table = Arc::new(Table {
            owners: RwLock::new(HashMap::new()),
            nodes: RwLock::new(Vec::new()),
            changed: watch::channel(0).0,
            fail_read: RwLock::new(HashMap::new()),
        });
        let mut nodes = Vec::new();
        for me in 0..2 {
            let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            table.nodes.write().unwrap().push(Owner {
                addr: addr.to_string().into(),
                // Not served by these nodes: what a Redirect carries for WebSockets.
                ws_url: format!("ws://node{me}.test:7421/ws").into(),
            });
            let routed = Wrapped {
                store: store.clone(),
                rules: Routed {
                    me,
                    table: table.clone(),
                },
            };
            let server = Server::new(Arc::new(routed), ServerConfig::default());
            let (tx, rx) = oneshot::channel();
            let task = tokio::spawn(server.clone().serve(listener, async move {
                let _ = rx.await;
            }));
            nodes.push(Node {
                addr,
                server,
                stop: Some(tx),
                task,
            });
        }
        Cluster {
            nodes,
            table,
            store,
            _dir: dir,
        }
    }

    fn addr(&self, node: usize) -> SocketAddr {
        self.nodes[node].addr
    }

    /// Hands `doc` over to node `to`, as a cluster does: the old owner sequences
    /// nothing more (its submits get `Moved` at once), everything it sequenced becomes
    /// durable, its sessions are redirected, and only then does the new owner serve it
    /// (its `Open`s wait meanwhile).
    async fn switch(&self, doc: &str, to: usize) {
        let from = match self.table.owned(doc) {
            Owned::By { node, .. } => Some(node),
            Owned::Nobody | Owned::PingPong => None,
        };
        self.table.set(
            doc,
            Owned::By {
                node: to,
                ready: false,
            },
        );
        // Every op sequenced by the old owner is durable before the new one starts.
        let _ = self.store.read(doc).await.unwrap();
        if let Some(from) = from.filter(|&f| f != to) {
            self.nodes[from]
                .server
                .redirect_document(doc, self.table.owner(to));
        }
        self.table.set(
            doc,
            Owned::By {
                node: to,
                ready: true,
            },
        );
    }

    /// The document's text as the store has it (durable).
    async fn text(&self, doc: &str) -> String {
        self.store
            .read(doc)
            .await
            .unwrap()
            .map(|v| v.text)
            .unwrap_or_default()
    }

    async fn stop(mut self) {
        for node in &mut self.nodes {
            let _ = node.stop.take().unwrap().send(());
        }
        for node in self.nodes.drain(..) {
            node.task.await.unwrap();
        }
        self.store.close();
    }
}

async fn connect(addr: SocketAddr) -> Connection {
    Connection::connect(addr, 0, "").await.unwrap()
}

/// Reads the whole reply to an `Open` (snapshot pieces, then `Ops` frames): the text
/// and version, or the first message that is not part of such a reply.
async fn open_reply(conn: &mut Connection) -> Result<(String, u64), Message> {
    let mut text = String::new();
    let mut version = 0;
    loop {
        match next_reply(conn).await {
            Message::Snapshot {
                text: piece,
                version: v,
                ..
            } => {
                text.push_str(&piece);
                version = v;
            }
            Message::Ops { ops, more, .. } => {
                for op in ops {
                    let mut rope = quire::text::Text::from(text.as_str());
                    rope.apply(&op.patches).unwrap();
                    text = rope.to_string();
                    version = op.seq;
                }
                if !more {
                    return Ok((text, version));
                }
            }
            other => return Err(other),
        }
    }
}

fn submit(doc: &str, local_seq: u64, base_version: u64, ins: &str) -> Message {
    Message::Submit {
        doc: doc.into(),
        local_seq,
        base_version,
        patches: vec![Patch::new(0, 0, ins)],
    }
}

fn redirect_to(cluster: &Cluster, doc: &str, node: usize) -> Message {
    Message::Redirect {
        doc: doc.into(),
        addr: cluster.addr(node).to_string(),
        ws_url: format!("ws://node{node}.test:7421/ws"),
    }
}

#[tokio::test]
async fn every_request_about_a_document_served_elsewhere_gets_a_redirect_with_both_addresses() {
    let cluster = Cluster::start().await;
    cluster.table.set(
        "on-b",
        Owned::By {
            node: 1,
            ready: true,
        },
    );
    let mut a = connect(cluster.addr(0)).await;
    let expected = redirect_to(&cluster, "on-b", 1);

    let requests = [
        Message::Open {
            doc: "on-b".into(),
            known_version: 0,
        },
        Message::Fetch {
            doc: "on-b".into(),
            after_seq: 0,
            limit: 10,
        },
        Message::Presence {
            doc: "on-b".into(),
            selections: vec![Selection { anchor: 0, head: 0 }],
        },
        submit("on-b", 1, 0, "x"),
    ];
    for request in requests {
        let rid = a.send(request.clone()).await.unwrap();
        let reply = tokio::time::timeout(HANG, a.recv()).await.unwrap().unwrap();
        assert_eq!(reply.request_id, rid, "{request:?}");
        assert_eq!(reply.message, expected, "{request:?}");
    }

    // The owner serves it; nothing was applied by the redirected submit.
    let mut b = connect(cluster.addr(1)).await;
    b.send(Message::Open {
        doc: "on-b".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    assert_eq!(open_reply(&mut b).await.unwrap(), (String::new(), 0));

    // A document of node 0 is served at node 0 as on a single node.
    a.send(Message::Open {
        doc: "on-a".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    assert_eq!(open_reply(&mut a).await.unwrap(), (String::new(), 0));
    a.send(submit("on-a", 1, 0, "a")).await.unwrap();
    assert!(matches!(
        next_reply(&mut a).await,
        Message::Ack {
            seq: 1,
            local_seq: 1,
            ..
        }
    ));
    cluster.stop().await;
}

#[tokio::test]
async fn a_document_without_an_owner_gets_code_33_and_the_connection_stays_open() {
    let cluster = Cluster::start().await;
    cluster.table.set("orphan", Owned::Nobody);
    let mut a = connect(cluster.addr(0)).await;
    a.send(Message::Open {
        doc: "orphan".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    match next_reply(&mut a).await {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Unavailable),
        other => panic!("expected Error 33, got {other:?}"),
    }
    a.send(submit("orphan", 1, 0, "x")).await.unwrap();
    match next_reply(&mut a).await {
        Message::Reject {
            code, local_seq, ..
        } => {
            assert_eq!(code, ErrorCode::Unavailable);
            assert_eq!(local_seq, 1);
        }
        other => panic!("expected Reject 33, got {other:?}"),
    }
    a.send(Message::Ping { nonce: 5 }).await.unwrap();
    assert_eq!(next_reply(&mut a).await, Message::Pong { nonce: 5 });

    // Once it has an owner again, the same connection opens it.
    cluster.switch("orphan", 0).await;
    a.send(Message::Open {
        doc: "orphan".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    assert_eq!(open_reply(&mut a).await.unwrap(), (String::new(), 0));
    cluster.stop().await;
}

#[tokio::test]
async fn a_document_lost_while_its_reply_is_read_gets_a_redirect_or_33_not_a_storage_error() {
    let cluster = Cluster::start().await;
    let mut a = connect(cluster.addr(0)).await;
    a.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    assert_eq!(open_reply(&mut a).await.unwrap(), (String::new(), 0));
    a.send(submit("d", 1, 0, "abc")).await.unwrap();
    let ack = next_reply(&mut a).await;
    assert!(matches!(ack, Message::Ack { seq: 1, .. }), "{ack:?}");
    let fail_next_read = |owned: Owned| {
        cluster
            .table
            .fail_read
            .write()
            .unwrap()
            .insert("d".into(), owned);
    };
    let to_node_1 = Owned::By {
        node: 1,
        ready: true,
    };
    let at_node_0 = Owned::By {
        node: 0,
        ready: true,
    };

    // An `Open` whose snapshot read fails as the tenure ends: sent to the new owner.
    fail_next_read(to_node_1);
    let mut b = connect(cluster.addr(0)).await;
    let rid = b
        .send(Message::Open {
            doc: "d".into(),
            known_version: 0,
        })
        .await
        .unwrap();
    let reply = b.recv().await.unwrap();
    assert_eq!(reply.request_id, rid);
    assert_eq!(reply.message, redirect_to(&cluster, "d", 1));

    // A `Fetch` whose read fails as the tenure ends with no owner yet: code 33.
    cluster.switch("d", 0).await;
    fail_next_read(Owned::Nobody);
    b.send(Message::Fetch {
        doc: "d".into(),
        after_seq: 0,
        limit: 10,
    })
    .await
    .unwrap();
    match next_reply(&mut b).await {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::Unavailable, "{message}")
        }
        other => panic!("expected Error 33, got {other:?}"),
    }

    // A read that fails while the node keeps the document is its storage's failure.
    cluster.switch("d", 0).await;
    fail_next_read(at_node_0);
    b.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    match next_reply(&mut b).await {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::StorageFailed, "{message}");
            assert!(message.contains("tenure ended"), "{message}");
        }
        other => panic!("expected Error 30, got {other:?}"),
    }
    // And the connection goes on: the document opens once reads succeed.
    b.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    assert_eq!(open_reply(&mut b).await.unwrap(), ("abc".to_string(), 1));
    cluster.stop().await;
}

/// The ops a connection saw answered for `doc` on one node until a `Redirect`: the
/// acks (local seq → seq), and whether a `Redirect` to `to` came (after it, nothing of
/// the document may come).
async fn answers_until_redirect(
    conn: &mut Connection,
    doc: &str,
    expected: &Message,
    acks: &mut HashMap<u64, u64>,
) {
    loop {
        let env = tokio::time::timeout(HANG, conn.recv())
            .await
            .expect("a Redirect comes")
            .unwrap();
        match env.message {
            Message::Ack { local_seq, seq, .. } => {
                assert!(acks.insert(local_seq, seq).is_none(), "acked once");
            }
            m @ Message::Redirect { .. } => {
                assert_eq!(&m, expected);
                return;
            }
            Message::Remote { .. } | Message::PresenceState { .. } => {}
            other => panic!("unexpected on {doc}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn switching_the_owner_mid_session_redirects_open_sessions_and_resends_are_deduplicated() {
    let cluster = Cluster::start().await;
    let doc = "busy";
    let mut writer = connect(cluster.addr(0)).await;
    let mut reader = connect(cluster.addr(0)).await;
    for conn in [&mut writer, &mut reader] {
        conn.send(Message::Open {
            doc: doc.into(),
            known_version: 0,
        })
        .await
        .unwrap();
        assert_eq!(open_reply(conn).await.unwrap(), (String::new(), 0));
    }
    reader
        .send(Message::Presence {
            doc: doc.into(),
            selections: vec![Selection { anchor: 0, head: 0 }],
        })
        .await
        .unwrap();

    // Ops pipelined on node 0 (each made on top of the one before, base 0), and the
    // document handed to node 1 while they are on their way.
    const OPS: u64 = 30;
    for local_seq in 1..=OPS {
        writer
            .queue(submit(doc, local_seq, 0, &format!("<{local_seq}>")))
            .unwrap();
    }
    writer.flush().await.unwrap();
    cluster.switch(doc, 1).await;
    let expected = redirect_to(&cluster, doc, 1);

    // Both sessions are redirected; the writer saw acks only before its redirect.
    let mut acks = HashMap::new();
    answers_until_redirect(&mut writer, doc, &expected, &mut acks).await;
    let mut none = HashMap::new();
    answers_until_redirect(&mut reader, doc, &expected, &mut none).await;
    assert!(none.is_empty());
    let acked_at_0 = acks.clone();

    // An op sent to the old owner afterwards is answered with a Redirect, not applied.
    let rid = writer.send(submit(doc, OPS + 1, 0, "late")).await.unwrap();
    loop {
        let env = tokio::time::timeout(HANG, writer.recv())
            .await
            .unwrap()
            .unwrap();
        match env.message {
            m @ Message::Redirect { .. } if env.request_id == rid => {
                assert_eq!(m, expected);
                break;
            }
            // Redirects answering the pipelined submits that reached the node after
            // the handover.
            Message::Redirect { .. } => assert_ne!(env.request_id, 0),
            other => panic!("nothing but redirects of {doc} after the first: {other:?}"),
        }
    }

    // At the new owner: catch up, then resend every unacknowledged op under its id.
    let mut moved = connect(cluster.addr(1)).await;
    moved
        .send(Message::Open {
            doc: doc.into(),
            known_version: 0,
        })
        .await
        .unwrap();
    let (_, version) = open_reply(&mut moved).await.unwrap();
    assert!(version <= OPS);
    for local_seq in (1..=OPS).filter(|s| !acks.contains_key(s)) {
        moved
            .queue(submit(doc, local_seq, 0, &format!("<{local_seq}>")))
            .unwrap();
    }
    moved.flush().await.unwrap();
    while acks.len() < OPS as usize {
        match next_reply(&mut moved).await {
            Message::Ack { local_seq, seq, .. } => {
                assert!(acks.insert(local_seq, seq).is_none(), "acked once");
            }
            other => panic!("unexpected reply at the new owner: {other:?}"),
        }
    }

    // Each op is in the document once, in order (each made on top of the one before),
    // with the seqs 1..=OPS, those acknowledged at the old owner unchanged.
    let mut seqs: Vec<u64> = acks.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=OPS).collect::<Vec<_>>());
    for (local_seq, seq) in &acked_at_0 {
        assert_eq!(acks[local_seq], *seq);
    }
    let expected_text: String = (1..=OPS).rev().map(|i| format!("<{i}>")).collect();
    assert_eq!(cluster.text(doc).await, expected_text);
    cluster.stop().await;
}

/// Waits until `doc` (a client's handle) has applied every op the store has.
async fn caught_up(cluster: &Cluster, doc: &quire::client::DocHandle) {
    tokio::time::timeout(HANG, async {
        loop {
            doc.synced().await.unwrap();
            if doc.version() == cluster.store.version(doc.name()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} catches up", doc.name()));
}

/// Edits `doc` `n` times, each inserting a token of its own between two tokens near the
/// middle of the text (never inside one: a token stays whole, so it can be counted).
async fn edit_tokens(doc: &quire::client::DocHandle, who: &str, n: usize) {
    for i in 0..n {
        let token = format!("[{who}{i}]");
        doc.edit_with(|v| {
            let text: Vec<char> = v.text().chars().collect();
            let at = (text.len() / 2..text.len())
                .find(|&i| text[i] == '[')
                .unwrap_or(text.len());
            vec![Patch::new(at as u32, 0, &token)]
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_follows_redirects_over_several_connections_and_every_edit_lands_once() {
    let cluster = Cluster::start().await;
    cluster.table.set(
        "doc-b",
        Owned::By {
            node: 1,
            ready: true,
        },
    );
    // X's home is node 0, Y's node 1.
    let x = quire::client::Client::connect(common::client_config(cluster.addr(0)))
        .await
        .unwrap();
    let y = quire::client::Client::connect(common::client_config(cluster.addr(1)))
        .await
        .unwrap();
    // Connected first: `open` then returns once the document is loaded from its owner.
    x.wait_connected().await.unwrap();
    y.wait_connected().await.unwrap();
    let xa = x.open("doc-a").await.unwrap();
    let xb = x.open("doc-b").await.unwrap();
    let x_busy = x.open("busy").await.unwrap();
    let yb = y.open("doc-b").await.unwrap();
    let y_busy = y.open("busy").await.unwrap();
    // X reached doc-b over a second connection, to node 1 (Y is the other client
    // there), and Y reached busy over one to node 0.
    assert_eq!(cluster.nodes[1].server.connected_clients(), 2);
    assert_eq!(cluster.nodes[0].server.connected_clients(), 2);

    const EDITS: usize = 60;
    let switching = async {
        // The busy document changes owner several times while both clients edit it.
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(7)).await;
            cluster.switch("busy", (i + 1) % 2).await;
        }
    };
    tokio::join!(
        edit_tokens(&xa, "xa", EDITS),
        edit_tokens(&xb, "xb", EDITS),
        edit_tokens(&x_busy, "x", EDITS),
        edit_tokens(&yb, "yb", EDITS),
        edit_tokens(&y_busy, "y", EDITS),
        switching,
    );

    for doc in [&xa, &xb, &x_busy, &yb, &y_busy] {
        caught_up(&cluster, doc).await;
    }
    for (name, handles, writers) in [
        ("doc-a", vec![&xa], vec!["xa"]),
        ("doc-b", vec![&xb, &yb], vec!["xb", "yb"]),
        ("busy", vec![&x_busy, &y_busy], vec!["x", "y"]),
    ] {
        let text = cluster.text(name).await;
        for handle in handles {
            assert_eq!(handle.text(), text, "{name} converged");
        }
        // Every edit is there exactly once.
        for who in writers {
            for i in 0..EDITS {
                let token = format!("[{who}{i}]");
                assert_eq!(text.matches(&token).count(), 1, "{token} in {name}: {text}");
            }
        }
        // And every op in the history once: no op id twice.
        let version = cluster.store.version(name);
        let ops = cluster
            .store
            .ops_after(name, 0, version as usize)
            .unwrap()
            .unwrap();
        assert_eq!(ops.len() as u64, version);
        let mut ids: Vec<OpId> = ops.iter().map(|op| op.id).collect();
        ids.sort_by_key(|id| (id.client_id, id.local_seq));
        ids.dedup();
        assert_eq!(
            ids.len() as u64,
            version,
            "{name}: an op id twice in the log"
        );
    }
    // The busy document ended at node 0 after its switches: Y followed it there, and
    // X came back to its home connection.
    assert!(matches!(
        cluster.table.owned("busy"),
        Owned::By { node: 0, .. }
    ));
    drop((xa, xb, x_busy, yb, y_busy));
    x.shutdown().await;
    y.shutdown().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_client_sent_round_in_circles_backs_off_and_gets_there_once_the_cluster_agrees() {
    let cluster = Cluster::start().await;
    cluster.table.set("loop", Owned::PingPong);
    let x = quire::client::Client::connect(common::client_config(cluster.addr(0)))
        .await
        .unwrap();
    x.wait_connected().await.unwrap();
    // Returns once the client gives up following (offline: the local state).
    let (doc, mut events) = x.open_with_events("loop").await.unwrap();
    doc.edit(&[Patch::new(0, 0, "kept")]).await.unwrap();
    // It reconnects with a backoff that keeps growing while the document makes no
    // progress: no attempt count goes back to 1 in between.
    let attempts = common::reconnect_attempts(&mut events, 4).await;
    assert_eq!(attempts, vec![1, 2, 3, 4]);
    assert!(!doc.is_synced());

    cluster.switch("loop", 1).await;
    tokio::time::timeout(HANG, doc.synced())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cluster.text("loop").await, "kept");
    drop(doc);
    x.shutdown().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_redirect_to_the_home_node_by_another_name_is_carried_on_the_home_connection() {
    let cluster = Cluster::start().await;
    cluster.table.set(
        "moving",
        Owned::By {
            node: 1,
            ready: true,
        },
    );
    // The home node is configured by name; the nodes advertise `127.0.0.1:port`.
    let mut config = common::client_config(cluster.addr(0));
    config.addr = format!("localhost:{}", cluster.addr(0).port());
    let x = quire::client::Client::connect(config).await.unwrap();
    x.wait_connected().await.unwrap();
    let (stay, mut events) = x.open_with_events("stay").await.unwrap();
    let moving = x.open("moving").await.unwrap();
    assert_eq!(cluster.nodes[1].server.connected_clients(), 1);
    edit_tokens(&moving, "m", 3).await;
    caught_up(&cluster, &moving).await;
    while events.try_recv().is_some() {}

    // Back to the home node: its `Redirect` names it as it advertises itself.
    cluster.switch("moving", 0).await;
    edit_tokens(&moving, "n", 3).await;
    edit_tokens(&stay, "s", 3).await;
    caught_up(&cluster, &moving).await;
    caught_up(&cluster, &stay).await;
    // The home connection was never lost (a second connection to the same node with
    // this client's id would have replaced it, code 11): no state change at all.
    while let Some(event) = events.try_recv() {
        assert!(
            !matches!(event, quire::client::Event::Connection(_)),
            "{event:?}"
        );
    }
    assert_eq!(x.state(), quire::client::ConnectionState::Connected);
    assert_eq!(cluster.nodes[0].server.connected_clients(), 1);
    for (name, doc, who) in [("moving", &moving, ["m", "n"]), ("stay", &stay, ["s", "s"])] {
        let text = cluster.text(name).await;
        assert_eq!(doc.text(), text);
        for w in who {
            for i in 0..3 {
                assert_eq!(text.matches(&format!("[{w}{i}]")).count(), 1, "{text}");
            }
        }
    }
    drop((stay, moving));
    x.shutdown().await;
    cluster.stop().await;
}

#[tokio::test]
async fn a_node_that_never_answers_a_redirected_client_holds_up_only_its_own_documents() {
    let cluster = Cluster::start().await;
    // A third node that takes connections and never answers their `Hello` (stopped, or
    // cut off after accepting), as the owner of `far`.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cluster.table.nodes.write().unwrap().push(Owner {
        addr: silent.local_addr().unwrap().to_string().into(),
        ws_url: "".into(),
    });
    let (reached, mut reached_rx) = tokio::sync::mpsc::unbounded_channel();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
            let _ = reached.send(());
        }
    });
    cluster.table.set(
        "far",
        Owned::By {
            node: 2,
            ready: true,
        },
    );
    let mut config = common::client_config(cluster.addr(0));
    // The client gives a silent node an hour: far longer than this test waits.
    config.timeout = Duration::from_secs(3600);
    let x = quire::client::Client::connect(config).await.unwrap();
    x.wait_connected().await.unwrap();
    let near = x.open("near").await.unwrap();
    // Connected, `open` returns once the document is loaded from its owner: not yet.
    let far = tokio::spawn({
        let x = x.clone();
        async move { x.open("far").await }
    });
    reached_rx.recv().await.unwrap();

    // Meanwhile the documents of the nodes that answer are served: an edit is sent and
    // acknowledged, another document is opened and loaded.
    near.edit(&[Patch::new(0, 0, "near")]).await.unwrap();
    tokio::time::timeout(HANG, near.synced())
        .await
        .expect("an edit of a document of the home node is held up by another node")
        .unwrap();
    let also = tokio::time::timeout(HANG, x.open("also"))
        .await
        .expect("an open of a document of the home node is held up by another node")
        .unwrap();
    also.edit(&[Patch::new(0, 0, "also")]).await.unwrap();
    tokio::time::timeout(HANG, also.synced())
        .await
        .unwrap()
        .unwrap();
    assert!(!far.is_finished(), "far opened without its node answering");
    assert_eq!(x.state(), quire::client::ConnectionState::Connected);

    // Its node gone (the connection dropped), and the document served by node 1: the
    // client starts again from home and reaches it there.
    cluster.table.set(
        "far",
        Owned::By {
            node: 1,
            ready: true,
        },
    );
    held.abort();
    let far = tokio::time::timeout(HANG, far)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    far.edit(&[Patch::new(0, 0, "far")]).await.unwrap();
    tokio::time::timeout(HANG, far.synced())
        .await
        .unwrap()
        .unwrap();
    for (name, doc) in [("near", &near), ("also", &also), ("far", &far)] {
        assert_eq!(cluster.text(name).await, name);
        assert_eq!(doc.text(), name);
    }
    drop((near, also, far));
    x.shutdown().await;
    cluster.stop().await;
}
