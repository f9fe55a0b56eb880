//! The host API plugins call: logging, the `-x` version string, env values, WebSocket
//! pushes, tasks, events, process messages, shared tables and counters. One value shared by
//! every instance; callable from any thread.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock, PoisonError, RwLock,
    },
};

use super::deferred::Deferrals;
use crate::{
    socket::registry::{Close, Sockets},
    table::{Cell, Kind, Layout, Num, TableError, Tables, Value},
    ws::registry::Connections,
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, ROption, RResult, RSlice, RStr, RString, RVec},
};
use plughost_plugin_api::abi::{
    self, CellRef, ColumnDesc, ColumnKind, DeferOp, HostBox, HostError, HostFfi, HostFfi_TO,
    LogLevel, Message, ScanBatch, ScanRow, TableDesc, ValueRef, WorkerInfo,
};
use plughost_plugin_api::stats::ServerStats;

/// What the host offers plugins.
#[derive(Debug, Clone)]
pub struct Host {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    app_version: String,
    /// `env_file` from the config (fixed for the server process's life).
    env_path: Option<PathBuf>,
    /// Its values, read at start and again at each reload.
    env_file: RwLock<Arc<HashMap<String, String>>>,
    /// Where `request_reload` goes, once the main thread listens.
    reload: OnceLock<ReloadRequester>,
    connections: Arc<Connections>,
    /// The socket connections of every worker.
    sockets: Arc<Sockets>,
    /// The task queue and the custom processes, once they are started.
    jobs: OnceLock<Arc<dyn JobsApi>>,
    /// Panics in plugin code outside a call (a `Drop`, a thread the plugin spawned).
    stray_panics: Arc<AtomicU64>,
    /// The shared tables and counters, created before the workers.
    tables: Arc<Tables>,
    /// Where `stats` snapshots come from, once the server is up.
    stats: OnceLock<Arc<dyn StatsApi>>,
    /// The deferred responses waiting for their handles.
    deferrals: Arc<Deferrals>,
}

/// What takes the server's stats snapshot for `Host::stats`: the server implements it, so
/// the host does not depend on it.
pub trait StatsApi: Send + Sync + std::fmt::Debug {
    /// A snapshot of every counter.
    fn snapshot(&self) -> ServerStats;
}

/// A plugin's request for a reload (`host.request_reload(reason)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadRequest {
    /// The plugin that asked.
    pub plugin: String,
    /// Why, in its words.
    pub reason: String,
}

/// Hands a [`ReloadRequest`] to the main thread; false when it no longer listens.
pub struct ReloadRequester(pub Box<dyn Fn(ReloadRequest) -> bool + Send + Sync>);

impl std::fmt::Debug for ReloadRequester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadRequester")
    }
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
    /// A host with the `-x` version string, the values of an env file, if any, and the
    /// shared tables.
    pub fn new(app_version: String, env_file: Option<&Path>, tables: Arc<Tables>) -> Host {
        let values = env_file.map(read_env_file).unwrap_or_default();
        Host {
            inner: Arc::new(Shared {
                app_version,
                env_path: env_file.map(Path::to_path_buf),
                env_file: RwLock::new(Arc::new(values)),
                reload: OnceLock::new(),
                connections: Arc::default(),
                sockets: Arc::default(),
                jobs: OnceLock::new(),
                stray_panics: Arc::default(),
                tables,
                stats: OnceLock::new(),
                deferrals: Arc::default(),
            }),
        }
    }

    /// The shared tables and counters.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.inner.tables
    }

    /// The deferred responses of every worker.
    pub fn deferrals(&self) -> &Arc<Deferrals> {
        &self.inner.deferrals
    }

    /// The WebSocket connections of every worker.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    /// The socket connections of every worker.
    pub fn sockets(&self) -> &Arc<Sockets> {
        &self.inner.sockets
    }

    /// Connects `deliver`, `fire` and `send_to_process` to the running jobs (once).
    pub fn set_jobs(&self, jobs: Arc<dyn JobsApi>) {
        let _ = self.inner.jobs.set(jobs);
    }

    /// Connects `request_reload` to the main thread (once).
    pub fn set_reload_requester(&self, requester: ReloadRequester) {
        let _ = self.inner.reload.set(requester);
    }

    /// Reads the env file again: every thread's `host.env` answers from it from now on.
    /// Returns how many values it holds (`None` without an env file).
    pub fn reread_env(&self) -> Option<usize> {
        let path = self.inner.env_path.as_deref()?;
        let values = read_env_file(path);
        let n = values.len();
        *self
            .inner
            .env_file
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(values);
        Some(n)
    }

    fn env_value(&self, key: &str) -> Option<String> {
        let values = self
            .inner
            .env_file
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        values.get(key).cloned()
    }

    /// Connects `stats` to the running server (once); before, snapshots are empty and say
    /// the server is starting.
    pub fn set_stats(&self, stats: Arc<dyn StatsApi>) {
        let _ = self.inner.stats.set(stats);
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

/// Reads `KEY=value` lines; `#` comments and blank lines are skipped; a later line wins.
fn read_env_file(path: &Path) -> HashMap<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_env(&text),
        Err(e) => {
            log::warn!("cannot read env file {}: {e}", path.display());
            HashMap::new()
        }
    }
}

/// The values of an env file's text (see [`unquote`] for the values).
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), unquote(v.trim())))
        .collect()
}

/// A value as written: bare, `'single-quoted'` (taken as is), or `"double-quoted"` with the
/// escapes `\\ \" \n \r \t \$` (what the Apollo plugin writes).
fn unquote(v: &str) -> String {
    if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return inner.to_owned();
    }
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return v.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn table_error(e: TableError) -> HostError {
    match e {
        TableError::UnknownTable => HostError::UnknownTable,
        TableError::UnknownColumn => HostError::UnknownColumn,
        TableError::Full => HostError::TableFull,
        TableError::KeyTooLong => HostError::KeyTooLong,
        TableError::ValueTooLong => HostError::ValueTooLong,
        TableError::WrongType => HostError::WrongType,
        TableError::Overflow => HostError::Overflow,
    }
}

/// A plugin's cell as the table takes it: an integer of the other signedness fits when it
/// converts without loss, text fits a `Bytes` column; anything else is the table's to refuse.
fn cell<'a>(layout: &Layout, c: &CellRef<'a>) -> Result<(usize, Cell<'a>), HostError> {
    let col = c.column as usize;
    let kind = layout
        .columns
        .get(col)
        .ok_or(HostError::UnknownColumn)?
        .kind;
    let cell = match (kind, c.value) {
        (Kind::U64, ValueRef::I64(v)) => {
            Cell::U64(u64::try_from(v).map_err(|_| HostError::WrongType)?)
        }
        (Kind::I64, ValueRef::U64(v)) => {
            Cell::I64(i64::try_from(v).map_err(|_| HostError::WrongType)?)
        }
        (Kind::Bytes, ValueRef::Str(s)) => Cell::Bytes(s.as_str().as_bytes()),
        (_, ValueRef::I64(v)) => Cell::I64(v),
        (_, ValueRef::U64(v)) => Cell::U64(v),
        (_, ValueRef::F64(v)) => Cell::F64(v),
        (_, ValueRef::Str(s)) => Cell::Str(s.as_str()),
        (_, ValueRef::Bytes(b)) => Cell::Bytes(b.as_slice()),
    };
    Ok((col, cell))
}

/// An `incr` step in the column's kind: a negative `i64` on a `U64` column steps the other way.
fn step(kind: Kind, by: ValueRef<'_>, down: bool) -> Result<(Num, bool), HostError> {
    Ok(match (kind, by) {
        (Kind::I64, ValueRef::I64(v)) => (Num::I64(v), down),
        (Kind::I64, ValueRef::U64(v)) => (
            Num::I64(i64::try_from(v).map_err(|_| HostError::Overflow)?),
            down,
        ),
        (Kind::U64, ValueRef::U64(v)) => (Num::U64(v), down),
        (Kind::U64, ValueRef::I64(v)) => (Num::U64(v.unsigned_abs()), down != (v < 0)),
        (Kind::F64, ValueRef::F64(v)) => (Num::F64(v), down),
        _ => return Err(HostError::WrongType),
    })
}

fn to_abi(v: Value) -> abi::Value {
    match v {
        Value::I64(v) => abi::Value::I64(v),
        Value::U64(v) => abi::Value::U64(v),
        Value::F64(v) => abi::Value::F64(v),
        Value::Str(s) => abi::Value::Str(s.into()),
        Value::Bytes(b) => abi::Value::Bytes(b.into()),
    }
}

fn num_to_abi(n: Num) -> abi::Value {
    match n {
        Num::I64(v) => abi::Value::I64(v),
        Num::U64(v) => abi::Value::U64(v),
        Num::F64(v) => abi::Value::F64(v),
    }
}

fn describe(id: u32, layout: &Layout, capacity: u64) -> TableDesc {
    let columns = layout
        .columns
        .iter()
        .map(|c| ColumnDesc {
            name: c.name.as_str().into(),
            kind: match c.kind {
                Kind::I64 => ColumnKind::I64,
                Kind::U64 => ColumnKind::U64,
                Kind::F64 => ColumnKind::F64,
                Kind::Str => ColumnKind::Str,
                Kind::Bytes => ColumnKind::Bytes,
            },
            max: c.max as u32,
        })
        .collect();
    TableDesc {
        id,
        capacity,
        key_max: layout.key_max as u32,
        columns,
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
            .or_else(|| self.env_value(key.as_str()))
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

    fn table_open(&self, name: RStr<'_>) -> RResult<TableDesc, HostError> {
        let tables = &self.inner.tables;
        let Some(id) = tables.id(name.as_str()) else {
            return RResult::RErr(HostError::UnknownTable);
        };
        tables
            .get(id)
            .map(|t| describe(id, t.layout(), t.capacity()))
            .map_err(table_error)
            .into()
    }

    fn table_get(
        &self,
        table: u32,
        key: RStr<'_>,
    ) -> RResult<ROption<RVec<abi::Value>>, HostError> {
        let read = self.inner.tables.get(table).and_then(|t| {
            t.read(key.as_str(), |row| {
                row.values().into_iter().map(to_abi).collect::<RVec<_>>()
            })
        });
        read.map(ROption::from).map_err(table_error).into()
    }

    fn table_set(
        &self,
        table: u32,
        key: RStr<'_>,
        cells: RSlice<'_, CellRef<'_>>,
    ) -> RResult<(), HostError> {
        let set = || -> Result<(), HostError> {
            let t = self.inner.tables.get(table).map_err(table_error)?;
            let cells = cells
                .iter()
                .map(|c| cell(t.layout(), c))
                .collect::<Result<Vec<_>, _>>()?;
            t.set(key.as_str(), &cells).map_err(table_error)
        };
        set().into()
    }

    fn table_del(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError> {
        let tables = &self.inner.tables;
        tables
            .get(table)
            .and_then(|t| t.del(key.as_str()))
            .map_err(table_error)
            .into()
    }

    fn table_exists(&self, table: u32, key: RStr<'_>) -> RResult<bool, HostError> {
        let tables = &self.inner.tables;
        tables
            .get(table)
            .and_then(|t| t.exists(key.as_str()))
            .map_err(table_error)
            .into()
    }

    fn table_incr(
        &self,
        table: u32,
        key: RStr<'_>,
        column: u32,
        by: ValueRef<'_>,
        down: bool,
    ) -> RResult<abi::Value, HostError> {
        let incr = || -> Result<abi::Value, HostError> {
            let t = self.inner.tables.get(table).map_err(table_error)?;
            let col = t.layout().columns.get(column as usize);
            let kind = col.ok_or(HostError::UnknownColumn)?.kind;
            let (by, down) = step(kind, by, down)?;
            let new = t.incr(key.as_str(), column as usize, by, down);
            new.map(num_to_abi).map_err(table_error)
        };
        incr().into()
    }

    fn table_count(&self, table: u32) -> u64 {
        self.inner.tables.get(table).map_or(0, |t| t.count())
    }

    fn table_scan(&self, table: u32, cursor: u64, max_rows: u32) -> RResult<ScanBatch, HostError> {
        let t = match self.inner.tables.get(table) {
            Ok(t) => t,
            Err(e) => return RResult::RErr(table_error(e)),
        };
        let mut scanned = Vec::new();
        let next = t.scan(cursor, max_rows as usize, &mut scanned);
        let rows = scanned
            .into_iter()
            .map(|r| ScanRow {
                key: String::from_utf8_lossy(&r.key).into_owned().into(),
                values: r.values.into_iter().map(to_abi).collect(),
            })
            .collect();
        RResult::ROk(ScanBatch {
            rows,
            next: next.into(),
        })
    }

    fn counter_open(&self, name: RStr<'_>) -> RResult<u32, HostError> {
        let opened = self.inner.tables.counters.open(name.as_str());
        opened
            .map_err(|e| match e {
                TableError::Full => HostError::TooManyCounters,
                other => table_error(other),
            })
            .into()
    }

    fn counter_add(&self, counter: u32, by: i64) -> i64 {
        self.inner.tables.counters.add(counter, by).unwrap_or(0)
    }

    fn counter_get(&self, counter: u32) -> i64 {
        self.inner.tables.counters.get(counter).unwrap_or(0)
    }

    fn counter_set(&self, counter: u32, value: i64) {
        let _ = self.inner.tables.counters.set(counter, value);
    }

    fn counter_compare_exchange(&self, counter: u32, current: i64, new: i64) -> RResult<i64, i64> {
        let counters = &self.inner.tables.counters;
        match counters.compare_exchange(counter, current, new) {
            Ok(Ok(v)) => RResult::ROk(v),
            Ok(Err(v)) => RResult::RErr(v),
            Err(_) => RResult::RErr(0),
        }
    }

    fn request_reload(&self, plugin: RStr<'_>, reason: RStr<'_>) -> RResult<(), HostError> {
        let request = ReloadRequest {
            plugin: plugin.as_str().to_owned(),
            reason: reason.as_str().to_owned(),
        };
        match self.inner.reload.get() {
            Some(r) if (r.0)(request) => RResult::ROk(()),
            _ => RResult::RErr(HostError::NotEnabled),
        }
    }

    fn env_file(&self) -> ROption<RString> {
        let path = self.inner.env_path.as_deref();
        path.map(|p| RString::from(p.to_string_lossy().as_ref()))
            .into()
    }

    fn stats(&self) -> ServerStats {
        self.inner
            .stats
            .get()
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    fn socket_send(&self, conn: u64, data: RSlice<'_, u8>) -> RResult<(), HostError> {
        self.inner.sockets.send(conn, data.as_slice()).into()
    }

    fn socket_close(&self, conn: u64) -> RResult<(), HostError> {
        self.inner.sockets.close(conn, Close::Asked).into()
    }

    fn socket_send_to(&self, peer: u64, data: RSlice<'_, u8>) -> RResult<(), HostError> {
        self.inner.sockets.udp.send_to(peer, data.as_slice()).into()
    }

    fn socket_connections(&self, listen: RStr<'_>) -> RVec<u64> {
        self.inner.sockets.connections(listen.as_str()).into()
    }

    fn defer(&self, conn: u64) -> RResult<u64, HostError> {
        self.inner.deferrals.defer(conn).into()
    }

    fn deferred(&self, token: u64, op: DeferOp<'_>) -> RResult<(), HostError> {
        self.inner.deferrals.apply(token, op).into()
    }

    fn context_set(&self, key: RStr<'_>, value: RSlice<'_, u8>) -> RResult<(), HostError> {
        super::context::set(key.as_str(), value.as_slice()).into()
    }

    fn context_get(&self, key: RStr<'_>) -> ROption<RVec<u8>> {
        super::context::get(key.as_str()).map(RVec::from).into()
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_env, unquote};

    #[test]
    fn values_are_unquoted_and_unescaped() {
        assert_eq!(unquote("plain"), "plain");
        assert_eq!(unquote("'a \\n b'"), "a \\n b");
        assert_eq!(unquote(r#""a \"b\" \\ \$x\nend""#), "a \"b\" \\ $x\nend");
        let env = parse_env("# c\nA=1\nB=\"two words\"\n\nA=3\n");
        assert_eq!(env.get("A").map(String::as_str), Some("3"));
        assert_eq!(env.get("B").map(String::as_str), Some("two words"));
    }
}
