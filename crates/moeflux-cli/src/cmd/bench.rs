//! `moeflux bench`: prompt and decode speed on a model.

use std::time::Instant;

use moeflux::sampling::argmax;
use serde_json::json;

use super::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Prompt tokens (random ids, seeded).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_name = "N",
        default_value_t = 512
    )]
    pub n_prompt: usize,

    /// Tokens to generate (greedy).
    #[arg(short = 'n', long = "n-gen", value_name = "N", default_value_t = 128)]
    pub n_gen: usize,

    /// Seed of the random prompt.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    if args.model.ctx == 0 {
        args.model.ctx = args.n_prompt + args.n_gen + 1;
    }
    let t0 = Instant::now();
    let engine = args.model.open()?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = engine.vocab() as u64;
    let mut rng = moeflux::synth::Rng::new(args.seed);
    let prompt: Vec<u32> = (0..args.n_prompt)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();

    let mut session = engine.new_session();
    let t = Instant::now();
    let mut logits = session.eval(&prompt)?;
    let prompt_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..args.n_gen {
        let next = argmax(&logits);
        logits = session.eval(&[next])?;
    }
    let gen_s = t.elapsed().as_secs_f64();
    let prompt_tps = args.n_prompt as f64 / prompt_s;
    let gen_tps = args.n_gen as f64 / gen_s;
    let report = json!({
        "model": args.model.model.display().to_string(),
        "threads": engine.threads(),
        "cpu_level": engine.cpu_level().name(),
        "load_s": load_s,
        "prompt_tokens": args.n_prompt,
        "prompt_tok_s": prompt_tps,
        "ttft_s": prompt_s,
        "gen_tokens": args.n_gen,
        "decode_tok_s": gen_tps,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} threads ({}), load {:.1} s\nprompt  {:>5} tokens  {:>8.2} tok/s  (time to first token {:.2} s)\ndecode  {:>5} tokens  {:>8.2} tok/s",
            args.model.model.display(),
            engine.threads(),
            engine.cpu_level().name(),
            load_s,
            args.n_prompt,
            prompt_tps,
            prompt_s,
            args.n_gen,
            gen_tps
        );
    }
    Ok(())
}
