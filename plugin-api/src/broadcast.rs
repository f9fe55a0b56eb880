//! A WebSocket broadcast said with names instead of positions:
//! `Broadcast::to_all(message).except(conn).send(&host)` rather than
//! `host.broadcast(message, "", conn)`.

use crate::{abi::Message, component::Host};

/// A message for every WebSocket connection (or those of one route), but one.
#[derive(Debug, Clone, Copy)]
pub struct Broadcast<'a> {
    message: Message<'a>,
    route: &'a str,
    except: u64,
}

impl<'a> Broadcast<'a> {
    /// To every open WebSocket connection.
    pub fn to_all(message: Message<'a>) -> Broadcast<'a> {
        Broadcast {
            message,
            route: "",
            except: 0,
        }
    }

    /// To the connections of one WebSocket route (`/ws/chat`).
    pub fn to_route(route: &'a str, message: Message<'a>) -> Broadcast<'a> {
        Broadcast {
            message,
            route,
            except: 0,
        }
    }

    /// Leaving out connection `conn` (the sender, usually).
    pub fn except(mut self, conn: u64) -> Broadcast<'a> {
        self.except = conn;
        self
    }

    /// Queues it on every connection it is for, whichever worker holds them; returns how
    /// many it reached.
    pub fn send(&self, host: &Host) -> u64 {
        host.broadcast(self.message, self.route, self.except)
    }
}
