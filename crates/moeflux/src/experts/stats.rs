//! What the expert store did: hits, misses, prefetch accuracy, bytes read,
//! read bandwidth and time spent waiting, per layer and in total.

use serde::Serialize;

/// Counters of one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LayerStats {
    /// Requests served from a slot that was already loaded.
    pub hits: u64,
    /// Requests that had to read the expert.
    pub misses: u64,
    /// Requests served by a prefetched expert (loaded or in flight).
    pub prefetch_hits: u64,
    /// Experts read ahead by prefetch.
    pub prefetched: u64,
    /// Bytes of prefetched experts evicted before any request used them.
    pub prefetch_wasted_bytes: u64,
    /// Bytes read from the model file for this layer's experts.
    pub bytes_read: u64,
    /// Time the computation waited for this layer's experts, ns.
    pub stall_ns: u64,
}

impl LayerStats {
    pub fn add(&mut self, o: &LayerStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.prefetch_hits += o.prefetch_hits;
        self.prefetched += o.prefetched;
        self.prefetch_wasted_bytes += o.prefetch_wasted_bytes;
        self.bytes_read += o.bytes_read;
        self.stall_ns += o.stall_ns;
    }

    /// Requests of any kind.
    pub fn requests(&self) -> u64 {
        self.hits + self.misses + self.prefetch_hits
    }

    /// Fraction of requests that did not wait for a read they started.
    pub fn hit_rate(&self) -> f64 {
        (self.hits + self.prefetch_hits) as f64 / self.requests().max(1) as f64
    }
}

/// A snapshot of the store's counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub layers: Vec<LayerStats>,
    pub total: LayerStats,
    /// Slots in the arena and experts they hold now.
    pub slots: usize,
    pub resident: usize,
    /// Read calls and time the reader threads spent in them (summed).
    pub reads: u64,
    pub read_busy_s: f64,
    /// `--io` mode in effect.
    pub io: &'static str,
}

impl StoreStats {
    /// Bytes per second the readers achieved while reading.
    pub fn read_gbps(&self, wall_s: f64) -> f64 {
        if wall_s <= 0.0 {
            return 0.0;
        }
        self.total.bytes_read as f64 / wall_s / 1e9
    }

    /// The counters accumulated since `before`.
    pub fn since(&self, before: &StoreStats) -> StoreStats {
        let sub = |a: &LayerStats, b: &LayerStats| LayerStats {
            hits: a.hits - b.hits,
            misses: a.misses - b.misses,
            prefetch_hits: a.prefetch_hits - b.prefetch_hits,
            prefetched: a.prefetched - b.prefetched,
            prefetch_wasted_bytes: a.prefetch_wasted_bytes - b.prefetch_wasted_bytes,
            bytes_read: a.bytes_read - b.bytes_read,
            stall_ns: a.stall_ns - b.stall_ns,
        };
        let layers: Vec<LayerStats> = self
            .layers
            .iter()
            .zip(
                before
                    .layers
                    .iter()
                    .chain(std::iter::repeat(&LayerStats::default())),
            )
            .map(|(a, b)| sub(a, b))
            .collect();
        StoreStats {
            total: sub(&self.total, &before.total),
            layers,
            slots: self.slots,
            resident: self.resident,
            reads: self.reads - before.reads,
            read_busy_s: self.read_busy_s - before.read_busy_s,
            io: self.io,
        }
    }
}

/// Counters of the GPU expert tier (GPU memory slots fed from the host
/// slots), when the GPU backend runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuTierStats {
    /// Slots in the GPU arena.
    pub slots: usize,
    /// Bytes of one slot.
    pub slot_bytes: u64,
    /// Expert uses served by an expert already in GPU memory (not one a
    /// prefetch brought in for that use).
    pub hits: u64,
    /// Expert uses whose expert had to come from the host tier: uploaded
    /// when its layer asked, or prefetched for it (`prefetch_hits`).
    /// Prefetches no layer used are not counted here.
    pub misses: u64,
    /// Bytes written host → GPU for them.
    pub bytes_uploaded: u64,
    /// Of those, bytes the GPU copied from imported host memory (see
    /// `backend::gpu::host_memory`); the rest the CPU wrote.
    pub bytes_copied_by_gpu: u64,
    /// Of `misses`, those the kernels read in place from their host slots
    /// (an adapter that shares host memory: nothing is copied), and their
    /// bytes (not in `bytes_uploaded`).
    pub read_in_place: u64,
    pub bytes_read_in_place: u64,
    /// Experts copied ahead of their layer, the next layer's router applied
    /// early (see `backend::gpu::experts`); in `bytes_uploaded`.
    pub prefetched: u64,
    /// Of `misses`, those a prefetch had already brought in.
    pub prefetch_hits: u64,
    /// The next layer's guessed experts judged against its real choices,
    /// by the guess's rank (the first [`GUESS_RANKS`] ranks).
    pub guesses_judged: [u64; GUESS_RANKS],
    /// Of those, the guesses the layer chose.
    pub guesses_right: [u64; GUESS_RANKS],
}

/// Ranks of guessed experts counted in [`GpuTierStats`].
pub const GUESS_RANKS: usize = 16;

/// The share of right guesses a rank needs for the GPU backend to copy its
/// guesses ahead (why this value: `backend::gpu::guess`).
pub const GUESS_MIN_PRECISION: f64 = 0.7;

impl GpuTierStats {
    /// Fraction of expert uses served from GPU memory.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// The counters accumulated since `before`.
    pub fn since(&self, before: &GpuTierStats) -> GpuTierStats {
        // Every field named (no `..*self`), so a new counter cannot be
        // left out of the difference unnoticed.
        GpuTierStats {
            slots: self.slots,
            slot_bytes: self.slot_bytes,
            hits: self.hits - before.hits.min(self.hits),
            misses: self.misses - before.misses.min(self.misses),
            bytes_uploaded: self.bytes_uploaded - before.bytes_uploaded.min(self.bytes_uploaded),
            bytes_copied_by_gpu: self.bytes_copied_by_gpu
                - before.bytes_copied_by_gpu.min(self.bytes_copied_by_gpu),
            read_in_place: self.read_in_place - before.read_in_place.min(self.read_in_place),
            bytes_read_in_place: self.bytes_read_in_place
                - before.bytes_read_in_place.min(self.bytes_read_in_place),
            prefetched: self.prefetched - before.prefetched.min(self.prefetched),
            prefetch_hits: self.prefetch_hits - before.prefetch_hits.min(self.prefetch_hits),
            guesses_judged: std::array::from_fn(|r| {
                self.guesses_judged[r] - before.guesses_judged[r].min(self.guesses_judged[r])
            }),
            guesses_right: std::array::from_fn(|r| {
                self.guesses_right[r] - before.guesses_right[r].min(self.guesses_right[r])
            }),
        }
    }
}
