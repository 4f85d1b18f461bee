//! A remote replica: a pool of authenticated, pipelined protocol connections to a replica
//! server, driven from tokio. Each connection has a writer task (requests in order) and a reader
//! task (replies come back in request order and complete their requests).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    io::{AsyncWriteExt, BufReader, BufWriter},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use crate::replication::{
    client::Client,
    frame::{ConnError, Frame, FrameDecoder},
    protocol::{encode_frame, Message},
};

type Reply = oneshot::Sender<std::io::Result<Message>>;

struct Conn {
    tx: mpsc::Sender<(Message, u16, Reply)>,
    dead: Arc<AtomicBool>,
}

/// Connections to one volume on a replica server.
pub struct RemotePool {
    pub addr: String,
    conns: Vec<Conn>,
    next: AtomicUsize,
}

impl std::fmt::Debug for RemotePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemotePool({}, {} conns)", self.addr, self.conns.len())
    }
}

fn broken(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, what.to_string())
}

impl RemotePool {
    /// Connects `n` authenticated connections (the handshake runs on a blocking thread).
    pub async fn connect(
        addr: &str,
        volume: &str,
        secret: &[u8],
        n: usize,
    ) -> std::io::Result<(RemotePool, u64)> {
        let mut conns = Vec::new();
        let mut size = 0;
        for _ in 0..n.max(1) {
            let (a, v, s) = (addr.to_string(), volume.to_string(), secret.to_vec());
            let (std_stream, sz) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let c = Client::connect(&a, &v, &s).map_err(|e| {
                    // Unreachable nodes keep a kind of their own (`is_unreachable`); refusals
                    // (wrong secret, volume, version) are permission errors.
                    let kind = if e.is_unreachable() {
                        std::io::ErrorKind::ConnectionRefused
                    } else {
                        std::io::ErrorKind::PermissionDenied
                    };
                    std::io::Error::new(kind, e.to_string())
                })?;
                let size = c.info.size;
                Ok((c.into_stream()?, size))
            })
            .await
            .map_err(std::io::Error::other)??;
            size = sz;
            std_stream.set_nonblocking(true)?;
            conns.push(spawn_conn(TcpStream::from_std(std_stream)?));
        }
        Ok((RemotePool { addr: addr.into(), conns, next: AtomicUsize::new(0) }, size))
    }

    /// True when `e`, from [`RemotePool::connect`], says the node did not answer (it may be down),
    /// rather than refused us.
    pub fn is_unreachable(e: &std::io::Error) -> bool {
        e.kind() == std::io::ErrorKind::ConnectionRefused
    }

    /// True when a connection has failed (the pool must be replaced).
    pub fn is_broken(&self) -> bool {
        self.conns.iter().any(|c| c.dead.load(Ordering::Relaxed))
    }

    /// Sends a request on the next connection and waits for its reply. A remote error reply
    /// becomes an `io::Error` carrying its message.
    pub async fn call(&self, msg: Message, flags: u16) -> std::io::Result<Message> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let (tx, rx) = oneshot::channel();
        self.conns[i].tx.send((msg, flags, tx)).await.map_err(|_| broken("replica connection closed"))?;
        match rx.await.map_err(|_| broken("replica connection closed"))?? {
            Message::Error { code, message, .. } => {
                Err(std::io::Error::other(format!("{} (code {code}): {message}", self.addr)))
            }
            m => Ok(m),
        }
    }
}

/// Requests awaiting replies, and whether the connection is dead; one lock so that no request
/// can be queued after the reader has given up on the connection.
#[derive(Default)]
struct Pending {
    dead: bool,
    q: VecDeque<(u64, Reply)>,
}

fn spawn_conn(stream: TcpStream) -> Conn {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<(Message, u16, Reply)>(256);
    let pending: Arc<Mutex<Pending>> = Arc::default();
    let dead = Arc::new(AtomicBool::new(false));
    let fail_all = {
        let pending = pending.clone();
        let dead = dead.clone();
        move |why: &str| {
            dead.store(true, Ordering::Relaxed);
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            p.dead = true;
            for (_, reply) in p.q.drain(..) {
                let _ = reply.send(Err(broken(why)));
            }
        }
    };
    let (p2, fail_w) = (pending.clone(), fail_all.clone());
    tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let mut id = 1u64;
        let mut buf = Vec::new();
        while let Some((msg, flags, reply)) = rx.recv().await {
            {
                let mut p = p2.lock().unwrap_or_else(|p| p.into_inner());
                if p.dead {
                    let _ = reply.send(Err(broken("replica connection closed")));
                    continue;
                }
                p.q.push_back((id, reply));
            }
            buf.clear();
            encode_frame(&mut buf, id, flags, &msg);
            id += 1;
            let mut ok = w.write_all(&buf).await.is_ok();
            if ok && rx.is_empty() {
                ok = w.flush().await.is_ok();
            }
            if !ok {
                fail_w("write to replica failed");
            }
        }
    });
    tokio::spawn(async move {
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut frames = FrameDecoder::default();
        loop {
            let Frame { header, msg } = match frames.read_async(&mut r).await {
                Ok(f) => f,
                Err(ConnError::Proto(e)) => {
                    fail_all(&format!("bad reply: {e}"));
                    return;
                }
                Err(_) => {
                    fail_all("replica connection closed");
                    return;
                }
            };
            let next = pending.lock().unwrap_or_else(|p| p.into_inner()).q.pop_front();
            match next {
                Some((id, reply)) if id == header.id => {
                    let _ = reply.send(Ok(msg));
                }
                Some((_, reply)) => {
                    let _ = reply.send(Err(broken("reply out of order")));
                    fail_all("reply out of order");
                    return;
                }
                None => {
                    fail_all("unsolicited reply");
                    return;
                }
            }
        }
    });
    Conn { tx, dead }
}
