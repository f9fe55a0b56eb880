//! WebSocket on the HTTP port: the connection loop after an upgrade ([`conn`]), the
//! registry of every worker's connections, through which any thread pushes ([`registry`]),
//! and each connection's mailbox, where those pushes wait for it ([`mailbox`]).

pub mod conn;
pub mod deflate;
pub mod frame;
pub mod mailbox;
pub mod registry;

use std::cell::Cell;

use plughost_plugin_api::{Message, Request};

use crate::config::{ComponentRef, DeflateConfig};

pub use conn::{open, serve, Session, Site};

/// Which handler a WebSocket connection belongs to: the route it was opened on and the
/// component that accepted it. A connection keeps it across reloads, so the worker can find
/// that component's current instance wherever a reload moved it in the route table, or see
/// that a reload removed its route.
#[derive(Debug)]
pub struct Binding {
    /// The route's path.
    pub route: String,
    /// The handler component.
    pub component: ComponentRef,
    /// The instance index it resolved to, and the worker's plan generation then.
    cache: Cell<Option<(u64, usize)>>,
}

impl Binding {
    /// A connection on `route`, accepted by `component`.
    pub fn new(route: &str, component: ComponentRef) -> Binding {
        Binding {
            route: route.to_owned(),
            component,
            cache: Cell::new(None),
        }
    }

    /// The instance index resolved for plan generation `generation`, if it was.
    pub fn cached(&self, generation: u64) -> Option<usize> {
        self.cache
            .get()
            .and_then(|(g, i)| (g == generation).then_some(i))
    }

    /// Remembers the index for plan generation `generation`.
    pub fn remember(&self, generation: u64, index: usize) {
        self.cache.set(Some((generation, index)));
    }
}

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
    /// A write the client does not take within this long closes the connection.
    pub send_timeout: std::time::Duration,
    /// Messages a client may send per second (0: no limit).
    pub max_messages_per_second: u64,
    /// permessage-deflate.
    pub deflate: DeflateConfig,
}
