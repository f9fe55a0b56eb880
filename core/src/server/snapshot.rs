//! The stats snapshot plugins read with `Host::stats` (the Prometheus component's source):
//! relaxed loads of the counters `info` shows, each worker's thread CPU time, and the
//! process's CPU, memory and descriptors from `/proc`.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::UNIX_EPOCH,
};

use plughost_plugin_api::stats::{
    CronStats, EventStats, ProcessInfo, ProcessStats, ReloadStats, ServerPhase, ServerStats,
    TableStats, TaskStats, WorkerStats,
};

use super::state::State;
use crate::{
    plugin::{host::StatsApi, loader},
    runtime::stats::{phase, ServiceStats, Stats},
};

/// Takes snapshots of a running server's [`State`].
#[derive(Debug)]
pub struct Snapshots(pub Arc<State>);

impl StatsApi for Snapshots {
    fn snapshot(&self) -> ServerStats {
        let state = &self.0;
        let stats = &state.stats;
        let (held, bytes) = loader::held();
        ServerStats {
            phase: match stats.phase.load(Relaxed) {
                phase::STARTING => ServerPhase::Starting,
                phase::SERVING => ServerPhase::Serving,
                _ => ServerPhase::Stopping,
            },
            uptime_seconds: stats.started.elapsed().as_secs_f64(),
            workers: workers(state),
            stray_panics: state.stray_panics.load(Relaxed),
            tasks: tasks(&stats.services),
            events: EventStats {
                fired: stats.services.events_fired.load(Relaxed),
                ok: stats.services.events_ok.load(Relaxed),
                failed: stats.services.events_failed.load(Relaxed),
            },
            cron: cron(&stats.services),
            processes: processes(&stats.services),
            reloads: ReloadStats {
                ok: stats.reloads.load(Relaxed),
                failed: stats.reload_failures.load(Relaxed),
                libraries_held: held,
                libraries_bytes: bytes,
            },
            process: process_info(stats),
            tables: state
                .tables
                .iter()
                .map(|t| TableStats {
                    name: t.name().into(),
                    rows: t.count(),
                    capacity: t.capacity(),
                    bytes: t.bytes(),
                })
                .collect(),
        }
    }
}

fn workers(state: &State) -> abi_stable::std_types::RVec<WorkerStats> {
    let ws = state.connections.per_worker(state.stats.workers.len());
    let stats: &Stats = &state.stats;
    stats
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| WorkerStats {
            id: i as u32,
            started: w.accepting.load(Relaxed),
            requests: w.requests.load(Relaxed),
            in_flight: w.in_call.load(Relaxed) as u64,
            connections: w.connections.load(Relaxed),
            websocket_connections: ws[i].0,
            panics: w.panics.load(Relaxed),
            taken_over: w.taken_over.load(Relaxed),
            recycles: w.recycles.load(Relaxed),
            cpu_seconds: w.cpu_seconds(),
            websocket_buffered_bytes: w.ws_buffered.load(Relaxed),
        })
        .collect()
}

fn tasks(s: &ServiceStats) -> TaskStats {
    TaskStats {
        workers: s.task_workers.load(Relaxed) as u32,
        queued: s.queued.load(Relaxed),
        running: s.running.load(Relaxed),
        accepted: s.tasks_accepted.load(Relaxed),
        ok: s.tasks_ok.load(Relaxed),
        failed: s.tasks_failed.load(Relaxed),
        retried: s.tasks_retried.load(Relaxed),
        refused: s.tasks_refused.load(Relaxed),
        dropped: s.tasks_dropped.load(Relaxed),
    }
}

fn cron(s: &ServiceStats) -> abi_stable::std_types::RVec<CronStats> {
    s.cron
        .list()
        .into_iter()
        .map(|(job, c)| CronStats {
            job: job.into(),
            runs: c.runs.load(Relaxed),
            skips: c.skipped.load(Relaxed),
            panics: c.panics.load(Relaxed),
            last_duration_seconds: c.last_nanos.load(Relaxed) as f64 / 1e9,
        })
        .collect()
}

fn processes(s: &ServiceStats) -> abi_stable::std_types::RVec<ProcessStats> {
    s.processes
        .list()
        .into_iter()
        .map(|(name, p)| ProcessStats {
            name: name.into(),
            restarts: p.restarts.load(Relaxed),
            panics: p.panics.load(Relaxed),
        })
        .collect()
}

/// The process's CPU time (getrusage), memory (`/proc/self/statm`), descriptors
/// (`/proc/self/fd`, the soft limit) and start time.
fn process_info(stats: &Stats) -> ProcessInfo {
    // SAFETY: the calls write only the structs given.
    let (usage, limit) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        let mut limit: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        (usage, limit)
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut pages = statm
        .split_whitespace()
        .map(|n| n.parse::<u64>().unwrap_or(0));
    let (size, resident) = (pages.next().unwrap_or(0), pages.next().unwrap_or(0));
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessInfo {
        pid: std::process::id(),
        cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
        resident_bytes: resident * page,
        virtual_bytes: size * page,
        // The read_dir itself holds one descriptor.
        open_fds: open_fds.saturating_sub(1),
        max_fds: limit.rlim_cur,
        start_time_seconds: process_start(stats),
    }
}

/// When the process started, from `/proc/self/stat` and the boot time; the server's own
/// start when those cannot be read.
fn process_start(stats: &Stats) -> f64 {
    let fallback = || {
        let since = stats.started_at.duration_since(UNIX_EPOCH);
        since.map_or(0.0, |d| d.as_secs_f64())
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Field 22 (starttime, in clock ticks since boot), counted after the `(comm)` field.
    let ticks = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|t| t.parse::<u64>().ok());
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok());
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match (ticks, boot) {
        (Some(t), Some(b)) if hz > 0 => b as f64 + t as f64 / hz as f64,
        _ => fallback(),
    }
}
