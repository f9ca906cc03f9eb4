"""Public functions of kla-tl: ``chunk_kla``, ``fused_recurrent_kla``, ``kla_decode``.

Each validates its inputs once (:mod:`kla_tl.conventions`), picks a backend (:mod:`kla_tl.dispatch`) and runs it.
Layouts follow fla; keys are raw and ``beta = eta / (||k||^2 + eps)`` is computed inside the library.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .conventions import DEFAULT_EPS, check_decode_inputs, check_inputs
from .ops import check_chunk_inputs, chunk_kla_op
from .reference import kla_decode_reference, naive_kla


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def chunk_kla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor, *,
              scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
              initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
              cu_seqlens: Optional[torch.Tensor] = None):
    """Chunkwise Kaczmarz Linear Attention (training and prefill).

    Per value head: ``S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - k_t exp(g_t) S_{t-1})``,
    ``beta_t = eta_t / (||k_t||^2 + eps)`` on the raw keys, ``o_t = scale * q_t S_t``.

    Args:
        q: ``[B, T, H, K]`` float16/bfloat16/float32 (float64 runs on the reference).
        k: ``[B, T, H, K]``, q's dtype. Raw keys: never L2-normalize them for KLA.
        v: ``[B, T, HV, V]``, q's dtype. ``HV % H == 0`` (GVA: value head ``hv`` reads q/k head ``hv // (HV // H)``).
        g: ``[B, T, HV]`` log-decay (``g <= 0``), any float dtype (float32 recommended).
        eta: ``[B, T, HV]`` relaxation in (0, 1), any float dtype (float32 recommended). Not beta.
        scale: output scale, default ``K ** -0.5``.
        eps: the epsilon of ``||k||^2 + eps`` (default 1e-6).
        normalize_q: L2-normalize q in the kernel (``q / sqrt(||q||^2 + 1e-6)``), as the published model does.
        initial_state: ``[N, HV, K, V]`` float32 (K-major), N = B or ``len(cu_seqlens) - 1``.
        output_final_state: also return the final state ``[N, HV, K, V]`` float32.
        cu_seqlens: ``[N + 1]`` int32/int64 packed-sequence offsets (B must be 1; empty sequences allowed).

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in q's dtype; final_state float32 (float64 for float64 inputs)
        or None.

    Raises:
        TypeError, ValueError: naming the argument, what it got and what is accepted.

    CUDA tensors of a supported problem run the TileLang kernels; everything else runs the torch reference (a
    CUDA call that falls back warns once). Differentiable in q, k, v, g, eta and initial_state. Registered as the
    torch operators ``kla_tl::chunk_fwd`` / ``kla_tl::chunk_bwd`` (:mod:`kla_tl.ops`), so
    ``torch.compile(fullgraph=True)`` traces it, forward and backward; while tracing, the values of cu_seqlens are
    checked when the compiled graph runs rather than at trace time.

    Example:
        >>> B, T, H, K, V = 1, 100, 2, 64, 64
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> g, eta = -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, ht = chunk_kla(q, k, v, g, eta, output_final_state=True)
    """
    # Validation stays outside the operators; the backend is chosen inside kla_tl::chunk_fwd when it runs (kla_tl.ops).
    check_chunk_inputs(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=initial_state,
                       cu_seqlens=cu_seqlens)
    return chunk_kla_op(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=initial_state,
                        output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_kla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor, *,
                        scale: Optional[float] = None, eps: float = DEFAULT_EPS, normalize_q: bool = False,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[torch.Tensor] = None):
    """Token-by-token KLA (short sequences, 1 to 64 tokens); same arguments and results as :func:`chunk_kla`.

    The state stays on chip across the tokens of a sequence, so there is no chunk setup cost; for long sequences
    use :func:`chunk_kla`.
    """
    prob, cu = check_inputs("fused_recurrent_kla", q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                            initial_state=initial_state, cu_seqlens=cu_seqlens)
    from .recurrent import recurrent_refusal, fused_recurrent_kla_kernel
    reason = recurrent_refusal(prob, q.device, needs_grad=_needs_grad(q, k, v, g, eta, initial_state))
    if reason is None:
        return fused_recurrent_kla_kernel(q, k, v, g, eta, prob=prob, cu=cu, scale=scale, eps=eps,
                                          normalize_q=normalize_q, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if q.device.type == "cuda":
        dispatch.warn_once("fused_recurrent_kla", reason)
    return naive_kla(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def kla_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor,
               state: torch.Tensor, *, state_indices: Optional[torch.Tensor] = None, scale: Optional[float] = None,
               eps: float = DEFAULT_EPS, normalize_q: bool = False, out: Optional[torch.Tensor] = None):
    """One KLA decode step per row on a state pool, updated in place (serving).

    Args:
        q, k: ``[B, 1, H, K]``; v: ``[B, 1, HV, V]``; g, eta: ``[B, 1, HV]`` (as :func:`chunk_kla`, T = 1).
        state: pool ``[N_slots, HV, K, V]`` float32 or bfloat16, **updated in place** (arithmetic in float32).
        state_indices: int32 ``[B]``: row b uses slot ``state_indices[b]``; -1 marks a padding row (output zeros, its
            slot is neither read nor written). Default: row b uses slot b (N_slots must equal B).
        out: optional ``[B, 1, HV, V]`` buffer in q's dtype; with it the call allocates nothing and does not
            synchronize with the host, so it can be captured in a CUDA graph.

    Returns:
        o ``[B, 1, HV, V]`` in q's dtype (``out`` when given).
    """
    prob = check_decode_inputs("kla_decode", q, k, v, g, eta, state, state_indices=state_indices, scale=scale,
                               eps=eps, normalize_q=normalize_q, out=out)
    from .recurrent import decode_refusal, kla_decode_kernel
    reason = decode_refusal(prob, q.device, state)
    if reason is None:
        return kla_decode_kernel(q, k, v, g, eta, state, prob=prob, state_indices=state_indices, scale=scale,
                                 eps=eps, normalize_q=normalize_q, out=out)
    if q.device.type == "cuda":
        dispatch.warn_once("kla_decode", reason)
    return kla_decode_reference(q, k, v, g, eta, state, state_indices=state_indices, scale=scale, eps=eps,
                                normalize_q=normalize_q, out=out)
