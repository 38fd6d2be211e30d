//! The cluster's sequencer on two nodes over one in-memory stand-in for etcd: a
//! document is placed on the node that claims it, its ops reach the journal before
//! they are acknowledged, and when its owner's lease expires the other node claims it,
//! loads it from the store (never from its own log) and answers resends with their
//! original seqs; the old owner acknowledges nothing more of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use quire::cluster::mem_store::MemStore;
use quire::cluster::ownership::{Keys, Member};
use quire::cluster::replicator::{Clock, Drive, LeaseTiming, Replicator};
use quire::op::{OpId, Patch};
use quire::sequencer::cluster::ClusterSequencer;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{fingerprint, Owner, Route, Sequencer, SubmitError, SubmitOp, Submitted};

/// Long, so that the keep-alive threads (every third of it, in real time) never run
/// during a test: the test renews by hand and moves the store's clock itself.
const TTL: Duration = Duration::from_secs(600);

/// Ops per cluster snapshot (written when the test says).
const SNAPSHOT_EVERY: u64 = 5;

/// A clock the test moves (a node's own clock, apart from the store's).
#[derive(Default)]
struct TestClock(AtomicU64);

impl TestClock {
    fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

struct Node {
    seq: ClusterSequencer<Arc<MemStore>>,
    clock: Arc<TestClock>,
    addr: String,
    _dir: tempfile::TempDir,
}

fn node(store: &Arc<MemStore>, name: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (local, _) = LocalSequencer::open(dir.path(), LocalConfig::default()).unwrap();
    let addr = format!("{name}.example:7000");
    let member =
        Member::register(store.clone(), Keys::new("/quire"), name, &addr, TTL).expect("register");
    let clock = Arc::new(TestClock::default());
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let mut timing = LeaseTiming::for_ttl(TTL);
    timing.retry_every = Duration::from_millis(1);
    let replicator = Replicator::start(
        member,
        clock.clone(),
        timing,
        Drive::Threads,
        Box::new(move |loss| {
            let _ = tx.lock().unwrap().send(loss);
        }),
    );
    let here = Owner {
        addr: Arc::from(addr.as_str()),
        ws_url: Arc::from(""),
    };
    Node {
        seq: ClusterSequencer::new(local, replicator, rx, here, SNAPSHOT_EVERY, false),
        clock,
        addr,
        _dir: dir,
    }
}

fn op(client: u64, local_seq: u64, base: u64, ins: &str) -> SubmitOp {
    let patches = vec![Patch::new(0, 0, ins)];
    SubmitOp {
        op_id: OpId {
            client_id: client,
            local_seq,
        },
        base_version: base,
        expected_version: base,
        fingerprint: fingerprint(base, &patches),
        patches,
    }
}

fn route(node: &Node, doc: &str) -> Route {
    node.seq.place(doc).expect("placed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_fails_over_with_every_acknowledged_op_and_resends_answered() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    assert_eq!(route(&a, "d"), Route::Here);
    match route(&b, "d") {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, a.addr),
        Route::Here => panic!("two owners"),
    }
    // Five ops on a, each acknowledged once in the journal and on a's disk.
    for i in 1..=5u64 {
        let Submitted::Applied { seq, ticket } =
            a.seq.submit("d", op(1, i, i - 1, &i.to_string())).unwrap()
        else {
            panic!("a new op");
        };
        assert_eq!(seq, i);
        a.seq.wait_durable(ticket).await.expect("acknowledged");
    }
    let text_at_a = a.seq.read("d").await.unwrap().unwrap();
    assert_eq!((text_at_a.text.as_str(), text_at_a.version), ("54321", 5));
    // a stops renewing (a pause), b renews: a's lease expires in the store, and a's own
    // clock says so too.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    a.clock.advance(TTL);
    assert!(matches!(
        a.seq.submit("d", op(1, 6, 5, "x")),
        Err(SubmitError::Moved(_))
    ));
    // b claims it and loads it from the store.
    assert_eq!(route(&b, "d"), Route::Here);
    let at_b = b.seq.read("d").await.unwrap().unwrap();
    assert_eq!(at_b, text_at_a);
    // A resend of an acknowledged op gets its original seq; a new op goes on.
    match b.seq.submit("d", op(1, 3, 2, "3")).unwrap() {
        Submitted::Duplicate { seq, ticket } => {
            assert_eq!(seq, 3);
            b.seq.wait_durable(ticket).await.expect("durable");
        }
        other => panic!("{other:?}"),
    }
    let Submitted::Applied { seq: 6, ticket } = b.seq.submit("d", op(2, 1, 5, "b")).unwrap() else {
        panic!("op 6");
    };
    b.seq.wait_durable(ticket).await.unwrap();
    assert_eq!(b.seq.read("d").await.unwrap().unwrap().text, "b54321");
    // a hears of its loss, evicts the document and says where it went.
    let mut moved = a.seq.moved().unwrap();
    assert!(a.seq.handle_losses() >= 1);
    let (doc, owner) = moved.try_recv().expect("a move");
    assert_eq!((&*doc, &*owner.addr), ("d", b.addr.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_replaced_behind_its_back_acknowledges_nothing_and_writes_nothing() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    assert_eq!(route(&a, "d"), Route::Here);
    let Submitted::Applied { ticket, .. } = a.seq.submit("d", op(1, 1, 0, "a")).unwrap() else {
        panic!("op 1");
    };
    a.seq.wait_durable(ticket).await.unwrap();
    // The store expires a's lease, but a's own clock has not moved (a clock running
    // slow, or a process paused between its check and its write): it still believes it
    // owns the document. b claims it.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    assert_eq!(route(&b, "d"), Route::Here);
    let Submitted::Applied {
        ticket: b_ticket, ..
    } = b.seq.submit("d", op(2, 1, 1, "b")).unwrap()
    else {
        panic!("b's op");
    };
    b.seq.wait_durable(b_ticket).await.unwrap();
    // a sequences a late op: the fence refuses its journal write, and it is never
    // acknowledged.
    let Ok(Submitted::Applied { ticket, .. }) = a.seq.submit("d", op(1, 2, 1, "late")) else {
        panic!("a still believes it owns the document");
    };
    assert!(a.seq.wait_durable(ticket).await.is_err());
    // Once it heard of the loss, it sequences nothing more of it.
    a.seq.handle_losses();
    assert!(matches!(
        a.seq.submit("d", op(1, 3, 1, "later")),
        Err(SubmitError::Moved(_))
    ));
    // The journal has b's op at seq 2, not a's.
    let c = node(&store, "c");
    store.advance(TTL / 2 + Duration::from_secs(1)); // b's lease (b renewed at TTL / 2)
    assert_eq!(route(&c, "d"), Route::Here);
    assert_eq!(c.seq.read("d").await.unwrap().unwrap().text, "ba");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_unique_across_nodes() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let mut ids = std::collections::HashSet::new();
    for _ in 0..1000 {
        assert!(ids.insert(a.seq.assign_client_id().unwrap()));
        assert!(ids.insert(b.seq.assign_client_id().unwrap()));
    }
    assert!(ids.iter().all(|id| *id >= 1 << 63));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_journal_and_a_new_owner_keeps_history_and_dedupe() {
    use quire::cluster::store::Store;
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    assert_eq!(route(&a, "d"), Route::Here);
    const OPS: u64 = 23;
    for i in 1..=OPS {
        let Submitted::Applied { ticket, .. } = a
            .seq
            .submit("d", op(1, i, i - 1, &format!("<{i}>")))
            .unwrap()
        else {
            panic!("op {i}");
        };
        a.seq.wait_durable(ticket).await.unwrap();
        a.seq.write_snapshots();
    }
    let keys = Keys::new("/quire");
    let count = |prefix: String| store.get_prefix(&prefix, None, 1000).unwrap().kvs.len() as u64;
    let (journal, snapshots) = (count(keys.journal("d")), count(keys.snapshots("d")));
    assert_eq!(snapshots, 2, "the newest snapshot and the one before it");
    assert!(
        journal <= 2 * SNAPSHOT_EVERY,
        "{journal} journal entries: truncated through the previous snapshot"
    );
    let at_a = a.seq.read("d").await.unwrap().unwrap();
    // Failover to b.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    a.clock.advance(TTL);
    assert_eq!(route(&b, "d"), Route::Here);
    assert_eq!(b.seq.read("d").await.unwrap().unwrap(), at_a);
    // An op long covered by a snapshot (and gone from the journal) is still known.
    match b.seq.submit("d", op(1, 2, 1, "<2>")).unwrap() {
        Submitted::Duplicate { seq, .. } => assert_eq!(seq, 2),
        other => panic!("{other:?}"),
    }
    // b has at least a snapshot interval of history to transform late ops over.
    let history = b
        .seq
        .ops_after("d", OPS - SNAPSHOT_EVERY, 100)
        .unwrap()
        .expect("the ops since the older snapshot are kept");
    assert_eq!(history.len() as u64, SNAPSHOT_EVERY);
    assert_eq!(history.last().unwrap().seq, OPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_documents_to_the_preferred_other_node() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let mut moved = a.seq.moved().unwrap();
    assert_eq!(route(&a, "d"), Route::Here);
    let mut tickets = Vec::new();
    for i in 1..=4u64 {
        let Submitted::Applied { ticket, .. } =
            a.seq.submit("d", op(1, i, i - 1, &i.to_string())).unwrap()
        else {
            panic!("op {i}");
        };
        tickets.push(ticket);
    }
    // Drained with ops still queued for the journal: they finish first.
    assert_eq!(a.seq.drain(), 1);
    for ticket in tickets {
        a.seq
            .wait_durable(ticket)
            .await
            .expect("acknowledged before the handover");
    }
    let (doc, owner) = moved.try_recv().expect("the sessions are redirected");
    assert_eq!(
        (&*doc, &*owner.addr),
        ("d", b.addr.as_str()),
        "to the only other node"
    );
    // Nothing more here; a new Open is sent on.
    assert!(matches!(
        a.seq.submit("d", op(1, 5, 4, "x")),
        Err(SubmitError::Moved(_))
    ));
    match route(&a, "d") {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, b.addr),
        Route::Here => panic!("a drained node places nothing"),
    }
    // b claims it at once (released, not expired) with every op.
    assert_eq!(route(&b, "d"), Route::Here);
    assert_eq!(b.seq.read("d").await.unwrap().unwrap().text, "4321");
}

/// A `Submit` that reaches the server after the drain released a document and before the
/// server redirected the document's sessions (`quire serve` does that a moment later,
/// when it reads the drain's message from [`ClusterSequencer::moved`]; held back here, so
/// the window stays open) is redirected, as one sent before the drain is: the client is
/// told nothing but `Redirect` (the acceptance for a drain).
///
/// FAILS at this commit, so ignored (run it with `--ignored`): the submit gets `Reject`
/// 17, "base version 1 is ahead of the document (version 0)": `Document::precheck`
/// (src/server/document.rs) compares the op's base with the sequencer's version of the
/// document, 0 once the drain evicted it, before anything asks whether the document is
/// still served here. tests/cluster_handoff.rs's
/// `draining_a_node_under_load_shows_clients_nothing_but_redirects` meets it with quire
/// processes in about a third of its runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails at this commit: a submit in a drain's window gets Reject 17 (see its notes)"]
async fn a_submit_between_the_drain_and_its_redirect_is_redirected() {
    use quire::client::connection::Connection;
    use quire::protocol::message::Message;
    use quire::server::{Server, ServerConfig};
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let _not_yet_told = a.seq.moved().unwrap();
    let Node {
        seq, _dir: _kept, ..
    } = a;
    let seq = Arc::new(seq);
    let server = Server::new(seq.clone(), ServerConfig::default());
    let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let mut conn = Connection::connect(addr, 0, "").await.unwrap();
    let submit = |local_seq: u64, base_version: u64| Message::Submit {
        doc: "d".into(),
        local_seq,
        base_version,
        patches: vec![Patch::new(0, 0, "x")],
    };
    async fn next(conn: &mut Connection) -> Message {
        tokio::time::timeout(Duration::from_secs(60), conn.recv())
            .await
            .expect("an answer")
            .unwrap()
            .message
    }
    // Opened (a claims it) and one op acknowledged.
    conn.send(Message::Open {
        doc: "d".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    loop {
        if let Message::Ops { more: false, .. } = next(&mut conn).await {
            break;
        }
    }
    conn.send(submit(1, 0)).await.unwrap();
    assert!(matches!(next(&mut conn).await, Message::Ack { seq: 1, .. }));
    // Drained; the server is not told yet. The next op is sent on.
    let drain = seq.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || drain.drain())
            .await
            .unwrap(),
        1
    );
    conn.send(submit(2, 1)).await.unwrap();
    match next(&mut conn).await {
        Message::Redirect { doc, .. } => assert_eq!(doc, "d"),
        other => panic!("a submit after the drain: expected Redirect, got {other:?}"),
    }
    drop(conn);
    let _ = stop.send(());
    serving.await.unwrap();
    drop(b);
}
