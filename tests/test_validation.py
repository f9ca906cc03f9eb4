"""CPU tests of input validation at the public boundary (:mod:`kla_tl.conventions`).

Each row of ``BAD`` breaks one argument of one entry point and states the exception type (TypeError for a wrong
type or dtype, ValueError for a wrong shape or value) and a regex the message must match; every message must also
start with the entry point's name. Wrong devices are exercised with ``meta`` tensors (shapes without storage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from kla_tl import chunk_kla, fused_recurrent_kla, kla_decode

B, T, H, HV, K, V = 2, 4, 2, 4, 8, 6
ENTRY = {"chunk_kla": chunk_kla, "fused_recurrent_kla": fused_recurrent_kla, "kla_decode": kla_decode}


def _base(entry: str) -> dict:
    """A valid call of ``entry`` as a dict of keyword arguments (the positional ones included by name)."""
    gen = torch.Generator().manual_seed(0)
    t = 1 if entry == "kla_decode" else T
    d = dict(q=torch.randn(B, t, H, K, generator=gen), k=torch.randn(B, t, H, K, generator=gen),
             v=torch.randn(B, t, HV, V, generator=gen), g=-torch.rand(B, t, HV, generator=gen),
             eta=torch.rand(B, t, HV, generator=gen))
    if entry == "kla_decode":
        d["state"] = torch.zeros(B, HV, K, V)
    return d


def _call(entry: str, d: dict):
    d = dict(d)
    pos = [d.pop(n) for n in ("q", "k", "v", "g", "eta")]
    if entry == "kla_decode":
        pos.append(d.pop("state"))
    return ENTRY[entry](*pos, **d)


@dataclass(frozen=True)
class Bad:
    id: str
    entry: str
    mutate: Callable[[dict], None]
    exc: type
    match: str


def _set(**kw):
    return lambda d: d.update(kw)


def _with(name, fn):
    """Replace argument ``name`` by ``fn(current value)``."""
    return lambda d: d.update({name: fn(d[name])})


def _varlen(cu, dtype=torch.int32, *, raw=False, **extra):
    """Turn the call into a packed one (B = 1, T = 4) with cu_seqlens ``cu``: a list becomes a ``dtype`` tensor
    unless ``raw``; a tensor is passed as is."""
    def f(d):
        for n in ("q", "k", "v", "g", "eta"):
            d[n] = d[n][:1]
        d["cu_seqlens"] = torch.tensor(cu, dtype=dtype) if isinstance(cu, list) and not raw else cu
        d.update(extra)
    return f


def _idx(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype)


def _pool(**kw):
    """A valid fused_recurrent_kla pool call (a 5-slot float32 pool as initial_state, state_indices (3, 0)), then
    ``kw`` on top."""
    return _set(**{"initial_state": torch.zeros(5, HV, K, V), "state_indices": _idx(3, 0), **kw})


BAD = [
    # ---- ranks -------------------------------------------------------------------------------------------------
    Bad("q-3d", "chunk_kla", _with("q", lambda x: x[0]), ValueError, r"q must have 4 dims \[B, T, H, K\]"),
    Bad("k-5d", "chunk_kla", _with("k", lambda x: x[None]), ValueError, r"k must have 4 dims"),
    Bad("v-3d", "fused_recurrent_kla", _with("v", lambda x: x[..., 0]), ValueError, r"v must have 4 dims \[B, T, HV, V\]"),
    Bad("g-4d", "chunk_kla", _with("g", lambda x: x[..., None]), ValueError, r"g must have 3 dims \[B, T, HV\]"),
    Bad("eta-2d", "kla_decode", _with("eta", lambda x: x[:, 0]), ValueError, r"eta must have 3 dims"),
    # ---- types and dtypes --------------------------------------------------------------------------------------
    Bad("q-numpy", "chunk_kla", _with("q", lambda x: x.numpy()), TypeError, r"q must be a torch\.Tensor.*ndarray"),
    Bad("k-list", "kla_decode", _with("k", lambda x: x.tolist()), TypeError, r"k must be a torch\.Tensor.*list"),
    Bad("q-int32", "chunk_kla", _with("q", lambda x: x.to(torch.int32)), TypeError, r"q must have dtype in .*int32"),
    Bad("q-bool", "kla_decode", _with("q", lambda x: x > 0), TypeError, r"q must have dtype in .*bool"),
    Bad("k-fp64-vs-q-fp32", "chunk_kla", _with("k", lambda x: x.double()), TypeError,
        r"k must have the same dtype as q \(float32\), got float64"),
    Bad("v-bf16-vs-q-fp32", "fused_recurrent_kla", _with("v", lambda x: x.bfloat16()), TypeError,
        r"v must have the same dtype as q"),
    Bad("g-int64", "chunk_kla", _with("g", lambda x: x.long()), TypeError, r"g must be a floating tensor.*int64"),
    Bad("eta-int32", "kla_decode", _with("eta", lambda x: x.int()), TypeError, r"eta must be a floating tensor"),
    # ---- shapes ------------------------------------------------------------------------------------------------
    Bad("k-other-K", "chunk_kla", _with("k", lambda x: x[..., :4]), ValueError, r"k must have the shape of q"),
    Bad("k-other-H", "fused_recurrent_kla", _with("k", lambda x: x[:, :, :1]), ValueError, r"k must have the shape of q"),
    Bad("v-B-mismatch", "chunk_kla", _with("v", lambda x: x[:1]), ValueError, r"v must match q in B and T"),
    Bad("v-T-mismatch", "chunk_kla", _with("v", lambda x: x[:, :3]), ValueError, r"v must match q in B and T"),
    Bad("HV-not-multiple-of-H", "chunk_kla", lambda d: d.update(v=d["v"][:, :, :3], g=d["g"][..., :3],
                                                                eta=d["eta"][..., :3]),
        ValueError, r"HV=3 \(v\.shape\[2\]\) must be a multiple of q/k heads H=2"),
    Bad("HV-less-than-H", "kla_decode",
        lambda d: d.update(v=d["v"][:, :, :1], g=d["g"][..., :1], eta=d["eta"][..., :1], state=d["state"][:, :1]),
        ValueError, r"HV=1 .* must be a multiple of q/k heads H=2"),
    Bad("zero-K", "chunk_kla", lambda d: d.update(q=d["q"][..., :0], k=d["k"][..., :0]), ValueError,
        r"head counts and head dims must be positive.*K=0"),
    Bad("g-wrong-HV", "chunk_kla", _with("g", lambda x: x[..., :2]), ValueError, r"g must have shape \[B, T, HV\]"),
    Bad("eta-T-mismatch", "fused_recurrent_kla", _with("eta", lambda x: x[:, :2]), ValueError,
        r"eta must have shape \[B, T, HV\]"),
    Bad("g-B-mismatch", "kla_decode", _with("g", lambda x: x[:1]), ValueError, r"g must have shape"),
    # ---- scalar options ----------------------------------------------------------------------------------------
    Bad("scale-str", "chunk_kla", _set(scale="0.1"), TypeError, r"scale must be a float or None, got str"),
    Bad("scale-bool", "kla_decode", _set(scale=True), TypeError, r"scale must be a float or None, got bool"),
    Bad("scale-tensor", "fused_recurrent_kla", _set(scale=torch.tensor(0.1)), TypeError, r"scale must be a float"),
    Bad("eps-zero", "chunk_kla", _set(eps=0.0), ValueError, r"eps must be a positive"),
    Bad("eps-negative", "kla_decode", _set(eps=-1e-6), ValueError, r"eps must be a positive"),
    Bad("eps-nan", "fused_recurrent_kla", _set(eps=float("nan")), ValueError, r"eps must be a positive"),
    Bad("eps-inf", "chunk_kla", _set(eps=float("inf")), ValueError, r"eps must be a positive finite float"),
    Bad("eps-str", "chunk_kla", _set(eps="1e-6"), TypeError, r"eps must be a positive finite float, got '1e-6'"),
    Bad("normalize_q-int", "chunk_kla", _set(normalize_q=1), TypeError, r"normalize_q must be a bool, got int"),
    Bad("normalize_q-None", "kla_decode", _set(normalize_q=None), TypeError, r"normalize_q must be a bool"),
    Bad("normalize_q-str", "fused_recurrent_kla", _set(normalize_q="yes"), TypeError, r"normalize_q must be a bool"),
    # ---- cu_seqlens --------------------------------------------------------------------------------------------
    Bad("cu-not-starting-at-0", "chunk_kla", _varlen([1, 2, 4]), ValueError, r"cu_seqlens must start at 0"),
    Bad("cu-decreasing", "chunk_kla", _varlen([0, 3, 2, 4]), ValueError,
        r"cu_seqlens must be non-decreasing.*cu_seqlens\[1\]=3 > cu_seqlens\[2\]=2"),
    Bad("cu-not-ending-at-T", "fused_recurrent_kla", _varlen([0, 2, 3]), ValueError,
        r"cu_seqlens must end at T=4 .*got cu_seqlens\[-1\]=3"),
    Bad("cu-past-T", "chunk_kla", _varlen([0, 2, 5], dtype=torch.int64), ValueError, r"cu_seqlens must end at T=4"),
    Bad("cu-2d", "chunk_kla", _varlen(torch.tensor([[0, 2, 4]], dtype=torch.int32)), ValueError,
        r"cu_seqlens must be 1-D"),
    Bad("cu-one-entry", "chunk_kla", _varlen([0]), ValueError, r"cu_seqlens must be 1-D with at least 2 entries"),
    Bad("cu-float", "fused_recurrent_kla", _varlen([0.0, 2.0, 4.0], dtype=torch.float32), TypeError,
        r"cu_seqlens must have dtype in \(int32, int64\), got float32"),
    Bad("cu-int16", "chunk_kla", _varlen([0, 2, 4], dtype=torch.int16), TypeError, r"cu_seqlens must have dtype"),
    Bad("cu-list", "chunk_kla", _varlen([0, 2, 4], raw=True), TypeError,
        r"cu_seqlens must be a 1-D integer torch\.Tensor.*list"),
    Bad("cu-with-B2", "chunk_kla", _set(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError,
        r"with cu_seqlens the batch size B \(q\.shape\[0\]\) must be 1, got B=2"),
    # ---- initial_state -----------------------------------------------------------------------------------------
    Bad("h0-wrong-N", "chunk_kla", _set(initial_state=torch.zeros(3, HV, K, V)), ValueError,
        r"initial_state must have shape \[N, HV, K, V\]=\(2, 4, 8, 6\) \(N = B\)"),
    Bad("h0-V-major", "fused_recurrent_kla", _set(initial_state=torch.zeros(B, HV, V, K)), ValueError,
        r"initial_state must have shape"),
    Bad("h0-3d", "chunk_kla", _set(initial_state=torch.zeros(HV, K, V)), ValueError, r"initial_state must have 4 dims"),
    Bad("h0-int", "chunk_kla", _set(initial_state=torch.zeros(B, HV, K, V, dtype=torch.int32)), TypeError,
        r"initial_state must be floating"),
    Bad("h0-numpy", "chunk_kla", _set(initial_state=np.zeros((B, HV, K, V), np.float32)), TypeError,
        r"initial_state must be a torch\.Tensor"),
    Bad("h0-varlen-wrong-N", "chunk_kla", _varlen([0, 1, 4], initial_state=torch.zeros(1, HV, K, V)), ValueError,
        r"initial_state must have shape \[N, HV, K, V\]=\(2, 4, 8, 6\) \(N = len\(cu_seqlens\)-1\)"),
    # ---- decode: T, state pool, state_indices, out -------------------------------------------------------------
    Bad("decode-T2", "kla_decode", lambda d: d.update({n: torch.cat([d[n], d[n]], 1)
                                                       for n in ("q", "k", "v", "g", "eta")}),
        ValueError, r"q\.shape\[1\] \(T\) must be 1, got T=2"),
    Bad("state-3d", "kla_decode", _with("state", lambda x: x[0]), ValueError, r"state must have 4 dims"),
    Bad("state-wrong-K", "kla_decode", _with("state", lambda x: x[:, :, :4]), ValueError,
        r"state must have shape \[N_slots, HV, K, V\] with \(HV, K, V\)=\(4, 8, 6\)"),
    Bad("state-V-major", "kla_decode", _set(state=torch.zeros(B, HV, V, K)), ValueError, r"state must have shape"),
    Bad("state-fp16", "kla_decode", _with("state", lambda x: x.half()), TypeError,
        r"state must have dtype in \(float32, bfloat16, float64\), got float16"),
    Bad("state-int", "kla_decode", _with("state", lambda x: x.int()), TypeError, r"state must have dtype"),
    Bad("state-None", "kla_decode", _set(state=None), TypeError, r"state must be a torch\.Tensor"),
    Bad("pool-slots-ne-B-without-indices", "kla_decode", _set(state=torch.zeros(5, HV, K, V)), ValueError,
        r"without state_indices the state pool must have B=2 slots, got state\.shape\[0\]=5"),
    Bad("state_indices-int64", "kla_decode", _set(state_indices=_idx(0, 1, dtype=torch.int64)), TypeError,
        r"state_indices must have dtype int32, got int64"),
    Bad("state_indices-float", "kla_decode", _set(state_indices=_idx(0, 1, dtype=torch.float32)), TypeError,
        r"state_indices must have dtype int32"),
    Bad("state_indices-2d", "kla_decode", _set(state_indices=_idx(0, 1).reshape(2, 1)), ValueError,
        r"state_indices must have shape \[B\]=\(2,\)"),
    Bad("state_indices-too-short", "kla_decode", _set(state_indices=_idx(0)), ValueError,
        r"state_indices must have shape \[B\]"),
    Bad("state_indices-out-of-range", "kla_decode", _set(state_indices=_idx(0, 2)), ValueError,
        r"state_indices must be in \[-1, N_slots=2\), got values in \[0, 2\]"),
    Bad("state_indices-below-minus-1", "kla_decode", _set(state_indices=_idx(-2, 0)), ValueError,
        r"state_indices must be in \[-1, N_slots=2\)"),
    Bad("state_indices-list", "kla_decode", _set(state_indices=[0, 1]), TypeError,
        r"state_indices must be an int32 torch\.Tensor"),
    Bad("out-wrong-shape", "kla_decode", _set(out=torch.zeros(B, HV, V)), ValueError,
        r"out must have shape \[B, 1, HV, V\]=\(2, 1, 4, 6\)"),
    Bad("out-wrong-dtype", "kla_decode", _set(out=torch.zeros(B, 1, HV, V, dtype=torch.bfloat16)), TypeError,
        r"out must have q's dtype float32, got bfloat16"),
    Bad("out-numpy", "kla_decode", _set(out=np.zeros((B, 1, HV, V), np.float32)), TypeError,
        r"out must be a torch\.Tensor"),
    # ---- devices (meta tensors: shapes without storage) --------------------------------------------------------
    Bad("k-on-meta", "chunk_kla", _with("k", lambda x: x.to("meta")), ValueError,
        r"all tensors must be on one device; q is on cpu, k is on meta"),
    Bad("eta-on-meta", "kla_decode", _with("eta", lambda x: x.to("meta")), ValueError, r"eta is on meta"),
    Bad("h0-on-meta", "chunk_kla", _set(initial_state=torch.zeros(B, HV, K, V, device="meta")), ValueError,
        r"initial_state is on meta"),
    Bad("cu-on-meta", "fused_recurrent_kla", _varlen(torch.tensor([0, 2, 4], dtype=torch.int32, device="meta")),
        ValueError, r"cu_seqlens is on meta"),
    Bad("state-on-meta", "kla_decode", _with("state", lambda x: x.to("meta")), ValueError, r"state is on meta"),
    Bad("state_indices-on-meta", "kla_decode", _set(state_indices=_idx(0, 1).to("meta")), ValueError,
        r"state_indices is on meta"),
    Bad("out-on-meta", "kla_decode", _set(out=torch.zeros(B, 1, HV, V, device="meta")), ValueError, r"out is on meta"),
    # ---- fused_recurrent serving options: state pool, state_indices, inplace_final_state, intermediate_states ----
    Bad("state_indices-without-pool", "fused_recurrent_kla", _set(state_indices=_idx(0, 1)), ValueError,
        r"state_indices addresses the slots of a state pool: pass the pool as initial_state .*got initial_state=None"),
    Bad("state_indices-int64", "fused_recurrent_kla", _pool(state_indices=_idx(0, 1, dtype=torch.int64)), TypeError,
        r"state_indices must have dtype int32, got int64"),
    Bad("state_indices-list", "fused_recurrent_kla", _pool(state_indices=[0, 1]), TypeError,
        r"state_indices must be an int32 torch\.Tensor \[N\], got list"),
    Bad("state_indices-not-N", "fused_recurrent_kla", _pool(state_indices=_idx(0)), ValueError,
        r"state_indices must have shape \[N\]=\(2,\), got \(1,\)"),
    Bad("state_indices-varlen-not-N", "fused_recurrent_kla",
        _varlen([0, 1, 2, 4], initial_state=torch.zeros(5, HV, K, V), state_indices=_idx(0, 1)), ValueError,
        r"state_indices must have shape \[N\]=\(3,\), got \(2,\)"),
    Bad("state_indices-out-of-range", "fused_recurrent_kla", _pool(state_indices=_idx(0, 5)), ValueError,
        r"state_indices must be in \[-1, N_slots=5\), got values in \[0, 5\]"),
    Bad("state_indices-below-minus-1", "fused_recurrent_kla", _pool(state_indices=_idx(-3, 0)), ValueError,
        r"state_indices must be in \[-1, N_slots=5\)"),
    Bad("state_indices-on-meta", "fused_recurrent_kla", _pool(state_indices=_idx(0, 1).to("meta")), ValueError,
        r"all tensors must be on one device; q is on cpu, state_indices is on meta"),
    Bad("pool-fp16", "fused_recurrent_kla", _pool(initial_state=torch.zeros(5, HV, K, V, dtype=torch.float16)),
        TypeError, r"initial_state must have dtype in \(float32, bfloat16, float64\), got float16"),
    Bad("pool-wrong-K", "fused_recurrent_kla", _pool(initial_state=torch.zeros(5, HV, 4, V)), ValueError,
        r"initial_state must have shape \[N_slots, HV, K, V\] with \(HV, K, V\)=\(4, 8, 6\), got \(5, 4, 4, 6\)"),
    Bad("pool-3d", "fused_recurrent_kla", _pool(initial_state=torch.zeros(HV, K, V)), ValueError,
        r"initial_state must have 4 dims \[N_slots, HV, K, V\]"),
    Bad("pool-on-meta", "fused_recurrent_kla", _pool(initial_state=torch.zeros(5, HV, K, V, device="meta")),
        ValueError, r"initial_state is on meta"),
    Bad("inplace-without-state_indices", "fused_recurrent_kla",
        _set(initial_state=torch.zeros(B, HV, K, V), inplace_final_state=True), ValueError,
        r"inplace_final_state=True needs state_indices .*got state_indices=None"),
    Bad("inplace-int", "fused_recurrent_kla", _pool(inplace_final_state=1), TypeError,
        r"inplace_final_state must be a bool, got int"),
    Bad("inplace-None", "fused_recurrent_kla", _set(inplace_final_state=None), TypeError,
        r"inplace_final_state must be a bool, got NoneType"),
    Bad("inplace-repeated-slot", "fused_recurrent_kla", _pool(state_indices=_idx(3, 3), inplace_final_state=True),
        ValueError, r"state_indices must not repeat a slot when inplace_final_state=True .*got slot\(s\) \[3\]"),
    Bad("inplace-non-contiguous-pool", "fused_recurrent_kla",
        _pool(initial_state=torch.zeros(5, HV, V, K).transpose(2, 3), inplace_final_state=True), ValueError,
        r"initial_state must be contiguous with inplace_final_state=True .*strides"),
    Bad("intermediate-wrong-rows", "fused_recurrent_kla", _set(intermediate_states=torch.zeros(B * T - 1, HV, K, V)),
        ValueError, r"intermediate_states must have shape \[B \* T, HV, K, V\]=\(8, 4, 8, 6\) .*got \(7, 4, 8, 6\)"),
    Bad("intermediate-per-sequence", "fused_recurrent_kla", _set(intermediate_states=torch.zeros(B, T, HV, K, V)),
        ValueError, r"intermediate_states must have 4 dims \[B \* T, HV, K, V\], got shape \(2, 4, 4, 8, 6\)"),
    Bad("intermediate-varlen-rows", "fused_recurrent_kla",
        _varlen([0, 1, 4], intermediate_states=torch.zeros(B * T, HV, K, V)), ValueError,
        r"intermediate_states must have shape \[B \* T, HV, K, V\]=\(4, 4, 8, 6\)"),
    Bad("intermediate-V-major", "fused_recurrent_kla", _set(intermediate_states=torch.zeros(B * T, HV, V, K)),
        ValueError, r"intermediate_states must have shape"),
    Bad("intermediate-fp16", "fused_recurrent_kla",
        _set(intermediate_states=torch.zeros(B * T, HV, K, V, dtype=torch.float16)), TypeError,
        r"intermediate_states must have dtype in \(float32, bfloat16, float64\), got float16"),
    Bad("intermediate-numpy", "fused_recurrent_kla", _set(intermediate_states=np.zeros((B * T, HV, K, V))),
        TypeError, r"intermediate_states must be a torch\.Tensor \[B \* T, HV, K, V\], got ndarray"),
    Bad("intermediate-non-contiguous", "fused_recurrent_kla",
        _set(intermediate_states=torch.zeros(B * T, HV, V, K).transpose(2, 3)), ValueError,
        r"intermediate_states must be contiguous \(it is written in place\)"),
    Bad("intermediate-on-meta", "fused_recurrent_kla",
        _set(intermediate_states=torch.zeros(B * T, HV, K, V, device="meta")), ValueError,
        r"intermediate_states is on meta"),
]


@pytest.mark.parametrize("bad", BAD, ids=[f"{b.entry}-{b.id}" for b in BAD])
def test_rejects_bad_input_and_names_the_argument(bad: Bad):
    d = _base(bad.entry)
    bad.mutate(d)
    with pytest.raises(bad.exc, match=bad.match) as info:
        _call(bad.entry, d)
    assert type(info.value) is bad.exc, f"expected exactly {bad.exc.__name__}, got {type(info.value).__name__}"
    assert str(info.value).startswith(f"{bad.entry}: "), f"message does not name the entry point: {info.value}"


def test_ids_are_unique():
    ids = [f"{b.entry}-{b.id}" for b in BAD]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("entry", list(ENTRY))
def test_base_inputs_are_accepted(entry):
    # guards the table: every row breaks a call that is otherwise valid
    out = _call(entry, _base(entry))
    assert out is not None


def test_valid_edge_inputs_are_accepted():
    d = _base("chunk_kla")
    # varlen with empty sequences and int64 offsets, fp64 state for fp32 inputs, float64 gates
    _varlen([0, 0, 4, 4], dtype=torch.int64, initial_state=torch.zeros(3, HV, K, V, dtype=torch.float64))(d)
    d["g"], d["eta"] = d["g"].double(), d["eta"].double()
    o, _ = _call("chunk_kla", d)
    assert o.shape == (1, T, HV, V)
    d = _base("kla_decode")
    d.update(state=torch.zeros(5, HV, K, V, dtype=torch.bfloat16), state_indices=_idx(-1, 4), scale=1, eps=1)
    assert _call("kla_decode", d).shape == (B, 1, HV, V)
    # fused_recurrent on a bf16 pool: padding sequences, -1 repeated with inplace_final_state, a read-only pool that
    # is not contiguous, per-token states of an empty varlen sequence, an empty pool of all-padding sequences
    d = _base("fused_recurrent_kla")
    d.update(initial_state=torch.zeros(5, HV, K, V, dtype=torch.bfloat16), state_indices=_idx(-1, -1),
             inplace_final_state=True, intermediate_states=torch.zeros(B * T, HV, K, V, dtype=torch.bfloat16))
    o, ht = _call("fused_recurrent_kla", d)
    assert o.shape == (B, T, HV, V) and ht is None
    d = _base("fused_recurrent_kla")
    d.update(initial_state=torch.zeros(5, HV, V, K).transpose(2, 3), state_indices=_idx(4, 4),
             output_final_state=True)
    assert _call("fused_recurrent_kla", d)[1].shape == (B, HV, K, V)
    d = _base("fused_recurrent_kla")
    _varlen([0, 0, 4], initial_state=torch.zeros(0, HV, K, V), state_indices=_idx(-1, -1),
            intermediate_states=torch.zeros(T, HV, K, V, dtype=torch.float64))(d)
    assert _call("fused_recurrent_kla", d)[0].shape == (1, T, HV, V)


def test_validation_reads_no_tensor_values():
    # meta tensors have shapes but no values: validation of a dense call must pass on them
    from kla_tl.conventions import check_decode_inputs, check_inputs

    d = {n: x.to("meta") for n, x in _base("chunk_kla").items()}
    prob, cu = check_inputs("chunk_kla", *(d[n] for n in ("q", "k", "v", "g", "eta")),
                            initial_state=torch.zeros(B, HV, K, V, device="meta"))
    assert cu is None and (prob.B, prob.T, prob.H, prob.HV, prob.K, prob.V, prob.N) == (B, T, H, HV, K, V, B)
    d = {n: x.to("meta") for n, x in _base("kla_decode").items()}
    prob = check_decode_inputs("kla_decode", *(d[n] for n in ("q", "k", "v", "g", "eta", "state")),
                               out=torch.empty(B, 1, HV, V, device="meta"))
    assert prob.T == 1 and prob.group == HV // H


def test_pool_base_inputs_are_accepted():
    # guards the fused_recurrent_kla rows built on _pool(): the pool call itself is valid
    d = _base("fused_recurrent_kla")
    _pool(inplace_final_state=True, intermediate_states=torch.zeros(B * T, HV, K, V))(d)
    o, ht = _call("fused_recurrent_kla", d)
    assert o.shape == (B, T, HV, V) and ht is None


def test_serving_validation_reads_no_cuda_tensor_values():
    # meta tensors stand in for CUDA ones: a pool call with every serving option validates on shapes alone
    from kla_tl.conventions import check_recurrent_inputs

    d = {n: x.to("meta") for n, x in _base("fused_recurrent_kla").items()}
    prob, cu = check_recurrent_inputs("fused_recurrent_kla", *(d[n] for n in ("q", "k", "v", "g", "eta")),
                                      initial_state=torch.zeros(7, HV, K, V, device="meta"),
                                      state_indices=torch.zeros(B, dtype=torch.int32, device="meta"),
                                      inplace_final_state=True,
                                      intermediate_states=torch.zeros(B * T, HV, K, V, device="meta"))
    assert cu is None and prob.use_h0 and (prob.N, prob.K, prob.V) == (B, K, V)


# ---- cu_seqlens read once per tensor and version ----------------------------------------------------------------


@pytest.fixture
def host_reads(monkeypatch):
    """Count the reads of cu_seqlens values to the host (each a device-to-host copy for a CUDA tensor)."""
    from kla_tl import conventions

    reads = []
    read = conventions._read_host
    monkeypatch.setattr(conventions, "_read_host", lambda t: reads.append(t) or read(t))
    monkeypatch.setattr(conventions, "_CU_HOST", [])
    return reads


def test_cu_seqlens_is_read_once_per_tensor_and_version(host_reads):
    """The same tensor at the same version is read once; a write through it (version bump), or another tensor with
    the same values, is read again; the cached values are still validated against each call's T."""
    from kla_tl.conventions import check_cu_seqlens

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert check_cu_seqlens("f", cu, 7, 1) == [0, 3, 7]
    assert check_cu_seqlens("f", cu, 7, 1) == [0, 3, 7]
    assert len(host_reads) == 1
    with pytest.raises(ValueError, match=r"f: cu_seqlens must end at T=8"):
        check_cu_seqlens("f", cu, 8, 1)
    assert len(host_reads) == 1
    cu[1] = 5                                                   # in place: a new version, read again
    assert check_cu_seqlens("f", cu, 7, 1) == [0, 5, 7]
    assert len(host_reads) == 2
    cu[1] = 9                                                   # and an invalid in-place write is caught
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing"):
        check_cu_seqlens("f", cu, 7, 1)
    other = torch.tensor([0, 3, 7], dtype=torch.int64)
    assert check_cu_seqlens("f", other, 7, 1) == [0, 3, 7]
    assert len(host_reads) == 4
    out = check_cu_seqlens("f", other, 7, 1)
    out.append(99)                                              # the caller's list is its own
    assert check_cu_seqlens("f", other, 7, 1) == [0, 3, 7] and len(host_reads) == 4


def test_inference_tensors_are_always_read(host_reads):
    """Inference tensors have no version counter, so an in-place write could not be seen: never cached."""
    from kla_tl.conventions import check_cu_seqlens

    with torch.inference_mode():
        cu = torch.tensor([0, 2, 4])
    for _ in range(2):
        assert check_cu_seqlens("f", cu, 4, 1) == [0, 2, 4]
    assert len(host_reads) == 2


def test_no_cached_values_while_a_cuda_graph_is_captured(host_reads, monkeypatch):
    """During a CUDA graph capture every call reads cu_seqlens (and so fails as before, since a device-to-host copy
    is not allowed while capturing): a graph must not keep host tables of values the caller may overwrite."""
    from kla_tl import conventions

    cu = torch.tensor([0, 2, 4])
    assert conventions.check_cu_seqlens("f", cu, 4, 1) == [0, 2, 4]
    monkeypatch.setattr(conventions, "_capturing", lambda t: True)
    assert conventions.check_cu_seqlens("f", cu, 4, 1) == [0, 2, 4]
    assert len(host_reads) == 2


def test_chunk_kla_reads_cu_seqlens_once_per_forward_and_backward(host_reads):
    """chunk_kla's own check, the forward operator and the backward operator share one read of cu_seqlens (on a
    GPU each read waits for the queued kernels, so a second read would stall the backward behind the forward)."""
    d = _base("chunk_kla")
    _varlen([0, 1, 4])(d)
    x = {n: (t.clone().requires_grad_(True) if n in ("q", "k", "v", "g", "eta") else t) for n, t in d.items()}
    o, _ = chunk_kla(**x)
    o.sum().backward()
    assert all(x[n].grad is not None for n in ("q", "k", "v", "g", "eta"))
    assert len(host_reads) == 1, [t.tolist() for t in host_reads]
