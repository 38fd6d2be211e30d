//! Helpers shared by the integration tests that run a server over TCP.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quire::client::connection::{Connection, SyncedDoc};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::server::{Server, ServerConfig};
use quire::wal::WalConfig;
use tokio::sync::oneshot;

pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    pub store: Arc<LocalSequencer>,
    pub server: Arc<Server<LocalSequencer>>,
}

impl Running {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
        self.store.close();
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

pub async fn start(dir: &Path, token: &str) -> Running {
    start_with(
        dir,
        ServerConfig {
            token: token.into(),
            ..ServerConfig::default()
        },
    )
    .await
}

pub async fn start_with(dir: &Path, config: ServerConfig) -> Running {
    start_with_store(dir, store_config(), config).await
}

pub async fn start_with_store(dir: &Path, store: LocalConfig, config: ServerConfig) -> Running {
    let (store, _) = LocalSequencer::open(dir, store).unwrap();
    serve(Arc::new(store), config).await
}

pub async fn open(addr: SocketAddr, client: u64, doc: &str) -> SyncedDoc {
    let conn = Connection::connect(addr, client, "").await.unwrap();
    SyncedDoc::open(conn, doc, 1).await.unwrap()
}

/// A server on the simulated disk (for holding or failing its syncs).
pub async fn start_on_sim(fs: &quire::wal::vfs::sim::SimFs, config: ServerConfig) -> Running {
    let (store, _) =
        LocalSequencer::open_with(Arc::new(fs.clone()), Path::new("/data"), store_config())
            .unwrap();
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
