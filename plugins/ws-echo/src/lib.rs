//! ws-echo: the smallest WebSocket handler. Every message, text or binary, is sent back to the
//! connection it came from through the host's push (the connection's bounded send queue),
//! which is the path the WebSocket benchmark (`benches/src/bin/ws_bench.rs`) measures.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: { "ws-echo": (path: "../target/release/libws_echo.so") },
//! websocket: (enable: true, routes: [(path: "/ws/echo", handler: "ws-echo.echo")]),
//! ```
//!
//! Try it: `websocat ws://localhost:5200/ws/echo`; every line comes back as it was sent.

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

fn plugin() -> Plugin {
    Plugin::new("ws-echo", env!("CARGO_PKG_VERSION")).websocket("echo", |cx| {
        Ok(Echo {
            host: cx.host().clone(),
        })
    })
}

export_plugin!(plugin);
