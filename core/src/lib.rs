//! plughost: an application server for Rust plugins shipped as `.so` files.
//!
//! The binary is `plughost` ([`cli::main`]). Modules are grouped by capability, and depend
//! downward only (`.ci/module-cycles` checks it):
//!
//! - [`config`], [`error`], [`router`]: the config file, the errors, the route table;
//! - [`runtime`]: each worker's epoll, the connection record, take-over, shared counters;
//! - [`plugin`]: loading `.so` files, the host API, instances of components;
//! - [`table`]: shared tables and counters, for every thread;
//! - [`statics`]: static files (the `static` section): safe paths, validators, ranges,
//!   precompressed siblings, sendfile;
//! - [`plan`]: what a config says to run, resolved against the loaded plugins;
//! - [`ws`], [`http`]: the WebSocket and HTTP connection loops and the middleware onion;
//! - [`socket`]: the TCP connections of `sockets`, their framing and their registry;
//! - [`jobs`]: task workers, events, the cron timer, custom processes;
//! - [`server`]: the workers, signals, reload, the control socket, the pid file, logging;
//! - [`cli`]: `plughost start|stop|restart|reload|info`.
//!
//! The modules are public so benchmarks and tools can reach the router, the config and the
//! HTTP parser.

pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod jobs;
pub mod plan;
pub mod plugin;
pub mod router;
pub mod runtime;
pub mod server;
pub mod socket;
pub mod statics;
pub mod table;
pub mod ws;
