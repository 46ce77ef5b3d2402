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
    /// Values of the [`INERT_KEYS`] that differ from their defaults, as Kafka spells them.
    pub inert: BTreeMap<&'static str, String>,
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

/// The type of an [`InertKey`]'s value, checked as Kafka's `LogConfig` checks it.
#[derive(Debug, Clone, Copy)]
enum InertType {
    /// An integer in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    Bool,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// `*`, or a comma-separated list of `partition:broker` (replication throttles).
    ReplicaList,
    /// A Kafka version such as `3.0-IV1`.
    Version,
}

/// A Kafka topic config kappa accepts and lists but does not act on, because on a one-node
/// broker storing producers' batches verbatim it changes nothing a client could notice
/// (replication, index, flush and preallocation tuning); or one kappa honours only at
/// the value `only`, refusing any other with `why`.
#[derive(Debug, Clone, Copy)]
pub struct InertKey {
    pub key: &'static str,
    /// Kafka's default.
    pub default: &'static str,
    /// The only value kappa honours, when others would change behaviour.
    pub only: Option<&'static str>,
    /// Why the value changes nothing here, or (with `only`) why other values are refused.
    pub why: &'static str,
    kind: InertType,
}

const LONG_MAX: &str = "9223372036854775807";
const NO_TIMESTAMP_CHECKS: &str =
    "kappa does not compare record timestamps with its clock, so it refuses a bound it would not enforce";
const NO_TIERED_STORAGE: &str = "kappa has no tiered storage: every segment stays on the local disk";
const ONE_REPLICA: &str = "kappa is one node: each partition has one replica and nothing is replicated";
const SYNC_POLICY: &str =
    "durability is the broker's sync policy (by default an append is acknowledged only once fsynced)";

/// Every Kafka topic config kappa accepts without acting on it; the one place that lists
/// them and why. Kafka refuses names that are not topic configs (`confluent.*` included),
/// and so does kappa.
pub const INERT_KEYS: [InertKey; 21] = [
    InertKey {
        key: "min.insync.replicas",
        default: "1",
        only: Some("1"),
        why: "kappa is one node: with more than 1, every acks=all produce would fail with NOT_ENOUGH_REPLICAS",
        kind: InertType::Int { min: 1, max: i32::MAX as i64 },
    },
    InertKey {
        key: "unclean.leader.election.enable",
        default: "false",
        only: None,
        why: ONE_REPLICA,
        kind: InertType::Bool,
    },
    InertKey {
        key: "leader.replication.throttled.replicas",
        default: "",
        only: None,
        why: ONE_REPLICA,
        kind: InertType::ReplicaList,
    },
    InertKey {
        key: "follower.replication.throttled.replicas",
        default: "",
        only: None,
        why: ONE_REPLICA,
        kind: InertType::ReplicaList,
    },
    InertKey {
        key: "compression.type",
        default: "producer",
        only: Some("producer"),
        why: "kappa stores batches as producers compressed them; choose the codec in the producer's compression.type",
        kind: InertType::OneOf(&["uncompressed", "zstd", "lz4", "snappy", "gzip", "producer"]),
    },
    InertKey {
        key: "message.downconversion.enable",
        default: "true",
        only: Some("true"),
        why: "kappa always converts records for old fetch versions (v0-3), which kafka-node and other old clients need",
        kind: InertType::Bool,
    },
    InertKey {
        key: "message.format.version",
        default: "3.0-IV1",
        only: None,
        why: "kappa stores RecordBatch v2, as Kafka 3.0 and later do whatever this says",
        kind: InertType::Version,
    },
    InertKey {
        key: "max.compaction.lag.ms",
        default: LONG_MAX,
        only: Some(LONG_MAX),
        why: "kappa compacts when min.cleanable.dirty.ratio is reached and promises no deadline; lower min.cleanable.dirty.ratio instead",
        kind: InertType::Int { min: 1, max: i64::MAX },
    },
    InertKey {
        key: "message.timestamp.difference.max.ms",
        default: LONG_MAX,
        only: Some(LONG_MAX),
        why: NO_TIMESTAMP_CHECKS,
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "message.timestamp.before.max.ms",
        default: LONG_MAX,
        only: Some(LONG_MAX),
        why: NO_TIMESTAMP_CHECKS,
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "message.timestamp.after.max.ms",
        default: LONG_MAX,
        only: Some(LONG_MAX),
        why: NO_TIMESTAMP_CHECKS,
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "segment.jitter.ms",
        default: "0",
        only: None,
        why: "segments roll at segment.ms exactly (the jitter only spreads Kafka's rolls over time)",
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "segment.index.bytes",
        default: "10485760",
        only: None,
        why: "kappa keeps its sparse indexes in memory and sizes them itself",
        kind: InertType::Int { min: 4, max: i32::MAX as i64 },
    },
    InertKey {
        key: "index.interval.bytes",
        default: "4096",
        only: None,
        why: "kappa's index spacing is its own; it only affects lookup speed",
        kind: InertType::Int { min: 0, max: i32::MAX as i64 },
    },
    InertKey {
        key: "flush.messages",
        default: LONG_MAX,
        only: None,
        why: SYNC_POLICY,
        kind: InertType::Int { min: 1, max: i64::MAX },
    },
    InertKey {
        key: "flush.ms",
        default: LONG_MAX,
        only: None,
        why: SYNC_POLICY,
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "file.delete.delay.ms",
        default: "60000",
        only: None,
        why: "kappa removes a deleted segment's file at once; readers holding it open keep reading it",
        kind: InertType::Int { min: 0, max: i64::MAX },
    },
    InertKey {
        key: "preallocate",
        default: "false",
        only: None,
        why: "segment files grow as they are written; preallocation only changes disk layout",
        kind: InertType::Bool,
    },
    InertKey {
        key: "remote.storage.enable",
        default: "false",
        only: Some("false"),
        why: NO_TIERED_STORAGE,
        kind: InertType::Bool,
    },
    InertKey {
        key: "local.retention.ms",
        default: "-2",
        only: None,
        why: NO_TIERED_STORAGE,
        kind: InertType::Int { min: -2, max: i64::MAX },
    },
    InertKey {
        key: "local.retention.bytes",
        default: "-2",
        only: None,
        why: NO_TIERED_STORAGE,
        kind: InertType::Int { min: -2, max: i64::MAX },
    },
];

impl InertKey {
    fn find(key: &str) -> Option<&'static InertKey> {
        INERT_KEYS.iter().find(|k| k.key == key)
    }

    /// The value as kappa stores it, or why it is refused.
    fn normalize(&self, value: &str) -> std::result::Result<String, String> {
        let normalized = match self.kind {
            InertType::Int { min, max } => parse_int(value, min, max)
                .ok_or_else(|| format!("expected an integer between {min} and {max}"))?
                .to_string(),
            InertType::Bool => match value.trim().to_ascii_lowercase().as_str() {
                b @ ("true" | "false") => b.to_owned(),
                _ => return Err("expected true or false".to_owned()),
            },
            InertType::OneOf(choices) => match choices.iter().find(|c| **c == value.trim()) {
                Some(choice) => (*choice).to_owned(),
                None => return Err(format!("expected one of {}", choices.join(", "))),
            },
            InertType::ReplicaList => {
                let value = value.trim();
                let pair = |p: &str| {
                    p.trim().split_once(':').is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
                };
                if !(value.is_empty() || value == "*" || value.split(',').all(pair)) {
                    return Err("expected '*' or a comma-separated list of partition:broker".to_owned());
                }
                value.to_owned()
            }
            InertType::Version => {
                let value = value.trim();
                if !value.starts_with(|c: char| c.is_ascii_digit())
                    || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                {
                    return Err("expected a Kafka version such as 3.0-IV1".to_owned());
                }
                value.to_owned()
            }
        };
        match self.only {
            Some(only) if normalized != only => Err(format!("only {only} is supported: {}", self.why)),
            _ => Ok(normalized),
        }
    }
}

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
            inert: BTreeMap::new(),
        }
    }
}

impl TopicConfig {
    /// Builds a config from defaults plus `overrides`; any unknown key or bad value is an
    /// error naming it.
    pub fn from_overrides(overrides: &BTreeMap<String, String>) -> Result<Self> {
        let config = Self::from_keys(overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults plus `overrides`, each key valid on its own (no check across keys): to
    /// compare a wish with a stored topic that predates a rule.
    pub fn from_keys(overrides: &BTreeMap<String, String>) -> Result<Self> {
        let mut config = Self::default();
        for (key, value) in overrides {
            config.set(key, value)?;
        }
        Ok(config)
    }

    /// Checks the rules between keys: a sub-key header needs compaction. Topics written
    /// before this rule are still opened (`from_properties` does not check); the log warns.
    pub fn validate(&self) -> Result<()> {
        self.check_subkey_header(COMPACTION_SUBKEY_HEADER)
    }

    /// The sub-key header only refines the compaction key: on a topic that is never
    /// compacted it would silently do nothing. The error names `blame`, the key whose
    /// value the request set.
    fn check_subkey_header(&self, blame: &str) -> Result<()> {
        match &self.compaction_subkey_header {
            Some(header) if !self.cleanup_policy.compact => Err(LogError::InvalidConfig {
                key: blame.to_owned(),
                value: self.get(blame).unwrap_or_default(),
                reason: format!(
                    "the sub-key header ({COMPACTION_SUBKEY_HEADER}={header}) only applies to compacted topics, \
                     and {CLEANUP_POLICY} is {}; set {CLEANUP_POLICY}=compact (or compact,delete), \
                     or remove {COMPACTION_SUBKEY_HEADER}",
                    self.get(CLEANUP_POLICY).unwrap_or_default()
                ),
            }),
            _ => Ok(()),
        }
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
            other => {
                let inert = InertKey::find(other).ok_or_else(|| LogError::UnknownConfig(other.to_owned()))?;
                let value = inert.normalize(value).map_err(|reason| bad(&reason))?;
                if value == inert.default {
                    self.inert.remove(inert.key);
                } else {
                    self.inert.insert(inert.key, value);
                }
            }
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
        let touches = |key: &str| changes.contains_key(key);
        // A topic stored with the conflict (from before the rule) may still change other keys.
        if !touches(CLEANUP_POLICY) && !touches(COMPACTION_SUBKEY_HEADER) {
            return Ok(config);
        }
        let blame = match touches(COMPACTION_SUBKEY_HEADER) {
            true => COMPACTION_SUBKEY_HEADER,
            false => CLEANUP_POLICY,
        };
        config.check_subkey_header(blame)?;
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
            other => {
                let inert = InertKey::find(other)?;
                self.inert.get(inert.key).cloned().unwrap_or_else(|| inert.default.to_owned())
            }
        })
    }

    /// Every key with its value and whether it differs from the default.
    pub fn entries(&self) -> Vec<(&'static str, String, bool)> {
        let defaults = Self::default();
        let keys = KEYS.iter().copied().chain(INERT_KEYS.iter().map(|k| k.key));
        keys.map(|key| (key, self.get(key).unwrap_or_default(), self.get(key) != defaults.get(key))).collect()
    }

    /// The `key=value` file: only the keys that differ from the defaults.
    pub fn to_properties(&self) -> String {
        self.entries()
            .into_iter()
            .filter(|(_, _, overridden)| *overridden)
            .map(|(key, value, _)| format!("{key}={value}\n"))
            .collect()
    }

    /// Reads a stored `topic.properties`. Each key is checked, not the rules between keys
    /// ([`TopicConfig::validate`]): a topic stored before a rule existed must still open.
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
        Self::from_keys(&overrides)
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

    fn overrides(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// The sub-key header refines compaction only: refused on a topic that is not compacted,
    /// and so is dropping compaction while it is set — but a stored topic with both still
    /// reads back, and may change its other keys.
    #[test]
    fn a_subkey_header_needs_a_compacted_topic() {
        let says_what_to_do = |e: LogError| {
            let text = e.to_string();
            assert!(matches!(e, LogError::InvalidConfig { .. }), "{e:?}");
            assert!(
                text.contains("only applies to compacted topics") && text.contains("cleanup.policy=compact"),
                "{text}"
            );
            text
        };
        for policy in [None, Some("delete")] {
            let mut pairs = vec![(COMPACTION_SUBKEY_HEADER, "contentId")];
            pairs.extend(policy.map(|p| (CLEANUP_POLICY, p)));
            let text = says_what_to_do(TopicConfig::from_overrides(&overrides(&pairs)).unwrap_err());
            assert!(text.contains("'kappa.compaction.subkey.header'"), "{text}");
        }
        for policy in ["compact", "compact,delete"] {
            let config =
                TopicConfig::from_overrides(&overrides(&[(COMPACTION_SUBKEY_HEADER, "c"), (CLEANUP_POLICY, policy)]));
            assert_eq!(config.unwrap().compaction_subkey_header.as_deref(), Some("c"));
        }

        let compacted =
            TopicConfig::from_overrides(&overrides(&[(COMPACTION_SUBKEY_HEADER, "c"), (CLEANUP_POLICY, "compact")]))
                .unwrap();
        let change = |key: &str, value: Option<&str>| BTreeMap::from([(key.to_owned(), value.map(str::to_owned))]);
        for value in [Some("delete"), None] {
            let text = says_what_to_do(compacted.with_changes(&change(CLEANUP_POLICY, value)).unwrap_err());
            assert!(text.contains("'cleanup.policy'"), "{text}");
        }
        let plain = TopicConfig::default();
        says_what_to_do(plain.with_changes(&change(COMPACTION_SUBKEY_HEADER, Some("c"))).unwrap_err());
        let both = BTreeMap::from([
            (CLEANUP_POLICY.to_owned(), Some("delete".to_owned())),
            (COMPACTION_SUBKEY_HEADER.to_owned(), None),
        ]);
        assert_eq!(compacted.with_changes(&both).unwrap(), plain, "both at once is fine");

        let stored = format!("{COMPACTION_SUBKEY_HEADER}=c\n");
        let old = TopicConfig::from_properties(&stored).expect("a stored topic still opens");
        says_what_to_do(old.validate().unwrap_err());
        let altered = old.with_changes(&change(RETENTION_MS, Some("1000"))).expect("other keys still change");
        assert_eq!(altered.retention_ms, 1000);
        assert!(old.with_changes(&change(CLEANUP_POLICY, Some("compact"))).unwrap().validate().is_ok());
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

    #[test]
    fn kafka_configs_without_effect_here_are_accepted_typed_and_listed() {
        let given = [
            ("min.insync.replicas", "1"),
            ("unclean.leader.election.enable", "TRUE"),
            ("segment.jitter.ms", "1000"),
            ("flush.messages", "1"),
            ("preallocate", "true"),
            ("leader.replication.throttled.replicas", "0:0,1:0"),
            ("compression.type", "producer"),
            ("message.format.version", "2.8-IV1"),
            ("local.retention.ms", "-2"),
        ];
        let overrides = given.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config = TopicConfig::from_overrides(&overrides).unwrap_or_else(|e| panic!("{e}"));
        let entries = config.entries();
        let entry =
            |key: &str| entries.iter().find(|(k, _, _)| *k == key).cloned().unwrap_or_else(|| panic!("{key} listed"));
        assert_eq!(
            entry("unclean.leader.election.enable"),
            ("unclean.leader.election.enable", "true".to_owned(), true)
        );
        assert_eq!(entry("segment.jitter.ms").1, "1000");
        assert_eq!(entry("min.insync.replicas"), ("min.insync.replicas", "1".to_owned(), false), "the default");
        assert_eq!(entry("remote.storage.enable"), ("remote.storage.enable", "false".to_owned(), false));
        assert_eq!(entry("file.delete.delay.ms").1, "60000", "unset keys list Kafka's default");
        let text = config.to_properties();
        assert!(text.contains("segment.jitter.ms=1000\n") && !text.contains("min.insync.replicas"), "{text}");
        assert_eq!(TopicConfig::from_properties(&text).unwrap(), config, "they survive a restart");
        let reset = config.with_changes(&[("segment.jitter.ms".to_owned(), None)].into()).unwrap();
        assert_eq!(reset.get("segment.jitter.ms").as_deref(), Some("0"));
    }

    #[test]
    fn kafka_configs_kappa_cannot_honour_are_refused_saying_why() {
        let refused = [
            ("min.insync.replicas", "2", "NOT_ENOUGH_REPLICAS"),
            ("min.insync.replicas", "0", "between 1"),
            ("remote.storage.enable", "true", "tiered storage"),
            ("compression.type", "gzip", "producer"),
            ("compression.type", "brotli", "one of"),
            ("message.downconversion.enable", "false", "old fetch versions"),
            ("max.compaction.lag.ms", "60000", "min.cleanable.dirty.ratio"),
            ("message.timestamp.difference.max.ms", "3600000", "timestamps"),
            ("preallocate", "yes", "true or false"),
            ("segment.index.bytes", "2", "between 4"),
            ("follower.replication.throttled.replicas", "all", "partition:broker"),
        ];
        for (key, value, why) in refused {
            let mut config = TopicConfig::default();
            let err = config.set(key, value).expect_err(key).to_string();
            assert!(err.contains(key) && err.contains(value) && err.contains(why), "{key}={value}: {err}");
            assert_eq!(config, TopicConfig::default());
        }
        let err = TopicConfig::default().set("confluent.placement.constraints", "{}").unwrap_err();
        assert!(matches!(err, LogError::UnknownConfig(_)), "not a Kafka topic config: {err}");
    }
}
