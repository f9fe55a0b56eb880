//! prometheus: Prometheus metrics for plughost, as one plugin.
//!
//! - `prometheus.requests`, a middleware (put it first in `middleware`): a histogram of
//!   request durations in seconds, `plughost_http_request_duration_seconds`, and a counter,
//!   `plughost_http_requests_total`, by method, route template (never the raw path) and
//!   status code or class. Each worker records into its own shard, with no lock and no
//!   shared cache line; a scrape adds the shards up.
//! - `prometheus.metrics`, an HTTP handler: the text exposition format 0.0.4, with the request
//!   families, the server's (workers, tasks, events, cron jobs, custom processes, reloads,
//!   tables, from `Host::stats`) and the standard `process_*` ones.
//! - `prometheus.health` (200 while the process answers) and `prometheus.ready` (503 until
//!   every worker started, and while the server stops), for load balancers and probes.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: {
//!     "prometheus": (
//!         path: "../target/release/libprometheus.so",
//!         config: { "requests": (status: "code", ignored_status_codes: [404]) },
//!     ),
//! },
//! routes: [
//!     (path: "/actuator/prometheus", handler: "prometheus.metrics", methods: ["GET"]),
//!     (path: "/health", handler: "prometheus.health", methods: ["GET"]),
//!     (path: "/ready", handler: "prometheus.ready", methods: ["GET"]),
//! ],
//! middleware: ["prometheus.requests", ...],
//! ```
//!
//! Try it: `curl localhost:5200/actuator/prometheus`, `curl -i localhost:5200/ready`.
//!
//! The counters live in this library's statics: a hot reload of the plugin starts them from
//! zero, which Prometheus's `rate` and `increase` handle as a counter reset.

pub mod record;
pub mod server;
pub mod text;

use std::time::Instant;

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

use record::Recorder;
use text::{Kind, Writer};

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus's default buckets, in seconds.
const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The middleware's config.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RequestsConfig {
    /// Upper bounds of the histogram's buckets, in seconds, ascending.
    buckets: Vec<f64>,
    /// The status label: `"code"` (`200`) or `"class"` (`2xx`).
    status: String,
    /// Responses with these codes are not recorded.
    ignored_status_codes: Vec<u16>,
}

impl Default for RequestsConfig {
    fn default() -> Self {
        RequestsConfig {
            buckets: DEFAULT_BUCKETS.to_vec(),
            status: "code".into(),
            ignored_status_codes: Vec::new(),
        }
    }
}

/// The `prometheus.requests` middleware: one instance per worker, recording into that
/// worker's shard.
struct Requests {
    recorder: Recorder,
    by_class: bool,
    ignored: Vec<u16>,
    started: Option<Instant>,
    /// `100`..=`999` as text, so the status label costs no formatting per request.
    codes: Vec<String>,
}

impl Requests {
    fn new(cx: &Context<'_>) -> Result<Requests, Error> {
        let config: RequestsConfig = cx.config()?;
        let by_class = match config.status.as_str() {
            "code" => false,
            "class" => true,
            other => return Err(format!("status: {other:?}: use \"code\" or \"class\"").into()),
        };
        let ascending = config.buckets.windows(2).all(|w| w[0] < w[1]);
        if config.buckets.is_empty() || !ascending || config.buckets.iter().any(|b| !b.is_finite())
        {
            return Err("buckets: give finite bounds in ascending order".into());
        }
        let bounds = record::registry().bounds(config.buckets);
        Ok(Requests {
            recorder: Recorder::new(cx.worker_id(), bounds),
            by_class,
            ignored: config.ignored_status_codes,
            started: None,
            codes: (0..1000).map(|c| c.to_string()).collect(),
        })
    }
}

/// The method as a bounded label: the standard ones, `other` for the rest.
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

const CLASSES: [&str; 10] = [
    "0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx",
];

impl Middleware for Requests {
    fn on_request(&mut self, _req: &Request<'_>, _resp: &mut Response) -> Flow {
        self.started = Some(Instant::now());
        Flow::Continue
    }

    fn on_response(&mut self, req: &Request<'_>, resp: &mut Response) {
        let Some(started) = self.started.take() else {
            return;
        };
        let status = resp.status();
        if self.ignored.contains(&status) {
            return;
        }
        let seconds = started.elapsed().as_secs_f64();
        let label = if self.by_class {
            CLASSES[(status / 100) as usize % 10]
        } else {
            self.codes[status as usize % 1000].as_str()
        };
        let route = match req.route.as_str() {
            "" => "unmatched",
            r => r,
        };
        let method = method_label(req.method.as_str());
        self.recorder.record(method, route, label, seconds);
    }
}

/// The `prometheus.metrics` handler.
struct Metrics {
    host: Host,
}

/// Writes the request families: the histogram, then the counter from its counts.
fn render_requests(w: &mut Writer) {
    const HIST: &str = "plughost_http_request_duration_seconds";
    const COUNT: &str = "plughost_http_requests_total";
    let all = record::aggregate();
    let bounds = record::registry().current_bounds();
    let Some(bounds) = bounds else { return };
    w.family(HIST, Kind::Histogram, "Time from a request's arrival at the first middleware to its response, by method, route template and status.");
    let mut le = String::new();
    for (l, (buckets, sum)) in &all {
        let labels = [
            ("method", l.method),
            ("route", l.route.as_str()),
            ("status", l.status.as_str()),
        ];
        let mut cumulative = 0;
        for (i, n) in buckets.iter().enumerate() {
            cumulative += n;
            le.clear();
            match bounds.get(i) {
                Some(b) => text::number(&mut le, *b),
                None => le.push_str("+Inf"),
            }
            let with_le = [labels[0], labels[1], labels[2], ("le", le.as_str())];
            w.sample(&format!("{HIST}_bucket"), &with_le, cumulative as f64);
        }
        w.sample(&format!("{HIST}_sum"), &labels, *sum);
        w.sample(&format!("{HIST}_count"), &labels, cumulative as f64);
    }
    w.family(
        COUNT,
        Kind::Counter,
        "Requests answered, by method, route template and status.",
    );
    for (l, (buckets, _)) in &all {
        let labels = [
            ("method", l.method),
            ("route", l.route.as_str()),
            ("status", l.status.as_str()),
        ];
        w.sample(COUNT, &labels, buckets.iter().sum::<u64>() as f64);
    }
}

impl HttpHandler for Metrics {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        let mut w = Writer::default();
        render_requests(&mut w);
        server::render(&mut w, &self.host.stats());
        resp.send(200, CONTENT_TYPE, w.out);
    }
}

/// `prometheus.health`: the process answers.
struct Health;

impl HttpHandler for Health {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        resp.text(200, "ok\n");
    }
}

/// `prometheus.ready`: every worker started and the server is not stopping.
struct Ready {
    host: Host,
}

impl HttpHandler for Ready {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        let stats = self.host.stats();
        if stats.ready() {
            resp.text(200, "ready\n");
            return;
        }
        let why = match stats.phase {
            ServerPhase::Stopping => "stopping",
            _ => "starting",
        };
        let started = stats.workers.iter().filter(|w| w.started).count();
        let body = format!(
            "not ready: {why} ({started}/{} workers started)\n",
            stats.workers.len()
        );
        resp.text(503, &body);
    }
}

use plughost_plugin_api::ServerPhase;

fn plugin() -> Plugin {
    Plugin::new("prometheus", env!("CARGO_PKG_VERSION"))
        .middleware("requests", Requests::new)
        .http("metrics", |cx| {
            Ok(Metrics {
                host: cx.host().clone(),
            })
        })
        .http("health", |_cx| Ok(Health))
        .http("ready", |cx| {
            Ok(Ready {
                host: cx.host().clone(),
            })
        })
}

export_plugin!(plugin);
