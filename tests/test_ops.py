"""Tests of ``chunk_kla`` as registered torch operators (``kla_tl::chunk_fwd``, ``kla_tl::chunk_bwd``; kla_tl/ops.py).

CPU: ``torch.library.opcheck`` on both operators (schema, autograd registration, fake tensors, AOT dispatch with
dynamic shapes); the public ``chunk_kla`` really calls them (seen by a ``__torch_dispatch__`` mode, inside which they must also
work) and equals the reference, forward and all six gradients, T = 0 included;
``torch.compile(fullgraph=True, backend="aot_eager")`` of a function calling ``chunk_kla``, then ``.backward()``,
equals eager, dense and varlen, with and without states, and ``torch._dynamo.explain`` sees no graph break; invalid
cu_seqlens still raise the public message when compiled. GPU (marked ``gpu``): the same compile test on the
TileLang kernels with bfloat16 inputs, and the CUDA fallback warning under compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_rel_close, make_inputs, tol_for

from kla_tl import chunk_kla
from kla_tl import ops
from kla_tl.conventions import DEFAULT_EPS, state_dtype_for
from kla_tl.reference import chunk_kla_reference

F32, F64 = torch.float32, torch.float64
FWD = torch.ops.kla_tl.chunk_fwd.default
BWD = torch.ops.kla_tl.chunk_bwd.default
#: Sizes of the CPU cases: GVA (HV = 2 H), head dims that differ, T past one 64-token chunk.
H, HV, K, V = 1, 2, 8, 4
#: Varlen layout: an empty sequence, a chunk boundary crossed, and a tail.
CU = [0, 0, 5, 70, 75]

CASES = {
    # name: (make_inputs kwargs, chunk_kla options)
    "dense": (dict(B=2, T=70), dict(normalize_q=True)),
    "dense_h0_state": (dict(B=2, T=70, with_h0=True), dict(output_final_state=True, scale=0.3)),
    "varlen_h0_state": (dict(B=1, T=CU[-1], cu_seqlens=CU, with_h0=True),
                        dict(output_final_state=True, normalize_q=True)),
}


def _inputs(case: str, dtype=torch.float32, device="cpu", seed=0, **extra):
    sizes, opts = CASES[case]
    inp = make_inputs(sizes["B"], sizes["T"], H, HV, K, V, dtype, device, seed=seed,
                      **{n: x for n, x in sizes.items() if n not in ("B", "T")}, **extra)
    return inp, dict(opts)


def _loss(o, ht):
    """A scalar touching every output element with a distinct weight, so every gradient path is exercised."""
    w = torch.linspace(-1.0, 1.0, o.numel(), dtype=torch.float64, device=o.device).reshape(o.shape)
    loss = (o.double() * w).sum() + o.double().square().sum()
    if ht is not None:
        loss = loss + ht.double().square().sum()
    return loss


def _run(fn, inp, opts):
    o, ht = fn(*inp.args(), initial_state=inp.initial_state, cu_seqlens=inp.cu_seqlens, **opts)
    return o, ht, _loss(o, ht)


def _op_args(inp, **opts):
    """Positional and keyword arguments of kla_tl::chunk_fwd for ``inp``."""
    kw = dict(scale=opts.get("scale", K ** -0.5), eps=DEFAULT_EPS, normalize_q=opts.get("normalize_q", False),
              output_final_state=opts.get("output_final_state", False))
    return (*inp.args(), inp.initial_state, inp.cu_seqlens), kw


# ------------------------------------------------------------------------------------------------ schema, arity


def test_schemas_match_the_grad_name_map():
    """Habit 11: tensors positional, options keyword-only; the backward returns one gradient per GRAD_NAMES entry,
    and the autograd formula one entry per positional input of the forward."""
    fwd_args = FWD._schema.arguments
    assert tuple(a.name for a in fwd_args if not a.kwarg_only) == ops.INPUT_NAMES
    assert {a.name for a in fwd_args if a.kwarg_only} == {"scale", "eps", "normalize_q", "output_final_state",
                                                          "save_for_backward"}
    assert len(FWD._schema.returns) == 2 + len(ops.SAVED_NAMES)
    bwd_args = BWD._schema.arguments
    assert tuple(a.name for a in bwd_args if not a.kwarg_only) == ops.INPUT_NAMES + ("do", "dht") + ops.SAVED_NAMES
    assert {a.name for a in bwd_args if a.kwarg_only} == {"scale", "eps", "normalize_q"}
    assert len(BWD._schema.returns) == len(ops.GRAD_NAMES) == len(ops.INPUT_NAMES) - 1
    grads = tuple(torch.full((1,), float(i)) for i in range(len(ops.GRAD_NAMES)))
    mapped = ops.grads_to_inputs(grads, (True,) * len(ops.INPUT_NAMES))
    assert len(mapped) == len(ops.INPUT_NAMES) and mapped[-1] is None
    assert all(m is gr for m, gr in zip(mapped, grads))
    assert ops.grads_to_inputs(grads, (False, True) + (False,) * 5)[:2] == (None, grads[1])


# ---------------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("case,dtype,save", [("varlen_h0_state", F32, False), ("dense", F64, True)],
                         ids=["varlen_f32", "dense_f64_save"])
def test_opcheck_chunk_fwd(case, dtype, save):
    inp, opts = _inputs(case, dtype, requires_grad=True)
    args, kw = _op_args(inp, **opts)
    torch.library.opcheck(FWD, args, dict(kw, save_for_backward=save))


def test_cpu_forward_keeps_nothing_for_the_backward():
    """On CPU the torch backward serves the call, so a forward asked to save returns the empty placeholders."""
    inp, opts = _inputs("dense", F32)
    args, kw = _op_args(inp, **opts)
    out = FWD(*args, **dict(kw, save_for_backward=True))
    assert not ops.saves_for_backward(inp.q, inp.v, None, None, kw["normalize_q"])
    assert [tuple(x.shape) for x in out[2:]] == [(0,)] * len(ops.SAVED_NAMES)


@pytest.mark.parametrize("case,dtype,with_dht", [("varlen_h0_state", F32, True), ("dense", F64, False)],
                         ids=["varlen_f32_dht", "dense_f64"])
def test_opcheck_chunk_bwd(case, dtype, with_dht):
    inp, opts = _inputs(case, dtype)
    args, kw = _op_args(inp, **opts)
    del kw["output_final_state"]
    B, T = inp.q.shape[:2]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64).to(dtype)
    N = B if inp.cu_seqlens is None else inp.cu_seqlens.numel() - 1
    dht = (torch.randn(N, HV, K, V, generator=gen, dtype=torch.float64).to(state_dtype_for(dtype))
           if with_dht else None)
    torch.library.opcheck(BWD, args + (do, dht), kw)


# ------------------------------------------------------------------------------------------ eager: op == reference


class _OpLog(TorchDispatchMode):
    """Records the kla_tl operators that reach the dispatcher (and runs everything unchanged)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kla_tl":
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case,dtype", [("varlen_h0_state", F32), ("dense_h0_state", F64), ("dense", F32)],
                         ids=["varlen_f32", "dense_h0_f64", "dense_f32"])
def test_chunk_kla_runs_the_operators_and_equals_the_reference(case, dtype):
    inp, opts = _inputs(case, dtype, seed=7, requires_grad=True)
    ref = inp.to(requires_grad=True)
    with _OpLog() as log:
        o, ht, loss = _run(chunk_kla, inp, opts)
        loss.backward()
    assert log.seen == ["kla_tl::chunk_fwd", "kla_tl::chunk_bwd"]
    o_ref, ht_ref, loss_ref = _run(chunk_kla_reference, ref, opts)
    loss_ref.backward()
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert_rel_close("o", o, o_ref, tol_for(dtype, "o"))
    if opts.get("output_final_state"):
        assert ht.dtype == state_dtype_for(dtype)
        assert_rel_close("ht", ht, ht_ref, tol_for(dtype, "ht"))
    else:
        assert ht is None
    got, want = inp.grads(), ref.grads()
    assert set(got) == set(want) == set(inp.tensors())
    for name in got:
        assert got[name].dtype == getattr(inp, name).dtype
        assert_rel_close(f"d{name}", got[name], want[name], tol_for(dtype, "grad"))


def test_only_requested_gradients_are_returned():
    inp, opts = _inputs("dense_h0_state", torch.float64)
    inp.v.requires_grad_(True)
    o, ht = chunk_kla(*inp.args(), initial_state=inp.initial_state, **opts)
    (dv,) = torch.autograd.grad(_loss(o, ht), inp.v)
    ref = inp.to(requires_grad=False)
    ref.v.requires_grad_(True)
    o_r, ht_r = chunk_kla_reference(*ref.args(), initial_state=ref.initial_state, **opts)
    (dv_ref,) = torch.autograd.grad(_loss(o_r, ht_r), ref.v)
    assert_rel_close("dv", dv, dv_ref, tol_for(torch.float64, "grad"))
    assert all(getattr(inp, n).grad is None for n in ("q", "k", "g", "eta", "initial_state"))


@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
def test_empty_sequences_backward(with_h0):
    """T = 0: o is empty and nothing depends on q, k, v, g, eta (zero gradients); the final state is the initial
    state, so d(initial_state) = d(final_state)."""
    inp = make_inputs(2, 0, H, HV, K, V, torch.float64, seed=3, with_h0=with_h0, requires_grad=True)
    o, ht = chunk_kla(*inp.args(), initial_state=inp.initial_state, output_final_state=True)
    assert o.shape == (2, 0, HV, V) and ht.shape == (2, HV, K, V)
    _loss(o, ht).backward()
    for name, x in inp.tensors().items():
        want = 2 * x.detach() if name == "initial_state" else torch.zeros_like(x)
        assert torch.equal(x.grad, want), name


# ---------------------------------------------------------------------------------------------- torch.compile


def _compiled_matches_eager(case, dtype, device, backend, tol_quantity=None):
    """Compile a function calling chunk_kla (fullgraph), run forward and backward, compare with eager."""
    inp, opts = _inputs(case, dtype, device, seed=11, requires_grad=True)
    ref = inp.to(requires_grad=True)

    def step(q, k, v, g, eta, initial_state, cu_seqlens):
        o, ht = chunk_kla(q, k, v, g, eta, initial_state=initial_state, cu_seqlens=cu_seqlens, **opts)
        return _loss(o, ht)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(*inp.args(), inp.initial_state, inp.cu_seqlens)
    loss.backward()
    loss_ref = step(*ref.args(), ref.initial_state, ref.cu_seqlens)
    loss_ref.backward()
    got, want = inp.grads(), ref.grads()
    assert set(got) == set(inp.tensors())
    if tol_quantity is None:
        # aot_eager runs the traced aten graph and the same operators: bitwise equal to eager on the CPU.
        assert torch.equal(loss, loss_ref)
        for name in got:
            assert torch.equal(got[name], want[name]), name
    else:
        assert_rel_close("loss", loss, loss_ref, tol_for(dtype, "o"))
        for name in got:
            assert_rel_close(f"d{name}", got[name], want[name], tol_for(dtype, tol_quantity))
    return step, inp


@pytest.mark.parametrize("case", ["dense", "varlen_h0_state"])
def test_compile_fullgraph_forward_backward_matches_eager(case):
    _compiled_matches_eager(case, torch.float32, "cpu", "aot_eager")


def test_explain_reports_no_graph_break():
    inp, opts = _inputs("varlen_h0_state", requires_grad=True)

    def step(q, k, v, g, eta, initial_state, cu_seqlens):
        o, ht = chunk_kla(q, k, v, g, eta, initial_state=initial_state, cu_seqlens=cu_seqlens, **opts)
        return _loss(o, ht)

    ex = torch._dynamo.explain(step)(*inp.args(), inp.initial_state, inp.cu_seqlens)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    assert "kla_tl.chunk_fwd" in ex.graphs[0].code


def test_compiled_call_still_rejects_bad_cu_seqlens():
    """While tracing, cu_seqlens values are not read; the operator checks them when the graph runs."""
    inp, opts = _inputs("varlen_h0_state")
    bad = torch.tensor([0, 5, 3, 70, 75], dtype=torch.int32)

    def step(q, k, v, g, eta, initial_state, cu_seqlens):
        return chunk_kla(q, k, v, g, eta, initial_state=initial_state, cu_seqlens=cu_seqlens, **opts)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"chunk_kla: cu_seqlens must be non-decreasing"):
        compiled(*inp.args(), inp.initial_state, bad)


def test_compile_dynamic_shapes_two_varlen_layouts():
    def step(q, k, v, g, eta, initial_state, cu_seqlens):
        o, ht = chunk_kla(q, k, v, g, eta, initial_state=initial_state, cu_seqlens=cu_seqlens, normalize_q=True,
                          output_final_state=True)
        return _loss(o, ht)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for cu in (CU, [0, 9, 20, 41]):
        inp = make_inputs(1, cu[-1], H, HV, K, V, seed=len(cu), with_h0=True, cu_seqlens=cu, requires_grad=True)
        ref = inp.to(requires_grad=True)
        compiled(*inp.args(), inp.initial_state, inp.cu_seqlens).backward()
        step(*ref.args(), ref.initial_state, ref.cu_seqlens).backward()
        for name, gr in inp.grads().items():
            assert_rel_close(f"d{name}", gr, ref.grads()[name], tol_for(torch.float32, "grad"))


@pytest.mark.slow
def test_compile_inductor_on_cpu():
    """Inductor generates C++ around the opaque operators (about 15 s of compilation on two cores)."""
    _compiled_matches_eager("varlen_h0_state", torch.float32, "cpu", "inductor", tol_quantity="grad")


# ------------------------------------------------------------------------------------------------------- GPU


#: GPU sizes: head dims the TileLang kernels are built for, several chunks per sequence.
GPU_SIZES = dict(H=2, HV=4, K=64, V=64)
GPU_CU = [0, 0, 100, 230, 300]


def _gpu_inputs(dtype, varlen, seed=5):
    B, T = (1, GPU_CU[-1]) if varlen else (2, 130)
    return make_inputs(B, T, GPU_SIZES["H"], GPU_SIZES["HV"], GPU_SIZES["K"], GPU_SIZES["V"], dtype, "cuda",
                       seed=seed, with_h0=True, cu_seqlens=GPU_CU if varlen else None, requires_grad=True)


def _gpu_step(opts):
    def step(q, k, v, g, eta, initial_state, cu_seqlens):
        o, ht = chunk_kla(q, k, v, g, eta, initial_state=initial_state, cu_seqlens=cu_seqlens, **opts)
        return _loss(o, ht)
    return step


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_gpu_compile_bf16_matches_eager_and_reference(backend, varlen):
    from kla_tl.chunk import chunk_refusal
    from kla_tl.conventions import check_inputs

    if backend == "inductor":
        pytest.importorskip("triton", reason="inductor on CUDA needs triton")
    inp = _gpu_inputs(torch.bfloat16, varlen)
    opts = dict(normalize_q=True, output_final_state=True)
    prob, _ = check_inputs("test", *inp.args(), normalize_q=True, **inp.kwargs())
    assert chunk_refusal(prob, inp.q.device, needs_grad=False) is None, "the kernels must serve this case"
    eager, ref64 = inp.to(requires_grad=True), inp.to(torch.float64, requires_grad=True)
    step = _gpu_step(opts)
    with warnings.catch_warnings():
        # the backward warns once that it runs on the reference; that is expected here
        warnings.filterwarnings("ignore", message=".*backward recomputes.*")
        loss = torch.compile(step, fullgraph=True, backend=backend)(*inp.args(), inp.initial_state, inp.cu_seqlens)
        loss.backward()
        step(*eager.args(), eager.initial_state, eager.cu_seqlens).backward()
    o64, ht64 = chunk_kla_reference(*ref64.args(), initial_state=ref64.initial_state, cu_seqlens=ref64.cu_seqlens,
                                    **opts)
    _loss(o64, ht64).backward()
    for name, gr in inp.grads().items():
        assert gr is not None and torch.isfinite(gr).all(), name
        assert_rel_close(f"d{name} (compiled vs eager)", gr, eager.grads()[name], tol_for(torch.bfloat16, "grad"))
        assert_rel_close(f"d{name} (compiled vs float64)", gr, ref64.grads()[name], tol_for(torch.bfloat16, "grad"))
    ex = torch._dynamo.explain(step)(*eager.args(), eager.initial_state, eager.cu_seqlens)
    assert ex.graph_break_count == 0, ex.break_reasons


@pytest.mark.gpu
def test_gpu_fallback_warning_under_compile(monkeypatch):
    """float16 falls back to the reference on CUDA: the warning is raised when the operator runs, and tracing is
    unaffected (no graph break)."""
    from kla_tl import dispatch

    monkeypatch.setattr(dispatch, "_WARNED", set())
    inp = _gpu_inputs(torch.float16, varlen=False)
    step = _gpu_step(dict(output_final_state=True))
    with pytest.warns(RuntimeWarning, match=r"kla_tl\.chunk_kla: CUDA call runs on the torch reference.*float16"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(*inp.args(), inp.initial_state, None).backward()
    ex = torch._dynamo.explain(step)(*inp.args(), inp.initial_state, None)
    assert ex.graph_break_count == 0, ex.break_reasons
