//! The client applications use: a [`Client`] owns one connection (in a background
//! task that reconnects by itself) and any number of open documents, each reached
//! through a [`DocHandle`].
//!
//! ```no_run
//! # async fn example() -> Result<(), quire::client::ClientError> {
//! use quire::client::{Client, ClientConfig, Event};
//! use quire::op::Patch;
//!
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7420")).await?;
//! let doc = client.open("notes/today").await?;
//! let mut events = doc.events();
//! doc.edit(&[Patch::new(0, 0, "hello ")]).await?;
//! println!("{}", doc.text());
//! while let Some(event) = events.recv().await {
//!     if let Event::Acked { seq, .. } = event {
//!         println!("durable on the server as seq {seq}");
//!         break;
//!     }
//! }
//! client.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Edits apply to [`DocHandle::text`] at once, whether the connection is up or not;
//! the client sends them when it can (composed: an hour offline costs messages in
//! proportion to what changed, not to the keystrokes), rebases them over what others
//! did meanwhile, and, with a persistence directory
//! ([`ClientConfig::persist_dir`]), keeps them on disk before `edit` returns, so that
//! a client restarted on that directory resumes with the same client id and op ids.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::connection::{Connection, Stream};
use super::state::{ClientDoc, DocError};
use super::store::{self, Store};
use crate::op::Patch;
use crate::protocol::message::{ErrorCode, Message, Selection, WireOp};
use crate::protocol::MAX_OPEN_DOCS;

/// What went wrong, keeping the server's code where the server refused.
#[derive(Debug)]
pub enum ClientError {
    /// The server refused, for good: a token it does not accept (invalid, expired, or
    /// not granting a document the application opened or edits), an unsupported
    /// protocol version, an invalid document id, or a failed storage on its side.
    Refused { code: ErrorCode, message: String },
    /// A local edit does not apply to the local text.
    OutOfRange,
    /// A local edit larger than the server takes in one op: split it.
    TooLarge { bytes: usize, max: usize },
    /// The client has [`MAX_OPEN_DOCS`] documents open, the most a connection may:
    /// drop the handles of one (it closes once its edits are acknowledged, or
    /// persisted) before opening another.
    TooManyOpen { max: usize },
    /// The persistence directory could not be read or written.
    Persist(io::Error),
    /// The client was shut down (or its task ended).
    Closed,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused { code, message } => {
                write!(f, "refused by the server ({code:?}): {message}")
            }
            ClientError::OutOfRange => f.write_str("the edit does not apply to the local text"),
            ClientError::TooLarge { bytes, max } => write!(
                f,
                "an edit of {bytes} bytes is larger than the server takes in one op ({max})"
            ),
            ClientError::TooManyOpen { max } => write!(
                f,
                "{max} documents are open, the most a connection may; close one first"
            ),
            ClientError::Persist(e) => write!(f, "persistence directory: {e}"),
            ClientError::Closed => f.write_str("the client is shut down"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<DocError> for ClientError {
    fn from(e: DocError) -> Self {
        match e {
            DocError::OutOfRange => ClientError::OutOfRange,
            DocError::TooLarge { bytes, max } => ClientError::TooLarge { bytes, max },
            DocError::Protocol(m) => ClientError::Refused {
                code: ErrorCode::Malformed,
                message: m,
            },
        }
    }
}

/// The state of the client's connection, as [`Event::Connection`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting for the first time.
    Connecting,
    /// Connected, and every open document reopened.
    Connected,
    /// The connection was lost (or never made); the next attempt is after `retry_in`.
    /// Edits keep applying locally and are queued.
    Reconnecting { attempt: u32, retry_in: Duration },
    /// The server refused this client for good: nothing more is sent, and edits keep
    /// applying locally (and persist, with a directory). `code` says why: 7 or 12, its
    /// access token is invalid or expired; 29, the token does not grant a document the
    /// application opened; 31, it grants one the application edits for reading only;
    /// 5 or 6, the protocol. A new token needs a new [`Client`].
    Failed { code: ErrorCode, message: String },
    /// [`Client::shutdown`] was called.
    Closed,
}

impl ConnectionState {
    /// The error for a client that stopped for good (refused, or shut down).
    fn gave_up(&self) -> Option<ClientError> {
        match self {
            ConnectionState::Failed { code, message } => Some(ClientError::Refused {
                code: *code,
                message: message.clone(),
            }),
            ConnectionState::Closed => Some(ClientError::Closed),
            _ => None,
        }
    }
}

/// What happened to a document that its application did not do itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Another client's op (its op id: `client_id` and `local_seq`), sequenced as
    /// `seq` and applied to the local text: the patches apply to the local text as it
    /// was just before (they are rebased over this client's pending edits, and may be
    /// none when its change was already made locally, as a delete of deleted text).
    Remote {
        seq: u64,
        client_id: u64,
        local_seq: u64,
        patches: Vec<Patch>,
    },
    /// One of this client's ops (its op id: this client's id and `local_seq`) is
    /// durable on the server as `seq`.
    Acked { seq: u64, local_seq: u64 },
    /// Another client's cursors and selections, in the local text's code points (none:
    /// it left).
    Presence {
        client_id: u64,
        selections: Vec<Selection>,
    },
    /// The connection changed state.
    Connection(ConnectionState),
    /// The document was reloaded from the server's snapshot (the server no longer held
    /// the ops this client missed, or it refused one of its ops): `patches` turn the
    /// local text as it was into the local text now, which keeps every local edit
    /// (see protocol.md, "Reload").
    Reloaded { patches: Vec<Patch> },
}

/// How to reach the server, and the client's limits.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the server (in a cluster: the node the client starts at, its
    /// home).
    pub addr: String,
    /// Further nodes of the same cluster (`host:port`), tried in turn when the home node
    /// cannot be reached: each failed attempt to connect (refused, timed out, or cut off
    /// before `Welcome`) moves the home to the next of `addr` and these, cyclically,
    /// with the usual backoff between attempts. A connection that got its `Welcome`
    /// keeps its node as home: after a loss the same node is tried first, unless the
    /// loss was an answer that no node serves a document right now (code 33), which a
    /// node cut off from etcd gives for every document while the others serve: that
    /// moves the home on too. Empty (the default): `addr` only. Reached through [`Connector::connect_to`]. Give each node
    /// as it advertises itself (`quire serve --advertise`), or by a name that resolves to
    /// the same socket address: a `Redirect` to the home node is recognised by it
    /// ([`Connector::same_node`]), and carried on the home connection.
    pub fallback_addrs: Vec<String>,
    /// The access token sent in `Hello` (protocol.md, "Access tokens"); empty for a
    /// server without secrets. A refusal by it stops the client for good
    /// ([`ConnectionState::Failed`]) instead of retrying.
    pub token: String,
    /// Where offline edits survive a restart of the application (none: in memory only).
    pub persist_dir: Option<PathBuf>,
    /// A `Ping` is sent this often: below the server's idle deadline (60 s by default)
    /// and below `timeout`, so that a connection that is well is heard from in time.
    pub ping_interval: Duration,
    /// The connection is given up as dead once nothing arrived on it for this long (a
    /// ping unanswered), then and not at a later ping; likewise a connection to
    /// another node; and a connect and handshake that take longer.
    pub timeout: Duration,
    /// Reconnect delays: doubling from `backoff_min` up to `backoff_max`, each with
    /// random jitter (a half to the whole of it). The delay starts over at `backoff_min`
    /// once the client makes progress (an op acknowledged, or a document served with no
    /// op in flight; with no document open, a `Welcome`), not on every connect; and not
    /// when the connection is dropped for a document that made none (an op told to
    /// retry, code 33, or redirects round in circles), whatever other documents did.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long [`Client::shutdown`] waits for pending edits to be acknowledged.
    pub shutdown_timeout: Duration,
    /// Seed of the jitter (tests and the simulator fix it; by default it varies).
    pub seed: Option<u64>,
    /// Writes the persistence directory on the calling task instead of a blocking
    /// thread (the simulator: one thread, deterministic).
    pub inline_io: bool,
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            fallback_addrs: Vec::new(),
            token: String::new(),
            persist_dir: None,
            ping_interval: Duration::from_secs(15),
            timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
            seed: None,
            inline_io: false,
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    pub fn persist_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.persist_dir = Some(dir.into());
        self
    }

    /// Sets [`ClientConfig::fallback_addrs`].
    pub fn fallback_addrs<S: Into<String>>(mut self, addrs: impl IntoIterator<Item = S>) -> Self {
        self.fallback_addrs = addrs.into_iter().map(Into::into).collect();
        self
    }
}

/// How the client's task reaches the server: TCP by default; the simulator's network
/// in tests.
pub trait Connector: Send + Sync + 'static {
    type Stream: Stream + 'static;
    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// Connects to the node a `Redirect` named (protocol.md, Redirects): its TCP
    /// `addr`, or its WebSocket `ws_url` for a connector over WebSockets. The default
    /// cannot (an error that names `addr`, as it also answers for
    /// [`Connector::connect_fallback`]): such a client retries at its home address with
    /// backoff.
    fn connect_to(
        &self,
        addr: &str,
        ws_url: &str,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        let _ = ws_url;
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this connector reaches its home address only, not {addr}"),
        )))
    }

    /// Connects to `addr`, one of [`ClientConfig::fallback_addrs`], while the home
    /// address cannot be reached. The default is [`Connector::connect_to`] with no
    /// WebSocket URL (a TCP connector's); a connector over WebSockets knows each
    /// fallback's URL itself, as a browser's client is given its fallback URLs.
    fn connect_fallback(
        &self,
        addr: &str,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        self.connect_to(addr, "")
    }

    /// Whether `addr`, a `Redirect`'s, names the node at `home`, the address the home
    /// connection was made to: a redirect to the home node is carried on the home
    /// connection, as a second connection there with this client's id would replace it
    /// (code 11). The default compares the text; [`TcpConnector`] also resolves both
    /// and compares their socket addresses.
    fn same_node(&self, addr: &str, home: &str) -> impl Future<Output = bool> + Send {
        std::future::ready(addr == home)
    }
}

/// Connects over TCP to [`ClientConfig::addr`].
pub struct TcpConnector(pub String);

impl Connector for TcpConnector {
    type Stream = tokio::net::TcpStream;
    async fn connect(&self) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(&self.0).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn connect_to(&self, addr: &str, _ws_url: &str) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// The same text, or `host:port`s that resolve to a common socket address: a node
    /// advertised as `127.0.0.1:7430` (or by a name) and configured as `localhost:7430`.
    async fn same_node(&self, addr: &str, home: &str) -> bool {
        if addr == home {
            return true;
        }
        let (Ok(a), Ok(b)) = (
            tokio::net::lookup_host(addr).await,
            tokio::net::lookup_host(home).await,
        ) else {
            return false;
        };
        let b: Vec<std::net::SocketAddr> = b.collect();
        a.into_iter().any(|x| b.contains(&x))
    }
}

/// A client: one background task owning the connection and every open document.
/// Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<ClientShared>,
}

struct ClientShared {
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<ConnectionState>,
    client_id: Arc<AtomicU64>,
    store: Option<Arc<Store>>,
    inline_io: bool,
    handles: Mutex<HashMap<String, Weak<HandleInner>>>,
    next_open: AtomicU64,
}

impl Client {
    /// Starts the client over TCP. Returns at once: the connection is made in the
    /// background (see [`Client::wait_connected`]), and documents can be opened and
    /// edited before it is up.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let connector = TcpConnector(config.addr.clone());
        Self::with_connector(config, connector).await
    }

    /// As [`Client::connect`], over any [`Connector`].
    pub async fn with_connector<C: Connector>(
        config: ClientConfig,
        connector: C,
    ) -> Result<Client, ClientError> {
        let store = match &config.persist_dir {
            Some(dir) => {
                let dir = dir.clone();
                let store = run_io(config.inline_io, move || Store::open(&dir)).await?;
                Some(Arc::new(store))
            }
            None => None,
        };
        let client_id = match &store {
            Some(s) => {
                let s = s.clone();
                run_io(config.inline_io, move || s.client_id())
                    .await?
                    .unwrap_or(0)
            }
            None => 0,
        };
        let (commands, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(ConnectionState::Connecting);
        let client_id = Arc::new(AtomicU64::new(client_id));
        let seed = config.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id())
        });
        let config_inline_io = config.inline_io;
        let driver = Driver {
            rng: fastrand::Rng::with_seed(seed),
            config,
            connector: Arc::new(connector),
            commands: rx,
            state: state_tx,
            client_id: client_id.clone(),
            store: store.clone(),
            docs: BTreeMap::new(),
            shutdown: None,
            closed_local_seq: 1,
            attempt: 0,
            redirect_loop: false,
            home: 0,
        };
        let task = tokio::spawn(driver.run());
        Ok(Client {
            shared: Arc::new(ClientShared {
                task: Mutex::new(Some(task)),
                commands,
                state,
                client_id,
                inline_io: config_inline_io,
                store,
                handles: Mutex::new(HashMap::new()),
                next_open: AtomicU64::new(1),
            }),
        })
    }

    /// This client's id (0 until the server gave one, on the first connection).
    pub fn client_id(&self) -> u64 {
        self.shared.client_id.load(Ordering::Acquire)
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// Waits until the client is connected, or refused for good.
    pub async fn wait_connected(&self) -> Result<(), ClientError> {
        let mut state = self.shared.state.clone();
        loop {
            let now = state.borrow_and_update().clone();
            if now == ConnectionState::Connected {
                return Ok(());
            }
            if let Some(e) = now.gave_up() {
                return Err(e);
            }
            state.changed().await.map_err(|_| ClientError::Closed)?;
        }
    }

    /// Opens document `name` (or returns the handle already open). Connected, it
    /// returns once the document is loaded from the server; offline, at once, with the
    /// persisted state (or an empty document) that is caught up on reconnect. With
    /// [`MAX_OPEN_DOCS`] documents open (their handles alive, or their edits still
    /// unacknowledged), another is refused with [`ClientError::TooManyOpen`].
    pub async fn open(&self, name: &str) -> Result<DocHandle, ClientError> {
        self.open_inner(name, false).await.map(|(handle, _)| handle)
    }

    /// As [`Client::open`], with a stream of the document's events from before it is
    /// opened: nothing is missed, not even the acknowledgement of an edit restored
    /// from the persistence directory and sent while `open` ran. (If the document was
    /// open already, the events are from now on, as [`DocHandle::events`].)
    pub async fn open_with_events(&self, name: &str) -> Result<(DocHandle, Events), ClientError> {
        let (handle, events) = self.open_inner(name, true).await?;
        Ok((handle, events.expect("asked for")))
    }

    async fn open_inner(
        &self,
        name: &str,
        with_events: bool,
    ) -> Result<(DocHandle, Option<Events>), ClientError> {
        crate::op::validate_doc_id(name).map_err(|message| ClientError::Refused {
            code: ErrorCode::InvalidDocId,
            message,
        })?;
        if let Some(live) = self.live_handle(name) {
            let events = with_events.then(|| live.events());
            return Ok((live, events));
        }
        let saved = match &self.shared.store {
            Some(s) => {
                let (s, n) = (s.clone(), name.to_owned());
                run_io(self.shared.inline_io, move || s.load(&n)).await?
            }
            None => None,
        };
        // (A channel allocates a block of slots: none for a document opened without.)
        let (subscribers, events) = if with_events {
            let (tx, rx) = mpsc::unbounded_channel();
            (vec![tx], Some(Events(rx)))
        } else {
            (Vec::new(), None)
        };
        let cell = Arc::new(DocCell {
            name: name.into(),
            state: Mutex::new(DocShared {
                loaded: saved.is_some(),
                doc: saved.unwrap_or_else(|| ClientDoc::new(String::new(), 0, 1)),
                gen: 0,
                subscribers,
                presence: BTreeMap::new(),
                my_presence: None,
                changed: Arc::new(tokio::sync::Notify::new()),
            }),
            save_lock: tokio::sync::Mutex::new(()),
            saved_gen: AtomicU64::new(0),
        });
        let open_id = self.shared.next_open.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let inner = {
            let mut handles = lock(&self.shared.handles);
            if let Some(live) = handles.get(name).and_then(Weak::upgrade) {
                // Opened meanwhile by another task.
                let live = DocHandle { inner: live };
                let events = with_events.then(|| live.events());
                return Ok((live, events));
            }
            self.shared
                .commands
                .send(Command::Open {
                    cell: cell.clone(),
                    open_id,
                    reply,
                })
                .map_err(|_| ClientError::Closed)?;
            let inner = Arc::new(HandleInner {
                cell: cell.clone(),
                open_id,
                client: self.shared.clone(),
            });
            handles.insert(name.to_owned(), Arc::downgrade(&inner));
            inner
        };
        answer.await.map_err(|_| ClientError::Closed)??;
        Ok((DocHandle { inner }, events))
    }

    fn live_handle(&self, name: &str) -> Option<DocHandle> {
        lock(&self.shared.handles)
            .get(name)
            .and_then(Weak::upgrade)
            .map(|inner| DocHandle { inner })
    }

    /// Stops the client's task at once, as if the process had died: nothing more is
    /// sent or written (what is in the persistence directory stays, for a client
    /// started on it later). For tests and simulations; applications call
    /// [`Client::shutdown`].
    pub fn abort(&self) {
        if let Some(task) = lock(&self.shared.task).take() {
            task.abort();
        }
    }

    /// Sends what can be sent, waits (up to [`ClientConfig::shutdown_timeout`]) for the
    /// pending edits to be acknowledged, and stops. Edits not acknowledged by then are
    /// kept in the persistence directory, if there is one.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.commands.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// One open document. Cheap to clone and `Send`; the document is closed when the last
/// clone is dropped (once its pending edits are acknowledged or persisted).
#[derive(Clone)]
pub struct DocHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    cell: Arc<DocCell>,
    open_id: u64,
    client: Arc<ClientShared>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        // Its entry goes with it, unless a new handle of the document took the place
        // already (opened after this one's last reference went): else a client that
        // opens document after document would keep an entry for each one it ever had.
        {
            let mut handles = lock(&self.client.handles);
            let name: &str = &self.cell.name;
            if handles
                .get(name)
                .is_some_and(|h| std::ptr::eq(h.as_ptr(), self))
            {
                handles.remove(name);
            }
        }
        let _ = self.client.commands.send(Command::Close {
            name: self.cell.name.clone(),
            open_id: self.open_id,
        });
    }
}

impl DocHandle {
    pub fn name(&self) -> &str {
        &self.inner.cell.name
    }

    /// The local text: the server's, with this client's pending edits.
    pub fn text(&self) -> String {
        lock(&self.inner.cell.state).doc.text()
    }

    /// The last server seq this client has applied.
    pub fn version(&self) -> u64 {
        lock(&self.inner.cell.state).doc.version()
    }

    /// The local seqs of this client's ops sent and not yet acknowledged, oldest first
    /// (with [`Client::client_id`], their op ids).
    pub fn unacked(&self) -> Vec<u64> {
        lock(&self.inner.cell.state)
            .doc
            .all_in_flight()
            .map(|o| o.local_seq)
            .collect()
    }

    /// Whether every local edit is acknowledged.
    pub fn is_synced(&self) -> bool {
        !lock(&self.inner.cell.state).doc.has_pending()
    }

    /// Waits until every local edit made so far is acknowledged (durable on the
    /// server), or the client is refused for good or shut down.
    pub async fn synced(&self) -> Result<(), ClientError> {
        let changed = lock(&self.inner.cell.state).changed.clone();
        let mut state = self.inner.client.state.clone();
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_synced() {
                return Ok(());
            }
            if let Some(e) = state.borrow_and_update().gave_up() {
                return Err(e);
            }
            tokio::select! {
                _ = notified => {}
                changed = state.changed() => changed.map_err(|_| ClientError::Closed)?,
            }
        }
    }

    /// Applies `patches` (code points, each on the result of the one before) to the
    /// local text at once and queues them for the server. With a persistence
    /// directory, returns once they are on disk.
    ///
    /// The positions are in the local text as it is when the edit applies; a remote op
    /// that arrives after the caller looked at [`DocHandle::text`] moves it. An edit
    /// that depends on the text is made with [`DocHandle::edit_with`].
    pub async fn edit(&self, patches: &[Patch]) -> Result<(), ClientError> {
        // The text is not materialised (O(n)) for an edit that does not look at it.
        self.apply_edit(|_| patches.to_vec()).await.map(|_| ())
    }

    /// Makes an edit from the local text and version as they are: `make` sees them
    /// and returns the patches, which apply before any remote op can come in between
    /// (the document is locked meanwhile: keep `make` short). Returns the local seq of
    /// the op that carries the edit to the server (later edits may be composed into
    /// it): the edit is durable once [`Event::Acked`] reports that local seq (unless a
    /// reload derived it again, [`Event::Reloaded`]).
    pub async fn edit_with(
        &self,
        make: impl FnOnce(&EditView<'_>) -> Vec<Patch>,
    ) -> Result<u64, ClientError> {
        self.apply_edit(|doc| make(&EditView(doc))).await
    }

    async fn apply_edit(
        &self,
        make: impl FnOnce(&ClientDoc) -> Vec<Patch>,
    ) -> Result<u64, ClientError> {
        let cell = &self.inner.cell;
        let (gen, local_seq) = {
            let mut st = lock(&cell.state);
            let patches = make(&st.doc);
            st.doc.local_edit(&patches)?;
            let op = crate::ot::TextOp::from_patches(&patches);
            st.map_presence(&op);
            st.gen += 1;
            (st.gen, st.doc.last_buffered_local_seq())
        };
        self.inner
            .client
            .commands
            .send(Command::Flush(cell.name.clone()))
            .map_err(|_| ClientError::Closed)?;
        if let Some(store) = &self.inner.client.store {
            cell.persist(store, gen, self.inner.client.inline_io)
                .await?;
        }
        Ok(local_seq)
    }

    /// This client's cursors and selections (code points in the local text), shown to
    /// the document's other clients; sent again after a reconnect.
    pub fn set_presence(&self, selections: Vec<Selection>) {
        lock(&self.inner.cell.state).my_presence = Some(selections);
        let _ = self
            .inner
            .client
            .commands
            .send(Command::Presence(self.inner.cell.name.clone()));
    }

    /// The other clients' cursors now, in the local text's code points.
    pub fn presence(&self) -> BTreeMap<u64, Vec<Selection>> {
        lock(&self.inner.cell.state).presence.clone()
    }

    /// A new stream of this document's events, from now on. Unbounded: read it (or
    /// drop it).
    pub fn events(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.cell.state).subscribers.push(tx);
        Events(rx)
    }
}

/// The document as [`DocHandle::edit_with`]'s `make` sees it: nothing can change it
/// while `make` runs.
pub struct EditView<'a>(&'a ClientDoc);

impl EditView<'_> {
    /// The local text (made on each call: O(n)).
    pub fn text(&self) -> String {
        self.0.text()
    }

    /// The local text's length in code points (O(1)).
    pub fn len_chars(&self) -> u32 {
        self.0.len_chars()
    }

    /// The last server seq applied.
    pub fn version(&self) -> u64 {
        self.0.version()
    }
}

/// A document's events ([`DocHandle::events`]): a `futures_core::Stream`, or
/// [`Events::recv`].
pub struct Events(mpsc::UnboundedReceiver<Event>);

impl Events {
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }

    /// An event already there, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.0.try_recv().ok()
    }
}

impl futures_core::Stream for Events {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.0.poll_recv(cx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_io<T: Send + 'static>(
    inline: bool,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ClientError> {
    let result = if inline {
        f()
    } else {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ClientError::Persist(io::Error::other(e.to_string())))?
    };
    result.map_err(ClientError::Persist)
}

/// A document's state, shared by its handles and the client's task.
struct DocCell {
    name: String,
    state: Mutex<DocShared>,
    /// Held while the state is written to the persistence directory: writes of one
    /// document are one at a time, and one write covers every change made before it
    /// started (group commit).
    save_lock: tokio::sync::Mutex<()>,
    saved_gen: AtomicU64,
}

struct DocShared {
    doc: ClientDoc,
    /// Whether `doc` came from the server (or the persistence directory), not made
    /// empty while offline.
    loaded: bool,
    /// Bumped by every change the persistence directory must see.
    gen: u64,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
    presence: BTreeMap<u64, Vec<Selection>>,
    my_presence: Option<Vec<Selection>>,
    /// Woken by every event ([`DocHandle::synced`] waits on it).
    changed: Arc<tokio::sync::Notify>,
}

impl DocShared {
    fn emit(&mut self, event: Event) {
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
        self.changed.notify_waiters();
    }

    /// Moves every cursor (others' and this client's) through a change of the local
    /// text.
    fn map_presence(&mut self, op: &crate::ot::TextOp) {
        let map = |sels: &mut Vec<Selection>| {
            for s in sels {
                s.anchor = op.map_position(s.anchor);
                s.head = op.map_position(s.head);
            }
        };
        self.presence.values_mut().for_each(map);
        if let Some(mine) = &mut self.my_presence {
            map(mine);
        }
    }
}

impl DocCell {
    /// Makes the state as of `gen` durable in the store.
    async fn persist(&self, store: &Arc<Store>, gen: u64, inline: bool) -> Result<(), ClientError> {
        let _writing = self.save_lock.lock().await;
        if self.saved_gen.load(Ordering::Acquire) >= gen {
            return Ok(());
        }
        let (bytes, now) = {
            let st = lock(&self.state);
            (store::encode(&self.name, &st.doc), st.gen)
        };
        let (store, name) = (store.clone(), self.name.clone());
        run_io(inline, move || store.save(&name, &bytes)).await?;
        self.saved_gen.store(now, Ordering::Release);
        Ok(())
    }
}

enum Command {
    Open {
        cell: Arc<DocCell>,
        open_id: u64,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Close {
        name: String,
        open_id: u64,
    },
    /// Edits were made: send what can be sent.
    Flush(String),
    Presence(String),
    Shutdown(oneshot::Sender<()>),
}

/// Where a document is in its (re)opening on the current connection.
enum Phase {
    /// Not open on this connection (none, or it is being made).
    Down,
    /// `Open` sent at `known`; the reply is not complete. A snapshot in it gives the
    /// server's text (`server`), onto which the reply's ops then apply; `applied`
    /// counts the ops in flight found in the reply (the first ones reached the server).
    Opening {
        pieces: Option<(String, u64, u64)>,
        server: Option<(crate::text::Text, u64)>,
        applied: usize,
    },
    /// After a snapshot: the ops in flight not found in the reply were sent again
    /// under their ids, to learn from the answers (an `Ack` or a `Reject`) which of
    /// them the server applied.
    Probing {
        server: crate::text::Text,
        version: u64,
        waiting: usize,
        applied: usize,
        /// An answer said the op was applied after `version` (a resend the server could
        /// still apply): `server` lacks it, so the document is opened once more.
        beyond: bool,
        rejected: bool,
    },
    Live,
    /// Redirected to a node the client is connecting to (`OpenDoc::at` names the
    /// connection being made, in `Links::making`): opened there once it is made.
    Moving,
}

struct OpenDoc {
    cell: Arc<DocCell>,
    open_id: u64,
    phase: Phase,
    /// `open` calls waiting for the first load.
    waiters: Vec<oneshot::Sender<Result<(), ClientError>>>,
    /// The last handle was dropped: closed once nothing is pending.
    closing: bool,
    /// The connection that carries it: the home one, or one a `Redirect` named.
    at: At,
    /// `Redirect`s followed since its last progress (an ack, or a complete `Open` reply
    /// with none of its ops in flight): past [`MAX_REDIRECTS`], the client backs off as
    /// after a lost connection.
    redirects: u32,
}

/// Redirects of one document the client follows in a row without progress (an ack of
/// one of its ops, or a complete reply to its `Open` with none of its ops in flight)
/// before it treats the cluster as unreachable: it drops its connections and reconnects
/// with backoff (which keeps growing until a document makes progress on a connection
/// that is not dropped for another's lack of it). Owners that keep pointing at each
/// other (a cluster being reconfigured) then cost a few messages per backoff period.
pub const MAX_REDIRECTS: u32 = 8;

/// Which connection carries a document: `None`, the home one (to
/// [`ClientConfig::addr`] or, after it could not be reached, one of
/// [`ClientConfig::fallback_addrs`]); else the key of one a `Redirect` opened (its `addr` and
/// `ws_url`).
type At = Option<Arc<str>>;

/// The client's connections while it is connected: the home one, and one per other node
/// that serves a document of it (opened on a `Redirect`, closed once it carries none).
struct Links<C: Connector> {
    home: Conn<C>,
    away: BTreeMap<Arc<str>, Conn<C>>,
    /// Connections to other nodes being made, by the key they will have in `away`:
    /// the documents redirected there wait ([`Phase::Moving`]) while the client goes on
    /// serving every other one. (Made inline, a node that accepts and never answers
    /// held up every document of the client for [`ClientConfig::timeout`].)
    making: BTreeMap<Arc<str>, Making<C>>,
}

/// A connection to another node being made: `Some` once made (handshake done), `None`
/// if the node is the home one by another name.
type Making<C> = Pin<Box<dyn Future<Output = Result<Option<Conn<C>>, Ended>> + Send>>;

impl<C: Connector> Links<C> {
    fn get(&mut self, at: &At) -> Result<&mut Conn<C>, Ended> {
        match at {
            None => Ok(&mut self.home),
            Some(key) => self
                .away
                .get_mut(key)
                .ok_or_else(|| Ended::Lost(format!("no connection to {key}"))),
        }
    }

    fn queue(&mut self, at: &At, message: Message) -> Result<(), Ended> {
        self.get(at)?
            .queue(message)
            .map(|_| ())
            .map_err(|e| Ended::Lost(e.to_string()))
    }

    /// Writes what is queued on every connection. A server that takes nothing of it for
    /// `stall` is given up (a stopped one, whose socket buffers are full, would
    /// otherwise hold the client here for ever, past its own silence checks).
    async fn flush(&mut self, stall: Duration) -> Result<(), Ended> {
        self.home
            .flush_within(stall)
            .await
            .map_err(|e| Ended::Lost(e.to_string()))?;
        for (key, conn) in &mut self.away {
            conn.flush_within(stall)
                .await
                .map_err(|e| Ended::Lost(format!("{key}: {e}")))?;
        }
        Ok(())
    }
}

/// A connection to another node, handshake done. A refusal of the token there stops the
/// client as at home; any other failure is a lost connection.
async fn connect_to<C: Connector>(
    connector: &C,
    client_id: u64,
    addr: &str,
    ws_url: &str,
    token: &str,
) -> Result<Conn<C>, Ended> {
    let stream = connector
        .connect_to(addr, ws_url)
        .await
        .map_err(|e| Ended::Lost(format!("{addr}: {e}")))?;
    Connection::handshake(stream, client_id, token)
        .await
        .map_err(|e| handshake_failed(e, Some(addr)))
}

/// Why a handshake failed: refused for its protocol version or its token, the client
/// stops for good (it would be refused again each time); anything else is a lost
/// connection (to the node at `addr`, if it is not the home one).
fn handshake_failed(e: super::connection::ClientError, addr: Option<&str>) -> Ended {
    match e {
        super::connection::ClientError::Handshake {
            code:
                code @ (ErrorCode::HandshakeRequired
                | ErrorCode::UnsupportedVersion
                | ErrorCode::InvalidToken
                | ErrorCode::TokenExpired),
            message,
        } => Ended::Failed(code, message),
        other => Ended::Lost(match addr {
            Some(addr) => format!("{addr}: {other}"),
            None => other.to_string(),
        }),
    }
}

/// The next connection to another node made or failed, with its key (never, with none
/// being made).
fn next_made<C: Connector>(
    making: &mut BTreeMap<Arc<str>, Making<C>>,
) -> impl Future<Output = (Arc<str>, Result<Option<Conn<C>>, Ended>)> + '_ {
    std::future::poll_fn(move |cx| {
        let ready = making
            .iter_mut()
            .find_map(|(key, made)| match made.as_mut().poll(cx) {
                Poll::Ready(made) => Some((key.clone(), made)),
                Poll::Pending => None,
            });
        match ready {
            Some((key, made)) => {
                making.remove(&key);
                Poll::Ready((key, made))
            }
            None => Poll::Pending,
        }
    })
}

/// The next message from any of the connections to other nodes (never, with none).
fn recv_away<C: Connector>(
    away: &mut BTreeMap<Arc<str>, Conn<C>>,
) -> impl Future<
    Output = (
        Arc<str>,
        Result<crate::protocol::message::Envelope, super::connection::ClientError>,
    ),
> + '_ {
    std::future::poll_fn(move |cx| {
        for (key, conn) in away.iter_mut() {
            if let Poll::Ready(got) = conn.poll_recv(cx) {
                return Poll::Ready((key.clone(), got));
            }
        }
        Poll::Pending
    })
}

/// The document a message from the server is about, if any.
fn doc_of(message: &Message) -> Option<&str> {
    match message {
        Message::Snapshot { doc, .. }
        | Message::Ops { doc, .. }
        | Message::Ack { doc, .. }
        | Message::Reject { doc, .. }
        | Message::Remote { doc, .. }
        | Message::PresenceState { doc, .. }
        | Message::Reload { doc, .. }
        | Message::Redirect { doc, .. } => Some(doc),
        _ => None,
    }
}

/// Why the connected loop ended.
enum Ended {
    /// Lost or broken: reconnect.
    Lost(String),
    /// A node answered that no node serves a document right now (code 33): reconnect,
    /// to the next address if there are several (the node may be the one cut off).
    Unavailable(String),
    /// Refused for good.
    Failed(ErrorCode, String),
    Shutdown,
}

struct Driver<C: Connector> {
    config: ClientConfig,
    connector: Arc<C>,
    commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<ConnectionState>,
    client_id: Arc<AtomicU64>,
    store: Option<Arc<Store>>,
    docs: BTreeMap<String, OpenDoc>,
    rng: fastrand::Rng,
    /// Shutdown asked: the reply, and the time after which pending edits stop being
    /// waited for.
    shutdown: Option<(oneshot::Sender<()>, Instant)>,
    /// Connections lost since the last progress: the reconnect backoff doubles with
    /// each. Progress is an op acknowledged, or a document served with no op of ours in
    /// flight (or, with no document open, a `Welcome`): a connection that is welcomed
    /// and then lost without either does not start the backoff over. A connection
    /// dropped for a document that makes no progress (an op told to retry, code 33, or
    /// a document redirected round in circles) keeps the count it had when it was made,
    /// whatever the other documents did meanwhile: such a server is not asked again
    /// every `backoff_min` because another document of the client is served.
    attempt: u32,
    /// The connections are being dropped because a document was redirected round in
    /// circles ([`MAX_REDIRECTS`]): see `attempt`.
    redirect_loop: bool,
    /// Above every local seq a document closed since the start used (see
    /// [`Driver::forget`]).
    closed_local_seq: u64,
    /// Which node is home: 0 for [`ClientConfig::addr`], `i` for
    /// `fallback_addrs[i - 1]`.
    home: usize,
}

type Conn<C> = Connection<<C as Connector>::Stream>;

impl<C: Connector> Driver<C> {
    /// The state first, then the events: an application that hears of a change and
    /// asks [`Client::state`] finds it (the other order let a task on another thread
    /// read the old state after the event).
    fn set_state(&mut self, state: ConnectionState) {
        self.state.send_replace(state.clone());
        for doc in self.docs.values() {
            lock(&doc.cell.state).emit(Event::Connection(state.clone()));
        }
    }

    /// The home node's address (see [`ClientConfig::fallback_addrs`]).
    fn home_addr(&self) -> &str {
        match self.home {
            0 => &self.config.addr,
            i => &self.config.fallback_addrs[i - 1],
        }
    }

    /// The home node could not be reached: the next attempt goes to the next address.
    fn next_home(&mut self) {
        self.home = (self.home + 1) % (1 + self.config.fallback_addrs.len());
    }

    async fn run(mut self) {
        loop {
            let connected = {
                let connector = self.connector.clone();
                let client_id = self.client_id.load(Ordering::Acquire);
                let token = self.config.token.clone();
                let timeout = self.config.timeout;
                let (home, addr) = (self.home, self.home_addr().to_owned());
                let connect = async move {
                    let stream = if home == 0 {
                        connector.connect().await
                    } else {
                        connector.connect_fallback(&addr).await
                    };
                    let stream = stream.map_err(|e| Ended::Lost(format!("{addr}: {e}")))?;
                    Connection::handshake(stream, client_id, &token)
                        .await
                        .map_err(|e| handshake_failed(e, None))
                };
                match self
                    .offline_until(tokio::time::timeout(timeout, connect))
                    .await
                {
                    Some(result) => result,
                    None => return self.stop(),
                }
            };
            let ended = match connected {
                Ok(Ok(conn)) => {
                    if self.docs.is_empty() {
                        // Nothing else can show progress (see `Driver::attempt`).
                        self.attempt = 0;
                    }
                    let at_connect = self.attempt;
                    let ended = self.connected(conn).await;
                    // Dropped for a document that makes no progress: the backoff grows
                    // on from where it was, whatever other documents did.
                    let looped = std::mem::take(&mut self.redirect_loop);
                    if looped || matches!(ended, Ended::Unavailable(_)) {
                        self.attempt = at_connect;
                    }
                    // With several addresses, a code 33 moves the home on as a failed
                    // attempt does: a node cut off from etcd answers it for every
                    // document, for as long as it is cut off, while the others serve.
                    // (Where no node serves the document, moving on is harmless.)
                    if let Ended::Unavailable(_) = ended {
                        self.next_home();
                    }
                    ended
                }
                Ok(Err(ended)) => {
                    if let Ended::Lost(_) = ended {
                        self.next_home();
                    }
                    ended
                }
                Err(_) => {
                    self.next_home();
                    Ended::Lost("connect timed out".into())
                }
            };
            for doc in self.docs.values_mut() {
                doc.phase = Phase::Down;
                doc.at = None;
                let mut st = lock(&doc.cell.state);
                let gone: Vec<u64> = st.presence.keys().copied().collect();
                st.presence.clear();
                for client_id in gone {
                    st.emit(Event::Presence {
                        client_id,
                        selections: Vec::new(),
                    });
                }
            }
            let why = match ended {
                Ended::Shutdown => return self.stop(),
                Ended::Failed(code, message) => {
                    tracing::warn!(?code, "the server refused this client: {message}");
                    // The state first: a caller that hears of the refusal sees it.
                    self.set_state(ConnectionState::Failed {
                        code,
                        message: message.clone(),
                    });
                    self.fail_waiters(code, &message);
                    // Refused for good: answer commands until the client is dropped.
                    self.offline_until(std::future::pending::<()>()).await;
                    return self.stop();
                }
                Ended::Lost(why) | Ended::Unavailable(why) => why,
            };
            if self.shutdown.is_some() {
                return self.stop();
            }
            self.attempt += 1;
            let attempt = self.attempt;
            // `backoff_min` for the first attempt, doubling from there.
            let cap = self
                .config
                .backoff_min
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(self.config.backoff_max);
            // Equal jitter: a half to the whole of the delay, so that clients cut off at
            // once do not all come back at once.
            let retry_in = cap.mul_f64(0.5 + self.rng.f64() / 2.0);
            tracing::debug!(attempt, ?retry_in, "connection lost: {why}");
            self.set_state(ConnectionState::Reconnecting { attempt, retry_in });
            // Offline: documents opened now get their (persisted or empty) state.
            for doc in self.docs.values_mut() {
                for w in doc.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            let wake = Instant::now() + retry_in;
            if self
                .offline_until(tokio::time::sleep_until(wake))
                .await
                .is_none()
            {
                return self.stop();
            }
        }
    }

    /// Answers commands as [`Driver::offline_command`] does until `work` is done (its
    /// output), or until the client stops: shut down, or every handle dropped (`None`).
    async fn offline_until<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        if self.offline_command(cmd) {
                            return None;
                        }
                    }
                    None => return None,
                },
                done = &mut work => return Some(done),
            }
        }
    }

    fn stop(&mut self) {
        if let Some(store) = &self.store {
            store.unlock();
        }
        self.set_state(ConnectionState::Closed);
        for doc in self.docs.values_mut() {
            for w in doc.waiters.drain(..) {
                let _ = w.send(Err(ClientError::Closed));
            }
        }
        if let Some((reply, _)) = self.shutdown.take() {
            let _ = reply.send(());
        }
    }

    fn fail_waiters(&mut self, code: ErrorCode, message: &str) {
        for doc in self.docs.values_mut() {
            for w in doc.waiters.drain(..) {
                let _ = w.send(Err(ClientError::Refused {
                    code,
                    message: message.into(),
                }));
            }
        }
    }

    /// A command while there is no connection. True: stop now.
    fn offline_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Open {
                cell,
                open_id,
                reply,
            } => {
                if let Some(reply) = self.refuse_past_open_limit(&cell.name, reply) {
                    let _ = reply.send(Ok(()));
                    self.register(cell, open_id, None);
                }
            }
            Command::Close { name, open_id } => {
                if self.docs.get(&name).is_some_and(|d| d.open_id == open_id) {
                    let doc = self.docs.get_mut(&name).expect("checked");
                    doc.closing = true;
                    // Without a connection nothing can be acknowledged: with a
                    // persistence directory the edits are on disk already; without
                    // one they would be lost, so the document stays until sent.
                    let pending = lock(&doc.cell.state).doc.has_pending();
                    if !pending || self.store.is_some() {
                        self.forget(&name);
                    }
                }
            }
            Command::Flush(_) | Command::Presence(_) => {}
            Command::Shutdown(reply) => {
                self.shutdown = Some((reply, Instant::now()));
                return true;
            }
        }
        false
    }

    /// Answers an `Open` of a document not open yet, with [`MAX_OPEN_DOCS`] open
    /// (closing ones included: the server has them open until their edits are
    /// acknowledged), with [`ClientError::TooManyOpen`]; else gives the reply back. A
    /// document's connection is its home's or, redirected, another node's: each has at
    /// most as many open as the client has.
    fn refuse_past_open_limit(
        &self,
        name: &str,
        reply: oneshot::Sender<Result<(), ClientError>>,
    ) -> Option<oneshot::Sender<Result<(), ClientError>>> {
        if self.docs.len() < MAX_OPEN_DOCS || self.docs.contains_key(name) {
            return Some(reply);
        }
        let _ = reply.send(Err(ClientError::TooManyOpen { max: MAX_OPEN_DOCS }));
        None
    }

    /// Drops a closed document. The local seqs it used stay taken: the next document
    /// opened starts above them, whichever it is (op ids are per document; one
    /// client-wide floor keeps no list of the documents once open), so that one opened
    /// again in this process does not send new ops under ids it used (without a
    /// persistence directory, nothing else remembers them; with one, its file does).
    fn forget(&mut self, name: &str) {
        if let Some(doc) = self.docs.remove(name) {
            let next = lock(&doc.cell.state).doc.last_buffered_local_seq() + 1;
            self.closed_local_seq = self.closed_local_seq.max(next);
        }
    }

    fn register(
        &mut self,
        cell: Arc<DocCell>,
        open_id: u64,
        reply: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) {
        let name = cell.name.clone();
        match self.docs.get_mut(&name) {
            // Reopened while it was closing: the new handles take it over.
            Some(doc) => {
                doc.open_id = open_id;
                doc.closing = false;
                // The handles share the cell the driver already has: move the new
                // one's state over is not needed, the old cell is the live one.
                if !Arc::ptr_eq(&doc.cell, &cell) {
                    let old = lock(&doc.cell.state).doc.clone();
                    lock(&cell.state).doc = old;
                    lock(&cell.state).loaded = true;
                    doc.cell = cell;
                }
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
            }
            None => {
                // Opened again after it was closed: its op ids so far are the server's
                // to remember (a new op under one is refused, code 26), and its
                // persisted state, if any, is loaded already.
                lock(&cell.state)
                    .doc
                    .skip_local_seqs_below(self.closed_local_seq);
                self.docs.insert(
                    name,
                    OpenDoc {
                        cell,
                        open_id,
                        phase: Phase::Down,
                        waiters: reply.into_iter().collect(),
                        closing: false,
                        at: None,
                        redirects: 0,
                    },
                );
            }
        }
    }

    async fn connected(&mut self, home: Conn<C>) -> Ended {
        let my_id = home.client_id;
        let mut conn = Links {
            home,
            away: BTreeMap::new(),
            making: BTreeMap::new(),
        };
        if self.client_id.load(Ordering::Acquire) != my_id {
            // The server gave this client its id: kept before anything is sent under it.
            if let Some(store) = &self.store {
                let store = store.clone();
                if let Err(e) =
                    run_io(self.config.inline_io, move || store.save_client_id(my_id)).await
                {
                    return Ended::Lost(format!("cannot keep the client id: {e}"));
                }
            }
            self.client_id.store(my_id, Ordering::Release);
        }
        let names: Vec<String> = self.docs.keys().cloned().collect();
        for name in &names {
            if let Err(e) = self.send_open(&mut conn, name) {
                return Ended::Lost(e);
            }
        }
        if let Err(e) = conn.flush(self.config.timeout).await {
            return e;
        }
        self.set_state(ConnectionState::Connected);
        let mut last_heard = Instant::now();
        // The same for each connection to another node: a node that stops answering
        // (stopped, cut off) while its TCP connection stays open is given up as the home
        // one is, so that its documents start again from home (and find their new owner).
        let mut away_heard: BTreeMap<Arc<str>, Instant> = BTreeMap::new();
        let mut next_ping = Instant::now() + self.config.ping_interval;
        loop {
            if let Some((_, deadline)) = &self.shutdown {
                let idle = self
                    .docs
                    .values()
                    .all(|d| !lock(&d.cell.state).doc.has_pending());
                if idle || Instant::now() >= *deadline {
                    return Ended::Shutdown;
                }
            }
            let shutdown_at = self.shutdown.as_ref().map(|(_, d)| *d);
            // A connection to another node counts as heard from when it is first seen
            // here (made while this loop waited); gone ones are forgotten.
            if !conn.away.is_empty() || !away_heard.is_empty() {
                let now = Instant::now();
                away_heard.retain(|key, _| conn.away.contains_key(key));
                for key in conn.away.keys() {
                    away_heard.entry(key.clone()).or_insert(now);
                }
            }
            // Woken for the next ping, or when the connection heard from least recently
            // has been silent for `timeout`, whichever comes first.
            let least_heard = away_heard.values().fold(last_heard, |a, b| a.min(*b));
            let wake = next_ping.min(least_heard + self.config.timeout);
            let result = tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(&mut conn, cmd).await,
                    None => return Ended::Shutdown,
                },
                env = conn.home.recv() => match env {
                    Ok(env) => {
                        last_heard = Instant::now();
                        self.message(&mut conn, &None, env.request_id, env.message).await
                    }
                    Err(e) => Err(Ended::Lost(e.to_string())),
                },
                (key, env) = recv_away::<C>(&mut conn.away) => match env {
                    // Any loss drops every connection: the documents start again from
                    // the home one, and are redirected again where needed.
                    Ok(env) => {
                        away_heard.insert(key.clone(), Instant::now());
                        self.message(&mut conn, &Some(key), env.request_id, env.message).await
                    }
                    Err(e) => Err(Ended::Lost(format!("{key}: {e}"))),
                },
                (key, made) = next_made::<C>(&mut conn.making) => {
                    self.made(&mut conn, key, made)
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    let silent_away = away_heard
                        .iter()
                        .find(|(_, heard)| **heard + self.config.timeout <= now)
                        .map(|(key, _)| key);
                    if last_heard + self.config.timeout <= now {
                        Err(Ended::Lost(format!("nothing heard from the server for {:?}", self.config.timeout)))
                    } else if let Some(key) = silent_away {
                        Err(Ended::Lost(format!("nothing heard from {key} for {:?}", self.config.timeout)))
                    } else if now < next_ping {
                        Ok(())
                    } else {
                        next_ping = Instant::now() + self.config.ping_interval;
                        // Every connection, so that no node times an idle one out.
                        let keys: Vec<At> = std::iter::once(None)
                            .chain(conn.away.keys().cloned().map(Some))
                            .collect();
                        keys.iter().try_for_each(|at| conn.queue(at, Message::Ping { nonce: 0 }))
                    }
                }
                _ = sleep_until_opt(shutdown_at) => Ok(()),
            };
            if let Err(ended) = result {
                return ended;
            }
            if let Err(e) = conn.flush(self.config.timeout).await {
                return e;
            }
            // A connection to another node is kept (and one being made, made) while
            // it carries a document.
            if !conn.away.is_empty() || !conn.making.is_empty() {
                let docs = &self.docs;
                let carries = |key: &Arc<str>| docs.values().any(|d| d.at.as_ref() == Some(key));
                conn.away.retain(|key, _| carries(key));
                conn.making.retain(|key, _| carries(key));
                away_heard.retain(|key, _| conn.away.contains_key(key));
            }
        }
    }

    /// The connection that carries document `name` (the home one for a document not
    /// open).
    fn at(&self, name: &str) -> At {
        self.docs.get(name).and_then(|d| d.at.clone())
    }

    /// A `Redirect` of `name` arrived on its connection: the document is closed there;
    /// it moves to a connection to the node named (made now unless the client has one),
    /// and is opened there as after a reconnect: with its version, its own ops in the
    /// reply acknowledged, the others resent under their ids once it is live.
    async fn redirected(
        &mut self,
        conn: &mut Links<C>,
        name: &str,
        addr: String,
        ws_url: String,
    ) -> Result<(), Ended> {
        let Some(doc) = self.docs.get_mut(name) else {
            return Ok(());
        };
        doc.redirects += 1;
        if doc.redirects > MAX_REDIRECTS {
            doc.redirects = 0;
            self.redirect_loop = true;
            return Err(Ended::Lost(format!(
                "document {name}: redirected {MAX_REDIRECTS} times without progress (last to \
                 {addr})"
            )));
        }
        tracing::debug!(doc = name, addr, ws_url, "redirected");
        doc.phase = Phase::Down;
        {
            // Presence comes from the new owner's subscribers now.
            let mut st = lock(&doc.cell.state);
            let gone: Vec<u64> = st.presence.keys().copied().collect();
            st.presence.clear();
            for client_id in gone {
                st.emit(Event::Presence {
                    client_id,
                    selections: Vec::new(),
                });
            }
        }
        let key: Arc<str> = Arc::from(format!("{addr} {ws_url}"));
        if !conn.away.contains_key(&key) && !conn.making.contains_key(&key) {
            let connector = self.connector.clone();
            let home_addr = self.home_addr().to_owned();
            let (client_id, token) = (conn.home.client_id, self.config.token.clone());
            let timeout = self.config.timeout;
            conn.making.insert(
                key.clone(),
                Box::pin(async move {
                    // The home node is reached over the home connection: a second
                    // connection with this client's id would replace it there (code
                    // 11). Resolving names is bounded by the connect timeout; a name
                    // that does not resolve in it is another node.
                    let home =
                        tokio::time::timeout(timeout, connector.same_node(&addr, &home_addr))
                            .await
                            .unwrap_or(false);
                    if home {
                        return Ok(None);
                    }
                    let connect = connect_to(&*connector, client_id, &addr, &ws_url, &token);
                    match tokio::time::timeout(timeout, connect).await {
                        Ok(made) => made.map(Some),
                        Err(_) => Err(Ended::Lost(format!("connecting to {addr} timed out"))),
                    }
                }),
            );
        }
        let doc = self.docs.get_mut(name).expect("checked");
        doc.at = Some(key.clone());
        if conn.away.contains_key(&key) {
            return self.send_open(conn, name).map_err(Ended::Lost);
        }
        // Answers about it from the connection it left are not its any more (`at`).
        doc.phase = Phase::Moving;
        Ok(())
    }

    /// A connection to another node was made (`Some`), or found to be the home one
    /// (`None`): the documents waiting for it are opened there. Failed, it ends every
    /// connection, as the loss of one made does.
    fn made(
        &mut self,
        conn: &mut Links<C>,
        key: Arc<str>,
        made: Result<Option<Conn<C>>, Ended>,
    ) -> Result<(), Ended> {
        let at: At = match made? {
            Some(made) => {
                conn.away.insert(key.clone(), made);
                Some(key.clone())
            }
            None => None,
        };
        let moving: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, d)| matches!(d.phase, Phase::Moving) && d.at.as_ref() == Some(&key))
            .map(|(name, _)| name.clone())
            .collect();
        for name in moving {
            self.docs.get_mut(&name).expect("listed").at = at.clone();
            self.send_open(conn, &name).map_err(Ended::Lost)?;
        }
        Ok(())
    }

    fn send_open(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), String> {
        let doc = self.docs.get_mut(name).expect("open");
        let known = {
            let st = lock(&doc.cell.state);
            if st.loaded {
                st.doc.version()
            } else {
                0
            }
        };
        doc.phase = Phase::Opening {
            pieces: None,
            server: None,
            applied: 0,
        };
        let at = doc.at.clone();
        conn.queue(
            &at,
            Message::Open {
                doc: name.to_owned(),
                known_version: known,
            },
        )
        .map_err(|e| match e {
            Ended::Lost(why) => why,
            _ => "cannot send Open".into(),
        })
    }

    async fn command(&mut self, conn: &mut Links<C>, cmd: Command) -> Result<(), Ended> {
        match cmd {
            Command::Open {
                cell,
                open_id,
                reply,
            } => {
                let name = cell.name.clone();
                let fresh = !self.docs.contains_key(&name);
                let Some(reply) = self.refuse_past_open_limit(&name, reply) else {
                    return Ok(());
                };
                self.register(cell, open_id, Some(reply));
                if fresh {
                    self.send_open(conn, &name).map_err(Ended::Lost)?;
                }
            }
            Command::Close { name, open_id } => {
                if let Some(doc) = self.docs.get_mut(&name) {
                    if doc.open_id == open_id {
                        doc.closing = true;
                        self.close_if_done(conn, &name)?;
                    }
                }
            }
            Command::Flush(name) => self.send_ops(conn, &name).await?,
            Command::Presence(name) => self.send_presence(conn, &name)?,
            Command::Shutdown(reply) => {
                let deadline = Instant::now() + self.config.shutdown_timeout;
                self.shutdown = Some((reply, deadline));
            }
        }
        Ok(())
    }

    fn close_if_done(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let Some(doc) = self.docs.get(name) else {
            return Ok(());
        };
        if doc.closing && !lock(&doc.cell.state).doc.has_pending() {
            // Moving: the node it left closed it (its `Redirect`), and the next one
            // never had it.
            let open_at = (!matches!(doc.phase, Phase::Moving)).then(|| doc.at.clone());
            self.forget(name);
            if let Some(at) = open_at {
                conn.queue(&at, Message::Close { doc: name.into() })?;
            }
        }
        Ok(())
    }

    /// Sends the document's next ops, if it is live (made durable in the persistence
    /// directory first: an op id, once sent, always names the same op).
    async fn send_ops(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let Some(doc) = self.docs.get(name) else {
            return Ok(());
        };
        if !matches!(doc.phase, Phase::Live) {
            return Ok(());
        }
        let cell = doc.cell.clone();
        let at = self.at(name);
        // What the connection's server takes: edits composed before its `Welcome` (the
        // default limit, larger) are split to fit before they get op ids.
        // (A connection missing here fails the sends below, as it did before.)
        let max = conn
            .get(&at)
            .ok()
            .map(|c| crate::protocol::max_op_bytes(c.max_frame));
        let (outgoing, gen) = {
            let mut st = lock(&cell.state);
            if let Some(max) = max {
                st.doc.set_max_op_bytes(max);
            }
            let mut out = Vec::new();
            while let Some(o) = st.doc.take_to_send() {
                out.push(o);
            }
            if !out.is_empty() {
                st.gen += 1;
            }
            (out, st.gen)
        };
        if outgoing.is_empty() {
            return Ok(());
        }
        if let Some(store) = &self.store {
            cell.persist(store, gen, self.config.inline_io)
                .await
                .map_err(|e| Ended::Lost(e.to_string()))?;
        }
        for out in outgoing {
            conn.queue(&at, out.into_submit(name))?;
        }
        Ok(())
    }

    fn send_presence(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let Some(doc) = self.docs.get(name) else {
            return Ok(());
        };
        if !matches!(doc.phase, Phase::Live) {
            return Ok(());
        }
        let selections = {
            let st = lock(&doc.cell.state);
            let len = st.doc.len_chars();
            match &st.my_presence {
                Some(sels) => sels
                    .iter()
                    .take(256)
                    .map(|s| Selection {
                        anchor: s.anchor.min(len),
                        head: s.head.min(len),
                    })
                    .collect(),
                None => return Ok(()),
            }
        };
        let at = self.at(name);
        conn.queue(
            &at,
            Message::Presence {
                doc: name.into(),
                selections,
            },
        )
    }

    /// The document became live on this connection: its ops in flight are sent again
    /// under their ids (the server acknowledges those it has), then the rest.
    async fn go_live(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let doc = self.docs.get_mut(name).expect("open");
        doc.phase = Phase::Live;
        for w in doc.waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        let at = doc.at.clone();
        let resend: Vec<_> = {
            let mut st = lock(&doc.cell.state);
            st.loaded = true;
            st.doc.all_in_flight().cloned().collect()
        };
        if resend.is_empty() {
            // Served, and nothing of ours waits on it: progress (see `MAX_REDIRECTS` and
            // `Driver::attempt`). With ops in flight, progress is their ack: the server
            // may serve the document and still refuse them (told to retry, code 33) or
            // redirect them.
            doc.redirects = 0;
            self.attempt = 0;
        }
        for out in resend {
            conn.queue(&at, out.into_submit(name))?;
        }
        self.send_presence(conn, name)?;
        self.send_ops(conn, name).await?;
        self.close_if_done(conn, name)
    }

    /// A message from the connection `from`.
    async fn message(
        &mut self,
        conn: &mut Links<C>,
        from: &At,
        _request_id: u32,
        message: Message,
    ) -> Result<(), Ended> {
        let my_id = conn.home.client_id;
        if let Some(doc) = doc_of(&message) {
            if self.docs.get(doc).is_some_and(|d| d.at != *from) {
                // About a document this connection no longer carries (redirected):
                // the answers to requests sent before it moved (more `Redirect`s).
                return Ok(());
            }
        }
        match message {
            Message::Error { code, message } => {
                return Err(match code {
                    ErrorCode::HandshakeRequired
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::InvalidToken
                    | ErrorCode::TokenExpired
                    | ErrorCode::AccessDenied
                    | ErrorCode::ReadOnly
                    // A document deleted: opening it again would start a new one and
                    // send this client's edits into it, which is the application's
                    // call, not the client's.
                    | ErrorCode::DocumentDeleted => Ended::Failed(code, message),
                    ErrorCode::InvalidDocId => {
                        // Only an Open carries a document id this client did not check
                        // (it checks them all): a bug, reported where it can be.
                        tracing::warn!("the server refused a document id: {message}");
                        return Ok(());
                    }
                    ErrorCode::UnknownDocument | ErrorCode::TooLarge => {
                        tracing::warn!(?code, "{message}");
                        return Ok(());
                    }
                    ErrorCode::Unavailable => Ended::Unavailable(format!("{code:?}: {message}")),
                    _ => Ended::Lost(format!("{code:?}: {message}")),
                });
            }
            Message::Pong { .. } => {}
            Message::Snapshot {
                doc,
                version,
                total_len,
                text,
            } => {
                let Some(d) = self.docs.get_mut(&doc) else {
                    return Ok(());
                };
                if let Phase::Opening { pieces, server, .. } = &mut d.phase {
                    let (so_far, _, _) =
                        pieces.get_or_insert_with(|| (String::new(), version, total_len));
                    so_far.push_str(&text);
                    if so_far.len() as u64 >= total_len {
                        let (text, version, _) = pieces.take().expect("set above");
                        *server = Some((crate::text::Text::from(text.as_str()), version));
                    }
                }
            }
            Message::Ops { doc, more, ops } => {
                for op in ops {
                    self.sequenced(&doc, my_id, op)?;
                }
                if !more {
                    self.reply_done(conn, &doc).await?;
                }
            }
            Message::Remote { doc, op } => {
                // While the document is (re)opened, its reply covers every op up to the
                // version at subscription, and broadcasts after it are held until it
                // is sent: a Remote now is an older one, queued before the `Open`.
                let opening = self.docs.get(&doc).is_some_and(|d| {
                    matches!(d.phase, Phase::Opening { .. } | Phase::Down | Phase::Moving)
                });
                if !opening {
                    self.sequenced(&doc, my_id, op)?;
                }
            }
            Message::Ack {
                doc,
                local_seq,
                seq,
            } => self.ack(conn, &doc, local_seq, seq).await?,
            Message::Reject {
                doc,
                local_seq,
                code,
                message,
            } => self.reject(conn, &doc, local_seq, code, &message).await?,
            Message::Reload { doc, .. } if self.docs.contains_key(&doc) => {
                self.send_open(conn, &doc).map_err(Ended::Lost)?;
            }
            Message::Redirect { doc, addr, ws_url } => {
                self.redirected(conn, &doc, addr, ws_url).await?;
            }
            Message::PresenceState {
                doc,
                client_id,
                selections,
            } if client_id != my_id => {
                if let Some(d) = self.docs.get(&doc) {
                    let mut st = lock(&d.cell.state);
                    let len = st.doc.len_chars();
                    let selections: Vec<Selection> = selections
                        .into_iter()
                        .map(|s| Selection {
                            anchor: s.anchor.min(len),
                            head: s.head.min(len),
                        })
                        .collect();
                    if selections.is_empty() {
                        st.presence.remove(&client_id);
                    } else {
                        st.presence.insert(client_id, selections.clone());
                    }
                    st.emit(Event::Presence {
                        client_id,
                        selections,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// An op the server sequenced (in a reply or broadcast).
    fn sequenced(&mut self, name: &str, my_id: u64, op: WireOp) -> Result<(), Ended> {
        let Some(doc) = self.docs.get_mut(name) else {
            return Ok(());
        };
        let bad = |e: DocError| Ended::Lost(format!("document {name}: {e:?}"));
        match &mut doc.phase {
            Phase::Opening {
                server: Some((text, version)),
                applied,
                ..
            }
            | Phase::Probing {
                server: text,
                version,
                applied,
                ..
            } => {
                // After a snapshot: the server's text moves on; this client's own ops
                // found there were applied, and so were all before them.
                if op.seq <= *version {
                    return Ok(());
                }
                text.apply(&op.patches)
                    .map_err(|e| Ended::Lost(format!("document {name}: {e}")))?;
                *version = op.seq;
                if op.client_id == my_id {
                    let mut st = lock(&doc.cell.state);
                    let found = st
                        .doc
                        .all_in_flight()
                        .position(|o| o.local_seq == op.local_seq);
                    if let Some(i) = found {
                        *applied = (*applied).max(i + 1);
                        st.emit(Event::Acked {
                            seq: op.seq,
                            local_seq: op.local_seq,
                        });
                    }
                }
                Ok(())
            }
            _ => {
                let mut st = lock(&doc.cell.state);
                if op.seq <= st.doc.version() {
                    return Ok(());
                }
                if op.client_id == my_id && st.doc.is_in_flight(op.local_seq) {
                    st.doc.on_ack(op.local_seq, op.seq).map_err(bad)?;
                    st.emit(Event::Acked {
                        seq: op.seq,
                        local_seq: op.local_seq,
                    });
                } else {
                    let applied = st.doc.on_remote(op.seq, &op.patches).map_err(bad)?;
                    if !applied.is_empty() {
                        st.map_presence(&crate::ot::TextOp::from_patches(&applied));
                    }
                    st.emit(Event::Remote {
                        seq: op.seq,
                        client_id: op.client_id,
                        local_seq: op.local_seq,
                        patches: applied,
                    });
                }
                Ok(())
            }
        }
    }

    /// The reply to `Open` is complete.
    async fn reply_done(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let Some(doc) = self.docs.get_mut(name) else {
            return Ok(());
        };
        if !matches!(doc.phase, Phase::Opening { .. }) {
            // A stale reply: the document was opened twice on this connection (two
            // `Redirect`s to it, one answering a request sent before the first), and
            // the first reply completed the opening. Its ops were taken as broadcasts
            // are; the phase it finds (live, or probing) stays. (This client sends no
            // `Fetch`.)
            return Ok(());
        }
        let Phase::Opening {
            server, applied, ..
        } = std::mem::replace(&mut doc.phase, Phase::Down)
        else {
            unreachable!("matched above")
        };
        let Some((text, version)) = server else {
            // Caught up on its own version.
            return self.go_live(conn, name).await;
        };
        let (in_flight, loaded) = {
            let st = lock(&doc.cell.state);
            (
                st.doc.all_in_flight().cloned().collect::<Vec<_>>(),
                st.loaded,
            )
        };
        if applied < in_flight.len() {
            // Which of the others did the server apply before its snapshot? Sent again
            // under their ids, each is answered from its memory of op ids.
            let at = doc.at.clone();
            for out in &in_flight[applied..] {
                conn.queue(&at, out.clone().into_submit(name))?;
            }
            doc.phase = Phase::Probing {
                server: text,
                version,
                waiting: in_flight.len() - applied,
                applied,
                beyond: false,
                rejected: false,
            };
            return Ok(());
        }
        {
            let mut st = lock(&doc.cell.state);
            if !loaded && !st.doc.has_pending() {
                let next = st.doc.next_local_seq();
                let max = st.doc.max_op_bytes();
                st.doc = ClientDoc::new(text.to_string(), version, next).with_max_op_bytes(max);
            } else {
                let patches = st.doc.reload(text.to_string(), version, applied);
                st.map_presence(&crate::ot::TextOp::from_patches(&patches));
                st.gen += 1;
                st.emit(Event::Reloaded { patches });
            }
        }
        self.go_live(conn, name).await
    }

    async fn ack(
        &mut self,
        conn: &mut Links<C>,
        name: &str,
        local_seq: u64,
        seq: u64,
    ) -> Result<(), Ended> {
        let Some(doc) = self.docs.get_mut(name) else {
            return Ok(());
        };
        // Progress (see `MAX_REDIRECTS` and `Driver::attempt`).
        doc.redirects = 0;
        self.attempt = 0;
        match &mut doc.phase {
            Phase::Probing {
                version,
                waiting,
                applied,
                beyond,
                ..
            } => {
                let found = {
                    let mut st = lock(&doc.cell.state);
                    let found = st
                        .doc
                        .all_in_flight()
                        .position(|o| o.local_seq == local_seq);
                    if found.is_some() {
                        st.emit(Event::Acked { seq, local_seq });
                    }
                    found
                };
                if let Some(i) = found {
                    *applied = (*applied).max(i + 1);
                    *beyond |= seq > *version;
                    *waiting = waiting.saturating_sub(1);
                }
                self.probed(conn, name).await
            }
            Phase::Live => {
                {
                    let mut st = lock(&doc.cell.state);
                    let front = st.doc.in_flight().map(|o| o.local_seq);
                    if front == Some(local_seq) {
                        st.doc
                            .on_ack(local_seq, seq)
                            .map_err(|e| Ended::Lost(format!("document {name}: {e:?}")))?;
                        st.emit(Event::Acked { seq, local_seq });
                    } else if st.doc.is_in_flight(local_seq) {
                        return Err(Ended::Lost(format!(
                            "document {name}: ack of op {local_seq} before the ops sent earlier"
                        )));
                    }
                    // Otherwise a duplicate (the op was acknowledged in a reply already).
                }
                self.send_ops(conn, name).await?;
                self.close_if_done(conn, name)
            }
            _ => Ok(()),
        }
    }

    async fn reject(
        &mut self,
        conn: &mut Links<C>,
        name: &str,
        local_seq: u64,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), Ended> {
        if refused_access(code) || code == ErrorCode::DocumentDeleted {
            // Sending the op again would be refused again, for ever: the token must
            // change (or, for a deleted document, the application decide whether to
            // start it anew), which is the application's to do.
            return Err(Ended::Failed(code, format!("document {name}: {message}")));
        }
        if code == ErrorCode::Unavailable {
            // No node serves the document right now: the op was not applied, and is
            // sent again (under its id) after the reconnect's backoff.
            return Err(Ended::Unavailable(format!("document {name}: {message}")));
        }
        let Some(doc) = self.docs.get_mut(name) else {
            return Ok(());
        };
        tracing::debug!(doc = name, local_seq, ?code, "op refused: {message}");
        match &mut doc.phase {
            Phase::Probing { .. } | Phase::Live if code == ErrorCode::StorageFailed => {
                // The server's log failed: whether the op reached its disk is unknown
                // (a write can survive the crash that follows). It stays in flight under
                // its id, and goes again once the server is back: then its op id tells.
                Err(Ended::Lost(format!("document {name}: {message}")))
            }
            Phase::Probing {
                waiting, rejected, ..
            } => {
                if lock(&doc.cell.state).doc.is_in_flight(local_seq) {
                    *waiting = waiting.saturating_sub(1);
                    *rejected = true;
                }
                self.probed(conn, name).await
            }
            Phase::Live => {
                // It and every op after it were not applied: they go back to the queue,
                // and the document is opened again (the server refuses the connection's
                // later ops of it until then), caught up, and they are sent anew.
                let too_large = code == ErrorCode::TooLarge;
                if lock(&doc.cell.state).doc.on_reject(local_seq, too_large) {
                    self.send_open(conn, name).map_err(Ended::Lost)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// An answer to a probe arrived; once all have, the document is rebuilt on the
    /// server's text.
    async fn probed(&mut self, conn: &mut Links<C>, name: &str) -> Result<(), Ended> {
        let doc = self.docs.get_mut(name).expect("open");
        let Phase::Probing { waiting: 0, .. } = &doc.phase else {
            return Ok(());
        };
        let Phase::Probing {
            server,
            version,
            applied,
            beyond,
            rejected,
            ..
        } = std::mem::replace(&mut doc.phase, Phase::Down)
        else {
            unreachable!("matched above")
        };
        if beyond || rejected {
            // The snapshot lacks an op applied since, or the server now refuses this
            // connection's ops of the document until it is opened again: keep what is
            // known (the applied ops are part of what the server saw) and open it
            // once more, from scratch.
            lock(&doc.cell.state).doc.settle_applied(applied);
            return self.send_open(conn, name).map_err(Ended::Lost);
        }
        {
            let mut st = lock(&doc.cell.state);
            let patches = st.doc.reload(server.to_string(), version, applied);
            st.map_presence(&crate::ot::TextOp::from_patches(&patches));
            st.gen += 1;
            st.emit(Event::Reloaded { patches });
        }
        self.go_live(conn, name).await
    }
}

/// A refusal by the access token (protocol.md, "Access tokens"): the client stops for
/// good, as for a token refused at the handshake.
fn refused_access(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::AccessDenied | ErrorCode::ReadOnly | ErrorCode::TokenExpired
    )
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `Client` and `DocHandle` are `Send` and `Sync` (checked at compile time).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<DocHandle>();
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that is never reached: the client stays offline, and `open` returns at
    /// once.
    struct Nowhere;

    impl Connector for Nowhere {
        type Stream = tokio::io::DuplexStream;
        async fn connect(&self) -> io::Result<Self::Stream> {
            Err(io::ErrorKind::ConnectionRefused.into())
        }
    }

    /// A server that answers the handshake and then nothing: a stopped process, or a
    /// network that drops every packet while the connection stays open.
    struct Silent;

    impl Connector for Silent {
        type Stream = tokio::io::DuplexStream;
        async fn connect(&self) -> io::Result<Self::Stream> {
            let (client, server) = tokio::io::duplex(64 << 10);
            tokio::spawn(welcome_then_nothing(server));
            Ok(client)
        }
    }

    /// A connector that implements neither `connect_to` nor `connect_fallback` says that
    /// it reaches no other address, in words true of a redirect and of a fallback alike
    /// (the second's default is the first).
    #[tokio::test]
    async fn a_connector_reaching_no_other_address_says_so_for_a_fallback_too() {
        let redirect = Nowhere.connect_to("b:1", "ws://b:1/ws").await.unwrap_err();
        assert_eq!(redirect.kind(), io::ErrorKind::Unsupported);
        assert!(redirect.to_string().contains("not b:1"), "{redirect}");
        let fallback = Nowhere.connect_fallback("c:1").await.unwrap_err();
        assert_eq!(fallback.kind(), io::ErrorKind::Unsupported);
        let text = fallback.to_string();
        assert!(text.contains("not c:1"), "{text}");
        assert!(!text.contains("redirect"), "{text}");
    }

    async fn welcome_then_nothing(mut stream: tokio::io::DuplexStream) {
        use crate::protocol::frame::FrameCodec;
        use crate::protocol::message::Envelope;
        use crate::protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_util::codec::{Decoder, Encoder};
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut buf = bytes::BytesMut::new();
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(env)) if matches!(env.message, Message::Hello { .. }) => break,
                Ok(Some(_)) => {}
                Ok(None) => {
                    if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                Err(e) => panic!("the client sent a bad frame: {e}"),
            }
        }
        let welcome = Envelope {
            request_id: 0,
            message: Message::Welcome {
                version: PROTOCOL_VERSION,
                max_frame: DEFAULT_MAX_FRAME as u32,
                client_id: 7,
            },
        };
        let mut out = bytes::BytesMut::new();
        codec.encode(&welcome, &mut out).unwrap();
        if stream.write_all(&out).await.is_err() {
            return;
        }
        // Takes everything (pings too), answers nothing.
        while stream.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
            buf.clear();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_is_given_up_once_the_timeout_has_passed_not_at_a_later_ping() {
        let mut config = ClientConfig::new("silent:1");
        config.ping_interval = Duration::from_secs(15);
        config.timeout = Duration::from_secs(20);
        config.seed = Some(1);
        let timeout = config.timeout;
        let client = Client::with_connector(config, Silent).await.unwrap();
        client.wait_connected().await.unwrap();
        let connected_at = Instant::now();
        let mut state = client.shared.state.clone();
        while *state.borrow_and_update() == ConnectionState::Connected {
            state.changed().await.unwrap();
        }
        // Nothing was heard since the `Welcome`: given up `timeout` after it (the pings
        // at 15 s and 30 s would make it 30 s).
        let silent_for = connected_at.elapsed();
        assert!(
            silent_for >= timeout && silent_for < timeout + Duration::from_millis(1),
            "given up after {silent_for:?} of silence, the timeout being {timeout:?}"
        );
        assert!(
            matches!(client.state(), ConnectionState::Reconnecting { .. }),
            "{:?}",
            client.state()
        );
        drop(client);
    }

    fn handles(client: &Client) -> usize {
        lock(&client.shared.handles).len()
    }

    #[tokio::test]
    async fn the_client_keeps_the_handles_of_open_documents_only() {
        let client = Client::with_connector(ClientConfig::new("nowhere:1"), Nowhere)
            .await
            .unwrap();
        // A client that opens document after document (a wiki's pages) keeps nothing of
        // those it dropped.
        for i in 0..100 {
            let doc = client.open(&format!("page{i}")).await.unwrap();
            assert_eq!(handles(&client), 1);
            drop(doc);
            assert_eq!(handles(&client), 0);
        }
        // One per document, while any of its handles lives.
        let a = client.open("a").await.unwrap();
        let again = client.open("a").await.unwrap();
        assert_eq!(handles(&client), 1);
        drop(a);
        assert_eq!(handles(&client), 1);
        drop(again);
        assert_eq!(handles(&client), 0);
        // An open refused (past the limit) leaves nothing either.
        let mut open = Vec::new();
        for i in 0..MAX_OPEN_DOCS {
            open.push(client.open(&format!("doc{i}")).await.unwrap());
        }
        let refused = client.open("one-more").await;
        assert!(
            matches!(refused, Err(ClientError::TooManyOpen { .. })),
            "{:?}",
            refused.err()
        );
        assert_eq!(handles(&client), MAX_OPEN_DOCS);
        drop(open);
        assert_eq!(handles(&client), 0);
        client.shutdown().await;
    }
}
