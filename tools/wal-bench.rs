//! wal-bench: the storage engine's benchmarks (a tool, not a test).
//!
//! ```text
//! wal-bench append   [--dir D] [--appenders 1,8,64] [--seconds 6] [--payload-bytes 128] [--no-zero-fill]
//! wal-bench recovery [--dir D] [--mib 1024] [--payload-bytes 1024] [--docs 1000]
//!                    [--runs 1] [--warm] [--keep]
//! ```
//!
//! `append`: N concurrent appenders (tokio tasks on a 2-worker runtime, as in the
//! server) each append op records with a payload of `--payload-bytes` and wait for
//! durability; reports records/s and append-to-durable latency percentiles, with the
//! writer's fsync latency and batch sizes. Each N runs on a fresh log.
//! `recovery`: writes `--mib` of log, closes it, and times a cold open (checksum scan
//! plus replay into documents), reporting MB/s. `--runs N` times N opens of the same log;
//! `--warm` reads the log's files once through the page cache before each open, so that
//! the open reads it from memory (the CPU's cost; recovery's own reads bypass the cache
//! where it does not hold a file, so they would not warm it), otherwise the cache is
//! dropped before each open (needs root). `--keep` keeps the log in
//! `--dir` afterwards, and a later run with `--keep` on a directory that holds a log
//! opens it again instead of writing a new one (its `--mib`, `--docs` and
//! `--payload-bytes` are then those of the log found).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{Sequencer, SubmitError, SubmitOp, Submitted};
use quire::wal::record::OpRecord;
use quire::wal::vfs::OsFs;
use quire::wal::{Wal, WalConfig};

#[derive(Parser)]
#[command(name = "wal-bench", about = "Benchmarks of quire's write-ahead log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Append-to-durable throughput and latency.
    Append {
        #[arg(long, default_value = "./wal-bench-data")]
        dir: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        appenders: Vec<usize>,
        #[arg(long, default_value_t = 6.0)]
        seconds: f64,
        /// Bytes of each record's payload (the framed record adds a 24-byte header).
        #[arg(long, default_value_t = 128)]
        payload_bytes: usize,
        /// Preallocate with fallocate only, without writing zeros over the segment.
        #[arg(long)]
        no_zero_fill: bool,
    },
    /// Cold-start recovery speed of a large log.
    Recovery {
        #[arg(long, default_value = "./wal-bench-data")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        #[arg(long, default_value_t = 1024)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 1000)]
        docs: usize,
        /// Opens of the log to time.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Read the log into the page cache first (time recovery from memory).
        #[arg(long)]
        warm: bool,
        /// Keep the log afterwards; reuse a log already in `--dir`.
        #[arg(long)]
        keep: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Append {
            dir,
            appenders,
            seconds,
            payload_bytes,
            no_zero_fill,
        } => {
            println!(
                "{:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10}",
                "appenders",
                "records/s",
                "p50_us",
                "p99_us",
                "p99.9_us",
                "max_us",
                "fsyncs/s",
                "batch_avg",
                "fsync_p50"
            );
            for n in appenders {
                append(&dir, n, seconds, payload_bytes, !no_zero_fill);
            }
        }
        Command::Recovery {
            dir,
            mib,
            payload_bytes,
            docs,
            runs,
            warm,
            keep,
        } => {
            let log = LogShape {
                mib,
                payload_bytes,
                docs,
            };
            recovery(&dir, &log, runs, warm, keep)
        }
    }
}

/// An op record whose encoded payload is `payload_bytes` long.
fn record(doc: &str, seq: u64, payload_bytes: usize) -> OpRecord {
    // The type-2 layout: the fields, one patch, the fingerprint.
    let fixed = 5 * 8 + 2 + doc.len() + 4 + 12 + 8;
    let ins = "x".repeat(payload_bytes.saturating_sub(fixed).max(1));
    let op = OpRecord {
        doc_id: doc.to_owned(),
        client_id: 1,
        local_seq: seq,
        server_seq: seq,
        base_version: seq - 1,
        timestamp_ms: 0,
        patches: vec![Patch::new(0, 0, ins)],
        fingerprint: Some(seq),
    };
    debug_assert!(payload_bytes < fixed + 1 || op.encoded_len() == payload_bytes);
    op
}

fn fresh(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("create bench dir");
}

fn append(dir: &Path, appenders: usize, seconds: f64, payload_bytes: usize, zero_fill: bool) {
    fresh(dir);
    let config = WalConfig {
        zero_fill,
        ..WalConfig::default()
    };
    let (wal, _) = Wal::open(Arc::new(OsFs), &dir.join("wal"), config, |_, _| {}).expect("open");
    let wal = Arc::new(wal);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    // Warm up: the first append waits for the first segment to be prepared.
    rt.block_on(wal.append_op_durable(&record("warm", 1, payload_bytes)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let batches_before = wal.stats().batches.load(Ordering::Relaxed);
    let histograms = rt.block_on(async {
        let mut tasks = Vec::new();
        for a in 0..appenders {
            let (wal, stop) = (wal.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let doc = format!("d{a}");
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut seq = 1;
                while !stop.load(Ordering::Relaxed) {
                    let op = record(&doc, seq, payload_bytes);
                    let t = Instant::now();
                    wal.append_op_durable(&op).await.expect("append");
                    hist.record((t.elapsed().as_micros() as u64).max(1))
                        .unwrap();
                    seq += 1;
                }
                hist
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for t in tasks {
            all.add(t.await.unwrap()).unwrap();
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let batches = wal.stats().batches.load(Ordering::Relaxed) - batches_before;
    let fsync = wal.stats().fsync_us();
    println!(
        "{:>9} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>10.0} {:>10.1} {:>10}",
        appenders,
        histograms.len() as f64 / elapsed,
        histograms.value_at_quantile(0.5),
        histograms.value_at_quantile(0.99),
        histograms.value_at_quantile(0.999),
        histograms.max(),
        batches as f64 / elapsed,
        histograms.len() as f64 / batches.max(1) as f64,
        fsync.p50
    );
    drop(wal);
    let _ = std::fs::remove_dir_all(dir);
}

/// User and system CPU seconds of this process so far: on a shared machine, what the
/// work cost apart from the time spent waiting for a core or the disk.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer; the call cannot fail with these.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}

/// The log the recovery benchmark writes.
struct LogShape {
    mib: u64,
    payload_bytes: usize,
    docs: usize,
}

fn recovery_config() -> LocalConfig {
    LocalConfig {
        snapshot_every_ops: u64::MAX,
        snapshot_every: Duration::from_secs(1 << 30),
        retention: Duration::from_secs(1 << 30),
        ..LocalConfig::default()
    }
}

fn recovery(dir: &Path, log: &LogShape, runs: usize, warm: bool, keep: bool) {
    let reuse = keep && dir.join("wal").is_dir();
    if reuse {
        println!("reusing the log in {}", dir.display());
    } else {
        let started = Instant::now();
        write_log(dir, log);
        println!("log written in {:.1} s", started.elapsed().as_secs_f64());
    }
    for _ in 0..runs {
        // Drop the page cache's copy where we can, so the scan reads the disk; or fill
        // it, so the scan reads memory.
        let dropped = !warm && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
        if warm {
            read_through_cache(&dir.join("wal"));
        }
        let started = Instant::now();
        let cpu_started = cpu_seconds();
        let (store, report) = LocalSequencer::open(dir, recovery_config()).expect("recover");
        let elapsed = started.elapsed().as_secs_f64();
        let (user, system) = cpu_seconds();
        let (user, system) = (user - cpu_started.0, system - cpu_started.1);
        let cpu = user + system;
        let mb = report.bytes_scanned as f64 / 1e6;
        println!(
            "recovery: {} segments, {} records, {:.0} MB scanned, {} ops replayed into {} documents in {:.2} s = {:.0} MB/s, {:.2} s of CPU ({:.2} user, {:.2} system) = {:.0} MB per CPU second (page cache {})",
            report.segments,
            report.records_scanned,
            mb,
            report.ops_replayed,
            report.documents,
            elapsed,
            mb / elapsed,
            cpu,
            user,
            system,
            mb / cpu,
            if dropped { "dropped first" } else { "warm" }
        );
        // A document's text is built on first need (from the log's ops after its
        // snapshot): the first read pays for it, the second does not.
        if let Some(doc) = store.doc_ids().into_iter().min() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let timed = || {
                let started = Instant::now();
                let view = rt
                    .block_on(store.read(&doc))
                    .expect("read")
                    .expect("a document");
                (started.elapsed().as_secs_f64() * 1e3, view)
            };
            let (first_ms, view) = timed();
            let (second_ms, _) = timed();
            println!(
                "first read of {doc:?} ({} bytes of text, version {}): {first_ms:.1} ms; second read: {second_ms:.1} ms",
                view.text.len(),
                view.version
            );
        }
        drop(store);
    }
    if !keep {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Reads every file in `dir` once with plain reads, which leave it in the page cache.
fn read_through_cache(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("the log's directory") {
        let path = entry.expect("a directory entry").path();
        let mut file = std::fs::File::open(&path).expect("a segment file");
        std::io::copy(&mut file, &mut std::io::sink()).expect("reading a segment file");
    }
}

/// Writes about `log.mib` MiB of op records over `log.docs` documents into a fresh `dir`.
fn write_log(dir: &Path, log: &LogShape) {
    let LogShape {
        mib,
        payload_bytes,
        docs,
    } = *log;
    fresh(dir);
    let target = mib << 20;
    {
        let (store, _) = LocalSequencer::open(dir, recovery_config()).expect("open");
        let store = Arc::new(store);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let per_task = target / 64 / payload_bytes as u64 + 1;
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..64u64 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let ins = "y".repeat(payload_bytes.saturating_sub(80).max(1));
                    for i in 0..per_task {
                        let doc = format!("doc{}", (t as usize * 7919 + i as usize) % docs);
                        let mut version = 0;
                        let ticket = loop {
                            let op = SubmitOp {
                                op_id: OpId {
                                    client_id: t,
                                    local_seq: i + 1,
                                },
                                base_version: version,
                                expected_version: version,
                                expected_incarnation: None,
                                fingerprint: 0,
                                patches: vec![Patch::new(0, 0, ins.clone())],
                            };
                            match store.submit(&doc, &op) {
                                Ok(Submitted::Applied { ticket, .. }) => break ticket,
                                Ok(Submitted::Duplicate { ticket, .. }) => break ticket,
                                Err(SubmitError::VersionMismatch { actual, .. }) => {
                                    version = actual
                                }
                                Err(e) => panic!("{e}"),
                            }
                        };
                        store.wait_durable(ticket).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
}
