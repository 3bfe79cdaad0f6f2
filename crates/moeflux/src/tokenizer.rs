//! Tokenizers: from a Hugging Face `tokenizer.json`, or rebuilt from GGUF
//! metadata (`tokenizer.ggml.*`), behind one type.
//!
//! Both sources end up as a `tokenizers` crate tokenizer so that the two
//! paths give identical ids. For GGUF, the byte-level BPE is rebuilt from
//! the token list and merges, with the pre-tokenizer regex that
//! `tokenizer.ggml.pre` names (the regexes are the ones the models' own
//! `tokenizer.json` files use).

use std::path::Path;
use std::sync::Mutex;

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::format::gguf::Metadata;

/// A token id.
pub type TokenId = u32;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("no tokenizer found: {0}")]
    Missing(String),
    #[error("tokenizer.json: {0}")]
    Load(String),
    #[error("GGUF tokenizer model {0:?} is not supported (supported: gpt2 byte-level BPE)")]
    UnsupportedModel(String),
    #[error("GGUF pre-tokenizer {0:?} is not supported yet (supported: qwen2, deepseek-v3, llama-bpe, gpt-4o)")]
    UnsupportedPre(String),
    #[error("GGUF tokenizer metadata is invalid: {0}")]
    Invalid(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// The split regexes of the byte-level BPE pre-tokenizers moeflux knows,
/// by their GGUF `tokenizer.ggml.pre` name. Each list is applied in order
/// (`Split` with isolated matches), then bytes are mapped by ByteLevel.
fn pre_tokenizer_regexes(pre: &str) -> Option<&'static [&'static str]> {
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const O200K: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const DSV3_DIGITS: &str = r"\p{N}{1,3}";
    const DSV3_CJK: &str = r"[一-龥\u3040-ゟ゠-ヿ]+";
    const DSV3_REST: &str = r"[!-/:-~\u{3000}-\u{303F}\u{FF01}-\u{FF5E}\u{2018}-\u{201F}\u{2026}\u{00A1}-\u{00BF}\u{00D7}\u{00F7}]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "qwen2" | "qwen35" => &[QWEN2],
        "llama-bpe" | "llama3" => &[LLAMA3],
        "gpt-4o" => &[O200K],
        "deepseek-v3" => &[DSV3_DIGITS, DSV3_CJK, DSV3_REST],
        _ => return None,
    })
}

/// Where generation stops and what wraps a prompt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<TokenId>,
    /// Every id that ends a generation (EOS, end-of-turn, ...).
    pub eos: Vec<TokenId>,
    /// Whether a raw (non-chat) prompt starts with BOS.
    pub add_bos: bool,
}

/// A tokenizer with the model's special tokens.
pub struct Tokenizer {
    /// Behind a mutex because whether special-token strings are parsed is a
    /// setting of the inner tokenizer; encoding is not on a hot path.
    inner: Mutex<tokenizers::Tokenizer>,
    /// A second handle for decoding (immutable use only).
    decoder: tokenizers::Tokenizer,
    pub special: SpecialTokens,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

fn as_ids(v: &Value) -> Vec<TokenId> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as TokenId]).unwrap_or_default(),
        Value::Array(a) => a.iter().flat_map(as_ids).collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    fn new(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Tokenizer {
        Tokenizer {
            decoder: inner.clone(),
            inner: Mutex::new(inner),
            special,
        }
    }

    /// Loads `tokenizer.json` from a checkpoint directory, with special
    /// tokens from `tokenizer_config.json`, `generation_config.json` and
    /// `config.json`.
    pub fn from_hf_dir(dir: &Path, config: &Value) -> Result<Tokenizer, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(format!(
                "{} does not exist; pass --tokens to run without a tokenizer, or add the model's tokenizer.json",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        let read = |name: &str| -> Value {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        };
        let tok_cfg = read("tokenizer_config.json");
        let gen_cfg = read("generation_config.json");
        let text_cfg = config.get("text_config").unwrap_or(config);
        let token_id = |v: &Value| -> Option<TokenId> {
            let s = match v {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            inner.token_to_id(s)
        };
        let mut eos: Vec<TokenId> = Vec::new();
        for v in [
            gen_cfg.get("eos_token_id"),
            text_cfg.get("eos_token_id"),
            config.get("eos_token_id"),
        ]
        .into_iter()
        .flatten()
        {
            eos.extend(as_ids(v));
        }
        if let Some(id) = tok_cfg.get("eos_token").and_then(token_id) {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();
        let bos = tok_cfg.get("bos_token").and_then(token_id).or_else(|| {
            text_cfg
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as TokenId)
        });
        let add_bos = tok_cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Tokenizer::new(inner, SpecialTokens { bos, eos, add_bos }))
    }

    /// Rebuilds the tokenizer described by GGUF metadata.
    pub fn from_gguf(meta: &Metadata) -> Result<Tokenizer, TokenizerError> {
        let model = meta
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| TokenizerError::Missing("the GGUF file has no tokenizer.ggml.model; pass --tokens to run without a tokenizer".into()))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre = meta.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let regexes = pre_tokenizer_regexes(pre)
            .ok_or_else(|| TokenizerError::UnsupportedPre(pre.to_string()))?;
        let tokens = meta
            .get_array("tokenizer.ggml.tokens")
            .and_then(|a| a.as_strings())
            .ok_or_else(|| {
                TokenizerError::Invalid("tokenizer.ggml.tokens is missing or not strings".into())
            })?;
        let empty = crate::format::gguf::StringArray::default();
        let merges_arr = match meta.get_array("tokenizer.ggml.merges") {
            // An empty array's element type is whatever the writer chose.
            Some(a) if a.is_empty() => &empty,
            Some(a) => a.as_strings().ok_or_else(|| {
                TokenizerError::Invalid("tokenizer.ggml.merges is not an array of strings".into())
            })?,
            // A vocabulary of single bytes needs no merges.
            None => &empty,
        };
        let types: Vec<i64> = meta
            .get_array("tokenizer.ggml.token_type")
            .and_then(|a| a.to_i64s())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }

        // Later duplicates of a token string (never in real vocabularies)
        // must not shadow the first id.
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let mut merges = Vec::with_capacity(merges_arr.len());
        for m in merges_arr.iter() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| TokenizerError::Invalid(format!("merge {m:?} is not two tokens")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut pre_tokenizers = Vec::with_capacity(regexes.len() + 1);
        for r in regexes {
            let split = Split::new(
                SplitPattern::Regex(r.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
            pre_tokenizers.push(split.into());
        }
        pre_tokenizers.push(ByteLevel::new(false, false, false).into());
        inner.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if pre.starts_with("qwen") {
            // Qwen's tokenizer.json normalises to NFC before splitting.
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| TokenizerError::Invalid(e.to_string()))?;
        }
        // Control (3) and user-defined (4) tokens are matched as whole
        // strings before BPE; control tokens are "special".
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.to_string(), t == 3).normalized(false))
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| TokenizerError::Invalid(e.to_string()))?;

        let id = |k: &str| {
            meta.get_u64(k)
                .map(|v| v as TokenId)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let mut eos: Vec<TokenId> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id(k))
        .collect();
        eos.sort_unstable();
        eos.dedup();
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            add_bos: meta
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(false),
        };
        Ok(Tokenizer::new(inner, special))
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.decoder.get_vocab_size(true)
    }

    /// Encodes text. With `parse_special`, special-token strings in the text
    /// (`<|im_start|>`) become their ids; without, they are ordinary text.
    /// With `add_bos`, the model's BOS is prepended when it uses one.
    pub fn encode(
        &self,
        text: &str,
        parse_special: bool,
        add_bos: bool,
    ) -> Result<Vec<TokenId>, TokenizerError> {
        let mut tok = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        tok.set_encode_special_tokens(!parse_special);
        let enc = tok
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.special.add_bos {
            ids.extend(self.special.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text (special tokens included unless `skip_special`).
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> String {
        self.decoder.decode(ids, skip_special).unwrap_or_default()
    }

    /// The string of one token as the vocabulary stores it.
    pub fn token(&self, id: TokenId) -> Option<String> {
        self.decoder.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<TokenId> {
        self.decoder.token_to_id(token)
    }

    /// Whether `id` is one of the ids that end generation.
    pub fn is_eos(&self, id: TokenId) -> bool {
        self.special.eos.contains(&id)
    }

    /// Starts an incremental decoder for streaming output.
    pub fn stream(&self, skip_special: bool) -> TextStream {
        TextStream {
            skip_special,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// Feeds one token to a stream; returns the text it completes, if any
    /// (multi-byte characters split across tokens come out whole).
    pub fn step(&self, stream: &mut TextStream, id: TokenId) -> Option<String> {
        tokenizers::tokenizer::step_decode_stream(
            &self.decoder,
            vec![id],
            stream.skip_special,
            &mut stream.ids,
            &mut stream.prefix,
            &mut stream.prefix_index,
        )
        .ok()
        .flatten()
    }
}

/// State of an incremental decode (see [`Tokenizer::step`]).
#[derive(Clone, Debug)]
pub struct TextStream {
    skip_special: bool,
    ids: Vec<TokenId>,
    prefix: String,
    prefix_index: usize,
}
