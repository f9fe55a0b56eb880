//! Named 64-bit counters, like Swoole's `Atomic`: created on first use by name (no config),
//! at most [`MAX_COUNTERS`] of them, each one `AtomicI64` allocated up front and never freed,
//! so a handle is an index that stays valid for the life of the server process.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, Ordering::SeqCst},
        Mutex, PoisonError,
    },
};

use super::TableError;

/// Most distinct counter names a server holds.
pub const MAX_COUNTERS: usize = 1024;
/// Longest counter name in bytes.
pub const MAX_NAME: usize = 256;

/// Every counter of the server.
#[derive(Debug)]
pub struct Counters {
    names: Mutex<HashMap<String, u32>>,
    values: Box<[AtomicI64]>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            names: Mutex::default(),
            values: (0..MAX_COUNTERS).map(|_| AtomicI64::new(0)).collect(),
        }
    }
}

impl Counters {
    /// The id of counter `name`, created at 0 on first use.
    pub fn open(&self, name: &str) -> Result<u32, TableError> {
        if name.len() > MAX_NAME {
            return Err(TableError::KeyTooLong);
        }
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = names.get(name) {
            return Ok(id);
        }
        let id = names.len();
        if id >= MAX_COUNTERS {
            return Err(TableError::Full);
        }
        names.insert(name.to_owned(), id as u32);
        Ok(id as u32)
    }

    fn at(&self, id: u32) -> Result<&AtomicI64, TableError> {
        self.values.get(id as usize).ok_or(TableError::UnknownTable)
    }

    /// Adds `by` (wrapping, like `AtomicI64`); returns the new value.
    pub fn add(&self, id: u32, by: i64) -> Result<i64, TableError> {
        Ok(self.at(id)?.fetch_add(by, SeqCst).wrapping_add(by))
    }

    /// The value.
    pub fn get(&self, id: u32) -> Result<i64, TableError> {
        Ok(self.at(id)?.load(SeqCst))
    }

    /// Sets the value.
    pub fn set(&self, id: u32, value: i64) -> Result<(), TableError> {
        self.at(id)?.store(value, SeqCst);
        Ok(())
    }

    /// Sets `new` if the value is `current`: `Ok(current)`, else `Err(actual value)`.
    pub fn compare_exchange(
        &self,
        id: u32,
        current: i64,
        new: i64,
    ) -> Result<Result<i64, i64>, TableError> {
        Ok(self.at(id)?.compare_exchange(current, new, SeqCst, SeqCst))
    }

    /// Every counter and its value, by name.
    pub fn list(&self) -> Vec<(String, i64)> {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<_> = names
            .iter()
            .map(|(n, &id)| (n.clone(), self.values[id as usize].load(SeqCst)))
            .collect();
        all.sort();
        all
    }
}
