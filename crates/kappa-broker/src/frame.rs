//! Size-prefixed frames: `i32 size` then `size` bytes.
//!
//! The size is checked against `request_bytes_max` before any buffer is sized from it, and
//! the buffer then grows with the bytes that actually arrive, so a peer that announces
//! 100 MiB and sends nothing costs nothing.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::ProtocolError;

/// Default cap on one request frame, like Kafka's `socket.request.max.bytes`.
pub const DEFAULT_REQUEST_BYTES_MAX: usize = 100 * 1024 * 1024;
/// api_key (2) + api_version (2) + correlation_id (4) + client_id length (2).
pub const MIN_REQUEST_BYTES: usize = 10;
/// Largest chunk reserved at once while a frame body arrives.
const READ_CHUNK: usize = 64 * 1024;

/// Checks a size prefix against the limits.
pub fn check_frame_size(size: i32, max: usize) -> Result<usize, ProtocolError> {
    if size < 0 || size as usize > max {
        return Err(ProtocolError::FrameTooLarge { size: size as i64, max });
    }
    if (size as usize) < MIN_REQUEST_BYTES {
        return Err(ProtocolError::FrameTooSmall(size));
    }
    Ok(size as usize)
}

/// Reads one frame body. `Ok(None)` means the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<Bytes>, ProtocolError> {
    let mut prefix = [0u8; 4];
    if !read_prefix(reader, &mut prefix).await? {
        return Ok(None);
    }
    let size = check_frame_size(i32::from_be_bytes(prefix), max)?;
    let mut buf = BytesMut::with_capacity(size.min(READ_CHUNK));
    while buf.len() < size {
        let want = (size - buf.len()).min(READ_CHUNK);
        buf.reserve(want);
        let n = (&mut *reader).take(want as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(ProtocolError::TruncatedFrame);
        }
    }
    Ok(Some(buf.freeze()))
}

/// Reads the 4-byte prefix; false on EOF before its first byte.
async fn read_prefix<R: AsyncRead + Unpin>(reader: &mut R, prefix: &mut [u8; 4]) -> Result<bool, ProtocolError> {
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(false) } else { Err(ProtocolError::TruncatedFrame) };
        }
        filled += n;
    }
    Ok(true)
}

/// Bytes of the size prefix in front of every frame.
pub const SIZE_PREFIX_BYTES: usize = 4;

/// A buffer to encode one response frame into, with room for `payload_bytes` after the
/// size prefix: the response is written once, in place, and never copied to prepend the
/// size (a fetch response is mostly its records, up to megabytes).
pub fn start_frame(payload_bytes: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(SIZE_PREFIX_BYTES + payload_bytes);
    out.extend_from_slice(&[0; SIZE_PREFIX_BYTES]);
    out
}

/// Fills in the size prefix of a buffer from [`start_frame`].
pub fn finish_frame(mut out: BytesMut) -> Bytes {
    let size = (out.len() - SIZE_PREFIX_BYTES) as i32;
    out[..SIZE_PREFIX_BYTES].copy_from_slice(&size.to_be_bytes());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_frames_and_clean_eof() {
        let mut data = Vec::new();
        data.extend_from_slice(&12i32.to_be_bytes());
        data.extend_from_slice(&[7u8; 12]);
        let mut r = &data[..];
        assert_eq!(read_frame(&mut r, 100).await.unwrap().unwrap().len(), 12);
        assert!(read_frame(&mut r, 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rejects_oversized_negative_small_and_truncated() {
        for size in [101i32, -1, i32::MIN, 3] {
            let data = size.to_be_bytes();
            let mut r = &data[..];
            assert!(read_frame(&mut r, 100).await.is_err(), "size {size}");
        }
        let mut data = 50i32.to_be_bytes().to_vec();
        data.extend_from_slice(&[0; 20]);
        let mut r = &data[..];
        assert!(matches!(read_frame(&mut r, 100).await, Err(ProtocolError::TruncatedFrame)));
        let data = [0u8, 0];
        let mut r = &data[..];
        assert!(matches!(read_frame(&mut r, 100).await, Err(ProtocolError::TruncatedFrame)));
    }
}
