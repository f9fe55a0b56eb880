//! One worker's [`Instances`] of every component of a [`Plan`], and the middleware onion a
//! request goes through: request hooks in order, then the handler, then the response hooks of
//! the middleware that ran, in reverse, then the cleaners. A panic anywhere costs that request
//! a 500 and recreates that one instance.

use std::sync::{atomic::Ordering, Arc};

use abi_stable::std_types::RResult;
use plughost_plugin_api::{
    abi::{
        CleanerBox, ComponentKind, Handshake, HostBox, HttpHandlerBox, MiddlewareBox,
        PluginError as FfiError, SocketBox, TaskHandlerBox, WebSocketBox, WorkerInfo,
    },
    Flow, Request, Response,
};

use crate::{
    config::ComponentRef,
    error::PluginError,
    plan::Plan,
    plugin::{
        bank::{report_failure, Bank, Hooks},
        deferred, Slot,
    },
    router::Match,
    runtime::{calls, stats::WorkerStats},
    socket::SocketEvent,
    ws::WsEvent,
};

/// One worker's instances of every component of a plan.
pub struct Instances {
    plan: Arc<Plan>,
    host: HostBox,
    worker: WorkerInfo,
    handlers: Bank<HttpHandlerBox>,
    middleware: Bank<MiddlewareBox>,
    cleaners: Bank<CleanerBox>,
    websocket: Bank<WebSocketBox>,
    tasks: Bank<TaskHandlerBox>,
    sockets: Bank<SocketBox>,
    hooks: Hooks,
    /// WebSocket instances a reload replaced, kept for the `on_close` of the connections
    /// whose route it removed.
    retired: Vec<(Slot, WebSocketBox)>,
    /// Requests since the instances were created (for `max_request`).
    served: u64,
}

/// Which WebSocket instance an event goes to.
#[derive(Debug, Clone, Copy)]
pub enum WsTarget<'a> {
    /// The current instance of handler slot `i`.
    Live(usize),
    /// The last instance of this component that a reload retired.
    Retired(&'a ComponentRef),
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
        Ok(Instances {
            handlers: Bank::create(&plan.handlers, &host, worker)?,
            middleware: Bank::create(&plan.middleware, &host, worker)?,
            cleaners: Bank::create(&plan.cleaners, &host, worker)?,
            websocket: Bank::create(&plan.websocket, &host, worker)?,
            tasks: Bank::create(&plan.services.tasks, &host, worker)?,
            sockets: Bank::create(&plan.socket_handlers, &host, worker)?,
            hooks: Hooks::start(&plan.hooks, &host, worker)?,
            retired: Vec::new(),
            plan,
            host,
            worker,
            served: 0,
        })
    }

    /// The plan these instances were made from.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Runs the worker-stop hooks; the instances are dropped with `self`.
    pub fn stop(self) {
        self.hooks.stop();
    }

    /// Moves to `plan` between two requests: instances whose slot is unchanged (same
    /// component, same library version, same config) are kept; the others are created anew.
    /// Nothing changes unless every new instance could be created. Replaced lifecycle hooks get
    /// `on_worker_stop` (old) and `on_worker_start` (new). Returns how many were created.
    pub fn rebuild(&mut self, plan: Arc<Plan>) -> Result<usize, PluginError> {
        let (host, w) = (&self.host, self.worker);
        let handlers = self.handlers.prepare(&plan.handlers, host, w)?;
        let middleware = self.middleware.prepare(&plan.middleware, host, w)?;
        let cleaners = self.cleaners.prepare(&plan.cleaners, host, w)?;
        let websocket = self.websocket.prepare(&plan.websocket, host, w)?;
        let tasks = self.tasks.prepare(&plan.services.tasks, host, w)?;
        let sockets = self.sockets.prepare(&plan.socket_handlers, host, w)?;
        let hooks = self.hooks.prepare(&plan.hooks, host)?;
        let created = [
            &handlers,
            &middleware,
            &cleaners,
            &websocket,
            &tasks,
            &sockets,
            &hooks,
        ]
        .iter()
        .map(|s| s.created())
        .sum();
        // Every new instance exists: swap.
        self.handlers.apply(handlers);
        self.middleware.apply(middleware);
        self.cleaners.apply(cleaners);
        let (replaced, _) = self.websocket.apply(websocket);
        self.retired.extend(replaced);
        self.tasks.apply(tasks);
        self.sockets.apply(sockets);
        self.hooks.apply(hooks);
        self.plan = plan;
        Ok(created)
    }

    /// Requests served since creation.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Drops the retired WebSocket instances no connection needs any more.
    pub fn prune_retired(&mut self, needed: impl Fn(&ComponentRef) -> bool) {
        if !self.retired.is_empty() {
            self.retired.retain(|(slot, _)| needed(&slot.reference));
        }
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
                Match::Found(h) => match self.handlers.get(*h, &self.host, self.worker) {
                    Some(handler) => {
                        let inside = calls::enter(self.plan.handlers[*h].call);
                        let result = handler.handle(req, resp);
                        drop(inside);
                        if let RResult::RErr(e) = result {
                            self.failed(ComponentKind::HttpHandler, *h, &e, resp, stats);
                        }
                    }
                    None => unavailable(resp),
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
        for i in 0..self.cleaners.items.len() {
            if let Some(c) = self.cleaners.items[i].as_mut() {
                let inside = calls::enter(self.cleaners.slots[i].call);
                let result = c.clean();
                drop(inside);
                if let RResult::RErr(e) = result {
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
        for i in 0..self.middleware.items.len() {
            let Some(m) = self.middleware.get(i, &self.host, self.worker) else {
                unavailable(resp);
                return (i, true);
            };
            let inside = calls::enter(self.plan.middleware[i].call);
            let result = m.on_request(req, resp);
            drop(inside);
            match result {
                RResult::ROk(Flow::Continue) => {}
                RResult::ROk(Flow::Respond) => return (i + 1, true),
                RResult::RErr(e) => {
                    self.failed(ComponentKind::Middleware, i, &e, resp, stats);
                    return (i, true);
                }
            }
        }
        (self.middleware.items.len(), false)
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
            if let Some(m) = self.middleware.items[i].as_mut() {
                let inside = calls::enter(self.middleware.slots[i].call);
                let result = m.on_response(req, resp);
                drop(inside);
                if let RResult::RErr(e) = result {
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
            let inside = calls::enter(self.plan.websocket[ws].call);
            let shaken = self
                .websocket
                .get(ws, &self.host, self.worker)
                .map(|h| h.on_handshake(req, resp));
            drop(inside);
            match shaken {
                None => unavailable(resp),
                Some(RResult::ROk(Handshake::Accept)) => accepted = true,
                Some(RResult::ROk(Handshake::Refuse)) => {
                    if resp.status() < 300 {
                        resp.set_status(403);
                    }
                    if resp.body().is_empty() {
                        resp.set_body("websocket handshake refused\n");
                    }
                }
                Some(RResult::RErr(e)) => {
                    self.failed(ComponentKind::WebSocket, ws, &e, resp, stats)
                }
            }
        }
        if !accepted {
            // A refusal is a response like any other: the middleware sees it.
            self.response_hooks(ran, req, resp, stats);
        }
        accepted
    }

    /// A WebSocket event for `target`; false when the handler panicked (a live instance is
    /// recreated) or there is no instance to take it, and the connection should close with
    /// 1011.
    pub fn ws_event(
        &mut self,
        target: WsTarget<'_>,
        stats: &WorkerStats,
        event: WsEvent<'_, '_>,
    ) -> bool {
        let handler = match target {
            WsTarget::Live(i) => {
                let call = self.plan.websocket[i].call;
                self.websocket
                    .get(i, &self.host, self.worker)
                    .map(|h| (h, call))
            }
            WsTarget::Retired(r) => self
                .retired
                .iter_mut()
                .rev()
                .find(|(slot, _)| slot.reference == *r)
                .map(|(slot, h)| (h, slot.call)),
        };
        let Some((h, call)) = handler else {
            return false;
        };
        let inside = calls::enter(call);
        let result = match event {
            WsEvent::Open(conn, req) => h.on_open(conn, req),
            WsEvent::Message(conn, message) => h.on_message(conn, message),
            WsEvent::Close(conn, code, reason) => h.on_close(conn, code, reason.into()),
        };
        drop(inside);
        let RResult::RErr(e) = result else {
            return true;
        };
        match target {
            WsTarget::Live(i) => {
                let mut ignored = Response::new();
                self.failed(ComponentKind::WebSocket, i, &e, &mut ignored, stats);
            }
            WsTarget::Retired(r) => {
                stats.panics.fetch_add(1, Ordering::Relaxed);
                let slot = self.retired.iter().rev().find(|(s, _)| s.reference == *r);
                if let Some((slot, _)) = slot {
                    let slot = slot.clone();
                    report_failure(
                        Some(&mut self.hooks),
                        self.worker,
                        ComponentKind::WebSocket,
                        &slot,
                        &e,
                    );
                }
            }
        }
        false
    }

    /// An event of a connection of socket `socket` (its key); false when the handler panicked
    /// (its instance is recreated) or a reload removed the socket, and the connection should
    /// close.
    pub fn socket_event(
        &mut self,
        socket: &str,
        stats: &WorkerStats,
        event: SocketEvent<'_>,
    ) -> bool {
        let Some(i) = self.plan.socket(socket).and_then(|s| s.handler) else {
            return false;
        };
        let call = self.plan.socket_handlers[i].call;
        let Some(h) = self.sockets.get(i, &self.host, self.worker) else {
            return false;
        };
        let inside = calls::enter(call);
        let result = match event {
            SocketEvent::Connect(conn, peer) => h.on_connect(conn, peer.into()),
            SocketEvent::Receive(conn, frame) => h.on_receive(conn, frame.into()),
            SocketEvent::Close(conn) => h.on_close(conn),
            SocketEvent::Packet(peer, addr, datagram) => {
                h.on_packet(peer, addr.into(), datagram.into())
            }
        };
        drop(inside);
        let RResult::RErr(e) = result else {
            return true;
        };
        self.failed(ComponentKind::Socket, i, &e, &mut Response::new(), stats);
        false
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
        let Some(h) = self.tasks.get(i, &self.host, self.worker) else {
            return;
        };
        let inside = calls::enter(self.plan.services.tasks[i].call);
        let finished = h.finish(result.into());
        drop(inside);
        if let RResult::RErr(e) = finished {
            let mut ignored = Response::new();
            self.failed(ComponentKind::TaskHandler, i, &e, &mut ignored, stats);
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
        let slot = match kind {
            ComponentKind::HttpHandler => &self.plan.handlers[i],
            ComponentKind::Middleware => &self.plan.middleware[i],
            ComponentKind::Cleaner => &self.plan.cleaners[i],
            ComponentKind::WebSocket => &self.plan.websocket[i],
            ComponentKind::TaskHandler => &self.plan.services.tasks[i],
            ComponentKind::Socket => &self.plan.socket_handlers[i],
            other => unreachable!("{other} instances do not live on HTTP workers"),
        };
        report_failure(Some(&mut self.hooks), self.worker, kind, slot, error);
        if matches!(kind, ComponentKind::HttpHandler | ComponentKind::Middleware) {
            // The request gets this failure's 500, not a response it may have deferred.
            deferred::cancel_current();
        }
        resp.reset();
        resp.text(500, "internal server error\n");
        let (host, w) = (&self.host, self.worker);
        match kind {
            ComponentKind::HttpHandler => self.handlers.remake(i, host, w),
            ComponentKind::Middleware => self.middleware.remake(i, host, w),
            ComponentKind::Cleaner => self.cleaners.remake(i, host, w),
            ComponentKind::WebSocket => self.websocket.remake(i, host, w),
            ComponentKind::Socket => self.sockets.remake(i, host, w),
            _ => self.tasks.remake(i, host, w),
        }
    }
}

fn unavailable(resp: &mut Response) {
    resp.reset();
    resp.text(
        503,
        "service unavailable: a plugin instance could not be created\n",
    );
}
