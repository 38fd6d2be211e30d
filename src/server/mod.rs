//! The TCP server: listener, sessions, documents. Data flows socket → frame → session
//! → document → sequencer → WAL → ack and broadcast.

pub mod document;
pub mod durability;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};

use crate::protocol::message::WireOp;
use crate::protocol::DEFAULT_MAX_FRAME;
use crate::sequencer::Sequencer;
use crate::wal::record::OpRecord;
use document::Document;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_frame: usize,
    /// The access token clients must present (empty: none).
    pub token: String,
    /// Messages queued per session before a slow reader is disconnected.
    pub outbox_capacity: usize,
    pub max_connections: usize,
    /// A client's presence is broadcast at most this often; updates in between are
    /// coalesced into the latest.
    pub presence_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame: DEFAULT_MAX_FRAME,
            token: String::new(),
            outbox_capacity: 16 * 1024,
            max_connections: 10_000,
            presence_interval: Duration::from_millis(50),
        }
    }
}

pub struct Server<S> {
    pub sequencer: Arc<S>,
    pub config: ServerConfig,
    documents: Mutex<HashMap<Arc<str>, Arc<Document>>>,
    next_session: AtomicU64,
    durable: Arc<durability::DurabilityQueue>,
    shutdown: broadcast::Sender<()>,
}

pub(crate) fn wire_op(op: OpRecord) -> WireOp {
    WireOp {
        seq: op.server_seq,
        client_id: op.client_id,
        local_seq: op.local_seq,
        patches: op.patches,
    }
}

impl<S: Sequencer> Server<S> {
    pub fn new(sequencer: Arc<S>, config: ServerConfig) -> Arc<Self> {
        Arc::new(Server {
            sequencer,
            config,
            documents: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            durable: Arc::default(),
            shutdown: broadcast::channel(1).0,
        })
    }

    fn documents(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Document>>> {
        self.documents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes `outbox` to document `id`, opening it at the sequencer's durable
    /// version if no session has it open. Subscribing happens under the map's lock, so
    /// that [`Server::release`] never drops a document someone is joining.
    async fn subscribe(&self, id: &str, outbox: document::Outbox) -> Arc<Document> {
        loop {
            if let Some(doc) = self.documents().get(id) {
                doc.subscribe(outbox);
                return doc.clone();
            }
            // Not open. Read its version (waiting for durability), then open it at that
            // version, unless meanwhile another session opened it, submitted and
            // released it: then the version moved, and this reads it again.
            let version = self.sequencer.read(id).await.map_or(0, |v| v.version);
            let mut docs = self.documents();
            if let Some(doc) = docs.get(id) {
                doc.subscribe(outbox);
                return doc.clone();
            }
            let unchanged = self
                .sequencer
                .ops_after(id, version, 1)
                .is_some_and(|ops| ops.is_empty());
            if !unchanged {
                continue;
            }
            let doc = Arc::new(Document::new(
                Arc::from(id),
                version,
                self.config.presence_interval,
            ));
            docs.insert(doc.id.clone(), doc.clone());
            doc.subscribe(outbox);
            return doc;
        }
    }

    /// Forgets `doc` once it has no subscriber and nothing waiting for durability: a
    /// server's memory follows the documents open now, not every one ever opened.
    pub(crate) fn release(&self, doc: &Arc<Document>) {
        let mut docs = self.documents();
        if doc.is_idle() && docs.get(&doc.id).is_some_and(|d| Arc::ptr_eq(d, doc)) {
            docs.remove(&doc.id);
        }
    }

    /// Documents open now (held in memory).
    pub fn open_documents(&self) -> usize {
        self.documents().len()
    }

    /// Accepts connections until `stop` resolves, then tells every session to close
    /// and waits for them (their in-flight commits finish first).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let limit = Arc::new(Semaphore::new(self.config.max_connections));
        let deliverer = tokio::spawn(self.durable.clone().run(self.clone()));
        let mut sessions = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("never closed"),
                _ = &mut stop => break,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut stop => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
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
        let _ = self.shutdown.send(());
        while sessions.join_next().await.is_some() {}
        deliverer.abort();
    }
}

/// Binds `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
