//! The server: binds the listeners, loads the plugins, starts the workers, and supervises
//! them from the main thread until a signal says stop.

pub mod http;
pub mod ws;

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{atomic::Ordering, mpsc, Arc, RwLock},
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plughost_plugin_api::abi::{Component, ThreadKind, WorkerInfo};
use signal_hook::{
    consts::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1},
    iterator::Signals,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    config::{Config, Loaded},
    control,
    error::StartError,
    host::Host,
    pidfile,
    pipeline::Plan,
    plugin::Registry,
    reload::{
        self,
        watcher::{watch_key, Watcher},
    },
    services::{self, Services},
    stats::Stats,
    worker::{self, Control},
};

/// How to stop: a value handed to every worker (and later every service), not a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop accepting, let in-flight requests finish within the duration.
    Graceful(Duration),
    /// Close everything now.
    Fast,
}

/// What `info` reports, shared with the control socket.
#[derive(Debug)]
pub struct State {
    /// The config file.
    pub config_path: PathBuf,
    /// The address actually bound.
    pub listen: SocketAddr,
    /// Worker threads.
    pub workers: usize,
    /// The `-x` version string.
    pub app_version: String,
    /// Loaded plugins.
    pub registry: RwLock<Arc<Registry>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// Options of `plughost start`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `-x` version string.
    pub app_version: String,
}

/// Binds `n` listeners to `addr` with `SO_REUSEPORT` (port 0: the first picks the port).
pub fn bind(addr: SocketAddr, n: usize) -> Result<Vec<TcpListener>, StartError> {
    if addr.port() != 0 {
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

/// Runs the server until it is told to stop. `ready` is called once it is serving.
pub fn run(
    loaded: Loaded,
    options: Options,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), StartError> {
    let config = &loaded.config;
    let runtime = &config.runtime_dir;
    let host = Host::new(options.app_version.clone(), config.env_file.as_deref());
    let registry = Arc::new(Registry::load(config)?);
    let plan = Arc::new(Plan::build(config, &registry)?);
    let n = config.workers();
    let addr: SocketAddr = config.listen.parse().expect("validated");
    let listeners = bind(addr, n)?;
    let listen = listeners[0]
        .local_addr()
        .map_err(StartError::io("cannot read the bound address"))?;

    // Signals first, so a stop during start-up is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGUSR1])
        .map_err(StartError::io("cannot install signal handlers"))?;

    let stats = Arc::new(Stats::new(n));
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
    for (id, (listener, (tx, rx))) in listeners.into_iter().zip(channels).enumerate() {
        let handle = worker::spawn(worker::Setup {
            id: id as u32,
            listener,
            plan: plan.clone(),
            host: host.clone(),
            stats: stats.clone(),
            control: rx,
            peers: peers.clone(),
            lobbies: lobbies.clone(),
            ready: ready_tx.clone(),
        })
        .map_err(StartError::io("cannot start a worker thread"))?;
        workers.push((tx, handle));
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((id, Err(reason))) => {
                failure.get_or_insert(StartError::Worker { id, reason });
            }
            Err(_) => {
                failure.get_or_insert(StartError::Worker {
                    id: 0,
                    reason: "a worker thread exited during start".into(),
                });
            }
        }
    }
    if let Some(e) = failure {
        stop_workers(workers, Shutdown::Fast);
        return Err(e);
    }

    // Server hooks: one instance of each hook component, on the main thread.
    let main_info = WorkerInfo {
        kind: ThreadKind::Main,
        id: 0,
    };
    let mut hooks = Vec::new();
    for slot in &plan.hooks {
        match slot.instantiate(&host.boxed(), main_info) {
            Ok(Component::Lifecycle(h)) => hooks.push((slot.reference.clone(), h)),
            Ok(_) => {}
            Err(e) => {
                stop_workers(workers, Shutdown::Fast);
                return Err(e.into());
            }
        }
    }
    // Task workers, the timer and custom processes.
    let senders = workers.iter().map(|(tx, _)| tx.clone()).collect();
    let services = match services::start(&plan, &host, &stats, senders) {
        Ok(s) => s,
        Err(e) => {
            stop_workers(workers, Shutdown::Fast);
            return Err(e);
        }
    };
    for (r, h) in hooks.iter_mut() {
        if let RResult::RErr(e) = h.on_server_start() {
            log::error!("hook on_server_start of {r} failed: {e}");
        }
    }

    let state = Arc::new(State {
        config_path: loaded.path.clone(),
        listen,
        workers: n,
        app_version: options.app_version.clone(),
        registry: RwLock::new(registry),
        stats: stats.clone(),
    });
    let socket = control::socket_path(runtime);
    let _control = control::serve(&socket, state.clone()).map_err(StartError::io(format!(
        "cannot open the control socket {}",
        socket.display()
    )))?;

    let (events_tx, events) = mpsc::channel();
    let signal_tx = events_tx.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(Event::Signal(signal)).is_err() {
                    return;
                }
            }
        })
        .map_err(StartError::io("cannot start the signal thread"))?;
    let mut live = Live {
        config: loaded.config.clone(),
        config_path: loaded.path.clone(),
        registry: state.registry.read().map(|r| r.clone()).unwrap_or_default(),
        plan,
        host,
        watcher: None,
        services,
    };
    if live.config.reload.inotify {
        match Watcher::start(events_tx.clone(), Event::Changed) {
            Ok(w) => {
                live.watcher = Some(w);
                live.watch_all();
                log::info!(
                    "hot reload: watching the plugin files and {} (debounce {} ms)",
                    live.config_path.display(),
                    live.config.reload.debounce_ms
                );
            }
            Err(e) => log::error!("hot reload: cannot start the inotify watcher: {e}"),
        }
    }
    drop(events_tx);

    // Ready only now: everything a client or a test may do next (a signal, an edit of a
    // watched file) is heard from here on.
    log::info!(
        "plughost {} ready: listening on http://{listen} ({n} worker{}, pid {})",
        env!("CARGO_PKG_VERSION"),
        if n == 1 { "" } else { "s" },
        std::process::id()
    );
    ready(listen);

    let mut pending: Option<Event> = None;
    let stop_signal = loop {
        let Some(event) = pending.take().or_else(|| events.recv().ok()) else {
            break SIGTERM;
        };
        match event {
            Event::Signal(SIGUSR1) => {
                log::info!(
                    "reload requested (SIGUSR1): re-reading the config and reloading every plugin"
                );
                live.apply(&reload::Trigger::All, &workers, &state);
            }
            Event::Signal(signal) if [SIGINT, SIGTERM, SIGQUIT].contains(&signal) => break signal,
            Event::Signal(_) => {}
            Event::Changed(first) => {
                // Debounce: a build writes several files; act once it has been quiet.
                let mut changed = BTreeSet::from([first]);
                let quiet = Duration::from_millis(live.config.reload.debounce_ms);
                loop {
                    match events.recv_timeout(quiet) {
                        Ok(Event::Changed(p)) => {
                            changed.insert(p);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Some(trigger) = live.trigger_for(&changed) {
                    log::info!("change detected: {}", describe_trigger(&trigger));
                    live.apply(&trigger, &workers, &state);
                }
            }
        }
    };
    let name = match stop_signal {
        SIGINT => "SIGINT",
        SIGQUIT => "SIGQUIT",
        _ => "SIGTERM",
    };
    let max_wait = Duration::from_secs(live.config.max_wait_time);
    log::info!(
        "stopping ({name}): no new connections, waiting up to {}s for in-flight requests",
        live.config.max_wait_time
    );
    let started = Instant::now();
    live.services.begin_stop();
    stop_workers(workers, Shutdown::Graceful(max_wait));
    live.services.finish_stop(started, max_wait);
    drop(live);
    for (r, h) in hooks.iter_mut() {
        if let RResult::RErr(e) = h.on_server_stop() {
            log::error!("hook on_server_stop of {r} failed: {e}");
        }
    }
    drop(hooks);
    let _ = std::fs::remove_file(&socket);
    pidfile::remove(&pidfile::path(runtime));
    log::info!(
        "stopped after {} requests (drained in {} ms)",
        stats.sum(|w| &w.requests),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Tells every worker to stop and waits for their threads.
fn stop_workers(
    workers: Vec<(async_channel::Sender<Control>, thread::JoinHandle<()>)>,
    how: Shutdown,
) {
    for (tx, _) in &workers {
        let _ = tx.try_send(Control::Stop(how));
    }
    // A worker stuck in a plugin call cannot be interrupted; past max_wait_time (and a moment
    // for the worker to close its connections) we stop waiting and the process exits anyway.
    let wait = match how {
        Shutdown::Graceful(d) => d,
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

/// What the main thread waits for.
#[derive(Debug)]
enum Event {
    Signal(i32),
    Changed(PathBuf),
}

fn describe_trigger(t: &reload::Trigger) -> String {
    match t {
        reload::Trigger::All => "reloading every plugin".into(),
        reload::Trigger::Config => "the config changed".into(),
        reload::Trigger::Plugins(names) => format!(
            "plugin file of {} changed",
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// What is in force now, and how to change it.
struct Live {
    config: Config,
    config_path: PathBuf,
    registry: Arc<Registry>,
    plan: Arc<Plan>,
    host: Host,
    watcher: Option<Watcher>,
    services: Services,
}

impl Live {
    /// Watches the folders of the config, the enabled plugins and `reload.watch`.
    fn watch_all(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        dirs.extend(self.config_path.parent().map(PathBuf::from));
        for (_, p) in self.config.enabled_plugins() {
            dirs.extend(p.path.parent().map(PathBuf::from));
        }
        for extra in &self.config.reload.watch {
            if extra.is_dir() {
                dirs.push(extra.clone());
            } else {
                dirs.extend(extra.parent().map(PathBuf::from));
            }
        }
        for dir in dirs {
            if let Err(e) = w.watch(&dir) {
                log::warn!("hot reload: cannot watch {}: {e}", dir.display());
            }
        }
    }

    /// What a set of changed files means, if anything.
    fn trigger_for(&self, changed: &BTreeSet<PathBuf>) -> Option<reload::Trigger> {
        let config_key = watch_key(&self.config_path);
        if changed.iter().any(|p| Some(p) == config_key.as_ref()) {
            return Some(reload::Trigger::Config);
        }
        for extra in &self.config.reload.watch {
            let hit = match extra.canonicalize() {
                Ok(dir) if dir.is_dir() => changed.iter().any(|p| p.starts_with(&dir)),
                _ => watch_key(extra).is_some_and(|k| changed.contains(&k)),
            };
            if hit {
                return Some(reload::Trigger::All);
            }
        }
        let plugins: BTreeSet<String> = self
            .config
            .enabled_plugins()
            .filter(|(_, p)| watch_key(&p.path).is_some_and(|k| changed.contains(&k)))
            .map(|(n, _)| n.clone())
            .collect();
        (!plugins.is_empty()).then_some(reload::Trigger::Plugins(plugins))
    }

    /// Prepares the reload on this thread, then has every worker swap.
    fn apply(
        &mut self,
        trigger: &reload::Trigger,
        workers: &[(async_channel::Sender<Control>, thread::JoinHandle<()>)],
        state: &State,
    ) {
        let started = Instant::now();
        let fail = |why: String| {
            state.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
            log::error!("reload refused, the running version keeps serving: {why}");
        };
        let new_config = match trigger {
            reload::Trigger::Plugins(_) => None,
            _ => match Config::load(&self.config_path, None) {
                Ok(l) => Some(l.config),
                Err(e) => {
                    if *trigger == reload::Trigger::Config {
                        return fail(format!("{e}; keeping the running config"));
                    }
                    log::error!("{e}; keeping the running config");
                    None
                }
            },
        };
        let prepared = match reload::prepare(
            &self.config,
            &self.registry,
            &self.plan,
            new_config,
            trigger,
            &self.host,
        ) {
            Ok(p) => p,
            Err(why) => return fail(why),
        };
        let (reply_tx, replies) = mpsc::channel();
        for (tx, _) in workers {
            let _ = tx.try_send(Control::Reload(prepared.plan.clone(), reply_tx.clone()));
        }
        drop(reply_tx);
        let mut swapped = 0;
        let deadline = Instant::now() + Duration::from_secs(self.config.max_wait_time + 30);
        for _ in workers {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(left) {
                Ok((_, Ok(_))) => swapped += 1,
                Ok((id, Err(e))) => log::error!("worker {id} kept its old instances: {e}"),
                Err(_) => {
                    log::error!("a worker did not answer the reload in time");
                    break;
                }
            }
        }
        self.config = prepared.config;
        self.registry = prepared.registry;
        self.plan = prepared.plan;
        self.services.reload(&self.plan);
        if let Ok(mut r) = state.registry.write() {
            *r = self.registry.clone();
        }
        self.watch_all();
        state.stats.reloads.fetch_add(1, Ordering::Relaxed);
        let (held, bytes) = crate::plugin::loader::held();
        let what = if prepared.loaded.is_empty() {
            "config".to_owned()
        } else {
            format!("plugin {}", prepared.loaded.join(", "))
        };
        log::info!(
            "reloaded {what} on {swapped}/{} workers in {} ms; library versions held: {held} ({} kB)",
            workers.len(),
            started.elapsed().as_millis(),
            bytes / 1024
        );
    }
}
