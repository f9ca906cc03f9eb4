"""The two sequential state recurrences of the KLA backward (KLA.md section 6), in the normalized form of the
forward (:mod:`kla_tl.kernels.chunk_scan`'s notation); they consume what :mod:`kla_tl.kernels.chunk_prepare` wrote::

    chunk_states   (grid (ceil(V / block_v), N, HV), a sequence's chunks in order)
        hs[c]  = S                                        state entering chunk c (input dtype)
        N      = U - W S                                  -> vn (rows past the sequence end are not written)
        S      = e^{gamma_n} S + (K^ e^{gamma_n - gamma})^T N
        ht     = S at the end (fp32, optional)
    chunk_dstates  (same grid, a sequence's chunks last to first, reading hs): see :func:`build_chunk_dstates`

Chunk ``c`` of sequence ``n`` is row ``coff[n] + c`` of ``hs [NCT, HV, K, V]`` (``coff`` int32 ``[N]``: chunks of
the sequences before ``n``), which is also row ``coff[n] + c`` of the prepare kernel's chunk table. The forward
itself runs :mod:`kla_tl.kernels.chunk_scan`, which fuses the output into this recurrence: a split design (this
state kernel plus a chunk-parallel output kernel) was measured slower on an H100 (1.242 vs 0.948 ms at B=8, T=4096,
H=16; perf/experiments/h100-split-forward.json) and removed.
"""

import functools

import tilelang
import tilelang.language as T

from ._tl import LOG2E, gemm_for, k_tile, row_tile_io, state_tile_io

C = 64


def tail_parts_per_cta(threads: int) -> int:
    """Parts of dg's chunk tail that one CTA of :func:`build_chunk_dstates` writes (one per warp)."""
    return threads // 32


@functools.lru_cache(maxsize=None)
def build_chunk_states(*, H: int, HV: int, K: int, V: int, in_dtype: str, use_h0: bool, store_ht: bool,
                       block_v: int, threads: int, num_stages: int, target: str, pass_configs: tuple = (),
                       n_dtype: str = None):
    """Compile the state recurrence (no GPU needed). ``target`` is a JSON target string; ``n_dtype`` the dtype of u and
    of N (default: the input dtype; the backward passes float32, see :mod:`kla_tl.kernels.chunk_prepare`)."""
    import json

    G = HV // H
    gemm = gemm_for(in_dtype)
    KP = k_tile(K)
    acc = "float32"
    st = in_dtype
    TT = T.dynamic("TT")
    N = T.dynamic("N")
    NCT = T.dynamic("NCT")
    NV = (V + block_v - 1) // block_v
    load_state, store_state = state_tile_io(K, KP, V, block_v)
    load, clear_pad = row_tile_io(K, num_stages)
    nd = n_dtype or st

    @T.prim_func
    def chunk_states(
        k: T.Tensor([1, TT, H, K], in_dtype),
        w: T.Tensor([1, TT, HV, K], st),
        u: T.Tensor([1, TT, HV, V], nd),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        seqs: T.Tensor([N, 2], "int32"),
        coff: T.Tensor([N], "int32"),
        h0: T.Tensor([N, HV, K, V], "float32"),
        hs: T.Tensor([NCT, HV, K, V], st),
        vn: T.Tensor([1, TT, HV, V], nd),
        ht: T.Tensor([N, HV, K, V], "float32"),
    ):
        with T.Kernel(NV, N, HV, threads=threads) as (iv, n, hv):
            hk = hv // G
            v0 = iv * block_v
            bos = seqs[n, 0]
            eos = seqs[n, 1]
            c0 = coff[n]

            k_s = T.alloc_shared((C, KP), in_dtype)
            w_s = T.alloc_shared((C, KP), st)
            u_s = T.alloc_shared((C, block_v), nd)
            vn_s = T.alloc_shared((C, block_v), nd)
            vd_s = T.alloc_shared((C, block_v), st)
            h_s = T.alloc_shared((KP, block_v), st)
            gam_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)

            h_f = T.alloc_fragment((KP, block_v), acc)
            wh_f = T.alloc_fragment((C, block_v), acc)

            if use_h0:
                load_state(h0, n, hv, v0, h_f)
            else:
                T.clear(h_f)
            clear_pad(k_s)
            clear_pad(w_s)

            for c in T.Pipelined(T.ceildiv(eos - bos, C), num_stages=num_stages):
                t0 = bos + c * C
                load(k, t0, hk, k_s)
                load(w, t0, hv, w_s)
                T.copy(u[0, t0:t0 + C, hv, v0:v0 + block_v], u_s)
                T.copy(gcum[0, t0:t0 + C, hv], gam_s, disable_tma=True)
                T.copy(rk[0, t0:t0 + C, hk], rk_s, disable_tma=True)
                nl = T.min(eos - t0, C) - 1

                T.copy(h_f, h_s)
                store_state(h_s, hs, c0 + c, hv, v0)          # the state entering this chunk
                gemm(w_s, h_s, wh_f, clear_accum=True)
                for i, j in T.Parallel(C, block_v):
                    wh_f[i, j] = T.if_then_else(t0 + i < eos, u_s[i, j] - wh_f[i, j], 0.0)
                for i, j in T.Parallel(C, block_v):
                    vn_s[i, j] = wh_f[i, j]
                    vd_s[i, j] = T.if_then_else(
                        t0 + i < eos, wh_f[i, j] * (rk_s[i] * T.exp2((gam_s[nl] - gam_s[i]) * LOG2E)), 0.0)
                for i, j in T.Parallel(C, block_v):
                    if t0 + i < eos and v0 + j < V:
                        vn[0, t0 + i, hv, v0 + j] = vn_s[i, j]
                for i, j in T.Parallel(KP, block_v):
                    h_f[i, j] = h_f[i, j] * T.exp2(gam_s[nl] * LOG2E)
                gemm(k_s, vd_s, h_f, transpose_A=True)

            if store_ht:
                store_state(h_f, ht, n, hv, v0)

    return tilelang.compile(chunk_states, target=json.loads(target), pass_configs=dict(pass_configs))


@functools.lru_cache(maxsize=None)
def build_chunk_dstates(*, H: int, HV: int, K: int, V: int, in_dtype: str, normalize_q: bool, scale: float,
                        use_dht: bool, store_dh0: bool, block_v: int, threads: int, num_stages: int, target: str,
                        pass_configs: tuple = (), n_dtype: str = None, aqk_width: int = 64):
    """Compile the reverse state-gradient recurrence of the backward (no GPU needed). ``target`` is a JSON target
    string; ``n_dtype`` the dtype of N (``vn``, as :func:`build_chunk_states` wrote it); ``aqk_width`` the row length
    of ``aqk`` (128 when it also holds L, Aqk in the first 64 columns).

    Grid ``(ceil(V / block_v), N, HV)``, each CTA walks its sequence's chunks from the last to the first with
    ``dS`` = the gradient at the state leaving the chunk (``dht`` or 0 at the sequence end), in the normalized form of
    the forward (KLA.md section 4; chunk_scan's notation)::

        dhs[c] = dS                                              gradient at the state leaving chunk c (input dtype)
        dN     = Aqk^T dO + diag(e^{gamma_n - gamma} / r) K dS    -> dvn  (gradient of N = U - W S)
        z      = rowsum((diag(e^{gamma_n - gamma} / r) K dS) * N)  -> zp[iv] (this CTA's V columns; dg's state-update
                                                                       term, summed over iv by the chunk-gradient kernel)
        tail   = <dS, hs[c]>                                     -> tp[iv * warps + warp] (this CTA's V columns,
                                                                       by warp; dg's chunk tail without its factor
                                                                       e^{gamma_n}, likewise summed)
        dS     = e^{gamma_n} dS + Q^T diag(scale e^gamma / |q|) dO - W^T dN
        dh0    = dS at the sequence start (fp32, optional)

    Inputs: the forward's q, k, w, aqk, gcum, rq, rk, ``do [1, TT, HV, V]``, ``dht [N, HV, K, V]`` fp32, the
    tables of :func:`build_chunk_states` (``seqs``, ``coff``) and its outputs ``vn`` and ``hs``. Rows past a
    sequence end are masked on load (do) or on the result (dN), so the next sequence's rows in a chunk tile
    contribute nothing.

    Precision: with bf16 inputs K dS is taken as K dS_hi + K dS_lo (dS split into two bf16 tiles, ~16 bits), and z
    is formed in fp32 from it and the fp32 N: z_j = e^{gamma_n - gamma_j} (k^_j dS) . N_j is the whole of dg at some
    rows when gates are extreme (a final-state gradient meeting the last tokens), and can be far smaller than its
    terms; bf16 roundings of dS or N there cost up to 1e-2 relative on dg (CPU emulation), this form ~1e-3. The
    chunk tail <dS, S_in> is formed here for the same reason, from the fp32 dS and the stored state: the
    chunk-gradient kernel used to form it from bf16 copies of both, the largest of dg's rounding errors at all-zero
    gates (``tools/dg_rounding_emulation.py``: median 3.7e-3 -> 3.0e-3, 20 -> 3 of 2000 draws over the 1e-2
    tolerance; on an H100 3.1e-3 and 2 of 1000, where fla's dg had 3.4e-3 and 6:
    ``perf/experiments/h100-chunk-tail-ds-v3.json``). The tail stays off the serial path's critical latency and out
    of shared memory: each thread loads its own elements of the state tile (dS's fragment layout) straight into
    registers at the start of the chunk step, so the loads are in flight while the step's GEMMs run; it multiplies
    them by its fp32 dS elements after dN, and a warp shuffle sums them; no block-wide reduction. (A shared-memory
    tile for the state, 16 KB at K = 128 and 64 columns, took the kernel past half an H100's shared memory: one CTA
    an SM instead of two, and the backward 1-7% slower.)
    """
    import json

    G = HV // H
    gemm = gemm_for(in_dtype)
    KP = k_tile(K)
    acc = "float32"
    st = in_dtype
    TT = T.dynamic("TT")
    N = T.dynamic("N")
    NCT = T.dynamic("NCT")
    NV = (V + block_v - 1) // block_v
    load_state, store_state = state_tile_io(K, KP, V, block_v)
    load, clear_pad = row_tile_io(K, num_stages)
    nd = n_dtype or st
    split = in_dtype != "float32"          # dS = hi + lo in the K dS product (float32 products are exact already)
    warps = tail_parts_per_cta(threads)

    @T.prim_func
    def chunk_dstates(
        q: T.Tensor([1, TT, H, K], in_dtype),
        k: T.Tensor([1, TT, H, K], in_dtype),
        w: T.Tensor([1, TT, HV, K], st),
        aqk: T.Tensor([1, TT, HV, aqk_width], st),
        gcum: T.Tensor([1, TT, HV], "float32"),
        rq: T.Tensor([1, TT, H], "float32"),
        rk: T.Tensor([1, TT, H], "float32"),
        do: T.Tensor([1, TT, HV, V], in_dtype),
        seqs: T.Tensor([N, 2], "int32"),
        coff: T.Tensor([N], "int32"),
        dht: T.Tensor([N, HV, K, V], "float32"),
        vn: T.Tensor([1, TT, HV, V], nd),
        hs: T.Tensor([NCT, HV, K, V], st),
        dhs: T.Tensor([NCT, HV, K, V], st),
        dvn: T.Tensor([1, TT, HV, V], st),
        dh0: T.Tensor([N, HV, K, V], "float32"),
        zp: T.Tensor([NV, TT, HV], "float32"),
        tp: T.Tensor([NV * warps, NCT, HV], "float32"),
    ):
        with T.Kernel(NV, N, HV, threads=threads) as (iv, n, hv):
            hk = hv // G
            v0 = iv * block_v
            bos = seqs[n, 0]
            eos = seqs[n, 1]
            c0 = coff[n]
            nch = T.ceildiv(eos - bos, C)
            tx = T.get_thread_binding()

            q_s = T.alloc_shared((C, KP), in_dtype)
            k_s = T.alloc_shared((C, KP), in_dtype)
            w_s = T.alloc_shared((C, KP), st)
            a_s = T.alloc_shared((C, C), st)
            do_s = T.alloc_shared((C, block_v), in_dtype)
            dos_s = T.alloc_shared((C, block_v), in_dtype)
            dn_s = T.alloc_shared((C, block_v), st)
            dh_s = T.alloc_shared((KP, block_v), st)
            dl_s = T.alloc_shared((KP, block_v) if split else (1, 1), st)
            gam_s = T.alloc_shared((C,), acc)
            rq_s = T.alloc_shared((C,), acc)
            rk_s = T.alloc_shared((C,), acc)

            dh_f = T.alloc_fragment((KP, block_v), acc)
            dn_f = T.alloc_fragment((C, block_v), acc)
            zt_f = T.alloc_fragment((C, block_v), acc)
            z_f = T.alloc_fragment((C,), acc)
            hs_f = T.alloc_fragment((KP, block_v), st)      # the state entering the chunk, for the tail
            tsum = T.alloc_local((1,), acc)

            if use_dht:
                load_state(dht, n, hv, v0, dh_f)
            else:
                T.clear(dh_f)
            clear_pad(q_s)
            clear_pad(k_s)
            clear_pad(w_s)

            for cc in T.Pipelined(nch, num_stages=num_stages):
                c = nch - 1 - cc
                t0 = bos + c * C
                load(q, t0, hk, q_s)
                load(k, t0, hk, k_s)
                load(w, t0, hv, w_s)
                T.copy(aqk[0, t0:t0 + C, hv, 0:C], a_s)
                for i, j in T.Parallel(C, block_v):
                    do_s[i, j] = T.if_then_else(t0 + i < eos and v0 + j < V, do[0, t0 + i, hv, v0 + j],
                                                T.cast(0, in_dtype))
                T.copy(gcum[0, t0:t0 + C, hv], gam_s, disable_tma=True)
                T.copy(rk[0, t0:t0 + C, hk], rk_s, disable_tma=True)
                if normalize_q:
                    T.copy(rq[0, t0:t0 + C, hk], rq_s, disable_tma=True)
                nl = T.min(eos - t0, C) - 1

                for i, j in T.Parallel(KP, block_v):          # the state entering this chunk, into registers
                    hs_f[i, j] = T.if_then_else(i < K and v0 + j < V, hs[c0 + c, hv, i, v0 + j], T.cast(0, st))
                T.copy(dh_f, dh_s)
                if split:
                    for i, j in T.Parallel(KP, block_v):
                        dl_s[i, j] = dh_f[i, j] - T.cast(T.cast(dh_f[i, j], st), acc)
                store_state(dh_s, dhs, c0 + c, hv, v0)        # the gradient at the state leaving this chunk
                # dN = diag(e^{gamma_n - gamma} / r) K dS + Aqk^T dO   (rows past the end forced to 0)
                gemm(k_s, dh_s, dn_f, clear_accum=True)
                if split:
                    gemm(k_s, dl_s, dn_f)
                for i, j in T.Parallel(C, block_v):
                    dn_f[i, j] = T.if_then_else(
                        t0 + i < eos, dn_f[i, j] * (rk_s[i] * T.exp2((gam_s[nl] - gam_s[i]) * LOG2E)), 0.0)
                # dg's state-update term of these V columns, in fp32
                for i, j in T.Parallel(C, block_v):
                    zt_f[i, j] = dn_f[i, j] * T.if_then_else(t0 + i < eos and v0 + j < V,
                                                             T.cast(vn[0, t0 + i, hv, v0 + j], acc), 0.0)
                T.reduce_sum(zt_f, z_f, dim=1)
                for i in T.Parallel(C):
                    if t0 + i < eos:
                        zp[iv, t0 + i, hv] = z_f[i]
                gemm(a_s, do_s, dn_f, transpose_A=True)
                for i, j in T.Parallel(C, block_v):
                    dn_s[i, j] = T.if_then_else(t0 + i < eos, dn_f[i, j], 0.0)
                    # the q row scaling applied to dO instead of Q: Q^T diag(scale e^gamma / |q|) dO
                    if normalize_q:
                        dos_s[i, j] = do_s[i, j] * (scale * rq_s[i] * T.exp2(gam_s[i] * LOG2E))
                    else:
                        dos_s[i, j] = do_s[i, j] * (scale * T.exp2(gam_s[i] * LOG2E))
                for i, j in T.Parallel(C, block_v):
                    if t0 + i < eos and v0 + j < V:
                        dvn[0, t0 + i, hv, v0 + j] = dn_s[i, j]
                # dg's chunk tail of these V columns, <dS, S_in> with the fp32 dS: each thread sums its own
                # elements of dS, a warp sums its threads', and each warp writes its part of tp
                tsum[0] = 0.0
                for i, j in T.Parallel(KP, block_v):
                    tsum[0] = tsum[0] + dh_f[i, j] * T.cast(hs_f[i, j], acc)
                tsum[0] = T.warp_reduce_sum(tsum[0])
                if tx % 32 == 0:
                    tp[iv * warps + tx // 32, c0 + c, hv] = tsum[0]
                # dS = e^{gamma_n} dS + Q^T (scaled dO) - W^T dN
                for i, j in T.Parallel(KP, block_v):
                    dh_f[i, j] = dh_f[i, j] * T.exp2(gam_s[nl] * LOG2E)
                gemm(q_s, dos_s, dh_f, transpose_A=True)
                for i, j in T.Parallel(C, block_v):
                    dn_s[i, j] = -dn_s[i, j]
                gemm(w_s, dn_s, dh_f, transpose_A=True)

            if store_dh0:
                store_state(dh_f, dh0, n, hv, v0)

    return tilelang.compile(chunk_dstates, target=json.loads(target), pass_configs=dict(pass_configs))
