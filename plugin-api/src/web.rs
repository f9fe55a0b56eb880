//! Helpers for web handlers, on top of the request view and the response: decoded query and
//! form values, repeated headers, cookies (read, and `Set-Cookie` with attributes), JSON in
//! and out, and `multipart/form-data` with limits. Plain functions over the bytes the host
//! passed: no I/O.

use std::{borrow::Cow, fmt};

use serde::{de::DeserializeOwned, Serialize};

use crate::http::{Request, Response};

impl<'a> Request<'a> {
    /// Every value of the header `name` (any case), in the order received.
    pub fn headers_named(&self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .as_slice()
            .iter()
            .filter(move |h| h.name.as_str().eq_ignore_ascii_case(name))
            .filter_map(|h| h.value_str())
    }

    /// The query's `name=value` pairs, percent-decoded (`+` is a space), in order.
    pub fn query_pairs(&self) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
        form_urlencoded::parse(self.query.as_str().as_bytes()).collect()
    }

    /// The first value of query parameter `name`, percent-decoded (`query_param` gives it
    /// raw).
    pub fn query_value(&self, name: &str) -> Option<Cow<'a, str>> {
        form_urlencoded::parse(self.query.as_str().as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Every value of query parameter `name` (`?tag=a&tag=b`), percent-decoded.
    pub fn query_values(&self, name: &str) -> Vec<Cow<'a, str>> {
        form_urlencoded::parse(self.query.as_str().as_bytes())
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v)
            .collect()
    }

    /// Whether the body is of this media type (`content-type` without its parameters).
    pub fn is_content_type(&self, media_type: &str) -> bool {
        self.header("content-type").is_some_and(|t| {
            let t = t.split(';').next().unwrap_or("").trim();
            t.eq_ignore_ascii_case(media_type)
        })
    }

    /// The pairs of an `application/x-www-form-urlencoded` body, percent-decoded; empty for
    /// another content type.
    pub fn form_pairs(&self) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
        if !self.is_content_type("application/x-www-form-urlencoded") {
            return Vec::new();
        }
        form_urlencoded::parse(self.body.as_slice()).collect()
    }

    /// The first value of form field `name` (an urlencoded body).
    pub fn form_value(&self, name: &str) -> Option<Cow<'a, str>> {
        self.form_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The cookies the client sent (every `Cookie` header), as `(name, value)`.
    pub fn cookies(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.headers_named("cookie").flat_map(|h| {
            h.split(';').filter_map(|c| {
                let (name, value) = c.trim().split_once('=')?;
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                Some((name.trim(), value))
            })
        })
    }

    /// The value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.cookies().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The body, parsed as JSON into `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.body.as_slice())
    }

    /// The parts of a `multipart/form-data` body, refused past `limits`.
    pub fn multipart(&self, limits: &MultipartLimits) -> Result<Vec<Part<'a>>, MultipartError> {
        let content_type = self.header("content-type").unwrap_or("");
        let boundary = boundary_of(content_type).ok_or(MultipartError::NotMultipart)?;
        parse_multipart(self.body.as_slice(), boundary, limits)
    }
}

impl Response {
    /// Sends `value` as JSON with `status` (`application/json`); a value that does not
    /// serialize answers 500 and says why.
    pub fn json<T: Serialize + ?Sized>(&mut self, status: u16, value: &T) -> &mut Self {
        match serde_json::to_vec(value) {
            Ok(body) => self.send(status, "application/json", body),
            Err(e) => self.text(500, &format!("cannot serialize the response: {e}\n")),
        }
    }

    /// Adds a `Set-Cookie` header.
    pub fn set_cookie(&mut self, cookie: &Cookie) -> &mut Self {
        self.header("set-cookie", &cookie.to_string())
    }

    /// Answers `404 Not Found`: what the server answers for a path with no route, from a
    /// handler that finds nothing for this one.
    pub fn not_found(&mut self) -> &mut Self {
        self.text(404, "not found\n")
    }
}

/// `SameSite` of a cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only with requests from the same site.
    Strict,
    /// Also with top-level navigations from other sites (the browsers' default).
    Lax,
    /// With every request (needs `Secure`).
    None,
}

/// A cookie to set, with its attributes: `Cookie::new("sid", "abc").http_only().secure()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    name: String,
    value: String,
    path: Option<String>,
    domain: Option<String>,
    max_age: Option<i64>,
    secure: bool,
    http_only: bool,
    same_site: Option<SameSite>,
}

impl Cookie {
    /// `name=value`. Characters a cookie cannot hold (controls, whitespace, `"`, `,`, `;`,
    /// `\`, and separators in the name) are percent-encoded.
    pub fn new(name: &str, value: &str) -> Cookie {
        Cookie {
            name: escape(name, |c| {
                c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
            }),
            value: escape(value, |c| c.is_ascii_graphic() && !"\",;\\".contains(c)),
            path: None,
            domain: None,
            max_age: None,
            secure: false,
            http_only: false,
            same_site: None,
        }
    }

    /// A cookie that removes `name` from the client (empty, `Max-Age=0`).
    pub fn removal(name: &str) -> Cookie {
        Cookie::new(name, "").max_age(0)
    }

    /// `Path`.
    pub fn path(mut self, path: &str) -> Cookie {
        self.path = Some(escape(path, |c| c.is_ascii_graphic() && c != ';'));
        self
    }

    /// `Domain`.
    pub fn domain(mut self, domain: &str) -> Cookie {
        self.domain = Some(escape(domain, |c| {
            c.is_ascii_alphanumeric() || ".-".contains(c)
        }));
        self
    }

    /// `Max-Age` in seconds (0 or less: delete now).
    pub fn max_age(mut self, seconds: i64) -> Cookie {
        self.max_age = Some(seconds);
        self
    }

    /// `Secure`: only over HTTPS.
    pub fn secure(mut self) -> Cookie {
        self.secure = true;
        self
    }

    /// `HttpOnly`: not readable from JavaScript.
    pub fn http_only(mut self) -> Cookie {
        self.http_only = true;
        self
    }

    /// `SameSite`.
    pub fn same_site(mut self, s: SameSite) -> Cookie {
        self.same_site = Some(s);
        self
    }
}

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)?;
        if let Some(p) = &self.path {
            write!(f, "; Path={p}")?;
        }
        if let Some(d) = &self.domain {
            write!(f, "; Domain={d}")?;
        }
        if let Some(a) = self.max_age {
            write!(f, "; Max-Age={}", a.max(0))?;
        }
        if self.secure {
            f.write_str("; Secure")?;
        }
        if self.http_only {
            f.write_str("; HttpOnly")?;
        }
        match self.same_site {
            Some(SameSite::Strict) => f.write_str("; SameSite=Strict"),
            Some(SameSite::Lax) => f.write_str("; SameSite=Lax"),
            Some(SameSite::None) => f.write_str("; SameSite=None"),
            None => Ok(()),
        }
    }
}

/// `s` with every byte `keep` refuses percent-encoded.
fn escape(s: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c != '%' && keep(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// multipart/form-data (RFC 7578)

/// Bounds on a `multipart/form-data` body (the server bounds the body itself with
/// `limits.max_body_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipartLimits {
    /// Most parts.
    pub max_parts: usize,
    /// Largest part's data in bytes.
    pub max_part_bytes: usize,
    /// Largest part's headers in bytes.
    pub max_header_bytes: usize,
}

impl Default for MultipartLimits {
    fn default() -> Self {
        MultipartLimits {
            max_parts: 64,
            max_part_bytes: 8 << 20,
            max_header_bytes: 8 << 10,
        }
    }
}

/// One part of a `multipart/form-data` body, borrowed from the request's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// The form field's name (`Content-Disposition: form-data; name="..."`).
    pub name: String,
    /// The file's name, for a file upload.
    pub filename: Option<String>,
    /// Its `Content-Type` (`text/plain` when it has none).
    pub content_type: String,
    /// Its bytes.
    pub data: &'a [u8],
}

impl Part<'_> {
    /// The data as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(self.data).ok()
    }
}

/// Why a multipart body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartError {
    /// The content type is not `multipart/form-data` with a boundary.
    NotMultipart,
    /// The body does not follow the format (what is wrong).
    Malformed(&'static str),
    /// More parts than `max_parts`.
    TooManyParts,
    /// A part's data is over `max_part_bytes`.
    PartTooLarge,
    /// A part's headers are over `max_header_bytes`.
    HeadersTooLarge,
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MultipartError::NotMultipart => f.write_str("not multipart/form-data with a boundary"),
            MultipartError::Malformed(why) => write!(f, "malformed multipart body: {why}"),
            MultipartError::TooManyParts => f.write_str("too many parts"),
            MultipartError::PartTooLarge => f.write_str("a part is too large"),
            MultipartError::HeadersTooLarge => f.write_str("a part's headers are too large"),
        }
    }
}

impl std::error::Error for MultipartError {}

/// The boundary of a `multipart/form-data` content type.
fn boundary_of(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let media = params.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty() && v.len() <= 70).then_some(v)
    })
}

fn parse_multipart<'a>(
    body: &'a [u8],
    boundary: &str,
    limits: &MultipartLimits,
) -> Result<Vec<Part<'a>>, MultipartError> {
    let delimiter = format!("--{boundary}");
    let next = format!("\r\n--{boundary}");
    let finder = memchr::memmem::Finder::new(next.as_bytes());
    // The preamble ends with the first delimiter (at the start, or after a CRLF).
    let start = if body.starts_with(delimiter.as_bytes()) {
        0
    } else {
        finder
            .find(body)
            .ok_or(MultipartError::Malformed("no boundary"))?
            + 2
    };
    let mut at = start + delimiter.len();
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        let rest = rest
            .strip_prefix(b"\r\n")
            .ok_or(MultipartError::Malformed("no CRLF after a boundary"))?;
        if parts.len() == limits.max_parts {
            return Err(MultipartError::TooManyParts);
        }
        let end = finder
            .find(rest)
            .ok_or(MultipartError::Malformed("a part has no closing boundary"))?;
        parts.push(part(&rest[..end], limits)?);
        at = body.len() - rest.len() + end + next.len();
    }
}

/// One part: its headers, a blank line, its data.
fn part<'a>(raw: &'a [u8], limits: &MultipartLimits) -> Result<Part<'a>, MultipartError> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let (len, headers) = match httparse::parse_headers(raw, &mut headers) {
        Ok(httparse::Status::Complete((len, h))) => (len, h),
        Ok(httparse::Status::Partial) if raw.len() > limits.max_header_bytes => {
            return Err(MultipartError::HeadersTooLarge)
        }
        _ => return Err(MultipartError::Malformed("a part's headers")),
    };
    if len > limits.max_header_bytes {
        return Err(MultipartError::HeadersTooLarge);
    }
    let data = &raw[len..];
    if data.len() > limits.max_part_bytes {
        return Err(MultipartError::PartTooLarge);
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let disposition = header("content-disposition").ok_or(MultipartError::Malformed(
        "a part has no Content-Disposition",
    ))?;
    let param = |key: &str| {
        disposition.split(';').skip(1).find_map(|p| {
            let (k, v) = p.trim().split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            k.trim().eq_ignore_ascii_case(key).then(|| v.to_owned())
        })
    };
    Ok(Part {
        name: param("name").ok_or(MultipartError::Malformed("a part has no name"))?,
        filename: param("filename"),
        content_type: header("content-type").unwrap_or("text/plain").to_owned(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use abi_stable::std_types::{RSlice, RStr};

    use super::*;
    use crate::http::{Header, HttpVersion};

    /// Runs `f` with a request of these headers, query and body.
    fn with<R>(
        headers: &[(&str, &str)],
        query: &str,
        body: &[u8],
        f: impl FnOnce(&Request<'_>) -> R,
    ) -> R {
        let headers: Vec<Header<'_>> = headers
            .iter()
            .map(|(n, v)| Header {
                name: RStr::from_str(n),
                value: RSlice::from_slice(v.as_bytes()),
            })
            .collect();
        f(&Request {
            method: RStr::from_str("POST"),
            path: RStr::from_str("/"),
            query: RStr::from_str(query),
            target: RStr::from_str("/"),
            version: HttpVersion::Http11,
            headers: RSlice::from_slice(&headers),
            params: RSlice::from_slice(&[]),
            body: RSlice::from_slice(body),
            peer: RStr::from_str("127.0.0.1:1"),
            conn_id: 1,
            worker_id: 0,
            route: RStr::from_str(""),
        })
    }

    #[test]
    fn query_values_are_decoded_and_repeated_keys_kept() {
        with(
            &[],
            "q=caf%C3%A9+au+lait&tag=a&tag=b%26c&raw=%ZZ",
            b"",
            |r| {
                assert_eq!(r.query_value("q").as_deref(), Some("café au lait"));
                assert_eq!(r.query_param("q"), Some("caf%C3%A9+au+lait"));
                assert_eq!(r.query_values("tag"), ["a", "b&c"]);
                assert_eq!(r.query_value("raw").as_deref(), Some("%ZZ"));
                assert_eq!(r.query_value("none"), None);
            },
        );
    }

    #[test]
    fn form_values_only_from_an_urlencoded_body() {
        let form = [(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        with(&form, "", b"name=Ada+L&x=%3D", |r| {
            assert_eq!(r.form_value("name").as_deref(), Some("Ada L"));
            assert_eq!(r.form_value("x").as_deref(), Some("="));
        });
        with(&[("content-type", "text/plain")], "", b"name=Ada", |r| {
            assert!(r.form_pairs().is_empty());
        });
    }

    #[test]
    fn cookies_and_repeated_headers() {
        let h = [
            ("Cookie", "sid=abc; theme=\"dark\""),
            ("cookie", "lang=en"),
            ("x-a", "1"),
            ("X-A", "2"),
        ];
        with(&h, "", b"", |r| {
            assert_eq!(r.cookie("sid"), Some("abc"));
            assert_eq!(r.cookie("theme"), Some("dark"));
            assert_eq!(r.cookie("lang"), Some("en"));
            assert_eq!(r.cookie("none"), None);
            assert_eq!(r.headers_named("x-a").collect::<Vec<_>>(), ["1", "2"]);
        });
        let c = Cookie::new("sid", "a b;c")
            .path("/")
            .max_age(3600)
            .secure()
            .http_only()
            .same_site(SameSite::Lax);
        assert_eq!(
            c.to_string(),
            "sid=a%20b%3Bc; Path=/; Max-Age=3600; Secure; HttpOnly; SameSite=Lax"
        );
        assert_eq!(Cookie::removal("sid").to_string(), "sid=; Max-Age=0");
        let mut resp = Response::new();
        resp.set_cookie(&Cookie::new("a", "1"))
            .set_cookie(&Cookie::new("b", "2"));
        let set: Vec<_> = resp
            .headers()
            .filter(|(n, _)| *n == "set-cookie")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(set, ["a=1", "b=2"]);
    }

    #[test]
    fn json_in_and_out() {
        #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
        struct Order {
            id: u32,
            items: Vec<String>,
        }
        with(&[], "", br#"{"id": 7, "items": ["tea"]}"#, |r| {
            let o: Order = r.json().unwrap();
            assert_eq!(
                o,
                Order {
                    id: 7,
                    items: vec!["tea".into()]
                }
            );
            assert!(r.json::<Vec<u8>>().is_err());
        });
        let mut resp = Response::new();
        resp.json(
            201,
            &Order {
                id: 1,
                items: vec![],
            },
        );
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.get_header("content-type"), Some("application/json"));
        assert_eq!(resp.body(), br#"{"id":1,"items":[]}"#);
    }

    const MULTIPART: &[u8] = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nHello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/csv\r\n\r\na,b\r\n1,2\r\n--XyZ--\r\n";

    #[test]
    fn multipart_parts_with_their_names_files_and_types() {
        let ct = [("content-type", "multipart/form-data; boundary=\"XyZ\"")];
        with(&ct, "", MULTIPART, |r| {
            let parts = r.multipart(&MultipartLimits::default()).unwrap();
            assert_eq!(parts.len(), 2);
            assert_eq!(
                (parts[0].name.as_str(), parts[0].text()),
                ("title", Some("Hello"))
            );
            assert_eq!(parts[0].content_type, "text/plain");
            assert_eq!(parts[1].filename.as_deref(), Some("a.txt"));
            assert_eq!(parts[1].content_type, "text/csv");
            assert_eq!(parts[1].data, b"a,b\r\n1,2");
        });
    }

    #[test]
    fn multipart_refuses_past_its_limits_and_malformed_bodies() {
        let ct = [("content-type", "multipart/form-data; boundary=XyZ")];
        let small = MultipartLimits {
            max_parts: 1,
            ..MultipartLimits::default()
        };
        with(&ct, "", MULTIPART, |r| {
            assert_eq!(r.multipart(&small), Err(MultipartError::TooManyParts));
            let tiny = MultipartLimits {
                max_part_bytes: 4,
                ..MultipartLimits::default()
            };
            assert_eq!(r.multipart(&tiny), Err(MultipartError::PartTooLarge));
        });
        let cut = &MULTIPART[..MULTIPART.len() - 12];
        with(&ct, "", cut, |r| {
            assert!(matches!(
                r.multipart(&MultipartLimits::default()),
                Err(MultipartError::Malformed(_))
            ));
        });
        with(&[("content-type", "text/plain")], "", MULTIPART, |r| {
            assert_eq!(
                r.multipart(&MultipartLimits::default()),
                Err(MultipartError::NotMultipart)
            );
        });
    }
}
