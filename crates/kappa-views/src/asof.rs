//! Point-in-time answers: a view computed by replaying its inputs from offset 0 up to a
//! position (an offset per input partition) or a timestamp, into memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::{InputRecord, LogBackend};
use crate::error::{EventError, Result, ViewError};
use crate::event::{PayloadCodec, decode_event};
use crate::partitioned::MemoryState;
use crate::runner::{
    CACHE_ENTRIES_MAX, STEP_READ_BYTES, VIEW_VALUE_BYTES_MAX, oversized_change, position_key, value_too_large,
};
use crate::schema::Schemas;
use crate::view::{Applier, ErrorPolicy, View};

/// Keys (view and internal) an as-of replay may hold in memory.
pub const AS_OF_KEYS_MAX: usize = 2_000_000;

/// The point to compute a view at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsOf {
    /// "topic/partition" → the first offset *not* applied, for every input partition.
    Offsets(BTreeMap<String, i64>),
    /// Every event with a timestamp <= this (ms since the epoch), in each partition's
    /// offset order up to the first later event.
    Timestamp(i64),
}

impl AsOf {
    /// Parses `topic/partition=offset,...` or an RFC 3339 time or milliseconds since the epoch.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if text.contains('=') {
            let mut offsets = BTreeMap::new();
            for part in text.split(',') {
                let (key, offset) =
                    part.split_once('=').ok_or_else(|| format!("'{part}' is not topic/partition=offset"))?;
                let (topic, partition) =
                    key.trim().rsplit_once('/').ok_or_else(|| format!("'{key}' is not topic/partition"))?;
                let partition: i32 =
                    partition.parse().map_err(|_| format!("'{partition}' is not a partition number"))?;
                let offset: i64 = offset.trim().parse().map_err(|_| format!("'{offset}' is not an offset"))?;
                offsets.insert(position_key(topic, partition), offset);
            }
            return Ok(Self::Offsets(offsets));
        }
        if let Ok(ms) = text.parse::<i64>() {
            return Ok(Self::Timestamp(ms));
        }
        parse_rfc3339_ms(text).map(Self::Timestamp).ok_or_else(|| {
            format!("'{text}' is neither an RFC 3339 time (2026-11-26T10:00:00Z), milliseconds since the epoch, nor topic/partition=offset,...")
        })
    }
}

/// A view as of a point: its values and the exact input positions replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsOfView {
    pub positions: BTreeMap<String, i64>,
    /// View key → JSON value, in key order.
    pub values: Vec<(String, Vec<u8>)>,
}

/// Err (why) when `offsets` name a partition that is not one of the view's inputs: a typo
/// in a topic name, or a partition past the topic's count, would otherwise be ignored.
fn check_offsets_name_inputs(
    backend: &Arc<dyn LogBackend>,
    view: &View,
    offsets: &BTreeMap<String, i64>,
) -> std::result::Result<(), String> {
    let mut inputs = Vec::new();
    for topic in &view.inputs {
        let count = backend.partition_count(topic).map_err(|e| e.to_string())?;
        inputs.push((topic, count));
    }
    let is_input = |key: &str| {
        let Some((topic, partition)) = key.rsplit_once('/') else { return false };
        let Ok(partition) = partition.parse::<i32>() else { return false };
        inputs.iter().any(|(input, count)| *input == topic && (0..*count).contains(&partition))
    };
    let unknown: Vec<&str> = offsets.keys().map(String::as_str).filter(|key| !is_input(key)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let known: Vec<String> = inputs
        .iter()
        .map(|(topic, count)| match count {
            1 => format!("{topic}/0"),
            _ => format!("{topic}/0 to {topic}/{}", count - 1),
        })
        .collect();
    Err(format!(
        "{} not an input partition of this view (its inputs: {}); give topic/partition=offset for each of them",
        unknown.join(", ") + if unknown.len() == 1 { " is" } else { " are" },
        known.join(", ")
    ))
}

pub(crate) fn replay(
    backend: &Arc<dyn LogBackend>,
    schemas: &Schemas,
    codec: &dyn PayloadCodec,
    view: &View,
    at: &AsOf,
) -> Result<AsOfView> {
    let fail = |reason: String| ViewError::AsOf { view: view.name.clone(), reason };
    let invalid = |reason: String| ViewError::AsOfInvalid { view: view.name.clone(), reason };
    if let AsOf::Offsets(offsets) = at {
        check_offsets_name_inputs(backend, view, offsets).map_err(invalid)?;
    }
    let mut targets = BTreeMap::new();
    for topic in &view.inputs {
        for partition in 0..backend.partition_count(topic)? {
            let key = position_key(topic, partition);
            let found = match at {
                AsOf::Timestamp(ms) => backend.offset_for_timestamp(topic, partition, ms.saturating_add(1))?,
                AsOf::Offsets(_) => None,
            };
            // Read after the lookup: the end only grows, so a found offset is within it.
            let end = backend.end_offset(topic, partition)?;
            let target = match at {
                AsOf::Offsets(offsets) => *offsets.get(&key).ok_or_else(|| {
                    invalid(format!(
                        "no offset given for input partition {key}; give one for each of the view's input partitions"
                    ))
                })?,
                AsOf::Timestamp(_) => found.unwrap_or(end),
            };
            if target < 0 || target > end {
                return Err(invalid(format!(
                    "offset {target} of {key} is outside the partition's committed offsets: give one from 0 to {end} (its end)"
                )));
            }
            let start = backend.start_offset(topic, partition)?;
            if start > 0 && target > 0 {
                return Err(fail(format!(
                    "the history of {key} before offset {start} was deleted by retention or DeleteRecords, so the view cannot be recomputed as of that point"
                )));
            }
            targets.insert(key, (Arc::<str>::from(topic.as_str()), partition, target));
        }
    }
    let compacted = |key: &str, offset: i64| {
        fail(format!(
            "the history of {key} at offset {offset} was compacted (records were removed), so the view cannot be recomputed exactly as of that point"
        ))
    };
    let mut applier = view.logic.applier();
    // What the events before the last failed one (or chunk) made: a failed event may have
    // changed keys before failing, so the applier's cache is discarded and rebuilt over this.
    let mut state = MemoryState::default();
    let commit = |applier: &mut Box<dyn Applier>, state: &mut MemoryState| -> Result<()> {
        for change in applier.take_changes().map_err(|e| fail(e.0))? {
            state.write(change);
        }
        applier.trim(CACHE_ENTRIES_MAX);
        Ok(())
    };
    for (key, (topic, partition, target)) in &targets {
        let mut position = 0;
        while position < *target {
            let chunk = backend.read_committed(topic, *partition, position, STEP_READ_BYTES)?;
            if let Some(missing) = chunk.first_missing.filter(|missing| missing < target) {
                return Err(compacted(key, missing));
            }
            if chunk.next_offset <= position {
                // Nothing readable below the target: compaction removed the records that
                // ended the partition's history (e.g. an expired tombstone and what it deleted).
                return Err(compacted(key, position));
            }
            let records: Vec<_> = chunk.records.into_iter().take_while(|r| r.offset < *target).collect();
            // Records before `clean` are in `state`; those from it on only in the cache.
            let mut clean = 0;
            let apply = |record: &InputRecord, applier: &mut Box<dyn Applier>, state: &MemoryState| {
                decode_event(topic, *partition, record.clone(), codec)
                    .and_then(|event| schemas.upcast(event))
                    .and_then(|event| applier.apply(&event, state))
            };
            // Applies `records` again over `state`, on an empty cache.
            let reapply = |records: &[InputRecord], applier: &mut Box<dyn Applier>, state: &MemoryState| {
                applier.discard();
                for again in records {
                    apply(again, applier, state).map_err(|e| {
                        fail(format!("re-applying {key} offset {} failed ({e}) where it had succeeded: the view's logic is not deterministic", again.offset))
                    })?;
                }
                Ok::<_, ViewError>(())
            };
            // Skips (or stops at) the record at `index`, keeping what those before it did.
            let failed = |index: usize,
                          reason: &str,
                          clean: usize,
                          applier: &mut Box<dyn Applier>,
                          state: &mut MemoryState| {
                if view.on_error == ErrorPolicy::Stop {
                    return Err(fail(format!("replay stopped at {key} offset {}: {reason}", records[index].offset)));
                }
                reapply(&records[clean..index], applier, state)?;
                commit(applier, state)
            };
            let mut next = 0;
            loop {
                for (index, record) in records.iter().enumerate().skip(next) {
                    if let Err(EventError(reason)) = apply(record, &mut applier, &state) {
                        failed(index, &reason, clean, &mut applier, &mut state)?;
                        clean = index + 1;
                    }
                    if applier.cached_entries() + state.view.len() + state.internal.len() > AS_OF_KEYS_MAX {
                        return Err(fail(format!(
                            "the replay holds more than {AS_OF_KEYS_MAX} keys in memory, the fixed limit of an as-of replay (AS_OF_KEYS_MAX); a replay folds every key even when one is asked for, so ask for an earlier point (fewer keys existed then) or read the current view instead"
                        )));
                    }
                }
                let changes = applier.take_changes().map_err(|e| fail(e.0))?;
                if oversized_change(&changes).is_none() {
                    changes.into_iter().for_each(|change| state.write(change));
                    applier.trim(CACHE_ENTRIES_MAX);
                    break;
                }
                // The record after which a value is first too large fails, judged on this
                // chunk's final values: not necessarily the event the runner blamed (see
                // `oversized_change`).
                let (mut fine, mut over) = (0, records.len() - clean);
                while over - fine > 1 {
                    let middle = fine + (over - fine) / 2;
                    reapply(&records[clean..clean + middle], &mut applier, &state)?;
                    let changes = applier.take_changes().map_err(|e| fail(e.0))?;
                    if oversized_change(&changes).is_some() {
                        over = middle;
                    } else {
                        fine = middle;
                    }
                }
                reapply(&records[clean..clean + over], &mut applier, &state)?;
                let changes = applier.take_changes().map_err(|e| fail(e.0))?;
                let Some(change) = oversized_change(&changes) else {
                    return Err(fail(format!(
                        "re-applying {key} offsets {} to {} left no value over {VIEW_VALUE_BYTES_MAX} bytes where applying them had: the view's logic is not deterministic",
                        records[clean].offset,
                        records[clean + over - 1].offset
                    )));
                };
                let reason = value_too_large(change.scope, &change.key, change.value.as_ref().map_or(0, Vec::len));
                let index = clean + over - 1;
                failed(index, &reason.0, clean, &mut applier, &mut state)?;
                (clean, next) = (index + 1, index + 1);
            }
            position = chunk.next_offset;
        }
    }
    let mut values: Vec<(String, Vec<u8>)> = state.view.into_iter().collect();
    values.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(AsOfView { positions: targets.into_iter().map(|(key, (_, _, target))| (key, target)).collect(), values })
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` → ms since the epoch.
pub fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if bytes[13] != b':'
        || bytes[16] != b':'
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = text.get(19..)?;
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        // Bytes, not string slices: the text is a user's and may hold any character here.
        _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') && rest.as_bytes()[3] == b':' => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest.get(1..3)?.parse::<i64>().ok()? * 60 + rest.get(4..6)?.parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) - offset_minutes * 60) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_epoch_milliseconds() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2026-11-26T10:00:00Z"), Some(1_795_687_200_000));
        assert_eq!(parse_rfc3339_ms("2026-11-26T11:00:00.5+01:00"), Some(1_795_687_200_500));
        assert_eq!(parse_rfc3339_ms("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    /// Any text is refused or parsed, never a panic (it comes from URLs and the command line).
    #[test]
    fn rfc3339_parsing_never_panics_on_non_ascii_text() {
        for text in [
            "2026-11-26T10:00:00\u{e9}1234",
            "2026-11-26T10:00:00+\u{e9}:00",
            "2026-11-26T10:00:00+01\u{e9}0",
            "2026-11-26T10:00:0\u{e9}Z1234",
            "2026-11-26T10:00:00.\u{e9}\u{e9}\u{e9}",
            "\u{e9}026-11-26T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_ms(text), None, "{text}");
        }
    }

    #[test]
    fn as_of_parses_offsets_times_and_rejects_garbage() {
        assert_eq!(
            AsOf::parse("channels/0=5, channels/1=7").unwrap(),
            AsOf::Offsets(BTreeMap::from([("channels/0".into(), 5), ("channels/1".into(), 7)]))
        );
        assert_eq!(AsOf::parse("1000").unwrap(), AsOf::Timestamp(1000));
        assert!(AsOf::parse("channels=5").unwrap_err().contains("topic/partition"));
        assert!(AsOf::parse("soon").unwrap_err().contains("RFC 3339"));
    }
}
