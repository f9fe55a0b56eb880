//! Shared helpers for the plughost integration tests: building the server and plugins once,
//! starting a server on an ephemeral port and capturing its log, running the other CLI
//! commands, a config builder, and a small HTTP/1.1 client over `std::net::TcpStream`.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

/// Read and write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to become ready, or a CLI command to finish.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// What `GET /hello` answers with the default greeting.
pub const HELLO_BODY: &str = "hello from plughost\n";
/// The marker the server logs once it accepts connections.
pub const READY_MARKER: &str = "listening on http://";

// ---------------------------------------------------------------------------------------------
// Building the binaries
// ---------------------------------------------------------------------------------------------

/// The built server binary and plugin libraries.
#[derive(Debug)]
pub struct Artifacts {
    /// The workspace root.
    pub root: PathBuf,
    /// `target/debug/plughost`.
    pub plughost: PathBuf,
    /// `target/debug/libhello.so`.
    pub hello: PathBuf,
    /// `target/debug/libtiming.so`.
    pub timing: PathBuf,
    /// `target/debug/libfixture_panicky.so`.
    pub panicky: PathBuf,
    /// `target/debug/libfixture_failing.so`.
    pub failing: PathBuf,
    /// `target/debug/libapollo.so`.
    pub apollo: PathBuf,
}

static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();

/// Builds the server and the plugins on first use (once per test binary) and returns their
/// paths. Panics, in every test that needs them, when the build failed.
pub fn artifacts() -> &'static Artifacts {
    match ARTIFACTS.get_or_init(build_artifacts) {
        Ok(a) => a,
        Err(e) => panic!("{e}"),
    }
}

fn build_artifacts() -> Result<Artifacts, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let output = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "-p",
            "plughost",
            "-p",
            "hello",
            "-p",
            "timing",
            "-p",
            "fixture-panicky",
            "-p",
            "fixture-failing",
            "-p",
            "apollo",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the server and plugins failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let debug = target_dir.join("debug");
    let artifacts = Artifacts {
        plughost: debug.join("plughost"),
        hello: debug.join("libhello.so"),
        timing: debug.join("libtiming.so"),
        panicky: debug.join("libfixture_panicky.so"),
        failing: debug.join("libfixture_failing.so"),
        apollo: debug.join("libapollo.so"),
        root,
    };
    for path in [
        &artifacts.plughost,
        &artifacts.hello,
        &artifacts.timing,
        &artifacts.panicky,
        &artifacts.failing,
        &artifacts.apollo,
    ] {
        if !path.is_file() {
            return Err(format!(
                "the build succeeded but {} is missing",
                path.display()
            ));
        }
    }
    Ok(artifacts)
}

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir holding `server.ron` and the runtime dir;
/// removed on drop. Shared (`Arc`) when two processes use the same config.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<tmp>/plughost-test-<pid>-<counter>`.
    pub fn new() -> Arc<TestDir> {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("plughost-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Arc::new(TestDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<dir>/server.ron`.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("server.ron")
    }

    /// `<dir>/run`, the runtime dir the config builder sets.
    pub fn run_dir(&self) -> PathBuf {
        self.path.join("run")
    }

    /// `<dir>/run/plughost.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("plughost.pid")
    }

    /// Writes `server.ron`, replacing every `@DIR@` with this directory.
    pub fn write_config(&self, config: &str) -> PathBuf {
        let text = config.replace("@DIR@", &self.path.to_string_lossy());
        let path = self.config_path();
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Captured output
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct CaptureState {
    text: String,
    eof: bool,
}

/// Text a thread reads from a child's pipe, growing until the pipe closes.
#[derive(Clone, Default)]
pub struct Capture {
    inner: Arc<(Mutex<CaptureState>, Condvar)>,
}

impl Capture {
    /// Starts a thread that appends everything `reader` yields.
    pub fn spawn(reader: impl Read + Send + 'static) -> Capture {
        let capture = Capture::default();
        let inner = capture.inner.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).unwrap_or(0);
                let (lock, cvar) = &*inner;
                let mut state = lock.lock().unwrap();
                if n == 0 {
                    state.eof = true;
                    cvar.notify_all();
                    return;
                }
                state.text.push_str(&String::from_utf8_lossy(&line));
                cvar.notify_all();
            }
        });
        capture
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.inner.0.lock().unwrap().text.clone()
    }

    /// Whether the pipe has closed.
    pub fn is_eof(&self) -> bool {
        self.inner.0.lock().unwrap().eof
    }

    /// Waits until `pred` holds for the text, or the pipe closed, or `timeout` passed;
    /// returns whether `pred` held.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut state = lock.lock().unwrap();
        loop {
            if pred(&state.text) {
                return true;
            }
            let now = Instant::now();
            if state.eof || now >= deadline {
                return false;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits until the pipe closes (at most `timeout`).
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut state = lock.lock().unwrap();
        while !state.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
        true
    }
}

/// Waits for a child to exit, polling; `None` on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Finds the address in `... listening on http://IP:PORT ...`.
pub fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    let start = text.find(READY_MARKER)? + READY_MARKER.len();
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':' || c == '[' || c == ']'))
        .unwrap_or(rest.len());
    rest[..end].trim_end_matches(['.', ':']).parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// A running `plughost start`; killed (SIGKILL) on drop, and its directory removed.
pub struct TestServer {
    child: Child,
    addr: SocketAddr,
    dir: Arc<TestDir>,
    stderr: Capture,
    stdout: Capture,
}

impl TestServer {
    /// Writes `config` (with `@DIR@` replaced) to a fresh dir and starts the server with it.
    pub fn start(config: &str) -> TestServer {
        Self::start_in(TestDir::new(), config, &[])
    }

    /// Writes `config` into `dir` and starts the server with it and `extra_args`.
    pub fn start_in(dir: Arc<TestDir>, config: &str, extra_args: &[&str]) -> TestServer {
        dir.write_config(config);
        Self::start_existing(dir, extra_args)
    }

    /// Starts the server with the config already in `dir`.
    pub fn start_existing(dir: Arc<TestDir>, extra_args: &[&str]) -> TestServer {
        Self::start_wrapped(dir, &[], extra_args)
    }

    /// Starts the server with the config already in `dir`, through `wrapper` (a command that
    /// execs the one after it, such as `prlimit --nofile=256:4096`).
    pub fn start_wrapped(dir: Arc<TestDir>, wrapper: &[&str], extra_args: &[&str]) -> TestServer {
        let (mut child, stdout, stderr) = spawn_start(&dir, wrapper, extra_args);
        let started = Instant::now();
        let ready = stderr.wait_until(START_TIMEOUT, |t| parse_listen_addr(t).is_some());
        if !ready {
            let status = if stderr.is_eof() {
                wait_child(&mut child, Duration::from_secs(5))
            } else {
                let _ = child.kill();
                let _ = child.wait();
                None
            };
            panic!(
                "plughost did not become ready within {:?} (exit status: {status:?}).\n\
                 --- config ---\n{}\n--- stderr ---\n{}\n--- stdout ---\n{}",
                started.elapsed(),
                std::fs::read_to_string(dir.config_path()).unwrap_or_default(),
                stderr.text(),
                stdout.text()
            );
        }
        let addr = parse_listen_addr(&stderr.text()).expect("address parsed above");
        assert!(
            addr.ip().is_loopback(),
            "server listens on {addr}, not on loopback"
        );
        TestServer {
            child,
            addr,
            dir,
            stderr,
            stdout,
        }
    }

    /// The address the server logged.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's directory.
    pub fn dir(&self) -> &Arc<TestDir> {
        &self.dir
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.config_path()
    }

    /// Everything the server wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.text()
    }

    /// Everything the server wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Waits until the log contains `needle`; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        if !self.try_wait_for_log(needle, timeout) {
            panic!(
                "the server log did not contain {needle:?} within {timeout:?}:\n{}",
                self.logs()
            );
        }
    }

    /// Waits until the log contains `needle`; whether it did within `timeout`.
    pub fn try_wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.stderr.wait_until(timeout, |t| t.contains(needle))
    }

    /// Waits until the log satisfies `pred`; whether it did within `timeout`.
    pub fn wait_for_log_matching(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        self.stderr.wait_until(timeout, pred)
    }

    /// Sends a signal to the server process.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits in i32");
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the pid is still ours.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {sig}) failed: {}",
            io::Error::last_os_error()
        );
    }

    /// Waits for the server process to exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_child(&mut self.child, timeout);
        if status.is_some() {
            self.stderr.wait_eof(Duration::from_secs(5));
        }
        status
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// A new connection to the server.
    pub fn conn(&self) -> Conn {
        Conn::connect(self.addr)
    }

    /// `GET path` on a new connection with `Connection: close`.
    pub fn get(&self, path: &str) -> Response {
        get_close(self.addr, path)
    }

    /// GETs `path` on new connections until each of `workers` workers has answered (by the
    /// hello plugin's `x-worker` header); returns, by worker id, the first response each gave.
    pub fn first_answer_of_each_worker(&self, path: &str, workers: usize) -> Vec<Response> {
        let mut firsts: Vec<Option<Response>> = vec![None; workers];
        for _ in 0..500 {
            let resp = self.get(path);
            let worker: usize = resp
                .header("x-worker")
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no x-worker header in {resp:?}"));
            assert!(worker < workers, "worker {worker} of {workers}: {resp:?}");
            firsts[worker].get_or_insert(resp);
            if firsts.iter().all(Option::is_some) {
                return firsts.into_iter().flatten().collect();
            }
        }
        panic!(
            "not every one of {workers} workers answered {path} in 500 connections:\n{}",
            self.logs()
        );
    }

    /// The pid of the process that serves (under the supervisor), from `info`.
    pub fn server_pid(&self) -> u32 {
        let out = run_plughost(["info", "-c", &self.config_path().to_string_lossy()]);
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("pid: "))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in info: {out:?}"))
    }

    /// The resident memory of the serving process, in kB.
    pub fn server_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server_pid()))
            .expect("the server process's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Panics unless `GET /hello` on a new connection answers 200 with the hello body.
    pub fn assert_serving(&self) {
        let resp = self.get("/hello");
        assert_eq!(resp.status, 200, "server stopped serving /hello: {resp:?}");
        assert_eq!(
            resp.text(),
            HELLO_BODY,
            "server stopped serving /hello: {resp:?}"
        );
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `plughost start` with the config in `dir`, through `wrapper` if any; returns the
/// child and its captured stdout and stderr.
pub fn spawn_start(
    dir: &TestDir,
    wrapper: &[&str],
    extra_args: &[&str],
) -> (Child, Capture, Capture) {
    let a = artifacts();
    let mut cmd = match wrapper {
        [] => Command::new(&a.plughost),
        [first, rest @ ..] => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(&a.plughost);
            cmd
        }
    };
    cmd.arg("start")
        .arg("-c")
        .arg(dir.config_path())
        .args(extra_args)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", a.plughost.display()));
    let stdout = Capture::spawn(child.stdout.take().expect("piped stdout"));
    let stderr = Capture::spawn(child.stderr.take().expect("piped stderr"));
    (child, stdout, stderr)
}

/// Starts the server with `config` expecting it to fail: waits (max 30 s) for it to exit and
/// returns its status and stderr. Panics if it becomes ready instead.
pub fn start_expect_failure(config: &str) -> (ExitStatus, String) {
    let dir = TestDir::new();
    dir.write_config(config);
    start_existing_expect_failure(&dir, &[])
}

/// Like [`start_expect_failure`] with the config already in `dir`.
pub fn start_existing_expect_failure(dir: &TestDir, extra_args: &[&str]) -> (ExitStatus, String) {
    let (mut child, stdout, stderr) = spawn_start(dir, &[], extra_args);
    let done = stderr.wait_until(START_TIMEOUT, |t| t.contains(READY_MARKER));
    if done && !stderr.is_eof() {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "plughost started although it should have failed.\n--- config ---\n{}\n--- stderr ---\n{}",
            std::fs::read_to_string(dir.config_path()).unwrap_or_default(),
            stderr.text()
        );
    }
    let Some(status) = wait_child(&mut child, START_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "plughost neither started nor exited within {START_TIMEOUT:?}:\n{}",
            stderr.text()
        );
    };
    stderr.wait_eof(Duration::from_secs(5));
    stdout.wait_eof(Duration::from_secs(5));
    let mut text = stderr.text();
    if text.trim().is_empty() {
        // Report stdout too when stderr is empty, so the assertion message shows something.
        text = stdout.text();
    }
    (status, text)
}

/// What a finished CLI command left.
#[derive(Debug)]
pub struct CmdOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `plughost ARGS...` to completion (max 30 s, then killed and a panic).
pub fn run_plughost<I, S>(args: I) -> CmdOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let a = artifacts();
    let args: Vec<_> = args.into_iter().map(|s| s.as_ref().to_owned()).collect();
    let mut child = Command::new(&a.plughost)
        .args(&args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", a.plughost.display()));
    let stdout = Capture::spawn(child.stdout.take().expect("piped stdout"));
    let stderr = Capture::spawn(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_child(&mut child, START_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "plughost {args:?} did not finish within {START_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            stdout.text(),
            stderr.text()
        );
    };
    stdout.wait_eof(Duration::from_secs(5));
    stderr.wait_eof(Duration::from_secs(5));
    CmdOutput {
        status,
        stdout: stdout.text(),
        stderr: stderr.text(),
    }
}

// ---------------------------------------------------------------------------------------------
// Config builder
// ---------------------------------------------------------------------------------------------

/// One entry of `plugins: { ... }`.
#[derive(Debug, Clone)]
pub struct PluginEntry {
    /// The key.
    pub name: String,
    /// The `.so` path.
    pub path: PathBuf,
    /// `enable:`, omitted when `None`.
    pub enable: Option<bool>,
    /// `config:` as raw RON (a map), omitted when `None`.
    pub config: Option<String>,
}

/// Builds a `server.ron`. Rendered with `runtime_dir: "@DIR@/run"`, which [`TestDir`]
/// replaces with its own path.
#[derive(Debug, Clone)]
pub struct Config {
    /// `listen:`.
    pub listen: String,
    /// `worker_num:`.
    pub worker_num: u32,
    /// `max_request:`.
    pub max_request: u64,
    /// `max_wait_time:`.
    pub max_wait_time: u64,
    /// `log: (level: ...)`.
    pub log_level: String,
    /// Entries of `limits: (...)`; omitted when empty.
    pub limits: Vec<(String, u64)>,
    /// `plugins:`.
    pub plugins: Vec<PluginEntry>,
    /// `routes:`, raw RON tuples.
    pub routes: Vec<String>,
    /// `middleware:`.
    pub middleware: Vec<String>,
    /// `cleaners:`.
    pub cleaners: Vec<String>,
    /// `hooks:`.
    pub hooks: Vec<String>,
    /// Extra raw top-level lines (each without the trailing comma).
    pub extra: Vec<String>,
}

impl Config {
    /// No plugins, no routes, two workers.
    pub fn empty() -> Config {
        Config {
            listen: "127.0.0.1:0".into(),
            worker_num: 2,
            max_request: 0,
            max_wait_time: 5,
            log_level: "info".into(),
            limits: Vec::new(),
            plugins: Vec::new(),
            routes: Vec::new(),
            middleware: Vec::new(),
            cleaners: Vec::new(),
            hooks: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The hello plugin on `/hello`, `/hello/{name}` (GET, HEAD) and `/static/*`.
    pub fn hello() -> Config {
        let a = artifacts();
        Config::empty()
            .plugin("hello", &a.hello)
            .route("/hello", "hello.hello")
            .route_methods("/hello/{name}", "hello.hello", &["GET", "HEAD"])
            .route("/static/*", "hello.hello")
    }

    /// hello, timing and panicky: the routes of [`Config::hello`] plus `/panic`, `/count`
    /// and `/slow`, the timing middleware, cleaner and hooks.
    pub fn full() -> Config {
        let a = artifacts();
        Config::hello()
            .plugin("timing", &a.timing)
            .plugin("panicky", &a.panicky)
            .route("/panic", "panicky.panicky")
            .route("/count", "panicky.panicky")
            .route("/slow", "panicky.slow")
            .middleware("timing.timing")
            .cleaner("timing.cleaner")
            .hook("timing.hooks")
    }

    /// Sets `worker_num`.
    pub fn workers(mut self, n: u32) -> Config {
        self.worker_num = n;
        self
    }

    /// Sets `max_request`.
    pub fn max_request(mut self, n: u64) -> Config {
        self.max_request = n;
        self
    }

    /// Sets `max_wait_time`.
    pub fn max_wait_time(mut self, secs: u64) -> Config {
        self.max_wait_time = secs;
        self
    }

    /// Sets one entry of `limits`.
    pub fn limit(mut self, key: &str, value: u64) -> Config {
        self.limits.retain(|(k, _)| k != key);
        self.limits.push((key.into(), value));
        self
    }

    /// Adds (or replaces) a plugin.
    pub fn plugin(self, name: &str, path: &Path) -> Config {
        self.plugin_entry(PluginEntry {
            name: name.into(),
            path: path.into(),
            enable: None,
            config: None,
        })
    }

    /// Adds (or replaces) a plugin with a component config map, raw RON such as
    /// `{ "hello": (greeting: "hi") }`.
    pub fn plugin_config(self, name: &str, path: &Path, config: &str) -> Config {
        self.plugin_entry(PluginEntry {
            name: name.into(),
            path: path.into(),
            enable: None,
            config: Some(config.into()),
        })
    }

    /// Adds (or replaces) a plugin entry.
    pub fn plugin_entry(mut self, entry: PluginEntry) -> Config {
        self.plugins.retain(|p| p.name != entry.name);
        self.plugins.push(entry);
        self
    }

    /// Adds a route for any method.
    pub fn route(mut self, path: &str, handler: &str) -> Config {
        self.routes
            .push(format!("(path: {path:?}, handler: {handler:?})"));
        self
    }

    /// Adds a route restricted to `methods`.
    pub fn route_methods(mut self, path: &str, handler: &str, methods: &[&str]) -> Config {
        self.routes.push(format!(
            "(path: {path:?}, handler: {handler:?}, methods: {methods:?})"
        ));
        self
    }

    /// Appends a middleware reference.
    pub fn middleware(mut self, component: &str) -> Config {
        self.middleware.push(component.into());
        self
    }

    /// Appends a cleaner reference.
    pub fn cleaner(mut self, component: &str) -> Config {
        self.cleaners.push(component.into());
        self
    }

    /// Appends a hooks reference.
    pub fn hook(mut self, component: &str) -> Config {
        self.hooks.push(component.into());
        self
    }

    /// Adds a raw top-level line such as `colour: 3`.
    pub fn extra(mut self, line: &str) -> Config {
        self.extra.push(line.into());
        self
    }

    /// The RON text.
    pub fn render(&self) -> String {
        let mut s = String::from("(\n");
        s += &format!("    listen: {:?},\n", self.listen);
        s += &format!("    worker_num: {},\n", self.worker_num);
        s += &format!("    max_request: {},\n", self.max_request);
        s += &format!("    max_wait_time: {},\n", self.max_wait_time);
        s += "    runtime_dir: \"@DIR@/run\",\n";
        s += &format!("    log: (level: {:?}),\n", self.log_level);
        if !self.limits.is_empty() {
            s += "    limits: (\n";
            for (k, v) in &self.limits {
                s += &format!("        {k}: {v},\n");
            }
            s += "    ),\n";
        }
        s += "    plugins: {\n";
        for p in &self.plugins {
            s += &format!(
                "        {:?}: (path: {:?}",
                p.name,
                p.path.to_string_lossy()
            );
            if let Some(enable) = p.enable {
                s += &format!(", enable: {enable}");
            }
            if let Some(config) = &p.config {
                s += &format!(", config: {config}");
            }
            s += "),\n";
        }
        s += "    },\n";
        s += "    routes: [\n";
        for r in &self.routes {
            s += &format!("        {r},\n");
        }
        s += "    ],\n";
        s += &format!("    middleware: {:?},\n", self.middleware);
        s += &format!("    cleaners: {:?},\n", self.cleaners);
        s += &format!("    hooks: {:?},\n", self.hooks);
        for e in &self.extra {
            s += &format!("    {e},\n");
        }
        s += ")\n";
        s
    }

    /// Starts a server with this config.
    pub fn start(&self) -> TestServer {
        TestServer::start(&self.render())
    }

    /// Starts a server with this config, expecting failure.
    pub fn start_expect_failure(&self) -> (ExitStatus, String) {
        start_expect_failure(&self.render())
    }
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// The headers in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header with this name.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a `connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.headers_named("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// A client connection with its own read buffer (so pipelined responses parse in order).
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects, with read and write timeouts of [`IO_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The socket (e.g. to clone it for a writer thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`; panics on error.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.try_send(bytes).expect("write to the server");
    }

    /// Writes all of `bytes`.
    pub fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        self.stream.write_all(bytes.as_ref())?;
        self.stream.flush()
    }

    /// Sends a request and reads its response (no body if the request is a HEAD).
    pub fn request(&mut self, raw: impl AsRef<[u8]>) -> Response {
        let raw = raw.as_ref();
        self.send(raw);
        self.read_response_for(raw.starts_with(b"HEAD "))
    }

    /// Reads one response to a non-HEAD request; panics with what arrived on failure.
    pub fn read_response(&mut self) -> Response {
        self.read_response_for(false)
    }

    /// Reads one response; `head` says the request was a HEAD (so there is no body).
    pub fn read_response_for(&mut self, head: bool) -> Response {
        match self.try_read_response(head) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Reads one response.
    pub fn try_read_response(&mut self, head: bool) -> Result<Response, String> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            match self.fill() {
                Ok(0) => {
                    return Err(format!(
                        "connection closed before a complete response head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "reading a response head failed ({e}); got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        };
        let head_bytes: Vec<u8> = self.buf.drain(..head_end + 4).collect();
        let head_text = String::from_utf8(head_bytes)
            .map_err(|e| format!("response head is not UTF-8: {e}"))?;
        let mut lines = head_text[..head_end].split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_owned();
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|_| version.starts_with("HTTP/1."))
            .ok_or_else(|| format!("bad status line {status_line:?} in {head_text:?}"))?;
        let reason = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line {line:?} in {head_text:?}"))?;
            if name.is_empty() || name.trim() != name {
                return Err(format!("bad header name in {line:?} in {head_text:?}"));
            }
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
        let mut resp = Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
        };
        let no_body = head || (100..200).contains(&status) || status == 204 || status == 304;
        if no_body {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = self
                .read_chunked()
                .map_err(|e| format!("reading the chunked body of {status_line:?} failed: {e}"))?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| format!("bad content-length {len:?} in {head_text:?}"))?;
            resp.body = self
                .take_exact(len)
                .map_err(|e| format!("reading the body of {head_text:?} failed: {e}"))?;
        } else {
            // Delimited by the end of the connection.
            loop {
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => {
                        return Err(format!(
                            "reading a close-delimited body of {head_text:?} failed: {e}"
                        ))
                    }
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    /// Reads raw bytes up to and including `needle` (for interim responses and chunk lines).
    pub fn read_raw_until(&mut self, needle: &[u8]) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = find(&self.buf, needle) {
                return Ok(self.buf.drain(..i + needle.len()).collect());
            }
            match self.fill() {
                Ok(0) => {
                    return Err(format!(
                        "closed before {:?}; got {:?}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "{e} before {:?}; got {:?}",
                        String::from_utf8_lossy(needle),
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        }
    }

    /// Panics unless the server closes the connection (EOF or reset) within [`IO_TIMEOUT`]
    /// without sending anything more.
    pub fn expect_closed(&mut self) {
        if let Err(e) = self.try_expect_closed() {
            panic!("{e}");
        }
    }

    /// Whether the server closes the connection without sending more.
    pub fn try_expect_closed(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "expected the connection to be closed, but the server sent more: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Ok(n) => Err(format!(
                "expected the connection to be closed, but the server sent {:?}",
                String::from_utf8_lossy(&chunk[..n])
            )),
            Err(e) => Err(format!(
                "expected the connection to be closed within {IO_TIMEOUT:?}, but: {e}"
            )),
        }
    }

    /// Half-closes the writing side.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            match self.fill() {
                Ok(0) => {
                    return Err(format!(
                        "connection closed after {} of {n} bytes",
                        self.buf.len()
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{e} after {} of {n} bytes", self.buf.len())),
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn take_line(&mut self) -> Result<String, String> {
        let line = self.read_raw_until(b"\r\n")?;
        String::from_utf8(line[..line.len() - 2].to_vec()).map_err(|e| e.to_string())
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            if size == 0 {
                // Trailer section, up to an empty line.
                while !self.take_line()?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.take_exact(size)?);
            if self.take_exact(2)? != b"\r\n" {
                return Err("chunk not followed by CRLF".into());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `GET path HTTP/1.1` with a Host header (keep-alive).
pub fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// `GET path` on a new connection with `Connection: close`.
pub fn get_close(addr: SocketAddr, path: &str) -> Response {
    let mut conn = Conn::connect(addr);
    conn.request(format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    ))
}

/// Checks a `date` header looks like an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn is_http_date(value: &str) -> bool {
    let b = value.as_bytes();
    b.len() == 29
        && value.ends_with(" GMT")
        && b[3] == b','
        && b[4] == b' '
        && b[7] == b' '
        && b[11] == b' '
        && b[16] == b' '
        && b[19] == b':'
        && b[22] == b':'
}

/// Whether some line of `text` contains every one of `needles`.
pub fn some_line_contains_all(text: &str, needles: &[&str]) -> bool {
    text.lines().any(|l| needles.iter().all(|n| l.contains(n)))
}

// ---------------------------------------------------------------------------------------------
// Task workers, events, cron jobs and custom processes (tests/tasks.rs)
// ---------------------------------------------------------------------------------------------

/// The plugins of tests/tasks.rs, built once.
#[derive(Debug)]
pub struct JobArtifacts {
    /// `target/debug/libfixture_tasks.so`.
    pub fixture: PathBuf,
    /// `target/debug/libjobs.so`, the example plugin.
    pub jobs: PathBuf,
}

/// Builds the plugin `packages` (debug, with the server's artifacts) and returns each one's
/// `target/debug/lib{package}.so`.
fn build_plugins<const N: usize>(packages: [&str; N]) -> Result<[PathBuf; N], String> {
    let a = artifacts();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&a.root).arg("build");
    for p in packages {
        cmd.args(["-p", p]);
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building {} failed ({}):\n{}",
            packages.join(", "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let paths = packages.map(|p| {
        a.plughost
            .with_file_name(format!("lib{}.so", p.replace('-', "_")))
    });
    for p in &paths {
        if !p.is_file() {
            return Err(format!(
                "the build succeeded but {} is missing",
                p.display()
            ));
        }
    }
    Ok(paths)
}

static JOB_ARTIFACTS: OnceLock<Result<JobArtifacts, String>> = OnceLock::new();

/// Builds the server (see [`artifacts`]) and the `fixture-tasks` and `jobs` plugins.
pub fn job_artifacts() -> &'static JobArtifacts {
    let built = JOB_ARTIFACTS.get_or_init(|| {
        let [fixture, jobs] = build_plugins(["fixture-tasks", "jobs"])?;
        Ok(JobArtifacts { fixture, jobs })
    });
    match built {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The Prometheus component (tests/prometheus.rs)
// ---------------------------------------------------------------------------------------------

/// The plugins of tests/prometheus.rs, built once.
#[derive(Debug)]
pub struct PromArtifacts {
    /// `target/debug/libprometheus.so`.
    pub prometheus: PathBuf,
    /// `target/debug/libws_echo.so`.
    pub ws_echo: PathBuf,
}

static PROM_ARTIFACTS: OnceLock<Result<PromArtifacts, String>> = OnceLock::new();

/// Builds the server, the job plugins (see [`job_artifacts`]), `prometheus` and `ws-echo`.
pub fn prom_artifacts() -> &'static PromArtifacts {
    job_artifacts();
    let built = PROM_ARTIFACTS.get_or_init(|| {
        let [prometheus, ws_echo] = build_plugins(["prometheus", "ws-echo"])?;
        Ok(PromArtifacts {
            prometheus,
            ws_echo,
        })
    });
    match built {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets (tests/sockets.rs)
// ---------------------------------------------------------------------------------------------

static ECHO: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the server (see [`artifacts`]) and the `echo` plugin; returns `libecho.so`.
pub fn echo_artifact() -> &'static Path {
    let built = ECHO.get_or_init(|| {
        let [echo] = build_plugins(["echo"])?;
        Ok(echo)
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The address a server logged for its socket `index`: `socket INDEX (...) listening on
/// tcp://IP:PORT`.
pub fn parse_socket_addr(text: &str, index: usize) -> Option<SocketAddr> {
    let prefix = format!("socket {index} (");
    text.lines().find_map(|line| {
        let rest = &line[line.find(&prefix)?..];
        let addr = rest.split_once("://")?.1;
        addr.split_whitespace().next()?.parse().ok()
    })
}

/// The path of a program on `PATH` (or in `/usr/sbin`), or `None` and a skip message when it
/// is missing outside CI (`.ci/run` installs `package`, and CI fails without it).
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required in CI: apt-get install {package}"
        );
        eprintln!("skipped: no {name} (apt-get install {package})");
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Deferred and streamed responses (tests/deferred.rs)
// ---------------------------------------------------------------------------------------------

static DEFERRED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Builds the server (see [`artifacts`], which has `hello`) and the `fixture-deferred`
/// plugin; returns `libfixture_deferred.so`.
pub fn deferred_fixture() -> &'static Path {
    let built = DEFERRED.get_or_init(|| {
        let [fixture] = build_plugins(["fixture-deferred"])?;
        Ok(fixture)
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

static CONTEXT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `fixture-context` plugin (request context: a middleware sets, a handler reads).
pub fn context_fixture() -> &'static Path {
    let built = CONTEXT.get_or_init(|| {
        let [fixture] = build_plugins(["fixture-context"])?;
        Ok(fixture)
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// A free TCP port on 127.0.0.1: bound and let go, for a server that must be told its port
/// (another process could take it meanwhile, which a test on loopback does not meet).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
