"""TileLang builders of the token-by-token KLA kernels: ``decode`` (one token per row on a state pool, in place) and
``fused_recurrent`` (a short sequence per row with the state kept in registers).

Per value head and token (KLA.md sections 2 and 7)::

    D = ||k||^2 + eps,  beta = eta / D            (fp32, from raw k)
    S <- exp(g) S;  e = v - k S;  S <- S + beta k^T e;  o = scale * q^ S

Inputs and outputs (axis letters of :mod:`kla_tl.conventions`):

- decode: q, k ``[B, 1, H, K]``; v ``[B, 1, HV, V]``; g, eta ``[B, 1, HV]``; state pool ``[N_slots, HV, K, V]`` (fp32
  or bf16, updated in place); optional int32 ``state_indices [B]`` (-1 = padding row); o ``[B, 1, HV, V]``.
- fused_recurrent: q, k ``[B, T, H, K]``; v, o ``[B, T, HV, V]``; g, eta ``[B, T, HV]``; fp32 ``h0``/``ht``
  ``[N, HV, K, V]``; int32 ``cu_seqlens [N + 1]`` when varlen (B == 1).

Grid: ``(rows, HV, V / block_v)`` (rows on x, which allows up to 2^31 - 1 of them); one CTA owns a
``K x block_v`` state tile of one (row, value head) and keeps it in registers. Within the CTA, warp ``w`` owns
``L * vec`` consecutive columns; ``L`` lanes share a state row and each lane holds ``vec`` columns (one 128-bit
access: 4 fp32 or 8 bf16), so a warp touches ``32 / L`` rows per pass and ``K / (32 / L)`` passes cover the tile.
Reductions over K (``k S``, ``q S``, ``||k||^2``, ``||q||^2``) are warp shuffles across lanes of equal ``lane % L``:
no shared memory, no block barrier. The state is read and written once per call (decode) or per sequence
(fused_recurrent); fused_recurrent stages ``block_t`` tokens of q/k/v/g/eta in shared memory at a time so that their
load latency is paid once per block of tokens. decode issues the q/k/v/g/eta loads before the slot index arrives,
so only the state load waits on it.

Schedule knobs: ``block_v`` (columns per CTA; smaller = more CTAs for small batches), ``threads`` (warps per CTA) and,
for fused_recurrent, ``block_t`` (tokens staged per shared-memory refill). There is no ``num_stages``: nothing here
is a pipelined tile copy. One builder source serves both architectures; the Ampere path (``sm_80``, or ``sm_90a``
with the pass configs of :func:`kla_tl.kernels.registry.target_for`) compiles the same SIMT code.

Index arithmetic: TileLang 0.1.15 emits 64-bit offsets for these dynamic-shape buffers (checked in the generated
source: ``(int64_t)slot * HV*K*V``), so pools past 2^31 elements are addressed correctly.
"""

import functools

import tilelang
import tilelang.language as T

from .registry import ARCHS, KernelSpec, register, target_for

#: Threads per warp (CUDA).
WARP = 32
#: Bytes per lane per state row: one 128-bit load/store (LDG.128 / STG.128).
VEC_BYTES = 16
#: Upper bound on fp32 state values held per thread (K * L * vec / 32): past ~128 the tile plus q/k rows, v and
#: accumulators approach the 255-register limit and ptxas starts spilling.
MAX_STATE_REGS = 128
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
    #: columns per CTA; must divide V. 16 doubles the CTA count of 32 for B = 1; 64/128 cut per-CTA overhead at
    #: large B. Values that give a lane layout with L not a power of two are pruned by `valid`.
    "block_v": (16, 32, 64, 128),
    #: threads per CTA (1 to 8 warps); each warp owns block_v / warps columns.
    "threads": (32, 64, 128, 256),
}

FUSED_RECURRENT_SPACE = {
    "block_v": (16, 32, 64, 128),
    "threads": (32, 64, 128, 256),
    #: tokens staged in shared memory per refill: 8 suits spec-decode verify (T <= 8), 32 amortizes the load
    #: latency over more tokens for T near 64.
    "block_t": (8, 16, 32),
}


def lane_layout(K: int, block_v: int, threads: int, state_bytes: int):
    """Lane layout ``(vec, L, rows_per_pass, passes)`` of a ``K x block_v`` tile, or None when it does not exist.

    ``vec`` columns per lane (one 128-bit access), ``L`` lanes per state row (a power of two dividing 32),
    ``rows_per_pass = 32 / L`` rows per warp pass and ``passes = K / rows_per_pass``.
    """
    if threads % WARP or threads <= 0:
        return None
    vec = VEC_BYTES // state_bytes
    warps = threads // WARP
    if block_v % (warps * vec):
        return None
    L = block_v // (warps * vec)
    if L < 1 or L > WARP or (L & (L - 1)):
        return None
    rows = WARP // L
    if K % rows:
        return None
    return vec, L, rows, K // rows


def _layout_ok(K: int, V: int, block_v: int, threads: int, state_bytes: int) -> bool:
    lay = lane_layout(K, block_v, threads, state_bytes)
    if lay is None or V % block_v:
        return False
    vec, _, _, passes = lay
    return passes * vec <= MAX_STATE_REGS


def _make_step(passes: int, vec: int, L: int, normalize_q: bool):
    """The KLA update of one token on one lane's state fragment, as a T.macro (shared by both kernels).

    Lane buffers: ``s[passes, vec]`` fp32 state, ``kr``/``qr[passes]`` its rows of k and q, ``vr[vec]`` its
    columns of v (replaced by the output o on return), ``acc[vec]`` scratch.
    """
    # xor distances that combine the lanes owning the same columns but different rows
    offsets = tuple(L << i for i in range((WARP // L).bit_length() - 1))

    @T.macro
    def step(s, kr, qr, vr, acc, g_val, eta_val, scale, eps):
        ksq = T.alloc_var("float32")
        qsq = T.alloc_var("float32")
        ksq = 0.0
        qsq = 0.0
        for p in T.unroll(passes):
            ksq += kr[p] * kr[p]
            if normalize_q:
                qsq += qr[p] * qr[p]
        for j in T.unroll(vec):
            acc[j] = 0.0
        for p in T.unroll(passes):
            for j in T.unroll(vec):
                acc[j] += kr[p] * s[p, j]
        for d in offsets:
            ksq += T.shfl_xor(ksq, d)
            if normalize_q:
                qsq += T.shfl_xor(qsq, d)
            for j in T.unroll(vec):
                acc[j] += T.shfl_xor(acc[j], d)
        # alpha = exp(g); beta = eta / (||k||^2 + eps); acc <- beta (v - k exp(g) S)
        alpha = T.exp(g_val)
        beta = eta_val / (ksq + eps)
        for j in T.unroll(vec):
            acc[j] = beta * (vr[j] - alpha * acc[j])
        # S <- exp(g) S + k^T beta e
        for p in T.unroll(passes):
            for j in T.unroll(vec):
                s[p, j] = alpha * s[p, j] + kr[p] * acc[j]
        # o = scale * q^ S
        for j in T.unroll(vec):
            vr[j] = 0.0
        for p in T.unroll(passes):
            for j in T.unroll(vec):
                vr[j] += qr[p] * s[p, j]
        for d in offsets:
            for j in T.unroll(vec):
                vr[j] += T.shfl_xor(vr[j], d)
        if normalize_q:
            qs = scale * T.rsqrt(qsq + QNORM_EPS)
            for j in T.unroll(vec):
                vr[j] = vr[j] * qs
        else:
            for j in T.unroll(vec):
                vr[j] = vr[j] * scale

    return step


@functools.lru_cache(maxsize=128)
def build_decode(*, H: int, HV: int, K: int, V: int, dtype: str, gate_dtype: str, state_dtype: str,  # problem
                 use_indices: bool, normalize_q: bool,                                                 # flags
                 block_v: int, threads: int):                                                          # schedule
    """Prim_func of one decode step on a state pool (B and N_slots dynamic: one compile serves every batch).

    Signature: ``(q, k, v, g, eta, state, [state_indices,] o, scale, eps)``; ``state_indices`` only when
    ``use_indices`` (else row b uses slot b). A row whose index is negative writes zeros to o and leaves the pool
    alone. ``scale`` and ``eps`` are fp32 runtime scalars.
    """
    assert dtype in QKV_DTYPES and gate_dtype in GATE_DTYPES and state_dtype in POOL_DTYPES, (dtype, gate_dtype,
                                                                                              state_dtype)
    assert HV % H == 0, (H, HV)
    assert _layout_ok(K, V, block_v, threads, DTYPE_BYTES[state_dtype]), (K, V, block_v, threads, state_dtype)
    vec, L, rows, passes = lane_layout(K, block_v, threads, DTYPE_BYTES[state_dtype])
    G = HV // H
    step = _make_step(passes, vec, L, normalize_q)
    B, NS = T.dynamic("B, N_slots")

    @T.macro
    def body(q, k, v, g, eta, state, o, slot, scale, eps):
        with T.Kernel(B, HV, V // block_v, threads=threads) as (b, hv, bv):
            tx = T.get_thread_binding()
            lane = tx % WARP
            r0 = lane // L                                                   # first state row of this lane
            c0 = bv * block_v + (tx // WARP) * (L * vec) + (lane % L) * vec  # first column of this lane
            hq = hv // G                                                     # GVA: q/k head of value head hv
            s = T.alloc_local([passes, vec], "float32")
            kr = T.alloc_local([passes], "float32")
            qr = T.alloc_local([passes], "float32")
            vr = T.alloc_local([vec], "float32")
            acc = T.alloc_local([vec], "float32")
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
                        s[p, j] = T.cast(state[sl, hv, p * rows + r0, c0 + j], "float32")
                step(s, kr, qr, vr, acc, g_val, eta_val, scale, eps)
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        state[sl, hv, p * rows + r0, c0 + j] = T.cast(s[p, j], state_dtype)
                if r0 == 0:
                    for j in T.vectorized(vec):
                        o[b, 0, hv, c0 + j] = T.cast(vr[j], dtype)
            else:
                # padding row: zeros out, the pool is neither read nor written
                if r0 == 0:
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
                          block_v: int, threads: int, block_t: int):                          # schedule
    """Prim_func of the fused recurrence over short sequences (B, T and the state/cu_seqlens lengths dynamic).

    Signature: ``(q, k, v, g, eta, h0, ht, cu_seqlens, o, scale, eps)``. ``h0``/``ht`` are fp32
    ``[N, HV, K, V]`` and ``cu_seqlens`` int32 ``[N + 1]``; when a flag says a tensor is unused the launcher passes
    a small placeholder (never read or written). Dense: grid row n is batch row n over tokens [0, T). Varlen (B == 1):
    grid row n covers tokens [cu_seqlens[n], cu_seqlens[n+1]); an empty sequence stores h0 (or zeros) to ht.
    """
    assert dtype in QKV_DTYPES and gate_dtype in GATE_DTYPES, (dtype, gate_dtype)
    assert HV % H == 0, (H, HV)
    assert _layout_ok(K, V, block_v, threads, DTYPE_BYTES["float32"]), (K, V, block_v, threads)
    assert block_t >= 1, block_t
    vec, L, rows, passes = lane_layout(K, block_v, threads, DTYPE_BYTES["float32"])
    G = HV // H
    step = _make_step(passes, vec, L, normalize_q)
    B, TT, NH, NT, NC = T.dynamic("B, T, N_h0, N_ht, N_cu")
    rows_grid = NC - 1 if is_varlen else B

    @T.prim_func
    def fused_recurrent_kla(q: T.Tensor([B, TT, H, K], dtype), k: T.Tensor([B, TT, H, K], dtype),
                            v: T.Tensor([B, TT, HV, V], dtype), g: T.Tensor([B, TT, HV], gate_dtype),
                            eta: T.Tensor([B, TT, HV], gate_dtype), h0: T.Tensor([NH, HV, K, V], "float32"),
                            ht: T.Tensor([NT, HV, K, V], "float32"), cu_seqlens: T.Tensor([NC], "int32"),
                            o: T.Tensor([B, TT, HV, V], dtype), scale: T.float32, eps: T.float32):
        with T.Kernel(rows_grid, HV, V // block_v, threads=threads) as (n, hv, bv):
            tx = T.get_thread_binding()
            lane = tx % WARP
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
            if use_h0:
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
                    step(s, kr, qr, vr, acc, g_s[tt], e_s[tt], scale, eps)
                    if r0 == 0:
                        for j in T.vectorized(vec):
                            o[bb, t0 + tt, hv, c0 + j] = T.cast(vr[j], dtype)
            if store_ht:
                for p in T.unroll(passes):
                    for j in T.vectorized(vec):
                        ht[n, hv, p * rows + r0, c0 + j] = s[p, j]

    return fused_recurrent_kla


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
# Kernel specs (tuning space, defaults, buckets) for the registry


#: State values per thread the default schedule aims to stay under (K = 256 with a bf16 pool at L = 2 holds 128 and
#: ptxas then needs all 255 registers).
DEFAULT_STATE_REGS = 64


def _decode_default(arch: str, key: dict) -> dict:
    """32 columns per CTA: HV * V / 32 CTAs at B = 1 (128 for HV = 32, V = 128: one wave on 132 SMs).

    fp32 pool: 4 warps, L = 2 lanes per row (a full 32-byte sector per row and warp; K/4 state values per thread).
    bf16 pool: 2 warps, L = 2 (8 bf16 per lane); when that holds more than DEFAULT_STATE_REGS values per thread
    (K = 256), 4 warps with L = 1. Same on sm_80 and sm_90a: the kernel is SIMT code without arch-specific
    instructions. Falls back to the first valid member of the space."""
    sb = DTYPE_BYTES[key.get("state_dtype", "float32")]
    K, V = key["K"], key["V"]
    prefs = [{"block_v": 32, "threads": 128}] if sb == 4 else [{"block_v": 32, "threads": 64},
                                                               {"block_v": 32, "threads": 128}]
    ok = [p for p in prefs if _layout_ok(K, V, p["block_v"], p["threads"], sb)]
    for p in ok:
        vec, _, _, passes = lane_layout(K, p["block_v"], p["threads"], sb)
        if passes * vec <= DEFAULT_STATE_REGS:
            return p
    if ok:
        return ok[0]
    for bv in DECODE_SPACE["block_v"]:
        for th in DECODE_SPACE["threads"]:
            if _layout_ok(key["K"], key["V"], bv, th, sb):
                return {"block_v": bv, "threads": th}
    raise ValueError(f"decode: no valid schedule for key {key}")


def _decode_valid(arch: str, key: dict, sch: dict) -> bool:
    return _layout_ok(key["K"], key["V"], sch["block_v"], sch["threads"],
                      DTYPE_BYTES[key.get("state_dtype", "float32")])


def _decode_bucket(key: dict) -> str:
    return f"K{key['K']}_V{key['V']}_{key.get('state_dtype', 'float32')}"


def _decode_build(arch: str, key: dict, schedule: dict, *, target_arch=None, pass_configs=None):
    func = build_decode(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], dtype=key["dtype"],
                        gate_dtype=key.get("gate_dtype", "float32"), state_dtype=key.get("state_dtype", "float32"),
                        use_indices=bool(key.get("use_indices", True)), normalize_q=bool(key.get("normalize_q", True)),
                        block_v=schedule["block_v"], threads=schedule["threads"])
    return compile_kernel(func, arch, target_arch=target_arch, pass_configs=pass_configs)


def _fused_default(arch: str, key: dict) -> dict:
    """32 columns x 4 warps as decode's fp32 default; 16 staged tokens (covers spec-decode T <= 16 in one refill,
    four refills at T = 64)."""
    d = _decode_default(arch, {**key, "state_dtype": "float32"})
    return {**d, "block_t": 16}


def _fused_valid(arch: str, key: dict, sch: dict) -> bool:
    if not _layout_ok(key["K"], key["V"], sch["block_v"], sch["threads"], 4):
        return False
    smem = sch["block_t"] * (2 * key["K"] + sch["block_v"]) * DTYPE_BYTES[key["dtype"]] + 8 * sch["block_t"]
    return smem <= 48 * 1024  #: static shared-memory limit per CTA without opt-in


def _fused_bucket(key: dict) -> str:
    return f"K{key['K']}_V{key['V']}_{key['dtype']}"


def _fused_build(arch: str, key: dict, schedule: dict, *, target_arch=None, pass_configs=None):
    func = build_fused_recurrent(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], dtype=key["dtype"],
                                 gate_dtype=key.get("gate_dtype", "float32"), use_h0=bool(key.get("use_h0", True)),
                                 store_ht=bool(key.get("store_ht", True)), is_varlen=bool(key.get("is_varlen", False)),
                                 normalize_q=bool(key.get("normalize_q", True)), block_v=schedule["block_v"],
                                 threads=schedule["threads"], block_t=schedule["block_t"])
    return compile_kernel(func, arch, target_arch=target_arch, pass_configs=pass_configs)


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
    ],
    valid=_fused_valid,
))

__all__ = ["ARCHS", "DECODE_SPACE", "FUSED_RECURRENT_SPACE", "DECODE_SPEC", "FUSED_RECURRENT_SPEC", "build_decode",
           "build_fused_recurrent", "compile_kernel", "lane_layout"]
