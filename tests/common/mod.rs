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
