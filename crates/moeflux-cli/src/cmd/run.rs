//! `moeflux run`: one prompt, streamed to stdout.

use std::io::Write;

use anyhow::Context;
use serde_json::json;

use super::model_args::{stats_line, ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt.
    #[arg(short = 'p', long = "prompt", value_name = "TEXT")]
    pub prompt: String,

    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,

    /// A system message (chat template only).
    #[arg(long, value_name = "TEXT", conflicts_with = "raw")]
    pub system: Option<String>,

    /// With --raw, parse special-token strings (like <|im_start|>) in the
    /// prompt as special tokens.
    #[arg(long)]
    pub special: bool,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Print the expert store's statistics after the run.
    #[arg(long)]
    pub stats: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = args.model.open()?;
    let tok = engine.tokenizer()?;
    let ids = if args.raw {
        tok.encode(&args.prompt, args.special, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": args.prompt}));
        let text = engine
            .chat_template()?
            .render(&json!(messages), None, true, None)
            .context("rendering the chat template")?;
        tok.encode(&text, true, false)?
    };
    let params = args.sampling.params();
    let mut session = engine.new_session();
    let mut stdout = std::io::stdout().lock();
    let g = session.generate(&ids, &params, |text| {
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        true
    })?;
    let _ = writeln!(stdout);
    eprintln!("{}", stats_line(&g, params.seed));
    if args.stats {
        let tokens = g.prompt_tokens + g.tokens.len();
        eprint!(
            "{}",
            super::report::store_report(
                &engine.store_stats(),
                g.prompt_secs + g.gen_secs,
                tokens,
                args.model.verbose
            )
        );
    }
    Ok(())
}
