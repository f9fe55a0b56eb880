//! Counters shared by all threads, read by `info`. Per-worker counters sit on their own cache
//! lines so workers never contend.

use std::{
    sync::atomic::{AtomicU64, Ordering},
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
}

impl Stats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> Stats {
        Stats {
            started: Instant::now(),
            workers: (0..workers).map(|_| WorkerStats::default()).collect(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// Sum of one counter over the workers.
    pub fn sum(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
    }
}
