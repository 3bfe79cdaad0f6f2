//! The memory plan: how many expert slots fit beside the dense weights, the
//! KV cache and scratch space inside the user's budget.
//!
//! The plan is computed before anything is loaded and printed on start, so a
//! budget that cannot work is refused with the numbers instead of failing
//! halfway through a load (or being killed by the OOM killer).

use serde::Serialize;

/// Page size assumed for direct I/O windows and slot alignment.
pub const SLOT_ALIGN: u64 = 4096;

/// What the user allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "bytes")]
pub enum Budget {
    /// `--mem SIZE`: everything moeflux allocates (dense weights, KV cache,
    /// scratch and expert slots) stays under this.
    Total(u64),
    /// `--expert-cache SIZE`: the expert arena alone.
    ExpertCache(u64),
    /// `--expert-cache min`: the smallest arena that works (one layer's top-k).
    ExpertCacheMin,
    /// No flag: the machine's available memory less a safety margin.
    Auto { available: u64 },
}

/// The sizes the plan is made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PlanInput {
    /// Bytes of everything that is not a routed expert.
    pub dense_bytes: u64,
    /// Bytes of one slot: the largest single expert, with room for aligned
    /// read windows (see [`slot_bytes`]).
    pub slot_bytes: u64,
    /// Routed experts in the whole model (layers × experts per layer).
    pub total_experts: u64,
    /// Experts each token uses per layer.
    pub top_k: u64,
    /// KV cache and recurrent state for the planned context.
    pub kv_bytes: u64,
    /// Activations and other working memory.
    pub scratch_bytes: u64,
    /// What a GPU that shares this memory allocates from it (an Apple or
    /// other integrated GPU, or lavapipe): its copies of the dense weights,
    /// its activations, one session's KV cache (as `kv_bytes` is one
    /// session's), and its expert slots. 0 on a discrete GPU or the CPU
    /// backend. Known once the GPU model is built, so the plan is made
    /// again then ([`MemoryPlan::gpu_arena_in_shared_memory`] sizes that
    /// GPU's slots before).
    pub gpu_bytes: u64,
}

/// The outcome: how the budget is spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub budget: Budget,
    pub input: PlanInput,
    /// Expert slots in the arena.
    pub slots: u64,
}

/// Why no plan fits.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "a budget of {} cannot hold the dense weights ({}), the KV cache ({}), scratch ({}){} and one layer's top-{} experts ({}): at least {} is needed",
        fmt_bytes(*budget), fmt_bytes(*dense), fmt_bytes(*kv), fmt_bytes(*scratch), gpu_part(*gpu), top_k, fmt_bytes(*min_experts), fmt_bytes(*needed)
    )]
    TooSmall {
        budget: u64,
        dense: u64,
        kv: u64,
        scratch: u64,
        /// [`PlanInput::gpu_bytes`].
        gpu: u64,
        top_k: u64,
        min_experts: u64,
        needed: u64,
    },
}

/// The GPU's share in [`PlanError::TooSmall`]'s message, when it has one.
fn gpu_part(gpu: u64) -> String {
    if gpu == 0 {
        String::new()
    } else {
        format!(
            ", the GPU's allocations in the same memory ({}: a smaller --gpu-mem, or --backend cpu, leaves more)",
            fmt_bytes(gpu)
        )
    }
}

/// Bytes one slot needs for an expert stored as the given part lengths
/// (gate, up, down; or their MLX weight/scales/biases): each part is read
/// into its own page-aligned window, which may start up to a page before
/// the payload.
pub fn slot_bytes(part_lens: impl IntoIterator<Item = u64>) -> u64 {
    part_lens
        .into_iter()
        .map(|len| len.div_ceil(SLOT_ALIGN) * SLOT_ALIGN + SLOT_ALIGN)
        .sum()
}

/// The budget used when the user gives none: what the machine has
/// available, less 10 % (at least 1 GiB) for the OS and other programs.
pub fn auto_budget(available: u64) -> u64 {
    let margin = (available / 10).max(1 << 30);
    available.saturating_sub(margin)
}

impl PlanInput {
    /// Everything but the host's expert slots.
    pub fn fixed_bytes(&self) -> u64 {
        self.dense_bytes + self.kv_bytes + self.scratch_bytes + self.gpu_bytes
    }
}

impl MemoryPlan {
    pub fn new(budget: Budget, input: PlanInput) -> Result<MemoryPlan, PlanError> {
        let fixed = input.fixed_bytes();
        let min_slots = input.top_k.min(input.total_experts);
        let min_experts = min_slots * input.slot_bytes;
        let too_small = |budget: u64| PlanError::TooSmall {
            budget,
            dense: input.dense_bytes,
            kv: input.kv_bytes,
            scratch: input.scratch_bytes,
            gpu: input.gpu_bytes,
            top_k: input.top_k,
            min_experts,
            needed: fixed + min_experts,
        };
        let slots = match budget {
            Budget::ExpertCacheMin => min_slots,
            Budget::ExpertCache(bytes) => {
                let slots = bytes / input.slot_bytes.max(1);
                if slots < min_slots {
                    return Err(too_small(bytes + fixed));
                }
                slots
            }
            Budget::Total(bytes) | Budget::Auto { available: bytes } => {
                let bytes = match budget {
                    Budget::Auto { .. } => auto_budget(bytes),
                    _ => bytes,
                };
                let room = bytes.checked_sub(fixed).ok_or_else(|| too_small(bytes))?;
                let slots = room / input.slot_bytes.max(1);
                if slots < min_slots {
                    return Err(too_small(bytes));
                }
                slots
            }
        };
        Ok(MemoryPlan {
            budget,
            input,
            slots: slots.min(input.total_experts),
        })
    }

    /// Bytes of the expert arena.
    pub fn arena_bytes(&self) -> u64 {
        self.slots * self.input.slot_bytes
    }

    /// Everything the plan accounts for.
    pub fn total_bytes(&self) -> u64 {
        self.input.fixed_bytes() + self.arena_bytes()
    }

    /// Bytes for the expert slots of a GPU that shares this memory, when
    /// the user gave none (`--gpu-mem`); `machine_available` is the
    /// machine's available memory before the model loaded. The GPU's own
    /// copies of the dense weights, KV cache and activations are taken to
    /// be the host's sizes (they hold the same tensors, and the host's
    /// scratch estimate is a generous stand-in for the GPU's activation
    /// buffers); what they leave of the budget is split evenly
    /// between the GPU's slots and the host's, which feed them (with two
    /// caches of one memory, the host's keeps the experts the GPU's most
    /// recently evicted). Under `--expert-cache` the host's slots are the
    /// user's, and the GPU takes what they leave of the automatic budget.
    /// The plan is then made again with the GPU's real allocations.
    pub fn gpu_arena_in_shared_memory(&self, machine_available: u64) -> u64 {
        let host = PlanInput {
            gpu_bytes: 0,
            ..self.input
        };
        let gpu_fixed = host.fixed_bytes();
        match self.budget {
            Budget::Total(b) => b.saturating_sub(host.fixed_bytes() + gpu_fixed) / 2,
            Budget::Auto { available } => {
                auto_budget(available).saturating_sub(host.fixed_bytes() + gpu_fixed) / 2
            }
            Budget::ExpertCache(_) | Budget::ExpertCacheMin => auto_budget(machine_available)
                .saturating_sub(host.fixed_bytes() + self.arena_bytes() + gpu_fixed),
        }
    }

    /// Whether every routed expert fits in the arena at once.
    pub fn all_resident(&self) -> bool {
        self.slots >= self.input.total_experts
    }

    /// The one-line summary printed when a model is opened.
    pub fn summary(&self) -> String {
        let budget = match self.budget {
            Budget::Total(b) => format!("--mem {}", fmt_bytes(b)),
            Budget::ExpertCache(b) => format!("--expert-cache {}", fmt_bytes(b)),
            Budget::ExpertCacheMin => "--expert-cache min".to_string(),
            Budget::Auto { available } => format!("auto ({} available)", fmt_bytes(available)),
        };
        let pct = 100.0 * self.slots as f64 / self.input.total_experts.max(1) as f64;
        let gpu = match self.input.gpu_bytes {
            0 => String::new(),
            b => format!(" + GPU {}", fmt_bytes(b)),
        };
        format!(
            "{budget}: dense {} + KV {} + scratch {}{gpu} + {} expert slots × {} = {} ({pct:.0}% of {} experts fit in host memory)",
            fmt_bytes(self.input.dense_bytes),
            fmt_bytes(self.input.kv_bytes),
            fmt_bytes(self.input.scratch_bytes),
            self.slots,
            fmt_bytes(self.input.slot_bytes),
            fmt_bytes(self.total_bytes()),
            self.input.total_experts,
        )
    }
}

/// Formats a byte count in binary units (`1.5 GiB`).
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a size like `512M`, `4G`, `1.5GiB`, `4096` (bytes). Units are
/// binary (K = 1024), as in llama.cpp and most memory settings.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional unit, like 512M or 4G")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use K, M, G or T)"
            ))
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok(bytes as u64)
}

/// Working memory for a forward pass over `ubatch` tokens: the buffers of
/// the CPU workspace (hidden states, attention projections, each token's
/// expert inputs and outputs, router logits, one row of logits) plus a
/// quarter again for their 8-bit copies. The budget test measures the real
/// peak against the plan.
pub fn scratch_bytes(cfg: &crate::model::ModelConfig, ubatch: u64) -> u64 {
    let h = cfg.hidden as u64;
    let q = (cfg.n_heads * cfg.head_dim.max(cfg.v_head_dim)) as u64;
    let kv = (cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim)) as u64;
    let k = cfg.n_experts_used as u64;
    let ff = cfg.expert_ff.max(cfg.shared_ff).max(cfg.dense_ff) as u64;
    let floats_per_token = 3 * h + 2 * q + kv + cfg.n_experts as u64 + 3 * k * h + 2 * k * ff;
    let floats = ubatch * floats_per_token + cfg.vocab as u64;
    (16 << 20) + floats * 4 * 5 / 4
}

/// The memory the machine can give without swapping, in bytes: on Linux
/// `MemAvailable` from `/proc/meminfo`; on macOS free, speculative and
/// inactive pages (the kernel reclaims inactive pages before it compresses
/// or swaps); `None` elsewhere or when the kernel does not say.
#[cfg(not(target_os = "macos"))]
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// See the other target's version.
#[cfg(target_os = "macos")]
pub fn available_memory() -> Option<u64> {
    // SAFETY: all-integer C struct, for which zero is a valid value.
    let mut info: libc::vm_statistics64 = unsafe { std::mem::zeroed() };
    let mut count = libc::HOST_VM_INFO64_COUNT;
    // SAFETY: host_statistics64 writes at most `count` integers into
    // `info`, which holds that many (HOST_VM_INFO64_COUNT is its size in
    // integers). The host port's send right is kept (one reference a call;
    // this runs once a model load).
    #[allow(deprecated)]
    let r = unsafe {
        libc::host_statistics64(
            libc::mach_host_self(),
            libc::HOST_VM_INFO64,
            (&mut info as *mut libc::vm_statistics64).cast(),
            &mut count,
        )
    };
    // SAFETY: sysconf only reads its argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if r != libc::KERN_SUCCESS || page <= 0 {
        return None;
    }
    // By-value reads (the struct is packed). Speculative pages (read
    // ahead, not yet used) are free pages that free_count leaves out.
    let pages = info.free_count as u64 + info.speculative_count as u64 + info.inactive_count as u64;
    Some(pages * page as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PlanInput {
        PlanInput {
            dense_bytes: 1000 << 20,
            slot_bytes: 2 << 20,
            total_experts: 48 * 128,
            top_k: 8,
            kv_bytes: 100 << 20,
            scratch_bytes: 50 << 20,
            gpu_bytes: 0,
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn total_budget_fills_slots() {
        let p = MemoryPlan::new(Budget::Total(2 << 30), input()).unwrap();
        assert_eq!(p.slots, ((2 << 30) - (1150 << 20)) / (2 << 20));
        assert!(p.total_bytes() <= 2 << 30);
        assert!(!p.all_resident());
    }

    #[test]
    fn too_small_is_refused_with_numbers() {
        let e = MemoryPlan::new(Budget::Total(1100 << 20), input()).unwrap_err();
        let PlanError::TooSmall { needed, .. } = e.clone();
        assert_eq!(needed, (1150 << 20) + 16 * (1 << 20));
        assert!(e.to_string().contains("top-8"));
    }

    #[test]
    fn a_gpu_in_the_same_memory_takes_its_share() {
        let budget = Budget::Total(8 << 30);
        let alone = MemoryPlan::new(budget, input()).unwrap();
        // Half of what the host's and the GPU's fixed parts leave.
        let arena = alone.gpu_arena_in_shared_memory(0);
        assert_eq!(arena, ((8 << 30) - 2 * (1150 << 20)) / 2);
        // The GPU's real allocations: its fixed part and that arena.
        let gpu = PlanInput {
            gpu_bytes: (1150 << 20) + arena,
            ..input()
        };
        let shared = MemoryPlan::new(budget, gpu).unwrap();
        assert!(shared.total_bytes() <= 8 << 30);
        assert_eq!(shared.arena_bytes(), arena / (2 << 20) * (2 << 20));
        assert!(
            shared.summary().contains("GPU 4.0 GiB"),
            "{}",
            shared.summary()
        );
        // A GPU that leaves no room for one layer's experts is refused,
        // and the message names it.
        let e = MemoryPlan::new(
            budget,
            PlanInput {
                gpu_bytes: 7 << 30,
                ..input()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("GPU's allocations"), "{e}");
        // Under --expert-cache, the GPU takes what the host's slots leave
        // of the automatic budget.
        let cache = MemoryPlan::new(Budget::ExpertCache(1 << 30), input()).unwrap();
        assert_eq!(
            cache.gpu_arena_in_shared_memory(16 << 30),
            auto_budget(16 << 30) - (1150 << 20) - (1 << 30) - (1150 << 20)
        );
    }

    #[test]
    fn min_and_capped() {
        assert_eq!(
            MemoryPlan::new(Budget::ExpertCacheMin, input())
                .unwrap()
                .slots,
            8
        );
        let all = MemoryPlan::new(Budget::Total(1 << 40), input()).unwrap();
        assert_eq!(all.slots, 48 * 128);
        assert!(all.all_resident());
    }

    #[test]
    fn slot_bytes_leave_room_for_alignment() {
        assert_eq!(slot_bytes([4096, 1]), 4096 * 2 + 4096 * 2);
    }
}
