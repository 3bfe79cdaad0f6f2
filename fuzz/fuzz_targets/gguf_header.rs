//! Fuzz the GGUF header parser: any input must give `Ok` or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moeflux::format::gguf::parse_header(data);
});
