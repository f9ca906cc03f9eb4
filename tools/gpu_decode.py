"""Decode benchmark on one GPU: kla-tl's ``kla_decode`` (Hopper path, Ampere path, bf16 pool) beside fla's
``fused_recurrent_gated_delta_rule`` run as KLA, plus the device-to-device copy bandwidth it is measured against.

    python tools/gpu_decode.py --out decode.json            # about 1-2 minutes on an H100
    python tools/gpu_decode.py --schedules                   # schedule sweep + host-overhead profile (~2 minutes)
    python tools/gpu_decode.py --warm-cache                  # no GPU: compile all of the above into $TILELANG_CACHE_DIR

Steps: (1) correctness of every implementation against the float64 reference (an implementation that fails is not
timed; its records carry the error); (2) copy bandwidth (read + write bytes of a 1 GiB ``copy_``); (3) per batch size
B, eager and CUDA-graph timings. Shape: H q/k heads (default 16), HV = 32 value heads, K = V = 128, bf16 q/k/v, fp32
g/eta, fp32 state (and a bf16-pool variant of kla-tl).

Timing: back-to-back calls between CUDA events, rotating over several input sets (state pool, indices, q/k/v/g/eta,
out) whose total state exceeds 3x the L2 cache where memory allows, so every call streams its state from HBM.
*eager*: a Python loop of calls (includes host overhead: at small B it measures the launch path). *graph*: one CUDA
graph holding one call per set, replayed; per-call time = replay time / calls. Reported: median ms per call, spread =
(p80 - p20) / median over the repetitions, and the state traffic ``B*HV*K*V*state_bytes*2 / time`` as GB/s and as a
fraction of the measured copy bandwidth.

``--schedules``: each candidate decode schedule (``kla_tl.kernels.recurrent.DECODE_CANDIDATES``, plus
``--candidates``) is built, checked against the float64 reference, and timed as a CUDA graph at each batch size
(``--batches``, default 1,8,64,256,1024) for both pool dtypes, on the same input sets; then the host cost of one
B = 1 call is split into its stages (validation, refusal, launcher, the raw launch). Ends with one table per pool:
us per step and fraction of copy bandwidth per B.

Peers run KLA in the literal form (KLA.md section 4): ``beta = eta / (||k||^2 + 1e-6)`` in fp32 from the raw keys and
q L2-normalized, both computed once outside the timed region (kla-tl does both inside its kernel);
``use_qk_l2norm_in_kernel=False``. fla's state is ``[B, HV, K, V]`` fp32 in (``initial_state``) and out
(``output_final_state=True``, a new tensor per call). kla-tl uses a shuffled ``state_indices`` into its pool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

# fla: take the pure-Triton kernels (read once at fla import; see kla_tl/bench/peers.py)
os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")

import torch  # noqa: E402

#: batch sizes timed
BATCHES = (1, 8, 64, 256, 1024)
#: shape of the serving case (value heads, head dims)
HV, K, V = 32, 128, 128
#: the rotation sets of one measurement hold at least this multiple of the L2 size in state
L2_MULTIPLE = 3
#: ... and at most this many bytes of state, and this many sets
SET_BYTES_CAP = 6 * 2**30
MAX_SETS = 64
#: repetitions of each timing (median and p20/p80 over them)
REPS = 15
#: each repetition runs at least this many calls (and at least one pass over the sets)
MIN_CALLS = 64
#: correctness gates (norm-relative error vs float64): bf16 inputs with an fp32 state / with a bf16 pool
TOL_FP32_STATE = 5e-3
TOL_BF16_STATE = 1e-2
#: fla is a peer: record its error, refuse to time it only when it is clearly wrong
TOL_PEER = 2e-2
ARCH_ENV = "KLA_TL_ARCH"


# ------------------------------------------------------------------------------------------------------- helpers


def rel_err(got, ref) -> float:
    g, r = got.detach().double(), ref.detach().double()
    if not torch.isfinite(g).all():
        return float("inf")
    rn = r.norm().item()
    return (g - r).norm().item() / rn if rn > 0 else (g - r).norm().item()


def quantiles(xs):
    xs = sorted(xs)
    med = statistics.median(xs)
    if len(xs) < 2:
        return med, med, med
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return med, q[1], q[7]


class arch_env:
    """Set KLA_TL_ARCH for the block (kla-tl reads it at every call; a graph keeps what was captured)."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.old = os.environ.get(ARCH_ENV)
        if self.value is None:
            os.environ.pop(ARCH_ENV, None)
        else:
            os.environ[ARCH_ENV] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(ARCH_ENV, None)
        else:
            os.environ[ARCH_ENV] = self.old


def make_set(B, H, state_dtype, device, gen):
    """One input set: token inputs, a pool of B slots, shuffled slot indices, an out buffer, fla's inputs."""
    def randn(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.float32)
    q = randn(B, 1, H, K).to(torch.bfloat16)
    k = randn(B, 1, H, K).to(torch.bfloat16)
    v = randn(B, 1, HV, V).to(torch.bfloat16)
    g = torch.nn.functional.logsigmoid(randn(B, 1, HV) + 2.0)
    eta = torch.sigmoid(1.5 * randn(B, 1, HV))
    pool = (0.1 * randn(B, HV, K, V)).to(state_dtype)
    idx = torch.randperm(B, generator=gen, device=device).to(torch.int32)
    out = torch.empty(B, 1, HV, V, dtype=torch.bfloat16, device=device)
    return {"q": q, "k": k, "v": v, "g": g, "eta": eta, "pool": pool, "idx": idx, "out": out}


def fla_inputs(s):
    """(q normalized, beta fp32) of KLA's literal form."""
    qf, kf = s["q"].float(), s["k"].float()
    qn = (qf * torch.rsqrt((qf * qf).sum(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    ksq = (kf * kf).sum(-1)                                          # [B, 1, H]
    G = s["eta"].shape[2] // ksq.shape[2]
    beta = s["eta"] / (ksq.repeat_interleave(G, dim=2) + 1e-6)
    return qn, beta.float().contiguous()


# ------------------------------------------------------------------------------------------------ implementations


class KlaTl:
    def __init__(self, name, arch, state_dtype):
        import kla_tl
        self.kla_decode = kla_tl.kla_decode
        self.name, self.arch, self.state_dtype = name, arch, state_dtype

    def call(self, s):
        return lambda: self.kla_decode(s["q"], s["k"], s["v"], s["g"], s["eta"], s["pool"], state_indices=s["idx"],
                                       normalize_q=True, out=s["out"])

    def run_once(self, s):
        with arch_env(self.arch):
            self.call(s)()
        return s["out"], s["pool"]

    def schedule(self, s):
        try:
            from kla_tl import recurrent as rec
            from kla_tl.conventions import check_decode_inputs
            prob = check_decode_inputs("bench", s["q"], s["k"], s["v"], s["g"], s["eta"], s["pool"],
                                       state_indices=s["idx"], normalize_q=True)
            key = rec.decode_key(prob, dtype=s["q"].dtype, gate_dtype=s["g"].dtype, state_dtype=s["pool"].dtype,
                                 use_indices=True, normalize_q=True)
            with arch_env(self.arch):
                return rec.kernel_info("decode", s["q"].device, key)
        except Exception as e:  # informational only
            return {"error": repr(e)}


class FlaTriton:
    name = "fla_triton"
    arch = None
    state_dtype = torch.float32

    def __init__(self):
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
        self.fn = fused_recurrent_gated_delta_rule

    def prepare(self, s):
        s["fla_q"], s["fla_beta"] = fla_inputs(s)
        s["fla_h0"] = s["pool"].float()[s["idx"].long()].contiguous() if s["idx"] is not None else s["pool"].float()

    def call(self, s):
        def f():
            s["fla_o"], s["fla_ht"] = self.fn(s["fla_q"], s["k"], s["v"], g=s["g"], beta=s["fla_beta"],
                                              initial_state=s["fla_h0"], output_final_state=True,
                                              use_qk_l2norm_in_kernel=False)
        return f

    def run_once(self, s):
        self.prepare(s)
        self.call(s)()
        return s["fla_o"], s["fla_ht"]


# ------------------------------------------------------------------------------------------------------ checking


def check(impl, device, H, gen):
    """Norm-relative errors of o and of the new state vs float64 (B = 4, one padding row for kla-tl)."""
    from kla_tl.reference import kla_decode_reference
    s = make_set(4, H, impl.state_dtype, device, gen)
    if isinstance(impl, KlaTl):
        s["idx"][1] = -1
    ref_pool = s["pool"].double()
    ref_idx = s["idx"]
    o_ref = kla_decode_reference(*(s[n].double() for n in ("q", "k", "v", "g", "eta")), ref_pool,
                                 state_indices=ref_idx, normalize_q=True)
    s["out"].fill_(float("nan"))
    o, new_state = impl.run_once(s)
    torch.cuda.synchronize()
    live = (ref_idx >= 0).nonzero().flatten()
    slots = ref_idx[live].long()
    err_o = rel_err(o, o_ref)
    got_state = new_state[slots] if isinstance(impl, KlaTl) else new_state[live]
    err_s = rel_err(got_state, ref_pool[slots])
    pad_ok = True
    if isinstance(impl, KlaTl):
        pad_ok = bool((o[1] == 0).all())
    return {"err_o": err_o, "err_state": err_s, "padding_zero": pad_ok}


def check_graph(impl, device, H, gen):
    """A captured kla-tl decode step replays to the eager result bit for bit."""
    s = make_set(8, H, impl.state_dtype, device, gen)
    pool0 = s["pool"].clone()
    with arch_env(impl.arch):
        impl.call(s)()
        o_eager, pool_eager = s["out"].clone(), s["pool"].clone()
        s["pool"].copy_(pool0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            impl.call(s)()
    s["out"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(s["out"], o_eager) and torch.equal(s["pool"], pool_eager))


# ------------------------------------------------------------------------------------------------------- timing


def n_sets_for(B, H, state_dtype, l2_bytes):
    st = B * HV * K * V * torch.finfo(state_dtype).bits // 8
    n = max(1, math.ceil(L2_MULTIPLE * l2_bytes / st))
    return int(min(n, MAX_SETS, max(1, SET_BYTES_CAP // st)))


def time_calls(fns, graph: bool):
    """(median, p20, p80) ms per call of the rotation ``fns``."""
    per_rep = max(1, math.ceil(MIN_CALLS / len(fns)))
    calls = per_rep * len(fns)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for f in fns:                                     # warm-up (also compiles on first use)
        f()
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(per_rep):
                for f in fns:
                    f()
        g.replay()
        torch.cuda.synchronize()
        run = g.replay
    else:
        def run():
            for _ in range(per_rep):
                for f in fns:
                    f()
    samples = []
    for _ in range(REPS):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return quantiles(samples)


def copy_bandwidth(device):
    n = 2**30
    bufs = {"src": torch.empty(n, dtype=torch.uint8, device=device)}
    bufs["dst"] = torch.empty_like(bufs["src"])
    bufs["src"].random_(0, 255)
    ms, p20, p80 = time_calls([lambda: bufs["dst"].copy_(bufs["src"])], graph=False)
    bufs.clear()
    torch.cuda.empty_cache()
    return {"copy_tbps": 2 * n / (ms * 1e-3) / 1e12, "copy_spread": (p80 - p20) / ms, "copy_mib": n // 2**20}


# --------------------------------------------------------------------------------------------------------- main


def warm_cache(H) -> int:
    """Compile, without a GPU, every kla-tl kernel this script launches (both modes) for the Hopper path and the
    Ampere-on-Hopper path."""
    from kla_tl.kernels.recurrent import DECODE_SPEC
    from kla_tl.kernels.registry import target_for
    t0 = time.time()
    n = 0
    for sdt in (torch.float32, torch.bfloat16):
        cands, _ = sweep_candidates(H, sdt)
        schedules = {json.dumps(sch, sort_keys=True): sch for _, sch, _ in cands}
        key = _decode_key(H, sdt)
        for arch, on_hopper in (("sm_90a", False), ("sm_80", True)):
            target, configs = target_for(arch, run_on_hopper=on_hopper)
            for sch in schedules.values():
                DECODE_SPEC.build(arch, key, sch, target_arch=target["arch"], pass_configs=configs)
                n += 1
    print(f"built {n} decode kernels in {time.time() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------- schedule sweep

#: batch sizes of the sweep
SWEEP_BATCHES = (1, 8, 64, 256, 1024)
#: host-overhead profile: calls per timed burst (below the launch-queue depth, so the host never waits on the GPU)
HOST_CALLS = 400


def _decode_key(H, state_dtype):
    from kla_tl import recurrent as rec
    from kla_tl.conventions import Problem
    prob = Problem(B=1, T=1, H=H, HV=HV, K=K, V=V, N=1, dtype=torch.bfloat16, is_varlen=False, use_h0=True,
                   normalize_q=True)
    return rec.decode_key(prob, dtype=torch.bfloat16, gate_dtype=torch.float32, state_dtype=state_dtype,
                          use_indices=True, normalize_q=True)


def sweep_candidates(H, state_dtype, extra=()):
    """[(name, schedule, arch path)] to sweep for one pool dtype: DECODE_CANDIDATES (+ ``extra``), the spec default,
    and the default on the Ampere path (its source is the sm_90a one; built with the Ampere pass configs)."""
    from kla_tl.kernels.recurrent import DECODE_CANDIDATES, DECODE_SPEC
    sdt = str(state_dtype).replace("torch.", "")
    key = _decode_key(H, state_dtype)
    default = DECODE_SPEC.default("sm_90a", key)
    cands = [(n, sch, None) for n, sch, _ in DECODE_CANDIDATES[sdt]]
    cands += [(f"extra{i}", sch, None) for i, sch in enumerate(extra)]
    cands = [(n, sch, p) for n, sch, p in cands if DECODE_SPEC.valid("sm_90a", key, sch)]
    if all(sch != default for _, sch, _ in cands):
        cands.insert(0, ("default", default, None))
    name = next(n for n, sch, _ in cands if sch == default)
    cands.append((name + "@sm_80", default, "sm_80"))
    return cands, default


def build_candidate(H, state_dtype, schedule, path):
    """The raw executable of one decode candidate (from the TileLang cache when warm)."""
    from kla_tl.kernels.recurrent import DECODE_SPEC
    from kla_tl.kernels.registry import target_for
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    arch = path or ("sm_90a" if hopper else "sm_80")
    target, configs = target_for(arch, run_on_hopper=hopper)
    kernel = DECODE_SPEC.build(arch, _decode_key(H, state_dtype), schedule, target_arch=target["arch"],
                               pass_configs=configs)
    get_exec = getattr(getattr(kernel, "adapter", None), "_get_executable", None)
    return get_exec() if get_exec is not None else kernel


def _raw_call(fn, s):
    scale = float(K ** -0.5)
    return lambda: fn(s["q"], s["k"], s["v"], s["g"], s["eta"], s["pool"], s["idx"], s["out"], scale, 1e-6)


def check_candidate(fn, H, state_dtype, device, gen):
    """None when the candidate matches the float64 reference on B = 5 rows (row 1 padding), else a message."""
    from kla_tl.reference import kla_decode_reference
    s = make_set(5, H, state_dtype, device, gen)
    s["idx"][1] = -1
    ref_pool = s["pool"].double()
    o_ref = kla_decode_reference(*(s[n].double() for n in ("q", "k", "v", "g", "eta")), ref_pool,
                                 state_indices=s["idx"], normalize_q=True)
    s["out"].fill_(float("nan"))
    _raw_call(fn, s)()
    torch.cuda.synchronize()
    live = (s["idx"] >= 0).nonzero().flatten()
    slots = s["idx"][live].long()
    tol = TOL_FP32_STATE if state_dtype == torch.float32 else TOL_BF16_STATE
    e_o, e_s = rel_err(s["out"][live], o_ref[live]), rel_err(s["pool"][slots], ref_pool[slots])
    pad_ok = bool((s["out"][1] == 0).all())
    if e_o <= tol and e_s <= tol and pad_ok:
        return None
    return f"err_o {e_o:.2e} err_state {e_s:.2e} padding_zero {pad_ok} (tol {tol:g})"


def host_profile(H, device, gen):
    """Host microseconds per call of each stage of a B = 1 kla_decode (fp32 pool, default schedule)."""
    import kla_tl
    from kla_tl import recurrent as rec
    from kla_tl.conventions import check_decode_inputs
    s = make_set(1, H, torch.float32, device, gen)
    args = (s["q"], s["k"], s["v"], s["g"], s["eta"], s["pool"])
    kw = {"state_indices": s["idx"], "normalize_q": True, "out": s["out"]}
    prob = check_decode_inputs("kla_decode", *args, **kw)
    kla_tl.kla_decode(*args, **kw)                       # compiles / loads, fills the plan caches
    fn = rec._DECODE_PLANS[next(k for k in rec._DECODE_PLANS if k[0] == s["q"].device
                                and k[3] == torch.float32)][0]
    small = torch.zeros(1, device=device)
    stages = [
        ("kla_tl.kla_decode (whole call)", lambda: kla_tl.kla_decode(*args, **kw)),
        ("  check_decode_inputs", lambda: check_decode_inputs("kla_decode", *args, **kw)),
        ("  decode_refusal", lambda: rec.decode_refusal(prob, s["q"].device, s["pool"])),
        ("  kla_decode_kernel (incl. launch)", lambda: rec.kla_decode_kernel(*args, prob=prob, **kw)),
        ("    raw executable launch", _raw_call(fn, s)),
        ("torch small.add_(1) (yardstick)", lambda: small.add_(1.0)),
    ]
    out = []
    for name, f in stages:
        for _ in range(50):
            f()
        torch.cuda.synchronize()
        reps = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(HOST_CALLS):
                f()
            reps.append((time.perf_counter() - t0) / HOST_CALLS * 1e6)
            torch.cuda.synchronize()
        out.append((name, statistics.median(reps)))
    # the whole call as the eager benchmark sees it (CUDA events around a loop)
    ms, _, _ = time_calls([lambda: kla_tl.kla_decode(*args, **kw)], graph=False)
    out.append(("kla_decode eager, CUDA events", ms * 1e3))
    return out


def sweep(args) -> int:
    """The ``--schedules`` mode (see the module docstring)."""
    t_start = time.time()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    gen = torch.Generator(device=device).manual_seed(4321)
    H = args.H
    batches = [int(b) for b in args.batches.split(",") if b] if args.batches else list(SWEEP_BATCHES)
    extra = [json.loads(c) for c in args.candidates] if args.candidates else []
    print(f"device: {props.name} ({props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB), torch "
          f"{torch.__version__}; shape H={H} HV={HV} K={K} V={V} bf16 q/k/v, shuffled state_indices", flush=True)
    ceil = copy_bandwidth(device)
    print(f"device-to-device copy: {ceil['copy_tbps']:.3f} TB/s (read + write)", flush=True)
    records, defaults = [], {}
    for sdt in (torch.float32, torch.bfloat16):
        sname = str(sdt).replace("torch.", "")
        cands, defaults[sname] = sweep_candidates(H, sdt, extra)
        ready = []
        for name, sch, path in cands:
            try:
                fn = build_candidate(H, sdt, sch, path)
                msg = check_candidate(fn, H, sdt, device, gen)
            except Exception as e:  # noqa: BLE001 -- report and go on with the other candidates
                traceback.print_exc()
                msg = f"raised {e!r}"
            print(f"check {sname:8s} {name:20s} {json.dumps(sch)}: {msg or 'ok'}", flush=True)
            if msg is None:
                ready.append((name, sch, path, fn))
            else:
                records.append({"pool": sname, "name": name, "schedule": sch, "path": path, "error": msg})
        for B in batches:
            n_sets = n_sets_for(B, H, sdt, l2)
            sets = [make_set(B, H, sdt, device, gen) for _ in range(n_sets)]
            traffic = B * HV * K * V * torch.finfo(sdt).bits // 8 * 2
            for name, sch, path, fn in ready:
                if path is not None and B not in (batches[0], batches[-1]):
                    continue                      # the Ampere path compiles the same source: two sizes suffice
                ms, p20, p80 = time_calls([_raw_call(fn, s) for s in sets], graph=True)
                gbps = traffic / (ms * 1e-3) / 1e9
                records.append({"pool": sname, "name": name, "schedule": sch, "path": path, "B": B, "ms": ms,
                                "spread": (p80 - p20) / ms, "gbps": gbps,
                                "frac_bw": gbps / (ceil["copy_tbps"] * 1e3), "sets": n_sets})
            del sets
            torch.cuda.empty_cache()
            print(f"{sname} B={B} done ({time.time() - t_start:.0f} s)", flush=True)
    host = host_profile(H, device, gen)

    print(f"\nCUDA-graph us per decode step (fraction of the {ceil['copy_tbps']:.2f} TB/s copy bandwidth, for "
          f"B >= 64); * = current default")
    for sname in ("float32", "bfloat16"):
        print(f"\npool {sname}")
        names = list(dict.fromkeys(r["name"] for r in records if r["pool"] == sname))
        print(f"{'candidate':22s} {'bv/thr/wk/regs':15s}" + "".join(f"{'B=' + str(b):>15s}" for b in batches))
        for name in names:
            rs = [r for r in records if r["pool"] == sname and r["name"] == name]
            sch = rs[0]["schedule"]
            tag = "*" if sch == defaults[sname] and rs[0]["path"] is None else " "
            knobs = f"{sch['block_v']}/{sch['threads']}/{sch['warps_k']}/{sch['max_regs']}"
            if "error" in rs[0]:
                print(f"{name + tag:22s} {knobs:15s}  FAILED CHECK: {rs[0]['error'][:80]}")
                continue
            cells = []
            for b in batches:
                r = next((r for r in rs if r.get("B") == b), None)
                if r is None:
                    cells.append(f"{'-':>15s}")
                elif b >= 64:
                    cells.append(f"{r['ms'] * 1e3:9.1f} {r['frac_bw']:4.0%}")
                else:
                    cells.append(f"{r['ms'] * 1e3:15.2f}")
            print(f"{name + tag:22s} {knobs:15s}" + "".join(cells))
    fast = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    via = ("the C DLPack exchange API (fast)" if fast
           else "Python DLPack (SLOW: torch-c-dlpack-ext missing or unloadable)")
    print(f"\nhost cost of one B = 1 call (us; stages nested as indented; fp32 pool, default schedule); tvm-ffi "
          f"converts torch tensors through {via}")
    for name, us in host:
        print(f"  {name:40s} {us:7.2f}")
    print(f"\ntotal {time.time() - t_start:.0f} s")
    if args.out:
        doc = {"schema": 1, "mode": "schedules",
               "device": {"name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                          "sm_count": props.multi_processor_count, "l2_mib": round(l2 / 2**20, 1)},
               "versions": _versions(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "ceilings": ceil, "defaults": defaults, "records": records,
               "host_us": {name.strip(): us for name, us in host}, "dlpack_c_exchange_api": fast}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {len(records)} records to {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--H", type=int, default=16, help="q/k heads (HV = 32; default 16, GVA group 2)")
    ap.add_argument("--batches", default=None,
                    help=f"comma-separated batch sizes (default {','.join(map(str, BATCHES))}; --schedules: "
                         f"{','.join(map(str, SWEEP_BATCHES))})")
    ap.add_argument("--no-fla", action="store_true", help="skip fla")
    ap.add_argument("--warm-cache", action="store_true", help="only compile the kernels (no GPU needed)")
    ap.add_argument("--schedules", action="store_true",
                    help="sweep the candidate decode schedules (DECODE_CANDIDATES) and profile the host cost of a "
                         "B=1 call")
    ap.add_argument("--candidates", action="append", metavar="JSON",
                    help='with --schedules: an extra schedule, e.g. \'{"block_v": 64, "threads": 256, "warps_k": 8, '
                         '"max_regs": 128}\' (repeatable; compiles on first use)')
    args = ap.parse_args(argv)
    if args.warm_cache:
        return warm_cache(args.H)
    if not torch.cuda.is_available():
        print("gpu_decode: no CUDA device (use --warm-cache to only compile)", file=sys.stderr)
        return 2
    if args.schedules:
        return sweep(args)
    t_start = time.time()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    cap = torch.cuda.get_device_capability(device)
    l2 = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    batches = [int(b) for b in (args.batches or ",".join(map(str, BATCHES))).split(",") if b]
    gen = torch.Generator(device=device).manual_seed(1234)
    H = args.H
    print(f"device: {props.name} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB), "
          f"torch {torch.__version__}", flush=True)

    impls, errors = [], {}
    specs = [("kla_tl", None, torch.float32), ("kla_tl", None, torch.bfloat16)]
    if cap[0] == 9:
        specs.append(("kla_tl_ampere", "sm_80", torch.float32))
    for name, arch, sdt in specs:
        try:
            impls.append(KlaTl(name, arch, sdt))
        except Exception as e:
            errors[(name, sdt)] = f"import failed: {e!r}"
    if not args.no_fla:
        try:
            impls.append(FlaTriton())
        except Exception as e:
            errors[("fla_triton", torch.float32)] = f"import failed: {e!r}"

    # (1) correctness gate
    checks = {}
    for impl in impls:
        tag = (impl.name, impl.state_dtype)
        try:
            c = check(impl, device, H, gen)
            if isinstance(impl, KlaTl):
                c["graph_equals_eager"] = check_graph(impl, device, H, gen)
                tol = TOL_FP32_STATE if impl.state_dtype == torch.float32 else TOL_BF16_STATE
                ok = c["err_o"] <= tol and c["err_state"] <= tol and c["padding_zero"] and c["graph_equals_eager"]
            else:
                tol = TOL_PEER
                ok = c["err_o"] <= tol and c["err_state"] <= tol
            checks[tag] = c
            print(f"check {impl.name:14s} state {str(impl.state_dtype)[6:]:9s} "
                  f"err_o {c['err_o']:.2e} err_state {c['err_state']:.2e} "
                  f"{'ok' if ok else 'FAIL (tol %.0e)' % tol} {c}", flush=True)
            if not ok:
                errors[tag] = f"correctness check failed: {c}"
        except Exception as e:
            traceback.print_exc()
            errors[tag] = f"check raised {e!r}"

    # (2) ceiling
    ceil = copy_bandwidth(device)
    print(f"device-to-device copy: {ceil['copy_tbps']:.3f} TB/s (read + write)", flush=True)

    # (3) timings
    records = []
    for B in batches:
        for impl in impls:
            tag = (impl.name, impl.state_dtype)
            sbytes = torch.finfo(impl.state_dtype).bits // 8
            shape = {"B": B, "T": 1, "H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16",
                     "state_dtype": str(impl.state_dtype).replace("torch.", ""), "varlen": False}
            traffic = B * HV * K * V * sbytes * 2
            n_sets = n_sets_for(B, H, impl.state_dtype, l2)
            base = {"op": "decode", "impl": impl.name, "shape": shape, "sets": n_sets,
                    "check": checks.get(tag)}
            if tag in errors:
                for graph in (False, True):
                    records.append({**base, "ms": None, "spread": None, "graph": graph, "error": errors[tag]})
                continue
            try:
                sets = [make_set(B, H, impl.state_dtype, device, gen) for _ in range(n_sets)]
                if isinstance(impl, FlaTriton):
                    for s in sets:
                        impl.prepare(s)
                    base["prep"] = "beta and q normalization computed outside the timed calls"
                else:
                    base["schedule"] = impl.schedule(sets[0])
                fns = [impl.call(s) for s in sets]
            except Exception as e:
                traceback.print_exc()
                for graph in (False, True):
                    records.append({**base, "ms": None, "spread": None, "graph": graph, "error": f"setup: {e!r}"})
                continue
            for graph in (False, True):
                try:
                    with arch_env(impl.arch):
                        ms, p20, p80 = time_calls(fns, graph)
                    gbps = traffic / (ms * 1e-3) / 1e9
                    rec_ = {**base, "ms": ms, "spread": (p80 - p20) / ms, "graph": graph, "p20": p20, "p80": p80,
                            "gbps": gbps, "frac_bw": gbps / (ceil["copy_tbps"] * 1e3)}
                except Exception as e:
                    traceback.print_exc()
                    rec_ = {**base, "ms": None, "spread": None, "graph": graph, "error": f"timing: {e!r}"}
                records.append(rec_)
            del sets, fns
            torch.cuda.empty_cache()
        print(f"B={B} done ({time.time() - t_start:.0f} s)", flush=True)

    # table
    print()
    print(f"{'impl':14s} {'state':9s} {'B':>5s} {'graph':>5s} {'us/step':>9s} {'spread':>7s} {'GB/s':>7s} "
          f"{'of copy':>7s}")
    for r in records:
        if r["ms"] is None:
            print(f"{r['impl']:14s} {r['shape']['state_dtype']:9s} {r['shape']['B']:5d} {str(r['graph']):>5s} "
                  f"  error: {r['error'][:80]}")
            continue
        print(f"{r['impl']:14s} {r['shape']['state_dtype']:9s} {r['shape']['B']:5d} {str(r['graph']):>5s} "
              f"{r['ms'] * 1e3:9.2f} {r['spread']:7.2f} {r['gbps']:7.0f} {r['frac_bw']:7.1%}")
    print(f"\ntotal {time.time() - t_start:.0f} s")

    if args.out:
        doc = {"schema": 1,
               "device": {"name": props.name, "capability": list(cap), "sm_count": props.multi_processor_count,
                          "l2_mib": round(l2 / 2**20, 1)},
               "versions": _versions(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "ceilings": ceil,
               "settings": {"script": "tools/gpu_decode.py", "reps": REPS, "min_calls": MIN_CALLS,
                            "l2_multiple": L2_MULTIPLE, "H": H},
               "records": records}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        print(f"wrote {len(records)} records to {args.out}")
    return 0


def _versions():
    import importlib.metadata as md
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("tilelang", "triton", "fla-core", "flash-linear-attention"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        import kla_tl
        out["kla_tl"] = kla_tl.__version__
    except Exception:
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
