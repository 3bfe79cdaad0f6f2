//! Choosing the next token from logits.
//!
//! The chain is llama.cpp's order: repetition / presence / frequency
//! penalties → top-k → top-p → min-p → temperature → a draw from the
//! resulting distribution. A temperature of 0 is greedy (argmax, lowest id
//! on ties). The random generator is seeded, so a run with the same seed,
//! prompt and model is reproducible.

use crate::tokenizer::TokenId;

/// How to sample, and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely (0: none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every recent token (0: off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a recent token (0: off).
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation (not included in the output).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }
}

/// A seeded xoshiro256** generator.
#[derive(Clone, Debug)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            // splitmix64, to spread the seed over the state
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit; the lowest index wins ties (as numpy).
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

/// A sampler: parameters, generator state and scratch space.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    candidates: Vec<(f32, TokenId)>,
    penalized: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler {
            rng: Rng::new(params.seed),
            params,
            candidates: Vec::new(),
            penalized: Vec::new(),
        }
    }

    /// Chooses a token; `history` is every token so far (prompt included),
    /// which the penalties look at.
    pub fn sample(&mut self, logits: &[f32], history: &[TokenId]) -> TokenId {
        let p = &self.params;
        let penalties =
            p.repeat_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        let logits = if penalties && p.repeat_last_n > 0 {
            self.penalized.clear();
            self.penalized.extend_from_slice(logits);
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut counted: Vec<TokenId> = recent.to_vec();
            counted.sort_unstable();
            for run in counted.chunk_by(|a, b| a == b) {
                let Some(l) = self.penalized.get_mut(run[0] as usize) else {
                    continue;
                };
                if *l > 0.0 {
                    *l /= p.repeat_penalty;
                } else {
                    *l *= p.repeat_penalty;
                }
                *l -= p.presence_penalty + p.frequency_penalty * run.len() as f32;
            }
            &self.penalized[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as TokenId)));
        // Descending by logit; ties by id so the order is deterministic.
        let by_logit =
            |a: &(f32, TokenId), b: &(f32, TokenId)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);

        // Softmax over the survivors.
        let max = c[0].0;
        let mut probs: Vec<f64> = c.iter().map(|&(l, _)| ((l - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);

        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        c.truncate(keep);

        // Temperature, then a draw.
        let inv_t = 1.0 / p.temperature as f64;
        let weights: Vec<f64> = c
            .iter()
            .map(|&(l, _)| ((l - max) as f64 * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (w, &(_, id)) in weights.iter().zip(c.iter()) {
            r -= w;
            if r < 0.0 {
                return id;
            }
        }
        c[c.len() - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_tie() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn seeded_runs_repeat_and_respect_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        let mut top5: Vec<usize> = (0..50).collect();
        top5.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
        for t in &a {
            assert!(top5[..5].contains(&(*t as usize)));
        }
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 1,
            "a temperature of 1 should not be greedy"
        );
        let other = draw(&SamplingParams { seed: 43, ..params });
        assert_ne!(a, other);
    }

    #[test]
    fn penalties_and_min_p() {
        // Token 0 wins unless penalised.
        let logits = [2.0, 1.9, -5.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.2,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[0, 0]), 1);
        // min_p = 0.5 leaves only the two close tokens.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_ne!(s.sample(&logits, &[]), 2);
        }
    }
}
