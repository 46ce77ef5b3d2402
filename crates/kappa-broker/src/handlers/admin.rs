//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DeleteRecords,
//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs, over every topic config the
//! log supports.

use std::collections::BTreeMap;

use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{CreatableTopicConfigs, CreatableTopicResult};
use kafka_protocol::messages::delete_records_response::{DeleteRecordsPartitionResult, DeleteRecordsTopicResult};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{DescribeConfigsResourceResult, DescribeConfigsResult};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResult;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteRecordsRequest, DeleteRecordsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeConfigsRequest, DescribeConfigsResponse, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
    TopicName,
};
use kappa_log::{LogError, TopicConfig};

use super::errors::{self, log_code};
use super::metadata::{is_internal, topic_id};
use super::{Broker, BrokerConfig, NODE_ID, blocking, str_bytes};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// DescribeConfigs config_source values.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
const SOURCE_STATIC_BROKER: i8 = 4;
/// DescribeConfigs (v3+) config_type values.
const TYPE_BOOLEAN: i8 = 1;
const TYPE_INT: i8 = 3;
const TYPE_SHORT: i8 = 4;
const TYPE_LONG: i8 = 5;
const TYPE_LIST: i8 = 7;
/// IncrementalAlterConfigs operations.
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;

/// An error code with the message that explains it.
type Failure = (i16, String);

fn failure(e: LogError) -> Failure {
    (log_code(&e), e.to_string())
}

impl Broker {
    pub(super) async fn create_topics(&self, request: CreateTopicsRequest, version: i16) -> CreateTopicsResponse {
        let mut response = CreateTopicsResponse::default();
        for topic in request.topics {
            let name = topic.name.0.as_str().to_owned();
            let mut result = CreatableTopicResult::default();
            result.name = TopicName(str_bytes(name.clone()));
            let partitions = match (topic.assignments.len(), topic.num_partitions) {
                (0, -1) => self.config.default_partitions,
                (0, count) => count,
                (assigned, _) => i32::try_from(assigned).unwrap_or(i32::MAX),
            };
            let overrides: BTreeMap<String, String> = topic
                .configs
                .iter()
                .filter_map(|c| c.value.as_ref().map(|v| (c.name.as_str().to_owned(), v.as_str().to_owned())))
                .collect();
            let outcome = if let Err(refused) = check_assignments(&topic) {
                Err(refused)
            } else if topic.replication_factor != -1 && topic.replication_factor != 1 {
                Err((
                    errors::INVALID_REPLICATION_FACTOR,
                    format!(
                        "replication factor {} is impossible on a single node; use 1 or -1",
                        topic.replication_factor
                    ),
                ))
            } else if is_internal(&name) {
                Err((errors::INVALID_REQUEST, format!("{name} is an internal topic")))
            } else if request.validate_only {
                // Not created, so no id yet (Kafka answers the zero id too).
                self.log.validate_new_topic(&name, partitions, &overrides).map(|_| uuid::Uuid::nil()).map_err(failure)
            } else {
                let log = self.log.clone();
                let (name, overrides) = (name.clone(), overrides.clone());
                blocking(move || log.create_topic(&name, partitions, &overrides).map(|t| topic_id(&t)))
                    .await
                    .map_err(failure)
            };
            match outcome {
                Ok(id) => {
                    result.topic_id = id;
                    result.num_partitions = partitions;
                    result.replication_factor = 1;
                    // Only v5+ carries the resulting configs.
                    result.configs = (version >= 5).then(|| {
                        TopicConfig::from_overrides(&overrides)
                            .unwrap_or_default()
                            .entries()
                            .into_iter()
                            .map(|(key, value, overridden)| {
                                let mut c = CreatableTopicConfigs::default();
                                c.name = str_bytes(key);
                                c.value = Some(str_bytes(value));
                                c.config_source = if overridden { SOURCE_TOPIC } else { SOURCE_DEFAULT };
                                c
                            })
                            .collect()
                    });
                }
                Err((code, message)) => {
                    result.error_code = code;
                    result.error_message = Some(str_bytes(message));
                    result.num_partitions = -1;
                    result.replication_factor = -1;
                }
            }
            response.topics.push(result);
        }
        response
    }

    pub(super) async fn delete_topics(&self, request: DeleteTopicsRequest) -> DeleteTopicsResponse {
        let names: Vec<String> = request
            .topic_names
            .iter()
            .map(|n| n.0.as_str().to_owned())
            .chain(request.topics.iter().filter_map(|t| t.name.as_ref().map(|n| n.0.as_str().to_owned())))
            .collect();
        let mut response = DeleteTopicsResponse::default();
        for name in names {
            let mut result = DeletableTopicResult::default();
            result.name = Some(TopicName(str_bytes(name.clone())));
            result.topic_id = self.log.topic(&name).map(|t| topic_id(&t)).unwrap_or_default();
            let outcome = if is_internal(&name) {
                Err((errors::INVALID_REQUEST, format!("{name} is an internal topic and cannot be deleted")))
            } else {
                let log = self.log.clone();
                let name = name.clone();
                blocking(move || log.delete_topic(&name)).await.map_err(failure)
            };
            if let Err((code, message)) = outcome {
                result.error_code = code;
                result.error_message = Some(str_bytes(message));
            }
            response.responses.push(result);
        }
        response
    }

    /// Moves each partition's log start offset forward (Kafka's `kafka-delete-records`,
    /// `AdminClient.deleteRecords`; Kafka Streams purges repartition topics with it). The
    /// response carries codes only, so a refusal is also logged with its reason. The
    /// coordinators' internal topics are refused: their history is their state.
    pub(super) async fn delete_records(&self, request: DeleteRecordsRequest) -> DeleteRecordsResponse {
        let mut response = DeleteRecordsResponse::default();
        for topic in request.topics {
            let name = topic.name.0.as_str().to_owned();
            let mut result = DeleteRecordsTopicResult::default();
            result.name = topic.name.clone();
            for partition in topic.partitions {
                let mut answer = DeleteRecordsPartitionResult::default();
                answer.partition_index = partition.partition_index;
                answer.low_watermark = -1;
                // As Kafka's ReplicaManager answers it.
                let outcome = if is_internal(&name) {
                    Err((errors::INVALID_TOPIC_EXCEPTION, format!("Cannot delete records of internal topic {name}")))
                } else {
                    let log = self.log.clone();
                    let (name, index, before) = (name.clone(), partition.partition_index, partition.offset);
                    blocking(move || log.partition(&name, index)?.delete_records(before)).await.map_err(failure)
                };
                match outcome {
                    Ok(low_watermark) => answer.low_watermark = low_watermark,
                    Err((code, message)) => {
                        tracing::warn!(topic = %name, partition = partition.partition_index, offset = partition.offset, error_code = code, %message, "DeleteRecords refused");
                        answer.error_code = code;
                    }
                }
                result.partitions.push(answer);
            }
            response.topics.push(result);
        }
        response
    }

    pub(super) async fn create_partitions(&self, request: CreatePartitionsRequest) -> CreatePartitionsResponse {
        let mut response = CreatePartitionsResponse::default();
        for topic in request.topics {
            let name = topic.name.0.as_str().to_owned();
            let mut result = CreatePartitionsTopicResult::default();
            result.name = TopicName(str_bytes(name.clone()));
            let outcome = if topic.assignments.as_ref().is_some_and(|a| !a.is_empty()) {
                Err((
                    errors::INVALID_REPLICA_ASSIGNMENT,
                    "kappa is a single node: manual replica assignments are not supported".to_owned(),
                ))
            } else if request.validate_only {
                self.log.validate_add_partitions(&name, topic.count).map_err(failure)
            } else {
                let log = self.log.clone();
                let (name, count) = (name.clone(), topic.count);
                blocking(move || log.add_partitions(&name, count)).await.map_err(failure)
            };
            if let Err((code, message)) = outcome {
                result.error_code = code;
                result.error_message = Some(str_bytes(message));
            }
            response.results.push(result);
        }
        response
    }

    pub(super) fn describe_configs(&self, request: DescribeConfigsRequest) -> DescribeConfigsResponse {
        let mut response = DescribeConfigsResponse::default();
        for resource in request.resources {
            let mut result = DescribeConfigsResult::default();
            result.resource_type = resource.resource_type;
            result.resource_name = resource.resource_name.clone();
            let wanted =
                resource.configuration_keys.map(|keys| keys.iter().map(|k| k.as_str().to_owned()).collect::<Vec<_>>());
            match resource.resource_type {
                RESOURCE_TOPIC => match self.log.topic(resource.resource_name.as_str()) {
                    Ok(topic) => {
                        result.configs = topic
                            .config()
                            .entries()
                            .into_iter()
                            .filter(|(key, _, _)| wanted.as_ref().is_none_or(|w| w.iter().any(|k| k == key)))
                            .map(|(key, value, overridden)| {
                                let mut c = DescribeConfigsResourceResult::default();
                                c.name = str_bytes(key);
                                c.value = Some(str_bytes(value));
                                c.config_source = if overridden { SOURCE_TOPIC } else { SOURCE_DEFAULT };
                                c
                            })
                            .collect();
                    }
                    Err(e) => {
                        result.error_code = log_code(&e);
                        result.error_message = Some(str_bytes(e.to_string()));
                    }
                },
                // Kafka: "" is the cluster-wide dynamic defaults (kappa has none), the node's
                // id its own configs; any other name is refused.
                RESOURCE_BROKER if resource.resource_name.is_empty() => {}
                RESOURCE_BROKER if resource.resource_name.as_str() == NODE_ID.to_string() => {
                    result.configs = broker_configs(&self.config)
                        .into_iter()
                        .filter(|c| wanted.as_ref().is_none_or(|w| w.iter().any(|k| k == c.name.as_str())))
                        .collect();
                }
                RESOURCE_BROKER => {
                    result.error_code = errors::INVALID_REQUEST;
                    result.error_message = Some(str_bytes(format!(
                        "Unexpected broker id, expected {NODE_ID} or empty string, but received {}",
                        resource.resource_name.as_str()
                    )));
                }
                other => {
                    result.error_code = errors::INVALID_REQUEST;
                    result.error_message =
                        Some(str_bytes(format!("resource type {other} is not supported; use 2 (topic) or 4 (broker)")));
                }
            }
            response.results.push(result);
        }
        response
    }

    pub(super) async fn alter_configs(&self, request: AlterConfigsRequest) -> AlterConfigsResponse {
        let mut response = AlterConfigsResponse::default();
        for resource in request.resources {
            let overrides: BTreeMap<String, String> = resource
                .configs
                .iter()
                .filter_map(|c| c.value.as_ref().map(|v| (c.name.as_str().to_owned(), v.as_str().to_owned())))
                .collect();
            let name = resource.resource_name.as_str().to_owned();
            let outcome = match self.check_topic_resource(resource.resource_type, &name) {
                Err(e) => Err(e),
                Ok(()) if request.validate_only => TopicConfig::from_overrides(&overrides).map(|_| ()).map_err(failure),
                // Written durably (fsyncs): off the connection's task, as other log writes.
                Ok(()) => {
                    let log = self.log.clone();
                    blocking(move || log.set_topic_config(&name, &overrides)).await.map_err(failure)
                }
            };
            let mut result = AlterConfigsResourceResponse::default();
            result.resource_type = resource.resource_type;
            result.resource_name = resource.resource_name;
            if let Err((code, message)) = outcome {
                result.error_code = code;
                result.error_message = Some(str_bytes(message));
            }
            response.responses.push(result);
        }
        response
    }

    pub(super) async fn incremental_alter_configs(
        &self,
        request: IncrementalAlterConfigsRequest,
    ) -> IncrementalAlterConfigsResponse {
        let mut response = IncrementalAlterConfigsResponse::default();
        for resource in request.resources {
            let name = resource.resource_name.as_str().to_owned();
            let changes: Result<BTreeMap<String, Option<String>>, Failure> = resource
                .configs
                .iter()
                .map(|c| match c.config_operation {
                    OP_SET => Ok((
                        c.name.as_str().to_owned(),
                        Some(c.value.as_ref().map(|v| v.as_str().to_owned()).unwrap_or_default()),
                    )),
                    OP_DELETE => Ok((c.name.as_str().to_owned(), None)),
                    op => Err((
                        errors::INVALID_REQUEST,
                        format!(
                            "config operation {op} on '{}' is not supported; use SET (0) or DELETE (1)",
                            c.name.as_str()
                        ),
                    )),
                })
                .collect();
            let outcome = match self.check_topic_resource(resource.resource_type, &name).and(changes) {
                Err(e) => Err(e),
                Ok(changes) if request.validate_only => self
                    .log
                    .topic(&name)
                    .map_err(failure)
                    .and_then(|topic| topic.config().with_changes(&changes).map(|_| ()).map_err(failure)),
                Ok(changes) => {
                    let log = self.log.clone();
                    blocking(move || log.alter_topic_config(&name, &changes)).await.map_err(failure)
                }
            };
            let mut result = IncrementalResult::default();
            result.resource_type = resource.resource_type;
            result.resource_name = resource.resource_name;
            if let Err((code, message)) = outcome {
                result.error_code = code;
                result.error_message = Some(str_bytes(message));
            }
            response.responses.push(result);
        }
        response
    }

    fn check_topic_resource(&self, resource_type: i8, name: &str) -> Result<(), Failure> {
        if resource_type != RESOURCE_TOPIC {
            return Err((
                errors::INVALID_REQUEST,
                "only topic configs (resource type 2) can be altered; broker settings are command-line flags"
                    .to_owned(),
            ));
        }
        self.log.topic(name).map(|_| ()).map_err(failure)
    }
}

/// The broker's configs under Kafka's names, as (name, value, type). Topic defaults are
/// fixed in the log (`TopicConfig::default`); the rest come from `config`.
fn broker_entries(config: &BrokerConfig) -> Vec<(&'static str, String, i8)> {
    let topic = TopicConfig::default();
    let topic_default = |key: &str| topic.get(key).unwrap_or_default();
    vec![
        ("broker.id", NODE_ID.to_string(), TYPE_INT),
        ("node.id", NODE_ID.to_string(), TYPE_INT),
        ("auto.create.topics.enable", config.auto_create_topics.to_string(), TYPE_BOOLEAN),
        ("num.partitions", config.default_partitions.to_string(), TYPE_INT),
        ("default.replication.factor", "1".to_owned(), TYPE_INT),
        ("offsets.topic.replication.factor", "1".to_owned(), TYPE_SHORT),
        ("transaction.state.log.replication.factor", "1".to_owned(), TYPE_SHORT),
        ("min.insync.replicas", "1".to_owned(), TYPE_INT),
        ("fetch.max.bytes", config.fetch_response_bytes_max.to_string(), TYPE_INT),
        ("message.max.bytes", topic_default(kappa_log::config::MAX_MESSAGE_BYTES), TYPE_INT),
        ("log.retention.ms", topic_default(kappa_log::config::RETENTION_MS), TYPE_LONG),
        ("log.retention.bytes", topic_default(kappa_log::config::RETENTION_BYTES), TYPE_LONG),
        ("log.segment.bytes", topic_default(kappa_log::config::SEGMENT_BYTES), TYPE_INT),
        ("log.cleanup.policy", topic_default(kappa_log::config::CLEANUP_POLICY), TYPE_LIST),
        ("group.min.session.timeout.ms", config.group.session_timeout_ms_min.to_string(), TYPE_INT),
        ("group.max.session.timeout.ms", config.group.session_timeout_ms_max.to_string(), TYPE_INT),
        ("group.initial.rebalance.delay.ms", config.group.initial_rebalance_delay_ms.to_string(), TYPE_INT),
        ("group.max.size", config.group.group_members_max.to_string(), TYPE_INT),
        ("transaction.max.timeout.ms", config.txn.max_timeout_ms.to_string(), TYPE_INT),
        ("transactional.id.expiration.ms", config.txn.id_expiration_ms.to_string(), TYPE_INT),
    ]
}

/// DescribeConfigs entries for this node: read-only (kappa's settings are command-line
/// flags), STATIC_BROKER_CONFIG where a setting differs from its default, as Kafka marks
/// what server.properties sets.
fn broker_configs(config: &BrokerConfig) -> Vec<DescribeConfigsResourceResult> {
    let defaults = broker_entries(&BrokerConfig::default());
    broker_entries(config)
        .into_iter()
        .zip(defaults)
        .map(|((name, value, config_type), (_, default, _))| {
            let mut c = DescribeConfigsResourceResult::default();
            c.name = str_bytes(name);
            c.config_source = if value == default { SOURCE_DEFAULT } else { SOURCE_STATIC_BROKER };
            c.value = Some(str_bytes(value));
            c.read_only = true;
            c.config_type = config_type;
            c
        })
        .collect()
}

/// Manual replica assignments as Kafka takes them: instead of a partition count and
/// replication factor (both -1), partitions 0..n each on this node alone.
fn check_assignments(topic: &kafka_protocol::messages::create_topics_request::CreatableTopic) -> Result<(), Failure> {
    if topic.assignments.is_empty() {
        return Ok(());
    }
    if topic.num_partitions != -1 || topic.replication_factor != -1 {
        return Err((
            errors::INVALID_REQUEST,
            "Both numPartitions or replicationFactor and replicasAssignments were set. Both cannot be used at the same time."
                .to_owned(),
        ));
    }
    let mut indexes: Vec<i32> = topic.assignments.iter().map(|a| a.partition_index).collect();
    indexes.sort_unstable();
    if indexes.iter().zip(0..).any(|(&index, expected)| index != expected) {
        return Err((errors::INVALID_REPLICA_ASSIGNMENT, "partitions should be 0-based and consecutive".to_owned()));
    }
    if let Some(a) = topic.assignments.iter().find(|a| a.broker_ids.iter().map(|b| b.0).ne([NODE_ID])) {
        return Err((
            errors::INVALID_REPLICA_ASSIGNMENT,
            format!(
                "partition {} is assigned to brokers {:?}; kappa is a single node (id {NODE_ID}), so every partition's replicas must be [{NODE_ID}]",
                a.partition_index,
                a.broker_ids.iter().map(|b| b.0).collect::<Vec<_>>()
            ),
        ));
    }
    Ok(())
}
