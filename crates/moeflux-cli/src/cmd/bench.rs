//! `moeflux bench`: prompt and decode speed on a model, with the expert
//! store's traffic and the physical floor of the run.

use std::time::Instant;

use moeflux::experts::io::{evict_from_page_cache, measure_read_bandwidth};
use moeflux::experts::plan::fmt_bytes;
use moeflux::sampling::argmax;
use serde_json::json;

use super::model_args::ModelArgs;
use super::report::{huge_page_bytes, peak_rss, store_report};

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

    /// Seed of the random prompt and generated tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Feed each step the argmax of the last logits instead of a random
    /// token. Random tokens (what llama-bench feeds) route like varied text;
    /// greedy decoding of a random-weight model tends to repeat one token,
    /// which hits the same experts every step and flatters any cache.
    #[arg(long)]
    pub greedy: bool,

    /// Drop the model file from the page cache before starting (a cold run).
    #[arg(long)]
    pub cold: bool,

    /// Fill the expert cache (every expert, when the plan holds them all),
    /// evaluate the prompt once and decode a few tokens, untimed, before
    /// measuring (llama-bench's warm-up run). When every expert fits the
    /// cache this measures the model resident, with no expert reads in
    /// either phase.
    #[arg(long, conflicts_with = "cold")]
    pub warmup: bool,

    /// Disk read bandwidth in GB/s for the I/O floor (default: measured on
    /// the model file with direct reads).
    #[arg(long, value_name = "GB/S")]
    pub disk_gbps: Option<f64>,

    /// Measure prompt and decode this many times (on a reset session,
    /// the same tokens each time) and report the median of each; every
    /// run's rate is in `--json`. On a machine whose speed wanders from
    /// minute to minute, a median of alternating runs is what to compare.
    #[arg(short = 'r', long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repetitions: u32,

    /// Print per-layer expert statistics.
    #[arg(long)]
    pub stats: bool,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    if args.model.ctx == 0 {
        args.model.ctx = args.n_prompt + args.n_gen + 1;
    }
    let disk_gbps = match args.disk_gbps {
        Some(g) => g,
        None => measure_read_bandwidth(&args.model.model, 1 << 30).unwrap_or(0.0) / 1e9,
    };
    if args.cold {
        evict_from_page_cache(&args.model.model)?;
    }
    let t0 = Instant::now();
    let engine = args.model.open()?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = engine.vocab() as u64;
    let mut rng = moeflux::synth::Rng::new(args.seed);
    let prompt: Vec<u32> = (0..args.n_prompt)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();

    /// Tokens `--warmup` decodes.
    const WARMUP_DECODE: usize = 4;
    let mut session = engine.new_session();
    if args.warmup {
        preload(&engine)?;
        session.eval(&prompt)?;
        // Decode steps run their own kernels (on a GPU, compiled on first
        // use: the first timed decode of an H100 run measured 65–71 tok/s
        // against ~190 for the next ones).
        for i in 0..WARMUP_DECODE.min(args.n_gen) {
            session.eval(&[(i as u64 % vocab) as u32])?;
        }
        session.reset();
    }
    // Each repetition: the same prompt, then the same decode tokens; the
    // counters below are the last repetition's.
    let decode_rng = rng;
    let (mut prompt_runs, mut gen_runs) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..args.repetitions {
        session.reset();
        let mut rng = decode_rng.clone();
        let before_prompt = engine.store_stats();
        let gpu_before = engine.gpu_stats();
        // The profile from here is the prompt's, then the decode's.
        engine.gpu_profile(true);
        let t = Instant::now();
        let mut logits = session.eval(&prompt)?;
        prompt_runs.push(t.elapsed().as_secs_f64());
        let after_prompt = engine.store_stats();
        let gpu_after_prompt = engine.gpu_stats();
        let timings_prompt = session.timings();
        let prompt_kernels = engine.gpu_profile(true);
        let t = Instant::now();
        for _ in 0..args.n_gen {
            let next = if args.greedy {
                argmax(&logits)
            } else {
                (rng.next_u64() % vocab) as u32
            };
            logits = session.eval(&[next])?;
        }
        gen_runs.push(t.elapsed().as_secs_f64());
        last = Some(Counters {
            before_prompt,
            gpu_before,
            after_prompt,
            gpu_after_prompt,
            timings_prompt,
            prompt_kernels,
        });
    }
    let Some(last) = last else {
        anyhow::bail!("no repetition ran");
    };
    let (prompt_s, gen_s) = (median(&prompt_runs), median(&gen_runs));
    let decode = engine.store_stats().since(&last.after_prompt);
    // The GPU tier (when the GPU runs the model): hits, uploads.
    let gpu_decode = engine
        .gpu_stats()
        .zip(last.gpu_after_prompt)
        .map(|(now, then)| now.since(&then));
    let gpu_prompt = last
        .gpu_after_prompt
        .zip(last.gpu_before)
        .map(|(now, then)| now.since(&then));
    let split = time_split(
        &session.timings().since(&last.timings_prompt),
        decode.total.stall_ns,
        args.n_gen,
    );
    let prompt_tps = args.n_prompt as f64 / prompt_s;
    let gen_tps = args.n_gen as f64 / gen_s;
    let miss_bytes_per_token = decode.total.bytes_read as f64 / args.n_gen.max(1) as f64;
    // The I/O floor: decode can go no faster than the disk delivers the
    // experts it had to read.
    let io_floor = if miss_bytes_per_token > 0.0 && disk_gbps > 0.0 {
        disk_gbps * 1e9 / miss_bytes_per_token
    } else {
        f64::INFINITY
    };
    let rss = peak_rss().unwrap_or(0);
    let huge = huge_page_bytes();
    let plan = engine.plan();
    let report = json!({
        "model": args.model.model.display().to_string(),
        "backend": engine.backend(),
        "threads": engine.threads(),
        "cpu_level": engine.cpu_level().name(),
        "io": engine.io_mode().name(),
        "prefetch": args.model.prefetch,
        "cold": args.cold,
        "warmup": args.warmup,
        "decode_tokens": if args.greedy { "greedy" } else { "random" },
        "plan": plan,
        "plan_total_bytes": plan.total_bytes(),
        "load_s": load_s,
        "prompt_tokens": args.n_prompt,
        "prompt_tok_s": prompt_tps,
        "repetitions": args.repetitions,
        "prompt_tok_s_runs": prompt_runs.iter().map(|s| args.n_prompt as f64 / s).collect::<Vec<_>>(),
        "decode_tok_s_runs": gen_runs.iter().map(|s| args.n_gen as f64 / s).collect::<Vec<_>>(),
        "ttft_s": prompt_s,
        "gen_tokens": args.n_gen,
        "decode_tok_s": gen_tps,
        "decode_hit_rate": decode.total.hit_rate(),
        "decode_bytes_read_per_token": miss_bytes_per_token,
        "decode_read_gbps": decode.read_gbps(gen_s),
        "decode_stall_ms_per_token": decode.total.stall_ns as f64 / 1e6 / args.n_gen.max(1) as f64,
        "prefetched": decode.total.prefetched,
        "prefetch_hits": decode.total.prefetch_hits,
        "prefetch_wasted_bytes": decode.total.prefetch_wasted_bytes,
        "disk_gbps": disk_gbps,
        "io_floor_tok_s": if io_floor.is_finite() { json!(io_floor) } else { json!(null) },
        "peak_rss_bytes": rss,
        "huge_page_bytes": huge,
        "decode_ms_per_token": split.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "store_prompt": last.after_prompt.since(&last.before_prompt),
        "store_decode": decode,
        "gpu_prompt": gpu_prompt.map(|g| gpu_json(&g, prompt_s)),
        "gpu_decode": gpu_decode.map(|g| gpu_json(&g, gen_s)),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} threads ({}), io {}, prefetch {}, load {:.1} s{}",
        args.model.model.display(),
        engine.threads(),
        engine.cpu_level().name(),
        engine.io_mode().name(),
        args.model.prefetch,
        load_s,
        if args.cold { ", cold" } else { "" }
    );
    println!("backend {}", engine.backend());
    // With repetitions, every run's rate after the median.
    let runs = |n: usize, v: &[f64]| {
        if v.len() < 2 {
            return String::new();
        }
        let rates: Vec<String> = v.iter().map(|s| format!("{:.2}", n as f64 / s)).collect();
        format!("  median of {}: {}", v.len(), rates.join(", "))
    };
    println!(
        "prompt  {:>5} tokens  {:>8.2} tok/s  (time to first token {:.2} s){}",
        args.n_prompt,
        prompt_tps,
        prompt_s,
        runs(args.n_prompt, &prompt_runs)
    );
    println!(
        "decode  {:>5} tokens  {:>8.2} tok/s{}",
        args.n_gen,
        gen_tps,
        runs(args.n_gen, &gen_runs)
    );
    print!("{}", store_report(&decode, gen_s, args.n_gen, args.stats));
    if let Some(g) = gpu_decode {
        // Who moved the bytes: the GPU's own copies from the imported host
        // cache, or the CPU through staging memory.
        let by_gpu = match g.bytes_uploaded {
            0 => String::new(),
            b => format!(
                ", {:.0}% copied by the GPU",
                100.0 * g.bytes_copied_by_gpu as f64 / b as f64
            ),
        };
        // Experts copied ahead by the router lookahead, and how many of
        // them a layer then used.
        let ahead = match g.prefetched {
            0 => String::new(),
            p => format!(
                "; {} prefetched ahead, {:.0}% used",
                p,
                100.0 * g.prefetch_hits as f64 / p as f64
            ),
        };
        // On a GPU sharing host memory: experts its kernels read where the
        // host's cache holds them (nothing copied).
        let in_place = match g.read_in_place {
            0 => String::new(),
            n => format!(
                "; {:.0}% of expert uses read in place from the host cache ({}/token)",
                100.0 * n as f64 / (g.hits + g.misses).max(1) as f64,
                fmt_bytes(g.bytes_read_in_place / args.n_gen.max(1) as u64)
            ),
        };
        println!(
            "gpu     {} expert slots of {}; decode VRAM hit rate {:.1}%, host→GPU {}/token ({:.2} GB/s{by_gpu}){ahead}{in_place}",
            g.slots,
            fmt_bytes(g.slot_bytes),
            100.0 * g.hit_rate(),
            fmt_bytes(g.bytes_uploaded / args.n_gen.max(1) as u64),
            g.bytes_uploaded as f64 / gen_s.max(1e-9) / 1e9,
        );
        if let Some(p) = guess_precision(&g) {
            let ranks: Vec<String> = p.iter().map(|v| format!("{:.0}", 100.0 * v)).collect();
            println!(
                "guess   next layer's experts guessed right by rank: {} % in these steps (a rank is copied ahead while ≥ {:.0} % of its recent guesses are right; the others while the copy queue idles)",
                ranks.join(" "),
                100.0 * moeflux::experts::GUESS_MIN_PRECISION
            );
        }
    }
    // GPU time by kernel, a token's share (MOEFLUX_GPU_PROFILE).
    let kernels = |what: &str, kernels: &[(String, u64, f64)], tokens: usize| {
        let per = tokens.max(1) as f64;
        let total: f64 = kernels.iter().map(|k| k.2).sum();
        println!(
            "kernels {what} {:.3} ms/token of GPU time (MOEFLUX_GPU_PROFILE is set): {}",
            total / per,
            kernels
                .iter()
                .take(12)
                .map(|(k, n, ms)| format!("{k} {:.4} ({:.1}×)", ms / per, *n as f64 / per))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if let Some(k) = &last.prompt_kernels {
        kernels("prompt", k, args.n_prompt);
    }
    if let Some(k) = engine.gpu_profile(false) {
        kernels("decode", &k, args.n_gen);
    }
    let total: f64 = split.iter().map(|(_, v)| v).sum();
    println!(
        "split   {} ms/token: {}",
        format_args!("{total:.1}"),
        split
            .iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k} {v:.1} ({:.0}%)", 100.0 * v / total.max(1e-9)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "floor   disk {:.2} GB/s, {}/token read → I/O floor {} tok/s ({:.0}% reached)",
        disk_gbps,
        fmt_bytes(miss_bytes_per_token as u64),
        if io_floor.is_finite() {
            format!("{io_floor:.2}")
        } else {
            "∞".into()
        },
        if io_floor.is_finite() {
            100.0 * gen_tps / io_floor
        } else {
            0.0
        }
    );
    println!(
        "memory  peak RSS {} (plan {}){}",
        fmt_bytes(rss),
        fmt_bytes(plan.total_bytes()),
        match huge {
            Some(h) => format!(", {} in huge pages", fmt_bytes(h)),
            None => String::new(),
        }
    );
    Ok(())
}

/// The share of the next layer's guessed experts that it chose, by rank,
/// over the ranks that were judged; `None` when nothing was guessed.
fn guess_precision(g: &moeflux::experts::GpuTierStats) -> Option<Vec<f64>> {
    let ranks = g.guesses_judged.iter().take_while(|&&n| n > 0).count();
    (ranks > 0).then(|| {
        (0..ranks)
            .map(|r| g.guesses_right[r] as f64 / g.guesses_judged[r] as f64)
            .collect()
    })
}

/// The GPU tier's counters over a phase of `secs` seconds, as JSON.
fn gpu_json(g: &moeflux::experts::GpuTierStats, secs: f64) -> serde_json::Value {
    json!({
        "slots": g.slots,
        "slot_bytes": g.slot_bytes,
        "hits": g.hits,
        "misses": g.misses,
        "hit_rate": g.hit_rate(),
        "bytes_uploaded": g.bytes_uploaded,
        "bytes_copied_by_gpu": g.bytes_copied_by_gpu,
        "read_in_place": g.read_in_place,
        "bytes_read_in_place": g.bytes_read_in_place,
        "prefetched": g.prefetched,
        "prefetch_hits": g.prefetch_hits,
        "guess_precision_by_rank": guess_precision(g),
        "upload_gbps": g.bytes_uploaded as f64 / secs.max(1e-9) / 1e9,
    })
}

/// The median of `v` (the mean of the middle two for an even count).
/// The counters a repetition leaves, read after its prompt and its
/// decode (the report is the last repetition's).
struct Counters {
    before_prompt: moeflux::experts::StoreStats,
    gpu_before: Option<moeflux::experts::GpuTierStats>,
    after_prompt: moeflux::experts::StoreStats,
    gpu_after_prompt: Option<moeflux::experts::GpuTierStats>,
    timings_prompt: moeflux::model::Timings,
    /// GPU time by kernel during the prompt (`MOEFLUX_GPU_PROFILE`).
    prompt_kernels: Option<Vec<(String, u64, f64)>>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Reads experts into the free cache slots, with a progress bar.
fn preload(engine: &moeflux::Engine) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading experts [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    engine.preload_experts(|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    Ok(())
}

/// Decode time per token by part, in ms: the model's own timings with the
/// MoE time split into waiting for experts (the store's stall counter) and
/// computing them (router included).
fn time_split(t: &moeflux::model::Timings, stall_ns: u64, n: usize) -> Vec<(&'static str, f64)> {
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e3 / n.max(1) as f64;
    let wait = stall_ns as f64 / 1e6 / n.max(1) as f64;
    let moe = per(t.moe);
    vec![
        ("linear_attn", per(t.linear_attn)),
        ("full_attn", per(t.full_attn)),
        ("expert_wait", wait.min(moe)),
        ("expert_compute", (moe - wait).max(0.0)),
        ("shared_ffn", per(t.dense_ffn)),
        ("prefetch", per(t.prefetch)),
        ("other", per(t.other)),
        ("gpu_submit", per(t.gpu_submit)),
        ("gpu_wait", per(t.gpu_wait)),
    ]
}
