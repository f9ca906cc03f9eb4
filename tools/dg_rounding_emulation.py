"""CPU emulation of the backward kernels' bf16 roundings, for dg at all-zero gates: how much each rounding costs.

dg at zero gates (no decay) is the sensitive gradient: every row sums chunk-wide inner products, such as the chunk
tail e^{gamma_n} <dS_out, S_in>, whose value is often far below their terms'. This replays the normalized backward
(:mod:`kla_tl.bwd_normalized`) in float32 with the kernels' roundings to bf16 at the places they happen, each a named
*site* that can be switched off (kept in fp32):

    gram  k^, q^ before the Gram and Aqk GEMMs        L, U  L and L diag(eta / r) as GEMM operands (u in fp32)
    kW    diag(eta e^gamma) K^ before W = L (.)       W     W
    Aqk   Aqk                                          Gkk, qkg  the chunk-gradient kernel's k^, q^ tiles
    Sfwd  S in N = U - W S                             Nfwd  the scaled N of the state update
    dN    dN (bf16 in both state-gradient GEMMs)       dOb   the scaled dO of the state-gradient update
    Si    S_in in the gradient kernel's GEMMs          Nb    N in them
    dW    dW = -dN S_in^T                              dX    dX
    tail  the stored bf16 state S_in in the chunk tail <dS_out, S_in>
    tailds  dS_out in bf16 in the chunk tail: the kernels formed the tail in the chunk-gradient kernel from bf16
          copies of both states until chunk_dstates formed it from its fp32 dS (not a kernel site since)

K dS is unrounded (the kernels' hi/lo split). Inputs: B=2, T=200, H=HV=2, K=V=128, bf16, initial state, final-state
gradient (the GPU grid's ``gate_0`` case); the error is dg's norm-relative error against the float64 reference.

Default mode: the error distribution over fresh draws for the kernels (every site but ``tailds``: the tail from
the fp32 dS), the earlier kernels (every site: the tail from bf16 copies of both states), the tail in fp32 (neither
tail site: the
``wip/fp32-tail`` candidate of perf/experiments/h100-fp32-tail.json, which stored each state's rounding residual)
and that without the ``gram`` rounding as well. ``--sites``: for each draw whose error with the kernels' roundings exceeds ``--over``,
the error with one more site switched off.

Measured at two seeds, 2000 draws each (seeds 2 and 3; 1e-2 is the tolerance): the kernels median 3.6e-3 and 3.7e-3,
19 and 20 of 2000 draws over (an H100 sweep of the kernels: 3 of 600; an H200 sweep 5 of 600, where fla's own dg had
none, median 3.1e-3 - 3.4e-3: perf/experiments/h200-dg-zero-gates.json); the tail from the fp32 dS median 3.0e-3 and
3.1e-3, 5 and 3 of 2000 over, max 1.1e-2 (on an H100: median 3.1e-3, 8 of 2500 over, max 1.5e-2, and fwd+bwd 4-11%
slower, so not on main: perf/experiments/h100-chunk-tail-ds.json). Earlier, seed 0: 19 of 2000, the fp32 tail 2 of
2000, with the fp32 Gram as well 3 of 2000. ``--budget`` (400 draws): the tail's two bf16 copies alone 2.8e-3 (its
state rounding alone, the tail from the fp32 dS: 1.9e-3), then W, kW, Nfwd, U, dN, Sfwd 0.9e-3 - 1.1e-3 each, gram,
Si, qkg, dW ~5.5e-4; they add up like independent errors (root of the sum of squares 3.9e-3 against 3.7e-3 with
every site). The error is about constant in absolute terms (||dg - dg_ref|| median 0.82; 0.68 with the tail from the
fp32 dS) and the relative error goes with 1 / ||dg_ref|| (correlation of the logs -0.84): the draws over the
tolerance are those whose dg is small, not those where the kernels err more. Why ||dg_ref|| varies so much at zero
gates (float64 reference, 40 draws): with no decay dg is 95% (median) a constant per sequence and head, the
final-state gradient's inner product with the states (||dg_ref|| median 236 with the final-state gradient, 20
without), so the whole of ||dg_ref|| rests on B * HV = 4 random scalars; it ranged from 103 to 502. A draw where all
four are small gives a small ||dg_ref|| and a relative error several times the median, whatever the kernels round.
Seed 7, 1200 draws, the tail from the fp32 dS (the kernels since aa6ee97): 5 over (max 1.3e-2); with
further sites in fp32 still 1 to 3 over: the serial kernels' Sfwd, Nfwd and dN together 2, W and kW together 1, the
tail's state 2.

``--budget``: the error with each site alone (the error budget) and how the whole error goes with ||dg_ref||.

    python tools/dg_rounding_emulation.py [--draws 300] [--seed 0]
    python tools/dg_rounding_emulation.py --sites [--draws 2000] [--over 9e-3]
    python tools/dg_rounding_emulation.py --budget [--draws 300]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_inputs, rel_error  # noqa: E402

from kla_tl import bwd_normalized as BN  # noqa: E402
from kla_tl.reference_bwd import chunk_kla_reference_bwd  # noqa: E402

SITES = ("gram", "L", "kW", "W", "U", "Aqk", "Gkk", "qkg", "Sfwd", "Nfwd", "dN", "dOb", "Si", "Nb", "dW", "dX",
         "tail", "tailds")
CONFIGS = {"kernels": frozenset(SITES) - {"tailds"}, "earlier kernels (bf16 tail)": frozenset(SITES),
           "fp32 tail": frozenset(SITES) - {"tail", "tailds"},
           "fp32 tail and gram": frozenset(SITES) - {"tail", "tailds", "gram"}}


def _rounder(rounded: frozenset):
    def bf(x: torch.Tensor, site: str) -> torch.Tensor:
        return x.to(torch.bfloat16).float() if site in rounded else x
    return bf


def emulated_dg(q, k, v, g, eta, do, dht, h0, *, rounded: frozenset, scale: float, eps: float = 1e-6, C=64):
    """dg [B, T, HV] of one dense batch (H == HV), bf16 roundings at the ``rounded`` sites (module docstring)."""
    bf = _rounder(rounded)
    B, T = q.shape[:2]
    dg = torch.zeros(B, T, v.shape[2])
    for b in range(B):
        bounds = [(c0, min(c0 + C, T)) for c0 in range(0, T, C)]
        rows = lambda x, c0, c1: x[b, c0:c1].transpose(0, 1).float()  # noqa: E731
        chs = []
        for c0, c1 in bounds:
            ch = BN.prepare_chunk(*(rows(x, c0, c1) for x in (q, k, v, g, eta)), scale=scale, eps=eps,
                                  normalize_q=True)
            qg, kg = bf(ch.qh, "gram"), bf(ch.kh, "gram")
            n = ch.kh.shape[-2]
            _, strict = BN._masks(n, "cpu")
            A = (ch.eta[..., :, None] * (kg @ kg.mT) * ch.Gam).masked_fill(~strict, 0.0)
            eye = torch.eye(n)
            Lf = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
            ch.L = bf(Lf, "L")
            ch.W = bf(ch.L @ bf((ch.eta * ch.eg)[..., None] * ch.kh, "kW"), "W")
            ch.U = bf(Lf * (ch.eta / ch.r)[..., None, :], "U") @ ch.v        # fp32 u from the exact v
            ch.k_raw, ch.q_raw = rows(k, c0, c1), rows(q, c0, c1)
            ch.rq = torch.rsqrt((ch.q_raw * ch.q_raw).sum(-1) + 1e-6)
            ch.Aqk = bf(scale * (qg @ kg.mT) * ch.Gam, "Aqk")
            kt = bf(ch.kh, "Gkk")                                          # the gradient kernel's k^ tiles are bf16
            ch.Gkk_g = kt @ kt.mT
            ch.qh_g, ch.kh_g = bf(ch.qh, "qkg"), bf(ch.kh, "qkg")
            chs.append(ch)
        S, S32, Ns = h0[b].float(), [], []
        for ch in chs:
            N = ch.U - ch.W @ bf(S, "Sfwd")
            S32.append(S)
            Ns.append(N)
            S = ch.eg[..., -1, None, None] * S + ch.k_raw.mT @ bf((ch.egn / ch.r)[..., None] * N, "Nfwd")
        dOs = [rows(do, c0, c1) for c0, c1 in bounds]
        dS, dS32, dNs = dht[b].float(), [None] * len(chs), [None] * len(chs)
        for c in reversed(range(len(chs))):
            ch = chs[c]
            dS32[c] = dS
            dN = ch.Aqk.mT @ dOs[c] + ch.egn[..., None] * (ch.kh @ dS)
            dNs[c] = bf(dN, "dN")
            dOb = bf((ch.scale * ch.rq * ch.eg)[..., None] * dOs[c], "dOb")
            dS = ch.eg[..., -1, None, None] * dS + ch.q_raw.mT @ dOb - ch.W.mT @ dNs[c]
        for (c0, c1), ch, S_in, N, dS_out, dN, dO in zip(bounds, chs, S32, Ns, dS32, dNs, dOs):
            n = ch.kh.shape[-2]
            lower, strict = BN._masks(n, "cpu")
            Si, Nb = bf(S_in, "Si"), bf(N, "Nb")                           # the gradient kernel's GEMM operands
            dAqk = (dO @ Nb.mT).masked_fill(~lower, 0.0)
            dOSt = dO @ Si.mT
            dX = ch.L.mT @ dN
            dY = ch.L.mT @ bf(-(dN @ Si.mT), "dW")
            M = (-(bf(dX, "dX") @ Nb.mT)).masked_fill(~strict, 0.0) * ch.Gam
            ZG = dAqk * ch.Aqk + ch.eta[..., :, None] * M * ch.Gkk_g
            direct = ch.scale * ch.eg * (ch.qh_g * dOSt).sum(-1) + ch.eta * ch.eg * (dY * ch.kh_g).sum(-1)
            z = ch.egn * ((ch.kh @ dS_out) * N).sum(-1)
            t = bf(dS_out, "tailds") * bf(S_in, "tail")
            up = lower.mT.float()
            d = (((up @ ZG) * strict).sum(-1) + (up @ direct[..., None]).squeeze(-1)
                 + (strict.float() @ z[..., None]).squeeze(-1) + (ch.eg[..., -1] * t.sum((-2, -1)))[..., None])
            dg[b, c0:c1] = d.transpose(0, 1)
    return dg


def _draw(seed: int):
    """One draw of the gate_0 case: its error function (rounded sites -> dg's relative error against the float64
    reference), with ``ref_norm`` = ||dg_ref||."""
    torch.manual_seed(seed)
    x = make_inputs(2, 200, 2, 2, 128, 128, torch.bfloat16, "cpu", seed=seed, with_h0=True)
    x.g.zero_()
    do = torch.randn(2, 200, 2, 128).bfloat16().float()
    dht = torch.randn(2, 2, 128, 128)
    r = x.to(torch.float64)
    want = chunk_kla_reference_bwd(*r.args(), do.double(), dht=dht.double(), normalize_q=True, **r.kwargs())["dg"]
    def err(rounded: frozenset) -> float:
        return rel_error(emulated_dg(x.q, x.k, x.v, x.g, x.eta, do, dht, x.initial_state, scale=128 ** -0.5,
                                     rounded=rounded), want)
    err.ref_norm = want.norm().item()
    return err


def budget(seeds) -> None:
    """The error budget of the kernels' roundings: dg's error with every site, with none, with each site alone (the
    sum of their squares against the square of the whole: whether they add up like independent errors), and how the
    whole error goes with ||dg_ref||."""
    runs = {"every site": CONFIGS["kernels"], "none": frozenset()}
    singles = sorted(CONFIGS["kernels"])
    runs.update({f"only {s}": frozenset({s}) for s in singles})
    errs, norms = {name: [] for name in runs}, []
    for sd in seeds:
        err = _draw(sd)
        norms.append(err.ref_norm)
        for name, rounded in runs.items():
            errs[name].append(err(rounded))
    med = {name: torch.tensor(e).median().item() for name, e in errs.items()}
    for name in sorted(runs, key=lambda n: -med[n]):
        t = torch.tensor(errs[name])
        print(f"{name:12s} dg error: median {med[name]:.1e}  p95 {t.quantile(0.95):.1e}  max {t.max():.1e}")
    quad = sum(med[f"only {s}"] ** 2 for s in singles) ** 0.5
    print(f"root of the sum of the single sites' squared medians {quad:.1e} (every site: {med['every site']:.1e})")
    e = torch.tensor(errs["every site"]).double()
    n = torch.tensor(norms).double()
    corr = torch.corrcoef(torch.stack([e.log(), n.log()]))[0, 1].item()
    print(f"every site: corr(log error, log ||dg_ref||) {corr:+.2f}; ||dg_ref|| median {n.median():.3g}, min "
          f"{n.min():.3g}; absolute error ||dg - dg_ref|| median {(e * n).median():.3g}, max {(e * n).max():.3g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sites", action="store_true", help="per-site study of the draws over --over")
    ap.add_argument("--over", type=float, default=9e-3)
    ap.add_argument("--budget", action="store_true", help="error budget: each site alone, and the error's scaling")
    args = ap.parse_args()
    seeds = range(args.seed * 100003, args.seed * 100003 + args.draws)
    if args.budget:
        budget(seeds)
        return
    if args.sites:
        kernels = CONFIGS["kernels"]
        for sd in seeds:
            err = _draw(sd)
            e0 = err(kernels)
            if e0 > args.over:
                alone = "  ".join(f"{s} {err(kernels - {s}):.1e}" for s in sorted(kernels))
                print(f"draw {sd}: kernels {e0:.1e}; with one more site in fp32: {alone}", flush=True)
        return
    errs = {name: [] for name in CONFIGS}
    for sd in seeds:
        err = _draw(sd)
        for name, rounded in CONFIGS.items():
            errs[name].append(err(rounded))
    for name, e in errs.items():
        t = torch.tensor(e)
        print(f"{name:27s} dg error: median {t.median():.1e}  p95 {t.quantile(0.95):.1e}  max {t.max():.1e}  "
              f"over 1e-2: {(t > 1e-2).sum().item()} of {len(e)}")


if __name__ == "__main__":
    main()
