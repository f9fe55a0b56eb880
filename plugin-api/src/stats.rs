//! The host's stats snapshot, as it crosses the boundary: what `Host::stats` returns. Plain
//! `#[repr(C)]` structs of numbers, strings and vectors; the host fills them from its own
//! counters (relaxed atomic loads, a few `/proc` reads), so a snapshot is cheap enough to take
//! on every scrape, from any thread.

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// Where the server is in its life.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerPhase {
    /// Workers are being started (not every one serves yet).
    #[default]
    Starting,
    /// Every worker started; the server is serving.
    Serving,
    /// A stop began: the workers drain and then exit.
    Stopping,
}

/// One HTTP worker's counters.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct WorkerStats {
    /// The worker's id.
    pub id: u32,
    /// Whether it started and accepts connections.
    pub started: bool,
    /// Requests answered (counted as they enter the plugins).
    pub requests: u64,
    /// Requests inside plugin code now (0 or 1: a handler call is synchronous).
    pub in_flight: u64,
    /// Connections open now (HTTP and WebSocket).
    pub connections: u64,
    /// WebSocket connections open now.
    pub websocket_connections: u64,
    /// Panics caught in plugin code on this worker.
    pub panics: u64,
    /// Keep-alive connections it took over from a stalled worker.
    pub taken_over: u64,
    /// Instances recreated after `max_request` requests.
    pub recycles: u64,
    /// CPU time the worker's thread used, in seconds.
    pub cpu_seconds: f64,
    /// Bytes its WebSocket connections hold in their buffers (as of their last idle moment).
    pub websocket_buffered_bytes: u64,
}

/// The task queue's counters (tasks and events share the queue and the task workers).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct TaskStats {
    /// Task worker threads.
    pub workers: u32,
    /// Tasks and events waiting in the queue now (delayed ones and retries included).
    pub queued: u64,
    /// Tasks and events running on a task worker now.
    pub running: u64,
    /// Tasks accepted by `deliver`.
    pub accepted: u64,
    /// Tasks whose `handle` succeeded.
    pub ok: u64,
    /// Tasks that failed every try.
    pub failed: u64,
    /// Retries scheduled (of tasks and of event listeners).
    pub retried: u64,
    /// Deliveries refused (queue full, unknown task, stopping).
    pub refused: u64,
    /// Queued tasks and events dropped at stop.
    pub dropped: u64,
}

/// The events' counters.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct EventStats {
    /// Events accepted by `fire`.
    pub fired: u64,
    /// Events whose listeners all ran (or one stopped propagation).
    pub ok: u64,
    /// Events given up on after a listener failed every try.
    pub failed: u64,
}

/// One cron job's counters (`plugin.component`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct CronStats {
    /// The component, `plugin.component`.
    pub job: RString,
    /// Runs.
    pub runs: u64,
    /// Ticks skipped because a run overran.
    pub skips: u64,
    /// Runs that panicked.
    pub panics: u64,
    /// How long the last run took, in seconds.
    pub last_duration_seconds: f64,
}

/// One custom process's counters.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// The process's name in `server.ron`.
    pub name: RString,
    /// Runs that returned early or panicked and were started again.
    pub restarts: u64,
    /// Panics.
    pub panics: u64,
}

/// Hot reloads and the library versions they left mapped.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct ReloadStats {
    /// Reloads applied.
    pub ok: u64,
    /// Reloads refused (the old version kept serving).
    pub failed: u64,
    /// Library versions loaded and held (old versions stay mapped).
    pub libraries_held: u64,
    /// Their size in bytes.
    pub libraries_bytes: u64,
}

/// The server process as the OS sees it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct ProcessInfo {
    /// The process id.
    pub pid: u32,
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The open files limit (soft).
    pub max_fds: u64,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// One shared table's usage.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct TableStats {
    /// The table's name in `server.ron`.
    pub name: RString,
    /// Rows in use.
    pub rows: u64,
    /// Rows it can hold.
    pub capacity: u64,
    /// Memory it took up front, in bytes.
    pub bytes: u64,
}

/// A snapshot of the server's counters, from [`crate::Host::stats`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Default, PartialEq)]
pub struct ServerStats {
    /// Starting, serving or stopping.
    pub phase: ServerPhase,
    /// Seconds since the server started.
    pub uptime_seconds: f64,
    /// The HTTP workers, by id.
    pub workers: RVec<WorkerStats>,
    /// Panics in plugin code outside a call (a `Drop`, a thread the plugin spawned).
    pub stray_panics: u64,
    /// Tasks.
    pub tasks: TaskStats,
    /// Events.
    pub events: EventStats,
    /// Cron jobs, by component.
    pub cron: RVec<CronStats>,
    /// Custom processes, by name.
    pub processes: RVec<ProcessStats>,
    /// Reloads.
    pub reloads: ReloadStats,
    /// The process.
    pub process: ProcessInfo,
    /// Shared tables, by name.
    pub tables: RVec<TableStats>,
}

impl ServerStats {
    /// Whether every worker started and the server is not stopping: what a readiness probe
    /// asks.
    pub fn ready(&self) -> bool {
        self.phase == ServerPhase::Serving
            && !self.workers.is_empty()
            && self.workers.iter().all(|w| w.started)
    }
}
