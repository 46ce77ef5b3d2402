//! Fetch v0-3 (kafka-node's Consumer uses v0, ConsumerGroup v2).
//!
//! ```text
//! request:  replica_id i32, max_wait_ms i32, min_bytes i32, max_bytes i32 (v3+),
//!           [topic string, [partition i32, fetch_offset i64, partition_max_bytes i32]]
//! response: throttle_time_ms i32 (v1+),
//!           [topic string, [partition i32, error_code i16, high_watermark i64, message_set bytes]]
//! ```
//! These clients cannot read magic 2: the handler answers with message sets already
//! down-converted to magic 0 (v0/v1) or magic 1 (v2/v3) ([`super::message_set::down_convert`]), on
//! a blocking thread — converting re-encodes every record and inflates compressed batches,
//! work for neither a runtime worker nor this encoder, which runs on the connection's task.

use bytes::{BufMut, Bytes};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse};
use tracing::warn;

use super::LegacyError;
use super::produce::is_message_set;
use super::wire::{Reader, put_array_len, put_bytes, put_string};

/// UNKNOWN_SERVER_ERROR, for a partition the handler answered with record batches.
const UNKNOWN_SERVER_ERROR: i16 = -1;

pub fn decode_request(version: i16, body: &mut Bytes) -> Result<FetchRequest, LegacyError> {
    let mut r = Reader::new(body);
    let replica_id = r.i32()?;
    let max_wait_ms = r.i32()?;
    let min_bytes = r.i32()?;
    let max_bytes = if version >= 3 { r.i32()? } else { i32::MAX };
    let topics = r.array("topics", 6, |r| {
        let topic = r.string("topic")?;
        let partitions = r.array("partitions", 16, |r| {
            Ok(FetchPartition::default()
                .with_partition(r.i32()?)
                .with_fetch_offset(r.i64()?)
                .with_partition_max_bytes(r.i32()?))
        })?;
        Ok(FetchTopic::default().with_topic(topic.into()).with_partitions(partitions))
    })?;
    Ok(FetchRequest::default()
        .with_replica_id(BrokerId(replica_id))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(min_bytes)
        .with_max_bytes(max_bytes)
        .with_isolation_level(0)
        .with_topics(topics))
}

/// Message format an old Fetch version can read.
pub fn magic_for(version: i16) -> i8 {
    if version >= 2 { 1 } else { 0 }
}

/// Writes the answer into `out`: a `BytesMut`, or a [`crate::frame::SpliceBuf`] that
/// splices the message sets instead of copying them.
pub fn encode_response<B: BufMut>(version: i16, resp: &FetchResponse, out: &mut B) {
    if version >= 1 {
        out.put_i32(resp.throttle_time_ms);
    }
    put_array_len(out, resp.responses.len());
    for topic in &resp.responses {
        put_string(out, &topic.topic);
        put_array_len(out, topic.partitions.len());
        for p in &topic.partitions {
            let records = p.records.as_deref().unwrap_or_default();
            // Magic 2 would fail the client's whole fetch: this partition fails instead.
            let (error_code, set) = match records.is_empty() || is_message_set(records) {
                true => (p.error_code, records),
                false => {
                    warn!(
                        topic = %&*topic.topic,
                        partition = p.partition_index,
                        "a fetch v{version} answer holds record batches: the handler must down-convert them to message sets"
                    );
                    (UNKNOWN_SERVER_ERROR, &[][..])
                }
            };
            out.put_i32(p.partition_index);
            out.put_i16(error_code);
            out.put_i64(p.high_watermark);
            put_bytes(out, set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::message_set;
    use bytes::BytesMut;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::protocol::StrBytes;
    use kappa_log::records::{BatchBuilder, NewRecord};

    fn request(version: i16) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i32(-1);
        b.put_i32(100);
        b.put_i32(1);
        if version >= 3 {
            b.put_i32(1 << 20);
        }
        put_array_len(&mut b, 1);
        put_string(&mut b, "events");
        put_array_len(&mut b, 1);
        b.put_i32(0);
        b.put_i64(17);
        b.put_i32(4096);
        b.freeze()
    }

    #[test]
    fn decodes_v0_to_v3() {
        for version in 0..=3 {
            let req = decode_request(version, &mut request(version)).unwrap();
            assert_eq!(req.max_wait_ms, 100);
            assert_eq!(req.max_bytes, if version >= 3 { 1 << 20 } else { i32::MAX });
            let p = &req.topics[0].partitions[0];
            assert_eq!((p.partition, p.fetch_offset, p.partition_max_bytes), (0, 17, 4096));
        }
    }

    fn response(records: Bytes) -> FetchResponse {
        FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default().with_topic(StrBytes::from_static_str("events").into()).with_partitions(
                vec![
                    PartitionData::default()
                        .with_partition_index(0)
                        .with_high_watermark(18)
                        .with_records(Some(records)),
                ],
            ),
        ])
    }

    fn batch() -> Bytes {
        let mut builder = BatchBuilder::new().record(NewRecord::new(Some(b"k"), Some(b"v"), 1000));
        builder.base_offset = 17;
        Bytes::from(builder.build())
    }

    #[test]
    fn encodes_the_down_converted_records_as_they_are() {
        for version in 0..=3 {
            let set = message_set::down_convert(&batch(), magic_for(version), 17, 1 << 20, message_set::SetLimit::NONE)
                .unwrap();
            let mut out = BytesMut::new();
            encode_response(version, &response(set.clone()), &mut out);
            let mut expected = BytesMut::new();
            if version >= 1 {
                expected.put_i32(0);
            }
            put_array_len(&mut expected, 1);
            put_string(&mut expected, "events");
            put_array_len(&mut expected, 1);
            expected.put_i32(0);
            expected.put_i16(0);
            expected.put_i64(18);
            put_bytes(&mut expected, &set);
            assert_eq!(out, expected, "v{version}");
            let msgs = message_set::decode(&set, 1 << 20, false).unwrap();
            assert_eq!(msgs[0].offset, 17);
            assert_eq!(msgs[0].magic, magic_for(version));
        }
    }

    #[test]
    fn record_batches_left_unconverted_fail_their_partition() {
        let mut out = BytesMut::new();
        encode_response(0, &response(batch()), &mut out);
        let mut expected = BytesMut::new();
        put_array_len(&mut expected, 1);
        put_string(&mut expected, "events");
        put_array_len(&mut expected, 1);
        expected.put_i32(0);
        expected.put_i16(UNKNOWN_SERVER_ERROR);
        expected.put_i64(18);
        put_bytes(&mut expected, &[]);
        assert_eq!(out, expected);
    }
}
