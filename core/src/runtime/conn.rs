//! One open connection as its task and its worker see it: the socket, the phase it is in
//! (for timeouts and draining), and its claim (for take-over by another worker).

use std::{
    cell::Cell,
    net::{Shutdown as SockShutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    time::Instant,
};

use super::{
    reactor::Async,
    steal::{Claim, Lobby},
};

/// Where a connection stands, for timeouts and draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first byte of a request (keep-alive timeout).
    Idle,
    /// Reading a request head (header read timeout).
    ReadingHead,
    /// Reading a request body (header read timeout).
    ReadingBody,
    /// Running plugins.
    Busy,
    /// Writing a response the client has not taken yet (send timeout).
    Writing,
    /// Waiting for a deferred response (its own timeout, `limits.defer_timeout_ms`).
    Deferred,
    /// Between two chunks of a streamed response (the same timeout).
    Streaming,
    /// An upgraded WebSocket (heartbeat timeout, counted from the last frame received).
    WebSocket,
}

/// One open connection, shared by its task and the worker's registry.
#[derive(Debug)]
pub struct Conn {
    /// Global connection id: worker id in the high 16 bits.
    pub id: u64,
    /// The socket.
    pub stream: Async<TcpStream>,
    phase: Cell<Phase>,
    since: Cell<Instant>,
    timed_out: Cell<bool>,
    /// The sweeper cut it for overstaying its phase (not a stop).
    expired: Cell<bool>,
    /// It came to a `protocol: WebSocket` socket: anything but an upgrade is refused.
    upgrades_only: Cell<bool>,
    /// Whether this worker or another may use the socket (see `steal`).
    pub claim: Arc<Claim>,
    lobby: Arc<Lobby>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Unlisted before the socket closes, so no other worker can take a closed descriptor.
        self.lobby.leave(self.id);
        if self.claim.taken() {
            self.stream.release();
        }
    }
}

impl Conn {
    /// A new connection, reading its first head, registered in `lobby` for take-over.
    pub fn new(
        id: u64,
        stream: Async<TcpStream>,
        peer: SocketAddr,
        now: Instant,
        lobby: Arc<Lobby>,
    ) -> Conn {
        let claim = Arc::new(Claim::default());
        lobby.enter(id, stream.get_ref().as_raw_fd(), peer, claim.clone());
        Conn {
            id,
            stream,
            phase: Cell::new(Phase::ReadingHead),
            since: Cell::new(now),
            timed_out: Cell::new(false),
            expired: Cell::new(false),
            upgrades_only: Cell::new(false),
            claim,
            lobby,
        }
    }

    /// Refuses it anything but a WebSocket upgrade. It stays with this worker (a take-over
    /// would not know).
    pub fn only_upgrades(&self) {
        self.upgrades_only.set(true);
        self.leave_lobby();
    }

    /// Whether it may only upgrade (see [`Conn::only_upgrades`]).
    pub fn upgrades_only(&self) -> bool {
        self.upgrades_only.get()
    }

    /// Stops other workers from taking this connection over (it became a WebSocket).
    pub fn leave_lobby(&self) {
        self.lobby.leave(self.id);
    }

    /// Moves to `phase`, restarting its clock (at `now`) when it changes.
    pub fn set_phase(&self, phase: Phase, now: Instant) {
        if self.phase.get() != phase {
            self.phase.set(phase);
            self.since.set(now);
        }
    }

    /// Marks activity on a WebSocket (for the heartbeat).
    pub fn touch(&self, now: Instant) {
        self.since.set(now);
    }

    /// When the current phase (or the last WebSocket activity) began.
    pub fn since(&self) -> Instant {
        self.since.get()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Whether the sweeper closed the read side for a timeout.
    pub fn timed_out(&self) -> bool {
        self.timed_out.get()
    }

    /// A response the client does not take: shuts the socket down both ways and wakes the
    /// blocked write, which fails, and the connection ends.
    pub fn cut_writer(&self) {
        self.timed_out.set(true);
        let _ = self.stream.get_ref().shutdown(SockShutdown::Both);
        self.stream.wake_writer();
        self.stream.wake_reader();
    }

    /// It overstayed its phase: cut, and remembered as a timeout. Bytes already on their way
    /// can still be read after the cut; the timeout stands all the same.
    pub fn expire(&self) {
        if self.claim.hold() {
            self.expired.set(true);
        }
        self.cut();
    }

    /// Whether the sweeper cut it for a timeout.
    pub fn expired(&self) -> bool {
        self.expired.get()
    }

    /// Closes the read side (a timeout, or a stop), which wakes the connection's pending
    /// read; a connection another worker took over is only let go here.
    pub fn cut(&self) {
        if !self.claim.hold() {
            // Another worker serves it now: only let this side's task go.
            self.stream.wake_reader();
            return;
        }
        self.timed_out.set(true);
        let _ = self.stream.get_ref().shutdown(SockShutdown::Read);
    }
}
