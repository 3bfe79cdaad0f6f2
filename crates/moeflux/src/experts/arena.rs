//! The slot arena: one allocation of equal, page-aligned slots for expert
//! weights, made once when a model is opened (nothing is allocated per
//! token). Slots are written by the reader threads and read by the compute
//! threads; the store's slot states order the two (see `store.rs`).

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;

use super::plan::SLOT_ALIGN;

/// A fixed block of `n_slots × slot_bytes`, each slot `SLOT_ALIGN`-aligned
/// (what `O_DIRECT` needs of a destination buffer).
pub struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
    slot_bytes: usize,
    n_slots: usize,
}

// SAFETY: the arena is plain memory; who may write which slot when is
// decided by the store's slot states, not by this type.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("slots", &self.n_slots)
            .field("slot_bytes", &self.slot_bytes)
            .finish()
    }
}

impl Arena {
    /// Allocates the arena. Pages are only backed by memory once written,
    /// so resident memory grows as slots are first filled — or all at once
    /// when a GPU imports the arena (`backend::gpu::host_memory` pins it).
    pub fn new(n_slots: usize, slot_bytes: usize) -> Result<Arena, String> {
        let slot_bytes = slot_bytes.div_ceil(SLOT_ALIGN as usize) * SLOT_ALIGN as usize;
        let size = n_slots
            .checked_mul(slot_bytes)
            .filter(|&s| s > 0)
            .ok_or_else(|| {
                format!("an expert arena of {n_slots} × {slot_bytes} bytes is not possible")
            })?;
        let layout =
            Layout::from_size_align(size, SLOT_ALIGN as usize).map_err(|e| e.to_string())?;
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = unsafe { alloc(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| format!("cannot allocate the expert arena ({size} bytes)"))?;
        crate::huge_pages::advise(ptr.as_ptr(), size);
        Ok(Arena {
            ptr,
            layout,
            slot_bytes,
            n_slots,
        })
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// The whole arena: its first byte and length (`n_slots · slot_bytes`,
    /// `SLOT_ALIGN`-aligned).
    pub fn region(&self) -> (*const u8, usize) {
        (self.ptr.as_ptr(), self.n_slots * self.slot_bytes)
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The start of slot `i`.
    pub fn slot_ptr(&self, i: usize) -> *mut u8 {
        assert!(i < self.n_slots, "slot {i} out of range");
        // SAFETY: i < n_slots, so the offset stays inside the allocation.
        unsafe { self.ptr.as_ptr().add(i * self.slot_bytes) }
    }

    /// Bytes `at..at + len` of slot `i`.
    ///
    /// # Safety
    /// No thread may be writing these bytes (the slot must be loaded and
    /// pinned or otherwise kept from reuse for the lifetime of the slice).
    pub unsafe fn bytes(&self, i: usize, at: usize, len: usize) -> &[u8] {
        assert!(at + len <= self.slot_bytes, "read past the end of slot {i}");
        // SAFETY: inside slot i (checked), not being written (contract).
        unsafe { std::slice::from_raw_parts(self.slot_ptr(i).add(at), len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
