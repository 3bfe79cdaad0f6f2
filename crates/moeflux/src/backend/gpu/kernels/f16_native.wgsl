// Two f16 values packed in a word (low half first), widened exactly by the
// hardware (needs the adapter's SHADER_F16_IN_F32 downlevel flag).
fn f16x2(v: u32) -> vec2<f32> {
    return unpack2x16float(v);
}
