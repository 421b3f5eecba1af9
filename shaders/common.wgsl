// qlinear: numerics shared by every kernel.
//
// The contract pins results down bit for bit, and WGSL does not: its f32 division
// may be off by 2.5 ulp, its float<->f16 and int->float conversions may round either
// way, and a driver may contract a*b+c into an FMA (SPIR-V and MSL allow it unless
// told not to, and naga does not tell them). So every rounding the
// contract names is done here in integer arithmetic on bit patterns, which no
// adapter can change: f32 <-> f16 / bf16, i32 -> f32, the scale division and the
// quantizing round. Only the two epilogue multiplies and the bias add are float
// operations, which WGSL requires to be correctly rounded.

// f16 bits (low 16 bits) -> f32 bits; exact, subnormals included.
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0x1fu) {
        return sign | 0x7f800000u | (m << 13u);
    }
    if (e != 0u) {
        return sign | ((e + 112u) << 23u) | (m << 13u);
    }
    if (m == 0u) {
        return sign;
    }
    // A subnormal f16 is a normal f32: its value is m * 2^-24 with the top bit of m at p.
    let p = 31u - countLeadingZeros(m);
    return sign | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7fffffu);
}

// f32 bits -> f16 bits, round to nearest even (as numpy's astype), NaN kept NaN.
fn f32_to_f16_bits(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) {
        let payload = (a & 0x7fffffu) >> 13u;
        return sign | 0x7c00u | select(payload, 1u, payload == 0u);
    }
    if (a >= 0x477ff000u) {
        // 65520 and above (the tie between 65504 and 2^16 included) round to infinity.
        return sign | 0x7c00u;
    }
    if (a >= 0x38800000u) {
        var h = (((a >> 23u) - 112u) << 10u) | ((a & 0x7fffffu) >> 13u);
        let rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) {
            h = h + 1u;
        }
        return sign | h;
    }
    if (a <= 0x33000000u) {
        // At most 2^-25, half the smallest subnormal: the tie goes to the even zero.
        return sign;
    }
    // f16 subnormal: count units of 2^-24.
    let e = a >> 23u;
    let m = (a & 0x7fffffu) | 0x800000u;
    let sh = 126u - e;
    var h = m >> sh;
    let rem = m & ((1u << sh) - 1u);
    let half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (h & 1u) == 1u)) {
        h = h + 1u;
    }
    return sign | h;
}

// f32 bits -> bf16 bits (the top half), round to nearest even, NaN kept a quiet NaN.
fn f32_to_bf16_bits(b: u32) -> u32 {
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    // The carry of the rounding increment ripples into the exponent, up to infinity.
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// i32 -> f32 rounded to nearest even: exact below 2^24, where WGSL's own conversion is
// exact too; above it WGSL allows either neighbour.
fn i32_to_f32(v: i32) -> f32 {
    let u = u32(abs(v));
    if (u < 0x1000000u) {
        return f32(v);
    }
    let p = 31u - countLeadingZeros(u);
    let sh = p - 23u;
    var m = u >> sh;
    let rem = u & ((1u << sh) - 1u);
    let half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (m & 1u) == 1u)) {
        m = m + 1u;
    }
    // m holds the hidden bit (or its carry), which adds one to the exponent field.
    let bits = ((p + 126u) << 23u) + m;
    return bitcast<f32>(bits | select(0u, 0x80000000u, v < 0));
}

// Correctly rounded a / b (round to nearest even) for positive, finite, nonzero f32
// bit patterns, subnormal operands and results included: what numpy's float32
// division gives, which WGSL's '/' does not promise.
fn div_rne(a: u32, b: u32) -> u32 {
    var ma = a & 0x7fffffu;
    var ea = i32(a >> 23u);
    if (ea == 0) {
        let s = countLeadingZeros(ma) - 8u;
        ma = ma << s;
        ea = 1 - i32(s);
    } else {
        ma = ma | 0x800000u;
    }
    var mb = b & 0x7fffffu;
    var eb = i32(b >> 23u);
    if (eb == 0) {
        let s = countLeadingZeros(mb) - 8u;
        mb = mb << s;
        eb = 1 - i32(s);
    } else {
        mb = mb | 0x800000u;
    }
    // Restoring division: q = floor(ma * 2^25 / mb), 25 or 26 bits; r != 0 iff inexact.
    var r = ma;
    var q = 0u;
    for (var i = 0u; i < 26u; i = i + 1u) {
        q = q << 1u;
        if (r >= mb) {
            q = q | 1u;
            r = r - mb;
        }
        r = r << 1u;
    }
    var e = ea - eb + 127;
    var extra = 2u;
    if (q < 0x2000000u) {
        e = e - 1;
        extra = 1u;
    }
    if (e <= 0) {
        // Subnormal result: drop the bits below 2^-149 as well.
        extra = min(extra + u32(1 - e), 31u);
        e = 0;
    }
    var sig = q >> extra;
    let rb = (q >> (extra - 1u)) & 1u;
    let sticky = ((q & ((1u << (extra - 1u)) - 1u)) != 0u) || (r != 0u);
    if (rb == 1u && (sticky || (sig & 1u) == 1u)) {
        sig = sig + 1u;
    }
    if (e == 0) {
        return sig;
    }
    if (e >= 255) {
        return 0x7f800000u;
    }
    return min((u32(e - 1) << 23u) + sig, 0x7f800000u);
}

// Round half to even of the f32 with bits b to an integer; magnitudes from 2^15 up
// (infinity included) come back as +-2^15, which every clamp to int8 treats alike.
fn rint_bits(b: u32) -> i32 {
    let a = b & 0x7fffffffu;
    let e = a >> 23u;
    var n = 0u;
    if (e >= 142u) {
        n = 32768u;
    } else if (e >= 126u) {
        let m = (a & 0x7fffffu) | 0x800000u;
        let sh = 150u - e;
        n = m >> sh;
        let rem = m & ((1u << sh) - 1u);
        let half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (n & 1u) == 1u)) {
            n = n + 1u;
        }
    }
    return select(i32(n), -i32(n), (b >> 31u) == 1u);
}

// y = ((f32(acc) * scale) * weight_scale) + bias as f32 bits; NaN made the canonical
// quiet NaN, as numpy's propagation of the reference's NaN scale gives.
// `zero` is a run-time 0 the compiler cannot see through: xor-ing the product with
// it keeps the multiply from being fused into the bias add.
fn dequant_bits(acc: i32, s: u32, ws: u32, bias: u32, has_bias: bool, zero: u32,
                big_acc: bool) -> u32 {
    var af = f32(acc);
    if (big_acc) {
        af = i32_to_f32(acc);
    }
    let prod = (af * bitcast<f32>(s)) * bitcast<f32>(ws);
    var y = bitcast<u32>(prod);
    if (has_bias) {
        y = bitcast<u32>(bitcast<f32>(y ^ zero) + bitcast<f32>(bias));
    }
    if ((y & 0x7fffffffu) > 0x7f800000u) {
        y = 0x7fc00000u;
    }
    return y;
}

// (exponent, significand) of a finite |f32| bit pattern: the value is
// significand * 2^(exponent - 150), subnormals with exponent 1 and no implicit bit.
fn exp_sig(a: u32) -> vec2<u32> {
    let e = a >> 23u;
    if (e == 0u) {
        return vec2<u32>(1u, a & 0x7fffffu);
    }
    return vec2<u32>(e, (a & 0x7fffffu) | 0x800000u);
}

// Correctly rounded a + b (round to nearest even) of f32 bit patterns, neither NaN and
// not both infinite, subnormal operands and results included: WGSL's '+' is correctly
// rounded too, but an adapter may flush subnormals, and the asymmetric activation pass
// needs (mx - mn) and (q_min - mn / scale) exactly as numpy's float32 gives them.
fn add_rne(a: u32, b: u32) -> u32 {
    // x: the operand of the larger magnitude, whose sign the sum takes.
    var x = a;
    var y = b;
    if ((b & 0x7fffffffu) > (a & 0x7fffffffu)) {
        x = b;
        y = a;
    }
    let ax = x & 0x7fffffffu;
    let ay = y & 0x7fffffffu;
    if (ax >= 0x7f800000u || ay == 0u) {
        // -0 + -0 is -0; every other sum with a zero is the other operand.
        return select(x, x & y, ax == 0u);
    }
    let px = exp_sig(ax);
    let py = exp_sig(ay);
    let ex = px.x;
    let mx = px.y;
    let ey = py.x;
    let my = py.y;
    // Six guard bits; the bits of y shifted out below them are jammed into the lowest
    // (a sticky bit), which keeps the rounding of a sum or a difference exact.
    let big = mx << 6u;
    var small = my << 6u;
    let d = ex - ey;
    if (d >= 31u) {
        small = 1u;
    } else if (d > 0u) {
        small = (small >> d) | select(0u, 1u, (small & ((1u << d) - 1u)) != 0u);
    }
    var r = big + small;
    if (((a ^ b) >> 31u) == 1u) {
        r = big - small;
    }
    if (r == 0u) {
        return 0u;
    }
    // The sum is r * 2^(ex - 156); round r to 24 significant bits.
    let p = 31u - countLeadingZeros(r);
    var e = i32(ex + p) - 29;
    var sh = i32(p) - 23;
    if (e <= 0) {
        // Subnormal result: bits below 2^-149 go as well.
        sh = sh + 1 - e;
        e = 0;
    }
    var sig = 0u;
    if (sh <= 0) {
        sig = r << u32(-sh);
    } else {
        let s = u32(sh);
        sig = r >> s;
        let rb = (r >> (s - 1u)) & 1u;
        let sticky = (r & ((1u << (s - 1u)) - 1u)) != 0u;
        if (rb == 1u && (sticky || (sig & 1u) == 1u)) {
            sig = sig + 1u;
        }
    }
    let sign = x & 0x80000000u;
    if (e == 0) {
        return sign | sig;
    }
    if (e >= 255) {
        return sign | 0x7f800000u;
    }
    return sign | min((u32(e - 1) << 23u) + sig, 0x7f800000u);
}
