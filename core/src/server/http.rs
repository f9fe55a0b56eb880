//! HTTP/1.1 on our own connection loop: httparse for the head, Content-Length and chunked
//! bodies, keep-alive, pipelining (responses to requests already read go out in one write),
//! `Expect: 100-continue`, HEAD and HTTP/1.0. Buffers belong to the connection and are
//! reused, so a request allocates nothing once they have grown.
//!
//! Malformed input gets a 4xx and the connection closes (after a short lingering read, so the
//! client sees the answer and not a reset).

use std::{
    io,
    mem::MaybeUninit,
    net::{Shutdown, SocketAddr, TcpStream},
    rc::Rc,
    time::Duration,
};

use crate::reactor::{Async, Timer};
use abi_stable::std_types::{RSlice, RStr};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use plughost_plugin_api::{Header, HttpVersion, Param, Request, Response};

use async_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::{
    config::Limits,
    connections::Queues,
    pipeline::WsEvent,
    router::ParamPos,
    worker::{Conn, Phase, Worker},
};

/// The most header lines we ever parse; `limits.max_headers` is capped to this.
pub const MAX_HEADERS_CAP: usize = 512;

/// A response status for input we refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    Timeout,
    TooLarge,
    HeadersTooLarge,
}

impl Refusal {
    fn status(self) -> (u16, &'static str) {
        match self {
            Refusal::BadRequest => (400, "Bad Request"),
            Refusal::Timeout => (408, "Request Timeout"),
            Refusal::TooLarge => (413, "Content Too Large"),
            Refusal::HeadersTooLarge => (431, "Request Header Fields Too Large"),
        }
    }
}

/// Offsets of one header in the read buffer, relative to the start of the request.
#[derive(Debug, Clone, Copy)]
struct HeaderPos {
    name: (u32, u32),
    value: (u32, u32),
}

/// What the head says, as offsets into the read buffer.
#[derive(Debug)]
struct Head {
    len: usize,
    method: (u32, u32),
    path: (u32, u32),
    query: (u32, u32),
    version: HttpVersion,
    body: BodyKind,
    keep_alive: bool,
    expect_continue: bool,
    is_head: bool,
    /// `Upgrade: websocket` with `Connection: upgrade`.
    upgrade: bool,
    /// `Sec-WebSocket-Key`, when present.
    ws_key: Option<(u32, u32)>,
    /// `Sec-WebSocket-Version: 13`.
    ws_version_ok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// The read buffer: `data[start..end]` holds bytes not yet consumed. It starts small and
/// grows, up to `max`, only for a long head or a body read in place.
struct ReadBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
    max: usize,
}

impl ReadBuf {
    /// Most requests fit: curl's is under 100 bytes, a browser's with cookies about 1 KiB.
    const INITIAL: usize = 2048;

    fn new(max: usize) -> ReadBuf {
        ReadBuf {
            data: vec![0u8; Self::INITIAL.min(max)].into_boxed_slice(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// Grows the buffer so `data[start..start + len]` fits, when `max` allows.
    fn fit(&mut self, len: usize) -> bool {
        let need = self.start + len;
        if need <= self.data.len() {
            return true;
        }
        if need > self.max {
            return false;
        }
        let size = (self.data.len() * 2).clamp(need, self.max);
        let mut data = vec![0u8; size].into_boxed_slice();
        data[self.start..self.end].copy_from_slice(&self.data[self.start..self.end]);
        self.data = data;
        true
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, moving pending bytes to the front or growing when that makes room.
    fn space(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() {
            self.fit(self.end - self.start + 1);
        }
        &mut self.data[self.end..]
    }
}

fn span(base: *const u8, s: &[u8]) -> (u32, u32) {
    ((s.as_ptr() as usize - base as usize) as u32, s.len() as u32)
}

fn slice(buf: &[u8], (start, len): (u32, u32)) -> &[u8] {
    &buf[start as usize..(start + len) as usize]
}

fn text(buf: &[u8], pos: (u32, u32)) -> &str {
    // httparse only hands out tokens and paths it validated as ASCII, and names as tokens.
    std::str::from_utf8(slice(buf, pos)).unwrap_or("")
}

/// Parses a head in `buf`; `Ok(None)` when it is incomplete.
fn parse_head(
    buf: &[u8],
    limits: &Limits,
    headers_out: &mut Vec<HeaderPos>,
) -> Result<Option<Head>, Refusal> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let storage = &mut storage[..limits.max_headers.min(MAX_HEADERS_CAP)];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::BadRequest),
    };
    if len > limits.max_header_bytes {
        return Err(Refusal::HeadersTooLarge);
    }
    let base = buf.as_ptr();
    let method = req.method.ok_or(Refusal::BadRequest)?;
    let target = req.path.ok_or(Refusal::BadRequest)?;
    if !target.starts_with('/') && target != "*" {
        // Absolute-form targets are for proxies; we are an origin server.
        return Err(Refusal::BadRequest);
    }
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (target, &target[target.len()..]),
    };
    let version = match req.version {
        Some(0) => HttpVersion::Http10,
        _ => HttpVersion::Http11,
    };
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut has_te = false;
    let mut has_host = false;
    let mut keep_alive = version == HttpVersion::Http11;
    let mut expect_continue = false;
    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut ws_key = None;
    let mut ws_version_ok = false;
    headers_out.clear();
    for h in req.headers.iter() {
        headers_out.push(HeaderPos {
            name: span(base, h.name.as_bytes()),
            value: span(base, h.value),
        });
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(Refusal::BadRequest)?;
            if content_length.is_some_and(|old| old != v) {
                return Err(Refusal::BadRequest);
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_te = true;
            // Only `chunked` is supported, and it must be the only (and so last) coding.
            let v = std::str::from_utf8(h.value).map_err(|_| Refusal::BadRequest)?;
            for coding in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if !coding.eq_ignore_ascii_case("chunked") || chunked {
                    return Err(Refusal::BadRequest);
                }
                chunked = true;
            }
        } else if name.eq_ignore_ascii_case("host") {
            has_host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = Some(span(base, h.value.trim_ascii()));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version_ok = h.value.trim_ascii() == b"13";
        } else if name.eq_ignore_ascii_case("expect")
            && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        {
            expect_continue = version == HttpVersion::Http11;
        }
    }
    if (has_te && !chunked) || (chunked && content_length.is_some()) {
        return Err(Refusal::BadRequest);
    }
    if version == HttpVersion::Http11 && !has_host {
        return Err(Refusal::BadRequest);
    }
    let body = if chunked {
        BodyKind::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyKind::None,
            Some(n) => BodyKind::Length(n),
        }
    };
    Ok(Some(Head {
        len,
        method: span(base, method.as_bytes()),
        path: span(base, path.as_bytes()),
        query: span(base, query.as_bytes()),
        version,
        body,
        keep_alive,
        expect_continue,
        is_head: method == "HEAD",
        upgrade: upgrade_websocket && connection_upgrade && method == "GET",
        ws_key,
        ws_version_ok,
    }))
}

/// Reuses a vector's allocation for borrowed views of another lifetime.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Upgraded to WebSocket handler `ws`; false when `on_open` failed.
    Upgrade(usize, Queues, bool),
}

/// Answers an upgrade request on a WebSocket route: 101 and `on_open`, or the refusal.
#[allow(clippy::too_many_arguments)]
fn upgrade(
    worker: &Worker,
    conn: &Conn,
    head: &Head,
    buf: &[u8],
    req: &Request<'_>,
    ws: usize,
    resp: &mut Response,
    out: &mut Vec<u8>,
) -> Next {
    let settings = worker.ws_settings();
    let key = match head.ws_key {
        Some(k) if head.ws_version_ok && head.version == HttpVersion::Http11 => slice(buf, k),
        _ => {
            resp.reset();
            resp.text(400, "bad websocket upgrade: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 are required\n")
                .set_header("sec-websocket-version", "13");
            write_response(out, resp, head.version, false, true, false, worker);
            return Next::Close;
        }
    };
    if worker.connections().count() >= settings.max_connections {
        resp.reset();
        resp.text(503, "too many websocket connections\n");
        write_response(out, resp, head.version, false, true, false, worker);
        return Next::Close;
    }
    if !worker.ws_handshake(req, ws, resp) {
        write_response(
            out,
            resp,
            head.version,
            head.is_head,
            !head.keep_alive,
            head.keep_alive,
            worker,
        );
        return if head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
    }
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
    out.extend_from_slice(derive_accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(resp.head_bytes());
    out.extend_from_slice(b"\r\n");
    // Registered before on_open, so on_open can already push to the new connection.
    let queues = worker
        .connections()
        .open(conn.id, req.path.as_str(), settings.send_queue);
    let opened = worker.ws_event(ws, WsEvent::Open(conn.id, req));
    Next::Upgrade(ws, queues, opened)
}

/// Per-connection buffers, kept across requests.
struct Buffers {
    read: ReadBuf,
    out: Vec<u8>,
    /// The body when it does not sit whole in `read` (large or chunked).
    body: Vec<u8>,
    header_pos: Vec<HeaderPos>,
    params: Vec<ParamPos>,
    headers: Vec<Header<'static>>,
    param_views: Vec<Param<'static>>,
    resp: Response,
}

/// Serves one connection until it closes.
pub async fn serve(worker: Rc<Worker>, conn: Rc<Conn>, peer: SocketAddr) {
    let limits = worker.limits();
    let mut b = Buffers {
        read: ReadBuf::new(limits.max_header_bytes.max(1024) + 1024),
        out: Vec::with_capacity(1024),
        body: Vec::new(),
        header_pos: Vec::with_capacity(16),
        params: Vec::new(),
        headers: Vec::with_capacity(16),
        param_views: Vec::new(),
        resp: Response::new(),
    };
    let peer = peer.to_string();
    if let Err(e) = serve_inner(&worker, &conn, &peer, &mut b).await {
        log::debug!("connection {} from {peer}: {e}", conn.id);
    }
}

async fn serve_inner(worker: &Worker, conn: &Conn, peer: &str, b: &mut Buffers) -> io::Result<()> {
    let stream = &conn.stream;
    loop {
        let limits = worker.limits();
        // 1. A complete head: parse what we have, read more while it is partial.
        let head = loop {
            if !b.read.pending().is_empty() {
                match parse_head(b.read.pending(), &limits, &mut b.header_pos) {
                    Ok(Some(head)) => break head,
                    Ok(None) if b.read.pending().len() > limits.max_header_bytes => {
                        return refuse(worker, conn, b, Refusal::HeadersTooLarge).await;
                    }
                    Ok(None) => {}
                    Err(r) => return refuse(worker, conn, b, r).await,
                }
            }
            if !b.out.is_empty() {
                // Responses to pipelined requests go out before we wait for more input.
                (&conn.stream).write_all(&b.out).await?;
                b.out.clear();
            }
            if worker.draining() && b.read.pending().is_empty() {
                return Ok(());
            }
            conn.set_phase(
                if b.read.pending().is_empty() {
                    Phase::Idle
                } else {
                    Phase::ReadingHead
                },
                worker,
            );
            if b.read.pending().is_empty() {
                // Between requests the socket is almost always drained: wait for readiness
                // instead of a read that would fail with EAGAIN (a syscall per request).
                // Meanwhile an idle worker may take the connection over (see `steal`).
                conn.claim.park();
                let ready = stream.readable().await;
                if !conn.claim.hold() {
                    return Ok(());
                }
                ready?;
            }
            let n = read_some(stream, &mut b.read).await?;
            if n == 0 {
                if conn.timed_out() && !b.read.pending().is_empty() {
                    return refuse(worker, conn, b, Refusal::Timeout).await;
                }
                return Ok(());
            }
            if conn.phase() == Phase::Idle {
                conn.set_phase(Phase::ReadingHead, worker);
            }
        };
        conn.set_phase(Phase::Busy, worker);

        // 2. The body.
        let in_place = match head.body {
            BodyKind::None => Some(0),
            BodyKind::Length(n) if n > limits.max_body_bytes => {
                return refuse(worker, conn, b, Refusal::TooLarge).await;
            }
            BodyKind::Length(n) => {
                let have = b.read.pending().len() - head.len;
                if head.expect_continue && have < n {
                    (&conn.stream).write_all(&b.out).await?;
                    b.out.clear();
                    (&conn.stream)
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await?;
                }
                if b.read.fit(head.len + n) {
                    // The body fits behind the head in the read buffer.
                    while b.read.pending().len() < head.len + n {
                        conn.set_phase(Phase::ReadingBody, worker);
                        if read_some(stream, &mut b.read).await? == 0 {
                            return body_cut(worker, conn, b).await;
                        }
                    }
                    Some(n)
                } else {
                    b.body.clear();
                    b.body.extend_from_slice(&b.read.pending()[head.len..]);
                    b.read.end = b.read.start + head.len;
                    b.body.resize(n, 0);
                    conn.set_phase(Phase::ReadingBody, worker);
                    let mut got = have;
                    while got < n {
                        match (&conn.stream).read(&mut b.body[got..]).await? {
                            0 => return body_cut(worker, conn, b).await,
                            k => got += k,
                        }
                    }
                    None
                }
            }
            BodyKind::Chunked => {
                if head.expect_continue {
                    (&conn.stream).write_all(&b.out).await?;
                    b.out.clear();
                    (&conn.stream)
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await?;
                }
                conn.set_phase(Phase::ReadingBody, worker);
                match read_chunked(stream, b, head.len, limits.max_body_bytes).await? {
                    Ok(()) => None,
                    Err(r) => return refuse(worker, conn, b, r).await,
                }
            }
        };

        // 3. Route and run the plugins.
        let keep_alive = head.keep_alive && !worker.draining();
        let next = worker.with_router(|router| {
            let buf = b.read.pending();
            let body: &[u8] = match in_place {
                Some(n) => &buf[head.len..head.len + n],
                None => &b.body,
            };
            let path = text(buf, head.path);
            let method = text(buf, head.method);
            let route = router.find(method, path, &mut b.params);
            let mut headers: Vec<Header<'_>> = recycle(std::mem::take(&mut b.headers));
            headers.extend(b.header_pos.iter().map(|h| Header {
                name: RStr::from_str(text(buf, h.name)),
                value: RSlice::from_slice(slice(buf, h.value)),
            }));
            let mut params: Vec<Param<'_>> = recycle(std::mem::take(&mut b.param_views));
            params.extend(b.params.iter().map(|p| Param {
                name: RStr::from_str(router.param_name(p)),
                value: RStr::from_str(&path[p.start as usize..(p.start + p.len) as usize]),
            }));
            let req = Request {
                method: RStr::from_str(method),
                path: RStr::from_str(path),
                query: RStr::from_str(text(buf, head.query)),
                version: head.version,
                headers: RSlice::from_slice(&headers),
                params: RSlice::from_slice(&params),
                body: RSlice::from_slice(body),
                peer: RStr::from_str(peer),
                conn_id: conn.id,
                worker_id: worker.id(),
            };
            if head.upgrade {
                if let Some(ws) = worker.ws_route(path) {
                    let next = upgrade(worker, conn, &head, buf, &req, ws, &mut b.resp, &mut b.out);
                    b.headers = recycle(headers);
                    b.param_views = recycle(params);
                    return next;
                }
            }
            worker.dispatch(&req, &route, &mut b.resp);
            let plugin_connection = connection_header(b.resp.head_bytes());
            let close = !keep_alive
                || plugin_connection.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"close"));
            write_response(
                &mut b.out,
                &b.resp,
                head.version,
                head.is_head,
                close,
                head.keep_alive,
                worker,
            );
            b.headers = recycle(headers);
            b.param_views = recycle(params);
            if close {
                Next::Close
            } else {
                Next::KeepAlive
            }
        });
        let close = match next {
            Next::KeepAlive => false,
            Next::Close => true,
            Next::Upgrade(ws, queues, opened) => {
                conn.leave_lobby();
                (&conn.stream).write_all(&b.out).await?;
                b.out.clear();
                // Bytes past the head already belong to the WebSocket.
                let part = b.read.pending()[head.len..].to_vec();
                b.read.consume(b.read.pending().len());
                super::ws::serve(worker, conn, part, ws, queues, opened).await;
                return Ok(());
            }
        };
        // A body read into `b.body` is already gone from the read buffer.
        b.read.consume(head.len + in_place.unwrap_or(0));
        if close {
            (&conn.stream).write_all(&b.out).await?;
            b.out.clear();
            let _ = conn.stream.get_ref().shutdown(Shutdown::Write);
            return Ok(());
        }
        if b.out.len() > 64 * 1024 {
            (&conn.stream).write_all(&b.out).await?;
            b.out.clear();
        }
    }
}

async fn read_some(stream: &Async<TcpStream>, buf: &mut ReadBuf) -> io::Result<usize> {
    let space = buf.space();
    if space.is_empty() {
        return Err(io::Error::other("read buffer full"));
    }
    let n = (&*stream).read(space).await?;
    buf.end += n;
    Ok(n)
}

/// The input ended inside a body: a timeout gets its 408, a client that left gets nothing.
async fn body_cut(worker: &Worker, conn: &Conn, b: &mut Buffers) -> io::Result<()> {
    if conn.timed_out() {
        refuse(worker, conn, b, Refusal::Timeout).await
    } else {
        Ok(())
    }
}

/// Decodes a chunked body that starts `head_len` bytes into the pending input, into `b.body`.
/// On success the head stays pending (consumed by the caller) and the chunked bytes are gone.
async fn read_chunked(
    stream: &Async<TcpStream>,
    b: &mut Buffers,
    head_len: usize,
    max: usize,
) -> io::Result<Result<(), Refusal>> {
    b.body.clear();
    // Work on the bytes after the head; `pos` is relative to read.start + head_len.
    let mut pos = 0usize;
    loop {
        // Chunk size line.
        let size = loop {
            let avail = &b.read.pending()[head_len + pos..];
            match httparse::parse_chunk_size(avail) {
                Ok(httparse::Status::Complete((used, size))) => {
                    pos += used;
                    break size;
                }
                Ok(httparse::Status::Partial) if avail.len() > 1024 => {
                    return Ok(Err(Refusal::BadRequest));
                }
                Ok(httparse::Status::Partial) => {
                    compact_after_head(b, head_len, &mut pos);
                    if read_some(stream, &mut b.read).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(_) => return Ok(Err(Refusal::BadRequest)),
            }
        };
        if size == 0 {
            // Trailers: skip lines until an empty one.
            loop {
                let avail = &b.read.pending()[head_len + pos..];
                match avail.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        pos += 2;
                        finish_chunked(b, head_len, pos);
                        return Ok(Ok(()));
                    }
                    Some(i) => pos += i + 2,
                    None if avail.len() > 1024 => return Ok(Err(Refusal::BadRequest)),
                    None => {
                        compact_after_head(b, head_len, &mut pos);
                        if read_some(stream, &mut b.read).await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                }
            }
        }
        if size > (max - b.body.len()) as u64 {
            return Ok(Err(Refusal::TooLarge));
        }
        let mut left = size as usize;
        while left > 0 {
            let avail = &b.read.pending()[head_len + pos..];
            let take = avail.len().min(left);
            b.body.extend_from_slice(&avail[..take]);
            pos += take;
            left -= take;
            if left > 0 {
                // Drop the decoded bytes from the buffer to make room.
                compact_after_head(b, head_len, &mut pos);
                if read_some(stream, &mut b.read).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        // CRLF after the chunk data.
        while b.read.pending().len() < head_len + pos + 2 {
            compact_after_head(b, head_len, &mut pos);
            if read_some(stream, &mut b.read).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        if &b.read.pending()[head_len + pos..head_len + pos + 2] != b"\r\n" {
            return Ok(Err(Refusal::BadRequest));
        }
        pos += 2;
        compact_after_head(b, head_len, &mut pos);
    }
}

/// Removes the `pos` bytes of chunked encoding already decoded after the head.
fn compact_after_head(b: &mut Buffers, head_len: usize, pos: &mut usize) {
    if *pos == 0 {
        return;
    }
    let from = b.read.start + head_len;
    b.read.data.copy_within(from + *pos..b.read.end, from);
    b.read.end -= *pos;
    *pos = 0;
}

fn finish_chunked(b: &mut Buffers, head_len: usize, pos: usize) {
    let mut p = pos;
    compact_after_head(b, head_len, &mut p);
}

/// The value of a `connection` header among serialized `name: value\r\n` lines: a byte scan,
/// since this runs for every response.
fn connection_header(head: &[u8]) -> Option<&[u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
        name.eq_ignore_ascii_case(b"connection")
            .then(|| &value[1..])
    })
}

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

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
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

fn write_response(
    out: &mut Vec<u8>,
    resp: &Response,
    version: HttpVersion,
    is_head: bool,
    close: bool,
    asked_keep_alive: bool,
    worker: &Worker,
) {
    let status = resp.status();
    out.extend_from_slice(match version {
        HttpVersion::Http10 => b"HTTP/1.0 ",
        HttpVersion::Http11 => b"HTTP/1.1 ",
    });
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(resp.head_bytes());
    let no_body = status < 200 || status == 204 || status == 304;
    if !no_body {
        out.extend_from_slice(b"content-length: ");
        push_u64(out, resp.body().len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    worker.with_date(|d| out.extend_from_slice(d));
    out.extend_from_slice(b"\r\n");
    if connection_header(resp.head_bytes()).is_none() {
        if close && version == HttpVersion::Http11 {
            out.extend_from_slice(b"connection: close\r\n");
        } else if !close && version == HttpVersion::Http10 && asked_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    if !is_head && !no_body {
        out.extend_from_slice(resp.body());
    }
}

/// Answers a refused request and closes: write, half-close, then read and drop what the
/// client still sends for a moment, so our answer is not lost to a reset.
async fn refuse(worker: &Worker, conn: &Conn, b: &mut Buffers, r: Refusal) -> io::Result<()> {
    let (status, text) = r.status();
    log::debug!("connection {}: answering {status} {text}", conn.id);
    let mut out = std::mem::take(&mut b.out);
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(&mut out, status as u64);
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(
        b"\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: ",
    );
    push_u64(&mut out, text.len() as u64 + 1);
    out.extend_from_slice(b"\r\ndate: ");
    worker.with_date(|d| out.extend_from_slice(d));
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
    (&conn.stream).write_all(&out).await?;
    let _ = conn.stream.get_ref().shutdown(Shutdown::Write);
    linger(&conn.stream).await;
    Ok(())
}

async fn linger(stream: &Async<TcpStream>) {
    let drain = async {
        let mut scratch = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
            match (&*stream).read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    future::or(drain, async {
        Timer::after(Duration::from_millis(500)).await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, Refusal> {
        parse_head(raw.as_bytes(), &Limits::default(), &mut Vec::new())
    }

    #[test]
    fn simple_get() {
        let raw = "GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!(h.len, raw.len());
        assert_eq!(text(raw.as_bytes(), h.path), "/a/b");
        assert_eq!(text(raw.as_bytes(), h.query), "x=1");
        assert!(h.keep_alive);
        assert_eq!(h.body, BodyKind::None);
    }

    #[test]
    fn partial_head() {
        assert!(parse("GET / HTTP/1.1\r\nHost: h\r\n").unwrap().is_none());
    }

    #[test]
    fn malformed_heads_are_refused() {
        let bad = [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "BLAH\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        for raw in bad {
            assert_eq!(parse(raw).unwrap_err(), Refusal::BadRequest, "{raw:?}");
        }
    }

    #[test]
    fn same_duplicate_content_length_is_fine() {
        let h =
            parse("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.body, BodyKind::Length(3));
    }

    #[test]
    fn http10_defaults_to_close() {
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn connection_header_is_found_by_bytes() {
        assert_eq!(
            connection_header(b"x-a: 1\r\nConnection: close\r\n"),
            Some(&b" close"[..])
        );
        assert_eq!(connection_header(b"x-connection: 1\r\n"), None);
        assert_eq!(connection_header(b""), None);
    }

    #[test]
    fn too_many_headers() {
        let limits = Limits {
            max_headers: 2,
            ..Limits::default()
        };
        let raw = "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(
            parse_head(raw.as_bytes(), &limits, &mut Vec::new()).unwrap_err(),
            Refusal::HeadersTooLarge
        );
    }
}
