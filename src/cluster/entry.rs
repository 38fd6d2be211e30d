//! The value of a journal key: one sequenced op, in a small versioned, checksummed
//! encoding of its own. (Not `wal::record`'s: the cluster must not depend on the local
//! log, whose format follows that log's needs; and the op's body is the sequencer's
//! business, so it is carried here as opaque bytes.) etcd checksums its own storage;
//! this checksum catches what it cannot: a value written by a buggy or foreign writer,
//! or cut by a tool.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! offset size  field
//! 0      1     version: 1
//! 1      4     crc32c of bytes [5, end)
//! 5      8     seq
//! 13     8     op id: client id
//! 21     8     op id: local seq
//! 29     8     fingerprint of the op as its client sent it (sequencer::fingerprint)
//! 37     4     body length in bytes
//! 41     n     body (the op as the sequencer encodes it)
//! ```

use crate::op::OpId;

/// The encoding's version byte.
pub const ENTRY_VERSION: u8 = 1;
const HEADER_LEN: usize = 41;
/// The largest body an entry may carry: a group commit's txn must stay under etcd's
/// default request limit ([`super::ownership::MAX_COMMIT_BYTES`]), and one op must fit
/// in one txn.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// One op of a document's replicated journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The op's seq in its document (from 1).
    pub seq: u64,
    /// The op's id, for answering resends after a failover.
    pub op_id: OpId,
    /// The fingerprint of the op as its client sent it (a resend must match it).
    pub fingerprint: u64,
    /// The op itself, as the sequencer encodes it.
    pub body: Vec<u8>,
}

impl JournalEntry {
    /// The length of [`JournalEntry::encode`]'s bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// The entry's bytes. Panics on a body over [`MAX_BODY_BYTES`] (checked by the
    /// sequencer before an op is sequenced).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.body.len() <= MAX_BODY_BYTES);
        assert!(self.seq >= 1, "seqs start at 1");
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.body.len());
        bytes.push(ENTRY_VERSION);
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&self.seq.to_le_bytes());
        bytes.extend_from_slice(&self.op_id.client_id.to_le_bytes());
        bytes.extend_from_slice(&self.op_id.local_seq.to_le_bytes());
        bytes.extend_from_slice(&self.fingerprint.to_le_bytes());
        bytes.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&self.body);
        let crc = crc32c::crc32c(&bytes[5..]);
        bytes[1..5].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(Self::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    /// Decodes an entry, checking its version, checksum and length.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!(
                "journal entry of {} bytes is too short",
                bytes.len()
            ));
        }
        if bytes[0] != ENTRY_VERSION {
            return Err(format!("journal entry version {} is unknown", bytes[0]));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[5..]) != crc {
            return Err("journal entry checksum mismatch".into());
        }
        let body_len = u32::from_le_bytes(bytes[37..41].try_into().expect("4 bytes")) as usize;
        if bytes.len() - HEADER_LEN != body_len {
            return Err(format!(
                "journal entry body is {} bytes; its header says {body_len}",
                bytes.len() - HEADER_LEN
            ));
        }
        Ok(JournalEntry {
            seq: u64_at(5),
            op_id: OpId {
                client_id: u64_at(13),
                local_seq: u64_at(21),
            },
            fingerprint: u64_at(29),
            body: bytes[HEADER_LEN..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> JournalEntry {
        JournalEntry {
            seq: 7,
            op_id: OpId {
                client_id: 0x0102_0304_0506_0708,
                local_seq: 3,
            },
            fingerprint: 0xfeed,
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn an_entry_has_the_documented_layout() {
        let bytes = entry().encode();
        assert_eq!(bytes.len(), HEADER_LEN + 5);
        assert_eq!(bytes[0], 1);
        assert_eq!(&bytes[5..13], &7u64.to_le_bytes());
        assert_eq!(&bytes[13..21], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[21..29], &3u64.to_le_bytes());
        assert_eq!(&bytes[29..37], &0xfeedu64.to_le_bytes());
        assert_eq!(&bytes[37..41], &5u32.to_le_bytes());
        assert_eq!(&bytes[41..], b"hello");
        assert_eq!(&bytes[1..5], &crc32c::crc32c(&bytes[5..]).to_le_bytes());
        assert_eq!(JournalEntry::decode(&bytes), Ok(entry()));
    }

    #[test]
    fn every_flipped_bit_and_every_cut_is_refused() {
        let bytes = entry().encode();
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(JournalEntry::decode(&bad).is_err(), "bit {i}");
        }
        for len in 0..bytes.len() {
            assert!(JournalEntry::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
    }
}
