//! Application clients: the client library as applications use it
//! (`quire::client::Client`, one background task per client that reconnects by
//! itself), over the simulated network, some with a persistence directory.
//!
//! They edit documents of their own (`app-N`) by inserting tokens (`<id.n>`, unique per
//! edit) at token boundaries, so that at the end every edit can be looked for in the
//! text: an edit made by a client with a persistence directory must be there exactly
//! once; one made by a client without one may have been lost when that client's
//! process restarted, but is never there twice.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quire::client::{Client, ClientConfig, Connector, DocHandle, Event, Events};
use quire::op::Patch;
use quire::wal::vfs::sim::SplitMix;
use tokio::sync::mpsc;

use crate::net::{HttpDoor, LinkConfig, ServerEnd, SimConn, StreamEnd, Wire};

/// The single server's address.
pub const HOME: &str = "sim";

/// How long an application client waits to hear from a server before it gives up the
/// connection (`ClientConfig::timeout`; it pings at half of it).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How long the world waits for an application client's open: one that waits for its
/// server may wait the client's whole timeout (a silent network) before it goes on
/// offline.
pub const APP_WAIT: Duration = Duration::from_secs(40);

/// How an application client reaches the server: the current server incarnation, if
/// up, and if this client's network is up (in a cluster: each node's, by its address).
#[derive(Clone)]
pub struct Net(Arc<Mutex<NetState>>);

struct NetState {
    /// The servers this client can reach, by address (one, [`HOME`], for the single
    /// server; a cluster's nodes by their advertised addresses).
    servers: std::collections::BTreeMap<String, mpsc::UnboundedSender<ServerEnd>>,
    /// The address `connect` reaches (the client's first address).
    home: String,
    up: bool,
    /// Silent: its connections stall (nothing arrives, no error), and a new one is not
    /// answered (its connect waits) until the network speaks again.
    silent: bool,
    /// Woken when the network speaks again (the connects waiting).
    speaks: Arc<tokio::sync::Notify>,
    /// Servers whose process is stopped (SIGSTOP): their connections stall, and new
    /// ones are made (the kernel completes them) but stall too.
    frozen: std::collections::BTreeSet<String>,
    rng: SplitMix,
    link: LinkConfig,
    /// The open connections, by the address they were made to.
    wires: Vec<(String, Wire)>,
    /// It connects over WebSocket (to the HTTP listener of the server it dials, by
    /// that server's address in `http`), not TCP.
    websocket: bool,
    /// The HTTP listeners that are up, by their server's address.
    http: std::collections::BTreeMap<String, HttpDoor>,
}

impl Net {
    pub fn new(seed: u64, link: LinkConfig) -> Net {
        Net(Arc::new(Mutex::new(NetState {
            servers: std::collections::BTreeMap::new(),
            home: HOME.to_owned(),
            up: true,
            silent: false,
            speaks: Arc::default(),
            frozen: std::collections::BTreeSet::new(),
            rng: SplitMix(seed),
            link,
            wires: Vec::new(),
            websocket: false,
            http: std::collections::BTreeMap::new(),
        })))
    }

    /// It connects over WebSocket from now on: to a server's HTTP listener, and on a
    /// redirect to the node's WebSocket URL (as a browser does; a node without one
    /// cannot be followed).
    pub fn use_websocket(&self) {
        self.0.lock().unwrap().websocket = true;
    }

    /// Whether it connects over WebSocket.
    pub fn is_websocket(&self) -> bool {
        self.0.lock().unwrap().websocket
    }

    /// The HTTP listener of the server at `addr` is up (its door) or down.
    pub fn set_http(&self, addr: &str, door: Option<HttpDoor>) {
        let mut s = self.0.lock().unwrap();
        match door {
            Some(door) => s.http.insert(addr.to_owned(), door),
            None => s.http.remove(addr),
        };
    }

    pub fn set_server(&self, server: Option<mpsc::UnboundedSender<ServerEnd>>) {
        self.set_node(HOME, server);
    }

    /// The server at `addr` is up (its listener) or down.
    pub fn set_node(&self, addr: &str, server: Option<mpsc::UnboundedSender<ServerEnd>>) {
        let mut s = self.0.lock().unwrap();
        match server {
            Some(server) => s.servers.insert(addr.to_owned(), server),
            None => s.servers.remove(addr),
        };
    }

    /// The address [`Connector::connect`] reaches.
    pub fn set_home(&self, addr: &str) {
        self.0.lock().unwrap().home = addr.to_owned();
    }

    /// Cuts the open connection (bytes in flight are lost).
    pub fn cut(&self) {
        for (_, w) in self.0.lock().unwrap().wires.drain(..) {
            w.cut();
        }
    }

    /// The network goes down (and cuts), or comes back.
    pub fn set_up(&self, up: bool) {
        let speaks = {
            let mut s = self.0.lock().unwrap();
            s.up = up;
            s.speaks.clone()
        };
        if !up {
            self.cut();
            // A connect waiting on a silent network fails now.
            speaks.notify_waiters();
        }
    }

    pub fn is_up(&self) -> bool {
        self.0.lock().unwrap().up
    }

    /// The network goes silent: its connections stall, new ones get no answer (a
    /// router that drops everything, with nobody told).
    pub fn go_silent(&self) {
        let mut s = self.0.lock().unwrap();
        s.silent = true;
        s.restall();
    }

    /// The machine of the server at `addr` is gone without a word (powered off, its
    /// network lost): the connections to it stall for ever; only the client's deadline
    /// ends them.
    pub fn lose_node(&self, addr: &str) {
        let mut s = self.0.lock().unwrap();
        s.wires.retain(|(to, w)| {
            if to == addr {
                w.stall(true);
            }
            to != addr
        });
    }

    /// The server at `addr` is stopped (`true`) or goes on: its connections stall, or
    /// go on (unless this network is silent).
    pub fn set_frozen(&self, addr: &str, frozen: bool) {
        let mut s = self.0.lock().unwrap();
        if frozen {
            s.frozen.insert(addr.to_owned());
        } else {
            s.frozen.remove(addr);
        }
        s.restall();
    }

    /// The network speaks again. `resume`: its connections go on (what they held
    /// arrives); otherwise they stay silent for ever (a NAT that forgot them), and
    /// only the ends' own deadlines close them. New connections are answered.
    pub fn speak(&self, resume: bool) {
        let mut s = self.0.lock().unwrap();
        if !s.silent {
            return;
        }
        s.silent = false;
        if !resume {
            s.wires.clear();
        }
        s.restall();
        s.speaks.notify_waiters();
    }

    /// Connections to `addr` this client holds (made, not dropped, not cut).
    pub fn held(&self, addr: &str) -> usize {
        let s = self.0.lock().unwrap();
        s.wires
            .iter()
            .filter(|(to, w)| to == addr && w.client_holds())
            .count()
    }

    pub fn is_silent(&self) -> bool {
        self.0.lock().unwrap().silent
    }
}

impl Connector for Net {
    type Stream = SimConn;

    async fn connect(&self) -> io::Result<SimConn> {
        let home = self.0.lock().unwrap().home.clone();
        self.dial(&home).await
    }

    async fn connect_to(&self, addr: &str, ws_url: &str) -> io::Result<SimConn> {
        let expected = crate::net::ws_url(addr);
        if self.is_websocket() && ws_url != expected {
            // A WebSocket client follows a redirect by its WebSocket URL alone.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the redirect gives the WebSocket URL {ws_url:?}, not {expected:?}"),
            ));
        }
        self.dial(addr).await
    }

    /// A fallback address: a WebSocket client knows each node's URL (a browser's client
    /// is given them as its fallback URLs).
    async fn connect_fallback(&self, addr: &str) -> io::Result<SimConn> {
        self.dial(addr).await
    }
}

impl Net {
    /// A connection to `addr`; on a silent network, once it speaks again (the caller's
    /// deadline is what ends the wait, as a connect's SYNs go unanswered).
    async fn dial(&self, addr: &str) -> io::Result<SimConn> {
        loop {
            let speaks = self.0.lock().unwrap().speaks.clone();
            let spoken = speaks.notified();
            {
                let s = self.0.lock().unwrap();
                if !s.up {
                    return Err(io::ErrorKind::NetworkUnreachable.into());
                }
                if !s.silent {
                    break;
                }
            }
            spoken.await;
        }
        let made = {
            let mut s = self.0.lock().unwrap();
            if !s.up {
                return Err(io::ErrorKind::NetworkUnreachable.into());
            }
            let Some(server) = s.servers.get(addr).cloned() else {
                return Err(io::ErrorKind::ConnectionRefused.into());
            };
            let link = s.link;
            let (made, wire) = if s.websocket {
                let door = s
                    .http
                    .get(addr)
                    .cloned()
                    .ok_or(io::ErrorKind::ConnectionRefused)?;
                let (client_end, wire) = door
                    .dial(&mut s.rng, link)
                    .ok_or(io::ErrorKind::ConnectionRefused)?;
                (Made::ToUpgrade(client_end), wire)
            } else {
                let (server_end, client_end, wire) = Wire::new(&mut s.rng, link);
                if server.send(server_end).is_err() {
                    return Err(io::ErrorKind::ConnectionRefused.into());
                }
                (Made::Ready(Box::new(SimConn::Left(client_end))), wire)
            };
            if s.frozen.contains(addr) {
                wire.stall(true);
            }
            s.wires.push((addr.to_owned(), wire));
            made
        };
        match made {
            Made::Ready(conn) => Ok(*conn),
            Made::ToUpgrade(end) => crate::net::upgrade(end, &crate::net::ws_url(addr)).await,
        }
    }
}

/// A connection just made: over TCP, ready; or to the HTTP listener, to be upgraded.
enum Made {
    Ready(Box<SimConn>),
    ToUpgrade(StreamEnd),
}

impl NetState {
    /// Each connection stalled if this network is silent or its server stopped.
    fn restall(&mut self) {
        for (addr, w) in &self.wires {
            w.stall(self.silent || self.frozen.contains(addr));
        }
    }
}

/// Filler characters: astral (a musical symbol, a crab, a face), accented, plain.
const FILLER: [char; 6] = ['𝄞', '🦀', '😀', 'é', ' ', 'x'];

/// A persistence directory, in memory where the machine has /dev/shm: the simulation
/// checks what the client writes and when, not the disk under it, and thousands of
/// fsyncs per seed would otherwise be most of its time.
fn persist_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let in_memory = shm
        .is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten();
    in_memory.unwrap_or_else(|| tempfile::tempdir().expect("a temporary directory"))
}

pub struct AppClient {
    pub name: String,
    pub doc: String,
    pub net: Net,
    /// Its addresses: the first is its home, the others its fallbacks (a cluster's
    /// nodes); empty for the single server.
    pub addrs: Vec<String>,
    /// The persistence directory (a real temporary directory), if it has one.
    dir: Option<tempfile::TempDir>,
    pub client: Option<Client>,
    pub handle: Option<DocHandle>,
    events: Option<Events>,
    /// Its document being opened again (see [`AppClient::reopen`]): the application's
    /// own task, which the world does not wait for.
    reopening: Option<Reopening>,
    /// A reopen was refused because the document was deleted (`Error`/`Reject` 32:
    /// the client stops for good, and the application is to drop its copy).
    pub told_deleted: bool,
    seed: u64,
    /// Every edit (its token) and whether it must be in the final text exactly once
    /// (false: made before a restart of a client without a persistence directory).
    pub made: Vec<(String, bool)>,
    edits: u64,
}

type ReopenResult = Result<(DocHandle, Events), quire::client::ClientError>;
type Reopening = tokio::task::JoinHandle<ReopenResult>;

/// What the simulator learns from an application client after a step.
pub struct Observed {
    pub client_id: u64,
    /// (local seq) of ops sent and not acknowledged.
    pub unacked: Vec<u64>,
    /// (seq, local seq) acknowledged since the last look.
    pub acked: Vec<(u64, u64)>,
    /// Reloads (from a snapshot, keeping the local edits) since the last look.
    pub reloads: u64,
}

impl AppClient {
    pub fn new(index: usize, doc: String, persist: bool, seed: u64, link: LinkConfig) -> Self {
        AppClient {
            name: format!("app{index}"),
            doc,
            net: Net::new(seed, link),
            addrs: Vec::new(),
            dir: persist.then(persist_dir),
            client: None,
            handle: None,
            events: None,
            reopening: None,
            told_deleted: false,
            seed,
            made: Vec::new(),
            edits: 0,
        }
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.addrs.first().map_or(HOME, String::as_str));
        c.fallback_addrs = self.addrs.iter().skip(1).cloned().collect();
        c.persist_dir = self.dir.as_ref().map(|d| PathBuf::from(d.path()));
        c.inline_io = true;
        c.seed = Some(self.seed);
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_secs(5);
        c.ping_interval = Duration::from_secs(15);
        c.timeout = TIMEOUT;
        c.shutdown_timeout = Duration::from_secs(1);
        c
    }

    /// Starts the client's process (again).
    pub async fn start(&mut self) -> Result<(), String> {
        self.seed = self.seed.wrapping_add(1);
        let client = Client::with_connector(self.config(), self.net.clone())
            .await
            .map_err(|e| format!("{}: cannot start: {e}", self.name))?;
        // With its events from the start: the acks of edits restored from the
        // persistence directory and sent while `open` ran are among them.
        let (handle, events) = client
            .open_with_events(&self.doc)
            .await
            .map_err(|e| format!("{}: cannot open {}: {e}", self.name, self.doc))?;
        self.events = Some(events);
        self.handle = Some(handle);
        self.client = Some(client);
        Ok(())
    }

    /// The process dies: everything in memory is gone; a persistence directory stays.
    pub async fn kill(&mut self) {
        if let Some(client) = &self.client {
            client.abort();
        }
        if let Some(reopening) = self.reopening.take() {
            reopening.abort();
        }
        self.told_deleted = false;
        self.handle = None;
        self.events = None;
        self.client = None;
        // Its aborted task is dropped (and gives up the directory).
        tokio::time::sleep(Duration::from_millis(1)).await;
        if self.dir.is_none() {
            for (_, must) in &mut self.made {
                *must = false;
            }
        }
    }

    /// The application closes its document (drops its handle and its events) and opens
    /// it again: the client closes it once its edits are acknowledged (offline with a
    /// persistence directory, at once: they are on disk), and the new handle has them
    /// all, and sends new ones under ids not used before. The open is the application's
    /// own task: connected, it returns once the document is loaded from its server,
    /// which may wait for a node that does not answer (up to the client's timeout); the
    /// world goes on meanwhile, and [`AppClient::reopened`] installs the handle once it
    /// is there. `false`: not running.
    pub fn reopen(&mut self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if self.reopening.is_some() {
            return false;
        }
        self.handle = None;
        self.events = None;
        let (client, doc) = (client.clone(), self.doc.clone());
        self.reopening = Some(tokio::spawn(
            async move { client.open_with_events(&doc).await },
        ));
        true
    }

    /// Whether its document is open (`false`: being opened again); a reopen that ended
    /// since is installed (its handle and events), or reported if it failed.
    pub fn reopened(&mut self) -> Result<bool, String> {
        match &self.reopening {
            None => return Ok(true),
            Some(reopening) if !reopening.is_finished() => return Ok(false),
            Some(_) => {}
        }
        let reopening = self.reopening.take().expect("matched");
        let joined = futures_util::FutureExt::now_or_never(reopening).expect("finished");
        self.install(joined)?;
        Ok(true)
    }

    /// Waits for a reopen to end (see [`AppClient::reopened`]).
    pub async fn reopen_done(&mut self) -> Result<(), String> {
        if let Some(reopening) = self.reopening.take() {
            let joined = reopening.await;
            self.install(joined)?;
        }
        Ok(())
    }

    fn install(
        &mut self,
        joined: Result<ReopenResult, tokio::task::JoinError>,
    ) -> Result<(), String> {
        let opened = joined.map_err(|e| format!("{}: its reopen task failed: {e}", self.name))?;
        if let Err(quire::client::ClientError::Refused {
            code: quire::protocol::message::ErrorCode::DocumentDeleted,
            ..
        }) = &opened
        {
            // Deleted while it was being opened again (its old ops were refused).
            self.told_deleted = true;
            return Ok(());
        }
        let (handle, events) =
            opened.map_err(|e| format!("{}: cannot open {} again: {e}", self.name, self.doc))?;
        self.events = Some(events);
        self.handle = Some(handle);
        Ok(())
    }

    /// Its document was deleted: the application drops its copy (the process and its
    /// persistence directory, as it would on `Error` 32, or on hearing of the deletion
    /// otherwise while offline; protocol.md, "Deleted documents") and starts again with
    /// a new, empty one. Its edits so far need not be in the final text, but none may
    /// be there twice; its next tokens are new ones.
    pub async fn forget(&mut self) {
        self.kill().await;
        if self.dir.is_some() {
            self.dir = Some(persist_dir());
        }
        for (_, must) in &mut self.made {
            *must = false;
        }
    }

    /// Inserts a new token, or inserts or deletes filler, between tokens of the local
    /// text. Tokens and filler hold characters outside the Basic Multilingual Plane
    /// (two UTF-16 units, four UTF-8 bytes: one code point each).
    pub async fn edit(&mut self, rng: &mut SplitMix) -> Result<String, String> {
        let Some(handle) = &self.handle else {
            return Ok("nothing (not running)".into());
        };
        let kind = rng.below(10);
        let pick = rng.next_u64();
        let filler: String = (0..1 + rng.below(3))
            .map(|_| FILLER[rng.below(FILLER.len() as u64) as usize])
            .collect();
        let token = format!(
            "<{}.{}{}>",
            self.name,
            self.edits + 1,
            FILLER[(self.edits % 3) as usize]
        );
        let mut made_token = false;
        let mut what = Vec::new();
        // Made from the text as it is when the edit applies (no remote op in between).
        handle
            .edit_with(|view| {
                let text = &view.text();
                // Positions between tokens (where a new token or filler may go), and
                // filler characters (which may be deleted).
                let (mut between, mut fill) = (Vec::new(), Vec::new());
                let mut inside = false;
                let mut n = 0u32;
                for c in text.chars() {
                    if !inside {
                        between.push(n);
                    }
                    match c {
                        '<' => inside = true,
                        '>' => inside = false,
                        _ if !inside => fill.push(n),
                        _ => {}
                    }
                    n += 1;
                }
                between.push(n);
                let at = between[(pick % between.len() as u64) as usize];
                let patches = if kind < 2 && !fill.is_empty() {
                    let i = fill[(pick % fill.len() as u64) as usize];
                    let del = if fill.contains(&(i + 1)) { 2 } else { 1 };
                    vec![Patch::new(i, del, "")]
                } else if kind < 4 {
                    vec![Patch::new(at, 0, filler.as_str())]
                } else {
                    made_token = true;
                    vec![Patch::new(at, 0, token.as_str())]
                };
                what = patches.clone();
                patches
            })
            .await
            .map_err(|e| format!("{}: edit refused: {e}", self.name))?;
        if made_token {
            self.edits += 1;
            self.made.push((token, true));
        }
        Ok(format!("{what:?}: {:?}", handle.text()))
    }

    pub fn observe(&mut self) -> Option<Observed> {
        let client = self.client.as_ref()?;
        let handle = self.handle.as_ref()?;
        let mut acked = Vec::new();
        let mut reloads = 0;
        if let Some(events) = &mut self.events {
            while let Some(e) = events.try_recv() {
                match e {
                    Event::Acked { seq, local_seq } => acked.push((seq, local_seq)),
                    Event::Reloaded { .. } => reloads += 1,
                    _ => {}
                }
            }
        }
        Some(Observed {
            client_id: client.client_id(),
            unacked: handle.unacked(),
            acked,
            reloads,
        })
    }

    /// Every edit that must be in `text` exactly once is; none is there twice.
    ///
    /// Unless a client of the document reloaded (`reloaded`): a reload derives what
    /// others changed by a diff, which can match a character to an equal one elsewhere
    /// (see "Reload" in protocol.md), so the reloading client's edits may land inside a
    /// token, or its deletion of filler remove an equal character of a token. Then
    /// only "never twice" holds for the text (the history check still finds every
    /// acknowledged op exactly once); returns how many tokens were not found whole.
    pub fn check_edits(&self, text: &str, reloaded: bool) -> Result<u64, String> {
        let mut disturbed = 0;
        for (token, must) in &self.made {
            let n = text.matches(token.as_str()).count();
            if n > 1 || (*must && n != 1 && !reloaded) {
                return Err(format!(
                    "{}: edit {token} is in the final text {n} times (must be there: {must})",
                    self.name
                ));
            }
            if *must && n != 1 {
                disturbed += 1;
            }
        }
        Ok(disturbed)
    }
}
