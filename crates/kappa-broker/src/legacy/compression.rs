//! Bounded decompression for legacy conversion: wrapper messages (magic 0/1) on produce and
//! compressed RecordBatch v2 bodies on down-conversion.
//!
//! Output is capped at `max` bytes so a small compressed payload cannot expand without
//! limit. Snappy accepts both xerial framing (Java, kafka-python, kafka-node) and raw
//! blocks (librdkafka).

use std::io::Read;

use super::message_set::MessageSetError;

/// Codecs of magic 0/1 attributes and v2 batch attributes (same numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Codec {
    pub fn from_bits(bits: u8) -> Result<Self, MessageSetError> {
        Ok(match bits & 0x07 {
            0 => Self::None,
            1 => Self::Gzip,
            2 => Self::Snappy,
            3 => Self::Lz4,
            4 => Self::Zstd,
            other => return Err(MessageSetError::BadCodec(other)),
        })
    }
}

const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\0";
/// Magic (8) + version (4) + compatible version (4).
const XERIAL_HEADER_BYTES: usize = 16;

/// Decompresses `data`, failing if the output would exceed `max` bytes.
pub fn decompress(codec: Codec, data: &[u8], max: usize) -> Result<Vec<u8>, MessageSetError> {
    match codec {
        Codec::None => Ok(data.to_vec()),
        Codec::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(data), max),
        Codec::Snappy => snappy(data, max),
        Codec::Lz4 => {
            let decoder = lz4::Decoder::new(data).map_err(|e| MessageSetError::Decompress(e.to_string()))?;
            read_bounded(decoder, max)
        }
        Codec::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(data).map_err(|e| MessageSetError::Decompress(e.to_string()))?;
            read_bounded(decoder, max)
        }
    }
}

fn read_bounded<R: Read>(reader: R, max: usize) -> Result<Vec<u8>, MessageSetError> {
    let mut out = Vec::new();
    reader.take(max as u64 + 1).read_to_end(&mut out).map_err(|e| MessageSetError::Decompress(e.to_string()))?;
    if out.len() > max {
        return Err(MessageSetError::TooLarge { max });
    }
    Ok(out)
}

fn snappy(data: &[u8], max: usize) -> Result<Vec<u8>, MessageSetError> {
    if !data.starts_with(XERIAL_MAGIC) {
        let mut out = Vec::new();
        snappy_block(data, &mut out, max)?;
        return Ok(out);
    }
    if data.len() < XERIAL_HEADER_BYTES {
        return Err(MessageSetError::Decompress("truncated xerial snappy header".into()));
    }
    let mut rest = &data[XERIAL_HEADER_BYTES..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(MessageSetError::Decompress("truncated xerial snappy chunk length".into()));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if len > rest.len() {
            return Err(MessageSetError::Decompress("xerial snappy chunk overruns its data".into()));
        }
        snappy_block(&rest[..len], &mut out, max)?;
        rest = &rest[len..];
    }
    Ok(out)
}

/// Appends one raw snappy block, checking its declared length before allocating.
fn snappy_block(block: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), MessageSetError> {
    let len = snap::raw::decompress_len(block).map_err(|e| MessageSetError::Decompress(e.to_string()))?;
    if out.len() + len > max {
        return Err(MessageSetError::TooLarge { max });
    }
    let start = out.len();
    out.resize(start + len, 0);
    snap::raw::Decoder::new()
        .decompress(block, &mut out[start..])
        .map_err(|e| MessageSetError::Decompress(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn snappy_raw_and_xerial() {
        let data = b"hello hello hello hello snappy".repeat(10);
        let raw = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        assert_eq!(decompress(Codec::Snappy, &raw, 1 << 20).unwrap(), data);
        let mut xerial = XERIAL_MAGIC.to_vec();
        xerial.extend_from_slice(&1i32.to_be_bytes());
        xerial.extend_from_slice(&1i32.to_be_bytes());
        for chunk in data.chunks(100) {
            let c = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
            xerial.extend_from_slice(&(c.len() as u32).to_be_bytes());
            xerial.extend_from_slice(&c);
        }
        assert_eq!(decompress(Codec::Snappy, &xerial, 1 << 20).unwrap(), data);
        assert!(matches!(decompress(Codec::Snappy, &xerial, 100), Err(MessageSetError::TooLarge { .. })));
    }

    #[test]
    fn gzip_bomb_is_capped() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![0u8; 1 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(decompress(Codec::Gzip, &gz, 1 << 20).unwrap().len(), 1 << 20);
        assert!(matches!(decompress(Codec::Gzip, &gz, 1000), Err(MessageSetError::TooLarge { .. })));
    }
}
