//! Errors, each carrying the file, key or plugin it is about.

use std::path::PathBuf;

use thiserror::Error;

/// A config that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid RON for the config's shape.
    #[error("{}:{line}:{column}: {message}{}", path.display(), key.as_ref().map(|k| format!(" (at {k})")).unwrap_or_default())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The key path, where known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or a reference does not resolve.
    #[error("{}:{line}:{column}: {key}: {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// The key path.
        key: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// A plugin that cannot be loaded or used.
#[derive(Debug, Error)]
pub enum PluginError {
    /// The `.so` could not be copied into the runtime folder.
    #[error("plugin {name}: cannot copy {} to {}: {source}", path.display(), to.display())]
    Copy {
        /// The plugin's name in the config.
        name: String,
        /// The file named in the config.
        path: PathBuf,
        /// The copy's path.
        to: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was refused before loading: others can write it, or it is not a whole ELF
    /// shared object for this machine.
    #[error("plugin {name}: refusing {}: {reason}", path.display())]
    Refused {
        /// The plugin's name in the config.
        name: String,
        /// The file named in the config.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// abi_stable refused the library.
    #[error("plugin {name}: cannot load {}: {reason}", path.display())]
    Load {
        /// The plugin's name in the config.
        name: String,
        /// The file named in the config.
        path: PathBuf,
        /// The useful part of abi_stable's message, with both plugin-api versions.
        reason: String,
    },
    /// The plugin's manifest could not be read, or does not provide what the config names.
    #[error("plugin {name} ({}): {reason}", path.display())]
    Manifest {
        /// The plugin's name in the config.
        name: String,
        /// The file named in the config.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The config names a component the plugin does not provide (as that kind).
    #[error("plugin {plugin} ({}): the config uses {kind} component {component:?}, but the plugin provides {provides}", path.display())]
    UnknownComponent {
        /// The plugin's name in the config.
        plugin: String,
        /// The file named in the config.
        path: PathBuf,
        /// The kind the config uses it as.
        kind: String,
        /// The component's name.
        component: String,
        /// What the plugin provides (`http hello, middleware timing`).
        provides: String,
    },
    /// A component's factory failed or panicked.
    #[error("plugin {plugin}: cannot instantiate {kind} {component:?}: {reason}")]
    Instantiate {
        /// The plugin's name.
        plugin: String,
        /// The component's kind.
        kind: &'static str,
        /// The component's name.
        component: String,
        /// The factory's error or panic message.
        reason: String,
    },
}

/// Why `plughost start` failed.
#[derive(Debug, Error)]
pub enum StartError {
    /// The config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin is unusable.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Another server holds the pid file.
    #[error("plughost is already running (pid {pid}, pid file {}); stop it first, or pass -i to ignore the pid file", pidfile.display())]
    AlreadyRunning {
        /// The running server's pid.
        pid: i32,
        /// The pid file.
        pidfile: PathBuf,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The runtime folder cannot be created, or others can write to it.
    #[error("runtime folder: {0}")]
    RuntimeDir(String),
    /// A shared table could not be created (its memory could not be allocated).
    #[error("tables: {0}")]
    Table(String),
    /// A server hook's `on_server_prepare` failed.
    #[error("{component}: on_server_prepare failed: {reason}")]
    Prepare {
        /// The lifecycle component (`plugin.component`).
        component: String,
        /// Its error.
        reason: String,
    },
    /// A worker could not start.
    #[error("worker {id} could not start: {reason}")]
    Worker {
        /// The worker's id.
        id: u32,
        /// Why.
        reason: String,
    },
}

impl StartError {
    /// An IO error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
        let what = what.into();
        move |source| StartError::Io { what, source }
    }
}
