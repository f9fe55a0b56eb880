//! How pushes reach a WebSocket connection: a handler's push to the connection it is serving
//! is written directly, yet never overtakes what other threads queued first; a broadcast is
//! framed once for all its receivers; a client that stops reading is still cut off.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use tungstenite::Message;

use crate::common::{artifacts, run_plughost, Config, TestServer, IO_TIMEOUT};
use crate::ws::ws_echo;

/// The panicky fixture's `order`, `fanout` and `fanecho` handlers, and ws-echo (whose
/// `fanout` on `/ws/shout` broadcasts to `/ws/fanout`).
fn config(ws_settings: &str) -> Config {
    Config::hello()
        .workers(2)
        .plugin("panicky", &artifacts().panicky)
        .plugin("ws-echo", &ws_echo())
        .extra(&format!(
            r#"websocket: (enable: true, routes: [
                (path: "/ws/order", handler: "panicky.order"),
                (path: "/ws/fanout", handler: "panicky.fanout"),
                (path: "/ws/fanecho", handler: "panicky.fanecho"),
                (path: "/ws/echo", handler: "ws-echo.echo"),
                (path: "/ws/shout", handler: "ws-echo.fanout"),
            ]{ws_settings})"#
        ))
}

fn connect(server: &TestServer, path: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{}{path}", server.addr()), stream)
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

fn websocket_connections(server: &TestServer) -> u64 {
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]).stdout;
    info.lines()
        .filter_map(|l| l.split_once(" websocket connections with "))
        .filter_map(|(before, _)| before.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// For each message the handler pushes `a` directly, `b` from another thread (queued), then
/// `c` and `d`, which must wait behind `b`. 300 rounds sent at once, so that rounds overlap
/// with what is still queued from the round before: every round arrives as a, b, c, d, and
/// the rounds in order.
#[test]
fn a_direct_push_never_overtakes_what_another_thread_queued() {
    let server = TestServer::start(&config("").render());
    let mut ws = connect(&server, "/ws/order");
    for round in 0..300 {
        ws.write(Message::text(round.to_string())).unwrap();
    }
    ws.flush().unwrap();
    let mut got = Vec::new();
    while got.len() < 1200 {
        match ws.read().expect("the pushes arrive") {
            Message::Text(t) => got.push(t.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    let want: Vec<String> = (0..300)
        .flat_map(|r| ["a", "b", "c", "d"].map(|x| format!("{r}.{x}")))
        .collect();
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "out of order at {i}: got {:?}, want {:?}",
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

/// One message broadcast to 1000 connections spread over both workers: every one of them
/// receives it whole, and the server framed it once (each receiver copies the same frame).
#[test]
fn a_broadcast_reaches_1000_clients_intact() {
    let server = TestServer::start(&config(", max_connections: 2000").render());
    let mut clients: Vec<_> = (0..1000).map(|_| connect(&server, "/ws/fanout")).collect();
    // Wait until the server has registered them all.
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) < 1000 {
        assert!(
            Instant::now() < deadline,
            "1000 connections were not all registered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    clients[0].send(Message::binary(payload.clone())).unwrap();
    for (i, ws) in clients.iter_mut().enumerate() {
        match ws.read() {
            Ok(Message::Binary(b)) => assert!(b[..] == payload[..], "client {i}: payload differs"),
            other => panic!("client {i}: {other:?}"),
        }
    }
}

/// Three senders among 120 connections over both workers each send 200 messages at once,
/// which `fanecho` broadcasts to all and echoes to its sender directly: every connection
/// gets every broadcast once, each sender's in the order sent, and a sender gets each echo
/// after its own broadcast's copy (the direct push waits behind what is queued to it).
#[test]
fn broadcasts_from_several_workers_arrive_once_each_in_order_with_the_echoes() {
    const CONNS: usize = 120;
    const SENDERS: usize = 3;
    const N: usize = 200;
    let server = TestServer::start(&config(", max_connections: 2000, send_queue: 4096").render());
    let mut clients: Vec<_> = (0..CONNS)
        .map(|_| connect(&server, "/ws/fanecho"))
        .collect();
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) < CONNS as u64 {
        assert!(Instant::now() < deadline, "connections not all registered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Three connections far apart (accepted on either worker), all sending before any reads.
    let senders: Vec<usize> = (0..SENDERS).map(|s| s * CONNS / SENDERS).collect();
    for i in 0..N {
        for (s, &c) in senders.iter().enumerate() {
            clients[c].write(Message::text(format!("{s}:{i}"))).unwrap();
        }
    }
    for &c in &senders {
        clients[c].flush().unwrap();
    }
    for (c, ws) in clients.iter_mut().enumerate() {
        let sender = senders.iter().position(|&x| x == c);
        let want = SENDERS * N + if sender.is_some() { N } else { 0 };
        // Per sender, the next broadcast expected; for this one's echoes, the next echo.
        let mut next = [0; SENDERS];
        let mut echoed = 0;
        for _ in 0..want {
            let text = match ws.read() {
                Ok(Message::Text(t)) => t.to_string(),
                other => panic!("client {c}: {other:?}"),
            };
            if let Some(body) = text.strip_suffix(".echo") {
                let s = sender.expect("an echo reaches only its sender");
                assert_eq!(
                    body,
                    format!("{s}:{echoed}"),
                    "client {c}: echo out of order"
                );
                assert!(
                    next[s] > echoed,
                    "client {c}: echo of {body} before its broadcast"
                );
                echoed += 1;
                continue;
            }
            let (s, i) = text.split_once(':').expect("s:i");
            let (s, i): (usize, usize) = (s.parse().unwrap(), i.parse().unwrap());
            assert_eq!(
                i, next[s],
                "client {c}: from sender {s}, got {i}, want {}",
                next[s]
            );
            next[s] += 1;
        }
        assert_eq!(next, [N; SENDERS], "client {c}");
    }
}

/// A client on the fan-out route that never reads, while another (on `/ws/shout`, which
/// broadcasts to `/ws/fanout`) sends 64 KiB messages: once its socket is full and its send
/// queue (8 messages) overflows, it is cut (closed with 1008, whose frame cannot get through
/// a full socket), well before it got them all, and the server goes on serving.
#[test]
fn a_broadcast_to_a_client_that_never_reads_cuts_it_when_its_queue_fills() {
    const SENT: usize = 400;
    let server = TestServer::start(&config(", send_queue: 8").render());
    let mut idle = connect(&server, "/ws/fanout");
    let mut sender = connect(&server, "/ws/shout");
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) < 2 {
        assert!(Instant::now() < deadline, "connections not registered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Far more than the socket buffers hold.
    let payload = vec![7u8; 64 << 10];
    for _ in 0..SENT {
        sender.send(Message::binary(payload.clone())).unwrap();
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) > 1 {
        assert!(
            Instant::now() < deadline,
            "the client that never reads was not cut"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got = 0;
    loop {
        match idle.read() {
            Ok(Message::Binary(b)) => {
                assert!(b[..] == payload[..], "payload differs");
                got += 1;
            }
            Ok(Message::Close(frame)) => {
                let frame = frame.expect("a close code");
                assert_eq!(u16::from(frame.code), 1008);
                assert!(frame.reason.contains("send queue full"), "{}", frame.reason);
                break;
            }
            Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Io(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(got < SENT, "all {SENT} messages arrived: nothing was cut");
    let mut echo = connect(&server, "/ws/echo");
    echo.send(Message::text("still serving")).unwrap();
    assert_eq!(echo.read().unwrap(), Message::text("still serving"));
}

/// A client that sends to the echo handler and never reads: the echoes (direct pushes)
/// fill the socket, the write stalls, and the send timeout cuts the connection; the server's
/// memory stays bounded and it goes on serving.
#[test]
fn a_client_that_never_reads_its_echoes_is_cut_off() {
    let server = TestServer::start(&config("").limit("send_timeout_ms", 1000).render());
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .write_all(
            b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = [0u8; 1];
    let mut seen = Vec::new();
    while !seen.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut head).unwrap();
        seen.push(head[0]);
    }
    // 64 KiB binary frames, masked with a zero mask, until the server stops taking them.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(65536u64).to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend(std::iter::repeat_n(b'x', 65536));
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sent = 0;
    while sent < 2000 && stream.write_all(&frame).is_ok() {
        sent += 1;
    }
    assert!(
        sent < 2000,
        "the server took 128 MiB without the client reading"
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) > 0 {
        assert!(
            Instant::now() < deadline,
            "the connection that never reads is still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server.server_rss_kb() < 100 << 10,
        "{} kB",
        server.server_rss_kb()
    );
    server.assert_serving();
}

/// The bytes a worker's WebSocket connections hold in their buffers, from `info`.
fn websocket_buffered(server: &TestServer) -> u64 {
    let info = run_plughost(["info", "-c", &server.config_path().to_string_lossy()]).stdout;
    let per_worker: Vec<u64> = info
        .lines()
        .filter_map(|l| l.split_once(" messages queued and "))
        .filter_map(|(_, after)| after.split(' ').next()?.parse::<u64>().ok())
        .collect();
    assert_eq!(
        per_worker.len(),
        2,
        "no buffered bytes per worker in info:\n{info}"
    );
    per_worker.iter().sum()
}

/// A message far larger than what an idle connection keeps comes back intact; the buffers
/// it took (its assembly, the echo's output) are given back once it is through, so the
/// connection, still open, holds little again.
#[test]
fn a_large_message_arrives_intact_and_its_buffers_are_given_back() {
    let server = TestServer::start(&config(", max_message_size: 4194304").render());
    let mut ws = connect(&server, "/ws/echo");
    let idle = connect(&server, "/ws/echo");
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(payload.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == payload[..], "the echo differs"),
        other => panic!("{other:?}"),
    }
    // A small message after it: the connection goes idle again with small buffers.
    ws.send(Message::text("small")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("small"));
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let held = websocket_buffered(&server);
        if held < 16 << 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "2 idle connections still hold {held} bytes of buffers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(idle);
}

/// The heartbeat closes idle connections at scale: 1000 silent connections are all closed
/// after `heartbeat_idle_time`.
#[test]
fn the_heartbeat_closes_1000_idle_connections() {
    let server = TestServer::start(
        &config(", max_connections: 2000, heartbeat_idle_time: 1, heartbeat_check_interval: 1")
            .render(),
    );
    let clients: Vec<_> = (0..1000).map(|_| connect(&server, "/ws/echo")).collect();
    let deadline = Instant::now() + IO_TIMEOUT;
    while websocket_connections(&server) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of 1000 idle connections still open",
            websocket_connections(&server)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(clients);
    server.assert_serving();
}
