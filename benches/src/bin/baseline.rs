//! The baseline plughost is measured against: hyper 1 on a tokio runtime with 2 worker
//! threads, answering every request like plughost's `hello` plugin does on `/hello`:
//! `200`, body `hello from plughost\n`, headers `content-type`, `x-worker`, `x-served`,
//! `content-length` and `date` (the last two added by hyper).
//!
//! Binds 127.0.0.1:0 (or the address given as the first argument) and prints
//! `listening on http://ADDR` on stdout once it accepts. Stops on SIGTERM (default action).

use std::{
    cell::Cell,
    convert::Infallible,
    sync::atomic::{AtomicU32, Ordering},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"hello from plughost\n";

static NEXT_THREAD: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// This runtime thread's id (like plughost's worker id).
    static WORKER: Cell<u32> = const { Cell::new(0) };
    /// Requests this thread served (like the hello instance's counter).
    static SERVED: Cell<u64> = const { Cell::new(0) };
}

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let served = SERVED.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    let worker = WORKER.with(Cell::get);
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("x-worker"),
        HeaderValue::from(worker),
    );
    h.insert(
        HeaderName::from_static("x-served"),
        HeaderValue::from(served),
    );
    Ok(resp)
}

fn main() {
    let numbered = |b: &mut tokio::runtime::Builder| {
        b.on_thread_start(|| WORKER.with(|w| w.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed))));
    };
    plughost_benches::serve_tokio(numbered, |stream| async move {
        let _ = http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service_fn(hello))
            .await;
    });
}
