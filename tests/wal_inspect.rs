//! `wal-inspect` as an operator runs it: on a real data directory, a corrupted one, a
//! torn one, a missing one and a foreign one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use quire::op::{OpId, Patch};
use quire::sequencer::local::{LocalConfig, LocalSequencer};
use quire::sequencer::{Sequencer, SubmitOp, Submitted};
use quire::wal::record::decode_frame;
use quire::wal::WalConfig;

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wal-inspect"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A data directory with 200 ops on two documents and a snapshot of one.
fn make(dir: &Path) {
    let config = LocalConfig {
        wal: WalConfig {
            segment_size: 64 * 1024,
            ..WalConfig::default()
        },
        maintenance_interval: Duration::from_secs(3600),
        ..LocalConfig::default()
    };
    let (store, _) = LocalSequencer::open(dir, config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for i in 0..200u64 {
        let doc = if i % 2 == 0 { "even" } else { "odd" };
        let version = i / 2;
        let op = SubmitOp {
            op_id: OpId {
                client_id: 1 + i % 2,
                local_seq: version + 1,
            },
            base_version: version,
            expected_version: version,
            expected_incarnation: None,
            fingerprint: 0,
            patches: vec![Patch::new(version as u32, 0, format!("{}", i % 10))],
        };
        let Submitted::Applied { ticket, .. } = store.submit(doc, &op).unwrap() else {
            panic!()
        };
        rt.block_on(store.wait_durable(ticket)).unwrap();
        if i == 100 {
            store.snapshot_now("even").unwrap();
        }
    }
}

#[test]
fn verify_passes_a_clean_log_and_summary_and_doc_read_it() {
    let tmp = tempfile::tempdir().unwrap();
    make(tmp.path());
    let dir = tmp.path().to_str().unwrap();
    let out = inspect(&["verify", dir]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("checked 200 records"));
    let summary = text(&inspect(&["summary", dir]).stdout);
    assert!(
        summary.contains("\"even\": log seq 1..100 (100 ops); snapshot at seq 51"),
        "{summary}"
    );
    let doc = inspect(&["doc", dir, "even", "--at", "3"]);
    assert_eq!(text(&doc.stdout), "024");
    let latest = text(&inspect(&["doc", dir, "odd"]).stdout);
    assert_eq!(latest.len(), 100);
    let dump = text(&inspect(&["dump", dir, "--json"]).stdout);
    assert_eq!(dump.lines().count(), 200);
    let first = dump.lines().next().unwrap();
    assert!(first.starts_with("{\"lsn\":1,"), "{first}");
    // Type 2, with the fingerprint the op was submitted with (0 here).
    assert!(
        first.contains("\"type\":\"OpWithFingerprint\"")
            && first.contains("\"fingerprint\":\"0000000000000000\""),
        "{first}"
    );
}

#[test]
fn verify_names_the_byte_range_of_a_flipped_byte_and_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    make(tmp.path());
    let segment = tmp.path().join("wal").join("00000000000000000001.wal");
    let mut bytes = std::fs::read(&segment).unwrap();
    let flipped = 64 + 24 * 40 + 7; // inside some record of the first segment
    bytes[flipped] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();
    let out = inspect(&["verify", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CORRUPT"))
        .expect(&stdout);
    assert!(line.contains("00000000000000000001.wal"), "{line}");
    let range = line
        .split("bytes ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    let (a, b) = range.split_once("..").unwrap();
    let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(a <= flipped && flipped < b, "{flipped} not in {a}..{b}");
    // And the server refuses to start on it, naming the same place.
    let err = LocalSequencer::open(tmp.path(), LocalConfig::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains(&format!("offset {a}")), "{err}");
}

/// The newest segment file of a data directory and the bytes its records use, as
/// `summary` reports them.
fn last_segment_and_bytes_used(dir: &Path) -> (PathBuf, usize) {
    let out = inspect(&["summary", dir.to_str().unwrap()]);
    let summary = text(&out.stdout);
    let last = summary
        .lines()
        .rfind(|l| l.contains(".wal") && l.contains("bytes used"))
        .unwrap();
    let used: usize = last
        .split("records  ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (PathBuf::from(last.split_whitespace().next().unwrap()), used)
}

#[test]
fn verify_reports_a_torn_tail_with_its_own_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    make(tmp.path());
    // Garbage after the last record of the newest segment, as a torn write leaves it.
    let (path, used) = last_segment_and_bytes_used(tmp.path());
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[used + 600..used + 700] {
        *b = 0xAB;
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = inspect(&["verify", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("TORN"));
}

#[test]
fn a_log_whose_file_ends_inside_its_last_record_is_a_torn_tail_for_verify_and_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    make(tmp.path());
    // The tail of the last write never reached the file: it ends 5 bytes into the
    // last record's payload (the record is longer than its 24-byte header + 5).
    let (path, used) = last_segment_and_bytes_used(tmp.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let last_record = (0..used)
        .rev()
        .filter(|o| o % 8 == 0)
        .find(|&o| decode_frame(&bytes[o..used]).is_ok_and(|r| o + r.framed_len == used))
        .unwrap();
    bytes.truncate(last_record + 24 + 5);
    std::fs::write(&path, &bytes).unwrap();

    let out = inspect(&["verify", tmp.path().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("TORN"), "{}", text(&out.stdout));

    // The server cuts it and starts with the 199 records before it.
    let (store, report) = LocalSequencer::open(tmp.path(), LocalConfig::default()).unwrap();
    assert!(report.tail_cut.is_some(), "{report:?}");
    assert_eq!(report.records_scanned, 199);
    store.close();
    let out = inspect(&["verify", tmp.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn missing_and_foreign_directories_get_clear_errors() {
    let out = inspect(&["verify", "/nonexistent/quire"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = inspect(&["summary", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not a quire data directory"));
}

#[test]
fn output_into_a_pipe_whose_reader_is_gone_ends_quietly_with_the_commands_own_status() {
    let tmp = tempfile::tempdir().unwrap();
    make(tmp.path());
    let dir = tmp.path().to_str().unwrap();
    let with_stdout_closed = |args: &[&str]| {
        // `wal-inspect dump DIR | head`, with head already gone: every write to stdout
        // fails with EPIPE. (Close-on-exec, so no other test's child keeps the reader.)
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(reader);
        Command::new(env!("CARGO_BIN_EXE_wal-inspect"))
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    for args in [
        vec!["dump", dir],
        vec!["dump", dir, "--json"],
        vec!["summary", dir],
        vec!["verify", dir],
        vec!["doc", dir, "odd"],
    ] {
        let out = with_stdout_closed(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
    // verify still says what it found through its exit status: here a torn tail.
    let (path, used) = last_segment_and_bytes_used(tmp.path());
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(used as u64 - 3).unwrap();
    let out = with_stdout_closed(&["verify", dir]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("torn write"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn summary_names_a_snapshots_path_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("wal")).unwrap();
    let snapshots = tmp.path().join("snapshots");
    std::fs::write(&snapshots, b"not a directory").unwrap();
    let out = inspect(&["summary", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains(snapshots.to_str().unwrap()),
        "{}",
        text(&out.stderr)
    );
}
