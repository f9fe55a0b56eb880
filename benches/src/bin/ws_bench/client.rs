//! The client side both echo modes (pipelined, ping-pong) and the fan-out share: a connection
//! (tungstenite's blocking client, switched to a non-blocking socket after the handshake),
//! the `poll(2)` loop one client thread runs over its connections, and the closing.

use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Barrier,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tungstenite::{Error as WsError, Message, WebSocket};

use crate::{log, Result};

/// One client thread's counters, on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
pub struct Counters {
    /// Messages received (echoes, or fan-out deliveries), in order and unchanged.
    pub msgs: AtomicU64,
    /// Failed connects, wrong or out-of-order messages, connections lost or closed by the
    /// server.
    pub errors: AtomicU64,
}

pub struct Conn {
    pub ws: WebSocket<TcpStream>,
    /// Messages written (sequence number of the next one).
    pub sent: u64,
    /// Messages received (sequence number of the next one expected).
    pub received: u64,
    /// The last flush could not write everything: wait for POLLOUT.
    pending: bool,
    alive: bool,
}

impl Conn {
    pub fn open(addr: &str, path: &str) -> Result<Conn> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let (ws, resp) = tungstenite::client(format!("ws://{addr}{path}"), stream)
            .map_err(|e| format!("handshake with {addr}{path}: {e}"))?;
        if resp.status().as_u16() != 101 {
            return Err(format!("handshake answered {}", resp.status()));
        }
        ws.get_ref()
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            ws,
            sent: 0,
            received: 0,
            pending: false,
            alive: true,
        })
    }

    /// Opens `n` connections; a failure is logged and counted.
    pub fn open_many(addr: &str, path: &str, n: usize, c: &Counters) -> Vec<Conn> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            match Conn::open(addr, path) {
                Ok(conn) => conns.push(conn),
                Err(e) => {
                    log(format!("client: {e}"));
                    c.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        conns
    }

    pub fn is_alive(&self) -> bool {
        self.alive
    }

    /// Queues message number `self.sent` with this payload (written out by `flush`).
    pub fn send(&mut self, payload: String, binary: bool) -> Result<()> {
        let message = if binary {
            Message::binary(payload.into_bytes())
        } else {
            Message::text(payload)
        };
        self.sent += 1;
        match self.ws.write(message) {
            Ok(()) => Ok(()),
            // Queued, the socket is full: `flush` finishes it.
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = true;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        match self.ws.flush() {
            Ok(()) => {
                self.pending = false;
                Ok(())
            }
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.pending = true;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What a client thread does with its connections' traffic.
pub trait Handler {
    /// A text or binary message arrived on `conn` (`conn.received` not yet counted).
    /// An error marks the connection failed.
    fn on_message(&mut self, conn: &mut Conn, data: &[u8], stop: bool) -> Result<()>;
    /// After each pass over the ready connections (and once before the first poll).
    fn after_pass(&mut self, conns: &mut [Conn], stop: bool);
    /// A connection failed (already logged).
    fn on_fail(&mut self);
    /// One more file descriptor to wake the poll with (drained by the loop), if any.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Marks `conn` failed, once: logs the first few per thread, counts them all.
fn fail(conn: &mut Conn, what: String, c: &Counters, h: &mut impl Handler) {
    if conn.alive {
        if c.errors.fetch_add(1, Ordering::Relaxed) < 3 {
            log(format!("client: {what}"));
        }
        conn.alive = false;
        h.on_fail();
    }
}

/// Reads everything `conn` has; returns how many messages it took.
fn read_ready(conn: &mut Conn, c: &Counters, h: &mut impl Handler, stop: bool) -> u64 {
    let mut got = 0;
    loop {
        let result = match conn.ws.read() {
            Ok(Message::Text(t)) => h.on_message(conn, t.as_bytes(), stop),
            Ok(Message::Binary(b)) => h.on_message(conn, &b, stop),
            Ok(Message::Close(frame)) => Err(format!("the server closed a connection: {frame:?}")),
            Ok(_) => continue,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => Err(format!("read: {e}")),
        };
        if let Err(e) = result {
            fail(conn, e, c, h);
            break;
        }
        conn.received += 1;
        got += 1;
    }
    if conn.alive {
        if let Err(e) = conn.flush() {
            fail(conn, format!("flush: {e}"), c, h);
        }
    }
    got
}

/// Drains an eventfd.
fn drain(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into an 8-byte buffer.
    let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
}

/// Polls `conns` (and the handler's wake fd) until `stop`, reading every message and
/// keeping writes flowing.
pub fn poll_loop(conns: &mut [Conn], stop: &AtomicBool, c: &Counters, h: &mut impl Handler) {
    let wake = h.wake_fd();
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|conn| conn.ws.get_ref().as_raw_fd())
        .chain(wake)
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    h.after_pass(conns, false);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping {
            break;
        }
        for (fd, conn) in fds.iter_mut().zip(conns.iter()) {
            fd.events = libc::POLLIN | if conn.pending { libc::POLLOUT } else { 0 };
            fd.revents = 0;
            if !conn.alive {
                fd.fd = -1;
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log(format!("client: poll: {e}"));
            c.errors.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if let (Some(w), Some(fd)) = (wake, fds.last()) {
            if fd.revents != 0 {
                drain(w);
            }
        }
        let mut got = 0;
        for (fd, conn) in fds.iter().zip(conns.iter_mut()) {
            if fd.revents != 0 && conn.alive {
                got += read_ready(conn, c, h, stopping);
            }
        }
        if got > 0 {
            c.msgs.fetch_add(got, Ordering::Relaxed);
        }
        h.after_pass(conns, stopping);
    }
}

/// Sends every close frame, then reads what is left (the messages still in flight, then the
/// close reply) for at most 2 s in all. Failures here are not counted.
pub fn close_all(conns: &mut [Conn]) {
    let mut open: Vec<&mut Conn> = conns.iter_mut().filter(|c| c.alive).collect();
    for conn in open.iter_mut() {
        let _ = conn.ws.close(None);
        let _ = conn.ws.flush();
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !open.is_empty() && Instant::now() < deadline {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|conn| libc::pollfd {
                fd: conn.ws.get_ref().as_raw_fd(),
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        let mut i = 0;
        open.retain_mut(|conn| {
            let ready = fds[i].revents != 0;
            i += 1;
            !ready || !finished(conn)
        });
    }
}

/// Reads and flushes until the socket would block (false) or the connection is over (true).
fn finished(conn: &mut Conn) -> bool {
    loop {
        match conn.ws.read() {
            Ok(_) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = conn.ws.flush();
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// The echo modes: every connection keeps `window` messages in flight, one more sent for
/// each echo; echoes must come back in order and unchanged.
#[derive(Debug, Clone)]
pub struct EchoOpts {
    pub addr: String,
    pub path: &'static str,
    pub conns: usize,
    pub window: usize,
    pub size: usize,
    pub binary: bool,
}

/// The payload of echo message `seq`: the number, zero-padded to `size` bytes.
fn payload(seq: u64, size: usize) -> String {
    format!("{seq:0size$}")
}

struct Echo {
    o: EchoOpts,
    started: bool,
    c: Arc<Counters>,
}

impl Handler for Echo {
    fn on_message(&mut self, conn: &mut Conn, data: &[u8], stop: bool) -> Result<()> {
        let seq = std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        if seq != Some(conn.received) {
            return Err(format!(
                "echo {} of a connection came back wrong or out of order",
                conn.received
            ));
        }
        if stop {
            return Ok(());
        }
        let seq = conn.sent;
        conn.send(payload(seq, self.o.size), self.o.binary)
    }

    fn after_pass(&mut self, conns: &mut [Conn], _stop: bool) {
        if self.started {
            return;
        }
        // The first pass: fill every connection's window.
        self.started = true;
        for conn in conns.iter_mut() {
            let mut r = Ok(());
            for _ in 0..self.o.window {
                let seq = conn.sent;
                r = r.and_then(|()| conn.send(payload(seq, self.o.size), self.o.binary));
            }
            if let Err(e) = r.and_then(|()| conn.flush()) {
                log(format!("client: first send: {e}"));
                conn.alive = false;
                self.c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_fail(&mut self) {}
}

/// One echo client thread: opens `o.conns` connections, waits at `ready`, then keeps every
/// connection's window full until `stop`; then closes them.
fn echo_thread(o: EchoOpts, ready: Arc<Barrier>, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    let mut conns = Conn::open_many(&o.addr, o.path, o.conns, &c);
    ready.wait();
    let mut h = Echo {
        o,
        started: false,
        c: c.clone(),
    };
    poll_loop(&mut conns, &stop, &c, &mut h);
    close_all(&mut conns);
}

/// The client threads of one run.
pub struct Clients {
    pub handles: Vec<JoinHandle<()>>,
    pub counters: Vec<Arc<Counters>>,
    pub stop: Arc<AtomicBool>,
}

impl Clients {
    /// Messages received so far, over all threads.
    pub fn msgs(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.msgs.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops and joins the threads; returns the errors they counted.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
        self.counters
            .iter()
            .map(|c| c.errors.load(Ordering::Relaxed))
            .sum()
    }
}

/// `threads` client threads over `total` connections, spread as evenly as they go; each runs
/// `body(thread, its connections, ready, stop, counters)`. Returns once every thread has
/// opened its connections.
pub fn spawn<F>(threads: usize, total: usize, body: F) -> Result<Clients>
where
    F: Fn(usize, usize, Arc<Barrier>, Arc<AtomicBool>, Arc<Counters>) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let ready = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut counters = Vec::new();
    for t in 0..threads {
        let conns = total / threads + usize::from(t < total % threads);
        let c = Arc::new(Counters::default());
        counters.push(c.clone());
        let (ready, stop, body) = (ready.clone(), stop.clone(), body.clone());
        handles.push(
            thread::Builder::new()
                .name(format!("client-{t}"))
                .spawn(move || body(t, conns, ready, stop, c))
                .map_err(|e| e.to_string())?,
        );
    }
    ready.wait();
    Ok(Clients {
        handles,
        counters,
        stop,
    })
}

/// Starts the echo clients of one run.
pub fn start_echo(o: &EchoOpts, threads: usize) -> Result<Clients> {
    let o = o.clone();
    spawn(threads, o.conns, move |_, conns, ready, stop, c| {
        let o = EchoOpts { conns, ..o.clone() };
        echo_thread(o, ready, stop, c)
    })
}
