"""One benchmark job: inputs for a case, the float64 correctness check, the timing, and the result records.

Per (case, implementation):

1. ``unsupported`` / fallback: an implementation that cannot run the case gets a record with an ``error`` and no
   time. A kla-tl call that would fall back to the torch reference on a GPU is not timed either (the number would be
   the reference's, not a kernel's) unless ``time_fallback`` is set; its record names the reason in ``backend``.
2. Check: the implementation runs a small input of the same heads, head dims and dtype (T <= 256, B <= 2; ragged
   varlen when the case is varlen; decode B <= 4) and is compared with the float64 reference
   (:func:`kla_tl.chunk_kla_reference`, :func:`kla_tl.kla_decode_reference`): norm-relative error of o, of the new
   state (decode) and of every gradient (fwd+bwd). Above :data:`TOLERANCES` -> ``error``, no timing.
3. Timing: ``n`` input sets (together larger than the L2) called in rotation; :func:`timing.bench_eager`, and for
   decode also :func:`timing.bench_graph` (one record each, ``graph`` false/true). fwd+bwd also records the peak
   memory of one call (``torch.cuda.max_memory_allocated`` after a reset, inputs and gradients included).

Inputs follow KLA's conventions: raw keys (norm about sqrt(K)), ``g = logsigmoid(x) / 16`` (log-decay close to 0),
``eta = sigmoid(x)``, float32 g and eta.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
from typing import Optional

import torch
import torch.nn.functional as F

from . import timing
from .suites import Case

#: Norm-relative error allowed by the pre-timing check, by q/k/v dtype and quantity. Looser than the test suite's
#: gates (tests/helpers.py): this check guards a timing against a wrong or mis-called kernel, not the last ulp.
#: bf16: fla measured 4.1e-3 (chunk) and 2.3e-3 (recurrent) on o (PEERS.md section 6).
TOLERANCES = {
    "bfloat16": {"o": 2e-2, "state": 2e-2, "grad": 5e-2},
    "float16": {"o": 1e-2, "state": 1e-2, "grad": 3e-2},
    "float32": {"o": 1e-3, "state": 1e-3, "grad": 5e-3},
}

#: Tokens per sequence and batch of the check input; ragged lengths for varlen cases (sum 256, tails of 61/1/2).
CHECK_T, CHECK_B, CHECK_VARLEN, CHECK_DECODE_B = 256, 2, (61, 129, 66), 4

_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class CheckFailed(Exception):
    def __init__(self, msg: str, errors: dict):
        super().__init__(msg)
        self.errors = errors


def torch_dtype(name: str) -> torch.dtype:
    return _DT[name]


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------

def chunk_inputs(case: Case, device: torch.device, *, seed: int, B: Optional[int] = None, T: Optional[int] = None,
                 varlen: Optional[tuple] = None, grad: bool = False) -> dict:
    """q k v g eta (+ cu_seqlens, do) for a chunk op; sizes from ``case`` unless overridden."""
    B = case.B if B is None else B
    T = case.T if T is None else T
    varlen = case.varlen if varlen is None else varlen
    dt = torch_dtype(case.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    x = {
        "q": rnd(B, T, case.H, case.K),
        "k": rnd(B, T, case.H, case.K),
        "v": rnd(B, T, case.HV, case.V),
        "g": F.logsigmoid(rnd(B, T, case.HV, dtype=torch.float32)) / 16,
        "eta": torch.sigmoid(rnd(B, T, case.HV, dtype=torch.float32)),
    }
    if grad:
        for n in ("q", "k", "v", "g", "eta"):
            x[n].requires_grad_(True)
        x["do"] = rnd(B, T, case.HV, case.V)
    x["cu_seqlens"] = None
    if varlen:
        cu = [0]
        for n in varlen:
            cu.append(cu[-1] + int(n))
        x["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=device)
    return x


def decode_inputs(case: Case, device: torch.device, *, seed: int, B: Optional[int] = None) -> dict:
    """q k v g eta [B, 1, ...], a state pool [B, HV, K, V] of the case's state dtype, and an ``out`` buffer."""
    B = case.B if B is None else B
    x = chunk_inputs(case, device, seed=seed, B=B, T=1, varlen=())
    x.pop("cu_seqlens")
    gen = torch.Generator(device=device).manual_seed(seed + 7919)
    # a state of the size a long prefix leaves behind: entries ~ 0.1
    x["state"] = (0.1 * torch.randn(B, case.HV, case.K, case.V, generator=gen, device=device,
                                    dtype=torch.float32)).to(torch_dtype(case.state_dtype or "float32"))
    x["out"] = torch.empty(B, 1, case.HV, case.V, device=device, dtype=torch_dtype(case.dtype))
    return x


def tensor_bytes(x: dict) -> int:
    return sum(t.numel() * t.element_size() for t in x.values() if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------------------------------------------
# correctness check
# ----------------------------------------------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (absolute when want is 0); inf when got has NaN/inf."""
    g, w = got.detach().to(torch.float64), want.detach().to(torch.float64)
    if not torch.isfinite(g).all():
        return float("inf")
    den = torch.linalg.vector_norm(w).item()
    num = torch.linalg.vector_norm(g - w).item()
    return num / den if den > 0 else num


def check(impl, case: Case, device: torch.device, *, seed: int = 1234) -> dict:
    """Run ``impl`` on a small input of ``case`` and compare with the float64 reference; returns the errors.

    Raises :class:`CheckFailed` when an error exceeds :data:`TOLERANCES`.
    """
    from kla_tl.reference import chunk_kla_reference, kla_decode_reference
    tol = TOLERANCES[case.dtype]
    errs, limits = {}, {}
    if case.op == "decode":
        B = min(case.B, CHECK_DECODE_B)
        x = decode_inputs(case, device, seed=seed, B=B)
        x64 = {n: t.to(torch.float64) for n, t in x.items() if n not in ("out",)}
        o, new_state = impl.decode(x["q"], x["k"], x["v"], x["g"], x["eta"], x["state"],
                                   normalize_q=case.normalize_q, out=x["out"])
        o_ref = kla_decode_reference(x64["q"], x64["k"], x64["v"], x64["g"], x64["eta"], x64["state"],
                                     normalize_q=case.normalize_q)
        errs["o"], limits["o"] = rel_err(o, o_ref), tol["o"]
        errs["state"], limits["state"] = rel_err(new_state, x64["state"]), tol["state"]
    else:
        bwd = case.op == "chunk_fwdbwd"
        if case.varlen:
            x = chunk_inputs(case, device, seed=seed, B=1, T=sum(CHECK_VARLEN), varlen=CHECK_VARLEN, grad=bwd)
        else:
            x = chunk_inputs(case, device, seed=seed, B=min(case.B, CHECK_B), T=min(case.T, CHECK_T), grad=bwd)
        names = ("q", "k", "v", "g", "eta")
        x64 = {n: x[n].detach().to(torch.float64).requires_grad_(bwd) for n in names}
        o = impl.chunk(*(x[n] for n in names), normalize_q=case.normalize_q, cu_seqlens=x["cu_seqlens"])
        o_ref, _ = chunk_kla_reference(*(x64[n] for n in names), normalize_q=case.normalize_q,
                                       cu_seqlens=x["cu_seqlens"])
        errs["o"], limits["o"] = rel_err(o, o_ref), tol["o"]
        if bwd:
            o.backward(x["do"])
            o_ref.backward(x["do"].to(torch.float64))
            for n in names:
                key = f"d{n}"
                if x[n].grad is None:
                    errs[key], limits[key] = float("inf"), tol["grad"]
                else:
                    errs[key], limits[key] = rel_err(x[n].grad, x64[n].grad), tol["grad"]
    bad = {k: v for k, v in errs.items() if not v <= limits[k]}
    if bad:
        detail = ", ".join(f"{k} {v:.2e} > {limits[k]:.0e}" for k, v in bad.items())
        raise CheckFailed(f"check against the float64 reference failed: {detail}", errs)
    return errs


# ----------------------------------------------------------------------------------------------------------------
# one job
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def recorded_fallbacks():
    """Collect the ``"op: reason"`` of every kla-tl fallback to the torch reference inside the block.

    kla-tl announces each fallback through :func:`kla_tl.dispatch.warn_once` (once per process, so the warning itself
    cannot be relied on); the function is wrapped for the duration of the block. This catches partial fallbacks that
    the refusal functions do not report, e.g. a forward on the kernels with a backward through the reference.
    """
    from kla_tl import dispatch
    seen: list = []
    orig = dispatch.warn_once

    def wrapped(op, reason, *a, **kw):
        seen.append(f"{op}: {reason}")
        return orig(op, reason, *a, **kw)
    dispatch.warn_once = wrapped
    try:
        yield seen
    finally:
        dispatch.warn_once = orig


def _base_record(case: Case, impl_name: str, graph: bool) -> dict:
    return {"op": case.op, "impl": impl_name, "case": case.name, "shape": case.shape(), "ms": None,
            "spread": None, "graph": graph, "normalize_q": case.normalize_q}


def _error_records(case: Case, impl_name: str, msg: str, **extra) -> list[dict]:
    graphs = (False, True) if case.op == "decode" else (False,)
    out = []
    for gph in graphs:
        r = _base_record(case, impl_name, gph)
        r.update(extra)
        r["error"] = msg
        out.append(r)
    return out


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]


def _free(device: torch.device):
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_job(impl, case: Case, device: torch.device, *, warmup_ms: float = 10.0, rep_ms: float = 40.0,
            max_sets: int = 64, seed: int = 0, time_fallback: bool = False, verbose: bool = False) -> list[dict]:
    """Check and time ``impl`` on ``case``; returns its records (decode: eager and graph)."""
    why = impl.unsupported(case, device)
    if why:
        return _error_records(case, impl.name, f"unsupported: {why}")
    extra = {}
    try:
        with impl.environment():
            if case.op == "decode":
                probe = decode_inputs(case, device, seed=seed, B=min(case.B, CHECK_DECODE_B))
            else:
                probe = chunk_inputs(case, device, seed=seed, B=1, T=min(case.T, 64),
                                     varlen=(min(case.T, 64),) if case.varlen else ())
            backend = impl.backend(case, probe, device)
            del probe
            if backend is not None:
                extra["backend"] = backend
                if backend != "kernels" and not time_fallback:
                    return _error_records(case, impl.name, f"not timed: falls back to the {backend}", **extra)
            try:
                with recorded_fallbacks() as fell_back:
                    extra["check"] = check(impl, case, device)
            except CheckFailed as e:
                extra["check"] = e.errors
                return _error_records(case, impl.name, str(e), **extra)
            if backend == "kernels" and fell_back:
                extra["backend"] = "partly reference: " + "; ".join(sorted(set(fell_back)))
                if not time_fallback:
                    return _error_records(case, impl.name, f"not timed: {extra['backend']}", **extra)
            sch = impl.schedule(case, device)
            if sch:
                extra["schedule"] = sch
            _free(device)
            if case.op == "decode":
                return _time_decode(impl, case, device, extra, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                    max_sets=max_sets, seed=seed)
            return _time_chunk(impl, case, device, extra, warmup_ms=warmup_ms, rep_ms=rep_ms, max_sets=max_sets,
                               seed=seed)
    except Exception as e:  # noqa: BLE001 -- one failing job must not end the run
        if verbose:
            traceback.print_exc()
        return _error_records(case, impl.name, _short(e), **extra)
    finally:
        _free(device)


def _n_sets(device: torch.device, set_bytes: int, max_sets: int) -> int:
    budget = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.3)                             # leave room for the call's outputs and workspace
    return timing.rotation_count(set_bytes, timing.l2_bytes(device), max_sets=max_sets, mem_budget=budget)


def _timed(rec: dict, t: timing.Timing) -> dict:
    rec.update(ms=t.ms, spread=t.spread, p20=t.p20, p80=t.p80)
    return rec


def _time_chunk(impl, case, device, extra, *, warmup_ms, rep_ms, max_sets, seed) -> list[dict]:
    bwd = case.op == "chunk_fwdbwd"
    names = ("q", "k", "v", "g", "eta")
    rec = _base_record(case, impl.name, False)
    rec.update(extra)

    def make_fn(x):
        args = [x[n] for n in names]
        if bwd:
            def fn():
                o = impl.chunk(*args, normalize_q=case.normalize_q, cu_seqlens=x["cu_seqlens"])
                o.backward(x["do"])
        else:
            def fn():
                with torch.no_grad():
                    impl.chunk(*args, normalize_q=case.normalize_q, cu_seqlens=x["cu_seqlens"])
        return fn

    first = chunk_inputs(case, device, seed=seed, grad=bwd)
    fn0 = make_fn(first)
    fn0()                                                    # compile / autotune outside any measurement
    if bwd:
        for n in names:
            first[n].grad = None
        if device.type == "cuda":
            _free(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) - tensor_bytes(first)
            fn0()
            torch.cuda.synchronize(device)
            rec["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            for n in names:
                first[n].grad = None
    n = _n_sets(device, tensor_bytes(first), max_sets)
    sets = [first] + [chunk_inputs(case, device, seed=seed + i, grad=bwd) for i in range(1, n)]
    fns = [make_fn(x) for x in sets]
    leaves = [x[m] for x in sets for m in names] if bwd else None
    t = timing.bench_eager(fns, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=leaves)
    rec["sets"] = n
    return [_timed(rec, t)]


def _time_decode(impl, case, device, extra, *, warmup_ms, rep_ms, max_sets, seed) -> list[dict]:
    first = decode_inputs(case, device, seed=seed)
    n = _n_sets(device, tensor_bytes(first), max_sets)
    sets = [first] + [decode_inputs(case, device, seed=seed + i) for i in range(1, n)]

    def make_fn(x):
        def fn():
            impl.decode(x["q"], x["k"], x["v"], x["g"], x["eta"], x["state"], normalize_q=case.normalize_q,
                        out=x["out"])
        return fn
    fns = [make_fn(x) for x in sets]
    with torch.no_grad():
        fns[0]()                                             # compile outside any measurement
        out = []
        rec = _base_record(case, impl.name, False)
        rec.update(extra, sets=n)
        _timed(rec, timing.bench_eager(fns, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms))
        if device.type == "cuda":           # with host overhead: what a caller waits per eager step
            host = timing.bench_host(fns, device=device)
            rec["host_ms"], rec["host_spread"] = host.ms, host.spread
        out.append(rec)
        rec = _base_record(case, impl.name, True)
        rec.update(extra, sets=n)
        if device.type != "cuda":
            rec["error"] = "not timed: CUDA graphs need a CUDA device"
        else:
            try:
                _timed(rec, timing.bench_graph(fns, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms))
            except Exception as e:  # noqa: BLE001 -- a capture failure still keeps the eager record
                rec["error"] = f"graph capture failed: {_short(e)}"
                _free(device)
        out.append(rec)
    return out
