//! Size-prefixed frames: `i32 size` then `size` bytes.
//!
//! The size is checked against `request_bytes_max` before any buffer is sized from it, and
//! the buffer then grows with the bytes that actually arrive, so a peer that announces
//! 100 MiB and sends nothing costs no memory. What all connections may hold in frames is
//! bounded by a shared [`FrameBudget`], and a frame whose size has arrived must be complete
//! within a timeout: otherwise peers that send most of a big frame and stall would pin
//! memory without bound (torture F2 measured 334 MiB for eight of them).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProtocolError;

/// Default cap on one request frame, like Kafka's `socket.request.max.bytes`.
pub const DEFAULT_REQUEST_BYTES_MAX: usize = 100 * 1024 * 1024;
/// api_key (2) + api_version (2) + correlation_id (4) + client_id length (2).
pub const MIN_REQUEST_BYTES: usize = 10;
/// A frame's first bytes are not charged to the [`FrameBudget`], so small requests (nearly
/// all of them) never wait for memory that big frames hold.
pub const UNBUDGETED_FRAME_BYTES: usize = 64 * 1024;
/// Budget unit: permits are KiB, so the largest frame fits a semaphore's u32 permits.
const BUDGET_UNIT_BYTES: usize = 1024;

/// Memory for frames being read or waiting to be handled, shared by all connections
/// (Kafka: queued.max.request.bytes). A frame takes its share, whole, before its body is
/// read beyond its first `UNBUDGETED_FRAME_BYTES` (taking it piecemeal could deadlock two
/// big frames each holding half), and gives it back when dropped.
#[derive(Debug, Clone)]
pub struct FrameBudget(Arc<Semaphore>);

impl FrameBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes / BUDGET_UNIT_BYTES)))
    }

    /// Bytes not held by any frame now.
    pub fn available_bytes(&self) -> usize {
        self.0.available_permits() * BUDGET_UNIT_BYTES
    }

    async fn take(&self, frame_bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = frame_bytes.saturating_sub(UNBUDGETED_FRAME_BYTES).div_ceil(BUDGET_UNIT_BYTES);
        if units == 0 {
            return None;
        }
        // The semaphore is never closed.
        self.0.clone().acquire_many_owned(units as u32).await.ok()
    }
}

/// One frame body and its share of the [`FrameBudget`], held until this is dropped.
#[derive(Debug)]
pub struct Frame {
    pub bytes: Bytes,
    pub budget: Option<OwnedSemaphorePermit>,
}

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

/// Reads one frame body. `Ok(None)` means the peer closed cleanly between frames. Once the
/// size prefix has arrived, taking the frame's budget and reading its body must finish
/// within `body_timeout`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
    budget: &FrameBudget,
    body_timeout: Duration,
) -> Result<Option<Frame>, ProtocolError> {
    let mut prefix = [0u8; 4];
    if !read_prefix(reader, &mut prefix, body_timeout).await? {
        return Ok(None);
    }
    let size = check_frame_size(i32::from_be_bytes(prefix), max)?;
    let mut buf = BytesMut::new();
    let body = async {
        // The first (unbudgeted) bytes are read before waiting for budget, so a frame that
        // ends early (EOF) is refused at once even while big frames hold the budget.
        let (mut held, mut budgeted) = (None, size <= UNBUDGETED_FRAME_BYTES);
        while buf.len() < size {
            if !budgeted && buf.len() >= UNBUDGETED_FRAME_BYTES {
                held = budget.take(size).await;
                budgeted = true;
            }
            // Up to `limit` bytes may be held now: reserved whole, since growing the buffer
            // step by step would copy the body again at every doubling.
            let limit = if budgeted { size } else { UNBUDGETED_FRAME_BYTES };
            let want = limit - buf.len();
            buf.reserve(want);
            let n = (&mut *reader).take(want as u64).read_buf(&mut buf).await?;
            if n == 0 {
                return Err(ProtocolError::TruncatedFrame);
            }
        }
        Ok(held)
    };
    let finished = tokio::time::timeout(body_timeout, body).await;
    match finished {
        Ok(held) => Ok(Some(Frame { bytes: buf.freeze(), budget: held? })),
        Err(_) => Err(ProtocolError::FrameReadTimeout { size, received: buf.len(), timeout: body_timeout }),
    }
}

/// Reads the 4-byte prefix; false on EOF before its first byte. The first byte may take any
/// time (the caller bounds that wait: the idle timeout); the rest must follow within
/// `timeout` of it.
async fn read_prefix<R: AsyncRead + Unpin>(
    reader: &mut R,
    prefix: &mut [u8; 4],
    timeout: Duration,
) -> Result<bool, ProtocolError> {
    let mut filled = reader.read(prefix).await?;
    if filled == 0 {
        return Ok(false);
    }
    let rest = async {
        while filled < 4 {
            let n = reader.read(&mut prefix[filled..]).await?;
            if n == 0 {
                return Err(ProtocolError::TruncatedFrame);
            }
            filled += n;
        }
        Ok(true)
    };
    match tokio::time::timeout(timeout, rest).await {
        Ok(result) => result,
        Err(_) => Err(ProtocolError::SizeReadTimeout { received: filled, timeout }),
    }
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

/// A response frame as the pieces written to the socket one after another: the encoded
/// fields, with large record sets spliced in as the buffers the log read them into rather
/// than copied into the encode buffer (a fetch answer is mostly records).
#[derive(Debug, Clone, Default)]
pub struct ResponseFrame {
    pub parts: Vec<Bytes>,
}

impl ResponseFrame {
    /// Bytes in the frame, size prefix included.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    /// The frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [one] => one.clone(),
            parts => Bytes::from(parts.concat()),
        }
    }
}

impl From<Bytes> for ResponseFrame {
    fn from(frame: Bytes) -> Self {
        Self { parts: vec![frame] }
    }
}

/// Record sets at least this large are spliced into a [`ResponseFrame`]; smaller ones cost
/// less to copy than to write as a piece of their own.
pub const SPLICE_BYTES_MIN: usize = 16 * 1024;

/// An encode buffer that splices. A `put_slice` of exactly one of the `splice` buffers (same
/// address and length: how kafka-protocol writes a `Bytes` field) ends the current piece and
/// adds that buffer as a piece of its own, uncopied; everything else is encoded into the
/// current piece, as into a `BytesMut`.
pub struct SpliceBuf {
    pieces: Vec<Bytes>,
    /// Bytes in `pieces`: where `head` starts in the frame.
    pieces_len: usize,
    /// The first piece, kept writable until [`Self::finish`] fills in the size prefix.
    first: Option<BytesMut>,
    head: BytesMut,
    splice: Vec<Bytes>,
}

impl SpliceBuf {
    /// A frame buffer (size prefix reserved, as with [`start_frame`]) with room for
    /// `fields_bytes` of encoded fields, splicing the buffers of `splice` that are at least
    /// [`SPLICE_BYTES_MIN`] long.
    pub fn new(fields_bytes: usize, splice: Vec<Bytes>) -> Self {
        let splice = splice.into_iter().filter(|b| b.len() >= SPLICE_BYTES_MIN).collect();
        Self { pieces: Vec::new(), pieces_len: 0, first: None, head: start_frame(fields_bytes), splice }
    }

    /// The current piece, for encoders that write into a `BytesMut` (the response header).
    pub fn head_mut(&mut self) -> &mut BytesMut {
        &mut self.head
    }

    /// The frame, its size prefix filled in.
    pub fn finish(mut self) -> ResponseFrame {
        let size = (self.pieces_len + self.head.len() - SIZE_PREFIX_BYTES) as i32;
        let first = self.first.as_mut().unwrap_or(&mut self.head);
        first[..SIZE_PREFIX_BYTES].copy_from_slice(&size.to_be_bytes());
        let mut parts = Vec::with_capacity(self.pieces.len() + 2);
        if let Some(first) = self.first {
            parts.push(first.freeze());
        }
        parts.extend(self.pieces);
        if !self.head.is_empty() {
            parts.push(self.head.freeze());
        }
        ResponseFrame { parts }
    }

    /// Ends the current piece of encoded fields.
    fn end_head(&mut self) {
        let head = self.head.split();
        if self.first.is_none() {
            self.pieces_len += head.len();
            self.first = Some(head);
        } else if !head.is_empty() {
            self.pieces_len += head.len();
            self.pieces.push(head.freeze());
        }
    }
}

// SAFETY: every method delegates to `head`, a `BytesMut`, whose implementation upholds the
// trait's contract; `put_slice` only adds whole, initialised buffers besides.
unsafe impl bytes::BufMut for SpliceBuf {
    fn remaining_mut(&self) -> usize {
        self.head.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller's promise about `cnt` is about `head`'s chunk, passed on as is.
        unsafe { self.head.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.head.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        let whole = |b: &Bytes| b.as_ptr() == src.as_ptr() && b.len() == src.len();
        match self.splice.iter().position(whole) {
            Some(i) => {
                let spliced = self.splice.swap_remove(i);
                self.end_head();
                self.pieces_len += spliced.len();
                self.pieces.push(spliced);
            }
            None => self.head.extend_from_slice(src),
        }
    }
}

// Offsets count the whole frame; seeking and gaps (which response encoders do not use) work
// within the current piece only.
impl kafka_protocol::protocol::buf::ByteBufMut for SpliceBuf {
    fn offset(&self) -> usize {
        self.pieces_len + self.head.len()
    }

    fn seek(&mut self, offset: usize) {
        let within = offset.checked_sub(self.pieces_len).expect("seek before the current piece");
        self.head.resize(within, 0);
    }

    fn range(&mut self, r: std::ops::Range<usize>) -> &mut [u8] {
        let base = self.pieces_len;
        &mut self.head[r.start - base..r.end - base]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_TIMEOUT: Duration = Duration::from_secs(3600);

    async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<Bytes>, ProtocolError> {
        let budget = FrameBudget::new(1024 * 1024);
        super::read_frame(reader, max, &budget, NO_TIMEOUT).await.map(|f| f.map(|f| f.bytes))
    }

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

    /// Torture F2 found peers that send most of a big frame and stall pinning memory without
    /// bound (eight such frames of 40 MiB: 334 MiB RSS, held until the idle timeout).
    #[tokio::test]
    async fn stalled_partial_frames_pinned_memory_without_bound() {
        use tokio::io::AsyncWriteExt;
        const KIB: usize = 1024;
        let budget = FrameBudget::new(1024 * KIB);
        let frame_of = |size: usize| {
            let mut data = (size as i32).to_be_bytes().to_vec();
            data.extend(std::iter::repeat_n(7u8, size));
            data
        };
        // A big frame holds its share (beyond the unbudgeted first 64 KiB) while it lives.
        let data = frame_of(576 * KIB);
        let first = super::read_frame(&mut &data[..], usize::MAX, &budget, NO_TIMEOUT).await.unwrap().unwrap();
        assert_eq!(budget.available_bytes(), 512 * KIB);
        // A second one that does not fit waits for it, then proceeds.
        let data = frame_of(640 * KIB);
        let mut reader = &data[..];
        let second = super::read_frame(&mut reader, usize::MAX, &budget, Duration::from_millis(100)).await;
        assert!(matches!(second, Err(ProtocolError::FrameReadTimeout { .. })), "{second:?}");
        drop(first);
        let data = frame_of(640 * KIB);
        let second = super::read_frame(&mut &data[..], usize::MAX, &budget, NO_TIMEOUT).await.unwrap().unwrap();
        assert_eq!(second.bytes.len(), 640 * KIB);
        drop(second);
        // Small frames never touch the budget, even when it is exhausted.
        let all = budget.take(1024 * KIB + UNBUDGETED_FRAME_BYTES).await;
        assert_eq!(budget.available_bytes(), 0);
        let data = frame_of(60 * KIB);
        assert!(super::read_frame(&mut &data[..], usize::MAX, &budget, NO_TIMEOUT).await.unwrap().is_some());
        // A big frame that ends early is refused at once, without waiting for budget.
        let mut data = frame_of(90 * KIB);
        data.truncate(4 + 10 * KIB);
        let early = super::read_frame(&mut &data[..], usize::MAX, &budget, NO_TIMEOUT).await;
        assert!(matches!(early, Err(ProtocolError::TruncatedFrame)), "{early:?}");
        drop(all);
        // A stalled partial frame is cut off after the timeout and gives its share back.
        let (mut client, mut server) = tokio::io::duplex(1024 * KIB);
        client.write_all(&(900 * KIB as i32).to_be_bytes()).await.unwrap();
        client.write_all(&vec![1u8; 300 * KIB]).await.unwrap();
        let stalled = super::read_frame(&mut server, usize::MAX, &budget, Duration::from_millis(200)).await;
        match stalled {
            Err(ProtocolError::FrameReadTimeout { size, received, .. }) => {
                assert_eq!((size, received), (900 * KIB, 300 * KIB));
            }
            other => panic!("expected a frame read timeout, got {other:?}"),
        }
        assert_eq!(budget.available_bytes(), 1024 * KIB);
    }
}
