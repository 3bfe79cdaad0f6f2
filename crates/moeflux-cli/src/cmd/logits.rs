//! `moeflux logits`: the logits of every position, as a `.npy` file — how
//! moeflux is compared with other engines. Keep this interface stable.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Token ids, comma-separated (no tokenizer needed).
    #[arg(long, value_name = "IDS", conflicts_with = "prompt")]
    pub tokens: Option<String>,

    /// Text to tokenize instead (special-token strings are parsed).
    #[arg(short = 'p', long = "prompt", value_name = "TEXT")]
    pub prompt: Option<String>,

    /// Where to write the float32 array of shape [n_tokens, vocab].
    #[arg(short = 'o', long = "out", value_name = "FILE.npy")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = args.model.open()?;
    let ids: Vec<u32> = match (&args.tokens, &args.prompt) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u32>()
                    .with_context(|| format!("--tokens: {s:?} is not a token id"))
            })
            .collect::<anyhow::Result<_>>()?,
        (None, Some(text)) => engine.tokenizer()?.encode(text, true, true)?,
        (None, None) => bail!("give --tokens 1,2,3 or --prompt TEXT"),
    };
    if ids.is_empty() {
        bail!("no tokens to evaluate");
    }
    let mut session = engine.new_session();
    let logits = session.eval_all(&ids)?;
    let vocab = engine.vocab();
    moeflux::npy::write_f32(&args.out, &[ids.len(), vocab], &logits)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} × {} logits to {}",
        ids.len(),
        vocab,
        args.out.display()
    );
    Ok(())
}
