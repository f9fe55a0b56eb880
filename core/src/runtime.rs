//! The runtime under every worker: its own edge-triggered epoll ([`reactor`]), the record of
//! one open connection ([`conn`]), connection take-over between workers ([`steal`]), the
//! counters every thread shares ([`stats`]) and the counting allocator ([`alloc`]).

pub mod alloc;
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
    /// Close everything now.
    Fast,
}
