//! An HTTP worker: one thread, one `LocalExecutor` on its own epoll (see `runtime::reactor`),
//! its own `SO_REUSEPORT` listener and its own instance of every component. Instances never
//! leave the thread, so plugin code needs no locks. A handler call is synchronous; the IO
//! around it is async. A connection lives on one worker; between two requests an idle worker
//! may take it over from a stalled one (see `runtime::steal`). The connection loops reach the
//! worker through the `http::Site` and `ws::Site` traits it implements.
//!
//! A sweeper task keeps a coarse clock and the `date` header, and closes connections that
//! overstay a timeout (it half-closes the socket's read side, which wakes the connection's
//! pending read), so the hot path sets no timers.

mod sockets;

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    panic::AssertUnwindSafe,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use async_executor::LocalExecutor;
use futures_lite::FutureExt;
use plughost_plugin_api::{
    abi::{HostBox, ThreadKind, WorkerInfo},
    Request, Response,
};

use crate::{
    config::Limits,
    http::Site as _,
    http::{
        self,
        pipeline::{Instances, WsTarget},
    },
    plan::Plan,
    plugin::host::Host,
    router::{Match, Router},
    runtime::{
        calls,
        conn::{Conn, Phase},
        reactor::{self, Async, Timer},
        stats::{Stats, WorkerStats},
        steal::{self, Lobby, Scratch, Watch},
        Shutdown,
    },
    socket::registry::Sockets,
    statics::{cache::Cache, Statics},
    ws::{self, registry::Connections, Binding, WsEvent, WsSettings},
};

/// Messages from the main thread.
#[derive(Debug)]
pub enum Control {
    /// Stop, gracefully or not.
    Stop(Shutdown),
    /// Serve a connection another worker accepted (to even out keep-alive connections);
    /// true: it came to a `protocol: WebSocket` socket.
    Adopt(TcpStream, SocketAddr, bool),
    /// Move to a new plan between two requests; the reply says how many instances were
    /// created, or why the old ones stay.
    Reload(Arc<Plan>, mpsc::Sender<(u32, Result<usize, String>)>),
    /// Another worker took over connection `id` (see `steal`): let its task go.
    Released(u64),
    /// Sockets a reload added: this worker's listener of each, with the socket's key.
    Sockets(Vec<(String, crate::socket::Listener)>),
    /// The result of a task this worker delivered: run its handler's `finish` here.
    Finish {
        /// The task handler, `plugin.component`.
        task: String,
        /// What `handle` returned.
        result: Vec<u8>,
    },
}

/// The worker's state, owned by its thread.
pub struct Worker {
    info: WorkerInfo,
    plan: RefCell<Arc<Plan>>,
    host: HostBox,
    /// Every worker's control channel, by id.
    peers: Arc<Vec<async_channel::Sender<Control>>>,
    /// Every worker's connections as the others see them, by id.
    lobbies: Arc<Vec<Arc<Lobby>>>,
    connections: Arc<Connections>,
    /// `None` after instances could not be recreated; retried on the next request.
    instances: RefCell<Option<Instances>>,
    conns: RefCell<HashMap<u64, Rc<Conn>>>,
    next_conn: Cell<u64>,
    now: Cell<Instant>,
    date: RefCell<[u8; 29]>,
    date_secs: Cell<i64>,
    draining: Cell<bool>,
    /// Draining closes idle keep-alive connections at once (not on a handover).
    close_idle: Cell<bool>,
    stats: Arc<Stats>,
    /// Failed accepts, for a log line a second.
    accept_failures: AcceptFailures,
    /// Connections closed since memory was last handed back.
    closed_since_trim: Cell<u64>,
    /// Bumped by every reload, so WebSocket bindings resolve again.
    generation: Cell<u64>,
    /// This worker's WebSocket connections and the handler each belongs to.
    ws_bindings: RefCell<HashMap<u64, Rc<Binding>>>,
    /// Every worker's socket connections.
    sockets: Arc<Sockets>,
    /// This worker's open socket connections.
    socket_conns: Cell<usize>,
    /// The socket each of them belongs to (its key).
    socket_of: RefCell<HashMap<u64, Rc<str>>>,
    /// The accept (or receive) loop of each socket, by key.
    socket_loops: RefCell<HashMap<String, async_executor::Task<()>>>,
    /// Small static files this worker served.
    static_cache: RefCell<Cache>,
}

/// The handler slot that serves `b` in `plan`: its route must still lead to its component.
fn resolve(plan: &Plan, b: &Binding) -> Option<usize> {
    plan.ws_routes
        .iter()
        .find(|(path, _)| *path == b.route)
        .map(|(_, i)| *i)
        .filter(|&i| plan.websocket[i].reference == b.component)
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Worker {
    fn my_stats(&self) -> &WorkerStats {
        &self.stats.workers[self.info.id as usize]
    }

    /// The worker to hand a new connection to, when this one has two more than it.
    /// Never a worker inside a plugin call: it may be stuck there, and a connection handed
    /// to it waits in its channel where no other worker can take it over.
    fn lighter_peer(&self) -> Option<usize> {
        let mine = self.my_stats().connections.load(Ordering::Relaxed);
        let (id, least) = self
            .stats
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.in_call.load(Ordering::Relaxed))
            .map(|(i, w)| (i, w.connections.load(Ordering::Relaxed)))
            .min_by_key(|(_, c)| *c)?;
        (id != self.info.id as usize && mine >= least + 2 && !self.draining()).then_some(id)
    }

    /// Whether a stopping worker is done: no connection left, none on its way here.
    fn drained(&self, control: &async_channel::Receiver<Control>) -> bool {
        let accepting = self
            .stats
            .workers
            .iter()
            .any(|w| w.accepting.load(Ordering::Relaxed));
        self.conns.borrow().is_empty()
            && self.socket_conns.get() == 0
            && !accepting
            && control.is_empty()
    }

    /// A new global connection id: this worker's id in the high 16 bits.
    fn next_id(&self) -> u64 {
        let local = self.next_conn.get();
        self.next_conn.set(local + 1);
        ((self.info.id as u64) << 48) | (local & ((1 << 48) - 1))
    }

    fn lobby(&self) -> &Arc<Lobby> {
        &self.lobbies[self.info.id as usize]
    }

    /// About to sleep: takes over connections waiting on a stalled worker, and says how long
    /// to sleep at most before looking again.
    fn on_idle(
        self: &Rc<Self>,
        ex: &Rc<LocalExecutor<'static>>,
        watch: &mut Watch,
        scratch: &mut Scratch,
    ) -> Option<Duration> {
        let after = self.plan.borrow().steal_after_us;
        if after == 0 || self.draining() || self.lobbies.len() < 2 {
            return None;
        }
        let me = self.info.id as usize;
        // At most one new connection from stuck workers' backlogs per look: this worker may
        // get stuck with it, and those behind it should go to other idle workers.
        let mut took_new = false;
        let next = watch.check(me, &self.lobbies, Duration::from_micros(after), |from| {
            // New connections waiting in the stuck worker's listen backlog are served here.
            let accepted = if took_new {
                Vec::new()
            } else {
                steal::accept_from(&self.lobbies[from], BACKLOG_BATCH)
            };
            let from_backlog = accepted.len();
            if from_backlog > 0 {
                took_new = true;
                log::trace!(
                    "worker {me}: accepted {from_backlog} from stalled worker {from}'s backlog"
                );
                self.my_stats()
                    .from_backlog
                    .fetch_add(from_backlog as u64, Ordering::Relaxed);
            }
            for (stream, peer) in accepted {
                adopt(ex, self, stream, peer, Origin::Accepted, false);
            }
            let taken = steal::take_from(&self.lobbies[from], scratch);
            if taken.is_empty() {
                return from_backlog;
            }
            log::trace!(
                "worker {me}: took over {} connection(s) from stalled worker {from}",
                taken.len()
            );
            let n = taken.len() as u64;
            self.stats.workers[from]
                .connections
                .fetch_sub(n, Ordering::Relaxed);
            let mine = self.my_stats();
            mine.connections.fetch_add(n, Ordering::Relaxed);
            mine.taken_over.fetch_add(n, Ordering::Relaxed);
            for t in taken {
                let _ = self.peers[from].try_send(Control::Released(t.id));
                adopt(ex, self, t.stream, t.peer, Origin::TakenOver, false);
            }
            n as usize + from_backlog
        });
        // Every other worker sleeps now, but one may wake and get stuck with connections in
        // its backlog: look again in a while rather than sleep until this worker has work.
        Some(next.unwrap_or(IDLE_LOOK).min(IDLE_LOOK))
    }

    fn create_instances(&self) -> Option<Instances> {
        let plan = self.plan.borrow().clone();
        match Instances::create(plan, self.host.clone(), self.info) {
            Ok(i) => Some(i),
            Err(e) => {
                log::error!("worker {}: {e}", self.info.id);
                None
            }
        }
    }

    /// Runs `finish` of a task handler with the result of a task delivered from here. Runs
    /// between requests, like a reload.
    fn finish(&self, task: &str, result: &[u8]) {
        match self.instances.borrow_mut().as_mut() {
            Some(inst) => inst.finish(task, result, self.my_stats()),
            None => log::warn!(
                "worker {}: no instances; finish of task {task} dropped",
                self.info.id
            ),
        }
    }

    /// Swaps to `plan`. Runs between requests: handler calls are synchronous, so no call is
    /// in flight on this thread while this runs.
    fn reload(&self, plan: Arc<Plan>) -> Result<usize, String> {
        let mut slot = self.instances.borrow_mut();
        let created = match slot.as_mut() {
            Some(inst) => inst.rebuild(plan.clone()).map_err(|e| e.to_string())?,
            None => {
                let inst = Instances::create(plan.clone(), self.host.clone(), self.info)
                    .map_err(|e| e.to_string())?;
                *slot = Some(inst);
                usize::MAX
            }
        };
        *self.plan.borrow_mut() = plan;
        drop(slot);
        self.generation.set(self.generation.get() + 1);
        self.close_orphans();
        Ok(created)
    }

    /// After a reload: WebSocket connections whose route is gone (or leads to another
    /// component now) are closed with 1001; they get `on_close` on the instance that served
    /// them, which is kept until they are gone.
    fn close_orphans(&self) {
        let plan = self.plan.borrow().clone();
        let mut orphans = 0;
        for (id, b) in self.ws_bindings.borrow().iter() {
            if resolve(&plan, b).is_none() {
                let reason = "going away: a reload removed this route";
                let _ = self.connections.close(*id, 1001, reason);
                orphans += 1;
            }
        }
        if orphans > 0 {
            log::info!(
                "worker {}: closing {orphans} WebSocket connection(s) whose route the reload removed",
                self.info.id
            );
        }
        self.prune_retired();
    }

    /// Drops the instances a reload retired once no connection of theirs is left.
    fn prune_retired(&self) {
        let plan = self.plan.borrow();
        let bindings = self.ws_bindings.borrow();
        if let Some(inst) = self.instances.borrow_mut().as_mut() {
            inst.prune_retired(|r| {
                bindings
                    .values()
                    .any(|b| b.component == *r && resolve(&plan, b).is_none())
            });
        }
    }

    /// The current handler slot of `b`, if its route still leads to its component.
    fn ws_slot(&self, b: &Binding) -> Option<usize> {
        let generation = self.generation.get();
        if let Some(i) = b.cached(generation) {
            return Some(i);
        }
        let i = resolve(&self.plan.borrow(), b)?;
        b.remember(generation, i);
        Some(i)
    }

    fn refresh_clock(&self) {
        let now = Instant::now();
        self.now.set(now);
        let wall = SystemTime::now();
        let date = httpdate::fmt_http_date(wall);
        if date.len() == 29 {
            self.date.borrow_mut().copy_from_slice(date.as_bytes());
            self.date_secs.set(coarse_unix_secs());
        }
    }

    /// Closes up to `n` idle keep-alive connections, the longest idle first; returns how many.
    fn shed_idle(&self, n: usize) -> usize {
        let mut idle: Vec<Rc<Conn>> = self
            .conns
            .borrow()
            .values()
            .filter(|c| c.phase() == Phase::Idle && !c.timed_out())
            .cloned()
            .collect();
        idle.sort_by_key(|c| c.since());
        idle.truncate(n);
        for c in &idle {
            c.cut();
        }
        idle.len()
    }

    /// After many connections closed, hands the memory malloc keeps for them back to the
    /// system (glibc keeps freed memory in its arenas; 1000 closed WebSocket connections
    /// left 30 MB resident).
    fn give_memory_back(&self) {
        if self.closed_since_trim.get() >= TRIM_AFTER_CLOSED {
            self.closed_since_trim.set(0);
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
    }

    /// Closes connections that overstayed their phase's timeout.
    fn sweep(&self) {
        let limits = self.limits();
        let now = self.now.get();
        for conn in self.conns.borrow().values() {
            let limit = match conn.phase() {
                Phase::Idle => Duration::from_millis(limits.keepalive_timeout_ms),
                Phase::ReadingHead | Phase::ReadingBody => {
                    Duration::from_millis(limits.header_read_timeout_ms)
                }
                Phase::Writing => {
                    let limit = Duration::from_millis(limits.send_timeout_ms);
                    if !conn.timed_out() && now.duration_since(conn.since()) >= limit {
                        log::debug!(
                            "connection {}: the client took no response for {limit:?}; closing",
                            conn.id
                        );
                        conn.cut_writer();
                    }
                    continue;
                }
                Phase::Busy | Phase::WebSocket | Phase::Deferred | Phase::Streaming => continue,
            };
            // A connection another worker took over is let go at once (in case its Released
            // message was lost): `cut` does that too.
            let overstayed = !conn.timed_out() && now.duration_since(conn.since()) >= limit;
            if overstayed {
                conn.expire();
            } else if conn.claim.taken() {
                conn.cut();
            }
        }
    }
}

impl ws::Site for Worker {
    fn now(&self) -> Instant {
        self.now.get()
    }

    /// The WebSocket registry shared by all workers.
    fn connections(&self) -> &Connections {
        &self.connections
    }

    fn ws_buffered(&self) -> &AtomicU64 {
        &self.my_stats().ws_buffered
    }

    /// The WebSocket settings now in force.
    fn ws_settings(&self) -> WsSettings {
        let plan = self.plan.borrow();
        WsSettings {
            max_message_size: plan.ws.max_message_size,
            max_connections: plan.ws.max_connections,
            send_queue: plan.ws.send_queue,
            send_timeout: Duration::from_millis(plan.limits.send_timeout_ms),
            max_messages_per_second: plan.ws.max_messages_per_second,
            deflate: plan.ws.deflate,
        }
    }

    /// Delivers a WebSocket event to the instance that serves `b`: the current instance of
    /// its handler, or the retired one when a reload removed its route.
    fn ws_event(&self, b: &Binding, event: WsEvent<'_, '_>) -> bool {
        let target = match self.ws_slot(b) {
            Some(i) => WsTarget::Live(i),
            None => WsTarget::Retired(&b.component),
        };
        let stats = self.my_stats();
        let _in_call = InCall::enter(stats);
        let mut slot = self.instances.borrow_mut();
        match slot.as_mut() {
            Some(inst) => inst.ws_event(target, stats, event),
            None => false,
        }
    }

    fn ws_bind(&self, id: u64, binding: Option<Rc<Binding>>) {
        match binding {
            Some(b) => {
                self.ws_bindings.borrow_mut().insert(id, b);
            }
            None => {
                self.ws_bindings.borrow_mut().remove(&id);
                self.prune_retired();
            }
        }
    }
}

impl http::Site for Worker {
    /// This worker's id.
    fn id(&self) -> u32 {
        self.info.id
    }

    /// The HTTP limits now in force.
    fn limits(&self) -> Limits {
        self.plan.borrow().limits
    }

    /// The WebSocket handler for an upgrade to `path`, if it is a WebSocket route.
    fn ws_route(&self, path: &str) -> Option<Binding> {
        let plan = self.plan.borrow();
        let (route, i) = plan.ws_routes.iter().find(|(p, _)| p == path)?;
        Some(Binding::new(route, plan.websocket[*i].reference.clone()))
    }

    /// Runs an upgrade request through the middleware and the handler's `on_handshake`.
    fn ws_handshake(&self, req: &Request<'_>, b: &Binding, resp: &mut Response) -> bool {
        let Some(ws) = self.ws_slot(b) else {
            return false;
        };
        let stats = self.my_stats();
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let _in_call = InCall::enter(stats);
        let mut slot = self.instances.borrow_mut();
        if slot.is_none() {
            *slot = self.create_instances();
        }
        match slot.as_mut() {
            Some(inst) => inst.handshake(req, ws, resp, stats),
            None => {
                resp.reset();
                resp.text(
                    503,
                    "service unavailable: plugin instances could not be created\n",
                );
                false
            }
        }
    }

    /// Whether a graceful stop is under way.
    fn draining(&self) -> bool {
        self.draining.get()
    }

    fn body_budget(&self) -> &Arc<AtomicUsize> {
        &self.stats.bodies_in_flight
    }

    fn body_refused(&self) {
        self.stats.bodies_refused.fetch_add(1, Ordering::Relaxed);
    }

    fn close_idle(&self) -> bool {
        self.draining.get() && self.close_idle.get()
    }

    /// Runs `f` with the current router.
    fn with_router<R>(&self, f: impl FnOnce(&Router) -> R) -> R {
        f(&self.plan.borrow().router)
    }

    /// Runs `f` with the static file settings now in force and the current router.
    fn with_statics<R>(&self, f: impl FnOnce(Option<&Statics>, &Router, &mut Cache) -> R) -> R {
        let plan = self.plan.borrow();
        f(
            plan.statics.as_ref(),
            &plan.router,
            &mut self.static_cache.borrow_mut(),
        )
    }

    fn count_static(&self, sendfile: Option<u64>) {
        let stats = self.my_stats();
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.static_responses.fetch_add(1, Ordering::Relaxed);
        if let Some(bytes) = sendfile {
            stats.sendfile_responses.fetch_add(1, Ordering::Relaxed);
            stats.sendfile_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The current `date` header value.
    fn with_date<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        // The sweeper refreshes it every tick, but a slow handler blocks the sweeper: check
        // the (vDSO, coarse) wall clock so a response never carries an old second.
        let secs = coarse_unix_secs();
        if secs != self.date_secs.get() {
            self.refresh_clock();
        }
        f(&self.date.borrow()[..])
    }

    /// Runs the plugin pipeline for one request, and recycles the instances after
    /// `max_request` requests.
    fn dispatch(&self, req: &Request<'_>, route: &Match, resp: &mut Response) {
        let stats = self.my_stats();
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let _in_call = InCall::enter(stats);
        let mut slot = self.instances.borrow_mut();
        if slot.is_none() {
            *slot = self.create_instances();
        }
        let Some(inst) = slot.as_mut() else {
            resp.reset();
            resp.text(
                503,
                "service unavailable: plugin instances could not be created\n",
            );
            return;
        };
        inst.run(req, route, resp, stats);
        let max = inst.plan().max_request;
        if max > 0 && inst.served() >= max {
            log::debug!(
                "worker {}: recycling instances after {max} requests",
                self.info.id
            );
            stats.recycles.fetch_add(1, Ordering::Relaxed);
            if let Some(old) = slot.take() {
                old.stop();
            }
            *slot = self.create_instances();
        }
    }
}

/// What a worker starts with.
#[derive(Debug)]
pub struct Setup {
    /// The worker's id.
    pub id: u32,
    /// Its own listener.
    pub listener: TcpListener,
    /// What to run.
    pub plan: Arc<Plan>,
    /// The host API.
    pub host: Host,
    /// Shared counters.
    pub stats: Arc<Stats>,
    /// Its control channel.
    pub control: async_channel::Receiver<Control>,
    /// Every worker's control channel, by id.
    pub peers: Arc<Vec<async_channel::Sender<Control>>>,
    /// Every worker's lobby, by id.
    pub lobbies: Arc<Vec<Arc<Lobby>>>,
    /// Its own listener of each socket of `sockets`, with the socket's key.
    pub socket_listeners: Vec<(String, crate::socket::Listener)>,
    /// Where to say it is serving, or why not.
    pub ready: mpsc::Sender<(u32, Result<(), String>)>,
}

/// Starts a worker on its own thread. It reports on `ready` once its instances exist and it
/// is accepting, or why it could not start.
pub fn spawn(setup: Setup) -> std::io::Result<thread::JoinHandle<()>> {
    let Setup {
        id,
        listener,
        plan,
        host,
        stats,
        control,
        peers,
        lobbies,
        socket_listeners,
        ready,
    } = setup;
    thread::Builder::new()
        .name(format!("worker-{id}"))
        .spawn(move || {
            calls::thread(&format!("worker-{id}"));
            stats.workers[id as usize].set_cpu_clock_to_current_thread();
            let info = WorkerInfo {
                kind: ThreadKind::Worker,
                id,
            };
            let connections = host.connections().clone();
            let sockets = host.sockets().clone();
            let host = host.boxed();
            let instances = match Instances::create(plan.clone(), host.clone(), info) {
                Ok(i) => i,
                Err(e) => {
                    let _ = ready.send((id, Err(e.to_string())));
                    return;
                }
            };
            let worker = Rc::new(Worker {
                info,
                plan: RefCell::new(plan),
                host,
                peers,
                lobbies,
                connections,
                instances: RefCell::new(Some(instances)),
                conns: RefCell::new(HashMap::new()),
                // Connection ids start at 1: 0 means "none" in the host API.
                next_conn: Cell::new(1),
                now: Cell::new(Instant::now()),
                date: RefCell::new([b' '; 29]),
                date_secs: Cell::new(0),
                draining: Cell::new(false),
                close_idle: Cell::new(false),
                stats,
                accept_failures: AcceptFailures::default(),
                closed_since_trim: Cell::new(0),
                generation: Cell::new(0),
                ws_bindings: RefCell::new(HashMap::new()),
                sockets,
                socket_conns: Cell::new(0),
                socket_of: RefCell::new(HashMap::new()),
                socket_loops: RefCell::new(HashMap::new()),
                static_cache: RefCell::new(Cache::new()),
            });
            worker.refresh_clock();
            let ex = Rc::new(LocalExecutor::new());
            let listeners = (listener, socket_listeners);
            let on_idle = {
                let (ex, worker) = (ex.clone(), worker.clone());
                let mut watch = Watch::new(worker.lobbies.len());
                let mut scratch = Scratch::default();
                move || worker.on_idle(&ex, &mut watch, &mut scratch)
            };
            let served = reactor::block_on_idle(
                ex.run(run(ex.clone(), worker.clone(), listeners, control, ready)),
                on_idle,
            );
            if let Err(e) = served {
                log::error!("worker {id}: event loop failed: {e}");
            }
            if let Some(inst) = worker.instances.borrow_mut().take() {
                inst.stop();
            }
            log::debug!("worker {id} stopped");
        })
}

async fn run(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    (listener, socket_listeners): (TcpListener, Vec<(String, crate::socket::Listener)>),
    control: async_channel::Receiver<Control>,
    ready: mpsc::Sender<(u32, Result<(), String>)>,
) {
    let registered = Async::new(listener)
        .map_err(|e| format!("cannot register the listener: {e}"))
        .and_then(|l| Ok((l, sockets::start(&ex, &worker, socket_listeners)?)));
    let (listener, ()) = match registered {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send((worker.id(), Err(e)));
            return;
        }
    };
    worker.lobby().set_pulse(reactor::pulse());
    let _ = ready.send((worker.id(), Ok(())));
    let listener = Rc::new(listener);
    worker
        .lobby()
        .set_listener(Some(listener.get_ref().as_raw_fd()));
    let accept = ex.spawn(accept_loop(
        ex.clone(),
        worker.clone(),
        listener.clone(),
        false,
    ));
    let _sweeper = ex.spawn(sweeper(worker.clone()));
    let _heartbeat = ex.spawn(heartbeat(worker.clone()));
    worker.my_stats().accepting.store(true, Ordering::Relaxed);
    let stop = loop {
        match control.recv().await {
            Ok(Control::Stop(how)) => break how,
            Ok(other) => handle(&ex, &worker, other),
            Err(_) => break Shutdown::Fast,
        }
    };
    // Stop accepting.
    drop(accept);
    sockets::stop(&worker);
    if let Shutdown::Graceful(_) = stop {
        // Connections the kernel already accepted wait in the listen backlog: serve them
        // (their responses say `connection: close`) instead of letting them be reset.
        let n = drain_backlog(&ex, &worker, &listener);
        if n > 0 {
            log::info!(
                "worker {}: serving {n} connection(s) from the listen backlog before stopping",
                worker.id()
            );
        }
    }
    // No other worker may use the descriptor once it is closed.
    worker.lobby().set_listener(None);
    drop(listener);
    worker.my_stats().accepting.store(false, Ordering::Relaxed);
    worker.draining.set(true);
    let (deadline, close_idle) = match stop {
        Shutdown::Graceful(wait) => (Instant::now() + wait, true),
        Shutdown::Handover(wait) => (Instant::now() + wait, false),
        Shutdown::Fast => (Instant::now(), true),
    };
    worker.close_idle.set(close_idle);
    loop {
        // Idle connections close now (on a handover, after their next response, so a client
        // never sees a keep-alive connection closed under its request); busy ones close after
        // their response.
        // A deferred response gets until shortly before the deadline, then its connection's
        // read side is cut: it answers 503 and closes. A stream (which may never end, as
        // Server-Sent Events) is ended at once, and its client reconnects elsewhere.
        let cut_deferred = Instant::now() + DEFERRED_STOP_MARGIN >= deadline;
        for conn in worker.conns.borrow().values() {
            match conn.phase() {
                Phase::Idle if close_idle => conn.cut(),
                Phase::Deferred if cut_deferred && !conn.timed_out() => conn.cut(),
                Phase::Streaming if !conn.timed_out() => conn.cut(),
                Phase::WebSocket => {
                    let _ = worker.connections.close(conn.id, 1001, "server stopping");
                }
                _ => {}
            }
        }
        sockets::stop(&worker);
        // A connection another worker accepted may still be on its way here: serve it.
        while let Ok(message) = control.try_recv() {
            handle(&ex, &worker, message);
        }
        if worker.drained(&control) || Instant::now() >= deadline {
            break;
        }
        Timer::after(Duration::from_millis(5)).await;
    }
    let left = worker.conns.borrow().len() + worker.socket_conns.get();
    if left > 0 {
        log::warn!(
            "worker {}: {left} connection(s) still busy after max_wait_time; closing them",
            worker.id()
        );
    }
}

/// A message from the main thread or another worker, other than `Stop`.
fn handle(ex: &Rc<LocalExecutor<'static>>, worker: &Rc<Worker>, message: Control) {
    match message {
        Control::Stop(_) => {}
        Control::Reload(plan, reply) => {
            let result = worker.reload(plan);
            let retired = sockets::retire(worker);
            let id = worker.id();
            // A removed socket's listener is closed when its loop's future is dropped, on
            // this executor's next turn: the reply waits for it, so that once a reload says
            // it is done, nothing accepts on a socket it removed.
            ex.spawn(async move {
                for task in retired {
                    task.cancel().await;
                }
                let _ = reply.send((id, result));
            })
            .detach();
        }
        Control::Finish { task, result } => worker.finish(&task, &result),
        Control::Sockets(added) => {
            if let Err(e) = sockets::start(ex, worker, added) {
                log::error!("worker {}: {e}", worker.id());
            }
        }
        Control::Adopt(stream, peer, only) => {
            adopt(ex, worker, stream, peer, Origin::HandedOver, only)
        }
        Control::Released(id) => {
            if let Some(conn) = worker.conns.borrow().get(&id) {
                conn.stream.wake_reader();
            }
        }
    }
}

/// Accepts every connection waiting in the listen backlog now; returns how many.
fn drain_backlog(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    listener: &Async<TcpListener>,
) -> usize {
    let mut n = 0;
    // The listener is nonblocking: this stops at the first WouldBlock.
    while let Ok((stream, peer)) = crate::runtime::accept(listener.get_ref()) {
        adopt(ex, worker, stream, peer, Origin::Accepted, false);
        n += 1;
    }
    n
}

/// Accepts HTTP connections: on the main listener, or on a socket of `protocol: Http`, or
/// `WebSocket` (`upgrades_only`: its connections are refused anything but an upgrade).
async fn accept_loop(
    ex: Rc<LocalExecutor<'static>>,
    worker: Rc<Worker>,
    listener: Rc<Async<TcpListener>>,
    upgrades_only: bool,
) {
    loop {
        match listener.accept_std().await {
            Ok((stream, peer)) => {
                // Keep-alive connections stay where they land, so even them out as they come:
                // a worker with two more connections than another hands the new one over.
                let Some(to) = worker.lighter_peer() else {
                    adopt(&ex, &worker, stream, peer, Origin::Accepted, upgrades_only);
                    // Its request runs before the next accept: should it be slow, the
                    // connections behind it wait in the listen backlog, where an idle worker
                    // takes them, not in this worker's list behind it.
                    futures_lite::future::yield_now().await;
                    continue;
                };
                // Counted for the receiver now, so the next decision already sees it.
                let receiver = &worker.stats.workers[to].connections;
                receiver.fetch_add(1, Ordering::Relaxed);
                let handed = Control::Adopt(stream, peer, upgrades_only);
                if let Err(e) = worker.peers[to].try_send(handed) {
                    receiver.fetch_sub(1, Ordering::Relaxed);
                    if let Control::Adopt(stream, peer, only) = e.into_inner() {
                        adopt(&ex, &worker, stream, peer, Origin::Accepted, only);
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors: the oldest idle keep-alive connections make room
                // for new clients. Anything else: back off. Either way, say so once a second.
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let shed = if out_of_fds {
                    worker.shed_idle(SHED_BATCH)
                } else {
                    0
                };
                worker
                    .accept_failures
                    .note(worker.id(), &e, shed, worker.now.get());
                Timer::after(Duration::from_millis(if shed > 0 { 1 } else { 50 })).await;
            }
        }
    }
}

/// While this lives, the worker counts as inside a plugin call.
struct InCall<'a>(&'a WorkerStats);

impl<'a> InCall<'a> {
    fn enter(stats: &'a WorkerStats) -> InCall<'a> {
        stats.in_call.store(true, Ordering::Relaxed);
        InCall(stats)
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.0.in_call.store(false, Ordering::Relaxed);
    }
}

/// A connection in its worker's list and counts, for as long as this lives: dropped when its
/// task ends, however it ends.
struct Listed {
    worker: Rc<Worker>,
    conn: Rc<Conn>,
}

impl Listed {
    fn new(worker: Rc<Worker>, conn: Conn) -> Listed {
        let conn = Rc::new(conn);
        worker.conns.borrow_mut().insert(conn.id, conn.clone());
        Listed { worker, conn }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.worker.conns.borrow_mut().remove(&self.conn.id);
        let closed = &self.worker.closed_since_trim;
        closed.set(closed.get() + 1);
        // A connection taken over is counted by the worker that took it.
        if !self.conn.claim.taken() {
            self.worker
                .my_stats()
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How long before a stop's deadline a deferred response still waiting is answered 503.
const DEFERRED_STOP_MARGIN: Duration = Duration::from_millis(50);

/// The longest an idle worker sleeps before it looks at the others again (while take-over is
/// on and there are others).
const IDLE_LOOK: Duration = Duration::from_millis(20);

/// Connections accepted at a time from a stuck worker's listen backlog: one, so that a slow
/// request taken over does not hold the others up behind it on the taker; other idle
/// workers (or this one, on its next look) take the rest.
const BACKLOG_BATCH: usize = 1;

/// Idle keep-alive connections closed at a time when the process runs out of descriptors.
const SHED_BATCH: usize = 16;

/// Failed accepts, logged at most once a second with how many there were.
#[derive(Debug, Default)]
struct AcceptFailures {
    since: Cell<Option<Instant>>,
    count: Cell<u64>,
    shed: Cell<u64>,
}

impl AcceptFailures {
    fn note(&self, worker: u32, e: &std::io::Error, shed: usize, now: Instant) {
        self.count.set(self.count.get() + 1);
        self.shed.set(self.shed.get() + shed as u64);
        let due = self
            .since
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            log::error!(
                "worker {worker}: accept failed {} time(s) in the last second: {e}; closed {} idle keep-alive connection(s) to make room",
                self.count.get(),
                self.shed.get()
            );
            self.since.set(Some(now));
            self.count.set(0);
            self.shed.set(0);
        }
    }
}

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This worker accepted it.
    Accepted,
    /// Another worker accepted it and handed it over (and counted it for this one).
    HandedOver,
    /// Taken over from a stalled worker: counted, and already nonblocking with `TCP_NODELAY`.
    TakenOver,
}

/// Registers a connection with this worker and serves it (`upgrades_only`: nothing but
/// WebSocket upgrades).
fn adopt(
    ex: &Rc<LocalExecutor<'static>>,
    worker: &Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    origin: Origin,
    upgrades_only: bool,
) {
    let stream = if origin == Origin::TakenOver {
        Async::new_nonblocking(stream)
    } else {
        let _ = stream.set_nodelay(true);
        Async::new(stream)
    };
    if origin == Origin::Accepted {
        worker
            .my_stats()
            .connections
            .fetch_add(1, Ordering::Relaxed);
    }
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            worker
                .my_stats()
                .connections
                .fetch_sub(1, Ordering::Relaxed);
            log::error!("worker {}: cannot register a connection: {e}", worker.id());
            return;
        }
    };
    let id = worker.next_id();
    let conn = Conn::new(id, stream, peer, worker.now.get(), worker.lobby().clone());
    if upgrades_only {
        conn.only_upgrades();
    }
    let listed = Listed::new(worker.clone(), conn);
    ex.spawn(async move {
        let (w, conn) = (&listed.worker, &listed.conn);
        // A bug of ours in one connection's task costs that connection, not the worker.
        let served = AssertUnwindSafe(http::serve(&**w, conn, peer))
            .catch_unwind()
            .await;
        if served.is_err() {
            log::error!(
                "worker {}: connection {} ended by a panic in the server (a bug: please report it)",
                w.id(),
                conn.id
            );
        }
    })
    .detach();
}

async fn sweeper(worker: Rc<Worker>) {
    loop {
        // Limits can change on reload, so the tick follows them.
        let limits = worker.limits();
        let shortest = limits
            .header_read_timeout_ms
            .min(limits.keepalive_timeout_ms)
            .min(limits.send_timeout_ms);
        Timer::after(Duration::from_millis((shortest / 4).clamp(10, 500))).await;
        worker.refresh_clock();
        worker.sweep();
        worker.give_memory_back();
    }
}

/// Connections closed on a worker after which it hands freed memory back to the system.
const TRIM_AFTER_CLOSED: u64 = 256;

/// Closes WebSocket connections that stayed silent longer than `heartbeat_idle_time`,
/// checking every `heartbeat_check_interval`.
async fn heartbeat(worker: Rc<Worker>) {
    loop {
        let (idle, every) = {
            let plan = worker.plan.borrow();
            (
                plan.ws.heartbeat_idle_time,
                plan.ws.heartbeat_check_interval.max(1),
            )
        };
        Timer::after(Duration::from_secs(every)).await;
        if idle == 0 {
            continue;
        }
        let now = Instant::now();
        worker.now.set(now);
        let limit = Duration::from_secs(idle);
        for conn in worker.conns.borrow().values() {
            if conn.phase() == Phase::WebSocket && now.duration_since(conn.since()) >= limit {
                log::debug!("websocket {}: silent for {idle}s, closing", conn.id);
                let _ = worker.connections.close(conn.id, 1000, "idle timeout");
            }
        }
    }
}

/// Seconds since the epoch from the coarse real-time clock (a vDSO read, no syscall).
fn coarse_unix_secs() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    ts.tv_sec
}
