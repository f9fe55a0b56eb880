//! Deferred and streamed responses: a handler that must wait (a database, another service)
//! defers its response with [`Host::defer`](crate::Host::defer) and returns at once; its
//! worker serves other requests meanwhile. Any thread completes the response later, or
//! streams it (Server-Sent Events, for instance), through the [`ResponseHandle`].
//!
//! The handle is a token and the host handle: the response lives in the server, not in the
//! plugin, so it outlives a hot reload of the plugin, and a token can travel in a task's
//! payload to a task worker, which resumes it with [`Host::resume`](crate::Host::resume).

use abi_stable::std_types::RResult;

use crate::{
    abi::{DeferOp, HostBox},
    http::Response,
};

/// The deferred response can take nothing more: the client went away, it timed out, it was
/// already completed (or dropped), or the server is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the deferred response is closed (client gone, timed out, or already done)")
    }
}

impl std::error::Error for Closed {}

/// A response that finishes later, from any thread (`Send + 'static`).
///
/// Complete it once with [`complete`](Self::complete), or stream it with
/// [`start`](Self::start), [`write_chunk`](Self::write_chunk) and [`finish`](Self::finish).
/// Dropped before that, the client gets a `500` (a stream already started is cut short); not
/// done within `limits.defer_timeout_ms`, a `504`. [`into_token`](Self::into_token) lets the
/// response go on without this handle, for [`Host::resume`](crate::Host::resume) elsewhere.
pub struct ResponseHandle {
    ffi: HostBox,
    token: u64,
    /// Completed, finished, or given away as a token: dropping does nothing.
    done: bool,
}

impl std::fmt::Debug for ResponseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseHandle")
            .field("token", &self.token)
            .field("done", &self.done)
            .finish()
    }
}

impl ResponseHandle {
    pub(crate) fn new(ffi: HostBox, token: u64) -> ResponseHandle {
        ResponseHandle {
            ffi,
            token,
            done: false,
        }
    }

    fn op(&self, op: DeferOp<'_>) -> Result<(), Closed> {
        match self.ffi.deferred(self.token, op) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(_) => Err(Closed),
        }
    }

    /// The response's token: unique for the server process's life.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Lets the response go on without this handle (dropping it then does nothing), and
    /// returns its token: put it in a task's payload, and resume it there with
    /// [`Host::resume`](crate::Host::resume). If nobody does, the client gets a `504` after
    /// `limits.defer_timeout_ms`.
    pub fn into_token(mut self) -> u64 {
        self.done = true;
        self.token
    }

    /// Answers with `resp` (status, headers and body), as a handler would have.
    pub fn complete(mut self, resp: &Response) -> Result<(), Closed> {
        self.done = true;
        self.op(DeferOp::Complete(resp))
    }

    /// Starts a streamed response with the status and headers of `resp` (its body, if any,
    /// is the first chunk). HTTP/1.1 clients get it chunked; HTTP/1.0 clients until the
    /// connection closes.
    pub fn start(&mut self, resp: &Response) -> Result<(), Closed> {
        self.op(DeferOp::Start(resp))
    }

    /// Sends `data` as the next part of a streamed response (starting it as a `200` with no
    /// headers if [`start`](Self::start) was not called). `Err(Closed)` once the client went
    /// away: stop producing.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<(), Closed> {
        if data.is_empty() {
            return self.op(DeferOp::Check);
        }
        self.op(DeferOp::Write(data.into()))
    }

    /// Ends a streamed response (an empty `200` if it never started).
    pub fn finish(mut self) -> Result<(), Closed> {
        self.done = true;
        self.op(DeferOp::Finish)
    }

    /// Whether the response can take nothing more (the client went away, it timed out or
    /// it is done).
    pub fn is_closed(&self) -> bool {
        self.done || self.op(DeferOp::Check).is_err()
    }
}

impl Drop for ResponseHandle {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.op(DeferOp::Drop);
        }
    }
}
