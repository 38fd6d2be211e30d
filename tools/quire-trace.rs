//! quire-trace: drive a running quire server with an editing trace and measure it.
//!
//! ```text
//! quire-trace --addr 127.0.0.1:7420 --trace FILE [--mode concurrent|sequential|shared|each]
//!             [--clients N] [--compose | --pipeline N] [--patches N] [--doc NAME]
//! ```
//! FILE is a trace in the editing-traces format, gzipped or not (told by its content).
//! - `concurrent`: a concurrent trace, one emulated client per agent, each txn made on
//!   exactly its parent version; a txn no client can make there (a long-lived branch) is
//!   counted per agent and made on its client's version, rebased; every client and the
//!   server's copy must converge, and the text is compared with the trace's endContent.
//! - `sequential`: every patch of the trace through one client.
//! - `shared`: patches dealt round-robin over N clients on one document (positions
//!   clamped to each client's copy, as the ShareDB peer benchmark does).
//! - `each`: each client on its own document replays the first 1/N of the patches
//!   exactly (the ShareDB peer's "many" mode).
//!
//! Without `--compose` a client keeps one op in flight and sends each patch as its own
//! op after the previous ack (the ShareDB peer's shape); with it, patches made while an
//! op is in flight are composed into the next op. `--pipeline N` sends each patch as its
//! own op with up to N in flight (a document per client only). Prints ops/s, ack latency
//! p50/p99/p99.9 over every op sent (n: how many; with `--compose` or `--pipeline`, from
//! the op's send to its ack), and the final length and sha256 of every document, read
//! back from the server by a fresh client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use quire::client::connection::{Connection, Event, SyncedDoc};
use quire::op::Patch;
use quire::trace::{load, replay_concurrent, sha256_hex};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Concurrent,
    Sequential,
    Shared,
    Each,
    /// No trace: Ping round trips through one connection (the server's floor without
    /// the disk), as many as `--patches` (default 20,000).
    Ping,
}

#[derive(Parser)]
#[command(
    name = "quire-trace",
    about = "Replay an editing trace against a quire server"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7420")]
    addr: SocketAddr,
    /// The trace file, `.json` or `.json.gz` (every mode but `ping`).
    #[arg(long)]
    trace: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "sequential")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long)]
    compose: bool,
    /// Keep up to N ops in flight per client without waiting for acks (modes
    /// `sequential` and `each` only: a document with one writer, see "Pipelining" in
    /// protocol.md).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Use only the first N patches.
    #[arg(long)]
    patches: Option<usize>,
    /// Document name (prefix, in `each` mode).
    #[arg(long, default_value = "trace")]
    doc: String,
    #[arg(long, default_value = "", env = "QUIRE_TOKEN")]
    token: String,
    /// First client id used (ids must be unique per run on a server).
    #[arg(long, default_value_t = 1_000_000)]
    client_base: u64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")
}

/// `patch` clamped to a text of `len` code points (as the ShareDB peer does); `None` if
/// nothing is left of it (the peer skips those too).
fn clamp(patch: Patch, len: u32) -> Option<Patch> {
    let pos = patch.pos.min(len);
    let del = patch.del.min(len - pos);
    (del > 0 || !patch.ins.is_empty()).then(|| Patch::new(pos, del, patch.ins))
}

/// One client replaying its share of patches, timing every op it sends from its send to
/// its ack (µs, one sample per op). With `compose`, the patches made while an op is in
/// flight are composed into the next op (one in flight); without, each patch is its own
/// op with up to `depth` in flight.
async fn drive_timed(
    mut doc: SyncedDoc,
    patches: Vec<Patch>,
    compose: bool,
    depth: usize,
) -> Result<(Histogram<u64>, u64, SyncedDoc), String> {
    let mut hist = new_hist();
    let e = |e: quire::client::connection::ClientError| e.to_string();
    if !compose {
        doc.doc = doc.doc.clone().without_composing().pipelined(depth);
    }
    let mut sent_at = std::collections::HashMap::new();
    // After each call that can receive or send: the acks it received, then the ops it
    // sent (an op is never acked by the call that sent it).
    let mut record = |doc: &mut SyncedDoc,
                      sent_at: &mut std::collections::HashMap<u64, Instant>| {
        let now = Instant::now();
        for event in doc.take_events() {
            if let Event::Acked { local_seq, .. } = event {
                if let Some(t) = sent_at.remove(&local_seq) {
                    hist.record((now.duration_since(t).as_micros() as u64).max(1))
                        .ok();
                }
            }
        }
        for out in doc.doc.all_in_flight() {
            sent_at.entry(out.local_seq).or_insert(now);
        }
    };
    for patch in patches {
        while !compose && doc.doc.all_in_flight().count() >= depth {
            doc.pump().await.map_err(e)?;
            record(&mut doc, &mut sent_at);
        }
        let Some(clamped) = clamp(patch, doc.doc.len_chars()) else {
            continue;
        };
        doc.edit(&[clamped]).await.map_err(e)?;
        record(&mut doc, &mut sent_at);
        doc.poll().await.map_err(e)?;
        record(&mut doc, &mut sent_at);
    }
    while doc.doc.has_pending() {
        doc.pump().await.map_err(e)?;
        record(&mut doc, &mut sent_at);
    }
    Ok((hist, doc.ops_sent, doc))
}

/// One client replaying its share of patches, each its own op sent after the previous
/// ack; returns its ack latencies (µs, from the edit to its ack).
async fn drive(
    mut doc: SyncedDoc,
    patches: Vec<Patch>,
) -> Result<(Histogram<u64>, u64, SyncedDoc), String> {
    let mut hist = new_hist();
    let e = |e: quire::client::connection::ClientError| e.to_string();
    for patch in patches {
        let Some(clamped) = clamp(patch, doc.doc.len_chars()) else {
            continue;
        };
        let t = Instant::now();
        doc.edit(&[clamped]).await.map_err(e)?;
        doc.settle().await.map_err(e)?;
        hist.record((t.elapsed().as_micros() as u64).max(1)).ok();
    }
    Ok((hist, doc.ops_sent, doc))
}

async fn read_back(
    addr: SocketAddr,
    token: &str,
    client: u64,
    doc: &str,
) -> Result<String, String> {
    let conn = Connection::connect(addr, client, token)
        .await
        .map_err(|e| e.to_string())?;
    let synced = SyncedDoc::open(conn, doc, 1)
        .await
        .map_err(|e| e.to_string())?;
    Ok(synced.doc.text().to_owned())
}

async fn run(args: Args) -> Result<(), String> {
    if args.pipeline > 1 && !matches!(args.mode, Mode::Sequential | Mode::Each) {
        return Err(
            "--pipeline needs a document per client (--mode sequential or each): \
                    pipelined ops on a shared document conflict (protocol.md, Pipelining)"
                .into(),
        );
    }
    if args.pipeline > 1 && args.compose {
        return Err("--pipeline sends every patch as its own op; drop --compose".into());
    }
    let trace = match (&args.trace, args.mode) {
        (_, Mode::Ping) => quire::trace::Trace::default(),
        (Some(path), _) => load(path)?,
        (None, _) => return Err("--trace FILE is needed for this mode".into()),
    };
    let mut started = Instant::now();
    let mut finished: Option<Instant> = None;
    let mut docs: Vec<String> = Vec::new();
    let (ops, hist, note) = if args.mode == Mode::Ping {
        let mut conn = Connection::connect(args.addr, args.client_base, &args.token)
            .await
            .map_err(|e| e.to_string())?;
        let mut hist = new_hist();
        let n = args.patches.unwrap_or(20_000) as u64;
        for nonce in 0..n {
            let t = Instant::now();
            conn.send(quire::protocol::message::Message::Ping { nonce })
                .await
                .map_err(|e| e.to_string())?;
            conn.recv().await.map_err(|e| e.to_string())?;
            hist.record((t.elapsed().as_micros() as u64).max(1)).ok();
        }
        (n, hist, String::new())
    } else if args.mode == Mode::Concurrent {
        let report = replay_concurrent(args.addr, &args.token, &trace, &args.doc, args.client_base)
            .await
            .map_err(|e| e.to_string())?;
        docs.push(args.doc.clone());
        let mut hist = new_hist();
        for us in &report.ack_us {
            hist.record((*us).max(1)).ok();
        }
        let by_agent: Vec<String> = report
            .unreachable_by_agent
            .iter()
            .enumerate()
            .filter(|(_, &k)| k > 0)
            .map(|(a, k)| format!("agent {a}: {k}"))
            .collect();
        let end = if trace.end_content.is_empty() {
            "no endContent"
        } else if trace.end_content == report.text {
            "endContent matches"
        } else {
            "endContent DIFFERS"
        };
        (
            report.ops,
            hist,
            format!(
                "unreachable txns: {}{}; replicas converged: {} (every client and the server); {end}",
                report.unreachable,
                if by_agent.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", by_agent.join(", "))
                },
                report.replicas,
            ),
        )
    } else {
        let mut patches: Vec<Patch> = trace.txns.into_iter().flat_map(|t| t.patches).collect();
        if let Some(n) = args.patches {
            patches.truncate(n);
        }
        let clients = if args.mode == Mode::Sequential {
            1
        } else {
            args.clients.max(1)
        };
        let shares: Vec<Vec<Patch>> = if args.mode == Mode::Each {
            // As the ShareDB peer's "many" mode: each client replays the first
            // 1/N of the patches exactly, on its own document.
            let per = patches.len() / clients;
            vec![patches[..per].to_vec(); clients]
        } else {
            let mut shares = vec![Vec::new(); clients];
            for (i, p) in patches.into_iter().enumerate() {
                shares[i % clients].push(p);
            }
            shares
        };
        // Connect and open every document first; the clock starts when all are ready.
        let mut opened = Vec::new();
        for (c, share) in shares.into_iter().enumerate() {
            let name = if args.mode == Mode::Each {
                format!("{}-{c}", args.doc)
            } else {
                args.doc.clone()
            };
            if !docs.contains(&name) {
                docs.push(name.clone());
            }
            let conn = Connection::connect(args.addr, args.client_base + c as u64, &args.token)
                .await
                .map_err(|e| e.to_string())?;
            let doc = SyncedDoc::open(conn, &name, 1)
                .await
                .map_err(|e| e.to_string())?;
            opened.push((doc, share));
        }
        started = Instant::now();
        let mut tasks = Vec::new();
        for (doc, share) in opened {
            if args.pipeline > 1 || args.compose {
                tasks.push(tokio::spawn(drive_timed(
                    doc,
                    share,
                    args.compose,
                    args.pipeline,
                )));
            } else {
                tasks.push(tokio::spawn(drive(doc.ignore_events(), share)));
            }
        }
        let mut hist = new_hist();
        let mut ops = 0;
        let mut replicas = Vec::new();
        for t in tasks {
            let (h, sent, doc) = t.await.map_err(|e| e.to_string())??;
            hist.add(h).ok();
            ops += sent;
            replicas.push(doc);
        }
        finished = Some(Instant::now());
        // Every client of a document must end with the same text, once each has
        // received the ops sequenced after its last ack.
        let newest = replicas.iter().map(|r| r.doc.version()).max().unwrap_or(0);
        let mut converged = 0;
        for name in &docs {
            let copies = replicas.iter_mut().filter(|r| &r.name == name);
            let newest = if args.mode == Mode::Shared { newest } else { 0 };
            let mut text: Option<String> = None;
            for r in copies {
                while r.doc.version() < newest {
                    r.pump().await.map_err(|e| e.to_string())?;
                }
                match &text {
                    None => text = Some(r.doc.text()),
                    Some(t) if *t == r.doc.text() => {}
                    Some(_) => return Err(format!("the replicas of {name} diverged")),
                }
                converged += 1;
            }
        }
        (ops, hist, format!("replicas converged: {converged}"))
    };
    let elapsed = finished
        .unwrap_or_else(Instant::now)
        .duration_since(started)
        .as_secs_f64();
    println!(
        "mode {} clients {} compose {} pipeline {}: {ops} ops in {elapsed:.3} s = {:.0} ops/s; ack latency p50 {} us p99 {} us p99.9 {} us (n={}) {note}",
        match args.mode {
            Mode::Concurrent => "concurrent",
            Mode::Sequential => "sequential",
            Mode::Shared => "shared",
            Mode::Each => "each",
            Mode::Ping => "ping",
        },
        args.clients,
        args.compose,
        args.pipeline,
        ops as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.len()
    );
    for (i, doc) in docs.iter().enumerate().take(64) {
        let text = read_back(
            args.addr,
            &args.token,
            args.client_base + 900_000 + i as u64,
            doc,
        )
        .await?;
        println!(
            "doc {doc}: {} chars sha256 {}",
            text.chars().count(),
            sha256_hex(&text)
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quire-trace: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
