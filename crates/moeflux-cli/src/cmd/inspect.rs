//! `moeflux inspect PATH`.

use std::path::PathBuf;

use anyhow::Context;
use moeflux::experts::plan::fmt_bytes;
use moeflux::format::ModelFiles;
use moeflux::inspect::{inspect, InspectReport, PlanRequest};
use moeflux::model::LayerKind;

use super::mem::MemArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A .gguf file (the first shard of a split model), or a Hugging Face /
    /// MLX checkpoint directory.
    pub path: PathBuf,

    #[command(flatten)]
    pub mem: MemArgs,

    /// Context length (tokens) the KV cache is planned for.
    #[arg(
        short = 'c',
        long = "ctx-size",
        alias = "ctx",
        value_name = "N",
        default_value_t = 4096
    )]
    pub ctx: u64,

    /// Element type of the KV cache the plan sizes (as `run --kv-type`).
    #[arg(long, value_name = "TYPE", default_value = "f16", value_parser = super::model_args::KV_TYPES)]
    pub kv_type: String,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Also list every layer's expert sizes.
    #[arg(short, long)]
    pub verbose: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let files = ModelFiles::open(&args.path)
        .with_context(|| format!("cannot open {}", args.path.display()))?;
    let req = PlanRequest {
        budget: args.mem.budget()?,
        ctx: args.ctx,
        kv_type: moeflux::state::KvType::from_name(&args.kv_type).unwrap_or_default(),
        ..PlanRequest::default()
    };
    let report = inspect(&files, &req);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, args.verbose));
    }
    Ok(())
}

fn pct(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

/// Runs of equal layer kinds: `3 × linear attention, 1 × full attention, ...`.
fn layer_summary(kinds: &[LayerKind]) -> String {
    let name = |k: LayerKind| match k {
        LayerKind::FullAttention => "full attention",
        LayerKind::SlidingAttention => "sliding-window attention",
        LayerKind::LinearAttention => "linear attention (Gated DeltaNet)",
        LayerKind::Mla => "MLA",
    };
    let mut counts: Vec<(LayerKind, usize)> = Vec::new();
    for &k in kinds {
        match counts.iter_mut().find(|(c, _)| *c == k) {
            Some((_, n)) => *n += 1,
            None => counts.push((k, 1)),
        }
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n} × {}", name(*k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render(r: &InspectReport, verbose: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let container = match (r.container, r.gguf_version, r.mlx_quantized) {
        ("gguf", Some(v), _) => format!("GGUF v{v}"),
        (_, _, true) => "safetensors (MLX affine quantized)".to_string(),
        (c, _, _) => c.to_string(),
    };
    let _ = writeln!(
        s,
        "model       {} ({container}, {} file{}, {})",
        r.path,
        r.files,
        if r.files == 1 { "" } else { "s" },
        fmt_bytes(r.file_bytes)
    );
    match (&r.config, &r.unsupported) {
        (Some(c), _) => {
            let _ = writeln!(s, "arch        {}", r.architecture);
            let _ = writeln!(
                s,
                "layers      {}: {}",
                c.n_layers,
                layer_summary(&c.layers)
            );
            let dense = c.moe_layers.iter().filter(|&&m| !m).count();
            if dense > 0 {
                let _ = writeln!(
                    s,
                    "            {dense} dense-FFN layer(s) (ff {})",
                    c.dense_ff
                );
            }
            let _ = writeln!(
                s,
                "attention   hidden {}, {} heads ({} KV), head dim {}{}",
                c.hidden,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.sliding_window
                    .map(|w| format!(", window {w}"))
                    .unwrap_or_default()
            );
            if let Some(l) = c.linear {
                let _ = writeln!(
                    s,
                    "linear      {} key / {} value heads, dims {}/{}, conv {}",
                    l.n_k_heads, l.n_v_heads, l.k_head_dim, l.v_head_dim, l.conv_kernel
                );
            }
            if let Some(m) = c.mla {
                let _ = writeln!(
                    s,
                    "mla         q rank {}, kv rank {}, nope {} + rope {}, v {}",
                    m.q_lora_rank.map_or("-".into(), |r| r.to_string()),
                    m.kv_lora_rank,
                    m.qk_nope_head_dim,
                    m.qk_rope_head_dim,
                    m.v_head_dim
                );
            }
            let _ = writeln!(
                s,
                "experts     {} routed, top-{} per token, {} shared; expert ff {}{}",
                c.n_experts,
                c.n_experts_used,
                c.n_shared_experts,
                c.expert_ff,
                if c.shared_ff > 0 {
                    format!(", shared ff {}", c.shared_ff)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(
                s,
                "context     {} tokens, vocab {}",
                c.context_length, c.vocab
            );
            for d in &c.defaults_used {
                let _ = writeln!(s, "default     {d} (key absent)");
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(
                s,
                "arch        {} — not supported yet: {why}",
                r.architecture
            );
        }
        (None, None) => {}
    }
    let types = r
        .by_type
        .iter()
        .map(|t| format!("{} {} ({})", t.ty, t.tensors, fmt_bytes(t.bytes)))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(s, "tensors     {}: {types}", r.tensor_count);
    let total = r.dense_bytes + r.expert_bytes;
    let _ = writeln!(
        s,
        "bytes       dense {} ({:.1}%), routed experts {} ({:.1}%)",
        fmt_bytes(r.dense_bytes),
        pct(r.dense_bytes, total),
        fmt_bytes(r.expert_bytes),
        pct(r.expert_bytes, total)
    );
    if let (Some(first), Some(last)) = (r.expert_layers.first(), r.expert_layers.last()) {
        let same = r.expert_layers.iter().all(|l| {
            l.one_expert_bytes == first.one_expert_bytes && l.n_experts == first.n_experts
        });
        if same {
            let _ = writeln!(
                s,
                "per layer   one expert {} × {} experts, layers {}..={}",
                fmt_bytes(first.one_expert_bytes),
                first.n_experts,
                first.layer,
                last.layer
            );
        }
        if verbose || !same {
            for l in &r.expert_layers {
                let _ = writeln!(
                    s,
                    "  layer {:>3}  one expert {} × {} experts",
                    l.layer,
                    fmt_bytes(l.one_expert_bytes),
                    l.n_experts
                );
            }
        }
    }
    match (&r.plan, &r.plan_error) {
        (Some(p), _) => {
            let _ = writeln!(
                s,
                "plan        {} [ctx {}, KV {}]",
                p.summary(),
                r.plan_ctx,
                r.plan_kv_type
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "plan        refused: {e}");
        }
        (None, None) => {}
    }
    s
}
