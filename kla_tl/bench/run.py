"""``kla-tl bench`` end to end: pick cases and implementations, measure the ceilings, run every job, write the file.

Implementations whose import-time environment differs from this process's (see :mod:`.peers`) run in a child
``kla-tl bench`` with that environment and only those implementations; its records are merged into this run's.
"""

from __future__ import annotations

import os
import subprocess
import time
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import harness, peers, records, suites, timing


@dataclass
class Options:
    suite: str = "quick"
    suites_file: Optional[str] = None
    ops: Optional[list] = None
    shapes: Optional[list] = None
    impls: list = field(default_factory=lambda: list(peers.KLA_IMPLS))
    peers: list = field(default_factory=lambda: list(peers.PEER_IMPLS))
    out: Optional[str] = None
    merge: bool = False
    device: Optional[str] = None
    warmup_ms: float = 10.0
    rep_ms: float = 40.0
    max_sets: int = 64
    seed: int = 0
    time_fallback: bool = False
    ceilings: bool = True
    subprocess: bool = True
    verbose: bool = False
    progress: bool = True
    commit: Optional[str] = None


def _say(msg: str) -> None:
    print(f"kla-tl bench: {msg}", file=sys.stderr, flush=True)


def default_out(device_key: str) -> str:
    return os.path.join("perf", "results", f"{device_key}.json")


def _child_argv(opts: Options, names: list, out: str, device: torch.device) -> list:
    argv = [sys.executable, "-c", "import sys; from kla_tl.cli import main; sys.exit(main(sys.argv[1:]))",
            "bench", "--suite", opts.suite, "--impls", "none",
            "--peers", *names, "--out", out, "--merge", "--no-ceilings", "--no-subprocess", "--device", str(device),
            "--warmup-ms", str(opts.warmup_ms), "--rep-ms", str(opts.rep_ms), "--max-sets", str(opts.max_sets),
            "--seed", str(opts.seed)]
    if opts.commit:
        argv += ["--commit", opts.commit]
    if opts.suites_file:
        argv += ["--suites-file", os.path.abspath(opts.suites_file)]
    if opts.ops:
        argv += ["--ops", *opts.ops]
    if opts.shapes:
        argv += ["--shapes", *opts.shapes]
    if opts.time_fallback:
        argv.append("--time-fallback")
    if opts.verbose:
        argv.append("--verbose")
    if not opts.progress:
        argv.append("--no-progress")
    return argv


def _run_child(opts: Options, env_vars: dict, names: list, device: torch.device, out: str) -> int:
    """Run ``names`` in a child process started with ``env_vars``; it merges its records into ``out`` after every
    job (so a time limit that kills both processes keeps what the child measured). Returns its exit code."""
    env = dict(os.environ)
    env.update(env_vars)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    desc = " ".join(f"{k}={v}" for k, v in env_vars.items())
    _say(f"running {', '.join(names)} in a child process with {desc} (fla reads it at import)")
    rc = subprocess.run(_child_argv(opts, names, os.path.abspath(out), device), env=env).returncode
    if rc != 0:
        _say(f"child process for {', '.join(names)} failed (exit {rc}); records it did not write are missing")
    return rc


def _device_alive(device: torch.device) -> bool:
    """False after a sticky CUDA error (e.g. an illegal memory access): every later launch would fail too."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001
        return False


def run(opts: Options) -> int:
    if opts.device:
        device = torch.device(opts.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)

    data = suites.load(opts.suites_file)
    cases = suites.expand(data, opts.suite, ops=opts.ops, shapes=opts.shapes)
    if not cases:
        _say(f"suite {opts.suite!r} has no case for ops={opts.ops} shapes={opts.shapes}")
        return 2
    wanted = list(dict.fromkeys(list(opts.impls) + list(opts.peers)))   # either flag may name any impl
    unknown = [n for n in wanted if n not in peers.IMPLS]
    if unknown:
        _say(f"unknown implementation(s) {unknown}; known: {sorted(peers.IMPLS)}")
        return 2
    ops_in_suite = {c.op for c in cases}
    wanted = [n for n in wanted if set(peers.IMPLS[n].ops) & ops_in_suite]

    if opts.subprocess:
        here, away = peers.process_groups(wanted)
    else:
        here = [n for n in wanted if peers.env_matches(peers.IMPLS[n].process_env)]
        for n in set(wanted) - set(here):
            _say(f"skipping {n}: needs {peers.IMPLS[n].process_env} at import and child processes are off")
        away = []

    runnable = []
    for n in here:
        why = peers.IMPLS[n].available(device)
        if why:
            _say(f"skipping {n}: {why}")
        else:
            runnable.append(n)
    children = []
    for env_vars, names in away:
        for n in list(names):
            why = peers.IMPLS[n].installed()
            if why:
                _say(f"skipping {n}: {why}")
                names.remove(n)
        if names:
            children.append((env_vars, names))

    dev = records.device_info(device)
    ceilings = {}
    if opts.ceilings:
        if device.type == "cuda":
            _say("measuring ceilings (device-to-device copy, bf16 GEMM)")
        ceilings = timing.measure_ceilings(device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms) or {}
    commit, dirty = records.git_commit()
    if opts.commit:
        commit, dirty = opts.commit, (dirty if commit == opts.commit else None)
    settings = {"suite": opts.suite, "suites_file": os.path.basename(opts.suites_file or "suites.json"),
                "warmup_ms": opts.warmup_ms, "rep_ms": opts.rep_ms, "max_sets": opts.max_sets, "seed": opts.seed,
                "l2_bytes": timing.l2_bytes(device), "timer": "triton.testing.do_bench quantiles (0.5, 0.2, 0.8); "
                "decode also CUDA-graph replay"}
    results = records.new_results(dev, versions_=records.versions(), ceilings=ceilings, settings=settings,
                                  commit=commit, dirty=dirty)
    summary = records.schedule_summary(dev["key"])
    if summary:
        results["schedules"] = summary

    out = opts.out or default_out(dev["key"])
    if opts.merge and os.path.exists(out):
        try:
            records.merge(records.load(out), results)
        except ValueError as e:
            _say(f"{e}; use another --out")
            return 2
    merge_into_file = [opts.merge]

    def save(recs: list[dict]) -> list[str]:
        """Write what has been measured so far, after every job, so that a run cut off by a time limit keeps it.
        The file is re-read each time: a peer's child process merges its records into the same file as it goes."""
        data = dict(results, records=[records.derive(dict(r), ceilings) for r in recs])
        if merge_into_file[0] and os.path.exists(out):
            data = records.merge(records.load(out), data)
        problems = records.validate(data)
        if not problems:
            records.save(data, out)
            merge_into_file[0] = True
        return problems

    jobs = [(c, peers.IMPLS[n]) for c in cases for n in runnable if c.op in peers.IMPLS[n].ops]
    recs: list[dict] = []
    bar = None
    if opts.progress and jobs:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="kla-tl bench", unit="job", file=sys.stderr, dynamic_ncols=True)
    aborted = None
    t_start = time.monotonic()
    try:
        for j, (case, impl) in enumerate(jobs):
            if bar is not None:
                bar.set_postfix_str(f"{case.op} {case.name} {impl.name}", refresh=True)
            new = harness.run_job(impl, case, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                                  max_sets=opts.max_sets, seed=opts.seed, time_fallback=opts.time_fallback,
                                  verbose=opts.verbose)
            for r in new:
                if commit:
                    r["commit"] = commit[:12]
                recs.append(r)
            save(recs)
            if bar is not None:
                bar.update(1)
            else:  # without a bar, one line per job, so a run cut off by a time limit still shows where it was
                times = ", ".join(f"{r['ms']:.4g} ms" if r.get("ms") else "no time" for r in new)
                _say(f"[{j + 1}/{len(jobs)}] {case.op} {case.name} {impl.name}: {times} "
                     f"({time.monotonic() - t_start:.0f} s)")
            if any(r.get("error") for r in new) and not _device_alive(device):
                aborted = (j + 1, f"{case.op} {case.name} {impl.name}")
                break
    finally:
        if bar is not None:
            bar.close()
    if aborted is not None:
        rest = sorted({f"{c.op}:{c.name}" for c, _ in jobs[aborted[0]:]})
        _say(f"the CUDA context is unusable after {aborted[1]} ({recs[-1].get('error')}); stopping this process. "
             f"Not run: {len(jobs) - aborted[0]} job(s) ({', '.join(rest)}); rerun them with --merge")

    if not recs:
        save(recs)                   # the file exists (with this run's header) before a child merges into it
    for env_vars, names in children:
        _run_child(opts, env_vars, names, device, out)

    problems = save(recs)
    if problems:
        _say("internal error, the results do not validate: " + "; ".join(problems[:5]))
        return 1
    timed = sum(1 for r in recs if r.get("ms"))
    total = len(records.load(out)["records"])
    _say(f"{timed} timed record(s), {len(recs) - timed} without a time (see 'error'); {total} in {out}")
    return 1 if aborted is not None else 0
