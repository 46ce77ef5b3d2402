//! ListOffsets v0 (kafka-node).
//!
//! ```text
//! request:  replica_id i32, [topic string, [partition i32, timestamp i64, max_num_offsets i32]]
//! response: [topic string, [partition i32, error_code i16, old_style_offsets [i64]]]
//! ```
//! `max_num_offsets` is dropped: the broker answers one offset, as later versions do (Kafka
//! would add older segments' base offsets after it; kafka-node asks for one). A timestamp
//! past the newest record answers the end of the log, as Kafka's v0 does (see
//! `handlers::fetch::offset_for`).

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{BrokerId, ListOffsetsRequest, ListOffsetsResponse};

use super::LegacyError;
use super::wire::{Reader, put_array_len, put_string};

pub fn decode_request(body: &mut Bytes) -> Result<ListOffsetsRequest, LegacyError> {
    let mut r = Reader::new(body);
    let replica_id = r.i32()?;
    let topics = r.array("topics", 6, |r| {
        let name = r.string("topic")?;
        let partitions = r.array("partitions", 16, |r| {
            let partition = ListOffsetsPartition::default().with_partition_index(r.i32()?).with_timestamp(r.i64()?);
            let _max_num_offsets = r.i32()?;
            Ok(partition)
        })?;
        Ok(ListOffsetsTopic::default().with_name(name.into()).with_partitions(partitions))
    })?;
    Ok(ListOffsetsRequest::default().with_replica_id(BrokerId(replica_id)).with_topics(topics))
}

pub fn encode_response(resp: &ListOffsetsResponse, out: &mut BytesMut) {
    put_array_len(out, resp.topics.len());
    for topic in &resp.topics {
        put_string(out, &topic.name);
        put_array_len(out, topic.partitions.len());
        for p in &topic.partitions {
            out.put_i32(p.partition_index);
            out.put_i16(p.error_code);
            // An error or "no offset" (-1) is an empty list in the old layout.
            if p.error_code == 0 && p.offset >= 0 {
                put_array_len(out, 1);
                out.put_i64(p.offset);
            } else {
                put_array_len(out, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::list_offsets_response::{ListOffsetsPartitionResponse, ListOffsetsTopicResponse};
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn decodes_v0() {
        let mut b = BytesMut::new();
        b.put_i32(-1);
        put_array_len(&mut b, 1);
        put_string(&mut b, "t");
        put_array_len(&mut b, 1);
        b.put_i32(3);
        b.put_i64(-1);
        b.put_i32(1);
        let req = decode_request(&mut b.freeze()).unwrap();
        assert_eq!(req.replica_id, BrokerId(-1));
        assert_eq!(&*req.topics[0].name, "t");
        let p = &req.topics[0].partitions[0];
        assert_eq!((p.partition_index, p.timestamp), (3, -1));
    }

    #[test]
    fn encodes_old_style_offsets() {
        let resp = ListOffsetsResponse::default().with_topics(vec![
            ListOffsetsTopicResponse::default().with_name(StrBytes::from_static_str("t").into()).with_partitions(vec![
                ListOffsetsPartitionResponse::default().with_partition_index(0).with_offset(42),
                ListOffsetsPartitionResponse::default().with_partition_index(1).with_error_code(3).with_offset(-1),
            ]),
        ]);
        let mut out = BytesMut::new();
        encode_response(&resp, &mut out);
        let mut expected = BytesMut::new();
        put_array_len(&mut expected, 1);
        put_string(&mut expected, "t");
        put_array_len(&mut expected, 2);
        expected.put_i32(0);
        expected.put_i16(0);
        put_array_len(&mut expected, 1);
        expected.put_i64(42);
        expected.put_i32(1);
        expected.put_i16(3);
        put_array_len(&mut expected, 0);
        assert_eq!(out, expected);
    }
}
