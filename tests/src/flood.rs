//! Slow unauthenticated clients, for the tests of the limits before authentication: many
//! connections from 127.0.0.2 that each announce a large message and then send a byte every
//! 500 ms; and a process's figures from /proc (resident memory, threads).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::io::AsyncWriteExt;

/// A TLS handshake record header announcing 16 KiB (the largest record), and the start of a
/// ClientHello.
pub const TLS_RECORD: [u8; 11] = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03];

/// A field of /proc/PID/status (kB for the sizes).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// What the flood saw.
#[derive(Debug, Default)]
pub struct Flood {
    pub opened: AtomicUsize,
    /// Closed by the server (refused, evicted, timed out).
    pub closed: AtomicUsize,
    /// Still open when the flood ended.
    pub held: AtomicUsize,
}

/// Opens `n` connections from 127.0.0.2 to `addr`, connection `i` sending `announce(i)` (the
/// start of a large message) one byte every 500 ms, then `A`s, until `stop`. Connections the
/// server closes count in `seen.closed`.
pub fn flood(
    addr: std::net::SocketAddr,
    n: usize,
    announce: fn(usize) -> Vec<u8>,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Flood>,
) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..n {
            let (stop, seen) = (stop.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4().ok()?;
                sock.bind("127.0.0.2:0".parse().unwrap()).ok()?;
                let mut c = sock.connect(addr).await.ok()?;
                seen.opened.fetch_add(1, Ordering::Relaxed);
                let announce = announce(i);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    let b = announce.get(sent).copied().unwrap_or(0x41);
                    if c.write_all(&[b]).await.is_err() {
                        seen.closed.fetch_add(1, Ordering::Relaxed);
                        return Some(());
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                seen.held.fetch_add(1, Ordering::Relaxed);
                Some(())
            }));
            if i % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
