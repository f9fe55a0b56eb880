//! The FFI side of the plugin boundary: the root module, the component trait objects and the
//! host handle. Plugin authors do not use this module directly; `export_plugin!` and the
//! traits in [`crate::component`] build on it. The host (plughost's core) uses it to load
//! plugins.

// sabi_trait generates impls inside consts, and trait-object types without Debug.
#![allow(non_local_definitions, missing_debug_implementations)]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

use crate::{
    http::{Flow, Request, Response},
    stats::ServerStats,
};

/// The kinds of component a plugin can provide.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ComponentKind {
    /// Answers requests on the routes that name it.
    HttpHandler,
    /// Sees every request before the handler and every response after it.
    Middleware,
    /// Runs after every request on its worker, to reset per-request state.
    Cleaner,
    /// Server start/stop and worker start/stop/error hooks.
    Lifecycle,
    /// WebSocket connections on the routes that name it.
    WebSocket,
    /// A cron job run by the timer thread.
    CronJob,
    /// Runs delivered tasks on the task workers.
    TaskHandler,
    /// Listens to fired events on the task workers.
    EventListener,
    /// A long-running custom process on a thread of its own.
    Process,
    /// Connections and datagrams of the `sockets` in `server.ron` (TCP, UDP, unix).
    Socket,
}

impl ComponentKind {
    /// The name used in manifests, logs and `server.ron`.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::HttpHandler => "http",
            ComponentKind::Middleware => "middleware",
            ComponentKind::Cleaner => "cleaner",
            ComponentKind::Lifecycle => "lifecycle",
            ComponentKind::WebSocket => "websocket",
            ComponentKind::CronJob => "cron",
            ComponentKind::TaskHandler => "task",
            ComponentKind::EventListener => "listener",
            ComponentKind::Process => "process",
            ComponentKind::Socket => "socket",
        }
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One component a plugin provides: its kind and its name inside the plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ComponentDesc {
    /// The kind.
    pub kind: ComponentKind,
    /// The name, unique per kind inside the plugin.
    pub name: RString,
}

/// What a plugin says about itself.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct Manifest {
    /// The plugin's name.
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// The plugin-api version the plugin was built against.
    pub api_version: RString,
    /// The components it provides.
    pub components: RVec<ComponentDesc>,
}

/// An error crossing the boundary from plugin code.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// Plugin code panicked; the message and location.
    Panic(RString),
    /// A factory or hook returned an error.
    Failed(RString),
    /// `instantiate` was asked for a component the plugin does not provide.
    UnknownComponent(RString),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Panic(m) => write!(f, "panicked: {m}"),
            PluginError::Failed(m) => write!(f, "{m}"),
            PluginError::UnknownComponent(m) => write!(f, "no such component: {m}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// The result of every call into plugin code.
pub type PluginResult<T> = RResult<T, PluginError>;

/// The kind of thread an instance lives on.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread (server start/stop hooks).
    Main,
    /// An HTTP worker.
    Worker,
    /// A task worker (tasks and events).
    TaskWorker,
    /// The timer thread (cron jobs).
    Timer,
    /// A custom process's thread.
    Process,
}

impl ThreadKind {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Worker => "worker",
            ThreadKind::TaskWorker => "task worker",
            ThreadKind::Timer => "timer",
            ThreadKind::Process => "process",
        }
    }
}

/// Which thread a hook runs on.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The thread's kind.
    pub kind: ThreadKind,
    /// Its id among threads of that kind.
    pub id: u32,
}

/// HTTP handler, as a trait object.
#[sabi_trait]
pub trait HttpHandlerFfi {
    /// Fill `resp` for `req`.
    #[sabi(last_prefix_field)]
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()>;
}

/// Middleware, as a trait object.
#[sabi_trait]
pub trait MiddlewareFfi {
    /// Before the handler; `Flow::Respond` answers with `resp` at once.
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<Flow>;
    /// After the response is generated.
    #[sabi(last_prefix_field)]
    fn on_response(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()>;
}

/// Cleaner, as a trait object.
#[sabi_trait]
pub trait CleanerFfi {
    /// After every request on its worker.
    #[sabi(last_prefix_field)]
    fn clean(&mut self) -> PluginResult<()>;
}

/// Lifecycle hooks, as a trait object.
#[sabi_trait]
pub trait LifecycleFfi {
    /// Once, on the main thread, when the server has started.
    fn on_server_start(&mut self) -> PluginResult<()>;
    /// Once, on the main thread, when the server stops.
    fn on_server_stop(&mut self) -> PluginResult<()>;
    /// On each worker when its instances are created.
    fn on_worker_start(&mut self, worker: WorkerInfo) -> PluginResult<()>;
    /// On each worker before its instances are dropped.
    fn on_worker_stop(&mut self, worker: WorkerInfo) -> PluginResult<()>;
    /// On a worker after plugin code on it failed.
    fn on_worker_error(&mut self, worker: WorkerInfo, error: RStr<'_>) -> PluginResult<()>;
    /// Once, on the main thread, before the workers serve; `Failed` stops the start.
    #[sabi(last_prefix_field)]
    fn on_server_prepare(&mut self) -> PluginResult<()>;
}

/// Whether a WebSocket message is text or binary.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// UTF-8 text.
    Text,
    /// Bytes.
    Binary,
}

/// A WebSocket message, borrowed for one call.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Text or binary.
    pub kind: MessageKind,
    /// The payload (UTF-8 for text).
    pub data: RSlice<'a, u8>,
}

impl<'a> Message<'a> {
    /// A text message.
    pub fn text(s: &'a str) -> Self {
        Message {
            kind: MessageKind::Text,
            data: RSlice::from_slice(s.as_bytes()),
        }
    }

    /// A binary message.
    pub fn binary(b: &'a [u8]) -> Self {
        Message {
            kind: MessageKind::Binary,
            data: RSlice::from_slice(b),
        }
    }

    /// The payload as text, when it is UTF-8.
    pub fn as_text(&self) -> Option<&'a str> {
        std::str::from_utf8(self.data.as_slice()).ok()
    }
}

/// A WebSocket handler's answer to an upgrade request.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Upgrade (with any headers the handler added to the response).
    Accept,
    /// Answer with the response the handler filled (its status, 403 if it left 200).
    Refuse,
}

/// Whether a cron job keeps its schedule.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Run again at the next tick.
    Continue,
    /// Stop this job's schedule.
    Stop,
}

/// Whether an event goes on to the next listener.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// Run the next listener.
    Continue,
    /// Skip the remaining listeners.
    Stop,
}

/// Why the host could not do what a plugin asked.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// No such connection (never existed, or closed).
    NotFound,
    /// The connection is closing.
    Closed,
    /// A bounded queue is full (a slow WebSocket reader, or the task queue).
    QueueFull,
    /// No task handler of that name is configured.
    UnknownTask,
    /// No listeners are configured for that event.
    UnknownEvent,
    /// No custom process of that name is running.
    UnknownProcess,
    /// The feature is not enabled in the server's config.
    NotEnabled,
    /// No table of that name is declared in `server.ron`.
    UnknownTable,
    /// The table has no column of that name.
    UnknownColumn,
    /// Every row of the table is in use: a new key needs a row to be deleted first.
    TableFull,
    /// The key (or counter name) is longer than the table's `key_max` (at most 256 bytes).
    KeyTooLong,
    /// A string or bytes value is longer than its column's size; nothing was written.
    ValueTooLong,
    /// The value is not of the column's kind (or a number column was read as text).
    WrongType,
    /// An integer `incr` or `decr` would overflow (or go below 0 in a `U64` column).
    Overflow,
    /// The server already holds its most counters (1024).
    TooManyCounters,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostError::NotFound => "no such connection",
            HostError::Closed => "the connection is closing",
            HostError::QueueFull => "the queue is full",
            HostError::UnknownTask => "no such task handler",
            HostError::UnknownEvent => "no listeners for that event",
            HostError::UnknownProcess => "no such custom process",
            HostError::NotEnabled => "not enabled in server.ron",
            HostError::UnknownTable => "no such table in server.ron",
            HostError::UnknownColumn => "no such column in the table",
            HostError::TableFull => "the table is full",
            HostError::KeyTooLong => "the key is too long",
            HostError::ValueTooLong => "the value is too long for its column",
            HostError::WrongType => "the value is not of the column's kind",
            HostError::Overflow => "the number would overflow",
            HostError::TooManyCounters => "too many counters",
        })
    }
}

impl std::error::Error for HostError {}

/// What a table column holds (its size, for `Str` and `Bytes`, is in [`ColumnDesc::max`]).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// A signed 64-bit integer.
    I64,
    /// An unsigned 64-bit integer.
    U64,
    /// A 64-bit float.
    F64,
    /// UTF-8 text of at most `max` bytes.
    Str,
    /// Bytes, at most `max`.
    Bytes,
}

/// One column of a table.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub struct ColumnDesc {
    /// Its name.
    pub name: RString,
    /// What it holds.
    pub kind: ColumnKind,
    /// The longest value in bytes (8 for numbers).
    pub max: u32,
}

/// A table as the host describes it to a plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct TableDesc {
    /// The handle the other table calls take (stable for the server process's life).
    pub id: u32,
    /// Rows it can hold.
    pub capacity: u64,
    /// Longest key in bytes.
    pub key_max: u32,
    /// Its columns, in order.
    pub columns: RVec<ColumnDesc>,
}

/// A value read from a table, in the column's kind.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq)]
pub enum Value {
    /// From an `I64` column.
    I64(i64),
    /// From a `U64` column.
    U64(u64),
    /// From an `F64` column.
    F64(f64),
    /// From a `Str` column.
    Str(RString),
    /// From a `Bytes` column.
    Bytes(RVec<u8>),
}

/// A value to write into a table, borrowed for the call.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// A signed integer (also fits a `U64` column when not negative).
    I64(i64),
    /// An unsigned integer (also fits an `I64` column up to `i64::MAX`).
    U64(u64),
    /// A float.
    F64(f64),
    /// Text.
    Str(RStr<'a>),
    /// Bytes.
    Bytes(RSlice<'a, u8>),
}

/// A column index and the value to write there.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct CellRef<'a> {
    /// The column's index in [`TableDesc::columns`].
    pub column: u32,
    /// The value.
    pub value: ValueRef<'a>,
}

/// One row of a scan.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ScanRow {
    /// Its key.
    pub key: RString,
    /// Its values, in column order.
    pub values: RVec<Value>,
}

/// A batch of a table scan.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ScanBatch {
    /// The rows.
    pub rows: RVec<ScanRow>,
    /// Where the next batch starts; `None` when the scan is done.
    pub next: ROption<u64>,
}

/// WebSocket handler, as a trait object.
#[sabi_trait]
pub trait WebSocketFfi {
    /// Decide on an upgrade request; may add headers (e.g. a subprotocol) to `resp`.
    fn on_handshake(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<Handshake>;
    /// The connection is open.
    fn on_open(&mut self, conn: u64, req: &Request<'_>) -> PluginResult<()>;
    /// A message arrived.
    fn on_message(&mut self, conn: u64, message: Message<'_>) -> PluginResult<()>;
    /// The connection closed.
    #[sabi(last_prefix_field)]
    fn on_close(&mut self, conn: u64, code: u16, reason: RStr<'_>) -> PluginResult<()>;
}

/// Cron job, as a trait object.
#[sabi_trait]
pub trait CronJobFfi {
    /// One tick.
    #[sabi(last_prefix_field)]
    fn run(&mut self) -> PluginResult<Schedule>;
}

/// Task handler, as a trait object.
#[sabi_trait]
pub trait TaskHandlerFfi {
    /// Runs a task on a task worker; `Err` is retried while tries remain.
    fn handle(
        &mut self,
        payload: RSlice<'_, u8>,
        attempt: u32,
    ) -> PluginResult<RResult<RVec<u8>, RString>>;
    /// Back on the delivering worker, with `handle`'s result.
    #[sabi(last_prefix_field)]
    fn finish(&mut self, result: RSlice<'_, u8>) -> PluginResult<()>;
}

/// Event listener, as a trait object.
#[sabi_trait]
pub trait EventListenerFfi {
    /// Handles one event; `Err` is retried while tries remain.
    #[sabi(last_prefix_field)]
    fn on_event(
        &mut self,
        event: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> PluginResult<RResult<Propagation, RString>>;
}

/// What a custom process's `run` reads from. Callable from the process's thread.
#[sabi_trait]
pub trait ProcessCtxFfi: Send + Sync + 'static {
    /// Whether `run` should return now (stop or reload).
    fn should_stop(&self) -> bool;
    /// The next message sent to this process, waiting up to `timeout_ms`.
    #[sabi(last_prefix_field)]
    fn recv(&self, timeout_ms: u64) -> ROption<RVec<u8>>;
}

/// A process context as it crosses the boundary.
pub type ProcessCtxBox = ProcessCtxFfi_TO<RArc<()>>;

/// Custom process, as a trait object.
#[sabi_trait]
pub trait ProcessFfi {
    /// Runs until `ctx.should_stop()`; started again after `restart_interval` if it returns
    /// early or panics.
    fn run(&mut self, ctx: ProcessCtxBox) -> PluginResult<()>;
    /// Before the process is restarted with a new version of its plugin.
    fn on_reload(&mut self) -> PluginResult<()>;
    /// Before the server stops.
    #[sabi(last_prefix_field)]
    fn on_stop(&mut self) -> PluginResult<()>;
}

/// Socket handler, as a trait object.
#[sabi_trait]
pub trait SocketFfi {
    /// A stream connection `conn` opened from `peer`.
    fn on_connect(&mut self, conn: u64, peer: RStr<'_>) -> PluginResult<()>;
    /// A frame arrived on `conn` (framing removed).
    fn on_receive(&mut self, conn: u64, frame: RSlice<'_, u8>) -> PluginResult<()>;
    /// `conn` closed.
    fn on_close(&mut self, conn: u64) -> PluginResult<()>;
    /// A datagram arrived from `peer` (a token for `socket_send_to`) at `addr`.
    #[sabi(last_prefix_field)]
    fn on_packet(
        &mut self,
        peer: u64,
        addr: RStr<'_>,
        datagram: RSlice<'_, u8>,
    ) -> PluginResult<()>;
}

/// A boxed HTTP handler instance.
pub type HttpHandlerBox = HttpHandlerFfi_TO<'static, RBox<()>>;
/// A boxed middleware instance.
pub type MiddlewareBox = MiddlewareFfi_TO<'static, RBox<()>>;
/// A boxed cleaner instance.
pub type CleanerBox = CleanerFfi_TO<'static, RBox<()>>;
/// A boxed lifecycle instance.
pub type LifecycleBox = LifecycleFfi_TO<'static, RBox<()>>;
/// A boxed WebSocket handler instance.
pub type WebSocketBox = WebSocketFfi_TO<'static, RBox<()>>;
/// A boxed cron job instance.
pub type CronJobBox = CronJobFfi_TO<'static, RBox<()>>;
/// A boxed task handler instance.
pub type TaskHandlerBox = TaskHandlerFfi_TO<'static, RBox<()>>;
/// A boxed event listener instance.
pub type EventListenerBox = EventListenerFfi_TO<'static, RBox<()>>;
/// A boxed custom process instance.
pub type ProcessBox = ProcessFfi_TO<'static, RBox<()>>;
/// A boxed socket handler instance.
pub type SocketBox = SocketFfi_TO<'static, RBox<()>>;

/// One live instance of a component. Instances stay on the thread that created them.
#[repr(u8)]
#[derive(StableAbi)]
pub enum Component {
    /// An HTTP handler.
    HttpHandler(HttpHandlerBox),
    /// A middleware.
    Middleware(MiddlewareBox),
    /// A cleaner.
    Cleaner(CleanerBox),
    /// Lifecycle hooks.
    Lifecycle(LifecycleBox),
    /// A WebSocket handler.
    WebSocket(WebSocketBox),
    /// A cron job.
    CronJob(CronJobBox),
    /// A task handler.
    TaskHandler(TaskHandlerBox),
    /// An event listener.
    EventListener(EventListenerBox),
    /// A custom process.
    Process(ProcessBox),
    /// A socket handler.
    Socket(SocketBox),
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Component({})", self.kind())
    }
}

impl Component {
    /// The kind of this instance.
    pub fn kind(&self) -> ComponentKind {
        match self {
            Component::HttpHandler(_) => ComponentKind::HttpHandler,
            Component::Middleware(_) => ComponentKind::Middleware,
            Component::Cleaner(_) => ComponentKind::Cleaner,
            Component::Lifecycle(_) => ComponentKind::Lifecycle,
            Component::WebSocket(_) => ComponentKind::WebSocket,
            Component::CronJob(_) => ComponentKind::CronJob,
            Component::TaskHandler(_) => ComponentKind::TaskHandler,
            Component::EventListener(_) => ComponentKind::EventListener,
            Component::Process(_) => ComponentKind::Process,
            Component::Socket(_) => ComponentKind::Socket,
        }
    }
}

/// Log levels as they cross the boundary (the `log` crate's numbering: 1 = error .. 5 = trace).
pub type LogLevel = u8;

/// What the host offers plugin code. Callable from any thread.
#[sabi_trait]
pub trait HostFfi: Clone + Send + Sync + 'static {
    /// Writes a log record through the host's logger.
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>);
    /// The most verbose level the host logs now (0 = off).
    fn max_level(&self) -> LogLevel;
    /// The `-x` version string given to `plughost start`, empty when none.
    fn app_version(&self) -> RString;
    /// An environment value: the process environment first, then the env file the host read.
    fn env(&self, key: RStr<'_>) -> ROption<RString>;
    /// Queues a message to a WebSocket connection owned by any worker.
    fn ws_push(&self, conn: u64, message: Message<'_>) -> RResult<(), HostError>;
    /// Queues a message to every connection of a route (empty: all), except `except` (0: none);
    /// returns how many were reached.
    fn ws_broadcast(&self, message: Message<'_>, route: RStr<'_>, except: u64) -> u64;
    /// Closes a WebSocket connection with a close code and reason.
    fn ws_close(&self, conn: u64, code: u16, reason: RStr<'_>) -> RResult<(), HostError>;
    /// Whether a WebSocket connection is open.
    fn ws_is_established(&self, conn: u64) -> bool;
    /// Ids of the open connections of a route (empty: all).
    fn ws_connections(&self, route: RStr<'_>) -> RVec<u64>;
    /// Queues a task for a task worker; returns the task's id.
    fn deliver(
        &self,
        task: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
        origin: WorkerInfo,
    ) -> RResult<u64, HostError>;
    /// Queues an event for its listeners; returns the event's id.
    fn fire(
        &self,
        event: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
    ) -> RResult<u64, HostError>;
    /// Sends a message to every instance of a custom process; returns how many took it.
    fn send_to_process(
        &self,
        process: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> RResult<u64, HostError>;
    /// Describes a table declared in `server.ron`.
    fn table_open(&self, name: RStr<'_>) -> RResult<TableDesc, HostError>;
    /// A row's values in column order; `None` when the key has no row.
    fn table_get(&self, table: u32, key: RStr<'_>) -> RResult<ROption<RVec<Value>>, HostError>;
    /// Writes cells into a row, creating it (other columns zero or empty) when absent.
    fn table_set(
        &self,
        table: u32,
        key: RStr<'_>,
        cells: RSlice<'_, CellRef<'_>>,
    ) -> RResult<(), HostError>;
    /// Deletes a row; false when there was none.
    fn table_del(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError>;
    /// Whether a key has a row.
    fn table_exists(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError>;
    /// Adds `by` to a number column (subtracts when `down`), creating the row at 0 when
    /// absent; returns the new value.
    fn table_incr(
        &self,
        table: u32,
        key: RStr<'_>,
        column: u32,
        by: ValueRef<'_>,
        down: bool,
    ) -> RResult<Value, HostError>;
    /// Rows in use.
    fn table_count(&self, table: u32) -> u64;
    /// Rows from `cursor` on (at least `max_rows` unless the scan ends), and where to go on.
    fn table_scan(&self, table: u32, cursor: u64, max_rows: u32) -> RResult<ScanBatch, HostError>;
    /// The handle of a counter, created at 0 on first use.
    fn counter_open(&self, name: RStr<'_>) -> RResult<u32, HostError>;
    /// Adds `by` (wrapping); returns the new value.
    fn counter_add(&self, counter: u32, by: i64) -> i64;
    /// The value.
    fn counter_get(&self, counter: u32) -> i64;
    /// Sets the value.
    fn counter_set(&self, counter: u32, value: i64);
    /// Sets `new` if the value is `current`: `Ok(current)`, else `Err(actual)`.
    fn counter_compare_exchange(&self, counter: u32, current: i64, new: i64) -> RResult<i64, i64>;
    /// Asks for a reload as `plughost reload` does (the env file re-read, every plugin
    /// reloaded); `plugin` and `reason` go to the log. Returns before the reload runs.
    fn request_reload(&self, plugin: RStr<'_>, reason: RStr<'_>) -> RResult<(), HostError>;
    /// The path of the server's `env_file` (absolute), if the config names one.
    fn env_file(&self) -> ROption<RString>;
    /// A snapshot of the server's counters (workers, tasks, cron, processes, reloads, the
    /// process, tables). Cheap: atomic loads and a few `/proc` reads.
    fn stats(&self) -> ServerStats;
    /// Queues bytes to a socket connection owned by any worker (a `Length` socket adds the
    /// header).
    fn socket_send(&self, conn: u64, data: RSlice<'_, u8>) -> RResult<(), HostError>;
    /// Closes a socket connection once what is queued to it is written.
    fn socket_close(&self, conn: u64) -> RResult<(), HostError>;
    /// Sends a datagram to the UDP peer `peer` (the token `on_packet` got).
    fn socket_send_to(&self, peer: u64, data: RSlice<'_, u8>) -> RResult<(), HostError>;
    /// Ids of the open connections of the stream sockets whose configured `listen` or bound
    /// address is `listen` (empty: every socket), on every worker.
    fn socket_connections(&self, listen: RStr<'_>) -> RVec<u64>;
    /// Defers the response to the request of connection `conn` that is being handled on the
    /// calling thread; returns the deferred response's token. `NotEnabled` outside a request
    /// handler or middleware request hook on an HTTP worker, or for another request.
    fn defer(&self, conn: u64) -> RResult<u64, HostError>;
    /// Completes, streams, drops or checks the deferred response `token`, from any thread.
    /// `Closed` once the client went away, the response timed out or was already done.
    fn deferred(&self, token: u64, op: DeferOp<'_>) -> RResult<(), HostError>;
    /// Sets `key` for the rest of the request being handled on the calling thread (its
    /// handler, the other middleware, the response hooks). `NotEnabled` outside a request;
    /// `ValueTooLong` past 64 keys or 64 KiB in all.
    fn context_set(&self, key: RStr<'_>, value: RSlice<'_, u8>) -> RResult<(), HostError>;
    /// What `context_set` left under `key` for the request being handled on this thread.
    #[sabi(last_prefix_field)]
    fn context_get(&self, key: RStr<'_>) -> ROption<RVec<u8>>;
}

/// What a [`HostFfi::deferred`] call does to a deferred response.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub enum DeferOp<'a> {
    /// Answers with this response (status, headers, body) and ends it.
    Complete(&'a Response),
    /// Sends the status and headers of a streamed response (and its body so far as the
    /// first chunk).
    Start(&'a Response),
    /// Sends a chunk of a streamed response (starting it as a `200` if it was not).
    Write(RSlice<'a, u8>),
    /// Ends a streamed response (an empty `200` if it never started).
    Finish,
    /// The handle was dropped without finishing: `500`, or a streamed response cut short.
    Drop,
    /// Only says whether the response is still open.
    Check,
}

/// The host handle as it crosses the boundary.
pub type HostBox = HostFfi_TO<RArc<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's manifest.
    pub manifest: extern "C" fn() -> PluginResult<Manifest>,
    /// Creates one instance of a component, on the calling thread.
    #[sabi(last_prefix_field)]
    pub instantiate: extern "C" fn(
        kind: ComponentKind,
        name: RStr<'_>,
        config: RStr<'_>,
        host: HostBox,
        worker: WorkerInfo,
    ) -> PluginResult<Component>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "plughost_plugin";
    const NAME: &'static str = "plughost plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The plugin-api version this crate is (and so the one a host or plugin was built with).
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");
