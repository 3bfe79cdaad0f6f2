//! `moeflux synth`: write a random-weight model at a real shape.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moeflux::experts::plan::fmt_bytes;
use moeflux::quant::GgmlType;
use moeflux::synth::{self, SynthSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shape: qwen3-30b-a3b, qwen3-235b-a22b (Qwen3-MoE);
    /// qwen3.5-35b-a3b, qwen3.5-122b-a10b, qwen3.5-397b-a17b,
    /// qwen3-next-80b-a3b (hybrids: Gated DeltaNet, gated attention, a
    /// shared expert); tiny-qwen3moe, tiny-qwen35moe, test-stream (tests).
    #[arg(long, value_name = "NAME")]
    pub preset: String,

    /// Keep only the first N layers (to fit a disk, or for quick runs).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,

    /// Type of the large matrices: q4_k, q4_0, q8_0, q5_k, q6_k, f16, bf16.
    #[arg(long, value_name = "TYPE", default_value = "q4_k")]
    pub quant: String,

    /// Skew expert popularity to a Zipf law, e.g. zipf:1.0 (default:
    /// random routers, which pick experts almost uniformly).
    #[arg(long, value_name = "zipf:S")]
    pub skew: Option<String>,

    /// Seed of the random weights.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Output file.
    #[arg(short = 'o', long = "output", value_name = "FILE.gguf")]
    pub output: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = SynthSpec {
        preset: synth::preset(&args.preset)?,
        layers: args.layers,
        quant: GgmlType::from_name(&args.quant)
            .with_context(|| format!("unknown quant type {:?}", args.quant))?,
        skew: args.skew.as_deref().map(synth::parse_skew).transpose()?,
        seed: args.seed,
    };
    let file = std::fs::File::create(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let mut out = BufWriter::with_capacity(8 << 20, file);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("writing {}", args.output.display()));
    let total = synth::write(&spec, &mut out, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    out.flush()?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({}): {} with {} layers, {} weights{}",
        args.output.display(),
        fmt_bytes(total),
        spec.preset.name,
        args.layers
            .unwrap_or(spec.preset.layers)
            .min(spec.preset.layers),
        spec.quant,
        spec.skew
            .map(|s| format!(", Zipf {s} routing"))
            .unwrap_or_default()
    );
    Ok(())
}
