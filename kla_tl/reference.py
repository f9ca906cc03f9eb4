"""Plain-torch references of KLA: the definition (token recurrence) and the chunkwise WY/UT form.

These run on any device and dtype (float64 included), are differentiable through torch autograd, and are the oracle
of every kernel test and the CPU fallback of the public API. Layouts are those of :mod:`kla_tl.conventions`.

The recurrence (KLA.md section 2), per value head, with row vectors k_t, q_t in R^K, v_t in R^V and S in R^{K x V}::

    D_t = ||k_t||^2 + eps,  beta_t = eta_t / D_t
    S~  = exp(g_t) S_{t-1}
    S_t = S~ + beta_t k_t^T (v_t - k_t S~)
    o_t = scale * q^_t S_t,        q^ = q / sqrt(||q||^2 + 1e-6) if normalize_q else q

GVA: value head ``hv`` reads q/k head ``hv // (HV // H)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import DEFAULT_EPS, QNORM_EPS, sequence_bounds, state_dtype_for, Problem


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the references: float64 for float64 inputs, else float32."""
    return state_dtype_for(dtype)


def l2norm(x: torch.Tensor, eps: float = QNORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (fla's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def beta_from_eta(k: torch.Tensor, eta: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """beta = eta / (||k||^2 + eps) per value head; k [..., H, K], eta [..., HV] -> [..., HV] (computed in eta's dtype)."""
    H, HV = k.shape[-2], eta.shape[-1]
    d = (k.to(eta.dtype) ** 2).sum(-1) + eps
    return eta / d.repeat_interleave(HV // H, dim=-1)


def _prepare(q, k, v, g, eta, scale, normalize_q, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cdt = compute_dtype(q.dtype)
    scale = K ** -0.5 if scale is None else float(scale)
    G = HV // H
    qf, kf, vf, gf, ef = (x.to(cdt) for x in (q, k, v, g, eta))
    if normalize_q:
        qf = l2norm(qf)
    # expand q/k heads to value heads (GVA): [B, T, HV, K]
    qf = qf.repeat_interleave(G, dim=2)
    kf = kf.repeat_interleave(G, dim=2)
    cu = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B if cu is None else len(cu) - 1, dtype=q.dtype,
                   is_varlen=cu is not None, use_h0=initial_state is not None, normalize_q=normalize_q)
    seqs = sequence_bounds(prob, cu)
    return prob, seqs, scale, cdt, qf, kf, vf, gf, ef


def _initial(initial_state, i, HV, K, V, cdt, device):
    if initial_state is None:
        return torch.zeros(HV, K, V, dtype=cdt, device=device)
    return initial_state[i].to(cdt)


def naive_kla(q, k, v, g, eta, *, scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
              initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[torch.Tensor] = None, return_all_states: bool = False):
    """Token-by-token KLA recurrence (the definition).

    Args: as :func:`kla_tl.chunk_kla`. ``return_all_states=True`` also returns the state after every token,
    ``[B, T, HV, K, V]`` in the compute dtype.

    Returns:
        ``(o, final_state)`` (plus the per-token states when asked): o ``[B, T, HV, V]`` in q.dtype;
        final_state ``[N, HV, K, V]`` in float32 (float64 for float64 inputs), or None.
    """
    prob, seqs, scale, cdt, qf, kf, vf, gf, ef = _prepare(q, k, v, g, eta, scale, normalize_q, initial_state,
                                                          cu_seqlens)
    HV, K, V = prob.HV, prob.K, prob.V
    o_rows, finals, states = [], [], []
    for i, (b, bos, eos) in enumerate(seqs):
        S = _initial(initial_state, i, HV, K, V, cdt, q.device)
        for t in range(bos, eos):
            kt, vt, qt = kf[b, t], vf[b, t], qf[b, t]              # [HV, K], [HV, V], [HV, K]
            beta = ef[b, t] / ((kt * kt).sum(-1) + eps)           # [HV]
            S = torch.exp(gf[b, t])[:, None, None] * S
            e = vt - torch.einsum("hk,hkv->hv", kt, S)
            S = S + beta[:, None, None] * kt[:, :, None] * e[:, None, :]
            o_rows.append(scale * torch.einsum("hk,hkv->hv", qt, S))
            if return_all_states:
                states.append(S)
        finals.append(S)
    o = _assemble(o_rows, prob, seqs, q.dtype, cdt, q.device)
    final = torch.stack(finals) if output_final_state else None
    if return_all_states:
        st = torch.stack(states).reshape(prob.B, prob.T, HV, K, V) if states else \
            torch.zeros(prob.B, prob.T, HV, K, V, dtype=cdt, device=q.device)
        return o, final, st
    return o, final


def fused_recurrent_kla_reference(q, k, v, g, eta, *, scale: Optional[float] = None, eps: float = DEFAULT_EPS,
                                  normalize_q: bool = False, initial_state: Optional[torch.Tensor] = None,
                                  output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                                  state_indices: Optional[torch.Tensor] = None, inplace_final_state: bool = False,
                                  intermediate_states: Optional[torch.Tensor] = None):
    """:func:`naive_kla` with the serving options of :func:`kla_tl.fused_recurrent_kla` (its CPU fallback and the
    definition of those options). Without them it is :func:`naive_kla`.

    Args (besides those of :func:`naive_kla`):
        state_indices: int32 ``[N]``; ``initial_state`` is then a pool ``[N_slots, HV, K, V]`` (any float dtype)
            and sequence n starts from slot ``state_indices[n]``. A sequence with index -1 is padding: its o rows
            and final state are zeros; no slot and no ``intermediate_states`` row is read or written for it.
        inplace_final_state: write each live sequence's final state into its slot (cast to the pool dtype).
        intermediate_states: ``[B * T, HV, K, V]`` buffer (token-major, row ``b * T + t``, or ``t`` of the packed
            axis with ``cu_seqlens``) that receives the state after every token of every live sequence, cast to its
            dtype. Written without autograd, like the pool.

    Returns:
        ``(o, final_state)`` as :func:`naive_kla`; arithmetic in float32 (float64 for float64 inputs).
    """
    if state_indices is None and intermediate_states is None:
        return naive_kla(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    B, T, HV, V = v.shape
    K = q.shape[-1]
    cdt = compute_dtype(q.dtype)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if N == 0:       # an empty dense batch: nothing to run, read or write
        final = torch.zeros(0, HV, K, V, dtype=cdt, device=q.device) if output_final_state else None
        return torch.zeros(B, T, HV, V, dtype=q.dtype, device=q.device), final
    h0, live = initial_state, None
    if state_indices is not None:
        idx = state_indices.long()
        live = idx >= 0
        h0 = torch.zeros(N, HV, K, V, dtype=cdt, device=q.device)
        h0[live] = initial_state[idx[live]].to(cdt)                   # a copy: the pool is read once, here
    res = naive_kla(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=h0,
                    output_final_state=True, cu_seqlens=cu_seqlens, return_all_states=intermediate_states is not None)
    o, final = res[0], res[1]
    tok_live = None                                                   # [B * T]: token of a live sequence
    if live is not None:
        if cu_seqlens is None:
            tok_live = live[:, None].expand(B, T).reshape(B * T)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(q.device)
            tok_live = torch.repeat_interleave(live, lengths, output_size=T)
        zero = torch.zeros((), dtype=o.dtype, device=o.device)
        o = torch.where(tok_live.reshape(B, T, 1, 1), o, zero)
        if inplace_final_state:
            with torch.no_grad():
                initial_state[idx[live]] = final[live].to(initial_state.dtype)
        final = torch.where(live[:, None, None, None], final, torch.zeros((), dtype=final.dtype, device=final.device))
    if intermediate_states is not None:
        states = res[2].reshape(B * T, HV, K, V)
        with torch.no_grad():
            if tok_live is None:
                intermediate_states.copy_(states)
            else:
                intermediate_states[tok_live] = states[tok_live].to(intermediate_states.dtype)
    return o, (final if output_final_state else None)


def _assemble(rows, prob, seqs, out_dtype, cdt, device):
    """Stack per-token rows [HV, V] back into [B, T, HV, V] (the rows come in sequence order)."""
    if not rows:
        return torch.zeros(prob.B, prob.T, prob.HV, prob.V, dtype=out_dtype, device=device)
    if prob.is_varlen:
        return torch.stack(rows).to(out_dtype).unsqueeze(0)
    return torch.stack(rows).reshape(prob.B, prob.T, prob.HV, prob.V).to(out_dtype)


def _segsum(gc: torch.Tensor) -> torch.Tensor:
    """exp of segment sums: Gam[..., i, j] = exp(sum_{j < r <= i} g_r) for i >= j, else 0.

    Built with a masked sum (never a difference of cumulative sums), so g = -inf and huge |g| stay exact.
    """
    n = gc.shape[-1]
    idx = torch.arange(n, device=gc.device)
    # m[i, j, r] = j < r <= i
    m = (idx[None, None, :] > idx[None, :, None]) & (idx[None, None, :] <= idx[:, None, None])
    x = torch.where(m, gc[..., None, None, :], torch.zeros((), dtype=gc.dtype, device=gc.device)).sum(-1)
    low = idx[:, None] >= idx[None, :]
    return torch.where(low, torch.exp(x), torch.zeros((), dtype=gc.dtype, device=gc.device))


def chunk_kla_reference(q, k, v, g, eta, *, scale: Optional[float] = None, eps: float = DEFAULT_EPS,
                        normalize_q: bool = False, initial_state: Optional[torch.Tensor] = None,
                        output_final_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                        chunk_size: int = 64):
    """Chunkwise WY/UT form of KLA (KLA.md section 5) in plain torch; same arguments and results as :func:`naive_kla`.

    Per chunk of n <= chunk_size rows (all value heads at once)::

        Gam_ij = exp(gamma_i - gamma_j) (i >= j),   gamma = chunk-local cumsum of g
        A      = StrictLower(diag(beta) K K^T * Gam),  L = (I + A)^-1
        W      = L diag(beta e^gamma) K,   U = L diag(beta) V
        N      = U - W S_in
        O      = scale [diag(e^gamma) Q S_in + ((Q K^T) * Gam) N]
        S_out  = e^{gamma_n} S_in + K^T diag(e^{gamma_n - gamma}) N
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_kla_reference: chunk_size must be a positive int, got {chunk_size!r}")
    prob, seqs, scale, cdt, qf, kf, vf, gf, ef = _prepare(q, k, v, g, eta, scale, normalize_q, initial_state,
                                                          cu_seqlens)
    HV, K, V = prob.HV, prob.K, prob.V
    step = dict(chunk_size=chunk_size, scale=scale, eps=eps, cdt=cdt)
    if not prob.is_varlen:
        # dense batch: the B sequences share their bounds, so every chunk runs for all of them at once
        S = (initial_state.to(dtype=cdt, copy=True) if initial_state is not None
             else torch.zeros(prob.B, HV, K, V, dtype=cdt, device=q.device))
        o, S = _chunk_scan(qf, kf, vf, gf, ef, S, 0, prob.T, **step)
        return o.to(q.dtype), (S if output_final_state else None)
    outs, finals = [], []
    for i, (_, bos, eos) in enumerate(seqs):
        S = _initial(initial_state, i, HV, K, V, cdt, q.device)[None]
        o, S = _chunk_scan(qf, kf, vf, gf, ef, S, bos, eos, **step)
        outs.append(o)
        finals.append(S[0])
    o = torch.cat(outs, 1).to(q.dtype) if outs else torch.zeros(1, 0, HV, V, dtype=q.dtype, device=q.device)
    final = torch.stack(finals) if output_final_state else None
    return o, final


def _chunk_scan(qf, kf, vf, gf, ef, S, bos, eos, *, chunk_size, scale, eps, cdt):
    """Chunks of tokens [bos, eos) of the rows of ``qf`` (all rows share the bounds); S [R, HV, K, V] is the state
    before ``bos``. Returns (o [R, eos - bos, HV, V] in ``cdt``, S after ``eos``)."""
    R, HV, V = S.shape[0], vf.shape[2], vf.shape[3]
    dev = qf.device
    zero = torch.zeros((), dtype=cdt, device=dev)
    parts = []
    for c0 in range(bos, eos, chunk_size):
        c1 = min(c0 + chunk_size, eos)
        n = c1 - c0
        Qc = qf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n, K]
        Kc = kf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n, K]
        Vc = vf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n, V]
        gc = gf[:R, c0:c1].transpose(1, 2)                     # [R, HV, n]
        beta = ef[:R, c0:c1].transpose(1, 2) / ((Kc * Kc).sum(-1) + eps)
        Gam = _segsum(gc)                                      # [R, HV, n, n], lower incl. diagonal
        eg = Gam[..., :, 0] * torch.exp(gc[..., :1])           # e^{gamma_i} = exp(sum_{r<=i} g_r)
        egn = Gam[..., -1, :]                                  # e^{gamma_n - gamma_j}
        strict = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev), -1)
        A = torch.where(strict, beta[..., :, None] * (Kc @ Kc.transpose(-1, -2)) * Gam, zero)
        eye = torch.eye(n, dtype=cdt, device=dev).expand(R, HV, n, n)
        L = torch.linalg.solve_triangular(eye + A, eye, upper=False, unitriangular=True)
        W = L @ ((beta * eg)[..., :, None] * Kc)
        U = L @ (beta[..., :, None] * Vc)
        Nn = U - W @ S
        O = scale * (eg[..., :, None] * (Qc @ S) + ((Qc @ Kc.transpose(-1, -2)) * Gam) @ Nn)
        parts.append(O.transpose(1, 2))                        # [R, n, HV, V]
        S = eg[..., -1, None, None] * S + Kc.transpose(-1, -2) @ (egn[..., :, None] * Nn)
    o = torch.cat(parts, 1) if parts else torch.zeros(R, 0, HV, V, dtype=cdt, device=dev)
    return o, S


def kla_decode_reference(q, k, v, g, eta, state, *, state_indices=None, scale=None, eps=DEFAULT_EPS,
                         normalize_q=False, out=None):
    """One-token KLA step on a state pool, in place (the CPU fallback of :func:`kla_tl.kla_decode`).

    Rows with ``state_indices == -1`` output zeros and leave the pool untouched. Arithmetic in float32 (float64 for
    float64 inputs); the pool keeps its dtype.
    """
    B, _, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cdt = compute_dtype(q.dtype)
    idx = torch.arange(B, device=q.device) if state_indices is None else state_indices.long()
    valid = idx >= 0
    o = torch.zeros(B, 1, HV, V, dtype=cdt, device=q.device)
    rows = torch.nonzero(valid).flatten()
    if rows.numel() > 0:
        slots = idx[rows]
        S0 = state[slots].to(cdt)                                            # [b, HV, K, V]
        qs, ks, vs = q[rows].to(cdt), k[rows].to(cdt), v[rows].to(cdt)        # [b, 1, *, *]
        o_rows, S1 = naive_kla(qs, ks, vs, g[rows].to(cdt), eta[rows].to(cdt), scale=scale, eps=eps,
                               normalize_q=normalize_q, initial_state=S0, output_final_state=True)
        o[rows] = o_rows
        with torch.no_grad():
            state[slots] = S1.to(state.dtype)
    o = o.to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o
