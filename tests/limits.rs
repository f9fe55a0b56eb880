//! Request limits, timeouts and malformed input: each is answered (or the connection closed)
//! and the server goes on serving.

use std::{
    io::Write,
    thread,
    time::{Duration, Instant},
};

use crate::common::{get_request, Config, TestServer, HELLO_BODY};

fn many_headers(n: usize) -> String {
    let mut req = String::from("GET /hello HTTP/1.1\r\nHost: x\r\n");
    for i in 0..n {
        req += &format!("X-Header-{i}: value-{i}\r\n");
    }
    req + "\r\n"
}

fn big_header(value_len: usize) -> String {
    format!(
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(value_len)
    )
}

#[test]
fn head_over_max_header_bytes_is_431() {
    let server = Config::hello().limit("max_header_bytes", 4096).start();
    // Under the limit: served.
    let resp = server.conn().request(big_header(2000));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    // Over it.
    let resp = server.conn().request(big_header(6000));
    assert_eq!(resp.status, 431, "{resp:?}");
    server.assert_serving();
}

#[test]
fn head_over_max_header_bytes_without_end_is_431() {
    // A head that never ends must not be buffered forever either.
    let server = Config::hello().limit("max_header_bytes", 4096).start();
    let mut conn = server.conn();
    conn.send(format!(
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "a".repeat(8000)
    ));
    let resp = conn.read_response();
    assert_eq!(resp.status, 431, "{resp:?}");
    server.assert_serving();
}

#[test]
fn more_than_max_headers_is_431() {
    let server = Config::hello().limit("max_headers", 16).start();
    // Host + 10 headers: served.
    let resp = server.conn().request(many_headers(10));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    // Host + 20 headers: refused.
    let resp = server.conn().request(many_headers(20));
    assert_eq!(resp.status, 431, "{resp:?}");
    server.assert_serving();
}

#[test]
fn default_max_headers_is_64() {
    let server = Config::hello().start();
    let resp = server.conn().request(many_headers(50));
    assert_eq!(resp.status, 200, "{resp:?}");
    let resp = server.conn().request(many_headers(100));
    assert_eq!(resp.status, 431, "{resp:?}");
    server.assert_serving();
}

#[test]
fn content_length_over_max_body_bytes_is_413() {
    let server = Config::hello().limit("max_body_bytes", 1024).start();
    // At the limit: served.
    let mut conn = server.conn();
    let resp = conn.request(format!(
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n{}",
        "b".repeat(1024)
    ));
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    // Over it: answered from the head alone, without waiting for the body.
    let mut conn = server.conn();
    conn.send("POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n");
    let resp = conn.read_response();
    assert_eq!(resp.status, 413, "{resp:?}");
    server.assert_serving();
}

#[test]
fn chunked_body_over_max_body_bytes_is_413() {
    let server = Config::hello().limit("max_body_bytes", 1024).start();
    let mut conn = server.conn();
    // Two chunks of 800 bytes: each under the limit, together over it.
    let chunk = format!("320\r\n{}\r\n", "c".repeat(800));
    conn.send(format!(
        "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    ));
    let resp = conn.read_response();
    assert_eq!(resp.status, 413, "{resp:?}");
    server.assert_serving();
}

#[test]
fn slow_head_is_408_and_closed() {
    let server = Config::hello().limit("header_read_timeout_ms", 300).start();
    let mut conn = server.conn();
    let mut writer = conn.stream().try_clone().unwrap();
    let head = b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: yes\r\n\r\n";
    let started = Instant::now();
    // One byte every 100 ms: the head would take ~5 s, far beyond the 300 ms allowed.
    let drip = thread::spawn(move || {
        for b in head {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let resp = conn.read_response();
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 408, "after {elapsed:?}: {resp:?}");
    assert!(
        elapsed >= Duration::from_millis(250),
        "408 came after only {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "408 came after {elapsed:?}"
    );
    conn.expect_closed();
    drip.join().unwrap();
    server.assert_serving();
}

#[test]
fn idle_keep_alive_connection_is_closed_silently() {
    let server = Config::hello().limit("keepalive_timeout_ms", 300).start();
    let mut conn = server.conn();
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.status, 200, "{resp:?}");
    let idle = Instant::now();
    conn.expect_closed();
    let elapsed = idle.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed after only {elapsed:?} idle"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "closed after {elapsed:?} idle"
    );
    server.assert_serving();
}

#[test]
fn active_keep_alive_connection_outlives_the_idle_timeout() {
    // The idle timer restarts with every request.
    let server = Config::hello().limit("keepalive_timeout_ms", 600).start();
    let mut conn = server.conn();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let resp = conn.request(get_request("/hello"));
        assert_eq!(resp.status, 200, "after {:?}: {resp:?}", started.elapsed());
        thread::sleep(Duration::from_millis(200));
    }
}

/// Sends `raw` on a new connection; expects a 400 and the connection closed; then checks the
/// server still serves.
fn expect_400_and_close(server: &TestServer, raw: &str) {
    let mut conn = server.conn();
    conn.send(raw);
    let resp = match conn.try_read_response(false) {
        Ok(r) => r,
        Err(e) => panic!("request {raw:?}: {e}"),
    };
    assert_eq!(resp.status, 400, "request {raw:?} got {resp:?}");
    if let Err(e) = conn.try_expect_closed() {
        panic!("request {raw:?}: {e}");
    }
    server.assert_serving();
}

#[test]
fn garbage_request_line_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(&server, "this is not http\r\n\r\n");
}

#[test]
fn content_length_with_transfer_encoding_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(
        &server,
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
}

#[test]
fn differing_content_lengths_are_400() {
    let server = Config::hello().start();
    expect_400_and_close(
        &server,
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    );
}

#[test]
fn invalid_content_length_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(
        &server,
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    );
}

#[test]
fn bad_chunk_size_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(
        &server,
        "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
}

#[test]
fn unsupported_transfer_coding_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(
        &server,
        "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    );
}

#[test]
fn http11_without_host_is_400() {
    let server = Config::hello().start();
    expect_400_and_close(&server, "GET /hello HTTP/1.1\r\n\r\n");
}

#[test]
fn http10_without_host_is_fine() {
    let server = Config::hello().start();
    let mut conn = server.conn();
    let resp = conn.request("GET /hello HTTP/1.0\r\n\r\n");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
}

/// RFC 9110 §6.6.1: an origin server with a clock MUST send `date` in 2xx, 3xx and 4xx
/// responses; that includes the ones the HTTP layer makes itself.
#[test]
fn error_responses_carry_a_date_header() {
    let server = Config::hello()
        .limit("max_header_bytes", 4096)
        .limit("max_body_bytes", 1024)
        .start();
    let cases = [
        ("this is not http\r\n\r\n".to_owned(), 400),
        ("GET /hello HTTP/1.1\r\n\r\n".to_owned(), 400),
        (big_header(6000), 431),
        (
            "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".to_owned(),
            413,
        ),
        (get_request("/nope"), 404),
    ];
    let mut missing = Vec::new();
    for (raw, status) in cases {
        let resp = server.conn().request(&raw);
        assert_eq!(resp.status, status, "{raw:?}: {resp:?}");
        if resp.header("date").is_none() {
            missing.push(status);
        }
    }
    assert!(
        missing.is_empty(),
        "responses without a date header: {missing:?}"
    );
}

/// `info`'s count of requests refused for the body budget.
fn bodies_refused(server: &TestServer) -> u64 {
    let info = crate::common::run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    info.stdout
        .split(" refused (503)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refused count in {}", info.stdout))
}

/// 300 clients announce 1 MiB bodies and send none: memory follows the bytes received, and
/// past the server-wide body budget the announcements get 503 at once.
#[test]
fn announced_bodies_cost_no_memory_until_their_bytes_arrive() {
    let server = Config::hello()
        .limit("max_inflight_body_bytes", 32 << 20)
        .start();
    server.assert_serving();
    let before = server.server_rss_kb();
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut c = server.conn();
        c.send("POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n");
        conns.push(c);
    }
    // 32 fit the 32 MiB budget and wait for their bytes; the other 268 are refused at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bodies_refused(&server) < 268 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bodies_refused(&server), 268);
    let grown = server.server_rss_kb().saturating_sub(before);
    assert!(
        grown < 30 * 1024,
        "RSS grew by {grown} kB for 300 announced bodies"
    );
    // Once they go, a body that does arrive is served whole.
    drop(conns);
    let body = vec![b'x'; 1 << 20];
    let resp = loop {
        let mut c = server.conn();
        c.send("POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n");
        c.send(&body);
        let resp = c.read_response();
        if resp.status != 503 {
            break resp;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "{resp:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((resp.status, resp.text().as_str()), (200, HELLO_BODY));
}

/// The open connections `info` counts.
fn open_connections(server: &TestServer) -> u64 {
    let info = crate::common::run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    info.stdout
        .lines()
        .find_map(|l| l.strip_prefix("connections: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connections line in {}", info.stdout))
}

#[test]
fn a_client_that_never_reads_its_response_is_cut_after_the_send_timeout() {
    let a = crate::common::artifacts();
    let server = Config::hello()
        .plugin("panicky", &a.panicky)
        .route("/big", "panicky.big")
        .limit("send_timeout_ms", 300)
        .start();
    let mut c = server.conn();
    // 20 MB, far more than the socket buffers hold: the write blocks on a reader that never
    // reads.
    c.send("GET /big?n=20000000 HTTP/1.1\r\nHost: x\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_connections(&server) > 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled connection is still open 10 s later:\n{}",
            server.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // What the client gets is cut short: the connection ends before 20 MB arrived.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match std::io::Read::read(&mut c.stream(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got < 20_000_000, "got {got} bytes");
    server.assert_serving();
}

/// A connection that sends nothing is closed after the header timeout, not held for the
/// keep-alive timeout.
#[test]
fn a_silent_connection_is_closed_after_the_header_timeout() {
    let server = Config::hello()
        .limit("header_read_timeout_ms", 300)
        .limit("keepalive_timeout_ms", 60_000)
        .start();
    let conn = server.conn();
    conn.stream()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut conn.stream(), &mut buf);
    assert!(
        matches!(n, Ok(0)) && started.elapsed() < Duration::from_secs(20),
        "{n:?} after {:?}",
        started.elapsed()
    );
    server.assert_serving();
}

/// Out of file descriptors, the server closes its longest-idle keep-alive connections to
/// make room for new clients, and says so once a second.
#[test]
fn out_of_descriptors_the_oldest_idle_connections_make_room() {
    let server = Config::hello().workers(1).start();
    let pid = server.server_pid().to_string();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=48:48"])
        .status()
        .expect("prlimit runs");
    assert!(status.success());
    // Each client makes a request and stays, idle: past 48 descriptors, new clients are
    // only served because old idle ones are closed.
    let mut clients = Vec::new();
    for i in 0..80 {
        let mut c = server.conn();
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let resp = c
            .try_send(get_request("/hello"))
            .map_err(|e| e.to_string())
            .and_then(|()| c.try_read_response(false));
        match resp {
            Ok(r) => assert_eq!(r.status, 200, "client {i}: {r:?}"),
            Err(e) => panic!("client {i} was not served: {e}\n{}", server.logs()),
        }
        clients.push(c);
    }
    server.wait_for_log(
        "idle keep-alive connection(s) to make room",
        Duration::from_secs(10),
    );
}

/// The soft limit of open files is raised to the hard limit at start (every connection is a
/// descriptor; the usual soft limit is 1024), and a hard limit below
/// `websocket.max_connections` is warned about.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = crate::common::TestDir::new();
    dir.write_config(&Config::hello().render());
    let server = TestServer::start_wrapped(dir, &["prlimit", "--nofile=256:4096", "--"], &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.server_pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>()[3..5],
        ["4096", "4096"],
        "{line}"
    );
    assert!(
        server
            .logs()
            .contains("the open files limit (4096) is below websocket.max_connections (10000)"),
        "{}",
        server.logs()
    );
    server.assert_serving();
}
