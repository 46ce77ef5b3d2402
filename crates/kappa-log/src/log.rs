//! The log of one data directory: its topics and their partitions.
//!
//! Layout: `<data>/topics/<topic>/topic.properties` (the topic's config overrides; its
//! presence is what makes a topic exist), `<data>/topics/<topic>/topic.id` (the topic's
//! 16-byte id, raw bytes) and `<data>/topics/<topic>/<partition>/` (segment files, see
//! docs/format.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::clock::{Clock, SystemClock};
use crate::config::TopicConfig;
use crate::error::{LogError, Result};
use crate::health::DirHealth;
use crate::io::{self, RealFs, Storage};
use crate::partition::{Partition, PartitionContext, PartitionRecovery, RetentionOutcome, SyncPolicy};

/// Longest topic name (Kafka's limit, so every client accepts it).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
/// Most partitions one topic may have.
pub const PARTITIONS_MAX: i32 = 10_000;
const TOPICS_DIR: &str = "topics";
const TOPIC_CONFIG_FILE: &str = "topic.properties";
/// The topic's id: exactly [`TOPIC_ID_BYTES`] raw bytes, written before `topic.properties`.
const TOPIC_ID_FILE: &str = "topic.id";
/// Length of a topic id (a UUID, as Kafka's topic ids of KIP-516).
pub const TOPIC_ID_BYTES: usize = 16;
const DELETING_MARKER: &str = "deleting";

/// How a log is opened.
#[derive(Clone)]
pub struct LogOptions {
    pub sync_policy: SyncPolicy,
    pub fs: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    /// Kafka's `producer.id.expiration.ms`: a producer with no open transaction that has not
    /// appended to a partition for this long is forgotten there (at the next retention
    /// pass), so its duplicate detection ends; without it, every idempotent producer
    /// instance ever seen would be kept forever.
    pub producer_id_expiration_ms: i64,
    /// Producers one partition remembers at most: past it, the idle ones that appended least
    /// recently are forgotten early, as if expired (a client starting producers in a loop
    /// cannot fill memory within `producer_id_expiration_ms`). Kafka has no such limit.
    pub producers_per_partition_max: usize,
    /// Most bytes one cleaning pass's key map may count (default
    /// [`crate::compaction::COMPACTION_MAP_BYTES_MAX`]): each entry counts its key and
    /// sub-key bytes plus 64. The pass stops reading at the first record that takes the
    /// count past this, so the count ends at most that one record's entries over: 128 bytes
    /// plus twice its key plus its sub-key (a whole-key tombstone is two entries), each
    /// within its batch's `max.message.bytes`. Allocator rounding and the hash table's
    /// spare capacity after it grows (up to about as many empty slots as full ones) are not
    /// counted and come on top. The pass cleans the part of the log whose keys fit; later
    /// passes go on from there.
    pub compaction_map_bytes_max: usize,
}

/// Kafka's default `producer.id.expiration.ms`: one day.
pub const PRODUCER_ID_EXPIRATION_MS_DEFAULT: i64 = 86_400_000;
/// Default [`LogOptions::producers_per_partition_max`]: ~20 MB of producer state per
/// partition (about 200 bytes each, with five batches remembered).
pub const PRODUCERS_PER_PARTITION_MAX_DEFAULT: usize = 100_000;

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            sync_policy: SyncPolicy::EveryAppend,
            fs: Arc::new(RealFs),
            clock: Arc::new(SystemClock),
            producer_id_expiration_ms: PRODUCER_ID_EXPIRATION_MS_DEFAULT,
            producers_per_partition_max: PRODUCERS_PER_PARTITION_MAX_DEFAULT,
            compaction_map_bytes_max: crate::compaction::COMPACTION_MAP_BYTES_MAX,
        }
    }
}

/// One topic: its shared config and its partitions.
pub struct Topic {
    name: String,
    id: [u8; TOPIC_ID_BYTES],
    dir: PathBuf,
    config: Arc<RwLock<Arc<TopicConfig>>>,
    partitions: RwLock<Vec<Arc<Partition>>>,
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id given to the topic at creation (Kafka's topic id, KIP-516): a topic deleted
    /// and created again under the same name has a different one.
    pub fn id(&self) -> [u8; TOPIC_ID_BYTES] {
        self.id
    }

    pub fn config(&self) -> Arc<TopicConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.partitions.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn partition_count(&self) -> i32 {
        self.partitions.read().unwrap_or_else(|e| e.into_inner()).len() as i32
    }

    pub fn partition(&self, index: i32) -> Result<Arc<Partition>> {
        let partitions = self.partitions.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(index).ok().and_then(|i| partitions.get(i)).cloned().ok_or_else(|| LogError::UnknownPartition {
            topic: self.name.clone(),
            partition: index,
            partitions: partitions.len() as i32,
        })
    }
}

/// What opening the data directory found.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub partitions: Vec<(String, i32, PartitionRecovery)>,
    pub elapsed: Duration,
}

impl RecoveryReport {
    pub fn topics(&self) -> usize {
        let mut names: Vec<&str> = self.partitions.iter().map(|(t, _, _)| t.as_str()).collect();
        names.dedup();
        names.len()
    }
    pub fn bytes(&self) -> u64 {
        self.partitions.iter().map(|(_, _, r)| r.bytes).sum()
    }
    pub fn truncated_bytes(&self) -> u64 {
        self.partitions.iter().map(|(_, _, r)| r.truncated_bytes).sum()
    }
    pub fn scanned_bytes(&self) -> u64 {
        self.partitions.iter().map(|(_, _, r)| r.scanned_bytes).sum()
    }
    pub fn all_clean(&self) -> bool {
        self.partitions.iter().all(|(_, _, r)| r.clean)
    }
}

/// The topics of one data directory.
pub struct Log {
    dir: PathBuf,
    options: LogOptions,
    health: Arc<DirHealth>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
}

impl Log {
    /// Opens the data directory (creating it if needed) and recovers every partition.
    pub fn open(dir: &Path, options: LogOptions) -> Result<(Self, RecoveryReport)> {
        let started = Instant::now();
        let fs = options.fs.clone();
        let topics_dir = dir.join(TOPICS_DIR);
        create_dirs_durably(fs.as_ref(), &topics_dir)?;
        fs.sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
        let log = Self {
            dir: dir.to_owned(),
            health: Arc::new(DirHealth::new(dir.to_owned())),
            options,
            topics: RwLock::new(BTreeMap::new()),
        };
        let mut report = RecoveryReport::default();
        let mut names = fs.list_dir(&topics_dir).map_err(|e| LogError::io(&topics_dir, e))?;
        names.sort();
        for name in names {
            let topic_dir = topics_dir.join(&name);
            if fs.exists(&topic_dir.join(DELETING_MARKER)) || !fs.exists(&topic_dir.join(TOPIC_CONFIG_FILE)) {
                // An interrupted delete or create: finish it.
                tracing::warn!(topic = %name, "removing a topic whose creation or deletion was interrupted");
                fs.remove_dir_all(&topic_dir).map_err(|e| LogError::io(&topic_dir, e))?;
                fs.sync_dir(&topics_dir).map_err(|e| LogError::io(&topics_dir, e))?;
                continue;
            }
            let topic = log.open_topic(&name, &mut report)?;
            log.write_topics().insert(name, topic);
        }
        report.elapsed = started.elapsed();
        Ok((log, report))
    }

    fn open_topic(&self, name: &str, report: &mut RecoveryReport) -> Result<Arc<Topic>> {
        let fs = self.options.fs.as_ref();
        let dir = self.dir.join(TOPICS_DIR).join(name);
        let config_path = dir.join(TOPIC_CONFIG_FILE);
        let text = io::read_file(fs, &config_path).map_err(|e| LogError::io(&config_path, e))?;
        let config = TopicConfig::from_properties(&String::from_utf8_lossy(&text))?;
        if let Err(e) = config.validate() {
            // Stored before the rule existed: open it as it is, rather than refuse the data dir.
            tracing::warn!(topic = %name, error = %e, "topic config breaks a rule new configs must follow; fix it with `kappa topic alter <topic> --set cleanup.policy=compact` (or `--delete kappa.compaction.subkey.header`), or any admin client's AlterConfigs");
        }
        let id = self.open_topic_id(name, &dir)?;
        let mut indexes: Vec<i32> =
            fs.list_dir(&dir).map_err(|e| LogError::io(&dir, e))?.iter().filter_map(|n| n.parse().ok()).collect();
        indexes.sort_unstable();
        let count = indexes.iter().enumerate().take_while(|(i, p)| *i as i32 == **p).count() as i32;
        if count as usize != indexes.len() {
            tracing::warn!(topic = %name, count, "partition directories are not contiguous; using the contiguous prefix");
        }
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            id,
            dir,
            config: Arc::new(RwLock::new(Arc::new(config))),
            partitions: RwLock::new(Vec::new()),
        });
        for index in 0..count {
            let (partition, recovery) = self.open_partition(&topic, index)?;
            report.partitions.push((name.to_owned(), index, recovery));
            topic.partitions.write().unwrap_or_else(|e| e.into_inner()).push(Arc::new(partition));
        }
        Ok(topic)
    }

    /// Reads the topic's id; a topic created before ids existed gets one now.
    fn open_topic_id(&self, name: &str, dir: &Path) -> Result<[u8; TOPIC_ID_BYTES]> {
        let fs = self.options.fs.as_ref();
        let path = dir.join(TOPIC_ID_FILE);
        if !fs.exists(&path) {
            tracing::info!(topic = %name, "giving a topic created by an older version its id");
            return write_new_topic_id(fs, dir);
        }
        let bytes = io::read_file(fs, &path).map_err(|e| LogError::io(&path, e))?;
        <[u8; TOPIC_ID_BYTES]>::try_from(bytes.as_slice()).map_err(|_| LogError::Corrupt {
            path: path.clone(),
            position: 0,
            reason: format!(
                "a topic id is {TOPIC_ID_BYTES} bytes, the file has {}; delete the file to give the topic a new id",
                bytes.len()
            ),
        })
    }

    fn open_partition(&self, topic: &Topic, index: i32) -> Result<(Partition, PartitionRecovery)> {
        Partition::open(PartitionContext {
            topic: topic.name.clone(),
            topic_id: topic.id,
            partition: index,
            dir: topic.dir.join(index.to_string()),
            fs: self.options.fs.clone(),
            health: self.health.clone(),
            clock: self.options.clock.clone(),
            config: topic.config.clone(),
            sync_policy: self.options.sync_policy,
            producer_id_expiration_ms: self.options.producer_id_expiration_ms,
            producers_max: self.options.producers_per_partition_max,
            compaction_map_bytes_max: self.options.compaction_map_bytes_max,
        })
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn health(&self) -> &DirHealth {
        &self.health
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.options.clock
    }

    /// Creates a topic with `partitions` partitions and the given config overrides.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Arc<Topic>> {
        let config = self.validate_new_topic(name, partitions, overrides)?;
        self.health.check()?;
        let mut topics = self.write_topics();
        if topics.contains_key(name) {
            return Err(LogError::TopicExists(name.to_owned()));
        }
        let fs = self.options.fs.as_ref();
        let topics_dir = self.dir.join(TOPICS_DIR);
        let dir = topics_dir.join(name);
        fs.create_dir_all(&dir).map_err(|e| LogError::io(&dir, e))?;
        fs.sync_dir(&topics_dir).map_err(|e| LogError::io(&topics_dir, e))?;
        let id = write_new_topic_id(fs, &dir)?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            id,
            dir: dir.clone(),
            config: Arc::new(RwLock::new(Arc::new(config.clone()))),
            partitions: RwLock::new(Vec::new()),
        });
        for index in 0..partitions {
            let (partition, _) = self.open_partition(&topic, index)?;
            topic.partitions.write().unwrap_or_else(|e| e.into_inner()).push(Arc::new(partition));
        }
        fs.sync_dir(&dir).map_err(|e| LogError::io(&dir, e))?;
        // Writing the config file is the commit point: without it the topic does not exist.
        let config_path = dir.join(TOPIC_CONFIG_FILE);
        io::write_file_atomic(fs, &config_path, config.to_properties().as_bytes())
            .map_err(|e| LogError::io(&config_path, e))?;
        topics.insert(name.to_owned(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    /// Checks everything `create_topic` checks, creating nothing (CreateTopics with
    /// validate_only); returns the topic's config.
    pub fn validate_new_topic(
        &self,
        name: &str,
        partitions: i32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicConfig> {
        validate_topic_name(name)?;
        validate_partition_count(partitions, 0)?;
        // Existence first, as Kafka checks it: a client that "ensures" a topic takes
        // TOPIC_ALREADY_EXISTS as success, but not INVALID_CONFIG for configs that no longer
        // pass a rule the stored topic predates.
        if self.topic(name).is_ok() {
            return Err(LogError::TopicExists(name.to_owned()));
        }
        TopicConfig::from_overrides(overrides)
    }

    /// Deletes a topic and all its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let mut topics = self.write_topics();
        let topic = topics.remove(name).ok_or_else(|| LogError::UnknownTopic(name.to_owned()))?;
        let fs = self.options.fs.as_ref();
        // The marker makes the deletion durable before any data goes.
        let marker = topic.dir.join(DELETING_MARKER);
        fs.open(&marker, io::OpenMode::Create).map_err(|e| LogError::io(&marker, e))?;
        fs.sync_dir(&topic.dir).map_err(|e| LogError::io(&topic.dir, e))?;
        fs.remove_dir_all(&topic.dir).map_err(|e| LogError::io(&topic.dir, e))?;
        let topics_dir = self.dir.join(TOPICS_DIR);
        fs.sync_dir(&topics_dir).map_err(|e| LogError::io(&topics_dir, e))?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_owned()))
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn partition(&self, topic: &str, index: i32) -> Result<Arc<Partition>> {
        self.topic(topic)?.partition(index)
    }

    /// Replaces a topic's config overrides with `overrides` (validated first; nothing
    /// changes on error).
    pub fn set_topic_config(&self, name: &str, overrides: &BTreeMap<String, String>) -> Result<()> {
        let topic = self.topic(name)?;
        let config = TopicConfig::from_overrides(overrides)?;
        self.persist_config(&topic, config)
    }

    /// Sets or resets (None) individual keys, keeping the others (Kafka's
    /// IncrementalAlterConfigs).
    pub fn alter_topic_config(&self, name: &str, changes: &BTreeMap<String, Option<String>>) -> Result<()> {
        let topic = self.topic(name)?;
        let config = topic.config().with_changes(changes)?;
        self.persist_config(&topic, config)
    }

    fn persist_config(&self, topic: &Topic, config: TopicConfig) -> Result<()> {
        let path = topic.dir.join(TOPIC_CONFIG_FILE);
        io::write_file_atomic(self.options.fs.as_ref(), &path, config.to_properties().as_bytes())
            .map_err(|e| LogError::io(&path, e))?;
        *topic.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    /// Grows a topic to `total` partitions (Kafka's CreatePartitions: never shrinks).
    /// Checks everything `add_partitions` checks, adding nothing (CreatePartitions with
    /// validate_only).
    pub fn validate_add_partitions(&self, name: &str, total: i32) -> Result<()> {
        validate_partition_count(total, self.topic(name)?.partition_count())
    }

    pub fn add_partitions(&self, name: &str, total: i32) -> Result<()> {
        let topic = self.topic(name)?;
        let current = topic.partition_count();
        validate_partition_count(total, current)?;
        for index in current..total {
            let (partition, _) = self.open_partition(&topic, index)?;
            topic.partitions.write().unwrap_or_else(|e| e.into_inner()).push(Arc::new(partition));
        }
        let fs = self.options.fs.as_ref();
        fs.sync_dir(&topic.dir).map_err(|e| LogError::io(&topic.dir, e))
    }

    fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics().iter().flat_map(|t| t.partitions()).collect()
    }

    /// Applies retention to every partition. A partition that fails is logged and skipped,
    /// so it does not hold back the others; the first failure is returned once every
    /// partition had its turn.
    pub fn enforce_retention(&self) -> Result<RetentionOutcome> {
        let mut total = RetentionOutcome::default();
        let first_failure = self.for_each_partition("retention", |partition| {
            let outcome = partition.enforce_retention()?;
            total.segments_deleted += outcome.segments_deleted;
            total.bytes_deleted += outcome.bytes_deleted;
            Ok(())
        });
        first_failure.map_or(Ok(total), Err)
    }

    /// Runs a cleaning pass on every compacted partition that is dirty enough. A partition
    /// that fails is logged and skipped, so it does not hold back the others; the first
    /// failure is returned once every partition had its turn.
    pub fn compact(&self) -> Result<Vec<crate::compaction::CompactionOutcome>> {
        let mut outcomes = Vec::new();
        let first_failure = self.for_each_partition("compaction", |partition| {
            outcomes.extend(partition.compact(false)?);
            Ok(())
        });
        first_failure.map_or(Ok(outcomes), Err)
    }

    /// Runs `task` on every partition, logging each failure; returns the first failure.
    fn for_each_partition(&self, what: &str, mut task: impl FnMut(&Partition) -> Result<()>) -> Option<LogError> {
        let mut first_failure = None;
        for partition in self.all_partitions() {
            if let Err(error) = task(&partition) {
                tracing::warn!(topic = %partition.topic(), partition = partition.index(), %error, "{what} failed for this partition; continuing with the others");
                first_failure.get_or_insert(error);
            }
        }
        first_failure
    }

    /// Syncs every partition (the interval policy's periodic flush).
    pub fn flush(&self) -> Result<()> {
        self.all_partitions().iter().try_for_each(|p| p.flush())
    }

    /// Flushes and checkpoints every partition so the next open is fast. A poisoned
    /// directory is left as it is: recovery will validate it.
    pub fn close(&self) -> Result<()> {
        if self.health.is_poisoned() {
            return self.health.check();
        }
        self.all_partitions().iter().try_for_each(|p| p.close())
    }
}

/// Creates `dir` and its missing parents, syncing the parent of each directory it made:
/// a new directory's entry is durable only once its parent is synced, and without that a
/// power loss could take the whole (freshly created) data directory away.
fn create_dirs_durably(fs: &dyn Storage, dir: &Path) -> Result<()> {
    let missing: Vec<&Path> =
        dir.ancestors().filter(|a| !a.as_os_str().is_empty()).take_while(|a| !fs.exists(a)).collect();
    fs.create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
    for created in missing.iter().rev() {
        let parent = created.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs.sync_dir(parent).map_err(|e| LogError::io(parent, e))?;
    }
    Ok(())
}

/// A new random topic id, like Kafka's `Uuid.randomUuid`: a version 4 UUID, never one whose
/// base64 text starts with '-' (Kafka's tools would read it as an option).
fn new_topic_id() -> [u8; TOPIC_ID_BYTES] {
    loop {
        let mut id: [u8; TOPIC_ID_BYTES] = rand::random();
        id[6] = (id[6] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        if id[0] >> 2 != 62 {
            return id;
        }
    }
}

/// Gives the topic in `dir` a new id, durably (temporary file, fsync, rename, directory fsync).
fn write_new_topic_id(fs: &dyn Storage, dir: &Path) -> Result<[u8; TOPIC_ID_BYTES]> {
    let id = new_topic_id();
    let path = dir.join(TOPIC_ID_FILE);
    io::write_file_atomic(fs, &path, &id).map_err(|e| LogError::io(&path, e))?;
    Ok(id)
}

/// Kafka's rule: 1..=249 bytes of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn validate_topic_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > TOPIC_NAME_BYTES_MAX {
        Some("it is longer than 249 characters")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not allowed")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        Some("only ASCII letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    reason.map_or(Ok(()), |reason| Err(LogError::InvalidTopicName { name: name.to_owned(), reason }))
}

fn validate_partition_count(count: i32, current: i32) -> Result<()> {
    let reason = if count < 1 {
        Some("a topic needs at least one partition".to_owned())
    } else if count > PARTITIONS_MAX {
        Some(format!("at most {PARTITIONS_MAX} partitions per topic"))
    } else if count <= current && current > 0 {
        Some(format!("the topic already has {current} partitions; partitions can only be added"))
    } else {
        None
    };
    reason.map_or(Ok(()), |reason| Err(LogError::InvalidPartitions { count, reason }))
}
