//! Static files: a request path (the first line of the input) normalized as for routing, then
//! turned into a relative file name; and the rest as a `Range`, `Accept-Encoding` and
//! validator value. No input panics, a name never climbs out (no `..`, `/` at the start, NUL
//! or backslash), and a range lies inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plughost::{
    http::parse::normalize_path,
    statics::{fs::relative, headers},
};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (path, value) = (&data[..split], &data[(split + 1).min(data.len())..]);
    if let Ok(path) = std::str::from_utf8(path) {
        if path.starts_with('/') {
            let mut normal = String::new();
            let path = match normalize_path(path, &mut normal) {
                Ok(true) => normal.as_str(),
                Ok(false) => path,
                Err(_) => return,
            };
            let mut name = Vec::new();
            if relative(&path[1..], false, &mut name).is_some() {
                assert_eq!(name.pop(), Some(0));
                assert!(!name.starts_with(b"/") && !name.contains(&0) && !name.contains(&b'\\'));
                assert!(!name.split(|&b| b == b'/').any(|s| s == b".." || s.starts_with(b".")) || name == b".");
            }
        }
    }
    for len in [0u64, 1, 13, 1 << 20] {
        if let headers::Span::Part(first, last) = headers::span(value, len) {
            assert!(first <= last && last < len, "{first}-{last}/{len}");
        }
    }
    let _ = headers::accepts(value, b"gzip");
    let _ = headers::etag_matches(value, b"\"1-d\"");
    let _ = headers::unmodified_since(value, 0);
});
