"""``kla-tl compile``: build every TileLang kernel with its default schedule, without a GPU, and report resources.

For each registered kernel family (:mod:`kla_tl.kernels.registry`), each requested arch and each example problem
key, the kernel is lowered and built by nvcc (TileLang's disk cache makes a second run fast), then assembled once more
with ``--resource-usage`` for the report. The sm_80 path is built for real sm_80 code. Exit status 1 when any build
fails or spills.
"""

from __future__ import annotations

import sys
import time



def add_arguments(p) -> None:
    p.add_argument("--arch", action="append", choices=("sm_80", "sm_90a"),
                   help="architecture to build for (repeatable; default both)")
    p.add_argument("--kernel", action="append", metavar="NAME", help="kernel family to build (repeatable; default all)")
    p.add_argument("--no-resources", action="store_true", help="skip the ptxas resource report (faster)")


def compile_all(archs=("sm_80", "sm_90a"), kernels=None, resources=True, out=sys.stdout) -> list[dict]:
    """Build every (kernel, arch, example key) with its default schedule; return one row per build."""
    from tqdm import tqdm

    from ..kernels.registry import all_specs
    from ..kernels.resources import summary

    specs = all_specs()
    if kernels:
        unknown = sorted(set(kernels) - set(specs))
        if unknown:
            raise ValueError(f"kla-tl compile: unknown --kernel {unknown}; available: {sorted(specs)}")
        specs = {n: specs[n] for n in kernels}
    jobs = [(name, spec, arch, key) for name, spec in specs.items() for arch in archs for key in spec.example_keys]
    rows = []
    for name, spec, arch, key in tqdm(jobs, desc="compile", unit="kernel", file=sys.stderr):
        sch = spec.default(arch, key)
        row = {"kernel": name, "arch": arch, "bucket": spec.bucket(key), "schedule": sch, "ok": False}
        t = time.time()
        try:
            kern = spec.build(arch, key, sch)
            row["seconds"] = time.time() - t
            if resources:
                row.update(summary(kern))
            row["ok"] = True
        except Exception as e:  # a failed build is a row of the report, not a crash
            row["seconds"] = time.time() - t
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
        rows.append(row)
    _print_table(rows, out)
    return rows


def failures(rows: list[dict]) -> list[str]:
    """Why each failed row fails: a build error, or the resource verdict (spills, shared memory, registers)."""
    from ..kernels.resources import verdict

    bad = []
    for r in rows:
        tag = f"{r['kernel']} {r['arch']} {r['bucket']}"
        if not r["ok"]:
            bad.append(f"{tag}: build failed: {r.get('error')}")
        elif "regs" in r:
            status, why = verdict({r["kernel"]: r}, r["arch"])
            if status != "ok":
                bad.append(f"{tag}: {why}")
    return bad


def _print_table(rows, out) -> None:
    head = f"{'kernel':14s} {'arch':7s} {'bucket':22s} {'thr':>4s} {'regs':>5s} {'smem st':>8s} {'smem dyn':>9s} " \
           f"{'spill':>6s} {'stack':>6s} {'sec':>6s}  schedule"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        if not r["ok"]:
            print(f"{r['kernel']:14s} {r['arch']:7s} {r['bucket']:22s} FAILED: {r.get('error')}", file=out)
            continue
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        print(f"{r['kernel']:14s} {r['arch']:7s} {r['bucket']:22s} {r.get('threads') or '-':>4} "
              f"{r.get('regs', '-'):>5} {r.get('static_smem', '-'):>8} {r.get('dyn_smem') or '-':>9} "
              f"{spill:>6} {r.get('stack', '-'):>6} {r['seconds']:6.1f}  {r['schedule']}", file=out)


def run(args) -> int:
    archs = tuple(args.arch or ("sm_80", "sm_90a"))
    rows = compile_all(archs=archs, kernels=args.kernel, resources=not args.no_resources)
    bad = failures(rows)
    for b in bad:
        print(f"kla-tl compile: {b}", file=sys.stderr)
    print(f"{len(rows) - len(bad)}/{len(rows)} builds ok")
    return 1 if bad else 0
