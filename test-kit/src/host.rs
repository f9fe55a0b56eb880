//! The host a harness hands its plugin: the server's own tables, counters and env file,
//! and a record of everything else the plugin asks of it (pushes, tasks, events, socket
//! sends, log lines) instead of doing it.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use plughost::plugin::host::Host as ServerHost;
use plughost_plugin_api::{
    abi::{
        CellRef, DeferOp, HostFfi, LogLevel, Message, MessageKind, ScanBatch, TableDesc, Value,
        ValueRef, WorkerInfo,
    },
    HostError, ServerStats,
};

/// A WebSocket message a plugin pushed or broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
}

impl Sent {
    fn of(m: &Message<'_>) -> Sent {
        match m.kind {
            MessageKind::Text => Sent::Text(String::from_utf8_lossy(m.data.as_slice()).into()),
            MessageKind::Binary => Sent::Binary(m.data.to_vec()),
        }
    }

    /// The text, for a text message.
    pub fn text(&self) -> Option<&str> {
        match self {
            Sent::Text(t) => Some(t),
            Sent::Binary(_) => None,
        }
    }
}

/// A broadcast: the message, the route (empty: all) and the connection left out (0: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    /// What was sent.
    pub message: Sent,
    /// To the connections of this route; empty: every connection.
    pub route: String,
    /// Except this connection; 0: none.
    pub except: u64,
}

/// A task delivered (`host.deliver`) or an event fired (`host.fire`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The task handler (`plugin.component`) or the event's name.
    pub name: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Its delay.
    pub delay_ms: u64,
    /// Its tries.
    pub tries: u32,
}

/// One log record a plugin wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `log::Level` as text: `ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`.
    pub level: String,
    /// Its target.
    pub target: String,
    /// The message.
    pub message: String,
}

/// What happened to a deferred response (`host.defer`), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferred {
    /// `defer` gave this token for the request of this connection.
    Deferred {
        /// The token.
        token: u64,
        /// The request's connection.
        conn: u64,
    },
    /// Completed with this status and body.
    Completed {
        /// The token.
        token: u64,
        /// The status.
        status: u16,
        /// The body.
        body: Vec<u8>,
    },
    /// A stream started with this status.
    Started {
        /// The token.
        token: u64,
        /// The status.
        status: u16,
    },
    /// A chunk of a stream.
    Chunk {
        /// The token.
        token: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A stream finished.
    Finished {
        /// The token.
        token: u64,
    },
    /// The handle was dropped unfinished (the server answers 500).
    Dropped {
        /// The token.
        token: u64,
    },
}

/// Everything a plugin asked of the host that a server would have done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// WebSocket pushes, by connection.
    pub pushes: Vec<(u64, Sent)>,
    /// WebSocket broadcasts.
    pub broadcasts: Vec<Broadcast>,
    /// WebSocket connections closed: connection, code, reason.
    pub ws_closed: Vec<(u64, u16, String)>,
    /// Tasks delivered.
    pub tasks: Vec<Job>,
    /// Events fired.
    pub events: Vec<Job>,
    /// Messages sent to custom processes: process, payload.
    pub process_messages: Vec<(String, Vec<u8>)>,
    /// Bytes sent to socket connections (without framing): connection, bytes.
    pub socket_sent: Vec<(u64, Vec<u8>)>,
    /// Socket connections closed.
    pub socket_closed: Vec<u64>,
    /// Datagrams sent to UDP peers: peer token, datagram.
    pub datagrams: Vec<(u64, Vec<u8>)>,
    /// Reloads requested, with their reasons.
    pub reloads: Vec<String>,
    /// Log records, in order.
    pub logs: Vec<LogLine>,
    /// Deferred responses: what happened to each, in order.
    pub deferred: Vec<Deferred>,
}

/// What the host knows and records, shared by every handle of one harness.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) recorded: Mutex<Recorded>,
    /// Open WebSocket connections by route, as the harness opened them.
    pub(crate) ws: Mutex<BTreeMap<u64, String>>,
    /// Open socket connections.
    pub(crate) sockets: Mutex<BTreeSet<u64>>,
    /// `env` values set on the harness.
    pub(crate) env: Mutex<BTreeMap<String, String>>,
    /// Task handlers and events that exist; empty: any.
    pub(crate) tasks: Mutex<BTreeSet<String>>,
    /// The request context (`host.set_context`): kept until the harness forgets it.
    pub(crate) context: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Deferred responses not finished yet, and the last token given.
    pub(crate) deferrals: Mutex<(BTreeSet<u64>, u64)>,
    pub(crate) events: Mutex<BTreeSet<String>>,
}

impl State {
    pub(crate) fn record(&self, f: impl FnOnce(&mut Recorded)) {
        f(&mut self.recorded.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// The harness's host: recorded calls, and the server's tables for the rest.
#[derive(Clone)]
pub(crate) struct Recorder {
    pub(crate) state: Arc<State>,
    pub(crate) server: ServerHost,
}

fn ok<T>(v: T) -> RResult<T, HostError> {
    RResult::ROk(v)
}

fn err<T>(e: HostError) -> RResult<T, HostError> {
    RResult::RErr(e)
}

impl HostFfi for Recorder {
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        let names = ["OFF", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
        let line = LogLine {
            level: names.get(level as usize).unwrap_or(&"TRACE").to_string(),
            target: target.as_str().into(),
            message: message.as_str().into(),
        };
        self.state.record(|r| r.logs.push(line));
    }

    fn max_level(&self) -> LogLevel {
        5
    }

    fn app_version(&self) -> RString {
        self.server.app_version()
    }

    fn env(&self, key: RStr<'_>) -> ROption<RString> {
        let set = self
            .state
            .env
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match set.get(key.as_str()) {
            Some(v) => ROption::RSome(v.as_str().into()),
            None => self.server.env(key),
        }
    }

    fn ws_push(&self, conn: u64, message: Message<'_>) -> RResult<(), HostError> {
        if !self.ws_is_established(conn) {
            return err(HostError::NotFound);
        }
        self.state
            .record(|r| r.pushes.push((conn, Sent::of(&message))));
        ok(())
    }

    fn ws_broadcast(&self, message: Message<'_>, route: RStr<'_>, except: u64) -> u64 {
        let reached = self
            .ws_connections(route)
            .iter()
            .filter(|c| **c != except)
            .count();
        self.state.record(|r| {
            r.broadcasts.push(Broadcast {
                message: Sent::of(&message),
                route: route.as_str().into(),
                except,
            })
        });
        reached as u64
    }

    fn ws_close(&self, conn: u64, code: u16, reason: RStr<'_>) -> RResult<(), HostError> {
        let open = self
            .state
            .ws
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn);
        if open.is_none() {
            return err(HostError::NotFound);
        }
        self.state
            .record(|r| r.ws_closed.push((conn, code, reason.as_str().into())));
        ok(())
    }

    fn ws_is_established(&self, conn: u64) -> bool {
        let open = self.state.ws.lock().unwrap_or_else(PoisonError::into_inner);
        open.contains_key(&conn)
    }

    fn ws_connections(&self, route: RStr<'_>) -> RVec<u64> {
        let open = self.state.ws.lock().unwrap_or_else(PoisonError::into_inner);
        let route = route.as_str();
        open.iter()
            .filter(|(_, r)| route.is_empty() || r.as_str() == route)
            .map(|(c, _)| *c)
            .collect()
    }

    fn deliver(
        &self,
        task: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
        _origin: WorkerInfo,
    ) -> RResult<u64, HostError> {
        let known = self
            .state
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !known.is_empty() && !known.contains(task.as_str()) {
            return err(HostError::UnknownTask);
        }
        drop(known);
        let job = Job {
            name: task.as_str().into(),
            payload: payload.to_vec(),
            delay_ms,
            tries,
        };
        let mut id = 0;
        self.state.record(|r| {
            r.tasks.push(job);
            id = r.tasks.len() as u64;
        });
        ok(id)
    }

    fn fire(
        &self,
        event: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
    ) -> RResult<u64, HostError> {
        let known = self
            .state
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !known.is_empty() && !known.contains(event.as_str()) {
            return err(HostError::UnknownEvent);
        }
        drop(known);
        let job = Job {
            name: event.as_str().into(),
            payload: payload.to_vec(),
            delay_ms,
            tries,
        };
        let mut id = 0;
        self.state.record(|r| {
            r.events.push(job);
            id = r.events.len() as u64;
        });
        ok(id)
    }

    fn send_to_process(
        &self,
        process: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> RResult<u64, HostError> {
        let m = (process.as_str().to_owned(), payload.to_vec());
        self.state.record(|r| r.process_messages.push(m));
        ok(1)
    }

    fn table_open(&self, name: RStr<'_>) -> RResult<TableDesc, HostError> {
        self.server.table_open(name)
    }

    fn table_get(&self, table: u32, key: RStr<'_>) -> RResult<ROption<RVec<Value>>, HostError> {
        self.server.table_get(table, key)
    }

    fn table_set(
        &self,
        table: u32,
        key: RStr<'_>,
        cells: RSlice<'_, CellRef<'_>>,
    ) -> RResult<(), HostError> {
        self.server.table_set(table, key, cells)
    }

    fn table_del(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError> {
        self.server.table_del(table, key)
    }

    fn table_exists(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError> {
        self.server.table_exists(table, key)
    }

    fn table_incr(
        &self,
        table: u32,
        key: RStr<'_>,
        column: u32,
        by: ValueRef<'_>,
        down: bool,
    ) -> RResult<Value, HostError> {
        self.server.table_incr(table, key, column, by, down)
    }

    fn table_count(&self, table: u32) -> u64 {
        self.server.table_count(table)
    }

    fn table_scan(&self, table: u32, cursor: u64, max_rows: u32) -> RResult<ScanBatch, HostError> {
        self.server.table_scan(table, cursor, max_rows)
    }

    fn counter_open(&self, name: RStr<'_>) -> RResult<u32, HostError> {
        self.server.counter_open(name)
    }

    fn counter_add(&self, counter: u32, by: i64) -> i64 {
        self.server.counter_add(counter, by)
    }

    fn counter_get(&self, counter: u32) -> i64 {
        self.server.counter_get(counter)
    }

    fn counter_set(&self, counter: u32, value: i64) {
        self.server.counter_set(counter, value)
    }

    fn counter_compare_exchange(&self, counter: u32, current: i64, new: i64) -> RResult<i64, i64> {
        self.server.counter_compare_exchange(counter, current, new)
    }

    fn request_reload(&self, _plugin: RStr<'_>, reason: RStr<'_>) -> RResult<(), HostError> {
        self.state
            .record(|r| r.reloads.push(reason.as_str().into()));
        ok(())
    }

    fn env_file(&self) -> ROption<RString> {
        self.server.env_file()
    }

    fn stats(&self) -> ServerStats {
        self.server.stats()
    }

    fn socket_send(&self, conn: u64, data: RSlice<'_, u8>) -> RResult<(), HostError> {
        if !self.socket_open(conn) {
            return err(HostError::NotFound);
        }
        self.state
            .record(|r| r.socket_sent.push((conn, data.to_vec())));
        ok(())
    }

    fn socket_close(&self, conn: u64) -> RResult<(), HostError> {
        let open = self
            .state
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn);
        if !open {
            return err(HostError::NotFound);
        }
        self.state.record(|r| r.socket_closed.push(conn));
        ok(())
    }

    fn socket_send_to(&self, peer: u64, data: RSlice<'_, u8>) -> RResult<(), HostError> {
        self.state
            .record(|r| r.datagrams.push((peer, data.to_vec())));
        ok(())
    }

    fn socket_connections(&self, _listen: RStr<'_>) -> RVec<u64> {
        let open = self
            .state
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.iter().copied().collect()
    }

    fn defer(&self, conn: u64) -> RResult<u64, HostError> {
        let mut d = self
            .state
            .deferrals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        d.1 += 1;
        let token = d.1;
        d.0.insert(token);
        drop(d);
        self.state
            .record(|r| r.deferred.push(Deferred::Deferred { token, conn }));
        ok(token)
    }

    fn deferred(&self, token: u64, op: DeferOp<'_>) -> RResult<(), HostError> {
        let mut open = self
            .state
            .deferrals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !open.0.contains(&token) {
            return err(HostError::Closed);
        }
        if matches!(op, DeferOp::Complete(_) | DeferOp::Finish | DeferOp::Drop) {
            open.0.remove(&token);
        }
        drop(open);
        let event = match op {
            DeferOp::Complete(resp) => Deferred::Completed {
                token,
                status: resp.status(),
                body: resp.body().to_vec(),
            },
            DeferOp::Start(resp) => Deferred::Started {
                token,
                status: resp.status(),
            },
            DeferOp::Write(data) => Deferred::Chunk {
                token,
                data: data.to_vec(),
            },
            DeferOp::Finish => Deferred::Finished { token },
            DeferOp::Drop => Deferred::Dropped { token },
            DeferOp::Check => return ok(()),
        };
        self.state.record(|r| r.deferred.push(event));
        ok(())
    }

    fn context_set(&self, key: RStr<'_>, value: RSlice<'_, u8>) -> RResult<(), HostError> {
        let mut c = self
            .state
            .context
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.insert(key.as_str().into(), value.to_vec());
        ok(())
    }

    fn context_get(&self, key: RStr<'_>) -> ROption<RVec<u8>> {
        let c = self
            .state
            .context
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.get(key.as_str()).map(|v| RVec::from(v.clone())).into()
    }
}

impl Recorder {
    fn socket_open(&self, conn: u64) -> bool {
        let open = self
            .state
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.contains(&conn)
    }
}

// ---------------------------------------------------------------------------------------------
// Log records: a plugin linked into a test logs through the `log` crate of the test binary.
// One logger for the process sends each record to the harness whose call is running on
// that thread.

thread_local! {
    static CURRENT: RefCell<Option<Arc<State>>> = const { RefCell::new(None) };
}

/// While this lives, log records written on this thread go to `state`.
pub(crate) struct Capture(Option<Arc<State>>);

impl Capture {
    pub(crate) fn enter(state: &Arc<State>) -> Capture {
        install_logger();
        Capture(CURRENT.with(|c| c.replace(Some(state.clone()))))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let previous = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        CURRENT.with(|c| {
            if let Some(state) = c.borrow().as_ref() {
                let line = LogLine {
                    level: record.level().to_string(),
                    target: record.target().into(),
                    message: record.args().to_string(),
                };
                state.record(|r| r.logs.push(line));
            }
        });
    }

    fn flush(&self) {}
}

fn install_logger() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Another logger may be installed already (the test's own): records then go there.
        if log::set_boxed_logger(Box::new(Logger)).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}
