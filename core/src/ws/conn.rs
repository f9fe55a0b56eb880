//! The WebSocket connection loop. The upgrade is answered by the HTTP loop (it parses the
//! request itself); the stream is then handed to async-tungstenite together with any bytes
//! already read past the request head. Ping/pong is tungstenite's; the heartbeat, the size
//! limit and the bounded send queue are ours.

use std::{
    io,
    net::TcpStream,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use async_tungstenite::{
    tungstenite::{
        self,
        protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
        Message as WsMessage,
    },
    WebSocketStream,
};
use futures_lite::{future, AsyncRead, AsyncWrite, StreamExt};
use futures_sink::Sink;
use plughost_plugin_api::Message;

use std::rc::Rc;

use super::{
    registry::{Connections, Queues},
    Binding, WsEvent, WsSettings,
};
use crate::runtime::{
    conn::{Conn, Phase},
    reactor::{Async, Timer},
};

/// What the connection loop needs from the worker that runs it.
pub trait Site {
    /// The worker's coarse clock.
    fn now(&self) -> Instant;
    /// The WebSocket settings now in force.
    fn ws_settings(&self) -> WsSettings;
    /// Every worker's WebSocket connections.
    fn connections(&self) -> &Connections;
    /// Delivers an event to the instance that serves `binding`; false when it panicked (or
    /// no instance could be had).
    fn ws_event(&self, binding: &Binding, event: WsEvent<'_, '_>) -> bool;
    /// A connection opened (`Some`) or closed (`None`): the worker keeps the bindings, to close
    /// the connections whose route a reload removes.
    fn ws_bind(&self, id: u64, binding: Option<Rc<Binding>>);
}

/// One WebSocket connection from its registration on: unregistered, and its handler told
/// (`on_close`, when `on_open` ran), when this is dropped, however the connection ends (a
/// failed write of the 101, an early return, a panic).
pub struct Session<'a, S: Site> {
    site: &'a S,
    id: u64,
    binding: Rc<Binding>,
    /// Whether `on_open` ran (so `on_close` must).
    opened: bool,
    /// How it ended, for `on_close`.
    ending: (u16, String),
}

impl<S: Site> std::fmt::Debug for Session<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl<'a, S: Site> Session<'a, S> {
    /// The worker the connection lives on.
    pub fn site(&self) -> &'a S {
        self.site
    }
}

impl<S: Site> Drop for Session<'_, S> {
    fn drop(&mut self) {
        self.site.connections().remove(self.id);
        // While unwinding from a panic of our own, no plugin code runs.
        if self.opened && !std::thread::panicking() {
            let (code, reason) = &self.ending;
            self.site
                .ws_event(&self.binding, WsEvent::Close(self.id, *code, reason));
        }
        self.site.ws_bind(self.id, None);
    }
}

/// Registers connection `id` (so `on_open` can already push to it), then runs `on_open`.
/// Returns the session, whose drop undoes both, and the connection's queues.
pub fn open<'a, S: Site>(
    site: &'a S,
    id: u64,
    binding: Binding,
    req: &plughost_plugin_api::Request<'_>,
) -> (Session<'a, S>, Queues) {
    let queues = site
        .connections()
        .open(id, &binding.route, site.ws_settings().send_queue);
    let binding = Rc::new(binding);
    site.ws_bind(id, Some(binding.clone()));
    let mut session = Session {
        site,
        id,
        binding,
        opened: false,
        ending: (1006, "connection lost".into()),
    };
    session.opened = site.ws_event(&session.binding, WsEvent::Open(id, req));
    if !session.opened {
        // `on_open` panicked: the instance was made anew, and it never saw this connection.
        session.ending = (1011, "internal error".into());
    }
    (session, queues)
}

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

/// Messages read in a row before what is queued to send goes out.
const READ_BURST: u32 = 16;

/// What tungstenite reserves to read into.
const READ_BUFFER: usize = 1024;

/// Most messages written out together.
const WRITE_BURST: usize = 64;

/// Sends `first` and whatever else is queued (up to [`WRITE_BURST`]), flushing once.
async fn send_all<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut WebSocketStream<S>,
    first: WsMessage,
    queues: &Queues,
) -> Result<(), tungstenite::Error> {
    let mut next = Some(first);
    let mut n = 0;
    while let Some(message) = next.take() {
        future::poll_fn(|cx| Pin::new(&mut *stream).poll_ready(cx)).await?;
        Pin::new(&mut *stream).start_send(message)?;
        n += 1;
        if n < WRITE_BURST {
            next = queues.data.try_recv().ok();
        }
    }
    future::poll_fn(|cx| Pin::new(&mut *stream).poll_flush(cx)).await
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

/// The WebSocket over the connection's socket.
type Stream<'a> = WebSocketStream<Io<'a>>;

/// Serves an upgraded connection until it closes.
pub async fn serve<S: Site>(
    mut session: Session<'_, S>,
    conn: &Conn,
    part: Vec<u8>,
    queues: Queues,
) {
    let site = session.site;
    let max = site.ws_settings().max_message_size;
    // tungstenite reserves 128 KiB per read by default; an idle connection needs little, and
    // a large message still grows the buffer as it arrives.
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER);
    let mut stream =
        WebSocketStream::from_partially_read(Io(&conn.stream), part, Role::Server, Some(config))
            .await;
    conn.set_phase(Phase::WebSocket, site.now());
    let ending = if session.opened {
        run(site, conn, &mut stream, &session.binding, &queues).await
    } else {
        Ending::send(1011, "internal error")
    };
    site.connections().remove(conn.id);
    if ending.send {
        send_close(&mut stream, &ending).await;
    }
    session.ending = (ending.code, ending.reason);
    // Dropping the session runs `on_close`.
}

/// Reads, delivers and writes until the connection ends; says how it ended.
async fn run<S: Site>(
    site: &S,
    conn: &Conn,
    stream: &mut Stream<'_>,
    ws: &Binding,
    queues: &Queues,
) -> Ending {
    // Messages read in a row without sending: a client that keeps sending cannot hold back
    // what is queued for it for long.
    let mut reads = 0;
    // Messages handled since this task last let the others run: a client that sends a flood
    // of small frames must not keep its worker from the rest (its readers among them).
    let mut since_yield = 0;
    let limit = site.ws_settings().max_messages_per_second;
    let mut rate = Rate::default();
    loop {
        if since_yield >= READ_BURST {
            since_yield = 0;
            future::yield_now().await;
        }
        let step = next_step(stream, queues, reads).await;
        if let Step::Incoming(_) = step {
            since_yield += 1;
            if limit > 0 && rate.over(site.now(), limit) {
                log::debug!(
                    "websocket {}: more than {limit} messages a second; closing",
                    conn.id
                );
                return Ending::send(1008, "message rate limit exceeded");
            }
        }
        reads = match step {
            Step::Incoming(_) => reads + 1,
            _ => 0,
        };
        let ended = match step {
            Step::Control(Some((code, reason))) => Some(Ending::send(code, &reason)),
            Step::Control(None) | Step::Outgoing(None) => Some(Ending::send(1001, "going away")),
            Step::Outgoing(Some(message)) => {
                let timeout = site.ws_settings().send_timeout;
                write_queued(stream, message, queues, timeout).await
            }
            Step::Incoming(Some(Ok(message))) => {
                conn.touch(site.now());
                deliver(site, conn.id, stream, ws, message).await
            }
            Step::Incoming(Some(Err(e))) => {
                // The replies to the messages before the bad frame go out before the close.
                if let Ok(message) = queues.data.try_recv() {
                    let timeout = site.ws_settings().send_timeout;
                    let _ = write_queued(stream, message, queues, timeout).await;
                }
                Some(read_failed(conn.id, e))
            }
            Step::Incoming(None) => Some(Ending::quiet(1006, "connection lost")),
        };
        if let Some(ending) = ended {
            return ending;
        }
    }
}

/// Messages received in the current second.
#[derive(Debug, Default)]
struct Rate {
    window: Option<Instant>,
    count: u64,
}

impl Rate {
    /// Counts one message at `now`; true when the second's count passes `limit`.
    fn over(&mut self, now: Instant, limit: u64) -> bool {
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => self.count += 1,
            _ => {
                self.window = Some(now);
                self.count = 1;
            }
        }
        self.count > limit
    }
}

/// What to do next. Fast path, nothing to wait for: a close request first, then a message
/// already read and buffered (so the replies to a burst of messages go out together), then
/// what is queued to send. This also registers no listener on the channels, which was a
/// measurable cost per message. Otherwise waits for the first of the three.
async fn next_step(stream: &mut Stream<'_>, queues: &Queues, reads: u32) -> Step {
    let ready = future::poll_fn(|cx| {
        if let Ok(close) = queues.control.try_recv() {
            return Poll::Ready(Some(Step::Control(Some(close))));
        }
        if reads < READ_BURST {
            if let Poll::Ready(incoming) = stream.poll_next(cx) {
                return Poll::Ready(Some(Step::Incoming(incoming)));
            }
        }
        Poll::Ready(
            queues
                .data
                .try_recv()
                .ok()
                .map(|message| Step::Outgoing(Some(message))),
        )
    })
    .await;
    if let Some(step) = ready {
        return step;
    }
    future::or(
        async { Step::Control(queues.control.recv().await.ok()) },
        future::or(
            async { Step::Outgoing(queues.data.recv().await.ok()) },
            async { Step::Incoming(stream.next().await) },
        ),
    )
    .await
}

/// Writes `message` and everything else queued in one write. A client that stops reading
/// must not stall us forever: a close request (send queue full, heartbeat, stop) wins over
/// a blocked write.
async fn write_queued(
    stream: &mut Stream<'_>,
    message: WsMessage,
    queues: &Queues,
    timeout: Duration,
) -> Option<Ending> {
    let mut send = std::pin::pin!(send_all(stream, message, queues));
    // Almost always the socket takes it at once: no timer for that.
    let sent = match future::poll_once(&mut send).await {
        Some(sent) => Some(sent),
        None => {
            future::or(async { Some(send.await) }, async {
                future::or(
                    async {
                        let _ = queues.control.recv().await;
                    },
                    async {
                        Timer::after(timeout).await;
                    },
                )
                .await;
                None
            })
            .await
        }
    };
    match sent {
        Some(Ok(())) => None,
        Some(Err(_)) => Some(Ending::quiet(1006, "write failed")),
        None => Some(Ending::quiet(
            1008,
            "closed while the client was not reading",
        )),
    }
}

/// Hands a message to the handler; a close frame from the client ends the connection.
async fn deliver<S: Site>(
    site: &S,
    id: u64,
    stream: &mut Stream<'_>,
    ws: &Binding,
    message: WsMessage,
) -> Option<Ending> {
    let delivered = match &message {
        WsMessage::Text(t) => Message::text(t.as_str()),
        WsMessage::Binary(b) => Message::binary(b),
        WsMessage::Close(frame) => {
            let (code, reason) = frame
                .as_ref()
                .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                .unwrap_or((1005, String::new()));
            // tungstenite queued the close reply; reading on until the stream ends writes it
            // out (a `close` now would be refused as a send after closing, and the client
            // would see a reset).
            let _ = future::or(
                async { while let Some(Ok(_)) = stream.next().await {} },
                async {
                    Timer::after(Duration::from_secs(1)).await;
                },
            )
            .await;
            return Some(Ending::quiet(code, &reason));
        }
        _ => return None,
    };
    if site.ws_event(ws, WsEvent::Message(id, delivered)) {
        None
    } else {
        Some(Ending::send(1011, "internal error"))
    }
}

/// The close code for a read that failed.
fn read_failed(id: u64, e: tungstenite::Error) -> Ending {
    log::debug!("websocket {id}: {e}");
    match e {
        tungstenite::Error::Capacity(_) => Ending::send(1009, "message too big"),
        tungstenite::Error::Protocol(_) => Ending::send(1002, "protocol error"),
        tungstenite::Error::Utf8(_) => Ending::send(1007, "invalid utf-8"),
        _ => Ending::quiet(1006, "connection lost"),
    }
}

/// Sends our close frame and waits briefly for the client's reply, so it reads ours before
/// the FIN.
async fn send_close(stream: &mut Stream<'_>, ending: &Ending) {
    let frame = CloseFrame {
        code: CloseCode::from(ending.code),
        reason: ending.reason.clone().into(),
    };
    let _ = future::or(
        async {
            let _ = stream.close(Some(frame)).await;
            while let Some(Ok(_)) = stream.next().await {}
        },
        async {
            Timer::after(Duration::from_secs(1)).await;
        },
    )
    .await;
}
