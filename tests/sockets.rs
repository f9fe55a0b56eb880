//! `sockets`: extra TCP listeners served by socket handlers (the echo plugin), through real
//! clients (std `TcpStream`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::common::{echo_artifact, parse_socket_addr, Config, Conn, TestServer, IO_TIMEOUT};

const EOF_SOCKET: &str = r#"(listen: "127.0.0.1:0", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp", max_package_bytes: 64)"#;
const LENGTH_SOCKET: &str = r#"(listen: "127.0.0.1:0", protocol: Tcp, framing: Length(header: U32Be, offset: 0, adjust: 0), handler: "echo.frames", max_package_bytes: 16)"#;

/// The echo plugin with its push route and `sockets`, on `workers` workers.
fn echo_server(sockets: &[&str], workers: u32) -> TestServer {
    Config::empty()
        .workers(workers)
        .plugin("echo", echo_artifact())
        .route("/echo/push/{conn}", "echo.push")
        .route("/echo/connections", "echo.connections")
        .extra(&format!("sockets: [{}]", sockets.join(", ")))
        .start()
}

fn socket_addr(server: &TestServer, index: usize) -> SocketAddr {
    parse_socket_addr(&server.logs(), index)
        .unwrap_or_else(|| panic!("no address logged for socket {index}:\n{}", server.logs()))
}

/// A client of a line socket.
struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    /// Whether the server closed the connection (EOF or reset) without sending more.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn eof_framing_answers_each_line_and_quit_closes() {
    let server = echo_server(&[EOF_SOCKET], 2);
    let mut c = Client::connect(socket_addr(&server, 0));
    // One frame split across two writes, then two frames in one write.
    c.send(b"hel");
    c.writer.flush().unwrap();
    c.send(b"lo\r\n");
    assert_eq!(c.line(), "plughost: hello\r\n");
    c.send(b"one\r\ntwo\r\n");
    assert_eq!(c.line(), "plughost: one\r\n");
    assert_eq!(c.line(), "plughost: two\r\n");
    c.send(b"quit\r\n");
    assert_eq!(c.line(), "plughost: quit\r\n");
    assert!(c.closed(), "the connection stays open after quit");
    let mut other = Client::connect(socket_addr(&server, 0));
    other.send(b"still there\r\n");
    assert_eq!(other.line(), "plughost: still there\r\n");
}

#[test]
fn length_framing_adds_and_removes_the_header() {
    let server = echo_server(&[EOF_SOCKET, LENGTH_SOCKET], 2);
    let mut c = Client::connect(socket_addr(&server, 1));
    let frame = |body: &[u8]| [&(body.len() as u32).to_be_bytes()[..], body].concat();
    let mut wire = frame(b"ab");
    wire.extend(frame(b"cde"));
    let third = frame(b"f");
    wire.extend(&third[..2]);
    c.send(&wire);
    c.send(&third[2..]);
    let mut want = frame(b"plughost: ab");
    want.extend(frame(b"plughost: cde"));
    want.extend(frame(b"plughost: f"));
    let mut got = vec![0; want.len()];
    c.reader.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
}

#[test]
fn an_oversize_frame_closes_with_a_log_line() {
    let server = echo_server(&[LENGTH_SOCKET], 1);
    let mut c = Client::connect(socket_addr(&server, 0));
    c.send(&100u32.to_be_bytes());
    assert!(c.closed(), "an oversize frame did not close the connection");
    server.wait_for_log(
        "a frame of 100 bytes is over max_package_bytes (16); closing",
        IO_TIMEOUT,
    );
}

#[test]
fn a_missing_eof_hits_max_package_bytes() {
    let server = echo_server(&[EOF_SOCKET], 1);
    let mut c = Client::connect(socket_addr(&server, 0));
    c.send(&[b'x'; 65]);
    assert!(
        c.closed(),
        "65 bytes without an EOF did not close the connection"
    );
    server.wait_for_log("no EOF within max_package_bytes", IO_TIMEOUT);
}

#[test]
fn an_http_request_on_another_worker_sends_to_a_tcp_connection() {
    let server = echo_server(&[EOF_SOCKET], 2);
    let mut c = Client::connect(socket_addr(&server, 0));
    c.send(b"whoami\r\n");
    let line = c.line();
    let conn: u64 = line
        .trim_end()
        .strip_prefix("plughost: conn ")
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("whoami answered {line:?}"));
    let owner = conn >> 48;
    // New HTTP connections spread over the workers: push until one from another worker did.
    let mut from_other = None;
    for n in 0..200 {
        let body = format!("push {n}\r\n");
        let raw = format!(
            "POST /echo/push/{conn} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let resp = Conn::connect(server.addr()).request(raw);
        assert_eq!(resp.status, 200, "{}", resp.text());
        if !resp.text().ends_with(&format!("from worker {owner}\n")) {
            from_other = Some(n);
            break;
        }
    }
    let n = from_other.expect("no push came from another worker in 200 requests");
    let want = format!("push {n}\r\n");
    for _ in 0..=n {
        if c.line() == want {
            return;
        }
    }
    panic!("the push from another worker did not arrive");
}

#[test]
fn a_push_to_an_unknown_connection_is_a_404() {
    let server = echo_server(&[EOF_SOCKET], 1);
    let raw = "POST /echo/push/12345 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi";
    let resp = Conn::connect(server.addr()).request(raw);
    assert_eq!(resp.status, 404, "{}", resp.text());
}

#[test]
fn a_tcp_socket_without_framing_is_refused_with_its_line() {
    let (status, stderr) = Config::empty()
        .plugin("echo", echo_artifact())
        .extra(r#"sockets: [(listen: "127.0.0.1:0", protocol: Tcp, handler: "echo.tcp")]"#)
        .start_expect_failure();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("server.ron:")
            && stderr.contains("sockets[0].framing")
            && stderr.contains("needs a framing"),
        "{stderr}"
    );
}

/// `config/sockets.ron`, as the README starts it (debug builds, ephemeral ports, a temporary
/// runtime folder): the line echo, `whoami`, the push route and the length-framed echo.
#[test]
fn the_sockets_example_config_serves_what_the_readme_shows() {
    let echo = echo_artifact();
    let root = &crate::common::artifacts().root;
    let text = std::fs::read_to_string(root.join("config/sockets.ron")).unwrap();
    for port in ["5200", "5291", "5292", "5293", "5295"] {
        assert!(
            text.contains(&format!("\"127.0.0.1:{port}\"")),
            "port {port}"
        );
    }
    let debug = echo.parent().unwrap().to_string_lossy().into_owned();
    let text = text
        .replace("../target/release", &debug)
        .replace("127.0.0.1:5200", "127.0.0.1:0")
        .replace("127.0.0.1:5291", "127.0.0.1:0")
        .replace("127.0.0.1:5292", "127.0.0.1:0")
        .replace("127.0.0.1:5295", "127.0.0.1:0")
        .replace("127.0.0.1:5293", "127.0.0.1:0")
        .replace("runtime_dir: \"../run\"", "runtime_dir: \"@DIR@/run\"")
        .replace("unix:../run/echo.sock", "unix:@DIR@/echo.sock");
    let server = TestServer::start(&text);
    let path = server.dir().path().join("echo.sock");
    let unix = std::os::unix::net::UnixStream::connect(&path).unwrap();
    unix.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&unix).write_all(b"over unix\r\nquit\r\n").unwrap();
    let mut answer = String::new();
    (&unix).read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "plughost: over unix\r\nplughost: quit\r\n");
    let mut c = Client::connect(socket_addr(&server, 0));
    c.send(b"whoami\r\n");
    let conn = c.line().trim_end().rsplit(' ').next().unwrap().to_owned();
    let raw = format!(
        "POST /echo/push/{conn} HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nconnection: close\r\n\r\nhi\r\n"
    );
    assert_eq!(Conn::connect(server.addr()).request(raw).status, 200);
    assert_eq!(c.line(), "hi\r\n");
    // The second HTTP port lists the same connection.
    let list = "GET /echo/connections?listen=127.0.0.1:0 HTTP/1.1\r\nhost: x\r\n\r\n";
    let listed = Conn::connect(socket_addr(&server, 4)).request(list);
    assert!(
        listed.text().lines().any(|l| l == conn),
        "{}",
        listed.text()
    );
    let mut framed = Client::connect(socket_addr(&server, 3));
    framed.send(&[0, 0, 0, 1, b'x']);
    let mut got = [0; 15];
    framed.reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\0\0\0\x0bplughost: x");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    udp.send_to(b"dgram", udp_addr(&server, 1)).unwrap();
    let mut buf = [0; 32];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"plughost: dgram");
}

fn udp_addr(server: &TestServer, index: usize) -> SocketAddr {
    let text = server.logs();
    let prefix = format!("socket {index} (");
    text.lines()
        .filter(|l| l.contains(&prefix))
        .find_map(|l| l.split("listening on udp://").nth(1))
        .and_then(|a| a.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no udp address logged for socket {index}:\n{text}"))
}

/// A stop closes the socket connections (the handler sees `on_close`) and the server exits.
#[test]
fn a_stop_closes_socket_connections() {
    let mut server = echo_server(&[EOF_SOCKET], 2);
    let mut c = Client::connect(socket_addr(&server, 0));
    c.send(b"hi\r\n");
    assert_eq!(c.line(), "plughost: hi\r\n");
    server.signal(libc::SIGTERM);
    assert!(c.closed(), "a stop did not close the socket connection");
    let status = server.wait_exit(IO_TIMEOUT);
    assert!(
        status.is_some(),
        "the server did not exit:\n{}",
        server.logs()
    );
    assert!(!server.logs().contains("still busy"), "{}", server.logs());
}

const UDP_SOCKET: &str = r#"(listen: "127.0.0.1:0", protocol: Udp, handler: "echo.udp")"#;

/// UDP: each datagram is answered from the same address with `plughost: <datagram>`, on
/// whichever worker the kernel hands it to.
#[test]
fn udp_datagrams_are_answered() {
    let server = echo_server(&[EOF_SOCKET, UDP_SOCKET], 2);
    let addr = udp_addr(&server, 1);
    for n in 0..4 {
        // Each client from its own port, so the datagrams spread over the workers.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        client
            .send_to(format!("ping {n}").as_bytes(), addr)
            .unwrap();
        let mut buf = [0; 64];
        let (len, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from, addr);
        assert_eq!(&buf[..len], format!("plughost: ping {n}").as_bytes());
    }
}

#[test]
fn a_udp_socket_with_framing_is_refused() {
    let (status, stderr) = Config::empty()
        .plugin("echo", echo_artifact())
        .extra(r#"sockets: [(listen: "127.0.0.1:0", protocol: Udp, framing: Raw, handler: "echo.udp")]"#)
        .start_expect_failure();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("sockets[0].framing"), "{stderr}");
}

/// A unix stream socket: a stale file from a crashed run is replaced, the new one is 0660,
/// it serves like TCP, and a stop removes it.
#[test]
fn a_unix_socket_replaces_a_stale_file_serves_and_is_removed_at_stop() {
    use std::os::unix::{fs::PermissionsExt, net::UnixStream};
    let dir = crate::common::TestDir::new();
    let path = dir.path().join("echo.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale socket file");
    let config = Config::empty()
        .plugin("echo", echo_artifact())
        .route("/echo/connections", "echo.connections")
        .extra(r#"sockets: [(listen: "unix:echo.sock", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp")]"#)
        .render();
    let mut server = TestServer::start_in(dir, &config, &[]);
    let logged = format!("listening on unix:{}", path.display());
    assert!(server.logs().contains(&logged), "{}", server.logs());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
    let stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&stream).write_all(b"whoami\r\n").unwrap();
    let mut whoami = String::new();
    BufReader::new(&stream).read_line(&mut whoami).unwrap();
    let id = whoami.trim_end().strip_prefix("plughost: conn ").unwrap();
    // Known by its path as written, and as bound.
    for listen in [
        "unix:echo.sock".to_string(),
        format!("unix:{}", path.display()),
    ] {
        let listed = server
            .get(&format!("/echo/connections?listen={listen}"))
            .text();
        assert_eq!(listed.trim_end(), id, "{listen}");
    }
    (&stream).write_all(b"hi\r\nquit\r\n").unwrap();
    let mut answer = String::new();
    (&stream).read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "plughost: hi\r\nplughost: quit\r\n");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(IO_TIMEOUT).is_some(), "{}", server.logs());
    assert!(!path.exists(), "the socket file outlived the server");
}

#[test]
fn a_unix_socket_that_is_not_a_stale_socket_is_kept() {
    let dir = crate::common::TestDir::new();
    std::fs::write(dir.path().join("echo.sock"), "not a socket").unwrap();
    let config = Config::empty()
        .plugin("echo", echo_artifact())
        .extra(r#"sockets: [(listen: "unix:echo.sock", protocol: Tcp, framing: Raw, handler: "echo.frames")]"#)
        .render();
    dir.write_config(&config);
    let (status, stderr) = crate::common::start_existing_expect_failure(&dir, &[]);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("echo.sock") && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("echo.sock")).unwrap(),
        "not a socket"
    );
}

/// The main HTTP `listen` on a unix socket (as an nginx upstream would use it): a stale
/// file is replaced, the new one is 0660, it serves HTTP, and a stop removes it.
#[test]
fn the_http_listener_on_a_unix_socket() {
    use std::os::unix::{fs::PermissionsExt, net::UnixStream};
    let dir = crate::common::TestDir::new();
    let path = dir.path().join("http.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut config = Config::hello();
    config.listen = "unix:http.sock".into();
    dir.write_config(&config.render());
    let (mut child, _stdout, stderr) = crate::common::spawn_start(&dir, &[], &[]);
    let logged = format!("listening on unix:{}", path.display());
    let ready = stderr.wait_until(crate::common::START_TIMEOUT, |t| {
        t.contains(&logged) || t.contains("plughost: ")
    });
    assert!(
        ready && stderr.text().contains(&logged),
        "{}",
        stderr.text()
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
    let stream = UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&stream)
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    (&stream).read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(crate::common::HELLO_BODY), "{answer}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = crate::common::wait_child(&mut child, IO_TIMEOUT);
    assert!(status.is_some(), "{}", stderr.text());
    assert!(!path.exists(), "the socket file outlived the server");
}

/// `unix_socket_mode` sets the mode of every socket file; a mode the owner cannot use is
/// refused with its line.
#[test]
fn unix_socket_mode_sets_the_files_mode_and_a_bad_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::common::TestDir::new();
    let config = |mode: &str| {
        Config::empty()
            .plugin("echo", echo_artifact())
            .extra(&format!(
                r#"unix_socket_mode: {mode}, sockets: [(listen: "unix:echo.sock", protocol: Tcp, framing: Raw, handler: "echo.frames")]"#
            ))
            .render()
    };
    dir.write_config(&config("0o444"));
    let (status, stderr) = crate::common::start_existing_expect_failure(&dir, &[]);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("server.ron:")
            && stderr.contains("unix_socket_mode: 0o444 is not a file mode"),
        "{stderr}"
    );
    let server = TestServer::start_in(dir, &config("0o600"), &[]);
    let path = server.dir().path().join("echo.sock");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

/// The address logged last for a socket of handler `handler` (after a reload the indexes
/// start again).
fn last_addr_of(server: &TestServer, handler: &str) -> SocketAddr {
    let text = server.logs();
    let needle = format!("({handler}) listening on tcp://");
    text.lines()
        .rev()
        .find_map(|l| l.split(&needle).nth(1))
        .and_then(|a| a.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no address logged for {handler}:\n{text}"))
}

fn reload(server: &TestServer, n: usize) {
    let out = crate::common::run_plughost([
        "reload".as_ref(),
        "-c".as_ref(),
        server.config_path().as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let done = server.wait_for_log_matching(IO_TIMEOUT, |t| {
        t.matches("] reloaded ").count() + t.matches("reload refused").count() >= n
    });
    assert!(done, "reload {n} did not finish:\n{}", server.logs());
}

/// A reload binds an added socket and closes a removed one (its connections too); a socket
/// that cannot be bound refuses the reload and the running sockets stay.
#[test]
fn a_reload_adds_and_removes_sockets() {
    let config = |sockets: &[&str]| {
        Config::empty()
            .workers(2)
            .plugin("echo", echo_artifact())
            .extra(&format!("sockets: [{}]", sockets.join(", ")))
            .render()
    };
    let server = TestServer::start(&config(&[EOF_SOCKET]));
    let old = last_addr_of(&server, "echo.tcp");
    let mut c = Client::connect(old);
    c.send(b"before\r\n");
    assert_eq!(c.line(), "plughost: before\r\n");

    server.dir().write_config(&config(&[LENGTH_SOCKET]));
    reload(&server, 1);
    assert!(c.closed(), "a connection of the removed socket stays open");
    assert!(
        TcpStream::connect(old).is_err(),
        "the removed socket still accepts"
    );
    let mut framed = Client::connect(last_addr_of(&server, "echo.frames"));
    framed.send(&[0, 0, 0, 1, b'y']);
    let mut got = [0; 15];
    framed.reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\0\0\0\x0bplughost: y");

    // A port in use: the reload is refused, and the running socket keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!(
        r#"(listen: "{}", protocol: Tcp, framing: Raw, handler: "echo.frames")"#,
        taken.local_addr().unwrap()
    );
    server.dir().write_config(&config(&[LENGTH_SOCKET, &busy]));
    reload(&server, 2);
    assert!(
        server.logs().contains("reload refused"),
        "{}",
        server.logs()
    );
    framed.send(&[0, 0, 0, 1, b'z']);
    framed.reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\0\0\0\x0bplughost: z");
}

/// A connection that sends nothing for `heartbeat_idle_time` is closed; an `Eof` peer that
/// sent part of a line and never its EOF is closed the same way, and the log says so.
#[test]
fn silent_connections_hit_the_idle_timeout_and_a_missing_eof_is_named() {
    let idle = r#"(listen: "127.0.0.1:0", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp", heartbeat_idle_time: 1)"#;
    let server = echo_server(&[idle], 1);
    let addr = socket_addr(&server, 0);
    let mut talker = Client::connect(addr);
    let mut silent = Client::connect(addr);
    let mut partial = Client::connect(addr);
    partial.send(b"no end in sight");
    // The talker keeps its connection alive past the idle time by talking.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(1600) {
        talker.send(b"hi\r\n");
        assert_eq!(talker.line(), "plughost: hi\r\n");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(silent.closed(), "a silent connection stays open");
    assert!(partial.closed(), "a connection without its EOF stays open");
    server.wait_for_log(
        "idle for 1 s with 15 bytes buffered and no EOF (\"\\r\\n\") yet; closing",
        IO_TIMEOUT,
    );
    talker.send(b"still\r\n");
    assert_eq!(talker.line(), "plughost: still\r\n");
}

impl Client {
    /// The connection's id, as `whoami` tells it.
    fn whoami(&mut self) -> u64 {
        self.send(b"whoami\r\n");
        let line = self.line();
        line.trim_end()
            .strip_prefix("plughost: conn ")
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("whoami answered {line:?}"))
    }
}

/// `GET /echo/connections?listen=L`: the ids `host.socket_connections(L)` gives, sorted.
fn connections_of(server: &TestServer, listen: &str) -> Vec<u64> {
    let resp = server.get(&format!("/echo/connections?listen={listen}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let mut ids: Vec<u64> = resp.text().lines().map(|l| l.parse().unwrap()).collect();
    ids.sort_unstable();
    ids
}

/// `host.socket_connections(listen)` lists the open connections of one socket, known by its
/// configured `listen` or by the address it is bound to, whichever worker holds them.
#[test]
fn socket_connections_lists_the_connections_of_one_socket() {
    let server = echo_server(&[EOF_SOCKET, LENGTH_SOCKET], 2);
    let (lines, frames) = (socket_addr(&server, 0), socket_addr(&server, 1));
    let mut a = Client::connect(lines);
    let mut b = Client::connect(lines);
    let _framed = Client::connect(frames);
    let mut want = vec![a.whoami(), b.whoami()];
    want.sort_unstable();
    assert_eq!(connections_of(&server, &lines.to_string()), want);
    // The length socket's connection may still be on its way in: wait for it.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while connections_of(&server, &frames.to_string()).len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the framed connection is not listed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Both sockets are configured as 127.0.0.1:0.
    assert_eq!(connections_of(&server, "127.0.0.1:0").len(), 3);
    assert!(connections_of(&server, "127.0.0.1:1").is_empty());
    a.send(b"quit\r\n");
    assert!(a.line().starts_with("plughost: quit"));
    assert!(a.closed());
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while connections_of(&server, &lines.to_string()) != [b.whoami()] {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed connection stays listed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `protocol: Http` serves the main listener's routes, middleware and WebSocket routes on
/// another port; `protocol: WebSocket` serves only the upgrades (anything else: 426).
#[test]
fn http_and_websocket_sockets_serve_the_main_routes() {
    let server = Config::hello()
        .workers(2)
        .plugin("ws-echo", &crate::ws::ws_echo())
        .extra(concat!(
            r#"websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")]), "#,
            r#"sockets: [(listen: "127.0.0.1:0", protocol: Http), (listen: "127.0.0.1:0", protocol: WebSocket)]"#,
        ))
        .start();
    let (http, ws) = (socket_addr(&server, 0), socket_addr(&server, 1));
    let logs = server.logs();
    assert!(
        logs.contains(&format!("serving the routes on http://{http}")),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("serving websocket.routes on ws://{ws}")),
        "{logs}"
    );
    let hello = "GET /hello HTTP/1.1\r\nhost: x\r\n\r\n";
    let main = Conn::connect(server.addr()).request(hello);
    let other = Conn::connect(http).request(hello);
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(other.text(), main.text());
    let refused = Conn::connect(ws).request(hello);
    assert_eq!(refused.status, 426, "{}", refused.text());
    assert_eq!(refused.header("upgrade"), Some("websocket"));
    for addr in [http, ws] {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (mut client, resp) =
            tungstenite::client(format!("ws://{addr}/ws/echo"), stream).expect("handshake");
        assert_eq!(resp.status(), 101);
        client
            .send(tungstenite::Message::text(format!("hi {addr}")))
            .unwrap();
        assert_eq!(
            client.read().unwrap(),
            tungstenite::Message::text(format!("hi {addr}"))
        );
    }
}

/// A port of `protocol: Http` or `WebSocket` takes no handler or framing, and `WebSocket`
/// needs `websocket.enable`.
#[test]
fn http_sockets_refuse_a_handler_and_websocket_sockets_need_websocket() {
    let (status, stderr) = Config::hello()
        .extra(r#"sockets: [(listen: "127.0.0.1:0", protocol: Http, handler: "hello.hello")]"#)
        .start_expect_failure();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("sockets[0].handler") && stderr.contains("takes no handler"),
        "{stderr}"
    );
    let (status, stderr) = Config::hello()
        .extra(r#"sockets: [(listen: "127.0.0.1:0", protocol: WebSocket)]"#)
        .start_expect_failure();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("sockets[0].protocol") && stderr.contains("websocket.enable"),
        "{stderr}"
    );
}

/// `plughost restart` starts a new server beside the old one: it takes over the fixed-port
/// TCP, UDP and HTTP sockets and the unix socket (which the old one, draining, must not
/// remove), and they serve on.
#[test]
fn a_restart_takes_over_fixed_port_and_unix_sockets() {
    let udp = {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        taken.local_addr().unwrap().port()
    };
    let (tcp, http) = (crate::common::free_port(), crate::common::free_port());
    let config = Config::empty()
        .workers(2)
        .plugin("echo", echo_artifact())
        .route("/echo/connections", "echo.connections")
        .extra(&format!(
            r#"sockets: [
                (listen: "127.0.0.1:{tcp}", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp"),
                (listen: "127.0.0.1:{udp}", protocol: Udp, handler: "echo.udp"),
                (listen: "unix:echo.sock", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp"),
                (listen: "127.0.0.1:{http}", protocol: Http),
            ]"#
        ));
    let server = config.start();
    let path = server.dir().path().join("echo.sock");
    let tcp = SocketAddr::from(([127, 0, 0, 1], tcp));
    let mut before = Client::connect(tcp);
    before.send(b"before\r\n");
    assert_eq!(before.line(), "plughost: before\r\n");

    let out =
        crate::common::run_plughost(["restart", "-c", &server.config_path().to_string_lossy()]);
    assert!(out.status.success(), "{out:?}\n{}", server.logs());
    server.wait_for_log("drained and exited with status 0", Duration::from_secs(20));
    // The old server closed its socket connections as it stopped.
    assert!(before.closed(), "a socket connection outlived its server");

    let mut after = Client::connect(tcp);
    after.send(b"again\r\n");
    assert_eq!(after.line(), "plughost: again\r\n");
    let unix = std::os::unix::net::UnixStream::connect(&path).unwrap_or_else(|e| {
        panic!(
            "the unix socket is gone after the restart: {e}\n{}",
            server.logs()
        )
    });
    unix.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&unix).write_all(b"over unix\r\nquit\r\n").unwrap();
    let mut answer = String::new();
    (&unix).read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "plughost: over unix\r\nplughost: quit\r\n");
    let datagrams = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    datagrams.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    datagrams.send_to(b"dgram", ("127.0.0.1", udp)).unwrap();
    let mut buf = [0; 32];
    let (n, _) = datagrams.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"plughost: dgram");
    let list = "GET /echo/connections HTTP/1.1\r\nhost: x\r\n\r\n";
    let listed = Conn::connect(SocketAddr::from(([127, 0, 0, 1], http))).request(list);
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.text().lines().count(), 1, "{}", listed.text());
}

/// A peer that never reads: pushes fill its send queue, the push that overflows it gets
/// `QueueFull`, and the connection is closed and gone from the list, although a write to it
/// is stuck (the socket buffers are full).
#[test]
fn a_peer_that_never_reads_is_closed_when_its_queue_fills() {
    let server = echo_server(&[EOF_SOCKET], 1);
    let mut c = Client::connect(socket_addr(&server, 0));
    let id = c.whoami();
    let body = vec![b'x'; 256 * 1024];
    let mut refused = None;
    for n in 0..2000 {
        let mut raw = format!(
            "POST /echo/push/{id} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(&body);
        let resp = Conn::connect(server.addr()).request(raw);
        if resp.status != 200 {
            refused = Some((n, resp.text()));
            break;
        }
    }
    let (n, why) = refused.expect("2000 pushes of 256 KiB to a peer that never reads all queued");
    assert!(
        why.contains("full") || why.contains("closed"),
        "push {n}: {why}"
    );
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while !connections_of(&server, "").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection of a peer that never reads stays open:\n{}",
            server.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.wait_for_log("send queue full", IO_TIMEOUT);
}

/// Runs `sh -c script` with a timeout; returns its stdout.
fn shell(script: &str) -> String {
    let out = std::process::Command::new("timeout")
        .args(["20", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's clients: `nc -C` for the line echo, `socat` over the unix socket, `nc -u` for
/// UDP, and a Python client for the length-framed echo.
#[test]
fn nc_socat_and_python_clients_get_their_echoes() {
    let (Some(_), Some(_)) = (
        crate::common::tool("nc", "netcat-openbsd"),
        crate::common::tool("socat", "socat"),
    ) else {
        return;
    };
    let udp = r#"(listen: "127.0.0.1:0", protocol: Udp, handler: "echo.udp")"#;
    let unix =
        r#"(listen: "unix:echo.sock", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp")"#;
    let server = echo_server(&[EOF_SOCKET, LENGTH_SOCKET, udp, unix], 2);
    let (lines, frames) = (socket_addr(&server, 0), socket_addr(&server, 1));
    let (host, port) = (lines.ip(), lines.port());
    let got = shell(&format!("printf 'hello\\nquit\\n' | nc -C {host} {port}"));
    assert_eq!(got, "plughost: hello\r\nplughost: quit\r\n");
    let path = server.dir().path().join("echo.sock");
    let got = shell(&format!(
        "printf 'over unix\\nquit\\n' | socat - UNIX-CONNECT:{},crlf",
        path.display()
    ));
    // socat's `crlf` turns the answers' CRLF back into LF.
    assert_eq!(got, "plughost: over unix\nplughost: quit\n");
    let u = udp_addr(&server, 2);
    let got = shell(&format!(
        "printf dgram | nc -u -w 1 {} {}",
        u.ip(),
        u.port()
    ));
    assert_eq!(got, "plughost: dgram");
    let python = format!(
        r#"
import socket, struct
s = socket.create_connection(("{}", {}))
s.sendall(struct.pack(">I", 2) + b"py" + struct.pack(">I", 3)[:2])
s.sendall(struct.pack(">I", 3)[2:] + b"abc")
want = [b"plughost: py", b"plughost: abc"]
buf = b""
for w in want:
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        buf += s.recv(4096)
    n = struct.unpack(">I", buf[:4])[0]
    assert buf[4:4 + n] == w, buf
    buf = buf[4 + n:]
print("ok")
"#,
        frames.ip(),
        frames.port()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &python])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n", "{out:?}");
}
