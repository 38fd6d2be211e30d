//! Cluster mode end to end: a three-member etcd cluster and three `quire serve --etcd`
//! processes on loopback, clients editing documents spread over the nodes (following
//! redirects), and failures injected mid-edit:
//!
//! - the owner of the busiest documents killed with SIGKILL and its data directory
//!   deleted: the clients go back to their home nodes, which claim the documents once the
//!   dead node's lease expires and load them from etcd; a client at home on the dead
//!   node moves to the next of its addresses; the clients resend, and every edit ends
//!   up in every document exactly once;
//! - the owner stopped with SIGSTOP until a surviving node took its documents over, then
//!   continued (split brain): the old owner acknowledges nothing more, every edit lands
//!   exactly once;
//! - etcd members killed: with one of three gone editing carries on; with two gone
//!   nothing is acknowledged and an `Open` of a new document is answered 33; once both
//!   are back every edit ends acknowledged exactly once.
//!
//! A node drained with SIGTERM under load: tests/cluster_handoff.rs.
//!
//! The nodes' harness is in tests/common/quire_nodes.rs. Documents are named so that
//! the node a test places them on is their preferred owner (rendezvous hashing), so they
//! land there whether the first `Open` or the preference decides.
//!
//! The tests run one at a time (each starts an etcd cluster and three nodes).
//!
//! Needs the `cluster` feature and etcd (see tests/common/etcd_cluster.rs).

use crate::etcd_cluster;

use crate::quire_nodes;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use quire::client::{ClientConfig, DocHandle};
use quire_nodes::*;

#[test]
fn killing_the_owner_and_its_disk_loses_no_acknowledged_edit() {
    on_a_cluster(|nodes, etcd| {
        let endpoints = etcd.lock().unwrap().endpoints();
        runtime().block_on(edit_kill_and_check(nodes, endpoints))
    });
}

async fn edit_kill_and_check(nodes: &mut [Node], etcd_endpoints: Vec<String>) {
    // n2 claims the busy documents (they prefer it; a client at home there opens them
    // first).
    let busy = names_preferred_by("busy", 3, "n2", &NODE_IDS);
    claim_at(nodes[2].addr, &busy, 1).await;
    // Two clients at home on n0 and n1 edit the busy documents (on n2, by redirect) and
    // one document each on their own node; a third at home on n2, told the other nodes'
    // addresses, edits the busy documents and one more of n2's: when n2 is gone it
    // moves its home to the next address and finds their new owner from there.
    let a = connected(config(nodes[0].addr, 2)).await;
    let b = connected(config(nodes[1].addr, 3)).await;
    let c = connected(
        config(nodes[2].addr, 9)
            .fallback_addrs([nodes[0].addr.to_string(), nodes[1].addr.to_string()]),
    )
    .await;
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &busy {
        docs.push(open_at(&[("a", &a), ("b", &b), ("c", &c)], doc).await);
    }
    docs.push(open_at(&[("a", &a)], &name_preferred_by("own-a", "n0", &NODE_IDS)).await);
    docs.push(open_at(&[("b", &b)], &name_preferred_by("own-b", "n1", &NODE_IDS)).await);
    docs.push(open_at(&[("c", &c)], &name_preferred_by("own-c", "n2", &NODE_IDS)).await);

    // Each writer makes its last `AFTER_KILL` edits once n2 was killed, so that the kill
    // comes while the clients edit however fast n2 acknowledges (the clients could make
    // every edit before n2 acknowledged ten, on a loaded machine).
    const EDITS: usize = 40;
    const AFTER_KILL: usize = 10;
    let made = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let editing = futures_util::future::join_all(writers(&docs).map(|(handle, who)| {
        let (made, killed) = (&made, &killed);
        async move {
            edit_tokens(handle, who, 0, EDITS - AFTER_KILL, made).await;
            // Bounded by the kill's own patience.
            while !killed.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            edit_tokens(handle, who, EDITS - AFTER_KILL, AFTER_KILL, made).await;
        }
    }));
    let writer_count = writers(&docs).count();
    let busy_handles: Vec<&DocHandle> = docs[..busy.len()].iter().flat_map(|(_, h, _)| h).collect();
    let killing = async {
        // Once the busy documents have some acknowledged history on n2.
        tokio::time::timeout(PATIENCE, async {
            while busy_handles.iter().any(|h| h.version() < 10) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the busy documents get some history at n2");
        let n2 = &mut nodes[2];
        n2.child.kill().unwrap();
        n2.child.wait().unwrap();
        std::fs::remove_dir_all(&n2.dir).unwrap();
        let made_before_kill = made.load(Ordering::SeqCst);
        killed.store(true, Ordering::SeqCst);
        made_before_kill
    };
    let (_, made_before_kill) = tokio::join!(editing, killing);
    assert!(
        made_before_kill < writer_count * EDITS,
        "the kill came while the clients were editing ({made_before_kill} edits made)"
    );

    // Every edit acknowledged (the clients keep them until then), and the two clients
    // agree on every document.
    for (name, handles, writers) in &docs {
        check_converged(name, handles, writers, &vec![EDITS; writers.len()]).await;
    }
    // The busy documents are owned by a surviving node now.
    assert_owned_by(etcd_endpoints, &busy, &["n0", "n1"]).await;
    // A new client reads the busy documents from a surviving node: what etcd has.
    for (i, (name, handles, _)) in docs[..busy.len()].iter().enumerate() {
        let text = fresh_read(nodes[0].addr, name, handles[0].version(), 4 + i as u64).await;
        assert_eq!(text, handles[0].text(), "{name} as a new reader sees it");
    }
    drop(docs);
    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
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
    // A node left stopped by a failure is killed all the same (`on_a_cluster`).
    on_a_cluster(|nodes, etcd| {
        let endpoints = etcd.lock().unwrap().endpoints();
        runtime().block_on(edit_stop_and_check(nodes, endpoints, ping_interval))
    });
}

async fn edit_stop_and_check(nodes: &[Node], etcd_endpoints: Vec<String>, ping_interval: Duration) {
    use nix::sys::signal::Signal;
    // n2 claims the busy documents (they prefer it); clients at home on n0 and n1 edit
    // them there.
    let busy = names_preferred_by("busy", 2, "n2", &NODE_IDS);
    claim_at(nodes[2].addr, &busy, 1).await;
    let pinging = |addr, seed| {
        let mut c = config(addr, seed);
        c.ping_interval = ping_interval;
        c
    };
    let a = connected(pinging(nodes[0].addr, 2)).await;
    let b = connected(pinging(nodes[1].addr, 3)).await;
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &busy {
        docs.push(open_at(&[("a", &a), ("b", &b)], doc).await);
    }

    let stop = AtomicBool::new(false);
    let editing = futures_util::future::join_all(
        writers(&docs)
            .map(|(handle, who)| edit_until(handle, who, Duration::from_millis(20), &stop)),
    );
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
        assert_owned_by(etcd_endpoints.clone(), &busy, &["n0", "n1"]).await;
        eprintln!(
            "the busy documents moved to n0 or n1 {:?} after the SIGSTOP",
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
    on_a_cluster(|nodes, etcd| runtime().block_on(edit_through_etcd_failures(nodes, etcd.clone())));
}

async fn edit_through_etcd_failures(nodes: &[Node], etcd: Arc<Mutex<EtcdCluster>>) {
    use quire::client::connection::Connection;
    use quire::protocol::message::{ErrorCode, Message};
    // One document claimed by each of n0 and n1 (each preferred by its claimer);
    // clients at home there edit both.
    let docs_named = [
        name_preferred_by("on-n0", "n0", &NODE_IDS),
        name_preferred_by("on-n1", "n1", &NODE_IDS),
    ];
    claim_at(nodes[0].addr, &docs_named[..1], 1).await;
    claim_at(nodes[1].addr, &docs_named[1..], 2).await;
    let a = connected(config(nodes[0].addr, 3)).await;
    let b = connected(config(nodes[1].addr, 4)).await;
    let mut docs: Vec<Doc> = Vec::new();
    for doc in &docs_named {
        docs.push(open_at(&[("a", &a), ("b", &b)], doc).await);
    }
    let handles = || writers(&docs);
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
            synced(h, &format!("{what}: {who}")).await;
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
    let logs_from: Vec<usize> = nodes.iter().map(|n| n.log_len()).collect();
    edit_all(20, 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (h, who) in handles() {
        // What the nodes said meanwhile, for a failure (seen once in about 20 runs,
        // not understood yet).
        let said = || {
            nodes
                .iter()
                .zip(&logs_from)
                .map(|(n, from)| format!("{}: {:#?}", n.addr, n.log_lines(*from, "")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(
            !h.is_synced(),
            "{who}'s edit made without an etcd quorum is not acknowledged (version {}, text {}); \
             the nodes' logs since the second kill:\n{}",
            h.version(),
            h.text(),
            said()
        );
    }
    // A document no node serves yet (preferred by the node asked, which must then claim
    // it in etcd): an `Open` is refused as unavailable, not left unanswered.
    let asked = Instant::now();
    let mut raw = Connection::connect(nodes[0].addr, 0, "").await.unwrap();
    raw.send(Message::Open {
        doc: name_preferred_by("new-without-quorum", "n0", &NODE_IDS),
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
