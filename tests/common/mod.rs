//! Helpers shared by the integration tests that run a server over TCP.
#![allow(dead_code)]

pub mod wrapped;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quire::auth::{Access, Grant, Keys, Scope};
use quire::client::connection::Connection;
use quire::client::state::ClientDoc;
use quire::client::{Client, ClientConfig, Connector, DocHandle};
use quire::op::Patch;
use quire::protocol::message::{Envelope, Message};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::server::{Server, ServerConfig};
use quire::wal::WalConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<usize>,
    pub store: Arc<LocalSequencer>,
    pub server: Arc<Server<LocalSequencer>>,
}

impl Running {
    /// Stops the server; returns how many sessions it cut off at the end of its grace
    /// period (see `Server::serve`).
    pub async fn stop(mut self) -> usize {
        let _ = self.stop.take().unwrap().send(());
        let cut_off = self.task.await.unwrap();
        self.store.close();
        cut_off
    }
}

pub fn store_config() -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: 4 << 20,
            ..WalConfig::default()
        },
        ..LocalConfig::default()
    }
}

/// A server on 127.0.0.1 whose tokens are signed with `secret` (at least 16 bytes), or
/// with anonymous clients for "".
pub async fn start(dir: &Path, secret: &str) -> Running {
    let keys = (!secret.is_empty()).then(|| Arc::new(Keys::new(&[secret]).unwrap()));
    start_with(
        dir,
        ServerConfig {
            keys,
            ..ServerConfig::default()
        },
    )
    .await
}

/// A token signed with `secret`, granting `access` to `scope` (`*`, `prefix/*` or a
/// document id) until `expires_unix_secs`.
pub fn mint_until(secret: &str, scope: &str, access: Access, expires_unix_secs: u64) -> String {
    Keys::new(&[secret]).unwrap().mint(&Grant {
        scope: Scope::parse(scope).unwrap(),
        access,
        expires_unix_secs,
        subject: "test".into(),
    })
}

/// As [`mint_until`], valid for an hour.
pub fn mint(secret: &str, scope: &str, access: Access) -> String {
    mint_until(secret, scope, access, quire::auth::now_unix_secs() + 3600)
}

pub async fn start_with(dir: &Path, config: ServerConfig) -> Running {
    start_with_store(dir, store_config(), config).await
}

pub async fn start_with_store(dir: &Path, store: LocalConfig, config: ServerConfig) -> Running {
    let (store, _) = LocalSequencer::open(dir, store).unwrap();
    serve(Arc::new(store), config).await
}

/// A client's configuration for the tests: reconnects after a lost connection within
/// milliseconds (a restarted server is found at once), a fixed jitter seed.
pub fn client_config(addr: SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(100);
    c.seed = Some(7);
    c
}

/// A client (its id given by the server) with one document open, connected through
/// its own [`Link`]. Derefs to the document.
pub struct Opened {
    pub client: Client,
    pub doc: DocHandle,
    pub link: Link,
}

impl std::ops::Deref for Opened {
    type Target = DocHandle;
    fn deref(&self) -> &DocHandle {
        &self.doc
    }
}

impl Opened {
    /// Waits until every edit made so far is acknowledged, and checks that the client
    /// did it over the connection it opened the document on: nothing the server sent
    /// (an error, a refused op) made it reconnect.
    pub async fn settle(&self) {
        self.doc.synced().await.unwrap();
        self.assert_one_connection();
    }

    /// The client never reconnected.
    pub fn assert_one_connection(&self) {
        assert_eq!(
            self.link.connections(),
            1,
            "the client reconnected (the server ended or refused its connection)"
        );
    }

    /// Shuts the client down (its edits acknowledged, if it can).
    pub async fn close(self) {
        self.client.shutdown().await;
    }
}

/// A new client of `addr` with `doc` open, loaded from the server.
pub async fn open(addr: SocketAddr, doc: &str) -> Opened {
    open_with(client_config(addr), doc).await
}

/// As [`open`], with `config` (its `addr` is where the [`Link`] connects).
pub async fn open_with(config: ClientConfig, doc: &str) -> Opened {
    let link = Link::new(config.addr.parse().expect("a socket address"));
    let client = Client::with_connector(config, link.clone()).await.unwrap();
    // Connected first: then `open` returns once the document is loaded.
    client.wait_connected().await.unwrap();
    let doc = client.open(doc).await.unwrap();
    Opened { client, doc, link }
}

/// The text and version of `doc` as a new client opens it from the server.
pub async fn read_back(addr: SocketAddr, doc: &str) -> (String, u64) {
    let reader = open(addr, doc).await;
    let got = (reader.text(), reader.version());
    reader.assert_one_connection();
    reader.close().await;
    got
}

/// Waits until `doc` has applied the server's seq `version`.
pub async fn wait_for_version(doc: &DocHandle, version: u64) {
    let mut events = doc.events();
    while doc.version() < version {
        events.recv().await.expect("the client is running");
    }
}

/// How the tests' clients reach the server: TCP to an address that can change (a
/// restarted server listens elsewhere), counting the connections made, and able to
/// hold what the server sends (a client that lags behind: it reads nothing until
/// released, so its edits are made on an old version and its acks wait).
#[derive(Clone)]
pub struct Link(Arc<LinkState>);

struct LinkState {
    addr: Mutex<SocketAddr>,
    connections: AtomicUsize,
    hold: Mutex<Hold>,
}

#[derive(Default)]
struct Hold {
    held: bool,
    wakers: Vec<Waker>,
}

impl Link {
    pub fn new(addr: SocketAddr) -> Link {
        Link(Arc::new(LinkState {
            addr: Mutex::new(addr),
            connections: AtomicUsize::new(0),
            hold: Mutex::new(Hold::default()),
        }))
    }

    /// Connections from now on go to `addr`.
    pub fn point_at(&self, addr: SocketAddr) {
        *self.0.addr.lock().unwrap() = addr;
    }

    /// Connections made (handshakes attempted) so far.
    pub fn connections(&self) -> usize {
        self.0.connections.load(Ordering::SeqCst)
    }

    /// Holds (true) or releases what the server sends.
    pub fn hold(&self, held: bool) {
        let mut hold = self.0.hold.lock().unwrap();
        hold.held = held;
        if !held {
            hold.wakers.drain(..).for_each(Waker::wake);
        }
    }
}

impl Connector for Link {
    type Stream = LinkStream;
    async fn connect(&self) -> io::Result<LinkStream> {
        let addr = *self.0.addr.lock().unwrap();
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        self.0.connections.fetch_add(1, Ordering::SeqCst);
        Ok(LinkStream {
            stream,
            link: self.0.clone(),
        })
    }
}

/// A connection made by a [`Link`].
pub struct LinkStream {
    stream: TcpStream,
    link: Arc<LinkState>,
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        {
            let mut hold = this.link.hold.lock().unwrap();
            if hold.held {
                if !hold.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    hold.wakers.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A document edited over the raw protocol, each edit its own op, up to `n` of them
/// in flight without waiting for acks (pipelining by hand, see "Pipelining" in
/// protocol.md): what the [`Client`], one op in flight and later edits composed, never
/// does. Any error or refusal from the server fails the test.
pub struct Pipelined {
    pub conn: Connection,
    pub name: String,
    pub doc: ClientDoc,
    /// Ops sent.
    pub ops_sent: u64,
}

impl Pipelined {
    /// Opens `name` on a new connection (its client id given by the server).
    pub async fn open(addr: SocketAddr, name: &str, n: usize) -> Pipelined {
        let mut conn = Connection::connect(addr, 0, "").await.unwrap();
        conn.send(Message::Open {
            doc: name.into(),
            known_version: 0,
        })
        .await
        .unwrap();
        let mut snapshot = String::new();
        let mut doc: Option<ClientDoc> = None;
        loop {
            match conn.recv().await.unwrap().message {
                Message::Snapshot {
                    version,
                    total_len,
                    text,
                    ..
                } => {
                    snapshot.push_str(&text);
                    if snapshot.len() as u64 >= total_len {
                        doc = Some(ClientDoc::new(std::mem::take(&mut snapshot), version, 1));
                    }
                }
                Message::Ops { ops, more, .. } => {
                    let d = doc.get_or_insert_with(|| ClientDoc::new(String::new(), 0, 1));
                    for op in ops {
                        if op.seq > d.version() {
                            d.on_remote(op.seq, &op.patches).unwrap();
                        }
                    }
                    if !more {
                        break;
                    }
                }
                Message::Error { code, message } => panic!("opening {name}: {code:?}: {message}"),
                _ => {}
            }
        }
        let doc = doc
            .expect("opened")
            .with_max_op_bytes(quire::protocol::max_op_bytes(conn.max_frame))
            .without_composing()
            .pipelined(n);
        Pipelined {
            conn,
            name: name.into(),
            doc,
            ops_sent: 0,
        }
    }

    /// Applies a local edit and sends what may be sent.
    pub async fn edit(&mut self, patches: &[Patch]) {
        self.doc.local_edit(patches).unwrap();
        self.flush().await;
    }

    async fn flush(&mut self) {
        while let Some(out) = self.doc.take_to_send() {
            self.ops_sent += 1;
            self.conn.queue(out.into_submit(&self.name)).unwrap();
        }
        self.conn.flush().await.unwrap();
    }

    fn sequenced(&mut self, seq: u64, client_id: u64, local_seq: u64, patches: &[Patch]) {
        let mine = client_id == self.conn.client_id
            && self
                .doc
                .in_flight()
                .is_some_and(|o| o.local_seq == local_seq);
        if mine {
            self.doc.on_ack(local_seq, seq).unwrap();
        } else {
            self.doc.on_remote(seq, patches).unwrap();
        }
    }

    fn apply(&mut self, env: Envelope) {
        match env.message {
            Message::Ack { local_seq, seq, .. } => self.doc.on_ack(local_seq, seq).unwrap(),
            Message::Remote { op, .. } => {
                self.sequenced(op.seq, op.client_id, op.local_seq, &op.patches)
            }
            Message::Ops { ops, .. } => {
                for op in ops {
                    self.sequenced(op.seq, op.client_id, op.local_seq, &op.patches);
                }
            }
            m @ (Message::Reject { .. } | Message::Error { .. }) => {
                panic!("{}: the server refused: {m:?}", self.name)
            }
            _ => {}
        }
    }

    /// Receives and applies one message, then sends what became sendable.
    pub async fn pump(&mut self) {
        let env = self.conn.recv().await.unwrap();
        self.apply(env);
        self.flush().await;
    }

    /// Applies what the server already sent, without waiting, then sends what became
    /// sendable.
    pub async fn poll(&mut self) {
        while let Some(env) = self.conn.try_recv().unwrap() {
            self.apply(env);
        }
        self.flush().await;
    }

    /// Waits until every local edit is acknowledged.
    pub async fn settle(&mut self) {
        self.flush().await;
        while self.doc.has_pending() {
            self.pump().await;
        }
    }
}

/// A server on the simulated disk (for holding or failing its syncs).
pub async fn start_on_sim(fs: &quire::wal::vfs::sim::SimFs, config: ServerConfig) -> Running {
    start_on_sim_with(fs, store_config(), config).await
}

/// [`start_on_sim`] with the storage's settings.
pub async fn start_on_sim_with(
    fs: &quire::wal::vfs::sim::SimFs,
    store: LocalConfig,
    config: ServerConfig,
) -> Running {
    let (store, _) =
        LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), store).unwrap();
    serve(Arc::new(store), config).await
}

async fn serve(store: Arc<LocalSequencer>, config: ServerConfig) -> Running {
    let listener = quire::server::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(store.clone(), config);
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.clone().serve(listener, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        task,
        store,
        server,
    }
}

/// Receives until a message that is not a broadcast (Remote, PresenceState).
pub async fn next_reply(conn: &mut Connection) -> quire::protocol::message::Message {
    use quire::protocol::message::Message;
    loop {
        match conn.recv().await.unwrap().message {
            Message::Remote { .. } | Message::PresenceState { .. } => continue,
            other => return other,
        }
    }
}

/// A patch of a synthetic trace: `[pos, del, ins]`.
pub type P<'a> = (u32, u32, &'a str);

/// A concurrent trace in the editing-traces JSON format (../shared/traces/README.md),
/// from its txns as (agent, parents, patches).
pub fn concurrent_trace_json(end: &str, txns: &[(usize, &[usize], &[P])]) -> Vec<u8> {
    use serde_json::json;
    let num_agents = txns.iter().map(|t| t.0 + 1).max().unwrap_or(1);
    let listed: Vec<_> = txns
        .iter()
        .enumerate()
        .map(|(i, (agent, parents, patches))| {
            let children = txns.iter().filter(|t| t.1.contains(&i)).count();
            let patches: Vec<_> = patches.iter().map(|(p, d, s)| json!([p, d, s])).collect();
            json!({"parents": parents, "numChildren": children, "agent": agent,
                   "time": "1970-01-01T00:00:00+00:00", "patches": patches})
        })
        .collect();
    serde_json::to_vec(&json!({"kind": "concurrent", "endContent": end,
                               "numAgents": num_agents, "txns": listed}))
    .unwrap()
}

/// Three long-lived branches: after "0123456789", A, B and C each insert a letter
/// without seeing the others', then each edits having seen exactly one other branch:
/// A sees B's, B sees C's, C sees A's. No server order gives every client its version
/// (B before C before A before B), so one txn cannot be made on its parent version:
/// with the lazy sends of `replay_concurrent`, C's (t6), whose client receives B's
/// insert while it waits for A's. Returns the trace and its end text.
pub fn long_lived_branches_trace() -> (Vec<u8>, &'static str) {
    let end = "a01B234C56A89b!";
    let json = concurrent_trace_json(
        end,
        &[
            (0, &[], &[(0, 0, "0123456789")]),
            (1, &[0], &[(2, 0, "B")]),     // t1: 01B23456789
            (2, &[0], &[(5, 0, "C")]),     // t2: 01234C56789
            (0, &[0], &[(8, 0, "A")]),     // t3: 01234567A89
            (0, &[3, 1], &[(0, 0, "a")]),  // t4: a01B234567A89
            (1, &[1, 2], &[(12, 0, "b")]), // t5: 01B234C56789b
            (2, &[2, 3], &[(8, 1, "")]),   // t6: 01234C56A89 (deletes the 7)
            (0, &[4, 5, 6], &[(14, 0, "!")]),
        ],
    );
    (json, end)
}

/// The attempt numbers of the next `n` reconnects a client's events tell of (each
/// `ConnectionState::Reconnecting`); fails the test if they do not come within 30 s.
pub async fn reconnect_attempts(events: &mut quire::client::Events, n: usize) -> Vec<u32> {
    use quire::client::{ConnectionState, Event};
    let mut attempts = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while attempts.len() < n {
            match events.recv().await {
                Some(Event::Connection(ConnectionState::Reconnecting { attempt, .. })) => {
                    attempts.push(attempt)
                }
                Some(_) => {}
                None => panic!("the client stopped; reconnects so far: {attempts:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} reconnects within 30 s; got {attempts:?}"));
    attempts
}
