//! The cache policy over expert slots: which expert each slot holds, and
//! which slot to reuse when a new expert must come in.
//!
//! Frequency-weighted LRU across all layers: a slot's score is
//! `uses × FREQ_WEIGHT + last_use` (last use counted in forward steps), and
//! the unpinned, settled slot with the lowest score is evicted. flash-moe
//! measured this rule beating plain LRU by 34–65 %: an expert that many
//! tokens chose survives a burst of one-off choices.

/// Weight of one use against one step of recency.
pub const FREQ_WEIGHT: u64 = 10;

/// Marks "no slot" in the directory.
pub const NO_SLOT: u32 = u32::MAX;

/// Bookkeeping of every slot and the directory from experts to slots.
#[derive(Debug)]
pub struct SlotCache {
    /// `(layer, expert)` each slot holds, if any.
    pub owner: Vec<Option<(u32, u32)>>,
    uses: Vec<u64>,
    last_use: Vec<u64>,
    /// How many requests hold the slot (it may not be evicted while > 0).
    pub pins: Vec<u32>,
    /// Loaded by prefetch and not yet used by a request.
    pub prefetched: Vec<bool>,
    /// `slot_of[layer][expert]`, or `NO_SLOT`.
    slot_of: Vec<Vec<u32>>,
    /// Forward steps so far (the clock of `last_use`).
    pub step: u64,
}

impl SlotCache {
    /// A cache of `n_slots` for layers with `experts_per_layer[l]` experts.
    pub fn new(n_slots: usize, experts_per_layer: &[usize]) -> SlotCache {
        SlotCache {
            owner: vec![None; n_slots],
            uses: vec![0; n_slots],
            last_use: vec![0; n_slots],
            pins: vec![0; n_slots],
            prefetched: vec![false; n_slots],
            slot_of: experts_per_layer
                .iter()
                .map(|&n| vec![NO_SLOT; n])
                .collect(),
            step: 0,
        }
    }

    pub fn n_slots(&self) -> usize {
        self.owner.len()
    }

    /// The slot holding `(layer, expert)`.
    pub fn lookup(&self, layer: usize, expert: usize) -> Option<u32> {
        let s = self.slot_of[layer][expert];
        (s != NO_SLOT).then_some(s)
    }

    /// Records a use of a slot.
    pub fn touch(&mut self, slot: u32) {
        let s = slot as usize;
        self.uses[s] += 1;
        self.last_use[s] = self.step;
    }

    fn score(&self, s: usize) -> u64 {
        self.uses[s] * FREQ_WEIGHT + self.last_use[s]
    }

    /// The slot to reuse: an empty one if any, else the lowest-scoring slot
    /// that is unpinned, settled (`settled(slot)`: not being loaded) and
    /// allowed (`allowed(slot)`). `None` if every slot is taken.
    pub fn victim(
        &self,
        settled: impl Fn(u32) -> bool,
        allowed: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let mut best: Option<(u64, u32)> = None;
        for s in 0..self.owner.len() {
            let slot = s as u32;
            if self.pins[s] > 0 || !settled(slot) || !allowed(slot) {
                continue;
            }
            if self.owner[s].is_none() {
                return Some(slot);
            }
            let score = self.score(s);
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, slot));
            }
        }
        best.map(|(_, s)| s)
    }

    /// Gives `slot` to `(layer, expert)`, forgetting its previous owner.
    /// Returns the previous owner.
    pub fn assign(&mut self, slot: u32, layer: usize, expert: usize) -> Option<(u32, u32)> {
        let s = slot as usize;
        let old = self.owner[s].take();
        if let Some((l, e)) = old {
            self.slot_of[l as usize][e as usize] = NO_SLOT;
        }
        self.owner[s] = Some((layer as u32, expert as u32));
        self.slot_of[layer][expert] = slot;
        self.uses[s] = 0;
        self.last_use[s] = self.step;
        self.prefetched[s] = false;
        old
    }

    /// Empties a slot (after a failed read).
    pub fn clear(&mut self, slot: u32) {
        let s = slot as usize;
        if let Some((l, e)) = self.owner[s].take() {
            self.slot_of[l as usize][e as usize] = NO_SLOT;
        }
        self.prefetched[s] = false;
    }

    /// Experts held, per layer.
    pub fn resident(&self, layer: usize) -> usize {
        self.slot_of[layer]
            .iter()
            .filter(|&&s| s != NO_SLOT)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_valuable_unpinned_slot() {
        let mut c = SlotCache::new(3, &[4, 4]);
        let all = |_| true;
        for (slot, e) in [(0, 0), (1, 1), (2, 2)] {
            assert_eq!(c.victim(all, all), Some(slot));
            c.assign(slot, 0, e);
        }
        // Expert 0 used often, expert 1 recently, expert 2 neither.
        c.touch(0);
        c.touch(0);
        c.step = 5;
        c.touch(1);
        assert_eq!(c.victim(all, all), Some(2));
        c.pins[2] = 1;
        // score(0) = 2·10 + 0 = 20, score(1) = 10 + 5 = 15.
        assert_eq!(c.victim(all, all), Some(1));
        assert_eq!(c.victim(|s| s != 1, all), Some(0));
        let old = c.assign(1, 1, 3);
        assert_eq!(old, Some((0, 1)));
        assert_eq!(c.lookup(0, 1), None);
        assert_eq!(c.lookup(1, 3), Some(1));
        c.pins = vec![1, 1, 1];
        assert_eq!(c.victim(all, all), None);
    }
}
