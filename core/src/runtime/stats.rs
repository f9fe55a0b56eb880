//! Counters shared by all threads, read by `info`. Per-worker counters sit on their own cache
//! lines so workers never contend.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

/// One worker's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Of those, answered from the static folder (any status).
    pub static_responses: AtomicU64,
    /// Static file responses whose body went out with sendfile, and their bytes.
    pub sendfile_responses: AtomicU64,
    /// See `sendfile_responses`.
    pub sendfile_bytes: AtomicU64,
    /// Panics caught in plugin code.
    pub panics: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Instances recreated by `max_request`.
    pub recycles: AtomicU64,
    /// Keep-alive connections this worker took over from a stalled one.
    pub taken_over: AtomicU64,
    /// New connections this worker accepted from a stalled one's listen backlog.
    pub from_backlog: AtomicU64,
    /// Whether it is inside a call into plugin code for a request (which may take long):
    /// other workers hand it no new connection then.
    pub in_call: AtomicBool,
    /// Whether it accepts connections (false once it stops), so a stopping worker waits
    /// for those its peers may still hand it.
    pub accepting: AtomicBool,
    /// Bytes its WebSocket connections hold in their own buffers (undecoded input, a message
    /// being assembled or inflated, output not yet written), as of their last idle moment.
    pub ws_buffered: AtomicU64,
    /// The CPU-time clock of the worker's thread (`pthread_getcpuclockid`), `NO_CLOCK` until
    /// the thread set it, so any thread can read the worker's CPU time.
    pub cpu_clock: AtomicI64,
}

/// [`WorkerStats::cpu_clock`] before the worker set it.
pub const NO_CLOCK: i64 = i64::MIN;

impl WorkerStats {
    /// Records the calling thread's CPU-time clock as this worker's.
    pub fn set_cpu_clock_to_current_thread(&self) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is the calling thread; the call writes only `clock`.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
            self.cpu_clock.store(clock as i64, Ordering::Relaxed);
        }
    }

    /// CPU time the worker's thread used, in seconds (0 before it started or after it ended).
    pub fn cpu_seconds(&self) -> f64 {
        let clock = self.cpu_clock.load(Ordering::Relaxed);
        if clock == NO_CLOCK {
            return 0.0;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes only `ts`; a clock of a thread that ended gives EINVAL, not UB.
        if unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) } != 0 {
            return 0.0;
        }
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }
}

/// Where the server is in its life, as [`Stats::phase`] holds it.
pub mod phase {
    /// Workers are starting.
    pub const STARTING: u8 = 0;
    /// Every worker started.
    pub const SERVING: u8 = 1;
    /// A stop began.
    pub const STOPPING: u8 = 2;
}

/// All counters.
#[derive(Debug)]
pub struct Stats {
    /// When the server started.
    pub started: Instant,
    /// The same moment on the wall clock.
    pub started_at: SystemTime,
    /// Starting, serving or stopping ([`phase`]).
    pub phase: AtomicU8,
    /// Per worker.
    pub workers: Vec<WorkerStats>,
    /// Reloads applied.
    pub reloads: AtomicU64,
    /// Reloads refused (the old version kept serving).
    pub reload_failures: AtomicU64,
    /// Task workers, the timer and custom processes.
    pub services: ServiceStats,
    /// Bytes of large request bodies held or announced now, across workers (under
    /// `limits.max_inflight_body_bytes`).
    pub bodies_in_flight: Arc<AtomicUsize>,
    /// Requests refused with 503 because that budget was spent.
    pub bodies_refused: AtomicU64,
}

/// Counters of the task workers, the timer and the custom processes.
#[derive(Debug, Default)]
pub struct ServiceStats {
    /// Tasks accepted by `deliver`.
    pub tasks_accepted: AtomicU64,
    /// Deliveries refused (queue full, unknown task, stopping).
    pub tasks_refused: AtomicU64,
    /// Tasks whose `handle` succeeded.
    pub tasks_ok: AtomicU64,
    /// Tasks that failed every try.
    pub tasks_failed: AtomicU64,
    /// Retries scheduled (of tasks and of event listeners).
    pub tasks_retried: AtomicU64,
    /// Queued tasks and events dropped at stop.
    pub tasks_dropped: AtomicU64,
    /// Events accepted by `fire`.
    pub events_fired: AtomicU64,
    /// Events whose listeners all ran (or one stopped propagation).
    pub events_ok: AtomicU64,
    /// Events given up on after a listener failed every try.
    pub events_failed: AtomicU64,
    /// Tasks and events in the queue now (delayed and waiting retries included).
    pub queued: AtomicU64,
    /// Tasks and events running on a task worker now.
    pub running: AtomicU64,
    /// Task worker threads.
    pub task_workers: AtomicU64,
    /// Per cron job (`plugin.component`).
    pub cron: Keyed<CronCounters>,
    /// Per custom process (its name).
    pub processes: Keyed<ProcessCounters>,
}

/// Counters by name, created on first use; the holder keeps its `Arc` and counts with
/// atomics, so the lock is taken only to register and to read the list.
#[derive(Debug)]
pub struct Keyed<T>(Mutex<Vec<(String, Arc<T>)>>);

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed(Mutex::new(Vec::new()))
    }
}

impl<T: Default> Keyed<T> {
    /// The counters of `name`, created at zero on first use.
    pub fn get(&self, name: &str) -> Arc<T> {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = list.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::new(T::default());
        list.push((name.to_owned(), c.clone()));
        c
    }

    /// Every name and its counters, in the order they were first used.
    pub fn list(&self) -> Vec<(String, Arc<T>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sum of one counter over every name.
    pub fn sum(&self, f: impl Fn(&T) -> &AtomicU64) -> u64 {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().map(|(_, c)| f(c).load(Ordering::Relaxed)).sum()
    }
}

/// One cron job's counters.
#[derive(Debug, Default)]
pub struct CronCounters {
    /// Runs.
    pub runs: AtomicU64,
    /// Runs that panicked.
    pub panics: AtomicU64,
    /// Ticks skipped because a run overran.
    pub skipped: AtomicU64,
    /// How long the last run took, in nanoseconds.
    pub last_nanos: AtomicU64,
}

/// One custom process's counters.
#[derive(Debug, Default)]
pub struct ProcessCounters {
    /// Runs that returned early or panicked and were started again.
    pub restarts: AtomicU64,
    /// Panics.
    pub panics: AtomicU64,
}

impl Stats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Stats {
        Stats {
            started: Instant::now(),
            started_at: SystemTime::now(),
            phase: AtomicU8::new(phase::STARTING),
            workers: (0..workers)
                .map(|_| WorkerStats {
                    cpu_clock: AtomicI64::new(NO_CLOCK),
                    ..WorkerStats::default()
                })
                .collect(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            services: ServiceStats::default(),
            bodies_in_flight: Arc::default(),
            bodies_refused: AtomicU64::new(0),
        }
    }

    /// Sum of one counter over the workers.
    pub fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers
            .iter()
            .map(|w| f(w).load(Ordering::Relaxed))
            .sum()
    }
}
