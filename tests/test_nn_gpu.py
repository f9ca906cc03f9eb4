"""GPU tests of :class:`kla_tl.nn.KLAttention` on the TileLang kernels: the layer on kernels equals the layer on the
reference within the kernels' tolerance.

Every test builds a layer with fresh random weights (a random seed, printed in the failure message), casts it to
bfloat16 on CUDA, and runs the same bf16 inputs twice:

- **kernels**: the chunk forward kernels (and the decode kernel for one cached token); the backward is kla-tl's torch
  chunk backward, as always. A spy on ``dispatch.warn_once`` checks that no forward call fell back to the reference.
- **reference**: ``KLA_TL_BACKEND=reference``, kla-tl's torch reference for the attention core (float32 arithmetic on
  the same bf16 inputs; it agrees with the float64 reference to ~1e-6, far below the bf16 tolerances).

Everything around the core (projections, short convolutions, gate, eta, output norm, output gate, output projection)
is the same bf16 torch code in both runs, so the two differ by the kernels' error and by what it does downstream.
Checked, with the tolerances of ``helpers.TOL`` for bfloat16:

- o (the attention core's output inside the layer) and the cache state: ``TOL["o"]`` / ``TOL["ht"]``;
- y, anchored to the float64 layer: the kernels may add at most ``TOL["o"]`` to the bf16 reference layer's own
  error (a direct bf16-vs-bf16 comparison of y is not a kernel tolerance: see below; on an H100 it differed by
  5.3e-3 to 5.8e-3 while o met 5e-3);
- gradients of x, of every weight matrix and conv kernel, and the per-token gradients of g and eta: ``TOL["grad"]``;
- gradients of the per-head gate parameters ``A_log``, ``dt_bias`` and ``b_proj.bias``: each is a sum over all B*T
  tokens of per-token terms, whose signs cancel (emulated on the CPU: |sum| / sum|terms| reaches 1e-3), so a
  per-token relative error ``tol`` shows up in the sum as up to ``tol * sum|terms|``; they are compared on that scale,
  ``||d_kernels - d_reference|| <= TOL["grad"] * ||sum_t |term_t|||`` (the terms taken from the reference run).

Why y is anchored rather than compared directly: the output path rounds o's (small) differences
again in bf16 (RMSNorm, gate product, o_proj), so y differs more than o; a CPU emulation (bf16 layer, o perturbed
by a relative 3e-4 / 1e-3 / 2e-3 before its bf16 rounding) moved y by 2.4e-3 / 3.4e-3 / 4.2e-3.

The float64 anchor (:func:`test_layer_on_kernels_matches_layer_on_reference`): the same (bf16-exact) weights and
inputs in float64 on the CPU. The bf16 layer's own arithmetic is ~8e-3 away from it whatever the core (measured on
the CPU with the reference core); the kernels may add no more than ``TOL["o"]`` to that.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import pytest
import torch

from helpers import assert_rel_close, rel_error, tol_for

from kla_tl import dispatch
from kla_tl.nn import KLAttention

pytestmark = pytest.mark.gpu

BF16 = torch.bfloat16
#: Where the layer runs (a module constant so that the tests' plumbing can be exercised on the CPU).
DEVICE = "cuda"
TOL_O = tol_for(BF16, "o")
TOL_HT = tol_for(BF16, "ht")
TOL_GRAD = tol_for(BF16, "grad")

#: (id, hidden, H, HV, K, V): the MQAR models' layer (KLA.md section 8: d = 256, 4 heads, d_k 48, d_v 96) and the
#: published head dims 96/192 with GVA (two value heads per q/k head).
DIMS = {
    "mqar-48x96": (256, 4, 4, 48, 96),
    "gva-96x192": (384, 2, 4, 96, 192),
}

#: Per-head parameters whose gradient is a sum over tokens (see the module docstring). Their per-token terms: the
#: gradients of the a_proj output (dt_bias: d g / d dt_bias = d g / d a) and of the b_proj output (b_proj.bias), and
#: dg * g for A_log (d g / d A_log = g).
PER_HEAD = ("A_log", "dt_bias", "b_proj.bias")


def _sync():
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# ------------------------------------------------------------------------------------------------------- helpers


class _Probe:
    """Records, for one run of the layer, the attention core's output o, g, and the gradients of g, eta and of the
    a_proj / b_proj outputs (the per-token terms of the per-head parameter gradients)."""

    def __init__(self, layer: KLAttention):
        self.rec: dict = {}
        self._layer = layer
        orig_inputs, orig_output = layer.kernel_inputs, layer.output

        def kernel_inputs(*args, **kwargs):
            out = orig_inputs(*args, **kwargs)
            g, eta = out[3], out[4]
            self.rec["g"] = g.detach()
            self._hook(g, "dg")
            self._hook(eta, "deta")
            return out

        def output(o, x):
            self.rec["o"] = o.detach()
            return orig_output(o, x)

        layer.kernel_inputs, layer.output = kernel_inputs, output
        self._handles = [layer.a_proj.register_forward_hook(lambda m, i, out: self._hook(out, "da")),
                         layer.b_proj.register_forward_hook(lambda m, i, out: self._hook(out, "db"))]

    def _hook(self, t: torch.Tensor, key: str):
        if t.requires_grad:
            t.register_hook(lambda d: self.rec.__setitem__(key, d.detach().clone()))

    def remove(self):
        del self._layer.kernel_inputs, self._layer.output
        for h in self._handles:
            h.remove()


@dataclass
class _Run:
    y: torch.Tensor
    cache: object
    grads: dict
    rec: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)


def _use_backend(mp: pytest.MonkeyPatch, backend: str):
    if backend == "reference":
        mp.setenv(dispatch.BACKEND_ENV, "reference")
    else:
        mp.delenv(dispatch.BACKEND_ENV, raising=False)


def _spy_fallbacks(mp: pytest.MonkeyPatch) -> list:
    """Record every (op, reason) a CUDA call reports when it runs on the reference instead of a kernel."""
    calls = []
    mp.setattr(dispatch, "warn_once", lambda op, reason: calls.append((op, reason)))
    return calls


def _train_run(layer, probe, x, w, backend, **kw) -> _Run:
    """Forward (and backward of sum(y * w)) of ``layer`` on ``x`` with the given backend."""
    with pytest.MonkeyPatch.context() as mp:
        _use_backend(mp, backend)
        calls = _spy_fallbacks(mp)
        layer.zero_grad(set_to_none=True)
        probe.rec = {}
        xg = x.detach().clone().requires_grad_()
        y, cache = layer(xg, **kw)
        (y.float() * w.float()).sum().backward()
        _sync()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    grads["x"] = xg.grad.detach().clone()
    return _Run(y.detach(), cache, grads, dict(probe.rec), calls)


def _assert_kernels_served(run: _Run, tag: str):
    """Only the backward may run on torch (kla-tl has no backward kernel yet); every forward must be a kernel."""
    fwd = [c for c in run.fallbacks if "backward" not in c[1]]
    assert not fwd, f"{tag}: forward calls fell back to the reference: {fwd}"


def _assert_sum_close(name: str, got: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor, tol: float) -> float:
    """``||got - ref|| <= tol * ||sum_t |terms_t|||`` for a gradient that is a sum over tokens of ``terms``
    ``[..., HV]`` (the scale at which a per-token relative error ``tol`` shows in the sum)."""
    scale = terms.detach().double().abs().reshape(-1, terms.shape[-1]).sum(0).cpu()
    diff = (got.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    err = diff / scale.norm().item()
    assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    assert err <= tol, (f"{name}: ||d_kernels - d_reference|| / ||sum_t |term_t||| = {err:.3e} > {tol:.1e} "
                        f"(got {got.tolist()}, reference {ref.tolist()}, relative {rel_error(got, ref):.3e})")
    return err


class _Checks:
    """Collects failed checks so that one GPU run reports all of them, then fails once."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, fn, *args):
        try:
            fn(*args)
        except AssertionError as e:
            self.failed.append(str(e).splitlines()[0])

    def done(self):
        assert not self.failed, f"{len(self.failed)} failed check(s):\n" + "\n".join(self.failed)


def _assert_anchored(check: _Checks, tag: str, name: str, got, ref, want, tol: float):
    """``got`` (kernels) is no further from the float64 layer ``want`` than ``ref`` (the reference core in the same
    bf16 layer) plus ``tol``: the kernels add at most their tolerance to the bf16 layer's own rounding error. (A
    direct bf16-vs-bf16 comparison of y is not a kernel tolerance: o's differences are re-rounded in bf16 by the
    output path, so y moves by more than o.)"""
    def _do():
        e_k, e_r = rel_error(got, want), rel_error(ref, want)
        assert e_k <= e_r + tol, (f"{tag} {name} vs the float64 layer: kernels {e_k:.3e}, reference path {e_r:.3e}; "
                                  f"the kernels may add at most {tol:.1e}")
    check(_do)


def _compare_training(k: _Run, r: _Run, tag: str, check: _Checks):
    assert torch.isfinite(k.y).all(), f"{tag}: y has non-finite entries"
    check(assert_rel_close, f"{tag} o (attention core output)", k.rec["o"], r.rec["o"], TOL_O)
    for key in ("dg", "deta"):
        check(assert_rel_close, f"{tag} per-token {key}", k.rec[key], r.rec[key], TOL_GRAD)
    terms = {"A_log": r.rec["dg"] * r.rec["g"], "dt_bias": r.rec["da"], "b_proj.bias": r.rec["db"]}
    for name, g_ref in r.grads.items():
        g = k.grads[name]
        if name in PER_HEAD:
            check(_assert_sum_close, f"{tag} grad {name}", g, g_ref, terms[name], TOL_GRAD)
        else:
            assert torch.isfinite(g).all(), f"{tag} grad {name}: non-finite"
            check(assert_rel_close, f"{tag} grad {name}", g, g_ref, TOL_GRAD)


def _layers(dims: str, gdn: bool, seed: int):
    """(bf16 layer on CUDA, the same weights in float64 on the CPU); eta's bias and the output norm's weight are
    randomized so that both matter."""
    hidden, H, HV, K, V = DIMS[dims]
    torch.manual_seed(seed)
    layer = KLAttention(hidden, H, K, V, num_v_heads=HV, gdn=gdn)
    with torch.no_grad():
        layer.b_proj.bias.uniform_(-1.0, 1.0)
        layer.o_norm.weight.uniform_(0.5, 1.5)
    layer = layer.to(BF16)
    ref64 = copy.deepcopy(layer).to(torch.float64)        # bf16 values, exactly, in float64
    return layer.to(DEVICE), ref64


def _x(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(BF16).to(DEVICE)


# --------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("gdn", [False, True], ids=["kla", "gdn"])
@pytest.mark.parametrize("dims", list(DIMS))
def test_layer_on_kernels_matches_layer_on_reference(dims, gdn, nan_poison):
    """Forward and backward, B = 2, T = 200 (three chunks and a tail), against the reference and float64."""
    seed = _seed()
    tag = f"[{dims} {'gdn' if gdn else 'kla'} seed {seed}]"
    layer, ref64 = _layers(dims, gdn, seed)
    hidden = layer.hidden_size
    x, w = _x((2, 200, hidden), seed + 1), _x((2, 200, hidden), seed + 2)
    probe = _Probe(layer)
    try:
        k = _train_run(layer, probe, x, w, "kernels")
        r = _train_run(layer, probe, x, w, "reference")
    finally:
        probe.remove()
    _assert_kernels_served(k, tag)
    check = _Checks()
    _compare_training(k, r, tag, check)

    # float64 anchor: the kernels add at most the kernels' tolerance to the bf16 layer's own rounding error
    x64 = x.detach().cpu().double().requires_grad_()
    y64, _ = ref64(x64)
    (y64 * w.cpu().double()).sum().backward()
    _assert_anchored(check, tag, "y", k.y, r.y, y64, TOL_O)
    _assert_anchored(check, tag, "x.grad", k.grads["x"], r.grads["x"], x64.grad, TOL_GRAD)
    check.done()


@pytest.mark.parametrize("dims,gdn", [("mqar-48x96", False), ("gva-96x192", True)], ids=["mqar-kla", "gva-gdn"])
def test_packed_sequences_on_kernels_match_reference(dims, gdn, nan_poison):
    """cu_seqlens packing (an empty sequence, a 1-token one, one under and ones over a 64-token chunk), with the
    cache: outputs, gradients and the per-sequence cache."""
    seed = _seed()
    tag = f"[{dims} {'gdn' if gdn else 'kla'} packed seed {seed}]"
    layer, ref64 = _layers(dims, gdn, seed)
    lens = [0, 37, 1, 112, 130]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    TT = sum(lens)
    x, w = _x((1, TT, layer.hidden_size), seed + 1), _x((1, TT, layer.hidden_size), seed + 2)
    probe = _Probe(layer)
    try:
        k = _train_run(layer, probe, x, w, "kernels", cu_seqlens=cu, use_cache=True)
        r = _train_run(layer, probe, x, w, "reference", cu_seqlens=cu, use_cache=True)
    finally:
        probe.remove()
    _assert_kernels_served(k, tag)
    check = _Checks()
    _compare_training(k, r, tag, check)
    assert k.cache.state.shape == (len(lens), layer.num_v_heads, layer.head_dim_k, layer.head_dim_v)
    assert torch.isfinite(k.cache.state).all()
    check(assert_rel_close, f"{tag} cache.state", k.cache.state, r.cache.state, TOL_HT)
    for name in ("conv_q", "conv_k", "conv_v"):
        check(assert_rel_close, f"{tag} cache.{name}", getattr(k.cache, name), getattr(r.cache, name), TOL_O)
    with torch.no_grad():
        y64, _ = ref64(x.cpu().double(), cu_seqlens=cu.cpu())
    _assert_anchored(check, tag, "y", k.y, r.y, y64, TOL_O)
    check.done()


@pytest.mark.parametrize("dims,gdn", [("mqar-48x96", False), ("gva-96x192", True)], ids=["mqar-kla", "gva-gdn"])
def test_prefill_decode_and_continue_on_kernels_match_reference(dims, gdn, nan_poison):
    """Inference with the cache, B = 3: a 100-token prefill (chunk kernels), 5 tokens one by one (decode kernel), then
    a 70-token chunk continued from the cache (chunk kernels with an initial state)."""
    seed = _seed()
    tag = f"[{dims} {'gdn' if gdn else 'kla'} cache seed {seed}]"
    layer, ref64 = _layers(dims, gdn, seed)
    P, D, C = 100, 5, 70
    x = _x((3, P + D + C, layer.hidden_size), seed + 1)

    def run(backend):
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            _use_backend(mp, backend)
            calls = _spy_fallbacks(mp)
            y0, cache = layer(x[:, :P], use_cache=True)
            ys = [y0]
            for t in range(P, P + D):
                yt, cache2 = layer(x[:, t:t + 1], cache=cache)
                assert cache2 is cache
                ys.append(yt)
            yc, cache = layer(x[:, P + D:], cache=cache)
            ys.append(yc)
            _sync()
        return _Run(torch.cat(ys, 1), cache, {}, {}, calls)

    k, r = run("kernels"), run("reference")
    _assert_kernels_served(k, tag)
    assert torch.isfinite(k.y).all() and torch.isfinite(k.cache.state).all()
    assert k.cache.state.dtype == torch.float32 and k.cache.seen_tokens == P + D + C
    check = _Checks()
    check(assert_rel_close, f"{tag} cache.state", k.cache.state, r.cache.state, TOL_HT)
    for name in ("conv_q", "conv_k", "conv_v"):
        check(assert_rel_close, f"{tag} cache.{name}", getattr(k.cache, name), getattr(r.cache, name), TOL_O)
    with torch.no_grad():                 # the float64 layer over the whole sequence (decode == full forward)
        y64, _ = ref64(x.cpu().double())
    _assert_anchored(check, tag, "y (prefill, decode, continuation)", k.y, r.y, y64, TOL_O)
    _assert_anchored(check, tag, "y of the decoded tokens", k.y[:, P:P + D], r.y[:, P:P + D], y64[:, P:P + D], TOL_O)
    check.done()
