//! `server.ron` errors make `start` fail with a message that says where and what.

use crate::common::{artifacts, run_plughost, start_expect_failure, Config};

/// Panics unless `stderr` contains `server.ron:LINE:COL` (COL a number).
fn assert_position(stderr: &str, line: u32) {
    let needle = format!("server.ron:{line}:");
    let ok = stderr.match_indices(&needle).any(|(i, _)| {
        stderr[i + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    });
    assert!(
        ok,
        "stderr does not point at server.ron:{line}:COL:\n{stderr}"
    );
}

fn hello_path() -> String {
    artifacts().hello.to_string_lossy().into_owned()
}

#[test]
fn syntax_error_reports_line_and_column() {
    let config = format!(
        "(\n    listen: \"127.0.0.1:0\",\n    worker_num: ,\n    runtime_dir: \"@DIR@/run\",\n    plugins: {{ \"hello\": (path: {:?}) }},\n)\n",
        hello_path()
    );
    assert_eq!(config.lines().nth(2), Some("    worker_num: ,"));
    let (status, stderr) = start_expect_failure(&config);
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert_position(&stderr, 3);
}

#[test]
fn type_error_reports_its_line() {
    let config = format!(
        "(\n    listen: \"127.0.0.1:0\",\n    runtime_dir: \"@DIR@/run\",\n    plugins: {{ \"hello\": (path: {:?}) }},\n\n    max_request: \"many\",\n)\n",
        hello_path()
    );
    assert_eq!(config.lines().nth(5), Some("    max_request: \"many\","));
    let (status, stderr) = start_expect_failure(&config);
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert_position(&stderr, 6);
    assert!(
        stderr.contains("max_request"),
        "stderr does not name the field:\n{stderr}"
    );
}

#[test]
fn unknown_top_level_key_is_named() {
    let (status, stderr) = Config::hello().extra("colour: 3").start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("colour"),
        "stderr does not name the key:\n{stderr}"
    );
}

#[test]
fn unknown_nested_key_is_named() {
    let (status, stderr) = Config::hello()
        .limit("max_headerz", 5)
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("max_headerz"),
        "stderr does not name the key:\n{stderr}"
    );
}

#[test]
fn plugin_without_path_is_an_error() {
    let config =
        "(\n    runtime_dir: \"@DIR@/run\",\n    plugins: { \"hello\": (enable: true) },\n)\n";
    let (status, stderr) = start_expect_failure(config);
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("path"),
        "stderr does not name the missing field:\n{stderr}"
    );
}

#[test]
fn route_to_unknown_component_is_named() {
    let (status, stderr) = Config::hello()
        .route("/x", "hello.no_such_handler")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("no_such_handler"),
        "stderr does not name the component:\n{stderr}"
    );
}

#[test]
fn route_to_unknown_plugin_is_named() {
    let (status, stderr) = Config::hello()
        .route("/x", "ghost_plugin.hello")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("ghost_plugin"),
        "stderr does not name the plugin:\n{stderr}"
    );
}

#[test]
fn component_of_the_wrong_kind_is_refused() {
    // timing.timing is a middleware, not an HTTP handler.
    let a = artifacts();
    let (status, stderr) = Config::hello()
        .plugin("timing", &a.timing)
        .route("/x", "timing.timing")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("timing"), "stderr:\n{stderr}");
}

#[test]
fn malformed_component_reference_is_refused() {
    let (status, stderr) = Config::hello().route("/x", "hello").start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
}

#[test]
fn bad_listen_address_is_refused() {
    let mut config = Config::hello();
    config.listen = "not-an-address".into();
    let (status, stderr) = config.start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("not-an-address"), "stderr:\n{stderr}");
}

#[test]
fn busy_port_makes_start_fail() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut config = Config::hello();
    config.listen = addr.to_string();
    let (status, stderr) = config.start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains(&addr.port().to_string()),
        "stderr does not name the address {addr}:\n{stderr}"
    );
    drop(taken);
}

#[test]
fn missing_config_file_is_named() {
    let dir = crate::common::TestDir::new();
    let missing = dir.path().join("nope").join("server.ron");
    let out = run_plughost(["start".as_ref(), "-c".as_ref(), missing.as_os_str()]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains(&*missing.to_string_lossy()),
        "stderr does not name the file: {out:?}"
    );
}

#[test]
fn minimal_config_uses_defaults() {
    // Everything but the plugin path has a default; a minimal config starts and serves.
    let config = format!(
        "(\n    listen: \"127.0.0.1:0\",\n    runtime_dir: \"@DIR@/run\",\n    plugins: {{ \"hello\": (path: {:?}) }},\n    routes: [(path: \"/hello\", handler: \"hello.hello\")],\n)\n",
        hello_path()
    );
    let server = crate::common::TestServer::start(&config);
    server.assert_serving();
}

/// The line of the first line of `text` that contains `needle` (1-based).
fn line_of(text: &str, needle: &str) -> u32 {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("in the config") as u32
        + 1
}

#[test]
fn a_component_name_typo_is_a_config_error_at_its_line() {
    let config = Config::hello().route("/greet", "hello.gret");
    let text = config.render();
    let (status, stderr) = config.start_expect_failure();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_position(&stderr, line_of(&text, "hello.gret"));
    assert!(stderr.contains("routes[3].handler"), "{stderr}");
    assert!(
        stderr.contains("component \"gret\", but the plugin provides http hello"),
        "{stderr}"
    );
}

#[test]
fn a_middleware_listed_twice_is_refused_at_the_second() {
    let a = artifacts();
    let config = Config::hello()
        .plugin("timing", &a.timing)
        .middleware("timing.timing")
        .middleware("timing.timing");
    let (status, stderr) = config.start_expect_failure();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("middleware[1]"), "{stderr}");
    assert!(stderr.contains("listed twice"), "{stderr}");
    // The middleware list is on one line: the error points at its second entry.
    let line = line_of(&config.render(), "middleware:");
    assert_position(&stderr, line);
    let column: usize = stderr
        .split(&format!("server.ron:{line}:"))
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|c| c.parse().ok())
        .expect("a column");
    let row = config
        .render()
        .lines()
        .nth(line as usize - 1)
        .unwrap()
        .to_owned();
    assert_eq!(
        row.match_indices("\"timing.timing\"")
            .nth(1)
            .map(|(i, _)| i + 1),
        Some(column),
        "{row}"
    );
}
