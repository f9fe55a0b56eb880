//! The server process: binds the listeners, loads the plugins, starts the workers ([`worker`])
//! and the jobs, and supervises them from the main thread until a signal says stop; reloads
//! ([`reload`], [`watcher`]), the control socket ([`control`], [`state`]), the pid file
//! ([`pidfile`]) and logging ([`logging`]).

pub mod control;
pub mod logging;
pub mod pidfile;
pub mod reload;
pub mod snapshot;
pub mod sockets;
pub mod state;
pub mod supervisor;
pub mod watcher;
pub mod worker;

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{atomic::Ordering, mpsc, Arc, Mutex, RwLock},
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plughost_plugin_api::abi::{Component, LifecycleBox, ThreadKind, WorkerInfo};
use signal_hook::{
    consts::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2},
    iterator::Signals,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    config::{unix_path, ComponentRef, Loaded},
    error::StartError,
    jobs::{self, Finish},
    plan::Plan,
    plugin::{
        host::{Host, ReloadRequest, ReloadRequester},
        Registry,
    },
    runtime::{
        stats::{phase, Stats},
        Shutdown,
    },
    table::Tables,
};
use reload::Live;
use state::State;
use worker::Control;

/// Options of `plughost start`.
#[derive(Debug, Default)]
pub struct Options {
    /// The `-x` version string.
    pub app_version: String,
    /// Listeners bound by the supervisor (one per worker), instead of binding here.
    pub listeners: Option<Vec<TcpListener>>,
    /// What the supervisor says about itself, for `info`.
    pub supervisor: Option<String>,
    /// A restart: the server this one takes over from still holds the fixed ports and unix
    /// socket files of `sockets`, which this one may share (and take) instead of refusing.
    pub share_sockets: bool,
}

/// Binds `n` listeners to `addr` with `SO_REUSEPORT` (port 0: the first picks the port).
/// `share`: the port may be in use by the server this one takes over from (a restart).
pub fn bind(addr: SocketAddr, n: usize, share: bool) -> Result<Vec<TcpListener>, StartError> {
    if addr.port() != 0 && !share {
        // SO_REUSEPORT would let us share a port with another server; refuse that instead.
        TcpListener::bind(addr).map_err(StartError::io(format!("cannot listen on {addr}")))?;
    }
    let first = reuseport_listener(addr)?;
    let actual = first
        .local_addr()
        .map_err(StartError::io("cannot read the bound address"))?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(reuseport_listener(actual)?);
    }
    Ok(all)
}

/// Binds the HTTP listener `listen`: `n` TCP listeners (see [`bind`]), or one unix socket
/// (`unix:PATH`, see `sockets::bind_unix`) shared by the `n` workers, with its file's guard.
pub fn bind_listen(
    listen: &str,
    n: usize,
    mode: u32,
) -> Result<(Vec<TcpListener>, Option<sockets::SocketFile>), StartError> {
    let Some(path) = unix_path(listen) else {
        return Ok((bind(listen.parse().expect("validated"), n, false)?, None));
    };
    let unix = sockets::bind_unix(path, mode, false)?;
    let file = sockets::SocketFile::new(path);
    let mut all = Vec::new();
    for _ in 0..n {
        let dup = unix.try_clone();
        let dup = dup.map_err(StartError::io("cannot clone the unix socket"))?;
        // Only stream-socket calls are made on it (see `runtime::accept`).
        all.push(TcpListener::from(std::os::fd::OwnedFd::from(dup)));
    }
    Ok((all, Some(file)))
}

/// The HTTP listener's address for logs: `http://IP:PORT` or `unix:PATH`.
pub fn listen_url(listen: &str, listener: &TcpListener) -> Result<String, StartError> {
    if unix_path(listen).is_some() {
        return Ok(listen.to_owned());
    }
    let addr = listener.local_addr();
    let addr = addr.map_err(StartError::io("cannot read the bound address"))?;
    Ok(format!("http://{addr}"))
}

fn reuseport_listener(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = StartError::io(format!("cannot listen on {addr}"));
    let make = || -> std::io::Result<TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    make().map_err(err)
}

/// Raises the soft limit of open files to the hard limit (as Go and nginx's
/// `worker_rlimit_nofile` do): every connection is a descriptor, and the usual soft limit,
/// 1024, is far below what a server holds. Warns when even the hard limit is below
/// `websocket.max_connections`.
fn raise_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let soft = limit.rlim_cur;
    if soft < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
            log::debug!("open files limit raised from {soft} to {}", limit.rlim_max);
        } else {
            limit.rlim_cur = soft;
        }
    }
    if (limit.rlim_cur as u128) < max_connections as u128 + 64 {
        log::warn!(
            "the open files limit ({}) is below websocket.max_connections ({max_connections}): \
             raise it (ulimit -n, or LimitNOFILE= under systemd)",
            limit.rlim_cur
        );
    }
}

/// The HTTP worker threads: each one's control channel and thread.
pub(crate) type Workers = Vec<(async_channel::Sender<Control>, thread::JoinHandle<()>)>;

/// Runs the server until it is told to stop. `ready` is called once it is serving.
pub fn run(loaded: Loaded, options: Options, ready: impl FnOnce(&str)) -> Result<(), StartError> {
    let config = &loaded.config;
    raise_fd_limit(config.websocket.max_connections);
    // The tables come first, with all their memory: every thread may use them.
    let tables = Arc::new(Tables::new(&config.tables).map_err(StartError::Table)?);
    let host = Host::new(
        options.app_version.clone(),
        config.env_file.as_deref(),
        tables.clone(),
    );
    let registry = Arc::new(Registry::load(config)?);
    let plan = Arc::new(Plan::build(config, &registry).map_err(|e| loaded.locate(e))?);
    if let Some(statics) = &plan.statics {
        log::info!("static files: {statics}");
    }
    // A unix socket file this process bound is removed when this goes, however `run` ends.
    let (listeners, _http_file) = match options.listeners {
        Some(inherited) => (inherited, None),
        None => bind_listen(&config.listen, config.workers(), config.unix_socket_mode)?,
    };
    let n = listeners.len();
    let listen = listen_url(&config.listen, &listeners[0])?;
    // The unix socket files are removed when they go (the reload state keeps them).
    let (socket_listeners, socket_files) =
        sockets::bind(&plan, |_| true, (n, options.share_sockets), &host)?;

    // Signals first, so a stop during start-up is not lost.
    let signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2])
        .map_err(StartError::io("cannot install signal handlers"))?;
    let stats = Arc::new(Stats::new(n));
    // The server hooks prepare what the workers need (the env file) before they serve.
    let mut hooks = ServerHooks::create(&plan, &host)?;
    hooks.prepare(&host)?;
    let (workers, services) = start_serving(listeners, socket_listeners, &plan, &host, &stats)?;
    hooks.each("on_server_start", |h| h.on_server_start());

    let state = Arc::new(State {
        config_path: loaded.path.clone(),
        listen: listen.clone(),
        workers: n,
        app_version: options.app_version.clone(),
        registry: RwLock::new(registry.clone()),
        stats: stats.clone(),
        stray_panics: host.stray_panics(),
        supervisor: options.supervisor.clone(),
        connections: host.connections().clone(),
        tables,
        last_reload: Mutex::new(None),
        deferrals: host.deferrals().clone(),
    });
    let socket = control::socket_path(&config.runtime_dir);
    let control = control::serve(&socket, state.clone()).map_err(StartError::io(format!(
        "cannot open the control socket {}",
        socket.display()
    )))?;
    let (events_tx, events) = mpsc::channel();
    host.set_reload_requester(reload_requests_to(events_tx.clone()));
    forward_signals(signals, events_tx.clone(), Event::Signal)
        .map_err(StartError::io("cannot start the signal thread"))?;
    serving(&host, &state);
    let mut live = Live::new(&loaded, registry, plan, host, services);
    live.socket_files = socket_files;
    live.start_watcher(events_tx, Event::Changed);

    // Ready only now: everything a client or a test may do next (a signal, an edit of a
    // watched file) is heard from here on. The supervisor hears it before the log says it,
    // so a crash right after the ready line counts as a crash, not as a failed start.
    ready(&listen);
    log::info!(
        "plughost {} ready: listening on {listen} ({n} worker{}, pid {})",
        env!("CARGO_PKG_VERSION"),
        if n == 1 { "" } else { "s" },
        std::process::id()
    );

    let signal = serve_until_stopped(&events, &mut live, &workers, &state);
    stop(signal, live, workers, &mut hooks, &stats);
    drop(hooks);
    control.remove();
    Ok(())
}

/// The workers, then the jobs (which hand task results back to the workers).
fn start_serving(
    listeners: Vec<TcpListener>,
    socket_listeners: sockets::PerWorker,
    plan: &Arc<Plan>,
    host: &Host,
    stats: &Arc<Stats>,
) -> Result<(Workers, jobs::Services), StartError> {
    let workers = start_workers(listeners, socket_listeners, plan, host, stats)?;
    match jobs::start(plan, host, stats, finish_to(&workers)) {
        Ok(services) => Ok((workers, services)),
        Err(e) => {
            stop_workers(workers, Shutdown::Fast);
            Err(e)
        }
    }
}

/// Every worker started: plugins see it in `Host::stats` from now on (readiness).
fn serving(host: &Host, state: &Arc<State>) {
    host.set_stats(Arc::new(snapshot::Snapshots(state.clone())));
    state.stats.phase.store(phase::SERVING, Ordering::Relaxed);
}

/// Starts `worker_num` workers, one per listener, and waits until each serves (or one fails).
fn start_workers(
    listeners: Vec<TcpListener>,
    socket_listeners: sockets::PerWorker,
    plan: &Arc<Plan>,
    host: &Host,
    stats: &Arc<Stats>,
) -> Result<Workers, StartError> {
    let n = listeners.len();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut workers = Vec::new();
    // Unbounded: task results (`Control::Finish`) must neither block a task worker nor be
    // dropped; they are bounded by the task queue, whose tasks each finish at most once.
    let channels: Vec<_> = (0..n).map(|_| async_channel::unbounded()).collect();
    let peers = Arc::new(
        channels
            .iter()
            .map(|(tx, _)| tx.clone())
            .collect::<Vec<_>>(),
    );
    let lobbies = Arc::new((0..n).map(|_| Arc::default()).collect::<Vec<_>>());
    let each = listeners.into_iter().zip(socket_listeners).zip(channels);
    for (id, ((listener, socket_listeners), (tx, rx))) in each.enumerate() {
        let handle = worker::spawn(worker::Setup {
            id: id as u32,
            listener,
            plan: plan.clone(),
            host: host.clone(),
            stats: stats.clone(),
            control: rx,
            peers: peers.clone(),
            lobbies: lobbies.clone(),
            socket_listeners,
            ready: ready_tx.clone(),
        });
        match handle {
            Ok(h) => workers.push((tx, h)),
            Err(e) => {
                stop_workers(workers, Shutdown::Fast);
                return Err(StartError::io("cannot start a worker thread")(e));
            }
        }
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..n {
        let (id, reason) = match ready_rx.recv() {
            Ok((_, Ok(()))) => continue,
            Ok((id, Err(reason))) => (id, reason),
            Err(_) => (0, "a worker thread exited during start".into()),
        };
        failure.get_or_insert(StartError::Worker { id, reason });
    }
    match failure {
        Some(e) => {
            stop_workers(workers, Shutdown::Fast);
            Err(e)
        }
        None => Ok(workers),
    }
}

/// How a task worker hands a task's result to the HTTP worker that delivered it.
fn finish_to(workers: &Workers) -> Finish {
    let senders: Vec<_> = workers.iter().map(|(tx, _)| tx.clone()).collect();
    Arc::new(move |worker, task, result| {
        senders
            .get(worker as usize)
            .is_some_and(|tx| tx.try_send(Control::Finish { task, result }).is_ok())
    })
}

/// The server hooks: one instance of each lifecycle component, on the main thread.
struct ServerHooks(Vec<(ComponentRef, LifecycleBox)>);

impl ServerHooks {
    fn create(plan: &Plan, host: &Host) -> Result<ServerHooks, StartError> {
        let info = WorkerInfo {
            kind: ThreadKind::Main,
            id: 0,
        };
        let mut hooks = Vec::new();
        for slot in &plan.hooks {
            if let Component::Lifecycle(h) = slot.instantiate(&host.boxed(), info)? {
                hooks.push((slot.reference.clone(), h));
            }
        }
        Ok(ServerHooks(hooks))
    }

    /// `on_server_prepare` of each, in order; the first failure stops the start. Then the env
    /// file, which a hook may have written, is read again.
    fn prepare(&mut self, host: &Host) -> Result<(), StartError> {
        for (r, h) in self.0.iter_mut() {
            match h.on_server_prepare() {
                RResult::ROk(()) => {}
                RResult::RErr(plughost_plugin_api::abi::PluginError::Failed(reason)) => {
                    return Err(StartError::Prepare {
                        component: r.to_string(),
                        reason: reason.into(),
                    })
                }
                RResult::RErr(e) => log::error!("hook on_server_prepare of {r} failed: {e}"),
            }
        }
        if !self.0.is_empty() {
            host.reread_env();
        }
        Ok(())
    }

    fn each(
        &mut self,
        what: &str,
        call: impl Fn(&mut LifecycleBox) -> RResult<(), plughost_plugin_api::abi::PluginError>,
    ) {
        for (r, h) in self.0.iter_mut() {
            if let RResult::RErr(e) = call(h) {
                log::error!("hook {what} of {r} failed: {e}");
            }
        }
    }
}

/// Where plugins' `host.request_reload` goes: the main thread's events.
fn reload_requests_to(tx: mpsc::Sender<Event>) -> ReloadRequester {
    let tx = Mutex::new(tx);
    ReloadRequester(Box::new(move |r| {
        let tx = tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(Event::Requested(r)).is_ok()
    }))
}

/// Sends each signal `signals` catches to `tx` (as `wrap(signal)`), from a thread of its own,
/// until the receiver is gone.
pub(crate) fn forward_signals<E: Send + 'static>(
    mut signals: Signals,
    tx: mpsc::Sender<E>,
    wrap: fn(i32) -> E,
) -> std::io::Result<()> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if tx.send(wrap(signal)).is_err() {
                    return;
                }
            }
        })
        .map(drop)
}

/// What the main thread waits for.
#[derive(Debug)]
pub(crate) enum Event {
    Signal(i32),
    Changed(PathBuf),
    /// A plugin's `host.request_reload`.
    Requested(ReloadRequest),
}

/// Serves (reloading on SIGUSR1 and on watched changes) until a stop signal; returns it.
fn serve_until_stopped(
    events: &mpsc::Receiver<Event>,
    live: &mut Live,
    workers: &Workers,
    state: &State,
) -> i32 {
    let mut pending: Option<Event> = None;
    loop {
        let Some(event) = pending.take().or_else(|| events.recv().ok()) else {
            return SIGTERM;
        };
        match event {
            Event::Signal(SIGUSR1) => {
                log::info!(
                    "reload requested (SIGUSR1): re-reading the config and reloading every plugin"
                );
                live.apply(&reload::Trigger::All, workers, state);
            }
            Event::Signal(signal) if [SIGINT, SIGTERM, SIGQUIT, SIGUSR2].contains(&signal) => {
                return signal
            }
            Event::Signal(_) => {}
            Event::Requested(r) => {
                log::info!(
                    "reload requested by plugin {}: {}; re-reading the config and the env file, reloading every plugin",
                    r.plugin,
                    r.reason
                );
                live.apply(&reload::Trigger::All, workers, state);
            }
            Event::Changed(first) => {
                let (changed, next) = debounce(events, first, live.debounce());
                pending = next;
                if let Some(trigger) = live.trigger_for(&changed) {
                    log::info!("change detected: {}", trigger.describe());
                    live.apply(&trigger, workers, state);
                }
            }
        }
    }
}

/// A build writes several files: gathers changes until it has been quiet for `quiet`.
/// Returns them, and an event of another kind that ended the wait.
fn debounce(
    events: &mpsc::Receiver<Event>,
    first: PathBuf,
    quiet: Duration,
) -> (BTreeSet<PathBuf>, Option<Event>) {
    let mut changed = BTreeSet::from([first]);
    loop {
        match events.recv_timeout(quiet) {
            Ok(Event::Changed(p)) => {
                changed.insert(p);
            }
            Ok(other) => return (changed, Some(other)),
            Err(_) => return (changed, None),
        }
    }
}

/// A graceful stop: jobs stop taking work, workers drain within `max_wait_time`, then the
/// jobs are joined and the server hooks say goodbye.
fn stop(signal: i32, mut live: Live, workers: Workers, hooks: &mut ServerHooks, stats: &Stats) {
    // Before the log line says so: readiness probes answer 503 from here on.
    stats.phase.store(phase::STOPPING, Ordering::Relaxed);
    let max_wait = live.max_wait();
    let (name, how) = match signal {
        SIGINT => ("SIGINT", Shutdown::Graceful(max_wait)),
        SIGQUIT => ("SIGQUIT", Shutdown::Graceful(max_wait)),
        SIGUSR2 => (
            "SIGUSR2: a new server took over",
            Shutdown::Handover(max_wait),
        ),
        _ => ("SIGTERM", Shutdown::Graceful(max_wait)),
    };
    log::info!(
        "stopping ({name}): no new connections, waiting up to {}s for in-flight requests",
        max_wait.as_secs()
    );
    let started = Instant::now();
    live.services.begin_stop();
    stop_workers(workers, how);
    live.services.finish_stop(started, max_wait);
    drop(live);
    hooks.each("on_server_stop", |h| h.on_server_stop());
    log::info!(
        "stopped after {} requests (drained in {} ms)",
        stats.sum(|w| &w.requests),
        started.elapsed().as_millis()
    );
}

/// Tells every worker to stop and waits for their threads.
fn stop_workers(workers: Workers, how: Shutdown) {
    for (tx, _) in &workers {
        let _ = tx.try_send(Control::Stop(how));
    }
    // A worker stuck in a plugin call cannot be interrupted; past max_wait_time (and a moment
    // for the worker to close its connections) we stop waiting and the process exits anyway.
    let wait = match how {
        Shutdown::Graceful(d) | Shutdown::Handover(d) => d,
        Shutdown::Fast => Duration::ZERO,
    };
    let deadline = Instant::now() + wait + Duration::from_millis(500);
    for (i, (_, handle)) in workers.into_iter().enumerate() {
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            if handle.join().is_err() {
                log::error!("worker {i} panicked while stopping");
            }
        } else {
            log::warn!("worker {i} is still inside a plugin call after max_wait_time; leaving it");
        }
    }
}
