//! The extra listeners of `sockets` in `server.ron`: TCP connections cut into frames
//! ([`framing`]), served by a socket handler component on the worker that accepted them
//! ([`conn`]), and the registry through which any thread sends to any of them ([`registry`]).

pub mod conn;
pub mod framing;
pub mod registry;
pub mod udp;

pub use conn::{serve, Site};

use std::{
    net::{TcpListener, UdpSocket},
    os::unix::net::UnixListener,
};

/// One worker's bound socket of `sockets`.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A UDP socket.
    Udp(UdpSocket),
    /// A unix stream listener (every worker accepts on the same one).
    Unix(UnixListener),
    /// A listener of HTTP connections (TCP, or a unix socket held as one) served like the
    /// main listener's; true: WebSocket upgrades only.
    Http(TcpListener, bool),
}

/// Something that happened on a socket connection, for its handler.
#[derive(Debug, Clone, Copy)]
pub enum SocketEvent<'a> {
    /// Opened from this peer.
    Connect(u64, &'a str),
    /// A frame arrived (framing removed).
    Receive(u64, &'a [u8]),
    /// Closed.
    Close(u64),
    /// A UDP datagram from a peer: its token for `send_to`, its address, the datagram.
    Packet(u64, &'a str, &'a [u8]),
}
