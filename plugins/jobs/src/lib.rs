//! jobs: background work beside the HTTP workers, LaravelS style. One plugin with
//!
//! - a cron job `tick` that runs every second on the timer thread and delivers a task;
//! - a slow task `slow` that runs on a task worker; its `finish` logs the result back on the
//!   HTTP worker that delivered it;
//! - an event `order.paid` with two listeners, `audit` then `notify`, run in that order on a
//!   task worker;
//! - a custom process `relay` on a thread of its own, which takes messages from an HTTP route
//!   and logs them, pushes them to every WebSocket connection, or delivers them as tasks;
//! - an HTTP handler `jobs` for the routes that deliver, fire and send.
//!
//! Enable it in `server.ron` (`config/jobs.ron` is a complete example):
//!
//! ```ron
//! task_worker_num: 2,
//! plugins: { "jobs": (path: "../target/debug/libjobs.so", config: { "slow": (ms: 500) }) },
//! routes: [ (path: "/jobs/*", handler: "jobs.jobs") ],
//! events: { "order.paid": ["jobs.audit", "jobs.notify"] },
//! timer: (enable: true, jobs: [(job: "jobs.tick", interval_ms: 1000, immediate: false)]),
//! processes: { "relay": (component: "jobs.relay", num: 1, restart_interval_ms: 1000) },
//! ```
//!
//! Try it (`plughost start -c config/jobs.ron`):
//!
//! ```sh
//! curl 'localhost:5200/jobs/task?p=report-42'   # accepted; a moment later the log shows
//!                                               # handle on a task worker, finish on this worker
//! curl 'localhost:5200/jobs/fire?p=order-7'     # audit, then notify
//! curl 'localhost:5200/jobs/send?p=hello'       # the relay process logs (and pushes) it
//! curl 'localhost:5200/jobs/send?p=task:x'      # the relay process delivers task `slow`
//! ```

use std::time::{Duration, Instant};

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

/// The HTTP routes: `/jobs/task`, `/jobs/fire`, `/jobs/send`, each with `?p=PAYLOAD`.
struct Jobs {
    host: Host,
}

impl HttpHandler for Jobs {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let p = req.query_param("p").unwrap_or("");
        let (what, result) = match req.path.as_str() {
            "/jobs/task" => ("task", self.host.deliver("jobs.slow", p.as_bytes(), 0, 3)),
            "/jobs/fire" => ("event", self.host.fire("order.paid", p.as_bytes(), 0, 3)),
            "/jobs/send" => ("message", self.host.send_to_process("relay", p.as_bytes())),
            _ => {
                resp.text(
                    404,
                    "try /jobs/task, /jobs/fire or /jobs/send with ?p=...\n",
                );
                return;
            }
        };
        match result {
            Ok(id) => resp.text(200, &format!("{what} accepted ({id})\n")),
            // QueueFull, UnknownTask, NotEnabled...: say why, as a 503 the client may retry.
            Err(e) => resp.text(503, &format!("{what} refused: {e}\n")),
        };
    }
}

/// Ticks every second on the timer thread and delivers a task each time.
struct Tick {
    host: Host,
    n: u64,
}

impl CronJob for Tick {
    fn run(&mut self) -> Schedule {
        self.n += 1;
        match self
            .host
            .deliver("jobs.slow", format!("tick {}", self.n).as_bytes(), 0, 1)
        {
            Ok(id) => log::info!("tick {}: delivered task {id}", self.n),
            Err(e) => log::warn!("tick {}: could not deliver: {e}", self.n),
        }
        Schedule::Continue
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct SlowConfig {
    /// How long each task takes.
    ms: u64,
}

impl Default for SlowConfig {
    fn default() -> Self {
        SlowConfig { ms: 500 }
    }
}

/// A slow task: it blocks a task worker, never an HTTP worker.
struct Slow {
    host: Host,
    ms: u64,
}

impl TaskHandler for Slow {
    fn handle(&mut self, payload: &[u8], attempt: u32) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(self.ms));
        let text = String::from_utf8_lossy(payload);
        Ok(format!(
            "{text:?} done in {} ms on task worker {} (try {attempt})",
            started.elapsed().as_millis(),
            self.host.worker_id()
        )
        .into_bytes())
    }

    /// Runs back on the HTTP worker that delivered the task.
    fn finish(&mut self, result: &[u8]) {
        log::info!(
            "finish on worker {}: {}",
            self.host.worker_id(),
            String::from_utf8_lossy(result)
        );
    }
}

/// First listener of `order.paid`.
struct Audit;

impl EventListener for Audit {
    fn on_event(&mut self, event: &str, payload: &[u8]) -> Result<Propagation, String> {
        log::info!("audit: {event} {}", String::from_utf8_lossy(payload));
        // An empty payload is not worth notifying anyone about: stop here.
        Ok(if payload.is_empty() {
            Propagation::Stop
        } else {
            Propagation::Continue
        })
    }
}

/// Second listener of `order.paid`.
struct Notify;

impl EventListener for Notify {
    fn on_event(&mut self, event: &str, payload: &[u8]) -> Result<Propagation, String> {
        log::info!("notify: {event} {}", String::from_utf8_lossy(payload));
        Ok(Propagation::Continue)
    }
}

/// A custom process: reads messages until the server stops or reloads it.
struct Relay {
    host: Host,
}

impl Process for Relay {
    fn run(&mut self, ctx: &ProcessContext) {
        log::info!("relay: started");
        while !ctx.should_stop() {
            let Some(message) = ctx.recv(Duration::from_millis(500)) else {
                continue;
            };
            let text = String::from_utf8_lossy(&message);
            if let Some(task) = text.strip_prefix("task:") {
                match self.host.deliver("jobs.slow", task.as_bytes(), 0, 1) {
                    Ok(id) => log::info!("relay: delivered {task:?} as task {id}"),
                    Err(e) => log::warn!("relay: cannot deliver {task:?}: {e}"),
                }
                continue;
            }
            // Reaches every open WebSocket connection (0 when WebSocket is off).
            let pushed = self.host.broadcast(Message::text(&text), "", 0);
            log::info!("relay: {text:?} (pushed to {pushed} WebSocket connection(s))");
        }
    }

    fn on_reload(&mut self) {
        log::info!("relay: reloading");
    }

    fn on_stop(&mut self) {
        log::info!("relay: stopping");
    }
}

fn plugin() -> Plugin {
    Plugin::new("jobs", env!("CARGO_PKG_VERSION"))
        .http("jobs", |cx| {
            Ok(Jobs {
                host: cx.host().clone(),
            })
        })
        .cron("tick", |cx| {
            Ok(Tick {
                host: cx.host().clone(),
                n: 0,
            })
        })
        .task("slow", |cx| {
            let config: SlowConfig = cx.config()?;
            Ok(Slow {
                host: cx.host().clone(),
                ms: config.ms,
            })
        })
        .listener("audit", |_| Ok(Audit))
        .listener("notify", |_| Ok(Notify))
        .process("relay", |cx| {
            Ok(Relay {
                host: cx.host().clone(),
            })
        })
}

export_plugin!(plugin);

#[cfg(test)]
mod tests {
    use plughost_test::{Harness, Job};

    #[test]
    fn the_routes_deliver_fire_and_send() {
        let h = Harness::new(super::plugin())
            .tasks(&["jobs.slow"])
            .events(&["order.paid"]);
        let mut jobs = h.http("jobs");
        assert_eq!(
            jobs.get("/jobs/task?p=report").text(),
            "task accepted (1)\n"
        );
        assert_eq!(
            jobs.get("/jobs/fire?p=order-7").text(),
            "event accepted (1)\n"
        );
        assert_eq!(jobs.get("/jobs/send?p=hi").status, 200);
        assert_eq!(jobs.get("/jobs/nope").status, 404);
        let r = h.take();
        let job = |name: &str, payload: &str, tries| Job {
            name: name.into(),
            payload: payload.into(),
            delay_ms: 0,
            tries,
        };
        assert_eq!(r.tasks, [job("jobs.slow", "report", 3)]);
        assert_eq!(r.events, [job("order.paid", "order-7", 3)]);
        assert_eq!(r.process_messages, [("relay".to_owned(), b"hi".to_vec())]);
        // A task handler that is not configured is refused with a 503 that says why.
        let h = Harness::new(super::plugin()).tasks(&["other.task"]);
        let refused = h.http("jobs").get("/jobs/task?p=x");
        assert_eq!(refused.status, 503);
        assert!(
            refused.text().contains("no such task handler"),
            "{}",
            refused.text()
        );
    }

    #[test]
    fn the_cron_job_delivers_a_task_per_tick_and_the_task_finishes() {
        let h = Harness::new(super::plugin()).config("slow", "(ms: 1)");
        let mut tick = h.cron("tick");
        tick.tick().unwrap();
        tick.tick().unwrap();
        let delivered: Vec<_> = h.take().tasks.into_iter().map(|t| t.payload).collect();
        assert_eq!(delivered, [b"tick 1".to_vec(), b"tick 2".to_vec()]);
        let mut slow = h.task("slow");
        let out = slow.handle(b"tick 1", 1).unwrap();
        assert!(String::from_utf8_lossy(&out).starts_with("\"tick 1\" done in"));
        slow.finish(&out).unwrap();
        assert!(h
            .take()
            .logs
            .iter()
            .any(|l| l.message.starts_with("finish on worker")));
    }

    #[test]
    fn audit_stops_an_empty_event_and_passes_the_rest_on() {
        use plughost_plugin_api::abi::Propagation;
        let h = Harness::new(super::plugin());
        let mut audit = h.listener("audit");
        assert_eq!(audit.on_event("order.paid", b""), Ok(Propagation::Stop));
        assert_eq!(
            audit.on_event("order.paid", b"7"),
            Ok(Propagation::Continue)
        );
    }
}
