//! Jobs: the services beside the HTTP workers. Task workers ([`task`]: tasks and events), the
//! cron timer ([`timer`]) and custom processes ([`process`]) share one shape: started from a
//! [`Plan`] after the HTTP workers are ready, moved to a new plan on reload, and stopped with a
//! deadline, after which whatever has not returned is logged and left behind (the process
//! exits anyway, so nothing outlives `plughost stop`).

pub mod process;
pub mod task;
pub mod timer;

use std::{
    sync::{atomic::Ordering::Relaxed, mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RSlice;
use plughost_plugin_api::abi::{HostBox, HostError, WorkerInfo};

use crate::{
    error::StartError,
    plan::Plan,
    plugin::host::{Host, JobsApi},
    runtime::stats::{ServiceStats, Stats},
};
use process::Processes;
use task::Queue;
use timer::Timer;

/// What the host API reaches: the task queue and the custom processes' mailboxes.
#[derive(Debug)]
pub struct Handle {
    queue: Option<Arc<Queue>>,
    processes: Arc<process::Directory>,
}

impl JobsApi for Handle {
    fn deliver(
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

    fn fire(
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

    fn send_to_process(&self, name: &str, payload: RSlice<'_, u8>) -> Result<u64, HostError> {
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

/// Hands the result of a task to the HTTP worker that delivered it (by id), for its
/// handler's `finish` there; false when that worker is gone.
pub type Finish = Arc<dyn Fn(u32, String, Vec<u8>) -> bool + Send + Sync>;

/// What every service thread is started with.
#[derive(Clone)]
pub(crate) struct Env {
    pub host: HostBox,
    pub stats: Arc<Stats>,
    pub finish: Finish,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").finish_non_exhaustive()
    }
}

/// Starts the task workers, the timer and the custom processes of `plan`, and connects the
/// host API to them. Fails, having stopped what it started, when an instance cannot be
/// created.
pub fn start(
    plan: &Arc<Plan>,
    host: &Host,
    stats: &Arc<Stats>,
    finish: Finish,
) -> Result<Services, StartError> {
    let sp = &plan.services;
    let env = Env {
        host: host.boxed(),
        stats: stats.clone(),
        finish,
    };
    let queue = (sp.task_workers > 0).then(|| Arc::new(Queue::new(plan.clone(), stats.clone())));
    let directory = Arc::new(process::Directory::default());
    host.set_jobs(Arc::new(Handle {
        queue: queue.clone(),
        processes: directory.clone(),
    }));
    let mut services = Services {
        queue,
        task_workers: Vec::new(),
        timer: None,
        processes: Processes::new(directory, sp.queue_size),
        env,
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let started = services.spawn_all(plan, &ready_tx);
    drop(ready_tx);
    if let Err(e) = started.and_then(|expected| wait_ready(&ready_rx, expected)) {
        services.begin_stop();
        services.finish_stop(Instant::now(), Duration::from_secs(1));
        return Err(e);
    }
    log_started(sp, services.processes.threads());
    Ok(services)
}

/// Waits for `expected` service threads to say they are ready; the first failure wins.
fn wait_ready(
    ready: &mpsc::Receiver<(String, Result<(), String>)>,
    expected: usize,
) -> Result<(), StartError> {
    let mut failure = None;
    for _ in 0..expected {
        match ready.recv() {
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
    failure.map_or(Ok(()), Err)
}

fn log_started(sp: &crate::plan::ServicePlan, process_threads: usize) {
    if !sp.tasks.is_empty() || !sp.events.is_empty() || sp.timer || !sp.processes.is_empty() {
        log::info!(
            "services: {} task worker(s) (queue {}; {} task handler(s), {} event(s)), timer {}, {} custom process thread(s)",
            sp.task_workers,
            sp.queue_size,
            sp.tasks.len(),
            sp.events.len(),
            if sp.timer { format!("on ({} job(s))", sp.cron.len()) } else { "off".into() },
            process_threads
        );
    }
    if sp.task_workers == 0 && !sp.events.is_empty() {
        log::warn!("events are configured but task_worker_num is 0: fire() answers NotEnabled");
    }
}

/// Who reports readiness: a thread's description, and whether its instances exist.
pub(crate) type Ready = mpsc::Sender<(String, Result<(), String>)>;

impl Services {
    /// Starts every service thread of `plan`; returns how many will report on `ready`.
    fn spawn_all(&mut self, plan: &Arc<Plan>, ready: &Ready) -> Result<usize, StartError> {
        let sp = &plan.services;
        let mut expected = 0;
        let workers = &self.env.stats.services.task_workers;
        workers.store(
            sp.task_workers as u64 * self.queue.is_some() as u64,
            Relaxed,
        );
        if let Some(q) = &self.queue {
            for id in 0..sp.task_workers {
                let h = task::spawn(id as u32, q.clone(), self.env.clone(), ready.clone())
                    .map_err(StartError::io("cannot start a task worker thread"))?;
                self.task_workers.push(h);
                expected += 1;
            }
        }
        if sp.timer {
            self.timer = Some(
                Timer::spawn(plan.clone(), self.env.clone(), Some(ready.clone()))
                    .map_err(StartError::io("cannot start the timer thread"))?,
            );
            expected += 1;
        }
        expected += self
            .processes
            .start_all(plan, &self.env, Some(ready))
            .map_err(StartError::io("cannot start a custom process thread"))?;
        Ok(expected)
    }

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

/// The services' lines of `plughost info`.
pub fn info(s: &mut String, st: &ServiceStats) {
    use std::fmt::Write as _;
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
        st.cron.sum(|c| &c.runs),
        st.cron.sum(|c| &c.panics),
        st.cron.sum(|c| &c.skipped)
    );
    let _ = writeln!(
        s,
        "processes: {} restarts, {} panicked",
        st.processes.sum(|p| &p.restarts),
        st.processes.sum(|p| &p.panics)
    );
}
