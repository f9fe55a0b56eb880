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
