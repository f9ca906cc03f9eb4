"""Public functions of kla-tl: ``chunk_kla``, ``fused_recurrent_kla``, ``kla_decode``.

Each validates its inputs once (:mod:`kla_tl.conventions`), picks a backend (:mod:`kla_tl.dispatch`) and runs it.
Layouts follow fla; keys are raw and ``beta = eta / (||k||^2 + eps)`` is computed inside the library.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .conventions import DEFAULT_EPS, check_decode_inputs, check_recurrent_inputs
from .ops import check_chunk_inputs, chunk_kla_op, needs_grad
from .reference import fused_recurrent_kla_reference, kla_decode_reference


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
        cu_seqlens: ``[N + 1]`` int32/int64 packed-sequence offsets (B must be 1; empty sequences allowed). Its values
            are copied to the host once per tensor and version: forward and backward share one copy (write new
            offsets in place or pass a new tensor; both are seen).

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
                        cu_seqlens: Optional[torch.Tensor] = None, state_indices: Optional[torch.Tensor] = None,
                        inplace_final_state: bool = False, intermediate_states: Optional[torch.Tensor] = None):
    """Token-by-token KLA for short sequences (1 to 64 tokens), with the options a serving engine needs for
    speculative decoding.

    Without the serving options: same arguments and results as :func:`chunk_kla`. The state stays on chip across
    the tokens of a sequence, so there is no chunk setup cost; for long sequences use :func:`chunk_kla`.

    Args:
        q, k, v, g, eta, scale, eps, normalize_q, output_final_state, cu_seqlens: as :func:`chunk_kla`
            (N = B, or ``len(cu_seqlens) - 1`` sequences).
        initial_state: ``[N, HV, K, V]`` float32 (K-major; other float dtypes are converted); with
            ``state_indices``, a state pool ``[N_slots, HV, K, V]`` float32 or bfloat16 (float64 runs on the
            reference), read in place (arithmetic in float32).
        state_indices: int32 ``[N]`` (vLLM/SGLang ``ssm_state_indices``): sequence n starts from pool slot
            ``state_indices[n]``; -1 marks a padding sequence: its outputs are zeros (its final state too, when
            returned), and neither the pool nor ``intermediate_states`` is read or written for it. Needs
            ``initial_state``.
        inplace_final_state: with ``state_indices``: True writes each live sequence's final state back into its
            pool slot, in place (cast to the pool dtype; serving, live slots must be distinct); False (default)
            leaves the pool bit-for-bit untouched (verifying draft tokens). Needs ``state_indices``.
        intermediate_states: optional caller buffer ``[B * T, HV, K, V]`` float32 or bfloat16, contiguous,
            token-major (row ``b * T + t`` dense, row ``t`` of the packed token axis with ``cu_seqlens``): the
            kernel writes the state after every token into it (accumulation in float32, cast on store), so a
            serving engine can roll back to the last accepted draft token. Rows of padding sequences are not
            written.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in q's dtype; final_state ``[N, HV, K, V]`` float32 (float64
        for float64 inputs) when ``output_final_state``, else None; returned as a new tensor also with
        ``inplace_final_state=True``.

    Raises:
        TypeError, ValueError: naming the argument, what it got and what is accepted.

    CUDA tensors of a supported problem run the TileLang kernel (no backward: with gradients it runs the reference,
    warning once); everything else runs the torch reference :func:`kla_tl.fused_recurrent_kla_reference`, which
    defines the results (float64 for float64 inputs). With a CUDA ``state_indices`` the call adds no host
    synchronization; its values are then not checked (host tensors are: range, and no repeated slot in place).

    Example (verify 4 draft tokens of 2 sequences on a pool, keep every per-token state):
        >>> HV, K, V, T = 2, 64, 64, 4
        >>> pool = torch.zeros(8, HV, K, V)
        >>> q, k = torch.randn(1, 2 * T, HV, K), torch.randn(1, 2 * T, HV, K)
        >>> v = torch.randn(1, 2 * T, HV, V)
        >>> g, eta = -torch.rand(1, 2 * T, HV), torch.rand(1, 2 * T, HV)
        >>> states = torch.empty(2 * T, HV, K, V)
        >>> o, _ = fused_recurrent_kla(q, k, v, g, eta, initial_state=pool,
        ...                            cu_seqlens=torch.tensor([0, T, 2 * T], dtype=torch.int32),
        ...                            state_indices=torch.tensor([5, 2], dtype=torch.int32),
        ...                            intermediate_states=states)
        >>> pool[5] = states[2]          # sequence 0 accepted 3 of its 4 tokens: state after token 2
    """
    prob, cu = check_recurrent_inputs("fused_recurrent_kla", q, k, v, g, eta, scale=scale, eps=eps,
                                      normalize_q=normalize_q, initial_state=initial_state, cu_seqlens=cu_seqlens,
                                      state_indices=state_indices, inplace_final_state=inplace_final_state,
                                      intermediate_states=intermediate_states)
    from .recurrent import recurrent_refusal, fused_recurrent_kla_kernel
    serving = dict(state_indices=state_indices, inplace_final_state=inplace_final_state,
                   intermediate_states=intermediate_states)
    reason = recurrent_refusal(prob, q.device, needs_grad=needs_grad(q, k, v, g, eta, initial_state),
                               pool_dtype=initial_state.dtype if state_indices is not None else None,
                               inter_dtype=None if intermediate_states is None else intermediate_states.dtype)
    if reason is None:
        return fused_recurrent_kla_kernel(q, k, v, g, eta, prob=prob, cu=cu, scale=scale, eps=eps,
                                          normalize_q=normalize_q, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, **serving)
    if q.device.type == "cuda":
        dispatch.warn_once("fused_recurrent_kla", reason)
    return fused_recurrent_kla_reference(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                                         initial_state=initial_state, output_final_state=output_final_state,
                                         cu_seqlens=cu_seqlens, **serving)


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
