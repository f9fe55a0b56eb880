//! The request head: httparse for the syntax, then what its headers mean for us (body
//! framing, keep-alive, upgrade), as offsets into the read buffer so that nothing is copied.

use std::mem::MaybeUninit;

use plughost_plugin_api::HttpVersion;

use crate::config::Limits;

/// The most header lines we ever parse; `limits.max_headers` is capped to this.
pub const MAX_HEADERS_CAP: usize = 512;

/// A response status for input we refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: malformed.
    BadRequest,
    /// 408: too slow.
    Timeout,
    /// 413: the body is over `max_body_bytes`.
    TooLarge,
    /// 431: the head is over `max_header_bytes` or `max_headers`.
    HeadersTooLarge,
    /// 503: the server-wide budget for request bodies is spent.
    Busy,
    /// 426: a request other than a WebSocket upgrade on a `protocol: WebSocket` socket.
    UpgradeRequired,
}

impl Refusal {
    /// The status code and reason phrase.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest => (400, "Bad Request"),
            Refusal::Timeout => (408, "Request Timeout"),
            Refusal::TooLarge => (413, "Content Too Large"),
            Refusal::HeadersTooLarge => (431, "Request Header Fields Too Large"),
            Refusal::Busy => (503, "Service Unavailable"),
            Refusal::UpgradeRequired => (426, "Upgrade Required"),
        }
    }
}

/// Offsets of one header in the read buffer, relative to the start of the request.
#[derive(Debug, Clone, Copy)]
pub struct HeaderPos {
    /// The name's span.
    pub name: (u32, u32),
    /// The value's span.
    pub value: (u32, u32),
}

/// What the head says, as offsets into the read buffer.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head, blank line included.
    pub len: usize,
    /// The method's span.
    pub method: (u32, u32),
    /// The path's span (the target before `?`).
    pub path: (u32, u32),
    /// The query's span (after `?`, possibly empty).
    pub query: (u32, u32),
    /// The request target as sent (path and query).
    pub target: (u32, u32),
    /// HTTP/1.0 or 1.1.
    pub version: HttpVersion,
    /// How the body is framed.
    pub body: BodyKind,
    /// Whether the client asks to keep the connection.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub expect_continue: bool,
    /// A HEAD request.
    pub is_head: bool,
    /// `Upgrade: websocket` with `Connection: upgrade`.
    pub upgrade: bool,
    /// `Sec-WebSocket-Key`, when present.
    pub ws_key: Option<(u32, u32)>,
    /// `Sec-WebSocket-Version: 13`.
    pub ws_version_ok: bool,
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyKind {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// The span of `s` inside the buffer that starts at `base`.
pub fn span(base: *const u8, s: &[u8]) -> (u32, u32) {
    ((s.as_ptr() as usize - base as usize) as u32, s.len() as u32)
}

/// The bytes of a span.
pub fn slice(buf: &[u8], (start, len): (u32, u32)) -> &[u8] {
    &buf[start as usize..(start + len) as usize]
}

/// The text of a span (httparse validated it).
pub fn text(buf: &[u8], pos: (u32, u32)) -> &str {
    // httparse only hands out tokens and paths it validated as ASCII, and names as tokens.
    std::str::from_utf8(slice(buf, pos)).unwrap_or("")
}

/// Parses a head in `buf`; `Ok(None)` when it is incomplete.
pub fn parse_head(
    buf: &[u8],
    limits: &Limits,
    headers_out: &mut Vec<HeaderPos>,
) -> Result<Option<Head>, Refusal> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let storage = &mut storage[..limits.max_headers.min(MAX_HEADERS_CAP)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::BadRequest),
    };
    if len > limits.max_header_bytes {
        return Err(Refusal::HeadersTooLarge);
    }
    let base = buf.as_ptr();
    let method = req.method.ok_or(Refusal::BadRequest)?;
    let target = req.path.ok_or(Refusal::BadRequest)?;
    if !target.starts_with('/') && target != "*" {
        // Absolute-form targets are for proxies; we are an origin server.
        return Err(Refusal::BadRequest);
    }
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &target[target.len()..]),
    };
    let version = match req.version {
        Some(0) => HttpVersion::Http10,
        _ => HttpVersion::Http11,
    };
    let mut fields = Fields::new(version);
    headers_out.clear();
    for h in req.headers.iter() {
        headers_out.push(HeaderPos {
            name: span(base, h.name.as_bytes()),
            value: span(base, h.value),
        });
        fields.read(h, base)?;
    }
    Ok(Some(Head {
        len,
        method: span(base, method.as_bytes()),
        path: span(base, path.as_bytes()),
        query: span(base, query.as_bytes()),
        target: span(base, target.as_bytes()),
        version,
        body: fields.body()?,
        keep_alive: fields.keeps_alive(),
        expect_continue: fields.expect_continue,
        is_head: method == "HEAD",
        upgrade: fields.upgrade_websocket && fields.connection_upgrade && method == "GET",
        ws_key: fields.ws_key,
        ws_version_ok: fields.ws_version_ok,
    }))
}

/// Whether `c` is an unreserved character (RFC 3986 2.3), which percent-encoding must not
/// change the meaning of.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Normalizes a request path before routing (RFC 3986 6.2.2): percent-encoded unreserved
/// characters are decoded (`%2e` is `.`, `%41` is `A`), other escapes are kept (with upper
/// case hex), and dot segments are removed (5.2.4), so `/static/../hello` is `/hello`. A path
/// that climbs above `/`, or a malformed escape, is a bad request. Writes the result into
/// `out` and returns true when it differs from `path`; the common path needs no work.
pub fn normalize_path(path: &str, out: &mut String) -> Result<bool, Refusal> {
    if path == "*" || (!path.contains('%') && !path.contains("/.")) {
        return Ok(false);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        // Copy up to the next escape as it is ('%' is ASCII: this keeps UTF-8 whole).
        let run = path[i..].find('%').map_or(path.len(), |at| i + at);
        decoded.push_str(&path[i..run]);
        i = run;
        if i == bytes.len() {
            break;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Refusal::BadRequest);
        };
        let byte = hi << 4 | lo;
        if unreserved(byte) {
            decoded.push(byte as char);
        } else {
            decoded.push_str(&format!("%{byte:02X}"));
        }
        i += 3;
    }
    out.clear();
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded[1..].split('/').peekable();
    let mut trailing_slash = false;
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        match seg {
            "." => trailing_slash = last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(Refusal::BadRequest);
                }
                trailing_slash = last;
            }
            _ => segments.push(seg),
        }
    }
    out.push('/');
    out.push_str(&segments.join("/"));
    if trailing_slash && !out.ends_with('/') {
        out.push('/');
    }
    Ok(out != path)
}

/// Percent-decodes a path parameter's value into `out`; false (and `out` unusable) when it
/// has no escape to decode, a malformed one, or decodes to something that is not UTF-8.
pub fn decode_param(value: &str, out: &mut String) -> bool {
    if !value.contains('%') {
        return false;
    }
    let bytes = value.as_bytes();
    let mut raw = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    raw.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => return false,
            }
        }
        raw.push(bytes[i]);
        i += 1;
    }
    match std::str::from_utf8(&raw) {
        Ok(text) => {
            out.push_str(text);
            true
        }
        Err(_) => false,
    }
}

/// What the headers say, read one header at a time.
struct Fields {
    version: HttpVersion,
    content_length: Option<usize>,
    chunked: bool,
    has_te: bool,
    has_host: bool,
    keep_alive: bool,
    /// `Connection: close` was among the tokens: it wins over `keep-alive`.
    close: bool,
    expect_continue: bool,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    ws_key: Option<(u32, u32)>,
    ws_version_ok: bool,
}

impl Fields {
    fn new(version: HttpVersion) -> Fields {
        Fields {
            version,
            content_length: None,
            chunked: false,
            has_te: false,
            has_host: false,
            keep_alive: version == HttpVersion::Http11,
            close: false,
            expect_continue: false,
            upgrade_websocket: false,
            connection_upgrade: false,
            ws_key: None,
            ws_version_ok: false,
        }
    }

    fn read(&mut self, h: &httparse::Header<'_>, base: *const u8) -> Result<(), Refusal> {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(Refusal::BadRequest)?;
            if self.content_length.is_some_and(|old| old != v) {
                return Err(Refusal::BadRequest);
            }
            self.content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.has_te = true;
            // Only `chunked` is supported, and it must be the only (and so last) coding.
            let v = std::str::from_utf8(h.value).map_err(|_| Refusal::BadRequest)?;
            for coding in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if !coding.eq_ignore_ascii_case("chunked") || self.chunked {
                    return Err(Refusal::BadRequest);
                }
                self.chunked = true;
            }
        } else if name.eq_ignore_ascii_case("host") {
            // RFC 9112 3.2: more than one Host is a bad request.
            if self.has_host {
                return Err(Refusal::BadRequest);
            }
            self.has_host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            self.connection(h.value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            self.upgrade_websocket = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            self.ws_key = Some(span(base, h.value.trim_ascii()));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            self.ws_version_ok = h.value.trim_ascii() == b"13";
        } else if name.eq_ignore_ascii_case("expect")
            && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        {
            self.expect_continue = self.version == HttpVersion::Http11;
        }
        Ok(())
    }

    fn connection(&mut self, value: &[u8]) {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.connection_upgrade = true;
            }
        }
    }

    /// Whether the connection stays open: `close` wins over `keep-alive`, and an HTTP/1.0
    /// request with a transfer coding closes (RFC 9112 6.1).
    fn keeps_alive(&self) -> bool {
        self.keep_alive && !self.close && !(self.version == HttpVersion::Http10 && self.has_te)
    }

    /// The body's framing, once every header was read; refuses conflicting framings and an
    /// HTTP/1.1 request without `Host`.
    fn body(&self) -> Result<BodyKind, Refusal> {
        if (self.has_te && !self.chunked) || (self.chunked && self.content_length.is_some()) {
            return Err(Refusal::BadRequest);
        }
        if self.version == HttpVersion::Http11 && !self.has_host {
            return Err(Refusal::BadRequest);
        }
        Ok(if self.chunked {
            BodyKind::Chunked
        } else {
            match self.content_length {
                Some(0) | None => BodyKind::None,
                Some(n) => BodyKind::Length(n),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, Refusal> {
        parse_head(raw.as_bytes(), &Limits::default(), &mut Vec::new())
    }

    #[test]
    fn simple_get() {
        let raw = "GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!(h.len, raw.len());
        assert_eq!(text(raw.as_bytes(), h.path), "/a/b");
        assert_eq!(text(raw.as_bytes(), h.query), "x=1");
        assert!(h.keep_alive);
        assert_eq!(h.body, BodyKind::None);
    }

    #[test]
    fn partial_head() {
        assert!(parse("GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
    }

    #[test]
    fn malformed_heads_are_refused() {
        let bad = [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "BLAH\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        for raw in bad {
            assert_eq!(parse(raw).unwrap_err(), Refusal::BadRequest, "{raw:?}");
        }
    }

    #[test]
    fn same_duplicate_content_length_is_fine() {
        let h =
            parse("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body, BodyKind::Length(3));
    }

    #[test]
    fn http10_defaults_to_close() {
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn http_deviations_are_refused_or_closed() {
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            Refusal::BadRequest
        );
        let h = parse("GET / HTTP/1.1\r\nHost: h\r\nConnection: close, keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse(
            "POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.body, BodyKind::Chunked);
    }

    fn norm(path: &str) -> Result<String, Refusal> {
        let mut out = String::new();
        Ok(if normalize_path(path, &mut out)? {
            out
        } else {
            path.to_owned()
        })
    }

    #[test]
    fn paths_are_normalized_before_routing() {
        assert_eq!(norm("/hello").unwrap(), "/hello");
        assert_eq!(norm("/static/../hello").unwrap(), "/hello");
        assert_eq!(norm("/a/./b/").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/%68ello").unwrap(), "/hello");
        assert_eq!(norm("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(norm("/a%2eb").unwrap(), "/a.b");
        assert_eq!(norm("/.hidden/x").unwrap(), "/.hidden/x");
        assert_eq!(norm("*").unwrap(), "*");
        for bad in [
            "/..",
            "/a/../..",
            "/static/%2e%2e/%2e%2e/etc/passwd",
            "/%zz",
            "/%4",
        ] {
            assert_eq!(norm(bad).unwrap_err(), Refusal::BadRequest, "{bad}");
        }
    }

    #[test]
    fn params_are_decoded() {
        let mut out = String::new();
        assert!(decode_param("a%20b%2Fc", &mut out));
        assert_eq!(out, "a b/c");
        out.clear();
        assert!(!decode_param("plain", &mut out));
        assert!(!decode_param("%ff%fe", &mut out), "not UTF-8");
        assert!(!decode_param("%g1", &mut out));
    }

    #[test]
    fn too_many_headers() {
        let limits = Limits {
            max_headers: 2,
            ..Limits::default()
        };
        let raw = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(
            parse_head(raw.as_bytes(), &limits, &mut Vec::new()).unwrap_err(),
            Refusal::HeadersTooLarge
        );
    }
}
