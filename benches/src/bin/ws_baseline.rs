//! The baseline plughost's WebSocket figures are measured against: tokio-tungstenite on a
//! tokio runtime with 2 worker threads.
//!
//! - `/ws/fanout`: every text or binary message received is broadcast to every open
//!   `/ws/fanout` connection, the sender included, through one `tokio::sync::broadcast`
//!   channel (capacity 1024, plughost's `send_queue` in the benchmark): each connection task
//!   waits on its socket and its receiver at once (`select!`), and writes what the channel
//!   holds for it with one flush. A connection that falls 1024 messages behind (`Lagged`) is
//!   closed with 1008, as plughost closes one whose send queue overflows.
//! - any other path: echo, each text or binary message is sent straight back on the same
//!   connection (`send`, which flushes).
//!
//! Pings are answered by tungstenite, a close ends the connection.
//!
//! Binds 127.0.0.1:0 (or the address given as the first argument) and prints
//! `listening on http://ADDR` on stdout once it accepts. Stops on SIGTERM (default action).

use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, sync::broadcast};
use tokio_tungstenite::{
    accept_hdr_async_with_config,
    tungstenite::{
        handshake::server::{Request, Response},
        protocol::{frame::coding::CloseCode, CloseFrame, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};

/// Same limit as the plughost config the benchmark writes.
const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// The fan-out route, and how far behind one of its connections may fall.
const FANOUT_PATH: &str = "/ws/fanout";
const FANOUT_QUEUE: usize = 1024;

type Ws = WebSocketStream<TcpStream>;

/// Handshake, keeping the request path.
// The callback's `Result<Response, ErrorResponse>` is tungstenite's signature, not ours.
#[allow(clippy::result_large_err)]
async fn accept(stream: TcpStream) -> Option<(Ws, String)> {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let mut path = String::new();
    let keep_path = |req: &Request, resp: Response| {
        path = req.uri().path().to_owned();
        Ok(resp)
    };
    let ws = accept_hdr_async_with_config(stream, keep_path, Some(config))
        .await
        .ok()?;
    Some((ws, path))
}

async fn serve(stream: TcpStream, fanout: broadcast::Sender<Message>) {
    let Some((ws, path)) = accept(stream).await else {
        return;
    };
    if path == FANOUT_PATH {
        // Subscribed before the first message is read: it sees its own broadcasts.
        let rx = fanout.subscribe();
        serve_fanout(ws, fanout, rx).await;
    } else {
        echo(ws).await;
    }
}

async fn echo(mut ws: Ws) {
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            // tungstenite queued the close reply; flush it and stop.
            let _ = ws.close(None).await;
            return;
        }
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

async fn serve_fanout(
    mut ws: Ws,
    tx: broadcast::Sender<Message>,
    mut rx: broadcast::Receiver<Message>,
) {
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(message)) if message.is_close() => {
                    let _ = ws.close(None).await;
                    return;
                }
                Some(Ok(message)) if message.is_text() || message.is_binary() => {
                    let _ = tx.send(message);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            outgoing = rx.recv() => match outgoing {
                Ok(message) => {
                    if !forward(&mut ws, &mut rx, message).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let frame = CloseFrame {
                        code: CloseCode::Policy,
                        reason: "send queue full: the client reads too slowly".into(),
                    };
                    let _ = ws.close(Some(frame)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// Writes `first` and whatever else the channel already holds, then flushes once. False if
/// the connection failed.
async fn forward(ws: &mut Ws, rx: &mut broadcast::Receiver<Message>, first: Message) -> bool {
    if ws.feed(first).await.is_err() {
        return false;
    }
    while let Ok(message) = rx.try_recv() {
        if ws.feed(message).await.is_err() {
            return false;
        }
    }
    ws.flush().await.is_ok()
}

fn main() {
    let (fanout, _) = broadcast::channel(FANOUT_QUEUE);
    plughost_benches::serve_tokio(|_| {}, move |stream| serve(stream, fanout.clone()));
}
