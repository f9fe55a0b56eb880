//! The host API plugins call: logging, the `-x` version string, env values, WebSocket
//! pushes, tasks, events and process messages. One value shared by every instance; callable
//! from any thread.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
};

use crate::ws::registry::Connections;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, ROption, RResult, RSlice, RStr, RString, RVec},
};
use plughost_plugin_api::abi::{
    HostBox, HostError, HostFfi, HostFfi_TO, LogLevel, Message, WorkerInfo,
};

/// What the host offers plugins.
#[derive(Debug, Clone)]
pub struct Host {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    app_version: String,
    env_file: HashMap<String, String>,
    connections: Arc<Connections>,
    /// The task queue and the custom processes, once they are started.
    jobs: OnceLock<Arc<dyn JobsApi>>,
    /// Panics in plugin code outside a call (a `Drop`, a thread the plugin spawned).
    stray_panics: Arc<AtomicU64>,
}

/// What the host API reaches of the jobs (task queue, events, custom processes): the jobs
/// implement it, so the host does not depend on them.
pub trait JobsApi: Send + Sync + std::fmt::Debug {
    /// `Host::deliver`.
    fn deliver(
        &self,
        task: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
        origin: WorkerInfo,
    ) -> Result<u64, HostError>;
    /// `Host::fire`.
    fn fire(
        &self,
        event: &str,
        payload: &[u8],
        delay_ms: u64,
        tries: u32,
    ) -> Result<u64, HostError>;
    /// `Host::send_to_process`.
    fn send_to_process(&self, name: &str, payload: RSlice<'_, u8>) -> Result<u64, HostError>;
}

impl Host {
    /// A host with the `-x` version string and the values of an env file, if any.
    pub fn new(app_version: String, env_file: Option<&Path>) -> Host {
        let env_file = env_file.map(read_env_file).unwrap_or_default();
        Host {
            inner: Arc::new(Shared {
                app_version,
                env_file,
                connections: Arc::default(),
                jobs: OnceLock::new(),
                stray_panics: Arc::default(),
            }),
        }
    }

    /// The WebSocket connections of every worker.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    /// Connects `deliver`, `fire` and `send_to_process` to the running jobs (once).
    pub fn set_jobs(&self, jobs: Arc<dyn JobsApi>) {
        let _ = self.inner.jobs.set(jobs);
    }

    /// Panics in plugin code outside a call, which plugins log with target `*::plughost::panic`.
    pub fn stray_panics(&self) -> Arc<AtomicU64> {
        self.inner.stray_panics.clone()
    }

    /// The handle given to plugins.
    pub fn boxed(&self) -> HostBox {
        HostFfi_TO::from_ptr(RArc::new(self.clone()), TD_Opaque)
    }
}

/// Reads `KEY=value` lines; `#` comments and blank lines are skipped, quotes are stripped.
fn read_env_file(path: &Path) -> HashMap<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (k.trim().to_owned(), v.to_owned())
            })
            .collect(),
        Err(e) => {
            log::warn!("cannot read env file {}: {e}", path.display());
            HashMap::new()
        }
    }
}

fn level(l: LogLevel) -> log::Level {
    match l {
        0 | 1 => log::Level::Error,
        2 => log::Level::Warn,
        3 => log::Level::Info,
        4 => log::Level::Debug,
        _ => log::Level::Trace,
    }
}

impl HostFfi for Host {
    fn log(&self, l: LogLevel, target: RStr<'_>, message: RStr<'_>) {
        if target.as_str().ends_with("::plughost::panic") {
            self.inner.stray_panics.fetch_add(1, Ordering::Relaxed);
        }
        log::logger().log(
            &log::Record::builder()
                .level(level(l))
                .target(target.as_str())
                .args(format_args!("{}", message.as_str()))
                .build(),
        );
    }

    fn max_level(&self) -> LogLevel {
        log::max_level() as usize as LogLevel
    }

    fn app_version(&self) -> RString {
        self.inner.app_version.as_str().into()
    }

    fn env(&self, key: RStr<'_>) -> ROption<RString> {
        std::env::var(key.as_str())
            .ok()
            .or_else(|| self.inner.env_file.get(key.as_str()).cloned())
            .map(RString::from)
            .into()
    }

    fn ws_push(&self, conn: u64, message: Message<'_>) -> RResult<(), HostError> {
        self.inner.connections.push(conn, &message).into()
    }

    fn ws_broadcast(&self, message: Message<'_>, route: RStr<'_>, except: u64) -> u64 {
        self.inner
            .connections
            .broadcast(&message, route.as_str(), except)
    }

    fn ws_close(&self, conn: u64, code: u16, reason: RStr<'_>) -> RResult<(), HostError> {
        self.inner
            .connections
            .close(conn, code, reason.as_str())
            .into()
    }

    fn ws_is_established(&self, conn: u64) -> bool {
        self.inner.connections.is_established(conn)
    }

    fn ws_connections(&self, route: RStr<'_>) -> RVec<u64> {
        self.inner.connections.ids(route.as_str()).into()
    }

    fn deliver(
        &self,
        task: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
        origin: WorkerInfo,
    ) -> RResult<u64, HostError> {
        match self.inner.jobs.get() {
            Some(s) => s
                .deliver(task.as_str(), payload.as_slice(), delay_ms, tries, origin)
                .into(),
            None => RResult::RErr(HostError::NotEnabled),
        }
    }

    fn fire(
        &self,
        event: RStr<'_>,
        payload: RSlice<'_, u8>,
        delay_ms: u64,
        tries: u32,
    ) -> RResult<u64, HostError> {
        match self.inner.jobs.get() {
            Some(s) => s
                .fire(event.as_str(), payload.as_slice(), delay_ms, tries)
                .into(),
            None => RResult::RErr(HostError::NotEnabled),
        }
    }

    fn send_to_process(
        &self,
        process: RStr<'_>,
        payload: RSlice<'_, u8>,
    ) -> RResult<u64, HostError> {
        match self.inner.jobs.get() {
            Some(s) => s.send_to_process(process.as_str(), payload).into(),
            None => RResult::RErr(HostError::UnknownProcess),
        }
    }
}
