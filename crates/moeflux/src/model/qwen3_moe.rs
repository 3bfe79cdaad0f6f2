//! Qwen3-MoE (`qwen3moe` in GGUF, `qwen3_moe` in Hugging Face / MLX).
//!
//! Each layer: RMSNorm → GQA attention with per-head q/k RMSNorm and NEOX
//! RoPE → residual → RMSNorm → softmax router, top-k, renormalised when
//! `norm_topk_prob` → SwiGLU experts → residual. Tensor names:
//!
//! | role | GGUF | Hugging Face (MLX: experts under `mlp.switch_mlp`) |
//! |---|---|---|
//! | embedding | `token_embd` | `model.embed_tokens` |
//! | attention | `blk.L.attn_{q,k,v,output}`, `attn_{q,k}_norm` | `model.layers.L.self_attn.{q,k,v,o}_proj`, `{q,k}_norm` |
//! | norms | `blk.L.attn_norm`, `blk.L.ffn_norm`, `output_norm` | `input_layernorm`, `post_attention_layernorm`, `model.norm` |
//! | router | `blk.L.ffn_gate_inp` | `mlp.gate` |
//! | experts | `blk.L.ffn_{gate,up,down}_exps` (stacked) | `mlp.experts.E.{gate,up,down}_proj` |
//! | head | `output` (absent when tied) | `lm_head` |

use super::attention::{Attention, Rope};
use super::moe::{norm_topk, Moe, Routing};
use super::transformer::{Ffn, Layer, Mixer, Model};
use super::weights::{Loader, WeightError, WeightRef};
use super::ModelConfig;
use crate::backend::cpu::ops::rope_inv_freq;
use crate::experts::ExpertRef;
use crate::format::ModelFiles;

/// Where a checkpoint's Hugging Face tensor names start: `model.` for text
/// models, `model.language_model.` / `language_model.model.` for the text
/// part of multimodal checkpoints.
pub fn hf_prefix(l: &Loader<'_>) -> &'static str {
    ["model.", "model.language_model.", "language_model.model."]
        .into_iter()
        .find(|p| l.has(&format!("{p}embed_tokens.weight")))
        .unwrap_or("model.")
}

/// The token embedding and the LM head (the embedding itself when the
/// head is tied). `p` is the Hugging Face prefix ("" for GGUF).
pub fn embed_and_head(
    l: &Loader<'_>,
    p: &str,
    vocab: usize,
    hidden: usize,
) -> Result<(WeightRef, WeightRef), WeightError> {
    let (embed_name, heads): (String, &[&str]) = if l.is_gguf() {
        ("token_embd.weight".into(), &["output.weight"])
    } else {
        (
            format!("{p}embed_tokens.weight"),
            // Text models and `model.language_model.` checkpoints keep the
            // head at the top; mlx-lm's multimodal layout nests it.
            &["lm_head.weight", "language_model.lm_head.weight"],
        )
    };
    let embed = l.matrix(&embed_name, vocab, hidden)?;
    let lm_head = match heads.iter().find(|n| l.has(n)) {
        Some(n) => l.matrix(n, vocab, hidden)?,
        None => embed.clone(),
    };
    Ok((embed, lm_head))
}

/// Builds the model and its expert table.
pub fn load(
    files: &ModelFiles,
    mut cfg: ModelConfig,
) -> Result<(Model, Vec<Vec<ExpertRef>>), WeightError> {
    let l = Loader::new(files);
    let gguf = l.is_gguf();
    let (h, v) = (cfg.hidden, cfg.vocab);
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    // llama.cpp hard-codes renormalisation for qwen3moe GGUFs; transformers
    // defaults `norm_topk_prob` to false.
    let norm = norm_topk(files, &mut cfg, true, false);
    let p = if gguf { "" } else { hf_prefix(&l) };
    let name = |gguf_name: &str, hf_name: &str| -> String {
        if gguf {
            gguf_name.to_string()
        } else {
            format!("{p}{hf_name}")
        }
    };

    let (embed, lm_head) = embed_and_head(&l, p, v, h)?;
    let output_norm = l.vector(&name("output_norm.weight", "norm.weight"), h)?;
    let inv_freq = rope_inv_freq(cfg.rope_dims, cfg.rope_theta);

    let mut layers = Vec::with_capacity(cfg.n_layers);
    let mut experts = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let g = |s: &str| format!("blk.{i}.{s}");
        let f = |s: &str| format!("{p}layers.{i}.{s}");
        let n = |gs: &str, hs: &str| if gguf { g(gs) } else { f(hs) };
        let attn = Attention {
            wq: l.matrix(&n("attn_q.weight", "self_attn.q_proj.weight"), nh * hd, h)?,
            wk: l.matrix(&n("attn_k.weight", "self_attn.k_proj.weight"), nkv * hd, h)?,
            wv: l.matrix(&n("attn_v.weight", "self_attn.v_proj.weight"), nkv * hd, h)?,
            wo: l.matrix(
                &n("attn_output.weight", "self_attn.o_proj.weight"),
                h,
                nh * hd,
            )?,
            q_norm: Some(l.vector(&n("attn_q_norm.weight", "self_attn.q_norm.weight"), hd)?),
            k_norm: Some(l.vector(&n("attn_k_norm.weight", "self_attn.k_norm.weight"), hd)?),
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            norm_eps: cfg.rms_eps,
            rope: Rope {
                inv_freq: inv_freq.clone(),
            },
            output_gate: false,
        };
        let attn_norm = l.vector(&n("attn_norm.weight", "input_layernorm.weight"), h)?;
        let ffn_norm = l.vector(&n("ffn_norm.weight", "post_attention_layernorm.weight"), h)?;
        if !cfg.moe_layers[i] {
            return Err(WeightError::Unsupported {
                name: f("mlp"),
                message: "dense (mlp_only) Qwen3-MoE layers are not supported yet".into(),
            });
        }
        let (ne, ff) = (cfg.n_experts, cfg.expert_ff);
        let router = l.matrix(&n("ffn_gate_inp.weight", "mlp.gate.weight"), ne, h)?;
        experts.push(layer_experts(&l, gguf, &g, &f, ne, ff, h)?);
        layers.push(Layer {
            attn_norm,
            mixer: Mixer::Attention(attn),
            ffn_norm,
            ffn: Ffn::Moe(Moe {
                layer: i,
                router,
                routing: Routing::SoftmaxTopK {
                    k: cfg.n_experts_used,
                    norm,
                },
                n_experts: ne,
                expert_ff: ff,
            }),
            shared: None,
        });
    }
    Ok((
        Model {
            cfg,
            embed,
            layers,
            output_norm,
            lm_head,
        },
        experts,
    ))
}

/// The experts of one layer in whichever layout the checkpoint uses:
/// GGUF stacked tensors, MLX stacked `switch_mlp`, or HF per-expert tensors.
pub fn layer_experts(
    l: &Loader<'_>,
    gguf: bool,
    g: &dyn Fn(&str) -> String,
    f: &dyn Fn(&str) -> String,
    ne: usize,
    ff: usize,
    h: usize,
) -> Result<Vec<ExpertRef>, WeightError> {
    let stacked = |gate: String, up: String, down: String| -> Result<Vec<ExpertRef>, WeightError> {
        (0..ne)
            .map(|e| {
                Ok(ExpertRef {
                    gate: l.stacked_matrix(&gate, e, ne, ff, h)?,
                    up: l.stacked_matrix(&up, e, ne, ff, h)?,
                    down: l.stacked_matrix(&down, e, ne, h, ff)?,
                })
            })
            .collect()
    };
    if gguf {
        return stacked(
            g("ffn_gate_exps.weight"),
            g("ffn_up_exps.weight"),
            g("ffn_down_exps.weight"),
        );
    }
    if l.has(&f("mlp.switch_mlp.gate_proj.weight")) {
        return stacked(
            f("mlp.switch_mlp.gate_proj.weight"),
            f("mlp.switch_mlp.up_proj.weight"),
            f("mlp.switch_mlp.down_proj.weight"),
        );
    }
    (0..ne)
        .map(|e| {
            let m = |proj: &str, rows, cols| -> Result<WeightRef, WeightError> {
                l.matrix(&f(&format!("mlp.experts.{e}.{proj}.weight")), rows, cols)
            };
            Ok(ExpertRef {
                gate: m("gate_proj", ff, h)?,
                up: m("up_proj", ff, h)?,
                down: m("down_proj", h, ff)?,
            })
        })
        .collect()
}
