//! The extra listeners of `sockets` in `server.ron`: TCP connections cut into frames
//! ([`framing`]), served by a socket handler component on the worker that accepted them
//! ([`conn`]), and the registry through which any thread sends to any of them ([`registry`]).

pub mod conn;
pub mod framing;
pub mod registry;

pub use conn::{serve, Site};

/// Something that happened on a socket connection, for its handler.
#[derive(Debug, Clone, Copy)]
pub enum SocketEvent<'a> {
    /// Opened from this peer.
    Connect(u64, &'a str),
    /// A frame arrived (framing removed).
    Receive(u64, &'a [u8]),
    /// Closed.
    Close(u64),
}
