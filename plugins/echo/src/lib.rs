//! echo: socket handlers for the `sockets` of `server.ron`.
//!
//! - `echo.tcp`, for a socket with `framing: Eof("\r\n")`: answers `plughost: <line>\r\n` to
//!   each line, `plughost: conn <id>\r\n` to `whoami`, and closes after `quit`.
//! - `echo.frames`, for `Length` or `Raw` framing: answers each frame with `plughost: <frame>`
//!   (a `Length` socket puts the header in front).
//! - `echo.udp`, for a UDP socket: answers each datagram with `plughost: <datagram>`.
//! - `echo.push`, an HTTP handler: `POST /echo/push/{conn}` sends the request body to socket
//!   connection `conn`, whichever worker holds it.
//! - `echo.connections`, an HTTP handler: `GET /echo/connections?listen=127.0.0.1:5291` lists
//!   the ids of that socket's open connections, one per line (no `listen`: every socket).
//!
//! Enable it (see `config/sockets.ron`):
//!
//! ```ron
//! plugins: { "echo": (path: "../target/release/libecho.so") },
//! routes: [
//!     (path: "/echo/push/{conn}", handler: "echo.push", methods: ["POST"]),
//!     (path: "/echo/connections", handler: "echo.connections", methods: ["GET"]),
//! ],
//! sockets: [
//!     (listen: "127.0.0.1:5291", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp"),
//! ],
//! ```
//!
//! Try it: `nc -C 127.0.0.1 5291`, type a line, then `quit`; `nc -u 127.0.0.1 5292` for UDP.

use plughost_plugin_api::prelude::*;

/// Line echo; one instance per worker.
struct Lines {
    host: Host,
    /// The answer being built (kept: one allocation per instance, not per line).
    answer: Vec<u8>,
}

impl SocketHandler for Lines {
    fn on_receive(&mut self, conn: u64, frame: &[u8]) {
        // Bytes as they came (no UTF-8 check: a line echo has no use for one).
        self.answer.clear();
        self.answer.extend_from_slice(b"plughost: ");
        match frame {
            b"whoami" => self
                .answer
                .extend_from_slice(format!("conn {conn}").as_bytes()),
            line => self.answer.extend_from_slice(line),
        }
        self.answer.extend_from_slice(b"\r\n");
        // A full send queue closes the connection on the host's side; nothing to do here.
        let _ = self.host.send(conn, &self.answer);
        if frame == b"quit" {
            let _ = self.host.close_socket(conn);
        }
    }
}

/// Frame echo, for `Length` and `Raw` sockets.
struct Frames {
    host: Host,
}

impl SocketHandler for Frames {
    fn on_receive(&mut self, conn: u64, frame: &[u8]) {
        let mut answer = b"plughost: ".to_vec();
        answer.extend_from_slice(frame);
        let _ = self.host.send(conn, &answer);
    }
}

/// Datagram echo, for UDP sockets.
struct Datagrams {
    host: Host,
}

impl SocketHandler for Datagrams {
    fn on_packet(&mut self, peer: u64, _addr: &str, datagram: &[u8]) {
        let mut answer = b"plughost: ".to_vec();
        answer.extend_from_slice(datagram);
        let _ = self.host.send_to(peer, &answer);
    }
}

/// `POST /echo/push/{conn}`: the body, sent to socket connection `conn`.
struct Push {
    host: Host,
}

impl HttpHandler for Push {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let Some(conn) = req.param("conn").and_then(|c| c.parse::<u64>().ok()) else {
            resp.text(
                400,
                "usage: POST /echo/push/{conn} with the bytes to send\n",
            );
            return;
        };
        let worker = self.host.worker_id();
        match self.host.send(conn, req.body.as_slice()) {
            Ok(()) => resp.text(200, &format!("sent to {conn} from worker {worker}\n")),
            Err(HostError::NotFound) => resp.text(404, &format!("no connection {conn}\n")),
            Err(e) => resp.text(409, &format!("{e}\n")),
        };
    }
}

/// `GET /echo/connections?listen=ADDR`: the open connections of a socket, one id per line.
struct Connections {
    host: Host,
}

impl HttpHandler for Connections {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let listen = req.query_param("listen").unwrap_or("");
        let mut text = String::new();
        for id in self.host.socket_connections(listen) {
            text.push_str(&format!("{id}\n"));
        }
        resp.text(200, &text);
    }
}

fn plugin() -> Plugin {
    Plugin::new("echo", env!("CARGO_PKG_VERSION"))
        .socket("tcp", |cx| {
            Ok(Lines {
                host: cx.host().clone(),
                answer: Vec::new(),
            })
        })
        .socket("frames", |cx| {
            Ok(Frames {
                host: cx.host().clone(),
            })
        })
        .socket("udp", |cx| {
            Ok(Datagrams {
                host: cx.host().clone(),
            })
        })
        .http("push", |cx| {
            Ok(Push {
                host: cx.host().clone(),
            })
        })
        .http("connections", |cx| {
            Ok(Connections {
                host: cx.host().clone(),
            })
        })
}

export_plugin!(plugin);

#[cfg(test)]
mod tests {
    use plughost_test::Harness;

    #[test]
    fn lines_are_answered_and_quit_closes() {
        let h = Harness::new(super::plugin());
        let mut lines = h.socket("tcp");
        lines.connect(7, "127.0.0.1:5000").unwrap();
        lines.receive(7, b"hello").unwrap();
        lines.receive(7, b"whoami").unwrap();
        lines.receive(7, b"quit").unwrap();
        let r = h.take();
        let sent: Vec<_> = r.socket_sent.iter().map(|(_, b)| b.as_slice()).collect();
        assert_eq!(
            sent,
            [
                &b"plughost: hello\r\n"[..],
                b"plughost: conn 7\r\n",
                b"plughost: quit\r\n"
            ]
        );
        assert_eq!(r.socket_closed, [7]);
    }

    #[test]
    fn datagrams_are_answered_to_their_peer() {
        let h = Harness::new(super::plugin());
        h.socket("udp").packet(3, "127.0.0.1:9", b"ping").unwrap();
        assert_eq!(h.take().datagrams, [(3, b"plughost: ping".to_vec())]);
    }
}
