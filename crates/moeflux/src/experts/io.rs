//! Reading experts into slots: a pool of reader threads doing positioned
//! reads (`pread`) of each part of an expert straight into its slot.
//!
//! Two modes:
//! - [`IoMode::Direct`]: the file is opened with `O_DIRECT` (Linux; on macOS
//!   `F_NOCACHE`), so expert bytes are cached once, in the slots, and not a
//!   second time in the page cache (double caching made other engines slower
//!   and, under a memory limit, the page cache is charged too). Each read
//!   covers the page-aligned window around a part; the part sits inside it.
//! - [`IoMode::Buffered`]: plain reads through the page cache, which wins
//!   when the whole model fits in memory anyway.
//!
//! Expert bytes never go through `mmap`: on cold data, page faults are one
//! 4–16 KiB read at a time (measured 5× slower than `pread` by flash-moe).

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use super::plan::SLOT_ALIGN;

/// How expert bytes are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    Direct,
    Buffered,
}

impl IoMode {
    pub fn from_name(s: &str) -> Option<IoMode> {
        match s {
            "direct" => Some(IoMode::Direct),
            "buffered" => Some(IoMode::Buffered),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        }
    }
}

/// Slot states, shared by the store (which assigns slots) and the readers
/// (which fill them).
pub const EMPTY: u8 = 0;
pub const LOADING: u8 = 1;
pub const READY: u8 = 2;
pub const FAILED: u8 = 3;

/// The state of every slot, and a way to wait for changes.
#[derive(Debug)]
pub struct SlotStates {
    pub state: Vec<AtomicU8>,
    lock: Mutex<()>,
    changed: Condvar,
    /// Why a slot failed to load.
    pub errors: Mutex<Vec<(u32, String)>>,
}

impl SlotStates {
    pub fn new(n: usize) -> SlotStates {
        SlotStates {
            state: (0..n).map(|_| AtomicU8::new(EMPTY)).collect(),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            errors: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self, slot: u32) -> u8 {
        self.state[slot as usize].load(Ordering::Acquire)
    }

    fn finish(&self, slot: u32, state: u8) {
        // Release: the slot's bytes are visible to whoever sees READY.
        self.state[slot as usize].store(state, Ordering::Release);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Blocks until `done()` holds (re-checked after every slot change).
    pub fn wait_until(&self, mut done: impl FnMut() -> bool) {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while !done() {
            g = self
                .changed
                .wait_timeout(g, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One aligned read into a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartRead {
    pub file: u32,
    /// Page-aligned file offset of the window.
    pub offset: u64,
    /// Page-multiple length of the window.
    pub len: u64,
    /// Where the window goes in the slot.
    pub dst: usize,
    /// Whether the part's rows are interleaved by eight once read.
    pub interleave: Option<Interleave>,
}

/// A part to rewrite with its rows interleaved by eight
/// ([`crate::backend::cpu::interleave`]) once it has been read: the
/// reader does it, so the slot is READY in the layout the kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interleave {
    pub ty: crate::quant::GgmlType,
    pub cols: usize,
    /// Where the payload starts in the window, and its length.
    pub at: usize,
    pub len: usize,
}

/// Most parts an expert has (three matrices × weight/scales/biases).
pub const MAX_PARTS: usize = 9;

/// A request to fill one slot.
#[derive(Clone, Copy, Debug)]
pub struct ReadJob {
    pub slot: u32,
    pub dst: usize,
    pub parts: [PartRead; MAX_PARTS],
    pub n_parts: usize,
}

/// The window of a part `(offset, len)`: page-aligned start and length, and
/// where the payload begins inside it.
pub fn window(offset: u64, len: u64) -> (u64, u64, u64) {
    let a = SLOT_ALIGN;
    let start = offset / a * a;
    let end = (offset + len).div_ceil(a) * a;
    (start, end - start, offset - start)
}

/// Counters of the reader threads.
#[derive(Debug, Default)]
pub struct IoCounters {
    pub bytes: AtomicU64,
    pub reads: AtomicU64,
    /// Summed over threads.
    pub busy_ns: AtomicU64,
}

/// The reader threads.
pub struct Reader {
    tx: Mutex<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
    pub mode: IoMode,
    pub counters: Arc<IoCounters>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("mode", &self.mode)
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Where the readers write: the arena's base and slot size.
#[derive(Clone, Copy)]
struct Dest(*mut u8);
// SAFETY: readers write only the slot of their job, which the store marked
// LOADING and will not hand out (nor reassign) until READY or FAILED.
unsafe impl Send for Dest {}

/// Opens a model file for expert reads in `mode`; `O_DIRECT` falls back to
/// buffered reads (returned mode) when the file system refuses it.
pub fn open_for_reads(path: &Path, mode: IoMode) -> std::io::Result<(File, IoMode)> {
    if mode == IoMode::Direct {
        if let Some(f) = open_direct(path) {
            return Ok((f, IoMode::Direct));
        }
    }
    Ok((File::open(path)?, IoMode::Buffered))
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    // Some file systems accept the flag but refuse the reads: try one.
    let layout =
        std::alloc::Layout::from_size_align(SLOT_ALIGN as usize, SLOT_ALIGN as usize).ok()?;
    // SAFETY: non-zero size; freed below.
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return None;
    }
    // SAFETY: buf holds SLOT_ALIGN bytes.
    let ok = f
        .read_at(
            unsafe { std::slice::from_raw_parts_mut(buf, SLOT_ALIGN as usize) },
            0,
        )
        .is_ok();
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    ok.then_some(f)
}

#[cfg(target_os = "macos")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).ok()?;
    // SAFETY: fcntl on an open descriptor; F_NOCACHE takes an int.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) };
    (r != -1).then_some(f)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Reads `buf.len()` bytes at `offset`, tolerating a short read at the end
/// of the file (the window may extend past it); returns bytes read.
fn read_window(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    #[cfg(unix)]
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        #[cfg(unix)]
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        #[cfg(not(unix))]
        let n = {
            use std::os::windows::fs::FileExt;
            file.seek_read(&mut buf[done..], offset + done as u64)?
        };
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn reader_loop(
    rx: Arc<Mutex<Receiver<ReadJob>>>,
    files: Arc<Vec<File>>,
    dest: Dest,
    slot_bytes: usize,
    states: Arc<SlotStates>,
    counters: Arc<IoCounters>,
) {
    // One group of rows while they are interleaved (grows once).
    let mut scratch = Vec::new();
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            match guard.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let t0 = Instant::now();
        let mut result = Ok(());
        let mut bytes = 0u64;
        for p in &job.parts[..job.n_parts] {
            if p.dst + p.len as usize > slot_bytes {
                result = Err(format!("part of {} bytes does not fit the slot", p.len));
                break;
            }
            // SAFETY: the slot is LOADING: only this job writes it, and the
            // window lies inside it (checked just above).
            let buf = unsafe {
                std::slice::from_raw_parts_mut(
                    dest.0.add(job.slot as usize * slot_bytes + p.dst),
                    p.len as usize,
                )
            };
            match read_window(&files[p.file as usize], buf, p.offset) {
                Ok(n) => {
                    bytes += n as u64;
                    if let Some(x) = p.interleave {
                        let Some(data) = buf.get_mut(x.at..x.at + x.len) else {
                            result = Err(format!("part of {} bytes outside its window", x.len));
                            break;
                        };
                        crate::backend::cpu::interleave::interleave(
                            x.ty,
                            x.cols,
                            data,
                            &mut scratch,
                        );
                    }
                }
                Err(e) => {
                    result = Err(format!(
                        "reading {} bytes at offset {}: {e}",
                        p.len, p.offset
                    ));
                    break;
                }
            }
        }
        counters
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        counters
            .reads
            .fetch_add(job.n_parts as u64, Ordering::Relaxed);
        match result {
            Ok(()) => states.finish(job.slot, READY),
            Err(e) => {
                states
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((job.slot, e));
                states.finish(job.slot, FAILED);
            }
        }
    }
}

impl Reader {
    /// Starts `n_threads` readers over `files`, writing into the arena at
    /// `base` (slots of `slot_bytes`).
    pub fn new(
        files: Vec<File>,
        mode: IoMode,
        base: *mut u8,
        slot_bytes: usize,
        states: Arc<SlotStates>,
        n_threads: usize,
    ) -> Reader {
        let (tx, rx) = channel();
        let rx = Arc::new(Mutex::new(rx));
        let files = Arc::new(files);
        let counters = Arc::new(IoCounters::default());
        let threads = (0..n_threads.max(1))
            .map(|i| {
                let (rx, files, states, counters) =
                    (rx.clone(), files.clone(), states.clone(), counters.clone());
                let dest = Dest(base);
                std::thread::Builder::new()
                    .name(format!("moeflux-io-{i}"))
                    .spawn(move || reader_loop(rx, files, dest, slot_bytes, states, counters))
                    .expect("spawning a reader thread")
            })
            .collect();
        Reader {
            tx: Mutex::new(tx),
            threads,
            mode,
            counters,
        }
    }

    /// Queues a read; its slot must already be LOADING.
    pub fn submit(&self, job: ReadJob) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        // The receivers live as long as the reader; a send cannot fail
        // before `Drop`.
        let _ = tx.send(job);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Closing the channel ends the threads once the queue is drained.
        let (dead, _) = channel();
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = dead;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Drops the model file's pages from the page cache (for cold runs).
pub fn evict_from_page_cache(path: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let f = File::open(path)?;
        // SAFETY: posix_fadvise on an open descriptor.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
    Ok(())
}

/// Sequential read bandwidth of `path` in bytes/s, measured with direct
/// reads of up to `max_bytes` (4 readers, 4 MiB each) so that the page cache
/// does not count.
pub fn measure_read_bandwidth(path: &Path, max_bytes: u64) -> std::io::Result<f64> {
    let (f, _mode) = open_for_reads(path, IoMode::Direct)?;
    let len = f.metadata()?.len().min(max_bytes);
    let chunk = 4u64 << 20;
    let n_chunks = len / chunk;
    if n_chunks == 0 {
        return Ok(0.0);
    }
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (f, next) = (f.clone(), next.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let layout =
                    std::alloc::Layout::from_size_align(chunk as usize, SLOT_ALIGN as usize)
                        .map_err(std::io::Error::other)?;
                // SAFETY: non-zero size; freed below.
                let buf = unsafe { std::alloc::alloc(layout) };
                if buf.is_null() {
                    return Err(std::io::Error::other("out of memory"));
                }
                // SAFETY: buf holds `chunk` bytes.
                let slice = unsafe { std::slice::from_raw_parts_mut(buf, chunk as usize) };
                let mut r = Ok(());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n_chunks {
                        break;
                    }
                    if let Err(e) = read_window(&f, slice, i * chunk) {
                        r = Err(e);
                        break;
                    }
                }
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(buf, layout) };
                r
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| std::io::Error::other("reader panicked"))??;
    }
    Ok((n_chunks * chunk) as f64 / t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_part() {
        assert_eq!(window(0, 10), (0, 4096, 0));
        assert_eq!(window(5000, 100), (4096, 4096, 904));
        assert_eq!(window(4090, 10), (0, 8192, 4090));
        let (s, l, d) = window(123_456, 99_999);
        assert!(s <= 123_456 && s + l >= 123_456 + 99_999 && s + d == 123_456);
        assert_eq!(s % 4096, 0);
        assert_eq!(l % 4096, 0);
    }
}
