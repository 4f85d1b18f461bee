//! Reading frames off a stream, written once for the blocking connection (`conn::Conn`) and
//! the async one (`volume::remote`).
//!
//! [`FrameDecoder`] is sans-IO: it owns the header bytes and the payload buffer of the frame
//! being read and says where the next bytes go ([`FrameDecoder::buf`]); the caller fills that
//! slice from wherever the bytes come from (a `Read`, an `AsyncRead`, a TLS session) and reports
//! how many it put there ([`FrameDecoder::filled`]). The frame rules live here and in
//! `protocol`: the header (magic, the payload cap) is checked before anything is allocated, the
//! whole payload is read and its crc verified before it is decoded, so a truncated or corrupted
//! frame is never acted upon. The bytes go straight from the reader into the payload buffer,
//! which becomes the message's data (`Message::decode_vec`): one buffer per frame, no copy
//! beyond the read itself.
//!
//! The payload cap is a parameter: a connection that has not authenticated yet can be held to
//! a few KiB ([`FrameDecoder::set_max_payload`] raises it afterwards); it is at most
//! [`MAX_PAYLOAD`]. [`FrameDecoder::read`] and [`FrameDecoder::read_async`] are the two loops
//! that drive it.

use std::io::Read;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::protocol::{check_crc, decode_header, Header, Message, ProtoError, HEADER_LEN, MAX_PAYLOAD};

/// Errors reading or writing frames on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
}

/// One frame as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub msg: Message,
}

impl Frame {
    /// Bytes the frame took on the wire (header and payload).
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.header.len as usize
    }
}

/// The frame being read: its header, then its payload.
#[derive(Debug)]
pub struct FrameDecoder {
    max_payload: u32,
    raw: [u8; HEADER_LEN],
    /// `Some` once the header is read and checked: the payload is being read.
    header: Option<Header>,
    payload: Vec<u8>,
    /// Bytes of the current part (header or payload) filled so far.
    filled: usize,
}

impl Default for FrameDecoder {
    /// A decoder accepting payloads up to [`MAX_PAYLOAD`].
    fn default() -> Self {
        FrameDecoder::new(MAX_PAYLOAD)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames whose payload exceeds `max_payload` bytes (capped at
    /// [`MAX_PAYLOAD`]) with [`ProtoError::Oversize`], from the header alone.
    pub fn new(max_payload: u32) -> FrameDecoder {
        FrameDecoder {
            max_payload: max_payload.min(MAX_PAYLOAD),
            raw: [0; HEADER_LEN],
            header: None,
            payload: Vec::new(),
            filled: 0,
        }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Changes the payload cap (at most [`MAX_PAYLOAD`]) from the next frame header on.
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload.min(MAX_PAYLOAD);
    }

    /// True between frames: nothing of a next frame has been read (an end of stream here is a
    /// clean one).
    pub fn is_idle(&self) -> bool {
        self.header.is_none() && self.filled == 0
    }

    /// Where the next bytes of the stream go: the rest of the header, or of the payload. Never
    /// empty. Fill any prefix of it and report the count with [`Self::filled`].
    pub fn buf(&mut self) -> &mut [u8] {
        match self.header {
            None => &mut self.raw[self.filled..],
            Some(_) => &mut self.payload[self.filled..],
        }
    }

    /// Records that the first `n` bytes of [`Self::buf`] were filled. Returns the frame once it
    /// is complete and checked, `Ok(None)` while more bytes are needed. After an error the
    /// stream is out of step and must be closed (the decoder is reset, it does not resync).
    ///
    /// # Panics
    /// If `n` exceeds the length of [`Self::buf`].
    pub fn filled(&mut self, n: usize) -> Result<Option<Frame>, ProtoError> {
        let part = match self.header {
            None => HEADER_LEN,
            Some(h) => h.len as usize,
        };
        assert!(self.filled + n <= part, "filled {n} bytes past the {part}-byte buffer");
        self.filled += n;
        let r = self.advance();
        if r.is_err() {
            self.header = None;
            self.payload = Vec::new();
            self.filled = 0;
        }
        r
    }

    fn advance(&mut self) -> Result<Option<Frame>, ProtoError> {
        let header = match self.header {
            None if self.filled < HEADER_LEN => return Ok(None),
            None => {
                let h = decode_header(&self.raw, self.max_payload)?;
                self.header = Some(h);
                self.filled = 0;
                // The cap is checked: this allocation is bounded by it.
                self.payload = vec![0; h.len as usize];
                h
            }
            Some(h) => h,
        };
        if self.filled < header.len as usize {
            return Ok(None);
        }
        self.header = None;
        self.filled = 0;
        let payload = std::mem::take(&mut self.payload);
        check_crc(&self.raw, &payload)?;
        let msg = Message::decode_vec(header.kind, payload)?;
        Ok(Some(Frame { header, msg }))
    }

    /// Takes bytes from the front of `data`, as many as the current frame needs: how many it
    /// took, and the frame if that completed it. For callers that hold the bytes already (a
    /// decrypted record, a test); readers fill [`Self::buf`] instead, which saves the copy.
    pub fn push(&mut self, data: &[u8]) -> Result<(usize, Option<Frame>), ProtoError> {
        let buf = self.buf();
        let n = buf.len().min(data.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok((n, self.filled(n)?))
    }

    /// Reads one whole frame from a blocking reader.
    pub fn read<R: Read>(&mut self, r: &mut R) -> Result<Frame, ConnError> {
        loop {
            let buf = self.buf();
            let n = buf.len();
            r.read_exact(buf)?;
            if let Some(f) = self.filled(n)? {
                return Ok(f);
            }
        }
    }

    /// Reads one whole frame from an async reader. Not cancel-safe in the sense of keeping
    /// partial reads: dropping the future mid-frame leaves the stream out of step.
    pub async fn read_async<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Frame, ConnError> {
        loop {
            let buf = self.buf();
            let n = buf.len();
            r.read_exact(buf).await?;
            if let Some(f) = self.filled(n)? {
                return Ok(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::{decode_frame, encode_frame};
    use proptest::prelude::*;

    fn frames() -> Vec<u8> {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 0, &Message::Write { offset: 4096, data: vec![0xab; 5000] });
        encode_frame(&mut buf, 2, 1, &Message::Flush);
        encode_frame(&mut buf, 3, 0, &Message::Data(vec![1, 2, 3]));
        buf
    }

    #[test]
    fn reads_frames_from_a_blocking_reader() {
        let buf = frames();
        let mut r = &buf[..];
        let mut d = FrameDecoder::default();
        let f = d.read(&mut r).unwrap();
        assert_eq!(f.msg, Message::Write { offset: 4096, data: vec![0xab; 5000] });
        assert_eq!((f.header.id, f.wire_len()), (1, HEADER_LEN + 8 + 5000));
        assert!(d.is_idle());
        assert_eq!(d.read(&mut r).unwrap().msg, Message::Flush);
        assert_eq!(d.read(&mut r).unwrap().msg, Message::Data(vec![1, 2, 3]));
        assert!(
            matches!(d.read(&mut r), Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof)
        );
    }

    #[tokio::test]
    async fn reads_frames_from_an_async_reader() {
        let buf = frames();
        let mut r = &buf[..];
        let mut d = FrameDecoder::default();
        assert_eq!(d.read_async(&mut r).await.unwrap().header.id, 1);
        assert_eq!(d.read_async(&mut r).await.unwrap().msg, Message::Flush);
        assert_eq!(d.read_async(&mut r).await.unwrap().msg, Message::Data(vec![1, 2, 3]));
        assert!(matches!(d.read_async(&mut r).await, Err(ConnError::Io(_))));
    }

    #[test]
    fn the_cap_refuses_a_frame_from_its_header_and_can_be_raised() {
        let buf = frames();
        let mut d = FrameDecoder::new(4096);
        assert_eq!(d.max_payload(), 4096);
        d.buf().copy_from_slice(&buf[..HEADER_LEN]);
        assert_eq!(d.filled(HEADER_LEN), Err(ProtoError::Oversize { len: 5008, max: 4096 }));
        assert!(d.is_idle(), "reset after the error");
        d.set_max_payload(u32::MAX);
        assert_eq!(d.max_payload(), MAX_PAYLOAD);
        assert_eq!(d.read(&mut &buf[..]).unwrap().header.id, 1);
    }

    #[test]
    fn a_corrupted_payload_is_refused_after_it_is_read() {
        let mut buf = frames();
        buf[HEADER_LEN + 100] ^= 1;
        let mut d = FrameDecoder::default();
        assert!(matches!(d.read(&mut &buf[..]), Err(ConnError::Proto(ProtoError::BadChecksum))));
    }

    proptest! {
        /// Fed in pieces of any size, the decoder finds exactly what `decode_frame` finds.
        #[test]
        fn any_split_decodes_like_decode_frame(
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(1usize..700, 1..40),
            flip in proptest::option::of(0usize..5100),
        ) {
            let mut buf = frames();
            if let Some(i) = flip {
                let i = i % buf.len();
                buf[i] ^= 0x10;
            }
            buf.extend_from_slice(&garbage);
            let mut expect = Vec::new();
            let mut at = 0;
            let expect_err = loop {
                match decode_frame(&buf[at..]) {
                    Ok(Some((h, m, used))) => {
                        expect.push(Frame { header: h, msg: m });
                        at += used;
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e),
                }
            };
            let mut d = FrameDecoder::default();
            let (mut got, mut err, mut pos) = (Vec::new(), None, 0);
            let mut cut = cuts.iter().cycle();
            while pos < buf.len() && err.is_none() {
                let end = (pos + cut.next().expect("cycles")).min(buf.len());
                match d.push(&buf[pos..end]) {
                    Ok((n, f)) => {
                        pos += n;
                        got.extend(f);
                    }
                    Err(e) => err = Some(e),
                }
            }
            prop_assert_eq!(got, expect);
            prop_assert_eq!(err, expect_err);
        }
    }
}
