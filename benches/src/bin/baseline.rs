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
    io::Write,
    net::SocketAddr,
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
use tokio::net::TcpListener;

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
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("an address such as 127.0.0.1:0");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .on_thread_start(|| WORKER.with(|w| w.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed))))
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let local = listener.local_addr().expect("local address");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
        drop(out);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(hello))
                    .await;
            });
        }
    });
}
