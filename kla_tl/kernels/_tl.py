"""Shared TileLang constants and helpers of the kla-tl kernels."""

from __future__ import annotations

import math

import torch

#: log2(e): kernels evaluate exp(x) as exp2(x * LOG2E).
LOG2E = 1.0 / math.log(2.0)

#: Floor applied to the log-decay g inside kernels. exp(-100) ~ 3.7e-44 is already below every term that matters,
#: and a finite floor keeps g = -inf from producing (-inf) - (-inf) = NaN in chunk-local differences (KLA.md 10.6).
G_FLOOR = -100.0

#: torch dtype -> TileLang dtype string
TL_DTYPE = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def tl_dtype(dtype: torch.dtype) -> str:
    return TL_DTYPE[dtype]


def storage_dtype(in_dtype: str) -> str:
    """Dtype of the intermediates (w, u, Aqk) and GEMM operands: the input dtype (fp32 stays fp32)."""
    return in_dtype


def gemm_for(in_dtype: str):
    """``gemm(A, B, C, transpose_A=False, transpose_B=False, clear_accum=False)`` for kernels whose GEMM operands are
    ``in_dtype``: ``T.gemm`` (tensor cores) for 16-bit operands; for float32 operands an exact-fp32 FMA product
    instead, because tensor cores round float32 operands to tf32 (10-bit mantissa): the chunk forward with tf32
    GEMMs was 1.2e-3 off the float64 reference on an H100, above the 1e-3 float32 tolerance.

    The FMA product: a rank-1 update of the fragment ``C`` per step of the reduction axis (each thread updates its
    own elements), reading ``A`` and ``B`` from shared memory. With ``transpose_B`` the threads of a warp read rows of ``B`` 4*K
    bytes apart (one bank): the reduction index is rotated by the output column, which spreads them over the banks.
    Slower than tensor cores; it exists so that float32 callers get float32 accuracy from a kernel."""
    import tilelang.language as T

    exact = in_dtype == "float32"

    @T.macro
    def gemm(A, B, Cf, transpose_A: bool = False, transpose_B: bool = False, clear_accum: bool = False):
        if exact:
            red = A.shape[0] if transpose_A else A.shape[1]
            if clear_accum:
                T.clear(Cf)
            for r in T.serial(red):
                for i, j in T.Parallel(Cf.shape[0], Cf.shape[1]):
                    if transpose_B:
                        Cf[i, j] += (A[(r + j) % red, i] if transpose_A else A[i, (r + j) % red]) * B[j, (r + j) % red]
                    else:
                        Cf[i, j] += (A[r, i] if transpose_A else A[i, r]) * B[r, j]
        else:
            T.gemm(A, B, Cf, transpose_A=transpose_A, transpose_B=transpose_B, clear_accum=clear_accum)

    return gemm


#: 32-bit registers per SM on sm_80 and sm_90 (the occupancy arithmetic of ``max_regs`` knobs).
SM_REGISTERS = 65536


def min_blocks(threads: int, max_regs: int) -> int:
    """CTAs per SM that ``__launch_bounds__`` asks for, so that ptxas caps registers near ``max_regs`` (1 for 255:
    no cap beyond the architectural one)."""
    return 1 if max_regs >= 255 else max(1, SM_REGISTERS // (threads * max_regs))


#: Rows of a chunk tile (the chunk size).
C_ROWS = 64


def k_tile(K: int) -> int:
    """Columns of a ``[C, K]`` tile and rows of a ``[K, block_v]`` state tile: K padded to a multiple of 64 (K = 48,
    96 -> 64, 128). The state update S += K^T N is a wgmma with M = K, and a warpgroup's M is a multiple of 64; the
    pad columns and rows hold zeros."""
    return -(-K // 64) * 64


def lean_prepare(in_dtype: str, K: int, V: int) -> bool:
    """Whether chunk_prepare drops its Y and X tiles (float32 with K > 128 or V > 192): the float32 tiles of the
    plain layout would exceed shared memory (K = V = 256: 279 KB; the limit is 227 KB on sm_90, 163 KB on sm_80)."""
    return in_dtype == "float32" and (k_tile(K) > 128 or V > 192)


def lean_scan(in_dtype: str, K: int) -> bool:
    """Whether the state scans read q, k and w straight from global memory inside their FMA products instead of
    staging [64, K] tiles in shared memory (float32 with K > 128: three float32 [64, 256] tiles are 192 KB)."""
    return in_dtype == "float32" and k_tile(K) > 128


def row_tile_io(K: int, num_stages: int):
    """Macros ``(load, clear_pad)`` of a ``[C, KP]`` row tile (``KP = k_tile(K)``) of a ``[1, TT, heads, K]`` tensor,
    loaded in a chunk loop of ``num_stages`` stages.

    ``load(src, t0, head, dst)`` copies rows ``[t0, t0 + C)`` (columns ``[0, K)``) in bulk, so the copy can run
    asynchronously ahead of its use (cp.async / TMA); rows past the sequence end then hold the next sequence's rows
    (zeros past the tensor's end), so every use of them must mask them. ``clear_pad(dst)`` zeroes the pad columns
    ``[K, KP)``, which ``load`` never writes: call it once before the chunk loop (one-stage loops only: a
    multi-stage pipeline keeps several copies of ``dst``; a padded K with ``num_stages != 1`` raises ValueError)."""
    import tilelang.language as T

    KP = k_tile(K)
    if KP != K and num_stages != 1:
        raise ValueError(f"num_stages={num_stages} with K={K} padded to {KP}: the pad columns are cleared once "
                         "(one-stage loops only)")

    @T.macro
    def load(src, t0, head, dst):
        if KP == K:
            T.copy(src[0, t0:t0 + C_ROWS, head, :], dst)
        elif K > 64:                     # [0, 64) and [64, K) apart: power-of-two vector counts per thread
            T.copy(src[0, t0:t0 + C_ROWS, head, 0:64], dst[0:C_ROWS, 0:64])
            T.copy(src[0, t0:t0 + C_ROWS, head, 64:K], dst[0:C_ROWS, 64:K])
        else:
            T.copy(src[0, t0:t0 + C_ROWS, head, 0:K], dst[0:C_ROWS, 0:K])

    @T.macro
    def clear_pad(dst):
        if KP != K:
            for i, d in T.Parallel(C_ROWS, KP - K):
                dst[i, K + d] = T.cast(0, dst.dtype)

    return load, clear_pad


def state_tile_io(K: int, KP: int, V: int, block_v: int):
    """Macros ``(load, store)`` of a state column tile ``[KP, block_v]`` (rows padded from K to KP, columns
    ``[v0, v0 + block_v)`` of V) against a ``[rows, HV, K, V]`` tensor: ``load(src, row, hv, v0, dst)`` reads it
    masked (zeros outside K x V), ``store(src, dst, row, hv, v0)`` writes the in-range part."""
    import tilelang.language as T

    @T.macro
    def load(src, row, hv, v0, dst):
        for i, j in T.Parallel(KP, block_v):
            dst[i, j] = T.if_then_else(i < K and v0 + j < V, src[row, hv, i, v0 + j], 0.0)

    @T.macro
    def store(src, dst, row, hv, v0):
        for i, j in T.Parallel(KP, block_v):
            if i < K and v0 + j < V:
                dst[row, hv, i, v0 + j] = src[i, j]

    return load, store


def unit_lower_inverse():
    """Macro ``inverse(a_s, lb_s, lcol, part)``: ``lb_s = (I + a_s)^-1`` for a strictly lower ``[C, C]`` fp32 shared
    tile ``a_s``, by forward substitution. Columns are independent: thread j < C owns column j in registers
    (``lcol``, local ``[C]``), L[i, j] = [i == j] - sum_{m < i} A[i, m] L[m, j] (zero above the diagonal by
    induction). Fully unrolled (register indices are compile-time, A[i, m] is a shared-memory broadcast), with four
    partial sums (``part``, local ``[4]``) so the FMA chain is not one long dependency."""
    import tilelang.language as T

    @T.macro
    def inverse(a_s, lb_s, lcol, part):
        n = a_s.shape[0]
        tx = T.get_thread_binding()
        if tx < n:
            T.clear(lcol)
            for i in T.unroll(n):
                for p in T.unroll(4):
                    part[p] = 0.0
                for m in T.unroll(n):
                    if m < i:
                        part[m % 4] = part[m % 4] + a_s[i, m] * lcol[m]
                lcol[i] = T.if_then_else(i == tx, 1.0, 0.0) - ((part[0] + part[1]) + (part[2] + part[3]))
            for i in T.unroll(n):
                lb_s[i, tx] = lcol[i]

    return inverse


def split_pair_sum():
    """Macro ``pair_sum(z_s, z_f, r_f, a_s, b_s)``: ``b_s[r] = sum_{i >= r > j} z_s[i, j]`` for an ``[n, n]`` fp32
    shared tile (its diagonal and upper part are ignored): the sum over the pairs a chunk boundary before row r
    splits, the shape of every dg term through a decay difference gamma_i - gamma_j. Computed as the exclusive
    prefix sum over m < r of (column sum - row sum) of the strictly lower part (f(r + 1) - f(r) = col_r - row_r),
    O(n^2) instead of an [n, n] x [n, n] product. ``z_f`` is an ``[n, n]`` fp32 fragment, ``r_f`` an ``[n]`` fp32
    fragment, ``a_s`` an ``[n]`` fp32 shared scratch. Row and column sums are both taken as row reductions (the
    column sums from the transposed read) and meet only through shared memory."""
    import tilelang.language as T

    @T.macro
    def pair_sum(z_s, z_f, r_f, a_s, b_s):
        n = z_s.shape[0]
        for i, j in T.Parallel(n, n):
            z_f[i, j] = T.if_then_else(i > j, z_s[i, j], 0.0)
        T.reduce_sum(z_f, r_f, dim=1)
        for i in T.Parallel(n):
            a_s[i] = r_f[i]
        for i, j in T.Parallel(n, n):
            z_f[i, j] = T.if_then_else(j > i, z_s[j, i], 0.0)
        T.reduce_sum(z_f, r_f, dim=1)
        for i in T.Parallel(n):
            a_s[i] = r_f[i] - a_s[i]
        T.copy(a_s, b_s)
        T.cumsum(b_s, dim=0)
        for i in T.Parallel(n):
            b_s[i] = b_s[i] - a_s[i]

    return pair_sum
