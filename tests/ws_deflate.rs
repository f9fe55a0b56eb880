//! permessage-deflate (RFC 7692) and strict UTF-8, through the real binary and ws-echo: with
//! a raw client that writes its own frames, with Python's `websockets` client, and with
//! headless Chromium.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::common::{run_plughost, Config, TestServer, IO_TIMEOUT};
use crate::ws::{chromium_dom, ws_echo};

/// hello plus ws-echo on /ws/echo (and its page on /echo), with `websocket` settings.
fn echo_config(ws_settings: &str) -> Config {
    Config::hello()
        .workers(2)
        .plugin("ws-echo", &ws_echo())
        .route_methods("/echo", "ws-echo.page", &["GET"])
        .extra(&format!(
            r#"websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")]{ws_settings})"#
        ))
}

/// A client that writes its own frames.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Upgrades with `extensions` offered (none when empty); returns the client and the
    /// response head.
    fn connect(addr: SocketAddr, extensions: &str) -> (Raw, String) {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let offer = if extensions.is_empty() {
            String::new()
        } else {
            format!("Sec-WebSocket-Extensions: {extensions}\r\n")
        };
        write!(
            stream,
            "GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (Raw { stream }, head)
    }

    /// Sends one masked frame with the first byte `b0`.
    fn frame(&mut self, b0: u8, payload: &[u8]) {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
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
        self.stream.write_all(&out).unwrap();
    }

    /// Reads one server frame: its first byte and payload.
    fn read(&mut self) -> (u8, Vec<u8>) {
        let mut hdr = [0u8; 2];
        self.stream.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[1] & 0x80, 0, "server frames are not masked");
        let len = match hdr[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b).unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b).unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).unwrap();
        (hdr[0], payload)
    }

    /// Reads frames until a close; its code.
    fn close_code(&mut self) -> u16 {
        loop {
            let (b0, payload) = self.read();
            if b0 & 0x0F == 8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

/// Raw DEFLATE with a sync flush, its tail dropped: a permessage-deflate payload.
fn compress(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(z.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut z = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

fn info(server: &TestServer) -> String {
    run_plughost(["info", "-c", &server.config_path().to_string_lossy()]).stdout
}

/// An offer is answered with both sides without context takeover (the default, so that an
/// idle connection holds no compression state); a compressed message comes back
/// compressed; an uncompressed one comes back as it was sent.
#[test]
fn deflate_is_negotiated_and_messages_come_back_compressed() {
    let server = TestServer::start(&echo_config("").render());
    let (mut ws, head) = Raw::connect(
        server.addr(),
        "x-unknown-extension, permessage-deflate; client_max_window_bits",
    );
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
        "{head}"
    );
    let text = "the same words, over and over again; ".repeat(500);
    ws.frame(0xC1, &compress(text.as_bytes()));
    let (b0, payload) = ws.read();
    assert_eq!(b0, 0xC1, "a compressed text frame");
    assert!(payload.len() * 10 < text.len(), "{} bytes", payload.len());
    assert_eq!(inflate(&payload), text.as_bytes());
    // Below min_size (64 bytes), a message is sent as it is.
    ws.frame(0x81, b"short");
    assert_eq!(ws.read(), (0x81, b"short".to_vec()));
    let info = info(&server);
    assert!(
        info.contains("websocket deflate: sent 1 messages compressed (18500 bytes as"),
        "{info}"
    );
    assert!(
        info.contains("received 1 (18500 bytes inflated from"),
        "{info}"
    );
    // Without an offer, or with deflate off, there is no extension.
    let (_, head) = Raw::connect(server.addr(), "");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    let off = TestServer::start(&echo_config(", deflate: (enable: false)").render());
    let (mut ws, head) = Raw::connect(off.addr(), "permessage-deflate");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    // ... and RSV1 is then a protocol error.
    ws.frame(0xC1, &compress(b"hi"));
    assert_eq!(ws.close_code(), 1002);
}

/// A small compressed message that inflates past `max_message_size` closes with 1009, and
/// the server stays small and serving.
#[test]
fn a_decompression_bomb_closes_with_1009() {
    let server = TestServer::start(&echo_config(", max_message_size: 1048576").render());
    let (mut ws, _) = Raw::connect(server.addr(), "permessage-deflate");
    let bomb = compress(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    ws.frame(0xC2, &bomb);
    assert_eq!(ws.close_code(), 1009);
    assert!(
        server.server_rss_kb() < 64 << 10,
        "{} kB",
        server.server_rss_kb()
    );
    server.assert_serving();
}

/// Invalid UTF-8 is refused as soon as it arrives, before the rest of its frame (Autobahn
/// 6.4.3): the close (1007) comes while the client still owes most of the frame.
#[test]
fn invalid_utf8_fails_fast_inside_a_frame() {
    let server = TestServer::start(&echo_config("").render());
    let (mut ws, _) = Raw::connect(server.addr(), "");
    let mask = [0u8; 4];
    // A 1000-byte text frame: its header, then 8 bytes, the last 2 of them invalid.
    let mut start = vec![0x81, 0x80 | 126];
    start.extend_from_slice(&1000u16.to_be_bytes());
    start.extend_from_slice(&mask);
    start.extend_from_slice(b"hello\xF4\x90\x80");
    ws.stream.write_all(&start).unwrap();
    assert_eq!(ws.close_code(), 1007);
    // Compressed text that inflates to invalid UTF-8 is refused too.
    let (mut ws, _) = Raw::connect(server.addr(), "permessage-deflate");
    ws.frame(0xC1, &compress(b"ok then \xFF"));
    assert_eq!(ws.close_code(), 1007);
}

/// Python's `websockets` client (a real client, which offers permessage-deflate by default)
/// negotiates it and gets its messages back, with and without context takeover.
#[test]
fn python_websockets_client_negotiates_deflate() {
    const SCRIPT: &str = r#"
import sys
from websockets.sync.client import connect
with connect(sys.argv[1], max_size=None) as ws:
    print("extensions:", ws.response.headers.get("Sec-WebSocket-Extensions"))
    for i in range(50):
        text = f"message {i}: " + "chat text that repeats itself " * (i + 1)
        ws.send(text)
        assert ws.recv() == text, i
    ws.send(b"\x00\x01" * 40000)
    assert ws.recv() == b"\x00\x01" * 40000
    print("echoed: 51")
"#;
    let probe = Command::new("python3")
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "Python's websockets is required in CI: pip install websockets"
        );
        eprintln!("skipped: no Python websockets (pip install websockets)");
        return;
    }
    for (settings, answer) in [
        (
            "",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (", deflate: (context_takeover: true)", "permessage-deflate"),
    ] {
        let server = TestServer::start(&echo_config(settings).render());
        let url = format!("ws://{}/ws/echo", server.addr());
        let out = Command::new("python3")
            .args(["-c", SCRIPT, &url])
            .output()
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("extensions: {answer}\n")),
            "{stdout}"
        );
        assert!(stdout.contains("echoed: 51"), "{stdout}");
        assert!(info(&server).contains("websocket deflate: sent 50 messages"));
    }
}

/// Headless Chromium (which always offers permessage-deflate) loads ws-echo's page: the
/// page sees the extension agreed and its 64 KiB message come back whole, and the server
/// counts the messages it inflated and compressed.
#[test]
fn chromium_negotiates_deflate() {
    let server = TestServer::start(&echo_config("").render());
    let url = format!("http://{}/echo", server.addr());
    let Some(dom) = chromium_dom(&server, &url, |dom| dom.contains("echo ok")) else {
        return;
    };
    assert!(
        dom.contains("extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        "{dom}"
    );
    assert!(dom.contains("echo ok: 65536 characters"), "{dom}");
    // The page may have been loaded more than once (a larger time budget after a slow
    // first try): each load sent one message and got one back.
    let info = info(&server);
    let count = |after: &str| -> u64 {
        info.split(after)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(count("websocket deflate: sent ") >= 1, "{info}");
    assert!(count("), received ") >= 1, "{info}");
}
