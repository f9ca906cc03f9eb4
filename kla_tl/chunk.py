"""Orchestration of the chunkwise forward behind ``chunk_kla``: packing, launch tables, the two kernel launches.
Autograd, and the choice between these kernels and the reference, live in :mod:`kla_tl.ops`.

Every call is run in packed form (B = 1, TT tokens): a dense batch [B, T] is a varlen batch of B sequences of T
tokens, so one kernel variant serves both. Stage 1 (:mod:`kla_tl.kernels.chunk_prepare`) runs over all chunks in
parallel; stage 2 (:mod:`kla_tl.kernels.chunk_scan`) walks each sequence's chunks in order.

Environment: ``KLA_TL_ARCH=sm_80`` forces the Ampere code path on a Hopper GPU (built for sm_90a with wgmma, TMA and
warp specialization disabled), so that path is tested on real hardware.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import dispatch
from .conventions import CHUNK, Problem, sequence_bounds

#: Environment variable forcing a code path (``sm_80`` or ``sm_90a``).
ARCH_ENV = "KLA_TL_ARCH"

_TABLES: dict = {}


def chunk_refusal(prob: Problem, device: torch.device, *, needs_grad: bool) -> Optional[str]:
    """Why the TileLang chunk kernels cannot serve this call, or None."""
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    if prob.dtype == torch.float16:
        return "float16 inputs (the chunk kernels are built for bfloat16)"
    if prob.dtype == torch.float32:
        return ("float32 inputs: the chunk kernels' tensor-core GEMMs round operands to tf32 (1.2e-3 relative error "
                "measured on an H100, above the 1e-3 float32 tolerance); pass bfloat16 for the kernels")
    return None


def select_arch(device: torch.device) -> tuple[str, bool]:
    """(arch, run_on_hopper): the code path for ``device``, honouring ``KLA_TL_ARCH``."""
    native = dispatch.arch_of(device)
    forced = os.environ.get(ARCH_ENV, "")
    if forced and forced not in ("sm_80", "sm_90a"):
        raise ValueError(f"{ARCH_ENV} must be sm_80 or sm_90a, got {forced!r}")
    arch = forced or native
    if arch == "sm_90a" and native != "sm_90a":
        raise ValueError(f"{ARCH_ENV}=sm_90a needs a Hopper GPU, got capability "
                         f"{torch.cuda.get_device_capability(device)}")
    return arch, (arch == "sm_80" and native == "sm_90a")


def _tables(prob: Problem, cu: Optional[list[int]], device: torch.device):
    """(seqs [N, 2], chunks [NC, 2]) int32 on ``device``: (start, end) per sequence and (first token, sequence
    end) per chunk, in packed token coordinates. Cached per layout."""
    key = (prob.B, prob.T, None if cu is None else tuple(cu), device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    seqs = [(b * prob.T + s, b * prob.T + e) for b, s, e in sequence_bounds(prob, cu)]
    chunks = [(t0, e) for s, e in seqs for t0 in range(s, e, CHUNK)]
    seq_t = torch.tensor(seqs, dtype=torch.int32).reshape(-1, 2).to(device)
    chunk_t = torch.tensor(chunks, dtype=torch.int32).reshape(-1, 2).to(device)
    if len(_TABLES) > 256:
        _TABLES.clear()
    _TABLES[key] = (seq_t, chunk_t)
    return seq_t, chunk_t


def problem_key(prob: Problem, *, use_h0: bool, store_ht: bool) -> dict:
    return {"H": prob.H, "HV": prob.HV, "K": prob.K, "V": prob.V, "dtype": str(prob.dtype).replace("torch.", ""),
            "normalize_q": prob.normalize_q, "use_h0": use_h0, "store_ht": store_ht}


def _schedule(spec, arch: str, key: dict, device, n_seq: int) -> dict:
    """Tuned schedule from ``schedules/`` (GPU file, then arch file), else the untuned default."""
    if device is not None:
        from . import schedules

        sch, src = schedules.lookup(spec.name, device, key, arch=arch)
        if src != schedules.BUILTIN:
            return sch
    if spec.name == "chunk_scan":
        return spec.default(arch, key, n_seq)
    return spec.default(arch, key)


def build_kernels(prob: Problem, arch: str, on_hopper: bool, *, scale: float, eps: float, use_h0: bool,
                  device=None):
    """Compiled (chunk_prepare, chunk_scan) for a problem and code path; no GPU needed (``device=None``)."""
    from .kernels.chunk_fwd import PREPARE, SCAN

    key = problem_key(prob, use_h0=use_h0, store_ht=True)
    prep = PREPARE.build(arch, key, _schedule(PREPARE, arch, key, device, prob.N), run_on_hopper=on_hopper,
                         scale=scale, eps=eps)
    scan = SCAN.build(arch, key, _schedule(SCAN, arch, key, device, prob.N), run_on_hopper=on_hopper,
                      scale=scale, eps=eps)
    return prep, scan


def chunk_fwd(q, k, v, g, eta, *, prob: Problem, cu, scale, eps, normalize_q, initial_state, output_final_state):
    """Run the two forward kernels; returns (o [B, T, HV, V], final_state [N, HV, K, V] fp32 or None)."""
    device = q.device
    B, T, H, HV, K, V, N = prob.B, prob.T, prob.H, prob.HV, prob.K, prob.V, prob.N
    TT = B * T
    scale = K ** -0.5 if scale is None else float(scale)
    if TT == 0:
        o = q.new_empty(B, T, HV, V)
        ht = None
        if output_final_state:
            ht = (initial_state.float().clone() if initial_state is not None
                  else torch.zeros(N, HV, K, V, dtype=torch.float32, device=device))
        return o, ht
    arch, on_hopper = select_arch(device)
    prep, scan = build_kernels(prob, arch, on_hopper, scale=scale, eps=eps, use_h0=initial_state is not None,
                               device=device)
    seqs, chunks = _tables(prob, cu, device)
    qp = q.reshape(1, TT, H, K).contiguous()
    kp = k.reshape(1, TT, H, K).contiguous()
    vp = v.reshape(1, TT, HV, V).contiguous()
    gp = g.reshape(1, TT, HV).to(torch.float32).contiguous()
    ep = eta.reshape(1, TT, HV).to(torch.float32).contiguous()
    st = q.dtype
    w = torch.empty(1, TT, HV, K, dtype=st, device=device)
    u = torch.empty(1, TT, HV, V, dtype=st, device=device)
    aqk = torch.empty(1, TT, HV, CHUNK, dtype=st, device=device)
    gcum = torch.empty(1, TT, HV, dtype=torch.float32, device=device)
    rq = torch.empty(1, TT, H, dtype=torch.float32, device=device)
    rk = torch.empty(1, TT, H, dtype=torch.float32, device=device)
    o = torch.empty(1, TT, HV, V, dtype=q.dtype, device=device)
    ht = torch.empty(N, HV, K, V, dtype=torch.float32, device=device)
    h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else ht
    if chunks.shape[0] > 0:
        prep(qp, kp, vp, gp, ep, chunks, w, u, aqk, gcum, rq, rk)
    scan(qp, kp, w, u, aqk, gcum, rq, rk, seqs, h0, o, ht)
    return o.reshape(B, T, HV, V), (ht if output_final_state else None)

