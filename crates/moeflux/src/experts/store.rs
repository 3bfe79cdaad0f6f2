//! The expert store: routed experts live in the model file and are read on
//! demand into a fixed arena of slots, under a frequency-weighted LRU
//! policy, with optional lookahead prefetch.
//!
//! A layer's computation asks for the experts it needs with
//! [`ExpertStore::acquire`], which pins the resident ones (hits) and starts
//! reads for the others (misses) while slots can be freed; it computes
//! experts as they become ready ([`ExpertStore::ready`], [`ExpertStore::wait_any`],
//! [`ExpertStore::view`]) and unpins them with [`ExpertStore::release`].
//! The model never reads files; the store never does math.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::arena::Arena;
use super::cache::SlotCache;
use super::io::{
    self, Interleave, IoMode, PartRead, ReadJob, Reader, SlotStates, FAILED, LOADING, MAX_PARTS,
    READY,
};
use super::plan::{self, SLOT_ALIGN};
use super::stats::{LayerStats, StoreStats};
use crate::backend::cpu::kernels::{wants_interleaved, Level};
use crate::backend::cpu::Matrix;
use crate::format::{ModelFiles, Span};
use crate::model::weights::WeightRef;
use crate::quant::TensorType;

/// Where one expert's three matrices are.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertRef {
    /// `[ff, hidden]`
    pub gate: WeightRef,
    /// `[ff, hidden]`
    pub up: WeightRef,
    /// `[hidden, ff]`
    pub down: WeightRef,
}

impl ExpertRef {
    /// Every span of the expert, in slot order (gate, up, down parts).
    fn spans(&self) -> impl Iterator<Item = &Span> {
        self.parts().map(|(_, s)| s)
    }

    /// Every span with the matrix it belongs to, in slot order.
    fn parts(&self) -> impl Iterator<Item = (&WeightRef, &Span)> {
        [&self.gate, &self.up, &self.down]
            .into_iter()
            .flat_map(|w| w.parts.iter().map(move |s| (w, s)))
    }

    /// Bytes of the expert.
    pub fn bytes(&self) -> u64 {
        self.spans().map(|s| s.len).sum()
    }

    /// Slot bytes it needs (aligned windows, see [`plan::slot_bytes`]).
    pub fn slot_bytes(&self) -> u64 {
        plan::slot_bytes(self.spans().map(|s| s.len))
    }
}

/// One expert's weights, ready to compute with.
pub struct ExpertView<'a> {
    pub gate: Matrix<'a>,
    pub up: Matrix<'a>,
    pub down: Matrix<'a>,
}

/// Why an expert could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading expert {expert} of layer {layer} failed: {message}")]
    Read {
        layer: usize,
        expert: usize,
        message: String,
    },
    #[error(
        "expert {expert} of layer {layer} has {parts} parts; at most {MAX_PARTS} are supported"
    )]
    TooManyParts {
        layer: usize,
        expert: usize,
        parts: usize,
    },
    #[error("cannot set up expert reads: {0}")]
    Setup(String),
}

/// How the store is built.
#[derive(Clone, Copy, Debug)]
pub struct StoreOptions {
    pub slots: usize,
    pub io: IoMode,
    pub io_threads: usize,
    /// The CPU kernel level experts are computed at: expert matrices that
    /// have an eight-row kernel there are interleaved in their slots as
    /// they arrive (see [`crate::backend::cpu::interleave`]). None keeps
    /// the file's layout.
    pub interleave_for: Option<Level>,
}

/// The routed experts of every layer, streamed through a slot arena.
pub struct ExpertStore {
    /// `layers[l][e]`; empty for layers without routed experts.
    layers: Vec<Vec<ExpertRef>>,
    /// Shared with a GPU that copies experts straight from it (see
    /// [`ExpertStore::arena`]).
    arena: Arc<Arena>,
    states: Arc<SlotStates>,
    cache: SlotCache,
    reader: Reader,
    /// Where part `p` of an expert starts in its slot.
    part_dst: Vec<usize>,
    interleave_for: Option<Level>,
    stats: Vec<LayerStats>,
}

impl std::fmt::Debug for ExpertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertStore")
            .field("arena", &self.arena)
            .field("io", &self.reader.mode)
            .finish()
    }
}

/// The slot bytes every expert of `layers` fits in.
pub fn slot_bytes_for(layers: &[Vec<ExpertRef>]) -> u64 {
    layers
        .iter()
        .flatten()
        .map(ExpertRef::slot_bytes)
        .max()
        .unwrap_or(SLOT_ALIGN)
}

impl ExpertStore {
    /// A store over `files` with `opts.slots` slots. Returns the store and
    /// the I/O mode in effect (direct reads fall back to buffered where
    /// the file system refuses them).
    pub fn new(
        files: &ModelFiles,
        layers: Vec<Vec<ExpertRef>>,
        opts: StoreOptions,
    ) -> Result<ExpertStore, StoreError> {
        for (l, experts) in layers.iter().enumerate() {
            for (e, x) in experts.iter().enumerate() {
                let parts = x.spans().count();
                if parts > MAX_PARTS {
                    return Err(StoreError::TooManyParts {
                        layer: l,
                        expert: e,
                        parts,
                    });
                }
            }
        }
        // Every part gets a window of its length rounded up plus one page
        // (the payload may start anywhere in its first page).
        let part_lens: Vec<u64> =
            layers
                .iter()
                .flatten()
                .fold(Vec::new(), |mut acc: Vec<u64>, x| {
                    for (i, s) in x.spans().enumerate() {
                        if i >= acc.len() {
                            acc.push(0);
                        }
                        acc[i] = acc[i].max(s.len);
                    }
                    acc
                });
        let mut part_dst = Vec::with_capacity(part_lens.len());
        let mut at = 0u64;
        for len in &part_lens {
            part_dst.push(at as usize);
            at += plan::slot_bytes([*len]);
        }
        let slot_bytes = at.max(SLOT_ALIGN) as usize;
        let arena = Arena::new(opts.slots.max(1), slot_bytes).map_err(StoreError::Setup)?;

        let mut mode = opts.io;
        let mut handles: Vec<File> = Vec::with_capacity(files.files.len());
        for f in &files.files {
            let (h, m) = io::open_for_reads(&f.path, opts.io)
                .map_err(|e| StoreError::Setup(format!("{}: {e}", f.path.display())))?;
            if m != opts.io {
                mode = m;
            }
            handles.push(h);
        }
        let states = Arc::new(SlotStates::new(arena.n_slots()));
        let reader = Reader::new(
            handles,
            mode,
            arena.slot_ptr(0),
            arena.slot_bytes(),
            states.clone(),
            opts.io_threads,
        );
        let per_layer: Vec<usize> = layers.iter().map(Vec::len).collect();
        Ok(ExpertStore {
            cache: SlotCache::new(arena.n_slots(), &per_layer),
            stats: vec![LayerStats::default(); layers.len()],
            layers,
            arena: Arc::new(arena),
            states,
            reader,
            part_dst,
            interleave_for: opts.interleave_for,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn experts(&self, layer: usize) -> &[ExpertRef] {
        &self.layers[layer]
    }

    /// The I/O mode in effect.
    pub fn io_mode(&self) -> IoMode {
        self.reader.mode
    }

    pub fn n_slots(&self) -> usize {
        self.arena.n_slots()
    }

    /// Advances the recency clock: call once per forward step.
    pub fn begin_step(&mut self) {
        self.cache.step += 1;
    }

    /// Frees `slot` for `(layer, expert)` and queues its read.
    fn load(&mut self, slot: u32, layer: usize, expert: usize) {
        if let Some(_old) = self.cache.owner[slot as usize] {
            if self.cache.prefetched[slot as usize] {
                // A prefetched expert nobody asked for: wasted bytes.
                let (ol, oe) = _old;
                let b = self.layers[ol as usize][oe as usize].bytes();
                self.stats[ol as usize].prefetch_wasted_bytes += b;
            }
        }
        self.cache.assign(slot, layer, expert);
        self.states.state[slot as usize].store(LOADING, Ordering::Release);
        let x = &self.layers[layer][expert];
        let mut parts = [PartRead {
            file: 0,
            offset: 0,
            len: 0,
            dst: 0,
            interleave: None,
        }; MAX_PARTS];
        let mut n = 0;
        let mut bytes = 0;
        for (i, (w, s)) in x.parts().enumerate() {
            let (start, len, delta) = io::window(s.offset, s.len);
            parts[i] = PartRead {
                file: s.file,
                offset: start,
                len,
                dst: self.part_dst[i],
                interleave: match w.ty {
                    TensorType::Ggml(ty) if self.interleaved(w) => Some(Interleave {
                        ty,
                        cols: w.cols,
                        at: delta as usize,
                        len: s.len as usize,
                    }),
                    _ => None,
                },
            };
            bytes += len;
            n += 1;
        }
        self.stats[layer].bytes_read += bytes;
        self.reader.submit(ReadJob {
            slot,
            dst: 0,
            parts,
            n_parts: n,
        });
    }

    /// Pins as many of `experts` (of `layer`) as slots allow, starting reads
    /// for those not resident; their ids are appended to `granted`. At least
    /// one is granted when the arena has a slot that is not pinned.
    pub fn acquire(
        &mut self,
        layer: usize,
        experts: &[u32],
        granted: &mut Vec<u32>,
    ) -> Result<(), StoreError> {
        for &e in experts {
            let e_us = e as usize;
            if let Some(slot) = self.cache.lookup(layer, e_us) {
                let s = slot as usize;
                if self.states.get(slot) == FAILED {
                    return Err(self.failure(slot, layer, e_us));
                }
                if self.cache.prefetched[s] {
                    self.cache.prefetched[s] = false;
                    self.stats[layer].prefetch_hits += 1;
                } else {
                    self.stats[layer].hits += 1;
                }
                self.cache.pins[s] += 1;
                self.cache.touch(slot);
                granted.push(e);
                continue;
            }
            let states = &self.states;
            let Some(slot) = self.cache.victim(|s| states.get(s) != LOADING, |_| true) else {
                break;
            };
            self.load(slot, layer, e_us);
            self.stats[layer].misses += 1;
            self.cache.pins[slot as usize] += 1;
            self.cache.touch(slot);
            granted.push(e);
        }
        Ok(())
    }

    fn failure(&self, slot: u32, layer: usize, expert: usize) -> StoreError {
        let errors = self.states.errors.lock().unwrap_or_else(|p| p.into_inner());
        let message = errors
            .iter()
            .rev()
            .find(|(s, _)| *s == slot)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| "unknown error".into());
        StoreError::Read {
            layer,
            expert,
            message,
        }
    }

    /// Pins those of `experts` (of `layer`) whose bytes are in the arena
    /// already, appending them to `granted`: no read is started and
    /// nothing is counted (the GPU tier's prefetch copies only what the
    /// host holds). Release them as [`ExpertStore::acquire`]'s.
    pub fn acquire_resident(&mut self, layer: usize, experts: &[u32], granted: &mut Vec<u32>) {
        for &e in experts {
            let Some(slot) = self.cache.lookup(layer, e as usize) else {
                continue;
            };
            if self.states.get(slot) == READY {
                self.cache.pins[slot as usize] += 1;
                self.cache.touch(slot);
                granted.push(e);
            }
        }
    }

    /// Whether an acquired expert's bytes have arrived (an error if its
    /// read failed).
    pub fn ready(&self, layer: usize, expert: u32) -> Result<bool, StoreError> {
        let Some(slot) = self.cache.lookup(layer, expert as usize) else {
            return Ok(false);
        };
        match self.states.get(slot) {
            READY => Ok(true),
            FAILED => Err(self.failure(slot, layer, expert as usize)),
            _ => Ok(false),
        }
    }

    /// Blocks until at least one of `experts` is ready or failed; the time
    /// waited counts as stall time of `layer`.
    pub fn wait_any(&mut self, layer: usize, experts: &[u32]) {
        let t0 = Instant::now();
        let slots: Vec<u32> = experts
            .iter()
            .filter_map(|&e| self.cache.lookup(layer, e as usize))
            .collect();
        let states = &self.states;
        states.wait_until(|| {
            slots
                .iter()
                .any(|&s| matches!(states.get(s), READY | FAILED))
        });
        self.stats[layer].stall_ns += t0.elapsed().as_nanos() as u64;
    }

    /// The weights of an acquired, ready expert.
    pub fn view(&self, layer: usize, expert: u32) -> ExpertView<'_> {
        let slot = self
            .cache
            .lookup(layer, expert as usize)
            .filter(|&s| self.states.get(s) == READY && self.cache.pins[s as usize] > 0);
        let Some(slot) = slot else {
            panic!("expert {expert} of layer {layer} viewed before it was acquired and ready");
        };
        let x = &self.layers[layer][expert as usize];
        let mut i = 0;
        let mut matrix = |w: &WeightRef| {
            let bytes: Vec<&[u8]> = w
                .parts
                .iter()
                .map(|s| {
                    let (_, _, delta) = io::window(s.offset, s.len);
                    let at = self.part_dst[i] + delta as usize;
                    i += 1;
                    // SAFETY: the slot is READY (its reader finished, with a
                    // Release store seen by our Acquire load) and pinned, so
                    // nothing writes it while the view lives.
                    unsafe { self.arena.bytes(slot as usize, at, s.len as usize) }
                })
                .collect();
            w.matrix(&bytes, self.interleaved(w))
        };
        let gate = matrix(&x.gate);
        let up = matrix(&x.up);
        let down = matrix(&x.down);
        ExpertView { gate, up, down }
    }

    /// Whether an expert matrix is interleaved in its slot.
    fn interleaved(&self, w: &WeightRef) -> bool {
        match (w.ty, w.parts.len(), self.interleave_for) {
            (TensorType::Ggml(ty), 1, Some(level)) => wants_interleaved(ty, w.rows, w.cols, level),
            _ => false,
        }
    }

    /// Unpins experts after use.
    pub fn release(&mut self, layer: usize, experts: &[u32]) {
        for &e in experts {
            if let Some(slot) = self.cache.lookup(layer, e as usize) {
                let p = &mut self.cache.pins[slot as usize];
                *p = p.saturating_sub(1);
                if self.states.get(slot) == FAILED {
                    self.cache.clear(slot);
                }
            }
        }
    }

    /// Starts reading experts predicted to be needed soon, into slots that
    /// are neither pinned nor holding an expert of `keep_layer` (the layer
    /// being computed) — so a prefetch never evicts what the current layer
    /// needs. Returns how many reads were started.
    pub fn prefetch(&mut self, layer: usize, experts: &[u32], keep_layer: Option<usize>) -> usize {
        let mut started = 0;
        for &e in experts {
            if self.cache.lookup(layer, e as usize).is_some() {
                continue;
            }
            let (states, cache) = (&self.states, &self.cache);
            let allowed = |s: u32| match cache.owner[s as usize] {
                Some((l, _)) => Some(l as usize) != keep_layer && l as usize != layer,
                None => true,
            };
            let Some(slot) = cache.victim(|s| states.get(s) != LOADING, allowed) else {
                break;
            };
            self.load(slot, layer, e as usize);
            self.cache.prefetched[slot as usize] = true;
            self.stats[layer].prefetched += 1;
            started += 1;
        }
        started
    }

    /// Reads experts into the slots no expert holds yet, layer by layer,
    /// until every expert is resident or the free slots run out; never
    /// evicts. Calls `progress(done, total)` (experts) as reads complete.
    /// Returns how many experts were read.
    ///
    /// When the plan holds every expert this makes the model resident up
    /// front, as a model loader that maps the whole file would, instead of
    /// paying each expert's first read inside a forward step.
    pub fn preload(&mut self, mut progress: impl FnMut(usize, usize)) -> Result<usize, StoreError> {
        let mut free =
            (0..self.arena.n_slots() as u32).filter(|&s| self.cache.owner[s as usize].is_none());
        let mut todo = Vec::new();
        'fill: for (layer, experts) in self.layers.iter().enumerate() {
            for e in 0..experts.len() {
                if self.cache.lookup(layer, e).is_some() {
                    continue;
                }
                let Some(slot) = free.next() else { break 'fill };
                todo.push((slot, layer, e));
            }
        }
        drop(free);
        // Queue in batches so that progress can be reported while the
        // readers work through them.
        const BATCH: usize = 64;
        for (i, batch) in todo.chunks(BATCH).enumerate() {
            for &(slot, layer, e) in batch {
                self.load(slot, layer, e);
            }
            self.settle();
            for &(slot, layer, e) in batch {
                if self.states.get(slot) == FAILED {
                    let err = self.failure(slot, layer, e);
                    self.cache.clear(slot);
                    return Err(err);
                }
            }
            progress((i * BATCH + batch.len()).min(todo.len()), todo.len());
        }
        Ok(todo.len())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        let mut total = LayerStats::default();
        for l in &self.stats {
            total.add(l);
        }
        let c = &self.reader.counters;
        StoreStats {
            layers: self.stats.clone(),
            total,
            slots: self.arena.n_slots(),
            resident: (0..self.layers.len()).map(|l| self.cache.resident(l)).sum(),
            reads: c.reads.load(Ordering::Relaxed),
            read_busy_s: c.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            io: self.reader.mode.name(),
        }
    }

    /// The slot memory, to be read by others than the store (a GPU that
    /// copies experts from it by itself): the `Arc` keeps the allocation
    /// alive for them after the store is gone. Which bytes may be read
    /// when is still the store's to say (acquire, `view`, release).
    pub fn arena(&self) -> Arc<Arena> {
        self.arena.clone()
    }

    /// Waits for every read in flight (so a snapshot or a drop sees settled
    /// slots).
    pub fn settle(&self) {
        let states = &self.states;
        states.wait_until(|| (0..self.arena.n_slots()).all(|s| states.get(s as u32) != LOADING));
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        // Readers write into the arena: let them finish before it is freed.
        self.settle();
    }
}
