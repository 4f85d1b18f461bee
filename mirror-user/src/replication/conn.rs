//! Framed blocking connections: read and write whole frames over one stream (a TCP socket, or
//! a TLS session on one), count bytes on the wire. Frames are read by a [`FrameDecoder`] (see
//! `frame`), the same one the async connections drive.
//!
//! A TLS session is one object for both directions (it cannot be split into a reader and a
//! writer the way a socket can be `try_clone`d), so a [`Conn`] is one buffered object over one
//! [`Stream`]: reads come through a read buffer, frames to send are queued in a write buffer
//! and go out on [`Conn::flush`] (or when the buffer fills). Queuing coalesces small frames: a
//! run of them becomes one TLS record, not a record each. Both users go in turns (the server
//! answers a request, a client sends a batch and then reads the replies), which one object
//! serves.

use std::{
    io::{BufReader, ErrorKind, Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use rustls::{ClientConnection, ServerConnection, StreamOwned};

pub use super::frame::ConnError;
use super::{
    auth::{self, Binding},
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

/// One connection's byte stream: a plain socket, or a TLS session over one (either end).
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    TlsClient(Box<StreamOwned<ClientConnection, TcpStream>>),
    TlsServer(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    /// The socket underneath (timeouts, addresses).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::TlsClient(s) => s.get_ref(),
            Stream::TlsServer(s) => s.get_ref(),
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// What binds the shared secret's proofs to this TLS session for `volume` (`None` on a plain
    /// socket; see `auth`).
    pub fn binding(&self, volume: &str) -> Result<Binding, rustls::Error> {
        Ok(match self {
            Stream::Plain(_) => None,
            Stream::TlsClient(s) => Some(auth::binding(&s.conn, volume)?),
            Stream::TlsServer(s) => Some(auth::binding(&s.conn, volume)?),
        })
    }

    /// Sends a TLS close_notify (nothing on a plain socket), so the peer tells a clean close
    /// from a cut.
    pub fn close_notify(&mut self) {
        let sent = match self {
            Stream::Plain(_) => return,
            Stream::TlsClient(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
            Stream::TlsServer(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
        };
        let _ = sent;
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::TlsClient(s) => s.read(buf),
            Stream::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::TlsClient(s) => s.write(buf),
            Stream::TlsServer(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::TlsClient(s) => s.flush(),
            Stream::TlsServer(s) => s.flush(),
        }
    }
}

/// Read and write buffer size of an authenticated connection.
pub const BUF_LEN: usize = 256 << 10;

/// A framed, buffered connection over one [`Stream`].
#[derive(Debug)]
pub struct Conn {
    stream: BufReader<Stream>,
    /// Frames queued for [`Self::flush`].
    out: Vec<u8>,
    frames: FrameDecoder,
    pub wire: Arc<Wire>,
}

impl Conn {
    /// A connection over a plain socket.
    pub fn new(stream: TcpStream) -> std::io::Result<Conn> {
        Self::over(Stream::Plain(stream))
    }

    /// A connection over `stream`, with [`BUF_LEN`] buffers and the full payload cap.
    pub fn over(stream: Stream) -> std::io::Result<Conn> {
        stream.tcp().set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::with_capacity(BUF_LEN, stream),
            out: Vec::with_capacity(BUF_LEN),
            frames: FrameDecoder::default(),
            wire: Arc::default(),
        })
    }

    /// The stream, once nothing is buffered in either direction (after a handshake).
    pub fn into_stream(mut self) -> std::io::Result<Stream> {
        self.flush().map_err(|e| match e {
            ConnError::Io(e) => e,
            e => std::io::Error::other(e),
        })?;
        if !self.stream.buffer().is_empty() {
            return Err(std::io::Error::other("unread bytes after the handshake"));
        }
        Ok(self.stream.into_inner())
    }

    /// The stream: a socket or a TLS session.
    pub fn session(&self) -> &Stream {
        self.stream.get_ref()
    }

    /// The socket underneath.
    pub fn stream(&self) -> &TcpStream {
        self.stream.get_ref().tcp()
    }

    /// Sets the socket's read timeout (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.stream().set_read_timeout(t)
    }

    /// Queues a frame (written on [`Self::flush`] or when the buffer fills).
    pub fn send(&mut self, id: u64, flags: u16, msg: &Message) -> Result<(), ConnError> {
        let before = self.out.len();
        encode_frame(&mut self.out, id, flags, msg);
        self.wire.sent.fetch_add((self.out.len() - before) as u64, Ordering::Relaxed);
        if self.out.len() >= BUF_LEN {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        let r = self.stream.get_mut().write_all(&self.out);
        self.out.clear();
        if self.out.capacity() > 2 * BUF_LEN {
            // A large frame grew the buffer: give the memory back.
            self.out = Vec::with_capacity(BUF_LEN);
        }
        r
    }

    /// Writes what is queued and flushes the stream.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        if !self.out.is_empty() {
            self.write_out()?;
        }
        self.stream.get_mut().flush()?;
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
        let f = self.frames.read(&mut self.stream)?;
        self.wire.received.fetch_add(f.wire_len() as u64, Ordering::Relaxed);
        Ok((f.header, f.msg))
    }

    /// True when the peer closed the connection cleanly between frames (no byte of a next
    /// frame read): the reading end of an error from [`Self::recv`].
    pub fn closed_cleanly(e: &ConnError) -> bool {
        matches!(e, ConnError::Io(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset))
    }

    /// Sends a TLS close_notify after what is queued (nothing more on a plain socket).
    pub fn close(&mut self) {
        let _ = self.flush();
        self.stream.get_mut().close_notify();
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

    #[test]
    fn queued_frames_go_out_when_the_buffer_fills() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = Conn::new(TcpStream::connect(l.local_addr().unwrap()).unwrap()).unwrap();
        let mut b = Conn::new(l.accept().unwrap().0).unwrap();
        // Three 100 KiB frames: the third fills the buffer past BUF_LEN and sends all three
        // without a flush.
        for id in 0..3 {
            a.send(id, 0, &Message::Data(vec![id as u8; 100 << 10])).unwrap();
        }
        for id in 0..3 {
            let (h, m) = b.recv().unwrap();
            assert_eq!((h.id, m), (id, Message::Data(vec![id as u8; 100 << 10])));
        }
        assert_eq!(a.wire.sent.load(Ordering::Relaxed), b.wire.received.load(Ordering::Relaxed));
    }
}
