//! Transparent huge pages for the large, long-lived buffers (the dense
//! weights and the expert arena).
//!
//! A decode step reads about a gigabyte of weights scattered over the whole
//! model: with 4 KiB pages that is a quarter of a million TLB misses per
//! token, with 2 MiB pages a few hundred. Many Linux systems (this one
//! included) enable transparent huge pages only for memory that asks with
//! `madvise(MADV_HUGEPAGE)`. Elsewhere this does nothing.

/// Size of a huge page on x86-64 and aarch64 Linux with 4 KiB base pages.
const HUGE: usize = 2 << 20;

/// Asks the kernel to back `len` bytes at `ptr` with huge pages, for the
/// whole 2 MiB-aligned pages inside the range. Call before the memory is
/// first written. A hint: failure is ignored.
pub fn advise(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).div_ceil(HUGE) * HUGE;
        let end = (ptr as usize).saturating_add(len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside memory the caller owns;
            // MADV_HUGEPAGE changes how it is backed, never its contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, HUGE);
}
