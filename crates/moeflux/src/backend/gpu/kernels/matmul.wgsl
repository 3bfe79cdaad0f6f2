// One-token products (decode): a workgroup computes four rows of Y for
// one token, the activations loaded once for the four rows. Thread i of a
// workgroup takes parts i, i + WG, ... of each row, so neighbouring
// threads read neighbouring weights and neighbouring activations
// (coalesced loads: reading x with a stride of a whole unit per thread
// made every load touch as many cache lines as there are threads). The
// four rows' sums are one vec4, reduced across the workgroup at the end.
// Q4_K (WIDE, below) goes a chunk of 32 weights and one row a thread.
// Routers take one row a workgroup (ROUTE, below). Row groups are
// numbered as `work_of` says (matmul_common.wgsl). Prompts take
// matmul_tiled.wgsl.
//
// COMBINE: the job loop runs inside each workgroup, and the weighted sum
// of the jobs' rows is added to Y (see below).
//
// NORM (a constant of the module): X's row is RMS-normalised — each row
// of Y is s · Σ w · (x · norm_w) with s = 1 / sqrt(mean(x²) + eps), the
// token's inverse RMS, applied once after the sum. Each workgroup finds
// the mean square itself, from the activations its product loads anyway:
// the squares are summed beside the products and reduced with them, so
// the norm adds no wait on memory and no barrier. Summing them first, in
// a pass of their own, cost 2.2 µs a layer for q|k|v and 1.3 for the
// router on an H100; decode went 3–6 % faster without it. The workgroup
// of the first rows stores the normalised row, x · s · norm_w, in
// `normed` for the products after this one. NORM never goes with GLU:
// the squares are reduced only beside a product's own sums.
//
// ROUTE (a constant of the module; NORM, the router of a layer whose
// experts are all resident): the last workgroup to finish routes the
// token (`route_after`, matmul_route.wgsl), so no routing dispatch
// follows. Y is then stored through atomics.
//
// A router is small (128 F32 rows of 2048 columns for Qwen3-30B-A3B): at
// four rows a workgroup it was 32 workgroups on an H200's 132 SMs. So
// ROUTE takes one row a workgroup (GROUP_ROWS = 1), each row summed in the
// order of the four-row layout, so its bits are those of the streamed
// path's router product (NORM, four rows). Router + route went 0.79 →
// 0.48 ms a token on an H200 (Qwen3-30B-A3B; bench/BENCHMARKS.md,
// twenty-second GPU session). One row a workgroup for every F32 NORM
// product too (the streamed path's routers, a hybrid's b|a) made a hybrid
// test on lavapipe fail most runs, where main fails it at times (a race
// not found yet, see bench/BENCHMARKS.md); not kept.

// The squares of NORM are reduced only beside a product's own sums.
const_assert !(NORM && GLU);

// One-token products hold 4 KiB of shared memory that they never use
// (besides the reductions' slots: 1 KiB with subgroups, 4 with a tree):
// measured on an H100 (NVIDIA's Vulkan driver), a decode step's products
// ran faster with it (Q4_K decode 162 → 182 tok/s, Q4_0 188 → 193; the
// down + combine product 1.59 → 1.05 ms a token). The effect is a step:
// 2 KiB was as slow as none (156 tok/s against 162 without it, one run
// apart), 8 KiB about as fast as 4 (Q4_K 195 against 193, Q4_0 198
// against 203), 16 KiB slower again (149). Why is not known; a guess is
// the driver's split of each SM's memory between L1 and shared memory,
// which the other kernels of a layer (attention, routing: 4–9 KiB) set
// differently. `footprint` keeps it allocated.
const FOOTPRINT: u32 = 256u;
var<workgroup> footprint_slots: array<vec4<f32>, FOOTPRINT>;

fn footprint(lane: Lane) {
    // Never true (the host keeps parameters ≤ MAX_PARAM, below this), but
    // the compiler cannot know; uniform, so the barrier is allowed.
    if p.rows == 0xffffffffu {
        footprint_slots[lane.lid % FOOTPRINT] = vec4<f32>(1.0);
        workgroupBarrier();
        put_y(0u, footprint_slots[(lane.lid + 1u) % FOOTPRINT].x);
    }
}
// Rows of one workgroup (the reductions' vec4 holds them). GROUP_ROWS
// (a constant of the module, `rows_per_group` in kernels.rs) is the rows
// a workgroup computes: R, or one for a router (see ROUTE).
const R: u32 = 4u;
const_assert GROUP_ROWS == R || GROUP_ROWS == 1u;

// NORM: 1 / sqrt(mean(x²) + eps) from summed squares.
fn inv_rms(squares: vec4<f32>) -> vec4<f32> {
    return 1.0 / sqrt(squares / f32(p.cols) + p.eps);
}

// The (vec4) indices in a token row of part i's two groups of four
// activations.
fn part_x(i: u32) -> vec2<u32> {
    return ((i >> 2u) * UNIT + part_cols(i & 3u)) / 4u;
}

// NORM: the squares of part i's eight activations (the columns
// `rows_part` reads) of the token row starting at (vec4) index `row`.
fn part_squares(row: u32, i: u32) -> f32 {
    let pc = part_x(i);
    let a = x[row + pc.x];
    let b = x[row + pc.y];
    return dot(a, a) + dot(b, b);
}

// NORM: the normalised token row starting at (vec4) index `row`, inverse
// RMS `s`, stored in `normed` (by the whole workgroup).
fn store_normed(row: u32, s: f32, lane: Lane) {
    for (var i = lane.lid; i < p.cols / 4u; i += WG) {
        normed[row + i] = x[row + i] * s * norm_w[i];
    }
}

// Four activations from (vec4) index c of the token row starting at
// `row`, times the norm's weights when NORM (the inverse RMS comes after
// the sum).
fn x_at(row: u32, c: u32) -> vec4<f32> {
    if NORM {
        return x[row + c] * norm_w[c];
    }
    return x[row + c];
}

// Eight decoded weights against their activations.
fn part_dot(a: Part, xl: vec4<f32>, xh: vec4<f32>) -> f32 {
    return dot(a.lo, xl) + dot(a.hi, xh);
}

// Part i (of 4 · units) of rows rr against one token's activations (row
// `xr`): the four rows' partial sums.
fn rows_part(rr: vec4<u32>, xr: u32, i: u32) -> vec4<f32> {
    let u = i >> 2u;
    let q = i & 3u;
    let pc = part_x(i);
    let xl = x_at(xr, pc.x);
    let xh = x_at(xr, pc.y);
    return vec4<f32>(
        part_dot(part(rr.x, u, q), xl, xh),
        part_dot(part(rr.y, u, q), xl, xh),
        part_dot(part(rr.z, u, q), xl, xh),
        part_dot(part(rr.w, u, q), xl, xh),
    );
}

// Part i of row r alone (`rows_part`'s sum for that row).
fn row_part(r: u32, xr: u32, i: u32) -> f32 {
    let pc = part_x(i);
    return part_dot(part(r, i >> 2u, i & 3u), x_at(xr, pc.x), x_at(xr, pc.y));
}

// WIDE (a constant of the module: formats whose `wide_dot` decodes a
// chunk of 32 weights in 16-byte loads, see q4_k.wgsl): a thread takes
// one row of the workgroup's four, lid % R, and its chunks lid / R,
// + ROW_THREADS (= WG / R), ..., so that the threads of a warp read
// neighbouring chunks of the four rows (whole cache lines) and a row of
// fewer chunks than threads still keeps most of them busy (768 columns:
// 96 of 128). Each thread's sum goes into its row's component of the vec4
// the reductions take. Measured on an H200 (bench/BENCHMARKS.md, 21st
// GPU session): a thread's chunks taken two or four at a time (their
// loads in flight together) read a large matrix 4 % faster but decoded
// no faster; Q4_0 blocks read so (five words a block) and F32 rows in
// 16-byte loads were slower than their eight-weight parts.
const_assert WG % R == 0u;
const ROW_THREADS: u32 = WG / R;

// `wide_x`: the eight vec4s of activations chunk c multiplies (the
// format's `wide_col` says where), of the token row at (vec4) index xr,
// in `wide_dot`'s order.
fn wide_x(xr: u32, c: u32) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(
        x[xr + wide_col(c, 0u)], x[xr + wide_col(c, 1u)],
        x[xr + wide_col(c, 2u)], x[xr + wide_col(c, 3u)],
        x[xr + wide_col(c, 4u)], x[xr + wide_col(c, 5u)],
        x[xr + wide_col(c, 6u)], x[xr + wide_col(c, 7u)],
    );
}

// Chunk c of row `row` against the token row at xr: A's sum, B's (GLU),
// and the squares of the chunk's activations where `squares` (NORM; 0
// otherwise). Matrix offsets `o` as `use_matrix` takes them.
fn wide_chunk(o: array<vec3<u32>, 2>, row: u32, xr: u32, c: u32, squares: bool) -> vec3<f32> {
    var xs = wide_x(xr, c);
    var sq = 0.0;
    if NORM {
        sq = select(0.0, wide_squares(xs), squares);
        xs = wide_normed(xs, c);
    }
    use_matrix(o, 0u);
    let a = wide_dot(row, c, xs);
    var b = 0.0;
    if GLU {
        use_matrix(o, 1u);
        b = wide_dot(row, c, xs);
    }
    return vec3<f32>(a, b, sq);
}

// Every chunk of one row a thread takes (see WIDE above): the sums of
// `wide_chunk`, for thread `lid` (its row is `row`).
fn wide_row(o: array<vec3<u32>, 2>, row: u32, xr: u32, lid: u32) -> vec3<f32> {
    let squares = NORM && lid % R == 0u;
    var s = vec3<f32>(0.0);
    for (var c = lid / R; c < p.units; c += ROW_THREADS) {
        s += wide_chunk(o, row, xr, c, squares);
    }
    return s;
}

// NORM: `xs` (chunk c's activations) times the norm's weights.
fn wide_normed(xs: array<vec4<f32>, 8>, c: u32) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(
        xs[0] * norm_w[wide_col(c, 0u)], xs[1] * norm_w[wide_col(c, 1u)],
        xs[2] * norm_w[wide_col(c, 2u)], xs[3] * norm_w[wide_col(c, 3u)],
        xs[4] * norm_w[wide_col(c, 4u)], xs[5] * norm_w[wide_col(c, 5u)],
        xs[6] * norm_w[wide_col(c, 6u)], xs[7] * norm_w[wide_col(c, 7u)],
    );
}

// NORM: the squares of a chunk's activations.
fn wide_squares(xs: array<vec4<f32>, 8>) -> f32 {
    return dot(xs[0], xs[0]) + dot(xs[1], xs[1]) + dot(xs[2], xs[2]) + dot(xs[3], xs[3])
        + dot(xs[4], xs[4]) + dot(xs[5], xs[5]) + dot(xs[6], xs[6]) + dot(xs[7], xs[7]);
}

// COMBINE: the matrix offsets of job r of the dispatch (as `use_matrix`
// takes them; jobs past the last are the last).
fn job_matrix(r: u32) -> array<vec3<u32>, 2> {
    let j = (p.job0 + min(r, p.n - 1u)) * JOB_WORDS;
    let a = vec3<u32>(job_word(j), job_word(j + 1u), job_word(j + 2u));
    return array<vec3<u32>, 2>(a, vec3<u32>(0u));
}

// COMBINE: the (vec4) index in X of job r's row (jobs past the last are
// the last), rows of c4 vec4s.
fn job_x(r: u32, c4: u32) -> u32 {
    return job_word((p.job0 + min(r, p.n - 1u)) * JOB_WORDS + 8u) * c4;
}

// COMBINE, WIDE: `wide_row`'s sums of row `row` for jobs r and r + 1 (the
// last job twice when r is the last), their chunks in one loop: the two
// jobs' loads are in flight together, where one job after the other
// waited on memory for each (a down row of 768 columns is one round of a
// row's threads). Measured on an H200 (bench/BENCHMARKS.md, twenty-second
// GPU session): the combine 0.99 → 0.90 ms a token on Qwen3-30B-A3B
// Q4_K; four jobs at a time were slower than two.
fn wide_pair(r: u32, row: u32, c4: u32, lid: u32) -> vec2<f32> {
    let oa = job_matrix(r);
    let ob = job_matrix(r + 1u);
    let xa = job_x(r, c4);
    let xb = job_x(r + 1u, c4);
    var s = vec2<f32>(0.0);
    for (var c = lid / R; c < p.units; c += ROW_THREADS) {
        s.x += wide_chunk(oa, row, xa, c, false).x;
        s.y += wide_chunk(ob, row, xb, c, false).x;
    }
    return s;
}

// 1 in component k, 0 elsewhere.
fn one_hot(k: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), vec4<f32>(1.0), vec4<u32>(0u, 1u, 2u, 3u) == vec4<u32>(k));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, lane: Lane) {
    let c4 = p.cols / 4u;
    footprint(lane);
    let parts = p.units * 4u;
    if COMBINE {
        // Rows r0.. of every job's product in turn (jobs p.job0 .. p.job0
        // + p.n, one token's experts in rank order), weighted and summed in
        // that order and added to Y: the down products and moe_combine.wgsl
        // in one dispatch, with the same arithmetic as the two. (WIDE: two
        // jobs at a time.)
        let r0 = wg.x * R;
        if r0 >= p.rows {
            return;
        }
        let rr = min(vec4<u32>(r0, r0 + 1u, r0 + 2u, r0 + 3u), vec4<u32>(p.rows - 1u));
        var total = vec4<f32>(0.0);
        if WIDE {
            // Two jobs at a time (see `wide_pair`), reduced in the barrier
            // rounds of one; each job's sums and their weighting as one at
            // a time, so the same bits.
            let k = lane.lid % R;
            let oh = one_hot(k);
            for (var r = 0u; r < p.n; r += 2u) {
                let s = wide_pair(r, rr[k], c4, lane.lid);
                let ab = wg_sum4x2_last(s.x * oh, s.y * oh, lane);
                // Nobody may overwrite a slot before every thread has read them all.
                workgroupBarrier();
                total += combine_w[r] * ab.a;
                if r + 1u < p.n {
                    total += combine_w[r + 1u] * ab.b;
                }
            }
        } else {
            for (var r = 0u; r < p.n; r++) {
                let o = job_matrix(r);
                use_matrix(o, 0u);
                let xr = job_x(r, c4);
                var acc = vec4<f32>(0.0);
                for (var i = lane.lid; i < parts; i += WG) {
                    acc += rows_part(rr, xr, i);
                }
                total += combine_w[r] * wg_sum4(acc, lane);
            }
        }
        if lane.lid < 4u && r0 + lane.lid < p.rows {
            let at = p.row0 + r0 + lane.lid;
            put_y(at, y_at(at) + total[lane.lid]);
        }
        return;
    }
    let w = work_of(wg);
    let r0 = w.g * GROUP_ROWS;
    // One token a workgroup z (dense products: the token's row of X and Y).
    let t0 = wg.z;
    // Uniform over the workgroup, so the barriers below stay uniform.
    if r0 >= p.rows || t0 >= w.n {
        return;
    }
    // Sums of A's rows, and of B's (GLU).
    var acc = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    // NORM: the token's summed squares (in .x).
    var squares = vec4<f32>(0.0);
    // Rows past the end (or the group's one row) repeat the last one;
    // their sums are dropped. (WIDE with one row: each thread of the row's
    // component 0 sums the chunks it sums in the four-row layout.)
    var rr = min(vec4<u32>(r0, r0 + 1u, r0 + 2u, r0 + 3u), vec4<u32>(p.rows - 1u));
    if GROUP_ROWS == 1u {
        rr = vec4<u32>(r0);
    }
    // The token row's first (vec4) index in X.
    let xr = (w.x_base + t0) * c4;
    if WIDE {
        let k = lane.lid % R;
        let sums = wide_row(w.o, rr[k], xr, lane.lid);
        acc = sums.x * one_hot(k);
        acc2 = sums.y * one_hot(k);
        squares.x = sums.z;
    } else {
        for (var i = lane.lid; i < parts; i += WG) {
            use_matrix(w.o, 0u);
            if GROUP_ROWS == 1u {
                acc.x += row_part(r0, xr, i);
            } else {
                acc += rows_part(rr, xr, i);
            }
            if NORM {
                squares.x += part_squares(xr, i);
            }
            if GLU {
                use_matrix(w.o, 1u);
                acc2 += rows_part(rr, xr, i);
            }
        }
    }
    // The workgroup's sums, two at a time where two are wanted, without a
    // closing barrier (no shared slot is written after it): each
    // reduction is a chain of barriers that the whole workgroup waits on.
    var s = vec4<f32>(0.0);
    var up = vec4<f32>(0.0);
    if GLU {
        let r = wg_sum4x2_last(acc, acc2, lane);
        s = r.a;
        up = r.b;
    } else if NORM {
        let r = wg_sum4x2_last(acc, squares, lane);
        let inv = inv_rms(r.b);
        s = r.a * inv.x;
        if r0 == 0u {
            store_normed(xr, inv.x, lane);
        }
    } else {
        s = wg_sum4_last(acc, lane);
    }
    if GLU {
        s = s / (1.0 + exp(-s)) * up;
    }
    // Lanes 0..GROUP_ROWS write rows r0..r0 + GROUP_ROWS.
    if lane.lid < GROUP_ROWS && r0 + lane.lid < p.rows {
        let at = (w.y_base + t0) * p.y_stride + p.row0 + r0 + lane.lid;
        let v = s[lane.lid];
        if p.acc == 1u {
            put_y(at, y_at(at) + v);
        } else {
            put_y(at, v);
        }
    }
    if ROUTE {
        route_after(lane);
    }
}
