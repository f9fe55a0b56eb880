//! Each worker's cache of small files: the bytes and headers of a file it served, keyed by
//! the request's name and what the client accepts. A hit costs one `fstatat` of the file
//! (instead of an open, a read and a close) and is served only while that name still leads
//! to the very same inode, with the same length and modification time, as the one that was
//! opened safely and read. A different inode (a new file, a symlink swapped in) is a miss,
//! so the cache never serves what the full path would refuse.

use std::{collections::HashMap, fs::Metadata, os::unix::fs::MetadataExt, rc::Rc};

/// Files up to this size are cached.
pub const FILE_MAX: u64 = 32 * 1024;
/// A worker's cache holds at most this many bytes of files, and this many entries; past
/// either it starts over.
const BYTES_MAX: usize = 8 << 20;
const ENTRIES_MAX: usize = 4096;

/// What identifies the content of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_ns: i64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(meta: &Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.size(),
            mtime: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
        }
    }

    /// The identity in a `stat` buffer.
    pub fn of_stat(st: &libc::stat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            len: st.st_size as u64,
            mtime: st.st_mtime,
            mtime_ns: st.st_mtime_nsec,
        }
    }
}

/// A cached file.
#[derive(Debug)]
pub struct Entry {
    /// The name of the file served (the index file, the `.gz` sibling...), NUL-terminated.
    pub file: Vec<u8>,
    /// Its identity when it was read.
    pub id: FileId,
    /// What the response says about it.
    pub info: super::Info,
    /// Its bytes.
    pub body: Rc<[u8]>,
}

/// One worker's cache. It belongs to one [`super::Statics`] (by its id): a reload that
/// makes a new one empties it.
#[derive(Debug, Default)]
pub struct Cache {
    owner: u64,
    entries: HashMap<Vec<u8>, Entry>,
    bytes: usize,
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Cache {
        Cache::default()
    }

    /// The entry for `key`, in the cache of `owner`.
    pub fn get(&mut self, owner: u64, key: &[u8]) -> Option<&Entry> {
        if self.owner != owner {
            self.clear();
            self.owner = owner;
        }
        self.entries.get(key)
    }

    /// Forgets `key` (its file changed).
    pub fn remove(&mut self, key: &[u8]) {
        if let Some(e) = self.entries.remove(key) {
            self.bytes -= e.body.len();
        }
    }

    /// Remembers a file read for `key`.
    pub fn insert(&mut self, key: Vec<u8>, entry: Entry) {
        if self.bytes + entry.body.len() > BYTES_MAX || self.entries.len() >= ENTRIES_MAX {
            self.clear();
        }
        self.bytes += entry.body.len();
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.body.len();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}
