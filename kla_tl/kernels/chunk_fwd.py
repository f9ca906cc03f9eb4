"""The chunkwise forward as the tooling sees it: tuning spaces, defaults and builders of its two stages,
registered with :mod:`kla_tl.kernels.registry` (``chunk_prepare`` then ``chunk_scan``).

Problem key of both stages: ``{"H", "HV", "K", "V", "dtype", "normalize_q"}`` (+ ``use_h0``, ``store_ht`` and
``tiles`` for the scan). T, the batch and the number of sequences are dynamic in the kernels, so one build serves
every length; ``tiles`` ("few" / "many", :func:`tiles_class`) only selects the scan's schedule bucket, because the
best scan schedule depends on how many (sequence, value head, 64-column) tiles there are to fill the GPU with.
Both stages have ``KernelSpec.bench`` hooks (:func:`kla_tl.chunk.chunk_bench_cases`), so ``kla-tl autotune`` times
them on a GPU.
"""

import json
import math

from .registry import KernelSpec, register, target_for

PREPARE_SPACE = {
    #: threads per CTA. 128 = one warpgroup (the wgmma unit); 256 halves the registers per thread of the [64, K] fp32
    #: tiles, needed once K or V exceeds 128.
    "threads": (128, 256),
    #: register cap per thread (``__launch_bounds__(threads, 65536 // (threads * max_regs))``; 255 = none). 128 with
    #: 256 threads fits two CTAs on an SM's register file: the stage is a chain of dependent phases (loads, GEMMs, a
    #: serial triangular solve, stores), and a second CTA overlaps them. With 128 threads the cap would spill.
    "max_regs": (255, 128),
}

#: chunk_scan knobs.
SCAN_SPACE = {
    #: state columns per CTA: smaller tiles give more CTAs for small N*HV (132 SMs on H100) at the price of
    #: recomputing q^, K^ per tile; 128 keeps more of the state in one CTA.
    "block_v": (32, 64, 128),
    #: 128 = one warpgroup; 256 for large K (the [K, block_v] fp32 state lives in registers).
    "threads": (128, 256),
    #: software-pipelining depth of the chunk loads; the Ampere path supports 1 only (runtime trip count,
    #: TILELANG.md section 7).
    "num_stages": (1, 2),
    #: Hopper only: producer/consumer warp specialization (TMA loads in a producer warpgroup). Off: cp.async loads
    #: issued by the compute threads, still with wgmma. Off is required when K is padded (48, 96): the padded
    #: loads are masked, and the warp-specialized lowering of masked loads gave wrong states on an H100.
    "warp_specialize": (True, False),
}

#: Streaming multiprocessors of the GPUs kla-tl targets (H100 SXM, H200, A100: 132/132/108); used only by the
#: untuned default to pick block_v so that the grid covers the chip.
_SM_GUESS = 132


def _wide(key) -> bool:
    return max(key["K"], key["V"]) > 128


def prepare_default(arch: str, key: dict) -> dict:
    """128 threads, no register cap; with K or V over 128, 256 threads, capped at 128 registers (two CTAs an SM)
    where two CTAs' tiles fit in shared memory (bfloat16, K <= 128: 91 KB at 96/192): an H100 ran the published
    96/192 forward's prepare in 0.57 ms so, 0.81 ms uncapped (154 registers, one CTA an SM; no spills either way;
    the sm_80 path on the same H100: 0.53 vs 0.82 ms). float32 or K = 256 tiles take 148-165 KB (one CTA an SM
    anyway), and capped they spill."""
    wide = _wide(key)
    two = wide and not _exact(key) and key["K"] <= 128
    return {"threads": 256 if wide else 128, "max_regs": 128 if two else 255}


def prepare_valid(arch: str, key: dict, sch: dict) -> bool:
    """A register cap only with 256 threads (128 threads capped at 128 registers spill)."""
    return sch["max_regs"] == 255 or sch["threads"] == 256


def _padded(key) -> bool:
    return key["K"] % 64 != 0


def _exact(key) -> bool:
    """float32 operands: the kernels multiply with exact-fp32 FMA products, not tensor cores
    (:func:`kla_tl.kernels._tl.gemm_for`), so there is no TMA/wgmma pipeline to specialize warps for, and the
    float32 tiles take twice the shared memory of bf16 ones."""
    return key["dtype"] == "float32"


def tiles_class(n_seq: int, HV: int, V: int) -> str:
    """"many" when the (sequence, value head, 64-column) tiles of a problem fill the GPU (at least ``_SM_GUESS``),
    else "few": the scan's schedule bucket dimension (:func:`scan_bucket`)."""
    return "many" if n_seq * HV * math.ceil(V / 64) >= _SM_GUESS else "few"


def scan_default(arch: str, key: dict) -> dict:
    """Untuned default, from the H100 sweep of (block_v, threads, num_stages, warp_specialize) at K = V = 128:
    with enough (sequence, head, 64-column) tiles to fill the GPU, block_v 64 without warp specialization was
    fastest (0.33 ms at B=8, T=4096, H=16); with few tiles (B=2, T=16384, H=16), block_v 32 with two warp-specialized
    stages (0.59 ms). K > 128 takes 256 threads and one stage (shared memory); padded K turns specialization off;
    float32 (FMA products, twice the tile bytes) takes block_v 32 without specialization.
    ``key["tiles"]`` (:func:`tiles_class`; "many" when absent) says which case applies."""
    many = key.get("tiles", "many") == "many"
    ws = arch == "sm_90a" and not _padded(key) and not many and key["K"] <= 128 and not _exact(key)
    return {"block_v": 64 if many and not _exact(key) else 32, "threads": 256 if key["K"] > 128 or _exact(key) else 128,
            "num_stages": 2 if ws else 1, "warp_specialize": ws}


def scan_valid(arch: str, key: dict, sch: dict) -> bool:
    if arch == "sm_80" and (sch["num_stages"] != 1 or sch["warp_specialize"]):
        return False
    if sch["warp_specialize"] and (_padded(key) or _exact(key)):
        return False
    if not sch["warp_specialize"] and sch["num_stages"] != 1:
        return False      # cp.async pipelining with a runtime trip count breaks TileLang 0.1.15 codegen
    if sch["block_v"] > key["V"]:
        return False
    return True


def bucket(key: dict) -> str:
    return f"K{key['K']}_V{key['V']}_{key['dtype']}"


def scan_bucket(key: dict) -> str:
    return f"{bucket(key)}_{key.get('tiles', 'many')}"


def _target(arch: str, run_on_hopper: bool):
    target, pcs = target_for(arch, run_on_hopper)
    return json.dumps(target, sort_keys=True), tuple(sorted(pcs.items()))


def build_prepare(arch: str, key: dict, schedule: dict, *, run_on_hopper: bool = False, scale=None, eps=1e-6,
                  u_dtype=None, store_l=False, given_l=False):
    from .chunk_prepare import build_chunk_prepare

    target, pcs = _target(arch, run_on_hopper)
    return build_chunk_prepare(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], in_dtype=key["dtype"],
                               normalize_q=bool(key.get("normalize_q", False)),
                               scale=float(key["K"] ** -0.5 if scale is None else scale), eps=float(eps),
                               threads=schedule["threads"], max_regs=schedule["max_regs"], target=target,
                               pass_configs=pcs, u_dtype=u_dtype, store_l=store_l, given_l=given_l)


def build_scan(arch: str, key: dict, schedule: dict, *, run_on_hopper: bool = False, scale=None, eps=1e-6,
               aqk_width=64):
    from .chunk_scan import build_chunk_scan

    target, pcs = _target(arch, run_on_hopper)
    if not schedule.get("warp_specialize", True):
        pcs = tuple(sorted(dict(pcs, **{"tl.disable_warp_specialized": True}).items()))
    return build_chunk_scan(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], in_dtype=key["dtype"],
                            normalize_q=bool(key.get("normalize_q", False)),
                            scale=float(key["K"] ** -0.5 if scale is None else scale), eps=float(eps),
                            use_h0=bool(key.get("use_h0", False)), store_ht=bool(key.get("store_ht", True)),
                            block_v=schedule["block_v"], threads=schedule["threads"],
                            num_stages=schedule["num_stages"], target=target, pass_configs=pcs, aqk_width=aqk_width)


def _key(H, HV, K, V, dtype="bfloat16", normalize_q=True, use_h0=False, store_ht=True, tiles="many"):
    return {"H": H, "HV": HV, "K": K, "V": V, "dtype": dtype, "normalize_q": normalize_q, "use_h0": use_h0,
            "store_ht": store_ht, "tiles": tiles}


#: Shapes `kla-tl compile` builds: the benchmark head dims and the published model's, and float32 (exact FMA path).
EXAMPLE_KEYS = [_key(16, 16, 128, 128), _key(12, 12, 96, 192), _key(16, 32, 64, 64), _key(8, 8, 256, 256),
                _key(16, 16, 128, 128, dtype="float32")]
#: The scan's also in the few-tiles bucket at K = V = 128 (few long sequences, e.g. B = 2, T = 16384, H = 16).
SCAN_EXAMPLE_KEYS = EXAMPLE_KEYS + [_key(16, 16, 128, 128, tiles="few")]


def _bench(arch: str, key: dict, stage: str) -> list:
    from kla_tl.chunk import chunk_bench_cases       # imports torch; only when a GPU run asks for it

    return chunk_bench_cases(stage, key)


PREPARE = register(KernelSpec(name="chunk_prepare", space=PREPARE_SPACE, default=prepare_default, bucket=bucket,
                              build=build_prepare, example_keys=EXAMPLE_KEYS, valid=prepare_valid,
                              bench=lambda arch, key: _bench(arch, key, "prepare")))
SCAN = register(KernelSpec(name="chunk_scan", space=SCAN_SPACE, default=scan_default, bucket=scan_bucket,
                           build=build_scan, example_keys=SCAN_EXAMPLE_KEYS, valid=scan_valid,
                           bench=lambda arch, key: _bench(arch, key, "scan")))
