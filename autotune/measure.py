"""Autotune phase 2: check each surviving schedule against the reference on the GPU, then time it.

For one bucket the tuner asks the spec for its representative problems (``KernelSpec.bench(arch, key)`` ->
``BenchCase`` list) and makes ``rotate`` input sets per problem once. For each candidate, built again from
TileLang's cache:

1. correctness: one launch on the first input set, ``case.check(inputs, outputs)`` must return None;
2. timing: ``warmup`` passes over the rotating sets, then ``reps`` timed passes, each bracketed by CUDA events;
   a pass launches once per input set, so consecutive launches never reuse the previous operands from L2.
   The time of a problem is the median over passes of (pass time / launches per pass); the candidate's score is
   the sum over the bucket's problems.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

#: timed passes per problem (median taken over them)
DEFAULT_REPS = 30
#: untimed passes first (clocks, caches, lazy module loading)
DEFAULT_WARMUP = 5
#: input sets per problem, launched in turn
DEFAULT_ROTATE = 4


@dataclass
class Timing:
    """Outcome of one candidate on one bucket."""

    ok: bool
    ms: float | None = None  # sum over problems of the median ms per launch
    per_case: dict = field(default_factory=dict)  # label -> median ms per launch
    reason: str = ""  # why not ok


def median_ms(launches: list, *, warmup: int, reps: int) -> float:
    """Median over ``reps`` passes of the per-launch time (ms) of running every callable in ``launches`` once."""
    import torch

    for _ in range(warmup):
        for fn in launches:
            fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        for fn in launches:
            fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) / len(launches)


def make_inputs(cases: list, rotate: int) -> list:
    """``[[inputs for seed in range(rotate)] for case in cases]``."""
    return [[case.make_inputs(seed) for seed in range(rotate)] for case in cases]


def time_candidate(built, cases: list, inputs: list, *, warmup: int = DEFAULT_WARMUP,
                   reps: int = DEFAULT_REPS) -> Timing:
    """Check then time one built candidate on every problem of a bucket (see the module docstring)."""
    import torch

    per_case = {}
    for case, sets in zip(cases, inputs):
        try:
            out = case.run(built, sets[0])
            torch.cuda.synchronize()
            msg = case.check(sets[0], out)
        except Exception as e:  # noqa: BLE001 -- a launch failure disqualifies the candidate
            return Timing(False, reason=f"{case.label}: launch failed: {e!r}"[:500])
        if msg:
            return Timing(False, reason=f"{case.label}: does not match the reference: {msg}"[:500])
        launches = [(lambda s=s, c=case: c.run(built, s)) for s in sets]
        per_case[case.label] = median_ms(launches, warmup=warmup, reps=reps)
    return Timing(True, sum(per_case.values()), per_case)
