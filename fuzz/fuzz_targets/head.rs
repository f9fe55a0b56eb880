//! The request head parser, then path normalization and parameter decoding on what it
//! parsed: no input panics, and a normalized path never keeps a dot segment or leaves `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plughost::{
    config::Limits,
    http::parse::{decode_param, normalize_path, parse_head, text},
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut headers = Vec::new();
    let Ok(Some(head)) = parse_head(data, &limits, &mut headers) else {
        return;
    };
    assert!(head.len <= data.len());
    assert!(headers.len() <= limits.max_headers);
    let path = text(data, head.path);
    let mut out = String::new();
    if let Ok(true) = normalize_path(path, &mut out) {
        assert!(out.starts_with('/'), "{out:?}");
        assert!(!out.split('/').any(|s| s == "." || s == ".."), "{out:?}");
    }
    let mut param = String::new();
    let _ = decode_param(path, &mut param);
});
