//! WebSocket frames (RFC 6455 §5) as a server reads and writes them: no I/O here.
//!
//! The [`Decoder`] takes the client's bytes as they come, in pieces of any size. It checks
//! each frame header as soon as its first two bytes are in, unmasks payload as it arrives and,
//! for an uncompressed text message, validates UTF-8 on every piece: invalid text is refused
//! as soon as the first bad byte is in, not when the frame or message is whole (Autobahn 6.4).
//! A message larger than the limit is refused from its frame header, before its payload.

use std::fmt;

/// Frame opcodes.
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A message's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text.
    Text,
    /// Bytes.
    Binary,
}

/// Why the client's input was refused; each maps to the close code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A frame that breaks RFC 6455 (1002).
    Protocol(&'static str),
    /// Text that is not UTF-8 (1007).
    Utf8,
    /// A message over the size limit (1009).
    TooBig,
    /// A compressed message that does not inflate (1007).
    Inflate,
}

impl Fault {
    /// The close code for this fault.
    pub fn code(self) -> u16 {
        match self {
            Fault::Protocol(_) => 1002,
            Fault::Utf8 | Fault::Inflate => 1007,
            Fault::TooBig => 1009,
        }
    }

    /// The close reason sent to the client.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::Protocol(_) => "protocol error",
            Fault::Utf8 => "invalid utf-8",
            Fault::TooBig => "message too big",
            Fault::Inflate => "invalid compressed data",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Protocol(what) => write!(f, "protocol error: {what}"),
            Fault::Utf8 => f.write_str("invalid utf-8 in a text message"),
            Fault::TooBig => f.write_str("message over the size limit"),
            Fault::Inflate => f.write_str("a compressed message that does not inflate"),
        }
    }
}

/// Something whole that the client sent. Its payload is [`Decoder::message`] (a data message)
/// or [`Decoder::control`] (a control frame) until the next call to [`Decoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A data message; `compressed` when its first frame had RSV1 (permessage-deflate).
    Message { kind: Kind, compressed: bool },
    /// A ping.
    Ping,
    /// A pong.
    Pong,
    /// A close frame.
    Close,
}

/// Where the decoder is in the input.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for a frame header.
    Head,
    /// Inside a frame's payload.
    Payload {
        opcode: u8,
        fin: bool,
        remaining: u64,
        mask: [u8; 4],
        /// Payload bytes of this frame already unmasked (for the mask's phase).
        done: usize,
    },
}

/// A data message buffer kept across messages when no larger than this; a larger one is
/// freed after its message, so an idle connection holds no large buffer.
const KEEP: usize = 4096;

/// Reads client frames into messages and control frames.
#[derive(Debug)]
pub struct Decoder {
    /// Largest message (for a compressed message: its compressed size).
    max: usize,
    /// Whether permessage-deflate was agreed (RSV1 allowed on a message's first frame).
    deflate: bool,
    state: State,
    /// The data message being assembled, and its kind and compression.
    message: Vec<u8>,
    kind: Option<Kind>,
    compressed: bool,
    /// `message[..checked]` is known to be valid UTF-8.
    checked: usize,
    /// The control frame being read.
    control: Vec<u8>,
    /// The last event's payload is to be cleared on the next call.
    delivered: bool,
}

impl Decoder {
    /// A decoder refusing messages over `max` bytes, with permessage-deflate if `deflate`.
    pub fn new(max: usize, deflate: bool) -> Decoder {
        Decoder {
            max,
            deflate,
            state: State::Head,
            message: Vec::new(),
            kind: None,
            compressed: false,
            checked: 0,
            control: Vec::new(),
            delivered: false,
        }
    }

    /// The data message of the last [`Event::Message`].
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// The payload of the last control frame.
    pub fn control(&self) -> &[u8] {
        &self.control
    }

    /// The bytes its buffers hold.
    pub fn capacity(&self) -> usize {
        self.message.capacity() + self.control.capacity()
    }

    /// Reads from `input`, advancing it past what was used, until something is whole
    /// (`Some`) or the input runs out (`None`).
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Event>, Fault> {
        if self.delivered {
            self.delivered = false;
            self.control.clear();
            if self.kind.is_none() {
                self.message.clear();
                if self.message.capacity() > KEEP {
                    self.message = Vec::new();
                }
            }
        }
        loop {
            if let State::Head = self.state {
                match self.head(input)? {
                    Some(state) => self.state = state,
                    None => return Ok(None),
                }
            }
            let State::Payload {
                opcode,
                fin,
                remaining,
                mask,
                done,
            } = self.state
            else {
                unreachable!("a header was just read");
            };
            let n = remaining.min(input.len() as u64) as usize;
            let (piece, rest) = input.split_at(n);
            *input = rest;
            let is_control = opcode >= CLOSE;
            let target = if is_control {
                &mut self.control
            } else {
                &mut self.message
            };
            let start = target.len();
            target.extend_from_slice(piece);
            unmask(&mut target[start..], mask, done);
            let remaining = remaining - n as u64;
            let last = remaining == 0;
            if !is_control && self.kind == Some(Kind::Text) && !self.compressed {
                self.check_utf8(last && fin)?;
            }
            if !last {
                self.state = State::Payload {
                    opcode,
                    fin,
                    remaining,
                    mask,
                    done: done + n,
                };
                return Ok(None);
            }
            self.state = State::Head;
            if let Some(event) = self.finish(opcode, fin) {
                self.delivered = true;
                return Ok(Some(event));
            }
        }
    }

    /// A frame is whole: what it completes, if anything.
    fn finish(&mut self, opcode: u8, fin: bool) -> Option<Event> {
        match opcode {
            PING => Some(Event::Ping),
            PONG => Some(Event::Pong),
            CLOSE => Some(Event::Close),
            _ if fin => {
                let kind = self.kind.take().expect("a data frame belongs to a message");
                self.checked = 0;
                Some(Event::Message {
                    kind,
                    compressed: self.compressed,
                })
            }
            _ => None,
        }
    }

    /// Parses and checks a frame header; `None` until it is all in.
    fn head(&mut self, input: &mut &[u8]) -> Result<Option<State>, Fault> {
        let [b0, b1, ..] = **input else {
            // Check what is there already: a bad first byte fails now.
            if let [b0] = **input {
                self.check_first(b0)?;
            }
            return Ok(None);
        };
        let opcode = self.check_first(b0)?;
        let fin = b0 & 0x80 != 0;
        if b1 & 0x80 == 0 {
            return Err(Fault::Protocol("a client frame is not masked"));
        }
        let short = u64::from(b1 & 0x7F);
        if opcode >= CLOSE && (!fin || short > 125) {
            return Err(Fault::Protocol("a fragmented or long control frame"));
        }
        let extra = match short {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let Some(header) = input.get(..2 + extra + 4) else {
            return Ok(None);
        };
        let len = match extra {
            2 => u64::from(u16::from_be_bytes([header[2], header[3]])),
            8 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
            _ => short,
        };
        if len >> 63 != 0 {
            return Err(Fault::Protocol("the payload length's top bit is set"));
        }
        let mask = header[2 + extra..].try_into().expect("4 bytes");
        if opcode < CLOSE {
            self.begin(opcode, b0 & 0x40 != 0, len)?;
        }
        *input = &input[header.len()..];
        Ok(Some(State::Payload {
            opcode,
            fin,
            remaining: len,
            mask,
            done: 0,
        }))
    }

    /// Checks a frame's first byte against the state; returns its opcode.
    fn check_first(&self, b0: u8) -> Result<u8, Fault> {
        let opcode = b0 & 0x0F;
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 {
            return Err(Fault::Protocol("reserved bits set"));
        }
        match opcode {
            CONTINUATION if self.kind.is_none() => {
                Err(Fault::Protocol("a continuation frame outside a message"))
            }
            TEXT | BINARY if self.kind.is_some() => {
                Err(Fault::Protocol("a new message inside a fragmented one"))
            }
            CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG => {
                if rsv1 && !(self.deflate && (opcode == TEXT || opcode == BINARY)) {
                    Err(Fault::Protocol("RSV1 set without permessage-deflate"))
                } else {
                    Ok(opcode)
                }
            }
            _ => Err(Fault::Protocol("a reserved opcode")),
        }
    }

    /// A data frame of `len` bytes starts: begins a message on its first frame, and checks
    /// the message's size from the header, before any payload.
    fn begin(&mut self, opcode: u8, rsv1: bool, len: u64) -> Result<(), Fault> {
        if opcode != CONTINUATION {
            self.kind = Some(if opcode == TEXT {
                Kind::Text
            } else {
                Kind::Binary
            });
            self.compressed = rsv1;
            self.checked = 0;
        }
        if self.message.len() as u64 + len > self.max as u64 {
            return Err(Fault::TooBig);
        }
        Ok(())
    }

    /// Validates the text received so far; `end` when the message is whole (an incomplete
    /// character at the end is then an error too).
    fn check_utf8(&mut self, end: bool) -> Result<(), Fault> {
        match std::str::from_utf8(&self.message[self.checked..]) {
            Ok(_) => self.checked = self.message.len(),
            // Only the end of the input is missing: more may complete it.
            Err(e) if e.error_len().is_none() && !end => self.checked += e.valid_up_to(),
            Err(_) => return Err(Fault::Utf8),
        }
        Ok(())
    }
}

/// XORs `data` with `mask`, `done` bytes into the frame's payload.
fn unmask(data: &mut [u8], mask: [u8; 4], done: usize) {
    let mut m = mask;
    m.rotate_left(done % 4);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// The code and reason of a close frame's payload: `None` for an empty one.
pub fn close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, Fault> {
    match payload {
        [] => Ok(None),
        [_] => Err(Fault::Protocol("a close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !valid_close_code(code) {
                return Err(Fault::Protocol("an invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| Fault::Utf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Whether a peer may send `code` (RFC 6455 §7.4, and the IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Appends one unmasked, final frame.
fn frame(out: &mut Vec<u8>, opcode: u8, rsv1: bool, payload: &[u8]) {
    let len = payload.len();
    out.reserve(10 + len);
    out.push(0x80 | if rsv1 { 0x40 } else { 0 } | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a data message as one frame; `compressed` sets RSV1.
pub fn message(out: &mut Vec<u8>, kind: Kind, compressed: bool, payload: &[u8]) {
    let opcode = match kind {
        Kind::Text => TEXT,
        Kind::Binary => BINARY,
    };
    frame(out, opcode, compressed, payload);
}

/// Appends a pong answering a ping's payload.
pub fn pong(out: &mut Vec<u8>, payload: &[u8]) {
    frame(out, PONG, false, payload);
}

/// Appends a close frame: the code (none for 1005, "no status") and the reason, cut to fit a
/// control frame at a character boundary.
pub fn close(out: &mut Vec<u8>, code: u16, reason: &str) {
    if code == 1005 {
        return frame(out, CLOSE, false, &[]);
    }
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    frame(out, CLOSE, false, &payload[..2 + end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `bytes` in pieces of `step`, as a connection would (keeping what is not
    /// decoded yet), collecting events and messages.
    fn feed(d: &mut Decoder, bytes: &[u8], step: usize) -> Result<Vec<(Event, Vec<u8>)>, Fault> {
        let mut events = Vec::new();
        let mut kept = Vec::new();
        for piece in bytes.chunks(step) {
            kept.extend_from_slice(piece);
            let mut input = &kept[..];
            while let Some(e) = d.decode(&mut input)? {
                let payload = match e {
                    Event::Message { .. } => d.message().to_vec(),
                    _ => d.control().to_vec(),
                };
                events.push((e, payload));
            }
            // Only part of a header is ever left over.
            assert!(input.len() < 14);
            kept = input.to_vec();
        }
        assert!(kept.is_empty());
        Ok(events)
    }

    #[test]
    fn messages_in_any_pieces() {
        let text = "héllo wörld, long enough to cross pieces ✓".repeat(5);
        let mut bytes = client(0x01, &text.as_bytes()[..7]);
        bytes.extend(client(0x89, b"ping!"));
        bytes.extend(client(0x80, &text.as_bytes()[7..]));
        bytes.extend(client(0x82, &[7; 70000]));
        for step in [1, 2, 3, 7, 64, 100_000] {
            let mut d = Decoder::new(1 << 20, false);
            let events = feed(&mut d, &bytes, step).unwrap();
            assert_eq!(events.len(), 3, "step {step}");
            assert_eq!(events[0], (Event::Ping, b"ping!".to_vec()));
            let text_event = Event::Message {
                kind: Kind::Text,
                compressed: false,
            };
            assert_eq!(events[1], (text_event, text.as_bytes().to_vec()));
            assert_eq!(events[2].1, vec![7; 70000]);
        }
    }

    #[test]
    fn invalid_utf8_fails_at_the_first_bad_byte() {
        // A valid start, then a byte that no character can continue with: refused before
        // the rest of the frame arrives.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(&[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC]);
        payload.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80]);
        payload.extend_from_slice(b"more text after");
        let bytes = client(0x81, &payload);
        let bad = bytes.len() - b"more text after".len() - 2;
        let mut d = Decoder::new(1 << 20, false);
        let mut input = &bytes[..bad];
        assert_eq!(d.decode(&mut input), Err(Fault::Utf8));
        // An incomplete character is fine until the message ends.
        let mut d = Decoder::new(1 << 20, false);
        let bytes = client(0x01, &[0xE2, 0x9C]);
        assert_eq!(feed(&mut d, &bytes, 1), Ok(vec![]));
        assert_eq!(feed(&mut d, &client(0x80, &[0x93]), 1).unwrap().len(), 1);
        let mut d = Decoder::new(1 << 20, false);
        assert_eq!(
            feed(&mut d, &client(0x81, &[0xE2, 0x9C]), 1),
            Err(Fault::Utf8)
        );
    }

    #[test]
    fn protocol_faults() {
        let cases: [(Vec<u8>, Fault); 7] = [
            (
                client(0x80, b"x"),
                Fault::Protocol("a continuation frame outside a message"),
            ),
            (
                client(0xC1, b"x"),
                Fault::Protocol("RSV1 set without permessage-deflate"),
            ),
            (client(0xA1, b"x"), Fault::Protocol("reserved bits set")),
            (client(0x83, b"x"), Fault::Protocol("a reserved opcode")),
            (
                client(0x09, b"x"),
                Fault::Protocol("a fragmented or long control frame"),
            ),
            (
                vec![0x81, 0x01, b'x'],
                Fault::Protocol("a client frame is not masked"),
            ),
            (client(0x82, &[0; 2000]), Fault::TooBig),
        ];
        for (bytes, fault) in cases {
            let mut d = Decoder::new(1000, false);
            assert_eq!(feed(&mut d, &bytes, 1), Err(fault));
        }
        let mut d = Decoder::new(1000, false);
        let mut two = client(0x01, b"a");
        two.extend(client(0x81, b"b"));
        assert_eq!(
            feed(&mut d, &two, 3),
            Err(Fault::Protocol("a new message inside a fragmented one"))
        );
    }

    #[test]
    fn compressed_messages_need_deflate_and_skip_utf8() {
        let mut d = Decoder::new(1000, true);
        let events = feed(&mut d, &client(0xC1, &[0xFF, 0x00]), 1).unwrap();
        let expected = Event::Message {
            kind: Kind::Text,
            compressed: true,
        };
        assert_eq!(events, vec![(expected, vec![0xFF, 0x00])]);
        // RSV1 on a continuation is refused.
        let mut bytes = client(0x41, b"a");
        bytes.extend(client(0xC0, b"b"));
        assert!(feed(&mut Decoder::new(1000, true), &bytes, 5).is_err());
    }

    #[test]
    fn close_payloads() {
        assert_eq!(close_payload(&[]), Ok(None));
        assert!(close_payload(&[3]).is_err());
        assert_eq!(close_payload(b"\x03\xe8bye"), Ok(Some((1000, "bye"))));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(close_payload(&bad.to_be_bytes()).is_err(), "{bad}");
        }
        assert_eq!(close_payload(b"\x03\xe8\xff"), Err(Fault::Utf8));
        let mut out = Vec::new();
        close(&mut out, 1001, &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= 125);
        assert!(close_payload(&out[2..]).is_ok());
    }

    #[test]
    fn frames_written() {
        for len in [0, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            message(&mut out, Kind::Binary, false, &vec![1; len]);
            let header = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), header + len);
            assert_eq!(out[0], 0x82);
        }
    }
}
