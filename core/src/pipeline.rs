//! What runs for a request: the [`Plan`] (routes and component slots, shared by the workers)
//! and each worker's [`Instances`] of the components. Middleware request hooks run in order,
//! then the handler, then the response hooks of the middleware that ran, in reverse, then the
//! cleaners. A panic anywhere costs that request a 500 and recreates that one instance.

use std::sync::{atomic::Ordering, Arc};

use abi_stable::std_types::RResult;
use plughost_plugin_api::{
    abi::{
        CleanerBox, Component, ComponentKind, Handshake, HostBox, HttpHandlerBox, LifecycleBox,
        Message, MiddlewareBox, PluginError as FfiError, TaskHandlerBox, WebSocketBox, WorkerInfo,
    },
    Flow, Request, Response,
};

use crate::{
    config::{ComponentRef, Config, Limits, WebSocketConfig},
    error::PluginError,
    plugin::{Registry, Slot},
    router::{Match, Router},
    services::ServicePlan,
    stats::WorkerStats,
};

/// Routes and component slots of one config.
#[derive(Debug)]
pub struct Plan {
    /// Route table; its handler indexes point into `handlers`.
    pub router: Router,
    /// HTTP handlers, one slot per distinct component.
    pub handlers: Vec<Slot>,
    /// Middleware, in order.
    pub middleware: Vec<Slot>,
    /// Cleaners.
    pub cleaners: Vec<Slot>,
    /// Lifecycle hooks.
    pub hooks: Vec<Slot>,
    /// WebSocket handlers, one slot per distinct component.
    pub websocket: Vec<Slot>,
    /// WebSocket routes: exact path -> index into `websocket` (empty when disabled).
    pub ws_routes: Vec<(String, usize)>,
    /// WebSocket settings.
    pub ws: WebSocketConfig,
    /// HTTP limits.
    pub limits: Limits,
    /// Requests after which a worker recreates its instances (0 = never).
    pub max_request: u64,
    /// See `Config::steal_after_us`.
    pub steal_after_us: u64,
    /// Task handlers, listeners, cron jobs and custom processes (HTTP workers hold instances
    /// of the task handlers too, for `finish`).
    pub services: ServicePlan,
}

impl Plan {
    /// Resolves every component the config names against the loaded plugins.
    pub fn build(config: &Config, registry: &Registry) -> Result<Plan, PluginError> {
        let mut router = Router::default();
        let mut handlers: Vec<Slot> = Vec::new();
        for route in &config.routes {
            let r = ComponentRef::parse(&route.handler).expect("validated");
            let index = match handlers.iter().position(|s| s.reference == r) {
                Some(i) => i,
                None => {
                    handlers.push(registry.slot(config, &r, ComponentKind::HttpHandler)?);
                    handlers.len() - 1
                }
            };
            router.add(&route.path, &route.methods, index);
        }
        let slots = |list: &[String], kind| -> Result<Vec<Slot>, PluginError> {
            list.iter()
                .map(|s| registry.slot(config, &ComponentRef::parse(s).expect("validated"), kind))
                .collect()
        };
        let mut websocket: Vec<Slot> = Vec::new();
        let mut ws_routes = Vec::new();
        if config.websocket.enable {
            for route in &config.websocket.routes {
                let r = ComponentRef::parse(&route.handler).expect("validated");
                let index = match websocket.iter().position(|s| s.reference == r) {
                    Some(i) => i,
                    None => {
                        websocket.push(registry.slot(config, &r, ComponentKind::WebSocket)?);
                        websocket.len() - 1
                    }
                };
                ws_routes.push((route.path.clone(), index));
            }
        }
        Ok(Plan {
            websocket,
            ws_routes,
            ws: config.websocket.clone(),
            router,
            handlers,
            middleware: slots(&config.middleware, ComponentKind::Middleware)?,
            cleaners: slots(&config.cleaners, ComponentKind::Cleaner)?,
            hooks: slots(&config.hooks, ComponentKind::Lifecycle)?,
            limits: config.limits,
            max_request: config.max_request,
            steal_after_us: config.steal_after_us,
            services: ServicePlan::build(config, registry)?,
        })
    }
}

/// One worker's instances of every component of a plan.
pub struct Instances {
    plan: Arc<Plan>,
    host: HostBox,
    worker: WorkerInfo,
    handlers: Vec<Option<HttpHandlerBox>>,
    middleware: Vec<Option<MiddlewareBox>>,
    cleaners: Vec<Option<CleanerBox>>,
    hooks: Vec<Option<LifecycleBox>>,
    websocket: Vec<Option<WebSocketBox>>,
    tasks: Vec<Option<TaskHandlerBox>>,
    /// Requests since the instances were created (for `max_request`).
    served: u64,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("worker", &self.worker)
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

impl Instances {
    /// Creates every instance of `plan` on this thread and runs the worker-start hooks.
    pub fn create(
        plan: Arc<Plan>,
        host: HostBox,
        worker: WorkerInfo,
    ) -> Result<Instances, PluginError> {
        fn make_all<T: FromComponent>(
            slots: &[Slot],
            host: &HostBox,
            worker: WorkerInfo,
        ) -> Result<Vec<Option<T>>, PluginError> {
            slots
                .iter()
                .map(|s| s.instantiate(host, worker).map(T::from_component))
                .collect()
        }
        let handlers = make_all(&plan.handlers, &host, worker)?;
        let middleware = make_all(&plan.middleware, &host, worker)?;
        let cleaners = make_all(&plan.cleaners, &host, worker)?;
        let hooks = make_all(&plan.hooks, &host, worker)?;
        let websocket = make_all(&plan.websocket, &host, worker)?;
        let tasks = make_all(&plan.services.tasks, &host, worker)?;
        let mut it = Instances {
            plan,
            host,
            worker,
            handlers,
            middleware,
            cleaners,
            hooks,
            websocket,
            tasks,
            served: 0,
        };
        it.each_hook("on_worker_start", |h, w| h.on_worker_start(w));
        Ok(it)
    }

    /// The plan these instances were made from.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Runs the worker-stop hooks; the instances are dropped with `self`.
    pub fn stop(mut self) {
        self.each_hook("on_worker_stop", |h, w| h.on_worker_stop(w));
    }

    fn each_hook(
        &mut self,
        what: &str,
        call: impl Fn(&mut LifecycleBox, WorkerInfo) -> RResult<(), FfiError>,
    ) {
        for (i, hook) in self.hooks.iter_mut().enumerate() {
            if let Some(h) = hook {
                if let RResult::RErr(e) = call(h, self.worker) {
                    log::error!(
                        "{} {}: hook {what} of {} failed: {e}",
                        self.worker.kind.as_str(),
                        self.worker.id,
                        self.plan.hooks[i].reference
                    );
                }
            }
        }
    }

    /// Moves to `plan` between two requests: instances whose slot is unchanged (same
    /// component, same library version, same config) are kept; the others are created anew.
    /// Nothing changes unless every new instance could be created. Replaced lifecycle hooks get
    /// `on_worker_stop` (old) and `on_worker_start` (new).
    pub fn rebuild(&mut self, plan: Arc<Plan>) -> Result<usize, PluginError> {
        let old_plan = self.plan.clone();
        let mut created = 0;
        let mut reuse_or_make =
            |old_slots: &[Slot], new: &Slot| -> Result<Result<usize, Component>, PluginError> {
                match old_slots.iter().position(|o| o.same_as(new)) {
                    Some(i) => Ok(Ok(i)),
                    None => {
                        created += 1;
                        new.instantiate(&self.host, self.worker).map(Err)
                    }
                }
            };
        let handlers: Vec<_> = plan
            .handlers
            .iter()
            .map(|s| reuse_or_make(&old_plan.handlers, s))
            .collect::<Result<_, _>>()?;
        let middleware: Vec<_> = plan
            .middleware
            .iter()
            .map(|s| reuse_or_make(&old_plan.middleware, s))
            .collect::<Result<_, _>>()?;
        let cleaners: Vec<_> = plan
            .cleaners
            .iter()
            .map(|s| reuse_or_make(&old_plan.cleaners, s))
            .collect::<Result<_, _>>()?;
        let hooks: Vec<_> = plan
            .hooks
            .iter()
            .map(|s| reuse_or_make(&old_plan.hooks, s))
            .collect::<Result<_, _>>()?;
        let websocket: Vec<_> = plan
            .websocket
            .iter()
            .map(|s| reuse_or_make(&old_plan.websocket, s))
            .collect::<Result<_, _>>()?;
        let tasks: Vec<_> = plan
            .services
            .tasks
            .iter()
            .map(|s| reuse_or_make(&old_plan.services.tasks, s))
            .collect::<Result<_, _>>()?;

        // Every new instance exists: swap. Replaced hooks say goodbye first.
        let kept_hooks: Vec<usize> = hooks
            .iter()
            .filter_map(|h| h.as_ref().ok().copied())
            .collect();
        for (i, hook) in self.hooks.iter_mut().enumerate() {
            if !kept_hooks.contains(&i) {
                if let Some(h) = hook {
                    let _ = h.on_worker_stop(self.worker);
                }
            }
        }
        fn assemble<T: FromComponent>(
            old: &mut [Option<T>],
            new: Vec<Result<usize, Component>>,
        ) -> Vec<Option<T>> {
            new.into_iter()
                .map(|n| match n {
                    Ok(i) => old[i].take(),
                    Err(c) => T::from_component(c),
                })
                .collect()
        }
        self.handlers = assemble(&mut self.handlers, handlers);
        self.middleware = assemble(&mut self.middleware, middleware);
        self.cleaners = assemble(&mut self.cleaners, cleaners);
        self.websocket = assemble(&mut self.websocket, websocket);
        self.tasks = assemble(&mut self.tasks, tasks);
        let new_hooks: Vec<bool> = hooks.iter().map(|h| h.is_err()).collect();
        self.hooks = assemble(&mut self.hooks, hooks);
        for (i, hook) in self.hooks.iter_mut().enumerate() {
            if new_hooks[i] {
                if let Some(h) = hook {
                    let _ = h.on_worker_start(self.worker);
                }
            }
        }
        self.plan = plan;
        Ok(created)
    }

    /// Requests served since creation.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Runs the pipeline for one request. `route` is the router's answer for it.
    pub fn run(
        &mut self,
        req: &Request<'_>,
        route: &Match,
        resp: &mut Response,
        stats: &WorkerStats,
    ) {
        resp.reset();
        self.served += 1;
        let (ran, answered) = self.request_hooks(req, resp, stats);
        if !answered {
            match route {
                Match::Found(h) => match self.handlers[*h].as_mut() {
                    Some(handler) => {
                        if let RResult::RErr(e) = handler.handle(req, resp) {
                            self.failed(ComponentKind::HttpHandler, *h, &e, resp, stats);
                        }
                    }
                    None => {
                        self.handlers[*h] = self.remake(ComponentKind::HttpHandler, *h);
                        unavailable(resp)
                    }
                },
                Match::NotFound => {
                    resp.text(404, "not found\n");
                }
                Match::MethodNotAllowed(allow) => {
                    resp.text(405, "method not allowed\n")
                        .set_header("allow", allow);
                }
            }
        }
        self.response_hooks(ran, req, resp, stats);
        for i in 0..self.cleaners.len() {
            if let Some(c) = self.cleaners[i].as_mut() {
                if let RResult::RErr(e) = c.clean() {
                    // The response stands; a cleaner runs after it was decided.
                    self.failed(ComponentKind::Cleaner, i, &e, &mut Response::new(), stats);
                }
            }
        }
    }

    /// The middleware's request hooks, in order, until one answers. Returns how many ran (their
    /// response hooks run later) and whether the response is decided.
    fn request_hooks(
        &mut self,
        req: &Request<'_>,
        resp: &mut Response,
        stats: &WorkerStats,
    ) -> (usize, bool) {
        for i in 0..self.middleware.len() {
            let Some(m) = self.middleware[i].as_mut() else {
                unavailable(resp);
                return (i, true);
            };
            match m.on_request(req, resp) {
                RResult::ROk(Flow::Continue) => {}
                RResult::ROk(Flow::Respond) => return (i + 1, true),
                RResult::RErr(e) => {
                    self.failed(ComponentKind::Middleware, i, &e, resp, stats);
                    return (i, true);
                }
            }
        }
        (self.middleware.len(), false)
    }

    /// The response hooks of the first `ran` middleware, in reverse order.
    fn response_hooks(
        &mut self,
        ran: usize,
        req: &Request<'_>,
        resp: &mut Response,
        stats: &WorkerStats,
    ) {
        for i in (0..ran).rev() {
            if let Some(m) = self.middleware[i].as_mut() {
                if let RResult::RErr(e) = m.on_response(req, resp) {
                    self.failed(ComponentKind::Middleware, i, &e, resp, stats);
                }
            }
        }
    }

    /// Runs an upgrade request through the middleware and the WebSocket handler `ws`. Returns
    /// true to accept (with any headers put in `resp`); otherwise `resp` holds the refusal.
    pub fn handshake(
        &mut self,
        req: &Request<'_>,
        ws: usize,
        resp: &mut Response,
        stats: &WorkerStats,
    ) -> bool {
        resp.reset();
        let mut accepted = false;
        let (ran, answered) = self.request_hooks(req, resp, stats);
        if !answered {
            match self.websocket[ws].as_mut() {
                None => {
                    self.websocket[ws] = self.remake(ComponentKind::WebSocket, ws);
                    unavailable(resp);
                }
                Some(h) => match h.on_handshake(req, resp) {
                    RResult::ROk(Handshake::Accept) => accepted = true,
                    RResult::ROk(Handshake::Refuse) => {
                        if resp.status() < 300 {
                            resp.set_status(403);
                        }
                        if resp.body().is_empty() {
                            resp.set_body("websocket handshake refused\n");
                        }
                    }
                    RResult::RErr(e) => self.failed(ComponentKind::WebSocket, ws, &e, resp, stats),
                },
            }
        }
        if !accepted {
            // A refusal is a response like any other: the middleware sees it.
            self.response_hooks(ran, req, resp, stats);
        }
        accepted
    }

    /// A WebSocket event for handler `ws`; false when the handler panicked (the instance was
    /// recreated, and the connection should close with 1011).
    pub fn ws_event(&mut self, ws: usize, stats: &WorkerStats, event: WsEvent<'_, '_>) -> bool {
        let Some(h) = self.websocket[ws].as_mut() else {
            self.websocket[ws] = self.remake(ComponentKind::WebSocket, ws);
            return false;
        };
        let result = match event {
            WsEvent::Open(conn, req) => h.on_open(conn, req),
            WsEvent::Message(conn, message) => h.on_message(conn, message),
            WsEvent::Close(conn, code, reason) => h.on_close(conn, code, reason.into()),
        };
        match result {
            RResult::ROk(()) => true,
            RResult::RErr(e) => {
                self.failed(
                    ComponentKind::WebSocket,
                    ws,
                    &e,
                    &mut Response::new(),
                    stats,
                );
                false
            }
        }
    }

    /// Runs `finish` of task handler `task` (`plugin.component`) with the result of a task
    /// this worker delivered. A panic is logged and counted, and recreates the instance.
    pub fn finish(&mut self, task: &str, result: &[u8], stats: &WorkerStats) {
        let Some(i) = self.plan.services.task_index(task) else {
            log::warn!(
                "worker {}: finish for task {task}, which is gone (reload); dropped",
                self.worker.id
            );
            return;
        };
        let Some(h) = self.tasks[i].as_mut() else {
            self.tasks[i] = self.remake(ComponentKind::TaskHandler, i);
            return;
        };
        if let RResult::RErr(e) = h.finish(result.into()) {
            let mut ignored = Response::new();
            self.failed(ComponentKind::TaskHandler, i, &e, &mut ignored, stats);
        }
    }

    fn slot(&self, kind: ComponentKind, i: usize) -> &Slot {
        match kind {
            ComponentKind::HttpHandler => &self.plan.handlers[i],
            ComponentKind::Middleware => &self.plan.middleware[i],
            ComponentKind::Cleaner => &self.plan.cleaners[i],
            ComponentKind::Lifecycle => &self.plan.hooks[i],
            ComponentKind::WebSocket => &self.plan.websocket[i],
            ComponentKind::TaskHandler => &self.plan.services.tasks[i],
            other => unreachable!("{other} instances do not live on HTTP workers"),
        }
    }

    /// A call into an instance failed: log, count, tell the hooks, answer 500, recreate it.
    fn failed(
        &mut self,
        kind: ComponentKind,
        i: usize,
        error: &FfiError,
        resp: &mut Response,
        stats: &WorkerStats,
    ) {
        stats.panics.fetch_add(1, Ordering::Relaxed);
        let reference = self.slot(kind, i).reference.clone();
        log::error!(
            "plugin {}: {kind} {:?} on {} {} {error}; recreating the instance",
            reference.plugin,
            reference.component,
            self.worker.kind.as_str(),
            self.worker.id
        );
        resp.reset();
        resp.text(500, "internal server error\n");
        let message = format!("{kind} {reference} {error}");
        self.each_hook("on_worker_error", |h, w| {
            h.on_worker_error(w, message.as_str().into())
        });
        match kind {
            ComponentKind::HttpHandler => self.handlers[i] = self.remake(kind, i),
            ComponentKind::Middleware => self.middleware[i] = self.remake(kind, i),
            ComponentKind::Cleaner => self.cleaners[i] = self.remake(kind, i),
            ComponentKind::Lifecycle => self.hooks[i] = self.remake(kind, i),
            ComponentKind::WebSocket => self.websocket[i] = self.remake(kind, i),
            ComponentKind::TaskHandler => self.tasks[i] = self.remake(kind, i),
            other => unreachable!("{other} instances do not live on HTTP workers"),
        }
    }

    /// A new instance of one slot, or `None` (logged) if its factory fails now.
    fn remake<T: FromComponent>(&self, kind: ComponentKind, i: usize) -> Option<T> {
        match self.slot(kind, i).instantiate(&self.host, self.worker) {
            Ok(c) => T::from_component(c),
            Err(e) => {
                log::error!(
                    "worker {}: {e}; answering 503 until it succeeds",
                    self.worker.id
                );
                None
            }
        }
    }
}

/// Something that happened on a WebSocket connection.
#[derive(Debug)]
pub enum WsEvent<'a, 'r> {
    /// Opened by this upgrade request.
    Open(u64, &'a Request<'r>),
    /// A message arrived.
    Message(u64, Message<'a>),
    /// Closed with a code and reason.
    Close(u64, u16, &'a str),
}

/// Unwraps a component of a known kind.
trait FromComponent: Sized {
    fn from_component(c: Component) -> Option<Self>;
}

macro_rules! from_component {
    ($ty:ty, $variant:ident) => {
        impl FromComponent for $ty {
            fn from_component(c: Component) -> Option<Self> {
                match c {
                    Component::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
from_component!(HttpHandlerBox, HttpHandler);
from_component!(MiddlewareBox, Middleware);
from_component!(CleanerBox, Cleaner);
from_component!(LifecycleBox, Lifecycle);
from_component!(WebSocketBox, WebSocket);
from_component!(TaskHandlerBox, TaskHandler);

fn unavailable(resp: &mut Response) {
    resp.reset();
    resp.text(
        503,
        "service unavailable: a plugin instance could not be created\n",
    );
}
