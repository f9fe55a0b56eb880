//! hello: the first plugin. An HTTP handler that greets, with a per-instance counter that
//! shows which worker thread answered.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: { "hello": (path: "../target/debug/libhello.so", config: { "hello": (greeting: "hello") }) },
//! routes: [
//!     (path: "/hello", handler: "hello.hello"),
//!     (path: "/hello/{name}", handler: "hello.hello"),
//! ],
//! ```
//!
//! Try it: `curl localhost:5200/hello` and `curl localhost:5200/hello/ada`. The
//! `x-worker` and `x-served` headers say which worker answered and how many requests that
//! worker's instance has served.
//!
//! The `env` component answers `host.env(KEY)` (the process environment, then the server's
//! `env_file`): route it with `(path: "/env/{key}", handler: "hello.env")` and
//! `curl localhost:5200/env/GREETING`. With the Apollo plugin (`config/apollo.ron`) the value
//! changes live when the configuration is published.
//!
//! Deferred and streamed responses (README, "Deferred and streamed responses"):
//!
//! - `slow` defers its response to the task `hello.sleep`, which sleeps `ms` (200) on a task
//!   worker and completes it by its token: the HTTP worker is free meanwhile, so 100
//!   concurrent requests take about 200 ms × 100 / `task_worker_num`, whatever `worker_num`.
//!   Route it with `(path: "/hello/slow", handler: "hello.slow")` and set `task_worker_num`;
//!   `curl localhost:5200/hello/slow`.
//! - `events` streams Server-Sent Events, a tick every 100 ms written by a thread of the
//!   plugin: `(path: "/events", handler: "hello.events")` and
//!   `(path: "/events/page", handler: "hello.events")`; `curl -N 'localhost:5200/events?n=5'`,
//!   or open `http://localhost:5200/events/page` in a browser.

use std::io::Write;

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

/// The component's config in `server.ron`.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct Config {
    /// The word before the name.
    greeting: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            greeting: "hello".into(),
        }
    }
}

struct Hello {
    greeting: String,
    /// Requests this instance served: one instance per worker, so no lock.
    served: u64,
}

impl HttpHandler for Hello {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        self.served += 1;
        resp.set_header("content-type", "text/plain; charset=utf-8")
            .header("x-worker", itoa(req.worker_id as u64).as_str())
            .header("x-served", itoa(self.served).as_str());
        let _ = match req.param("name") {
            Some(name) => writeln!(resp, "{}, {name}!", self.greeting),
            None => writeln!(resp, "{} from plughost", self.greeting),
        };
    }
}

/// Formats a number into a stack buffer (the hot path stays free of allocation).
fn itoa(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[self.start..]).unwrap_or("0")
    }
}

/// Answers `host.env(key)`: 200 with the value, 404 when it has none.
struct Env {
    host: Host,
}

impl HttpHandler for Env {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        resp.header("x-worker", itoa(req.worker_id as u64).as_str());
        let key = req.param("key").unwrap_or("");
        match self.host.env(key) {
            Some(value) => resp.text(200, &format!("{value}\n")),
            None => resp.text(404, &format!("{key} is not set\n")),
        };
    }
}

/// `/hello/slow`: defers its response to the task `hello.sleep`, which completes it on a task
/// worker. The HTTP worker returns at once and serves other requests meanwhile.
struct Slow {
    host: Host,
    /// Slow requests deferred and not answered yet, across every worker.
    in_flight: Option<Counter>,
}

impl HttpHandler for Slow {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let handle = match self.host.defer(req) {
            Ok(h) => h,
            Err(e) => {
                resp.text(500, &format!("cannot defer: {e}\n"));
                return;
            }
        };
        let in_flight = self.in_flight.as_ref().map_or(0, |c| c.add(1));
        // The handle stays in the server; the task carries its token.
        let token = handle.into_token();
        let payload = format!("{token} {in_flight}");
        if let Err(e) = self.host.deliver("hello.sleep", payload.as_bytes(), 0, 1) {
            if let Some(c) = &self.in_flight {
                c.add(-1);
            }
            let mut busy = Response::new();
            busy.text(503, &format!("no task worker: {e}\n"));
            let _ = self.host.resume(token).complete(&busy);
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct SleepConfig {
    /// How long the task sleeps before it answers.
    ms: u64,
}

impl Default for SleepConfig {
    fn default() -> Self {
        SleepConfig { ms: 200 }
    }
}

/// The task behind `/hello/slow`: sleeps (a database call, another service), then completes
/// the deferred response by its token.
struct Sleep {
    host: Host,
    ms: u64,
    in_flight: Option<Counter>,
}

impl TaskHandler for Sleep {
    fn handle(&mut self, payload: &[u8], _attempt: u32) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(payload);
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        let Some(Ok(token)) = parts.next() else {
            return Err(format!("not a token: {text:?}"));
        };
        let seen = parts.next().and_then(Result::ok).unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(self.ms));
        if let Some(c) = &self.in_flight {
            c.add(-1);
        }
        let mut resp = Response::new();
        resp.text(
            200,
            &format!(
                "slept {} ms on task worker {} (in flight when deferred: {seen})\n",
                self.ms,
                self.host.worker_id()
            ),
        );
        if self.host.resume(token).complete(&resp).is_err() {
            log::info!("slow response {token}: the client is gone");
        }
        Ok(Vec::new())
    }
}

/// `/events?n=10&ms=100`: a Server-Sent Events stream of `n` ticks, one every `ms`, written
/// by a thread of the plugin; `/events/page` is a page that reads it with `EventSource`.
struct Events {
    host: Host,
}

impl HttpHandler for Events {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        if req.path.as_str().ends_with("/page") {
            resp.send(200, "text/html; charset=utf-8", EVENTS_PAGE);
            return;
        }
        let number = |key: &str, default: u64| {
            req.query_param(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (n, ms) = (number("n", 10), number("ms", 100).max(1));
        let mut handle = match self.host.defer(req) {
            Ok(h) => h,
            Err(e) => {
                resp.text(500, &format!("cannot defer: {e}\n"));
                return;
            }
        };
        let mut head = Response::new();
        head.send(200, "text/event-stream", ": ticking\n\n")
            .header("cache-control", "no-cache");
        if handle.start(&head).is_err() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("hello-events".into())
            .spawn(move || tick(handle, n, ms));
        if let Err(e) = spawned {
            log::error!("cannot start a thread for /events: {e}");
        }
    }
}

/// Writes `n` ticks, one every `ms`, then ends the stream; stops early once the client left.
fn tick(mut handle: ResponseHandle, n: u64, ms: u64) {
    for i in 1..=n {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let event = format!("id: {i}\ndata: tick {i}\n\n");
        if handle.write_chunk(event.as_bytes()).is_err() {
            log::info!(
                "events {}: the client left after {} tick(s)",
                handle.token(),
                i - 1
            );
            return;
        }
    }
    let _ = handle.finish();
}

const EVENTS_PAGE: &str = r#"<!doctype html>
<title>plughost events</title>
<p id="status">connecting</p>
<ul id="ticks"></ul>
<script>
  const n = Number(new URLSearchParams(location.search).get("n") || 3);
  const source = new EventSource("/events?n=" + n + "&ms=100");
  let seen = 0;
  source.onopen = () => { document.getElementById("status").textContent = "open"; };
  source.onmessage = (e) => {
    const li = document.createElement("li");
    li.textContent = e.data;
    document.getElementById("ticks").appendChild(li);
    if (++seen >= n) {
      source.close();
      document.getElementById("status").textContent = "done";
    }
  };
</script>
"#;

fn plugin() -> Plugin {
    Plugin::new("hello", env!("CARGO_PKG_VERSION"))
        .http("hello", |cx| {
            let config: Config = cx.config()?;
            log::debug!("hello instance created on worker {}", cx.worker_id());
            Ok(Hello {
                greeting: config.greeting,
                served: 0,
            })
        })
        .http("env", |cx| {
            Ok(Env {
                host: cx.host().clone(),
            })
        })
        .http("slow", |cx| {
            Ok(Slow {
                host: cx.host().clone(),
                in_flight: cx.host().counter("hello.slow.in_flight").ok(),
            })
        })
        .task("sleep", |cx| {
            let config: SleepConfig = cx.config()?;
            Ok(Sleep {
                host: cx.host().clone(),
                ms: config.ms,
                in_flight: cx.host().counter("hello.slow.in_flight").ok(),
            })
        })
        .http("events", |cx| {
            Ok(Events {
                host: cx.host().clone(),
            })
        })
}

export_plugin!(plugin);

#[cfg(test)]
mod tests {
    use plughost_test::{Harness, TestRequest};

    #[test]
    fn greets_by_name_and_counts_what_its_instance_served() {
        let h = Harness::new(super::plugin()).config("hello", r#"(greeting: "hi")"#);
        let mut hello = h.http("hello").route("/hello/{name}");
        let resp = hello.request(TestRequest::get("/hello/ada"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hi, ada!\n");
        assert_eq!(resp.header("x-served"), Some("1"));
        assert_eq!(hello.get("/hello/bob").header("x-served"), Some("2"));
        let logged = h.recorded().logs;
        assert!(
            logged
                .iter()
                .any(|l| l.message.contains("instance created")),
            "{logged:?}"
        );
    }

    #[test]
    fn env_answers_what_the_host_knows() {
        let h = Harness::new(super::plugin()).env("GREETING", "hey");
        let mut env = h.http("env").route("/env/{key}");
        assert_eq!(env.get("/env/GREETING").text(), "hey\n");
        let missing = env.get("/env/PLUGHOST_NOT_SET_ANYWHERE");
        assert_eq!(missing.status, 404);
    }

    #[test]
    fn slow_defers_to_the_task_which_completes_the_response() {
        use plughost_test::Deferred;
        let h = Harness::new(super::plugin()).config("sleep", "(ms: 1)");
        let resp = h.http("slow").get("/hello/slow");
        assert_eq!(resp.error, None);
        let r = h.take();
        assert_eq!(r.deferred, [Deferred::Deferred { token: 1, conn: 1 }]);
        let task = &r.tasks[0];
        assert_eq!(task.name, "hello.sleep");
        assert_eq!(task.payload, b"1 1"); // token 1, 1 in flight
        h.task("sleep").handle(&task.payload, 1).unwrap();
        match &h.take().deferred[..] {
            [Deferred::Completed {
                token: 1,
                status: 200,
                body,
            }] => {
                assert!(String::from_utf8_lossy(body).starts_with("slept 1 ms"));
            }
            other => panic!("{other:?}"),
        }
    }
}
