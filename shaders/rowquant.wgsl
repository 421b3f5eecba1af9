// qlinear: the activation pass, fused into one kernel. One workgroup per row:
// amax as an integer max over |x| bit patterns (exact, and NaN / Inf show up as
// patterns >= 0x7f800000), the scale amax / q_max correctly rounded and stored
// rounded to TIn, then x / stored_scale rounded half to even, clamped and packed
// four int8 per u32 word. Rows of act_q are padded to whole words with zeros.
//
// Bindings: 0 act_scale (tout, TIn), 1 x (TIn), 2 act_q (u32 words), 7 params.

override WG: u32 = 64u;
override Q_MIN: i32 = -127;
override Q_MAX: i32 = 127;
// Every element through the exact integer division (tests run this path on adapters
// whose float division happens to be exact).
override EXACT_ONLY: bool = false;

struct QuantParams {
    k: u32,       // elements per row of x
    kw: u32,      // words per row of act_q (K rounded up to 4, over 4)
    x_base: u32,  // element index of this dispatch's first row in binding 1
    q_base: u32,  // word index of this dispatch's first row in binding 2
    s_base: u32,  // element index of this dispatch's first scale in binding 0
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// read_write although only read: a read-only binding may not share a buffer with a
// written one in the same dispatch, and users may place every tensor in one buffer.
@group(0) @binding(1) var<storage, read_write> x: array<TIn>;
@group(0) @binding(2) var<storage, read_write> q: array<u32>;
@group(0) @binding(7) var<uniform> p: QuantParams;

var<workgroup> red: atomic<u32>;
var<workgroup> amax_shared: u32;

// clamp(rint(fl(x / d))) for f32 bits xb and a positive divisor d. The float quotient
// settles every element not within 2^-12 of a rounding edge: WGSL allows its division
// 2.5 ulp, 2^-14.7 at the largest quotients (~128), so such an element rounds to the
// same integer from the exact quotient. The rest (about 1 in 2000), and subnormal
// operands that an adapter may flush, take the exact integer division, so the result
// is the reference's always.
fn quant_elem(xb: u32, d: u32, fast: bool) -> i32 {
    let ax = xb & 0x7fffffffu;
    if (ax == 0u) {
        return 0;
    }
    var n = 0;
    var exact = true;
    if (fast && !EXACT_ONLY && (ax >> 23u) != 0u) {
        let f = bitcast<f32>(xb) / bitcast<f32>(d);
        let af = abs(f);
        if (abs(fract(af) - 0.5) > 0.000244140625 && af < 32768.0) {
            n = i32(round(f));
            exact = false;
        }
    }
    if (exact) {
        n = rint_bits(div_rne(ax, d) | (xb & 0x80000000u));
    }
    return clamp(n, Q_MIN, Q_MAX);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x;
    if (tid == 0u) {
        atomicStore(&red, 0u);
    }
    workgroupBarrier();
    let xrow = p.x_base + row * p.k;
    var m = 0u;
    for (var k = tid; k < p.k; k = k + WG) {
        let i = xrow + k;
        m = max(m, tin_load(x[tin_slot(i)], i) & 0x7fffffffu);
    }
    atomicMax(&red, m);
    workgroupBarrier();
    if (tid == 0u) {
        amax_shared = atomicLoad(&red);
    }
    let amax = workgroupUniformLoad(&amax_shared);

    // mode 0: quantize; 1: all-zero row or scale underflowed in TIn (scale 1, q 0);
    // 2: NaN or Inf in the row (scale NaN, q 0).
    var mode = 0u;
    var t = 0u;
    if (amax >= 0x7f800000u) {
        mode = 2u;
        t = tin_round(0x7fc00000u);
    } else if (amax != 0u) {
        t = tin_round(div_rne(amax, bitcast<u32>(f32(Q_MAX))));
    }
    if (mode == 0u && tin_widen(t) == 0u) {
        mode = 1u;
        t = tin_round(0x3f800000u);
    }
    if (tid == 0u) {
        tout_store(p.s_base + row, t);
    }
    let d = tin_widen(t);
    // A subnormal divisor (bf16 underflow) may be flushed by float hardware.
    let fast = (d >> 23u) >= 2u;
    let qrow = p.q_base + row * p.kw;
    for (var j = tid; j < p.kw; j = j + WG) {
        var word = 0u;
        if (mode == 0u) {
            for (var c = 0u; c < 4u; c = c + 1u) {
                let k = j * 4u + c;
                if (k < p.k) {
                    let i = xrow + k;
                    let v = quant_elem(tin_load(x[tin_slot(i)], i), d, fast);
                    word = word | ((u32(v) & 0xffu) << (c * 8u));
                }
            }
        }
        q[qrow + j] = word;
    }
}
