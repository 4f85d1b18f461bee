//! The replication protocol: length-prefixed typed frames with a crc32c, and the messages they
//! carry. Pure code (no I/O): [`decode_header`] and [`Message::decode`] are what the fuzz target
//! and the property tests exercise; `frame::FrameDecoder` sequences them for a stream.
//!
//! Frame layout (little-endian), [`HEADER_LEN`] bytes then `len` bytes of payload:
//! `magic u32 | kind u16 | flags u16 | id u64 | len u32 | crc32c u32` where the crc covers the
//! first 20 header bytes and the payload.
//!
//! The messages are one table (the `messages!` invocation below): each row gives the kind
//! number, the variant and its fields in wire order, and from it come the enum, the kind
//! numbers, the names, the encoder, the decoder and a `Debug` that summarises bulk data. A field
//! is encoded as its type says (integers little-endian, `String` as `len u32 | utf-8`, at most
//! 4096 bytes) unless the row names a codec after `as`: `Opaque` (fixed bytes, not printed),
//! `Hex` (a generation, printed in hex), `Rest` (the rest of the payload: the bulk data of
//! writes and reads, or the JSON text), `Extents` (`count u32 | (offset u64 | len u32)*`) and
//! `Digests` (the rest of the payload, 16 bytes each). `Rest`, `Extents` and `Digests` end a
//! message. A duplicate kind number is a compile error (`kind_name` denies unreachable
//! patterns).

use std::{fmt, marker::PhantomData};

use crate::storage::{GenInfo, JobKind, HISTORY};

/// Frame magic, "MRF1".
pub const MAGIC: u32 = 0x3146_524d;
/// Protocol version spoken by this build.
pub const VERSION: u16 = 4;
pub const HEADER_LEN: usize = 24;
/// Largest payload accepted; larger frames are refused before any allocation. A frame decoder
/// may be given a smaller cap (see `frame::FrameDecoder::new`).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Largest single read or write.
pub const MAX_IO: u32 = 8 << 20;
/// Nonce and MAC size of the handshake.
pub const NONCE_LEN: usize = 32;

/// Write flag: force unit access (durable before the reply).
pub const FLAG_FUA: u16 = 1;

/// Errors decoding frames and messages. Every one closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad frame magic {0:#x}")]
    BadMagic(u32),
    #[error("frame payload of {len} bytes exceeds the {max} byte limit")]
    Oversize { len: u32, max: u32 },
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

/// Decodes and checks a header: the magic, and the payload length against `max_payload`
/// (at most [`MAX_PAYLOAD`]). The crc is checked by [`check_crc`] once the payload is read.
pub fn decode_header(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, ProtoError> {
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
    let max = max_payload.min(MAX_PAYLOAD);
    if h.len > max {
        return Err(ProtoError::Oversize { len: h.len, max });
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

/// What a replica server tells an authenticated peer about the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub uuid: [u8; 16],
    pub size: u64,
    /// Grain of the dirty / in-sync bitmaps.
    pub block_size: u32,
    pub gen: GenInfo,
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
    /// The connection's epoch is below the replica's accepted one: a newer lease holder exists.
    /// Sent with errno `ESTALE`; the router that gets it acknowledges no further write.
    pub const FENCED: u16 = 9;
    /// A lease claim, renewal or release refused; the message is the refusal as JSON
    /// (`lease::ClaimRefused`).
    pub const LEASE: u16 = 10;
}

/// Most extents a Digests request may name (bounded work per request).
pub const MAX_EXTENTS: usize = 65536;
/// Most digests one Digests request may ask for.
pub const MAX_DIGESTS: u64 = 262_144;
const MAX_STRING: usize = 4096;

/// The payload being decoded: borrowed (fuzzing, tests), or owned, so that the bulk data of a
/// write or a read reply becomes the message's buffer without a copy.
enum Src<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

struct Reader<'a> {
    src: Src<'a>,
    pos: usize,
    what: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> &[u8] {
        match &self.src {
            Src::Borrowed(b) => &b[self.pos..],
            Src::Owned(v) => &v[self.pos..],
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8], ProtoError> {
        let start = self.pos;
        if self.remaining().len() < n {
            return Err(ProtoError::Truncated(self.what));
        }
        self.pos += n;
        Ok(match &self.src {
            Src::Borrowed(b) => &b[start..start + n],
            Src::Owned(v) => &v[start..start + n],
        })
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    /// The rest of the payload as a buffer of its own: moved out of an owned payload (the bytes
    /// before it shifted out, no allocation), copied from a borrowed one.
    fn rest(&mut self) -> Vec<u8> {
        let at = self.pos;
        let rest = match std::mem::replace(&mut self.src, Src::Borrowed(&[])) {
            Src::Borrowed(b) => b[at..].to_vec(),
            Src::Owned(mut v) => {
                v.drain(..at);
                v
            }
        };
        self.pos = 0;
        rest
    }
    fn done(self) -> Result<(), ProtoError> {
        match self.remaining().len() {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(self.what, n)),
        }
    }
}

/// How one field goes on the wire and into a log line. Implemented by the field types
/// themselves and by the codec markers a table row names after `as`.
trait Codec<T> {
    fn put(v: &T, out: &mut Vec<u8>);
    fn get(r: &mut Reader<'_>) -> Result<T, ProtoError>;
    fn show(v: &T, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

macro_rules! le_int_codec {
    ($($t:ty),*) => {$(
        impl Codec<$t> for $t {
            fn put(v: &$t, out: &mut Vec<u8>) {
                out.extend_from_slice(&v.to_le_bytes());
            }
            fn get(r: &mut Reader<'_>) -> Result<$t, ProtoError> {
                Ok(<$t>::from_le_bytes(r.array()?))
            }
            fn show(v: &$t, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(v, f)
            }
        }
    )*};
}
le_int_codec!(u8, u16, u32, u64);

impl Codec<String> for String {
    fn put(v: &String, out: &mut Vec<u8>) {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<String, ProtoError> {
        let n = <u32 as Codec<u32>>::get(r)? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::Invalid("string length"));
        }
        String::from_utf8(r.take(n)?.to_vec()).map_err(|_| ProtoError::Invalid("utf-8 string"))
    }
    fn show(v: &String, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(v, f)
    }
}

impl Codec<JobKind> for JobKind {
    fn put(v: &JobKind, out: &mut Vec<u8>) {
        out.push(match v {
            JobKind::Sync => 0,
            JobKind::Verify => 1,
            JobKind::VerifyRepair => 2,
        });
    }
    fn get(r: &mut Reader<'_>) -> Result<JobKind, ProtoError> {
        Ok(match <u8 as Codec<u8>>::get(r)? {
            0 => JobKind::Sync,
            1 => JobKind::Verify,
            2 => JobKind::VerifyRepair,
            _ => return Err(ProtoError::Invalid("job kind")),
        })
    }
    fn show(v: &JobKind, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(v, f)
    }
}

/// `current u64 | history [u64; HISTORY] | consistent u8 (0 or 1) | sync_source u64`.
impl Codec<GenInfo> for GenInfo {
    fn put(g: &GenInfo, out: &mut Vec<u8>) {
        Hex::put(&g.current, out);
        Hex::put(&g.history, out);
        out.push(u8::from(g.consistent));
        Hex::put(&g.sync_source, out);
    }
    fn get(r: &mut Reader<'_>) -> Result<GenInfo, ProtoError> {
        let current = Hex::get(r)?;
        let history = Hex::get(r)?;
        let consistent = match <u8 as Codec<u8>>::get(r)? {
            0 => false,
            1 => true,
            _ => return Err(ProtoError::Invalid("consistent flag")),
        };
        Ok(GenInfo { current, history, consistent, sync_source: Hex::get(r)? })
    }
    fn show(v: &GenInfo, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(v, f)
    }
}

/// `uuid [u8; 16] | size u64 | block_size u32 | gen`.
impl Codec<VolumeInfo> for VolumeInfo {
    fn put(v: &VolumeInfo, out: &mut Vec<u8>) {
        Opaque::put(&v.uuid, out);
        u64::put(&v.size, out);
        u32::put(&v.block_size, out);
        GenInfo::put(&v.gen, out);
    }
    fn get(r: &mut Reader<'_>) -> Result<VolumeInfo, ProtoError> {
        Ok(VolumeInfo {
            uuid: Opaque::get(r)?,
            size: u64::get(r)?,
            block_size: u32::get(r)?,
            gen: GenInfo::get(r)?,
        })
    }
    fn show(v: &VolumeInfo, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(v, f)
    }
}

/// Fixed-size bytes (nonces, MACs, uuids), left out of log lines.
struct Opaque;

impl<const N: usize> Codec<[u8; N]> for Opaque {
    fn put(v: &[u8; N], out: &mut Vec<u8>) {
        out.extend_from_slice(v);
    }
    fn get(r: &mut Reader<'_>) -> Result<[u8; N], ProtoError> {
        r.array()
    }
    fn show(_: &[u8; N], f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{N} bytes]")
    }
}

/// Generations: u64s like any other, printed in hex as the logs name them.
struct Hex;

impl Codec<u64> for Hex {
    fn put(v: &u64, out: &mut Vec<u8>) {
        u64::put(v, out);
    }
    fn get(r: &mut Reader<'_>) -> Result<u64, ProtoError> {
        u64::get(r)
    }
    fn show(v: &u64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{v:#x}")
    }
}

impl<const N: usize> Codec<[u64; N]> for Hex {
    fn put(v: &[u64; N], out: &mut Vec<u8>) {
        for g in v {
            u64::put(g, out);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<[u64; N], ProtoError> {
        let mut v = [0u64; N];
        for g in &mut v {
            *g = u64::get(r)?;
        }
        Ok(v)
    }
    fn show(v: &[u64; N], f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, g) in v.iter().enumerate() {
            write!(f, "{}{g:#x}", if i == 0 { "" } else { ", " })?;
        }
        f.write_str("]")
    }
}

/// The rest of the payload, unframed: bulk data (a log line shows its length only), or the
/// UTF-8 text of a JSON reply.
struct Rest;

impl Codec<Vec<u8>> for Rest {
    fn put(v: &Vec<u8>, out: &mut Vec<u8>) {
        out.extend_from_slice(v);
    }
    fn get(r: &mut Reader<'_>) -> Result<Vec<u8>, ProtoError> {
        Ok(r.rest())
    }
    fn show(v: &Vec<u8>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", v.len())
    }
}

impl Codec<String> for Rest {
    fn put(v: &String, out: &mut Vec<u8>) {
        out.extend_from_slice(v.as_bytes());
    }
    fn get(r: &mut Reader<'_>) -> Result<String, ProtoError> {
        String::from_utf8(r.rest()).map_err(|_| ProtoError::Invalid("utf-8 json"))
    }
    fn show(v: &String, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", v.len())
    }
}

/// `count u32 | (offset u64 | len u32) * count`, at most [`MAX_EXTENTS`], ending the payload.
struct Extents;

impl Codec<Vec<(u64, u32)>> for Extents {
    fn put(v: &Vec<(u64, u32)>, out: &mut Vec<u8>) {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        for (o, l) in v {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&l.to_le_bytes());
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Vec<(u64, u32)>, ProtoError> {
        let n = u32::get(r)? as usize;
        if n > MAX_EXTENTS {
            return Err(ProtoError::Invalid("extent count"));
        }
        if r.remaining().len() != n * 12 {
            return Err(ProtoError::Truncated(r.what));
        }
        (0..n).map(|_| Ok((u64::get(r)?, u32::get(r)?))).collect()
    }
    fn show(v: &Vec<(u64, u32)>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} extents", v.len())
    }
}

/// 16-byte digests filling the rest of the payload.
struct Digests;

impl Codec<Vec<[u8; 16]>> for Digests {
    fn put(v: &Vec<[u8; 16]>, out: &mut Vec<u8>) {
        for d in v {
            out.extend_from_slice(d);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Vec<[u8; 16]>, ProtoError> {
        let n = r.remaining().len();
        if !n.is_multiple_of(16) {
            return Err(ProtoError::Truncated(r.what));
        }
        (0..n / 16).map(|_| r.array()).collect()
    }
    fn show(v: &Vec<[u8; 16]>, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} digests", v.len())
    }
}

/// A field seen through its codec, for `Debug`.
struct Show<'a, C, T>(&'a T, PhantomData<fn() -> C>);

impl<'a, C: Codec<T>, T> Show<'a, C, T> {
    fn new(v: &'a T) -> Self {
        Show(v, PhantomData)
    }
}

impl<C: Codec<T>, T> fmt::Debug for Show<'_, C, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        C::show(self.0, f)
    }
}

/// The codec of a field: the one the row names, or the field's own type.
macro_rules! codec {
    ($t:ty) => {
        $t
    };
    ($t:ty, $c:ty) => {
        $c
    };
}

/// `Debug` of one variant: struct, tuple (one field) or unit.
macro_rules! debug_variant {
    ($f:ident, $name:ident { $($field:ident : $c:ty, $t:ty);* }) => {
        $f.debug_struct(stringify!($name)) $(.field(stringify!($field), &Show::<$c, $t>::new($field)))* .finish()
    };
    ($f:ident, $name:ident ( $field:ident : $c:ty, $t:ty )) => {
        $f.debug_tuple(stringify!($name)).field(&Show::<$c, $t>::new($field)).finish()
    };
    ($f:ident, $name:ident) => {
        $f.write_str(stringify!($name))
    };
}

/// The message table: `kind => Variant { field: Type [as Codec], .. }`, a tuple variant with
/// one named field `Variant(field: Type [as Codec])`, or a unit variant; fields in wire order.
macro_rules! messages {
    (
        $(#[$enum_meta:meta])*
        pub enum $Enum:ident {
            $(
                $(#[$meta:meta])*
                $kind:literal => $name:ident
                $({ $($field:ident : $fty:ty $(as $fc:ty)?),* $(,)? })?
                $(( $tfield:ident : $tty:ty $(as $tc:ty)? ))?
            ),* $(,)?
        }
    ) => {
        $(#[$enum_meta])*
        pub enum $Enum {
            $(
                $(#[$meta])*
                $name $({ $($field: $fty),* })? $(($tty))?,
            )*
        }

        /// Every kind number with its message's name, in table order.
        pub const KINDS: &[(u16, &str)] = &[$(($kind, stringify!($name))),*];

        /// The name of the message of frame kind `kind`, if there is one.
        #[deny(unreachable_patterns)]
        pub fn kind_name(kind: u16) -> Option<&'static str> {
            match kind {
                $($kind => Some(stringify!($name)),)*
                _ => None,
            }
        }

        impl $Enum {
            /// The frame kind of this message.
            pub fn kind(&self) -> u16 {
                match self {
                    $($Enum::$name { .. } => $kind,)*
                }
            }

            /// The message's name (as in logs and errors).
            pub fn name(&self) -> &'static str {
                match self {
                    $($Enum::$name { .. } => stringify!($name),)*
                }
            }

            fn encode_payload(&self, out: &mut Vec<u8>) {
                match self {
                    $(
                        $Enum::$name $({ $($field),* })? $(($tfield))? => {
                            $($(<codec!($fty $(, $fc)?) as Codec<$fty>>::put($field, out);)*)?
                            $(<codec!($tty $(, $tc)?) as Codec<$tty>>::put($tfield, out);)?
                        }
                    )*
                }
            }

            fn decode_fields(kind: u16, r: &mut Reader<'_>) -> Result<$Enum, ProtoError> {
                Ok(match kind {
                    $(
                        $kind => $Enum::$name
                            $({ $($field: <codec!($fty $(, $fc)?) as Codec<$fty>>::get(r)?),* })?
                            $((<codec!($tty $(, $tc)?) as Codec<$tty>>::get(r)?))?,
                    )*
                    _ => return Err(ProtoError::UnknownKind(kind)),
                })
            }
        }

        impl fmt::Debug for $Enum {
            // Bulk data is summarised: a log line must not dump megabytes.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $(
                        $Enum::$name $({ $($field),* })? $(($tfield))? => debug_variant!(
                            f, $name
                            $({ $($field: codec!($fty $(, $fc)?), $fty);* })?
                            $(($tfield: codec!($tty $(, $tc)?), $tty))?
                        ),
                    )*
                }
            }
        }
    };
}

messages! {
    /// Every message of the protocol.
    #[derive(Clone, PartialEq, Eq)]
    pub enum Message {
        // Handshake.
        1 => Hello { version: u16, volume: String, nonce: [u8; NONCE_LEN] as Opaque },
        2 => Challenge { version: u16, nonce: [u8; NONCE_LEN] as Opaque },
        3 => Auth { mac: [u8; NONCE_LEN] as Opaque },
        4 => Welcome { mac: [u8; NONCE_LEN] as Opaque, info: VolumeInfo },
        // Requests.
        16 => Read { offset: u64, len: u32 },
        17 => Write { offset: u64, data: Vec<u8> as Rest },
        18 => Flush,
        19 => Trim { offset: u64, len: u32 },
        20 => WriteZeroes { offset: u64, len: u32 },
        /// One digest per `grain` bytes of each extent, in order.
        21 => Digests { grain: u32, extents: Vec<(u64, u32)> as Extents },
        /// lz4 block-compressed write of `raw_len` bytes.
        22 => WriteLz4 { offset: u64, raw_len: u32, data: Vec<u8> as Rest },
        /// Records a range as not on the peer (and enters degraded tracking).
        23 => MarkDirty { offset: u64, len: u64 },
        24 => Heartbeat { seq: u64, health: u8 },
        25 => Status,
        /// Sent by a sync source before it writes: the receiver becomes inconsistent.
        26 => SyncBegin { source_gen: u64 as Hex },
        /// Sent by a sync source when done: the receiver takes these generations, consistent.
        27 => SyncEnd { current: u64 as Hex, history: [u64; HISTORY] as Hex },
        28 => StartJob { kind: JobKind, peer: String },
        29 => JobStatus,
        30 => CancelJob,
        /// Manual split-brain resolution: this replica's data is discarded (next sync is full).
        31 => ResolveDiscard,
        /// The dirty bitmap: bit i set = block i may be missing on the peer (one bit per
        /// `block_size`, little-endian u64 words). The router reads from the peer only clean blocks.
        32 => GetBitmap,
        /// The router's write intent (activity log): records a range durably as possibly
        /// differing on the peer, without entering tracking.
        33 => MarkIntent { offset: u64, len: u64 },
        /// Drops the write intent of a range (both replicas flushed since the last write there).
        /// Reply: `Data([1])` cleared, `Data([0])` kept because the replica is tracking (its bits
        /// then record what the peer lacks).
        34 => ClearIntent { offset: u64, len: u64 },
        /// Sent by a router right after the Welcome (version 4): this connection writes for
        /// `holder` at `epoch`. Reply: `Json(ReplicaLeaseView)`; `Error(FENCED)` when `epoch` is
        /// below the accepted one. Mutating requests on a connection are checked against it.
        35 => Attach { volume: String, holder: String, epoch: u64 },
        /// The replica's lease record. Reply: `Json(ReplicaLeaseView)`.
        36 => LeaseRead,
        /// Claims the lease at `epoch` (persisted before the reply); `coordinated` 1: the epoch
        /// comes from etcd. Reply: `Json(ReplicaLeaseView)` or `Error(LEASE)`.
        37 => LeaseClaim { holder: String, epoch: u64, ttl_ms: u64, coordinated: u8 },
        /// Restarts the lease's timer on the replica. Reply as `LeaseClaim`.
        38 => LeaseRenew { holder: String, epoch: u64, ttl_ms: u64 },
        /// Ends the lease, or reserves it for `successor` (empty: none). Reply as `LeaseClaim`.
        39 => LeaseRelease { holder: String, epoch: u64, successor: String },
        // Replies.
        64 => Ok,
        65 => Data(data: Vec<u8> as Rest),
        66 => DigestList(digests: Vec<[u8; 16]> as Digests),
        /// A refused or failed request: one of the [`code`]s, the errno of a failed I/O (0 when
        /// there is none), and a message for people.
        67 => Error { code: u16, errno: u32, message: String },
        /// The replica node's health score and, as JSON, the signals behind it.
        68 => HeartbeatAck { seq: u64, health: u8, report: String },
        69 => Json(json: String as Rest),
    }
}

impl Message {
    /// Decodes a payload of frame kind `kind`. Never panics; rejects trailing bytes.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Message, ProtoError> {
        Self::decode_src(kind, Src::Borrowed(payload))
    }

    /// As [`Message::decode`], taking the payload's buffer: the bulk data of a `Write`,
    /// `WriteLz4` or `Data` becomes the message's own buffer without a copy or an allocation.
    pub fn decode_vec(kind: u16, payload: Vec<u8>) -> Result<Message, ProtoError> {
        Self::decode_src(kind, Src::Owned(payload))
    }

    fn decode_src(kind: u16, src: Src<'_>) -> Result<Message, ProtoError> {
        let what = kind_name(kind).ok_or(ProtoError::UnknownKind(kind))?;
        let mut r = Reader { src, pos: 0, what };
        let msg = Self::decode_fields(kind, &mut r)?;
        r.done()?;
        Ok(msg)
    }
}

/// Decodes one complete frame from the start of `buf`: the message, the header and the number
/// of bytes consumed; `Ok(None)` when `buf` holds less than a whole frame. Used by the fuzz
/// target and by tests; connections read frames with `frame::FrameDecoder`, which applies the
/// same checks in the same order.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Header, Message, usize)>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let raw: &[u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("HEADER_LEN");
    let h = decode_header(raw, MAX_PAYLOAD)?;
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
            Message::Digests { grain: 65536, extents: vec![(0, 65536), (1 << 20, 131_072)] },
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
            Message::Attach { volume: "v".into(), holder: "node1/1".into(), epoch: 3 },
            Message::LeaseRead,
            Message::LeaseClaim { holder: "node1/1".into(), epoch: 4, ttl_ms: 2000, coordinated: 1 },
            Message::LeaseRenew { holder: "node1/1".into(), epoch: 4, ttl_ms: 2000 },
            Message::LeaseRelease { holder: "node1/1".into(), epoch: 4, successor: String::new() },
            Message::Ok,
            Message::Data(vec![5; 10]),
            Message::DigestList(vec![[1; 16], [2; 16]]),
            Message::Error { code: code::IO, errno: 28, message: "no space".into() },
            Message::HeartbeatAck { seq: 1, health: 100, report: "{\"score\":100}".into() },
            Message::Json("{}".into()),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let samples = samples();
        let kinds: Vec<(u16, &str)> = samples.iter().map(|m| (m.kind(), m.name())).collect();
        assert_eq!(kinds, KINDS, "the samples cover the table, in order");
        for (i, m) in samples.into_iter().enumerate() {
            let mut buf = Vec::new();
            encode_frame(&mut buf, i as u64, FLAG_FUA, &m);
            let (h, back, used) = decode_frame(&buf).unwrap().unwrap();
            assert_eq!((h.id, h.flags, used), (i as u64, FLAG_FUA, buf.len()));
            assert_eq!(back, m);
            assert_eq!(Message::decode_vec(h.kind, buf[HEADER_LEN..].to_vec()).unwrap(), m);
            assert_eq!(kind_name(h.kind), Some(m.name()));
        }
    }

    /// The payload layouts, byte for byte (a change here is a protocol change: bump VERSION).
    #[test]
    fn wire_layouts() {
        let payload = |m: &Message| {
            let mut b = Vec::new();
            m.encode_payload(&mut b);
            b
        };
        let mut w = 9u64.to_le_bytes().to_vec();
        w.extend_from_slice(&[7, 7]);
        assert_eq!(payload(&Message::Write { offset: 9, data: vec![7, 7] }), w);
        let mut e = 6u16.to_le_bytes().to_vec();
        e.extend_from_slice(&28u32.to_le_bytes());
        e.extend_from_slice(&2u32.to_le_bytes());
        e.extend_from_slice(b"no");
        assert_eq!(payload(&Message::Error { code: 6, errno: 28, message: "no".into() }), e);
        let mut d = 1u32.to_le_bytes().to_vec();
        d.extend_from_slice(&1u32.to_le_bytes());
        d.extend_from_slice(&2u64.to_le_bytes());
        d.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(payload(&Message::Digests { grain: 1, extents: vec![(2, 3)] }), d);
        assert_eq!(payload(&Message::Json("{}".into())), b"{}");
        assert!(payload(&Message::Flush).is_empty());
    }

    #[test]
    fn debug_summarises_bulk_data() {
        let w = format!("{:?}", Message::Write { offset: 4096, data: vec![0; 1 << 20] });
        assert_eq!(w, "Write { offset: 4096, data: 1048576 bytes }");
        assert_eq!(format!("{:?}", Message::Data(vec![1; 3])), "Data(3 bytes)");
        assert_eq!(format!("{:?}", Message::Flush), "Flush");
        assert_eq!(
            format!("{:?}", Message::Hello { version: 3, volume: "v".into(), nonce: [1; 32] }),
            "Hello { version: 3, volume: \"v\", nonce: [32 bytes] }"
        );
        assert_eq!(format!("{:?}", Message::SyncBegin { source_gen: 255 }), "SyncBegin { source_gen: 0xff }");
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
        assert_eq!(decode_frame(&buf), Err(ProtoError::Oversize { len: MAX_PAYLOAD + 1, max: MAX_PAYLOAD }));
        let raw: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
        buf[16..20].copy_from_slice(&4097u32.to_le_bytes());
        let raw_small: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_header(&raw_small, 4096), Err(ProtoError::Oversize { len: 4097, max: 4096 }));
        assert!(decode_header(&raw_small, 4097).is_ok());
        // A cap above MAX_PAYLOAD is MAX_PAYLOAD.
        assert!(matches!(decode_header(&raw, u32::MAX), Err(ProtoError::Oversize { max: MAX_PAYLOAD, .. })));
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
        assert_eq!(Message::decode(66, &[0; 17]), Err(ProtoError::Truncated("DigestList")));
        assert_eq!(Message::decode(69, &[0xff]), Err(ProtoError::Invalid("utf-8 json")));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(kind in 0u16..80, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let borrowed = Message::decode(kind, &payload);
            prop_assert_eq!(Message::decode_vec(kind, payload), borrowed);
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
