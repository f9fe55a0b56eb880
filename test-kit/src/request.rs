//! Requests a test builds and the responses it reads.

use abi_stable::std_types::{RSlice, RStr};
use plughost_plugin_api::{Header, HttpVersion, Param, Request, Response};

/// A request to send to an HTTP handler, middleware or WebSocket handshake.
#[derive(Debug, Clone)]
pub struct TestRequest {
    method: String,
    path: String,
    query: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    params: Vec<(String, String)>,
    body: Vec<u8>,
    peer: String,
    conn: u64,
    route: String,
}

impl TestRequest {
    /// `method target`, where the target is a path with an optional `?query`.
    pub fn new(method: &str, target: &str) -> TestRequest {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        TestRequest {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            target: target.into(),
            headers: Vec::new(),
            params: Vec::new(),
            body: Vec::new(),
            peer: "127.0.0.1:40000".into(),
            conn: 1,
            route: String::new(),
        }
    }

    /// A GET request.
    pub fn get(target: &str) -> TestRequest {
        TestRequest::new("GET", target)
    }

    /// A POST request with `body`.
    pub fn post(target: &str, body: impl AsRef<[u8]>) -> TestRequest {
        TestRequest::new("POST", target).body(body)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> TestRequest {
        self.headers.push((name.into(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl AsRef<[u8]>) -> TestRequest {
        self.body = body.as_ref().to_vec();
        self
    }

    /// Sets a path parameter, as a route such as `/hello/{name}` would capture it.
    pub fn param(mut self, name: &str, value: &str) -> TestRequest {
        self.params.push((name.into(), value.into()));
        self
    }

    /// The client's address (default `127.0.0.1:40000`).
    pub fn peer(mut self, peer: &str) -> TestRequest {
        self.peer = peer.into();
        self
    }

    /// The connection id (default 1).
    pub fn conn(mut self, conn: u64) -> TestRequest {
        self.conn = conn;
        self
    }

    /// Matches the path against a route pattern (`/hello/{name}`): sets the route and the
    /// parameters it captures. A path that does not match keeps its parameters.
    pub(crate) fn routed(mut self, pattern: Option<&str>) -> TestRequest {
        let Some(pattern) = pattern else {
            return self;
        };
        let (p, s): (Vec<&str>, Vec<&str>) =
            (pattern.split('/').collect(), self.path.split('/').collect());
        if p.len() != s.len() {
            return self;
        }
        let mut captured = Vec::new();
        for (p, s) in p.iter().zip(&s) {
            match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) => captured.push((name.to_owned(), (*s).to_owned())),
                None if p == s => {}
                None => return self,
            }
        }
        self.route = pattern.into();
        self.params.extend(captured);
        self
    }

    /// Runs `f` with the request as a plugin sees it, on worker `worker`.
    pub(crate) fn with<R>(&self, worker: u32, f: impl FnOnce(&Request<'_>) -> R) -> R {
        let headers: Vec<Header<'_>> = self
            .headers
            .iter()
            .map(|(n, v)| Header {
                name: RStr::from_str(n),
                value: RSlice::from_slice(v),
            })
            .collect();
        let params: Vec<Param<'_>> = self
            .params
            .iter()
            .map(|(n, v)| Param {
                name: RStr::from_str(n),
                value: RStr::from_str(v),
            })
            .collect();
        f(&Request {
            method: RStr::from_str(&self.method),
            path: RStr::from_str(&self.path),
            query: RStr::from_str(&self.query),
            target: RStr::from_str(&self.target),
            version: HttpVersion::Http11,
            headers: RSlice::from_slice(&headers),
            params: RSlice::from_slice(&params),
            body: RSlice::from_slice(&self.body),
            peer: RStr::from_str(&self.peer),
            conn_id: self.conn,
            worker_id: worker,
            route: RStr::from_str(&self.route),
        })
    }
}

/// What a handler answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResponse {
    /// The status code (500 when the handler panicked or failed).
    pub status: u16,
    /// The headers the handler set, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Why the call failed (a panic's message), when it did.
    pub error: Option<String>,
}

impl TestResponse {
    pub(crate) fn of(resp: &Response, error: Option<String>) -> TestResponse {
        TestResponse {
            status: if error.is_some() { 500 } else { resp.status() },
            headers: resp
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            body: resp.body().to_vec(),
            error,
        }
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
