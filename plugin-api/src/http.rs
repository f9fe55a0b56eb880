//! The request view a plugin reads and the response it writes, both FFI-safe.

use std::io;

use abi_stable::{
    std_types::{RSlice, RStr, RVec},
    StableAbi,
};

/// The HTTP version of a request.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0
    Http10,
    /// HTTP/1.1
    Http11,
}

/// One request header, borrowed from the host's read buffer.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Header<'a> {
    /// The name as the client sent it (compare with `eq_ignore_ascii_case`).
    pub name: RStr<'a>,
    /// The raw value bytes.
    pub value: RSlice<'a, u8>,
}

impl<'a> Header<'a> {
    /// The value as text, or `None` when it is not UTF-8.
    pub fn value_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.value.as_slice()).ok()
    }
}

/// A path parameter captured by a route such as `/hello/{name}`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Param<'a> {
    /// The name between the braces in the route.
    pub name: RStr<'a>,
    /// The matched path segment, percent-decoded (kept encoded when it would not decode to
    /// UTF-8).
    pub value: RStr<'a>,
}

/// A request as the host parsed it: a borrowed view, valid for one call.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, ...
    pub method: RStr<'a>,
    /// The path, without the query, normalized before routing: percent-encoded unreserved
    /// characters decoded and dot segments removed (`/a/../b` is `/b`); other escapes stay.
    pub path: RStr<'a>,
    /// The raw query string after `?`, empty when there is none.
    pub query: RStr<'a>,
    /// The request target exactly as the client sent it (path and query).
    pub target: RStr<'a>,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: HttpVersion,
    /// The headers in the order received.
    pub headers: RSlice<'a, Header<'a>>,
    /// Path parameters captured by the route.
    pub params: RSlice<'a, Param<'a>>,
    /// The whole body (chunked bodies arrive decoded).
    pub body: RSlice<'a, u8>,
    /// The client's address, `ip:port`.
    pub peer: RStr<'a>,
    /// The global id of the connection. A WebSocket keeps it; a keep-alive HTTP connection
    /// that another worker takes over between two requests gets a new one.
    pub conn_id: u64,
    /// The id of the worker thread serving this request.
    pub worker_id: u32,
    /// The route pattern the request matched, as written in `server.ron` (`/hello/{name}`),
    /// empty when no route matched: a bounded label for metrics, unlike the path.
    pub route: RStr<'a>,
}

impl<'a> Request<'a> {
    /// The first header with this name (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .as_slice()
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
            .and_then(|h| h.value_str())
    }

    /// The path parameter with this name.
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .as_slice()
            .iter()
            .find(|p| p.name.as_str() == name)
            .map(|p| p.value.as_str())
    }

    /// The raw (not percent-decoded) value of the first query parameter with this name.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query.as_str().split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }

    /// The body as text, or `None` when it is not UTF-8.
    pub fn body_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.body.as_slice()).ok()
    }
}

/// What a middleware's request hook decides.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the next middleware and the handler.
    Continue,
    /// Answer now with the response as the middleware left it.
    Respond,
}

/// The response a handler fills. The host owns it and reuses its buffers between requests,
/// so writing a response does not allocate once the buffers have grown.
///
/// The host writes the status line, `content-length` and `date` itself; a plugin sets the
/// status, any other headers and the body.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct Response {
    status: u16,
    /// Headers, serialized as `name: value\r\n` lines.
    head: RVec<u8>,
    body: RVec<u8>,
}

impl Default for Response {
    fn default() -> Self {
        Self::new()
    }
}

impl Response {
    /// An empty `200` response.
    pub fn new() -> Self {
        Response {
            status: 200,
            head: RVec::new(),
            body: RVec::new(),
        }
    }

    /// Back to an empty `200`, keeping the buffers' capacity.
    pub fn reset(&mut self) {
        self.status = 200;
        self.head.clear();
        self.body.clear();
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Sets the status code (100..=999; anything else becomes 500).
    pub fn set_status(&mut self, status: u16) -> &mut Self {
        self.status = if (100..=999).contains(&status) {
            status
        } else {
            500
        };
        self
    }

    /// Adds a header. Names the host manages (`content-length`, `transfer-encoding`, `date`)
    /// are ignored; CR and LF in a name or value are replaced by spaces.
    pub fn header(&mut self, name: &str, value: &str) -> &mut Self {
        if is_host_header(name) || name.is_empty() {
            return self;
        }
        push_clean(&mut self.head, name.as_bytes());
        self.head.extend_from_slice(b": ");
        push_clean(&mut self.head, value.as_bytes());
        self.head.extend_from_slice(b"\r\n");
        self
    }

    /// Replaces every header with this name by one with this value.
    pub fn set_header(&mut self, name: &str, value: &str) -> &mut Self {
        self.remove_header(name);
        self.header(name, value)
    }

    /// Removes every header with this name (case-insensitive), in place.
    pub fn remove_header(&mut self, name: &str) -> &mut Self {
        let (mut read, mut write) = (0, 0);
        let len = self.head.len();
        while read < len {
            let line = &self.head[read..];
            let end = line
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(line.len(), |i| i + 2);
            let matches = line[..end]
                .split(|&b| b == b':')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()));
            if !matches {
                self.head.copy_within(read..read + end, write);
                write += end;
            }
            read += end;
        }
        self.head.truncate(write);
        self
    }

    /// The first header with this name (case-insensitive).
    pub fn get_header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The headers set so far, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        // Only `header` writes `head`, and it writes valid UTF-8 lines.
        let text = std::str::from_utf8(self.head.as_slice()).unwrap_or("");
        text.split_terminator("\r\n")
            .filter_map(|line| line.split_once(": "))
    }

    /// The serialized header lines, for the host.
    pub fn head_bytes(&self) -> &[u8] {
        self.head.as_slice()
    }

    /// The body written so far.
    pub fn body(&self) -> &[u8] {
        self.body.as_slice()
    }

    /// Replaces the body.
    pub fn set_body(&mut self, body: impl AsRef<[u8]>) -> &mut Self {
        self.body.clear();
        self.body.extend_from_slice(body.as_ref());
        self
    }

    /// Appends to the body.
    pub fn append(&mut self, bytes: &[u8]) -> &mut Self {
        self.body.extend_from_slice(bytes);
        self
    }

    /// Sets status, a `content-type: text/plain; charset=utf-8` header and the body.
    pub fn text(&mut self, status: u16, body: &str) -> &mut Self {
        self.set_status(status)
            .set_header("content-type", "text/plain; charset=utf-8")
            .set_body(body)
    }

    /// Sets status, a `content-type` header and the body.
    pub fn send(&mut self, status: u16, content_type: &str, body: impl AsRef<[u8]>) -> &mut Self {
        self.set_status(status)
            .set_header("content-type", content_type)
            .set_body(body)
    }
}

/// `write!(resp, ...)` appends to the body.
impl io::Write for Response {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.body.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn is_host_header(name: &str) -> bool {
    ["content-length", "transfer-encoding", "date"]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

fn push_clean(out: &mut RVec<u8>, bytes: &[u8]) {
    if !bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        out.push(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_are_sanitized() {
        let mut r = Response::new();
        r.header("X-A", "1").header("x-b", "two\r\nInjected: yes");
        r.header("Content-Length", "99");
        assert_eq!(r.get_header("x-a"), Some("1"));
        assert_eq!(r.get_header("X-B"), Some("two  Injected: yes"));
        assert_eq!(r.get_header("content-length"), None);
        r.set_header("x-a", "3");
        assert_eq!(
            r.headers().collect::<Vec<_>>(),
            [("x-b", "two  Injected: yes"), ("x-a", "3")]
        );
        r.reset();
        assert_eq!(r.headers().count(), 0);
        assert_eq!(r.status(), 200);
    }

    #[test]
    fn query_param_finds_raw_values() {
        let req = Request {
            method: "GET".into(),
            path: "/".into(),
            query: "a=1&flag&b=x%20y".into(),
            target: "/?a=1&flag&b=x%20y".into(),
            version: HttpVersion::Http11,
            headers: RSlice::from_slice(&[]),
            params: RSlice::from_slice(&[]),
            body: RSlice::from_slice(&[]),
            peer: "127.0.0.1:1".into(),
            conn_id: 1,
            worker_id: 0,
            route: "".into(),
        };
        assert_eq!(req.query_param("b"), Some("x%20y"));
        assert_eq!(req.query_param("flag"), Some(""));
        assert_eq!(req.query_param("c"), None);
    }
}
