//! The Apollo plugin against a fake Apollo config service that speaks the real protocol
//! (`/configs/...` answering 200, 304 or 404; `/notifications/v2` held until a change or the
//! hold's end, then 200 or 304; the access key's signature checked when it has a secret).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::common::{artifacts, Config, TestDir, TestServer};

/// How long a change may take to reach every worker (it takes well under a second).
const PROPAGATION: Duration = Duration::from_secs(5);
const APP: &str = "SampleApp";

// ---------------------------------------------------------------------------------------------
// The fake Apollo
// ---------------------------------------------------------------------------------------------

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As Apollo does.
    Up,
    /// Closes every connection without an answer.
    Down,
    /// 200 with a body that is not JSON.
    Malformed,
}

#[derive(Debug)]
struct Namespace {
    notification_id: i64,
    release: u64,
    values: BTreeMap<String, String>,
}

impl Namespace {
    fn release_key(&self, name: &str) -> String {
        format!("{name}-{}", self.release)
    }
}

/// One request the fake answered: what it was and the status (0: closed without one).
#[derive(Debug, Clone)]
struct Hit {
    notifications: bool,
    status: u16,
    at: Instant,
}

#[derive(Debug)]
struct State {
    namespaces: BTreeMap<String, Namespace>,
    hold: Duration,
    secret: Option<String>,
    mode: Mode,
    hits: Vec<Hit>,
    /// Notification requests being held now.
    holding: usize,
    /// Requests whose signature checked out.
    signed: usize,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

/// A fake Apollo config service on an ephemeral port, one thread per connection.
struct FakeApollo {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeApollo {
    /// Serves `namespaces` (name and values), holding notification requests up to `hold`.
    fn start(namespaces: &[(&str, &[(&str, &str)])], hold: Duration) -> FakeApollo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let namespaces = namespaces
            .iter()
            .map(|(name, values)| {
                let ns = Namespace {
                    notification_id: 1,
                    release: 1,
                    values: to_map(values),
                };
                (name.to_string(), ns)
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                namespaces,
                hold,
                secret: None,
                mode: Mode::Up,
                hits: Vec::new(),
                holding: 0,
                signed: 0,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || serve(&s, conn));
            }
        });
        FakeApollo { addr, shared }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    fn set_secret(&self, secret: &str) {
        self.lock().secret = Some(secret.into());
    }

    fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
        self.shared.changed.notify_all();
    }

    /// Publishes a new release of `namespace` and wakes the held notification requests.
    fn publish(&self, namespace: &str, values: &[(&str, &str)]) {
        let mut state = self.lock();
        let ns = state
            .namespaces
            .get_mut(namespace)
            .expect("a namespace of the fake");
        ns.notification_id += 1;
        ns.release += 1;
        ns.values = to_map(values);
        drop(state);
        self.shared.changed.notify_all();
    }

    fn hits(&self) -> Vec<Hit> {
        self.lock().hits.clone()
    }

    fn count(&self, pred: impl Fn(&Hit) -> bool) -> usize {
        self.lock().hits.iter().filter(|h| pred(h)).count()
    }

    /// Waits until `pred` holds of the fake's state (at most `timeout`).
    fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !pred(&state) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "the fake Apollo did not see {what} within {timeout:?}: {state:?}"
            );
            state = self
                .shared
                .changed
                .wait_timeout(state, (deadline - now).min(Duration::from_millis(50)))
                .unwrap()
                .0;
        }
    }
}

impl Drop for FakeApollo {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let _ = TcpStream::connect(self.addr);
    }
}

fn to_map(values: &[(&str, &str)]) -> BTreeMap<String, String> {
    values
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Answers one request and closes.
fn serve(shared: &Shared, mut conn: TcpStream) {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let notifications = target.starts_with("/notifications/v2");
    let (status, body) = answer(shared, &target, &header);
    let mut state = shared.state.lock().unwrap();
    state.hits.push(Hit {
        notifications,
        status,
        at: Instant::now(),
    });
    drop(state);
    shared.changed.notify_all();
    if status == 0 {
        return; // Down: close without an answer.
    }
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let _ = conn.write_all(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// The status (0: close without one) and body for a request.
fn answer(shared: &Shared, target: &str, header: &dyn Fn(&str) -> Option<String>) -> (u16, String) {
    let mut state = shared.state.lock().unwrap();
    match state.mode {
        Mode::Down => return (0, String::new()),
        Mode::Malformed => return (200, "{\"configurations\": [oops".into()),
        Mode::Up => {}
    }
    if let Some(secret) = state.secret.clone() {
        let timestamp = header("timestamp").unwrap_or_default();
        let expected = format!("Apollo {APP}:{}", signature(&secret, &timestamp, target));
        if header("authorization") != Some(expected) {
            return (401, String::new());
        }
        state.signed += 1;
    }
    drop(state);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    let segments: Vec<String> = path.split('/').skip(1).map(decode).collect();
    match segments.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["configs", app, cluster, namespace] if app == APP && cluster == "default" => {
            configs(shared, namespace, query.get("releaseKey"))
        }
        ["notifications", "v2"] if query.get("appId").map(String::as_str) == Some(APP) => {
            notifications(
                shared,
                query.get("notifications").map_or("", String::as_str),
            )
        }
        _ => (404, String::new()),
    }
}

fn configs(shared: &Shared, namespace: &str, release_key: Option<&String>) -> (u16, String) {
    let state = shared.state.lock().unwrap();
    let Some(ns) = state.namespaces.get(namespace) else {
        return (404, String::new());
    };
    let key = ns.release_key(namespace);
    if release_key == Some(&key) {
        return (304, String::new());
    }
    let body = serde_json::json!({
        "appId": APP,
        "cluster": "default",
        "namespaceName": namespace,
        "configurations": ns.values,
        "releaseKey": key,
    });
    (200, body.to_string())
}

/// 200 at once with the namespaces whose id is newer, else held until one is or the hold ends.
fn notifications(shared: &Shared, list: &str) -> (u16, String) {
    let Ok(serde_json::Value::Array(known)) = serde_json::from_str::<serde_json::Value>(list)
    else {
        return (400, String::new());
    };
    let mut state = shared.state.lock().unwrap();
    let deadline = Instant::now() + state.hold;
    state.holding += 1;
    let answer = loop {
        let newer: Vec<_> = known
            .iter()
            .filter_map(|n| {
                let name = n["namespaceName"].as_str()?;
                let id = n["notificationId"].as_i64()?;
                let ns = state.namespaces.get(name)?;
                (ns.notification_id > id).then(|| {
                    let detail = format!("{APP}+default+{name}");
                    serde_json::json!({
                        "namespaceName": name,
                        "notificationId": ns.notification_id,
                        "messages": {"details": {detail: ns.notification_id}},
                    })
                })
            })
            .collect();
        if !newer.is_empty() {
            break (200, serde_json::Value::Array(newer).to_string());
        }
        let now = Instant::now();
        if now >= deadline || state.mode != Mode::Up || shared.stop.load(Ordering::SeqCst) {
            break (304, String::new());
        }
        state = shared
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap()
            .0;
    };
    state.holding -= 1;
    answer
}

fn signature(secret: &str, timestamp: &str, target: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}\n{target}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// hello (with `/env/{key}` answering `host.env(key)`) and apollo on `/apollo`, its start hook
/// and, with `process`, its watch process; `extra` goes into the component's config.
fn config(server: &str, extra: &str, process: bool) -> Config {
    let a = artifacts();
    let component = format!(
        "{{ \"apollo\": (server: {server:?}, app_id: {APP:?}, namespaces: [\"application\", \"db\"], pull_timeout_ms: 2000{extra}) }}"
    );
    let c = Config::hello()
        .plugin_config("apollo", &a.apollo, &component)
        .route_methods("/env/{key}", "hello.env", &["GET"])
        .route_methods("/apollo", "apollo.apollo", &["GET"])
        .hook("apollo.apollo")
        .extra("env_file: Some(\"@DIR@/.env\")");
    if process {
        c.extra("processes: { \"apollo\": (component: \"apollo.apollo\") }")
    } else {
        c
    }
}

fn env_path(dir: &TestDir) -> PathBuf {
    dir.path().join(".env")
}

/// `/env/{key}` as each of the 2 workers answers it.
fn env_on_each_worker(server: &TestServer, key: &str) -> Vec<String> {
    server
        .first_answer_of_each_worker(&format!("/env/{key}"), 2)
        .iter()
        .map(|r| r.text())
        .collect()
}

/// Polls until every worker answers `value` for `key`.
fn wait_for_env(server: &TestServer, key: &str, value: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = env_on_each_worker(server, key);
        if seen.iter().all(|v| v == &format!("{value}\n")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} is {seen:?} on the workers, not {value:?}, after {timeout:?}:\n{}",
            server.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn sample() -> FakeApollo {
    sample_with_hold(Duration::from_secs(30))
}

fn sample_with_hold(hold: Duration) -> FakeApollo {
    FakeApollo::start(
        &[
            (
                "application",
                &[("GREETING", "hello, apollo"), ("DB_HOST", "db.internal")],
            ),
            ("db", &[("POOL", "5"), ("DB_HOST", "shadowed")]),
        ],
        hold,
    )
}

/// A port nothing listens on.
fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn file_identity(path: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn start_pulls_every_namespace_and_writes_the_env_file() {
    let apollo = sample();
    let dir = TestDir::new();
    let server = TestServer::start_in(dir.clone(), &config(&apollo.url(), "", false).render(), &[]);
    let text = std::fs::read_to_string(env_path(&dir)).unwrap();
    assert!(text.contains("# namespace: application\n# release: application-1\nDB_HOST=db.internal\nGREETING=\"hello, apollo\"\n"), "{text}");
    assert!(
        text.contains("# namespace: db\n# release: db-1\n# shadowed: DB_HOST=shadowed\nPOOL=5\n"),
        "{text}"
    );
    // The first namespace wins a key; the other's stays as a comment for later changes.
    assert!(text.contains("# shadowed: DB_HOST=shadowed\n"), "{text}");
    // The workers serve only after the file is written: every one sees it at once.
    assert_eq!(
        env_on_each_worker(&server, "GREETING"),
        ["hello, apollo\n"; 2]
    );
    assert_eq!(env_on_each_worker(&server, "POOL"), ["5\n"; 2]);
    assert_eq!(env_on_each_worker(&server, "DB_HOST"), ["db.internal\n"; 2]);
    let status = server.get("/apollo").text();
    assert!(
        status.contains("\"releaseKey\": \"application-1\""),
        "{status}"
    );
    assert!(status.contains("\"lastChange\": \""), "{status}");
    assert_eq!(apollo.count(|h| !h.notifications && h.status == 200), 2);
}

#[test]
fn a_published_change_reaches_every_worker() {
    let apollo = sample();
    let dir = TestDir::new();
    let server = TestServer::start_in(dir.clone(), &config(&apollo.url(), "", true).render(), &[]);
    // The process's first poll answers at once; the next one is held.
    apollo.wait_for(Duration::from_secs(10), "a held poll", |s| s.holding > 0);
    assert_eq!(
        env_on_each_worker(&server, "GREETING"),
        ["hello, apollo\n"; 2]
    );
    apollo.publish(
        "application",
        &[("GREETING", "changed live"), ("DB_HOST", "db.internal")],
    );
    wait_for_env(&server, "GREETING", "changed live", PROPAGATION);
    server.wait_for_log(
        "reload requested by plugin apollo: Apollo changed application (release application-2)",
        PROPAGATION,
    );
    let text = std::fs::read_to_string(env_path(&dir)).unwrap();
    assert!(text.contains("GREETING=\"changed live\""), "{text}");
    // A key removed in Apollo is gone from the file and from host.env.
    apollo.publish("application", &[("GREETING", "changed live")]);
    wait_for_env(&server, "DB_HOST", "shadowed", PROPAGATION);
}

#[test]
fn polls_answered_304_do_not_rewrite_the_env_file() {
    let apollo = sample_with_hold(Duration::from_millis(200));
    let dir = TestDir::new();
    let server = TestServer::start_in(dir.clone(), &config(&apollo.url(), "", true).render(), &[]);
    let polls_304 = |s: &State| {
        s.hits
            .iter()
            .filter(|h| h.notifications && h.status == 304)
            .count()
    };
    apollo.wait_for(Duration::from_secs(10), "a poll answered 304", |s| {
        polls_304(s) >= 1
    });
    let before = file_identity(&env_path(&dir));
    let pulls = apollo.count(|h| !h.notifications);
    apollo.wait_for(Duration::from_secs(20), "5 more polls answered 304", |s| {
        polls_304(s) >= 6
    });
    assert_eq!(file_identity(&env_path(&dir)), before);
    assert_eq!(
        apollo.count(|h| !h.notifications),
        pulls,
        "no pull after a 304"
    );
    assert!(
        !server.logs().contains("reload requested"),
        "{}",
        server.logs()
    );
}

#[test]
fn apollo_down_at_start_keeps_the_env_file() {
    let dir = TestDir::new();
    std::fs::write(env_path(&dir), "GREETING=kept\n").unwrap();
    let server = TestServer::start_in(
        dir.clone(),
        &config(&closed_port(), "", false).render(),
        &[],
    );
    assert!(
        server.logs().contains("keeping the existing env file"),
        "{}",
        server.logs()
    );
    assert_eq!(
        std::fs::read_to_string(env_path(&dir)).unwrap(),
        "GREETING=kept\n"
    );
    assert_eq!(env_on_each_worker(&server, "GREETING"), ["kept\n"; 2]);
    drop(server);

    let (status, stderr) =
        config(&closed_port(), ", fail_on_start_error: true", false).start_expect_failure();
    assert!(!status.success());
    assert!(
        stderr.contains("apollo.apollo: on_server_prepare failed")
            && stderr.contains("fail_on_start_error"),
        "{stderr}"
    );
}

#[test]
fn apollo_down_later_backs_off_without_flooding_the_log() {
    let apollo = sample_with_hold(Duration::from_millis(200));
    let dir = TestDir::new();
    let server = TestServer::start_in(dir.clone(), &config(&apollo.url(), "", true).render(), &[]);
    apollo.wait_for(Duration::from_secs(10), "a poll answered 304", |s| {
        s.hits.iter().any(|h| h.notifications && h.status == 304)
    });
    apollo.set_mode(Mode::Down);
    let failed = |s: &State| s.hits.iter().filter(|h| h.status == 0).count();
    apollo.wait_for(Duration::from_secs(20), "3 failed attempts", |s| {
        failed(s) >= 3
    });
    let at: Vec<Instant> = apollo
        .hits()
        .iter()
        .filter(|h| h.status == 0)
        .map(|h| h.at)
        .collect();
    // Waits of 1 s then 2 s (a lower bound: each retry comes after its backoff).
    assert!(
        at[1] - at[0] >= Duration::from_millis(950),
        "{:?}",
        at[1] - at[0]
    );
    assert!(
        at[2] - at[1] >= Duration::from_millis(1950),
        "{:?}",
        at[2] - at[1]
    );
    let warnings = server.logs().matches("the env file stays as it is").count();
    assert_eq!(warnings, 1, "{}", server.logs());
    // Back up: the next attempt (after 4 s) takes the change.
    apollo.set_mode(Mode::Up);
    apollo.publish("application", &[("GREETING", "after the outage")]);
    wait_for_env(
        &server,
        "GREETING",
        "after the outage",
        Duration::from_secs(15),
    );
    server.wait_for_log("answers again (after 3 failed attempts)", PROPAGATION);
}

#[test]
fn a_malformed_response_is_refused_and_the_env_file_kept() {
    let apollo = sample_with_hold(Duration::from_millis(200));
    apollo.set_mode(Mode::Malformed);
    let dir = TestDir::new();
    std::fs::write(env_path(&dir), "GREETING=kept\n").unwrap();
    let server = TestServer::start_in(dir.clone(), &config(&apollo.url(), "", true).render(), &[]);
    assert!(
        server.logs().contains("malformed response: configs:"),
        "{}",
        server.logs()
    );
    assert_eq!(env_on_each_worker(&server, "GREETING"), ["kept\n"; 2]);
    server.wait_for_log("malformed response: notifications:", PROPAGATION);
    assert_eq!(
        std::fs::read_to_string(env_path(&dir)).unwrap(),
        "GREETING=kept\n"
    );
    // Once Apollo answers properly, the process takes its values.
    apollo.set_mode(Mode::Up);
    wait_for_env(
        &server,
        "GREETING",
        "hello, apollo",
        Duration::from_secs(10),
    );
}

#[test]
fn the_access_key_signature_is_checked_by_apollo() {
    let apollo = sample();
    apollo.set_secret("df23df3f59884980844ff3dada30fa97");
    let dir = TestDir::new();
    let good = ", secret: \"df23df3f59884980844ff3dada30fa97\"";
    let server = TestServer::start_in(
        dir.clone(),
        &config(&apollo.url(), good, true).render(),
        &[],
    );
    apollo.wait_for(Duration::from_secs(10), "a held signed poll", |s| {
        s.holding > 0
    });
    assert_eq!(
        env_on_each_worker(&server, "GREETING"),
        ["hello, apollo\n"; 2]
    );
    assert_eq!(apollo.count(|h| h.status == 401), 0);
    assert!(apollo.lock().signed >= 3, "{:?}", apollo.hits());
    drop(server);

    let bad = ", secret: \"wrong\", fail_on_start_error: true";
    let (status, stderr) = config(&apollo.url(), bad, false).start_expect_failure();
    assert!(!status.success());
    assert!(stderr.contains("status 401"), "{stderr}");
}

/// The host side alone: `plughost reload` re-reads `env_file` for every worker (it was read
/// once at start before).
#[test]
fn plughost_reload_rereads_the_env_file_on_every_worker() {
    let dir = TestDir::new();
    std::fs::write(env_path(&dir), "GREETING=before\n").unwrap();
    let config = Config::hello()
        .route_methods("/env/{key}", "hello.env", &["GET"])
        .extra("env_file: Some(\"@DIR@/.env\")");
    let server = TestServer::start_in(dir.clone(), &config.render(), &[]);
    assert_eq!(env_on_each_worker(&server, "GREETING"), ["before\n"; 2]);
    std::fs::write(env_path(&dir), "GREETING=\"after \\\"the\\\" reload\"\n").unwrap();
    let out =
        crate::common::run_plughost(["reload", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    wait_for_env(&server, "GREETING", "after \"the\" reload", PROPAGATION);
}
