//! The Prometheus component (plugins/prometheus) through the real binary: its exposition
//! format checked by `promtool`, a real `prometheus` server scraping it and answering PromQL,
//! and the health and readiness routes. The tests that need `promtool` or `prometheus`
//! (Debian's `prometheus` package) say they were skipped without them, and fail in CI.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    artifacts, get_close, job_artifacts, prom_artifacts, Config, Conn, Response, TestServer,
};

/// How long a wait for Prometheus (start, scrapes, a query's answer) may take at most.
const PROM_WAIT: Duration = Duration::from_secs(60);

/// hello, panicky (`/panic`, `/slow`), jobs (task, event, cron, process), ws-echo, and the
/// Prometheus components: the middleware first, the metrics, health and ready routes.
fn config() -> Config {
    let a = artifacts();
    let p = prom_artifacts();
    let j = job_artifacts();
    Config::hello()
        .workers(2)
        .plugin_config(
            "prometheus",
            &p.prometheus,
            r#"{ "requests": (ignored_status_codes: [418]) }"#,
        )
        .plugin("panicky", &a.panicky)
        .plugin_config("jobs", &j.jobs, r#"{ "slow": (ms: 10) }"#)
        .plugin("ws-echo", &p.ws_echo)
        .route("/panic", "panicky.panicky")
        .route("/slow", "panicky.slow")
        .route("/jobs/*", "jobs.jobs")
        .route_methods("/actuator/prometheus", "prometheus.metrics", &["GET"])
        .route("/health", "prometheus.health")
        .route("/ready", "prometheus.ready")
        .middleware("prometheus.requests")
        .extra("task_worker_num: 1")
        .extra(r#"events: { "order.paid": ["jobs.audit", "jobs.notify"] }"#)
        .extra(r#"timer: (enable: true, jobs: [(job: "jobs.tick", interval_ms: 100, immediate: true)])"#)
        .extra(r#"processes: { "relay": (component: "jobs.relay", num: 1, restart_interval_ms: 1000) }"#)
        .extra(r#"websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")])"#)
}

/// The path of a tool of Debian's prometheus package (see `common::tool`).
fn tool(name: &str) -> Option<PathBuf> {
    crate::common::tool(name, "prometheus")
}

fn scrape(server: &TestServer) -> Response {
    let resp = server.get("/actuator/prometheus");
    assert_eq!(resp.status, 200, "{resp:?}\n{}", server.logs());
    resp
}

/// 2xx, 4xx (a 404 and a 405), 5xx, a WebSocket echo, a task,
/// an event and a process message; then waits until the cron job and the task have run.
fn mixed_traffic(server: &TestServer) {
    for path in [
        "/hello",
        "/hello/ada",
        "/hello/bob",
        "/nope",
        "/panic",
        "/slow?ms=1",
    ] {
        server.get(path);
    }
    let mut conn = Conn::connect(server.addr());
    let resp = conn.request("POST /hello/ada HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(resp.status, 405);
    for path in ["/jobs/task?p=a", "/jobs/fire?p=b", "/jobs/send?p=c"] {
        assert_eq!(server.get(path).status, 200, "{path}\n{}", server.logs());
    }
    let stream = std::net::TcpStream::connect(server.addr()).unwrap();
    let (mut ws, _) =
        tungstenite::client(format!("ws://{}/ws/echo", server.addr()), stream).expect("upgrade");
    ws.send(tungstenite::Message::text("hi")).unwrap();
    // The relay process broadcasts `/jobs/send`'s message to every WebSocket connection: it
    // may come first when it is still on its way.
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) if t.as_str() == "hi" => break,
            tungstenite::Message::Text(t) if t.as_str() == "c" => {}
            other => panic!("expected the echo of hi, got {other:?}"),
        }
    }
    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let text = scrape(server).text();
        let has = |line: &str| {
            text.lines()
                .any(|l| l.starts_with(line) && !l.ends_with(" 0"))
        };
        if has("plughost_cron_runs_total{job=\"jobs.tick\"}")
            && has("plughost_tasks_completed_total{result=\"ok\"}")
            && has("plughost_events_completed_total{result=\"ok\"}")
            && has("plughost_worker_websocket_connections")
        {
            break;
        }
        assert!(Instant::now() < deadline, "jobs never ran:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ws);
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_metrics_route_renders_request_histograms_by_route_template_and_server_stats() {
    let server = TestServer::start(&config().render());
    mixed_traffic(&server);
    let resp = scrape(&server);
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = resp.text();
    assert!(text.ends_with('\n'), "{text}");
    // The route template, never the raw path; the status code; one HELP and TYPE per family.
    let ok = r#"{method="GET",route="/hello/{name}",status="200"}"#;
    assert_eq!(
        sample(&text, &format!("plughost_http_requests_total{ok}")),
        Some(2.0),
        "{text}"
    );
    assert!(!text.contains("/hello/ada"), "{text}");
    let bucket = r#"plughost_http_request_duration_seconds_bucket{method="GET",route="/hello/{name}",status="200",le="+Inf"}"#;
    assert_eq!(sample(&text, bucket), Some(2.0), "{text}");
    let count = format!("plughost_http_request_duration_seconds_count{ok}");
    assert_eq!(sample(&text, &count), Some(2.0), "{text}");
    let not_found = r#"plughost_http_requests_total{method="GET",route="unmatched",status="404"}"#;
    assert_eq!(sample(&text, not_found), Some(1.0), "{text}");
    let panic = r#"plughost_http_requests_total{method="GET",route="/panic",status="500"}"#;
    assert_eq!(sample(&text, panic), Some(1.0), "{text}");
    for family in [
        "plughost_http_request_duration_seconds",
        "plughost_http_requests_total",
        "plughost_worker_requests_total",
        "process_resident_memory_bytes",
    ] {
        assert_eq!(
            text.matches(&format!("# TYPE {family} ")).count(),
            1,
            "{family}:\n{text}"
        );
    }
    assert!(
        sample(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "process_open_fds").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, r#"plughost_worker_panics_total{worker="0"}"#).is_some(),
        "{text}"
    );
    assert_eq!(sample(&text, "plughost_ready"), Some(1.0), "{text}");
}

#[test]
fn ignored_status_codes_are_not_recorded() {
    let server = TestServer::start(
        &Config::hello()
            .plugin_config(
                "prometheus",
                &prom_artifacts().prometheus,
                r#"{ "requests": (ignored_status_codes: [404], status: "class") }"#,
            )
            .route("/metrics", "prometheus.metrics")
            .middleware("prometheus.requests")
            .render(),
    );
    server.get("/nope");
    server.get("/hello");
    let text = scrape_at(&server, "/metrics");
    assert!(!text.contains("status=\"4xx\""), "{text}");
    let ok = r#"plughost_http_requests_total{method="GET",route="/hello",status="2xx"}"#;
    assert_eq!(sample(&text, ok), Some(1.0), "{text}");
}

fn scrape_at(server: &TestServer, path: &str) -> String {
    let resp = server.get(path);
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.text()
}

#[test]
fn health_answers_and_ready_says_503_while_stopping() {
    let server = TestServer::start(&config().max_wait_time(10).render());
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/ready").status, 200);
    // A connection accepted before the stop that has not sent its request yet is still
    // answered during a graceful stop (an idle keep-alive one would be closed at once).
    let mut conn = Conn::connect(server.addr());
    // A slow request holds the stop open while /ready is asked.
    let slow_addr = server.addr();
    let slow = std::thread::spawn(move || get_close(slow_addr, "/slow?ms=3000"));
    server.wait_for_log("slow handler entered", Duration::from_secs(10));
    server.signal(libc::SIGTERM);
    server.wait_for_log("stopping (SIGTERM)", Duration::from_secs(10));
    let during = conn.request("GET /ready HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(during.status, 503, "{during:?}");
    assert!(during.text().contains("stopping"), "{during:?}");
    let _ = slow.join();
}

#[test]
fn promtool_accepts_a_scrape_after_mixed_traffic() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let server = TestServer::start(&config().render());
    mixed_traffic(&server);
    let text = scrape(&server).text();
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `prometheus` server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts prometheus scraping `target` every second, and waits until it is ready.
    fn start(binary: &Path, target: SocketAddr, dir: &Path) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: plughost\n    metrics_path: /actuator/prometheus\n\
                 \x20   static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // An ephemeral port: bound, read and released for prometheus to take.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: tempdir::Dir(dir),
        };
        let deadline = Instant::now() + PROM_WAIT;
        while std::net::TcpStream::connect(addr).is_err()
            || get_close(addr, "/-/ready").status != 200
        {
            assert!(Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// The first value of an instant query's result, once it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = get_close(self.addr, &format!("/api/v1/query?query={q}")).text();
        // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[t,"v"]}]}}
        let value = body.split("\"value\":[").nth(1)?;
        let v = value.split('"').nth(1)?;
        v.parse().ok()
    }
}

#[test]
fn a_real_prometheus_scrapes_the_server_and_answers_promql() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let server = TestServer::start(&config().render());
    let prom = Prometheus::start(&binary, server.addr(), server.dir().path());
    // Slow requests of 300 ms: the 0.25..0.5 s bucket.
    for _ in 0..4 {
        assert_eq!(server.get("/slow?ms=300").status, 200);
    }
    let deadline = Instant::now() + PROM_WAIT;
    let rate = "sum(rate(plughost_http_requests_total[5s])) > 0";
    let quantile = r#"histogram_quantile(0.5, sum by (le) (plughost_http_request_duration_seconds_bucket{route="/slow"}))"#;
    let (mut rated, mut q) = (None, None);
    while rated.is_none() || q.is_none() {
        assert!(
            Instant::now() < deadline,
            "no answer from prometheus: rate {rated:?}, quantile {q:?}"
        );
        server.get("/hello");
        rated = rated.or_else(|| prom.query(rate));
        q = q.or_else(|| prom.query(quantile));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rated.unwrap() > 0.0);
    let q = q.unwrap();
    assert!(q > 0.25 && q <= 0.5, "median of /slow?ms=300: {q}");
}
