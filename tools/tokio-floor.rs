//! tokio-floor: the least a server built like `quire serve` spends per request, for
//! `tools/bench-cpu.sh` to set beside quire and Redis (issue "simulation", item 6).
//!
//! ```text
//! tokio-floor --listen 127.0.0.1:7434                      # answer each request at once
//! tokio-floor --listen 127.0.0.1:7434 --data-dir ./floor   # answer it once it is in quire's log and synced
//! tokio-floor --listen 127.0.0.1:7434 --data-dir ./floor --sync-on-worker   # the worker syncs, as Redis
//! ```
//!
//! It speaks just enough of Redis's protocol (RESP arrays of bulk strings) for
//! `redis-benchmark -t rpush` to drive it, so that the load generator, and the load
//! generator's share of the machine, is the one Redis is measured with. Each command is
//! answered `:1` (an integer reply, as RPUSH's). The runtime is built as `quire serve`
//! builds it: a multi-thread runtime with the cores less one as workers, mimalloc,
//! `TCP_NODELAY`. With `--data-dir`, each command is first appended to quire's own log
//! (`quire::wal`, as an op record of one insert on a document per connection) and
//! answered only after the `fdatasync` that covers it, with the workers deferring the
//! writer's wake-up to their park hook as `quire serve`'s do. What it leaves out is what
//! quire adds per op above the runtime and the log: the protocol, sessions, OT, the
//! document and its dedupe table, and the acks' delivery.
//!
//! Written by hand rather than with a RESP crate: the few lines of parsing below are the
//! whole of what it needs, and a crate's own costs would blur the floor it measures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use quire::op::Patch;
use quire::wal::record::OpRecordRef;
use quire::wal::vfs::OsFs;
use quire::wal::{Background, Wal, WalConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A connection whose unparsed input grows past this is closed (a command of
/// redis-benchmark's is tens of bytes).
const MAX_PENDING_INPUT: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "A floor for server CPU per request: tokio alone, or tokio and quire's log")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7434")]
    listen: SocketAddr,
    /// Append each command to quire's log in this directory and answer it once synced.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With `--data-dir`: no writer thread; a worker about to go idle writes and syncs
    /// what is pending itself, as Redis's one thread does before it waits for events
    /// (a blocking call on an async worker, which `quire serve` never makes: this
    /// measures what the writer thread's hand-offs cost).
    #[arg(long, requires = "data_dir")]
    sync_on_worker: bool,
    /// Connections served at once; one more is closed as soon as it is accepted. (A
    /// floor for a benchmark on loopback sets no deadlines: its clients end with the
    /// run.)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_connections: u32,
    /// Runtime worker threads [default: the cores less one, at least one, as `quire serve`].
    #[arg(long)]
    threads: Option<usize>,
}

/// The length of the first whole RESP array of bulk strings in `buf`: `Ok(None)` while
/// it is incomplete, `Err` for input that is not one.
fn command_len(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    /// The number after the type byte at `at`, and where the next line starts.
    fn header(buf: &[u8], at: usize, kind: u8) -> Result<Option<(usize, usize)>, &'static str> {
        let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + end];
        if line.first() != Some(&kind) {
            return Err("not a RESP array of bulk strings");
        }
        let n = std::str::from_utf8(&line[1..])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n <= MAX_PENDING_INPUT)
            .ok_or("a bad length")?;
        Ok(Some((n, at + end + 2)))
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((count, mut at)) = header(buf, 0, b'*')? else {
        return Ok(None);
    };
    for _ in 0..count {
        if at >= buf.len() {
            return Ok(None);
        }
        let Some((len, next)) = header(buf, at, b'$')? else {
            return Ok(None);
        };
        at = next + len + 2;
        if at > buf.len() {
            return Ok(None);
        }
    }
    Ok(Some(at))
}

/// Serves one connection until it closes or sends what is not a command.
async fn serve(mut socket: tokio::net::TcpStream, wal: Option<Arc<Wal>>, conn: u64) {
    let doc_id = format!("floor-{conn}");
    let patches = [Patch {
        pos: 0,
        del: 0,
        ins: "x".to_string(),
    }];
    let mut seq = 0u64;
    let mut input = Vec::with_capacity(4096);
    let mut output = Vec::with_capacity(64);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        input.extend_from_slice(&chunk[..n]);
        output.clear();
        let mut last_lsn = None;
        let mut taken = 0;
        loop {
            match command_len(&input[taken..]) {
                Ok(Some(len)) => taken += len,
                Ok(None) => break,
                Err(_) => return,
            }
            if let Some(wal) = &wal {
                seq += 1;
                let record = OpRecordRef {
                    doc_id: &doc_id,
                    client_id: conn,
                    local_seq: seq,
                    server_seq: seq,
                    base_version: seq - 1,
                    timestamp_ms: 0,
                    patches: &patches,
                    fingerprint: Some(seq),
                };
                match wal.append_op_ref(record) {
                    Ok(lsn) => last_lsn = Some(lsn),
                    Err(_) => return,
                }
            }
            output.extend_from_slice(b":1\r\n");
        }
        input.drain(..taken);
        if input.len() > MAX_PENDING_INPUT {
            return;
        }
        if let (Some(wal), Some(lsn)) = (&wal, last_lsn) {
            if wal.wait_durable(lsn).await.is_err() {
                return;
            }
        }
        if !output.is_empty() && socket.write_all(&output).await.is_err() {
            return;
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = WalConfig {
        background: if args.sync_on_worker {
            Background::Manual
        } else {
            Background::Threads
        },
        ..WalConfig::default()
    };
    let wal = match &args.data_dir {
        None => None,
        Some(dir) => {
            // Each run numbers its connections' documents from 1, so the seqs of a
            // log it wrote before would repeat: it takes an empty log only.
            let mut found = 0u64;
            match Wal::open(Arc::new(OsFs), dir, config, |_, _| found += 1) {
                Ok(_) if found > 0 => {
                    eprintln!(
                        "tokio-floor: {} holds a log of {found} records already; give it an empty directory",
                        dir.display()
                    );
                    return ExitCode::FAILURE;
                }
                Ok((wal, _)) => Some(Arc::new(wal)),
                Err(e) => {
                    eprintln!("tokio-floor: cannot open the log in {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads.max(1));
    let parked = wal.clone();
    builder.on_thread_park(move || {
        quire::wal::commit::defer_writer_wakes_on_this_thread();
        if let Some(wal) = &parked {
            wal.pay_owed_writer_wake();
            // Manual only: with the writer thread, `step` does nothing.
            while wal.step() {}
        }
    });
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio-floor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tokio-floor: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("tokio-floor serving on {addr}"),
            Err(e) => {
                eprintln!("tokio-floor: no local address: {e}");
                return ExitCode::FAILURE;
            }
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(args.max_connections as usize));
        let mut conn = 0u64;
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            if socket.set_nodelay(true).is_err() {
                continue;
            }
            conn += 1;
            let wal = wal.clone();
            tokio::spawn(async move {
                serve(socket, wal, conn).await;
                drop(permit);
            });
        }
    })
}
