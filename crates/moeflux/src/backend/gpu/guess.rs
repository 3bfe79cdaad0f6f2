//! Which of the next layer's guessed experts are worth copying ahead.
//!
//! In a streamed decode step the next layer's router, applied to this
//! layer's state after attention, guesses its k experts in rank order
//! (see `GpuModel::forward`). A right guess is copied while the GPU
//! computes; a wrong one moves an expert's bytes across a bus that the
//! step is waiting on. How often a guess is right depends on its rank and
//! on the model, so this keeps count, for each rank, of how often the
//! guess of that rank was among the layer's real choices, and copies only
//! ranks right at least [`GUESS_MIN_PRECISION`] of the time.
//!
//! Measured (bench/BENCHMARKS.md, runs 31–35; qwen3-235b-a22b shape,
//! Q4_0, 24 layers, `--gpu-mem 16G`, a synthetic model whose router is
//! random): ranks 0–7 were right 100, 99, 97, 94, 84, 77, 67 and 47 % of
//! the time. On an H100, copying ranks 0–5 (a threshold of 0.7) rather
//! than 0–6 (0.6) gave decode 40.6–40.9 against 39.5–40.2 tok/s in three
//! alternated pairs (run 35); ranks 0–4 (0.8) were slower (39.7 against
//! 40.3 and 41.6, run 34), and so were 0–3 (36.7) and 0–2 (32.8, run 31).
//! A wrong guess costs more than its bytes: the copy queue runs in order,
//! so the layer's misses, which its products wait for, queue behind it.
//! A trained router is more decided than a random one; where every rank
//! is right often enough, every rank is copied.
//!
//! The other ranks' guesses ([`GuessPrecision::doubtful`]) are copied too,
//! but only while the next layer's routing is computed and the copy queue
//! has nothing else to do, one expert at a time, so that the layer's misses
//! wait behind at most one of them (`GpuModel::forward`). On an H200 with
//! Qwen3.5-397B-A17B's shape (512 experts, top 10; ranks right 96, 96, 93,
//! 79, 67, 67, 51, 51, 51 and 38 % of the time), `--gpu-mem 8G`, streamed
//! decode went from 79.4 and 77.8 to 84.1 and 84.4 tok/s (run 19; that
//! build also ran a hybrid's b|a product beside q|k|v|z, under 1 % of
//! this step).

use crate::experts::{GpuTierStats, GUESS_MIN_PRECISION, GUESS_RANKS};

/// Guesses of a rank judged before its precision decides (until then the
/// rank is copied).
const WARMUP: u32 = 64;

/// Counts are halved when a rank has been judged this often, so the
/// precision follows the recent tokens.
const WINDOW: u32 = 4096;

/// Right and judged guesses per rank, and the guess waiting to be judged.
#[derive(Debug, Default)]
pub struct GuessPrecision {
    right: Vec<u32>,
    seen: Vec<u32>,
    /// All guesses judged and right, by rank, for the stats (not halved).
    judged_total: [u64; GUESS_RANKS],
    right_total: [u64; GUESS_RANKS],
    /// The last guess, in rank order, and the layer it was for.
    pending: Option<(usize, Vec<u32>)>,
    /// No rank is worth copying ahead: every guess is doubtful (copied
    /// only while the copy queue idles). `MOEFLUX_GPU_GUESS=doubtful`, for
    /// tests: the fixtures' few steps never judge a rank often enough to
    /// find it doubtful.
    all_doubtful: bool,
}

impl GuessPrecision {
    /// Counts from zero; `MOEFLUX_GPU_GUESS=doubtful` makes every guess
    /// doubtful.
    pub fn new() -> GuessPrecision {
        GuessPrecision {
            all_doubtful: std::env::var("MOEFLUX_GPU_GUESS").is_ok_and(|v| v == "doubtful"),
            ..GuessPrecision::default()
        }
    }

    /// Judges the pending guess for `layer` (if there is one) against the
    /// experts the layer chose (`chosen`, any order).
    pub fn judge(&mut self, layer: usize, chosen: &[u32]) {
        let Some((l, guess)) = self.pending.take() else {
            return;
        };
        if l != layer {
            return;
        }
        if self.seen.len() < guess.len() {
            self.seen.resize(guess.len(), 0);
            self.right.resize(guess.len(), 0);
        }
        for (r, e) in guess.iter().enumerate() {
            let right = chosen.contains(e);
            if r < GUESS_RANKS {
                self.judged_total[r] += 1;
                self.right_total[r] += u64::from(right);
            }
            self.seen[r] += 1;
            self.right[r] += u32::from(right);
            if self.seen[r] >= WINDOW {
                self.seen[r] /= 2;
                self.right[r] /= 2;
            }
        }
    }

    /// Records `guess` (rank order) for `layer`, to be judged when the
    /// layer routes, and returns the experts worth copying ahead.
    pub fn guess(&mut self, layer: usize, guess: Vec<u32>) -> Vec<u32> {
        let keep = guess
            .iter()
            .enumerate()
            .filter(|&(r, _)| self.worth(r))
            .map(|(_, &e)| e)
            .collect();
        self.pending = Some((layer, guess));
        keep
    }

    /// The pending guess's experts of the ranks not worth copying ahead
    /// (right less often than [`GUESS_MIN_PRECISION`]), in rank order:
    /// worth copying only while the copy queue has nothing else to do.
    pub fn doubtful(&self) -> Vec<u32> {
        let Some((_, guess)) = &self.pending else {
            return Vec::new();
        };
        guess
            .iter()
            .enumerate()
            .filter(|&(r, _)| !self.worth(r))
            .map(|(_, &e)| e)
            .collect()
    }

    /// Whether guesses of rank `r` are right often enough (or not yet
    /// judged often enough to tell).
    pub fn worth(&self, r: usize) -> bool {
        if self.all_doubtful {
            return false;
        }
        match (self.seen.get(r), self.right.get(r)) {
            (Some(&seen), Some(&right)) if seen >= WARMUP => {
                f64::from(right) >= GUESS_MIN_PRECISION * f64::from(seen)
            }
            _ => true,
        }
    }

    /// Writes the counts of every guess judged so far into `stats`.
    pub fn count(&self, stats: &mut GpuTierStats) {
        stats.guesses_judged = self.judged_total;
        stats.guesses_right = self.right_total;
    }

    /// Forgets the pending guess (a step ended before its layer routed).
    pub fn drop_pending(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank right less often than GUESS_MIN_PRECISION stops being copied once
    /// judged WARMUP times, and the others stay; a guess judged against
    /// another layer than its own counts nothing.
    #[test]
    fn ranks_below_the_precision_are_dropped() {
        let mut g = GuessPrecision::default();
        for i in 0..WARMUP {
            // Rank 0 always right, rank 1 right one time in two, rank 2
            // never.
            let chosen = if i % 2 == 0 { vec![10, 11] } else { vec![10] };
            let keep = g.guess(3, vec![10, 11, 12]);
            assert_eq!(keep, vec![10, 11, 12], "copied until judged");
            g.judge(3, &chosen);
        }
        assert!(g.worth(0) && !g.worth(1) && !g.worth(2));
        assert_eq!(g.guess(3, vec![10, 11, 12]), vec![10]);
        assert_eq!(g.doubtful(), vec![11, 12], "the others, in rank order");
        // Judged against layer 4: not counted.
        let judged = g.judged_total;
        g.judge(4, &[11, 12]);
        assert_eq!(g.judged_total, judged);
        assert_eq!(g.seen[..3], [WARMUP; 3]);
        // Ranks never judged are copied.
        assert!(g.worth(7));
    }

    /// Counts are halved past WINDOW, so a rank that becomes right again
    /// comes back within a window.
    #[test]
    fn precision_follows_recent_guesses() {
        let mut g = GuessPrecision::default();
        for _ in 0..WINDOW {
            g.guess(0, vec![1]);
            g.judge(0, &[2]);
        }
        assert!(!g.worth(0));
        let mut back = None;
        for i in 0..2 * WINDOW {
            g.guess(0, vec![1]);
            g.judge(0, &[1]);
            if g.worth(0) {
                back = Some(i);
                break;
            }
        }
        let back = back.expect("a rank that is right again is copied again");
        assert!(back < WINDOW, "took {back} guesses");
    }
}
