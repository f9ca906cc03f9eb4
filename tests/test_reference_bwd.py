"""CPU tests of the hand-written chunkwise backward (KLA.md section 6) against torch autograd.

In float64 every gradient of ``chunk_kla_reference_bwd`` must equal autograd through ``chunk_kla_reference`` (same chunk
size) and through the token recurrence ``naive_kla``: chunk sizes 16/64, T in {1, 63, 65, 130}, initial state and
final-state gradient on/off, q normalization, GVA, varlen with empty and one-token sequences, adversarial keys and gates.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for
from kla_tl.reference import chunk_kla_reference, naive_kla
from kla_tl.reference_bwd import chunk_kla_reference_bwd

F64 = torch.float64
TOL = tol_for(F64, "grad")
NAMES = (("q", "dq"), ("k", "dk"), ("v", "dv"), ("g", "dg"), ("eta", "deta"), ("initial_state", "dh0"))


def _cotangents(o, ht, with_dht, seed):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=F64).to(ht.dtype) if with_dht else None
    return do, dht


def _autograd(fn, x, do, dht, **kw):
    """name -> autograd gradient of <o, do> + <ht, dht> through ``fn`` (x must require grad)."""
    o, ht = fn(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, output_final_state=True, **kw)
    loss = (o * do).sum()
    if dht is not None:
        loss = loss + (ht * dht).sum()
    ts = x.tensors()
    grads = torch.autograd.grad(loss, list(ts.values()), allow_unused=True)
    return {n: (torch.zeros_like(t) if gr is None else gr) for (n, t), gr in zip(ts.items(), grads)}


def _hand(x, do, dht, **kw):
    y = x.to()  # detached copies: the backward must not need autograd
    with torch.inference_mode():
        return chunk_kla_reference_bwd(*y.args(), do, dht=dht, initial_state=y.initial_state,
                                       cu_seqlens=y.cu_seqlens, **kw)


def _check(x, *, chunk, with_dht=False, normalize_q=False, against=("chunk",), seed=0):
    x = x.to(requires_grad=True)
    o, ht = chunk_kla_reference(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens,
                                output_final_state=True, normalize_q=normalize_q, chunk_size=chunk)
    do, dht = _cotangents(o.detach(), ht.detach(), with_dht, seed)
    got = _hand(x, do, dht, normalize_q=normalize_q, chunk_size=chunk)
    if x.initial_state is None:
        assert got["dh0"] is None
    refs = {}
    if "chunk" in against:
        refs["chunk"] = _autograd(chunk_kla_reference, x, do, dht, normalize_q=normalize_q, chunk_size=chunk)
    if "naive" in against:
        refs["naive"] = _autograd(naive_kla, x, do, dht, normalize_q=normalize_q)
    for which, ref in refs.items():
        for name, key in NAMES:
            if name in ref:
                assert got[key].dtype == ref[name].dtype, f"{key} dtype"
                assert_rel_close(f"{key} vs autograd({which})", got[key], ref[name], TOL)
    return got, do, dht


# ---------------------------------------------------------------------------------------------------------------
# dense batches
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 63, 65, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_bwd_plain(chunk, T):
    # no initial state, no dht, no q norm, one value head per q/k head
    x = make_inputs(2, T, 2, 2, 8, 6, F64, seed=10 + T + chunk)
    _check(x, chunk=chunk, seed=T)


@pytest.mark.parametrize("T", [1, 63, 65, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_bwd_h0_dht_qnorm_gva(chunk, T):
    x = make_inputs(2, T, 2, 4, 8, 6, F64, seed=20 + T + chunk, with_h0=True)
    _check(x, chunk=chunk, with_dht=True, normalize_q=True, seed=T + 1)


@pytest.mark.parametrize("with_h0,with_dht,normalize_q", [(True, False, False), (False, True, True),
                                                          (True, True, False)], ids=["h0", "dht-qnorm", "h0-dht"])
def test_bwd_flag_combinations(with_h0, with_dht, normalize_q):
    x = make_inputs(2, 65, 1, 2, 8, 6, F64, seed=31, with_h0=with_h0)
    _check(x, chunk=16, with_dht=with_dht, normalize_q=normalize_q, seed=3)


def test_bwd_equals_autograd_of_recurrence():
    # the hand backward of the chunk form is also the gradient of the definition (token recurrence)
    x = make_inputs(1, 65, 2, 4, 8, 6, F64, seed=41, with_h0=True)
    _check(x, chunk=16, with_dht=True, normalize_q=True, against=("chunk", "naive"), seed=4)


def test_bwd_explicit_scale():
    x = make_inputs(1, 40, 1, 1, 8, 6, F64, seed=43, with_h0=True)
    x = x.to(requires_grad=True)
    o, ht = chunk_kla_reference(*x.args(), initial_state=x.initial_state, output_final_state=True, scale=0.7,
                                chunk_size=16)
    do, dht = _cotangents(o.detach(), ht.detach(), True, 5)
    ref = _autograd(chunk_kla_reference, x, do, dht, scale=0.7, chunk_size=16)
    got = _hand(x, do, dht, scale=0.7, chunk_size=16)
    for name, key in NAMES:
        assert_rel_close(key, got[key], ref[name], TOL)


# ---------------------------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_h0,with_dht", [(False, False), (True, True)], ids=["bare", "h0-dht"])
def test_bwd_varlen_empty_and_single(with_h0, with_dht):
    cu = [0, 0, 1, 1, 18, 18, 53, 54, 70]        # empty, length 1, empty, 17, empty, 35, 1, 16
    x = make_inputs(1, 70, 2, 4, 8, 6, F64, seed=51, with_h0=with_h0, cu_seqlens=cu)
    got, _, dht = _check(x, chunk=16, with_dht=with_dht, normalize_q=True, against=("chunk", "naive"), seed=6)
    if with_h0 and with_dht:
        # an empty sequence passes its state through unchanged: dh0 = dht
        for i in (0, 2, 4):
            assert torch.equal(got["dh0"][i], dht[i])


def test_bwd_varlen_equals_dense_batch():
    # two sequences packed vs the same two as a dense batch
    T = 45
    x = make_inputs(2, T, 1, 2, 8, 6, F64, seed=61, with_h0=True)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(2, T, 2, 6, generator=gen, dtype=F64)
    dht = torch.randn(2, 2, 8, 6, generator=gen, dtype=F64)
    dense = chunk_kla_reference_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state, chunk_size=16)
    pack = lambda t: t.reshape(1, 2 * T, *t.shape[2:])
    cu = torch.tensor([0, T, 2 * T], dtype=torch.int32)
    var = chunk_kla_reference_bwd(*(pack(t) for t in x.args()), pack(do), dht=dht, initial_state=x.initial_state,
                                  cu_seqlens=cu, chunk_size=16)
    for key in ("dq", "dk", "dv", "dg", "deta"):
        assert_rel_close(key, var[key], pack(dense[key]), TOL)
    assert_rel_close("dh0", var["dh0"], dense["dh0"], TOL)


# ---------------------------------------------------------------------------------------------------------------
# adversarial keys and gates
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["zero_key", "norm_1e-3", "norm_1e3", "mixed_norms", "gate0", "gate-30"])
def test_bwd_adversarial(case):
    T = 65
    key_norm = {"norm_1e-3": 1e-3, "norm_1e3": 1e3, "mixed_norms": (1e-3, 1e3)}.get(case)
    x = make_inputs(1, T, 2, 4, 8, 6, F64, seed=71, with_h0=True, key_norm=key_norm)
    if case == "zero_key":
        x.k[0, [0, 17, 40]] = 0.0                # zero key rows (first row of a chunk and inside chunks)
    if case == "gate0":
        x.g.zero_()
    if case == "gate-30":
        x.g.fill_(-30.0)
        x.g[0, 5:20] = 0.0                        # mixed with zero gates
    _check(x, chunk=16, with_dht=True, normalize_q=True, seed=8)


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------

def test_bwd_float32_dtypes_and_accuracy():
    x64 = make_inputs(1, 65, 2, 4, 8, 6, F64, seed=81, with_h0=True)
    x32 = x64.to(torch.float32)
    gen = torch.Generator().manual_seed(9)
    do = torch.randn(1, 65, 4, 6, generator=gen, dtype=F64)
    dht = torch.randn(1, 4, 8, 6, generator=gen, dtype=F64)
    ref = chunk_kla_reference_bwd(*x64.args(), do, dht=dht, initial_state=x64.initial_state, normalize_q=True,
                                  chunk_size=16)
    got = chunk_kla_reference_bwd(*x32.args(), do.float(), dht=dht.float(), initial_state=x32.initial_state,
                                  normalize_q=True, chunk_size=16)
    for key in ("dq", "dk", "dv", "dg", "deta", "dh0"):
        assert got[key].dtype == torch.float32, key
        assert_rel_close(key, got[key], ref[key], tol_for(torch.float32, "grad"))


def test_bwd_rejects_bad_chunk_size():
    x = make_inputs(1, 4, 1, 1, 4, 4, F64, seed=1)
    with pytest.raises(ValueError):
        chunk_kla_reference_bwd(*x.args(), torch.zeros(1, 4, 1, 4, dtype=F64), chunk_size=0)
