//! Shared tables and counters: what LaravelS users get from Swoole's tables and atomics, for
//! every thread of the server (workers, task workers, the timer, custom processes, threads a
//! plugin spawns). The tables are declared in `server.ron` and created before the workers,
//! with all their memory, in the host: they outlive plugin reloads and config reloads that do
//! not change them. [`store`] is one table, [`layout`] its rows, [`counters`] the counters.

pub mod counters;
pub mod layout;
pub mod store;

use std::{collections::BTreeMap, fmt::Write as _};

pub use counters::Counters;
pub use layout::{Cell, Kind, Layout, Num, Value};
pub use store::{RowRef, Scanned, Table};

use crate::config::TableConfig;

/// Why a table (or counter) operation was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// No table (or counter) with that name or id.
    #[error("no such table")]
    UnknownTable,
    /// No column with that name or index.
    #[error("no such column")]
    UnknownColumn,
    /// Every row is in use: a new key needs a row to be deleted first.
    #[error("the table is full")]
    Full,
    /// The key is longer than the table's `key_max` bytes.
    #[error("the key is too long")]
    KeyTooLong,
    /// A string or bytes value is longer than its column's size.
    #[error("the value is too long for its column")]
    ValueTooLong,
    /// The value's kind is not the column's.
    #[error("the value is not of the column's kind")]
    WrongType,
    /// An integer `incr`/`decr` would overflow.
    #[error("the number would overflow")]
    Overflow,
}

/// Every table of the server, and its counters.
#[derive(Debug, Default)]
pub struct Tables {
    tables: Vec<Table>,
    /// Counters, created on first use.
    pub counters: Counters,
}

impl Tables {
    /// Creates the configured tables, allocating all their rows now.
    pub fn new(config: &BTreeMap<String, TableConfig>) -> Result<Tables, String> {
        let tables = config
            .iter()
            .map(|(name, t)| Table::new(name, t))
            .collect::<Result<_, _>>()?;
        Ok(Tables {
            tables,
            counters: Counters::default(),
        })
    }

    /// The id of table `name` (stable for the life of the process).
    pub fn id(&self, name: &str) -> Option<u32> {
        self.tables
            .iter()
            .position(|t| t.name() == name)
            .map(|i| i as u32)
    }

    /// Table `id`.
    pub fn get(&self, id: u32) -> Result<&Table, TableError> {
        self.tables.get(id as usize).ok_or(TableError::UnknownTable)
    }

    /// Every table.
    pub fn iter(&self) -> impl Iterator<Item = &Table> {
        self.tables.iter()
    }

    /// `plughost info`'s lines: each table's rows, capacity and bytes, and each counter.
    pub fn info(&self, s: &mut String) {
        for t in &self.tables {
            let _ = writeln!(
                s,
                "table {}: rows {}/{}, {} bytes",
                t.name(),
                t.count(),
                t.capacity(),
                t.bytes()
            );
        }
        for (name, value) in self.counters.list() {
            let _ = writeln!(s, "counter {name}: {value}");
        }
    }
}

/// What a change of `tables` between two configs changes, for the reload log (empty: none).
pub fn changes(
    old: &BTreeMap<String, TableConfig>,
    new: &BTreeMap<String, TableConfig>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, t) in new {
        match old.get(name) {
            None => out.push(format!("tables.{name} (added)")),
            Some(o) if o.size != t.size => {
                out.push(format!("tables.{name} (size {} -> {})", o.size, t.size));
            }
            Some(o) if o != t => out.push(format!("tables.{name} (columns or key_max changed)")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        out.push(format!("tables.{name} (removed)"));
    }
    out
}

#[cfg(test)]
mod tests;
