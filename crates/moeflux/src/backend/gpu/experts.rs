//! The GPU tier of the expert store: a fixed arena of equal-sized expert
//! slots in GPU memory, fed from the host tier ([`ExpertStore`]).
//!
//! Each slot holds one routed expert's gate, up and down matrices in their
//! file format (one buffer per array: GGML weights, or MLX weights, scales
//! and biases), sized for the largest expert of the model, so any expert
//! fits any slot. A host-side map `(layer, expert) → slot` finds residents;
//! a miss takes the least recently used unpinned slot, and its bytes come
//! from the host store (acquire, wait, view, `Queue::write_buffer`,
//! release).
//!
//! Ordering rule (why slots are pinned per wave): `write_buffer` lands
//! before the *next* submission, so a slot read by recorded but not yet
//! submitted dispatches must not be rewritten. A wave pins its slots, its
//! dispatches are submitted, and only then may the next wave evict them.

use std::collections::HashMap;

use super::device::Gpu;
use super::matrix::GpuMatrix;
use super::GpuError;
use crate::experts::store::{ExpertRef, ExpertView};
use crate::experts::{ExpertStore, StoreError};

/// Counters of the GPU tier (defined with the store's other counters).
pub use crate::experts::GpuTierStats as GpuExpertStats;

struct Slot {
    /// The slot's arrays: gate's, then up's, then down's (one each for
    /// GGML, three each for MLX).
    buffers: Vec<wgpu::Buffer>,
    owner: Option<(u32, u32)>,
    last_used: u64,
    pinned: bool,
    /// Gate, up and down over `buffers` while an expert is loaded.
    mats: Option<Box<[GpuMatrix; 3]>>,
}

/// The arena.
pub struct GpuExperts {
    /// Arrays per matrix (1: GGML, 3: MLX).
    arrays: usize,
    /// Bytes of each of the `3 · arrays` buffers of a slot.
    array_bytes: Vec<u64>,
    slots: Vec<Slot>,
    map: HashMap<(u32, u32), u32>,
    clock: u64,
    stats: GpuExpertStats,
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
    /// Bytes of each slot buffer for the experts of `layers` (the largest
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

    /// An arena of slots with buffers of `array_bytes` (see
    /// [`GpuExperts::slot_layout`]).
    pub fn new(
        gpu: &Gpu,
        arrays: usize,
        array_bytes: Vec<u64>,
        count: SlotCount,
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
        let want = match count {
            SlotCount::Exactly(n) | SlotCount::UpTo(n) => n.max(1),
        };
        let mut slots = Vec::with_capacity(want.min(1 << 20));
        for i in 0..want {
            let made: Result<Vec<wgpu::Buffer>, GpuError> = array_bytes
                .iter()
                .map(|&b| gpu.storage("expert slot", &[], b))
                .collect();
            match made {
                Ok(buffers) => slots.push(Slot {
                    buffers,
                    owner: None,
                    last_used: 0,
                    pinned: false,
                    mats: None,
                }),
                Err(e @ GpuError::OutOfMemory(_)) if matches!(count, SlotCount::UpTo(_)) => {
                    if i == 0 {
                        return Err(e);
                    }
                    slots.truncate((i - i / 10).max(1));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let slot_bytes = array_bytes.iter().sum();
        Ok(GpuExperts {
            arrays,
            array_bytes,
            stats: GpuExpertStats {
                slots: slots.len(),
                slot_bytes,
                ..Default::default()
            },
            slots,
            map: HashMap::new(),
            clock: 0,
        })
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    pub fn stats(&self) -> GpuExpertStats {
        self.stats
    }

    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> u64 {
        self.array_bytes.iter().sum()
    }

    /// Ends a wave: every slot may be evicted again.
    pub fn unpin_all(&mut self) {
        self.slots.iter_mut().for_each(|s| s.pinned = false);
    }

    /// Advances the recency clock (once per forward step).
    pub fn tick(&mut self) {
        self.clock += 1;
    }

    /// The slot of a resident expert, pinned for this wave (a hit).
    pub fn hit(&mut self, layer: usize, expert: u32) -> Option<u32> {
        let slot = *self.map.get(&(layer as u32, expert))?;
        let s = &mut self.slots[slot as usize];
        s.pinned = true;
        s.last_used = self.clock;
        self.stats.hits += 1;
        Some(slot)
    }

    /// A slot for a missing expert: a free one, else the least recently
    /// used unpinned one (evicted); pinned. `None` when every slot is
    /// pinned by this wave. The caller must [`GpuExperts::fill`] it before
    /// submitting.
    pub fn claim(&mut self, layer: usize, expert: u32) -> Option<u32> {
        let slot = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.pinned)
            .min_by_key(|(_, s)| (s.owner.is_some(), s.last_used))
            .map(|(i, _)| i as u32)?;
        let s = &mut self.slots[slot as usize];
        if let Some(old) = s.owner.take() {
            self.map.remove(&old);
        }
        s.mats = None;
        s.pinned = true;
        s.last_used = self.clock;
        s.owner = Some((layer as u32, expert));
        self.map.insert((layer as u32, expert), slot);
        self.stats.misses += 1;
        Some(slot)
    }

    /// Writes an expert's matrices into its claimed slot.
    pub fn fill(&mut self, gpu: &Gpu, slot: u32, x: &ExpertView<'_>) -> Result<(), GpuError> {
        let a = self.arrays;
        let s = &mut self.slots[slot as usize];
        let b = &s.buffers;
        let write = |m: &crate::backend::cpu::Matrix<'_>, i: usize| {
            let scales = (a == 3).then(|| (&b[i + 1], &b[i + 2]));
            GpuMatrix::write_into(gpu, m, &b[i], scales)
        };
        let result =
            (|| Ok::<_, GpuError>([write(&x.gate, 0)?, write(&x.up, a)?, write(&x.down, 2 * a)?]))(
            );
        match result {
            Ok(m) => {
                self.stats.bytes_uploaded += [&x.gate, &x.up, &x.down]
                    .into_iter()
                    .flat_map(GpuMatrix::array_bytes)
                    .sum::<u64>();
                s.mats = Some(Box::new(m));
                Ok(())
            }
            Err(e) => {
                // The slot holds nothing usable: forget its owner.
                if let Some(old) = s.owner.take() {
                    self.map.remove(&old);
                }
                Err(e)
            }
        }
    }

    /// Gate, up and down of the expert in `slot`.
    pub fn matrices(&self, slot: u32) -> Result<&[GpuMatrix; 3], GpuError> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.mats.as_deref())
            .ok_or_else(|| GpuError::Shape {
                kernel: "expert arena",
                detail: format!("slot {slot} holds no expert"),
            })
    }

    /// Brings `misses` (`(expert, slot)` pairs of `layer`, claimed) from the
    /// host store into their slots: acquires as many as the host arena
    /// grants, uploads each as its read completes, releases it.
    pub fn upload(
        &mut self,
        gpu: &Gpu,
        store: &mut ExpertStore,
        layer: usize,
        misses: &[(u32, u32)],
    ) -> Result<(), crate::Error> {
        let mut todo: Vec<u32> = misses.iter().map(|m| m.0).collect();
        let slot_of = |e: u32| misses.iter().find(|m| m.0 == e).map_or(0, |m| m.1);
        let mut granted = Vec::new();
        let mut ready = Vec::new();
        while !todo.is_empty() {
            granted.clear();
            store.acquire(layer, &todo, &mut granted)?;
            if granted.is_empty() {
                return Err(StoreError::Setup(
                    "no host expert slot is free to stage an expert for the GPU".into(),
                )
                .into());
            }
            let mut pending = granted.clone();
            while !pending.is_empty() {
                ready.clear();
                for &e in &pending {
                    match store.ready(layer, e) {
                        Ok(true) => ready.push(e),
                        Ok(false) => {}
                        Err(err) => {
                            store.release(layer, &pending);
                            return Err(err.into());
                        }
                    }
                }
                if ready.is_empty() {
                    store.wait_any(layer, &pending);
                    continue;
                }
                let mut failed = None;
                for &e in &ready {
                    let view = store.view(layer, e);
                    if let Err(err) = self.fill(gpu, slot_of(e), &view) {
                        failed = Some(err);
                        break;
                    }
                }
                if let Some(err) = failed {
                    store.release(layer, &pending);
                    return Err(err.into());
                }
                store.release(layer, &ready);
                pending.retain(|e| !ready.contains(e));
            }
            todo.retain(|e| !granted.contains(e));
        }
        Ok(())
    }
}
