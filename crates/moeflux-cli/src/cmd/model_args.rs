//! Flags shared by the commands that run a model.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moeflux::engine::Backend;
use moeflux::experts::plan::{fmt_bytes, parse_size};
use moeflux::experts::IoMode;
use moeflux::model::Prefetch;
use moeflux::sampling::SamplingParams;
use moeflux::state::KvType;

use super::mem::MemArgs;
use moeflux::{Engine, EngineOptions};

/// The `--kv-type` values, as `KvType::from_name` reads them.
pub const KV_TYPES: [&str; 3] = ["f16", "f32", "q8_0"];

/// Which model, and how to size its session.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a .gguf file (first shard of a split one) or a Hugging
    /// Face / MLX checkpoint directory.
    #[arg(short = 'm', long = "model", value_name = "PATH")]
    pub model: PathBuf,

    /// Context size in tokens (0: the model's, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", value_name = "N", default_value_t = 0)]
    pub ctx: usize,

    /// Prompt tokens processed per forward pass.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub ubatch: usize,

    /// Compute threads (default: one per physical core).
    #[arg(short = 't', long, value_name = "N", default_value_t = 0)]
    pub threads: usize,

    /// Element type of the KV cache: f16 (the default), f32, or q8_0
    /// (llama.cpp's 8-bit blocks: 34 bytes per 32 values, about half of
    /// f16, at a small cost in accuracy; CPU backend only). Attention
    /// accumulates in f32 whatever the storage.
    #[arg(long, value_name = "TYPE", default_value = "f16", value_parser = KV_TYPES)]
    pub kv_type: String,

    #[command(flatten)]
    pub mem: MemArgs,

    /// How experts are read: `direct` (O_DIRECT into the cache slots, no
    /// second copy in the page cache) or `buffered` (through the page cache).
    #[arg(long, value_name = "MODE", default_value = "direct", value_parser = ["direct", "buffered"])]
    pub io: String,

    /// Expert prefetch: `off` (read experts when a layer asks for them) or
    /// `lookahead` (apply the next layer's router early and start reading what
    /// it picks; try it on a fast local SSD, it did not win on a slow disk).
    /// This is about reads from disk into host memory; the GPU backend's
    /// copies from host memory into VRAM look ahead by themselves where a
    /// Vulkan device has a copy queue (`MOEFLUX_GPU_PREFETCH=0`: off).
    #[arg(long, value_name = "MODE", default_value = "off", value_parser = ["off", "lookahead"])]
    pub prefetch: String,

    /// Recurrent-state checkpoints a session keeps (hybrid models such as
    /// Qwen3.5: `chat` takes one per turn so that editing history
    /// re-evaluates only the turns after it).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub checkpoints: usize,

    /// Which backend computes: `gpu` (wgpu: Vulkan, Metal or DX12; needs a
    /// build with `--features gpu`), `cpu`, or `auto`: the GPU when a
    /// hardware adapter exists and the GPU path supports the model, else
    /// the CPU (a software adapter such as lavapipe counts as none; `gpu`
    /// forces it). A notice names the choice.
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    pub backend: String,

    /// GPU memory for routed experts (e.g. 16G), the GPU tier of the expert
    /// cache; experts beyond it stay in host memory and are copied to the GPU
    /// when routed to. Default: every expert, on a discrete GPU as many as
    /// the device allocates less a tenth for headroom (wgpu cannot query
    /// free VRAM, so on a shared or small GPU set it). On unified memory or a
    /// software adapter the GPU's buffers count against --mem, and the GPU's
    /// experts get half of what the dense weights, KV cache and scratch
    /// leave of it (the host's expert cache the other half; under
    /// --expert-cache, what that cache leaves of the available memory);
    /// where that half cannot hold every expert and the GPU can import host
    /// memory (Vulkan), it reads experts in place from the host's cache
    /// instead, which then gets all of it (not under --expert-cache, nor
    /// for tensors off 4-byte boundaries). Setting --gpu-mem keeps the
    /// GPU's own copies.
    #[arg(long, value_name = "SIZE")]
    pub gpu_mem: Option<String>,

    /// Print the memory plan in detail.
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

impl ModelArgs {
    /// Opens the model, with a progress bar while large dense weights are
    /// read, and prints the memory plan (one line; in detail with `-v`).
    pub fn open(&self) -> anyhow::Result<Engine> {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "loading dense weights [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let progress_bar = bar.clone();
        let engine = Engine::open(
            &self.model,
            EngineOptions {
                ctx: self.ctx,
                ubatch: self.ubatch,
                threads: self.threads,
                kv_type: KvType::from_name(&self.kv_type).unwrap_or_default(),
                cpu_level: None,
                budget: self.mem.budget()?,
                io: IoMode::from_name(&self.io).unwrap_or(IoMode::Direct),
                io_threads: 4,
                prefetch: Prefetch::from_name(&self.prefetch).unwrap_or_default(),
                checkpoints: self.checkpoints,
                backend: Backend::from_name(&self.backend).unwrap_or(Backend::Auto),
                gpu_mem: self
                    .gpu_mem
                    .as_deref()
                    .map(parse_size)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                gpu_in_place: true,
                on_load_progress: Some(Arc::new(move |done, total| {
                    if total >= 256 << 20 && progress_bar.is_hidden() {
                        progress_bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    }
                    progress_bar.set_length(total);
                    progress_bar.set_position(done);
                })),
            },
        )
        .with_context(|| format!("cannot load {}", self.model.display()))?;
        bar.finish_and_clear();
        let plan = engine.plan();
        eprintln!("backend: {}", engine.backend());
        eprintln!("plan: {}", plan.summary());
        if self.verbose {
            let i = &plan.input;
            eprintln!(
                "      dense {} resident; {}{} experts of up to {} ({} per slot); KV {} for {} tokens ({}); scratch {}; io {}{}; {} threads ({})",
                fmt_bytes(i.dense_bytes),
                match i.gpu_bytes {
                    0 => String::new(),
                    b => format!("GPU buffers {} in the same memory; ", fmt_bytes(b)),
                },
                i.total_experts,
                fmt_bytes(i.slot_bytes),
                fmt_bytes(i.slot_bytes),
                fmt_bytes(i.kv_bytes),
                engine.ctx(),
                self.kv_type,
                fmt_bytes(i.scratch_bytes),
                engine.io_mode().name(),
                if engine.io_mode().name() != self.io { " (direct reads refused by the file system)" } else { "" },
                engine.threads(),
                engine.cpu_level().name(),
            );
        } else if engine.io_mode().name() != self.io {
            eprintln!("note: the file system refused direct reads; using buffered reads");
        }
        Ok(engine)
    }
}

/// Sampling flags, named as llama.cpp names them.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(
        short = 'n',
        long = "n-predict",
        value_name = "N",
        default_value_t = 256
    )]
    pub n_predict: usize,
    /// Temperature; 0 is greedy.
    #[arg(long, value_name = "T", default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, value_name = "K", default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: keep tokens up to cumulative probability P (1: all).
    #[arg(long, value_name = "P", default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than M × the most likely one (0: none).
    #[arg(long, value_name = "M", default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise repeats of the last --repeat-last-n tokens (1: off).
    #[arg(long, value_name = "R", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtracted from the logit of any token already present (0: off).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already present (0: off).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (default: a fresh one, printed with the stats).
    #[arg(short = 's', long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop when this text appears (may be repeated).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
            max_tokens: self.n_predict,
            stop: self.stop.clone(),
        }
    }
}

/// The stats line printed to stderr after generating.
pub fn stats_line(g: &moeflux::Generation, seed: u64) -> String {
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    format!(
        "prompt: {} tokens, {:.2} tok/s | generated: {} tokens, {:.2} tok/s | stop: {:?} | seed {}",
        g.prompt_tokens,
        rate(g.prompt_tokens, g.prompt_secs),
        g.tokens.len(),
        rate(g.tokens.len(), g.gen_secs),
        g.stop,
        seed
    )
}
