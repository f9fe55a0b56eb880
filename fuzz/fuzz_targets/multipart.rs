//! plugin-api's `multipart/form-data` parser under a fixed boundary: no input panics, parts
//! stay within the limits, and each part's data lies inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plughost_plugin_api::{
    abi_stable::std_types::{RSlice, RStr},
    Header, HttpVersion, MultipartLimits, Request,
};

fuzz_target!(|body: &[u8]| {
    let headers = [Header {
        name: RStr::from_str("content-type"),
        value: RSlice::from_slice(b"multipart/form-data; boundary=XyZ"),
    }];
    let req = Request {
        method: RStr::from_str("POST"),
        path: RStr::from_str("/"),
        query: RStr::from_str(""),
        target: RStr::from_str("/"),
        version: HttpVersion::Http11,
        headers: RSlice::from_slice(&headers),
        params: RSlice::from_slice(&[]),
        body: RSlice::from_slice(body),
        peer: RStr::from_str("127.0.0.1:1"),
        conn_id: 1,
        worker_id: 0,
        route: RStr::from_str(""),
    };
    let limits = MultipartLimits {
        max_parts: 8,
        max_part_bytes: 1024,
        max_header_bytes: 256,
    };
    if let Ok(parts) = req.multipart(&limits) {
        assert!(parts.len() <= limits.max_parts);
        let range = body.as_ptr_range();
        for p in parts {
            assert!(p.data.len() <= limits.max_part_bytes);
            let inside = range.start <= p.data.as_ptr() && p.data.as_ptr_range().end <= range.end;
            assert!(inside || p.data.is_empty());
        }
    }
});
