//! Shared tables and counters through the real binary: the `fixture-tables` plugin
//! (plugins/fixtures/tables) increments from HTTP workers, task workers, a custom process and
//! a thread it spawns; the `tally` example shows exact capacity; `ws-chat` pushes by user id.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use tungstenite::{Message, WebSocket};

use crate::common::{artifacts, run_plughost, Config, Conn, Response, TestServer, IO_TIMEOUT};

const WAIT: Duration = Duration::from_secs(60);

/// The table the fixture expects.
const FIXTURE_TABLE: &str = r#"tables: { "t": (size: 1000, columns: [(name: "n", kind: U64), (name: "name", kind: Str(8))]) }"#;
/// The tally table of config/tables.ron.
const TALLY_TABLE: &str = r#""tally": (size: 1000, columns: [(name: "n", kind: U64)])"#;

/// `target/debug/lib{name}.so` of fixture-tables, tally and ws-chat, built once.
fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let a = artifacts();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&a.root)
            .args([
                "build",
                "-p",
                "fixture-tables",
                "-p",
                "tally",
                "-p",
                "ws-chat",
            ])
            .stdin(Stdio::null())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the table plugins failed");
    });
    a.hello.with_file_name(format!("lib{name}.so"))
}

fn fixture_config() -> Config {
    Config::empty()
        .workers(2)
        .plugin("tables", &plugin("fixture_tables"))
        .route("/tb/*", "tables.ctl")
        .extra("task_worker_num: 2")
        .extra(r#"processes: { "incr": (component: "tables.incr") }"#)
        .extra(FIXTURE_TABLE)
}

fn tally_config() -> Config {
    Config::empty()
        .workers(2)
        .plugin("tally", &plugin("tally"))
        .route_methods("/tally", "tally.tally", &["GET"])
        .route_methods("/tally/{key}", "tally.tally", &["GET", "POST", "DELETE"])
}

/// One request on a new connection, with an optional body.
fn request(server: &TestServer, method: &str, path: &str, body: &str) -> Response {
    let mut conn = Conn::connect(server.addr());
    conn.request(format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

fn ok_text(server: &TestServer, path: &str) -> String {
    let resp = server.get(path);
    assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
    resp.text().trim().to_owned()
}

fn info(server: &TestServer) -> String {
    let out = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "info failed: {}", out.stderr);
    out.stdout
}

#[test]
fn incr_from_workers_task_workers_a_process_and_a_plugin_thread_is_exact() {
    let server = fixture_config().start();
    let n = 100_000;
    assert_eq!(
        ok_text(&server, &format!("/tb/deliver?key=hits&n={n}&tasks=2")),
        "ok 2"
    );
    assert_eq!(
        ok_text(&server, &format!("/tb/send?key=hits&n={n}")),
        "ok 1"
    );
    let addr = server.addr();
    let clients: Vec<_> = ["incr", "incr", "thread"]
        .iter()
        .map(|route| {
            let path = format!("/tb/{route}?key=hits&n={n}");
            thread::spawn(move || crate::common::get_close(addr, &path))
        })
        .collect();
    for c in clients {
        let resp = c.join().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        eprintln!("{}", resp.text().trim());
    }
    let done = |t: &str| {
        t.matches("FIXTURE incr done on=task").count() == 2
            && t.contains("FIXTURE incr done on=process")
    };
    assert!(
        server.wait_for_log_matching(WAIT, done),
        "{}",
        server.logs()
    );
    // 2 workers' requests + 2 tasks + 1 process + 1 plugin thread, 100k each.
    assert_eq!(ok_text(&server, "/tb/get?key=hits"), "n=600000 name=");
    assert_eq!(ok_text(&server, "/tb/counter?name=hits"), "600000");
    let info = info(&server);
    assert!(info.contains("table t: rows 1/1000, "), "{info}");
    assert!(info.contains("counter hits: 600000"), "{info}");
}

#[test]
fn the_1001st_key_is_refused_with_507_and_fits_after_a_delete() {
    let server = tally_config()
        .extra(&format!("tables: {{ {TALLY_TABLE} }}"))
        .start();
    let mut conn = Conn::connect(server.addr());
    let mut post = |key: &str| {
        conn.request(format!(
            "POST /tally/{key} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
        ))
    };
    for i in 0..1000 {
        let resp = post(&format!("key-{i}"));
        assert_eq!(
            (resp.status, resp.text()),
            (200, "1\n".to_owned()),
            "key-{i}"
        );
    }
    let full = post("key-1000");
    assert_eq!(full.status, 507, "{}", full.text());
    assert!(
        full.text()
            .contains("tally is full: all 1000 keys are in use"),
        "{}",
        full.text()
    );
    assert_eq!(post("key-5").text(), "2\n", "an existing key still counts");
    assert_eq!(ok_text(&server, "/tally"), "1000 1000");
    assert_eq!(ok_text(&server, "/tally/key-5"), "2");
    assert_eq!(request(&server, "DELETE", "/tally/key-5", "").status, 204);
    assert_eq!(server.get("/tally/key-5").status, 404);
    assert_eq!(post("key-1000").text(), "1\n");
    assert_eq!(post("key-1001").status, 507);
    let info = info(&server);
    assert!(info.contains("table tally: rows 1000/1000, "), "{info}");
}

#[test]
fn too_long_keys_and_strings_are_refused_never_truncated() {
    let server = fixture_config().start();
    let long = "k".repeat(257);
    assert_eq!(
        server.get(&format!("/tb/set?key={long}&name=a")).text(),
        "err KeyTooLong\n"
    );
    let longest = "k".repeat(256);
    assert_eq!(
        ok_text(&server, &format!("/tb/set?key={longest}&name=a")),
        "ok"
    );
    assert_eq!(ok_text(&server, "/tb/set?key=s&name=12345678"), "ok");
    assert_eq!(
        server.get("/tb/set?key=s&name=123456789").text(),
        "err ValueTooLong\n"
    );
    assert_eq!(ok_text(&server, "/tb/get?key=s"), "n=0 name=12345678");
    assert_eq!(
        server.get("/tb/set?key=new&name=123456789").text(),
        "err ValueTooLong\n"
    );
    assert_eq!(
        server.get("/tb/get?key=new").status,
        404,
        "a refused set creates no row"
    );
    let tally = tally_config()
        .extra(&format!("tables: {{ {TALLY_TABLE} }}"))
        .start();
    assert_eq!(
        request(&tally, "POST", &format!("/tally/{long}"), "").status,
        414
    );
}

#[test]
fn deleting_while_walking_leaves_no_row_behind_and_a_walk_sees_every_row_that_stays() {
    let server = fixture_config().start();
    assert_eq!(
        ok_text(&server, "/tb/churn"),
        "stayed 300/300 dups 0 left 0"
    );
}

#[test]
fn tables_and_counters_survive_a_plugin_reload() {
    let config = tally_config()
        .plugin("tables", &plugin("fixture_tables"))
        .route("/tb/*", "tables.ctl")
        .extra(&format!(
            r#"tables: {{ {TALLY_TABLE}, "t": (size: 10, columns: [(name: "n", kind: U64), (name: "name", kind: Str(8))]) }}"#
        ));
    let server = config.start();
    for _ in 0..3 {
        assert_eq!(request(&server, "POST", "/tally/apples", "").status, 200);
    }
    assert!(ok_text(&server, "/tb/incr?key=x&n=5").starts_with("ok 5 "));
    let out = run_plughost(["reload", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");
    server.wait_for_log("reloaded plugin tables, tally on 2/2 workers", WAIT);
    assert_eq!(ok_text(&server, "/tally/apples"), "3");
    assert_eq!(ok_text(&server, "/tb/counter?name=hits"), "5");
    assert_eq!(ok_text(&server, "/tb/get?key=x"), "n=5 name=");
}

#[test]
fn a_reload_that_changes_a_table_is_refused_and_the_table_keeps_its_rows() {
    let base = tally_config().extra("reload: (inotify: true, debounce_ms: 100)");
    let server = base
        .clone()
        .extra(&format!("tables: {{ {TALLY_TABLE} }}"))
        .start();
    assert_eq!(request(&server, "POST", "/tally/apples", "").text(), "1\n");
    // size 1000 -> 2000, and a route added in the same edit.
    let bigger = TALLY_TABLE.replace("size: 1000", "size: 2000");
    let edited = base
        .route("/count", "tally.tally")
        .extra(&format!("tables: {{ {bigger} }}"));
    server.dir().write_config(&edited.render());
    server.wait_for_log("refusing to change tables.tally (size 1000 -> 2000)", WAIT);
    server.wait_for_log("reloaded config on 2/2 workers", WAIT);
    assert!(
        server.logs().contains("`plughost restart`"),
        "{}",
        server.logs()
    );
    assert_eq!(
        ok_text(&server, "/count"),
        "1 1000",
        "the rest of the edit applies"
    );
    assert_eq!(ok_text(&server, "/tally/apples"), "1");
    let info = info(&server);
    assert!(info.contains("table tally: rows 1/1000, "), "{info}");
}

type Client = WebSocket<TcpStream>;

fn connect_as(server: &TestServer, uid: &str) -> Client {
    let stream = TcpStream::connect(server.addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let url = format!("ws://{}/ws/chat?uid={uid}", server.addr());
    tungstenite::client(url, stream)
        .expect("websocket handshake")
        .0
}

/// Reads text messages until one equals `want`; panics after 10 s.
fn expect(ws: &mut Client, want: &str) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) if t.as_str() == want => return,
            Ok(m) => seen.push(format!("{m:?}")),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("websocket read failed: {e}"),
        }
    }
    panic!("no {want:?} within 10 s; seen {seen:?}");
}

fn whoami(ws: &mut Client) -> u64 {
    ws.send(Message::text("/whoami")).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Message::Text(t)) = ws.read() {
            if let Some(id) = t.as_str().strip_prefix("you are #") {
                return id.parse().unwrap();
            }
        }
    }
    panic!("no answer to /whoami");
}

#[test]
fn a_push_by_uid_reaches_the_user_whichever_worker_holds_the_connection() {
    let server = Config::empty()
        .workers(2)
        .plugin("ws-chat", &plugin("ws_chat"))
        .route_methods("/chat/push", "ws-chat.push", &["POST"])
        .extra(r#"websocket: (enable: true, routes: [(path: "/ws/chat", handler: "ws-chat.chat")])"#)
        .extra(r#"tables: { "chat_users": (size: 100, columns: [(name: "conn", kind: U64), (name: "uid", kind: Str(64))]) }"#)
        .start();
    let mut users: Vec<(String, Client, u64)> = (0..4)
        .map(|i| {
            let uid = format!("user{i}");
            let mut ws = connect_as(&server, &uid);
            let conn = whoami(&mut ws);
            (uid, ws, conn)
        })
        .collect();
    let mut crossed = 0;
    for round in 0..8 {
        for (uid, ws, conn) in users.iter_mut() {
            let body = format!("to {uid} #{round}");
            let resp = request(&server, "POST", &format!("/chat/push?uid={uid}"), &body);
            assert_eq!(resp.status, 200, "{}", resp.text());
            let worker: u64 = resp
                .text()
                .trim()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            crossed += usize::from(worker != *conn >> 48);
            expect(ws, &body);
        }
    }
    assert!(crossed > 0, "no push crossed workers");
    // On close the user is unbound.
    let (uid, mut ws, _) = users.remove(0);
    ws.close(None).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = request(&server, "POST", &format!("/chat/push?uid={uid}"), "x");
        if resp.status == 404 {
            assert!(
                resp.text().contains("no connection for user"),
                "{}",
                resp.text()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{uid} is still bound: {}",
            resp.text()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let info = info(&server);
    assert!(info.contains("table chat_users: rows 6/100, "), "{info}");
}

/// config/tables.ron, pointed at debug builds, an ephemeral port and a temporary runtime
/// folder, serves what plugins/tally's header shows.
#[test]
fn the_tables_example_config_serves_what_the_tally_header_shows() {
    plugin("tally");
    let a = artifacts();
    let debug = a.hello.parent().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(a.root.join("config/tables.ron")).unwrap();
    let text = text
        .replace("../target/release", &debug)
        .replace("\"127.0.0.1:5200\"", "\"127.0.0.1:0\"")
        .replace("runtime_dir: \"../run\"", "runtime_dir: \"@DIR@/run\"");
    let server = TestServer::start(&text);
    assert_eq!(request(&server, "POST", "/tally/apples", "").text(), "1\n");
    assert_eq!(request(&server, "POST", "/tally/apples", "").text(), "2\n");
    assert_eq!(ok_text(&server, "/tally/apples"), "2");
    assert_eq!(ok_text(&server, "/tally"), "1 1000");
    assert_eq!(request(&server, "DELETE", "/tally/apples", "").status, 204);
    assert_eq!(server.get("/tally/apples").status, 404);
}
