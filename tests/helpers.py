"""Shared test toolkit: fresh random inputs, the one tolerance helper and the one tolerance table.

Used by the CPU tests (references, validation) and by the GPU kernel tests; nothing here assumes a device or a dtype.
Import it from a test module as ``from helpers import TOL, assert_rel_close, make_inputs`` (``tests/`` is on
``sys.path`` while pytest runs).

Error metric everywhere: the norm-relative error ``||got - ref|| / ||ref||``, computed in float64 (an RMS-relative
measure: a bf16 rounding of every element gives about 2**-9 / sqrt(3) ~ 1.1e-3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from kla_tl.conventions import state_dtype_for

#: Tolerances of ``assert_rel_close``, keyed by (dtype of the implementation under test, quantity).
#: quantity: "o" output, "ht" final state, "grad" any gradient, "stage" one intermediate of the pipeline.
TOL = {
    # float64 vs float64: two exact algorithms (token recurrence vs chunkwise WY) differ only by rounding;
    # observed agreement is ~1e-14, the margin covers T = 200 and ill-conditioned keys.
    (torch.float64, "o"): 1e-10,
    (torch.float64, "ht"): 1e-10,
    (torch.float64, "grad"): 1e-10,
    (torch.float64, "stage"): 1e-10,
    # float32 with float32 accumulation: unit roundoff 6e-8, grown by the triangular solve and the scan over
    # T/C chunks; 1e-3 / 2e-3 are the `kla-tl check` gates for float32.
    (torch.float32, "o"): 1e-3,
    (torch.float32, "ht"): 1e-3,
    (torch.float32, "grad"): 2e-3,
    (torch.float32, "stage"): 1e-3,
    # bfloat16 storage (unit roundoff 2**-9 = 2e-3), float32 accumulation: o and the state carry one bf16 rounding of
    # their own plus rounded intermediates; 5e-3 is the `kla-tl check` gate.
    (torch.bfloat16, "o"): 5e-3,
    (torch.bfloat16, "ht"): 5e-3,
    # gradients pass through about twice as many rounded intermediates (recomputed W/U/N, dA) as the forward.
    (torch.bfloat16, "grad"): 1e-2,
    (torch.bfloat16, "stage"): 5e-3,
    # float16 has 3 more mantissa bits than bf16 (unit roundoff 5e-4); the same pipeline, so 4x tighter.
    (torch.float16, "o"): 1.5e-3,
    (torch.float16, "ht"): 1.5e-3,
    (torch.float16, "grad"): 3e-3,
    (torch.float16, "stage"): 1.5e-3,
}


def tol_for(dtype: torch.dtype, quantity: str) -> float:
    """``TOL[(dtype, quantity)]`` with a readable KeyError."""
    try:
        return TOL[(dtype, quantity)]
    except KeyError:
        raise KeyError(f"no tolerance for dtype={dtype}, quantity={quantity!r}; add one to tests/helpers.py TOL "
                       f"with a comment") from None


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64 over the finite entries (``||got||`` when ``ref`` is all zeros)."""
    g = got.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    fin = torch.isfinite(r)
    diff = torch.where(fin, g - r, torch.zeros((), dtype=torch.float64))
    rn = torch.where(fin, r, torch.zeros((), dtype=torch.float64)).norm().item()
    dn = diff.norm().item()
    if rn == 0.0:
        return dn
    return dn / rn


def assert_rel_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Assert ``||got - ref|| / ||ref|| <= tol`` (float64 arithmetic); return the error.

    Checks, in order: both are tensors of the same shape; NaN and +-inf appear at the same places with the same
    signs in both; then the norm-relative error over the finite entries (the absolute ``||got||`` when ``ref`` is all
    zeros). The message names the tensor, the error, the tolerance and the worst element.
    """
    assert isinstance(got, torch.Tensor), f"{name}: expected a tensor, got {type(got).__name__}"
    assert isinstance(ref, torch.Tensor), f"{name}: reference is not a tensor ({type(ref).__name__})"
    assert tuple(got.shape) == tuple(ref.shape), f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    g = got.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    g_nan, r_nan = torch.isnan(g), torch.isnan(r)
    if not torch.equal(g_nan, r_nan):
        bad = (g_nan != r_nan).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: NaN mismatch at {bad.shape[0]} of {g.numel()} elements, first at {idx}: "
                             f"got {g[idx].item()}, reference {r[idx].item()}")
    g_inf, r_inf = torch.isinf(g), torch.isinf(r)
    if not torch.equal(g_inf, r_inf) or not torch.equal(g[g_inf], r[r_inf]):
        bad = ((g_inf != r_inf) | (g_inf & (g != r))).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: inf mismatch at {bad.shape[0]} of {g.numel()} elements, first at {idx}: "
                             f"got {g[idx].item()}, reference {r[idx].item()}")
    err = rel_error(g, r)
    if not err <= tol:
        fin = torch.isfinite(r)
        diff = torch.where(fin, (g - r).abs(), torch.zeros((), dtype=torch.float64))
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
        worst = f"; worst at {idx}: got {g[idx].item():.6g}, reference {r[idx].item():.6g}" if idx else ""
        raise AssertionError(f"{name}: relative error {err:.3e} > tolerance {tol:.1e} "
                             f"(||ref|| = {r[fin].norm().item():.3e}{worst})")
    return err


@dataclass
class KLAInputs:
    """One random problem: the positional tensors, the optional keyword tensors and the seed that drew them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    eta: torch.Tensor
    initial_state: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    seed: int = 0
    #: names of the differentiable tensors, in ``grads()`` order
    GRAD_NAMES: ClassVar[tuple] = ("q", "k", "v", "g", "eta", "initial_state")

    def args(self) -> tuple:
        """``(q, k, v, g, eta)``, the positional arguments of every entry point."""
        return self.q, self.k, self.v, self.g, self.eta

    def kwargs(self) -> dict:
        """``initial_state`` and ``cu_seqlens`` (None when absent)."""
        return {"initial_state": self.initial_state, "cu_seqlens": self.cu_seqlens}

    def tensors(self) -> dict:
        """name -> tensor of every differentiable input that is present."""
        return {n: getattr(self, n) for n in self.GRAD_NAMES if getattr(self, n) is not None}

    def requires_grad_(self, flag: bool = True) -> "KLAInputs":
        for x in self.tensors().values():
            x.requires_grad_(flag)
        return self

    def grads(self) -> dict:
        """name -> ``.grad`` of every present differentiable input."""
        return {n: x.grad for n, x in self.tensors().items()}

    def to(self, dtype: Optional[torch.dtype] = None, device=None, *, requires_grad: bool = False) -> "KLAInputs":
        """Detached copies; ``dtype`` converts every floating tensor (the usual use: float64 for the reference).

        ``cu_seqlens`` keeps its dtype.
        """
        def conv(x):
            if x is None:
                return None
            y = x.detach().to(device=device if device is not None else x.device,
                              dtype=dtype if dtype is not None else x.dtype).clone()
            return y.requires_grad_(requires_grad)
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(
            device if device is not None else self.cu_seqlens.device).clone()
        return replace(self, **{n: conv(getattr(self, n)) for n in self.GRAD_NAMES}, cu_seqlens=cu)

    def clone(self) -> "KLAInputs":
        """Detached copies in the same dtypes (to check that a call left its inputs unchanged)."""
        return self.to()

    def __iter__(self):
        """Iterate over ``(name, tensor)`` of every present tensor, ``cu_seqlens`` included."""
        for f in fields(self):
            x = getattr(self, f.name)
            if isinstance(x, torch.Tensor):
                yield f.name, x


KeyNorm = Union[None, float, Sequence[float]]


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def make_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device] = "cpu", seed: Optional[int] = None, key_norm: KeyNorm = None, *,
                gate_dtype: Optional[torch.dtype] = None, with_h0: bool = False,
                cu_seqlens: Optional[Sequence[int]] = None, cu_dtype: torch.dtype = torch.int32,
                requires_grad: bool = False) -> KLAInputs:
    """Draw a fresh random KLA problem (new tensors every call, never a cached buffer).

    Args:
        B, T, H, HV, K, V: sizes as in :mod:`kla_tl.conventions` (HV % H == 0).
        dtype: dtype of q, k, v.
        device: where the tensors live.
        seed: generator seed; None draws a new one (stored in ``.seed``, print it to reproduce a failure).
        key_norm: None keeps ``randn`` keys (``||k|| ~ sqrt(K)``); a number rescales every key row to that norm;
            a pair ``(lo, hi)`` gives each row a norm log-uniform in ``[lo, hi]`` (norm spread inside a chunk).
        gate_dtype: dtype of g and eta; default float32 (float64 when ``dtype`` is float64).
        with_h0: also draw ``initial_state`` [N, HV, K, V] in the state dtype (float32, float64 for float64).
        cu_seqlens: packed-sequence offsets (then B must be 1); stored as a ``cu_dtype`` tensor on ``device``.
        requires_grad: make q, k, v, g, eta (and initial_state) leaves that require grad.

    Distributions: q, k, v ~ N(0, 1); g = logsigmoid(N(2, 1)) < 0 (decay exp(g) mostly in 0.5..0.99);
    eta = sigmoid(N(0, 1.5)) in (0, 1); initial_state ~ 0.1 N(0, 1).
    """
    if seed is None:
        seed = _fresh_seed()
    if HV % H != 0:
        raise ValueError(f"make_inputs: HV={HV} must be a multiple of H={H}")
    if cu_seqlens is not None:
        if B != 1 or cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError(f"make_inputs: cu_seqlens={list(cu_seqlens)} needs B == 1, a leading 0 and a last T={T}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gdt = gate_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    sdt = state_dtype_for(dtype)

    def randn(*shape, dt=torch.float64):
        # draw on the CPU in float64 (identical values on every device), then convert
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    q = randn(B, T, H, K)
    k = randn(B, T, H, K)
    if key_norm is not None:
        unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        if isinstance(key_norm, (int, float)):
            norms = torch.full((B, T, H, 1), float(key_norm), dtype=torch.float64)
        else:
            lo, hi = (float(x) for x in key_norm)
            u = torch.rand(B, T, H, 1, generator=gen, dtype=torch.float64)
            norms = torch.exp(torch.log(torch.tensor(lo)) + u * (torch.log(torch.tensor(hi)) - torch.log(torch.tensor(lo))))
        k = unit * norms
    v = randn(B, T, HV, V)
    g = F.logsigmoid(randn(B, T, HV) + 2.0)
    eta = torch.sigmoid(1.5 * randn(B, T, HV))
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = 0.1 * randn(N, HV, K, V) if with_h0 else None

    def put(x, dt):
        if x is None:
            return None
        return x.to(device=device, dtype=dt).requires_grad_(requires_grad)

    cu = None if cu_seqlens is None else torch.tensor(list(cu_seqlens), dtype=cu_dtype, device=device)
    return KLAInputs(q=put(q, dtype), k=put(k, dtype), v=put(v, dtype), g=put(g, gdt), eta=put(eta, gdt),
                     initial_state=put(h0, sdt), cu_seqlens=cu, seed=seed)


def nan_poison_(x: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (outputs and scratch a kernel must overwrite); return it."""
    if x.is_floating_point():
        x.fill_(float("nan"))
    return x
