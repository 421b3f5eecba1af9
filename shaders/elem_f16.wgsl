enable f16;

// qlinear element access, TIn = f16 held natively (adapters with shader-f16): 16-bit
// loads and stores, so no two invocations share a stored word. Values are rounded
// in integer arithmetic first (common.wgsl), so the f16 <-> f32 conversions here are
// exact and the adapter's conversion rounding never matters.

alias TIn = f16;

@group(0) @binding(0) var<storage, read_write> tout: array<f16>;

fn tin_slot(i: u32) -> u32 {
    return i;
}

fn tin_load(w: f16, i: u32) -> u32 {
    return bitcast<u32>(f32(w));
}

fn tin_round(b: u32) -> u32 {
    return f32_to_f16_bits(b);
}

fn tin_widen(t: u32) -> u32 {
    return f16_to_f32_bits(t);
}

fn tout_store(i: u32, t: u32) {
    tout[i] = f16(bitcast<f32>(f16_to_f32_bits(t)));
}

fn tout_store2(i: u32, t0: u32, t1: u32) {
    tout_store(i, t0);
    tout_store(i + 1u, t1);
}
