//! The deterministic simulator: the real server, the real sequencer and log over the
//! simulated disk, and clients with the real client state machine, over a simulated
//! network, all on one thread under one seed.
//!
//! About half the protocol-level clients, and half the application clients, speak
//! WebSocket: their connections go to the server's HTTP listener, served by the real
//! HTTP layer (`quire::web::serve_on`, its connection bound and idle close included),
//! upgraded as a browser's, and handed to the same
//! server; the others speak TCP. A crash ends the WebSocket ones as it does the TCP
//! ones (`net::HttpDoor`).
//!
//! Everything runs in a current-thread tokio runtime with the clock paused: time moves
//! only when every task waits, straight to the next timer, so a run depends on nothing
//! but its seed. The log and the sequencer run with no thread of their own
//! (`Background::Manual`: a disk task here writes and syncs each batch after a latency
//! drawn from the seed), and the server runs its long work inline (`Blocking::Inline`).
//!
//! Each step picks one action: a client edits (online or offline), reads what arrived,
//! is cut off, falls asleep (its connection stalled) and wakes, reconnects, an
//! application client's network goes silent (`app::Net`:
//! its connections stall, and go on or stay silent for ever when it speaks again), restarts (forgetting everything but its op counter, which
//! some clients persist lazily and so reuse op ids), time passes, the disk starts
//! failing its syncs, a snapshot or truncation pass runs, an online backup begins or
//! (some steps later) is read and restored onto a disk of its own and checked (`backup`),
//! an administrator deletes a
//! document (its clients must be told, and it starts again empty under its id; or, raced
//! by a client that opens it and sends an op meanwhile, sometimes with the disk failing
//! under the tombstone: that client is never told it was deleted unless the deletion
//! held, and is told to retry while it is not durable; a deletion that failed with the
//! disk holds after the restart if its tombstone reached the disk), or the
//! server crashes (losing or tearing unsynced writes) and restarts. After every step it
//! checks:
//! - a client with nothing pending, at the server's durable version, has its text;
//! - no two op ids are acknowledged at one seq, nor one op id at two seqs;
//! - no acknowledged op is lost: the durable version is at least every acked seq,
//!   including after a crash;
//! - nothing panicked, and the server's budgets stay within their limits.
//!
//! And every few steps (after each restart, and at the end): the history holds every
//! acknowledged op at its seq, exactly once, only ops some client sent, and replaying it
//! gives the server's text; a document the server holds can be read (on a disk that is
//! not failing); a deleted document's history does not come back. At the end, faults
//! stop, every client reconnects and settles, and all must have the server's text.
//!
//! `--cluster` runs the cluster world instead (`cluster.rs`: three nodes over one
//! in-memory etcd stand-in); CI runs both.
//!
//! `cargo test --release --test sim` runs the seeds CI runs;
//! `cargo test --release --test sim -- --seed N` replays one (`--verbose` prints each
//! step); `--seeds A..B --steps K` runs more; `--twice` runs each seed twice and
//! compares the runs' digests; `--keep 3,17,40-45` lets only those steps act. Each step
//! draws from a random stream of its own, so a failing run is first shortened (the
//! fewest steps) and then minimised (delta debugging over which steps act), and the
//! replay command printed is of those few steps (`--no-minimise`: the failing run as it
//! is, at once; tools/sim-mutants.sh, which only asks whether a seed fails).

mod app;
mod cluster;
mod disk;
mod net;
mod raw;
// The test sequencer shared with the integration tests.
#[path = "../common/wrapped.rs"]
mod wrapped;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use disk::{sim_sequencer, SimSequencer};
use net::{HttpDoor, LinkConfig, ServerEnd, SimConn, SimListener, Wire};
use quire::client::connection::{ClientError, Connection};
use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;
use quire::server::{Blocking, Server, ServerConfig};
use quire::text::Text;
use quire::wal::index::Location;
use quire::wal::record::{
    decode_frame, framed_len, TombstoneRecord, MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN,
};
use quire::wal::segment::{segment_path, SEGMENT_SIZE_MIN};
use quire::wal::vfs::sim::{CrashMode, SimFs, SplitMix};
use quire::wal::vfs::Vfs;
use quire::wal::{Background, WalConfig};
use raw::{Event, RawDoc};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Seeds `cargo test` runs (CI): under a minute (half the clients over WebSocket cost
/// half as much again per seed as TCP alone; the mutants step runs 500 more per mutant).
const CI_SEEDS: u64 = 500;
/// Of those, the first few are run twice and must give the same run.
const CI_TWICE: u64 = 5;
const DEFAULT_STEPS: u64 = 2_000;
/// Seeds of the cluster world (`--cluster`) `cargo test` runs after those.
const CLUSTER_CI_SEEDS: u64 = 400;
/// Steps of a cluster seed, unless `--steps` says otherwise.
const CLUSTER_STEPS: u64 = 400;
/// Sim time a client waits for any one exchange before it gives up on the connection.
const CLIENT_WAIT: Duration = Duration::from_secs(20);
/// Sim time the end waits for every client to settle once the faults stop.
const SETTLE: Duration = Duration::from_secs(60);

/// Where a failing run stopped, and why.
type Failure = String;

fn data_dir() -> &'static Path {
    Path::new("/data")
}

/// The first panic anywhere (a server task, the log, a check): a finding.
static PANICKED: Mutex<Option<String>> = Mutex::new(None);

struct Incarnation {
    server: Arc<Server<SimSequencer>>,
    sequencer: Arc<LocalSequencer>,
    /// The disk task writes nothing while this is set.
    disk_paused: Arc<std::sync::atomic::AtomicBool>,
    connect: mpsc::UnboundedSender<ServerEnd>,
    /// Its HTTP listener (WebSocket clients'); its connections end with it.
    http: HttpDoor,
    serve: JoinHandle<()>,
    web: JoinHandle<()>,
    disk: JoinHandle<()>,
}

impl Drop for Incarnation {
    fn drop(&mut self) {
        self.http.server_gone();
        self.serve.abort();
        self.web.abort();
        self.disk.abort();
    }
}

struct Client {
    id: u64,
    doc: String,
    synced: Option<RawDoc<SimConn>>,
    wire: Option<Wire>,
    online: bool,
    /// The op counter as the client stored it: what survives its restart.
    stored_next: u64,
    /// Stores its counter only now and then: after a restart it reuses op ids, which the
    /// server must refuse (never ack as the old op, never drop silently).
    lazy: bool,
    /// Ops it sends without waiting for acks (1: one in flight).
    pipeline: usize,
    /// It connects over WebSocket (to the server's HTTP listener), not TCP.
    websocket: bool,
    /// The generation of its document its state is of (`Sim::generations`).
    generation: u64,
    /// Its document was deleted after it opened it: it drops its state when it learns
    /// so (`Error` 32), or before it connects again (an application that heard of the
    /// deletion otherwise: protocol.md, "Deleted documents", on clients offline then).
    must_reopen: bool,
    /// Asleep (a laptop's lid closed): it does nothing, and its connection is stalled
    /// (nothing arrives either way, nobody is told) until it wakes.
    asleep: bool,
}

impl Client {
    /// Drops its document, to open it again from the server's text; its op counter
    /// goes on from the highest it used, `skip` further.
    fn reload(&mut self, skip: u64) {
        let next = self
            .synced
            .as_ref()
            .map_or(self.stored_next, |s| s.doc.next_local_seq());
        self.stored_next = self.stored_next.max(next) + skip;
        self.synced = None;
    }
}

#[derive(Default)]
struct Stats {
    edits: u64,
    acks: u64,
    /// Of those, acks to clients over WebSocket.
    ws_acks: u64,
    crashes: u64,
    sync_failures: u64,
    disk_full: u64,
    cuts: u64,
    /// Protocol-level clients that fell asleep with their connection stalled.
    sleeps: u64,
    /// Of those, the ones that woke to a connection silent for ever.
    sleeps_black_holed: u64,
    client_restarts: u64,
    reloads: u64,
    reused_refused: u64,
    snapshots: u64,
    /// Documents deleted (each durably, then checked gone).
    deletions: u64,
    /// Acks of ops of a generation since deleted, seen after the deletion.
    acks_of_deleted: u64,
    history_checks: u64,
    /// Idle clients found at the server's version whose text was compared.
    texts_compared: u64,
    /// Acknowledged ops found at their seq in the history.
    acks_verified: u64,
    app_edits: u64,
    app_restarts: u64,
    /// Application clients that closed their document and opened it again.
    app_reopens: u64,
    app_offline: u64,
    /// Application clients whose network went silent (see [`app::Net::go_silent`]).
    app_silences: u64,
    /// Of those, the silences that ended with their connections silent for ever.
    app_black_holes: u64,
    /// Application clients reloaded from a snapshot (their version was truncated).
    app_reloads: u64,
    /// Tokens of application clients not found whole at the end, on documents where a
    /// client reloaded.
    tokens_moved_by_reloads: u64,
    /// Segments the maintenance passes removed (truncation).
    segments_removed: u64,
    /// Online backups begun.
    backups: u64,
    /// Of those, the ones read, restored and checked (the others ended by a crash).
    backups_restored: u64,
    /// Documents with acknowledged ops checked in restored backups.
    backup_docs_checked: u64,
    /// Documents exported from restored backups (newest and at a seq), and checked.
    backup_exports: u64,
}

struct Sim {
    seed: u64,
    rng: SplitMix,
    /// A client's edit is a paste (of 500 to 3,500 characters) one time in this many.
    paste_one_in: u64,
    verbose: bool,
    fs: SimFs,
    server: Option<Incarnation>,
    server_config: ServerConfig,
    local_config: LocalConfig,
    link: LinkConfig,
    clients: Vec<Client>,
    docs: Vec<String>,
    /// Clients as applications use the library (`app.rs`), on documents of their own.
    apps: Vec<app::AppClient>,
    app_docs: Vec<String>,
    /// Application documents one of whose clients reloaded.
    reloaded_docs: HashSet<String>,
    /// Every op id a client sent.
    sent: HashSet<OpId>,
    /// Acknowledged: by document, op id → seq and seq → op id (of its current
    /// generation).
    acked: BTreeMap<String, Acked>,
    /// How many times each document was deleted: a deletion starts its next generation
    /// (a new, empty document under the same id).
    generations: HashMap<String, u64>,
    /// Each deleted document's history as it was just before its newest deletion (what
    /// the server still held of it): it must not come back (a deletion undone by a crash
    /// would bring it back). (Op ids are no proof alone: those of a deleted document
    /// may be used again in the new one, as by a client that reuses ids; an op sent
    /// again the same, under its id, leaves this list, see `observe`.)
    deleted_histories: HashMap<String, Vec<quire::op::SequencedOp>>,
    /// Deletions raced by a client (`delete_document`): the local seq of its next op.
    raced_deletions: u64,
    /// A deletion that failed with the disk, which may hold all the same.
    uncertain_deletion: Option<UncertainDeletion>,
    /// The disk fails its syncs from now on (until the next crash).
    disk_failing: bool,
    /// A backup begun and not yet read (a crash ends it: its pin is gone).
    backup: Option<OpenBackup>,
    /// Each restored backup's number and the first client id it would give.
    restored_first_ids: Vec<(u64, u64)>,
    step: u64,
    /// Only these steps act (the others are skipped): a minimised failing run.
    keep: Option<Arc<BTreeSet<u64>>>,
    started: tokio::time::Instant,
    /// Simulated time the run took.
    elapsed: Duration,
    stats: Stats,
    digest: u64,
}

/// One document's acknowledged ops: op id → seq, and seq → op id.
type Acked = (HashMap<OpId, u64>, BTreeMap<u64, OpId>);

/// Notes that op `id` of `doc` was acknowledged at `seq`: an error if another op was
/// acknowledged at that seq, or this op at another (both worlds check every ack).
fn note_ack(acked: &mut Acked, doc: &str, id: OpId, seq: u64) -> Result<(), String> {
    let (by_id, by_seq) = acked;
    if let Some(&earlier) = by_id.get(&id) {
        if earlier != seq {
            return Err(format!(
                "{doc}: op {id:?} acknowledged at seq {earlier} and again at {seq}"
            ));
        }
    }
    if let Some(&other) = by_seq.get(&seq) {
        if other != id {
            return Err(format!(
                "{doc}: seq {seq} acknowledged to op {other:?} and to op {id:?}"
            ));
        }
    }
    by_id.insert(id, seq);
    by_seq.insert(seq, id);
    Ok(())
}

/// Whose history `Sim::check_doc_history` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The running server's.
    Live,
    /// The restored copy of the `n`th backup.
    Backup(u64),
}

/// A backup begun (the real capture: the log pinned, the snapshots linked, its LSN
/// chosen) whose files have not been read yet (`Sim::backup`).
struct OpenBackup {
    number: u64,
    capture: quire::backup::Capture,
    staging: PathBuf,
    /// What was acknowledged when it began, by document: seq -> op id.
    acked: BTreeMap<String, BTreeMap<u64, OpId>>,
}

/// How long a backup may go without renewing its pin: far longer than a run.
const BACKUP_LEASE: Duration = Duration::from_secs(1 << 20);

/// How a deletion raced by a client ended (`World::race_deletion`).
enum Raced {
    /// As the deletion returned (or did not in time).
    Done(Result<Result<Option<u64>, quire::server::DeleteError>, tokio::time::error::Elapsed>),
    /// It failed with the disk under its tombstone: whether the tombstone reached the
    /// disk all the same (it holds after a restart then) is not known.
    Uncertain {
        /// Every record up to this LSN was durable before the tombstone was queued.
        after_lsn: u64,
    },
}

/// A deletion whose outcome the next restart tells (`Raced::Uncertain`).
struct UncertainDeletion {
    doc: String,
    /// The document's version as the deletion began (the racing client's op may come
    /// before its tombstone).
    version: u64,
    after_lsn: u64,
    /// The document's history just before the deletion.
    history: Vec<quire::op::SequencedOp>,
}

fn mix(digest: &mut u64, value: u64) {
    *digest = (*digest ^ value)
        .wrapping_mul(0x100_0000_01b3)
        .rotate_left(5);
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = SplitMix(seed ^ 0x005e_ed0f_0a11);
        let n_docs = 1 + rng.below(3) as usize;
        let n_clients = 2 + rng.below(5) as usize;
        // Which clients speak WebSocket: drawn from a generator of its own, so that
        // the seed's other draws stay those of runs before there was a choice.
        let mut transport = SplitMix(seed ^ 0x0057_eb50_c4e7);
        let docs: Vec<String> = (0..n_docs).map(|i| format!("doc-{i}")).collect();
        let clients = (0..n_clients)
            .map(|i| Client {
                id: 100 + i as u64,
                doc: docs[i % n_docs].clone(),
                synced: None,
                wire: None,
                online: false,
                stored_next: 1,
                lazy: rng.below(4) == 0,
                pipeline: if rng.below(4) == 0 {
                    2 + rng.below(6) as usize
                } else {
                    1
                },
                websocket: transport.below(2) == 0,
                generation: 0,
                must_reopen: false,
                asleep: false,
            })
            .collect();
        let n_apps = 2 + rng.below(5) as usize;
        let app_docs: Vec<String> = (0..n_apps.div_ceil(2))
            .map(|i| format!("app-{i}"))
            .collect();
        let app_link_seed = rng.next_u64();
        let app_persist: Vec<bool> = (0..n_apps).map(|_| rng.below(3) != 0).collect();
        let server_config = ServerConfig {
            max_frame: 4096,
            outbox_bytes: 64 << 10,
            max_connections: n_clients + n_apps + 2,
            large_frame_budget: 64 << 10,
            unsynced_bytes: 16 << 10,
            // A window of a few ops: late ops are transformed over ops read back from
            // the log as often as over ops in memory.
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
            snapshot_every_ops: 10 + rng.below(40),
            // Time-based snapshots and retention read the wall clock: off, so that a run
            // depends on its seed only; truncation runs on every maintenance pass.
            snapshot_every: Duration::from_secs(1 << 30),
            retention: Duration::ZERO,
            ..LocalConfig::default()
        };
        let max_latency = Duration::from_micros(100 + rng.below(20_000));
        let link = LinkConfig {
            min_latency: Duration::from_micros(50),
            max_latency,
            capacity: 16 << 10,
        };
        let apps: Vec<app::AppClient> = (0..n_apps)
            .map(|i| {
                app::AppClient::new(
                    i,
                    app_docs[i % app_docs.len()].clone(),
                    app_persist[i],
                    app_link_seed.wrapping_add(i as u64 * 0x9e37_79b9),
                    link,
                )
            })
            .collect();
        for a in &apps {
            if transport.below(2) == 0 {
                a.net.use_websocket();
            }
        }
        // A third of the runs paste often: their log fills several segments, which
        // truncation removes (under open backups, too).
        let paste_one_in = if rng.below(3) == 0 { 8 } else { 200 };
        Sim {
            seed,
            rng,
            paste_one_in,
            verbose,
            fs: SimFs::new(),
            server: None,
            server_config,
            local_config,
            link,
            clients,
            docs,
            apps,
            app_docs,
            reloaded_docs: HashSet::new(),
            sent: HashSet::new(),
            acked: BTreeMap::new(),
            generations: HashMap::new(),
            deleted_histories: HashMap::new(),
            raced_deletions: 0,
            uncertain_deletion: None,
            disk_failing: false,
            backup: None,
            restored_first_ids: Vec::new(),
            step: 0,
            keep: None,
            started: tokio::time::Instant::now(),
            elapsed: Duration::ZERO,
            stats: Stats::default(),
            digest: 0,
        }
    }

    fn say(&self, what: impl FnOnce() -> String) {
        if self.verbose {
            println!("[{} t={:?}] {}", self.step, self.started.elapsed(), what());
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> Failure {
        format!("seed {} step {}: {what}", self.seed, self.step)
    }

    /// Starts a server on the disk as it is.
    fn start_server(&mut self) -> Result<(), Failure> {
        let fs = Arc::new(self.fs.clone());
        let (sequencer, _report) =
            LocalSequencer::open_with(fs, data_dir(), self.local_config.clone())
                .map_err(|e| self.fail(format!("recovery refused to start: {e}")))?;
        let sequencer = Arc::new(sequencer);
        let disk_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(u) = self.uncertain_deletion.take() {
            // Held if its tombstone is in the log now, after the records that were
            // durable before it was queued, where only it can be. Then recovery starts
            // the document anew (nothing could be written to it after the tombstone).
            // Otherwise it is as it was (its ops checked as every document's are).
            let end = sequencer.wal().durability().durable_lsn;
            let found: Vec<Location> = sequencer.wal().with_index(|index| {
                (u.after_lsn + 1..=end)
                    .filter_map(|lsn| index.tombstone_at(lsn))
                    .collect()
            });
            let mut held = false;
            for at in found {
                let tombstone = self.tombstone_at(sequencer.wal().dir(), at)?;
                if tombstone.doc_id != u.doc || tombstone.version < u.version {
                    return Err(self.fail(format!(
                        "a tombstone of {:?} at version {} at LSN {}, where only one of {} \
                         at version {} or above can be",
                        tombstone.doc_id, tombstone.version, at.lsn, u.doc, u.version
                    )));
                }
                held = true;
            }
            let recovered = sequencer.version(&u.doc);
            self.say(|| format!("{}: the deletion that failed held: {held}", u.doc));
            if held && recovered != 0 {
                return Err(self.fail(format!(
                    "{}: deleted by a deletion that failed, its tombstone after LSN {} in the \
                     log, yet recovered at version {recovered}",
                    u.doc, u.after_lsn
                )));
            }
            if held {
                self.deleted(u.doc, u.version, u.history);
            }
        }
        let (simulated, disk) = sim_sequencer(
            sequencer.clone(),
            SplitMix(self.rng.next_u64()),
            disk_paused.clone(),
        );
        let server = Server::new(Arc::new(simulated), self.server_config.clone());
        let (connect, accepted) = mpsc::unbounded_channel();
        // The HTTP listener of WebSocket clients, served by the real HTTP layer, hands
        // its upgraded connections to the same server.
        let (handoff, ws_acceptor) = quire::server::websocket::acceptor();
        let (http, http_listener) = HttpDoor::new();
        let web_config = quire::web::WebConfig::new(
            self.server_config.max_frame,
            self.server_config.max_connections,
        );
        let web = tokio::spawn(async move {
            let _ =
                quire::web::serve_on(http_listener, web_config, handoff, std::future::pending())
                    .await;
        });
        let serving = server.clone().serve(
            quire::server::transport::Both::new(SimListener(accepted), ws_acceptor),
            std::future::pending(),
        );
        let serve = tokio::spawn(async move {
            serving.await;
        });
        let disk = tokio::spawn(disk);
        for a in &self.apps {
            a.net.set_server(Some(connect.clone()));
            a.net.set_http(app::HOME, Some(http.clone()));
        }
        self.server = Some(Incarnation {
            server,
            sequencer,
            disk_paused,
            connect,
            http,
            serve,
            web,
            disk,
        });
        self.say(|| "server started".into());
        Ok(())
    }

    /// The tombstone record at `at` in the log in `wal_dir`, read from the disk.
    fn tombstone_at(&self, wal_dir: &Path, at: Location) -> Result<TombstoneRecord, Failure> {
        let path = segment_path(wal_dir, at.segment_id);
        let read = |len: usize| -> std::io::Result<Vec<u8>> {
            let mut bytes = vec![0; len];
            self.fs.open(&path)?.read_exact_at(&mut bytes, at.offset)?;
            Ok(bytes)
        };
        let header =
            read(RECORD_HEADER_LEN).map_err(|e| self.fail(format!("reading {at:?}: {e}")))?;
        let payload_len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        let frame = read(framed_len(payload_len.min(MAX_RECORD_PAYLOAD)))
            .map_err(|e| self.fail(format!("reading {at:?}: {e}")))?;
        let raw = decode_frame(&frame).map_err(|e| self.fail(format!("{at:?}: {e:?}")))?;
        TombstoneRecord::decode(raw.payload)
            .map_err(|e| self.fail(format!("the tombstone at {at:?}: {e:?}")))
    }

    /// Ends the server at once, as a power cut does: no task runs again, unsynced writes
    /// are lost or torn.
    async fn crash(&mut self) -> Result<(), Failure> {
        let Some(incarnation) = self.server.take() else {
            return Ok(());
        };
        drop(incarnation);
        for a in &self.apps {
            a.net.set_server(None);
            a.net.set_http(app::HOME, None);
        }
        // Let the aborted tasks be dropped (and with them the server's ends of every
        // connection) before the disk is replaced.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        let mode = if self.rng.below(2) == 0 {
            CrashMode::LoseUnsynced
        } else {
            CrashMode::TearUnsynced {
                seed: self.rng.next_u64(),
            }
        };
        self.fs = self.fs.crash(mode);
        self.disk_failing = false;
        // Its pin died with the server (and its staging directory was never synced).
        self.backup = None;
        self.stats.crashes += 1;
        self.say(|| format!("server crashed ({mode:?})"));
        for c in &mut self.clients {
            c.online = false;
        }
        Ok(())
    }

    fn random_edit(&mut self, len: u32) -> Patch {
        let pos = self.rng.below(len as u64 + 1) as u32;
        let del = (self.rng.below(4) as u32).min(len - pos);
        let n = if self.rng.below(self.paste_one_in) == 0 {
            // Now and then a paste: documents outgrow a frame, and snapshots and
            // catch-ups come in pieces.
            500 + self.rng.below(3_000)
        } else if del == 0 {
            1 + self.rng.below(4)
        } else {
            self.rng.below(4)
        };
        let ins = (0..n)
            .map(|_| (b'a' + self.rng.below(26) as u8) as char)
            .collect();
        Patch { pos, del, ins }
    }

    /// Notes the ops a client has in flight (sent) and what it was told (acks).
    fn observe(&mut self, i: usize) -> Result<(), Failure> {
        let current = self.generations.get(&self.clients[i].doc).copied();
        let client = &mut self.clients[i];
        let (client_id, lazy, doc) = (client.id, client.lazy, client.doc.clone());
        let websocket = client.websocket;
        let of_deleted = client.generation != current.unwrap_or(0);
        let Some(synced) = client.synced.as_mut() else {
            return Ok(());
        };
        for out in synced.doc.all_in_flight() {
            let id = OpId {
                client_id,
                local_seq: out.local_seq,
            };
            self.sent.insert(id);
            if !of_deleted {
                // An op of the deleted history sent again, the same under the same id
                // (a client that reuses ids, restarted): found at its seq, it may be
                // the new one, and so proves nothing (seed 43303: "u" typed into the
                // empty document twice, under the same id, at seq 1).
                if let Some(old) = self.deleted_histories.get_mut(&doc) {
                    old.retain(|o| {
                        o.id != id || o.base_version != out.base_version || o.patches != out.patches
                    });
                }
            }
        }
        let events = synced.take_events();
        if !lazy {
            client.stored_next = synced.doc.next_local_seq();
        }
        for event in events {
            if let Event::Acked { local_seq, seq } = event {
                let id = OpId {
                    client_id,
                    local_seq,
                };
                if of_deleted {
                    // Of an op sequenced before the deletion, delivered after it.
                    self.stats.acks_of_deleted += 1;
                    continue;
                }
                self.stats.ws_acks += u64::from(websocket);
                self.record_ack(&doc, id, seq)?;
            }
        }
        Ok(())
    }

    /// An acknowledgement a client received: one op id per seq, one seq per op id.
    fn record_ack(&mut self, doc: &str, id: OpId, seq: u64) -> Result<(), Failure> {
        self.stats.acks += 1;
        mix(
            &mut self.digest,
            id.client_id ^ (id.local_seq << 20) ^ (seq << 40),
        );
        let acked = self.acked.entry(doc.to_owned()).or_default();
        note_ack(acked, doc, id, seq).map_err(|e| self.fail(e))
    }

    /// Notes what the application clients sent (their ops in flight) and were told
    /// (acks).
    fn observe_apps(&mut self) -> Result<(), Failure> {
        for a in 0..self.apps.len() {
            let doc = self.apps[a].doc.clone();
            let Some(seen) = self.apps[a].observe() else {
                continue;
            };
            if !seen.unacked.is_empty() || !seen.acked.is_empty() {
                let name = self.apps[a].name.clone();
                self.say(|| {
                    format!(
                        "{name} ({:x}): in flight {:?}, acked {:?}",
                        seen.client_id, seen.unacked, seen.acked
                    )
                });
            }
            self.stats.app_reloads += seen.reloads;
            if seen.reloads > 0 {
                self.reloaded_docs.insert(doc.clone());
            }
            for local_seq in seen.unacked {
                self.sent.insert(OpId {
                    client_id: seen.client_id,
                    local_seq,
                });
            }
            for (seq, local_seq) in seen.acked {
                let id = OpId {
                    client_id: seen.client_id,
                    local_seq,
                };
                self.sent.insert(id);
                self.record_ack(&doc, id, seq)?;
            }
        }
        Ok(())
    }

    /// One action of an application client: it edits, loses its connection or its
    /// network, gets it back, or its process is killed and started again.
    async fn app_act(&mut self) -> Result<(), Failure> {
        let i = self.rng.below(self.apps.len() as u64) as usize;
        let name = self.apps[i].name.clone();
        match self.rng.below(100) {
            0..=59 => {
                self.stats.app_edits += 1;
                let edited = timeout(CLIENT_WAIT, self.apps[i].edit(&mut self.rng)).await;
                match edited {
                    Ok(Ok(what)) => self.say(|| format!("{name} edits {what}")),
                    Ok(Err(e)) => return Err(self.fail(e)),
                    Err(_) => return Err(self.fail(format!("{name}: an edit hung"))),
                }
            }
            60..=69 => {
                self.say(|| format!("{name} cut off"));
                self.apps[i].net.cut();
            }
            70..=74 => {
                if self.apps[i].net.is_up() {
                    self.stats.app_offline += 1;
                    self.say(|| format!("{name} goes offline"));
                    self.apps[i].net.set_up(false);
                }
            }
            75..=89 => {
                self.apps[i].net.set_up(true);
                self.end_silence(i);
            }
            90..=94 => {
                self.stats.app_restarts += 1;
                self.say(|| format!("{name} is killed and started again"));
                // What it sent and was told up to its death (its events die with it).
                self.observe_apps()?;
                self.apps[i].kill().await;
                self.start_app(i).await?;
            }
            96 => {
                if !self.apps[i].net.is_silent() {
                    self.stats.app_silences += 1;
                    self.say(|| format!("{name}'s network goes silent"));
                    self.apps[i].net.go_silent();
                }
            }
            95 => {
                // What it was told before its events go with its handle.
                self.observe_apps()?;
                // With a single server, nothing holds an open up for long: the world
                // waits for it.
                if self.apps[i].reopen() {
                    match timeout(app::APP_WAIT, self.apps[i].reopen_done()).await {
                        // No document of an application client is deleted here.
                        Ok(Ok(())) if self.apps[i].told_deleted => {
                            return Err(self.fail(format!(
                                "{name} was told its document was deleted, which it was not"
                            )))
                        }
                        Ok(Ok(())) => {
                            self.stats.app_reopens += 1;
                            self.say(|| format!("{name} closes its document and opens it again"));
                        }
                        Ok(Err(e)) => return Err(self.fail(e)),
                        Err(_) => return Err(self.fail(format!("{name}: opening again hung"))),
                    }
                }
            }
            _ => {
                let us = self.rng.below(20_000);
                tokio::time::sleep(Duration::from_micros(us)).await;
            }
        }
        Ok(())
    }

    /// Client `i` wakes: its connection goes on (what it held arrives, the server's
    /// closing included), or it is found dead without a word to the server (the
    /// server's deadlines must close its end), and the client reconnects.
    fn wake(&mut self, i: usize) {
        let resume = self.rng.below(2) == 0;
        let c = &mut self.clients[i];
        c.asleep = false;
        let id = c.id;
        if resume {
            if let Some(wire) = &c.wire {
                wire.stall(false);
            }
        } else if c.wire.take().is_some() {
            // Not cut: the server's end hears nothing of it.
            c.online = false;
            self.stats.sleeps_black_holed += 1;
        }
        self.say(|| {
            format!(
                "client {id} wakes; its connection {}",
                if resume {
                    "goes on"
                } else {
                    "is dead, silently"
                }
            )
        });
    }

    /// An application client's silent network speaks again: its connections go on, or
    /// stay silent for ever (the client's and the server's deadlines must close them).
    fn end_silence(&mut self, i: usize) {
        if self.apps[i].net.is_silent() {
            let resume = self.rng.below(2) == 0;
            if !resume {
                self.stats.app_black_holes += 1;
            }
            let name = &self.apps[i].name;
            self.say(|| {
                format!(
                    "{name}'s network speaks again; its connections {}",
                    if resume { "go on" } else { "stay silent" }
                )
            });
            self.apps[i].net.speak(resume);
        }
    }

    async fn start_app(&mut self, i: usize) -> Result<(), Failure> {
        match timeout(app::APP_WAIT, self.apps[i].start()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.fail(e)),
            Err(_) => Err(self.fail(format!("{}: start hung", self.apps[i].name))),
        }
    }

    /// What a client does with an error from its connection or the server.
    fn on_error(&mut self, i: usize, error: ClientError) -> Result<(), Failure> {
        let error = match error {
            ClientError::Handshake { code, message } => {
                ClientError::Refused(format!("{code:?}: {message}"))
            }
            other => other,
        };
        let client = &mut self.clients[i];
        if let Some(wire) = client.wire.take() {
            wire.cut();
        }
        client.online = false;
        match error {
            // The simulated network loses, delays and cuts, but never garbles: bytes
            // the client cannot read as WebSocket messages are the server's doing.
            ClientError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(self.fail(format!(
                    "client {}: the server broke the WebSocket protocol: {e}",
                    self.clients[i].id
                )))
            }
            // Turned into `Refused` above.
            ClientError::Io(_) | ClientError::Handshake { .. } => {}
            ClientError::MustReload => {
                self.stats.reloads += 1;
                client.reload(0);
            }
            ClientError::Protocol(m) => {
                return Err(self.fail(format!(
                    "client {}: the server sent something inconsistent: {m}",
                    self.clients[i].id
                )))
            }
            ClientError::Refused(m) => {
                let id = client.id;
                if m.contains("DocumentDeleted") {
                    if !client.must_reopen {
                        return Err(self.fail(format!(
                            "client {id} was told its document was deleted, which it was not: {m}"
                        )));
                    }
                    // Its state goes (pending ops too: they were of the deleted
                    // document); it opens the new one.
                    client.must_reopen = false;
                    client.reload(0);
                } else if m.contains("OpIdReused") {
                    // It reused op ids (its counter was stored late): it starts again
                    // from the server's text with a counter far ahead.
                    self.stats.reused_refused += 1;
                    client.reload(1_000);
                } else if m.contains("TooOld")
                    || m.contains("PipelineConflict")
                    || m.contains("Reload")
                    || m.contains("reload")
                {
                    self.stats.reloads += 1;
                    client.reload(0);
                }
                self.say(|| format!("client {id} refused: {m}"));
            }
        }
        Ok(())
    }

    /// Connects client `i` (if the server is up) and opens or resumes its document.
    async fn connect(&mut self, i: usize) -> Result<(), Failure> {
        let Some(incarnation) = &self.server else {
            return Ok(());
        };
        if self.clients[i].asleep {
            return Ok(());
        }
        let (stream, wire) = if self.clients[i].websocket {
            let Some((client_end, wire)) = incarnation.http.dial(&mut self.rng, self.link) else {
                return Ok(());
            };
            match timeout(
                CLIENT_WAIT,
                net::upgrade(client_end, &net::ws_url(app::HOME)),
            )
            .await
            {
                Ok(Ok(ws)) => (ws, wire),
                // Nothing faults a connection while it is being made: a refused
                // upgrade is the HTTP layer's doing.
                Ok(Err(e)) => {
                    let id = self.clients[i].id;
                    return Err(
                        self.fail(format!("client {id}: the WebSocket upgrade failed: {e}"))
                    );
                }
                Err(_) => {
                    wire.cut();
                    return Ok(());
                }
            }
        } else {
            let (server_end, client_end, wire) = Wire::new(&mut self.rng, self.link);
            if incarnation.connect.send(server_end).is_err() {
                return Ok(());
            }
            (SimConn::Left(client_end), wire)
        };
        let id = self.clients[i].id;
        if std::mem::take(&mut self.clients[i].must_reopen) {
            self.clients[i].reload(0);
        }
        let generation = self.generations.get(&self.clients[i].doc).copied();
        let conn = match timeout(CLIENT_WAIT, Connection::handshake(stream, id, "")).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                wire.cut();
                return self.on_error(i, e);
            }
            Err(_) => {
                wire.cut();
                return Ok(());
            }
        };
        self.clients[i].wire = Some(wire);
        let client = &mut self.clients[i];
        let outcome = match client.synced.as_mut() {
            Some(synced) => timeout(CLIENT_WAIT, synced.resume(conn)).await,
            None => {
                match timeout(
                    CLIENT_WAIT,
                    RawDoc::open(conn, &client.doc, client.stored_next),
                )
                .await
                {
                    Ok(Ok(mut synced)) => {
                        if client.pipeline > 1 {
                            synced.doc = synced.doc.clone().pipelined(client.pipeline);
                        }
                        client.synced = Some(synced);
                        client.generation = generation.unwrap_or(0);
                        Ok(Ok(()))
                    }
                    Ok(Err(e)) => Ok(Err(e)),
                    Err(e) => Err(e),
                }
            }
        };
        match outcome {
            Ok(Ok(())) => {
                self.clients[i].online = true;
                let over = if self.clients[i].websocket {
                    "WebSocket"
                } else {
                    "TCP"
                };
                self.say(|| format!("client {id} connected over {over}"));
                self.observe(i)
            }
            Ok(Err(e)) => {
                self.observe(i)?;
                self.on_error(i, e)
            }
            Err(_) => {
                self.observe(i)?;
                if let Some(wire) = self.clients[i].wire.take() {
                    wire.cut();
                }
                Ok(())
            }
        }
    }

    async fn edit(&mut self, i: usize) -> Result<(), Failure> {
        if self.clients[i].asleep {
            return Ok(());
        }
        let Some(len) = self.clients[i].synced.as_ref().map(|s| s.doc.len_chars()) else {
            return Ok(());
        };
        let patch = self.random_edit(len);
        self.stats.edits += 1;
        let id = self.clients[i].id;
        self.say(|| format!("client {id} edits {patch:?}"));
        let online = self.clients[i].online;
        let synced = self.clients[i].synced.as_mut().expect("checked above");
        if online {
            let outcome = timeout(CLIENT_WAIT, synced.edit(std::slice::from_ref(&patch))).await;
            self.after_exchange(i, outcome)
        } else {
            // Offline: applied locally, sent after the reconnect.
            synced
                .doc
                .local_edit(&[patch])
                .map_err(|e| self.fail(format!("local edit refused: {e:?}")))
        }
    }

    async fn poll(&mut self, i: usize) -> Result<(), Failure> {
        if !self.clients[i].online || self.clients[i].asleep {
            return Ok(());
        }
        let Some(synced) = self.clients[i].synced.as_mut() else {
            return Ok(());
        };
        let outcome = timeout(CLIENT_WAIT, synced.poll()).await;
        self.after_exchange(i, outcome)
    }

    /// Notes what client `i` sent and was told in an exchange with the server, and what
    /// it does if the exchange failed or got no answer in time (it drops the
    /// connection and reconnects later).
    fn after_exchange(
        &mut self,
        i: usize,
        outcome: Result<Result<(), ClientError>, tokio::time::error::Elapsed>,
    ) -> Result<(), Failure> {
        self.observe(i)?;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => self.on_error(i, e),
            Err(_) => {
                if let Some(wire) = self.clients[i].wire.take() {
                    wire.cut();
                }
                self.clients[i].online = false;
                Ok(())
            }
        }
    }

    /// A client that sends bad input (garbage bytes, a frame over the limit, an op that
    /// does not apply, an unknown document name): it must be told so with an `Error` or
    /// `Reject`, never met with silence; everyone else goes on being served.
    async fn misbehave(&mut self) -> Result<(), Failure> {
        let Some(incarnation) = &self.server else {
            return Ok(());
        };
        let (server_end, client_end, wire) = Wire::new(&mut self.rng, self.link);
        if incarnation.connect.send(server_end).is_err() {
            return Ok(());
        }
        let kind = self.rng.below(4);
        let doc = self.docs[self.rng.below(self.docs.len() as u64) as usize].clone();
        let garbage: Vec<u8> = (0..1 + self.rng.below(64))
            .map(|_| self.rng.below(256) as u8)
            .collect();
        self.say(|| format!("a misbehaving client ({kind}) on {doc}"));
        let outcome = timeout(CLIENT_WAIT, async move {
            let id = 900_000 + kind;
            let mut conn = Connection::handshake(client_end, id, "").await?;
            match kind {
                0 => {
                    let mut bytes = (garbage.len() as u32).to_le_bytes().to_vec();
                    bytes.extend_from_slice(&garbage);
                    bytes[4] = 0xEE; // no such message type
                    conn.send_raw(&bytes).await?
                }
                1 => conn.send_raw(&(1u32 << 30).to_le_bytes()).await?,
                2 => {
                    conn.send(quire::protocol::message::Message::Submit {
                        doc,
                        local_seq: 1,
                        base_version: 0,
                        patches: vec![Patch {
                            pos: u32::MAX - 1,
                            del: 5,
                            ins: "x".into(),
                        }],
                    })
                    .await?;
                }
                _ => {
                    conn.send(quire::protocol::message::Message::Open {
                        doc: "\u{1}bad".into(),
                        known_version: 0,
                    })
                    .await?;
                }
            }
            loop {
                let env = conn.recv().await?;
                if let quire::protocol::message::Message::Error { .. }
                | quire::protocol::message::Message::Reject { .. } = env.message
                {
                    return Ok::<_, ClientError>(env.message);
                }
            }
        })
        .await;
        wire.cut();
        match outcome {
            Ok(Ok(_)) => Ok(()),
            // Refused at the handshake (say, over the connection limit): an error too.
            Ok(Err(ClientError::Refused(_) | ClientError::Handshake { .. })) => Ok(()),
            Ok(Err(e)) => Err(self.fail(format!(
                "a client that sent bad input ({kind}) got no Error or Reject: {e}"
            ))),
            Err(_) => Err(self.fail(format!(
                "a client that sent bad input ({kind}) got no answer in {CLIENT_WAIT:?}"
            ))),
        }
    }

    /// One random action.
    async fn act(&mut self) -> Result<(), Failure> {
        if !self.apps.is_empty() && self.rng.below(3) == 0 {
            return self.app_act().await;
        }
        let n = self.clients.len();
        let i = self.rng.below(n as u64) as usize;
        let roll = self.rng.below(1000);
        match roll {
            0..=299 => self.edit(i).await?,
            300..=549 => self.poll(i).await?,
            745..=746 => self.delete_document(false).await?,
            550..=744 => {
                let us = self.rng.below(5_000);
                tokio::time::sleep(Duration::from_micros(us)).await;
            }
            747..=749 => {
                // A long pause: idle and handshake deadlines expire, presence and
                // write timers fire, clients that said nothing are closed (code 10).
                let ms = 1_000 + self.rng.below(90_000);
                self.say(|| format!("{ms} ms pass"));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            750..=799 => {
                if !self.clients[i].online || self.clients[i].wire.is_none() {
                    self.connect(i).await?;
                }
            }
            800..=829 => {
                if let Some(wire) = self.clients[i].wire.take() {
                    self.stats.cuts += 1;
                    self.say(|| format!("client {} cut off", self.clients[i].id));
                    wire.cut();
                    self.clients[i].online = false;
                }
            }
            830..=839 => {
                // The client's process restarts: all but its stored counter is gone.
                self.stats.client_restarts += 1;
                let c = &mut self.clients[i];
                c.asleep = false;
                if let Some(wire) = c.wire.take() {
                    wire.cut();
                }
                c.synced = None;
                c.online = false;
                if c.lazy && self.rng.below(2) == 0 {
                    // Stored now and then: this time it is stored.
                }
                let id = c.id;
                self.say(|| format!("client {id} restarts"));
            }
            840..=842 => self.misbehave().await?,
            843..=849 => {
                // A lazy client stores its counter now.
                let c = &mut self.clients[i];
                if let Some(s) = &c.synced {
                    c.stored_next = s.doc.next_local_seq();
                }
            }
            850..=869 => {
                if let Some(inc) = &self.server {
                    let seq = inc.sequencer.clone();
                    self.stats.snapshots += 1;
                    // Errors are the failing disk's; the log goes on without.
                    if let Ok(removed) = seq.run_maintenance() {
                        self.stats.segments_removed += removed as u64;
                        if removed > 0 {
                            self.say(|| format!("truncation removed {removed} segments"));
                        }
                    }
                    let doc = self.docs[self.rng.below(self.docs.len() as u64) as usize].clone();
                    let _ = seq.snapshot_now(&doc);
                }
            }
            870..=871 => {
                if self.server.is_some() && !self.disk_failing {
                    let after = self.rng.below(4);
                    self.fs.fail_syncs_after(after);
                    self.disk_failing = true;
                    self.stats.sync_failures += 1;
                    self.say(|| format!("the disk fails its syncs after {after} more"));
                }
            }
            872 => {
                if self.server.is_some() && !self.disk_failing {
                    let room = self.rng.below(96 << 10);
                    self.fs.fill_after(room);
                    self.disk_failing = true;
                    self.stats.disk_full += 1;
                    self.say(|| format!("the disk is full after {room} more bytes"));
                }
            }
            873..=874 => {
                self.crash().await?;
                self.check_durable().await?;
            }
            875..=876 => {
                let online = self.clients[i].online && !self.clients[i].asleep;
                if let Some(synced) = self.clients[i].synced.as_mut() {
                    if online {
                        let len = synced.doc.len_chars() as u64;
                        let at = self.rng.below(len + 1) as u32;
                        let selection = quire::protocol::message::Selection {
                            anchor: at,
                            head: at,
                        };
                        let sent = timeout(CLIENT_WAIT, synced.set_presence(vec![selection])).await;
                        if let Ok(Err(e)) = sent {
                            self.on_error(i, e)?;
                        }
                    }
                }
            }
            877..=899 => {
                if self.server.is_none() {
                    self.start_server()?;
                    self.check_durable().await?;
                    self.check_history().await?;
                }
            }
            900 => self.delete_document(true).await?,
            911..=915 => self.backup().await?,
            901..=910 => {
                if self.clients[i].asleep {
                    self.wake(i);
                } else if self.clients[i].online {
                    if let Some(wire) = &self.clients[i].wire {
                        wire.stall(true);
                        self.clients[i].asleep = true;
                        self.stats.sleeps += 1;
                        let id = self.clients[i].id;
                        self.say(|| format!("client {id} falls asleep (its connection stalls)"));
                    }
                }
            }
            _ => {
                // Every client reads what arrived.
                for i in 0..n {
                    self.poll(i).await?;
                }
            }
        }
        // A server whose disk failed is restarted by its operator, after a while.
        if self.disk_failing && self.rng.below(50) == 0 {
            self.crash().await?;
            self.start_server()?;
        }
        Ok(())
    }

    /// An online backup, as `POST /backup` takes one: begun here, its files read some
    /// steps later (whatever ran meanwhile: edits, snapshot and truncation passes,
    /// deletions, a failing disk), then restored onto a disk of its own with the checks
    /// `quire restore` makes (every snapshot decoded, the client ids moved on, recovery
    /// to exactly the manifest's LSN and versions). The restored copy must hold every op
    /// acknowledged before the backup began, at its seq, and only ops clients sent.
    async fn backup(&mut self) -> Result<(), Failure> {
        if let Some(open) = self.backup.take() {
            return self.restore_backup(open).await;
        }
        let Some(inc) = &self.server else {
            return Ok(());
        };
        let sequencer = inc.sequencer.clone();
        self.stats.backups += 1;
        let number = self.stats.backups;
        let staging = PathBuf::from(format!("/backup-staging/{number}"));
        use quire::backup::BackupSource;
        let capture = match sequencer.begin_backup(&staging, BACKUP_LEASE) {
            Ok(capture) => capture,
            // A deletion the failed disk left under way: settled by the restart.
            Err(
                e @ quire::backup::BackupError::DeletionUnderWay {
                    log_failed: Some(_),
                },
            ) if self.disk_failing => {
                self.say(|| format!("backup {number} refused: {e}"));
                return Ok(());
            }
            Err(e) => return Err(self.fail(format!("backup {number} could not begin: {e}"))),
        };
        self.say(|| {
            format!(
                "backup {number} begun at LSN {}: {} files, {} documents",
                capture.lsn,
                capture.files.len(),
                capture.docs.len()
            )
        });
        mix(&mut self.digest, capture.lsn ^ 0xbac0);
        let acked = self
            .acked
            .iter()
            .map(|(doc, (_, by_seq))| (doc.clone(), by_seq.clone()))
            .collect();
        self.backup = Some(OpenBackup {
            number,
            capture,
            staging,
            acked,
        });
        Ok(())
    }

    /// Reads the open backup's files, ends it, restores them onto a disk of their own
    /// and checks what they hold (see `backup`).
    async fn restore_backup(&mut self, open: OpenBackup) -> Result<(), Failure> {
        let OpenBackup {
            number,
            capture,
            staging,
            acked,
        } = open;
        let restored = SimFs::new();
        for dir in ["wal", "snapshots"] {
            restored
                .create_dir_all(&data_dir().join(dir))
                .map_err(|e| self.fail(format!("backup {number}: {e}")))?;
        }
        for file in &capture.files {
            let mut bytes = vec![0; file.len as usize];
            self.fs
                .open(&file.path)
                .and_then(|f| f.read_exact_at(&mut bytes, 0))
                .map_err(|e| {
                    self.fail(format!(
                        "backup {number}: {} ({} bytes at {}) cannot be read while the \
                         backup holds it: {e}",
                        file.name,
                        file.len,
                        file.path.display()
                    ))
                })?;
            let target = restored.create(&data_dir().join(&file.name)).and_then(|f| {
                f.write_all_at(&bytes, 0)?;
                f.set_len(file.restored_len)?;
                f.sync_all()
            });
            target.map_err(|e| self.fail(format!("backup {number}: {}: {e}", file.name)))?;
        }
        if let Some(inc) = &self.server {
            use quire::backup::BackupSource;
            inc.sequencer.end_backup(capture.pin);
        }
        for file in capture
            .files
            .iter()
            .filter(|f| f.path.starts_with(&staging))
        {
            self.fs.remove(&file.path).map_err(|e| {
                self.fail(format!("backup {number}: removing {:?}: {e}", file.path))
            })?;
        }
        let manifest = capture.manifest();
        let vfs: Arc<dyn Vfs> = Arc::new(restored);
        quire::backup::restore::finish(
            vfs.clone(),
            data_dir(),
            &manifest,
            self.local_config.clone(),
        )
        .map_err(|e| self.fail(format!("backup {number} does not restore: {e}")))?;
        let first_id = quire::sequencer::client_ids::ClientIds::open(vfs.clone(), data_dir())
            .and_then(|ids| ids.assign())
            .map_err(|e| self.fail(format!("backup {number}: restored client ids: {e}")))?;
        self.restored_first_ids.push((number, first_id));
        let (store, _) =
            LocalSequencer::open_with(vfs.clone(), data_dir(), self.local_config.clone()).map_err(
                |e| {
                    self.fail(format!(
                        "backup {number}: the restored copy does not open: {e}"
                    ))
                },
            )?;
        self.stats.backups_restored += 1;
        let docs: Vec<String> = self.docs.iter().chain(&self.app_docs).cloned().collect();
        for doc in &docs {
            let acked = acked.get(doc).filter(|a| !a.is_empty());
            self.stats.backup_docs_checked += u64::from(acked.is_some());
            self.check_doc_history(&store, doc, acked, Held::Backup(number))
                .await?;
        }
        // What `quire export` must give from the copy: each document's newest text, and
        // its text at a seq drawn from its history (replayed from the copy's log where
        // the log holds it from seq 1; otherwise it comes from a snapshot, or is not
        // retained).
        let mut exports = Vec::new();
        for doc in docs {
            let Ok(Some(view)) = store.read(&doc).await else {
                continue;
            };
            if view.version == 0 {
                continue;
            }
            let at = 1 + self.rng.below(view.version);
            let replayed = match store.ops_after(&doc, 0, at as usize) {
                Ok(Some(ops)) if ops.len() as u64 == at && ops[0].seq == 1 => {
                    let mut text = Text::default();
                    for op in &ops {
                        text.apply(&op.patches).map_err(|e| {
                            self.fail(format!("backup {number}: {doc} seq {}: {e}", op.seq))
                        })?;
                    }
                    Some(text.to_string())
                }
                _ => None,
            };
            exports.push((doc, view, at, replayed));
        }
        store.close();
        drop(store); // its lock on the directory with it
        use quire::backup::export::{export_with, ExportError};
        for (doc, view, at, replayed) in exports {
            match export_with(vfs.clone(), data_dir(), &doc, None) {
                Ok(e) if e.version == view.version && e.text == view.text => {}
                other => {
                    return Err(self.fail(format!(
                        "backup {number}: exporting {doc} gives {other:?}; the restored copy \
                         reads {:?} at version {}",
                        view.text, view.version
                    )))
                }
            }
            match (
                export_with(vfs.clone(), data_dir(), &doc, Some(at)),
                &replayed,
            ) {
                (Ok(e), Some(text)) if e.version == at && &e.text == text => {}
                (Ok(e), None) if e.version == at => {}
                (Err(ExportError::NotRetained { .. }), None) => {}
                (other, _) => {
                    return Err(self.fail(format!(
                        "backup {number}: exporting {doc} at {at} gives {other:?}; its log \
                         replayed gives {replayed:?}"
                    )))
                }
            }
            self.stats.backup_exports += 1;
        }
        self.say(|| format!("backup {number} restored and checked"));
        Ok(())
    }

    /// An administrator deletes one of the documents (the admin endpoint's path). On a
    /// disk that is not failing it must succeed, at a version no lower than any op
    /// acknowledged; then every op acknowledged so far is of a deleted generation (none
    /// may come back, a crash and recovery included), the clients that have it open
    /// must be told (`Error` 32), and the id starts again, empty.
    ///
    /// `raced`: a client that connects meanwhile opens the document and sends an op
    /// while the deletion is under way, and half the time the disk fails under the
    /// tombstone. Unless the deletion holds, that client must not have been told the
    /// document was deleted (it would drop its edits to a document that is not).
    async fn delete_document(&mut self, raced: bool) -> Result<(), Failure> {
        let Some(inc) = &self.server else {
            return Ok(());
        };
        if self.disk_failing {
            return Ok(());
        }
        let server = inc.server.clone();
        let sequencer = inc.sequencer.clone();
        let doc = self.docs[self.rng.below(self.docs.len() as u64) as usize].clone();
        // What the server holds of its history now (from the oldest op it keeps).
        let mut history: Vec<quire::op::SequencedOp> = Vec::new();
        while let Ok(Some(batch)) =
            sequencer.ops_after(&doc, history.last().map_or(0, |o| o.seq), 4096)
        {
            if batch.is_empty() {
                break;
            }
            history.extend(batch);
        }
        let deleted = if raced {
            // Not `history`, which is empty once the log is truncated.
            let version = sequencer.version(&doc);
            match self.race_deletion(&doc, version > 0).await? {
                Raced::Done(deleted) => deleted,
                Raced::Uncertain { after_lsn } => {
                    // The disk failed under it, as it was made to: whether it holds is
                    // known at the restart (`start_server`).
                    self.uncertain_deletion = Some(UncertainDeletion {
                        doc,
                        version,
                        after_lsn,
                        history,
                    });
                    return Ok(());
                }
            }
        } else {
            timeout(CLIENT_WAIT, server.delete_document(&doc)).await
        };
        let deleted = match deleted {
            Ok(Ok(deleted)) => deleted,
            Ok(Err(e)) => return Err(self.fail(format!("deleting {doc} failed: {e}"))),
            Err(_) => return Err(self.fail(format!("deleting {doc} did not finish"))),
        };
        let acked = self.acked.remove(&doc).unwrap_or_default();
        let top = acked.1.keys().next_back().copied().unwrap_or(0);
        let Some(version) = deleted else {
            if top > 0 {
                return Err(self.fail(format!(
                    "{doc}: not found to delete, with an op acknowledged at seq {top}"
                )));
            }
            return Ok(());
        };
        if version < top {
            return Err(self.fail(format!(
                "{doc}: deleted at version {version}, below an op acknowledged at seq {top}"
            )));
        }
        self.deleted(doc, version, history);
        Ok(())
    }

    /// What a deletion of `doc` at `version` that held changes: every op acknowledged so
    /// far is of a deleted generation, and the clients that have it open must open it
    /// again.
    fn deleted(&mut self, doc: String, version: u64, history: Vec<quire::op::SequencedOp>) {
        self.acked.remove(&doc);
        self.stats.deletions += 1;
        mix(&mut self.digest, version ^ 0xde1e7e);
        self.say(|| format!("{doc} deleted at version {version}"));
        self.deleted_histories.insert(doc.clone(), history);
        *self.generations.entry(doc.clone()).or_default() += 1;
        for c in self.clients.iter_mut().filter(|c| c.doc == doc) {
            if c.synced.is_some() {
                c.must_reopen = true;
            }
        }
    }

    /// The deletion of `doc` raced by a client that connects first, then opens the
    /// document and sends an op while the deletion runs (see `delete_document`): the
    /// deletion's outcome, which is not known if the disk was made to fail under it (it
    /// must then fail, and the client must not have been told the document was deleted).
    async fn race_deletion(&mut self, doc: &str, had_ops: bool) -> Result<Raced, Failure> {
        use quire::protocol::message::{ErrorCode, Message};
        const RACER: u64 = 900_100;
        let Some(inc) = &self.server else {
            return Ok(Raced::Done(Ok(Ok(None))));
        };
        let (server, sequencer) = (inc.server.clone(), inc.sequencer.clone());
        let (server_end, client_end, wire) = Wire::new(&mut self.rng, self.link);
        if inc.connect.send(server_end).is_err() {
            return Ok(Raced::Done(
                timeout(CLIENT_WAIT, server.delete_document(doc)).await,
            ));
        }
        let mut conn =
            match timeout(CLIENT_WAIT, Connection::handshake(client_end, RACER, "")).await {
                Ok(Ok(conn)) => conn,
                _ => {
                    wire.cut();
                    return Ok(Raced::Done(
                        timeout(CLIENT_WAIT, server.delete_document(doc)).await,
                    ));
                }
            };
        let fail = self.rng.below(2) == 0;
        if fail {
            self.fs.fail_syncs_after(0);
            self.disk_failing = true;
            self.stats.sync_failures += 1;
        }
        self.raced_deletions += 1;
        let local_seq = self.raced_deletions;
        self.sent.insert(OpId {
            client_id: RACER,
            local_seq,
        });
        self.say(|| format!("{doc} is deleted, raced by a client (the disk failing: {fail})"));
        // Its tombstone gets a later LSN than every record durable now.
        let after_lsn = sequencer.wal().durability().durable_lsn;
        // Half the time the disk writes nothing until the client is answered, so that
        // its op reaches a deletion not durable yet (otherwise the deletion is often
        // done first).
        let paused = self.rng.below(2) == 0;
        let disk_paused = self.server.as_ref().map(|inc| inc.disk_paused.clone());
        if let Some(flag) = disk_paused.as_ref().filter(|_| paused) {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let deletion = tokio::spawn({
            let (server, doc) = (server.clone(), doc.to_owned());
            async move { server.delete_document(&doc).await }
        });
        let mut tombstone_queued = false;
        if paused && had_ops {
            for _ in 0..1_000 {
                if sequencer.version(doc) == 0 {
                    tombstone_queued = true;
                    break;
                }
                tokio::time::sleep(Duration::from_micros(10)).await;
            }
        }
        let d = doc.to_owned();
        let answer = timeout(CLIENT_WAIT, async move {
            conn.send(Message::Open {
                doc: d.clone(),
                known_version: 0,
            })
            .await?;
            let mut version = 0;
            loop {
                match conn.recv().await?.message {
                    Message::Snapshot { version: v, .. } => version = v,
                    Message::Ops { more: false, .. } => break,
                    m @ (Message::Error { .. } | Message::Reject { .. }) => return Ok(m),
                    _ => {}
                }
            }
            conn.send(Message::Submit {
                doc: d,
                local_seq,
                base_version: version,
                patches: vec![Patch::new(0, 0, "r")],
            })
            .await?;
            loop {
                if let m @ (Message::Ack { .. } | Message::Reject { .. } | Message::Error { .. }) =
                    conn.recv().await?.message
                {
                    return Ok::<_, ClientError>(m);
                }
            }
        })
        .await;
        wire.cut();
        if let Some(flag) = &disk_paused {
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        if tombstone_queued
            && !matches!(
                &answer,
                Ok(Ok(Message::Reject {
                    code: ErrorCode::Unavailable,
                    ..
                }))
            )
        {
            return Err(self.fail(format!(
                "an op on {doc} while its deletion was not durable got {answer:?}, not Reject 33"
            )));
        }
        let deleted = match timeout(CLIENT_WAIT, deletion).await {
            Ok(Ok(deleted)) => Ok(deleted),
            Ok(Err(e)) => return Err(self.fail(format!("the deletion of {doc} panicked: {e}"))),
            Err(elapsed) => Err(elapsed),
        };
        self.say(|| format!("the racing client got {answer:?}; the deletion: {deleted:?}"));
        if !fail {
            return Ok(Raced::Done(deleted));
        }
        let told_deleted = matches!(
            &answer,
            Ok(Ok(Message::Reject {
                code: ErrorCode::DocumentDeleted,
                ..
            } | Message::Error {
                code: ErrorCode::DocumentDeleted,
                ..
            }))
        );
        match deleted {
            Ok(Ok(Some(version))) => Err(self.fail(format!(
                "{doc} was deleted (at version {version}) although its tombstone's sync failed"
            ))),
            Ok(Ok(None)) | Ok(Err(_)) if told_deleted => Err(self.fail(format!(
                "a client was told {doc} was deleted, which it was not known to be: {answer:?}"
            ))),
            Ok(Ok(None)) => Ok(Raced::Done(Ok(Ok(None)))),
            Ok(Err(_)) => Ok(Raced::Uncertain { after_lsn }),
            Err(_) => Err(self.fail(format!("deleting {doc} did not finish"))),
        }
    }

    /// Checks after every step.
    async fn check(&mut self) -> Result<(), Failure> {
        if let Some(p) = PANICKED.lock().unwrap().clone() {
            return Err(self.fail(format!("a panic: {p}")));
        }
        let Some(inc) = &self.server else {
            return Ok(());
        };
        let server = inc.server.clone();
        let sequencer = inc.sequencer.clone();
        let config = &self.server_config;
        if server.large_frame_bytes_in_use() > config.large_frame_budget {
            return Err(self.fail("large-frame budget exceeded"));
        }
        if server.connected_clients() > config.max_connections {
            return Err(self.fail("more clients than max connections"));
        }
        if server.largest_outbox() > config.outbox_bytes {
            return Err(self.fail(format!(
                "{} bytes queued for one client, over the outbox limit of {}",
                server.largest_outbox(),
                config.outbox_bytes
            )));
        }
        if server.open_documents() > self.docs.len() + self.app_docs.len() {
            return Err(self.fail("more documents open than exist"));
        }
        let (_, queued_bytes) = sequencer.wal().queue_depth();
        // Every op waiting for the disk holds a share of the unsynced budget (a record
        // carries some bytes more than its patches; snapshots are not queued here).
        if queued_bytes > 2 * config.unsynced_bytes + (64 << 10) {
            return Err(self.fail(format!(
                "{queued_bytes} bytes wait for the disk, over the budget of {}",
                config.unsynced_bytes
            )));
        }
        for a in &self.apps {
            let Some(handle) = &a.handle else { continue };
            if !handle.is_synced() {
                continue;
            }
            let Ok(Some(view)) = sequencer.read(&a.doc).await else {
                continue;
            };
            if view.version == handle.version() {
                self.stats.texts_compared += 1;
                let text = handle.text();
                if text != view.text {
                    return Err(self.fail(format!(
                        "{} is idle at version {} of {} with text {:?}; the server has {:?}",
                        a.name, view.version, a.doc, text, view.text
                    )));
                }
            }
        }
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            let Some(synced) = &c.synced else { continue };
            if synced.doc.has_pending()
                || c.generation != self.generations.get(&c.doc).copied().unwrap_or(0)
            {
                continue;
            }
            let Ok(Some(view)) = sequencer.read(&c.doc).await else {
                continue;
            };
            if view.version == synced.doc.version() {
                self.stats.texts_compared += 1;
                let text = synced.doc.text();
                if text != view.text {
                    return Err(self.fail(format!(
                        "client {} is idle at version {} of {} with text {:?}; the server has {:?}",
                        c.id, view.version, c.doc, text, view.text
                    )));
                }
            }
        }
        Ok(())
    }

    /// No acknowledged op is lost: the durable version is at least every acked seq.
    async fn check_durable(&mut self) -> Result<(), Failure> {
        let Some(inc) = &self.server else {
            return Ok(());
        };
        let sequencer = inc.sequencer.clone();
        for (doc, (_, by_seq)) in &self.acked {
            let Some((&top, id)) = by_seq.iter().next_back() else {
                continue;
            };
            if self
                .uncertain_deletion
                .as_ref()
                .is_some_and(|u| &u.doc == doc)
            {
                // Forgotten by the server with its deletion, which the restart settles.
                continue;
            }
            let durable = match sequencer.read(doc).await {
                Ok(view) => view.map_or(0, |v| v.version),
                Err(_) => continue,
            };
            if durable < top {
                return Err(self.fail(format!(
                    "{doc}: op {id:?} was acknowledged at seq {top} but the durable version is {durable}"
                )));
            }
        }
        Ok(())
    }

    /// The history: every acked op at its seq, exactly once, only ops clients sent, and
    /// replaying it gives the server's text.
    async fn check_history(&mut self) -> Result<(), Failure> {
        let Some(inc) = &self.server else {
            return Ok(());
        };
        self.stats.history_checks += 1;
        let sequencer = inc.sequencer.clone();
        let docs: Vec<String> = self.docs.iter().chain(&self.app_docs).cloned().collect();
        for doc in docs {
            let acked = self.acked.get(&doc).map(|(_, by_seq)| by_seq.clone());
            self.check_doc_history(&sequencer, &doc, acked.as_ref(), Held::Live)
                .await?;
        }
        Ok(())
    }

    /// One document's history in `sequencer` (the server's, or a restored backup's):
    /// every op of `acked` (seq -> op id) at its seq and durable, each op there once and
    /// sent by a client, and replaying it gives the text read.
    async fn check_doc_history(
        &mut self,
        sequencer: &LocalSequencer,
        doc: &str,
        acked: Option<&BTreeMap<u64, OpId>>,
        held: Held,
    ) -> Result<(), Failure> {
        let live = held == Held::Live;
        let whose = match held {
            Held::Live => String::new(),
            Held::Backup(n) => format!("backup {n}: "),
        };
        let view = match sequencer.read(doc).await {
            Ok(Some(view)) => view,
            Ok(None) => {
                let top = acked.and_then(|a| a.keys().next_back().copied());
                return match top {
                    Some(top) if !live => Err(self.fail(format!(
                        "{whose}{doc} is not in it, with an op acknowledged at seq {top}"
                    ))),
                    _ => Ok(()),
                };
            }
            // On a disk that has not failed, a document the server holds can be
            // read (one it cannot rebuild, as after a deletion undone, is a bug).
            Err(e) if !live || !self.disk_failing => {
                return Err(self.fail(format!("{whose}{doc}: cannot be read: {e}")));
            }
            Err(_) => return Ok(()),
        };
        let mut ops = Vec::new();
        let mut complete = true;
        loop {
            let after = ops.last().map_or(0, |o: &quire::op::SequencedOp| o.seq);
            match sequencer.ops_after(doc, after, 4096) {
                Ok(Some(batch)) if batch.is_empty() => break,
                Ok(Some(batch)) => ops.extend(batch),
                // Truncated (a snapshot covers the start), or the disk failed.
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        let mut seen = HashSet::new();
        for (k, op) in ops.iter().enumerate() {
            if complete && op.seq != k as u64 + 1 {
                return Err(self.fail(format!(
                    "{whose}{doc}: op {k} of the history has seq {}",
                    op.seq
                )));
            }
            if !seen.insert(op.id) {
                return Err(self.fail(format!(
                    "{whose}{doc}: op {:?} is in the history twice",
                    op.id
                )));
            }
            if !self.sent.contains(&op.id) {
                // An application client's task may have sent it while this check
                // waited: it is in flight there, or its ack is queued.
                self.observe_apps()?;
            }
            if !self.sent.contains(&op.id) {
                return Err(self.fail(format!(
                    "{whose}{doc}: op {:?} at seq {} was never sent by a client",
                    op.id, op.seq
                )));
            }
        }
        if let Some(old) = self.deleted_histories.get(doc).filter(|_| live) {
            if !old.is_empty() && old.iter().all(|o| ops.get(o.seq as usize - 1) == Some(o)) {
                return Err(self.fail(format!(
                    "{doc}: its history before its deletion is back: {} ops, up to seq {}",
                    old.len(),
                    old.last().map_or(0, |o| o.seq)
                )));
            }
        }
        let by_seq: HashMap<u64, OpId> = ops.iter().map(|o| (o.seq, o.id)).collect();
        for (&seq, &id) in acked.into_iter().flatten() {
            if seq > view.version {
                return Err(self.fail(format!(
                    "{whose}{doc}: op {id:?} acknowledged at seq {seq} is not durable (version {})",
                    view.version
                )));
            }
            if let Some(found) = by_seq.get(&seq) {
                self.stats.acks_verified += u64::from(found == &id);
            }
            if complete && by_seq.get(&seq) != Some(&id) {
                return Err(self.fail(format!(
                    "{whose}{doc}: op {id:?} was acknowledged at seq {seq}, where the history has {:?}",
                    by_seq.get(&seq)
                )));
            }
        }
        if complete {
            let mut text = Text::default();
            for op in &ops {
                if op.seq > view.version {
                    break;
                }
                text.apply(&op.patches).map_err(|e| {
                    self.fail(format!(
                        "{whose}{doc}: op at seq {} does not apply: {e}",
                        op.seq
                    ))
                })?;
            }
            if text.to_string() != view.text {
                return Err(self.fail(format!(
                    "{whose}{doc}: replaying the history gives {:?}; the text read is {:?}",
                    text.to_string(),
                    view.text
                )));
            }
        }
        Ok(())
    }

    /// Faults stop; everyone reconnects and settles; all must agree.
    async fn settle(&mut self) -> Result<(), Failure> {
        if self.disk_failing || self.server.is_none() {
            self.crash().await?;
            self.start_server()?;
        }
        for i in 0..self.apps.len() {
            self.apps[i].net.set_up(true);
            self.end_silence(i);
        }
        for i in 0..self.clients.len() {
            if self.clients[i].asleep {
                self.wake(i);
            }
        }
        // Time enough for a client on a connection silent for ever to give it up
        // (`app::TIMEOUT`) and come back.
        let deadline = tokio::time::Instant::now() + SETTLE;
        let mut round = 0;
        while tokio::time::Instant::now() < deadline {
            round += 1;
            self.observe_apps()?;
            for i in 0..self.clients.len() {
                if !self.clients[i].online || self.clients[i].synced.is_none() {
                    self.connect(i).await?;
                }
                self.poll(i).await?;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let inc = self.server.as_ref().expect("started above");
            let sequencer = inc.sequencer.clone();
            let mut settled = true;
            for c in &self.clients {
                let Some(synced) = &c.synced else {
                    settled = false;
                    break;
                };
                let version = durable_version(&sequencer, &c.doc).await;
                if !c.online || synced.doc.has_pending() || synced.doc.version() != version {
                    settled = false;
                    break;
                }
            }
            for a in &self.apps {
                let Some(handle) = &a.handle else {
                    settled = false;
                    break;
                };
                let version = durable_version(&sequencer, &a.doc).await;
                if !handle.is_synced() || handle.version() != version {
                    settled = false;
                    break;
                }
            }
            if settled {
                self.check().await?;
                self.check_durable().await?;
                self.check_history().await?;
                for c in &self.clients {
                    let text = c.synced.as_ref().expect("settled").doc.text();
                    let view = sequencer
                        .read(&c.doc)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    if text != view.text {
                        return Err(self.fail(format!(
                            "after settling, client {} has {text:?}; the server has {:?}",
                            c.id, view.text
                        )));
                    }
                    for b in text.bytes() {
                        mix(&mut self.digest, b as u64);
                    }
                }
                for a in &self.apps {
                    let text = a.handle.as_ref().expect("settled").text();
                    let view = sequencer
                        .read(&a.doc)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                    if text != view.text {
                        return Err(self.fail(format!(
                            "after settling, {} has {text:?}; the server has {:?}",
                            a.name, view.text
                        )));
                    }
                    let reloaded = self.reloaded_docs.contains(&a.doc);
                    let moved = a.check_edits(&text, reloaded).map_err(|e| {
                        self.fail(format!("{e}\n  final text of {}: {text:?}", a.doc))
                    })?;
                    self.stats.tokens_moved_by_reloads += moved;
                    for b in text.bytes() {
                        mix(&mut self.digest, b as u64);
                    }
                }
                self.say(|| format!("settled after {round} rounds"));
                return self.check_connections_closed().await;
            }
        }
        let mut state = String::new();
        for a in &self.apps {
            let _ = write!(
                state,
                " [{} up {} version {:?} synced {:?}]",
                a.name,
                a.net.is_up(),
                a.handle.as_ref().map(|h| h.version()),
                a.handle.as_ref().map(|h| h.is_synced())
            );
        }
        for c in &self.clients {
            let _ = write!(
                state,
                " [client {} online {} version {:?} pending {:?}]",
                c.id,
                c.online,
                c.synced.as_ref().map(|s| s.doc.version()),
                c.synced.as_ref().map(|s| s.doc.has_pending())
            );
        }
        Err(self.fail(format!(
            "the clients did not settle in {SETTLE:?} of sim time:{state}"
        )))
    }

    /// With the faults over, every connection nobody holds any more (cut, found dead,
    /// its client asleep, restarted or gone quiet) is closed by the server's own
    /// deadlines (handshake, idle, write): once they have passed, what is open are the
    /// application clients' connections, which they keep alive with pings.
    async fn check_connections_closed(&mut self) -> Result<(), Failure> {
        let config = &self.server_config;
        let deadlines = config.handshake_timeout + config.idle_timeout + config.write_timeout;
        tokio::time::sleep(deadlines + Duration::from_secs(1)).await;
        let inc = self.server.as_ref().expect("settled");
        let open = inc.server.open_connections();
        let held = self.apps.iter().filter(|a| a.client.is_some()).count();
        self.say(|| format!("{open} connections open {deadlines:?} after settling"));
        if open != held {
            return Err(self.fail(format!(
                "{open} connections are open {deadlines:?} after the clients settled; \
                 the application clients hold {held}, and nobody else any"
            )));
        }
        Ok(())
    }

    async fn run(&mut self, steps: u64) -> Result<(), Failure> {
        self.started = tokio::time::Instant::now();
        self.start_server()?;
        for i in 0..self.clients.len() {
            self.connect(i).await?;
        }
        for i in 0..self.apps.len() {
            self.start_app(i).await?;
        }
        while self.step < steps {
            self.step += 1;
            // Each step draws from a stream of its own: a step left out of a run changes
            // what the others meet, not what they draw (what minimising needs).
            self.rng = SplitMix(step_seed(self.seed, self.step));
            if self.keep.as_ref().is_some_and(|k| !k.contains(&self.step)) {
                continue;
            }
            self.act().await?;
            self.observe_apps()?;
            self.check().await?;
            if self.step % 100 == 0 {
                self.check_durable().await?;
                self.check_history().await?;
            }
        }
        self.rng = SplitMix(step_seed(self.seed, u64::MAX));
        let settled = self.settle().await;
        self.elapsed = self.started.elapsed();
        settled?;
        self.check_restored_client_ids()
    }

    /// A server restored from a backup, however late, never gives a client id the
    /// original server gave (after the backup too, restarts included), which its
    /// clients may still use: the first id each restored copy would give must be above
    /// every server-given id of an op sent in the whole run.
    fn check_restored_client_ids(&self) -> Result<(), Failure> {
        let given = self
            .sent
            .iter()
            .map(|id| id.client_id)
            .filter(|&c| c >= quire::sequencer::client_ids::FIRST_ASSIGNED)
            .max();
        for &(number, first) in &self.restored_first_ids {
            if let Some(given) = given.filter(|&given| first <= given) {
                return Err(self.fail(format!(
                    "backup {number}: restored, it would give client id {first}; the original \
                     server gave {given}"
                )));
            }
        }
        Ok(())
    }
}

struct Args {
    seeds: std::ops::Range<u64>,
    steps: u64,
    verbose: bool,
    /// Seeds below this are run twice.
    twice_below: u64,
    /// `--keep 3,17,40-45`: only these steps act (a minimised failing run).
    keep: Option<Arc<BTreeSet<u64>>>,
    /// A failing run is shortened and minimised before its replay is printed.
    minimise: bool,
    /// Which worlds run: the single server's seeds, the cluster's (`--cluster`: only
    /// these), or both (`cargo test` with no seeds named: CI).
    single: bool,
    cluster: Option<std::ops::Range<u64>>,
    steps_given: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        seeds: 0..CI_SEEDS,
        steps: DEFAULT_STEPS,
        verbose: false,
        twice_below: CI_TWICE,
        keep: None,
        minimise: true,
        single: true,
        cluster: None,
        steps_given: false,
    };
    let mut cluster_only = false;
    let (mut explicit, mut twice) = (false, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--seed" => {
                let s: u64 = value().parse().expect("--seed N");
                args.seeds = s..s + 1;
                explicit = true;
            }
            "--seeds" => {
                let v = value();
                let (a, b) = v.split_once("..").expect("--seeds A..B");
                args.seeds = a.parse().expect("A")..b.parse().expect("B");
                explicit = true;
            }
            "--steps" => {
                args.steps = value().parse().expect("--steps N");
                args.steps_given = true;
            }
            "--cluster" => cluster_only = true,
            "--verbose" => args.verbose = true,
            "--keep" => args.keep = Some(Arc::new(parse_steps(&value()))),
            "--twice" => twice = true,
            "--no-minimise" => args.minimise = false,
            // What cargo test passes to every test binary.
            _ => {}
        }
    }
    if twice {
        args.twice_below = u64::MAX;
    } else if explicit {
        args.twice_below = 0;
    }
    if cluster_only {
        args.single = false;
        args.cluster = Some(if explicit {
            args.seeds.clone()
        } else {
            0..CLUSTER_CI_SEEDS
        });
    } else if !explicit {
        args.cluster = Some(0..CLUSTER_CI_SEEDS);
    }
    args
}

/// The version of `doc` the server holds (0: none, or unreadable).
async fn durable_version(sequencer: &LocalSequencer, doc: &str) -> u64 {
    sequencer
        .read(doc)
        .await
        .ok()
        .flatten()
        .map_or(0, |v| v.version)
}

/// A step's own random stream.
fn step_seed(seed: u64, step: u64) -> u64 {
    let mut x = SplitMix(seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x.next_u64() ^ step
}

/// `3,17,40-45` -> {3, 17, 40, ..., 45}.
fn parse_steps(list: &str) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => set.extend(a.parse::<u64>().expect("A-B")..=b.parse().expect("A-B")),
            None => {
                set.insert(part.parse().expect("a step number"));
            }
        }
    }
    set
}

/// {3, 17, 40, ..., 45} -> `3,17,40-45`.
fn format_steps(set: &BTreeSet<u64>) -> String {
    let mut parts = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b = it.next().expect("peeked");
        }
        parts.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    parts.join(",")
}

/// Runs one seed; returns its digest and stats line, or the failure.
fn run_seed(seed: u64, steps: u64, verbose: bool) -> Result<(u64, String), Failure> {
    run_seed_keeping(seed, steps, None, verbose)
}

fn run_seed_keeping(
    seed: u64,
    steps: u64,
    keep: Option<Arc<BTreeSet<u64>>>,
    verbose: bool,
) -> Result<(u64, String), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    *PANICKED.lock().unwrap() = None;
    let mut sim = Sim::new(seed, verbose);
    sim.keep = keep;
    let outcome = rt.block_on(sim.run(steps));
    let s = &sim.stats;
    let line = format!(
        "{} clients ({} over WebSocket), {} docs, {} app clients ({} over WebSocket, {} app edits, {} app restarts, {} reopens, {} times offline, {} silent networks ({} of them for ever), {} reloads, {} tokens moved by reloads), {:?} simulated: {} edits, {} acks ({} over WebSocket, {} found in the history), {} idle texts compared, {} crashes, {} sync failures, {} disks full, {} cuts, {} clients asleep ({} woke to a dead connection), {} client restarts, {} reloads, {} reused ids refused, {} maintenance passes, {} deletions ({} acks seen after), {} history checks, {} segments truncated, {} backups ({} restored, {} documents with acks checked in them, {} exported)",
        sim.clients.len(),
        sim.clients.iter().filter(|c| c.websocket).count(),
        sim.docs.len(),
        sim.apps.len(),
        sim.apps.iter().filter(|a| a.net.is_websocket()).count(),
        s.app_edits,
        s.app_restarts,
        s.app_reopens,
        s.app_offline,
        s.app_silences,
        s.app_black_holes,
        s.app_reloads,
        s.tokens_moved_by_reloads,
        sim.elapsed,
        s.edits,
        s.acks,
        s.ws_acks,
        s.acks_verified,
        s.texts_compared,
        s.crashes,
        s.sync_failures,
        s.disk_full,
        s.cuts,
        s.sleeps,
        s.sleeps_black_holed,
        s.client_restarts,
        s.reloads,
        s.reused_refused,
        s.snapshots,
        s.deletions,
        s.acks_of_deleted,
        s.history_checks,
        s.segments_removed,
        s.backups,
        s.backups_restored,
        s.backup_docs_checked,
        s.backup_exports
    );
    let digest = sim.digest ^ sim.step;
    drop(sim);
    drop(rt);
    outcome.map(|()| (digest, line))
}

/// What a failure is, without the numbers that change from run to run (seed, step,
/// op ids, token numbers): a smaller run must fail the same way.
fn signature(failure: &str) -> String {
    let what = failure.split_once(": ").map_or(failure, |(_, rest)| rest);
    // Up to the first quoted text; without numbers and tokens.
    let what = what.split('"').next().unwrap_or(what);
    let mut out = String::new();
    let mut in_token = false;
    for c in what.chars() {
        match c {
            '<' => in_token = true,
            '>' => in_token = false,
            _ if in_token || c.is_ascii_digit() => {}
            _ => out.push(c),
        }
    }
    out.chars().take(60).collect()
}

/// The fewest steps (of the first `steps`) that still fail the same way, by delta
/// debugging (Zeller's ddmin): leave out chunks of the steps, keep any smaller set
/// that still fails, and halve the chunks until single steps. Bounded to `budget` runs.
fn minimise(seed: u64, steps: u64, failure: &Failure, budget: usize) -> (BTreeSet<u64>, Failure) {
    let want = signature(failure);
    let mut kept: Vec<u64> = (1..=steps).collect();
    let mut last = failure.clone();
    let mut runs = 0;
    let mut n = 2usize;
    while kept.len() >= 2 && runs < budget {
        let chunk = kept.len().div_ceil(n);
        let mut reduced = false;
        for start in (0..kept.len()).step_by(chunk) {
            if runs >= budget {
                break;
            }
            // The complement of one chunk.
            let candidate: Vec<u64> = kept[..start]
                .iter()
                .chain(&kept[(start + chunk).min(kept.len())..])
                .copied()
                .collect();
            if candidate.is_empty() {
                continue;
            }
            runs += 1;
            let set = Arc::new(candidate.iter().copied().collect::<BTreeSet<u64>>());
            let last_step = *candidate.last().expect("not empty");
            if let Err(f) = run_seed_keeping(seed, last_step, Some(set), false) {
                if signature(&f) == want {
                    kept = candidate;
                    last = f;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
        }
        if !reduced {
            if n >= kept.len() {
                break;
            }
            n = (n * 2).min(kept.len());
        }
    }
    (kept.into_iter().collect(), last)
}

/// A shorter run of a failing seed that still fails: the fewest steps (found by
/// bisection; a run of fewer steps is a prefix of the longer one, then the settling),
/// and its failure.
fn shorten(seed: u64, steps: u64, failure: Failure) -> (u64, Failure) {
    let (mut passes, mut fails, mut last) = (0, steps, failure);
    while fails - passes > 1 {
        let mid = passes + (fails - passes) / 2;
        match run_seed(seed, mid, false) {
            Ok(_) => passes = mid,
            Err(f) => {
                fails = mid;
                last = f;
            }
        }
    }
    (fails, last)
}

fn main() {
    let args = parse_args();
    // `QUIRE_SIM_LOG=quire=debug`: the server's and clients' own logs, on stderr.
    if let Ok(filter) = std::env::var("QUIRE_SIM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .without_time()
            .with_writer(std::io::stderr)
            .init();
    }
    std::panic::set_hook(Box::new(|info| {
        let mut p = PANICKED.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            *p = Some(info.to_string());
        }
        eprintln!("panic: {info}");
    }));
    let started = std::time::Instant::now();
    let mut total_steps = 0;
    let single_seeds = if args.single {
        args.seeds.clone()
    } else {
        0..0
    };
    for seed in single_seeds.clone() {
        let outcome = run_seed_keeping(seed, args.steps, args.keep.clone(), args.verbose).and_then(
            |(digest, line)| {
                if seed < args.twice_below {
                    let (again, _) = run_seed(seed, args.steps, false)?;
                    if again != digest {
                        return Err(format!(
                        "the same seed gave two different runs (digests {digest:x} and {again:x})"
                    ));
                    }
                }
                Ok(line)
            },
        );
        match outcome {
            Ok(line) => {
                total_steps += args.steps;
                if args.verbose || args.seeds.end - args.seeds.start <= 50 {
                    println!("seed {seed}: ok ({line})");
                }
            }
            Err(failure) => {
                println!("seed {seed}: FAILED: {failure}");
                if args.keep.is_some() {
                    std::process::exit(1);
                }
                if !args.minimise {
                    println!(
                        "replay: cargo test --release --test sim -- --seed {seed} --steps {} --verbose",
                        args.steps
                    );
                    std::process::exit(1);
                }
                let (steps, shortest) = shorten(seed, args.steps, failure);
                if steps < args.steps {
                    println!("shortened to {steps} steps: {shortest}");
                }
                let (kept, minimal) = minimise(seed, steps, &shortest, 2_000);
                let last = kept.last().copied().unwrap_or(steps);
                println!("minimised to {} of its steps: {minimal}", kept.len());
                println!(
                    "replay: cargo test --release --test sim -- --seed {seed} --steps {last} --keep {} --verbose",
                    format_steps(&kept)
                );
                println!(
                    "(the whole run: cargo test --release --test sim -- --seed {seed} --steps {steps} --verbose)"
                );
                std::process::exit(1);
            }
        }
    }
    if args.single {
        println!(
            "sim: {} seeds, {total_steps} steps, all checks held ({:.1} s)",
            single_seeds.end - single_seeds.start,
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(seeds) = args.cluster.clone() {
        run_cluster(&args, seeds);
    }
}

/// The cluster world's seeds (`--cluster`); a failure prints its replay and exits.
fn run_cluster(args: &Args, seeds: std::ops::Range<u64>) {
    let started = std::time::Instant::now();
    let steps = if args.steps_given {
        args.steps
    } else {
        CLUSTER_STEPS
    };
    for seed in seeds.clone() {
        let outcome = cluster::run_seed(seed, steps, args.verbose).and_then(|(digest, line)| {
            if seed < args.twice_below {
                let (again, _) = cluster::run_seed(seed, steps, false)?;
                if again != digest {
                    return Err(format!(
                        "cluster seed {seed}: the same seed gave two different runs (digests {digest:x} and {again:x})"
                    ));
                }
            }
            Ok(line)
        });
        match outcome {
            Ok(line) => {
                if args.verbose || seeds.end - seeds.start <= 50 {
                    println!("cluster seed {seed}: ok ({line})");
                }
            }
            Err(failure) => {
                println!("cluster seed {seed}: FAILED: {failure}");
                println!(
                    "replay: cargo test --release --test sim -- --cluster --seed {seed} --steps {steps} --verbose"
                );
                std::process::exit(1);
            }
        }
    }
    println!(
        "sim --cluster: {} seeds of {steps} steps, all checks held ({:.1} s)",
        seeds.end - seeds.start,
        started.elapsed().as_secs_f64()
    );
}
