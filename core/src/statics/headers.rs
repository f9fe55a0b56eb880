//! What the request's headers ask of a file: revalidation (`If-None-Match`,
//! `If-Modified-Since`), a byte range (`Range`, `If-Range`) and an encoding
//! (`Accept-Encoding`). Pure functions over header values.

use std::time::{SystemTime, UNIX_EPOCH};

/// The headers of a request that matter to a static file.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ask<'a> {
    /// `If-None-Match`.
    pub if_none_match: Option<&'a [u8]>,
    /// `If-Modified-Since`.
    pub if_modified_since: Option<&'a [u8]>,
    /// `Range`.
    pub range: Option<&'a [u8]>,
    /// `If-Range`.
    pub if_range: Option<&'a [u8]>,
    /// `Accept-Encoding`.
    pub accept_encoding: Option<&'a [u8]>,
}

impl<'a> Ask<'a> {
    /// Notes header `name: value` if it is one of ours.
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        let slot = match name.len() {
            5 if name.eq_ignore_ascii_case(b"range") => &mut self.range,
            8 if name.eq_ignore_ascii_case(b"if-range") => &mut self.if_range,
            13 if name.eq_ignore_ascii_case(b"if-none-match") => &mut self.if_none_match,
            15 if name.eq_ignore_ascii_case(b"accept-encoding") => &mut self.accept_encoding,
            17 if name.eq_ignore_ascii_case(b"if-modified-since") => &mut self.if_modified_since,
            _ => return,
        };
        *slot = Some(value);
    }
}

/// Seconds since the epoch of a modification time (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Whether an `If-None-Match` list names `etag` (or is `*`); weak comparison, as RFC 9110
/// 13.1.2 asks for this header.
pub fn etag_matches(list: &[u8], etag: &[u8]) -> bool {
    list.split(|&b| b == b',').any(|tag| {
        let tag = tag.trim_ascii();
        tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == etag
    })
}

/// Whether a file modified at `mtime` (seconds) is unchanged since the `If-Modified-Since`
/// date; an unreadable date counts as changed.
pub fn unmodified_since(value: &[u8], mtime: u64) -> bool {
    let Some(since) = std::str::from_utf8(value)
        .ok()
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    else {
        return false;
    };
    mtime <= unix_secs(since)
}

/// Whether `If-Range` still holds: a strong match of the entity tag, or exactly the
/// `Last-Modified` date sent (RFC 9110 13.1.5).
pub fn if_range_holds(value: &[u8], etag: &[u8], last_modified: &[u8]) -> bool {
    let value = value.trim_ascii();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        value == etag
    } else {
        value == last_modified
    }
}

/// What a `Range` header asks of a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// The whole: no range, one we do not serve (several ranges, another unit), or a
    /// malformed one (ignored, as RFC 9110 14.2 allows).
    Whole,
    /// The bytes from the first to the last, inclusive.
    Part(u64, u64),
    /// A well-formed range that lies past the end: 416.
    Unsatisfiable,
}

/// Parses a single range `bytes=a-b`, `bytes=a-` or `bytes=-n` against `len`.
pub fn span(value: &[u8], len: u64) -> Span {
    let value = value.trim_ascii();
    let Some(spec) = value
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case(b"bytes="))
        .map(|_| value[6..].trim_ascii())
    else {
        return Span::Whole;
    };
    if spec.contains(&b',') {
        return Span::Whole;
    }
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return Span::Whole;
    };
    let (first, last) = (number(&spec[..dash]), number(&spec[dash + 1..]));
    match (dash, first, last) {
        // `-n`: the last n bytes.
        (0, _, Some(n)) if n == 0 || len == 0 => Span::Unsatisfiable,
        (0, _, Some(n)) => Span::Part(len.saturating_sub(n), len - 1),
        (_, Some(a), None) if spec.len() == dash + 1 => {
            if a >= len {
                Span::Unsatisfiable
            } else {
                Span::Part(a, len - 1)
            }
        }
        (_, Some(a), Some(b)) if a <= b => {
            if a >= len {
                Span::Unsatisfiable
            } else {
                Span::Part(a, b.min(len - 1))
            }
        }
        _ => Span::Whole,
    }
}

/// A decimal number of at most 19 digits.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// Whether an `Accept-Encoding` value accepts `coding` (`br`, `gzip`): named with a
/// nonzero q, or covered by `*` with one when not named.
pub fn accepts(value: &[u8], coding: &[u8]) -> bool {
    let mut star = false;
    for item in value.split(|&b| b == b',') {
        let mut parts = item.split(|&b| b == b';');
        let name = parts.next().unwrap_or_default().trim_ascii();
        let q_nonzero = parts
            .filter_map(|p| {
                let p = p.trim_ascii();
                (p.len() > 2 && p[..2].eq_ignore_ascii_case(b"q=")).then(|| &p[2..])
            })
            .next_back()
            .is_none_or(|q| q.iter().any(|&b| (b'1'..=b'9').contains(&b)));
        let alias = coding == b"gzip" && name.eq_ignore_ascii_case(b"x-gzip");
        if name.eq_ignore_ascii_case(coding) || alias {
            return q_nonzero;
        }
        if name == b"*" {
            star = q_nonzero;
        }
    }
    star
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(span(b"bytes=0-9", 100), Span::Part(0, 9));
        assert_eq!(span(b"bytes=90-", 100), Span::Part(90, 99));
        assert_eq!(span(b"bytes=-10", 100), Span::Part(90, 99));
        assert_eq!(span(b"bytes=-500", 100), Span::Part(0, 99));
        assert_eq!(span(b"bytes=50-500", 100), Span::Part(50, 99));
        assert_eq!(span(b"bytes=100-", 100), Span::Unsatisfiable);
        assert_eq!(span(b"bytes=100-200", 100), Span::Unsatisfiable);
        assert_eq!(span(b"bytes=-0", 100), Span::Unsatisfiable);
        assert_eq!(span(b"bytes=0-", 0), Span::Unsatisfiable);
        assert_eq!(span(b"bytes=5-2", 100), Span::Whole);
        assert_eq!(span(b"bytes=0-1,5-6", 100), Span::Whole);
        assert_eq!(span(b"items=0-1", 100), Span::Whole);
        assert_eq!(span(b"bytes=x-1", 100), Span::Whole);
        assert_eq!(span(b"bytes=-", 100), Span::Whole);
        assert_eq!(span(b"bytes=99999999999999999999-", 100), Span::Whole);
    }

    #[test]
    fn encodings() {
        assert!(accepts(b"gzip, deflate, br", b"br"));
        assert!(accepts(b"gzip;q=0.5", b"gzip"));
        assert!(!accepts(b"gzip;q=0", b"gzip"));
        assert!(!accepts(b"gzip; q=0.000", b"gzip"));
        assert!(!accepts(b"deflate", b"gzip"));
        assert!(accepts(b"*", b"br"));
        assert!(!accepts(b"*, br;q=0", b"br"));
        assert!(accepts(b"x-gzip", b"gzip"));
        assert!(!accepts(b"identity", b"br"));
    }

    #[test]
    fn validators() {
        assert!(etag_matches(b"\"a-1\"", b"\"a-1\""));
        assert!(etag_matches(b"\"x\", W/\"a-1\"", b"\"a-1\""));
        assert!(etag_matches(b"*", b"\"a-1\""));
        assert!(!etag_matches(b"\"a-2\"", b"\"a-1\""));
        assert!(unmodified_since(
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            784111777
        ));
        assert!(!unmodified_since(
            b"Sun, 06 Nov 1994 08:49:37 GMT",
            784111778
        ));
        assert!(!unmodified_since(b"yesterday", 0));
        let lm = b"Sun, 06 Nov 1994 08:49:37 GMT";
        assert!(if_range_holds(b"\"a-1\"", b"\"a-1\"", lm));
        assert!(!if_range_holds(b"W/\"a-1\"", b"\"a-1\"", lm));
        assert!(if_range_holds(lm, b"\"a-1\"", lm));
        assert!(!if_range_holds(
            b"Mon, 07 Nov 1994 08:49:37 GMT",
            b"\"a-1\"",
            lm
        ));
    }
}
