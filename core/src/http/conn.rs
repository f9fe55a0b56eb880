//! The HTTP/1.1 connection loop: read a head, read the body (`Content-Length` or chunked),
//! route, run the plugins, write the response, then keep the connection or close it. It
//! pipelines (responses to requests already read go out in one write), answers
//! `Expect: 100-continue`, HEAD and HTTP/1.0, and hands upgrades to the WebSocket loop.
//! Buffers belong to the connection and are reused, so a request allocates nothing once they
//! have grown.
//!
//! A GET or HEAD of a file of the `static` folder is answered here, before the plugins (or
//! when no route matches: `static.before_routes`), without the middleware.
//!
//! Malformed input gets a 4xx and the connection closes (after a short lingering read, so the
//! client sees the answer and not a reset).

use std::{
    fs::File,
    io,
    net::{Shutdown, SocketAddr, TcpStream},
    os::unix::fs::FileExt,
    sync::{atomic::AtomicUsize, Arc},
    time::Duration,
};

use abi_stable::std_types::{RSlice, RStr};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use plughost_plugin_api::{Header, HttpVersion, Param, Request, Response};
use tungstenite::handshake::derive_accept_key;

use super::{
    body::{read_chunked, read_into, read_some, Budget, ReadBuf},
    deferred::{self, Deferred},
    parse::{
        decode_param, normalize_path, parse_head, slice, text, BodyKind, Head, HeaderPos, Refusal,
    },
    write::{connection_header, write_head, write_refusal, write_response, Framing},
};
use crate::{
    config::Limits,
    plugin,
    router::{Match, ParamPos, Router},
    runtime::{
        conn::{Conn, Phase},
        reactor::{Async, Timer},
    },
    statics::{
        self,
        cache::Cache,
        headers::Ask,
        send::{send_file, send_head},
        Found, Statics,
    },
    ws::{self, deflate, mailbox::Mailbox, Binding, Session},
};

/// Static file bodies up to this size are copied into the output buffer (one write with
/// the head, and pipelined); larger ones go out with sendfile.
const COPY_MAX: u64 = 32 * 1024;

/// What the connection loop needs from the worker that runs it.
pub trait Site: ws::Site {
    /// The worker's id.
    fn id(&self) -> u32;
    /// The HTTP limits now in force.
    fn limits(&self) -> Limits;
    /// Whether a stop is under way (responses say `connection: close`).
    fn draining(&self) -> bool;
    /// Whether idle keep-alive connections close now (a stop), rather than after their next
    /// response (a handover to a new server process).
    fn close_idle(&self) -> bool;
    /// The count of large request body bytes in flight across workers.
    fn body_budget(&self) -> &Arc<AtomicUsize>;
    /// Counts a request refused because that budget was spent.
    fn body_refused(&self);
    /// Runs `f` with the current router.
    fn with_router<R>(&self, f: impl FnOnce(&Router) -> R) -> R;
    /// Runs `f` with the static file settings now in force (`None`: no `static` section)
    /// and the current router.
    fn with_statics<R>(&self, f: impl FnOnce(Option<&Statics>, &Router, &mut Cache) -> R) -> R;
    /// Counts a static file response; `sendfile` is the bytes of it sent with sendfile.
    fn count_static(&self, sendfile: Option<u64>);
    /// Runs `f` with the current `date` header value.
    fn with_date<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R;
    /// Runs the plugin pipeline for one request.
    fn dispatch(&self, req: &Request<'_>, route: &Match, resp: &mut Response);
    /// The WebSocket handler for an upgrade to `path`, if it is a WebSocket route.
    fn ws_route(&self, path: &str) -> Option<Binding>;
    /// Runs an upgrade request through the middleware and the handler's `on_handshake`.
    fn ws_handshake(&self, req: &Request<'_>, ws: &Binding, resp: &mut Response) -> bool;
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
    /// This connection's share of the body budget.
    budget: Budget,
    /// The version of the request being answered (for refusals).
    version: HttpVersion,
    /// Requests answered on this connection.
    served: u64,
    /// The request's path after normalization, when it differs from the one sent.
    path: String,
    /// Whether `path` is the one to route (else the head's own).
    normalized: bool,
    /// Percent-decoded path parameter values, and their ranges in it.
    param_text: String,
    param_ranges: Vec<Option<(u32, u32)>>,
    /// A static file response's header lines, and the file's relative name.
    static_head: Vec<u8>,
    static_name: Vec<u8>,
}

impl Buffers {
    /// Gives the buffers' memory back (the connection became a WebSocket).
    fn release(&mut self) {
        self.read = ReadBuf::new(0);
        self.out = Vec::new();
        self.body = Vec::new();
        self.header_pos = Vec::new();
        self.params = Vec::new();
        self.headers = Vec::new();
        self.param_views = Vec::new();
        self.resp = Response::new();
        self.path = String::new();
        self.param_text = String::new();
        self.param_ranges = Vec::new();
        self.static_head = Vec::new();
        self.static_name = Vec::new();
    }
}

/// Where a request's body is.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// In the read buffer right after the head: this many bytes.
    InPlace(usize),
    /// In `Buffers::body` (large or chunked).
    Apart,
    /// Not read: the client asked `Expect: 100-continue` for a request that has no route.
    Unread,
}

/// What the connection does after a request.
enum Next<'a, S: Site> {
    KeepAlive,
    Close,
    /// Upgraded to a WebSocket (registered, `on_open` ran): send the 101 and serve it.
    Upgrade(Session<'a, S>, std::sync::Arc<Mailbox>),
    /// The plugins deferred the response: wait for it (see `deferred`).
    Deferred(Box<Deferred>),
}

/// Serves one connection until it closes.
pub async fn serve<S: Site>(site: &S, conn: &Conn, peer: SocketAddr) {
    let limits = site.limits();
    let mut b = Buffers {
        read: ReadBuf::new(limits.max_header_bytes.max(1024) + 1024),
        out: Vec::with_capacity(1024),
        body: Vec::new(),
        header_pos: Vec::with_capacity(16),
        params: Vec::new(),
        headers: Vec::with_capacity(16),
        param_views: Vec::new(),
        resp: Response::new(),
        budget: Budget::new(site.body_budget().clone(), limits.max_inflight_body_bytes),
        version: HttpVersion::Http11,
        served: 0,
        path: String::new(),
        normalized: false,
        param_text: String::new(),
        param_ranges: Vec::new(),
        static_head: Vec::new(),
        static_name: Vec::new(),
    };
    let peer = peer.to_string();
    if let Err(e) = serve_requests(site, conn, &peer, &mut b).await {
        log::debug!("connection {} from {peer}: {e}", conn.id);
    }
}

/// One request after another until the connection closes or becomes a WebSocket.
async fn serve_requests<S: Site>(
    site: &S,
    conn: &Conn,
    peer: &str,
    b: &mut Buffers,
) -> io::Result<()> {
    loop {
        b.version = HttpVersion::Http11;
        let Some(head) = read_head(site, conn, b).await? else {
            return Ok(());
        };
        if conn.upgrades_only() && !head.upgrade {
            b.version = head.version;
            return refuse::<S, ()>(site, conn, b, Refusal::UpgradeRequired)
                .await
                .map(|_| ());
        }
        // The limits in force now: a reload may have changed them while the connection idled.
        let limits = site.limits();
        b.budget.set_max(limits.max_inflight_body_bytes);
        b.version = head.version;
        b.served += 1;
        // Routing sees the normalized path; one that climbs above `/` is refused.
        match normalize_path(text(b.read.pending(), head.path), &mut b.path) {
            Ok(changed) => b.normalized = changed,
            Err(r) => return refuse::<S, ()>(site, conn, b, r).await.map(|_| ()),
        }
        conn.set_phase(Phase::Busy, site.now());
        let Some(body) = read_body(site, conn, b, &head, &limits).await? else {
            return Ok(());
        };
        if conn.expired() {
            // The body came in whole only after its time ran out (see `read_head`).
            return body_cut::<S, ()>(site, conn, b).await.map(|_| ());
        }
        let next = match serve_static(site, conn, b, &head).await? {
            Some(true) => Next::Close,
            Some(false) => Next::KeepAlive,
            None => respond(site, conn, peer, b, &head, body),
        };
        // A body left unread (a refused `Expect: 100-continue`) may still come: close.
        let unread = matches!(body, Body::Unread);
        let (close, deferred) = match next {
            Next::KeepAlive => (unread, None),
            Next::Close => (true, None),
            Next::Deferred(d) => (unread, Some(d)),
            Next::Upgrade(session, mailbox) => {
                return switch_to_websocket(session, conn, b, head.len, mailbox).await;
            }
        };
        // A body read into `b.body` is already gone from the read buffer.
        b.read.consume(match body {
            Body::InPlace(n) => head.len + n,
            Body::Apart | Body::Unread => head.len,
        });
        b.budget.release();
        if b.body.capacity() > 64 * 1024 {
            // A large body's memory goes back; the next one grows its own.
            b.body = Vec::new();
        }
        let close = match deferred {
            // The request is consumed: what the client sends while it waits is kept behind.
            Some(d) => {
                deferred::answer(site, conn, &mut b.read, &mut b.out, &mut b.resp, *d).await?
                    || close
            }
            None => close,
        };
        if close {
            flush(site, conn, &mut b.out).await?;
            let _ = conn.stream.get_ref().shutdown(Shutdown::Write);
            // What the client still sends is read and dropped for a moment, so the close
            // does not turn into a reset that destroys the response in flight.
            linger(&conn.stream).await;
            return Ok(());
        }
        if b.out.len() > 64 * 1024 {
            flush(site, conn, &mut b.out).await?;
        }
    }
}

/// Reads until a whole head is buffered, and parses it. `None` when the connection is done:
/// the client left, its input was refused, the server is draining, or another worker took
/// the connection over.
async fn read_head<S: Site>(site: &S, conn: &Conn, b: &mut Buffers) -> io::Result<Option<Head>> {
    loop {
        let limits = site.limits();
        b.read.set_max(limits.max_header_bytes.max(1024) + 1024);
        if !b.read.pending().is_empty() {
            match parse_head(b.read.pending(), &limits, &mut b.header_pos) {
                Ok(Some(head)) => return Ok(Some(head)),
                Ok(None) if b.read.pending().len() > limits.max_header_bytes => {
                    return refuse(site, conn, b, Refusal::HeadersTooLarge).await;
                }
                Ok(None) => {}
                Err(r) => return refuse(site, conn, b, r).await,
            }
        }
        // Responses to pipelined requests go out before we wait for more input.
        flush(site, conn, &mut b.out).await?;
        let idle = b.read.pending().is_empty();
        // A stop closes connections between two requests; one that has not sent its first
        // request yet (from the listen backlog) is read and answered.
        if idle && b.served > 0 && site.close_idle() {
            return Ok(None);
        }
        // Waiting between two requests is idle (keep-alive timeout); a connection that has
        // sent nothing yet is reading its first head (header timeout), silent or not.
        let phase = if idle && b.served > 0 {
            Phase::Idle
        } else {
            Phase::ReadingHead
        };
        conn.set_phase(phase, site.now());
        if idle {
            // Between requests the socket is almost always drained: wait for readiness
            // instead of a read that would fail with EAGAIN (a syscall per request).
            // Meanwhile an idle worker may take the connection over (see `steal`).
            conn.claim.park();
            let ready = conn.stream.readable().await;
            if !conn.claim.hold() {
                return Ok(None);
            }
            ready?;
        }
        let n = read_some(&conn.stream, &mut b.read).await?;
        // A cut (the sweeper's timeout) shuts the socket for reading, but bytes that were
        // already on their way can still be read after it: the timeout stands all the same.
        if n == 0 || conn.expired() {
            if conn.timed_out() && !b.read.pending().is_empty() {
                return refuse(site, conn, b, Refusal::Timeout).await;
            }
            return Ok(None);
        }
        if conn.phase() == Phase::Idle {
            conn.set_phase(Phase::ReadingHead, site.now());
        }
    }
}

/// Reads the body the head announces. `None` when the connection is done (refused, cut).
async fn read_body<S: Site>(
    site: &S,
    conn: &Conn,
    b: &mut Buffers,
    head: &Head,
    limits: &Limits,
) -> io::Result<Option<Body>> {
    // `100 Continue` only for a request that has somewhere to go: the 404 or 405 goes out
    // before the body is sent.
    if head.expect_continue && head.body != BodyKind::None && !has_route(site, b, head) {
        return Ok(Some(Body::Unread));
    }
    match head.body {
        BodyKind::None => Ok(Some(Body::InPlace(0))),
        BodyKind::Length(n) if n > limits.max_body_bytes => {
            refuse(site, conn, b, Refusal::TooLarge).await
        }
        BodyKind::Length(n) => read_length(site, conn, b, head, n).await,
        BodyKind::Chunked => {
            if head.expect_continue {
                send_continue(site, conn, &mut b.out).await?;
            }
            conn.set_phase(Phase::ReadingBody, site.now());
            let max = limits.max_body_bytes;
            let (read, mut input) = (&mut b.read, &conn.stream);
            let chunked = read_chunked(&mut input, read, &mut b.body, head.len, max, &mut b.budget);
            match chunked.await {
                Ok(Ok(())) => Ok(Some(Body::Apart)),
                Ok(Err(r)) => {
                    if r == Refusal::Busy {
                        site.body_refused();
                    }
                    refuse(site, conn, b, r).await
                }
                // The input ended inside the body: a timeout gets its 408.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => body_cut(site, conn, b).await,
                Err(e) => Err(e),
            }
        }
    }
}

/// Reads a body of `n` bytes: behind the head in the read buffer when it fits there,
/// otherwise into `b.body`.
async fn read_length<S: Site>(
    site: &S,
    conn: &Conn,
    b: &mut Buffers,
    head: &Head,
    n: usize,
) -> io::Result<Option<Body>> {
    let have = b.read.pending().len() - head.len;
    if head.expect_continue && have < n {
        send_continue(site, conn, &mut b.out).await?;
    }
    if b.read.fit(head.len + n) {
        while b.read.pending().len() < head.len + n {
            conn.set_phase(Phase::ReadingBody, site.now());
            if read_some(&conn.stream, &mut b.read).await? == 0 {
                return body_cut(site, conn, b).await;
            }
        }
        return Ok(Some(Body::InPlace(n)));
    }
    // Too large for the read buffer: it counts against the server-wide budget, and its
    // memory grows with the bytes that arrive, not with what the header announced.
    if !b.budget.take(n) {
        site.body_refused();
        return refuse(site, conn, b, Refusal::Busy).await;
    }
    b.body.clear();
    b.body.extend_from_slice(&b.read.pending()[head.len..]);
    b.read.truncate(head.len);
    conn.set_phase(Phase::ReadingBody, site.now());
    if !read_into(&conn.stream, &mut b.body, n).await? {
        return body_cut(site, conn, b).await;
    }
    Ok(Some(Body::Apart))
}

/// Routes the request, runs the plugins (or answers the upgrade), and writes the response
/// into `b.out`.
fn respond<'a, S: Site>(
    site: &'a S,
    conn: &Conn,
    peer: &str,
    b: &mut Buffers,
    head: &Head,
    body: Body,
) -> Next<'a, S> {
    site.with_router(|router| {
        let buf = b.read.pending();
        let body: &[u8] = match body {
            Body::InPlace(n) => &buf[head.len..head.len + n],
            Body::Apart => &b.body,
            Body::Unread => &[],
        };
        let path = if b.normalized {
            b.path.as_str()
        } else {
            text(buf, head.path)
        };
        let method = text(buf, head.method);
        let (route, pattern) = router.find_route(method, path, &mut b.params);
        let ws = head.upgrade.then(|| site.ws_route(path)).flatten();
        // An upgrade's route is its WebSocket route (rare: a copy does no harm).
        let ws_route = ws.as_ref().map(|ws| ws.route.clone());
        let pattern = ws_route.as_deref().unwrap_or(pattern);
        decode_params(path, &b.params, &mut b.param_text, &mut b.param_ranges);
        let mut headers: Vec<Header<'_>> = recycle(std::mem::take(&mut b.headers));
        headers.extend(b.header_pos.iter().map(|h| Header {
            name: RStr::from_str(text(buf, h.name)),
            value: RSlice::from_slice(slice(buf, h.value)),
        }));
        let mut params: Vec<Param<'_>> = recycle(std::mem::take(&mut b.param_views));
        params.extend(b.params.iter().zip(&b.param_ranges).map(|(p, decoded)| {
            let value = match decoded {
                Some((start, end)) => &b.param_text[*start as usize..*end as usize],
                None => &path[p.start as usize..(p.start + p.len) as usize],
            };
            Param {
                name: RStr::from_str(router.param_name(p)),
                value: RStr::from_str(value),
            }
        }));
        let req = Request {
            method: RStr::from_str(method),
            path: RStr::from_str(path),
            query: RStr::from_str(text(buf, head.query)),
            target: RStr::from_str(text(buf, head.target)),
            version: head.version,
            headers: RSlice::from_slice(&headers),
            params: RSlice::from_slice(&params),
            body: RSlice::from_slice(body),
            peer: RStr::from_str(peer),
            conn_id: conn.id,
            worker_id: site.id(),
            route: RStr::from_str(pattern),
        };
        let next = match ws {
            Some(ws) => upgrade(site, conn, head, buf, &req, ws, &mut b.resp, &mut b.out),
            None => run_plugins(site, &req, &route, head, &mut b.resp, &mut b.out),
        };
        b.headers = recycle(headers);
        b.param_views = recycle(params);
        next
    })
}

/// Answers a GET or HEAD from the static folder when it has a file for the path (before
/// the routes, or when none matches). `Some(close)` when it answered; `None`: the routes
/// answer.
async fn serve_static<S: Site>(
    site: &S,
    conn: &Conn,
    b: &mut Buffers,
    head: &Head,
) -> io::Result<Option<bool>> {
    let buf = b.read.pending();
    // Most servers have no `static` section: they pay one look at the plan, no more.
    let get = head.is_head || slice(buf, head.method) == b"GET";
    if head.upgrade || !get || !site.with_statics(|statics, _, _| statics.is_some()) {
        return Ok(None);
    }
    let method = text(buf, head.method);
    let path = if b.normalized {
        b.path.as_str()
    } else {
        text(buf, head.path)
    };
    let (lines, name, params) = (&mut b.static_head, &mut b.static_name, &mut b.params);
    let found = site.with_statics(|statics, router, cache| {
        let statics = statics?;
        if !statics.before_routes && !matches!(router.find(method, path, params), Match::NotFound) {
            return None;
        }
        let mut ask = Ask::default();
        for h in &b.header_pos {
            ask.note(slice(buf, h.name), slice(buf, h.value));
        }
        Some(statics.lookup(path, &ask, lines, name, cache))
    });
    let close = !head.keep_alive || site.draining();
    let framing = Framing {
        version: head.version,
        is_head: head.is_head,
        close,
        asked_keep_alive: head.keep_alive,
    };
    let reply = match found {
        None | Some(Found::NotHere) => return Ok(None),
        Some(Found::Folder) => {
            // `/docs` is a folder: `/docs/`, so that its index's relative links work.
            lines.clear();
            lines.extend_from_slice(b"location: ");
            lines.extend_from_slice(path.as_bytes());
            lines.push(b'/');
            if head.query.1 > 0 {
                lines.push(b'?');
                lines.extend_from_slice(slice(buf, head.query));
            }
            lines.extend_from_slice(b"\r\n");
            site.with_date(|d| write_head(&mut b.out, 301, lines, Some(0), framing, d));
            site.count_static(None);
            return Ok(Some(close));
        }
        Some(Found::Reply(reply)) => reply,
    };
    site.with_date(|d| write_head(&mut b.out, reply.status, lines, reply.length, framing, d));
    let sent = match reply.body {
        Some((statics::Body::Memory(bytes), offset)) if !head.is_head => {
            let (start, len) = (offset as usize, reply.length.unwrap_or(0) as usize);
            b.out.extend_from_slice(&bytes[start..start + len]);
            None
        }
        Some((statics::Body::File(file), offset)) if !head.is_head => {
            let len = reply.length.unwrap_or(0);
            send_body(site, conn, &mut b.out, &file, offset, len).await?
        }
        _ => None,
    };
    site.count_static(sent);
    Ok(Some(close))
}

/// Sends `len` bytes of a static file from `offset`, after the head in `out`: a small body
/// is copied behind it; a large one follows it with sendfile. Returns the bytes sent with
/// sendfile. The send timeout counts from the last progress, so a large file to a slow but
/// reading client is not cut, and one that reads nothing is.
async fn send_body<S: Site>(
    site: &S,
    conn: &Conn,
    out: &mut Vec<u8>,
    file: &File,
    offset: u64,
    len: u64,
) -> io::Result<Option<u64>> {
    if len <= COPY_MAX {
        let start = out.len();
        out.resize(start + len as usize, 0);
        return file.read_exact_at(&mut out[start..], offset).map(|()| None);
    }
    conn.set_phase(Phase::Writing, site.now());
    send_head(&conn.stream, out).await?;
    send_file(&conn.stream, file, offset, len, || conn.touch(site.now())).await?;
    Ok(Some(len))
}

/// Percent-decodes the values of the captured parameters into `text`; `ranges` says, per
/// parameter, where its decoded value is (`None`: the value as it stands in the path).
fn decode_params(
    path: &str,
    params: &[ParamPos],
    text: &mut String,
    ranges: &mut Vec<Option<(u32, u32)>>,
) {
    text.clear();
    ranges.clear();
    for p in params {
        let value = &path[p.start as usize..(p.start + p.len) as usize];
        let start = text.len();
        let decoded = decode_param(value, text);
        ranges.push(decoded.then_some((start as u32, text.len() as u32)));
        if ranges.last() == Some(&None) {
            text.truncate(start);
        }
    }
}

/// Whether the request's path and method lead to a handler (or a WebSocket route).
fn has_route<S: Site>(site: &S, b: &mut Buffers, head: &Head) -> bool {
    let buf = b.read.pending();
    let method = text(buf, head.method);
    let path = if b.normalized {
        b.path.as_str()
    } else {
        text(buf, head.path)
    };
    let params = &mut b.params;
    site.with_router(|router| matches!(router.find(method, path, params), Match::Found(_)))
        || (head.upgrade && site.ws_route(path).is_some())
}

/// Runs the plugins for a request and writes their response; decides keep-alive.
fn run_plugins<'a, S: Site>(
    site: &'a S,
    req: &Request<'_>,
    route: &Match,
    head: &Head,
    resp: &mut Response,
    out: &mut Vec<u8>,
) -> Next<'a, S> {
    let arming = plugin::deferred::arm(req.conn_id);
    let context = plugin::context::open();
    site.dispatch(req, route, resp);
    drop(context);
    if let Some(waiting) = arming.take() {
        return Next::Deferred(Box::new(Deferred {
            waiting,
            version: head.version,
            is_head: head.is_head,
            keep_alive: head.keep_alive,
            extra_head: resp.head_bytes().to_vec(),
        }));
    }
    let close = closes(site, resp, head.keep_alive);
    let framing = Framing {
        version: head.version,
        is_head: head.is_head,
        close,
        asked_keep_alive: head.keep_alive,
    };
    site.with_date(|d| write_response(out, resp, framing, d));
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Whether the connection closes after `resp`: the client did not ask to keep it, the
/// server is draining, or the plugin said `connection: close`.
pub(super) fn closes<S: Site>(site: &S, resp: &Response, keep_alive: bool) -> bool {
    let plugin_close = connection_header(resp.head_bytes())
        .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"close"));
    !keep_alive || site.draining() || plugin_close
}

/// Reuses a vector's allocation for borrowed views of another lifetime.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter().map(|_| unreachable!()).collect()
}

/// Answers an upgrade request on a WebSocket route: 101 and `on_open`, or the refusal.
#[allow(clippy::too_many_arguments)]
fn upgrade<'a, S: Site>(
    site: &'a S,
    conn: &Conn,
    head: &Head,
    buf: &[u8],
    req: &Request<'_>,
    ws: Binding,
    resp: &mut Response,
    out: &mut Vec<u8>,
) -> Next<'a, S> {
    let settings = site.ws_settings();
    let key = match head.ws_key {
        Some(k) if head.ws_version_ok && head.version == HttpVersion::Http11 => slice(buf, k),
        _ => {
            resp.reset();
            resp.text(400, "bad websocket upgrade: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 are required\n")
                .set_header("sec-websocket-version", "13");
            site.with_date(|d| write_response(out, resp, Framing::closing(head.version), d));
            return Next::Close;
        }
    };
    if site.connections().count() >= settings.max_connections {
        resp.reset();
        resp.text(503, "too many websocket connections\n");
        site.with_date(|d| write_response(out, resp, Framing::closing(head.version), d));
        return Next::Close;
    }
    if !site.ws_handshake(req, &ws, resp) {
        let framing = Framing {
            version: head.version,
            is_head: head.is_head,
            close: !head.keep_alive,
            asked_keep_alive: head.keep_alive,
        };
        site.with_date(|d| write_response(out, resp, framing, d));
        return if head.keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        };
    }
    // A handler that answers the extension header itself negotiates alone.
    let deflate = match resp.get_header("sec-websocket-extensions") {
        Some(_) => None,
        None => deflate::negotiate(extension_offers(req), &settings.deflate),
    };
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
    out.extend_from_slice(derive_accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(agreed) = &deflate {
        out.extend_from_slice(b"sec-websocket-extensions: ");
        out.extend_from_slice(agreed.response().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(resp.head_bytes());
    out.extend_from_slice(b"\r\n");
    let (session, mailbox) = ws::open(site, conn.id, ws, req, deflate);
    Next::Upgrade(session, mailbox)
}

/// The values of the request's `Sec-WebSocket-Extensions` headers.
fn extension_offers<'r>(req: &'r Request<'_>) -> impl Iterator<Item = &'r str> {
    req.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .filter_map(|h| h.value_str())
}

/// Sends the 101 and serves the connection as a WebSocket until it closes. If the 101
/// cannot be written, dropping the session unregisters the connection.
async fn switch_to_websocket<S: Site>(
    session: Session<'_, S>,
    conn: &Conn,
    b: &mut Buffers,
    head_len: usize,
    mailbox: std::sync::Arc<Mailbox>,
) -> io::Result<()> {
    conn.leave_lobby();
    flush(session.site(), conn, &mut b.out).await?;
    // Bytes past the head already belong to the WebSocket.
    let part = b.read.pending()[head_len..].to_vec();
    // The HTTP buffers are not needed any more: a WebSocket may stay open for days.
    b.release();
    ws::serve(session, conn, part, mailbox).await;
    Ok(())
}

/// Writes what is buffered in `out`; a client that does not take it within
/// `limits.send_timeout_ms` is cut off by the sweeper.
pub(super) async fn flush<S: Site>(site: &S, conn: &Conn, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        conn.set_phase(Phase::Writing, site.now());
        (&conn.stream).write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Writes what is buffered, then `100 Continue`.
async fn send_continue<S: Site>(site: &S, conn: &Conn, out: &mut Vec<u8>) -> io::Result<()> {
    flush(site, conn, out).await?;
    (&conn.stream)
        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        .await
}

/// The input ended inside a body: a timeout gets its 408, a client that left gets nothing.
async fn body_cut<S: Site, T>(site: &S, conn: &Conn, b: &mut Buffers) -> io::Result<Option<T>> {
    if conn.timed_out() {
        refuse(site, conn, b, Refusal::Timeout).await
    } else {
        Ok(None)
    }
}

/// Answers a refused request and closes: write, half-close, then read and drop what the
/// client still sends for a moment, so our answer is not lost to a reset. Always `None`: the
/// connection is done.
async fn refuse<S: Site, T>(
    site: &S,
    conn: &Conn,
    b: &mut Buffers,
    r: Refusal,
) -> io::Result<Option<T>> {
    let (status, text) = r.status();
    log::debug!("connection {}: answering {status} {text}", conn.id);
    let version = b.version;
    site.with_date(|d| write_refusal(&mut b.out, r, version, d));
    flush(site, conn, &mut b.out).await?;
    let _ = conn.stream.get_ref().shutdown(Shutdown::Write);
    linger(&conn.stream).await;
    Ok(None)
}

async fn linger(stream: &Async<TcpStream>) {
    let drain = async {
        // On the heap: an array here would make every connection's task 4 KiB larger.
        let mut scratch = vec![0u8; 4096];
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
