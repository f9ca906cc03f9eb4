"""CPU emulation of the backward kernels' bf16 roundings, for dg at all-zero gates: how much each rounding costs.

dg at zero gates (no decay) is the sensitive gradient: every row sums chunk-wide inner products, such as the chunk
tail e^{gamma_n} <dS_out, S_in>, whose value is often far below their terms'. This replays the normalized backward
(:mod:`kla_tl.bwd_normalized`) in float32 with the kernels' roundings to bf16 at the places they happen (L, W, Aqk,
S_in, N and dN as bf16 GEMM operands, the scaled operands of the two state recurrences; u and N kept in fp32 where
the kernels keep them; K dS with the hi/lo split, i.e. unrounded) and switches two of them:

- ``tail``: the chunk tail from bf16 copies of S_in and dS_out, as the chunk-gradient kernel forms it (the candidate:
  chunk_dstates forms it from its fp32 dS and the state to 16 bits, the state recurrence storing each state's bf16
  rounding residual beside it; branch ``wip/fp32-tail``, measured in ``perf/experiments/h100-fp32-tail.json``);
- ``gram``: k^ and q^ rounded to bf16 before the Gram and Aqk GEMMs of the chunk preparation, as the kernels do (the
  candidate: multiplying the raw q, k and applying 1/r, 1/|q| to the fp32 products).

It prints the norm-relative dg error against the float64 reference backward over fresh draws (B=2, T=200, H=HV=2,
K=V=128, bf16 inputs, initial state, final-state gradient; the GPU grid's ``gate_0`` case) for the kernels (both
roundings), each candidate alone and both. 300 draws (seed 0): the kernels median 3.7e-3, max 1.2e-2, 1 draw
over the 1e-2 tolerance (an H100 measured median 3.7e-3, max 1.1e-2, 3 of 600 over it); fp32 tail median 2.6e-3,
p95 5.7e-3, max 9.1e-3, none over (the branch's kernels on an H100: median 2.6-3.0e-3, max 7.4e-3, 0 of 120);
unrounded Gram alone no better than the kernels; both 2.5e-3, 5.3e-3, 9.0e-3.

    python tools/dg_rounding_emulation.py [--draws 300] [--seed 0]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_inputs, rel_error  # noqa: E402

from kla_tl import bwd_normalized as BN  # noqa: E402
from kla_tl.reference_bwd import chunk_kla_reference_bwd  # noqa: E402

CONFIGS = {"kernels": dict(gram=True, tail=True), "fp32 tail": dict(gram=True, tail=False),
           "unrounded Gram": dict(gram=False, tail=True), "both": dict(gram=False, tail=False)}


def bf(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def emulated_dg(q, k, v, g, eta, do, dht, h0, *, gram: bool, tail: bool, scale: float, eps: float = 1e-6, C=64):
    """dg [B, T, HV] of one dense batch (H == HV) with the kernels' roundings (module docstring)."""
    B, T = q.shape[:2]
    dg = torch.zeros(B, T, v.shape[2])
    for b in range(B):
        bounds = [(c0, min(c0 + C, T)) for c0 in range(0, T, C)]
        rows = lambda x, c0, c1: x[b, c0:c1].transpose(0, 1).float()  # noqa: E731
        chs = []
        for c0, c1 in bounds:
            ch = BN.prepare_chunk(*(rows(x, c0, c1) for x in (q, k, v, g, eta)), scale=scale, eps=eps,
                                  normalize_q=True)
            qg, kg = (bf(ch.qh), bf(ch.kh)) if gram else (ch.qh, ch.kh)
            n = ch.kh.shape[-2]
            _, strict = BN._masks(n, "cpu")
            A = (ch.eta[..., :, None] * (kg @ kg.mT) * ch.Gam).masked_fill(~strict, 0.0)
            eye = torch.eye(n)
            Lf = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
            ch.L = bf(Lf)
            ch.W = bf(ch.L @ bf((ch.eta * ch.eg)[..., None] * ch.kh))
            ch.U = bf(Lf * (ch.eta / ch.r)[..., None, :]) @ ch.v        # fp32 u from the exact v
            ch.k_raw, ch.q_raw = rows(k, c0, c1), rows(q, c0, c1)
            ch.rq = torch.rsqrt((ch.q_raw * ch.q_raw).sum(-1) + 1e-6)
            ch.Aqk = bf(scale * (qg @ kg.mT) * ch.Gam)
            ch.Gkk_g = bf(ch.kh) @ bf(ch.kh).mT                # the gradient kernel's k^ tiles are bf16
            ch.qh_g, ch.kh_g = bf(ch.qh), bf(ch.kh)
            chs.append(ch)
        S, S32, Ns = h0[b].float(), [], []
        for ch in chs:
            N = ch.U - ch.W @ bf(S)
            S32.append(S)
            Ns.append(N)
            S = ch.eg[..., -1, None, None] * S + ch.k_raw.mT @ bf((ch.egn / ch.r)[..., None] * N)
        dOs = [rows(do, c0, c1) for c0, c1 in bounds]
        dS, dS32, dNs = dht[b].float(), [None] * len(chs), [None] * len(chs)
        for c in reversed(range(len(chs))):
            ch = chs[c]
            dS32[c] = dS
            dN = ch.Aqk.mT @ dOs[c] + ch.egn[..., None] * (ch.kh @ dS)
            dNs[c] = bf(dN)
            dS = (ch.eg[..., -1, None, None] * dS + ch.q_raw.mT @ bf((ch.scale * ch.rq * ch.eg)[..., None] * dOs[c])
                  - ch.W.mT @ bf(dN))
        for (c0, c1), ch, S_in, N, dS_out, dN, dO in zip(bounds, chs, S32, Ns, dS32, dNs, dOs):
            n = ch.kh.shape[-2]
            lower, strict = BN._masks(n, "cpu")
            Si, Nb = bf(S_in), bf(N)                           # the gradient kernel's GEMM operands
            dAqk = (dO @ Nb.mT).masked_fill(~lower, 0.0)
            dOSt = dO @ Si.mT
            dX = ch.L.mT @ dN
            dY = ch.L.mT @ bf(-(dN @ Si.mT))
            M = (-(bf(dX) @ Nb.mT)).masked_fill(~strict, 0.0) * ch.Gam
            ZG = dAqk * ch.Aqk + ch.eta[..., :, None] * M * ch.Gkk_g
            direct = ch.scale * ch.eg * (ch.qh_g * dOSt).sum(-1) + ch.eta * ch.eg * (dY * ch.kh_g).sum(-1)
            z = ch.egn * ((ch.kh @ dS_out) * N).sum(-1)
            t = (bf(dS_out) * Si) if tail else (dS_out * S_in)
            up = lower.mT.float()
            d = (((up @ ZG) * strict).sum(-1) + (up @ direct[..., None]).squeeze(-1)
                 + (strict.float() @ z[..., None]).squeeze(-1) + (ch.eg[..., -1] * t.sum((-2, -1)))[..., None])
            dg[b, c0:c1] = d.transpose(0, 1)
    return dg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    errs = {name: [] for name in CONFIGS}
    for i in range(args.draws):
        x = make_inputs(2, 200, 2, 2, 128, 128, torch.bfloat16, "cpu", seed=args.seed * 100003 + i, with_h0=True)
        x.g.zero_()
        do = torch.randn(2, 200, 2, 128).bfloat16().float()
        dht = torch.randn(2, 2, 128, 128)
        r = x.to(torch.float64)
        want = chunk_kla_reference_bwd(*r.args(), do.double(), dht=dht.double(), normalize_q=True, **r.kwargs())["dg"]
        for name, flags in CONFIGS.items():
            got = emulated_dg(x.q, x.k, x.v, x.g, x.eta, do, dht, x.initial_state, scale=128 ** -0.5, **flags)
            errs[name].append(rel_error(got, want))
    for name, e in errs.items():
        t = torch.tensor(e)
        print(f"{name:16s} dg error: median {t.median():.1e}  p95 {t.quantile(0.95):.1e}  max {t.max():.1e}  "
              f"over 1e-2: {(t > 1e-2).sum().item()} of {len(e)}")


if __name__ == "__main__":
    main()
