//! `moeflux demo`: the streaming job on any machine, with nothing to
//! download. Synthesizes a model of the Qwen3-30B-A3B shape cut to a few
//! layers (once, into a cache directory), then generates text under a
//! memory budget well below the model's size and prints the plan, the
//! expert traffic and the speed.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moeflux::experts::plan::fmt_bytes;
use moeflux::quant::GgmlType;
use moeflux::synth::{self, SynthSpec};
use serde_json::json;

use super::model_args::{stats_line, ModelArgs, SamplingArgs};
use super::report::{peak_rss, store_report};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the synthesized model is kept (default: $XDG_CACHE_HOME/moeflux
    /// or ~/.cache/moeflux).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Layers of the Qwen3-30B-A3B shape to keep (48 is the whole model).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,

    /// Memory budget for the run (default: 60 % of the model's size, so
    /// routed experts must stream).
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,

    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 48)]
    pub n_predict: usize,

    /// Which backend computes: auto, cpu or gpu (see `moeflux run --help`).
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    pub backend: String,

    /// The prompt.
    #[arg(short = 'p', long, default_value = "Tell me about streaming experts.")]
    pub prompt: String,
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("moeflux");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("moeflux"),
        None => std::env::temp_dir().join("moeflux"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(cache_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = SynthSpec {
        preset: synth::preset("qwen3-30b-a3b")?,
        layers: Some(args.layers),
        quant: GgmlType::Q4_K,
        skew: Some(1.0),
        seed: 1,
    };
    let path = dir.join(format!("demo-qwen3-30b-a3b-{}l-q4_k.gguf", args.layers));
    if !path.is_file() {
        eprintln!(
            "synthesizing a random-weight Qwen3-30B-A3B cut to {} layers (Q4_K, Zipf-skewed routing) into {}",
            args.layers,
            path.display()
        );
        let tmp = path.with_extension("partial");
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "writing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        synth::write(&spec, &mut out, &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?;
        out.flush()?;
        bar.finish_and_clear();
        std::fs::rename(&tmp, &path)?;
    }
    let size = std::fs::metadata(&path)?.len();
    let mem = args
        .mem
        .clone()
        .unwrap_or_else(|| format!("{}M", (size * 6 / 10) >> 20));
    eprintln!(
        "model {} ({}), budget --mem {} (the routed experts stream from disk through the expert cache)",
        path.display(),
        fmt_bytes(size),
        mem
    );
    let model = ModelArgs {
        model: path,
        ctx: 1024,
        ubatch: 512,
        threads: 0,
        kv_type: "f16".into(),
        mem: super::mem::MemArgs {
            mem: Some(mem),
            expert_cache: None,
        },
        io: "direct".into(),
        prefetch: "off".into(),
        checkpoints: 4,
        backend: args.backend.clone(),
        gpu_mem: None,
        verbose: false,
    };
    let engine = model.open()?;
    let sampling = SamplingArgs {
        n_predict: args.n_predict,
        temp: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: Some(7),
        stop: Vec::new(),
    };
    let params = sampling.params();
    let tok = engine.tokenizer()?;
    let text = engine.chat_template()?.render(
        &json!([{"role": "user", "content": args.prompt}]),
        None,
        true,
        None,
    )?;
    let ids = tok.encode(&text, true, false)?;
    let mut session = engine.new_session();
    let mut stdout = std::io::stdout().lock();
    eprintln!("(random weights: the text is noise; the numbers are the point)");
    let g = session.generate(&ids, &params, |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        true
    })?;
    let _ = writeln!(stdout);
    eprintln!("{}", stats_line(&g, params.seed));
    let tokens = g.prompt_tokens + g.tokens.len();
    eprint!(
        "{}",
        store_report(
            &engine.store_stats(),
            g.prompt_secs + g.gen_secs,
            tokens,
            false
        )
    );
    eprintln!(
        "memory: peak RSS {} under a budget of {} for a {} model",
        fmt_bytes(peak_rss().unwrap_or(0)),
        fmt_bytes(engine.plan().total_bytes()),
        fmt_bytes(size)
    );
    Ok(())
}
