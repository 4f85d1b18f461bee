//! Fuzzes the replication protocol's frame and message decoders: arbitrary bytes must never
//! panic, and whatever decodes must re-encode to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirror::replication::protocol::{decode_frame, encode_frame, Message};

fuzz_target!(|data: &[u8]| {
    // As a whole frame stream.
    let mut at = 0;
    while let Ok(Some((h, msg, used))) = decode_frame(&data[at..]) {
        let mut again = Vec::new();
        encode_frame(&mut again, h.id, h.flags, &msg);
        let (_, back, _) = decode_frame(&again).expect("re-encoded frame decodes").expect("whole frame");
        assert_eq!(back, msg);
        at += used;
    }
    // As a bare payload of every kind (the part after the checksum).
    if let Some((&k, payload)) = data.split_first() {
        let _ = Message::decode(k as u16 % 80, payload);
    }
});
