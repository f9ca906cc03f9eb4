"""Orchestration of the token-by-token kernels: ``kla_decode`` (one token on a state pool) and
``fused_recurrent_kla`` (short sequences). Kernel builders live in :mod:`kla_tl.kernels.recurrent`.

Each entry has a *refusal* (None when the TileLang kernel serves the call, else the reason the public API falls back
to the reference) and a *launcher*. Launchers compile once per problem key (the first call costs a TileLang compile,
or a disk-cache load) and keep the compiled executable in a process-wide table, so a later call does only: a table
lookup, layout checks on the tensors, and one kernel launch on the current CUDA stream. ``kla_decode`` with ``out=``
allocates nothing and never synchronizes with the host, so it can be captured in a CUDA graph.

Code path: the device's own arch (``sm_90a`` on Hopper, ``sm_80`` on Ampere), chosen by
:func:`kla_tl.dispatch.arch_of`. The environment variable ``KLA_TL_ARCH=sm_80`` forces the Ampere path; on a Hopper
GPU it is built as ``sm_90a`` code with warp specialization, wgmma and TMA disabled
(:func:`kla_tl.kernels.registry.target_for`), which is how the Ampere path is tested and timed on an H100.
``KLA_TL_ARCH=sm_90a`` on a non-Hopper GPU raises. The variable is read at every call (it selects a cached kernel).

Schedules come from ``kla_tl.schedules.lookup`` when that module exists (per-GPU tuned JSON), else from the kernel
spec's default; a schedule that is not valid for the problem is replaced by the default with a warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

import torch

from . import dispatch
from .conventions import DEFAULT_EPS, Problem

#: Environment variable forcing a code path: ``sm_80`` (Ampere path, also on Hopper) or ``sm_90a``.
ARCH_ENV = "KLA_TL_ARCH"

#: os.environ's backing dict and the encoded key of ARCH_ENV (CPython keeps it in sync with os.environ): reading it
#: costs ~0.05 us where os.environ.get of a missing key costs ~1 us (a caught KeyError), on every decode call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ARCH_ENV) if hasattr(os.environ, "encodekey") else None


def _arch_env() -> Optional[str]:
    """The value of KLA_TL_ARCH, or None when unset or empty."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return os.environ.decodevalue(raw) if raw else None
    return os.environ.get(ARCH_ENV) or None


#: torch dtype -> TileLang dtype string, for the dtypes the kernels read directly.
_TL = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: Pool dtypes the decode kernel updates in place.
_POOL_DTYPES = (torch.float32, torch.bfloat16)

#: (kernel, device index, problem fields, arch env) -> _Launch
_CACHE: dict = {}
#: kla_decode fast path: (device, dtypes, sizes, flags, KLA_TL_ARCH) -> (executable, packed strides)
_DECODE_PLANS: dict = {}
#: (device index, HV, K, V) -> placeholder tensors for unused kernel parameters
_PLACEHOLDERS: dict = {}


def _dt(x: torch.dtype) -> str:
    return str(x).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------ refusals


def decode_refusal(prob: Problem, device: torch.device, state: torch.Tensor) -> Optional[str]:
    """Why the TileLang decode kernel cannot serve this call (None = it can)."""
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    if state.dtype not in _POOL_DTYPES:
        return f"state pool dtype {_dt(state.dtype)} (the decode kernel updates float32 or bfloat16 pools)"
    return _no_schedule("decode", prob, state_dtype=_TL[state.dtype], split_k=True)


def recurrent_refusal(prob: Problem, device: torch.device, *, needs_grad: bool,
                      pool_dtype: Optional[torch.dtype] = None,
                      inter_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why the TileLang fused recurrent kernel cannot serve this call (None = it can). ``pool_dtype``: dtype of the
    initial_state pool (with state_indices); ``inter_dtype``: dtype of intermediate_states (None = not given)."""
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    if needs_grad:
        return "fused_recurrent_kla has no backward kernel; use chunk_kla for training"
    if pool_dtype is not None and pool_dtype not in _POOL_DTYPES:
        return (f"initial_state pool dtype {_dt(pool_dtype)} (the fused recurrent kernel reads float32 or bfloat16 "
                f"pools)")
    if inter_dtype is not None and inter_dtype not in _POOL_DTYPES:
        return (f"intermediate_states dtype {_dt(inter_dtype)} (the fused recurrent kernel writes float32 or "
                f"bfloat16 states)")
    return _no_schedule("fused_recurrent", prob, state_dtype="float32", split_k=False)


def _no_schedule(name: str, prob: Problem, state_dtype: str, split_k: bool) -> Optional[str]:
    if _has_layout(prob.K, prob.V, state_dtype, split_k):
        return None
    return f"no {name} schedule fits K={prob.K}, V={prob.V} with a {state_dtype} state"


@functools.lru_cache(maxsize=None)
def _has_layout(K: int, V: int, state_dtype: str, split_k: bool) -> bool:
    """Whether any (block_v, threads[, warps_k when ``split_k``]) of the decode space has a lane layout for (K, V)
    (cached: refusals run on every call)."""
    from .kernels.recurrent import DECODE_SPACE, DTYPE_BYTES, _layout_ok

    sb = DTYPE_BYTES[state_dtype]
    return any(_layout_ok(K, V, bv, th, sb, wk) for bv in DECODE_SPACE["block_v"] for th in DECODE_SPACE["threads"]
               for wk in (DECODE_SPACE["warps_k"] if split_k else (1,)))


# ------------------------------------------------------------------------------------------------- kernel choice


def _code_path(device: torch.device, env: Optional[str]):
    """(arch, target_arch, pass_configs) of the code path for ``device`` under ``KLA_TL_ARCH=env``."""
    from .kernels.registry import target_for

    native = dispatch.arch_of(device)
    if not env:
        return native, None, None
    if env == "sm_80":
        target, configs = target_for("sm_80", run_on_hopper=(native == "sm_90a"))
        return "sm_80", target["arch"], configs
    if env == "sm_90a":
        if native != "sm_90a":
            raise ValueError(f"{ARCH_ENV}=sm_90a needs a Hopper GPU (compute capability 9.x); "
                             f"{torch.cuda.get_device_name(device)} runs the sm_80 path")
        return native, None, None
    raise ValueError(f"{ARCH_ENV}={env!r}: expected 'sm_80' (Ampere path, also on Hopper) or 'sm_90a', or unset")


def _schedule(name: str, spec, device: torch.device, key: dict, arch: str) -> tuple:
    """(schedule, source): tuned (kla_tl.schedules) when available and valid, else the spec default."""
    default = spec.default(arch, key)
    try:
        schedules = importlib.import_module("kla_tl.schedules")
    except ModuleNotFoundError as e:
        if e.name not in ("kla_tl.schedules",):
            raise
        return default, "built-in default (kla_tl.schedules not available)"
    lookup = getattr(schedules, "lookup", None)
    if lookup is None:
        return default, "built-in default (kla_tl.schedules has no lookup)"
    try:
        sch, source = lookup(name, device, key, arch=arch)
    except TypeError:
        sch, source = lookup(name, device, key)
    if set(sch) != set(spec.space) or not spec.valid(arch, key, sch):
        warnings.warn(f"kla_tl.{name}: schedule {sch} from {source} does not fit {key}; using the default "
                      f"{default}", RuntimeWarning, stacklevel=4)
        return default, "built-in default (tuned schedule invalid)"
    return sch, source


class _Launch:
    """A compiled kernel ready to launch: the raw TVM-FFI executable (all parameters positional)."""

    __slots__ = ("fn", "kernel", "schedule", "source", "arch", "key")

    def __init__(self, kernel, schedule, source, arch, key):
        self.kernel = kernel
        get_exec = getattr(getattr(kernel, "adapter", None), "_get_executable", None)
        # Calling the executable directly skips TileLang's per-call Python argument marshalling (same host code).
        self.fn = get_exec() if get_exec is not None else kernel
        self.schedule, self.source, self.arch, self.key = schedule, source, arch, key


def _launch_for(name: str, device: torch.device, key: dict) -> _Launch:
    env = _arch_env()
    ck = (name, device.index, tuple(sorted(key.items())), env)
    hit = _CACHE.get(ck)
    if hit is not None:
        return hit
    from .kernels.recurrent import DECODE_SPEC, FUSED_RECURRENT_SPEC

    spec = DECODE_SPEC if name == "decode" else FUSED_RECURRENT_SPEC
    arch, target_arch, configs = _code_path(device, env)
    sch, source = _schedule(name, spec, device, key, arch)
    kernel = spec.build(arch, key, sch, target_arch=target_arch, pass_configs=configs)
    hit = _CACHE[ck] = _Launch(kernel, sch, source, arch if target_arch is None else f"{arch} on {target_arch}", key)
    return hit


def decode_key(prob: Problem, *, dtype: torch.dtype, gate_dtype: torch.dtype, state_dtype: torch.dtype,
               use_indices: bool, normalize_q: bool) -> dict:
    """Problem key of the decode kernel (what one compiled kernel is specialised on; B is dynamic)."""
    return {"H": prob.H, "HV": prob.HV, "K": prob.K, "V": prob.V, "dtype": _TL[dtype], "gate_dtype": _TL[gate_dtype],
            "state_dtype": _TL[state_dtype], "use_indices": bool(use_indices), "normalize_q": bool(normalize_q)}


def fused_key(prob: Problem, *, dtype: torch.dtype, gate_dtype: torch.dtype, use_h0: bool, store_ht: bool,
              normalize_q: bool, state_dtype: torch.dtype = torch.float32, use_indices: bool = False,
              is_inplace: bool = False, store_inter: bool = False,
              inter_dtype: torch.dtype = torch.float32) -> dict:
    """Problem key of the fused recurrent kernel (B, T and the number of sequences are dynamic). The serving flags
    (pool dtype, state_indices, in-place final state, per-token states) appear only when one is on, so the keys of
    plain calls are those of earlier releases."""
    key = {"H": prob.H, "HV": prob.HV, "K": prob.K, "V": prob.V, "dtype": _TL[dtype], "gate_dtype": _TL[gate_dtype],
           "use_h0": bool(use_h0), "store_ht": bool(store_ht), "is_varlen": bool(prob.is_varlen),
           "normalize_q": bool(normalize_q)}
    if use_indices or store_inter:
        key.update(state_dtype=_TL[state_dtype], use_indices=bool(use_indices), is_inplace=bool(is_inplace),
                   store_inter=bool(store_inter), inter_dtype=_TL[inter_dtype])
    return key


def kernel_info(name: str, device: torch.device, key: dict) -> dict:
    """Schedule, its source and the code path the launcher uses for ``key`` (compiles on first use)."""
    lh = _launch_for(name, torch.device(device), key)
    return {"kernel": name, "schedule": dict(lh.schedule), "source": lh.source, "arch": lh.arch, "key": dict(key)}


# ------------------------------------------------------------------------------------------------ tensor layouts


def _packed_strides(shape) -> tuple:
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))


def _fit(x: torch.Tensor, st: tuple, align: int = 16, copy_ok: bool = True) -> Optional[torch.Tensor]:
    """``x`` with exactly the packed (row-major) strides ``st`` and an ``align``-byte aligned start, as the kernels
    require (TileLang's host code checks every stride, size-1 dims included; 128-bit vector accesses need 16 bytes,
    scalar reads only their element size: pass ``align=1``).

    Returns ``x`` itself when it already is (the fast path: two attribute reads); a same-memory view when only
    strides of size-1 dims differ; a packed copy otherwise (or None when ``copy_ok`` is False).
    """
    if x.stride() == st and x.data_ptr() % align == 0:
        return x
    if x.is_contiguous() and x.data_ptr() % align == 0:
        return x.as_strided(x.shape, st)
    if not copy_ok:
        return None
    return x.clone(memory_format=torch.contiguous_format)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """:func:`_fit` with the packed strides of ``x``'s own shape and 16-byte alignment."""
    return _fit(x, _packed_strides(x.shape))


def _gates(g: torch.Tensor, eta: torch.Tensor):
    """g and eta in one dtype the kernel reads (float32 unless both already share bf16/fp16/fp32)."""
    if g.dtype == eta.dtype and g.dtype in _TL:
        return g, eta
    return g.float(), eta.float()


def _placeholders(device: torch.device, HV: int, K: int, V: int):
    """(state placeholder [1, HV, K, V] fp32, cu_seqlens placeholder [2] int32): passed for parameters a kernel
    variant never touches (no initial state, no final state, dense rows)."""
    ck = (device.index, HV, K, V)
    hit = _PLACEHOLDERS.get(ck)
    if hit is None:
        hit = _PLACEHOLDERS[ck] = (torch.zeros(1, HV, K, V, dtype=torch.float32, device=device),
                                   torch.zeros(2, dtype=torch.int32, device=device))
    return hit


# ------------------------------------------------------------------------------------------------------ launchers


def kla_decode_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor,
                      state: torch.Tensor, *, prob: Problem, state_indices: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch one decode step (inputs validated by :func:`kla_tl.conventions.check_decode_inputs`).

    The pool ``state`` is updated in place and must be contiguous and 16-byte aligned (``ValueError`` otherwise).
    q/k/v/g/eta that are not packed are copied (caller tensors are never modified); g/eta are read in their own
    dtype when they share float32/bfloat16/float16, else converted to float32. With a contiguous ``out`` and
    packed inputs the call allocates nothing (CUDA-graph capturable); a non-contiguous ``out`` is filled by a copy.
    """
    if g.dtype is not eta.dtype or g.dtype not in _TL:
        g, eta = _gates(g, eta)
    use_idx = state_indices is not None
    fk = (q.device, q.dtype, g.dtype, state.dtype, prob.H, prob.HV, prob.K, prob.V, use_idx, normalize_q,
          _arch_env())
    plan = _DECODE_PLANS.get(fk)
    if plan is None:
        plan = _DECODE_PLANS[fk] = _decode_plan(prob, q, g, state, use_idx, normalize_q)
    fn, qk_st, vo_st, gate_st, pool_st, default_scale = plan
    sc = default_scale if scale is None else float(scale)
    # fast path (the serving loop): everything packed, v/o/pool 16-byte aligned, a batch to run -> one launch
    if (out is not None and prob.B > 0 and state.stride() == pool_st and out.stride() == vo_st
            and v.stride() == vo_st and q.stride() == qk_st and k.stride() == qk_st and g.stride() == gate_st
            and eta.stride() == gate_st and not (state.data_ptr() | out.data_ptr() | v.data_ptr()) & 15):
        if not use_idx:
            fn(q, k, v, g, eta, state, out, sc, float(eps))
            return out
        if state_indices.stride() == (1,):
            fn(q, k, v, g, eta, state, state_indices, out, sc, float(eps))
            return out
    pool = _fit(state, pool_st, copy_ok=False)
    if pool is None:
        raise ValueError(f"kla_decode: state must be contiguous and 16-byte aligned (the pool is updated in place), "
                         f"got shape {tuple(state.shape)}, strides {tuple(state.stride())}")
    o_view = None if out is None else _fit(out, vo_st, copy_ok=False)
    dst = o_view if o_view is not None else torch.empty((prob.B, 1, prob.HV, prob.V), dtype=q.dtype, device=q.device)
    if prob.B > 0:
        # q, k, g, eta and the indices are read as scalars; v, o and the pool with 128-bit (v, o: 64-bit+) accesses
        if use_idx:
            fn(_fit(q, qk_st, 1), _fit(k, qk_st, 1), _fit(v, vo_st), _fit(g, gate_st, 1), _fit(eta, gate_st, 1),
               pool, _fit(state_indices, (1,), 1), dst, sc, float(eps))
        else:
            fn(_fit(q, qk_st, 1), _fit(k, qk_st, 1), _fit(v, vo_st), _fit(g, gate_st, 1), _fit(eta, gate_st, 1),
               pool, dst, sc, float(eps))
    if out is None:
        return dst
    if o_view is None:
        out.copy_(dst)
    return out


def _decode_plan(prob: Problem, q, g, state, use_idx: bool, normalize_q: bool) -> tuple:
    """(executable, packed strides of q/k, v/o, g/eta and the pool, default scale K^-1/2) for one decode problem;
    compiles on first use."""
    key = decode_key(prob, dtype=q.dtype, gate_dtype=g.dtype, state_dtype=state.dtype, use_indices=use_idx,
                     normalize_q=normalize_q)
    lh = _launch_for("decode", q.device, key)
    H, HV, K, V = prob.H, prob.HV, prob.K, prob.V
    return (lh.fn, (H * K, H * K, K, 1), (HV * V, HV * V, V, 1), (HV, HV, 1), (HV * K * V, K * V, V, 1),
            float(K ** -0.5))


def fused_recurrent_kla_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               eta: torch.Tensor, *, prob: Problem, cu: Optional[list] = None,
                               scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
                               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                               cu_seqlens: Optional[torch.Tensor] = None,
                               state_indices: Optional[torch.Tensor] = None, inplace_final_state: bool = False,
                               intermediate_states: Optional[torch.Tensor] = None):
    """Launch the fused recurrence (inputs validated by :func:`kla_tl.conventions.check_recurrent_inputs`).

    Returns ``(o, final_state)`` like :func:`kla_tl.naive_kla`: o ``[B, T, HV, V]`` in q's dtype, final state
    ``[N, HV, K, V]`` float32 or None. Without ``state_indices``, ``initial_state`` of any float dtype is read as
    float32 (converted when it is not float32); empty varlen sequences give final state = initial state (or zeros).

    With ``state_indices``, ``initial_state`` is a float32/bfloat16 pool read in place (copied only when it is not
    packed and ``inplace_final_state`` is off) and, with ``inplace_final_state``, updated in place;
    ``intermediate_states`` is written in place. Buffers written in place must be contiguous and 16-byte aligned
    (``ValueError`` otherwise).
    """
    dev = q.device
    B, T, HV, K, V, N = prob.B, prob.T, prob.HV, prob.K, prob.V, prob.N
    use_idx = state_indices is not None
    o = torch.empty((B, T, HV, V), dtype=q.dtype, device=dev)
    final = torch.empty((N, HV, K, V), dtype=torch.float32, device=dev) if output_final_state else None
    h0 = None
    if use_idx:
        h0 = _fit(initial_state, _packed_strides(initial_state.shape), copy_ok=not inplace_final_state)
        if h0 is None:
            raise ValueError(f"fused_recurrent_kla: initial_state must be contiguous and 16-byte aligned with "
                             f"inplace_final_state=True (the pool is updated in place), got shape "
                             f"{tuple(initial_state.shape)}, strides {tuple(initial_state.stride())}")
    elif initial_state is not None:
        h0 = _packed(initial_state if initial_state.dtype == torch.float32 else initial_state.float())
    inter = None
    if intermediate_states is not None:
        inter = _fit(intermediate_states, _packed_strides(intermediate_states.shape), copy_ok=False)
        if inter is None:
            raise ValueError(f"fused_recurrent_kla: intermediate_states must be contiguous and 16-byte aligned (it "
                             f"is written in place), got strides {tuple(intermediate_states.stride())}")
    if N == 0:
        return o, final
    if B * T == 0:
        # no token anywhere: o is empty, the final state is the initial one (the pool and inter stay untouched)
        if final is not None and use_idx:
            if h0.shape[0] == 0:    # every sequence is padding
                final.zero_()
            else:
                live = (state_indices >= 0)[:, None, None, None]
                final.copy_(torch.where(live, h0[state_indices.clamp_min(0).long()].float(), 0.0))
        elif final is not None and h0 is not None:
            final.copy_(h0)
        elif final is not None:
            final.zero_()
        return o, final
    g, eta = _gates(g, eta)
    key = fused_key(prob, dtype=q.dtype, gate_dtype=g.dtype, use_h0=h0 is not None, store_ht=final is not None,
                    normalize_q=normalize_q, state_dtype=h0.dtype if use_idx else torch.float32,
                    use_indices=use_idx, is_inplace=use_idx and inplace_final_state, store_inter=inter is not None,
                    inter_dtype=inter.dtype if inter is not None else torch.float32)
    lh = _launch_for("fused_recurrent", dev, key)
    ph_state, ph_cu = _placeholders(dev, HV, K, V)
    cu32 = ph_cu
    if cu is not None:
        cu32 = _packed(cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32))
        if cu32.device != dev:
            cu32 = cu32.to(dev)
    sc = float(K ** -0.5 if scale is None else scale)
    args = (_packed(q), _packed(k), _packed(v), _packed(g), _packed(eta), h0 if h0 is not None else ph_state,
            final if final is not None else ph_state, cu32)
    if use_idx or inter is not None:
        # serving signature: ... cu_seqlens, state_indices, inter, o (placeholders where unused)
        idx = _fit(state_indices, (1,), 4) if use_idx else ph_cu
        lh.fn(*args, idx, inter if inter is not None else ph_state, o, sc, float(eps))
    else:
        lh.fn(*args, o, sc, float(eps))
    return o, final


# -------------------------------------------------------------------------------------------- autotune bench cases

#: Batch sizes ``kla-tl autotune`` times decode at (one case each; the schedule is shared by every B, and B >= 64
#: is where the state traffic, and so the schedule, matters; smaller batches are launch-bound).
BENCH_DECODE_BATCHES = (64, 256)
#: (sequences, tokens) fused_recurrent is timed at: spec-decode verify (T = 8) and a short sequence (T = 64).
BENCH_FUSED_SHAPES = ((64, 8), (16, 64))
#: Rows (sequences) of each bench case compared with the float64 reference (the first ones; rows are independent).
BENCH_CHECK_ROWS = 4
#: Norm-relative tolerances of the bench check: bf16 q/k/v with an fp32 state; a bf16 pool (tests/helpers.py TOL,
#: tests/test_recurrent_gpu.py POOL_BF16_TOL).
BENCH_TOL = {"float32": 5e-3, "bfloat16": 1e-2}


def _bench_tensors(key: dict, B: int, T: int, seed: int):
    """Random q, k, v, g, eta for ``key`` on the current CUDA device (fixed seed)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, key["dtype"])
    gdt = getattr(torch, key.get("gate_dtype", "float32"))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    H, HV, K, V = key["H"], key["HV"], key["K"], key["V"]
    q, k, v = randn(B, T, H, K).to(dt), randn(B, T, H, K).to(dt), randn(B, T, HV, V).to(dt)
    g = torch.nn.functional.logsigmoid(randn(B, T, HV) + 2.0).to(gdt)
    eta = torch.sigmoid(1.5 * randn(B, T, HV)).to(gdt)
    return q, k, v, g, eta, gen


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _executable(built):
    get_exec = getattr(getattr(built, "adapter", None), "_get_executable", None)
    return get_exec() if get_exec is not None else built


def decode_bench_cases(key: dict) -> list:
    """``KernelSpec.bench`` of decode: B = 64 and 256 rows on a pool of B slots in shuffled order (row 1 padding when
    ``key['use_indices']``); one input set holds B * HV * K * V state values (128 MB at B = 64, HV = 32, K = V = 128
    fp32), so the tuner's rotating sets exceed the 50 MB L2. The check restores the first BENCH_CHECK_ROWS rows'
    slots, relaunches the candidate (run updates the pool in place, and earlier candidates ran on it) and compares
    o and the new state with the float64 reference."""
    from .kernels.registry import BenchCase
    from .reference import kla_decode_reference

    use_idx = bool(key.get("use_indices", True))
    nq = bool(key.get("normalize_q", True))
    sdt = getattr(torch, key.get("state_dtype", "float32"))
    tol = BENCH_TOL[key.get("state_dtype", "float32")]

    def make_inputs(B, seed):
        q, k, v, g, eta, gen = _bench_tensors(key, B, 1, seed)
        pool = (0.1 * torch.randn(B, key["HV"], key["K"], key["V"], generator=gen, device="cuda")).to(sdt)
        idx = None
        if use_idx:
            idx = torch.randperm(B, generator=gen, device="cuda").to(torch.int32)
            idx[1] = -1
        rows = min(B, BENCH_CHECK_ROWS)
        slots = (idx[:rows] if use_idx else torch.arange(rows, device="cuda")).long()
        live = slots >= 0
        out = torch.empty(B, 1, key["HV"], key["V"], dtype=q.dtype, device="cuda")
        args = (q, k, v, g, eta, pool, idx, out) if use_idx else (q, k, v, g, eta, pool, out)
        return {"args": args, "scale": float(key["K"] ** -0.5), "rows": rows, "slots": slots[live],
                "live": live, "saved": pool[slots[live]].clone(), "built": None}

    def run(built, x):
        x["built"] = built
        _executable(built)(*x["args"], x["scale"], DEFAULT_EPS)
        return x["args"][-1]

    def check(x, _out):
        q, k, v, g, eta, pool = x["args"][:6]
        out, rows, slots, live = x["args"][-1], x["rows"], x["slots"], x["live"]
        pool[slots] = x["saved"]
        out.fill_(float("nan"))
        _executable(x["built"])(*x["args"], x["scale"], DEFAULT_EPS)
        torch.cuda.synchronize()
        ref_pool = x["saved"].double()
        o_ref = kla_decode_reference(*(t[:rows][live].double() for t in (q, k, v, g, eta)), ref_pool,
                                     scale=x["scale"], eps=DEFAULT_EPS, normalize_q=nq)
        errs = {"o": _rel_err(out[:rows][live], o_ref), "state": _rel_err(pool[slots], ref_pool)}
        bad = {n: e for n, e in errs.items() if not e <= tol}
        if not bool((out[:rows][~live] == 0).all()):
            bad["padding rows"] = "o not zero"
        return None if not bad else f"errors {bad} (tolerance {tol:g})"

    return [BenchCase(f"B={B}", functools.partial(make_inputs, B), run, check) for B in BENCH_DECODE_BATCHES]


def fused_bench_cases(key: dict) -> list:
    """``KernelSpec.bench`` of fused_recurrent: (N, T) in BENCH_FUSED_SHAPES, dense or varlen as the key says (varlen:
    one row of N sequences of T tokens); h0/ht as the key says. Plain keys: inputs are read-only and the outputs
    fresh, so the check compares the outputs of the timed launch (first BENCH_CHECK_ROWS sequences) with the float64
    reference. Serving keys (``use_indices`` / ``store_inter``): a pool of N + 2 slots in shuffled order with
    sequence 1 as padding, per-token states when the key stores them; the check restores the checked sequences'
    slots (an in-place pool was updated by the timed launches), relaunches, and also compares the per-token states,
    the updated slots, and the padding sequence's zeros."""
    from .kernels.recurrent import fused_is_serving, fused_serving_flags
    from .kernels.registry import BenchCase
    from .reference import fused_recurrent_kla_reference, naive_kla

    HV, K, V = key["HV"], key["K"], key["V"]
    use_h0, store_ht = bool(key.get("use_h0", True)), bool(key.get("store_ht", True))
    varlen, nq = bool(key.get("is_varlen", False)), bool(key.get("normalize_q", True))
    serving, flags = fused_is_serving(key), fused_serving_flags(key)
    use_idx, inplace = flags["use_indices"], flags["is_inplace"]
    tol = max(BENCH_TOL[flags["state_dtype"]], BENCH_TOL[flags["inter_dtype"]]) if serving else BENCH_TOL["float32"]

    def make_inputs(N, T, seed):
        B, TT = (1, N * T) if varlen else (N, T)
        q, k, v, g, eta, gen = _bench_tensors(key, B, TT, seed)
        ph_state, ph_cu = _placeholders(q.device, HV, K, V)
        h0 = 0.1 * torch.randn(N, HV, K, V, generator=gen, device="cuda") if use_h0 else ph_state
        ht = torch.empty(N, HV, K, V, device="cuda") if store_ht else ph_state
        cu = torch.arange(0, N * T + 1, T, dtype=torch.int32, device="cuda") if varlen else ph_cu
        o = torch.empty(B, TT, HV, V, dtype=q.dtype, device="cuda")
        x = {"scale": float(K ** -0.5), "N": N, "T": T, "built": None}
        if not serving:
            x["args"] = (q, k, v, g, eta, h0, ht, cu, o)
            return x
        idx = ph_cu
        if use_idx:
            pool = 0.1 * torch.randn(N + 2, HV, K, V, generator=gen, device="cuda")
            h0 = pool.to(getattr(torch, flags["state_dtype"]))
            idx = torch.randperm(N + 2, generator=gen, device="cuda")[:N].to(torch.int32)
            if N > 1:
                idx[1] = -1
            n = min(N, BENCH_CHECK_ROWS)
            x["saved"] = h0[idx[:n].clamp_min(0).long()].clone()
        inter = (torch.empty(B * TT, HV, K, V, dtype=getattr(torch, flags["inter_dtype"]), device="cuda")
                 if flags["store_inter"] else ph_state)
        x["args"] = (q, k, v, g, eta, h0, ht, cu, idx, inter, o)
        return x

    def run(built, x):
        x["built"] = built
        _executable(built)(*x["args"], x["scale"], DEFAULT_EPS)
        return x["args"][-1]

    def check_serving(x):
        q, k, v, g, eta, h0, ht, cu, idx, inter, o = x["args"]
        n, T = min(x["N"], BENCH_CHECK_ROWS), x["T"]
        if use_idx:
            live = idx[:n] >= 0
            slots = idx[:n][live].long()
            h0[slots] = x["saved"][live]              # undo the timed launches' in-place updates
            ref_pool = torch.zeros(n, HV, K, V, dtype=torch.float64, device="cuda")
            ref_pool[live] = x["saved"][live].double()
            ref_idx = torch.where(live, torch.arange(n, dtype=torch.int32, device="cuda"), -1).to(torch.int32)
        o.fill_(float("nan"))
        _executable(x["built"])(*x["args"], x["scale"], DEFAULT_EPS)
        torch.cuda.synchronize()
        sub = [(t[0, :n * T].unflatten(0, (n, T)) if varlen else t[:n]).double() for t in (q, k, v, g, eta)]
        ref_inter = torch.zeros(n * T, HV, K, V, dtype=torch.float64, device="cuda")
        o_ref, ht_ref = fused_recurrent_kla_reference(
            *sub, scale=x["scale"], eps=DEFAULT_EPS, normalize_q=nq, output_final_state=True,
            initial_state=ref_pool if use_idx else (h0[:n].double() if use_h0 else None),
            state_indices=ref_idx if use_idx else None, inplace_final_state=inplace, intermediate_states=ref_inter)
        o_got = o[0, :n * T].unflatten(0, (n, T)) if varlen else o[:n]
        tok = (live[:, None].expand(n, T).reshape(-1) if use_idx
               else torch.ones(n * T, dtype=torch.bool, device="cuda"))
        errs, bad = {"o": _rel_err(o_got.reshape(n * T, HV, V)[tok], o_ref.reshape(n * T, HV, V)[tok])}, {}
        if store_ht:
            errs["ht"] = _rel_err(ht[:n][live] if use_idx else ht[:n], ht_ref[live] if use_idx else ht_ref)
        if flags["store_inter"]:
            errs["inter"] = _rel_err(inter[:n * T][tok], ref_inter[tok])
        if inplace:
            errs["pool"] = _rel_err(h0[slots], ref_pool[live])
        bad = {name: e for name, e in errs.items() if not e <= tol}
        if use_idx and not bool((o_got[~live] == 0).all()):
            bad["padding sequence"] = "o not zero"
        return None if not bad else f"errors {bad} (tolerance {tol:g})"

    def check(x, _out):
        if serving:
            return check_serving(x)
        q, k, v, g, eta, h0, ht, cu, o = x["args"]
        n, T = min(x["N"], BENCH_CHECK_ROWS), x["T"]
        if varlen:   # the first n sequences as a dense batch
            sub = [t[0, :n * T].unflatten(0, (n, T)).double() for t in (q, k, v, g, eta)]
            o_got = o[0, :n * T].unflatten(0, (n, T))
        else:
            sub = [t[:n].double() for t in (q, k, v, g, eta)]
            o_got = o[:n]
        o_ref, ht_ref = naive_kla(*sub, scale=x["scale"], eps=DEFAULT_EPS, normalize_q=nq,
                                  initial_state=h0[:n].double() if use_h0 else None, output_final_state=True)
        errs = {"o": _rel_err(o_got, o_ref)}
        if store_ht:
            errs["ht"] = _rel_err(ht[:n], ht_ref)
        bad = {name: e for name, e in errs.items() if not e <= tol}
        return None if not bad else f"errors {bad} (tolerance {tol:g})"

    return [BenchCase(f"N={N} T={T}", functools.partial(make_inputs, N, T), run, check)
            for N, T in BENCH_FUSED_SHAPES]
