//! timing: a middleware that times each request and says so in an `x-response-time` header,
//! plus a cleaner and lifecycle hooks that log what they see.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: { "timing": (path: "../target/debug/libtiming.so") },
//! middleware: ["timing.timing"],
//! cleaners: ["timing.cleaner"],
//! hooks: ["timing.hooks"],
//! ```
//!
//! Try it: `curl -i localhost:5200/hello` shows `x-response-time: 12us`. With
//! `config: { "timing": (deny_header: "x-deny") }`, a request carrying that header is
//! answered 403 before its handler runs.

use std::{io::Write, time::Instant};

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    /// A request with this header is refused with 403 (shows an early answer).
    deny_header: Option<String>,
}

struct Timing {
    deny_header: Option<String>,
    started: Option<Instant>,
}

impl Middleware for Timing {
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> Flow {
        self.started = Some(Instant::now());
        if let Some(h) = &self.deny_header {
            if req.header(h).is_some() {
                resp.text(403, "denied by the timing middleware\n");
                return Flow::Respond;
            }
        }
        Flow::Continue
    }

    fn on_response(&mut self, _req: &Request<'_>, resp: &mut Response) {
        if let Some(started) = self.started.take() {
            let mut buf = [0u8; 24];
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{}us", started.elapsed().as_micros());
            let n = cur.position() as usize;
            if let Ok(text) = std::str::from_utf8(&buf[..n]) {
                resp.header("x-response-time", text);
            }
        }
    }
}

/// Counts requests between worker recycles; shows that cleaners run after every request.
struct Counter {
    cleaned: u64,
}

impl Cleaner for Counter {
    fn clean(&mut self) {
        self.cleaned += 1;
        log::trace!("cleaned after request {}", self.cleaned);
    }
}

struct Hooks;

impl Lifecycle for Hooks {
    fn on_server_start(&mut self) {
        log::info!("server started");
    }
    fn on_server_stop(&mut self) {
        log::info!("server stopping");
    }
    fn on_worker_start(&mut self, worker: WorkerInfo) {
        log::info!("{} {} started", worker.kind.as_str(), worker.id);
    }
    fn on_worker_stop(&mut self, worker: WorkerInfo) {
        log::info!("{} {} stopping", worker.kind.as_str(), worker.id);
    }
    fn on_worker_error(&mut self, worker: WorkerInfo, error: &str) {
        log::warn!(
            "{} {} saw an error: {error}",
            worker.kind.as_str(),
            worker.id
        );
    }
}

fn plugin() -> Plugin {
    Plugin::new("timing", env!("CARGO_PKG_VERSION"))
        .middleware("timing", |cx| {
            let config: Config = cx.config()?;
            Ok(Timing {
                deny_header: config.deny_header,
                started: None,
            })
        })
        .cleaner("cleaner", |_| Ok(Counter { cleaned: 0 }))
        .lifecycle("hooks", |_| Ok(Hooks))
}

export_plugin!(plugin);
