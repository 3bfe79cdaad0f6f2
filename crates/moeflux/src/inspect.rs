//! `moeflux inspect`: what a model file holds and how it would be planned.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::experts::plan::{self, Budget, MemoryPlan, PlanInput};
use crate::format::{Container, ModelFiles, ModelMetadata};
use crate::model::{names, ModelConfig};

/// Bytes and tensor count of one storage type.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TypeBytes {
    #[serde(rename = "type")]
    pub ty: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// The routed experts of one layer.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ExpertLayer {
    pub layer: u32,
    pub n_experts: u64,
    /// Bytes of one expert (all its gate/up/down parts).
    pub one_expert_bytes: u64,
    /// The length of each part of one expert, in read order.
    #[serde(skip)]
    pub part_lens: Vec<u64>,
}

/// How the plan was asked for.
#[derive(Clone, Copy, Debug)]
pub struct PlanRequest {
    /// `None`: the automatic plan from available memory.
    pub budget: Option<Budget>,
    /// Context length the KV cache is sized for.
    pub ctx: u64,
    /// Prompt chunk size, which sizes the scratch memory.
    pub ubatch: u64,
    /// Element type of the KV cache.
    pub kv_type: crate::state::KvType,
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            budget: None,
            ctx: 4096,
            ubatch: 512,
            kv_type: crate::state::KvType::F16,
        }
    }
}

/// Everything `inspect` reports.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    /// `gguf` or `safetensors`.
    pub container: &'static str,
    pub gguf_version: Option<u32>,
    pub mlx_quantized: bool,
    pub files: usize,
    pub file_bytes: u64,
    /// The architecture as the file names it.
    pub architecture: String,
    pub supported: bool,
    /// Why the model cannot be run, when it cannot.
    pub unsupported: Option<String>,
    pub config: Option<ModelConfig>,
    pub tensor_count: usize,
    pub by_type: Vec<TypeBytes>,
    pub dense_bytes: u64,
    pub expert_bytes: u64,
    pub expert_layers: Vec<ExpertLayer>,
    pub plan_ctx: u64,
    /// The KV cache type the plan is for (`f16`, `f32`, `q8_0`).
    pub plan_kv_type: &'static str,
    pub plan: Option<MemoryPlan>,
    /// The refusal, when the requested budget cannot work.
    pub plan_error: Option<String>,
}

/// Per-layer routed-expert sizes of a model, from tensor names.
pub fn expert_layers(files: &ModelFiles) -> Vec<ExpertLayer> {
    #[derive(Default)]
    struct Acc {
        stacked_bytes: u64,
        stacked_parts: Vec<u64>,
        stacked_n: u64,
        per_expert: BTreeMap<u32, (u64, Vec<u64>)>,
    }
    let mut layers: BTreeMap<u32, Acc> = BTreeMap::new();
    for t in &files.tensors {
        let Some(r) = names::routed_expert(&t.name) else {
            continue;
        };
        let acc = layers.entry(r.layer).or_default();
        match r.expert {
            None => {
                let n = t.shape.first().copied().unwrap_or(1).max(1);
                acc.stacked_n = acc.stacked_n.max(n);
                acc.stacked_bytes += t.bytes() / n;
                acc.stacked_parts.extend(t.parts.iter().map(|p| p.len / n));
            }
            Some(e) => {
                let slot = acc.per_expert.entry(e).or_default();
                slot.0 += t.bytes();
                slot.1.extend(t.parts.iter().map(|p| p.len));
            }
        }
    }
    layers
        .into_iter()
        .map(|(layer, acc)| {
            let (pe_bytes, pe_parts) = acc
                .per_expert
                .values()
                .max_by_key(|(b, _)| *b)
                .cloned()
                .unwrap_or_default();
            let n_experts = acc.stacked_n.max(acc.per_expert.len() as u64);
            let mut part_lens = acc.stacked_parts;
            part_lens.extend(pe_parts);
            ExpertLayer {
                layer,
                n_experts,
                one_expert_bytes: acc.stacked_bytes + pe_bytes,
                part_lens,
            }
        })
        .collect()
}

/// The plan inputs for a model, or `None` if it has no routed experts.
pub fn plan_input(
    cfg: &ModelConfig,
    layers: &[ExpertLayer],
    dense_bytes: u64,
    req: &PlanRequest,
) -> Option<PlanInput> {
    let biggest = layers.iter().max_by_key(|l| l.one_expert_bytes)?;
    Some(PlanInput {
        dense_bytes,
        slot_bytes: plan::slot_bytes(biggest.part_lens.iter().copied()),
        total_experts: layers.iter().map(|l| l.n_experts).sum(),
        top_k: cfg.n_experts_used as u64,
        kv_bytes: cfg.kv_bytes(req.ctx, req.kv_type),
        scratch_bytes: plan::scratch_bytes(cfg, req.ubatch),
        gpu_bytes: 0,
    })
}

/// Builds the report for an opened model.
pub fn inspect(files: &ModelFiles, req: &PlanRequest) -> InspectReport {
    let mut by_type: HashMap<String, (usize, u64)> = HashMap::new();
    let mut dense_bytes = 0;
    let mut expert_bytes = 0;
    for t in &files.tensors {
        let e = by_type.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.bytes();
        if names::routed_expert(&t.name).is_some() {
            expert_bytes += t.bytes();
        } else {
            dense_bytes += t.bytes();
        }
    }
    let mut by_type: Vec<TypeBytes> = by_type
        .into_iter()
        .map(|(ty, (tensors, bytes))| TypeBytes { ty, tensors, bytes })
        .collect();
    by_type.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.ty.cmp(&b.ty)));

    let (container, gguf_version, mlx_quantized) = match files.container {
        Container::Gguf { version, .. } => ("gguf", Some(version), false),
        Container::Safetensors { mlx } => ("safetensors", None, mlx),
    };
    let (architecture, config) = match &files.metadata {
        ModelMetadata::Gguf(meta) => {
            let vocab_hint = files
                .tensor("token_embd.weight")
                .and_then(|t| t.shape.first())
                .map(|&v| v as usize);
            (
                meta.get_str("general.architecture")
                    .unwrap_or("(none)")
                    .to_string(),
                ModelConfig::from_gguf(meta, vocab_hint),
            )
        }
        ModelMetadata::Hf(c) => {
            let text = c.get("text_config").unwrap_or(c);
            let name = text
                .get("model_type")
                .or_else(|| c.get("model_type"))
                .and_then(|v| v.as_str())
                .unwrap_or("(none)");
            (name.to_string(), ModelConfig::from_hf(c))
        }
    };
    let expert_layers = expert_layers(files);
    let (config, unsupported) = match config {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e.to_string())),
    };

    let (plan, plan_error) = match config
        .as_ref()
        .and_then(|c| plan_input(c, &expert_layers, dense_bytes, req))
    {
        None => (None, None),
        Some(input) => {
            let budget = req.budget.unwrap_or(Budget::Auto {
                available: plan::available_memory().unwrap_or(0),
            });
            match MemoryPlan::new(budget, input) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e.to_string())),
            }
        }
    };

    InspectReport {
        path: files.path.display().to_string(),
        container,
        gguf_version,
        mlx_quantized,
        files: files.files.len(),
        file_bytes: files.file_bytes(),
        architecture,
        supported: config.is_some(),
        unsupported,
        config,
        tensor_count: files.tensors.len(),
        by_type,
        dense_bytes,
        expert_bytes,
        expert_layers,
        plan_ctx: req.ctx,
        plan_kv_type: req.kv_type.name(),
        plan,
        plan_error,
    }
}
