"""``kla-tl report``: tabulate a results file, compare it with a baseline, plot; exit 1 on a kla-tl regression.

Examples::

    kla-tl report --results perf/results/h100.json --baseline perf/baselines/h100.json
    kla-tl report --results perf/results/ci.json --baseline perf/baselines/h100.json --threshold 0.05 --out perf

Writes ``<out>/report.md`` (and PNG plots when matplotlib is installed) and prints the report to stdout. Exit status:
1 when a kla-tl record is slower than its baseline record by more than the threshold and more than its noise,
2 on unusable input, else 0 (also when the baseline file does not exist yet).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=None,
                   help="results file of `kla-tl bench` (default: the newest perf/results/*.json)")
    p.add_argument("--baseline", default=None, help="baseline results file to compare with (e.g. "
                                                    "perf/baselines/h100.json); a missing file means no comparison")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="relative slowdown that counts as a regression when also above the noise (default 0.05)")
    p.add_argument("--out", default="perf", help="directory for report.md and the plots (default perf)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _newest_results() -> str | None:
    files = glob.glob(os.path.join("perf", "results", "*.json"))
    return max(files, key=os.path.getmtime) if files else None


def run(args) -> int:
    from kla_tl.bench import records, report
    path = args.results or _newest_results()
    if not path or not os.path.exists(path):
        print(f"kla-tl report: no results file ({path or 'perf/results/*.json'}); run `kla-tl bench` first",
              file=sys.stderr)
        return 2
    results = records.load(path)
    problems = records.validate(results)
    if problems:
        print(f"kla-tl report: {path} is not a valid results file: " + "; ".join(problems[:5]), file=sys.stderr)
        return 2
    baseline = None
    if args.baseline and os.path.exists(args.baseline):
        baseline = records.load(args.baseline)
        problems = records.validate(baseline)
        if problems:
            print(f"kla-tl report: baseline {args.baseline} is not a valid results file: " + "; ".join(problems[:5]),
                  file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    plots, note = [], None
    if args.no_plots:
        note = "skipped (--no-plots)"
    else:
        try:
            plots = report.make_plots(results, args.out)
        except ImportError:
            note = "skipped: matplotlib is not installed (pip install 'kla-tl[plot]')"
    text, _, regs, _ = report.build(results, baseline, threshold=args.threshold, results_path=path,
                                    baseline_path=args.baseline, plots=plots, plot_note=note)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"kla-tl report: wrote {os.path.join(args.out, 'report.md')}", file=sys.stderr)
    return 1 if regs else 0
