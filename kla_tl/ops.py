"""``chunk_kla`` as two registered torch operators, so ``torch.compile(fullgraph=True)`` traces it without a break.

Where it sits: :func:`kla_tl.chunk_kla` validates its arguments (:func:`check_chunk_inputs`), then calls
:func:`chunk_kla_op`, which calls the operators below. Each operator picks its backend when it runs, on real
tensors, so nothing inside it is ever traced:

- ``kla_tl::chunk_fwd`` -- the forward. CUDA tensors of a problem the kernels serve run the TileLang kernels
  (:func:`kla_tl.chunk.chunk_fwd`); everything else runs :func:`kla_tl.reference.chunk_kla_reference` (a CUDA
  call that falls back warns once).
- ``kla_tl::chunk_bwd`` -- the backward: gradients of q, k, v, g, eta and initial_state. CUDA tensors of a problem
  the backward kernels serve (:func:`kla_tl.chunk.chunk_bwd_refusal`) run the TileLang backward
  (:func:`kla_tl.chunk.chunk_bwd`); everything else runs the chunk-parallel torch backward
  (:func:`kla_tl.chunk_bwd.chunk_kla_torch_bwd`: only the two state recurrences loop over chunks, one batched GEMM
  per step), in float32 (float64 for float64 inputs); a CUDA call that falls back warns once. The per-chunk loop
  (:mod:`kla_tl.reference_bwd`) stays as the oracle of the tests.

Each has a fake (meta) implementation that derives output shapes and dtypes from input metadata alone, and
``kla_tl::chunk_fwd`` has an autograd formula (``torch.library.register_autograd``) that calls
``kla_tl::chunk_bwd``. Custom operators cannot return None, so an absent state (``output_final_state=False``,
or the gradient of an absent ``initial_state``) is an empty ``[0, HV, K, V]`` placeholder that
:func:`chunk_kla_op` and the autograd formula turn back into None.

Schemas (tensors positional, options keyword-only)::

    kla_tl::chunk_fwd(q, k, v, g, eta, initial_state?, cu_seqlens?, *, scale, eps, normalize_q,
                      output_final_state, save_for_backward=False)
                      -> (o [B, T, HV, V] q.dtype, final_state [N | 0, HV, K, V], aqk, gcum, rk, rq)
    kla_tl::chunk_bwd(q, k, v, g, eta, initial_state?, cu_seqlens?, do, dht?, aqk?, gcum?, rk?, rq?, *, scale, eps,
                      normalize_q) -> (dq, dk, dv, dg, deta, dh0 [N | 0, HV, K, V]), each in its input's shape and dtype

What the forward keeps for the backward: ``chunk_kla`` sets ``save_for_backward`` when autograd will need a
gradient, and where the TileLang backward serves the call (:func:`saves_for_backward`) the forward then returns its
kernels' L (beside Aqk), chunk-local cumulative gates and key/query norms (:class:`kla_tl.chunk.Saved`,
``[1, B * T, HV, 128]`` in q's dtype and three fp32 ``[1, B * T, HV | H]``), which autograd hands to the backward:
its first stage then recomputes only w and u instead of solving every chunk's triangular system again. That is
what fla keeps too (its A, gates and norms), plus Aqk. Otherwise the four are empty placeholders.

Host reads: validating ``cu_seqlens`` reads its values on the host. Under ``torch.compile`` that read would be
data-dependent (``fullgraph=True`` fails), so while tracing :func:`check_chunk_inputs` leaves ``cu_seqlens`` and
``initial_state``'s N to the operators, which run the same checks (same messages) on the real tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .conventions import check_inputs, state_dtype_for
from .reference import chunk_kla_reference
from .chunk_bwd import chunk_kla_torch_bwd

#: Name used in error messages and warnings raised inside the operators (the public entry point's name).
FN = "chunk_kla"
#: Positional (tensor) arguments of ``kla_tl::chunk_fwd``, in order: the grad-name <-> position map.
INPUT_NAMES = ("q", "k", "v", "g", "eta", "initial_state", "cu_seqlens")
#: Outputs of ``kla_tl::chunk_bwd``, in order: one gradient per differentiable input (cu_seqlens is not one).
GRAD_NAMES = INPUT_NAMES[:6]
#: What the forward may keep for the backward (outputs 2.. of ``kla_tl::chunk_fwd``, optional inputs of
#: ``kla_tl::chunk_bwd`` after dht): the fields of :class:`kla_tl.chunk.Saved`.
SAVED_NAMES = ("aqk", "gcum", "rk", "rq")


def _absent_state(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The empty ``[0, HV, K, V]`` stand-in for a state (or state gradient) that is not there."""
    return q.new_empty(0, v.shape[2], q.shape[3], v.shape[3], dtype=state_dtype_for(q.dtype))


def saves_for_backward(q: torch.Tensor, v: torch.Tensor, initial_state: Optional[torch.Tensor],
                       cu_seqlens: Optional[torch.Tensor], normalize_q: bool) -> bool:
    """Whether a forward asked to save for its backward (``save_for_backward=True``) returns the kernels'
    intermediates (:class:`kla_tl.chunk.Saved`): exactly when the TileLang backward will serve the call. Decided on
    metadata alone, so the fake implementation agrees with the real one."""
    from .chunk import chunk_bwd_refusal
    from .conventions import Problem

    B, T, H, K = q.shape
    prob = Problem(B=B, T=T, H=H, HV=v.shape[2], K=K, V=v.shape[3], N=_num_seqs(q, initial_state, cu_seqlens),
                   dtype=q.dtype, is_varlen=cu_seqlens is not None, use_h0=initial_state is not None,
                   normalize_q=normalize_q)
    return chunk_bwd_refusal(prob, q.device) is None


def _saved_shapes(q: torch.Tensor, v: torch.Tensor) -> tuple:
    """((shape, dtype) of aqk, gcum, rk, rq) of :class:`kla_tl.chunk.Saved` for these inputs (packed layout)."""
    from .chunk import saved_shapes

    B, T, H, _ = q.shape
    return saved_shapes(B * T, H, v.shape[2], q.dtype)


def needs_grad(*xs) -> bool:
    """Whether autograd will differentiate a call on these arguments (grad mode on, a tensor requiring grad)."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _no_saved(q: torch.Tensor) -> tuple:
    """The four empty placeholders returned in place of :class:`kla_tl.chunk.Saved` when nothing is saved."""
    return tuple(q.new_empty(0, dtype=torch.float32) for _ in range(4))


def _num_seqs(q: torch.Tensor, initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]):
    """N from metadata only (fake tensors have no values): initial_state's rows, else len(cu_seqlens) - 1, else B."""
    if initial_state is not None:
        return initial_state.shape[0]
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1
    return q.shape[0]


# --------------------------------------------------------------------------------------------------- forward


@torch.library.custom_op("kla_tl::chunk_fwd", mutates_args=())
def chunk_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor,
                 initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], *, scale: float,
                 eps: float, normalize_q: bool, output_final_state: bool, save_for_backward: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunkwise KLA forward on real tensors: TileLang kernels where they serve the call, else the reference.

    Arguments as :func:`kla_tl.chunk_kla`, with ``scale`` resolved (``K ** -0.5`` by default) by the caller.
    Returns ``(o, final_state, aqk, gcum, rk, rq)``; final_state is the empty placeholder when
    ``output_final_state`` is False. The last four are the kernels' intermediates for the backward
    (:class:`kla_tl.chunk.Saved`) when ``save_for_backward`` is set and :func:`saves_for_backward` holds, else
    empty placeholders.
    """
    # The operator re-derives (problem, host cu_seqlens) itself: it needs them to plan the launch, and under
    # torch.compile this is where cu_seqlens is first validated (see check_chunk_inputs).
    prob, cu = check_inputs(FN, q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                            initial_state=initial_state, cu_seqlens=cu_seqlens)
    from .chunk import chunk_fwd as kernel_fwd, chunk_refusal  # local, as in api.py: no kernel code at import

    # needs_grad=False: the backward is kla_tl::chunk_bwd's business, so only the forward is asked for here.
    reason = chunk_refusal(prob, q.device, needs_grad=False)
    save = save_for_backward and saves_for_backward(q, v, initial_state, cu_seqlens, normalize_q)
    saved = _no_saved(q)
    if reason is None:
        o, ht, kept = kernel_fwd(q, k, v, g, eta, prob=prob, cu=cu, scale=scale, eps=eps, normalize_q=normalize_q,
                                 initial_state=initial_state, output_final_state=output_final_state, save=save)
        if save:       # (no tokens: nothing was run, nothing kept)
            saved = tuple(kept) if kept is not None else tuple(
                torch.empty(sh, dtype=dt, device=q.device) for sh, dt in _saved_shapes(q, v))
    else:
        if q.device.type == "cuda":
            dispatch.warn_once(FN, reason)
        with torch.no_grad():
            o, ht = chunk_kla_reference(q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                                        initial_state=initial_state, output_final_state=output_final_state,
                                        cu_seqlens=cu_seqlens)
    # Outputs are fresh, dense tensors (what the fake implementation promises).
    return (o.contiguous(), (ht.contiguous() if ht is not None else _absent_state(q, v)), *saved)


@chunk_fwd_op.register_fake
def _chunk_fwd_fake(q, k, v, g, eta, initial_state, cu_seqlens, *, scale, eps, normalize_q, output_final_state,
                    save_for_backward=False):
    B, T, _, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = q.new_empty(B, T, HV, V)
    saved = _no_saved(q)
    if save_for_backward and saves_for_backward(q, v, initial_state, cu_seqlens, normalize_q):
        saved = tuple(q.new_empty(sh, dtype=dt) for sh, dt in _saved_shapes(q, v))
    if not output_final_state:
        return (o, _absent_state(q, v), *saved)
    return (o, q.new_empty(_num_seqs(q, initial_state, cu_seqlens), HV, K, V, dtype=state_dtype_for(q.dtype)), *saved)


# -------------------------------------------------------------------------------------------------- backward


@torch.library.custom_op("kla_tl::chunk_bwd", mutates_args=())
def chunk_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor,
                 initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], do: torch.Tensor,
                 dht: Optional[torch.Tensor], aqk: Optional[torch.Tensor] = None, gcum: Optional[torch.Tensor] = None,
                 rk: Optional[torch.Tensor] = None, rq: Optional[torch.Tensor] = None, *, scale: float, eps: float,
                 normalize_q: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the chunkwise KLA forward: ``(dq, dk, dv, dg, deta, dh0)``, in :data:`GRAD_NAMES` order.

    Args:
        q, k, v, g, eta, initial_state, cu_seqlens, scale, eps, normalize_q: the forward's inputs.
        do: ``[B, T, HV, V]`` gradient of o (o's dtype).
        dht: ``[N, HV, K, V]`` gradient of the final state, or None (the state was not an output).
        aqk, gcum, rk, rq: what ``kla_tl::chunk_fwd`` returned with ``save_for_backward`` (or None, or its empty
            placeholders): the backward kernels then recompute only w and u. Ignored by the torch backward.

    Returns:
        Each gradient in its input's shape and dtype, dense; dh0 is the empty placeholder without initial_state.

    CUDA tensors of a problem the backward kernels serve run them (:func:`kla_tl.chunk.chunk_bwd`); everything
    else runs :func:`kla_tl.chunk_bwd.chunk_kla_torch_bwd`, the backward of KLA.md section 6 in plain torch, batched
    over all chunks except for the two state sweeps (float32 arithmetic, float64 for float64 inputs; it equals the
    per-chunk loop :func:`kla_tl.reference_bwd.chunk_kla_reference_bwd`). A CUDA call that falls back warns once,
    naming the reason.
    """
    prob, cu = check_inputs(FN, q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q,
                            initial_state=initial_state, cu_seqlens=cu_seqlens)
    from .chunk import chunk_bwd as kernel_bwd, chunk_bwd_refusal

    reason = chunk_bwd_refusal(prob, q.device)
    if reason is None:
        saved = None
        if aqk is not None and aqk.numel() > 0:
            from .chunk import Saved

            saved = Saved(aqk, gcum, rk, rq)
            for (shape, dtype), (name, x) in zip(_saved_shapes(q, v), zip(Saved._fields, saved)):
                if x is None or tuple(x.shape) != shape or x.dtype != dtype or not x.is_contiguous():
                    raise ValueError(f"{FN}: saved {name} must be a contiguous {shape} {dtype} tensor (as the "
                                     f"forward returned it), got "
                                     f"{None if x is None else (tuple(x.shape), x.dtype)}")
        gr = kernel_bwd(q, k, v, g, eta, do, dht, prob=prob, cu=cu, scale=scale, eps=eps, normalize_q=normalize_q,
                        initial_state=initial_state, saved=saved)
    else:
        if q.device.type == "cuda":
            dispatch.warn_once(FN, f"backward: {reason}; runs the chunk-parallel torch backward")
        gr = chunk_kla_torch_bwd(q, k, v, g, eta, do, dht=dht, scale=scale, eps=eps, normalize_q=normalize_q,
                                 initial_state=initial_state, cu_seqlens=cu_seqlens)
    # Outputs must be fresh, dense tensors that alias no input (dh0 is dht itself when no chunk runs).
    cots = tuple(c for c in (do, dht) if c is not None)

    def fresh(x):
        return x.clone() if any(x.numel() and x.data_ptr() == c.data_ptr() for c in cots) else x.contiguous()

    grads = tuple(fresh(gr[n]) for n in ("dq", "dk", "dv", "dg", "deta"))
    dh0 = fresh(gr["dh0"]) if initial_state is not None else _absent_state(q, v)
    return (*grads, dh0)


@chunk_bwd_op.register_fake
def _chunk_bwd_fake(q, k, v, g, eta, initial_state, cu_seqlens, do, dht, aqk=None, gcum=None, rk=None, rq=None, *,
                    scale, eps, normalize_q):
    grads = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v, g, eta))
    dh0 = (torch.empty(initial_state.shape, dtype=initial_state.dtype, device=initial_state.device)
           if initial_state is not None else _absent_state(q, v))
    return (*grads, dh0)


# -------------------------------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    # q, k, v, g, eta, initial_state, cu_seqlens (None entries allowed), then the kernels' aqk, gcum, rk, rq
    ctx.save_for_backward(*inputs, *output[2:])
    ctx.mark_non_differentiable(*output[2:])
    ctx.scale = keyword_only_inputs["scale"]
    ctx.eps = keyword_only_inputs["eps"]
    ctx.normalize_q = keyword_only_inputs["normalize_q"]
    ctx.output_final_state = keyword_only_inputs["output_final_state"]


def grads_to_inputs(grads: tuple, needs_input_grad: tuple) -> tuple:
    """Map ``kla_tl::chunk_bwd``'s outputs (:data:`GRAD_NAMES` order) onto ``kla_tl::chunk_fwd``'s positional
    inputs (:data:`INPUT_NAMES` order): None where an input needs no gradient, and always for cu_seqlens."""
    by_name = dict(zip(GRAD_NAMES, grads))
    return tuple(by_name[n] if (n in by_name and need) else None for n, need in zip(INPUT_NAMES, needs_input_grad))


def _backward(ctx, do, dht, *_saved_grads):
    q, k, v, g, eta, h0, cu, *saved = ctx.saved_tensors
    if do is None:  # o unused (autograd normally materializes zeros; be safe under other callers)
        do = q.new_zeros(q.shape[0], q.shape[1], v.shape[2], v.shape[3])
    if not ctx.output_final_state:
        dht = None  # the placeholder state carries no gradient
    grads = torch.ops.kla_tl.chunk_bwd(q, k, v, g, eta, h0, cu, do, dht, *saved, scale=ctx.scale, eps=ctx.eps,
                                       normalize_q=ctx.normalize_q)
    return grads_to_inputs(grads, ctx.needs_input_grad)


chunk_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------ entry points


def check_chunk_inputs(q, k, v, g, eta, *, scale, eps, normalize_q, initial_state, cu_seqlens) -> None:
    """``conventions.check_inputs`` for ``chunk_kla``, made traceable by ``torch.compile(fullgraph=True)``.

    Eagerly this is the full check. While torch.compile traces a call with ``cu_seqlens``, reading its values on
    the host is a data-dependent operation (``fullgraph=True`` fails with "Could not guard on data-dependent
    expression"), so only the checks that need no values run here (shapes, dtypes, devices, options);
    ``cu_seqlens`` and ``initial_state`` (whose N comes from cu_seqlens) are checked, with the same messages, by
    ``kla_tl::chunk_fwd`` when the compiled graph runs it.
    """
    if cu_seqlens is not None and torch.compiler.is_compiling():
        check_inputs(FN, q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q)
        return
    check_inputs(FN, q, k, v, g, eta, scale=scale, eps=eps, normalize_q=normalize_q, initial_state=initial_state,
                 cu_seqlens=cu_seqlens)


def chunk_kla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, eta: torch.Tensor, *,
                 scale: Optional[float], eps: float, normalize_q: bool, initial_state: Optional[torch.Tensor],
                 output_final_state: bool, cu_seqlens: Optional[torch.Tensor]):
    """Run validated ``chunk_kla`` arguments through ``kla_tl::chunk_fwd`` (differentiable, traceable).

    Arguments and results as :func:`kla_tl.chunk_kla`; call :func:`check_chunk_inputs` first. Resolves the default
    scale (``K ** -0.5``) and turns the placeholder state back into None.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # a forward that will be differentiated keeps the kernels' L, Aqk, gates and norms for the backward
    save = needs_grad(q, k, v, g, eta, initial_state)
    o, ht, *_ = torch.ops.kla_tl.chunk_fwd(q, k, v, g, eta, initial_state, cu_seqlens, scale=scale, eps=float(eps),
                                           normalize_q=normalize_q, output_final_state=output_final_state,
                                           save_for_backward=save)
    return o, (ht if output_final_state else None)
