//! The streaming expert store: memory plan, slot arena, I/O, cache policy,
//! prefetch and statistics. Dense weights stay resident; routed experts are
//! read on demand into a fixed arena of equal slots sized by the plan.

pub mod plan;
pub mod store;

pub use plan::{Budget, MemoryPlan, PlanError, PlanInput};
pub use store::{ExpertRef, ExpertStore, ExpertView};
