//! WebSocket frames after a handshake, read the way the server reads them (tungstenite with
//! the server's settings) and handed on as plugin messages: no input panics, and a message
//! converts back to the same frame.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use plughost::ws::registry::to_ws;
use plughost_plugin_api::Message;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// The client's bytes in, the server's replies (pongs, close) out.
struct Duplex<'a> {
    input: Cursor<&'a [u8]>,
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10))
        .read_buffer_size(4096);
    let stream = Duplex {
        input: Cursor::new(data),
        output: Vec::new(),
    };
    let mut ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
    for _ in 0..1000 {
        let Ok(message) = ws.read() else { break };
        let converted = match &message {
            tungstenite::Message::Text(t) => Message::text(t.as_str()),
            tungstenite::Message::Binary(b) => Message::binary(b),
            _ => continue,
        };
        let back = to_ws(&converted).expect("a received message converts back");
        assert_eq!(back, message);
    }
});
