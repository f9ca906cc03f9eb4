"""CPU execution of the generated decode / fused_recurrent CUDA kernels, against the float64 references.

The TileLang-generated CUDA source is compiled with the host C++ compiler against a small emulation layer: every CUDA
thread of a block is a fiber (``ucontext``), ``__syncthreads`` and ``__shfl_xor_sync`` are barriers of the block /
warp with an exchange buffer, ``threadIdx``/``blockIdx`` are set per fiber, dynamic shared memory is a per-block
buffer, and bf16 values are converted with round-to-nearest-even as on the GPU. Blocks run one after the other. So
the index arithmetic, the lane layouts, the shuffle and shared-memory reductions, the padding rows and the
in-place pool update of each schedule run for real, without a GPU (the memory model, timing and float rounding of
``expf``/``rsqrtf`` are the host's). Slow: each schedule compiles once (TileLang lowering + nvcc, cached in
``$TILELANG_CACHE_DIR``, then g++).
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from kla_tl.conventions import DEFAULT_EPS
from kla_tl.reference import kla_decode_reference, naive_kla

R = pytest.importorskip("kla_tl.kernels.recurrent", reason="tilelang is not importable")

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CXX is None, reason="no host C++ compiler")]

#: Emulation layer prepended to the generated kernel source (replaces its CUDA includes).
SHIM = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <algorithm>
#include <functional>
#include <vector>
#include <ucontext.h>
typedef unsigned int uint;
typedef unsigned char uchar;
#define __global__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx;
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint1 { unsigned x; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint1 make_uint1(unsigned a) { return {a}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
using std::min;
using std::max;
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint16_t f2bf(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float f) : bits(f2bf(f)) {}
  explicit operator float() const { return bf2f(bits); }
};
struct __nv_bfloat162 { bfloat16_t x, y; };
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {(float)v.x, (float)v.y}; }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {bfloat16_t(v.x), bfloat16_t(v.y)}; }
static inline unsigned __pack_nv_bfloat162(bfloat16_t a, bfloat16_t b) {
  return (unsigned)a.bits | ((unsigned)b.bits << 16);
}
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ---- fibers: one per thread of the running block
struct Fiber { ucontext_t ctx; bool done; };
static std::vector<Fiber> emu_fibers;
static std::vector<char> emu_stacks;
static ucontext_t emu_main;
static int emu_cur, emu_nthreads;
static std::function<void()> emu_body;
static std::vector<uchar> emu_smem;
static const size_t EMU_STACK = 1 << 16;
static void emu_yield() { swapcontext(&emu_fibers[emu_cur].ctx, &emu_main); }
static void emu_trampoline() {
  emu_body();
  emu_fibers[emu_cur].done = true;
  swapcontext(&emu_fibers[emu_cur].ctx, &emu_main);
}
static int emu_bar_count, emu_bar_gen;
static void __syncthreads() {
  int gen = emu_bar_gen;
  if (++emu_bar_count == emu_nthreads) { emu_bar_count = 0; emu_bar_gen++; return; }
  while (emu_bar_gen == gen) emu_yield();
}
static int emu_warp_count[64], emu_warp_gen[64];
static uint32_t emu_warp_buf[64][32];
static void emu_warp_barrier(int w) {
  int gen = emu_warp_gen[w];
  if (++emu_warp_count[w] == 32) { emu_warp_count[w] = 0; emu_warp_gen[w]++; return; }
  while (emu_warp_gen[w] == gen) emu_yield();
}
template <class T> static T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  int tid = (int)threadIdx.x, w = tid / 32, l = tid % 32;
  std::memcpy(&emu_warp_buf[w][l], &v, 4);
  emu_warp_barrier(w);
  T r; std::memcpy(&r, &emu_warp_buf[w][(l ^ lane_mask) % width + (l / width) * width], 4);
  emu_warp_barrier(w);
  return r;
}
static void emu_run_grid(int gx, int gy, int gz, int nthreads, const std::function<void()>& body) {
  emu_nthreads = nthreads;
  emu_fibers.assign(nthreads, Fiber());
  emu_stacks.assign((size_t)nthreads * EMU_STACK, 0);
  emu_smem.assign(1 << 17, 0xff);
  emu_body = body;
  for (int bz = 0; bz < gz; ++bz) for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gx; ++bx) {
    blockIdx = {(unsigned)bx, (unsigned)by, (unsigned)bz};
    std::memset(emu_smem.data(), 0xff, emu_smem.size());   // NaN-poisoned shared memory
    emu_bar_count = emu_bar_gen = 0;
    std::memset(emu_warp_count, 0, sizeof emu_warp_count);
    for (int t = 0; t < nthreads; ++t) {
      emu_fibers[t].done = false;
      getcontext(&emu_fibers[t].ctx);
      emu_fibers[t].ctx.uc_stack.ss_sp = emu_stacks.data() + (size_t)t * EMU_STACK;
      emu_fibers[t].ctx.uc_stack.ss_size = EMU_STACK;
      emu_fibers[t].ctx.uc_link = nullptr;
      makecontext(&emu_fibers[t].ctx, emu_trampoline, 0);
    }
    for (bool busy = true; busy;) {
      busy = false;
      for (int t = 0; t < nthreads; ++t) {
        if (emu_fibers[t].done) continue;
        busy = true;
        emu_cur = t;
        threadIdx = {(unsigned)t, 0, 0};
        swapcontext(&emu_main, &emu_fibers[t].ctx);
      }
    }
  }
}
"""

_BUILT: dict = {}


def _emulated(kernel):
    """(callable(ptrs: dict, ints: dict, floats: dict, grid, threads), parameter names) of a compiled TileLang
    kernel, built for the host."""
    src = kernel.get_kernel_source()
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    if digest in _BUILT:
        return _BUILT[digest]
    body = src[src.index('extern "C"'):]
    body = re.sub(r"extern __shared__ __align__\(\d+\) uchar (\w+)\[\];", r"uchar* \1 = emu_smem.data();", body)
    m = re.search(r'extern "C" __global__ void __launch_bounds__\([^)]*\) (\w+)\(([^)]*)\)', body) or \
        re.search(r'extern "C" __global__ void (\w+)\(([^)]*)\) \{', body)
    name, params = m.group(1), [p.strip() for p in m.group(2).split(",")]
    casts, names = [], []
    for p in params:
        pname = p.split()[-1]
        names.append(pname)
        if "*" in p:
            ctype = p[:p.index("*") + 1].replace("const ", "")
            casts.append(f"({ctype})ptrs[{len(casts)}]")
        elif p.startswith("int"):
            casts.append(f"(int)ints[{len(casts)}]")
        else:
            casts.append(f"(float)floats[{len(casts)}]")
    wrapper = (f'\nextern "C" void emu_launch(void** ptrs, long long* ints, double* floats, int gx, int gy, int gz, '
               f'int threads) {{\n  emu_run_grid(gx, gy, gz, threads, [=]() {{ {name}({", ".join(casts)}); }});\n}}\n')
    d = tempfile.mkdtemp(prefix="kla_emu_")
    cpp, so = os.path.join(d, "k.cpp"), os.path.join(d, "k.so")
    with open(cpp, "w") as f:
        f.write(SHIM + body + wrapper)
    res = subprocess.run([CXX, "-O1", "-std=c++17", "-fno-strict-aliasing", "-shared", "-fPIC", "-w", cpp, "-o", so],
                         capture_output=True, text=True)
    try:
        assert res.returncode == 0, res.stderr[-3000:]
        lib = ctypes.CDLL(so)
    finally:
        shutil.rmtree(d, ignore_errors=True)        # the loaded library stays mapped
    lib.emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4

    def launch(values: dict, grid, threads):
        n = len(names)
        ptrs, ints, floats = (ctypes.c_void_p * n)(), (ctypes.c_longlong * n)(), (ctypes.c_double * n)()
        for i, pname in enumerate(names):
            val = values[pname]
            if isinstance(val, torch.Tensor):
                assert val.is_contiguous() and val.device.type == "cpu", pname
                ptrs[i] = val.data_ptr()
            elif isinstance(val, int):
                ints[i] = val
            else:
                floats[i] = float(val)
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        lib.emu_launch(ptrs, ints, floats, gx, gy, gz, threads)

    _BUILT[digest] = launch
    return launch


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).norm() / ref.norm()).item()


def _inputs(B, T, H, HV, K, V, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(dtype)
    v = torch.randn(B, T, HV, V, generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, generator=gen) + 2.0)
    eta = torch.sigmoid(1.5 * torch.randn(B, T, HV, generator=gen))
    return q, k, v, g, eta, gen


#: (K, V, pool dtype, schedule) of decode: the default, the sweep candidates' layouts (warps side by side, whole
#: rows with warps stacked along K, one warp per CTA) and odd head dims.
DECODE_SCHEDULES = [
    (64, 64, "float32", None),
    (64, 64, "bfloat16", None),
    (64, 128, "float32", {"block_v": 32, "threads": 128, "warps_k": 1, "max_regs": 255}),
    (64, 128, "float32", {"block_v": 128, "threads": 256, "warps_k": 8, "max_regs": 128}),
    (64, 128, "bfloat16", {"block_v": 128, "threads": 256, "warps_k": 8, "max_regs": 128}),
    (64, 128, "bfloat16", {"block_v": 32, "threads": 64, "warps_k": 1, "max_regs": 255}),
    (64, 64, "float32", {"block_v": 32, "threads": 64, "warps_k": 2, "max_regs": 128}),
    (64, 64, "float32", {"block_v": 16, "threads": 32, "warps_k": 1, "max_regs": 255}),
    (48, 96, "float32", None),
    (48, 96, "bfloat16", None),
    (96, 192, "bfloat16", {"block_v": 64, "threads": 256, "warps_k": 8, "max_regs": 80}),
]


def _sched_id(c):
    K, V, sdt, sch = c
    return f"K{K}_V{V}_{sdt}_" + ("default" if sch is None else "_".join(f"{k[:2]}{v}" for k, v in sch.items()))


@pytest.mark.parametrize("case", DECODE_SCHEDULES, ids=_sched_id)
@pytest.mark.parametrize("use_indices", [True, False], ids=["idx", "noidx"])
def test_emulated_decode_matches_fp64_reference(case, use_indices):
    K, V, sdt, sch = case
    B, H, HV, normalize_q = 3, 1, 2, use_indices
    key = {"H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "state_dtype": sdt,
           "use_indices": use_indices, "normalize_q": normalize_q}
    sch = sch or R.DECODE_SPEC.default("sm_90a", key)
    assert R.DECODE_SPEC.valid("sm_90a", key, sch), sch
    launch = _emulated(R.DECODE_SPEC.build("sm_90a", key, sch))
    q, k, v, g, eta, gen = _inputs(B, 1, H, HV, K, V, torch.bfloat16, seed=K + V)
    n_slots = B + 2 if use_indices else B
    pool = (0.1 * torch.randn(n_slots, HV, K, V, generator=gen)).to(getattr(torch, sdt))
    idx = torch.tensor([4, -1, 0], dtype=torch.int32) if use_indices else None
    ref_pool = pool.double()
    o_ref = kla_decode_reference(*(x.double() for x in (q, k, v, g, eta)), ref_pool, state_indices=idx,
                                 normalize_q=normalize_q)
    before = pool.clone()
    o = torch.full((B, 1, HV, V), float("nan"), dtype=torch.bfloat16)
    vals = {"q": q, "k": k, "v": v, "g": g, "eta": eta, "state": pool, "o": o, "state_indices": idx, "B": B,
            "N_slots": n_slots, "scale": K ** -0.5, "eps": DEFAULT_EPS}
    launch(vals, (B * HV * (V // sch["block_v"]),), sch["threads"])
    live = [b for b in range(B) if idx is None or idx[b] >= 0]
    slots = [b if idx is None else int(idx[b]) for b in live]
    tol = 5e-3 if sdt == "float32" else 1e-2
    assert _rel(o[live], o_ref[live]) < tol
    assert _rel(pool[slots], ref_pool[slots]) < tol
    if idx is not None:
        assert torch.equal(o[1], torch.zeros_like(o[1])), "padding row must output zeros"
        untouched = [s for s in range(n_slots) if s not in slots]
        assert torch.equal(pool[untouched], before[untouched]), "slots not in state_indices changed"


@pytest.mark.parametrize("key_norm", [0.0, 1e-3, 1e3], ids=["zero_keys", "tiny_keys", "huge_keys"])
@pytest.mark.parametrize("sdt", ["float32", "bfloat16"])
def test_emulated_decode_default_with_adversarial_keys(sdt, key_norm):
    """Keys of norm 0, 1e-3, 1e3 (beta up to eta / eps): the expanded output alpha qS + (q.k) beta e stays finite and
    as accurate as the state update."""
    B, H, HV, K, V = 2, 1, 2, 64, 64
    key = {"H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "state_dtype": sdt,
           "use_indices": False, "normalize_q": True}
    sch = R.DECODE_SPEC.default("sm_90a", key)
    launch = _emulated(R.DECODE_SPEC.build("sm_90a", key, sch))
    q, k, v, g, eta, gen = _inputs(B, 1, H, HV, K, V, torch.bfloat16, seed=11)
    k = (k.float() / k.float().norm(dim=-1, keepdim=True) * key_norm).to(torch.bfloat16)
    pool = (0.1 * torch.randn(B, HV, K, V, generator=gen)).to(getattr(torch, sdt))
    ref_pool = pool.double()
    o_ref = kla_decode_reference(*(x.double() for x in (q, k, v, g, eta)), ref_pool, normalize_q=True)
    o = torch.full((B, 1, HV, V), float("nan"), dtype=torch.bfloat16)
    vals = {"q": q, "k": k, "v": v, "g": g, "eta": eta, "state": pool, "o": o, "B": B, "N_slots": B,
            "scale": K ** -0.5, "eps": DEFAULT_EPS}
    launch(vals, (B * HV * (V // sch["block_v"]),), sch["threads"])
    tol = 5e-3 if sdt == "float32" else 1e-2
    assert _rel(o, o_ref) < tol
    assert _rel(pool, ref_pool) < tol


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("dims", [(64, 64), (48, 96)], ids=lambda d: f"K{d[0]}_V{d[1]}")
def test_emulated_fused_recurrent_matches_fp64_reference(dims, varlen):
    K, V = dims
    H, HV = 1, 2
    cu = [0, 3, 3, 10] if varlen else None
    B, T = (1, 10) if varlen else (2, 5)
    N = len(cu) - 1 if varlen else B
    key = {"H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "use_h0": True,
           "store_ht": True, "is_varlen": varlen, "normalize_q": True}
    sch = {**R.FUSED_RECURRENT_SPEC.default("sm_90a", key), "block_t": 4}   # 4: several refills per sequence
    launch = _emulated(R.FUSED_RECURRENT_SPEC.build("sm_90a", key, sch))
    q, k, v, g, eta, gen = _inputs(B, T, H, HV, K, V, torch.bfloat16, seed=7)
    h0 = 0.1 * torch.randn(N, HV, K, V, generator=gen)
    cu_t = torch.tensor(cu if varlen else [0, 0], dtype=torch.int32)
    o = torch.full((B, T, HV, V), float("nan"), dtype=torch.bfloat16)
    ht = torch.full((N, HV, K, V), float("nan"))
    vals = {"q": q, "k": k, "v": v, "g": g, "eta": eta, "h0": h0, "ht": ht, "cu_seqlens": cu_t, "o": o,
            "B": B, "T": T, "N_h0": N, "N_ht": N, "N_cu": len(cu_t), "scale": K ** -0.5, "eps": DEFAULT_EPS}
    launch(vals, (N, HV, V // sch["block_v"]), sch["threads"])
    o_ref, ht_ref = naive_kla(*(x.double() for x in (q, k, v, g, eta)), normalize_q=True,
                              initial_state=h0.double(), output_final_state=True,
                              cu_seqlens=torch.tensor(cu) if varlen else None)
    assert _rel(o, o_ref) < 5e-3
    assert _rel(ht, ht_ref) < 5e-3


#: serving variants of fused_recurrent: (K, V, varlen, pool dtype or None (no state_indices), inplace, per-token
#: states dtype or None, store_ht); each guards a path of the kernel.
SERVING_CASES = [
    (64, 64, True, "float32", False, "float32", True),       # spec-decode verify: pool read-only, fp32 states
    (64, 64, True, "bfloat16", True, "bfloat16", False),     # serving: bf16 pool in place, bf16 states
    (48, 96, False, "float32", True, None, True),            # dense rows, in place, no states; odd head dims
    (64, 64, False, None, False, "bfloat16", True),          # per-token states only (no pool, no h0)
    (96, 192, True, "bfloat16", True, "float32", True),      # published KLA 0.4B head dims, everything on
]


def _serving_id(c):
    K, V, varlen, pool, inplace, inter, ht = c
    return (f"K{K}_V{V}_{'varlen' if varlen else 'dense'}_" + (f"pool_{pool}" if pool else "nopool")
            + ("_inplace" if inplace else "") + (f"_states_{inter}" if inter else "") + ("_ht" if ht else ""))


@pytest.mark.parametrize("case", SERVING_CASES, ids=_serving_id)
def test_emulated_fused_recurrent_serving_matches_fp64_reference(case):
    """Pool slots through state_indices (shuffled, one padding sequence, an empty sequence when varlen), the
    in-place final state, per-token states, 4-token refills: o, ht, the states and the pool against the float64
    reference; the padding sequence writes zeros to o (and ht) and touches no slot and no state row."""
    from kla_tl.reference import fused_recurrent_kla_reference

    K, V, varlen, pool_dt, inplace, inter_dt, store_ht = case
    H, HV = 1, 2
    cu = [0, 3, 3, 10, 12] if varlen else None
    B, T = (1, 12) if varlen else (3, 5)
    N = len(cu) - 1 if varlen else B
    use_idx = pool_dt is not None
    key = {"H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "use_h0": use_idx,
           "store_ht": store_ht, "is_varlen": varlen, "normalize_q": True, "state_dtype": pool_dt or "float32",
           "use_indices": use_idx, "is_inplace": inplace, "store_inter": inter_dt is not None,
           "inter_dtype": inter_dt or "float32"}
    sch = {**R.FUSED_RECURRENT_SPEC.default("sm_90a", key), "block_t": 4}   # 4: several refills per sequence
    launch = _emulated(R.FUSED_RECURRENT_SPEC.build("sm_90a", key, sch))
    q, k, v, g, eta, gen = _inputs(B, T, H, HV, K, V, torch.bfloat16, seed=K + 3 * V)
    n_slots = N + 2
    pool = (0.1 * torch.randn(n_slots, HV, K, V, generator=gen)).to(getattr(torch, pool_dt or "float32"))
    idx = torch.randperm(n_slots, generator=gen)[:N].to(torch.int32)
    idx[N - 2] = -1                                              # a padding sequence (varlen: 7 tokens)
    before = pool.clone()
    inter = torch.full((B * T, HV, K, V), float("nan"), dtype=getattr(torch, inter_dt or "float32"))
    o = torch.full((B, T, HV, V), float("nan"), dtype=torch.bfloat16)
    ht = torch.full((N, HV, K, V), float("nan"))
    cu_t = torch.tensor(cu if varlen else [0, 0], dtype=torch.int32)
    vals = {"q": q, "k": k, "v": v, "g": g, "eta": eta, "h0": pool if use_idx else torch.zeros(1, HV, K, V),
            "ht": ht if store_ht else torch.zeros(1, HV, K, V), "cu_seqlens": cu_t,
            "state_indices": idx if use_idx else torch.zeros(2, dtype=torch.int32),
            "inter": inter if inter_dt else torch.zeros(1, HV, K, V), "o": o, "B": B, "T": T,
            "N_h0": n_slots if use_idx else 1, "N_ht": N if store_ht else 1, "N_cu": len(cu_t),
            "N_idx": N if use_idx else 2, "N_tok": B * T if inter_dt else 1, "scale": K ** -0.5,
            "eps": DEFAULT_EPS}
    launch(vals, (N, HV, V // sch["block_v"]), sch["threads"])
    ref_pool = before.double()
    ref_inter = torch.full((B * T, HV, K, V), float("nan"), dtype=torch.float64)
    o_ref, ht_ref = fused_recurrent_kla_reference(
        *(x.double() for x in (q, k, v, g, eta)), normalize_q=True, output_final_state=True,
        cu_seqlens=torch.tensor(cu) if varlen else None, initial_state=ref_pool if use_idx else None,
        state_indices=idx if use_idx else None, inplace_final_state=inplace, intermediate_states=ref_inter)
    tol = 1e-2 if "bfloat16" in (pool_dt, inter_dt) else 5e-3
    if use_idx:
        live = idx >= 0
        pad = int((~live).nonzero()[0])
        tok = (torch.arange(B * T) // T == pad) if not varlen else (
            (torch.arange(T) >= cu[pad]) & (torch.arange(T) < cu[pad + 1]))
        assert torch.equal(o.reshape(B * T, HV, V)[tok], torch.zeros(int(tok.sum()), HV, V, dtype=o.dtype)), \
            "padding sequence: o must be exact zeros"
        if inter_dt:
            assert torch.isnan(inter[tok]).all(), "padding sequence: a per-token state row was written"
        if store_ht:
            assert torch.equal(ht[pad], torch.zeros_like(ht[pad])), "padding sequence: ht must be zeros"
        slots = idx[live].long()
        others = torch.ones(n_slots, dtype=torch.bool)
        others[slots] = False
        assert torch.equal(pool[others], before[others]), "a slot outside state_indices changed"
        if inplace:
            assert _rel(pool[slots], ref_pool[slots]) < tol
        else:
            assert torch.equal(pool, before), "inplace_final_state=False must leave the pool untouched"
    assert _rel(o, o_ref) < 5e-3
    if store_ht:
        assert _rel(ht, ht_ref) < 5e-3
    if inter_dt:
        written = ~torch.isnan(ref_inter[:, 0, 0, 0])
        assert not torch.isnan(inter[written]).any(), "a live token's state row was not written"
        assert _rel(inter[written], ref_inter[written]) < tol
