//! The supervisor through the real binary: a plugin that segfaults, aborts, exits or
//! overflows its stack takes its server process down, the supervisor says how and where, and
//! a new server process serves on the same sockets; a crash loop stops the supervisor; a
//! restart under load refuses and fails no request.

use std::{
    io::ErrorKind,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::common::{
    artifacts, get_close, run_plughost, Config, Conn, TestServer, HELLO_BODY, IO_TIMEOUT,
};

fn crash_config() -> Config {
    let a = artifacts();
    Config::hello()
        .plugin("panicky", &a.panicky)
        .route("/crash/*", "panicky.crash")
}

/// GETs `path` on a new connection, expecting no answer: the server process dies serving it.
fn crash(addr: SocketAddr, path: &str) {
    let mut conn = Conn::connect(addr);
    conn.send(format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    ));
    assert!(
        conn.try_read_response(false).is_err(),
        "{path} answered instead of crashing the server process"
    );
}

/// Waits until `/hello` is served again (by the new server process).
fn wait_serving(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = Conn::connect(server.addr());
        let ok = conn
            .try_send("GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .is_ok()
            && conn
                .try_read_response(false)
                .is_ok_and(|r| r.status == 200 && r.text() == HELLO_BODY);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not serving again 10 s after the crash:\n{}",
            server.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn info(server: &TestServer) -> String {
    run_plughost(["info", "-c", &server.config_path().to_string_lossy()]).stdout
}

/// The server process's pid, as `info` says.
fn server_pid(server: &TestServer) -> String {
    info(server)
        .lines()
        .find_map(|l| l.strip_prefix("pid: "))
        .expect("a pid line")
        .to_owned()
}

fn survives(path: &str, how: &str) {
    let server = crash_config().start();
    assert_eq!(get_close(server.addr(), "/crash/ok").text(), "alive\n");
    let before = server_pid(&server);
    crash(server.addr(), path);
    wait_serving(&server);
    // The new server process is ready (its control socket too) once it logged so.
    assert!(
        server.wait_for_log_matching(IO_TIMEOUT, |t| t.matches("ready: listening on").count()
            >= 2),
        "{}",
        server.logs()
    );
    let logs = server.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&format!("server process {before} {how}")))
        .unwrap_or_else(|| panic!("no line says the server process {how}:\n{logs}"));
    assert!(
        line.contains("was inside panicky.crash (http)"),
        "the crash line does not name the component:\n{line}"
    );
    let after = info(&server);
    assert!(
        after.contains("restarts 1, last crash: server process"),
        "{after}"
    );
    assert_ne!(server_pid(&server), before);
    // The supervisor (the process the test started) is still the one running.
    assert!(
        after.contains(&format!("supervisor: pid {},", server.pid())),
        "{after}"
    );
}

#[test]
fn a_segfault_in_a_plugin_costs_one_server_process() {
    survives("/crash/segv", "died of SIGSEGV (signal 11)");
}

#[test]
fn an_abort_in_a_plugin_costs_one_server_process() {
    survives("/crash/abort", "died of SIGABRT (signal 6)");
}

#[test]
fn an_exit_in_a_plugin_costs_one_server_process() {
    survives("/crash/exit", "exited with status 3");
}

#[test]
fn a_stack_overflow_in_a_plugin_costs_one_server_process() {
    survives("/crash/overflow", "died of SIGABRT (signal 6)");
}

#[test]
fn a_crash_loop_stops_the_supervisor_with_status_70() {
    let mut server = crash_config()
        .extra("supervisor: (max_crashes: 3, crash_window_secs: 60)")
        .start();
    for i in 0..3 {
        if i > 0 {
            wait_serving(&server);
        }
        crash(server.addr(), "/crash/segv");
    }
    let status = server
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the supervisor still runs:\n{}", server.logs()));
    assert_eq!(status.code(), Some(70), "{}", server.logs());
    assert!(
        server
            .logs()
            .contains("crashed 3 times within 60s: giving up"),
        "{}",
        server.logs()
    );
    assert!(!server.dir().pid_file().exists(), "pid file left behind");
}

/// Requests keep coming on keep-alive and on new connections while `plughost restart`
/// hands the sockets to a new server process: none fails, none is refused.
#[test]
fn a_restart_under_load_fails_no_request() {
    let server = Config::hello().max_wait_time(5).start();
    let addr = server.addr();
    let before = server_pid(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for keep_alive in [true, true, true, false, false] {
        let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
        clients.push(thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn: Option<Conn> = None;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let c = conn.get_or_insert_with(|| Conn::connect(addr));
                let close = if keep_alive {
                    ""
                } else {
                    "Connection: close\r\n"
                };
                let sent = c.try_send(format!("GET /hello HTTP/1.1\r\nHost: t\r\n{close}\r\n"));
                let resp = sent
                    .map_err(|e| e.to_string())
                    .and_then(|()| c.try_read_response(false));
                match resp {
                    Ok(r) if r.status == 200 && r.text() == HELLO_BODY => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        // The draining server answers `connection: close`: reconnect then.
                        if !keep_alive || r.connection_has("close") {
                            conn = None;
                        }
                    }
                    Ok(r) => {
                        errors.lock().unwrap().push(format!("{r:?}"));
                        conn = None;
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        conn = None;
                    }
                }
            }
        }));
    }
    // Load before, during and after the restart.
    while ok.load(Ordering::Relaxed) < 200 {
        thread::sleep(Duration::from_millis(10));
    }
    let out = run_plughost(["restart", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}\n{}", server.logs());
    assert!(out.stdout.contains("plughost restarted"), "{out:?}");
    let at_restart = ok.load(Ordering::Relaxed);
    server.wait_for_log("drained and exited with status 0", Duration::from_secs(20));
    while ok.load(Ordering::Relaxed) < at_restart + 200 {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        errors.len(),
        ok.load(Ordering::Relaxed),
        &errors[..errors.len().min(5)],
        server.logs()
    );
    assert_ne!(server_pid(&server), before);
    // A connection refused would have shown as an error above; say it plainly too.
    let refused = std::net::TcpStream::connect(addr).map_err(|e| e.kind());
    assert_ne!(refused.err(), Some(ErrorKind::ConnectionRefused));
}
