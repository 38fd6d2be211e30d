//! The cluster's sequencer on two or three nodes over one in-memory stand-in for etcd: a
//! document is placed on its preferred owner (rendezvous hashing), its ops reach the
//! journal before
//! they are acknowledged, and when its owner's lease expires the other node claims it,
//! loads it from the store (never from its own log) and answers resends with their
//! original seqs; the old owner acknowledges nothing more of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::common::wrapped::{Rules, Wrapped};

use quire::cluster::hashing::preferred_owner;
use quire::cluster::mem_store::{Fault, MemStore};
use quire::cluster::ownership::{Keys, Member};
use quire::cluster::replicator::{Clock, Drive, LeaseTiming, Replicator};
use quire::op::{OpId, Patch};
use quire::sequencer::cluster::ClusterSequencer;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{
    fingerprint, DeleteRefused, Owner, ReadAtError, Route, Sequencer, SubmitError, SubmitOp,
    Submitted,
};

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
    node_driven(store, name, Drive::Threads)
}

/// A node whose journal writes go only when the test says (`Drive::Manual`:
/// `replicator().commit_next()`), or by threads of their own.
fn node_driven(store: &Arc<MemStore>, name: &str, drive: Drive) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (local, _) = LocalSequencer::open(dir.path(), LocalConfig::default()).unwrap();
    node_on(store, name, drive, local, dir)
}

/// A node whose local log is `local` (in `dir`, kept as long as the node).
fn node_on(
    store: &Arc<MemStore>,
    name: &str,
    drive: Drive,
    local: LocalSequencer,
    dir: tempfile::TempDir,
) -> Node {
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
        drive,
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
        expected_incarnation: None,
        fingerprint: fingerprint(base, &patches),
        patches,
    }
}

/// Op `i` of client 1 on `doc` (made on version `i - 1`, inserting `i`), applied: its
/// ticket.
fn applied_nth(node: &Node, doc: &str, i: u64) -> quire::sequencer::Ticket {
    let Submitted::Applied { ticket, .. } = node
        .seq
        .submit(doc, &op(1, i, i - 1, &i.to_string()))
        .unwrap()
    else {
        panic!("op {i} not applied");
    };
    ticket
}

/// [`applied_nth`] at a node whose journal writes are driven by hand: the write
/// committed, the op durable.
async fn committed_nth(node: &Node, doc: &str, i: u64) {
    let ticket = applied_nth(node, doc, i);
    assert!(
        node.seq.replicator().commit_next(),
        "op {i}'s journal write"
    );
    node.seq.wait_durable(ticket).await.unwrap();
}

/// A document name whose preferred owner among `nodes` is `node`.
fn doc_for(node: &str, nodes: &[&str]) -> String {
    (0..)
        .map(|i| format!("d{i}"))
        .find(|d| preferred_owner(d, nodes.iter().copied()) == Some(node))
        .unwrap()
}

fn route(node: &Node, doc: &str) -> Route {
    node.seq.place(doc).expect("placed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_fails_over_with_every_acknowledged_op_and_resends_answered() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    match route(&b, &d) {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, a.addr),
        Route::Here => panic!("two owners"),
    }
    // Five ops on a, each acknowledged once in the journal and on a's disk.
    for i in 1..=5u64 {
        let Submitted::Applied { seq, ticket } =
            a.seq.submit(&d, &op(1, i, i - 1, &i.to_string())).unwrap()
        else {
            panic!("a new op");
        };
        assert_eq!(seq, i);
        a.seq.wait_durable(ticket).await.expect("acknowledged");
    }
    let text_at_a = a.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((text_at_a.text.as_str(), text_at_a.version), ("54321", 5));
    // a stops renewing (a pause), b renews: a's lease expires in the store, and a's own
    // clock says so too.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    a.clock.advance(TTL);
    assert!(matches!(
        a.seq.submit(&d, &op(1, 6, 5, "x")),
        Err(SubmitError::Moved(_))
    ));
    // b claims it and loads it from the store.
    assert_eq!(route(&b, &d), Route::Here);
    let at_b = b.seq.read(&d).await.unwrap().unwrap();
    assert_eq!(at_b, text_at_a);
    // A resend of an acknowledged op gets its original seq; a new op goes on.
    match b.seq.submit(&d, &op(1, 3, 2, "3")).unwrap() {
        Submitted::Duplicate { seq, ticket } => {
            assert_eq!(seq, 3);
            b.seq.wait_durable(ticket).await.expect("durable");
        }
        other => panic!("{other:?}"),
    }
    let Submitted::Applied { seq: 6, ticket } = b.seq.submit(&d, &op(2, 1, 5, "b")).unwrap() else {
        panic!("op 6");
    };
    b.seq.wait_durable(ticket).await.unwrap();
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap().text, "b54321");
    // a hears of its loss, evicts the document and says where it went.
    let mut moved = a.seq.moved().unwrap();
    assert!(a.seq.handle_losses() >= 1);
    let (doc, owner) = moved.try_recv().expect("a move");
    assert_eq!((&*doc, &*owner.addr), (d.as_str(), b.addr.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_replaced_behind_its_back_acknowledges_nothing_and_writes_nothing() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    let Submitted::Applied { ticket, .. } = a.seq.submit(&d, &op(1, 1, 0, "a")).unwrap() else {
        panic!("op 1");
    };
    a.seq.wait_durable(ticket).await.unwrap();
    // The store expires a's lease, but a's own clock has not moved (a clock running
    // slow, or a process paused between its check and its write): it still believes it
    // owns the document. b claims it.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    assert_eq!(route(&b, &d), Route::Here);
    let Submitted::Applied {
        ticket: b_ticket, ..
    } = b.seq.submit(&d, &op(2, 1, 1, "b")).unwrap()
    else {
        panic!("b's op");
    };
    b.seq.wait_durable(b_ticket).await.unwrap();
    // a sequences a late op: the fence refuses its journal write, and it is never
    // acknowledged.
    let Ok(Submitted::Applied { ticket, .. }) = a.seq.submit(&d, &op(1, 2, 1, "late")) else {
        panic!("a still believes it owns the document");
    };
    assert!(a.seq.wait_durable(ticket).await.is_err());
    // Once it heard of the loss, it sequences nothing more of it.
    a.seq.handle_losses();
    assert!(matches!(
        a.seq.submit(&d, &op(1, 3, 1, "later")),
        Err(SubmitError::Moved(_))
    ));
    // The journal has b's op at seq 2, not a's.
    let c = node(&store, "c");
    store.advance(TTL / 2 + Duration::from_secs(1)); // b's lease (b renewed at TTL / 2)
    assert_eq!(route(&c, &d), Route::Here);
    assert_eq!(c.seq.read(&d).await.unwrap().unwrap().text, "ba");
}

/// Rules of a cluster node that tell the server the document's load it was asked about
/// first, whatever the node serves now: the server's copy checks the load before it
/// submits, and this is the copy's view when the sequencer reloads the document in
/// between (a race of microseconds, made here every time).
#[derive(Default)]
struct ToldStale {
    told: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl Rules<ClusterSequencer<Arc<MemStore>>> for ToldStale {
    fn incarnation(&self, store: &ClusterSequencer<Arc<MemStore>>, doc_id: &str) -> u64 {
        *self
            .told
            .lock()
            .unwrap()
            .entry(doc_id.to_owned())
            .or_insert_with(|| store.incarnation(doc_id))
    }
}

/// The server's copy of a document is checked against the sequencer's load of it, and
/// the sequencer may reload the document between that check and the copy's submit. The
/// submit says which load the op was transformed for, and the sequencer refuses it for
/// another (the copy then sends its client where the document is, to open it again).
/// Here the reload holds another op at the copy's version: sequenced, the op would have
/// been transformed over an op the document does not have (a review found the window;
/// before the fix the op was applied at seq 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_transformed_for_a_load_the_sequencer_replaced_is_not_sequenced() {
    use quire::server::document::{Document, DocumentLimits, Submission, SubmitOutcome};
    use quire::server::outbox::Outbox;
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    let a = Wrapped {
        store: Arc::new(a.seq),
        rules: ToldStale::default(),
    };
    let limits = DocumentLimits {
        presence_interval: Duration::from_millis(50),
        max_frame: 1 << 20,
        history_window: 64,
    };
    // The server's copy at a, under the load a serves now.
    let copy: Document<Outbox> =
        Document::with_incarnation(Arc::from(d.as_str()), 0, limits, a.incarnation(&d));
    let submission = |client_id: u64, local_seq: u64, base_version: u64, ins: &str| Submission {
        session: client_id,
        request_id: 1,
        client_id,
        local_seq,
        base_version,
        patches: vec![Patch::new(0, 0, ins)],
    };
    let SubmitOutcome::Applied { ticket, .. } = copy.submit(&a, submission(1, 1, 0, "1")) else {
        panic!("op 1");
    };
    a.wait_durable(ticket).await.unwrap();
    // a's lease expires in the store (its clock is slow); b claims the document and
    // sequences op 2, while a sequences another op 2 that its journal refuses.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    assert_eq!(route(&b, &d), Route::Here);
    let Submitted::Applied { ticket, .. } = b.seq.submit(&d, &op(2, 1, 1, "b")).unwrap() else {
        panic!("b's op 2");
    };
    b.seq.wait_durable(ticket).await.unwrap();
    let SubmitOutcome::Applied { seq: 2, ticket } = copy.submit(&a, submission(1, 2, 1, "late"))
    else {
        panic!("a still believes it owns the document");
    };
    assert!(a.wait_durable(ticket).await.is_err(), "fenced");
    a.store.handle_losses();
    // a registers again; b's lease expires; a loads the document from the store: b's op
    // 2, at the copy's version.
    a.store.replicator().renew();
    a.store.replicator().renew();
    store.advance(TTL / 2);
    a.store.replicator().renew();
    store.advance(TTL / 2 + Duration::from_secs(1));
    assert_eq!(a.store.place(&d).expect("placed"), Route::Here);
    assert_ne!(a.store.incarnation(&d), a.incarnation(&d), "reloaded");
    assert_eq!(a.read(&d).await.unwrap().unwrap().text, "b1");
    // The copy's client sends op 3, made on the copy's version 2 ("late1").
    match copy.submit(&a, submission(1, 3, 2, "x")) {
        SubmitOutcome::Moved(owner) => assert_eq!(&*owner.addr, "a.example:7000"),
        other => panic!("the stale copy's op was {other:?}"),
    }
    assert_eq!(a.version(&d), 2, "nothing sequenced");
    assert_eq!(a.read(&d).await.unwrap().unwrap().text, "b1");
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
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    const OPS: u64 = 23;
    for i in 1..=OPS {
        let Submitted::Applied { ticket, .. } = a
            .seq
            .submit(&d, &op(1, i, i - 1, &format!("<{i}>")))
            .unwrap()
        else {
            panic!("op {i}");
        };
        a.seq.wait_durable(ticket).await.unwrap();
        a.seq.write_snapshots();
    }
    let keys = Keys::new("/quire");
    let count = |prefix: String| store.get_prefix(&prefix, None, 1000).unwrap().kvs.len() as u64;
    let (journal, snapshots) = (count(keys.journal(&d)), count(keys.snapshots(&d)));
    assert_eq!(snapshots, 2, "the newest snapshot and the one before it");
    assert!(
        journal <= 2 * SNAPSHOT_EVERY,
        "{journal} journal entries: truncated through the previous snapshot"
    );
    let at_a = a.seq.read(&d).await.unwrap().unwrap();
    // Failover to b.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    a.clock.advance(TTL);
    assert_eq!(route(&b, &d), Route::Here);
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap(), at_a);
    // An op long covered by a snapshot (and gone from the journal) is still known.
    match b.seq.submit(&d, &op(1, 2, 1, "<2>")).unwrap() {
        Submitted::Duplicate { seq, .. } => assert_eq!(seq, 2),
        other => panic!("{other:?}"),
    }
    // b has at least a snapshot interval of history to transform late ops over.
    let history = b
        .seq
        .ops_after(&d, OPS - SNAPSHOT_EVERY, 100)
        .unwrap()
        .expect("the ops since the older snapshot are kept");
    assert_eq!(history.len() as u64, SNAPSHOT_EVERY);
    assert_eq!(history.last().unwrap().seq, OPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_documents_to_the_preferred_other_node() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
    let mut moved = a.seq.moved().unwrap();
    assert_eq!(route(&a, &d), Route::Here);
    let mut tickets = Vec::new();
    for i in 1..=4u64 {
        let Submitted::Applied { ticket, .. } =
            a.seq.submit(&d, &op(1, i, i - 1, &i.to_string())).unwrap()
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
        (d.as_str(), b.addr.as_str()),
        "to the only other node"
    );
    // Nothing more here; a new Open is sent on.
    assert!(matches!(
        a.seq.submit(&d, &op(1, 5, 4, "x")),
        Err(SubmitError::Moved(_))
    ));
    match route(&a, &d) {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, b.addr),
        Route::Here => panic!("a drained node places nothing"),
    }
    // b claims it at once (released, not expired) with every op.
    assert_eq!(route(&b, &d), Route::Here);
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap().text, "4321");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_placed_on_its_preferred_owner_wherever_it_is_opened() {
    let store = Arc::new(MemStore::new());
    let nodes = [node(&store, "a"), node(&store, "b"), node(&store, "c")];
    let names = ["a", "b", "c"];
    let mut placed = [0; 3];
    for i in 0..30 {
        let doc = format!("doc-{i}");
        let preferred = preferred_owner(&doc, names).unwrap();
        let p = names.iter().position(|n| *n == preferred).unwrap();
        // Opened first at the next node: sent to the preferred owner, which claims it.
        let first = &nodes[(p + 1) % 3];
        match route(first, &doc) {
            Route::Elsewhere(owner) => assert_eq!(&*owner.addr, nodes[p].addr, "{doc}"),
            Route::Here => panic!("{doc} claimed by a node it does not prefer"),
        }
        assert_eq!(route(&nodes[p], &doc), Route::Here, "{doc}");
        // Every other node sends its clients there.
        for (j, other) in nodes.iter().enumerate().filter(|(j, _)| *j != p) {
            match route(other, &doc) {
                Route::Elsewhere(owner) => assert_eq!(&*owner.addr, nodes[p].addr),
                Route::Here => panic!("{doc} has two owners ({j})"),
            }
        }
        placed[p] += 1;
    }
    assert!(
        placed.iter().all(|n| *n > 0),
        "spread over the nodes: {placed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_takes_the_documents_it_is_preferred_for_with_every_op() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let mut moved = a.seq.moved().unwrap();
    // Documents on a; some will prefer c once it joins, some will not.
    let docs: Vec<String> = (0..12)
        .map(|i| format!("j{i}"))
        .filter(|d| preferred_owner(d, ["a", "b"]) == Some("a"))
        .collect();
    let to_c: Vec<&String> = docs
        .iter()
        .filter(|d| preferred_owner(d, ["a", "b", "c"]) == Some("c"))
        .collect();
    assert!(!to_c.is_empty() && to_c.len() < docs.len(), "{docs:?}");
    let mut tickets = Vec::new();
    for doc in &docs {
        assert_eq!(route(&a, doc), Route::Here);
        for i in 1..=3u64 {
            let Submitted::Applied { ticket, .. } =
                a.seq.submit(doc, &op(1, i, i - 1, &i.to_string())).unwrap()
            else {
                panic!("{doc}: op {i}");
            };
            tickets.push(ticket);
        }
    }
    assert_eq!(a.seq.rebalance(), 0, "nothing prefers another node");
    let c = node(&store, "c");
    // c is counted once it has been seen live twice (a node coming and going pulls
    // nothing).
    assert_eq!(a.seq.rebalance(), 0);
    assert_eq!(a.seq.rebalance(), to_c.len());
    assert_eq!(a.seq.rebalance(), 0, "moved once");
    // Every op queued before the handover is acknowledged.
    for ticket in tickets {
        a.seq.wait_durable(ticket).await.expect("acknowledged");
    }
    let mut went: Vec<(String, String)> = std::iter::from_fn(|| moved.try_recv().ok())
        .map(|(doc, owner)| (doc.to_string(), owner.addr.to_string()))
        .collect();
    went.sort();
    let mut expected: Vec<(String, String)> = to_c
        .iter()
        .map(|d| (d.to_string(), c.addr.clone()))
        .collect();
    expected.sort();
    assert_eq!(
        went, expected,
        "the sessions of the moved documents sent to c"
    );
    for doc in &docs {
        if to_c.contains(&doc) {
            assert!(matches!(
                a.seq.submit(doc, &op(1, 4, 3, "x")),
                Err(SubmitError::Moved(_))
            ));
            match route(&a, doc) {
                Route::Elsewhere(owner) => assert_eq!(&*owner.addr, c.addr),
                Route::Here => panic!("{doc} came back"),
            }
            assert_eq!(route(&c, doc), Route::Here);
            assert_eq!(c.seq.read(doc).await.unwrap().unwrap().text, "321");
        } else {
            assert_eq!(route(&a, doc), Route::Here, "{doc} stays");
            assert_eq!(a.seq.read(doc).await.unwrap().unwrap().text, "321");
        }
    }
    // A drained node is not live for placement: a document it would be preferred for
    // goes to the others.
    assert_eq!(b.seq.drain(), 0);
    let doc = doc_for("b", &["a", "b", "c"]);
    let now = preferred_owner(&doc, ["a", "c"]).unwrap();
    let (home, there) = if now == "a" { (&c, &a) } else { (&a, &c) };
    match route(home, &doc) {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, there.addr),
        Route::Here => panic!("{doc} is not preferred here"),
    }
    assert_eq!(route(there, &doc), Route::Here);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_never_waited_for_are_bounded() {
    use quire::sequencer::cluster::MAX_PENDING_TICKETS;
    let store = Arc::new(MemStore::new());
    let a = node(&store, "a");
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    let Submitted::Applied { ticket, .. } = a.seq.submit(&d, &op(1, 1, 0, "x")).unwrap() else {
        panic!("op 1");
    };
    a.seq.wait_durable(ticket).await.unwrap();
    assert_eq!(a.seq.pending_tickets(), 0, "a waited ticket is gone");
    // Reads whose sessions ended before waiting: their tickets stay, up to the bound.
    let mut first = None;
    let mut last = None;
    for _ in 0..MAX_PENDING_TICKETS + 10 {
        let (_, ticket) = a.seq.read_now(&d, None).unwrap().unwrap();
        first.get_or_insert(ticket);
        last = Some(ticket);
    }
    assert_eq!(a.seq.pending_tickets(), MAX_PENDING_TICKETS);
    // The newest still waits as it should; the oldest, dropped, fails instead of hanging.
    a.seq.wait_durable(last.unwrap()).await.expect("durable");
    assert!(a.seq.wait_durable(first.unwrap()).await.is_err());
}

/// A deterministic generator for the random walk below (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// The node serving `doc`, found as a client would: asked at a live node, following
/// redirects (`None`: nobody can serve it now).
fn owner_of<'a>(nodes: &'a [Node], doc: &str, start: usize) -> Option<&'a Node> {
    let mut at = &nodes[start % nodes.len()];
    for _ in 0..4 {
        match at.seq.place(doc) {
            Ok(Route::Here) => return Some(at),
            Ok(Route::Elsewhere(owner)) => at = nodes.iter().find(|n| *n.addr == *owner.addr)?,
            Err(_) => return None,
        }
    }
    None
}

/// The tokens `<k>` of a text, in order.
fn tokens(text: &str) -> Vec<u64> {
    text.split('<')
        .filter_map(|t| t.split('>').next().and_then(|k| k.parse().ok()))
        .collect()
}

/// Nodes join, drain, rebalance and die (their leases expire) in a random order while
/// ops are submitted to the documents' owners, found by redirects: every acknowledged op
/// is in its document exactly once, and no op twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_drains_rebalances_and_deaths_in_any_order_lose_no_acknowledged_op() {
    const DOCS: [&str; 4] = ["m0", "m1", "m2", "m3"];
    for seed in 0..12u64 {
        let mut rng = Rng(seed);
        let store = Arc::new(MemStore::new());
        let mut nodes = vec![node(&store, "n0"), node(&store, "n1")];
        let mut next_node = 2;
        // Nodes gone: kept (not dropped) so that nothing of theirs runs on a drop.
        let mut gone = Vec::new();
        let mut acked: Vec<Vec<u64>> = vec![Vec::new(); DOCS.len()];
        let mut next_token = 0u64;
        let mut trail = Vec::new();
        for step in 0..150 {
            match rng.below(20) {
                0 if nodes.len() < 5 => {
                    trail.push(format!("join n{next_node}"));
                    nodes.push(node(&store, &format!("n{next_node}")));
                    next_node += 1;
                }
                1 if nodes.len() > 1 => {
                    let n = nodes.remove(rng.below(nodes.len()));
                    trail.push(format!("drain {}", n.addr));
                    n.seq.drain();
                    n.seq.close();
                    gone.push(n);
                }
                2 if nodes.len() > 1 => {
                    // A death: its lease expires in the store (the others renew theirs
                    // meanwhile) and by its own clock.
                    let n = nodes.remove(rng.below(nodes.len()));
                    trail.push(format!("death {}", n.addr));
                    nodes.iter().for_each(|o| o.seq.replicator().renew());
                    store.advance(TTL / 2);
                    nodes.iter().for_each(|o| o.seq.replicator().renew());
                    store.advance(TTL / 2 + Duration::from_secs(1));
                    n.clock.advance(TTL);
                    n.seq.handle_losses();
                    gone.push(n);
                }
                3..=5 => {
                    trail.push("rebalance".into());
                    for n in &nodes {
                        n.seq.rebalance();
                    }
                }
                _ => {
                    let d = rng.below(DOCS.len());
                    let Some(owner) = owner_of(&nodes, DOCS[d], rng.below(8)) else {
                        trail.push(format!("{}: nobody serves it", DOCS[d]));
                        continue;
                    };
                    next_token += 1;
                    let base = owner.seq.version(DOCS[d]);
                    let token = format!("<{next_token}>");
                    match owner.seq.submit(DOCS[d], &op(1, next_token, base, &token)) {
                        Ok(Submitted::Applied { ticket, .. }) => {
                            if owner.seq.wait_durable(ticket).await.is_ok() {
                                acked[d].push(next_token);
                            }
                        }
                        Ok(other) => panic!("seed {seed}: a new op answered {other:?}"),
                        Err(_) => {}
                    }
                    owner.seq.write_snapshots();
                    trail.push(format!("{token} -> {} at {}", DOCS[d], owner.addr));
                }
            }
            for n in &nodes {
                n.seq.handle_losses();
            }
            if step % 10 == 9 || step == 149 {
                for (d, doc) in DOCS.iter().enumerate() {
                    let Some(owner) = owner_of(&nodes, doc, 0) else {
                        panic!("seed {seed} step {step}: {doc} unserved; {trail:#?}");
                    };
                    let text = owner.seq.read(doc).await.unwrap().map(|v| v.text);
                    let have = tokens(text.as_deref().unwrap_or(""));
                    let mut unique = have.clone();
                    unique.sort();
                    unique.dedup();
                    assert_eq!(
                        unique.len(),
                        have.len(),
                        "seed {seed}: {doc} has an op twice"
                    );
                    for token in &acked[d] {
                        assert!(
                            have.contains(token),
                            "seed {seed} step {step}: acknowledged <{token}> lost from {doc} \
                             at {}: {have:?}; {trail:#?}",
                            owner.addr
                        );
                    }
                }
            }
        }
        assert!(
            acked.iter().map(Vec::len).sum::<usize>() > 100,
            "seed {seed}: ops acknowledged"
        );
    }
}

/// A `Submit` that reaches the server after the drain released a document and before the
/// server redirected the document's sessions (`quire serve` does that a moment later,
/// when it reads the drain's message from [`ClusterSequencer::moved`]; held back here, so
/// the window stays open) is redirected, as one sent before the drain is: the client is
/// told nothing but `Redirect` (the acceptance for a drain).
///
/// It got `Reject` 17, "base version 1 is ahead of the document (version 0)", before
/// `Document::precheck` (src/server/document.rs) asked whether the document was still
/// served here: it compared the op's base with the sequencer's version of the document,
/// 0 once the drain evicted it. tests/cluster_handoff.rs's
/// `draining_a_node_under_load_shows_clients_nothing_but_redirects` met it with quire
/// processes in about a third of its runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_between_the_drain_and_its_redirect_is_redirected() {
    use quire::client::connection::Connection;
    use quire::protocol::message::Message;
    use quire::server::{Server, ServerConfig};
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
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
        doc: d.clone(),
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
        doc: d.clone(),
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
        Message::Redirect { doc, .. } => assert_eq!(doc, d),
        other => panic!("a submit after the drain: expected Redirect, got {other:?}"),
    }
    drop(conn);
    let _ = stop.send(());
    serving.await.unwrap();
    drop(b);
}

/// The handover's patience (`HAND_OVER_PATIENCE`, 10 s; shorter here) past its value: a
/// drain whose documents' journal writes are still unresolved then hands them over
/// anyway, and the journal's fence refuses those writes once they go (the document was
/// released): they are never acknowledged, and the next owner has every op acknowledged
/// before. Within it, the writes that resolve are acknowledged first
/// (`a_drained_node_hands_its_documents_to_the_preferred_other_node`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_past_its_patience_goes_on_and_the_late_writes_are_refused() {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let b = node(&store, "b");
    let d = doc_for("a", &["a", "b"]);
    let _moved = a.seq.moved().unwrap();
    assert_eq!(route(&a, &d), Route::Here);
    let submit = |i: u64| applied_nth(&a, &d, i);
    let first = submit(1);
    assert!(a.seq.replicator().commit_next());
    a.seq
        .wait_durable(first)
        .await
        .expect("committed: acknowledged");
    // Two more, their journal write held back past the drain's patience.
    let late = [submit(2), submit(3)];
    let patience = Duration::from_millis(300);
    a.seq.set_hand_over_patience(patience);
    let started = std::time::Instant::now();
    assert_eq!(a.seq.drain(), 1, "handed over, unresolved writes and all");
    assert!(
        started.elapsed() >= patience,
        "the drain waited its patience first ({:?})",
        started.elapsed()
    );
    // The write goes now: refused (the document was released), never acknowledged.
    assert!(a.seq.replicator().commit_next());
    for ticket in late {
        assert!(
            a.seq.wait_durable(ticket).await.is_err(),
            "a write that resolved after the handover is not acknowledged"
        );
    }
    // b claims it with the op acknowledged, and nothing of the refused ones.
    assert_eq!(route(&b, &d), Route::Here);
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap().text, "1");
}

/// An `Open` at a node for a document whose owner is leaving (drained: its membership
/// withdrawn, its documents not released yet) waits for the release up to the handover's
/// patience (`HAND_OVER_PATIENCE`; shorter here), then claims it; past the patience it is
/// refused as unavailable (code 33, "retry"), not left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_waits_for_a_leaving_owner_up_to_its_patience() {
    use quire::sequencer::RouteError;
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), Arc::new(node(&store, "b")));
    let d = doc_for("a", &["a", "b"]);
    let _moved = owned_by_a_leaver(&a, &d).await;
    let patience = Duration::from_millis(300);
    b.seq.set_hand_over_patience(patience);
    let started = std::time::Instant::now();
    match b.seq.place(&d) {
        Err(RouteError::Unavailable(why)) => assert!(why.contains("leaving"), "{why}"),
        other => panic!("past the patience: expected unavailable, got {other:?}"),
    }
    assert!(
        started.elapsed() >= patience,
        "it waited its patience first ({:?})",
        started.elapsed()
    );
    // Within it: a's drain releases the document while b's `Open` waits.
    b.seq.set_hand_over_patience(Duration::from_secs(60));
    let waiting = placing_at(&b, &d);
    assert_eq!(a.seq.drain(), 1);
    assert_eq!(waiting.join().unwrap().expect("placed"), Route::Here);
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap().text, "1");
}

/// Found by tests/cluster_nodes.rs's quorum test (2 runs in about 100): an edit made
/// while etcd had no majority was acknowledged to its client. The node had sequenced
/// the op and written it to its local log, its journal write could not commit, and
/// the client, opening the document again (redirected when the node's lease lapsed),
/// got a catch-up of the ops after its version read from the local log, its own op
/// among them, which a client takes as acknowledged. `ops_after` (what a catch-up
/// reads) must give only ops in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_after_gives_only_ops_whose_journal_write_committed() {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let d = "d";
    assert_eq!(route(&a, d), Route::Here);
    let submit = |i: u64| applied_nth(&a, d, i);
    committed_nth(&a, d, 1).await;
    let second = submit(2);
    // In the local log (durable there), not in the journal.
    let local = a.seq.local();
    tokio::time::timeout(Duration::from_secs(60), async {
        while local.ops_after(d, 0, 10).unwrap().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("op 2 in the local log");
    let seqs = |ops: Option<Vec<quire::op::SequencedOp>>| -> Vec<u64> {
        ops.unwrap().iter().map(|o| o.seq).collect()
    };
    assert_eq!(
        seqs(a.seq.ops_after(d, 0, 10).unwrap()),
        vec![1],
        "op 2 is not in the journal yet"
    );
    assert_eq!(seqs(a.seq.ops_after(d, 1, 10).unwrap()), Vec::<u64>::new());
    // Nor is the text at it (the history read).
    assert!(matches!(
        a.seq.read_at(d, 2),
        Err(ReadAtError::Future { newest: 1 })
    ));
    assert_eq!(a.seq.read_at(d, 1).unwrap().unwrap().text, "1");
    // Committed: now it is.
    assert!(a.seq.replicator().commit_next());
    a.seq.wait_durable(second).await.unwrap();
    assert_eq!(seqs(a.seq.ops_after(d, 0, 10).unwrap()), vec![1, 2]);
    assert_eq!(a.seq.read_at(d, 2).unwrap().unwrap().text, "21");
    // A third whose journal write resolves after the node's lease lapsed (the tenure
    // is lost): never given, and reads fail.
    let third = submit(3);
    store.advance(TTL * 2);
    a.clock.advance(TTL * 2);
    assert!(a.seq.replicator().commit_next());
    assert!(a.seq.wait_durable(third).await.is_err());
    assert!(
        a.seq.ops_after(d, 0, 10).is_err(),
        "not served here any more"
    );
}

/// The keys of the store that belong to document `doc` (its owner key, journal,
/// snapshots and their pieces: the fourth part of the key is the document's id).
fn keys_of(store: &MemStore, doc: &str) -> Vec<String> {
    use quire::cluster::store::Store;
    let page = store.get_prefix("/quire/", None, 10_000).unwrap();
    page.kvs
        .into_iter()
        .map(|kv| kv.key)
        .filter(|key| !key.starts_with("/quire/nodes/") && key.split('/').nth(3) == Some(doc))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_document_leaves_nothing_in_the_store_and_starts_again_empty() {
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), node(&store, "b"));
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    for i in 1..=7u64 {
        let Submitted::Applied { ticket, .. } =
            a.seq.submit(&d, &op(1, i, i - 1, &i.to_string())).unwrap()
        else {
            panic!("op {i}");
        };
        a.seq.wait_durable(ticket).await.unwrap();
    }
    assert_eq!(a.seq.write_snapshots(), 1);
    // An op still in flight when the deletion comes: acknowledged, then deleted with it.
    let Submitted::Applied { ticket: last, .. } = a.seq.submit(&d, &op(1, 8, 7, "8")).unwrap()
    else {
        panic!("op 8");
    };
    let before = keys_of(&store, &d);
    assert!(before.len() >= 9, "journal, snapshot, owner: {before:?}");
    // Only its owner deletes it.
    assert!(matches!(
        b.seq.delete(&d),
        Err(DeleteRefused::Unavailable(_))
    ));
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    assert_eq!(deletion.version, 8);
    assert!(
        a.seq.submit(&d, &op(1, 9, 8, "9")).is_err(),
        "nothing more is sequenced"
    );
    a.seq.wait_durable(last).await.expect("op 8 acknowledged");
    a.seq
        .wait_durable(deletion.ticket)
        .await
        .expect("deleted from the store");
    assert_eq!(keys_of(&store, &d), Vec::<String>::new());
    // Its id is free: placed again on its preferred owner, empty, from seq 1.
    match route(&b, &d) {
        Route::Elsewhere(owner) => assert_eq!(&*owner.addr, a.addr),
        Route::Here => panic!("b is not preferred"),
    }
    assert_eq!(route(&a, &d), Route::Here);
    let view = a.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((view.text.as_str(), view.version), ("", 0));
    // Nobody wrote it yet: nothing to delete.
    assert!(a.seq.delete(&d).unwrap().is_none());
    let Submitted::Applied { seq: 1, ticket } = a.seq.submit(&d, &op(2, 1, 0, "new")).unwrap()
    else {
        panic!("seq 1");
    };
    a.seq.wait_durable(ticket).await.unwrap();
    assert_eq!(a.seq.read(&d).await.unwrap().unwrap().text, "new");
}

/// The store commits a deletion and its answer is lost: the deletion does not say "not
/// deleted" (it was), but that its outcome is not known; the document is gone whole, and
/// asking again tells (nothing to delete). (The simulator's cluster world found the
/// message saying both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_whose_answer_is_lost_says_it_is_not_known_and_asking_again_tells() {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    committed_nth(&a, &d, 1).await;
    assert!(!keys_of(&store, &d).is_empty());
    store.fault_next_txn(Fault::ResponseLost);
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    // Not known: an error (HTTP 500), not "retry".
    match a.seq.wait_deleted(deletion.ticket).await {
        Err(DeleteRefused::Failed(e)) => {
            assert!(e.contains("not known") && !e.contains("not deleted"), "{e}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(keys_of(&store, &d), Vec::<String>::new(), "deleted whole");
    assert_eq!(route(&a, &d), Route::Here);
    assert!(a.seq.delete(&d).unwrap().is_none(), "nothing to delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_by_an_owner_replaced_meanwhile_deletes_nothing() {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let b = node(&store, "b");
    let d = doc_for("a", &["a", "b"]);
    assert_eq!(route(&a, &d), Route::Here);
    committed_nth(&a, &d, 1).await;
    // Op 2's journal write is queued when the deletion comes, which waits for it.
    let Submitted::Applied { ticket: second, .. } = a.seq.submit(&d, &op(1, 2, 1, "2")).unwrap()
    else {
        panic!("op 2");
    };
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    // a's lease expires meanwhile and b takes the document over.
    store.advance(TTL / 2);
    b.seq.replicator().renew();
    store.advance(TTL / 2);
    a.clock.advance(TTL);
    assert_eq!(route(&b, &d), Route::Here);
    assert!(a.seq.replicator().commit_next());
    assert!(a.seq.wait_durable(second).await.is_err(), "op 2 is refused");
    // Nothing deleted, the document served elsewhere: retry (HTTP 503), there.
    match a.seq.wait_deleted(deletion.ticket).await {
        Err(DeleteRefused::Unavailable(e)) => assert!(e.contains("not deleted"), "{e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Nothing was deleted: b serves the document with every acknowledged op.
    let view = b.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((view.text.as_str(), view.version), ("1", 1));
    assert!(keys_of(&store, &d).len() >= 2, "owner and journal");
}

/// A deletion whose document's journal writes do not resolve within its patience deletes
/// nothing; an `Open` afterwards waits for those writes (it is refused as unavailable,
/// "retry", meanwhile) and then loads the document with every op they wrote. Before, it
/// loaded the journal without them, in the same epoch, so the late writes still landed
/// under the new tenure: the next op took the seq of one of them and overwrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_past_its_patience_deletes_nothing_and_the_document_reloads_with_its_late_writes(
) {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    let submit = |i: u64| applied_nth(&a, &d, i);
    committed_nth(&a, &d, 1).await;
    // Op 2's journal write is held back past the deletion's patience.
    let second = submit(2);
    a.seq.set_hand_over_patience(Duration::from_millis(50));
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    match a.seq.wait_deleted(deletion.ticket).await {
        Err(DeleteRefused::Unavailable(e)) => assert!(e.contains("not deleted"), "{e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Not loaded again while op 2's write is unresolved.
    assert!(
        a.seq.place(&d).is_err(),
        "an Open waits for the late write, then says to retry"
    );
    assert!(a.seq.replicator().commit_next(), "op 2's write goes now");
    a.seq
        .wait_durable(second)
        .await
        .expect("op 2 is in the journal: acknowledged");
    assert_eq!(route(&a, &d), Route::Here);
    let view = a.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((view.text.as_str(), view.version), ("21", 2), "op 2 kept");
    // The next op follows it, and the journal keeps both.
    let third = submit(3);
    assert!(a.seq.replicator().commit_next());
    a.seq.wait_durable(third).await.unwrap();
    let loaded = a.seq.replicator().member().load(&d).unwrap();
    let seqs: Vec<u64> = loaded.ops.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

/// An `Open` (or a second deletion, which is placed first) of a document whose deletion
/// is under way waits for it up to its patience, then is told that a deletion is under
/// way, not that the document is being handed to another node (what it was told before:
/// the review of 9f5baf7). Once the first is done, the document is placed again, empty.
/// (With one patience for both, an erasure waiting for journal writes gives up first,
/// the document left unsettled: that `Open` is told it is being handed over. The message
/// holds while the erasure's own txn or cleanup is slow, or its patience was longer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_deletion_is_under_way_is_said_to_be_being_deleted() {
    use quire::sequencer::RouteError;
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    committed_nth(&a, &d, 1).await;
    // Op 2's journal write is held back: the erasure waits for it.
    let second = applied_nth(&a, &d, 2);
    a.seq.set_hand_over_patience(Duration::from_secs(60));
    // The erasure's patience is set when the deletion is asked: the long one.
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    a.seq.set_hand_over_patience(Duration::from_millis(100));
    match a.seq.place(&d) {
        Err(RouteError::Unavailable(why)) => {
            assert!(
                why.contains("deletion") && why.contains("under way"),
                "{why}"
            )
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(a.seq.replicator().commit_next(), "op 2's write goes now");
    a.seq.wait_durable(second).await.expect("op 2 acknowledged");
    tokio::time::timeout(Duration::from_secs(30), a.seq.wait_durable(deletion.ticket))
        .await
        .expect("the erasure ends")
        .expect("deleted from the store");
    assert_eq!(route(&a, &d), Route::Here);
    let view = a.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((view.text.as_str(), view.version), ("", 0));
}

/// A deletion no thread can be had for (the system gives the process no more) is
/// refused before anything is deleted: the document is still served here, with its
/// ops, and takes the next one. Before, its erasure ran on the caller's thread, which
/// in the server holds the lock on every document: every `Open` on the node waited for
/// the store's answers, up to the deletion's patience.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_no_thread_can_be_had_for_is_refused_and_deletes_nothing() {
    let store = Arc::new(MemStore::new());
    let a = node(&store, "a");
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    let first = applied_nth(&a, &d, 1);
    a.seq.wait_durable(first).await.unwrap();
    let keys = keys_of(&store, &d);
    a.seq.refuse_erasure_threads();
    match a.seq.delete(&d) {
        // Told to retry (HTTP 503 at the admin endpoint), not that the storage failed.
        Err(DeleteRefused::Unavailable(e)) => {
            assert!(e.contains("not deleted") && e.contains("retry"), "{e}")
        }
        Err(e @ DeleteRefused::Failed(_)) => panic!("expected Unavailable, got {e:?}"),
        Ok(deletion) => panic!("expected a refusal, got {:?}", deletion.map(|d| d.version)),
    }
    assert_eq!(keys_of(&store, &d), keys, "nothing erased from the store");
    assert_eq!(route(&a, &d), Route::Here, "still served here");
    let second = applied_nth(&a, &d, 2);
    a.seq.wait_durable(second).await.expect("the next op");
    let view = a.seq.read(&d).await.unwrap().unwrap();
    assert_eq!((view.text.as_str(), view.version), ("21", 2));
}

/// A document left unsettled (a deletion past its patience, its journal write
/// unresolved) and never opened here again is forgotten once the write resolves, by the
/// next rebalance. Before, only an `Open` of that document here forgot it: a node kept
/// an entry for every such document for as long as it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_document_is_forgotten_once_its_writes_resolve() {
    let store = Arc::new(MemStore::new());
    let a = node_driven(&store, "a", Drive::Manual);
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    let late = applied_nth(&a, &d, 1);
    a.seq.set_hand_over_patience(Duration::from_millis(50));
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    assert!(a.seq.wait_durable(deletion.ticket).await.is_err());
    assert_eq!(a.seq.unsettled_documents(), 1, "its write is unresolved");
    a.seq.rebalance();
    assert_eq!(a.seq.unsettled_documents(), 1, "still unresolved: kept");
    assert!(a.seq.replicator().commit_next(), "the write goes now");
    a.seq.wait_durable(late).await.expect("in the journal");
    a.seq.rebalance();
    assert_eq!(a.seq.unsettled_documents(), 0, "resolved: forgotten");
}

/// The local log fails (an fsync error) right after a deletion's tombstone, while the
/// deletion's erasure from the store goes on: the deletion reports what the store did
/// (the document is gone from the cluster), not the local failure, which would have the
/// server redirect its sessions to reopen the document instead of telling them it was
/// deleted, and have them resend their unacknowledged ops into a new document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_erased_from_the_store_is_reported_done_even_if_the_local_log_failed() {
    let store = Arc::new(MemStore::new());
    let (a, fs) = node_on_simulated_disk(&store, "a");
    let d = doc_for("a", &["a"]);
    assert_eq!(route(&a, &d), Route::Here);
    committed_nth(&a, &d, 1).await;
    // Every write so far is durable: the tombstone's sync is the first to fail.
    fs.fail_syncs_after(0);
    let deletion = a.seq.delete(&d).unwrap().expect("a document");
    let outcome = a.seq.wait_durable(deletion.ticket).await;
    outcome.expect("the deletion is done");
    assert_eq!(keys_of(&store, &d), Vec::<String>::new(), "erased whole");
}

/// A deletion that the store carried out while the node's local log failed under an op
/// sequenced just before it: the op gets exactly one answer (the review of 7b80ee9 found
/// two: `Reject` 30 from its failed local sync, then an `Ack` from the deletion's
/// delivery of the ops before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_before_a_deletion_the_store_carried_out_under_a_failed_local_log_is_answered_once() {
    use quire::client::connection::Connection;
    use quire::protocol::message::Message;
    use quire::server::{Server, ServerConfig};
    let store = Arc::new(MemStore::new());
    let (Node { seq, _dir, .. }, fs) = node_on_simulated_disk(&store, "a");
    let seq = Arc::new(seq);
    let d = doc_for("a", &["a"]);
    let server = Server::new(seq.clone(), ServerConfig::default());
    let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    let mut conn = Connection::connect(addr, 0, "").await.unwrap();
    conn.send(Message::Open {
        doc: d.clone(),
        known_version: 0,
    })
    .await
    .unwrap();
    loop {
        match conn.recv().await.unwrap().message {
            Message::Ops { more: false, .. } => break,
            Message::Snapshot { .. } | Message::Ops { .. } => {}
            other => panic!("opening: {other:?}"),
        }
    }
    let submit = |local_seq: u64, base: u64| Message::Submit {
        doc: d.clone(),
        local_seq,
        base_version: base,
        patches: vec![Patch::new(0, 0, "x")],
    };
    conn.send(submit(1, 0)).await.unwrap();
    while !seq.replicator().commit_next() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let m = conn.recv().await.unwrap().message;
    assert!(matches!(m, Message::Ack { seq: 1, .. }), "{m:?}");
    // Op 2 is sequenced, its local sync held.
    fs.hold_syncs();
    conn.send(submit(2, 1)).await.unwrap();
    while seq.version(&d) != 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deleting = tokio::spawn({
        let (server, d) = (server.clone(), d.clone());
        async move { server.delete_document(&d).await }
    });
    while seq.version(&d) != 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The sync of op 2 and the tombstone fails; op 2's journal write commits.
    fs.fail_syncs_after(0);
    fs.release_syncs();
    while !seq.replicator().commit_next() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    deleting
        .await
        .unwrap()
        .expect("the store carried the deletion out");
    let mut answers = Vec::new();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(3), conn.recv()).await {
        let m = m.unwrap().message;
        match m {
            Message::Ack { local_seq: 2, .. } | Message::Reject { local_seq: 2, .. } => {
                answers.push(m)
            }
            _ => {}
        }
    }
    assert_eq!(
        answers.len(),
        1,
        "op 2 answered {} times: {answers:?}",
        answers.len()
    );
}

/// A node driven by hand whose local log is on the simulated disk (returned, to fail
/// its syncs).
fn node_on_simulated_disk(store: &Arc<MemStore>, id: &str) -> (Node, quire::wal::vfs::sim::SimFs) {
    let fs = quire::wal::vfs::sim::SimFs::new();
    let (local, _) = LocalSequencer::open_with(
        Arc::new(fs.clone()),
        std::path::Path::new("/data"),
        LocalConfig::default(),
    )
    .unwrap();
    let node = node_on(
        store,
        id,
        Drive::Manual,
        local,
        tempfile::tempdir().unwrap(),
    );
    (node, fs)
}

/// Node `a` owns `d` (its preferred owner) with op 1 ("1") durable, then leaves without
/// releasing it (its membership withdrawn, as a drain begins): a placement of `d`
/// elsewhere waits for the release (`a.seq.drain()`), up to its patience. The receiver
/// of a's moves is kept by the caller.
async fn owned_by_a_leaver(
    a: &Node,
    d: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(Arc<str>, Owner)> {
    let moved = a.seq.moved().unwrap();
    assert_eq!(route(a, d), Route::Here);
    a.seq.wait_durable(applied_nth(a, d, 1)).await.unwrap();
    a.seq.replicator().member().withdraw().unwrap();
    moved
}

/// `node`'s placement of `d` on a thread of its own, once it has begun waiting (it is
/// not finished 100 ms on).
fn placing_at(
    node: &Arc<Node>,
    d: &str,
) -> std::thread::JoinHandle<Result<Route, quire::sequencer::RouteError>> {
    let placing = {
        let (node, d) = (node.clone(), d.to_owned());
        std::thread::spawn(move || node.seq.place(&d))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !placing.is_finished(),
        "the placement waits for the release"
    );
    placing
}

/// A placement waiting on the store (here for a leaving owner's release, up to its
/// patience; on a slow etcd, for each request) holds back no other call about the
/// document: the server asks `incarnation` under its documents' lock, and `route` runs
/// on an async worker, so either waiting for the placement stalls every connection of
/// the node. Found in CI (stop 42): during a drain under load, the node taking the
/// drained documents answered nothing, not even a `Hello`, for over a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_waiting_on_the_store_holds_back_no_other_call() {
    // Far above how long anything here takes unless it waits for the placement.
    const BOUND: Duration = Duration::from_secs(30);
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), Arc::new(node(&store, "b")));
    let d = doc_for("a", &["a", "b"]);
    let _moved = owned_by_a_leaver(&a, &d).await;
    // b's placement of d waits for the release (past its patience, the placement gives
    // up, and whatever it held back goes on: a failure of this test takes that long).
    b.seq.set_hand_over_patience(2 * BOUND);
    let placing = placing_at(&b, &d);
    // Asked on another thread: not served (yet), at once.
    let (tx, rx) = mpsc::channel();
    {
        let (b, d) = (b.clone(), d.clone());
        std::thread::spawn(move || tx.send(b.seq.incarnation(&d)).unwrap());
    }
    let incarnation = rx.recv_timeout(BOUND);
    // Two routes of d, one per async worker: they wait for the placement off the workers,
    // which go on running other tasks meanwhile.
    let routes: Vec<_> = (0..2)
        .map(|_| {
            let (b, d) = (b.clone(), d.clone());
            tokio::spawn(async move { b.seq.route(&d).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = tokio::time::timeout(BOUND, tokio::spawn(async { "ran" })).await;
    // The release: everything waiting for it goes on.
    assert_eq!(a.seq.drain(), 1);
    assert_eq!(
        incarnation,
        Ok(0),
        "incarnation answers during the placement"
    );
    assert!(
        matches!(other, Ok(Ok("ran"))),
        "a task runs while two routes wait for the placement: {other:?}"
    );
    assert_eq!(placing.join().unwrap().expect("placed"), Route::Here);
    for route in routes {
        assert_eq!(route.await.unwrap().expect("routed"), Route::Here);
    }
    assert_ne!(b.seq.incarnation(&d), 0, "served at b");
    assert_eq!(b.seq.read(&d).await.unwrap().unwrap().text, "1");
}

/// A drain that begins while a placement is under way waits for it and hands the
/// document over: a node that drains serves nothing afterwards. (With the placement
/// holding only a lock of its own, the drain found the document not served, skipped it,
/// and the placement then served it on the draining node.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_during_a_placement_waits_for_it_and_hands_the_document_over() {
    let store = Arc::new(MemStore::new());
    let nodes = [node(&store, "a"), node(&store, "b"), node(&store, "c")];
    let [a, b, c] = nodes.map(Arc::new);
    // Preferred by a among all, by b once a is gone.
    let d = (0..)
        .map(|i| format!("dp{i}"))
        .find(|d| {
            preferred_owner(d, ["a", "b", "c"]) == Some("a")
                && preferred_owner(d, ["b", "c"]) == Some("b")
        })
        .unwrap();
    let _moved = [owned_by_a_leaver(&a, &d).await, b.seq.moved().unwrap()];
    b.seq.set_hand_over_patience(Duration::from_secs(60));
    let placing = placing_at(&b, &d);
    // b drains meanwhile; then a releases d.
    let draining = {
        let b = b.clone();
        std::thread::spawn(move || b.seq.drain())
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(a.seq.drain(), 1);
    placing.join().unwrap().expect("placed");
    assert_eq!(draining.join().unwrap(), 1, "b's drain handed d over");
    assert_eq!(b.seq.incarnation(&d), 0, "b serves nothing after its drain");
    assert_eq!(route(&c, &d), Route::Here, "c takes d");
    assert_eq!(c.seq.read(&d).await.unwrap().unwrap().text, "1");
}

/// Placements of one document wait together, each up to its own patience from when it
/// began, not one after another: a second `Open` waiting behind a first one is answered
/// "retry" when its patience is over, while the first still waits. (Queued, every
/// further `Open` waited a whole patience more: the third reached the clients' 30 s
/// silence timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_waiting_behind_another_gives_up_at_its_own_patience() {
    use quire::sequencer::RouteError;
    let store = Arc::new(MemStore::new());
    let (a, b) = (node(&store, "a"), Arc::new(node(&store, "b")));
    let d = doc_for("a", &["a", "b"]);
    let _moved = owned_by_a_leaver(&a, &d).await;
    // b's first placement waits for the release, long.
    b.seq.set_hand_over_patience(Duration::from_secs(60));
    let first = placing_at(&b, &d);
    // The second, with a short patience, is answered while the first still waits.
    b.seq.set_hand_over_patience(Duration::from_millis(300));
    match b.seq.place(&d) {
        Err(RouteError::Unavailable(why)) => assert!(why.contains("retry"), "{why}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(!first.is_finished(), "the first placement still waits");
    assert_eq!(a.seq.drain(), 1);
    assert_eq!(first.join().unwrap().expect("placed"), Route::Here);
}
