//! Per-document snapshots: the materialized text, the last seq it includes and the
//! dedupe table, in one checksummed file written atomically (temp file, fsync, rename,
//! fsync directory). The newest two per document are kept: a snapshot that fails its
//! checksum falls back to the older one (and the log after it), never to silent loss.
//!
//! File name: `<hex of doc id bytes>.<last_included_seq as 20 digits>.snap` in
//! `snapshots/`. Layout (little-endian): magic `QUIRSNAP`, format version u32 (3; 1 and
//! 2 are still read), reserved u32 (0), last_included_seq u64, created Unix ms u64,
//! doc_id_len u16, doc_id, text_len u64 (bytes), text (UTF-8), dedupe_count u32, then per
//! entry client_id u64, last_local_seq u64, seq u64 (sorted by client_id), in version 3
//! that op's fingerprint (`known u8` (0 or 1), `fingerprint u64` (0 when unknown)), in
//! versions 2 and 3 `older_count u16` then that many of the client's earlier remembered
//! ops, oldest first: `local_seq u64`, `seq u64`, and in version 3 its fingerprint as
//! above; and last a crc32c u32 of every byte before it. Versions 1 and 2 carry no
//! fingerprints: their ops' are unknown (and a resend matching one is refused, see
//! `sequencer::Dedupe::seen`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut};

use super::vfs::{at_path, Vfs};
use crate::op::validate_doc_id;

pub const SNAPSHOT_MAGIC: [u8; 8] = *b"QUIRSNAP";
pub const SNAPSHOT_FORMAT_VERSION: u32 = 3;
/// How many snapshots of a document are kept (the newest and one fallback).
pub const SNAPSHOTS_KEPT: usize = 2;

/// An op the dedupe table remembers: the client's local seq, the seq it got, and the
/// fingerprint of the op as sent (`None`: unknown, read from data an older quire wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RememberedOp {
    pub local_seq: u64,
    pub seq: u64,
    pub fingerprint: Option<u64>,
}

/// Per client: the last op applied, the seq it got and its fingerprint, and the client's
/// earlier ops the dedupe table remembers (oldest first), so that a resend of any of
/// them is recognised, and a different op under one of their ids refused, after a
/// restart too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeEntry {
    pub client_id: u64,
    pub last_local_seq: u64,
    pub seq: u64,
    pub fingerprint: Option<u64>,
    pub older: Vec<RememberedOp>,
}

impl DedupeEntry {
    /// The client's remembered ops, oldest first, the last one included.
    pub fn ops(&self) -> impl Iterator<Item = RememberedOp> + '_ {
        self.older
            .iter()
            .copied()
            .chain(std::iter::once(RememberedOp {
                local_seq: self.last_local_seq,
                seq: self.seq,
                fingerprint: self.fingerprint,
            }))
    }
}

/// Bytes of a fingerprint in version 3: `known u8`, `fingerprint u64`.
const FINGERPRINT_LEN: usize = 9;

fn put_fingerprint(out: &mut Vec<u8>, fingerprint: Option<u64>) {
    out.put_u8(u8::from(fingerprint.is_some()));
    out.put_u64_le(fingerprint.unwrap_or(0));
}

/// A version 3 fingerprint; the caller checked that [`FINGERPRINT_LEN`] bytes are there.
fn get_fingerprint(b: &mut &[u8]) -> Result<Option<u64>, SnapshotError> {
    match (b.get_u8(), b.get_u64_le()) {
        (1, fingerprint) => Ok(Some(fingerprint)),
        (0, 0) => Ok(None),
        _ => Err(bad("invalid fingerprint in snapshot")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub doc_id: String,
    pub last_included_seq: u64,
    pub created_ms: u64,
    pub text: String,
    pub dedupe: Vec<DedupeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError(pub String);

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(msg: impl Into<String>) -> SnapshotError {
    SnapshotError(msg.into())
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.text.len() + self.dedupe.len() * 35);
        out.put_slice(&SNAPSHOT_MAGIC);
        out.put_u32_le(SNAPSHOT_FORMAT_VERSION);
        out.put_u32_le(0);
        out.put_u64_le(self.last_included_seq);
        out.put_u64_le(self.created_ms);
        out.put_u16_le(self.doc_id.len() as u16);
        out.put_slice(self.doc_id.as_bytes());
        out.put_u64_le(self.text.len() as u64);
        out.put_slice(self.text.as_bytes());
        out.put_u32_le(self.dedupe.len() as u32);
        for entry in &self.dedupe {
            out.put_u64_le(entry.client_id);
            out.put_u64_le(entry.last_local_seq);
            out.put_u64_le(entry.seq);
            put_fingerprint(&mut out, entry.fingerprint);
            let older =
                u16::try_from(entry.older.len()).expect("a client's remembered ops are few");
            out.put_u16_le(older);
            for op in &entry.older {
                out.put_u64_le(op.local_seq);
                out.put_u64_le(op.seq);
                put_fingerprint(&mut out, op.fingerprint);
            }
        }
        let crc = crc32c::crc32c(&out);
        out.put_u32_le(crc);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        if bytes.len() < 8 + 4 + 4 {
            return Err(bad("snapshot file is truncated"));
        }
        if bytes[0..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a quire snapshot (bad magic)"));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().unwrap());
        if crc32c::crc32c(body) != stored {
            return Err(bad("snapshot checksum mismatch"));
        }
        let mut b = &body[8..];
        let short = || bad("snapshot ends early");
        let version = b.try_get_u32_le().map_err(|_| short())?;
        if !(1..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
            return Err(bad(format!(
                "snapshot format version {version} is not supported (this build reads 1 to {SNAPSHOT_FORMAT_VERSION})"
            )));
        }
        // Fixed bytes per entry and per older op in this version.
        let (entry_len, older_len) = match version {
            1 | 2 => (24, 16),
            _ => (24 + FINGERPRINT_LEN, 16 + FINGERPRINT_LEN),
        };
        let _reserved = b.try_get_u32_le().map_err(|_| short())?;
        let last_included_seq = b.try_get_u64_le().map_err(|_| short())?;
        let created_ms = b.try_get_u64_le().map_err(|_| short())?;
        let doc_len = b.try_get_u16_le().map_err(|_| short())? as usize;
        let doc_id = take_str(&mut b, doc_len)?;
        validate_doc_id(&doc_id).map_err(SnapshotError)?;
        let text_len = b.try_get_u64_le().map_err(|_| short())?;
        let text = take_str(&mut b, usize::try_from(text_len).map_err(|_| short())?)?;
        let count = b.try_get_u32_le().map_err(|_| short())? as usize;
        if count > b.remaining() / entry_len {
            return Err(short());
        }
        let mut dedupe = Vec::with_capacity(count);
        for _ in 0..count {
            if b.remaining() < entry_len {
                return Err(short());
            }
            let (client_id, last_local_seq, seq) = (b.get_u64_le(), b.get_u64_le(), b.get_u64_le());
            let fingerprint = match version {
                1 | 2 => None,
                _ => get_fingerprint(&mut b)?,
            };
            let mut older = Vec::new();
            if version >= 2 {
                let n = b.try_get_u16_le().map_err(|_| short())? as usize;
                if n > b.remaining() / older_len {
                    return Err(short());
                }
                older = (0..n)
                    .map(|_| {
                        let (local_seq, seq) = (b.get_u64_le(), b.get_u64_le());
                        let fingerprint = match version {
                            2 => None,
                            _ => get_fingerprint(&mut b)?,
                        };
                        Ok(RememberedOp {
                            local_seq,
                            seq,
                            fingerprint,
                        })
                    })
                    .collect::<Result<_, SnapshotError>>()?;
                if older.windows(2).any(|w| w[0].local_seq >= w[1].local_seq)
                    || older.last().is_some_and(|o| o.local_seq >= last_local_seq)
                {
                    return Err(bad("a client's remembered ops are out of order"));
                }
            }
            dedupe.push(DedupeEntry {
                client_id,
                last_local_seq,
                seq,
                fingerprint,
                older,
            });
        }
        if b.has_remaining() {
            return Err(bad("trailing bytes in snapshot"));
        }
        Ok(Snapshot {
            doc_id,
            last_included_seq,
            created_ms,
            text,
            dedupe,
        })
    }
}

fn take_str(b: &mut &[u8], len: usize) -> Result<String, SnapshotError> {
    if b.remaining() < len {
        return Err(bad("snapshot ends early"));
    }
    let s = std::str::from_utf8(&b[..len])
        .map_err(|e| bad(format!("invalid UTF-8 in snapshot: {e}")))?
        .to_owned();
    b.advance(len);
    Ok(s)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn snapshot_file_name(doc_id: &str, seq: u64) -> String {
    format!("{}.{seq:020}.snap", hex(doc_id.as_bytes()))
}

/// `(doc_id, seq)` from a snapshot file name.
pub fn parse_snapshot_file_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".snap")?;
    let (doc_hex, seq) = stem.rsplit_once('.')?;
    if seq.len() != 20 {
        return None;
    }
    let doc = String::from_utf8(unhex(doc_hex)?).ok()?;
    Some((doc, seq.parse().ok()?))
}

/// Writes `snapshot` atomically and durably, then removes all but the newest
/// [`SNAPSHOTS_KEPT`] snapshots of that document. Returns the file's path.
pub fn write_snapshot(vfs: &dyn Vfs, dir: &Path, snapshot: &Snapshot) -> std::io::Result<PathBuf> {
    let name = snapshot_file_name(&snapshot.doc_id, snapshot.last_included_seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let bytes = snapshot.encode();
    let _ = vfs.remove(&tmp);
    let file = vfs.create(&tmp)?;
    file.write_all_at(&bytes, 0)?;
    file.sync_all()?;
    drop(file);
    vfs.rename(&tmp, &path)?;
    vfs.sync_dir(dir)?;
    let prefix = format!("{}.", hex(snapshot.doc_id.as_bytes()));
    let mut older: Vec<(u64, String)> = vfs
        .list(dir)?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .filter_map(|n| parse_snapshot_file_name(&n).map(|(_, seq)| (seq, n)))
        .collect();
    older.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    for (_, old) in older.iter().skip(SNAPSHOTS_KEPT) {
        vfs.remove(&dir.join(old))?;
    }
    Ok(path)
}

/// Removes every snapshot file of `doc_id` (a deleted document) and makes the removal
/// durable (an `fsync` of `dir`). Returns how many it removed.
pub fn remove_snapshots(vfs: &dyn Vfs, dir: &Path, doc_id: &str) -> std::io::Result<usize> {
    let prefix = format!("{}.", hex(doc_id.as_bytes()));
    let names: Vec<String> = vfs
        .list(dir)
        .map_err(at_path("listing", dir))?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .filter(|n| parse_snapshot_file_name(n).is_some_and(|(id, _)| id == doc_id))
        .collect();
    for name in &names {
        let path = dir.join(name);
        vfs.remove(&path).map_err(at_path("removing", &path))?;
    }
    if !names.is_empty() {
        vfs.sync_dir(dir).map_err(at_path("syncing", dir))?;
    }
    Ok(names.len())
}

/// The result of loading every document's snapshot.
#[derive(Debug, Default)]
pub struct LoadedSnapshots {
    /// The newest valid snapshot of each document.
    pub by_doc: BTreeMap<String, Snapshot>,
    /// Snapshot files that failed to decode, with the reason; each was skipped in
    /// favour of an older one or of replay.
    pub invalid: Vec<(PathBuf, String)>,
    /// Temp files of snapshots that were being written at a crash. Loading leaves them
    /// (it writes nothing); [`remove_leftovers`] deletes them once the store starts.
    pub leftovers: Vec<PathBuf>,
}

/// Loads the newest valid snapshot of every document in `dir`. Reads only. An I/O
/// error names the directory or file it concerns.
pub fn load_snapshots(vfs: &dyn Vfs, dir: &Path) -> std::io::Result<LoadedSnapshots> {
    let mut loaded = LoadedSnapshots::default();
    let mut by_doc: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for name in vfs.list(dir).map_err(at_path("reading", dir))? {
        if name.ends_with(".tmp") {
            loaded.leftovers.push(dir.join(&name));
            continue;
        }
        match parse_snapshot_file_name(&name) {
            Some((doc, seq)) => by_doc.entry(doc).or_default().push((seq, name)),
            None => tracing::warn!(file = %name, "ignoring a file that is not a snapshot"),
        }
    }
    for (doc, mut files) in by_doc {
        files.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        for (seq, name) in files {
            let path = dir.join(&name);
            let region = vfs.map(&path).map_err(at_path("reading", &path))?;
            match Snapshot::decode(&region) {
                Ok(snapshot) if snapshot.doc_id == doc && snapshot.last_included_seq == seq => {
                    loaded.by_doc.insert(doc.clone(), snapshot);
                    break;
                }
                Ok(_) => loaded
                    .invalid
                    .push((path, "contents do not match the file name".into())),
                Err(error) => loaded.invalid.push((path, error.0)),
            }
        }
    }
    for (path, reason) in &loaded.invalid {
        tracing::error!(file = %path.display(), %reason, "skipping an invalid snapshot; falling back to an older one or to the log");
    }
    Ok(loaded)
}

/// Deletes the temp files of snapshots that a crash interrupted (never renamed, so
/// never relied on).
pub fn remove_leftovers(vfs: &dyn Vfs, leftovers: &[PathBuf]) -> std::io::Result<()> {
    for path in leftovers {
        vfs.remove(path).map_err(at_path("removing", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::vfs::sim::SimFs;

    fn snap(seq: u64) -> Snapshot {
        Snapshot {
            doc_id: "d/\u{1F600}".into(),
            last_included_seq: seq,
            created_ms: 1,
            text: "héllo \u{1F600}".into(),
            dedupe: vec![
                DedupeEntry {
                    client_id: 9,
                    last_local_seq: 4,
                    seq,
                    fingerprint: Some(0xfeed_f00d),
                    older: vec![
                        RememberedOp {
                            local_seq: 2,
                            seq: 1,
                            fingerprint: None,
                        },
                        RememberedOp {
                            local_seq: 3,
                            seq: 2,
                            fingerprint: Some(0),
                        },
                    ],
                },
                DedupeEntry {
                    client_id: 11,
                    last_local_seq: 1,
                    seq: 3,
                    fingerprint: None,
                    older: Vec::new(),
                },
            ],
        }
    }

    #[test]
    fn a_version_1_snapshot_still_loads_with_only_each_clients_newest_op() {
        // Version 1: no `older_count`; the same bytes otherwise.
        let mut v1 = Vec::new();
        v1.put_slice(&SNAPSHOT_MAGIC);
        v1.put_u32_le(1);
        v1.put_u32_le(0);
        v1.put_u64_le(5);
        v1.put_u64_le(1);
        v1.put_u16_le(1);
        v1.put_slice(b"d");
        v1.put_u64_le(2);
        v1.put_slice(b"hi");
        v1.put_u32_le(1);
        v1.put_u64_le(9);
        v1.put_u64_le(4);
        v1.put_u64_le(5);
        let crc = crc32c::crc32c(&v1);
        v1.put_u32_le(crc);
        let snapshot = Snapshot::decode(&v1).unwrap();
        assert_eq!(
            snapshot.dedupe,
            vec![DedupeEntry {
                client_id: 9,
                last_local_seq: 4,
                seq: 5,
                fingerprint: None,
                older: Vec::new(),
            }]
        );
    }

    #[test]
    fn a_version_2_snapshot_still_loads_with_every_fingerprint_unknown() {
        // Version 2: `older_count` and older ops, no fingerprints.
        let mut v2 = Vec::new();
        v2.put_slice(&SNAPSHOT_MAGIC);
        v2.put_u32_le(2);
        v2.put_u32_le(0);
        v2.put_u64_le(5);
        v2.put_u64_le(1);
        v2.put_u16_le(1);
        v2.put_slice(b"d");
        v2.put_u64_le(2);
        v2.put_slice(b"hi");
        v2.put_u32_le(1);
        v2.put_u64_le(9);
        v2.put_u64_le(4);
        v2.put_u64_le(5);
        v2.put_u16_le(2);
        for (local_seq, seq) in [(2u64, 3u64), (3, 4)] {
            v2.put_u64_le(local_seq);
            v2.put_u64_le(seq);
        }
        let crc = crc32c::crc32c(&v2);
        v2.put_u32_le(crc);
        let snapshot = Snapshot::decode(&v2).unwrap();
        let unknown = |local_seq, seq| RememberedOp {
            local_seq,
            seq,
            fingerprint: None,
        };
        assert_eq!(
            snapshot.dedupe,
            vec![DedupeEntry {
                client_id: 9,
                last_local_seq: 4,
                seq: 5,
                fingerprint: None,
                older: vec![unknown(2, 3), unknown(3, 4)],
            }]
        );
        assert_eq!(
            snapshot.dedupe[0].ops().collect::<Vec<_>>(),
            vec![unknown(2, 3), unknown(3, 4), unknown(4, 5)]
        );
    }

    #[test]
    fn a_version_3_snapshot_keeps_each_fingerprint_byte_for_byte() {
        let snapshot = snap(5);
        let bytes = snapshot.encode();
        assert_eq!(bytes[8..12], 3u32.to_le_bytes());
        // The first entry: after the header, the doc id and the text.
        let entries = 8 + 4 + 4 + 8 + 8 + 2 + snapshot.doc_id.len() + 8 + snapshot.text.len() + 4;
        let entry = &bytes[entries..];
        assert_eq!(entry[..8], 9u64.to_le_bytes());
        assert_eq!(entry[24], 1, "known");
        assert_eq!(entry[25..33], 0xfeed_f00d_u64.to_le_bytes());
        assert_eq!(entry[33..35], 2u16.to_le_bytes());
        // Older op 1, unknown: flag 0 and a zero fingerprint; older op 2, known 0.
        assert_eq!(entry[35 + 16..35 + 25], [0; 9]);
        assert_eq!(entry[60 + 16], 1);
        assert_eq!(entry[60 + 17..60 + 25], [0; 8]);
        let decoded = Snapshot::decode(&bytes).unwrap();
        assert_eq!(decoded, snapshot);
        assert_eq!(decoded.dedupe[0].older[0].fingerprint, None);
        assert_eq!(decoded.dedupe[0].older[1].fingerprint, Some(0));
        assert_eq!(decoded.dedupe[0].fingerprint, Some(0xfeed_f00d));
        // A flag other than 0 or 1, or an unknown fingerprint with bits, is refused
        // (checksum fixed up: the decoder's own check, not the crc, must say no).
        for (at, byte) in [(entries + 24, 2u8), (entries + 35 + 17, 1)] {
            let mut bad = bytes.clone();
            bad[at] = byte;
            let len = bad.len();
            let crc = crc32c::crc32c(&bad[..len - 4]);
            bad[len - 4..].copy_from_slice(&crc.to_le_bytes());
            assert_eq!(
                Snapshot::decode(&bad).unwrap_err().0,
                "invalid fingerprint in snapshot"
            );
        }
    }

    #[test]
    fn snapshot_round_trips_and_any_flipped_bit_is_detected() {
        let bytes = snap(5).encode();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), snap(5));
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Snapshot::decode(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn corrupt_newest_snapshot_falls_back_to_the_older_one() {
        let fs = SimFs::new();
        let dir = Path::new("/d/snapshots");
        fs.create_dir_all(dir).unwrap();
        write_snapshot(&fs, dir, &snap(3)).unwrap();
        write_snapshot(&fs, dir, &snap(7)).unwrap();
        write_snapshot(&fs, dir, &snap(9)).unwrap();
        assert_eq!(fs.list(dir).unwrap().len(), SNAPSHOTS_KEPT);
        let newest = dir.join(snapshot_file_name("d/\u{1F600}", 9));
        fs.flip_bit(&newest, 30, 2).unwrap();
        let loaded = load_snapshots(&fs, dir).unwrap();
        assert_eq!(loaded.by_doc["d/\u{1F600}"].last_included_seq, 7);
        assert_eq!(loaded.invalid.len(), 1);
    }

    #[test]
    fn file_names_round_trip() {
        let name = snapshot_file_name("a.b", 12);
        assert_eq!(parse_snapshot_file_name(&name), Some(("a.b".into(), 12)));
    }
}
