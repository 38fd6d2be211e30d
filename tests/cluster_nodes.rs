//! Cluster mode end to end: a three-member etcd cluster and three `quire serve --etcd`
//! processes on loopback, clients editing documents spread over the nodes (following
//! redirects), and failures injected mid-edit:
//!
//! - the owner of the busiest documents killed with SIGKILL and its data directory
//!   deleted: the clients go back to their home nodes, which claim the documents once the
//!   dead node's lease expires and load them from etcd; the clients resend, and every
//!   edit ends up in every document exactly once;
//! - the owner stopped with SIGSTOP until a surviving node took its documents over, then
//!   continued (split brain): the old owner acknowledges nothing more, every edit lands
//!   exactly once;
//! - etcd members killed: with one of three gone editing carries on; with two gone
//!   nothing is acknowledged and an `Open` of a new document is answered 33; once both
//!   are back every edit ends acknowledged exactly once.
//!
//! The tests run one at a time (each starts an etcd cluster and three nodes).
//!
//! Needs the `cluster` feature and etcd (see tests/common/etcd_cluster.rs).
#![cfg(feature = "cluster")]

#[path = "common/etcd_cluster.rs"]
mod etcd_cluster;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use quire::client::{Client, ClientConfig, DocHandle};
use quire::op::Patch;

/// A bound on waits, so that a failure ends the test instead of hanging it; never an
/// assertion about speed.
const PATIENCE: Duration = Duration::from_secs(60);

/// One test at a time: each runs an etcd cluster and three nodes on a shared machine.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Node {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    /// Every line the node wrote to stderr so far.
    logs: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// The node's log lines from the `from`th on that contain `needle`.
    fn log_lines(&self, from: usize, needle: &str) -> Vec<String> {
        self.logs.lock().unwrap()[from..]
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    fn log_len(&self) -> usize {
        self.logs.lock().unwrap().len()
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts node `id` on a free port; returns once it serves.
fn start_node(etcd: &EtcdCluster, id: &str, root: &std::path::Path) -> Node {
    let addr = free_port();
    let dir = root.join(id);
    let mut child = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["serve", "--admin-listen", "off", "--lease-ttl-secs", "2"])
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
        child,
        addr,
        dir,
        logs,
    }
}

fn start_nodes(etcd: &EtcdCluster, root: &std::path::Path) -> Vec<Node> {
    ["n0", "n1", "n2"]
        .iter()
        .map(|id| start_node(etcd, id, root))
        .collect()
}

fn stop_nodes(nodes: &mut [Node]) {
    for node in nodes {
        // A stopped process is killed all the same.
        let _ = node.child.kill();
        let _ = node.child.wait();
    }
}

/// The clients' runtime (etcd and the nodes are started outside it: the etcd harness
/// blocks on a runtime of its own).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a thread of its own, outside the clients' runtime (for the etcd harness
/// and the blocking etcd adapter), without blocking the runtime.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || std::thread::spawn(f).join())
        .await
        .unwrap()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The node ids that own `docs` in etcd, as its owner keys say (blocking).
fn owners(etcd_endpoints: &[String], docs: &[String]) -> Result<Vec<Option<String>>, String> {
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

/// Polls the owners of `docs` (blocking) until every one is a surviving node (`n0` or
/// `n1`), or [`PATIENCE`] passed; returns the last answer (a read that failed is retried:
/// the last error is printed).
fn owners_moved(etcd_endpoints: Vec<String>, docs: Vec<String>) -> Vec<Option<String>> {
    let deadline = Instant::now() + PATIENCE;
    let mut last = Vec::new();
    loop {
        match owners(&etcd_endpoints, &docs) {
            Ok(now) => {
                let moved = now
                    .iter()
                    .all(|o| matches!(o.as_deref(), Some("n0" | "n1")));
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

fn config(addr: SocketAddr, seed: u64) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(300);
    c.timeout = Duration::from_secs(3);
    c.seed = Some(seed);
    c
}

/// Opens `docs` at `addr` first, so that node claims them, with one edit each ("|").
async fn claim_at(addr: SocketAddr, docs: &[String], seed: u64) {
    let c = Client::connect(config(addr, seed)).await.unwrap();
    c.wait_connected().await.unwrap();
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

/// Inserts `token` between two tokens near the middle of the text (a token stays whole,
/// so it can be counted).
async fn edit_token(doc: &DocHandle, token: &str) {
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

/// Edits `doc` `n` times with tokens `[{who}{from}]`, `[{who}{from + 1}]`, ..., counting
/// each in `made`.
async fn edit_tokens(doc: &DocHandle, who: &str, from: usize, n: usize, made: &AtomicUsize) {
    for i in from..from + n {
        edit_token(doc, &format!("[{who}{i}]")).await;
        made.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Edits `doc` with tokens `[{who}0]`, `[{who}1]`, ... every `pace` until `stop`;
/// returns how many it made.
async fn edit_until(doc: &DocHandle, who: &str, pace: Duration, stop: &AtomicBool) -> usize {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        edit_token(doc, &format!("[{who}{i}]")).await;
        i += 1;
        tokio::time::sleep(pace).await;
    }
    i
}

/// A document, its handles (one per client) and the writer names of its handles.
type Doc = (String, Vec<DocHandle>, Vec<String>);

/// Waits until every edit to `handles` is acknowledged and they agree; checks that the
/// text has each writer's tokens `[{who}0]` ..  `[{who}{n - 1}]` exactly once (`counts`,
/// one per writer of `writers`); returns the text.
async fn check_converged(
    name: &str,
    handles: &[DocHandle],
    writers: &[String],
    counts: &[usize],
) -> String {
    for handle in handles {
        tokio::time::timeout(PATIENCE, handle.synced())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: every edit acknowledged (unacked: {:?})",
                    handle.unacked()
                )
            })
            .unwrap();
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
fn check_tokens(name: &str, text: &str, writers: &[String], counts: &[usize]) {
    for (who, &n) in writers.iter().zip(counts) {
        for i in 0..n {
            let token = format!("[{who}{i}]");
            assert_eq!(text.matches(&token).count(), 1, "{token} in {name}: {text}");
        }
        let beyond = format!("[{who}{n}]");
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
async fn fresh_read(addr: SocketAddr, name: &str, version: u64, seed: u64) -> String {
    let c = Client::connect(config(addr, seed)).await.unwrap();
    c.wait_connected().await.unwrap();
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

#[test]
fn killing_the_owner_and_its_disk_loses_no_acknowledged_edit() {
    let _serial = one_at_a_time();
    let etcd = EtcdCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&etcd, root.path());
    runtime().block_on(edit_kill_and_check(&mut nodes, etcd.endpoints()));
    stop_nodes(&mut nodes);
    drop(etcd);
}

async fn edit_kill_and_check(nodes: &mut [Node], etcd_endpoints: Vec<String>) {
    // n2 claims the busy documents: a client at home there opens them first.
    let busy: Vec<String> = (0..3).map(|i| format!("busy-{i}")).collect();
    claim_at(nodes[2].addr, &busy, 1).await;
    // Two clients at home on n0 and n1 edit the busy documents (on n2, by redirect) and
    // one document each on their own node.
    let a = Client::connect(config(nodes[0].addr, 2)).await.unwrap();
    let b = Client::connect(config(nodes[1].addr, 3)).await.unwrap();
    a.wait_connected().await.unwrap();
    b.wait_connected().await.unwrap();
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &busy {
        let (ha, hb) = (a.open(doc).await.unwrap(), b.open(doc).await.unwrap());
        docs.push((
            doc.clone(),
            vec![ha, hb],
            vec![format!("a{doc}"), format!("b{doc}")],
        ));
    }
    docs.push((
        "own-a".into(),
        vec![a.open("own-a").await.unwrap()],
        vec!["a".into()],
    ));
    docs.push((
        "own-b".into(),
        vec![b.open("own-b").await.unwrap()],
        vec!["b".into()],
    ));

    const EDITS: usize = 40;
    let made = AtomicUsize::new(0);
    let editing = async {
        let mut all = Vec::new();
        for (_, handles, writers) in &docs {
            for (handle, who) in handles.iter().zip(writers) {
                all.push(edit_tokens(handle, who, 0, EDITS, &made));
            }
        }
        futures_util::future::join_all(all).await;
    };
    let writers: usize = docs.iter().map(|(_, h, _)| h.len()).sum();
    let busy_handles: Vec<&DocHandle> = docs[..busy.len()].iter().flat_map(|(_, h, _)| h).collect();
    let killing = async {
        // Once the busy documents have some acknowledged history on n2.
        while busy_handles.iter().any(|h| h.version() < 10) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let n2 = &mut nodes[2];
        n2.child.kill().unwrap();
        n2.child.wait().unwrap();
        std::fs::remove_dir_all(&n2.dir).unwrap();
        made.load(Ordering::SeqCst)
    };
    let ((), made_before_kill) = tokio::join!(editing, killing);
    assert!(
        made_before_kill < writers * EDITS,
        "the kill came while the clients were editing ({made_before_kill} edits made)"
    );

    // Every edit acknowledged (the clients keep them until then), and the two clients
    // agree on every document.
    for (name, handles, writers) in &docs {
        check_converged(name, handles, writers, &vec![EDITS; writers.len()]).await;
    }
    // The busy documents are owned by a surviving node now. (The etcd adapter blocks:
    // asked from a thread of its own.)
    let docs_owned = busy.clone();
    let owners = off_runtime(move || owners_moved(etcd_endpoints, docs_owned)).await;
    for (doc, owner) in busy.iter().zip(owners) {
        assert!(
            matches!(owner.as_deref(), Some("n0" | "n1")),
            "{doc} failed over: its owner is {owner:?}"
        );
    }
    // A new client reads the busy documents from a surviving node: what etcd has.
    for (i, (name, handles, _)) in docs[..busy.len()].iter().enumerate() {
        let text = fresh_read(nodes[0].addr, name, handles[0].version(), 4 + i as u64).await;
        assert_eq!(text, handles[0].text(), "{name} as a new reader sees it");
    }
    drop(docs);
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn an_owner_stopped_until_replaced_acknowledges_nothing_more() {
    // The clients' home connections have no document of their own (every document is on
    // the stopped node), so they hear nothing at home between pings: with the default
    // ping interval (15 s) above the test's timeout (3 s), a client gives up every
    // connection at its first ping and goes home, where the documents are claimed. (With
    // pings that keep the home connection alive, see
    // `a_stopped_owner_is_given_up_though_the_home_node_answers`.)
    stop_owner_until_replaced(ClientConfig::new("").ping_interval);
}

/// As above, with the clients pinging below their timeout, so that their home connection
/// stays alive: they must still give up the stopped owner (an away connection that
/// answers nothing) and go home.
///
/// FAILS at this commit: the client's liveness check (src/client/handle.rs, the
/// connection loop's `last_heard`) only counts what the home connection hears, so a
/// stopped node that a document was redirected to is never given up while the home node
/// answers pings; nobody claims the documents, and the owner keys stay empty.
#[test]
fn a_stopped_owner_is_given_up_though_the_home_node_answers() {
    stop_owner_until_replaced(Duration::from_millis(500));
}

fn stop_owner_until_replaced(ping_interval: Duration) {
    let _serial = one_at_a_time();
    let etcd = EtcdCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&etcd, root.path());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime().block_on(edit_stop_and_check(&nodes, etcd.endpoints(), ping_interval))
    }));
    // A node left stopped would keep its port and never exit.
    nodes[2].signal(nix::sys::signal::Signal::SIGCONT);
    stop_nodes(&mut nodes);
    drop(etcd);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn edit_stop_and_check(nodes: &[Node], etcd_endpoints: Vec<String>, ping_interval: Duration) {
    use nix::sys::signal::Signal;
    // n2 claims the busy documents; clients at home on n0 and n1 edit them there.
    let busy: Vec<String> = (0..2).map(|i| format!("busy-{i}")).collect();
    claim_at(nodes[2].addr, &busy, 1).await;
    let pinging = |addr, seed| {
        let mut c = config(addr, seed);
        c.ping_interval = ping_interval;
        c
    };
    let a = Client::connect(pinging(nodes[0].addr, 2)).await.unwrap();
    let b = Client::connect(pinging(nodes[1].addr, 3)).await.unwrap();
    a.wait_connected().await.unwrap();
    b.wait_connected().await.unwrap();
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &busy {
        let (ha, hb) = (a.open(doc).await.unwrap(), b.open(doc).await.unwrap());
        docs.push((
            doc.clone(),
            vec![ha, hb],
            vec![format!("a{doc}"), format!("b{doc}")],
        ));
    }

    let stop = AtomicBool::new(false);
    let editing = async {
        let mut all = Vec::new();
        for (_, handles, writers) in &docs {
            for (handle, who) in handles.iter().zip(writers) {
                all.push(edit_until(handle, who, Duration::from_millis(20), &stop));
            }
        }
        futures_util::future::join_all(all).await
    };
    let busy_handles: Vec<&DocHandle> = docs.iter().flat_map(|(_, h, _)| h).collect();
    let n2 = &nodes[2];
    let stopping = async {
        // Once the busy documents have some acknowledged history on n2.
        tokio::time::timeout(PATIENCE, async {
            while busy_handles.iter().any(|h| h.version() < 10) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the busy documents get some history at n2");
        n2.signal(Signal::SIGSTOP);
        let stopped_at = Instant::now();
        // Until a surviving node owns every busy document (the clients keep editing).
        let (endpoints, docs_owned) = (etcd_endpoints.clone(), busy.clone());
        let owners_now = off_runtime(move || owners_moved(endpoints, docs_owned)).await;
        assert!(
            owners_now
                .iter()
                .all(|o| matches!(o.as_deref(), Some("n0" | "n1"))),
            "a surviving node took the busy documents over while n2 was stopped: {owners_now:?}"
        );
        eprintln!(
            "the busy documents moved {:?} after the SIGSTOP: {owners_now:?}",
            stopped_at.elapsed()
        );
        // The clients edit at the new owners for a while, then n2 wakes up believing it
        // owns them, and they edit a while more.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let logs_from = n2.log_len();
        n2.signal(Signal::SIGCONT);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::SeqCst);
        logs_from
    };
    let (made, logs_from) = tokio::join!(editing, stopping);

    let mut made = made.into_iter();
    for (name, handles, writers) in &docs {
        let counts: Vec<usize> = writers.iter().map(|_| made.next().unwrap()).collect();
        eprintln!("{name}: {counts:?} tokens made by {writers:?}");
        let text = check_converged(name, handles, writers, &counts).await;
        // What etcd has, as a new reader at a surviving node and one at the old owner
        // (redirected) see it.
        let version = handles[0].version();
        assert_eq!(fresh_read(nodes[0].addr, name, version, 4).await, text);
        assert_eq!(fresh_read(nodes[2].addr, name, version, 5).await, text);
    }
    // The old owner found out by itself that it lost the busy documents.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let moved = n2.log_lines(logs_from, "document moved");
        if busy
            .iter()
            .all(|doc| moved.iter().any(|l| l.contains(doc.as_str())))
        {
            eprintln!("n2 after the SIGCONT: {moved:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2 logs that the busy documents moved after its SIGCONT; its logs since: {:#?}",
            n2.log_lines(logs_from, "")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(docs);
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn etcd_losing_its_quorum_stops_acknowledgements_and_loses_no_edit() {
    let _serial = one_at_a_time();
    let etcd = EtcdCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = start_nodes(&etcd, root.path());
    let etcd = Arc::new(Mutex::new(etcd));
    runtime().block_on(edit_through_etcd_failures(&nodes, etcd.clone()));
    stop_nodes(&mut nodes);
    drop(etcd);
}

async fn edit_through_etcd_failures(nodes: &[Node], etcd: Arc<Mutex<EtcdCluster>>) {
    use quire::client::connection::Connection;
    use quire::protocol::message::{ErrorCode, Message};
    // One document claimed by each of n0 and n1; clients at home there edit both.
    let docs_named = ["on-n0".to_string(), "on-n1".to_string()];
    claim_at(nodes[0].addr, &docs_named[..1], 1).await;
    claim_at(nodes[1].addr, &docs_named[1..], 2).await;
    let a = Client::connect(config(nodes[0].addr, 3)).await.unwrap();
    let b = Client::connect(config(nodes[1].addr, 4)).await.unwrap();
    a.wait_connected().await.unwrap();
    b.wait_connected().await.unwrap();
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &docs_named {
        let (ha, hb) = (a.open(doc).await.unwrap(), b.open(doc).await.unwrap());
        docs.push((
            doc.clone(),
            vec![ha, hb],
            vec![format!("a{doc}"), format!("b{doc}")],
        ));
    }
    let handles = || docs.iter().flat_map(|(_, h, w)| h.iter().zip(w));
    let made = AtomicUsize::new(0);
    // `n` tokens from each writer, from token `from` on.
    let edit_all = |from: usize, n: usize| {
        let all: Vec<_> = handles()
            .map(|(h, who)| edit_tokens(h, who, from, n, &made))
            .collect();
        futures_util::future::join_all(all)
    };
    let all_synced = |what: &'static str| async move {
        for (h, who) in handles() {
            tokio::time::timeout(PATIENCE, h.synced())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{what}: {who}'s edits acknowledged (unacked {:?})",
                        h.unacked()
                    )
                })
                .unwrap();
        }
    };

    edit_all(0, 10).await;
    all_synced("with every etcd member").await;

    // One member down (the leader, so that there is an election too): editing goes on.
    let first = {
        let etcd = etcd.clone();
        off_runtime(move || {
            let mut etcd = etcd.lock().unwrap();
            let leader = etcd.leader();
            etcd.kill(leader);
            leader
        })
        .await
    };
    eprintln!("killed etcd member {first} (the leader)");
    edit_all(10, 10).await;
    all_synced("with one etcd member down").await;

    // Two down: no quorum, nothing can commit, so nothing is acknowledged.
    let second = (first + 1) % 3;
    {
        let etcd = etcd.clone();
        off_runtime(move || etcd.lock().unwrap().kill(second)).await;
    }
    eprintln!("killed etcd member {second}: no quorum");
    edit_all(20, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (h, who) in handles() {
        assert!(
            !h.is_synced(),
            "{who}'s edit made without an etcd quorum is not acknowledged (version {}, text {})",
            h.version(),
            h.text()
        );
    }
    // A document no node serves yet: an `Open` is refused as unavailable, not left
    // unanswered.
    let asked = Instant::now();
    let mut raw = Connection::connect(nodes[0].addr, 0, "").await.unwrap();
    raw.send(Message::Open {
        doc: "new-without-quorum".into(),
        known_version: 0,
    })
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match raw.recv().await.unwrap().message {
                Message::Remote { .. } | Message::PresenceState { .. } => continue,
                other => return other,
            }
        }
    })
    .await;
    match answer {
        Ok(Message::Error {
            code: ErrorCode::Unavailable,
            message,
        }) => {
            eprintln!(
                "Open without quorum: 33 ({message}) after {:?}",
                asked.elapsed()
            )
        }
        other => panic!("Open without an etcd quorum: expected Error 33, got {other:?}"),
    }
    drop(raw);

    // Both members back: every edit made throughout ends acknowledged exactly once.
    {
        let etcd = etcd.clone();
        off_runtime(move || {
            let mut etcd = etcd.lock().unwrap();
            etcd.restart(first);
            etcd.restart(second);
            etcd.wait_healthy();
        })
        .await;
    }
    eprintln!("etcd members {first} and {second} restarted");
    edit_all(21, 10).await;
    // If edits stay unacknowledged, what the nodes answer and etcd says, for the report.
    let synced = tokio::time::timeout(PATIENCE, async {
        for (h, _) in handles() {
            h.synced().await.unwrap();
        }
    })
    .await;
    if synced.is_err() {
        let mut seen = Vec::new();
        for node in &nodes[..2] {
            for doc in &docs_named {
                let mut raw = Connection::connect(node.addr, 0, "").await.unwrap();
                raw.send(Message::Open {
                    doc: doc.clone(),
                    known_version: 0,
                })
                .await
                .unwrap();
                let answer = tokio::time::timeout(Duration::from_secs(10), raw.recv()).await;
                seen.push(format!("Open {doc} at {}: {answer:?}", node.addr));
            }
        }
        let (endpoints, names) = (etcd.lock().unwrap().endpoints(), docs_named.to_vec());
        let owned = off_runtime(move || owners(&endpoints, &names)).await;
        let unacked: Vec<String> = handles()
            .map(|(h, who)| format!("{who}: {:?} synced {}", h.unacked(), h.is_synced()))
            .collect();
        panic!(
            "edits unacknowledged after etcd came back: {unacked:?}; owners {owned:?}; \
             nodes at {:?}; {seen:#?}",
            nodes.iter().map(|n| n.addr).collect::<Vec<_>>()
        );
    }
    for (name, handles, writers) in &docs {
        check_converged(name, handles, writers, &vec![31; writers.len()]).await;
    }
    for (i, (name, handles, _)) in docs.iter().enumerate() {
        let text = fresh_read(nodes[2].addr, name, handles[0].version(), 5 + i as u64).await;
        assert_eq!(text, handles[0].text(), "{name} as a new reader sees it");
    }
    drop(docs);
    a.shutdown().await;
    b.shutdown().await;
}
