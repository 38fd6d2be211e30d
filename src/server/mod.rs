//! The TCP server: listener, sessions, documents. Data flows socket → frame → session
//! → document → sequencer → WAL → ack and broadcast.

pub mod document;
pub mod durability;
pub mod metrics;
pub mod outbox;
pub mod session;
pub mod stop;
pub mod transport;
pub mod websocket;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::protocol;
use crate::protocol::message::WireOp;
use crate::protocol::DEFAULT_MAX_FRAME;
use crate::sequencer::Sequencer;
use document::{Document, SessionId};

/// The server's limits and settings. Every limit is stated in `quire serve --help` or
/// protocol.md, enforced, and tested at and just past its value.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame, in bytes after the length field, either way.
    pub max_frame: usize,
    /// The secrets that sign access tokens (protocol.md, "Access tokens"). None: every
    /// client is anonymous and may do anything to any document; `quire serve` allows
    /// that only on a loopback address unless told `--insecure` ([`crate::auth::startup`]).
    pub keys: Option<Arc<crate::auth::Keys>>,
    /// Bytes queued for one connection: half for pushed frames (broadcasts, acks; full:
    /// the client is not reading, code 8), half for replies (which wait for room).
    pub outbox_bytes: usize,
    /// Connections served at once; one more gets `Error` code 9 and is closed.
    pub max_connections: usize,
    /// Bytes of partly received frames larger than [`SMALL_FRAME`] held at once across
    /// all connections; a large frame that finds none left gets code 9.
    pub large_frame_budget: usize,
    /// Bytes of ops (their patches on the wire) sequenced and not yet durable, whole
    /// server: a submit waits for room.
    pub unsynced_bytes: usize,
    /// Time from connecting to a complete `Hello`.
    pub handshake_timeout: Duration,
    /// Time allowed between two complete frames from a client (it sends `Ping` when it
    /// has nothing else to say).
    pub idle_timeout: Duration,
    /// Time one write to a client may take before the connection is dropped.
    pub write_timeout: Duration,
    /// A client's presence is broadcast at most this often; updates in between are
    /// coalesced into the latest.
    pub presence_interval: Duration,
    /// Ops per document kept in memory for transforming late ops; older ones are read
    /// back from the log (tests make it small to take that path often).
    pub history_window: usize,
    /// Where work that may take long (log reads, large transforms) runs.
    pub blocking: Blocking,
    /// Whether the serving metrics record (off: to measure what they cost).
    pub metrics: bool,
}

/// Where a session's long work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Blocking {
    /// On tokio's blocking threads, never on an async worker (production).
    #[default]
    Threads,
    /// On the calling task, at once: the deterministic simulator runs everything on one
    /// thread, and a thread pool would make its runs depend on the OS scheduler.
    Inline,
}

/// At shutdown, how long sessions may take to flush what is queued for them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Frames up to this size (length field included) are read without asking the
/// server-wide budget: every connection may hold one.
pub const SMALL_FRAME: usize = 64 * 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            keys: None,
            outbox_bytes: 8 << 20,
            max_connections: 10_000,
            large_frame_budget: 64 << 20,
            unsynced_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            presence_interval: Duration::from_millis(50),
            history_window: 4096,
            blocking: Blocking::Threads,
            metrics: true,
        }
    }
}

impl ServerConfig {
    /// Checks that the limits fit together; the error names the one that does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use crate::protocol::{MAX_MAX_FRAME, MIN_MAX_FRAME};
        if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&self.max_frame) {
            return Err(ConfigError::MaxFrame(self.max_frame));
        }
        // A frame on the wire is its 4-byte length and its body.
        let frame = self.max_frame + 4;
        if self.outbox_bytes / 2 < frame {
            return Err(ConfigError::OutboxBytes {
                bytes: self.outbox_bytes,
                max_frame: self.max_frame,
            });
        }
        if self.large_frame_budget < frame {
            return Err(ConfigError::LargeFrameBudget {
                bytes: self.large_frame_budget,
                max_frame: self.max_frame,
            });
        }
        if self.unsynced_bytes < self.max_frame {
            return Err(ConfigError::UnsyncedBytes {
                bytes: self.unsynced_bytes,
                max_frame: self.max_frame,
            });
        }
        if self.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        for (timeout, t) in [
            (Timeout::Handshake, self.handshake_timeout),
            (Timeout::Idle, self.idle_timeout),
            (Timeout::Write, self.write_timeout),
        ] {
            if t.is_zero() {
                return Err(ConfigError::ZeroTimeout(timeout));
            }
        }
        Ok(())
    }
}

/// Which limit of a [`ServerConfig`] does not fit the others ([`ServerConfig::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// The frame limit is outside `MIN_MAX_FRAME..=MAX_MAX_FRAME` (protocol.md).
    MaxFrame(usize),
    /// Half the outgoing buffer cannot hold one frame of the frame limit.
    OutboxBytes { bytes: usize, max_frame: usize },
    /// The large-frame budget cannot hold one frame of the frame limit.
    LargeFrameBudget { bytes: usize, max_frame: usize },
    /// The budget of bytes waiting for the disk cannot hold one op of the frame limit.
    UnsyncedBytes { bytes: usize, max_frame: usize },
    /// No connection could ever be served.
    NoConnections,
    /// A timeout of zero: every connection would fail at once.
    ZeroTimeout(Timeout),
}

/// The server's deadlines, named in a [`ConfigError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    Handshake,
    Idle,
    Write,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::protocol::{MAX_MAX_FRAME, MIN_MAX_FRAME};
        match self {
            ConfigError::MaxFrame(n) => {
                write!(
                    f,
                    "max frame {n} is outside {MIN_MAX_FRAME}..={MAX_MAX_FRAME}"
                )
            }
            ConfigError::OutboxBytes { bytes, max_frame } => write!(
                f,
                "each half of the outgoing buffer ({bytes} bytes) must hold a frame of max \
                 frame {max_frame} and its 4-byte length"
            ),
            ConfigError::LargeFrameBudget { bytes, max_frame } => write!(
                f,
                "the large-frame budget ({bytes} bytes) must hold a frame of max frame \
                 {max_frame} and its 4-byte length"
            ),
            ConfigError::UnsyncedBytes { bytes, max_frame } => write!(
                f,
                "the budget of bytes waiting for the disk ({bytes}) must hold an op of max \
                 frame {max_frame}"
            ),
            ConfigError::NoConnections => f.write_str("max connections must be at least 1"),
            ConfigError::ZeroTimeout(t) => {
                let name = match t {
                    Timeout::Handshake => "handshake",
                    Timeout::Idle => "idle",
                    Timeout::Write => "write",
                };
                write!(f, "the {name} timeout must be above zero")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Why [`Server::delete_document`] did not delete a document.
#[derive(Debug, Clone)]
pub enum DeleteError {
    /// Another node serves it (cluster mode): delete it there.
    Elsewhere(crate::sequencer::Owner),
    /// Nothing was deleted, and asking again later may succeed (cluster mode: no node
    /// serves the document right now, or this node could not start its erasure).
    Unavailable(String),
    /// The deletion failed: the storage, or (cluster mode) the document moved meanwhile.
    Failed(String),
}

impl From<crate::sequencer::DeleteRefused> for DeleteError {
    fn from(refused: crate::sequencer::DeleteRefused) -> Self {
        use crate::sequencer::DeleteRefused;
        match refused {
            DeleteRefused::Unavailable(why) => DeleteError::Unavailable(why.to_string()),
            DeleteRefused::Failed(why) => DeleteError::Failed(why.to_string()),
        }
    }
}

impl std::fmt::Display for DeleteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeleteError::Elsewhere(owner) => write!(
                f,
                "the node advertised as {} serves it; delete it there",
                owner.addr
            ),
            DeleteError::Unavailable(why) | DeleteError::Failed(why) => f.write_str(why),
        }
    }
}

pub struct Server<S> {
    pub sequencer: Arc<S>,
    pub config: ServerConfig,
    documents: Mutex<HashMap<Arc<str>, Arc<Document<outbox::Outbox>>>>,
    /// The live session of each client id: a second connection with the same id
    /// replaces the first (code 11), so two never act as one client at once.
    clients: Mutex<HashMap<u64, outbox::Outbox>>,
    /// A permit per connection being served ([`ServerConfig::max_connections`]), held
    /// from its accept until its session and writer are done.
    connections: Arc<Semaphore>,
    /// Bytes of large frames being received, server-wide ([`ServerConfig::large_frame_budget`]).
    large_frames: Arc<Semaphore>,
    /// Bytes of ops sequenced and not yet durable ([`ServerConfig::unsynced_bytes`]).
    unsynced: Arc<Semaphore>,
    next_session: AtomicU64,
    durable: Arc<durability::DurabilityQueue>,
    /// The read loops to stop at shutdown.
    readers: Mutex<Readers>,
    metrics: Arc<metrics::Metrics>,
}

/// The sessions' stop signals, fired at shutdown.
#[derive(Default)]
struct Readers {
    shutting_down: bool,
    /// By session id: fired in that order (the simulator replays a seed exactly).
    stops: std::collections::BTreeMap<SessionId, Arc<stop::StopSignal>>,
}

pub(crate) fn wire_op(op: crate::op::SequencedOp) -> WireOp {
    WireOp {
        seq: op.seq,
        client_id: op.id.client_id,
        local_seq: op.id.local_seq,
        patches: op.patches,
    }
}

impl<S: Sequencer> Server<S> {
    /// A server over `sequencer`. Panics if the limits do not fit together (check
    /// them first with [`ServerConfig::validate`]).
    pub fn new(sequencer: Arc<S>, config: ServerConfig) -> Arc<Self> {
        if let Err(e) = config.validate() {
            panic!("invalid server config: {e}");
        }
        let metrics = Arc::new(metrics::Metrics::new(config.metrics));
        Arc::new(Server {
            sequencer,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            large_frames: Arc::new(Semaphore::new(config.large_frame_budget)),
            unsynced: Arc::new(Semaphore::new(config.unsynced_bytes)),
            config,
            documents: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            durable: Arc::default(),
            readers: Mutex::default(),
            metrics,
        })
    }

    /// Has `stop` fired when the server shuts down (at once if it is shutting down).
    fn stop_at_shutdown(&self, session: SessionId, stop: Arc<stop::StopSignal>) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if readers.shutting_down {
            stop.fire();
        }
        readers.stops.insert(session, stop);
    }

    /// Undoes [`Server::stop_at_shutdown`] (the session's read loop ended).
    fn forget_stop(&self, session: SessionId) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        readers.stops.remove(&session);
    }

    fn documents(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Document<outbox::Outbox>>>> {
        self.documents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `outbox` to document `id`, opening it at the sequencer's version if no
    /// session has it open. Subscribing happens under the map's lock, so that
    /// [`Server::release`] never drops a document someone is joining. A document without
    /// a [`Document`] has every op durable (one is released only when all its ops were
    /// delivered, and recovery reads only durable ops), so that version is durable, and
    /// nobody can sequence an op for it meanwhile (ops go through its `Document`).
    fn subscribe(&self, id: &str, outbox: outbox::Outbox) -> Arc<Document<outbox::Outbox>> {
        let mut docs = self.documents();
        let incarnation = self.sequencer.incarnation(id);
        if let Some(doc) = docs.get(id) {
            if doc.incarnation == incarnation {
                doc.subscribe(outbox);
                return doc.clone();
            }
            // Opened under a load of the document that ended (cluster mode): its
            // sessions open it again, here, and get the new one.
            if let Some(here) = self.sequencer.here() {
                let stale = docs.remove(id).expect("found above");
                stale.moved(here);
            }
        }
        let doc = Arc::new(Document::with_incarnation(
            Arc::from(id),
            self.sequencer.version(id),
            document::DocumentLimits {
                presence_interval: self.config.presence_interval,
                max_frame: self.config.max_frame,
                history_window: self.config.history_window,
            },
            incarnation,
        ));
        docs.insert(doc.id.clone(), doc.clone());
        doc.subscribe(outbox);
        doc
    }

    /// Deletes document `id` (the admin endpoint's `DELETE /docs/{id}`): its tombstone
    /// goes into the log under the document's lock (an op sequenced before it is deleted
    /// with it; one after it is refused with code 32), and once the tombstone is durable
    /// the sessions that have it open get the ops sequenced before it, then `Error` 32;
    /// then its snapshot files are removed and its id may be used again (a new, empty
    /// document). The version it was deleted at; `Ok(None)` if the storage does not
    /// hold it.
    ///
    /// Cluster mode: only the document's owner deletes it, so it is routed first (this
    /// node claims it if nobody serves it and it is preferred here, as at an `Open`);
    /// [`DeleteError::Elsewhere`] names the node that serves it. Durable means deleted
    /// from the cluster's store; a deletion that fails there (the document moved
    /// meanwhile) deleted nothing, and the sessions that had it open here are redirected
    /// rather than told it is gone.
    pub async fn delete_document(self: &Arc<Self>, id: &str) -> Result<Option<u64>, DeleteError> {
        if self.sequencer.here().is_some() {
            match self.sequencer.route(id).await {
                Ok(crate::sequencer::Route::Here) => {}
                Ok(crate::sequencer::Route::Elsewhere(owner)) => {
                    return Err(DeleteError::Elsewhere(owner))
                }
                Err(e @ crate::sequencer::RouteError::Unavailable(_)) => {
                    return Err(DeleteError::Unavailable(e.to_string()))
                }
            }
        }
        let (deletion, document) = {
            // Under the map's lock: nobody opens the document between its tombstone and
            // its removal from the map (an `Open` after it gets a new, empty one).
            let mut docs = self.documents();
            let document = docs.get(id).cloned();
            let deletion = match &document {
                Some(document) => document.delete(&*self.sequencer),
                None => self.sequencer.delete(id),
            }
            .map_err(DeleteError::from)?;
            if deletion.is_some() && document.is_some() {
                docs.remove(id);
            }
            (deletion, document)
        };
        let Some(deletion) = deletion else {
            return Ok(None);
        };
        // The rest on a task of its own: once the tombstone is in, the deletion is
        // finished and its sessions told even if the caller stops waiting (an HTTP
        // client that hangs up drops the handler's future).
        let finish = tokio::spawn(
            self.clone()
                .finish_deletion(id.to_owned(), deletion, document),
        );
        finish
            .await
            .map_err(|e| DeleteError::Failed(format!("finishing the deletion: {e}")))?
    }

    /// [`Server::delete_document`] once the tombstone is in: waits for the deletion to be
    /// durable, tells the document (its sessions, and the ops that waited for it), and
    /// removes what the storage keeps of it.
    async fn finish_deletion(
        self: Arc<Self>,
        id: String,
        deletion: crate::sequencer::Deletion,
        document: Option<Arc<Document<outbox::Outbox>>>,
    ) -> Result<Option<u64>, DeleteError> {
        if let Err(e) = self.sequencer.wait_deleted(deletion.ticket).await {
            if let Some(here) = self.sequencer.here() {
                // Cluster mode: not deleted (or not known to be), and not served here any
                // more; its sessions open it again, wherever it is served now.
                if let Some(document) = &document {
                    document.moved(here);
                }
                return Err(e.into());
            }
            // Its tombstone may be on disk all the same (a failed sync does not say the
            // write did not land): after the restart the document is either deleted or
            // as it was, which nothing here can tell now.
            let why = format!(
                "whether the document was deleted is not known: the log failed before the \
                 deletion was durable ({e}); after the server's restart it is either deleted \
                 or as it was (ask again then)"
            );
            if let Some(document) = &document {
                document.deletion_failed(&why);
            }
            return Err(DeleteError::Failed(why));
        }
        if let Some(document) = document {
            document.deleted(deletion.version);
        }
        let sequencer = self.sequencer.clone();
        self.blocking(move || sequencer.finish_delete(&id))
            .await
            .map_err(DeleteError::Failed)?
            .map_err(|e| DeleteError::Failed(e.to_string()))?;
        Ok(Some(deletion.version))
    }

    /// Another node serves document `id` now (cluster mode: this node lost it, or is
    /// draining): every session that has it open is sent `Redirect` to `owner`
    /// (request id 0, after its snapshot if that is being sent) and unsubscribed, and
    /// nothing more of it is sequenced, acknowledged or broadcast here (protocol.md,
    /// Redirect). An `Open` of it afterwards creates it anew, after asking
    /// [`Sequencer::route`]. Returns whether the document was open here.
    pub fn redirect_document(&self, id: &str, owner: crate::sequencer::Owner) -> bool {
        // Under the map's lock: nobody subscribes to it between the two steps.
        let mut docs = self.documents();
        match docs.remove(id) {
            Some(document) => {
                document.moved(owner);
                true
            }
            None => false,
        }
    }

    /// [`Server::redirect_document`] for this very document (a submit to it was
    /// refused with `SubmitError::Moved`): a newer document of the same id is left alone.
    pub(crate) fn redirect(
        &self,
        document: &Arc<Document<outbox::Outbox>>,
        owner: crate::sequencer::Owner,
    ) {
        let mut docs = self.documents();
        if docs
            .get(&document.id)
            .is_some_and(|d| Arc::ptr_eq(d, document))
        {
            docs.remove(&document.id);
        }
        document.moved(owner);
    }

    /// Registers `outbox` as the live session of its client id; a session already
    /// there for it is closed with code 11.
    fn claim_client_id(&self, outbox: &outbox::Outbox) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = clients.insert(outbox.client_id, outbox.clone()) {
            old.close_with(
                protocol::message::ErrorCode::Replaced,
                format!(
                    "client id {} connected again on another connection; this one is closed",
                    outbox.client_id
                ),
            );
        }
    }

    /// Forgets `outbox` as its client id's live session (if it still is).
    fn release_client_id(&self, outbox: &outbox::Outbox) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if clients
            .get(&outbox.client_id)
            .is_some_and(|o| o.session == outbox.session)
        {
            clients.remove(&outbox.client_id);
        }
    }

    /// Forgets `doc` once it has no subscriber and nothing waiting for durability: a
    /// server's memory follows the documents open now, not every one ever opened.
    pub(crate) fn release(&self, doc: &Arc<Document<outbox::Outbox>>) {
        let mut docs = self.documents();
        if doc.is_idle() && docs.get(&doc.id).is_some_and(|d| Arc::ptr_eq(d, doc)) {
            docs.remove(&doc.id);
        }
    }

    /// Runs `f`, which may block (a log read, a long transform), where
    /// [`ServerConfig::blocking`] says. An error is a panic in `f`.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        match self.config.blocking {
            Blocking::Threads => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| e.to_string()),
            Blocking::Inline => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|p| panic_message(&*p)),
        }
    }

    /// Bytes of the large-frame budget held by frames being received now.
    pub fn large_frame_bytes_in_use(&self) -> usize {
        self.config.large_frame_budget - self.large_frames.available_permits()
    }

    /// Connections being served now: from their accept until their session and its
    /// writer are done (the handshake, and a replaced or closing session, included).
    pub fn open_connections(&self) -> usize {
        self.config.max_connections - self.connections.available_permits()
    }

    /// Client ids with a live session now.
    pub fn connected_clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The most bytes queued for any one connected client now (bounded by
    /// [`ServerConfig::outbox_bytes`]).
    pub fn largest_outbox(&self) -> usize {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .values()
            .map(|o| o.queued_bytes())
            .max()
            .unwrap_or(0)
    }

    /// The serving metrics.
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// Documents open now (held in memory).
    pub fn open_documents(&self) -> usize {
        self.documents().len()
    }

    /// Accepts connections until `stop` resolves, then tells every session to close
    /// and waits for them (their in-flight commits finish first). Returns how many
    /// sessions were cut off because they did not finish within [`SHUTDOWN_GRACE`] (a
    /// peer that does not read what is queued for it).
    ///
    /// Dropping the future instead (the simulator's crash) ends every task of the server
    /// at once: sessions, their writers and the durability task.
    pub async fn serve<L: transport::Listener>(
        self: Arc<Self>,
        mut listener: L,
        stop: impl std::future::Future<Output = ()>,
    ) -> usize {
        let limit = self.connections.clone();
        let refusals = Arc::new(Semaphore::new(session::MAX_REFUSALS_LINGERING));
        let mut deliverer =
            session::AbortOnDrop(tokio::spawn(self.durable.clone().run(self.clone())));
        let mut sessions = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stop => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        // Over the limit: say so rather than leave it unanswered.
                        let message = format!(
                            "the server is at its limit of {} connections; retry later",
                            self.config.max_connections
                        );
                        let max_frame = self.config.max_frame;
                        match refusals.clone().try_acquire_owned() {
                            Ok(lingering) => {
                                sessions.spawn(async move {
                                    session::refuse_busy(stream, max_frame, message).await;
                                    drop(lingering);
                                });
                            }
                            // Too many refusals lingering already (a flood): the Error
                            // alone, and close.
                            Err(_) => session::refuse_busy_now(&stream, max_frame, message),
                        }
                        continue;
                    };
                    let id = self.next_session.fetch_add(1, Ordering::Relaxed);
                    let server = self.clone();
                    tracing::debug!(session = id, %peer, "connected");
                    sessions.spawn(async move {
                        session::run(server, stream, id).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            while sessions.try_join_next().is_some() {}
        }
        // Sessions stop reading at once and flush what is queued for them; a peer that
        // does not read cannot hold shutdown beyond the grace period.
        {
            let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            readers.shutting_down = true;
            for stop in readers.stops.values() {
                stop.fire();
            }
        }
        let mut cut_off = 0;
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                biased;
                joined = sessions.join_next() => if joined.is_none() { break },
                _ = &mut grace => {
                    tracing::warn!(sessions = sessions.len(), "closing connections that did not drain in {SHUTDOWN_GRACE:?}");
                    cut_off = sessions.len();
                    sessions.abort_all();
                    while sessions.join_next().await.is_some() {}
                    break;
                }
            }
        }
        // Awaited, not only aborted: the task holds the server (and so the store and its
        // directory lock) until it is dropped, and a restart in the same process must
        // find the lock free once `serve` returns.
        deliverer.0.abort();
        let _ = (&mut deliverer.0).await;
        cut_off
    }
}

/// Connections the kernel queues before they are accepted: a burst of reconnecting
/// clients (after a restart) is accepted, not dropped into SYN retries a second apart.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What a caught panic said.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MAX_MAX_FRAME, MIN_MAX_FRAME};

    /// Each limit at its smallest valid value passes, and one below it is refused by
    /// name; the defaults pass.
    #[test]
    fn each_limit_is_checked_at_and_past_its_value() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let tight = |max_frame: usize| ServerConfig {
            max_frame,
            outbox_bytes: 2 * (max_frame + 4),
            large_frame_budget: max_frame + 4,
            unsynced_bytes: max_frame,
            max_connections: 1,
            handshake_timeout: Duration::from_nanos(1),
            idle_timeout: Duration::from_nanos(1),
            write_timeout: Duration::from_nanos(1),
            ..ServerConfig::default()
        };
        for max_frame in [MIN_MAX_FRAME, 64 << 10, MAX_MAX_FRAME] {
            let c = tight(max_frame);
            assert_eq!(c.validate(), Ok(()), "{c:?}");
            // Each limit one past its smallest valid value, and what it is refused as.
            let one_past = |change: fn(&mut ServerConfig)| {
                let mut past = c.clone();
                change(&mut past);
                past
            };
            let past = [
                (
                    one_past(|c| c.outbox_bytes -= 1),
                    ConfigError::OutboxBytes {
                        bytes: c.outbox_bytes - 1,
                        max_frame,
                    },
                ),
                (
                    one_past(|c| c.large_frame_budget -= 1),
                    ConfigError::LargeFrameBudget {
                        bytes: c.large_frame_budget - 1,
                        max_frame,
                    },
                ),
                (
                    one_past(|c| c.unsynced_bytes -= 1),
                    ConfigError::UnsyncedBytes {
                        bytes: c.unsynced_bytes - 1,
                        max_frame,
                    },
                ),
                (
                    one_past(|c| c.max_connections = 0),
                    ConfigError::NoConnections,
                ),
                (
                    one_past(|c| c.handshake_timeout = Duration::ZERO),
                    ConfigError::ZeroTimeout(Timeout::Handshake),
                ),
                (
                    one_past(|c| c.idle_timeout = Duration::ZERO),
                    ConfigError::ZeroTimeout(Timeout::Idle),
                ),
                (
                    one_past(|c| c.write_timeout = Duration::ZERO),
                    ConfigError::ZeroTimeout(Timeout::Write),
                ),
            ];
            for (config, refused) in past {
                assert_eq!(config.validate(), Err(refused));
                // The message names the value refused, and the frame limit it must fit.
                let message = refused.to_string();
                if let ConfigError::OutboxBytes { bytes, .. }
                | ConfigError::LargeFrameBudget { bytes, .. }
                | ConfigError::UnsyncedBytes { bytes, .. } = refused
                {
                    assert!(message.contains(&format!("({bytes}")), "{message}");
                    assert!(message.contains(&max_frame.to_string()), "{message}");
                }
            }
        }
        for max_frame in [MIN_MAX_FRAME - 1, MAX_MAX_FRAME + 1] {
            let c = ServerConfig {
                max_frame,
                ..tight(MAX_MAX_FRAME + 1)
            };
            assert_eq!(c.validate(), Err(ConfigError::MaxFrame(max_frame)));
        }
    }
}
