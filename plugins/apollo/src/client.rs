//! The Apollo HTTP protocol over plain HTTP/1.1 (`http://` only), one connection per request.
//!
//! The client is a small one of its own rather than a library's: a notification long poll is
//! held up to 60 s by the server, and the read must give up within 100 ms when the process is
//! told to stop (a blocking client would keep its thread in the poll for up to a minute).

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

use crate::sign;

/// How long a notification request may take: the server holds it up to 60 s (as the Java
/// client, 90 s).
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(90);
/// The largest response taken.
const MAX_RESPONSE: usize = 16 << 20;
/// How often a read wakes to check whether it should give up.
const TICK: Duration = Duration::from_millis(100);

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Could not connect, or the connection failed or timed out.
    Unreachable(String),
    /// An unexpected status (401: the access key's signature was refused).
    Status(u16),
    /// The response is not what the protocol says.
    Malformed(String),
    /// The process was told to stop.
    Stopped,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unreachable(e) => write!(f, "unreachable: {e}"),
            Error::Status(401) => f.write_str("status 401 (is the access key secret right?)"),
            Error::Status(s) => write!(f, "unexpected status {s}"),
            Error::Malformed(e) => write!(f, "malformed response: {e}"),
            Error::Stopped => f.write_str("stopped"),
        }
    }
}

/// A namespace's release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its key.
    pub release_key: String,
    /// Its configuration.
    pub values: BTreeMap<String, String>,
}

/// What a pull answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pull {
    /// 200: the release.
    Release(Release),
    /// 304: the release key given is current.
    NotModified,
    /// 404: the namespace has no release.
    NotFound,
}

/// The connection settings.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port`, for the socket and the `Host` header.
    authority: String,
    /// The URL's path, without a trailing `/` (usually empty).
    base: String,
    app_id: String,
    cluster: String,
    ip: String,
    secret: Option<String>,
    pull_timeout: Duration,
}

impl Client {
    /// A client of the server at `url` (`http://host[:port][/path]`).
    pub fn new(
        url: &str,
        app_id: &str,
        cluster: &str,
        ip: &str,
        secret: Option<&str>,
        pull_timeout: Duration,
    ) -> Result<Client, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("server {url:?}: only http:// URLs are supported"))?;
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(format!("server {url:?} has no host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let base = base.trim_end_matches('/');
        Ok(Client {
            authority,
            base: if base.is_empty() {
                String::new()
            } else {
                format!("/{base}")
            },
            app_id: app_id.to_owned(),
            cluster: cluster.to_owned(),
            ip: ip.to_owned(),
            secret: secret.map(str::to_owned),
            pull_timeout,
        })
    }

    /// `GET /configs/{appId}/{cluster}/{namespace}?releaseKey=&ip=`.
    pub fn pull(
        &self,
        namespace: &str,
        release_key: &str,
        stop: &dyn Fn() -> bool,
    ) -> Result<Pull, Error> {
        let mut target = format!(
            "{}/configs/{}/{}/{}?",
            self.base,
            encode(&self.app_id),
            encode(&self.cluster),
            encode(namespace)
        );
        if !release_key.is_empty() {
            target += &format!("releaseKey={}&", encode(release_key));
        }
        target += &format!("ip={}", encode(&self.ip));
        let (status, body) = self.get(&target, self.pull_timeout, stop)?;
        match status {
            200 => parse_release(&body).map(Pull::Release),
            304 => Ok(Pull::NotModified),
            404 => Ok(Pull::NotFound),
            s => Err(Error::Status(s)),
        }
    }

    /// `GET /notifications/v2`: the namespaces whose notification id is newer than the one
    /// given, at once, or after the server's hold (up to 60 s) an empty list (304).
    pub fn notifications(
        &self,
        known: &[(String, i64)],
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<(String, i64)>, Error> {
        let list: Vec<_> = known
            .iter()
            .map(|(n, id)| serde_json::json!({"namespaceName": n, "notificationId": id}))
            .collect();
        let json = serde_json::Value::Array(list).to_string();
        let target = format!(
            "{}/notifications/v2?appId={}&cluster={}&notifications={}",
            self.base,
            encode(&self.app_id),
            encode(&self.cluster),
            encode(&json)
        );
        let (status, body) = self.get(&target, NOTIFY_TIMEOUT, stop)?;
        match status {
            200 => parse_notifications(&body),
            304 => Ok(Vec::new()),
            s => Err(Error::Status(s)),
        }
    }

    /// One GET with `Connection: close`; the status and the body.
    fn get(
        &self,
        target: &str,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<(u16, Vec<u8>), Error> {
        let deadline = Instant::now() + timeout;
        let unreachable =
            |e: std::io::Error| Error::Unreachable(format!("{}: {e}", self.authority));
        let mut stream = self.connect(timeout.min(self.pull_timeout))?;
        let mut head = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: plughost-apollo\r\nConnection: close\r\n",
            self.authority
        );
        if let Some(secret) = &self.secret {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            head += &sign::headers(&self.app_id, now.as_millis() as u64, target, secret);
        }
        head += "\r\n";
        stream
            .set_write_timeout(Some(self.pull_timeout))
            .map_err(unreachable)?;
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        stream.set_read_timeout(Some(TICK)).map_err(unreachable)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(done) = complete(&buf, false)? {
                return Ok(done);
            }
            if stop() {
                return Err(Error::Stopped);
            }
            if Instant::now() >= deadline {
                return Err(Error::Unreachable(format!(
                    "{}: no complete answer within {} s",
                    self.authority,
                    timeout.as_secs()
                )));
            }
            match stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => {
                    return Err(Error::Unreachable(format!(
                        "{}: the connection closed without a response",
                        self.authority
                    )))
                }
                Ok(0) => {
                    return complete(&buf, true)?.ok_or_else(|| {
                        Error::Malformed("the connection closed before the response ended".into())
                    })
                }
                Ok(n) if buf.len() + n > MAX_RESPONSE => {
                    return Err(Error::Malformed("the response is over 16 MiB".into()))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(unreachable(e)),
            }
        }
    }

    fn connect(&self, timeout: Duration) -> Result<TcpStream, Error> {
        let unreachable =
            |e: std::io::Error| Error::Unreachable(format!("{}: {e}", self.authority));
        let mut last = None;
        for addr in self.authority.to_socket_addrs().map_err(unreachable)? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(unreachable(last.unwrap_or_else(|| {
            std::io::Error::new(ErrorKind::NotFound, "no address")
        })))
    }
}

/// The status and body once `buf` holds a whole response (`eof`: nothing more will come).
fn complete(buf: &[u8], eof: bool) -> Result<Option<(u16, Vec<u8>)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => {
            return Err(Error::Malformed("the response head is incomplete".into()))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Malformed(format!("response head: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body = &buf[head_len..];
    if status == 304 || status == 204 || (100..200).contains(&status) {
        return Ok(Some((status, Vec::new())));
    }
    if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        return Ok(dechunk(body)?.map(|b| (status, b)));
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| Error::Malformed(format!("content-length {len:?}")))?;
            match body.len() {
                n if n >= len => Ok(Some((status, body[..len].to_vec()))),
                _ if eof => Err(Error::Malformed(
                    "the body is shorter than its length".into(),
                )),
                _ => Ok(None),
            }
        }
        None if eof => Ok(Some((status, body.to_vec()))),
        None => Ok(None),
    }
}

/// A chunked body, once its last chunk has arrived.
fn dechunk(mut body: &[u8]) -> Result<Option<Vec<u8>>, Error> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| Error::Malformed(format!("chunk size {size_text:?}")))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReleaseJson {
    configurations: BTreeMap<String, serde_json::Value>,
    release_key: String,
}

fn parse_release(body: &[u8]) -> Result<Release, Error> {
    let r: ReleaseJson =
        serde_json::from_slice(body).map_err(|e| Error::Malformed(format!("configs: {e}")))?;
    let values = r
        .configurations
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect();
    Ok(Release {
        release_key: r.release_key,
        values,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationJson {
    namespace_name: String,
    notification_id: i64,
}

fn parse_notifications(body: &[u8]) -> Result<Vec<(String, i64)>, Error> {
    let list: Vec<NotificationJson> = serde_json::from_slice(body)
        .map_err(|e| Error::Malformed(format!("notifications: {e}")))?;
    Ok(list
        .into_iter()
        .map(|n| (n.namespace_name, n.notification_id))
        .collect())
}

/// Percent-encodes all but the unreserved characters (RFC 3986).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_taken_whole() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(complete(r, false).unwrap(), Some((200, b"ok".to_vec())));
        assert_eq!(complete(&r[..r.len() - 1], false).unwrap(), None);
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1;x=y\r\nc\r\n0\r\n\r\n";
        assert_eq!(complete(c, false).unwrap(), Some((200, b"abc".to_vec())));
        let n = b"HTTP/1.1 304 Not Modified\r\n\r\n";
        assert_eq!(complete(n, false).unwrap(), Some((304, Vec::new())));
        let eof = b"HTTP/1.0 200 OK\r\n\r\n[]";
        assert_eq!(complete(eof, false).unwrap(), None);
        assert_eq!(complete(eof, true).unwrap(), Some((200, b"[]".to_vec())));
        assert!(complete(b"NOT HTTP\r\n\r\n", false).is_err());
    }

    #[test]
    fn releases_and_notifications_parse() {
        let r = parse_release(br#"{"appId":"a","cluster":"default","namespaceName":"application","configurations":{"A":"1","N":2},"releaseKey":"k1"}"#).unwrap();
        assert_eq!(r.release_key, "k1");
        assert_eq!(r.values["A"], "1");
        assert_eq!(r.values["N"], "2");
        assert!(matches!(parse_release(b"{"), Err(Error::Malformed(_))));
        let n = parse_notifications(br#"[{"namespaceName":"application","notificationId":7,"messages":{"details":{"a+default+application":7}}}]"#).unwrap();
        assert_eq!(n, vec![("application".to_owned(), 7)]);
    }

    #[test]
    fn urls_split_and_encode() {
        let c = Client::new(
            "http://apollo:8080/base/",
            "a b",
            "default",
            "10.0.0.1",
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(c.authority, "apollo:8080");
        assert_eq!(c.base, "/base");
        assert_eq!(
            Client::new("http://apollo", "a", "c", "i", None, Duration::ZERO)
                .unwrap()
                .authority,
            "apollo:80"
        );
        assert!(Client::new("https://apollo", "a", "c", "i", None, Duration::ZERO).is_err());
        assert_eq!(encode(r#"[{"n":-1}]"#), "%5B%7B%22n%22%3A-1%7D%5D");
    }
}
