// qlinear element access, TIn held in 32-bit words: f32 bits, or two f16 / bf16
// values per word (element 2i in the low half). Every adapter can do this; f16 goes
// this way where the adapter lacks shader-f16.
//
// Outputs of TIn go through `tout` (binding 0) as atomics: with 16-bit elements two
// invocations may own the two halves of one word (an odd row length puts a row
// boundary inside a word), and WGSL has no 16-bit store.

override TIN_KIND: u32 = 0u;  // 0: f32, 1: f16, 2: bf16

alias TIn = u32;

@group(0) @binding(0) var<storage, read_write> tout: array<atomic<u32>>;

// The storage index holding element i.
fn tin_slot(i: u32) -> u32 {
    if (TIN_KIND == 0u) {
        return i;
    }
    return i >> 1u;
}

// f32 bits of element i, given the storage word tin_slot(i).
fn tin_load(w: u32, i: u32) -> u32 {
    if (TIN_KIND == 0u) {
        return w;
    }
    let h = (w >> ((i & 1u) * 16u)) & 0xffffu;
    if (TIN_KIND == 1u) {
        return f16_to_f32_bits(h);
    }
    return h << 16u;
}

// f32 bits -> TIn bits, rounded to nearest even.
fn tin_round(b: u32) -> u32 {
    if (TIN_KIND == 0u) {
        return b;
    }
    if (TIN_KIND == 1u) {
        return f32_to_f16_bits(b);
    }
    return f32_to_bf16_bits(b);
}

// TIn bits -> f32 bits (exact).
fn tin_widen(t: u32) -> u32 {
    if (TIN_KIND == 0u) {
        return t;
    }
    if (TIN_KIND == 1u) {
        return f16_to_f32_bits(t);
    }
    return t << 16u;
}

// Store TIn bits t as element i of tout; the other half of its word may belong to
// another invocation, so only this half is touched.
fn tout_store(i: u32, t: u32) {
    if (TIN_KIND == 0u) {
        atomicStore(&tout[i], t);
        return;
    }
    let sh = (i & 1u) * 16u;
    atomicAnd(&tout[i >> 1u], ~(0xffffu << sh));
    atomicOr(&tout[i >> 1u], t << sh);
}

// Store elements i and i + 1, both owned by the caller: one plain word when they share it.
fn tout_store2(i: u32, t0: u32, t1: u32) {
    if (TIN_KIND == 0u) {
        atomicStore(&tout[i], t0);
        atomicStore(&tout[i + 1u], t1);
        return;
    }
    if ((i & 1u) == 0u) {
        atomicStore(&tout[i >> 1u], t0 | (t1 << 16u));
        return;
    }
    tout_store(i, t0);
    tout_store(i + 1u, t1);
}
