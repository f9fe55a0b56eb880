//! Plugin behaviour through the server: panics cost one request a 500 and recreate the
//! instance, `max_request` recycles instances, lifecycle hooks run, and plugins that cannot be
//! loaded or instantiated make `start` fail with a clear error.

use std::time::Duration;

use crate::common::{
    artifacts, get_request, run_plughost, some_line_contains_all, Config, PluginEntry, TestDir,
    HELLO_BODY,
};

const LOG_WAIT: Duration = Duration::from_secs(10);

/// `served N worker W` -> (N, W).
fn served(body: &str) -> (u64, String) {
    let rest = body
        .strip_prefix("served ")
        .and_then(|r| r.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("unexpected panicky body {body:?}"));
    let (n, w) = rest
        .split_once(" worker ")
        .unwrap_or_else(|| panic!("unexpected panicky body {body:?}"));
    (n.parse().expect("a count"), w.to_owned())
}

#[test]
fn handler_panic_is_500_and_the_instance_is_recreated() {
    let server = Config::full().workers(1).start();
    let resp = server.get("/count");
    assert_eq!(resp.status, 200, "{resp:?}");
    let (n, worker) = served(&resp.text());
    assert_eq!(n, 1);
    let resp = server.get("/count");
    assert_eq!(served(&resp.text()), (2, worker.clone()));

    let resp = server.get("/panic");
    assert_eq!(resp.status, 500, "{resp:?}");

    // Same (only) worker, fresh instance.
    let resp = server.get("/count");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(served(&resp.text()), (1, worker));
    server.wait_for_log("panicked", LOG_WAIT);
    let logs = server.logs();
    assert!(
        some_line_contains_all(&logs, &["panicked", "panicky"]),
        "no log line names both `panicked` and the plugin:\n{logs}"
    );
    // The lifecycle hook hears about it too.
    server.wait_for_log("saw an error", LOG_WAIT);
    // Other plugins on the worker go on.
    server.assert_serving();
}

#[test]
fn panic_on_a_keep_alive_connection_is_500_and_the_connection_survives_or_closes_cleanly() {
    let server = Config::full().workers(1).start();
    let mut conn = server.conn();
    let resp = conn.request(get_request("/panic"));
    assert_eq!(resp.status, 500, "{resp:?}");
    // Either the connection goes on, or the server said it would close it.
    if resp.connection_has("close") {
        conn.expect_closed();
    } else {
        let resp = conn.request(get_request("/count"));
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(served(&resp.text()).0, 1);
    }
}

#[test]
fn middleware_panic_is_500() {
    let a = artifacts();
    let server = Config::hello()
        .workers(1)
        .plugin("panicky", &a.panicky)
        .middleware("panicky.panic_middleware")
        .start();
    let resp = server.get("/hello");
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, HELLO_BODY),
        "{resp:?}"
    );
    let mut conn = server.conn();
    let resp = conn.request(
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-Panic-Middleware: 1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 500, "{resp:?}");
    server.wait_for_log("panicked", LOG_WAIT);
    server.assert_serving();
}

#[test]
fn a_middleware_that_cannot_be_made_again_after_a_panic_is_retried_not_503_forever() {
    let a = artifacts();
    let server = Config::hello()
        .workers(1)
        .plugin("panicky", &a.panicky)
        .middleware("panicky.flaky")
        .start();
    assert_eq!(server.get("/hello").status, 200);
    let mut conn = server.conn();
    let resp = conn.request(
        "GET /hello HTTP/1.1\r\nHost: x\r\nX-Panic-Middleware: 1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 500, "{resp:?}");
    // Its re-creation after the panic failed; the next request makes it again.
    server.wait_for_log("the second instance on a thread fails", LOG_WAIT);
    for _ in 0..3 {
        let resp = server.get("/hello");
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{resp:?}"
        );
    }
}

#[test]
fn max_request_recycles_instances() {
    let server = Config::hello().workers(1).max_request(3).start();
    let mut seen = Vec::new();
    for _ in 0..7 {
        let resp = server.get("/hello");
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, HELLO_BODY),
            "{resp:?}"
        );
        seen.push(resp.header("x-served").expect("x-served").to_owned());
    }
    assert_eq!(seen, ["1", "2", "3", "1", "2", "3", "1"]);
}

#[test]
fn max_request_recycles_on_a_keep_alive_connection_too() {
    let server = Config::hello().workers(1).max_request(2).start();
    let mut conn = server.conn();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let resp = conn.request(get_request("/hello"));
        assert_eq!(resp.status, 200, "{resp:?}");
        seen.push(resp.header("x-served").expect("x-served").to_owned());
    }
    assert_eq!(seen, ["1", "2", "1", "2", "1"]);
}

#[test]
fn without_max_request_instances_live_on() {
    let server = Config::hello().workers(1).start();
    for i in 1..=6 {
        let resp = server.get("/hello");
        assert_eq!(
            resp.header("x-served"),
            Some(i.to_string().as_str()),
            "{resp:?}"
        );
    }
}

#[test]
fn lifecycle_hooks_run_and_plugin_logs_carry_the_plugin_name() {
    let server = Config::full().workers(2).start();
    server.wait_for_log("server started", LOG_WAIT);
    let ok = server.wait_for_log_matching(LOG_WAIT, |logs| {
        ["worker 0 started", "worker 1 started", "worker 2 started"]
            .iter()
            .filter(|w| logs.contains(*w))
            .count()
            >= 2
    });
    assert!(
        ok,
        "expected two `worker N started` lines:\n{}",
        server.logs()
    );
    let logs = server.logs();
    assert!(
        some_line_contains_all(&logs, &["server started", "timing"]),
        "the hook's log line does not name its plugin:\n{logs}"
    );
}

#[test]
fn failing_factory_makes_start_fail() {
    let a = artifacts();
    let (status, stderr) = Config::hello()
        .plugin("failing", &a.failing)
        .route("/failing", "failing.failing")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("failing"),
        "stderr does not name the plugin:\n{stderr}"
    );
    assert!(
        stderr.contains("db.invalid"),
        "stderr does not carry the factory's error:\n{stderr}"
    );
}

#[test]
fn panicking_factory_makes_start_fail() {
    let a = artifacts();
    let (status, stderr) = Config::hello()
        .plugin("failing", &a.failing)
        .route("/failing", "failing.panicking")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("panicked"), "stderr:\n{stderr}");
    assert!(
        stderr.contains("failing"),
        "stderr does not name the plugin:\n{stderr}"
    );
}

#[test]
fn missing_plugin_file_makes_start_fail() {
    let dir = TestDir::new();
    let missing = dir.path().join("no-such-plugin.so");
    let (status, stderr) = Config::hello()
        .plugin("ghost", &missing)
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains(&*missing.to_string_lossy()),
        "stderr does not name {}:\n{stderr}",
        missing.display()
    );
}

#[test]
fn garbage_so_makes_start_fail() {
    let dir = TestDir::new();
    let bogus = dir.path().join("x.so");
    std::fs::write(&bogus, b"this is not an ELF file\n\x00\x01\x02").unwrap();
    let (status, stderr) = Config::hello().plugin("x", &bogus).start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("x.so"),
        "stderr does not name the file:\n{stderr}"
    );
}

#[test]
fn shared_library_that_is_not_a_plugin_makes_start_fail() {
    let candidates = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ];
    let libm = candidates
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.is_file())
        .expect("a libm.so.6 to use as a non-plugin library");
    let dir = TestDir::new();
    let copy = dir.path().join("libnotaplugin.so");
    std::fs::copy(libm, &copy).unwrap();
    let (status, stderr) = Config::hello()
        .plugin("notaplugin", &copy)
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("libnotaplugin.so") || stderr.contains("notaplugin"),
        "stderr does not name the library:\n{stderr}"
    );
}

#[test]
fn disabled_plugin_cannot_be_referenced() {
    let a = artifacts();
    let (status, stderr) = Config::hello()
        .plugin_entry(PluginEntry {
            name: "timing".into(),
            path: a.timing.clone(),
            enable: Some(false),
            config: None,
        })
        .middleware("timing.timing")
        .start_expect_failure();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(stderr.contains("timing"), "stderr:\n{stderr}");
}

#[test]
fn disabled_unreferenced_plugin_is_fine() {
    // A disabled plugin is fine as long as nothing references it.
    let a = artifacts();
    let server = Config::hello()
        .plugin_entry(PluginEntry {
            name: "off".into(),
            path: a.timing.clone(),
            enable: Some(false),
            config: None,
        })
        .start();
    server.assert_serving();
}

/// Plugins read the `-x` version string and env values (the process environment first, then
/// the `env_file` of the config).
#[test]
fn plugins_see_the_app_version_and_env_values() {
    let a = crate::common::artifacts();
    let dir = crate::common::TestDir::new();
    std::fs::write(
        dir.path().join("app.env"),
        "# comment\nGREETING=\"from the env file\"\nPATH=not-this-one\n",
    )
    .unwrap();
    let config = Config::empty()
        .plugin("panicky", &a.panicky)
        .route("/info", "panicky.info")
        .extra("env_file: Some(\"app.env\")")
        .render();
    let server = crate::common::TestServer::start_in(dir, &config, &["-x", "1.2.3"]);
    let resp = server.get("/info?key=GREETING");
    assert_eq!(resp.text(), "app_version=1.2.3\nenv=from the env file\n");
    let resp = server.get("/info?key=PATH");
    assert!(!resp.text().contains("not-this-one"), "{resp:?}");
    let resp = server.get("/info?key=MISSING");
    assert_eq!(resp.text(), "app_version=1.2.3\nenv=-\n");
}

#[test]
fn a_panic_in_drop_or_in_a_plugin_thread_is_logged_and_counted_never_fatal() {
    let a = artifacts();
    let mut server = Config::hello()
        .workers(1)
        .plugin("panicky", &a.panicky)
        .route("/dropper/*", "panicky.dropper")
        .start();
    assert_eq!(server.get("/dropper/x").status, 200);
    // The handler panics: its instance is made anew, and dropping the old one panics too.
    assert_eq!(server.get("/dropper/panic").status, 500);
    server.wait_for_log(
        "dropping a component instance panicked: drop panicked on purpose",
        LOG_WAIT,
    );
    assert_eq!(server.get("/dropper/x").text(), "dropper\n");
    // A thread the plugin spawned panics: logged with the plugin's name.
    assert_eq!(server.get("/dropper/thread").status, 200);
    server.wait_for_log(
        "thread \"dropper-thread\" of the plugin panicked: a plugin thread panicked on purpose",
        LOG_WAIT,
    );
    assert!(
        server.logs().contains("panicky::plughost::panic"),
        "{}",
        server.logs()
    );
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout
            .contains("panics outside calls (drops, plugin threads): 2"),
        "{}",
        info.stdout
    );
    // Stopping drops every instance: the drop panics again, and the stop is still clean.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("stopped");
    assert!(status.success(), "{status}:\n{}", server.logs());
}

#[test]
fn an_error_whose_display_panics_fails_the_start_cleanly() {
    let a = artifacts();
    let (status, stderr) = Config::hello()
        .plugin("failing", &a.failing)
        .route("/bad", "failing.bad_display")
        .start_expect_failure();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot instantiate http \"bad_display\": panicked: Display of the error panicked on purpose"),
        "{stderr}"
    );
}

/// A copy of the hello plugin cut to its first 100,000 bytes, as `head -c` would.
fn truncated_hello(dir: &TestDir) -> std::path::PathBuf {
    let bytes = std::fs::read(&artifacts().hello).unwrap();
    assert!(bytes.len() > 100_000);
    let path = dir.path().join("libhello-truncated.so");
    std::fs::write(&path, &bytes[..100_000]).unwrap();
    path
}

#[test]
fn a_truncated_plugin_is_refused_at_start_with_a_reason() {
    let dir = TestDir::new();
    let truncated = truncated_hello(&dir);
    let (status, stderr) = Config::empty()
        .plugin("hello", &truncated)
        .route("/hello", "hello.hello")
        .start_expect_failure();
    // Refused with a reason, not killed by SIGBUS in dlopen (exit 135).
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plugin hello: refusing"), "{stderr}");
    assert!(
        stderr.contains("lies past the end of the file") || stderr.contains("truncated"),
        "{stderr}"
    );
}

#[test]
fn a_plugin_file_others_can_write_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    let open = dir.path().join("libhello-open.so");
    std::fs::copy(&artifacts().hello, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
    let config = Config::empty()
        .plugin("hello", &open)
        .route("/hello", "hello.hello");
    let (status, stderr) = config.start_expect_failure();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&open.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("writable by anyone (mode 0666)"),
        "{stderr}"
    );
    // The switch lets it load.
    let server = config.extra("allow_insecure_plugin_files: true").start();
    server.assert_serving();
}

#[test]
fn a_runtime_folder_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new();
    std::fs::create_dir_all(dir.run_dir()).unwrap();
    std::fs::set_permissions(dir.run_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir.write_config(&Config::hello().render());
    let (status, stderr) = crate::common::start_existing_expect_failure(&dir, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("runtime folder"), "{stderr}");
    assert!(stderr.contains("mode 0777"), "{stderr}");
}

/// A panic storm: every panic is answered and counted, but the log says the same thing only
/// a few times a second, then how many more there were.
#[test]
fn a_panic_storm_is_logged_a_few_times_a_second() {
    let a = artifacts();
    let server = Config::hello()
        .workers(1)
        .plugin("panicky", &a.panicky)
        .route("/panic", "panicky.panicky")
        .start();
    let mut conn = server.conn();
    for _ in 0..2000 {
        let resp = conn.request(get_request("/panic"));
        assert_eq!(resp.status, 500);
    }
    server.wait_for_log("more like this in the last second", LOG_WAIT);
    let logs = server.logs();
    let lines = logs
        .lines()
        .filter(|l| l.contains("asked to panic"))
        .count();
    // 2000 panics; at most 5 lines a second of them, plus the summaries.
    assert!(lines < 100, "{lines} log lines for 2000 panics");
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(info.stdout.contains("panics: 2000"), "{}", info.stdout);
}

/// A middleware sets a typed value for its request; the handler and the response hooks read
/// it; the next request on the same connection starts without it.
#[test]
fn a_middleware_passes_a_typed_context_to_the_handler_of_its_request() {
    let server = Config::empty()
        .workers(1)
        .plugin("context", crate::common::context_fixture())
        .middleware("context.auth")
        .route("/whoami", "context.whoami")
        .start();
    let mut conn = crate::common::Conn::connect(server.addr());
    let ada =
        conn.request("GET /whoami HTTP/1.1\r\nhost: x\r\nx-user: ada\r\nx-admin: yes\r\n\r\n");
    assert_eq!(
        (ada.status, ada.text().as_str()),
        (200, "ada (admin: true)\n")
    );
    assert_eq!(ada.header("x-hooks-saw"), Some("ada"));
    let next = conn.request("GET /whoami HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!((next.status, next.text().as_str()), (401, "nobody\n"));
    assert_eq!(next.header("x-hooks-saw"), Some("-"));
}
