//! The `moeflux` command.

mod cmd;

use clap::{Parser, Subcommand};

/// Run Mixture-of-Experts language models larger than your RAM: dense
/// weights stay resident, routed experts stream from disk through a
/// budgeted cache.
#[derive(Parser)]
#[command(name = "moeflux", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a model larger than its memory budget, with nothing to
    /// download: synthesizes a Qwen3-30B-A3B-shaped model cut to a few
    /// layers (once), then generates text and prints the expert traffic.
    Demo(cmd::demo::Args),
    /// Describe a model: architecture, shapes, bytes per quant type, dense
    /// vs routed-expert bytes, and the memory plan for a budget.
    Inspect(cmd::inspect::Args),
    /// Generate text from one prompt, streamed to stdout; a stats line
    /// (prompt and generation tok/s) goes to stderr.
    Run(cmd::run::Args),
    /// Chat interactively; the conversation's KV cache is kept between
    /// turns. /reset starts over, /exit quits.
    Chat(cmd::chat::Args),
    /// Write the logits of every position of a token sequence to a .npy
    /// file (for comparing engines).
    Logits(cmd::logits::Args),
    /// Measure prompt and decode speed (tok/s) on a model.
    Bench(cmd::bench::Args),
    /// Write a random-weight model at a real shape (GGUF that llama.cpp
    /// also loads), for benchmarks.
    Synth(cmd::synth::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Synth(args) => cmd::synth::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
