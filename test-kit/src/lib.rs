//! plughost-test: unit tests for plughost plugins, without a server or a `.so`.
//!
//! A [`Harness`] takes the plugin's builder function (the one `export_plugin!` names),
//! instantiates its components in the test's own process, on the test's thread, as a worker
//! would, and hands them requests, WebSocket events, tasks, events, cron ticks and socket
//! frames. What the plugin asks of the host is recorded instead of done — pushes,
//! broadcasts, tasks delivered, events fired, socket sends, log lines — and read back with
//! [`Harness::recorded`] or [`Harness::take`]. Tables and counters are the server's own,
//! declared as in `server.ron`; `host.env` answers what [`Harness::env`] set, then the
//! process environment.
//!
//! ```ignore
//! // In the plugin's src/lib.rs, beside `fn plugin() -> Plugin` and `export_plugin!(plugin);`
//! #[cfg(test)]
//! mod tests {
//!     use plughost_test::{Harness, TestRequest};
//!
//!     #[test]
//!     fn greets_by_name() {
//!         let h = Harness::new(super::plugin());
//!         let mut hello = h.http("hello").route("/hello/{name}");
//!         let resp = hello.request(TestRequest::get("/hello/ada"));
//!         assert_eq!(resp.status, 200);
//!         assert_eq!(resp.text(), "hello, ada!\n");
//!     }
//! }
//! ```

mod host;
mod request;

use std::{
    collections::BTreeMap,
    sync::{Arc, PoisonError},
};

use abi_stable::std_types::{RResult, RSlice, RStr};
use plughost_plugin_api::{
    abi::{
        Component, ComponentKind, CronJobBox, EventListenerBox, Handshake, Message, MiddlewareBox,
        PluginError, Propagation, Schedule, SocketBox, TaskHandlerBox, ThreadKind, WebSocketBox,
        WorkerInfo,
    },
    abi_stable::sabi_trait::TD_Opaque,
    component::Plugin,
    Flow, Response,
};

pub use host::{Broadcast, Deferred, Job, LogLine, Recorded, Sent};
pub use request::{TestRequest, TestResponse};

use host::{Capture, Recorder, State};

/// A plugin loaded in-process for a test.
pub struct Harness {
    plugin: Plugin,
    state: Arc<State>,
    server: plughost::plugin::host::Host,
    configs: BTreeMap<String, String>,
    worker: u32,
}

impl Harness {
    /// The plugin that `build` makes (its `export_plugin!` builder function).
    pub fn new(plugin: Plugin) -> Harness {
        let tables = plughost::table::Tables::new(&BTreeMap::new()).expect("no tables");
        Harness {
            plugin,
            state: Arc::default(),
            server: plughost::plugin::host::Host::new(String::new(), None, Arc::new(tables)),
            configs: BTreeMap::new(),
            worker: 0,
        }
    }

    /// The component `name`'s config, as the RON its `config` entry in `server.ron` holds
    /// (`(greeting: "hi")`).
    pub fn config(mut self, component: &str, ron: &str) -> Harness {
        self.configs.insert(component.into(), ron.into());
        self
    }

    /// `host.env(key)` answers `value`.
    pub fn env(self, key: &str, value: &str) -> Harness {
        let mut env = self
            .state
            .env
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        env.insert(key.into(), value.into());
        drop(env);
        self
    }

    /// Declares tables as `server.ron`'s `tables` does:
    /// `{ "sessions": (size: 100, columns: [(name: "conn", kind: U64)]) }`.
    ///
    /// # Panics
    /// When the text is not a valid `tables` map.
    pub fn tables(mut self, ron: &str) -> Harness {
        let config: BTreeMap<String, plughost::config::TableConfig> =
            ron::from_str(ron).unwrap_or_else(|e| panic!("tables: {e}"));
        let tables =
            plughost::table::Tables::new(&config).unwrap_or_else(|e| panic!("tables: {e}"));
        self.server = plughost::plugin::host::Host::new(String::new(), None, Arc::new(tables));
        self
    }

    /// Only these task handlers exist (`host.deliver` of another is `UnknownTask`); by
    /// default every name is taken.
    pub fn tasks(self, names: &[&str]) -> Harness {
        let mut known = self
            .state
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known.extend(names.iter().map(|n| n.to_string()));
        drop(known);
        self
    }

    /// Only these events have listeners (`host.fire` of another is `UnknownEvent`).
    pub fn events(self, names: &[&str]) -> Harness {
        let mut known = self
            .state
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known.extend(names.iter().map(|n| n.to_string()));
        drop(known);
        self
    }

    /// Instances are made as on worker `id` (default 0).
    pub fn worker(mut self, id: u32) -> Harness {
        self.worker = id;
        self
    }

    /// Forgets the request context (`host.set_context`), which the harness otherwise keeps
    /// across calls, so that a middleware's `on_request` and a handler's `request` share it
    /// as they would for one request.
    pub fn forget_context(&self) {
        self.state
            .context
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// A copy of what the plugin asked of the host so far.
    pub fn recorded(&self) -> Recorded {
        self.state
            .recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the plugin asked of the host so far, forgotten here.
    pub fn take(&self) -> Recorded {
        std::mem::take(
            &mut *self
                .state
                .recorded
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn instantiate(&self, kind: ComponentKind, name: &str, thread: ThreadKind) -> Component {
        let _capture = Capture::enter(&self.state);
        let host = Recorder {
            state: self.state.clone(),
            server: self.server.clone(),
        };
        let boxed = plughost_plugin_api::abi::HostFfi_TO::from_ptr(
            abi_stable::std_types::RArc::new(host),
            TD_Opaque,
        );
        let config = self.configs.get(name).map_or("", String::as_str);
        let worker = WorkerInfo {
            kind: thread,
            id: self.worker,
        };
        match self
            .plugin
            .instantiate(kind, name.into(), config.into(), boxed, worker)
        {
            RResult::ROk(c) => c,
            RResult::RErr(e) => panic!("cannot create {kind} {name:?}: {e}"),
        }
    }

    fn session(&self) -> Session {
        Session {
            state: self.state.clone(),
            worker: self.worker,
        }
    }

    /// An instance of HTTP handler `name`.
    pub fn http(&self, name: &str) -> Http {
        match self.instantiate(ComponentKind::HttpHandler, name, ThreadKind::Worker) {
            Component::HttpHandler(h) => Http {
                h,
                s: self.session(),
                route: None,
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of middleware `name`.
    pub fn middleware(&self, name: &str) -> Middleware {
        match self.instantiate(ComponentKind::Middleware, name, ThreadKind::Worker) {
            Component::Middleware(m) => Middleware {
                m,
                s: self.session(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of WebSocket handler `name`, serving route `route`.
    pub fn websocket(&self, name: &str, route: &str) -> WebSocket {
        match self.instantiate(ComponentKind::WebSocket, name, ThreadKind::Worker) {
            Component::WebSocket(w) => WebSocket {
                w,
                s: self.session(),
                route: route.into(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of task handler `name`, on a task worker.
    pub fn task(&self, name: &str) -> Task {
        match self.instantiate(ComponentKind::TaskHandler, name, ThreadKind::TaskWorker) {
            Component::TaskHandler(t) => Task {
                t,
                s: self.session(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of event listener `name`, on a task worker.
    pub fn listener(&self, name: &str) -> Listener {
        match self.instantiate(ComponentKind::EventListener, name, ThreadKind::TaskWorker) {
            Component::EventListener(l) => Listener {
                l,
                s: self.session(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of cron job `name`, on the timer thread.
    pub fn cron(&self, name: &str) -> Cron {
        match self.instantiate(ComponentKind::CronJob, name, ThreadKind::Timer) {
            Component::CronJob(c) => Cron {
                c,
                s: self.session(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }

    /// An instance of socket handler `name`.
    pub fn socket(&self, name: &str) -> Socket {
        match self.instantiate(ComponentKind::Socket, name, ThreadKind::Worker) {
            Component::Socket(k) => Socket {
                k,
                s: self.session(),
            },
            _ => unreachable!("instantiate gives the kind asked for"),
        }
    }
}

/// What every component handle needs of its harness.
struct Session {
    state: Arc<State>,
    worker: u32,
}

impl Session {
    /// Runs a call into plugin code with its log records captured; `Err` is its failure.
    fn call<T>(&self, f: impl FnOnce() -> RResult<T, PluginError>) -> Result<T, String> {
        let _capture = Capture::enter(&self.state);
        f().into_result().map_err(|e| e.to_string())
    }
}

/// An HTTP handler instance.
pub struct Http {
    h: plughost_plugin_api::abi::HttpHandlerBox,
    s: Session,
    route: Option<String>,
}

impl Http {
    /// Requests are matched against this route pattern (`/hello/{name}`) for their
    /// parameters and `req.route`, as the server's router would.
    pub fn route(mut self, pattern: &str) -> Http {
        self.route = Some(pattern.into());
        self
    }

    /// Sends `req`; a panic or failure answers 500 with the reason in `error`.
    pub fn request(&mut self, req: TestRequest) -> TestResponse {
        let req = req.routed(self.route.as_deref());
        let mut resp = Response::new();
        let h = &mut self.h;
        let result = self
            .s
            .call(|| req.with(self.s.worker, |r| h.handle(r, &mut resp)));
        TestResponse::of(&resp, result.err())
    }

    /// `GET target`.
    pub fn get(&mut self, target: &str) -> TestResponse {
        self.request(TestRequest::get(target))
    }
}

/// A middleware instance.
pub struct Middleware {
    m: MiddlewareBox,
    s: Session,
}

impl Middleware {
    /// `on_request`: `Some(response)` when it answered at once (`Flow::Respond`), `None` when
    /// the request goes on.
    pub fn on_request(&mut self, req: &TestRequest) -> Option<TestResponse> {
        let mut resp = Response::new();
        let m = &mut self.m;
        match self
            .s
            .call(|| req.with(self.s.worker, |r| m.on_request(r, &mut resp)))
        {
            Ok(Flow::Continue) => None,
            Ok(Flow::Respond) => Some(TestResponse::of(&resp, None)),
            Err(e) => Some(TestResponse::of(&resp, Some(e))),
        }
    }

    /// `on_response` with what a handler answered (`status`, `body`); returns the response
    /// as the middleware leaves it.
    pub fn on_response(&mut self, req: &TestRequest, status: u16, body: &[u8]) -> TestResponse {
        let mut resp = Response::new();
        resp.set_status(status).set_body(body);
        let m = &mut self.m;
        let result = self
            .s
            .call(|| req.with(self.s.worker, |r| m.on_response(r, &mut resp)));
        TestResponse::of(&resp, result.err())
    }
}

/// A WebSocket handler instance.
pub struct WebSocket {
    w: WebSocketBox,
    s: Session,
    route: String,
}

impl WebSocket {
    /// `on_handshake`: `Ok(response)` (with the headers the handler added) when it accepts,
    /// `Err(response)` when it refuses.
    pub fn handshake(&mut self, req: &TestRequest) -> Result<TestResponse, TestResponse> {
        let mut resp = Response::new();
        let w = &mut self.w;
        match self
            .s
            .call(|| req.with(self.s.worker, |r| w.on_handshake(r, &mut resp)))
        {
            Ok(Handshake::Accept) => Ok(TestResponse::of(&resp, None)),
            Ok(Handshake::Refuse) => Err(TestResponse::of(&resp, None)),
            Err(e) => Err(TestResponse::of(&resp, Some(e))),
        }
    }

    /// Opens connection `conn` (from then on `host.push` to it works) and runs `on_open`.
    pub fn open(&mut self, conn: u64, req: &TestRequest) -> Result<(), String> {
        let mut open = self
            .s
            .state
            .ws
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.insert(conn, self.route.clone());
        drop(open);
        let w = &mut self.w;
        self.s
            .call(|| req.with(self.s.worker, |r| w.on_open(conn, r)))
    }

    /// A text message from `conn`.
    pub fn text(&mut self, conn: u64, text: &str) -> Result<(), String> {
        let w = &mut self.w;
        self.s.call(|| w.on_message(conn, Message::text(text)))
    }

    /// A binary message from `conn`.
    pub fn binary(&mut self, conn: u64, data: &[u8]) -> Result<(), String> {
        let w = &mut self.w;
        self.s.call(|| w.on_message(conn, Message::binary(data)))
    }

    /// `conn` closes with `code` and `reason`.
    pub fn close(&mut self, conn: u64, code: u16, reason: &str) -> Result<(), String> {
        let mut open = self
            .s
            .state
            .ws
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.remove(&conn);
        drop(open);
        let w = &mut self.w;
        self.s
            .call(|| w.on_close(conn, code, RStr::from_str(reason)))
    }
}

/// A task handler instance.
pub struct Task {
    t: TaskHandlerBox,
    s: Session,
}

impl Task {
    /// Runs the task (attempt 1, 2, ...): its result, or why it failed (an `Err` it returned
    /// or a panic).
    pub fn handle(&mut self, payload: &[u8], attempt: u32) -> Result<Vec<u8>, String> {
        let t = &mut self.t;
        match self
            .s
            .call(|| t.handle(RSlice::from_slice(payload), attempt))?
        {
            RResult::ROk(out) => Ok(out.into_vec()),
            RResult::RErr(why) => Err(why.into_string()),
        }
    }

    /// `finish` with a result, as the delivering worker would run it.
    pub fn finish(&mut self, result: &[u8]) -> Result<(), String> {
        let t = &mut self.t;
        self.s.call(|| t.finish(RSlice::from_slice(result)))
    }
}

/// An event listener instance.
pub struct Listener {
    l: EventListenerBox,
    s: Session,
}

impl Listener {
    /// Hands it event `event`.
    pub fn on_event(&mut self, event: &str, payload: &[u8]) -> Result<Propagation, String> {
        let l = &mut self.l;
        match self
            .s
            .call(|| l.on_event(event.into(), RSlice::from_slice(payload)))?
        {
            RResult::ROk(p) => Ok(p),
            RResult::RErr(why) => Err(why.into_string()),
        }
    }
}

/// A cron job instance.
pub struct Cron {
    c: CronJobBox,
    s: Session,
}

impl Cron {
    /// One tick.
    pub fn tick(&mut self) -> Result<Schedule, String> {
        let c = &mut self.c;
        self.s.call(|| c.run())
    }
}

/// A socket handler instance.
pub struct Socket {
    k: SocketBox,
    s: Session,
}

impl Socket {
    /// Connection `conn` opens from `peer` (from then on `host.send` to it works).
    pub fn connect(&mut self, conn: u64, peer: &str) -> Result<(), String> {
        let mut open = self
            .s
            .state
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.insert(conn);
        drop(open);
        let k = &mut self.k;
        self.s.call(|| k.on_connect(conn, RStr::from_str(peer)))
    }

    /// A frame from `conn` (framing removed).
    pub fn receive(&mut self, conn: u64, frame: &[u8]) -> Result<(), String> {
        let k = &mut self.k;
        self.s
            .call(|| k.on_receive(conn, RSlice::from_slice(frame)))
    }

    /// `conn` closes.
    pub fn close(&mut self, conn: u64) -> Result<(), String> {
        let mut open = self
            .s
            .state
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.remove(&conn);
        drop(open);
        let k = &mut self.k;
        self.s.call(|| k.on_close(conn))
    }

    /// A datagram from the UDP peer token `peer` at `addr`.
    pub fn packet(&mut self, peer: u64, addr: &str, datagram: &[u8]) -> Result<(), String> {
        let k = &mut self.k;
        self.s
            .call(|| k.on_packet(peer, RStr::from_str(addr), RSlice::from_slice(datagram)))
    }
}
