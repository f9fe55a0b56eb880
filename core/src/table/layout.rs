//! A table's row layout: every row is the same run of 64-bit words, a header word (the key's
//! hash and length), the key, then each column. Words are atomics read and written with
//! `Relaxed` under the row's shard lock: the lock orders them, and safe code can never tear
//! memory even if a caller broke the protocol.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::{ColumnKind, TableConfig};

use super::TableError;

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A signed 64-bit integer.
    I64,
    /// An unsigned 64-bit integer.
    U64,
    /// A 64-bit float.
    F64,
    /// UTF-8 text, at most `max` bytes.
    Str,
    /// Bytes, at most `max`.
    Bytes,
}

/// One column: its name, kind, largest value and where it starts in a row.
#[derive(Debug, Clone)]
pub struct Column {
    /// The name from the config.
    pub name: String,
    /// What it holds.
    pub kind: Kind,
    /// The longest value in bytes (`Str` and `Bytes`; 8 for numbers).
    pub max: usize,
    /// Its first word in a row.
    at: usize,
}

/// A value to write into a column, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    /// For an `I64` column.
    I64(i64),
    /// For a `U64` column.
    U64(u64),
    /// For an `F64` column.
    F64(f64),
    /// For a `Str` column.
    Str(&'a str),
    /// For a `Bytes` column.
    Bytes(&'a [u8]),
}

/// A value read from a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// From an `I64` column.
    I64(i64),
    /// From a `U64` column.
    U64(u64),
    /// From an `F64` column.
    F64(f64),
    /// From a `Str` column.
    Str(String),
    /// From a `Bytes` column.
    Bytes(Vec<u8>),
}

/// A number for `incr`: its kind must be the column's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    /// For an `I64` column.
    I64(i64),
    /// For a `U64` column.
    U64(u64),
    /// For an `F64` column.
    F64(f64),
}

impl Num {
    /// `self + by` (or `-` when `down`), `None` when an integer would overflow.
    pub(crate) fn step(self, by: Num, down: bool) -> Option<Num> {
        match (self, by) {
            (Num::I64(a), Num::I64(b)) if down => a.checked_sub(b).map(Num::I64),
            (Num::I64(a), Num::I64(b)) => a.checked_add(b).map(Num::I64),
            (Num::U64(a), Num::U64(b)) if down => a.checked_sub(b).map(Num::U64),
            (Num::U64(a), Num::U64(b)) => a.checked_add(b).map(Num::U64),
            (Num::F64(a), Num::F64(b)) if down => Some(Num::F64(a - b)),
            (Num::F64(a), Num::F64(b)) => Some(Num::F64(a + b)),
            _ => None,
        }
    }
}

/// Where everything is in a row, and how big a row is.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The columns, in config order.
    pub columns: Vec<Column>,
    /// The longest key in bytes.
    pub key_max: usize,
    /// The key's first word in a row.
    key_at: usize,
    /// Words per row.
    stride: usize,
}

/// The low bits of a row's header word hold its key's length (at most 256).
const LEN_BITS: u32 = 9;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

fn words_for(bytes: usize) -> usize {
    bytes.div_ceil(8)
}

impl Layout {
    /// The layout of a table as configured: the header word, the number columns (so a read
    /// of numbers after the key check touches the row's first cache lines), the key, then
    /// the `Str` and `Bytes` columns.
    pub fn new(config: &TableConfig) -> Layout {
        let key_max = config.key_max as usize;
        let numbers = config
            .columns
            .iter()
            .filter(|c| !matches!(c.kind, ColumnKind::Str(_) | ColumnKind::Bytes(_)))
            .count();
        let key_at = 1 + numbers;
        let (mut number_at, mut bytes_at) = (1, key_at + words_for(key_max));
        let columns = config
            .columns
            .iter()
            .map(|c| {
                let (kind, max) = match c.kind {
                    ColumnKind::I64 => (Kind::I64, 8),
                    ColumnKind::U64 => (Kind::U64, 8),
                    ColumnKind::F64 => (Kind::F64, 8),
                    ColumnKind::Str(n) => (Kind::Str, n as usize),
                    ColumnKind::Bytes(n) => (Kind::Bytes, n as usize),
                };
                let (next, words) = match kind {
                    Kind::Str | Kind::Bytes => (&mut bytes_at, 1 + words_for(max)),
                    _ => (&mut number_at, 1),
                };
                let at = *next;
                *next += words;
                Column {
                    name: c.name.clone(),
                    kind,
                    max,
                    at,
                }
            })
            .collect();
        Layout {
            columns,
            key_max,
            key_at,
            stride: bytes_at,
        }
    }

    /// Words per row.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The index of the column called `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The header word of a key with this hash.
    pub(crate) fn tag(hash: u64, key: &[u8]) -> u64 {
        (hash & !LEN_MASK) | key.len() as u64
    }

    /// Whether `cell` fits column `col`: the right kind, and not too long.
    pub fn check(&self, col: usize, cell: &Cell<'_>) -> Result<(), TableError> {
        let column = self.columns.get(col).ok_or(TableError::UnknownColumn)?;
        let len = match (column.kind, cell) {
            (Kind::I64, Cell::I64(_)) | (Kind::U64, Cell::U64(_)) | (Kind::F64, Cell::F64(_)) => 0,
            (Kind::Str, Cell::Str(s)) => s.len(),
            (Kind::Bytes, Cell::Bytes(b)) => b.len(),
            _ => return Err(TableError::WrongType),
        };
        if len > column.max {
            return Err(TableError::ValueTooLong);
        }
        Ok(())
    }

    /// Writes a fresh row: its header, its key, every column zero or empty.
    pub(crate) fn init(&self, row: &[AtomicU64], tag: u64, key: &[u8]) {
        row[0].store(tag, Relaxed);
        store_bytes(&row[self.key_at..], key);
        for c in &self.columns {
            row[c.at].store(0, Relaxed);
        }
    }

    /// Whether the row holds this key (`tag` compared first, then the key's words).
    pub(crate) fn key_is(&self, row: &[AtomicU64], tag: u64, key: &[u8]) -> bool {
        if row[0].load(Relaxed) != tag {
            return false;
        }
        let words = &row[self.key_at..];
        let mut chunks = key.chunks_exact(8);
        for (chunk, w) in (&mut chunks).zip(words) {
            if pack(chunk) != w.load(Relaxed) {
                return false;
            }
        }
        let rest = chunks.remainder();
        rest.is_empty() || pack(rest) == words[key.len() / 8].load(Relaxed)
    }

    /// Copies the row's key into `out` (replacing what it held).
    pub(crate) fn key_into(&self, row: &[AtomicU64], out: &mut Vec<u8>) {
        let len = ((row[0].load(Relaxed) & LEN_MASK) as usize).min(self.key_max);
        load_bytes(&row[self.key_at..], len, out);
    }

    /// Writes a checked cell (see [`Layout::check`]).
    pub(crate) fn write(&self, row: &[AtomicU64], col: usize, cell: &Cell<'_>) {
        let at = self.columns[col].at;
        match *cell {
            Cell::I64(v) => row[at].store(v as u64, Relaxed),
            Cell::U64(v) => row[at].store(v, Relaxed),
            Cell::F64(v) => row[at].store(v.to_bits(), Relaxed),
            Cell::Str(s) => {
                row[at].store(s.len() as u64, Relaxed);
                store_bytes(&row[at + 1..], s.as_bytes());
            }
            Cell::Bytes(b) => {
                row[at].store(b.len() as u64, Relaxed);
                store_bytes(&row[at + 1..], b);
            }
        }
    }

    /// The number in column `col`, when it is a number column.
    pub(crate) fn num(&self, row: &[AtomicU64], col: usize) -> Option<Num> {
        let c = self.columns.get(col)?;
        let bits = row[c.at].load(Relaxed);
        match c.kind {
            Kind::I64 => Some(Num::I64(bits as i64)),
            Kind::U64 => Some(Num::U64(bits)),
            Kind::F64 => Some(Num::F64(f64::from_bits(bits))),
            Kind::Str | Kind::Bytes => None,
        }
    }

    /// Writes a number of the column's kind.
    pub(crate) fn set_num(&self, row: &[AtomicU64], col: usize, n: Num) {
        let bits = match n {
            Num::I64(v) => v as u64,
            Num::U64(v) => v,
            Num::F64(v) => v.to_bits(),
        };
        row[self.columns[col].at].store(bits, Relaxed);
    }

    /// Copies a `Str` or `Bytes` column into `out`; false for a number column.
    pub(crate) fn bytes_into(&self, row: &[AtomicU64], col: usize, out: &mut Vec<u8>) -> bool {
        let Some(c) = self.columns.get(col) else {
            return false;
        };
        if !matches!(c.kind, Kind::Str | Kind::Bytes) {
            return false;
        }
        let len = (row[c.at].load(Relaxed) as usize).min(c.max);
        load_bytes(&row[c.at + 1..], len, out);
        true
    }

    /// The value of column `col`.
    pub(crate) fn value(&self, row: &[AtomicU64], col: usize) -> Option<Value> {
        if let Some(n) = self.num(row, col) {
            return Some(match n {
                Num::I64(v) => Value::I64(v),
                Num::U64(v) => Value::U64(v),
                Num::F64(v) => Value::F64(v),
            });
        }
        let mut bytes = Vec::new();
        if !self.bytes_into(row, col, &mut bytes) {
            return None;
        }
        Some(match self.columns[col].kind {
            // Only whole, checked `&str`s are ever written to a `Str` column.
            Kind::Str => Value::Str(String::from_utf8(bytes).unwrap_or_default()),
            _ => Value::Bytes(bytes),
        })
    }
}

/// Up to 8 bytes as a little-endian word, zero-padded.
fn pack(chunk: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(w)
}

fn store_bytes(words: &[AtomicU64], bytes: &[u8]) {
    for (chunk, w) in bytes.chunks(8).zip(words) {
        w.store(pack(chunk), Relaxed);
    }
}

fn load_bytes(words: &[AtomicU64], len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(len);
    for w in &words[..words_for(len)] {
        out.extend_from_slice(&w.load(Relaxed).to_le_bytes());
    }
    out.truncate(len);
}
