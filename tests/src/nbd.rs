//! A small NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies: write, flush, read) and, on
//! it, a writer that reconnects: it writes numbered blocks that carry their own sequence number
//! and digest, records when each was sent and acknowledged, and when its connection drops (or a
//! write is refused) it connects to the next of its routers' addresses, in turn, and goes on.
//! The handover tests and `bench-handover` read the replica files afterwards: every
//! acknowledged block must be there ([`lost`]), and blocks sent to a fenced router must not
//! ([`landed`]). The wire constants are the server's own (`mirror::frontend::nbd::wire`).

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use mirror::frontend::nbd::wire::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, IHAVEOPT,
    INFO_EXPORT, NBDMAGIC, OPT_GO, OPT_REPLY_MAGIC, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// A connection in the transmission phase (simple replies only).
#[derive(Debug)]
pub struct NbdClient {
    stream: TcpStream,
    /// The export's size and transmission flags from `NBD_INFO_EXPORT`.
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

/// One reply: the request's cookie and its NBD error (0: done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
}

fn u16_of(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn u32_of(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_of(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one simple reply header from `r`.
pub fn read_reply(r: &mut impl Read) -> io::Result<Reply> {
    let magic = u32_of(r)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(bad(format!("reply magic {magic:#x}")));
    }
    let error = u32_of(r)?;
    Ok(Reply { error, cookie: u64_of(r)? })
}

impl NbdClient {
    /// Connects to `addr` (within `timeout`), negotiates the default export with `NBD_OPT_GO`.
    /// Replies are waited for up to `io_timeout`.
    pub fn connect(addr: &str, timeout: Duration, io_timeout: Duration) -> io::Result<NbdClient> {
        let sa: SocketAddr = addr.parse().map_err(|e| bad(format!("{addr}: {e}")))?;
        let mut s = TcpStream::connect_timeout(&sa, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        if u64_of(&mut s)? != NBDMAGIC || u64_of(&mut s)? != IHAVEOPT {
            return Err(bad("not a newstyle NBD server".into()));
        }
        if u16_of(&mut s)? & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("not fixed newstyle".into()));
        }
        let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&6u32.to_be_bytes()); // an empty name, no information requests
        b.extend_from_slice(&[0u8; 6]);
        s.write_all(&b)?;
        let mut export = None;
        loop {
            if u64_of(&mut s)? != OPT_REPLY_MAGIC {
                return Err(bad("option reply magic".into()));
            }
            let (_opt, typ, len) = (u32_of(&mut s)?, u32_of(&mut s)?, u32_of(&mut s)?);
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match typ {
                REP_INFO if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                }
                REP_INFO => {}
                REP_ACK => break,
                t => {
                    return Err(bad(format!(
                        "NBD_OPT_GO refused ({t:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        let (size, flags) = export.ok_or_else(|| bad("no NBD_INFO_EXPORT before the ACK".into()))?;
        s.set_read_timeout(Some(io_timeout))?;
        Ok(NbdClient { stream: s, size, flags, cookie: 0 })
    }

    /// Sends a request with `cookie` (no reply read).
    pub fn send(&mut self, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.stream.write_all(&b)
    }

    /// A second handle on the socket, for a thread that reads the replies of pipelined requests.
    pub fn reader(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    fn call(&mut self, typ: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<()> {
        self.cookie += 1;
        let cookie = self.cookie;
        self.send(typ, cookie, offset, len, payload)?;
        let r = read_reply(&mut self.stream)?;
        if r.cookie != cookie {
            return Err(bad(format!("reply to cookie {} for {cookie}", r.cookie)));
        }
        if r.error != 0 {
            return Err(io::Error::other(format!("NBD error {}", r.error)));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| bad("write too large".into()))?;
        self.call(CMD_WRITE, offset, len, data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.call(CMD_FLUSH, 0, 0, &[])
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.call(CMD_READ, offset, len, &[])?;
        let mut b = vec![0u8; len as usize];
        self.stream.read_exact(&mut b)?;
        Ok(b)
    }

    /// Closes the socket both ways (a reader thread on it sees EOF).
    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The writer's block: 4 KiB at `base + seq * BLOCK`.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"MIRRWRT1";

/// Block `seq`'s content: the magic, `seq`, the connection that sent it, an xxh3 digest of the
/// block (digest field zeroed), then pseudo-random bytes seeded by `seq`.
pub fn block(seq: u64, conn: u32) -> Vec<u8> {
    let mut b = crate::fs::random_bytes(BLOCK, seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed);
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&conn.to_le_bytes());
    b[20..32].fill(0);
    let d = xxhash_rust::xxh3::xxh3_64(&b);
    b[24..32].copy_from_slice(&d.to_le_bytes());
    b
}

/// The sequence number and connection a block read back carries, if it is an intact writer block.
pub fn carried(b: &[u8]) -> Option<(u64, u32)> {
    if b.len() != BLOCK || &b[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let conn = u32::from_le_bytes(b[16..20].try_into().ok()?);
    let d = u64::from_le_bytes(b[24..32].try_into().ok()?);
    let mut z = b.to_vec();
    z[24..32].fill(0);
    (xxhash_rust::xxh3::xxh3_64(&z) == d && block(seq, conn) == b).then_some((seq, conn))
}

/// What the writer does.
#[derive(Debug, Clone)]
pub struct WriterOpts {
    /// The routers' NBD addresses, tried in turn.
    pub addrs: Vec<String>,
    /// Byte offset of block 0 and the number of blocks (one per request; the writer stops there).
    pub base: u64,
    pub blocks: u64,
    /// Requests in flight at most, and the least time between two sends.
    pub depth: usize,
    pub pace: Duration,
    /// How long a reply may take before the connection counts as dead.
    pub io_timeout: Duration,
    /// The writer gives up when no router accepts a connection for this long.
    pub give_up: Duration,
}

impl WriterOpts {
    pub fn new(addrs: Vec<String>, base: u64, blocks: u64) -> WriterOpts {
        WriterOpts {
            addrs,
            base,
            blocks,
            depth: 1,
            pace: Duration::from_millis(5),
            io_timeout: Duration::from_secs(30),
            give_up: Duration::from_mins(1),
        }
    }
}

/// One write request: its block (= sequence number), which address and connection carried it,
/// when it was sent, and when it was acknowledged, or refused (the NBD error; `u32::MAX`: the
/// connection dropped before a reply).
#[derive(Debug, Clone)]
pub struct Sent {
    pub seq: u64,
    pub addr: usize,
    pub conn: u32,
    pub sent: Instant,
    pub acked: Option<Instant>,
    pub error: Option<u32>,
}

/// What the writer saw: every request in order of sending, and each connection (when, which address).
#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    pub writes: Vec<Sent>,
    pub connects: Vec<(Instant, usize)>,
}

impl WriterLog {
    /// Acknowledgement times in order.
    pub fn ack_times(&self) -> Vec<Instant> {
        let mut v: Vec<Instant> = self.writes.iter().filter_map(|w| w.acked).collect();
        v.sort();
        v
    }

    /// The longest time between two consecutive acknowledgements, and when it began.
    pub fn longest_gap(&self) -> Option<(Duration, Instant)> {
        self.ack_times().windows(2).map(|w| (w[1] - w[0], w[0])).max_by_key(|(d, _)| *d)
    }

    /// The first acknowledgement after `t` by a router at address `addr`.
    pub fn first_ack_after(&self, t: Instant, addr: usize) -> Option<Instant> {
        self.writes.iter().filter(|w| w.addr == addr).filter_map(|w| w.acked).filter(|a| *a > t).min()
    }

    pub fn acked(&self) -> impl Iterator<Item = &Sent> {
        self.writes.iter().filter(|w| w.acked.is_some())
    }
}

/// A running writer; [`Writer::stop`] ends it and returns its log.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<WriterLog>>,
}

enum Event {
    Reply(Reply, Instant),
    Closed,
}

impl Writer {
    pub fn start(o: WriterOpts) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        Writer { stop, handle: std::thread::spawn(move || run(&o, &s)) }
    }

    /// Stops sending, waits for the replies in flight (up to the I/O timeout), returns the log.
    pub fn stop(self) -> Result<WriterLog> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?
    }
}

struct Conn {
    client: NbdClient,
    addr: usize,
    conn: u32,
    events: mpsc::Receiver<Event>,
}

fn open(o: &WriterOpts, addr: usize, conn: u32) -> io::Result<Conn> {
    let client = NbdClient::connect(&o.addrs[addr], Duration::from_secs(1), o.io_timeout)?;
    let mut r = client.reader()?;
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(rep) = read_reply(&mut r) {
            if tx.send(Event::Reply(rep, Instant::now())).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::Closed);
    });
    Ok(Conn { client, addr, conn, events })
}

fn run(o: &WriterOpts, stop: &AtomicBool) -> Result<WriterLog> {
    let mut log = WriterLog::default();
    let mut inflight: HashMap<u64, usize> = HashMap::new(); // cookie (= seq) -> index in log.writes
    let mut conn: Option<Conn> = None;
    let (mut next_addr, mut conns, mut seq) = (0usize, 0u32, 0u64);
    let mut next_send = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst) || seq >= o.blocks;
        if stopping && inflight.is_empty() {
            if let Some(c) = conn.take() {
                c.client.close();
            }
            return Ok(log);
        }
        let Some(c) = conn.as_mut() else {
            if stopping {
                return Ok(log);
            }
            // Connect to the next address in turn; after a whole round, a short wait.
            if let Ok(c) = open(o, next_addr, conns) {
                log.connects.push((Instant::now(), next_addr));
                conns += 1;
                conn = Some(c);
                unreachable_since = None;
            } else {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > o.give_up {
                    bail!("no router accepted a connection for {:?} ({:?})", o.give_up, o.addrs);
                }
                next_addr = (next_addr + 1) % o.addrs.len();
                if next_addr == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            continue;
        };
        let now = Instant::now();
        if !stopping && inflight.len() < o.depth && now >= next_send {
            let data = block(seq, c.conn);
            let sent = Instant::now();
            let ok = c.client.send(CMD_WRITE, seq, o.base + seq * BLOCK as u64, BLOCK as u32, &data).is_ok();
            inflight.insert(seq, log.writes.len());
            log.writes.push(Sent { seq, addr: c.addr, conn: c.conn, sent, acked: None, error: None });
            seq += 1;
            next_send = sent + o.pace;
            if !ok {
                // The reader thread sees the closed socket: the connection counts as dead then.
                c.client.close();
            }
            continue;
        }
        let sending = inflight.len() < o.depth && !stopping;
        let wait = if sending { next_send.saturating_duration_since(Instant::now()) } else { o.io_timeout };
        let dead = match c.events.recv_timeout(wait) {
            Ok(Event::Reply(r, at)) => match inflight.remove(&r.cookie) {
                Some(i) if r.error == 0 => {
                    log.writes[i].acked = Some(at);
                    false
                }
                Some(i) => {
                    log.writes[i].error = Some(r.error);
                    true
                }
                None => true,
            },
            // Nothing for a whole I/O timeout while waiting for replies: dead.
            Err(mpsc::RecvTimeoutError::Timeout) => !sending,
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        if dead {
            // Refused or cut off: whatever is still in flight is not acknowledged; the next
            // router in turn gets the following writes.
            c.client.close();
            for (_, i) in inflight.drain() {
                log.writes[i].error.get_or_insert(u32::MAX);
            }
            next_addr = (c.addr + 1) % o.addrs.len();
            conn = None;
        }
    }
}

/// Block `seq` of `file` as the writer lays them out from `base`.
pub fn read_block(file: &Path, base: u64, seq: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; BLOCK];
    std::fs::File::open(file)
        .with_context(|| format!("open {}", file.display()))?
        .read_exact_at(&mut b, base + seq * BLOCK as u64)
        .with_context(|| format!("read {}", file.display()))?;
    Ok(b)
}

/// Acknowledged writes not found intact on one of `files`: (file index, seq) of each.
pub fn lost(log: &WriterLog, base: u64, files: &[&Path]) -> Result<Vec<(usize, u64)>> {
    let mut out = Vec::new();
    for w in log.acked() {
        for (i, f) in files.iter().enumerate() {
            if carried(&read_block(f, base, w.seq)?) != Some((w.seq, w.conn)) {
                out.push((i, w.seq));
            }
        }
    }
    Ok(out)
}

/// Acknowledged writes that do not read back intact through `client` (a router serving the
/// volume): their sequence numbers.
pub fn lost_through(client: &mut NbdClient, log: &WriterLog, base: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for w in log.acked() {
        let b = client.read(base + w.seq * BLOCK as u64, BLOCK as u32)?;
        if carried(&b) != Some((w.seq, w.conn)) {
            out.push(w.seq);
        }
    }
    Ok(out)
}

/// Of the requests `which` selects, those whose block is on one of `files`: (file index, seq).
pub fn landed(
    log: &WriterLog,
    base: u64,
    files: &[&Path],
    which: impl Fn(&Sent) -> bool,
) -> Result<Vec<(usize, u64)>> {
    let mut out = Vec::new();
    for w in log.writes.iter().filter(|w| which(w)) {
        for (i, f) in files.iter().enumerate() {
            if carried(&read_block(f, base, w.seq)?) == Some((w.seq, w.conn)) {
                out.push((i, w.seq));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_carries_its_sequence_number_and_connection_and_nothing_else_passes() {
        let b = block(42, 3);
        assert_eq!(carried(&b), Some((42, 3)));
        let mut torn = b.clone();
        torn[BLOCK - 1] ^= 1;
        assert_eq!(carried(&torn), None);
        let mut other = b.clone();
        other[8] = 43;
        assert_eq!(carried(&other), None);
        assert_eq!(carried(&vec![0u8; BLOCK]), None);
        assert_ne!(block(42, 3), block(42, 4));
    }

    #[test]
    fn the_longest_gap_and_the_first_ack_after_an_instant() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let w = |seq, addr, at: Option<u64>| Sent {
            seq,
            addr,
            conn: 0,
            sent: t0,
            acked: at.map(|a| t0 + ms(a)),
            error: None,
        };
        let log = WriterLog {
            writes: vec![
                w(0, 0, Some(5)),
                w(1, 0, Some(10)),
                w(2, 0, None),
                w(3, 1, Some(400)),
                w(4, 1, Some(405)),
            ],
            connects: vec![],
        };
        let (gap, from) = log.longest_gap().unwrap();
        assert_eq!((gap, from), (ms(390), t0 + ms(10)));
        assert_eq!(log.first_ack_after(t0 + ms(6), 1), Some(t0 + ms(400)));
        assert_eq!(log.first_ack_after(t0 + ms(6), 0), Some(t0 + ms(10)));
        assert_eq!(log.acked().count(), 4);
    }
}
