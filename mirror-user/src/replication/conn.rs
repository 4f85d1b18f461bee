//! Framed connections over TCP: read and write whole frames, count bytes on the wire. Frames
//! are read by a [`FrameDecoder`] (see `frame`), the same one the async connections drive.

use std::{
    io::{BufReader, BufWriter, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

pub use super::frame::ConnError;
use super::{
    frame::FrameDecoder,
    protocol::{encode_frame, Header, Message},
};

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
    frames: FrameDecoder,
    pub wire: Arc<Wire>,
}

impl Conn {
    pub fn new(stream: TcpStream) -> std::io::Result<Conn> {
        stream.set_nodelay(true)?;
        let r = BufReader::with_capacity(256 << 10, stream.try_clone()?);
        let w = BufWriter::with_capacity(256 << 10, stream);
        Ok(Conn { r, w, buf: Vec::new(), frames: FrameDecoder::default(), wire: Arc::default() })
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

    /// Caps the payload of the frames received from now on (at most `MAX_PAYLOAD`, the
    /// default): a larger frame is refused from its header, before anything is allocated.
    pub fn set_max_payload(&mut self, max: u32) {
        self.frames.set_max_payload(max);
    }

    /// Reads one whole frame. The payload is read completely and its checksum verified before
    /// anything is decoded, so a truncated or corrupted frame is never acted upon.
    pub fn recv(&mut self) -> Result<(Header, Message), ConnError> {
        let f = self.frames.read(&mut self.r)?;
        self.wire.received.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
        Ok((f.header, f.msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::protocol::{ProtoError, HEADER_LEN};

    #[test]
    fn frames_cross_a_socket_and_the_cap_holds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = Conn::new(TcpStream::connect(l.local_addr().unwrap()).unwrap()).unwrap();
        let mut b = Conn::new(l.accept().unwrap().0).unwrap();
        a.send(7, 1, &Message::Write { offset: 0, data: vec![3; 4096] }).unwrap();
        a.send(8, 0, &Message::Write { offset: 0, data: vec![4; 4097] }).unwrap();
        a.flush().unwrap();
        b.set_max_payload(8 + 4096);
        let (h, m) = b.recv().unwrap();
        assert_eq!((h.id, h.flags, m), (7, 1, Message::Write { offset: 0, data: vec![3; 4096] }));
        assert_eq!(b.wire.received.load(Ordering::Relaxed), (HEADER_LEN + 8 + 4096) as u64);
        let err = b.recv().unwrap_err();
        assert!(matches!(err, ConnError::Proto(ProtoError::Oversize { len: 4105, max: 4104 })), "{err}");
    }
}
