//! OffsetFetch v0 (kafka-node).
//!
//! ```text
//! request:  group_id string, [topic string, [partition i32]]
//! response: [topic string, [partition i32, offset i64, metadata nullable string, error_code i16]]
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{OffsetFetchRequest, OffsetFetchResponse};

use super::LegacyError;
use super::wire::{Reader, put_array_len, put_nullable_string, put_string};

pub fn decode_request(body: &mut Bytes) -> Result<OffsetFetchRequest, LegacyError> {
    let mut r = Reader::new(body);
    let group_id = r.string("group_id")?;
    let topics = r.array("topics", 6, |r| {
        let name = r.string("topic")?;
        let partitions = r.array("partitions", 4, |r| r.i32())?;
        Ok(OffsetFetchRequestTopic::default().with_name(name.into()).with_partition_indexes(partitions))
    })?;
    Ok(OffsetFetchRequest::default().with_group_id(group_id.into()).with_topics(Some(topics)))
}

pub fn encode_response(resp: &OffsetFetchResponse, out: &mut BytesMut) {
    put_array_len(out, resp.topics.len());
    for topic in &resp.topics {
        put_string(out, &topic.name);
        put_array_len(out, topic.partitions.len());
        for p in &topic.partitions {
            out.put_i32(p.partition_index);
            out.put_i64(p.committed_offset);
            put_nullable_string(out, p.metadata.as_deref());
            out.put_i16(p.error_code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::offset_fetch_response::{OffsetFetchResponsePartition, OffsetFetchResponseTopic};
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn decodes_v0() {
        let mut b = BytesMut::new();
        put_string(&mut b, "g");
        put_array_len(&mut b, 1);
        put_string(&mut b, "t");
        put_array_len(&mut b, 2);
        b.put_i32(0);
        b.put_i32(1);
        let req = decode_request(&mut b.freeze()).unwrap();
        assert_eq!(&*req.group_id, "g");
        let topics = req.topics.unwrap();
        assert_eq!(topics[0].partition_indexes, vec![0, 1]);
    }

    #[test]
    fn encodes_v0() {
        let resp = OffsetFetchResponse::default().with_topics(vec![
            OffsetFetchResponseTopic::default().with_name(StrBytes::from_static_str("t").into()).with_partitions(vec![
                OffsetFetchResponsePartition::default()
                    .with_partition_index(1)
                    .with_committed_offset(-1)
                    .with_metadata(None),
            ]),
        ]);
        let mut out = BytesMut::new();
        encode_response(&resp, &mut out);
        let mut expected = BytesMut::new();
        put_array_len(&mut expected, 1);
        put_string(&mut expected, "t");
        put_array_len(&mut expected, 1);
        expected.put_i32(1);
        expected.put_i64(-1);
        put_nullable_string(&mut expected, None);
        expected.put_i16(0);
        assert_eq!(out, expected);
    }
}
