//! nginx in front of plughost as the README's "Deployment" configures it: its server block,
//! run verbatim (paths and port replaced) by a real nginx, with a unix-socket upstream to the
//! main listener.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{self, Capture, Config, Conn, IO_TIMEOUT, START_TIMEOUT};

/// The README's nginx block (the one that starts with the upgrade map).
fn readme_block() -> String {
    let readme = std::fs::read_to_string(common::artifacts().root.join("README.md")).unwrap();
    let fence = "```nginx\n";
    let start = readme
        .find("```nginx\nmap $http_upgrade")
        .expect("the README's nginx block")
        + fence.len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

/// A running nginx, killed on drop.
struct Nginx {
    child: Child,
    stderr: Capture,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Runs `nginx` in the foreground in `dir`, with the README's block listening on
    /// 127.0.0.1:`port` and proxying to the unix socket `upstream`; waits until it accepts.
    fn start(nginx: &Path, dir: &Path, port: u16, upstream: &Path) -> Nginx {
        let block = readme_block()
            .replace("/srv/app/run/http.sock", &upstream.display().to_string())
            .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        // As root, nginx's workers would run as nobody, who may not use the 0660 socket.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let d = dir.display();
        let conf = format!(
            "{user}worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    \
             proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    \
             uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n{block}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-e", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx");
        let stderr = Capture::spawn(child.stderr.take().unwrap());
        let mut nginx = Nginx { child, stderr };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(addr).is_err() {
            let exited = nginx.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "nginx did not start: {exited:?}\n{}",
                nginx.stderr.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        nginx
    }
}

#[test]
fn nginx_proxies_http_and_websocket_to_a_unix_listen() {
    let Some(nginx) = common::tool("nginx", "nginx-light") else {
        return;
    };
    let dir = common::TestDir::new();
    let socket = dir.path().join("http.sock");
    let mut config = Config::hello()
        .plugin("ws-echo", &crate::ws::ws_echo())
        .extra(
            r#"websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")])"#,
        );
    config.listen = "unix:http.sock".into();
    dir.write_config(&config.render());
    let (mut server, _stdout, stderr) = common::spawn_start(&dir, &[], &[]);
    let ready = stderr.wait_until(START_TIMEOUT, |t| {
        t.contains("ready: listening on unix:") || t.contains("plughost: ")
    });
    assert!(ready && socket.exists(), "{}", stderr.text());
    let port = common::free_port();
    let proxy = Nginx::start(&nginx, dir.path(), port, &socket);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    // Keep-alive from the client to nginx, and (keepalive 64) from nginx to the server.
    let mut conn = Conn::connect(addr);
    for _ in 0..50 {
        let resp = conn.request("GET /hello HTTP/1.1\r\nhost: example.test\r\n\r\n");
        assert_eq!(resp.status, 200, "{}\n{}", resp.text(), proxy.stderr.text());
        assert_eq!(resp.text(), common::HELLO_BODY);
    }
    let missing = conn.request("GET /nope HTTP/1.1\r\nhost: example.test\r\n\r\n");
    assert_eq!(missing.status, 404);

    // A WebSocket upgrade passes through the map and the Upgrade/Connection headers.
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut ws, resp) =
        tungstenite::client(format!("ws://{addr}/ws/echo"), stream).expect("upgrade via nginx");
    assert_eq!(resp.status(), 101);
    for n in 0..10 {
        let text = format!("through nginx {n}");
        ws.send(tungstenite::Message::text(text.clone())).unwrap();
        assert_eq!(ws.read().unwrap(), tungstenite::Message::text(text));
    }
    drop(ws);
    drop(proxy);
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(
        common::wait_child(&mut server, IO_TIMEOUT).is_some(),
        "{}",
        stderr.text()
    );
    assert!(!socket.exists(), "the socket file outlived the server");
}
