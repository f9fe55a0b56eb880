//! Writing responses: the status line, the headers the plugin set, then `content-length`,
//! `date` and `connection` as the request and our keep-alive decision need, into the
//! connection's output buffer.

use plughost_plugin_api::{HttpVersion, Response};

use super::parse::Refusal;

/// How a response goes out: what the request asked for and what we decided.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    /// The request's version, which the status line answers with.
    pub version: HttpVersion,
    /// A HEAD request: headers only.
    pub is_head: bool,
    /// The connection closes after this response.
    pub close: bool,
    /// The request asked for keep-alive (for HTTP/1.0's `connection: keep-alive`).
    pub asked_keep_alive: bool,
}

impl Framing {
    /// A response after which the connection closes, whatever was asked.
    pub fn closing(version: HttpVersion) -> Framing {
        Framing {
            version,
            is_head: false,
            close: true,
            asked_keep_alive: false,
        }
    }
}

/// The value of a `connection` header among serialized `name: value\r\n` lines: a byte scan,
/// since this runs for every response.
pub fn connection_header(head: &[u8]) -> Option<&[u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        name.eq_ignore_ascii_case(b"connection")
            .then(|| &value[1..])
    })
}

/// The reason phrase of a status code.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// Appends `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends a response to `out`.
pub fn write_response(out: &mut Vec<u8>, resp: &Response, f: Framing, date: &[u8]) {
    let status = resp.status();
    let bodiless = no_body(status);
    let length = (!bodiless).then_some(resp.body().len() as u64);
    write_head(out, status, resp.head_bytes(), length, f, date);
    if !f.is_head && !bodiless {
        out.extend_from_slice(resp.body());
    }
}

/// Appends a response head: the status line, the serialized header lines `head`, then
/// `content-length` (when given), `date` and `connection` as `f` needs.
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    head: &[u8],
    length: Option<u64>,
    f: Framing,
    date: &[u8],
) {
    out.extend_from_slice(match f.version {
        HttpVersion::Http10 => b"HTTP/1.0 ",
        HttpVersion::Http11 => b"HTTP/1.1 ",
    });
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(head);
    if let Some(length) = length {
        out.extend_from_slice(b"content-length: ");
        push_u64(out, length);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
    if connection_header(head).is_none() {
        if f.close && f.version == HttpVersion::Http11 {
            out.extend_from_slice(b"connection: close\r\n");
        } else if !f.close && f.version == HttpVersion::Http10 && f.asked_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the head of a streamed response: no `content-length`; chunked for HTTP/1.1,
/// delimited by the connection's close for HTTP/1.0 (whatever `f.close` says).
pub fn write_stream_head(out: &mut Vec<u8>, resp: &Response, f: Framing, date: &[u8]) {
    let status = resp.status();
    let http10 = f.version == HttpVersion::Http10;
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(resp.head_bytes());
    if !http10 && !no_body(status) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
    if connection_header(resp.head_bytes()).is_none() && (f.close || http10) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk of a chunked body (nothing for an empty one, which would end it).
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Statuses that never have a body.
pub fn no_body(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// Appends the answer to refused input: a plain-text status, and the connection closes.
/// It answers in the request's version when the head was read (HTTP/1.1 before that).
pub fn write_refusal(out: &mut Vec<u8>, r: Refusal, version: HttpVersion, date: &[u8]) {
    let (status, text) = r.status();
    out.extend_from_slice(match version {
        HttpVersion::Http10 => b"HTTP/1.0 ",
        HttpVersion::Http11 => b"HTTP/1.1 ",
    });
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    if r == Refusal::UpgradeRequired {
        out.extend_from_slice(b"\r\nupgrade: websocket");
    }
    out.extend_from_slice(
        b"\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: ",
    );
    push_u64(out, text.len() as u64 + 1);
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_is_found_by_bytes() {
        assert_eq!(
            connection_header(b"x-a: 1\r\nConnection: close\r\n"),
            Some(&b" close"[..])
        );
        assert_eq!(connection_header(b"x-connection: 1\r\n"), None);
        assert_eq!(connection_header(b""), None);
    }
}
