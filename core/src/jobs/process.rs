//! Custom processes: each instance of each enabled entry of `processes` runs on a thread of
//! its own. `run(ctx)` loops until `ctx.should_stop()`; a `run` that returns early or panics
//! is started again after `restart_interval_ms` (a panicked instance is made anew first). On
//! reload the instance's `run` is asked to return, gets `on_reload`, and the new version starts
//! on a new thread; on stop it gets `on_stop` after `run` returns.
//!
//! Each instance has a mailbox, bounded by `task_queue_size`, that outlives restarts and
//! reloads: `send_to_process` puts a copy of the message in every instance's mailbox and
//! `ctx.recv` takes from it.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, ROption, RResult, RVec},
};
use plughost_plugin_api::abi::{
    ComponentKind, HostError, ProcessBox, ProcessCtxFfi, ProcessCtxFfi_TO, ThreadKind, WorkerInfo,
};

use crate::{
    jobs::{join_until, Env, Ready},
    plan::{Plan, ProcessSlot},
    plugin::{
        bank::{report_failure, Hooks, Unwrap},
        Slot,
    },
    runtime::calls,
};

/// Why a process thread should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Reason {
    Run = 0,
    Reload = 1,
    Stop = 2,
}

/// One instance's messages, kept across restarts and reloads.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Vec<u8>>>,
    wake: Condvar,
    capacity: usize,
}

impl Mailbox {
    fn new(capacity: usize) -> Mailbox {
        Mailbox {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, payload: &[u8]) -> bool {
        let mut q = self.lock();
        if q.len() >= self.capacity {
            return false;
        }
        q.push_back(payload.to_vec());
        drop(q);
        self.wake.notify_all();
        true
    }
}

/// One thread's stop flag, with the mailbox whose waiters it must wake.
#[derive(Debug)]
struct Control {
    reason: AtomicU8,
    mailbox: Arc<Mailbox>,
}

impl Control {
    fn reason(&self) -> Reason {
        match self.reason.load(Ordering::Acquire) {
            0 => Reason::Run,
            1 => Reason::Reload,
            _ => Reason::Stop,
        }
    }

    fn stop(&self, why: Reason) {
        self.reason.store(why as u8, Ordering::Release);
        // Under the lock, so a waiter between its check and its wait cannot miss it.
        let _q = self.mailbox.lock();
        self.mailbox.wake.notify_all();
    }

    /// Waits up to `d` unless told to stop; false if told to stop.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut q = self.mailbox.lock();
        loop {
            if self.reason() != Reason::Run {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            q = self
                .mailbox
                .wake
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The context a process's `run` reads from.
#[derive(Debug)]
struct Ctx(Arc<Control>);

impl ProcessCtxFfi for Ctx {
    fn should_stop(&self) -> bool {
        self.0.reason() != Reason::Run
    }

    fn recv(&self, timeout_ms: u64) -> ROption<RVec<u8>> {
        let c = &self.0;
        let deadline = Instant::now().checked_add(Duration::from_millis(timeout_ms));
        let mut q = c.mailbox.lock();
        loop {
            if c.reason() != Reason::Run {
                return ROption::RNone;
            }
            if let Some(m) = q.pop_front() {
                return ROption::RSome(m.into());
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d <= now => return ROption::RNone,
                Some(d) => d - now,
                None => Duration::from_secs(3600),
            };
            q = c
                .mailbox
                .wake
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The mailboxes of every running process, by name: what `send_to_process` reaches.
#[derive(Debug, Default)]
pub struct Directory {
    by_name: RwLock<BTreeMap<String, Vec<Arc<Mailbox>>>>,
}

impl Directory {
    /// Puts `payload` in every instance's mailbox; how many took it, `QueueFull` if none did.
    pub fn send(&self, name: &str, payload: &[u8]) -> Result<u64, HostError> {
        let map = self.by_name.read().unwrap_or_else(PoisonError::into_inner);
        let Some(boxes) = map.get(name) else {
            return Err(HostError::UnknownProcess);
        };
        let took = boxes.iter().filter(|b| b.push(payload)).count() as u64;
        if took == 0 {
            Err(HostError::QueueFull)
        } else {
            Ok(took)
        }
    }

    fn mailboxes(&self, name: &str, num: usize, capacity: usize) -> Vec<Arc<Mailbox>> {
        let mut map = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        let boxes = map.entry(name.to_owned()).or_default();
        while boxes.len() < num {
            boxes.push(Arc::new(Mailbox::new(capacity)));
        }
        boxes.truncate(num);
        boxes.clone()
    }

    fn remove(&self, name: &str) {
        let mut map = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        map.remove(name);
    }
}

/// One running instance.
#[derive(Debug)]
struct Running {
    control: Arc<Control>,
    handle: thread::JoinHandle<()>,
    label: String,
}

/// The threads of one process name.
#[derive(Debug)]
struct Group {
    slot: ProcessSlot,
    hooks: Vec<Slot>,
    threads: Vec<Running>,
}

/// The custom process threads.
#[derive(Debug)]
pub struct Processes {
    directory: Arc<Directory>,
    capacity: usize,
    /// By name: the slot they run, the hooks they were started with, and their threads.
    running: BTreeMap<String, Group>,
    /// Threads asked to stop, not joined yet.
    stopping: Vec<Running>,
    /// Thread ids by name (first id, count): a restarted process keeps its ids.
    ids: BTreeMap<String, (u32, usize)>,
    next_id: u32,
}

impl Processes {
    /// No processes yet; mailboxes hold at most `capacity` messages each.
    pub fn new(directory: Arc<Directory>, capacity: usize) -> Processes {
        Processes {
            directory,
            capacity,
            running: BTreeMap::new(),
            stopping: Vec::new(),
            ids: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// Threads running or stopping.
    pub fn threads(&self) -> usize {
        self.running
            .values()
            .map(|g| g.threads.len())
            .sum::<usize>()
            + self.stopping.len()
    }

    /// Starts every process of `plan`; returns how many threads will report on `ready`.
    pub(crate) fn start_all(
        &mut self,
        plan: &Arc<Plan>,
        env: &Env,
        ready: Option<&Ready>,
    ) -> io::Result<usize> {
        let mut n = 0;
        for p in &plan.services.processes {
            self.start(p, plan, env, ready)?;
            n += p.num;
        }
        Ok(n)
    }

    fn start(
        &mut self,
        p: &ProcessSlot,
        plan: &Arc<Plan>,
        env: &Env,
        ready: Option<&Ready>,
    ) -> io::Result<()> {
        let boxes = self.directory.mailboxes(&p.name, p.num, self.capacity);
        let first = match self.ids.get(&p.name) {
            Some(&(first, n)) if n >= p.num => first,
            _ => {
                let first = self.next_id;
                self.next_id += p.num as u32;
                self.ids.insert(p.name.clone(), (first, p.num));
                first
            }
        };
        let mut threads = Vec::new();
        for (i, mailbox) in boxes.into_iter().enumerate() {
            let id = first + i as u32;
            let control = Arc::new(Control {
                reason: AtomicU8::new(Reason::Run as u8),
                mailbox,
            });
            let label = format!("process {}#{i}", p.name);
            let args = Args {
                info: WorkerInfo {
                    kind: ThreadKind::Process,
                    id,
                },
                label: label.clone(),
                slot: p.clone(),
                plan: plan.clone(),
                env: env.clone(),
                control: control.clone(),
                ready: ready.cloned(),
            };
            let handle = thread::Builder::new()
                .name(format!("proc-{}-{i}", p.name))
                .spawn(move || {
                    calls::thread(&args.label);
                    run(args)
                })?;
            threads.push(Running {
                control,
                handle,
                label,
            });
        }
        let group = Group {
            slot: p.clone(),
            hooks: plan.hooks.clone(),
            threads,
        };
        self.running.insert(p.name.clone(), group);
        Ok(())
    }

    /// Moves to the processes of `plan`: a process whose component, config, library, count,
    /// restart interval or lifecycle hooks changed is stopped (`on_reload`) and started anew;
    /// removed ones are stopped (`on_stop`); new ones are started.
    pub(crate) fn reload(&mut self, plan: &Arc<Plan>, env: &Env) {
        // A process thread's hooks are those of the plan it was started with.
        let hooks_same = |old: &[Slot]| {
            old.len() == plan.hooks.len() && old.iter().zip(&plan.hooks).all(|(a, b)| a.same_as(b))
        };
        let wanted: BTreeMap<&str, &ProcessSlot> = plan
            .services
            .processes
            .iter()
            .map(|p| (p.name.as_str(), p))
            .collect();
        let names: Vec<String> = self.running.keys().cloned().collect();
        let mut restart = Vec::new();
        for name in names {
            let old = &self.running[&name];
            match wanted.get(name.as_str()) {
                Some(new)
                    if old.slot.slot.same_as(&new.slot)
                        && old.slot.num == new.num
                        && old.slot.restart_interval == new.restart_interval
                        && hooks_same(&old.hooks) => {}
                Some(_) => {
                    let group = self.running.remove(&name).expect("listed");
                    self.ask_to_stop(group.threads, Reason::Reload);
                    restart.push(name);
                }
                None => {
                    let group = self.running.remove(&name).expect("listed");
                    self.ask_to_stop(group.threads, Reason::Stop);
                    self.directory.remove(&name);
                    log::info!("process {name} removed from the config: stopping it");
                }
            }
        }
        let left = join_until(
            std::mem::take(&mut self.stopping)
                .into_iter()
                .map(|r| (r.label, r.handle))
                .collect(),
            Instant::now() + plan.services.max_wait,
        );
        for label in left {
            log::error!("{label} did not return from run() within max_wait_time; left behind");
        }
        for p in &plan.services.processes {
            if !self.running.contains_key(&p.name) {
                if let Err(e) = self.start(p, plan, env, None) {
                    log::error!("cannot start a thread for process {}: {e}", p.name);
                } else if restart.contains(&p.name) {
                    log::info!("process {} restarted with the new version", p.name);
                }
            }
        }
    }

    fn ask_to_stop(&mut self, threads: Vec<Running>, why: Reason) {
        for r in threads {
            r.control.stop(why);
            self.stopping.push(r);
        }
    }

    /// Asks every process to stop; returns at once.
    pub fn begin_stop(&mut self) {
        let all: Vec<Running> = std::mem::take(&mut self.running)
            .into_values()
            .flat_map(|g| g.threads)
            .collect();
        self.ask_to_stop(all, Reason::Stop);
    }

    /// Joins the stopped threads that end by `deadline`; returns the others' names.
    pub fn finish_stop(&mut self, deadline: Instant) -> Vec<String> {
        join_until(
            std::mem::take(&mut self.stopping)
                .into_iter()
                .map(|r| (r.label, r.handle))
                .collect(),
            deadline,
        )
    }
}

/// What a process thread starts with.
struct Args {
    info: WorkerInfo,
    label: String,
    slot: ProcessSlot,
    plan: Arc<Plan>,
    env: Env,
    control: Arc<Control>,
    ready: Option<Ready>,
}

fn run(args: Args) {
    let Args {
        info,
        label,
        slot,
        plan,
        env,
        control,
        mut ready,
    } = args;
    let stats = env.stats.services.processes.get(&slot.name);
    let report = |ready: &mut Option<Ready>, r: Result<(), String>| {
        if let Some(tx) = ready.take() {
            let _ = tx.send((label.clone(), r));
        }
    };
    let mut hooks = match Hooks::start(&plan.hooks, &env.host, info) {
        Ok(h) => Some(h),
        Err(e) => {
            report(&mut ready, Err(e.to_string()));
            return;
        }
    };
    let mut instance: Option<ProcessBox> = None;
    loop {
        if control.reason() != Reason::Run {
            break;
        }
        if instance.is_none() {
            match slot.slot.instantiate(&env.host, info) {
                Ok(c) => instance = ProcessBox::unwrap(c),
                Err(e) => {
                    log::error!(
                        "{label}: {e}; trying again in {} ms",
                        slot.restart_interval.as_millis()
                    );
                    if ready.is_some() {
                        report(&mut ready, Err(e.to_string()));
                        break;
                    }
                    control.sleep(slot.restart_interval);
                    continue;
                }
            }
        }
        report(&mut ready, Ok(()));
        let Some(p) = instance.as_mut() else { break };
        let ctx = ProcessCtxFfi_TO::from_ptr(RArc::new(Ctx(control.clone())), TD_Opaque);
        let inside = calls::enter(slot.slot.call);
        let ran = p.run(ctx);
        drop(inside);
        match ran {
            RResult::ROk(()) => {
                if control.reason() != Reason::Run {
                    break;
                }
                log::warn!(
                    "{label}: run() returned before stop; starting it again in {} ms",
                    slot.restart_interval.as_millis()
                );
            }
            RResult::RErr(e) => {
                stats.panics.fetch_add(1, Ordering::Relaxed);
                report_failure(hooks.as_mut(), info, ComponentKind::Process, &slot.slot, &e);
                instance = None;
                if control.reason() != Reason::Run {
                    break;
                }
                log::warn!(
                    "{label}: starting it again with a new instance in {} ms",
                    slot.restart_interval.as_millis()
                );
            }
        }
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        control.sleep(slot.restart_interval);
    }
    if let Some(p) = instance.take() {
        let _inside = calls::enter(slot.slot.call);
        goodbye(p, control.reason(), &label);
    }
    if let Some(h) = hooks.take() {
        h.stop();
    }
    log::debug!("{label} stopped");
}

/// `on_reload` or `on_stop` after `run` returned for good.
fn goodbye(mut p: ProcessBox, why: Reason, label: &str) {
    let (what, r) = match why {
        Reason::Reload => ("on_reload", p.on_reload()),
        _ => ("on_stop", p.on_stop()),
    };
    if let RResult::RErr(e) = r {
        log::error!("{label}: {what} failed: {e}");
    }
}
