//! Arbitrary bytes into every decoder of on-disk data: record frames, op and tombstone
//! payloads, segment headers, snapshots. None may panic; a frame that decodes must re-encode to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quire::wal::record::{decode_frame, encode_frame, OpRecord, RecordType, TombstoneRecord};
use quire::wal::segment::SegmentHeader;
use quire::wal::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = decode_frame(data) {
        let mut again = Vec::new();
        encode_frame(&mut again, raw.lsn, raw.batch_index, raw.record_type, raw.payload);
        assert_eq!(&again[..], &data[..raw.framed_len]);
    }
    for record_type in [RecordType::Op, RecordType::OpWithFingerprint] {
        if let Ok(op) = OpRecord::decode(record_type, data) {
            assert_eq!(op.record_type(), record_type);
            let mut again = Vec::new();
            op.encode(&mut again);
            assert_eq!(again, data);
        }
    }
    // A tombstone never decodes as an op, and one that decodes re-encodes the same.
    assert!(OpRecord::decode(RecordType::Tombstone, data).is_err());
    if let Ok(tombstone) = TombstoneRecord::decode(data) {
        let mut again = Vec::new();
        tombstone.encode(&mut again);
        assert_eq!(again, data);
    }
    let _ = SegmentHeader::decode(data);
    let _ = Snapshot::decode(data);
});
