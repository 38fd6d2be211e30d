//! Segment files: the header, the file naming, preparation (preallocation) and the
//! record scan that recovery and readers share.
//!
//! A segment is `<segment_id as 20 decimal digits>.wal` in the `wal/` directory. It is
//! created at its full size by the preparer thread, zero-filled and synced, and its
//! directory entry synced, before the writer ever puts a record in it; so appending
//! never changes file metadata and `fdatasync` writes data only. The header is written
//! by the writer together with the segment's first records, when it becomes active: a
//! segment whose header is still all zeros is an unused spare.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::record::{decode_frame, FrameError, Lsn, RawRecord, RECORD_ALIGN};
use super::vfs::{Vfs, VfsFile};

pub const SEGMENT_MAGIC: [u8; 8] = *b"QUIREWAL";
pub const SEGMENT_FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Smallest segment the WAL accepts: room for the header and a few records. (The
/// simulator's logs are of this size, so that a run of a few hundred ops fills several
/// segments and truncation removes some; at 64 KiB it never did.)
pub const SEGMENT_SIZE_MIN: u64 = 8 * 1024;

pub type SegmentId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_id: SegmentId,
    pub first_lsn: Lsn,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a quire segment at all.
    BadMagic,
    /// A quire segment of a format this build cannot read.
    UnsupportedVersion(u32),
    BadChecksum,
    Truncated,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::BadMagic => write!(f, "not a quire WAL segment (bad magic)"),
            HeaderError::UnsupportedVersion(v) => write!(
                f,
                "segment format version {v} is not supported (this build reads version {SEGMENT_FORMAT_VERSION})"
            ),
            HeaderError::BadChecksum => write!(f, "segment header checksum mismatch"),
            HeaderError::Truncated => write!(f, "segment is shorter than its header"),
        }
    }
}

impl SegmentHeader {
    /// Layout (little-endian): magic `QUIREWAL` [0..8), format version u32 [8..12),
    /// header length u32 (64) [12..16), segment id u64 [16..24), first LSN u64 [24..32),
    /// creation time in Unix ms u64 [32..40), zeros [40..60), crc32c of [0..60) u32 [60..64).
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.segment_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` for an all-zero header: a prepared segment never activated. A file
    /// shorter than a header that is all zeros (or empty) is one too: the preparer was
    /// creating it when the machine stopped, and a directory sync by someone else had
    /// already made its name durable.
    pub fn decode(bytes: &[u8]) -> Result<Option<SegmentHeader>, HeaderError> {
        if bytes.len() < SEGMENT_HEADER_LEN {
            if bytes.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            return Err(HeaderError::Truncated);
        }
        let b = &bytes[..SEGMENT_HEADER_LEN];
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
        if version != SEGMENT_FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let stored = u32::from_le_bytes(b[60..64].try_into().unwrap());
        if crc32c::crc32c(&b[0..60]) != stored
            || u32::from_le_bytes(b[12..16].try_into().unwrap()) != SEGMENT_HEADER_LEN as u32
        {
            return Err(HeaderError::BadChecksum);
        }
        Ok(Some(SegmentHeader {
            segment_id: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            first_lsn: u64::from_le_bytes(b[24..32].try_into().unwrap()),
            created_ms: u64::from_le_bytes(b[32..40].try_into().unwrap()),
        }))
    }
}

pub fn segment_file_name(id: SegmentId) -> String {
    format!("{id:020}.wal")
}

pub fn parse_segment_file_name(name: &str) -> Option<SegmentId> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn segment_path(wal_dir: &Path, id: SegmentId) -> PathBuf {
    wal_dir.join(segment_file_name(id))
}

static ZERO_FILL_FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Creates segment `id` at `size` bytes, every byte zero and durable, directory entry
/// included. `fallocate` reserves the blocks (contiguous, and no ENOSPC later); the
/// zero fill then turns ext4's "unwritten" extents into written ones, so a later
/// `fdatasync` of a record does not also have to journal an extent conversion. Where
/// `fallocate` is unsupported (EOPNOTSUPP: some FUSE and network filesystems) the zero
/// fill alone does the job; that is logged once.
pub fn prepare_segment(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    id: SegmentId,
    size: u64,
    zero_fill: bool,
) -> io::Result<Box<dyn VfsFile>> {
    assert!(size >= SEGMENT_SIZE_MIN && size % RECORD_ALIGN as u64 == 0);
    let path = segment_path(wal_dir, id);
    let file = vfs.create(&path)?;
    // A segment that could not be prepared (a full disk, most often) is removed: it
    // holds no record, and the next attempt creates it anew.
    if let Err(e) = fill_and_sync(vfs, wal_dir, &*file, size, zero_fill) {
        drop(file);
        if let Err(removing) = vfs.remove(&path) {
            tracing::warn!(path = %path.display(), %removing, "could not remove a segment that failed to be prepared");
        }
        return Err(e);
    }
    assert_eq!(file.file_len()?, size);
    Ok(file)
}

/// Reserves, zero-fills (if asked, or if reserving is unsupported) and syncs a new
/// segment file, directory entry included.
fn fill_and_sync(
    vfs: &dyn Vfs,
    wal_dir: &Path,
    file: &dyn VfsFile,
    size: u64,
    zero_fill: bool,
) -> io::Result<()> {
    let allocated = file.allocate(size)?;
    if !allocated && !ZERO_FILL_FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            dir = %wal_dir.display(),
            "fallocate is not supported on this filesystem; preallocating segments by writing zeros"
        );
    }
    if zero_fill || !allocated {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut offset = 0u64;
        while offset < size {
            let n = CHUNK.min((size - offset) as usize);
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
    }
    file.sync_all()?;
    vfs.sync_dir(wal_dir)
}

/// Where and why a scan of a segment's records stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanStop {
    /// Only zeros from `offset` to the end: the clean end of the written part.
    Zeros { offset: usize },
    /// An invalid record at `offset` (bytes that are not all zeros).
    Invalid { offset: usize, error: FrameError },
}

impl ScanStop {
    pub fn offset(&self) -> usize {
        match *self {
            ScanStop::Zeros { offset } | ScanStop::Invalid { offset, .. } => offset,
        }
    }
}

/// Calls `visit(offset, record)` for each valid record from the header on, in order,
/// and returns where the valid records end. LSNs must rise by one from `first_lsn`:
/// a record with any other LSN stops the scan as invalid (it belongs elsewhere).
pub fn scan_records<'a>(
    bytes: &'a [u8],
    first_lsn: Lsn,
    mut visit: impl FnMut(usize, RawRecord<'a>),
) -> ScanStop {
    let mut offset = SEGMENT_HEADER_LEN;
    let mut expected = first_lsn;
    while offset < bytes.len() {
        match decode_frame(&bytes[offset..]) {
            Ok(record) if record.lsn == expected => {
                visit(offset, record);
                offset += record.framed_len;
                expected += 1;
            }
            Ok(record) => {
                return ScanStop::Invalid {
                    offset,
                    error: FrameError::OutOfSequence {
                        expected,
                        found: record.lsn,
                    },
                };
            }
            Err(error) => {
                if all_zero(&bytes[offset..]) {
                    return ScanStop::Zeros { offset };
                }
                return ScanStop::Invalid { offset, error };
            }
        }
    }
    ScanStop::Zeros { offset }
}

/// Bytes are checked for zeros a block at a time: the block's bytes ORed together with
/// no early exit compile to vector instructions, where a byte-at-a-time `all` stops
/// to test every byte (a segment's unused part is tens of MiB of zeros).
const ZERO_CHECK_BLOCK: usize = 256;

/// Whether every byte is zero.
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(ZERO_CHECK_BLOCK)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The offset of the last nonzero byte, if any.
pub fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    let (index, block) = bytes
        .chunks(ZERO_CHECK_BLOCK)
        .enumerate()
        .rev()
        .find(|(_, block)| !all_zero(block))?;
    let within = block.iter().rposition(|&b| b != 0)?;
    Some(index * ZERO_CHECK_BLOCK + within)
}

/// The first record at an aligned offset at or after `from` that has a valid checksum.
/// Recovery uses it to tell a torn tail (nothing valid after the break, or only records
/// of the same unsynced write) from corruption in the middle of the log.
pub fn find_valid_record_after(bytes: &[u8], from: usize) -> Option<(usize, RawRecord<'_>)> {
    let mut offset = from.next_multiple_of(RECORD_ALIGN);
    while offset + super::record::RECORD_HEADER_LEN <= bytes.len() {
        if let Ok(record) = decode_frame(&bytes[offset..]) {
            return Some((offset, record));
        }
        offset += RECORD_ALIGN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_zero_header_means_spare() {
        let h = SegmentHeader {
            segment_id: 3,
            first_lsn: 77,
            created_ms: 5,
        };
        assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), Some(h));
        assert_eq!(SegmentHeader::decode(&[0u8; 64]).unwrap(), None);
        assert_eq!(SegmentHeader::decode(&[]).unwrap(), None);
        assert_eq!(SegmentHeader::decode(&[0u8; 10]).unwrap(), None);
        assert_eq!(
            SegmentHeader::decode(&[1u8; 10]).unwrap_err(),
            HeaderError::Truncated
        );
        let mut bad = h.encode();
        bad[8] = 2;
        assert_eq!(
            SegmentHeader::decode(&bad).unwrap_err(),
            HeaderError::UnsupportedVersion(2)
        );
        let mut bad = h.encode();
        bad[20] ^= 1;
        assert_eq!(
            SegmentHeader::decode(&bad).unwrap_err(),
            HeaderError::BadChecksum
        );
        let mut bad = h.encode();
        bad[0] = b'X';
        assert_eq!(
            SegmentHeader::decode(&bad).unwrap_err(),
            HeaderError::BadMagic
        );
    }

    #[test]
    fn zero_checks_find_every_nonzero_byte() {
        for len in [0, 1, 255, 256, 257, 1000] {
            let zeros = vec![0u8; len];
            assert!(all_zero(&zeros));
            assert_eq!(last_nonzero(&zeros), None);
            for at in 0..len {
                let mut bytes = zeros.clone();
                bytes[at] = 0x10;
                assert!(!all_zero(&bytes), "len {len}, byte {at}");
                assert_eq!(last_nonzero(&bytes), Some(at));
                bytes[0] = 1;
                assert_eq!(last_nonzero(&bytes), Some(at));
            }
        }
    }

    #[test]
    fn segment_names_parse_back_and_foreign_names_do_not() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.wal"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000000042.wal.tmp"),
            None
        );
    }
}
