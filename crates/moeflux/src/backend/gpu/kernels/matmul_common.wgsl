// What every matrix product shares (matmul.wgsl, one token; matmul_tiled.wgsl,
// prompts): the parameter block, X and the weights, and the helpers that
// the weight-format files use to decode one part of one row.
//
// Y = X Wᵀ for one part (a range of rows) of a quantized weight matrix.
// X is n × cols f32 (row-major, read as vec4s: cols is a multiple of 32),
// Y is n × y_stride f32, and this part's row r is column row0 + r of Y
// (an expert batch's jobs each name their own first rows of X and Y).
//
// A row is cut into units of 32 columns (a quant block or sub-block) and
// each unit into four parts of eight columns. The format file appended
// to a product's module decodes one part of one row into eight f32
// weights (`part`) and says which eight columns they are (`part_cols`).
//
// Expert batches (BATCH, a constant of the module): one dispatch computes
// the same product for several experts, each a job of the job table
// (`job_word`, generated with the module): workgroup y is job p.job0 + y,
// row groups are workgroup x. A job is JOB_WORDS words: the byte offset
// in w of its matrix A, the word offsets of A's MLX scales and biases, the
// same three for a matrix B, the job's first row of Y, its token count,
// and its first row of X (the rest unused). With GLU, A and B are an
// expert's gate and up projections, both are computed from the same
// activations, and Y gets silu(X Aᵀ) · (X Bᵀ) (SwiGLU, as the CPU
// computes it). Y is declared with the module's constants, with `put_y`
// and `y_at`.

struct Params {
    rows: u32,       // rows in this part
    cols: u32,
    n: u32,          // tokens
    row0: u32,       // first row of this part in the whole matrix
    y_stride: u32,   // rows of the whole matrix (Y's row length)
    row_bytes: u32,  // GGML formats: bytes of one row
    units: u32,      // units per row: cols / 32
    wg_x: u32,       // workgroups along x in this dispatch
    group: u32,      // MLX: columns per scale/bias group
    scale_f16: u32,  // MLX: 1 when scales/biases are f16, 0 for bf16
    eps: f32,        // NORM: the RMSNorm epsilon
    job0: u32,       // BATCH: first job of this dispatch
    acc: u32,        // 1: Y += X Wᵀ (a residual add), else Y = X Wᵀ
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    // ROUTE (see route.wgsl): top k, whether the weights are renormalised,
    // the layer's first expert slot, the slot stride in bytes, and the
    // byte offsets of gate's, up's and down's arrays in a slot.
    k: u32,
    norm: u32,
    first: u32,
    stride: u32,
    gate: vec4<u32>,
    up: vec4<u32>,
    down: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
// The part's weight bytes, little-endian, packed into words (binding 3,
// declared by the host: `w`, an array<u32>, or for formats whose products
// load 16 bytes at once (WIDE) `w4`, an array<vec4<u32>>), read a word at a
// time with `wd(i)`; blocks need not start on a word boundary (Q4_0
// blocks are 18 bytes, Q6_K 210).

const UNIT: u32 = 32u;

// Where the matrix being decoded starts: a byte offset in w and, for MLX,
// word offsets in the scales and biases (zero but for expert batches).
var<private> wb: u32;
var<private> sb: u32;
var<private> bb: u32;

// Eight decoded weights: columns part_cols(q).x .. +4 and part_cols(q).y .. +4
// of their unit.
struct Part {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Byte b of the weights.
fn byte_at(b: u32) -> u32 {
    return (wd(b >> 2u) >> ((b & 3u) * 8u)) & 0xffu;
}

// The four bytes from byte b (any alignment), little-endian.
fn word_at(b: u32) -> u32 {
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    if s == 0u {
        return wd(i);
    }
    return (wd(i) >> s) | (wd(i + 1u) << (32u - s));
}

// The little-endian u16 at an even byte offset b.
fn half_at(b: u32) -> u32 {
    return (wd(b >> 2u) >> ((b & 2u) * 8u)) & 0xffffu;
}

// The f16 at an even byte offset b, widened exactly.
fn f16_at(b: u32) -> f32 {
    return f16x2(half_at(b)).x;
}

// Decodes from matrix m (0: A, 1: B) of offsets o.
fn use_matrix(o: array<vec3<u32>, 2>, m: u32) {
    wb = o[m].x;
    sb = o[m].y;
    bb = o[m].z;
}

// Where a workgroup's work lies: its row group, the offsets of matrices A
// and B, its first token rows of X and of Y, and its token count. A
// dense product's row groups are wg.x + wg.y * wg_x (one dispatch
// dimension holds at most 65535 workgroups, and an LM head has more row
// groups); an expert batch's are wg.x, of job p.job0 + wg.y.
struct Work {
    g: u32,
    o: array<vec3<u32>, 2>,
    x_base: u32,
    y_base: u32,
    n: u32,
}

fn work_of(wg: vec3<u32>) -> Work {
    if BATCH {
        let j = (p.job0 + wg.y) * JOB_WORDS;
        let a = vec3<u32>(job_word(j), job_word(j + 1u), job_word(j + 2u));
        let b = vec3<u32>(job_word(j + 3u), job_word(j + 4u), job_word(j + 5u));
        let o = array<vec3<u32>, 2>(a, b);
        return Work(wg.x, o, job_word(j + 8u), job_word(j + 6u), job_word(j + 7u));
    }
    let none = array<vec3<u32>, 2>(vec3<u32>(0u), vec3<u32>(0u));
    return Work(wg.x + wg.y * p.wg_x, none, 0u, 0u, p.n);
}
