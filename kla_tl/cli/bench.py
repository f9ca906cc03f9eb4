"""``kla-tl bench``: time kla-tl and its peers on a suite and write ``perf/results/<gpu>.json``.

Examples::

    kla-tl bench --suite quick --out perf/results/h100.json
    kla-tl bench --suite full --ops decode --merge --out perf/results/h100.json   # one piece of a long run
    kla-tl bench --suite full --peers none --impls kla_tl                          # kla-tl only

The logic lives in :mod:`kla_tl.bench`; perf/README.md documents the record format.
"""

from __future__ import annotations

import argparse


def _names(values):
    """Flatten ``--x a b,c`` into ``[a, b, c]``; ``none`` means the empty list."""
    out = []
    for v in values or []:
        out += [p for p in v.split(",") if p]
    return [] if out == ["none"] else out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kla_tl.bench.peers import KLA_IMPLS, PEER_IMPLS
    from kla_tl.bench.suites import OPS
    p.add_argument("--suite", default="quick", help="suite name in the suites file (quick, full; default quick)")
    p.add_argument("--suites-file", default=None,
                   help="suites JSON to use instead of the packaged perf/suites.json")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP",
                   help=f"only these ops ({', '.join(OPS)}); default all in the suite")
    p.add_argument("--shapes", nargs="+", default=None, metavar="NAME",
                   help="only these shape names of the suites file (to run a suite in pieces)")
    p.add_argument("--impls", nargs="+", default=list(KLA_IMPLS), metavar="IMPL",
                   help=f"kla-tl implementations ({', '.join(KLA_IMPLS)}; 'none' for none; default both)")
    p.add_argument("--peers", nargs="+", default=list(PEER_IMPLS), metavar="PEER",
                   help=f"peers ({', '.join(PEER_IMPLS)}; 'none' for none; default all that import)")
    p.add_argument("--out", default=None,
                   help="results file (default perf/results/<gpu>.json, <gpu> e.g. h100 from the device name)")
    p.add_argument("--merge", action="store_true",
                   help="merge into an existing --out: records with the same (op, impl, shape, graph) are "
                        "replaced, the others kept")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up budget per timing (ms)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench measurement budget per timing (ms)")
    p.add_argument("--max-sets", type=int, default=64,
                   help="most input sets rotated per timing (they must exceed the L2 together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", metavar="SHA",
                   help="kla-tl commit to record (default: git rev-parse HEAD of the checkout; give it when the code "
                        "runs from an export without .git)")
    p.add_argument("--time-fallback", action="store_true",
                   help="also time kla-tl calls that fall back to the torch reference (off: recorded as an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing jobs")
    # internal: used when bench re-invokes itself for peers that need another import-time environment
    p.add_argument("--no-ceilings", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-subprocess", action="store_true", help=argparse.SUPPRESS)


def run(args) -> int:
    from kla_tl.bench.run import Options, run as run_bench
    opts = Options(suite=args.suite, suites_file=args.suites_file, ops=_names(args.ops) or None,
                   shapes=_names(args.shapes) or None, impls=_names(args.impls), peers=_names(args.peers),
                   out=args.out, merge=args.merge, device=args.device, warmup_ms=args.warmup_ms,
                   rep_ms=args.rep_ms, max_sets=args.max_sets, seed=args.seed, time_fallback=args.time_fallback,
                   ceilings=not args.no_ceilings, subprocess=not args.no_subprocess, verbose=args.verbose,
                   progress=not args.no_progress, commit=args.commit)
    return run_bench(opts)
