"""Autotune phase 1: build every candidate schedule on all CPU cores and keep those that compile cleanly.

Each task builds one (kernel, key, schedule) with ``KernelSpec.build`` for an explicit arch (no GPU needed; the
kernel lands in TileLang's disk cache, ``$TILELANG_CACHE_DIR``), then reads its resource report
(:mod:`.resources`). A candidate is dropped when the build raises (``error``), ptxas spills registers (``spill``),
static + dynamic shared memory exceeds the arch's per-block limit (``smem``), or registers x threads exceed one SM
(``regs``).

Tasks run in a ``ProcessPoolExecutor`` with the *spawn* start method: lowering holds the GIL (TileLang sets
``TVM_FFI_RELEASE_GIL_BY_DEFAULT=0``), so threads would serialise it, and forking a process that has loaded TVM and
torch is unsafe. A spawned worker imports the module that defines the spec (``spec.build.__module__``, by name, else
by file) and finds the spec in the registry by name, or as a KernelSpec defined at that module's top level.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import importlib.util
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

#: environment a worker sets before importing tilelang: no "begins to compile" log line per kernel
WORKER_ENV = {"TILELANG_PRINT_ON_COMPILATION": "0"}


@dataclass
class Task:
    """One candidate to build: picklable, names the spec by module and registry name."""

    kernel: str
    module: str
    arch: str
    bucket: str
    key: dict
    schedule: dict
    #: file of ``module``, to load it by path when it is not importable by name (a script, a test module)
    module_file: str = ""


@dataclass
class Result:
    """Outcome of one :class:`Task`. ``status`` is ``ok``, ``error``, ``spill``, ``smem``, ``regs`` or ``skipped``."""

    kernel: str
    bucket: str
    schedule: dict
    status: str
    reason: str = ""
    seconds: float = 0.0
    resources: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"schedule": self.schedule, "status": self.status, "reason": self.reason,
                "compile_s": round(self.seconds, 2), "resources": self.resources}


def _worker_init() -> None:
    """Spawned worker setup: quiet TileLang, and send the worker's own output (TileLang dumps a whole kernel
    source on a failed build) to /dev/null: each task's outcome and error travel back in its :class:`Result`."""
    os.environ.update(WORKER_ENV)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _import(module: str, module_file: str):
    if module in sys.modules:
        return sys.modules[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        if not module_file:
            raise
    spec = importlib.util.spec_from_file_location(module, module_file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


def _spec(task: "Task"):
    """The task's KernelSpec: from the registry after importing its module, else a module-level KernelSpec of that
    name (specs that are defined but not registered globally, e.g. in tests)."""
    from kla_tl.kernels import registry

    mod = _import(task.module, task.module_file) if task.module and task.module != "__main__" else None
    if task.kernel in registry._REGISTRY:
        return registry._REGISTRY[task.kernel]
    for value in vars(mod).values() if mod is not None else ():
        if isinstance(value, registry.KernelSpec) and value.name == task.kernel:
            return value
    specs = registry.all_specs()
    if task.kernel not in specs:
        raise LookupError(f"kernel {task.kernel!r} is neither registered nor defined in module {task.module!r}")
    return specs[task.kernel]


def compile_task(task: Task) -> Result:
    """Build one candidate and judge its resources; never raises (failures become ``error`` results)."""
    from kla_tl.kernels.resources import resource_report, verdict

    t0 = time.perf_counter()
    try:
        spec = _spec(task)
        built = spec.build(task.arch, task.key, task.schedule)
        kernels = built if isinstance(built, (tuple, list)) else [built]
        report = {}
        for k in kernels:
            report.update(resource_report(k))
        status, reason = verdict(report, task.arch)
    except Exception as e:  # noqa: BLE001 -- any build failure prunes the candidate
        lines = [ln for ln in traceback.format_exception_only(type(e), e)[-1].strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else repr(e)
        return Result(task.kernel, task.bucket, task.schedule, "error", msg[:500], time.perf_counter() - t0)
    return Result(task.kernel, task.bucket, task.schedule, status, reason, time.perf_counter() - t0, report)


def compile_all(tasks: list, *, workers: int, deadline: float | None = None, progress=None) -> list:
    """Run :func:`compile_task` over ``tasks`` on ``workers`` spawned processes; results in task order.

    Args:
        workers: process count (1 runs in this process, no pool).
        deadline: ``time.monotonic()`` value after which unstarted tasks are cancelled (status ``skipped``).
        progress: optional callable, invoked once per finished task with its :class:`Result`.
    """
    results: list = [None] * len(tasks)

    def skipped(i):
        t = tasks[i]
        return Result(t.kernel, t.bucket, t.schedule, "skipped", "time budget exhausted before it was built")

    if workers <= 1:
        for i, t in enumerate(tasks):
            results[i] = skipped(i) if deadline is not None and time.monotonic() > deadline else compile_task(t)
            if progress:
                progress(results[i])
        return results
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(compile_task, t): i for i, t in enumerate(tasks)}
        pending = set(futures)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            for f in done:
                i = futures[f]
                try:
                    results[i] = f.result()
                except Exception as e:  # noqa: BLE001 -- a worker died (e.g. killed for memory)
                    t = tasks[i]
                    results[i] = Result(t.kernel, t.bucket, t.schedule, "error", f"worker failed: {e!r}")
                if progress:
                    progress(results[i])
            if deadline is not None and time.monotonic() > deadline and pending:
                for f in pending:
                    f.cancel()
                for f in list(pending):
                    if f.cancelled():
                        pending.discard(f)
                        results[futures[f]] = skipped(futures[f])
                        if progress:
                            progress(results[futures[f]])
                deadline = None  # let the running ones finish
    return results
