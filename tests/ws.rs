//! WebSocket on the HTTP port, through the real binary and the ws-chat example plugin, with
//! tungstenite's blocking client.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use tungstenite::{protocol::frame::coding::CloseCode, Message, WebSocket};

use crate::common::{artifacts, Config, Conn, TestServer, IO_TIMEOUT};

/// `target/debug/lib{package}.so` of a workspace plugin, built once per package.
fn built_plugin(package: &str, cell: &'static OnceLock<PathBuf>) -> PathBuf {
    cell.get_or_init(|| {
        let a = artifacts();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&a.root)
            .args(["build", "-p", package])
            .stdin(Stdio::null())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building {package} failed");
        let path = a
            .hello
            .with_file_name(format!("lib{}.so", package.replace('-', "_")));
        assert!(path.is_file(), "{} missing", path.display());
        path
    })
    .clone()
}

/// `target/debug/libws_chat.so`, built once.
pub(crate) fn ws_chat() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    built_plugin("ws-chat", &PATH)
}

/// `target/debug/libws_echo.so`, built once.
pub(crate) fn ws_echo() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    built_plugin("ws-echo", &PATH)
}

/// hello plus ws-chat with token "secret" on /ws/chat, and `websocket` settings.
fn chat_config(workers: u32, ws_settings: &str) -> Config {
    Config::hello()
        .workers(workers)
        .plugin_config("ws-chat", &ws_chat(), r#"{ "chat": (token: Some("secret")) }"#)
        .route_methods("/chat", "ws-chat.page", &["GET"])
        .route_methods("/chat/push", "ws-chat.push", &["POST"])
        .route("/chat/connections", "ws-chat.connections")
        .extra(&format!(
            r#"websocket: (enable: true, routes: [(path: "/ws/chat", handler: "ws-chat.chat")]{ws_settings})"#
        ))
}

type Client = WebSocket<TcpStream>;

fn connect(addr: SocketAddr) -> Client {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}/ws/chat?token=secret"), stream)
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers().get("x-chat").map(|v| v.to_str().unwrap()),
        Some("welcome")
    );
    ws
}

/// The next message or close, waiting up to `timeout`.
fn next(ws: &mut Client, timeout: Duration) -> Option<Message> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            Ok(m) => return Some(m),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("websocket read failed: {e}"),
        }
    }
    None
}

/// Reads text messages until one satisfies `pred`; panics after 10 s.
fn expect_text(ws: &mut Client, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match next(ws, Duration::from_millis(500)) {
            Some(Message::Text(t)) if pred(t.as_str()) => return t.to_string(),
            Some(Message::Text(t)) => seen.push(t.to_string()),
            Some(other) => panic!("expected text, got {other:?} (seen {seen:?})"),
            None => {}
        }
    }
    panic!("no matching message within 10 s; seen {seen:?}");
}

/// Waits for the server's close frame and returns its code.
fn expect_close(ws: &mut Client, timeout: Duration) -> u16 {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)).unwrap_or(1005),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
    panic!("no close frame within {timeout:?}");
}

fn whoami(ws: &mut Client) -> u64 {
    ws.send(Message::text("/whoami")).unwrap();
    let text = expect_text(ws, |t| t.starts_with("you are #"));
    text.trim_start_matches("you are #").parse().unwrap()
}

#[test]
fn a_message_is_broadcast_to_every_client() {
    let server = TestServer::start(&chat_config(2, "").render());
    let mut clients: Vec<Client> = (0..3).map(|_| connect(server.addr())).collect();
    let ids: Vec<u64> = clients.iter_mut().map(whoami).collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "distinct ids {ids:?}"
    );
    clients[0].send(Message::text("hello room")).unwrap();
    let expected = format!("#{}: hello room", ids[0]);
    for c in clients.iter_mut() {
        expect_text(c, |t| t == expected);
    }
    // The joins were announced too: the last client's join reached the first.
    let mut fresh = connect(server.addr());
    let id = whoami(&mut fresh);
    expect_text(&mut clients[0], |t| t == format!("#{id} joined"));
}

#[test]
fn a_push_from_http_reaches_a_connection_owned_by_another_worker() {
    let server = TestServer::start(&chat_config(2, "").render());
    let mut ws = connect(server.addr());
    let id = whoami(&mut ws);
    let owner = id >> 48;
    // New connections spread over the workers; keep pushing until another worker answers.
    let mut other_worker = None;
    for i in 0..64 {
        let mut conn = Conn::connect(server.addr());
        let body = format!("push {i}");
        let resp = conn.request(format!(
            "POST /chat/push?conn={id} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        assert_eq!(resp.status, 200, "{resp:?}");
        let text = resp.text();
        let worker: u64 = text.trim().rsplit(' ').next().unwrap().parse().unwrap();
        expect_text(&mut ws, |t| t == body);
        if worker != owner {
            other_worker = Some(worker);
            break;
        }
    }
    assert!(
        other_worker.is_some(),
        "no push was answered by a worker other than {owner}"
    );
    // Unknown connection: 404.
    let mut conn = Conn::connect(server.addr());
    let resp = conn
        .request("POST /chat/push?conn=12345 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
    assert_eq!(resp.status, 404);
}

#[test]
fn handshake_without_the_token_is_refused_with_401() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut conn = Conn::connect(server.addr());
    let resp = conn.request(
        "GET /ws/chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(resp.text(), "a chat token is required\n");
    // The same connection still serves HTTP.
    let resp = conn.request("GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(resp.status, 200);
    // A bad upgrade (no key) is a 400.
    let mut conn = Conn::connect(server.addr());
    let resp = conn.request(
        "GET /ws/chat?token=secret HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert_eq!(resp.status, 400, "{resp:?}");
}

#[test]
fn a_silent_connection_is_closed_by_the_heartbeat() {
    let server = TestServer::start(
        &chat_config(1, ", heartbeat_idle_time: 1, heartbeat_check_interval: 1").render(),
    );
    let mut ws = connect(server.addr());
    let started = Instant::now();
    let code = expect_close(&mut ws, Duration::from_secs(10));
    assert_eq!(code, 1000);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
    server.assert_serving();
}

#[test]
fn an_oversized_message_closes_with_1009() {
    let server = TestServer::start(&chat_config(1, ", max_message_size: 1024").render());
    let mut ws = connect(server.addr());
    ws.send(Message::text("x".repeat(2000))).unwrap();
    assert_eq!(expect_close(&mut ws, IO_TIMEOUT), 1009);
    // A message under the limit on another connection is fine.
    let mut ok = connect(server.addr());
    let id = whoami(&mut ok);
    ok.send(Message::text("y".repeat(1000))).unwrap();
    expect_text(&mut ok, |t| t.starts_with(&format!("#{id}: yyy")));
}

#[test]
fn an_invalid_frame_closes_with_1002() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .write_all(
            b"GET /ws/chat?token=secret HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    // A client frame without a mask is a protocol error.
    stream.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    // Skip the "#id joined" broadcast, then find the close frame (opcode 8).
    loop {
        let mut hdr = [0u8; 2];
        stream.read_exact(&mut hdr).unwrap();
        let len = (hdr[1] & 0x7f) as usize;
        assert!(len < 126);
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).unwrap();
        if hdr[0] & 0x0f == 8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            assert_eq!(code, 1002);
            break;
        }
    }
    server.assert_serving();
}

#[test]
fn a_panicking_handler_closes_one_connection_with_1011() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut a = connect(server.addr());
    let mut b = connect(server.addr());
    let b_id = whoami(&mut b);
    a.send(Message::text("/panic")).unwrap();
    assert_eq!(expect_close(&mut a, IO_TIMEOUT), 1011);
    server.wait_for_log("panicked", IO_TIMEOUT);
    b.send(Message::text("still here")).unwrap();
    expect_text(&mut b, |t| t == format!("#{b_id}: still here"));
    server.assert_serving();
    assert_eq!(CloseCode::from(1011), CloseCode::Error);
}

/// The chat instance that serves `ws` (`/instance` answers its creation time).
fn instance(ws: &mut Client) -> String {
    ws.send(Message::text("/instance")).unwrap();
    expect_text(ws, |t| t.starts_with("instance "))
}

#[test]
fn connections_survive_a_reload_of_their_plugin() {
    let server = TestServer::start(&chat_config(2, "").render());
    let mut ws = connect(server.addr());
    let id = whoami(&mut ws);
    let before = instance(&mut ws);
    server.signal(libc::SIGUSR1);
    server.wait_for_log("reloaded plugin hello, ws-chat on 2/2 workers", IO_TIMEOUT);
    ws.send(Message::text("after reload")).unwrap();
    expect_text(&mut ws, |t| t == format!("#{id}: after reload"));
    // The connection is served by the new version's instance now.
    assert_ne!(instance(&mut ws), before);
}

/// ws-chat on /ws/chat and ws-echo on /ws/echo, in `order`.
fn two_routes_config(order: &[&str]) -> Config {
    let routes: Vec<String> = order
        .iter()
        .map(|r| match *r {
            "chat" => r#"(path: "/ws/chat", handler: "ws-chat.chat")"#.to_owned(),
            _ => r#"(path: "/ws/echo", handler: "ws-echo.echo")"#.to_owned(),
        })
        .collect();
    Config::hello()
        .workers(1)
        .plugin_config(
            "ws-chat",
            &ws_chat(),
            r#"{ "chat": (token: Some("secret")) }"#,
        )
        .plugin("ws-echo", &ws_echo())
        .extra("reload: (inotify: true, debounce_ms: 100)")
        .extra(&format!(
            "websocket: (enable: true, routes: [{}])",
            routes.join(", ")
        ))
}

fn connect_echo(addr: SocketAddr) -> Client {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (ws, resp) =
        tungstenite::client(format!("ws://{addr}/ws/echo"), stream).expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

#[test]
fn a_reload_that_reorders_or_removes_websocket_routes() {
    let server = TestServer::start(&two_routes_config(&["chat", "echo"]).render());
    let mut chat = connect(server.addr());
    let mut echo = connect_echo(server.addr());
    let id = whoami(&mut chat);
    echo.send(Message::text("ping")).unwrap();
    expect_text(&mut echo, |t| t == "ping");

    // Reordered: each connection stays with its own handler.
    server
        .dir()
        .write_config(&two_routes_config(&["echo", "chat"]).render());
    server.wait_for_log("reloaded config on 1/1 workers", IO_TIMEOUT);
    chat.send(Message::text("still chat")).unwrap();
    expect_text(&mut chat, |t| t == format!("#{id}: still chat"));
    echo.send(Message::text("still echo")).unwrap();
    expect_text(&mut echo, |t| t == "still echo");

    // /ws/chat removed: its connection closes with 1001 ("going away"), and on_close runs on
    // the chat instance that served it (it tells everyone, the echo client too).
    server
        .dir()
        .write_config(&two_routes_config(&["echo"]).render());
    assert_eq!(expect_close(&mut chat, IO_TIMEOUT), 1001);
    expect_text(&mut echo, |t| t == format!("#{id} left (1001)"));
    echo.send(Message::text("after removal")).unwrap();
    expect_text(&mut echo, |t| t == "after removal");
    server.assert_serving();
    assert!(
        server
            .logs()
            .contains("closing 1 WebSocket connection(s) whose route the reload removed"),
        "{}",
        server.logs()
    );
}

/// One client floods the room with 400 small frames in one write; the three other members,
/// reading as fast as they can, each get all 400 messages: the flooder's worker keeps
/// letting their connections write.
#[test]
fn a_flooding_client_does_not_starve_its_readers() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut flooder = connect(server.addr());
    let id = whoami(&mut flooder);
    let readers: Vec<_> = (0..3)
        .map(|_| flood::reader(connect(server.addr()), id))
        .collect();
    // Every reader is in the room and reading before the flood.
    flood::wait_ready(&readers);
    for i in 0..400 {
        flooder.write(Message::text(format!("m{i}"))).unwrap();
    }
    flooder.flush().unwrap();
    for r in readers {
        let got = r.join().expect("reader thread");
        assert_eq!(got, Ok(400), "{}", server.logs());
    }
}

/// A message far larger than the 1 KiB a connection reads into at a time arrives whole.
#[test]
fn a_message_larger_than_the_read_buffer_arrives_whole() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut ws = connect(server.addr());
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    // ws-chat echoes binary messages to their sender.
    whoami(&mut ws);
    ws.send(Message::binary(big.clone())).unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no binary echo");
        match next(&mut ws, Duration::from_millis(500)) {
            Some(Message::Binary(b)) => break assert!(b[..] == big[..], "the echo differs"),
            Some(Message::Text(_)) | None => {}
            other => panic!("expected the binary echo, got {other:?}"),
        }
    }
    ws.send(Message::text("small after big")).unwrap();
    expect_text(&mut ws, |t| t.ends_with(": small after big"));
}

/// 1000 WebSocket connections opened and closed: the memory they took goes back (a bounded
/// check: at least most of what they added, within 10 s).
#[test]
fn memory_comes_back_after_1000_connections_close() {
    let server = TestServer::start(
        &Config::hello()
            .extra(r#"websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")])"#)
            .plugin("ws-echo", &ws_echo())
            .render(),
    );
    let before = server.server_rss_kb();
    let mut conns = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.write_all(
            b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        conns.push(s);
    }
    for s in &mut conns {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
    }
    let peak = server.server_rss_kb();
    assert!(peak > before, "{before} -> {peak}");
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = server.server_rss_kb();
    while after > before + (peak - before) / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = server.server_rss_kb();
    }
    assert!(
        after <= before + (peak - before) / 2,
        "RSS {before} kB idle, {peak} kB with 1000 connections, still {after} kB after they closed"
    );
}

#[test]
fn info_counts_websocket_connections_per_worker() {
    let server = TestServer::start(&chat_config(1, "").render());
    let mut a = connect(server.addr());
    let mut b = connect(server.addr());
    whoami(&mut a);
    whoami(&mut b);
    let info = crate::common::run_plughost(["info", "-c", &server.config_path().to_string_lossy()]);
    assert!(
        info.stdout
            .contains("2 websocket connections with 0 messages queued"),
        "{}",
        info.stdout
    );
}

/// With `max_messages_per_second`, a client that sends more is closed with 1008; the room
/// goes on.
#[test]
fn a_client_over_the_message_rate_limit_is_closed_with_1008() {
    let server = TestServer::start(&chat_config(1, ", max_messages_per_second: 100").render());
    let mut flooder = connect(server.addr());
    let mut other = connect(server.addr());
    let other_id = whoami(&mut other);
    for i in 0..300 {
        flooder.write(Message::text(format!("m{i}"))).unwrap();
    }
    flooder.flush().unwrap();
    assert_eq!(expect_close(&mut flooder, IO_TIMEOUT), 1008);
    other.send(Message::text("still here")).unwrap();
    expect_text(&mut other, |t| t == format!("#{other_id}: still here"));
}

mod flood {
    //! Reader threads for the flood test.
    use super::*;

    /// A reader: counts the flooder's messages until it has 400, or says how it failed.
    pub struct Reader {
        handle: std::thread::JoinHandle<Result<usize, String>>,
        ready: std::sync::mpsc::Receiver<()>,
    }

    impl Reader {
        pub fn join(self) -> std::thread::Result<Result<usize, String>> {
            self.handle.join()
        }
    }

    pub fn wait_ready(readers: &[Reader]) {
        for r in readers {
            r.ready.recv_timeout(IO_TIMEOUT).expect("reader ready");
        }
    }

    pub(super) fn reader(mut ws: Client, flooder: u64) -> Reader {
        let (tx, ready) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let _ = tx.send(());
            let prefix = format!("#{flooder}: m");
            let mut got = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while got < 400 {
                if Instant::now() > deadline {
                    return Err(format!("only {got} of 400 messages in 20 s"));
                }
                match next(&mut ws, Duration::from_millis(500)) {
                    Some(Message::Text(t)) if t.starts_with(&prefix) => got += 1,
                    Some(Message::Text(_)) => {}
                    Some(Message::Close(f)) => return Err(format!("closed after {got}: {f:?}")),
                    Some(other) => return Err(format!("unexpected {other:?}")),
                    None => {}
                }
            }
            Ok(got)
        });
        Reader { handle, ready }
    }
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of a FIN.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads the linger struct we own, on a socket we own.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

#[test]
fn upgrades_aborted_by_a_reset_leave_no_ghost_connection() {
    let a = artifacts();
    let server = Config::hello()
        .workers(1)
        .plugin("panicky", &a.panicky)
        .extra(r#"websocket: (enable: true, max_connections: 5, routes: [(path: "/ws/slow", handler: "panicky.slow_handshake")])"#)
        .start();
    // Each client resets while its handshake is running: the 101 cannot be written.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream
            .write_all(
                b"GET /ws/slow?ms=60 HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        reset(stream);
    }
    // Five real connections still fit under max_connections: 5, and each works.
    let mut clients = Vec::new();
    for i in 0..5 {
        let stream = TcpStream::connect(server.addr()).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (mut ws, resp) = tungstenite::client(format!("ws://{}/ws/slow", server.addr()), stream)
            .unwrap_or_else(|e| panic!("upgrade {i} refused: {e}\n{}", server.logs()));
        assert_eq!(resp.status(), 101);
        ws.send(Message::text(format!("hi {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("hi {i}")));
        clients.push(ws);
    }
}

/// The browser: Debian's headless Chromium loads `/chat`, which connects, sends a message and
/// writes every message it receives into the page; `--dump-dom` prints the page once the
/// virtual-time budget is spent. Required in CI (`.ci/run` installs chromium); elsewhere the
/// test says it was skipped when there is no Chromium.
#[test]
fn chromium_loads_the_chat_page_and_sees_its_broadcast() {
    let server = TestServer::start(&chat_config(2, "").render());
    let url = format!(
        "http://{}/chat?token=secret&say=hello%20from%20chromium",
        server.addr()
    );
    let Some(dom) = chromium_dom(&server, &url, |dom| {
        dom.contains(": hello from chromium</li>")
    }) else {
        return;
    };
    assert!(
        dom.contains(r#"<p id="status">connected</p>"#),
        "page did not connect:\n{dom}"
    );
    let said = dom
        .split("<li>")
        .filter_map(|li| li.split("</li>").next())
        .find(|li| li.ends_with(": hello from chromium"));
    assert!(
        said.is_some(),
        "the broadcast of the page's own message is missing:\n{dom}"
    );
}

/// The upgrade request runs through the middleware first: one can refuse it before the
/// WebSocket handler sees it.
#[test]
fn middleware_can_refuse_an_upgrade() {
    let a = artifacts();
    let config = chat_config(1, "")
        .plugin_config(
            "timing",
            &a.timing,
            r#"{ "timing": (deny_header: "x-deny") }"#,
        )
        .middleware("timing.timing");
    let server = TestServer::start(&config.render());
    let upgrade = |extra: &str| {
        let mut conn = Conn::connect(server.addr());
        conn.send(format!(
            "GET /ws/chat?token=secret HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ));
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            conn.stream().read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    };
    let refused = upgrade("X-Deny: 1\r\n");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    let accepted = upgrade("");
    assert!(accepted.starts_with("HTTP/1.1 101"), "{accepted}");
}

/// A client that stops reading: pushes queue up to `send_queue`, then the next push is
/// refused and the connection is closed, instead of memory growing without bound.
#[test]
fn a_slow_reader_is_closed_when_its_send_queue_is_full() {
    let server = TestServer::start(&chat_config(2, ", send_queue: 4").render());
    let mut ws = connect(server.addr());
    let id = whoami(&mut ws);
    // From here on the client reads nothing.
    let body = "x".repeat(64 * 1024);
    let mut refused = None;
    for i in 0..2000 {
        let mut conn = Conn::connect(server.addr());
        let resp = conn.request(format!(
            "POST /chat/push?conn={id} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        if resp.status != 200 {
            refused = Some((i, resp.status, resp.text()));
            break;
        }
    }
    let (after, status, text) =
        refused.expect("2000 pushes of 64 KiB to a client that does not read were all accepted");
    assert!(status == 409 || status == 404, "{status} {text}");
    assert!(
        after > 4,
        "refused after only {after} pushes: the socket buffers take some first"
    );
    // The connection is gone from the registry.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let list = server.get("/chat/connections").text();
        if !list.lines().any(|l| l == id.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connection {id} still open: {list}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.assert_serving();
    drop(ws);
}

/// Upgrades past `max_connections` are refused with 503; a closed connection frees its place.
#[test]
fn upgrades_past_max_connections_get_503() {
    let server = TestServer::start(&chat_config(1, ", max_connections: 1").render());
    let mut first = connect(server.addr());
    whoami(&mut first);
    let stream = TcpStream::connect(server.addr()).unwrap();
    match tungstenite::client(
        format!("ws://{}/ws/chat?token=secret", server.addr()),
        stream,
    ) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 503);
        }
        other => panic!("expected a 503, got {:?}", other.map(|(_, r)| r.status())),
    }
    first.close(None).unwrap();
    let _ = expect_close(&mut first, IO_TIMEOUT);
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let stream = TcpStream::connect(server.addr()).unwrap();
        if tungstenite::client(
            format!("ws://{}/ws/chat?token=secret", server.addr()),
            stream,
        )
        .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the place of a closed connection was not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `on_handshake` can pick a subprotocol: its response headers go out with the 101.
#[test]
fn the_handler_picks_a_subprotocol() {
    use tungstenite::client::IntoClientRequest;
    let server = TestServer::start(&chat_config(1, "").render());
    let mut request = format!("ws://{}/ws/chat?token=secret", server.addr())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "other, chat.v1".parse().unwrap());
    let stream = TcpStream::connect(server.addr()).unwrap();
    let (_ws, resp) = tungstenite::client(request, stream).expect("handshake");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat.v1")
    );
}

/// A burst of messages in one write: every echo comes back, in order (the server reads the
/// burst in bursts of its own and writes the replies out together).
#[test]
fn a_burst_of_messages_is_echoed_whole_and_in_order() {
    let server = chat_config(1, "").start();
    let mut ws = connect(server.addr());
    let n = 500u32;
    for i in 0..n {
        ws.write(Message::binary(i.to_be_bytes().to_vec()))
            .expect("queue a message");
    }
    ws.flush().expect("write the burst");
    let mut i = 0;
    while i < n {
        match next(&mut ws, IO_TIMEOUT) {
            Some(Message::Binary(b)) => assert_eq!(&b[..], &i.to_be_bytes(), "echo {i}"),
            Some(Message::Text(t)) if t.ends_with(" joined") => continue,
            other => panic!("echo {i}: {other:?}"),
        }
        i += 1;
    }
    // Still a working connection.
    ws.send(Message::binary(vec![7u8])).unwrap();
    assert_eq!(next(&mut ws, IO_TIMEOUT), Some(Message::binary(vec![7u8])));
}

/// The DOM of `url` as headless Chromium leaves it (`--dump-dom` prints it once the
/// virtual-time budget is spent), loaded until `done` says it is complete: a loaded machine
/// can need more than the first budget, so it tries again with more. `None` when there is
/// no Chromium (required in CI, where `.ci/run` installs it).
pub(crate) fn chromium_dom(
    server: &TestServer,
    url: &str,
    done: impl Fn(&str) -> bool,
) -> Option<String> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(chromium) = chromium else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is required in CI: apt-get install chromium"
        );
        eprintln!("skipped: no chromium (apt-get install chromium)");
        return None;
    };
    let profile = server.dir().path().join("chromium-profile");
    let mut dom = String::new();
    // Virtual time does not wait for WebSocket messages: on a loaded machine an answer can
    // come after the page's time ran out, so a page that is not done is loaded again.
    for budget in [5_000, 20_000, 60_000, 60_000, 60_000] {
        let output = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--dump-dom",
            ])
            .arg(format!("--virtual-time-budget={budget}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("chromium runs");
        dom = String::from_utf8_lossy(&output.stdout).into_owned();
        if done(&dom) {
            break;
        }
    }
    Some(dom)
}
