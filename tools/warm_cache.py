"""Build, without a GPU, every chunk-forward kernel that the GPU tests and the forward benchmark (``kla-tl bench``) launch, for the
Hopper path and the Ampere-on-Hopper path, so that a GPU run loads them from ``TILELANG_CACHE_DIR`` instead of
compiling.

    TILELANG_CACHE_DIR=.tlcache python tools/warm_cache.py [--suite quick|full] [--states]

``--suite`` adds the chunk problems of that ``kla-tl bench`` suite: each timed shape and the smaller shape its
correctness check runs (the kernels' untuned scan schedule depends on the number of sequences, so both are needed).
"""

import argparse
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


def suite_cases(suite: str) -> list:
    """CASES-style tuples for the chunk ops of a bench suite: the timed shapes and their check shapes."""
    from kla_tl.bench import harness, suites

    out = []
    for c in suites.expand(suites.load(), suite):
        if c.op not in ("chunk_fwd", "chunk_fwdbwd"):
            continue
        dt = harness.torch_dtype(c.dtype)
        n_timed = len(c.varlen) if c.varlen else c.B
        n_check = len(harness.CHECK_VARLEN) if c.varlen else min(c.B, harness.CHECK_B)
        for n in (n_timed, n_check):
            case = (c.B, c.T, c.H, c.HV, c.K, c.V, dt, c.normalize_q, False, n)
            if case not in out:
                out.append(case)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", help="also build the chunk problems of this kla-tl bench suite (quick, full)")
    ap.add_argument("--states", action="store_true",
                    help="also build the backward's state recurrences (kla_tl.kernels.chunk_states) and (K <= 128) "
                         "its chunk-gradient kernels of every problem")
    args = ap.parse_args()
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
