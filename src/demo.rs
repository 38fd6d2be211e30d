//! `quire demo`: two people edit one document while the network, the server and one
//! laptop fail under them, and no edit is lost.
//!
//! Everything runs on this machine, in temporary directories, on ports the system
//! picks: the server in this process (stopped and reopened on its data directory),
//! Alice's editor in this process, and Bob's editor in a child process of this binary
//! (`quire demo-client`, hidden) that reaches the server through a proxy this process
//! can unplug, and that is killed with SIGKILL while it holds edits not yet sent, then
//! started again on its persistence directory. Both editors use the public client
//! library only (`quire::client::Client`, `DocHandle`).
//!
//! At the end the demo checks that both texts equal the server's and hold every item
//! typed, each once, and nothing else; it exits non-zero otherwise (CI runs it with
//! `--fast`). `--cast FILE` also writes what it prints, timed, as an asciinema v2
//! recording (`tools/record-demo.sh`).

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quire::client::{Client, ClientConfig, ConnectionState, DocHandle};
use quire::op::Patch;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;
use quire::server::{Server, ServerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const DOC: &str = "shopping-list";
/// How long any one thing the demo waits for may take before it gives up (and fails).
const PATIENCE: Duration = Duration::from_secs(20);
/// The recording's terminal: every line fits, and so does the whole story.
const CAST_WIDTH: u32 = 80;
const CAST_HEIGHT: u32 = 52;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Skip the pauses (for CI): the same steps and checks, in a few seconds.
    #[arg(long)]
    fast: bool,
    /// Also write the output, with its timing, to this file as an asciinema v2
    /// recording (what tools/record-demo.sh does).
    #[arg(long, hide = true)]
    cast: Option<PathBuf>,
}

/// The editor the demo runs as a child process: commands on stdin, one line each
/// (`status`, `append <JSON string>`, `quit`), each answered by one JSON line on
/// stdout with the text, the version, whether every edit is acknowledged, and the
/// connection's state.
#[derive(clap::Args)]
pub struct DemoClientArgs {
    /// The server (or the proxy in front of it), `host:port`.
    #[arg(long)]
    addr: String,
    /// The client's persistence directory.
    #[arg(long)]
    dir: PathBuf,
    /// The document to open.
    #[arg(long)]
    doc: String,
}

/// Reconnects quickly: the demo's outages are short and watched.
fn client_config(addr: &str) -> ClientConfig {
    let mut c = ClientConfig::new(addr);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

fn state_word(state: &ConnectionState) -> &'static str {
    match state {
        ConnectionState::Connecting => "connecting",
        ConnectionState::Connected => "online",
        ConnectionState::Reconnecting { .. } => "offline",
        ConnectionState::Failed { .. } => "refused",
        ConnectionState::Closed => "closed",
    }
}

// ---------------------------------------------------------------------------------
// The child process: Bob's editor.

pub fn client_main(args: DemoClientArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-client: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run_client(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-client: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_client(args: DemoClientArgs) -> Result<(), String> {
    let client = Client::connect(client_config(&args.addr).persist_dir(&args.dir))
        .await
        .map_err(|e| e.to_string())?;
    let doc = client.open(&args.doc).await.map_err(|e| e.to_string())?;
    // Lines from stdin, read on a thread of their own (the end: the demo is gone).
    let (tx, mut commands) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        let (command, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match command {
            "status" => {}
            "append" => {
                let item: String =
                    serde_json::from_str(arg).map_err(|e| format!("append {arg}: {e}"))?;
                // Only insertions happen in the demo, so the end read here is still a
                // place in the text (if not the end) when the edit applies.
                let end = doc.text().chars().count() as u32;
                doc.edit(&[Patch::new(end, 0, item)])
                    .await
                    .map_err(|e| e.to_string())?;
            }
            "quit" => {
                client.shutdown().await;
                println!("{}", client_status(&client, &doc));
                return Ok(());
            }
            other => return Err(format!("unknown command {other:?}")),
        }
        println!("{}", client_status(&client, &doc));
    }
    client.shutdown().await;
    Ok(())
}

fn client_status(client: &Client, doc: &DocHandle) -> serde_json::Value {
    json!({
        "text": doc.text(),
        "version": doc.version(),
        "synced": doc.is_synced(),
        "state": state_word(&client.state()),
    })
}

/// What Bob's process says about his document.
#[derive(Debug, Clone)]
struct Status {
    text: String,
    version: u64,
    synced: bool,
    state: String,
}

/// Bob's editor, a child process of this binary.
struct Bob {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::UnboundedReceiver<String>,
}

impl Bob {
    fn spawn(addr: SocketAddr, dir: &Path) -> Result<Bob, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
        let mut child = std::process::Command::new(exe)
            .arg("demo-client")
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--doc")
            .arg(DOC)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start Bob's editor: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, replies) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Bob {
            child,
            stdin,
            replies,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("Bob's editor is gone: {e}"))
    }

    async fn reply(&mut self) -> Result<Status, String> {
        let line = tokio::time::timeout(PATIENCE, self.replies.recv())
            .await
            .map_err(|_| "Bob's editor did not answer".to_string())?
            .ok_or("Bob's editor exited")?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("Bob's editor said {line:?}: {e}"))?;
        let field = |k: &str| v.get(k).ok_or(format!("no {k} in {line:?}"));
        Ok(Status {
            text: field("text")?.as_str().unwrap_or_default().to_owned(),
            version: field("version")?.as_u64().unwrap_or_default(),
            synced: field("synced")?.as_bool().unwrap_or_default(),
            state: field("state")?.as_str().unwrap_or_default().to_owned(),
        })
    }

    async fn status(&mut self) -> Result<Status, String> {
        self.send("status")?;
        self.reply().await
    }

    async fn append(&mut self, item: &str) -> Result<Status, String> {
        self.send(&format!("append {}", json!(item)))?;
        self.reply().await
    }

    /// SIGKILL: no shutdown, no last write; what is on disk is all that survives.
    fn kill(&mut self) -> Result<std::process::ExitStatus, String> {
        self.child
            .kill()
            .and_then(|()| self.child.wait())
            .map_err(|e| format!("cannot kill Bob's editor: {e}"))
    }

    async fn quit(mut self) -> Result<Status, String> {
        self.send("quit")?;
        let status = self.reply().await?;
        let _ = self.child.wait();
        Ok(status)
    }
}

impl Drop for Bob {
    fn drop(&mut self) {
        // Never left behind (a failed demo): killing an exited child is a no-op.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// The proxy Bob's network goes through.

struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    up: bool,
    pipes: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn new(backend: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState {
            up: true,
            pipes: Vec::new(),
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !lock(&shared).up {
                    // Unplugged: the connection opens and closes at once.
                    continue;
                }
                let Ok(server) = TcpStream::connect(backend).await else {
                    continue;
                };
                let pipe = tokio::spawn(pipe(client, server));
                let mut s = lock(&shared);
                s.pipes.retain(|p| !p.is_finished());
                s.pipes.push(pipe);
            }
        });
        Ok(Proxy { addr, state })
    }

    /// Cuts the open connections and refuses new ones (`false`), or lets them through.
    fn plug(&self, up: bool) {
        let mut s = lock(&self.state);
        s.up = up;
        if !up {
            for p in s.pipes.drain(..) {
                p.abort();
            }
        }
    }
}

async fn pipe(client: TcpStream, server: TcpStream) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = cr.read(&mut buf).await {
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = sr.read(&mut buf).await {
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------
// The server, in this process.

struct Running {
    store: Arc<LocalSequencer>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<usize>,
}

async fn start_server(dir: &Path, addr: SocketAddr) -> Result<(Running, SocketAddr), String> {
    let (store, _) = LocalSequencer::open(dir, LocalConfig::default())
        .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    let store = Arc::new(store);
    // The port it had before may take a moment to be free again.
    let mut tries = 0;
    let listener = loop {
        match quire::server::bind(addr).await {
            Ok(l) => break l,
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!("bind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                store.close();
                return Err(format!("cannot listen on {addr}: {e}"));
            }
        }
    };
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let server = Server::new(store.clone(), ServerConfig::default());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok((Running { store, stop, task }, addr))
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.store.close();
    }

    async fn text(&self) -> Result<String, String> {
        let view = self.store.read(DOC).await.map_err(|e| e.to_string())?;
        Ok(view.map(|v| v.text).unwrap_or_default())
    }
}

// ---------------------------------------------------------------------------------
// The terminal (and the recording).

struct Screen {
    start: Instant,
    fast: bool,
    colour: bool,
    cast: Option<BufWriter<File>>,
}

impl Screen {
    fn new(args: &DemoArgs) -> Result<Screen, String> {
        let cast = match &args.cast {
            Some(path) => {
                let mut w = BufWriter::new(
                    File::create(path)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
                );
                let timestamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                // The header as the format's description spells it, "version" first.
                let header = format!(
                    "{{\"version\": 2, \"width\": {CAST_WIDTH}, \"height\": {CAST_HEIGHT}, \
                     \"timestamp\": {timestamp}, \"title\": \"quire demo\", \
                     \"env\": {{\"TERM\": \"xterm-256color\", \"SHELL\": \"/bin/bash\"}}}}"
                );
                writeln!(w, "{header}").map_err(|e| e.to_string())?;
                Some(w)
            }
            None => None,
        };
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let colour =
            (tty || cast.is_some()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Ok(Screen {
            start: Instant::now(),
            fast: args.fast,
            colour,
            cast,
        })
    }

    /// Prints one line (and records it).
    fn say(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        if let Some(cast) = &mut self.cast {
            let t = self.start.elapsed().as_secs_f64();
            // A terminal turns "\n" into "\r\n"; a recording holds what it received.
            let event = json!([(t * 1000.0).round() / 1000.0, "o", format!("{line}\r\n")]);
            let _ = writeln!(cast, "{event}");
        }
    }

    /// Waits `ms` at human pace; not at all with `--fast`.
    async fn pause(&self, ms: u64) {
        if !self.fast {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Prints a line of narration, then gives the reader time to read it.
    async fn tell(&mut self, line: &str) {
        self.say(line);
        self.pause(200 + 14 * line.chars().count() as u64).await;
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    /// One editor's text and state, as a row of the picture.
    fn row(&mut self, who: &str, text: &str, note: &str) {
        let colour = match who {
            "alice" => "36",
            "bob" => "35",
            _ => "33",
        };
        let name = self.paint(colour, &format!("{who:>6}"));
        let note = if note.is_empty() {
            String::new()
        } else {
            format!("  {}", self.paint("2", &format!("({note})")))
        };
        self.say(&format!("  {name} │ {text}{note}"));
    }

    fn finish(&mut self) {
        if let Some(mut cast) = self.cast.take() {
            let _ = cast.flush();
        }
    }
}

fn note(state: &str, synced: bool) -> String {
    match (state, synced) {
        ("online", true) => String::new(),
        ("online", false) => "online, sending".into(),
        (s, true) => s.into(),
        (s, false) => format!("{s}, not sent yet"),
    }
}

// ---------------------------------------------------------------------------------
// The story.

/// A temporary directory, removed at the end unless the demo failed (then it is
/// kept, and named, for a look).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("quire-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Scratch { path, keep: false })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("the demo's files are kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn demo_main(args: DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut screen = match Screen::new(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut scratch = match Scratch::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(story(&mut screen, &scratch.path));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            scratch.keep = true;
            let line = format!("{} {e}", screen.paint("1;31", "✗ the demo failed:"));
            screen.say(&line);
            ExitCode::FAILURE
        }
    };
    screen.finish();
    drop(runtime);
    code
}

/// Evaluates `check` (an expression that may `.await` and use `?`) until it is true,
/// or fails the demo after [`PATIENCE`].
macro_rules! until {
    ($what:expr, $check:expr) => {{
        let deadline = Instant::now() + PATIENCE;
        loop {
            if $check {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("gave up waiting: {}", $what));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }};
}

/// Adds `item` at the end of Alice's text.
async fn append(doc: &DocHandle, item: &str) -> Result<(), String> {
    let end = doc.text().chars().count() as u32;
    doc.edit(&[Patch::new(end, 0, item)])
        .await
        .map_err(|e| e.to_string())
}

/// Both editors online, every edit acknowledged, at one version with one text.
async fn settled(bob: &mut Bob, a: &DocHandle) -> Result<bool, String> {
    let b = bob.status().await?;
    Ok(b.state == "online"
        && b.synced
        && a.is_synced()
        && a.version() == b.version
        && a.text() == b.text)
}

async fn story(screen: &mut Screen, scratch: &Path) -> Result<(), String> {
    let data_dir = scratch.join("server-data");
    let bob_dir = scratch.join("bob");
    let mut typed: Vec<&str> = Vec::new();

    let title = screen.bold("quire demo");
    screen.say(&title);
    screen
        .tell("Alice and Bob edit one shopping list. Bob's network,")
        .await;
    screen
        .tell("the server and Bob's laptop fail under them.")
        .await;
    screen.tell("No edit may be lost.").await;
    screen.say("");

    // 1. The server.
    let (server, addr) =
        start_server(&data_dir, "127.0.0.1:0".parse().expect("an address")).await?;
    let mut server = Some(server);
    screen
        .tell(&format!(
            "1. A server starts on an empty data directory, {addr}."
        ))
        .await;

    // 2. The editors.
    let alice = Client::connect(client_config(&addr.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    alice.wait_connected().await.map_err(|e| e.to_string())?;
    let a = alice.open(DOC).await.map_err(|e| e.to_string())?;
    let proxy = Proxy::new(addr)
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    let mut bob = Bob::spawn(proxy.addr, &bob_dir)?;
    until!(
        "Bob's editor connects",
        bob.status().await?.state == "online"
    );
    screen
        .tell("2. Alice's editor connects from this process.")
        .await;
    screen
        .tell(&format!(
            "   Bob's editor is another process (pid {}); his network",
            bob.pid()
        ))
        .await;
    screen
        .tell("   goes through a proxy this demo can unplug.")
        .await;
    screen
        .tell(&format!("   Both open the document \"{DOC}\"."))
        .await;
    screen.say("");

    // Shows both texts (and optionally the server's).
    macro_rules! show {
        () => {{
            let b = bob.status().await?;
            let alice_note = note(state_word(&alice.state()), a.is_synced());
            screen.row("alice", &a.text(), &alice_note);
            screen.row("bob", &b.text, &note(&b.state, b.synced));
            screen.pause(1000).await;
        }};
    }
    // 3. Online edits.
    screen
        .tell("3. Alice types \"milk\"; Bob adds \"eggs\".")
        .await;
    append(&a, "milk").await?;
    typed.push("milk");
    until!(
        "Bob sees Alice's edit",
        bob.status().await?.text.contains("milk")
    );
    bob.append(", eggs").await?;
    typed.push("eggs");
    until!("both editors agree", settled(&mut bob, &a).await?);
    show!();

    screen
        .tell("4. Both type at the same moment: \"bread\" and \"tea\".")
        .await;
    bob.send(&format!("append {}", json!(", tea")))?;
    append(&a, ", bread").await?;
    bob.reply().await?;
    typed.extend(["bread", "tea"]);
    until!("both editors agree", settled(&mut bob, &a).await?);
    show!();
    screen
        .tell("   The server puts them in one order; both editors follow it.")
        .await;
    screen.say("");

    // 5. Bob offline.
    proxy.plug(false);
    until!(
        "Bob's editor notices the cut",
        bob.status().await?.state == "offline"
    );
    screen
        .tell("5. Bob's network is cut. He keeps typing: \"apples\", \"rice\".")
        .await;
    bob.append(", apples").await?;
    bob.append(", rice").await?;
    typed.extend(["apples", "rice"]);
    show!();
    screen
        .tell("   His editor writes each edit to disk before taking the next.")
        .await;
    screen
        .tell("   Alice adds \"coffee\". Bob cannot see it.")
        .await;
    append(&a, ", coffee").await?;
    typed.push("coffee");
    until!("Alice's edit is acknowledged", a.is_synced());
    show!();
    screen.say("");

    // 6. The server restarts.
    screen.tell("6. The server stops.").await;
    server.take().expect("running").stop().await;
    until!(
        "Alice's editor notices",
        alice.state() != ConnectionState::Connected
    );
    screen
        .tell("   Alice keeps typing, \"butter\"; her editor holds it.")
        .await;
    append(&a, ", butter").await?;
    typed.push("butter");
    show!();
    screen
        .tell("   The server starts again, on the same data directory...")
        .await;
    let (restarted, again) = start_server(&data_dir, addr).await?;
    if again != addr {
        return Err(format!("the server came back on {again}, not {addr}"));
    }
    until!(
        "Alice's edit reaches the restarted server",
        alice.state() == ConnectionState::Connected && a.is_synced()
    );
    let on_server = restarted.text().await?;
    server = Some(restarted);
    screen
        .tell("   ...and Alice's editor reconnects by itself:")
        .await;
    screen.row("server", &on_server, "");
    screen.pause(1000).await;
    screen.say("");

    // 7. Bob's laptop crashes, offline, with edits not sent.
    let before = bob.status().await?;
    if before.synced || before.state == "online" {
        return Err(format!(
            "Bob should be offline with edits not sent: {before:?}"
        ));
    }
    let pid = bob.pid();
    let killed = bob.kill()?;
    let how = {
        use std::os::unix::process::ExitStatusExt;
        match killed.signal() {
            Some(9) => "killed by SIGKILL".to_owned(),
            _ => format!("ended: {killed}"),
        }
    };
    screen
        .tell(&format!(
            "7. Bob's laptop crashes: his editor (pid {pid}) is {how},"
        ))
        .await;
    screen
        .tell("   with \"apples\" and \"rice\" never sent.")
        .await;
    screen.tell("   Alice adds \"cheese\" meanwhile.").await;
    append(&a, ", cheese").await?;
    typed.push("cheese");
    bob = Bob::spawn(proxy.addr, &bob_dir)?;
    until!(
        "Bob's restarted editor finds the network still down",
        bob.status().await?.state == "offline"
    );
    let restored = bob.status().await?;
    screen
        .tell(&format!(
            "   Bob's editor starts again (pid {}) on his directory,",
            bob.pid()
        ))
        .await;
    screen
        .tell("   still offline, and finds his edits there:")
        .await;
    screen.row(
        "bob",
        &restored.text,
        &note(&restored.state, restored.synced),
    );
    screen.pause(1000).await;
    if restored.text != before.text {
        return Err(format!(
            "Bob's editor restarted with {:?}, not {:?}",
            restored.text, before.text
        ));
    }
    screen.tell("   He adds \"jam\".").await;
    bob.append(", jam").await?;
    typed.push("jam");
    show!();
    screen.say("");

    // 8. Back online.
    screen.tell("8. Bob's network comes back.").await;
    proxy.plug(true);
    until!("both editors converge", settled(&mut bob, &a).await?);
    screen
        .tell("   His editor sends his three items and takes in Alice's:")
        .await;
    let server_text = server.as_ref().expect("running").text().await?;
    screen.row("server", &server_text, "");
    show!();

    // The check: one text everywhere, and in it every item typed, once, and nothing
    // else (the items are distinct, none part of another).
    let bob_status = bob.status().await?;
    let alice_text = a.text();
    let mut problems = Vec::new();
    if alice_text != server_text {
        problems.push(format!(
            "Alice has {alice_text:?}, the server {server_text:?}"
        ));
    }
    if bob_status.text != server_text {
        problems.push(format!(
            "Bob has {:?}, the server {server_text:?}",
            bob_status.text
        ));
    }
    let mut items: Vec<&str> = server_text.split(", ").collect();
    items.sort_unstable();
    let mut expected = typed.clone();
    expected.sort_unstable();
    if items != expected {
        problems.push(format!(
            "the server's list is {items:?}, the items typed {expected:?}"
        ));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let done = screen.paint("1;32", "✓");
    screen.say(&format!(
        "{done} Both texts equal the server's, with all {} items, each once.",
        typed.len()
    ));

    bob.quit().await?;
    alice.shutdown().await;
    server.take().expect("running").stop().await;
    Ok(())
}
