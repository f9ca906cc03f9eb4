"""TileLang builders of the token-by-token KLA kernels: ``decode`` (one token per row on a state pool, in place) and
``fused_recurrent`` (a short sequence per row with the state kept in registers).

Per value head and token (KLA.md sections 2 and 7)::

    D = ||k||^2 + eps,  beta = eta / D            (fp32, from raw k)
    S <- exp(g) S;  e = v - k S;  S <- S + beta k^T e;  o = scale * q^ S

computed as one pass over S: the sums ``k S``, ``q S``, ``||k||^2``, ``||q||^2`` and ``q.k`` are reduced together,
then ``e = v - exp(g) kS``, ``o = scale / ||q|| * (exp(g) qS + (q.k) beta e)`` (= q^ S_new, expanded) and the
update ``S <- exp(g) S + k^T beta e`` need no further reduction.

Inputs and outputs (axis letters of :mod:`kla_tl.conventions`):

- decode: q, k ``[B, 1, H, K]``; v ``[B, 1, HV, V]``; g, eta ``[B, 1, HV]``; state pool ``[N_slots, HV, K, V]`` (fp32
  or bf16, updated in place); optional int32 ``state_indices [B]`` (-1 = padding row); o ``[B, 1, HV, V]``.
- fused_recurrent: q, k ``[B, T, H, K]``; v, o ``[B, T, HV, V]``; g, eta ``[B, T, HV]``; fp32 ``h0``/``ht``
  ``[N, HV, K, V]``; int32 ``cu_seqlens [N + 1]`` when varlen (B == 1). Serving variant (speculative decoding):
  ``h0`` a pool ``[N_slots, HV, K, V]`` (fp32 or bf16) addressed by int32 ``state_indices [N]`` (-1 = padding
  sequence), optionally updated in place; optional per-token states ``inter [B * T, HV, K, V]`` (fp32 or bf16).

One CTA owns a ``K x block_v`` state tile of one (row, value head) and keeps it in registers (decode: in the pool's
dtype, so a bf16 tile takes half the registers; arithmetic is fp32). Its warps form a ``warps_k x warps_v`` grid:
``warps_v`` side by side along V, each owning ``L * vec`` consecutive columns, and ``warps_k`` stacked along K, each
owning ``K / warps_k`` consecutive rows. In a warp, ``L`` lanes share a state row and each holds ``vec`` columns (one
128-bit access: 4 fp32 or 8 bf16), so one warp access covers ``32 / L`` rows of ``L * vec`` contiguous columns
(whole 128-column rows: L = 32 fp32 or 16 bf16, 512 contiguous bytes). Sums over K are xor shuffles across the
lanes of equal ``lane % L``, then, when ``warps_k > 1``, a shared-memory exchange between the warps (two block
barriers per token).

decode grid: one axis of ``B * HV * (V / block_v)`` CTAs, column blocks fastest, then value heads, then rows, so the
CTAs that read one (slot, head) tile -- and the heads of one slot, contiguous in the pool -- run at the same time
and each DRAM page is opened once. decode issues the q/k/v/g/eta loads before the slot index arrives, so only the
state loads wait on it. fused_recurrent grid: ``(rows, HV, V / block_v)``; it stages ``block_t`` tokens of
q/k/v/g/eta in shared memory at a time so that their load latency is paid once per block of tokens, and keeps
``warps_k = 1`` (a barrier per token would serialise its loop).

Schedule knobs: ``block_v`` (columns per CTA), ``threads`` (warps per CTA), ``warps_k`` (how the warps split the tile)
and ``max_regs`` (register cap, i.e. CTAs per SM) for decode; ``block_v``, ``threads`` and ``block_t`` for
fused_recurrent. There is no ``num_stages``: nothing here is a pipelined tile copy. One builder source serves both
architectures; the Ampere path (``sm_80``, or ``sm_90a`` with the pass configs of
:func:`kla_tl.kernels.registry.target_for`) compiles the same SIMT code.

Index arithmetic: TileLang 0.1.15 emits 64-bit offsets for these dynamic-shape buffers (checked in the generated
source: ``(int64_t)slot * HV*K*V``), so pools past 2^31 elements are addressed correctly. The decode grid is one
axis, so ``B * HV * V / block_v`` must stay below 2^31 (B up to 16 million rows at HV = 32, V / block_v = 4).
"""

import functools
from dataclasses import dataclass
from typing import Optional

import tilelang
import tilelang.language as T

from ._tl import min_blocks
from .registry import ARCHS, KernelSpec, register, target_for

#: Threads per warp (CUDA).
WARP = 32
#: Bytes per lane per state row: one 128-bit load/store (LDG.128 / STG.128).
VEC_BYTES = 16
#: Upper bound on state registers per thread (fp32 values, or bf16 pairs): the tile plus 50-100 working registers (k
#: and q rows, v, accumulators, shuffle and shared-memory operands, addresses) must stay under the 255-register limit.
MAX_STATE_REGS = 96
#: Registers a thread needs besides its state tile (k/q rows, accumulators, addresses): a ``max_regs`` cap below
#: ``state registers + MIN_WORK_REGS`` would spill, so `valid` prunes it.
MIN_WORK_REGS = 24
#: Epsilon of the optional q L2 normalization (fla's l2norm; conventions.QNORM_EPS).
QNORM_EPS = 1e-6

#: Bytes per element of the dtypes the kernels take.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: q/k/v/o dtypes (float64 runs on the reference).
QKV_DTYPES = ("bfloat16", "float16", "float32")
#: g/eta dtypes read directly by the kernels (others are converted to float32 by the launchers).
GATE_DTYPES = ("float32", "bfloat16", "float16")
#: State-pool dtypes of ``decode``: fp32, or bf16 to halve the state traffic (arithmetic stays fp32). An fp16
#: pool is not offered: fp16's range is too small for KLA states (writes reach 500 * eta * |v|, KLA.md section 3).
POOL_DTYPES = ("float32", "bfloat16")

DECODE_SPACE = {
    #: columns per CTA; must divide V. 128 = whole rows (V = 128): one CTA streams a contiguous K*V tile, the best DRAM
    #: pattern, for large batches; 32 and 16 give 4x / 8x more CTAs for B <= 8; 64 is between.
    "block_v": (16, 32, 64, 128),
    #: threads per CTA (1 to 16 warps); with the tile size they set the state values per thread (K * block_v /
    #: threads): 32 or 64 values per thread at 4-6 CTAs per SM keep 64-128 KB of state loads in flight per SM.
    "threads": (32, 64, 128, 256, 512),
    #: warps stacked along K (the rest side by side along V). 1: reductions are shuffles only, no barrier (the only
    #: choice when a warp must own a narrow column block). >1: each warp access covers longer row pieces (block_v /
    #: warps_v columns) and fewer lanes share a row (fewer shuffles), for one shared-memory exchange (two barriers).
    "warps_k": (1, 2, 4, 8, 16),
    #: register cap per thread (``__launch_bounds__(threads, 65536 // (threads * max_regs))``): 255 = none (ptxas
    #: picks); 128 = two 256-thread or four 128-thread CTAs per SM with a 64-value tile; 80 = six 128-thread CTAs with
    #: a 32-value tile; 64 = full occupancy (2048 threads) with a 32-value tile. A cap that leaves fewer than
    #: MIN_WORK_REGS registers beside the tile is pruned by `valid`; one that spills is pruned by autotune phase 1.
    "max_regs": (255, 128, 80, 64),
}

FUSED_RECURRENT_SPACE = {
    "block_v": (16, 32, 64, 128),
    "threads": (32, 64, 128, 256),
    #: tokens staged in shared memory per refill: 8 suits spec-decode verify (T <= 8), 32 amortizes the load
    #: latency over more tokens for T near 64.
    "block_t": (8, 16, 32),
}


@dataclass(frozen=True)
class Layout:
    """How a CTA's threads cover a ``K x block_v`` tile (see the module docstring)."""

    #: columns per lane: one 128-bit access
    vec: int
    #: lanes per state row (a power of two dividing 32)
    L: int
    #: rows per warp access (32 / L)
    rows: int
    #: accesses per lane: its warp's K / warps_k rows, ``rows`` at a time
    passes: int
    #: warps side by side along V
    warps_v: int
    #: warps stacked along K
    warps_k: int
    #: bytes per state element (4 fp32, 2 bf16)
    state_bytes: int

    @property
    def state_regs(self) -> int:
        """32-bit registers holding one thread's share of the tile (bf16 values packed in pairs)."""
        return self.passes * self.vec * self.state_bytes // 4


def lane_layout(K: int, block_v: int, threads: int, state_bytes: int, warps_k: int = 1) -> Optional[Layout]:
    """The :class:`Layout` of a ``K x block_v`` tile over ``threads`` threads, or None when it does not exist."""
    if threads % WARP or threads <= 0 or warps_k < 1:
        return None
    vec = VEC_BYTES // state_bytes
    warps = threads // WARP
    if warps % warps_k or K % warps_k:
        return None
    warps_v = warps // warps_k
    if block_v % (warps_v * vec):
        return None
    L = block_v // (warps_v * vec)
    if L < 1 or L > WARP or (L & (L - 1)):
        return None
    rows = WARP // L
    if (K // warps_k) % rows:
        return None
    return Layout(vec, L, rows, K // warps_k // rows, warps_v, warps_k, state_bytes)


def _layout_ok(K: int, V: int, block_v: int, threads: int, state_bytes: int, warps_k: int = 1) -> bool:
    lay = lane_layout(K, block_v, threads, state_bytes, warps_k)
    return lay is not None and V % block_v == 0 and lay.state_regs <= MAX_STATE_REGS


def _make_step(lay: Layout, block_v: int, normalize_q: bool):
    """The KLA update of one token on one lane's state fragment, as a T.macro (shared by both kernels).

    Lane buffers: ``s[passes, vec]`` state (pool dtype; arithmetic in fp32), ``kr``/``qr[passes]`` its rows of k and
    q, ``vr[vec]`` its columns of v (replaced by the output o on return), ``acc``/``qacc[vec]`` and ``nrm[3]``
    scratch. ``red`` ``[warps_k, 2 * block_v + 4]`` and ``red_tot`` ``[2 * block_v + 4]`` are the shared exchange
    buffers (None when warps_k == 1); ``tx`` is the thread index, ``wk``/``wv`` the warp's coordinates, ``first``
    whether the lane is in its warp's first row group and ``cl`` its first column in the tile. Returns the macro and
    the row length of ``red``.
    """
    vec, passes, warps_k = lay.vec, lay.passes, lay.warps_k
    # xor distances that combine the lanes owning the same columns but different rows
    offsets = tuple(lay.L << i for i in range(lay.rows.bit_length() - 1))
    n_nrm = 3 if normalize_q else 2      # ||k||^2, q.k[, ||q||^2]
    red_cols = 2 * block_v + 4           # kS | qS | norms (padded to 16 bytes)
    threads = WARP * lay.warps_v * warps_k
    sum_iters = -(-(block_v + n_nrm) // threads)

    @T.macro
    def step(s, kr, qr, vr, acc, qacc, nrm, red, red_tot, g_val, eta_val, scale, eps, tx, wk, wv, first, cl):
        # partial sums over this lane's rows: ||k||^2, q.k, ||q||^2, kS, qS
        for i in T.unroll(3):
            nrm[i] = 0.0
        for p in T.unroll(passes):
            nrm[0] += kr[p] * kr[p]
            nrm[1] += qr[p] * kr[p]
            if normalize_q:
                nrm[2] += qr[p] * qr[p]
        for j in T.unroll(vec):
            acc[j] = 0.0
            qacc[j] = 0.0
        for p in T.unroll(passes):
            for j in T.unroll(vec):
                acc[j] += kr[p] * T.cast(s[p, j], "float32")
                qacc[j] += qr[p] * T.cast(s[p, j], "float32")
        # sums over the warp's rows (lanes of equal lane % L)
        for d in offsets:
            for i in T.unroll(n_nrm):
                nrm[i] += T.shfl_xor(nrm[i], d)
            for j in T.unroll(vec):
                acc[j] += T.shfl_xor(acc[j], d)
                qacc[j] += T.shfl_xor(qacc[j], d)
        if warps_k > 1:
            # sums over the warps stacked along K, in shared memory: each warp's first row group publishes its
            # partial sums (row wk of red); thread i adds up column i over the warps in warp order (red_tot);
            # everyone reads the totals of its columns
            if first:
                for j in T.unroll(vec):
                    red[wk, cl + j] = acc[j]
                    red[wk, block_v + cl + j] = qacc[j]
                if wv == 0 and cl == 0:
                    for i in T.unroll(n_nrm):
                        red[wk, 2 * block_v + i] = nrm[i]
            T.sync_threads()
            for it in T.unroll(sum_iters):
                c = it * threads + tx                 # a column (kS and qS) or, past block_v, a norm
                if c < block_v:
                    tot_k = T.alloc_var("float32")
                    tot_q = T.alloc_var("float32")
                    tot_k = red[0, c]
                    tot_q = red[0, block_v + c]
                    for w in T.unroll(1, warps_k):
                        tot_k += red[w, c]
                        tot_q += red[w, block_v + c]
                    red_tot[c] = tot_k
                    red_tot[block_v + c] = tot_q
                elif c < block_v + n_nrm:
                    tot_n = T.alloc_var("float32")
                    tot_n = red[0, block_v + c]
                    for w in T.unroll(1, warps_k):
                        tot_n += red[w, block_v + c]
                    red_tot[block_v + c] = tot_n
            T.sync_threads()
            for j in T.vectorized(vec):
                acc[j] = red_tot[cl + j]
            for j in T.vectorized(vec):
                qacc[j] = red_tot[block_v + cl + j]
            for i in T.unroll(n_nrm):
                nrm[i] = red_tot[2 * block_v + i]
        # alpha = exp(g); beta = eta / (||k||^2 + eps); acc <- beta e = beta (v - alpha kS)
        alpha = T.exp(g_val)
        beta = eta_val / (nrm[0] + eps)
        for j in T.unroll(vec):
            acc[j] = beta * (vr[j] - alpha * acc[j])
        # o = scale q^ S_new = scale / ||q|| (alpha qS + (q.k) beta e)
        if normalize_q:
            qs = scale * T.rsqrt(nrm[2] + QNORM_EPS)
            for j in T.unroll(vec):
                vr[j] = (alpha * qacc[j] + nrm[1] * acc[j]) * qs
        else:
            for j in T.unroll(vec):
                vr[j] = (alpha * qacc[j] + nrm[1] * acc[j]) * scale
        # S <- alpha S + k^T beta e
        for p in T.unroll(passes):
            for j in T.unroll(vec):
                s[p, j] = T.cast(alpha * T.cast(s[p, j], "float32") + kr[p] * acc[j], s.dtype)

    return step, red_cols


@functools.lru_cache(maxsize=128)
def build_decode(*, H: int, HV: int, K: int, V: int, dtype: str, gate_dtype: str, state_dtype: str,  # problem
                 use_indices: bool, normalize_q: bool,                                                 # flags
                 block_v: int, threads: int, warps_k: int = 1, max_regs: int = 255):                   # schedule
    """Prim_func of one decode step on a state pool (B and N_slots dynamic: one compile serves every batch).

    Signature: ``(q, k, v, g, eta, state, [state_indices,] o, scale, eps)``; ``state_indices`` only when
    ``use_indices`` (else row b uses slot b). A row whose index is negative writes zeros to o and leaves the pool
    alone. ``scale`` and ``eps`` are fp32 runtime scalars.
    """
    assert dtype in QKV_DTYPES and gate_dtype in GATE_DTYPES and state_dtype in POOL_DTYPES, (dtype, gate_dtype,
                                                                                              state_dtype)
    assert HV % H == 0, (H, HV)
    sb = DTYPE_BYTES[state_dtype]
    assert _layout_ok(K, V, block_v, threads, sb, warps_k), (K, V, block_v, threads, warps_k, state_dtype)
    lay = lane_layout(K, block_v, threads, sb, warps_k)
    vec, L, rows, passes, warps_v = lay.vec, lay.L, lay.rows, lay.passes, lay.warps_v
    G = HV // H
    NV = V // block_v
    rows_per_warp = K // warps_k
    blocks_per_sm = min_blocks(threads, max_regs)
    step, red_cols = _make_step(lay, block_v, normalize_q)
    B, NS = T.dynamic("B, N_slots")

    @T.macro
    def body(q, k, v, g, eta, state, o, slot, scale, eps):
        with T.Kernel(B * (HV * NV), threads=threads) as bid:
            if blocks_per_sm > 1:
                T.annotate_min_blocks_per_sm(blocks_per_sm)
            bv = bid % NV                                                    # column blocks fastest,
            hv = (bid // NV) % HV                                            # then value heads,
            b = bid // (HV * NV)                                             # then rows
            tx = T.get_thread_binding()
            lane = tx % WARP
            wv = (tx // WARP) % warps_v
            wk = tx // (WARP * warps_v)
            first = lane < L                                                 # in the warp's first row group
            r0 = wk * rows_per_warp + lane // L                              # first state row of this lane
            cl = wv * (L * vec) + (lane % L) * vec                           # first column of this lane in the tile
            c0 = bv * block_v + cl
            hq = hv // G                                                     # GVA: q/k head of value head hv
            s = T.alloc_local([passes, vec], state_dtype)
            kr = T.alloc_local([passes], "float32")
            qr = T.alloc_local([passes], "float32")
            vr = T.alloc_local([vec], "float32")
            acc = T.alloc_local([vec], "float32")
            qacc = T.alloc_local([vec], "float32")
            nrm = T.alloc_local([3], "float32")
            red = T.alloc_shared([warps_k, red_cols], "float32") if warps_k > 1 else None
            red_tot = T.alloc_shared([red_cols], "float32") if warps_k > 1 else None
            g_val = T.alloc_var("float32")
            eta_val = T.alloc_var("float32")
            sl = T.alloc_var("int32")
            sl = slot(b)
            # token inputs do not depend on the slot: issue their loads before the slot's value arrives
            for p in T.unroll(passes):
                kr[p] = T.cast(k[b, 0, hq, p * rows + r0], "float32")
                qr[p] = T.cast(q[b, 0, hq, p * rows + r0], "float32")
            for j in T.vectorized(vec):
                vr[j] = T.cast(v[b, 0, hv, c0 + j], "float32")
            g_val = T.cast(g[b, 0, hv], "float32")
            eta_val = T.cast(eta[b, 0, hv], "float32")
            if sl >= 0:
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        s[p, j] = state[sl, hv, p * rows + r0, c0 + j]
                step(s, kr, qr, vr, acc, qacc, nrm, red, red_tot, g_val, eta_val, scale, eps, tx, wk, wv, first, cl)
                if first and wk == 0:
                    for j in T.vectorized(vec):
                        o[b, 0, hv, c0 + j] = T.cast(vr[j], dtype)
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        state[sl, hv, p * rows + r0, c0 + j] = s[p, j]
            else:
                # padding row: zeros out, the pool is neither read nor written
                if first and wk == 0:
                    for j in T.vectorized(vec):
                        o[b, 0, hv, c0 + j] = T.cast(0.0, dtype)

    if use_indices:
        @T.prim_func
        def kla_decode_indexed(q: T.Tensor([B, 1, H, K], dtype), k: T.Tensor([B, 1, H, K], dtype),
                               v: T.Tensor([B, 1, HV, V], dtype), g: T.Tensor([B, 1, HV], gate_dtype),
                               eta: T.Tensor([B, 1, HV], gate_dtype), state: T.Tensor([NS, HV, K, V], state_dtype),
                               state_indices: T.Tensor([B], "int32"), o: T.Tensor([B, 1, HV, V], dtype),
                               scale: T.float32, eps: T.float32):
            body(q, k, v, g, eta, state, o, lambda b: state_indices[b], scale, eps)

        return kla_decode_indexed

    @T.prim_func
    def kla_decode(q: T.Tensor([B, 1, H, K], dtype), k: T.Tensor([B, 1, H, K], dtype),
                   v: T.Tensor([B, 1, HV, V], dtype), g: T.Tensor([B, 1, HV], gate_dtype),
                   eta: T.Tensor([B, 1, HV], gate_dtype), state: T.Tensor([NS, HV, K, V], state_dtype),
                   o: T.Tensor([B, 1, HV, V], dtype), scale: T.float32, eps: T.float32):
        body(q, k, v, g, eta, state, o, lambda b: b, scale, eps)

    return kla_decode


@functools.lru_cache(maxsize=128)
def build_fused_recurrent(*, H: int, HV: int, K: int, V: int, dtype: str, gate_dtype: str,   # problem
                          use_h0: bool, store_ht: bool, is_varlen: bool, normalize_q: bool,   # flags
                          state_dtype: str = "float32", use_indices: bool = False,            # serving flags
                          is_inplace: bool = False, store_inter: bool = False, inter_dtype: str = "float32",
                          block_v: int, threads: int, block_t: int):                          # schedule
    """Prim_func of the fused recurrence over short sequences (B, T and the state/cu_seqlens lengths dynamic).

    Signature: ``(q, k, v, g, eta, h0, ht, cu_seqlens, o, scale, eps)``. ``h0``/``ht`` are fp32
    ``[N, HV, K, V]`` and ``cu_seqlens`` int32 ``[N + 1]``; when a flag says a tensor is unused the launcher passes
    a small placeholder (never read or written). Dense: grid row n is batch row n over tokens [0, T). Varlen (B == 1):
    grid row n covers tokens [cu_seqlens[n], cu_seqlens[n+1]); an empty sequence stores h0 (or zeros) to ht.

    Serving flags (speculative decoding); any of ``use_indices`` / ``store_inter`` selects the extended signature
    ``(q, k, v, g, eta, h0, ht, cu_seqlens, state_indices, inter, o, scale, eps)``, a separate kernel (with every
    serving flag off the prim_func, hence its TileLang cache entry, is the one above):

    - ``use_indices``: ``h0`` is a pool ``[N_slots, HV, K, V]`` of ``state_dtype`` (fp32 or bf16) and sequence n
      starts from slot ``state_indices[n]`` (int32 ``[N]``); a negative index marks a padding sequence: its o rows
      are zeros (and its ht row, when stored), and it reads or writes nothing else (no pool slot, no ``inter`` row).
    - ``is_inplace`` (needs ``use_indices``): the final state is written back into its pool slot (cast to
      ``state_dtype``); without it the pool is only read.
    - ``store_inter``: the state after every token is written to ``inter`` ``[B * T, HV, K, V]`` (``inter_dtype``,
      fp32 or bf16; row ``b * T + t`` dense, ``t`` varlen), cast from the fp32 registers.
    """
    assert dtype in QKV_DTYPES and gate_dtype in GATE_DTYPES, (dtype, gate_dtype)
    assert state_dtype in POOL_DTYPES and inter_dtype in POOL_DTYPES, (state_dtype, inter_dtype)
    assert HV % H == 0, (H, HV)
    assert not use_indices or use_h0, "use_indices reads the pool: it needs use_h0"
    assert not is_inplace or use_indices, "is_inplace writes pool slots: it needs use_indices"
    assert state_dtype == "float32" or use_indices, "a non-fp32 h0 is read only as a pool"
    assert _layout_ok(K, V, block_v, threads, DTYPE_BYTES["float32"]), (K, V, block_v, threads)
    assert block_t >= 1, block_t
    lay = lane_layout(K, block_v, threads, DTYPE_BYTES["float32"])
    vec, L, rows, passes = lay.vec, lay.L, lay.rows, lay.passes
    G = HV // H
    step, _ = _make_step(lay, block_v, normalize_q)
    B, TT, NH, NT, NC = T.dynamic("B, T, N_h0, N_ht, N_cu")
    rows_grid = NC - 1 if is_varlen else B

    @T.macro
    def body(q, k, v, g, eta, h0, ht, cu_seqlens, o, slot, inter, scale, eps):
        with T.Kernel(rows_grid, HV, V // block_v, threads=threads) as (n, hv, bv):
            tx = T.get_thread_binding()
            lane = tx % WARP
            first = lane < L
            r0 = lane // L
            cl = (tx // WARP) * (L * vec) + (lane % L) * vec                 # first column of this lane in the tile
            c0 = bv * block_v + cl
            hq = hv // G
            k_s = T.alloc_shared([block_t, K], dtype)
            q_s = T.alloc_shared([block_t, K], dtype)
            v_s = T.alloc_shared([block_t, block_v], dtype)
            g_s = T.alloc_shared([block_t], "float32")
            e_s = T.alloc_shared([block_t], "float32")
            s = T.alloc_local([passes, vec], "float32")
            kr = T.alloc_local([passes], "float32")
            qr = T.alloc_local([passes], "float32")
            vr = T.alloc_local([vec], "float32")
            acc = T.alloc_local([vec], "float32")
            qacc = T.alloc_local([vec], "float32")
            nrm = T.alloc_local([3], "float32")
            bb = T.alloc_var("int32")                                        # batch row of the tokens
            bos = T.alloc_var("int32")
            eos = T.alloc_var("int32")
            if is_varlen:
                bb = 0
                bos = cu_seqlens[n]
                eos = cu_seqlens[n + 1]
            else:
                bb = n
                bos = 0
                eos = TT
            if use_indices:
                sl = T.alloc_var("int32")                                    # pool slot of sequence n
                sl = slot(n)
                if sl < 0:
                    # padding sequence: zeros to o, then no token runs (eos = bos) and S stays 0 (zeros to ht);
                    # the pool and inter are neither read nor written
                    if first:
                        for t in T.serial(eos - bos):
                            for j in T.vectorized(vec):
                                o[bb, bos + t, hv, c0 + j] = T.cast(0.0, dtype)
                    eos = bos
                if sl >= 0:
                    for p in T.unroll(passes):
                        for j in T.vectorized(vec):
                            s[p, j] = _as(h0[sl, hv, p * rows + r0, c0 + j], state_dtype, "float32")
                else:
                    for p in T.unroll(passes):
                        for j in T.unroll(vec):
                            s[p, j] = 0.0
            elif use_h0:
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        s[p, j] = h0[n, hv, p * rows + r0, c0 + j]
            else:
                for p in T.unroll(passes):
                    for j in T.unroll(vec):
                        s[p, j] = 0.0
            for c in T.serial(T.ceildiv(eos - bos, block_t)):
                t0 = bos + c * block_t
                # stage block_t tokens (rows past eos are zero and never used)
                T.sync_threads()
                for i, d in T.Parallel(block_t, K):
                    k_s[i, d] = T.if_then_else(t0 + i < eos, k[bb, t0 + i, hq, d], T.cast(0.0, dtype))
                    q_s[i, d] = T.if_then_else(t0 + i < eos, q[bb, t0 + i, hq, d], T.cast(0.0, dtype))
                for i, d in T.Parallel(block_t, block_v):
                    v_s[i, d] = T.if_then_else(t0 + i < eos, v[bb, t0 + i, hv, bv * block_v + d], T.cast(0.0, dtype))
                for i in T.Parallel(block_t):
                    g_s[i] = T.if_then_else(t0 + i < eos, T.cast(g[bb, t0 + i, hv], "float32"), 0.0)
                    e_s[i] = T.if_then_else(t0 + i < eos, T.cast(eta[bb, t0 + i, hv], "float32"), 0.0)
                T.sync_threads()
                for tt in T.serial(T.min(block_t, eos - t0)):
                    for p in T.unroll(passes):
                        kr[p] = T.cast(k_s[tt, p * rows + r0], "float32")
                        qr[p] = T.cast(q_s[tt, p * rows + r0], "float32")
                    for j in T.vectorized(vec):
                        vr[j] = T.cast(v_s[tt, cl + j], "float32")
                    step(s, kr, qr, vr, acc, qacc, nrm, None, None, g_s[tt], e_s[tt], scale, eps, tx, 0, 0, first, cl)
                    if first:
                        for j in T.vectorized(vec):
                            o[bb, t0 + tt, hv, c0 + j] = T.cast(vr[j], dtype)
                    if store_inter:
                        # the state after this token -> its token row of inter
                        for p in T.unroll(passes):
                            for j in T.vectorized(vec):
                                inter[bb * TT + t0 + tt, hv, p * rows + r0, c0 + j] = _as(s[p, j], "float32",
                                                                                          inter_dtype)
            if store_ht:
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        ht[n, hv, p * rows + r0, c0 + j] = s[p, j]
            if is_inplace:
                if sl >= 0:
                    for p in T.unroll(passes):
                        for j in T.vectorized(vec):
                            h0[sl, hv, p * rows + r0, c0 + j] = _as(s[p, j], "float32", state_dtype)

    if not (use_indices or store_inter):
        @T.prim_func
        def fused_recurrent_kla(q: T.Tensor([B, TT, H, K], dtype), k: T.Tensor([B, TT, H, K], dtype),
                                v: T.Tensor([B, TT, HV, V], dtype), g: T.Tensor([B, TT, HV], gate_dtype),
                                eta: T.Tensor([B, TT, HV], gate_dtype), h0: T.Tensor([NH, HV, K, V], "float32"),
                                ht: T.Tensor([NT, HV, K, V], "float32"), cu_seqlens: T.Tensor([NC], "int32"),
                                o: T.Tensor([B, TT, HV, V], dtype), scale: T.float32, eps: T.float32):
            body(q, k, v, g, eta, h0, ht, cu_seqlens, o, None, None, scale, eps)

        return fused_recurrent_kla

    NI, NTOK = T.dynamic("N_idx, N_tok")

    @T.prim_func
    def fused_recurrent_kla_serving(q: T.Tensor([B, TT, H, K], dtype), k: T.Tensor([B, TT, H, K], dtype),
                                    v: T.Tensor([B, TT, HV, V], dtype), g: T.Tensor([B, TT, HV], gate_dtype),
                                    eta: T.Tensor([B, TT, HV], gate_dtype),
                                    h0: T.Tensor([NH, HV, K, V], state_dtype), ht: T.Tensor([NT, HV, K, V], "float32"),
                                    cu_seqlens: T.Tensor([NC], "int32"), state_indices: T.Tensor([NI], "int32"),
                                    inter: T.Tensor([NTOK, HV, K, V], inter_dtype), o: T.Tensor([B, TT, HV, V], dtype),
                                    scale: T.float32, eps: T.float32):
        body(q, k, v, g, eta, h0, ht, cu_seqlens, o, lambda i: state_indices[i], inter, scale, eps)

    return fused_recurrent_kla_serving


def _as(x, src: str, dst: str):
    """``x`` (of TileLang dtype ``src``) as ``dst``: the value itself when the dtypes agree, else a cast."""
    return x if src == dst else T.cast(x, dst)


@functools.lru_cache(maxsize=256)
def _compile(func, target_arch: str, pass_configs: tuple):
    return tilelang.compile(func, target={"kind": "cuda", "arch": target_arch}, execution_backend="tvm_ffi",
                            pass_configs=dict(pass_configs) or None)


def compile_kernel(func, arch: str, *, target_arch=None, pass_configs=None):
    """Compile a prim_func for ``arch`` (no GPU needed); ``target_arch``/``pass_configs`` override the target.

    ``compile_kernel(f, "sm_80", **dict(zip(("target_arch", "pass_configs"), ...)))`` is how the Ampere path is built
    for a Hopper GPU: target ``sm_90a`` plus the pass configs of ``target_for("sm_80", run_on_hopper=True)``.
    """
    target, default_configs = target_for(arch)
    target_arch = target_arch or target["arch"]
    configs = default_configs if pass_configs is None else pass_configs
    return _compile(func, target_arch, tuple(sorted(configs.items())))


# ----------------------------------------------------------------------------------------------------------------
# Kernel specs (tuning space, defaults, buckets, GPU bench cases) for the registry


#: Preferred decode schedules, first valid one whose tile stays within DEFAULT_STATE_REGS wins (same on sm_80 and
#: sm_90a: SIMT code without arch-specific instructions). Half rows (64 columns) with the warps stacked along K: each
#: warp access reads 2 (fp32) or 4 (bf16) rows of 256 contiguous bytes, the two CTAs of a tile run back to back (so
#: the tile's DRAM pages are streamed once), 4 CTAs of 128 threads per SM at <= 128 registers (512 threads x 64
#: fp32 values = 128 KB of state per SM in flight), and HV * V / 64 CTAs at B = 1 (64 for HV = 32).
DECODE_PREFS = (
    {"block_v": 64, "threads": 128, "warps_k": 4, "max_regs": 128},
    {"block_v": 64, "threads": 256, "warps_k": 8, "max_regs": 128},    #: K = 256: twice the warps along K
    {"block_v": 32, "threads": 128, "warps_k": 4, "max_regs": 128},    #: V = 96 (64 does not divide it)
    {"block_v": 32, "threads": 256, "warps_k": 8, "max_regs": 128},
    {"block_v": 32, "threads": 64, "warps_k": 2, "max_regs": 128},     #: K = 48 with a bf16 pool
)
#: State values per thread the default schedule stays within: 64 fit the 128-register cap without spills (bf16 values
#: count as much as fp32 ones: ptxas keeps them unpacked between the two passes over the tile).
DEFAULT_STATE_VALUES = 64


#: Hand-picked decode schedules worth timing against each other (``kla-tl autotune`` times the whole space; the
#: GPU tests run each of these): (name, schedule, what it tests), per pool dtype, for K = V = 128. Registers (ptxas,
#: sm_90a): fp32 79 / 122 / 127 / 79, bf16 128 / 128 / 128 / 80, no spills; CTAs per SM in the descriptions follow.
def _warps_along_k(sb: int) -> tuple:
    """The candidates that split K over warps, for a pool of ``sb``-byte values (the same schedules for fp32 and
    bf16; the descriptions give the row-piece sizes that follow)."""
    return (
        ("half-rows", {"block_v": 64, "threads": 128, "warps_k": 4, "max_regs": 128},
         f"2 CTAs per tile, warps along K ({64 * sb}-byte row pieces); 4 CTAs/SM"),
        ("full-rows", {"block_v": 128, "threads": 256, "warps_k": 8, "max_regs": 128},
         f"1 CTA per tile: a contiguous {128 * 128 * sb // 1024} KB read, 512 B per warp access; 2 CTAs/SM"),
        ("quarter-rows", {"block_v": 32, "threads": 128, "warps_k": 4, "max_regs": 80},
         f"4 CTAs per tile, warps along K ({32 * sb}-byte row pieces), 32 values per thread; 6 CTAs/SM"),
    )


DECODE_CANDIDATES = {
    "float32": (
        ("old-tile", {"block_v": 32, "threads": 128, "warps_k": 1, "max_regs": 255},
         "4 warps side by side (8 columns each, 2 lanes per row), shuffle reductions only; 6 CTAs/SM"),
    ) + _warps_along_k(4),
    "bfloat16": (
        ("old-tile", {"block_v": 32, "threads": 64, "warps_k": 1, "max_regs": 255},
         "2 warps side by side (16 columns each, 2 lanes per row), shuffle reductions only; 8 CTAs/SM"),
    ) + _warps_along_k(2),
}


def _decode_valid(arch: str, key: dict, sch: dict) -> bool:
    sb = DTYPE_BYTES[key.get("state_dtype", "float32")]
    if not _layout_ok(key["K"], key["V"], sch["block_v"], sch["threads"], sb, sch["warps_k"]):
        return False
    lay = lane_layout(key["K"], sch["block_v"], sch["threads"], sb, sch["warps_k"])
    return sch["max_regs"] >= lay.state_regs + MIN_WORK_REGS


def _decode_default(arch: str, key: dict) -> dict:
    """The first of DECODE_PREFS that is valid for ``key`` and keeps the tile within DEFAULT_STATE_VALUES; else the
    first valid member of the space."""
    sb = DTYPE_BYTES[key.get("state_dtype", "float32")]
    for p in DECODE_PREFS:
        if _decode_valid(arch, key, p):
            lay = lane_layout(key["K"], p["block_v"], p["threads"], sb, p["warps_k"])
            if lay.passes * lay.vec <= DEFAULT_STATE_VALUES:
                return dict(p)
    for bv in DECODE_SPACE["block_v"]:
        for th in DECODE_SPACE["threads"]:
            for wk in DECODE_SPACE["warps_k"]:
                for mr in DECODE_SPACE["max_regs"]:
                    sch = {"block_v": bv, "threads": th, "warps_k": wk, "max_regs": mr}
                    if _decode_valid(arch, key, sch):
                        return sch
    raise ValueError(f"decode: no valid schedule for key {key}")


def _decode_bucket(key: dict) -> str:
    return f"K{key['K']}_V{key['V']}_{key.get('state_dtype', 'float32')}"


def _decode_build(arch: str, key: dict, schedule: dict, *, target_arch=None, pass_configs=None):
    func = build_decode(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], dtype=key["dtype"],
                        gate_dtype=key.get("gate_dtype", "float32"), state_dtype=key.get("state_dtype", "float32"),
                        use_indices=bool(key.get("use_indices", True)), normalize_q=bool(key.get("normalize_q", True)),
                        block_v=schedule["block_v"], threads=schedule["threads"], warps_k=schedule["warps_k"],
                        max_regs=schedule["max_regs"])
    return compile_kernel(func, arch, target_arch=target_arch, pass_configs=pass_configs)


def _fused_default(arch: str, key: dict) -> dict:
    """32 columns x 4 warps side by side (L = 2 lanes per row, 32 fp32 values per thread, shuffle reductions only:
    fused_recurrent keeps warps_k = 1); 16 staged tokens (covers spec-decode T <= 16 in one refill, four refills at
    T = 64). Falls back to the first valid member of the space."""
    for p in ({"block_v": 32, "threads": 128, "block_t": 16}, {"block_v": 32, "threads": 256, "block_t": 16}):
        if _fused_valid(arch, key, p):
            return dict(p)
    for bv in FUSED_RECURRENT_SPACE["block_v"]:
        for th in FUSED_RECURRENT_SPACE["threads"]:
            sch = {"block_v": bv, "threads": th, "block_t": 16}
            if _fused_valid(arch, key, sch):
                return sch
    raise ValueError(f"fused_recurrent: no valid schedule for key {key}")


def _fused_valid(arch: str, key: dict, sch: dict) -> bool:
    if not _layout_ok(key["K"], key["V"], sch["block_v"], sch["threads"], 4):
        return False
    smem = sch["block_t"] * (2 * key["K"] + sch["block_v"]) * DTYPE_BYTES[key["dtype"]] + 8 * sch["block_t"]
    return smem <= 48 * 1024  #: static shared-memory limit per CTA without opt-in


def fused_serving_flags(key: dict) -> dict:
    """The serving flags of a fused_recurrent key (absent = off), as :func:`build_fused_recurrent` takes them."""
    return {"state_dtype": key.get("state_dtype", "float32"), "use_indices": bool(key.get("use_indices", False)),
            "is_inplace": bool(key.get("is_inplace", False)), "store_inter": bool(key.get("store_inter", False)),
            "inter_dtype": key.get("inter_dtype", "float32")}


def fused_is_serving(key: dict) -> bool:
    """Whether ``key`` builds the extended (serving) signature of :func:`build_fused_recurrent`."""
    flags = fused_serving_flags(key)
    return flags["use_indices"] or flags["store_inter"]


def _fused_bucket(key: dict) -> str:
    return f"K{key['K']}_V{key['V']}_{key['dtype']}"


def _fused_build(arch: str, key: dict, schedule: dict, *, target_arch=None, pass_configs=None):
    func = build_fused_recurrent(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], dtype=key["dtype"],
                                 gate_dtype=key.get("gate_dtype", "float32"), use_h0=bool(key.get("use_h0", True)),
                                 store_ht=bool(key.get("store_ht", True)), is_varlen=bool(key.get("is_varlen", False)),
                                 normalize_q=bool(key.get("normalize_q", True)), **fused_serving_flags(key),
                                 block_v=schedule["block_v"], threads=schedule["threads"], block_t=schedule["block_t"])
    return compile_kernel(func, arch, target_arch=target_arch, pass_configs=pass_configs)


def _launchers():
    """:mod:`kla_tl.recurrent` (launchers and GPU bench cases; imported on use, it imports torch)."""
    import importlib

    return importlib.import_module("kla_tl.recurrent")


def _decode_key(H, HV, K, V, dtype="bfloat16", state_dtype="float32", **flags):
    return {"H": H, "HV": HV, "K": K, "V": V, "dtype": dtype, "gate_dtype": "float32", "state_dtype": state_dtype,
            "use_indices": True, "normalize_q": True, **flags}


def _fused_key(H, HV, K, V, dtype="bfloat16", **flags):
    return {"H": H, "HV": HV, "K": K, "V": V, "dtype": dtype, "gate_dtype": "float32", "use_h0": True,
            "store_ht": True, "is_varlen": False, "normalize_q": True, **flags}


DECODE_SPEC = register(KernelSpec(
    name="decode",
    space=DECODE_SPACE,
    default=_decode_default,
    bucket=_decode_bucket,
    build=_decode_build,
    example_keys=[
        _decode_key(32, 32, 128, 128),                              #: serving shape (Qwen3-Next-like heads)
        _decode_key(16, 32, 128, 128, state_dtype="bfloat16"),      #: GVA + bf16 pool
        _decode_key(12, 12, 96, 192),                               #: published KLA 0.4B model
        _decode_key(4, 4, 256, 256),                                #: largest head dims
    ],
    valid=_decode_valid,
    bench=lambda arch, key: _launchers().decode_bench_cases(key),
))

FUSED_RECURRENT_SPEC = register(KernelSpec(
    name="fused_recurrent",
    space=FUSED_RECURRENT_SPACE,
    default=_fused_default,
    bucket=_fused_bucket,
    build=_fused_build,
    example_keys=[
        _fused_key(32, 32, 128, 128),
        _fused_key(16, 32, 128, 128, is_varlen=True),
        _fused_key(12, 12, 96, 192),
        #: speculative-decoding verify: fp32 pool read through state_indices (left untouched), per-token states
        _fused_key(16, 32, 128, 128, is_varlen=True, use_indices=True, store_inter=True),
        #: serving with a bf16 pool updated in place, bf16 per-token states
        _fused_key(16, 32, 128, 128, is_varlen=True, state_dtype="bfloat16", use_indices=True, is_inplace=True,
                   store_inter=True, inter_dtype="bfloat16"),
    ],
    valid=_fused_valid,
    bench=lambda arch, key: _launchers().fused_bench_cases(key),
))

__all__ = ["ARCHS", "DECODE_CANDIDATES", "DECODE_SPACE", "FUSED_RECURRENT_SPACE", "DECODE_SPEC", "FUSED_RECURRENT_SPEC",
           "Layout", "build_decode", "build_fused_recurrent", "compile_kernel", "fused_is_serving",
           "fused_serving_flags", "lane_layout", "min_blocks"]
