//! Arbitrary bytes as a log on the simulated disk, through recovery (which validates,
//! cuts or refuses) and the op decoder. Must never panic. Half the inputs get a valid
//! segment header so the fuzzer reaches the record scan quickly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quire::wal::record::{OpRecord, RecordType, TombstoneRecord};
use quire::wal::recovery::{recover, RecoveryOptions};
use quire::wal::segment::SegmentHeader;
use quire::wal::vfs::sim::SimFs;
use quire::wal::vfs::Vfs;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let fs = SimFs::new();
    let dir = Path::new("/wal");
    fs.create_dir_all(dir).unwrap();
    let mut bytes = Vec::new();
    if mode & 1 == 1 {
        let header = SegmentHeader { segment_id: 1, first_lsn: 1, created_ms: 0 };
        bytes.extend_from_slice(&header.encode());
    }
    bytes.extend_from_slice(rest);
    // Split into up to two segments to exercise the cross-segment rules.
    let split = if mode & 2 == 2 { bytes.len() / 2 } else { bytes.len() };
    let (a, b) = bytes.split_at(split);
    for (i, part) in [a, b].iter().enumerate() {
        if i == 1 && part.is_empty() {
            break;
        }
        let file = fs.create(&dir.join(format!("{:020}.wal", i + 1))).unwrap();
        file.write_all_at(part, 0).unwrap();
    }
    let repair = mode & 4 == 4;
    let _ = recover(&fs, dir, RecoveryOptions { repair }, false, |_, _, raw| {
        let _ = match raw.record_type {
            RecordType::Tombstone => TombstoneRecord::decode(raw.payload).map(|_| ()),
            _ => OpRecord::decode(raw.record_type, raw.payload).map(|_| ()),
        };
    });
    // Whatever recovery left behind must itself recover cleanly.
    let mut second = 0;
    if let Ok(report) = recover(&fs, dir, RecoveryOptions { repair }, false, |_, _, _| second += 1) {
        assert!(report.tail_cut.is_none() || report.tail_cut.as_ref().is_some_and(|c| c.bytes_zeroed == 0 && c.segments_removed.is_empty()));
    }
});
