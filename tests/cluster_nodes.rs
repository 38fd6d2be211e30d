//! Cluster mode end to end: a three-member etcd cluster and three `quire serve --etcd`
//! processes on loopback, clients editing documents spread over the nodes (following
//! redirects), and the owner of the busiest documents killed with SIGKILL and its data
//! directory deleted mid-edit: the clients go back to their home nodes, which claim the
//! documents once the dead node's lease expires and load them from etcd; the clients
//! resend, and every edit ends up in every document exactly once.
//!
//! Needs the `cluster` feature and etcd (see tests/common/etcd_cluster.rs).
#![cfg(feature = "cluster")]

#[path = "common/etcd_cluster.rs"]
mod etcd_cluster;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_cluster::EtcdCluster;
use quire::client::{Client, ClientConfig, DocHandle};
use quire::op::Patch;

/// A bound on waits, so that a failure ends the test instead of hanging it; never an
/// assertion about speed.
const PATIENCE: Duration = Duration::from_secs(60);

struct Node {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
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
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quire binary starts");
    let logs = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let name = id.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(logs).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            if line.contains("serving") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("node {id} serves"));
    Node { child, addr, dir }
}

fn config(addr: SocketAddr, seed: u64) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(300);
    c.timeout = Duration::from_secs(3);
    c.seed = Some(seed);
    c
}

/// Edits `doc` `n` times, each inserting a token of its own between two tokens near the
/// middle of the text (a token stays whole, so it can be counted).
async fn edit_tokens(doc: &DocHandle, who: &str, n: usize) {
    for i in 0..n {
        let token = format!("[{who}{i}]");
        doc.edit_with(|v| {
            let text: Vec<char> = v.text().chars().collect();
            let at = (text.len() / 2..text.len())
                .find(|&i| text[i] == '[')
                .unwrap_or(text.len());
            vec![Patch::new(at as u32, 0, &token)]
        })
        .await
        .unwrap();
        EDITS_MADE.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Edits made so far by every writer (for when the kill comes).
static EDITS_MADE: AtomicUsize = AtomicUsize::new(0);

#[test]
fn killing_the_owner_and_its_disk_loses_no_acknowledged_edit() {
    // etcd and the nodes are started outside the clients' runtime (the harness blocks on
    // a runtime of its own).
    let etcd = EtcdCluster::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = ["n0", "n1", "n2"]
        .iter()
        .map(|id| start_node(&etcd, id, root.path()))
        .collect();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(edit_kill_and_check(&mut nodes, etcd.endpoints()));
    for node in &mut nodes {
        let _ = node.child.kill();
        let _ = node.child.wait();
    }
    drop(etcd);
}

async fn edit_kill_and_check(nodes: &mut [Node], etcd_endpoints: Vec<String>) {
    // n2 claims the busy documents: a client at home there opens them first.
    let busy: Vec<String> = (0..3).map(|i| format!("busy-{i}")).collect();
    {
        let c = Client::connect(config(nodes[2].addr, 1)).await.unwrap();
        c.wait_connected().await.unwrap();
        for doc in &busy {
            let handle = c.open(doc).await.unwrap();
            handle.edit(&[Patch::new(0, 0, "|")]).await.unwrap();
            handle.synced().await.unwrap();
        }
        c.shutdown().await;
    }
    // Two clients at home on n0 and n1 edit the busy documents (on n2, by redirect) and
    // one document each on their own node.
    let a = Client::connect(config(nodes[0].addr, 2)).await.unwrap();
    let b = Client::connect(config(nodes[1].addr, 3)).await.unwrap();
    a.wait_connected().await.unwrap();
    b.wait_connected().await.unwrap();
    let mut docs: Vec<(String, Vec<DocHandle>, Vec<String>)> = Vec::new();
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
    let editing = async {
        let mut all = Vec::new();
        for (_, handles, writers) in &docs {
            for (handle, who) in handles.iter().zip(writers) {
                all.push(edit_tokens(handle, who, EDITS));
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
        EDITS_MADE.load(Ordering::SeqCst)
    };
    let ((), made_before_kill) = tokio::join!(editing, killing);
    assert!(
        made_before_kill < writers * EDITS,
        "the kill came while the clients were editing ({made_before_kill} edits made)"
    );

    // Every edit acknowledged (the clients keep them until then), and the two clients
    // agree on every document.
    for (name, handles, writers) in &docs {
        for handle in handles {
            tokio::time::timeout(PATIENCE, handle.synced())
                .await
                .unwrap_or_else(|_| panic!("{name}: every edit acknowledged"))
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
        for who in writers {
            for i in 0..EDITS {
                let token = format!("[{who}{i}]");
                assert_eq!(text.matches(&token).count(), 1, "{token} in {name}: {text}");
            }
        }
    }
    // The busy documents are owned by a surviving node now. (The etcd adapter blocks:
    // asked from a thread of its own.)
    let docs_owned = busy.clone();
    let owners = std::thread::spawn(move || {
        use quire::cluster::etcd::{EtcdConfig, EtcdStore};
        use quire::cluster::store::Store;
        let store = EtcdStore::connect(EtcdConfig::new(etcd_endpoints)).unwrap();
        docs_owned
            .iter()
            .map(|doc| {
                let key = quire::cluster::ownership::Keys::new("/quire").owner(doc);
                let kv = store.get(&key).unwrap();
                kv.map(|kv| String::from_utf8(kv.value).unwrap())
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    for (doc, owner) in busy.iter().zip(owners) {
        assert!(
            matches!(owner.as_deref(), Some("n0" | "n1")),
            "{doc} failed over: its owner is {owner:?}"
        );
    }
    // A new client reads the busy documents from a surviving node: what etcd has.
    let c = Client::connect(config(nodes[0].addr, 4)).await.unwrap();
    c.wait_connected().await.unwrap();
    for (name, handles, _) in &docs[..busy.len()] {
        let fresh = c.open(name).await.unwrap();
        tokio::time::timeout(PATIENCE, async {
            while fresh.version() < handles[0].version() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: a fresh reader catches up"));
        assert_eq!(
            fresh.text(),
            handles[0].text(),
            "{name} as a new reader sees it"
        );
    }
    c.shutdown().await;
    drop(docs);
    a.shutdown().await;
    b.shutdown().await;
}
