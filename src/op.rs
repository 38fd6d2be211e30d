//! The data of an edit, shared by every layer: patches in Unicode code points and the
//! identity of an op. Depends on nothing.

use std::fmt;

/// One splice of a text document, in Unicode code points (not bytes, not UTF-16 units):
/// at `pos`, delete `del` code points, then insert `ins` there. This is the patch format
/// of the editing traces (`[pos, del, ins]`, JavaScript `Array.splice` semantics).
///
/// `u32` because positions travel on disk and on the wire; a document is bounded far
/// below 4 Gi code points (see `MAX_DOC_CHARS`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Patch {
    pub pos: u32,
    pub del: u32,
    pub ins: String,
}

impl Patch {
    pub fn new(pos: u32, del: u32, ins: impl Into<String>) -> Self {
        Patch {
            pos,
            del,
            ins: ins.into(),
        }
    }
}

/// A [`Patch`] whose inserted text is borrowed: what recovery replays straight from the
/// bytes of a log record, without copying them into a `String` first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchRef<'a> {
    pub pos: u32,
    pub del: u32,
    pub ins: &'a str,
}

/// Owned or borrowed, a patch's three parts: what applying it needs.
pub trait AsPatch {
    fn as_patch(&self) -> PatchRef<'_>;
}

impl AsPatch for Patch {
    fn as_patch(&self) -> PatchRef<'_> {
        PatchRef {
            pos: self.pos,
            del: self.del,
            ins: &self.ins,
        }
    }
}

impl AsPatch for PatchRef<'_> {
    fn as_patch(&self) -> PatchRef<'_> {
        *self
    }
}

impl PatchRef<'_> {
    pub fn to_patch(&self) -> Patch {
        Patch::new(self.pos, self.del, self.ins)
    }
}

/// Upper bound on a document's length in code points. Keeps every position in `u32`
/// with room to spare and bounds the memory one document can take.
pub const MAX_DOC_CHARS: u32 = 1 << 28;

/// Upper bound on a document's text in bytes (UTF-8): the largest document quire keeps
/// and sends (in snapshot pieces that each fit a frame).
pub const MAX_DOC_BYTES: u64 = 64 << 20;

/// Upper bound on a document id in bytes (UTF-8). Ids appear in snapshot file names
/// (hex encoded), so this keeps those names below the 255-byte limit of common filesystems.
pub const MAX_DOC_ID_BYTES: usize = 100;

/// The stable identity of an op, chosen by the client: its id and a per-client counter.
/// A retried op carries the same `OpId`, which is how the server recognises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId {
    pub client_id: u64,
    pub local_seq: u64,
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.client_id, self.local_seq)
    }
}

/// An op as its document's sequencer applied it: the seq it got, its id, the version its
/// client made it on, and its patches as applied (transformed to apply to version
/// `seq - 1`). How it is stored is the log's business (`wal::record`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequencedOp {
    pub seq: u64,
    pub id: OpId,
    pub base_version: u64,
    pub patches: Vec<Patch>,
}

/// Checks a document id: non-empty UTF-8 (guaranteed by `&str`) of at most
/// `MAX_DOC_ID_BYTES` bytes with no control characters.
pub fn validate_doc_id(doc_id: &str) -> Result<(), String> {
    if doc_id.is_empty() {
        return Err("document id is empty".into());
    }
    if doc_id.len() > MAX_DOC_ID_BYTES {
        return Err(format!(
            "document id is {} bytes; the limit is {MAX_DOC_ID_BYTES}",
            doc_id.len()
        ));
    }
    if doc_id.chars().any(char::is_control) {
        return Err("document id contains a control character".into());
    }
    Ok(())
}
