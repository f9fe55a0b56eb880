//! The server: binds the listeners, loads the plugins, starts the workers, and supervises
//! them from the main thread until a signal says stop.

pub mod http;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{mpsc, Arc, RwLock},
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
    config::Loaded,
    control,
    error::StartError,
    host::Host,
    pidfile,
    pipeline::Plan,
    plugin::Registry,
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
pub fn run(loaded: Loaded, options: Options, ready: impl FnOnce(SocketAddr)) -> Result<(), StartError> {
    let config = &loaded.config;
    let runtime = &config.runtime_dir;
    let host = Host::new(options.app_version.clone(), config.env_file.as_deref());
    let registry = Arc::new(Registry::load(config)?);
    let plan = Arc::new(Plan::build(config, &registry)?);
    let n = config.workers();
    let addr: SocketAddr = config.listen.parse().expect("validated");
    let listeners = bind(addr, n)?;
    let listen = listeners[0].local_addr().map_err(StartError::io("cannot read the bound address"))?;

    // Signals first, so a stop during start-up is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGUSR1])
        .map_err(StartError::io("cannot install signal handlers"))?;

    let stats = Arc::new(Stats::new(n));
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut workers = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = async_channel::bounded(4);
        let handle = worker::spawn(
            id as u32,
            listener,
            plan.clone(),
            host.boxed(),
            stats.clone(),
            rx,
            ready_tx.clone(),
        )
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
    let _control = control::serve(&socket, state.clone())
        .map_err(StartError::io(format!("cannot open the control socket {}", socket.display())))?;

    log::info!(
        "plughost {} ready: listening on http://{listen} ({n} worker{}, pid {})",
        env!("CARGO_PKG_VERSION"),
        if n == 1 { "" } else { "s" },
        std::process::id()
    );
    ready(listen);

    let max_wait = Duration::from_secs(config.max_wait_time);
    for signal in signals.forever() {
        match signal {
            SIGUSR1 => {
                log::info!("reload requested (SIGUSR1): hot reload of plugins is not available in this build; restart to pick up changes");
            }
            SIGINT | SIGTERM | SIGQUIT => {
                let name = match signal {
                    SIGINT => "SIGINT",
                    SIGQUIT => "SIGQUIT",
                    _ => "SIGTERM",
                };
                log::info!(
                    "stopping ({name}): no new connections, waiting up to {}s for in-flight requests",
                    config.max_wait_time
                );
                break;
            }
            _ => {}
        }
    }
    let started = Instant::now();
    stop_workers(workers, Shutdown::Graceful(max_wait));
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
fn stop_workers(workers: Vec<(async_channel::Sender<Control>, thread::JoinHandle<()>)>, how: Shutdown) {
    for (tx, _) in &workers {
        let _ = tx.try_send(Control::Stop(how));
    }
    for (_, handle) in workers {
        if handle.join().is_err() {
            log::error!("a worker thread panicked while stopping");
        }
    }
}
