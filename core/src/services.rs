//! The services beside the HTTP workers: task workers ([`task`]: tasks and events), the cron
//! timer ([`crate::timer`]) and custom processes ([`crate::process`]). They share one shape:
//! started from a [`Plan`] after the HTTP workers are ready, moved to a new plan on reload,
//! and stopped with a deadline, after which whatever has not returned is logged and left
//! behind (the process exits anyway, so nothing outlives `plughost stop`).

use std::{
    collections::BTreeMap,
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::{RResult, RSlice};
use plughost_plugin_api::abi::{
    Component, ComponentKind, CronJobBox, EventListenerBox, HostBox, HostError, LifecycleBox,
    PluginError as FfiError, ProcessBox, TaskHandlerBox, WorkerInfo,
};

use crate::{
    config::{ComponentRef, Config},
    error::{PluginError, StartError},
    host::Host,
    pipeline::Plan,
    plugin::{Registry, Slot},
    process::{self, Processes},
    stats::Stats,
    task::{self, Queue},
    timer::Timer,
    worker::Control,
};

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

/// What the host API reaches: the task queue and the custom processes' mailboxes.
#[derive(Debug)]
pub struct Handle {
    queue: Option<Arc<Queue>>,
    processes: Arc<process::Directory>,
}

impl Handle {
    /// `Host::deliver`.
    pub fn deliver(
        &self,
        task: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
        origin: WorkerInfo,
    ) -> Result<u64, HostError> {
        match &self.queue {
            Some(q) => q.deliver(task, payload, delay_ms, tries, origin),
            None => Err(HostError::NotEnabled),
        }
    }

    /// `Host::fire`.
    pub fn fire(
        &self,
        event: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
    ) -> Result<u64, HostError> {
        match &self.queue {
            Some(q) => q.fire(event, payload, delay_ms, tries),
            None => Err(HostError::NotEnabled),
        }
    }

    /// `Host::send_to_process`.
    pub fn send_to_process(&self, name: &str, payload: RSlice<'_, u8>) -> Result<u64, HostError> {
        self.processes.send(name, payload.as_slice())
    }
}

/// The running services.
#[derive(Debug)]
pub struct Services {
    queue: Option<Arc<Queue>>,
    task_workers: Vec<thread::JoinHandle<()>>,
    timer: Option<Timer>,
    processes: Processes,
    env: Env,
}

/// What every service thread is started with.
#[derive(Clone)]
pub(crate) struct Env {
    pub host: HostBox,
    pub stats: Arc<Stats>,
    /// Control channels of the HTTP workers, by id, for `finish`.
    pub workers: Arc<Vec<async_channel::Sender<Control>>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Starts the task workers, the timer and the custom processes of `plan`, and connects the
/// host API to them. Fails, having stopped what it started, when an instance cannot be
/// created.
pub fn start(
    plan: &Arc<Plan>,
    host: &Host,
    stats: &Arc<Stats>,
    workers: Vec<async_channel::Sender<Control>>,
) -> Result<Services, StartError> {
    let sp = &plan.services;
    let env = Env {
        host: host.boxed(),
        stats: stats.clone(),
        workers: Arc::new(workers),
    };
    let queue = (sp.task_workers > 0).then(|| Arc::new(Queue::new(plan.clone(), stats.clone())));
    let directory = Arc::new(process::Directory::default());
    host.set_services(Arc::new(Handle {
        queue: queue.clone(),
        processes: directory.clone(),
    }));
    let mut services = Services {
        queue: queue.clone(),
        task_workers: Vec::new(),
        timer: None,
        processes: Processes::new(directory, sp.queue_size),
        env: env.clone(),
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut expected = 0;
    if let Some(q) = &queue {
        for id in 0..sp.task_workers {
            let h = task::spawn(id as u32, q.clone(), env.clone(), ready_tx.clone())
                .map_err(StartError::io("cannot start a task worker thread"))?;
            services.task_workers.push(h);
            expected += 1;
        }
    }
    if sp.timer {
        services.timer = Some(
            Timer::spawn(plan.clone(), env.clone(), Some(ready_tx.clone()))
                .map_err(StartError::io("cannot start the timer thread"))?,
        );
        expected += 1;
    }
    expected += services
        .processes
        .start_all(plan, &env, Some(&ready_tx))
        .map_err(StartError::io("cannot start a custom process thread"))?;
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..expected {
        match ready_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((what, Err(reason))) => {
                failure.get_or_insert(StartError::Worker {
                    id: 0,
                    reason: format!("{what}: {reason}"),
                });
            }
            Err(_) => {
                failure.get_or_insert(StartError::Worker {
                    id: 0,
                    reason: "a service thread exited during start".into(),
                });
                break;
            }
        }
    }
    if let Some(e) = failure {
        services.begin_stop();
        services.finish_stop(Instant::now(), Duration::from_secs(1));
        return Err(e);
    }
    if !sp.tasks.is_empty() || !sp.events.is_empty() || sp.timer || !sp.processes.is_empty() {
        log::info!(
            "services: {} task worker(s) (queue {}; {} task handler(s), {} event(s)), timer {}, {} custom process thread(s)",
            sp.task_workers,
            sp.queue_size,
            sp.tasks.len(),
            sp.events.len(),
            if sp.timer { format!("on ({} job(s))", sp.cron.len()) } else { "off".into() },
            services.processes.threads()
        );
    }
    if sp.task_workers == 0 && !sp.events.is_empty() {
        log::warn!("events are configured but task_worker_num is 0: fire() answers NotEnabled");
    }
    Ok(services)
}

/// Who reports readiness: a thread's description, and whether its instances exist.
pub(crate) type Ready = mpsc::Sender<(String, Result<(), String>)>;

impl Services {
    /// Moves every service to `plan`: task workers swap between tasks, the timer between
    /// runs, and custom processes whose component changed are stopped (`on_reload`) and
    /// started again with the new version.
    pub fn reload(&mut self, plan: &Arc<Plan>) {
        if let Some(q) = &self.queue {
            q.set_plan(plan.clone());
        }
        let sp = &plan.services;
        match (&self.timer, sp.timer) {
            (Some(t), true) => t.reload(plan.clone()),
            (Some(_), false) => {
                if let Some(t) = self.timer.take() {
                    let max = t.max_wait();
                    t.stop();
                    if !t.join_until(Instant::now() + max) {
                        log::warn!("timer: a cron job is still running after {max:?}; left behind");
                    }
                }
                log::info!("timer disabled");
            }
            (None, true) => match Timer::spawn(plan.clone(), self.env.clone(), None) {
                Ok(t) => {
                    self.timer = Some(t);
                    log::info!("timer enabled ({} job(s))", sp.cron.len());
                }
                Err(e) => log::error!("cannot start the timer thread: {e}"),
            },
            (None, false) => {}
        }
        self.processes.reload(plan, &self.env);
    }

    /// Stops accepting tasks and tells every service thread to stop; returns at once.
    pub fn begin_stop(&mut self) {
        if let Some(q) = &self.queue {
            let dropped = q.close();
            if dropped > 0 {
                log::warn!("stopping: {dropped} queued task(s)/event(s) dropped");
            }
        }
        if let Some(t) = &self.timer {
            t.stop();
        }
        self.processes.begin_stop();
    }

    /// Waits for the service threads: task workers and processes until `started + max_wait`,
    /// the timer until `started + timer.max_wait_time`. Logs what it leaves behind.
    pub fn finish_stop(&mut self, started: Instant, max_wait: Duration) {
        let deadline = started + max_wait;
        let threads =
            self.task_workers.len() + self.processes.threads() + self.timer.is_some() as usize;
        let mut left = Vec::new();
        let workers: Vec<_> = self
            .task_workers
            .drain(..)
            .enumerate()
            .map(|(i, h)| (format!("task worker {i}"), h))
            .collect();
        left.extend(join_until(workers, deadline));
        if let Some(t) = self.timer.take() {
            let wait = t.max_wait();
            if !t.join_until(started + wait) {
                left.push("timer (a cron job still running)".to_owned());
            }
        }
        left.extend(self.processes.finish_stop(deadline));
        if threads == 0 {
            return;
        }
        if left.is_empty() {
            log::info!(
                "services stopped: {threads} thread(s) joined in {} ms",
                started.elapsed().as_millis()
            );
        } else {
            log::error!(
                "services stopped: {} of {threads} thread(s) did not return in time and are left behind: {}",
                left.len(),
                left.join(", ")
            );
        }
    }
}

/// Joins the threads that finish by `deadline`; returns the names of the others (detached).
pub(crate) fn join_until(
    threads: Vec<(String, thread::JoinHandle<()>)>,
    deadline: Instant,
) -> Vec<String> {
    let mut pending = threads;
    loop {
        let (done, rest): (Vec<_>, Vec<_>) =
            pending.into_iter().partition(|(_, h)| h.is_finished());
        for (name, h) in done {
            if h.join().is_err() {
                log::error!("{name}: the thread panicked");
            }
        }
        pending = rest;
        if pending.is_empty() || Instant::now() >= deadline {
            return pending.into_iter().map(|(n, _)| n).collect();
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Unwraps a component of a known kind.
pub(crate) trait Unwrap: Sized {
    fn unwrap(c: Component) -> Option<Self>;
}

macro_rules! unwrap_kind {
    ($ty:ty, $variant:ident) => {
        impl Unwrap for $ty {
            fn unwrap(c: Component) -> Option<Self> {
                match c {
                    Component::$variant(x) => Some(x),
                    _ => None,
                }
            }
        }
    };
}
unwrap_kind!(TaskHandlerBox, TaskHandler);
unwrap_kind!(EventListenerBox, EventListener);
unwrap_kind!(CronJobBox, CronJob);
unwrap_kind!(ProcessBox, Process);
unwrap_kind!(LifecycleBox, Lifecycle);

/// One thread's instances of a list of slots. `None` is an instance whose factory failed
/// after a panic; it is made again on next use.
pub(crate) struct Bank<T> {
    pub slots: Vec<Slot>,
    pub items: Vec<Option<T>>,
}

impl<T> std::fmt::Debug for Bank<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bank")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<T: Unwrap> Bank<T> {
    /// Instances of every slot, or the first error.
    pub fn create(
        slots: &[Slot],
        host: &HostBox,
        info: WorkerInfo,
    ) -> Result<Bank<T>, PluginError> {
        let items = slots
            .iter()
            .map(|s| s.instantiate(host, info).map(T::unwrap))
            .collect::<Result<_, _>>()?;
        Ok(Bank {
            slots: slots.to_vec(),
            items,
        })
    }

    /// Creates what moving to `slots` needs (instances of the slots that are new); changes
    /// nothing, so a failure leaves every instance as it was.
    pub fn prepare(
        &self,
        slots: &[Slot],
        host: &HostBox,
        info: WorkerInfo,
    ) -> Result<Swap, PluginError> {
        let mut made = Vec::with_capacity(slots.len());
        for s in slots {
            match self.slots.iter().position(|o| o.same_as(s)) {
                Some(i) => made.push(Ok(i)),
                None => made.push(Err(s.instantiate(host, info)?)),
            }
        }
        Ok(Swap {
            slots: slots.to_vec(),
            made,
        })
    }

    /// Moves to a prepared swap: unchanged instances are kept. Returns the replaced instances
    /// (with their slots) and, per new entry, whether it is a new instance.
    pub fn apply(&mut self, swap: Swap) -> (Vec<(Slot, T)>, Vec<bool>) {
        let fresh = swap.made.iter().map(|m| m.is_err()).collect();
        let items = swap
            .made
            .into_iter()
            .map(|m| match m {
                Ok(i) => self.items[i].take(),
                Err(c) => T::unwrap(c),
            })
            .collect();
        let old_slots = std::mem::replace(&mut self.slots, swap.slots);
        let old_items = std::mem::replace(&mut self.items, items);
        let replaced = old_slots
            .into_iter()
            .zip(old_items)
            .filter_map(|(s, it)| it.map(|it| (s, it)))
            .collect();
        (replaced, fresh)
    }

    /// The instance `i`, made again first if it is missing; `None` if that fails (logged).
    pub fn get(&mut self, i: usize, host: &HostBox, info: WorkerInfo) -> Option<&mut T> {
        if self.items[i].is_none() {
            self.remake(i, host, info);
        }
        self.items[i].as_mut()
    }

    /// Replaces instance `i` with a new one (after a panic).
    pub fn remake(&mut self, i: usize, host: &HostBox, info: WorkerInfo) {
        self.items[i] = match self.slots[i].instantiate(host, info) {
            Ok(c) => T::unwrap(c),
            Err(e) => {
                log::error!("{} {}: {e}", info.kind.as_str(), info.id);
                None
            }
        };
    }
}

/// What [`Bank::apply`] needs: for each new slot, the index of the kept instance or the new
/// instance.
pub(crate) struct Swap {
    slots: Vec<Slot>,
    made: Vec<Result<usize, Component>>,
}

/// The lifecycle hooks of one service thread: `on_worker_start/stop/error` with its kind and id.
#[derive(Debug)]
pub(crate) struct Hooks {
    bank: Bank<LifecycleBox>,
    info: WorkerInfo,
}

impl Hooks {
    /// Creates the hooks of `plan` on this thread and runs `on_worker_start`.
    pub fn start(plan: &Plan, host: &HostBox, info: WorkerInfo) -> Result<Hooks, PluginError> {
        let mut hooks = Hooks {
            bank: Bank::create(&plan.hooks, host, info)?,
            info,
        };
        hooks.each("on_worker_start", |h, w| h.on_worker_start(w), |_| true);
        Ok(hooks)
    }

    /// `on_worker_stop`, then drops the instances.
    pub fn stop(mut self) {
        self.each("on_worker_stop", |h, w| h.on_worker_stop(w), |_| true);
    }

    /// `on_worker_error` after plugin code on this thread failed.
    pub fn error(&mut self, message: &str) {
        self.each(
            "on_worker_error",
            |h, w| h.on_worker_error(w, message.into()),
            |_| true,
        );
    }

    /// Moves to the hooks of `plan`: replaced ones get `on_worker_stop`, new ones
    /// `on_worker_start`. Keeps the old hooks when a new one cannot be created.
    pub fn rebuild(&mut self, plan: &Plan, host: &HostBox) {
        match self.bank.prepare(&plan.hooks, host, self.info) {
            Ok(swap) => {
                let (replaced, fresh) = self.bank.apply(swap);
                for (slot, mut h) in replaced {
                    if let RResult::RErr(e) = h.on_worker_stop(self.info) {
                        log::error!("hook on_worker_stop of {} failed: {e}", slot.reference);
                    }
                }
                self.each("on_worker_start", |h, w| h.on_worker_start(w), |i| fresh[i]);
            }
            Err(e) => log::error!(
                "{} {}: keeping the old lifecycle hooks: {e}",
                self.info.kind.as_str(),
                self.info.id
            ),
        }
    }

    fn each(
        &mut self,
        what: &str,
        call: impl Fn(&mut LifecycleBox, WorkerInfo) -> RResult<(), FfiError>,
        which: impl Fn(usize) -> bool,
    ) {
        for (i, hook) in self.bank.items.iter_mut().enumerate() {
            if let (true, Some(h)) = (which(i), hook.as_mut()) {
                if let RResult::RErr(e) = call(h, self.info) {
                    log::error!(
                        "{} {}: hook {what} of {} failed: {e}",
                        self.info.kind.as_str(),
                        self.info.id,
                        self.bank.slots[i].reference
                    );
                }
            }
        }
    }
}

/// Reports a failed call into plugin code on a service thread: logs it with the plugin's
/// name and tells the thread's lifecycle hooks.
pub(crate) fn report_failure(
    hooks: &mut Option<Hooks>,
    info: WorkerInfo,
    kind: ComponentKind,
    slot: &Slot,
    error: &FfiError,
) {
    log::error!(
        "plugin {}: {kind} {:?} on {} {} {error}",
        slot.reference.plugin,
        slot.reference.component,
        info.kind.as_str(),
        info.id
    );
    if let Some(h) = hooks.as_mut() {
        h.error(&format!("{kind} {} {error}", slot.reference));
    }
}

/// The services' lines of `plughost info`.
pub fn info(s: &mut String, st: &crate::stats::ServiceStats) {
    use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
    let _ = writeln!(
        s,
        "tasks: {} accepted, {} ok, {} failed, {} retried, {} refused, {} dropped at stop",
        st.tasks_accepted.load(Relaxed),
        st.tasks_ok.load(Relaxed),
        st.tasks_failed.load(Relaxed),
        st.tasks_retried.load(Relaxed),
        st.tasks_refused.load(Relaxed),
        st.tasks_dropped.load(Relaxed)
    );
    let _ = writeln!(
        s,
        "events: {} fired, {} ok, {} failed",
        st.events_fired.load(Relaxed),
        st.events_ok.load(Relaxed),
        st.events_failed.load(Relaxed)
    );
    let _ = writeln!(
        s,
        "cron: {} runs, {} panicked, {} ticks skipped",
        st.cron_runs.load(Relaxed),
        st.cron_panics.load(Relaxed),
        st.cron_skipped.load(Relaxed)
    );
    let _ = writeln!(
        s,
        "processes: {} restarts, {} panicked",
        st.process_restarts.load(Relaxed),
        st.process_panics.load(Relaxed)
    );
}
