//! Produce: each partition's batches are appended to the log (which validates them,
//! deduplicates idempotent retries, and acknowledges only after fsync). Partitions of one
//! request are written concurrently; errors are per partition.

use bytes::Bytes;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kappa_log::batch::{self, BatchHeader};
use kappa_log::{AppendOutcome, LogError};

use super::errors::{self, log_code};
use super::{Broker, blocking, str_bytes};

impl Broker {
    pub(super) async fn produce(&self, request: ProduceRequest) -> ProduceResponse {
        let mut response = ProduceResponse::default();
        let acks_valid = matches!(request.acks, -1..=1);
        let mut pending = Vec::new();
        for topic in request.topic_data {
            let name = topic.name.0.as_str().to_owned();
            for data in topic.partition_data {
                let partition = self.log.partition(&name, data.index);
                let records = data.records.unwrap_or_default();
                let task = tokio::spawn(async move {
                    if !acks_valid {
                        return Err((errors::INVALID_REQUIRED_ACKS, "acks must be -1, 0 or 1".to_owned()));
                    }
                    let partition = partition.map_err(|e| (log_code(&e), e.to_string()))?;
                    blocking(move || append_all(&partition, records)).await.map_err(|e| (log_code(&e), e.to_string()))
                });
                pending.push((name.clone(), data.index, task));
            }
        }
        for (name, index, task) in pending {
            let result = task.await.unwrap_or_else(|e| Err((errors::KAFKA_STORAGE_ERROR, e.to_string())));
            let mut p = PartitionProduceResponse::default();
            p.index = index;
            p.log_append_time_ms = -1;
            match result {
                Ok(outcome) => {
                    p.base_offset = outcome.base_offset;
                    p.log_append_time_ms = outcome.log_append_time.unwrap_or(-1);
                    p.log_start_offset = outcome.log_start_offset;
                }
                Err((code, message)) => {
                    tracing::debug!(topic = %name, partition = index, code, %message, "produce rejected");
                    p.error_code = code;
                    p.base_offset = -1;
                    p.error_message = Some(str_bytes(message));
                }
            }
            match response.responses.iter_mut().find(|t| t.name.0.as_str() == name) {
                Some(topic) => topic.partition_responses.push(p),
                None => {
                    let mut topic = TopicProduceResponse::default();
                    topic.name = kafka_protocol::messages::TopicName(str_bytes(name));
                    topic.partition_responses.push(p);
                    response.responses.push(topic);
                }
            }
        }
        response
    }
}

/// Appends every batch in `records` in order; the outcome reports the first batch's base
/// offset (Kafka's produce response carries one base offset per partition).
fn append_all(partition: &kappa_log::Partition, records: Bytes) -> Result<AppendOutcome, LogError> {
    let mut rest = records.as_ref();
    let mut first: Option<AppendOutcome> = None;
    if rest.is_empty() {
        return Err(LogError::InvalidBatch(batch::BatchError::Truncated { needed: batch::HEADER_BYTES, available: 0 }));
    }
    while !rest.is_empty() {
        let len = batch::batch_total_len(rest, kappa_log::config::MAX_MESSAGE_BYTES_LIMIT)?;
        if len > rest.len() {
            return Err(LogError::InvalidBatch(batch::BatchError::Truncated { needed: len, available: rest.len() }));
        }
        let (one, tail) = rest.split_at(len);
        BatchHeader::parse(one)?;
        let outcome = partition.append(one.to_vec())?;
        first.get_or_insert(outcome);
        rest = tail;
    }
    Ok(first.expect("at least one batch"))
}
