//! Framed connections over TCP: read and write whole frames, count bytes on the wire.

use std::{
    io::{BufReader, BufWriter, Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use super::protocol::{
    check_crc, decode_header, encode_frame, Header, Message, ProtoError, HEADER_LEN, MAX_PAYLOAD,
};

/// Errors on a framed connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
}

/// Bytes sent and received, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Wire {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Wire {
    pub fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}

/// A framed, buffered TCP connection.
#[derive(Debug)]
pub struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    buf: Vec<u8>,
    pub wire: Arc<Wire>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        let r = BufReader::with_capacity(256 << 10, stream.try_clone()?);
        let w = BufWriter::with_capacity(256 << 10, stream);
        Ok(Conn { r, w, buf: Vec::new(), wire: Arc::default() })
    }

    /// The stream, once the handshake is over (nothing may be buffered in either direction).
    pub fn into_stream(mut self) -> std::io::Result<TcpStream> {
        self.w.flush()?;
        if !self.r.buffer().is_empty() {
            return Err(std::io::Error::other("unread bytes after the handshake"));
        }
        self.w.into_inner().map_err(|e| e.into_error())
    }

    pub fn stream(&self) -> &TcpStream {
        self.w.get_ref()
    }

    /// Queues a frame (written on [`Self::flush`] or when the buffer fills).
    pub fn send(&mut self, id: u64, flags: u16, msg: &Message) -> Result<(), ConnError> {
        self.buf.clear();
        encode_frame(&mut self.buf, id, flags, msg);
        self.w.write_all(&self.buf)?;
        self.wire.sent.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ConnError> {
        self.w.flush()?;
        Ok(())
    }

    /// Reads one whole frame. The payload is read completely and its checksum verified before
    /// anything is decoded, so a truncated or corrupted frame is never acted upon.
    pub fn recv(&mut self) -> Result<(Header, Message), ConnError> {
        let mut raw = [0u8; HEADER_LEN];
        self.r.read_exact(&mut raw)?;
        let h = decode_header(&raw, MAX_PAYLOAD)?;
        let mut payload = vec![0u8; h.len as usize];
        self.r.read_exact(&mut payload)?;
        self.wire.received.fetch_add((HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        check_crc(&raw, &payload)?;
        let msg = Message::decode(h.kind, &payload)?;
        Ok((h, msg))
    }
}
