//! ws-echo: the smallest WebSocket handler. Every message, text or binary, is sent back to the
//! connection it came from through the host's push (the connection's bounded send queue),
//! which is the path the WebSocket benchmark (`benches/src/bin/ws_bench.rs`) measures.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: { "ws-echo": (path: "../target/release/libws_echo.so") },
//! routes: [(path: "/echo", handler: "ws-echo.page", methods: ["GET"])],
//! websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")]),
//! ```
//!
//! A second handler, `ws-echo.fanout`, broadcasts every message to every connection on its
//! route (`/ws/fanout`, or `config: { "fanout": (route: Some("/path")) }`).
//!
//! Try it: `websocat ws://localhost:5200/ws/echo`; every line comes back as it was sent. Or
//! open `http://localhost:5200/echo` in a browser: the page sends a 64 KiB text message to
//! `/ws/echo` (another path with `?ws=/path`) and shows whether it came back whole, and the
//! extensions the browser and the server agreed on (`permessage-deflate` by default).

use plughost_plugin_api::prelude::*;

/// One instance per worker; it keeps nothing but the host handle.
struct Echo {
    host: Host,
}

impl WebSocketHandler for Echo {
    fn on_message(&mut self, conn: u64, message: Message<'_>) {
        // A full send queue closes the connection (1008) on the host's side; nothing to do here.
        let _ = self.host.push(conn, message);
    }
}

/// Broadcasts every message it receives to every connection on its route, the sender
/// included: the fan-out the WebSocket benchmark measures. Its route is `fanout.route` in
/// the plugin's config (default `/ws/fanout`).
struct Fanout {
    host: Host,
    route: String,
}

impl WebSocketHandler for Fanout {
    fn on_message(&mut self, _conn: u64, message: Message<'_>) {
        self.host.broadcast(message, &self.route, 0);
    }
}

/// `fanout`'s config.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct FanoutConfig {
    /// The route it broadcasts to.
    route: Option<String>,
}

/// The page that tries the echo from a browser.
struct Page;

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ws-echo</title></head>
<body>
<p id="extensions">connecting</p>
<p id="result">waiting</p>
<script>
const path = new URLSearchParams(location.search).get("ws") || "/ws/echo";
const ws = new WebSocket(`ws://${location.host}${path}`);
const sent = "héllo wörld ✓ ".repeat(5000).slice(0, 65536);
ws.onopen = () => {
  document.getElementById("extensions").textContent = "extensions: " + ws.extensions;
  ws.send(sent);
};
ws.onmessage = (e) => {
  document.getElementById("result").textContent =
    e.data === sent ? `echo ok: ${e.data.length} characters` : "echo differs";
  ws.close(1000);
};
ws.onerror = () => { document.getElementById("result").textContent = "error"; };
</script>
</body></html>
"#;

impl HttpHandler for Page {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        resp.send(200, "text/html; charset=utf-8", PAGE);
    }
}

fn plugin() -> Plugin {
    Plugin::new("ws-echo", env!("CARGO_PKG_VERSION"))
        .websocket("echo", |cx| {
            Ok(Echo {
                host: cx.host().clone(),
            })
        })
        .websocket("fanout", |cx| {
            let config: FanoutConfig = cx.config()?;
            Ok(Fanout {
                host: cx.host().clone(),
                route: config.route.unwrap_or_else(|| "/ws/fanout".into()),
            })
        })
        .http("page", |_| Ok(Page))
}

export_plugin!(plugin);
