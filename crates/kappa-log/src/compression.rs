//! Compression codecs of RecordBatch v2 bodies, as Kafka clients write them.
//!
//! Decompression is always bounded: a records body comes from the network or disk, and a
//! few KiB of gzip or zstd can expand to gigabytes. Every decoder streams into a buffer
//! and stops with [`RecordError::DecompressedTooLarge`] as soon as output passes the
//! caller's limit.

use std::io::{self, Read, Write};

use crate::batch::Compression;
use crate::records::RecordError;

/// Java's `SnappyOutputStream` (xerial) framing: magic, then two big-endian i32 versions.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;
/// Kafka's default zstd level.
const ZSTD_LEVEL: i32 = 3;

/// Compresses a records body with a batch codec.
///
/// Snappy is written as one raw block (as librdkafka does); LZ4 as an LZ4 frame with
/// independent 64 KiB blocks and no checksums, which Java's `KafkaLZ4BlockInputStream`
/// and librdkafka both read.
pub fn compress(compression: Compression, body: &[u8]) -> Vec<u8> {
    // Writing into a Vec cannot fail; an error here means the codec library itself broke.
    const VEC_WRITE: &str = "compressing into a Vec cannot fail";
    match compression {
        Compression::None => body.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(body).expect(VEC_WRITE);
            encoder.finish().expect(VEC_WRITE)
        }
        Compression::Snappy => snap::raw::Encoder::new()
            .compress_vec(body)
            .expect(VEC_WRITE),
        Compression::Lz4 => {
            let mut encoder = lz4::EncoderBuilder::new()
                .block_size(lz4::BlockSize::Max64KB)
                .block_mode(lz4::BlockMode::Independent)
                .block_checksum(lz4::liblz4::BlockChecksum::NoBlockChecksum)
                .checksum(lz4::ContentChecksum::NoChecksum)
                .build(Vec::new())
                .expect(VEC_WRITE);
            encoder.write_all(body).expect(VEC_WRITE);
            let (out, result) = encoder.finish();
            result.expect(VEC_WRITE);
            out
        }
        Compression::Zstd => zstd::stream::encode_all(body, ZSTD_LEVEL).expect(VEC_WRITE),
    }
}

/// Decompresses a records body, failing once the output would exceed `max_bytes`.
pub fn decompress(
    compression: Compression,
    body: &[u8],
    max_bytes: usize,
) -> Result<Vec<u8>, RecordError> {
    match compression {
        Compression::None => {
            if body.len() > max_bytes {
                return Err(RecordError::DecompressedTooLarge {
                    codec: compression,
                    limit: max_bytes,
                });
            }
            Ok(body.to_vec())
        }
        Compression::Gzip => read_bounded(
            compression,
            flate2::read::MultiGzDecoder::new(body),
            max_bytes,
        ),
        Compression::Snappy if body.starts_with(XERIAL_MAGIC) => decompress_xerial(body, max_bytes),
        Compression::Snappy => {
            let mut out = Vec::new();
            append_snappy_block(body, max_bytes, &mut out)?;
            Ok(out)
        }
        Compression::Lz4 => {
            let mut decoder = lz4::Decoder::new(body).map_err(|e| codec_error(compression, &e))?;
            let out = read_bounded(compression, &mut decoder, max_bytes)?;
            // The decoder reports a cut-off frame as a clean end of stream; only `finish`
            // tells whether the frame's end mark was seen.
            let (_, finished) = decoder.finish();
            finished.map_err(|_| RecordError::Decompress {
                codec: compression,
                reason: "LZ4 frame is truncated".to_owned(),
            })?;
            Ok(out)
        }
        Compression::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(body).map_err(|e| codec_error(compression, &e))?;
            read_bounded(compression, decoder, max_bytes)
        }
    }
}

/// Reads at most `max_bytes + 1` bytes so an oversized stream is detected without
/// inflating it further.
fn read_bounded(
    codec: Compression,
    reader: impl Read,
    max_bytes: usize,
) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| codec_error(codec, &e))?;
    if out.len() > max_bytes {
        return Err(RecordError::DecompressedTooLarge {
            codec,
            limit: max_bytes,
        });
    }
    Ok(out)
}

/// Xerial framing: a 16-byte header, then `[u32 BE length][raw snappy block]` chunks.
fn decompress_xerial(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, RecordError> {
    let mut rest = body
        .get(XERIAL_HEADER_BYTES..)
        .ok_or_else(|| snappy_error("xerial header is truncated"))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, after_len) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| snappy_error("xerial chunk length is truncated"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > after_len.len() {
            return Err(snappy_error(
                "xerial chunk is longer than the remaining body",
            ));
        }
        let (chunk, after_chunk) = after_len.split_at(len);
        append_snappy_block(chunk, max_bytes, &mut out)?;
        rest = after_chunk;
    }
    Ok(out)
}

/// Decodes one raw snappy block onto `out`. The block's declared length is checked
/// against the limit before any buffer is allocated for it.
fn append_snappy_block(
    block: &[u8],
    max_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    if block.is_empty() {
        return Ok(());
    }
    let len = snap::raw::decompress_len(block).map_err(|e| snappy_error(&e.to_string()))?;
    if len > max_bytes.saturating_sub(out.len()) {
        return Err(RecordError::DecompressedTooLarge {
            codec: Compression::Snappy,
            limit: max_bytes,
        });
    }
    let start = out.len();
    out.resize(start + len, 0);
    let written = snap::raw::Decoder::new()
        .decompress(block, &mut out[start..])
        .map_err(|e| snappy_error(&e.to_string()))?;
    out.truncate(start + written);
    Ok(())
}

fn codec_error(codec: Compression, error: &io::Error) -> RecordError {
    RecordError::Decompress {
        codec,
        reason: error.to_string(),
    }
}

fn snappy_error(reason: &str) -> RecordError {
    RecordError::Decompress {
        codec: Compression::Snappy,
        reason: reason.to_owned(),
    }
}
