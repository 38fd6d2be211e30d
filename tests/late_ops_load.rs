//! Load that mixes what broke the serving layer before: many clients on a few documents,
//! clients that lag behind (their ops arrive late, made on old versions, and are
//! transformed over ops still in memory, ops not yet durable, and ops read back from
//! the log after a restart), server restarts mid-run with ops in flight (resent under
//! the same op ids, recognised by their fingerprints), and snapshots. After every round
//! each client settles and must hold the server's text; nothing it edited is left
//! unacknowledged. Seeded: a failure names its seed.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{open, start_with_store, store_config, Running};
use quire::client::connection::{Connection, SyncedDoc};
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

struct Client {
    doc: SyncedDoc,
    /// This client does not read what the server sends for a while: its ops are made on
    /// an old version and arrive late.
    lagging: bool,
}

async fn run(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = SplitMix(seed);
    let mut server = start(tmp.path()).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let doc = open(server.addr, 1000 + i as u64, &format!("doc{}", i % DOCS)).await;
        clients.push(Client {
            doc: doc.ignore_events(),
            lagging: false,
        });
    }
    // Every client starts at version 1 or more: a catch-up from version 0 is a snapshot,
    // which this client resumes from only by reloading.
    for c in clients.iter_mut().take(DOCS) {
        c.doc.edit(&[Patch::new(0, 0, "start ")]).await.unwrap();
        c.doc.settle().await.unwrap();
    }
    for c in clients.iter_mut() {
        while c.doc.doc.version() == 0 {
            c.doc.pump().await.unwrap();
        }
    }
    let mut late_ops = 0u64;
    for round in 0..ROUNDS {
        for _ in 0..STEPS_PER_ROUND {
            let c = &mut clients[rng.below(CLIENTS as u64) as usize];
            match rng.below(10) {
                0..=4 => {
                    let len = c.doc.doc.len_chars();
                    let pos = rng.below(u64::from(len) + 1) as u32;
                    let del = (rng.below(3) as u32).min(len - pos);
                    let ins: String = (0..rng.below(4))
                        .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
                        .collect();
                    if c.lagging {
                        late_ops += 1;
                    }
                    c.doc
                        .edit(&[Patch::new(pos, del, ins)])
                        .await
                        .unwrap_or_else(|e| panic!("seed {seed}: edit: {e}"));
                }
                5 => c.lagging = rng.below(3) == 0,
                // A client that reads waits for its op's ack when one is in flight.
                _ if !c.lagging => {
                    let read = if c.doc.doc.in_flight().is_some() {
                        c.doc.pump().await
                    } else {
                        c.doc.poll().await
                    };
                    read.unwrap_or_else(|e| panic!("seed {seed}: read: {e}"));
                }
                _ => {}
            }
        }
        // A restart with whatever is in flight; every client reconnects and resends.
        server.stop().await;
        server = start(tmp.path()).await;
        for (i, c) in clients.iter_mut().enumerate() {
            let conn = Connection::connect(server.addr, 1000 + i as u64, "")
                .await
                .unwrap();
            c.doc
                .resume(conn)
                .await
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: resume: {e}"));
            c.lagging = false;
        }
        // Settle and compare every replica with the server.
        for c in clients.iter_mut() {
            c.doc
                .settle()
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
            let view = &versions[&c.doc.name];
            while c.doc.doc.version() < view.version {
                c.doc.pump().await.unwrap();
            }
            assert!(
                !c.doc.doc.has_pending(),
                "seed {seed}: client {i} has unacked edits"
            );
            assert_eq!(
                c.doc.doc.text(),
                view.text,
                "seed {seed} round {round}: client {i} diverged from the server"
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
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_clients_and_restarts_converge_with_every_edit_acknowledged() {
    for seed in 1..=6 {
        run(seed).await;
    }
}
