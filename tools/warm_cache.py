"""Build, without a GPU, every chunk-forward kernel that the GPU tests and the forward benchmark (``kla-tl bench``) launch, for the
Hopper path and the Ampere-on-Hopper path, so that a GPU run loads them from ``TILELANG_CACHE_DIR`` instead of
compiling.

    TILELANG_CACHE_DIR=.tlcache python tools/warm_cache.py [--suite quick|full] [--states]
    TILELANG_CACHE_DIR=.tlcache python tools/warm_cache.py --replay [--bench-only] [--paths sm_90a] [--part I/N]

``--suite`` adds the chunk problems of that ``kla-tl bench`` suite: each timed shape and the smaller shape its
correctness check runs (the kernels' untuned scan schedule depends on the number of sequences, so both are needed).

``--replay`` builds what the launch code itself asks for: it runs ``kla_tl.chunk.chunk_fwd`` (with and without the
backward's saved intermediates) and ``chunk_bwd`` on CPU tensors of every problem of the backward's GPU tests
(tests/test_chunk_grad_gpu.py, tests/test_chunk_bwd_gpu.py) and of the full suite's fwd+bwd shapes, with each
builder's kernels replaced by no-ops once built and schedules looked up for ``--gpu`` (the forward's tuned schedules
are per GPU). Nothing a GPU run asks for is then left to compile, including what a change to the backward's kernels
adds. ``--part I/N`` builds every N-th problem (run N processes). On a 2-core machine the whole grid takes about 30
minutes in two parts and packs (``tar | xz -9``) to about 16 MB.
"""

import argparse
import contextlib
import itertools
import sys
import time

import torch

from kla_tl.chunk import (build_bwd_grads_kernel, build_bwd_prepare_kernel, build_dstates_kernel, build_kernels,
                          build_states_kernel)
from kla_tl.conventions import Problem

#: (B, T, H, HV, K, V, dtype, normalize_q, use_h0, N): the problems of tests/test_chunk_fwd_gpu.py and of the
#: forward benchmark (N matters: the untuned default block_v depends on N * HV).
CASES = [
    (2, 100, 4, 4, 128, 128, torch.bfloat16, True, True, 2),
    (2, 200, 4, 4, 128, 128, torch.bfloat16, False, False, 2),
    (2, 130, 2, 2, 64, 64, torch.bfloat16, True, True, 2),
    (2, 130, 2, 2, 256, 256, torch.bfloat16, True, True, 2),
    (2, 130, 2, 2, 96, 192, torch.bfloat16, True, True, 2),
    (1, 2000, 16, 32, 128, 128, torch.bfloat16, True, True, 6),
    (1, 32768, 4, 4, 128, 128, torch.bfloat16, True, True, 1),
    (2, 1000, 4, 8, 128, 128, torch.bfloat16, True, True, 2),
    # the state-kernel tests (varlen, 3 sequences) and the KLAttention layer tests (MQAR and GVA dims)
    (1, 330, 2, 4, 128, 128, torch.bfloat16, True, True, 3),
    (1, 330, 2, 4, 96, 192, torch.bfloat16, True, True, 3),
    (1, 330, 2, 4, 64, 64, torch.bfloat16, True, True, 3),
    (1, 330, 2, 4, 128, 128, torch.bfloat16, False, True, 3),
    (1, 330, 2, 4, 96, 192, torch.bfloat16, False, True, 3),
    (1, 330, 2, 4, 64, 64, torch.bfloat16, False, True, 3),
    (2, 200, 4, 4, 48, 96, torch.bfloat16, True, False, 2),
    (2, 200, 4, 4, 48, 96, torch.bfloat16, True, True, 2),
    (2, 200, 2, 4, 96, 192, torch.bfloat16, True, False, 2),
    (2, 200, 2, 4, 96, 192, torch.bfloat16, True, True, 2),
    # float32 inputs (exact-fp32 FMA products): the GPU grid's float32 problems, and a float32 benchmark
    (2, 100, 4, 4, 128, 128, torch.float32, True, True, 2),
    (2, 200, 4, 4, 128, 128, torch.float32, False, False, 2),
    (2, 130, 2, 2, 64, 64, torch.float32, True, True, 2),
    (2, 130, 2, 2, 96, 192, torch.float32, True, True, 2),
    (2, 130, 2, 2, 48, 96, torch.float32, True, True, 2),
    (2, 130, 2, 2, 256, 256, torch.float32, True, True, 2),
    (2, 130, 2, 2, 128, 256, torch.float32, True, True, 2),
    (1, 2000, 16, 32, 128, 128, torch.float32, True, True, 6),
    (1, 32768, 4, 4, 128, 128, torch.float32, True, True, 1),
    (8, 4096, 16, 16, 128, 128, torch.float32, True, False, 8),
    (2, 256, 16, 16, 128, 128, torch.float32, True, False, 2),
    (8, 4096, 12, 12, 96, 192, torch.float32, True, False, 8),
    (2, 256, 12, 12, 96, 192, torch.float32, True, False, 2),
    # examples/mqar.py (batch 32: the scan's "many" tiles class)
    (32, 256, 4, 4, 48, 96, torch.bfloat16, True, False, 32),
    # benchmark shapes
    (8, 4096, 16, 16, 128, 128, torch.bfloat16, True, False, 8),
    (2, 16384, 16, 16, 128, 128, torch.bfloat16, True, False, 2),
    (1, 32768, 32, 32, 128, 128, torch.bfloat16, True, False, 1),
    (8, 4096, 12, 12, 96, 192, torch.bfloat16, True, False, 8),
    (1, 32768, 16, 32, 128, 128, torch.bfloat16, True, False, 1),
    (1, 32768, 16, 64, 128, 128, torch.bfloat16, True, False, 1),
    (1, 32768, 16, 32, 128, 128, torch.bfloat16, True, False, 8),
    (1, 32768, 16, 64, 128, 128, torch.bfloat16, True, False, 8),
]


def suite_runs(suite: str, ops: tuple):
    """(case, dtype, B, T, cu_seqlens tuple or None) of each shape of ``ops`` in a bench suite, timed and as its
    correctness check runs it (the kernels' untuned scan schedule depends on the number of sequences)."""
    from kla_tl.bench import harness, suites

    for c in suites.expand(suites.load(), suite):
        if c.op not in ops:
            continue
        dt = harness.torch_dtype(c.dtype)
        if c.varlen:
            for lens in (c.varlen, harness.CHECK_VARLEN):
                cu = (0, *itertools.accumulate(lens))
                yield c, dt, 1, cu[-1], cu
        else:
            yield c, dt, c.B, c.T, None
            yield c, dt, min(c.B, harness.CHECK_B), min(c.T, harness.CHECK_T), None


def suite_cases(suite: str) -> list:
    """CASES-style tuples for the chunk ops of a bench suite: the timed shapes and their check shapes."""
    out = []
    for c, dt, B, _, cu in suite_runs(suite, ("chunk_fwd", "chunk_fwdbwd")):
        case = (c.B, c.T, c.H, c.HV, c.K, c.V, dt, c.normalize_q, False, B if cu is None else len(cu) - 1)
        if case not in out:
            out.append(case)
    return out


#: (B, T, H, HV, K, V, dtype, cu_seqlens, normalize_q, initial state, final-state gradient): the backward's GPU tests
_CU_VARLEN, _CU_CHAIN = (0, 0, 1, 1, 300, 301, 2000), (0, 130, 130, 330)
GRAD_CASES = [
    *[(2, 200, 2, 2, K, V, dt, None, True, True, True) for dt in (torch.bfloat16, torch.float32)
      for K, V in ((128, 128), (64, 64), (96, 192))],
    *[(2, 200, 2, 2, 128, 128, dt, None, False, False, False) for dt in (torch.bfloat16, torch.float32)],
    *[(1, 2000, 2, 4, 128, 128, dt, _CU_VARLEN, nq, True, True) for dt in (torch.bfloat16, torch.float32)
      for nq in (True, False)],
    (2, 1000, 4, 4, 128, 128, torch.bfloat16, None, True, True, True),
    (2, 130, 2, 2, 256, 256, torch.bfloat16, None, True, True, True),
    *[(1, 330, 2, 4, K, V, torch.bfloat16, _CU_CHAIN, nq, True, True) for K, V in ((128, 128), (96, 192), (64, 64))
      for nq in (True, False)],
    (1, 330, 2, 4, 64, 64, torch.float32, _CU_CHAIN, True, True, True),
]


def bench_fwdbwd_cases() -> list:
    """GRAD_CASES-style tuples of the full suite's chunk_fwdbwd shapes: each timed shape and its check shape."""
    return [(B, T, c.H, c.HV, c.K, c.V, dt, cu, c.normalize_q, False, False)
            for c, dt, B, T, cu in suite_runs("full", ("chunk_fwdbwd",))]


def replay(cases: list, paths: list, gpu: str) -> None:
    """Build every kernel ``kla_tl.chunk``'s launch code asks for on ``cases`` (see the module notes)."""
    from unittest import mock

    import kla_tl.chunk as CH
    from kla_tl import schedules
    from kla_tl.conventions import check_inputs

    device = schedules.Device(gpu, (9, 0))
    path = {}
    builders = ("build_kernels", "build_bwd_prepare_kernel", "build_states_kernel", "build_dstates_kernel",
                "build_bwd_grads_kernel")

    def no_op(*_args, **_kwargs):
        return None

    def building(fn):
        def build(*args, **kwargs):
            built = fn(*args, **kwargs)
            return tuple(no_op for _ in built) if isinstance(built, tuple) else no_op
        return build

    patches = [mock.patch.object(CH, name, building(getattr(CH, name))) for name in builders]
    patches += [mock.patch.object(CH, "select_arch", lambda _device: path["now"]),
                mock.patch.object(CH, "_schedule",
                                  lambda spec, arch, key, _device: schedules.lookup(spec.name, device, key,
                                                                                    arch=arch)[0])]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        t_all = time.time()
        for (B, T, H, HV, K, V, dt, cu, nq, h0, dht), arch in itertools.product(cases, paths):
            path["now"] = (arch, arch == "sm_80")
            t = time.time()
            T = T if cu is not None else min(T, 256)            # kernels depend on the sequence count, not on T
            q, k = torch.randn(B, T, H, K).to(dt), torch.randn(B, T, H, K).to(dt)
            v, g, eta = torch.randn(B, T, HV, V).to(dt), torch.zeros(B, T, HV), torch.rand(B, T, HV)
            N = B if cu is None else len(cu) - 1
            init = torch.zeros(N, HV, K, V) if h0 else None
            prob, cul = check_inputs("warm_cache", q, k, v, g, eta, normalize_q=nq, initial_state=init,
                                     cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
            kw = dict(prob=prob, cu=cul, scale=K ** -0.5, eps=1e-6, normalize_q=nq, initial_state=init)
            try:
                CH.chunk_fwd(q, k, v, g, eta, output_final_state=True, **kw)
                if K <= CH.BWD_MAX_K:
                    _, _, saved = CH.chunk_fwd(q, k, v, g, eta, output_final_state=True, save=True, **kw)
                    do, dh = torch.zeros(B, T, HV, V).to(dt), (torch.zeros(N, HV, K, V) if dht else None)
                    CH.chunk_bwd(q, k, v, g, eta, do, dh, **kw)
                    CH.chunk_bwd(q, k, v, g, eta, do, dh, saved=saved, **kw)
            except Exception as e:  # report and go on: one failing build must not hide the others
                print(f"FAILED {arch} {(B, T, H, HV, K, V, dt, cu, nq, h0, dht)}: {type(e).__name__}: "
                      f"{str(e).splitlines()[-1][:200] if str(e) else ''}", flush=True)
                continue
            print(f"{arch:7s} B={B} T={T} H={H} HV={HV} K={K} V={V} {str(dt)[6:]} varlen={cu is not None} nq={nq} "
                  f"h0={h0} dht={dht}: {time.time() - t:.0f}s", flush=True)
        print(f"total {time.time() - t_all:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", help="also build the chunk problems of this kla-tl bench suite (quick, full)")
    ap.add_argument("--states", action="store_true",
                    help="also build the backward's state recurrences (kla_tl.kernels.chunk_states) and (K <= 128) "
                         "its chunk-gradient kernels of every problem")
    ap.add_argument("--replay", action="store_true",
                    help="build what the launch code asks for on the backward's GPU test problems and the full "
                         "suite's fwd+bwd shapes (module notes)")
    ap.add_argument("--bench-only", action="store_true", help="with --replay: only the fwd+bwd bench shapes")
    ap.add_argument("--paths", nargs="+", default=["sm_90a", "sm_80"], choices=["sm_90a", "sm_80"],
                    help="with --replay: code paths (sm_80 runs on Hopper)")
    ap.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="with --replay: device name for schedules")
    ap.add_argument("--part", default="1/1", help="with --replay: I/N builds every N-th problem from the I-th")
    args = ap.parse_args()
    if args.replay:
        i, n = (int(x) for x in args.part.split("/"))
        if not 1 <= i <= n:
            ap.error(f"--part must be I/N with 1 <= I <= N, got {args.part}")
        cases = ([] if args.bench_only else GRAD_CASES) + bench_fwdbwd_cases()
        replay(list(dict.fromkeys(cases))[i - 1::n], args.paths, args.gpu)
        return 0
    cases = CASES + (suite_cases(args.suite) if args.suite else [])
    t_all = time.time()
    for arch, on_hopper in (("sm_90a", False), ("sm_80", True)):
        for B, T, H, HV, K, V, dt, nq, h0, N in cases:
            prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, dtype=dt, is_varlen=False, use_h0=h0,
                           normalize_q=nq)
            t = time.time()
            try:
                build_kernels(prob, arch, on_hopper, scale=K ** -0.5, eps=1e-6, use_h0=h0)
                if args.states:
                    build_states_kernel(prob, arch, on_hopper, use_h0=h0)
                    for dht in (True, False):
                        build_dstates_kernel(prob, arch, on_hopper, scale=K ** -0.5, use_dht=dht)
                    if K <= 128:
                        build_bwd_prepare_kernel(prob, arch, on_hopper, scale=K ** -0.5, eps=1e-6)
                        build_bwd_grads_kernel(prob, arch, on_hopper, scale=K ** -0.5, eps=1e-6)
            except Exception as e:  # report and go on: one failing build must not hide the others
                print(f"FAILED {arch} K={K} V={V}: {type(e).__name__}: {str(e).splitlines()[-1][:200]}")
                continue
            print(f"{arch:7s} {'ampere-on-hopper' if on_hopper else 'native':16s} H={H} HV={HV} K={K} V={V} "
                  f"{str(dt)[6:]} nq={nq} h0={h0} N={N}: {time.time() - t:.1f}s", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
