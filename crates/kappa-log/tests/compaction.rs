//! Compaction against a model: random keyed (and sub-keyed) records, tombstones and
//! codecs, cleaned and compared with what the rules in compaction.rs say must survive;
//! plus deterministic tests of each knob, transactions, the channels scenario and crash
//! safety on SimFs.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use kappa_log::batch::Compression;
use kappa_log::clock::ManualClock;
use kappa_log::io::sim::SimFs;
use kappa_log::records::{BatchBuilder, ControlType, NewRecord};
use kappa_log::{Isolation, Log, Partition};
use proptest::prelude::*;

const SUB: &str = "sub";
const DELETE_RETENTION_MS: i64 = 10_000;

fn now(clock: &ManualClock) -> i64 {
    kappa_log::clock::Clock::now_ms(clock)
}

fn subkey_of(r: &Rec, subkey_mode: bool) -> Option<Vec<u8>> {
    if !subkey_mode {
        return None;
    }
    r.headers.iter().rev().find(|(k, _)| k == SUB.as_bytes()).map(|(_, v)| v.clone().unwrap_or_default())
}

/// What the cleaner must leave of `records`, given each segment's base offset and broker
/// time of its last append (the last segment is the active one). Tombstones age by that
/// broker time, never by their record timestamps.
fn model_clean(records: &[Rec], segments: &[(i64, i64)], now: i64, subkey_mode: bool) -> Vec<Rec> {
    let active_base = segments.last().unwrap().0;
    let cleaned: Vec<&Rec> = records.iter().filter(|r| r.offset < active_base).collect();
    let last_append_of = |offset: i64| segments.iter().rev().find(|s| s.0 <= offset).unwrap().1;
    records
        .iter()
        .filter(|r| {
            if r.offset >= active_base {
                return true;
            }
            let sub = subkey_of(r, subkey_mode);
            let superseded =
                cleaned.iter().any(|o| o.offset > r.offset && o.key == r.key && subkey_of(o, subkey_mode) == sub);
            let deleted_with_key = subkey_mode
                && sub.is_some()
                && cleaned.iter().any(|o| {
                    o.offset > r.offset && o.key == r.key && o.value.is_none() && subkey_of(o, true).is_none()
                });
            let expired = r.key.is_some() && r.value.is_none() && last_append_of(r.offset) < now - DELETE_RETENTION_MS;
            !(superseded || deleted_with_key || expired)
        })
        .cloned()
        .collect()
}

/// (base offset, broker time of the segment's last append) from the appends made:
/// (batch base offset, clock at its append). A segment nothing was appended to is young.
fn segment_last_appends(bases: &[i64], appends: &[(i64, i64)]) -> Vec<(i64, i64)> {
    bases
        .iter()
        .enumerate()
        .map(|(i, &base)| {
            let next = bases.get(i + 1).copied().unwrap_or(i64::MAX);
            let last = appends.iter().filter(|a| a.0 >= base && a.0 < next).map(|a| a.1).max();
            (base, last.unwrap_or(i64::MAX))
        })
        .collect()
}

fn bases_real(p: &Partition) -> Vec<i64> {
    segment_files(p.dir()).into_iter().map(|s| s.0).collect()
}

fn all_records(p: &Partition) -> Vec<Rec> {
    records_of(&read_all(p, p.log_start_offset()))
}

fn compacted_topic(log: &Log, subkey: bool, extra: &[(&str, &str)]) -> Arc<Partition> {
    let retention = DELETE_RETENTION_MS.to_string();
    let mut config = vec![
        ("cleanup.policy", "compact"),
        ("segment.bytes", "1024"),
        ("delete.retention.ms", retention.as_str()),
        ("min.compaction.lag.ms", "0"),
    ];
    if subkey {
        config.push(("kappa.compaction.subkey.header", SUB));
    }
    config.extend_from_slice(extra);
    log.create_topic("t", 1, &overrides(&config)).unwrap();
    log.partition("t", 0).unwrap()
}

/// (key, sub-key, tombstone) of a random record.
type Spec = (u8, Option<u8>, bool);

fn build(specs: &[Spec], ts: i64, codec: Compression, tag: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new().compression(codec);
    for (i, &(key, sub, tombstone)) in specs.iter().enumerate() {
        let value = format!("v{tag}-{i}");
        let mut r = NewRecord::new(Some(format!("k{key}").as_bytes()), (!tombstone).then_some(value.as_bytes()), ts);
        if let Some(s) = sub {
            r = r.header(SUB, Some(format!("s{s}").as_bytes()));
        }
        b.push(r);
    }
    b.build()
}

const CODECS: [Compression; 5] =
    [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

/// A batch's record timestamp given the broker's clock: current, replayed from long ago,
/// or missing (-1). None lies in the future: `min.compaction.lag.ms` would hold such a
/// segment back, which this model does not follow.
fn stamp(kind: usize, now: i64) -> i64 {
    match kind {
        0 => now,
        1 => now - 3 * DELETE_RETENTION_MS,
        _ => -1,
    }
}

/// The file time of every segment, in ms: what a reopened partition ages them from.
fn segment_file_times(dir: &Path, bases: &[i64]) -> Vec<(i64, i64)> {
    bases
        .iter()
        .map(|&base| {
            let path = dir.join("topics/t/0").join(kappa_log::segment::log_file_name(base));
            let modified = std::fs::metadata(path).unwrap().modified().unwrap();
            (base, modified.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
        })
        .collect()
}

fn run(subkey_mode: bool, batches: Vec<(Vec<Spec>, i64, usize, usize)>, final_advance: i64) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, subkey_mode, &[]);
    let mut appends = Vec::new();
    for (i, (mut specs, advance, codec, stamp_kind)) in batches.into_iter().enumerate() {
        if !subkey_mode {
            specs.iter_mut().for_each(|s| s.1 = None);
        }
        clock.advance(advance);
        let batch = build(&specs, stamp(stamp_kind, now(&clock)), CODECS[codec], i);
        appends.push((p.append(batch).unwrap().base_offset, now(&clock)));
    }
    clock.advance(final_advance);
    let before = all_records(&p);
    let bases = bases_real(&p);
    let expected = model_clean(&before, &segment_last_appends(&bases, &appends), now(&clock), subkey_mode);
    let active_bytes_before = std::fs::read(p.dir().join(kappa_log::segment::log_file_name(*bases.last().unwrap())));

    let outcome = p.compact(true).unwrap();
    if bases.len() == 1 {
        assert!(outcome.is_none(), "nothing closed, nothing to clean");
    } else {
        let outcome = outcome.expect("a forced pass over closed segments runs");
        assert_eq!(outcome.cleaned_up_to, *bases.last().unwrap());
        assert_eq!(outcome.segments_cleaned, bases.len() - 1);
        assert_eq!(outcome.records_removed as usize, before.len() - expected.len());
    }
    // headers() inside read_all validates every batch a consumer from 0 would get.
    let after = all_records(&p);
    assert_eq!(after, expected);
    assert_eq!(bases_real(&p), bases, "segments keep their base offsets");
    assert_eq!(p.log_end_offset(), before.last().map_or(0, |r| r.offset + 1));
    assert_eq!(
        std::fs::read(p.dir().join(kappa_log::segment::log_file_name(*bases.last().unwrap()))).ok(),
        active_bytes_before.ok(),
        "the active segment is untouched"
    );
    // Nothing new is dirty: a second pass does nothing.
    assert!(p.compact(true).unwrap().is_none());
    assert_eq!(all_records(&p), expected);

    // Clean restart, then a pass over the already-cleaned log is the model applied again,
    // with segments aging from their file times now.
    log.close().unwrap();
    drop(p);
    drop(log);
    let file_times = segment_file_times(dir.path(), &bases);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(all_records(&p), expected);
    let again = model_clean(&expected, &file_times, now(&clock), subkey_mode);
    p.compact(true).unwrap();
    assert_eq!(all_records(&p), again);
    // Unclean restart.
    drop(p);
    drop(log);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(all_records(&p), again);
}

fn spec(subkeys: bool) -> impl Strategy<Value = Spec> {
    let sub = if subkeys { proptest::option::weighted(0.7, 0u8..3).boxed() } else { Just(None).boxed() };
    (0u8..4, sub, proptest::bool::weighted(0.2))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(30, 1000)))]

    #[test]
    fn compaction_matches_the_model(
        batches in proptest::collection::vec(
            (proptest::collection::vec(spec(false), 1..5), 0i64..300, 0usize..5, 0usize..3), 1..70),
        final_advance in prop_oneof![Just(0i64), Just(DELETE_RETENTION_MS), Just(1_000_000)],
    ) {
        run(false, batches, final_advance);
    }

    #[test]
    fn subkey_compaction_matches_the_model(
        batches in proptest::collection::vec(
            (proptest::collection::vec(spec(true), 1..5), 0i64..300, 0usize..5, 0usize..3), 1..70),
        final_advance in prop_oneof![Just(0i64), Just(DELETE_RETENTION_MS), Just(1_000_000)],
    ) {
        run(true, batches, final_advance);
    }
}

fn keyed(key: &str, value: Option<&str>, ts: i64) -> Vec<u8> {
    BatchBuilder::new().record(NewRecord::new(Some(key.as_bytes()), value.map(str::as_bytes), ts)).build()
}

/// Appends distinct-key filler until the partition has rolled `segments` more times.
fn roll(p: &Partition, segments: usize, ts: i64) {
    let target = p.segment_count() + segments;
    let mut i = 0;
    while p.segment_count() < target {
        p.append(keyed(&format!("filler-{}-{i}", p.log_end_offset()), Some("x"), ts)).unwrap();
        i += 1;
    }
}

fn values_of(p: &Partition, key: &str) -> Vec<Option<Vec<u8>>> {
    all_records(p).into_iter().filter(|r| r.key.as_deref() == Some(key.as_bytes())).map(|r| r.value).collect()
}

#[test]
fn min_compaction_lag_protects_young_segments() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[("min.compaction.lag.ms", "60000")]);
    p.append(keyed("old", Some("1"), T0)).unwrap();
    p.append(keyed("old", Some("2"), T0)).unwrap();
    roll(&p, 2, T0);
    clock.advance(100_000);
    // The active segment (holding one old filler record) becomes young with the next append.
    let young_base = *bases_real(&p).last().unwrap();
    p.append(keyed("young", Some("1"), now(&clock))).unwrap();
    p.append(keyed("young", Some("2"), now(&clock))).unwrap();
    roll(&p, 2, now(&clock));
    let outcome = p.compact(true).unwrap().unwrap();
    assert_eq!(outcome.cleaned_up_to, young_base, "only segments older than the lag are cleaned");
    assert_eq!(values_of(&p, "old"), vec![Some(b"2".to_vec())]);
    assert_eq!(values_of(&p, "young"), vec![Some(b"1".to_vec()), Some(b"2".to_vec())], "young records untouched");
    // Once old enough, they are cleaned too.
    clock.advance(100_000);
    p.compact(true).unwrap().unwrap();
    assert_eq!(values_of(&p, "young"), vec![Some(b"2".to_vec())]);
}

#[test]
fn min_cleanable_dirty_ratio_gates_unforced_passes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[("min.cleanable.dirty.ratio", "0.5")]);
    p.append(keyed("k", Some("1"), T0)).unwrap();
    p.append(keyed("k", Some("2"), T0)).unwrap();
    roll(&p, 8, T0);
    assert_eq!(p.compaction_status().dirty_ratio, 1.0);
    assert!(p.compact(false).unwrap().is_some(), "all dirty: an unforced pass runs");
    assert_eq!(values_of(&p, "k"), vec![Some(b"2".to_vec())]);
    p.append(keyed("k", Some("3"), T0)).unwrap();
    roll(&p, 1, T0);
    let status = p.compaction_status();
    assert!(status.dirty_ratio > 0.0 && status.dirty_ratio < 0.5, "{status:?}");
    assert!(p.compact(false).unwrap().is_none(), "below the ratio nothing runs");
    assert_eq!(values_of(&p, "k").len(), 2);
    assert!(p.compact(true).unwrap().is_some(), "forced runs anyway");
    assert_eq!(values_of(&p, "k"), vec![Some(b"3".to_vec())]);
    assert_eq!(p.compaction_status().dirty_bytes, 0);
}

#[test]
fn tombstones_are_kept_for_delete_retention_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[]);
    p.append(keyed("k", Some("1"), T0)).unwrap();
    p.append(keyed("k", None, T0)).unwrap();
    roll(&p, 2, T0);
    let outcome = p.compact(true).unwrap().unwrap();
    assert_eq!(outcome.tombstones_removed, 0);
    assert_eq!(values_of(&p, "k"), vec![None], "the tombstone stays so consumers see the delete");
    clock.advance(DELETE_RETENTION_MS - 1);
    roll(&p, 1, now(&clock));
    p.compact(true).unwrap().unwrap();
    assert_eq!(values_of(&p, "k"), vec![None], "not yet past delete.retention.ms");
    clock.advance(2);
    roll(&p, 1, now(&clock));
    let outcome = p.compact(true).unwrap().unwrap();
    assert_eq!(outcome.tombstones_removed, 1);
    assert!(values_of(&p, "k").is_empty(), "expired tombstone removed");
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

fn sim_log(fs: &SimFs, clock: &ManualClock) -> Log {
    // The data directory exists before the broker starts (its parent entry is durable).
    kappa_log::io::Storage::create_dir_all(fs, Path::new("/data")).unwrap();
    kappa_log::io::Storage::sync_dir(fs, Path::new("/")).unwrap();
    sim_open(fs, clock)
}

/// A delete replayed with an old CreateTime (a migration, a view rebuilt from old inputs)
/// reaches consumers for delete.retention.ms of broker time after its append, not zero.
#[test]
fn a_tombstone_with_an_old_timestamp_is_kept_for_delete_retention_after_its_append() {
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let log = sim_log(&fs, &clock);
    let retention = DAY_MS.to_string();
    let p = compacted_topic(&log, false, &[("delete.retention.ms", retention.as_str())]);
    let old = T0 - 2 * DAY_MS;
    p.append(keyed("k", Some("1"), old)).unwrap();
    p.append(keyed("k", None, old)).unwrap();
    roll(&p, 1, old);
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(outcome.tombstones_removed, 0);
    assert_eq!(values_of(&p, "k"), vec![None], "appended just now: the delete must stay visible");

    clock.advance(DAY_MS + 1);
    roll(&p, 1, old); // something dirty, so the pass runs
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(outcome.tombstones_removed, 1);
    assert!(values_of(&p, "k").is_empty(), "a day of broker time after its append it goes");
}

/// On real files a cleaned segment keeps its original's modification time, from which its
/// age is read after a restart: cleaning passes between restarts must not make its
/// tombstones look freshly written, for ever.
#[test]
fn a_cleaned_segment_keeps_its_append_time_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[]);
    p.append(keyed("k", Some("1"), T0)).unwrap();
    p.append(keyed("k", None, T0)).unwrap();
    roll(&p, 1, T0);
    p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(values_of(&p, "k"), vec![None], "young: the delete stays");
    log.close().unwrap();
    drop((p, log));

    clock.advance(DELETE_RETENTION_MS + 1);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    roll(&p, 1, now(&clock));
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(outcome.tombstones_removed, 1, "appended delete.retention.ms ago (the cleaning does not count)");
    assert!(values_of(&p, "k").is_empty());
}

/// After a restart without file times (SimFs keeps none), a segment ages from the open:
/// the broker's downtime does not count as time consumers had to see a delete.
#[test]
fn a_tombstone_without_a_known_append_time_ages_from_the_open() {
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let log = sim_log(&fs, &clock);
    let p = compacted_topic(&log, false, &[]);
    p.append(keyed("k", Some("1"), T0)).unwrap();
    p.append(keyed("k", None, T0)).unwrap();
    roll(&p, 1, T0);
    log.close().unwrap();
    drop((p, log));

    clock.advance(2 * DELETE_RETENTION_MS);
    let log = sim_open(&fs, &clock);
    let p = log.partition("t", 0).unwrap();
    p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(values_of(&p, "k"), vec![None], "unknown age: counted from the open");

    clock.advance(DELETE_RETENTION_MS + 1);
    roll(&p, 1, now(&clock));
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(outcome.tombstones_removed, 1);
    assert!(values_of(&p, "k").is_empty());
}

#[test]
fn aborted_records_go_committed_records_and_markers_stay() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[]);
    let txn = |pid: i64, seq: i32, key: &str, value: &str| {
        BatchBuilder::new()
            .producer(pid, 0, seq)
            .transactional(true)
            .record(NewRecord::new(Some(key.as_bytes()), Some(value.as_bytes()), T0))
            .build()
    };
    p.append(keyed("a", Some("committed-before"), T0)).unwrap();
    p.append(txn(1, 0, "a", "aborted")).unwrap();
    p.append(txn(1, 1, "x", "aborted-only")).unwrap();
    p.append(txn(2, 0, "b", "committed")).unwrap();
    p.append(BatchBuilder::control_marker(1, 0, ControlType::Abort, 0, T0).build()).unwrap();
    p.append(BatchBuilder::control_marker(2, 0, ControlType::Commit, 0, T0).build()).unwrap();
    roll(&p, 2, T0);
    p.compact(true).unwrap().unwrap();
    let all = read_all(&p, 0);
    let controls = headers(&all).iter().filter(|h| h.is_control()).count();
    assert_eq!(controls, 2, "markers are kept");
    assert_eq!(values_of(&p, "b"), vec![Some(b"committed".to_vec())]);
    assert!(values_of(&p, "x").is_empty(), "aborted records are removed");
    // An aborted write never happened: it must not shadow the committed value before it.
    assert_eq!(values_of(&p, "a"), vec![Some(b"committed-before".to_vec())]);
    let committed = p.read(0, 1 << 20, Isolation::ReadCommitted).unwrap();
    let seen: Vec<Vec<u8>> = records_of(&committed.records)
        .into_iter()
        .filter(|r| !r.key.as_ref().is_some_and(|k| k.starts_with(b"filler")))
        .filter_map(|r| r.value)
        .collect();
    assert_eq!(seen, vec![b"committed-before".to_vec(), b"committed".to_vec()], "read_committed after cleaning");
}

#[test]
fn compressed_batches_are_compacted_record_by_record() {
    for codec in [Compression::Gzip, Compression::Zstd] {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let log = open(dir.path(), &clock);
        let p = compacted_topic(&log, false, &[]);
        for round in 0..3 {
            let mut b = BatchBuilder::new().compression(codec);
            for k in 0..6 {
                if k % 3 != round {
                    b.push(NewRecord::new(Some(format!("k{k}").as_bytes()), Some(format!("r{round}").as_bytes()), T0));
                }
            }
            p.append(b.build()).unwrap();
        }
        roll(&p, 2, T0);
        p.compact(true).unwrap().unwrap();
        let all = read_all(&p, 0);
        let hs = headers(&all);
        // Round 0's records are all superseded, so its batch is gone; the other two remain.
        assert_eq!(hs[0].base_offset, 4, "an emptied batch disappears");
        assert!(hs[..2].iter().all(|h| h.compression().unwrap() == codec), "batches keep their codec");
        for k in 0..6 {
            let last_round = (0..3).rev().find(|r| k % 3 != *r).unwrap();
            assert_eq!(values_of(&p, &format!("k{k}")), vec![Some(format!("r{last_round}").into_bytes())]);
        }
    }
}

#[test]
fn deleting_a_channel_removes_all_its_older_content() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    log.create_topic(
        "channels",
        1,
        &overrides(&[
            ("cleanup.policy", "compact"),
            ("segment.bytes", "1024"),
            ("delete.retention.ms", "10000"),
            ("kappa.compaction.subkey.header", "contentId"),
        ]),
    )
    .unwrap();
    let p = log.partition("channels", 0).unwrap();
    let item = |channel: &str, content: &str, value: Option<&str>| {
        BatchBuilder::new()
            .record(
                NewRecord::new(Some(channel.as_bytes()), value.map(str::as_bytes), T0)
                    .header("contentId", Some(content.as_bytes())),
            )
            .build()
    };
    for content in ["i1", "i2", "i3"] {
        p.append(item("c1", content, Some(content))).unwrap();
        p.append(item("c2", content, Some(content))).unwrap();
    }
    p.append(item("c1", "i1", Some("i1-v2"))).unwrap();
    p.append(item("c1", "i2", None)).unwrap(); // remove one item
    p.append(keyed("c1", Some("channel metadata"), T0)).unwrap();
    let delete_offset = p.append(keyed("c1", None, T0)).unwrap().base_offset; // delete the channel
    p.append(item("c1", "i4", Some("after the delete"))).unwrap();
    roll(&p, 2, T0);

    // Before the tombstones expire: the delete is visible, nothing older of c1 is.
    p.compact(true).unwrap().unwrap();
    let c1: Vec<Rec> = all_records(&p).into_iter().filter(|r| r.key.as_deref() == Some(b"c1")).collect();
    assert_eq!(c1.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![delete_offset, delete_offset + 1]);
    assert_eq!(c1[0].value, None);

    clock.advance(20_000);
    roll(&p, 1, now(&clock));
    p.compact(true).unwrap().unwrap();
    let all = all_records(&p);
    let c1: Vec<&Rec> = all.iter().filter(|r| r.key.as_deref() == Some(b"c1")).collect();
    assert_eq!(c1.len(), 1, "only the item written after the delete remains: {c1:?}");
    assert_eq!(c1[0].value.as_deref(), Some(&b"after the delete"[..]));
    let c2: Vec<&Rec> = all.iter().filter(|r| r.key.as_deref() == Some(b"c2")).collect();
    assert_eq!(c2.len(), 3, "another channel is untouched");
}

// ---- crash safety on SimFs ----

fn sim_open(fs: &SimFs, clock: &ManualClock) -> Log {
    Log::open(Path::new("/data"), options(Arc::new(fs.clone()), clock)).expect("open after crash").0
}

fn sim_bases(fs: &SimFs) -> Vec<i64> {
    let mut bases: Vec<i64> = fs
        .files()
        .keys()
        .filter(|p| p.starts_with("/data/topics/t/0"))
        .filter_map(|p| kappa_log::segment::parse_log_file_name(p.file_name()?.to_str()?))
        .collect();
    bases.sort_unstable();
    bases
}

/// A compacted log on SimFs with duplicates and sub-keys across 4+ segments.
fn sim_setup(clock: &ManualClock) -> (SimFs, Log, Arc<Partition>) {
    let fs = SimFs::new();
    // The data directory exists before the broker starts (its parent entry is durable).
    kappa_log::io::Storage::create_dir_all(&fs, Path::new("/data")).unwrap();
    kappa_log::io::Storage::sync_dir(&fs, Path::new("/")).unwrap();
    let log = sim_open(&fs, clock);
    let p = compacted_topic(&log, true, &[]);
    for i in 0..60u8 {
        let specs = [(i % 5, Some(i % 3), i % 11 == 0), ((i % 7) % 5, None, i % 13 == 0)];
        p.append(build(&specs, T0, CODECS[usize::from(i % 5)], usize::from(i))).unwrap();
    }
    assert!(p.segment_count() >= 4);
    (fs, log, p)
}

#[test]
fn a_crash_at_any_point_of_compaction_leaves_the_old_or_the_cleaned_segment() {
    let clock = ManualClock::new(T0);
    // Count the compaction's mutating operations, and what it produces.
    let (fs, log, p) = sim_setup(&clock);
    let before = all_records(&p);
    let bases = sim_bases(&fs);
    // Everything was appended at T0, and after a crash SimFs (no file times) ages segments
    // from the reopening, also T0: no tombstone expires.
    let segments: Vec<(i64, i64)> = bases.iter().map(|&b| (b, T0)).collect();
    let cleaned = model_clean(&before, &segments, now(&clock), true);
    let ops_before = fs.stats().ops;
    p.compact(true).unwrap().unwrap();
    let ops = fs.stats().ops - ops_before;
    assert_eq!(all_records(&p), cleaned);
    assert!(ops > 10, "{ops}");
    drop((p, log));

    let in_segment = |recs: &[Rec], i: usize| -> Vec<Rec> {
        let next = bases.get(i + 1).copied().unwrap_or(i64::MAX);
        recs.iter().filter(|r| r.offset >= bases[i] && r.offset < next).cloned().collect()
    };
    let mut saw_old = false;
    let mut saw_new = false;
    for n in 0..=ops {
        let (fs, log, p) = sim_setup(&clock);
        fs.kill_after_ops(Some(n));
        let result = p.compact(true);
        assert!(n >= ops || result.is_err(), "a pass cut short at op {n} reports failure");
        drop((p, log));
        fs.crash(n);
        let log = sim_open(&fs, &clock);
        let p = log.partition("t", 0).unwrap();
        let after = all_records(&p);
        assert_eq!(p.log_end_offset(), before.last().unwrap().offset + 1, "op {n}");
        for (i, base) in bases.iter().enumerate() {
            let got = in_segment(&after, i);
            let old = in_segment(&before, i);
            let new = in_segment(&cleaned, i);
            assert!(got == old || got == new, "op {n}, segment {base}: neither old nor cleaned: {got:?}");
            saw_old |= got == old && old != new;
            saw_new |= got == new && old != new;
        }
        // The latest value of every compaction key is always readable.
        for latest in &cleaned {
            assert!(after.contains(latest), "op {n}: lost {latest:?}");
        }
        // And the recovered log can be cleaned to the same result.
        p.compact(true).unwrap();
        assert_eq!(all_records(&p), cleaned, "op {n}");
    }
    assert!(saw_old && saw_new, "the crash points cover both outcomes");
}

// ---- failures ----

/// A compacted topic with `partitions` partitions on SimFs, each holding overwritten keys
/// in closed segments.
fn sim_dirty_topic(partitions: i32) -> (SimFs, Log) {
    let fs = SimFs::new();
    let clock = ManualClock::new(T0);
    let log = Log::open(Path::new("/data"), options(Arc::new(fs.clone()), &clock)).unwrap().0;
    let config = [("cleanup.policy", "compact"), ("segment.bytes", "1024"), ("min.compaction.lag.ms", "0")];
    log.create_topic("t", partitions, &overrides(&config)).unwrap();
    for index in 0..partitions {
        let p = log.partition("t", index).unwrap();
        p.append(keyed("key", Some("1"), T0)).unwrap();
        p.append(keyed("key", Some("2"), T0)).unwrap();
        roll(&p, 2, T0);
    }
    (fs, log)
}

#[test]
fn a_failed_directory_fsync_while_compacting_poisons_the_directory() {
    let (fs, log) = sim_dirty_topic(1);
    let p = log.partition("t", 0).unwrap();
    fs.fail_sync_dir(Some(kappa_log::io::sim::Trigger::Nth(1)));
    assert!(p.compact(true).is_err(), "the pass reports the failed fsync");
    fs.fail_sync_dir(None);
    let err = p.append(keyed("key", Some("3"), T0)).expect_err("an fsync failed: no append is acknowledged");
    assert!(matches!(err, kappa_log::LogError::Poisoned { .. }), "{err}");
}

#[test]
fn a_partition_whose_compaction_fails_does_not_stop_the_next_ones() {
    let (fs, log) = sim_dirty_topic(2);
    // The first fsync of the pass is the cleaned copy of partition 0's first segment.
    fs.fail_sync_data(Some(kappa_log::io::sim::Trigger::Nth(1)));
    assert!(log.compact().is_err(), "partition 0's failure is reported");
    assert_eq!(values_of(&log.partition("t", 0).unwrap(), "key").len(), 2, "partition 0 was not cleaned");
    assert_eq!(
        values_of(&log.partition("t", 1).unwrap(), "key"),
        vec![Some(b"2".to_vec())],
        "partition 1 was cleaned all the same"
    );
}

#[test]
fn offset_for_timestamp_finds_a_later_batch_when_compaction_removed_the_match() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, false, &[]);
    let first = BatchBuilder::new()
        .record(NewRecord::new(Some(b"a"), Some(b"1"), T0))
        .record(NewRecord::new(Some(b"b"), Some(b"1"), T0 + 100))
        .build();
    p.append(first).unwrap();
    p.append(keyed("b", Some("2"), T0 + 200)).unwrap();
    roll(&p, 1, T0);
    clock.advance(1_000); // past min.compaction.lag.ms (0) for the records at T0+200
    p.compact(true).unwrap().expect("a cleaning pass ran");
    assert_eq!(values_of(&p, "b"), vec![Some(b"2".to_vec())], "b@T0+100 was cleaned away");
    assert_eq!(p.offset_for_timestamp(T0 + 50, Isolation::ReadUncommitted).unwrap(), Some((2, T0 + 200)));
}

#[test]
fn a_compaction_failing_on_a_full_disk_leaves_no_cleaned_file_behind() {
    let (fs, log) = sim_dirty_topic(1);
    let p = log.partition("t", 0).unwrap();
    let cleaned_files = || fs.files().into_keys().filter(|path| path.to_string_lossy().ends_with(".cleaned")).count();
    // Room for the cleaned copy to start, not to finish: the write fails with ENOSPC.
    fs.set_capacity(Some(fs.used_bytes() + 10));
    let err = p.compact(true).expect_err("the disk is full");
    assert!(err.to_string().contains("No space left") || err.to_string().contains("28"), "{err}");
    assert_eq!(cleaned_files(), 0, "the partial cleaned copy is removed, freeing its space");
    fs.set_capacity(None);
    p.compact(true).unwrap().expect("with room again, the pass runs");
    assert_eq!(values_of(&p, "key"), vec![Some(b"2".to_vec())]);
    assert_eq!(cleaned_files(), 0);
}

/// A log whose key map has room for three one-byte keys (65 bytes each as counted: the fourth
/// fills it), and one closed segment of a=1 b=1 a=2 c=1 d=1 b=2 a=(tombstone) at offsets 0-6.
fn seven_keyed_writes_under_a_map_for_three_keys(
    dir: &std::path::Path,
    clock: &ManualClock,
) -> (Log, Arc<kappa_log::Partition>) {
    let tiny =
        kappa_log::LogOptions { compaction_map_bytes_max: 200, ..options(Arc::new(kappa_log::io::RealFs), clock) };
    let log = Log::open(dir, tiny).unwrap().0;
    let p = compacted_topic(&log, false, &[]);
    let writes = [("a", Some("1")), ("b", Some("1")), ("a", Some("2")), ("c", Some("1")), ("d", Some("1"))];
    for (key, value) in writes.into_iter().chain([("b", Some("2")), ("a", None)]) {
        p.append(keyed(key, value, T0)).unwrap();
    }
    roll(&p, 1, T0);
    (log, p)
}

#[test]
fn a_full_key_map_stops_mid_segment_and_the_pass_cleans_only_what_it_observed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (log, p) = seven_keyed_writes_under_a_map_for_three_keys(dir.path(), &clock);
    assert_eq!(p.segment_count(), 2, "everything above is in one closed segment");
    clock.advance(2 * DELETE_RETENTION_MS); // tombstones of observed records may expire
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(outcome.cleaned_up_to, 5, "the map filled with d (offset 4), mid-segment");
    assert_eq!(values_of(&p, "a"), vec![Some(b"2".to_vec()), None], "a=1 was superseded within the map");
    assert_eq!(
        values_of(&p, "b"),
        vec![Some(b"1".to_vec()), Some(b"2".to_vec())],
        "b=2 lies past the map: b=1 stays this pass"
    );
    // The tombstone past the map must not expire while a=2 (which it deletes) is kept.
    drop(log);
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    p.compact(true).unwrap().expect("a pass ran");
    // With room for every key the pass cleans the rest: a=2 goes, then its expired tombstone.
    assert_eq!(values_of(&p, "a"), Vec::<Option<Vec<u8>>>::new());
    assert_eq!(values_of(&p, "b"), vec![Some(b"2".to_vec())]);
    assert_eq!(values_of(&p, "d"), vec![Some(b"1".to_vec())]);
}

#[test]
fn after_a_pass_stops_at_a_full_key_map_the_rest_is_dirty_and_the_next_pass_cleans_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (_log, p) = seven_keyed_writes_under_a_map_for_three_keys(dir.path(), &clock);
    assert_eq!(p.segment_count(), 2, "everything above is in one closed segment, the last cleanable one");
    clock.advance(2 * DELETE_RETENTION_MS);
    let first = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(first.cleaned_up_to, 5, "the map filled with d (offset 4), mid-segment");
    let status = p.compaction_status();
    assert!(status.dirty_bytes > 0, "offsets 5 and 6 were not cleaned: {status:?}");
    assert!(p.compact(false).unwrap().is_some(), "the unread tail makes the log dirty enough for a pass");
    // Each pass, with the same small map, observes from where the last one stopped (b, a,
    // then the fillers that rolled the segment): a map's worth further every time.
    let mut cleaned_up_to = p.compaction_status().cleaned_up_to;
    assert!(cleaned_up_to > 5, "the second pass went past the first: {cleaned_up_to}");
    let mut passes = 2;
    while let Some(outcome) = p.compact(true).unwrap() {
        assert!(outcome.cleaned_up_to > cleaned_up_to, "pass {passes} made no progress: {outcome:?}");
        cleaned_up_to = outcome.cleaned_up_to;
        passes += 1;
        assert!(passes < 10, "the passes never finished: {outcome:?}");
    }
    assert_eq!(cleaned_up_to, p.log_end_offset() - 1, "clean up to the active segment (one filler in it)");
    assert_eq!(p.compaction_status().dirty_bytes, 0);
    assert_eq!(values_of(&p, "a"), Vec::<Option<Vec<u8>>>::new(), "a=2 superseded, then its tombstone expired");
    assert_eq!(values_of(&p, "b"), vec![Some(b"2".to_vec())]);
    assert_eq!(values_of(&p, "c"), vec![Some(b"1".to_vec())]);
    assert_eq!(values_of(&p, "d"), vec![Some(b"1".to_vec())]);
}

#[test]
fn dropping_the_subkey_header_makes_the_next_pass_read_the_whole_log_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let log = open(dir.path(), &clock);
    let p = compacted_topic(&log, true, &[]);
    // (k, s0) and (k, s1) are different compaction keys: both survive a pass.
    p.append(build(&[(0, Some(0), false), (0, Some(1), false)], T0, Compression::None, 0)).unwrap();
    roll(&p, 1, T0);
    p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(values_of(&p, "k0").len(), 2);
    log.alter_topic_config("t", &[(kappa_log::config::COMPACTION_SUBKEY_HEADER.to_owned(), None)].into()).unwrap();
    roll(&p, 1, T0);
    p.compact(true).unwrap().expect("a pass ran");
    // Now both are key k0: the older went, though it lay in the range cleaned before.
    assert_eq!(values_of(&p, "k0"), vec![Some(b"v0-1".to_vec())]);
}

/// A compacted log cleaned once: a=1 a=2 in one closed segment, then fillers.
fn cleaned_once(dir: &Path, clock: &ManualClock, subkey: bool) -> (Log, Arc<Partition>, i64) {
    let log = open(dir, clock);
    let p = compacted_topic(&log, subkey, &[]);
    p.append(keyed("a", Some("1"), T0)).unwrap();
    p.append(keyed("a", Some("2"), T0)).unwrap();
    roll(&p, 2, T0);
    let outcome = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(values_of(&p, "a"), vec![Some(b"2".to_vec())]);
    assert_eq!(p.compaction_status().dirty_bytes, 0);
    (log, p, outcome.cleaned_up_to)
}

#[test]
fn how_far_the_log_is_clean_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (log, p, cleaned_up_to) = cleaned_once(dir.path(), &clock, false);
    drop(p);
    log.close().unwrap();

    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    let status = p.compaction_status();
    assert_eq!(status.cleaned_up_to, cleaned_up_to, "{status:?}");
    assert_eq!(status.dirty_bytes, 0, "the segments cleaned before the restart are not dirty again");
    assert!(p.compact(false).unwrap().is_none(), "no pass rewrites them");

    // A damaged record of it is no reason to refuse the partition: it reads as nothing clean.
    drop(p);
    log.close().unwrap();
    std::fs::write(dir.path().join("topics/t/0/cleaned-up-to.offset"), b"garbage").unwrap();
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    let status = p.compaction_status();
    assert_eq!(status.dirty_bytes, status.cleanable_bytes, "everything is dirty again: {status:?}");
    assert!(!dir.path().join(PREFIX_FILE).exists(), "and the damaged file is gone");
    assert!(p.compact(false).unwrap().is_some(), "and a pass reads it all");
    assert_eq!(values_of(&p, "a"), vec![Some(b"2".to_vec())]);
}

const PREFIX_FILE: &str = "topics/t/0/cleaned-up-to.offset";

/// The partition's compaction status right after opening the log again.
fn status_after_reopen(dir: &Path, clock: &ManualClock) -> kappa_log::compaction::CompactionStatus {
    open(dir, clock).partition("t", 0).unwrap().compaction_status()
}

/// A clean prefix is a claim the cleaner trusts (records there are their keys' latest), so
/// a file that may no longer be true is dropped: never a deleted key brought back.
#[test]
fn a_clean_prefix_of_another_topic_incarnation_or_past_the_log_end_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (log, p, _) = cleaned_once(dir.path(), &clock, false);
    drop(p);
    log.close().unwrap();
    let status = status_after_reopen(dir.path(), &clock);
    assert!(status.cleanable_bytes > 0 && status.dirty_bytes == 0, "the prefix holds as written: {status:?}");

    // Written for an earlier topic of the same name (a pass still running on it while it
    // was deleted and created again): the topic id differs.
    std::fs::write(dir.path().join("topics/t/topic.id"), [9u8; 16]).unwrap();
    let status = status_after_reopen(dir.path(), &clock);
    assert_eq!(status.dirty_bytes, status.cleanable_bytes, "another incarnation's prefix counts: {status:?}");
    assert!(!dir.path().join(PREFIX_FILE).exists(), "and stays for a later open");

    // Past the log end: the segments it covered are gone (only the first one is left).
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    p.compact(true).unwrap().expect("a pass ran");
    drop(p);
    log.close().unwrap();
    let segments = segment_files(&dir.path().join("topics/t/0"));
    assert!(segments.len() >= 3, "{segments:?}");
    for entry in std::fs::read_dir(dir.path().join("topics/t/0")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.split('.').next().unwrap().parse::<i64>().is_ok_and(|base| base > segments[0].0) {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let status = status_after_reopen(dir.path(), &clock);
    assert_eq!(status.cleaned_up_to, i64::MIN, "a prefix past the log end counts: {status:?}");
    assert!(!dir.path().join(PREFIX_FILE).exists());
}

#[test]
fn changing_the_subkey_header_makes_the_whole_log_dirty_without_new_writes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let (log, p, _) = cleaned_once(dir.path(), &clock, true);
    let header = kappa_log::config::COMPACTION_SUBKEY_HEADER.to_owned();
    log.alter_topic_config("t", &[(header.clone(), Some("other".to_owned()))].into()).unwrap();
    let status = p.compaction_status();
    assert_eq!(status.dirty_bytes, status.cleanable_bytes, "the prefix was clean under another header: {status:?}");
    assert!(p.compact(false).unwrap().is_some(), "a pass runs without waiting for new records");
    assert_eq!(p.compaction_status().dirty_bytes, 0);

    // The header a prefix was cleaned under is remembered across a restart too.
    drop(p);
    log.close().unwrap();
    let log = open(dir.path(), &clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.compaction_status().dirty_bytes, 0, "cleaned under \"other\", which is still the header");
    log.alter_topic_config("t", &[(header, None)].into()).unwrap();
    assert!(p.compaction_status().dirty_bytes > 0, "by key alone the prefix is not known to be clean");
}

#[test]
fn a_full_key_map_stops_at_the_record_that_filled_it_even_inside_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    // Room for three two-byte keys (66 bytes each as counted): the fourth fills the map.
    let tiny =
        kappa_log::LogOptions { compaction_map_bytes_max: 200, ..options(Arc::new(kappa_log::io::RealFs), &clock) };
    let log = Log::open(dir.path(), tiny).unwrap().0;
    let p = compacted_topic(&log, false, &[]);
    // One batch: k0..k4, then each again (offsets 5..9).
    let specs: Vec<Spec> = (0..10).map(|i| (i % 5, None, false)).collect();
    p.append(build(&specs, T0, Compression::Lz4, 0)).unwrap();
    roll(&p, 1, T0);
    let first = p.compact(true).unwrap().expect("a pass ran");
    assert_eq!(first.cleaned_up_to, 4, "the map filled with k3 (offset 3), inside the batch, not after it");
    let mut passes = 1;
    while p.compact(true).unwrap().is_some() {
        passes += 1;
        assert!(passes < 20, "the passes never finished");
    }
    for key in 0..5 {
        let latest = format!("v0-{}", key + 5).into_bytes();
        assert_eq!(values_of(&p, &format!("k{key}")), vec![Some(latest)], "k{key}: only its latest value");
    }
}
