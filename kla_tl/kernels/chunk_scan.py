"""Chunk state scan fused with the output: the sequential half of the KLA chunkwise forward (KLA.md section 5, steps
6-7), consuming what :mod:`kla_tl.kernels.chunk_prepare` wrote.

Grid ``(ceil(V / block_v), N, HV)``: one CTA owns columns ``[iv * block_v, (iv + 1) * block_v)`` of one sequence's
state for value head ``hv`` (columns of S evolve independently) and walks the sequence's chunks in order::

    h_s    = bf16(S)                                      (the GEMM operand; S itself stays fp32 in registers)
    N      = U - W h_s                                    rows past the sequence end forced to 0
    O      = (scale e^gamma q^) h_s + Aqk N               -> o
    S      = e^{gamma_n} S + (K^ e^{gamma_n - gamma})^T N

The raw bf16 q and k tiles are the GEMM operands: the row scalings of q^ (1/|q|, e^gamma, scale) and of K^
(1/r, e^{gamma_n - gamma}) are applied to the GEMM output (Q S) and to N instead, from ``rq``, ``rk`` (per q/k head)
and ``gcum`` written by the preparation kernel. The state is read from ``h0`` (optional) and written to ``ht`` (optional),
fp32 ``[N, HV, K, V]``. float32 inputs multiply with exact-fp32 FMA products instead of tensor cores
(:func:`kla_tl.kernels._tl.gemm_for`), reading q, k and w straight from global memory when K > 128
(:func:`kla_tl.kernels._tl.lean_scan`). Schedule knobs: ``block_v``, ``threads``, ``num_stages`` (software pipelining of the chunk
loads; the Ampere cp.async path must use 1 with a runtime trip count, TILELANG.md section 7).
"""

import functools

import tilelang
import tilelang.language as T

from ._tl import LOG2E, gemm_for, k_tile, lean_scan, row_tile_io, state_tile_io

C = 64


@functools.lru_cache(maxsize=None)
def build_chunk_scan(*, H: int, HV: int, K: int, V: int, in_dtype: str, normalize_q: bool, scale: float, eps: float,
                     use_h0: bool, store_ht: bool, block_v: int, threads: int, num_stages: int, target: str,
                     pass_configs: tuple = (), aqk_width: int = 64):
    """Compile the scan+output kernel (no GPU needed). ``target`` is a JSON target string; ``aqk_width`` the row
    length of ``aqk`` (128 when the prepare stage also stored L for the backward, Aqk in the first 64 columns)."""
    import json

    G = HV // H
    gemm = gemm_for(in_dtype)
    KP = k_tile(K)                 # K padded to the wgmma/mma tile; pad columns of q, k, w (and rows of S) are zeros
    acc = "float32"
    st = in_dtype
    # float32 with K > 128: q, k, w are read from global memory inside the FMA products (no [64, K] tiles)
    lean = lean_scan(in_dtype, K)
    TT = T.dynamic("TT")
    N = T.dynamic("N")
    NV = (V + block_v - 1) // block_v
    load_state, store_state = state_tile_io(K, KP, V, block_v)
    load, clear_pad = row_tile_io(K, num_stages)

    @T.macro
    def rows_times_state(src, head, t0, eos, h_s, out_f):
        """out_f = src[rows t0 .. t0 + C, head] @ S (the lean float32 layout: src read from global memory, rows past
        the sequence end and the K padding as zeros)."""
        T.clear(out_f)
        for r in T.serial(KP):
            for i, j in T.Parallel(C, block_v):
                out_f[i, j] += T.if_then_else(t0 + i < eos and r < K, src[0, t0 + i, head, r], T.cast(0, src.dtype)) * h_s[r, j]

    @T.prim_func
    def chunk_scan(
        q: T.Tensor([1, TT, H, K], in_dtype),
        k: T.Tensor([1, TT, H, K], in_dtype),
        w: T.Tensor([1, TT, HV, K], st),
        u: T.Tensor([1, TT, HV, V], st),
        aqk: T.Tensor([1, TT, HV, aqk_width], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rq: T.Tensor([1, TT, H], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        seqs: T.Tensor([N, 2], "int32"),
        h0: T.Tensor([N, HV, K, V], "float32"),
        o: T.Tensor([1, TT, HV, V], in_dtype),
        ht: T.Tensor([N, HV, K, V], "float32"),
    ):
        with T.Kernel(NV, N, HV, threads=threads) as (iv, n, hv):
            hk = hv // G
            v0 = iv * block_v
            bos = seqs[n, 0]
            eos = seqs[n, 1]

            q_s = T.alloc_shared((1, 1) if lean else (C, KP), in_dtype)
            k_s = T.alloc_shared((1, 1) if lean else (C, KP), in_dtype)
            w_s = T.alloc_shared((1, 1) if lean else (C, KP), st)
            u_s = T.alloc_shared((C, block_v), st)
            a_s = T.alloc_shared((C, C), st)
            vn_s = T.alloc_shared((C, block_v), st)
            vd_s = T.alloc_shared((C, block_v), st)
            h_s = T.alloc_shared((KP, block_v), st)
            gam_s = T.alloc_shared((C,), acc)
            rq_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)

            h_f = T.alloc_fragment((KP, block_v), acc)
            wh_f = T.alloc_fragment((C, block_v), acc)
            o_f = T.alloc_fragment((C, block_v), acc)

            if use_h0:
                load_state(h0, n, hv, v0, h_f)
            else:
                T.clear(h_f)
            if not lean:
                clear_pad(q_s)
                clear_pad(k_s)
                clear_pad(w_s)

            for c in T.Pipelined(T.ceildiv(eos - bos, C), num_stages=num_stages):
                t0 = bos + c * C
                if not lean:                     # rows past the sequence end: every use masks them
                    load(q, t0, hk, q_s)
                    load(k, t0, hk, k_s)
                    load(w, t0, hv, w_s)
                T.copy(u[0, t0:t0 + C, hv, v0:v0 + block_v], u_s)
                T.copy(aqk[0, t0:t0 + C, hv, 0:C], a_s)
                # strides of H*4 / HV*4 bytes are not TMA-aligned: plain (cp.async) copies
                T.copy(gcum[0, t0:t0 + C, hv], gam_s, disable_tma=True)
                T.copy(rk[0, t0:t0 + C, hk], rk_s, disable_tma=True)
                if normalize_q:
                    T.copy(rq[0, t0:t0 + C, hk], rq_s, disable_tma=True)
                nl = T.min(eos - t0, C) - 1              # last valid row: gamma_n = gam_s[nl]

                T.copy(h_f, h_s)
                # N = U - W S  (rows past the sequence end forced to 0)
                if lean:
                    rows_times_state(w, hv, t0, eos, h_s, wh_f)
                else:
                    gemm(w_s, h_s, wh_f, clear_accum=True)
                for i, j in T.Parallel(C, block_v):
                    wh_f[i, j] = T.if_then_else(t0 + i < eos, u_s[i, j] - wh_f[i, j], 0.0)
                for i, j in T.Parallel(C, block_v):
                    vn_s[i, j] = wh_f[i, j]
                    # the keys' row scaling 1/r e^{gamma_n - gamma} is applied to N instead of K
                    # masked, not just multiplied by N = 0: rows past the end hold another sequence's gamma,
                    # where e^{gamma_n - gamma} can overflow (0 * inf = NaN)
                    vd_s[i, j] = T.if_then_else(
                        t0 + i < eos, wh_f[i, j] * (rk_s[i] * T.exp2((gam_s[nl] - gam_s[i]) * LOG2E)), 0.0)
                # O = diag(scale e^gamma / |q|) (Q S) + Aqk N
                if lean:
                    rows_times_state(q, hk, t0, eos, h_s, o_f)
                else:
                    gemm(q_s, h_s, o_f, clear_accum=True)
                for i, j in T.Parallel(C, block_v):
                    if normalize_q:
                        o_f[i, j] = o_f[i, j] * (scale * rq_s[i] * T.exp2(gam_s[i] * LOG2E))
                    else:
                        o_f[i, j] = o_f[i, j] * (scale * T.exp2(gam_s[i] * LOG2E))
                gemm(a_s, vn_s, o_f)
                T.copy(o_f, vn_s)                       # staged: row-contiguous vector stores to o
                for i, j in T.Parallel(C, block_v):
                    if t0 + i < eos and v0 + j < V:
                        o[0, t0 + i, hv, v0 + j] = vn_s[i, j]
                # S = e^{gamma_n} S + K^T diag(e^{gamma_n - gamma} / r) N
                for i, j in T.Parallel(KP, block_v):
                    h_f[i, j] = h_f[i, j] * T.exp2(gam_s[nl] * LOG2E)
                if lean:
                    for r in T.serial(C):
                        for i, j in T.Parallel(KP, block_v):
                            h_f[i, j] += T.if_then_else(t0 + r < eos and i < K, k[0, t0 + r, hk, i], T.cast(0, in_dtype)) * vd_s[r, j]
                else:
                    gemm(k_s, vd_s, h_f, transpose_A=True)

            if store_ht:
                store_state(h_f, ht, n, hv, v0)

    return tilelang.compile(chunk_scan, target=json.loads(target), pass_configs=dict(pass_configs))
