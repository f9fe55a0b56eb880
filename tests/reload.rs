//! Hot reload through the real binary: a rebuilt plugin, an incompatible build, a panicking
//! factory, config edits, `plughost reload`, and reloads under continuous load.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::common::{artifacts, run_plughost, Config, Conn, TestDir, TestServer, HELLO_BODY};

/// How long a reload may take to show (a debug build copies and loads a large .so).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn target_dir() -> PathBuf {
    artifacts()
        .hello
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A copy of plugins/hello as crate `name` in `dir`, depending on the plugin-api at `api`.
/// It shares the workspace's target dir and lock file, so only the copy itself compiles.
fn copy_hello(dir: &Path, name: &str, api: &Path) -> PathBuf {
    let root = &artifacts().root;
    let krate = dir.join(name);
    std::fs::create_dir_all(krate.join("src")).unwrap();
    std::fs::write(
        krate.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nplughost-plugin-api = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n[workspace]\n",
            api.to_string_lossy()
        ),
    )
    .unwrap();
    std::fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    std::fs::copy(
        root.join("plugins/hello/src/lib.rs"),
        krate.join("src/lib.rs"),
    )
    .unwrap();
    krate
}

/// The version of the workspace's plugin-api (what a server built here has).
fn api_version() -> String {
    let manifest = std::fs::read_to_string(artifacts().root.join("plugin-api/Cargo.toml")).unwrap();
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("a version line")
        .to_owned()
}

/// The manifest of a copy of plugin-api at `version`, outside the workspace: its
/// `X.workspace = true` dependencies spelled out from the workspace's own lines.
fn api_manifest(version: &str) -> String {
    let root = &artifacts().root;
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let api = std::fs::read_to_string(root.join("plugin-api/Cargo.toml")).unwrap();
    let deps = api
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    let mut out = format!(
        "[package]\nname = \"plughost-plugin-api\"\nversion = \"{version}\"\nedition = \"2021\"\n\n[dependencies]\n"
    );
    for line in deps
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        match line.strip_suffix(".workspace = true") {
            Some(name) => {
                let spelled = workspace
                    .lines()
                    .find(|l| l.starts_with(&format!("{name} = ")))
                    .unwrap_or_else(|| panic!("{name} is not in the workspace's dependencies"));
                out.push_str(spelled);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Replaces `from` by `to` in a file (panics when `from` is not there).
fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// Builds the crate and returns its .so in the shared target dir.
fn build(krate: &Path) -> PathBuf {
    let output = Command::new(cargo())
        .current_dir(krate)
        .args(["build", "--quiet"])
        .env("CARGO_TARGET_DIR", target_dir())
        .stdin(Stdio::null())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "building {} failed:\n{}",
        krate.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let name = krate
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace('-', "_");
    target_dir().join("debug").join(format!("lib{name}.so"))
}

fn count(server: &TestServer, needle: &str) -> usize {
    server.logs().matches(needle).count()
}

fn reload_config(plugin: &Path) -> Config {
    Config::empty()
        .plugin("hello", plugin)
        .route("/hello", "hello.hello")
        .extra("reload: (inotify: true, debounce_ms: 100)")
}

#[test]
fn a_rebuilt_plugin_is_served_without_a_restart() {
    let work = TestDir::new();
    let api = artifacts().root.join("plugin-api");
    let krate = copy_hello(work.path(), "hello-reload-rebuilt", &api);
    let so = build(&krate);
    let server = TestServer::start(&reload_config(&so).render());
    assert_eq!(server.get("/hello").text(), HELLO_BODY);
    let pid_before = server.pid();

    edit(
        &krate.join("src/lib.rs"),
        "{} from plughost",
        "{} from plughost, rebuilt",
    );
    build(&krate);
    server.wait_for_log("reloaded plugin hello on 2/2 workers", RELOAD_TIMEOUT);
    // Every worker answers with the new version, and only with it.
    for resp in server.first_answer_of_each_worker("/hello", 2) {
        assert_eq!(resp.text(), "hello from plughost, rebuilt\n", "{resp:?}");
    }
    for _ in 0..10 {
        assert_eq!(
            server.get("/hello").text(),
            "hello from plughost, rebuilt\n"
        );
    }
    assert_eq!(server.pid(), pid_before);
    assert!(
        server.logs().contains("library versions held: 2"),
        "{}",
        server.logs()
    );
}

#[test]
fn an_incompatible_build_is_refused_and_the_old_version_keeps_serving() {
    let work = TestDir::new();
    // A copy of plugin-api whose Request has an extra field: same version, other layout.
    let api = work.path().join("plugin-api-changed");
    std::fs::create_dir_all(api.join("src")).unwrap();
    let root = &artifacts().root;
    for f in std::fs::read_dir(root.join("plugin-api/src")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, api.join("src").join(f.file_name().unwrap())).unwrap();
    }
    let version = api_version();
    let manifest = api_manifest(&version);
    std::fs::write(api.join("Cargo.toml"), manifest).unwrap();
    edit(
        &api.join("src/http.rs"),
        "    pub route: RStr<'a>,\n}",
        "    pub route: RStr<'a>,\n    /// Not in the server's ABI.\n    pub extra: u64,\n}",
    );

    let good = copy_hello(work.path(), "hello-reload-abi", &root.join("plugin-api"));
    let so = build(&good);
    let server = TestServer::start(&reload_config(&so).render());
    assert_eq!(server.get("/hello").text(), HELLO_BODY);

    // Build the same plugin against the changed API, into the path the server watches.
    std::fs::write(
        good.join("Cargo.toml"),
        std::fs::read_to_string(good.join("Cargo.toml"))
            .unwrap()
            .replace(
                &root.join("plugin-api").to_string_lossy().to_string(),
                &api.to_string_lossy(),
            ),
    )
    .unwrap();
    edit(
        &good.join("src/lib.rs"),
        "{} from plughost",
        "{} from the incompatible build",
    );
    build(&good);
    server.wait_for_log("reload refused", RELOAD_TIMEOUT);
    let logs = server.logs();
    assert!(logs.contains("incompatible plugin ABI"), "{logs}");
    assert!(logs.contains("fields only in the plugin: extra"), "{logs}");
    assert!(logs.contains(&format!("plugin-api {version}")), "{logs}");
    assert!(
        logs.lines().count() < 200,
        "the layout dump must be cut:\n{logs}"
    );
    for _ in 0..5 {
        assert_eq!(server.get("/hello").text(), HELLO_BODY);
    }
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout.contains("reloads: 0 ok, 1 failed"),
        "{}",
        info.stdout
    );
}

/// plugin-api 0.3 added the table calls to the host's ABI: a server refuses a plugin built
/// against 0.2 (abi_stable compares the 0.x minor), naming both versions.
#[test]
fn a_plugin_built_against_plugin_api_0_2_is_refused() {
    let work = TestDir::new();
    let root = &artifacts().root;
    let api = work.path().join("plugin-api-0.2");
    std::fs::create_dir_all(api.join("src")).unwrap();
    for f in std::fs::read_dir(root.join("plugin-api/src")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, api.join("src").join(f.file_name().unwrap())).unwrap();
    }
    let manifest = api_manifest("0.2.0");
    std::fs::write(api.join("Cargo.toml"), manifest).unwrap();
    let old = build(&copy_hello(work.path(), "hello-api-0-2", &api));
    let (status, stderr) = Config::empty()
        .plugin("hello", &old)
        .route("/hello", "hello.hello")
        .start_expect_failure();
    assert!(!status.success());
    assert!(
        stderr.contains("incompatible plugin-api version"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("server plugin-api {}", api_version()))
            && stderr.contains("plugin built with plugin-api 0.2.0"),
        "{stderr}"
    );
}

#[test]
fn a_config_edit_adds_a_route_live_and_an_invalid_edit_is_refused() {
    let a = artifacts();
    let config = reload_config(&a.hello);
    let server = TestServer::start(&config.render());
    assert_eq!(server.get("/hi").status, 404);

    server
        .dir()
        .write_config(&config.clone().route("/hi", "hello.hello").render());
    server.wait_for_log("reloaded config on 2/2 workers", RELOAD_TIMEOUT);
    for resp in server.first_answer_of_each_worker("/hi", 2) {
        assert_eq!(resp.text(), HELLO_BODY, "{resp:?}");
    }

    // An invalid edit: logged with its line, the running config stays.
    let broken = config
        .clone()
        .route("/bye", "hello.hello")
        .render()
        .replacen("worker_num", "worker_num: ,\n    x", 1);
    server.dir().write_config(&broken);
    server.wait_for_log("reload refused", RELOAD_TIMEOUT);
    assert!(server.logs().contains("server.ron:3:"), "{}", server.logs());
    assert_eq!(server.get("/hi").status, 200);
    assert_eq!(server.get("/bye").status, 404);

    // A component whose factory panics: refused by the probe, nothing swapped.
    let with_failing = config
        .clone()
        .plugin("failing", &a.failing)
        .route("/hi", "hello.hello")
        .route("/boom", "failing.panicking");
    server.dir().write_config(&with_failing.render());
    server.wait_for_log("instantiate panicked on purpose", RELOAD_TIMEOUT);
    assert_eq!(server.get("/hi").status, 200);
    assert_eq!(server.get("/boom").status, 404);

    // A key that needs a restart is kept, and the server says so.
    server.dir().write_config(
        &config
            .clone()
            .workers(7)
            .route("/hi", "hello.hello")
            .render(),
    );
    server.wait_for_log("needs `plughost restart`", RELOAD_TIMEOUT);
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(info.stdout.contains("workers: 2"), "{}", info.stdout);
}

#[test]
fn plughost_reload_reloads_every_plugin() {
    let a = artifacts();
    let config = Config::full();
    let server = TestServer::start(&config.render());
    // Each worker's hello instance counts its requests (`x-served`): serve a few on each.
    for _ in 0..3 {
        server.first_answer_of_each_worker("/hello", 2);
    }
    let out = run_plughost(["reload", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    server.wait_for_log(
        "reloaded plugin hello, panicky, timing on 2/2 workers",
        RELOAD_TIMEOUT,
    );
    // Every worker answers from a new instance of the new library: its count starts again.
    for (worker, resp) in server
        .first_answer_of_each_worker("/hello", 2)
        .iter()
        .enumerate()
    {
        assert_eq!(resp.text(), HELLO_BODY);
        assert_eq!(
            resp.header("x-served"),
            Some("1"),
            "worker {worker}: {resp:?}"
        );
    }
    let _ = a;
}

#[test]
fn ten_reloads_under_load_fail_no_request() {
    let server = TestServer::start(&Config::hello().workers(2).render());
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            thread::spawn(move || -> Result<(), String> {
                let mut conn = Conn::connect(addr);
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    conn.try_send("GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
                        .map_err(|e| format!("request failed: {e}"))?;
                    let resp = conn
                        .try_read_response(false)
                        .map_err(|e| format!("response failed: {e}"))?;
                    if resp.status != 200 || resp.text() != HELLO_BODY {
                        return Err(format!("bad response {resp:?}"));
                    }
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for i in 1..=10 {
        server.signal(libc::SIGUSR1);
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while count(&server, "reloaded plugin hello on 2/2 workers") < i {
            assert!(
                Instant::now() < deadline,
                "reload {i} did not finish:\n{}",
                server.logs()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap().unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(served >= 100, "only {served} requests during the reloads");
    assert_eq!(count(&server, "reloaded plugin"), 10, "{}", server.logs());
    assert!(
        server.logs().contains("library versions held: 11"),
        "{}",
        server.logs()
    );
}

fn picky_config(component_config: &str, route: &str) -> Config {
    let a = artifacts();
    let config = match component_config {
        "" => Config::hello().plugin("failing", &a.failing),
        c => Config::hello().plugin_config("failing", &a.failing, c),
    };
    config
        .extra("reload: (inotify: true, debounce_ms: 100)")
        .extra(&format!(
            r#"websocket: (enable: true, routes: [(path: "/ws", handler: "failing.{route}")])"#
        ))
}

#[test]
fn a_reload_that_fails_on_one_worker_is_reported_failed() {
    let server = TestServer::start(&picky_config("", "picky").render());
    // The new config of the WebSocket handler cannot be instantiated on worker 1 (the probe on
    // the main thread passes): worker 0 moves, worker 1 keeps its old instances.
    server
        .dir()
        .write_config(&picky_config(r#"{ "picky": (fail_on_worker: 1) }"#, "picky").render());
    server.wait_for_log("reload failed on 1/2 workers", RELOAD_TIMEOUT);
    let logs = server.logs();
    assert!(logs.contains("reloaded config on 1/2 workers"), "{logs}");
    assert!(
        logs.contains("worker 1 kept its old instances: plugin failing: cannot instantiate websocket \"picky\": picky does not run on worker 1"),
        "{logs}"
    );
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout.contains("reloads: 0 ok, 1 failed"),
        "{}",
        info.stdout
    );
    assert!(
        info.stdout
            .contains("last reload: failed: reloaded config on 1/2 workers"),
        "{}",
        info.stdout
    );
    server.assert_serving();
}

#[test]
fn a_reload_to_a_websocket_handler_that_cannot_be_made_is_refused() {
    let server = TestServer::start(&picky_config("", "picky").render());
    server
        .dir()
        .write_config(&picky_config("", "ws_failing").render());
    server.wait_for_log("reload refused", RELOAD_TIMEOUT);
    assert!(
        server
            .logs()
            .contains("the websocket backend is unreachable"),
        "{}",
        server.logs()
    );
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout.contains("reloads: 0 ok, 1 failed"),
        "{}",
        info.stdout
    );
    server.assert_serving();
}

#[test]
fn a_truncated_plugin_moved_over_the_watched_file_is_refused_and_the_old_one_serves() {
    let work = TestDir::new();
    let watched = work.path().join("libhello.so");
    std::fs::copy(&artifacts().hello, &watched).unwrap();
    let server = TestServer::start(&reload_config(&watched).render());
    assert_eq!(server.get("/hello").text(), HELLO_BODY);
    // `head -c 100000 libhello.so > x.so; mv x.so libhello.so`
    let bytes = std::fs::read(&artifacts().hello).unwrap();
    let partial = work.path().join("x.so");
    std::fs::write(&partial, &bytes[..100_000]).unwrap();
    std::fs::rename(&partial, &watched).unwrap();
    server.wait_for_log("reload refused", RELOAD_TIMEOUT);
    assert!(
        server.logs().contains("lies past the end of the file"),
        "{}",
        server.logs()
    );
    for _ in 0..5 {
        assert_eq!(server.get("/hello").text(), HELLO_BODY);
    }
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout.contains("reloads: 0 ok, 1 failed"),
        "{}",
        info.stdout
    );
}

/// The config names a release build; a debug build of the same plugin lands beside it: no
/// reload, and one log line that says which path is configured.
#[test]
fn a_debug_build_beside_a_configured_release_path_is_named_in_the_log() {
    let work = TestDir::new();
    let (release, debug) = (work.path().join("release"), work.path().join("debug"));
    std::fs::create_dir_all(&release).unwrap();
    std::fs::create_dir_all(&debug).unwrap();
    let configured = release.join("libhello.so");
    std::fs::copy(&artifacts().hello, &configured).unwrap();
    let server = TestServer::start(&reload_config(&configured).render());
    server.wait_for_log("hot reload: watching", RELOAD_TIMEOUT);
    std::fs::copy(&artifacts().hello, debug.join("libhello.so")).unwrap();
    let line = format!(
        "{} changed, but plugin hello is configured as {}",
        debug.canonicalize().unwrap().join("libhello.so").display(),
        configured.display()
    );
    server.wait_for_log(&line, RELOAD_TIMEOUT);
    // Once per path, and no reload.
    std::fs::copy(&artifacts().hello, debug.join("libhello.so")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        count(&server, "changed, but plugin hello"),
        1,
        "{}",
        server.logs()
    );
    assert_eq!(count(&server, "] reloaded "), 0, "{}", server.logs());
    assert_eq!(server.get("/hello").text(), HELLO_BODY);
}
