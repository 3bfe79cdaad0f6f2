//! A fixed pool of worker threads for data-parallel loops.
//!
//! [`ThreadPool::run`] splits `n_tasks` among the calling thread and the
//! workers, which claim task indices from a shared counter, and returns when
//! all are done. Nothing is allocated and no thread is spawned per call:
//! a decode step issues hundreds of these, so workers spin briefly for the
//! next job before sleeping.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A job: called with a task index and the index of the thread running it.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

struct Shared {
    /// The current job, as a raw pointer whose lifetime [`ThreadPool::run`]
    /// guarantees (it does not return before every worker is done with it).
    job: Mutex<Option<JobPtr>>,
    /// Incremented for every job; workers wait for it to change.
    epoch: AtomicUsize,
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    /// Workers still running the current job.
    busy: AtomicUsize,
    shutdown: AtomicBool,
    wake: Condvar,
    sleeping: Mutex<()>,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job<'static>);

// SAFETY: the pointee is `Sync` (see `Job`), and `run` keeps it alive for as
// long as any worker can dereference it.
unsafe impl Send for JobPtr {}

/// A fixed set of threads that run data-parallel jobs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Serialises callers: one job at a time.
    running: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &self.n_threads)
            .finish()
    }
}

/// How long an idle worker spins before sleeping on the condition variable.
const SPIN: Duration = Duration::from_micros(200);

fn worker(shared: Arc<Shared>, thread_index: usize) {
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin first, then sleep. The clock is read
        // every 256 spins only (reading it costs more than a spin).
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                let guard = shared.sleeping.lock().unwrap_or_else(|p| p.into_inner());
                if shared.epoch.load(Ordering::Acquire) == seen
                    && !shared.shutdown.load(Ordering::Acquire)
                {
                    let _ = shared
                        .wake
                        .wait_timeout(guard, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
        let job = *shared.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(JobPtr(ptr)) = job {
            let n = shared.n_tasks.load(Ordering::Acquire);
            loop {
                let t = shared.next_task.fetch_add(1, Ordering::AcqRel);
                if t >= n {
                    break;
                }
                // SAFETY: `run` stores the pointer before bumping the epoch
                // and waits for `busy` to reach zero before returning, so the
                // closure is alive here.
                unsafe { (*ptr)(t, thread_index) };
            }
        }
        shared.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads in total (the caller's
    /// plus `n_threads - 1` workers).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicUsize::new(0),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            wake: Condvar::new(),
            sleeping: Mutex::new(()),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("moeflux-cpu-{i}"))
                    .spawn(move || worker(s, i))
                    .expect("spawning a compute thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            n_threads,
            running: Mutex::new(()),
        }
    }

    /// Threads a job runs on, the caller's included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(task, thread)` for every `task` in `0..n_tasks`, spread over
    /// the pool's threads (`thread` is in `0..n_threads`, 0 being the
    /// caller); returns when all tasks are done.
    pub fn run(&self, n_tasks: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            for t in 0..n_tasks {
                f(t, 0);
            }
            return;
        }
        let _one_at_a_time = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.shared;
        // SAFETY: erases the closure's lifetime for storage in the shared
        // slot. It is only dereferenced by workers between the epoch bump
        // below and `busy` returning to zero, which this function waits for
        // before it returns (and before `f` can go out of scope).
        let ptr: *const Job<'static> =
            unsafe { std::mem::transmute::<*const Job<'_>, *const Job<'static>>(f) };
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(JobPtr(ptr));
        s.next_task.store(0, Ordering::Release);
        s.n_tasks.store(n_tasks, Ordering::Release);
        s.busy.store(self.workers.len(), Ordering::Release);
        s.epoch.fetch_add(1, Ordering::AcqRel);
        {
            let _g = s.sleeping.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        loop {
            let t = s.next_task.fetch_add(1, Ordering::AcqRel);
            if t >= n_tasks {
                break;
            }
            f(t, 0);
        }
        while s.busy.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *s.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self
                .shared
                .sleeping
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Number of physical cores (Linux: distinct core ids in /proc/cpuinfo),
/// falling back to the logical count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in info.lines() {
        if let Some(v) = line.strip_prefix("physical id") {
            phys = v.split(':').nth(1).map(|s| s.trim().to_string());
        } else if let Some(v) = line.strip_prefix("core id") {
            core = v.split(':').nth(1).map(|s| s.trim().to_string());
        } else if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                cores.insert((p, c));
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for n in [0, 1, 5, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let max_thread = AtomicUsize::new(0);
                pool.run(n, &|t, th| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                    max_thread.fetch_max(th, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                assert!(max_thread.load(Ordering::Relaxed) < threads);
            }
        }
    }

    #[test]
    fn many_small_jobs_and_borrowed_data() {
        let pool = ThreadPool::new(2);
        let data: Vec<u64> = (0..64).collect();
        for round in 0..2000u64 {
            let sum = AtomicUsize::new(0);
            pool.run(8, &|t, _| {
                let s: u64 = data[t * 8..(t + 1) * 8].iter().map(|v| v + round).sum();
                sum.fetch_add(s as usize, Ordering::Relaxed);
            });
            assert_eq!(
                sum.load(Ordering::Relaxed) as u64,
                (0..64).sum::<u64>() + 64 * round
            );
        }
    }
}
