//! Fuzz the safetensors header parser and MLX triple grouping.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = serde_json::json!({"quantization": {"bits": 4, "group_size": 64}});
    let _ = moeflux::format::safetensors::tensors_from_bytes(data, &config);
});
