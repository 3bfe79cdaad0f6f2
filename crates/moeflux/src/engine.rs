//! The public API: [`Engine`] (a loaded model) and [`Session`] (one
//! conversation's state).
//!
//! ```no_run
//! use moeflux::engine::{Engine, EngineOptions};
//! use moeflux::sampling::SamplingParams;
//!
//! let engine = Engine::open("model.gguf".as_ref(), EngineOptions::default())?;
//! let mut session = engine.new_session();
//! let tokenizer = engine.tokenizer()?;
//! let prompt = tokenizer.encode("The capital of France is", false, true)?;
//! let out = session.generate(&prompt, &SamplingParams::greedy(16), |text| {
//!     print!("{text}");
//!     true // keep going
//! })?;
//! println!("\n{} tokens", out.tokens.len());
//! # Ok::<(), moeflux::Error>(())
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::cpu::kernels::Level;
use crate::backend::cpu::workspace::Workspace;
use crate::backend::cpu::Cpu;
pub use crate::backend::Backend;
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::experts::plan::{self, Budget, MemoryPlan, PlanInput};
use crate::experts::{ExpertStore, GpuTierStats, IoMode, StoreOptions, StoreStats};
use crate::format::{ModelFiles, ModelMetadata};
use crate::model::{self, Context, Logits, Model, ModelConfig, Prefetch};
use crate::sampling::{Sampler, SamplingParams};
use crate::state::{Checkpoint, KvType, SessionState, Snapshot, SnapshotError};
use crate::tokenizer::{TokenId, Tokenizer};

/// How to open a model.
#[derive(Clone)]
pub struct EngineOptions {
    /// Context length in tokens; 0 means the model's own, capped at 4096
    /// (the KV cache is sized for it).
    pub ctx: usize,
    /// Prompt tokens processed per forward pass.
    pub ubatch: usize,
    /// Compute threads; 0 means one per physical core.
    pub threads: usize,
    /// Element type of the KV cache.
    pub kv_type: KvType,
    /// Force a CPU kernel level (None: the best the CPU supports, or
    /// `MOEFLUX_CPU`). A level the CPU cannot run is refused.
    pub cpu_level: Option<Level>,
    /// The memory budget (None: the automatic plan from available memory).
    pub budget: Option<Budget>,
    /// How experts are read.
    pub io: IoMode,
    /// Reader threads (several reads in flight keep an SSD busy).
    pub io_threads: usize,
    pub prefetch: Prefetch,
    /// Most recurrent-state checkpoints a session keeps (hybrid models:
    /// `truncate` resumes from the newest one at or before the cut).
    pub checkpoints: usize,
    /// Called while the dense weights are read: `(done, total)` bytes.
    pub on_load_progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    /// Which backend computes (the library defaults to the CPU; the command
    /// line to `Auto`).
    pub backend: Backend,
    /// GPU memory for the GPU's expert slots, in bytes (None: every expert
    /// where the device allocates them; see `GpuModel::new`).
    pub gpu_mem: Option<u64>,
    /// On a GPU that shares host memory and can import it (integrated
    /// GPUs, lavapipe), with `gpu_mem` unset, a total or automatic budget
    /// too small for the GPU to hold every expert, and a file whose expert
    /// arrays start on 4-byte boundaries (GGUF's do): read streamed experts
    /// in place from the host's expert cache instead of copying them into
    /// GPU slots (one cache in that memory, not two). The output is the
    /// same either way.
    pub gpu_in_place: bool,
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("ctx", &self.ctx)
            .field("ubatch", &self.ubatch)
            .field("threads", &self.threads)
            .field("kv_type", &self.kv_type)
            .field("cpu_level", &self.cpu_level)
            .field("budget", &self.budget)
            .field("io", &self.io)
            .field("prefetch", &self.prefetch)
            .field("checkpoints", &self.checkpoints)
            .field("backend", &self.backend)
            .field("gpu_mem", &self.gpu_mem)
            .field("gpu_in_place", &self.gpu_in_place)
            .finish_non_exhaustive()
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ctx: 0,
            ubatch: 512,
            threads: 0,
            kv_type: KvType::F16,
            cpu_level: None,
            budget: None,
            io: IoMode::Direct,
            io_threads: 4,
            prefetch: Prefetch::Off,
            checkpoints: 4,
            on_load_progress: None,
            backend: Backend::Cpu,
            gpu_mem: None,
            gpu_in_place: true,
        }
    }
}

struct Inner {
    files: ModelFiles,
    model: Model,
    store: Mutex<ExpertStore>,
    tokenizer: std::result::Result<Tokenizer, String>,
    template: Option<std::result::Result<ChatTemplate, String>>,
    cpu: Cpu,
    plan: MemoryPlan,
    prefetch: Prefetch,
    ctx: usize,
    ubatch: usize,
    kv_type: KvType,
    max_checkpoints: usize,
    /// Identifies the model in saved sessions.
    fingerprint: u64,
    /// The model on the GPU, when the GPU backend runs it (locked after
    /// the store, never before).
    #[cfg(feature = "gpu")]
    gpu: Option<Mutex<crate::backend::gpu::GpuModel>>,
    /// Which backend runs the model, and why (one line).
    backend_note: String,
}

/// A loaded model: weights, tokenizer and chat template. Cheap to clone
/// (shared); every [`Session`] holds one.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.inner.files.path)
            .field("arch", &self.inner.model.cfg.arch)
            .finish()
    }
}

impl Engine {
    /// Opens a GGUF file or a Hugging Face / MLX checkpoint directory.
    pub fn open(path: &Path, opts: EngineOptions) -> Result<Engine> {
        let files = ModelFiles::open(path)?;
        let cfg = match &files.metadata {
            ModelMetadata::Gguf(meta) => {
                let vocab_hint = files
                    .tensor("token_embd.weight")
                    .and_then(|t| t.shape.first())
                    .map(|&v| v as usize);
                ModelConfig::from_gguf(meta, vocab_hint)?
            }
            ModelMetadata::Hf(c) => ModelConfig::from_hf(c)?,
        };
        let ctx = match opts.ctx {
            0 => cfg.context_length.min(4096),
            n => n,
        };
        let (model, experts) = model::load(&files, cfg)?;

        // The memory plan, before anything large is allocated.
        let mut files = files;
        let dense_spans = model.dense_spans();
        let dense_bytes: u64 = {
            let mut sorted = dense_spans.clone();
            sorted.sort_by_key(|s| (s.file, s.offset));
            sorted.dedup();
            sorted.iter().map(|s| s.len).sum()
        };
        let cfg = &model.cfg;
        let per_layer: Vec<u64> = experts.iter().map(|e| e.len() as u64).collect();
        let input = PlanInput {
            dense_bytes,
            slot_bytes: crate::experts::store::slot_bytes_for(&experts),
            total_experts: per_layer.iter().sum(),
            top_k: cfg.n_experts_used as u64,
            // The KV cache and recurrent state, plus the checkpoints' copies
            // of the recurrent state.
            kv_bytes: cfg.kv_bytes(ctx as u64, opts.kv_type)
                + opts.checkpoints as u64 * cfg.kv_bytes(0, opts.kv_type),
            scratch_bytes: plan::scratch_bytes(cfg, opts.ubatch.max(1) as u64),
            gpu_bytes: 0,
        };
        // Read before anything is loaded (the plan counts what loads).
        let available = plan::available_memory().unwrap_or(8 << 30);
        let budget = opts.budget.unwrap_or(Budget::Auto { available });
        // Without the GPU (a GPU that shares this memory is counted once
        // it is built: gpu_select).
        let plan = MemoryPlan::new(budget, input)?;

        // Dense weights resident in memory (rows interleaved by eight where
        // the CPU has a kernel for that layout); experts through the store,
        // which interleaves them as they arrive.
        let cpu = Cpu::new(opts.threads, opts.cpu_level)?;
        let progress = opts.on_load_progress.clone();
        files.make_resident(&dense_spans, &mut |done, total| {
            if let Some(p) = &progress {
                p(done, total);
            }
        })?;
        // A GPU that shares host memory comes back with the plan made
        // again, counting its buffers.
        #[cfg(feature = "gpu")]
        let (gpu, backend_note, plan) =
            gpu_select::open(&opts, &model, &files, &experts, &plan, available, ctx)?;
        #[cfg(feature = "gpu")]
        let on_cpu = gpu.is_none();
        #[cfg(not(feature = "gpu"))]
        let (on_cpu, backend_note) = match opts.backend {
            Backend::Gpu => return Err(Error::GpuNotBuilt),
            Backend::Cpu | Backend::Auto => (true, "cpu".to_string()),
        };
        // The GPU backend uploads the file's layout (dense weights above,
        // experts from the store's slots): interleave only for the CPU.
        if on_cpu {
            model::weights::interleave_resident(&mut files, &model.dense_weights(), cpu.level);
        }
        let store = ExpertStore::new(
            &files,
            experts,
            StoreOptions {
                slots: plan.slots as usize,
                io: opts.io,
                io_threads: opts.io_threads,
                interleave_for: on_cpu.then_some(cpu.level),
            },
        )?;

        let tokenizer = match &files.metadata {
            ModelMetadata::Gguf(meta) => Tokenizer::from_gguf(meta),
            ModelMetadata::Hf(c) => {
                let dir = if path.is_dir() {
                    path
                } else {
                    path.parent().unwrap_or(Path::new("."))
                };
                Tokenizer::from_hf_dir(dir, c)
            }
        }
        .map_err(|e| e.to_string());
        let token_str = |id: Option<TokenId>| -> String {
            match (&tokenizer, id) {
                (Ok(t), Some(id)) => t.token(id).unwrap_or_default(),
                _ => String::new(),
            }
        };
        let (bos, eos) = match &tokenizer {
            Ok(t) => (
                token_str(t.special.bos),
                token_str(t.special.eos.first().copied()),
            ),
            Err(_) => (String::new(), String::new()),
        };
        let template = match &files.metadata {
            ModelMetadata::Gguf(meta) => ChatTemplate::from_gguf(meta, bos, eos),
            ModelMetadata::Hf(_) => {
                let dir = if path.is_dir() {
                    path
                } else {
                    path.parent().unwrap_or(Path::new("."))
                };
                ChatTemplate::from_hf_dir(dir, bos, eos)
            }
        }
        .map(|r| r.map_err(|e| e.to_string()));

        let fingerprint = fingerprint(&files, &model.cfg);
        Ok(Engine {
            inner: Arc::new(Inner {
                fingerprint,
                #[cfg(feature = "gpu")]
                gpu,
                backend_note,
                max_checkpoints: opts.checkpoints,
                files,
                model,
                store: Mutex::new(store),
                plan,
                prefetch: opts.prefetch,
                tokenizer,
                template,
                cpu,
                ctx,
                ubatch: opts.ubatch.max(1),
                kv_type: opts.kv_type,
            }),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.inner.model.cfg
    }

    /// The context length sessions are sized for.
    pub fn ctx(&self) -> usize {
        self.inner.ctx
    }

    /// Vocabulary size (rows of the LM head).
    pub fn vocab(&self) -> usize {
        self.inner.model.lm_head.rows
    }

    /// The tokenizer, or why there is none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.inner
            .tokenizer
            .as_ref()
            .map_err(|e| Error::NoTokenizer(e.clone()))
    }

    /// The chat template, or why there is none.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        match &self.inner.template {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(crate::chat::ChatError::Compile(e.clone()).into()),
            None => Err(crate::chat::ChatError::NoTemplate.into()),
        }
    }

    /// The memory plan the engine runs under.
    pub fn plan(&self) -> &MemoryPlan {
        &self.inner.plan
    }

    /// Which backend runs the model, and why (one line, for a notice).
    pub fn backend(&self) -> &str {
        &self.inner.backend_note
    }

    /// Whether the GPU backend runs the model.
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.inner.gpu.is_some();
        #[cfg(not(feature = "gpu"))]
        false
    }

    /// The GPU expert tier's counters, when the GPU backend runs the model.
    pub fn gpu_stats(&self) -> Option<GpuTierStats> {
        #[cfg(feature = "gpu")]
        return self
            .inner
            .gpu
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()).expert_stats());
        #[cfg(not(feature = "gpu"))]
        None
    }

    /// GPU time per kernel so far — `(kernel, dispatches, ms)`, largest
    /// first — when the GPU backend runs the model and profiling is on
    /// (`MOEFLUX_GPU_PROFILE`); `reset` starts the totals over.
    pub fn gpu_profile(&self, reset: bool) -> Option<Vec<(String, u64, f64)>> {
        #[cfg(feature = "gpu")]
        return self.inner.gpu.as_ref().and_then(|g| {
            let g = g.lock().unwrap_or_else(|p| p.into_inner());
            let p = g.gpu().profiler.as_ref()?;
            let r = p.report();
            if reset {
                p.reset();
            }
            Some(r)
        });
        #[cfg(not(feature = "gpu"))]
        {
            let _ = reset;
            None
        }
    }

    /// The expert store's counters so far.
    pub fn store_stats(&self) -> StoreStats {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats()
    }

    /// Reads experts into the cache's free slots until all are resident or
    /// the cache is full (see [`ExpertStore::preload`]); `progress(done,
    /// total)` counts experts. Returns how many were read.
    pub fn preload_experts(&self, progress: impl FnMut(usize, usize)) -> Result<usize> {
        let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
        Ok(store.preload(progress)?)
    }

    /// The I/O mode in effect (direct reads may have fallen back).
    pub fn io_mode(&self) -> IoMode {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .io_mode()
    }

    /// Compute threads in use.
    pub fn threads(&self) -> usize {
        self.inner.cpu.pool.n_threads()
    }

    /// The CPU kernel level in use.
    pub fn cpu_level(&self) -> crate::backend::cpu::kernels::Level {
        self.inner.cpu.level
    }

    /// A new, empty session.
    pub fn new_session(&self) -> Session {
        Session {
            engine: self.clone(),
            state: self.empty_state(),
            ws: Workspace::new(self.inner.cpu.pool.n_threads()),
            tokens: Vec::new(),
            logits: Vec::new(),
            checkpoints: Vec::new(),
            #[cfg(feature = "gpu")]
            gpu_kv: None,
            #[cfg(feature = "gpu")]
            recurrent_on_host: false,
        }
    }

    fn empty_state(&self) -> SessionState {
        self.inner
            .model
            .new_state(self.inner.ctx, self.inner.kv_type)
    }

    /// Identifies the model (its configuration and tensor table) in saved
    /// sessions.
    pub fn fingerprint(&self) -> u64 {
        self.inner.fingerprint
    }
}

/// FNV-1a over the configuration and the tensor table: names, shapes,
/// types and byte spans. Two files give the same value when they hold the
/// same tensors in the same layout.
fn fingerprint(files: &ModelFiles, cfg: &ModelConfig) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(serde_json::to_string(cfg).unwrap_or_default().as_bytes());
    for t in &files.tensors {
        eat(t.name.as_bytes());
        eat(t.ty.to_string().as_bytes());
        for d in &t.shape {
            eat(&d.to_le_bytes());
        }
        for p in &t.parts {
            eat(&p.offset.to_le_bytes());
            eat(&p.len.to_le_bytes());
        }
    }
    h
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// A stop string appeared (it is not part of the text).
    StopString,
    /// The callback asked to stop.
    Cancelled,
    /// The context is full.
    ContextFull,
}

/// What [`Session::generate`] produced.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated tokens (EOS excluded).
    pub tokens: Vec<TokenId>,
    /// Their text, cut before any stop string.
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub gen_secs: f64,
}

/// One conversation: the tokens seen so far, their KV cache and (for
/// hybrid models) the recurrent state with its checkpoints.
pub struct Session {
    engine: Engine,
    state: SessionState,
    ws: Workspace,
    tokens: Vec<TokenId>,
    /// Logits after the last evaluated token (empty when unknown).
    logits: Vec<f32>,
    /// Recurrent-state checkpoints, oldest first, at increasing positions.
    checkpoints: Vec<Checkpoint>,
    /// The KV cache in GPU memory when the GPU backend runs the model
    /// (made on first use; `state.kv` then only counts positions).
    #[cfg(feature = "gpu")]
    gpu_kv: Option<crate::backend::gpu::GpuKv>,
    /// On the GPU backend, whether `state.linear` (reset, or put back from
    /// a checkpoint or snapshot) is newer than the recurrent state in GPU
    /// memory: the next step uploads it. Otherwise the GPU's is the
    /// current one, and `state.linear` is read back from it when needed.
    #[cfg(feature = "gpu")]
    recurrent_on_host: bool,
}

/// A GPU session's KV cache leaves the GPU model's bind-group cache with it.
#[cfg(feature = "gpu")]
impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(g), Some(kv)) = (&self.engine.inner.gpu, self.gpu_kv.take()) {
            g.lock().unwrap_or_else(|p| p.into_inner()).release_kv(kv);
        }
    }
}

impl Session {
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Tokens evaluated so far.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Bytes of KV cache, recurrent state and checkpoints held.
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
            + self
                .checkpoints
                .iter()
                .flat_map(|c| c.linear.iter().flatten())
                .map(crate::state::LinearState::bytes)
                .sum::<usize>()
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.state.reset();
        self.recurrent_changed();
        self.tokens.clear();
        self.logits.clear();
        self.checkpoints.clear();
    }

    /// Time spent per part of the model by this session so far.
    pub fn timings(&self) -> crate::model::Timings {
        self.ws.timings
    }

    /// Positions of the checkpoints held.
    pub fn checkpoint_positions(&self) -> Vec<usize> {
        self.checkpoints.iter().map(|c| c.pos).collect()
    }

    /// Remembers the recurrent state at the current position, so that a
    /// later [`Session::truncate`] to here or beyond re-evaluates nothing
    /// before it. `chat` takes one at every turn boundary. At most
    /// `EngineOptions::checkpoints` are kept (the oldest goes first); a
    /// model without recurrent layers needs none and keeps none.
    pub fn checkpoint(&mut self) {
        let max = self.engine.inner.max_checkpoints;
        if !self.state.is_recurrent() || max == 0 || self.tokens.is_empty() {
            return;
        }
        let pos = self.tokens.len();
        if self.checkpoints.last().is_some_and(|c| c.pos == pos) {
            return;
        }
        // A state the GPU cannot give back is not taken: a later truncate
        // then starts from an older checkpoint, with the same result.
        let Ok(linear) = self.recurrent_state() else {
            return;
        };
        if self.checkpoints.len() >= max {
            self.checkpoints.remove(0);
        }
        self.checkpoints.push(Checkpoint {
            pos,
            linear,
            logits: self.logits.clone(),
        });
    }

    /// The recurrent state now: the host's, or on the GPU backend the
    /// GPU's, read back.
    fn recurrent_state(&self) -> Result<Vec<Option<crate::state::LinearState>>> {
        #[allow(unused_mut)]
        let mut linear = self.state.linear.clone();
        #[cfg(feature = "gpu")]
        if let (Some(g), Some(kv), false) =
            (&self.engine.inner.gpu, &self.gpu_kv, self.recurrent_on_host)
        {
            let gpu = g.lock().unwrap_or_else(|p| p.into_inner()).gpu().clone();
            kv.read_linear(&gpu, &mut linear)?;
        }
        Ok(linear)
    }

    /// `state.linear` was set on the host: on the GPU backend the next
    /// step uploads it.
    fn recurrent_changed(&mut self) {
        #[cfg(feature = "gpu")]
        {
            self.recurrent_on_host = self.state.is_recurrent();
        }
    }

    /// Keeps the first `n` tokens and forgets the rest; the next `eval`
    /// continues from position `n`.
    ///
    /// Softmax attention drops the cached positions. A recurrent state
    /// cannot be rewound, so hybrid models restart from the newest
    /// checkpoint at or before `n` (or from the empty state) and evaluate
    /// the tokens between it and `n` again; the result equals a fresh
    /// session fed the first `n` tokens.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if n >= self.tokens.len() {
            return Ok(());
        }
        self.checkpoints.retain(|c| c.pos <= n);
        if !self.state.is_recurrent() {
            self.tokens.truncate(n);
            self.state.kv.truncate(n);
            self.logits.clear();
            return Ok(());
        }
        let replay = self.tokens[..n].to_vec();
        let from = self.rewind_to_checkpoint(n);
        if from < n {
            self.run(&replay[from..], Logits::Last)?;
        }
        Ok(())
    }

    /// Puts the session at the newest checkpoint at or before `n` (or the
    /// empty state); returns its position.
    fn rewind_to_checkpoint(&mut self, n: usize) -> usize {
        self.checkpoints.retain(|c| c.pos <= n);
        let from = match self.checkpoints.last() {
            Some(c) => {
                self.state.linear.clone_from(&c.linear);
                self.logits.clone_from(&c.logits);
                c.pos
            }
            None => {
                self.state.reset();
                self.logits.clear();
                0
            }
        };
        self.recurrent_changed();
        self.tokens.truncate(from);
        self.state.kv.truncate(from);
        from
    }

    /// A copy of the whole session state (tokens, logits, KV cache,
    /// recurrent state, checkpoints). On the GPU backend the KV cache is
    /// read back, so snapshots are the same whichever backend made them.
    pub fn snapshot(&self) -> Result<Snapshot> {
        #[allow(unused_mut)]
        let mut state = SessionState {
            kv: self.state.kv.clone(),
            linear: self.recurrent_state()?,
        };
        #[cfg(feature = "gpu")]
        if let (Some(g), Some(kv)) = (&self.engine.inner.gpu, &self.gpu_kv) {
            let gpu = g.lock().unwrap_or_else(|p| p.into_inner()).gpu().clone();
            kv.read_into(&gpu, &mut state.kv, self.state.kv.len)?;
        }
        Ok(Snapshot {
            model: self.engine.inner.fingerprint,
            tokens: self.tokens.clone(),
            logits: self.logits.clone(),
            state,
            checkpoints: self.checkpoints.clone(),
        })
    }

    /// Puts the session back in the state of `snap`. A snapshot of another
    /// model, or one that does not fit this engine's context or KV type,
    /// is refused and the session left as it was.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        // Checking the encoded form validates every dimension the same way
        // a file is checked.
        let checked = Snapshot::decode(
            &snap.encode(),
            self.engine.inner.fingerprint,
            &self.engine.empty_state(),
        )?;
        self.set(checked)
    }

    fn set(&mut self, snap: Snapshot) -> Result<()> {
        #[allow(unused_mut)]
        let mut state = snap.state;
        #[cfg(feature = "gpu")]
        if let Some(g) = &self.engine.inner.gpu {
            // The rows go to the GPU cache; the host keeps the count.
            let gm = g.lock().unwrap_or_else(|p| p.into_inner());
            if self.gpu_kv.is_none() {
                self.gpu_kv = Some(gm.new_kv(self.engine.inner.ctx, self.engine.inner.kv_type)?);
            }
            if let Some(kv) = &self.gpu_kv {
                kv.write_from(gm.gpu(), &state.kv)?;
            }
            let len = state.kv.len;
            state.kv.truncate(0);
            state.kv.len = len;
        }
        self.tokens = snap.tokens;
        self.logits = snap.logits;
        self.state = state;
        self.checkpoints = snap.checkpoints;
        self.recurrent_changed();
        Ok(())
    }

    /// Writes the session to `path` (see [`crate::state::snapshot`] for the
    /// format), through a temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.snapshot()?.encode();
        let tmp = path.with_extension("tmp-moeflux");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| Error::Snapshot(SnapshotError::Io(e)))
    }

    /// Replaces the session with the one saved at `path`. The file is read
    /// and checked completely first; on any error the session is
    /// unchanged.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::Snapshot(SnapshotError::Io(e)))?;
        let snap = Snapshot::decode(
            &bytes,
            self.engine.inner.fingerprint,
            &self.engine.empty_state(),
        )?;
        self.set(snap)
    }

    fn check(&self, tokens: &[TokenId]) -> Result<()> {
        let inner = &self.engine.inner;
        let vocab = inner.model.lm_head.rows;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::TokenOutOfRange { token: bad, vocab });
        }
        if self.tokens.len() + tokens.len() > inner.ctx {
            return Err(Error::ContextFull {
                ctx: inner.ctx,
                have: self.tokens.len(),
                adding: tokens.len(),
                model_max: inner.model.cfg.context_length,
            });
        }
        Ok(())
    }

    fn run(&mut self, tokens: &[TokenId], which: Logits) -> Result<Vec<f32>> {
        let engine = self.engine.clone();
        let inner = &engine.inner;
        #[cfg(feature = "gpu")]
        if let Some(g) = &inner.gpu {
            return self.run_gpu(g, tokens, which);
        }
        let mut store = inner.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = Vec::new();
        for chunk in tokens.chunks(inner.ubatch) {
            let cx = Context {
                files: &inner.files,
                cpu: &inner.cpu,
                prefetch: inner.prefetch,
            };
            let out = match inner.model.forward(
                cx,
                &mut store,
                &mut self.state,
                &mut self.ws,
                chunk,
                which,
            ) {
                Ok(out) => out,
                Err(e) => {
                    self.chunk_failed();
                    return Err(e.into());
                }
            };
            self.tokens.extend_from_slice(chunk);
            match which {
                Logits::All => all.extend_from_slice(out),
                Logits::Last => {
                    self.logits.clear();
                    self.logits.extend_from_slice(out);
                }
            }
        }
        Ok(self.chunks_done(all, which))
    }

    /// [`Session::run`] on the GPU backend: the same chunking, logits and
    /// error recovery, with the KV cache in GPU memory.
    #[cfg(feature = "gpu")]
    fn run_gpu(
        &mut self,
        g: &Mutex<crate::backend::gpu::GpuModel>,
        tokens: &[TokenId],
        which: Logits,
    ) -> Result<Vec<f32>> {
        let engine = self.engine.clone();
        let inner = &engine.inner;
        let mut store = inner.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut gm = g.lock().unwrap_or_else(|p| p.into_inner());
        let kv = match &mut self.gpu_kv {
            Some(kv) => kv,
            None => self.gpu_kv.insert(gm.new_kv(inner.ctx, inner.kv_type)?),
        };
        if self.recurrent_on_host {
            kv.write_linear(gm.gpu(), &self.state.linear)?;
            self.recurrent_on_host = false;
        }
        let mut all = Vec::new();
        // Several tokens are a prompt: every chunk of it, one token long or
        // not, takes the prompt kernels, so that its bits do not depend on
        // the chunk size (`--ubatch`).
        let prompt = tokens.len() > 1;
        for chunk in tokens.chunks(inner.ubatch) {
            let pos0 = self.state.kv.len;
            let out = match gm.forward(
                &inner.model,
                &inner.files,
                &mut store,
                kv,
                pos0,
                chunk,
                which,
                prompt,
                &mut self.ws.timings,
            ) {
                Ok(out) => out,
                Err(e) => {
                    self.chunk_failed();
                    return Err(e);
                }
            };
            self.state.kv.len = pos0 + chunk.len();
            self.tokens.extend_from_slice(chunk);
            match which {
                Logits::All => all.extend_from_slice(&out),
                Logits::Last => self.logits = out,
            }
        }
        Ok(self.chunks_done(all, which))
    }

    /// After a chunk failed: it is lost, and so is anything the cache
    /// held past the tokens already accepted (on the GPU the host count
    /// says where the GPU cache stands). A recurrent state may be
    /// half-advanced, so a hybrid session falls back to its newest
    /// checkpoint (`len()` tells where it stands).
    fn chunk_failed(&mut self) {
        self.state.kv.truncate(self.tokens.len());
        self.logits.clear();
        if self.state.is_recurrent() {
            self.rewind_to_checkpoint(self.tokens.len());
        }
    }

    /// What [`Session::run`] returns once every chunk is in: all the
    /// logits (the last row also kept as the session's), or the last row's.
    fn chunks_done(&mut self, all: Vec<f32>, which: Logits) -> Vec<f32> {
        match which {
            Logits::All => {
                let vocab = self.engine.inner.model.lm_head.rows;
                if all.len() >= vocab {
                    self.logits.clear();
                    self.logits.extend_from_slice(&all[all.len() - vocab..]);
                }
                all
            }
            Logits::Last => self.logits.clone(),
        }
    }

    /// Evaluates `tokens` after those already held; returns the logits of
    /// the last one.
    pub fn eval(&mut self, tokens: &[TokenId]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return if self.logits.is_empty() {
                Err(Error::EmptyPrompt)
            } else {
                Ok(self.logits.clone())
            };
        }
        self.check(tokens)?;
        self.run(tokens, Logits::Last)
    }

    /// Evaluates `tokens`; returns the logits of every one (`n × vocab`).
    pub fn eval_all(&mut self, tokens: &[TokenId]) -> Result<Vec<f32>> {
        self.check(tokens)?;
        self.run(tokens, Logits::All)
    }

    /// Evaluates `prompt`, then samples up to `params.max_tokens` tokens,
    /// calling `on_text` with each piece of text as it is decided (text that
    /// could begin a stop string is held back until it cannot). `on_text`
    /// returns `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[TokenId],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let engine = self.engine.clone();
        let tok = engine.tokenizer()?;
        let t0 = Instant::now();
        let mut logits = self.eval(prompt)?;
        let prompt_secs = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut sampler = Sampler::new(params.clone());
        let mut stream = tok.stream(false);
        let mut out = Vec::new();
        let mut text = String::new();
        let mut emitted = 0;
        let mut stop = StopReason::MaxTokens;
        let mut history = self.tokens.clone();
        while out.len() < params.max_tokens {
            let next = sampler.sample(&logits, &history);
            if tok.is_eos(next) {
                stop = StopReason::Eos;
                break;
            }
            out.push(next);
            history.push(next);
            if let Some(piece) = tok.step(&mut stream, next) {
                text.push_str(&piece);
            }
            if let Some(at) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                stop = StopReason::StopString;
                break;
            }
            let safe = text.len() - held_back(&text, &params.stop);
            if safe > emitted {
                let keep_going = on_text(&text[emitted..safe]);
                emitted = safe;
                if !keep_going {
                    stop = StopReason::Cancelled;
                    break;
                }
            }
            if out.len() == params.max_tokens {
                break;
            }
            if self.tokens.len() + 1 > engine.inner.ctx {
                stop = StopReason::ContextFull;
                break;
            }
            logits = self.eval(&[next])?;
        }
        if text.len() > emitted && stop != StopReason::Cancelled {
            on_text(&text[emitted..]);
        }
        Ok(Generation {
            tokens: out,
            text,
            stop,
            prompt_tokens: prompt.len(),
            prompt_secs,
            gen_secs: t1.elapsed().as_secs_f64(),
        })
    }
}

/// Bytes at the end of `text` that could be the start of a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for len in (1..s.len().min(text.len() + 1)).rev() {
            if s.is_char_boundary(len)
                && text.is_char_boundary(text.len() - len)
                && text.ends_with(&s[..len])
            {
                hold = hold.max(len);
                break;
            }
        }
    }
    hold
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("x<", &stops), 1);
    }
}

/// Choosing the backend when the GPU backend is built in.
#[cfg(feature = "gpu")]
mod gpu_select {
    use std::sync::Mutex;

    use super::{Backend, EngineOptions};
    use crate::backend::gpu::experts::GpuExperts;
    use crate::backend::gpu::kv::GpuKv;
    use crate::backend::gpu::model::unsupported;
    use crate::backend::gpu::{Gpu, GpuModel, GpuOptions};
    use crate::error::Result;
    use crate::experts::plan::{Budget, MemoryPlan, PlanInput};
    use crate::experts::ExpertRef;
    use crate::format::ModelFiles;
    use crate::model::Model;

    /// `MOEFLUX_GPU_IN_PLACE=always`: read experts in place even from a
    /// file whose arrays the kernels cannot address there, so that each is
    /// copied into the arena's few slots instead (CI runs the in-place test
    /// so, to cover that path).
    fn in_place_forced() -> bool {
        std::env::var("MOEFLUX_GPU_IN_PLACE").is_ok_and(|v| v == "always")
    }

    /// The GPU model when `opts.backend` picks the GPU, a line saying
    /// which backend runs and why, and the memory plan to run under.
    /// `plan` is the host's plan without the GPU and `available` the
    /// memory available before the model loaded. On an adapter that
    /// shares host memory the GPU's expert slots are sized from them when
    /// `opts.gpu_mem` does not say, and the plan is made again with the
    /// GPU's buffers and one session's KV cache of `ctx` positions (as
    /// the host's plan counts one session); under `Auto`, a GPU that
    /// leaves the host too little is passed over for the CPU.
    pub(super) fn open(
        opts: &EngineOptions,
        model: &Model,
        files: &ModelFiles,
        experts: &[Vec<ExpertRef>],
        plan: &MemoryPlan,
        available: u64,
        ctx: usize,
    ) -> Result<(Option<Mutex<GpuModel>>, String, MemoryPlan)> {
        type Built = (Option<Mutex<GpuModel>>, String, MemoryPlan);
        let build = |gpu: std::sync::Arc<Gpu>| -> Result<Built> {
            let name = gpu.describe();
            let shared = gpu.shares_host_memory();
            let total: usize = experts.iter().map(Vec::len).sum();
            let slot = GpuExperts::slot_layout(experts).1.iter().sum::<u64>();
            let arena = plan.gpu_arena_in_shared_memory(available);
            // Where the GPU's share of memory cannot hold every expert, a
            // GPU that reads the host's slots in place needs no copies of
            // them: its arena keeps a layer's top k only, for experts that
            // cannot be read so, and the host's cache gets the rest. Not
            // where the host cache is the user's (--expert-cache: it would
            // not grow), nor for files whose expert arrays the kernels
            // cannot address where they land.
            let read_in_place = shared
                && opts.gpu_in_place
                && opts.gpu_mem.is_none()
                && matches!(plan.budget, Budget::Total(_) | Budget::Auto { .. })
                && gpu.reads_host_in_place()
                && arena < (total as u64).saturating_mul(slot)
                && (GpuExperts::addressable_in_place(experts) || in_place_forced());
            let expert_mem = match opts.gpu_mem {
                None if read_in_place => Some(model.cfg.n_experts_used.max(1) as u64 * slot),
                None if shared => Some(arena),
                mem => mem,
            };
            let replan = |gpu_bytes: u64| {
                MemoryPlan::new(
                    plan.budget,
                    PlanInput {
                        gpu_bytes,
                        ..plan.input
                    },
                )
            };
            if let (true, Some(mem), Budget::Total(_) | Budget::Auto { .. }) =
                (shared, expert_mem, plan.budget)
            {
                // The arena alone must leave the host its smallest cache:
                // refused before it is allocated.
                replan(mem)?;
            }
            let m = GpuModel::new(
                gpu,
                model,
                files,
                experts,
                GpuOptions {
                    ubatch: opts.ubatch.max(1),
                    expert_mem,
                    read_in_place,
                },
            )?;
            // Its buffers come out of the host memory the plan budgets:
            // the host's expert slots get what they leave.
            let with_gpu = if shared {
                replan(m.allocated_bytes() + m.kv_bytes(ctx, opts.kv_type))?
            } else {
                *plan
            };
            let st = m.expert_stats();
            let note = if read_in_place {
                format!(
                    "gpu: {name}; experts read in place from the host's expert cache ({} GPU slots of {} for any that cannot be)",
                    st.slots,
                    crate::experts::plan::fmt_bytes(st.slot_bytes)
                )
            } else {
                format!(
                    "gpu: {name}; {} of {total} experts fit in GPU memory ({} slots of {})",
                    st.slots.min(total),
                    st.slots,
                    crate::experts::plan::fmt_bytes(st.slot_bytes)
                )
            };
            Ok((Some(Mutex::new(m)), note, with_gpu))
        };
        let cpu = |why: String| Ok((None, why, *plan));
        let kv_unsupported = GpuKv::stores_f16(opts.kv_type).err();
        match opts.backend {
            Backend::Cpu => cpu("cpu".into()),
            Backend::Gpu => match kv_unsupported {
                Some(e) => Err(e.into()),
                None => build(Gpu::shared()?),
            },
            Backend::Auto => {
                if let Some(e) = kv_unsupported {
                    return cpu(format!("cpu ({e})"));
                }
                let gpu = match Gpu::shared() {
                    Ok(g) => g,
                    Err(e) => return cpu(format!("cpu (no GPU: {e})")),
                };
                if gpu.is_software() {
                    return cpu(format!(
                        "cpu ({} is a software rasterizer, slower than the CPU backend; --backend gpu forces it)",
                        gpu.info.name
                    ));
                }
                if let Some(why) = unsupported(model) {
                    return cpu(format!(
                        "cpu (the GPU backend cannot run this model yet: {why})"
                    ));
                }
                match build(gpu) {
                    Ok(r) => Ok(r),
                    Err(e) => cpu(format!(
                        "cpu (the GPU backend failed to load the model: {e})"
                    )),
                }
            }
        }
    }
}
