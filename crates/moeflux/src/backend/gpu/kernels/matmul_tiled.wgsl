// Prompt products: Y = X Wᵀ for many tokens, in tiles. A workgroup
// computes TR rows of W against TT tokens of X (GLU: TR rows of A and of
// B), walking the columns a unit (32) at a time: its threads decode the
// tile's parts of the unit into shared memory and load the tokens' 32
// activations beside them, then each thread adds the unit into its 4 × 4
// outputs (4 rows × 4 tokens of one matrix) while its loads of the next
// unit are in flight. Each weight is decoded once for TT tokens and each
// activation loaded once for TR rows, where the one-token kernel
// (matmul.wgsl) decodes every weight once per token.
//
// Every output is summed in one order — column by column, from the first
// to the last — whatever the token count, the tile a token falls in or
// the job it belongs to, so a prompt gives the same bits in chunks of any
// size (`prefill_chunking_changes_nothing`). A decode step (matmul.wgsl)
// sums in another order: its bits are not a prompt's.
//
// Row groups are numbered as `work_of` says (matmul_common.wgsl); token
// tiles are workgroup z. Rows and tokens past the end repeat the last
// one; their sums are dropped. The RMSNorm of a normalising product runs
// before this kernel (rms_norm.wgsl), and ROUTE and COMBINE are one-token
// shapes.

// TR rows and TT tokens a tile are set by the host
// (`Product::rows_per_group`, `tokens_per_group`); WG = TR · TT / 16
// threads, twice that with GLU: half the threads sum A's outputs, half
// B's, and B's sums reach A's threads through shared memory at the end
// (on an H100, 8 % faster prompts than each thread summing both).
const_assert TR * TT * select(1u, 2u, GLU) == 16u * WG;
// Threads computing one matrix's outputs (GLU: A's first, then B's).
const HALF: u32 = TR * TT / 16u;
// Parts of a unit's tile a thread decodes (each matrix): TR · 4 / WG.
const PARTS: u32 = 4u * TR / WG;
// vec4s of a unit's activations a thread loads: TT · 8 / WG.
const XLOADS: u32 = 8u * TT / WG;

// A unit of the tile, column-major: `wa[k * TR / 4 + r / 4][r % 4]` is
// row r's weight at column k of the unit (B's 8 · TR further on), and
// `xs[k * TT / 4 + t / 4][t % 4]` token t's activation there, so that a
// thread reads its four rows and its four tokens at a column as two vec4s.
var<workgroup> wa: array<vec4<f32>, select(8u * TR, 16u * TR, GLU)>;
// Where B's tile starts in `wa`.
const B: u32 = 8u * TR;
var<workgroup> xs: array<vec4<f32>, 8u * TT>;

// The next unit's parts and activations, loaded while the threads
// compute the unit in shared memory (its loads then wait beside that
// work instead of after it).
var<private> next_a: array<Part, PARTS>;
var<private> next_b: array<Part, PARTS>;
var<private> next_x: array<vec4<f32>, XLOADS>;

// Loads unit u of the tile (rows r0.., tokens t0.. of n from X's row
// x_base, c4 vec4s a row) into the `next_` registers: part i of the
// tile's TR · 4 is row i / 4, part i % 4 (four threads a row read its
// unit's bytes side by side), and vec4 i of its activations is token
// i / 8, columns 4 (i % 8).. (eight threads a token).
fn fetch(o: array<vec3<u32>, 2>, r0: u32, t0: u32, n: u32, x_base: u32, u: u32, lid: u32) {
    for (var k = 0u; k < PARTS; k++) {
        let i = lid + k * WG;
        let r = min(r0 + i / 4u, p.rows - 1u);
        use_matrix(o, 0u);
        next_a[k] = part(r, u, i % 4u);
        if GLU {
            use_matrix(o, 1u);
            next_b[k] = part(r, u, i % 4u);
        }
    }
    for (var k = 0u; k < XLOADS; k++) {
        let i = lid + k * WG;
        let t = min(t0 + i / 8u, n - 1u);
        next_x[k] = x[(x_base + t) * (p.cols / 4u) + u * (UNIT / 4u) + i % 8u];
    }
}

// Stores the `next_` registers into the shared tile.
fn stage(lid: u32) {
    for (var k = 0u; k < PARTS; k++) {
        let i = lid + k * WG;
        let c = part_cols(i % 4u);
        let at = i / 16u;
        let lane = (i / 4u) % 4u;
        for (var j = 0u; j < 4u; j++) {
            wa[(c.x + j) * (TR / 4u) + at][lane] = next_a[k].lo[j];
            wa[(c.y + j) * (TR / 4u) + at][lane] = next_a[k].hi[j];
            if GLU {
                wa[B + (c.x + j) * (TR / 4u) + at][lane] = next_b[k].lo[j];
                wa[B + (c.y + j) * (TR / 4u) + at][lane] = next_b[k].hi[j];
            }
        }
    }
    for (var k = 0u; k < XLOADS; k++) {
        let i = lid + k * WG;
        let t = i / 8u;
        let c = 4u * (i % 8u);
        for (var j = 0u; j < 4u; j++) {
            xs[(c + j) * (TT / 4u) + t / 4u][t % 4u] = next_x[k][j];
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = work_of(wg);
    let r0 = w.g * TR;
    let t0 = wg.z * TT;
    // Uniform over the workgroup, so the barriers below stay uniform.
    if r0 >= p.rows || t0 >= w.n {
        return;
    }
    // This thread's outputs: rows r0 + 4·tr.. and tokens t0 + 4·tt.. of
    // matrix m (0: A, 1: B).
    let m = lid / HALF;
    let l = lid % HALF;
    let tr = l % (TR / 4u);
    let tt = l / (TR / 4u);
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    fetch(w.o, r0, t0, w.n, w.x_base, 0u, lid);
    for (var u = 0u; u < p.units; u++) {
        stage(lid);
        workgroupBarrier();
        // The next unit (the last one again after the last: a load that
        // is never used, where a branch would keep its loads from
        // overlapping the sums below).
        fetch(w.o, r0, t0, w.n, w.x_base, min(u + 1u, p.units - 1u), lid);
        for (var k = 0u; k < UNIT; k++) {
            let xv = xs[k * (TT / 4u) + tt];
            let wv = wa[m * B + k * (TR / 4u) + tr];
            // acc[j] holds token j's four rows.
            for (var j = 0u; j < 4u; j++) {
                acc[j] += wv * xv[j];
            }
        }
        // Nobody may stage the next unit before every thread has read
        // this one.
        workgroupBarrier();
    }
    if GLU {
        // B's sums to the thread of A's same outputs, through the tile's
        // shared memory (free after the loop's last barrier).
        if m == 1u {
            for (var j = 0u; j < 4u; j++) {
                wa[4u * l + j] = acc[j];
            }
        }
        workgroupBarrier();
        if m == 1u {
            return;
        }
    }
    for (var j = 0u; j < 4u; j++) {
        let t = t0 + 4u * tt + j;
        var s = acc[j];
        if GLU {
            s = s / (1.0 + exp(-s)) * wa[4u * l + j];
        }
        for (var i = 0u; i < 4u; i++) {
            let r = r0 + 4u * tr + i;
            if t < w.n && r < p.rows {
                let at = (w.y_base + t) * p.y_stride + p.row0 + r;
                if p.acc == 1u {
                    put_y(at, y_at(at) + s[i]);
                } else {
                    put_y(at, s[i]);
                }
            }
        }
    }
}
