// qlinear: the blocking of the tiled GEMMs (gemm_dot4, gemm_f32) and the loads that
// stage their operands into workgroup memory.
//
// A workgroup of WGX x WGY invocations computes a BM x BN block of y. Each K step
// stages BK packed words of the block's BM act_q rows and BN weight_q rows (columns
// of y); words outside the block (past p.m, p.n or p.kw) are staged as 0, which adds
// nothing to any dot product. How a staged word is held is the family's own choice:
// it defines stage_a(r, kk, word) and stage_b(c, kk, word).

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 8u;
override WGX: u32 = 16u;
override WGY: u32 = 16u;

// Stage words k0..k0+BK of rows row0.. of act_q and columns col0.. of weight_q.
fn load_tiles(tid: u32, row0: u32, col0: u32, k0: u32) {
    for (var e = tid; e < BM * BK; e = e + WGX * WGY) {
        let r = e / BK;
        let kk = e % BK;
        var v = 0u;
        if (row0 + r < p.m && k0 + kk < p.kw) {
            v = act[p.a_base + (row0 + r) * p.kw + k0 + kk];
        }
        stage_a(r, kk, v);
    }
    for (var e = tid; e < BN * BK; e = e + WGX * WGY) {
        let c = e / BK;
        let kk = e % BK;
        var v = 0u;
        if (col0 + c < p.n && k0 + kk < p.kw) {
            v = wt[p.b_base + (col0 + c) * p.kw + k0 + kk];
        }
        stage_b(c, kk, v);
    }
}
