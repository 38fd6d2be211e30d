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
//! Clients are `quire::client::Client`s (ids given by the server). Without `--compose` a
//! client makes each patch after the previous one's ack, so each is its own op (the
//! ShareDB peer's shape); with it, patches are made without waiting and the client
//! composes those made while an op is in flight into the next op. `--pipeline N` sends
//! each patch as its own op with up to N in flight (a document per client only; over a
//! bare connection with ids from `--client-base`, as `ping` and `concurrent` use: the
//! `Client` keeps one op in flight). Prints ops/s, ack latency p50/p99/p99.9 over every
//! op sent (n: how many; without `--compose` or `--pipeline`, from the edit to its ack;
//! with them, from the op's send to its ack: with `--compose`, the later of its first
//! edit and the previous op's ack, when the client sends it), and the final length and
//! sha256 of every document, read back from the server by a fresh client.
//!
//! `--ws URL` (`ws://127.0.0.1:7430/ws`, a server with `--http-listen`) makes the bare
//! connections (`ping`, `--pipeline`) WebSockets instead of TCP, to compare the two
//! transports on one server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use quire::client::connection::{self, ClientError as ConnError};
use quire::client::state::ClientDoc;
use quire::client::{Client, ClientConfig, ClientError, ConnectionState, DocHandle, Event, Events};
use quire::op::Patch;
use quire::protocol::message::Message;
use quire::trace::{load, read_back, replay_concurrent, sha256_hex};

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
    /// Keep up to N ops in flight per client without waiting for acks, over a bare
    /// protocol connection (modes `sequential` and `each` only: a document with one
    /// writer, see "Pipelining" in protocol.md). `--pipeline 1` is the bare connection
    /// with one op in flight, as a raw-protocol load generator (`redis-benchmark -P 1`)
    /// runs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pipeline: Option<u64>,
    /// Use only the first N patches.
    #[arg(long)]
    patches: Option<usize>,
    /// Document name (prefix, in `each` mode).
    #[arg(long, default_value = "trace")]
    doc: String,
    /// The access token to present (`quire token` mints one); empty for a server
    /// without a secret.
    #[arg(long, default_value = "", env = "QUIRE_TOKEN")]
    token: String,
    /// First client id used by bare connections (`ping`, `concurrent`, `--pipeline`;
    /// ids must be unique per run on a server).
    #[arg(long, default_value_t = 1_000_000)]
    client_base: u64,
    /// Runtime worker threads of this load generator. `--threads 1` is one event loop,
    /// as `redis-benchmark` runs by default: on a machine it shares with the server, the
    /// load generator then competes for one core's worth of CPU at most.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Bare connections (`ping`, `--pipeline`) over this WebSocket URL instead of TCP to
    /// `--addr` (`ws://127.0.0.1:7430/ws`).
    #[arg(long)]
    ws: Option<String>,
}

/// A bare protocol connection, over TCP or a WebSocket.
type Connection = connection::Connection<Box<dyn connection::Stream>>;

/// Connects a bare connection as `client_id` and completes the handshake.
async fn connect_bare(args: &Args, client_id: u64) -> Result<Connection, String> {
    let stream: Box<dyn connection::Stream> = match &args.ws {
        Some(url) => Box::new(
            quire::client::websocket::connect(url)
                .await
                .map_err(|e| format!("{url}: {e}"))?,
        ),
        None => {
            let tcp = tokio::net::TcpStream::connect(args.addr)
                .await
                .map_err(|e| format!("{}: {e}", args.addr))?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            Box::new(tcp)
        }
    };
    Connection::handshake(stream, client_id, &args.token)
        .await
        .map_err(|e: ConnError| e.to_string())
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

/// One client of the `Client` API on a document, with its event stream.
struct Replica {
    client: Client,
    doc: DocHandle,
    events: Events,
}

async fn open_replica(addr: SocketAddr, token: &str, name: &str) -> Result<Replica, String> {
    let e = |e: ClientError| e.to_string();
    let client = Client::connect(ClientConfig::new(addr.to_string()).token(token))
        .await
        .map_err(e)?;
    // Connected first: `open` then returns once the server's text is in.
    client.wait_connected().await.map_err(e)?;
    let doc = client.open(name).await.map_err(e)?;
    let events = doc.events();
    Ok(Replica {
        client,
        doc,
        events,
    })
}

/// The next event, or why there is none.
async fn next_event(events: &mut Events) -> Result<Event, String> {
    match events.recv().await {
        Some(Event::Connection(ConnectionState::Failed { code, message })) => {
            Err(format!("refused by the server ({code:?}): {message}"))
        }
        Some(Event::Reloaded { .. }) => {
            Err("the document was reloaded from the server's snapshot".into())
        }
        Some(event) => Ok(event),
        None => Err("the client stopped".into()),
    }
}

/// Makes `patch`, clamped to the local text as it is then; false if nothing was left of
/// it. Returns the local seq of the op carrying it.
async fn edit_clamped(doc: &DocHandle, patch: Patch) -> Result<Option<u64>, String> {
    let mut made = false;
    let local_seq = doc
        .edit_with(|view| {
            let clamped = clamp(patch, view.len_chars());
            made = clamped.is_some();
            clamped.into_iter().collect()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(made.then_some(local_seq))
}

/// One client composing the patches made while an op is in flight (the `Client`
/// always does), timing every op from its send to its ack (µs, one sample per op). The
/// client sends an op when the one before is acknowledged, or at once if none is in
/// flight: its send is taken as the later of its first edit and the previous ack.
async fn drive_composed(
    mut r: Replica,
    patches: Vec<Patch>,
) -> Result<(Histogram<u64>, u64, Replica), String> {
    #[derive(Default)]
    struct Acks {
        first_edit: std::collections::BTreeMap<u64, Instant>,
        last_ack: Option<Instant>,
        ops: u64,
        acked: u64,
    }
    impl Acks {
        fn record(&mut self, event: Event, hist: &mut Histogram<u64>) {
            if let Event::Acked { local_seq, .. } = event {
                let now = Instant::now();
                let first = self.first_edit.remove(&local_seq);
                let sent = first.into_iter().chain(self.last_ack).max().unwrap_or(now);
                hist.record((now.duration_since(sent).as_micros() as u64).max(1))
                    .ok();
                self.last_ack = Some(now);
                self.ops += 1;
                self.acked = self.acked.max(local_seq);
            }
        }
    }
    let mut hist = new_hist();
    let mut acks = Acks::default();
    let mut last_made = 0;
    for patch in patches {
        let now = Instant::now();
        if let Some(local_seq) = edit_clamped(&r.doc, patch).await? {
            acks.first_edit.entry(local_seq).or_insert(now);
            last_made = local_seq;
        }
        while let Some(event) = r.events.try_recv() {
            if let Event::Reloaded { .. } = event {
                return Err("the document was reloaded from the server's snapshot".into());
            }
            acks.record(event, &mut hist);
        }
        // Edits apply locally without waiting: let the client's task send and receive.
        tokio::task::yield_now().await;
    }
    while acks.acked < last_made {
        let event = next_event(&mut r.events).await?;
        acks.record(event, &mut hist);
    }
    Ok((hist, acks.ops, r))
}

/// One client replaying its share of patches, each its own op made after the previous
/// ack; returns its ack latencies (µs, from the edit to its ack).
async fn drive(
    mut r: Replica,
    patches: Vec<Patch>,
) -> Result<(Histogram<u64>, u64, Replica), String> {
    let mut hist = new_hist();
    let mut ops = 0;
    for patch in patches {
        let t = Instant::now();
        let Some(local_seq) = edit_clamped(&r.doc, patch).await? else {
            continue;
        };
        loop {
            if let Event::Acked { local_seq: l, .. } = next_event(&mut r.events).await? {
                if l >= local_seq {
                    break;
                }
            }
        }
        hist.record((t.elapsed().as_micros() as u64).max(1)).ok();
        ops += 1;
    }
    Ok((hist, ops, r))
}

/// A document opened over a bare connection, for `--pipeline` (the `Client` keeps one
/// op in flight): its text from the snapshot and the ops after it.
/// Where an `Open` over a bare connection got: the document, or a `Redirect` to the
/// node that serves it (cluster mode).
enum RawOpen {
    Doc(ClientDoc),
    Redirect(String),
}

/// Opens `name` over a bare connection, following up to 8 redirects (cluster mode) to a
/// new connection each as the same client; TCP only.
async fn open_following(
    mut conn: Connection,
    name: &str,
    client_id: u64,
    token: &str,
) -> Result<(Connection, ClientDoc), String> {
    for _ in 0..8 {
        match open_raw(&mut conn, name).await? {
            RawOpen::Doc(doc) => return Ok((conn, doc)),
            RawOpen::Redirect(addr) => {
                let tcp = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("{name}: redirected to {addr}: {e}"))?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                let stream: Box<dyn connection::Stream> = Box::new(tcp);
                conn = Connection::handshake(stream, client_id, token)
                    .await
                    .map_err(|e: ConnError| format!("{addr}: {e}"))?;
            }
        }
    }
    Err(format!("{name}: redirected 8 times"))
}

async fn open_raw(conn: &mut Connection, name: &str) -> Result<RawOpen, String> {
    let e = |e: quire::client::connection::ClientError| e.to_string();
    conn.send(Message::Open {
        doc: name.into(),
        known_version: 0,
    })
    .await
    .map_err(e)?;
    let mut snapshot: Option<(String, u64)> = None;
    let mut doc: Option<ClientDoc> = None;
    loop {
        match conn.recv().await.map_err(e)?.message {
            Message::Snapshot {
                version,
                total_len,
                text,
                ..
            } => {
                let (so_far, _) = snapshot.get_or_insert_with(|| (String::new(), version));
                so_far.push_str(&text);
                if so_far.len() as u64 >= total_len {
                    let (text, version) = snapshot.take().expect("set above");
                    let max = quire::protocol::max_op_bytes(conn.max_frame);
                    doc = Some(ClientDoc::new(text, version, 1).with_max_op_bytes(max));
                }
            }
            Message::Ops { ops, more, .. } => {
                let doc = doc.as_mut().ok_or("ops before the snapshot")?;
                for op in ops {
                    doc.on_remote(op.seq, &op.patches)
                        .map_err(|e| format!("{e:?}"))?;
                }
                if !more {
                    break;
                }
            }
            Message::Redirect { doc: d, addr, .. } if d == name && doc.is_none() => {
                return Ok(RawOpen::Redirect(addr));
            }
            Message::Error { code, message } => return Err(format!("{code:?}: {message}")),
            _ => {}
        }
    }
    doc.map(RawOpen::Doc).ok_or_else(|| "no snapshot".into())
}

/// Applies one message from the server to a pipelined document, timing acks.
fn apply_pipelined(
    doc: &mut ClientDoc,
    hist: &mut Histogram<u64>,
    sent_at: &mut std::collections::HashMap<u64, Instant>,
    message: Message,
) -> Result<(), String> {
    match message {
        Message::Ack { local_seq, seq, .. } => {
            doc.on_ack(local_seq, seq).map_err(|e| format!("{e:?}"))?;
            if let Some(t) = sent_at.remove(&local_seq) {
                hist.record((t.elapsed().as_micros() as u64).max(1)).ok();
            }
        }
        Message::Remote { op, .. } => {
            doc.on_remote(op.seq, &op.patches)
                .map_err(|e| format!("{e:?}"))?;
        }
        Message::Reject { code, message, .. } => {
            return Err(format!("op rejected ({code:?}): {message}"))
        }
        Message::Error { code, message } => return Err(format!("{code:?}: {message}")),
        _ => {}
    }
    Ok(())
}

/// One client over a bare connection sending each patch as its own op with up to
/// `depth` in flight (a document per client: see "Pipelining" in protocol.md), timing
/// every op from its send to its ack. Returns the document's final version and text.
async fn drive_pipelined(
    conn: Connection,
    (name, client_id, token): (String, u64, String),
    patches: Vec<Patch>,
    depth: usize,
) -> Result<(Histogram<u64>, u64, (u64, String)), String> {
    let e = |e: quire::client::connection::ClientError| e.to_string();
    let (mut conn, doc) = open_following(conn, &name, client_id, &token).await?;
    let mut doc = doc.without_composing().pipelined(depth);
    let mut hist = new_hist();
    let mut ops = 0;
    let mut sent_at = std::collections::HashMap::new();
    let mut sent = Vec::new();
    for patch in patches {
        while doc.all_in_flight().count() >= depth {
            let message = conn.recv().await.map_err(e)?.message;
            apply_pipelined(&mut doc, &mut hist, &mut sent_at, message)?;
        }
        let Some(clamped) = clamp(patch, doc.len_chars()) else {
            continue;
        };
        doc.local_edit(&[clamped]).map_err(|e| format!("{e:?}"))?;
        while let Some(out) = doc.take_to_send() {
            sent.push(out.local_seq);
            conn.queue(out.into_submit(&name)).map_err(e)?;
            ops += 1;
        }
        conn.flush().await.map_err(e)?;
        // Timed from the flush; an op is never acked before it is sent.
        let now = Instant::now();
        for local_seq in sent.drain(..) {
            sent_at.insert(local_seq, now);
        }
        while let Some(env) = conn.try_recv().map_err(e)? {
            apply_pipelined(&mut doc, &mut hist, &mut sent_at, env.message)?;
        }
    }
    while doc.has_pending() {
        let message = conn.recv().await.map_err(e)?.message;
        apply_pipelined(&mut doc, &mut hist, &mut sent_at, message)?;
    }
    Ok((hist, ops, (doc.version(), doc.text())))
}

/// A client ready to replay its share: over the `Client` API, or (to pipeline) over a
/// bare connection.
enum Opened {
    Client(Replica),
    /// A bare connection and its client id.
    Raw(Connection, u64),
}

/// A client's copy of its document once its share is replayed.
enum Copy {
    Live(Replica),
    Raw { version: u64, text: String },
}

impl Copy {
    fn version(&self) -> u64 {
        match self {
            Copy::Live(r) => r.doc.version(),
            Copy::Raw { version, .. } => *version,
        }
    }

    fn text(&self) -> String {
        match self {
            Copy::Live(r) => r.doc.text(),
            Copy::Raw { text, .. } => text.clone(),
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.pipeline.is_some() && !matches!(args.mode, Mode::Sequential | Mode::Each) {
        return Err(
            "--pipeline needs a document per client (--mode sequential or each): \
                    pipelined ops on a shared document conflict (protocol.md, Pipelining)"
                .into(),
        );
    }
    if args.pipeline.is_some() && args.compose {
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
        let mut conn = connect_bare(&args, args.client_base).await?;
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
            let opened_one = if args.pipeline.is_some() {
                let client_id = args.client_base + c as u64;
                Opened::Raw(connect_bare(&args, client_id).await?, client_id)
            } else {
                Opened::Client(open_replica(args.addr, &args.token, &name).await?)
            };
            opened.push((opened_one, name, share));
        }
        started = Instant::now();
        let mut tasks = Vec::new();
        let (compose, depth) = (args.compose, args.pipeline.unwrap_or(1) as usize);
        for (opened_one, name, share) in opened {
            let token = args.token.clone();
            tasks.push(tokio::spawn(async move {
                let (hist, ops, copy) = match opened_one {
                    Opened::Raw(conn, client_id) => {
                        let who = (name.clone(), client_id, token);
                        let (hist, ops, (version, text)) =
                            drive_pipelined(conn, who, share, depth).await?;
                        (hist, ops, Copy::Raw { version, text })
                    }
                    Opened::Client(r) if compose => {
                        let (hist, ops, r) = drive_composed(r, share).await?;
                        (hist, ops, Copy::Live(r))
                    }
                    Opened::Client(r) => {
                        let (hist, ops, r) = drive(r, share).await?;
                        (hist, ops, Copy::Live(r))
                    }
                };
                Ok::<_, String>((hist, ops, name, copy))
            }));
        }
        let mut hist = new_hist();
        let mut ops = 0;
        let mut replicas = Vec::new();
        for t in tasks {
            let (h, sent, name, copy) = t.await.map_err(|e| e.to_string())??;
            hist.add(h).ok();
            ops += sent;
            replicas.push((name, copy));
        }
        finished = Some(Instant::now());
        // Every client of a document must end with the same text, once each has
        // received the ops sequenced after its last ack.
        let newest = replicas.iter().map(|(_, r)| r.version()).max().unwrap_or(0);
        let mut converged = 0;
        for name in &docs {
            let copies = replicas.iter_mut().filter(|(n, _)| n == name);
            let newest = if args.mode == Mode::Shared { newest } else { 0 };
            let mut text: Option<String> = None;
            for (_, copy) in copies {
                if let Copy::Live(r) = copy {
                    while r.doc.version() < newest {
                        next_event(&mut r.events).await?;
                    }
                }
                let mine = copy.text();
                match &text {
                    None => text = Some(mine),
                    Some(t) if *t == mine => {}
                    Some(_) => return Err(format!("the replicas of {name} diverged")),
                }
                converged += 1;
            }
        }
        for (_, copy) in replicas {
            if let Copy::Live(r) = copy {
                r.client.shutdown().await;
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
        args.pipeline
            .map_or_else(|| "none (Client API)".to_string(), |n| n.to_string()),
        ops as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.len()
    );
    for doc in docs.iter().take(64) {
        let text = read_back(args.addr, &args.token, doc)
            .await
            .map_err(|e| format!("reading {doc} back: {e}"))?;
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
        .worker_threads(args.threads.max(1))
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
