//! CreateTopics v0-1 (kafka-node's `createTopics`).
//!
//! ```text
//! request:  [name string, num_partitions i32, replication_factor i16,
//!            [partition_index i32, [broker_id i32]], [config_name string, config_value nullable string]],
//!           timeout_ms i32, validate_only bool (v1+)
//! response: [name string, error_code i16, error_message nullable string (v1+)]
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::create_topics_request::{
    CreatableReplicaAssignment, CreatableTopic, CreatableTopicConfig,
};
use kafka_protocol::messages::{BrokerId, CreateTopicsRequest, CreateTopicsResponse};

use super::LegacyError;
use super::wire::{Reader, put_array_len, put_nullable_string, put_string};

pub fn decode_request(version: i16, body: &mut Bytes) -> Result<CreateTopicsRequest, LegacyError> {
    let mut r = Reader::new(body);
    let topics = r.array("topics", 16, |r| {
        let name = r.string("name")?;
        let num_partitions = r.i32()?;
        let replication_factor = r.i16()?;
        let assignments = r.array("assignments", 8, |r| {
            let partition_index = r.i32()?;
            let broker_ids = r.array("broker_ids", 4, |r| r.i32().map(BrokerId))?;
            Ok(CreatableReplicaAssignment::default().with_partition_index(partition_index).with_broker_ids(broker_ids))
        })?;
        let configs = r.array("configs", 4, |r| {
            let name = r.string("config_name")?;
            let value = r.nullable_string("config_value")?;
            Ok(CreatableTopicConfig::default().with_name(name).with_value(value))
        })?;
        Ok(CreatableTopic::default()
            .with_name(name.into())
            .with_num_partitions(num_partitions)
            .with_replication_factor(replication_factor)
            .with_assignments(assignments)
            .with_configs(configs))
    })?;
    let timeout_ms = r.i32()?;
    let validate_only = if version >= 1 { r.bool()? } else { false };
    Ok(CreateTopicsRequest::default().with_topics(topics).with_timeout_ms(timeout_ms).with_validate_only(validate_only))
}

pub fn encode_response(version: i16, resp: &CreateTopicsResponse, out: &mut BytesMut) {
    put_array_len(out, resp.topics.len());
    for t in &resp.topics {
        put_string(out, &t.name);
        out.put_i16(t.error_code);
        if version >= 1 {
            put_nullable_string(out, t.error_message.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn decodes_v0_and_v1() {
        for version in 0..=1 {
            let mut b = BytesMut::new();
            put_array_len(&mut b, 1);
            put_string(&mut b, "t");
            b.put_i32(3);
            b.put_i16(1);
            put_array_len(&mut b, 1);
            b.put_i32(0);
            put_array_len(&mut b, 1);
            b.put_i32(7);
            put_array_len(&mut b, 1);
            put_string(&mut b, "cleanup.policy");
            put_nullable_string(&mut b, Some("compact"));
            b.put_i32(5000);
            if version >= 1 {
                b.put_i8(1);
            }
            let req = decode_request(version, &mut b.freeze()).unwrap();
            let t = &req.topics[0];
            assert_eq!((&**t.name, t.num_partitions, t.replication_factor), ("t", 3, 1));
            assert_eq!(t.assignments[0].broker_ids, vec![BrokerId(7)]);
            assert_eq!(t.configs[0].value.as_deref(), Some("compact"));
            assert_eq!(req.timeout_ms, 5000);
            assert_eq!(req.validate_only, version >= 1);
        }
    }

    #[test]
    fn encodes_v0_and_v1() {
        let resp = CreateTopicsResponse::default().with_topics(vec![
            CreatableTopicResult::default()
                .with_name(StrBytes::from_static_str("t").into())
                .with_error_code(36)
                .with_error_message(Some(StrBytes::from_static_str("exists"))),
        ]);
        let mut v0 = BytesMut::new();
        put_array_len(&mut v0, 1);
        put_string(&mut v0, "t");
        v0.put_i16(36);
        let mut v1 = v0.clone();
        put_nullable_string(&mut v1, Some("exists"));
        for (version, expected) in [(0, v0), (1, v1)] {
            let mut out = BytesMut::new();
            encode_response(version, &resp, &mut out);
            assert_eq!(out, expected, "v{version}");
        }
    }
}
