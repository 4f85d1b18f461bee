//! The replication protocol: length-prefixed typed frames with a crc32c, and the messages they
//! carry. Pure code (no I/O): [`decode_header`] and [`Message::decode`] are what the fuzz target
//! and the property tests exercise.
//!
//! Frame layout (little-endian), [`HEADER_LEN`] bytes then `len` bytes of payload:
//! `magic u32 | kind u16 | flags u16 | id u64 | len u32 | crc32c u32` where the crc covers the
//! first 20 header bytes and the payload.

use std::fmt;

/// Frame magic, "MRF1".
pub const MAGIC: u32 = 0x3146_524d;
/// Protocol version spoken by this build.
pub const VERSION: u16 = 3;
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted; larger frames are refused before any allocation.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Largest single read or write.
pub const MAX_IO: u32 = 8 << 20;
/// Nonce and MAC size of the handshake.
pub const NONCE_LEN: usize = 32;
/// Number of previous generations each replica remembers.
pub const HISTORY: usize = 4;

/// Write flag: force unit access (durable before the reply).
pub const FLAG_FUA: u16 = 1;

/// Errors decoding frames and messages. Every one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad frame magic {0:#x}")]
    BadMagic(u32),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD} byte limit")]
    Oversize(u32),
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("truncated {0} message")]
    Truncated(&'static str),
    #[error("{0} message has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub flags: u16,
    pub id: u64,
    pub len: u32,
    pub crc: u32,
}

/// Decodes and checks a header (magic, size limit); the crc is checked by [`check_crc`] once the
/// payload is read.
pub fn decode_header(b: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
    let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let h = Header {
        kind: u16::from_le_bytes([b[4], b[5]]),
        flags: u16::from_le_bytes([b[6], b[7]]),
        id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
        crc: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
    };
    if h.len > MAX_PAYLOAD {
        return Err(ProtoError::Oversize(h.len));
    }
    Ok(h)
}

/// Verifies the frame checksum over the header's first 20 bytes and the payload.
pub fn check_crc(raw_header: &[u8; HEADER_LEN], payload: &[u8]) -> Result<(), ProtoError> {
    let expect = u32::from_le_bytes(raw_header[20..24].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c_append(crc32c::crc32c(&raw_header[..20]), payload);
    if crc == expect {
        Ok(())
    } else {
        Err(ProtoError::BadChecksum)
    }
}

/// Encodes a whole frame (header + payload) into `out`.
pub fn encode_frame(out: &mut Vec<u8>, id: u64, flags: u16, msg: &Message) {
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&msg.kind().to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    msg.encode_payload(out);
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 16..start + 20].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 20]), &out[start + HEADER_LEN..]);
    out[start + 20..start + 24].copy_from_slice(&crc.to_le_bytes());
}

/// Data generations of a replica (see `meta`): who is newer, and whether it is mid-sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GenInfo {
    /// Current generation; 0 = never synced (no data anyone vouches for).
    #[serde(with = "crate::storage::status::hex::u64_16")]
    pub current: u64,
    /// Previous generations, newest first, 0 = empty slot.
    #[serde(with = "crate::storage::status::hex::u64_16_array")]
    pub history: [u64; HISTORY],
    /// False while a sync onto this replica is incomplete: its data is a mix.
    pub consistent: bool,
    /// While inconsistent: the source generation of the interrupted sync.
    #[serde(with = "crate::storage::status::hex::u64_16")]
    pub sync_source: u64,
}

/// What a replica server tells an authenticated peer about the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub uuid: [u8; 16],
    pub size: u64,
    /// Grain of the dirty / in-sync bitmaps.
    pub block_size: u32,
    pub gen: GenInfo,
}

/// Kinds of background jobs a replica server runs against its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobKind {
    /// Push what differs (dirty bitmap, or everything on a first sync) to the peer.
    Sync,
    /// Compare digests of the whole volume with the peer and report mismatches.
    Verify,
    /// Verify, then resync the mismatching ranges.
    VerifyRepair,
}

impl JobKind {
    fn to_u8(self) -> u8 {
        match self {
            JobKind::Sync => 0,
            JobKind::Verify => 1,
            JobKind::VerifyRepair => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            0 => JobKind::Sync,
            1 => JobKind::Verify,
            2 => JobKind::VerifyRepair,
            _ => return Err(ProtoError::Invalid("job kind")),
        })
    }
}

/// Error codes carried by [`Message::Error`].
pub mod code {
    pub const VERSION: u16 = 1;
    pub const AUTH: u16 = 2;
    pub const NO_VOLUME: u16 = 3;
    pub const PROTOCOL: u16 = 4;
    pub const RANGE: u16 = 5;
    pub const IO: u16 = 6;
    pub const REFUSED: u16 = 7;
    pub const BUSY: u16 = 8;
}

/// Every message of the protocol.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    // Handshake.
    Hello {
        version: u16,
        volume: String,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        version: u16,
        nonce: [u8; NONCE_LEN],
    },
    Auth {
        mac: [u8; NONCE_LEN],
    },
    Welcome {
        mac: [u8; NONCE_LEN],
        info: VolumeInfo,
    },
    // Requests.
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
    },
    /// One digest per `grain` bytes of each extent, in order.
    Digests {
        grain: u32,
        extents: Vec<(u64, u32)>,
    },
    /// lz4 block-compressed write of `raw_len` bytes.
    WriteLz4 {
        offset: u64,
        raw_len: u32,
        data: Vec<u8>,
    },
    /// Records a range as not on the peer (and enters degraded tracking).
    MarkDirty {
        offset: u64,
        len: u64,
    },
    Heartbeat {
        seq: u64,
        health: u8,
    },
    Status,
    /// Sent by a sync source before it writes: the receiver becomes inconsistent.
    SyncBegin {
        source_gen: u64,
    },
    /// Sent by a sync source when done: the receiver takes these generations, consistent.
    SyncEnd {
        current: u64,
        history: [u64; HISTORY],
    },
    StartJob {
        kind: JobKind,
        peer: String,
    },
    JobStatus,
    CancelJob,
    /// Manual split-brain resolution: this replica's data is discarded (next sync is full).
    ResolveDiscard,
    /// The router's write intent (activity log): records a range durably as possibly
    /// differing on the peer, without entering tracking.
    MarkIntent {
        offset: u64,
        len: u64,
    },
    /// Drops the write intent of a range (both replicas flushed since the last write there).
    /// Reply: `Data([1])` cleared, `Data([0])` kept because the replica is tracking (its bits
    /// then record what the peer lacks).
    ClearIntent {
        offset: u64,
        len: u64,
    },
    /// The dirty bitmap: bit i set = block i may be missing on the peer (one bit per
    /// `block_size`, little-endian u64 words). The router reads from the peer only clean blocks.
    GetBitmap,
    // Replies.
    Ok,
    Data(Vec<u8>),
    DigestList(Vec<[u8; 16]>),
    /// A refused or failed request: a [`code`], the errno of the failed system call behind it
    /// (0 = none), and a message for the operator.
    Error {
        code: u16,
        errno: u32,
        message: String,
    },
    /// The replica node's health score and, as JSON, the signals behind it.
    HeartbeatAck {
        seq: u64,
        health: u8,
        report: String,
    },
    Json(String),
}

impl fmt::Debug for Message {
    // Data payloads are summarized: a log line must not dump megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Write { offset, data } => write!(f, "Write {{ offset: {offset}, len: {} }}", data.len()),
            Message::WriteLz4 { offset, raw_len, data } => {
                write!(f, "WriteLz4 {{ offset: {offset}, raw_len: {raw_len}, len: {} }}", data.len())
            }
            Message::Data(d) => write!(f, "Data({} bytes)", d.len()),
            Message::DigestList(d) => write!(f, "DigestList({} digests)", d.len()),
            Message::Hello { version, volume, .. } => {
                write!(f, "Hello {{ version: {version}, volume: {volume:?} }}")
            }
            Message::Challenge { version, .. } => write!(f, "Challenge {{ version: {version} }}"),
            Message::Auth { .. } => write!(f, "Auth"),
            Message::Welcome { info, .. } => write!(f, "Welcome {{ {info:?} }}"),
            Message::Read { offset, len } => write!(f, "Read {{ offset: {offset}, len: {len} }}"),
            Message::Flush => write!(f, "Flush"),
            Message::Trim { offset, len } => write!(f, "Trim {{ offset: {offset}, len: {len} }}"),
            Message::WriteZeroes { offset, len } => {
                write!(f, "WriteZeroes {{ offset: {offset}, len: {len} }}")
            }
            Message::Digests { grain, extents } => {
                write!(f, "Digests {{ grain: {grain}, extents: {} }}", extents.len())
            }
            Message::MarkDirty { offset, len } => write!(f, "MarkDirty {{ offset: {offset}, len: {len} }}"),
            Message::Heartbeat { seq, health } => write!(f, "Heartbeat {{ seq: {seq}, health: {health} }}"),
            Message::Status => write!(f, "Status"),
            Message::SyncBegin { source_gen } => write!(f, "SyncBegin {{ source_gen: {source_gen:#x} }}"),
            Message::SyncEnd { current, .. } => write!(f, "SyncEnd {{ current: {current:#x} }}"),
            Message::StartJob { kind, peer } => write!(f, "StartJob {{ {kind:?}, peer: {peer} }}"),
            Message::JobStatus => write!(f, "JobStatus"),
            Message::CancelJob => write!(f, "CancelJob"),
            Message::ResolveDiscard => write!(f, "ResolveDiscard"),
            Message::GetBitmap => write!(f, "GetBitmap"),
            Message::MarkIntent { offset, len } => write!(f, "MarkIntent {{ offset: {offset}, len: {len} }}"),
            Message::ClearIntent { offset, len } => {
                write!(f, "ClearIntent {{ offset: {offset}, len: {len} }}")
            }
            Message::Ok => write!(f, "Ok"),
            Message::Error { code, errno, message } => {
                write!(f, "Error {{ code: {code}, errno: {errno}, message: {message:?} }}")
            }
            Message::HeartbeatAck { seq, health, report } => {
                write!(f, "HeartbeatAck {{ seq: {seq}, health: {health}, report: {} bytes }}", report.len())
            }
            Message::Json(s) => write!(f, "Json({} bytes)", s.len()),
        }
    }
}

/// Most extents a Digests request may name (bounded work per request).
pub const MAX_EXTENTS: usize = 65536;
/// Most digests one Digests request may ask for.
pub const MAX_DIGESTS: u64 = 262_144;
const MAX_STRING: usize = 4096;

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        Ok(self.take(N)?.try_into().expect("N"))
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::Invalid("string length"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ProtoError::Invalid("utf-8 string"))
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.b).to_vec()
    }
    fn done(self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing(self.what, self.b.len()))
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_gen(out: &mut Vec<u8>, g: &GenInfo) {
    out.extend_from_slice(&g.current.to_le_bytes());
    for h in g.history {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out.push(g.consistent as u8);
    out.extend_from_slice(&g.sync_source.to_le_bytes());
}

fn get_gen(r: &mut Reader<'_>) -> Result<GenInfo, ProtoError> {
    let current = r.u64()?;
    let mut history = [0u64; HISTORY];
    for h in &mut history {
        *h = r.u64()?;
    }
    let consistent = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(ProtoError::Invalid("consistent flag")),
    };
    Ok(GenInfo { current, history, consistent, sync_source: r.u64()? })
}

impl Message {
    /// The frame kind of this message.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => 1,
            Message::Challenge { .. } => 2,
            Message::Auth { .. } => 3,
            Message::Welcome { .. } => 4,
            Message::Read { .. } => 16,
            Message::Write { .. } => 17,
            Message::Flush => 18,
            Message::Trim { .. } => 19,
            Message::WriteZeroes { .. } => 20,
            Message::Digests { .. } => 21,
            Message::WriteLz4 { .. } => 22,
            Message::MarkDirty { .. } => 23,
            Message::Heartbeat { .. } => 24,
            Message::Status => 25,
            Message::SyncBegin { .. } => 26,
            Message::SyncEnd { .. } => 27,
            Message::StartJob { .. } => 28,
            Message::JobStatus => 29,
            Message::CancelJob => 30,
            Message::ResolveDiscard => 31,
            Message::GetBitmap => 32,
            Message::MarkIntent { .. } => 33,
            Message::ClearIntent { .. } => 34,
            Message::Ok => 64,
            Message::Data(_) => 65,
            Message::DigestList(_) => 66,
            Message::Error { .. } => 67,
            Message::HeartbeatAck { .. } => 68,
            Message::Json(_) => 69,
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello { version, volume, nonce } => {
                out.extend_from_slice(&version.to_le_bytes());
                put_str(out, volume);
                out.extend_from_slice(nonce);
            }
            Message::Challenge { version, nonce } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Message::Auth { mac } => out.extend_from_slice(mac),
            Message::Welcome { mac, info } => {
                out.extend_from_slice(mac);
                out.extend_from_slice(&info.uuid);
                out.extend_from_slice(&info.size.to_le_bytes());
                out.extend_from_slice(&info.block_size.to_le_bytes());
                put_gen(out, &info.gen);
            }
            Message::Read { offset, len }
            | Message::Trim { offset, len }
            | Message::WriteZeroes { offset, len } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Message::Write { offset, data } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(data);
            }
            Message::Digests { grain, extents } => {
                out.extend_from_slice(&grain.to_le_bytes());
                out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
                for (o, l) in extents {
                    out.extend_from_slice(&o.to_le_bytes());
                    out.extend_from_slice(&l.to_le_bytes());
                }
            }
            Message::WriteLz4 { offset, raw_len, data } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.extend_from_slice(data);
            }
            Message::MarkDirty { offset, len }
            | Message::MarkIntent { offset, len }
            | Message::ClearIntent { offset, len } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Message::Heartbeat { seq, health } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*health);
            }
            Message::HeartbeatAck { seq, health, report } => {
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*health);
                put_str(out, report);
            }
            Message::SyncBegin { source_gen } => out.extend_from_slice(&source_gen.to_le_bytes()),
            Message::SyncEnd { current, history } => {
                out.extend_from_slice(&current.to_le_bytes());
                for h in history {
                    out.extend_from_slice(&h.to_le_bytes());
                }
            }
            Message::StartJob { kind, peer } => {
                out.push(kind.to_u8());
                put_str(out, peer);
            }
            Message::Flush
            | Message::Status
            | Message::JobStatus
            | Message::CancelJob
            | Message::ResolveDiscard
            | Message::GetBitmap
            | Message::Ok => {}
            Message::Data(d) => out.extend_from_slice(d),
            Message::DigestList(ds) => {
                for d in ds {
                    out.extend_from_slice(d);
                }
            }
            Message::Error { code, errno, message } => {
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&errno.to_le_bytes());
                put_str(out, message);
            }
            Message::Json(s) => out.extend_from_slice(s.as_bytes()),
        }
    }

    /// Decodes a payload of frame kind `kind`. Never panics; rejects trailing bytes.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtoError> {
        let what = kind_name(kind).ok_or(ProtoError::UnknownKind(kind))?;
        let mut r = Reader { b: payload, what };
        let msg = match kind {
            1 => Message::Hello { version: r.u16()?, volume: r.string()?, nonce: r.arr()? },
            2 => Message::Challenge { version: r.u16()?, nonce: r.arr()? },
            3 => Message::Auth { mac: r.arr()? },
            4 => {
                let mac = r.arr()?;
                let uuid = r.arr()?;
                let size = r.u64()?;
                let block_size = r.u32()?;
                let gen = get_gen(&mut r)?;
                Message::Welcome { mac, info: VolumeInfo { uuid, size, block_size, gen } }
            }
            16 => Message::Read { offset: r.u64()?, len: r.u32()? },
            17 => Message::Write { offset: r.u64()?, data: r.rest() },
            18 => Message::Flush,
            19 => Message::Trim { offset: r.u64()?, len: r.u32()? },
            20 => Message::WriteZeroes { offset: r.u64()?, len: r.u32()? },
            21 => {
                let grain = r.u32()?;
                let n = r.u32()? as usize;
                if n > MAX_EXTENTS {
                    return Err(ProtoError::Invalid("extent count"));
                }
                if r.b.len() != n * 12 {
                    return Err(ProtoError::Truncated(what));
                }
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push((r.u64()?, r.u32()?));
                }
                Message::Digests { grain, extents }
            }
            22 => Message::WriteLz4 { offset: r.u64()?, raw_len: r.u32()?, data: r.rest() },
            23 => Message::MarkDirty { offset: r.u64()?, len: r.u64()? },
            24 => Message::Heartbeat { seq: r.u64()?, health: r.u8()? },
            25 => Message::Status,
            26 => Message::SyncBegin { source_gen: r.u64()? },
            27 => {
                let current = r.u64()?;
                let mut history = [0u64; HISTORY];
                for h in &mut history {
                    *h = r.u64()?;
                }
                Message::SyncEnd { current, history }
            }
            28 => Message::StartJob { kind: JobKind::from_u8(r.u8()?)?, peer: r.string()? },
            29 => Message::JobStatus,
            30 => Message::CancelJob,
            31 => Message::ResolveDiscard,
            32 => Message::GetBitmap,
            33 => Message::MarkIntent { offset: r.u64()?, len: r.u64()? },
            34 => Message::ClearIntent { offset: r.u64()?, len: r.u64()? },
            64 => Message::Ok,
            65 => Message::Data(r.rest()),
            66 => {
                if !r.b.len().is_multiple_of(16) {
                    return Err(ProtoError::Truncated(what));
                }
                let mut ds = Vec::with_capacity(r.b.len() / 16);
                while !r.b.is_empty() {
                    ds.push(r.arr()?);
                }
                Message::DigestList(ds)
            }
            67 => Message::Error { code: r.u16()?, errno: r.u32()?, message: r.string()? },
            68 => Message::HeartbeatAck { seq: r.u64()?, health: r.u8()?, report: r.string()? },
            69 => Message::Json(String::from_utf8(r.rest()).map_err(|_| ProtoError::Invalid("utf-8 json"))?),
            _ => return Err(ProtoError::UnknownKind(kind)),
        };
        r.done()?;
        Ok(msg)
    }
}

fn kind_name(kind: u16) -> Option<&'static str> {
    Some(match kind {
        1 => "Hello",
        2 => "Challenge",
        3 => "Auth",
        4 => "Welcome",
        16 => "Read",
        17 => "Write",
        18 => "Flush",
        19 => "Trim",
        20 => "WriteZeroes",
        21 => "Digests",
        22 => "WriteLz4",
        23 => "MarkDirty",
        24 => "Heartbeat",
        25 => "Status",
        26 => "SyncBegin",
        27 => "SyncEnd",
        28 => "StartJob",
        29 => "JobStatus",
        30 => "CancelJob",
        31 => "ResolveDiscard",
        32 => "GetBitmap",
        33 => "MarkIntent",
        34 => "ClearIntent",
        64 => "Ok",
        65 => "Data",
        66 => "DigestList",
        67 => "Error",
        68 => "HeartbeatAck",
        69 => "Json",
        _ => return None,
    })
}

/// Decodes one complete frame from the start of `buf`: the message, the header and the number
/// of bytes consumed; `Ok(None)` when `buf` holds less than a whole frame. Used by the fuzz
/// target and by tests; the servers read header and payload separately.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Header, Message, usize)>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let raw: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("HEADER_LEN");
    let h = decode_header(raw)?;
    let end = HEADER_LEN + h.len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    check_crc(raw, &buf[HEADER_LEN..end])?;
    let msg = Message::decode(h.kind, &buf[HEADER_LEN..end])?;
    Ok(Some((h, msg, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let gen = GenInfo { current: 7, history: [6, 5, 0, 0], consistent: true, sync_source: 0 };
        vec![
            Message::Hello { version: VERSION, volume: "vol0".into(), nonce: [1; 32] },
            Message::Challenge { version: VERSION, nonce: [2; 32] },
            Message::Auth { mac: [3; 32] },
            Message::Welcome {
                mac: [4; 32],
                info: VolumeInfo { uuid: [9; 16], size: 1 << 30, block_size: 4096, gen },
            },
            Message::Read { offset: 4096, len: 8192 },
            Message::Write { offset: 0, data: vec![0xab; 100] },
            Message::Flush,
            Message::Trim { offset: 1, len: 2 },
            Message::WriteZeroes { offset: 3, len: 4 },
            Message::Digests { grain: 65536, extents: vec![(0, 65536), (1 << 20, 131072)] },
            Message::WriteLz4 { offset: 8, raw_len: 65536, data: vec![1, 2, 3] },
            Message::MarkDirty { offset: 0, len: 1 << 40 },
            Message::Heartbeat { seq: 9, health: 87 },
            Message::Status,
            Message::SyncBegin { source_gen: 77 },
            Message::SyncEnd { current: 78, history: [77, 1, 0, 0] },
            Message::StartJob { kind: JobKind::VerifyRepair, peer: "127.0.0.1:7001".into() },
            Message::JobStatus,
            Message::CancelJob,
            Message::ResolveDiscard,
            Message::GetBitmap,
            Message::MarkIntent { offset: 4096, len: 4 << 20 },
            Message::ClearIntent { offset: 0, len: 1 << 22 },
            Message::Ok,
            Message::Data(vec![5; 10]),
            Message::DigestList(vec![[1; 16], [2; 16]]),
            Message::Error { code: code::AUTH, errno: 0, message: "no".into() },
            Message::Error {
                code: code::IO,
                errno: 28,
                message: "write at 0: No space left on device".into(),
            },
            Message::HeartbeatAck { seq: 1, health: 100, report: "{\"score\":100}".into() },
            Message::Json("{}".into()),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, m) in samples().into_iter().enumerate() {
            let mut buf = Vec::new();
            encode_frame(&mut buf, i as u64, FLAG_FUA, &m);
            let (h, back, used) = decode_frame(&buf).unwrap().unwrap();
            assert_eq!((h.id, h.flags, used), (i as u64, FLAG_FUA, buf.len()));
            assert_eq!(back, m);
        }
    }

    #[test]
    fn corruption_is_detected() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 0, &Message::Write { offset: 0, data: vec![7; 64] });
        for i in [0usize, 5, 17, 30, buf.len() - 1] {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            // Either an error, or (a flipped length) an incomplete frame: never a message.
            assert!(!matches!(decode_frame(&b), Ok(Some(_))), "flip at {i} not detected");
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 0, &Message::Flush);
        buf[16..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert_eq!(decode_frame(&buf), Err(ProtoError::Oversize(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn truncated_and_trailing_payloads_are_errors() {
        assert_eq!(Message::decode(16, &[0; 11]), Err(ProtoError::Truncated("Read")));
        assert_eq!(Message::decode(18, &[0; 1]), Err(ProtoError::Trailing("Flush", 1)));
        assert_eq!(Message::decode(999, &[]), Err(ProtoError::UnknownKind(999)));
        assert_eq!(
            Message::decode(21, &[0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::Invalid("extent count"))
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics(kind in 0u16..80, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(kind, &payload);
        }

        #[test]
        fn frame_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes);
        }

        #[test]
        fn valid_frames_with_garbage_after_decode_exactly(extra in proptest::collection::vec(any::<u8>(), 0..64), off in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let m = Message::Write { offset: off, data };
            let mut buf = Vec::new();
            encode_frame(&mut buf, 3, 0, &m);
            let n = buf.len();
            buf.extend_from_slice(&extra);
            let (_, back, used) = decode_frame(&buf).unwrap().unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(back, m);
        }
    }
}
