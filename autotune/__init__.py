"""The kla-tl schedule tuner behind ``kla-tl autotune`` (shipped as ``kla_tl.autotune``).

- :mod:`.tuner` -- enumeration, the two phases, progress file, merge into ``schedules/<gpu>.json``, summary;
- :mod:`.compile` -- phase 1: parallel builds on all CPU cores, pruning failures, spills and shared memory;
- :mod:`.resources` -- the resource report of a built kernel (ptxas registers/spills, shared memory, threads);
- :mod:`.measure` -- phase 2: reference check and CUDA-event timing with rotating inputs.

Run it as ``kla-tl autotune ...`` or ``python -m kla_tl.autotune ...`` (same options). Importing this package
imports neither torch nor tilelang.
"""
