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

use crate::net::{ClientEnd, LinkConfig, ServerEnd, Wire};

/// How an application client reaches the server: the current server incarnation, if
/// up, and if this client's network is up.
#[derive(Clone)]
pub struct Net(Arc<Mutex<NetState>>);

struct NetState {
    server: Option<mpsc::UnboundedSender<ServerEnd>>,
    up: bool,
    rng: SplitMix,
    link: LinkConfig,
    wires: Vec<Wire>,
}

impl Net {
    pub fn new(seed: u64, link: LinkConfig) -> Net {
        Net(Arc::new(Mutex::new(NetState {
            server: None,
            up: true,
            rng: SplitMix(seed),
            link,
            wires: Vec::new(),
        })))
    }

    pub fn set_server(&self, server: Option<mpsc::UnboundedSender<ServerEnd>>) {
        self.0.lock().unwrap().server = server;
    }

    /// Cuts the open connection (bytes in flight are lost).
    pub fn cut(&self) {
        for w in self.0.lock().unwrap().wires.drain(..) {
            w.cut();
        }
    }

    /// The network goes down (and cuts), or comes back.
    pub fn set_up(&self, up: bool) {
        self.0.lock().unwrap().up = up;
        if !up {
            self.cut();
        }
    }

    pub fn is_up(&self) -> bool {
        self.0.lock().unwrap().up
    }
}

impl Connector for Net {
    type Stream = ClientEnd;

    async fn connect(&self) -> io::Result<ClientEnd> {
        let mut s = self.0.lock().unwrap();
        if !s.up {
            return Err(io::ErrorKind::NetworkUnreachable.into());
        }
        let Some(server) = s.server.clone() else {
            return Err(io::ErrorKind::ConnectionRefused.into());
        };
        let link = s.link;
        let (server_end, client_end, wire) = Wire::new(&mut s.rng, link);
        if server.send(server_end).is_err() {
            return Err(io::ErrorKind::ConnectionRefused.into());
        }
        s.wires.push(wire);
        Ok(client_end)
    }
}

pub struct AppClient {
    pub name: String,
    pub doc: String,
    pub net: Net,
    /// The persistence directory (a real temporary directory), if it has one.
    dir: Option<tempfile::TempDir>,
    pub client: Option<Client>,
    pub handle: Option<DocHandle>,
    events: Option<Events>,
    seed: u64,
    /// Every edit (its token) and whether it must be in the final text exactly once
    /// (false: made before a restart of a client without a persistence directory).
    pub made: Vec<(String, bool)>,
    edits: u64,
}

/// What the simulator learns from an application client after a step.
pub struct Observed {
    pub client_id: u64,
    /// (local seq) of ops sent and not acknowledged.
    pub unacked: Vec<u64>,
    /// (seq, local seq) acknowledged since the last look.
    pub acked: Vec<(u64, u64)>,
}

impl AppClient {
    pub fn new(index: usize, doc: String, persist: bool, seed: u64, link: LinkConfig) -> Self {
        AppClient {
            name: format!("app{index}"),
            doc,
            net: Net::new(seed, link),
            dir: persist.then(|| tempfile::tempdir().expect("a temporary directory")),
            client: None,
            handle: None,
            events: None,
            seed,
            made: Vec::new(),
            edits: 0,
        }
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new("sim");
        c.persist_dir = self.dir.as_ref().map(|d| PathBuf::from(d.path()));
        c.inline_io = true;
        c.seed = Some(self.seed);
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_secs(5);
        c.ping_interval = Duration::from_secs(15);
        c.timeout = Duration::from_secs(30);
        c.shutdown_timeout = Duration::from_secs(1);
        c
    }

    /// Starts the client's process (again).
    pub async fn start(&mut self) -> Result<(), String> {
        self.seed = self.seed.wrapping_add(1);
        let client = Client::with_connector(self.config(), self.net.clone())
            .await
            .map_err(|e| format!("{}: cannot start: {e}", self.name))?;
        let handle = client
            .open(&self.doc)
            .await
            .map_err(|e| format!("{}: cannot open {}: {e}", self.name, self.doc))?;
        self.events = Some(handle.events());
        self.handle = Some(handle);
        self.client = Some(client);
        Ok(())
    }

    /// The process dies: everything in memory is gone; a persistence directory stays.
    pub async fn kill(&mut self) {
        if let Some(client) = &self.client {
            client.abort();
        }
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

    /// Inserts a new token at a token boundary of the local text.
    pub async fn edit(&mut self, rng: &mut SplitMix) -> Result<(), String> {
        let Some(handle) = &self.handle else {
            return Ok(());
        };
        let text = handle.text();
        let mut boundaries = vec![0u32];
        for (i, c) in text.chars().enumerate() {
            if c == '>' {
                boundaries.push(i as u32 + 1);
            }
        }
        let at = boundaries[rng.below(boundaries.len() as u64) as usize];
        self.edits += 1;
        let token = format!("<{}.{}>", self.name, self.edits);
        handle
            .edit(&[Patch::new(at, 0, token.as_str())])
            .await
            .map_err(|e| format!("{}: edit refused: {e}", self.name))?;
        self.made.push((token, true));
        Ok(())
    }

    pub fn observe(&mut self) -> Option<Observed> {
        let client = self.client.as_ref()?;
        let handle = self.handle.as_ref()?;
        let mut acked = Vec::new();
        if let Some(events) = &mut self.events {
            while let Some(e) = events.try_recv() {
                if let Event::Acked { seq, local_seq } = e {
                    acked.push((seq, local_seq));
                }
            }
        }
        Some(Observed {
            client_id: client.client_id(),
            unacked: handle.unacked(),
            acked,
        })
    }

    /// Every edit that must be in `text` exactly once is; none is there twice.
    pub fn check_edits(&self, text: &str) -> Result<(), String> {
        for (token, must) in &self.made {
            let n = text.matches(token.as_str()).count();
            if n > 1 || (*must && n != 1) {
                return Err(format!(
                    "{}: edit {token} is in the final text {n} times (must be there: {must})",
                    self.name
                ));
            }
        }
        Ok(())
    }
}
