//! Benchmarks of the client library (issue "client", not timed tests), against a
//! server in this process on a temporary data directory:
//!
//! 1. Reconnect to converged: a client types 1,000 keystrokes offline while the
//!    document receives 10,000 ops; then its network comes back. Time until it has
//!    converged, messages and bytes it sent, and the growth of this process's memory
//!    while it typed offline.
//! 2. Persistence cost: `edit` latency (awaited one after another, connected) with a
//!    persistence directory and without, p50/p99.
//! 3. Many documents on one connection: 1,000 documents open in one client, 10 edits
//!    each: time to all acknowledged, and memory.
//!
//! `cargo run --release --example client_bench` (set `TMPDIR` to put the data and
//! persistence directories on the disk to measure).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quire::client::{Client, ClientConfig, DocHandle};
use quire::op::{OpId, Patch};
use quire::sequencer::local::LocalSequencer;
use quire::sequencer::{Sequencer, SubmitOp, Submitted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error>;

fn rss_anon_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A forwarding proxy that can be switched off (the client's network), counting the
/// frames and bytes the client sends through it.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(backend: SocketAddr) -> Result<Proxy, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let frames = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (u, f, b) = (up.clone(), frames.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(backend).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, u.clone(), f.clone(), b.clone()));
            }
        });
        Ok(Proxy {
            addr,
            up,
            frames,
            bytes,
        })
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    up: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        // Frame boundaries: a u32 length, then that many bytes.
        let (mut header, mut need) = (Vec::new(), 0usize);
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || !up.load(Ordering::SeqCst) {
                return;
            }
            bytes.fetch_add(n as u64, Ordering::Relaxed);
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if need == 0 {
                    let take = (4 - header.len()).min(rest.len());
                    header.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if header.len() == 4 {
                        need = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
                        header.clear();
                        frames.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    let take = need.min(rest.len());
                    need -= take;
                    rest = &rest[take..];
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0 || !up.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let watch = async {
        while up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
        _ = watch => {}
    }
}

fn config(addr: SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new(addr.to_string());
    c.backoff_min = Duration::from_millis(5);
    c.backoff_max = Duration::from_millis(50);
    c
}

async fn synced(docs: &[&DocHandle], version: impl Fn() -> u64) {
    loop {
        let v = version();
        if docs.iter().all(|d| d.is_synced() && d.version() == v) {
            return;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let (store, _) = LocalSequencer::open(dir.path(), Default::default())?;
    let store = Arc::new(store);
    let listener = quire::server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?;
    let server = quire::server::Server::new(store.clone(), Default::default());
    tokio::spawn(server.serve(listener, std::future::pending()));

    // 1. Reconnect to converged.
    let proxy = Proxy::start(addr).await?;
    let a = Client::connect(config(proxy.addr)).await?;
    let doc = a.open("bench/offline").await?;
    doc.edit(&[Patch::new(0, 0, "start\n")]).await?;
    synced(&[&doc], || store.version("bench/offline")).await;
    proxy.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rss_before = rss_anon_kib();
    for i in 0..1000u32 {
        let c = char::from(b'a' + (i % 26) as u8).to_string();
        doc.edit(&[Patch::new(6 + i, 0, c.as_str())]).await?;
    }
    let rss_offline = rss_anon_kib();
    let mut version = store.version("bench/offline");
    let mut last = None;
    for i in 0..10_000u64 {
        let op = SubmitOp {
            op_id: OpId {
                client_id: 7,
                local_seq: i + 1,
            },
            base_version: version,
            expected_version: version,
            expected_incarnation: None,
            fingerprint: i,
            patches: vec![Patch::new(0, 0, "x")],
        };
        if let Submitted::Applied { seq, ticket } = store
            .submit("bench/offline", &op)
            .map_err(|e| format!("{e:?}"))?
        {
            version = seq;
            last = Some(ticket);
        }
    }
    store
        .wait_durable(last.expect("ops"))
        .await
        .map_err(|e| e.to_string())?;
    let (frames0, bytes0) = (
        proxy.frames.load(Ordering::SeqCst),
        proxy.bytes.load(Ordering::SeqCst),
    );
    let started = Instant::now();
    proxy.up.store(true, Ordering::SeqCst);
    synced(&[&doc], || store.version("bench/offline")).await;
    let took = started.elapsed();
    let frames = proxy.frames.load(Ordering::SeqCst) - frames0;
    let bytes = proxy.bytes.load(Ordering::SeqCst) - bytes0;
    println!(
        "reconnect to converged: 1,000 offline keystrokes, 10,000 ops meanwhile: {:.1} ms, \
         {frames} messages and {bytes} bytes sent by the client, memory +{} KiB while typing offline",
        took.as_secs_f64() * 1e3,
        rss_offline.saturating_sub(rss_before)
    );
    a.shutdown().await;

    // 2. Persistence cost.
    for persist in [false, true] {
        let state = tempfile::tempdir()?;
        let mut c = config(addr);
        if persist {
            c = c.persist_dir(state.path());
        }
        let client = Client::connect(c).await?;
        let doc = client.open(&format!("bench/persist-{persist}")).await?;
        let mut ns = Vec::new();
        for i in 0..2000u32 {
            let t = Instant::now();
            doc.edit(&[Patch::new(i, 0, "y")]).await?;
            ns.push(t.elapsed().as_nanos() as u64);
        }
        let (p50, p99) = percentiles(ns);
        println!(
            "edit latency, persistence {}: p50 {:.1} us, p99 {:.1} us (2,000 edits)",
            if persist { "on " } else { "off" },
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
        );
        client.shutdown().await;
    }

    // 3. Many documents on one connection.
    let rss_before = rss_anon_kib();
    let started = Instant::now();
    let client = Client::connect(config(addr)).await?;
    let mut docs = Vec::new();
    for i in 0..1000 {
        docs.push(client.open(&format!("bench/many-{i}")).await?);
    }
    let opened = started.elapsed();
    for round in 0..10u32 {
        for d in &docs {
            d.edit(&[Patch::new(round, 0, "z")]).await?;
        }
    }
    for d in &docs {
        synced(&[d], || store.version(d.name())).await;
    }
    println!(
        "1,000 documents on one connection, 10 edits each: opened in {:.0} ms, all acknowledged after {:.0} ms, memory +{} KiB (server in the same process)",
        opened.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
        rss_anon_kib().saturating_sub(rss_before)
    );
    client.shutdown().await;
    Ok(())
}
