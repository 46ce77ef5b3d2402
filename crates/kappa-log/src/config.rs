//! Per-topic configuration: Kafka's topic config names, validated, with defaults, stored
//! as `key=value` lines (only keys that differ from the defaults are written).

use std::collections::BTreeMap;

use crate::error::{LogError, Result};

/// What happens to old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanupPolicy {
    /// Delete whole closed segments past `retention.ms` / `retention.bytes`.
    pub delete: bool,
    /// Keep only the latest record per key (or per key and sub-key).
    pub compact: bool,
}

/// Which timestamp the log stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

/// A topic's validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    pub cleanup_policy: CleanupPolicy,
    /// -1 = keep forever.
    pub retention_ms: i64,
    /// -1 = no size limit. Per partition.
    pub retention_bytes: i64,
    pub segment_bytes: u64,
    pub segment_ms: i64,
    pub min_compaction_lag_ms: i64,
    pub min_cleanable_dirty_ratio: f64,
    pub delete_retention_ms: i64,
    pub max_message_bytes: usize,
    pub message_timestamp_type: TimestampType,
    /// Header whose value refines the compaction key (kappa extension).
    pub compaction_subkey_header: Option<String>,
}

pub const CLEANUP_POLICY: &str = "cleanup.policy";
pub const RETENTION_MS: &str = "retention.ms";
pub const RETENTION_BYTES: &str = "retention.bytes";
pub const SEGMENT_BYTES: &str = "segment.bytes";
pub const SEGMENT_MS: &str = "segment.ms";
pub const MIN_COMPACTION_LAG_MS: &str = "min.compaction.lag.ms";
pub const MIN_CLEANABLE_DIRTY_RATIO: &str = "min.cleanable.dirty.ratio";
pub const DELETE_RETENTION_MS: &str = "delete.retention.ms";
pub const MAX_MESSAGE_BYTES: &str = "max.message.bytes";
pub const MESSAGE_TIMESTAMP_TYPE: &str = "message.timestamp.type";
pub const COMPACTION_SUBKEY_HEADER: &str = "kappa.compaction.subkey.header";

/// Every supported key, in the order `describe` lists them.
pub const KEYS: [&str; 11] = [
    CLEANUP_POLICY,
    RETENTION_MS,
    RETENTION_BYTES,
    SEGMENT_BYTES,
    SEGMENT_MS,
    MIN_COMPACTION_LAG_MS,
    MIN_CLEANABLE_DIRTY_RATIO,
    DELETE_RETENTION_MS,
    MAX_MESSAGE_BYTES,
    MESSAGE_TIMESTAMP_TYPE,
    COMPACTION_SUBKEY_HEADER,
];

/// Smallest segment: a segment must hold at least one maximal batch header plus data.
pub const SEGMENT_BYTES_MIN: u64 = 1024;
/// Largest segment: offsets inside a segment's index are u32 positions.
pub const SEGMENT_BYTES_MAX: u64 = i32::MAX as u64;
/// Largest batch the log accepts, whatever the topic says (the request size bound).
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 100 * 1024 * 1024;

impl Default for TopicConfig {
    fn default() -> Self {
        Self {
            cleanup_policy: CleanupPolicy { delete: true, compact: false },
            retention_ms: 7 * 24 * 60 * 60 * 1000,
            retention_bytes: -1,
            segment_bytes: 1024 * 1024 * 1024,
            segment_ms: 7 * 24 * 60 * 60 * 1000,
            min_compaction_lag_ms: 0,
            min_cleanable_dirty_ratio: 0.5,
            delete_retention_ms: 24 * 60 * 60 * 1000,
            max_message_bytes: 1024 * 1024 + 12,
            message_timestamp_type: TimestampType::CreateTime,
            compaction_subkey_header: None,
        }
    }
}

impl TopicConfig {
    /// Builds a config from defaults plus `overrides`; any unknown key or bad value is an
    /// error naming it.
    pub fn from_overrides(overrides: &BTreeMap<String, String>) -> Result<Self> {
        let mut config = Self::default();
        for (key, value) in overrides {
            config.set(key, value)?;
        }
        Ok(config)
    }

    /// Sets one key, validating the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |reason: &str| LogError::InvalidConfig {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        match key {
            CLEANUP_POLICY => {
                self.cleanup_policy = parse_cleanup_policy(value)
                    .ok_or_else(|| bad("expected 'delete', 'compact' or 'compact,delete'"))?
            }
            RETENTION_MS => {
                self.retention_ms = parse_int(value, -1, i64::MAX)
                    .ok_or_else(|| bad("expected milliseconds >= 0, or -1 for no limit"))?
            }
            RETENTION_BYTES => {
                self.retention_bytes =
                    parse_int(value, -1, i64::MAX).ok_or_else(|| bad("expected bytes >= 0, or -1 for no limit"))?
            }
            SEGMENT_BYTES => {
                self.segment_bytes = parse_int(value, SEGMENT_BYTES_MIN as i64, SEGMENT_BYTES_MAX as i64)
                    .ok_or_else(|| bad("expected bytes between 1024 and 2147483647"))?
                    as u64
            }
            SEGMENT_MS => {
                self.segment_ms = parse_int(value, 1, i64::MAX).ok_or_else(|| bad("expected milliseconds >= 1"))?
            }
            MIN_COMPACTION_LAG_MS => {
                self.min_compaction_lag_ms =
                    parse_int(value, 0, i64::MAX).ok_or_else(|| bad("expected milliseconds >= 0"))?
            }
            MIN_CLEANABLE_DIRTY_RATIO => {
                self.min_cleanable_dirty_ratio = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| bad("expected a ratio between 0 and 1"))?
            }
            DELETE_RETENTION_MS => {
                self.delete_retention_ms =
                    parse_int(value, 0, i64::MAX).ok_or_else(|| bad("expected milliseconds >= 0"))?
            }
            MAX_MESSAGE_BYTES => {
                self.max_message_bytes = parse_int(value, 0, MAX_MESSAGE_BYTES_LIMIT as i64)
                    .ok_or_else(|| bad("expected bytes between 0 and 104857600"))?
                    as usize
            }
            MESSAGE_TIMESTAMP_TYPE => {
                self.message_timestamp_type = match value {
                    "CreateTime" => TimestampType::CreateTime,
                    "LogAppendTime" => TimestampType::LogAppendTime,
                    _ => return Err(bad("expected 'CreateTime' or 'LogAppendTime'")),
                }
            }
            COMPACTION_SUBKEY_HEADER => {
                self.compaction_subkey_header = match value {
                    "" => None,
                    name if name.len() <= 255 && !name.contains(['\n', '=']) => Some(name.to_owned()),
                    _ => {
                        return Err(bad(
                            "expected a header name of at most 255 bytes without '=' or newlines (empty turns it off)",
                        ));
                    }
                }
            }
            other => return Err(LogError::UnknownConfig(other.to_owned())),
        }
        Ok(())
    }

    /// A copy with `changes` applied: `Some(value)` sets a key, `None` resets it to its
    /// default (Kafka's IncrementalAlterConfigs SET and DELETE). Nothing changes on error.
    pub fn with_changes(&self, changes: &BTreeMap<String, Option<String>>) -> Result<Self> {
        let defaults = Self::default();
        let mut config = self.clone();
        for (key, value) in changes {
            match value {
                Some(value) => config.set(key, value)?,
                None => config.set(key, &defaults.get(key).ok_or_else(|| LogError::UnknownConfig(key.clone()))?)?,
            }
        }
        Ok(config)
    }

    /// The value of one key as Kafka spells it.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            CLEANUP_POLICY => match (self.cleanup_policy.compact, self.cleanup_policy.delete) {
                (true, true) => "compact,delete".to_owned(),
                (true, false) => "compact".to_owned(),
                _ => "delete".to_owned(),
            },
            RETENTION_MS => self.retention_ms.to_string(),
            RETENTION_BYTES => self.retention_bytes.to_string(),
            SEGMENT_BYTES => self.segment_bytes.to_string(),
            SEGMENT_MS => self.segment_ms.to_string(),
            MIN_COMPACTION_LAG_MS => self.min_compaction_lag_ms.to_string(),
            MIN_CLEANABLE_DIRTY_RATIO => self.min_cleanable_dirty_ratio.to_string(),
            DELETE_RETENTION_MS => self.delete_retention_ms.to_string(),
            MAX_MESSAGE_BYTES => self.max_message_bytes.to_string(),
            MESSAGE_TIMESTAMP_TYPE => match self.message_timestamp_type {
                TimestampType::CreateTime => "CreateTime".to_owned(),
                TimestampType::LogAppendTime => "LogAppendTime".to_owned(),
            },
            COMPACTION_SUBKEY_HEADER => self.compaction_subkey_header.clone().unwrap_or_default(),
            _ => return None,
        })
    }

    /// Every key with its value and whether it differs from the default.
    pub fn entries(&self) -> Vec<(&'static str, String, bool)> {
        let defaults = Self::default();
        KEYS.iter().map(|&key| (key, self.get(key).unwrap_or_default(), self.get(key) != defaults.get(key))).collect()
    }

    /// The `key=value` file: only the keys that differ from the defaults.
    pub fn to_properties(&self) -> String {
        self.entries()
            .into_iter()
            .filter(|(_, _, overridden)| *overridden)
            .map(|(key, value, _)| format!("{key}={value}\n"))
            .collect()
    }

    pub fn from_properties(text: &str) -> Result<Self> {
        let mut overrides = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (key, value) = line.split_once('=').ok_or_else(|| LogError::InvalidConfig {
                key: line.to_owned(),
                value: String::new(),
                reason: "expected a 'key=value' line".to_owned(),
            })?;
            overrides.insert(key.to_owned(), value.to_owned());
        }
        Self::from_overrides(&overrides)
    }
}

fn parse_cleanup_policy(value: &str) -> Option<CleanupPolicy> {
    let mut policy = CleanupPolicy { delete: false, compact: false };
    for part in value.split(',').map(str::trim) {
        match part {
            "delete" => policy.delete = true,
            "compact" => policy.compact = true,
            _ => return None,
        }
    }
    (policy.delete || policy.compact).then_some(policy)
}

fn parse_int(value: &str, min: i64, max: i64) -> Option<i64> {
    value.trim().parse::<i64>().ok().filter(|v| (min..=max).contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_properties() {
        let mut config = TopicConfig::default();
        config.set(CLEANUP_POLICY, "compact,delete").unwrap();
        config.set(COMPACTION_SUBKEY_HEADER, "contentId").unwrap();
        config.set(SEGMENT_BYTES, "4096").unwrap();
        let text = config.to_properties();
        assert_eq!(text.lines().count(), 3, "only overridden keys are written: {text}");
        assert_eq!(TopicConfig::from_properties(&text).unwrap(), config);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let mut config = TopicConfig::default();
        let err = config.set("retention.mss", "1").unwrap_err().to_string();
        assert!(err.contains("retention.mss"), "{err}");
        let err = config.set(SEGMENT_BYTES, "12").unwrap_err().to_string();
        assert!(err.contains("segment.bytes") && err.contains("1024"), "{err}");
        let err = config.set(CLEANUP_POLICY, "compact,forever").unwrap_err().to_string();
        assert!(err.contains("compact,delete"), "{err}");
        assert!(config.set(MIN_CLEANABLE_DIRTY_RATIO, "1.5").is_err());
        assert!(config.set(MESSAGE_TIMESTAMP_TYPE, "Now").is_err());
        assert_eq!(config, TopicConfig::default(), "a rejected value changes nothing");
    }
}
