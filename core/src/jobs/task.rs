//! Task workers: `task_worker_num` threads that take tasks and events from one bounded queue.
//! Each thread has its own instance of every task handler and event listener, so plugin code
//! needs no locks.
//!
//! The queue is a heap ordered by due time: a delayed task, or a retry waiting out its backoff,
//! waits there, not in a sleeping worker. Its bound (`task_queue_size`) counts every accepted
//! task and event until it is done, retries included, so it never grows past that; `deliver`
//! answers `QueueFull` instead. A failed try (an `Err` or a panic) is retried after
//! 100 ms * 2^(attempt-1), at most 10 s, until `tries` runs out; then it is logged and counted.

use std::{
    cmp::{Ordering as CmpOrdering, Reverse},
    collections::BinaryHeap,
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plughost_plugin_api::{
    abi::{ComponentKind, EventListenerBox, HostError, TaskHandlerBox, ThreadKind, WorkerInfo},
    Propagation,
};

use crate::{
    error::PluginError,
    jobs::{Env, Ready},
    plan::Plan,
    plugin::bank::{report_failure, Bank, Hooks},
    runtime::{calls, stats::Stats},
};

/// The first retry waits this long; each later one twice as long as the one before.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The longest wait before a retry.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The wait before try `attempt + 1`, after try `attempt` (from 1) failed.
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

/// The queue shared by the task workers and the host API.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    next_id: AtomicU64,
    stats: Arc<Stats>,
}

#[derive(Debug)]
struct State {
    heap: BinaryHeap<Reverse<Entry>>,
    /// Accepted and not yet done: queued, delayed, waiting to retry, or running.
    pending: usize,
    closed: bool,
    plan: Arc<Plan>,
    generation: u64,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    due: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// A task or an event on its way through the queue.
#[derive(Debug)]
pub(crate) struct Job {
    id: u64,
    work: Work,
    payload: Vec<u8>,
    /// The try this is (from 1).
    attempt: u32,
    tries: u32,
}

#[derive(Debug)]
enum Work {
    /// A task for handler `name`, delivered from `origin`.
    Task { name: String, origin: WorkerInfo },
    /// An event, from listener `from` on (a retry starts at the listener that failed).
    Event { name: String, from: usize },
}

/// What a task worker does next.
pub(crate) enum Next {
    Job(Job),
    Reload(Arc<Plan>, u64),
    Stop,
}

impl Queue {
    /// An empty queue for `plan`, bounded by its `task_queue_size`.
    pub fn new(plan: Arc<Plan>, stats: Arc<Stats>) -> Queue {
        Queue {
            capacity: plan.services.queue_size.max(1),
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                pending: 0,
                closed: false,
                plan,
                generation: 0,
                seq: 0,
            }),
            wake: Condvar::new(),
            next_id: AtomicU64::new(1),
            stats,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plugin code never runs under this lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts a task for handler `task` (`plugin.component`), or says why not.
    pub fn deliver(
        &self,
        task: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
        origin: WorkerInfo,
    ) -> Result<u64, HostError> {
        let work = Work::Task {
            name: task.to_owned(),
            origin,
        };
        let r = self.accept(work, payload, delay_ms, tries, |st| {
            st.plan.services.task_index(task).is_some()
        });
        let s = &self.stats.services;
        match r {
            Ok(_) => s.tasks_accepted.fetch_add(1, Ordering::Relaxed),
            Err(HostError::UnknownTask) => {
                log::warn!("deliver: no task handler {task:?}");
                s.tasks_refused.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => s.tasks_refused.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// Accepts an event for its listeners, or says why not.
    pub fn fire(
        &self,
        event: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
    ) -> Result<u64, HostError> {
        let work = Work::Event {
            name: event.to_owned(),
            from: 0,
        };
        let r = self.accept(work, payload, delay_ms, tries, |st| {
            st.plan.services.events.contains_key(event)
        });
        match r {
            Ok(_) => self
                .stats
                .services
                .events_fired
                .fetch_add(1, Ordering::Relaxed),
            Err(_) => self
                .stats
                .services
                .tasks_refused
                .fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    fn accept(
        &self,
        work: Work,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
        known: impl Fn(&State) -> bool,
    ) -> Result<u64, HostError> {
        let unknown = match work {
            Work::Task { .. } => HostError::UnknownTask,
            Work::Event { .. } => HostError::UnknownEvent,
        };
        let payload = payload.to_vec();
        let mut st = self.lock();
        if st.closed {
            return Err(HostError::NotEnabled);
        }
        if !known(&st) {
            return Err(unknown);
        }
        if st.pending >= self.capacity {
            return Err(HostError::QueueFull);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        st.pending += 1;
        let job = Job {
            id,
            work,
            payload,
            attempt: 1,
            tries: tries.max(1),
        };
        push(
            &mut st,
            job,
            Instant::now() + Duration::from_millis(delay_ms),
        );
        self.gauge(&st);
        drop(st);
        self.wake.notify_one();
        Ok(id)
    }

    /// Puts a job back to try again after `delay`; it keeps its place in the bound.
    fn retry(&self, job: Job, delay: Duration) {
        let mut st = self.lock();
        if st.closed {
            st.pending -= 1;
            self.stats
                .services
                .tasks_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        push(&mut st, job, Instant::now() + delay);
        self.gauge(&st);
        drop(st);
        self.wake.notify_one();
    }

    /// A job is done (succeeded, or failed every try).
    fn done(&self) {
        self.lock().pending -= 1;
    }

    /// The next job due, a new plan to move to, or stop. Waits for the first of them.
    pub(crate) fn next(&self, generation: u64) -> Next {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Next::Stop;
            }
            if st.generation != generation {
                return Next::Reload(st.plan.clone(), st.generation);
            }
            let now = Instant::now();
            match st.heap.peek().map(|Reverse(e)| e.due) {
                Some(due) if due <= now => {
                    let Reverse(entry) = st.heap.pop().expect("peeked");
                    self.gauge(&st);
                    if st.heap.peek().is_some_and(|Reverse(e)| e.due <= now) {
                        self.wake.notify_one();
                    }
                    return Next::Job(entry.job);
                }
                Some(due) => {
                    st = self
                        .wake
                        .wait_timeout(st, due - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }

    /// The plan in force and its generation.
    fn plan(&self) -> (Arc<Plan>, u64) {
        let st = self.lock();
        (st.plan.clone(), st.generation)
    }

    /// Has every task worker move to `plan` before its next job.
    pub fn set_plan(&self, plan: Arc<Plan>) {
        let mut st = self.lock();
        st.plan = plan;
        st.generation += 1;
        drop(st);
        self.wake.notify_all();
    }

    /// Refuses new work, drops what is queued (returns how many) and wakes every worker to
    /// stop after its current job.
    pub fn close(&self) -> usize {
        let mut st = self.lock();
        st.closed = true;
        let dropped = st.heap.len();
        st.heap.clear();
        self.gauge(&st);
        st.pending -= dropped;
        drop(st);
        self.stats
            .services
            .tasks_dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
        self.wake.notify_all();
        dropped
    }

    /// Publishes the queue's length (under its lock) for the stats.
    fn gauge(&self, st: &State) {
        let queued = &self.stats.services.queued;
        queued.store(st.heap.len() as u64, Ordering::Relaxed);
    }

    /// Accepted tasks and events not done yet.
    pub fn pending(&self) -> usize {
        self.lock().pending
    }
}

fn push(st: &mut State, job: Job, due: Instant) {
    st.seq += 1;
    let seq = st.seq;
    st.heap.push(Reverse(Entry { due, seq, job }));
}

/// Starts task worker `id`; it reports on `ready` once its instances exist.
pub(crate) fn spawn(
    id: u32,
    queue: Arc<Queue>,
    env: Env,
    ready: Ready,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("task-{id}"))
        .spawn(move || {
            calls::thread(&format!("task-{id}"));
            let info = WorkerInfo {
                kind: ThreadKind::TaskWorker,
                id,
            };
            let (plan, generation) = queue.plan();
            let mut w = match TaskWorker::create(info, plan, generation, queue, env) {
                Ok(w) => w,
                Err(e) => {
                    let _ = ready.send((format!("task worker {id}"), Err(e.to_string())));
                    return;
                }
            };
            let _ = ready.send((format!("task worker {id}"), Ok(())));
            drop(ready);
            loop {
                match w.queue.next(w.generation) {
                    Next::Stop => break,
                    Next::Reload(plan, generation) => w.reload(plan, generation),
                    Next::Job(job) => w.run(job),
                }
            }
            if let Some(h) = w.hooks.take() {
                h.stop();
            }
            log::debug!("task worker {id} stopped");
        })
}

/// One task worker's state, owned by its thread.
struct TaskWorker {
    info: WorkerInfo,
    plan: Arc<Plan>,
    generation: u64,
    queue: Arc<Queue>,
    env: Env,
    tasks: Bank<TaskHandlerBox>,
    listeners: Bank<EventListenerBox>,
    hooks: Option<Hooks>,
}

impl TaskWorker {
    fn create(
        info: WorkerInfo,
        plan: Arc<Plan>,
        generation: u64,
        queue: Arc<Queue>,
        env: Env,
    ) -> Result<TaskWorker, PluginError> {
        let tasks = Bank::create(&plan.services.tasks, &env.host, info)?;
        let listeners = Bank::create(&plan.services.listeners, &env.host, info)?;
        let hooks = Some(Hooks::start(&plan.hooks, &env.host, info)?);
        Ok(TaskWorker {
            info,
            plan,
            generation,
            queue,
            env,
            tasks,
            listeners,
            hooks,
        })
    }

    /// Moves to `plan` between two jobs; keeps the old instances if a new one fails.
    fn reload(&mut self, plan: Arc<Plan>, generation: u64) {
        self.generation = generation;
        let sp = &plan.services;
        let prepared = self
            .tasks
            .prepare(&sp.tasks, &self.env.host, self.info)
            .and_then(|t| {
                Ok((
                    t,
                    self.listeners
                        .prepare(&sp.listeners, &self.env.host, self.info)?,
                ))
            });
        match prepared {
            Ok((t, l)) => {
                self.tasks.apply(t);
                self.listeners.apply(l);
                if let Some(h) = self.hooks.as_mut() {
                    h.rebuild(&plan.hooks, &self.env.host);
                }
                self.plan = plan;
                log::debug!("task worker {}: moved to the new plan", self.info.id);
            }
            Err(e) => log::error!("task worker {} kept its old instances: {e}", self.info.id),
        }
    }

    fn run(&mut self, job: Job) {
        let running = &self.env.stats.services.running;
        running.fetch_add(1, Ordering::Relaxed);
        match job.work {
            Work::Task { .. } => self.run_task(job),
            Work::Event { .. } => self.run_event(job),
        }
        self.env
            .stats
            .services
            .running
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn run_task(&mut self, job: Job) {
        let Work::Task { name, origin } = &job.work else {
            unreachable!("run dispatches tasks here")
        };
        let stats = &self.env.stats.services;
        let Some(i) = self.plan.services.task_index(name) else {
            log::error!(
                "task {name} #{}: no such task handler any more (reload); dropped",
                job.id
            );
            stats.tasks_failed.fetch_add(1, Ordering::Relaxed);
            return self.queue.done();
        };
        let result = match self.tasks.get(i, &self.env.host, self.info) {
            Some(h) => {
                let _inside = calls::enter(self.plan.services.tasks[i].call);
                h.handle(job.payload.as_slice().into(), job.attempt)
            }
            None => RResult::ROk(RResult::RErr(
                "the task handler could not be created".into(),
            )),
        };
        let why = match result {
            RResult::ROk(RResult::ROk(bytes)) => {
                stats.tasks_ok.fetch_add(1, Ordering::Relaxed);
                if origin.kind == ThreadKind::Worker {
                    self.send_finish(name, *origin, bytes.into_vec());
                }
                return self.queue.done();
            }
            RResult::ROk(RResult::RErr(why)) => why.into_string(),
            RResult::RErr(e) => {
                let slot = self.tasks.slots[i].clone();
                report_failure(
                    self.hooks.as_mut(),
                    self.info,
                    ComponentKind::TaskHandler,
                    &slot,
                    &e,
                );
                self.tasks.remake(i, &self.env.host, self.info);
                e.to_string()
            }
        };
        let what = format!("task {name} #{}", job.id);
        if job.attempt < job.tries {
            self.retry(job, &what, &why);
        } else {
            log::error!(
                "{what} failed after {} tr{}: {why}",
                job.tries,
                if job.tries == 1 { "y" } else { "ies" }
            );
            stats.tasks_failed.fetch_add(1, Ordering::Relaxed);
            self.queue.done();
        }
    }

    fn retry(&self, mut job: Job, what: &str, why: &str) {
        let delay = backoff(job.attempt);
        log::warn!(
            "{what}: try {}/{} failed: {why}; retrying in {} ms",
            job.attempt,
            job.tries,
            delay.as_millis()
        );
        job.attempt += 1;
        self.env
            .stats
            .services
            .tasks_retried
            .fetch_add(1, Ordering::Relaxed);
        self.queue.retry(job, delay);
    }

    /// Sends a result to the HTTP worker that delivered the task, for `finish` there.
    fn send_finish(&self, task: &str, origin: WorkerInfo, result: Vec<u8>) {
        if !(self.env.finish)(origin.id, task.to_owned(), result) {
            log::debug!("task {task}: worker {} is gone; finish dropped", origin.id);
        }
    }

    fn run_event(&mut self, mut job: Job) {
        let Work::Event { name, from } = &job.work else {
            unreachable!("run dispatches events here")
        };
        let (name, from) = (name.clone(), *from);
        let stats = &self.env.stats.services;
        let Some(order) = self.plan.services.events.get(&name).cloned() else {
            log::error!(
                "event {name} #{}: no listeners any more (reload); dropped",
                job.id
            );
            stats.events_failed.fetch_add(1, Ordering::Relaxed);
            return self.queue.done();
        };
        let mut failed = false;
        for (at, &li) in order.iter().enumerate().skip(from) {
            let result = match self.listeners.get(li, &self.env.host, self.info) {
                Some(l) => {
                    let _inside = calls::enter(self.plan.services.listeners[li].call);
                    l.on_event(name.as_str().into(), job.payload.as_slice().into())
                }
                None => RResult::ROk(RResult::RErr("the listener could not be created".into())),
            };
            let why = match result {
                RResult::ROk(RResult::ROk(Propagation::Continue)) => {
                    job.attempt = 1;
                    continue;
                }
                RResult::ROk(RResult::ROk(Propagation::Stop)) => {
                    log::debug!(
                        "event {name} #{}: {} stopped propagation",
                        job.id,
                        self.listeners.slots[li].reference
                    );
                    break;
                }
                RResult::ROk(RResult::RErr(why)) => why.into_string(),
                RResult::RErr(e) => {
                    let slot = self.listeners.slots[li].clone();
                    report_failure(
                        self.hooks.as_mut(),
                        self.info,
                        ComponentKind::EventListener,
                        &slot,
                        &e,
                    );
                    self.listeners.remake(li, &self.env.host, self.info);
                    e.to_string()
                }
            };
            let what = format!(
                "event {name} #{} listener {}",
                job.id, self.listeners.slots[li].reference
            );
            if job.attempt < job.tries {
                job.work = Work::Event { name, from: at };
                return self.retry(job, &what, &why);
            }
            log::error!(
                "{what} failed after {} tr{}: {why}; going on with the next listener",
                job.tries,
                if job.tries == 1 { "y" } else { "ies" }
            );
            failed = true;
            job.attempt = 1;
        }
        if failed {
            stats.events_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.events_ok.fetch_add(1, Ordering::Relaxed);
        }
        self.queue.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
