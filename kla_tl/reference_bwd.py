"""Hand-written chunkwise backward of KLA in plain torch (KLA.md section 6), without torch.autograd.

This is the oracle of the backward kernels: it recomputes, per chunk, the forward quantities of
:func:`kla_tl.reference.chunk_kla_reference` and sweeps the chunks in reverse. Per chunk of n rows and value head
(row-vector convention, S in R^{K x V})::

    gamma  = chunk-local cumsum of g,  Gam_ij = exp(gamma_i - gamma_j) (i >= j, else 0)
    D      = ||k||^2 + eps (raw keys),  beta = eta / D
    A      = StrictLower(diag(beta) K K^T * Gam),  L = (I + A)^-1
    X      = diag(beta) V,  Y = diag(beta e^gamma) K,  U = L X,  W = L Y,  N = U - W S_in
    P      = s (Q^ K^T * Gam)                          (lower incl. diagonal)
    O      = s diag(e^gamma) Q^ S_in + P N
    S_out  = e^{gamma_n} S_in + K^T diag(e^{gamma_n - gamma}) N

and the adjoint, given dO and dS_out (dht, or 0, for the last chunk)::

    dP = Lower(dO N^T),   dN = P^T dO + diag(e^{gamma_n - gamma}) K dS_out
    dS_in = s Q^T diag(e^gamma) dO + e^{gamma_n} dS_out - W^T dN
    dX = L^T dN,  dY = -dX S_in^T,  dV = diag(beta) dX,  dA = -dX N^T,  M = StrictLower(dA) * Gam
    dQ^ = s diag(e^gamma) dO S_in^T + s (dP * Gam) K
    dK  = s (dP * Gam)^T Q^ + diag(e^{gamma_n - gamma}) N dS_out^T + diag(beta e^gamma) dY
          + (diag(beta) M + M^T diag(beta)) K
    dbeta = rowsum(dX * V) + e^gamma * rowsum(dY * K) + rowsum(M * K K^T)

The decay gradient is accumulated directly per g_r (dg = reverse cumsum of dgamma, but written so that the
row/column terms of the Gam-weighted products never cancel, see :func:`_dg_chunk`). Then the KLA chain rule:
dk_t -= (sum over the value heads of the group of 2 beta dbeta / D) k_t, deta = dbeta / D; GVA group sums of dq/dk;
the q-normalization backward dq = rho (dq^ - (q^ . dq^) q^).
"""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import DEFAULT_EPS, QNORM_EPS
from .reference import _segsum, compute_dtype

__all__ = ["chunk_kla_reference_bwd"]


def bwd_dims(fn: str, q: torch.Tensor, v: torch.Tensor, scale: Optional[float], chunk_size: int) -> tuple:
    """(B, T, H, K, HV, V, G, scale) of a chunk backward call, the scale defaulted to K^-1/2; ``chunk_size`` checked.
    Shared by the backward implementations (this oracle and :mod:`kla_tl.chunk_bwd`)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    return B, T, H, K, HV, V, HV // H, (K ** -0.5 if scale is None else float(scale))


def grads_as_inputs(q, k, v, g, eta, initial_state, dq, dk, dv, dg, deta, dh0) -> dict:
    """The result dict of a chunk backward: each gradient in its input's dtype (``dh0`` None without h0)."""
    return {"dq": dq.to(q.dtype), "dk": dk.to(k.dtype), "dv": dv.to(v.dtype), "dg": dg.to(g.dtype),
            "deta": deta.to(eta.dtype), "dh0": None if initial_state is None else dh0.to(initial_state.dtype)}


def _dg_chunk(ZG: torch.Tensor, dgam_direct: torch.Tensor, z: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """dg of one chunk (all rows / heads at once).

    ZG [.., n, n]: sum of dX_ij * X_ij over every product weighted by Gam_ij (lower incl. diagonal); such a term
    depends on g_r for j < r <= i, so dg_r gets sum_{i >= r, j < r} ZG_ij (== reverse cumsum of rowsum - colsum).
    dgam_direct [.., n]: terms in e^{gamma_i} (reverse-cumsummed). z [.., n]: the e^{gamma_n - gamma_j} terms of S_out,
    which give dg_r += sum_{j < r} z_j. tail [..]: the d/dgamma_n of e^{gamma_n} S_in (added to every r).
    """
    n = ZG.shape[-1]
    # R[r, j] = sum_{i >= r} ZG[i, j]
    R = ZG.flip(-2).cumsum(-2).flip(-2)
    strict = torch.tril(torch.ones(n, n, dtype=torch.bool, device=ZG.device), -1)
    dg = torch.where(strict, R, torch.zeros((), dtype=R.dtype, device=R.device)).sum(-1)
    dg = dg + dgam_direct.flip(-1).cumsum(-1).flip(-1)
    dg = dg + (z.cumsum(-1) - z)                      # exclusive cumsum: sum_{j < r} z_j
    return dg + tail[..., None]


def _chunk_scan_bwd(qf, kf, vf, gf, ef, dof, S0, dS, bos, eos, *, chunk_size, scale, eps, cdt):
    """Backward over tokens [bos, eos) of the rows of ``qf`` (rows share the bounds).

    qf (normalized q, expanded to value heads), kf (expanded), vf: [R, T, HV, *]; gf, ef: [R, T, HV]; dof [R, T, HV, V];
    S0 [R, HV, K, V] state before ``bos``; dS [R, HV, K, V] gradient of the state after ``eos``.
    Returns (dq^, dk, dv, dbeta, dg) on the token range, each [R, eos - bos, HV, *], and dS0 [R, HV, K, V].
    dk here is the kernel part only (no beta chain rule); dq^/dk are per value head.
    """
    R, HV, K, V = S0.shape
    dev = qf.device
    zero = torch.zeros((), dtype=cdt, device=dev)
    L_tok = eos - bos
    dq = torch.zeros(R, L_tok, HV, K, dtype=cdt, device=dev)
    dk = torch.zeros(R, L_tok, HV, K, dtype=cdt, device=dev)
    dv = torch.zeros(R, L_tok, HV, V, dtype=cdt, device=dev)
    dbeta = torch.zeros(R, L_tok, HV, dtype=cdt, device=dev)
    dg = torch.zeros(R, L_tok, HV, dtype=cdt, device=dev)
    bounds = [(c0, min(c0 + chunk_size, eos)) for c0 in range(bos, eos, chunk_size)]

    def recompute(c0, c1, S):
        n = c1 - c0
        Qc = qf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n, K]
        Kc = kf[:R, c0:c1].transpose(1, 2)
        Vc = vf[:R, c0:c1].transpose(1, 2)
        gc = gf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n]
        beta = ef[:R, c0:c1].transpose(1, 2) / ((Kc * Kc).sum(-1) + eps)
        Gam = _segsum(gc)
        eg = Gam[..., :, 0] * torch.exp(gc[..., :1])           # e^{gamma_i}
        egn = Gam[..., -1, :]                                  # e^{gamma_n - gamma_j}
        strict = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev), -1)
        Gk = Kc @ Kc.transpose(-1, -2)
        A = torch.where(strict, beta[..., :, None] * Gk * Gam, zero)
        eye = torch.eye(n, dtype=cdt, device=dev).expand(R, HV, n, n)
        L = torch.linalg.solve_triangular(eye + A, eye, upper=False, unitriangular=True)
        W = L @ ((beta * eg)[..., :, None] * Kc)
        U = L @ (beta[..., :, None] * Vc)
        Nn = U - W @ S
        return dict(Qc=Qc, Kc=Kc, Vc=Vc, beta=beta, Gam=Gam, eg=eg, egn=egn, strict=strict, Gk=Gk, L=L, W=W, N=Nn)

    # forward sweep: the state entering every chunk
    S_in = []
    S = S0
    for c0, c1 in bounds:
        S_in.append(S)
        f = recompute(c0, c1, S)
        S = f["eg"][..., -1, None, None] * S + f["Kc"].transpose(-1, -2) @ (f["egn"][..., :, None] * f["N"])

    # reverse sweep
    for (c0, c1), S in zip(reversed(bounds), reversed(S_in)):
        f = recompute(c0, c1, S)
        Qc, Kc, Vc, beta, Gam, eg, egn = f["Qc"], f["Kc"], f["Vc"], f["beta"], f["Gam"], f["eg"], f["egn"]
        L, W, Nn, Gk, strict = f["L"], f["W"], f["N"], f["Gk"], f["strict"]
        n = c1 - c0
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
        dO = dof[:R, c0:c1].transpose(1, 2)                    # [R, HV, n, V]
        P = scale * (Qc @ Kc.transpose(-1, -2)) * Gam           # lower incl. diagonal (Gam is 0 above)
        dP = torch.where(lower, dO @ Nn.transpose(-1, -2), zero)
        KdS = Kc @ dS                                          # [R, HV, n, V]: K_j dS_out
        dN = P.transpose(-1, -2) @ dO + egn[..., :, None] * KdS
        egn_last = eg[..., -1]                                 # e^{gamma_n}
        QS = Qc @ S                                            # [R, HV, n, V]
        dS_in = (scale * Qc.transpose(-1, -2) @ (eg[..., :, None] * dO) + egn_last[..., None, None] * dS
                 - W.transpose(-1, -2) @ dN)
        dX = L.transpose(-1, -2) @ dN
        dY = -dX @ S.transpose(-1, -2)
        dVc = beta[..., :, None] * dX
        dA = -dX @ Nn.transpose(-1, -2)
        M = torch.where(strict, dA, zero) * Gam
        dPG = dP * Gam
        dQc = scale * eg[..., :, None] * (dO @ S.transpose(-1, -2)) + scale * dPG @ Kc
        bM = beta[..., :, None] * M
        dKc = (scale * dPG.transpose(-1, -2) @ Qc + egn[..., :, None] * (Nn @ dS.transpose(-1, -2))
               + (beta * eg)[..., :, None] * dY + (bM + bM.transpose(-1, -2)) @ Kc)
        dYK = (dY * Kc).sum(-1)
        dbc = (dX * Vc).sum(-1) + eg * dYK + (M * Gk).sum(-1)
        # decay: Gam-weighted products (P and A), e^gamma-weighted ones (O's state term, Y), S_out's two terms
        ZG = dP * P + bM * Gk
        direct = scale * eg * (dO * QS).sum(-1) + beta * eg * dYK
        z = egn * (KdS * Nn).sum(-1)
        tail = egn_last * (dS * S).sum((-1, -2))
        dgc = _dg_chunk(ZG, direct, z, tail)
        o0, o1 = c0 - bos, c1 - bos
        dq[:, o0:o1] = dQc.transpose(1, 2)
        dk[:, o0:o1] = dKc.transpose(1, 2)
        dv[:, o0:o1] = dVc.transpose(1, 2)
        dbeta[:, o0:o1] = dbc.transpose(1, 2)
        dg[:, o0:o1] = dgc.transpose(1, 2)
        dS = dS_in
    return dq, dk, dv, dbeta, dg, dS


def chunk_kla_reference_bwd(q, k, v, g, eta, do, *, dht: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                            eps: float = DEFAULT_EPS, normalize_q: bool = False,
                            initial_state: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                            chunk_size: int = 64) -> dict:
    """Gradients of :func:`kla_tl.reference.chunk_kla_reference` for the output gradient ``do`` [B, T, HV, V] and the
    final-state gradient ``dht`` [N, HV, K, V] (None = 0), computed chunkwise without autograd.

    Returns ``{"dq", "dk", "dv", "dg", "deta", "dh0"}`` in the dtypes of q, k, v, g, eta and initial_state;
    ``dh0`` is None without ``initial_state``. Arithmetic in float64 for float64 q, else float32.
    """
    B, T, H, K, HV, V, G, scale = bwd_dims("chunk_kla_reference_bwd", q, v, scale, chunk_size)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    qf, kf, vf, gf, ef, dof = (x.to(cdt) for x in (q, k, v, g, eta, do))
    if normalize_q:
        rho = torch.rsqrt((qf * qf).sum(-1, keepdim=True) + QNORM_EPS)
        qh = qf * rho
    else:
        qh = qf
    qe = qh.repeat_interleave(G, dim=2)                        # [B, T, HV, K]
    ke = kf.repeat_interleave(G, dim=2)
    step = dict(chunk_size=chunk_size, scale=scale, eps=eps, cdt=cdt)

    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if cu is None:
        S0 = (initial_state.to(cdt) if initial_state is not None
              else torch.zeros(B, HV, K, V, dtype=cdt, device=dev))
        dS = dht.to(cdt) if dht is not None else torch.zeros(B, HV, K, V, dtype=cdt, device=dev)
        dqe, dke, dv, dbeta, dg, dh0 = _chunk_scan_bwd(qe, ke, vf, gf, ef, dof, S0, dS, 0, T, **step)
    else:
        Nseq = len(cu) - 1
        dqe = torch.zeros(1, T, HV, K, dtype=cdt, device=dev)
        dke = torch.zeros(1, T, HV, K, dtype=cdt, device=dev)
        dv = torch.zeros(1, T, HV, V, dtype=cdt, device=dev)
        dbeta = torch.zeros(1, T, HV, dtype=cdt, device=dev)
        dg = torch.zeros(1, T, HV, dtype=cdt, device=dev)
        dh0s = []
        for i in range(Nseq):
            bos, eos = cu[i], cu[i + 1]
            S0 = (initial_state[i:i + 1].to(cdt) if initial_state is not None
                  else torch.zeros(1, HV, K, V, dtype=cdt, device=dev))
            dS = dht[i:i + 1].to(cdt) if dht is not None else torch.zeros(1, HV, K, V, dtype=cdt, device=dev)
            r = _chunk_scan_bwd(qe, ke, vf, gf, ef, dof, S0, dS, bos, eos, **step)
            dqe[:, bos:eos], dke[:, bos:eos], dv[:, bos:eos], dbeta[:, bos:eos], dg[:, bos:eos] = r[:5]
            dh0s.append(r[5][0])
        dh0 = torch.stack(dh0s) if dh0s else torch.zeros(0, HV, K, V, dtype=cdt, device=dev)

    # beta = eta / D chain rule (D per q/k head, beta per value head)
    D = (kf * kf).sum(-1) + eps                                # [B, T, H]
    De = D.repeat_interleave(G, dim=2)                         # [B, T, HV]
    deta = dbeta / De
    beta = ef / De
    coef = (2.0 * beta * dbeta / De).reshape(B, T, H, G).sum(-1)   # [B, T, H]
    dk = dke.reshape(B, T, H, G, K).sum(3) - coef[..., None] * kf
    dqh = dqe.reshape(B, T, H, G, K).sum(3)
    if normalize_q:
        dq = rho * (dqh - (qh * dqh).sum(-1, keepdim=True) * qh)
    else:
        dq = dqh
    return grads_as_inputs(q, k, v, g, eta, initial_state, dq, dk, dv, dg, deta, dh0)
