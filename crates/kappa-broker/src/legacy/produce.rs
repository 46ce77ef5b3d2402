//! Produce v0-2 (kafka-node sends v2 with magic-1 MessageSets).
//!
//! ```text
//! request:  acks i16, timeout i32, [topic string, [partition i32, message_set bytes]]
//! response: [topic string, [partition i32, error_code i16, base_offset i64,
//!            log_append_time i64 (v2+)]], throttle_time_ms i32 (v1+)
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::ProduceRequest;
use kafka_protocol::messages::ProduceResponse;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use tracing::debug;

use super::message_set;
use super::wire::{Reader, put_array_len, put_string};
use super::{DECOMPRESSED_BYTES_MAX, LegacyError};

/// Decodes a v0-2 request. Each partition's MessageSet is passed on as it came: the produce
/// handler converts it ([`up_convert`]) on a blocking thread, under the turn compressed
/// batches take, because converting inflates a compressed set (up to
/// [`DECOMPRESSED_BYTES_MAX`]) — too much work and memory for the connection's read loop.
pub fn decode_request(_version: i16, body: &mut Bytes) -> Result<ProduceRequest, LegacyError> {
    let mut r = Reader::new(body);
    let acks = r.i16()?;
    let timeout_ms = r.i32()?;
    let topic_data = r.array("topics", 6, |r| {
        let name = r.string("topic")?;
        let partition_data = r.array("partitions", 8, |r| {
            let index = r.i32()?;
            let records = r.nullable_bytes("message_set")?;
            Ok(PartitionProduceData::default().with_index(index).with_records(records))
        })?;
        Ok(TopicProduceData::default().with_name(name.into()).with_partition_data(partition_data))
    })?;
    Ok(ProduceRequest::default().with_acks(acks).with_timeout_ms(timeout_ms).with_topic_data(topic_data))
}

/// Whether a partition's records are a v0/v1 MessageSet (its magic byte, at the same
/// position as a record batch's, is 0 or 1), which only produce v0-2 carries.
pub fn is_message_set(records: &[u8]) -> bool {
    records.get(MAGIC_AT).is_some_and(|magic| *magic < kappa_log::batch::MAGIC_V2)
}

/// Where the magic byte lies in both formats: after the first entry's offset (8 bytes), its
/// length (4) and a CRC (4) or, in a record batch, the partition leader epoch (4).
const MAGIC_AT: usize = 16;
/// What both formats' entries start with before the bytes their length counts: the offset
/// (8 bytes) and the length (4).
const LENGTH_AT: usize = 8;
const ENTRY_PREFIX_BYTES: usize = 12;
/// A v0/v1 message's attributes follow its magic byte; their low 3 bits are the codec.
const ATTRIBUTES_AT: usize = MAGIC_AT + 1;
const CODEC_MASK: u8 = 0x07;
const ZSTD_CODEC: u8 = 4;

/// The magic (0 or 1) of the first v0/v1 message among a partition's entries, record
/// batches or messages alike; None if there is none. Entries are walked by the framing both
/// formats share; a walk that runs off the end stops there (the append's own checks report
/// a truncated or damaged batch).
pub fn message_set_magic(records: &[u8]) -> Option<u8> {
    entries(records).map(|entry| entry[MAGIC_AT]).find(|magic| *magic < kappa_log::batch::MAGIC_V2)
}

/// Whether any top-level v0/v1 message is a zstd wrapper: magic 0/1 cannot carry zstd
/// (KIP-110; Kafka's legacy record reader refuses it), and the messages inside a wrapper
/// cannot be compressed again.
pub fn has_zstd_wrapper(records: &[u8]) -> bool {
    entries(records)
        .filter(|entry| entry[MAGIC_AT] < kappa_log::batch::MAGIC_V2)
        .any(|entry| entry.get(ATTRIBUTES_AT).is_some_and(|attributes| attributes & CODEC_MASK == ZSTD_CODEC))
}

/// Each entry (record batch or message) from its start on, as long as its magic byte is
/// there; walked by the framing both formats share, stopping where it runs off the end.
fn entries(records: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(records);
    std::iter::from_fn(move || {
        let entry = rest.filter(|r| r.len() > MAGIC_AT)?;
        let length = i32::from_be_bytes(entry[LENGTH_AT..ENTRY_PREFIX_BYTES].try_into().expect("4 bytes"));
        rest = usize::try_from(length).ok().and_then(|l| entry.get(ENTRY_PREFIX_BYTES.checked_add(l)?..));
        Some(entry)
    })
}

/// One MessageSet as one RecordBatch v2, keeping the producer's compression.
pub fn up_convert(set: &Bytes) -> Result<Vec<u8>, message_set::MessageSetError> {
    message_set::up_convert(set, DECOMPRESSED_BYTES_MAX).inspect_err(|e| {
        debug!(error = %e, "legacy produce: message set not convertible");
    })
}

pub fn encode_response(version: i16, resp: &ProduceResponse, out: &mut BytesMut) {
    put_array_len(out, resp.responses.len());
    for topic in &resp.responses {
        put_string(out, &topic.name);
        put_array_len(out, topic.partition_responses.len());
        for p in &topic.partition_responses {
            out.put_i32(p.index);
            out.put_i16(p.error_code);
            out.put_i64(p.base_offset);
            if version >= 2 {
                out.put_i64(p.log_append_time_ms);
            }
        }
    }
    if version >= 1 {
        out.put_i32(resp.throttle_time_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
    use kappa_log::batch;

    fn request_bytes(set: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_i32(3000);
        put_array_len(&mut b, 1);
        put_string(&mut b, "events");
        put_array_len(&mut b, 1);
        b.put_i32(4);
        b.put_i32(set.len() as i32);
        b.put_slice(set);
        b.freeze()
    }

    #[test]
    fn decodes_v2_and_up_converts() {
        let mut set = BytesMut::new();
        message_set::encode_message(&mut set, 0, 1, 0, 1_700_000_000_000, Some(b"k"), Some(b"v"));
        let req = decode_request(2, &mut request_bytes(&set)).unwrap();
        assert_eq!(req.acks, 1);
        assert_eq!(req.timeout_ms, 3000);
        assert_eq!(&*req.topic_data[0].name, "events");
        let p = &req.topic_data[0].partition_data[0];
        assert_eq!(p.index, 4);
        let records = p.records.as_ref().unwrap();
        assert!(is_message_set(records), "passed on as it came");
        let converted = up_convert(records).unwrap();
        assert!(!is_message_set(&converted));
        let header = batch::validate(&converted, 1 << 20).unwrap();
        assert_eq!(header.records_count, 1);
        assert_eq!(header.base_timestamp, 1_700_000_000_000);
    }

    #[test]
    fn message_set_magic_finds_a_message_among_record_batches() {
        let batch = kappa_log::records::BatchBuilder::new()
            .record(kappa_log::records::NewRecord::new(Some(b"k"), Some(b"v"), 1))
            .build();
        let mut v1 = BytesMut::new();
        message_set::encode_message(&mut v1, 0, 1, 0, 5, Some(b"k"), Some(b"v"));
        let mut v0 = BytesMut::new();
        message_set::encode_message(&mut v0, 0, 0, 0, -1, None, Some(b"v"));
        assert_eq!(message_set_magic(&batch), None);
        assert_eq!(message_set_magic(&[batch.clone(), batch.clone()].concat()), None);
        assert_eq!(message_set_magic(&v1), Some(1));
        assert_eq!(message_set_magic(&v0), Some(0));
        assert_eq!(message_set_magic(&[&batch[..], &v1[..]].concat()), Some(1), "after a batch");
        assert_eq!(message_set_magic(&[&batch[..], &v0[..], &batch[..]].concat()), Some(0));
        assert_eq!(message_set_magic(&[&batch[..], &v1[..8]].concat()), None, "cut short: not judged");
        assert_eq!(message_set_magic(b""), None);
    }

    #[test]
    fn a_corrupt_message_set_decodes_and_fails_only_its_conversion() {
        let mut set = BytesMut::new();
        message_set::encode_message(&mut set, 0, 1, 0, 5, Some(b"k"), Some(b"v"));
        let last = set.len() - 1;
        set[last] ^= 0xff; // breaks the CRC
        let req = decode_request(2, &mut request_bytes(&set)).unwrap();
        let records = req.topic_data[0].partition_data[0].records.clone().unwrap();
        assert_eq!(&records[..], &set[..]);
        assert!(up_convert(&records).is_err());
    }

    #[test]
    fn rejects_truncated_and_lying_counts() {
        let full = request_bytes(b"");
        let mut cut = full.slice(..full.len() - 2);
        assert!(decode_request(2, &mut cut).is_err());
        let mut lying = BytesMut::new();
        lying.put_i16(1);
        lying.put_i32(0);
        lying.put_i32(i32::MAX);
        assert!(decode_request(2, &mut lying.freeze()).is_err());
    }

    #[test]
    fn encodes_v0_v1_v2_layouts() {
        let resp = ProduceResponse::default().with_throttle_time_ms(7).with_responses(vec![
            TopicProduceResponse::default()
                .with_name(kafka_protocol::protocol::StrBytes::from_static_str("t").into())
                .with_partition_responses(vec![
                    PartitionProduceResponse::default()
                        .with_index(2)
                        .with_error_code(0)
                        .with_base_offset(42)
                        .with_log_append_time_ms(99),
                ]),
        ]);
        let mut v0 = BytesMut::new();
        put_array_len(&mut v0, 1);
        put_string(&mut v0, "t");
        put_array_len(&mut v0, 1);
        v0.put_i32(2);
        v0.put_i16(0);
        v0.put_i64(42);
        let mut v1 = v0.clone();
        v1.put_i32(7);
        let mut v2 = v0.clone();
        v2.put_i64(99);
        v2.put_i32(7);
        for (version, expected) in [(0, v0), (1, v1), (2, v2)] {
            let mut out = BytesMut::new();
            encode_response(version, &resp, &mut out);
            assert_eq!(out, expected, "v{version}");
        }
    }
}
