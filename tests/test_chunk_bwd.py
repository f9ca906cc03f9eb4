"""CPU tests of the chunk-parallel torch backward (kla_tl/chunk_bwd.py) against the per-chunk loop oracle.

In float64 every gradient of ``chunk_kla_torch_bwd`` must equal ``chunk_kla_reference_bwd`` (itself checked against
torch autograd in test_reference_bwd.py) on fresh random inputs: T in {1, 63, 64, 65, 200} (one token, partial and
whole chunks, several chunks), varlen with empty and one-token sequences of unequal chunk counts, GVA, initial state,
final-state gradient, q normalization on/off, custom scale, chunk sizes 16 and 64, adversarial keys (zero rows, norms
1e-3 / 1e3 / mixed) and gates (0, -30, below the -100 floor, -inf). In float32 the gradients must be within the float32
gradient tolerance of the float64 oracle. Also: the chunk plan's step-major order, and NaN-poisoned allocations.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for
from kla_tl.chunk_bwd import chunk_kla_torch_bwd, plan_chunks
from kla_tl.reference_bwd import chunk_kla_reference_bwd

F32, F64 = torch.float32, torch.float64
TOL = tol_for(F64, "grad")
KEYS = ("dq", "dk", "dv", "dg", "deta", "dh0")


def _cotangents(x, with_dht, seed, dtype=None):
    """do [B, T, HV, V] and dht [N, HV, K, V] (or None), drawn in float64 and cast to ``dtype`` (default q's)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, HV, V = x.v.shape
    N = B if x.cu_seqlens is None else x.cu_seqlens.numel() - 1
    do = torch.randn(B, T, HV, V, generator=gen, dtype=F64)
    dht = torch.randn(N, HV, x.q.shape[-1], V, generator=gen, dtype=F64) if with_dht else None
    dt = dtype or x.q.dtype
    return do.to(dt), (None if dht is None else dht.to(F64 if dt == F64 else F32))


def _both(x, do, dht, **kw):
    ref = chunk_kla_reference_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state, cu_seqlens=x.cu_seqlens,
                                  **kw)
    got = chunk_kla_torch_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, **kw)
    return got, ref


def _check(x, *, with_dht=True, seed=0, **kw):
    do, dht = _cotangents(x, with_dht, seed)
    got, ref = _both(x, do, dht, **kw)
    for key in KEYS:
        if ref[key] is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == ref[key].dtype, key
        assert_rel_close(f"{key} (seed {x.seed})", got[key], ref[key], TOL)
    return got, ref, dht


# ---------------------------------------------------------------------------------------------------------------
# dense batches
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda t: f"T{t}")
def test_dense_plain(T):
    # no initial state, no dht, no q norm, no GVA
    x = make_inputs(2, T, 2, 2, 8, 6, F64)
    _check(x, with_dht=False)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda t: f"T{t}")
def test_dense_h0_dht_qnorm_gva(T):
    x = make_inputs(2, T, 2, 4, 8, 6, F64, with_h0=True)
    _check(x, normalize_q=True)


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("with_h0,with_dht,normalize_q", [(True, False, False), (False, True, True),
                                                          (True, True, False)], ids=["h0", "dht-qnorm", "h0-dht"])
def test_dense_flags_and_chunk_sizes(chunk, with_h0, with_dht, normalize_q):
    x = make_inputs(3, 100, 1, 3, 8, 6, F64, with_h0=with_h0)
    _check(x, with_dht=with_dht, normalize_q=normalize_q, chunk_size=chunk)


def test_dense_custom_scale_and_eps():
    x = make_inputs(2, 130, 2, 4, 8, 6, F64, with_h0=True)
    _check(x, scale=0.7, eps=1e-3, normalize_q=True)


def test_empty_sequence_axis():
    # T = 0: nothing runs, dh0 = dht, every other gradient is empty
    x = make_inputs(2, 0, 1, 2, 8, 6, F64, with_h0=True)
    got, _, dht = _check(x)
    assert torch.equal(got["dh0"], dht)


# ---------------------------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------------------------

#: empty, 1 token, empty, 130 (3 chunks of 64), empty, 64 (exactly one), 1, 65 (one full + one token), 17
CU = [0, 0, 1, 1, 131, 131, 195, 196, 261, 278]


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("with_h0,with_dht,normalize_q", [(False, False, False), (True, True, True)],
                         ids=["bare", "h0-dht-qnorm"])
def test_varlen_empty_and_single(chunk, with_h0, with_dht, normalize_q):
    x = make_inputs(1, CU[-1], 2, 4, 8, 6, F64, with_h0=with_h0, cu_seqlens=CU)
    got, _, dht = _check(x, with_dht=with_dht, normalize_q=normalize_q, chunk_size=chunk)
    if with_h0 and with_dht:
        for i in (0, 2, 4):  # an empty sequence passes its state through unchanged
            assert torch.equal(got["dh0"][i], dht[i])


def test_varlen_equals_dense_batch():
    T = 150
    x = make_inputs(2, T, 1, 2, 8, 6, F64, with_h0=True)
    do, dht = _cotangents(x, True, 3)
    dense = chunk_kla_torch_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state)
    pack = lambda t: t.reshape(1, 2 * T, *t.shape[2:])
    cu = torch.tensor([0, T, 2 * T], dtype=torch.int32)
    var = chunk_kla_torch_bwd(*(pack(t) for t in x.args()), pack(do), dht=dht, initial_state=x.initial_state,
                              cu_seqlens=cu)
    for key in ("dq", "dk", "dv", "dg", "deta"):
        assert_rel_close(key, var[key], pack(dense[key]), TOL)
    assert_rel_close("dh0", var["dh0"], dense["dh0"], TOL)


def test_plan_is_step_major_longest_first():
    # lengths 0, 130, 1, 65 -> chunk counts 0, 3, 1, 2; sorted ranks: seq 1 (3), seq 3 (2), seq 2 (1), seq 0 (0)
    plan = plan_chunks(1, 196, [0, 0, 130, 131, 196], 64, "cpu")
    assert plan.order.tolist() == [1, 3, 2, 0]
    assert plan.steps == ((0, 3), (3, 2), (5, 1))
    assert plan.NC == 6
    starts = plan.tok[:, 0].tolist()
    assert starts == [0, 131, 130, 64, 195, 128]          # step 0: seqs 1, 3, 2; step 1: seqs 1, 3; step 2: seq 1
    assert plan.valid.sum().item() == 196
    assert plan.last.tolist() == [5, 4, 2]


# ---------------------------------------------------------------------------------------------------------------
# adversarial keys and gates
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["zero_key", "norm_1e-3", "norm_1e3", "mixed_norms", "gate0", "gate-30",
                                  "gate-1e4", "gate-inf"])
def test_adversarial(case):
    T = 200
    key_norm = {"norm_1e-3": 1e-3, "norm_1e3": 1e3, "mixed_norms": (1e-3, 1e3)}.get(case)
    x = make_inputs(1, T, 2, 4, 8, 6, F64, with_h0=True, key_norm=key_norm)
    if case == "zero_key":
        x.k[0, [0, 17, 63, 64, 127, 199]] = 0.0     # first / last row of a chunk, inside, the last token
    if case == "gate0":
        x.g.zero_()
    if case == "gate-30":
        x.g.fill_(-30.0)
        x.g[0, 5:20] = 0.0                          # mixed with zero gates
        x.g[0, 100:150] = 0.0
    if case in ("gate-1e4", "gate-inf"):           # below the -100 floor: one head, then all heads of a token
        val = -1e4 if case == "gate-1e4" else -float("inf")
        x.g[0, [0, 3, 64, 70, 199], 1] = val
        x.g[0, 90] = val
    got, _, _ = _check(x, normalize_q=True)
    for key in KEYS:
        assert torch.isfinite(got[key]).all(), key
    if case == "gate-inf":
        assert (got["dg"][0, 90] == 0).all()         # d/dg of exp(g) at g = -inf


# ---------------------------------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["randn", "mixed_norms", "gate-floor-run"])
def test_float32_against_float64_oracle(case):
    # float32 arithmetic vs the float64 oracle. "gate-floor-run": 40 tokens at the floor then ordinary gates in one
    # chunk; the chunk-local float32 cumsum (as in the kernels) puts ~|gamma| * 2^-24 ~ 2.4e-4 of absolute error into
    # gamma_i - gamma_j (measured ~3e-5 relative on the gradients; the loop oracle's exact segment sums give ~2e-7).
    key_norm = (1e-3, 1e3) if case == "mixed_norms" else None
    x64 = make_inputs(2, 200, 2, 4, 16, 12, F64, with_h0=True, key_norm=key_norm)
    if case == "gate-floor-run":
        x64.g[:, :40] = -float("inf")
    x32 = x64.to(F32)
    do, dht = _cotangents(x64, True, 5)
    ref = chunk_kla_reference_bwd(*x64.args(), do, dht=dht, initial_state=x64.initial_state, normalize_q=True)
    got = chunk_kla_torch_bwd(*x32.args(), do.to(F32), dht=dht.to(F32), initial_state=x32.initial_state,
                              normalize_q=True)
    for key in KEYS:
        assert got[key].dtype == F32, key
        assert_rel_close(f"{key} (seed {x64.seed})", got[key], ref[key], tol_for(F32, "grad"))


def test_bfloat16_inputs_return_bfloat16():
    x = make_inputs(1, 70, 1, 2, 8, 6, torch.bfloat16, with_h0=True)
    do, dht = _cotangents(x, True, 6)
    got, ref = _both(x, do, dht)
    for key in KEYS:
        assert got[key].dtype == ref[key].dtype, key
        assert_rel_close(key, got[key], ref[key], tol_for(torch.bfloat16, "grad"))


def test_every_output_written(nan_poison):
    # buffers from torch.empty* start as NaN: a slot the sweeps forget would show up
    x = make_inputs(1, CU[-1], 2, 4, 8, 6, F64, with_h0=True, cu_seqlens=CU)
    _check(x, normalize_q=True)


def test_rejects_bad_chunk_size():
    x = make_inputs(1, 4, 1, 1, 4, 4, F64)
    with pytest.raises(ValueError):
        chunk_kla_torch_bwd(*x.args(), torch.zeros(1, 4, 1, 4, dtype=F64), chunk_size=0)


def test_backward_kernel_refusals_name_the_reason(monkeypatch):
    """``chunk_bwd_refusal``: the device off CUDA; on a device the kernels serve, float16 and K above the backward
    kernels' limit (those calls run this torch backward, with a warning)."""
    from kla_tl import chunk as CH, dispatch
    from kla_tl.conventions import Problem

    def prob(K=128, dtype=torch.bfloat16):
        return Problem(B=1, T=64, H=2, HV=2, K=K, V=128, N=1, dtype=dtype, is_varlen=False, use_h0=False,
                       normalize_q=True)

    assert "device cpu" in CH.chunk_bwd_refusal(prob(), torch.device("cpu"))
    monkeypatch.setattr(dispatch, "common_refusal", lambda p, d: None)       # as if on a GPU the kernels serve
    assert CH.chunk_bwd_refusal(prob(), torch.device("cpu")) is None
    assert "float16" in CH.chunk_bwd_refusal(prob(dtype=torch.float16), torch.device("cpu"))
    assert f"K <= {CH.BWD_MAX_K}" in CH.chunk_bwd_refusal(prob(K=256), torch.device("cpu"))
