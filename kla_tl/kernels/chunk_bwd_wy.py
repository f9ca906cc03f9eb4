"""Backward, chunk-parallel: the WY half of the chunk gradients, and the finish of dk, dv, dg and deta.

Stage 3 of :mod:`kla_tl.bwd_normalized`, the part through L = (I + A)^-1, W = L diag(eta e) K^, U = L diag(eta / r) V,
after :mod:`kla_tl.kernels.chunk_bwd_dqk` (which wrote dW, the output/state-update part of dk^ and of dg). Per chunk
of C = 64 rows and value head ``hv`` (k^ = k * rk, r = 1 / rk; L recomputed as chunk_prepare does)::

    dX   = L^T dN                                [C, V]   (V blocks)      dv   = diag(eta / r) dX       -> dv
    M    = StrictLower(-dX N^T) * Gam            [C, C]   (sum over V)    Me   = diag(eta) M
    dY   = L^T dW                                [C, K]
    dk^ += diag(eta e) dY + (Me + Me^T) K^
    deta = rowsum(dX * V) / r + e rowsum(dY * K^) + rowsum(M * Gkk)                                    -> deta
    dr   = -eta rowsum(dX * V) / r^2            (the 1/r of U)
    dk   = (dk^ - (k^ . dk^) k^) / r + dr k^    (k^ = k / r, r = sqrt(||k||^2 + eps))                  -> dk
    dg   = dga + sum_{i >= r, j < r} (Me * Gkk)_ij + sum_{i >= r} eta_i e_i (dY_i . k^_i), 0 where g < G_FLOOR -> dg

dk is linear in (dk^, dr), so each value head writes its own share (``dk_dtype``; the caller sums GVA groups).
Grid (NC, HV), V in blocks of ``block_v``; K <= 128. dW is read in fp32 and rounded to the GEMM dtype (as fla stores
it); everything else of the chain stays fp32.
"""

import functools

import tilelang
import tilelang.language as T

from ._tl import G_FLOOR, LOG2E, gemm_for, split_pair_sum, unit_lower_inverse

C = 64


@functools.lru_cache(maxsize=None)
def build_chunk_bwd_wy(*, H: int, HV: int, K: int, V: int, in_dtype: str, dk_dtype: str, eps: float, block_v: int,
                       threads: int, target: str, pass_configs: tuple = ()):
    """Compile the kernel (no GPU needed). ``target`` is a JSON target string; ``dk_dtype`` the dtype of its dk
    output (the input dtype without GVA, float32 when the caller sums the value heads of each group)."""
    import json

    G = HV // H
    KP = -(-K // 64) * 64
    if KP > 128:
        raise ValueError(f"build_chunk_bwd_wy: K={K} not supported yet (K <= 128; K blocks are the next step)")
    gemm = gemm_for(in_dtype)
    pair_sum = split_pair_sum()
    inverse = unit_lower_inverse()
    acc = "float32"
    st = in_dtype
    TT = T.dynamic("TT")
    NC = T.dynamic("NC")
    NV = (V + block_v - 1) // block_v

    @T.prim_func
    def chunk_bwd_wy(
        k: T.Tensor([1, TT, H, K], in_dtype),
        v: T.Tensor([1, TT, HV, V], in_dtype),
        g: T.Tensor([1, TT, HV], "float32"),
        eta: T.Tensor([1, TT, HV], "float32"),
        vn: T.Tensor([1, TT, HV, V], st),
        dvn: T.Tensor([1, TT, HV, V], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        chunks: T.Tensor([NC, 2], "int32"),
        dw: T.Tensor([1, TT, HV, K], "float32"),
        dkh: T.Tensor([1, TT, HV, K], "float32"),
        dga: T.Tensor([1, TT, HV], "float32"),
        dk: T.Tensor([1, TT, HV, K], dk_dtype),
        dv: T.Tensor([1, TT, HV, V], in_dtype),
        dg: T.Tensor([1, TT, HV], "float32"),
        deta: T.Tensor([1, TT, HV], "float32"),
    ):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            hk = hv // G
            t0 = chunks[ic, 0]
            eos = chunks[ic, 1]

            kh_s = T.alloc_shared((C, KP), st)
            dw_s = T.alloc_shared((C, KP), st)
            lb_s = T.alloc_shared((C, C), st)
            a_s = T.alloc_shared((C, C), acc)
            me_s = T.alloc_shared((C, C), st)
            zg_s = T.alloc_shared((C, C), acc)
            ps_s = T.alloc_shared((C,), acc)
            pa_s = T.alloc_shared((C,), acc)
            dn_s = T.alloc_shared((C, block_v), st)
            n_s = T.alloc_shared((C, block_v), st)
            dx_s = T.alloc_shared((C, block_v), st)
            gam_s = T.alloc_shared((C,), acc)
            eta_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)
            xv_s = T.alloc_shared((C,), acc)
            dir_s = T.alloc_shared((C,), acc)
            yk_s = T.alloc_shared((C,), acc)
            mg_s = T.alloc_shared((C,), acc)
            dot_s = T.alloc_shared((C,), acc)

            gkk_f = T.alloc_fragment((C, C), acc)
            m_f = T.alloc_fragment((C, C), acc)
            dx_f = T.alloc_fragment((C, block_v), acc)
            xvp_f = T.alloc_fragment((C, block_v), acc)
            dy_f = T.alloc_fragment((C, KP), acc)
            dk_f = T.alloc_fragment((C, KP), acc)
            t_f = T.alloc_fragment((C, KP), acc)
            p_f = T.alloc_fragment((C, C), acc)
            ryk_f = T.alloc_fragment((C,), acc)
            rmg_f = T.alloc_fragment((C,), acc)
            rp_f = T.alloc_fragment((C,), acc)
            rdk_f = T.alloc_fragment((C,), acc)
            xv_f = T.alloc_fragment((C,), acc)
            lcol = T.alloc_local((C,), acc)
            part = T.alloc_local((4,), acc)

            # k^, eta, gamma of the chunk (rows past the sequence end: zeros, flat gamma), dW in the GEMM dtype
            for i, d in T.Parallel(C, KP):
                ok = t0 + i < eos and d < K
                kh_s[i, d] = T.if_then_else(ok, k[0, t0 + i, hk, d] * rk[0, t0 + i, hk], 0.0)
                dw_s[i, d] = T.if_then_else(ok, dw[0, t0 + i, hv, d], 0.0)
            for i in T.Parallel(C):
                gam_s[i] = T.if_then_else(t0 + i < eos, gcum[0, t0 + i, hv], 0.0)
                eta_s[i] = T.if_then_else(t0 + i < eos, eta[0, t0 + i, hv], 0.0)
                rk_s[i] = T.if_then_else(t0 + i < eos, rk[0, t0 + i, hk], 0.0)

            # L = (I + A)^-1 with A = StrictLower(diag(eta) Gkk * Gam), as chunk_prepare computes it
            gemm(kh_s, kh_s, gkk_f, transpose_B=True, clear_accum=True)
            for i, j in T.Parallel(C, C):
                a_s[i, j] = T.if_then_else(
                    i > j and t0 + i < eos, eta_s[i] * gkk_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
            inverse(a_s, lb_s, lcol, part)

            # V blocks: dX = L^T dN -> dv, rowsum(dX * V), M += -dX N^T
            T.clear(m_f)
            T.clear(xv_f)
            for vb in T.serial(NV):
                v0 = vb * block_v
                for i, j in T.Parallel(C, block_v):
                    ok = t0 + i < eos and v0 + j < V
                    dn_s[i, j] = T.if_then_else(ok, dvn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                    n_s[i, j] = T.if_then_else(ok, vn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                gemm(lb_s, dn_s, dx_f, transpose_A=True, clear_accum=True)
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
            for i, j in T.Parallel(C, C):
                m_f[i, j] = T.if_then_else(
                    i > j and t0 + i < eos, -m_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
            for i, j in T.Parallel(C, C):
                me_s[i, j] = eta_s[i] * m_f[i, j]
                zg_s[i, j] = eta_s[i] * m_f[i, j] * gkk_f[i, j]
                m_f[i, j] = m_f[i, j] * gkk_f[i, j]
            T.reduce_sum(m_f, rmg_f, dim=1)
            for i in T.Parallel(C):
                mg_s[i] = rmg_f[i]

            # dY = L^T dW; dk^ += diag(eta e) dY + (Me + Me^T) K^; e rowsum(dY * K^)
            gemm(lb_s, dw_s, dy_f, transpose_A=True, clear_accum=True)
            for i, d in T.Parallel(C, KP):
                t_f[i, d] = dy_f[i, d] * kh_s[i, d]
            T.reduce_sum(t_f, ryk_f, dim=1)
            for i, d in T.Parallel(C, KP):
                dk_f[i, d] = eta_s[i] * T.exp2(gam_s[i] * LOG2E) * dy_f[i, d]
            gemm(me_s, kh_s, dk_f)
            gemm(me_s, kh_s, dk_f, transpose_A=True)
            # dk^ in full, then dk = (dk^ - (k^ . dk^) k^) rk + dr k^ with k^ in fp32
            for i, d in T.Parallel(C, KP):
                ok = t0 + i < eos and d < K
                dk_f[i, d] = dk_f[i, d] + T.if_then_else(ok, dkh[0, t0 + i, hv, d], 0.0)
                t_f[i, d] = dk_f[i, d] * T.if_then_else(ok, T.cast(k[0, t0 + i, hk, d], acc) * rk[0, t0 + i, hk], 0.0)
            T.reduce_sum(t_f, rdk_f, dim=1)
            for i in T.Parallel(C):
                dot_s[i] = rdk_f[i]
            for i, d in T.Parallel(C, KP):
                if t0 + i < eos and d < K:
                    dk[0, t0 + i, hv, d] = (rk_s[i] * (dk_f[i, d] - dot_s[i] * T.cast(k[0, t0 + i, hk, d], acc) * rk_s[i])
                                            - eta_s[i] * xv_s[i] * rk_s[i] * rk_s[i] * T.cast(k[0, t0 + i, hk, d], acc)
                                            * rk_s[i])

            # deta, dr, and dg += sum_{i >= r, j < r} (Me * Gkk)_ij + sum_{i >= r} eta_i e_i (dY_i . k^_i)
            for i in T.Parallel(C):
                yk_s[i] = ryk_f[i]
            for i in T.Parallel(C):
                dir_s[i] = eta_s[i] * T.exp2(gam_s[i] * LOG2E) * yk_s[i]
            pair_sum(zg_s, p_f, rp_f, pa_s, ps_s)
            T.cumsum(dir_s, dim=0, reverse=True)
            for i in T.Parallel(C):
                if t0 + i < eos:
                    deta[0, t0 + i, hv] = (xv_s[i] * rk_s[i] + T.exp2(gam_s[i] * LOG2E) * yk_s[i] + mg_s[i])
                    dg[0, t0 + i, hv] = T.if_then_else(g[0, t0 + i, hv] < G_FLOOR, 0.0,
                                                       dga[0, t0 + i, hv] + ps_s[i] + dir_s[i])

    return tilelang.compile(chunk_bwd_wy, target=json.loads(target), pass_configs=dict(pass_configs))
