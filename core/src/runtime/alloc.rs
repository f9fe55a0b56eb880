//! An allocation counter for benchmark builds (`--features alloc-stats`): `info` then reports
//! how many allocations the process made, so a benchmark can divide by requests served.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicU64, Ordering},
};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting allocations.
#[derive(Debug)]
pub struct Counting;

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations so far, when this build counts them.
pub fn count() -> Option<u64> {
    cfg!(feature = "alloc-stats").then(allocations)
}

/// Allocations made through [`Counting`] so far (0 unless it is the global allocator; the
/// micro-benchmarks install it themselves).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}
