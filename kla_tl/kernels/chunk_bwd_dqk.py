"""Backward, chunk-parallel: the output and state-update paths of the chunk gradients.

Stage 3 of :mod:`kla_tl.bwd_normalized` without the WY part, in its notation (per chunk of C = 64 rows and value
head ``hv``; q^ = q * rq with normalize_q, k^ = k * rk; S_in = hs[c], dS_out = dhs[c], N = vn, dN = dvn from the
state kernels of :mod:`kla_tl.kernels.chunk_states`)::

    dAqk  = Lower(dO N^T)                                 [C, C]   (accumulated over V blocks)
    dOSt  = dO S_in^T,   NdS = N dS_out^T,   dW = -dN S_in^T          [C, K]
    dq^   = diag(scale e) dOSt + scale (dAqk * Gam) K^
    dq    = rq (dq^ - (q^ . dq^) q^)   (normalize_q; else dq = dq^)     -> dq (per value head)
    dk^_a = scale (dAqk * Gam)^T Q^ + diag(en) NdS                      -> dkh (the WY kernel adds its part)
    dg_a[r] = sum_{i >= r, j < r} (dAqk * Aqk)_ij + sum_{i >= r} scale e_i (q^_i . dOSt_i)
              + sum_{j < r} en_j (k^_j . NdS_j) + e^{gamma_n} <dS_out, S_in>   -> dga
              (z_j = en_j k^_j . (N dS_out^T)_j = en_j (K^ dS_out . N)_j: no extra GEMM; the last term, the chunk
              tail, is the same for every row and is reduced while the state tiles stream through)

Not here: the WY backward (:mod:`kla_tl.kernels.chunk_bwd_wy`). Grid (NC, HV), one CTA per chunk and value head,
V in blocks of ``block_v``; K <= 128 (K = 256 needs K blocks: every [C, K] quantity above splits by columns, only
dAqk is shared). dq is written per value head in ``dq_dtype`` (the caller sums GVA groups); dkh, dw, dga in fp32.
Rows past a sequence end: dO, N, dN are loaded as zeros, so every product over them vanishes; the decay factors of
those rows are masked before exp (no 0 * inf).
"""

import functools

import tilelang
import tilelang.language as T

from ._tl import LOG2E, gemm_for, split_pair_sum

C = 64


@functools.lru_cache(maxsize=None)
def build_chunk_bwd_dqk(*, H: int, HV: int, K: int, V: int, in_dtype: str, dq_dtype: str, normalize_q: bool,
                        scale: float, block_v: int, threads: int, target: str, pass_configs: tuple = ()):
    """Compile the kernel (no GPU needed). ``target`` is a JSON target string; ``dq_dtype`` the dtype of its dq output
    (the input dtype without GVA, float32 when the caller sums the value heads of each group)."""
    import json

    G = HV // H
    KP = -(-K // 64) * 64
    if KP > 128:
        raise ValueError(f"build_chunk_bwd_dqk: K={K} not supported yet (K <= 128; K blocks are the next step)")
    gemm = gemm_for(in_dtype)
    pair_sum = split_pair_sum()
    acc = "float32"
    st = in_dtype
    TT = T.dynamic("TT")
    NC = T.dynamic("NC")
    NV = (V + block_v - 1) // block_v

    @T.prim_func
    def chunk_bwd_dqk(
        q: T.Tensor([1, TT, H, K], in_dtype),
        k: T.Tensor([1, TT, H, K], in_dtype),
        vn: T.Tensor([1, TT, HV, V], st),
        do: T.Tensor([1, TT, HV, V], in_dtype),
        dvn: T.Tensor([1, TT, HV, V], st),
        hs: T.Tensor([NC, HV, K, V], st),
        dhs: T.Tensor([NC, HV, K, V], st),
        aqk: T.Tensor([1, TT, HV, C], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rq: T.Tensor([1, TT, H], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        chunks: T.Tensor([NC, 2], "int32"),
        dq: T.Tensor([1, TT, HV, K], dq_dtype),
        dkh: T.Tensor([1, TT, HV, K], "float32"),
        dw: T.Tensor([1, TT, HV, K], "float32"),
        dga: T.Tensor([1, TT, HV], "float32"),
    ):
        with T.Kernel(NC, HV, threads=threads) as (ic, hv):
            hk = hv // G
            t0 = chunks[ic, 0]
            eos = chunks[ic, 1]

            qh_s = T.alloc_shared((C, KP), st)
            kh_s = T.alloc_shared((C, KP), st)
            do_s = T.alloc_shared((C, block_v), st)
            n_s = T.alloc_shared((C, block_v), st)
            dn_s = T.alloc_shared((C, block_v), st)
            s_s = T.alloc_shared((KP, block_v), st)
            ds_s = T.alloc_shared((KP, block_v), st)
            dag_s = T.alloc_shared((C, C), st)
            zg_s = T.alloc_shared((C, C), acc)
            ps_s = T.alloc_shared((C,), acc)
            pa_s = T.alloc_shared((C,), acc)
            gam_s = T.alloc_shared((C,), acc)
            e_s = T.alloc_shared((C,), acc)
            en_s = T.alloc_shared((C,), acc)
            dir_s = T.alloc_shared((C,), acc)
            z_s = T.alloc_shared((C,), acc)
            zc_s = T.alloc_shared((C,), acc)
            dot_s = T.alloc_shared((C,), acc)
            tl_s = T.alloc_shared((KP,), acc)

            da_f = T.alloc_fragment((C, C), acc)
            dos_f = T.alloc_fragment((C, KP), acc)
            nds_f = T.alloc_fragment((C, KP), acc)
            dw_f = T.alloc_fragment((C, KP), acc)
            t_f = T.alloc_fragment((C, KP), acc)
            rq_f = T.alloc_fragment((C,), acc)
            rz_f = T.alloc_fragment((C,), acc)
            rp_f = T.alloc_fragment((C,), acc)
            p_f = T.alloc_fragment((C, C), acc)
            sd_f = T.alloc_fragment((KP, block_v), acc)
            tl_f = T.alloc_fragment((KP,), acc)
            tail = T.alloc_local((1,), acc)

            # q^, k^ (row scalings in fp32, then the GEMM dtype), decay factors of the chunk
            for i, d in T.Parallel(C, KP):
                if normalize_q:
                    qh_s[i, d] = T.if_then_else(t0 + i < eos and d < K, q[0, t0 + i, hk, d] * rq[0, t0 + i, hk], 0.0)
                else:
                    qh_s[i, d] = T.if_then_else(t0 + i < eos and d < K, q[0, t0 + i, hk, d], T.cast(0, in_dtype))
                kh_s[i, d] = T.if_then_else(t0 + i < eos and d < K, k[0, t0 + i, hk, d] * rk[0, t0 + i, hk], 0.0)
            for i in T.Parallel(C):
                gam_s[i] = T.if_then_else(t0 + i < eos, gcum[0, t0 + i, hv], 0.0)
            nl = T.min(eos - t0, C) - 1
            for i in T.Parallel(C):
                e_s[i] = T.if_then_else(t0 + i < eos, T.exp2(gam_s[i] * LOG2E), 0.0)
                en_s[i] = T.if_then_else(t0 + i < eos, T.exp2((gam_s[nl] - gam_s[i]) * LOG2E), 0.0)

            # reductions over V: dAqk, dO S_in^T, N dS_out^T, dN S_in^T
            T.clear(da_f)
            T.clear(dos_f)
            T.clear(nds_f)
            T.clear(dw_f)
            T.clear(tl_f)
            for vb in T.serial(NV):
                v0 = vb * block_v
                for i, j in T.Parallel(C, block_v):
                    ok = t0 + i < eos and v0 + j < V
                    do_s[i, j] = T.if_then_else(ok, do[0, t0 + i, hv, v0 + j], T.cast(0, in_dtype))
                    n_s[i, j] = T.if_then_else(ok, vn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                    dn_s[i, j] = T.if_then_else(ok, dvn[0, t0 + i, hv, v0 + j], T.cast(0, st))
                for d, j in T.Parallel(KP, block_v):
                    ok = d < K and v0 + j < V
                    s_s[d, j] = T.if_then_else(ok, hs[ic, hv, d, v0 + j], T.cast(0, st))
                    ds_s[d, j] = T.if_then_else(ok, dhs[ic, hv, d, v0 + j], T.cast(0, st))
                for d, j in T.Parallel(KP, block_v):            # dg's chunk tail <dS_out, S_in>, by state rows
                    sd_f[d, j] = T.cast(s_s[d, j], acc) * T.cast(ds_s[d, j], acc)
                T.reduce_sum(sd_f, tl_f, dim=1, clear=False)
                gemm(do_s, n_s, da_f, transpose_B=True)
                gemm(do_s, s_s, dos_f, transpose_B=True)
                gemm(n_s, ds_s, nds_f, transpose_B=True)
                gemm(dn_s, s_s, dw_f, transpose_B=True)

            # dAqk * Gam (scaled, the GEMM operand) and dAqk * Aqk (for dg); masked before exp
            for i, j in T.Parallel(C, C):
                valid = i >= j and t0 + i < eos
                dag_s[i, j] = T.if_then_else(valid, scale * da_f[i, j] * T.exp2((gam_s[i] - gam_s[j]) * LOG2E), 0.0)
                zg_s[i, j] = T.if_then_else(valid, da_f[i, j] * aqk[0, t0 + i, hv, j], 0.0)

            # dg's e^gamma term (before dOSt is scaled into dq^), then dq^ = diag(scale e) dOSt + (scale dAqk Gam) K^
            for i, d in T.Parallel(C, KP):
                t_f[i, d] = qh_s[i, d] * dos_f[i, d]
            T.reduce_sum(t_f, rq_f, dim=1)
            for i in T.Parallel(C):
                dir_s[i] = scale * e_s[i] * rq_f[i]
            for i, d in T.Parallel(C, KP):
                dos_f[i, d] = dos_f[i, d] * (scale * e_s[i])
            gemm(dag_s, kh_s, dos_f)
            if normalize_q:       # q^ = q rq: dq = rq (dq^ - (q^ . dq^) q^), q^ in fp32
                for i, d in T.Parallel(C, KP):
                    t_f[i, d] = dos_f[i, d] * T.if_then_else(
                        t0 + i < eos and d < K, T.cast(q[0, t0 + i, hk, d], acc) * rq[0, t0 + i, hk], 0.0)
                T.reduce_sum(t_f, rq_f, dim=1)
                for i in T.Parallel(C):
                    dot_s[i] = rq_f[i]
                for i, d in T.Parallel(C, KP):
                    if t0 + i < eos and d < K:
                        dq[0, t0 + i, hv, d] = rq[0, t0 + i, hk] * (
                            dos_f[i, d] - dot_s[i] * T.cast(q[0, t0 + i, hk, d], acc) * rq[0, t0 + i, hk])
            else:
                for i, d in T.Parallel(C, KP):
                    if t0 + i < eos and d < K:
                        dq[0, t0 + i, hv, d] = dos_f[i, d]

            # dg's state-update term z, then dk^_a = diag(en) N dS_out^T + (scale dAqk Gam)^T Q^
            for i, d in T.Parallel(C, KP):
                t_f[i, d] = kh_s[i, d] * nds_f[i, d]
            T.reduce_sum(t_f, rz_f, dim=1)
            for i in T.Parallel(C):
                z_s[i] = en_s[i] * rz_f[i]
            for i, d in T.Parallel(C, KP):
                nds_f[i, d] = nds_f[i, d] * en_s[i]
            gemm(dag_s, qh_s, nds_f, transpose_A=True)
            for i, d in T.Parallel(C, KP):
                if t0 + i < eos and d < K:
                    dkh[0, t0 + i, hv, d] = nds_f[i, d]
                    dw[0, t0 + i, hv, d] = -dw_f[i, d]

            # dg_a[r] = sum_{j < r} (up ZG)[r, j] + sum_{i >= r} direct_i + sum_{j < r} z_j
            pair_sum(zg_s, p_f, rp_f, pa_s, ps_s)
            T.copy(z_s, zc_s)
            T.cumsum(dir_s, dim=0, reverse=True)
            T.cumsum(zc_s, dim=0)
            T.copy(tl_f, tl_s)
            tail[0] = 0.0
            for d in T.serial(KP):
                tail[0] = tail[0] + tl_s[d]
            for r in T.Parallel(C):
                if t0 + r < eos:
                    dga[0, t0 + r, hv] = (ps_s[r] + dir_s[r] + (zc_s[r] - z_s[r])
                                          + T.exp2(gam_s[nl] * LOG2E) * tail[0])

    return tilelang.compile(chunk_bwd_dqk, target=json.loads(target), pass_configs=dict(pass_configs))
