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
from kla_tl.conventions import check_decode_inputs, check_inputs, check_recurrent_inputs
from kla_tl.reference import chunk_kla_reference, fused_recurrent_kla_reference, kla_decode_reference, naive_kla

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
    """Every hand-picked schedule of DECODE_CANDIDATES, launched directly (the key they were picked at: H = 16,
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


#: (kernel, index of the example key) of the bench-hook test: the first key of each family, and the two serving keys
#: of fused_recurrent (verify with a read-only pool, in-place bf16 pool).
BENCH_KEYS = [("decode", 0), ("fused_recurrent", 0), ("fused_recurrent", 3), ("fused_recurrent", 4)]


@pytest.mark.parametrize("kernel,key_index", BENCH_KEYS, ids=[f"{k}-key{i}" for k, i in BENCH_KEYS])
def test_bench_hook_cases_run_and_pass_their_check(path, kernel, key_index):
    """KernelSpec.bench (what ``kla-tl autotune`` times): every case of an example key runs the default schedule
    and its check accepts the result, as autotune's phase 2 does (one launch, then check)."""
    from kla_tl.kernels.recurrent import DECODE_SPEC, FUSED_RECURRENT_SPEC
    from kla_tl.kernels.registry import target_for

    spec = DECODE_SPEC if kernel == "decode" else FUSED_RECURRENT_SPEC
    hopper = torch.cuda.get_device_capability()[0] == 9
    arch = "sm_90a" if path == "native" and hopper else "sm_80"
    target, configs = target_for(arch, run_on_hopper=hopper)
    key = spec.example_keys[key_index]
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


# ------------------------------------------------------------------------- fused recurrent: serving options


#: Tolerance of per-token / pool states against the float64 reference: the issue's gates, 5e-3 for an fp32 state and
#: 1e-2 for a bf16 one (one bf16 rounding on store, unit roundoff 2**-9, on top of the fp32-state error).
STATE_TOL = {torch.float32: 5e-3, torch.bfloat16: POOL_BF16_TOL}

#: (B, T, cu_seqlens, H, HV, K, V, q/k/v dtype, pool dtype or None (no state_indices), inplace_final_state,
#: intermediate_states dtype or None, padding sequences); each guards a path.
SERVING_CASES = [
    (1, 17, [0, 4, 4, 9, 13, 17], 2, 4, 128, 128, torch.bfloat16, torch.float32, False, torch.float32, 1),
    #   ^ spec-decode verify: read-only fp32 pool, fp32 per-token states, an empty sequence, a padding sequence
    (1, 17, [0, 4, 4, 9, 13, 17], 2, 4, 128, 128, torch.bfloat16, torch.bfloat16, True, torch.bfloat16, 1),
    #   ^ serving: bf16 pool updated in place, bf16 per-token states
    (4, 8, None, 2, 4, 128, 128, torch.bfloat16, torch.float32, True, None, 2),
    #   ^ dense rows, in place, no per-token states, two padding rows
    (1, 45, [0, 33, 40, 45], 2, 2, 96, 192, torch.bfloat16, torch.bfloat16, True, torch.float32, 1),
    #   ^ published KLA 0.4B head dims; a 33-token sequence crosses two 16-token refills
    (2, 5, None, 1, 2, 256, 256, torch.bfloat16, torch.float32, False, torch.bfloat16, 0),
    #   ^ largest heads, no padding
    (3, 6, None, 2, 4, 64, 64, torch.float32, None, False, torch.float32, 0),
    #   ^ per-token states without a pool (plain initial_state), fp32 inputs
]


def _serving_id(c):
    B, T, cu, H, HV, K, V, dt, pdt, inplace, idt, pad = c
    return ("varlen" if cu else f"B{B}_T{T}") + f"-K{K}-V{V}-{str(dt)[6:]}" + (
        f"-pool_{str(pdt)[6:]}" if pdt else "-no_pool") + ("-inplace" if inplace else "") + (
        f"-states_{str(idt)[6:]}" if idt else "") + (f"-pad{pad}" if pad else "")


def _seq_rows(cu, B, T):
    """(first, end) token row of every sequence on the token-major axis."""
    return [(b * T, (b + 1) * T) for b in range(B)] if cu is None else list(zip(cu[:-1], cu[1:]))


def _run_serving(inp, pool, idx, *, inplace, inter_dtype, normalize_q=True, output_final_state=True):
    """fused_recurrent_kla with the serving options against the float64 reference; checks every buffer and
    returns (o, ht, inter)."""
    q = inp.q
    B, T, HV, V = inp.v.shape
    K = q.shape[-1]
    use_idx = idx is not None
    h0 = pool if use_idx else inp.initial_state
    inter = None
    if inter_dtype is not None:
        inter = nan_poison_(torch.empty(B * T, HV, K, V, dtype=inter_dtype, device="cuda"))
    prob, _ = check_recurrent_inputs("test", *inp.args(), normalize_q=normalize_q, initial_state=h0,
                                     cu_seqlens=inp.cu_seqlens, state_indices=idx, inplace_final_state=inplace,
                                     intermediate_states=inter)
    assert rec.recurrent_refusal(prob, q.device, needs_grad=False, pool_dtype=pool.dtype if use_idx else None,
                                 inter_dtype=inter_dtype) is None, "the fused kernel must serve this case"
    before = inp.clone()
    pool_before = pool.clone() if use_idx else None
    ref = inp.to(torch.float64)
    ref_pool = pool.to(torch.float64) if use_idx else None
    ref_inter = torch.full((B * T, HV, K, V), float("nan"), dtype=torch.float64, device="cuda")
    o_ref, ht_ref = fused_recurrent_kla_reference(*ref.args(), normalize_q=normalize_q, output_final_state=True,
                                                  initial_state=ref_pool if use_idx else ref.initial_state,
                                                  cu_seqlens=ref.cu_seqlens, state_indices=idx,
                                                  inplace_final_state=inplace, intermediate_states=ref_inter)
    o, ht = kla_tl.fused_recurrent_kla(*inp.args(), normalize_q=normalize_q, initial_state=h0,
                                       output_final_state=output_final_state, cu_seqlens=inp.cu_seqlens,
                                       state_indices=idx, inplace_final_state=inplace, intermediate_states=inter)
    torch.cuda.synchronize()
    for name in ("q", "k", "v", "g", "eta", "initial_state"):
        if getattr(inp, name) is not None:
            assert torch.equal(getattr(inp, name), getattr(before, name)), f"the call modified the caller's {name}"
    N = len(_seq_rows(inp.cu_seqlens.tolist() if inp.cu_seqlens is not None else None, B, T))
    live = idx >= 0 if use_idx else torch.ones(N, dtype=torch.bool, device="cuda")
    tok = torch.zeros(B * T, dtype=torch.bool, device="cuda")
    for n, (r0, r1) in enumerate(_seq_rows(inp.cu_seqlens.tolist() if inp.cu_seqlens is not None else None, B, T)):
        tok[r0:r1] = bool(live[n])
    o_rows, o_ref_rows = o.reshape(B * T, HV, V), o_ref.reshape(B * T, HV, V)
    assert o.dtype == q.dtype and torch.isfinite(o).all(), "o has non-finite entries (unwritten or overflow)"
    assert torch.equal(o_rows[~tok], torch.zeros_like(o_rows[~tok])), "padding sequences must output exact zeros"
    assert_rel_close("o", o_rows[tok], o_ref_rows[tok], tol_for(q.dtype, "o"))
    if output_final_state:
        assert ht.dtype == torch.float32 and torch.isfinite(ht).all()
        assert torch.equal(ht[~live], torch.zeros_like(ht[~live])), "a padding sequence's final state must be zeros"
        assert_rel_close("ht", ht, ht_ref, tol_for(q.dtype, "ht"))
    else:
        assert ht is None
    if inter is not None:
        assert torch.isnan(inter[~tok]).all(), "a padding sequence's per-token state rows were written"
        assert torch.isfinite(inter[tok]).all(), "a live token's state row is unwritten or non-finite"
        assert_rel_close("intermediate_states", inter[tok], ref_inter[tok], STATE_TOL[inter_dtype])
    if use_idx:
        slots = idx[live].long()
        others = torch.ones(pool.shape[0], dtype=torch.bool, device="cuda")
        others[slots] = False
        if inplace:
            assert torch.isfinite(pool[slots]).all()
            assert_rel_close("pool", pool[slots], ref_pool[slots], STATE_TOL[pool.dtype])
            assert torch.equal(pool[others], pool_before[others]), "a slot outside state_indices (or padded) changed"
        else:
            assert torch.equal(pool, pool_before), "inplace_final_state=False must leave the pool bit-for-bit untouched"
    return o, ht, inter


def _shuffled_slots(N, n_slots, n_pad):
    """Distinct shuffled slots for N sequences; sequence N - 2 (one in the middle), then N - 1, ... are padding
    (-1), so that the cases' long sequences and empty ones stay live."""
    idx = torch.randperm(n_slots)[:N].to(torch.int32)
    for i in range(n_pad):
        idx[(N - 2 + i) % N] = -1
    return idx.cuda()


@pytest.mark.parametrize("case", SERVING_CASES, ids=_serving_id)
def test_fused_serving_options_match_fp64_reference(path, case):
    B, T, cu, H, HV, K, V, dtype, pool_dtype, inplace, inter_dtype, n_pad = case
    inp = make_inputs(B, T, H, HV, K, V, dtype=dtype, device="cuda", cu_seqlens=cu, with_h0=pool_dtype is None)
    N = B if cu is None else len(cu) - 1
    pool = idx = None
    if pool_dtype is not None:
        pool = _pool(N + 3, HV, K, V, pool_dtype)
        idx = _shuffled_slots(N, N + 3, n_pad)
    _run_serving(inp, pool, idx, inplace=inplace, inter_dtype=inter_dtype)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["pool_fp32", "pool_bf16"])
def test_fused_intermediate_states_equal_step_by_step_kla_decode(path, pool_dtype):
    """T tokens in one fused call (pool left untouched, per-token states in the pool's dtype) == T kla_decode steps
    on a copy of the pool: after step t, the decoded slots equal row t of the states; the outputs agree too; a
    padding row stays zero and untouched in both. Then the same fused call in place leaves the pool as the T
    decode steps did."""
    B, T, H, HV, K, V = 3, 6, 2, 4, 128, 128
    inp = make_inputs(B, T, H, HV, K, V, dtype=torch.bfloat16, device="cuda")
    pool = _pool(B + 2, HV, K, V, pool_dtype)
    idx = _shuffled_slots(B, B + 2, 1)
    live = idx >= 0
    slots = idx[live].long()
    o_f, _, inter = _run_serving(inp, pool, idx, inplace=False, inter_dtype=pool_dtype)
    dec = pool.clone()
    q, k, v, g, eta = inp.args()
    steps = inter.view(B, T, HV, K, V)
    for t in range(T):
        o_t = kla_tl.kla_decode(*(x[:, t:t + 1] for x in (q, k, v, g, eta)), dec, state_indices=idx, normalize_q=True)
        torch.cuda.synchronize()
        assert_rel_close(f"o[t={t}]", o_f[live, t], o_t[live, 0], 2 * tol_for(torch.bfloat16, "o"))
        assert torch.equal(o_t[~live], torch.zeros_like(o_t[~live]))
        assert_rel_close(f"state after token {t}", steps[live, t], dec[slots], STATE_TOL[pool_dtype])
    pool_inplace = pool.clone()
    kla_tl.fused_recurrent_kla(q, k, v, g, eta, normalize_q=True, initial_state=pool_inplace, state_indices=idx,
                               inplace_final_state=True)
    torch.cuda.synchronize()
    assert_rel_close("pool after T tokens", pool_inplace[slots], dec[slots], STATE_TOL[pool_dtype])
    others = torch.ones(B + 2, dtype=torch.bool, device="cuda")
    others[slots] = False
    assert torch.equal(pool_inplace[others], pool[others]) and torch.equal(dec[others], pool[others])


def test_fused_verify_then_rollback_to_accepted_tokens_continues_the_sequence(path):
    """Speculative decoding: verify 5 draft tokens per sequence (pool untouched, per-token states kept), accept 3 /
    5 / 1, copy the state after the last accepted token into each slot, decode one more token with kla_decode:
    equals the float64 reference over the accepted tokens plus the new one."""
    H, HV, K, V = 2, 4, 128, 128
    cu, accepted = [0, 5, 10, 15], [3, 5, 1]
    inp = make_inputs(1, 15, H, HV, K, V, dtype=torch.bfloat16, device="cuda", cu_seqlens=cu)
    nxt = make_inputs(3, 1, H, HV, K, V, dtype=torch.bfloat16, device="cuda")
    pool = _pool(6, HV, K, V, torch.float32)
    start = pool.clone()
    idx = _shuffled_slots(3, 6, 0)
    _, _, inter = _run_serving(inp, pool, idx, inplace=False, inter_dtype=torch.float32, output_final_state=False)
    for n, m in enumerate(accepted):
        pool[idx[n].long()] = inter[cu[n] + m - 1]
    o = kla_tl.kla_decode(*nxt.args(), pool, state_indices=idx, normalize_q=True)
    torch.cuda.synchronize()
    x64, n64 = inp.to(torch.float64), nxt.to(torch.float64)
    for n, m in enumerate(accepted):
        seq = [torch.cat([x[0, cu[n]:cu[n] + m], y[n]])[None] for x, y in zip(x64.args(), n64.args())]
        o_ref, ht_ref = naive_kla(*seq, normalize_q=True, output_final_state=True,
                                  initial_state=start[idx[n].long()][None].double())
        assert_rel_close(f"o of sequence {n}", o[n, 0], o_ref[0, -1], tol_for(torch.bfloat16, "o"))
        assert_rel_close(f"state of sequence {n}", pool[idx[n].long()], ht_ref[0], tol_for(torch.bfloat16, "ht"))


def test_fused_serving_all_padding_and_all_empty_sequences_touch_nothing(path):
    """Every sequence padding: zeros out, pool and per-token rows untouched (kernel launch). Every sequence empty
    (no token at all: no launch): the final state is the slot's state (zeros for padding), nothing is written."""
    H, HV, K, V = 2, 4, 128, 128
    cu = [0, 3, 7]
    inp = make_inputs(1, 7, H, HV, K, V, dtype=torch.bfloat16, device="cuda", cu_seqlens=cu)
    pool = _pool(4, HV, K, V, torch.bfloat16)
    idx = torch.tensor([-1, -1], dtype=torch.int32, device="cuda")
    _run_serving(inp, pool, idx, inplace=True, inter_dtype=torch.bfloat16)
    empty = make_inputs(1, 0, H, HV, K, V, dtype=torch.bfloat16, device="cuda", cu_seqlens=[0, 0, 0])
    before = pool.clone()
    idx = torch.tensor([2, -1], dtype=torch.int32, device="cuda")
    o, ht = kla_tl.fused_recurrent_kla(*empty.args(), initial_state=pool, state_indices=idx,
                                       cu_seqlens=empty.cu_seqlens, inplace_final_state=True, output_final_state=True,
                                       intermediate_states=torch.empty(0, HV, K, V, device="cuda"))
    torch.cuda.synchronize()
    assert o.shape == (1, 0, HV, V) and torch.equal(pool, before)
    assert torch.equal(ht[0], before[2].float()) and torch.equal(ht[1], torch.zeros_like(ht[1]))


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
    # the serving tests: (H, HV, K, V, dtype, varlen, store_ht, pool dtype or None, inplace, per-token dtype or None)
    f32, bf16 = torch.float32, torch.bfloat16
    serving = [(c[3], c[4], c[5], c[6], c[7], c[2] is not None, True, c[8], c[9], c[10]) for c in SERVING_CASES]
    serving += [(2, 4, 128, 128, bf16, False, True, pdt, False, pdt) for pdt in (f32, bf16)]     # decode equality
    serving += [(2, 4, 128, 128, bf16, False, False, pdt, True, None) for pdt in (f32, bf16)]
    serving += [(2, 4, 128, 128, bf16, True, False, f32, False, f32)]                              # rollback
    for H, HV, K, V, dt, varlen, ht, pdt, inplace, idt in serving:
        prob = Problem(B=1, T=8, H=H, HV=HV, K=K, V=V, N=1, dtype=dt, is_varlen=varlen, use_h0=True, normalize_q=True)
        keys.append(("fused_recurrent", rec.fused_key(
            prob, dtype=dt, gate_dtype=torch.float32, use_h0=True, store_ht=ht, normalize_q=True,
            state_dtype=pdt or f32, use_indices=pdt is not None, is_inplace=inplace, store_inter=idt is not None,
            inter_dtype=idt or f32)))
    return keys


def _schedules_for(spec, arch: str, key: dict) -> list:
    """The default schedule, and the tuned one of the shipped H100 file when it has the key's bucket (what the
    kernels load on an H100)."""
    import json
    import pathlib

    out = [spec.default(arch, key)]
    path = pathlib.Path(__file__).resolve().parents[1] / "schedules" / "h100.json"
    if arch == "sm_90a" and path.exists():
        entry = json.loads(path.read_text()).get("kernels", {}).get(spec.name, {}).get(spec.bucket(key))
        if entry and entry["schedule"] not in out:
            out.append(entry["schedule"])
    return out


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
            for sch in _schedules_for(spec, arch, key):
                spec.build(arch, key, sch, target_arch=target["arch"], pass_configs=configs)
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
