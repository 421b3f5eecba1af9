// qlinear: bindings and the fused epilogue shared by the GEMM kernels
// (gemm_dot4, gemm_f32, gemv).
//
// Bindings: 0 output y (tout, TIn), 1 act_q (u32 words, rows of kw words),
// 2 weight_q (u32 words, rows of kw words), 3 act_scale, 4 weight_scale, 5 bias
// (TIn), 7 params. Each dispatch covers rows [0, m) x columns [0, n) of a block
// whose origins in each binding are the *_base fields, so that a problem larger
// than one dispatch or one binding is run block by block.

override HAS_BIAS: bool = false;

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
    pad0: u32,
}

// read_write although only read: see rowquant.wgsl.
@group(0) @binding(1) var<storage, read_write> act: array<u32>;
@group(0) @binding(2) var<storage, read_write> wt: array<u32>;
@group(0) @binding(3) var<storage, read_write> act_scale: array<TIn>;
@group(0) @binding(4) var<storage, read_write> wscale: array<TIn>;
@group(0) @binding(5) var<storage, read_write> bias: array<TIn>;
@group(0) @binding(7) var<uniform> p: LinearParams;

fn out_bits(acc: i32, s: u32, col: u32) -> u32 {
    let iw = p.ws_base + col;
    let ws = tin_load(wscale[tin_slot(iw)], iw);
    var b = 0u;
    if (HAS_BIAS) {
        let ib = p.bias_base + col;
        b = tin_load(bias[tin_slot(ib)], ib);
    }
    return tin_round(dequant_bits(acc, s, ws, b, HAS_BIAS, p.zero));
}

// Dequantize and store y[row, col] (and y[row, col + 1] when `two`), rounding once.
fn store_pair(row: u32, col: u32, acc0: i32, acc1: i32, two: bool) {
    let is = p.s_base + row;
    let s = tin_load(act_scale[tin_slot(is)], is);
    let e = p.y_base + row * p.y_stride + col;
    let t0 = out_bits(acc0, s, col);
    if (two) {
        tout_store2(e, t0, out_bits(acc1, s, col + 1u));
    } else {
        tout_store(e, t0);
    }
}
