//! The cron timer: one thread that runs every cron job of `timer.jobs` at a fixed rate in
//! milliseconds. A job's ticks are `start + k * interval`, so delays do not add up; a run that
//! overruns skips the ticks it missed instead of piling up runs; a job that panics is logged,
//! counted and made anew, and its next tick still runs. A job can end its own schedule by
//! returning `Schedule::Stop`. Reload and stop are messages handled between two runs.

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, TryRecvError},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use abi_stable::std_types::RResult;
use plughost_plugin_api::{
    abi::{ComponentKind, CronJobBox, ThreadKind, WorkerInfo},
    Schedule,
};

use crate::{
    jobs::{Env, Ready},
    plan::{CronSlot, Plan},
    plugin::{
        bank::{report_failure, Hooks, Unwrap},
        Slot,
    },
    runtime::{calls, stats::CronCounters},
};

const INFO: WorkerInfo = WorkerInfo {
    kind: ThreadKind::Timer,
    id: 0,
};

/// Messages to the timer thread.
#[derive(Debug)]
pub(crate) enum TimerMsg {
    /// Move to a new plan between two runs, then acknowledge.
    Reload(Arc<Plan>, mpsc::Sender<()>),
    /// Stop after the running job.
    Stop,
}

/// The handle of the timer thread.
#[derive(Debug)]
pub struct Timer {
    tx: mpsc::Sender<TimerMsg>,
    handle: thread::JoinHandle<()>,
    max_wait_ms: AtomicU64,
}

impl Timer {
    /// Starts the timer thread for the cron jobs of `plan`. With `ready`, it reports there
    /// once its instances exist (or why they could not be created).
    pub(crate) fn spawn(plan: Arc<Plan>, env: Env, ready: Option<Ready>) -> io::Result<Timer> {
        let (tx, rx) = mpsc::channel();
        let max_wait_ms = AtomicU64::new(plan.services.timer_max_wait.as_millis() as u64);
        let handle = thread::Builder::new().name("timer".into()).spawn(move || {
            calls::thread("timer");
            run(plan, env, rx, ready)
        })?;
        Ok(Timer {
            tx,
            handle,
            max_wait_ms,
        })
    }

    /// How long a reload or stop waits for a running job (`timer.max_wait_time`).
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed))
    }

    /// Moves the timer to `plan` after the running job; waits for that up to max_wait_time.
    pub fn reload(&self, plan: Arc<Plan>) {
        let wait = self.max_wait();
        self.max_wait_ms.store(
            plan.services.timer_max_wait.as_millis() as u64,
            Ordering::Relaxed,
        );
        let (ack_tx, ack) = mpsc::channel();
        if self.tx.send(TimerMsg::Reload(plan, ack_tx)).is_err() {
            log::error!("timer: the thread is gone; cron jobs do not run");
            return;
        }
        if ack.recv_timeout(wait).is_err() {
            log::warn!(
                "timer: a cron job is still running after {} ms; the timer moves to the new plan when it returns",
                wait.as_millis()
            );
        }
    }

    /// Asks the thread to stop after the running job; returns at once.
    pub fn stop(&self) {
        let _ = self.tx.send(TimerMsg::Stop);
    }

    /// Joins the thread if it ends by `deadline`; false if it was left running.
    pub fn join_until(self, deadline: Instant) -> bool {
        crate::jobs::join_until(vec![("timer".into(), self.handle)], deadline).is_empty()
    }
}

/// One job's schedule and instance.
struct Cron {
    slot: Slot,
    interval: Duration,
    immediate: bool,
    /// When the next tick is due.
    next: Instant,
    job: Option<CronJobBox>,
    /// The job ended its own schedule.
    stopped: bool,
    /// Its counters, kept across reloads by its name.
    counters: Arc<CronCounters>,
}

impl Cron {
    fn new(c: &CronSlot, job: CronJobBox, start: Instant, env: &Env) -> Cron {
        Cron {
            counters: env.stats.services.cron.get(&c.slot.reference.to_string()),
            slot: c.slot.clone(),
            interval: c.interval,
            immediate: c.immediate,
            next: if c.immediate {
                start
            } else {
                start + c.interval
            },
            job: Some(job),
            stopped: false,
        }
    }

    fn same_as(&self, c: &CronSlot) -> bool {
        self.slot.same_as(&c.slot) && self.interval == c.interval && self.immediate == c.immediate
    }
}

/// Where tick `next` (just run) is followed: the next tick still ahead of `now`, and how many
/// ticks were skipped because the run (or another job's) overran.
pub fn next_tick(next: Instant, interval: Duration, now: Instant) -> (Instant, u64) {
    let following = next + interval;
    if following >= now {
        return (following, 0);
    }
    let behind = (now - following).as_nanos() / interval.as_nanos().max(1);
    let missed = behind as u64 + 1;
    let step = interval.saturating_mul(missed.min(u32::MAX as u64) as u32);
    (following + step, missed)
}

fn create(crons: &[CronSlot], env: &Env, start: Instant) -> Result<Vec<Cron>, String> {
    crons
        .iter()
        .map(|c| {
            let job = c
                .slot
                .instantiate(&env.host, INFO)
                .map_err(|e| e.to_string())?;
            let job = CronJobBox::unwrap(job).ok_or("not a cron job")?;
            Ok(Cron::new(c, job, start, env))
        })
        .collect()
}

fn run(mut plan: Arc<Plan>, env: Env, rx: mpsc::Receiver<TimerMsg>, ready: Option<Ready>) {
    let report = |r: Result<(), String>| {
        if let Some(tx) = &ready {
            let _ = tx.send(("timer".into(), r));
        }
    };
    let mut jobs = match create(&plan.services.cron, &env, Instant::now()) {
        Ok(j) => j,
        Err(e) => {
            log::error!("timer: {e}");
            return report(Err(e));
        }
    };
    let mut hooks = match Hooks::start(&plan.hooks, &env.host, INFO) {
        Ok(h) => Some(h),
        Err(e) => return report(Err(e.to_string())),
    };
    report(Ok(()));
    drop(ready);
    log::debug!("timer started with {} job(s)", jobs.len());
    loop {
        let msg = match rx.try_recv() {
            Ok(m) => Some(m),
            Err(TryRecvError::Empty) => {
                let now = Instant::now();
                let due = jobs
                    .iter()
                    .enumerate()
                    .filter(|(_, j)| !j.stopped)
                    .min_by_key(|(_, j)| j.next)
                    .map(|(i, j)| (i, j.next));
                match due {
                    Some((i, at)) if at <= now => {
                        tick(&mut jobs[i], &env, &mut hooks);
                        None
                    }
                    Some((_, at)) => match rx.recv_timeout(at - now) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(TimerMsg::Stop),
                    },
                    None => Some(rx.recv().unwrap_or(TimerMsg::Stop)),
                }
            }
            Err(TryRecvError::Disconnected) => Some(TimerMsg::Stop),
        };
        match msg {
            None => {}
            Some(TimerMsg::Stop) => break,
            Some(TimerMsg::Reload(new, ack)) => {
                reload(&mut jobs, &new, &env, &mut hooks);
                plan = new;
                let _ = ack.send(());
            }
        }
    }
    drop(jobs);
    if let Some(h) = hooks.take() {
        h.stop();
    }
    drop(plan);
    log::debug!("timer stopped");
}

/// Runs one tick of `cron` and schedules its next.
fn tick(cron: &mut Cron, env: &Env, hooks: &mut Option<Hooks>) {
    let stats = cron.counters.clone();
    stats.runs.fetch_add(1, Ordering::Relaxed);
    if cron.job.is_none() {
        cron.job = cron
            .slot
            .instantiate(&env.host, INFO)
            .map_err(|e| log::error!("timer: {e}"))
            .ok()
            .and_then(CronJobBox::unwrap);
    }
    if let Some(job) = cron.job.as_mut() {
        let (inside, began) = (calls::enter(cron.slot.call), Instant::now());
        let ran = job.run();
        drop(inside);
        let took = began.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        stats.last_nanos.store(took, Ordering::Relaxed);
        match ran {
            RResult::ROk(Schedule::Continue) => {}
            RResult::ROk(Schedule::Stop) => {
                cron.stopped = true;
                log::info!("cron job {} ended its schedule", cron.slot.reference);
            }
            RResult::RErr(e) => {
                stats.panics.fetch_add(1, Ordering::Relaxed);
                report_failure(hooks.as_mut(), INFO, ComponentKind::CronJob, &cron.slot, &e);
                // A fresh instance for the next tick; a panic may have left this one broken.
                cron.job = None;
            }
        }
    }
    let (next, missed) = next_tick(cron.next, cron.interval, Instant::now());
    if missed > 0 {
        stats.skipped.fetch_add(missed, Ordering::Relaxed);
        log::debug!(
            "cron job {}: overran, skipped {missed} tick(s)",
            cron.slot.reference
        );
    }
    cron.next = next;
}

/// Moves to the jobs of `plan`: unchanged jobs keep their instance and schedule; new ones
/// start now. Keeps every old job if a new one cannot be created.
fn reload(jobs: &mut Vec<Cron>, plan: &Plan, env: &Env, hooks: &mut Option<Hooks>) {
    let now = Instant::now();
    let mut made: Vec<Result<usize, Cron>> = Vec::new();
    let mut taken = vec![false; jobs.len()];
    for c in &plan.services.cron {
        match jobs
            .iter()
            .enumerate()
            .position(|(i, j)| !taken[i] && j.same_as(c))
        {
            Some(i) => {
                taken[i] = true;
                made.push(Ok(i));
            }
            None => match create(std::slice::from_ref(c), env, now) {
                Ok(mut one) => made.push(Err(one.remove(0))),
                Err(e) => {
                    log::error!("timer: keeping the old cron jobs: {e}");
                    return;
                }
            },
        }
    }
    let mut old: Vec<Option<Cron>> = jobs.drain(..).map(Some).collect();
    *jobs = made
        .into_iter()
        .map(|m| match m {
            Ok(i) => old[i].take().expect("taken once"),
            Err(c) => c,
        })
        .collect();
    if let Some(h) = hooks.as_mut() {
        h.rebuild(&plan.hooks, &env.host);
    }
    log::debug!("timer moved to the new plan: {} job(s)", jobs.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_tick_is_fixed_rate_and_skips_missed_ticks() {
        let t0 = Instant::now();
        let i = Duration::from_millis(10);
        // On time: the following tick.
        assert_eq!(next_tick(t0, i, t0 + Duration::from_millis(3)), (t0 + i, 0));
        // Late but before the following tick: no drift, still t0 + 10.
        assert_eq!(next_tick(t0, i, t0 + Duration::from_millis(9)), (t0 + i, 0));
        // Overran by 25 ms: ticks at 10 and 20 are skipped, the next is at 30.
        assert_eq!(
            next_tick(t0, i, t0 + Duration::from_millis(25)),
            (t0 + Duration::from_millis(30), 2)
        );
    }
}
