//! Integration tests of plughost through the real binary: HTTP serving, limits and malformed
//! input, plugin failures, config errors, shared tables and the `info` command. The tests that send signals
//! or use pid files are in `signals.rs`. Static files are in `statics.rs`.

mod apollo;
mod cli;
mod common;
mod config;
mod deferred;
mod http;
mod limits;
mod nginx;
mod plugins;
mod prometheus;
mod reload;
mod sockets;
mod statics;
mod supervisor;
mod tables;
mod tasks;
mod ws;
mod ws_deflate;
mod ws_push;
