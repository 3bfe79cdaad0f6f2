//! The GPU tier of the expert store: a fixed arena of equal-sized expert
//! slots in GPU memory, fed from the host tier ([`ExpertStore`]).
//!
//! Slots live in a few large pool buffers (each within the adapter's
//! largest storage binding and 2 GiB, so byte offsets fit a kernel's u32),
//! so that one dispatch can compute a whole layer's experts from a job
//! table of offsets (see `matmul.wgsl`) instead of one dispatch per expert
//! and matrix. A slot holds one routed expert's gate, up and down arrays in
//! their file format (one array per matrix for GGML; weights, scales and
//! biases for MLX), each at a fixed offset, sized for the largest expert of
//! the model, so any expert fits any slot.
//!
//! A host-side map `(layer, expert) → slot` finds residents. When every
//! expert of the model has a slot, expert `e` of layer `l` always takes
//! slot `first[l] + e`, so a layer's experts sit together (in one or two
//! pools: one or two dispatches per product). Otherwise a miss takes the
//! least recently used unpinned slot, and its bytes come from the host
//! store (acquire, wait, view, `Queue::write_buffer`, release) — or, where
//! the host arena is imported ([`HostMemory`]), from a copy command that
//! the GPU runs (acquire, wait, view, copy, submit; released once the copy
//! is done: [`GpuExperts::settle`]).
//!
//! Reading in place ([`GpuExperts::reading_in_place`]): on an adapter
//! whose memory is the host's (an integrated GPU, lavapipe), with the
//! arena imported as storage buffers, a missing expert is not copied into
//! a slot: the kernels read it from its host slot, which stays acquired
//! until the GPU has finished the work that reads it. The arena then only
//! holds the experts that cannot be read so (one in a piece of the arena
//! the driver did not import, or with an array off a word), or a model
//! whose experts all fit, which the GPU routes by itself.
//!
//! Ordering rule (why slots are pinned per wave): `write_buffer` lands
//! before the *next* submission, so a slot read by recorded but not yet
//! submitted dispatches must not be rewritten. A wave pins its slots, its
//! dispatches are submitted, and only then may the next wave evict them.
//!
//! Prefetch ([`GpuExperts::prefetch`], where the device has a
//! [`CopyQueue`]): during a streamed decode step the model guesses the
//! next layer's experts and has them copied on the copy queue while the
//! GPU computes. That queue is not ordered with wgpu's, so two rules
//! replace queue order: a prefetch only fills slots no work of the current
//! step has used (every earlier step's work is finished: its logits were
//! read back), and never a slot whose earlier prefetch is still in flight;
//! a wave that uses a prefetched slot makes its submission wait for the
//! copy's semaphore value ([`GpuExperts::take_after`]), and so does the
//! submission of copies into a slot a prefetch filled before.
//!
//! With a copy queue, a wave's misses are copied on it too, ahead of the
//! next layer's prefetch (the queue runs them in order), unless a missed
//! expert's slot was taken from work of this step (`Slot::busy`): those
//! go on wgpu's queue, ordered after that work. On an H100 (the same
//! guesses copied) this kept the copy queue busy 88 % of a decode step at
//! 47.5 GB/s, against 74 % at 31.4 GB/s with the misses copied on wgpu's
//! queue beside it (the two queues' copies share the bus).

use std::collections::{BTreeSet, HashMap};

use std::sync::{Arc, Mutex};

use super::copy_queue::{self, CopyQueue};
use super::device::{lock, Gpu};
use super::host_memory::HostMemory;
use super::kernels::WeightKind;
use super::matrix::{Copies, GpuMatrix, MatShape, MAX_PART_BYTES};
use super::GpuError;
use crate::experts::store::{ExpertRef, ExpertView};
use crate::experts::{ExpertStore, StoreError};
use crate::quant::TensorType;

/// Counters of the GPU tier (defined with the store's other counters).
pub use crate::experts::GpuTierStats as GpuExpertStats;

/// Alignment of an array inside a slot, and of a slot in its pool (bytes):
/// at least every format's [`WeightKind::alignment`].
const ARRAY_ALIGN: u64 = 16;
const SLOT_ALIGN: u64 = 256;

struct Slot {
    owner: Option<(u32, u32)>,
    last_used: u64,
    pinned: bool,
    /// Gate, up and down while an expert is loaded.
    shapes: Option<[MatShape; 3]>,
    /// The copy queue's semaphore value at which its copy into this slot
    /// (a prefetch, or a miss's) lands (0: none since the slot was taken).
    ready_at: u64,
    /// Filled by a prefetch and not used since.
    prefetched: bool,
    /// Claimed from work of the current step, which may still be running:
    /// only wgpu's queue, ordered after that work, may refill it.
    busy: bool,
}

/// Where a slot's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// Index of its pool.
    pub pool: usize,
    /// Byte offset of the slot in the pool.
    pub base: u64,
}

/// The buffer a wave's expert is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A pool of GPU slots.
    Pool(usize),
    /// A piece of the host store's imported arena (read in place).
    Host(usize),
}

/// Where a wave's expert is: its buffer, its matrices' shapes, and the
/// byte offsets in that buffer of each matrix's arrays (gate, up, down;
/// weights, MLX scales, MLX biases; unused where absent).
#[derive(Clone, Copy, Debug)]
pub struct Located {
    pub source: Source,
    pub shapes: [MatShape; 3],
    pub offsets: [[u64; 3]; 3],
}

/// The arena.
pub struct GpuExperts {
    /// Arrays per matrix (1: GGML, 3: MLX).
    arrays: usize,
    /// Bytes of each of the `3 · arrays` arrays of a slot, and where each
    /// starts in the slot.
    array_bytes: Vec<u64>,
    array_off: Vec<u64>,
    /// Bytes from one slot to the next.
    stride: u64,
    per_pool: usize,
    pools: Vec<wgpu::Buffer>,
    /// Whether the pools were made for the copy queue too
    /// ([`copy_queue::shared_storage`]): only then may it write them.
    shared_pools: bool,
    slots: Vec<Slot>,
    /// Every slot in eviction order: `(owned, last_used, slot)`, empty
    /// slots first, then the least recently used, lower slot first on
    /// ties (what a scan for the least of `(owned, last_used)` would
    /// pick). Kept beside `slots` so that taking a slot does not scan
    /// them all: on an H200 host a scan of 1213 slots took ~20 µs, and a
    /// streamed layer takes several (its misses', its prefetches').
    order: BTreeSet<(bool, u64, u32)>,
    /// Slots pinned since the last `unpin_all` (some may have been
    /// unpinned since), so that it does not visit every slot.
    pinned: Vec<u32>,
    map: HashMap<(u32, u32), u32>,
    /// When every expert has a slot: the first slot of each layer.
    fixed: Option<Vec<u32>>,
    /// Whether `fixed` holds and a pool holds whole layers.
    whole_layers: bool,
    /// Whether every expert is loaded (`load_all`).
    loaded: bool,
    clock: u64,
    stats: GpuExpertStats,
    /// The host store's arena, imported so the GPU copies experts from it
    /// (see [`HostMemory`]), once tried at the first upload.
    host: Option<HostMemory>,
    host_tried: bool,
    /// Whether missing experts are read in place from their host slots
    /// (asked for; once the import is tried, whether it allows it).
    in_place: bool,
    /// Experts `(layer, expert)` read in place by work recorded since the
    /// last release: their host slots stay acquired until that work is
    /// submitted and the GPU has finished it ([`GpuExperts::read_in_place`]).
    reading: Vec<(usize, u32)>,
    /// Experts `(layer, expert)` whose copies from their host slots were
    /// submitted (the last such submission: `copies_at`): the host slots
    /// stay acquired until it is done ([`GpuExperts::settle`]), so the
    /// host records the products, and the next layer, while the GPU
    /// copies.
    in_flight: Vec<(usize, u32)>,
    copies_at: Option<wgpu::SubmissionIndex>,
    /// The device's second queue, that prefetches and misses are copied on
    /// ([`CopyQueue`]), taken at the first upload where the host arena is
    /// imported and the pools were made for it.
    copy_queue: Option<Arc<Mutex<CopyQueue>>>,
    /// The copy queue's progress as last read (slots whose copy lands
    /// later are not evicted).
    copy_done: u64,
    /// The value of this arena's last submission to the copy queue.
    copy_last: u64,
    /// Experts `(value, layer, expert)` copied on the copy queue
    /// (prefetches and misses) whose host slots stay acquired until it
    /// passes `value`.
    copying: Vec<(u64, usize, u32)>,
    /// The copy-queue value the next submission must wait for: the
    /// largest `ready_at` of the slots a wave uses or refills that the
    /// copy queue filled (prefetches, and the wave's own misses).
    after: u64,
    /// Prefetches `(step, layer, expert, slot)` whose layer has not been
    /// computed yet: once it is, those it did not use are made the first
    /// to evict, so a wrong guess costs the cache one slot only until the
    /// next eviction (measured: the VRAM hit rate fell 53 → 50 % without).
    ahead: Vec<(u64, usize, u32, u32)>,
}

impl Drop for GpuExperts {
    fn drop(&mut self) {
        // The copy queue writes the pools and reads the host arena behind
        // wgpu's back: both must outlive its copies.
        if let Some(q) = &self.copy_queue {
            if lock(q).wait(self.copy_last).is_err() {
                // A lost device: leak the pools and the host arena rather
                // than free memory a copy may still name.
                std::mem::forget(std::mem::take(&mut self.pools));
                std::mem::forget(self.host.take());
            }
        }
    }
}

/// How many slots to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotCount {
    /// Exactly this many (an allocation failure is an error).
    Exactly(usize),
    /// Up to this many, as many as the device allocates; if it runs out of
    /// memory first, a tenth of what was allocated is given back as
    /// headroom for the driver and later allocations.
    UpTo(usize),
}

impl GpuExperts {
    /// Bytes of each slot array for the experts of `layers` (the largest
    /// of each array over all experts), and the arrays per matrix.
    pub fn slot_layout(layers: &[Vec<ExpertRef>]) -> (usize, Vec<u64>) {
        let mut arrays = 1;
        let mut bytes: Vec<u64> = Vec::new();
        for x in layers.iter().flatten() {
            arrays = arrays.max(x.gate.parts.len());
            let lens = [&x.gate, &x.up, &x.down]
                .into_iter()
                .flat_map(|w| w.parts.iter().map(|s| s.len.next_multiple_of(4).max(4)));
            for (i, len) in lens.enumerate() {
                if i >= bytes.len() {
                    bytes.push(0);
                }
                bytes[i] = bytes[i].max(len);
            }
        }
        (arrays, bytes)
    }

    /// Whether kernels can address every expert of `layers` where the
    /// host store reads it: every array must start on a word (on 16 bytes
    /// for formats the products read in 16-byte loads, see
    /// [`WeightKind::alignment`]), and an array lands in its host slot at its
    /// file offset modulo the slot alignment (a page), so its file offset
    /// must be a multiple of that. (A safetensors file with an unpadded
    /// header fails this for every tensor; a GGUF's data is aligned to 32
    /// bytes unless it says otherwise.)
    pub fn addressable_in_place(layers: &[Vec<ExpertRef>]) -> bool {
        layers.iter().flatten().all(|x| {
            [&x.gate, &x.up, &x.down].into_iter().all(|w| {
                let align = match w.ty {
                    TensorType::Ggml(t) => WeightKind::Ggml(t).alignment(),
                    _ => 4,
                };
                w.parts.iter().all(|s| s.offset.is_multiple_of(align))
            })
        })
    }

    /// An arena of slots with arrays of `array_bytes` (see
    /// [`GpuExperts::slot_layout`]) for layers of `per_layer` experts.
    pub fn new(
        gpu: &Gpu,
        arrays: usize,
        array_bytes: Vec<u64>,
        count: SlotCount,
        per_layer: &[usize],
    ) -> Result<GpuExperts, GpuError> {
        if array_bytes.len() != 3 * arrays {
            return Err(GpuError::Shape {
                kernel: "expert arena",
                detail: format!(
                    "{} arrays for 3 matrices of {arrays} arrays",
                    array_bytes.len()
                ),
            });
        }
        let mut array_off = Vec::with_capacity(array_bytes.len());
        let mut stride = 0u64;
        for &b in &array_bytes {
            array_off.push(stride);
            stride += b.next_multiple_of(ARRAY_ALIGN);
        }
        let stride = stride.next_multiple_of(SLOT_ALIGN).max(SLOT_ALIGN);
        let pool_limit = gpu
            .limits
            .max_binding
            .min(gpu.limits.max_buffer)
            .min(MAX_PART_BYTES);
        if stride > pool_limit {
            return Err(GpuError::TooLarge {
                what: "one expert slot".into(),
                bytes: stride,
                limit: pool_limit,
            });
        }
        let mut per_pool = (pool_limit / stride) as usize;
        let want = match count {
            SlotCount::Exactly(n) | SlotCount::UpTo(n) => n.max(1),
        };
        // With a slot for every expert and layers of equal size, a pool
        // holds whole layers, so that one dispatch covers any of a layer's
        // experts (the GPU's own routing relies on it).
        let total: usize = per_layer.iter().sum();
        let e0 = per_layer.first().copied().unwrap_or(0);
        let whole_layers =
            want >= total && e0 > 0 && per_layer.iter().all(|&e| e == e0) && per_pool >= e0;
        if whole_layers {
            per_pool = per_pool / e0 * e0;
        }
        let n_pools = want.div_ceil(per_pool);
        // Pools for the copy queue too only where experts will stream:
        // fewer slots asked for than experts, or more expert bytes than
        // the device has VRAM (as many slots as allocate are taken then).
        // A resident model keeps wgpu's own buffers.
        let vram = gpu
            .copy
            .as_ref()
            .and_then(|_| copy_queue::vram_bytes(&gpu.device));
        let streams =
            want < total || vram.is_some_and(|v| (total as u64).saturating_mul(stride) > v);
        let shared = match &gpu.copy {
            Some(c) if streams => Some(lock(c).families().to_vec()),
            _ => None,
        };
        let mut pools = Vec::with_capacity(n_pools.min(1 << 16));
        for i in 0..n_pools {
            let slots = per_pool.min(want - i * per_pool);
            let bytes = slots as u64 * stride;
            // With a copy queue and experts to stream, pools both queues
            // use (and that wgpu never zero-fills behind the copies).
            let pool = match &shared {
                Some(families) => copy_queue::shared_storage(gpu, "expert pool", bytes, families),
                None => gpu.storage("expert pool", &[], bytes),
            };
            match pool {
                Ok(b) => pools.push(b),
                Err(e @ GpuError::OutOfMemory(_)) if matches!(count, SlotCount::UpTo(_)) => {
                    if i == 0 {
                        return Err(e);
                    }
                    pools.truncate((i - i / 10).max(1));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let n_slots = want.min(pools.len() * per_pool);
        let slots: Vec<Slot> = (0..n_slots)
            .map(|_| Slot {
                owner: None,
                last_used: 0,
                pinned: false,
                shapes: None,
                ready_at: 0,
                prefetched: false,
                busy: false,
            })
            .collect();
        let fixed = (n_slots >= total).then(|| {
            let mut first = Vec::with_capacity(per_layer.len());
            let mut at = 0u32;
            for &n in per_layer {
                first.push(at);
                at += n as u32;
            }
            first
        });
        let slot_bytes = array_bytes.iter().sum();
        Ok(GpuExperts {
            arrays,
            array_bytes,
            array_off,
            stride,
            per_pool,
            stats: GpuExpertStats {
                slots: slots.len(),
                slot_bytes,
                ..Default::default()
            },
            pools,
            shared_pools: shared.is_some(),
            order: (0..n_slots as u32).map(|s| (false, 0, s)).collect(),
            pinned: Vec::new(),
            slots,
            map: HashMap::new(),
            whole_layers: whole_layers && n_slots >= total,
            loaded: false,
            fixed,
            clock: 0,
            host: None,
            host_tried: false,
            in_place: false,
            reading: Vec::new(),
            in_flight: Vec::new(),
            copies_at: None,
            copy_queue: None,
            copy_done: 0,
            copy_last: 0,
            copying: Vec::new(),
            after: 0,
            ahead: Vec::new(),
        })
    }

    /// Asks for missing experts to be read in place from the host store's
    /// slots where the device allows it (see the module's notes), instead
    /// of copied into GPU slots.
    pub fn reading_in_place(mut self, on: bool) -> GpuExperts {
        self.in_place = on;
        self
    }

    /// Whether missing experts are read in place: asked for, and (once
    /// [`GpuExperts::import_host`] has run) the arena imported so.
    pub fn reads_in_place(&self) -> bool {
        self.in_place
    }

    /// Imports the host store's arena, once (at the first upload or read
    /// in place): copies from it are then the GPU's, and reads in place
    /// possible where it was imported as storage buffers.
    pub fn import_host(&mut self, gpu: &Gpu, store: &ExpertStore) {
        if self.host_tried {
            return;
        }
        self.host_tried = true;
        self.host = HostMemory::import(gpu, store.arena(), self.in_place);
        self.in_place &= self.host.as_ref().is_some_and(HostMemory::storage);
        // The copy queue only copies into pools, which reads in place do
        // not fill.
        if self.host.is_some() && self.shared_pools && !self.in_place {
            self.copy_queue = gpu.copy.clone();
        }
    }

    /// Where the expert in `slot` is.
    pub fn located(&self, slot: u32) -> Result<Located, GpuError> {
        let place = self.place(slot);
        Ok(Located {
            source: Source::Pool(place.pool),
            shapes: *self.shapes(slot)?,
            offsets: [0, 1, 2].map(|m| self.matrix_offsets(m).map(|o| place.base + o)),
        })
    }

    /// The buffer of `source`.
    pub fn source(&self, source: Source) -> Result<&wgpu::Buffer, GpuError> {
        match (source, &self.host) {
            (Source::Pool(i), _) => Ok(&self.pools[i]),
            (Source::Host(i), Some(h)) => Ok(h.chunk(i)),
            (Source::Host(_), None) => Err(GpuError::Shape {
                kernel: "expert arena",
                detail: "an expert read in place without an imported host arena".into(),
            }),
        }
    }

    /// Reads what it can of `experts` (missing from layer `layer`) in
    /// place: acquires their host slots (as many as the store grants),
    /// waits for their reads, and adds each to `out` with where it lies.
    /// Those that cannot be read in place (see [`HostMemory::in_place`])
    /// go to `copy`, for a GPU slot; those the store did not grant are in
    /// neither, for a later wave. Experts read in place by earlier waves
    /// or layers are given back first, once the GPU has finished: the
    /// caller must have submitted every dispatch that reads them (a wave's
    /// work is, before the next wave; a layer's, before the next layer's
    /// routing is read back), since only submitted work is waited for.
    pub fn read_in_place(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        experts: &[u32],
        out: &mut Vec<(u32, Located)>,
        copy: &mut Vec<u32>,
    ) -> Result<(), crate::Error> {
        self.import_host(gpu, store);
        // Earlier work read them: every submission so far is finished
        // after this wait (in a decode step the GPU is already idle: it
        // has just returned this layer's routing).
        self.release_read(gpu, store)?;
        if experts.is_empty() {
            return Ok(());
        }
        let mut granted = Vec::new();
        self.acquire_some(
            gpu,
            store,
            layer,
            experts,
            &mut granted,
            "read an expert in place",
        )?;
        let mut pending = granted;
        let mut ready = Vec::new();
        while !pending.is_empty() {
            wait_ready(store, layer, &pending, &mut ready)?;
            // `pending` keeps those not ready yet; `ready` is handled here.
            pending.retain(|e| !ready.contains(e));
            for (i, &e) in ready.iter().enumerate() {
                let found = self.locate_in_place(&store.view(layer, e));
                match found {
                    Ok(Some((at, bytes))) => {
                        self.reading.push((layer, e));
                        self.stats.misses += 1;
                        self.stats.read_in_place += 1;
                        self.stats.bytes_read_in_place += bytes;
                        out.push((e, at));
                    }
                    Ok(None) => {
                        store.release(layer, &[e]);
                        copy.push(e);
                    }
                    Err(err) => {
                        // Those read in place so far go back at the next
                        // release; the rest now.
                        store.release(layer, &ready[i..]);
                        store.release(layer, &pending);
                        return Err(err.into());
                    }
                }
            }
        }
        Ok(())
    }

    /// Where the kernels read `x` in place, and its bytes; `None` when it
    /// is not in the imported storage pieces as they need it.
    fn locate_in_place(&self, x: &ExpertView<'_>) -> Result<Option<(Located, u64)>, GpuError> {
        let Some(host) = self.host.as_ref().filter(|h| h.storage()) else {
            return Ok(None);
        };
        let mut shapes = Vec::with_capacity(3);
        let mut arrays: Vec<&[u8]> = Vec::new();
        let mut counts = Vec::with_capacity(3);
        for m in [&x.gate, &x.up, &x.down] {
            let (shape, a) = GpuMatrix::expert_arrays(m)?;
            shapes.push(shape);
            counts.push(a.len());
            arrays.extend(a);
        }
        if shapes[0] != shapes[1] {
            return Err(gate_up_differ(&shapes[0], &shapes[1]));
        }
        let Some((chunk, at)) = host.in_place(&arrays) else {
            return Ok(None);
        };
        // A matrix's first array (its weights) on the format's alignment:
        // `in_place` checks words only (MLX's scales and biases need no
        // more). Under `MOEFLUX_GPU_IN_PLACE=always` this is the only check.
        let mut first = 0;
        for (shape, &n) in shapes.iter().zip(&counts) {
            if at
                .get(first)
                .is_some_and(|o| !o.is_multiple_of(shape.kind.alignment()))
            {
                return Ok(None);
            }
            first += n;
        }
        // Gate's arrays, then up's, then down's (1 each for GGML, 3 for MLX).
        let mut offsets = [[0u64; 3]; 3];
        let mut at = at.into_iter();
        for (row, &n) in offsets.iter_mut().zip(&counts) {
            for (o, a) in row.iter_mut().take(n).zip(at.by_ref()) {
                *o = a;
            }
        }
        let bytes = arrays.iter().map(|a| a.len() as u64).sum();
        let located = Located {
            source: Source::Host(chunk),
            shapes: [shapes[0], shapes[1], shapes[2]],
            offsets,
        };
        Ok(Some((located, bytes)))
    }

    /// Pins as many of `experts` (of `layer`) in the host store as it
    /// grants, appending them to `granted`; if every free host slot holds a
    /// copy in flight, those copies are waited for and their slots given
    /// back first. An error when none can be pinned, saying what for.
    fn acquire_some(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        experts: &[u32],
        granted: &mut Vec<u32>,
        what: &str,
    ) -> Result<(), crate::Error> {
        let before = granted.len();
        acquire(store, layer, experts, granted)?;
        if granted.len() == before && !(self.in_flight.is_empty() && self.copying.is_empty()) {
            self.settle_all_copies(gpu, store)?;
            acquire(store, layer, experts, granted)?;
        }
        if granted.len() == before {
            return Err(StoreError::Setup(format!("no host expert slot is free to {what}")).into());
        }
        Ok(())
    }

    /// Gives back the host slots of experts read in place, once the GPU
    /// has finished every submission.
    fn release_read(&mut self, gpu: &Gpu, store: &mut ExpertStore) -> Result<(), GpuError> {
        if self.reading.is_empty() {
            return Ok(());
        }
        gpu.wait()?;
        release_pairs(store, &mut self.reading);
        Ok(())
    }

    /// Whether every expert of the model is loaded, each layer's in one
    /// pool (see [`GpuExperts::load_all`]): the GPU may then route by
    /// itself.
    pub fn all_resident(&self) -> bool {
        self.loaded
    }

    /// The pool and the first slot (counted within that pool) of layer
    /// `l`'s experts, when every expert has its own slot and a pool holds
    /// whole layers.
    pub fn layer_place(&self, l: usize) -> Option<(usize, u32)> {
        if !self.whole_layers {
            return None;
        }
        let first = *self.fixed.as_ref()?.get(l)? as usize;
        Some((first / self.per_pool, (first % self.per_pool) as u32))
    }

    /// Bytes from one slot to the next in a pool.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// Loads every expert of every layer into its own slot, when every
    /// expert has one and a pool holds whole layers (else does nothing):
    /// afterwards [`GpuExperts::all_resident`] unless a layer's experts
    /// differ in shape (then the host routes, and this is not tried again).
    /// Submits (empty) work after each layer and waits every eight, so the
    /// queued writes' staging memory stays within eight layers' experts.
    pub fn load_all(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        per_layer: &[usize],
    ) -> Result<(), crate::Error> {
        if self.loaded || !self.whole_layers {
            return Ok(());
        }
        for (l, &n) in per_layer.iter().enumerate() {
            let mut misses = Vec::new();
            for e in 0..n as u32 {
                if self.map.contains_key(&(l as u32, e)) {
                    continue;
                }
                if let Some(s) = self.claim(l, e) {
                    misses.push((e, s));
                }
            }
            self.upload(gpu, store, l, &misses)?;
            self.unpin_all();
            // After the copy queue's copies, if `upload` made any.
            gpu.submit("uploading experts", Vec::new(), self.take_after())?;
            if l % 8 == 7 {
                gpu.wait()?;
            }
        }
        gpu.wait()?;
        self.settle(gpu, store)?;
        // One dispatch computes a layer's experts with one shape: the GPU
        // routes only when every layer's experts share theirs.
        let same = (0..per_layer.len()).all(|l| {
            let first = self.fixed.as_ref().and_then(|f| f.get(l)).copied();
            let n = per_layer[l] as u32;
            first.is_some_and(|f| {
                let s0 = self.shapes(f).ok().copied();
                s0.is_some() && (f..f + n).all(|s| self.shapes(s).ok().copied() == s0)
            })
        });
        self.loaded = same;
        // Not again on every step.
        self.whole_layers = same;
        Ok(())
    }

    /// Gate, up and down shapes of layer `l`'s experts, once
    /// [`GpuExperts::all_resident`].
    pub fn layer_shapes(&self, l: usize) -> Result<[MatShape; 3], GpuError> {
        let first = self.fixed.as_ref().and_then(|f| f.get(l)).copied();
        match first {
            Some(f) if self.loaded => self.shapes(f).copied(),
            _ => Err(GpuError::Shape {
                kernel: "expert arena",
                detail: format!("layer {l}'s experts are not all resident"),
            }),
        }
    }

    /// Counts `n` hits that the GPU's own routing made (every expert is
    /// resident, so every use is one).
    pub fn count_hits(&mut self, n: usize) {
        self.stats.hits += n as u64;
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    pub fn stats(&self) -> GpuExpertStats {
        self.stats
    }

    /// Bytes of the pool buffers (every slot, with alignment).
    pub fn pool_bytes(&self) -> u64 {
        self.pools.iter().map(|p| p.size()).sum()
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> u64 {
        self.array_bytes.iter().sum()
    }

    /// Byte offsets in a slot of matrix `m`'s arrays (0: gate, 1: up, 2:
    /// down; weights, MLX scales, MLX biases; zero where absent).
    pub fn matrix_offsets(&self, m: usize) -> [u64; 3] {
        std::array::from_fn(|a| {
            if a < self.arrays {
                self.array_off[m * self.arrays + a]
            } else {
                0
            }
        })
    }

    /// Where slot `slot` is.
    pub fn place(&self, slot: u32) -> Place {
        let s = slot as usize;
        Place {
            pool: s / self.per_pool,
            base: (s % self.per_pool) as u64 * self.stride,
        }
    }

    /// Pool `i`'s buffer.
    pub fn pool(&self, i: usize) -> &wgpu::Buffer {
        &self.pools[i]
    }

    /// Ends a wave: every slot may be evicted again.
    pub fn unpin_all(&mut self) {
        for slot in self.pinned.drain(..) {
            self.slots[slot as usize].pinned = false;
        }
    }

    /// Pins `slot` for this wave.
    fn pin(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if !s.pinned {
            s.pinned = true;
            self.pinned.push(slot);
        }
    }

    /// Waits for the experts' copies in flight, those on the copy queue
    /// included, then releases their host slots to the store. Cheap once
    /// the GPU has finished them (a step's logits wait for all earlier
    /// work on wgpu's queue, which waited for the copy queue's copies of
    /// the step's misses; prefetches are for the step's own layers).
    pub fn settle(&mut self, gpu: &Gpu, store: &mut ExpertStore) -> Result<(), GpuError> {
        self.settle_all_copies(gpu, store)?;
        self.release_read(gpu, store)
    }

    /// [`GpuExperts::settle`] but for experts read in place: mid-wave,
    /// those of the wave being recorded are not in any submission yet.
    fn settle_all_copies(&mut self, gpu: &Gpu, store: &mut ExpertStore) -> Result<(), GpuError> {
        if let Some(q) = &self.copy_queue {
            lock(q).wait(self.copy_last)?;
        }
        self.settle_copies(gpu, store)
    }

    /// Reads the copy queue's progress into `copy_done` and gives the host
    /// slots of the copies it has finished back to the store.
    fn poll_copy_queue(&mut self, store: &mut ExpertStore) -> Result<(), GpuError> {
        let Some(q) = &self.copy_queue else {
            return Ok(());
        };
        self.copy_done = lock(q).done()?;
        let done = self.copy_done;
        let mut finished: Vec<(usize, u32)> = Vec::new();
        self.copying.retain(|&(v, l, e)| {
            let over = v <= done;
            if over {
                finished.push((l, e));
            }
            !over
        });
        release_pairs(store, &mut finished);
        Ok(())
    }

    /// [`GpuExperts::settle`] for the copies on wgpu's queue only (waited
    /// for); copies the copy queue has finished give their host slots
    /// back too, the others are not waited for.
    fn settle_copies(&mut self, gpu: &Gpu, store: &mut ExpertStore) -> Result<(), GpuError> {
        self.poll_copy_queue(store)?;
        if let Some(at) = self.copies_at.clone() {
            gpu.device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(at),
                    timeout: None,
                })
                .map_err(|e| GpuError::Wgpu(format!("waiting for expert copies: {e}")))?;
            self.copies_at = None;
        }
        release_pairs(store, &mut self.in_flight);
        Ok(())
    }

    /// Advances the recency clock (once per forward step).
    pub fn tick(&mut self) {
        self.clock += 1;
    }

    /// The slot of a resident expert, pinned for this wave (a hit).
    pub fn hit(&mut self, layer: usize, expert: u32) -> Option<u32> {
        let slot = *self.map.get(&(layer as u32, expert))?;
        self.reorder(slot, true, self.clock);
        self.pin(slot);
        let s = &mut self.slots[slot as usize];
        if s.prefetched {
            // A miss the prefetch brought in ahead of time.
            s.prefetched = false;
            self.stats.misses += 1;
            self.stats.prefetch_hits += 1;
        } else {
            self.stats.hits += 1;
        }
        // Even a copy known done: the wait makes its writes visible to
        // wgpu's queue (staged once per value, see `CopyQueue::stage`).
        self.after = self.after.max(s.ready_at);
        Some(slot)
    }

    /// The copy-queue value the next submission must wait for (0: none):
    /// that of the prefetches filling the slots hit or claimed since the
    /// last call, and of the misses [`GpuExperts::upload`] copied on the
    /// copy queue. Its copies on wgpu's queue wait for it; what is left
    /// goes to the pass that reads the slots
    /// ([`super::pass::Pass::after_copies`]).
    pub fn take_after(&mut self) -> u64 {
        std::mem::take(&mut self.after)
    }

    /// The copy queue's progress, read now (the host slots of the copies
    /// it finished go back to the store): copies up to this value have
    /// landed. No copy queue: `u64::MAX`.
    pub fn copies_landed(&mut self, store: &mut ExpertStore) -> Result<u64, GpuError> {
        if self.copy_queue.is_none() {
            return Ok(u64::MAX);
        }
        self.poll_copy_queue(store)?;
        Ok(self.copy_done)
    }

    /// The copy-queue value at which `slot`'s last copy lands (0: none).
    pub fn ready_at(&self, slot: u32) -> u64 {
        self.slots[slot as usize].ready_at
    }

    /// Whether [`GpuExperts::prefetch`] can copy anything: the device has
    /// a copy queue and the host arena is imported (both are set up at the
    /// first upload).
    pub fn can_prefetch(&self) -> bool {
        self.copy_queue.is_some() && self.host.is_some()
    }

    /// Whether the copy queue has finished everything submitted to it (no
    /// copy queue: false).
    pub fn copy_queue_idle(&mut self) -> Result<bool, GpuError> {
        let Some(q) = &self.copy_queue else {
            return Ok(false);
        };
        self.copy_done = lock(q).done()?;
        Ok(self.copy_done >= self.copy_last)
    }

    /// A slot for a missing expert: its own when every expert has one,
    /// else a free one, else the least recently used unpinned one
    /// (evicted); pinned; never one the copy queue is still filling (if those
    /// are all that is left, their copies are waited for). `None` when
    /// every slot is pinned by this wave (or that wait failed). The caller
    /// must [`GpuExperts::fill`] it before submitting.
    pub fn claim(&mut self, layer: usize, expert: u32) -> Option<u32> {
        let slot = match self.take_slot(layer, expert, false) {
            Some(s) => Some(s),
            // Every other slot may be waiting for a prefetch: wait for them.
            None => match &self.copy_queue {
                Some(q) if self.copy_last > self.copy_done => {
                    // A failed wait leaves the slots to their prefetches.
                    lock(q).wait(self.copy_last).ok()?;
                    self.copy_done = self.copy_last;
                    self.take_slot(layer, expert, false)
                }
                _ => None,
            },
        }?;
        self.stats.misses += 1;
        Some(slot)
    }

    /// A slot for `expert` of `layer` (see [`GpuExperts::claim`]), taken
    /// from its owner; with `idle`, only a slot this step's work has not
    /// used (`last_used` before this step), so that nothing submitted and
    /// unfinished reads it (earlier steps' work is done: their logits were
    /// read back). Never a slot the copy queue is still filling.
    fn take_slot(&mut self, layer: usize, expert: u32, idle: bool) -> Option<u32> {
        let (clock, done) = (self.clock, self.copy_done);
        let own = self
            .fixed
            .as_ref()
            .and_then(|f| f.get(layer))
            .map(|&first| first + expert)
            .filter(|&s| (s as usize) < self.slots.len());
        let usable = |s: &Slot| !s.pinned && s.ready_at <= done && (!idle || s.last_used < clock);
        let slot = match own {
            Some(s) if !idle || usable(&self.slots[s as usize]) => s,
            Some(_) => return None,
            // The first usable slot in eviction order. Those passed over
            // are few: this wave's (pinned), those the copy queue is
            // filling, and (with `idle`) those this step used, all used at
            // `clock`, the order's end.
            None => self
                .order
                .iter()
                .map(|&(_, _, s)| s)
                .find(|&s| usable(&self.slots[s as usize]))?,
        };
        let busy = self.slots[slot as usize].last_used >= clock;
        self.reorder(slot, true, clock);
        self.pin(slot);
        let s = &mut self.slots[slot as usize];
        if let Some(old) = s.owner.take() {
            self.map.remove(&old);
        }
        if !idle {
            // Refilled on wgpu's queue after the copy queue wrote it.
            self.after = self.after.max(s.ready_at);
        }
        s.shapes = None;
        s.busy = busy;
        s.ready_at = 0;
        s.prefetched = false;
        s.owner = Some((layer as u32, expert));
        self.map.insert((layer as u32, expert), slot);
        Some(slot)
    }

    /// Writes an expert's matrices into its claimed slot.
    pub fn fill(&mut self, gpu: &Gpu, slot: u32, x: &ExpertView<'_>) -> Result<(), GpuError> {
        self.fill_via(gpu, slot, x, None)
    }

    /// [`GpuExperts::fill`], the arrays in imported host memory copied by
    /// the commands recorded into `copies` instead.
    fn fill_via(
        &mut self,
        gpu: &Gpu,
        slot: u32,
        x: &ExpertView<'_>,
        mut copies: Option<&mut Copies<'_>>,
    ) -> Result<(), GpuError> {
        let a = self.arrays;
        let place = self.place(slot);
        let buf = &self.pools[place.pool];
        let at: Vec<u64> = self.array_off.iter().map(|o| place.base + o).collect();
        let mut write = |m: &crate::backend::cpu::Matrix<'_>, i: usize| {
            let r = i * a..(i + 1) * a;
            let c = copies.as_deref_mut();
            GpuMatrix::write_at(gpu, m, buf, &at[r.clone()], &self.array_bytes[r], c)
        };
        let result = (|| {
            let m = [write(&x.gate, 0)?, write(&x.up, 1)?, write(&x.down, 2)?];
            if m[0] != m[1] {
                return Err(gate_up_differ(&m[0], &m[1]));
            }
            Ok(m)
        })();
        match result {
            Ok(m) => {
                self.stats.bytes_uploaded += [&x.gate, &x.up, &x.down]
                    .into_iter()
                    .flat_map(GpuMatrix::array_bytes)
                    .sum::<u64>();
                self.slots[slot as usize].shapes = Some(m);
                Ok(())
            }
            Err(e) => {
                self.forget(slot);
                Err(e)
            }
        }
    }

    /// Sets `slot`'s place in the eviction order (`order`): whether it
    /// will have an owner, and when it was last used (its `last_used`).
    fn reorder(&mut self, slot: u32, owned: bool, last_used: u64) {
        let s = &mut self.slots[slot as usize];
        let had = self.order.remove(&(s.owner.is_some(), s.last_used, slot));
        debug_assert!(had, "slot {slot} out of the eviction order");
        s.last_used = last_used;
        self.order.insert((owned, last_used, slot));
    }

    /// Marks `slot` as holding no expert (its bytes are not what its owner
    /// needs): forgets its owner and shapes.
    fn forget(&mut self, slot: u32) {
        self.reorder(slot, false, self.slots[slot as usize].last_used);
        let s = &mut self.slots[slot as usize];
        s.shapes = None;
        if let Some(old) = s.owner.take() {
            self.map.remove(&old);
        }
    }

    /// Gate, up and down of the expert in `slot`.
    pub fn shapes(&self, slot: u32) -> Result<&[MatShape; 3], GpuError> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.shapes.as_ref())
            .ok_or_else(|| GpuError::Shape {
                kernel: "expert arena",
                detail: format!("slot {slot} holds no expert"),
            })
    }

    /// Copies experts of `layer` that its router is predicted to pick
    /// (`experts`, the next layer's router applied early) into GPU slots
    /// ahead of their use, on the copy queue, while the GPU computes the
    /// current layer. Only experts the host store already holds (no read is
    /// started, and the host cache counts nothing), only into slots no
    /// work of this step used (so nothing submitted still reads them), and
    /// never more than there are such slots. A slot filled so is a miss
    /// when it is used ([`GpuExperts::hit`] counts it, and makes the
    /// compute wait for its copy); one evicted unused was wasted. Does
    /// nothing without a copy queue ([`GpuExperts::can_prefetch`]).
    pub fn prefetch(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        experts: &[u32],
    ) -> Result<(), crate::Error> {
        if self.copy_queue.is_none() {
            return Ok(());
        }
        self.poll_copy_queue(store)?;
        // Earlier layers' guesses are settled (their layers computed): the
        // unused ones go to the front of the eviction order.
        let (clock, mut ahead) = (self.clock, std::mem::take(&mut self.ahead));
        let mut unused = Vec::new();
        ahead.retain(|&(step, l, e, slot)| {
            if step == clock && l >= layer {
                return true;
            }
            let s = &self.slots[slot as usize];
            if s.prefetched && s.owner == Some((l as u32, e)) {
                unused.push(slot);
            }
            false
        });
        self.ahead = ahead;
        for slot in unused {
            self.reorder(slot, true, 0);
        }
        let mut todo: Vec<u32> = Vec::with_capacity(experts.len());
        for &e in experts {
            if !self.map.contains_key(&(layer as u32, e)) && !todo.contains(&e) {
                todo.push(e);
            }
        }
        let mut granted = Vec::new();
        store.acquire_resident(layer, &todo, &mut granted);
        let Some(host) = self.host.take() else {
            store.release(layer, &granted);
            return Ok(());
        };
        let mut copies = Copies {
            host: &host,
            regions: Vec::new(),
        };
        let mut filled: Vec<(u32, u32)> = Vec::new();
        let mut failed = None;
        for &e in &granted {
            let Some(slot) = self.take_slot(layer, e, true) else {
                break;
            };
            // Not part of a wave: later waves may evict it (they wait for
            // its copy first, see `take_slot`).
            self.slots[slot as usize].pinned = false;
            let view = store.view(layer, e);
            if let Err(err) = self.fill_via(gpu, slot, &view, Some(&mut copies)) {
                failed = Some(err);
                break;
            }
            filled.push((e, slot));
        }
        let copied = copies.bytes();
        let regions = std::mem::take(&mut copies.regions);
        drop(copies);
        self.host = Some(host);
        let mut value = 0;
        if failed.is_none() && !regions.is_empty() {
            match self.submit_to_copy_queue(gpu, layer, &filled, &regions, copied) {
                Ok(v) => value = v,
                Err(e) => failed = Some(e),
            }
        }
        if let Some(err) = failed {
            // Nothing was submitted: the slots hold nothing usable.
            for &(_, slot) in &filled {
                self.forget(slot);
            }
            store.release(layer, &granted);
            return Err(err.into());
        }
        for &(e, slot) in &filled {
            self.slots[slot as usize].prefetched = true;
            self.stats.prefetched += 1;
            self.ahead.push((self.clock, layer, e, slot));
        }
        // Host slots not copied from (no GPU slot, or written by the queue
        // at once) go back now.
        let keep: Vec<u32> = if value > 0 {
            filled.iter().map(|f| f.0).collect()
        } else {
            Vec::new()
        };
        let back: Vec<u32> = granted.into_iter().filter(|e| !keep.contains(e)).collect();
        store.release(layer, &back);
        Ok(())
    }

    /// Submits `regions` — `bytes` of copies into the slots of `filled`
    /// (`(expert, slot)` pairs of `layer`) — on the copy queue. The slots
    /// land at the value returned; the host slots the copies read go back
    /// to the store once the queue passes it ([`GpuExperts::poll_copy_queue`]).
    /// The regions' buffers (pools, imports) live as long as the arena,
    /// whose `Drop` waits for the copy queue.
    fn submit_to_copy_queue(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        filled: &[(u32, u32)],
        regions: &[copy_queue::Region],
        bytes: u64,
    ) -> Result<u64, GpuError> {
        let value = gpu.submit_copies(regions)?;
        self.copy_last = value;
        self.stats.bytes_copied_by_gpu += bytes;
        for &(e, slot) in filled {
            self.slots[slot as usize].ready_at = value;
            self.copying.push((value, layer, e));
        }
        Ok(value)
    }

    /// Brings `misses` (`(expert, slot)` pairs of `layer`, claimed) from the
    /// host store into their slots: acquires as many as the host arena
    /// grants, uploads each as its read completes, and releases it — at
    /// once after a queue write, after the copy for a copy by the GPU
    /// ([`GpuExperts::settle`]). Copies on the copy queue make the wave's
    /// submission wait for them ([`GpuExperts::take_after`]).
    pub fn upload(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        misses: &[(u32, u32)],
    ) -> Result<(), crate::Error> {
        let out = self.upload_misses(gpu, store, layer, misses);
        if out.is_err() {
            // Claimed slots left unfilled would otherwise stay mapped to
            // their experts, and every later use would find no expert.
            for &(e, slot) in misses {
                let s = &self.slots[slot as usize];
                if s.owner == Some((layer as u32, e)) && s.shapes.is_none() {
                    self.forget(slot);
                }
            }
        }
        out
    }

    /// [`GpuExperts::upload`], leaving slots unfilled on an error.
    fn upload_misses(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        misses: &[(u32, u32)],
    ) -> Result<(), crate::Error> {
        self.import_host(gpu, store);
        // Host slots of earlier copies go back to the store first (those of
        // the previous layer are done by now: its routing was read back
        // since; a previous wave's or `load_all`'s layer may still be
        // copying, and is waited for; prefetches are not).
        self.settle_copies(gpu, store)?;
        let mut todo: Vec<u32> = misses.iter().map(|m| m.0).collect();
        let slot_of = |e: u32| misses.iter().find(|m| m.0 == e).map_or(0, |m| m.1);
        let mut granted = Vec::new();
        let mut ready = Vec::new();
        while !todo.is_empty() {
            granted.clear();
            let why = "stage an expert for the GPU";
            self.acquire_some(gpu, store, layer, &todo, &mut granted, why)?;
            let mut pending = granted.clone();
            while !pending.is_empty() {
                wait_ready(store, layer, &pending, &mut ready)?;
                let mut failed = None;
                // Experts in imported host memory: copied by the GPU; their
                // host slots are released once the copies are done.
                let host = self.host.take();
                let mut copies = host.as_ref().map(|host| Copies {
                    host,
                    regions: Vec::new(),
                });
                for &e in &ready {
                    let view = store.view(layer, e);
                    if let Err(err) = self.fill_via(gpu, slot_of(e), &view, copies.as_mut()) {
                        failed = Some(err);
                        break;
                    }
                }
                let copied = copies.as_ref().map_or(0, Copies::bytes);
                // On the copy queue where it may write every slot (see
                // `Slot::busy`), else on wgpu's (as are the copies of a
                // round that failed to record: its error path waits for
                // wgpu's queue only).
                let on_copy_queue = failed.is_none()
                    && self.copy_queue.is_some()
                    && ready.iter().all(|&e| !self.slots[slot_of(e) as usize].busy);
                if let (Some(copies), true, true) = (copies.as_ref(), copied > 0, on_copy_queue) {
                    let filled: Vec<(u32, u32)> = ready.iter().map(|&e| (e, slot_of(e))).collect();
                    match self.submit_to_copy_queue(gpu, layer, &filled, &copies.regions, copied) {
                        // The wave's submission waits for it.
                        Ok(value) => self.after = self.after.max(value),
                        Err(err) => {
                            for &e in &ready {
                                self.forget(slot_of(e));
                            }
                            failed = Some(err);
                        }
                    }
                } else if let (Some(copies), true) = (copies, copied > 0) {
                    // Lands after all earlier submissions and before the
                    // next, as the queue writes of the other arrays do.
                    let after = self.take_after();
                    let submit = || {
                        let mut enc =
                            gpu.device
                                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                                    label: Some("expert copies"),
                                });
                        for r in &copies.regions {
                            enc.copy_buffer_to_buffer(&r.src, r.src_at, &r.dst, r.dst_at, r.len);
                        }
                        // After the prefetches of slots this refills.
                        gpu.submit("copying experts", vec![enc.finish()], after)
                    };
                    match submit() {
                        Ok(at) => {
                            self.copies_at = Some(at);
                            self.stats.bytes_copied_by_gpu += copied;
                        }
                        Err(err) => {
                            // The slots were filled only on paper.
                            for &e in &ready {
                                self.forget(slot_of(e));
                            }
                            failed.get_or_insert(err);
                        }
                    }
                }
                self.host = host;
                if let Some(err) = failed {
                    // No copy may still read the host slots given back
                    // (those of earlier rounds go back at the next
                    // settle); the first error is the one to report.
                    let waited = gpu.wait();
                    store.release(layer, &pending);
                    drop(waited);
                    return Err(err.into());
                }
                if copied == 0 {
                    store.release(layer, &ready);
                } else if !on_copy_queue {
                    self.in_flight.extend(ready.iter().map(|&e| (layer, e)));
                }
                pending.retain(|e| !ready.contains(e));
            }
            todo.retain(|e| !granted.contains(e));
        }
        Ok(())
    }
}

/// [`ExpertStore::acquire`], giving back what it pinned before an error
/// (a read that failed), so that no pin outlives the failed step.
fn acquire(
    store: &mut ExpertStore,
    layer: usize,
    experts: &[u32],
    granted: &mut Vec<u32>,
) -> Result<(), StoreError> {
    let before = granted.len();
    let out = store.acquire(layer, experts, granted);
    if out.is_err() {
        store.release(layer, &granted[before..]);
        granted.truncate(before);
    }
    out
}

/// Waits until at least one of `pending` (acquired experts of `layer`) is
/// ready, and puts those that are in `ready`. On a failed read, gives all
/// of `pending` back to the store and returns the error.
fn wait_ready(
    store: &mut ExpertStore,
    layer: usize,
    pending: &[u32],
    ready: &mut Vec<u32>,
) -> Result<(), StoreError> {
    loop {
        ready.clear();
        for &e in pending {
            match store.ready(layer, e) {
                Ok(true) => ready.push(e),
                Ok(false) => {}
                Err(err) => {
                    store.release(layer, pending);
                    return Err(err);
                }
            }
        }
        if !ready.is_empty() {
            return Ok(());
        }
        store.wait_any(layer, pending);
    }
}

/// One dispatch decodes gate and up with one format (SwiGLU): an expert
/// whose two differ is refused.
fn gate_up_differ(gate: &MatShape, up: &MatShape) -> GpuError {
    GpuError::Unsupported(format!(
        "an expert whose gate ({} {}×{}) and up ({} {}×{}) projections differ",
        gate.kind.name(),
        gate.rows,
        gate.cols,
        up.kind.name(),
        up.rows,
        up.cols
    ))
}

/// Gives the host slots of `pairs` (`(layer, expert)`) back to the store,
/// a layer at a time, and empties the list.
fn release_pairs(store: &mut ExpertStore, pairs: &mut Vec<(usize, u32)>) {
    pairs.sort_unstable();
    for run in pairs.chunk_by(|a, b| a.0 == b.0) {
        let experts: Vec<u32> = run.iter().map(|x| x.1).collect();
        store.release(run[0].0, &experts);
    }
    pairs.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Span;
    use crate::model::weights::WeightRef;
    use crate::quant::GgmlType;

    /// An expert whose three matrices are `ty` at file offset `at` each.
    fn expert(ty: GgmlType, at: u64) -> ExpertRef {
        let m = |offset| WeightRef {
            ty: TensorType::Ggml(ty),
            rows: 4,
            cols: 256,
            parts: vec![Span {
                file: 0,
                offset,
                len: 4 * ty.row_bytes(256).unwrap_or(0),
            }],
        };
        ExpertRef {
            gate: m(at),
            up: m(at),
            down: m(at),
        }
    }

    /// Q4_K is read in 16-byte loads, so read in place only from 16-byte
    /// offsets; other formats from any word.
    #[test]
    fn in_place_reads_need_the_formats_alignment() {
        let ok = |ty, at| GpuExperts::addressable_in_place(&[vec![expert(ty, at)]]);
        assert!(ok(GgmlType::Q4_K, 64));
        assert!(!ok(GgmlType::Q4_K, 36), "a word, not 16 bytes");
        assert!(ok(GgmlType::Q4_0, 36));
        assert!(!ok(GgmlType::Q4_0, 34), "not a word");
        // A slot's arrays start where every format may.
        for kind in WeightKind::all() {
            assert!(ARRAY_ALIGN.is_multiple_of(kind.alignment()), "{kind:?}");
        }
    }
}
