//! What the control socket reports about the running server (`plughost info`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use crate::{plugin::Registry, runtime::stats::Stats};

/// What `info` reports, shared with the control socket.
#[derive(Debug)]
pub struct State {
    /// The config file.
    pub config_path: PathBuf,
    /// The address actually bound.
    pub listen: SocketAddr,
    /// Worker threads.
    pub workers: usize,
    /// The `-x` version string.
    pub app_version: String,
    /// Loaded plugins.
    pub registry: RwLock<Arc<Registry>>,
    /// Counters.
    pub stats: Arc<Stats>,
}
