"""``kla-tl autotune``: tune kernel schedules for this GPU and merge them into ``schedules/<gpu>.json``.

Thin wrapper: options here, the work in :mod:`kla_tl.autotune.tuner`.

Examples::

    kla-tl autotune --kernel decode                                  # tune on the GPU, write schedules/<gpu>.json
    kla-tl autotune --compile-only --arch sm_90a --max-configs 8     # no GPU: build + prune, warm the TileLang cache
    kla-tl autotune --compile-only --arch sm_80 --write-defaults     # (re)write schedules/sm80.json, untuned
"""

from __future__ import annotations

import re
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--kernel", action="append", metavar="NAME",
                   help="kernel to tune (KernelSpec name; repeatable; default: every registered kernel)")
    p.add_argument("--shapes", action="append", metavar="BUCKET|KEY",
                   help="bucket name (from the kernel's example keys) or a problem key as JSON, e.g. "
                        "'{\"H\": 16, \"HV\": 16, \"K\": 128, \"V\": 128, \"dtype\": \"bfloat16\"}' (repeatable; "
                        "default: one bucket per example key)")
    p.add_argument("--max-configs", type=int, metavar="N",
                   help="at most N candidates per bucket: the default plus a fixed sample of the others")
    p.add_argument("--budget-seconds", type=float, metavar="S",
                   help="stop starting builds / timings after S seconds; finished buckets are kept")
    p.add_argument("--resume", action="store_true",
                   help="skip buckets finished in <out-dir>/autotune-runs/<gpu>-<arch>.json")
    p.add_argument("--compile-only", action="store_true",
                   help="phase 1 only (no GPU needed): build, prune and cache every candidate")
    p.add_argument("--arch", choices=("sm_90a", "sm_80"),
                   help="arch to build for with --compile-only (default sm_90a); on a GPU the device decides")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help="where <gpu>.json and autotune-runs/ are written (default: the shipped schedules "
                        "directory); a new file starts from the shipped one of the same name")
    p.add_argument("--gpu", metavar="FILEKEY",
                   help="schedule file to write (default: from the device name, e.g. h100; sm90/sm80 with "
                        "--compile-only)")
    p.add_argument("--write-defaults", action="store_true",
                   help="with --compile-only: write each bucket's compile-validated default, marked untuned")
    p.add_argument("--workers", type=int, metavar="N", help="parallel builds (default: all CPU cores)")
    p.add_argument("--reps", type=int, default=None, metavar="N", help="timed passes per problem (default 30)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed passes first (default 5)")
    p.add_argument("--rotate", type=int, default=None, metavar="N", help="rotating input sets (default 4)")
    p.add_argument("--commit", metavar="SHA",
                   help="kla-tl commit to record in provenance (default: git of the checkout, else 'unknown'; "
                        "give it where the tree was copied without .git)")
    p.add_argument("--spec-module", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers extra KernelSpecs; for experiments and tests)")


def run(args) -> int:
    from kla_tl.autotune import measure, tuner

    if args.write_defaults and not args.compile_only:
        print("kla-tl autotune: --write-defaults needs --compile-only")
        return 2
    if args.gpu is not None and not re.fullmatch(r"[a-z0-9_]+", args.gpu):
        print(f"kla-tl autotune: --gpu {args.gpu!r}: a file key is lower-case letters, digits and '_' (e.g. h100)")
        return 2
    if args.max_configs is not None and args.max_configs < 1:
        print("kla-tl autotune: --max-configs must be at least 1")
        return 2
    opts = tuner.Options(
        kernels=args.kernel, shapes=args.shapes, max_configs=args.max_configs, budget_seconds=args.budget_seconds,
        resume=args.resume, compile_only=args.compile_only, arch=args.arch, out_dir=args.out_dir, gpu=args.gpu,
        workers=args.workers, write_defaults=args.write_defaults,
        warmup=measure.DEFAULT_WARMUP if args.warmup is None else args.warmup,
        reps=measure.DEFAULT_REPS if args.reps is None else args.reps,
        rotate=measure.DEFAULT_ROTATE if args.rotate is None else args.rotate,
        spec_modules=list(args.spec_module), commit=args.commit)
    return tuner.run(opts)
