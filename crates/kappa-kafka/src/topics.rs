//! Input, changelog (and their configs) on the cluster: created when missing, validated
//! when present — a changelog with the wrong partition count or cleanup policy would
//! silently mix partitions' state or lose it, so the worker refuses to start.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{CHANGELOG_MESSAGE_BYTES_MAX, WorkConfig};
use crate::error::{Result, WorkError, kafka};

/// How long one admin or metadata request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A topic the worker needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Configs set at creation; the ones in `must_match` are validated when it exists.
    pub configs: BTreeMap<String, String>,
    pub must_match: Vec<&'static str>,
    /// The topics (this one among them) derived from one another: those of a repartitioned
    /// view version. Deleting only one of them corrupts the view, so a mismatch says to
    /// delete them together. Empty: this topic alone.
    pub derived_with: Vec<String>,
}

impl TopicSpec {
    /// A view's changelog: compacted, one partition per input partition.
    pub fn changelog(name: String, partitions: i32) -> Self {
        let configs = BTreeMap::from([
            ("cleanup.policy".to_owned(), "compact".to_owned()),
            ("max.message.bytes".to_owned(), CHANGELOG_MESSAGE_BYTES_MAX.to_string()),
        ]);
        Self { name, partitions, configs, must_match: vec!["cleanup.policy"], derived_with: Vec::new() }
    }

    /// Marks the topic as one of `topics`, which are only ever deleted together.
    pub fn derived_with(mut self, topics: &[String]) -> Self {
        self.derived_with = topics.to_vec();
        self
    }
}

impl TopicSpec {
    /// A repartition topic: one partition per input partition, never compacted (two events
    /// for one view key are both needed), kept until deleted (`retention.ms=-1`) so a stage 2
    /// that is down loses nothing.
    pub fn repartition(name: String, partitions: i32) -> Self {
        let configs = BTreeMap::from([
            ("cleanup.policy".to_owned(), "delete".to_owned()),
            ("retention.ms".to_owned(), "-1".to_owned()),
            ("max.message.bytes".to_owned(), CHANGELOG_MESSAGE_BYTES_MAX.to_string()),
        ]);
        Self { name, partitions, configs, must_match: vec!["cleanup.policy", "retention.ms"], derived_with: Vec::new() }
    }
}

pub struct Topics {
    admin: AdminClient<DefaultClientContext>,
    metadata: BaseConsumer,
    runtime: tokio::runtime::Handle,
}

impl Topics {
    pub fn new(config: &WorkConfig, runtime: tokio::runtime::Handle) -> Result<Self> {
        let admin = config.admin().create().map_err(kafka("admin client"))?;
        let metadata = config.admin().create().map_err(kafka("metadata client"))?;
        Ok(Self { admin, metadata, runtime })
    }

    /// The topic's partition count, None when it does not exist.
    pub fn partitions(&self, topic: &str) -> Result<Option<i32>> {
        let metadata = self
            .metadata
            .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
            .map_err(kafka(format!("metadata of '{topic}'")))?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        match found.error() {
            None => Ok(Some(found.partitions().len() as i32)),
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => Ok(None),
            Some(e) => Err(WorkError::Kafka {
                context: format!("metadata of '{topic}'"),
                source: rdkafka::error::KafkaError::MetadataFetch(e.into()),
            }),
        }
    }

    /// Creates the topic when missing, then checks partitions and `must_match` configs.
    pub fn ensure(&self, spec: &TopicSpec) -> Result<()> {
        if self.partitions(&spec.name)?.is_none() {
            self.create(spec)?;
        }
        self.validate(spec)
    }

    fn create(&self, spec: &TopicSpec) -> Result<()> {
        // Replication -1: the cluster's default.replication.factor (KIP-464).
        let mut topic = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(-1));
        for (key, value) in &spec.configs {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .runtime
            .block_on(self.admin.create_topics([&topic], &options))
            .map_err(kafka(format!("create topic '{}'", spec.name)))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(WorkError::Kafka {
                        context: format!("create topic '{name}'"),
                        source: rdkafka::error::KafkaError::AdminOp(code),
                    });
                }
            }
        }
        tracing::info!(topic = %spec.name, partitions = spec.partitions, configs = ?spec.configs, "created topic");
        Ok(())
    }

    fn validate(&self, spec: &TopicSpec) -> Result<()> {
        let fix = if spec.derived_with.is_empty() {
            format!(
                "delete it (its contents are derived: workers rebuild it) or recreate it with {} partitions and {:?}",
                spec.partitions, spec.configs
            )
        } else {
            // A stage-1 state, repartition topic and view changelog hold positions in one
            // another: one rebuilt alone would double-apply or skip forwarded events.
            format!(
                "stop every worker of this view version, then delete all of {} together (workers rebuild them from the input; deleting only some corrupts the view)",
                spec.derived_with.join(", ")
            )
        };
        let partitions = self.wait_partitions(&spec.name)?;
        if partitions != spec.partitions {
            return Err(WorkError::TopicMismatch {
                topic: spec.name.clone(),
                found: format!("{partitions} partitions"),
                wanted: format!("{} partitions (one per input partition)", spec.partitions),
                fix,
            });
        }
        if spec.must_match.is_empty() {
            return Ok(());
        }
        let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .runtime
            .block_on(self.admin.describe_configs([&ResourceSpecifier::Topic(&spec.name)], &options))
            .map_err(kafka(format!("describe configs of '{}'", spec.name)))?;
        let resource = results.into_iter().next().and_then(Result::ok).ok_or_else(|| WorkError::Kafka {
            context: format!("describe configs of '{}'", spec.name),
            source: rdkafka::error::KafkaError::AdminOpCreation("no result".to_owned()),
        })?;
        for key in &spec.must_match {
            let found = resource.get(key).and_then(|e| e.value.clone()).unwrap_or_default();
            let wanted = spec.configs.get(*key).cloned().unwrap_or_default();
            if found != wanted {
                return Err(WorkError::TopicMismatch {
                    topic: spec.name.clone(),
                    found: format!("{key}={found}"),
                    wanted: format!("{key}={wanted}"),
                    fix,
                });
            }
        }
        Ok(())
    }

    /// Metadata may lag a creation for a moment.
    fn wait_partitions(&self, topic: &str) -> Result<i32> {
        for _ in 0..50 {
            if let Some(n) = self.partitions(topic)? {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(WorkError::MissingInput { topic: topic.to_owned() })
    }
}
