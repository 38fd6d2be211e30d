//! The simulator's cluster world (`--cluster`; issue 13): three nodes, each the real
//! server over the real cluster sequencer (its local log a cache on a simulated disk,
//! its replicator and lease driven by a task here), one in-memory stand-in for etcd,
//! and application clients (the real client library, with every node's address) editing
//! a few shared documents, half of them over WebSocket (to each node's HTTP layer,
//! following redirects by the WebSocket URL each node registers). All on one thread,
//! in tokio's paused time, under one seed.
//!
//! Each step picks one action: a client edits, restarts, loses its network, or its
//! network goes silent (see `app::Net::go_silent`) or speaks again; a node
//! crashes (its process and its disk gone; half the time its machine too, and its
//! connections fall silent for ever), starts again (registering once its previous
//! lease expired), pauses (its commits and keep-alives stop, as a long stall stops them;
//! its sessions still answer from memory) or stops whole (SIGSTOP: its connections stall
//! too) and resumes, or drains (as
//! at SIGTERM) and leaves; the store loses a txn's request or its response; time passes.
//!
//! After every step it checks that no two op ids were acknowledged at one seq of a
//! document, nor one op id at two seqs (a split brain would), and that nothing panicked;
//! every few steps, that every op acknowledged so far is in the store's journal at its
//! seq (or under a snapshot that covers it). At the end, faults stop, every node runs,
//! every client settles, and each document's clients must have the same text, the text
//! the store's snapshot and journal give, with every edit of theirs exactly once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use quire::cluster::mem_store::{Fault, MemStore};
use quire::cluster::ownership::{Keys, Member};
use quire::cluster::replicator::{Clock, Drive, LeaseTiming, Replicator};
use quire::cluster::store::{
    Compare, KeyValue, LeaseId, Op, Range, Store, StoreError, TxnResponse,
};
use quire::op::OpId;
use quire::sequencer::cluster::ClusterSequencer;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Owner;
use quire::server::{Blocking, DeleteError, Server, ServerConfig};
use quire::wal::record::{OpRecord, RecordType};
use quire::wal::segment::SEGMENT_SIZE_MIN;
use quire::wal::snapshot::Snapshot;
use quire::wal::vfs::sim::{SimFs, SplitMix};
use quire::wal::{Background, WalConfig};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::app::AppClient;
use crate::net::{HttpDoor, LinkConfig, SimListener};
use crate::{Acked, Failure, PANICKED};

const NODES: usize = 3;
/// The lease's TTL; a node stops serving a fifth of it before (its margin).
const TTL: Duration = Duration::from_secs(5);
const PREFIX: &str = "/quire";
/// How long the end waits for every client to settle, in simulated time.
const SETTLE: Duration = Duration::from_secs(600);

type Seq = ClusterSequencer<NodeStore>;

/// The store as one node reaches it: every request fails while the node is cut off
/// from it (a partition between the node and etcd; the clients still reach the node).
#[derive(Clone)]
struct NodeStore {
    store: Arc<MemStore>,
    cut: Arc<AtomicBool>,
}

impl NodeStore {
    fn reach(&self) -> Result<(), StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("cut off (the simulator)".into()));
        }
        Ok(())
    }
}

impl Store for NodeStore {
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.reach()?;
        self.store.grant_lease(ttl)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.reach()?;
        self.store.keep_alive(lease)
    }
    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.reach()?;
        self.store.revoke(lease)
    }
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.reach()?;
        self.store.get(key)
    }
    fn get_prefix(
        &self,
        prefix: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<Range, StoreError> {
        self.reach()?;
        self.store.get_prefix(prefix, from, limit)
    }
    fn txn(
        &self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnResponse, StoreError> {
        self.reach()?;
        self.store.txn(compares, success, failure)
    }
}

/// A node's own monotonic clock: tokio's (paused) clock since the node started.
struct SimClock(tokio::time::Instant);

impl Clock for SimClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

fn addr(node: usize) -> String {
    format!("n{node}")
}

/// A running node: its server, sequencer and tasks (aborted when it is dropped).
struct Running {
    seq: Arc<Seq>,
    server: Arc<Server<Seq>>,
    /// Its commits, keep-alives and disk stop while set (`Pause`).
    paused: Arc<AtomicBool>,
    /// Paused as a stopped process (SIGSTOP): its connections stall as well, so its
    /// sessions hear nothing and say nothing (see `app::Net::set_frozen`).
    frozen: bool,
    /// Cut off from the store while set.
    cut: Arc<AtomicBool>,
    /// Its HTTP listener (WebSocket clients'); its connections end with it.
    http: HttpDoor,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.http.server_gone();
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Stats {
    edits: u64,
    acks: u64,
    crashes: u64,
    /// Of the crashes, those whose connections fell silent for ever.
    machines_lost: u64,
    restarts: u64,
    refused_restarts: u64,
    pauses: u64,
    /// Of the pauses, those of the whole process (its connections stalled).
    freezes: u64,
    drains: u64,
    store_faults: u64,
    app_restarts: u64,
    /// An application client closed its document and opened it again.
    app_reopens: u64,
    offline: u64,
    /// An application client's network went silent (see `app::Net::go_silent`).
    silences: u64,
    /// Of those, the silences that ended with their connections silent for ever.
    black_holes: u64,
    journal_checks: u64,
    /// A node was cut off from the store.
    cuts: u64,
    /// A document's owner changed (seen between steps).
    owner_changes: u64,
    /// Documents deleted (`Ok` from the admin path, or a failure whose txn committed).
    deletions: u64,
    /// Deletions asked of a node that did not own the document (then of its owner).
    deletions_elsewhere: u64,
    /// Deletions that failed (and deleted nothing: checked).
    deletions_failed: u64,
    /// Deletions told to retry (nothing deleted: checked).
    deletions_retry: u64,
    /// Of those, failures after which the document was gone (the txn committed, its
    /// response lost): a deletion whose outcome the administrator is not told.
    deletions_unknown: u64,
    /// Acks seen by clients whose document was deleted since (not recorded).
    acks_of_deleted: u64,
}

struct World {
    seed: u64,
    rng: SplitMix,
    verbose: bool,
    step: u64,
    store: Arc<MemStore>,
    nodes: Vec<Option<Running>>,
    apps: Vec<AppClient>,
    docs: Vec<String>,
    /// Per document: each acknowledged op id's seq, and each seq's op id.
    acked: BTreeMap<String, Acked>,
    snapshot_every_ops: u64,
    server_config: ServerConfig,
    local_config: LocalConfig,
    /// Each document's owner as last seen.
    owners: HashMap<String, Option<String>>,
    /// Simulated time at the end of the run.
    elapsed: Duration,
    /// Documents a client of which reloaded (see `AppClient::check_edits`).
    reloaded: std::collections::HashSet<String>,
    /// Clients whose document was deleted since they opened it: they drop it
    /// ([`AppClient::forget`]) before they act again.
    stale: std::collections::HashSet<usize>,
    /// Per document, the ops acknowledged in its deleted generations: none may be in
    /// the store again.
    deleted: HashMap<String, Vec<(u64, OpId)>>,
    /// Each client's ops sent and not acknowledged, as last seen.
    unacked: HashMap<usize, Vec<OpId>>,
    /// Ops a client still had unacknowledged when its document was deleted. Such a
    /// client may send them to the new document under the same id before it hears of
    /// the deletion (protocol.md, "Deleted documents": Open carries no document
    /// identity, the known limitation), where they are new ops: one acknowledged in the
    /// deleted generation too (its ack reached a process whose persisted queue still
    /// held it) may so be in the store again, as a new op of the new generation.
    resendable: std::collections::HashSet<OpId>,
    stats: Stats,
    digest: u64,
}

impl World {
    fn new(seed: u64, verbose: bool) -> World {
        let mut rng = SplitMix(seed);
        // Which clients speak WebSocket (to the nodes' HTTP listeners, following
        // redirects by the nodes' WebSocket URLs): a stream of its own, so that the
        // seed's other draws are those of the runs before WebSocket clients came in.
        let mut transport = SplitMix(seed ^ 0x0057_eb50_c4e7);
        let n_docs = 1 + rng.below(4) as usize;
        let docs: Vec<String> = (0..n_docs).map(|i| format!("doc-{i}")).collect();
        let n_apps = 2 + rng.below(5) as usize;
        let max_latency = Duration::from_micros(100 + rng.below(20_000));
        let link = LinkConfig {
            min_latency: Duration::from_micros(50),
            max_latency,
            capacity: 16 << 10,
        };
        let apps = (0..n_apps)
            .map(|i| {
                let persist = rng.below(3) != 0;
                let mut app =
                    AppClient::new(i, docs[i % n_docs].clone(), persist, rng.next_u64(), link);
                // Each client's home is one node, its fallbacks the others.
                let home = rng.below(NODES as u64) as usize;
                app.addrs = (0..NODES).map(|k| addr((home + k) % NODES)).collect();
                app.net.set_home(&app.addrs[0]);
                if transport.below(2) == 0 {
                    app.net.use_websocket();
                }
                app
            })
            .collect();
        let server_config = ServerConfig {
            max_frame: 4096,
            outbox_bytes: 64 << 10,
            max_connections: 4 * n_apps + 8,
            large_frame_budget: 64 << 10,
            unsynced_bytes: 16 << 10,
            history_window: 1 + rng.below(6) as usize,
            blocking: Blocking::Inline,
            ..ServerConfig::default()
        };
        let local_config = LocalConfig {
            wal: WalConfig {
                segment_size: SEGMENT_SIZE_MIN,
                zero_fill: false,
                background: Background::Manual,
                ..WalConfig::default()
            },
            snapshot_every: Duration::from_secs(1 << 30),
            retention: Duration::ZERO,
            ..LocalConfig::default()
        };
        World {
            seed,
            snapshot_every_ops: 3 + rng.below(60),
            rng,
            verbose,
            step: 0,
            store: Arc::new(MemStore::new()),
            nodes: (0..NODES).map(|_| None).collect(),
            apps,
            docs,
            acked: BTreeMap::new(),
            server_config,
            local_config,
            owners: HashMap::new(),
            elapsed: Duration::ZERO,
            reloaded: std::collections::HashSet::new(),
            stale: std::collections::HashSet::new(),
            deleted: HashMap::new(),
            unacked: HashMap::new(),
            resendable: std::collections::HashSet::new(),
            stats: Stats::default(),
            digest: 0,
        }
    }

    fn say(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            let t = tokio::time::Instant::now().duration_since(start_of_time());
            println!("[{} t={t:?}] {}", self.step, what());
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> Failure {
        format!("cluster seed {} step {}: {what}", self.seed, self.step)
    }

    /// Starts node `i` on an empty disk (cluster mode empties its cache at start), if it
    /// can register: not while its previous run's lease is alive.
    fn start_node(&mut self, i: usize) -> Result<bool, Failure> {
        if self.nodes[i].is_some() {
            return Ok(true);
        }
        let cut = Arc::new(AtomicBool::new(false));
        let node_store = NodeStore {
            store: self.store.clone(),
            cut: cut.clone(),
        };
        let here = Owner {
            addr: Arc::from(addr(i)),
            ws_url: Arc::from(crate::net::ws_url(&addr(i))),
        };
        let member = match Member::register(
            node_store,
            Keys::new(PREFIX),
            &format!("node{i}"),
            &quire::sequencer::cluster::advertised(&here),
            TTL,
        ) {
            Ok(member) => member,
            Err(e) => {
                self.stats.refused_restarts += 1;
                self.say(|| format!("n{i} cannot register yet: {e}"));
                return Ok(false);
            }
        };
        let fs = Arc::new(SimFs::new());
        let (local, _) = LocalSequencer::open_with(
            fs,
            std::path::Path::new("/cache"),
            self.local_config.clone(),
        )
        .map_err(|e| self.fail(format!("n{i}: opening its cache: {e}")))?;
        let (tx, rx) = std_mpsc::channel();
        let tx = Mutex::new(tx);
        let mut timing = LeaseTiming::for_ttl(TTL);
        timing.retry_every = Duration::ZERO;
        let renew_every = timing.renew_every;
        let replicator = Replicator::start(
            member,
            Arc::new(SimClock(tokio::time::Instant::now())),
            timing,
            Drive::Manual,
            Box::new(move |loss| {
                let _ = tx.lock().unwrap().send(loss);
            }),
        );
        let seq = Arc::new(ClusterSequencer::new(
            local,
            replicator,
            rx,
            here,
            self.snapshot_every_ops,
            false,
        ));
        seq.place_inline();
        // A handover does not wait for journal writes (nothing else runs while it
        // would): the store's fencing refuses those still queued, and their clients
        // resend to the new owner.
        seq.set_hand_over_patience(Duration::ZERO);
        let server = Server::new(seq.clone(), self.server_config.clone());
        let (connect, accepted) = mpsc::unbounded_channel();
        let paused = Arc::new(AtomicBool::new(false));
        // The HTTP listener of WebSocket clients, served by the real HTTP layer, hands
        // its upgraded connections to the same server.
        let (handoff, ws_acceptor) = quire::server::websocket::acceptor();
        let (http, http_listener) = HttpDoor::new();
        let web_config = quire::web::WebConfig::new(
            self.server_config.max_frame,
            self.server_config.max_connections,
        );
        let serving = server.clone().serve(
            quire::server::transport::Both::new(SimListener(accepted), ws_acceptor),
            std::future::pending(),
        );
        let mut tasks = vec![
            tokio::spawn(async move {
                serving.await;
            }),
            tokio::spawn(async move {
                let _ = quire::web::serve_on(
                    http_listener,
                    web_config,
                    handoff,
                    std::future::pending(),
                )
                .await;
            }),
        ];
        // Documents that moved away: their sessions are redirected (as `quire serve`
        // does).
        if let Some(mut moved) = seq.moved() {
            let server = Arc::downgrade(&server);
            tasks.push(tokio::spawn(async move {
                while let Some((doc, owner)) = moved.recv().await {
                    let Some(server) = server.upgrade() else {
                        return;
                    };
                    server.redirect_document(&doc, owner);
                }
            }));
        }
        tasks.push(tokio::spawn(drive(
            seq.clone(),
            paused.clone(),
            renew_every,
            SplitMix(self.rng.next_u64()),
        )));
        for a in &self.apps {
            a.net.set_node(&addr(i), Some(connect.clone()));
            a.net.set_http(&addr(i), Some(http.clone()));
        }
        self.nodes[i] = Some(Running {
            seq,
            server,
            paused,
            frozen: false,
            cut,
            http,
            tasks,
        });
        self.say(|| format!("n{i} started"));
        Ok(true)
    }

    /// Node `i`'s process and disk are gone at once (SIGKILL, the machine lost). Half
    /// the time its machine is gone too: its connections fall silent for ever, and
    /// its clients learn it only by their timeout (else its kernel closes them).
    async fn crash(&mut self, i: usize) {
        let machine_lost = self.rng.below(2) == 0;
        self.stop_node(i, machine_lost).await;
    }

    /// Node `i`'s process ends; with `machine_lost`, its connections fall silent for
    /// ever, else they are closed.
    async fn stop_node(&mut self, i: usize, machine_lost: bool) {
        let Some(running) = self.nodes[i].take() else {
            return;
        };
        if machine_lost {
            self.stats.machines_lost += 1;
            for a in &self.apps {
                a.net.lose_node(&addr(i));
            }
        }
        drop(running);
        for a in &self.apps {
            a.net.set_node(&addr(i), None);
            a.net.set_http(&addr(i), None);
            // What its stalled connections held is gone with it; their ends learn it.
            a.net.set_frozen(&addr(i), false);
        }
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        self.stats.crashes += 1;
        self.say(|| {
            format!(
                "n{i} crashed{}",
                if machine_lost {
                    " with its machine (its connections fall silent)"
                } else {
                    ""
                }
            )
        });
    }

    /// Node `i` drains (SIGTERM): hands its documents over, leaves, and stops.
    async fn drain(&mut self, i: usize) {
        let Some(running) = &self.nodes[i] else {
            return;
        };
        if running.paused.load(Ordering::SeqCst) {
            return;
        }
        // Its queued journal writes first, as a drain's handover waits for them (a
        // batch whose outcome stays unknown, from a node cut off from the store, is
        // given up on, as the handover's patience runs out).
        for _ in 0..64 {
            if !running.seq.replicator().commit_next() {
                break;
            }
        }
        let handed = running.seq.drain();
        running.seq.handle_losses();
        // Its sessions are redirected before it goes.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        running.seq.close();
        self.stats.drains += 1;
        self.say(|| format!("n{i} drained ({handed} documents handed over) and left"));
        // An exit: its kernel closes its connections.
        self.stop_node(i, false).await;
        self.stats.crashes -= 1;
    }

    /// Notes what the clients were told: one op id per seq, one seq per op id.
    fn observe(&mut self) -> Result<(), Failure> {
        for a in 0..self.apps.len() {
            let doc = self.apps[a].doc.clone();
            if let Err(e) = self.apps[a].reopened() {
                return Err(self.fail(e));
            }
            if self.apps[a].told_deleted && !self.stale.contains(&a) {
                let name = self.apps[a].name.clone();
                return Err(self.fail(format!(
                    "{name} was told its document was deleted, which it was not"
                )));
            }
            let Some(seen) = self.apps[a].observe() else {
                continue;
            };
            let unacked = seen.unacked.iter().map(|&local_seq| OpId {
                client_id: seen.client_id,
                local_seq,
            });
            self.unacked.insert(a, unacked.collect());
            if self.stale.contains(&a) {
                // Of ops of the deleted document (or of the new one, reached by a
                // client that did not learn of the deletion in time: protocol.md's
                // known limitation); its edits are no longer counted on.
                self.stats.acks_of_deleted += seen.acked.len() as u64;
                continue;
            }
            if seen.reloads > 0 {
                self.reloaded.insert(doc.clone());
            }
            for (seq, local_seq) in seen.acked {
                let id = OpId {
                    client_id: seen.client_id,
                    local_seq,
                };
                self.stats.acks += 1;
                self.digest = self
                    .digest
                    .rotate_left(5)
                    .wrapping_add(id.client_id ^ (local_seq << 20) ^ (seq << 40));
                let acked = self.acked.entry(doc.clone()).or_default();
                if let Err(e) = crate::note_ack(acked, &doc, id, seq) {
                    return Err(self.fail(e));
                }
            }
        }
        if let Some(p) = PANICKED.lock().unwrap().clone() {
            return Err(self.fail(format!("a panic: {p}")));
        }
        Ok(())
    }

    /// A node that reaches the store, to read it through.
    fn reader(&self) -> Option<Arc<Seq>> {
        self.nodes
            .iter()
            .flatten()
            .find(|r| !r.cut.load(Ordering::SeqCst))
            .map(|r| r.seq.clone())
    }

    /// Counts the documents whose owner changed since the last look.
    fn watch_owners(&mut self) {
        let Some(reader) = self.reader() else {
            return;
        };
        let member = reader.replicator().member();
        for doc in &self.docs {
            let Ok(owner) = member.owner(doc) else {
                continue;
            };
            let owner = owner.map(|o| o.node);
            let before = self.owners.insert(doc.clone(), owner.clone());
            if before.is_some_and(|b| b != owner) {
                self.stats.owner_changes += 1;
            }
        }
    }

    /// Every acknowledged op is in the store: in the journal at its seq, or under the
    /// newest snapshot.
    fn check_journal(&mut self) -> Result<(), Failure> {
        let Some(reader) = self.reader() else {
            return Ok(());
        };
        let member = reader.replicator().member();
        self.stats.journal_checks += 1;
        for (doc, gone) in &self.deleted {
            let loaded = member
                .load(doc)
                .map_err(|e| self.fail(format!("{doc}: loading it from the store: {e}")))?;
            let back = |(seq, id): &&(u64, OpId)| {
                !self.resendable.contains(id)
                    && loaded.ops.iter().any(|e| e.seq == *seq && e.op_id == *id)
            };
            if let Some((seq, id)) = gone.iter().find(back) {
                return Err(self.fail(format!(
                    "{doc}: op {id:?} at seq {seq}, acknowledged before the document was deleted, is in the store again"
                )));
            }
        }
        for (doc, (_, by_seq)) in &self.acked {
            let loaded = member
                .load(doc)
                .map_err(|e| self.fail(format!("{doc}: loading it from the store: {e}")))?;
            let base = loaded.snapshot.as_ref().map_or(0, |(s, _)| *s);
            let journal: HashMap<u64, OpId> = loaded.ops.iter().map(|e| (e.seq, e.op_id)).collect();
            for (&seq, &id) in by_seq {
                if seq <= base {
                    continue;
                }
                match journal.get(&seq) {
                    Some(&there) if there == id => {}
                    Some(&there) => {
                        return Err(self.fail(format!(
                            "{doc}: seq {seq} was acknowledged to op {id:?}; the journal has op {there:?} there"
                        )))
                    }
                    None => {
                        return Err(self.fail(format!(
                            "{doc}: seq {seq} (op {id:?}) was acknowledged and is not in the store (snapshot at {base}, journal to {:?})",
                            loaded.ops.last().map(|e| e.seq)
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// The text the store gives for `doc`: its newest snapshot and the journal after it.
    fn stored_text(&self, doc: &str) -> Result<(String, u64), Failure> {
        let reader = self
            .reader()
            .ok_or_else(|| self.fail("no node reaches the store"))?;
        let loaded = reader
            .replicator()
            .member()
            .load(doc)
            .map_err(|e| self.fail(format!("{doc}: loading it from the store: {e}")))?;
        let (mut text, mut version) = match &loaded.snapshot {
            None => (String::new(), 0),
            Some((seq, bytes)) => {
                let s = Snapshot::decode(bytes)
                    .map_err(|e| self.fail(format!("{doc}: its snapshot at {seq}: {e}")))?;
                (s.text, *seq)
            }
        };
        for entry in &loaded.ops {
            let record = OpRecord::decode(RecordType::OpWithFingerprint, &entry.body)
                .map_err(|e| self.fail(format!("{doc}: journal seq {}: {e}", entry.seq)))?;
            text = quire::ot::apply_patches(&text, &record.patches).ok_or_else(|| {
                self.fail(format!("{doc}: journal seq {} does not apply", entry.seq))
            })?;
            version = entry.seq;
        }
        Ok((text, version))
    }

    async fn act(&mut self) -> Result<(), Failure> {
        let roll = self.rng.below(100);
        let a = self.rng.below(self.apps.len() as u64) as usize;
        let n = self.rng.below(NODES as u64) as usize;
        if self.stale.remove(&a) {
            self.apps[a].forget().await;
            self.say(|| format!("app{a} drops its deleted document"));
        }
        match roll {
            0..=54 => {
                let mut rng = SplitMix(self.rng.next_u64());
                let app = &mut self.apps[a];
                if app.client.is_none() {
                    app.start()
                        .await
                        .map_err(|e| format!("cluster seed {}: {e}", self.seed))?;
                    self.say(|| format!("app{a} started"));
                } else {
                    let what = app.edit(&mut rng).await.map_err(|e| self.fail(e))?;
                    self.stats.edits += 1;
                    self.say(|| format!("app{a} edits: {what}"));
                }
            }
            55..=59 => {
                self.apps[a].kill().await;
                self.stats.app_restarts += 1;
                self.say(|| format!("app{a} killed"));
            }
            60..=64 => {
                let net = &self.apps[a].net;
                let up = !net.is_up();
                net.set_up(up);
                if !up {
                    self.stats.offline += 1;
                }
                self.say(|| format!("app{a} network {}", if up { "up" } else { "down" }));
            }
            85 => {
                if self.apps[a].net.is_silent() {
                    self.end_silence(a);
                } else {
                    self.stats.silences += 1;
                    self.say(|| format!("app{a}'s network goes silent"));
                    self.apps[a].net.go_silent();
                }
            }
            65..=67 => self.crash(n).await,
            68..=74 => {
                if self.nodes[n].is_none() && self.start_node(n)? {
                    self.stats.restarts += 1;
                }
            }
            75..=77 => {
                if let Some(r) = &mut self.nodes[n] {
                    let paused = !r.paused.load(Ordering::SeqCst);
                    r.paused.store(paused, Ordering::SeqCst);
                    // Half the pauses stop the whole process: its sessions too.
                    let frozen = paused && self.rng.below(2) == 0;
                    r.frozen = frozen;
                    for a in &self.apps {
                        a.net.set_frozen(&addr(n), frozen);
                    }
                    if paused {
                        self.stats.pauses += 1;
                        self.stats.freezes += u64::from(frozen);
                    }
                    self.say(|| {
                        format!(
                            "n{n} {}",
                            match (paused, frozen) {
                                (true, true) => "stopped (its connections stall)",
                                (true, false) => "paused",
                                _ => "resumed",
                            }
                        )
                    });
                }
            }
            78..=79 => self.drain(n).await,
            83 => self.delete_document(n).await?,
            84 => {
                // What it was told before its events go with its handle.
                self.observe()?;
                // The open runs on (a node it is redirected to may not answer for the
                // client's timeout): `observe` installs the handle once it returns.
                if self.apps[a].reopen() {
                    self.stats.app_reopens += 1;
                    self.say(|| format!("app{a} closes its document and opens it again"));
                }
            }
            // 3 in 100 toggle the cut (a long partition is rarer, as heal ends it).
            96..=98 => {
                if let Some(r) = &self.nodes[n] {
                    let cut = !r.cut.load(Ordering::SeqCst);
                    r.cut.store(cut, Ordering::SeqCst);
                    if cut {
                        self.stats.cuts += 1;
                    }
                    self.say(|| {
                        format!(
                            "n{n} {} the store",
                            if cut { "cut off from" } else { "reaches" }
                        )
                    });
                }
            }
            80..=82 => {
                let fault = if self.rng.below(2) == 0 {
                    Fault::ResponseLost
                } else {
                    Fault::RequestLost
                };
                self.store.fault_next_txn(fault);
                self.stats.store_faults += 1;
                self.say(|| format!("the store's next txn: {fault:?}"));
            }
            _ => {
                let long = self.rng.below(10) == 0;
                let ms = self.rng.below(if long { 8_000 } else { 300 });
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        Ok(())
    }

    /// Whether the store holds anything of `doc` (its owner key, journal or snapshots).
    /// The keys the store holds of `doc` (owner, journal, snapshots and their pieces),
    /// each with the revision it was last written at.
    fn stored(&self, doc: &str) -> HashSet<(String, i64)> {
        let keys = Keys::new(PREFIX);
        let mut stored = HashSet::new();
        for prefix in [keys.journal(doc), keys.snapshots(doc), keys.chunks(doc)] {
            if let Ok(range) = self.store.get_prefix(&prefix, None, 1 << 20) {
                stored.extend(range.kvs.into_iter().map(|kv| (kv.key, kv.mod_revision)));
            }
        }
        if let Ok(Some(owner)) = self.store.get(&keys.owner(doc)) {
            stored.insert((owner.key, owner.mod_revision));
        }
        stored
    }

    /// An administrator deletes a document at node `n` (the admin endpoint's path; at
    /// its owner if `n` says another node owns it). Done, the store holds nothing of it
    /// and every op acknowledged so far is at or below the version it was deleted at;
    /// failed, it deleted nothing (unless its txn committed and only the answer was
    /// lost: then it is gone whole). Either way its clients go on: those of a deleted
    /// document drop it before they act again, and it starts anew, empty.
    async fn delete_document(&mut self, n: usize) -> Result<(), Failure> {
        let doc = self.docs[self.rng.below(self.docs.len() as u64) as usize].clone();
        let mut at = n;
        for _ in 0..2 {
            let Some(running) = &self.nodes[at] else {
                return Ok(());
            };
            if running.frozen {
                // Its admin endpoint is stopped with it.
                return Ok(());
            }
            // Its queued journal writes first (as at a drain): the erasure waits for
            // them no longer than the handover's patience (none here).
            for _ in 0..64 {
                if !running.seq.replicator().commit_next() {
                    break;
                }
            }
            let server = running.server.clone();
            self.observe()?;
            let existed = self.stored(&doc);
            let owner_key = Keys::new(PREFIX).owner(&doc);
            let erased_unanswered = self.store.deleted_unanswered(&owner_key);
            let outcome = tokio::time::timeout(SETTLE, server.delete_document(&doc)).await;
            self.observe()?;
            let top = self
                .acked
                .get(&doc)
                .and_then(|(_, by_seq)| by_seq.keys().next_back().copied());
            match outcome {
                Err(_) => {
                    return Err(self.fail(format!(
                        "deleting {doc} at n{at} did not finish in {SETTLE:?}"
                    )))
                }
                Ok(Err(DeleteError::Elsewhere(owner))) => {
                    self.stats.deletions_elsewhere += 1;
                    self.say(|| format!("deleting {doc} at n{at}: owned by {}", owner.addr));
                    match (0..NODES).find(|&k| *owner.addr == addr(k)) {
                        Some(k) if k != at => at = k,
                        _ => return Ok(()),
                    }
                }
                Ok(Ok(None)) => {
                    if let Some(top) = top {
                        return Err(self.fail(format!(
                            "{doc}: n{at} found nothing to delete, with an op acknowledged at seq {top}"
                        )));
                    }
                    self.say(|| format!("{doc}: nothing to delete (version 0)"));
                    return Ok(());
                }
                Ok(Ok(Some(version))) => {
                    if top.is_some_and(|top| top > version) {
                        return Err(self.fail(format!(
                            "{doc}: deleted at version {version}, below an op acknowledged at seq {top:?}"
                        )));
                    }
                    self.say(|| format!("{doc} deleted at n{at}, at version {version}"));
                    self.deleted_generation(&doc);
                    return Ok(());
                }
                Ok(Err(DeleteError::Unavailable(e))) => {
                    // Told to retry: refused before anything was erased, so its journal
                    // and snapshot keys cannot all be gone (the test for "gone" of a
                    // failure, below). Its owner key may be: the refusal can be that
                    // its owner lost it, and the key may be claimed anew meanwhile.
                    let data = |keys: HashSet<(String, i64)>| -> HashSet<(String, i64)> {
                        keys.into_iter()
                            .filter(|(key, _)| *key != owner_key)
                            .collect()
                    };
                    let (existed, now) = (data(existed), data(self.stored(&doc)));
                    if !existed.is_empty() && existed.is_disjoint(&now) {
                        return Err(self.fail(format!(
                            "{doc}: deleting it at n{at} was refused as unavailable ({e}), yet \
                             none of its keys is left"
                        )));
                    }
                    self.stats.deletions_retry += 1;
                    self.say(|| format!("{doc}: deleting it at n{at}: told to retry: {e}"));
                    return Ok(());
                }
                Ok(Err(DeleteError::Failed(e))) => {
                    // Erased in one txn whose answer was lost: none of the keys it held
                    // is left as it was (it may be claimed and written anew meanwhile,
                    // but under keys written later). Not erased: its journal keys are
                    // left as they were, and its owner key unless the lease ran out.
                    // (Whether the store holds it now is no test: the deletion returns on
                    // a task of its own, and a client's Open may claim it again first.)
                    // Gone, it must have been that lost answer, of a txn that deleted its
                    // owner key (as the erasure's does): a deletion that erased the
                    // document and said it failed otherwise (or keys lost by another
                    // path while it failed) would pass here for a lost answer, of its own
                    // or of any other txn.
                    let now = self.stored(&doc);
                    let gone = !existed.is_empty() && existed.is_disjoint(&now);
                    if gone && self.store.deleted_unanswered(&owner_key) == erased_unanswered {
                        return Err(self.fail(format!(
                            "{doc}: deleting it at n{at} failed ({e}), yet none of its keys is \
                             left, and no txn that deleted its owner key lost its answer \
                             meanwhile"
                        )));
                    }
                    if gone {
                        self.stats.deletions_unknown += 1;
                        self.say(|| {
                            format!("{doc}: deleting it at n{at} failed ({e}), and it is gone")
                        });
                        self.deleted_generation(&doc);
                    } else {
                        self.stats.deletions_failed += 1;
                        self.say(|| format!("{doc}: deleting it at n{at} failed: {e}"));
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// `doc` was deleted: what was acknowledged of it is of a deleted generation, and
    /// its clients are stale.
    fn deleted_generation(&mut self, doc: &str) {
        self.stats.deletions += 1;
        if let Some((_, by_seq)) = self.acked.remove(doc) {
            self.deleted
                .entry(doc.to_owned())
                .or_default()
                .extend(by_seq);
        }
        for (a, app) in self.apps.iter().enumerate() {
            if app.doc == doc {
                self.stale.insert(a);
                let unacked = self.unacked.get(&a).into_iter().flatten();
                self.resendable.extend(unacked.copied());
            }
        }
        self.digest = self.digest.rotate_left(7) ^ 0xde1e7e;
    }

    async fn run(&mut self, steps: u64) -> Result<(), Failure> {
        START.with(|s| s.set(Some(tokio::time::Instant::now())));
        QUIET.with(|q| q.set(false));
        let clock = tokio::spawn(store_clock(self.store.clone()));
        let outcome = self.run_steps(steps).await;
        clock.abort();
        self.elapsed = tokio::time::Instant::now().duration_since(start_of_time());
        outcome
    }

    async fn run_steps(&mut self, steps: u64) -> Result<(), Failure> {
        for i in 0..NODES {
            self.start_node(i)?;
        }
        for a in 0..self.apps.len() {
            self.apps[a].start().await.map_err(|e| self.fail(e))?;
        }
        for step in 1..=steps {
            self.step = step;
            self.act().await?;
            let pause = Duration::from_millis(1 + self.rng.below(30));
            tokio::time::sleep(pause).await;
            self.observe()?;
            self.watch_owners();
            if step % 25 == 0 {
                self.check_journal()?;
            }
        }
        self.heal().await
    }

    /// Faults stop: every node runs, every client is online and running, and settles.
    async fn heal(&mut self) -> Result<(), Failure> {
        self.step += 1;
        self.say(|| "healing".into());
        for a in std::mem::take(&mut self.stale) {
            self.apps[a].forget().await;
        }
        for i in 0..NODES {
            if let Some(r) = &mut self.nodes[i] {
                r.paused.store(false, Ordering::SeqCst);
                r.frozen = false;
                r.cut.store(false, Ordering::SeqCst);
                for a in &self.apps {
                    a.net.set_frozen(&addr(i), false);
                }
            }
        }
        for a in 0..self.apps.len() {
            self.apps[a].net.set_up(true);
            self.end_silence(a);
        }
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            for i in 0..NODES {
                if self.nodes[i].is_none() {
                    self.start_node(i)?;
                }
            }
            for a in 0..self.apps.len() {
                if self.apps[a].client.is_none() {
                    self.apps[a].start().await.map_err(|e| self.fail(e))?;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.observe()?;
            if self.settled()? {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let state: Vec<String> = self
                    .apps
                    .iter()
                    .map(|a| {
                        let h = a.handle.as_ref();
                        format!(
                            "{} ({}): unacked {:?}, text {:?}",
                            a.name,
                            a.doc,
                            h.map(|h| h.unacked()),
                            h.map(|h| h.text())
                        )
                    })
                    .collect();
                return Err(self.fail(format!(
                    "no convergence {SETTLE:?} after the faults stopped: {}",
                    state.join("; ")
                )));
            }
        }
        self.check_journal()?;
        for doc in self.docs.clone() {
            let (stored, version) = self.stored_text(&doc)?;
            for a in self.apps.iter().filter(|a| a.doc == doc) {
                let text = a.handle.as_ref().map(|h| h.text()).unwrap_or_default();
                if text != stored {
                    return Err(self.fail(format!(
                        "{doc}: {} has {text:?}; the store has {stored:?} (version {version})",
                        a.name
                    )));
                }
                a.check_edits(&stored, self.reloaded.contains(&doc))
                    .map_err(|e| self.fail(e))?;
            }
        }
        self.check_connections_closed().await
    }

    /// Once the nodes' handshake, idle and write deadlines have passed (and the
    /// clients' timeout), each node serves just the connections the clients hold
    /// (they ping them): every one left silently (found dead, its node stopped, its
    /// client restarted or moved on) was closed.
    async fn check_connections_closed(&mut self) -> Result<(), Failure> {
        let config = &self.server_config;
        let deadlines = config.handshake_timeout + config.idle_timeout + config.write_timeout;
        QUIET.with(|q| q.set(true));
        tokio::time::sleep(deadlines + Duration::from_secs(1)).await;
        for n in 0..NODES {
            let Some(running) = &self.nodes[n] else {
                continue;
            };
            let open = running.server.open_connections();
            let held: usize = self.apps.iter().map(|a| a.net.held(&addr(n))).sum();
            self.say(|| format!("n{n} serves {open} connections; the clients hold {held}"));
            if open != held {
                return Err(self.fail(format!(
                    "n{n} serves {open} connections {deadlines:?} after the clients \
                     settled; they hold {held} to it"
                )));
            }
        }
        Ok(())
    }

    /// An application client's silent network speaks again: its connections go on, or
    /// stay silent for ever (the client's and the nodes' deadlines must close them).
    fn end_silence(&mut self, a: usize) {
        if self.apps[a].net.is_silent() {
            let resume = self.rng.below(2) == 0;
            if !resume {
                self.stats.black_holes += 1;
            }
            self.say(|| {
                format!(
                    "app{a}'s network speaks again; its connections {}",
                    if resume { "go on" } else { "stay silent" }
                )
            });
            self.apps[a].net.speak(resume);
        }
    }

    /// Every client has nothing unacknowledged, and the clients of each document have
    /// the text the store has.
    fn settled(&self) -> Result<bool, Failure> {
        if self.nodes.iter().any(Option::is_none) {
            return Ok(false);
        }
        for a in &self.apps {
            let Some(h) = &a.handle else { return Ok(false) };
            if !h.unacked().is_empty() {
                return Ok(false);
            }
        }
        for doc in &self.docs {
            let (stored, _) = self.stored_text(doc)?;
            if self
                .apps
                .iter()
                .filter(|a| &a.doc == doc)
                .any(|a| a.handle.as_ref().map(|h| h.text()) != Some(stored.clone()))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A node's commit loop, keep-alive and disk, as its threads would run them (the
/// replicator's and the log's `Manual` drive): nothing while it is paused.
async fn drive(seq: Arc<Seq>, paused: Arc<AtomicBool>, renew_every: Duration, mut rng: SplitMix) {
    let start = tokio::time::Instant::now();
    let (mut next_renew, mut next_rebalance) =
        (start + renew_every, start + Duration::from_secs(1));
    loop {
        let pause = if QUIET.with(|q| q.get()) {
            Duration::from_millis(100)
        } else {
            Duration::from_micros(200 + rng.below(3_000))
        };
        tokio::time::sleep(pause).await;
        if paused.load(Ordering::SeqCst) {
            continue;
        }
        let local = seq.local();
        while local.wal().has_pending() {
            local.step();
        }
        seq.replicator().commit_next();
        seq.handle_losses();
        seq.write_snapshots();
        let now = tokio::time::Instant::now();
        if now >= next_renew {
            seq.replicator().renew();
            seq.handle_losses();
            next_renew = now + renew_every;
        }
        if now >= next_rebalance {
            seq.rebalance();
            next_rebalance = now + Duration::from_secs(1);
        }
    }
}

/// The store's clock follows the simulated time (leases expire by it).
async fn store_clock(store: Arc<MemStore>) {
    let start = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = start.elapsed();
        let behind = now.saturating_sub(store.now());
        store.advance(behind);
    }
}

thread_local! {
    /// Set for the quiet wait at the end (nothing is edited; pings still go on): the
    /// nodes' drive tasks step every 100 ms, not every few, which would be most of the
    /// run's time.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// When the run began, in simulated time.
    static START: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
}

fn start_of_time() -> tokio::time::Instant {
    START
        .with(|s| s.get())
        .unwrap_or_else(tokio::time::Instant::now)
}

/// Runs one cluster seed: its digest and stats line, or the failure.
pub fn run_seed(seed: u64, steps: u64, verbose: bool) -> Result<(u64, String), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    *PANICKED.lock().unwrap() = None;
    let mut world = World::new(seed, verbose);
    let outcome = rt.block_on(world.run(steps));
    let s = &world.stats;
    let line = format!(
        "{} app clients ({} over WebSocket), {} docs, {:?} simulated: {} edits, {} acks, {} node crashes ({} with their machine), {} restarts ({} refused while the old lease lived), {} pauses ({} of the whole process), {} cut off from the store, {} drains, {} store faults, {} owner changes, {} client restarts, {} reopens, {} times offline, {} silent networks ({} of them for ever), {} deletions ({} asked of another node, {} told to retry, {} failed, {} failed yet done, {} acks seen after), {} journal checks",
        world.apps.len(),
        world.apps.iter().filter(|a| a.net.is_websocket()).count(),
        world.docs.len(),
        world.elapsed,
        s.edits,
        s.acks,
        s.crashes,
        s.machines_lost,
        s.restarts,
        s.refused_restarts,
        s.pauses,
        s.freezes,
        s.cuts,
        s.drains,
        s.store_faults,
        s.owner_changes,
        s.app_restarts,
        s.app_reopens,
        s.offline,
        s.silences,
        s.black_holes,
        s.deletions,
        s.deletions_elsewhere,
        s.deletions_retry,
        s.deletions_failed,
        s.deletions_unknown,
        s.acks_of_deleted,
        s.journal_checks
    );
    let digest = world.digest ^ world.step;
    drop(world);
    drop(rt);
    outcome.map(|()| (digest, line))
}
