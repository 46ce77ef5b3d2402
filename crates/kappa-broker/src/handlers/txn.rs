//! Transactions: InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn, TxnOffsetCommit,
//! EndTxn — thin adapters over the transaction coordinator.
//!
//! Delayed requests: EndTxn before v5 carries nothing that names *which* transaction it
//! ends, so an EndTxn held up in the network could end the producer's next transaction.
//! A client sends a transactional id's transaction-coordinator requests (InitProducerId,
//! AddPartitionsToTxn, AddOffsetsToTxn, EndTxn) over one connection at a time and moves
//! only to newer ones, so such a request arriving on a connection older than the newest
//! one that id has used must be a straggler: it is refused (INVALID_TXN_STATE) without
//! touching the transaction. TxnOffsetCommit is exempt: it goes to the group coordinator,
//! which librdkafka reaches over a separate connection.

use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest, AddPartitionsToTxnResponse,
    EndTxnRequest, EndTxnResponse, InitProducerIdRequest, InitProducerIdResponse, ProducerId, TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
};
use kappa_coordinator::txn::TRANSACTIONAL_ID_BYTES_LIMIT;
use kappa_coordinator::{CommittedOffset, RESERVED_TRANSACTIONAL_ID_PREFIX};

use super::Broker;
use super::errors::{self, group_code, txn_code};
use crate::server::Peer;

impl Broker {
    /// False for a request on a connection older than the newest one `transactional_id` used.
    /// Also false for kappa's reserved ids (`__kappa.`), which no client may use.
    fn admit_from(&self, transactional_id: &str, peer: &Peer) -> bool {
        if transactional_id.starts_with(RESERVED_TRANSACTIONAL_ID_PREFIX) {
            tracing::warn!(transactional_id, "refusing a client's request for a transactional id reserved for kappa");
            return false;
        }
        // An id the coordinator refuses for its length is never remembered: the map must not
        // hold what the coordinator would not.
        if transactional_id.len() > self.config.txn.id_bytes_max.min(TRANSACTIONAL_ID_BYTES_LIMIT) {
            return true;
        }
        let mut newest = self.txn_connections.lock().unwrap_or_else(|e| e.into_inner());
        // At most as many ids as the coordinator keeps; past that, new ids go unremembered
        // (admitted, without the straggler check) until an expiry pass prunes the map.
        if newest.len() >= self.config.txn.ids_max && !newest.contains_key(transactional_id) {
            tracing::debug!(transactional_id, "transactional_ids_max connections remembered; not remembering this id");
            return true;
        }
        let seen = newest.entry(transactional_id.to_owned()).or_insert(peer.connection_id);
        if peer.connection_id < *seen {
            tracing::warn!(
                transactional_id,
                connection = peer.connection_id,
                newest = *seen,
                "refusing a transactional request from a superseded connection"
            );
            return false;
        }
        *seen = peer.connection_id;
        true
    }

    pub(super) async fn init_producer_id(&self, request: InitProducerIdRequest, peer: &Peer) -> InitProducerIdResponse {
        let transactional_id = request.transactional_id.as_ref().map(|t| t.0.as_str().to_owned());
        if transactional_id.as_deref().is_some_and(|id| !id.is_empty() && !self.admit_from(id, peer)) {
            let mut response = InitProducerIdResponse::default();
            let reserved =
                transactional_id.as_deref().is_some_and(|id| id.starts_with(RESERVED_TRANSACTIONAL_ID_PREFIX));
            response.error_code =
                if reserved { errors::TRANSACTIONAL_ID_AUTHORIZATION_FAILED } else { errors::INVALID_TXN_STATE };
            response.producer_id = ProducerId(-1);
            response.producer_epoch = -1;
            response.ongoing_txn_producer_id = ProducerId(-1);
            response.ongoing_txn_producer_epoch = -1;
            return response;
        }
        // v0-2 carry no producer id/epoch: treat them as -1 (a fresh initialisation).
        let expected = (request.producer_id.0 >= 0).then_some((request.producer_id.0, request.producer_epoch));
        let mut response = InitProducerIdResponse::default();
        match self.txns.init_producer_id(transactional_id.as_deref(), request.transaction_timeout_ms, expected).await {
            Ok((producer_id, epoch)) => {
                response.producer_id = ProducerId(producer_id);
                response.producer_epoch = epoch;
            }
            Err(e) => {
                response.error_code = txn_code(&e);
                response.producer_id = ProducerId(-1);
                response.producer_epoch = -1;
            }
        }
        response.ongoing_txn_producer_id = ProducerId(-1);
        response.ongoing_txn_producer_epoch = -1;
        response
    }

    pub(super) async fn add_partitions_to_txn(
        &self,
        request: AddPartitionsToTxnRequest,
        peer: &Peer,
    ) -> AddPartitionsToTxnResponse {
        let id = request.v3_and_below_transactional_id.0.as_str().to_owned();
        let admitted = self.admit_from(&id, peer);
        let (producer_id, epoch) = (request.v3_and_below_producer_id.0, request.v3_and_below_producer_epoch);
        let mut wanted = Vec::new();
        let mut unknown = std::collections::HashSet::new();
        for topic in &request.v3_and_below_topics {
            for &p in &topic.partitions {
                let tp = (topic.name.0.as_str().to_owned(), p);
                if self.log.partition(&tp.0, p).is_ok() {
                    wanted.push(tp)
                } else {
                    unknown.insert(tp);
                }
            }
        }
        // Kafka adds nothing when any partition is unknown: the others get OPERATION_NOT_ATTEMPTED.
        let code_for_known = if !admitted {
            errors::INVALID_TXN_STATE
        } else if !unknown.is_empty() {
            OPERATION_NOT_ATTEMPTED
        } else {
            match self.txns.add_partitions(&id, producer_id, epoch, &wanted).await {
                Ok(()) => errors::NONE,
                Err(e) => txn_code(&e),
            }
        };
        let mut response = AddPartitionsToTxnResponse::default();
        for topic in request.v3_and_below_topics {
            let mut result = AddPartitionsToTxnTopicResult::default();
            result.results_by_partition = topic
                .partitions
                .iter()
                .map(|&p| {
                    let mut r = AddPartitionsToTxnPartitionResult::default();
                    r.partition_index = p;
                    r.partition_error_code = if unknown.contains(&(topic.name.0.as_str().to_owned(), p)) {
                        errors::UNKNOWN_TOPIC_OR_PARTITION
                    } else {
                        code_for_known
                    };
                    r
                })
                .collect();
            result.name = topic.name;
            response.results_by_topic_v3_and_below.push(result);
        }
        response
    }

    pub(super) async fn add_offsets_to_txn(
        &self,
        request: AddOffsetsToTxnRequest,
        peer: &Peer,
    ) -> AddOffsetsToTxnResponse {
        let mut response = AddOffsetsToTxnResponse::default();
        if !self.admit_from(request.transactional_id.0.as_str(), peer) {
            response.error_code = errors::INVALID_TXN_STATE;
        } else if let Err(e) = self
            .txns
            .add_offsets(request.transactional_id.0.as_str(), request.producer_id.0, request.producer_epoch)
            .await
        {
            response.error_code = txn_code(&e);
        }
        response
    }

    pub(super) async fn txn_offset_commit(&self, request: TxnOffsetCommitRequest) -> TxnOffsetCommitResponse {
        let group = request.group_id.0.as_str().to_owned();
        // v3+ name the consumer's generation (KIP-447): a producer whose consumer was
        // rebalanced out must not commit offsets for partitions now owned by another member.
        // Checked first, as Kafka does, so a zombie learns it was fenced from the group.
        let instance = request.group_instance_id.as_ref().map(|i| i.as_str());
        let member =
            self.groups.validate_txn_member(&group, request.generation_id, request.member_id.as_str(), instance);
        // TxnOffsetCommit goes to the *group* coordinator, which clients (librdkafka) reach
        // over a different connection than the transaction coordinator: no fence here.
        let check = match member {
            Err(e) => Err(group_code(&e)),
            Ok(()) => self
                .txns
                .check_offset_commit(request.transactional_id.0.as_str(), request.producer_id.0, request.producer_epoch)
                .await
                .map_err(|e| txn_code(&e)),
        };
        let now = self.log.clock().now_ms();
        let offsets: Vec<_> = request
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| {
                    let metadata = p.committed_metadata.as_ref().map(|m| m.as_str().to_owned()).unwrap_or_default();
                    (
                        (t.name.0.as_str().to_owned(), p.partition_index),
                        CommittedOffset {
                            offset: p.committed_offset,
                            leader_epoch: p.committed_leader_epoch,
                            metadata,
                            commit_timestamp: now,
                        },
                    )
                })
            })
            .collect();
        let code = match check {
            Err(code) => code,
            // The transaction stays locked (`_ongoing`) until the offsets are written.
            Ok(_ongoing) => match self
                .offsets
                .commit_transactional(request.producer_id.0, request.producer_epoch, &group, offsets)
                .await
            {
                Ok(()) => errors::NONE,
                Err(e) => group_code(&e),
            },
        };
        let mut response = TxnOffsetCommitResponse::default();
        for topic in request.topics {
            let mut t = TxnOffsetCommitResponseTopic::default();
            t.partitions = topic
                .partitions
                .iter()
                .map(|p| {
                    let mut r = TxnOffsetCommitResponsePartition::default();
                    r.partition_index = p.partition_index;
                    r.error_code = code;
                    r
                })
                .collect();
            t.name = topic.name;
            response.topics.push(t);
        }
        response
    }

    pub(super) async fn end_txn(&self, request: EndTxnRequest, peer: &Peer) -> EndTxnResponse {
        let mut response = EndTxnResponse::default();
        if !self.admit_from(request.transactional_id.0.as_str(), peer) {
            response.error_code = errors::INVALID_TXN_STATE;
        } else if let Err(e) = self
            .txns
            .end(request.transactional_id.0.as_str(), request.producer_id.0, request.producer_epoch, request.committed)
            .await
        {
            response.error_code = txn_code(&e);
        }
        response
    }
}

/// Kafka's code for partitions left out because another one in the request failed.
const OPERATION_NOT_ATTEMPTED: i16 = 55;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kappa_coordinator::TxnConfig;
    use kappa_log::{Log, LogOptions};

    use super::*;
    use crate::BrokerConfig;

    fn peer(connection_id: u64) -> Peer {
        Peer { connection_id, addr: "127.0.0.1:1".parse().unwrap() }
    }

    #[tokio::test]
    async fn newest_connections_are_remembered_for_valid_ids_only_and_at_most_ids_max() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(dir.path(), LogOptions::default()).unwrap().0);
        let txn = TxnConfig { ids_max: 3, id_bytes_max: 16, ..TxnConfig::default() };
        let broker = Broker::open(log, BrokerConfig { txn, ..BrokerConfig::default() }).await.unwrap();
        let remembered = || broker.txn_connections.lock().unwrap().len();

        assert!(broker.admit_from(&"x".repeat(17), &peer(1)), "the coordinator answers it");
        assert_eq!(remembered(), 0, "an id too long for the coordinator is not remembered");

        for id in ["a", "b", "c", "d", "e"] {
            assert!(broker.admit_from(id, &peer(2)));
        }
        assert_eq!(remembered(), 3, "at most ids_max ids");
        // Remembered ids keep their straggler check.
        assert!(!broker.admit_from("a", &peer(1)));
    }
}
