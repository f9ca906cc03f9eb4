"""Chunk-forward timing of kla-tl against its peers in one process, writing records in the `kla-tl bench` format.

A lean sibling of ``kla-tl bench --ops chunk_fwd`` for short GPU sessions: no per-impl child processes and no float64
check at full size (the GPU tests cover correctness); each impl's output is compared with fla's at every shape as a
sanity check (``rel_err_vs_fla`` in the record). fla runs with ``FLA_DISABLE_BACKEND_DISPATCH=1`` (pure Triton), set
before fla is imported.

    python tools/bench_chunk_fwd.py --out perf/results/h100.json
"""

import argparse
import os
import sys

os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
os.environ.setdefault("FLA_FLASH_QLA", "0")

import torch  # noqa: E402

from kla_tl.bench import records, timing  # noqa: E402
from kla_tl.reference import beta_from_eta, l2norm  # noqa: E402

#: (B, T, H, HV, K, V): the forward issue's shapes and the published model's
SHAPES = [(8, 4096, 16, 16, 128, 128), (2, 16384, 16, 16, 128, 128), (1, 32768, 32, 32, 128, 128),
          (8, 4096, 12, 12, 96, 192), (1, 32768, 16, 32, 128, 128)]


def inputs(B, T, H, HV, K, V, n):
    dev, bf = "cuda", torch.bfloat16
    out = []
    for _ in range(n):
        q, k = (torch.randn(B, T, H, K, device=dev, dtype=bf) for _ in range(2))
        v = torch.randn(B, T, HV, V, device=dev, dtype=bf)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, device=dev) + 2.0)
        eta = torch.sigmoid(torch.randn(B, T, HV, device=dev))
        out.append((q, k, v, g, eta))
    return out


def impls():
    import kla_tl

    def kla(arch):
        def run(q, k, v, g, eta):
            os.environ["KLA_TL_ARCH"] = arch
            try:
                return kla_tl.chunk_kla(q, k, v, g, eta, normalize_q=True)[0]
            finally:
                os.environ.pop("KLA_TL_ARCH")
        return run

    out = {"kla_tl": kla("sm_90a"), "kla_tl_ampere": kla("sm_80")}
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def fla(q, k, v, g, eta):  # KLA through GDN, literal form: q normalized outside, beta in fp32
            return chunk_gated_delta_rule(l2norm(q.float()).to(q.dtype), k, v, g, beta_from_eta(k, eta))[0]
        out["fla_triton"] = fla
    except Exception as e:  # a missing peer is a note, not a failure
        print(f"fla unavailable: {e}", file=sys.stderr)
    try:
        import flash_qla

        def fqla(q, k, v, g, eta):
            return flash_qla.chunk_gated_delta_rule(l2norm(q.float()).to(q.dtype), k, v, g, beta_from_eta(k, eta))[0]
        out["flash_qla"] = fqla
    except Exception as e:
        print(f"flash_qla unavailable: {e}", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--shapes", default=None, help="comma-separated indexes into SHAPES (default: all)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    ceilings = timing.measure_ceilings(dev, rep_ms=20.0)
    res = records.new_results(records.device_info(dev), versions_=records.versions(), ceilings=ceilings,
                              settings={"script": "tools/bench_chunk_fwd.py", "rep_ms": args.rep_ms},
                              commit=records.git_commit()[0])
    fns = impls()
    picked = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for B, T, H, HV, K, V in picked:
        sets = inputs(B, T, H, HV, K, V, n=2)
        ref = fns["fla_triton"](*sets[0]).float() if "fla_triton" in fns else None
        for name, fn in fns.items():
            rec = {"op": "chunk_fwd", "impl": name, "graph": False, "normalize_q": True,
                   "shape": {"B": B, "T": T, "H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16",
                             "state_dtype": "float32", "varlen": False}, "ms": None, "spread": None}
            try:
                o = fn(*sets[0])
                torch.cuda.synchronize()
                if ref is not None:
                    rec["rel_err_vs_fla"] = ((o.float() - ref).norm() / ref.norm()).item()
                t = timing.bench_eager([lambda s=s: fn(*s) for s in sets], device=dev, rep_ms=args.rep_ms)
                rec["ms"], rec["spread"] = t.ms, t.spread
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            res["records"].append(records.derive(rec, res["ceilings"]))
            print(f"{name:14s} B={B} T={T} H={H} HV={HV} K={K} V={V}: "
                  f"{rec['ms'] if rec['ms'] is None else round(rec['ms'], 4)} ms  err_vs_fla={rec.get('rel_err_vs_fla')}"
                  f" {rec.get('error', '')}", flush=True)
            records.save(res, args.out)
        del sets
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
