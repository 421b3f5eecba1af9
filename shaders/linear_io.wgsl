// qlinear: bindings and the fused epilogue shared by the GEMM kernels
// (gemm_dot4, gemm_f32, gemv).
//
// Bindings: 0 output y (tout, TIn), 1 act_q (u32 words, rows of kw words),
// 2 weight_q (u32 words, rows of kw words), 3 act_scale, 4 weight_scale, 5 bias
// (TIn), 6 act_zp (i32, per row), 8 weight_colsum (i32, per column), 7 params. The
// plans without a zero point bind the device's dummy buffer at 6 and 8 and never read
// them (ASYM false): one bind group layout and one source serve every scheme. Each
// dispatch covers rows [0, m) x columns [0, n) of a block
// whose origins in each binding are the *_base fields, so that a problem larger
// than one dispatch or one binding is run block by block.

override HAS_BIAS: bool = false;
// False when K is small enough that |acc| <= 2^24, where f32(acc) is exact anyway.
override BIG_ACC: bool = true;
// The activation scheme has a zero point: acc - act_zp[row] * colsum[col] is dequantized.
override ASYM: bool = false;

struct LinearParams {
    m: u32,          // rows in this dispatch
    n: u32,          // columns in this dispatch
    kw: u32,         // words per row of act_q and weight_q
    a_base: u32,     // word index of act_q row 0
    b_base: u32,     // word index of weight_q row (column) 0
    s_base: u32,     // element index of act_scale row 0
    ws_base: u32,    // element index of weight_scale column 0
    bias_base: u32,  // element index of bias column 0
    y_base: u32,     // element index of y[0, 0] in binding 0
    y_stride: u32,   // elements per row of y
    zero: u32,       // always 0 (see dequant_bits)
    zp_base: u32,    // element index of act_zp row 0
    cs_base: u32,    // element index of weight_colsum column 0
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// read_write although only read: see rowquant.wgsl.
@group(0) @binding(1) var<storage, read_write> act: array<u32>;
@group(0) @binding(2) var<storage, read_write> wt: array<u32>;
@group(0) @binding(3) var<storage, read_write> act_scale: array<TIn>;
@group(0) @binding(4) var<storage, read_write> wscale: array<TIn>;
@group(0) @binding(5) var<storage, read_write> bias: array<TIn>;
@group(0) @binding(6) var<storage, read_write> act_zp: array<i32>;
@group(0) @binding(8) var<storage, read_write> colsum: array<i32>;
@group(0) @binding(7) var<uniform> p: LinearParams;

// f32 bits of act_scale[row].
fn row_scale(row: u32) -> u32 {
    let i = p.s_base + row;
    return tin_load(act_scale[tin_slot(i)], i);
}

// f32 bits of (weight_scale[col], bias[col]); loaded once per column by each invocation.
fn col_params(col: u32) -> vec2<u32> {
    let iw = p.ws_base + col;
    var b = 0u;
    if (HAS_BIAS) {
        let ib = p.bias_base + col;
        b = tin_load(bias[tin_slot(ib)], ib);
    }
    return vec2<u32>(tin_load(wscale[tin_slot(iw)], iw), b);
}

fn out_bits(acc: i32, s: u32, wb: vec2<u32>) -> u32 {
    return tin_round(dequant_bits(acc, s, wb.x, wb.y, HAS_BIAS, p.zero, BIG_ACC));
}

// Dequantize and store y[row, col] (and y[row, col + 1] when `two`), rounding once;
// s = row_scale(row), wb0 / wb1 = col_params(col / col + 1).
// With a zero point, the zero point's share zp[row] * colsum[col] leaves the int32
// accumulators first: exact within the plan's K bound, and WGSL integer arithmetic
// wraps rather than being undefined on overflow.
fn store_pair(row: u32, col: u32, s: u32, wb0: vec2<u32>, wb1: vec2<u32>, acc0: i32, acc1: i32,
              two: bool) {
    var a0 = acc0;
    var a1 = acc1;
    if (ASYM) {
        let z = act_zp[p.zp_base + row];
        a0 = acc0 - z * colsum[p.cs_base + col];
        if (two) {
            a1 = acc1 - z * colsum[p.cs_base + col + 1u];
        }
    }
    let e = p.y_base + row * p.y_stride + col;
    let t0 = out_bits(a0, s, wb0);
    if (two) {
        tout_store2(e, t0, out_bits(a1, s, wb1));
    } else {
        tout_store(e, t0);
    }
}

// Store a row of four accumulators at columns c0..c0+3 (those inside the block).
fn store_quad(row: u32, c0: u32, s: u32, wb: array<vec2<u32>, 4>, v: vec4<i32>) {
    if (c0 < p.n) {
        store_pair(row, c0, s, wb[0], wb[1], v.x, v.y, c0 + 1u < p.n);
    }
    if (c0 + 2u < p.n) {
        store_pair(row, c0 + 2u, s, wb[2], wb[3], v.z, v.w, c0 + 3u < p.n);
    }
}

// Dequantize and store a 4 x 4 tile whose rows r0..r0+3 hold accumulators v0..v3
// for columns c0..c0+3 (those inside the block).
fn store_tile(r0: u32, c0: u32, v0: vec4<i32>, v1: vec4<i32>, v2: vec4<i32>, v3: vec4<i32>) {
    if (c0 >= p.n) {
        return;
    }
    let wb = quad_params(c0);
    if (r0 < p.m) {
        store_quad(r0, c0, row_scale(r0), wb, v0);
    }
    if (r0 + 1u < p.m) {
        store_quad(r0 + 1u, c0, row_scale(r0 + 1u), wb, v1);
    }
    if (r0 + 2u < p.m) {
        store_quad(r0 + 2u, c0, row_scale(r0 + 2u), wb, v2);
    }
    if (r0 + 3u < p.m) {
        store_quad(r0 + 3u, c0, row_scale(r0 + 3u), wb, v3);
    }
}

// Weight scale and bias of columns c0..c0+3, clamped into the block.
fn quad_params(c0: u32) -> array<vec2<u32>, 4> {
    let last = p.n - 1u;
    return array<vec2<u32>, 4>(col_params(min(c0, last)), col_params(min(c0 + 1u, last)),
                               col_params(min(c0 + 2u, last)), col_params(min(c0 + 3u, last)));
}
