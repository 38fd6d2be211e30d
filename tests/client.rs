//! The client (`quire::client::Client`) against a real server over TCP, through a proxy
//! that can cut the connection, drop what the server says, or point at a restarted
//! server: ids the server gives, many documents on one connection, reconnects, offline
//! edits (composed), application restarts from the persistence directory, reloads that
//! keep every edit, presence, and a client process killed with SIGKILL at any moment
//! (the `quire demo-client` the demo runs) and restarted on its directory.

use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quire::client::{Client, ClientConfig, ConnectionState, DocHandle, Event};
use quire::op::{OpId, Patch};
use quire::protocol::message::Selection;
use quire::sequencer::{Sequencer, SubmitOp, Submitted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Pass,
    /// New connections are closed at once (the network is down).
    Down,
    /// The client's bytes reach the server; the server's are dropped.
    Deaf,
}

#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    inner: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    backend: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections passed to the backend so far.
    passed: usize,
}

impl Proxy {
    async fn new(backend: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(ProxyState {
            backend,
            mode: Arc::new(Mutex::new(Mode::Pass)),
            tasks: Vec::new(),
            passed: 0,
        }));
        let state = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (backend, mode) = {
                    let s = state.lock().unwrap();
                    (s.backend, s.mode.clone())
                };
                if *mode.lock().unwrap() == Mode::Down {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(backend).await else {
                    continue;
                };
                let task = tokio::spawn(pipe(client, server, mode));
                let mut s = state.lock().unwrap();
                s.tasks.push(task);
                s.passed += 1;
            }
        });
        Proxy { addr, inner }
    }

    /// Sets what connections get from now on; `Down` also cuts the open ones.
    fn set(&self, mode: Mode) {
        let mut s = self.inner.lock().unwrap();
        *s.mode.lock().unwrap() = mode;
        if mode == Mode::Down {
            for t in s.tasks.drain(..) {
                t.abort();
            }
        }
    }

    /// Cuts the open connections; new ones get what they got.
    fn cut(&self) {
        for t in self.inner.lock().unwrap().tasks.drain(..) {
            t.abort();
        }
    }

    /// Connections passed to the backend so far.
    fn passed(&self) -> usize {
        self.inner.lock().unwrap().passed
    }

    fn point_at(&self, backend: SocketAddr) {
        self.inner.lock().unwrap().backend = backend;
    }
}

async fn pipe(client: TcpStream, server: TcpStream, mode: Arc<Mutex<Mode>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let pass = *mode.lock().unwrap() == Mode::Pass;
                    if pass && cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn config(addr: SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(100);
    c.ping_interval = Duration::from_millis(200);
    c.timeout = Duration::from_secs(2);
    c.shutdown_timeout = Duration::from_secs(2);
    c.seed = Some(7);
    c
}

fn ins(pos: u32, s: &str) -> Patch {
    Patch::new(pos, 0, s)
}

/// Waits until every handle has no pending edit and all are at one version.
async fn settle(docs: &[&DocHandle]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let synced = docs.iter().all(|d| d.is_synced());
        let v = docs[0].version();
        if synced && docs.iter().all(|d| d.version() == v) {
            let t = docs[0].text();
            if docs.iter().all(|d| d.text() == t) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {:?}",
            docs.iter()
                .map(|d| (d.version(), d.is_synced(), d.text()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn server_text(running: &common::Running, doc: &str) -> String {
    running
        .store
        .read(doc)
        .await
        .unwrap()
        .map(|v| v.text)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_given_by_the_server_and_documents_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let a = Client::connect(config(running.addr)).await.unwrap();
    let b = Client::connect(config(running.addr)).await.unwrap();
    a.wait_connected().await.unwrap();
    b.wait_connected().await.unwrap();
    assert!(a.client_id() >= 1 << 63, "{}", a.client_id());
    assert_ne!(a.client_id(), b.client_id());
    // Many documents over one connection each.
    let mut pairs = Vec::new();
    for i in 0..20 {
        let name = format!("doc/{i}");
        pairs.push((a.open(&name).await.unwrap(), b.open(&name).await.unwrap()));
    }
    for (i, (da, db)) in pairs.iter().enumerate() {
        da.edit(&[ins(0, &format!("a{i} "))]).await.unwrap();
        db.edit(&[ins(0, &format!("b{i} "))]).await.unwrap();
    }
    for (da, db) in &pairs {
        settle(&[da, db]).await;
        let text = da.text();
        assert_eq!(text, server_text(&running, da.name()).await);
        assert!(text.contains('a') && text.contains('b'), "{text}");
    }
    assert_eq!(running.server.connected_clients(), 2);
    // Opening a document again gives the same one.
    let again = a.open("doc/3").await.unwrap();
    assert_eq!(again.text(), pairs[3].0.text());
    a.shutdown().await;
    b.shutdown().await;
    running.stop().await;
}

/// The client holds at most MAX_OPEN_DOCS documents open, as the server allows one
/// connection: one more is refused at once, with nothing sent (the server would refuse
/// it too); a document open already still opens; and once a handle is dropped, with its
/// edit acknowledged, there is room again. Offline, the same count holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opens_at_most_max_open_docs_and_a_dropped_handle_makes_room() {
    use quire::client::ClientError;
    use quire::protocol::MAX_OPEN_DOCS;
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let client = Client::connect(config(proxy.addr)).await.unwrap();
    client.wait_connected().await.unwrap();
    let name = |i: usize| format!("many/{i}");
    let mut handles = Vec::new();
    for i in 0..MAX_OPEN_DOCS {
        handles.push(client.open(&name(i)).await.unwrap());
    }
    // (A guard against a hang, not a performance threshold.)
    let past_name = name(MAX_OPEN_DOCS);
    let refused = tokio::time::timeout(Duration::from_secs(60), client.open(&past_name));
    match refused.await.expect("an answer") {
        Err(ClientError::TooManyOpen { max }) => assert_eq!(max, MAX_OPEN_DOCS),
        other => panic!(
            "expected TooManyOpen, got {:?}",
            other.map(|d| d.name().to_owned())
        ),
    }
    assert!(client.open(&name(5)).await.is_ok());
    // Still connected, and serving: an edit on the last one is acknowledged.
    handles[MAX_OPEN_DOCS - 1]
        .edit(&[ins(0, "x")])
        .await
        .unwrap();
    settle(&[&handles[MAX_OPEN_DOCS - 1]]).await;
    assert_eq!(client.state(), ConnectionState::Connected);
    // An edit, then the handle dropped: it closes once the edit is acknowledged.
    let dropped = handles.swap_remove(0);
    dropped.edit(&[ins(0, "kept")]).await.unwrap();
    drop(dropped);
    let past = loop {
        match client.open(&name(MAX_OPEN_DOCS)).await {
            Ok(doc) => break doc,
            Err(ClientError::TooManyOpen { .. }) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(server_text(&running, &name(0)).await, "kept");
    past.edit(&[ins(0, "past")]).await.unwrap();
    settle(&[&past]).await;
    assert_eq!(server_text(&running, &name(MAX_OPEN_DOCS)).await, "past");
    // Offline (the proxy down, the connection cut), the count is the same.
    proxy.set(Mode::Down);
    while !matches!(client.state(), ConnectionState::Reconnecting { .. }) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(
        client.open(&name(0)).await,
        Err(ClientError::TooManyOpen { .. })
    ));
    drop(past);
    client.open(&name(0)).await.unwrap();
    client.shutdown().await;
    running.stop().await;
}

/// A client given further nodes (`ClientConfig::fallback_addrs`) moves its home to the
/// next one each time it cannot reach it, cyclically, and stays at a home it got in.
/// Two proxies to one server stand for two nodes of a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_reach_its_home_tries_its_fallback_addresses_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let (first, second) = (
        Proxy::new(running.addr).await,
        Proxy::new(running.addr).await,
    );
    // Nothing listens at the home address (refused).
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(dead).fallback_addrs([first.addr.to_string(), second.addr.to_string()]);
    cfg.timeout = Duration::from_secs(30);
    let c = Client::connect(cfg).await.unwrap();
    let doc = c.open("fallback").await.unwrap();
    let edit_and_settle = |s: &'static str| {
        let (doc, running) = (&doc, &running);
        async move {
            doc.edit(&[ins(0, s)]).await.unwrap();
            settle(&[doc]).await;
            assert_eq!(doc.text(), server_text(running, "fallback").await);
        }
    };
    edit_and_settle("a").await;
    assert_eq!(
        (first.passed(), second.passed()),
        (1, 0),
        "at the first that answers"
    );

    // Cut off at a home that still answers: the client comes back to it.
    first.cut();
    tokio::time::timeout(Duration::from_secs(30), async {
        while first.passed() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the client reconnects");
    edit_and_settle("b").await;
    assert_eq!(
        (first.passed(), second.passed()),
        (2, 0),
        "back at its home"
    );

    // The home closes every connection before `Welcome` now: the next address.
    first.set(Mode::Down);
    edit_and_settle("c").await;
    assert_eq!(
        (first.passed(), second.passed()),
        (2, 1),
        "moved to the next"
    );

    // That one gone too, the first back: round to it, past the dead address.
    first.set(Mode::Pass);
    second.set(Mode::Down);
    edit_and_settle("d").await;
    assert_eq!(
        (first.passed(), second.passed()),
        (3, 1),
        "round to the first"
    );
    assert_eq!(doc.text(), "dcba");
    c.shutdown().await;
    running.stop().await;
}

/// A node that welcomes every client and answers each `Open` with code 33 ("no node
/// serves it right now, retry"), as a cluster node cut off from etcd does for as long as
/// it is cut off. Counts the `Open`s.
async fn node_cut_off_from_etcd() -> (SocketAddr, Arc<AtomicUsize>) {
    use futures_util::{SinkExt, StreamExt};
    use quire::protocol::frame::FrameCodec;
    use quire::protocol::message::{Envelope, ErrorCode, Message};
    use quire::protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opens = Arc::new(AtomicUsize::new(0));
    let counted = opens.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let opens = counted.clone();
            tokio::spawn(async move {
                let mut framed =
                    tokio_util::codec::Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME));
                while let Some(Ok(env)) = framed.next().await {
                    let reply = match env.message {
                        Message::Hello { client_id, .. } => Message::Welcome {
                            version: PROTOCOL_VERSION,
                            max_frame: DEFAULT_MAX_FRAME as u32,
                            client_id: if client_id == 0 { 1 << 62 } else { client_id },
                        },
                        Message::Open { .. } => {
                            opens.fetch_add(1, Ordering::SeqCst);
                            Message::Error {
                                code: ErrorCode::Unavailable,
                                message: "no node serves it right now, retry".into(),
                            }
                        }
                        _ => continue,
                    };
                    let reply = Envelope {
                        request_id: env.request_id,
                        message: reply,
                    };
                    if framed.send(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, opens)
}

/// A home node that answers but serves nothing (code 33 to every `Open`: cut off from
/// etcd) is left for the next address, where the client's edit is acknowledged; a
/// client given that one address keeps asking it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_home_serves_no_document_moves_to_its_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let (cut_off, opens) = node_cut_off_from_etcd().await;
    let mut cfg = config(cut_off).fallback_addrs([running.addr.to_string()]);
    cfg.timeout = Duration::from_secs(30);
    let c = Client::connect(cfg).await.unwrap();
    let doc = c.open("elsewhere").await.unwrap();
    doc.edit(&[ins(0, "x")]).await.unwrap();
    settle(&[&doc]).await;
    assert_eq!(server_text(&running, "elsewhere").await, "x");
    assert!(
        opens.load(Ordering::SeqCst) >= 1,
        "the home was asked first"
    );
    c.shutdown().await;

    // With no other address there is nowhere else to go: it keeps asking the same node,
    // and its edit stays pending.
    let alone = Client::connect(config(cut_off)).await.unwrap();
    let doc = alone.open("alone").await.unwrap();
    doc.edit(&[ins(0, "y")]).await.unwrap();
    let asked = opens.load(Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), async {
        while opens.load(Ordering::SeqCst) < asked + 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("it asks again, with its backoff");
    assert!(!doc.is_synced());
    assert_eq!(server_text(&running, "alone").await, "");
    alone.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_are_composed_and_kept_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let a = Client::connect(config(proxy.addr)).await.unwrap();
    let b = Client::connect(config(running.addr)).await.unwrap();
    let da = a.open("notes").await.unwrap();
    let db = b.open("notes").await.unwrap();
    let mut events = da.events();
    da.edit(&[ins(0, "start.")]).await.unwrap();
    settle(&[&da, &db]).await;
    let before = running.store.version("notes");

    // A loses the network and types 1,000 characters, one at a time.
    proxy.set(Mode::Down);
    loop {
        if let Some(Event::Connection(ConnectionState::Reconnecting { .. })) = events.recv().await {
            break;
        }
    }
    for i in 0..1000u32 {
        let c = char::from(b'a' + (i % 26) as u8).to_string();
        da.edit(&[ins(6 + i, &c)]).await.unwrap();
    }
    // B keeps editing, and the server restarts meanwhile.
    for i in 0..50 {
        db.edit(&[ins(0, &format!("{i},"))]).await.unwrap();
    }
    settle(&[&db]).await;
    b.shutdown().await;
    running.stop().await;
    let running = common::start(dir.path(), "").await;
    proxy.point_at(running.addr);
    proxy.set(Mode::Pass);

    let b = Client::connect(config(running.addr)).await.unwrap();
    let db = b.open("notes").await.unwrap();
    settle(&[&da, &db]).await;
    let text = da.text();
    assert_eq!(text, server_text(&running, "notes").await);
    let typed: String = (0..1000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    assert!(text.contains(&format!("start.{typed}")), "{text}");
    for i in 0..50 {
        assert!(text.contains(&format!("{i},")), "{text}");
    }
    // 1,000 keystrokes reached the server as a handful of ops, not 1,000.
    let ops = running
        .store
        .ops_after("notes", before, 10_000)
        .unwrap()
        .expect("held")
        .iter()
        .filter(|op| op.id.client_id == a.client_id())
        .count();
    assert!(ops <= 3, "{ops} ops for the offline edits");
    a.shutdown().await;
    b.shutdown().await;
    running.stop().await;
}

/// Found by the cluster simulator (`--cluster --seed 75 --steps 3000`): edits composed
/// while offline grew past what the server's frame limit takes (the client composed up
/// to the default 1 MiB limit, never the server's), and that op could never be sent:
/// the client reconnected forever. Edits are now composed, and split, to fit the
/// limit of the server each op is sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_offline_fit_the_frame_limit_of_the_server_they_reach() {
    let dir = tempfile::tempdir().unwrap();
    let max_frame = 4096;
    let server_config = quire::server::ServerConfig {
        max_frame,
        ..quire::server::ServerConfig::default()
    };
    let running = common::start_with(dir.path(), server_config).await;
    let proxy = Proxy::new(running.addr).await;
    let a = Client::connect(config(proxy.addr)).await.unwrap();
    let da = a.open("small-frames").await.unwrap();
    let mut events = da.events();
    da.edit(&[ins(0, "start.")]).await.unwrap();
    settle(&[&da]).await;

    // Offline, 20,000 characters in 40 edits: five times what one frame carries.
    proxy.set(Mode::Down);
    loop {
        if let Some(Event::Connection(ConnectionState::Reconnecting { .. })) = events.recv().await {
            break;
        }
    }
    let piece: String = (0..500u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for i in 0..40u32 {
        da.edit(&[ins(6 + i * 500, &piece)]).await.unwrap();
    }
    proxy.set(Mode::Pass);
    settle(&[&da]).await;
    let text = server_text(&running, "small-frames").await;
    assert_eq!(text, format!("start.{}", piece.repeat(40)));
    assert_eq!(da.text(), text);
    // Every op the server took fits its limit (and so came in several).
    let ops = running
        .store
        .ops_after("small-frames", 1, 10_000)
        .unwrap()
        .expect("held");
    assert!(ops.len() >= 5, "{} ops", ops.len());
    for op in &ops {
        let bytes = quire::protocol::patches_wire_len(&op.patches);
        assert!(
            bytes <= quire::protocol::max_op_bytes(max_frame),
            "an op of {bytes} B"
        );
    }
    a.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_application_resumes_from_its_directory_and_nothing_applies_twice() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let persisted = || config(proxy.addr).persist_dir(state.path());

    let a = Client::connect(persisted()).await.unwrap();
    a.wait_connected().await.unwrap();
    let id = a.client_id();
    let da = a.open("p").await.unwrap();
    da.edit(&[ins(0, "abc")]).await.unwrap();
    settle(&[&da]).await;

    // The server hears the next op but the client never hears its ack; then the
    // network goes and more is typed offline; then the application dies.
    proxy.set(Mode::Deaf);
    da.edit(&[ins(3, "def")]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !server_text(&running, "p").await.contains("def") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the op never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set(Mode::Down);
    da.edit(&[ins(6, "ghi")]).await.unwrap();
    drop(da);
    a.shutdown().await;
    drop(a);

    // A new process on the same directory: same id, same text, offline at first.
    let a = Client::connect(persisted()).await.unwrap();
    assert_eq!(a.client_id(), id);
    let da = a.open("p").await.unwrap();
    assert_eq!(da.text(), "abcdefghi");
    proxy.set(Mode::Pass);
    settle(&[&da]).await;
    // "def" was resent under its op id and recognised: applied once.
    assert_eq!(server_text(&running, "p").await, "abcdefghi");
    assert_eq!(da.text(), "abcdefghi");
    a.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_server_cannot_catch_up_reloads_and_keeps_its_edits() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let a = Client::connect(config(proxy.addr)).await.unwrap();
    let da = a.open("r").await.unwrap();
    let mut events = da.events();
    da.edit(&[ins(0, "base")]).await.unwrap();
    settle(&[&da]).await;
    let c = Client::connect(config(running.addr)).await.unwrap();
    let dc = c.open("r").await.unwrap();
    dc.set_presence(vec![Selection { anchor: 4, head: 4 }]);

    // An op reaches the server unacknowledged, more is typed offline, and meanwhile
    // the document moves on by more ops than a catch-up carries (a snapshot instead).
    proxy.set(Mode::Deaf);
    da.edit(&[ins(4, "+mine")]).await.unwrap();
    while !server_text(&running, "r").await.contains("+mine") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.set(Mode::Down);
    da.edit(&[ins(0, "offline:")]).await.unwrap();
    c.shutdown().await;
    let store = running.store.clone();
    let mut version = store.version("r");
    for i in 0..10_050u64 {
        let op = SubmitOp {
            op_id: OpId {
                client_id: 42,
                local_seq: i + 1,
            },
            base_version: version,
            expected_version: version,
            expected_incarnation: None,
            fingerprint: i,
            patches: vec![ins(0, "x")],
        };
        match store.submit("r", &op).unwrap() {
            Submitted::Applied { seq, ticket } => {
                version = seq;
                if i == 10_049 {
                    store.wait_durable(ticket).await.unwrap();
                }
            }
            other => panic!("{other:?}"),
        }
    }
    store
        .submit(
            "r",
            &SubmitOp {
                op_id: OpId {
                    client_id: 42,
                    local_seq: 20_000,
                },
                base_version: version,
                expected_version: version,
                expected_incarnation: None,
                fingerprint: 1,
                patches: vec![ins(0, "theirs:")],
            },
        )
        .unwrap();

    proxy.set(Mode::Pass);
    let b = Client::connect(config(running.addr)).await.unwrap();
    let db = b.open("r").await.unwrap();
    settle(&[&da, &db]).await;
    let text = da.text();
    assert_eq!(text, server_text(&running, "r").await);
    assert_eq!(text.matches("+mine").count(), 1, "{text}");
    assert!(
        text.contains("offline:") && text.contains("theirs:"),
        "{text}"
    );
    let mut reloaded = false;
    while let Some(e) = events.try_recv() {
        reloaded |= matches!(e, Event::Reloaded { .. });
    }
    assert!(reloaded, "no Reloaded event");
    a.shutdown().await;
    b.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_cursors_follow_the_text_and_vanish_with_their_client() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let a = Client::connect(config(running.addr)).await.unwrap();
    let b = Client::connect(config(running.addr)).await.unwrap();
    let da = a.open("c").await.unwrap();
    let db = b.open("c").await.unwrap();
    da.edit(&[ins(0, "hello world")]).await.unwrap();
    settle(&[&da, &db]).await;
    let mut events = da.events();
    db.set_presence(vec![Selection {
        anchor: 6,
        head: 11,
    }]);
    let b_id = b.client_id();
    loop {
        if let Some(Event::Presence { client_id, .. }) = events.recv().await {
            assert_eq!(client_id, b_id);
            break;
        }
    }
    assert_eq!(
        da.presence()[&b_id],
        vec![Selection {
            anchor: 6,
            head: 11
        }]
    );
    // A local edit before the selection moves it.
    da.edit(&[ins(0, ">> ")]).await.unwrap();
    assert_eq!(
        da.presence()[&b_id],
        vec![Selection {
            anchor: 9,
            head: 14
        }]
    );
    // So does a remote one.
    settle(&[&da, &db]).await;
    db.edit(&[ins(0, "¡")]).await.unwrap();
    settle(&[&da, &db]).await;
    assert_eq!(
        da.presence()[&b_id],
        vec![Selection {
            anchor: 10,
            head: 15
        }]
    );
    b.shutdown().await;
    loop {
        if let Some(Event::Presence {
            client_id,
            selections,
        }) = events.recv().await
        {
            if client_id == b_id && selections.is_empty() {
                break;
            }
        }
    }
    assert!(da.presence().is_empty());
    a.shutdown().await;
    running.stop().await;
}

/// Bob's editor as a process of its own (`quire demo-client`, the one `quire demo`
/// runs) on a persistence directory, sending each edit as soon as it is made.
struct EditorProcess {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    replies: std::sync::mpsc::Receiver<String>,
}

impl EditorProcess {
    fn start(addr: SocketAddr, dir: &std::path::Path, doc: &str) -> EditorProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quire"))
            .args([
                "demo-client",
                "--addr",
                &addr.to_string(),
                "--doc",
                doc,
                "--dir",
            ])
            .arg(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the quire binary starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        EditorProcess {
            child,
            stdin,
            replies,
        }
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{command}").unwrap();
    }

    fn reply(&mut self) -> serde_json::Value {
        let line = self.replies.recv_timeout(Duration::from_secs(10)).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_process_killed_at_any_moment_keeps_every_returned_edit_once() {
    // Killed with SIGKILL 40 times, each time right after being told to make one more
    // edit (somewhere between before the edit and after its ack), and started again on
    // its directory, while another client edits and the server restarts every 10 kills.
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let a = Client::connect(config(proxy.addr)).await.unwrap();
    let da = a.open("k").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut returned, mut unknown) = (Vec::new(), Vec::new());
    let mut n = 0;
    for round in 1..=40 {
        let mut bob = EditorProcess::start(proxy.addr, state.path(), "k");
        for last in (0..1 + rng.usize(..6)).rev() {
            n += 1;
            let item = format!(" b{n}.");
            bob.send(&format!("append {}", serde_json::json!(item)));
            if last == 0 {
                std::thread::sleep(Duration::from_micros(rng.u64(..3000)));
                unknown.push(item);
                break;
            }
            bob.reply();
            returned.push(item);
            let mine = format!(" a{n}.");
            let end = da.text().chars().count() as u32;
            da.edit(&[ins(end, &mine)]).await.unwrap();
            returned.push(mine);
        }
        bob.kill();
        if round % 10 == 0 {
            running.stop().await;
            running = common::start(dir.path(), "").await;
            proxy.point_at(running.addr);
        }
    }
    // Started once more, it settles with the others.
    let mut bob = EditorProcess::start(proxy.addr, state.path(), "k");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let bob_text = loop {
        bob.send("status");
        let s = bob.reply();
        let version = s["version"].as_u64();
        if s["state"] == "online"
            && s["synced"] == true
            && da.is_synced()
            && version == Some(da.version())
            && version == Some(running.store.version("k"))
        {
            break s["text"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    bob.send("quit");
    bob.reply();
    let text = server_text(&running, "k").await;
    assert_eq!(bob_text, text);
    assert_eq!(da.text(), text);
    for item in &returned {
        assert_eq!(text.matches(item.as_str()).count(), 1, "{item} in {text}");
    }
    for item in &unknown {
        assert!(text.matches(item.as_str()).count() <= 1, "{item} in {text}");
    }
    a.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_sent_again_after_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    let proxy = Proxy::new(running.addr).await;
    let a = Client::connect(config(running.addr)).await.unwrap();
    let b = Client::connect(config(proxy.addr)).await.unwrap();
    let da = a.open("p").await.unwrap();
    let db = b.open("p").await.unwrap();
    da.edit(&[ins(0, "abcdef")]).await.unwrap();
    settle(&[&da, &db]).await;
    let mut events = da.events();
    db.set_presence(vec![Selection { anchor: 2, head: 2 }]);
    let b_id = b.client_id();
    wait_for(&mut events, b_id, 1).await;
    // B's connection drops: A sees its cursor go; B comes back and shows it again.
    proxy.set(Mode::Down);
    wait_for(&mut events, b_id, 0).await;
    assert!(da.presence().is_empty());
    proxy.set(Mode::Pass);
    wait_for(&mut events, b_id, 1).await;
    assert_eq!(da.presence()[&b_id], vec![Selection { anchor: 2, head: 2 }]);
    a.shutdown().await;
    b.shutdown().await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_for_good_and_edits_still_apply_locally() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "a secret of the tests";
    let running = common::start(dir.path(), secret).await;
    let client = Client::connect(config(running.addr).token("wrong"))
        .await
        .unwrap();
    match client.wait_connected().await {
        Err(quire::client::ClientError::Refused { code, .. }) => {
            assert_eq!(code, quire::protocol::message::ErrorCode::InvalidToken)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(client.state(), ConnectionState::Failed { .. }));
    let doc = client.open("d").await.unwrap();
    doc.edit(&[ins(0, "kept locally")]).await.unwrap();
    assert_eq!(doc.text(), "kept locally");
    // The right token works.
    let token = common::mint(secret, "*", quire::auth::Access::Write);
    let good = Client::connect(config(running.addr).token(token))
        .await
        .unwrap();
    good.wait_connected().await.unwrap();
    client.shutdown().await;
    good.shutdown().await;
    running.stop().await;
}

/// Waits for a presence event of `client` with `n` selections.
async fn wait_for(events: &mut quire::client::Events, client: u64, n: usize) {
    loop {
        if let Some(Event::Presence {
            client_id,
            selections,
        }) = events.recv().await
        {
            if client_id == client && selections.len() == n {
                return;
            }
        }
    }
}

/// A node that serves one document at version 3 ("abc") and, at the first op sent,
/// answers as a cluster node whose deletion of the document just failed: a `Redirect`
/// to itself (its sessions open the document again there, request id 0), then the
/// `Redirect` that answers the op (sent before that `Open`). Each `Open` gets a
/// catch-up (nothing new); a later op is acknowledged at seq 4. Answers pings.
async fn node_redirecting_to_itself() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use quire::protocol::frame::FrameCodec;
    use quire::protocol::message::{Envelope, Message};
    use quire::protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME));
        let (mut opens, mut submits) = (0, 0);
        while let Some(Ok(env)) = framed.next().await {
            let id = env.request_id;
            let replies: Vec<(u32, Message)> = match env.message {
                Message::Hello { .. } => vec![(
                    id,
                    Message::Welcome {
                        version: PROTOCOL_VERSION,
                        max_frame: DEFAULT_MAX_FRAME as u32,
                        client_id: 1 << 62,
                    },
                )],
                Message::Ping { nonce } => vec![(id, Message::Pong { nonce })],
                Message::Open { doc, .. } => {
                    opens += 1;
                    let ops = Message::Ops {
                        doc: doc.clone(),
                        more: false,
                        ops: Vec::new(),
                    };
                    if opens == 1 {
                        let snapshot = Message::Snapshot {
                            doc,
                            version: 3,
                            total_len: 3,
                            text: "abc".into(),
                        };
                        vec![(id, snapshot), (id, ops)]
                    } else {
                        vec![(id, ops)]
                    }
                }
                Message::Submit { doc, local_seq, .. } => {
                    submits += 1;
                    let redirect = Message::Redirect {
                        doc: doc.clone(),
                        addr: addr.to_string(),
                        ws_url: String::new(),
                    };
                    if submits == 1 {
                        vec![(0, redirect.clone()), (id, redirect)]
                    } else {
                        vec![(
                            id,
                            Message::Ack {
                                doc,
                                local_seq,
                                seq: 4,
                            },
                        )]
                    }
                }
                _ => continue,
            };
            for (request_id, message) in replies {
                let reply = Envelope {
                    request_id,
                    message,
                };
                if framed.send(&reply).await.is_err() {
                    return;
                }
            }
        }
    });
    addr
}

/// Two `Redirect`s of a document to the node it is at (one of them answering an op sent
/// before the first) make the client open it twice; the reply to the second `Open`
/// comes once it is live again. That reply is stale and changes nothing: the op's `Ack`
/// that follows is taken (the client took the stale reply for the end of an `Open`
/// and stopped, its edit pending for ever: the simulator's cluster world, seed 631 of
/// 400..1400 at 1,000 steps, a failed deletion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_open_reply_after_two_redirects_to_the_same_node_changes_nothing() {
    let addr = node_redirecting_to_itself().await;
    let mut cfg = config(addr);
    // Only the script's own answers move it on (no reconnect to hide a stall).
    cfg.timeout = Duration::from_secs(600);
    let client = Client::connect(cfg).await.unwrap();
    let doc = client.open("d").await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while doc.version() != 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("opened");
    assert_eq!(doc.text(), "abc");
    doc.edit(&[ins(3, "d")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !doc.is_synced() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the ack was taken: unacked {:?}", doc.unacked()));
    assert_eq!((doc.text().as_str(), doc.version()), ("abcd", 4));
    client.abort();
}

/// Ops the server refused with `code`, from its metrics.
fn rejected(running: &common::Running, code: u16) -> f64 {
    let code = code.to_string();
    running
        .server
        .metrics()
        .gather()
        .iter()
        .filter(|f| f.name() == "quire_ops_rejected_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "code" && l.value() == code)
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// A document closed (its handles dropped) and opened again in the same client, with
/// and without a persistence directory, or another one opened after it, sends its next
/// op under an id it never used there: none is refused as a reused op id (code 26),
/// which cost one refusal and a reload per op the client had sent to it before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_opened_again_after_it_was_closed_sends_new_ops_under_new_ids() {
    let dir = tempfile::tempdir().unwrap();
    let running = common::start(dir.path(), "").await;
    for persist in [false, true] {
        let persist_dir = tempfile::tempdir().unwrap();
        let mut config = config(running.addr);
        if persist {
            config.persist_dir = Some(persist_dir.path().to_path_buf());
        }
        let client = Client::connect(config).await.unwrap();
        let name = format!("reopened-{persist}");
        let (mut doc, mut events) = client.open_with_events(&name).await.unwrap();
        for i in 0..5 {
            doc.edit(&[ins(0, &format!("{i} "))]).await.unwrap();
            settle(&[&doc]).await;
        }
        drop((doc, events));
        let other = client.open(&format!("other-{persist}")).await.unwrap();
        drop(other);
        for round in 0..2 {
            // Dropped: closed once nothing is pending, which it is; opened again.
            (doc, events) = client.open_with_events(&name).await.unwrap();
            assert_eq!(doc.version(), 5 + round);
            doc.edit(&[ins(0, "again ")]).await.unwrap();
            settle(&[&doc]).await;
            let acked: Vec<u64> = std::iter::from_fn(|| events.try_recv())
                .filter_map(|e| match e {
                    Event::Acked { local_seq, .. } => Some(local_seq),
                    _ => None,
                })
                .collect();
            assert!(acked.last().is_some_and(|&l| l > 5 + round), "{acked:?}");
            drop((doc, events));
        }
        assert_eq!(rejected(&running, 26), 0.0, "persist {persist}");
        let text = server_text(&running, &name).await;
        assert_eq!(text, "again again 4 3 2 1 0 ");
        client.shutdown().await;
    }
    running.stop().await;
}
