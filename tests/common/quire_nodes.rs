//! `quire serve --etcd` processes on loopback for the cluster's end-to-end tests, and
//! what those tests do with them: start and stop nodes, read who owns a document in
//! etcd, name documents after the node that prefers them, open them from clients at
//! home on chosen nodes, edit them with countable tokens and check that every token
//! landed exactly once.
//!
//! Include it next to the etcd harness, which it uses as `crate::etcd_cluster`:
//!
//! ```ignore
//! #[path = "common/etcd_cluster.rs"]
//! mod etcd_cluster;
//! #[path = "common/quire_nodes.rs"]
//! mod quire_nodes;
//! ```
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quire::client::{Client, ClientConfig, DocHandle};
use quire::op::Patch;

use crate::etcd_cluster::EtcdCluster;

/// A bound on waits, so that a failure ends the test instead of hanging it; never an
/// assertion about speed.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The ids of the nodes [`start_nodes`] starts, in the order of its result.
pub const NODE_IDS: [&str; 3] = ["n0", "n1", "n2"];

/// One test at a time: each runs an etcd cluster and three nodes on a shared machine.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Node {
    pub id: String,
    pub child: Child,
    pub addr: SocketAddr,
    /// Its admin endpoint, whose document routes take [`ADMIN_TOKEN`].
    pub admin: SocketAddr,
    pub dir: PathBuf,
    /// Every line the node wrote to stderr so far.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Node {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// The node's log lines from the `from`th on that contain `needle`.
    pub fn log_lines(&self, from: usize, needle: &str) -> Vec<String> {
        self.logs.lock().unwrap()[from..]
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    pub fn log_len(&self) -> usize {
        self.logs.lock().unwrap().len()
    }
}

/// The admin token of every node ([`Node::admin`]).
pub const ADMIN_TOKEN: &str = "cluster-test-admin-token";

pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts node `id` on a free port; returns once it serves.
pub fn start_node(etcd: &EtcdCluster, id: &str, root: &Path) -> Node {
    let addr = free_port();
    let admin = free_port();
    let dir = root.join(id);
    // Beside the data directory, which a test may delete.
    let token_file = root.join(format!("{id}.admin-token"));
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    // `QUIRE_BIN`: another build of the same code (a loop of runs that must not see
    // the target directory's binary rebuilt under it, without the cluster feature).
    let bin = std::env::var_os("QUIRE_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_quire").into());
    let mut child = Command::new(bin)
        .args(["serve", "--lease-ttl-secs", "2"])
        .arg("--admin-listen")
        .arg(admin.to_string())
        .arg("--admin-token-file")
        .arg(&token_file)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--advertise")
        .arg(addr.to_string())
        .arg("--node-id")
        .arg(id)
        .arg("--etcd")
        .arg(etcd.endpoints().join(","))
        .arg("--data-dir")
        .arg(&dir)
        .env(
            "RUST_LOG",
            std::env::var("QUIRE_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quire binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let name = id.to_owned();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            if line.contains("serving") {
                let _ = tx.send(());
            }
            kept.lock().unwrap().push(line);
        }
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("node {id} serves"));
    Node {
        id: id.to_owned(),
        child,
        addr,
        admin,
        dir,
        logs,
    }
}

/// Starts the nodes of [`NODE_IDS`], in that order.
pub fn start_nodes(etcd: &EtcdCluster, root: &Path) -> Vec<Node> {
    NODE_IDS
        .iter()
        .map(|id| start_node(etcd, id, root))
        .collect()
}

pub fn stop_nodes(nodes: &mut [Node]) {
    for node in nodes {
        // A stopped process (SIGSTOP) is killed all the same.
        let _ = node.child.kill();
        let _ = node.child.wait();
    }
}

/// Runs `test` with a three-member etcd cluster and the nodes of [`start_nodes`] on it,
/// one test at a time ([`one_at_a_time`]); afterwards, passed or panicked, the nodes are
/// killed and etcd's members too.
pub fn on_a_cluster(test: impl FnOnce(&mut [Node], &Arc<Mutex<EtcdCluster>>)) {
    let _serial = one_at_a_time();
    let etcd = Arc::new(Mutex::new(EtcdCluster::start()));
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&etcd.lock().unwrap(), root.path());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&mut nodes, &etcd)));
    stop_nodes(&mut nodes);
    drop(etcd);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// The clients' runtime (etcd and the nodes are started outside it: the etcd harness
/// blocks on a runtime of its own).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a thread of its own, outside the clients' runtime (for the etcd harness
/// and the blocking etcd adapter), without blocking the runtime.
pub async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || std::thread::spawn(f).join())
        .await
        .unwrap()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The first of `{prefix}-0`, `{prefix}-1`, ... whose preferred owner among `nodes` (by
/// the cluster's rendezvous hashing) is `node`: a document that `node` claims at its
/// first `Open`, wherever that `Open` is sent (a node that does not prefer an unowned
/// document may redirect it to the one that does). `nodes` are the live nodes when the
/// document is first opened.
pub fn name_preferred_by(prefix: &str, node: &str, nodes: &[&str]) -> String {
    assert!(nodes.contains(&node), "{node} is one of {nodes:?}");
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|doc| {
            quire::cluster::hashing::preferred_owner(doc, nodes.iter().copied()) == Some(node)
        })
        .expect("some name is preferred by every node")
}

/// `n` documents named after `prefix` (`{prefix}{i}-{j}`) preferred by `node` among
/// `nodes` (see [`name_preferred_by`]).
pub fn names_preferred_by(prefix: &str, n: usize, node: &str, nodes: &[&str]) -> Vec<String> {
    (0..n)
        .map(|i| name_preferred_by(&format!("{prefix}{i}"), node, nodes))
        .collect()
}

/// The node ids that own `docs` in etcd, as its owner keys say (blocking).
pub fn owners(etcd_endpoints: &[String], docs: &[String]) -> Result<Vec<Option<String>>, String> {
    use quire::cluster::etcd::{EtcdConfig, EtcdStore};
    use quire::cluster::store::Store;
    let store = EtcdStore::connect(EtcdConfig::new(etcd_endpoints.to_vec()))
        .map_err(|e| format!("connect: {e}"))?;
    docs.iter()
        .map(|doc| {
            let key = quire::cluster::ownership::Keys::new("/quire").owner(doc);
            let kv = store.get(&key).map_err(|e| format!("get {key}: {e}"))?;
            Ok(kv.map(|kv| String::from_utf8(kv.value).unwrap()))
        })
        .collect()
}

/// Whether every owner is one of `to`.
fn all_owned_by(owners: &[Option<String>], to: &[&str]) -> bool {
    owners
        .iter()
        .all(|o| o.as_deref().is_some_and(|o| to.contains(&o)))
}

/// Polls the owners of `docs` (blocking) until every one is one of `to`, or [`PATIENCE`]
/// passed; returns the last answer (a read that failed is retried: the last error is
/// printed).
pub fn owners_moved(
    etcd_endpoints: Vec<String>,
    docs: Vec<String>,
    to: &[&str],
) -> Vec<Option<String>> {
    let deadline = Instant::now() + PATIENCE;
    let mut last = Vec::new();
    loop {
        match owners(&etcd_endpoints, &docs) {
            Ok(now) => {
                let moved = all_owned_by(&now, to);
                last = now;
                if moved {
                    return last;
                }
            }
            Err(e) => eprintln!("reading the owner keys from {etcd_endpoints:?}: {e}"),
        }
        if Instant::now() > deadline {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (off the runtime: the etcd adapter blocks) until etcd says every one of `docs`
/// is owned by one of `to`; fails the test with the owners it last read otherwise.
pub async fn assert_owned_by(etcd_endpoints: Vec<String>, docs: &[String], to: &'static [&str]) {
    let names = docs.to_vec();
    let owners = off_runtime(move || owners_moved(etcd_endpoints, names, to)).await;
    assert!(
        all_owned_by(&owners, to),
        "{docs:?} are owned by {to:?}: their owners are {owners:?}"
    );
}

pub fn config(addr: SocketAddr, seed: u64) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(300);
    c.timeout = Duration::from_secs(3);
    c.seed = Some(seed);
    c
}

/// A client with `config`, once connected.
pub async fn connected(config: ClientConfig) -> Client {
    let c = Client::connect(config).await.unwrap();
    c.wait_connected().await.unwrap();
    c
}

/// Opens `docs` at `addr` first, with one edit each ("|"): the node their first `Open`
/// reaches claims them (or, a node placing documents by preference, the node it
/// redirects to; see [`name_preferred_by`] for names that land where wanted either way).
pub async fn claim_at(addr: SocketAddr, docs: &[String], seed: u64) {
    let c = connected(config(addr, seed)).await;
    for doc in docs {
        let handle = c.open(doc).await.unwrap();
        handle.edit(&[Patch::new(0, 0, "|")]).await.unwrap();
        tokio::time::timeout(PATIENCE, handle.synced())
            .await
            .unwrap_or_else(|_| panic!("{doc}: the claiming edit acknowledged"))
            .unwrap();
    }
    c.shutdown().await;
}

/// Writer `who`'s `i`th token: `[{who}#{i}]` (the `#` keeps one writer's tokens apart
/// from another's whose name continues with digits).
pub fn token(who: &str, i: usize) -> String {
    format!("[{who}#{i}]")
}

/// Inserts `token` between two tokens near the middle of the text (a token stays whole,
/// so it can be counted).
pub async fn edit_token(doc: &DocHandle, token: &str) {
    doc.edit_with(|v| {
        let text: Vec<char> = v.text().chars().collect();
        let at = (text.len() / 2..text.len())
            .find(|&i| text[i] == '[')
            .unwrap_or(text.len());
        vec![Patch::new(at as u32, 0, token)]
    })
    .await
    .unwrap();
}

/// Edits `doc` `n` times with writer `who`'s tokens `from`, `from + 1`, ... ([`token`]),
/// counting each in `made`.
pub async fn edit_tokens(doc: &DocHandle, who: &str, from: usize, n: usize, made: &AtomicUsize) {
    for i in from..from + n {
        edit_token(doc, &token(who, i)).await;
        made.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Edits `doc` with writer `who`'s tokens 0, 1, ... ([`token`]) every `pace` until
/// `stop`; returns how many it made.
pub async fn edit_until(doc: &DocHandle, who: &str, pace: Duration, stop: &AtomicBool) -> usize {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        edit_token(doc, &token(who, i)).await;
        i += 1;
        tokio::time::sleep(pace).await;
    }
    i
}

/// A document, its handles (one per client) and the writer names of its handles.
pub type Doc = (String, Vec<DocHandle>, Vec<String>);

/// Opens `name` at each of `clients` (a writer's name prefix, its client): the writers
/// are named `{prefix}{name}`.
pub async fn open_at(clients: &[(&str, &Client)], name: &str) -> Doc {
    let mut handles = Vec::new();
    let mut writers = Vec::new();
    for (prefix, client) in clients {
        handles.push(client.open(name).await.unwrap());
        writers.push(format!("{prefix}{name}"));
    }
    (name.to_owned(), handles, writers)
}

/// Every handle of `docs` with its writer's name.
pub fn writers(docs: &[Doc]) -> impl Iterator<Item = (&DocHandle, &String)> {
    docs.iter().flat_map(|(_, h, w)| h.iter().zip(w))
}

/// Waits until every edit made through `handle` is acknowledged (`what`: whose edits,
/// for the failure's message).
pub async fn synced(handle: &DocHandle, what: &str) {
    tokio::time::timeout(PATIENCE, handle.synced())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: every edit acknowledged (unacked: {:?})",
                handle.unacked()
            )
        })
        .unwrap();
}

/// Waits until every edit to `handles` is acknowledged and they agree; checks that the
/// text has each writer's tokens 0 .. n - 1 ([`token`]) exactly once (`counts`, one per
/// writer of `writers`); returns the text.
pub async fn check_converged(
    name: &str,
    handles: &[DocHandle],
    writers: &[String],
    counts: &[usize],
) -> String {
    for handle in handles {
        synced(handle, name).await;
    }
    tokio::time::timeout(PATIENCE, async {
        while handles.iter().any(|h| h.version() != handles[0].version()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name}: the clients converge"));
    let text = handles[0].text();
    for handle in handles {
        assert_eq!(handle.text(), text, "{name} converged");
    }
    check_tokens(name, &text, writers, counts);
    text
}

/// Each writer's tokens exactly once in `text`, and no token beyond them.
pub fn check_tokens(name: &str, text: &str, writers: &[String], counts: &[usize]) {
    for (who, &n) in writers.iter().zip(counts) {
        for i in 0..n {
            let token = token(who, i);
            assert_eq!(text.matches(&token).count(), 1, "{token} in {name}: {text}");
        }
        let beyond = token(who, n);
        assert!(!text.contains(&beyond), "{beyond} in {name} was never made");
    }
    let all: usize = counts.iter().sum();
    assert_eq!(
        text.matches('[').count(),
        all,
        "{name}: no token twice: {text}"
    );
}

/// A new client at `addr` opens `name` (following redirects) and waits until it has
/// `version`; returns its text.
pub async fn fresh_read(addr: SocketAddr, name: &str, version: u64, seed: u64) -> String {
    let c = connected(config(addr, seed)).await;
    let fresh = c.open(name).await.unwrap();
    tokio::time::timeout(PATIENCE, async {
        while fresh.version() < version {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name}: a fresh reader at {addr} catches up to {version}"));
    let text = fresh.text();
    drop(fresh);
    c.shutdown().await;
    text
}
