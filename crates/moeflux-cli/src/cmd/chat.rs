//! `moeflux chat`: an interactive multi-turn conversation.
//!
//! Each turn renders the whole conversation with the chat template and
//! evaluates only what the session does not already hold, so the KV cache
//! carries over between turns.

use std::io::{BufRead, Write};

use serde_json::{json, Value};

use super::model_args::{stats_line, ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// A system message for the conversation.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let engine = args.model.open()?;
    let tok = engine.tokenizer()?;
    let template = engine.chat_template()?;
    let mut params = args.sampling.params();
    let mut session = engine.new_session();
    let system: Vec<Value> = args
        .system
        .iter()
        .map(|s| json!({"role": "system", "content": s}))
        .collect();
    let mut messages = system.clone();

    eprintln!("moeflux chat: type a message; /reset starts over, /exit quits.");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = system.clone();
                session.reset();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": text}));
        let prompt = template.render(&Value::Array(messages.clone()), None, true, None)?;
        // Evaluate only what the session does not hold yet: when the text of
        // its tokens is a prefix of the new rendering (the usual case), the
        // rest is tokenized on its own, like llama.cpp's chat does; the
        // generated tokens stay in the cache exactly as they were sampled.
        let held = tok.decode(session.tokens(), false);
        let new_ids = if !held.is_empty() && prompt.starts_with(&held) && prompt.len() > held.len()
        {
            tok.encode(&prompt[held.len()..], true, false)?
        } else {
            // The template rewrote history (e.g. dropped reasoning): keep
            // the longest common token prefix and evaluate the rest.
            let ids = tok.encode(&prompt, true, false)?;
            let keep = session
                .tokens()
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(ids.len().saturating_sub(1));
            session.truncate(keep)?;
            ids[keep..].to_vec()
        };
        let g = session.generate(&new_ids, &params, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            true
        })?;
        let _ = writeln!(out);
        if args.model.verbose {
            eprintln!("{}", stats_line(&g, params.seed));
        }
        messages.push(json!({"role": "assistant", "content": g.text}));
        // A turn boundary: hybrid models keep their recurrent state here, so
        // a later rewrite of history resumes from it.
        session.checkpoint();
        // A fresh stream of randomness each turn, still reproducible.
        params.seed = params.seed.wrapping_add(1);
    }
    Ok(())
}
