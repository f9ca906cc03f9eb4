"""The ``kla-tl`` command line: one module per subcommand, imported only when that subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under kla_tl.cli, one-line help)
COMMANDS = {
    "info": ("info", "versions, device, and which schedule a call would use"),
    "check": ("check", "run KLA forward/backward on the best device and compare with the float64 reference"),
    "compile": ("compile", "build every TileLang kernel for sm_80 / sm_90a without a GPU and report resources"),
    "autotune": ("autotune", "tune kernel schedules for this GPU and merge them into schedules/<gpu>.json"),
    "bench": ("bench", "time kla-tl and its peers and write perf/results/<gpu>.json"),
    "report": ("report", "tabulate a results file, compare with a baseline, exit 1 on regressions"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kla-tl", description="Kaczmarz Linear Attention kernels (TileLang)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = {}
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            m = importlib.import_module(f"kla_tl.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"kla_tl.cli.{mod}":
                raise
            m = None
        if m is not None:
            m.add_arguments(p)
        mods[name] = m
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    m = mods[args.command]
    if m is None:
        print(f"kla-tl {args.command}: not available in this build", file=sys.stderr)
        return 2
    return int(m.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
