//! What each thread of the server is doing in plugin code, kept in memory the supervisor
//! shares with the server process, so that after a crash (a segfault cannot be caught in
//! process) it can say which plugin and component each thread was inside.
//!
//! The supervisor creates the record (a `memfd`) and passes it to the server, which maps it.
//! Each thread takes a row when it starts; a call into plugin code stores the component's id
//! in the row on the way in and the previous value on the way out: two relaxed stores to a
//! cache line the thread owns. Component names are written once into a table of the record.
//! Without a supervisor (tests, benchmarks) nothing is recorded and entering costs one check.

use std::{
    cell::Cell,
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, OnceLock,
    },
};

/// Rows for threads; threads past this are not recorded.
const THREADS: usize = 512;
/// Component names; names past this are not recorded.
const NAMES: usize = 4096;
/// Bytes of a thread name.
const THREAD_NAME: usize = 28;
/// Bytes of a component name.
const NAME: usize = 96;
/// Marks a mapping laid out as [`Record`].
const MAGIC: u64 = 0x706c_7567_686f_7374; // "plughost"

#[derive(Debug)]
#[repr(C, align(64))]
struct Row {
    /// The component id the thread is inside (0: none).
    call: AtomicU32,
    name: [u8; THREAD_NAME],
}

#[repr(C)]
struct Record {
    magic: u64,
    threads: AtomicU32,
    names: AtomicU32,
    rows: [Row; THREADS],
    table: [[u8; NAME]; NAMES],
}

/// The size of the shared memory a record takes.
pub const SIZE: usize = std::mem::size_of::<Record>();

static RECORD: OnceLock<&'static Record> = OnceLock::new();
static IDS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();

thread_local! {
    static ROW: Cell<Option<&'static Row>> = const { Cell::new(None) };
}

/// Creates the shared memory for a record: a file descriptor to hand to the server process.
pub fn create() -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"plughost-calls".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), SIZE as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn map(fd: RawFd) -> std::io::Result<&'static Record> {
    // SAFETY: a shared mapping of SIZE bytes of a descriptor sized to SIZE; it is never
    // unmapped, so the reference lives as long as the process.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is zeroed or was written as a Record; every field is plain data or
    // atomics, valid for any bytes.
    Ok(unsafe { &*(p as *const Record) })
}

/// In the server process: records calls into the record behind `fd` from now on.
pub fn attach(fd: RawFd) -> std::io::Result<()> {
    let record = map(fd)?;
    // A fresh record per server process: the supervisor makes one for each.
    let magic = record as *const Record as *mut u64;
    // SAFETY: the first field; no other thread uses the record yet.
    unsafe { magic.write_volatile(MAGIC) };
    let _ = RECORD.set(record);
    Ok(())
}

/// Takes a row for the calling thread, named `name`.
pub fn thread(name: &str) {
    let Some(record) = RECORD.get() else { return };
    let i = record.threads.fetch_add(1, Ordering::Relaxed) as usize;
    let Some(row) = record.rows.get(i) else {
        return;
    };
    let row_name = &row.name as *const [u8; THREAD_NAME] as *mut u8;
    let n = name.len().min(THREAD_NAME);
    // SAFETY: this row is this thread's alone (handed out once by the counter above); the
    // name is written before anyone reads it (after the process died).
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), row_name, n) };
    ROW.with(|r| r.set(Some(row)));
}

/// The id of component `name` (`plugin.component (kind)`), written into the record once.
pub fn id(name: &str) -> u32 {
    let Some(record) = RECORD.get() else { return 0 };
    let ids = IDS.get_or_init(Mutex::default);
    let mut ids = ids.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&id) = ids.get(name) {
        return id;
    }
    let i = record.names.fetch_add(1, Ordering::Relaxed) as usize;
    let Some(slot) = record.table.get(i) else {
        return 0;
    };
    let n = name.len().min(NAME);
    // SAFETY: table entry i is handed out once, under the lock; it is read only after the
    // process died.
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), slot.as_ptr() as *mut u8, n) };
    let id = i as u32 + 1;
    ids.insert(name.to_owned(), id);
    id
}

/// While this lives, the thread is recorded as inside component `id`.
#[derive(Debug)]
pub struct Inside(Option<(&'static Row, u32)>);

impl Drop for Inside {
    fn drop(&mut self) {
        if let Some((row, before)) = self.0 {
            row.call.store(before, Ordering::Relaxed);
        }
    }
}

/// Records that the calling thread enters component `id` until the result is dropped.
#[inline]
pub fn enter(id: u32) -> Inside {
    Inside(ROW.with(Cell::get).map(|row| {
        let before = row.call.load(Ordering::Relaxed);
        row.call.store(id, Ordering::Relaxed);
        (row, before)
    }))
}

/// In the supervisor, after the server process died: each thread that was inside plugin
/// code, and the component (`worker-0`, `crashy.segv (http)`).
pub fn read(fd: &OwnedFd) -> Vec<(String, String)> {
    let Ok(record) = map(fd.as_raw_fd()) else {
        return Vec::new();
    };
    let text = |bytes: &[u8]| {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let mut inside = Vec::new();
    if record.magic == MAGIC {
        let threads = (record.threads.load(Ordering::Relaxed) as usize).min(THREADS);
        for row in &record.rows[..threads] {
            let call = row.call.load(Ordering::Relaxed) as usize;
            if let Some(name) = call.checked_sub(1).and_then(|i| record.table.get(i)) {
                inside.push((text(&row.name), text(name)));
            }
        }
    }
    // SAFETY: unmapping the mapping made above, which nothing else references.
    unsafe { libc::munmap(record as *const Record as *mut libc::c_void, SIZE) };
    inside
}
