//! What the control socket reports about the running server (`plughost info`).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
};

use crate::{plugin::Registry, runtime::stats::Stats};

/// What `info` reports, shared with the control socket.
#[derive(Debug)]
pub struct State {
    /// The config file.
    pub config_path: PathBuf,
    /// The address actually bound.
    pub listen: String,
    /// Worker threads.
    pub workers: usize,
    /// The `-x` version string.
    pub app_version: String,
    /// Loaded plugins.
    pub registry: RwLock<Arc<Registry>>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Panics in plugin code outside a call (drops, plugin threads).
    pub stray_panics: Arc<std::sync::atomic::AtomicU64>,
    /// The supervisor's line for `info` (its pid, restarts, last crash), when there is one.
    pub supervisor: Option<String>,
    /// Every WebSocket connection, for `info`.
    pub connections: Arc<crate::ws::registry::Connections>,
    /// The shared tables and counters, for `info`.
    pub tables: Arc<crate::table::Tables>,
    /// How the last reload went, for `info`.
    pub last_reload: Mutex<Option<String>>,
    /// The deferred responses, for `info`.
    pub deferrals: Arc<crate::plugin::deferred::Deferrals>,
}

impl State {
    /// Records how the last reload went.
    pub fn set_last_reload(&self, what: String) {
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(what);
        }
    }
}
