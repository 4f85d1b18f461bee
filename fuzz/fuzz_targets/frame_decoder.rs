//! Fuzzes the replication protocol's frame and message decoders: arbitrary bytes must never
//! panic, whatever decodes must re-encode to a frame that decodes to the same message, and the
//! stream decoder the connections use (`FrameDecoder`, fed in pieces) must find exactly the
//! frames and the error that `decode_frame` finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror::replication::{
    frame::FrameDecoder,
    protocol::{decode_frame, encode_frame, Message},
};

fuzz_target!(|data: &[u8]| {
    // As a whole frame stream.
    let mut at = 0;
    let mut frames = Vec::new();
    let err = loop {
        match decode_frame(&data[at..]) {
            Ok(Some((h, msg, used))) => {
                let mut again = Vec::new();
                encode_frame(&mut again, h.id, h.flags, &msg);
                let (_, back, _) =
                    decode_frame(&again).expect("re-encoded frame decodes").expect("whole frame");
                assert_eq!(back, msg);
                frames.push((h, msg));
                at += used;
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    // The same stream through the stream decoder, in pieces of 1..=64 bytes.
    let step = data.first().map_or(1, |b| (*b as usize % 64) + 1);
    let mut d = FrameDecoder::default();
    let (mut got, mut got_err, mut pos) = (Vec::new(), None, 0);
    while pos < data.len() && got_err.is_none() {
        match d.push(&data[pos..(pos + step).min(data.len())]) {
            Ok((n, f)) => {
                pos += n;
                got.extend(f.map(|f| (f.header, f.msg)));
            }
            Err(e) => got_err = Some(e),
        }
    }
    assert_eq!(got, frames);
    assert_eq!(got_err, err);
    // As a bare payload of every kind (the part after the checksum), borrowed and owned.
    if let Some((&k, payload)) = data.split_first() {
        let borrowed = Message::decode(k as u16 % 80, payload);
        assert_eq!(Message::decode_vec(k as u16 % 80, payload.to_vec()), borrowed);
    }
});
