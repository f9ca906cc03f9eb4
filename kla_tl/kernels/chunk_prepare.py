"""Chunk preparation: the parallel half of the KLA chunkwise forward (KLA.md section 5, steps 1-5 and the intra-chunk
part of step 7), with the KLA step fused in the well-conditioned form (KLA.md section 4).

Per chunk of C = 64 tokens and value head ``hv`` (q/k head ``hk = hv // (HV // H)``)::

    r_i      = sqrt(||k_i||^2 + eps)          fp32, from the raw keys
    k^_i     = k_i / r_i                      (|k^| < 1)
    gamma    = chunk-local cumsum of max(g, G_FLOOR)
    A        = StrictLower(diag(eta) K^ K^^T * Gam),  Gam_ij = exp(gamma_i - gamma_j)
    L        = (I + A)^-1                     fp32 forward substitution, one thread per column (registers)
    w        = L diag(eta e^gamma) K^         -> w    [1, TT, HV, K]
    u        = L diag(eta / r) V              -> u    [1, TT, HV, V]  (``u_dtype``; see below)
    Aqk      = scale (q^ K^^T) * Gam (i >= j) -> aqk  [1, TT, HV, C]  (and L: ``store_l``, see below)
    gamma                                     -> gcum [1, TT, HV] fp32
    1/r, 1/|q| (per q/k head)                 -> rk, rq [1, TT, H] fp32 (rq only with normalize_q)

Every operand stays O(1): beta = eta / r^2 is never formed (the gain 1/r sits in u, in fp32 until the GEMM).
Inputs are packed (B = 1, TT tokens); ``chunks[c] = (first token, end of its sequence)`` drives the grid
``(NC, HV)``, so empty and short sequences, tails and dense batches share one kernel. Rows past a sequence end are
loaded as zeros and never stored. float32 inputs multiply with exact-fp32 FMA products instead of tensor cores
(:func:`kla_tl.kernels._tl.gemm_for`); with K > 128 or V > 192 they skip the Y and X tiles
(:func:`kla_tl.kernels._tl.lean_prepare`). Schedule knobs: ``threads``, ``max_regs``.

``given_l`` (the backward after a forward that kept L, ``store_l``): Aqk, L, gamma, 1/r and 1/|q| come from that
forward, so the kernel only reloads k and v, recomputes k^ and the row gains (the same fp32 operations, so the same
bits) and forms w and u: no Gram matrix, no solve, no q. An H100 ran it in 0.31 ms at the published 96/192 shape
(B=8, T=4096, H=12), against 0.87 ms for the full recomputation, with bit-identical w and u.

``u_dtype="float32"`` (the backward's recomputation; bfloat16 inputs): u is formed as (L diag(eta / r)) V from the
exact bf16 V (the row gains rounded with L, one factor per column, instead of every element of diag(eta / r) V) and
stored in fp32. The backward needs it: with extreme gates dg reduces to a few inner products <k^ dS, N> whose
value can be far below their terms', and an element-wise bf16 rounding of U (so of N = U - W S) dominated their
error (2e-3 .. 1e-2 relative, CPU emulation); the forward's output is not that sensitive and keeps u in bf16.
"""


import functools

import tilelang
import tilelang.language as T

from ._tl import G_FLOOR, LOG2E, gemm_for, k_tile, lean_prepare, min_blocks, unit_lower_inverse

#: Chunk length (fixed: the solve and the tiles are built for 64 rows).
C = 64


@functools.lru_cache(maxsize=None)
def build_chunk_prepare(*, H: int, HV: int, K: int, V: int, in_dtype: str, normalize_q: bool, scale: float,
                        eps: float, threads: int, target: str, pass_configs: tuple = (), u_dtype: str = None,
                        store_l: bool = False, given_l: bool = False, max_regs: int = 255):
    """Compile the chunk-preparation kernel (no GPU needed). ``target`` is a JSON target string; ``u_dtype`` the dtype
    of u (default: the input dtype); ``store_l``: aqk is ``[1, TT, HV, 2C]`` and holds L (as the GEMMs use it, in the
    input dtype) in its second half, for the backward. ``given_l`` (implies ``store_l``): the backward's
    recomputation from a forward that stored L: aqk, gcum, rk and rq are inputs (never written), L is read from
    aqk, and only w and u are computed (no Gram matrix, no solve, no Aqk; q is not read). ``max_regs``: register cap
    per thread (``__launch_bounds__`` asks for :func:`kla_tl.kernels._tl.min_blocks` CTAs per SM); 255 = none."""
    import json

    G = HV // H
    gemm = gemm_for(in_dtype)
    inverse = unit_lower_inverse()
    KP = k_tile(K)                 # K padded to the wgmma/mma tile (K = 48, 96 -> 64, 128); pad columns are zeros
    acc = "float32"
    st = in_dtype
    # float32 with wide heads: no Y, X tiles (their row scalings go into copies of L, V is read from global memory by
    # the FMA product), so that the float32 tiles fit in shared memory (lean_prepare)
    lean = lean_prepare(in_dtype, K, V)
    ud = u_dtype or st
    exact_u = ud != st and not lean          # U = (L diag(eta / r)) V from the exact V, staged in fp32
    store_l = store_l or given_l
    AW = 2 * C if store_l else C             # aqk row: Aqk, then L (store_l)
    blocks_per_sm = min_blocks(threads, max_regs)
    TT = T.dynamic("TT")
    NC = T.dynamic("NC")

    @T.prim_func
    def chunk_prepare(
        q: T.Tensor([1, TT, H, K], in_dtype),
        k: T.Tensor([1, TT, H, K], in_dtype),
        v: T.Tensor([1, TT, HV, V], in_dtype),
        g: T.Tensor([1, TT, HV], "float32"),
        eta: T.Tensor([1, TT, HV], "float32"),
        chunks: T.Tensor([NC, 2], "int32"),
        w: T.Tensor([1, TT, HV, K], st),
        u: T.Tensor([1, TT, HV, V], ud),
        aqk: T.Tensor([1, TT, HV, AW], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rq: T.Tensor([1, TT, H], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
    ):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            if blocks_per_sm > 1:
                T.annotate_min_blocks_per_sm(blocks_per_sm)
            hk = hv // G
            t0 = chunks[ic, 0]
            eos = chunks[ic, 1]

            k_s = T.alloc_shared((C, KP), st)          # raw k, then k^
            y_s = T.alloc_shared((1, 1) if lean else (C, KP), st)     # diag(eta e^gamma) K^
            qh_s = T.alloc_shared((C, KP), st)         # q^
            x_s = T.alloc_shared((1, 1) if lean else (C, V), st)      # diag(eta / r) V
            lb_s = T.alloc_shared((C, C), st)          # L in the GEMM dtype
            u32_s = T.alloc_shared((C, V) if exact_u else (1, 1), acc)      # fp32 U on its way out
            a_s = T.alloc_shared((C, C), acc)          # A (fp32)
            g_s = T.alloc_shared((C,), acc)
            gam_s = T.alloc_shared((C,), acc)
            eta_s = T.alloc_shared((C,), acc)
            rinv_s = T.alloc_shared((C,), acc)

            kf = T.alloc_fragment((C, KP), acc)
            ksq = T.alloc_fragment((C, KP), acc)
            dsum = T.alloc_fragment((C,), acc)
            gram = T.alloc_fragment((C, C), acc)
            w_f = T.alloc_fragment((C, KP), acc)
            u_f = T.alloc_fragment((C, V), acc)
            vf = T.alloc_fragment((C, V), acc)
            qf = T.alloc_fragment((C, KP), acc)
            qsq = T.alloc_fragment((C, KP), acc)
            qsum = T.alloc_fragment((C,), acc)
            s_f = T.alloc_fragment((C, C), acc)
            lcol = T.alloc_local((C,), acc)
            part = T.alloc_local((4,), acc)

            # masked loads: rows past the sequence end are zeros
            for i, d in T.Parallel(C, KP):
                k_s[i, d] = T.if_then_else(t0 + i < eos and d < K, k[0, t0 + i, hk, d], T.cast(0, in_dtype))
            for i in T.Parallel(C):
                g_s[i] = T.if_then_else(t0 + i < eos, T.max(g[0, t0 + i, hv], G_FLOOR), 0.0)
                eta_s[i] = T.if_then_else(t0 + i < eos, eta[0, t0 + i, hv], 0.0)

            # gamma = cumsum(g) (chunk-local)
            T.copy(g_s, gam_s)
            T.cumsum(gam_s, dim=0)
            if not given_l:
                for i in T.Parallel(C):
                    if t0 + i < eos:
                        gcum[0, t0 + i, hv] = gam_s[i]

            # r_i = sqrt(||k_i||^2 + eps) in fp32;  k^ = k / r;  Y = diag(eta e^gamma) K^
            T.copy(k_s, kf)
            for i, d in T.Parallel(C, KP):
                ksq[i, d] = kf[i, d] * kf[i, d]
            T.reduce_sum(ksq, dsum, dim=1)
            for i in T.Parallel(C):
                rinv_s[i] = T.rsqrt(dsum[i] + eps)
            if hv % G == 0 and not given_l:
                for i in T.Parallel(C):
                    if t0 + i < eos:
                        rk[0, t0 + i, hk] = rinv_s[i]
            for i, d in T.Parallel(C, KP):
                kf[i, d] = kf[i, d] * rinv_s[i]
            T.copy(kf, k_s)
            if not lean:
                for i, d in T.Parallel(C, KP):
                    y_s[i, d] = eta_s[i] * T.exp2(gam_s[i] * LOG2E) * kf[i, d]

                # X = diag(eta / r) V   (the KLA gain 1/r applied in fp32)
                for i, d in T.Parallel(C, V):
                    vf[i, d] = T.if_then_else(t0 + i < eos, v[0, t0 + i, hv, d], T.cast(0, in_dtype))
                if exact_u:
                    T.copy(vf, x_s)
                else:
                    for i, d in T.Parallel(C, V):
                        x_s[i, d] = eta_s[i] * rinv_s[i] * vf[i, d]

            if given_l:
                # L from the forward (rows past the sequence end: zeros, they hold the next sequence's rows)
                for i, j in T.Parallel(C, C):
                    lb_s[i, j] = T.if_then_else(t0 + i < eos, aqk[0, t0 + i, hv, C + j], T.cast(0, st))
            else:
                # q^ = q / |q| (optional)
                for i, d in T.Parallel(C, KP):
                    qf[i, d] = T.if_then_else(t0 + i < eos and d < K, q[0, t0 + i, hk, d], T.cast(0, in_dtype))
                if normalize_q:
                    for i, d in T.Parallel(C, KP):
                        qsq[i, d] = qf[i, d] * qf[i, d]
                    T.reduce_sum(qsq, qsum, dim=1)
                    for i, d in T.Parallel(C, KP):
                        qh_s[i, d] = qf[i, d] * T.rsqrt(qsum[i] + 1e-6)
                    if hv % G == 0:
                        for i in T.Parallel(C):
                            if t0 + i < eos:
                                rq[0, t0 + i, hk] = T.rsqrt(qsum[i] + 1e-6)
                else:
                    T.copy(qf, qh_s)

                # A = StrictLower(diag(eta) K^ K^^T * Gam)
                gemm(k_s, k_s, gram, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    a_s[i, j] = T.if_then_else(
                        i > j, eta_s[i] * gram[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)

                # Aqk = scale (q^ K^^T) * Gam, lower triangle including the diagonal. Every output goes fragment ->
                # shared -> global, so the global stores are row-contiguous 16-byte vectors (storing straight from the
                # MMA fragment layout cost more than all the rest of this kernel on an H100).
                gemm(qh_s, k_s, s_f, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    lb_s[i, j] = T.if_then_else(i >= j, scale * s_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
                for i, j in T.Parallel(C, C):
                    if t0 + i < eos:
                        aqk[0, t0 + i, hv, j] = lb_s[i, j]

                # L = (I + A)^-1 by forward substitution in registers (the big fragments above are dead here)
                inverse(a_s, lb_s, lcol, part)
                if store_l:
                    for i, j in T.Parallel(C, C):
                        if t0 + i < eos:
                            aqk[0, t0 + i, hv, C + j] = lb_s[i, j]

            if not lean:
                # W = L Y,  U = L X  (staged through the now free Y, X tiles)
                gemm(lb_s, y_s, w_f, clear_accum=True)
                T.copy(w_f, y_s)
                for i, d in T.Parallel(C, KP):
                    if t0 + i < eos and d < K:
                        w[0, t0 + i, hv, d] = y_s[i, d]
                if exact_u:
                    for i, j in T.Parallel(C, C):
                        lb_s[i, j] = lb_s[i, j] * (eta_s[j] * rinv_s[j])
                    gemm(lb_s, x_s, u_f, clear_accum=True)
                    T.copy(u_f, u32_s)
                    for i, d in T.Parallel(C, V):
                        if t0 + i < eos:
                            u[0, t0 + i, hv, d] = u32_s[i, d]
                else:
                    gemm(lb_s, x_s, u_f, clear_accum=True)
                    T.copy(u_f, x_s)
                    for i, d in T.Parallel(C, V):
                        if t0 + i < eos:
                            u[0, t0 + i, hv, d] = x_s[i, d]
            else:
                # W = (L diag(eta e^gamma)) K^,  U = (L diag(eta / r)) V  with V read from global memory (rows past
                # the sequence end as zeros); the FMA fragments are row-major, so they store coalesced directly
                for i, j in T.Parallel(C, C):
                    a_s[i, j] = lb_s[i, j] * (eta_s[j] * rinv_s[j])
                for i, j in T.Parallel(C, C):
                    lb_s[i, j] = lb_s[i, j] * (eta_s[j] * T.exp2(gam_s[j] * LOG2E))
                gemm(lb_s, k_s, w_f, clear_accum=True)
                for i, d in T.Parallel(C, KP):
                    if t0 + i < eos and d < K:
                        w[0, t0 + i, hv, d] = w_f[i, d]
                T.clear(u_f)
                for j in T.serial(C):
                    for i, d in T.Parallel(C, V):
                        u_f[i, d] += a_s[i, j] * T.if_then_else(t0 + j < eos, v[0, t0 + j, hv, d], T.cast(0, in_dtype))
                for i, d in T.Parallel(C, V):
                    if t0 + i < eos:
                        u[0, t0 + i, hv, d] = u_f[i, d]

    return tilelang.compile(chunk_prepare, target=json.loads(target), pass_configs=dict(pass_configs))
