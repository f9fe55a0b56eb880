//! The runtime under every worker: its own edge-triggered epoll ([`reactor`]), the record of
//! one open connection ([`conn`]), connection take-over between workers ([`steal`]), the
//! counters every thread shares ([`stats`]), the counting allocator ([`alloc`]) and the
//! record of calls into plugin code that the supervisor reads after a crash ([`calls`]).

pub mod alloc;
pub mod calls;
pub mod conn;
pub mod reactor;
pub mod stats;
pub mod steal;

use std::time::Duration;
use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
};

/// The peer address given for a connection to a unix socket listener (it has none).
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Accepts a connection on the HTTP listener, which is a TCP socket or a unix stream socket
/// (`listen: "unix:PATH"`, held as a `TcpListener`: only stream-socket calls are made on it,
/// and the TCP-only ones, such as `TCP_NODELAY`, fail harmlessly). A unix peer has no address:
/// [`UNIX_PEER`].
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (socket, peer) = socket2::SockRef::from(listener).accept()?;
    Ok((socket.into(), peer.as_socket().unwrap_or(UNIX_PEER)))
}

/// How to stop: a value handed to every worker (and later every service), not a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop accepting, let in-flight requests finish within the duration.
    Graceful(Duration),
    /// Another server process took over the listeners (a zero-downtime restart): stop
    /// accepting, and let each keep-alive connection have its next request answered (with
    /// `connection: close`) instead of closing it idle, within the duration.
    Handover(Duration),
    /// Close everything now.
    Fast,
}
