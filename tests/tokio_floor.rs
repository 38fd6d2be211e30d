//! `tokio-floor`, the floor `tools/bench-cpu.sh` sets beside quire and Redis: it answers
//! redis-benchmark's commands, whole or in pieces, only once they are in quire's log,
//! and closes a connection that sends anything else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use quire::wal::vfs::OsFs;
use quire::wal::{Wal, WalConfig};

const RPUSH: &[u8] = b"*3\r\n$5\r\nRPUSH\r\n$4\r\nlist\r\n$3\r\nabc\r\n";

struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the floor on a free port; returns it with the address it serves on.
fn start(data_dir: &std::path::Path, extra: &[&str]) -> (Floor, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokio-floor"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("tokio-floor serving on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    (Floor(child), addr)
}

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

#[test]
fn the_floor_answers_commands_in_pieces_once_logged_and_closes_on_garbage() {
    answers_once_logged(&[]);
}

#[test]
fn the_floor_that_syncs_on_its_worker_answers_once_logged_too() {
    answers_once_logged(&["--sync-on-worker"]);
}

#[test]
fn the_floor_serves_connections_up_to_its_limit_and_closes_one_more() {
    let tmp = tempfile::tempdir().unwrap();
    let (_floor, addr) = start(tmp.path(), &["--max-connections", "1"]);
    let mut first = connect(&addr);
    first.write_all(RPUSH).unwrap();
    let mut reply = [0u8; 4];
    first.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b":1\r\n");
    // One past the limit: closed with nothing read from it.
    let mut second = connect(&addr);
    let _ = second.write_all(RPUSH);
    let mut byte = [0u8; 1];
    match second.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("one connection past the limit should be closed: {other:?}"),
    }
    // Once the first is gone, its place is free again.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut third = connect(&addr);
        if third.write_all(RPUSH).is_ok() && third.read_exact(&mut reply).is_ok() {
            assert_eq!(&reply, b":1\r\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first connection's place was never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn answers_once_logged(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut floor, addr) = start(tmp.path(), extra);

    let mut client = connect(&addr);
    // One command in two pieces, the second piece followed by a whole second command.
    client.write_all(&RPUSH[..7]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut rest = RPUSH[7..].to_vec();
    rest.extend_from_slice(RPUSH);
    client.write_all(&rest).unwrap();
    let mut replies = [0u8; 8];
    client.read_exact(&mut replies).unwrap();
    assert_eq!(&replies, b":1\r\n:1\r\n");

    let mut garbage = connect(&addr);
    garbage.write_all(b"PING\r\n").unwrap();
    let mut byte = [0u8; 1];
    match garbage.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection should be closed with nothing sent: {other:?}"),
    }

    // Both answered commands are in the log, as records of the first connection's
    // document.
    floor.0.kill().unwrap();
    floor.0.wait().unwrap();
    let mut logged = Vec::new();
    let scanned = Wal::scan(Arc::new(OsFs), tmp.path(), WalConfig::default(), |op, _| {
        logged.push((op.doc_id.clone(), op.server_seq))
    })
    .unwrap();
    drop(scanned);
    assert_eq!(
        logged,
        vec![("floor-1".to_string(), 1), ("floor-1".to_string(), 2)]
    );

    // A second run on that log is refused: its seqs would repeat the first run's.
    let out = Command::new(env!("CARGO_BIN_EXE_tokio-floor"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path())
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("holds a log of 2 records already"),
        "{stderr}"
    );
}
