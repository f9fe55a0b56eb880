//! The WebSocket connection loop. The upgrade is answered by the HTTP loop (it parses the
//! request and negotiates permessage-deflate); the connection then reads frames with our own
//! decoder ([`super::frame`]), hands messages to its handler, answers pings and closes, and
//! writes what is queued to it, with the heartbeat, the size limit, the rate limit, the send
//! timeout and the bounded send queue.

use std::{
    cell::{Cell, RefCell},
    io,
    marker::PhantomData,
    net::TcpStream,
    pin::Pin,
    ptr::NonNull,
    rc::Rc,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicU64, Ordering};

use futures_lite::{future, AsyncRead, AsyncWriteExt};
use plughost_plugin_api::{HostError, Message};

use super::{
    deflate::{Agreed, Codec},
    frame::{self, Decoder, Event, Fault, Kind},
    mailbox::{HoldWakes, Mailbox},
    registry::{kind_of, Connections, Outgoing},
    Binding, WsEvent, WsSettings,
};
use crate::runtime::{
    conn::{Conn, Phase},
    reactor::{self, Async, Timer},
};

/// What the connection loop needs from the worker that runs it.
pub trait Site {
    /// The worker's coarse clock.
    fn now(&self) -> Instant;
    /// The WebSocket settings now in force.
    fn ws_settings(&self) -> WsSettings;
    /// Every worker's WebSocket connections.
    fn connections(&self) -> &Connections;
    /// The bytes this worker's connections hold in their buffers, for `info`.
    fn ws_buffered(&self) -> &AtomicU64;
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
    /// permessage-deflate, when the handshake agreed on it.
    deflate: Option<Agreed>,
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
/// Returns the session, whose drop undoes both, and the connection's mailbox.
pub fn open<'a, S: Site>(
    site: &'a S,
    id: u64,
    binding: Binding,
    req: &plughost_plugin_api::Request<'_>,
    deflate: Option<Agreed>,
) -> (Session<'a, S>, Arc<Mailbox>) {
    let mailbox = site
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
        deflate,
    };
    session.opened = site.ws_event(&session.binding, WsEvent::Open(id, req));
    if !session.opened {
        // `on_open` panicked: the instance was made anew, and it never saw this connection.
        session.ending = (1011, "internal error".into());
    }
    (session, mailbox)
}

/// Messages handled in a row before what is queued to send goes out, and before the task
/// lets the worker's other tasks run.
const READ_BURST: u32 = 16;

/// Most queued messages encoded into one write.
const WRITE_BURST: usize = 64;

/// Bytes asked of the socket per read, into a buffer all the thread's connections share:
/// a connection keeps only what it has not decoded yet.
const READ_CHUNK: usize = 64 << 10;

/// Input or output buffers up to this size are kept for the next use; larger ones are freed
/// once empty, so an idle connection holds almost nothing.
const KEEP: usize = 4096;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// The connection's wire: undecoded input, the decoder, and what goes out.
struct Wire<'a> {
    stream: &'a Async<TcpStream>,
    input: Vec<u8>,
    /// `input[..start]` is decoded.
    start: usize,
    decoder: Decoder,
    /// The last compressed message, inflated.
    plain: Vec<u8>,
    max: usize,
    outbox: Outbox,
    /// The buffer bytes last added to the worker's total.
    reported: u64,
}

/// What goes out: encoded frames and the compression for them. A push from the handler to
/// its own connection, during an event, is written here directly ([`push_direct`]).
pub(super) struct Outbox {
    out: Vec<u8>,
    codec: Option<Codec>,
    /// Compressed payloads, before framing.
    packed: Vec<u8>,
    /// What other threads queue: a direct write waits its turn behind it, and a connection
    /// asked to close takes no more.
    mailbox: Arc<Mailbox>,
    /// Messages taken from the mailbox, to encode (kept for its capacity).
    taken: Vec<Outgoing>,
    /// Direct writes during the current event, and how many one event may make (the send
    /// queue's length: past it, pushes take the queue, which closes a runaway).
    direct: usize,
    cap: usize,
}

impl Outbox {
    /// Appends a message: compressed when that was agreed and it is worth it; else the
    /// frame already built for it, if any.
    fn encode(&mut self, kind: Kind, payload: &[u8], frame: Option<&[u8]>) {
        match (&mut self.codec, frame) {
            (Some(codec), _) if codec.worth(payload.len()) => {
                self.packed.clear();
                codec.compress(payload, &mut self.packed);
                frame::message(&mut self.out, kind, true, &self.packed);
                release(&mut self.packed);
            }
            (_, Some(frame)) => self.out.extend_from_slice(frame),
            (_, None) => frame::message(&mut self.out, kind, false, payload),
        }
    }

    /// Encodes up to [`WRITE_BURST`] queued messages, taken with one lock.
    fn encode_queued(&mut self) {
        if self.mailbox.is_empty() {
            return;
        }
        let mut taken = std::mem::take(&mut self.taken);
        self.mailbox.take(&mut taken, WRITE_BURST);
        for message in taken.drain(..) {
            self.encode(message.kind, message.payload(), Some(message.frame()));
        }
        self.taken = taken;
    }
}

thread_local! {
    /// The connection whose event this thread is delivering, and its outbox.
    static SERVING: Cell<Option<(u64, NonNull<Outbox>)>> = const { Cell::new(None) };
}

/// Marks a connection as the one being served while its handler runs.
struct Serving<'a> {
    previous: Option<(u64, NonNull<Outbox>)>,
    _outbox: PhantomData<&'a mut Outbox>,
}

impl<'a> Serving<'a> {
    fn enter(id: u64, outbox: &'a mut Outbox) -> Serving<'a> {
        outbox.direct = 0;
        let previous = SERVING.with(|s| s.replace(Some((id, NonNull::from(outbox)))));
        Serving {
            previous,
            _outbox: PhantomData,
        }
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(self.previous));
    }
}

/// A push to the connection whose event this thread is delivering: written into its outbox
/// at once, with no queue and no wake-up, when nothing is queued ahead of it. `None`: take
/// the queue.
pub(super) fn push_direct(id: u64, message: &Message<'_>) -> Option<Result<(), HostError>> {
    let (serving, mut outbox) = SERVING.with(Cell::get)?;
    if serving != id {
        return None;
    }
    // SAFETY: `Serving` set this from a `&mut Outbox` that it keeps borrowed until it clears
    // it, on this thread, around a synchronous call into the handler; nothing else touches
    // the outbox meanwhile, and a push is not reentrant.
    let outbox = unsafe { outbox.as_mut() };
    if outbox.direct >= outbox.cap || !outbox.mailbox.is_idle() {
        return None;
    }
    let kind = match kind_of(message) {
        Ok(kind) => kind,
        Err(e) => return Some(Err(e)),
    };
    outbox.direct += 1;
    outbox.encode(kind, message.data.as_slice(), None);
    Some(Ok(()))
}

impl<'a> Wire<'a> {
    fn new(
        conn: &'a Conn,
        part: Vec<u8>,
        settings: &WsSettings,
        agreed: Option<Agreed>,
        mailbox: &Arc<Mailbox>,
    ) -> Self {
        let max = settings.max_message_size;
        Wire {
            stream: &conn.stream,
            input: part,
            start: 0,
            decoder: Decoder::new(max, agreed.is_some()),
            plain: Vec::new(),
            max,
            reported: 0,
            outbox: Outbox {
                out: Vec::new(),
                codec: agreed.map(|a| Codec::new(a, &settings.deflate)),
                packed: Vec::new(),
                mailbox: mailbox.clone(),
                taken: Vec::new(),
                direct: 0,
                cap: settings.send_queue.max(1),
            },
        }
    }

    /// The bytes this connection's buffers hold.
    fn buffered(&self) -> u64 {
        let o = &self.outbox;
        (self.input.capacity()
            + self.decoder.capacity()
            + self.plain.capacity()
            + o.out.capacity()
            + o.packed.capacity()) as u64
    }

    /// Brings the worker's total up to date with this connection's buffers (`gone`: with
    /// none, as it closes).
    fn report(&mut self, total: &AtomicU64, gone: bool) {
        let now = if gone { 0 } else { self.buffered() };
        if now > self.reported {
            total.fetch_add(now - self.reported, Ordering::Relaxed);
        } else if now < self.reported {
            total.fetch_sub(self.reported - now, Ordering::Relaxed);
        }
        self.reported = now;
    }

    /// Decodes from what is buffered.
    fn decode(&mut self) -> Result<Option<Event>, Fault> {
        let mut input = &self.input[self.start..];
        let before = input.len();
        let decoded = self.decoder.decode(&mut input);
        self.start += before - input.len();
        if self.start == self.input.len() {
            self.start = 0;
            release(&mut self.input);
        }
        decoded
    }

    /// Inflates the last message into `plain` if it was compressed, and checks that
    /// compressed text inflated to UTF-8 (the decoder checked uncompressed text already).
    fn inflate(&mut self, kind: Kind, compressed: bool) -> Result<(), Fault> {
        if !compressed {
            return Ok(());
        }
        let codec = self
            .outbox
            .codec
            .as_mut()
            .ok_or(Fault::Protocol("RSV1 without permessage-deflate"))?;
        codec.inflate(self.decoder.message(), self.max, &mut self.plain)?;
        if kind == Kind::Text && std::str::from_utf8(&self.plain).is_err() {
            return Err(Fault::Utf8);
        }
        Ok(())
    }

    /// Reads what the socket has into the input; 0 at its end.
    async fn read(&mut self) -> io::Result<usize> {
        future::poll_fn(|cx| {
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let read = Pin::new(&mut &*self.stream).poll_read(cx, &mut scratch[..]);
                if let Poll::Ready(Ok(n)) = read {
                    if self.start > 0 {
                        self.input.drain(..self.start);
                        self.start = 0;
                    }
                    self.input.extend_from_slice(&scratch[..n]);
                }
                read
            })
        })
        .await
    }

    /// Writes out everything encoded.
    async fn flush(&mut self) -> io::Result<()> {
        let out = &mut self.outbox.out;
        if !out.is_empty() {
            let mut stream = self.stream;
            stream.write_all(out).await?;
            release(out);
        }
        Ok(())
    }
}

/// Empties `buf`, and frees it if it grew large.
fn release(buf: &mut Vec<u8>) {
    buf.clear();
    if buf.capacity() > KEEP {
        *buf = Vec::new();
    }
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

/// Serves an upgraded connection until it closes.
pub async fn serve<S: Site>(
    mut session: Session<'_, S>,
    conn: &Conn,
    part: Vec<u8>,
    mailbox: Arc<Mailbox>,
) {
    let site = session.site;
    let mut wire = Wire::new(conn, part, &site.ws_settings(), session.deflate, &mailbox);
    conn.set_phase(Phase::WebSocket, site.now());
    // Uncompressed, what is queued can be written as it is, by whichever thread queued it.
    let lent = wire.outbox.codec.is_none().then(|| {
        use std::os::fd::AsRawFd;
        mailbox.lend(conn.stream.get_ref().as_raw_fd(), reactor::pulse())
    });
    let ending = if session.opened {
        run(site, conn, &mut wire, &session.binding, &mailbox).await
    } else {
        Ending::send(1011, "internal error")
    };
    // From here on only this task writes (the socket closes after this returns).
    drop(lent);
    site.connections().remove(conn.id);
    if ending.send {
        send_close(&mut wire, &ending).await;
    }
    wire.report(site.ws_buffered(), true);
    session.ending = (ending.code, ending.reason);
    // Dropping the session runs `on_close`.
}

/// What woke a connection that had nothing to do.
enum Wake {
    /// A message or a close request is in the mailbox.
    Mail,
    Read(io::Result<usize>),
}

/// Reads, delivers and writes until the connection ends; says how it ended.
async fn run<S: Site>(
    site: &S,
    conn: &Conn,
    wire: &mut Wire<'_>,
    ws: &Binding,
    mailbox: &Mailbox,
) -> Ending {
    // Messages handled in a row without writing: a client that keeps sending cannot hold
    // back what is queued for it for long.
    let mut reads = 0;
    // Messages handled since this task last let the others run: a client that sends a flood
    // of small frames must not keep its worker from the rest (its readers among them).
    let mut since_yield = 0;
    let mut rate = Rate::default();
    // The wake-ups of the connections the handler queues to during a burst of messages,
    // held until the burst ends.
    let mut held = None;
    loop {
        if since_yield >= READ_BURST {
            since_yield = 0;
            held = None;
            future::yield_now().await;
        }
        if let Some((code, reason)) = mailbox.take_control() {
            return Ending::send(code, &reason);
        }
        if reads < READ_BURST {
            match wire.decode() {
                Ok(Some(event)) => {
                    reads += 1;
                    since_yield += 1;
                    // Handling a message does not await; the other events may.
                    if matches!(event, Event::Message { .. }) {
                        held = held.or_else(HoldWakes::new);
                    } else {
                        held = None;
                    }
                    if let Some(ending) = on_event(site, conn, wire, ws, event, &mut rate).await {
                        return ending;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(fault) => {
                    log::debug!("websocket {}: {fault}", conn.id);
                    return Ending::send(fault.code(), fault.reason());
                }
            }
        }
        held = None;
        let burst = reads >= READ_BURST;
        reads = 0;
        wire.outbox.encode_queued();
        if !wire.outbox.out.is_empty() {
            if let Some(ending) = write_out(site, wire, mailbox).await {
                return ending;
            }
        } else if !burst {
            wire.report(site.ws_buffered(), false);
            if let Some(ending) = wait(wire, mailbox).await {
                return ending;
            }
        }
    }
}

/// Waits for input, a message to send or a close request (the loop then takes them).
async fn wait(wire: &mut Wire<'_>, mailbox: &Mailbox) -> Option<Ending> {
    let wake = future::or(
        future::poll_fn(|cx| mailbox.poll_ready(cx, false).map(|()| Wake::Mail)),
        async { Wake::Read(wire.read().await) },
    )
    .await;
    mailbox.busy();
    match wake {
        Wake::Mail => {
            // Let the tasks already scheduled run first: a broadcast in progress there adds
            // its messages to this write.
            future::yield_now().await;
            None
        }
        Wake::Read(Ok(1..)) => None,
        Wake::Read(Ok(0)) | Wake::Read(Err(_)) => Some(Ending::quiet(1006, "connection lost")),
    }
}

/// Handles one thing the client sent.
async fn on_event<S: Site>(
    site: &S,
    conn: &Conn,
    wire: &mut Wire<'_>,
    ws: &Binding,
    event: Event,
    rate: &mut Rate,
) -> Option<Ending> {
    let now = site.now();
    conn.touch(now);
    let limit = site.ws_settings().max_messages_per_second;
    if limit > 0 && rate.over(now, limit) {
        log::debug!(
            "websocket {}: more than {limit} messages a second; closing",
            conn.id
        );
        return Some(Ending::send(1008, "message rate limit exceeded"));
    }
    match event {
        Event::Message { kind, compressed } => {
            if let Err(fault) = wire.inflate(kind, compressed) {
                return Some(Ending::send(fault.code(), fault.reason()));
            }
            // Borrowed apart: the message from the decoder, the outbox for direct pushes.
            let Wire {
                decoder,
                plain,
                outbox,
                ..
            } = wire;
            let data = if compressed {
                &plain[..]
            } else {
                decoder.message()
            };
            let message = match kind {
                // SAFETY: text is UTF-8: the decoder checks it as it arrives, `inflate` after
                // inflating.
                Kind::Text => Message::text(unsafe { std::str::from_utf8_unchecked(data) }),
                Kind::Binary => Message::binary(data),
            };
            let serving = Serving::enter(conn.id, outbox);
            let delivered = site.ws_event(ws, WsEvent::Message(conn.id, message));
            drop(serving);
            if delivered {
                None
            } else {
                Some(Ending::send(1011, "internal error"))
            }
        }
        Event::Ping => {
            frame::pong(&mut wire.outbox.out, wire.decoder.control());
            None
        }
        Event::Pong => None,
        Event::Close => Some(closed_by_client(wire).await),
    }
}

/// The client sent a close frame: answer it with the same code, after what is already
/// encoded, then wait briefly for the client to close the TCP connection.
async fn closed_by_client(wire: &mut Wire<'_>) -> Ending {
    let (code, reason) = match frame::close_payload(wire.decoder.control()) {
        Ok(Some((code, reason))) => (code, reason.to_owned()),
        Ok(None) => (1005, String::new()),
        Err(fault) => return Ending::send(fault.code(), fault.reason()),
    };
    frame::close(&mut wire.outbox.out, code, &reason);
    let _ = future::or(
        async {
            if wire.flush().await.is_ok() {
                while let Ok(n) = wire.read().await {
                    wire.input.clear();
                    if n == 0 {
                        break;
                    }
                }
            }
        },
        async {
            Timer::after(Duration::from_secs(1)).await;
        },
    )
    .await;
    Ending::quiet(code, &reason)
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

/// Writes what is encoded. A client that stops reading must not stall us forever: a close
/// request (send queue full, heartbeat, stop) or the send timeout wins over a blocked write.
async fn write_out<S: Site>(site: &S, wire: &mut Wire<'_>, mailbox: &Mailbox) -> Option<Ending> {
    let timeout = site.ws_settings().send_timeout;
    let mut send = std::pin::pin!(wire.flush());
    // Almost always the socket takes it at once: no timer for that.
    let sent = match future::poll_once(&mut send).await {
        Some(sent) => Some(sent),
        None => {
            future::or(async { Some(send.await) }, async {
                future::or(future::poll_fn(|cx| mailbox.poll_ready(cx, true)), async {
                    Timer::after(timeout).await;
                })
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

/// Sends what is queued and our close frame, then waits briefly for the client's close, so
/// it reads ours before the FIN.
async fn send_close(wire: &mut Wire<'_>, ending: &Ending) {
    wire.outbox.encode_queued();
    frame::close(&mut wire.outbox.out, ending.code, &ending.reason);
    let _ = future::or(
        async {
            if wire.flush().await.is_err() {
                return;
            }
            // Whatever comes before the client's close (or a bad frame) is dropped.
            loop {
                match wire.decode() {
                    Ok(Some(Event::Close)) | Err(_) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                }
                if !matches!(wire.read().await, Ok(n) if n > 0) {
                    return;
                }
            }
        },
        async {
            Timer::after(Duration::from_secs(1)).await;
        },
    )
    .await;
}
