//! The `quire` binary: a thin command line over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::{Arc, OnceLock};

use clap::{Parser, Subcommand, ValueEnum};
use quire::admin::{self, Admin, AdminConfig};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::wal::recovery::RecoveryOptions;
use quire::wal::WalConfig;

mod config_file;
mod demo;

#[derive(Parser)]
#[command(
    name = "quire",
    version,
    about = "A server for real-time collaborative text editing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text, or as JSON objects (one per line). The filter is RUST_LOG
    /// (default: info for serve, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "QUIRE_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Open (or create) the data directory, recover it, and serve until SIGTERM or ctrl-c.
    Serve(Box<ServeArgs>),
    /// Watch two editors lose no edit through a cut network, a server restart and a
    /// killed client (about 30 s).
    ///
    /// Everything runs on this machine, in temporary directories, on ports the system
    /// picks. Exits non-zero unless both texts end equal to the server's with every
    /// edit in them once.
    Demo(demo::DemoArgs),
    /// Mint an access token for development, signed with the server's current secret
    /// (the first one given), and print it.
    ///
    /// Example: quire token --doc 'notes/*' --write --ttl 1h --subject alice --secret-file
    /// ./secret
    Token(TokenArgs),
    /// Back up a running server through its admin endpoint, without stopping writes:
    /// snapshots plus the log up to one LSN, each file checksummed (SHA-256) in
    /// DIR/manifest.json. Prints the LSN the backup holds.
    ///
    /// Example: quire backup --to ./backup-2026-12-01 --admin 127.0.0.1:7421
    Backup(BackupArgs),
    /// Restore a backup into a new data directory: checks every checksum (the
    /// manifest's, every log record's and every snapshot's) and that each document comes
    /// back at the backup's version, then puts the directory in place. The target must
    /// not exist or be empty.
    ///
    /// Example: quire restore --from ./backup-2026-12-01 --data-dir ./quire-data-restored
    Restore(RestoreArgs),
    /// Write a document's text to stdout, from a data directory that no server is using
    /// (offline: stop the server first, or export from a restored backup).
    ///
    /// Example: quire export notes/todo --at 120 --data-dir ./quire-data
    Export(ExportArgs),
    /// Bob's editor in `quire demo` (a child process the demo starts and kills).
    #[command(hide = true)]
    DemoClient(demo::DemoClientArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML file of settings: each key is a flag's name (`max_frame = 65536` or
    /// `max-frame = 65536`; `insecure = true`). Precedence: a flag on the command line,
    /// then its environment variable, then this file, then the default shown here.
    #[arg(long, env = "QUIRE_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// The data directory (created if missing).
    #[arg(long, default_value = "./quire-data", env = "QUIRE_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7420", env = "QUIRE_LISTEN")]
    listen: std::net::SocketAddr,
    /// Largest frame either way, in bytes after its length field (4096 ..= 8388608).
    /// An op's patches may take this minus 256 bytes, so every message carrying it fits.
    #[arg(long, default_value_t = quire::protocol::DEFAULT_MAX_FRAME, env = "QUIRE_MAX_FRAME")]
    max_frame: usize,
    /// Connections served at once; one more gets Error code 9 and is closed.
    #[arg(long, default_value_t = 10_000, env = "QUIRE_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Seconds from connecting to a complete Hello (then Error code 10, closed).
    #[arg(long, default_value_t = 10, env = "QUIRE_HANDSHAKE_TIMEOUT_SECS")]
    handshake_timeout_secs: u64,
    /// Seconds allowed between two complete messages from a client; an idle client
    /// sends Ping (then Error code 10, closed).
    #[arg(long, default_value_t = 60, env = "QUIRE_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: u64,
    /// Seconds one write to a client may take before the connection is dropped.
    #[arg(long, default_value_t = 30, env = "QUIRE_WRITE_TIMEOUT_SECS")]
    write_timeout_secs: u64,
    /// MiB queued for one connection before it counts as not reading (Error code 8).
    /// At least two frames (17 for --max-frame 8388608).
    #[arg(long, default_value_t = 8, env = "QUIRE_OUTBOX_MIB")]
    outbox_mib: usize,
    /// MiB of frames above 64 KiB being received at once, across all connections; a
    /// large frame that finds none left gets Error code 9.
    #[arg(long, default_value_t = 64, env = "QUIRE_LARGE_FRAME_BUDGET_MIB")]
    large_frame_budget_mib: usize,
    /// MiB of ops sequenced and not yet durable, whole server; a submit past it waits
    /// for the disk.
    #[arg(long, default_value_t = 256, env = "QUIRE_UNSYNCED_MIB")]
    unsynced_mib: usize,
    #[command(flatten)]
    secrets: SecretArgs,
    /// Serve a non-loopback address without a secret: anyone who reaches it may read and
    /// write every document. Without a secret, the server otherwise starts only on a
    /// loopback address (127.0.0.1, ::1).
    #[arg(long, env = "QUIRE_INSECURE")]
    insecure: bool,
    /// Size of each WAL segment file, in MiB (1 ..= 65536; each is preallocated whole).
    /// An op's record must fit in one segment: at least 8 for --max-frame 8388608.
    #[arg(long, default_value_t = 64, env = "QUIRE_SEGMENT_MIB",
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    segment_mib: u64,
    /// Snapshot a document after this many ops.
    #[arg(long, default_value_t = 10_000, env = "QUIRE_SNAPSHOT_EVERY_OPS")]
    snapshot_every_ops: u64,
    /// ...or this many seconds after its last snapshot, if it changed.
    #[arg(long, default_value_t = 60, env = "QUIRE_SNAPSHOT_EVERY_SECS")]
    snapshot_every_secs: u64,
    /// Keep sealed segments this many seconds for reconnecting clients.
    #[arg(long, default_value_t = 300, env = "QUIRE_RETENTION_SECS")]
    retention_secs: u64,
    /// Cut the log at the first corrupt record even though valid records follow it
    /// (they are lost). Only when there is no backup to restore.
    #[arg(long, env = "QUIRE_REPAIR_WAL")]
    repair_wal: bool,
    /// Broadcast a client's cursor at most once per this many milliseconds (updates in
    /// between are coalesced into the latest).
    #[arg(long, default_value_t = 50, env = "QUIRE_PRESENCE_INTERVAL_MS")]
    presence_interval_ms: u64,
    /// Threads serving connections (default: one per core but one, at least one: the
    /// log's writer has its own thread, busy with every batch's write and sync).
    #[arg(long, env = "QUIRE_THREADS")]
    threads: Option<usize>,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz, /docs, and
    /// /backup for `quire backup`), or `off`. Keep it on loopback or a private network:
    /// /metrics is not authenticated, nor /backup without --admin-token-file (then
    /// whoever reaches it can take a backup: read every document). It serves at most 64 connections at once, each
    /// closed after 30 s without a byte moved.
    #[arg(long, default_value = "127.0.0.1:7421", env = "QUIRE_ADMIN_LISTEN")]
    admin_listen: AdminListen,
    /// A file whose first line is the admin token (at least 16 bytes): the admin
    /// endpoint's document routes (GET /docs, GET /docs/ID, DELETE /docs/ID) require it as
    /// `Authorization: Bearer TOKEN`; without it they are refused.
    #[arg(long, env = "QUIRE_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// Readiness (/readyz) turns red when fewer MiB than this are free on the data
    /// directory's file system.
    #[arg(long, default_value_t = 512, env = "QUIRE_MIN_FREE_MIB")]
    min_free_mib: u64,
    /// Address of the HTTP listener for browsers, or `off`: `GET /ws` upgrades to a
    /// WebSocket carrying the protocol's frames, one per binary message (protocol.md,
    /// "WebSocket"), served like a TCP connection and counted in --max-connections. It
    /// serves at most --max-connections HTTP connections at once, each closed after 60 s
    /// without a byte moved (the server pings every WebSocket each 20 s). The same rule
    /// as --listen applies: without a secret, loopback only unless --insecure.
    #[arg(long, default_value = "off", env = "QUIRE_HTTP_LISTEN")]
    http_listen: AdminListen,
    /// An origin whose pages may open a WebSocket (`https://notes.example.com`; `*` for
    /// any), repeatable or comma-separated. Pages of the HTTP listener's own origin, and
    /// clients that send no Origin (not browsers), always may; others get 403.
    #[arg(long, env = "QUIRE_ALLOWED_ORIGIN", value_delimiter = ',')]
    allowed_origin: Vec<String>,
    /// Record the serving metrics (off only to measure what they cost).
    #[arg(long, value_enum, default_value_t = Switch::On, env = "QUIRE_METRICS")]
    metrics: Switch,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Cluster mode (README, "Running a cluster"): documents owned across nodes through
/// etcd. Without --etcd the server is a single node and needs none of these.
#[derive(clap::Args)]
struct ClusterArgs {
    /// Cluster mode: the client URL of every etcd member (`http://host:2379`),
    /// comma-separated. A binary built without the `cluster` feature refuses it.
    #[arg(long, env = "QUIRE_ETCD", value_delimiter = ',', value_name = "URL")]
    etcd: Vec<String>,
    /// Cluster mode: this node's id, unique in the cluster and the same across its
    /// restarts (a restarted node waits up to one lease TTL for its previous run's lease).
    #[arg(long, env = "QUIRE_NODE_ID", value_name = "ID")]
    node_id: Option<String>,
    /// Cluster mode: `host:port` at which clients reach this node's --listen; sent to
    /// clients redirected here.
    #[arg(long, env = "QUIRE_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Cluster mode: the URL at which browsers reach this node's WebSockets
    /// (`ws://host:port/ws`), if it has --http-listen.
    #[arg(long, env = "QUIRE_ADVERTISE_WS", value_name = "URL")]
    advertise_ws: Option<String>,
    /// Cluster mode: every key of the cluster is under this etcd prefix.
    #[arg(long, default_value = "/quire", env = "QUIRE_ETCD_PREFIX")]
    etcd_prefix: String,
    /// Cluster mode: the TTL of this node's etcd lease, in seconds (1 ..= 60). A node
    /// that could not renew it for TTL less a fifth stops acknowledging at once; a dead
    /// node's documents are claimed by others once it expires.
    #[arg(long, default_value_t = 5, env = "QUIRE_LEASE_TTL_SECS")]
    lease_ttl_secs: u64,
    /// Cluster mode: a document's state is written to etcd as a snapshot after this many
    /// ops, and its journal there truncated through the snapshot before (which is kept).
    /// etcd then holds per document at most two snapshots and about twice this many ops.
    #[arg(long, default_value_t = 1000, env = "QUIRE_CLUSTER_SNAPSHOT_EVERY_OPS")]
    cluster_snapshot_every_ops: u64,
}

/// The server's secrets, which sign and verify access tokens (protocol.md, "Access
/// tokens").
#[derive(clap::Args)]
struct SecretArgs {
    /// A secret signing access tokens (at least 16 bytes, taken as its UTF-8 bytes).
    /// Given twice during a rotation: the first (current) signs new tokens and both
    /// verify, so tokens of the previous secret keep working until it is removed.
    /// Without any secret, clients are anonymous and may do anything (loopback only,
    /// unless --insecure). Without --secret and --secret-file, the environment variable
    /// QUIRE_SECRET is read, as a secret file's content. Prefer --secret-file or
    /// QUIRE_SECRET: a command line is visible to other users of the machine.
    #[arg(long = "secret", value_name = "SECRET")]
    secret: Vec<String>,
    /// A file with one secret per line, the current one first and optionally the
    /// previous one second (at most two; blank lines are ignored).
    #[arg(long, conflicts_with = "secret", value_name = "PATH")]
    secret_file: Option<PathBuf>,
}

/// One secret per non-blank line.
fn secret_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

impl SecretArgs {
    /// The configured keys, if any secret was given: `--secret`, else `--secret-file`,
    /// else `$QUIRE_SECRET`.
    fn keys(&self) -> Result<Option<quire::auth::Keys>, String> {
        let secrets: Vec<String> = if !self.secret.is_empty() {
            self.secret.clone()
        } else if let Some(path) = &self.secret_file {
            secret_lines(
                &std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            )
        } else {
            match std::env::var("QUIRE_SECRET") {
                Ok(text) => secret_lines(&text),
                Err(std::env::VarError::NotPresent) => Vec::new(),
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err("QUIRE_SECRET is not UTF-8".into())
                }
            }
        };
        if secrets.is_empty() {
            return Ok(None);
        }
        quire::auth::Keys::new(&secrets)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The directory to write the backup into (created; it must not exist or be empty).
    #[arg(long)]
    to: PathBuf,
    /// The running server's admin endpoint (its --admin-listen).
    #[arg(long, default_value = "127.0.0.1:7421")]
    admin: String,
    /// The server's admin token file (its --admin-token-file), if it has one.
    #[arg(long, env = "QUIRE_ADMIN_TOKEN_FILE", value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The backup directory (with its manifest.json).
    #[arg(long)]
    from: PathBuf,
    /// The data directory to create (it must not exist or be empty).
    #[arg(long)]
    data_dir: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The document id.
    doc: String,
    /// The version to export (a seq); the newest without it. Works while the log still
    /// holds the ops from a snapshot at or before it.
    #[arg(long)]
    at: Option<u64>,
    /// The data directory, not in use by a server (its lock is taken while reading).
    #[arg(long)]
    data_dir: PathBuf,
}

fn backup(args: BackupArgs) -> ExitCode {
    let token = match &args.admin_token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text.lines().next().map(|l| l.trim().to_string()),
            Err(e) => {
                eprintln!("quire backup: cannot read {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let started = std::time::Instant::now();
    // A bar on a terminal, log lines every few seconds otherwise.
    let progress = quire::progress::Progress::new("backing up", 0);
    let result = quire::backup::client::backup(&args.admin, &args.to, token.as_deref(), |p| {
        progress.set_total(p.bytes);
        progress.set(p.bytes_done);
    });
    progress.finish();
    match result {
        Ok(manifest) => {
            let bytes: u64 = manifest.files.iter().map(|f| f.len).sum();
            println!(
                "backup of LSN {} in {}: {} files, {} bytes, {} documents, {:.1} s",
                manifest.lsn,
                args.to.display(),
                manifest.files.len(),
                bytes,
                manifest.docs.len(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quire backup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn restore(args: RestoreArgs) -> ExitCode {
    let progress = quire::progress::Progress::new("restoring", 0);
    let result = quire::backup::restore::restore(&args.from, &args.data_dir, |done, total| {
        progress.set_total(total);
        progress.set(done);
    });
    progress.finish();
    match result {
        Ok(restored) => {
            println!(
                "restored LSN {} into {}: {} documents, {} files, {} bytes, every checksum checked",
                restored.lsn,
                args.data_dir.display(),
                restored.documents,
                restored.files,
                restored.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quire restore: {e}");
            ExitCode::FAILURE
        }
    }
}

fn export(args: ExportArgs) -> ExitCode {
    match quire::backup::export::export(&args.data_dir, &args.doc, args.at) {
        Ok(exported) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if let Err(e) = out
                .write_all(exported.text.as_bytes())
                .and_then(|()| out.flush())
            {
                eprintln!("quire export: writing to stdout: {e}");
                return ExitCode::FAILURE;
            }
            tracing::info!(doc = args.doc, version = exported.version, "exported");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quire export: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args)]
struct TokenArgs {
    /// What the token grants: a document id, a prefix ending in `/*` (`notes/*` grants
    /// `notes/a`, not `notes-private`), or `*` for every document.
    #[arg(long)]
    doc: String,
    /// Grant writing (submitting ops) too; without it the token only reads.
    #[arg(long)]
    write: bool,
    /// How long the token is valid: a number with a unit s, m, h or d (`90s`, `1h`, `7d`).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// Whom the token is issued to (in the server's debug logs; at most 100 bytes).
    #[arg(long, default_value = "dev")]
    subject: String,
    #[command(flatten)]
    secrets: SecretArgs,
}

/// `90s`, `30m`, `1h`, `7d`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, as 90s, 30m, 1h, 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
    };
    if number == 0 {
        return Err("a token valid for no time is of no use".into());
    }
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn token(args: TokenArgs) -> ExitCode {
    let keys = match args.secrets.keys() {
        Ok(Some(keys)) => keys,
        Ok(None) => {
            eprintln!(
                "quire token: give the server's secret (--secret, --secret-file or QUIRE_SECRET)"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("quire token: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scope = match quire::auth::Scope::parse(&args.doc) {
        Ok(scope) => scope,
        Err(e) => {
            eprintln!("quire token: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = quire::auth::validate_subject(&args.subject) {
        eprintln!("quire token: {e}");
        return ExitCode::FAILURE;
    }
    let grant = quire::auth::Grant {
        scope,
        access: if args.write {
            quire::auth::Access::Write
        } else {
            quire::auth::Access::Read
        },
        expires_unix_secs: quire::auth::now_unix_secs().saturating_add(args.ttl.as_secs()),
        subject: args.subject,
    };
    println!("{}", keys.mint(&grant));
    ExitCode::SUCCESS
}

/// One worker per core but one. The log's writer thread works through every batch (the
/// write, the sync's block I/O); with a worker per core as well, on a small machine the
/// workers and the writer preempt one another and the workers park and wake each other
/// for work that one of them does alone. Measured with `tools/bench-cpu.sh` on 2 cores
/// (64 clients each, same sitting): 2 workers 9.1-10.2 us of server CPU per op, 1
/// worker 8.1-8.4 us, at the same throughput.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// glibc raises its mmap threshold each time a large block is freed; after that, large
/// buffers (a frame of up to `--max-frame` being received) come from the heap arenas and
/// are kept by the process when freed. A fixed threshold keeps them mmapped, so the
/// memory of closed connections goes back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_system() {
    // SAFETY: mallopt only changes allocator parameters; called once, before any thread
    // is started.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    if ok != 1 {
        tracing::warn!(
            "mallopt(M_MMAP_THRESHOLD) failed; freed frame buffers may stay in the process"
        );
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}

/// No transparent huge pages for this process. mimalloc advises its arenas
/// `MADV_HUGEPAGE`, so with THP in `madvise` mode (Debian's default) each first touch of
/// an arena's 2 MiB range faulted in and zeroed a whole huge page, again after every purge
/// of part of it: `clear_page_erms` was 13-16% of the server's samples under load
/// (`tools/bench-cpu.sh` with `PERF=1`), 135 faults zeroing far more than the 40-57 MiB
/// the process held. With 4 KiB pages the faults follow what the heap really grows by.
/// Measured 2026-12-04, 64 clients on 64 documents, 8 alternated runs each: a median of
/// 15.4 against 17.5 us of server CPU per acknowledged op; 10,000 connections holding
/// 10,000 open documents peak at 118 against 137 MiB of RSS (`tools/bench-limits.sh`).
#[cfg(target_os = "linux")]
fn keep_the_heap_in_small_pages() {
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process's address space.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        // Only a cost in CPU and memory; the server is correct either way.
        eprintln!(
            "quire: prctl(PR_SET_THP_DISABLE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn keep_the_heap_in_small_pages() {}

// mimalloc instead of glibc's malloc: the serving path allocates and frees per op on
// the runtime's worker, where glibc's arenas showed in the profile (malloc, free,
// consolidation, and an `mprotect` every 20 ops growing the worker's arena: ~8% of the
// server's CPU per op). Measured 2026-12-03, 64 clients on 64 documents, 6 alternated
// runs each: a mean of 15.4 against 17.3 us of server CPU per acknowledged op. The cost is
// memory: 10,000 connections holding 10,000 open documents took 149 MiB of RssAnon
// against 113 MiB with glibc (tools/bench-limits.sh, `ONLY=docs`), within the 256 MiB
// the server is held to.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keep_the_heap_in_small_pages();
    // `serve --config FILE`: the file's settings become flags, below the command line
    // and the environment.
    let args = match config_file::with_file_settings(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("quire: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    // The demo prints its own story: only warnings and errors are logged beside it.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Backup(_) | Command::Restore(_) => "info",
        Command::Demo(_) | Command::DemoClient(_) | Command::Token(_) | Command::Export(_) => {
            "warn"
        }
    };
    // Logs go to stderr, coloured only when it is a terminal and NO_COLOR is unset or
    // empty (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(colour).init(),
        LogFormat::Json => logs.json().init(),
    }
    return_large_buffers_to_the_system();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Demo(args) => demo::demo_main(args),
        Command::Token(args) => token(args),
        Command::Backup(args) => backup(args),
        Command::Restore(args) => restore(args),
        Command::Export(args) => export(args),
        Command::DemoClient(args) => demo::client_main(args),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

/// `--admin-listen`: an address, or `off`.
#[derive(Clone, Copy)]
enum AdminListen {
    Off,
    At(std::net::SocketAddr),
}

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(AdminListen::Off);
        }
        s.parse()
            .map(AdminListen::At)
            .map_err(|e| format!("{e}: an address such as 127.0.0.1:7421, or `off`"))
    }
}

/// Limits that bound each other, checked in the flags' own terms and with the least
/// value that would do ([`quire::server::ServerConfig::validate`] checks the server's
/// own in bytes, for those who embed it). The segment's bound joins the log's format
/// and the protocol's op limit, which only this binary puts together.
fn check_limits(args: &ServeArgs) -> Result<(), String> {
    use quire::protocol::{max_op_bytes, MAX_MAX_FRAME, MIN_MAX_FRAME};
    let frame = args.max_frame;
    if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&frame) {
        return Err(format!(
            "--max-frame {frame} is outside {MIN_MAX_FRAME}..={MAX_MAX_FRAME}"
        ));
    }
    let mib = |bytes: usize| bytes.div_ceil(1 << 20);
    for (flag, value, need, what) in [
        (
            "--outbox-mib",
            args.outbox_mib,
            2 * (frame + 4),
            "two frames",
        ),
        (
            "--large-frame-budget-mib",
            args.large_frame_budget_mib,
            frame + 4,
            "one frame",
        ),
        ("--unsynced-mib", args.unsynced_mib, frame, "one op"),
    ] {
        if value.saturating_mul(1 << 20) < need {
            return Err(format!(
                "{flag} {value} cannot hold {what} of --max-frame {frame}: it must be at \
                 least {}",
                mib(need)
            ));
        }
    }
    let record = quire::wal::record::max_op_payload(max_op_bytes(frame));
    let holds = |segment_mib: u64| {
        WalConfig {
            segment_size: segment_mib << 20,
            ..WalConfig::default()
        }
        .max_payload()
            >= record
    };
    if !holds(args.segment_mib) {
        let least = (1..=65536).find(|&m| holds(m)).unwrap_or(65536);
        return Err(format!(
            "--segment-mib {} cannot hold the log record of an op as large as --max-frame \
             {frame} allows ({record} bytes): it must be at least {least}",
            args.segment_mib
        ));
    }
    Ok(())
}

fn serve(args: ServeArgs) -> ExitCode {
    let keys = match args.secrets.keys() {
        Ok(keys) => keys,
        Err(e) => {
            tracing::error!("secrets: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let AdminListen::At(addr) = args.http_listen {
        if let Err(e) = quire::auth::startup(addr, keys.is_some(), args.insecure) {
            tracing::error!("--http-listen: {e}");
            return ExitCode::FAILURE;
        }
    }
    match quire::auth::startup(args.listen, keys.is_some(), args.insecure) {
        Ok(quire::auth::Startup::Tokens) => {
            tracing::info!("clients need an access token signed by the server's secret");
        }
        Ok(quire::auth::Startup::AnonymousLoopback) => tracing::warn!(
            "no secret configured: clients are anonymous and may read and write every \
             document; served on a loopback address only"
        ),
        Ok(quire::auth::Startup::AnonymousInsecure) => tracing::warn!(
            listen = %args.listen,
            "no secret configured and --insecure: anyone who reaches this address may read \
             and write every document"
        ),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    let server_config = quire::server::ServerConfig {
        max_frame: args.max_frame,
        keys: keys.map(std::sync::Arc::new),
        presence_interval: Duration::from_millis(args.presence_interval_ms),
        max_connections: args.max_connections,
        handshake_timeout: Duration::from_secs(args.handshake_timeout_secs),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        write_timeout: Duration::from_secs(args.write_timeout_secs),
        outbox_bytes: args.outbox_mib.saturating_mul(1 << 20),
        large_frame_budget: args.large_frame_budget_mib.saturating_mul(1 << 20),
        unsynced_bytes: args.unsynced_mib.saturating_mul(1 << 20),
        metrics: args.metrics == Switch::On,
        ..Default::default()
    };
    if let Err(e) = check_limits(&args) {
        tracing::error!("invalid limits: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = server_config.validate() {
        tracing::error!("invalid limits: {e}");
        return ExitCode::FAILURE;
    }
    let config = LocalConfig {
        wal: WalConfig {
            segment_size: args.segment_mib << 20,
            recovery: RecoveryOptions {
                repair: args.repair_wal,
            },
            progress: Some(Arc::new(quire::progress::Progress::new(
                "recovering the log",
                0,
            ))),
            ..WalConfig::default()
        },
        snapshot_every_ops: args.snapshot_every_ops.max(1),
        snapshot_every: Duration::from_secs(args.snapshot_every_secs),
        retention: Duration::from_secs(args.retention_secs),
        ..LocalConfig::default()
    };
    if args.cluster.etcd.is_empty() {
        let data_dir = args.data_dir.clone();
        return serve_on(args, server_config, move || {
            let (store, report) = LocalSequencer::open(&data_dir, config)
                .map_err(|e| format!("cannot open {}: {e}", data_dir.display()))?;
            Ok((store, report.elapsed, report.documents))
        });
    }
    serve_cluster(args, server_config, config)
}

/// What `quire serve` needs of its sequencer beyond the trait: the local log under it
/// (its writer's wake-ups, its totals at exit), the work after the server started, and
/// the close.
trait Served: quire::sequencer::Sequencer + Sized {
    fn local(&self) -> &LocalSequencer;
    /// Called once the server exists (cluster mode: redirects of documents that moved).
    fn started(&self, server: &Arc<quire::server::Server<Self>>) {
        let _ = server;
    }
    /// Called at SIGTERM, before the server stops (cluster mode: documents handed to
    /// other nodes, their clients redirected). Blocking. The documents handed over.
    fn drain(&self) -> usize {
        0
    }
    fn close(&self);
}

impl Served for LocalSequencer {
    fn local(&self) -> &LocalSequencer {
        self
    }
    fn close(&self) {
        LocalSequencer::close(self);
    }
}

#[cfg(not(feature = "cluster"))]
fn serve_cluster(_: ServeArgs, _: quire::server::ServerConfig, _: LocalConfig) -> ExitCode {
    tracing::error!(
        "--etcd: this quire was built without cluster mode; build it with `cargo build \
         --release --features cluster` (which needs protoc: apt-get install protobuf-compiler)"
    );
    ExitCode::FAILURE
}

#[cfg(feature = "cluster")]
type EtcdSequencer =
    quire::sequencer::cluster::ClusterSequencer<Arc<quire::cluster::etcd::EtcdStore>>;

#[cfg(feature = "cluster")]
impl Served for EtcdSequencer {
    fn local(&self) -> &LocalSequencer {
        quire::sequencer::cluster::ClusterSequencer::local(self)
    }
    fn started(&self, server: &Arc<quire::server::Server<Self>>) {
        let Some(mut moved) = self.moved() else {
            return;
        };
        let server = Arc::downgrade(server);
        tokio::spawn(async move {
            while let Some((doc, owner)) = moved.recv().await {
                let Some(server) = server.upgrade() else {
                    return;
                };
                server.redirect_document(&doc, owner);
            }
        });
    }
    fn drain(&self) -> usize {
        let handed = quire::sequencer::cluster::ClusterSequencer::drain(self);
        tracing::info!(
            documents = handed,
            "drained: documents handed to other nodes"
        );
        handed
    }
    fn close(&self) {
        quire::sequencer::cluster::ClusterSequencer::close(self);
    }
}

#[cfg(feature = "cluster")]
fn serve_cluster(
    args: ServeArgs,
    server_config: quire::server::ServerConfig,
    local: LocalConfig,
) -> ExitCode {
    let cluster = &args.cluster;
    let (Some(node_id), Some(advertise)) = (cluster.node_id.clone(), cluster.advertise.clone())
    else {
        tracing::error!("--etcd needs --node-id and --advertise");
        return ExitCode::FAILURE;
    };
    if !(1..=60).contains(&cluster.lease_ttl_secs) {
        tracing::error!("--lease-ttl-secs must be 1 ..= 60");
        return ExitCode::FAILURE;
    }
    let config = quire::sequencer::cluster::NodeConfig {
        data_dir: args.data_dir.clone(),
        local: local.clone(),
        prefix: cluster.etcd_prefix.trim_end_matches('/').to_owned(),
        node_id,
        advertise: quire::sequencer::Owner {
            addr: Arc::from(advertise.as_str()),
            ws_url: Arc::from(cluster.advertise_ws.clone().unwrap_or_default().as_str()),
        },
        ttl: Duration::from_secs(cluster.lease_ttl_secs),
        snapshot_every_ops: cluster.cluster_snapshot_every_ops.max(1),
    };
    let endpoints = cluster.etcd.clone();
    serve_on(args, server_config, move || {
        let started = std::time::Instant::now();
        let store = quire::cluster::etcd::EtcdStore::connect(
            quire::cluster::etcd::EtcdConfig::new(endpoints),
        )
        .map_err(|e| format!("etcd: {e}"))?;
        let sequencer = EtcdSequencer::start(Arc::new(store), config)?;
        Ok((sequencer, started.elapsed(), 0))
    })
}

/// Serves with the sequencer `open` makes (on a blocking thread, while the admin
/// endpoint answers): its value, the time it took and the documents it found.
fn serve_on<S: Served>(
    args: ServeArgs,
    server_config: quire::server::ServerConfig,
    open: impl FnOnce() -> Result<(S, Duration, usize), String> + Send + 'static,
) -> ExitCode {
    // The store exists once recovery is done; the runtime (and the admin endpoint on
    // it) starts before, so that readiness can say "recovering".
    let store_cell: Arc<OnceLock<Arc<S>>> = Arc::default();
    let threads = args.threads.unwrap_or_else(default_worker_threads).max(1);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    // A worker wakes the log's writer when it goes idle, not per op: the ops of every
    // request it read in one go are then one batch (see `wal::commit`). Only workers
    // park, so only they are marked (blocking threads wake the writer at once).
    let parked = store_cell.clone();
    builder.on_thread_park(move || {
        quire::wal::commit::defer_writer_wakes_on_this_thread();
        if let Some(store) = parked.get() {
            store.local().wal().pay_owed_writer_wake();
        }
    });
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin_token = match &args.admin_token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match text.lines().next().map(str::trim) {
                Some(token) if token.len() >= 16 => Some(token.to_string()),
                _ => {
                    tracing::error!(
                        "{}: the admin token must be one line of at least 16 bytes",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                tracing::error!("cannot read the admin token file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let data_dir = args.data_dir.clone();
    let store = runtime.block_on(async {
        let admin = Admin::new(AdminConfig {
            data_dir: data_dir.clone(),
            min_free_bytes: args.min_free_mib << 20,
            admin_token,
        });
        let stop_admin = tokio_util::sync::CancellationToken::new();
        let admin_task = match args.admin_listen {
            AdminListen::Off => None,
            AdminListen::At(addr) => match admin::bind(addr).await {
                Ok(listener) => {
                    if let Ok(at) = listener.local_addr() {
                        tracing::info!(admin = %at, "admin endpoint: /metrics /healthz /readyz /docs /backup");
                    }
                    let stop = stop_admin.clone().cancelled_owned();
                    Some(tokio::spawn(admin::serve(admin.clone(), listener, stop)))
                }
                Err(e) => {
                    tracing::error!("cannot listen on {addr} (--admin-listen): {e}");
                    return None;
                }
            },
        };
        // Recovery reads the whole log: on a blocking thread, while the admin
        // endpoint answers.
        let opened = tokio::task::spawn_blocking(open)
            .await
            .expect("recovery does not panic");
        let (store, recovery, documents) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::error!("{e}");
                return None;
            }
        };
        tracing::info!(
            data_dir = %args.data_dir.display(),
            documents,
            "storage engine ready"
        );
        let store = Arc::new(store);
        let _ = store_cell.set(store.clone());
        let listener = match quire::server::bind(args.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", args.listen);
                return Some((store, false));
            }
        };
        // Browsers' WebSockets come through the HTTP listener, handed to the same
        // accept loop as TCP connections.
        let (handoff, ws_acceptor) = quire::server::websocket::acceptor();
        let stop_web = tokio_util::sync::CancellationToken::new();
        let web_task = match args.http_listen {
            AdminListen::Off => None,
            AdminListen::At(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(web_listener) => {
                    if let Ok(at) = web_listener.local_addr() {
                        tracing::info!(http = %at, "WebSocket clients: ws://{at}/ws");
                    }
                    let mut web = quire::web::WebConfig::new(
                        server_config.max_frame,
                        server_config.max_connections,
                    );
                    web.allowed_origins = args.allowed_origin.clone();
                    let stop = stop_web.clone().cancelled_owned();
                    Some(tokio::spawn(quire::web::serve(web_listener, web, handoff, stop)))
                }
                Err(e) => {
                    tracing::error!("cannot listen on {addr} (--http-listen): {e}");
                    return Some((store, false));
                }
            },
        };
        let server = quire::server::Server::new(store.clone(), server_config);
        store.started(&server);
        // The signal handlers and readiness (for /readyz) before the line that says the
        // server serves: the listener accepts from here on.
        let signal = shutdown_signal();
        let draining = store.clone();
        let stop = async move {
            signal.await;
            // The drain's redirects go out through the sessions before they close.
            let handed = tokio::task::spawn_blocking(move || draining.drain()).await;
            if handed.is_ok_and(|n| n > 0) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        admin.serving(server.clone(), recovery);
        if let Ok(at) = listener.local_addr() {
            tracing::info!(listen = %at, "serving");
        }
        let listeners = quire::server::transport::Both::new(listener, ws_acceptor);
        server.serve(listeners, stop).await;
        stop_web.cancel();
        if let Some(task) = web_task {
            let _ = task.await;
        }
        stop_admin.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        Some((store, true))
    });
    let Some((store, served)) = store else {
        return ExitCode::FAILURE;
    };
    tracing::info!("shutting down: finishing queued commits");
    store.close();
    let stats = store.local().wal().stats();
    let (fsync, batch) = (stats.fsync_us(), stats.batch_records());
    tracing::info!(
        records = stats.records.load(std::sync::atomic::Ordering::Relaxed),
        batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed),
        batch_mean = format!("{:.1}", batch.mean),
        batch_p99 = batch.p99,
        fsync_p50_us = fsync.p50,
        fsync_p99_us = fsync.p99,
        "write-ahead log totals"
    );
    match store.local().wal().failure() {
        Some(reason) => {
            tracing::error!("the write-ahead log had failed: {reason}");
            ExitCode::FAILURE
        }
        None if served => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

/// Resolves at SIGTERM or ctrl-c. The handlers are installed when this is called, not
/// when the future is first polled: a SIGTERM sent once the server says it serves must
/// find them (else the default action kills the process without draining).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("cannot listen for SIGTERM or SIGINT ({e}); ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
