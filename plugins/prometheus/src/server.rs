//! The server's families, from the host's stats snapshot: workers, tasks, events, cron jobs,
//! custom processes, reloads, tables, and the standard `process_*` metrics.

use plughost_plugin_api::{ServerPhase, ServerStats};

use crate::text::{Kind, Writer};

type Get<T> = fn(&T) -> f64;

/// One family with a sample per item, labelled `label` = `key(item)`.
fn per<T>(
    w: &mut Writer,
    items: &[T],
    (name, kind, help): (&str, Kind, &str),
    label: &str,
    key: impl Fn(&T) -> String,
    value: Get<T>,
) {
    if items.is_empty() {
        return;
    }
    w.family(name, kind, help);
    for item in items {
        w.sample(name, &[(label, &key(item))], value(item));
    }
}

/// Writes every server family of `s`.
pub fn render(w: &mut Writer, s: &ServerStats) {
    use Kind::{Counter, Gauge};
    w.single(
        "plughost_up",
        Gauge,
        "1 while the server answers scrapes.",
        1.0,
    );
    let ready = s.ready() as u8 as f64;
    w.single(
        "plughost_ready",
        Gauge,
        "1 when every worker started and the server is not stopping.",
        ready,
    );
    let stopping = (s.phase == ServerPhase::Stopping) as u8 as f64;
    w.single(
        "plughost_stopping",
        Gauge,
        "1 while the server stops.",
        stopping,
    );
    w.single(
        "plughost_uptime_seconds",
        Gauge,
        "Seconds since the server started.",
        s.uptime_seconds,
    );
    workers(w, s);
    tasks(w, s);
    jobs(w, s);
    w.family("plughost_reloads_total", Counter, "Hot reloads, by result.");
    w.sample(
        "plughost_reloads_total",
        &[("result", "ok")],
        s.reloads.ok as f64,
    );
    w.sample(
        "plughost_reloads_total",
        &[("result", "failed")],
        s.reloads.failed as f64,
    );
    let held = s.reloads.libraries_held as f64;
    w.single(
        "plughost_plugin_libraries_held",
        Gauge,
        "Plugin library versions loaded and kept mapped (old versions cannot be unloaded).",
        held,
    );
    let bytes = s.reloads.libraries_bytes as f64;
    w.single(
        "plughost_plugin_libraries_bytes",
        Gauge,
        "Size of the plugin library versions held.",
        bytes,
    );
    let stray = s.stray_panics as f64;
    w.single(
        "plughost_stray_panics_total",
        Counter,
        "Panics in plugin code outside a call (drops, plugin threads).",
        stray,
    );
    let t = s.tables.as_slice();
    let name = |t: &plughost_plugin_api::stats::TableStats| t.name.to_string();
    per(
        w,
        t,
        (
            "plughost_table_rows",
            Gauge,
            "Rows in use in a shared table.",
        ),
        "table",
        name,
        |t| t.rows as f64,
    );
    per(
        w,
        t,
        (
            "plughost_table_capacity_rows",
            Gauge,
            "Rows a shared table can hold.",
        ),
        "table",
        name,
        |t| t.capacity as f64,
    );
    per(
        w,
        t,
        (
            "plughost_table_memory_bytes",
            Gauge,
            "Memory a shared table took up front.",
        ),
        "table",
        name,
        |t| t.bytes as f64,
    );
    process(w, s);
}

fn workers(w: &mut Writer, s: &ServerStats) {
    use Kind::{Counter, Gauge};
    let ws = s.workers.as_slice();
    let id = |w: &plughost_plugin_api::stats::WorkerStats| w.id.to_string();
    per(
        w,
        ws,
        (
            "plughost_worker_started",
            Gauge,
            "1 once the worker started accepting, 0 after it stopped.",
        ),
        "worker",
        id,
        |w| w.started as u8 as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_requests_total",
            Counter,
            "Requests a worker handled.",
        ),
        "worker",
        id,
        |w| w.requests as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_requests_in_flight",
            Gauge,
            "Requests inside plugin code on a worker now.",
        ),
        "worker",
        id,
        |w| w.in_flight as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_connections",
            Gauge,
            "Connections a worker holds now (HTTP and WebSocket).",
        ),
        "worker",
        id,
        |w| w.connections as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_websocket_connections",
            Gauge,
            "WebSocket connections a worker holds now.",
        ),
        "worker",
        id,
        |w| w.websocket_connections as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_websocket_buffered_bytes",
            Gauge,
            "Bytes a worker's WebSocket connections hold in their buffers.",
        ),
        "worker",
        id,
        |w| w.websocket_buffered_bytes as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_panics_total",
            Counter,
            "Panics caught in plugin code on a worker.",
        ),
        "worker",
        id,
        |w| w.panics as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_taken_over_connections_total",
            Counter,
            "Keep-alive connections a worker took over from a stalled one.",
        ),
        "worker",
        id,
        |w| w.taken_over as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_recycles_total",
            Counter,
            "Times a worker recreated its instances after max_request requests.",
        ),
        "worker",
        id,
        |w| w.recycles as f64,
    );
    per(
        w,
        ws,
        (
            "plughost_worker_cpu_seconds_total",
            Counter,
            "CPU time of a worker's thread.",
        ),
        "worker",
        id,
        |w| w.cpu_seconds,
    );
}

fn tasks(w: &mut Writer, s: &ServerStats) {
    use Kind::{Counter, Gauge};
    let t = &s.tasks;
    w.single(
        "plughost_task_workers",
        Gauge,
        "Task worker threads.",
        t.workers as f64,
    );
    w.single(
        "plughost_tasks_queued",
        Gauge,
        "Tasks and events waiting in the queue (delayed and retries included).",
        t.queued as f64,
    );
    w.single(
        "plughost_tasks_running",
        Gauge,
        "Tasks and events running on a task worker.",
        t.running as f64,
    );
    w.single(
        "plughost_tasks_accepted_total",
        Counter,
        "Tasks accepted by deliver.",
        t.accepted as f64,
    );
    w.single(
        "plughost_tasks_refused_total",
        Counter,
        "Deliveries refused (queue full, unknown task, stopping).",
        t.refused as f64,
    );
    w.single(
        "plughost_tasks_retried_total",
        Counter,
        "Retries scheduled, of tasks and of event listeners.",
        t.retried as f64,
    );
    w.single(
        "plughost_tasks_dropped_total",
        Counter,
        "Queued tasks and events dropped at stop.",
        t.dropped as f64,
    );
    w.family(
        "plughost_tasks_completed_total",
        Counter,
        "Tasks done, by result (failed: every try failed).",
    );
    w.sample(
        "plughost_tasks_completed_total",
        &[("result", "ok")],
        t.ok as f64,
    );
    w.sample(
        "plughost_tasks_completed_total",
        &[("result", "failed")],
        t.failed as f64,
    );
    let e = &s.events;
    w.single(
        "plughost_events_fired_total",
        Counter,
        "Events accepted by fire.",
        e.fired as f64,
    );
    w.family(
        "plughost_events_completed_total",
        Counter,
        "Events done, by result (failed: a listener failed every try).",
    );
    w.sample(
        "plughost_events_completed_total",
        &[("result", "ok")],
        e.ok as f64,
    );
    w.sample(
        "plughost_events_completed_total",
        &[("result", "failed")],
        e.failed as f64,
    );
}

fn jobs(w: &mut Writer, s: &ServerStats) {
    use Kind::{Counter, Gauge};
    let c = s.cron.as_slice();
    let job = |c: &plughost_plugin_api::stats::CronStats| c.job.to_string();
    per(
        w,
        c,
        ("plughost_cron_runs_total", Counter, "Runs of a cron job."),
        "job",
        job,
        |c| c.runs as f64,
    );
    per(
        w,
        c,
        (
            "plughost_cron_skipped_ticks_total",
            Counter,
            "Ticks of a cron job skipped because a run overran.",
        ),
        "job",
        job,
        |c| c.skips as f64,
    );
    per(
        w,
        c,
        (
            "plughost_cron_panics_total",
            Counter,
            "Runs of a cron job that panicked.",
        ),
        "job",
        job,
        |c| c.panics as f64,
    );
    per(
        w,
        c,
        (
            "plughost_cron_last_duration_seconds",
            Gauge,
            "How long the last run of a cron job took.",
        ),
        "job",
        job,
        |c| c.last_duration_seconds,
    );
    let p = s.processes.as_slice();
    let name = |p: &plughost_plugin_api::stats::ProcessStats| p.name.to_string();
    per(
        w,
        p,
        (
            "plughost_custom_process_restarts_total",
            Counter,
            "Times a custom process was started again after returning or panicking.",
        ),
        "process",
        name,
        |p| p.restarts as f64,
    );
    per(
        w,
        p,
        (
            "plughost_custom_process_panics_total",
            Counter,
            "Panics of a custom process.",
        ),
        "process",
        name,
        |p| p.panics as f64,
    );
}

fn process(w: &mut Writer, s: &ServerStats) {
    use Kind::{Counter, Gauge};
    let p = &s.process;
    w.single(
        "process_cpu_seconds_total",
        Counter,
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    w.single(
        "process_resident_memory_bytes",
        Gauge,
        "Resident memory size in bytes.",
        p.resident_bytes as f64,
    );
    w.single(
        "process_virtual_memory_bytes",
        Gauge,
        "Virtual memory size in bytes.",
        p.virtual_bytes as f64,
    );
    w.single(
        "process_open_fds",
        Gauge,
        "Number of open file descriptors.",
        p.open_fds as f64,
    );
    w.single(
        "process_max_fds",
        Gauge,
        "Maximum number of open file descriptors.",
        p.max_fds as f64,
    );
    w.single(
        "process_start_time_seconds",
        Gauge,
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}
