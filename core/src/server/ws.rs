//! WebSocket on the HTTP port. The upgrade is answered by the HTTP loop (it parses the
//! request itself); the stream is then handed to async-tungstenite together with any bytes
//! already read past the request head. Ping/pong is tungstenite's; the heartbeat, the size
//! limit and the bounded send queue are ours.

use std::{
    io,
    net::TcpStream,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use crate::reactor::{Async, Timer};
use async_tungstenite::{
    tungstenite::{
        self,
        protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
        Message as WsMessage,
    },
    WebSocketStream,
};
use futures_lite::{future, AsyncRead, AsyncWrite, StreamExt};
use plughost_plugin_api::Message;

use crate::{
    connections::Queues,
    pipeline::WsEvent,
    worker::{Conn, Phase, Worker},
};

/// The connection's socket, borrowed for the WebSocket's lifetime.
struct Io<'a>(&'a Async<TcpStream>);

impl AsyncRead for Io<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_close(cx)
    }
}

enum Step {
    Control(Option<(u16, String)>),
    Outgoing(Option<WsMessage>),
    Incoming(Option<Result<WsMessage, tungstenite::Error>>),
}

/// How the connection ended: the close code, the reason, and whether we send a close frame.
struct Ending {
    code: u16,
    reason: String,
    send: bool,
}

impl Ending {
    fn send(code: u16, reason: &str) -> Ending {
        Ending {
            code,
            reason: reason.to_owned(),
            send: true,
        }
    }
    fn quiet(code: u16, reason: &str) -> Ending {
        Ending {
            code,
            reason: reason.to_owned(),
            send: false,
        }
    }
}

/// Serves an upgraded connection until it closes. `opened` is false when `on_open` panicked.
pub async fn serve(
    worker: &Worker,
    conn: &Conn,
    part: Vec<u8>,
    ws: usize,
    queues: Queues,
    opened: bool,
) {
    let max = worker.ws_settings().max_message_size;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut stream =
        WebSocketStream::from_partially_read(Io(&conn.stream), part, Role::Server, Some(config))
            .await;
    conn.set_phase(Phase::WebSocket, worker);
    let id = conn.id;
    let ending = if !opened {
        Ending::send(1011, "internal error")
    } else {
        loop {
            // Fast path: a close request or a queued message needs no waiting (and no
            // listener registered on the channels, which was a measurable cost per message).
            let step = if let Ok(close) = queues.control.try_recv() {
                Step::Control(Some(close))
            } else if let Ok(message) = queues.data.try_recv() {
                Step::Outgoing(Some(message))
            } else {
                future::or(
                    async { Step::Control(queues.control.recv().await.ok()) },
                    future::or(
                        async { Step::Outgoing(queues.data.recv().await.ok()) },
                        async { Step::Incoming(stream.next().await) },
                    ),
                )
                .await
            };
            match step {
                Step::Control(Some((code, reason))) => break Ending::send(code, &reason),
                Step::Control(None) | Step::Outgoing(None) => {
                    break Ending::send(1001, "going away")
                }
                Step::Outgoing(Some(message)) => {
                    // A client that stops reading must not stall us forever: a close request
                    // (send queue full, heartbeat, stop) wins over a blocked write.
                    let sent = future::or(async { Some(stream.send(message).await) }, async {
                        let _ = queues.control.recv().await;
                        None
                    })
                    .await;
                    match sent {
                        Some(Ok(())) => {}
                        Some(Err(_)) => break Ending::quiet(1006, "write failed"),
                        None => {
                            break Ending::quiet(1008, "closed while the client was not reading")
                        }
                    }
                }
                Step::Incoming(Some(Ok(message))) => {
                    conn.touch(worker);
                    let delivered = match &message {
                        WsMessage::Text(t) => Some(Message::text(t.as_str())),
                        WsMessage::Binary(b) => Some(Message::binary(b)),
                        WsMessage::Close(frame) => {
                            let (code, reason) = frame
                                .as_ref()
                                .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                                .unwrap_or((1005, String::new()));
                            // tungstenite queued the close reply; reading on until the
                            // stream ends writes it out (a `close` now would be refused as a
                            // send after closing, and the client would see a reset).
                            let _ = future::or(
                                async { while let Some(Ok(_)) = stream.next().await {} },
                                async {
                                    Timer::after(Duration::from_secs(1)).await;
                                },
                            )
                            .await;
                            break Ending::quiet(code, &reason);
                        }
                        _ => None,
                    };
                    if let Some(m) = delivered {
                        if !worker.ws_event(ws, WsEvent::Message(id, m)) {
                            break Ending::send(1011, "internal error");
                        }
                    }
                }
                Step::Incoming(Some(Err(e))) => {
                    log::debug!("websocket {id}: {e}");
                    break match e {
                        tungstenite::Error::Capacity(_) => Ending::send(1009, "message too big"),
                        tungstenite::Error::Protocol(_) => Ending::send(1002, "protocol error"),
                        tungstenite::Error::Utf8(_) => Ending::send(1007, "invalid utf-8"),
                        _ => Ending::quiet(1006, "connection lost"),
                    };
                }
                Step::Incoming(None) => break Ending::quiet(1006, "connection lost"),
            }
        }
    };
    worker.connections().remove(id);
    if ending.send {
        let frame = CloseFrame {
            code: CloseCode::from(ending.code),
            reason: ending.reason.clone().into(),
        };
        let _ = future::or(
            async {
                let _ = stream.close(Some(frame)).await;
                // Wait briefly for the client's close reply so it reads ours before the FIN.
                while let Some(Ok(_)) = stream.next().await {}
            },
            async {
                Timer::after(Duration::from_secs(1)).await;
            },
        )
        .await;
    }
    worker.ws_event(ws, WsEvent::Close(id, ending.code, &ending.reason));
}
