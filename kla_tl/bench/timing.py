"""The one timer of ``kla-tl bench`` and the two ceilings measured beside it.

- :func:`bench_eager`: ``triton.testing.do_bench`` (L2 flushed before every call, CUDA events around the call only)
  over a list of callables that are called in rotation, so consecutive calls touch different input sets; returns
  the median and the 20th/80th percentiles.
- :func:`bench_host`: wall clock per call of back-to-back calls, synchronized once per batch: what a caller waits
  per step when host work (validation, dispatch, launch) is not hidden behind GPU work. ``do_bench`` hides up to
  the duration of its L2 flush of host time, so for microsecond-scale decode steps this is the honest eager figure.
- :func:`bench_graph`: one CUDA graph holding one call per input set, replayed many times; per-call time = replay
  time / number of sets. Host launch overhead disappears; this is how a serving engine runs decode.
- :func:`measure_ceilings`: device-to-device copy bandwidth (read + write bytes) and a large bf16 GEMM, in the same
  process and right before the records, so every record's fractions refer to the GPU as it ran.

All times are milliseconds. ``spread`` is ``(p80 - p20) / median``: the relative noise band a regression must
exceed before ``kla-tl report`` calls it one. The functions are module attributes looked up at call time, so tests
replace them (``monkeypatch.setattr(timing, "bench_eager", ...)``) without touching the kernels.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import roofline

#: Fallback L2 size when the device does not report it (H100: 50 MB).
DEFAULT_L2_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentiles of one call, in milliseconds."""

    ms: float
    p20: float
    p80: float

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: relative noise band."""
        return (self.p80 - self.p20) / self.ms if self.ms > 0 else 0.0


def _quantiles(samples: Sequence[float]) -> Timing:
    xs = sorted(samples)
    if len(xs) == 1:
        return Timing(xs[0], xs[0], xs[0])
    qs = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: qs[1] = p20, qs[7] = p80
    return Timing(statistics.median(xs), qs[1], qs[7])


def _rotating(fns: Sequence[Callable[[], object]]) -> Callable[[], None]:
    cyc = itertools.cycle(fns)

    def step():
        next(cyc)()
    return step


def bench_eager(fns: Sequence[Callable[[], object]], *, device: torch.device, warmup_ms: float = 10.0,
                rep_ms: float = 40.0, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Timing:
    """Time one call, rotating over ``fns`` (one per input set); ``do_bench`` on CUDA, a wall clock elsewhere."""
    step = _rotating(fns)
    on_cuda = device.type == "cuda"
    if on_cuda:
        try:
            import triton.testing
        except ImportError:
            triton = None
        if triton is not None:
            q = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                        quantiles=[0.5, 0.2, 0.8])
            return Timing(float(q[0]), float(q[1]), float(q[2]))
    return _bench_wallclock(step, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none, cuda=on_cuda)


def bench_host(fns: Sequence[Callable[[], object]], *, device: torch.device, calls: int = 200,
               batches: int = 15) -> Timing:
    """Per-call wall time of ``calls`` back-to-back calls (rotating over ``fns``), synchronized before and after each
    batch; median and p20/p80 over ``batches`` batches. Includes host overhead (no L2 flush in between)."""
    step = _rotating(fns)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(10, calls // 10)):
        step()
    sync()
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3 / calls)
    return _quantiles(samples)


def _bench_wallclock(step, *, warmup_ms, rep_ms, grad_to_none, cuda: bool) -> Timing:
    """Fallback timer (no triton): CUDA events on a GPU, perf_counter on the CPU; no L2 flush."""
    def one() -> float:
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    est = max(min(one() for _ in range(2)), 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        one()
    return _quantiles([one() for _ in range(max(3, int(rep_ms / est)))])


def bench_graph(fns: Sequence[Callable[[], object]], *, device: torch.device, warmup_ms: float = 10.0,
                rep_ms: float = 40.0) -> Timing:
    """Capture one call per input set into a CUDA graph; time replays; return the per-call time.

    The callables must be capturable: no host synchronization, no allocation that depends on values (allocations
    themselves are fine: they come from the graph's private pool). They are run once on a side stream first, as
    capture requires.
    """
    if device.type != "cuda":
        raise RuntimeError(f"CUDA-graph timing needs a CUDA device, got {device}")
    n = len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    torch.cuda.synchronize()

    def replay_ms(reps: int) -> list[float]:
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in evs:
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in evs]

    est = max(min(replay_ms(3)), 1e-4)
    replay_ms(max(1, min(1000, int(warmup_ms / est))))
    samples = replay_ms(max(10, min(2000, int(rep_ms / est))))
    return _quantiles([x / n for x in samples])


def l2_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device (``DEFAULT_L2_BYTES`` when unknown or not CUDA)."""
    if device.type != "cuda":
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_count(set_bytes: int, l2: int, *, max_sets: int = 64, mem_budget: Optional[int] = None) -> int:
    """How many input sets to rotate so that together they exceed the L2 (at least 1, at most ``max_sets``).

    ``mem_budget`` caps ``count * set_bytes`` (the sets must fit in memory beside the call's own workspace).
    """
    n = l2 // max(set_bytes, 1) + 1
    if mem_budget is not None:
        n = min(n, max(1, mem_budget // max(set_bytes, 1)))
    return int(max(1, min(n, max_sets)))


def measure_ceilings(device: torch.device, *, warmup_ms: float = 10.0, rep_ms: float = 40.0,
                     copy_mib: int = 1024, gemm_n: int = 8192) -> dict:
    """Device-to-device copy bandwidth (TB/s, read + write bytes) and bf16 GEMM throughput (TFLOP/s).

    Returns ``{"copy_tbps", "copy_spread", "bf16_tflops", "gemm_spread", "copy_mib", "gemm_n"}``; an empty dict on a
    non-CUDA device.
    """
    if device.type != "cuda":
        return {}
    nbytes = copy_mib * 1024 * 1024
    tc = _time_copy(device, nbytes, warmup_ms=warmup_ms, rep_ms=rep_ms)
    tg = _time_gemm(device, gemm_n, warmup_ms=warmup_ms, rep_ms=rep_ms)
    torch.cuda.empty_cache()
    return {
        "copy_tbps": roofline.copy(nbytes) / (tc.ms * 1e-3) / 1e12,
        "copy_spread": tc.spread,
        "bf16_tflops": roofline.gemm(gemm_n, gemm_n, gemm_n) / (tg.ms * 1e-3) / 1e12,
        "gemm_spread": tg.spread,
        "copy_mib": copy_mib,
        "gemm_n": gemm_n,
    }


def _time_copy(device: torch.device, nbytes: int, **kw) -> Timing:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return bench_eager([lambda: dst.copy_(src)], device=device, **kw)


def _time_gemm(device: torch.device, n: int, **kw) -> Timing:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    return bench_eager([lambda: torch.matmul(a, b, out=c)], device=device, **kw)
