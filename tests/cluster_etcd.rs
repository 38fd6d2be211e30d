//! Cluster mode's store on a real 3-member etcd cluster (`cluster::etcd::EtcdStore`):
//! the semantics `MemStore` stands in for in the model tests, ownership and the fenced
//! journal through `cluster::ownership::Member`, and what a commit does while etcd
//! members are killed and come back.
//!
//! Needs the `cluster` feature and an etcd binary (`apt-get install protobuf-compiler
//! etcd-server`; see tests/common/etcd_cluster.rs): `cargo test --features cluster --test
//! cluster_etcd`. Each test starts its own cluster, so they run in parallel.

use crate::etcd_cluster;

use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use quire::cluster::conformance;
use quire::cluster::entry::JournalEntry;
use quire::cluster::etcd::{EtcdConfig, EtcdStore};
use quire::cluster::ownership::{
    Claim, ClusterError, CommitError, Epoch, JournalWrite, Keys, Member,
};
use quire::cluster::store::{Store, StoreError};
use quire::op::OpId;

/// A bound on waits for something etcd does in its own time (a lease's expiry), so that
/// a failure ends the test instead of hanging it; never an assertion about speed.
const PATIENCE: Duration = Duration::from_secs(30);

fn store(cluster: &EtcdCluster) -> EtcdStore {
    EtcdStore::connect(EtcdConfig::new(cluster.endpoints())).unwrap()
}

fn member(store: EtcdStore, node: &str, ttl: Duration) -> Member<EtcdStore> {
    Member::register(store, Keys::new("/q"), node, &format!("{node}:1"), ttl).unwrap()
}

fn entry(seq: u64) -> JournalEntry {
    JournalEntry {
        seq,
        op_id: OpId {
            client_id: 7,
            local_seq: seq,
        },
        fingerprint: seq * 31,
        body: format!("op {seq}").into_bytes(),
    }
}

fn write<'a>(doc: &'a str, epoch: Epoch, entry: &'a JournalEntry) -> JournalWrite<'a> {
    JournalWrite { doc, epoch, entry }
}

fn owned(claim: Claim) -> Epoch {
    match claim {
        Claim::Owned(epoch) => epoch,
        other => panic!("not owned: {other:?}"),
    }
}

#[test]
fn a_request_no_member_can_take_is_retried_until_the_timeout_then_unavailable() {
    // A port nothing listens on: every attempt fails to connect, so is never sent, and is
    // made again until the request timeout. (No etcd is needed.)
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = EtcdConfig::new([format!("http://127.0.0.1:{port}")]);
    config.request_timeout = Duration::from_millis(300);
    let store = EtcdStore::connect(config).unwrap();
    match store.txn(&[], &[], &[]) {
        Err(StoreError::Unavailable(m)) => {
            assert!(m.contains("no answer within"), "{m}");
            assert!(m.contains("connect"), "the last attempt's error: {m}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn etcd_has_the_semantics_mem_store_stands_in_for() {
    let cluster = EtcdCluster::start();
    conformance::all(&store(&cluster), "/conformance");
}

#[test]
fn a_document_is_claimed_committed_loaded_snapshotted_truncated_and_released() {
    let cluster = EtcdCluster::start();
    let ttl = Duration::from_secs(30);
    let a = member(store(&cluster), "a", ttl);
    let b = member(store(&cluster), "b", ttl);
    let nodes: Vec<String> = a
        .live_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert_eq!(nodes, ["a", "b"]);
    assert_eq!(
        Member::register(store(&cluster), Keys::new("/q"), "a", "x:1", ttl).err(),
        Some(ClusterError::NodeIdTaken { addr: "a:1".into() })
    );

    let epoch = owned(a.claim("d").unwrap());
    let owner = store(&cluster)
        .get(&Keys::new("/q").owner("d"))
        .unwrap()
        .unwrap();
    assert_eq!(epoch, Epoch(owner.create_revision));
    assert_eq!(owner.lease, Some(a.lease()));
    assert_eq!(a.claim("d").unwrap(), Claim::Owned(epoch), "a retry");
    assert_eq!(
        b.claim("d").unwrap(),
        Claim::OwnedBy {
            node: "a".into(),
            addr: Some("a:1".into())
        }
    );

    let entries: Vec<JournalEntry> = (1..=5).map(entry).collect();
    let batch: Vec<JournalWrite<'_>> = entries.iter().map(|e| write("d", epoch, e)).collect();
    a.commit(&batch[..2]).unwrap();
    a.commit(&batch[2..]).unwrap();
    // A retry of a batch written before (an unknown outcome's) changes nothing.
    a.commit(&batch[2..]).unwrap();
    let loaded = a.load("d").unwrap();
    assert_eq!(loaded.ops, entries);
    assert_eq!(loaded.version(), 5);
    assert_eq!(loaded.applied[&entries[3].op_id], (4, 4 * 31));

    a.write_snapshot("d", epoch, 3, b"text at 3").unwrap();
    assert_eq!(a.truncate("d", epoch, 3).unwrap(), 3);
    let loaded = a.load("d").unwrap();
    assert_eq!(loaded.snapshot, Some((3, b"text at 3".to_vec())));
    assert_eq!(loaded.ops, entries[3..]);
    let journal = store(&cluster)
        .get_prefix(&Keys::new("/q").journal("d"), None, 10)
        .unwrap();
    assert_eq!(journal.kvs.len(), 2, "the truncated keys are gone");

    // A handoff: a releases, b claims in a newer epoch, a's writes are fenced.
    assert!(a.release("d", epoch).unwrap());
    assert!(!a.release("d", epoch).unwrap());
    let newer = owned(b.claim("d").unwrap());
    assert!(newer > epoch);
    let six = entry(6);
    assert_eq!(
        a.commit(&[write("d", epoch, &six)]),
        Err(CommitError::Lost(vec!["d".into()]))
    );
    assert_eq!(b.load("d").unwrap(), loaded);
    b.commit(&[write("d", newer, &six)]).unwrap();
    assert_eq!(b.load("d").unwrap().version(), 6);

    // Leaving frees b's documents and membership at once.
    b.leave().unwrap();
    let nodes: Vec<String> = a
        .live_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert_eq!(nodes, ["a"]);
    assert!(matches!(a.claim("d").unwrap(), Claim::Owned(e) if e > newer));
}

#[test]
fn an_expired_lease_lets_another_node_claim_and_fences_the_old_owners_commit() {
    let cluster = EtcdCluster::start();
    // The shortest lease etcd grants with these election timings (it rounds up to its
    // minimum): a's, which is never kept alive below.
    let a = member(store(&cluster), "a", Duration::from_secs(1));
    let b = member(store(&cluster), "b", Duration::from_secs(30));
    let epoch = owned(a.claim("d").unwrap());
    let one = entry(1);
    a.commit(&[write("d", epoch, &one)]).unwrap();

    let deadline = Instant::now() + PATIENCE;
    let newer = loop {
        match b.claim("d").unwrap() {
            Claim::Owned(newer) => break newer,
            Claim::OwnedBy { node, .. } => assert_eq!(node, "a"),
        }
        assert!(
            Instant::now() < deadline,
            "a's lease did not expire within {PATIENCE:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(newer > epoch);
    assert_eq!(a.keep_alive(), Err(ClusterError::LeaseExpired));
    let nodes: Vec<String> = b
        .live_nodes()
        .unwrap()
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert_eq!(nodes, ["b"], "a's membership went with its lease");

    // a, unaware (paused, say), commits in its old epoch: the compare fails, nothing lands.
    let two = entry(2);
    assert_eq!(
        a.commit(&[write("d", epoch, &two)]),
        Err(CommitError::Lost(vec!["d".into()]))
    );
    assert!(matches!(
        a.claim("d"),
        Err(ClusterError::LeaseExpired) | Ok(Claim::OwnedBy { .. })
    ));
    let loaded = b.load("d").unwrap();
    assert_eq!(loaded.ops, std::slice::from_ref(&one));
    b.commit(&[write("d", newer, &two)]).unwrap();
    assert_eq!(b.load("d").unwrap().ops, [one, two]);
}

/// What one commit attempt returned.
#[derive(Debug)]
enum Outcome {
    Ok,
    /// `Unavailable`: applied or not, nobody knows (etcd's "uncertain" outcome).
    // Read through `Debug`, in the assertions' messages.
    Unknown(#[allow(dead_code)] String),
}

/// How many times a commit whose outcome is unknown is sent again before the test gives
/// up on it (the cluster's committer retries the same batch the same way).
const RETRIES: usize = 5;

#[test]
fn commits_survive_one_etcd_member_down_and_fail_without_a_quorum() {
    let mut cluster = EtcdCluster::start();
    let store = store(&cluster);
    // Long enough to outlive the outage (a lease cannot expire without a leader anyway).
    let a = member(store, "a", Duration::from_secs(60));
    let epoch = owned(a.claim("d").unwrap());
    let other = owned(a.claim("other").unwrap());
    let entries: Vec<JournalEntry> = (1..=12).map(entry).collect();
    let mut attempts: Vec<(u64, Outcome)> = Vec::new();
    let mut next = 0;
    // One attempt at the next entry; true if it returned Ok.
    let commit = |attempts: &mut Vec<(u64, Outcome)>, next: &mut usize| {
        let e = &entries[*next];
        let outcome = match a.commit(&[write("d", epoch, e)]) {
            Ok(_) => {
                *next += 1;
                Outcome::Ok
            }
            Err(CommitError::Cluster(ClusterError::Store(StoreError::Unavailable(m)))) => {
                // The same entry is sent again next time: a commit whose outcome is
                // unknown is retried, never skipped (its seq may be taken).
                Outcome::Unknown(m)
            }
            Err(other) => panic!("commit of seq {}: {other:?}", e.seq),
        };
        attempts.push((e.seq, outcome));
        matches!(attempts.last(), Some((_, Outcome::Ok)))
    };
    // The next entry committed, retrying unknown outcomes.
    let commit_retrying = |attempts: &mut Vec<(u64, Outcome)>, next: &mut usize| {
        let ok = (0..RETRIES).any(|_| commit(attempts, next));
        assert!(ok, "{RETRIES} attempts: {attempts:?}");
    };

    for _ in 0..3 {
        assert!(commit(&mut attempts, &mut next), "{attempts:?}");
    }

    // One member down (a follower, so that no election is needed): a quorum remains, and
    // the client carries on through the other two endpoints. A request already on its
    // way to the killed member (or on its connection before the client saw it close)
    // has an unknown outcome and is retried; a request that cannot connect to it was
    // never sent, and the adapter sends it to another member itself.
    let leader = cluster.leader();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster.kill(followers[0]);
    for _ in 0..3 {
        commit_retrying(&mut attempts, &mut next);
    }

    // Two down: no quorum. A commit fails (bounded by the request timeout: no hang).
    cluster.kill(followers[1]);
    for _ in 0..2 {
        assert!(!commit(&mut attempts, &mut next), "{attempts:?}");
    }
    let loads = a.load("d");
    assert!(
        matches!(loads, Err(ClusterError::Store(StoreError::Unavailable(_)))),
        "a linearizable read needs a quorum too: {loads:?}"
    );
    // A commit to another document, never retried: its outcome stays unknown.
    let lone = entry(1);
    let lone_outcome = a.commit(&[write("other", other, &lone)]);
    assert!(
        matches!(
            lone_outcome,
            Err(CommitError::Cluster(ClusterError::Store(
                StoreError::Unavailable(_)
            )))
        ),
        "{lone_outcome:?}"
    );

    // Both back: commits resume (the first retries the entry whose outcome is unknown).
    cluster.restart(followers[0]);
    cluster.restart(followers[1]);
    cluster.wait_healthy();
    for _ in 0..3 {
        commit_retrying(&mut attempts, &mut next);
    }

    // Every commit that returned Ok is in the journal once, in order (load refuses a
    // repeated op or a gap); the only errors were unknown outcomes, each retried until
    // Ok, so the journal is exactly the acknowledged entries.
    let acked: Vec<u64> = attempts
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Ok))
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(acked, (1..=9).collect::<Vec<u64>>());
    let loaded = a.load("d").unwrap();
    assert_eq!(loaded.ops, entries[..9]);
    assert_eq!(loaded.applied.len(), 9);
    // The commit left unknown landed whole or not at all.
    let other_ops = a.load("other").unwrap().ops;
    assert!(other_ops.is_empty() || other_ops == [lone], "{other_ops:?}");
}

#[test]
fn a_killed_leader_is_replaced_and_the_lease_and_commits_carry_on() {
    let mut cluster = EtcdCluster::start();
    let a = member(store(&cluster), "a", Duration::from_secs(60));
    let epoch = owned(a.claim("d").unwrap());
    let entries: Vec<JournalEntry> = (1..=4).map(entry).collect();
    a.commit(&[write("d", epoch, &entries[0])]).unwrap();

    let leader = cluster.leader();
    cluster.kill(leader);
    // Until the others elect a leader, requests fail (unknown outcomes: retried with the
    // same entry, as the committer does); then they succeed.
    let deadline = Instant::now() + PATIENCE;
    let mut errors = Vec::new();
    for e in &entries[1..] {
        loop {
            match a.commit(&[write("d", epoch, e)]) {
                Ok(_) => break,
                Err(CommitError::Cluster(ClusterError::Store(StoreError::Unavailable(m)))) => {
                    errors.push(m)
                }
                Err(other) => panic!("commit of seq {}: {other:?}", e.seq),
            }
            assert!(
                Instant::now() < deadline,
                "no new leader within {PATIENCE:?}: {errors:#?}"
            );
        }
    }
    // The lease survived the election (a new leader renews every lease), and so did the
    // claim: the epoch still fences for a.
    a.keep_alive().unwrap();
    assert_eq!(a.claim("d").unwrap(), Claim::Owned(epoch));
    assert_ne!(cluster.leader(), leader);

    cluster.restart(leader);
    cluster.wait_healthy();
    let loaded = a.load("d").unwrap();
    assert_eq!(loaded.ops, entries);
}
