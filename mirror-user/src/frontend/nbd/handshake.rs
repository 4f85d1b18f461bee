//! The NBD handshake: fixed newstyle negotiation (`NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`,
//! `ABORT`, `STRUCTURED_REPLY`, and `STARTTLS` when the export has TLS; anything else refused as
//! unsupported), bounded in option size and count. Ends with the client in transmission, or gone.
//!
//! With TLS (`--nbd-tls`, "forced TLS" in the protocol's terms), [`before_tls`] runs first on the
//! raw stream: only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are served, every other option gets
//! `NBD_REP_ERR_TLS_REQD` with its data (at most [`MAX_OPTION_LEN_BEFORE_TLS`]) discarded, and
//! `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, closes the connection. After
//! the TLS handshake the option haggling starts again inside TLS ([`options`]), with nothing
//! negotiated before it remembered.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    discard, protocol,
    wire::{
        FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
        INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME,
        OPT_GO, OPT_INFO, OPT_LIST, OPT_REPLY_MAGIC, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
        REP_ERR_INVALID, REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO,
        REP_SERVER,
    },
    Shared,
};
use crate::volume::BlockDev;

/// Option data longer than this is not read into memory (checked before the buffer is made; the
/// largest option a client needs, `NBD_OPT_GO` with a 4 KiB name and its information requests,
/// fits).
const MAX_OPTION_LEN: u32 = 8 << 10;
/// Longer option data than this (or an oversized `NBD_OPT_EXPORT_NAME`) closes the connection.
const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// Options in one handshake before the server gives up on the client.
const MAX_OPTIONS: usize = 4096;
/// Option data before TLS: more closes the connection.
pub(super) const MAX_OPTION_LEN_BEFORE_TLS: u32 = 4096;

/// What the client said in its greeting.
#[derive(Debug, Clone, Copy)]
pub(super) struct Greeting {
    no_zeroes: bool,
}

/// Sends the server's greeting and reads the client's flags.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W) -> io::Result<Greeting>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {cflags:#x}")));
    }
    Ok(Greeting { no_zeroes: cflags & FLAG_C_NO_ZEROES != 0 })
}

/// Options before TLS, on the raw stream (read without a buffer, so that nothing of the TLS
/// handshake is read here): `true` once the client asked for `NBD_OPT_STARTTLS` and got its ACK,
/// `false` when it aborted.
pub(super) async fn before_tls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<bool> {
    for _ in 0..MAX_OPTIONS {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#018x}")));
        }
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN_BEFORE_TLS || opt == OPT_EXPORT_NAME {
            return Err(protocol(format!(
                "option {opt} with {len} bytes of data before TLS (TLS is required)"
            )));
        }
        discard(s, u64::from(len)).await?;
        match opt {
            OPT_STARTTLS if len == 0 => {
                opt_reply(s, opt, REP_ACK, &[]).await?;
                return Ok(true);
            }
            OPT_STARTTLS => opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data").await?,
            OPT_ABORT => {
                let _ = opt_reply(s, opt, REP_ACK, &[]).await;
                return Ok(false);
            }
            _ => {
                opt_reply(s, opt, REP_ERR_TLS_REQD, b"this server requires TLS: NBD_OPT_STARTTLS first")
                    .await?;
            }
        }
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options in one handshake")))
}

async fn opt_reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: (name, information requests).
fn parse_info(data: &[u8]) -> Result<(&[u8], Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("option data of {} bytes is too short", data.len()));
    }
    let name_len = u32::from_be_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if name_len > data.len() - 6 {
        return Err(format!("name length {name_len} exceeds the option data"));
    }
    let name = &data[4..4 + name_len];
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let reqs = &rest[2..];
    if reqs.len() != 2 * n {
        return Err(format!("{n} information requests but {} bytes for them", reqs.len()));
    }
    Ok((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Runs the fixed newstyle handshake. `Some(structured)` when the client entered transmission.
pub(super) async fn handshake<B, R, W>(shared: &Shared<B>, r: &mut R, w: &mut W) -> io::Result<Option<bool>>
where
    B: BlockDev,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let greeting = greet(r, w).await?;
    options(shared, r, w, greeting, false).await
}

/// The option haggling after the greeting (inside TLS when `in_tls`). `Some(structured)` when
/// the client entered transmission.
pub(super) async fn options<B, R, W>(
    shared: &Shared<B>,
    r: &mut R,
    w: &mut W,
    greeting: Greeting,
    in_tls: bool,
) -> io::Result<Option<bool>>
where
    B: BlockDev,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let no_zeroes = greeting.no_zeroes;
    let opts = &shared.opts;
    let mut structured = false;
    for _ in 0..MAX_OPTIONS {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#018x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME || len > MAX_OPTION_DISCARD {
                return Err(protocol(format!("option {opt} with {len} bytes of data")));
            }
            discard(r, u64::from(len)).await?;
            let msg = format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}");
            opt_reply(w, opt, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if !shared.name_ok(&data) {
                    return Err(protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&shared.size.to_be_bytes());
                b.extend_from_slice(&shared.transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(Some(structured));
            }
            OPT_ABORT => {
                // The client may already be gone.
                let _ = opt_reply(w, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let name = opts.export_name.as_bytes();
                let mut b = Vec::new();
                b.extend_from_slice(&(name.len() as u32).to_be_bytes());
                b.extend_from_slice(name);
                if let Some(d) = &opts.description {
                    b.extend_from_slice(d.as_bytes());
                }
                opt_reply(w, opt, REP_SERVER, &b).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let (name, reqs) = match parse_info(&data) {
                    Ok(v) => v,
                    Err(msg) => {
                        opt_reply(w, opt, REP_ERR_INVALID, msg.as_bytes()).await?;
                        continue;
                    }
                };
                if !shared.name_ok(name) {
                    let msg = format!(
                        "no export named {:?} (this server exports {:?})",
                        String::from_utf8_lossy(name),
                        opts.export_name
                    );
                    opt_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&shared.size.to_be_bytes());
                info.extend_from_slice(&shared.transmission_flags(structured).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info).await?;
                if reqs.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(opts.export_name.as_bytes());
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                if let (true, Some(d)) = (reqs.contains(&INFO_DESCRIPTION), &opts.description) {
                    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    b.extend_from_slice(d.as_bytes());
                    opt_reply(w, opt, REP_INFO, &b).await?;
                }
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&shared.pref_block.to_be_bytes());
                b.extend_from_slice(&opts.max_request.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &b).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(structured));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                structured = true;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS if in_tls => {
                opt_reply(w, opt, REP_ERR_INVALID, b"TLS is already established").await?;
            }
            OPT_STARTTLS => {
                opt_reply(w, opt, REP_ERR_UNSUP, b"TLS is not supported by this server").await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                opt_reply(w, opt, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options in one handshake")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing() {
        assert_eq!(parse_info(b"\0\0\0\x03vol\0\x01\0\x03").unwrap(), (&b"vol"[..], vec![3]));
        assert_eq!(parse_info(b"\0\0\0\0\0\0").unwrap(), (&b""[..], vec![]));
        assert!(parse_info(b"\0\0\0\x09vol\0\0").is_err(), "name longer than the data");
        assert!(parse_info(b"\0\0\0\0\0\x02\0\x03").is_err(), "fewer requests than announced");
        assert!(parse_info(b"\0\0").is_err());
    }
}
