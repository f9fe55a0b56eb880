//! One socket connection's task: reads and cuts frames for its handler, writes what any
//! thread queued to it, and closes when either side or the server says so.

use std::{
    future::Future,
    io,
    os::fd::AsFd,
    pin::{pin, Pin},
    task::Poll,
    time::{Duration, Instant},
};

use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    framing::{Decoder, Overflow},
    registry::{Close, Direct, Queues, Sockets},
    SocketEvent,
};
use crate::{
    config::Framing,
    runtime::reactor::{Async, Timer},
};

/// What the connection loop needs of its worker.
pub trait Site {
    /// The registry of every worker's socket connections.
    fn sockets(&self) -> &Sockets;
    /// Delivers an event to the handler of socket `socket` (its key) on this worker; false
    /// when the handler failed (or is gone) and the connection should close.
    fn socket_event(&self, socket: &str, event: SocketEvent<'_>) -> bool;
}

/// How one socket's connections are served.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Its key (see `plan::SocketPlan`).
    pub socket: std::rc::Rc<str>,
    /// Its `listen` as configured, and the address it is bound to.
    pub listen: [std::sync::Arc<str>; 2],
    /// How its input is cut into frames.
    pub framing: Framing,
    /// Largest frame.
    pub max_package_bytes: usize,
    /// How long the peer may send nothing; `None`: forever.
    pub idle: Option<Duration>,
    /// Writes queued to one connection before it counts as a slow reader and is closed.
    pub send_queue: usize,
}

/// Removes the connection from the registry however its task ends.
struct Registered<'a>(&'a Sockets, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// Bytes gathered into one write at most (more wait for the next).
const WRITE_BATCH: usize = 64 * 1024;

enum Step {
    Read(io::Result<usize>),
    /// The idle timer fired (the peer may have sent something since it was set).
    Idle,
    Send(Vec<u8>),
    Close(Close),
}

/// Serves connection `id` (TCP or unix stream) from `peer` until it closes; its handler sees
/// `on_connect`, each frame, and `on_close`.
pub async fn serve<S: AsFd>(
    site: &impl Site,
    settings: &Settings,
    id: u64,
    stream: &Async<S>,
    peer: &str,
) where
    for<'a> &'a Async<S>: AsyncRead + AsyncWrite,
{
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream.get_ref().as_fd());
    let queues = site.sockets().open(
        (id, fd),
        settings.listen.clone(),
        &settings.framing,
        settings.send_queue,
    );
    let registered = Registered(site.sockets(), id);
    let s = &*settings.socket;
    if site.socket_event(s, SocketEvent::Connect(id, peer)) {
        if let Some(why) = run(site, settings, id, stream, &queues).await {
            log::warn!("socket {s}: connection {id} from {peer}: {why}; closing");
        }
    }
    drop(registered);
    let _ = socket2::SockRef::from(stream.get_ref()).shutdown(std::net::Shutdown::Both);
    site.socket_event(s, SocketEvent::Close(id));
}

/// The loop; returns why it closed when that is worth a warning.
async fn run<S: AsFd>(
    site: &impl Site,
    settings: &Settings,
    id: u64,
    stream: &Async<S>,
    queues: &Queues,
) -> Option<String>
where
    for<'a> &'a Async<S>: AsyncRead + AsyncWrite,
{
    let mut decoder = Decoder::new(settings.framing.clone(), settings.max_package_bytes);
    let mut stream = stream;
    let mut buf = vec![0; decoder.chunk()];
    let mut heard = Instant::now();
    let mut out = Vec::new();
    let mut timer = settings.idle.map(Timer::after);
    // The waits on the queues live across turns of the loop: one listener each, not one per
    // read.
    let mut sending = pin!(queues.recv());
    let mut closing = pin!(queues.close.recv());
    loop {
        let step = {
            let mut reader = stream;
            let mut read = pin!(reader.read(&mut buf));
            future::poll_fn(|cx| {
                if let Poll::Ready(why) = closing.as_mut().poll(cx) {
                    return Poll::Ready(Step::Close(why.unwrap_or(Close::Stopping)));
                }
                if let Poll::Ready(bytes) = sending.as_mut().poll(cx) {
                    sending.set(queues.recv());
                    return Poll::Ready(bytes.map_or(Step::Close(Close::Stopping), Step::Send));
                }
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Step::Read(r));
                }
                match timer.as_mut().map(|t| Pin::new(t).poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Step::Idle),
                    _ => Poll::Pending,
                }
            })
            .await
        };
        match step {
            Step::Read(Ok(0)) | Step::Read(Err(_)) => return None,
            Step::Idle => {
                let idle = settings.idle.unwrap_or_default();
                if heard.elapsed() < idle {
                    timer = Some(Timer::at(heard + idle));
                    continue;
                }
                return idled(settings, id, &decoder, idle);
            }
            Step::Read(Ok(n)) => {
                if settings.idle.is_some() {
                    heard = Instant::now();
                }
                decoder.extend(&buf[..n]);
                let direct = Direct::enter(id, std::mem::take(&mut out));
                let delivered = deliver(site, settings, id, &mut decoder);
                out = direct.finish();
                // What the handler answered goes out with one write.
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        return None;
                    }
                    out.clear();
                    if out.capacity() > WRITE_BATCH {
                        out = Vec::new();
                    }
                }
                if let Err(why) = delivered {
                    return why;
                }
            }
            Step::Send(mut bytes) => {
                // Everything queued goes out with one write: the answers to all the frames
                // of one read, or a burst pushed from elsewhere.
                while let Some(more) = queues.try_recv() {
                    bytes.extend_from_slice(&more);
                    if bytes.len() >= WRITE_BATCH {
                        break;
                    }
                }
                if stream.write_all(&bytes).await.is_err() {
                    // An overflowing queue shuts the socket down under a stuck write.
                    return full(queues);
                }
            }
            Step::Close(Close::QueueFull) => return Some(QUEUE_FULL.into()),
            Step::Close(_) => {
                // What was queued before the close request goes out first.
                while let Some(bytes) = queues.try_recv() {
                    if stream.write_all(&bytes).await.is_err() {
                        return full(queues);
                    }
                }
                return None;
            }
        }
    }
}

const QUEUE_FULL: &str = "send queue full: the peer reads too slowly";

/// After a failed write: why, when its queue overflowed (which shut the socket down).
fn full(queues: &Queues) -> Option<String> {
    (queues.close.try_recv() == Ok(Close::QueueFull)).then(|| QUEUE_FULL.into())
}

/// Why an idle connection closes: a warning when an `Eof` peer left a frame without its EOF,
/// else a debug line.
fn idled(settings: &Settings, id: u64, decoder: &Decoder, idle: Duration) -> Option<String> {
    let secs = idle.as_secs();
    match (&settings.framing, decoder.buffered()) {
        (Framing::Eof(eof), n) if n > 0 => Some(format!(
            "idle for {secs} s with {n} bytes buffered and no EOF ({eof:?}) yet"
        )),
        _ => {
            log::debug!(
                "socket {}: connection {id} idle for {secs} s; closing",
                settings.socket
            );
            None
        }
    }
}

/// Hands each complete frame to the handler; `Err(why)` when the connection must close.
fn deliver(
    site: &impl Site,
    settings: &Settings,
    id: u64,
    decoder: &mut Decoder,
) -> Result<(), Option<String>> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                if !site.socket_event(&settings.socket, SocketEvent::Receive(id, frame)) {
                    return Err(Some("its handler failed".into()));
                }
            }
            Ok(None) => return Ok(()),
            Err(e @ (Overflow::Frame(_) | Overflow::NoEof(_))) => {
                return Err(Some(format!("{e} ({})", settings.max_package_bytes)))
            }
            Err(e) => return Err(Some(e.to_string())),
        }
    }
}
