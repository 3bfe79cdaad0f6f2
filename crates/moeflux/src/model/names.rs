//! Tensor naming conventions shared by the families: which tensors are
//! routed experts, and of which layer.
//!
//! Routed-expert tensors are recognised by name, in every layout moeflux
//! reads:
//! - GGUF: `blk.L.ffn_{gate,up,down,gate_up}_exps.{weight,bias}` (stacked
//!   `[n_expert, ...]`);
//! - Hugging Face, per expert: `...layers.L.mlp.experts.E.*` (Qwen,
//!   DeepSeek), `...layers.L.block_sparse_moe.experts.E.*` (Mixtral);
//! - Hugging Face, stacked: `...layers.L.mlp.experts.{gate_up_proj,...}`
//!   (GPT-OSS);
//! - MLX: `...layers.L.mlp.switch_mlp.*` (stacked).
//!
//! Shared experts (`shared_expert`, `shared_experts`, `*_shexp`) are dense:
//! they run for every token and stay resident.

/// Where a routed-expert tensor belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutedExpertTensor {
    pub layer: u32,
    /// `Some(e)` for a per-expert tensor; `None` for a stacked tensor whose
    /// outermost dimension is the expert.
    pub expert: Option<u32>,
}

/// Classifies a tensor name; `None` means a dense (always resident) tensor.
pub fn routed_expert(name: &str) -> Option<RoutedExpertTensor> {
    let parts: Vec<&str> = name.split('.').collect();
    let li = parts
        .iter()
        .position(|p| *p == "blk" || *p == "layers" || *p == "h")?;
    let layer: u32 = parts.get(li + 1)?.parse().ok()?;
    let rest = &parts[li + 2..];
    for (i, p) in rest.iter().enumerate() {
        if p.ends_with("_exps") {
            return Some(RoutedExpertTensor {
                layer,
                expert: None,
            });
        }
        if *p == "experts" || *p == "switch_mlp" {
            let expert = rest.get(i + 1).and_then(|e| e.parse().ok());
            return Some(RoutedExpertTensor { layer, expert });
        }
    }
    None
}

/// The layer index of a per-layer tensor (`blk.L.` / `layers.L.`), if any.
pub fn layer_of(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('.').collect();
    let li = parts.iter().position(|p| *p == "blk" || *p == "layers")?;
    parts.get(li + 1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_every_layout() {
        let stacked = |layer| {
            Some(RoutedExpertTensor {
                layer,
                expert: None,
            })
        };
        assert_eq!(routed_expert("blk.3.ffn_down_exps.weight"), stacked(3));
        assert_eq!(routed_expert("blk.0.ffn_gate_up_exps.bias"), stacked(0));
        assert_eq!(
            routed_expert("model.layers.12.mlp.experts.7.up_proj.weight"),
            Some(RoutedExpertTensor {
                layer: 12,
                expert: Some(7)
            })
        );
        assert_eq!(
            routed_expert("model.layers.1.block_sparse_moe.experts.0.w1.weight"),
            Some(RoutedExpertTensor {
                layer: 1,
                expert: Some(0)
            })
        );
        assert_eq!(
            routed_expert("model.layers.2.mlp.experts.gate_up_proj"),
            stacked(2)
        );
        assert_eq!(
            routed_expert("language_model.model.layers.5.mlp.switch_mlp.down_proj.scales"),
            stacked(5)
        );
        for dense in [
            "blk.0.ffn_down_shexp.weight",
            "blk.0.ffn_gate_inp.weight",
            "model.layers.0.mlp.shared_expert.down_proj.weight",
            "model.layers.0.mlp.shared_experts.down_proj.weight",
            "model.layers.0.mlp.gate.weight",
            "model.embed_tokens.weight",
            "token_embd.weight",
        ] {
            assert_eq!(routed_expert(dense), None, "{dense}");
        }
    }
}
