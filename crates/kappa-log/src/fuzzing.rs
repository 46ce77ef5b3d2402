//! The functions the fuzz targets in `fuzz/` call, public so the corpus replay test
//! (`tests/fuzz_corpus.rs`) runs exactly the same code on stable Rust. Each must never
//! panic, whatever the input.

use std::path::Path;
use std::sync::Arc;

use crate::clock::ManualClock;
use crate::io::sim::SimFs;
use crate::io::{OpenMode, Storage};
use crate::{Isolation, Log, LogOptions, SyncPolicy};

/// Decompression budget for fuzzed batches: large enough for real batches, small enough
/// that a decompression bomb stays cheap.
const FUZZ_UNCOMPRESSED_MAX: usize = 4 << 20;

/// Batch validation and record decoding on arbitrary bytes.
pub fn batch_decode(data: &[u8]) {
    let _ = crate::batch::batch_total_len(data, usize::MAX);
    let _ = crate::batch::validate(data, usize::MAX);
    let _ = crate::batch::validate_produced(data, usize::MAX);
    if let Ok(decoded) = crate::records::decode_records(data, FUZZ_UNCOMPRESSED_MAX) {
        for record in decoded.iter() {
            let _ = (record.offset(), record.timestamp(), record.key, record.value);
        }
    }
    let _ = crate::records::record_timestamps(data, FUZZ_UNCOMPRESSED_MAX);
    let _ = crate::records::control_type(data);
    // Random mutations almost never keep the CRC valid; decode a copy with a fixed CRC
    // (and a consistent length) so the record and codec parsers see mutated bodies too.
    if data.len() >= crate::batch::HEADER_BYTES {
        let mut fixed = data.to_vec();
        let length = (fixed.len() - crate::batch::LENGTH_PREFIX_BYTES) as i32;
        fixed[8..12].copy_from_slice(&length.to_be_bytes());
        crate::batch::rewrite_crc(&mut fixed);
        if let Ok(decoded) = crate::records::decode_records(&fixed, FUZZ_UNCOMPRESSED_MAX) {
            for record in decoded.iter() {
                let _ = (record.offset(), record.timestamp(), record.key, record.value);
            }
        }
        let _ = crate::records::control_type(&fixed);
    }
}

/// Arbitrary bytes as the only segment of a partition on a simulated file system: opening
/// the log (recovery scan and truncation), reading everything and appending must not panic.
pub fn recovery_scan(data: &[u8]) {
    let fs = SimFs::new();
    let partition_dir = Path::new("/data/topics/t/0");
    fs.create_dir_all(partition_dir).expect("sim mkdir");
    let config = fs.open(Path::new("/data/topics/t/topic.properties"), OpenMode::Create).expect("sim create");
    drop(config);
    let segment = fs.open(&partition_dir.join(crate::segment::log_file_name(0)), OpenMode::Create).expect("sim create");
    segment.write_all_at(data, 0).expect("sim write");
    let _ = crate::segment::scan_batches(segment.as_ref(), 0, data.len() as u64, |_, _, _| {});
    drop(segment);

    let clock = ManualClock::new(1_700_000_000_000);
    let options = LogOptions {
        sync_policy: SyncPolicy::EveryAppend,
        fs: Arc::new(fs),
        clock: Arc::new(clock),
        ..LogOptions::default()
    };
    let Ok((log, _report)) = Log::open(Path::new("/data"), options) else { return };
    let Ok(partition) = log.partition("t", 0) else { return };
    let mut offset = partition.log_start_offset();
    for _ in 0..1000 {
        let Ok(read) = partition.read(offset, 1 << 20, Isolation::ReadCommitted) else { break };
        let Some(next) = last_next_offset(&read.records) else { break };
        offset = next;
    }
    let batch = crate::records::BatchBuilder::new()
        .record(crate::records::NewRecord::new(Some(b"k"), Some(b"v"), 1_700_000_000_000))
        .build();
    let _ = partition.append(batch);
    let _ = log.close();
}

/// The offset after the last batch in a read, if it returned any.
fn last_next_offset(mut bytes: &[u8]) -> Option<i64> {
    let mut next = None;
    while let Ok(header) = crate::batch::BatchHeader::parse(bytes) {
        next = Some(header.next_offset());
        bytes = bytes.get(header.total_bytes()..)?;
    }
    next
}
