//! Record framing and the op record payload, byte for byte as `wal-format.md` specifies.
//!
//! A record on disk:
//!
//! ```text
//! 0   u32 LE  payload_len
//! 4   u32 LE  crc32c of bytes [0..4) ++ [8..24+payload_len)
//! 8   u64 LE  lsn
//! 16  u8      record type
//! 17  [u8;3]  header check: low 24 bits (LE) of crc32c of bytes [0..4) ++ [8..17) ++ [20..24)
//! 20  u32 LE  batch_index: position of this record in the write that carried it
//! 24  payload (payload_len bytes)
//!     zero padding to the next multiple of 8 (checked: must be zero)
//! ```
//!
//! The header check lets recovery trust a record's length even when its payload is
//! damaged, which is what it needs to tell a torn write from a flipped bit.
//!
//! Records start at 8-byte aligned offsets so that the length field (and the whole
//! 8-byte head) never straddles a sector: a torn write cannot produce a plausible length
//! from two different writes. Encoding is explicit with `bytes`, never a serde format,
//! because this layout is a promise to every reader of old logs.

use bytes::{Buf, BufMut};

use crate::op::{validate_doc_id, Patch, PatchRef, MAX_DOC_CHARS};

pub const RECORD_HEADER_LEN: usize = 24;
pub const RECORD_ALIGN: usize = 8;
/// A record's payload is at most 16 MiB. An op is bounded well below this by the
/// protocol's frame limit; the bound here keeps a corrupt length from sending a reader
/// across the whole segment.
pub const MAX_RECORD_PAYLOAD: usize = 16 << 20;

pub type Lsn = u64;

/// The kind of a record. A record whose type this build does not know is refused, not
/// skipped: it was written by a newer quire and skipping it would lose data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// An op, as quire wrote it before fingerprints were kept: the fingerprint of the op
    /// as its client sent it is unknown. Still read; no longer written by the sequencer.
    Op = 1,
    /// An op followed by its fingerprint ([`crate::sequencer::fingerprint`]): what the
    /// sequencer writes.
    OpWithFingerprint = 2,
    /// A document deleted ([`TombstoneRecord`]): its ops before this record, and its
    /// snapshots, belong to the deleted incarnation.
    Tombstone = 3,
}

impl RecordType {
    pub fn from_u8(byte: u8) -> Option<RecordType> {
        match byte {
            1 => Some(RecordType::Op),
            2 => Some(RecordType::OpWithFingerprint),
            3 => Some(RecordType::Tombstone),
            _ => None,
        }
    }
}

/// Why bytes are not a valid record. Plain enum: recovery scans every byte of the log
/// and classifies failures on the hot path, so no allocation here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header, or than the header's length claims.
    Truncated,
    /// `payload_len` is zero or above `MAX_RECORD_PAYLOAD`.
    BadLength(u32),
    /// The checksum does not match.
    BadChecksum { stored: u32, computed: u32 },
    /// The header check does not match: the header itself is damaged.
    BadHeader,
    /// The padding after the payload is not zero.
    BadPadding,
    /// A valid checksum over a record type this build does not know.
    UnknownType(u8),
    /// A valid record, but not the LSN that belongs at this place in the log.
    OutOfSequence { expected: u64, found: u64 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "record is truncated"),
            FrameError::BadLength(n) => write!(f, "record length {n} is out of range"),
            FrameError::BadChecksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            FrameError::BadHeader => write!(f, "record header check mismatch"),
            FrameError::BadPadding => write!(f, "record padding is not zero"),
            FrameError::OutOfSequence { expected, found } => {
                write!(f, "record has LSN {found} where LSN {expected} belongs")
            }
            FrameError::UnknownType(t) => write!(
                f,
                "record type {t} is unknown to this version of quire (written by a newer version?)"
            ),
        }
    }
}

/// A record as found in a segment: borrowed from the segment's bytes.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub lsn: Lsn,
    /// Position in its group-commit write (0 = first). `lsn - batch_index` is the first
    /// LSN of that write: recovery uses it to tell a torn write (records of the same
    /// unsynced write) from corruption (a bad record followed by a later, synced write).
    pub batch_index: u32,
    pub record_type: RecordType,
    pub payload: &'a [u8],
    /// Length on disk including header and padding.
    pub framed_len: usize,
}

/// The length a record with this payload takes on disk, padding included.
pub fn framed_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
}

fn header_check(header: &[u8]) -> [u8; 3] {
    // The covered fields gathered first: one crc32c call, not one per field (each call
    // has a fixed cost several times that of these few bytes).
    let mut covered = [0u8; 17];
    covered[0..4].copy_from_slice(&header[0..4]);
    covered[4..13].copy_from_slice(&header[8..17]);
    covered[13..17].copy_from_slice(&header[20..24]);
    let b = crc32c::crc32c(&covered).to_le_bytes();
    [b[0], b[1], b[2]]
}

/// The payload length a record header claims, if the header check holds (the header is
/// as written, whatever became of the payload).
pub fn intact_header_len(bytes: &[u8]) -> Option<u32> {
    let header = bytes.get(..RECORD_HEADER_LEN)?;
    if header[17..20] != header_check(header) {
        return None;
    }
    let len = u32::from_le_bytes(header[0..4].try_into().unwrap());
    (len != 0 && len as usize <= MAX_RECORD_PAYLOAD).then_some(len)
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    // As in `header_check`: the header's covered bytes in one call.
    let mut covered = [0u8; RECORD_HEADER_LEN - 4];
    covered[0..4].copy_from_slice(&header[0..4]);
    covered[4..].copy_from_slice(&header[8..RECORD_HEADER_LEN]);
    crc32c::crc32c_append(crc32c::crc32c(&covered), payload)
}

/// Appends one framed record to `out`.
pub fn encode_frame(
    out: &mut Vec<u8>,
    lsn: Lsn,
    batch_index: u32,
    record_type: RecordType,
    payload: &[u8],
) {
    assert!(!payload.is_empty() && payload.len() <= MAX_RECORD_PAYLOAD);
    let start = out.len();
    assert_eq!(start % RECORD_ALIGN, 0, "records start 8-byte aligned");
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[8..16].copy_from_slice(&lsn.to_le_bytes());
    header[16] = record_type as u8;
    header[20..24].copy_from_slice(&batch_index.to_le_bytes());
    let check = header_check(&header);
    header[17..20].copy_from_slice(&check);
    let crc = checksum(&header, payload);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out.resize(start + framed_len(payload.len()), 0);
}

/// Decodes the record at the start of `bytes`. Checks, in order: length in range,
/// header check, enough bytes, checksum, padding, type.
pub fn decode_frame(bytes: &[u8]) -> Result<RawRecord<'_>, FrameError> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let payload_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
    if payload_len == 0 || payload_len as usize > MAX_RECORD_PAYLOAD {
        return Err(FrameError::BadLength(payload_len));
    }
    if intact_header_len(bytes).is_none() {
        return Err(FrameError::BadHeader);
    }
    let end = RECORD_HEADER_LEN + payload_len as usize;
    let padded_end = framed_len(payload_len as usize);
    if bytes.len() < padded_end {
        return Err(FrameError::Truncated);
    }
    let header = &bytes[..RECORD_HEADER_LEN];
    let payload = &bytes[RECORD_HEADER_LEN..end];
    let stored = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let computed = checksum(header, payload);
    if stored != computed {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    if bytes[end..padded_end].iter().any(|&b| b != 0) {
        return Err(FrameError::BadPadding);
    }
    let record_type = RecordType::from_u8(header[16]).ok_or(FrameError::UnknownType(header[16]))?;
    let lsn = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let batch_index = u32::from_le_bytes(header[20..24].try_into().unwrap());
    Ok(RawRecord {
        lsn,
        batch_index,
        record_type,
        payload,
        framed_len: framed_len(payload_len as usize),
    })
}

/// An accepted edit as the log stores it: already transformed to apply on top of
/// version `server_seq - 1` of `doc_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpRecord {
    pub doc_id: String,
    pub client_id: u64,
    pub local_seq: u64,
    /// The document version this op produced (the first op of a document has seq 1).
    pub server_seq: u64,
    /// The version the client made the op against (before transformation).
    pub base_version: u64,
    /// Milliseconds since the Unix epoch when the server accepted the op.
    pub timestamp_ms: u64,
    pub patches: Vec<Patch>,
    /// The fingerprint of the op as its client sent it ([`crate::sequencer::fingerprint`]),
    /// which tells a resend from a different op under the same id after a restart.
    /// `None`: unknown (a type-1 record, written by an older quire).
    pub fingerprint: Option<u64>,
}

/// An [`OpRecord`] whose id and patches are borrowed: what the sequencer appends, from
/// the op it was handed, without copying them into a record of its own.
#[derive(Clone, Copy, Debug)]
pub struct OpRecordRef<'a> {
    pub doc_id: &'a str,
    pub client_id: u64,
    pub local_seq: u64,
    pub server_seq: u64,
    pub base_version: u64,
    pub timestamp_ms: u64,
    pub patches: &'a [Patch],
    pub fingerprint: Option<u64>,
}

impl OpRecordRef<'_> {
    /// The record type [`OpRecordRef::encode`] writes: [`RecordType::OpWithFingerprint`],
    /// or [`RecordType::Op`] for a record whose fingerprint is unknown (the sequencer
    /// always knows it; only tests of data written by older versions leave it out).
    pub fn record_type(&self) -> RecordType {
        match self.fingerprint {
            Some(_) => RecordType::OpWithFingerprint,
            None => RecordType::Op,
        }
    }

    /// The payload layout of a type-1 record (all integers little-endian):
    /// `server_seq u64, base_version u64, client_id u64, local_seq u64, timestamp_ms u64,
    /// doc_id_len u16, doc_id, patch_count u32, then per patch: pos u32, del u32,
    /// ins_len u32 (bytes), ins (UTF-8)`. A type-2 record's payload is the same followed
    /// by `fingerprint u64`. Which one is written: [`OpRecordRef::record_type`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.put_u64_le(self.server_seq);
        out.put_u64_le(self.base_version);
        out.put_u64_le(self.client_id);
        out.put_u64_le(self.local_seq);
        out.put_u64_le(self.timestamp_ms);
        out.put_u16_le(self.doc_id.len() as u16);
        out.put_slice(self.doc_id.as_bytes());
        out.put_u32_le(self.patches.len() as u32);
        for patch in self.patches {
            out.put_u32_le(patch.pos);
            out.put_u32_le(patch.del);
            out.put_u32_le(patch.ins.len() as u32);
            out.put_slice(patch.ins.as_bytes());
        }
        if let Some(fingerprint) = self.fingerprint {
            out.put_u64_le(fingerprint);
        }
    }

    pub fn encoded_len(&self) -> usize {
        5 * 8
            + 2
            + self.doc_id.len()
            + 4
            + self.patches.iter().map(|p| 12 + p.ins.len()).sum::<usize>()
            + if self.fingerprint.is_some() { 8 } else { 0 }
    }
}

/// The largest payload of an op record whose patch list takes `patch_bytes` (its count
/// and patches, as [`OpRecordRef::encode`] writes them): the longest document id, and
/// a fingerprint.
pub fn max_op_payload(patch_bytes: usize) -> usize {
    5 * 8 + 2 + crate::op::MAX_DOC_ID_BYTES + patch_bytes + 8
}

/// Why an op payload could not be decoded. The frame's checksum was valid, so this
/// means a writer bug or a foreign file, never a torn write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadError(pub String);

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid op payload: {}", self.0)
    }
}

impl OpRecord {
    /// The record borrowed, for encoding.
    pub fn borrowed(&self) -> OpRecordRef<'_> {
        OpRecordRef {
            doc_id: &self.doc_id,
            client_id: self.client_id,
            local_seq: self.local_seq,
            server_seq: self.server_seq,
            base_version: self.base_version,
            timestamp_ms: self.timestamp_ms,
            patches: &self.patches,
            fingerprint: self.fingerprint,
        }
    }

    /// [`OpRecordRef::record_type`].
    pub fn record_type(&self) -> RecordType {
        self.borrowed().record_type()
    }

    /// [`OpRecordRef::encode`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.borrowed().encode(out)
    }

    pub fn encoded_len(&self) -> usize {
        self.borrowed().encoded_len()
    }

    /// Decodes and checks the payload of a record of type `record_type`:
    /// [`OpView::decode`], copied out.
    pub fn decode(record_type: RecordType, buf: &[u8]) -> Result<OpRecord, PayloadError> {
        OpView::decode(record_type, buf).map(|view| view.to_record())
    }
}

/// A document deleted (record type 3): every op of `doc_id` before this record in the
/// log, and every snapshot of it, belongs to the deleted incarnation. An op of `doc_id`
/// after it starts the document anew at seq 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TombstoneRecord {
    pub doc_id: String,
    /// The document's version when it was deleted (the seq of its last op).
    pub version: u64,
    /// Milliseconds since the Unix epoch when the server deleted it.
    pub timestamp_ms: u64,
}

impl TombstoneRecord {
    /// The payload (all integers little-endian): `version u64, timestamp_ms u64,
    /// doc_id_len u16, doc_id`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.put_u64_le(self.version);
        out.put_u64_le(self.timestamp_ms);
        out.put_u16_le(self.doc_id.len() as u16);
        out.put_slice(self.doc_id.as_bytes());
    }

    pub fn encoded_len(&self) -> usize {
        8 + 8 + 2 + self.doc_id.len()
    }

    /// Decodes and checks a type-3 payload: a valid document id, no trailing bytes.
    pub fn decode(buf: &[u8]) -> Result<TombstoneRecord, PayloadError> {
        TombstoneView::decode(buf).map(|view| TombstoneRecord {
            doc_id: view.doc_id.to_owned(),
            version: view.version,
            timestamp_ms: view.timestamp_ms,
        })
    }
}

/// A tombstone's payload decoded in place ([`TombstoneRecord`] borrowed).
#[derive(Clone, Copy, Debug)]
pub struct TombstoneView<'a> {
    pub doc_id: &'a str,
    pub version: u64,
    pub timestamp_ms: u64,
}

impl<'a> TombstoneView<'a> {
    pub fn decode(mut buf: &'a [u8]) -> Result<TombstoneView<'a>, PayloadError> {
        let b = &mut buf;
        let version = take_u64(b)?;
        let timestamp_ms = take_u64(b)?;
        let doc_len = take_u16(b)? as usize;
        let doc_id = take_str(b, doc_len)?;
        validate_doc_id(doc_id).map_err(PayloadError)?;
        if b.has_remaining() {
            return Err(PayloadError(format!("{} trailing bytes", b.remaining())));
        }
        Ok(TombstoneView {
            doc_id,
            version,
            timestamp_ms,
        })
    }
}

/// Patches kept inline before one goes to the heap: most ops have a few.
const INLINE_PATCHES: usize = 4;

/// The patches of an [`OpView`]: inline up to `INLINE_PATCHES`, so that decoding the
/// usual op allocates nothing.
#[derive(Clone, Debug)]
pub enum PatchList<'a> {
    Inline {
        len: usize,
        patches: [PatchRef<'a>; INLINE_PATCHES],
    },
    Heap(Vec<PatchRef<'a>>),
}

impl<'a> PatchList<'a> {
    fn with_capacity(count: usize) -> Self {
        if count <= INLINE_PATCHES {
            PatchList::Inline {
                len: 0,
                patches: [PatchRef::default(); INLINE_PATCHES],
            }
        } else {
            PatchList::Heap(Vec::with_capacity(count))
        }
    }

    fn push(&mut self, patch: PatchRef<'a>) {
        match self {
            PatchList::Inline { len, patches } if *len < INLINE_PATCHES => {
                patches[*len] = patch;
                *len += 1;
            }
            PatchList::Inline { len, patches } => {
                let mut heap = patches[..*len].to_vec();
                heap.push(patch);
                *self = PatchList::Heap(heap);
            }
            PatchList::Heap(heap) => heap.push(patch),
        }
    }
}

impl<'a> std::ops::Deref for PatchList<'a> {
    type Target = [PatchRef<'a>];
    fn deref(&self) -> &[PatchRef<'a>] {
        match self {
            PatchList::Inline { len, patches } => &patches[..*len],
            PatchList::Heap(heap) => heap,
        }
    }
}

/// An op record's payload decoded in place: the document id and the inserted texts
/// borrow the record's bytes (recovery replays straight from the mapped segment).
/// Checked exactly as [`OpRecord::decode`], which is this copied out.
#[derive(Clone, Debug)]
pub struct OpView<'a> {
    pub doc_id: &'a str,
    pub client_id: u64,
    pub local_seq: u64,
    pub server_seq: u64,
    pub base_version: u64,
    pub timestamp_ms: u64,
    pub patches: PatchList<'a>,
    /// `None` for a type-1 record: see [`OpRecord::fingerprint`].
    pub fingerprint: Option<u64>,
    /// Every patch's inserted text is ASCII: its length in code points is its length in
    /// bytes (found while the bytes are validated, so that replay need not count them).
    pub ascii: bool,
}

impl<'a> OpView<'a> {
    /// The layout is [`OpRecord::encode`]'s for `record_type` (type 2: the fingerprint
    /// after the patches; type 1: none, the fingerprint is unknown). Every check is made
    /// here: the document id, UTF-8 of every text, positions in range, the patch count
    /// against the bytes there, no trailing bytes, a nonzero seq.
    pub fn decode(record_type: RecordType, mut buf: &'a [u8]) -> Result<OpView<'a>, PayloadError> {
        let b = &mut buf;
        let server_seq = take_u64(b)?;
        let base_version = take_u64(b)?;
        let client_id = take_u64(b)?;
        let local_seq = take_u64(b)?;
        let timestamp_ms = take_u64(b)?;
        let doc_len = take_u16(b)? as usize;
        let doc_id = take_str(b, doc_len)?;
        validate_doc_id(doc_id).map_err(PayloadError)?;
        let count = take_u32(b)? as usize;
        // Each patch takes at least 12 bytes: bound the allocation by what is there.
        if count > b.remaining() / 12 {
            return Err(PayloadError(format!(
                "patch count {count} exceeds the payload"
            )));
        }
        let mut patches = PatchList::with_capacity(count);
        let mut ascii = true;
        for _ in 0..count {
            let pos = take_u32(b)?;
            let del = take_u32(b)?;
            let ins_len = take_u32(b)? as usize;
            let ins = take_str(b, ins_len)?;
            // On bytes just validated, still in the cache.
            ascii &= ins.is_ascii();
            if pos > MAX_DOC_CHARS || del > MAX_DOC_CHARS {
                return Err(PayloadError("patch position out of range".into()));
            }
            patches.push(PatchRef { pos, del, ins });
        }
        let fingerprint = match record_type {
            RecordType::Op => None,
            RecordType::OpWithFingerprint => Some(take_u64(b)?),
            RecordType::Tombstone => {
                return Err(PayloadError("a tombstone record is not an op".into()))
            }
        };
        if b.has_remaining() {
            return Err(PayloadError(format!("{} trailing bytes", b.remaining())));
        }
        if server_seq == 0 {
            return Err(PayloadError("server_seq is 0".into()));
        }
        Ok(OpView {
            ascii,
            doc_id,
            client_id,
            local_seq,
            server_seq,
            base_version,
            timestamp_ms,
            patches,
            fingerprint,
        })
    }

    pub fn to_record(&self) -> OpRecord {
        OpRecord {
            doc_id: self.doc_id.to_owned(),
            client_id: self.client_id,
            local_seq: self.local_seq,
            server_seq: self.server_seq,
            base_version: self.base_version,
            timestamp_ms: self.timestamp_ms,
            patches: self.patches.iter().map(PatchRef::to_patch).collect(),
            fingerprint: self.fingerprint,
        }
    }
}

fn short() -> PayloadError {
    PayloadError("payload ends early".into())
}

fn take_u16(b: &mut &[u8]) -> Result<u16, PayloadError> {
    b.try_get_u16_le().map_err(|_| short())
}

fn take_u32(b: &mut &[u8]) -> Result<u32, PayloadError> {
    b.try_get_u32_le().map_err(|_| short())
}

fn take_u64(b: &mut &[u8]) -> Result<u64, PayloadError> {
    b.try_get_u64_le().map_err(|_| short())
}

fn take_str<'a>(b: &mut &'a [u8], len: usize) -> Result<&'a str, PayloadError> {
    if b.remaining() < len {
        return Err(short());
    }
    let (text, rest) = b.split_at(len);
    let s = std::str::from_utf8(text).map_err(|e| PayloadError(format!("invalid UTF-8: {e}")))?;
    *b = rest;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_is_the_documented_bytes_and_refuses_what_is_not_one() {
        let tombstone = TombstoneRecord {
            doc_id: "notes/\u{e9}".into(),
            version: 7,
            timestamp_ms: 1_700_000_000_000,
        };
        let mut payload = Vec::new();
        tombstone.encode(&mut payload);
        let mut expected = Vec::new();
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
        expected.extend_from_slice(&8u16.to_le_bytes());
        expected.extend_from_slice("notes/\u{e9}".as_bytes());
        assert_eq!(payload, expected);
        assert_eq!(payload.len(), tombstone.encoded_len());
        assert_eq!(TombstoneRecord::decode(&payload), Ok(tombstone));
        // Framed as type 3, which this build knows.
        let mut frame = Vec::new();
        encode_frame(&mut frame, 5, 0, RecordType::Tombstone, &payload);
        let raw = decode_frame(&frame).unwrap();
        assert_eq!(
            (raw.record_type, raw.payload),
            (RecordType::Tombstone, &payload[..])
        );
        assert_eq!(RecordType::from_u8(3), Some(RecordType::Tombstone));
        assert_eq!(RecordType::from_u8(4), None);
        // Never an op; trailing bytes, a bad id or a short payload are refused.
        assert!(OpRecord::decode(RecordType::Tombstone, &payload).is_err());
        let mut trailing = payload.clone();
        trailing.push(0);
        assert!(TombstoneRecord::decode(&trailing).is_err());
        assert!(TombstoneRecord::decode(&payload[..payload.len() - 1]).is_err());
        let mut empty_id = payload[..16].to_vec();
        empty_id.extend_from_slice(&0u16.to_le_bytes());
        assert!(TombstoneRecord::decode(&empty_id).is_err());
    }

    fn sample() -> OpRecord {
        OpRecord {
            doc_id: "notes/1".into(),
            client_id: 7,
            local_seq: 3,
            server_seq: 12,
            base_version: 10,
            timestamp_ms: 1_700_000_000_000,
            patches: vec![Patch::new(4, 1, "h\u{1F600}"), Patch::new(0, 0, "x")],
            fingerprint: Some(0x0123_4567_89ab_cdef),
        }
    }

    /// The bound is reached by an op with the longest document id and a fingerprint,
    /// and not passed by any: its patch bytes counted as the protocol counts them.
    #[test]
    fn the_largest_op_payload_is_reached_by_the_longest_id_and_not_passed() {
        let patches = vec![Patch::new(0, 2, "abc\u{e9}"), Patch::new(9, 0, "")];
        let patch_bytes = 4 + patches.iter().map(|p| 12 + p.ins.len()).sum::<usize>();
        for (doc_id, fingerprint) in [
            ("d".repeat(crate::op::MAX_DOC_ID_BYTES), Some(1)),
            ("d".repeat(crate::op::MAX_DOC_ID_BYTES), None),
            ("d".into(), Some(1)),
        ] {
            let op = OpRecord {
                doc_id,
                patches: patches.clone(),
                fingerprint,
                ..sample()
            };
            let mut payload = Vec::new();
            op.encode(&mut payload);
            let longest = op.doc_id.len() == crate::op::MAX_DOC_ID_BYTES;
            if longest && fingerprint.is_some() {
                assert_eq!(payload.len(), max_op_payload(patch_bytes));
            } else {
                assert!(payload.len() < max_op_payload(patch_bytes));
            }
        }
    }

    #[test]
    fn a_view_says_whether_every_inserted_text_is_ascii() {
        let view_of = |patches: Vec<Patch>| {
            let mut payload = Vec::new();
            OpRecord {
                patches,
                ..sample()
            }
            .encode(&mut payload);
            OpView::decode(RecordType::OpWithFingerprint, &payload)
                .unwrap()
                .ascii
        };
        assert!(!view_of(sample().patches), "one of two is not");
        assert!(view_of(vec![Patch::new(0, 0, "ab"), Patch::new(1, 1, "")]));
        assert!(view_of(Vec::new()));
        assert!(!view_of(vec![
            Patch::new(0, 0, "a"),
            Patch::new(0, 0, "\u{e9}")
        ]));
    }

    #[test]
    fn op_record_round_trips_through_a_frame() {
        let op = sample();
        assert_eq!(op.record_type(), RecordType::OpWithFingerprint);
        let mut payload = Vec::new();
        op.encode(&mut payload);
        assert_eq!(payload.len(), op.encoded_len());
        // Type 2: the type-1 payload, then the fingerprint.
        assert_eq!(
            payload[payload.len() - 8..],
            0x0123_4567_89ab_cdef_u64.to_le_bytes()
        );
        let mut frame = Vec::new();
        encode_frame(&mut frame, 99, 0, op.record_type(), &payload);
        assert_eq!(frame.len() % RECORD_ALIGN, 0);
        let raw = decode_frame(&frame).unwrap();
        assert_eq!(raw.lsn, 99);
        assert_eq!(raw.record_type, RecordType::OpWithFingerprint);
        assert_eq!(frame[16], 2);
        assert_eq!(raw.framed_len, frame.len());
        assert_eq!(OpRecord::decode(raw.record_type, raw.payload).unwrap(), op);
    }

    #[test]
    fn a_type_1_record_decodes_with_its_fingerprint_unknown() {
        let old = OpRecord {
            fingerprint: None,
            ..sample()
        };
        assert_eq!(old.record_type(), RecordType::Op);
        let mut payload = Vec::new();
        old.encode(&mut payload);
        assert_eq!(payload.len(), old.encoded_len());
        let mut frame = Vec::new();
        encode_frame(&mut frame, 3, 0, RecordType::Op, &payload);
        let raw = decode_frame(&frame).unwrap();
        assert_eq!(raw.record_type, RecordType::Op);
        let decoded = OpRecord::decode(raw.record_type, raw.payload).unwrap();
        assert_eq!(decoded.fingerprint, None);
        assert_eq!(decoded, old);
        // The same payload is not a type-2 one (no fingerprint), and a type-2 payload is
        // not a type-1 one (8 trailing bytes).
        assert!(OpRecord::decode(RecordType::OpWithFingerprint, &payload).is_err());
        let mut new = Vec::new();
        sample().encode(&mut new);
        assert!(OpRecord::decode(RecordType::Op, &new).is_err());
    }

    #[test]
    fn every_single_bit_flip_in_a_frame_is_detected() {
        let mut payload = Vec::new();
        sample().encode(&mut payload);
        let mut frame = Vec::new();
        encode_frame(&mut frame, 5, 0, RecordType::Op, &payload);
        for bit in 0..frame.len() * 8 {
            let mut bad = frame.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&bad).is_err(),
                "flip of bit {bit} not detected"
            );
        }
    }

    #[test]
    fn unknown_record_type_with_valid_checksum_is_refused() {
        let mut frame = Vec::new();
        encode_frame(&mut frame, 1, 0, RecordType::Op, b"abc");
        frame[16] = 9;
        let check = header_check(&frame[..RECORD_HEADER_LEN]);
        frame[17..20].copy_from_slice(&check);
        let crc = checksum(&frame[..RECORD_HEADER_LEN], &frame[24..27]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_frame(&frame).unwrap_err(),
            FrameError::UnknownType(9)
        );
    }

    #[test]
    fn truncated_payload_is_an_error_not_a_panic() {
        let mut payload = Vec::new();
        sample().encode(&mut payload);
        for cut in 0..payload.len() {
            assert!(OpRecord::decode(RecordType::OpWithFingerprint, &payload[..cut]).is_err());
        }
    }
}
