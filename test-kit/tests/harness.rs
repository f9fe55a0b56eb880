//! The harness against a small plugin built here: each kind of component, what the host
//! records, panics, and log lines.

use plughost_plugin_api::prelude::*;
use plughost_test::{Harness, Sent, TestRequest};

struct Echo {
    host: Host,
}

impl WebSocketHandler for Echo {
    fn on_handshake(&mut self, req: &Request<'_>, resp: &mut Response) -> Handshake {
        if req.query_param("token") == Some("secret") {
            resp.set_header("x-hello", "yes");
            Handshake::Accept
        } else {
            resp.text(401, "no token\n");
            Handshake::Refuse
        }
    }

    fn on_message(&mut self, conn: u64, message: Message<'_>) {
        let _ = self.host.push(conn, message);
        self.host
            .broadcast(Message::text("someone spoke"), "/ws", conn);
    }
}

struct Gate;

impl Middleware for Gate {
    fn on_request(&mut self, req: &Request<'_>, resp: &mut Response) -> Flow {
        if req.header("x-key").is_none() {
            resp.text(403, "no key\n");
            return Flow::Respond;
        }
        Flow::Continue
    }

    fn on_response(&mut self, _req: &Request<'_>, resp: &mut Response) {
        resp.set_header("x-gate", "passed");
    }
}

struct Boom;

impl HttpHandler for Boom {
    fn handle(&mut self, _req: &Request<'_>, _resp: &mut Response) {
        log::warn!("about to fail");
        panic!("boom");
    }
}

/// `GET /add/{a}/{b}`: `?` on a parse error, a 404 for a zero.
struct Add {
    host: Host,
}

impl TryHttpHandler for Add {
    fn handle(&mut self, req: &Request<'_>, resp: &mut Response) -> Result<(), HttpError> {
        let a: u64 = req.param("a").unwrap_or("").parse()?;
        let b: u64 = req.param("b").unwrap_or("").parse()?;
        if a == 0 {
            return Err(HttpError::not_found());
        }
        if b == 0 {
            return Err(HttpError::bad_request("b must not be 0"));
        }
        Broadcast::to_route("/ws", Message::text("added"))
            .except(req.conn_id)
            .send(&self.host);
        resp.text(200, &format!("{}\n", a + b));
        Ok(())
    }
}

fn plugin() -> Plugin {
    Plugin::new("t", "0.1.0")
        .try_http("add", |cx| {
            Ok(Add {
                host: cx.host().clone(),
            })
        })
        .websocket("echo", |cx| {
            Ok(Echo {
                host: cx.host().clone(),
            })
        })
        .middleware("gate", |_| Ok(Gate))
        .http("boom", |_| Ok(Boom))
}

#[test]
fn websocket_handshake_pushes_and_broadcasts_are_recorded() {
    let h = Harness::new(plugin());
    let mut ws = h.websocket("echo", "/ws");
    let refused = ws.handshake(&TestRequest::get("/ws")).unwrap_err();
    assert_eq!(refused.status, 401);
    let req = TestRequest::get("/ws?token=secret");
    let accepted = ws.handshake(&req).unwrap();
    assert_eq!(accepted.header("x-hello"), Some("yes"));
    ws.open(1, &req).unwrap();
    ws.open(2, &req).unwrap();
    ws.text(1, "hi").unwrap();
    let r = h.take();
    assert_eq!(r.pushes, [(1, Sent::Text("hi".into()))]);
    assert_eq!(r.broadcasts.len(), 1);
    assert_eq!(r.broadcasts[0].except, 1);
    ws.close(1, 1000, "bye").unwrap();
    ws.text(1, "after close").unwrap();
    // A push to a closed connection fails (the plugin ignores it): nothing is recorded.
    assert!(h.take().pushes.is_empty());
}

#[test]
fn middleware_answers_or_passes_and_decorates_the_response() {
    let h = Harness::new(plugin());
    let mut gate = h.middleware("gate");
    let denied = gate.on_request(&TestRequest::get("/x")).unwrap();
    assert_eq!((denied.status, denied.text().as_str()), (403, "no key\n"));
    let req = TestRequest::get("/x").header("x-key", "k");
    assert!(gate.on_request(&req).is_none());
    let resp = gate.on_response(&req, 200, b"body");
    assert_eq!(resp.header("x-gate"), Some("passed"));
    assert_eq!(resp.text(), "body");
}

#[test]
fn a_panicking_handler_is_a_500_with_its_message_and_its_log_lines_are_kept() {
    let h = Harness::new(plugin());
    let resp = h.http("boom").get("/boom");
    assert_eq!(resp.status, 500);
    assert!(
        resp.error.as_deref().unwrap_or("").contains("boom"),
        "{resp:?}"
    );
    let logs = h.recorded().logs;
    assert!(
        logs.iter()
            .any(|l| l.level == "WARN" && l.message == "about to fail"),
        "{logs:?}"
    );
}

#[test]
#[should_panic(expected = "no such component")]
fn an_unknown_component_says_so() {
    Harness::new(plugin()).http("nope");
}

#[test]
fn a_fallible_handler_answers_its_errors_and_broadcasts_by_name() {
    let h = Harness::new(plugin());
    let mut add = h.http("add").route("/add/{a}/{b}");
    assert_eq!(add.get("/add/2/3").text(), "5\n");
    let b = &h.take().broadcasts[0];
    assert_eq!((b.route.as_str(), b.except), ("/ws", 1));
    let parse = add.get("/add/x/3");
    assert_eq!(
        (parse.status, parse.text().as_str()),
        (500, "internal server error\n")
    );
    let logged = h.take().logs;
    assert!(
        logged
            .iter()
            .any(|l| l.level == "ERROR" && l.message.contains("invalid digit")),
        "{logged:?}"
    );
    assert_eq!(add.get("/add/0/3").status, 404);
    let bad = add.get("/add/2/0");
    assert_eq!(
        (bad.status, bad.text().as_str()),
        (400, "b must not be 0\n")
    );
}
