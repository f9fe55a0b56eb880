//! Answering a deferred request: the connection waits for its response without holding the
//! worker (the handler returned; other connections run meanwhile), then writes it whole or
//! streams it, chunked for HTTP/1.1 and close-delimited for HTTP/1.0. While it waits it
//! keeps reading, so that a client that goes away closes the response (its handles then
//! report `Closed`), and pipelined requests behind it are kept, in order, for afterwards.
//!
//! `limits.defer_timeout_ms` bounds the wait for the response (`504`) and, once a stream
//! started, the silence between two of its chunks (the stream is cut). A handle dropped
//! unfinished answers `500`, or cuts a stream short; a stream whose client reads too slowly
//! (`MAX_QUEUED` bytes waiting) is closed. A stop gives a waiting response until shortly
//! before `max_wait_time` runs out, then answers `503`; it ends a started stream at once
//! (with its last chunk), since a stream such as Server-Sent Events may never end.

use std::{io, time::Duration};

use futures_lite::future;
use plughost_plugin_api::{HttpVersion, Response};

use super::{
    body::{read_some, ReadBuf},
    conn::{closes, flush, Site},
    write::{no_body, push_chunk, write_response, write_stream_head, Framing, LAST_CHUNK},
};
use crate::{
    plugin::deferred::{Ended, Event, Parts, Waiting},
    runtime::{
        conn::{Conn, Phase},
        reactor::Timer,
    },
};

/// A request whose plugins deferred its response.
#[derive(Debug)]
pub struct Deferred {
    /// The connection's end of the response.
    pub waiting: Waiting,
    /// The request's version.
    pub version: HttpVersion,
    /// A HEAD request: the head only.
    pub is_head: bool,
    /// The request asked for keep-alive.
    pub keep_alive: bool,
    /// The headers the handler and middleware left on the response they returned: they go
    /// out with the deferred response, unless it sets the same ones.
    pub extra_head: Vec<u8>,
}

/// What ended a wait.
enum Woke {
    Event(Event),
    /// The client closed or reset the connection (or a stop cut its read side).
    Gone,
    Timeout,
}

/// Waits for the response of `d` and writes it. Returns whether the connection closes.
pub async fn answer<S: Site>(
    site: &S,
    conn: &Conn,
    read: &mut ReadBuf,
    out: &mut Vec<u8>,
    resp: &mut Response,
    d: Deferred,
) -> io::Result<bool> {
    // Responses to the requests before this one go out first.
    flush(site, conn, out).await?;
    conn.set_phase(Phase::Deferred, site.now());
    let token = d.waiting.token();
    let timeout = Duration::from_millis(site.limits().defer_timeout_ms);
    let (parts, how) = match wake(conn, read, &d.waiting, timeout).await {
        Woke::Event(Event::Complete(parts)) => (parts, Ended::Answered),
        Woke::Event(Event::Start(parts)) => {
            return stream(site, conn, read, out, resp, d, parts).await
        }
        Woke::Event(Event::Finish) => (
            Parts {
                status: 200,
                ..Parts::default()
            },
            Ended::Answered,
        ),
        // Chunks (and so an overflow) arrive only after a start.
        Woke::Event(Event::Dropped | Event::Chunk(_) | Event::Overflow) => {
            log::warn!(
                "deferred response {token}: its handle was dropped unfinished; answering 500"
            );
            (plain(500, "internal server error\n"), Ended::Dropped)
        }
        Woke::Timeout => {
            log::warn!("deferred response {token}: not answered within {timeout:?}; answering 504");
            let text = "gateway timeout: the deferred response did not come in time\n";
            (plain(504, text), Ended::TimedOut)
        }
        Woke::Gone if stopping(site, conn) => {
            let text = "service unavailable: the server is stopping\n";
            (plain(503, text), Ended::Stopped)
        }
        Woke::Gone => {
            log::debug!("deferred response {token}: the client went away");
            d.waiting.end(Ended::ClientGone);
            return Ok(true);
        }
    };
    // The wait is over: from here on every handle reports `Closed`.
    d.waiting.end(how);
    fill(resp, &parts, &d.extra_head);
    resp.set_body(&parts.body);
    let close = closes(site, resp, d.keep_alive) || stopping(site, conn);
    let framing = Framing {
        version: d.version,
        is_head: d.is_head,
        close,
        asked_keep_alive: d.keep_alive,
    };
    site.with_date(|date| write_response(out, resp, framing, date));
    flush(site, conn, out).await?;
    Ok(close)
}

/// How a stream's body goes out.
#[derive(Debug, Clone, Copy)]
struct Body {
    /// Not for HEAD or a status without a body.
    sent: bool,
    /// HTTP/1.0: raw bytes until the connection closes, no chunks.
    raw: bool,
}

impl Body {
    fn chunk(self, out: &mut Vec<u8>, data: &[u8]) {
        match (self.sent, self.raw) {
            (false, _) => {}
            (true, true) => out.extend_from_slice(data),
            (true, false) => push_chunk(out, data),
        }
    }

    fn end(self, out: &mut Vec<u8>) {
        if self.sent && !self.raw {
            out.extend_from_slice(LAST_CHUNK);
        }
    }
}

/// Writes the head of a stream (and its first bytes) into `out`. Returns how its body goes
/// out, and whether the connection closes after it.
fn open_stream<S: Site>(
    site: &S,
    resp: &mut Response,
    d: &Deferred,
    parts: &Parts,
    out: &mut Vec<u8>,
) -> (Body, bool) {
    fill(resp, parts, &d.extra_head);
    let raw = d.version == HttpVersion::Http10;
    // HTTP/1.0 has no chunks: the body ends with the connection.
    let close = raw || closes(site, resp, d.keep_alive);
    let framing = Framing {
        version: d.version,
        is_head: d.is_head,
        close,
        asked_keep_alive: d.keep_alive,
    };
    site.with_date(|date| write_stream_head(out, resp, framing, date));
    let body = Body {
        sent: !d.is_head && !no_body(parts.status),
        raw,
    };
    body.chunk(out, &parts.body);
    (body, close)
}

/// Writes a streamed response as its chunks come. Returns whether the connection closes.
async fn stream<S: Site>(
    site: &S,
    conn: &Conn,
    read: &mut ReadBuf,
    out: &mut Vec<u8>,
    resp: &mut Response,
    d: Deferred,
    parts: Parts,
) -> io::Result<bool> {
    let token = d.waiting.token();
    let (body, close) = open_stream(site, resp, &d, &parts, out);
    let idle = Duration::from_millis(site.limits().defer_timeout_ms);
    loop {
        flush(site, conn, out).await?;
        conn.set_phase(Phase::Streaming, site.now());
        let mut event = match wake(conn, read, &d.waiting, idle).await {
            Woke::Event(e) => e,
            Woke::Gone if stopping(site, conn) => Event::Finish,
            Woke::Gone => {
                log::debug!("streamed response {token}: the client went away");
                d.waiting.end(Ended::ClientGone);
                return Ok(true);
            }
            Woke::Timeout => {
                log::warn!("streamed response {token}: nothing sent for {idle:?}; cutting it");
                d.waiting.end(Ended::TimedOut);
                return Ok(true);
            }
        };
        // Whatever else is queued goes out in the same write.
        loop {
            let ended = match event {
                Event::Chunk(data) => {
                    body.chunk(out, &data);
                    None
                }
                Event::Finish => {
                    body.end(out);
                    let stopped = stopping(site, conn);
                    Some((
                        if stopped {
                            Ended::Stopped
                        } else {
                            Ended::Answered
                        },
                        close || stopped,
                    ))
                }
                Event::Dropped => {
                    log::warn!(
                        "streamed response {token}: its handle was dropped unfinished; cutting it"
                    );
                    Some((Ended::Dropped, true))
                }
                Event::Overflow => {
                    log::warn!("streamed response {token}: the client reads too slowly; closing");
                    out.clear();
                    Some((Ended::ClientGone, true))
                }
                // The registry allows neither after a start.
                Event::Start(_) | Event::Complete(_) => None,
            };
            if let Some((how, close)) = ended {
                d.waiting.end(how);
                flush(site, conn, out).await?;
                return Ok(close);
            }
            if out.len() >= 64 * 1024 {
                break;
            }
            match d.waiting.try_recv() {
                Some(next) => event = next,
                None => break,
            }
        }
    }
}

/// The next event of `waiting`, the client's leaving, or the timeout, whichever comes first.
async fn wake(conn: &Conn, read: &mut ReadBuf, waiting: &Waiting, timeout: Duration) -> Woke {
    let event = async { Woke::Event(waiting.recv().await) };
    let gone = async {
        watch_client(conn, read).await;
        Woke::Gone
    };
    let timer = async {
        Timer::after(timeout).await;
        Woke::Timeout
    };
    future::or(event, future::or(gone, timer)).await
}

/// Returns once the client closed or reset the connection. Bytes it sends meanwhile (the
/// next pipelined requests) are kept in `read`; once that is full, it watches no more.
async fn watch_client(conn: &Conn, read: &mut ReadBuf) {
    loop {
        if read.is_full() {
            return future::pending().await;
        }
        match read_some(&conn.stream, read).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A stop cut the connection's read side while it waited (see the worker's stop).
fn stopping<S: Site>(site: &S, conn: &Conn) -> bool {
    site.draining() && conn.timed_out()
}

/// A plain-text answer of the server's own.
fn plain(status: u16, text: &str) -> Parts {
    Parts {
        status,
        head: b"content-type: text/plain; charset=utf-8\r\n".to_vec(),
        body: text.as_bytes().to_vec(),
    }
}

/// Puts the status and headers of `parts` into `resp`, then the `extra` headers it does not
/// set itself.
fn fill(resp: &mut Response, parts: &Parts, extra: &[u8]) {
    resp.reset();
    resp.set_status(parts.status);
    let lines = |head: &[u8]| -> Vec<(String, String)> {
        String::from_utf8_lossy(head)
            .split_terminator("\r\n")
            .filter_map(|l| l.split_once(": "))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    };
    let own = lines(&parts.head);
    for (name, value) in &own {
        resp.header(name, value);
    }
    for (name, value) in lines(extra) {
        if !own.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            resp.header(&name, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deferred_headers_win_over_the_ones_left_on_the_placeholder() {
        let mut resp = Response::new();
        let parts = Parts {
            status: 201,
            head: b"content-type: text/plain\r\nx-a: 1\r\n".to_vec(),
            body: Vec::new(),
        };
        fill(
            &mut resp,
            &parts,
            b"X-A: old\r\nx-timing: 3\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n",
        );
        assert_eq!(resp.status(), 201);
        assert_eq!(
            resp.headers().collect::<Vec<_>>(),
            [
                ("content-type", "text/plain"),
                ("x-a", "1"),
                ("x-timing", "3"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2")
            ]
        );
    }
}
