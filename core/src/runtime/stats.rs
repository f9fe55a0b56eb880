//! Counters shared by all threads, read by `info`. Per-worker counters sit on their own cache
//! lines so workers never contend.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

/// One worker's counters.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats {
    /// Requests answered.
    pub requests: AtomicU64,
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
}

/// All counters.
#[derive(Debug)]
pub struct Stats {
    /// When the server started.
    pub started: Instant,
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
    /// Cron job runs.
    pub cron_runs: AtomicU64,
    /// Cron job runs that panicked.
    pub cron_panics: AtomicU64,
    /// Cron ticks skipped because a run overran.
    pub cron_skipped: AtomicU64,
    /// Custom process runs that returned early or panicked and were started again.
    pub process_restarts: AtomicU64,
    /// Custom process panics.
    pub process_panics: AtomicU64,
}

impl Stats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Stats {
        Stats {
            started: Instant::now(),
            workers: (0..workers).map(|_| WorkerStats::default()).collect(),
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
