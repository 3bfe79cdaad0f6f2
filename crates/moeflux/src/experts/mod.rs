//! The streaming expert store: memory plan, slot arena, I/O, cache policy,
//! prefetch and statistics. Dense weights stay resident; routed experts are
//! read on demand into a fixed arena of equal slots sized by the plan.

pub mod arena;
pub mod cache;
pub mod io;
pub mod plan;
pub mod stats;
pub mod store;

pub use io::IoMode;
pub use plan::{Budget, MemoryPlan, PlanError, PlanInput};
pub use stats::{GpuTierStats, LayerStats, StoreStats, GUESS_MIN_PRECISION, GUESS_RANKS};
pub use store::{ExpertRef, ExpertStore, ExpertView, StoreError, StoreOptions};
