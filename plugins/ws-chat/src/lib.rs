//! ws-chat: a chat room over WebSocket, with a page to try it in a browser and an HTTP route
//! that pushes to any connection or user, whichever worker owns the connection.
//!
//! Enable it in `server.ron`:
//!
//! ```ron
//! plugins: { "ws-chat": (path: "../target/release/libws_chat.so", config: { "chat": (token: Some("secret")) }) },
//! routes: [
//!     (path: "/chat", handler: "ws-chat.page", methods: ["GET"]),
//!     (path: "/chat/push", handler: "ws-chat.push", methods: ["POST"]),
//! ],
//! websocket: (enable: true, routes: [(path: "/ws/chat", handler: "ws-chat.chat")]),
//! // Optional: bind users to connections, LaravelS style (push by uid).
//! tables: {
//!     "chat_users": (size: 10000, columns: [(name: "conn", kind: U64), (name: "uid", kind: Str(64))]),
//! },
//! ```
//!
//! Try it: open `http://localhost:5200/chat` in two browser tabs, or
//! `websocat 'ws://localhost:5200/ws/chat?token=secret&uid=ada'`. Every message is broadcast
//! as `#ID: text`; `curl -d hi 'localhost:5200/chat/push?conn=ID'` pushes to one connection,
//! `curl -d hi 'localhost:5200/chat/push?uid=ada'` to the connection user `ada` opened with
//! `?uid=ada`, whichever worker holds it: on open the chat binds `uid:ada -> conn` and
//! `conn:ID -> uid` in the shared table `chat_users` (when `server.ron` declares it), and on
//! close it unbinds them. `/whoami` answers the connection's id, `/instance` when the serving
//! instance was made. Without the token the handshake is refused with 401.

use plughost_plugin_api::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct ChatConfig {
    /// When set, the upgrade needs `?token=...` or an `x-chat-token` header.
    token: Option<String>,
    /// The shared table binding users to connections (a `U64` column `conn`, a `Str` column
    /// `uid`); when `server.ron` does not declare it, `?uid=` is ignored.
    users: String,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            token: None,
            users: "chat_users".into(),
        }
    }
}

/// The users table, when the server has it.
fn users_table(host: &Host, name: &str) -> Option<Table> {
    match host.table(name) {
        Ok(t) => Some(t),
        Err(e) => {
            log::debug!("binding users to connections is off: table {name:?}: {e}");
            None
        }
    }
}

/// The chat room: one instance per worker, all sharing the host's connection registry and
/// the users table.
struct Chat {
    host: Host,
    token: Option<String>,
    users: Option<Table>,
    /// When this instance was made (nanoseconds since the epoch), for `/instance`.
    created: u128,
}

impl Chat {
    /// `uid:UID -> conn` and `conn:CONN -> uid`, so any worker can find the user's connection.
    fn bind(&self, conn: u64, uid: &str) {
        let Some(users) = &self.users else { return };
        let bound = users
            .set(&format!("uid:{uid}"), &Fields::new().u64("conn", conn))
            .and_then(|()| users.set(&format!("conn:{conn}"), &Fields::new().str("uid", uid)));
        if let Err(e) = bound {
            log::warn!("cannot bind user {uid:?} to #{conn}: {e}");
            let _ = self
                .host
                .push_text(conn, &format!("not bound to {uid:?}: {e}"));
        }
    }

    fn unbind(&self, conn: u64) {
        let Some(users) = &self.users else { return };
        let key = format!("conn:{conn}");
        let uid = users.get(&key).ok().flatten();
        let _ = users.del(&key);
        let Some(uid) = uid.as_ref().and_then(|row| row.str("uid")) else {
            return;
        };
        // Unless the user has reconnected since (the binding then names the newer connection).
        let user = format!("uid:{uid}");
        if let Ok(Some(row)) = users.get(&user) {
            if row.u64("conn") == Some(conn) {
                let _ = users.del(&user);
            }
        }
    }
}

impl WebSocketHandler for Chat {
    fn on_handshake(&mut self, req: &Request<'_>, resp: &mut Response) -> Handshake {
        if let Some(token) = &self.token {
            let given = req
                .query_param("token")
                .or_else(|| req.header("x-chat-token"));
            if given != Some(token.as_str()) {
                resp.text(401, "a chat token is required\n");
                return Handshake::Refuse;
            }
        }
        // Pick a subprotocol when the client offers ours.
        let offered = req.header("sec-websocket-protocol").unwrap_or("");
        if offered.split(',').any(|p| p.trim() == "chat.v1") {
            resp.header("sec-websocket-protocol", "chat.v1");
        }
        resp.header("x-chat", "welcome");
        Handshake::Accept
    }

    fn on_open(&mut self, conn: u64, req: &Request<'_>) {
        if let Some(uid) = req.query_param("uid").filter(|u| !u.is_empty()) {
            self.bind(conn, uid);
        }
        self.host
            .broadcast(Message::text(&format!("#{conn} joined")), "", 0);
    }

    fn on_message(&mut self, conn: u64, message: Message<'_>) {
        let text = match message.kind {
            MessageKind::Text => message.as_text(),
            MessageKind::Binary => None,
        };
        match text {
            Some("/panic") => panic!("chat asked to panic by #{conn}"),
            Some("/whoami") => {
                let _ = self.host.push_text(conn, &format!("you are #{conn}"));
            }
            Some("/instance") => {
                let _ = self
                    .host
                    .push_text(conn, &format!("instance {}", self.created));
            }
            Some(text) => {
                self.host
                    .broadcast(Message::text(&format!("#{conn}: {text}")), "", 0);
            }
            None => {
                // Binary messages are echoed back to their sender only.
                let _ = self.host.push(conn, message);
            }
        }
    }

    fn on_close(&mut self, conn: u64, code: u16, _reason: &str) {
        self.unbind(conn);
        self.host
            .broadcast(Message::text(&format!("#{conn} left ({code})")), "", conn);
    }
}

/// `POST /chat/push?conn=ID` or `?uid=UID` with a text body: pushes it to that connection,
/// or to the connection the user is bound to.
struct Push {
    host: Host,
    users: Option<Table>,
}

impl Push {
    /// The connection user `uid` is bound to, or the response that says why there is none.
    fn conn_of(&self, uid: &str, resp: &mut Response) -> Option<u64> {
        let Some(users) = &self.users else {
            resp.text(
                404,
                "users are not bound: the server has no chat_users table\n",
            );
            return None;
        };
        match users.get(&format!("uid:{uid}")) {
            Ok(Some(row)) => row.u64("conn"),
            Ok(None) => {
                resp.text(404, &format!("no connection for user {uid:?}\n"));
                None
            }
            Err(e) => {
                resp.text(400, &format!("uid {uid:?}: {e}\n"));
                None
            }
        }
    }
}

impl HttpHandler for Push {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) {
        let conn = match req.query_param("uid") {
            Some(uid) => match self.conn_of(uid, resp) {
                Some(conn) => Some(conn),
                None => return,
            },
            None => req.query_param("conn").and_then(|c| c.parse::<u64>().ok()),
        };
        let Some(conn) = conn else {
            resp.text(
                400,
                "usage: POST /chat/push?conn=ID or ?uid=UID with the message as the body\n",
            );
            return;
        };
        let text = req.body_str().unwrap_or("");
        match self.host.push_text(conn, text) {
            Ok(()) => resp.text(
                200,
                &format!("pushed to #{conn} from worker {}\n", req.worker_id),
            ),
            Err(HostError::NotFound) => resp.text(404, &format!("no connection #{conn}\n")),
            Err(e) => resp.text(409, &format!("not pushed: {e}\n")),
        };
    }
}

/// `GET /chat/connections`: the open connection ids, one per line.
struct List {
    host: Host,
}

impl HttpHandler for List {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        let mut ids = self.host.connections("");
        ids.sort_unstable();
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        resp.text(200, &text);
    }
}

/// `GET /chat`: the page.
struct Page;

impl HttpHandler for Page {
    fn handle(&mut self, _req: &Request<'_>, resp: &mut Response) {
        resp.send(200, "text/html; charset=utf-8", PAGE);
    }
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>plughost chat</title>
<style>
  body { font: 15px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
  #log { list-style: none; padding: 0; min-height: 10em; border: 1px solid #ccc; }
  #log li { padding: .2em .5em; }
  #status { color: #666; }
</style>
</head>
<body>
<h1>plughost chat</h1>
<p id="status">connecting...</p>
<ul id="log"></ul>
<form id="form"><input id="text" autocomplete="off" autofocus> <button>send</button></form>
<script>
  const params = new URLSearchParams(location.search);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws/chat?token=${encodeURIComponent(params.get("token") || "")}`;
  const log = document.getElementById("log");
  const status = document.getElementById("status");
  const show = (text) => { const li = document.createElement("li"); li.textContent = text; log.appendChild(li); };
  const ws = new WebSocket(url);
  ws.onopen = () => {
    status.textContent = "connected";
    const say = params.get("say");
    if (say) ws.send(say);
  };
  ws.onmessage = (e) => show(e.data);
  ws.onclose = (e) => { status.textContent = `closed (${e.code})`; };
  document.getElementById("form").onsubmit = (e) => {
    e.preventDefault();
    const input = document.getElementById("text");
    if (input.value) { ws.send(input.value); input.value = ""; }
  };
</script>
</body>
</html>
"#;

fn plugin() -> Plugin {
    Plugin::new("ws-chat", env!("CARGO_PKG_VERSION"))
        .websocket("chat", |cx| {
            let config: ChatConfig = cx.config()?;
            Ok(Chat {
                host: cx.host().clone(),
                token: config.token,
                users: users_table(cx.host(), &config.users),
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            })
        })
        .http("push", |cx| {
            let config: ChatConfig = cx.config()?;
            Ok(Push {
                host: cx.host().clone(),
                users: users_table(cx.host(), &config.users),
            })
        })
        .http("connections", |cx| {
            Ok(List {
                host: cx.host().clone(),
            })
        })
        .http("page", |_| Ok(Page))
}

export_plugin!(plugin);
