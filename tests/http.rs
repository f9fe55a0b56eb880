//! HTTP/1.1 serving: responses, keep-alive, pipelining, bodies, HTTP/1.0, HEAD,
//! `Expect: 100-continue`, routing.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use crate::common::{
    get_request, is_http_date, run_plughost, Config, Conn, TestServer, HELLO_BODY,
};

#[test]
fn hello_is_served_with_date_length_and_timing_headers() {
    let server = Config::full().start();
    let resp = server.get("/hello");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.version, "HTTP/1.1", "{resp:?}");
    assert_eq!(resp.text(), HELLO_BODY);
    assert_eq!(resp.header("content-length"), Some("20"), "{resp:?}");
    assert_eq!(resp.headers_named("content-length").len(), 1, "{resp:?}");
    assert_eq!(resp.header("transfer-encoding"), None, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; charset=utf-8"),
        "{resp:?}"
    );
    let date = resp.header("date").expect("a date header");
    assert!(
        is_http_date(date),
        "date header {date:?} is not an IMF-fixdate"
    );
    let timing = resp
        .header("x-response-time")
        .expect("x-response-time from the timing middleware");
    let digits = timing
        .strip_suffix("us")
        .expect("x-response-time ends in us");
    assert!(
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
        "x-response-time {timing:?}"
    );
    assert!(resp.header("x-worker").is_some(), "{resp:?}");
    assert_eq!(resp.header("x-served"), Some("1"), "{resp:?}");
}

#[test]
fn no_timing_header_without_the_middleware() {
    let server = Config::hello().start();
    let resp = server.get("/hello");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), HELLO_BODY);
    assert_eq!(resp.header("x-response-time"), None, "{resp:?}");
}

#[test]
fn path_params_prefix_routes_and_queries() {
    let server = Config::hello().start();
    let resp = server.get("/hello/ada");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, ada!\n"),
        "{resp:?}"
    );
    // Parameters are passed percent-decoded.
    let resp = server.get("/hello/a%20b");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, a b!\n"),
        "{resp:?}"
    );
    // The query is not part of the path that is routed.
    let resp = server.get("/hello?x=1&y");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = server.get("/hello/bob?x=1");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, bob!\n"),
        "{resp:?}"
    );
    // Prefix route.
    for path in ["/static/a", "/static/a/b/c.txt"] {
        let resp = server.get(path);
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{path}: {resp:?}"
        );
    }
    // `/hello/{name}` matches one segment only.
    let resp = server.get("/hello/a/b");
    assert_eq!(resp.status, 404, "/hello/a/b: {resp:?}");
}

#[test]
fn greeting_comes_from_the_component_config() {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .plugin_config("hello", &a.hello, r#"{ "hello": (greeting: "hi") }"#)
        .start();
    let resp = server.get("/hello");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hi from plughost\n"),
        "{resp:?}"
    );
    let resp = server.get("/hello/ada");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hi, ada!\n"),
        "{resp:?}"
    );
}

#[test]
fn unknown_path_is_404() {
    let server = Config::hello().start();
    for path in ["/nope", "/", "/hellox", "/hello/a/b/c"] {
        let resp = server.get(path);
        assert_eq!(resp.status, 404, "{path}: {resp:?}");
    }
    server.assert_serving();
}

#[test]
fn wrong_method_is_405_with_allow() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request("POST /hello/ada HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(resp.status, 405, "{resp:?}");
    let allow = resp.header("allow").expect("405 carries an allow header");
    let methods: BTreeSet<String> = allow.split(',').map(|m| m.trim().to_owned()).collect();
    assert_eq!(
        methods,
        BTreeSet::from(["GET".to_owned(), "HEAD".to_owned()]),
        "allow: {allow:?}"
    );
    let resp = conn.request("DELETE /hello/ada HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(resp.status, 405, "{resp:?}");
    // A route without `methods` takes any method.
    let resp = conn.request("DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.request(get_request("/hello/ada"));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, ada!\n"),
        "{resp:?}"
    );
}

#[test]
fn requests_spread_over_workers() {
    let server = Config::hello().workers(2).start();
    // All connections open at once, then one request on each.
    let mut conns: Vec<Conn> = (0..32).map(|_| server.conn()).collect();
    for conn in &mut conns {
        conn.send(get_request("/hello"));
    }
    let mut workers = BTreeSet::new();
    for conn in &mut conns {
        let resp = conn.read_response();
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{resp:?}"
        );
        workers.insert(resp.header("x-worker").expect("x-worker").to_owned());
    }
    assert!(
        workers.len() > 1,
        "32 concurrent connections were all served by worker(s) {workers:?}"
    );
    assert!(
        workers.len() <= 2,
        "more worker ids than workers: {workers:?}"
    );
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let server = Config::hello().workers(1).start();
    let mut conn = server.conn();
    for i in 1..=5 {
        let resp = conn.request(get_request("/hello"));
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{resp:?}"
        );
        assert_eq!(
            resp.header("x-served"),
            Some(i.to_string().as_str()),
            "{resp:?}"
        );
        assert!(!resp.connection_has("close"), "request {i}: {resp:?}");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let batch = format!(
        "{}{}{}",
        get_request("/hello/one"),
        get_request("/hello/two"),
        get_request("/hello/three")
    );
    conn.send(batch);
    for name in ["one", "two", "three"] {
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.text(), format!("hello, {name}!\n"));
    }
    // Still usable afterwards.
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.text(), HELLO_BODY);
}

#[test]
fn content_length_body_is_consumed_before_the_next_request() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    conn.send(format!(
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world{}",
        get_request("/hello/next")
    ));
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, next!\n"),
        "{resp:?}"
    );
}

#[test]
fn chunked_request_body_is_accepted() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request(
        "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    // The connection stays usable, also with a chunked body and trailer pipelined with the
    // next request.
    conn.send(format!(
        "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         A\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n{}",
        get_request("/hello/after")
    ));
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, after!\n"),
        "{resp:?}"
    );
}

#[test]
fn chunked_body_sent_in_pieces_is_accepted() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    conn.send("POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    conn.send("3\r\nabc");
    conn.send("\r\n2\r\nde\r\n");
    conn.send("0\r\n\r\n");
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.status, 200, "{resp:?}");
}

#[test]
fn http10_request_closes_after_the_response() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request("GET /hello HTTP/1.0\r\n\r\n");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.version.starts_with("HTTP/1."), "{resp:?}");
    assert_eq!(resp.text(), HELLO_BODY);
    assert_eq!(
        resp.header("transfer-encoding"),
        None,
        "an HTTP/1.0 client cannot read chunked: {resp:?}"
    );
    conn.expect_closed();
}

#[test]
fn http10_keep_alive_keeps_the_connection() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    for _ in 0..2 {
        let resp = conn.request("GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{resp:?}"
        );
        assert_eq!(resp.header("content-length"), Some("20"), "{resp:?}");
        assert!(
            resp.connection_has("keep-alive"),
            "an HTTP/1.0 keep-alive response must say `connection: keep-alive`: {resp:?}"
        );
    }
}

#[test]
fn connection_close_closes_after_the_response() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request("GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    conn.expect_closed();
}

#[test]
fn head_has_headers_and_no_body() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    // HEAD pipelined with a GET: any body bytes after the HEAD response would corrupt the
    // GET's response.
    conn.send(format!(
        "HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n{}",
        get_request("/hello/after")
    ));
    let head = conn.read_response_for(true);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("20"), "{head:?}");
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, after!\n"),
        "HEAD response was followed by body bytes? {resp:?}"
    );
    // HEAD is allowed on the `methods: ["GET", "HEAD"]` route.
    let head = conn.request("HEAD /hello/ada HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("12"), "{head:?}");
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.text(), HELLO_BODY);
}

#[test]
fn expect_100_continue_gets_an_interim_response() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    conn.send(
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    // The body is not sent until the server says to go on.
    let interim = conn.read_response();
    assert_eq!(interim.status, 100, "{interim:?}");
    assert_eq!(interim.version, "HTTP/1.1", "{interim:?}");
    conn.send("hello");
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.request(get_request("/hello/again"));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, again!\n"),
        "{resp:?}"
    );
}

fn deny_middleware_answers_before_the_handler(timing_config: &str) {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .workers(1)
        .plugin_config("timing", &a.timing, timing_config)
        .middleware("timing.timing")
        .start();
    let mut conn = server.conn();
    let resp = conn.request("GET /hello HTTP/1.1\r\nHost: x\r\nX-Deny: 1\r\n\r\n");
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.text(), "denied by the timing middleware\n");
    // The handler did not run: its instance has served nothing yet.
    let resp = conn.request(get_request("/hello"));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    assert_eq!(resp.header("x-served"), Some("1"), "{resp:?}");
    assert!(resp.header("x-response-time").is_some(), "{resp:?}");
}

#[test]
fn middleware_can_answer_before_the_handler() {
    deny_middleware_answers_before_the_handler(r#"{ "timing": (deny_header: Some("x-deny")) }"#);
}

/// The form the timing plugin's docs give (`deny_header: "x-deny"` for an `Option<String>`).
#[test]
fn timing_config_in_the_documented_form_is_accepted() {
    deny_middleware_answers_before_the_handler(r#"{ "timing": (deny_header: "x-deny") }"#);
}

#[test]
fn transfer_coding_names_are_case_insensitive() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request(
        "POST /hello HTTP/1.1\r\nHost: x\r\ntransfer-encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let resp = conn.request(get_request("/hello/next"));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "hello, next!\n"),
        "{resp:?}"
    );
}

#[test]
fn many_pipelined_requests_are_all_answered_in_order() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let batch: String = (0..100)
        .map(|i| get_request(&format!("/hello/n{i}")))
        .collect();
    conn.send(batch);
    for i in 0..100 {
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "response {i}: {resp:?}");
        assert_eq!(resp.text(), format!("hello, n{i}!\n"), "response {i}");
    }
}

#[test]
fn connection_stays_usable_after_404_and_405() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    assert_eq!(conn.request(get_request("/nope")).status, 404);
    assert_eq!(
        conn.request("PUT /hello/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .status,
        405
    );
    let resp = conn.request(get_request("/hello"));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
}

/// Seconds since the epoch of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(value: &str) -> Option<i64> {
    let mut parts = value.split(' ');
    let _weekday = parts.next()?;
    let day: i64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|&mo| mo == month)? as i64 + 1;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Panics unless the response's date header is within a second of now.
#[track_caller]
fn assert_date_is_now(resp: &crate::common::Response) {
    let now = unix_now();
    let date = resp.header("date").expect("a date header");
    let parsed = parse_http_date(date).unwrap_or_else(|| panic!("unparsable date {date:?}"));
    assert!(
        (now - parsed).abs() <= 1,
        "the date header of a response received at {now} (unix) is {date:?} = {parsed}, {}s off",
        now - parsed
    );
}

#[test]
fn date_header_is_the_time_of_the_response() {
    let server = Config::full().start();
    let resp = server.get("/hello");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_date_is_now(&resp);
    // Also when the handler took a while.
    let resp = server.get("/slow?ms=2500");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "slept 2500\n"),
        "{resp:?}"
    );
    assert_date_is_now(&resp);
}

/// A response far larger than the socket's send buffer goes out whole (partial writes wait
/// for the socket to drain), and the connection serves the next request after it.
#[test]
fn a_large_response_is_written_whole() {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .plugin("panicky", &a.panicky)
        .route("/big", "panicky.big")
        .start();
    let mut conn = crate::common::Conn::connect(server.addr());
    let n = 20_000_000;
    let resp = conn.request(format!("GET /big?n={n} HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), n);
    assert!(resp
        .body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == b'0' + (i % 10) as u8));
    let resp = conn.request("GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(resp.status, 200);
}

/// The worker that answered.
fn worker_of(resp: &crate::common::Response) -> String {
    resp.header("x-worker")
        .unwrap_or_else(|| panic!("no x-worker header: {resp:?}"))
        .to_owned()
}

/// `worker N: ...` lines of `plughost info`, by worker id.
fn worker_info(server: &TestServer) -> Vec<String> {
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(info.status.success(), "{info:?}");
    info.stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("worker "))
        .map(str::to_owned)
        .collect()
}

/// Requests worker `w` has started, from `plughost info`.
fn requests_started(server: &TestServer, w: &str) -> u64 {
    let line = worker_info(server)
        .into_iter()
        .find(|l| l.starts_with(&format!("{w}:")))
        .unwrap_or_else(|| panic!("no info line for worker {w}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Two keep-alive connections served by the same worker, then one blocks that worker in a
/// slow handler; returns the server, the worker, the slow connection and the other one.
fn two_connections_on_one_worker(config: Config) -> (TestServer, String, Conn, Conn, Vec<Conn>) {
    let server = config.workers(2).start();
    let mut first = server.conn();
    let w = worker_of(&first.request(get_request("/hello")));
    let mut others = Vec::new();
    let second = loop {
        assert!(
            others.len() < 50,
            "no second connection landed on worker {w}"
        );
        let mut c = server.conn();
        if worker_of(&c.request(get_request("/hello"))) == w {
            break c;
        }
        others.push(c);
    };
    // The slow request has started once worker w counted it.
    let before = requests_started(&server, &w);
    first.send(get_request("/slow?ms=3000"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while requests_started(&server, &w) == before {
        assert!(Instant::now() < deadline, "the slow request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    (server, w, first, second, others)
}

/// A worker stuck in a slow handler does not hold up its other keep-alive connections: an
/// idle worker takes them over at their next request, and keeps serving them.
#[test]
fn an_idle_worker_takes_over_connections_waiting_on_a_stuck_one() {
    let (server, w, mut slow, mut waiting, _others) = two_connections_on_one_worker(Config::full());
    let resp = waiting.request(get_request("/hello"));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_ne!(
        worker_of(&resp),
        w,
        "answered by the stuck worker, after its slow handler"
    );
    // Answered while the slow handler still runs: its response has not come.
    slow.stream().set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = slow.stream().peek(&mut byte);
    assert!(
        matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow response came before the other connection was answered: {pending:?}"
    );
    slow.stream().set_nonblocking(false).unwrap();
    // The connection taken over keeps working, on its new worker.
    for _ in 0..3 {
        let resp = waiting.request(get_request("/hello"));
        assert_eq!(
            (resp.status, worker_of(&resp) != w),
            (200, true),
            "{resp:?}"
        );
    }
    let resp = slow.read_response();
    assert_eq!((resp.status, resp.text().as_str()), (200, "slept 3000\n"));
    let info = worker_info(&server);
    assert!(
        info.iter()
            .any(|l| !l.starts_with(&format!("{w}:")) && l.contains(" 1 connections taken over")),
        "{info:?}"
    );
    server.assert_serving();
}

/// With `steal_after_us: 0` connections stay on their worker: the same scene as above waits.
#[test]
fn with_stealing_off_a_stuck_worker_holds_up_its_connections() {
    let (_server, w, mut slow, mut waiting, _others) =
        two_connections_on_one_worker(Config::full().extra("steal_after_us: 0"));
    let resp = waiting.request(get_request("/hello"));
    assert_eq!((resp.status, worker_of(&resp)), (200, w));
    // It waited for the slow handler: the slow response was already sent (over loopback, so
    // it already sits in our socket) when this one came.
    slow.stream().set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let ready = slow.stream().peek(&mut byte);
    assert!(matches!(ready, Ok(1)), "{ready:?}");
    slow.stream().set_nonblocking(false).unwrap();
    let resp = slow.read_response();
    assert_eq!((resp.status, resp.text().as_str()), (200, "slept 3000\n"));
}

/// Many keep-alive clients, some requests slow, so workers stall and take connections over
/// from each other all the time: every response still answers its own request, and the
/// connections taken over keep working.
#[test]
fn connections_taken_over_under_load_each_get_their_own_answers() {
    let server = Config::full().workers(2).start();
    let addr = server.addr();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            std::thread::spawn(move || {
                let mut conn = Conn::connect(addr);
                for i in 0..60 {
                    if i % 10 == 3 {
                        let resp = conn.request(get_request("/slow?ms=20"));
                        assert_eq!((resp.status, resp.text().as_str()), (200, "slept 20\n"));
                        continue;
                    }
                    let name = format!("c{c}r{i}");
                    let resp = conn.request(get_request(&format!("/hello/{name}")));
                    assert_eq!(
                        (resp.status, resp.text()),
                        (200, format!("hello, {name}!\n")),
                        "client {c}, request {i}"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    let taken: u64 = worker_info(&server)
        .iter()
        .map(|l| {
            let n = l
                .split(", ")
                .find(|part| part.ends_with("connections taken over"))
                .unwrap();
            n.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert!(
        taken > 0,
        "no connection was taken over: {:?}",
        worker_info(&server)
    );
    server.assert_serving();
}

#[test]
fn two_host_headers_are_a_bad_request() {
    let server = Config::hello().start();
    let resp = server
        .conn()
        .request("GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert_eq!(resp.status, 400, "{resp:?}");
    server.assert_serving();
}

#[test]
fn close_wins_over_keep_alive_and_http10_with_a_transfer_coding_closes() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp =
        conn.request("GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close, keep-alive\r\n\r\n");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(resp.connection_has("close"), "{resp:?}");
    conn.expect_closed();
    let mut conn = server.conn();
    let resp = conn.request(
        "POST /hello HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.version, "HTTP/1.0", "{resp:?}");
    conn.expect_closed();
}

#[test]
fn a_get_route_says_head_in_its_405_allow() {
    let server = Config::hello()
        .route_methods("/get-only", "hello.hello", &["GET"])
        .start();
    let resp = server
        .conn()
        .request("POST /get-only HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(resp.status, 405, "{resp:?}");
    assert_eq!(resp.header("allow"), Some("GET, HEAD"), "{resp:?}");
}

#[test]
fn a_refusal_answers_in_the_requests_version() {
    let server = Config::hello().limit("max_body_bytes", 10).start();
    let resp = server
        .conn()
        .request("POST /hello HTTP/1.0\r\nContent-Length: 100\r\n\r\n");
    assert_eq!(resp.status, 413, "{resp:?}");
    assert_eq!(resp.version, "HTTP/1.0", "{resp:?}");
}

/// Bytes the client sends after a `Connection: close` request must not turn the close into
/// a reset that destroys the response still in flight: the server reads them away for a
/// moment before it closes.
#[test]
fn a_close_lingers_so_the_response_survives_what_the_client_still_sends() {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .plugin("panicky", &a.panicky)
        .route("/big", "panicky.big")
        .start();
    for _ in 0..3 {
        let mut conn = server.conn();
        let mut bytes =
            b"GET /big?n=4000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', 64 * 1024));
        conn.send(&bytes);
        // The client reads late: the response is still in the server's send buffer when the
        // server is done writing it.
        std::thread::sleep(Duration::from_millis(100));
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body.len(), 4_000_000);
    }
}

#[test]
fn a_chunked_body_cut_by_the_timeout_gets_408() {
    let server = Config::hello().limit("header_read_timeout_ms", 300).start();
    let mut conn = server.conn();
    conn.send("POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab");
    let resp = conn.read_response();
    assert_eq!(resp.status, 408, "{resp:?}");
}

#[test]
fn expect_100_continue_to_a_missing_route_gets_404_not_100() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    conn.send(
        "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let resp = conn.read_response();
    assert_eq!(resp.status, 404, "{resp:?}");
    // The body was never asked for: the connection closes instead of reading it as a request.
    conn.expect_closed();
}

#[test]
fn raising_max_header_bytes_by_reload_reaches_open_connections() {
    let config = Config::hello()
        .limit("max_header_bytes", 4096)
        .extra("reload: (inotify: true, debounce_ms: 100)");
    let server = config.start();
    let mut conn = server.conn();
    assert_eq!(conn.request(get_request("/hello")).status, 200);
    server
        .dir()
        .write_config(&config.clone().limit("max_header_bytes", 32768).render());
    server.wait_for_log("reloaded config on 2/2 workers", Duration::from_secs(30));
    let long = format!(
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = conn.request(long);
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
}

/// New connections that land in a stuck worker's listen backlog are accepted and served by
/// an idle worker, while the stuck one is still inside its slow handler.
#[test]
fn an_idle_worker_serves_new_connections_waiting_in_a_stuck_workers_backlog() {
    let server = Config::full().workers(2).start();
    let mut slow = server.conn();
    slow.send(get_request("/slow?ms=3000"));
    server.wait_for_log(
        "slow handler entered: sleeping 3000 ms",
        Duration::from_secs(10),
    );
    // 20 new connections: about half hash to the stuck worker's socket.
    for i in 0..20 {
        let resp = server.get("/hello");
        assert_eq!(resp.status, 200, "connection {i}: {resp:?}");
    }
    // All answered while the slow handler still runs: its response has not come.
    slow.stream().set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = slow.stream().peek(&mut byte);
    assert!(
        matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow response came before the new connections were answered: {pending:?}"
    );
    slow.stream().set_nonblocking(false).unwrap();
    let info = worker_info(&server);
    assert!(
        info.iter()
            .any(|l| !l.contains(" 0 accepted from a stalled worker's backlog")),
        "{info:?}"
    );
    let resp = slow.read_response();
    assert_eq!((resp.status, resp.text().as_str()), (200, "slept 3000\n"));
}

#[test]
fn paths_are_normalized_before_routing_and_params_decoded() {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .plugin("panicky", &a.panicky)
        .route("/count/*", "panicky.panicky")
        .start();
    // Dot segments go before routing: this is /hello, not /static/*.
    let resp = server.get("/static/../hello");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    // Encoded dots climbing above the root are refused.
    let resp = server.get("/static/%2e%2e/%2e%2e/etc/passwd");
    assert_eq!(resp.status, 400, "{resp:?}");
    let resp = server.get("/../hello");
    assert_eq!(resp.status, 400, "{resp:?}");
    // Route parameters reach the plugin decoded.
    let resp = server.get("/hello/ada%20lovelace");
    assert_eq!(resp.text(), "hello, ada lovelace!\n", "{resp:?}");
    // The plugin sees the normalized path, and the target as sent.
    let resp = server.get("/count/./a/%62?q=%2e");
    assert_eq!(resp.header("x-path"), Some("/count/a/b"), "{resp:?}");
    assert_eq!(
        resp.header("x-target"),
        Some("/count/./a/%62?q=%2e"),
        "{resp:?}"
    );
}
