"""GPU tests of ``kla_decode`` and ``fused_recurrent_kla`` (both code paths) against the float64 references.

Every test draws fresh inputs, NaN-poisons what the library allocates (and ``out=`` buffers), checks that the TileLang
kernel (not the reference fallback) served the call, and compares outputs and states by the norm-relative error
(tolerances from ``helpers.TOL``; the bf16 pool has its own, below). Paths: ``native`` (the device's arch, sm_90a on
Hopper) and ``sm_80`` (``KLA_TL_ARCH=sm_80``: the Ampere path, run on Hopper with WS/wgmma/TMA disabled).

``python tests/test_recurrent_gpu.py`` (no GPU needed) compiles every kernel these tests launch for sm_90a and the
Ampere-on-Hopper path into ``$TILELANG_CACHE_DIR``, so that the GPU run loads them instead of compiling.
"""

import pytest
import torch

from helpers import assert_rel_close, make_inputs, nan_poison_, tol_for

import kla_tl
from kla_tl import dispatch
from kla_tl import recurrent as rec
from kla_tl.conventions import check_decode_inputs, check_inputs
from kla_tl.reference import chunk_kla_reference, kla_decode_reference, naive_kla

pytestmark = pytest.mark.gpu

PATHS = ["native", "sm_80"]

#: bf16 pool: the stored state is rounded to bf16 (unit roundoff 2**-9) after every step, on top of the fp32-pool
#: error; the issue's gate for this configuration.
POOL_BF16_TOL = 1e-2

#: (B, H, HV, K, V, q/k/v dtype, pool dtype, normalize_q, use state_indices, padding rows); each guards a path.
DECODE_CASES = [
    (3, 2, 4, 128, 128, torch.bfloat16, torch.float32, True, True, 1),     # GVA, shuffled slots, one padding row
    (3, 2, 4, 128, 128, torch.bfloat16, torch.bfloat16, True, True, 1),    # bf16 pool (8-wide lanes)
    (4, 4, 4, 64, 64, torch.bfloat16, torch.float32, False, True, 0),      # small heads, no q normalization
    (2, 2, 2, 96, 192, torch.bfloat16, torch.float32, True, True, 1),      # published KLA 0.4B head dims
    (2, 1, 2, 256, 256, torch.bfloat16, torch.float32, True, True, 1),     # largest heads (64 state values/thread)
    (2, 1, 2, 256, 256, torch.bfloat16, torch.bfloat16, True, True, 0),    # K = 256 bf16 pool (L = 1 default)
    (3, 2, 4, 48, 96, torch.float16, torch.float32, True, False, 0),       # fp16 inputs, row b -> slot b
    (5, 2, 2, 128, 128, torch.float32, torch.float32, True, False, 0),     # fp32 inputs
]


def _case_id(c):
    B, H, HV, K, V, dt, pdt, nq, idx, pad = c
    return (f"B{B}-H{H}-HV{HV}-K{K}-V{V}-{str(dt)[6:]}-pool_{str(pdt)[6:]}" + ("-qnorm" if nq else "")
            + ("-idx" if idx else "") + (f"-pad{pad}" if pad else ""))


@pytest.fixture(params=PATHS)
def path(request, monkeypatch, nan_poison):
    """Select the code path, NaN-poison torch.empty*, and reset the warn-once table so a fallback is visible."""
    if request.param == "native":
        monkeypatch.delenv(rec.ARCH_ENV, raising=False)
    else:
        monkeypatch.setenv(rec.ARCH_ENV, "sm_80")
    dispatch._WARNED.clear()
    return request.param


def _pool(n_slots, HV, K, V, dtype):
    return (0.1 * torch.randn(n_slots, HV, K, V, device="cuda", dtype=torch.float64)).to(dtype)


def _slots(B, n_slots, n_pad):
    """Shuffled distinct slots for B rows, n_pad of them replaced by -1."""
    idx = torch.randperm(n_slots)[:B].to(torch.int32)
    idx[torch.randperm(B)[:n_pad]] = -1
    return idx.cuda()


def _run_decode(inp, pool, idx, *, normalize_q, pool_tol, out=None):
    """kla_decode on (inp, pool, idx) against the float64 reference; returns (o, o_ref)."""
    q, k, v, g, eta = inp.args()
    dtype = q.dtype
    prob = check_decode_inputs("test", q, k, v, g, eta, pool, state_indices=idx, normalize_q=normalize_q)
    assert rec.decode_refusal(prob, q.device, pool) is None, "the decode kernel must serve this case"
    ref_pool = pool.to(torch.float64)
    before = pool.clone()
    o_ref = kla_decode_reference(*(x.to(torch.float64) for x in (q, k, v, g, eta)), ref_pool, state_indices=idx,
                                 normalize_q=normalize_q)
    o = kla_tl.kla_decode(q, k, v, g, eta, pool, state_indices=idx, normalize_q=normalize_q, out=out)
    torch.cuda.synchronize()
    if out is not None:
        assert o is out
    assert o.dtype == dtype and o.shape == (q.shape[0], 1, v.shape[2], v.shape[3])
    assert torch.isfinite(o).all(), "o has non-finite entries (unwritten or overflow)"
    assert_rel_close("o", o, o_ref, tol_for(dtype, "o"))
    rows = torch.arange(q.shape[0], device=q.device)
    slots = rows if idx is None else idx.long()
    live = slots >= 0
    touched = slots[live]
    if (~live).any():
        assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padding rows must output exact zeros"
    if touched.numel():
        assert torch.isfinite(pool[touched]).all()
        assert_rel_close("state", pool[touched], ref_pool[touched], pool_tol)
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    untouched[touched] = False
    assert torch.equal(pool[untouched], before[untouched]), "slots not in state_indices (or padded) changed"
    return o, o_ref


def _pool_tol(dtype, pool_dtype):
    return POOL_BF16_TOL if pool_dtype == torch.bfloat16 else tol_for(dtype, "ht")


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_matches_fp64_reference(path, case):
    B, H, HV, K, V, dtype, pool_dtype, nq, use_idx, n_pad = case
    inp = make_inputs(B, 1, H, HV, K, V, dtype=dtype, device="cuda")
    n_slots = B + 3 if use_idx else B
    pool = _pool(n_slots, HV, K, V, pool_dtype)
    idx = _slots(B, n_slots, n_pad) if use_idx else None
    _run_decode(inp, pool, idx, normalize_q=nq, pool_tol=_pool_tol(dtype, pool_dtype))


def test_decode_writes_into_out_and_returns_it(path):
    inp = make_inputs(4, 1, 2, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    pool = _pool(6, 4, 128, 128, torch.float32)
    out = nan_poison_(torch.empty(4, 1, 4, 128, dtype=torch.bfloat16, device="cuda"))
    _run_decode(inp, pool, _slots(4, 6, 1), normalize_q=True, pool_tol=tol_for(torch.bfloat16, "ht"), out=out)


@pytest.mark.parametrize("key_norm", [0.0, 1e-3, 1e3], ids=["zero_keys", "tiny_keys", "huge_keys"])
@pytest.mark.parametrize("gate", [None, 0.0, -30.0], ids=["gate_random", "gate_0", "gate_-30"])
def test_decode_adversarial_keys_and_gates_stay_finite_and_accurate(path, key_norm, gate):
    inp = make_inputs(3, 1, 2, 4, 128, 128, dtype=torch.bfloat16, device="cuda", key_norm=key_norm)
    if gate is not None:
        inp.g = torch.full_like(inp.g, gate)
    pool = _pool(5, 4, 128, 128, torch.float32)
    _run_decode(inp, pool, _slots(3, 5, 0), normalize_q=True, pool_tol=tol_for(torch.bfloat16, "ht"))


def test_decode_steps_after_prefill_equal_the_whole_sequence(path):
    """naive prefill of T0 tokens, then N kla_decode steps on strided per-token slices == naive_kla over all."""
    B, T0, N, H, HV, K, V = 2, 5, 6, 2, 4, 128, 128
    inp = make_inputs(B, T0 + N, H, HV, K, V, dtype=torch.bfloat16, device="cuda")
    x64 = inp.to(torch.float64)
    o_all, ht_all = naive_kla(*x64.args(), normalize_q=True, output_final_state=True)
    _, h_pre = naive_kla(*(x[:, :T0] for x in x64.args()), normalize_q=True, output_final_state=True)
    pool = h_pre.float().contiguous()
    q, k, v, g, eta = inp.args()
    outs = []
    for t in range(T0, T0 + N):
        sl = slice(t, t + 1)
        outs.append(kla_tl.kla_decode(q[:, sl], k[:, sl], v[:, sl], g[:, sl], eta[:, sl], pool, normalize_q=True))
    torch.cuda.synchronize()
    assert_rel_close("o", torch.cat(outs, 1), o_all[:, T0:], tol_for(torch.bfloat16, "o"))
    assert_rel_close("state", pool, ht_all, tol_for(torch.bfloat16, "ht"))


@pytest.mark.parametrize("use_idx", [True, False], ids=["indices", "no_indices"])
def test_decode_cuda_graph_replay_equals_eager(path, use_idx):
    B, H, HV, K, V = 4, 2, 4, 128, 128
    inp = make_inputs(B, 1, H, HV, K, V, dtype=torch.bfloat16, device="cuda")
    q, k, v, g, eta = inp.args()
    n_slots = B + 2 if use_idx else B
    pool0 = _pool(n_slots, HV, K, V, torch.float32)
    idx = _slots(B, n_slots, 1) if use_idx else None
    # eager: two steps
    pool_e = pool0.clone()
    o_e1 = kla_tl.kla_decode(q, k, v, g, eta, pool_e, state_indices=idx, normalize_q=True).clone()
    o_e2 = kla_tl.kla_decode(q, k, v, g, eta, pool_e, state_indices=idx, normalize_q=True).clone()
    # graph: capture one step (the kernel is already compiled), replay twice
    out = nan_poison_(torch.empty(B, 1, HV, V, dtype=torch.bfloat16, device="cuda"))
    pool_g = pool0.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kla_tl.kla_decode(q, k, v, g, eta, pool_g, state_indices=idx, normalize_q=True, out=out)
    assert torch.equal(pool_g, pool0), "capture must not run the kernel"
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, o_e1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, o_e2) and torch.equal(pool_g, pool_e)


def test_decode_rejects_a_non_contiguous_pool(path):
    inp = make_inputs(2, 1, 2, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
    wide = _pool(2, 2, 64, 128, torch.float32)
    pool = wide[..., :64]
    with pytest.raises(ValueError, match="state"):
        kla_tl.kla_decode(*inp.args(), pool)


def test_decode_addresses_pool_slots_past_2_31_elements(path):
    """bf16 pool of 4100 slots x 32 x 128 x 128 (2.15e9 elements, 4.3 GB): slot 4099 starts past 2**31 elements."""
    HV, K, V = 32, 128, 128
    n_slots = 4100
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    pool = torch.zeros(n_slots, HV, K, V, dtype=torch.bfloat16, device="cuda")
    assert pool.numel() > 2**31
    idx = torch.tensor([4099, -1, 3], dtype=torch.int32, device="cuda")
    live = idx[idx >= 0].long()
    pool[live] = _pool(2, HV, K, V, torch.bfloat16)
    inp = make_inputs(3, 1, 16, HV, K, V, dtype=torch.bfloat16, device="cuda")
    q, k, v, g, eta = inp.args()
    ref_pool = pool[live].to(torch.float64)
    rows = (idx >= 0).nonzero().flatten()
    o_ref = kla_decode_reference(*(x[rows].to(torch.float64) for x in (q, k, v, g, eta)), ref_pool,
                                 normalize_q=True)
    o = kla_tl.kla_decode(q, k, v, g, eta, pool, state_indices=idx, normalize_q=True)
    torch.cuda.synchronize()
    assert_rel_close("o", o[rows], o_ref, tol_for(torch.bfloat16, "o"))
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert_rel_close("state", pool[live], ref_pool, POOL_BF16_TOL)
    pool[live] = 0
    assert not pool.view(n_slots, -1).any(dim=1).any(), "a slot outside state_indices was written"
    del pool
    torch.cuda.empty_cache()


def _candidate_cases():
    from kla_tl.kernels.recurrent import DECODE_CANDIDATES
    return [(sdt, name, sch) for sdt, cands in DECODE_CANDIDATES.items() for name, sch, _ in cands]


@pytest.mark.parametrize("case", _candidate_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_decode_candidate_schedules_match_fp64_reference(path, case):
    """Every schedule tools/gpu_decode.py --schedules times, launched directly (the key of its sweep: H = 16,
    HV = 32, K = V = 128), on shuffled slots with a padding row."""
    from kla_tl.kernels.recurrent import DECODE_SPEC
    from kla_tl.kernels.registry import target_for

    sdt, _, sch = case
    B, H, HV, K, V = 5, 16, 32, 128, 128
    pool_dtype = getattr(torch, sdt)
    key = {"H": H, "HV": HV, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "state_dtype": sdt,
           "use_indices": True, "normalize_q": True}
    arch = "sm_90a" if path == "native" and torch.cuda.get_device_capability()[0] == 9 else "sm_80"
    target, configs = target_for(arch, run_on_hopper=torch.cuda.get_device_capability()[0] == 9)
    fn = rec._Launch(DECODE_SPEC.build(arch, key, sch, target_arch=target["arch"], pass_configs=configs),
                     sch, "test", arch, key).fn
    inp = make_inputs(B, 1, H, HV, K, V, dtype=torch.bfloat16, device="cuda")
    q, k, v, g, eta = inp.args()
    pool = _pool(B + 2, HV, K, V, pool_dtype)
    idx = _slots(B, B + 2, 1)
    ref_pool = pool.to(torch.float64)
    before = pool.clone()
    o_ref = kla_decode_reference(*(x.to(torch.float64) for x in (q, k, v, g, eta)), ref_pool, state_indices=idx,
                                 normalize_q=True)
    o = nan_poison_(torch.empty(B, 1, HV, V, dtype=torch.bfloat16, device="cuda"))
    fn(q, k, v, g.float().contiguous(), eta.float().contiguous(), pool, idx, o, K ** -0.5, 1e-6)
    torch.cuda.synchronize()
    live = idx >= 0
    slots = idx[live].long()
    assert_rel_close("o", o[live], o_ref[live], tol_for(torch.bfloat16, "o"))
    assert torch.equal(o[~live], torch.zeros_like(o[~live])), "padding rows must output exact zeros"
    assert_rel_close("state", pool[slots], ref_pool[slots], _pool_tol(torch.bfloat16, pool_dtype))
    untouched = torch.ones(B + 2, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("kernel", ["decode", "fused_recurrent"])
def test_bench_hook_cases_run_and_pass_their_check(path, kernel):
    """KernelSpec.bench (what ``kla-tl autotune`` times): every case of the first example key runs the default
    schedule and its check accepts the result, as autotune's phase 2 does (one launch, then check)."""
    from kla_tl.kernels.recurrent import DECODE_SPEC, FUSED_RECURRENT_SPEC
    from kla_tl.kernels.registry import target_for

    spec = DECODE_SPEC if kernel == "decode" else FUSED_RECURRENT_SPEC
    hopper = torch.cuda.get_device_capability()[0] == 9
    arch = "sm_90a" if path == "native" and hopper else "sm_80"
    target, configs = target_for(arch, run_on_hopper=hopper)
    key = spec.example_keys[0]
    built = spec.build(arch, key, spec.default(arch, key), target_arch=target["arch"], pass_configs=configs)
    cases = spec.bench(arch, key)
    assert cases and len({c.label for c in cases}) == len(cases)
    for case in cases:
        inputs = case.make_inputs(0)
        out = case.run(built, inputs)
        torch.cuda.synchronize()
        assert case.check(inputs, out) is None, case.label
        case.run(built, inputs)                       # a second launch (decode: on the updated pool) still checks
        assert case.check(inputs, case.run(built, inputs)) is None, case.label
        del inputs
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- fused recurrent


def _run_fused(inp, *, normalize_q=True, output_final_state=True):
    q = inp.q
    prob, _ = check_inputs("test", *inp.args(), normalize_q=normalize_q, **inp.kwargs())
    assert rec.recurrent_refusal(prob, q.device, needs_grad=False) is None, "the fused kernel must serve this case"
    before = inp.clone()
    o, ht = kla_tl.fused_recurrent_kla(*inp.args(), normalize_q=normalize_q, output_final_state=output_final_state,
                                       **inp.kwargs())
    torch.cuda.synchronize()
    for name in ("q", "k", "v", "g", "eta", "initial_state"):
        if getattr(inp, name) is not None:
            assert torch.equal(getattr(inp, name), getattr(before, name)), f"the call modified the caller's {name}"
    ref = inp.to(torch.float64)
    o_ref, ht_ref = chunk_kla_reference(*ref.args(), normalize_q=normalize_q, output_final_state=True,
                                        **ref.kwargs())
    assert o.dtype == q.dtype and torch.isfinite(o).all(), "o has non-finite entries (unwritten or overflow)"
    assert_rel_close("o", o, o_ref, tol_for(q.dtype, "o"))
    if output_final_state:
        assert ht.dtype == torch.float32 and torch.isfinite(ht).all()
        assert_rel_close("ht", ht, ht_ref, tol_for(q.dtype, "ht"))
    else:
        assert ht is None
    return o, ht, ht_ref


@pytest.mark.parametrize("T", [1, 2, 7, 64])
def test_fused_recurrent_matches_chunk_reference(path, T):
    inp = make_inputs(2, T, 2, 4, 128, 128, dtype=torch.bfloat16, device="cuda", with_h0=True)
    _run_fused(inp)


@pytest.mark.parametrize("dims", [(64, 64), (96, 192), (256, 256)], ids=lambda d: f"K{d[0]}_V{d[1]}")
def test_fused_recurrent_head_dims(path, dims):
    K, V = dims
    inp = make_inputs(2, 20, 2, 2, K, V, dtype=torch.bfloat16, device="cuda", with_h0=True)
    _run_fused(inp, normalize_q=False)


def test_fused_recurrent_without_initial_or_final_state(path):
    inp = make_inputs(3, 9, 2, 4, 128, 128, dtype=torch.bfloat16, device="cuda")
    _run_fused(inp, output_final_state=False)
    _run_fused(make_inputs(3, 9, 2, 4, 128, 128, dtype=torch.float32, device="cuda"))


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
def test_fused_recurrent_varlen_with_empty_sequences(path, with_h0):
    cu = [0, 0, 3, 3, 20, 37, 38, 38]   # empty first/middle/last, lengths 3, 17 (crosses a 16-token refill), 1
    inp = make_inputs(1, cu[-1], 2, 4, 128, 128, dtype=torch.bfloat16, device="cuda", with_h0=with_h0,
                      cu_seqlens=cu, cu_dtype=torch.int64)
    _, ht, _ = _run_fused(inp)
    for i in range(len(cu) - 1):
        if cu[i] == cu[i + 1]:
            want = inp.initial_state[i] if with_h0 else torch.zeros_like(ht[i])
            assert torch.equal(ht[i], want), f"empty sequence {i}: final state must equal the initial state"


def test_fused_recurrent_with_grad_falls_back_with_a_warning(path):
    inp = make_inputs(1, 4, 2, 2, 64, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    prob, _ = check_inputs("test", *inp.args())
    assert "no backward kernel" in rec.recurrent_refusal(prob, inp.q.device, needs_grad=True)
    with pytest.warns(RuntimeWarning, match="no backward kernel"):
        o, _ = kla_tl.fused_recurrent_kla(*inp.args())
    o.float().sum().backward()
    assert inp.q.grad is not None


# ----------------------------------------------------------------------------------------------- cache warming


def _warm_keys():
    """(kernel, key) of every launch above, as the launchers build them."""
    from kla_tl.conventions import Problem

    keys = []
    for B, H, HV, K, V, dt, pdt, nq, use_idx, _ in DECODE_CASES + [
            (1, 2, 4, 128, 128, torch.bfloat16, torch.float32, True, False, 0),
            (1, 2, 2, 64, 64, torch.bfloat16, torch.float32, False, False, 0),
            (1, 16, 32, 128, 128, torch.bfloat16, torch.bfloat16, True, True, 0)]:
        prob = Problem(B=B, T=1, H=H, HV=HV, K=K, V=V, N=B, dtype=dt, is_varlen=False, use_h0=True, normalize_q=nq)
        keys.append(("decode", rec.decode_key(prob, dtype=dt, gate_dtype=torch.float32, state_dtype=pdt,
                                              use_indices=use_idx, normalize_q=nq)))
    for H, HV, K, V, dt, nq, h0, ht, varlen in [
            (2, 4, 128, 128, torch.bfloat16, True, True, True, False),
            (2, 2, 64, 64, torch.bfloat16, False, True, True, False),
            (2, 2, 96, 192, torch.bfloat16, False, True, True, False),
            (2, 2, 256, 256, torch.bfloat16, False, True, True, False),
            (2, 4, 128, 128, torch.bfloat16, True, False, False, False),
            (2, 4, 128, 128, torch.float32, True, False, True, False),
            (2, 4, 128, 128, torch.bfloat16, True, True, True, True),
            (2, 4, 128, 128, torch.bfloat16, True, False, True, True)]:
        prob = Problem(B=1, T=8, H=H, HV=HV, K=K, V=V, N=1, dtype=dt, is_varlen=varlen, use_h0=h0, normalize_q=nq)
        keys.append(("fused_recurrent", rec.fused_key(prob, dtype=dt, gate_dtype=torch.float32, use_h0=h0,
                                                      store_ht=ht, normalize_q=nq)))
    return keys


def warm_cache() -> int:
    """Compile every kernel of this file (default schedules, and the candidate schedules) for sm_90a and the
    Ampere-on-Hopper path."""
    import time

    from kla_tl.kernels.recurrent import DECODE_SPEC, FUSED_RECURRENT_SPEC
    from kla_tl.kernels.registry import target_for

    t0 = time.time()
    keys = _warm_keys()
    for arch, on_hopper in (("sm_90a", False), ("sm_80", True)):
        target, configs = target_for(arch, run_on_hopper=on_hopper)
        for name, key in keys:
            spec = DECODE_SPEC if name == "decode" else FUSED_RECURRENT_SPEC
            spec.build(arch, key, spec.default(arch, key), target_arch=target["arch"], pass_configs=configs)
        for sdt, _, sch in _candidate_cases():
            key = {"H": 16, "HV": 32, "K": 128, "V": 128, "dtype": "bfloat16", "gate_dtype": "float32",
                   "state_dtype": sdt, "use_indices": True, "normalize_q": True}
            DECODE_SPEC.build(arch, key, sch, target_arch=target["arch"], pass_configs=configs)
        for spec in (DECODE_SPEC, FUSED_RECURRENT_SPEC):      # the bench-hook test builds the example keys
            for key in spec.example_keys:
                spec.build(arch, key, spec.default(arch, key), target_arch=target["arch"], pass_configs=configs)
    print(f"built the kernels in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(warm_cache())
