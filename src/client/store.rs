//! A client's persistence directory: its client id and, per document, the confirmed
//! text and version and every unacknowledged op (with its op id), so that a client
//! restarted on the directory resumes exactly where it stopped.
//!
//! ```text
//! DIR/lock                 held (flock) by the client using the directory
//! DIR/client-id            the id the server gave this client, in decimal
//! DIR/docs/<hex id>.json   one document's state (below)
//! ```
//!
//! Each file is replaced whole: written to `NAME.tmp`, fsynced, renamed over `NAME`,
//! and the directory fsynced, so a crash leaves the old state or the new one. A
//! document's file is JSON (`serde_json`, which the crate already uses):
//! `{"format":1, "doc", "version", "next_local_seq", "confirmed", "in_flight":
//! [{"local_seq", "base_version", "patches", "now"}], "buffer": [patches...]}` where
//! patches are `[[pos, del, ins], ...]`; `patches` is an op as sent (resent as it is),
//! `now` the same op rebased over the remote ops received since.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::state::{ClientDoc, Outgoing};
use crate::op::Patch;
use crate::ot::TextOp;

const FORMAT: u64 = 1;

pub struct Store {
    dir: PathBuf,
    /// Holds the directory's lock while the client runs (none: shut down).
    lock: std::sync::Mutex<Option<File>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.unlock();
    }
}

impl Store {
    /// Opens (creating) `dir` and locks it: two clients on one directory would share a
    /// client id, and the server would keep replacing one's connection with the other's.
    pub fn open(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir.join("docs"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{} is in use by another client ({e}); each running client needs a directory of its own",
                    dir.display()
                ),
            ));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }

    /// Gives the directory up (the client shut down): another client may take it, and
    /// this one writes nothing more to it.
    pub fn unlock(&self) {
        if let Some(lock) = self.lock.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Unlocked explicitly, not by closing: a process forked meanwhile (by any
            // thread of this process, until its exec) holds a copy of the descriptor,
            // and the lock lasts while any copy is open; LOCK_UN releases it for all.
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) };
        }
    }

    /// The client id kept here, if the server gave one.
    pub fn client_id(&self) -> io::Result<Option<u64>> {
        match fs::read_to_string(self.dir.join("client-id")) {
            Ok(s) => s.trim().parse().map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.dir.join("client-id").display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save_client_id(&self, id: u64) -> io::Result<()> {
        self.replace(&self.dir.join("client-id"), format!("{id}\n").as_bytes())
    }

    fn doc_path(&self, doc: &str) -> PathBuf {
        let hex: String = doc.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join("docs").join(format!("{hex}.json"))
    }

    /// The state saved for `doc`, if any.
    pub fn load(&self, doc: &str) -> io::Result<Option<ClientDoc>> {
        let path = self.doc_path(doc);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {why}", path.display()),
            )
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        decode(&v, doc).map(Some).map_err(bad)
    }

    /// Replaces `doc`'s saved state with `bytes` (from [`encode`]). Blocking.
    pub fn save(&self, doc: &str, bytes: &[u8]) -> io::Result<()> {
        self.replace(&self.doc_path(doc), bytes)
    }

    fn replace(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        // Under the lock: no write after `unlock`, when another client may own it.
        let held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            return Err(io::Error::other("the client is shut down"));
        }
        let tmp = path.with_extension("tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        File::open(path.parent().expect("a file in a directory"))?.sync_all()
    }
}

fn patches_json(patches: &[Patch]) -> Value {
    Value::Array(
        patches
            .iter()
            .map(|p| json!([p.pos, p.del, p.ins]))
            .collect(),
    )
}

fn patches_from(v: &Value) -> Result<Vec<Patch>, String> {
    let list = v.as_array().ok_or("patches: not a list")?;
    list.iter()
        .map(|p| {
            let bad = || format!("bad patch {p}");
            let pos = p.get(0).and_then(Value::as_u64).ok_or_else(bad)?;
            let del = p.get(1).and_then(Value::as_u64).ok_or_else(bad)?;
            let ins = p.get(2).and_then(Value::as_str).ok_or_else(bad)?;
            Ok(Patch::new(
                u32::try_from(pos).map_err(|_| bad())?,
                u32::try_from(del).map_err(|_| bad())?,
                ins,
            ))
        })
        .collect()
}

/// `doc`'s state as the bytes [`Store::save`] writes.
pub fn encode(name: &str, doc: &ClientDoc) -> Vec<u8> {
    let (in_flight, buffer) = doc.pending();
    let v = json!({
        "format": FORMAT,
        "doc": name,
        "version": doc.version(),
        "next_local_seq": doc.next_local_seq(),
        "confirmed": doc.confirmed_text(),
        "in_flight": in_flight.iter().map(|(out, now)| json!({
            "local_seq": out.local_seq,
            "base_version": out.base_version,
            "patches": patches_json(&out.patches),
            "now": patches_json(&now.to_patches()),
        })).collect::<Vec<_>>(),
        "buffer": buffer.iter().map(|op| patches_json(&op.to_patches())).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&v).expect("JSON of plain values")
}

fn decode(v: &Value, name: &str) -> Result<ClientDoc, String> {
    let u64_of = |key: &str| {
        v.get(key)
            .and_then(Value::as_u64)
            .ok_or(format!("no {key}"))
    };
    if u64_of("format")? != FORMAT {
        return Err(format!("format {} is not {FORMAT}", u64_of("format")?));
    }
    if v.get("doc").and_then(Value::as_str) != Some(name) {
        return Err(format!("not the state of document {name:?}"));
    }
    let confirmed = v
        .get("confirmed")
        .and_then(Value::as_str)
        .ok_or("no confirmed text")?;
    let mut in_flight = Vec::new();
    for op in v
        .get("in_flight")
        .and_then(Value::as_array)
        .ok_or("no in_flight")?
    {
        let field = |key: &str| op.get(key).ok_or(format!("an op in flight without {key}"));
        in_flight.push((
            Outgoing {
                local_seq: field("local_seq")?.as_u64().ok_or("bad local_seq")?,
                base_version: field("base_version")?.as_u64().ok_or("bad base_version")?,
                patches: patches_from(field("patches")?)?,
            },
            TextOp::from_patches(&patches_from(field("now")?)?),
        ));
    }
    let buffer = v
        .get("buffer")
        .and_then(Value::as_array)
        .ok_or("no buffer")?
        .iter()
        .map(|p| patches_from(p).map(|p| TextOp::from_patches(&p)))
        .collect::<Result<Vec<_>, _>>()?;
    ClientDoc::restore(
        confirmed.to_owned(),
        u64_of("version")?,
        u64_of("next_local_seq")?,
        in_flight,
        buffer,
    )
    .map_err(|e| format!("the saved ops do not apply: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restarted application found its directory "in use" now and then in CI: a test
    /// beside it spawned processes, and a fork (until its exec) holds a copy of the
    /// lock's descriptor, which kept the lock after the client closed its own.
    #[test]
    fn a_client_that_stops_frees_its_directory_though_a_forked_process_holds_the_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // SAFETY: the child only sleeps and exits (async-signal-safe calls).
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork");
        if child == 0 {
            unsafe {
                libc::sleep(30);
                libc::_exit(0);
            }
        }
        store.unlock();
        let again = Store::open(dir.path());
        // SAFETY: our own child, killed and reaped.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        again.expect("the directory is free once its client unlocked it");
        drop(store);
    }

    #[test]
    fn a_document_with_pending_ops_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut doc = ClientDoc::new("héllo".into(), 7, 3);
        doc.local_edit(&[Patch::new(5, 0, " 😀")]).unwrap();
        let sent = doc.take_to_send().unwrap();
        doc.on_remote(8, &[Patch::new(0, 0, "¡")]).unwrap();
        doc.local_edit(&[Patch::new(0, 1, "")]).unwrap();
        store.save("notes/a", &encode("notes/a", &doc)).unwrap();
        let back = store.load("notes/a").unwrap().expect("saved");
        assert_eq!(back.text(), doc.text());
        assert_eq!(back.confirmed_text(), doc.confirmed_text());
        assert_eq!(back.version(), 8);
        assert_eq!(back.next_local_seq(), doc.next_local_seq());
        assert_eq!(back.in_flight(), Some(&sent));
        assert_eq!(back.pending(), doc.pending());
        assert!(store.load("notes/b").unwrap().is_none());
        // A second client cannot take the directory.
        assert!(Store::open(dir.path()).is_err());
    }
}
