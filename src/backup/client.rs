//! `quire backup`: fetches a backup from a running server's admin endpoint into a
//! directory (blocking HTTP with `ureq`).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{hex, io_at, BackupError, Manifest, Started, MANIFEST_FILE};

/// Bytes between two progress reports.
const PROGRESS_EVERY_BYTES: u64 = 4 << 20;
/// Largest reply to `POST /backup` read (the manifest).
const MANIFEST_BYTES_MAX: u64 = 256 << 20;

/// How far a backup got: reported after each file and every
/// 4 MiB within one.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub files_done: usize,
    pub files: usize,
    pub bytes_done: u64,
    pub bytes: u64,
}

/// Takes a backup of the server whose admin endpoint is at `admin` (`host:port`) into
/// `to` (created; it must not exist or be empty). Returns the manifest written to
/// `to/manifest.json`, last, with every file's SHA-256.
pub fn backup(
    admin: &str,
    to: &Path,
    admin_token: Option<&str>,
    mut progress: impl FnMut(Progress),
) -> Result<Manifest, BackupError> {
    ensure_empty_dir(to)?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(120))
        .build();
    let agent = Authorized {
        agent,
        bearer: admin_token.map(|t| format!("Bearer {t}")),
    };
    let base = format!("http://{admin}");
    let reply = call(agent.post(&format!("{base}/backup")))?;
    let mut body = String::new();
    reply
        .into_reader()
        .take(MANIFEST_BYTES_MAX)
        .read_to_string(&mut body)
        .map_err(|e| BackupError::Transport(format!("reading the manifest: {e}")))?;
    let started: Started = serde_json::from_str(&body)
        .map_err(|e| BackupError::Manifest(format!("the server's manifest: {e}")))?;
    let fetched = fetch_files(&agent, &base, &started, to, &mut progress);
    // Ended either way: the server holds its log back until then (or the lease ends).
    let ended = call(agent.delete(&format!("{base}/backup/{}", started.id)));
    let manifest = fetched?;
    ended?;
    write_manifest(to, &manifest)?;
    Ok(manifest)
}

/// The agent, and the admin token every request carries (if any).
struct Authorized {
    agent: ureq::Agent,
    bearer: Option<String>,
}

impl Authorized {
    fn with(&self, request: ureq::Request) -> ureq::Request {
        match &self.bearer {
            Some(bearer) => request.set("Authorization", bearer),
            None => request,
        }
    }
    fn get(&self, url: &str) -> ureq::Request {
        self.with(self.agent.get(url))
    }
    fn post(&self, url: &str) -> ureq::Request {
        self.with(self.agent.post(url))
    }
    fn delete(&self, url: &str) -> ureq::Request {
        self.with(self.agent.delete(url))
    }
}

fn call(request: ureq::Request) -> Result<ureq::Response, BackupError> {
    match request.call() {
        Ok(reply) => Ok(reply),
        Err(ureq::Error::Status(status, reply)) => {
            let mut body = String::new();
            let _ = reply.into_reader().take(64 << 10).read_to_string(&mut body);
            Err(BackupError::Http { status, body })
        }
        Err(e) => Err(BackupError::Transport(e.to_string())),
    }
}

/// `dir` exists and is empty, or is created.
pub(crate) fn ensure_empty_dir(dir: &Path) -> Result<(), BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::TargetNotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_at("creating", dir))
        }
        Err(e) => Err(io_at("reading", dir)(e)),
    }
}

fn fetch_files(
    agent: &Authorized,
    base: &str,
    started: &Started,
    to: &Path,
    progress: &mut impl FnMut(Progress),
) -> Result<Manifest, BackupError> {
    let mut manifest = started.manifest.clone();
    let mut done = Progress {
        files_done: 0,
        files: manifest.files.len(),
        bytes_done: 0,
        bytes: manifest.files.iter().map(|f| f.len).sum(),
    };
    for sub in ["wal", "snapshots"] {
        let dir = to.join(sub);
        std::fs::create_dir_all(&dir).map_err(io_at("creating", &dir))?;
    }
    for file in &mut manifest.files {
        if !super::valid_file_name(&file.name) {
            return Err(BackupError::Manifest(format!(
                "the server named a file {:?}, which is not a segment or a snapshot",
                file.name
            )));
        }
        let url = format!("{base}/backup/{}/file/{}", started.id, file.name);
        let reply = call(agent.get(&url))?;
        let path = to.join(&file.name);
        let mut out = std::fs::File::create(&path).map_err(io_at("creating", &path))?;
        let mut reader = reply.into_reader().take(file.len);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut written = 0u64;
        let mut reported = done.bytes_done;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| BackupError::Transport(format!("reading {}: {e}", file.name)))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_at("writing", &path))?;
            written += n as u64;
            done.bytes_done += n as u64;
            if done.bytes_done - reported >= PROGRESS_EVERY_BYTES {
                reported = done.bytes_done;
                progress(done);
            }
        }
        if written != file.len {
            return Err(BackupError::Length {
                file: file.name.clone(),
                expected: file.len,
                found: written,
            });
        }
        out.sync_all().map_err(io_at("syncing", &path))?;
        file.sha256 = Some(hex(&hasher.finalize()));
        done.files_done += 1;
        progress(done);
    }
    for sub in ["wal", "snapshots"] {
        sync_dir(&to.join(sub))?;
    }
    Ok(manifest)
}

/// Writes `manifest` to `dir/manifest.json` atomically and durably.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
    let text = serde_json::to_string_pretty(manifest).expect("a manifest serialises");
    let mut file = std::fs::File::create(&tmp).map_err(io_at("creating", &tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io_at("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_at("renaming", &tmp))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("syncing", dir))
}
