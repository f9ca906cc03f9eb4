"""Chunk-parallel torch backward of ``chunk_kla`` (KLA.md section 6), in the stages of the future TileLang kernels.

Same arguments and results as :func:`kla_tl.reference_bwd.chunk_kla_reference_bwd` (the per-chunk loop, kept as the
oracle), but only the two state recurrences run sequentially, one batched GEMM per chunk step each; everything else
is batched over all chunks of all sequences at once. This is plain torch (no TileLang kernel yet).

Layout. A dense batch is B packed sequences of T tokens, so dense and varlen share one path. Every sequence is cut
into chunks of C rows; the last chunk is zero-padded to C rows (q = k = v = do = 0, g = 0, eta = 0), which makes
every padded row contribute exactly nothing: beta = 0 and k = 0 give A, W, U, N = 0 on padded rows and columns, and
g = 0 keeps the cumulative decay flat, so gamma at row C - 1 is gamma_n of the last *valid* row. Chunks are stored
step-major over the sequences sorted by chunk count (longest first): the chunks of step i are one contiguous slice
``[off_i, off_i + n_i)`` whose row r belongs to the r-th longest sequence, so a sweep step reads and writes slices
(no gather). Chunk tensors are ``[NC, HV, C, *]`` (value heads; q/k rows are repeated over the GVA group).

Stages (``per chunk`` = batched over all NC chunks; ``sweep`` = sequential over chunk steps, batched over
sequences and heads)::

    1 wy_recompute (per chunk)   gamma = cumsum(max(g, G_FLOOR)), Gam, beta = eta / (||k||^2 + eps),
                                 L = (I + StrictLower(diag(beta) K K^T * Gam))^-1, W = L diag(beta e^gamma) K,
                                 U = L diag(beta) V, and the affine state map of the chunk
                                 Ms = e^{gamma_n} I - Kd W  [K, K],  Bs = Kd U  [K, V],
                                 with Kd = K^T diag(e^{gamma_n - gamma})
    2 state_sweep (sweep)        S_in(next chunk) = Ms S_in + Bs                           -> S_in [NC, HV, K, V]
    3 dstate_coeffs (per chunk)  N = U - W S_in, P = s (Q^ K^T * Gam), Br = (s diag(e^gamma) Q^ - P W)^T dO
    4 dstate_sweep (sweep)       dS_out(previous chunk) = Ms^T dS_out + Br (dS_out = dht at a sequence's end; the
                                 first chunk's result is dh0)                                -> dS_out [NC, HV, K, V]
    5 chunk_grads (per chunk)    dq^, dk, dv, dbeta, dg per value head (the adjoint of KLA.md 6, all chunks at once)
    6 finish (per chunk)         dk -= (sum over the group of 2 beta dbeta / D) k, deta = dbeta / D, GVA group sums,
                                 q-norm backward, scatter the rows back to tokens

Ms / Ms^T is the same map both ways (S_out = Ms S_in + Bs  <=>  dS_in = Ms^T dS_out + Br), so each sweep step is one
``baddbmm`` writing straight into the next slice; the price is two extra [NC, HV, K, K|V] tensors (Ms, Bs / Br).
A TileLang sweep kernel keeps S in registers/shared memory and does fla's two GEMMs per step instead (no Ms).
Peak memory: S_in, dS_out, Ms and Bs-or-Br, each [NC, HV, K, V]-sized (K x K for Ms), in the compute dtype, plus
[NC, HV, C, C | K | V] chunk-row intermediates.

Gates: g is floored at ``G_FLOOR`` = -100 as in the forward kernels (exp(-100) ~ 3.7e-44 is below every term that
matters, and a finite gamma keeps exp(gamma_i - gamma_j) free of (-inf) - (-inf)); dg is 0 where g < G_FLOOR, as in
the exact reference up to exp(g) (every term of dg_r carries a factor exp(g_r); it is exactly 0 at g = -inf).
Gam_ij = exp(gamma_i - gamma_j) comes from the chunk-local cumsum, like the kernels, not from the reference's exact
segment sums: in float32 the difference carries ~|gamma| * 2^-24 absolute error, which only shows after long runs of
strongly negative gates inside a chunk (40 tokens at the floor: ~3e-5 relative on the gradients, vs ~2e-7).
Arithmetic in float32 (float64 for float64 q), like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .conventions import DEFAULT_EPS, QNORM_EPS, state_dtype_for
from .kernels._tl import G_FLOOR
from .reference_bwd import bwd_dims, grads_as_inputs

__all__ = ["ChunkPlan", "plan_chunks", "chunk_kla_torch_bwd"]


# ------------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class ChunkPlan:
    """Where every chunk row comes from, and the order the sweeps walk the chunks in (see the module docstring).

    Tensors live on the device of the call; ``C``, ``NC``, ``steps`` and ``padded`` are host data.
    """

    #: rows per chunk
    C: int
    #: number of chunks (all sequences)
    NC: int
    #: (offset, count) of the chunks of each step: the first chunks of the ``count`` longest sequences, ...
    steps: tuple
    #: [N] sorted rank -> sequence index (longest first; stable)
    order: torch.Tensor
    #: [NC, C] token index in the flattened [B * T] axis (0 on padded rows)
    tok: torch.Tensor
    #: [NC, C] True on rows that hold a token
    valid: torch.Tensor
    #: [B * T] chunk row (c * C + i) of every token
    row_of_token: torch.Tensor
    #: [n_0] index of the last chunk of each sorted sequence that has at least one chunk
    last: torch.Tensor
    #: some chunk has padded rows (a sequence length is not a multiple of C)
    padded: bool
    #: gather / scatter row indices of :func:`_to_chunks` / :func:`_from_chunks`, built on first use per head layout
    index_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def gather_index(self, Hx: int, heads: int) -> torch.Tensor:
        """[NC * heads * C] rows of a [B * T * Hx, D] input: output head h reads head h // (heads // Hx)."""
        key = ("gather", Hx, heads)
        if key not in self.index_cache:
            h = torch.arange(heads, device=self.tok.device) // (heads // Hx)
            self.index_cache[key] = (self.tok[:, None, :] * Hx + h[None, :, None]).flatten()
        return self.index_cache[key]

    def scatter_index(self, Hx: int) -> torch.Tensor:
        """[B * T * Hx] rows of a [NC * Hx * C, D] chunk tensor holding each (token, head)."""
        key = ("scatter", Hx)
        if key not in self.index_cache:
            r, C = self.row_of_token, self.C
            h = torch.arange(Hx, device=r.device)
            self.index_cache[key] = (((r // C)[:, None] * Hx + h) * C + (r % C)[:, None]).flatten()
        return self.index_cache[key]


_PLANS: dict = {}
#: Plans kept (dense training repeats one layout; varlen layouts change every batch, so keep few).
_PLAN_CACHE_SIZE = 8


def plan_chunks(B: int, T: int, cu: Optional[list], C: int, device) -> ChunkPlan:
    """The :class:`ChunkPlan` of a dense batch (``cu`` None) or of packed sequences (``cu`` a host list). Cached."""
    key = (B, T, None if cu is None else tuple(cu), C, str(device))
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    i64 = torch.int64
    if cu is None:
        bos = torch.arange(B, dtype=i64) * T
        lens = torch.full((B,), T, dtype=i64)
    else:
        cut = torch.tensor(cu, dtype=i64)
        bos, lens = cut[:-1], cut[1:] - cut[:-1]
    nch = (lens + C - 1) // C
    order = torch.argsort(-nch, stable=True)
    nch_s, bos_s, eos_s = nch[order], bos[order], (bos + lens)[order]
    max_nt = int(nch_s[0]) if nch_s.numel() else 0
    active = nch_s[None, :] > torch.arange(max_nt, dtype=i64)[:, None]          # [max_nt, N] (step, rank)
    counts = active.sum(1)
    offs = torch.cumsum(counts, 0) - counts
    step_i, rank = active.nonzero(as_tuple=True)                                  # step-major
    start = bos_s[rank] + step_i * C
    tok = start[:, None] + torch.arange(C, dtype=i64)
    valid = tok < eos_s[rank][:, None]
    tok = torch.where(valid, tok, torch.zeros((), dtype=i64))
    NC = int(tok.shape[0])
    row_of_token = torch.zeros(B * T, dtype=i64)
    row_of_token[tok[valid]] = torch.arange(NC * C, dtype=i64).view(NC, C)[valid]
    n0 = int(counts[0]) if max_nt else 0
    last = offs[nch_s[:n0] - 1] + torch.arange(n0, dtype=i64)
    plan = ChunkPlan(C=C, NC=NC, steps=tuple(zip(offs.tolist(), counts.tolist())), order=order.to(device),
                     tok=tok.to(device), valid=valid.to(device), row_of_token=row_of_token.to(device),
                     last=last.to(device), padded=bool((~valid).any()))
    while len(_PLANS) >= _PLAN_CACHE_SIZE:          # oldest first: a plan holds O(T * HV) indices on the device
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan
    return plan


def _to_chunks(x: torch.Tensor, plan: ChunkPlan, heads: int, cdt: torch.dtype) -> torch.Tensor:
    """[B, T, Hx, D] (or [B, T, Hx]) -> [NC, heads, C, D] (or [NC, heads, C]) in ``cdt``, zero on padded rows.

    ``heads`` is a multiple of Hx; output head h reads input head h // (heads // Hx) (the GVA expansion)."""
    flat = x.dim() == 3
    if flat:
        x = x.unsqueeze(-1)
    B, T, Hx, D = x.shape
    y = x.reshape(B * T * Hx, D).index_select(0, plan.gather_index(Hx, heads)).view(plan.NC, heads, plan.C, D)
    y = y.to(cdt) if y.dtype != cdt else y                                        # fresh either way
    if plan.padded:
        y.masked_fill_(~plan.valid[:, None, :, None], 0)
    return y.squeeze(-1) if flat else y


def _from_chunks(y: torch.Tensor, plan: ChunkPlan, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks` without the expansion: [NC, Hx, C, D] (or [NC, Hx, C]) -> [B, T, Hx, D] (or
    [B, T, Hx]); padded rows are dropped."""
    flat = y.dim() == 3
    if flat:
        y = y.unsqueeze(-1)
    NC, Hx, C, D = y.shape
    out = y.reshape(NC * Hx * C, D).index_select(0, plan.scatter_index(Hx)).view(B, T, Hx, D)
    return out.squeeze(-1) if flat else out


# ------------------------------------------------------------------------------------------------------ stages


@dataclass
class _WY:
    """Stage 1's per-chunk quantities ([NC, HV, C, *])."""

    beta: torch.Tensor      # [NC, HV, C]
    D: torch.Tensor         # [NC, HV, C] ||k||^2 + eps
    eg: torch.Tensor        # [NC, HV, C] e^gamma
    egn: torch.Tensor       # [NC, HV, C] e^{gamma_n - gamma}
    Gam: torch.Tensor       # [NC, HV, C, C] exp(gamma_i - gamma_j), lower incl. diagonal
    Gk: torch.Tensor        # [NC, HV, C, C] K K^T
    L: torch.Tensor         # [NC, HV, C, C] (I + A)^-1
    W: torch.Tensor         # [NC, HV, C, K]
    U: torch.Tensor         # [NC, HV, C, V]


def wy_recompute(kc, vc, gc, ec, *, eps):
    """Stage 1 (per chunk): the WY quantities and the chunk's affine state map (Ms [NC, HV, K, K], Bs [.., K, V])."""
    C, dev, cdt = kc.shape[-2], kc.device, kc.dtype
    idx = torch.arange(C, device=dev)
    lower = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    gamma = gc.clamp_min(G_FLOOR).cumsum(-1)                                      # finite, chunk-local
    eg = torch.exp(gamma)
    egn = torch.exp(gamma[..., -1:] - gamma)
    Gam = torch.exp(torch.where(lower, gamma[..., :, None] - gamma[..., None, :],
                                torch.full((), -torch.inf, dtype=cdt, device=dev)))
    D = (kc * kc).sum(-1) + eps
    beta = ec / D
    Gk = kc @ kc.mT
    A = torch.where(strict, beta[..., :, None] * Gk * Gam, torch.zeros((), dtype=cdt, device=dev))
    eye = torch.eye(C, dtype=cdt, device=dev)
    L = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    W = L @ ((beta * eg)[..., None] * kc)
    U = L @ (beta[..., None] * vc)
    Kd = (egn[..., None] * kc).mT                                                 # [NC, HV, K, C]
    K = kc.shape[-1]
    Ms = torch.baddbmm(_bflat(eg[..., -1, None, None] * torch.eye(K, dtype=cdt, device=dev)), _bflat(Kd), _bflat(W),
                       alpha=-1).view(*W.shape[:2], K, K)
    Bs = (Kd @ U)
    return _WY(beta=beta, D=D, eg=eg, egn=egn, Gam=Gam, Gk=Gk, L=L, W=W, U=U), Ms, Bs


def _bflat(x: torch.Tensor) -> torch.Tensor:
    """[a, b, m, n] -> [a * b, m, n] (a view for the chunk tensors; baddbmm wants 3-D operands)."""
    return x.reshape(-1, *x.shape[-2:])


def state_sweep(Ms: torch.Tensor, Bs: torch.Tensor, h0: Optional[torch.Tensor], plan: ChunkPlan) -> torch.Tensor:
    """Stage 2 (sequential): S_in of every chunk, [NC, HV, K, V]. One baddbmm per step."""
    NC, HV, K, V = Bs.shape
    S_in = torch.empty(NC, HV, K, V, dtype=Bs.dtype, device=Bs.device)
    off0, n0 = plan.steps[0]
    if h0 is None:
        S_in[off0:off0 + n0].zero_()
    else:
        torch.index_select(h0.to(Bs.dtype), 0, plan.order[:n0], out=S_in[off0:off0 + n0])
    for (off, _), (nxt, n) in zip(plan.steps[:-1], plan.steps[1:]):
        # the n sequences still running are the first n rows of this step's slice
        torch.baddbmm(_bflat(Bs[off:off + n]), _bflat(Ms[off:off + n]), _bflat(S_in[off:off + n]),
                      out=_bflat(S_in[nxt:nxt + n]))
    return S_in


def dstate_coeffs(qh, kc, doc, wy: _WY, S_in, *, scale):
    """Stage 3 (per chunk): N = U - W S_in, P = s (Q^ K^T * Gam) and the dO-part of dS_in, Br [NC, HV, K, V]."""
    Nn = torch.baddbmm(_bflat(wy.U), _bflat(wy.W), _bflat(S_in), alpha=-1).view_as(wy.U)
    P = scale * (qh @ kc.mT) * wy.Gam
    Br = ((scale * wy.eg)[..., None] * qh - P @ wy.W).mT @ doc
    return Nn, P, Br


def dstate_sweep(Ms: torch.Tensor, Br: torch.Tensor, dht: Optional[torch.Tensor], plan: ChunkPlan, N: int):
    """Stage 4 (sequential): dS_out of every chunk [NC, HV, K, V] and dh0 [N, HV, K, V]. One baddbmm per step."""
    NC, HV, K, V = Br.shape
    dS_out = torch.empty(NC, HV, K, V, dtype=Br.dtype, device=Br.device)
    n0 = plan.steps[0][1]
    if dht is None:
        dS_out.index_fill_(0, plan.last, 0)
        dh0_s = torch.zeros(N, HV, K, V, dtype=Br.dtype, device=Br.device)
    else:
        dht_s = dht.to(Br.dtype).index_select(0, plan.order)                      # sorted; rows >= n0: empty seqs
        dS_out.index_copy_(0, plan.last, dht_s[:n0])
        dh0_s = dht_s
    for i in range(len(plan.steps) - 1, -1, -1):
        off, n = plan.steps[i]
        if i > 0:
            prev = plan.steps[i - 1][0]
            target = dS_out[prev:prev + n]
        else:
            target = dh0_s[:n]
        torch.baddbmm(_bflat(Br[off:off + n]), _bflat(Ms[off:off + n]).mT, _bflat(dS_out[off:off + n]),
                      out=_bflat(target))
    dh0 = torch.empty_like(dh0_s).index_copy_(0, plan.order, dh0_s)
    return dS_out, dh0


def chunk_grads(qh, kc, vc, doc, wy: _WY, S_in, dS_out, Nn, P, *, scale):
    """Stage 5 (per chunk): dq^, dk (without the beta chain rule), dv, dbeta and dg, per value head."""
    C, dev, cdt = kc.shape[-2], kc.device, kc.dtype
    idx = torch.arange(C, device=dev)
    lower = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    zero = torch.zeros((), dtype=cdt, device=dev)
    beta, eg, egn, Gam, Gk, L = wy.beta, wy.eg, wy.egn, wy.Gam, wy.Gk, wy.L
    dP = torch.where(lower, doc @ Nn.mT, zero)
    KdS = kc @ dS_out                                                              # [.., C, V]: K_j dS_out
    dN = P.mT @ doc + egn[..., None] * KdS
    dX = L.mT @ dN
    dOSt = doc @ S_in.mT                                                           # [.., C, K]
    dY = -(dX @ S_in.mT)
    dv = beta[..., None] * dX
    M = torch.where(strict, -(dX @ Nn.mT), zero) * Gam
    dPG = dP * Gam
    dq = scale * eg[..., None] * dOSt + scale * (dPG @ kc)
    bM = beta[..., None] * M
    NdSt = Nn @ dS_out.mT                                                          # [.., C, K]
    dk = scale * (dPG.mT @ qh) + egn[..., None] * NdSt + (beta * eg)[..., None] * dY + (bM + bM.mT) @ kc
    dYK = (dY * kc).sum(-1)
    dbeta = (dX * vc).sum(-1) + eg * dYK + (M * Gk).sum(-1)
    # dg_r = sum_{i >= r, j < r} ZG_ij (Gam-weighted products, never as rowsum - colsum) + sum_{i >= r} direct_i
    #        + sum_{j < r} z_j + tail  (see reference_bwd._dg_chunk)
    ZG = dP * P + bM * Gk
    direct = scale * eg * (qh * dOSt).sum(-1) + beta * eg * dYK                  # e^gamma-weighted terms
    z = egn * (kc * NdSt).sum(-1)                                                  # S_out's e^{gamma_n - gamma_j} term
    tail = wy.eg[..., -1] * (_bflat(dS_out.flatten(-2)[..., None, :]) @ _bflat(S_in.flatten(-2)[..., :, None])
                             ).view(eg.shape[:-1])                                 # e^{gamma_n} <dS_out, S_in>
    ge = (~strict).to(cdt)                                                         # ge[r, i] = i >= r
    dg = ((ge @ ZG) * strict).sum(-1) + (ge @ direct[..., None]).squeeze(-1) \
        + (strict.to(cdt) @ z[..., None]).squeeze(-1) + tail[..., None]
    return dq, dk, dv, dbeta, dg


# ------------------------------------------------------------------------------------------------------ entry


@torch.no_grad()
def chunk_kla_torch_bwd(q, k, v, g, eta, do, *, dht: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        eps: float = DEFAULT_EPS, normalize_q: bool = False,
                        initial_state: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                        chunk_size: int = 64) -> dict:
    """Gradients of the chunkwise KLA forward for ``do`` [B, T, HV, V] and ``dht`` [N, HV, K, V] (None = 0).

    Arguments and results as :func:`kla_tl.reference_bwd.chunk_kla_reference_bwd`: returns
    ``{"dq", "dk", "dv", "dg", "deta", "dh0"}`` in the dtypes of q, k, v, g, eta and initial_state (``dh0`` None
    without ``initial_state``); arithmetic in float64 for float64 q, else float32. Reads ``cu_seqlens`` on the host.
    """
    B, T, H, K, HV, V, G, scale = bwd_dims("chunk_kla_torch_bwd", q, v, scale, chunk_size)
    cdt = state_dtype_for(q.dtype)
    dev = q.device
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    N = B if cu is None else len(cu) - 1
    plan = plan_chunks(B, T, cu, chunk_size, dev)

    def result(dq, dk, dv, dg, deta, dh0):
        return grads_as_inputs(q, k, v, g, eta, initial_state, dq, dk, dv, dg, deta, dh0)

    if plan.NC == 0:  # no token at all: the state passes through
        z = lambda *s: torch.zeros(*s, dtype=cdt, device=dev)
        dh0 = dht.to(cdt).clone() if dht is not None else z(N, HV, K, V)
        return result(z(B, T, H, K), z(B, T, H, K), z(B, T, HV, V), z(B, T, HV), z(B, T, HV), dh0)

    # chunk rows: q/k expanded to value heads; padded rows are zeros (g = 0, eta = 0 included)
    qc = _to_chunks(q, plan, HV, cdt)
    kc = _to_chunks(k, plan, HV, cdt)
    vc = _to_chunks(v, plan, HV, cdt)
    doc = _to_chunks(do, plan, HV, cdt)
    gc = _to_chunks(g, plan, HV, cdt)
    ec = _to_chunks(eta, plan, HV, cdt)
    if normalize_q:
        rho = torch.rsqrt((qc * qc).sum(-1, keepdim=True) + QNORM_EPS)
        qh = qc * rho
    else:
        qh = qc

    wy, Ms, Bs = wy_recompute(kc, vc, gc, ec, eps=eps)                            # 1
    S_in = state_sweep(Ms, Bs, initial_state, plan)                                # 2
    del Bs
    Nn, P, Br = dstate_coeffs(qh, kc, doc, wy, S_in, scale=scale)                  # 3
    dS_out, dh0 = dstate_sweep(Ms, Br, dht, plan, N)                               # 4
    del Ms, Br
    dqe, dke, dv, dbeta, dg = chunk_grads(qh, kc, vc, doc, wy, S_in, dS_out, Nn, P, scale=scale)   # 5
    del S_in, dS_out

    # 6: beta = eta / D chain rule (D per q/k head, beta per value head), GVA group sums, q-norm backward
    dg = torch.where(gc >= G_FLOOR, dg, torch.zeros((), dtype=cdt, device=dev))    # d max(g, floor) / dg
    deta = dbeta / wy.D
    NC, C = plan.NC, plan.C
    coef = (2.0 * wy.beta * dbeta / wy.D).view(NC, H, G, C).sum(2)                 # [NC, H, C]
    kh = kc.view(NC, H, G, C, K)[:, :, 0]
    dk = dke.view(NC, H, G, C, K).sum(2) - coef[..., None] * kh
    dqh = dqe.view(NC, H, G, C, K).sum(2)
    if normalize_q:
        qhh = qh.view(NC, H, G, C, K)[:, :, 0]
        rhoh = rho.view(NC, H, G, C, 1)[:, :, 0]
        dq = rhoh * (dqh - (qhh * dqh).sum(-1, keepdim=True) * qhh)
    else:
        dq = dqh
    out = (_from_chunks(x, plan, B, T) for x in (dq, dk, dv, dg, deta))
    return result(*out, dh0)
