//! Tokenizers (from tokenizer.json and from GGUF metadata) and chat
//! templates against the references transformers produced
//! (`tests/fixtures/tokenizer/reference.json`).

mod common;

use std::path::Path;

use common::fixture;
use moeflux::chat::ChatTemplate;
use moeflux::format::{ModelFiles, ModelMetadata};
use moeflux::tokenizer::Tokenizer;
use serde_json::Value;

fn reference() -> Value {
    let p = fixture("tokenizer/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn hf_tokenizer() -> Tokenizer {
    let dir = fixture("qwen3_moe/hf");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    Tokenizer::from_hf_dir(&dir, &cfg).unwrap()
}

fn gguf_meta(rel: &str) -> moeflux::format::gguf::Metadata {
    let files = ModelFiles::open(&fixture(rel)).unwrap();
    match files.metadata {
        ModelMetadata::Gguf(m) => m,
        _ => unreachable!(),
    }
}

fn check_texts(tok: &Tokenizer, source: &str) {
    let r = reference();
    for t in r["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false, false).unwrap(),
            ids(&t["ids"]),
            "{source}, plain: {text:?}"
        );
        assert_eq!(
            tok.encode(text, true, false).unwrap(),
            ids(&t["ids_special"]),
            "{source}, special: {text:?}"
        );
        // Decoding gives the text back.
        assert_eq!(
            tok.decode(&ids(&t["ids_special"]), false),
            text,
            "{source}, decode: {text:?}"
        );
    }
    let chat = &r["chat"];
    assert_eq!(
        tok.encode(chat["rendered"].as_str().unwrap(), true, false)
            .unwrap(),
        ids(&chat["ids"]),
        "{source}: chat prompt ids"
    );
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = hf_tokenizer();
    check_texts(&tok, "tokenizer.json");
    assert_eq!(tok.special.eos, vec![293], "<|im_end|> ends generation");
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let meta = gguf_meta("qwen3_moe/gguf/qwen3_moe-F32.gguf");
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    check_texts(&tok, "GGUF");
    assert!(tok.is_eos(293));
}

#[test]
fn streaming_decode_keeps_multibyte_characters_whole() {
    let tok = hf_tokenizer();
    let text = "déjà vu, 你好, 🚀🦙";
    let ids = tok.encode(text, false, false).unwrap();
    let mut stream = tok.stream(false);
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = tok.step(&mut stream, id) {
            assert!(
                !piece.contains('\u{FFFD}'),
                "partial character emitted: {piece:?}"
            );
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}

fn render(t: &ChatTemplate) -> String {
    let chat = &reference()["chat"];
    t.render(
        &chat["messages"],
        Some(&chat["tools"]),
        chat["add_generation_prompt"].as_bool().unwrap(),
        None,
    )
    .unwrap()
}

#[test]
fn hf_chat_template_renders_like_transformers() {
    let dir = fixture("qwen3_moe/hf");
    let t = ChatTemplate::from_hf_dir(Path::new(&dir), String::new(), "<|im_end|>".into())
        .expect("a template")
        .unwrap();
    assert_eq!(
        render(&t),
        reference()["chat"]["rendered"].as_str().unwrap()
    );
}

#[test]
fn gguf_chat_template_renders_like_transformers() {
    let meta = gguf_meta("qwen3_moe/gguf/qwen3_moe-F32.gguf");
    let t = ChatTemplate::from_gguf(&meta, String::new(), "<|im_end|>".into())
        .expect("a template")
        .unwrap();
    assert_eq!(
        render(&t),
        reference()["chat"]["rendered"].as_str().unwrap()
    );
}
