//! Both parsers against arbitrary and mutated bytes: they must return an
//! error (or a valid header), never panic, and never make an allocation
//! that a header field sized beyond what the file could hold.
//!
//! A counting global allocator records the largest single allocation made
//! on the parsing thread; it must stay within `8 × file length + 64 KiB`
//! (the parsers allocate in proportion to data actually present — a header
//! claiming 2^60 elements would show up as a huge request here).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use moeflux::format::gguf::{parse_header, GgufWriter, MetaArray, MetaValue, StringArray};
use moeflux::format::safetensors::tensors_from_bytes;
use moeflux::quant::GgmlType;
use proptest::prelude::*;

struct Counting;

thread_local! {
    // A const-initialised Cell has no destructor and needs no allocation,
    // so it is safe to touch from inside the allocator.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers every operation to the system allocator unchanged; the
// only addition is a thread-local maximum.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn largest_allocation_during(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    f();
    LARGEST.with(|l| l.get())
}

fn bound(len: usize) -> usize {
    8 * len + 64 * 1024
}

fn sample_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", MetaValue::String("qwen3moe".into()));
    w.add("qwen3moe.block_count", MetaValue::U32(2));
    w.add(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(StringArray::from_iter([
            "a", "bb", "ccc", "<|x|>",
        ]))),
    );
    w.add(
        "tokenizer.ggml.scores",
        MetaValue::Array(MetaArray::F32(vec![0.5; 4])),
    );
    w.add(
        "nested",
        MetaValue::Array(MetaArray::Array(vec![Box::new(MetaArray::U16(vec![
            1, 2, 3,
        ]))])),
    );
    w.add_tensor("token_embd.weight", GgmlType::Q8_0, &[4, 32])
        .unwrap();
    w.add_tensor("blk.0.ffn_up_exps.weight", GgmlType::Q4_K, &[2, 1, 256])
        .unwrap();
    let mut out = Vec::new();
    w.write(&mut out, |_, t, dst| {
        dst.write_all(&vec![0x11; t.size().unwrap() as usize])
    })
    .unwrap();
    out
}

fn sample_safetensors() -> Vec<u8> {
    common::safetensors_bytes(&[
        ("a.weight", "U32", vec![2, 8], common::pattern(64, 1)),
        ("a.scales", "BF16", vec![2, 1], common::pattern(4, 2)),
        ("a.biases", "BF16", vec![2, 1], common::pattern(4, 3)),
        ("b", "F16", vec![3, 2], common::pattern(12, 4)),
    ])
}

fn check_gguf(bytes: &[u8]) {
    let largest = largest_allocation_during(|| {
        let _ = parse_header(bytes);
    });
    assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} bytes for a {}-byte file",
        bytes.len()
    );
}

fn check_safetensors(bytes: &[u8]) {
    let cfg = serde_json::json!({"quantization": {"bits": 4, "group_size": 64}});
    let largest = largest_allocation_during(|| {
        let _ = tensors_from_bytes(bytes, &cfg);
    });
    assert!(
        largest <= bound(bytes.len()),
        "allocated {largest} bytes for a {}-byte file",
        bytes.len()
    );
}

/// A mutation: overwrite `len` bytes at `at` (mod file length) with `with`,
/// then keep the first `keep` (mod length + 1) bytes.
fn mutate(mut bytes: Vec<u8>, at: usize, with: Vec<u8>, keep: usize) -> Vec<u8> {
    let n = bytes.len();
    for (i, b) in with.into_iter().enumerate() {
        let j = (at + i) % n;
        bytes[j] = b;
    }
    bytes.truncate(keep % (n + 1));
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn gguf_arbitrary_bytes(tail in proptest::collection::vec(any::<u8>(), 0..512), v in 0u32..5) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&v.to_le_bytes());
        bytes.extend_from_slice(&tail);
        check_gguf(&bytes);
        check_gguf(&tail);
    }

    #[test]
    fn gguf_mutations(at in any::<usize>(), with in proptest::collection::vec(any::<u8>(), 1..9), keep in any::<usize>()) {
        check_gguf(&mutate(sample_gguf(), at, with, keep));
    }

    #[test]
    fn gguf_length_fields_set_huge(at in any::<usize>(), value in any::<u64>()) {
        // Write a whole u64 anywhere: this is how length and count fields
        // get corrupted.
        check_gguf(&mutate(sample_gguf(), at, value.to_le_bytes().to_vec(), usize::MAX));
    }

    #[test]
    fn safetensors_arbitrary_bytes(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = (tail.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        check_safetensors(&bytes);
        check_safetensors(&tail);
    }

    #[test]
    fn safetensors_mutations(at in any::<usize>(), with in proptest::collection::vec(any::<u8>(), 1..9), keep in any::<usize>()) {
        check_safetensors(&mutate(sample_safetensors(), at, with, keep));
    }
}

#[test]
fn samples_are_valid() {
    assert!(parse_header(&sample_gguf()).is_ok());
    let cfg = serde_json::json!({"quantization": {"bits": 4, "group_size": 64}});
    assert_eq!(
        tensors_from_bytes(&sample_safetensors(), &cfg)
            .unwrap()
            .len(),
        2
    );
}
