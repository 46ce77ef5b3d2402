//! Partition behaviour on the real file system: offsets, reads, rolls, recovery,
//! idempotence, transactions, retention, timestamps.

mod common;

use std::sync::Arc;

use common::*;
use kappa_log::clock::ManualClock;
use kappa_log::io::RealFs;
use kappa_log::records::{BatchBuilder, ControlType, NewRecord};
use kappa_log::{Isolation, Log, LogError, LogOptions};

#[test]
fn appends_get_consecutive_offsets_and_read_back_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 2, &overrides(&[])).unwrap();
    let p = log.partition("t", 1).unwrap();
    let a = p.append(batch("a", 3, T0)).unwrap();
    let b = p.append(batch("b", 2, T0)).unwrap();
    assert_eq!((a.base_offset, a.last_offset, b.base_offset, b.last_offset), (0, 2, 3, 4));
    assert_eq!(p.high_watermark(), 5);

    let all = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(headers(&all.records).iter().map(|h| h.base_offset).collect::<Vec<_>>(), vec![0, 3]);
    // A read starting inside a batch returns that whole batch.
    let mid = p.read(1, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(headers(&mid.records)[0].base_offset, 0);
    // A 1-byte budget still returns one whole batch.
    let tiny = p.read(3, 1, Isolation::ReadUncommitted).unwrap();
    assert_eq!(headers(&tiny.records).len(), 1);
    // At the high watermark: empty; past the end: out of range.
    assert!(p.read(5, 1 << 20, Isolation::ReadUncommitted).unwrap().records.is_empty());
    assert!(matches!(p.read(6, 100, Isolation::ReadUncommitted), Err(LogError::OffsetOutOfRange { offset: 6, .. })));
}

#[test]
fn malformed_and_oversized_batches_are_rejected_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("max.message.bytes", "200")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    let mut bad = batch("x", 1, T0);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(matches!(p.append(bad), Err(LogError::InvalidBatch(_))));
    assert!(matches!(p.append(batch("x", 20, T0)), Err(LogError::MessageTooLarge { .. })));
    assert!(matches!(p.append(vec![0; 10]), Err(LogError::InvalidBatch(_))));
    assert_eq!((p.log_end_offset(), p.size_bytes()), (0, 0));
}

#[test]
fn segments_roll_by_size_and_time_and_reads_cross_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024"), ("segment.ms", "60000")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..20 {
        p.append(batch(&i.to_string(), 4, T0)).unwrap();
    }
    let by_size = p.segment_count();
    assert!(by_size >= 3, "20 batches of ~110 bytes in 1 KiB segments: {by_size}");
    clock.advance(60_000);
    p.append(batch("late", 1, T0)).unwrap();
    assert_eq!(p.segment_count(), by_size + 1, "segment.ms rolls an old segment");
    let mut offset = 0;
    let mut seen = 0;
    while offset < p.high_watermark() {
        let read = p.read(offset, 300, Isolation::ReadUncommitted).unwrap();
        let hs = headers(&read.records);
        assert_eq!(hs[0].base_offset, offset);
        seen += hs.iter().map(|h| h.records_count).sum::<i32>();
        offset = hs.last().unwrap().next_offset();
    }
    assert_eq!(seen, 81);
}

#[test]
fn clean_restart_skips_the_scan_and_unclean_restart_truncates_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    {
        let log = open(dir.path(), &clock);
        log.create_topic("t", 1, &overrides(&[("segment.bytes", "2048")])).unwrap();
        let p = log.partition("t", 0).unwrap();
        for i in 0..30 {
            p.append(batch(&i.to_string(), 3, T0)).unwrap();
        }
        log.close().unwrap();
    }
    let (log, report) = kappa_log::Log::open(dir.path(), options(Arc::new(kappa_log::io::RealFs), &clock)).unwrap();
    assert!(report.all_clean());
    assert_eq!(report.scanned_bytes(), 0, "a clean shutdown needs no scan");
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), 90);
    let active = std::fs::read_dir(p.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .unwrap();
    drop(log);

    // Simulate a crash mid-write: half a batch at the end of the active segment.
    let torn = batch("torn", 5, T0);
    let mut file = std::fs::OpenOptions::new().append(true).open(&active).unwrap();
    std::io::Write::write_all(&mut file, &torn[..torn.len() / 2]).unwrap();
    drop(file);
    let (log, report) = kappa_log::Log::open(dir.path(), options(Arc::new(kappa_log::io::RealFs), &clock)).unwrap();
    assert!(!report.all_clean());
    assert_eq!(report.truncated_bytes(), (torn.len() / 2) as u64);
    let p = log.partition("t", 0).unwrap();
    assert_eq!((p.log_end_offset(), p.high_watermark()), (90, 90));
    assert_eq!(p.append(batch("after", 1, T0)).unwrap().base_offset, 90);
}

#[test]
fn idempotent_retries_are_deduplicated_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let produce = |seq: i32, n: usize| {
        let mut b = BatchBuilder::new().producer(42, 0, seq);
        for i in 0..n {
            b.push(NewRecord::new(Some(b"k"), Some(format!("{seq}-{i}").as_bytes()), T0));
        }
        b.build()
    };
    {
        let log = open(dir.path(), &clock);
        log.create_topic("t", 1, &overrides(&[])).unwrap();
        let p = log.partition("t", 0).unwrap();
        assert_eq!(p.append(produce(0, 2)).unwrap().base_offset, 0);
        let retry = p.append(produce(0, 2)).unwrap();
        assert!(retry.duplicate && retry.base_offset == 0);
        assert!(matches!(p.append(produce(5, 1)), Err(LogError::OutOfOrderSequence { expected: 2, .. })));
        assert_eq!(p.append(produce(2, 1)).unwrap().base_offset, 2);
        // No close: the next open replays the tail to rebuild producer state.
    }
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    let retry = p.append(produce(2, 1)).unwrap();
    assert!(retry.duplicate && retry.base_offset == 2, "{retry:?}");
    assert_eq!(p.log_end_offset(), 3);
}

/// Kafka's producer.id.expiration.ms: a producer idle that long (by the log's clock, not its
/// records' timestamps) is forgotten at the next retention pass, on a compacted topic too,
/// unless it has an open transaction; the forgotten state stays forgotten after a clean
/// restart.
#[test]
fn idle_producers_are_forgotten_after_producer_id_expiration_ms() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let produce = |pid: i64, seq: i32| {
        // Old record timestamps: expiration must go by when the producer appended.
        BatchBuilder::new().producer(pid, 0, seq).record(NewRecord::new(Some(b"k"), Some(b"v"), 1_000)).build()
    };
    let day = kappa_log::log::PRODUCER_ID_EXPIRATION_MS_DEFAULT;
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("cleanup.policy", "compact")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    p.append(produce(7, 0)).unwrap();
    p.append(txn_batch(8, 0, "open")).unwrap();
    p.enforce_retention().unwrap();
    assert!(p.append(produce(7, 0)).unwrap().duplicate, "known right after its append, old timestamps or not");
    clock.advance(day - 1);
    p.enforce_retention().unwrap();
    assert_eq!(p.producer_epoch(7), Some(0), "not idle for a day yet");
    clock.advance(1);
    p.enforce_retention().unwrap();
    assert_eq!(p.producer_epoch(7), None, "idle for a day: forgotten");
    assert_eq!(p.producer_epoch(8), Some(0), "an open transaction keeps its producer");
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.producer_epoch(7), None, "the snapshot written at close no longer has it");
    assert_eq!(p.last_stable_offset(), 1, "the open transaction still holds the LSO");
    let again = p.append(produce(7, 0)).unwrap();
    assert!(!again.duplicate && again.base_offset == 2, "a forgotten producer's batch is new again: {again:?}");
    drop(log); // no close: the next open replays the batches after the last snapshot

    // Replayed producers count as active from the open, whatever their records' timestamps:
    // a retry arriving right after a crash is still recognised.
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    p.enforce_retention().unwrap();
    let retry = p.append(produce(7, 0)).unwrap();
    assert!(retry.duplicate && retry.base_offset == 2, "replayed state survives the first pass: {retry:?}");
    clock.advance(day);
    p.enforce_retention().unwrap();
    assert_eq!(p.producer_epoch(7), None, "and expires a day after the open");
}

/// `producers_per_partition_max`: past it, the idle producers that appended least recently
/// are forgotten at once (not at the next retention pass), open transactions are kept, and a
/// limit lowered between runs applies at the next append, not at the open.
#[test]
fn past_producers_per_partition_max_the_least_recent_idle_producers_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let open_with_max = |max: usize| {
        let options = LogOptions { producers_per_partition_max: max, ..options(Arc::new(RealFs), &clock) };
        Log::open(dir.path(), options).expect("open log").0
    };
    let produce = |pid: i64, seq: i32| {
        BatchBuilder::new().producer(pid, 0, seq).record(NewRecord::new(Some(b"k"), Some(b"v"), T0)).build()
    };
    let log = open_with_max(10);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    p.append(txn_batch(100, 0, "open")).unwrap();
    for pid in 1..=10 {
        clock.advance(1);
        p.append(produce(pid, 0)).unwrap();
    }
    assert_eq!(p.producer_epoch(1), None, "the 11th producer made producer 1, the least recent, go");
    assert!((1..=10).filter(|pid| p.producer_epoch(*pid).is_some()).count() == 8, "nine tenths of 10 kept");
    assert_eq!(p.producer_epoch(100), Some(0), "an open transaction keeps its producer");
    assert_eq!(p.last_stable_offset(), 0);
    let retry = p.append(produce(10, 0)).unwrap();
    assert!(retry.duplicate, "a recent producer's retry is still a duplicate: {retry:?}");
    let again = p.append(produce(1, 0)).unwrap();
    assert!(!again.duplicate, "a forgotten producer's batch is appended again: {again:?}");
    log.close().unwrap();
    drop(log);

    let log = open_with_max(4);
    let p = log.partition("t", 0).unwrap();
    let known =
        |p: &kappa_log::Partition| (1..=11).filter(|pid| p.producer_epoch(*pid).is_some()).collect::<Vec<i64>>();
    assert_eq!(known(&p), [1, 3, 4, 5, 6, 7, 8, 9, 10], "an open forgets nothing (offline tools open with defaults)");
    p.append(produce(11, 0)).unwrap();
    assert_eq!(known(&p), [1, 10, 11], "a lower limit applies at the next append: the most recent idle producers stay");
    assert_eq!(p.producer_epoch(100), Some(0));
    drop(log);

    // Open transactions past the limit: kept; the next pass waits for a tenth of the limit
    // (at least one) more producers instead of scanning them all at every append.
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { producers_per_partition_max: 2, ..options(Arc::new(RealFs), &clock) };
    let log = Log::open(dir.path(), options).expect("open log").0;
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for pid in [100, 101, 102] {
        p.append(txn_batch(pid, 0, "open")).unwrap();
    }
    p.append(produce(1, 0)).unwrap();
    assert!(p.producer_epoch(1).is_some(), "4 producers: not past the recheck point (3 + 1)");
    p.append(produce(2, 0)).unwrap();
    assert_eq!((p.producer_epoch(1), p.producer_epoch(2)), (None, None), "5: the idle ones go");
    assert!([100, 101, 102].iter().all(|pid| p.producer_epoch(*pid).is_some()));
}

fn txn_batch(pid: i64, seq: i32, value: &str) -> Vec<u8> {
    BatchBuilder::new()
        .producer(pid, 0, seq)
        .transactional(true)
        .record(NewRecord::new(Some(b"k"), Some(value.as_bytes()), T0))
        .build()
}

#[test]
fn transactions_bound_read_committed_and_list_aborted_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    p.append(batch("plain", 1, T0)).unwrap(); // 0
    p.append(txn_batch(1, 0, "a")).unwrap(); // 1: txn of producer 1
    p.append(txn_batch(2, 0, "b")).unwrap(); // 2: txn of producer 2
    assert_eq!(p.last_stable_offset(), 1);
    let committed = p.read(0, 1 << 20, Isolation::ReadCommitted).unwrap();
    assert_eq!(headers(&committed.records).len(), 1, "only data below the LSO");
    assert_eq!(p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap().high_watermark, 3);

    p.append(BatchBuilder::control_marker(1, 0, ControlType::Abort, 0, T0).build()).unwrap(); // 3
    assert_eq!(p.last_stable_offset(), 2);
    p.append(BatchBuilder::control_marker(2, 0, ControlType::Commit, 0, T0).build()).unwrap(); // 4
    assert_eq!(p.last_stable_offset(), 5);
    let read = p.read(0, 1 << 20, Isolation::ReadCommitted).unwrap();
    assert_eq!(headers(&read.records).len(), 5);
    assert_eq!(read.aborted.len(), 1);
    assert_eq!((read.aborted[0].producer_id, read.aborted[0].first_offset), (1, 1));
    drop(log);
    // The aborted index and LSO survive an unclean restart (rebuilt by replay).
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    let read = p.read(2, 1 << 20, Isolation::ReadCommitted).unwrap();
    assert_eq!(read.aborted.len(), 1);
    assert_eq!(p.last_stable_offset(), 5);
}

#[test]
fn retention_deletes_old_and_excess_segments_but_never_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024"), ("retention.ms", "1000")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..10 {
        p.append(batch(&i.to_string(), 4, T0)).unwrap();
    }
    let before = p.segment_count();
    assert_eq!(p.enforce_retention().unwrap().segments_deleted, 0, "nothing is old yet");
    clock.advance(5_000);
    let outcome = p.enforce_retention().unwrap();
    assert_eq!(outcome.segments_deleted, before - 1);
    assert_eq!(p.segment_count(), 1);
    assert!(p.log_start_offset() > 0);
    assert!(matches!(p.read(0, 100, Isolation::ReadUncommitted), Err(LogError::OffsetOutOfRange { .. })));

    log.alter_topic_config(
        "t",
        &[
            ("retention.ms".to_string(), Some("-1".to_string())),
            ("retention.bytes".to_string(), Some("2048".to_string())),
        ]
        .into(),
    )
    .unwrap();
    for i in 0..20 {
        p.append(batch(&i.to_string(), 4, clock.now())).unwrap();
    }
    p.enforce_retention().unwrap();
    assert!(p.size_bytes() <= 2048 + 1024, "size {} within retention.bytes plus the active segment", p.size_bytes());
}

trait Now {
    fn now(&self) -> i64;
}
impl Now for ManualClock {
    fn now(&self) -> i64 {
        kappa_log::clock::Clock::now_ms(self)
    }
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..20 {
        p.append(batch(&i.to_string(), 5, T0 + i * 100)).unwrap(); // records at T0+i*100 .. +4
    }
    assert_eq!(p.offset_for_timestamp(T0, Isolation::ReadUncommitted).unwrap(), Some((0, T0)));
    assert_eq!(p.offset_for_timestamp(T0 + 702, Isolation::ReadUncommitted).unwrap(), Some((37, T0 + 702)));
    assert_eq!(p.offset_for_timestamp(T0 + 705, Isolation::ReadUncommitted).unwrap(), Some((40, T0 + 800)));
    assert_eq!(p.offset_for_timestamp(T0 + 1_000_000, Isolation::ReadUncommitted).unwrap(), None);
}

#[test]
fn concurrent_appenders_share_fsyncs_and_get_unique_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = Arc::new(open(dir.path(), &clock));
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                (0..50).map(|i| p.append(batch(&format!("{t}-{i}"), 2, T0)).unwrap().base_offset).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut offsets: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..400).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(p.high_watermark(), 800);
}

#[test]
fn topics_persist_with_their_config_and_bad_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    {
        let log = open(dir.path(), &clock);
        log.create_topic(
            "channels",
            4,
            &overrides(&[("cleanup.policy", "compact"), ("kappa.compaction.subkey.header", "contentId")]),
        )
        .unwrap();
        log.create_topic("gone", 1, &overrides(&[])).unwrap();
        log.delete_topic("gone").unwrap();
        assert!(matches!(log.create_topic("channels", 1, &overrides(&[])), Err(LogError::TopicExists(_))));
        assert!(matches!(log.create_topic("bad/name", 1, &overrides(&[])), Err(LogError::InvalidTopicName { .. })));
        assert!(matches!(log.create_topic("x", 0, &overrides(&[])), Err(LogError::InvalidPartitions { .. })));
        assert!(matches!(log.create_topic("y", 1, &overrides(&[("nope", "1")])), Err(LogError::UnknownConfig(_))));
        log.add_partitions("channels", 6).unwrap();
        assert!(matches!(log.add_partitions("channels", 3), Err(LogError::InvalidPartitions { .. })));
    }
    let log = open(dir.path(), &clock);
    let names: Vec<String> = log.topics().iter().map(|t| t.name().to_owned()).collect();
    assert_eq!(names, vec!["channels"]);
    let topic = log.topic("channels").unwrap();
    assert_eq!(topic.partition_count(), 6);
    assert_eq!(topic.config().compaction_subkey_header.as_deref(), Some("contentId"));
    assert!(topic.config().cleanup_policy.compact);
}

/// A sub-key header without compaction is refused when set, but a topic stored that way (by
/// a kappa from before the rule) still opens, as it was: refusing it would refuse the whole
/// data directory.
#[test]
fn a_stored_subkey_header_without_compaction_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let header = ("kappa.compaction.subkey.header", "contentId");
    {
        let log = open(dir.path(), &clock);
        let refused = log.create_topic("plain", 1, &overrides(&[header])).err();
        assert!(matches!(refused, Some(LogError::InvalidConfig { .. })), "{refused:?}");
        log.create_topic("plain", 1, &overrides(&[])).unwrap();
        // Existence is checked first, as Kafka does: an "ensure the topic" call succeeds.
        let again = log.create_topic("plain", 1, &overrides(&[header])).err();
        assert!(matches!(again, Some(LogError::TopicExists(_))), "{again:?}");
    }
    let properties = dir.path().join("topics/plain/topic.properties");
    std::fs::write(&properties, "kappa.compaction.subkey.header=contentId\n").unwrap();
    let log = open(dir.path(), &clock);
    let config = log.topic("plain").unwrap().config();
    assert_eq!(config.compaction_subkey_header.as_deref(), Some("contentId"));
    assert!(!config.cleanup_policy.compact);
}

#[test]
fn a_read_that_fills_its_budget_inside_a_segment_does_not_skip_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    // A small batch, a big one (same segment), then a small one that starts the next.
    p.append(batch("a", 1, T0)).unwrap();
    p.append(batch("b", 55, T0)).unwrap();
    p.append(batch("c", 10, T0)).unwrap();
    assert_eq!(p.segment_count(), 2);
    let first_len = batch("a", 1, T0).len();
    for budget in first_len..first_len + 1024 {
        let read = p.read(0, budget, Isolation::ReadUncommitted).unwrap();
        let mut next = 0;
        for h in headers(&read.records) {
            assert_eq!(h.base_offset, next, "budget {budget}: a read must return contiguous batches");
            next = h.next_offset();
        }
    }
}

#[test]
fn a_borrowed_batch_is_written_with_its_offset_and_the_callers_bytes_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    // Two batches in one request-like buffer, both encoded with base offset 0.
    let (a, b) = (batch("a", 3, T0), batch("b", 2, T0));
    let mut request = a.clone();
    request.extend_from_slice(&b);
    let before = request.clone();
    let first = p.append_unsynced(&request[..a.len()]).unwrap();
    let second = p.append_unsynced(&request[a.len()..]).unwrap();
    assert_eq!((first.base_offset, second.base_offset, second.last_offset), (0, 3, 4));
    assert_eq!(request, before, "the caller's buffer is not patched");
    p.wait_until_durable(5).unwrap();
    let read = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(headers(&read.records).iter().map(|h| h.base_offset).collect::<Vec<_>>(), [0, 3]);
    // Everything but the base offset is the producer's bytes.
    assert_eq!(&read.records[8..a.len()], &a[8..]);
    assert_eq!(&read.records[a.len() + 8..], &b[8..]);
}

#[test]
fn log_append_time_batches_are_rewritten_and_still_pass_their_crc() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 + 5_000);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("message.timestamp.type", "LogAppendTime")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    p.append(batch("a", 2, T0)).unwrap();
    let outcome = p.append(batch("b", 3, T0)).unwrap();
    assert_eq!((outcome.base_offset, outcome.log_append_time), (2, Some(T0 + 5_000)));
    let read = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    // `headers` validates each batch, CRC included.
    let got = headers(&read.records);
    assert_eq!(
        got.iter().map(|h| (h.base_offset, h.max_timestamp)).collect::<Vec<_>>(),
        [(0, T0 + 5_000), (2, T0 + 5_000)]
    );
    assert!(got.iter().all(|h| h.has_log_append_time()));
}

/// The interval policy's flush syncs exactly the partitions written since their last sync
/// (a clean file's fdatasync may still flush the disk's cache), and what it synced survives
/// a power loss.
#[test]
fn interval_flush_syncs_only_partitions_with_unsynced_writes() {
    use kappa_log::io::sim::SimFs;
    use kappa_log::{Log, LogOptions, SyncPolicy};
    let dir = std::path::Path::new("/data");
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let interval = || LogOptions {
        sync_policy: SyncPolicy::IntervalMs(100),
        fs: Arc::new(fs.clone()),
        clock: Arc::new(clock.clone()),
        ..LogOptions::default()
    };
    let log = Log::open(dir, interval()).expect("open log").0;
    log.create_topic("t", 8, &overrides(&[])).unwrap();
    let syncs = || fs.stats().sync_data;

    let before = syncs();
    log.flush().unwrap();
    assert_eq!(syncs() - before, 0, "nothing was written, so nothing is synced");

    let written = batch("flushed", 3, T0);
    log.partition("t", 5).unwrap().append(written.clone()).unwrap();
    let before = syncs();
    log.flush().unwrap();
    assert_eq!(syncs() - before, 1, "one fdatasync, for the one partition written to");
    log.flush().unwrap();
    assert_eq!(syncs() - before, 1, "a second flush finds nothing new to sync");

    log.partition("t", 2).unwrap().append(batch("never flushed", 2, T0)).unwrap();
    drop(log);
    fs.crash(7);
    let log = Log::open(dir, interval()).expect("reopen after power loss").0;
    let p = log.partition("t", 5).unwrap();
    assert_eq!(p.log_end_offset(), 3, "the flushed batch survives the power loss");
    let read = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(batch_records(&read.records), batch_records(&written));
}

/// `make_durable` syncs under the interval policy too (where `wait_until_durable` returns
/// at once), so what it covered survives a power loss; under the default policy an append
/// is already durable and it syncs nothing more.
#[test]
fn make_durable_syncs_under_the_interval_policy_and_costs_nothing_more_by_default() {
    use kappa_log::io::sim::SimFs;
    use kappa_log::{Log, LogOptions, SyncPolicy};
    let dir = std::path::Path::new("/data");
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let options = |sync_policy| LogOptions {
        sync_policy,
        fs: Arc::new(fs.clone()),
        clock: Arc::new(clock.clone()),
        ..LogOptions::default()
    };
    let log = Log::open(dir, options(SyncPolicy::IntervalMs(3_600_000))).expect("open log").0;
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    let written = batch("synced", 3, T0);
    let end = p.append_unsynced(written.clone()).unwrap().last_offset + 1;
    p.wait_until_durable(end).unwrap();
    assert_eq!(p.durable_offset(), 0, "the interval policy does not sync on wait_until_durable");
    p.make_durable(end).unwrap();
    assert_eq!(p.durable_offset(), end);
    drop((p, log));
    fs.crash(3);
    let log = Log::open(dir, options(SyncPolicy::EveryAppend)).expect("reopen after power loss").0;
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.log_end_offset(), end, "what make_durable covered survives the power loss");
    let read = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(batch_records(&read.records), batch_records(&written));

    let end = p.append(batch("default", 2, T0)).unwrap().last_offset + 1;
    let before = fs.stats().sync_data;
    p.make_durable(end).unwrap();
    assert_eq!(fs.stats().sync_data, before, "an acknowledged append is durable already");
    assert_eq!(p.durable_offset(), end);
}

/// DeleteRecords: the log start moves to the requested offset (even inside a segment and a
/// batch), reads below it are out of range, segments wholly below it go, and the start
/// survives clean and unclean restarts. A damaged start file stops the open with its path.
#[test]
fn delete_records_moves_the_log_start_durably_and_drops_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..20 {
        p.append(batch(&i.to_string(), 4, T0)).unwrap();
    }
    let (segments, end) = (p.segment_count(), p.high_watermark());
    assert!(segments >= 3 && end == 80, "{segments} segments, end {end}");
    assert!(
        matches!(p.delete_records(81), Err(LogError::OffsetOutOfRange { offset: 81, .. })),
        "past the high watermark"
    );

    // Offset 42 is inside a batch (40..43) of a later segment.
    assert_eq!(p.delete_records(42).unwrap(), 42);
    assert_eq!(p.log_start_offset(), 42);
    assert!(p.segment_count() < segments, "segments wholly below 42 are deleted");
    assert!(matches!(
        p.read(41, 1 << 20, Isolation::ReadUncommitted),
        Err(LogError::OffsetOutOfRange { offset: 41, log_start_offset: 42, .. })
    ));
    let read = p.read(42, 1 << 20, Isolation::ReadUncommitted).unwrap();
    assert_eq!(read.log_start_offset, 42);
    assert_eq!(headers(&read.records)[0].base_offset, 40, "whole batches, as Kafka returns them");
    assert_eq!(p.delete_records(10).unwrap(), 42, "an earlier offset changes nothing");
    let found = p.offset_for_timestamp(T0, Isolation::ReadUncommitted).unwrap();
    assert_eq!(found.map(|(offset, _)| offset), Some(42), "a timestamp lookup starts at the log start");
    drop(p);
    log.close().unwrap();
    drop(log);

    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.log_start_offset(), 42, "after a clean restart");
    assert_eq!(p.delete_records(-1).unwrap(), 80, "-1 is the high watermark");
    p.append(batch("after", 2, T0)).unwrap();
    drop(p);
    drop(log); // no close: a crash

    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!((p.log_start_offset(), p.high_watermark()), (80, 82), "after an unclean restart");
    drop(p);
    drop(log);

    // A start past the end (the records before it lost in a power loss under the interval
    // policy) moves back to the end, so later appends are not hidden behind it.
    let file = dir.path().join("topics/t/0/log-start.offset");
    let past_end = std::fs::read(&file).unwrap();
    let mut forged = b"KLSO".to_vec();
    forged.extend_from_slice(&500i64.to_be_bytes());
    forged.extend_from_slice(&crc32c::crc32c(&forged).to_be_bytes());
    std::fs::write(&file, &forged).unwrap();
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!((p.log_start_offset(), p.high_watermark()), (82, 82), "a start past the end moves to the end");
    p.append(batch("visible", 1, T0)).unwrap();
    drop(p);
    drop(log);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(
        p.read(82, 1 << 20, Isolation::ReadUncommitted).unwrap().log_start_offset,
        82,
        "the record appended after it stays readable"
    );
    drop(p);
    drop(log);
    std::fs::write(&file, past_end).unwrap();

    let mut bytes = std::fs::read(&file).unwrap();
    bytes[6] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let clock2 = clock.clone();
    let err = kappa_log::Log::open(dir.path(), options(Arc::new(kappa_log::io::RealFs), &clock2))
        .err()
        .expect("damaged start file");
    assert!(err.to_string().contains("log-start.offset"), "{err}");
}

/// Data cleaned before compaction recomputed max timestamps: a batch whose header promises
/// a timestamp none of its records has must not end the search.
#[test]
fn offset_for_timestamp_looks_past_a_batch_whose_header_overstates_its_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    let mut overstated = batch("a", 1, T0);
    overstated[35..43].copy_from_slice(&(T0 + 100).to_be_bytes()); // the header's max_timestamp
    kappa_log::batch::rewrite_crc(&mut overstated);
    p.append(overstated).unwrap();
    p.append(batch("b", 1, T0 + 200)).unwrap();
    assert_eq!(p.offset_for_timestamp(T0 + 50, Isolation::ReadUncommitted).unwrap(), Some((1, T0 + 200)));
}

/// Records without a timestamp (-1, legacy data) age from the broker's time of the last
/// append, including after a restart, instead of counting as older than any retention.
#[test]
fn retention_ages_segments_without_record_timestamps_from_their_last_append() {
    let fs = kappa_log::io::sim::SimFs::new();
    let clock = ManualClock::new(T0);
    let data = std::path::Path::new("/data");
    let open_sim = || Log::open(data, options(Arc::new(fs.clone()), &clock)).unwrap().0;
    let log = open_sim();
    log.create_topic("t", 1, &overrides(&[("segment.bytes", "1024"), ("retention.ms", "1000")])).unwrap();
    let p = log.partition("t", 0).unwrap();
    while p.segment_count() < 3 {
        p.append(batch("legacy", 1, -1)).unwrap();
    }
    assert_eq!(p.max_timestamp(), None, "the records carry no timestamp");
    assert_eq!(p.enforce_retention().unwrap().segments_deleted, 0, "just appended: nothing is old");
    log.close().unwrap();
    drop((p, log));

    let log = open_sim();
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.enforce_retention().unwrap().segments_deleted, 0, "still nothing is old after a restart");
    clock.advance(5_000);
    assert_eq!(p.enforce_retention().unwrap().segments_deleted, 2, "retention.ms after the last append");
}

#[test]
fn a_topic_id_survives_reopen_and_a_recreated_topic_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let first = log.create_topic("t", 1, &overrides(&[])).unwrap().id();
    let other = log.create_topic("u", 1, &overrides(&[])).unwrap().id();
    assert_ne!(first, other, "every topic gets its own id");
    assert_ne!(first, [0; 16]);
    drop(log);
    let log = open(dir.path(), &clock);
    assert_eq!(log.topic("t").unwrap().id(), first, "the id is persisted");
    log.delete_topic("t").unwrap();
    let recreated = log.create_topic("t", 1, &overrides(&[])).unwrap().id();
    assert_ne!(recreated, first, "a deleted and recreated topic is a different topic");
    drop(log);
    assert_eq!(open(dir.path(), &clock).topic("t").unwrap().id(), recreated);
}

#[test]
fn a_topic_from_before_ids_gets_one_at_open_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    log.partition("t", 0).unwrap().append(batch("a", 2, T0)).unwrap();
    drop(log);
    let id_file = dir.path().join("topics/t/topic.id");
    std::fs::remove_file(&id_file).unwrap();
    let log = open(dir.path(), &clock);
    let given = log.topic("t").unwrap().id();
    assert_eq!(std::fs::read(&id_file).unwrap(), given, "the id given at open is persisted");
    assert_eq!(log.partition("t", 0).unwrap().high_watermark(), 2, "the topic's data is untouched");
    drop(log);
    assert_eq!(open(dir.path(), &clock).topic("t").unwrap().id(), given);
}

/// A batch of `records_count` records whose body is `body` compressed with `codec`, with a
/// valid header and CRC: what a buggy or hostile producer can send.
fn batch_with_body(codec: kappa_log::batch::Compression, body: &[u8], records_count: i32) -> Vec<u8> {
    let mut bytes = BatchBuilder::new().compression(codec).record(NewRecord::new(Some(b"k"), Some(b"v"), T0)).build();
    bytes.truncate(kappa_log::batch::HEADER_BYTES);
    bytes.extend_from_slice(&kappa_log::compression::compress(codec, body));
    let batch_length = (bytes.len() - 12) as i32;
    bytes[8..12].copy_from_slice(&batch_length.to_be_bytes());
    bytes[23..27].copy_from_slice(&(records_count - 1).to_be_bytes()); // last offset delta
    bytes[57..61].copy_from_slice(&records_count.to_be_bytes());
    kappa_log::batch::rewrite_crc(&mut bytes);
    bytes
}

#[test]
fn batches_whose_records_do_not_decode_are_refused_though_their_crc_matches() {
    use kappa_log::batch::Compression;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    for codec in [Compression::None, Compression::Zstd] {
        let garbage = batch_with_body(codec, &[0x7f; 40], 1);
        kappa_log::batch::validate_produced(&garbage, usize::MAX).expect("header and CRC are valid");
        match p.append(garbage) {
            Err(LogError::InvalidRecords(reason)) => assert!(reason.contains("record"), "{reason}"),
            other => panic!("{codec:?}: garbage records must be refused, got {other:?}"),
        }
    }
    // Records that parse but fewer than the header declares.
    let mut one = BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(b"v"), T0)).build();
    let body = one.split_off(kappa_log::batch::HEADER_BYTES);
    assert!(matches!(p.append(batch_with_body(Compression::None, &body, 2)), Err(LogError::InvalidRecords(_))));
    assert_eq!((p.log_end_offset(), p.size_bytes()), (0, 0), "nothing was written");
    p.append(batch_with_body(Compression::None, &body, 1)).expect("the same records, counted right, append");
}

#[test]
fn a_compressed_batch_inflating_past_the_limit_is_refused() {
    use kappa_log::batch::Compression;
    use kappa_log::records::BATCH_UNCOMPRESSED_BYTES_MAX;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    let p = log.partition("t", 0).unwrap();
    let huge = vec![0u8; BATCH_UNCOMPRESSED_BYTES_MAX + 1];
    let bomb =
        BatchBuilder::new().compression(Compression::Zstd).record(NewRecord::new(Some(b"k"), Some(&huge), T0)).build();
    assert!(bomb.len() < 1024 * 1024, "a few KiB on the wire: {} bytes", bomb.len());
    match p.append(bomb) {
        Err(LogError::InvalidRecords(reason)) => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("a decompression bomb must be refused, got {other:?}"),
    }
    assert_eq!((p.log_end_offset(), p.size_bytes()), (0, 0), "nothing was written");
}

#[test]
fn batches_of_every_codec_append_and_read_back() {
    use kappa_log::batch::Compression;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    log.create_topic("c", 1, &overrides(&[("cleanup.policy", "compact")])).unwrap();
    for (i, codec) in [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd]
        .into_iter()
        .enumerate()
    {
        let mut builder = BatchBuilder::new().compression(codec);
        for r in 0..50 {
            builder.push(
                NewRecord::new(Some(format!("k{r}").as_bytes()), Some(&[r as u8; 100]), T0 + r).header("h", Some(b"x")),
            );
        }
        let bytes = builder.build();
        for topic in ["t", "c"] {
            let p = log.partition(topic, 0).unwrap();
            let outcome = p.append(bytes.clone()).unwrap_or_else(|e| panic!("{codec:?} into {topic}: {e}"));
            assert_eq!(outcome.base_offset, 50 * i as i64);
        }
    }
    let p = log.partition("t", 0).unwrap();
    assert_eq!(records_of(&p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap().records).len(), 250);
    // Keyless records still append where there is no compaction.
    p.append(BatchBuilder::new().record(NewRecord::new(None, Some(b"v"), T0)).build()).unwrap();
    let keyless =
        BatchBuilder::new().compression(Compression::Lz4).record(NewRecord::new(None, Some(b"v"), T0)).build();
    assert!(matches!(log.partition("c", 0).unwrap().append(keyless), Err(LogError::MissingKey { index: 0 })));
}

#[test]
fn delete_records_is_refused_unless_the_cleanup_policy_has_delete() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("c", 1, &overrides(&[("cleanup.policy", "compact")])).unwrap();
    log.create_topic("cd", 1, &overrides(&[("cleanup.policy", "compact,delete")])).unwrap();
    for topic in ["c", "cd"] {
        log.partition(topic, 0).unwrap().append(batch("a", 4, T0)).unwrap();
    }
    let compacted = log.partition("c", 0).unwrap();
    match compacted.delete_records(2) {
        Err(e @ LogError::DeleteRecordsPolicy { .. }) => {
            assert!(e.to_string().contains("c-0") && e.to_string().contains("compact,delete"), "{e}")
        }
        other => panic!("a compacted topic's records go only by compaction: {other:?}"),
    }
    assert_eq!(compacted.log_start_offset(), 0, "nothing was deleted");
    assert_eq!(log.partition("cd", 0).unwrap().delete_records(2).unwrap(), 2, "compact,delete allows it");
    log.alter_topic_config("c", &[("cleanup.policy".to_owned(), Some("compact,delete".to_owned()))].into()).unwrap();
    assert_eq!(compacted.delete_records(2).unwrap(), 2, "the policy is read at the call");
}

/// An uncompressed records body: one keyed record per entry of `offset_deltas`, numbered
/// with those deltas (a producer numbers them 0, 1, 2, ...).
fn body_with_offset_deltas(offset_deltas: &[i32]) -> Vec<u8> {
    use kappa_log::records::{put_varint, put_varlong};
    let mut body = Vec::new();
    for (i, &delta) in offset_deltas.iter().enumerate() {
        let key = format!("k{i}");
        let mut record = vec![0u8]; // attributes
        put_varlong(&mut record, 0); // timestamp delta
        put_varint(&mut record, delta);
        put_varint(&mut record, key.len() as i32);
        record.extend_from_slice(key.as_bytes());
        put_varint(&mut record, 1);
        record.push(b'v');
        put_varint(&mut record, 0); // header count
        put_varint(&mut body, record.len() as i32);
        body.extend_from_slice(&record);
    }
    body
}

#[test]
fn batches_whose_records_offset_deltas_are_not_consecutive_are_refused() {
    use kappa_log::batch::Compression;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic("t", 1, &overrides(&[])).unwrap();
    log.create_topic("c", 1, &overrides(&[("cleanup.policy", "compact")])).unwrap();
    let codecs = [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];
    for topic in ["t", "c"] {
        let p = log.partition(topic, 0).unwrap();
        for codec in codecs {
            // Header count 3 and last_offset_delta 2 match, so only the records are wrong.
            for deltas in [[0, 1_000_000, 2], [0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 0, 2]] {
                let bad = batch_with_body(codec, &body_with_offset_deltas(&deltas), 3);
                kappa_log::batch::validate_produced(&bad, usize::MAX).expect("header and CRC are valid");
                match p.append(bad) {
                    Err(LogError::InvalidRecords(reason)) => assert!(reason.contains("offset delta"), "{reason}"),
                    other => panic!("{topic} {codec:?} {deltas:?}: must be refused, got {other:?}"),
                }
            }
            assert_eq!(p.size_bytes(), 0, "{topic} {codec:?}: nothing was written");
        }
        for (i, codec) in codecs.into_iter().enumerate() {
            let good = batch_with_body(codec, &body_with_offset_deltas(&[0, 1, 2]), 3);
            let outcome = p.append(good).unwrap_or_else(|e| panic!("{topic} {codec:?}: {e}"));
            assert_eq!((outcome.base_offset, outcome.last_offset), (3 * i as i64, 3 * i as i64 + 2));
        }
        let read = p.read(0, 1 << 20, Isolation::ReadUncommitted).unwrap();
        let offsets: Vec<i64> = records_of(&read.records).iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..15).collect::<Vec<_>>(), "{topic}: every record at its own offset");
    }
}
