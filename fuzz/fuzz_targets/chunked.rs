//! The chunked body decoder, fed the input in pieces of 1 to 64 bytes (the first byte picks
//! the size): no input panics, a decoded body stays within its limit, and the body budget is
//! given back.
#![no_main]

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use futures_lite::AsyncRead;
use libfuzzer_sys::fuzz_target;
use plughost::http::body::{read_chunked, Budget, ReadBuf};

/// Hands out the input a few bytes at a time, as a socket might.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.step.min(self.data.len()).min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut input = Pieces {
        data: rest,
        step: first as usize % 64 + 1,
    };
    let mut read = ReadBuf::new(9 * 1024);
    let mut body = Vec::new();
    let counter = Arc::new(AtomicUsize::new(0));
    let mut budget = Budget::new(counter.clone(), 1 << 20);
    let decoded = futures_lite::future::block_on(read_chunked(
        &mut input,
        &mut read,
        &mut body,
        0,
        MAX,
        &mut budget,
    ));
    if let Ok(Ok(())) = decoded {
        assert!(body.len() <= MAX);
    }
    drop(budget);
    assert_eq!(counter.load(Ordering::Relaxed), 0);
});
