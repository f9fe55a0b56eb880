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
    let mut out = Vec::with_capacity(data.len() + 8);
    encode_into(framing, data, &mut out).then_some(out)
}

/// [`encode`], appended to `out`; false (and `out` as it was) when the length does not fit.
pub fn encode_into(framing: &Framing, data: &[u8], out: &mut Vec<u8>) -> bool {
    let Framing::Length {
        header,
        offset,
        adjust,
    } = framing
    else {
        out.extend_from_slice(data);
        return true;
    };
    let Ok(field) = u64::try_from(data.len() as i64 - adjust) else {
        return false;
    };
    let start = out.len();
    out.resize(start + offset, 0);
    if !header.write(out, field) {
        out.truncate(start);
        return false;
    }
    out.extend_from_slice(data);
    true
}

/// One connection's input, cut into frames as it arrives. Frames are handed out as slices
/// of its buffer; what they used is dropped from the front once per read.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    /// `Eof`: the searcher for the EOF.
    eof: Option<memchr::memmem::Finder<'static>>,
    max: usize,
    buf: Vec<u8>,
    /// Where the bytes not yet cut into frames start.
    start: usize,
    /// `Eof`: bytes up to here were searched for the EOF already.
    scanned: usize,
}

impl Decoder {
    /// A decoder for `framing` that refuses frames over `max` bytes.
    pub fn new(framing: Framing, max: usize) -> Decoder {
        let eof = match &framing {
            Framing::Eof(eof) => Some(memchr::memmem::Finder::new(eof.as_bytes()).into_owned()),
            _ => None,
        };
        Decoder {
            framing,
            eof,
            max,
            buf: Vec::new(),
            start: 0,
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
        self.buf.len() - self.start
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > 4 * READ_CHUNK {
            // A large frame's memory goes back.
            self.buf = Vec::new();
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, without its framing; `Ok(None)` until one is complete.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, Overflow> {
        let pending = self.buf.len() - self.start;
        if pending == 0 {
            return Ok(None);
        }
        let (from, len, skip) = match &self.framing {
            Framing::Raw => (self.start, pending, 0),
            Framing::Eof(eof) => {
                let n = eof.len();
                let scan = self.scanned.saturating_sub(n - 1).max(self.start);
                let finder = self.eof.as_ref().expect("an Eof decoder has a finder");
                match finder.find(&self.buf[scan..]) {
                    Some(at) if scan + at - self.start > self.max => {
                        return Err(Overflow::Frame(scan + at - self.start))
                    }
                    Some(at) => (self.start, scan + at - self.start, n),
                    None if pending > self.max => return Err(Overflow::NoEof(pending)),
                    None => {
                        self.scanned = self.buf.len();
                        return Ok(None);
                    }
                }
            }
            Framing::Length {
                header,
                offset,
                adjust,
            } => {
                let head = offset + header.size();
                if pending < head {
                    return Ok(None);
                }
                let at = self.start + offset;
                let field = header.read(&self.buf[at..at + header.size()]) as i64;
                let body = field + adjust;
                if body < 0 {
                    return Err(Overflow::BadLength(body));
                }
                if body as usize > self.max {
                    return Err(Overflow::Frame(body as usize));
                }
                if pending < head + body as usize {
                    return Ok(None);
                }
                (self.start + head, body as usize, 0)
            }
        };
        self.start = from + len + skip;
        self.scanned = self.start;
        Ok(Some(&self.buf[from..from + len]))
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
            out.push(f.to_vec());
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
