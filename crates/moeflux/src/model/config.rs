//! `ModelConfig`: the shape and semantics of a model, read from GGUF metadata
//! or a Hugging Face `config.json`.
//!
//! Keys whose absence would change what the model computes are required; a
//! default is taken only where llama.cpp / transformers take the same one,
//! and every default taken is recorded in [`ModelConfig::defaults_used`] so
//! it can be logged (never guessed silently).

use serde::Serialize;
use serde_json::Value;

use crate::format::gguf::{MetaValue, Metadata};
use crate::state::KvType;

/// A supported model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Qwen3-MoE (30B-A3B, 235B-A22B, Coder-480B).
    Qwen3Moe,
    /// Qwen3.5 / 3.6 MoE: Gated DeltaNet + gated full attention.
    Qwen35Moe,
    /// Qwen3-Next: the same hybrid family.
    Qwen3Next,
    /// DeepSeek-V3 / R1 / Kimi-K2: MLA, grouped sigmoid routing.
    DeepseekV3,
    /// GPT-OSS: MXFP4 experts, sinks, alternating sliding window.
    GptOss,
    /// Mixtral: the classic top-2 MoE.
    Mixtral,
}

impl Architecture {
    /// The GGUF `general.architecture` value (Mixtral is `llama` with experts).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3moe",
            Architecture::Qwen35Moe => "qwen35moe",
            Architecture::Qwen3Next => "qwen3next",
            Architecture::DeepseekV3 => "deepseek2",
            Architecture::GptOss => "gpt-oss",
            Architecture::Mixtral => "llama",
        }
    }

    /// The Hugging Face `model_type`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Qwen35Moe => "qwen3_5_moe",
            Architecture::Qwen3Next => "qwen3_next",
            Architecture::DeepseekV3 => "deepseek_v3",
            Architecture::GptOss => "gpt_oss",
            Architecture::Mixtral => "mixtral",
        }
    }

    fn from_gguf(name: &str, has_experts: bool) -> Option<Architecture> {
        Some(match name {
            "qwen3moe" => Architecture::Qwen3Moe,
            "qwen35moe" => Architecture::Qwen35Moe,
            "qwen3next" => Architecture::Qwen3Next,
            "deepseek2" => Architecture::DeepseekV3,
            "gpt-oss" => Architecture::GptOss,
            "llama" if has_experts => Architecture::Mixtral,
            _ => return None,
        })
    }

    fn from_hf(model_type: &str) -> Option<Architecture> {
        Some(match model_type {
            "qwen3_moe" => Architecture::Qwen3Moe,
            "qwen3_5_moe" | "qwen3_5_moe_text" => Architecture::Qwen35Moe,
            "qwen3_next" => Architecture::Qwen3Next,
            "deepseek_v3" | "kimi_k2" => Architecture::DeepseekV3,
            "gpt_oss" => Architecture::GptOss,
            "mixtral" => Architecture::Mixtral,
            _ => return None,
        })
    }
}

/// What a layer's attention (token mixer) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Softmax attention over every earlier position (a KV cache).
    FullAttention,
    /// Softmax attention over a window of recent positions.
    SlidingAttention,
    /// Gated DeltaNet: a fixed-size recurrent state instead of a KV cache.
    LinearAttention,
    /// DeepSeek multi-head latent attention: a compressed KV cache.
    Mla,
}

/// Shape of the Gated-DeltaNet layers of the Qwen hybrids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LinearAttention {
    pub conv_kernel: usize,
    pub n_k_heads: usize,
    pub n_v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
}

impl LinearAttention {
    /// Channels of the causal conv1d (q, k and v together).
    pub fn conv_channels(&self) -> usize {
        2 * self.n_k_heads * self.k_head_dim + self.n_v_heads * self.v_head_dim
    }

    /// Bytes of one layer's recurrent state in f32: the conv window and the
    /// per-head `k_dim × v_dim` delta-rule state.
    pub fn state_bytes(&self) -> u64 {
        let conv = (self.conv_kernel.saturating_sub(1) * self.conv_channels()) as u64;
        let rec = (self.n_v_heads * self.k_head_dim * self.v_head_dim) as u64;
        4 * (conv + rec)
    }
}

/// Shape of DeepSeek's multi-head latent attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mla {
    /// `None` when queries are not low-rank (DeepSeek-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// The shape and semantics of a model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query/key head dimension of the softmax-attention layers.
    pub head_dim: usize,
    /// Value head dimension of the softmax-attention layers.
    pub v_head_dim: usize,
    /// The token mixer of each layer.
    pub layers: Vec<LayerKind>,
    /// Whether each layer's FFN is a routed MoE (else a dense FFN).
    pub moe_layers: Vec<bool>,
    pub n_experts: usize,
    pub n_experts_used: usize,
    /// Shared experts run for every token beside the routed ones.
    pub n_shared_experts: usize,
    /// Hidden size of one routed expert's FFN.
    pub expert_ff: usize,
    /// Hidden size of the shared expert(s), all together.
    pub shared_ff: usize,
    /// Hidden size of the dense FFN layers, if any.
    pub dense_ff: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Rotated dimensions of each query/key head (the Qwen hybrids rotate a
    /// quarter of the head: `partial_rotary_factor`).
    pub rope_dims: usize,
    pub sliding_window: Option<usize>,
    pub linear: Option<LinearAttention>,
    pub mla: Option<Mla>,
    /// Keys that were absent and replaced by the documented default.
    pub defaults_used: Vec<String>,
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("architecture {0:?} is not supported yet (supported: qwen3moe/qwen3_moe, qwen35moe/qwen3_5_moe, qwen3next/qwen3_next, deepseek2/deepseek_v3, gpt-oss/gpt_oss, mixtral)")]
    Unsupported(String),
    #[error("the model metadata has no architecture ({0})")]
    NoArchitecture(&'static str),
    #[error("required key {0:?} is missing")]
    Missing(String),
    #[error("key {key:?} has an invalid value: {message}")]
    Invalid { key: String, message: String },
}

impl ModelConfig {
    /// KV-cache bytes per token of context of one layer of `kind`, in
    /// cache type `ty`. Linear-attention layers keep no per-token state;
    /// sliding layers are counted up to their window by
    /// [`ModelConfig::kv_bytes`].
    fn kv_bytes_per_token(&self, kind: LayerKind, ty: KvType) -> u64 {
        match kind {
            LayerKind::FullAttention | LayerKind::SlidingAttention => {
                ty.row_bytes((self.n_kv_heads * self.head_dim) as u64)
                    + ty.row_bytes((self.n_kv_heads * self.v_head_dim) as u64)
            }
            LayerKind::Mla => self
                .mla
                .map(|m| ty.row_bytes((m.kv_lora_rank + m.qk_rope_head_dim) as u64))
                .unwrap_or(0),
            LayerKind::LinearAttention => 0,
        }
    }

    /// Bytes of session state for a context of `ctx` tokens: the KV cache
    /// in `ty` plus the fixed recurrent state.
    pub fn kv_bytes(&self, ctx: u64, ty: KvType) -> u64 {
        self.layers
            .iter()
            .map(|&kind| {
                let tokens = match (kind, self.sliding_window) {
                    (LayerKind::SlidingAttention, Some(w)) => ctx.min(w as u64),
                    _ => ctx,
                };
                let fixed = match (kind, self.linear) {
                    (LayerKind::LinearAttention, Some(l)) => l.state_bytes(),
                    _ => 0,
                };
                tokens * self.kv_bytes_per_token(kind, ty) + fixed
            })
            .sum()
    }

    /// Reads the configuration from GGUF metadata. `vocab_hint` is the row
    /// count of the token embedding (the vocabulary size when known).
    pub fn from_gguf(
        meta: &Metadata,
        vocab_hint: Option<usize>,
    ) -> Result<ModelConfig, ConfigError> {
        let arch_name = meta
            .get_str("general.architecture")
            .ok_or(ConfigError::NoArchitecture("general.architecture"))?;
        let g = Gguf {
            meta,
            prefix: arch_name,
            defaults: Vec::new().into(),
        };
        let has_experts = g.opt("expert_count")?.unwrap_or(0) > 0;
        let arch = Architecture::from_gguf(arch_name, has_experts)
            .ok_or_else(|| ConfigError::Unsupported(arch_name.to_string()))?;

        // Multi-token-prediction blocks are stored after the trunk and
        // counted in block_count; generation does not use them.
        let blocks = g.req("block_count")?;
        let nextn = g.opt("nextn_predict_layers")?.unwrap_or(0);
        let n_layers = blocks
            .checked_sub(nextn)
            .filter(|&n| n > 0)
            .ok_or_else(|| ConfigError::Invalid {
                key: g.key("nextn_predict_layers"),
                message: format!("{nextn} prediction layers of {blocks} blocks leave no trunk"),
            })?;
        let hidden = g.req("embedding_length")?;
        let n_heads = g.req("attention.head_count")?;
        let n_kv_heads = g.opt("attention.head_count_kv")?.unwrap_or(n_heads);
        // The embedding's row count is the vocabulary the model computes
        // with; token lists may be shorter (padded vocabularies).
        let vocab = match (
            vocab_hint,
            meta.get_array("tokenizer.ggml.tokens").map(|a| a.len()),
        ) {
            (Some(rows), _) => rows,
            (None, Some(n)) => n,
            (None, None) => g
                .opt("vocab_size")?
                .ok_or_else(|| ConfigError::Missing("tokenizer.ggml.tokens".into()))?,
        };
        let context_length = g.req("context_length")?;
        let n_experts = g.req("expert_count")?;
        let n_experts_used = g.req("expert_used_count")?;
        let expert_ff = g
            .opt("expert_feed_forward_length")?
            .map_or_else(|| g.req("feed_forward_length"), Ok)?;
        let rms_eps = g.req_f("attention.layer_norm_rms_epsilon")? as f32;
        let rope_theta = g.f_or("rope.freq_base", 10_000.0)? as f32;

        let mut head_dim = g
            .opt("attention.key_length")?
            .unwrap_or(hidden / n_heads.max(1));
        let mut v_head_dim = g.opt("attention.value_length")?.unwrap_or(head_dim);
        let mut layers = vec![LayerKind::FullAttention; n_layers];
        let mut moe_layers = vec![true; n_layers];
        let mut n_shared_experts = 0;
        let mut shared_ff = 0;
        let mut dense_ff = 0;
        let mut sliding_window = None;
        let mut linear = None;
        let mut mla = None;

        match arch {
            Architecture::Qwen3Moe | Architecture::Mixtral => {}
            Architecture::Qwen35Moe | Architecture::Qwen3Next => {
                let flags = meta
                    .get_array(&format!("{arch_name}.attention.recurrent_layers"))
                    .and_then(|a| a.to_i64s());
                layers = match flags {
                    Some(flags) if flags.len() >= n_layers => flags[..n_layers]
                        .iter()
                        .map(|&f| {
                            if f != 0 {
                                LayerKind::LinearAttention
                            } else {
                                LayerKind::FullAttention
                            }
                        })
                        .collect(),
                    _ => {
                        let interval = g.or("full_attention_interval", 4)?.max(1);
                        hybrid_pattern(n_layers, interval)
                    }
                };
                shared_ff = g.opt("expert_shared_feed_forward_length")?.unwrap_or(0);
                n_shared_experts = usize::from(shared_ff > 0);
                let n_k_heads = g.req("ssm.group_count")?;
                let n_v_heads = g.req("ssm.time_step_rank")?;
                let inner = g.req("ssm.inner_size")?;
                linear = Some(LinearAttention {
                    conv_kernel: g.req("ssm.conv_kernel")?,
                    n_k_heads,
                    n_v_heads,
                    k_head_dim: g.req("ssm.state_size")?,
                    v_head_dim: inner / n_v_heads.max(1),
                });
            }
            Architecture::DeepseekV3 => {
                layers = vec![LayerKind::Mla; n_layers];
                let dense = g.or("leading_dense_block_count", 0)?.min(n_layers);
                moe_layers[..dense].iter_mut().for_each(|m| *m = false);
                dense_ff = g.req("feed_forward_length")?;
                n_shared_experts = g.or("expert_shared_count", 0)?;
                shared_ff = n_shared_experts * expert_ff;
                let rope = g.req("rope.dimension_count")?;
                let kv_lora = g.req("attention.kv_lora_rank")?;
                let k_mla = g.opt("attention.key_length_mla")?;
                let v_mla = g.opt("attention.value_length_mla")?;
                // Files converted before MLA was stored absorbed carry the
                // per-head sizes in key_length/value_length directly.
                let qk = k_mla.unwrap_or(head_dim);
                let v = v_mla.unwrap_or(v_head_dim);
                mla = Some(Mla {
                    q_lora_rank: g.opt("attention.q_lora_rank")?.filter(|&r| r > 0),
                    kv_lora_rank: kv_lora,
                    qk_nope_head_dim: qk.saturating_sub(rope),
                    qk_rope_head_dim: rope,
                    v_head_dim: v,
                });
                head_dim = qk;
                v_head_dim = v;
            }
            Architecture::GptOss => {
                sliding_window = Some(g.req("attention.sliding_window")?);
                layers = (0..n_layers)
                    .map(|i| {
                        if i % 2 == 0 {
                            LayerKind::SlidingAttention
                        } else {
                            LayerKind::FullAttention
                        }
                    })
                    .collect();
            }
        }
        let rope_dims = g
            .opt("rope.dimension_count")?
            .unwrap_or(head_dim)
            .min(head_dim);
        Ok(ModelConfig {
            arch,
            n_layers,
            hidden,
            vocab,
            context_length,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            layers,
            moe_layers,
            n_experts,
            n_experts_used,
            n_shared_experts,
            expert_ff,
            shared_ff,
            dense_ff,
            rms_eps,
            rope_theta,
            rope_dims,
            sliding_window,
            linear,
            mla,
            defaults_used: g.defaults.into_inner(),
        })
    }

    /// Reads the configuration from a Hugging Face `config.json` (for
    /// multimodal checkpoints, from its `text_config`).
    pub fn from_hf(config: &Value) -> Result<ModelConfig, ConfigError> {
        let outer_type = config.get("model_type").and_then(Value::as_str);
        let text = config.get("text_config").filter(|t| t.is_object());
        let c = text.unwrap_or(config);
        let model_type = c
            .get("model_type")
            .and_then(Value::as_str)
            .or(outer_type)
            .ok_or(ConfigError::NoArchitecture("model_type"))?;
        let arch = Architecture::from_hf(model_type)
            .or_else(|| outer_type.and_then(Architecture::from_hf))
            .ok_or_else(|| ConfigError::Unsupported(model_type.to_string()))?;
        let h = Hf {
            c,
            defaults: Vec::new().into(),
        };

        let n_layers = h.req("num_hidden_layers")?;
        let hidden = h.req("hidden_size")?;
        let n_heads = h.req("num_attention_heads")?;
        let n_kv_heads = h.opt("num_key_value_heads")?.unwrap_or(n_heads);
        let mut head_dim = h.opt("head_dim")?.unwrap_or(hidden / n_heads.max(1));
        let mut v_head_dim = head_dim;
        let vocab = h.req("vocab_size")?;
        let context_length = h.req("max_position_embeddings")?;
        let rms_eps = h.req_f("rms_norm_eps")? as f32;
        let rope_theta = match h.opt_f("rope_theta")? {
            Some(t) => t,
            None => c
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .ok_or_else(|| ConfigError::Missing("rope_theta".into()))?,
        } as f32;
        let n_experts = match arch {
            Architecture::DeepseekV3 => h.req("n_routed_experts")?,
            Architecture::Mixtral | Architecture::GptOss => h.req("num_local_experts")?,
            _ => h.req("num_experts")?,
        };
        let n_experts_used = h.req("num_experts_per_tok")?;
        let expert_ff = match arch {
            Architecture::Mixtral | Architecture::GptOss => h.req("intermediate_size")?,
            _ => h.req("moe_intermediate_size")?,
        };

        let mut layers = vec![LayerKind::FullAttention; n_layers];
        let mut moe_layers = vec![true; n_layers];
        let mut n_shared_experts = 0;
        let mut shared_ff = 0;
        let mut dense_ff = 0;
        let mut sliding_window = None;
        let mut linear = None;
        let mut mla = None;

        match arch {
            Architecture::Mixtral => {}
            Architecture::Qwen3Moe => {
                dense_ff = h.opt("intermediate_size")?.unwrap_or(0);
                let step = h.or("decoder_sparse_step", 1)?.max(1);
                let mlp_only: Vec<usize> = c
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_u64)
                            .map(|v| v as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                for (i, m) in moe_layers.iter_mut().enumerate() {
                    *m = !mlp_only.contains(&i) && (i + 1) % step == 0;
                }
            }
            Architecture::Qwen35Moe | Architecture::Qwen3Next => {
                layers = match layer_types(c, n_layers)? {
                    Some(l) => l,
                    None => hybrid_pattern(n_layers, h.or("full_attention_interval", 4)?.max(1)),
                };
                shared_ff = h.or("shared_expert_intermediate_size", 0)?;
                n_shared_experts = usize::from(shared_ff > 0);
                linear = Some(LinearAttention {
                    conv_kernel: h.req("linear_conv_kernel_dim")?,
                    n_k_heads: h.req("linear_num_key_heads")?,
                    n_v_heads: h.req("linear_num_value_heads")?,
                    k_head_dim: h.req("linear_key_head_dim")?,
                    v_head_dim: h.req("linear_value_head_dim")?,
                });
            }
            Architecture::DeepseekV3 => {
                layers = vec![LayerKind::Mla; n_layers];
                let dense = h.or("first_k_dense_replace", 0)?.min(n_layers);
                moe_layers[..dense].iter_mut().for_each(|m| *m = false);
                dense_ff = h.req("intermediate_size")?;
                n_shared_experts = h.or("n_shared_experts", 0)?;
                shared_ff = n_shared_experts * expert_ff;
                let m = Mla {
                    q_lora_rank: h.opt("q_lora_rank")?.filter(|&r| r > 0),
                    kv_lora_rank: h.req("kv_lora_rank")?,
                    qk_nope_head_dim: h.req("qk_nope_head_dim")?,
                    qk_rope_head_dim: h.req("qk_rope_head_dim")?,
                    v_head_dim: h.req("v_head_dim")?,
                };
                head_dim = m.qk_nope_head_dim + m.qk_rope_head_dim;
                v_head_dim = m.v_head_dim;
                mla = Some(m);
            }
            Architecture::GptOss => {
                sliding_window = Some(h.req("sliding_window")?);
                layers = match layer_types(c, n_layers)? {
                    Some(l) => l,
                    None => (0..n_layers)
                        .map(|i| {
                            if i % 2 == 0 {
                                LayerKind::SlidingAttention
                            } else {
                                LayerKind::FullAttention
                            }
                        })
                        .collect(),
                };
            }
        }
        // `partial_rotary_factor` sits at the top level (Qwen3-Next) or in
        // `rope_parameters` (transformers 5 configs of Qwen3.5).
        let partial = match h.opt_f("partial_rotary_factor")? {
            Some(f) => f,
            None => c
                .get("rope_parameters")
                .and_then(|r| r.get("partial_rotary_factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
        };
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "partial_rotary_factor".into(),
                message: format!("{partial} is not in (0, 1]"),
            });
        }
        let rope_dims = match mla {
            Some(m) => m.qk_rope_head_dim,
            None => ((head_dim as f64 * partial) as usize) & !1,
        };
        Ok(ModelConfig {
            arch,
            n_layers,
            hidden,
            vocab,
            context_length,
            n_heads,
            n_kv_heads,
            head_dim,
            v_head_dim,
            layers,
            moe_layers,
            n_experts,
            n_experts_used,
            n_shared_experts,
            expert_ff,
            shared_ff,
            dense_ff,
            rms_eps,
            rope_theta,
            rope_dims,
            sliding_window,
            linear,
            mla,
            defaults_used: h.defaults.into_inner(),
        })
    }
}

/// The Qwen hybrids' default pattern: every `interval`-th layer is full
/// attention, the rest linear.
fn hybrid_pattern(n_layers: usize, interval: usize) -> Vec<LayerKind> {
    (0..n_layers)
        .map(|i| {
            if (i + 1) % interval == 0 {
                LayerKind::FullAttention
            } else {
                LayerKind::LinearAttention
            }
        })
        .collect()
}

/// A `layer_types` list, if the config has one.
fn layer_types(c: &Value, n_layers: usize) -> Result<Option<Vec<LayerKind>>, ConfigError> {
    let Some(list) = c.get("layer_types").and_then(Value::as_array) else {
        return Ok(None);
    };
    let invalid = |message: String| ConfigError::Invalid {
        key: "layer_types".into(),
        message,
    };
    if list.len() != n_layers {
        return Err(invalid(format!(
            "{} entries for {n_layers} layers",
            list.len()
        )));
    }
    list.iter()
        .map(|v| match v.as_str() {
            Some("full_attention") => Ok(LayerKind::FullAttention),
            Some("sliding_attention") => Ok(LayerKind::SlidingAttention),
            Some("linear_attention") => Ok(LayerKind::LinearAttention),
            other => Err(invalid(format!("unknown layer type {other:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Typed access to `{arch}.key` GGUF metadata.
struct Gguf<'a> {
    meta: &'a Metadata,
    prefix: &'a str,
    defaults: std::cell::RefCell<Vec<String>>,
}

impl Gguf<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    fn opt(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        let key = self.key(k);
        match self.meta.get(&key) {
            None => Ok(None),
            // Some converters write per-layer arrays (e.g. head counts);
            // the largest entry is the one that sizes buffers.
            Some(MetaValue::Array(a)) => Ok(a
                .to_i64s()
                .and_then(|v| v.into_iter().max())
                .and_then(|v| usize::try_from(v).ok())),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or(ConfigError::Invalid {
                    key,
                    message: format!("expected an unsigned integer, found {v}"),
                }),
        }
    }

    fn req(&self, k: &str) -> Result<usize, ConfigError> {
        self.opt(k)?
            .ok_or_else(|| ConfigError::Missing(self.key(k)))
    }

    fn or(&self, k: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt(k)?.unwrap_or_else(|| {
            self.defaults
                .borrow_mut()
                .push(format!("{} = {default}", self.key(k)));
            default
        }))
    }

    fn opt_f(&self, k: &str) -> Result<Option<f64>, ConfigError> {
        let key = self.key(k);
        match self.meta.get(&key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(ConfigError::Invalid {
                key,
                message: format!("expected a number, found {v}"),
            }),
        }
    }

    fn req_f(&self, k: &str) -> Result<f64, ConfigError> {
        self.opt_f(k)?
            .ok_or_else(|| ConfigError::Missing(self.key(k)))
    }

    fn f_or(&self, k: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.opt_f(k)?.unwrap_or_else(|| {
            self.defaults
                .borrow_mut()
                .push(format!("{} = {default}", self.key(k)));
            default
        }))
    }
}

/// Typed access to `config.json` keys.
struct Hf<'a> {
    c: &'a Value,
    defaults: std::cell::RefCell<Vec<String>>,
}

impl Hf<'_> {
    fn opt(&self, k: &str) -> Result<Option<usize>, ConfigError> {
        match self.c.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| ConfigError::Invalid {
                    key: k.into(),
                    message: format!("expected an unsigned integer, found {v}"),
                }),
        }
    }

    fn req(&self, k: &str) -> Result<usize, ConfigError> {
        self.opt(k)?.ok_or_else(|| ConfigError::Missing(k.into()))
    }

    fn or(&self, k: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt(k)?.unwrap_or_else(|| {
            self.defaults.borrow_mut().push(format!("{k} = {default}"));
            default
        }))
    }

    fn opt_f(&self, k: &str) -> Result<Option<f64>, ConfigError> {
        match self.c.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| ConfigError::Invalid {
                key: k.into(),
                message: format!("expected a number, found {v}"),
            }),
        }
    }

    fn req_f(&self, k: &str) -> Result<f64, ConfigError> {
        self.opt_f(k)?.ok_or_else(|| ConfigError::Missing(k.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hybrid_pattern_every_fourth_is_full() {
        use LayerKind::*;
        assert_eq!(
            hybrid_pattern(8, 4),
            vec![
                LinearAttention,
                LinearAttention,
                LinearAttention,
                FullAttention,
                LinearAttention,
                LinearAttention,
                LinearAttention,
                FullAttention
            ]
        );
    }

    #[test]
    fn hf_qwen3_moe() {
        let c = json!({
            "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "num_experts": 128, "num_experts_per_tok": 8,
            "moe_intermediate_size": 768, "intermediate_size": 6144, "decoder_sparse_step": 1,
            "mlp_only_layers": []
        });
        let m = ModelConfig::from_hf(&c).unwrap();
        assert_eq!(m.arch, Architecture::Qwen3Moe);
        assert_eq!(
            (m.n_layers, m.head_dim, m.n_experts, m.n_experts_used),
            (48, 128, 128, 8)
        );
        assert!(m.moe_layers.iter().all(|&x| x));
        // 48 layers × 4 kv heads × (128 + 128) × 2 bytes per token.
        assert_eq!(m.kv_bytes(1, KvType::F16), 48 * 4 * 256 * 2);
        assert_eq!(m.kv_bytes(1, KvType::Q8_0), 48 * 4 * 256 * 34 / 32);
    }

    #[test]
    fn hf_unknown_and_missing() {
        assert_eq!(
            ModelConfig::from_hf(&json!({"model_type": "llama"})),
            Err(ConfigError::Unsupported("llama".into()))
        );
        assert_eq!(
            ModelConfig::from_hf(&json!({"model_type": "mixtral"})),
            Err(ConfigError::Missing("num_hidden_layers".into()))
        );
    }
}
