//! The fuzz targets' properties on stable Rust, inside `cargo test`: arbitrary bytes
//! into the decoders and into recovery never panic, and decoded frames and ops
//! re-encode to the bytes they came from. (`fuzz/` runs the same with libFuzzer.)

use std::path::Path;

use quickcheck::{QuickCheck, TestResult};
use quire::wal::record::{decode_frame, encode_frame, OpRecord, RecordType};
use quire::wal::recovery::{recover, RecoveryOptions};
use quire::wal::segment::SegmentHeader;
use quire::wal::snapshot::Snapshot;
use quire::wal::vfs::sim::SimFs;
use quire::wal::vfs::Vfs;

fn decoders(data: Vec<u8>) -> TestResult {
    if let Ok(raw) = decode_frame(&data) {
        let mut again = Vec::new();
        encode_frame(
            &mut again,
            raw.lsn,
            raw.batch_index,
            raw.record_type,
            raw.payload,
        );
        assert_eq!(&again[..], &data[..raw.framed_len]);
    }
    for record_type in [RecordType::Op, RecordType::OpWithFingerprint] {
        if let Ok(op) = OpRecord::decode(record_type, &data) {
            assert_eq!(op.record_type(), record_type);
            let mut again = Vec::new();
            op.encode(&mut again);
            assert_eq!(again, data);
        }
    }
    let _ = SegmentHeader::decode(&data);
    let _ = Snapshot::decode(&data);
    TestResult::passed()
}

fn recovery(noise: Vec<u8>, valid_records: u8, cut: u16, header: bool, repair: bool) -> TestResult {
    // A valid prefix of records, then noise: reaches deep into the scan.
    let mut bytes = Vec::new();
    if header {
        let h = SegmentHeader {
            segment_id: 1,
            first_lsn: 1,
            created_ms: 0,
        };
        bytes.extend_from_slice(&h.encode());
    }
    for lsn in 1..=u64::from(valid_records % 8) {
        encode_frame(&mut bytes, lsn, 0, RecordType::Op, b"not an op payload");
    }
    let keep = (cut as usize).min(bytes.len());
    bytes.truncate(keep.max(bytes.len().saturating_sub(64)));
    bytes.extend_from_slice(&noise);
    let fs = SimFs::new();
    let dir = Path::new("/wal");
    fs.create_dir_all(dir).unwrap();
    let file = fs.create(&dir.join(format!("{:020}.wal", 1))).unwrap();
    file.write_all_at(&bytes, 0).unwrap();
    let options = RecoveryOptions { repair };
    let first = recover(&fs, dir, options, false, |_, _, raw| {
        let _ = OpRecord::decode(raw.record_type, raw.payload);
    });
    if first.is_ok() {
        // What recovery left must recover again without cutting anything.
        let again = recover(&fs, dir, options, false, |_, _, _| {}).unwrap();
        assert!(again.tail_cut.is_none(), "{:?}", again.tail_cut);
    }
    TestResult::passed()
}

#[test]
fn a_repair_that_leaves_no_record_in_a_segment_removes_it_so_recovery_is_idempotent() {
    // Found by the recovery_scan fuzz target: a valid header followed by one stray byte.
    let fs = SimFs::new();
    let dir = Path::new("/wal");
    fs.create_dir_all(dir).unwrap();
    let mut bytes = SegmentHeader {
        segment_id: 1,
        first_lsn: 1,
        created_ms: 0,
    }
    .encode()
    .to_vec();
    bytes.push(0x0a);
    fs.create(&dir.join(format!("{:020}.wal", 1)))
        .unwrap()
        .write_all_at(&bytes, 0)
        .unwrap();
    let options = RecoveryOptions { repair: true };
    let first = recover(&fs, dir, options, false, |_, _, _| {}).unwrap();
    assert_eq!(first.tail_cut.unwrap().segments_removed, vec![1]);
    let again = recover(&fs, dir, options, false, |_, _, _| {}).unwrap();
    assert!(again.tail_cut.is_none() && again.spares_removed.is_empty());
}

#[test]
fn arbitrary_bytes_never_panic_a_decoder_and_decoded_frames_round_trip() {
    QuickCheck::new()
        .tests(3000)
        .quickcheck(decoders as fn(Vec<u8>) -> TestResult);
}

#[test]
fn arbitrary_bytes_after_valid_records_never_panic_recovery_and_its_cut_is_stable() {
    QuickCheck::new()
        .tests(1500)
        .quickcheck(recovery as fn(Vec<u8>, u8, u16, bool, bool) -> TestResult);
}
