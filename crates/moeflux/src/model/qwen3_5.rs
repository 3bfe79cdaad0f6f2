//! The Qwen hybrids: Qwen3.5 / Qwen3.6 MoE (`qwen35moe` in GGUF,
//! `qwen3_5_moe` in Hugging Face / MLX) and Qwen3-Next (`qwen3next` /
//! `qwen3_next`).
//!
//! Most layers mix tokens with Gated DeltaNet (see
//! [`super::linear_attention`]); every `full_attention_interval`-th layer
//! uses softmax attention with an output gate, per-head q/k RMSNorm and
//! rotary embedding of a quarter of each head. Every layer's FFN is a MoE
//! (softmax router, top-k, renormalised) plus a shared expert scaled by
//! `σ(shared_expert_gate · h)`.
//!
//! | role | GGUF | Hugging Face (`model.` / `model.language_model.`; MLX `language_model.model.`) |
//! |---|---|---|
//! | norms | `attn_norm`, `post_attention_norm`, `output_norm` | `input_layernorm`, `post_attention_layernorm`, `norm` (zero-centred: 1 + w) |
//! | linear attn | `attn_qkv`, `attn_gate` (z), `ssm_beta` + `ssm_alpha` (qwen35moe) or `ssm_ba` (qwen3next) | `linear_attn.in_proj_{qkv,z,b,a}` (3.5) or `in_proj_{qkvz,ba}` (Next) |
//! | | `ssm_conv1d` `[C, K]`, `ssm_a` (= −exp(A_log)), `ssm_dt.bias`, `ssm_norm`, `ssm_out` | `conv1d.weight` `[C, 1, K]` (MLX `[C, K, 1]`), `A_log`, `dt_bias`, `norm`, `out_proj` |
//! | full attn | `attn_q` (`[q \| gate]` per head), `attn_{k,v,output}`, `attn_{q,k}_norm` | `self_attn.{q,k,v,o}_proj`, `{q,k}_norm` (zero-centred) |
//! | MoE | `ffn_gate_inp`, `ffn_{gate,up,down}_exps` | `mlp.gate`, `mlp.experts.{gate_up_proj,down_proj}` (3.5, fused) or `mlp.experts.E.*` (Next); MLX `mlp.switch_mlp.*` |
//! | shared | `ffn_{gate,up,down}_shexp`, `ffn_gate_inp_shexp` | `mlp.shared_expert.*`, `mlp.shared_expert_gate` |
//!
//! Zero-centred norms: Hugging Face checkpoints store `w` and compute with
//! `1 + w`; the GGUF converter and mlx-lm's loader store `1 + w` already.
//! The gated norm of the linear layers (`ssm_norm` / `linear_attn.norm`) is
//! never shifted. A Hugging Face-named checkpoint whose conv kernel is laid
//! out `[C, K, 1]` has been through mlx-lm and is taken as shifted — the
//! same test mlx-lm applies.

use super::attention::{Attention, Rope};
use super::linear_attention::{GatedDeltaNet, LinearInput, ValueHeads};
use super::moe::{norm_topk, Moe, Routing};
use super::qwen3_moe::{embed_and_head, hf_prefix, layer_experts};
use super::transformer::{DenseFfn, Ffn, Layer, Mixer, Model, SharedExpert};
use super::weights::{Loader, WeightError};
use super::{Architecture, LayerKind, ModelConfig};
use crate::backend::cpu::ops::rope_inv_freq;
use crate::experts::ExpertRef;
use crate::format::ModelFiles;

/// Builds the model and its expert table.
pub fn load(
    files: &ModelFiles,
    mut cfg: ModelConfig,
) -> Result<(Model, Vec<Vec<ExpertRef>>), WeightError> {
    let l = Loader::new(files);
    let gguf = l.is_gguf();
    let (h, v) = (cfg.hidden, cfg.vocab);
    let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let lin = cfg.linear.ok_or_else(|| WeightError::Unsupported {
        name: "config".into(),
        message: "a hybrid model needs the linear-attention shape (ssm.* / linear_*)".into(),
    })?;
    // Qwen3.5's MoE block always renormalises; Qwen3-Next follows
    // `norm_topk_prob` (default true), and llama.cpp renormalises both.
    let norm = cfg.arch == Architecture::Qwen35Moe || norm_topk(files, &mut cfg, true, true);
    let p = if gguf { "" } else { hf_prefix(&l) };
    let g = |i: usize, s: &str| format!("blk.{i}.{s}");
    let f = |i: usize, s: &str| format!("{p}layers.{i}.{s}");

    // Zero-centred norms are shifted here, unless the file has them shifted.
    let first_linear = cfg
        .layers
        .iter()
        .position(|&k| k == LayerKind::LinearAttention);
    let shift = !gguf
        && !first_linear.is_some_and(|i| {
            l.entry(&f(i, "linear_attn.conv1d.weight"))
                .is_ok_and(|e| e.shape.len() == 3 && e.shape[2] == 1 && e.shape[1] > 1)
        });
    let norm_vec = |name: &str, len: usize| -> Result<Vec<f32>, WeightError> {
        let mut w = l.vector(name, len)?;
        if shift {
            w.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(w)
    };

    let (embed, lm_head) = embed_and_head(&l, p, v, h)?;
    let output_norm = norm_vec(
        &if gguf {
            "output_norm.weight".into()
        } else {
            format!("{p}norm.weight")
        },
        h,
    )?;
    let inv_freq = rope_inv_freq(cfg.rope_dims, cfg.rope_theta);
    let heads = match (gguf, cfg.arch) {
        (true, Architecture::Qwen35Moe) => ValueHeads::Tiled,
        _ => ValueHeads::Grouped,
    };
    let (nk, nv, dk, dv) = (lin.n_k_heads, lin.n_v_heads, lin.k_head_dim, lin.v_head_dim);
    if nk == 0 || nv == 0 || !nv.is_multiple_of(nk) || lin.conv_kernel == 0 {
        return Err(WeightError::Unsupported {
            name: "config".into(),
            message: format!(
                "linear attention with {nk} key heads, {nv} value heads and a conv kernel of {} is not a valid shape",
                lin.conv_kernel
            ),
        });
    }
    let r = nv / nk;
    let ch = lin.conv_channels();

    let mut layers = Vec::with_capacity(cfg.n_layers);
    let mut experts = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let n = |gs: &str, hs: &str| if gguf { g(i, gs) } else { f(i, hs) };
        let attn_norm = norm_vec(&n("attn_norm.weight", "input_layernorm.weight"), h)?;
        let ffn_norm = norm_vec(
            &n(
                "post_attention_norm.weight",
                "post_attention_layernorm.weight",
            ),
            h,
        )?;
        let mixer = match cfg.layers[i] {
            LayerKind::LinearAttention => {
                let input = if gguf {
                    let qkv = l.matrix(&g(i, "attn_qkv.weight"), ch, h)?;
                    let z = l.matrix(&g(i, "attn_gate.weight"), nv * dv, h)?;
                    if l.has(&g(i, "ssm_ba.weight")) {
                        LinearInput::SplitBa {
                            qkv,
                            z,
                            ba: l.matrix(&g(i, "ssm_ba.weight"), 2 * nv, h)?,
                        }
                    } else {
                        LinearInput::Split {
                            qkv,
                            z,
                            b: l.matrix(&g(i, "ssm_beta.weight"), nv, h)?,
                            a: l.matrix(&g(i, "ssm_alpha.weight"), nv, h)?,
                        }
                    }
                } else if l.has(&f(i, "linear_attn.in_proj_qkvz.weight")) {
                    LinearInput::Fused {
                        qkvz: l.matrix(
                            &f(i, "linear_attn.in_proj_qkvz.weight"),
                            nk * (2 * dk + 2 * r * dv),
                            h,
                        )?,
                        ba: l.matrix(&f(i, "linear_attn.in_proj_ba.weight"), 2 * nv, h)?,
                    }
                } else {
                    LinearInput::Split {
                        qkv: l.matrix(&f(i, "linear_attn.in_proj_qkv.weight"), ch, h)?,
                        z: l.matrix(&f(i, "linear_attn.in_proj_z.weight"), nv * dv, h)?,
                        b: l.matrix(&f(i, "linear_attn.in_proj_b.weight"), nv, h)?,
                        a: l.matrix(&f(i, "linear_attn.in_proj_a.weight"), nv, h)?,
                    }
                };
                let conv = l.values(
                    &n("ssm_conv1d.weight", "linear_attn.conv1d.weight"),
                    ch * lin.conv_kernel,
                )?;
                let a = if gguf {
                    l.vector(&g(i, "ssm_a"), nv)?
                } else {
                    l.vector(&f(i, "linear_attn.A_log"), nv)?
                        .into_iter()
                        .map(|x| -x.exp())
                        .collect()
                };
                Mixer::Linear(GatedDeltaNet {
                    input,
                    conv,
                    a,
                    dt_bias: l.vector(&n("ssm_dt.bias", "linear_attn.dt_bias"), nv)?,
                    norm: l.vector(&n("ssm_norm.weight", "linear_attn.norm.weight"), dv)?,
                    out: l.matrix(
                        &n("ssm_out.weight", "linear_attn.out_proj.weight"),
                        h,
                        nv * dv,
                    )?,
                    dims: lin,
                    heads,
                    eps: cfg.rms_eps,
                })
            }
            LayerKind::FullAttention => Mixer::Attention(Attention {
                wq: l.matrix(
                    &n("attn_q.weight", "self_attn.q_proj.weight"),
                    2 * nh * hd,
                    h,
                )?,
                wk: l.matrix(&n("attn_k.weight", "self_attn.k_proj.weight"), nkv * hd, h)?,
                wv: l.matrix(&n("attn_v.weight", "self_attn.v_proj.weight"), nkv * hd, h)?,
                wo: l.matrix(
                    &n("attn_output.weight", "self_attn.o_proj.weight"),
                    h,
                    nh * hd,
                )?,
                q_norm: Some(norm_vec(
                    &n("attn_q_norm.weight", "self_attn.q_norm.weight"),
                    hd,
                )?),
                k_norm: Some(norm_vec(
                    &n("attn_k_norm.weight", "self_attn.k_norm.weight"),
                    hd,
                )?),
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                norm_eps: cfg.rms_eps,
                rope: Rope {
                    inv_freq: inv_freq.clone(),
                },
                output_gate: true,
            }),
            other => {
                return Err(WeightError::Unsupported {
                    name: n("attn", "self_attn"),
                    message: format!("a {other:?} layer in a Qwen hybrid"),
                })
            }
        };

        let (ne, ff) = (cfg.n_experts, cfg.expert_ff);
        let router = l.matrix(&n("ffn_gate_inp.weight", "mlp.gate.weight"), ne, h)?;
        let fused = f(i, "mlp.experts.gate_up_proj");
        experts.push(if !gguf && l.has(&fused) {
            let down = f(i, "mlp.experts.down_proj");
            (0..ne)
                .map(|e| {
                    Ok(ExpertRef {
                        gate: l.stacked_rows(&fused, e, ne, 2 * ff, h, 0, ff)?,
                        up: l.stacked_rows(&fused, e, ne, 2 * ff, h, ff, ff)?,
                        down: l.stacked_matrix(&down, e, ne, h, ff)?,
                    })
                })
                .collect::<Result<Vec<_>, WeightError>>()?
        } else {
            layer_experts(&l, gguf, &|s: &str| g(i, s), &|s: &str| f(i, s), ne, ff, h)?
        });
        let sff = cfg.shared_ff;
        let shared = if sff == 0 {
            None
        } else {
            Some(SharedExpert {
                ffn: DenseFfn {
                    gate: l.matrix(
                        &n(
                            "ffn_gate_shexp.weight",
                            "mlp.shared_expert.gate_proj.weight",
                        ),
                        sff,
                        h,
                    )?,
                    up: l.matrix(
                        &n("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
                        sff,
                        h,
                    )?,
                    down: l.matrix(
                        &n(
                            "ffn_down_shexp.weight",
                            "mlp.shared_expert.down_proj.weight",
                        ),
                        h,
                        sff,
                    )?,
                },
                gate: Some(l.row_matrix(
                    &n("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight"),
                    h,
                )?),
            })
        };
        layers.push(Layer {
            attn_norm,
            mixer,
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
            shared,
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
