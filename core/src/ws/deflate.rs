//! permessage-deflate (RFC 7692): the negotiation in the handshake, and compressing and
//! inflating whole messages with raw DEFLATE (flate2 on zlib-rs).
//!
//! Memory is what decides the defaults. A DEFLATE compressor with a 32 KiB window takes about
//! 270 KiB and an inflater about 45 KiB: kept per connection ("context takeover"), 10,000 idle
//! connections would hold 3 GB. So by default the server answers with
//! `server_no_context_takeover; client_no_context_takeover` (RFC 7692 lets a server add both
//! whatever the client offered): every message is compressed on its own, and each worker
//! thread keeps one compressor (per window size) and one inflater that all its connections
//! share. An idle connection then holds no compression state at all. `context_takeover: true`
//! in the config trades that memory for better ratios on streams of similar small messages:
//! each connection then gets its own compressor and inflater on its first compressed message.

use std::{
    cell::RefCell,
    sync::atomic::{AtomicU64, Ordering},
};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::Fault;
use crate::config::DeflateConfig;

/// The four bytes a sync flush ends with, which a sender drops and a receiver adds back.
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// What the handshake agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// We compress every message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses every message on its own.
    pub client_no_context_takeover: bool,
    /// The window we compress with, when the client limited it (8 to 15).
    pub server_max_window_bits: Option<u8>,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    pub fn response(&self) -> String {
        let mut out = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if let Some(bits) = self.server_max_window_bits {
            out.push_str(&format!("; server_max_window_bits={bits}"));
        }
        out
    }

    /// The window (bits) we compress with. zlib-rs, like zlib, has no raw 256-byte window;
    /// a 512-byte one never reaches back more than 250 bytes, so it serves for 8 too.
    fn window_bits(&self) -> u8 {
        self.server_max_window_bits.unwrap_or(15).max(9)
    }
}

/// Picks the first `permessage-deflate` offer in the client's `Sec-WebSocket-Extensions`
/// values that we can accept, and applies our settings to it. `None`: no compression.
pub fn negotiate<'a>(
    offers: impl IntoIterator<Item = &'a str>,
    config: &DeflateConfig,
) -> Option<Agreed> {
    if !config.enable {
        return None;
    }
    let mut agreed = offers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(accept)?;
    if !config.context_takeover {
        agreed.server_no_context_takeover = true;
        agreed.client_no_context_takeover = true;
    }
    Some(agreed)
}

/// One offer (`permessage-deflate; param; param=value`), if we accept it as it is.
fn accept(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut agreed = Agreed {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: None,
    };
    let mut seen = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        // A parameter given twice declines the offer (RFC 7692 §7.1).
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        let bits = || value.and_then(window_bits);
        match (name, value) {
            ("server_no_context_takeover", None) => agreed.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => agreed.client_no_context_takeover = true,
            ("server_max_window_bits", Some(_)) => agreed.server_max_window_bits = Some(bits()?),
            // The client may limit its own window: any size inflates with ours.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(_)) => {
                bits()?;
            }
            _ => return None,
        }
    }
    Some(agreed)
}

/// A window size parameter: 8 to 15, digits only.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|b| (8..=15).contains(b))
}

/// Compression at work, for `info`: messages, and bytes before and after.
#[derive(Debug)]
pub struct Totals {
    /// Messages sent compressed, their bytes, and the bytes sent for them.
    pub sent: [AtomicU64; 3],
    /// Messages received compressed, the bytes received, and the bytes inflated.
    pub received: [AtomicU64; 3],
}

/// This process's compression totals.
pub static TOTALS: Totals = Totals {
    sent: [const { AtomicU64::new(0) }; 3],
    received: [const { AtomicU64::new(0) }; 3],
};

fn count(counters: &[AtomicU64; 3], plain: usize, packed: usize) {
    counters[0].fetch_add(1, Ordering::Relaxed);
    counters[1].fetch_add(plain as u64, Ordering::Relaxed);
    counters[2].fetch_add(packed as u64, Ordering::Relaxed);
}

impl Totals {
    /// `info`'s line.
    pub fn line(&self) -> String {
        let get = |c: &[AtomicU64; 3], i: usize| c[i].load(Ordering::Relaxed);
        format!(
            "websocket deflate: sent {} messages compressed ({} bytes as {}), received {} ({} bytes inflated from {})",
            get(&self.sent, 0),
            get(&self.sent, 1),
            get(&self.sent, 2),
            get(&self.received, 0),
            get(&self.received, 2),
            get(&self.received, 1),
        )
    }
}

thread_local! {
    /// This thread's shared compressors, by window bits (9 to 15), and the level they were
    /// made with.
    static COMPRESSORS: RefCell<[Option<(u32, Compress)>; 7]> = const { RefCell::new([const { None }; 7]) };
    /// This thread's shared inflater.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// A connection's compression: what was agreed, and its own state when contexts are kept.
#[derive(Debug)]
pub struct Codec {
    agreed: Agreed,
    level: u32,
    min_size: usize,
    compressor: Option<Box<Compress>>,
    inflater: Option<Box<Decompress>>,
}

impl Codec {
    /// Compression as `agreed`, at `config`'s level.
    pub fn new(agreed: Agreed, config: &DeflateConfig) -> Codec {
        Codec {
            agreed,
            level: config.level.min(9),
            min_size: config.min_size,
            compressor: None,
            inflater: None,
        }
    }

    /// Whether a message of `len` bytes is worth compressing.
    pub fn worth(&self, len: usize) -> bool {
        len >= self.min_size
    }

    /// Appends `data` compressed (without the sync flush's tail) to `out`.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        self.compress_into(data, out);
        count(&TOTALS.sent, data.len(), out.len() - start);
    }

    fn compress_into(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let bits = self.agreed.window_bits();
        if self.agreed.server_no_context_takeover {
            COMPRESSORS.with(|c| {
                let mut c = c.borrow_mut();
                let slot = &mut c[usize::from(bits - 9)];
                if slot.as_ref().is_none_or(|(level, _)| *level != self.level) {
                    *slot = Some((self.level, compressor(self.level, bits)));
                }
                let (_, z) = slot.as_mut().expect("just made");
                deflate(z, data, out);
                z.reset();
            });
        } else {
            let level = self.level;
            let z = self
                .compressor
                .get_or_insert_with(|| Box::new(compressor(level, bits)));
            deflate(z, data, out);
        }
    }

    /// Inflates a compressed message into `out` (cleared first); more than `max` bytes is
    /// [`Fault::TooBig`], however small the input: a decompression bomb stops at `max`.
    pub fn inflate(&mut self, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Fault> {
        out.clear();
        let inflated = self.inflate_into(data, max, out);
        count(&TOTALS.received, data.len(), out.len());
        inflated
    }

    fn inflate_into(&mut self, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Fault> {
        if self.agreed.client_no_context_takeover {
            INFLATER.with(|i| {
                let mut i = i.borrow_mut();
                let z = i.get_or_insert_with(|| Decompress::new(false));
                let result = inflate(z, data, max, out);
                z.reset(false);
                result
            })
        } else {
            let z = self
                .inflater
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            let result = inflate(z, data, max, out);
            if result.is_err() {
                z.reset(false);
            }
            result
        }
    }
}

/// A raw DEFLATE compressor with a window of `bits`.
fn compressor(level: u32, bits: u8) -> Compress {
    Compress::new_with_window_bits(Compression::new(level), false, bits)
}

/// Compresses `data` with a sync flush onto `out`, and drops the flush's tail.
fn deflate(z: &mut Compress, mut data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(data.len() / 2 + 64);
    loop {
        let before = z.total_in();
        // Only fails on a misuse of the stream, which this function never makes.
        let _ = z.compress_vec(data, out, FlushCompress::Sync);
        data = &data[(z.total_in() - before) as usize..];
        // Done when all input is in and the flush left room to spare.
        if data.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out[start..].ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
}

/// Inflates `data` and the sync flush's tail onto `out`, up to `max` bytes.
fn inflate(z: &mut Decompress, data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Fault> {
    for mut input in [data, &TAIL[..]] {
        loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(Fault::TooBig);
                }
                let more = (out.capacity().max(input.len() * 2).max(256)).min(max + 1 - out.len());
                out.reserve_exact(more);
            }
            let before = z.total_in();
            let status = z
                .decompress_vec(input, out, FlushDecompress::Sync)
                .map_err(|_| Fault::Inflate)?;
            input = &input[(z.total_in() - before) as usize..];
            if out.len() > max {
                return Err(Fault::TooBig);
            }
            if status == Status::StreamEnd {
                // The client ended its stream with a final block: the next message starts
                // a new one.
                z.reset(false);
                return Ok(());
            }
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(context_takeover: bool) -> DeflateConfig {
        DeflateConfig {
            context_takeover,
            ..DeflateConfig::default()
        }
    }

    #[test]
    fn offers() {
        let c = config(true);
        let a = negotiate(["permessage-deflate"], &c).unwrap();
        assert_eq!(a.response(), "permessage-deflate");
        let a = negotiate(
            [
                "x-webkit-deflate-frame",
                "permessage-deflate; client_max_window_bits",
            ],
            &c,
        )
        .unwrap();
        assert_eq!(a.response(), "permessage-deflate");
        let a = negotiate(
            ["permessage-deflate; server_max_window_bits=20, permessage-deflate; server_max_window_bits=\"10\"; server_no_context_takeover"],
            &c,
        )
        .unwrap();
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        for declined in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
            "deflate-frame",
        ] {
            assert_eq!(negotiate([declined], &c), None, "{declined}");
        }
        // Memory first by default: both sides without context takeover.
        let a = negotiate(["permessage-deflate"], &config(false)).unwrap();
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let off = DeflateConfig {
            enable: false,
            ..DeflateConfig::default()
        };
        assert_eq!(negotiate(["permessage-deflate"], &off), None);
    }

    #[test]
    fn round_trip_with_and_without_context() {
        for takeover in [false, true] {
            let c = config(takeover);
            for offer in [
                "permessage-deflate",
                "permessage-deflate; server_max_window_bits=8",
            ] {
                let agreed = negotiate([offer], &c).unwrap();
                let mut server = Codec::new(agreed, &c);
                let mut client = Codec::new(agreed, &c);
                let mut plain = Vec::new();
                for i in 0..50 {
                    let text = format!("message {i}: {}", "the same words again ".repeat(i));
                    let mut packed = Vec::new();
                    server.compress(text.as_bytes(), &mut packed);
                    client.inflate(&packed, 1 << 20, &mut plain).unwrap();
                    assert_eq!(plain, text.as_bytes());
                }
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let c = config(false);
        let agreed = negotiate(["permessage-deflate"], &c).unwrap();
        let mut codec = Codec::new(agreed, &c);
        let mut packed = Vec::new();
        codec.compress(&vec![0u8; 10 << 20], &mut packed);
        assert!(packed.len() * 100 < 10 << 20, "{}", packed.len());
        let mut out = Vec::new();
        assert_eq!(
            codec.inflate(&packed, 1 << 20, &mut out),
            Err(Fault::TooBig)
        );
        assert!(out.capacity() <= (1 << 20) + 1);
        // The shared inflater is fit for the next message.
        let mut small = Vec::new();
        codec.compress(b"fine", &mut small);
        codec.inflate(&small, 1 << 20, &mut out).unwrap();
        assert_eq!(out, b"fine");
        assert_eq!(
            codec.inflate(&[0xFF, 0xFF, 0xFF], 100, &mut out),
            Err(Fault::Inflate)
        );
    }
}
