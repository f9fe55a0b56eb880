//! The `info` command, run as a second process against a running server.

use std::{
    thread,
    time::{Duration, Instant},
};

use crate::common::{run_plughost, some_line_contains_all, Config};

#[test]
fn info_lists_plugins_components_workers_and_requests() {
    let server = Config::full().workers(2).start();
    // The control socket is for the server's owner only.
    let socket = server.dir().run_dir().join("plughost.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
    for _ in 0..3 {
        assert_eq!(server.get("/hello").status, 200);
    }
    let info = || {
        let out = run_plughost([
            "info".as_ref(),
            "-c".as_ref(),
            server.config_path().as_os_str(),
        ]);
        assert!(out.status.success(), "{out:?}");
        out.stdout
    };
    // The counters may trail the responses by a moment.
    let mut text = info();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.lines().any(|l| l.trim() == "requests: 3") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        text = info();
    }
    let text = &text;
    for plugin in ["hello", "timing", "panicky"] {
        assert!(
            text.contains(plugin),
            "info does not name plugin {plugin}:\n{text}"
        );
    }
    for component in ["http hello", "middleware timing", "http slow"] {
        assert!(
            some_line_contains_all(text, &[component]),
            "info does not list {component:?}:\n{text}"
        );
    }
    assert!(text.contains("workers: 2"), "info:\n{text}");
    assert!(
        text.lines().any(|l| l.trim() == "requests: 3"),
        "info does not count the 3 requests:\n{text}"
    );
}

/// The config the README starts (`config/server.ron`) stays valid and serves what the README
/// shows: the same file, pointed at debug builds, an ephemeral port and a temporary runtime
/// folder.
#[test]
fn the_demo_config_serves_what_the_readme_shows() {
    let a = crate::common::artifacts();
    crate::ws::ws_chat();
    crate::common::prom_artifacts();
    let debug = a.hello.parent().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(a.root.join("config/server.ron")).unwrap();
    assert!(
        text.contains("\"127.0.0.1:5200\""),
        "the README promises port 5200"
    );
    let text = text
        .replace("../target/release", &debug)
        .replace("\"127.0.0.1:5200\"", "\"127.0.0.1:0\"")
        .replace("runtime_dir: \"../run\"", "runtime_dir: \"@DIR@/run\"");
    let server = crate::common::TestServer::start(&text);
    let hello = server.get("/hello");
    assert_eq!(
        (hello.status, hello.text().as_str()),
        (200, "hello from plughost\n")
    );
    assert!(hello.header("x-response-time").is_some(), "{hello:?}");
    assert_eq!(server.get("/hello/ada").text(), "hello, ada!\n");
    let chat = server.get("/chat");
    assert_eq!(chat.status, 200);
    assert!(chat.text().contains("new WebSocket("));
    // The README's "Prometheus metrics": the middleware first, the metrics and the probes.
    let metrics = server.get("/actuator/prometheus");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text().contains(
            r#"plughost_http_requests_total{method="GET",route="/hello/{name}",status="200"} 1"#
        ),
        "{}",
        metrics.text()
    );
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/ready").status, 200);
    // The README's "Deferred and streamed responses".
    let slow = server.get("/hello/slow");
    assert_eq!(slow.status, 200, "{}", slow.text());
    assert!(slow.text().starts_with("slept 200 ms on task worker"));
    let events = server.get("/events?n=2&ms=10");
    assert!(
        events.text().ends_with("data: tick 2\n\n"),
        "{}",
        events.text()
    );
}

/// Keep-alive connections are evened out over the workers, whatever the kernel's hash did:
/// `info` shows each worker's open connections.
#[test]
fn open_connections_are_spread_evenly_over_the_workers() {
    let server = Config::hello().workers(2).start();
    let conns: Vec<_> = (0..40)
        .map(|_| crate::common::Conn::connect(server.addr()))
        .collect();
    let info = || {
        run_plughost([
            "info".as_ref(),
            "-c".as_ref(),
            server.config_path().as_os_str(),
        ])
        .stdout
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = info();
    while !text.lines().any(|l| l.trim() == "connections: 40") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        text = info();
    }
    let per_worker: Vec<u64> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("worker "))
        .map(|l| {
            let after = l.split(", ").nth(1).expect("requests, connections");
            after.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(per_worker.len(), 2, "{text}");
    assert_eq!(per_worker.iter().sum::<u64>(), 40, "{text}");
    let spread = per_worker.iter().max().unwrap() - per_worker.iter().min().unwrap();
    assert!(
        spread <= 2,
        "connections not evened out: {per_worker:?}\n{text}"
    );
    drop(conns);
}

/// Runs `cargo args` in `dir` with the workspace's target folder (its dependencies are
/// built already); panics with cargo's output when it fails.
fn cargo_in(dir: &std::path::Path, args: &[&str]) -> String {
    let target = crate::common::artifacts().root.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cargo {args:?} in {}:\n{text}",
        dir.display()
    );
    text
}

/// `plughost new` outside any workspace: the crate it makes passes its own test (through
/// plughost-test) and builds, and the config it added itself to (keeping its comment)
/// serves it.
#[test]
fn plughost_new_makes_a_plugin_that_tests_builds_and_serves() {
    use crate::common::{artifacts, TestDir, TestServer};
    let dir = TestDir::new();
    dir.write_config("// my app\n(\n    listen: \"127.0.0.1:0\",\n    worker_num: 1,\n)\n");
    let new = |args: &[&str]| {
        std::process::Command::new(&artifacts().plughost)
            .arg("new")
            .args(args)
            .current_dir(dir.path())
            .env("CARGO_TARGET_DIR", artifacts().root.join("target"))
            .output()
            .unwrap()
    };
    let bad = new(&["Greeter"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a crate name"));
    let out = new(&["greeter", "--config", "server.ron"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("added plugin \"greeter\""), "{stdout}");
    let config = std::fs::read_to_string(dir.config_path()).unwrap();
    assert!(config.starts_with("// my app\n"), "{config}");
    assert!(config.contains("handler: \"greeter.hello\""), "{config}");
    let again = new(&["greeter"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    let krate = dir.path().join("greeter");
    // The versions the workspace resolved (and built) already.
    std::fs::copy(
        artifacts().root.join("Cargo.lock"),
        krate.join("Cargo.lock"),
    )
    .unwrap();
    let tested = cargo_in(&krate, &["test"]);
    assert!(tested.contains("greets_by_name ... ok"), "{tested}");
    cargo_in(&krate, &["build"]);

    let server = TestServer::start_existing(dir.clone(), &[]);
    let resp = server.get("/greeter/ada");
    assert_eq!(resp.status, 200, "{}", server.logs());
    assert_eq!(resp.text(), "hello, ada! (#1 on worker 0)\n");
}
