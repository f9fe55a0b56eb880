//! plughost: an application server for Rust plugins shipped as `.so` files.
//!
//! The binary is `plughost` ([`cli::main`]); the modules are public so benchmarks and tools
//! can reach the router, the config and the HTTP parser.

pub mod alloc;
pub mod cli;
pub mod config;
pub mod connections;
pub mod control;
pub mod error;
pub mod host;
pub mod logging;
pub mod pidfile;
pub mod pipeline;
pub mod plugin;
pub mod process;
pub mod reactor;
pub mod reload;
pub mod router;
pub mod server;
pub mod services;
pub mod stats;
pub mod steal;
pub mod task;
pub mod timer;
pub mod worker;
