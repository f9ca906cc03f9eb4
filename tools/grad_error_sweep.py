"""Distribution of ``chunk_kla``'s gradient errors over many fresh random draws, on a GPU: how close the kernels run
to the bf16 gradient tolerance (1e-2, norm-relative, against the float64 reference backward).

The GPU grid draws one input per case and run; this draws ``--draws`` per case and path and prints, per gradient,
the median, the maximum and how many draws exceed the tolerance. Cases: all gates zero (the grid's ``gate_0``: no
decay, so dg sums every chunk's state term) and random gates, at the grid's dense size (B=2, T=200, H=HV=2,
K=V=128, bf16, initial state, final-state gradient). The same sweep (run as a one-off script before this tool)
on an H100 at 71cab38, 300 draws each: dg at zero gates median 3.7e-3, max 1.1e-2, 2 (Hopper path) and 1 (Ampere
path) draws above 1e-2; random gates none (dg max 6.9e-3); every other gradient at most 4.5e-3.

``--fla`` adds, on the same draws and cotangents, the gradients of fla's ``chunk_gated_delta_rule`` with KLA mapped
onto it as ``tests/test_chunk_grad_gpu.py::test_grads_agree_with_fla`` does (q L2-normalized and beta = eta /
(||k||^2 + eps) in float32 torch, so autograd carries the key-norm path): fla's own error against the float64
reference, and kla-tl's difference from fla (the proof's second check). Per case it also prints how dg's error
goes with the size of the reference dg: the correlation of log(error) with log(||dg_ref||), and the median
absolute error ``||dg - dg_ref||``.

    python tools/grad_error_sweep.py [--draws 300] [--paths sm_90a sm_80] [--cases zero random] [--fla] [--json F]
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_inputs, rel_error, tol_for  # noqa: E402

import kla_tl  # noqa: E402
from kla_tl.reference import beta_from_eta, l2norm  # noqa: E402
from kla_tl.reference_bwd import chunk_kla_reference_bwd  # noqa: E402

#: autograd input name -> key of the reference backward's result
KEY = {"q": "dq", "k": "dk", "v": "dv", "g": "dg", "eta": "deta", "initial_state": "dh0"}


def fla_grads(inp, do: torch.Tensor, dht: torch.Tensor) -> dict:
    """Gradients (by input name) of fla's chunk_gated_delta_rule on the KLA inputs ``inp`` (bf16), normalize_q."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    bf = torch.bfloat16
    f = inp.to(torch.float32, requires_grad=True)
    o, ht = chunk_gated_delta_rule(l2norm(f.q).to(bf), f.k.to(bf), f.v.to(bf), f.g, beta_from_eta(f.k, f.eta),
                                   initial_state=f.initial_state, output_final_state=True)
    torch.autograd.backward([o, ht], [do, dht])
    return f.grads()


def sweep(draws: int, zero_gates: bool, with_fla: bool) -> dict:
    """Per draw: the relative error of every gradient (``kla_tl``; with ``with_fla`` also ``fla`` and ``vs_fla``,
    kla-tl against fla), and ``dg_ref_norm`` / ``dg_abs``: ||dg_ref|| and kla-tl's ||dg - dg_ref||."""
    out = {"kla_tl": {n: [] for n in KEY}, "dg_ref_norm": [], "dg_abs": []}
    if with_fla:
        out["fla"], out["vs_fla"] = {n: [] for n in KEY}, {n: [] for n in KEY}
    for _ in range(draws):
        inp = make_inputs(2, 200, 2, 2, 128, 128, torch.bfloat16, "cuda", with_h0=True)
        if zero_gates:
            inp.g.zero_()
        x = inp.to(requires_grad=True)
        o, ht = kla_tl.chunk_kla(*x.args(), normalize_q=True, output_final_state=True, **x.kwargs())
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        torch.autograd.backward([o, ht], [do, dht])
        ref = inp.to(torch.float64)
        want = chunk_kla_reference_bwd(*ref.args(), do.double(), dht=dht.double(), normalize_q=True, **ref.kwargs())
        grads = x.grads()
        theirs = fla_grads(inp, do, dht) if with_fla else {}
        for n, gr in grads.items():
            out["kla_tl"][n].append(rel_error(gr, want[KEY[n]]))
            if with_fla:
                out["fla"][n].append(rel_error(theirs[n], want[KEY[n]]))
                out["vs_fla"][n].append(rel_error(gr, theirs[n]))
        out["dg_ref_norm"].append(want["dg"].norm().item())
        out["dg_abs"].append((grads["g"].double() - want["dg"]).norm().item())
    return out


def _row(errs: dict, tol: float) -> str:
    cols = []
    for n, v in errs.items():
        t = torch.tensor(v)
        cols.append(f"d{n} med {t.median():.1e} max {t.max():.1e} >tol {(t > tol).sum().item()}")
    return " | ".join(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--paths", nargs="+", default=["sm_90a", "sm_80"], choices=["sm_90a", "sm_80"])
    ap.add_argument("--cases", nargs="+", default=["zero", "random"], choices=["zero", "random"],
                    help="gate cases: all gates zero, random gates")
    ap.add_argument("--fla", action="store_true", help="also fla's gradients on the same draws (module notes)")
    ap.add_argument("--json", metavar="FILE", help="also write every draw's errors (by path and case) to FILE")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("grad_error_sweep: needs a CUDA GPU")
    tol = tol_for(torch.bfloat16, "grad")
    t0 = time.time()
    record = {"what": "relative gradient errors against the float64 reference backward, one entry per fresh draw "
                      "(B=2, T=200, H=HV=2, K=V=128, bf16, initial state, final-state gradient)",
              "tol": tol, "draws": args.draws, "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "kla_tl": getattr(kla_tl, "__version__", "?")}, "runs": {}}
    if args.fla:
        import fla
        record["versions"]["fla"] = getattr(fla, "__version__", "?")
    for path in args.paths:
        os.environ["KLA_TL_ARCH"] = path               # read per call (kla_tl.chunk.select_arch)
        for case, zero in (("zero gates", True), ("random gates", False)):
            if case.split()[0] not in args.cases:
                continue
            res = sweep(args.draws, zero, args.fla)
            record["runs"][f"{path} {case}"] = res
            head = f"{path} {case} ({args.draws} draws, tol {tol:g})"
            for impl in ("kla_tl", "fla", "vs_fla"):
                if impl in res:
                    print(f"{head} {impl}: {_row(res[impl], tol)}", flush=True)
            err = torch.tensor(res["kla_tl"]["g"]).double().clamp_min(1e-30).log()
            norm = torch.tensor(res["dg_ref_norm"]).double().log()
            corr = torch.corrcoef(torch.stack([err, norm]))[0, 1].item()
            print(f"{head} dg: corr(log error, log ||dg_ref||) {corr:+.2f}, ||dg_ref|| median "
                  f"{norm.exp().median():.3g} min {norm.exp().min():.3g}, ||dg - dg_ref|| median "
                  f"{torch.tensor(res['dg_abs']).median():.3g} [{time.time() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
