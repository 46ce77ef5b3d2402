//! Raw Kafka protocol over a socket, for the tests that send what stock clients would not.
#![allow(dead_code)]

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader, ResponseHeader, TopicName, TransactionalId};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request as a size-prefixed frame.
pub fn frame<Req: Encodable>(key: ApiKey, version: i16, correlation_id: i32, body: &Req) -> Vec<u8> {
    let header = RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("t")));
    let mut payload = BytesMut::new();
    header.encode(&mut payload, key.request_header_version(version)).unwrap();
    body.encode(&mut payload, version).unwrap();
    let mut frame = (payload.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// Reads one response (within 10 s): its correlation id and body, which must be all of it.
pub async fn read_response<Resp: Decodable>(stream: &mut TcpStream, key: ApiKey, version: i16) -> (i32, Resp) {
    let mut size = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut size))
        .await
        .expect("response in time")
        .unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    stream.read_exact(&mut body).await.unwrap();
    let mut body = Bytes::from(body);
    let header = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
    let response = Resp::decode(&mut body, version).unwrap();
    assert_eq!(body.remaining(), 0);
    (header.correlation_id, response)
}

/// Sends one request and reads its response.
pub async fn call<Req: Encodable, Resp: Decodable>(
    stream: &mut TcpStream,
    key: ApiKey,
    version: i16,
    body: &Req,
) -> Resp {
    stream.write_all(&frame(key, version, 1, body)).await.unwrap();
    read_response(stream, key, version).await.1
}

/// A produce request (acks all) of one record batch to partition 0 of `topic`.
pub fn produce_request(topic: &'static str, batch: Vec<u8>, transactional_id: Option<&'static str>) -> ProduceRequest {
    let mut partition = PartitionProduceData::default();
    partition.index = 0;
    partition.records = Some(Bytes::from(batch));
    let mut topic_data = TopicProduceData::default();
    topic_data.name = TopicName(StrBytes::from_static_str(topic));
    topic_data.partition_data = vec![partition];
    let mut request = ProduceRequest::default();
    request.transactional_id = transactional_id.map(|id| TransactionalId(StrBytes::from_static_str(id)));
    request.acks = -1;
    request.timeout_ms = 5_000;
    request.topic_data = vec![topic_data];
    request
}

/// A produce v2 request (kafka-node's) of one message set to partition 0 of `topic`, as a
/// size-prefixed frame. kafka-protocol no longer encodes v0-2, so it is written by hand.
pub fn legacy_produce_v2_frame(topic: &str, acks: i16, correlation_id: i32, set: &[u8]) -> Vec<u8> {
    use bytes::BufMut;
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(2)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("kafka-node")));
    let mut body = BytesMut::new();
    header.encode(&mut body, 1).unwrap();
    body.put_i16(acks);
    body.put_i32(1000);
    body.put_i32(1);
    body.put_i16(topic.len() as i16);
    body.put_slice(topic.as_bytes());
    body.put_i32(1);
    body.put_i32(0);
    body.put_i32(set.len() as i32);
    body.put_slice(set);
    let mut frame = (body.len() as i32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}
