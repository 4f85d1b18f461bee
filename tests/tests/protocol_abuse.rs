//! Bad peers against a real replica server: wrong secret, wrong volume, wrong version, garbage,
//! oversize and truncated frames, out-of-range requests. Each gets an error or a closed
//! connection; nothing partial is ever written; the server keeps serving everyone else.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use mirror::replication::{
    auth,
    client::{Client, ClientError},
    protocol::{code, decode_frame, encode_frame, Message, MAX_PAYLOAD, VERSION},
};
use mirror_tests::{
    fs::{file_digest, random_bytes, secret_file, TempDir},
    proc::Replica,
};

const SECRET: &[u8] = b"test-secret-0123456789abcdef";

fn setup(tag: &str) -> (TempDir, Replica) {
    let dir = TempDir::new(tag);
    let secret = secret_file(&dir.0);
    std::fs::write(dir.0.join("v.img"), random_bytes(4 << 20, 3)).unwrap();
    let r = Replica::start(&dir.0.join("v.img"), &secret, None, &[]);
    (dir, r)
}

/// The server still answers a well-behaved client.
fn still_serving(r: &Replica) {
    let mut c = Client::connect(&r.addr, "v", SECRET).expect("good client still served");
    assert_eq!(c.read(0, 16).expect("read").len(), 16);
}

/// Reads until the server closes; returns the messages it sent.
fn drain(s: &mut TcpStream) -> Vec<Message> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(Some((_, m, used))) = decode_frame(&buf[at..]) {
        out.push(m);
        at += used;
    }
    out
}

fn remote_code(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Remote { code, message, .. } => (code, message),
        e => panic!("expected a refusal, got {e}"),
    }
}

#[test]
fn wrong_secret_wrong_volume_and_wrong_version_are_refused() {
    let (_d, r) = setup("abuse-auth");
    let (c, m) = remote_code(Client::connect(&r.addr, "v", b"not-the-secret-at-all").unwrap_err());
    assert_eq!(c, code::AUTH, "{m}");
    let (c, m) = remote_code(Client::connect(&r.addr, "nope", SECRET).unwrap_err());
    assert_eq!(c, code::NO_VOLUME, "{m}");
    assert!(m.contains("nope"));

    let mut s = TcpStream::connect(&r.addr).unwrap();
    let mut f = Vec::new();
    encode_frame(
        &mut f,
        0,
        0,
        &Message::Hello { version: VERSION + 1, volume: "v".into(), nonce: auth::nonce() },
    );
    s.write_all(&f).unwrap();
    let msgs = drain(&mut s);
    assert!(
        matches!(&msgs[..], [Message::Error { code: code::VERSION, message, .. }] if message.contains("version")),
        "{msgs:?}"
    );

    // A request before authenticating gets nothing but a refusal.
    let mut s = TcpStream::connect(&r.addr).unwrap();
    let mut f = Vec::new();
    encode_frame(&mut f, 1, 0, &Message::Write { offset: 0, data: vec![0; 512] });
    s.write_all(&f).unwrap();
    let msgs = drain(&mut s);
    assert!(matches!(&msgs[..], [Message::Error { code: code::PROTOCOL, .. }]), "{msgs:?}");
    still_serving(&r);
}

#[test]
fn garbage_oversize_and_truncated_frames_close_only_that_connection() {
    let (d, r) = setup("abuse-frames");
    let before = file_digest(&d.0.join("v.img"));

    // Pure garbage.
    let mut s = TcpStream::connect(&r.addr).unwrap();
    s.write_all(&random_bytes(4096, 99)).unwrap();
    let _ = drain(&mut s);

    // Authenticated, then an oversize frame header.
    let mut c = Client::connect(&r.addr, "v", SECRET).unwrap();
    let mut f = Vec::new();
    encode_frame(&mut f, 5, 0, &Message::Flush);
    f[16..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    c.conn.stream().try_clone().unwrap().write_all(&f).unwrap();
    let err = c.recv().unwrap_err();
    assert!(matches!(err, ClientError::Remote { code: code::PROTOCOL, .. }), "{err}");

    // Authenticated, then a write whose payload is cut short before a disconnect.
    let c = Client::connect(&r.addr, "v", SECRET).unwrap();
    let mut f = Vec::new();
    encode_frame(&mut f, 6, 0, &Message::Write { offset: 0, data: vec![0xee; 65536] });
    let mut s = c.conn.stream().try_clone().unwrap();
    s.write_all(&f[..f.len() / 2]).unwrap();
    drop(s);
    drop(c);

    // Authenticated, then a write with a flipped payload bit (bad checksum).
    let mut c = Client::connect(&r.addr, "v", SECRET).unwrap();
    let mut f = Vec::new();
    encode_frame(&mut f, 7, 0, &Message::Write { offset: 0, data: vec![0xdd; 4096] });
    let n = f.len();
    f[n - 100] ^= 1;
    c.conn.stream().try_clone().unwrap().write_all(&f).unwrap();
    assert!(c.recv().is_err(), "a corrupted frame is refused");

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(file_digest(&d.0.join("v.img")), before, "no partial or corrupted write was applied");
    still_serving(&r);
}

#[test]
fn out_of_range_requests_get_errors_and_change_nothing() {
    let (d, r) = setup("abuse-range");
    let before = file_digest(&d.0.join("v.img"));
    let mut c = Client::connect(&r.addr, "v", SECRET).unwrap();
    let size = c.info.size;
    for m in [
        Message::Write { offset: size - 100, data: vec![1; 4096] },
        Message::Write { offset: u64::MAX - 10, data: vec![1; 64] },
        Message::Read { offset: size, len: 1 },
        Message::Read { offset: 0, len: u32::MAX },
        Message::WriteZeroes { offset: size - 1, len: 2 },
        Message::Digests { grain: 4096, extents: vec![(size - 4096, 8192)] },
        Message::Digests { grain: 1, extents: vec![(0, 4096)] },
        Message::MarkDirty { offset: size, len: 1 },
    ] {
        let what = format!("{m:?}");
        let e = c.call(&m).expect_err(&what);
        assert!(matches!(e, ClientError::Remote { code: code::RANGE, .. }), "{what}: {e}");
    }
    // The connection survives range errors.
    assert_eq!(c.read(0, 8).unwrap().len(), 8);
    // A reply message sent as a request closes the connection.
    assert!(c.call(&Message::Ok).is_err());
    assert_eq!(file_digest(&d.0.join("v.img")), before);
    still_serving(&r);
}
