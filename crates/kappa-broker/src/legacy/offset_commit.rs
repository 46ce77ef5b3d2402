//! OffsetCommit v0-1 (kafka-node's Consumer uses v0).
//!
//! ```text
//! request v0: group_id string, [topic string, [partition i32, offset i64, metadata nullable string]]
//! request v1: group_id string, generation_id i32, member_id string,
//!             [topic string, [partition i32, offset i64, timestamp i64, metadata nullable string]]
//! response:   [topic string, [partition i32, error_code i16]]
//! ```
//! v0 commits outside any group generation: generation -1 and an empty member id, which a
//! coordinator accepts for a group with no members. The v1 commit timestamp is dropped.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic};
use kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
use kafka_protocol::protocol::StrBytes;

use super::LegacyError;
use super::wire::{Reader, put_array_len, put_string};

pub fn decode_request(version: i16, body: &mut Bytes) -> Result<OffsetCommitRequest, LegacyError> {
    let mut r = Reader::new(body);
    let group_id = r.string("group_id")?;
    let (generation, member_id) =
        if version >= 1 { (r.i32()?, r.string("member_id")?) } else { (-1, StrBytes::default()) };
    let topics = r.array("topics", 6, |r| {
        let name = r.string("topic")?;
        let partitions = r.array("partitions", 14, |r| {
            let index = r.i32()?;
            let offset = r.i64()?;
            if version >= 1 {
                let _commit_timestamp = r.i64()?;
            }
            let metadata = r.nullable_string("metadata")?;
            Ok(OffsetCommitRequestPartition::default()
                .with_partition_index(index)
                .with_committed_offset(offset)
                .with_committed_metadata(metadata))
        })?;
        Ok(OffsetCommitRequestTopic::default().with_name(name.into()).with_partitions(partitions))
    })?;
    Ok(OffsetCommitRequest::default()
        .with_group_id(group_id.into())
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(member_id)
        .with_retention_time_ms(-1)
        .with_topics(topics))
}

pub fn encode_response(resp: &OffsetCommitResponse, out: &mut BytesMut) {
    put_array_len(out, resp.topics.len());
    for topic in &resp.topics {
        put_string(out, &topic.name);
        put_array_len(out, topic.partitions.len());
        for p in &topic.partitions {
            out.put_i32(p.partition_index);
            out.put_i16(p.error_code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::wire::put_nullable_string;
    use kafka_protocol::messages::offset_commit_response::{OffsetCommitResponsePartition, OffsetCommitResponseTopic};

    fn request(version: i16) -> Bytes {
        let mut b = BytesMut::new();
        put_string(&mut b, "g");
        if version >= 1 {
            b.put_i32(5);
            put_string(&mut b, "m-1");
        }
        put_array_len(&mut b, 1);
        put_string(&mut b, "t");
        put_array_len(&mut b, 1);
        b.put_i32(2);
        b.put_i64(100);
        if version >= 1 {
            b.put_i64(123);
        }
        put_nullable_string(&mut b, Some("meta"));
        b.freeze()
    }

    #[test]
    fn decodes_v0_and_v1() {
        for version in 0..=1 {
            let req = decode_request(version, &mut request(version)).unwrap();
            assert_eq!(&*req.group_id, "g");
            let expected_gen = if version >= 1 { 5 } else { -1 };
            assert_eq!(req.generation_id_or_member_epoch, expected_gen);
            assert_eq!(&*req.member_id, if version >= 1 { "m-1" } else { "" });
            let p = &req.topics[0].partitions[0];
            assert_eq!((p.partition_index, p.committed_offset), (2, 100));
            assert_eq!(p.committed_metadata.as_deref(), Some("meta"));
        }
    }

    #[test]
    fn encodes_response() {
        let resp = OffsetCommitResponse::default().with_topics(vec![
            OffsetCommitResponseTopic::default().with_name(StrBytes::from_static_str("t").into()).with_partitions(
                vec![OffsetCommitResponsePartition::default().with_partition_index(2).with_error_code(25)],
            ),
        ]);
        let mut out = BytesMut::new();
        encode_response(&resp, &mut out);
        let mut expected = BytesMut::new();
        put_array_len(&mut expected, 1);
        put_string(&mut expected, "t");
        put_array_len(&mut expected, 1);
        expected.put_i32(2);
        expected.put_i16(25);
        assert_eq!(out, expected);
    }
}
