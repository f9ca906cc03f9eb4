"""``kla-tl check``: run ``chunk_kla`` forward and backward on the best device and compare with float64.

Two shapes (small, and medium with GVA and T = 1024), bfloat16 on CUDA and float32 on the CPU. Every output
(o, the final state) and every gradient (dq, dk, dv, dg, deta, dh0) is compared with ``chunk_kla_reference`` run on
float64 copies of the same inputs, by the norm-relative error ``||x - ref|| / ||ref||``. Exit status 1 when any
error exceeds its tolerance or any value is not finite.

Without a GPU it also compile-checks the kernels for sm_80 and sm_90a (``kla_tl.cli.compile.compile_all``) unless
``--no-compile`` is given.
"""

from __future__ import annotations

import argparse
import time
import traceback

#: Shapes checked, smallest first: (name, B, T, H, HV, K, V). medium has GVA (HV = 2H) and 16 chunks per sequence.
SHAPES = {
    "small": dict(B=2, T=100, H=2, HV=4, K=64, V=64),
    "medium": dict(B=2, T=1024, H=4, HV=8, K=128, V=128),
}
#: Norm-relative tolerances: (o and final state, gradients). bf16: unit roundoff 2**-9 ~ 2e-3 on every stored
#: tensor; gradients pass through about twice as many rounded intermediates. fp32: float32 accumulation.
TOLERANCES = {"bfloat16": (5e-3, 1e-2), "float32": (1e-3, 2e-3)}
#: Quantities reported, in table order.
QUANTITIES = ("o", "ht", "dq", "dk", "dv", "dg", "deta", "dh0")
#: Archs compile-checked on a machine without a GPU.
COMPILE_ARCHS = ("sm_80", "sm_90a")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compile", action="store_true",
                        help="skip compile-checking the kernels for sm_80/sm_90a (done only without a GPU)")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append",
                        help="check only this shape (repeatable; default: all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def _inputs(shape: dict, dtype, device, seed: int):
    """Random leaves (q, k, v, g, eta, h0) plus upstream gradients (do, dht), drawn on the CPU for reproducibility."""
    import torch
    import torch.nn.functional as F

    B, T, H, HV, K, V = (shape[n] for n in ("B", "T", "H", "HV", "K", "V"))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=gen)

    xs = {
        "q": rnd(B, T, H, K).to(dtype),
        "k": rnd(B, T, H, K).to(dtype),
        "v": rnd(B, T, HV, V).to(dtype),
        "g": F.logsigmoid(rnd(B, T, HV) + 2.0),      # log-decay < 0, exp(g) mostly in 0.5..0.99
        "eta": torch.sigmoid(rnd(B, T, HV)),          # in (0, 1)
        "h0": 0.1 * rnd(B, HV, K, V),                 # float32 state, K-major
    }
    dout = {"o": rnd(B, T, HV, V).to(dtype), "ht": rnd(B, HV, K, V)}
    return ({n: x.to(device) for n, x in xs.items()}, {n: x.to(device) for n, x in dout.items()})


def _forward_backward(xs: dict, dout: dict, sync):
    """One chunk_kla forward + backward on fresh leaves; returns (results, fwd_ms, bwd_ms)."""
    import torch

    from kla_tl import chunk_kla

    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in xs.items()}
    sync()
    t0 = time.perf_counter()
    o, ht = chunk_kla(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["eta"], normalize_q=True,
                      initial_state=leaves["h0"], output_final_state=True)
    sync()
    t1 = time.perf_counter()
    torch.autograd.backward((o, ht), (dout["o"], dout["ht"]))
    sync()
    t2 = time.perf_counter()
    res = {"o": o.detach(), "ht": ht.detach()}
    res.update({f"d{n}": leaves[n].grad for n in leaves})
    return res, (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _reference(xs: dict, dout: dict) -> dict:
    """float64 chunk reference on float64 copies of the same inputs (on the same device)."""
    import torch

    from kla_tl.reference import chunk_kla_reference

    leaves = {n: x.detach().to(torch.float64).requires_grad_(True) for n, x in xs.items()}
    o, ht = chunk_kla_reference(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["eta"], normalize_q=True,
                                initial_state=leaves["h0"], output_final_state=True)
    torch.autograd.backward((o, ht), (dout["o"].double(), dout["ht"].double()))
    res = {"o": o.detach(), "ht": ht.detach()}
    res.update({f"d{n}": leaves[n].grad for n in leaves})
    return res


def _rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64; inf when got is missing or not finite."""
    import torch

    if got is None:
        return float("inf")
    g = got.detach().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        return float("nan")
    r = ref.detach().to(torch.float64)
    rn = r.norm().item()
    dn = (g - r).norm().item()
    return dn / rn if rn > 0 else dn


def _backend(xs: dict, device) -> str:
    """'tilelang' when the kernels serve this call with gradients, else 'reference'."""
    from kla_tl.chunk import chunk_refusal
    from kla_tl.conventions import check_inputs

    prob, _ = check_inputs("chunk_kla", xs["q"], xs["k"], xs["v"], xs["g"], xs["eta"], normalize_q=True,
                           initial_state=xs["h0"])
    return "tilelang" if chunk_refusal(prob, device, needs_grad=True) is None else "reference"


def _check_shape(name: str, shape: dict, device, seed: int) -> dict:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtname = str(dtype).replace("torch.", "")
    tol_fwd, tol_grad = TOLERANCES[dtname]
    row = {"shape": name, "dims": "B{B} T{T} H{H} HV{HV} K{K} V{V}".format(**shape), "device": device.type,
           "dtype": dtname, "impl": "?", "errors": {}, "fwd_ms": None, "bwd_ms": None, "ok": False, "error": None}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        xs, dout = _inputs(shape, dtype, device, seed)
        row["impl"] = _backend(xs, device)
        if device.type == "cuda":
            _forward_backward(xs, dout, sync)           # warm-up: JIT compilation and caches
        got, row["fwd_ms"], row["bwd_ms"] = _forward_backward(xs, dout, sync)
        ref = _reference(xs, dout)
    except Exception as e:  # report and go on with the next shape
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        return row
    ok = True
    for q in QUANTITIES:
        err = _rel_err(got[q], ref[q])
        tol = tol_fwd if q in ("o", "ht") else tol_grad
        row["errors"][q] = err
        if not err <= tol:  # also catches NaN
            ok = False
    row["ok"] = ok
    row["tol"] = (tol_fwd, tol_grad)
    return row


def _fmt_err(e: float) -> str:
    return f"{e:.1e}" if e == e else "nan"


def _print_table(rows: list) -> None:
    head = ["impl", "device", "dtype", "shape"] + list(QUANTITIES) + ["fwd ms", "bwd ms", "status"]
    lines = []
    for r in rows:
        if r["error"] is not None:
            lines.append([r["impl"], r["device"], r["dtype"], r["dims"]] + ["-"] * len(QUANTITIES)
                         + ["-", "-", "ERROR"])
            continue
        lines.append([r["impl"], r["device"], r["dtype"], r["dims"]]
                     + [_fmt_err(r["errors"][q]) for q in QUANTITIES]
                     + [f"{r['fwd_ms']:.2f}", f"{r['bwd_ms']:.2f}", "ok" if r["ok"] else "FAIL"])
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for ln in lines:
        print("  ".join(c.ljust(w) for c, w in zip(ln, widths)))


def _compile_check() -> bool:
    """Compile-check the kernels for COMPILE_ARCHS with ``kla_tl.cli.compile``; True unless a build failed."""
    try:
        from kla_tl.cli import compile as compile_cmd
        compile_all = compile_cmd.compile_all
    except (ImportError, AttributeError) as e:
        print(f"kernels were not compile-checked (kla_tl.cli.compile.compile_all is not available: {e})")
        return True
    print(f"compile-checking the kernels for {', '.join(COMPILE_ARCHS)} (use --no-compile to skip) ...", flush=True)
    t0 = time.perf_counter()
    try:
        res = compile_all(archs=COMPILE_ARCHS)
    except Exception as e:
        traceback.print_exc()
        print(f"compile check FAILED: {type(e).__name__}: {e}")
        return False
    if isinstance(res, list):  # one row per build; the compile module knows what counts as a failure
        find = getattr(compile_cmd, "failures", None)
        bad = find(res) if find is not None else [str(r) for r in res if not r.get("ok", False)]
        for b in bad:
            print(f"compile check: {b}")
        ok = not bad
        summary = f"{len(res) - len(bad)}/{len(res)} builds ok"
    else:
        ok = not (res is False or (isinstance(res, int) and not isinstance(res, bool) and res != 0))
        summary = "ok" if ok else f"returned {res!r}"
    print(f"compile check {'passed' if ok else 'FAILED'}: {summary} ({time.perf_counter() - t0:.0f} s)")
    return ok


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("kla-tl check: --device cuda but torch.cuda.is_available() is False")
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    where = torch.cuda.get_device_name(device) if use_cuda else "CPU (no CUDA device: the torch reference runs)"
    print(f"kla-tl check on {where}")
    names = args.shape or list(SHAPES)
    rows = [_check_shape(n, SHAPES[n], device, args.seed) for n in names]
    _print_table(rows)
    ok = all(r["ok"] for r in rows)
    for r in rows:
        if r["error"] is not None:
            print(f"\n{r['dims']}: {r['error']}\n{r['traceback']}")
    tol = TOLERANCES["bfloat16" if use_cuda else "float32"]
    print(f"tolerance (norm-relative error vs float64): o/ht {tol[0]:.0e}, gradients {tol[1]:.0e}; "
          f"{'all within' if ok else 'FAILED'}")
    if not torch.cuda.is_available() and not args.no_compile:
        ok = _compile_check() and ok
    return 0 if ok else 1
