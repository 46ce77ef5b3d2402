//! Metadata (with topic auto-creation) and FindCoordinator.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kappa_coordinator::{CONSUMER_OFFSETS_TOPIC, TRANSACTION_STATE_TOPIC};
use kappa_log::{LogError, Topic};

use super::errors::{self, log_code};
use super::{Broker, NODE_ID, blocking, str_bytes};

/// A topic's id (KIP-516): random at creation and kept by the log, so a topic deleted and
/// created again under the same name has a new one.
pub(crate) fn topic_id(topic: &Topic) -> uuid::Uuid {
    uuid::Uuid::from_bytes(topic.id())
}

pub(crate) fn is_internal(name: &str) -> bool {
    name == CONSUMER_OFFSETS_TOPIC || name == TRANSACTION_STATE_TOPIC
}

impl Broker {
    pub(super) async fn metadata(&self, request: MetadataRequest, version: i16) -> MetadataResponse {
        // v0: an empty list means every topic; v1+: null means every topic. v10+ may name a
        // topic by its id instead.
        let requested: Option<Vec<Wanted>> = match request.topics {
            None => None,
            Some(topics) if topics.is_empty() && version == 0 => None,
            Some(topics) => Some(
                topics
                    .into_iter()
                    .filter_map(|t| match t.name {
                        // A name, unless it is empty beside an id (clients send null there; be
                        // lenient). Lookups by id are Metadata v12's (a null name in the answer
                        // is v12's too): before it, an id is ignored.
                        Some(name) if !name.is_empty() || t.topic_id.is_nil() || version < 12 => {
                            Some(Wanted::Name(name.0.as_str().to_owned()))
                        }
                        _ => (!t.topic_id.is_nil() && version >= 12).then_some(Wanted::Id(t.topic_id)),
                    })
                    .collect(),
            ),
        };
        let auto_create = self.config.auto_create_topics && (version < 4 || request.allow_auto_topic_creation);
        let topics = match requested {
            None => self.log.topics().iter().map(|t| describe_topic(t.name(), Ok(t.clone()))).collect(),
            Some(wanted) => {
                // Built once, and only when ids are asked for: a lookup each would be quadratic.
                let by_id: HashMap<uuid::Uuid, Arc<Topic>> = if wanted.iter().any(|w| matches!(w, Wanted::Id(_))) {
                    self.log.topics().into_iter().map(|t| (topic_id(&t), t)).collect()
                } else {
                    HashMap::new()
                };
                let mut out = Vec::with_capacity(wanted.len());
                for w in wanted {
                    out.push(match w {
                        Wanted::Name(name) => describe_topic(&name, self.topic_or_create(&name, auto_create).await),
                        Wanted::Id(id) => match by_id.get(&id) {
                            Some(topic) => describe_topic(topic.name(), Ok(topic.clone())),
                            None => unknown_topic_id(id),
                        },
                    });
                }
                out
            }
        };
        let mut response = MetadataResponse::default();
        response.brokers = vec![self.broker_entry()];
        response.cluster_id = Some(str_bytes(self.config.cluster_id.clone()));
        response.controller_id = BrokerId(NODE_ID);
        response.topics = topics;
        response.cluster_authorized_operations = i32::MIN;
        response
    }

    fn broker_entry(&self) -> MetadataResponseBroker {
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(NODE_ID);
        broker.host = str_bytes(self.config.advertised_host.clone());
        broker.port = self.config.advertised_port;
        broker
    }

    /// The topic, created with the default partition count if missing and allowed.
    pub(super) async fn topic_or_create(&self, name: &str, auto_create: bool) -> Result<Arc<Topic>, LogError> {
        match self.log.topic(name) {
            Err(LogError::UnknownTopic(_)) if auto_create && !is_internal(name) => {
                let log = self.log.clone();
                let (name, partitions) = (name.to_owned(), self.config.default_partitions);
                blocking(move || match log.create_topic(&name, partitions, &BTreeMap::new()) {
                    Err(LogError::TopicExists(_)) => log.topic(&name),
                    other => other,
                })
                .await
            }
            other => other,
        }
    }

    pub(super) fn find_coordinator(&self, request: FindCoordinatorRequest, version: i16) -> FindCoordinatorResponse {
        let mut response = FindCoordinatorResponse::default();
        if version >= 4 {
            response.coordinators = request
                .coordinator_keys
                .into_iter()
                .map(|key| {
                    let mut c = Coordinator::default();
                    c.key = key;
                    c.node_id = BrokerId(NODE_ID);
                    c.host = str_bytes(self.config.advertised_host.clone());
                    c.port = self.config.advertised_port;
                    c
                })
                .collect();
            return response;
        }
        response.node_id = BrokerId(NODE_ID);
        response.host = str_bytes(self.config.advertised_host.clone());
        response.port = self.config.advertised_port;
        response
    }
}

/// A topic a Metadata request asks about.
enum Wanted {
    Name(String),
    Id(uuid::Uuid),
}

/// Kafka's answer for an id it does not know: no name, the id, UNKNOWN_TOPIC_ID.
fn unknown_topic_id(id: uuid::Uuid) -> MetadataResponseTopic {
    let mut out = MetadataResponseTopic::default();
    out.name = None;
    out.topic_id = id;
    out.error_code = errors::UNKNOWN_TOPIC_ID;
    out.topic_authorized_operations = i32::MIN;
    out
}

fn describe_topic(name: &str, topic: Result<Arc<Topic>, LogError>) -> MetadataResponseTopic {
    let mut out = MetadataResponseTopic::default();
    out.name = Some(TopicName(str_bytes(name)));
    out.topic_authorized_operations = i32::MIN;
    match topic {
        Ok(topic) => {
            out.topic_id = topic_id(&topic);
            out.is_internal = is_internal(name);
            out.partitions = (0..topic.partition_count()).map(describe_partition).collect();
        }
        Err(e) => {
            out.error_code = if matches!(e, LogError::InvalidTopicName { .. }) {
                errors::INVALID_TOPIC_EXCEPTION
            } else {
                log_code(&e)
            }
        }
    }
    out
}

fn describe_partition(index: i32) -> MetadataResponsePartition {
    let mut p = MetadataResponsePartition::default();
    p.partition_index = index;
    p.leader_id = BrokerId(NODE_ID);
    p.leader_epoch = 0;
    p.replica_nodes = vec![BrokerId(NODE_ID)];
    p.isr_nodes = vec![BrokerId(NODE_ID)];
    p
}
