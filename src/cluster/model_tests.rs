//! The model test of issue 13: nodes, documents and clients over [`MemStore`], driven
//! through schedules of claims, submits, group commits, pauses, lease expiries, crashes,
//! failovers and handoffs, with the invariants checked after every step:
//!
//! - every acknowledged op is in its document's journal exactly once, at the seq it was
//!   acknowledged with (and a resend is always acknowledged with that same seq);
//! - no op id appears twice in a journal, and a journal's seqs run from 1 without gaps;
//! - a node acknowledges nothing while its lease is gone from the store.
//!
//! After each schedule a healing phase (every node back, every document claimed by its
//! preferred owner, every client resending) checks that every op a client made is
//! acknowledged in the end: nothing was lost without the client being able to resend.
//!
//! Nodes behave as the design says a node must (see [`super`]): an op is acknowledged
//! only after its commit txn succeeded; a node checks its own clock before answering
//! from memory. `Commit { check_clock: false, .. }` skips that check, as a
//! process stopped between its check and its txn would: the fence must hold alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use quickcheck::{Arbitrary, Gen, QuickCheck};

use super::entry::JournalEntry;
use super::hashing::preferred_owner;
use super::mem_store::{Fault, MemStore};
use super::ownership::{Claim, ClusterError, CommitError, Epoch, JournalWrite, Keys, Member};
use super::store::{Store, StoreError};
use crate::op::OpId;

const NODES: u8 = 3;
const DOCS: u8 = 3;
const CLIENTS: u8 = 5;
/// Ops a client has in flight at most.
const UNACKED_MAX: usize = 4;
const TTL: Duration = Duration::from_secs(5);
/// How long before its lease's TTL (by its own clock) a node stops serving.
const MARGIN: Duration = Duration::from_secs(1);
const PREFIX: &str = "/quire";

#[derive(Debug, Clone)]
enum Action {
    Register {
        node: u8,
    },
    Claim {
        node: u8,
        doc: u8,
    },
    /// The client sends a new op (if it has room for one) and resends its unacked ones.
    Submit {
        client: u8,
        node: u8,
        new_op: bool,
    },
    /// A group commit; its acks reach the clients if `acks_delivered` (if not, the
    /// connections dropped: the clients resend, and the node answers from memory).
    Commit {
        node: u8,
        check_clock: bool,
        acks_delivered: bool,
    },
    /// The commit succeeds and the node crashes before acknowledging anything.
    CommitThenCrash {
        node: u8,
    },
    /// Running nodes renew their leases, then time passes.
    Advance {
        secs: u8,
    },
    Pause {
        node: u8,
    },
    Wake {
        node: u8,
    },
    Crash {
        node: u8,
    },
    /// Graceful handoff: commit what is pending, then release.
    Release {
        node: u8,
        doc: u8,
    },
    /// The next txn, whoever sends it, fails with an unknown outcome: applied with
    /// its response lost, or never applied.
    StoreFault {
        applied: bool,
    },
}

impl Action {
    fn random(pick: &mut impl FnMut(u32) -> u32) -> Action {
        let node = pick(u32::from(NODES)) as u8;
        let doc = pick(u32::from(DOCS)) as u8;
        match pick(100) {
            0..=7 => Action::Register { node },
            8..=19 => Action::Claim { node, doc },
            20..=49 => Action::Submit {
                client: pick(u32::from(CLIENTS)) as u8,
                node,
                new_op: pick(4) != 0,
            },
            50..=67 => Action::Commit {
                node,
                check_clock: pick(3) != 0,
                acks_delivered: pick(5) != 0,
            },
            68..=70 => Action::CommitThenCrash { node },
            71..=80 => Action::Advance {
                secs: 1 + pick(6) as u8,
            },
            81..=85 => Action::Pause { node },
            86..=90 => Action::Wake { node },
            91..=93 => Action::Crash { node },
            94..=96 => Action::Release { node, doc },
            _ => Action::StoreFault {
                applied: pick(2) == 0,
            },
        }
    }
}

impl Arbitrary for Action {
    fn arbitrary(g: &mut Gen) -> Self {
        Action::random(&mut |n| u32::arbitrary(g) % n)
    }
}

struct DocState {
    epoch: Epoch,
    /// Seqs up to this are in the store's journal.
    committed_through: u64,
    /// Seqs up to this were in the journal when the node claimed the document.
    loaded_through: u64,
    /// Op id → seq, for every op of this document the node knows of.
    applied: HashMap<OpId, u64>,
    /// Sequenced, not yet committed.
    pending: Vec<JournalEntry>,
}

impl DocState {
    fn next_seq(&self) -> u64 {
        self.committed_through + self.pending.len() as u64 + 1
    }
}

struct Node {
    id: String,
    /// `None`: down (crashed, or dropped its state when its lease went).
    member: Option<Member<Arc<MemStore>>>,
    paused: bool,
    /// When the node last sent a keep-alive that succeeded, by the shared clock.
    renewed_at: Duration,
    docs: BTreeMap<u8, DocState>,
}

struct Client {
    id: u64,
    doc: u8,
    next_local_seq: u64,
    unacked: BTreeSet<u64>,
}

struct World {
    store: Arc<MemStore>,
    keys: Keys,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// Every acknowledgement given: op id → (document, seq).
    acked: HashMap<OpId, (u8, u64)>,
    coverage: Coverage,
}

/// What a schedule exercised, so that the seeded test can assert it reached the cases
/// that matter (a model test that never fails over proves nothing about failover).
#[derive(Debug, Default, Clone, Copy)]
struct Coverage {
    acks: u64,
    /// Resends answered with the seq of an op committed by an earlier owner.
    acks_from_loaded_journal: u64,
    /// Claims that loaded a non-empty journal.
    failovers: u64,
    /// Commits refused because the node had lost the document.
    commits_lost: u64,
    /// Of those, commits by a node whose lease had expired (the fence alone held).
    commits_fenced_after_expiry: u64,
    releases: u64,
    /// Commits whose outcome the node could not know (the store did not answer).
    commits_uncertain: u64,
}

/// The documents' ids (with a '/', which the keys escape).
const DOC_IDS: [&str; DOCS as usize] = ["team/doc-0", "team/doc-1", "team/doc-2"];

fn doc_id(doc: u8) -> &'static str {
    DOC_IDS[usize::from(doc)]
}

impl World {
    fn new() -> Self {
        let store = Arc::new(MemStore::new());
        let keys = Keys::new(PREFIX);
        let mut world = World {
            store,
            keys,
            nodes: (0..NODES)
                .map(|n| Node {
                    id: format!("node-{n}"),
                    member: None,
                    paused: false,
                    renewed_at: Duration::ZERO,
                    docs: BTreeMap::new(),
                })
                .collect(),
            clients: (0..CLIENTS)
                .map(|c| Client {
                    id: 100 + u64::from(c),
                    doc: c % DOCS,
                    next_local_seq: 1,
                    unacked: BTreeSet::new(),
                })
                .collect(),
            acked: HashMap::new(),
            coverage: Coverage::default(),
        };
        for node in 0..NODES {
            world.step(&Action::Register { node });
        }
        world
    }

    /// The node drops everything, as it must once its lease may be gone.
    fn drop_node(&mut self, node: u8) {
        let n = &mut self.nodes[usize::from(node)];
        n.member = None;
        n.docs.clear();
        n.paused = false;
    }

    /// Whether the node may act: up, running, and its lease valid by its own clock
    /// (if not, it drops everything at once).
    fn running(&mut self, node: u8) -> bool {
        let now = self.store.now();
        let n = &self.nodes[usize::from(node)];
        if n.member.is_none() || n.paused {
            return false;
        }
        if now + MARGIN >= n.renewed_at + TTL {
            self.drop_node(node);
            return false;
        }
        true
    }

    fn ack(&mut self, node: u8, op_id: OpId, doc: u8, seq: u64) {
        let member = self.nodes[usize::from(node)].member.as_ref().expect("up");
        assert!(
            self.store.lease_alive(member.lease()),
            "node-{node} acked {op_id} as seq {seq} of doc {doc} with its lease expired"
        );
        self.coverage.acks += 1;
        if let Some(previous) = self.acked.insert(op_id, (doc, seq)) {
            assert_eq!(previous, (doc, seq), "{op_id} acked twice, differently");
        }
        let client = usize::try_from(op_id.client_id - 100).expect("a model client");
        self.clients[client].unacked.remove(&op_id.local_seq);
    }

    fn step(&mut self, action: &Action) {
        match *action {
            Action::Register { node } => {
                let n = &mut self.nodes[usize::from(node)];
                if n.member.is_some() {
                    return;
                }
                match Member::register(self.store.clone(), self.keys.clone(), &n.id, "addr", TTL) {
                    Ok(member) => {
                        n.member = Some(member);
                        n.renewed_at = self.store.now();
                    }
                    Err(ClusterError::NodeIdTaken { .. })
                    | Err(ClusterError::Store(StoreError::Unavailable(_))) => {}
                    Err(e) => panic!("register: {e}"),
                }
            }
            Action::Claim { node, doc } => self.claim(node, doc),
            Action::Submit {
                client,
                node,
                new_op,
            } => self.submit(client, node, new_op),
            Action::Commit {
                node,
                check_clock,
                acks_delivered,
            } => {
                let n = &self.nodes[usize::from(node)];
                let may = if check_clock {
                    self.running(node)
                } else {
                    n.member.is_some() && !n.paused
                };
                if may {
                    self.commit(node, None, acks_delivered);
                }
            }
            Action::CommitThenCrash { node } => {
                if self.running(node) {
                    self.commit(node, None, false);
                    self.drop_node(node);
                }
            }
            Action::Advance { secs } => {
                let now = self.store.now();
                for node in 0..NODES {
                    let n = &mut self.nodes[usize::from(node)];
                    let Some(member) = n.member.as_ref().filter(|_| !n.paused) else {
                        continue;
                    };
                    match member.keep_alive() {
                        Ok(()) => n.renewed_at = now,
                        Err(ClusterError::LeaseExpired) => self.drop_node(node),
                        Err(e) => panic!("keep-alive: {e}"),
                    }
                }
                self.store.advance(Duration::from_secs(u64::from(secs)));
            }
            Action::Pause { node } => {
                let n = &mut self.nodes[usize::from(node)];
                n.paused = n.member.is_some();
            }
            Action::Wake { node } => self.nodes[usize::from(node)].paused = false,
            Action::Crash { node } => self.drop_node(node),
            Action::StoreFault { applied } => self.store.fault_next_txn(if applied {
                Fault::ResponseLost
            } else {
                Fault::RequestLost
            }),
            Action::Release { node, doc } => {
                if !self.running(node) || !self.nodes[usize::from(node)].docs.contains_key(&doc) {
                    return;
                }
                self.commit(node, Some(doc), true);
                let n = &mut self.nodes[usize::from(node)];
                if let Some(state) = n.docs.remove(&doc) {
                    let member = n.member.as_ref().expect("running");
                    // Unknown outcome: the document may stay owned by this node, which
                    // then serves it again when a client is redirected to it.
                    match member.release(doc_id(doc), state.epoch) {
                        Ok(true) => self.coverage.releases += 1,
                        Ok(false) | Err(ClusterError::Store(StoreError::Unavailable(_))) => {}
                        Err(e) => panic!("release: {e}"),
                    }
                }
            }
        }
    }

    fn claim(&mut self, node: u8, doc: u8) {
        if !self.running(node) || self.nodes[usize::from(node)].docs.contains_key(&doc) {
            return;
        }
        let member = self.nodes[usize::from(node)]
            .member
            .as_ref()
            .expect("running");
        let epoch = match member.claim(doc_id(doc)) {
            Ok(Claim::Owned(epoch)) => epoch,
            Ok(Claim::OwnedBy { node: owner, .. }) => {
                assert_ne!(
                    owner,
                    self.nodes[usize::from(node)].id,
                    "a claim by node-{node} named it as another owner: its own key is stuck"
                );
                return;
            }
            Err(ClusterError::LeaseExpired) => return self.drop_node(node),
            // If it was applied, this node owns the document without knowing it: its
            // next claim finds its own key (same lease) and takes it in that epoch.
            Err(ClusterError::Store(StoreError::Unavailable(_))) => return,
            Err(e) => panic!("claim: {e}"),
        };
        let loaded = member.load(doc_id(doc)).expect("load");
        if !loaded.ops.is_empty() {
            self.coverage.failovers += 1;
        }
        assert!(loaded.snapshot.is_none());
        let state = DocState {
            epoch,
            committed_through: loaded.version(),
            loaded_through: loaded.version(),
            applied: loaded
                .applied
                .iter()
                .map(|(op_id, (seq, _))| (*op_id, *seq))
                .collect(),
            pending: Vec::new(),
        };
        self.nodes[usize::from(node)].docs.insert(doc, state);
    }

    /// The node that serves `doc` for a client that went to `node`, if any.
    fn serving(&mut self, node: u8, doc: u8) -> Option<u8> {
        if !self.running(node) {
            return None;
        }
        self.claim(node, doc);
        if self.nodes[usize::from(node)].docs.contains_key(&doc) {
            return Some(node);
        }
        let owner = self.store.get(&self.keys.owner(doc_id(doc))).unwrap()?;
        let owner = self
            .nodes
            .iter()
            .position(|n| n.id.as_bytes() == owner.value)
            .expect("a model node") as u8;
        // The redirected client opens the document at its owner, which claims it if it
        // does not serve it (it lost track of a claim whose answer was lost).
        if owner != node && self.running(owner) {
            self.claim(owner, doc);
        }
        let serves = self.running(owner) && self.nodes[usize::from(owner)].docs.contains_key(&doc);
        serves.then_some(owner)
    }

    fn submit(&mut self, client: u8, node: u8, new_op: bool) {
        let c = &mut self.clients[usize::from(client)];
        if new_op && c.unacked.len() < UNACKED_MAX {
            c.unacked.insert(c.next_local_seq);
            c.next_local_seq += 1;
        }
        let (client_id, doc) = (c.id, c.doc);
        let sent: Vec<u64> = c.unacked.iter().copied().collect();
        // A node that does not serve the document claims it if it is free, and
        // redirects the client to its owner if not.
        let Some(node) = self.serving(node, doc) else {
            return;
        };
        for local_seq in sent {
            let op_id = OpId {
                client_id,
                local_seq,
            };
            let state = self.nodes[usize::from(node)]
                .docs
                .get_mut(&doc)
                .expect("served");
            match state.applied.get(&op_id) {
                Some(&seq) if seq <= state.committed_through => {
                    if seq <= state.loaded_through {
                        self.coverage.acks_from_loaded_journal += 1;
                    }
                    self.ack(node, op_id, doc, seq)
                }
                // Acknowledged when its commit succeeds.
                Some(_) => {}
                None => {
                    let seq = state.next_seq();
                    state.applied.insert(op_id, seq);
                    state.pending.push(JournalEntry {
                        seq,
                        op_id,
                        fingerprint: local_seq,
                        body: format!("op {op_id}").into_bytes(),
                    });
                }
            }
        }
    }

    /// One group commit of the node's pending ops (of `only` if given); acknowledges
    /// them if `ack` and the txn succeeded (a client that missed its ack resends).
    fn commit(&mut self, node: u8, only: Option<u8>, ack: bool) {
        let n = &mut self.nodes[usize::from(node)];
        let member = n.member.as_ref().expect("up");
        let batch: Vec<(u8, JournalWrite<'_>)> = n
            .docs
            .iter()
            .filter(|(doc, _)| only.is_none_or(|o| o == **doc))
            .flat_map(|(doc, state)| {
                state.pending.iter().map(move |entry| {
                    (
                        *doc,
                        JournalWrite {
                            doc: doc_id(*doc),
                            epoch: state.epoch,
                            entry,
                        },
                    )
                })
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        let writes: Vec<JournalWrite<'_>> = batch.iter().map(|(_, w)| *w).collect();
        match member.commit(&writes) {
            Ok(_) => {
                let mut acks = Vec::new();
                for (doc, state) in n.docs.iter_mut() {
                    if only.is_some_and(|o| o != *doc) {
                        continue;
                    }
                    for entry in state.pending.drain(..) {
                        state.committed_through = entry.seq;
                        acks.push((entry.op_id, *doc, entry.seq));
                    }
                }
                if ack {
                    for (op_id, doc, seq) in acks {
                        self.ack(node, op_id, doc, seq);
                    }
                }
            }
            Err(CommitError::Lost(lost)) => {
                self.coverage.commits_lost += 1;
                if !self.store.lease_alive(member.lease()) {
                    self.coverage.commits_fenced_after_expiry += 1;
                }
                for doc in 0..DOCS {
                    if lost.iter().any(|l| l == doc_id(doc)) {
                        n.docs.remove(&doc);
                    }
                }
            }
            Err(CommitError::Cluster(ClusterError::Store(StoreError::Unavailable(_)))) => {
                // The batch may or may not be in the journal: acknowledge nothing and
                // drop the documents; a claim (same lease, same epoch) reloads them from
                // the journal, whose op ids answer the clients' resends.
                self.coverage.commits_uncertain += 1;
                n.docs.retain(|doc, state| {
                    state.pending.is_empty() || only.is_some_and(|o| o != *doc)
                });
            }
            Err(e) => panic!("commit: {e:?}"),
        }
    }

    /// The invariants (module notes), read from the store directly, not through the
    /// code under test.
    fn check(&self) {
        let mut journals: BTreeMap<u8, Vec<OpId>> = BTreeMap::new();
        for doc in 0..DOCS {
            let prefix = self.keys.journal(doc_id(doc));
            let range = self.store.get_prefix(&prefix, None, 100_000).unwrap();
            let mut ids = Vec::new();
            let mut seen = BTreeSet::new();
            for (i, kv) in range.kvs.iter().enumerate() {
                let entry = JournalEntry::decode(&kv.value).unwrap();
                let seq = i as u64 + 1;
                assert_eq!(kv.key, self.keys.journal_entry(doc_id(doc), seq), "a gap");
                assert_eq!(entry.seq, seq);
                assert!(
                    seen.insert(entry.op_id),
                    "{} twice in doc {doc}",
                    entry.op_id
                );
                ids.push(entry.op_id);
            }
            journals.insert(doc, ids);
        }
        for (op_id, (doc, seq)) in &self.acked {
            let journal = &journals[doc];
            let at = usize::try_from(*seq - 1).unwrap();
            assert_eq!(
                journal.get(at),
                Some(op_id),
                "{op_id} was acked as seq {seq} of doc {doc}; the journal has {journal:?}"
            );
        }
    }

    /// Brings everything back and has every client resend: then every op is acked.
    fn heal(&mut self) {
        // A fault left pending hits an empty txn, not the healing.
        let _ = self.store.txn(&[], &[], &[]);
        for node in 0..NODES {
            self.step(&Action::Wake { node });
        }
        for _ in 0..3 {
            self.step(&Action::Advance { secs: 3 });
            for node in 0..NODES {
                self.step(&Action::Register { node });
            }
        }
        for doc in 0..DOCS {
            let held = (0..NODES)
                .find(|&n| self.running(n) && self.nodes[usize::from(n)].docs.contains_key(&doc));
            let owner = match held {
                Some(owner) => owner,
                None => {
                    let any = self.nodes[0].member.as_ref().expect("registered");
                    let live = any.live_nodes().unwrap();
                    assert_eq!(live.len(), usize::from(NODES));
                    let preferred =
                        preferred_owner(doc_id(doc), live.iter().map(|n| n.node.as_str())).unwrap();
                    let preferred = self.nodes.iter().position(|n| n.id == preferred).unwrap();
                    self.serving(preferred as u8, doc)
                        .expect("the document is served")
                }
            };
            for client in 0..CLIENTS {
                if self.clients[usize::from(client)].doc == doc {
                    self.submit(client, owner, false);
                }
            }
            self.commit(owner, Some(doc), true);
            for client in 0..CLIENTS {
                if self.clients[usize::from(client)].doc == doc {
                    self.submit(client, owner, false);
                }
            }
        }
        self.check();
        for client in &self.clients {
            assert!(
                client.unacked.is_empty(),
                "client {} never got acks for {:?}",
                client.id,
                client.unacked
            );
        }
    }
}

fn run(actions: &[Action]) -> Coverage {
    let mut world = World::new();
    for action in actions {
        world.step(action);
        world.check();
    }
    world.heal();
    world.coverage
}

#[test]
fn no_acked_op_is_lost_or_applied_twice_under_random_schedules() {
    fn prop(actions: Vec<Action>) -> bool {
        // The invariants are assertions: a violation panics, and quickcheck reports
        // the (shrunk) schedule.
        run(&actions);
        true
    }
    QuickCheck::new()
        .tests(300)
        .rng(Gen::new(150))
        .quickcheck(prop as fn(Vec<Action>) -> bool);
}

#[test]
fn no_acked_op_is_lost_or_applied_twice_under_long_seeded_schedules() {
    let mut total = Coverage::default();
    for seed in 0..20u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let actions: Vec<Action> = (0..1_000)
            .map(|_| Action::random(&mut |n| rng.u32(..n)))
            .collect();
        let mut world = World::new();
        for (step, action) in actions.iter().enumerate() {
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                world.step(action);
                world.check();
            }));
            assert!(checked.is_ok(), "seed {seed}, step {step}: {action:?}");
        }
        world.heal();
        let c = world.coverage;
        total.acks += c.acks;
        total.acks_from_loaded_journal += c.acks_from_loaded_journal;
        total.failovers += c.failovers;
        total.commits_lost += c.commits_lost;
        total.commits_fenced_after_expiry += c.commits_fenced_after_expiry;
        total.releases += c.releases;
        total.commits_uncertain += c.commits_uncertain;
    }
    println!("{total:?}");
    // The schedules reach every case the invariants are about.
    assert!(total.acks > 1_000, "{total:?}");
    assert!(total.acks_from_loaded_journal > 0, "{total:?}");
    assert!(total.failovers > 10, "{total:?}");
    assert!(total.commits_lost > 0, "{total:?}");
    assert!(total.commits_fenced_after_expiry > 0, "{total:?}");
    assert!(total.releases > 0, "{total:?}");
    assert!(total.commits_uncertain > 0, "{total:?}");
}
