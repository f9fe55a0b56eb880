//! Tests that send signals to the server or use its pid file: pid file handling, graceful
//! stop on SIGTERM, and the `stop` and `reload` commands.

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{
    get_request, run_plughost, start_existing_expect_failure, CmdOutput, Config, TestDir,
    TestServer, HELLO_BODY,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

fn read_pid_file(dir: &TestDir) -> String {
    std::fs::read_to_string(dir.pid_file())
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.pid_file().display()))
        .trim()
        .to_owned()
}

fn is_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn plughost_cmd(cmd: &str, server: &TestServer) -> CmdOutput {
    run_plughost([
        cmd.as_ref(),
        "-c".as_ref(),
        server.config_path().as_os_str(),
    ])
}

#[test]
fn pid_file_holds_the_server_pid() {
    let server = Config::hello().start();
    assert_eq!(read_pid_file(server.dir()), server.pid().to_string());
    server.assert_serving();
}

#[test]
fn second_start_with_the_same_config_is_refused() {
    let server = Config::hello().start();
    let (status, stderr) = start_existing_expect_failure(server.dir(), &[]);
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("already running"),
        "stderr does not say it is already running:\n{stderr}"
    );
    // The first server is untouched.
    assert_eq!(read_pid_file(server.dir()), server.pid().to_string());
    server.assert_serving();
}

#[test]
fn stale_pid_file_is_replaced_with_a_warning() {
    let mut stale: i32 = 999_999;
    while is_alive(stale) {
        stale -= 1;
    }
    let dir = TestDir::new();
    std::fs::create_dir_all(dir.run_dir()).unwrap();
    std::fs::write(dir.pid_file(), format!("{stale}\n")).unwrap();
    let server = TestServer::start_in(dir, &Config::hello().render(), &[]);
    let warned =
        server.wait_for_log_matching(LOG_WAIT, |logs| logs.to_lowercase().contains("stale"));
    assert!(
        warned,
        "no warning about the stale pid file:\n{}",
        server.logs()
    );
    assert_eq!(read_pid_file(server.dir()), server.pid().to_string());
    server.assert_serving();
}

#[test]
fn a_failed_start_with_ignore_leaves_the_running_servers_pid_file() {
    let first = Config::hello().start();
    // Same runtime dir, and the port the first server holds: the second cannot bind.
    let mut config = Config::hello();
    config.listen = first.addr().to_string();
    first.dir().write_config(&config.render());
    let (status, stderr) = start_existing_expect_failure(first.dir(), &["-i"]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert_eq!(read_pid_file(first.dir()), first.pid().to_string());
    first.assert_serving();
    let info = plughost_cmd("info", &first);
    assert!(info.status.success(), "{info:?}");
    assert!(
        info.stdout
            .contains(&format!("supervisor: pid {},", first.pid())),
        "{}",
        info.stdout
    );
}

#[test]
fn ignore_flag_skips_the_pid_check() {
    let first = Config::hello().start();
    // Same config (same runtime dir and pid file), ephemeral port, so only the pid check
    // could stop it.
    let second = TestServer::start_existing(first.dir().clone(), &["-i"]);
    assert_ne!(first.addr(), second.addr());
    first.assert_serving();
    second.assert_serving();
}

#[test]
fn sigterm_lets_the_in_flight_request_finish() {
    let mut server = Config::full().max_wait_time(5).start();
    let mut conn = server.conn();
    // A first request on the connection, so it is surely accepted and being served.
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.status, 200, "{resp:?}");
    conn.send(get_request("/slow?ms=1000"));
    // The signal lands while the request is inside its (1 s) handler.
    server.wait_for_log("slow handler entered: sleeping 1000 ms", LOG_WAIT);
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let resp = conn.read_response();
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "slept 1000\n"),
        "{resp:?}"
    );
    let status = server
        .wait_exit(Duration::from_secs(5 + 5))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", server.logs()));
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{}",
        server.logs()
    );
    assert!(signalled.elapsed() < Duration::from_secs(10));
    // The hooks' stop callbacks ran, and the pid file is gone.
    assert!(
        server.logs().contains("server stopping"),
        "on_server_stop did not run:\n{}",
        server.logs()
    );
    assert!(!server.dir().pid_file().exists(), "pid file left behind");
}

#[test]
fn sigterm_gives_up_after_max_wait_time() {
    let mut server = Config::full().max_wait_time(1).start();
    let mut conn = server.conn();
    let resp = conn.request(get_request("/hello"));
    assert_eq!(resp.status, 200, "{resp:?}");
    conn.send(get_request("/slow?ms=8000"));
    server.wait_for_log("slow handler entered: sleeping 8000 ms", LOG_WAIT);
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(6));
    let waited = signalled.elapsed();
    assert!(
        status.is_some(),
        "still running {waited:?} after SIGTERM with max_wait_time 1 and a request in flight:\n{}",
        server.logs()
    );
    assert!(
        waited >= Duration::from_millis(800),
        "exited after {waited:?}, without waiting max_wait_time for the in-flight request"
    );
}

#[test]
fn sigterm_on_an_idle_server_exits_promptly() {
    let mut server = Config::hello().start();
    server.assert_serving();
    // An idle keep-alive connection must not hold the stop up for max_wait_time.
    let mut idle = server.conn();
    assert_eq!(idle.request(get_request("/hello")).status, 200);
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", server.logs()));
    assert!(status.success(), "exit status {status}:\n{}", server.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "an idle server took {:?} to stop",
        signalled.elapsed()
    );
}

#[test]
fn stop_command_stops_the_server() {
    let mut server = Config::hello().start();
    server.assert_serving();
    let pid_file = server.dir().pid_file();
    assert!(pid_file.exists());
    // `stop` waits for the process to be gone; the server is our child, so reap it while
    // `stop` runs (an unreaped zombie would still look alive to it).
    let config = server.config_path();
    let stop =
        thread::spawn(move || run_plughost(["stop".as_ref(), "-c".as_ref(), config.as_os_str()]));
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after `stop`:\n{}", server.logs()));
    assert!(status.success(), "exit status {status}:\n{}", server.logs());
    let out = stop.join().expect("the stop thread");
    assert!(
        out.status.success(),
        "{out:?}\n--- server log ---\n{}",
        server.logs()
    );
    assert!(!pid_file.exists(), "pid file left behind after stop");
}

#[test]
fn stop_without_a_running_server_fails() {
    let dir = TestDir::new();
    let config = dir.write_config(&Config::hello().render());
    let out = run_plughost(["stop".as_ref(), "-c".as_ref(), config.as_os_str()]);
    assert!(!out.status.success(), "{out:?}");
}

#[test]
fn reload_command_signals_the_server() {
    let server = Config::full().start();
    let before = server.get("/hello");
    assert_eq!(before.status, 200);
    let before = server.logs().len();
    assert!(
        !server.logs().to_lowercase().contains("reload"),
        "the log mentions reload before any was asked for:\n{}",
        server.logs()
    );
    let out = plughost_cmd("reload", &server);
    assert!(out.status.success(), "{out:?}");
    let ok = server.wait_for_log_matching(LOG_WAIT, |logs| {
        logs[before..]
            .lines()
            .any(|l| l.to_lowercase().contains("reload"))
    });
    assert!(ok, "no log line mentions reload:\n{}", server.logs());
    // Still serving after the reload.
    let resp = server.get("/hello");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
}

/// `start -d` returns once the server serves, says where, and logs to the runtime folder;
/// `stop` then ends the background server.
#[test]
fn daemonized_start_returns_when_serving_and_stop_ends_it() {
    let dir = TestDir::new();
    let config = dir.write_config(&Config::hello().render());
    let out = run_plughost([
        "start".as_ref(),
        "-d".as_ref(),
        "-c".as_ref(),
        config.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stdout
            .contains("started in the background: listening on http://"),
        "{out:?}"
    );
    let addr = common::parse_listen_addr(&out.stdout).expect("address in the output");
    let pid: i32 = read_pid_file(&dir).parse().unwrap();
    assert!(is_alive(pid));
    let resp = common::get_close(addr, "/hello");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), HELLO_BODY);
    let log = std::fs::read_to_string(dir.run_dir().join("plughost.log")).unwrap();
    assert!(log.contains("ready: listening on"), "{log}");

    let stop = run_plughost(["stop".as_ref(), "-c".as_ref(), config.as_os_str()]);
    assert!(stop.status.success(), "{stop:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_alive(pid), "the background server outlived stop");
    assert!(!dir.pid_file().exists(), "pid file left behind");
}

/// A background start that cannot serve reports why on the terminal and exits non-zero.
#[test]
fn daemonized_start_reports_a_failure() {
    let a = common::artifacts();
    let dir = TestDir::new();
    let config = dir.write_config(
        &Config::hello()
            .plugin("failing", &a.failing)
            .route("/f", "failing.failing")
            .render(),
    );
    let out = run_plughost([
        "start".as_ref(),
        "-d".as_ref(),
        "-c".as_ref(),
        config.as_os_str(),
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("db.invalid"), "{out:?}");
}

/// An edit the running server refused must not lock the user out: `info` and `stop` still
/// reach the server through the runtime folder the broken config names.
#[test]
fn stop_and_info_work_with_a_config_that_no_longer_validates() {
    let server = TestServer::start(&Config::hello().render());
    let config = server.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("worker_num", "colour: 3,\n    worker_num", 1),
    )
    .unwrap();
    let info = plughost_cmd("info", &server);
    assert!(info.status.success(), "{info:?}");
    assert!(
        info.stderr.contains("warning") && info.stderr.contains("colour"),
        "{info:?}"
    );
    assert!(info.stdout.contains("workers: 2"), "{info:?}");
    let stop = plughost_cmd("stop", &server);
    assert!(stop.status.success(), "{stop:?}");
    assert!(stop.stdout.contains("plughost stopped"), "{stop:?}");
}

/// 20 requests on 20 connections while both workers are busy: SIGTERM serves every one the
/// kernel already accepted (those in the listen backlog too) before the server exits.
#[test]
fn sigterm_serves_the_connections_waiting_in_the_backlog() {
    let mut server = Config::full().max_wait_time(20).start();
    let addr = server.addr();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = common::Conn::connect(addr);
                c.try_send(get_request("/slow?ms=200"))
                    .map_err(|e| e.to_string())
                    .and_then(|()| c.try_read_response(false))
                    .map(|r| r.status)
            })
        })
        .collect();
    // Both workers are inside a slow handler; the other connections wait in the backlog.
    assert!(
        server.wait_for_log_matching(LOG_WAIT, |t| t.matches("slow handler entered").count() >= 2)
    );
    server.signal(libc::SIGTERM);
    let statuses: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = statuses.iter().filter(|s| **s == Ok(200)).count();
    assert_eq!(ok, 20, "{statuses:?}\n{}", server.logs());
    let status = server.wait_exit(Duration::from_secs(30)).expect("stopped");
    assert!(status.success(), "{}", server.logs());
}
