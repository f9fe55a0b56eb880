//! WebSocket frames after a handshake, read the way the server reads them (our decoder, in
//! pieces, with permessage-deflate when the first byte says so) and handed on as plugin
//! messages: no input panics, text is always UTF-8, only part of a header is ever left
//! undecoded, and a message converts back to the same payload.
//!
//! Input: one byte of flags (bit 0: deflate agreed; the rest: the size of the pieces the
//! client's bytes arrive in, minus one), then the client's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plughost::config::DeflateConfig;
use plughost::ws::{
    deflate::{negotiate, Codec},
    frame::{self, close_payload, Decoder, Event, Kind},
    registry::to_ws,
};
use plughost_plugin_api::Message;

const MAX: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let deflate = flags & 1 != 0;
    let step = usize::from(flags >> 1) + 1;
    let config = DeflateConfig::default();
    let mut codec = deflate.then(|| {
        let agreed = negotiate(["permessage-deflate"], &config).expect("accepted");
        Codec::new(agreed, &config)
    });
    let mut decoder = Decoder::new(MAX, deflate);
    let mut kept = Vec::new();
    let mut plain = Vec::new();
    for piece in bytes.chunks(step) {
        kept.extend_from_slice(piece);
        let mut input = &kept[..];
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(Event::Message { kind, compressed })) => {
                    let payload = if compressed {
                        let codec = codec.as_mut().expect("RSV1 only with deflate");
                        if codec.inflate(decoder.message(), MAX, &mut plain).is_err() {
                            return;
                        }
                        assert!(plain.len() <= MAX);
                        &plain[..]
                    } else {
                        decoder.message()
                    };
                    check(kind, compressed, payload);
                }
                Ok(Some(Event::Close)) => {
                    let _ = close_payload(decoder.control());
                }
                Ok(Some(_)) => assert!(decoder.control().len() <= 125),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(input.len() < 14, "only part of a header is left over");
        kept = input.to_vec();
    }
});

/// A message as the handler gets it, and back as the server would send it.
fn check(kind: Kind, compressed: bool, payload: &[u8]) {
    let message = match kind {
        Kind::Text => match std::str::from_utf8(payload) {
            Ok(text) => Message::text(text),
            Err(_) => {
                assert!(compressed, "uncompressed text is validated as it arrives");
                return;
            }
        },
        Kind::Binary => Message::binary(payload),
    };
    let back = to_ws(&message).expect("a received message converts back");
    assert_eq!(back.kind, kind);
    assert_eq!(back.payload(), payload);
    let mut out = Vec::new();
    frame::message(&mut out, kind, false, payload);
    assert!(out.ends_with(payload));
}
