//! `server.ron`: the one config file. Parsed with serde + ron into structs with defaults, then
//! validated; every error names the file, and where it can the line, column and key path.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::error::{ConfigError, PluginError, StartError};

/// The whole config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP listener; port 0 picks a free port.
    pub listen: String,
    /// The permissions of the unix socket files this server creates (`listen` and
    /// `sockets`), such as `0o660`: the owner may always read and write.
    pub unix_socket_mode: u32,
    /// HTTP worker threads; 0 = one per core.
    pub worker_num: usize,
    /// After this many requests a worker recreates its plugin instances; 0 = never.
    pub max_request: u64,
    /// An idle worker takes over the waiting keep-alive connections of a worker whose event
    /// loop has stood still this many microseconds (a slow handler, or preempted); 0 = never.
    pub steal_after_us: u64,
    /// Seconds a graceful stop waits for in-flight requests.
    pub max_wait_time: u64,
    /// Folder for the pid file, the control socket and the copies of loaded plugins. Created
    /// 0700; a server refuses one that others can write to.
    pub runtime_dir: PathBuf,
    /// Load plugin files that are group- or world-writable or owned by another user than the
    /// server's (or root). Off: such a file is refused, since whoever can write it can run
    /// code in the server.
    pub allow_insecure_plugin_files: bool,
    /// Logging.
    pub log: LogConfig,
    /// HTTP limits.
    pub limits: Limits,
    /// A `KEY=value` file whose values plugins read through the host API (after the process
    /// environment).
    pub env_file: Option<PathBuf>,
    /// Plugins by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Routes, matched exact first, then in order.
    pub routes: Vec<RouteConfig>,
    /// Middleware components, in order.
    pub middleware: Vec<String>,
    /// Cleaner components, run after every request.
    pub cleaners: Vec<String>,
    /// Lifecycle hook components.
    pub hooks: Vec<String>,
    /// Hot reload.
    pub reload: ReloadConfig,
    /// The supervisor process that restarts the server after a crash.
    pub supervisor: SupervisorConfig,
    /// WebSocket on the HTTP port.
    pub websocket: WebSocketConfig,
    /// Task worker threads (tasks and events); 0 = task workers disabled.
    pub task_worker_num: usize,
    /// Tasks and events waiting (or delayed, or running) at most; more are refused.
    pub task_queue_size: usize,
    /// Events by name, each with its listener components in the order they run.
    pub events: BTreeMap<String, Vec<String>>,
    /// Millisecond cron jobs.
    pub timer: TimerConfig,
    /// Custom processes by name.
    pub processes: BTreeMap<String, ProcessConfig>,
    /// Shared tables by name: created before the workers, with a fixed number of rows.
    pub tables: BTreeMap<String, TableConfig>,
    /// Extra listeners (TCP, UDP) with socket handler components of their own.
    pub sockets: Vec<SocketConfig>,
    /// Static files served from a folder (`static: (root: "public")`); off when absent.
    #[serde(rename = "static", deserialize_with = "present")]
    pub statics: Option<StaticConfig>,
}

/// Static files: a folder served under a path prefix, before or after the routes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StaticConfig {
    /// The folder (relative to the config file's folder); it must exist.
    pub root: PathBuf,
    /// The URL path the folder is served under (`/`, `/assets/`).
    pub prefix: String,
    /// Files tried, in order, for a request for a folder (its path ending in `/`).
    pub index: Vec<String>,
    /// True: a file that exists wins over the routes; false: files are served only for
    /// requests no route matches.
    pub before_routes: bool,
    /// Serve through symbolic links that lead outside `root` (those inside are followed
    /// either way).
    pub follow_symlinks: bool,
    /// Serve files and folders whose name starts with a dot.
    pub hidden: bool,
    /// `cache-control: public, max-age=N`; 0 sends `no-cache` (browsers revalidate with
    /// the `etag` and get a 304).
    pub max_age: u64,
    /// Serve `FILE.br` or `FILE.gz` beside `FILE` to clients that accept that encoding.
    pub precompressed: bool,
}

impl Default for StaticConfig {
    fn default() -> Self {
        StaticConfig {
            root: "public".into(),
            prefix: "/".into(),
            index: vec!["index.html".into()],
            before_routes: true,
            follow_symlinks: false,
            hidden: false,
            max_age: 0,
            precompressed: true,
        }
    }
}

/// One extra listener and the socket handler that serves it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    /// `IP:PORT`; port 0 picks a free port (logged at start).
    pub listen: String,
    /// `listen` as written in the file (a unix socket's path made absolute is in `listen`).
    #[serde(skip)]
    pub listen_as_written: String,
    /// The transport.
    pub protocol: SocketProtocol,
    /// How a TCP byte stream is cut into frames: required for TCP, no silent default.
    #[serde(default, deserialize_with = "present")]
    pub framing: Option<Framing>,
    /// `plugin.component` of a socket handler (TCP and UDP; none for HTTP and WebSocket).
    #[serde(default)]
    pub handler: String,
    /// Largest frame (or unterminated `Eof` data) in bytes; past it the connection closes.
    #[serde(default = "max_package_bytes")]
    pub max_package_bytes: usize,
    /// Seconds a connection may send nothing before it is closed; 0 = forever.
    #[serde(default = "socket_idle_time")]
    pub heartbeat_idle_time: u64,
}

/// The path of a `unix:PATH` listen address.
pub fn unix_path(listen: &str) -> Option<&Path> {
    listen.strip_prefix("unix:").map(Path::new)
}

/// An optional key written without `Some(..)`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn max_package_bytes() -> usize {
    2 << 20
}

fn socket_idle_time() -> u64 {
    600
}

/// The transport of a socket.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SocketProtocol {
    /// A byte stream, cut into frames by `framing`.
    Tcp,
    /// Datagrams, each one a packet for `on_packet` (no framing).
    Udp,
    /// HTTP, served like the main listener: the same routes, middleware and WebSocket routes.
    Http,
    /// WebSocket upgrades to `websocket.routes` only; any other request gets 426.
    WebSocket,
}

impl SocketProtocol {
    /// Whether its connections are HTTP connections (served by the routes, no handler).
    pub fn is_http(self) -> bool {
        matches!(self, SocketProtocol::Http | SocketProtocol::WebSocket)
    }
}

/// How a byte stream is cut into frames.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub enum Framing {
    /// Each frame ends with these bytes (removed before `on_receive`).
    Eof(String),
    /// Each frame starts with a length header.
    Length {
        /// The header's size and byte order.
        header: LengthHeader,
        /// Where the length field starts in the frame.
        #[serde(default)]
        offset: usize,
        /// Added to the length field to get the bytes that follow the field.
        #[serde(default)]
        adjust: i64,
    },
    /// Each read as it comes.
    Raw,
}

/// The length field of `Length` framing.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum LengthHeader {
    /// One byte.
    U8,
    /// Two bytes, big-endian.
    U16Be,
    /// Two bytes, little-endian.
    U16Le,
    /// Four bytes, big-endian.
    U32Be,
    /// Four bytes, little-endian.
    U32Le,
}

/// Longest key a table takes, in bytes (`key_max` may lower it to save memory).
pub const TABLE_KEY_MAX: u32 = 256;

/// Longest value a `Str` or `Bytes` column may be declared to hold, in bytes.
pub const TABLE_VALUE_MAX: u32 = 1 << 20;

/// Most rows one table may be declared with (row numbers are 32-bit).
pub const TABLE_SIZE_MAX: u64 = 1 << 31;

/// One shared table: exactly `size` rows, each with the same typed columns.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Rows: exactly this many distinct keys fit, whatever the keys.
    pub size: u64,
    /// The columns, in order.
    #[serde(default)]
    pub columns: Vec<ColumnConfig>,
    /// Longest key in bytes, at most 256 (the default). Each row reserves this much.
    #[serde(default = "table_key_max")]
    pub key_max: u32,
}

fn table_key_max() -> u32 {
    TABLE_KEY_MAX
}

/// One column of a table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// Its name, unique in the table.
    pub name: String,
    /// What it holds.
    pub kind: ColumnKind,
}

/// What a column holds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum ColumnKind {
    /// A signed 64-bit integer.
    I64,
    /// An unsigned 64-bit integer.
    U64,
    /// A 64-bit float.
    F64,
    /// UTF-8 text of at most this many bytes (a longer value is refused, never cut).
    Str(u32),
    /// Bytes, at most this many.
    Bytes(u32),
}

/// The cron timer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimerConfig {
    /// Run the timer thread.
    pub enable: bool,
    /// The cron jobs.
    pub jobs: Vec<CronConfig>,
    /// Seconds a reload or stop waits for a running job.
    pub max_wait_time: u64,
}

impl Default for TimerConfig {
    fn default() -> Self {
        TimerConfig {
            enable: false,
            jobs: Vec::new(),
            max_wait_time: 5,
        }
    }
}

/// One cron job.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CronConfig {
    /// `plugin.component` of a cron job.
    pub job: String,
    /// Milliseconds between runs (fixed rate).
    pub interval_ms: u64,
    /// Run once at start instead of one interval after it.
    #[serde(default)]
    pub immediate: bool,
}

/// One custom process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// `plugin.component` of a custom process.
    pub component: String,
    /// Instances, each on its own thread.
    #[serde(default = "one")]
    pub num: usize,
    /// Milliseconds before a `run` that returned or panicked is started again.
    #[serde(default = "restart_interval")]
    pub restart_interval_ms: u64,
    /// Started only when true.
    #[serde(default = "yes")]
    pub enable: bool,
}

fn one() -> usize {
    1
}

fn restart_interval() -> u64 {
    1000
}

/// WebSocket on the HTTP port.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Serve WebSocket upgrades on `routes`.
    pub enable: bool,
    /// Paths and their WebSocket handler components.
    pub routes: Vec<WsRouteConfig>,
    /// Seconds a silent connection may stay open; 0 = forever.
    pub heartbeat_idle_time: u64,
    /// Seconds between checks for silent connections.
    pub heartbeat_check_interval: u64,
    /// Largest incoming message in bytes; larger closes the connection with 1009.
    pub max_message_size: usize,
    /// Most open WebSocket connections; more are refused with 503.
    pub max_connections: usize,
    /// Messages queued to one connection before it counts as a slow reader and is closed.
    pub send_queue: usize,
    /// Messages a client may send per second; one that sends more is closed with 1008.
    /// 0: no limit (a flooding client is still only served its share of its worker).
    pub max_messages_per_second: u64,
    /// permessage-deflate (RFC 7692), for clients that offer it (every browser does).
    pub deflate: DeflateConfig,
}

/// permessage-deflate settings.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeflateConfig {
    /// Accept a client's offer of permessage-deflate.
    pub enable: bool,
    /// Keep each connection's compression context between messages: better ratios for
    /// streams of similar messages, about 300 KiB more per connection that uses it.
    /// Off: every message is compressed on its own, and an idle connection holds nothing.
    pub context_takeover: bool,
    /// zlib compression level, 0 (store) to 9 (smallest).
    pub level: u32,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub min_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enable: true,
            context_takeover: false,
            level: 1,
            min_size: 64,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            enable: false,
            routes: Vec::new(),
            heartbeat_idle_time: 600,
            heartbeat_check_interval: 60,
            max_message_size: 1 << 20,
            max_connections: 10_000,
            send_queue: 256,
            max_messages_per_second: 0,
            deflate: DeflateConfig::default(),
        }
    }
}

/// One WebSocket route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WsRouteConfig {
    /// An exact path.
    pub path: String,
    /// `plugin.component` of a WebSocket handler.
    pub handler: String,
}

/// Hot reload.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the plugin files and this config with inotify and apply changes live.
    pub inotify: bool,
    /// Wait this long after the last change before reloading (a build writes several files).
    pub debounce_ms: u64,
    /// More files or folders whose changes reload every plugin.
    pub watch: Vec<PathBuf>,
}

/// The supervisor: `plughost start` runs the server as a child process on sockets the
/// supervisor holds, and starts a new one within a second when it dies.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Run the server under a supervisor (off: `plughost start` is the server itself, and a
    /// crash is the init system's business).
    pub enable: bool,
    /// This many crashes within `crash_window_secs` stop the supervisor (exit status 70).
    pub max_crashes: u32,
    /// The window for `max_crashes`, in seconds.
    pub crash_window_secs: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            enable: true,
            max_crashes: 5,
            crash_window_secs: 60,
        }
    }
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            inotify: false,
            debounce_ms: 100,
            watch: Vec::new(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:5200".into(),
            unix_socket_mode: 0o660,
            worker_num: 0,
            max_request: 0,
            steal_after_us: 500,
            max_wait_time: 5,
            runtime_dir: "run".into(),
            allow_insecure_plugin_files: false,
            log: LogConfig::default(),
            limits: Limits::default(),
            env_file: None,
            plugins: BTreeMap::new(),
            routes: Vec::new(),
            middleware: Vec::new(),
            cleaners: Vec::new(),
            hooks: Vec::new(),
            reload: ReloadConfig::default(),
            supervisor: SupervisorConfig::default(),
            websocket: WebSocketConfig::default(),
            task_worker_num: 0,
            task_queue_size: 1024,
            events: BTreeMap::new(),
            timer: TimerConfig::default(),
            processes: BTreeMap::new(),
            tables: BTreeMap::new(),
            sockets: Vec::new(),
            statics: None,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// Log to this file instead of stderr (always used with `-d`).
    pub file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            file: None,
        }
    }
}

/// HTTP limits.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request head (request line + headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Most header lines; more gets 431.
    pub max_headers: usize,
    /// Largest request body; larger gets 413.
    pub max_body_bytes: usize,
    /// A head not complete this long after its first byte gets 408.
    pub header_read_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long.
    pub keepalive_timeout_ms: u64,
    /// Bytes of request bodies held or announced across all connections (bodies too large to
    /// sit in a connection's read buffer count); a request that would go past it gets 503.
    pub max_inflight_body_bytes: usize,
    /// A response (or WebSocket write) the client does not take within this long closes the
    /// connection.
    pub send_timeout_ms: u64,
    /// A deferred response not answered (or a started stream that sends nothing) within this
    /// long gets 504 (a stream is cut).
    pub defer_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 8192,
            max_headers: 64,
            max_body_bytes: 1 << 20,
            header_read_timeout_ms: 10_000,
            keepalive_timeout_ms: 60_000,
            max_inflight_body_bytes: 64 << 20,
            send_timeout_ms: 30_000,
            defer_timeout_ms: 30_000,
        }
    }
}

/// One plugin.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The `.so` file.
    pub path: PathBuf,
    /// Loaded only when true.
    #[serde(default = "yes")]
    pub enable: bool,
    /// Per-component config, by component name, handed to the plugin as RON.
    #[serde(default)]
    pub config: BTreeMap<String, ron::Value>,
}

fn yes() -> bool {
    true
}

/// One route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `/exact`, `/with/{param}`, or `/prefix/*`.
    pub path: String,
    /// `plugin.component` of an HTTP handler.
    pub handler: String,
    /// Allowed methods; empty = any.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// A `plugin.component` reference, split.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentRef {
    /// The plugin's name in `plugins`.
    pub plugin: String,
    /// The component's name inside the plugin.
    pub component: String,
}

impl ComponentRef {
    /// Parses `plugin.component`.
    pub fn parse(s: &str) -> Option<ComponentRef> {
        let (plugin, component) = s.split_once('.')?;
        (!plugin.is_empty() && !component.is_empty()).then(|| ComponentRef {
            plugin: plugin.to_owned(),
            component: component.to_owned(),
        })
    }
}

impl std::fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.plugin, self.component)
    }
}

/// A config as loaded: the values, and where they came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The parsed, validated config with every path made absolute.
    pub config: Config,
    /// The file it was read from (absolute).
    pub path: PathBuf,
    /// Its text, to point errors found later (against the loaded plugins) at their line.
    pub text: String,
}

impl Loaded {
    /// A plugin error found while resolving this config: a component the plugin does not
    /// provide is the config's fault, and is reported at its line like other config errors.
    pub fn locate(&self, e: PluginError) -> StartError {
        match &e {
            PluginError::UnknownComponent {
                plugin, component, ..
            } => StartError::Config(
                self.invalid_reference(&format!("{plugin}.{component}"), e.to_string()),
            ),
            _ => StartError::Plugin(e),
        }
    }

    /// An error about the component reference `reference`, at the place the config uses it.
    pub fn invalid_reference(&self, reference: &str, message: String) -> ConfigError {
        let (line, column) = locate(&self.text, reference);
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            key: self
                .config
                .key_of(reference)
                .unwrap_or_else(|| "plugins".into()),
            message,
        }
    }
}

impl Config {
    /// Reads `path`, or `server.ENV.ron` beside it when `env` is given and that file exists.
    pub fn load(path: &Path, env: Option<&str>) -> Result<Loaded, ConfigError> {
        let path = match env {
            Some(env) => {
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("server");
                let candidate = path.with_file_name(format!("{stem}.{env}.ron"));
                if candidate.exists() {
                    candidate
                } else {
                    path.to_path_buf()
                }
            }
            None => path.to_path_buf(),
        };
        let path = std::path::absolute(&path).unwrap_or(path);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Config::parse(&text, &path)?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let config = config.resolve_paths(base);
        config.check_static_root(&text, &path)?;
        Ok(Loaded { config, path, text })
    }

    /// For `stop`, `reload` and `info`: the config, or, when it does not validate (say an
    /// edit the running server refused), just its `runtime_dir` and `max_wait_time`, which is
    /// all it takes to reach the running server. The error comes back beside it.
    pub fn load_for_control(
        path: &Path,
        env: Option<&str>,
    ) -> Result<(Loaded, Option<ConfigError>), ConfigError> {
        let err = match Config::load(path, env) {
            Ok(l) => return Ok((l, None)),
            Err(e @ ConfigError::Read { .. }) => return Err(e),
            Err(e) => e,
        };
        let path = match &err {
            ConfigError::Parse { path, .. } | ConfigError::Invalid { path, .. } => path.clone(),
            ConfigError::Read { .. } => unreachable!(),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let Ok(ron::Value::Map(map)) = ron::from_str::<ron::Value>(&text) else {
            return Err(err);
        };
        let mut config = Config::default();
        for (k, v) in map.iter() {
            match (k, v) {
                (ron::Value::String(k), ron::Value::String(dir)) if k == "runtime_dir" => {
                    config.runtime_dir = dir.into();
                }
                (ron::Value::String(k), ron::Value::Number(n)) if k == "max_wait_time" => {
                    config.max_wait_time = n.as_i64().unwrap_or(5).max(0) as u64;
                }
                _ => {}
            }
        }
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        Ok((
            Loaded {
                config: config.resolve_paths(&base),
                path,
                text,
            },
            Some(err),
        ))
    }

    /// Parses and validates config text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let options = ron::Options::default();
        let config: Config = match options.from_str(text) {
            Ok(c) => c,
            Err(err) => {
                // A second pass with serde_path_to_error finds the key path of the error.
                let key = ron::Deserializer::from_str(text)
                    .ok()
                    .and_then(|mut de| {
                        serde_path_to_error::deserialize::<_, Config>(&mut de)
                            .err()
                            .map(|e| e.path().to_string())
                    })
                    .filter(|k| k != "." && !k.is_empty());
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    line: err.position.line,
                    column: err.position.col,
                    key,
                    message: err.code.to_string(),
                });
            }
        };
        config.validate(text, path)
    }

    /// Checks what serde cannot: values in range and references that resolve.
    pub fn validate(self, text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, needle: &str, message: String| {
            let (line, column) = locate(text, needle);
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                key,
                message,
            }
        };
        self.validate_basics(&invalid)?;
        let check_ref = |key: String, s: &str| -> Result<ComponentRef, ConfigError> {
            let Some(r) = ComponentRef::parse(s) else {
                return Err(invalid(
                    key,
                    s,
                    format!("{s:?} is not a component reference \"plugin.component\""),
                ));
            };
            match self.plugins.get(&r.plugin) {
                None => Err(invalid(
                    key,
                    s,
                    format!("{s:?} names plugin {:?}, which is not in plugins", r.plugin),
                )),
                Some(p) if !p.enable => Err(invalid(
                    key,
                    s,
                    format!("{s:?} names plugin {:?}, which is not enabled", r.plugin),
                )),
                Some(_) => Ok(r),
            }
        };
        self.validate_routes(&invalid, &check_ref)?;
        self.validate_services(&invalid, &check_ref)?;
        self.validate_tables(&invalid)?;
        self.validate_sockets(&invalid, &check_ref)?;
        self.validate_static(&invalid)?;
        for (list, name) in [
            (&self.middleware, "middleware"),
            (&self.cleaners, "cleaners"),
            (&self.hooks, "hooks"),
        ] {
            for (i, s) in list.iter().enumerate() {
                check_ref(format!("{name}[{i}]"), s)?;
                if list[..i].contains(s) {
                    let (line, column) =
                        locate_nth(text, s, list[..i].iter().filter(|o| *o == s).count());
                    return Err(ConfigError::Invalid {
                        path: path.to_path_buf(),
                        line,
                        column,
                        key: format!("{name}[{i}]"),
                        message: format!(
                            "{s:?} is listed twice; each component runs once per request (list it once)"
                        ),
                    });
                }
            }
        }
        Ok(self)
    }

    /// The address, the log level and the limits.
    fn validate_basics(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.supervisor.enable && self.supervisor.max_crashes == 0 {
            return Err(invalid(
                "supervisor.max_crashes".into(),
                "max_crashes",
                "must be at least 1".into(),
            ));
        }
        let unix = unix_path(&self.listen).is_some_and(|p| !p.as_os_str().is_empty());
        if !unix && self.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "listen".into(),
                &self.listen,
                format!(
                    "{:?} is not an address such as \"127.0.0.1:5200\" or \"unix:run/http.sock\"",
                    self.listen
                ),
            ));
        }
        if self.unix_socket_mode > 0o777 || self.unix_socket_mode & 0o600 != 0o600 {
            return Err(invalid(
                "unix_socket_mode".into(),
                "unix_socket_mode",
                format!(
                    "{:#o} is not a file mode whose owner may read and write, such as 0o660",
                    self.unix_socket_mode
                ),
            ));
        }
        if log_level(&self.log.level).is_none() {
            return Err(invalid(
                "log.level".into(),
                &self.log.level,
                format!(
                    "{:?} is not one of off, error, warn, info, debug, trace",
                    self.log.level
                ),
            ));
        }
        let l = &self.limits;
        for (key, value, min) in [
            ("limits.max_header_bytes", l.max_header_bytes as u64, 256),
            ("limits.max_headers", l.max_headers as u64, 1),
            ("limits.header_read_timeout_ms", l.header_read_timeout_ms, 1),
            ("limits.keepalive_timeout_ms", l.keepalive_timeout_ms, 1),
            ("limits.defer_timeout_ms", l.defer_timeout_ms, 1),
        ] {
            if value < min {
                let name = key.rsplit('.').next().unwrap_or(key);
                return Err(invalid(key.into(), name, format!("must be at least {min}")));
            }
        }
        Ok(())
    }

    /// HTTP and WebSocket routes.
    fn validate_routes(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
        check_ref: &impl Fn(String, &str) -> Result<ComponentRef, ConfigError>,
    ) -> Result<(), ConfigError> {
        for (i, route) in self.routes.iter().enumerate() {
            check_ref(format!("routes[{i}].handler"), &route.handler)?;
            if let Err(why) = crate::router::check_pattern(&route.path) {
                return Err(invalid(format!("routes[{i}].path"), &route.path, why));
            }
            for m in &route.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(invalid(
                        format!("routes[{i}].methods"),
                        m,
                        format!("{m:?} is not a method such as \"GET\""),
                    ));
                }
            }
        }
        for (i, route) in self.websocket.routes.iter().enumerate() {
            check_ref(format!("websocket.routes[{i}].handler"), &route.handler)?;
            if !route.path.starts_with('/') || route.path.contains(['{', '}', '*']) {
                return Err(invalid(
                    format!("websocket.routes[{i}].path"),
                    &route.path,
                    format!("{:?} must be an exact path starting with '/'", route.path),
                ));
            }
        }
        if self.websocket.enable
            && self.websocket.heartbeat_idle_time > 0
            && self.websocket.heartbeat_check_interval == 0
        {
            return Err(invalid(
                "websocket.heartbeat_check_interval".into(),
                "heartbeat_check_interval",
                "must be at least 1 (second) when heartbeat_idle_time is set".into(),
            ));
        }
        if self.websocket.deflate.level > 9 {
            return Err(invalid(
                "websocket.deflate.level".into(),
                "level",
                "must be 0 (store) to 9 (smallest)".into(),
            ));
        }
        Ok(())
    }

    /// Task workers, events, the timer and custom processes.
    fn validate_services(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
        check_ref: &impl Fn(String, &str) -> Result<ComponentRef, ConfigError>,
    ) -> Result<(), ConfigError> {
        if self.task_queue_size == 0 {
            return Err(invalid(
                "task_queue_size".into(),
                "task_queue_size",
                "must be at least 1".into(),
            ));
        }
        for (event, listeners) in &self.events {
            if event.is_empty() {
                return Err(invalid(
                    "events".into(),
                    "events",
                    "an event name is empty".into(),
                ));
            }
            for (i, l) in listeners.iter().enumerate() {
                check_ref(format!("events.{event}[{i}]"), l)?;
            }
        }
        for (i, job) in self.timer.jobs.iter().enumerate() {
            check_ref(format!("timer.jobs[{i}].job"), &job.job)?;
            if job.interval_ms == 0 {
                return Err(invalid(
                    format!("timer.jobs[{i}].interval_ms"),
                    "interval_ms",
                    "must be at least 1 (millisecond)".into(),
                ));
            }
        }
        for (name, p) in self.processes.iter().filter(|(_, p)| p.enable) {
            check_ref(format!("processes.{name}.component"), &p.component)?;
            if p.num == 0 {
                return Err(invalid(
                    format!("processes.{name}.num"),
                    name,
                    "must be at least 1 (or set enable: false)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Table sizes, key and value limits, column names.
    fn validate_tables(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        for (name, t) in &self.tables {
            if name.is_empty() || name.len() > TABLE_KEY_MAX as usize {
                return Err(invalid(
                    "tables".into(),
                    "tables",
                    format!("a table name must be 1 to {TABLE_KEY_MAX} bytes"),
                ));
            }
            if t.size == 0 || t.size > TABLE_SIZE_MAX {
                return Err(invalid(
                    format!("tables.{name}.size"),
                    name,
                    format!("must be 1 to {TABLE_SIZE_MAX} rows, not {}", t.size),
                ));
            }
            if t.key_max == 0 || t.key_max > TABLE_KEY_MAX {
                return Err(invalid(
                    format!("tables.{name}.key_max"),
                    name,
                    format!("must be 1 to {TABLE_KEY_MAX} bytes, not {}", t.key_max),
                ));
            }
            for (i, c) in t.columns.iter().enumerate() {
                let key = format!("tables.{name}.columns[{i}]");
                if c.name.is_empty() || t.columns[..i].iter().any(|o| o.name == c.name) {
                    let why = format!("column name {:?} is empty or used twice", c.name);
                    return Err(invalid(key, name, why));
                }
                if let ColumnKind::Str(max) | ColumnKind::Bytes(max) = c.kind {
                    if max == 0 || max > TABLE_VALUE_MAX {
                        let why = format!(
                            "{:?} must hold 1 to {TABLE_VALUE_MAX} bytes, not {max}",
                            c.name
                        );
                        return Err(invalid(format!("{key}.kind"), &c.name, why));
                    }
                }
            }
        }
        Ok(())
    }

    /// Addresses, framing (required for TCP) and handlers of the sockets; errors point at the
    /// socket's `listen` line.
    fn validate_sockets(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
        check_ref: &impl Fn(String, &str) -> Result<ComponentRef, ConfigError>,
    ) -> Result<(), ConfigError> {
        for (i, s) in self.sockets.iter().enumerate() {
            let at =
                |key: &str, why: String| invalid(format!("sockets[{i}].{key}"), &s.listen, why);
            match unix_path(&s.listen) {
                Some(p) if p.as_os_str().is_empty() => {
                    return Err(at(
                        "listen",
                        "a unix socket needs a path: \"unix:run/echo.sock\"".into(),
                    ));
                }
                Some(_) if s.protocol == SocketProtocol::Udp => {
                    let why = "unix sockets are stream sockets here: use protocol: Tcp";
                    return Err(at("protocol", why.into()));
                }
                Some(_) => {}
                None if s.listen.parse::<SocketAddr>().is_err() => {
                    let why = format!(
                        "{:?} is not an address such as \"127.0.0.1:5291\" or \"unix:run/echo.sock\"",
                        s.listen
                    );
                    return Err(at("listen", why));
                }
                None => {}
            }
            self.validate_socket_handler(i, s, &at, check_ref)?;
            let ephemeral = s.listen.parse::<SocketAddr>().is_ok_and(|a| a.port() == 0);
            if !ephemeral && s.listen == self.listen {
                return Err(at("listen", format!("{:?} is the main listen", s.listen)));
            }
            if !ephemeral && self.sockets[..i].iter().any(|o| o.listen == s.listen) {
                return Err(at("listen", format!("{:?} is listed twice", s.listen)));
            }
            if s.max_package_bytes == 0 {
                return Err(at("max_package_bytes", "must be at least 1".into()));
            }
            match (&s.protocol, &s.framing) {
                (SocketProtocol::Tcp, None) => {
                    let why = format!(
                        "the TCP socket {:?} needs a framing: Eof(\"\\r\\n\"), \
                         Length(header: U32Be, offset: 0, adjust: 0) or Raw",
                        s.listen
                    );
                    return Err(at("framing", why));
                }
                (SocketProtocol::Udp, Some(_)) => {
                    let why = "a UDP socket takes no framing: each datagram is one packet";
                    return Err(at("framing", why.into()));
                }
                (_, Some(Framing::Eof(eof))) if eof.is_empty() => {
                    return Err(at("framing", "Eof needs at least one byte".into()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A TCP or UDP socket names its handler; an HTTP or WebSocket one serves the routes.
    fn validate_socket_handler(
        &self,
        i: usize,
        s: &SocketConfig,
        at: &impl Fn(&str, String) -> ConfigError,
        check_ref: &impl Fn(String, &str) -> Result<ComponentRef, ConfigError>,
    ) -> Result<(), ConfigError> {
        let p = s.protocol;
        if !p.is_http() {
            if s.handler.is_empty() {
                let why = format!("a {p:?} socket needs a handler: \"plugin.component\"");
                return Err(at("handler", why));
            }
            return check_ref(format!("sockets[{i}].handler"), &s.handler).map(|_| ());
        }
        if !s.handler.is_empty() {
            let why = format!("a {p:?} socket takes no handler: it serves the routes");
            return Err(at("handler", why));
        }
        if s.framing.is_some() {
            return Err(at("framing", format!("a {p:?} socket takes no framing")));
        }
        if p == SocketProtocol::WebSocket && !self.websocket.enable {
            let why = "a WebSocket socket serves websocket.routes: set websocket.enable";
            return Err(at("protocol", why.into()));
        }
        Ok(())
    }

    fn resolve_paths(mut self, base: &Path) -> Config {
        let abs = |p: &Path| -> PathBuf {
            // Lexically, without touching the file system: `config/../target` -> `target`.
            let mut out = PathBuf::new();
            for part in base.join(p).components() {
                match part {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    other => out.push(other),
                }
            }
            out
        };
        self.runtime_dir = abs(&self.runtime_dir);
        self.log.file = self.log.file.as_deref().map(abs);
        self.env_file = self.env_file.as_deref().map(abs);
        for p in self.plugins.values_mut() {
            p.path = abs(&p.path);
        }
        for w in self.reload.watch.iter_mut() {
            *w = abs(w);
        }
        if let Some(p) = unix_path(&self.listen) {
            self.listen = format!("unix:{}", abs(p).display());
        }
        for s in self.sockets.iter_mut() {
            s.listen_as_written = s.listen.clone();
            if let Some(p) = unix_path(&s.listen) {
                s.listen = format!("unix:{}", abs(p).display());
            }
        }
        if let Some(s) = self.statics.as_mut() {
            s.root = abs(&s.root);
        }
        self
    }

    /// The prefix and the index names of `static`.
    fn validate_static(
        &self,
        invalid: &impl Fn(String, &str, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let Some(s) = &self.statics else {
            return Ok(());
        };
        if !s.prefix.starts_with('/') || s.prefix.contains(['?', '#', '%', '\\']) {
            return Err(invalid(
                "static.prefix".into(),
                &s.prefix,
                format!(
                    "{:?} must be a path such as \"/\" or \"/assets/\"",
                    s.prefix
                ),
            ));
        }
        for (i, name) in s.index.iter().enumerate() {
            if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
                return Err(invalid(
                    format!("static.index[{i}]"),
                    name,
                    format!("{name:?} must be a file name such as \"index.html\""),
                ));
            }
        }
        Ok(())
    }

    /// After the paths are resolved: the static root must be a folder that exists (the
    /// error names the line of `root`).
    fn check_static_root(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let Some(s) = &self.statics else {
            return Ok(());
        };
        let why = match std::fs::metadata(&s.root) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => "is not a folder".to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                "does not exist (a relative root is relative to the config file's folder)".into()
            }
            Err(e) => format!("cannot be used: {e}"),
        };
        // The `root:` inside the `static:` section, else the section itself.
        let section = text
            .match_indices("static")
            .map(|(i, _)| i)
            .find(|&i| text[i + 6..].trim_start().starts_with(':'));
        let at = section.map(|i| i + text[i..].find("root").unwrap_or(0));
        let (line, column) = at.map_or((0, 0), |i| line_col(text, i));
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            key: "static.root".into(),
            message: format!("{} {why}", s.root.display()),
        })
    }

    /// The number of worker threads to run.
    pub fn workers(&self) -> usize {
        if self.worker_num == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.worker_num
        }
    }

    /// The enabled plugins.
    pub fn enabled_plugins(&self) -> impl Iterator<Item = (&String, &PluginConfig)> {
        self.plugins.iter().filter(|(_, p)| p.enable)
    }

    /// The key that names component `reference` (`routes[2].handler`, `middleware[0]`, ...),
    /// for errors.
    pub fn key_of(&self, reference: &str) -> Option<String> {
        let lists = [
            ("middleware", &self.middleware),
            ("cleaners", &self.cleaners),
            ("hooks", &self.hooks),
        ];
        self.routes
            .iter()
            .position(|r| r.handler == reference)
            .map(|i| format!("routes[{i}].handler"))
            .or_else(|| {
                self.websocket
                    .routes
                    .iter()
                    .position(|r| r.handler == reference)
                    .map(|i| format!("websocket.routes[{i}].handler"))
            })
            .or_else(|| {
                lists.iter().find_map(|(name, list)| {
                    list.iter()
                        .position(|c| c == reference)
                        .map(|i| format!("{name}[{i}]"))
                })
            })
            .or_else(|| {
                self.events.iter().find_map(|(event, names)| {
                    names
                        .iter()
                        .position(|c| c == reference)
                        .map(|i| format!("events.{event}[{i}]"))
                })
            })
            .or_else(|| {
                self.timer
                    .jobs
                    .iter()
                    .position(|j| j.job == reference)
                    .map(|i| format!("timer.jobs[{i}].job"))
            })
            .or_else(|| {
                self.processes
                    .iter()
                    .find(|(_, p)| p.component == reference)
                    .map(|(name, _)| format!("processes.{name}.component"))
            })
            .or_else(|| {
                self.sockets
                    .iter()
                    .position(|s| s.handler == reference)
                    .map(|i| format!("sockets[{i}].handler"))
            })
    }

    /// The RON text of a component's config, empty when it has none.
    pub fn component_config(&self, r: &ComponentRef) -> String {
        self.plugins
            .get(&r.plugin)
            .and_then(|p| p.config.get(&r.component))
            .map(ron_text)
            .unwrap_or_default()
    }
}

/// Writes a parsed RON value back as RON a plugin can deserialize into its own struct:
/// maps with identifier keys become structs (`(greeting: "hi")`), as they were written.
/// (`ron::to_string` would write them as maps, which a struct cannot be read from.)
pub fn ron_text(value: &ron::Value) -> String {
    use ron::{Number, Value};
    fn is_ident(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }
    match value {
        Value::Bool(b) => b.to_string(),
        Value::Char(c) => format!("{c:?}"),
        Value::Number(Number::Integer(i)) => i.to_string(),
        Value::Number(Number::Float(f)) => format!("{:?}", f.get()),
        Value::String(s) => format!("{s:?}"),
        Value::Unit => "()".to_owned(),
        Value::Option(None) => "None".to_owned(),
        Value::Option(Some(v)) => format!("Some({})", ron_text(v)),
        Value::Seq(items) => {
            let items: Vec<String> = items.iter().map(ron_text).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Map(map) => {
            let as_struct = map
                .keys()
                .all(|k| matches!(k, Value::String(s) if is_ident(s)));
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| match k {
                    Value::String(name) if as_struct => format!("{name}: {}", ron_text(v)),
                    _ => format!("{}: {}", ron_text(k), ron_text(v)),
                })
                .collect();
            if as_struct {
                format!("({})", fields.join(", "))
            } else {
                format!("{{{}}}", fields.join(", "))
            }
        }
    }
}

/// The `log` filter for a level name.
pub fn log_level(s: &str) -> Option<log::LevelFilter> {
    s.parse().ok()
}

/// Line and column (1-based) of the first quoted occurrence of `needle`, else of its bare
/// occurrence, else 0:0.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    locate_nth(text, needle, 0)
}

/// Like [`locate`], for the `n`-th (from 0) quoted occurrence.
fn locate_nth(text: &str, needle: &str, n: usize) -> (usize, usize) {
    let quoted = format!("\"{needle}\"");
    let at = text
        .match_indices(&quoted)
        .nth(n)
        .map(|(i, _)| i)
        .or_else(|| text.find(&quoted))
        .or_else(|| text.find(needle));
    at.map_or((0, 0), |i| line_col(text, i))
}

/// Line and column (1-based) of byte `i` of `text`.
fn line_col(text: &str, i: usize) -> (usize, usize) {
    let before = &text[..i];
    let line = before.matches('\n').count() + 1;
    let column = i - before.rfind('\n').map_or(0, |n| n + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("server.ron"))
    }

    const PLUGIN: &str = r#"plugins: { "hello": (path: "libhello.so") },"#;

    #[test]
    fn empty_config_takes_defaults() {
        assert_eq!(parse("()").unwrap(), Config::default());
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let err = parse("(\n  listen: \"127.0.0.1:1\",\n  worker_num: ,\n)").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("server.ron:3:"), "{text}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("(\n  limits: (max_body: 3),\n)")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.ron:2:"), "{err}");
        assert!(err.contains("max_body"), "{err}");
        assert!(err.contains("limits"), "{err}");
    }

    #[test]
    fn route_to_unknown_plugin_is_rejected() {
        let err = parse(&format!(
            "({PLUGIN}\n routes: [(path: \"/x\", handler: \"nope.x\")])"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes[0].handler"), "{err}");
        assert!(err.contains("nope"), "{err}");
        assert!(err.contains("server.ron:2:"), "{err}");
    }

    #[test]
    fn disabled_plugin_cannot_be_referenced() {
        let err = parse(
            r#"(plugins: { "hello": (path: "x.so", enable: false) }, middleware: ["hello.m"])"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not enabled"), "{err}");
    }

    #[test]
    fn bad_listen_and_level_are_rejected() {
        assert!(parse(r#"(listen: "nowhere")"#).is_err());
        assert!(parse(r#"(log: (level: "loud"))"#).is_err());
    }

    #[test]
    fn zero_max_headers_is_rejected() {
        let err = parse("(limits: (max_headers: 0))").unwrap_err().to_string();
        assert!(err.contains("limits.max_headers"), "{err}");
    }

    #[test]
    fn bad_route_pattern_is_rejected() {
        let err = parse(&format!(
            "({PLUGIN} routes: [(path: \"no-slash\", handler: \"hello.h\")])"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("routes[0].path"), "{err}");
    }

    #[test]
    fn component_config_round_trips_as_ron() {
        let c = parse(
            r#"(plugins: { "hello": (path: "x.so", config: { "hello": (greeting: "hi", n: 3) }) })"#,
        )
        .unwrap();
        let text = c.component_config(&ComponentRef::parse("hello.hello").unwrap());
        #[derive(Deserialize)]
        struct G {
            greeting: String,
            n: u32,
        }
        let g: G = ron::from_str(&text).unwrap();
        assert_eq!((g.greeting.as_str(), g.n), ("hi", 3));
    }

    #[test]
    fn env_file_is_preferred() {
        let dir = std::env::temp_dir().join(format!("plughost-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("server.ron"), "(worker_num: 1)").unwrap();
        std::fs::write(dir.join("server.prod.ron"), "(worker_num: 7)").unwrap();
        let base = Config::load(&dir.join("server.ron"), Some("prod")).unwrap();
        assert_eq!(base.config.worker_num, 7);
        let other = Config::load(&dir.join("server.ron"), Some("dev")).unwrap();
        assert_eq!(other.config.worker_num, 1);
        assert!(other.config.runtime_dir.starts_with(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn services_take_defaults() {
        let c = parse(&format!(
            r#"({PLUGIN} processes: {{ "p": (component: "hello.p") }})"#
        ))
        .unwrap();
        assert_eq!((c.task_worker_num, c.task_queue_size), (0, 1024));
        assert_eq!(c.timer, TimerConfig::default());
        let p = &c.processes["p"];
        assert_eq!((p.num, p.restart_interval_ms, p.enable), (1, 1000, true));
    }

    #[test]
    fn zero_task_queue_size_is_rejected() {
        let err = parse("(task_queue_size: 0)").unwrap_err().to_string();
        assert!(err.contains("task_queue_size"), "{err}");
    }

    #[test]
    fn event_listener_of_unknown_plugin_is_named() {
        let err = parse(&format!(
            "({PLUGIN}\n events: {{ \"paid\": [\"hello.a\", \"nope.b\"] }})"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("events.paid[1]"), "{err}");
        assert!(err.contains("server.ron:2:"), "{err}");
    }

    #[test]
    fn zero_cron_interval_is_rejected() {
        let err = parse(&format!(
            r#"({PLUGIN} timer: (enable: true, jobs: [(job: "hello.t", interval_ms: 0)]))"#
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("timer.jobs[0].interval_ms"), "{err}");
    }

    #[test]
    fn tables_parse_with_their_columns() {
        let c = parse(
            r#"(tables: { "sessions": (size: 100000, columns: [
                (name: "conn", kind: U64), (name: "score", kind: F64),
                (name: "name", kind: Str(64)),
            ]) })"#,
        )
        .unwrap();
        let t = &c.tables["sessions"];
        assert_eq!((t.size, t.key_max, t.columns.len()), (100_000, 256, 3));
        assert_eq!(t.columns[2].kind, ColumnKind::Str(64));
    }

    #[test]
    fn bad_tables_are_named_with_their_line() {
        let err = parse("(tables: {\n \"t\": (size: 0, columns: []),\n})")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.ron:2:") && err.contains("tables.t.size"),
            "{err}"
        );
        let twice = r#"(tables: { "t": (size: 1, columns: [(name: "a", kind: I64), (name: "a", kind: U64)]) })"#;
        let err = parse(twice).unwrap_err().to_string();
        assert!(err.contains("tables.t.columns[1]"), "{err}");
        let huge = r#"(tables: { "t": (size: 1, columns: [(name: "a", kind: Str(0))]) })"#;
        assert!(parse(huge)
            .unwrap_err()
            .to_string()
            .contains("columns[0].kind"));
        let key = r#"(tables: { "t": (size: 1, key_max: 257) })"#;
        assert!(parse(key)
            .unwrap_err()
            .to_string()
            .contains("tables.t.key_max"));
        let kind = "(tables: {\n \"t\": (size: 1, columns: [(name: \"a\", kind: Int)]),\n})";
        assert!(parse(kind)
            .unwrap_err()
            .to_string()
            .contains("server.ron:2:"));
    }

    #[test]
    fn sockets_parse_with_each_framing() {
        let text = format!(
            r#"({PLUGIN} sockets: [
                (listen: "127.0.0.1:0", protocol: Tcp, framing: Eof("\r\n"), handler: "hello.tcp"),
                (listen: "127.0.0.1:0", protocol: Tcp, framing: Length(header: U32Be, offset: 0, adjust: 0), handler: "hello.tcp", max_package_bytes: 16),
                (listen: "127.0.0.1:0", protocol: Tcp, framing: Raw, handler: "hello.tcp"),
                (listen: "127.0.0.1:0", protocol: Udp, handler: "hello.udp"),
            ])"#
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.sockets[0].framing, Some(Framing::Eof("\r\n".into())));
        assert_eq!(c.sockets[0].max_package_bytes, 2 << 20);
        assert_eq!(
            c.sockets[1].framing,
            Some(Framing::Length {
                header: LengthHeader::U32Be,
                offset: 0,
                adjust: 0
            })
        );
        assert_eq!(c.sockets[2].framing, Some(Framing::Raw));
        assert_eq!(
            (c.sockets[3].protocol, &c.sockets[3].framing),
            (SocketProtocol::Udp, &None)
        );
    }

    #[test]
    fn tcp_socket_without_framing_is_named_with_its_line() {
        let text = format!(
            "({PLUGIN}\n sockets: [\n  (listen: \"127.0.0.1:5291\", protocol: Tcp, handler: \"hello.tcp\"),\n ])"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("server.ron:3:") && err.contains("sockets[0].framing"),
            "{err}"
        );
        assert!(err.contains("needs a framing"), "{err}");
        let bad = format!(
            r#"({PLUGIN} sockets: [(listen: "nowhere", protocol: Tcp, framing: Raw, handler: "hello.tcp")])"#
        );
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("sockets[0].listen"));
        let twice = format!(
            r#"({PLUGIN} sockets: [(listen: "127.0.0.1:7", protocol: Tcp, framing: Raw, handler: "hello.tcp"), (listen: "127.0.0.1:7", protocol: Tcp, framing: Raw, handler: "hello.tcp")])"#
        );
        let err = parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains("sockets[1].listen") && err.contains("twice"),
            "{err}"
        );
        let unknown = r#"(sockets: [(listen: "127.0.0.1:0", protocol: Tcp, framing: Raw, handler: "nope.tcp")])"#;
        assert!(parse(unknown)
            .unwrap_err()
            .to_string()
            .contains("sockets[0].handler"));
    }

    #[test]
    fn process_with_zero_instances_is_rejected_unless_disabled() {
        let zero = r#"processes: { "p": (component: "hello.p", num: 0) }"#;
        let err = parse(&format!("({PLUGIN} {zero})"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("processes.p.num"), "{err}");
        let off = r#"processes: { "p": (component: "hello.p", num: 0, enable: false) }"#;
        assert!(parse(&format!("({PLUGIN} {off})")).is_ok());
    }

    #[test]
    fn static_section_takes_defaults_and_checks_prefix_and_index() {
        let c = parse("(static: (root: \"www\", before_routes: false))").unwrap();
        let s = c.statics.unwrap();
        assert_eq!(s.root, PathBuf::from("www"));
        assert_eq!(s.prefix, "/");
        assert_eq!(s.index, vec!["index.html".to_owned()]);
        assert!(!s.before_routes && s.precompressed && !s.follow_symlinks);
        assert_eq!(parse("()").unwrap().statics, None);
        let err = parse("(\n  static: (prefix: \"assets\"),\n)")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("server.ron:2:") && err.contains("static.prefix"),
            "{err}"
        );
        let err = parse("(static: (index: [\"../x\"]))")
            .unwrap_err()
            .to_string();
        assert!(err.contains("static.index[0]"), "{err}");
    }

    #[test]
    fn missing_static_root_names_its_line() {
        let dir = std::env::temp_dir().join(format!("plughost-static-root-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("public")).unwrap();
        let path = dir.join("server.ron");
        std::fs::write(&path, "(\n  static: (\n    root: \"public\",\n  ),\n)").unwrap();
        let loaded = Config::load(&path, None).unwrap();
        assert_eq!(loaded.config.statics.unwrap().root, dir.join("public"));
        std::fs::write(&path, "(\n  static: (\n    root: \"nope\",\n  ),\n)").unwrap();
        let err = Config::load(&path, None).unwrap_err().to_string();
        assert!(err.contains("server.ron:3:5: static.root:"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
