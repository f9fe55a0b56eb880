//! One shared table: `size` rows allocated up front, found through chained buckets, guarded by
//! striped locks.
//!
//! Why exactly `size` keys fit, whatever they are: rows come from one slab of `size` rows
//! with a lock-free free list, and a key's row is linked into the chain of its bucket, however
//! long that chain is. A bucket never has a fixed number of places (Swoole's "conflict" rows
//! are a separate, smaller pool, which is how a table of 1000 came to hold 596 keys), so the
//! only way to be refused is that all `size` rows are in use.
//!
//! Why it is fast and safe from every thread: there are `next_pow2(size)` buckets (a chain
//! holds one row on average) split into up to 128 contiguous runs, each with its own `RwLock`
//! and sequence number (a shard), and the shard of a key's bucket guards that chain and the
//! rows in it. Writes take the shard's write lock and make its sequence odd while they
//! write; a point read first reads optimistically (no store to the shared cache line: it
//! checks the sequence did not move, and tries again if it did), and after a few failed tries
//! takes the read lock. Scans take the read lock. No lock is held for more than one chain, or
//! one bounded batch of buckets while scanning. Every word of a row is an atomic, so an
//! optimistic read of a row being rewritten reads stale or mixed values, which it then
//! discards: never undefined behaviour. Keys are hashed with a per-table random `SipHash`
//! key, so a client cannot aim keys at one chain.
//!
//! Why a scan never skips a row that stayed, never loops and never panics: buckets never move
//! (there is no rehash), so a cursor over bucket numbers visits each bucket once; a row that
//! stays in the table stays in its bucket. Rows set or deleted meanwhile may or may not be seen.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{
            fence, AtomicU32, AtomicU64,
            Ordering::{AcqRel, Acquire, Relaxed, Release},
        },
        PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use crate::config::TableConfig;

use super::{
    layout::{Cell, Kind, Layout, Num, Value},
    TableError,
};

/// No row: the end of a chain or of the free list.
const NIL: u32 = u32::MAX;
/// Most shards (locks) per table.
const MAX_SHARDS: usize = 128;
/// Most buckets a scan walks under one lock (so an empty stretch holds no lock for long).
const SCAN_BUCKETS_PER_LOCK: usize = 256;

/// Optimistic tries of a point read before it takes the read lock.
const OPTIMISTIC_TRIES: usize = 4;

/// One lock and its sequence number (odd while a writer writes), alone on a cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    lock: RwLock<()>,
    seq: AtomicU64,
}

/// A shard's write lock; the sequence number is odd while it is held.
struct WriteGuard<'a> {
    shard: &'a Shard,
    _lock: RwLockWriteGuard<'a, ()>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        // Even again (before the lock is released, which happens after this).
        let seq = self.shard.seq.load(Relaxed);
        self.shard.seq.store(seq.wrapping_add(1), Release);
    }
}

/// A fixed-capacity table shared by every thread. See the module doc for the design.
#[derive(Debug)]
pub struct Table<S = RandomState> {
    name: String,
    layout: Layout,
    size: usize,
    hasher: S,
    /// `size` rows of `layout.stride()` words.
    words: Box<[AtomicU64]>,
    /// Per row: the next row in its chain, or in the free list.
    links: Box<[AtomicU32]>,
    /// The first row of each bucket's chain.
    buckets: Box<[AtomicU32]>,
    shards: Box<[Shard]>,
    /// `bucket >> shard_shift` is the bucket's shard.
    shard_shift: u32,
    /// The free list's head: a tag (against ABA) in the high half, a row in the low half.
    free: AtomicU64,
    len: AtomicU64,
}

/// Where a key lives: its hash's header word and bucket.
struct Spot {
    tag: u64,
    bucket: usize,
}

/// A row copied out by [`Table::scan`].
#[derive(Debug, Clone, PartialEq)]
pub struct Scanned {
    /// Its key.
    pub key: Vec<u8>,
    /// Its values, in column order.
    pub values: Vec<Value>,
}

/// A row, read inside [`Table::read`].
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    layout: &'a Layout,
    words: &'a [AtomicU64],
}

impl RowRef<'_> {
    /// The row's key, into `out`.
    pub fn key_into(&self, out: &mut Vec<u8>) {
        self.layout.key_into(self.words, out);
    }

    /// A number column.
    pub fn num(&self, col: usize) -> Option<Num> {
        self.layout.num(self.words, col)
    }

    /// A `Str` or `Bytes` column, into `out`; false for another kind.
    pub fn bytes_into(&self, col: usize, out: &mut Vec<u8>) -> bool {
        self.layout.bytes_into(self.words, col, out)
    }

    /// Every column's value, in column order.
    pub fn values(&self) -> Vec<Value> {
        (0..self.layout.columns.len())
            .filter_map(|c| self.layout.value(self.words, c))
            .collect()
    }
}

fn atomics<T>(n: usize, what: &str, make: impl Fn() -> T) -> Result<Box<[T]>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        format!(
            "cannot allocate {} MiB for {what}",
            (n * size_of::<T>()) >> 20
        )
    })?;
    v.extend((0..n).map(|_| make()));
    Ok(v.into_boxed_slice())
}

impl Table<RandomState> {
    /// A table as configured, with every row allocated now.
    pub fn new(name: &str, config: &TableConfig) -> Result<Table, String> {
        Table::with_hasher(name, config, RandomState::new())
    }
}

impl<S: BuildHasher> Table<S> {
    /// A table hashing keys with `hasher` (tests use a degenerate one).
    pub fn with_hasher(name: &str, config: &TableConfig, hasher: S) -> Result<Table<S>, String> {
        let layout = Layout::new(config);
        let size = usize::try_from(config.size).map_err(|_| "too many rows".to_owned())?;
        let nbuckets = size.next_power_of_two();
        let nshards = nbuckets.min(MAX_SHARDS);
        let what = format!("table {name} ({size} rows)");
        let words = atomics(size * layout.stride(), &what, || AtomicU64::new(0))?;
        // Every row starts in the free list, in order.
        let links = atomics(size, &what, || AtomicU32::new(NIL))?;
        for (i, l) in links.iter().enumerate().take(size - 1) {
            l.store(i as u32 + 1, Relaxed);
        }
        Ok(Table {
            name: name.to_owned(),
            layout,
            size,
            hasher,
            words,
            links,
            buckets: atomics(nbuckets, &what, || AtomicU32::new(NIL))?,
            shards: atomics(nshards, &what, Shard::default)?,
            shard_shift: (nbuckets / nshards).trailing_zeros(),
            free: AtomicU64::new(0),
            len: AtomicU64::new(0),
        })
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its columns.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Rows it holds now.
    pub fn count(&self) -> u64 {
        self.len.load(Relaxed)
    }

    /// Rows it can hold: exactly the configured `size`.
    pub fn capacity(&self) -> u64 {
        self.size as u64
    }

    /// Bytes allocated for it: rows, links, buckets and locks (the README's formula).
    pub fn bytes(&self) -> u64 {
        (self.words.len() * 8
            + self.links.len() * 4
            + self.buckets.len() * 4
            + self.shards.len() * size_of::<Shard>()) as u64
    }

    fn spot(&self, key: &str) -> Result<Spot, TableError> {
        if key.len() > self.layout.key_max {
            return Err(TableError::KeyTooLong);
        }
        let hash = self.hasher.hash_one(key.as_bytes());
        Ok(Spot {
            tag: Layout::tag(hash, key.as_bytes()),
            bucket: hash as usize & (self.buckets.len() - 1),
        })
    }

    fn shard(&self, bucket: usize) -> &Shard {
        &self.shards[bucket >> self.shard_shift]
    }

    fn read_lock(&self, bucket: usize) -> RwLockReadGuard<'_, ()> {
        let lock = &self.shard(bucket).lock;
        lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self, bucket: usize) -> WriteGuard<'_> {
        let shard = self.shard(bucket);
        let lock = shard.lock.write().unwrap_or_else(PoisonError::into_inner);
        // Odd while writing; optimistic readers that see any of the writes see this too.
        let seq = shard.seq.load(Relaxed);
        shard.seq.store(seq.wrapping_add(1), Relaxed);
        fence(Release);
        WriteGuard { shard, _lock: lock }
    }

    fn row(&self, row: u32) -> &[AtomicU64] {
        let stride = self.layout.stride();
        let at = row as usize * stride;
        &self.words[at..at + stride]
    }

    /// The key's row and the row before it in the chain. Under the bucket's shard lock, or
    /// optimistically (then the walk may meet links being rewritten: it stops at anything
    /// that is not a row, and after `size` steps, and the caller discards what it found).
    fn find(&self, spot: &Spot, key: &str) -> Option<(u32, Option<u32>)> {
        let mut prev = None;
        let mut at = self.buckets[spot.bucket].load(Relaxed);
        for _ in 0..self.size {
            if at as usize >= self.size {
                return None;
            }
            if self.layout.key_is(self.row(at), spot.tag, key.as_bytes()) {
                return Some((at, prev));
            }
            prev = Some(at);
            at = self.links[at as usize].load(Relaxed);
        }
        None
    }

    /// Takes a free row for the key and links it first in its bucket. Under the write lock.
    fn insert(&self, spot: &Spot, key: &str) -> Result<u32, TableError> {
        let row = self.pop_free().ok_or(TableError::Full)?;
        self.layout.init(self.row(row), spot.tag, key.as_bytes());
        let head = &self.buckets[spot.bucket];
        self.links[row as usize].store(head.load(Relaxed), Relaxed);
        head.store(row, Relaxed);
        self.len.fetch_add(1, Relaxed);
        Ok(row)
    }

    fn pop_free(&self) -> Option<u32> {
        let mut head = self.free.load(Acquire);
        loop {
            let row = head as u32;
            if row == NIL || row as usize >= self.size {
                return None;
            }
            let next = self.links[row as usize].load(Relaxed);
            let new = (((head >> 32) + 1) << 32) | u64::from(next);
            match self.free.compare_exchange_weak(head, new, AcqRel, Acquire) {
                Ok(_) => return Some(row),
                Err(now) => head = now,
            }
        }
    }

    fn push_free(&self, row: u32) {
        let mut head = self.free.load(Relaxed);
        loop {
            self.links[row as usize].store(head as u32, Relaxed);
            let new = (((head >> 32) + 1) << 32) | u64::from(row);
            match self.free.compare_exchange_weak(head, new, Release, Relaxed) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// Calls `f` with the key's row; `None` when the key is absent. `f` may be called more
    /// than once (an optimistic read that met a writer is done again): it should only read.
    pub fn read<R>(
        &self,
        key: &str,
        mut f: impl FnMut(RowRef<'_>) -> R,
    ) -> Result<Option<R>, TableError> {
        let spot = self.spot(key)?;
        let shard = self.shard(spot.bucket);
        let mut read = || {
            self.find(&spot, key).map(|(row, _)| {
                f(RowRef {
                    layout: &self.layout,
                    words: self.row(row),
                })
            })
        };
        for _ in 0..OPTIMISTIC_TRIES {
            let before = shard.seq.load(Acquire);
            if before & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let result = read();
            fence(Acquire);
            if shard.seq.load(Relaxed) == before {
                return Ok(result);
            }
        }
        let _lock = self.read_lock(spot.bucket);
        Ok(read())
    }

    /// Whether the key has a row.
    pub fn exists(&self, key: &str) -> Result<bool, TableError> {
        Ok(self.read(key, |_| ())?.is_some())
    }

    /// Writes `cells` (column index, value) into the key's row, creating it (every other
    /// column zero or empty) when absent. Nothing is written unless every cell fits.
    pub fn set(&self, key: &str, cells: &[(usize, Cell<'_>)]) -> Result<(), TableError> {
        for (col, cell) in cells {
            self.layout.check(*col, cell)?;
        }
        let spot = self.spot(key)?;
        let _lock = self.write_lock(spot.bucket);
        let row = match self.find(&spot, key) {
            Some((row, _)) => row,
            None => self.insert(&spot, key)?,
        };
        for (col, cell) in cells {
            self.layout.write(self.row(row), *col, cell);
        }
        Ok(())
    }

    /// Adds `by` to a number column (subtracts when `down`), creating the row at 0 when
    /// absent; returns the new value. An integer that would overflow is refused, unchanged.
    pub fn incr(&self, key: &str, col: usize, by: Num, down: bool) -> Result<Num, TableError> {
        let kind = self
            .layout
            .columns
            .get(col)
            .ok_or(TableError::UnknownColumn)?;
        let zero = match (kind.kind, by) {
            (Kind::I64, Num::I64(_)) => Num::I64(0),
            (Kind::U64, Num::U64(_)) => Num::U64(0),
            (Kind::F64, Num::F64(_)) => Num::F64(0.0),
            _ => return Err(TableError::WrongType),
        };
        let spot = self.spot(key)?;
        let _lock = self.write_lock(spot.bucket);
        let found = self.find(&spot, key).map(|(row, _)| row);
        let now = match found {
            Some(row) => self.layout.num(self.row(row), col).unwrap_or(zero),
            None => zero,
        };
        let new = now.step(by, down).ok_or(TableError::Overflow)?;
        let row = match found {
            Some(row) => row,
            None => self.insert(&spot, key)?,
        };
        self.layout.set_num(self.row(row), col, new);
        Ok(new)
    }

    /// Deletes the key's row; false when there was none.
    pub fn del(&self, key: &str) -> Result<bool, TableError> {
        let spot = self.spot(key)?;
        let _lock = self.write_lock(spot.bucket);
        let Some((row, prev)) = self.find(&spot, key) else {
            return Ok(false);
        };
        let next = self.links[row as usize].load(Relaxed);
        match prev {
            Some(p) => self.links[p as usize].store(next, Relaxed),
            None => self.buckets[spot.bucket].store(next, Relaxed),
        }
        self.len.fetch_sub(1, Relaxed);
        self.push_free(row);
        Ok(true)
    }

    /// Copies the rows of the buckets from `cursor` on into `out`, a bounded run of buckets
    /// at a time, until at least `max_rows` rows were copied (whole buckets only) or the end.
    /// Returns the cursor to go on from, `None` at the end. Each run is copied optimistically
    /// (a writer is never held up by a scan) and checked against its shard's sequence; after
    /// a few runs that met a writer, under the read lock. See the module doc.
    pub fn scan(&self, cursor: u64, max_rows: usize, out: &mut Vec<Scanned>) -> Option<u64> {
        let nbuckets = self.buckets.len();
        let mut b = usize::try_from(cursor).unwrap_or(usize::MAX);
        let mut seen = 0;
        let max_rows = max_rows.max(1);
        while b < nbuckets && seen < max_rows {
            let shard_end = ((b >> self.shard_shift) + 1) << self.shard_shift;
            let end = shard_end.min(b + SCAN_BUCKETS_PER_LOCK);
            let shard = self.shard(b);
            let mark = out.len();
            let mut run = None;
            for _ in 0..OPTIMISTIC_TRIES {
                let before = shard.seq.load(Acquire);
                if before & 1 == 0 {
                    let copied = self.copy_run(b, end, max_rows - seen, out);
                    fence(Acquire);
                    if shard.seq.load(Relaxed) == before {
                        run = Some(copied);
                        break;
                    }
                    out.truncate(mark);
                }
                std::hint::spin_loop();
            }
            let (next, rows) = run.unwrap_or_else(|| {
                let _lock = self.read_lock(b);
                self.copy_run(b, end, max_rows - seen, out)
            });
            b = next;
            seen += rows;
        }
        (b < nbuckets).then_some(b as u64)
    }

    /// Copies whole buckets from `b` (before `end`) until `budget` rows; returns the next
    /// bucket and the rows copied. Bounded even if links change under it.
    fn copy_run(
        &self,
        mut b: usize,
        end: usize,
        budget: usize,
        out: &mut Vec<Scanned>,
    ) -> (usize, usize) {
        let (mut rows, mut steps) = (0, 0);
        while b < end && rows < budget {
            let mut at = self.buckets[b].load(Relaxed);
            while (at as usize) < self.size && steps < self.size {
                let words = self.row(at);
                let mut key = Vec::new();
                self.layout.key_into(words, &mut key);
                let values = (0..self.layout.columns.len())
                    .filter_map(|c| self.layout.value(words, c))
                    .collect();
                out.push(Scanned { key, values });
                rows += 1;
                steps += 1;
                at = self.links[at as usize].load(Relaxed);
            }
            b += 1;
        }
        (b, rows)
    }
}
