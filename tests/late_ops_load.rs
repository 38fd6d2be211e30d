//! Load that mixes what broke the serving layer before: many clients on a few documents,
//! clients that lag behind (their ops arrive late, made on old versions, and are
//! transformed over ops still in memory, ops not yet durable, and ops read back from
//! the log after a restart), server restarts mid-run with ops in flight (resent under
//! the same op ids, recognised by their fingerprints), and snapshots. After every round
//! each client settles and must hold the server's text; nothing it edited is left
//! unacknowledged. Seeded: a failure names its seed.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::{open, start_with_store, store_config, wait_for_version, Opened, Running};
use quire::client::{ConnectionState, Event, Events};
use quire::op::Patch;
use quire::sequencer::local::LocalConfig;
use quire::sequencer::Sequencer;
use quire::server::ServerConfig;
use quire::wal::vfs::sim::SplitMix;

const DOCS: usize = 3;
const CLIENTS: usize = 9;
const ROUNDS: usize = 5;
const STEPS_PER_ROUND: usize = 3000;
const ALPHABET: [&str; 5] = ["a", "b", "\u{1F600}", "é", " "];

fn config() -> LocalConfig {
    LocalConfig {
        snapshot_every_ops: 40,
        ..store_config()
    }
}

async fn start(dir: &Path) -> Running {
    let server = ServerConfig {
        // A small window: lagging clients' ops often miss ops that must be read back
        // from the log, and ops not yet durable beside them.
        history_window: 8,
        ..ServerConfig::default()
    };
    start_with_store(dir, config(), server).await
}

struct Replica {
    doc: Opened,
    events: Events,
    /// This client reads nothing the server sends for a while (its link holds it): its
    /// ops are made on an old version and arrive late.
    lagging: bool,
    /// The local seqs of the ops carrying its edits, and those acknowledged.
    sent: HashSet<u64>,
    acked: HashSet<u64>,
    /// Times its client connected again.
    reconnects: usize,
}

impl Replica {
    fn lag(&mut self, lagging: bool) {
        self.lagging = lagging;
        self.doc.link.hold(lagging);
    }

    async fn edit(&mut self, seed: u64, make: impl FnOnce(&str) -> Patch) {
        let local_seq = self
            .doc
            .edit_with(|view| vec![make(&view.text())])
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: edit: {e}"));
        // (An edit that changes nothing, made before any op, is carried by none.)
        if local_seq > 0 {
            self.sent.insert(local_seq);
        }
    }

    /// Notes an event: an ack, a reconnect; a reload fails the test (the server lost
    /// the ops this client missed).
    fn note(&mut self, event: Event, seed: u64, i: usize) {
        match event {
            Event::Acked { local_seq, .. } => {
                self.acked.insert(local_seq);
            }
            Event::Connection(ConnectionState::Connected) => self.reconnects += 1,
            Event::Reloaded { .. } => panic!("seed {seed}: client {i} was reloaded"),
            _ => {}
        }
    }

    /// Takes the events so far.
    fn take_events(&mut self, seed: u64, i: usize) {
        while let Some(event) = self.events.try_recv() {
            self.note(event, seed, i);
        }
    }

    /// Waits until the client has connected again `n` times in all.
    async fn reconnected(&mut self, n: usize, seed: u64, i: usize) {
        while self.reconnects < n {
            let event = self.events.recv().await.expect("the client runs");
            self.note(event, seed, i);
        }
    }
}

async fn run(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = SplitMix(seed);
    let mut server = start(tmp.path()).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let doc = open(server.addr, &format!("doc{}", i % DOCS)).await;
        clients.push(Replica {
            events: doc.events(),
            doc,
            lagging: false,
            sent: HashSet::new(),
            acked: HashSet::new(),
            reconnects: 0,
        });
    }
    // Every client starts at version 1 or more: a catch-up from version 0 is a snapshot,
    // which a client with pending edits takes by reloading.
    for c in clients.iter_mut().take(DOCS) {
        c.edit(seed, |_| Patch::new(0, 0, "start ")).await;
        c.doc.settle().await;
    }
    for c in &clients {
        wait_for_version(&c.doc, 1).await;
    }
    let mut late_ops = 0u64;
    for round in 0..ROUNDS {
        for _ in 0..STEPS_PER_ROUND {
            let c = &mut clients[rng.below(CLIENTS as u64) as usize];
            match rng.below(10) {
                0..=4 => {
                    if c.lagging {
                        late_ops += 1;
                    }
                    let rng = &mut rng;
                    c.edit(seed, |text| {
                        let len = text.chars().count() as u32;
                        let pos = rng.below(u64::from(len) + 1) as u32;
                        let del = (rng.below(3) as u32).min(len - pos);
                        let ins: String = (0..rng.below(4))
                            .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
                            .collect();
                        Patch::new(pos, del, ins)
                    })
                    .await;
                }
                5 => {
                    let lagging = rng.below(3) == 0;
                    c.lag(lagging);
                }
                // A client that reads waits for the acks of its pending edits
                // (its task applies whatever arrives by itself).
                _ if !c.lagging => c
                    .doc
                    .synced()
                    .await
                    .unwrap_or_else(|e| panic!("seed {seed}: read: {e}")),
                _ => {}
            }
        }
        // A restart with whatever is in flight; every client reconnects (to the new
        // address), reopens its document and resends under the same op ids.
        server.stop().await;
        server = start(tmp.path()).await;
        for c in clients.iter_mut() {
            c.doc.link.point_at(server.addr);
            c.lag(false);
        }
        // Settle and compare every replica with the server.
        for (i, c) in clients.iter_mut().enumerate() {
            c.reconnected(round + 1, seed, i).await;
            c.doc
                .synced()
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: settle: {e}"));
        }
        let mut versions = HashMap::new();
        for d in 0..DOCS {
            let name = format!("doc{d}");
            let view = server.store.read(&name).await.unwrap().unwrap_or_default();
            versions.insert(name, view);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let view = &versions[c.doc.name()];
            wait_for_version(&c.doc, view.version).await;
            assert!(
                c.doc.is_synced(),
                "seed {seed}: client {i} has unacked edits"
            );
            assert_eq!(
                c.doc.text(),
                view.text,
                "seed {seed} round {round}: client {i} diverged from the server"
            );
            // Nothing the server sent made it reconnect but the restarts (a connection
            // to the server as it stopped got no Welcome: not counted); every op was
            // acknowledged under the id it was first sent with (none refused and sent
            // again as a new op), and none was reloaded.
            c.take_events(seed, i);
            assert_eq!(
                c.reconnects,
                round + 1,
                "seed {seed} round {round}: client {i} reconnected"
            );
            let unacked: Vec<_> = c.sent.difference(&c.acked).collect();
            assert!(
                unacked.is_empty(),
                "seed {seed} round {round}: client {i}: ops never acked {unacked:?}"
            );
        }
    }
    assert!(late_ops > 100, "the run made few late ops ({late_ops})");
    let mut sequenced = 0;
    for d in 0..DOCS {
        sequenced += server.store.version(&format!("doc{d}"));
    }
    eprintln!("seed {seed}: {late_ops} edits made while lagging, {sequenced} ops sequenced");
    assert!(sequenced > 1000, "the run sequenced few ops ({sequenced})");
    for c in clients {
        c.doc.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_clients_and_restarts_converge_with_every_edit_acknowledged() {
    for seed in 1..=6 {
        run(seed).await;
    }
}
