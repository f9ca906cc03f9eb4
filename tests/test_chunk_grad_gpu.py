"""GPU tests of the gradients of ``chunk_kla`` through autograd: TileLang backward kernels, both code paths.

Every gradient (q, k, v, g, eta, initial_state) of ``chunk_kla`` is compared, by the norm-relative error with the
tolerance ``helpers.tol_for(dtype, "grad")``, with the float64 oracle
:func:`kla_tl.reference_bwd.chunk_kla_reference_bwd` run on float64 copies of the same inputs and cotangents:
tails, head dims, varlen with empty and one-token sequences and GVA, adversarial keys and gates, flags off, in
bfloat16 and float32, on the Hopper path and the Ampere path run on the Hopper GPU. A spy on
``kla_tl.dispatch.warn_once`` checks that the kernels served the forward and the backward (no fallback), and the
caller's tensors must be left unchanged. Also: K = 256 runs the torch backward (with its one warning) and is still
right; the gradients agree with fla's ``chunk_gated_delta_rule``; ``torch.compile(fullgraph=True)`` gives the eager
gradients; a 200-step Adam training loop follows the same loss curve as on ``KLA_TL_BACKEND=reference``.

Every case draws fresh random inputs (the seed is in the failure messages) and NaN-poisons every buffer the library
allocates (``torch.empty*``, ``Tensor.new_empty``), so an element a kernel fails to write shows up as NaN.

The one gradient that comes near the bf16 tolerance is dg in the ``gate_0`` case (all gates zero): there dg is almost
a constant per sequence and head (the final-state gradient's inner product with the states), so ||dg|| rests on
B * HV = 4 random scalars, and a draw where all four are small has a relative error several times the median for
any bf16 chunked algorithm. On an H100, 1000 draws a path (``tools/grad_error_sweep.py --fla``): kla-tl median
3.1e-3 / 3.2e-3, 2 / 5 draws over 1e-2; fla's dg on the same draws median 3.4e-3, 6 / 5 over
(``perf/experiments/h100-chunk-tail-ds-v3.json``). A ``gate_0`` dg failure is worth that sweep before a hunt for a
kernel bug.

:func:`grid_problems` lists the problem of every ``chunk_kla`` call made here (for compiling the kernels ahead of a
GPU run); it is built from the same module constants as the tests.
"""

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_rel_close, make_inputs, tol_for

import kla_tl
from kla_tl import dispatch
from kla_tl.reference import beta_from_eta, l2norm
from kla_tl.reference_bwd import chunk_kla_reference_bwd

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
#: code paths: Hopper, and Ampere run on the Hopper GPU
PATHS = ["sm_90a", "sm_80"]
DTYPES = [BF16, torch.float32]
_paths = pytest.mark.parametrize("path", PATHS, indirect=True)
_hopper = pytest.mark.parametrize("path", ["sm_90a"], indirect=True)
_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])

#: Sizes of every case unless a test says otherwise (few distinct problems: each needs its kernels compiled).
DENSE = dict(B=2, T=200, H=2, HV=2, K=128, V=128)
TAILS = [1, 63, 64, 65, 1000]
HEAD_DIMS = [(64, 64), (128, 128), (96, 192)]
#: empty sequences, one-token sequences, a partial chunk, a long sequence; GVA (two value heads per q/k head)
VARLEN_CU = [0, 0, 1, 1, 300, 301, 2000]
VARLEN = dict(B=1, T=VARLEN_CU[-1], H=2, HV=4, K=128, V=128)
#: the forward grid's adversarial keys and gates (tests/test_chunk_fwd_gpu.py)
ADVERSARIAL = ["zero_rows", "norm_1e-3", "norm_1e3", "norm_spread", "gate_0", "gate_-30"]
#: K = 256: forward kernels, torch backward
K256 = dict(B=2, T=130, H=2, HV=2, K=256, V=256)
FLA = dict(B=2, T=1000, H=4, HV=4, K=128, V=128)
#: The training loop (CPU emulation with 2e-2 relative noise on o and on dq, dk, dv moved the loss curve by at most
#: 2.2e-3 relative over 4 seeds; the loss fell to 0.25-0.29 of its start).
TRAIN_D, TRAIN_STEPS, TRAIN_LR = 32, 200, 1e-3
TRAIN_TOL = 2e-2       # |loss_kernels - loss_reference| / loss_reference at every step
TRAIN_DROP = 0.5       # the final loss is at most this fraction of the first

#: autograd input name -> key of the oracle's result
ORACLE_KEY = {"q": "dq", "k": "dk", "v": "dv", "g": "dg", "eta": "deta", "initial_state": "dh0"}


def _problem(sizes: dict, dtype, *, normalize_q=True, use_h0=True, use_dht=True, cu_seqlens=None) -> dict:
    """One chunk_kla call: sizes, dtype, flags (use_dht = output_final_state, with a random final-state gradient)."""
    return dict(sizes, dtype=dtype, normalize_q=normalize_q, use_h0=use_h0, use_dht=use_dht, cu_seqlens=cu_seqlens)


#: flags off: no q normalization, no initial state, no final state
FLAGS_OFF = dict(normalize_q=False, use_h0=False, use_dht=False)
TRAIN = _problem(DENSE, BF16, **FLAGS_OFF)


@pytest.fixture
def path(request, monkeypatch, nan_poison):
    """Select the code path (Ampere runs on Hopper with wgmma/TMA/WS disabled); every torch.empty* is NaN-filled."""
    if request.param == "sm_90a" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm_90a path needs a Hopper GPU")
    monkeypatch.setenv("KLA_TL_ARCH", request.param)
    return request.param


def _spy_fallbacks(mp) -> list:
    """Record every (op, reason) a CUDA call reports when it does not run on a kernel."""
    calls = []
    mp.setattr(dispatch, "warn_once", lambda op, reason: calls.append((op, reason)))
    return calls


def _grad_check(inp, *, dtype, normalize_q, output_final_state=True, fallback=None):
    """Run chunk_kla and autograd on leaf copies of ``inp`` with random do (and dht); check every gradient against
    the float64 oracle. ``fallback=None``: the kernels must serve forward and backward; else the backward must fall
    back (one warning) for a reason containing ``fallback``. Returns ``(grads by input name, do, dht)``."""
    from kla_tl.chunk import chunk_bwd_refusal, chunk_refusal
    from kla_tl.conventions import check_inputs

    tag = f"[seed {inp.seed}]"
    prob, _ = check_inputs("test", *inp.args(), normalize_q=normalize_q, **inp.kwargs())
    assert chunk_refusal(prob, inp.q.device, needs_grad=False) is None, "the forward kernels must serve this case"
    reason = chunk_bwd_refusal(prob, inp.q.device)
    if fallback is None:
        assert reason is None, f"the backward kernels must serve this case, refused: {reason}"
    else:
        assert reason is not None and fallback in reason, f"expected a backward refusal for {fallback}: {reason}"
    x = inp.to(requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        calls = _spy_fallbacks(mp)
        o, ht = kla_tl.chunk_kla(*x.args(), normalize_q=normalize_q, output_final_state=output_final_state,
                                 **x.kwargs())
        do = torch.randn_like(o)
        dht = torch.randn_like(ht) if output_final_state else None
        torch.autograd.backward([o, ht] if output_final_state else [o], [do, dht] if output_final_state else [do])
        torch.cuda.synchronize()
    if fallback is None:
        assert not calls, f"{tag} chunk_kla fell back to torch: {calls}"
    else:
        assert len(calls) == 1 and calls[0][0] == "chunk_kla" and calls[0][1].startswith("backward"), calls
        assert fallback in calls[0][1], calls
    for name, t in inp:
        assert torch.equal(getattr(x, name).detach(), t), f"{tag} chunk_kla modified the caller's {name}"
    ref = inp.to(torch.float64)
    want = chunk_kla_reference_bwd(*ref.args(), do.double(), dht=None if dht is None else dht.double(),
                                   normalize_q=normalize_q, **ref.kwargs())
    grads = x.grads()
    assert set(grads) == set(inp.tensors())
    for name, gr in grads.items():
        assert gr is not None and gr.dtype == getattr(inp, name).dtype, f"{tag} d{name}: {gr}"
        assert torch.isfinite(gr).all(), f"{tag} d{name} has non-finite entries"
        assert_rel_close(f"{tag} d{name}", gr, want[ORACLE_KEY[name]], tol_for(dtype, "grad"))
    return grads, do, dht


def _inputs(p: dict, **kw):
    """Fresh random inputs of problem ``p`` on the GPU."""
    return make_inputs(p["B"], p["T"], p["H"], p["HV"], p["K"], p["V"], p["dtype"], "cuda", with_h0=p["use_h0"],
                       cu_seqlens=p["cu_seqlens"], **kw)


def _check(p: dict, inp=None, **kw):
    """:func:`_grad_check` of problem ``p`` on fresh inputs (or on ``inp``, drawn by :func:`_inputs` and edited)."""
    return _grad_check(_inputs(p) if inp is None else inp, dtype=p["dtype"], normalize_q=p["normalize_q"],
                       output_final_state=p["use_dht"], **kw)


# ----------------------------------------------------------------------------------------------- the grid


@_paths
@pytest.mark.parametrize("T", TAILS)
@_dtypes
def test_tails_match_the_oracle(path, T, dtype):
    _check(_problem(dict(DENSE, T=T), dtype))


@_paths
@pytest.mark.parametrize("K,V", HEAD_DIMS)
@_dtypes
def test_head_dims_match_the_oracle(path, K, V, dtype):
    _check(_problem(dict(DENSE, K=K, V=V), dtype))


@_paths
@pytest.mark.parametrize("normalize_q", [True, False], ids=["qnorm", "raw_q"])
@_dtypes
def test_varlen_gva_empty_and_short_sequences(path, normalize_q, dtype):
    _check(_problem(VARLEN, dtype, normalize_q=normalize_q, cu_seqlens=VARLEN_CU))


@_paths
@pytest.mark.parametrize("case", ADVERSARIAL)
@_dtypes
def test_adversarial_keys_and_gates(path, case, dtype):
    p = _problem(DENSE, dtype)
    inp = _inputs(p, key_norm={"norm_1e-3": 1e-3, "norm_1e3": 1e3, "norm_spread": (1e-3, 1e3)}.get(case))
    if case == "zero_rows":
        inp.k[:, ::3] = 0
    elif case == "gate_0":
        inp.g.zero_()
    elif case == "gate_-30":
        inp.g[:, ::2] = -30.0
    _check(p, inp)


@_paths
@_dtypes
def test_flags_off(path, dtype):
    """No q normalization, no initial state, no final state (so no final-state gradient)."""
    _check(_problem(DENSE, dtype, **FLAGS_OFF))


# ------------------------------------------------------------------------------------ fallback, fla, compile


@_hopper
def test_k256_falls_back_to_the_torch_backward(path):
    """K = 256: the forward kernels run, the backward warns once that it runs the torch backward, and the
    gradients still match the oracle."""
    _check(_problem(K256, BF16), fallback="K=256")


@_hopper
def test_grads_agree_with_fla(path, monkeypatch):
    """The same gradients from fla's chunk_gated_delta_rule, with KLA mapped onto it as the forward test does
    (q L2-normalized in torch, raw keys, beta = eta / (||k||^2 + eps) computed in torch, so that autograd adds the
    path through the key norms to dk and gives deta). fla's inputs are float32 leaves holding the bf16 values, cast
    to bf16 for fla, so the two paths into k add up in float32."""
    monkeypatch.delenv("FLA_DISABLE_BACKEND_DISPATCH", raising=False)   # read when fla is imported: before that
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    p = _problem(FLA, BF16)
    inp = _inputs(p)
    grads, do, dht = _check(p, inp)
    f = inp.to(torch.float32, requires_grad=True)
    o, ht = fla.chunk_gated_delta_rule(l2norm(f.q).to(BF16), f.k.to(BF16), f.v.to(BF16), f.g,
                                       beta_from_eta(f.k, f.eta), initial_state=f.initial_state,
                                       output_final_state=True)
    torch.autograd.backward([o, ht], [do, dht])
    want = f.grads()
    for name, gr in grads.items():
        assert want[name] is not None and torch.isfinite(want[name]).all(), f"fla's d{name}: {want[name]}"
        assert_rel_close(f"[seed {inp.seed}] d{name} vs fla", gr, want[name], tol_for(BF16, "grad"))


@_paths
@_dtypes
def test_torch_compile_fullgraph_forward_and_backward(path, dtype, monkeypatch):
    """torch.compile(fullgraph=True) (inductor) of a function calling chunk_kla, then backward: the eager
    gradients, and the kernels served every call."""
    pytest.importorskip("triton", reason="inductor on CUDA needs triton")
    inp = _inputs(_problem(DENSE, dtype))

    def step(q, k, v, g, eta, initial_state):
        o, ht = kla_tl.chunk_kla(q, k, v, g, eta, normalize_q=True, initial_state=initial_state,
                                 output_final_state=True)
        return o.float().square().sum() + ht.square().sum()

    calls = _spy_fallbacks(monkeypatch)
    grads = {}
    for mode, fn in (("compiled", torch.compile(step, fullgraph=True)), ("eager", step)):
        x = inp.to(requires_grad=True)
        fn(*x.args(), x.initial_state).backward()
        grads[mode] = x.grads()
    assert not calls, f"chunk_kla fell back to torch: {calls}"
    for name, gr in grads["compiled"].items():
        assert gr is not None and torch.isfinite(gr).all(), f"compiled d{name}: {gr}"
        assert_rel_close(f"[seed {inp.seed}] d{name} (compiled vs eager)", gr, grads["eager"][name],
                         tol_for(dtype, "grad"))


# ----------------------------------------------------------------------------------------------- training


class _Toy(torch.nn.Module):
    """A linear map of x [B, T, d] to q, k, v (cast to bf16), g = logsigmoid(. + 2) and eta = sigmoid(.), then
    chunk_kla of the problem :data:`TRAIN`; returns o in float32."""

    def __init__(self, d: int):
        super().__init__()
        p = TRAIN
        self.split = [p["H"] * p["K"], p["H"] * p["K"], p["HV"] * p["V"], p["HV"], p["HV"]]
        self.proj = torch.nn.Linear(d, sum(self.split))

    def forward(self, x):
        p, (B, T) = TRAIN, x.shape[:2]
        q, k, v, g, eta = self.proj(x).split(self.split, -1)
        q, k = (t.reshape(B, T, p["H"], p["K"]).to(p["dtype"]) for t in (q, k))
        v = v.reshape(B, T, p["HV"], p["V"]).to(p["dtype"])
        o, _ = kla_tl.chunk_kla(q, k, v, F.logsigmoid(g + 2.0), torch.sigmoid(eta), normalize_q=p["normalize_q"])
        return o.float()


def _train(model, x, y) -> list:
    """Adam on the relative mean-squared error ||model(x) - y||^2 / ||y||^2; the loss of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    losses = []
    for _ in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).square().mean() / y.square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@_hopper
def test_training_loop_matches_the_reference(path):
    """A student :class:`_Toy` regresses the output of a random teacher ``_Toy`` (a fixed random target the student
    can approach) with Adam for 200 steps on bf16 q, k, v, once on the kernels and once on
    ``KLA_TL_BACKEND=reference`` from the same initial weights: every loss within :data:`TRAIN_TOL` (relative) of the
    reference run's, and the loss falls to at most :data:`TRAIN_DROP` of its start. (tests/test_nn_gpu.py compares
    one forward/backward of the KLAttention layer, no training loop.)"""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    student, teacher = _Toy(TRAIN_D).cuda(), _Toy(TRAIN_D).cuda()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TRAIN["B"], TRAIN["T"], TRAIN_D, generator=gen).cuda()
    with torch.no_grad():
        y = teacher(x)
    curves = {}
    for backend in ("kernels", "reference"):
        with pytest.MonkeyPatch.context() as mp:
            if backend == "reference":
                mp.setenv(dispatch.BACKEND_ENV, "reference")
            else:
                mp.delenv(dispatch.BACKEND_ENV, raising=False)
            calls = _spy_fallbacks(mp)
            curves[backend] = _train(copy.deepcopy(student), x, y)
        if backend == "kernels":
            assert not calls, f"chunk_kla fell back to torch: {calls[:2]}"
        else:
            assert calls and all(dispatch.BACKEND_ENV in r for _, r in calls), f"reference run: {calls[:2]}"
    k, r = curves["kernels"], curves["reference"]
    tag = f"[seed {seed}]"
    assert all(math.isfinite(v) for v in k), f"{tag} non-finite loss on the kernels: {k}"
    rel = [abs(a - b) / b for a, b in zip(k, r)]
    i = max(range(len(rel)), key=rel.__getitem__)
    assert rel[i] <= TRAIN_TOL, (f"{tag} step {i}: loss {k[i]:.6g} on the kernels, {r[i]:.6g} on the reference "
                                 f"(relative {rel[i]:.2e} > {TRAIN_TOL})")
    assert k[-1] <= TRAIN_DROP * k[0], f"{tag} the loss did not fall: {k[0]:.4g} -> {k[-1]:.4g}"


# ----------------------------------------------------------------------------------------- kernel warm-up


def grid_problems() -> list:
    """The problem of every chunk_kla call of this module (both code paths), without repeats: dicts with B, T, H,
    HV, K, V, dtype, normalize_q, use_h0, use_dht (the final state is an output, with a gradient) and cu_seqlens
    (list or None). K = 256 needs only the forward kernels (its backward runs in torch)."""
    out = []
    for dt in DTYPES:
        out += [_problem(dict(DENSE, T=T), dt) for T in TAILS]
        out += [_problem(dict(DENSE, K=K, V=V), dt) for K, V in HEAD_DIMS]
        out += [_problem(VARLEN, dt, normalize_q=nq, cu_seqlens=VARLEN_CU) for nq in (True, False)]
        out.append(_problem(DENSE, dt))                 # adversarial keys and gates, torch.compile
        out.append(_problem(DENSE, dt, **FLAGS_OFF))    # flags off
    out += [_problem(K256, BF16), _problem(FLA, BF16), TRAIN]
    unique = []
    for p in out:
        if p not in unique:
            unique.append(p)
    return unique
