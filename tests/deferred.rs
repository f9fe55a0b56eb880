//! Deferred and streamed responses through the real binary: hello's `/hello/slow` (completed
//! by a task worker) and `/events` (Server-Sent Events), and the `fixture-deferred` plugin
//! (plugins/fixtures/deferred) for dropped handles, timeouts, clients that leave, pipelining,
//! HTTP/1.0 and HEAD. Timing is asserted only as bounds noise cannot break.

use std::{
    io::Read,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use crate::{
    common::{
        artifacts, deferred_fixture, get_close, get_request, run_plughost, Config, Conn,
        TestServer, IO_TIMEOUT,
    },
    ws::chromium_dom,
};

/// The fixture on `/d/*`.
fn fixture(workers: u32) -> Config {
    Config::empty()
        .workers(workers)
        .plugin("deferred", deferred_fixture())
        .route("/d/*", "deferred.ctl")
}

/// hello with `/hello/slow` (a 200 ms task) and `/events`.
fn hello(workers: u32, task_workers: u32) -> Config {
    Config::empty()
        .workers(workers)
        .plugin_config("hello", &artifacts().hello, r#"{ "sleep": (ms: 200) }"#)
        .route("/hello", "hello.hello")
        .route("/hello/slow", "hello.slow")
        .route("/events", "hello.events")
        .route("/events/page", "hello.events")
        .extra(&format!("task_worker_num: {task_workers}"))
}

/// The token a `FIXTURE deferred token=T path=PATH` line gives, once it is logged.
fn deferred_token(server: &TestServer, path: &str) -> u64 {
    let needle = format!(" path={path}");
    let found = server.wait_for_log_matching(IO_TIMEOUT, |t| {
        t.lines()
            .any(|l| l.contains("FIXTURE deferred") && l.contains(&needle))
    });
    assert!(found, "{path} was not deferred:\n{}", server.logs());
    let logs = server.logs();
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("FIXTURE deferred") && l.contains(&needle))
        .unwrap();
    let token = line.split("token=").nth(1).unwrap();
    token.split_whitespace().next().unwrap().parse().unwrap()
}

/// 100 concurrent `/hello/slow` on 2 HTTP workers: every request is deferred to a task worker
/// that sleeps 200 ms, and the HTTP workers go on accepting meanwhile. Were the handler to
/// block its worker, at most 2 would be in flight and the whole would take 100 × 200 ms / 2
/// = 10 s; deferred, 10 task workers take about 2 s.
#[test]
fn slow_requests_are_completed_by_task_workers_without_holding_the_workers() {
    let server = hello(2, 10).start();
    let (n, addr) = (100, server.addr());
    let barrier = Arc::new(Barrier::new(n));
    let started = Instant::now();
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                let mut conn = Conn::connect(addr);
                conn.request(get_request("/hello/slow"))
            })
        })
        .collect();
    let responses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let took = started.elapsed();
    let mut most_in_flight = 0;
    for r in &responses {
        let text = r.text();
        assert_eq!(r.status, 200, "{text}\n{}", server.logs());
        assert!(text.starts_with("slept 200 ms on task worker"), "{text}");
        let seen: u64 = text
            .trim_end()
            .trim_end_matches(')')
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        most_in_flight = most_in_flight.max(seen);
    }
    eprintln!("100 x /hello/slow, 2 workers, 10 task workers: {took:?}, at most {most_in_flight} in flight");
    // Structural: more requests waited at once than there are HTTP workers.
    assert!(
        most_in_flight > 2,
        "at most {most_in_flight} requests were deferred at once"
    );
    // Loose: well under the 10 s the blocked workers would need.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// One worker: while a request waits for its deferred response, the worker answers another.
#[test]
fn the_worker_serves_others_while_a_response_is_deferred() {
    let server = fixture(1).start();
    let mut waiting = Conn::connect(server.addr());
    waiting.send(get_request("/d/later?ms=2000"));
    deferred_token(&server, "/d/later");
    let mut other = Conn::connect(server.addr());
    let quick = other.request(get_request("/d/quick"));
    assert_eq!(quick.text(), "quick\n");
    // The deferred one has not been answered yet.
    waiting.stream().set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        waiting.stream().peek(&mut byte).is_err(),
        "the deferred response came before the other request was answered"
    );
    waiting.stream().set_nonblocking(false).unwrap();
    let later = waiting.read_response();
    assert_eq!(later.status, 200);
    assert_eq!(later.text(), "later 2000\n");
    // Its own content type wins; a header the handler left on its response is kept.
    assert_eq!(
        later.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(later.header("x-placeholder"), Some("kept"));
    // Keep-alive goes on after it.
    assert_eq!(waiting.request(get_request("/d/quick")).text(), "quick\n");
}

/// A handle dropped unfinished answers 500, and so does one a panicking thread held; the
/// connection and the server go on.
#[test]
fn a_dropped_handle_answers_500() {
    let server = fixture(2).start();
    let mut conn = Conn::connect(server.addr());
    let dropped = conn.request(get_request("/d/drop"));
    assert_eq!(dropped.status, 500, "{}", dropped.text());
    let panicked = conn.request(get_request("/d/panic"));
    assert_eq!(panicked.status, 500, "{}", panicked.text());
    assert_eq!(conn.request(get_request("/d/quick")).text(), "quick\n");
    server.wait_for_log("its handle was dropped unfinished", IO_TIMEOUT);
    server.wait_for_log(
        "fixture: a thread holding a deferred response panics",
        IO_TIMEOUT,
    );
    assert_eq!(get_close(server.addr(), "/d/quick").text(), "quick\n");
}

/// Nobody completes it: 504 after `limits.defer_timeout_ms`, and keep-alive goes on; a
/// stream silent for as long is cut.
#[test]
fn a_response_nobody_completes_times_out_with_504() {
    let server = fixture(2).limit("defer_timeout_ms", 300).start();
    let mut conn = Conn::connect(server.addr());
    let started = Instant::now();
    let r = conn.request(get_request("/d/forget"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(conn.request(get_request("/d/quick")).text(), "quick\n");
    // A started stream that then sends nothing for as long is cut: no last chunk.
    let mut silent = Conn::connect(server.addr());
    silent.send(get_request("/d/silent"));
    silent.read_raw_until(b"first\n").unwrap();
    let cut = silent.read_raw_until(b"0\r\n\r\n").unwrap_err();
    assert!(cut.starts_with("closed before"), "{cut}");
    // And a dropped one, for `info`, which counts how they ended.
    assert_eq!(conn.request(get_request("/d/drop")).status, 500);
    let later = conn.request(get_request("/d/later?ms=1"));
    assert_eq!(later.text(), "later 1\n");
    let info = run_plughost([
        "info".as_ref(),
        "-c".as_ref(),
        server.config_path().as_os_str(),
    ]);
    assert!(
        info.stdout.contains(
            "deferred responses: 0 open, 1 answered, 2 timed out, 1 dropped unfinished, 0 clients gone, 0 cut by a stop"
        ),
        "info:\n{}",
        info.stdout
    );
}

/// A client that leaves while its response is deferred (or streamed) closes it: `is_closed`
/// says so, and `write_chunk` fails.
#[test]
fn a_client_that_leaves_closes_its_deferred_response() {
    let server = fixture(2).start();
    let mut conn = Conn::connect(server.addr());
    conn.send(get_request("/d/watch"));
    let token = deferred_token(&server, "/d/watch");
    drop(conn);
    server.wait_for_log(&format!("FIXTURE closed token={token}"), IO_TIMEOUT);

    let mut conn = Conn::connect(server.addr());
    conn.send(get_request("/d/gone"));
    let token = deferred_token(&server, "/d/gone");
    let head = conn.read_raw_until(b"chunk 1\n").unwrap();
    let head = String::from_utf8_lossy(&head);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    drop(conn);
    server.wait_for_log(&format!("FIXTURE gone token={token} after="), IO_TIMEOUT);
    assert_eq!(get_close(server.addr(), "/d/quick").text(), "quick\n");
}

/// Requests pipelined behind a deferred one are answered after it, in order.
#[test]
fn pipelined_requests_wait_for_the_deferred_one_before_them() {
    let server = fixture(1).start();
    let mut conn = Conn::connect(server.addr());
    conn.send(format!(
        "{}{}{}",
        get_request("/d/later?ms=300"),
        get_request("/d/quick"),
        get_request("/d/stream?n=2")
    ));
    assert_eq!(conn.read_response().text(), "later 300\n");
    assert_eq!(conn.read_response().text(), "quick\n");
    assert_eq!(conn.read_response().text(), "c1\nc2\n");
}

/// HTTP/1.0 gets a stream delimited by the connection's close; HEAD gets the head only and
/// the connection stays.
#[test]
fn streams_in_http10_and_head() {
    let server = fixture(2).start();
    let mut conn = Conn::connect(server.addr());
    let r = conn.request("GET /d/stream?n=3 HTTP/1.0\r\n\r\n");
    assert_eq!(r.version, "HTTP/1.0");
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.text(), "c1\nc2\nc3\n");

    let mut conn = Conn::connect(server.addr());
    let head = conn.request("HEAD /d/stream?n=3 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(conn.request(get_request("/d/quick")).text(), "quick\n");
}

/// `/events` streams a tick every 100 ms as Server-Sent Events to a plain client, then ends
/// (chunked, so the connection stays).
#[test]
fn server_sent_events_reach_a_raw_client() {
    let server = hello(2, 1).start();
    let mut conn = Conn::connect(server.addr());
    let started = Instant::now();
    conn.send(get_request("/events?n=3&ms=100"));
    let head = conn.read_raw_until(b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut data = Vec::new();
    let mut raw = Vec::new();
    while data.len() < 3 {
        let part = conn.read_raw_until(b"\n\n").unwrap();
        raw.extend_from_slice(&part);
        let text = String::from_utf8_lossy(&part).into_owned();
        data.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned),
        );
    }
    assert_eq!(data, ["tick 1", "tick 2", "tick 3"]);
    // Three ticks 100 ms apart cannot come sooner.
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The last chunk ends the body; the connection serves the next request.
    conn.read_raw_until(b"0\r\n\r\n").unwrap();
    let hello = conn.request(get_request("/hello"));
    assert_eq!(hello.text(), "hello from plughost\n");
    // With curl, when it is installed: it prints the events as they come.
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "10"])
        .arg(format!("http://{}/events?n=2&ms=50", server.addr()))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("data: tick 1\n\n") && text.contains("data: tick 2\n\n"),
            "curl got {text:?}"
        );
    }
}

/// A browser's `EventSource` reads the same stream (headless Chromium loads a page from
/// hello that lists the ticks it receives).
#[test]
fn server_sent_events_reach_chromiums_event_source() {
    let server = hello(2, 1).start();
    let url = format!("http://{}/events/page?n=3", server.addr());
    let Some(dom) = chromium_dom(&server, &url, |dom| {
        dom.contains(r#"<p id="status">done</p>"#)
    }) else {
        return;
    };
    assert!(
        dom.contains(r#"<p id="status">done</p>"#),
        "the page did not get its 3 ticks:\n{dom}"
    );
    for i in 1..=3 {
        assert!(dom.contains(&format!("<li>tick {i}</li>")), "{dom}");
    }
}

/// A graceful stop answers a deferred response still waiting with 503 before
/// `max_wait_time` runs out, and exits.
#[test]
fn a_stop_answers_a_waiting_deferred_response_with_503() {
    let mut server = fixture(1).max_wait_time(1).start();
    let mut conn = Conn::connect(server.addr());
    conn.send(get_request("/d/forget"));
    deferred_token(&server, "/d/forget");
    server.signal(libc::SIGTERM);
    let r = conn.read_response();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.connection_has("close"));
    let mut rest = Vec::new();
    let _ = conn.stream().read_to_end(&mut rest);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

/// A stop ends a started stream at once, with its last chunk (it might never end), and the
/// writer sees `Closed`.
#[test]
fn a_stop_ends_a_stream_at_once() {
    let mut server = fixture(1).max_wait_time(3).start();
    let mut conn = Conn::connect(server.addr());
    conn.send(get_request("/d/gone"));
    let token = deferred_token(&server, "/d/gone");
    conn.read_raw_until(b"chunk 1\n").unwrap();
    let asked = Instant::now();
    server.signal(libc::SIGTERM);
    // The rest of the chunked body, up to its last chunk.
    conn.read_raw_until(b"\r\n0\r\n\r\n").unwrap();
    let took = asked.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "the stream ended after {took:?}"
    );
    server.wait_for_log(&format!("FIXTURE gone token={token} after="), IO_TIMEOUT);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

/// A response deferred by one version of a plugin is completed by the next one, after a
/// reload replaced the first, through its token.
#[test]
fn a_response_deferred_before_a_reload_is_completed_after_it() {
    let server = fixture(1).start();
    let mut conn = Conn::connect(server.addr());
    conn.send(get_request("/d/forget"));
    let token = deferred_token(&server, "/d/forget");
    server.signal(libc::SIGUSR1);
    server.wait_for_log("reloaded plugin deferred on 1/1 workers", IO_TIMEOUT);
    let other = get_close(server.addr(), &format!("/d/complete?token={token}"));
    assert_eq!(other.text(), "Ok(())\n");
    let r = conn.read_response();
    assert_eq!((r.status, r.text().as_str()), (200, "completed by token\n"));
    // Done: the token completes nothing any more.
    let again = get_close(server.addr(), &format!("/d/complete?token={token}"));
    assert_eq!(again.text(), "Err(Closed)\n");
}
