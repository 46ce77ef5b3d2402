//! State-machine tests: random sequences of appends, reads, timestamp look-ups, clock
//! moves, retention and restarts on the real file system, checked against a plain model
//! (the list of records the log should hold).

mod common;

use std::sync::Arc;

use common::*;
use kappa_log::clock::ManualClock;
use kappa_log::records::{BatchBuilder, NewRecord};
use kappa_log::{Isolation, Log, LogError, Partition};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Records as (key index or None, value, timestamp relative to the clock).
    Append(Vec<(Option<u8>, Option<Vec<u8>>, i64)>),
    Read {
        pick: u32,
        max_bytes: usize,
    },
    ForTimestamp(i64),
    Advance(i64),
    Retention,
    CloseReopen,
    UncleanReopen,
}

fn op() -> impl Strategy<Value = Op> {
    let record = (
        proptest::option::weighted(0.9, 0u8..4),
        proptest::option::weighted(0.9, proptest::collection::vec(any::<u8>(), 0..40)),
        -3_000i64..1_000,
    );
    prop_oneof![
        8 => proptest::collection::vec(record, 1..6).prop_map(Op::Append),
        4 => (any::<u32>(), prop_oneof![Just(1usize), 1usize..600, Just(1 << 20)])
            .prop_map(|(pick, max_bytes)| Op::Read { pick, max_bytes }),
        2 => (-5_000i64..2_000).prop_map(Op::ForTimestamp),
        2 => (0i64..4_000).prop_map(Op::Advance),
        2 => Just(Op::Retention),
        1 => Just(Op::CloseReopen),
        1 => Just(Op::UncleanReopen),
    ]
}

/// The model: the records the log holds and its batch boundaries.
#[derive(Default)]
struct Model {
    records: Vec<Rec>,
    /// (base offset, last offset) of every batch still retained.
    batches: Vec<(i64, i64)>,
    log_start: i64,
    log_end: i64,
}

impl Model {
    fn batch_containing(&self, offset: i64) -> (i64, i64) {
        *self.batches.iter().find(|(b, l)| *b <= offset && offset <= *l).expect("offset inside a retained batch")
    }
    fn max_timestamp(&self, from: i64, to: i64) -> i64 {
        self.records.iter().filter(|r| r.offset >= from && r.offset < to).map(|r| r.timestamp).max().unwrap_or(-1)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    log: Option<Log>,
    p: Option<Arc<Partition>>,
    retention_ms: i64,
    retention_bytes: i64,
}

impl Harness {
    fn p(&self) -> &Partition {
        self.p.as_ref().unwrap()
    }
    fn reopen(&mut self, clean: bool) {
        if clean {
            self.log.as_ref().unwrap().close().unwrap();
        }
        self.p = None;
        self.log = None;
        let log = open(self.dir.path(), &self.clock);
        self.p = Some(log.partition("t", 0).unwrap());
        self.log = Some(log);
    }
    fn now(&self) -> i64 {
        kappa_log::clock::Clock::now_ms(&self.clock)
    }
}

fn check_read(h: &Harness, m: &Model, pick: u32, max_bytes: usize) {
    let p = h.p();
    let span = (m.log_end - m.log_start + 1) as u32;
    // Now and then ask just outside the log.
    if pick.is_multiple_of(16) {
        let err = p.read(m.log_end + 1, max_bytes, Isolation::ReadUncommitted).unwrap_err();
        assert!(matches!(err, LogError::OffsetOutOfRange { .. }), "{err}");
        return;
    }
    if pick % 16 == 1 && m.log_start > 0 {
        let err = p.read(m.log_start - 1, max_bytes, Isolation::ReadUncommitted).unwrap_err();
        assert!(matches!(err, LogError::OffsetOutOfRange { .. }), "{err}");
        return;
    }
    let offset = m.log_start + i64::from(pick % span);
    let read = p.read(offset, max_bytes, Isolation::ReadUncommitted).unwrap();
    assert_eq!((read.high_watermark, read.log_start_offset), (m.log_end, m.log_start));
    if offset == m.log_end {
        assert!(read.records.is_empty(), "a read at the high watermark is empty");
        return;
    }
    let hs = headers(&read.records);
    assert!(!hs.is_empty(), "a read below the high watermark returns at least one batch");
    let (base, last) = m.batch_containing(offset);
    assert_eq!((hs[0].base_offset, hs[0].last_offset()), (base, last), "starts at the batch holding {offset}");
    for w in hs.windows(2) {
        assert_eq!(w[1].base_offset, w[0].next_offset(), "batches are contiguous");
    }
    assert!(
        read.records.len() <= max_bytes.max(hs[0].total_bytes()),
        "{} bytes returned for a budget of {max_bytes}",
        read.records.len()
    );
    let end = hs.last().unwrap().next_offset();
    let expected: Vec<&Rec> = m.records.iter().filter(|r| r.offset >= base && r.offset < end).collect();
    let got = records_of(&read.records);
    assert_eq!(got.iter().collect::<Vec<_>>(), expected);
    if max_bytes >= 1 << 20 && p.segment_count() <= 64 {
        assert_eq!(end, m.log_end, "a large budget reads to the end");
    }
}

fn check_everything(h: &Harness, m: &Model) {
    let p = h.p();
    assert_eq!((p.log_start_offset(), p.log_end_offset(), p.high_watermark()), (m.log_start, m.log_end, m.log_end));
    let all = read_all(p, m.log_start);
    assert_eq!(records_of(&all), m.records);
    let files = segment_files(p.dir());
    assert_eq!(files.len(), p.segment_count());
    assert_eq!(files[0].0, m.log_start, "the log starts at its first segment");
}

fn retention(h: &Harness, m: &mut Model) {
    let p = h.p();
    let now = h.now();
    let files = segment_files(p.dir());
    // (base, next base, size, max timestamp) of every segment before retention.
    let segments: Vec<(i64, i64, u64, i64)> = files
        .iter()
        .enumerate()
        .map(|(i, &(base, size))| {
            let next = files.get(i + 1).map_or(m.log_end, |f| f.0);
            (base, next, size, m.max_timestamp(base, next))
        })
        .collect();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    let mut expected_start = m.log_start;
    let mut expected_deleted = 0;
    for &(_, next, size, max_ts) in &segments[..segments.len() - 1] {
        let expired = h.retention_ms >= 0 && max_ts < now - h.retention_ms;
        let oversize = h.retention_bytes >= 0 && total - size >= h.retention_bytes as u64;
        if !(expired || oversize) {
            break;
        }
        total -= size;
        expected_start = next;
        expected_deleted += 1;
    }
    let outcome = p.enforce_retention().unwrap();
    assert_eq!(outcome.segments_deleted, expected_deleted);
    assert_eq!(p.log_start_offset(), expected_start);
    assert!(files.iter().any(|f| f.0 == expected_start), "the log start is a segment boundary");
    // Every deleted segment was expired or had to go to get under retention.bytes.
    let mut remaining: u64 = files.iter().map(|f| f.1).sum();
    for &(base, _, size, max_ts) in segments.iter().filter(|s| s.0 < expected_start) {
        let expired = h.retention_ms >= 0 && max_ts < now - h.retention_ms;
        let needed = h.retention_bytes >= 0 && remaining > h.retention_bytes as u64;
        assert!(expired || needed, "segment {base} (max ts {max_ts}, now {now}) was deleted needlessly");
        remaining -= size;
    }
    assert_eq!(segment_files(p.dir()).len(), segments.len() - expected_deleted);
    m.log_start = expected_start;
    m.records.retain(|r| r.offset >= expected_start);
    m.batches.retain(|b| b.0 >= expected_start);
}

fn run(retention_ms: i64, retention_bytes: i64, ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic(
        "t",
        1,
        &overrides(&[
            ("segment.bytes", "1024"),
            ("retention.ms", &retention_ms.to_string()),
            ("retention.bytes", &retention_bytes.to_string()),
        ]),
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    let mut h = Harness { dir, clock, log: Some(log), p: Some(p), retention_ms, retention_bytes };
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Append(records) => {
                let now = h.now();
                let mut builder = BatchBuilder::new();
                for (key, value, dt) in &records {
                    let key = key.map(|k| format!("k{k}").into_bytes());
                    builder.push(NewRecord::new(key.as_deref(), value.as_deref(), now + dt));
                }
                let outcome = h.p().append(builder.build()).unwrap();
                assert_eq!(outcome.base_offset, m.log_end);
                assert_eq!(outcome.last_offset, m.log_end + records.len() as i64 - 1);
                for (i, (key, value, dt)) in records.into_iter().enumerate() {
                    m.records.push(Rec {
                        offset: m.log_end + i as i64,
                        key: key.map(|k| format!("k{k}").into_bytes()),
                        value,
                        timestamp: now + dt,
                        headers: vec![],
                    });
                }
                m.batches.push((outcome.base_offset, outcome.last_offset));
                m.log_end = outcome.last_offset + 1;
            }
            Op::Read { pick, max_bytes } => check_read(&h, &m, pick, max_bytes),
            Op::ForTimestamp(dt) => {
                let target = h.now() + dt;
                let expected = m.records.iter().find(|r| r.timestamp >= target).map(|r| (r.offset, r.timestamp));
                assert_eq!(h.p().offset_for_timestamp(target, Isolation::ReadUncommitted).unwrap(), expected);
            }
            Op::Advance(ms) => h.clock.advance(ms),
            Op::Retention => retention(&h, &mut m),
            Op::CloseReopen => {
                h.reopen(true);
                check_everything(&h, &m);
            }
            Op::UncleanReopen => {
                h.reopen(false);
                check_everything(&h, &m);
            }
        }
    }
    check_everything(&h, &m);
    // Whatever happened, an unclean restart keeps it all.
    h.reopen(false);
    check_everything(&h, &m);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64, 2000)))]

    #[test]
    fn log_matches_the_model(
        retention_ms in prop_oneof![Just(-1i64), Just(2_000), Just(10_000)],
        retention_bytes in prop_oneof![Just(-1i64), Just(1_500), Just(4_000)],
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(retention_ms, retention_bytes, ops);
    }
}

/// Non-monotonic timestamps across segments: the time index must still find the first
/// record at or after a target, not the first segment whose index entry is larger.
#[test]
fn offset_for_timestamp_with_out_of_order_timestamps_across_segments() {
    let ops: Vec<Op> = (0..40)
        .map(|i| Op::Append(vec![(Some(1), Some(vec![7; 30]), if i % 2 == 0 { -2_500 } else { 500 - i * 10 })]))
        .chain((-3_000..1_000).step_by(97).map(Op::ForTimestamp))
        .collect();
    run(-1, -1, ops);
}
