//! What to run: the [`Plan`] built from a config against the loaded plugins (routes, and the
//! component slots of every kind), shared read-only by every thread. A leaf: it imports no
//! runtime.

use std::{collections::BTreeMap, time::Duration};

use plughost_plugin_api::abi::ComponentKind;

use crate::{
    config::{ComponentRef, Config, Framing, Limits, SocketProtocol, WebSocketConfig},
    error::PluginError,
    plugin::{Registry, Slot},
    router::Router,
    statics::Statics,
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
    /// See `Config::unix_socket_mode`.
    pub unix_socket_mode: u32,
    /// Task handlers, listeners, cron jobs and custom processes (HTTP workers hold instances
    /// of the task handlers too, for `finish`).
    pub services: ServicePlan,
    /// Socket handlers, one slot per distinct component.
    pub socket_handlers: Vec<Slot>,
    /// The sockets, in config order.
    pub sockets: Vec<SocketPlan>,
    /// Static files (the `static` section), with the folder held open.
    pub statics: Option<Statics>,
}

/// One socket of `sockets`.
#[derive(Debug, Clone)]
pub struct SocketPlan {
    /// What identifies it across reloads: its protocol and address (`Tcp 127.0.0.1:5291`),
    /// so a reload changes the handler and framing of a fixed address in place; with port 0,
    /// all its settings (any change is another socket, on a new port).
    pub key: String,
    /// The address as configured (a unix socket's path made absolute).
    pub listen: String,
    /// The address as written in `server.ron`.
    pub listen_as_written: String,
    /// TCP or UDP.
    pub protocol: SocketProtocol,
    /// How its input is cut into frames.
    pub framing: Framing,
    /// Largest frame.
    pub max_package_bytes: usize,
    /// How long a connection may send nothing; `None`: forever.
    pub idle: Option<std::time::Duration>,
    /// Index into `Plan::socket_handlers`; `None` for HTTP and WebSocket sockets.
    pub handler: Option<usize>,
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
        let (socket_handlers, sockets) = Self::sockets(config, registry)?;
        Ok(Plan {
            socket_handlers,
            sockets,
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
            unix_socket_mode: config.unix_socket_mode,
            services: ServicePlan::build(config, registry)?,
            statics: config.statics.as_ref().map(Statics::new),
        })
    }
}

impl Plan {
    /// The socket handler slots and the sockets that use them.
    fn sockets(
        config: &Config,
        registry: &Registry,
    ) -> Result<(Vec<Slot>, Vec<SocketPlan>), PluginError> {
        let mut handlers: Vec<Slot> = Vec::new();
        let mut sockets = Vec::new();
        for s in &config.sockets {
            let handler = match ComponentRef::parse(&s.handler) {
                // HTTP and WebSocket sockets serve the routes.
                None => None,
                Some(r) => Some(match handlers.iter().position(|h| h.reference == r) {
                    Some(i) => i,
                    None => {
                        handlers.push(registry.slot(config, &r, ComponentKind::Socket)?);
                        handlers.len() - 1
                    }
                }),
            };
            let mut key = format!("{:?} {}", s.protocol, s.listen);
            if s.listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.port() == 0)
            {
                key = format!(
                    "{key} {} {:?} {}",
                    s.handler, s.framing, s.max_package_bytes
                );
                let twins = sockets
                    .iter()
                    .filter(|o: &&SocketPlan| o.key.starts_with(&key));
                key = format!("{key} #{}", twins.count() + 1);
            }
            sockets.push(SocketPlan {
                key,
                listen: s.listen.clone(),
                listen_as_written: s.listen_as_written.clone(),
                protocol: s.protocol,
                framing: s.framing.clone().unwrap_or(Framing::Raw),
                max_package_bytes: s.max_package_bytes,
                idle: (s.heartbeat_idle_time > 0)
                    .then(|| std::time::Duration::from_secs(s.heartbeat_idle_time)),
                handler,
            });
        }
        Ok((handlers, sockets))
    }

    /// The socket `key`, if this plan has it.
    pub fn socket(&self, key: &str) -> Option<&SocketPlan> {
        self.sockets.iter().find(|s| s.key == key)
    }
}

/// The services' part of a [`Plan`]: every slot they instantiate, resolved from the config.
#[derive(Debug, Default)]
pub struct ServicePlan {
    /// Every task handler of every enabled plugin: all are deliverable.
    pub tasks: Vec<Slot>,
    /// `plugin.component` of each entry of `tasks`.
    task_names: Vec<String>,
    /// Event listeners, one slot per distinct component.
    pub listeners: Vec<Slot>,
    /// Events: name -> indexes into `listeners`, in the order they run.
    pub events: BTreeMap<String, Vec<usize>>,
    /// Task worker threads (0: tasks and events are disabled).
    pub task_workers: usize,
    /// Bound of the task queue (and of each custom process's mailbox).
    pub queue_size: usize,
    /// Whether the timer thread runs.
    pub timer: bool,
    /// The cron jobs (empty when the timer is disabled).
    pub cron: Vec<CronSlot>,
    /// How long a reload or stop waits for a running cron job.
    pub timer_max_wait: Duration,
    /// The enabled custom processes.
    pub processes: Vec<ProcessSlot>,
    /// `max_wait_time`: how long a stop or reload waits for task workers and processes.
    pub max_wait: Duration,
}

/// One cron job.
#[derive(Debug, Clone)]
pub struct CronSlot {
    /// The job component.
    pub slot: Slot,
    /// Time between runs.
    pub interval: Duration,
    /// Run at start instead of one interval after.
    pub immediate: bool,
}

/// One custom process.
#[derive(Debug, Clone)]
pub struct ProcessSlot {
    /// Its name in `processes`.
    pub name: String,
    /// The process component.
    pub slot: Slot,
    /// Instances (threads).
    pub num: usize,
    /// Pause before a `run` that returned or panicked starts again.
    pub restart_interval: Duration,
}

impl ServicePlan {
    /// Resolves the services' components of `config` against the loaded plugins.
    pub fn build(config: &Config, registry: &Registry) -> Result<ServicePlan, PluginError> {
        let mut tasks = Vec::new();
        for (plugin, lib) in &registry.libraries {
            for c in lib.manifest.components.iter() {
                if c.kind == ComponentKind::TaskHandler {
                    let r = ComponentRef {
                        plugin: plugin.clone(),
                        component: c.name.to_string(),
                    };
                    tasks.push(registry.slot(config, &r, ComponentKind::TaskHandler)?);
                }
            }
        }
        let mut listeners: Vec<Slot> = Vec::new();
        let mut events = BTreeMap::new();
        for (event, names) in &config.events {
            let mut order = Vec::new();
            for name in names {
                let r = ComponentRef::parse(name).expect("validated");
                let i = match listeners.iter().position(|s| s.reference == r) {
                    Some(i) => i,
                    None => {
                        listeners.push(registry.slot(config, &r, ComponentKind::EventListener)?);
                        listeners.len() - 1
                    }
                };
                order.push(i);
            }
            events.insert(event.clone(), order);
        }
        let mut cron = Vec::new();
        if config.timer.enable {
            for job in &config.timer.jobs {
                let r = ComponentRef::parse(&job.job).expect("validated");
                cron.push(CronSlot {
                    slot: registry.slot(config, &r, ComponentKind::CronJob)?,
                    interval: Duration::from_millis(job.interval_ms),
                    immediate: job.immediate,
                });
            }
        }
        let mut processes = Vec::new();
        for (name, p) in config.processes.iter().filter(|(_, p)| p.enable) {
            let r = ComponentRef::parse(&p.component).expect("validated");
            processes.push(ProcessSlot {
                name: name.clone(),
                slot: registry.slot(config, &r, ComponentKind::Process)?,
                num: p.num,
                restart_interval: Duration::from_millis(p.restart_interval_ms),
            });
        }
        Ok(ServicePlan {
            task_names: tasks.iter().map(|s| s.reference.to_string()).collect(),
            tasks,
            listeners,
            events,
            task_workers: config.task_worker_num,
            queue_size: config.task_queue_size,
            timer: config.timer.enable,
            cron,
            timer_max_wait: Duration::from_secs(config.timer.max_wait_time),
            processes,
            max_wait: Duration::from_secs(config.max_wait_time),
        })
    }

    /// The index in `tasks` of task handler `name` (`plugin.component`).
    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.task_names.iter().position(|n| n == name)
    }

    /// Every slot, for the reload probe.
    pub fn all_slots(&self) -> impl Iterator<Item = &Slot> {
        self.tasks
            .iter()
            .chain(&self.listeners)
            .chain(self.cron.iter().map(|c| &c.slot))
            .chain(self.processes.iter().map(|p| &p.slot))
    }
}
