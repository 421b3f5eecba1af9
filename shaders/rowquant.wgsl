// qlinear: the activation pass, fused into one kernel. One workgroup per row:
// amax as an integer max over |x| bit patterns (exact, and NaN / Inf show up as
// patterns >= 0x7f800000), the row's scale (and zero point) stored, then x / scale
// rounded half to even, offset by the zero point, clamped and packed four int8 per
// u32 word. Rows of act_q are padded to whole words with zeros.
//
// The row's amax (and min and max keys) reach the workgroup atomics below through
// reduce_row(tid, m, kmin, kmax), composed in from rowquant_reduce.wgsl (one atomic per
// invocation) or rowquant_reduce_sg.wgsl (one per subgroup, where the adapter has
// subgroups); max and min are exact in any order.
//
// SCHEME picks the activation scheme (a pipeline variant, fixed when a plan is selected):
// 0 dynamic: scale = amax / q_max correctly rounded, stored rounded to TIn;
// 1 static, 2 static_asym: the given scale p.in_scale (f32 bits of the TIn value) and
//   zero point p.in_zp for every row;
// 3 dynamic_asym: scale = (mx - mn) / (q_max - q_min) from the row's min and max (kept
//   as order-preserving integer keys), zp = rint(q_min - mn / scale); a constant row, or
//   one whose scale rounds to 0 or overflows in TIn, takes the dynamic rule with zp 0.
// Every row holding NaN or Inf gets scale NaN, q 0 and zp 0.
//
// Bindings: 0 act_scale (tout, TIn), 1 x (TIn), 2 act_q (u32 words), 3 act_zp (i32;
// the schemes without a zero point bind a dummy buffer there and never touch it, so that
// one bind group layout serves every scheme), 7 params.

override WG: u32 = 64u;
override Q_MIN: i32 = -127;
override Q_MAX: i32 = 127;
override SCHEME: u32 = 0u;
// Every element through the exact integer division (tests run this path on adapters
// whose float division happens to be exact).
override EXACT_ONLY: bool = false;

const STATIC: u32 = 1u;
const STATIC_ASYM: u32 = 2u;
const DYNAMIC_ASYM: u32 = 3u;

struct QuantParams {
    k: u32,         // elements per row of x
    kw: u32,        // words per row of act_q (K rounded up to 4, over 4)
    x_base: u32,    // element index of this dispatch's first row in binding 1
    q_base: u32,    // word index of this dispatch's first row in binding 2
    s_base: u32,    // element index of this dispatch's first scale in binding 0
    zp_base: u32,   // element index of this dispatch's first zero point in binding 3
    in_scale: u32,  // static schemes: f32 bits of the given scale (already TIn-rounded)
    in_zp: i32,     // static_asym: the given zero point
}

// read_write although only read: a read-only binding may not share a buffer with a
// written one in the same dispatch, and users may place every tensor in one buffer.
@group(0) @binding(1) var<storage, read_write> x: array<TIn>;
@group(0) @binding(2) var<storage, read_write> q: array<u32>;
@group(0) @binding(3) var<storage, read_write> act_zp: array<i32>;
@group(0) @binding(7) var<uniform> p: QuantParams;

var<workgroup> red: atomic<u32>;
var<workgroup> red_min: atomic<u32>;
var<workgroup> red_max: atomic<u32>;
// (amax bits, min key, max key) of the row.
var<workgroup> stats_shared: vec3<u32>;

// rint(fl(x / d)) for f32 bits xb and a positive divisor d, saturated to +-2^15 (see
// rint_bits). The float quotient settles every element below 256 in magnitude not
// within 2^-12 of a rounding edge: WGSL allows its division 2.5 ulp for divisors in
// [2^-126, 2^126], at most 2^-13.6 below 256, so such an element rounds to the same
// integer from the exact quotient. The rest (about 1 in 2000 of a dynamic row; larger
// quotients, which only the static and asymmetric schemes meet), and subnormal operands
// that an adapter may flush, take the exact integer division, so the result is the
// reference's always.
fn quant_rint(xb: u32, d: u32, fast: bool) -> i32 {
    let ax = xb & 0x7fffffffu;
    if (ax == 0u) {
        return 0;
    }
    if (fast && !EXACT_ONLY && (ax >> 23u) != 0u) {
        let f = bitcast<f32>(xb) / bitcast<f32>(d);
        let af = abs(f);
        if (abs(fract(af) - 0.5) > 0.000244140625 && af < 256.0) {
            return i32(round(f));
        }
    }
    return rint_bits(div_rne(ax, d) | (xb & 0x80000000u));
}

// An unsigned key of f32 bits b that orders as the floats do (-0 taken as +0).
fn order_key(b: u32) -> u32 {
    if ((b & 0x7fffffffu) == 0u) {
        return 0x80000000u;
    }
    return select(b | 0x80000000u, ~b, (b >> 31u) == 1u);
}

fn from_key(k: u32) -> u32 {
    return select(~k, k & 0x7fffffffu, (k >> 31u) == 1u);
}

// dynamic_asym: (TIn scale bits, zero point, 1) for a row with min mn and max mx (f32
// bits, finite), or (0, 0, 0) where the row takes the symmetric rule.
fn asym_params(kmin: u32, kmax: u32) -> vec3<i32> {
    if (kmax <= kmin) {
        return vec3<i32>(0);
    }
    let mn = from_key(kmin);
    let diff = add_rne(from_key(kmax), mn ^ 0x80000000u);
    if (diff >= 0x7f800000u) {
        return vec3<i32>(0);
    }
    let t = tin_round(div_rne(diff, bitcast<u32>(f32(Q_MAX - Q_MIN))));
    let d = tin_widen(t);
    if (d == 0u || d >= 0x7f800000u) {
        return vec3<i32>(0);
    }
    var r = 0u;
    if ((mn & 0x7fffffffu) != 0u) {
        r = div_rne(mn & 0x7fffffffu, d) | (mn & 0x80000000u);
    }
    let z = rint_bits(add_rne(bitcast<u32>(f32(Q_MIN)), r ^ 0x80000000u));
    return vec3<i32>(i32(t), clamp(z, Q_MIN, Q_MAX), 1);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) tid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x;
    if (tid == 0u) {
        atomicStore(&red, 0u);
        atomicStore(&red_min, 0xffffffffu);
        atomicStore(&red_max, 0u);
    }
    workgroupBarrier();
    let xrow = p.x_base + row * p.k;
    var m = 0u;
    var kmin = 0xffffffffu;
    var kmax = 0u;
    for (var k = tid; k < p.k; k = k + WG) {
        let i = xrow + k;
        let b = tin_load(x[tin_slot(i)], i);
        m = max(m, b & 0x7fffffffu);
        if (SCHEME == DYNAMIC_ASYM) {
            kmin = min(kmin, order_key(b));
            kmax = max(kmax, order_key(b));
        }
    }
    reduce_row(tid, m, kmin, kmax);
    workgroupBarrier();
    if (tid == 0u) {
        stats_shared = vec3<u32>(atomicLoad(&red), atomicLoad(&red_min), atomicLoad(&red_max));
    }
    let stats = workgroupUniformLoad(&stats_shared);
    let amax = stats.x;

    // mode 0: quantize; 1: all-zero row or scale underflowed in TIn (scale 1, q 0);
    // 2: NaN or Inf in the row (scale NaN, q 0, zp 0).
    var mode = 0u;
    var t = 0u;
    var zp = 0;
    var symmetric = true;
    if (amax >= 0x7f800000u) {
        mode = 2u;
        t = tin_round(0x7fc00000u);
        symmetric = false;
    } else if (SCHEME == STATIC || SCHEME == STATIC_ASYM) {
        t = tin_round(p.in_scale);
        zp = select(0, p.in_zp, SCHEME == STATIC_ASYM);
        symmetric = false;
    } else if (SCHEME == DYNAMIC_ASYM) {
        let a = asym_params(stats.y, stats.z);
        if (a.z == 1) {
            t = u32(a.x);
            zp = a.y;
            symmetric = false;
        }
    }
    if (symmetric) {
        if (amax != 0u) {
            t = tin_round(div_rne(amax, bitcast<u32>(f32(Q_MAX))));
        }
        if (tin_widen(t) == 0u) {
            mode = 1u;
            t = tin_round(0x3f800000u);
        }
    }
    if (tid == 0u) {
        tout_store(p.s_base + row, t);
        if (SCHEME == STATIC_ASYM || SCHEME == DYNAMIC_ASYM) {
            act_zp[p.zp_base + row] = zp;
        }
    }
    let d = tin_widen(t);
    // A subnormal divisor (bf16 underflow) may be flushed by float hardware; WGSL's
    // division bound holds for divisors up to 2^126.
    let fast = (d >> 23u) >= 2u && (d >> 23u) <= 252u;
    let qrow = p.q_base + row * p.kw;
    for (var j = tid; j < p.kw; j = j + WG) {
        var word = 0u;
        if (mode == 0u) {
            for (var c = 0u; c < 4u; c = c + 1u) {
                let k = j * 4u + c;
                if (k < p.k) {
                    let i = xrow + k;
                    let n = quant_rint(tin_load(x[tin_slot(i)], i), d, fast);
                    let v = clamp(n + zp, Q_MIN, Q_MAX);
                    word = word | ((u32(v) & 0xffu) << (c * 8u));
                }
            }
        }
        q[qrow + j] = word;
    }
}
