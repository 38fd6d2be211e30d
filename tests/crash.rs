//! Crash test with a real process: a child appends ops and prints each ack (after it is
//! durable); the parent kills it with SIGKILL at a random moment, reopens the data
//! directory, and checks that every acked op is present exactly once, in order, at the
//! seq it was acked with. The child also snapshots and truncates as it goes, so kills
//! land in those paths too. 100 cycles on one directory (QUIRE_CRASH_CYCLES to change).
//!
//! `harness = false`: this file's `main` is both the test and, re-executed with
//! QUIRE_CRASH_CHILD set, the child.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{Sequencer, SubmitError, SubmitOp, Submitted};
use quire::wal::vfs::sim::SplitMix;
use quire::wal::WalConfig;

const TASKS: u64 = 8;
const DOCS: u64 = 3;

fn config(maintenance: bool) -> LocalConfig {
    LocalConfig {
        wal: WalConfig {
            segment_size: 256 * 1024,
            ..WalConfig::default()
        },
        snapshot_every_ops: 150,
        snapshot_every: Duration::from_millis(50),
        retention: Duration::ZERO,
        maintenance_interval: if maintenance {
            Duration::from_millis(5)
        } else {
            Duration::from_secs(3600)
        },
    }
}

fn marker(client: u64, local: u64) -> String {
    format!("[{client}:{local}]")
}

fn child(dir: &Path, cycle: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let (store, _) = LocalSequencer::open(dir, config(true)).expect("child open");
    let store = Arc::new(store);
    rt.block_on(async {
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let doc = format!("doc{}", task % DOCS);
                let client = cycle * 100 + task;
                let mut version = store.read(&doc).await.unwrap().map_or(0, |v| v.version);
                for local in 1.. {
                    let op = SubmitOp {
                        op_id: OpId {
                            client_id: client,
                            local_seq: local,
                        },
                        base_version: version,
                        expected_version: version,
                        expected_incarnation: None,
                        fingerprint: 0,
                        patches: vec![Patch::new(0, 0, marker(client, local))],
                    };
                    let (seq, ticket) = loop {
                        let attempt = SubmitOp {
                            expected_version: version,
                            expected_incarnation: None,
                            fingerprint: 0,
                            ..op.clone()
                        };
                        match store.submit(&doc, &attempt) {
                            Ok(Submitted::Applied { seq, ticket }) => break (seq, ticket),
                            Err(SubmitError::VersionMismatch { actual, .. }) => version = actual,
                            other => panic!("unexpected {other:?}"),
                        }
                    };
                    version = seq;
                    store.wait_durable(ticket).await.expect("durable");
                    {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {doc} {seq} {client} {local}").unwrap();
                        out.flush().unwrap();
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

struct Ack {
    doc: String,
    seq: u64,
    client: u64,
    local: u64,
}

fn parse(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ACK ")?.split(' ');
    Some(Ack {
        doc: parts.next()?.to_owned(),
        seq: parts.next()?.parse().ok()?,
        client: parts.next()?.parse().ok()?,
        local: parts.next()?.parse().ok()?,
    })
}

/// Every acked op is in the recovered document exactly once, at its seq, and each
/// client's ops are in order. Ops insert their marker at position 0, so the text is the
/// markers in descending seq order.
fn verify(dir: &Path, acks: &[Ack], rt: &tokio::runtime::Runtime) -> usize {
    let (store, _) = LocalSequencer::open(dir, config(false))
        .unwrap_or_else(|e| panic!("recovery after SIGKILL failed: {e}"));
    let mut checked = 0;
    for d in 0..DOCS {
        let doc = format!("doc{d}");
        let Some(view) = rt.block_on(store.read(&doc)).expect("the log works") else {
            assert!(acks.iter().all(|a| a.doc != doc), "{doc} lost entirely");
            continue;
        };
        let markers: Vec<&str> = view.text.split_inclusive(']').collect();
        assert_eq!(
            markers.len() as u64,
            view.version,
            "{doc}: one marker per op"
        );
        let mut position: HashMap<&str, usize> = HashMap::new();
        for (i, m) in markers.iter().enumerate() {
            assert!(
                position.insert(m, i).is_none(),
                "{doc}: op {m} applied twice"
            );
        }
        let mut last_local: HashMap<u64, u64> = HashMap::new();
        for (i, m) in markers.iter().enumerate().rev() {
            let inner = m.trim_start_matches('[').trim_end_matches(']');
            let (c, l) = inner.split_once(':').expect("marker");
            let (c, l): (u64, u64) = (c.parse().unwrap(), l.parse().unwrap());
            let prev = last_local.insert(c, l).unwrap_or(0);
            assert!(l > prev, "{doc}: client {c} op {l} after {prev} (at {i})");
        }
        for ack in acks.iter().filter(|a| a.doc == doc) {
            let m = marker(ack.client, ack.local);
            let at = position
                .get(m.as_str())
                .unwrap_or_else(|| panic!("{doc}: acked op {m} (seq {}) lost", ack.seq));
            assert_eq!(
                view.version - *at as u64,
                ack.seq,
                "{doc}: acked op {m} is not at its acked seq"
            );
            checked += 1;
        }
    }
    checked
}

fn main() {
    if let Ok(dir) = std::env::var("QUIRE_CRASH_CHILD") {
        let cycle = std::env::var("QUIRE_CRASH_CYCLE").unwrap().parse().unwrap();
        child(Path::new(&dir), cycle);
        return;
    }
    let cycles: u64 = std::env::var("QUIRE_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut rng = SplitMix(0x5eed);
    let mut acks: Vec<Ack> = Vec::new();
    let mut passed = 0;
    for cycle in 1..=cycles {
        let mut child = Command::new(&exe)
            .env("QUIRE_CRASH_CHILD", &dir)
            .env("QUIRE_CRASH_CYCLE", cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of acks (0: at a random moment of startup).
        let kill_after = rng.below(400);
        let mut seen = 0;
        if kill_after == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        } else {
            while seen < kill_after {
                match rx.recv_timeout(Duration::from_secs(20)) {
                    Ok(line) => {
                        if let Some(ack) = parse(&line) {
                            acks.push(ack);
                        }
                        seen += 1;
                    }
                    Err(_) => panic!("cycle {cycle}: child produced no ack in 20 s"),
                }
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Lines printed before the kill were acks too.
        acks.extend(rx.try_iter().filter_map(|l| parse(&l)));
        let checked = verify(&dir, &acks, &rt);
        assert_eq!(checked, acks.len());
        passed += 1;
    }
    println!(
        "crash: {cycles} SIGKILL cycles, {} acked ops all recovered exactly once, in order",
        acks.len()
    );
    println!("{passed} passed, 0 failed");
}
