//! Cutting a byte stream into frames (`Eof`, `Length`, `Raw`), and the header `Length`
//! framing puts in front of what a plugin sends.

use crate::config::{Framing, LengthHeader};

/// Why a connection's input cannot be framed within `max_package_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overflow {
    /// A frame announced (or found) with this many bytes.
    Frame(usize),
    /// This many bytes arrived without the EOF.
    NoEof(usize),
    /// The length field and `adjust` give a negative length.
    BadLength(i64),
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overflow::Frame(n) => write!(f, "a frame of {n} bytes is over max_package_bytes"),
            Overflow::NoEof(n) => write!(
                f,
                "no EOF within max_package_bytes ({n} bytes buffered without it)"
            ),
            Overflow::BadLength(n) => write!(f, "the length header gives {n} bytes"),
        }
    }
}

impl LengthHeader {
    /// The field's size in bytes.
    pub fn size(self) -> usize {
        match self {
            LengthHeader::U8 => 1,
            LengthHeader::U16Be | LengthHeader::U16Le => 2,
            LengthHeader::U32Be | LengthHeader::U32Le => 4,
        }
    }

    fn read(self, b: &[u8]) -> u64 {
        match self {
            LengthHeader::U8 => b[0] as u64,
            LengthHeader::U16Be => u16::from_be_bytes([b[0], b[1]]) as u64,
            LengthHeader::U16Le => u16::from_le_bytes([b[0], b[1]]) as u64,
            LengthHeader::U32Be => u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64,
            LengthHeader::U32Le => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
        }
    }

    fn write(self, out: &mut Vec<u8>, v: u64) -> bool {
        match self {
            LengthHeader::U8 => u8::try_from(v).map(|v| out.push(v)).is_ok(),
            LengthHeader::U16Be => u16::try_from(v)
                .map(|v| out.extend(v.to_be_bytes()))
                .is_ok(),
            LengthHeader::U16Le => u16::try_from(v)
                .map(|v| out.extend(v.to_le_bytes()))
                .is_ok(),
            LengthHeader::U32Be => u32::try_from(v)
                .map(|v| out.extend(v.to_be_bytes()))
                .is_ok(),
            LengthHeader::U32Le => u32::try_from(v)
                .map(|v| out.extend(v.to_le_bytes()))
                .is_ok(),
        }
    }
}

/// What a plugin sends, framed for the wire: a `Length` socket puts `offset` zero bytes and
/// the length field (the data's length less `adjust`) in front; `None` when it does not fit
/// the field. `Eof` and `Raw` sockets send the bytes as given.
pub fn encode(framing: &Framing, data: &[u8]) -> Option<Vec<u8>> {
    let Framing::Length {
        header,
        offset,
        adjust,
    } = framing
    else {
        return Some(data.to_vec());
    };
    let field = u64::try_from(data.len() as i64 - adjust).ok()?;
    let mut out = Vec::with_capacity(offset + header.size() + data.len());
    out.resize(*offset, 0);
    if !header.write(&mut out, field) {
        return None;
    }
    out.extend_from_slice(data);
    Some(out)
}

/// One connection's input, cut into frames as it arrives.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    max: usize,
    buf: Vec<u8>,
    /// `Eof`: bytes already searched for the EOF.
    scanned: usize,
}

impl Decoder {
    /// A decoder for `framing` that refuses frames over `max` bytes.
    pub fn new(framing: Framing, max: usize) -> Decoder {
        Decoder {
            framing,
            max,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// How many bytes the next read may take.
    pub fn chunk(&self) -> usize {
        match self.framing {
            Framing::Raw => self.max.min(READ_CHUNK),
            _ => READ_CHUNK,
        }
    }

    /// Bytes received and not yet cut into a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, without its framing; `Ok(None)` until one is complete.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, Overflow> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match &self.framing {
            Framing::Raw => Ok(Some(std::mem::take(&mut self.buf))),
            Framing::Eof(eof) => {
                let eof = eof.as_bytes();
                let from = self.scanned.saturating_sub(eof.len() - 1);
                let found = self.buf[from..]
                    .windows(eof.len())
                    .position(|w| w == eof)
                    .map(|i| i + from);
                match found {
                    Some(end) if end > self.max => Err(Overflow::Frame(end)),
                    Some(end) => {
                        let frame = self.buf[..end].to_vec();
                        self.buf.drain(..end + eof.len());
                        self.scanned = 0;
                        Ok(Some(frame))
                    }
                    None if self.buf.len() > self.max => Err(Overflow::NoEof(self.buf.len())),
                    None => {
                        self.scanned = self.buf.len();
                        Ok(None)
                    }
                }
            }
            Framing::Length {
                header,
                offset,
                adjust,
            } => {
                let start = offset + header.size();
                if self.buf.len() < start {
                    return Ok(None);
                }
                let field = header.read(&self.buf[*offset..start]) as i64;
                let body = field + adjust;
                if body < 0 {
                    return Err(Overflow::BadLength(body));
                }
                let total = start + body as usize;
                if body as usize > self.max {
                    return Err(Overflow::Frame(body as usize));
                }
                if self.buf.len() < total {
                    return Ok(None);
                }
                let frame = self.buf[start..total].to_vec();
                self.buf.drain(..total);
                Ok(Some(frame))
            }
        }
    }
}

/// Bytes read at a time.
const READ_CHUNK: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(d: &mut Decoder) -> Result<Vec<Vec<u8>>, Overflow> {
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn eof_frames_split_and_joined() {
        let mut d = Decoder::new(Framing::Eof("\r\n".into()), 16);
        d.extend(b"ab\r");
        assert!(frames(&mut d).unwrap().is_empty());
        d.extend(b"\ncd\r\nef\r\n");
        assert_eq!(
            frames(&mut d).unwrap(),
            [b"ab".to_vec(), b"cd".to_vec(), b"ef".to_vec()]
        );
        d.extend(&[b'x'; 17]);
        assert_eq!(frames(&mut d), Err(Overflow::NoEof(17)));
    }

    #[test]
    fn length_frames_round_trip() {
        let framing = Framing::Length {
            header: LengthHeader::U16Be,
            offset: 1,
            adjust: 0,
        };
        let mut d = Decoder::new(framing.clone(), 8);
        let wire = encode(&framing, b"hello").unwrap();
        assert_eq!(wire, b"\0\0\x05hello");
        d.extend(&wire[..4]);
        assert!(frames(&mut d).unwrap().is_empty());
        d.extend(&wire[4..]);
        d.extend(&wire);
        assert_eq!(
            frames(&mut d).unwrap(),
            [b"hello".to_vec(), b"hello".to_vec()]
        );
        d.extend(b"\0\0\x09");
        assert_eq!(frames(&mut d), Err(Overflow::Frame(9)));
        let u8_header = Framing::Length {
            header: LengthHeader::U8,
            offset: 0,
            adjust: 0,
        };
        assert_eq!(encode(&u8_header, &[0; 256]), None);
    }
}
