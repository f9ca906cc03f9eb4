"""Chunkwise KLA backward in the NORMALIZED form of the GPU forward (KLA.md section 4), in plain torch, no autograd.

The spec of the TileLang backward kernels: same arguments and results as
:func:`kla_tl.reference_bwd.chunk_kla_reference_bwd` (the raw-key oracle, where beta = eta / r^2 appears), but every
quantity is the one :mod:`kla_tl.kernels.chunk_prepare` / ``chunk_scan`` / ``chunk_states`` form; beta is never built.
Sequences (dense rows or ``cu_seqlens`` ranges) and chunks are Python loops; within a chunk all value heads at once.
Arithmetic in float64 for float64 q, else float32.

Notation, per chunk of n <= C rows and value head hv (q/k rows of head hv // (HV / H)); row vectors, S in R^{K x V}::

    r = sqrt(||k||^2 + eps)  [n],  K^ = diag(1/r) K,  Q^ = l2norm(q) if normalize_q else q      [n, K]
    gamma = chunk-local cumsum of max(g, -100),  e = e^gamma,  en = e^{gamma_n - gamma},  eN = e^{gamma_n}
    Gam_ij = exp(gamma_i - gamma_j) for i >= j else 0 (masked BEFORE exp; never e_i / e_j)

Relation to the raw form (checked to 1e-15): with R = diag(r), A = R A_raw R^-1, L = R L_raw R^-1, W = R W_raw,
U = R U_raw, N = R N_raw, Aqk = Aqk_raw R^-1; S, dS are the same. So S_out = eN S + K^^T diag(en) N has NO 1/r:
a 1/r there belongs to the RAW k operand of the kernels (diag(en / r) K = diag(en) K^). Likewise dN = R^-1 dN_raw.

Stage 1 ``prepare_chunk`` (chunk-parallel) reads q, k, v, g, eta [n, *] and writes, per chunk::

    Gkk = K^ K^^T                                     [n, n]   (|Gkk| <= 1)
    A   = StrictLower(diag(eta) Gkk * Gam),  L = (I + A)^-1    [n, n]
    W   = L diag(eta e) K^                            [n, K]
    U   = L diag(eta / r) V                           [n, V]   (the only unbounded operand: |U| ~ |v| / r)
    Aqk = scale (Q^ K^^T) * Gam                       [n, n]   lower incl. diagonal
  ``state_sweep`` (sequential over chunks) reads W, U, K^, e, en and h0 [K, V]; writes per chunk::

    S_in [K, V],  N = U - W S_in [n, V],  then S_in(next) = eN S_in + K^^T diag(en) N
  (``chunk_output``: O = diag(scale e) Q^ S_in + Aqk N, the forward output, for stage tests.)

Stage 2 ``dstate_sweep`` (sequential, last chunk first; dS = dht or 0 at the sequence end) reads Aqk, K^, W, Q^, e,
en, dO [n, V]; writes dS_out [K, V] (gradient at the state LEAVING the chunk), dN [n, V], and dh0 [K, V]::

    dN    = Aqk^T dO + diag(en) K^ dS_out
    dS_in = eN dS_out + (diag(scale e) Q^)^T dO - W^T dN            (= dS_out of the previous chunk; dh0 at the start)

Stage 3 ``chunk_grads`` (chunk-parallel) reads stage 1's chunk quantities, S_in, N, dS_out, dN, dO; writes per value
head dQ^, dK^ [n, K], dv [n, V], deta, dr, dg [n]::

    dAqk = Lower(dO N^T)                                   dW = -dN S_in^T,  dU = dN
    dQ^  = diag(scale e) dO S_in^T + scale (dAqk * Gam) K^
    dK^  = scale (dAqk * Gam)^T Q^ + diag(en) N dS_out^T          (Aqk path, state-update path)
  WY backward through L = (I + A)^-1, W = L Y, U = L X, Y = diag(eta e) K^, X = diag(eta / r) V::

    dX = L^T dU,  dY = L^T dW (= -dX S_in^T)
    dA = -(dX U^T + dY W^T) = -dX N^T             (N form: one GEMM; fla's two-term form cancels if N << U)
    M  = StrictLower(dA) * Gam,  Me = diag(eta) M              (gradient of Gkk: Me, both triangles)
    dK^ += diag(eta e) dY + (Me + Me^T) K^
    dv   = diag(eta / r) dX
    deta = rowsum(dX * V) / r + e * rowsum(dY * K^) + rowsum(M * Gkk)
    dr   = -eta rowsum(dX * V) / r^2                          (the 1/r of U; the 1/r of K^ is in stage 4)
  Decay, per g_r directly (fla's reverse cumsum of rowsum - colsum is equal, up to cancellation): a product weighted
  by Gam_ij depends on g_r for j < r <= i, one weighted by e_i on r <= i, one by en_j on j < r, eN on every r::

    ZG     = dAqk * Aqk + Me * Gkk                              [n, n]
    direct = scale e * rowsum(dO * (Q^ S_in)) + eta e * rowsum(dY * K^)
    z      = en * rowsum((K^ dS_out) * N),   tail = eN <dS_out, S_in>
    dg_r   = sum_{i >= r, j < r} ZG_ij + sum_{i >= r} direct_i + sum_{j < r} z_j + tail
           = StrictLower(Up ZG) 1 + Up direct + StrictLower(1) z + tail,   Up_ri = [i >= r]  (two n x n GEMMs)

Stage 4 ``finish`` (token-parallel) reads raw q, k [B, T, H, K], g and stage 3's per-value-head results::

    dQ^, dK^, dr summed over the G = HV / H value heads of each q/k head (GVA)
    dk = (dK^ - (k^ . dK^) k^) / r + dr k^                       (k^ = k / r, r = sqrt(||k||^2 + eps))
    dq = rho (dQ^ - (q^ . dQ^) q^), rho = (||q||^2 + 1e-6)^-1/2   (normalize_q; else dq = dQ^)
    dg = 0 where g < -100 (the floor), deta and dv as in stage 3

Precision (float32 runs against the float64 oracle): everything here agrees with the raw form to ~4e-7. Keep r, 1/r,
gamma, e, en, Gam, L, the states and every row sum (deta, dr, dg) in fp32; dr reaches ~1e5 and dk ~1e6 for key norms
near sqrt(eps) (genuine gradients, beyond fp16). Gam from chunk-local cumsum differences costs ~3e-5 after 40 floored
gates in a chunk; the two cancelling variants above cost < 2x in fp32. Storing S_in, N, dS_out, dN in bf16 between the
stages costs ~2-4e-3 on the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .conventions import DEFAULT_EPS, QNORM_EPS, state_dtype_for
from .kernels._tl import G_FLOOR
from .reference_bwd import bwd_dims, grads_as_inputs

__all__ = ["Chunk", "ChunkGrads", "prepare_chunk", "state_sweep", "chunk_output", "dstate_sweep", "chunk_grads",
           "finish", "chunk_kla_normalized_bwd"]


def _masks(n: int, device) -> tuple:
    """(lower incl. diagonal, strictly lower) boolean [n, n]."""
    idx = torch.arange(n, device=device)
    return idx[:, None] >= idx[None, :], idx[:, None] > idx[None, :]


@dataclass
class Chunk:
    """Stage 1's quantities of one chunk, all value heads: [HV, n, *]."""

    scale: float
    qh: torch.Tensor     # [HV, n, K] Q^
    kh: torch.Tensor     # [HV, n, K] K^ = K / r
    v: torch.Tensor      # [HV, n, V]
    r: torch.Tensor      # [HV, n] sqrt(||k||^2 + eps)
    eta: torch.Tensor    # [HV, n]
    eg: torch.Tensor     # [HV, n] e^gamma
    egn: torch.Tensor    # [HV, n] e^{gamma_n - gamma}
    Gam: torch.Tensor    # [HV, n, n] lower incl. diagonal
    Gkk: torch.Tensor    # [HV, n, n] K^ K^^T
    L: torch.Tensor      # [HV, n, n] (I + A)^-1
    W: torch.Tensor      # [HV, n, K]
    U: torch.Tensor      # [HV, n, V]
    Aqk: torch.Tensor    # [HV, n, n]


@dataclass
class ChunkGrads:
    """Stage 3's per-value-head gradients of one chunk: [HV, n, *]."""

    dqh: torch.Tensor    # [HV, n, K] gradient of Q^
    dkh: torch.Tensor    # [HV, n, K] gradient of K^
    dv: torch.Tensor     # [HV, n, V]
    deta: torch.Tensor   # [HV, n]
    dr: torch.Tensor     # [HV, n] gradient of r through U only
    dg: torch.Tensor     # [HV, n] gradient of the (floored) g


def prepare_chunk(q, k, v, g, eta, *, scale: float, eps: float, normalize_q: bool) -> Chunk:
    """Stage 1 (per chunk). Raw q, k [HV, n, K] (q/k rows repeated over the GVA group), v [HV, n, V], g, eta [HV, n]."""
    n = k.shape[-2]
    lower, strict = _masks(n, k.device)
    r = torch.sqrt((k * k).sum(-1) + eps)
    kh = k / r[..., None]
    qh = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + QNORM_EPS) if normalize_q else q
    gamma = g.clamp_min(G_FLOOR).cumsum(-1)
    Gam = torch.exp((gamma[..., :, None] - gamma[..., None, :]).masked_fill(~lower, -torch.inf))
    eg = torch.exp(gamma)
    egn = torch.exp(gamma[..., -1:] - gamma)
    Gkk = kh @ kh.mT
    A = (eta[..., :, None] * Gkk * Gam).masked_fill(~strict, 0.0)
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    L = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    W = L @ ((eta * eg)[..., None] * kh)
    U = L @ ((eta / r)[..., None] * v)
    Aqk = scale * (qh @ kh.mT) * Gam
    return Chunk(scale=scale, qh=qh, kh=kh, v=v, r=r, eta=eta, eg=eg, egn=egn, Gam=Gam, Gkk=Gkk, L=L, W=W, U=U,
                 Aqk=Aqk)


def state_sweep(chunks: list, h0: torch.Tensor) -> tuple:
    """Stage 1, sequential part: (S_in per chunk [HV, K, V], N per chunk [HV, n, V], final state) from h0 [HV, K, V]."""
    S, S_in, Ns = h0, [], []
    for ch in chunks:
        N = ch.U - ch.W @ S
        S_in.append(S)
        Ns.append(N)
        S = ch.eg[..., -1, None, None] * S + ch.kh.mT @ (ch.egn[..., None] * N)
    return S_in, Ns, S


def chunk_output(ch: Chunk, S_in: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """The forward output of a chunk, O = diag(scale e) Q^ S_in + Aqk N  [HV, n, V]."""
    return (ch.scale * ch.eg)[..., None] * (ch.qh @ S_in) + ch.Aqk @ N


def dstate_sweep(chunks: list, dO: list, dht: torch.Tensor) -> tuple:
    """Stage 2 (sequential, last chunk first): (dS_out per chunk [HV, K, V], dN per chunk [HV, n, V], dh0 [HV, K, V]).

    dO: per chunk [HV, n, V]; dht [HV, K, V] the gradient of the sequence's final state (zeros if none)."""
    dS = dht
    dS_out, dN = [None] * len(chunks), [None] * len(chunks)
    for c in reversed(range(len(chunks))):
        ch = chunks[c]
        dS_out[c] = dS
        dN[c] = ch.Aqk.mT @ dO[c] + ch.egn[..., None] * (ch.kh @ dS)
        dS = (ch.eg[..., -1, None, None] * dS + ((ch.scale * ch.eg)[..., None] * ch.qh).mT @ dO[c]
              - ch.W.mT @ dN[c])
    return dS_out, dN, dS


def chunk_grads(ch: Chunk, S_in, N, dS_out, dN, dO) -> ChunkGrads:
    """Stage 3 (per chunk): the gradients of one chunk given its state S_in, N, dS_out, dN and dO."""
    n, dev, dt = ch.kh.shape[-2], ch.kh.device, ch.kh.dtype
    lower, strict = _masks(n, dev)
    s = ch.scale
    # output and state-update paths
    dAqk = (dO @ N.mT).masked_fill(~lower, 0.0)
    dAG = dAqk * ch.Gam
    dOSt = dO @ S_in.mT                                                    # [HV, n, K]
    dqh = (s * ch.eg)[..., None] * dOSt + s * (dAG @ ch.kh)
    dkh = s * (dAG.mT @ ch.qh) + ch.egn[..., None] * (N @ dS_out.mT)
    # WY backward (dW = -dN S_in^T, dU = dN)
    dX = ch.L.mT @ dN
    dY = -(dX @ S_in.mT)
    M = (-(dX @ N.mT)).masked_fill(~strict, 0.0) * ch.Gam
    Me = ch.eta[..., :, None] * M
    dkh = dkh + (ch.eta * ch.eg)[..., None] * dY + (Me + Me.mT) @ ch.kh
    xv = (dX * ch.v).sum(-1)
    yk = (dY * ch.kh).sum(-1)
    dv = (ch.eta / ch.r)[..., None] * dX
    deta = xv / ch.r + ch.eg * yk + (M * ch.Gkk).sum(-1)
    dr = -ch.eta * xv / (ch.r * ch.r)
    # decay, per g_r (see the module docstring)
    ZG = dAqk * ch.Aqk + Me * ch.Gkk
    direct = s * ch.eg * (ch.qh * dOSt).sum(-1) + ch.eta * ch.eg * yk
    z = ch.egn * ((ch.kh @ dS_out) * N).sum(-1)
    tail = ch.eg[..., -1] * (dS_out * S_in).sum((-2, -1))
    up = lower.mT.to(dt)                                                   # up[r, i] = i >= r
    dg = (((up @ ZG) * strict).sum(-1) + (up @ direct[..., None]).squeeze(-1)
          + (strict.to(dt) @ z[..., None]).squeeze(-1) + tail[..., None])
    return ChunkGrads(dqh=dqh, dkh=dkh, dv=dv, deta=deta, dr=dr, dg=dg)


def finish(q, k, g, dqh, dkh, dr, dg, *, eps: float, normalize_q: bool) -> tuple:
    """Stage 4 (per token): (dq, dk [B, T, H, K], dg [B, T, HV]) from raw q, k [B, T, H, K], g [B, T, HV] and the
    per-value-head dQ^, dK^ [B, T, HV, K], dr, dg [B, T, HV]."""
    B, T, H, K = k.shape
    G = dkh.shape[2] // H
    dqh = dqh.reshape(B, T, H, G, K).sum(3)
    dkh = dkh.reshape(B, T, H, G, K).sum(3)
    dr = dr.reshape(B, T, H, G).sum(3)
    r = torch.sqrt((k * k).sum(-1, keepdim=True) + eps)
    kh = k / r
    dk = (dkh - (kh * dkh).sum(-1, keepdim=True) * kh) / r + dr[..., None] * kh
    if normalize_q:
        rho = torch.rsqrt((q * q).sum(-1, keepdim=True) + QNORM_EPS)
        qh = q * rho
        dq = rho * (dqh - (qh * dqh).sum(-1, keepdim=True) * qh)
    else:
        dq = dqh
    dg = dg.masked_fill(g < G_FLOOR, 0.0)                                 # d max(g, floor) / dg
    return dq, dk, dg


@torch.no_grad()
def chunk_kla_normalized_bwd(q, k, v, g, eta, do, *, dht: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
                             initial_state: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                             chunk_size: int = 64) -> dict:
    """Gradients of ``chunk_kla`` for ``do`` [B, T, HV, V] and ``dht`` [N, HV, K, V] (None = 0), stage by stage in the
    normalized form. Arguments and results as :func:`kla_tl.reference_bwd.chunk_kla_reference_bwd`:
    ``{"dq", "dk", "dv", "dg", "deta", "dh0"}`` in the dtypes of q, k, v, g, eta, initial_state (dh0 None without it).
    """
    B, T, H, K, HV, V, G, scale = bwd_dims("chunk_kla_normalized_bwd", q, v, scale, chunk_size)
    cdt = state_dtype_for(q.dtype)
    dev = q.device
    qf, kf, vf, gf, ef, dof = (x.to(cdt) for x in (q, k, v, g, eta, do))
    qe, ke = qf.repeat_interleave(G, dim=2), kf.repeat_interleave(G, dim=2)      # [B, T, HV, K]
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    seqs = [(b, 0, T) for b in range(B)] if cu is None else [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    zeros = lambda *shape: torch.zeros(*shape, dtype=cdt, device=dev)
    dqh, dkh, dv = zeros(B, T, HV, K), zeros(B, T, HV, K), zeros(B, T, HV, V)
    dr, dg, deta = zeros(B, T, HV), zeros(B, T, HV), zeros(B, T, HV)
    dh0 = zeros(len(seqs), HV, K, V)
    for i, (b, bos, eos) in enumerate(seqs):
        bounds = [(c0, min(c0 + chunk_size, eos)) for c0 in range(bos, eos, chunk_size)]
        rows = lambda x, c0, c1: x[b, c0:c1].transpose(0, 1)                   # [HV, n, *]
        chunks = [prepare_chunk(*(rows(x, c0, c1) for x in (qe, ke, vf, gf, ef)), scale=scale, eps=eps,
                                normalize_q=normalize_q) for c0, c1 in bounds]                     # 1
        h0 = initial_state[i].to(cdt) if initial_state is not None else zeros(HV, K, V)
        S_in, Ns, _ = state_sweep(chunks, h0)
        dOs = [rows(dof, c0, c1) for c0, c1 in bounds]
        dS_end = dht[i].to(cdt) if dht is not None else zeros(HV, K, V)
        dS_out, dNs, dh0[i] = dstate_sweep(chunks, dOs, dS_end)                                    # 2
        for (c0, c1), ch, S, N, dS, dN, dO in zip(bounds, chunks, S_in, Ns, dS_out, dNs, dOs):
            gr = chunk_grads(ch, S, N, dS, dN, dO)                                                 # 3
            for dst, src in ((dqh, gr.dqh), (dkh, gr.dkh), (dv, gr.dv), (dr, gr.dr), (dg, gr.dg), (deta, gr.deta)):
                dst[b, c0:c1] = src.transpose(0, 1)
    dq, dk, dg = finish(qf, kf, gf, dqh, dkh, dr, dg, eps=eps, normalize_q=normalize_q)              # 4
    return grads_as_inputs(q, k, v, g, eta, initial_state, dq, dk, dv, dg, deta, dh0)
