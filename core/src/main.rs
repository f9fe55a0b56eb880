//! plughost: an application server for Rust plugins shipped as `.so` files.

mod cli;
mod config;
mod control;
mod error;
mod host;
mod logging;
mod pidfile;
mod pipeline;
mod plugin;
mod router;
mod server;
mod stats;
mod worker;

fn main() {
    std::process::exit(cli::main());
}
