//! The NBD frontend (`nbd_file`: one file served with `FileDev`) against real clients nobody here
//! wrote (qemu-io, nbdinfo, nbdcopy, fio's nbd engine) and against hand-made bad clients.

use std::{
    io::{BufRead, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mirror_tests::{
    env::{skip, which},
    fs::{file_digest, random_bytes, TempDir},
};

const SIZE: u64 = 64 << 20;
const MAX_REQUEST: u32 = 32 << 20;

/// `nbd_file`: $NBD_FILE_BIN, or the binary cargo built for this package.
fn nbd_file_bin() -> PathBuf {
    std::env::var_os("NBD_FILE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_nbd_file").into(), PathBuf::from)
}

/// An `nbd_file` process serving `path` (created with SIZE bytes when missing), killed on drop.
struct Server {
    child: Child,
    /// `127.0.0.1:PORT` or the socket path.
    addr: String,
    unix: bool,
}

impl Server {
    fn start(path: &Path, unix: Option<&Path>, extra: &[&str]) -> Server {
        let mut cmd = Command::new(nbd_file_bin());
        cmd.arg("--file").arg(path).args(["--size", &SIZE.to_string(), "--name", "vol"]);
        match unix {
            Some(sock) => cmd.arg("--unix").arg(sock),
            None => cmd.args(["--tcp", "127.0.0.1:0"]),
        };
        let mut child = cmd.args(extra).stdout(Stdio::piped()).spawn().expect("spawn nbd_file");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("nbd_file said {line:?}"))
            .to_string();
        Server { child, addr, unix: unix.is_some() }
    }

    fn uri(&self) -> String {
        if self.unix {
            format!("nbd+unix:///vol?socket={}", self.addr)
        } else {
            format!("nbd://{}/vol", self.addr)
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True (after a loud skip) when `tool` is not installed.
fn missing(test: &str, tool: &str) -> bool {
    if which(tool).is_some() {
        return false;
    }
    skip(test, "NBD", &format!("{tool} is not installed (Debian: qemu-utils, libnbd-bin, fio)"));
    true
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).expect("open").read_exact_at(&mut buf, offset).expect("read");
    buf
}

fn qemu_io_patterns(test: &str, unix: bool) {
    if missing(test, "qemu-io") {
        return;
    }
    let dir = TempDir::new("nbd-qemu");
    let img = dir.0.join("disk.img");
    let sock = dir.0.join("nbd.sock");
    let srv = Server::start(&img, unix.then_some(sock.as_path()), &[]);
    let out = run(Command::new("qemu-io").args(["-f", "raw", &srv.uri()]).args([
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -f -P 0xcd 1M 128k",
        "-c",
        "read -P 0xcd 1M 128k",
        "-c",
        "write -z 1M 64k",
        "-c",
        "read -P 0 1M 64k",
        "-c",
        "read -P 0xcd 1088k 64k",
        "-c",
        "discard 32k 32k",
        "-c",
        "read -P 0 32k 32k",
        "-c",
        "write -P 0x5e 67104768 4k",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("verification failed"), "qemu-io:\n{out}");
    assert!(out.contains("wrote 131072/131072 bytes at offset 1048576"), "qemu-io:\n{out}");
    // What qemu-io wrote is in the file, byte for byte.
    assert_eq!(read_at(&img, 0, 32 << 10), vec![0xab; 32 << 10]);
    assert_eq!(read_at(&img, 32 << 10, 32 << 10), vec![0; 32 << 10]);
    assert_eq!(read_at(&img, 1 << 20, 64 << 10), vec![0; 64 << 10]);
    assert_eq!(read_at(&img, (1 << 20) + (64 << 10), 64 << 10), vec![0xcd; 64 << 10]);
    assert_eq!(read_at(&img, SIZE - 4096, 4096), vec![0x5e; 4096]);
    // A pattern that is not there is reported as such: the checks above are not vacuous.
    let bad = Command::new("qemu-io").args(["-f", "raw", &srv.uri(), "-c", "read -P 0x11 0 4k"]).output();
    let bad = bad.expect("run qemu-io");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
}

#[test]
fn qemu_io_write_read_patterns_tcp() {
    qemu_io_patterns("qemu_io_write_read_patterns_tcp", false);
}

#[test]
fn qemu_io_write_read_patterns_unix() {
    qemu_io_patterns("qemu_io_write_read_patterns_unix", true);
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    if missing("nbdinfo_reports_size_and_flags", "nbdinfo") {
        return;
    }
    let dir = TempDir::new("nbd-info");
    let img = dir.0.join("disk.img");
    let srv = Server::start(&img, None, &[]);
    let out = run(Command::new("nbdinfo").args(["--json", &srv.uri()]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol");
    assert_eq!(e["export-size"], SIZE);
    for flag in ["can_multi_conn", "can_fua", "can_trim", "can_zero", "can_flush"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_maximum"], MAX_REQUEST);
    // NBD_OPT_LIST, and the default export "".
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &format!("nbd://{}", srv.addr)]));
    let v: serde_json::Value = serde_json::from_str(&list).expect("nbdinfo --list --json");
    assert_eq!(v["exports"][0]["export-name"], "vol", "{list}");
    let dflt = run(Command::new("nbdinfo").args(["--size", &format!("nbd://{}", srv.addr)]));
    assert_eq!(dflt.trim(), SIZE.to_string());
    // Read-only exports say so.
    let ro = Server::start(&img, None, &["--read-only"]);
    let out = run(Command::new("nbdinfo").args(["--json", &ro.uri()]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json");
    assert_eq!(v["exports"][0]["is_read_only"], true);
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    if missing("nbdcopy_round_trip_multi_conn", "nbdcopy") {
        return;
    }
    let dir = TempDir::new("nbd-copy");
    let img = dir.0.join("disk.img");
    let src = dir.0.join("src.img");
    let back = dir.0.join("back.img");
    std::fs::write(&src, random_bytes(SIZE as usize, 7)).expect("write source");
    let srv = Server::start(&img, None, &[]);
    run(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&src).arg(srv.uri()));
    run(Command::new("nbdcopy").arg(srv.uri()).arg(&back));
    let want = file_digest(&src);
    assert_eq!(file_digest(&img), want, "served file differs from the source");
    assert_eq!(file_digest(&back), want, "copy back differs from the source");
    // Same over a Unix socket, one connection, into a fresh file.
    let img2 = dir.0.join("disk2.img");
    let sock = dir.0.join("nbd.sock");
    let srv2 = Server::start(&img2, Some(&sock), &[]);
    run(Command::new("nbdcopy").arg(&src).arg(srv2.uri()));
    assert_eq!(file_digest(&img2), want);
}

#[test]
fn fio_random_writes_verify_crc32c() {
    if missing("fio_random_writes_verify_crc32c", "fio") {
        return;
    }
    let dir = TempDir::new("nbd-fio");
    let img = dir.0.join("disk.img");
    let srv = Server::start(&img, None, &[]);
    // Four jobs = four connections (multi-conn), each on its own 16 MiB quarter.
    // In the scratch directory: fio leaves verify state files in its working directory.
    let out = run(Command::new("fio").current_dir(&dir.0).args([
        "--name=nbd",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri()),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--size=16M",
        "--numjobs=4",
        "--offset_increment=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4);
    for j in jobs {
        assert_eq!(j["error"], 0, "fio job error: {j}");
        assert!(j["write"]["io_bytes"].as_u64().unwrap_or(0) >= 16 << 20, "wrote less than 16 MiB: {j}");
        // The verify phase read everything back.
        assert!(j["read"]["io_bytes"].as_u64().unwrap_or(0) >= 16 << 20, "verified less than 16 MiB: {j}");
    }
}

// ---- hand-made clients ----

use mirror::frontend::nbd::wire::{
    errno::{EINVAL, ENOSPC, EPERM},
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, IHAVEOPT, NBDMAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_REPLY_MAGIC, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_INVALID, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Raw(s)
    }

    fn u16(&mut self) -> u16 {
        let mut b = [0; 2];
        self.0.read_exact(&mut b).expect("read u16");
        u16::from_be_bytes(b)
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.0.read_exact(&mut b).expect("read u32");
        u32::from_be_bytes(b)
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.0.read_exact(&mut b).expect("read u64");
        u64::from_be_bytes(b)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact(&mut b).expect("read bytes");
        b
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send");
    }

    /// Reads the server greeting and answers with `client_flags`.
    fn hello(&mut self, client_flags: u32) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16() & 1, 1, "fixed newstyle");
        self.send(&client_flags.to_be_bytes());
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// (option, reply type, data)
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let (opt, typ, len) = (self.u32(), self.u32(), self.u32());
        (opt, typ, self.bytes(len as usize))
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// NBD_OPT_GO for `name`: the export size and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.opt(OPT_GO, &Self::go_data(name));
        let mut export = None;
        loop {
            let (opt, typ, data) = self.opt_reply();
            assert_eq!(opt, OPT_GO);
            match typ {
                REP_INFO if data[..2] == [0, 0] => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                t => panic!("GO failed: {t:#x} {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    /// Connects and enters transmission on export `vol`.
    fn open(addr: &str, structured: bool) -> Raw {
        let mut c = Raw::connect(addr);
        c.hello(3);
        if structured {
            c.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_reply().1, REP_ACK);
        }
        assert_eq!(c.go("vol").0, SIZE);
        c
    }

    fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply header: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// A structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let (flags, typ, cookie, len) = (self.u16(), self.u16(), self.u64(), self.u32());
        (flags, typ, cookie, self.bytes(len as usize))
    }

    /// True when the server closed the connection (EOF or reset) within the timeout.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

#[test]
fn bad_handshakes_get_errors_or_closed() {
    let dir = TempDir::new("nbd-bad-hs");
    let img = dir.0.join("disk.img");
    let mut srv = Server::start(&img, None, &[]);

    // Wrong option magic: hard disconnect.
    let mut c = Raw::connect(&srv.addr);
    c.hello(3);
    c.send(b"NOTMAGIC\0\0\0\x07\0\0\0\0");
    assert!(c.closed(), "server kept a client with a wrong option magic");

    // Unknown client flags: hard disconnect.
    let mut c = Raw::connect(&srv.addr);
    c.hello(0xffff_fff0);
    assert!(c.closed(), "server kept a client with unknown flags");

    // Garbage before the greeting is read, then a disconnect mid-handshake.
    let mut c = Raw::connect(&srv.addr);
    c.send(&random_bytes(4096, 3));
    assert!(c.closed());
    drop(Raw::connect(&srv.addr));

    // Unknown options are refused and negotiation goes on.
    let mut c = Raw::connect(&srv.addr);
    c.hello(3);
    c.opt(0x1234, b"garbage");
    let (opt, typ, msg) = c.opt_reply();
    assert_eq!((opt, typ), (0x1234, REP_ERR_UNSUP), "{}", String::from_utf8_lossy(&msg));
    c.opt(OPT_INFO, b"\xff\xff");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.opt(OPT_LIST, &[]);
    let (_, typ, data) = c.opt_reply();
    assert_eq!(typ, REP_SERVER);
    assert_eq!(&data[..7], b"\0\0\0\x03vol");
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.opt(OPT_GO, &Raw::go_data("nope"));
    let (_, typ, msg) = c.opt_reply();
    assert_eq!(typ, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().1, REP_ACK);
    assert!(c.closed());

    // NBD_OPT_EXPORT_NAME with NO_ZEROES: size, flags, then transmission.
    let mut c = Raw::connect(&srv.addr);
    c.hello(3);
    c.opt(OPT_EXPORT_NAME, b"vol");
    assert_eq!(c.u64(), SIZE);
    let flags = c.u16();
    assert_eq!(flags & 0x16d, 0x16d, "HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN in {flags:#x}");
    c.request(0, CMD_READ, 9, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 9));
    assert_eq!(c.bytes(512), vec![0; 512]);
    c.request(0, CMD_DISC, 10, 0, 0, &[]);
    assert!(c.closed());

    // EXPORT_NAME for an unknown export: the only answer is a hard disconnect.
    let mut c = Raw::connect(&srv.addr);
    c.hello(3);
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());

    assert!(srv.alive(), "server died");
    Raw::open(&srv.addr, false);
}

#[test]
fn bad_requests_get_errors_and_change_nothing() {
    let dir = TempDir::new("nbd-bad-req");
    let img = dir.0.join("disk.img");
    let mut srv = Server::start(&img, None, &[]);
    let mut c = Raw::open(&srv.addr, false);
    c.request(0, CMD_WRITE, 1, 4096, 4096, &[0x5a; 4096]);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(1, CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    let before = file_digest(&img);

    // Read past the end: EINVAL; the stream stays usable.
    c.request(0, CMD_READ, 3, SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    // Offset + length overflowing u64.
    c.request(0, CMD_READ, 4, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    // Write past the end: ENOSPC, payload consumed, nothing written.
    c.request(0, CMD_WRITE, 5, SIZE - 4096, 8192, &[0xee; 8192]);
    assert_eq!(c.simple_reply(), (ENOSPC, 5));
    c.request(0, CMD_WRITE_ZEROES, 6, SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple_reply(), (ENOSPC, 6));
    c.request(0, CMD_TRIM, 7, SIZE, 4096, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 7));
    // Oversize write (max + 1 bytes): EINVAL, payload skipped, nothing written.
    let big = vec![0xee; MAX_REQUEST as usize + 1];
    c.request(0, CMD_WRITE, 8, 0, big.len() as u32, &big);
    assert_eq!(c.simple_reply(), (EINVAL, 8));
    // Oversize read: EINVAL without data.
    c.request(0, CMD_READ, 9, 0, MAX_REQUEST + 1, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 9));
    // Unknown command, unknown flag on a write (its payload is still consumed).
    c.request(0, 42, 10, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 10));
    c.request(0x40, CMD_WRITE, 11, 0, 4096, &[0xee; 4096]);
    assert_eq!(c.simple_reply(), (EINVAL, 11));
    // Still in sync: a valid read returns what was written.
    c.request(0, CMD_READ, 12, 4096, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 12));
    assert_eq!(c.bytes(4096), vec![0x5a; 4096]);
    assert_eq!(file_digest(&img), before, "a refused request changed the file");

    // Wrong request magic: hard disconnect.
    c.send(&[0xde; 28]);
    assert!(c.closed());

    // Disconnect in the middle of a write payload: nothing of it is applied.
    let mut c = Raw::open(&srv.addr, false);
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&CMD_WRITE.to_be_bytes());
    b.extend_from_slice(&13u64.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&65536u32.to_be_bytes());
    b.extend_from_slice(&[0xee; 30000]);
    c.send(&b);
    drop(c);
    // Disconnect in the middle of a request header.
    let mut c = Raw::open(&srv.addr, false);
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);

    // The server still serves new clients, and the file is unchanged.
    let mut c = Raw::open(&srv.addr, false);
    c.request(0, CMD_FLUSH, 14, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 14));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(file_digest(&img), before, "a partial write payload reached the file");
    c.request(0, CMD_READ, 15, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 15));
    assert_eq!(c.bytes(4096), vec![0; 4096]);
    assert!(srv.alive(), "server died");
}

#[test]
fn structured_replies_and_read_only() {
    let dir = TempDir::new("nbd-structured");
    let img = dir.0.join("disk.img");
    std::fs::write(&img, random_bytes(SIZE as usize, 11)).expect("write image");
    let before = file_digest(&img);
    let srv = Server::start(&img, None, &["--read-only"]);
    let mut c = Raw::open(&srv.addr, true);
    // A read is one OFFSET_DATA chunk marked DONE.
    c.request(0, CMD_READ, 1, 8192, 4096, &[]);
    let (flags, typ, cookie, payload) = c.chunk();
    assert_eq!((flags, typ, cookie), (1, 1, 1));
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 8192);
    assert_eq!(&payload[8..], &read_at(&img, 8192, 4096)[..]);
    // Errors are ERROR chunks with a message.
    c.request(0, CMD_READ, 2, SIZE, 512, &[]);
    let (flags, typ, cookie, payload) = c.chunk();
    assert_eq!((flags, typ, cookie), (1, 0x8001, 2));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    let len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert!(String::from_utf8_lossy(&payload[6..6 + len]).contains("exceeds the export size"));
    // Read-only: writes, zeroes and trims fail with EPERM (simple replies or error chunks).
    for (cookie, typ, payload) in
        [(3, CMD_WRITE, vec![1u8; 512]), (4, CMD_WRITE_ZEROES, vec![]), (5, CMD_TRIM, vec![])]
    {
        c.request(0, typ, cookie, 0, 512, &payload);
        let (_, t, ck, p) = c.chunk();
        assert_eq!((t, ck), (0x8001, cookie));
        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EPERM);
    }
    c.request(0, CMD_DISC, 6, 0, 0, &[]);
    assert!(c.closed());
    assert_eq!(file_digest(&img), before, "a read-only export changed");
}

#[test]
fn concurrent_requests_on_one_connection() {
    let dir = TempDir::new("nbd-pipeline");
    let img = dir.0.join("disk.img");
    let srv = Server::start(&img, None, &[]);
    let mut c = Raw::open(&srv.addr, false);
    // 64 pipelined writes, then 64 pipelined reads; replies may come in any order.
    for i in 0..64u64 {
        c.request(0, CMD_WRITE, i, i * 65536, 65536, &vec![i as u8 + 1; 65536]);
    }
    let mut seen = Vec::new();
    for _ in 0..64 {
        let (e, ck) = c.simple_reply();
        assert_eq!(e, 0, "write {ck}");
        seen.push(ck);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
    for i in 0..64u64 {
        c.request(0, CMD_READ, 100 + i, i * 65536, 65536, &[]);
    }
    for _ in 0..64 {
        let (e, ck) = c.simple_reply();
        assert_eq!(e, 0);
        let i = ck - 100;
        assert_eq!(c.bytes(65536), vec![i as u8 + 1; 65536], "read of block {i}");
    }
}

#[test]
fn random_garbage_never_kills_the_server() {
    let dir = TempDir::new("nbd-garbage");
    let img = dir.0.join("disk.img");
    let mut srv = Server::start(&img, None, &[]);
    let before = file_digest(&img);
    for seed in 1..=40u64 {
        let junk = random_bytes(64 + (seed as usize * 97) % 8192, seed);
        let mut c = match seed % 3 {
            // Garbage as client flags and options.
            0 => Raw::connect(&srv.addr),
            // Garbage after a valid IHAVEOPT header of a random option.
            1 => {
                let mut c = Raw::connect(&srv.addr);
                c.hello(3);
                c.send(&IHAVEOPT.to_be_bytes());
                c
            }
            // Garbage as requests in transmission.
            _ => Raw::open(&srv.addr, seed % 4 == 0),
        };
        let _ = c.0.write_all(&junk);
        let _ = c.0.shutdown(std::net::Shutdown::Write);
        assert!(c.closed(), "seed {seed}: connection left open after garbage and EOF");
    }
    assert!(srv.alive(), "server died");
    assert_eq!(file_digest(&img), before, "garbage changed the file");
    let mut c = Raw::open(&srv.addr, false);
    c.request(0, CMD_READ, 1, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 1));
}

#[test]
fn qemu_img_convert_and_compare() {
    if missing("qemu_img_convert_and_compare", "qemu-img") {
        return;
    }
    let dir = TempDir::new("nbd-qemu-img");
    let img = dir.0.join("disk.img");
    let src = dir.0.join("src.img");
    // Half data, half zeroes: qemu-img writes zeroes with WRITE_ZEROES.
    let mut data = random_bytes(SIZE as usize / 2, 21);
    data.resize(SIZE as usize, 0);
    std::fs::write(&src, &data).expect("write source");
    std::fs::write(&img, random_bytes(SIZE as usize, 22)).expect("write target");
    let srv = Server::start(&img, None, &[]);
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(srv.uri()));
    let out =
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(srv.uri()));
    assert!(out.contains("Images are identical"), "qemu-img compare: {out}");
    assert_eq!(file_digest(&img), file_digest(&src));
}
