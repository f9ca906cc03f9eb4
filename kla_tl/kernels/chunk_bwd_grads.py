"""Backward, chunk-parallel: every gradient of a chunk in one kernel (stage 3 and the finish of
:mod:`kla_tl.bwd_normalized`), after the two state recurrences of :mod:`kla_tl.kernels.chunk_states`.

One CTA per chunk and q/k head ``hk``; it walks the G = HV / H value heads of the group (GVA) one after the other
and sums their dq and dk contributions itself, so dq and dk are written once, in the input dtype (``fuse_group``;
without it, one CTA per value head writes its share in fp32). Per value head
``hv`` (q^ = q * rq with normalize_q, k^ = k * rk; S_in = hs[c], dS_out = dhs[c], N = vn, dN = dvn; C = 64 rows)::

  output and state-update paths (V in blocks of ``block_v``)
    dAqk = Lower(dO N^T),  dOSt = dO S_in^T,  dW = -dN S_in^T                       [C, C], [C, K], [C, K]
    dq^ += diag(scale e) dOSt + scale (dAqk * Gam) K^
    dk^ += diag(en) N dS_out^T + scale (dAqk * Gam)^T Q^       (N rows scaled by en before the product)
  WY path, L = (I + A)^-1 as the backward's chunk_prepare stored it beside Aqk (``aqk`` [1, TT, HV, 2C])
    dX = L^T dN                                -> dv = diag(eta / r) dX  (input dtype)      (V blocks again)
    M  = StrictLower(-dX N^T) * Gam,  Me = diag(eta) M,  dY = L^T dW
    dk^ += diag(eta e) dY + (Me + Me^T) K^,    dr += -eta rowsum(dX * V) / r^2
    deta = rowsum(dX * V) / r + e rowsum(dY * K^) + rowsum(M * Gkk)                       -> deta
  decay (per g_r; see bwd_normalized): with ZG = dAqk * Aqk + Me * Gkk
    dg_r = sum_{i >= r > j} ZG_ij + sum_{i >= r} (scale e_i q^_i . dOSt_i + eta_i e_i dY_i . k^_i)
           + sum_{j < r} z_j + e^{gamma_n} <dS_out, S_in>,   0 where g < G_FLOOR              -> dg
    (z_j = en_j (K^ dS_out . N)_j and <dS_out, S_in> from the state-gradient kernel, which forms both from its fp32
    dS: ``zparts`` column blocks of ``zp``, ``tparts`` parts (column block x warp) of ``tp``)
  finish, after the group:
    dq = rq (dq^ - (q^ . dq^) q^)  (normalize_q; else dq = dq^),  dk = rk (dk^ - (k^ . dk^) k^) + dr k^  -> dq, dk

dk^ is accumulated in a register fragment over the group; dq^ in one with G = 1 and in fp32 shared memory with GVA
(the fragment would not fit beside the rest). GEMM operands are the input dtype (bf16), every accumulator, row sum
and decay factor fp32; rows past a sequence end are never stored. K <= 128 (K = 256 needs K blocks: every [C, K]
quantity splits by columns, only dAqk and the [C, C] WY terms are shared).

Loads. The tiles that need element-wise work (q^, k^, N in the GEMM dtype, N scaled by en, L with identity rows) are
loaded masked: rows past the sequence end are zeros. With ``bulk`` (the Hopper path: its double-buffered tiles take
180 KB of shared memory, over an A100's 163 KB; bfloat16, block_v dividing V, no GVA group in the CTA) do, dN, S_in
and dS_out are instead copied in bulk (cp.async) in a two-stage pipeline over the V blocks, so every block's copies are
in flight together; an H100 measured the kernel 9% faster so (2.69 vs 2.96 ms at B=8, T=4096, H=16). Their rows
past the sequence end then hold the next sequence's rows (zeros past the tensor's end), and every use masks them:
dAqk rows are masked, dOSt rows meet e = 0 and masked stores, dW rows and dX rows only reach rows of dY and M that
are masked or scaled by eta = 0 (L has identity rows there), and state rows past K are zero-filled by the copy's
bounds check.
"""

import functools

import tilelang
import tilelang.language as T

from ._tl import G_FLOOR, LOG2E, gemm_for, k_tile, split_pair_sum

C = 64


def _sum_parts(zp, parts: int, t, hv):
    """zp[0, t, hv] + ... + zp[parts - 1, t, hv] (unrolled; ``t`` is a token or, for ``tp``, a chunk row)."""
    total = zp[0, t, hv]
    for p in range(1, parts):
        total = total + zp[p, t, hv]
    return total


@functools.lru_cache(maxsize=None)
def build_chunk_bwd_grads(*, H: int, HV: int, K: int, V: int, in_dtype: str, normalize_q: bool, scale: float,
                          eps: float, block_v: int, threads: int, target: str, pass_configs: tuple = (),
                          n_dtype: str = None, zparts: int = 1, tparts: int = 1, fuse_group: bool = True,
                          bulk: bool = True):
    """Compile the kernel (no GPU needed). ``target`` is a JSON target string; ``n_dtype`` the dtype of N (``vn``);
    ``zparts`` the number of column blocks of ``zp``, ``tparts`` the number of parts of ``tp`` (dg's chunk tail, see
    :func:`kla_tl.chunk.tparts`). ``fuse_group=False`` (GVA): one CTA per value head
    instead, writing dq and dk per value head in fp32 ([1, TT, HV, K], the caller sums each group): the fused group
    needs about 200 KB of shared memory, more than an A100 has. ``bulk``: the bulk copies of the module notes (used only
    for bfloat16 with V a multiple of ``block_v``; float32 tiles would not fit twice). The caller turns it on for
    the Hopper path only (:func:`kla_tl.chunk.build_bwd_grads_kernel`): the Ampere build must fit an A100."""
    import json

    G = HV // H
    KP = k_tile(K)
    if KP > 128:
        raise ValueError(f"build_chunk_bwd_grads: K={K} not supported yet (K <= 128; K blocks are the next step)")
    gemm = gemm_for(in_dtype)
    pair_sum = split_pair_sum()
    acc = "float32"
    st = in_dtype
    nd = n_dtype or st
    TT = T.dynamic("TT")
    # bulk (asynchronous) copies of the tiles that need no element-wise work: do, dN and the two state tiles; rows
    # past the sequence end then hold the next sequence's rows (every use masks them: see the module notes)
    # (not with the GVA group in one CTA: its double-buffered tiles need 276 KB of shared memory at K = V = 128)
    bulk_v = bulk and V % block_v == 0 and in_dtype != "float32" and not (fuse_group and G > 1)
    NC = T.dynamic("NC")
    NV = (V + block_v - 1) // block_v
    fused = fuse_group or G == 1
    group = fused and G > 1              # the group's dq^ summed in shared memory
    NH = H if fused else HV              # CTAs per chunk
    GH = G if fused else 1               # value heads per CTA
    out_h, out_dtype = (H, in_dtype) if fused else (HV, "float32")

    @T.macro
    def _store_dq(dq_f, t_f, r_f, dot_s, q, rq, dq, t0, eos, hk, ho):
        """dq from dq^ (fp32 fragment): rq (dq^ - (q^ . dq^) q^) with q^ in fp32 (normalize_q), else dq^."""
        if normalize_q:
            for i, d in T.Parallel(C, KP):
                t_f[i, d] = dq_f[i, d] * T.if_then_else(
                    t0 + i < eos and d < K, T.cast(q[0, t0 + i, hk, d], acc) * rq[0, t0 + i, hk], 0.0)
            T.reduce_sum(t_f, r_f, dim=1)
            for i in T.Parallel(C):
                dot_s[i] = r_f[i]
            for i, d in T.Parallel(C, KP):
                if t0 + i < eos and d < K:
                    dq[0, t0 + i, ho, d] = T.cast(rq[0, t0 + i, hk] * (
                        dq_f[i, d] - dot_s[i] * T.cast(q[0, t0 + i, hk, d], acc) * rq[0, t0 + i, hk]), out_dtype)
        else:
            for i, d in T.Parallel(C, KP):
                if t0 + i < eos and d < K:
                    dq[0, t0 + i, ho, d] = T.cast(dq_f[i, d], out_dtype)

    @T.prim_func
    def chunk_bwd_grads(
        q: T.Tensor([1, TT, H, K], in_dtype),
        k: T.Tensor([1, TT, H, K], in_dtype),
        v: T.Tensor([1, TT, HV, V], in_dtype),
        g: T.Tensor([1, TT, HV], "float32"),
        eta: T.Tensor([1, TT, HV], "float32"),
        vn: T.Tensor([1, TT, HV, V], nd),
        do: T.Tensor([1, TT, HV, V], in_dtype),
        dvn: T.Tensor([1, TT, HV, V], st),
        hs: T.Tensor([NC, HV, K, V], st),
        dhs: T.Tensor([NC, HV, K, V], st),
        aqk: T.Tensor([1, TT, HV, 2 * C], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rq: T.Tensor([1, TT, H], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        zp: T.Tensor([zparts, TT, HV], "float32"),
        tp: T.Tensor([tparts, NC, HV], "float32"),
        chunks: T.Tensor([NC, 2], "int32"),
        dq: T.Tensor([1, TT, out_h, K], out_dtype),
        dk: T.Tensor([1, TT, out_h, K], out_dtype),
        dv: T.Tensor([1, TT, HV, V], in_dtype),
        dg: T.Tensor([1, TT, HV], "float32"),
        deta: T.Tensor([1, TT, HV], "float32"),
    ):
        with T.Kernel(NC, NH, threads=threads) as (ic, hx):
            hk = hx if fused else hx // G       # q/k head
            ho = hx                             # head index of the dq, dk rows this CTA writes
            t0 = chunks[ic, 0]
            eos = chunks[ic, 1]
            nl = T.min(eos - t0, C) - 1

            qh_s = T.alloc_shared((C, KP), st)
            kh_s = T.alloc_shared((C, KP), st)
            do_s = T.alloc_shared((C, block_v), st)
            n_s = T.alloc_shared((C, block_v), st)
            ne_s = T.alloc_shared((C, block_v), st)
            dn_s = T.alloc_shared((C, block_v), st)
            dx_s = T.alloc_shared((C, block_v), st) if bulk_v else do_s     # (do_s is free in the WY phase)
            dn2_s = T.alloc_shared((C, block_v), st)    # dN again, as a B operand (another swizzle than dn_s)
            s_s = T.alloc_shared((KP, block_v), st)
            ds_s = T.alloc_shared((KP, block_v), st)
            dw_s = T.alloc_shared((C, KP), st)
            dag_s = T.alloc_shared((C, C), st)
            lb_s = T.alloc_shared((C, C), st)
            me_s = dag_s                                # (dAqk * Gam is dead once dq^ and dk^ have it)
            zg_s = T.alloc_shared((C, C), acc)
            dqa_s = T.alloc_shared((C, KP) if group else (1, 1), acc)
            gam_s = T.alloc_shared((C,), acc)
            e_s = T.alloc_shared((C,), acc)
            en_s = T.alloc_shared((C,), acc)
            eta_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)
            dir_s = T.alloc_shared((C,), acc)
            z_s = T.alloc_shared((C,), acc)
            zc_s = T.alloc_shared((C,), acc)
            ps_s = T.alloc_shared((C,), acc)
            pa_s = T.alloc_shared((C,), acc)
            dga_s = T.alloc_shared((C,), acc)
            xv_s = T.alloc_shared((C,), acc)
            yk_s = T.alloc_shared((C,), acc)
            mg_s = T.alloc_shared((C,), acc)
            dr_s = T.alloc_shared((C,), acc)
            dot_s = T.alloc_shared((C,), acc)
            tail_s = T.alloc_shared((1,), acc)

            dka_f = T.alloc_fragment((C, KP), acc)      # dk^ of the group
            da_f = T.alloc_fragment((C, C), acc)
            dos_f = T.alloc_fragment((C, KP), acc)
            dw_f = T.alloc_fragment((C, KP), acc)
            t_f = T.alloc_fragment((C, KP), acc)
            gkk_f = T.alloc_fragment((C, C), acc)
            m_f = T.alloc_fragment((C, C), acc)
            p_f = T.alloc_fragment((C, C), acc)
            dx_f = T.alloc_fragment((C, block_v), acc)
            xvp_f = T.alloc_fragment((C, block_v), acc)
            dy_f = T.alloc_fragment((C, KP), acc)
            r_f = T.alloc_fragment((C,), acc)          # row sums of [C, K] fragments
            rm_f = T.alloc_fragment((C,), acc)         # of M
            rp_f = T.alloc_fragment((C,), acc)         # of the pair sums' scratch
            xv_f = T.alloc_fragment((C,), acc)

            # q^, k^ of the chunk (row scalings in fp32, then the GEMM dtype), 1/r
            for i, d in T.Parallel(C, KP):
                ok = t0 + i < eos and d < K
                if normalize_q:
                    qh_s[i, d] = T.if_then_else(ok, q[0, t0 + i, hk, d] * rq[0, t0 + i, hk], 0.0)
                else:
                    qh_s[i, d] = T.if_then_else(ok, q[0, t0 + i, hk, d], T.cast(0, in_dtype))
                kh_s[i, d] = T.if_then_else(ok, k[0, t0 + i, hk, d] * rk[0, t0 + i, hk], 0.0)
            for i in T.Parallel(C):
                rk_s[i] = T.if_then_else(t0 + i < eos, rk[0, t0 + i, hk], 0.0)
                dr_s[i] = 0.0
            if group:
                T.clear(dqa_s)
            T.clear(dka_f)

            for gi in T.serial(GH):
                hv = hk * G + gi if fused else hx
                for i in T.Parallel(C):
                    gam_s[i] = T.if_then_else(t0 + i < eos, gcum[0, t0 + i, hv], 0.0)
                    eta_s[i] = T.if_then_else(t0 + i < eos, eta[0, t0 + i, hv], 0.0)
                for i in T.Parallel(1):         # dg's chunk tail <dS_out, S_in> (the state-gradient kernel's)
                    tail_s[i] = _sum_parts(tp, tparts, ic, hv)
                for i in T.Parallel(C):
                    e_s[i] = T.if_then_else(t0 + i < eos, T.exp2(gam_s[i] * LOG2E), 0.0)
                    en_s[i] = T.if_then_else(t0 + i < eos, T.exp2((gam_s[nl] - gam_s[i]) * LOG2E), 0.0)

                # ---- output and state-update paths: reductions over V
                T.clear(da_f)
                T.clear(dos_f)
                T.clear(dw_f)
                for vb in (T.Pipelined(NV, num_stages=2) if bulk_v and NV > 1 else T.serial(NV)):
                    v0 = vb * block_v
                    if bulk_v:
                        T.copy(do[0, t0:t0 + C, hv, v0:v0 + block_v], do_s)
                        T.copy(dvn[0, t0:t0 + C, hv, v0:v0 + block_v], dn_s)
                        T.copy(hs[ic, hv, 0:KP, v0:v0 + block_v], s_s)      # rows past K: zeros (bounds)
                        T.copy(dhs[ic, hv, 0:KP, v0:v0 + block_v], ds_s)
                    for i, j in T.Parallel(C, block_v):
                        ok = t0 + i < eos and v0 + j < V
                        if not bulk_v:
                            do_s[i, j] = T.if_then_else(ok, do[0, t0 + i, hv, v0 + j], T.cast(0, in_dtype))
                        n_s[i, j] = T.if_then_else(ok, T.cast(vn[0, t0 + i, hv, v0 + j], st), T.cast(0, st))
                        ne_s[i, j] = T.if_then_else(ok, T.cast(vn[0, t0 + i, hv, v0 + j] * en_s[i], st),
                                                    T.cast(0, st))
                        if not bulk_v:
                            dn_s[i, j] = T.if_then_else(ok, dvn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                    if not bulk_v:
                        for d, j in T.Parallel(KP, block_v):
                            ok = d < K and v0 + j < V
                            s_s[d, j] = T.if_then_else(ok, hs[ic, hv, d, v0 + j], T.cast(0, st))
                            ds_s[d, j] = T.if_then_else(ok, dhs[ic, hv, d, v0 + j], T.cast(0, st))
                    gemm(do_s, n_s, da_f, transpose_B=True)
                    gemm(do_s, s_s, dos_f, transpose_B=True)
                    gemm(ne_s, ds_s, dka_f, transpose_B=True)
                    gemm(dn_s, s_s, dw_f, transpose_B=True)

                # dAqk * Gam (scaled, the GEMM operand) and dAqk * Aqk (for dg); masked before exp
                for i, j in T.Parallel(C, C):
                    valid = i >= j and t0 + i < eos
                    dag_s[i, j] = T.if_then_else(
                        valid, scale * da_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
                    zg_s[i, j] = T.if_then_else(valid, da_f[i, j] * aqk[0, t0 + i, hv, j], 0.0)
                # dW in the GEMM dtype; dg's e^gamma term, then dq^ of this head
                for i, d in T.Parallel(C, KP):
                    dw_s[i, d] = -dw_f[i, d]
                    t_f[i, d] = qh_s[i, d] * dos_f[i, d]
                T.reduce_sum(t_f, r_f, dim=1)
                for i in T.Parallel(C):
                    dir_s[i] = scale * e_s[i] * r_f[i]
                for i, d in T.Parallel(C, KP):
                    dos_f[i, d] = dos_f[i, d] * (scale * e_s[i])
                gemm(dag_s, kh_s, dos_f)
                if group:
                    for i, d in T.Parallel(C, KP):
                        dqa_s[i, d] = dqa_s[i, d] + dos_f[i, d]
                else:
                    _store_dq(dos_f, t_f, r_f, dot_s, q, rq, dq, t0, eos, hk, ho)
                gemm(dag_s, qh_s, dka_f, transpose_A=True)

                # dg of these paths: pairs, direct, state-update (z), chunk tail
                pair_sum(zg_s, p_f, rp_f, pa_s, ps_s)
                for i in T.Parallel(C):
                    z_s[i] = T.if_then_else(t0 + i < eos, _sum_parts(zp, zparts, t0 + i, hv), 0.0)
                T.copy(z_s, zc_s)
                T.cumsum(dir_s, dim=0, reverse=True)
                T.cumsum(zc_s, dim=0)
                for r in T.Parallel(C):
                    dga_s[r] = ps_s[r] + dir_s[r] + (zc_s[r] - z_s[r]) + T.exp2(gam_s[nl] * LOG2E) * tail_s[0]

                # ---- WY path: L = (I + A)^-1 as chunk_prepare stored it (identity rows past the sequence end)
                for i, j in T.Parallel(C, C):
                    lb_s[i, j] = T.if_then_else(t0 + i < eos, aqk[0, t0 + i, hv, C + j],
                                                T.if_then_else(i == j, T.cast(1, st), T.cast(0, st)))

                # V blocks: dX = L^T dN -> dv, rowsum(dX * V), M += -dX N^T
                T.clear(m_f)
                T.clear(xv_f)
                for vb in (T.Pipelined(NV, num_stages=2) if bulk_v and NV > 1 else T.serial(NV)):
                    v0 = vb * block_v
                    if bulk_v:
                        T.copy(dvn[0, t0:t0 + C, hv, v0:v0 + block_v], dn2_s)
                    for i, j in T.Parallel(C, block_v):
                        ok = t0 + i < eos and v0 + j < V
                        if not bulk_v:
                            dn2_s[i, j] = T.if_then_else(ok, dvn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                        n_s[i, j] = T.if_then_else(ok, T.cast(vn[0, t0 + i, hv, v0 + j], st), T.cast(0, st))
                    gemm(lb_s, dn2_s, dx_f, transpose_A=True, clear_accum=True)
                    for i, j in T.Parallel(C, block_v):
                        if t0 + i < eos and v0 + j < V:
                            dv[0, t0 + i, hv, v0 + j] = T.cast(eta_s[i] * rk_s[i] * dx_f[i, j], in_dtype)
                    for i, j in T.Parallel(C, block_v):
                        xvp_f[i, j] = dx_f[i, j] * T.if_then_else(
                            t0 + i < eos and v0 + j < V, T.cast(v[0, t0 + i, hv, v0 + j], acc), 0.0)
                    T.reduce_sum(xvp_f, xv_f, dim=1, clear=False)
                    T.copy(dx_f, dx_s)
                    gemm(dx_s, n_s, m_f, transpose_B=True)
                for i in T.Parallel(C):
                    xv_s[i] = xv_f[i]

                # M = StrictLower(-dX N^T) * Gam, Me = diag(eta) M; deta's M * Gkk term, dg's Me * Gkk term
                gemm(kh_s, kh_s, gkk_f, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    m_f[i, j] = T.if_then_else(
                        i > j and t0 + i < eos, -m_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
                for i, j in T.Parallel(C, C):
                    me_s[i, j] = eta_s[i] * m_f[i, j]
                    zg_s[i, j] = eta_s[i] * m_f[i, j] * gkk_f[i, j]
                    m_f[i, j] = m_f[i, j] * gkk_f[i, j]
                T.reduce_sum(m_f, rm_f, dim=1)
                for i in T.Parallel(C):
                    mg_s[i] = rm_f[i]

                # dY = L^T dW; dk^ += diag(eta e) dY + (Me + Me^T) K^; rowsum(dY * K^)
                gemm(lb_s, dw_s, dy_f, transpose_A=True, clear_accum=True)
                for i, d in T.Parallel(C, KP):
                    t_f[i, d] = dy_f[i, d] * kh_s[i, d]
                T.reduce_sum(t_f, r_f, dim=1)
                for i in T.Parallel(C):
                    yk_s[i] = r_f[i]
                for i, d in T.Parallel(C, KP):
                    dka_f[i, d] = dka_f[i, d] + eta_s[i] * e_s[i] * dy_f[i, d]
                gemm(me_s, kh_s, dka_f)
                gemm(me_s, kh_s, dka_f, transpose_A=True)

                # deta, dr, dg of this head
                for i in T.Parallel(C):
                    dir_s[i] = eta_s[i] * e_s[i] * yk_s[i]
                pair_sum(zg_s, p_f, rp_f, pa_s, ps_s)
                T.cumsum(dir_s, dim=0, reverse=True)
                for i in T.Parallel(C):
                    dr_s[i] = dr_s[i] - eta_s[i] * xv_s[i] * rk_s[i] * rk_s[i]
                    if t0 + i < eos:
                        deta[0, t0 + i, hv] = xv_s[i] * rk_s[i] + e_s[i] * yk_s[i] + mg_s[i]
                        dg[0, t0 + i, hv] = T.if_then_else(g[0, t0 + i, hv] < G_FLOOR, 0.0,
                                                           dga_s[i] + ps_s[i] + dir_s[i])

            # ---- finish: dq (GVA: from the group's sum), dk = rk (dk^ - (k^ . dk^) k^) + dr k^, k^ in fp32
            if group:
                for i, d in T.Parallel(C, KP):
                    dos_f[i, d] = dqa_s[i, d]
                _store_dq(dos_f, t_f, r_f, dot_s, q, rq, dq, t0, eos, hk, ho)
            for i, d in T.Parallel(C, KP):
                t_f[i, d] = dka_f[i, d] * T.if_then_else(
                    t0 + i < eos and d < K, T.cast(k[0, t0 + i, hk, d], acc) * rk_s[i], 0.0)
            T.reduce_sum(t_f, r_f, dim=1)
            for i in T.Parallel(C):
                dot_s[i] = r_f[i]
            for i, d in T.Parallel(C, KP):
                if t0 + i < eos and d < K:
                    dk[0, t0 + i, ho, d] = T.cast(
                        rk_s[i] * (dka_f[i, d] - dot_s[i] * T.cast(k[0, t0 + i, hk, d], acc) * rk_s[i])
                        + dr_s[i] * T.cast(k[0, t0 + i, hk, d], acc) * rk_s[i], out_dtype)

    return tilelang.compile(chunk_bwd_grads, target=json.loads(target), pass_configs=dict(pass_configs))
