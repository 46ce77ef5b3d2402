//! DeleteTopics v0.
//!
//! ```text
//! request:  [topic_name string], timeout_ms i32
//! response: [name string, error_code i16]
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse};

use super::LegacyError;
use super::wire::{Reader, put_array_len, put_string};

pub fn decode_request(body: &mut Bytes) -> Result<DeleteTopicsRequest, LegacyError> {
    let mut r = Reader::new(body);
    let names = r.array("topic_names", 2, |r| r.string("topic_name").map(Into::into))?;
    let timeout_ms = r.i32()?;
    Ok(DeleteTopicsRequest::default().with_topic_names(names).with_timeout_ms(timeout_ms))
}

pub fn encode_response(resp: &DeleteTopicsResponse, out: &mut BytesMut) {
    put_array_len(out, resp.responses.len());
    for t in &resp.responses {
        put_string(out, t.name.as_deref().map(|n| &**n).unwrap_or(""));
        out.put_i16(t.error_code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
    use kafka_protocol::protocol::StrBytes;

    #[test]
    fn decodes_and_encodes_v0() {
        let mut b = BytesMut::new();
        put_array_len(&mut b, 2);
        put_string(&mut b, "a");
        put_string(&mut b, "b");
        b.put_i32(1000);
        let req = decode_request(&mut b.freeze()).unwrap();
        let names: Vec<&str> = req.topic_names.iter().map(|n| &***n).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(req.timeout_ms, 1000);

        let resp = DeleteTopicsResponse::default().with_responses(vec![
            DeletableTopicResult::default().with_name(Some(StrBytes::from_static_str("a").into())).with_error_code(3),
        ]);
        let mut out = BytesMut::new();
        encode_response(&resp, &mut out);
        let mut expected = BytesMut::new();
        put_array_len(&mut expected, 1);
        put_string(&mut expected, "a");
        expected.put_i16(3);
        assert_eq!(out, expected);
    }
}
