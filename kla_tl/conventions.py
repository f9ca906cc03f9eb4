"""The one shape, layout and dtype contract of kla-tl, and the input validation every entry point uses.

Axis letters follow fla: ``B`` batch, ``T`` tokens per sequence, ``H`` q/k heads, ``HV`` value heads (GVA when
``HV > H``, requires ``HV % H == 0``), ``K`` key/query head dim, ``V`` value head dim, ``N`` sequences (``B``, or
``len(cu_seqlens) - 1`` with varlen), ``C`` chunk size.

=============  ==================  ===========================================================
tensor         shape               dtype
=============  ==================  ===========================================================
q, k           [B, T, H, K]        float16 / bfloat16 / float32 (float64 on the reference path)
v              [B, T, HV, V]       same dtype as q
g (log-decay)  [B, T, HV]          floating, g <= 0
eta            [B, T, HV]          floating, eta in (0, 1)
o              [B, T, HV, V]       q.dtype
state          [N, HV, K, V]       float32 (float64 when q is float64); K-major
state pool     [N_slots, HV, K, V] float32 or bfloat16 (``kla_decode``; ``fused_recurrent_kla`` with state_indices)
cu_seqlens     [N + 1]             int32 / int64, starts at 0, non-decreasing, ends at T; B == 1
state_indices  [B] or [N]          int32, each in [-1, N_slots); -1 marks a padding row / sequence
per-token      [B * T, HV, K, V]   float32 or bfloat16 (``fused_recurrent_kla`` intermediate_states); token-major:
states                             row ``b * T + t`` (dense) or ``t`` of the packed axis (varlen); contiguous
=============  ==================  ===========================================================

Validation never reads tensor *values* on a CUDA device except ``cu_seqlens`` (needed on the host anyway to plan
the launch) and never modifies a caller's tensor.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

#: Dtypes accepted for q, k, v.
QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Dtypes accepted for a state pool (``kla_decode``, ``fused_recurrent_kla`` with state_indices) and for the
#: per-token state buffer of ``fused_recurrent_kla`` (float64 runs on the reference).
POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
#: Integer dtypes accepted for cu_seqlens.
CU_SEQLENS_DTYPES = (torch.int32, torch.int64)
#: Head dims the TileLang kernels are built for (the reference accepts any positive size).
#: 64/128/256 are the common GDN sizes; 96/192 and 48/96 are the published KLA models' (K, V).
KERNEL_K = (48, 64, 96, 128, 256)
KERNEL_V = (64, 96, 128, 192, 256)
#: Chunk length of the chunkwise kernels (KLA.md section 5).
CHUNK = 64
#: Default epsilon of D = ||k||^2 + eps (KLA.md section 2).
DEFAULT_EPS = 1e-6
#: Epsilon of the optional q L2 normalization, fla's l2norm (x / sqrt(sum x^2 + 1e-6)).
QNORM_EPS = 1e-6


def _dt(x: torch.dtype) -> str:
    return str(x).replace("torch.", "")


def _names(dtypes) -> str:
    return ", ".join(_dt(d) for d in dtypes)


@dataclass(frozen=True)
class Problem:
    """Sizes and flags of one validated call (hashable; used to pick kernels and schedules)."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    dtype: torch.dtype
    is_varlen: bool
    use_h0: bool
    normalize_q: bool

    @property
    def group(self) -> int:
        """Value heads per q/k head (GVA group size)."""
        return self.HV // self.H


def _fail(fn: str, msg: str, exc=ValueError):
    raise exc(f"{fn}: {msg}")


def _check_tensor(fn: str, name: str, x, ndim: int, layout: str):
    if not isinstance(x, torch.Tensor):
        _fail(fn, f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}", TypeError)
    if x.dim() != ndim:
        _fail(fn, f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")


def _check_float(fn: str, name: str, x: torch.Tensor):
    if not x.is_floating_point():
        _fail(fn, f"{name} must be a floating tensor, got dtype {_dt(x.dtype)}", TypeError)


#: Host values of the last cu_seqlens tensors read: (weak reference, version counter, values). chunk_kla reads
#: cu_seqlens three times per forward + backward (its own check, the forward operator, the backward operator), and
#: a read of a CUDA tensor waits for all queued GPU work: without this, the backward's read waits for the forward's
#: kernels and the GPU idles while the host prepares the backward. A hit needs the same tensor object at the same
#: version (every in-place write through the tensor bumps it; autograd makes the same check of the saved
#: cu_seqlens). Tensor subclasses (torch.compile's fake tensors), inference tensors (no version counter) and reads
#: while a CUDA graph is being captured are never served from here: a captured graph would keep host tables built
#: from values that the caller may overwrite before a replay, so such a capture must fail as it does without a
#: cache (a device-to-host copy is not allowed while capturing).
_CU_HOST: list = []
_CU_HOST_SIZE = 8


def _read_host(t: torch.Tensor) -> tuple:
    """``t``'s values on the host (a device-to-host copy for a CUDA tensor)."""
    return tuple(int(x) for x in t.tolist())


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph capture is under way on the current stream of ``t``'s device (CUDA tensors only)."""
    if not t.is_cuda:
        return False
    with torch.cuda.device(t.device):
        return torch.cuda.is_current_stream_capturing()


def cu_seqlens_values(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list, read once per tensor and version (see :data:`_CU_HOST`)."""
    if type(cu_seqlens) is not torch.Tensor or cu_seqlens.is_inference() or _capturing(cu_seqlens):
        return list(_read_host(cu_seqlens))
    version = cu_seqlens._version
    for ref, ver, values in _CU_HOST:
        if ref() is cu_seqlens and ver == version:
            return list(values)
    values = _read_host(cu_seqlens)
    _CU_HOST[:] = [e for e in _CU_HOST if e[0]() is not None and e[0]() is not cu_seqlens][-(_CU_HOST_SIZE - 1):]
    _CU_HOST.append((weakref.ref(cu_seqlens), version, values))
    return list(values)


def check_cu_seqlens(fn: str, cu_seqlens, T: int, B: int) -> list[int]:
    """Validate ``cu_seqlens`` and return it as a host list (a device-to-host copy the first time a tensor is read,
    :func:`cu_seqlens_values`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        _fail(fn, f"cu_seqlens must be a 1-D integer torch.Tensor [N+1], got {type(cu_seqlens).__name__}", TypeError)
    if cu_seqlens.dtype not in CU_SEQLENS_DTYPES:
        _fail(fn, f"cu_seqlens must have dtype in ({_names(CU_SEQLENS_DTYPES)}), got {_dt(cu_seqlens.dtype)}", TypeError)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        _fail(fn, f"cu_seqlens must be 1-D with at least 2 entries [N+1], got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        _fail(fn, f"with cu_seqlens the batch size B (q.shape[0]) must be 1, got B={B}")
    cu = cu_seqlens_values(cu_seqlens)
    if cu[0] != 0:
        _fail(fn, f"cu_seqlens must start at 0, got cu_seqlens[0]={cu[0]}")
    for i in range(1, len(cu)):
        if cu[i] < cu[i - 1]:
            _fail(fn, f"cu_seqlens must be non-decreasing, got cu_seqlens[{i - 1}]={cu[i - 1]} > cu_seqlens[{i}]={cu[i]}")
    if cu[-1] != T:
        _fail(fn, f"cu_seqlens must end at T={T} (q.shape[1]), got cu_seqlens[-1]={cu[-1]}")
    return cu


def _check_heads_and_dims(fn, q, k, v, g, eta, *, expect_T1: bool = False):
    _check_tensor(fn, "q", q, 4, "[B, T, H, K]")
    _check_tensor(fn, "k", k, 4, "[B, T, H, K]")
    _check_tensor(fn, "v", v, 4, "[B, T, HV, V]")
    _check_tensor(fn, "g", g, 3, "[B, T, HV]")
    _check_tensor(fn, "eta", eta, 3, "[B, T, HV]")
    if q.dtype not in QKV_DTYPES:
        _fail(fn, f"q must have dtype in ({_names(QKV_DTYPES)}), got {_dt(q.dtype)}", TypeError)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _fail(fn, f"{name} must have the same dtype as q ({_dt(q.dtype)}), got {_dt(x.dtype)}", TypeError)
    _check_float(fn, "g", g)
    _check_float(fn, "eta", eta)
    B, T, H, K = q.shape
    if tuple(k.shape) != tuple(q.shape):
        _fail(fn, f"k must have the shape of q [B, T, H, K]={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[0] != B or v.shape[1] != T:
        _fail(fn, f"v must match q in B and T ({B}, {T}), got v.shape={tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if H == 0 or HV == 0 or K == 0 or V == 0:
        _fail(fn, f"head counts and head dims must be positive, got H={H}, HV={HV}, K={K}, V={V}")
    if HV % H != 0:
        _fail(fn, f"value heads HV={HV} (v.shape[2]) must be a multiple of q/k heads H={H} (q.shape[2])")
    for name, x in (("g", g), ("eta", eta)):
        if tuple(x.shape) != (B, T, HV):
            _fail(fn, f"{name} must have shape [B, T, HV]={(B, T, HV)}, got {tuple(x.shape)}")
    if expect_T1 and T != 1:
        _fail(fn, f"one token per row: q.shape[1] (T) must be 1, got T={T}")
    dev = q.device
    for name, x in (("k", k), ("v", v), ("g", g), ("eta", eta)):
        if x.device != dev:
            _fail(fn, f"all tensors must be on one device; q is on {dev}, {name} is on {x.device}")
    return B, T, H, HV, K, V


def _check_scalar_opts(fn, scale, eps):
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        _fail(fn, f"scale must be a float or None, got {type(scale).__name__}", TypeError)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        _fail(fn, f"eps must be a positive finite float, got {eps!r}", TypeError)
    if not 0 < eps < math.inf:  # also rejects NaN; plain comparisons trace under torch.compile(dynamic=True)
        _fail(fn, f"eps must be a positive finite float, got {eps!r}")


def _check_pool(fn: str, name: str, pool, HV: int, K: int, V: int, device):
    """A state pool ``[N_slots, HV, K, V]`` of a POOL_DTYPES dtype on ``device`` (any N_slots)."""
    _check_tensor(fn, name, pool, 4, "[N_slots, HV, K, V]")
    if tuple(pool.shape[1:]) != (HV, K, V):
        _fail(fn, f"{name} must have shape [N_slots, HV, K, V] with (HV, K, V)={(HV, K, V)}, got {tuple(pool.shape)}")
    if pool.dtype not in POOL_DTYPES:
        _fail(fn, f"{name} must have dtype in ({_names(POOL_DTYPES)}), got {_dt(pool.dtype)}", TypeError)
    if pool.device != device:
        _fail(fn, f"all tensors must be on one device; q is on {device}, {name} is on {pool.device}")


def _check_state_indices(fn: str, state_indices, n: int, n_name: str, n_slots: int, device, *,
                         distinct: bool = False):
    """int32 ``state_indices [n]`` on ``device``; host tensors are also value-checked: each in [-1, n_slots), and
    with ``distinct`` no slot twice (a slot written by two rows or sequences would race)."""
    if not isinstance(state_indices, torch.Tensor):
        _fail(fn, f"state_indices must be an int32 torch.Tensor [{n_name}], got {type(state_indices).__name__}",
              TypeError)
    if state_indices.dtype != torch.int32:
        _fail(fn, f"state_indices must have dtype int32, got {_dt(state_indices.dtype)}", TypeError)
    if tuple(state_indices.shape) != (n,):
        _fail(fn, f"state_indices must have shape [{n_name}]=({n},), got {tuple(state_indices.shape)}")
    if state_indices.device != device:
        _fail(fn, f"all tensors must be on one device; q is on {device}, state_indices is on {state_indices.device}")
    if state_indices.device.type == "cpu" and n > 0:
        lo, hi = int(state_indices.min()), int(state_indices.max())
        if lo < -1 or hi >= n_slots:
            _fail(fn, f"state_indices must be in [-1, N_slots={n_slots}), got values in [{lo}, {hi}]")
        if distinct:
            live = state_indices[state_indices >= 0]
            uniq, counts = torch.unique(live, return_counts=True)
            if bool((counts > 1).any()):
                _fail(fn, f"state_indices must not repeat a slot when inplace_final_state=True (the final states "
                          f"would race), got slot(s) {uniq[counts > 1].tolist()} more than once")


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Recurrent-state dtype for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(fn: str, q, k, v, g, eta, *, scale=None, eps=DEFAULT_EPS, normalize_q=False,
                 initial_state=None, cu_seqlens=None) -> tuple[Problem, Optional[list[int]]]:
    """Validate the arguments of ``chunk_kla`` / ``fused_recurrent_kla``.

    Returns the :class:`Problem` and ``cu_seqlens`` as a host list (or None).
    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for wrong shapes or values; every message names
    the function, the argument, what it got and what is accepted.
    """
    B, T, H, HV, K, V = _check_heads_and_dims(fn, q, k, v, g, eta)
    _check_scalar_opts(fn, scale, eps)
    if not isinstance(normalize_q, bool):
        _fail(fn, f"normalize_q must be a bool, got {type(normalize_q).__name__}", TypeError)
    cu = None
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != q.device.type:
            _fail(fn, f"all tensors must be on one device; q is on {q.device}, cu_seqlens is on {cu_seqlens.device}")
        cu = check_cu_seqlens(fn, cu_seqlens, T, B)
        N = len(cu) - 1
    else:
        N = B
    if initial_state is not None:
        _check_tensor(fn, "initial_state", initial_state, 4, "[N, HV, K, V]")
        if tuple(initial_state.shape) != (N, HV, K, V):
            _fail(fn, f"initial_state must have shape [N, HV, K, V]={(N, HV, K, V)} "
                      f"(N = {'len(cu_seqlens)-1' if cu is not None else 'B'}), got {tuple(initial_state.shape)}")
        if initial_state.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            _fail(fn, f"initial_state must be floating (float32 recommended), got {_dt(initial_state.dtype)}", TypeError)
        if initial_state.device != q.device:
            _fail(fn, f"all tensors must be on one device; q is on {q.device}, initial_state is on {initial_state.device}")
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, dtype=q.dtype, is_varlen=cu is not None,
                   use_h0=initial_state is not None, normalize_q=normalize_q)
    return prob, cu


def check_recurrent_inputs(fn: str, q, k, v, g, eta, *, scale=None, eps=DEFAULT_EPS, normalize_q=False,
                           initial_state=None, cu_seqlens=None, state_indices=None, inplace_final_state=False,
                           intermediate_states=None) -> tuple[Problem, Optional[list[int]]]:
    """Validate the arguments of ``fused_recurrent_kla``: those of :func:`check_inputs`, plus the serving options.

    - ``state_indices`` (int32 ``[N]``) makes ``initial_state`` a pool ``[N_slots, HV, K, V]`` (POOL_DTYPES) whose
      slot ``state_indices[n]`` is sequence n's initial state (-1: padding sequence). Without it, ``initial_state``
      is ``[N, HV, K, V]`` as in :func:`check_inputs`.
    - ``inplace_final_state`` (bool) needs ``state_indices`` and a contiguous pool, and live slots that do not repeat
      (checked for host tensors).
    - ``intermediate_states``: a contiguous ``[B * T, HV, K, V]`` buffer of a POOL_DTYPES dtype.

    Returns the :class:`Problem` (``use_h0`` True in pool mode) and ``cu_seqlens`` as a host list (or None).
    """
    pool_mode = state_indices is not None
    prob, cu = check_inputs(fn, q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                            initial_state=None if pool_mode else initial_state, cu_seqlens=cu_seqlens)
    if not isinstance(inplace_final_state, bool):
        _fail(fn, f"inplace_final_state must be a bool, got {type(inplace_final_state).__name__}", TypeError)
    if pool_mode:
        if initial_state is None:
            _fail(fn, "state_indices addresses the slots of a state pool: pass the pool as initial_state "
                      "[N_slots, HV, K, V], got initial_state=None")
        _check_pool(fn, "initial_state", initial_state, prob.HV, prob.K, prob.V, q.device)
        _check_state_indices(fn, state_indices, prob.N, "N", initial_state.shape[0], q.device,
                             distinct=inplace_final_state)
        if inplace_final_state and not initial_state.is_contiguous():
            _fail(fn, f"initial_state must be contiguous with inplace_final_state=True (the pool is updated in "
                      f"place), got shape {tuple(initial_state.shape)}, strides {tuple(initial_state.stride())}")
        prob = Problem(B=prob.B, T=prob.T, H=prob.H, HV=prob.HV, K=prob.K, V=prob.V, N=prob.N, dtype=prob.dtype,
                       is_varlen=prob.is_varlen, use_h0=True, normalize_q=prob.normalize_q)
    elif inplace_final_state:
        _fail(fn, "inplace_final_state=True needs state_indices (the slots of the initial_state pool to update; "
                  "torch.arange(N, dtype=torch.int32) for slot n = sequence n), got state_indices=None")
    if intermediate_states is not None:
        rows = prob.B * prob.T
        _check_tensor(fn, "intermediate_states", intermediate_states, 4, "[B * T, HV, K, V]")
        want = (rows, prob.HV, prob.K, prob.V)
        if tuple(intermediate_states.shape) != want:
            _fail(fn, f"intermediate_states must have shape [B * T, HV, K, V]={want} (one state per token, "
                      f"token-major), got {tuple(intermediate_states.shape)}")
        if intermediate_states.dtype not in POOL_DTYPES:
            _fail(fn, f"intermediate_states must have dtype in ({_names(POOL_DTYPES)}), "
                      f"got {_dt(intermediate_states.dtype)}", TypeError)
        if intermediate_states.device != q.device:
            _fail(fn, f"all tensors must be on one device; q is on {q.device}, intermediate_states is on "
                      f"{intermediate_states.device}")
        if not intermediate_states.is_contiguous():
            _fail(fn, f"intermediate_states must be contiguous (it is written in place), got strides "
                      f"{tuple(intermediate_states.stride())}")
    return prob, cu


#: check_decode_inputs memo: metadata signature of a validated call -> its Problem. Validation reads no value of a
#: CUDA tensor, so calls with equal signatures validate equally, and a decode loop repeats a few signatures (one per
#: batch size): a hit costs one tuple of attribute reads instead of the full check. Bounded (cleared when full).
_DECODE_SIGS: dict = {}
_DECODE_SIGS_MAX = 1024


_UNCACHEABLE = object()


def _optional_meta(x):
    """(shape, dtype, device) of an optional tensor argument, None when absent, ``_UNCACHEABLE`` for anything else."""
    if x is None:
        return None
    if type(x) is torch.Tensor:
        return (x.shape, x.dtype, x.device)
    return _UNCACHEABLE


def _decode_signature(q, k, v, g, eta, state, state_indices, scale, eps, normalize_q, out):
    """What validating a ``kla_decode`` call depends on, as a hashable tuple; None when the call needs the full
    check (an argument that is not exactly a torch.Tensor / float / bool, or an eps that is not positive finite)."""
    Tn = torch.Tensor
    if not (type(q) is Tn and type(k) is Tn and type(v) is Tn and type(g) is Tn and type(eta) is Tn
            and type(state) is Tn and type(normalize_q) is bool and type(eps) is float and 0.0 < eps < math.inf
            and (scale is None or type(scale) is float)):
        return None
    idx, o = _optional_meta(state_indices), _optional_meta(out)
    if idx is _UNCACHEABLE or o is _UNCACHEABLE:
        return None
    return (q.shape, k.shape, v.shape, g.shape, eta.shape, state.shape, q.dtype, k.dtype, v.dtype, g.dtype,
            eta.dtype, state.dtype, q.device, k.device, v.device, g.device, eta.device, state.device, normalize_q,
            idx, o)


def check_decode_inputs(fn: str, q, k, v, g, eta, state, *, state_indices=None, scale=None, eps=DEFAULT_EPS,
                        normalize_q=False, out=None) -> Problem:
    """Validate the arguments of ``kla_decode`` (one token per row, state pool updated in place)."""
    sig = _decode_signature(q, k, v, g, eta, state, state_indices, scale, eps, normalize_q, out)
    if sig is not None:
        prob = _DECODE_SIGS.get(sig)
        if prob is not None:
            return prob
    prob = _check_decode_inputs(fn, q, k, v, g, eta, state, state_indices=state_indices, scale=scale, eps=eps,
                                normalize_q=normalize_q, out=out)
    # host-side state_indices are value-checked: never memoize those calls
    if sig is not None and (state_indices is None or state_indices.device.type != "cpu"):
        if len(_DECODE_SIGS) >= _DECODE_SIGS_MAX:
            _DECODE_SIGS.clear()
        _DECODE_SIGS[sig] = prob
    return prob


def _check_decode_inputs(fn: str, q, k, v, g, eta, state, *, state_indices=None, scale=None, eps=DEFAULT_EPS,
                         normalize_q=False, out=None) -> Problem:
    B, T, H, HV, K, V = _check_heads_and_dims(fn, q, k, v, g, eta, expect_T1=True)
    _check_scalar_opts(fn, scale, eps)
    if not isinstance(normalize_q, bool):
        _fail(fn, f"normalize_q must be a bool, got {type(normalize_q).__name__}", TypeError)
    _check_pool(fn, "state", state, HV, K, V, q.device)
    if state_indices is None:
        if state.shape[0] != B:
            _fail(fn, f"without state_indices the state pool must have B={B} slots, got state.shape[0]={state.shape[0]}")
    else:
        _check_state_indices(fn, state_indices, B, "B", state.shape[0], q.device)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            _fail(fn, f"out must be a torch.Tensor [B, 1, HV, V], got {type(out).__name__}", TypeError)
        if tuple(out.shape) != (B, 1, HV, V):
            _fail(fn, f"out must have shape [B, 1, HV, V]={(B, 1, HV, V)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            _fail(fn, f"out must have q's dtype {_dt(q.dtype)}, got {_dt(out.dtype)}", TypeError)
        if out.device != q.device:
            _fail(fn, f"all tensors must be on one device; q is on {q.device}, out is on {out.device}")
    return Problem(B=B, T=1, H=H, HV=HV, K=K, V=V, N=B, dtype=q.dtype, is_varlen=False, use_h0=True,
                   normalize_q=normalize_q)


def sequence_bounds(prob: Problem, cu: Optional[list[int]]) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: B rows of [0, T) or the packed ranges of cu_seqlens."""
    if cu is None:
        return [(b, 0, prob.T) for b in range(prob.B)]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
