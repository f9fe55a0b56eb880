//! What a plugin author implements: plain traits with no-op defaults, and the [`Plugin`]
//! builder that names them. Each is adapted to its FFI trait object here, with every call
//! guarded by `catch_unwind` compiled into the plugin.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    mem::ManuallyDrop,
    panic::{self, AssertUnwindSafe},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RResult, RSlice, RStr, RString, RVec},
};
use serde::de::DeserializeOwned;

use crate::{
    abi::{
        CleanerFfi, CleanerFfi_TO, Component, ComponentDesc, ComponentKind, CronJobFfi,
        CronJobFfi_TO, EventListenerFfi, EventListenerFfi_TO, Handshake, HostBox, HostError,
        HttpHandlerFfi, HttpHandlerFfi_TO, LifecycleFfi, LifecycleFfi_TO, Manifest, Message,
        MiddlewareFfi, MiddlewareFfi_TO, PluginError, PluginResult, ProcessCtxBox, ProcessFfi,
        ProcessFfi_TO, Propagation, Schedule, SocketFfi, SocketFfi_TO, TaskHandlerFfi,
        TaskHandlerFfi_TO, WebSocketFfi, WebSocketFfi_TO, WorkerInfo, API_VERSION,
    },
    deferred::ResponseHandle,
    http::{Flow, Request, Response},
    stats::ServerStats,
    table::{Counter, Table},
};

/// The error a factory or a config helper returns.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Answers HTTP requests on the routes that name it in `server.ron`.
pub trait HttpHandler: 'static {
    /// Fill `resp` for `req`. A panic here costs this request a 500 and recreates the instance.
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response);
}

/// Sees every request before its handler and every response after it.
pub trait Middleware: 'static {
    /// Before the handler. Return [`Flow::Respond`] to answer with `resp` now (e.g. a 401).
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> Flow {
        let _ = (req, resp);
        Flow::Continue
    }
    /// After the response was generated: may change its status, headers and body.
    fn on_response(&mut self, req: &Request<'_>, resp: &mut Response) {
        let _ = (req, resp);
    }
}

/// Runs after every request on its worker, like LaravelS's cleaners.
pub trait Cleaner: 'static {
    /// Reset whatever per-request state the plugin keeps.
    fn clean(&mut self);
}

/// Lifecycle hooks. Server hooks run once on the main thread; worker hooks on each worker.
pub trait Lifecycle: 'static {
    /// Before the workers serve (the listening sockets are bound, connections wait): the place
    /// to fetch what the workers need, such as the env file. An `Err` stops the start.
    fn on_server_prepare(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// The server has started and is accepting.
    fn on_server_start(&mut self) {}
    /// The server is stopping.
    fn on_server_stop(&mut self) {}
    /// A worker created its instances.
    fn on_worker_start(&mut self, worker: WorkerInfo) {
        let _ = worker;
    }
    /// A worker is about to drop its instances (stop, or `max_request` recycling).
    fn on_worker_stop(&mut self, worker: WorkerInfo) {
        let _ = worker;
    }
    /// Plugin code on this worker panicked.
    fn on_worker_error(&mut self, worker: WorkerInfo, error: &str) {
        let _ = (worker, error);
    }
}

/// Handles WebSocket connections on the routes that name it in `server.ron`.
pub trait WebSocketHandler: 'static {
    /// An upgrade request arrived (after the middleware). Add headers to `resp` (e.g.
    /// `sec-websocket-protocol`), or fill it with a status and body and return
    /// [`Handshake::Refuse`].
    fn on_handshake(&mut self, req: &Request<'_>, resp: &mut Response) -> Handshake {
        let _ = (req, resp);
        Handshake::Accept
    }
    /// The connection `conn` is open; `req` is the upgrade request.
    fn on_open(&mut self, conn: u64, req: &Request<'_>) {
        let _ = (conn, req);
    }
    /// A message arrived on `conn`. A panic here closes that connection with 1011.
    fn on_message(&mut self, conn: u64, message: Message<'_>) {
        let _ = (conn, message);
    }
    /// `conn` closed with this code and reason.
    fn on_close(&mut self, conn: u64, code: u16, reason: &str) {
        let _ = (conn, code, reason);
    }
}

/// A job the timer thread runs every `interval_ms`.
pub trait CronJob: 'static {
    /// One tick. Return [`Schedule::Stop`] to end this job's schedule.
    fn run(&mut self) -> Schedule;
}

/// Runs tasks delivered with [`Host::deliver`], on the task workers.
pub trait TaskHandler: 'static {
    /// Runs one task (`attempt` counts from 1). An `Err` or a panic is retried with backoff
    /// while tries remain; the `Ok` bytes go to [`finish`](Self::finish).
    fn handle(&mut self, payload: &[u8], attempt: u32) -> Result<Vec<u8>, String>;
    /// Runs on the worker that delivered the task (when that was an HTTP worker), with the
    /// result of `handle`.
    fn finish(&mut self, result: &[u8]) {
        let _ = result;
    }
}

/// Listens to events fired with [`Host::fire`], on the task workers, in configured order.
pub trait EventListener: 'static {
    /// Handles one event. [`Propagation::Stop`] skips the listeners after this one; an `Err`
    /// or a panic is retried while tries remain.
    fn on_event(&mut self, event: &str, payload: &[u8]) -> Result<Propagation, String>;
}

/// A long-running custom process, on a thread of its own.
pub trait Process: 'static {
    /// Runs until `ctx.should_stop()`; check it often (or block in `ctx.recv`). If it returns
    /// early or panics, it is started again after `restart_interval_ms`.
    fn run(&mut self, ctx: &ProcessContext);
    /// Before the process is restarted with a new version of its plugin.
    fn on_reload(&mut self) {}
    /// Before the server stops.
    fn on_stop(&mut self) {}
}

/// Handles the connections (TCP, unix) and datagrams (UDP) of the `sockets` that name it in
/// `server.ron`. One instance per worker; a connection stays on the worker that accepted it.
pub trait SocketHandler: 'static {
    /// Stream connection `conn` opened from `peer` (`IP:PORT`, or `unix`).
    fn on_connect(&mut self, conn: u64, peer: &str) {
        let _ = (conn, peer);
    }
    /// One frame arrived on `conn`, without its framing (the EOF or the length header). A
    /// panic here closes the connection.
    fn on_receive(&mut self, conn: u64, frame: &[u8]) {
        let _ = (conn, frame);
    }
    /// `conn` closed (either side).
    fn on_close(&mut self, conn: u64) {
        let _ = conn;
    }
    /// A UDP datagram arrived from `addr`; answer with [`Host::send_to`]`(peer, ..)`.
    fn on_packet(&mut self, peer: u64, addr: &str, datagram: &[u8]) {
        let _ = (peer, addr, datagram);
    }
}

/// What a custom process reads from.
pub struct ProcessContext {
    ffi: ProcessCtxBox,
}

impl std::fmt::Debug for ProcessContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessContext").finish_non_exhaustive()
    }
}

impl ProcessContext {
    /// Whether `run` should return now (the server stops or reloads this process).
    pub fn should_stop(&self) -> bool {
        self.ffi.should_stop()
    }

    /// The next message sent with [`Host::send_to_process`], waiting up to `timeout`; `None`
    /// on timeout or when the process should stop.
    pub fn recv(&self, timeout: std::time::Duration) -> Option<Vec<u8>> {
        self.ffi
            .recv(timeout.as_millis().min(u64::MAX as u128) as u64)
            .into_option()
            .map(Into::into)
    }
}

/// The host handle an instance may keep. Cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Host {
    ffi: HostBox,
    worker: WorkerInfo,
    /// The plugin's name, for what the host logs on its behalf.
    plugin: std::sync::Arc<str>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("worker", &self.worker)
            .field("plugin", &self.plugin)
            .finish()
    }
}

impl Host {
    /// The thread this instance lives on.
    pub fn worker(&self) -> WorkerInfo {
        self.worker
    }

    /// The id of the worker thread this instance lives on.
    pub fn worker_id(&self) -> u32 {
        self.worker.id
    }

    /// The `-x` version string given to `plughost start`, empty when none.
    pub fn app_version(&self) -> String {
        self.ffi.app_version().into()
    }

    /// An environment value: the process environment first, then the env file the host read.
    pub fn env(&self, key: &str) -> Option<String> {
        self.ffi.env(key.into()).into_option().map(Into::into)
    }

    /// Queues a message to WebSocket connection `conn`, whichever worker owns it.
    pub fn push(&self, conn: u64, message: Message<'_>) -> Result<(), HostError> {
        self.ffi.ws_push(conn, message).into_result()
    }

    /// Queues a text message to `conn`.
    pub fn push_text(&self, conn: u64, text: &str) -> Result<(), HostError> {
        self.push(conn, Message::text(text))
    }

    /// Queues a message to every connection on `route` (`""`: every route), except `except`
    /// (0: none). Returns how many connections it reached.
    pub fn broadcast(&self, message: Message<'_>, route: &str, except: u64) -> u64 {
        self.ffi.ws_broadcast(message, route.into(), except)
    }

    /// Closes connection `conn` with a close code and reason.
    pub fn close(&self, conn: u64, code: u16, reason: &str) -> Result<(), HostError> {
        self.ffi.ws_close(conn, code, reason.into()).into_result()
    }

    /// Whether connection `conn` is an open WebSocket.
    pub fn is_established(&self, conn: u64) -> bool {
        self.ffi.ws_is_established(conn)
    }

    /// The open WebSocket connections on `route` (`""`: every route).
    pub fn connections(&self, route: &str) -> Vec<u64> {
        self.ffi.ws_connections(route.into()).into()
    }

    /// Delivers a task to the task handler `task` (`"plugin.component"`), to run on a task
    /// worker after `delay_ms`, tried up to `tries` times. Returns the task's id.
    pub fn deliver(
        &self,
        task: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
    ) -> Result<u64, HostError> {
        self.ffi
            .deliver(
                task.into(),
                payload.into(),
                delay_ms,
                tries.max(1),
                self.worker,
            )
            .into_result()
    }

    /// Fires `event` to its configured listeners, after `delay_ms`, each listener tried up to
    /// `tries` times. Returns the event's id.
    pub fn fire(
        &self,
        event: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
    ) -> Result<u64, HostError> {
        self.ffi
            .fire(event.into(), payload.into(), delay_ms, tries.max(1))
            .into_result()
    }

    /// Sends a message to every instance of custom process `name`; returns how many got it.
    pub fn send_to_process(&self, name: &str, payload: &[u8]) -> Result<u64, HostError> {
        self.ffi
            .send_to_process(name.into(), payload.into())
            .into_result()
    }

    /// The shared table `name` declared in `server.ron` (`Err(UnknownTable)` otherwise). Keep
    /// the handle: it is cheap to clone, usable from any thread, and outlives hot reloads.
    pub fn table(&self, name: &str) -> Result<Table, HostError> {
        Table::open(&self.ffi, name)
    }

    /// The shared counter `name`, created at 0 on its first use by any plugin. Fails only on
    /// a name over 256 bytes (`KeyTooLong`) or past 1024 counters (`TooManyCounters`).
    pub fn counter(&self, name: &str) -> Result<Counter, HostError> {
        Counter::open(&self.ffi, name)
    }

    /// Asks the server to reload as `plughost reload` does: it re-reads the env file (so
    /// [`Host::env`] answers the new values on every thread) and reloads every plugin. The
    /// server logs the plugin's name and `reason`. Returns at once; the reload runs on the
    /// main thread (`NotEnabled` before the server is ready to take requests for one).
    pub fn request_reload(&self, reason: &str) -> Result<(), HostError> {
        let plugin: &str = &self.plugin;
        self.ffi
            .request_reload(plugin.into(), reason.into())
            .into_result()
    }

    /// Queues `data` to socket connection `conn`, whichever worker owns it; a socket with
    /// `Length` framing adds the header. `QueueFull` closes the connection (a slow reader).
    pub fn send(&self, conn: u64, data: &[u8]) -> Result<(), HostError> {
        self.ffi.socket_send(conn, data.into()).into_result()
    }

    /// Closes socket connection `conn` after what is queued to it is written.
    pub fn close_socket(&self, conn: u64) -> Result<(), HostError> {
        self.ffi.socket_close(conn).into_result()
    }

    /// Sends a datagram to the UDP peer `peer` that [`SocketHandler::on_packet`] named.
    pub fn send_to(&self, peer: u64, data: &[u8]) -> Result<(), HostError> {
        self.ffi.socket_send_to(peer, data.into()).into_result()
    }

    /// Ids of the open connections of a TCP or unix socket of `sockets`, on every worker:
    /// `listen` is the socket's `listen` as configured (`"127.0.0.1:5291"`,
    /// `"unix:run/echo.sock"`) or the address it is bound to (for port 0); empty: every
    /// socket. A snapshot: connections come and go meanwhile.
    pub fn socket_connections(&self, listen: &str) -> Vec<u64> {
        self.ffi.socket_connections(listen.into()).into_vec()
    }

    /// The server's `env_file` (absolute), if its config names one.
    pub fn env_file(&self) -> Option<std::path::PathBuf> {
        self.ffi
            .env_file()
            .into_option()
            .map(|p| std::path::PathBuf::from(p.as_str()))
    }

    /// Defers the response to `req`: call it in a handler (or a middleware's `on_request`),
    /// return, and finish the response later from any thread with the handle. What the
    /// handler (and the middleware's `on_response`) left in `resp` is not sent, except its
    /// headers, which go out with the deferred response unless it sets the same ones.
    /// `NotEnabled` anywhere else (another thread, a WebSocket handshake) or when `req` is
    /// not the request being handled. Deferring the same request again gives a second handle
    /// to the same response.
    pub fn defer(&self, req: &Request<'_>) -> Result<ResponseHandle, HostError> {
        let token = self.ffi.defer(req.conn_id).into_result()?;
        Ok(ResponseHandle::new(self.ffi.clone(), token))
    }

    /// Sets `key` to `value` (any serde type, as JSON) for the rest of the request being
    /// handled on this thread: a middleware's `on_request` passes it to the handler, the other
    /// middleware and the response hooks, whichever plugin they are in. Gone once the request
    /// is answered. `NotEnabled` outside a request (a task, a process, another thread);
    /// `ValueTooLong` past 64 keys or 64 KiB in all.
    pub fn set_context<T: serde::Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), HostError> {
        let bytes = serde_json::to_vec(value).map_err(|_| HostError::WrongType)?;
        self.ffi
            .context_set(key.into(), bytes.as_slice().into())
            .into_result()
    }

    /// The value [`Host::set_context`] left under `key` for the request being handled on
    /// this thread, when there is one of type `T`.
    pub fn context<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.ffi.context_get(key.into()).into_option()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// A handle for the deferred response `token` (from [`ResponseHandle::into_token`]), on
    /// any thread: a task worker, a custom process, a thread of the plugin. An unknown or
    /// finished token gives a handle whose calls return `Err(Closed)`.
    pub fn resume(&self, token: u64) -> ResponseHandle {
        ResponseHandle::new(self.ffi.clone(), token)
    }

    /// A snapshot of the server's counters: per worker, tasks, events, cron jobs, custom
    /// processes, reloads, the process (CPU, memory, descriptors), tables, and whether the
    /// server is starting, serving or stopping. Cheap enough for every scrape.
    pub fn stats(&self) -> ServerStats {
        self.ffi.stats()
    }
}

/// What a factory gets: the component's name and config, and the host handle.
#[derive(Debug)]
pub struct Context<'a> {
    name: &'a str,
    config: &'a str,
    host: &'a Host,
}

impl<'a> Context<'a> {
    /// The component's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The component's config from `server.ron`, as RON text (empty when none).
    pub fn config_text(&self) -> &'a str {
        self.config
    }

    /// The component's config deserialized into the plugin's own type; the type's default
    /// when `server.ron` gives none. `Option` fields take a plain value or `Some(..)`.
    pub fn config<T: DeserializeOwned + Default>(&self) -> Result<T, Error> {
        if self.config.trim().is_empty() {
            return Ok(T::default());
        }
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        Ok(options
            .from_str(self.config)
            .map_err(|e| format!("config of component {:?}: {e}", self.name))?)
    }

    /// The host handle (keep a clone in the instance if it needs it later).
    pub fn host(&self) -> &'a Host {
        self.host
    }

    /// The id of the worker thread the instance is created on.
    pub fn worker_id(&self) -> u32 {
        self.host.worker_id()
    }
}

type Factory = Box<dyn Fn(&Context<'_>) -> Result<Component, Error> + Send + Sync>;

/// A plugin: its name, version and components. Build one in a function and pass that
/// function to [`export_plugin!`](crate::export_plugin).
pub struct Plugin {
    name: String,
    version: String,
    components: Vec<(ComponentKind, String, Factory)>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("components", &self.manifest().components)
            .finish()
    }
}

impl Plugin {
    /// A plugin with no components yet; pass `env!("CARGO_PKG_VERSION")` as the version.
    pub fn new(name: &str, version: &str) -> Self {
        Plugin {
            name: name.to_owned(),
            version: version.to_owned(),
            components: Vec::new(),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn add(mut self, kind: ComponentKind, name: &str, factory: Factory) -> Self {
        assert!(
            !self
                .components
                .iter()
                .any(|(k, n, _)| *k == kind && n == name),
            "plugin {}: {kind} component {name:?} declared twice",
            self.name
        );
        self.components.push((kind, name.to_owned(), factory));
        self
    }

    /// Provides an HTTP handler named `name`, made by `factory` once per worker.
    pub fn http<T, F>(self, name: &str, factory: F) -> Self
    where
        T: HttpHandler,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::HttpHandler,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::HttpHandler(HttpHandlerFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a middleware named `name`.
    pub fn middleware<T, F>(self, name: &str, factory: F) -> Self
    where
        T: Middleware,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::Middleware,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::Middleware(MiddlewareFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a cleaner named `name`.
    pub fn cleaner<T, F>(self, name: &str, factory: F) -> Self
    where
        T: Cleaner,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::Cleaner,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::Cleaner(CleanerFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides lifecycle hooks named `name`.
    pub fn lifecycle<T, F>(self, name: &str, factory: F) -> Self
    where
        T: Lifecycle,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::Lifecycle,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::Lifecycle(LifecycleFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a WebSocket handler named `name`.
    pub fn websocket<T, F>(self, name: &str, factory: F) -> Self
    where
        T: WebSocketHandler,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::WebSocket,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::WebSocket(WebSocketFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a cron job named `name`.
    pub fn cron<T, F>(self, name: &str, factory: F) -> Self
    where
        T: CronJob,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::CronJob,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::CronJob(CronJobFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a task handler named `name`.
    pub fn task<T, F>(self, name: &str, factory: F) -> Self
    where
        T: TaskHandler,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::TaskHandler,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::TaskHandler(TaskHandlerFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides an event listener named `name`.
    pub fn listener<T, F>(self, name: &str, factory: F) -> Self
    where
        T: EventListener,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::EventListener,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::EventListener(EventListenerFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a custom process named `name`.
    pub fn process<T, F>(self, name: &str, factory: F) -> Self
    where
        T: Process,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::Process,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::Process(ProcessFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// Provides a socket handler named `name`.
    pub fn socket<T, F>(self, name: &str, factory: F) -> Self
    where
        T: SocketHandler,
        F: Fn(&Context<'_>) -> Result<T, Error> + Send + Sync + 'static,
    {
        self.add(
            ComponentKind::Socket,
            name,
            Box::new(move |cx| {
                let it = factory(cx)?;
                Ok(Component::Socket(SocketFfi_TO::from_value(
                    Guarded::new(it),
                    TD_Opaque,
                )))
            }),
        )
    }

    /// The manifest the host reads.
    pub fn manifest(&self) -> Manifest {
        Manifest {
            name: self.name.as_str().into(),
            version: self.version.as_str().into(),
            api_version: API_VERSION.into(),
            components: self
                .components
                .iter()
                .map(|(kind, name, _)| ComponentDesc {
                    kind: *kind,
                    name: name.as_str().into(),
                })
                .collect::<RVec<_>>(),
        }
    }

    /// Creates one instance; called by the generated root module, inside the panic guard.
    pub fn instantiate(
        &self,
        kind: ComponentKind,
        name: RStr<'_>,
        config: RStr<'_>,
        host: HostBox,
        worker: WorkerInfo,
    ) -> PluginResult<Component> {
        let Some((_, _, factory)) = self
            .components
            .iter()
            .find(|(k, n, _)| *k == kind && n == name.as_str())
        else {
            return RResult::RErr(PluginError::UnknownComponent(
                format!("{kind} {:?} in plugin {}", name.as_str(), self.name).into(),
            ));
        };
        let host = Host {
            ffi: host,
            worker,
            plugin: self.name.as_str().into(),
        };
        let cx = Context {
            name: name.as_str(),
            config: config.as_str(),
            host: &host,
        };
        // The error's `Display` (and its drop) is plugin code too: inside the guard.
        match guard(|| factory(&cx).map_err(|e| RString::from(e.to_string()))) {
            RResult::ROk(Ok(component)) => RResult::ROk(component),
            RResult::ROk(Err(e)) => RResult::RErr(PluginError::Failed(e)),
            RResult::RErr(panic) => RResult::RErr(panic),
        }
    }
}

/// Wraps an author's component so every call into it is guarded, its drop included (a
/// panic in a `Drop` would otherwise reach abi_stable's `destroy_box`, which exits).
struct Guarded<T>(ManuallyDrop<T>);

impl<T> Guarded<T> {
    fn new(it: T) -> Guarded<T> {
        Guarded(ManuallyDrop::new(it))
    }
}

impl<T> Drop for Guarded<T> {
    fn drop(&mut self) {
        // SAFETY: the value is dropped here once, and never used after.
        let dropped = guard(|| unsafe { ManuallyDrop::drop(&mut self.0) });
        if let RResult::RErr(e) = dropped {
            log::error!(target: PANIC_TARGET, "dropping a component instance {e}");
        }
    }
}

impl<T: HttpHandler> HttpHandlerFfi for Guarded<T> {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()> {
        guard(|| self.0.handle(req, resp))
    }
}

impl<T: Middleware> MiddlewareFfi for Guarded<T> {
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<Flow> {
        guard(|| self.0.on_request(req, resp))
    }
    fn on_response(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<()> {
        guard(|| self.0.on_response(req, resp))
    }
}

impl<T: Cleaner> CleanerFfi for Guarded<T> {
    fn clean(&mut self) -> PluginResult<()> {
        guard(|| self.0.clean())
    }
}

impl<T: Lifecycle> LifecycleFfi for Guarded<T> {
    fn on_server_start(&mut self) -> PluginResult<()> {
        guard(|| self.0.on_server_start())
    }
    fn on_server_stop(&mut self) -> PluginResult<()> {
        guard(|| self.0.on_server_stop())
    }
    fn on_worker_start(&mut self, worker: WorkerInfo) -> PluginResult<()> {
        guard(|| self.0.on_worker_start(worker))
    }
    fn on_worker_stop(&mut self, worker: WorkerInfo) -> PluginResult<()> {
        guard(|| self.0.on_worker_stop(worker))
    }
    fn on_worker_error(&mut self, worker: WorkerInfo, error: RStr<'_>) -> PluginResult<()> {
        guard(|| self.0.on_worker_error(worker, error.as_str()))
    }
    fn on_server_prepare(&mut self) -> PluginResult<()> {
        // The error's `Display` is plugin code too: inside the guard.
        match guard(|| {
            self.0
                .on_server_prepare()
                .map_err(|e| RString::from(e.to_string()))
        }) {
            RResult::ROk(Ok(())) => RResult::ROk(()),
            RResult::ROk(Err(e)) => RResult::RErr(PluginError::Failed(e)),
            RResult::RErr(panic) => RResult::RErr(panic),
        }
    }
}

impl<T: WebSocketHandler> WebSocketFfi for Guarded<T> {
    fn on_handshake(&mut self, req: &Request<'_>, resp: &mut Response) -> PluginResult<Handshake> {
        guard(|| self.0.on_handshake(req, resp))
    }
    fn on_open(&mut self, conn: u64, req: &Request<'_>) -> PluginResult<()> {
        guard(|| self.0.on_open(conn, req))
    }
    fn on_message(&mut self, conn: u64, message: Message<'_>) -> PluginResult<()> {
        guard(|| self.0.on_message(conn, message))
    }
    fn on_close(&mut self, conn: u64, code: u16, reason: RStr<'_>) -> PluginResult<()> {
        guard(|| self.0.on_close(conn, code, reason.as_str()))
    }
}

impl<T: CronJob> CronJobFfi for Guarded<T> {
    fn run(&mut self) -> PluginResult<Schedule> {
        guard(|| self.0.run())
    }
}

impl<T: TaskHandler> TaskHandlerFfi for Guarded<T> {
    fn handle(
        &mut self,
        payload: RSlice<'_, u8>,
        attempt: u32,
    ) -> PluginResult<RResult<RVec<u8>, RString>> {
        guard(|| match self.0.handle(payload.as_slice(), attempt) {
            Ok(v) => RResult::ROk(RVec::from(v)),
            Err(e) => RResult::RErr(RString::from(e)),
        })
    }
    fn finish(&mut self, result: RSlice<'_, u8>) -> PluginResult<()> {
        guard(|| self.0.finish(result.as_slice()))
    }
}

impl<T: EventListener> EventListenerFfi for Guarded<T> {
    fn on_event(
        &mut self,
        event: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> PluginResult<RResult<Propagation, RString>> {
        guard(
            || match self.0.on_event(event.as_str(), payload.as_slice()) {
                Ok(p) => RResult::ROk(p),
                Err(e) => RResult::RErr(RString::from(e)),
            },
        )
    }
}

impl<T: Process> ProcessFfi for Guarded<T> {
    fn run(&mut self, ctx: ProcessCtxBox) -> PluginResult<()> {
        let ctx = ProcessContext { ffi: ctx };
        guard(|| self.0.run(&ctx))
    }
    fn on_reload(&mut self) -> PluginResult<()> {
        guard(|| self.0.on_reload())
    }
    fn on_stop(&mut self) -> PluginResult<()> {
        guard(|| self.0.on_stop())
    }
}

impl<T: SocketHandler> SocketFfi for Guarded<T> {
    fn on_connect(&mut self, conn: u64, peer: RStr<'_>) -> PluginResult<()> {
        guard(|| self.0.on_connect(conn, peer.as_str()))
    }
    fn on_receive(&mut self, conn: u64, frame: RSlice<'_, u8>) -> PluginResult<()> {
        guard(|| self.0.on_receive(conn, frame.as_slice()))
    }
    fn on_close(&mut self, conn: u64) -> PluginResult<()> {
        guard(|| self.0.on_close(conn))
    }
    fn on_packet(
        &mut self,
        peer: u64,
        addr: RStr<'_>,
        datagram: RSlice<'_, u8>,
    ) -> PluginResult<()> {
        guard(|| self.0.on_packet(peer, addr.as_str(), datagram.as_slice()))
    }
}

thread_local! {
    /// The message and location of the last panic on this thread, set by the plugin's hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// How many [`guard`] calls this thread is inside.
    static IN_GUARD: Cell<u32> = const { Cell::new(0) };
}

/// The log target of panics the host did not catch in a call (drops, the plugin's own
/// threads): the host counts records with it.
pub const PANIC_TARGET: &str = "plughost::panic";

/// Installs this plugin's panic hook. Inside [`guard`] it records the message and location
/// instead of printing, since the host logs the panic with the plugin's name; elsewhere (a
/// thread the plugin spawned) it logs the panic through the host, which nothing else would.
pub(crate) fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let msg = payload_message(info.payload());
        let text = match info.location() {
            Some(loc) => format!("{msg} at {}:{}:{}", loc.file(), loc.line(), loc.column()),
            None => msg,
        };
        if IN_GUARD.with(Cell::get) > 0 {
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
        } else {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            log::error!(target: PANIC_TARGET, "thread {name:?} of the plugin panicked: {text}");
        }
    }));
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs plugin code, turning a panic into [`PluginError::Panic`] before it can reach an
/// `extern "C"` frame (where abi_stable would abort the process).
pub fn guard<R>(f: impl FnOnce() -> R) -> PluginResult<R> {
    IN_GUARD.with(|n| n.set(n.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    IN_GUARD.with(|n| n.set(n.get() - 1));
    match result {
        Ok(r) => RResult::ROk(r),
        Err(payload) => {
            let msg = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| payload_message(&*payload));
            // Dropping a payload can itself panic; never let that unwind.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
            RResult::RErr(PluginError::Panic(RString::from(msg)))
        }
    }
}
