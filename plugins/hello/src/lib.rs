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
}
