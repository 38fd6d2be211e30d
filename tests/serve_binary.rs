//! The `quire serve` binary: it starts on a fresh data directory, serves clients, and on
//! SIGTERM stops accepting, finishes its in-flight commits and exits 0; every op it
//! acknowledged is in the data directory afterwards. Its logs go to stderr, without
//! colour codes when stderr is not a terminal.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quire::client::{Client, ClientConfig, ConnectionState, Event, Events};
use quire::op::Patch;
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::Sequencer;

/// Starts `quire serve` on a free port; returns the child and the address it listens on.
fn spawn_server(dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quire binary starts");
    let logs = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(logs).lines().map_while(Result::ok) {
            eprintln!("{line}");
            // Strip colour codes, if any, and look for "serving listen=ADDR".
            let plain: String = strip_ansi(&line);
            if let Some(rest) = plain.split("listen=").nth(1) {
                if plain.contains("serving") {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server says where it listens");
    (child, addr.parse().expect("a socket address"))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Returns once the client's connection is no longer up.
async fn connection_lost(events: &mut Events) {
    loop {
        match events.recv().await {
            Some(Event::Connection(ConnectionState::Connected)) => {}
            Some(Event::Connection(_)) | None => return,
            Some(_) => {}
        }
    }
}

#[test]
fn sigterm_finishes_in_flight_commits_and_every_acked_op_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(tmp.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked: Vec<u64> = rt.block_on(async {
        let mut writers = Vec::new();
        // Writers that had an ack: the SIGTERM waits for all four (a server slow to
        // start under load would otherwise be stopped before any op, whatever the sleep).
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for n in 1..=4u64 {
            let started = started.clone();
            writers.push(tokio::spawn(async move {
                let client = Client::connect(ClientConfig::new(addr.to_string()))
                    .await
                    .unwrap();
                client.wait_connected().await.unwrap();
                let doc = client.open(&format!("doc{n}")).await.unwrap();
                let mut events = doc.events();
                let mut acked = 0u64;
                // Append one character per op until the server goes away.
                loop {
                    doc.edit_with(|view| vec![Patch::new(view.len_chars(), 0, "x")])
                        .await
                        .unwrap();
                    tokio::select! {
                        synced = doc.synced() => {
                            synced.unwrap();
                            if acked == 0 {
                                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            acked = doc.version();
                        }
                        () = connection_lost(&mut events) => break,
                    }
                }
                // The server is gone: stop at once (the last edit is not acknowledged).
                client.abort();
                acked
            }));
        }
        // Let them write, then ask the server to stop while ops are in flight.
        // (Bounded: a server that acknowledges nothing fails the assertion below.)
        for _ in 0..6000 {
            if started.load(std::sync::atomic::Ordering::SeqCst) == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut acked = Vec::new();
        for w in writers {
            acked.push(w.await.unwrap());
        }
        acked
    });
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "quire serve exits 0 on SIGTERM: {status:?}"
    );
    assert!(
        acked.iter().all(|&n| n > 0),
        "every client got acks: {acked:?}"
    );

    // Reopen the data directory: every acked op is there, applied once, in order.
    let (store, report) = LocalSequencer::open(tmp.path(), LocalConfig::default()).unwrap();
    assert!(
        report.tail_cut.is_none(),
        "a clean shutdown leaves no torn tail"
    );
    rt.block_on(async {
        for (i, &n) in acked.iter().enumerate() {
            let view = store.read(&format!("doc{}", i + 1)).await.unwrap().unwrap();
            assert!(
                view.version >= n,
                "doc{}: acked up to {n}, recovered {}",
                i + 1,
                view.version
            );
            assert_eq!(view.text, "x".repeat(view.version as usize));
        }
    });
    store.close();
}

/// A segment of 0 MiB is refused with a usage error naming the flag (it was taken as
/// 1 MiB without a word), as is one above 64 GiB (its size in bytes could overflow);
/// 1 MiB, the least, is accepted (the data directory is then refused, being a file,
/// after the flags were).
#[test]
fn a_segment_size_below_one_mib_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_dir = tmp.path().join("data");
    std::fs::write(&not_a_dir, b"").unwrap();
    let serve = |mib: &str| {
        Command::new(env!("CARGO_BIN_EXE_quire"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
            .args(["--segment-mib", mib, "--data-dir"])
            .arg(&not_a_dir)
            .output()
            .expect("quire binary runs")
    };
    for refused in ["0", "65537", "18446744073709551615"] {
        let out = serve(refused);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{refused}: {stderr}");
        assert!(stderr.contains("--segment-mib"), "{refused}: {stderr}");
    }
    let out = serve("1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!stderr.contains("--segment-mib"), "{stderr}");
}

/// Limits that bound each other are checked together at startup, in the flags' terms:
/// with the largest frame (8 MiB), the outbox must hold two frames (17 MiB; 16 was
/// refused as "each half of the outgoing buffer (8388608 bytes)", naming no flag) and a
/// segment must hold the largest op's record (8 MiB; a 1 MiB segment was accepted and
/// then every op over 1 MiB refused with Reject, found from outside). Each is tested at
/// its least value and one below it; the accepted ones go on to fail on the data
/// directory, a file.
#[test]
fn limits_that_bound_each_other_are_refused_at_startup_by_name_with_the_least_value() {
    let tmp = tempfile::tempdir().unwrap();
    let not_a_dir = tmp.path().join("data");
    std::fs::write(&not_a_dir, b"").unwrap();
    let serve = |outbox: &str, segment: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_quire"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off"])
            .args(["--max-frame", "8388608", "--outbox-mib", outbox])
            .args(["--segment-mib", segment, "--data-dir"])
            .arg(&not_a_dir)
            .output()
            .expect("quire binary runs");
        assert!(!out.status.success());
        strip_ansi(&String::from_utf8_lossy(&out.stderr))
    };
    let stderr = serve("16", "64");
    assert!(
        stderr.contains("--outbox-mib") && stderr.contains("at least 17"),
        "{stderr}"
    );
    let stderr = serve("17", "7");
    assert!(
        stderr.contains("--segment-mib") && stderr.contains("at least 8"),
        "{stderr}"
    );
    assert!(stderr.contains("--max-frame"), "{stderr}");
    let stderr = serve("17", "8");
    assert!(
        !stderr.contains("--segment-mib") && !stderr.contains("--outbox-mib"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot open"), "{stderr}");
}

#[test]
fn logs_go_to_stderr_without_colour_codes_when_it_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    // A data directory that cannot be opened: a regular file. The server logs why and exits.
    let not_a_dir = tmp.path().join("data");
    std::fs::write(&not_a_dir, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--data-dir",
        ])
        .arg(&not_a_dir)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("quire binary runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("cannot open"), "stderr: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in: {stderr:?}");
}

/// The process's anonymous resident memory, in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

/// Connections that each hold most of a 1 MiB frame cost that memory while they are
/// open; once they close, the memory goes back to the system (it stayed with the
/// process: 316 MB after 300 such connections had closed).
#[test]
fn memory_of_half_sent_large_frames_is_returned_when_their_connections_close() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_server(tmp.path());
    let pid = child.id();
    let before = rss_anon_kib(pid);
    let frame_len: u32 = 1 << 20;
    let mut held = Vec::new();
    for id in 0..40u64 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut hello = vec![0x01, 0, 0, 0, 0];
        hello.extend_from_slice(b"QUIR");
        hello.extend_from_slice(&quire::protocol::PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&(500 + id).to_le_bytes());
        hello.extend_from_slice(&0u16.to_le_bytes());
        s.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
        s.write_all(&hello).unwrap();
        s.write_all(&frame_len.to_le_bytes()).unwrap();
        s.write_all(&[0x11]).unwrap();
        s.write_all(&vec![b'x'; frame_len as usize - 64]).unwrap();
        held.push(s);
    }
    // Wait (bounded) until the server holds them.
    let mut holding = before;
    for _ in 0..600 {
        holding = rss_anon_kib(pid);
        if holding > before + 30 * 1024 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        holding > before + 30 * 1024,
        "40 MiB of half frames are held ({before} -> {holding} KiB)"
    );
    drop(held);
    let mut after = holding;
    for _ in 0..600 {
        after = rss_anon_kib(pid);
        if after < before + (holding - before) / 8 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_child(&mut child);
    assert!(
        after < before + (holding - before) / 8,
        "memory returned after close: {before} KiB before, {holding} held, {after} after"
    );
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `--config FILE` sets what the command line and the environment do not; JSON logs are
/// one object per line; the admin endpoint from the file answers `/readyz` once the
/// server serves.
#[test]
fn a_config_file_sets_what_flags_and_environment_do_not_and_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quire.toml");
    // max_frame from the file would be refused (below 4096); the environment's wins.
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nlog_format = \"json\"\n\
         max_frame = 1\nmin_free_mib = 0\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quire"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env("QUIRE_MAX_FRAME", "65536")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quire binary starts");
    let logs = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(logs).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let _ = tx.send(line);
        }
    });
    let (mut admin, mut serving) = (None, false);
    while admin.is_none() || !serving {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs that it serves");
        let json: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let fields = &json["fields"];
        if let Some(at) = fields["admin"].as_str() {
            admin = Some(at.parse::<SocketAddr>().unwrap());
        }
        serving |= fields["message"] == "serving";
    }
    // Plain HTTP/1.1 over a socket: /readyz answers 200 with a JSON body.
    let mut s = std::net::TcpStream::connect(admin.unwrap()).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /readyz HTTP/1.1\r\nHost: quire\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut s, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"ready\":true"), "{response}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

/// Sends `signal` to the server.
fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

#[test]
fn a_client_gives_up_on_a_stopped_server_that_its_edits_no_longer_fit_into() {
    // A guard against a hang (not a performance threshold).
    const HANG: Duration = Duration::from_secs(60);
    // Documents, and the characters each one's op inserts: more than the socket's
    // buffers on both sides take while the server reads nothing (48 ops in flight, of
    // 600,000 bytes each: 28.8 MB), and within the server's 64 ops in flight.
    const DOCS: usize = 48;
    const CHARS: usize = 600_000;
    /// Kills the server however the test ends (a stopped one would stay).
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            stop_child(&mut self.0);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (child, addr) = spawn_server(tmp.path());
    let child = Killed(child);
    let child = &child.0;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut config = ClientConfig::new(addr.to_string());
        config.timeout = Duration::from_secs(3);
        config.ping_interval = Duration::from_millis(500);
        let client = Client::connect(config).await.unwrap();
        client.wait_connected().await.unwrap();
        let mut docs = Vec::new();
        for n in 0..DOCS {
            docs.push(client.open(&format!("big{n}")).await.unwrap());
        }
        let mut events = docs[0].events();
        // The server stops (SIGSTOP: a frozen process or machine; its sockets stay open
        // and take nothing more once their buffers are full).
        signal(child, nix::sys::signal::Signal::SIGSTOP);
        for doc in &docs {
            doc.edit(&[Patch::new(0, 0, "x".repeat(CHARS))])
                .await
                .unwrap();
        }
        // The client notices within its timeout, though a write is stuck meanwhile.
        tokio::time::timeout(HANG, connection_lost(&mut events))
            .await
            .expect("the client still thinks it is connected to a stopped server");
        assert_ne!(client.state(), ConnectionState::Connected);

        // The server goes on: every edit lands, once.
        signal(child, nix::sys::signal::Signal::SIGCONT);
        for doc in &docs {
            tokio::time::timeout(HANG, doc.synced())
                .await
                .expect("synced after the server went on")
                .unwrap();
            assert_eq!(doc.text().len(), CHARS);
        }
        drop(docs);
        client.shutdown().await;
    });
}
