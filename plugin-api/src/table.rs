//! Shared tables and counters, as plugin code sees them: [`Table`] (from
//! [`Host::table`](crate::Host::table)) and [`Counter`] (from
//! [`Host::counter`](crate::Host::counter)). Both are handles to memory the server holds:
//! cheap to clone, `Send + Sync`, usable from any thread (task workers, cron, custom
//! processes, threads the plugin spawns), and still valid after a hot reload of the plugin.
//!
//! Rows are typed by accessors on column names ([`Row::u64`], [`Row::str`], ...) rather than
//! by a struct the plugin derives: the columns are declared in `server.ron`, not in the
//! plugin, so a plugin-side struct would be a second copy of the schema that could only be
//! checked at run time anyway. Each accessor checks the column's kind; writes go through the
//! [`Fields`] builder, checked by the server (a too-long string is refused, never cut).

use std::sync::Arc;

use abi_stable::std_types::{RResult, RStr, RVec};

use crate::abi::{CellRef, ColumnDesc, HostBox, HostError, TableDesc, Value, ValueRef};

/// A shared table declared in `server.ron`.
#[derive(Clone)]
pub struct Table {
    ffi: HostBox,
    id: u32,
    name: Arc<str>,
    capacity: u64,
    columns: Arc<[ColumnDesc]>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("columns", &self.columns)
            .finish()
    }
}

/// A number type `incr` and `decr` take and return: `i64`, `u64` or `f64`.
pub trait Numeric: Copy + sealed::Sealed {
    #[doc(hidden)]
    fn to_value(self) -> ValueRef<'static>;
    #[doc(hidden)]
    fn from_value(v: &Value) -> Option<Self>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for i64 {}
    impl Sealed for u64 {}
    impl Sealed for f64 {}
}

impl Numeric for i64 {
    fn to_value(self) -> ValueRef<'static> {
        ValueRef::I64(self)
    }
    fn from_value(v: &Value) -> Option<i64> {
        match *v {
            Value::I64(n) => Some(n),
            Value::U64(n) => i64::try_from(n).ok(),
            _ => None,
        }
    }
}

impl Numeric for u64 {
    fn to_value(self) -> ValueRef<'static> {
        ValueRef::U64(self)
    }
    fn from_value(v: &Value) -> Option<u64> {
        match *v {
            Value::U64(n) => Some(n),
            Value::I64(n) => u64::try_from(n).ok(),
            _ => None,
        }
    }
}

impl Numeric for f64 {
    fn to_value(self) -> ValueRef<'static> {
        ValueRef::F64(self)
    }
    fn from_value(v: &Value) -> Option<f64> {
        match *v {
            Value::F64(n) => Some(n),
            _ => None,
        }
    }
}

impl Table {
    pub(crate) fn open(ffi: &HostBox, name: &str) -> Result<Table, HostError> {
        let TableDesc {
            id,
            capacity,
            columns,
            ..
        } = ffi.table_open(name.into()).into_result()?;
        Ok(Table {
            ffi: ffi.clone(),
            id,
            name: name.into(),
            capacity,
            columns: columns.into_vec().into(),
        })
    }

    /// Its name in `server.ron`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows it can hold: exactly its `size`.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Its columns, in order.
    pub fn columns(&self) -> &[ColumnDesc] {
        &self.columns
    }

    /// Rows in use now.
    pub fn count(&self) -> u64 {
        self.ffi.table_count(self.id)
    }

    fn column(&self, name: &str) -> Result<u32, HostError> {
        self.columns
            .iter()
            .position(|c| c.name.as_str() == name)
            .map(|i| i as u32)
            .ok_or(HostError::UnknownColumn)
    }

    /// The key's row, `None` when it has none.
    pub fn get(&self, key: &str) -> Result<Option<Row>, HostError> {
        let values = self.ffi.table_get(self.id, key.into()).into_result()?;
        Ok(values.into_option().map(|values| Row {
            columns: self.columns.clone(),
            values,
        }))
    }

    /// Writes the given fields into the key's row, creating it (every other column zero or
    /// empty) when absent. Refused as a whole when a field does not fit its column, and with
    /// [`HostError::TableFull`] when the key is new and every row is in use.
    pub fn set(&self, key: &str, fields: &Fields<'_>) -> Result<(), HostError> {
        let cells = fields
            .cells
            .iter()
            .map(|(name, value)| {
                Ok(CellRef {
                    column: self.column(name)?,
                    value: *value,
                })
            })
            .collect::<Result<Vec<_>, HostError>>()?;
        self.ffi
            .table_set(self.id, key.into(), cells.as_slice().into())
            .into_result()
    }

    /// Writes one column of the key's row (creating the row when absent).
    pub fn set_column<'a>(
        &self,
        key: &str,
        column: &str,
        value: impl Into<ValueRef<'a>>,
    ) -> Result<(), HostError> {
        let cell = CellRef {
            column: self.column(column)?,
            value: value.into(),
        };
        self.ffi
            .table_set(self.id, key.into(), std::slice::from_ref(&cell).into())
            .into_result()
    }

    /// Deletes the key's row; `false` when there was none.
    pub fn del(&self, key: &str) -> Result<bool, HostError> {
        self.ffi.table_del(self.id, key.into()).into_result()
    }

    /// Whether the key has a row.
    pub fn exists(&self, key: &str) -> Result<bool, HostError> {
        self.ffi.table_exists(self.id, key.into()).into_result()
    }

    fn step<N: Numeric>(&self, key: &str, column: &str, by: N, down: bool) -> Result<N, HostError> {
        let column = self.column(column)?;
        let value = self
            .ffi
            .table_incr(self.id, key.into(), column, by.to_value(), down)
            .into_result()?;
        N::from_value(&value).ok_or(HostError::Overflow)
    }

    /// Atomically adds `by` to a number column and returns the new value; the row is created
    /// at 0 when absent. `by`'s type is the result's: `table.incr(key, "hits", 1u64)`. An
    /// integer that would overflow (or a `U64` below 0) is refused and left as it was.
    pub fn incr<N: Numeric>(&self, key: &str, column: &str, by: N) -> Result<N, HostError> {
        self.step(key, column, by, false)
    }

    /// Atomically subtracts `by`; see [`Table::incr`].
    pub fn decr<N: Numeric>(&self, key: &str, column: &str, by: N) -> Result<N, HostError> {
        self.step(key, column, by, true)
    }

    /// Walks every row, a batch at a time (the server holds no lock between batches). Rows
    /// that stay in the table while it walks are each seen once; rows set or deleted meanwhile
    /// may or may not be. Deleting the rows it yields is fine.
    pub fn iter(&self) -> Iter {
        Iter {
            table: self.clone(),
            cursor: Some(0),
            batch: Vec::new().into_iter(),
        }
    }
}

/// A row read from a table: its values, with accessors by column name that check the kind.
#[derive(Clone)]
pub struct Row {
    columns: Arc<[ColumnDesc]>,
    values: RVec<Value>,
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (c, v) in self.columns.iter().zip(self.values.iter()) {
            m.entry(&c.name.as_str(), v);
        }
        m.finish()
    }
}

impl Row {
    /// The value of a column, `None` when the table has no such column.
    pub fn get(&self, column: &str) -> Option<&Value> {
        let i = self
            .columns
            .iter()
            .position(|c| c.name.as_str() == column)?;
        self.values.get(i)
    }

    /// An integer column as `i64` (`None`: no such column, not an integer, or too big).
    pub fn i64(&self, column: &str) -> Option<i64> {
        i64::from_value(self.get(column)?)
    }

    /// An integer column as `u64` (`None`: no such column, not an integer, or negative).
    pub fn u64(&self, column: &str) -> Option<u64> {
        u64::from_value(self.get(column)?)
    }

    /// An `F64` column.
    pub fn f64(&self, column: &str) -> Option<f64> {
        f64::from_value(self.get(column)?)
    }

    /// A `Str` column.
    pub fn str(&self, column: &str) -> Option<&str> {
        match self.get(column)? {
            Value::Str(s) => Some(s.as_str()),
            _ => None,
        }
    }

    /// A `Bytes` column.
    pub fn bytes(&self, column: &str) -> Option<&[u8]> {
        match self.get(column)? {
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        }
    }
}

/// The fields [`Table::set`] writes, by column name:
/// `Fields::new().u64("conn", 7).str("name", "ada")`.
#[derive(Debug, Default, Clone)]
pub struct Fields<'a> {
    cells: Vec<(&'a str, ValueRef<'a>)>,
}

impl<'a> Fields<'a> {
    /// No fields yet.
    pub fn new() -> Self {
        Fields::default()
    }

    /// Sets any column (`value`: `i64`, `u64`, `f64`, `&str` or `&[u8]`).
    pub fn value(mut self, column: &'a str, value: impl Into<ValueRef<'a>>) -> Self {
        self.cells.push((column, value.into()));
        self
    }

    /// Sets an `I64` column (or a `U64` one, when not negative).
    pub fn i64(self, column: &'a str, value: i64) -> Self {
        self.value(column, value)
    }

    /// Sets a `U64` column (or an `I64` one, up to `i64::MAX`).
    pub fn u64(self, column: &'a str, value: u64) -> Self {
        self.value(column, value)
    }

    /// Sets an `F64` column.
    pub fn f64(self, column: &'a str, value: f64) -> Self {
        self.value(column, value)
    }

    /// Sets a `Str` column.
    pub fn str(self, column: &'a str, value: &'a str) -> Self {
        self.value(column, value)
    }

    /// Sets a `Bytes` column.
    pub fn bytes(self, column: &'a str, value: &'a [u8]) -> Self {
        self.value(column, value)
    }
}

impl From<i64> for ValueRef<'_> {
    fn from(v: i64) -> Self {
        ValueRef::I64(v)
    }
}

impl From<i32> for ValueRef<'_> {
    fn from(v: i32) -> Self {
        ValueRef::I64(v.into())
    }
}

impl From<u64> for ValueRef<'_> {
    fn from(v: u64) -> Self {
        ValueRef::U64(v)
    }
}

impl From<f64> for ValueRef<'_> {
    fn from(v: f64) -> Self {
        ValueRef::F64(v)
    }
}

impl<'a> From<&'a str> for ValueRef<'a> {
    fn from(v: &'a str) -> Self {
        ValueRef::Str(RStr::from(v))
    }
}

impl<'a> From<&'a [u8]> for ValueRef<'a> {
    fn from(v: &'a [u8]) -> Self {
        ValueRef::Bytes(v.into())
    }
}

/// The rows of a table, fetched a batch at a time: `(key, row)`. See [`Table::iter`].
#[derive(Debug)]
pub struct Iter {
    table: Table,
    cursor: Option<u64>,
    batch: std::vec::IntoIter<(String, Row)>,
}

/// Rows fetched per call into the server.
const BATCH: u32 = 64;

impl Iterator for Iter {
    type Item = (String, Row);

    fn next(&mut self) -> Option<(String, Row)> {
        loop {
            if let Some(item) = self.batch.next() {
                return Some(item);
            }
            let cursor = self.cursor?;
            let t = &self.table;
            let batch = match t.ffi.table_scan(t.id, cursor, BATCH) {
                RResult::ROk(b) => b,
                RResult::RErr(_) => {
                    self.cursor = None;
                    return None;
                }
            };
            self.cursor = batch.next.into_option();
            let rows: Vec<(String, Row)> = batch
                .rows
                .into_iter()
                .map(|r| {
                    let row = Row {
                        columns: t.columns.clone(),
                        values: r.values,
                    };
                    (r.key.into(), row)
                })
                .collect();
            self.batch = rows.into_iter();
        }
    }
}

/// A named 64-bit counter shared by every thread, like Swoole's `Atomic`. Created at 0 the
/// first time any plugin asks for its name; it lives as long as the server process.
#[derive(Clone)]
pub struct Counter {
    ffi: HostBox,
    id: u32,
    name: Arc<str>,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").field("name", &self.name).finish()
    }
}

impl Counter {
    pub(crate) fn open(ffi: &HostBox, name: &str) -> Result<Counter, HostError> {
        let id = ffi.counter_open(name.into()).into_result()?;
        Ok(Counter {
            ffi: ffi.clone(),
            id,
            name: name.into(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `by` (negative to subtract; wraps like `AtomicI64`); returns the new value.
    pub fn add(&self, by: i64) -> i64 {
        self.ffi.counter_add(self.id, by)
    }

    /// The value.
    pub fn get(&self) -> i64 {
        self.ffi.counter_get(self.id)
    }

    /// Sets the value.
    pub fn set(&self, value: i64) {
        self.ffi.counter_set(self.id, value)
    }

    /// Sets `new` if the value is `current`: `Ok(current)`, else `Err(the actual value)`.
    pub fn compare_exchange(&self, current: i64, new: i64) -> Result<i64, i64> {
        self.ffi
            .counter_compare_exchange(self.id, current, new)
            .into_result()
    }
}
