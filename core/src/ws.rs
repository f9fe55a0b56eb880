//! WebSocket on the HTTP port: the connection loop after an upgrade ([`conn`]) and the
//! registry of every worker's connections, through which any thread pushes ([`registry`]).

pub mod conn;
pub mod registry;

use plughost_plugin_api::{Message, Request};

pub use conn::{serve, Site};

/// Something that happened on a WebSocket connection, for its handler.
#[derive(Debug)]
pub enum WsEvent<'a, 'r> {
    /// Opened by this upgrade request.
    Open(u64, &'a Request<'r>),
    /// A message arrived.
    Message(u64, Message<'a>),
    /// Closed with a code and reason.
    Close(u64, u16, &'a str),
}

/// WebSocket settings a connection needs.
#[derive(Debug, Clone, Copy)]
pub struct WsSettings {
    /// Largest incoming message.
    pub max_message_size: usize,
    /// Most open connections.
    pub max_connections: usize,
    /// Send queue length per connection.
    pub send_queue: usize,
}
