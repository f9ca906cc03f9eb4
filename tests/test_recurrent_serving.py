"""CPU tests of the serving options of ``fused_recurrent_kla`` (speculative decoding), as the reference defines them.

``fused_recurrent_kla_reference`` is the CPU path of ``fused_recurrent_kla`` and the oracle of the GPU tests
(tests/test_recurrent_gpu.py) and of the emulated kernel (tests/test_recurrent_emulated.py). Here it is checked in
float64 against the definition (``naive_kla``, ``kla_decode_reference``):

- ``intermediate_states`` row ``b * T + t`` (dense) or ``t`` (packed) is the state after token t;
- ``state_indices`` reads sequence n's initial state from pool slot ``state_indices[n]``; -1 is a padding sequence:
  zeros out, nothing read or written for it;
- ``inplace_final_state=False`` leaves the pool bit-for-bit untouched, True writes the addressed slots only.
"""

import pytest
import torch

from helpers import make_inputs

from kla_tl import fused_recurrent_kla
from kla_tl.reference import fused_recurrent_kla_reference, kla_decode_reference, naive_kla

H, HV, K, V = 2, 4, 8, 6


def _seqs(cu, B, T):
    """(first row, end row) of every sequence on the token-major axis."""
    return [(b * T, (b + 1) * T) for b in range(B)] if cu is None else list(zip(cu[:-1], cu[1:]))


def _idx(*vals):
    return torch.tensor(vals, dtype=torch.int32)


LAYOUTS = [
    pytest.param(None, 3, 5, id="dense"),
    pytest.param([0, 3, 3, 9, 10], 1, 10, id="varlen_with_empty"),
]


def test_without_serving_options_it_is_naive_kla():
    inp = make_inputs(2, 5, H, HV, K, V, dtype=torch.float64, with_h0=True)
    want = naive_kla(*inp.args(), normalize_q=True, output_final_state=True, **inp.kwargs())
    got = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True, **inp.kwargs())
    api = fused_recurrent_kla(*inp.args(), normalize_q=True, output_final_state=True, **inp.kwargs())
    for x in (got, api):
        assert torch.equal(x[0], want[0]) and torch.equal(x[1], want[1])


@pytest.mark.parametrize("cu,B,T", LAYOUTS)
def test_intermediate_states_are_the_state_after_each_token(cu, B, T):
    """Row r of intermediate_states == the final state of the sequence's prefix ending at token r; each sequence's
    last row == its final state; o and the final state are those of the plain call."""
    inp = make_inputs(B, T, H, HV, K, V, dtype=torch.float64, with_h0=True, cu_seqlens=cu)
    inter = torch.full((B * T, HV, K, V), float("nan"), dtype=torch.float64)
    o, ht = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True,
                                          intermediate_states=inter, **inp.kwargs())
    o_want, ht_want = naive_kla(*inp.args(), normalize_q=True, output_final_state=True, **inp.kwargs())
    assert torch.equal(o, o_want) and torch.equal(ht, ht_want)
    assert not torch.isnan(inter).any(), "every token row must be written"
    flat = [x.reshape(B * T, *x.shape[2:]) for x in inp.args()]
    for n, (r0, r1) in enumerate(_seqs(cu, B, T)):
        for r in range(r0, r1):
            _, s = naive_kla(*(x[None, r0:r + 1] for x in flat), normalize_q=True, output_final_state=True,
                             initial_state=inp.initial_state[n:n + 1])
            assert torch.allclose(inter[r], s[0], rtol=1e-12, atol=1e-14), (n, r)
        if r1 > r0:
            assert torch.equal(inter[r1 - 1], ht[n])


def test_intermediate_states_equal_step_by_step_decode():
    """The per-token states of one fused call == the pool after each of T kla_decode_reference steps."""
    B, T = 3, 6
    inp = make_inputs(B, T, H, HV, K, V, dtype=torch.float64, with_h0=True)
    inter = torch.empty(B * T, HV, K, V, dtype=torch.float64)
    fused_recurrent_kla_reference(*inp.args(), normalize_q=True, intermediate_states=inter, **inp.kwargs())
    pool = inp.initial_state.clone()
    for t in range(T):
        kla_decode_reference(*(x[:, t:t + 1] for x in inp.args()), pool, normalize_q=True)
        assert torch.allclose(inter.view(B, T, HV, K, V)[:, t], pool, rtol=1e-12, atol=1e-14), t


def _pool_case(cu, B, T, pool_dtype):
    """Fresh float64 inputs, a pool of N + 3 slots (a copy kept), and N distinct shuffled slot indices."""
    inp = make_inputs(B, T, H, HV, K, V, dtype=torch.float64, cu_seqlens=cu)
    N = B if cu is None else len(cu) - 1
    pool = (0.1 * torch.randn(N + 3, HV, K, V, dtype=torch.float64)).to(pool_dtype)
    return inp, pool, pool.clone(), torch.randperm(N + 3)[:N].to(torch.int32)


@pytest.mark.parametrize("pool_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu,B,T", LAYOUTS)
def test_pool_is_read_through_state_indices_and_left_untouched(cu, B, T, pool_dtype):
    inp, pool, before, idx = _pool_case(cu, B, T, pool_dtype)
    o, ht = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True,
                                          initial_state=pool, state_indices=idx, cu_seqlens=inp.cu_seqlens)
    o_want, ht_want = naive_kla(*inp.args(), normalize_q=True, output_final_state=True,
                                initial_state=pool[idx.long()].double(), cu_seqlens=inp.cu_seqlens)
    assert torch.equal(o, o_want) and torch.equal(ht, ht_want)
    assert torch.equal(pool, before), "inplace_final_state=False must leave the pool bit-for-bit untouched"


@pytest.mark.parametrize("pool_dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("cu,B,T", LAYOUTS)
def test_inplace_final_state_writes_the_addressed_slots_only(cu, B, T, pool_dtype):
    inp, pool, before, idx = _pool_case(cu, B, T, pool_dtype)
    _, ht = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True,
                                          initial_state=pool, state_indices=idx, inplace_final_state=True,
                                          cu_seqlens=inp.cu_seqlens)
    _, ht_want = naive_kla(*inp.args(), normalize_q=True, output_final_state=True,
                           initial_state=before[idx.long()].double(), cu_seqlens=inp.cu_seqlens)
    assert torch.equal(ht, ht_want), "the returned final state is computed from the pool before the update"
    assert torch.equal(pool[idx.long()], ht_want.to(pool_dtype))
    others = torch.ones(pool.shape[0], dtype=torch.bool)
    others[idx.long()] = False
    assert torch.equal(pool[others], before[others])


@pytest.mark.parametrize("cu,B,T", LAYOUTS)
def test_padding_sequences_output_zeros_and_touch_nothing(cu, B, T):
    """Sequence 2 is padding (-1), with NaN inputs: its o rows and final state are zeros, its per-token rows and the
    pool are untouched, and the other sequences equal a call without it."""
    inp = make_inputs(B, T, H, HV, K, V, dtype=torch.float64, cu_seqlens=cu)
    N = B if cu is None else len(cu) - 1
    pad = 2
    r0, r1 = _seqs(cu, B, T)[pad]
    for name in ("q", "k", "v", "g", "eta"):
        getattr(inp, name).view(B * T, -1)[r0:r1] = float("nan")
    pool = 0.1 * torch.randn(N + 1, HV, K, V, dtype=torch.float64)
    idx = torch.arange(N, dtype=torch.int32)
    idx[pad] = -1
    before = pool.clone()
    inter = torch.full((B * T, HV, K, V), float("nan"), dtype=torch.float64)
    o, ht = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True,
                                          initial_state=pool, state_indices=idx, inplace_final_state=True,
                                          intermediate_states=inter, cu_seqlens=inp.cu_seqlens)
    o_rows = o.view(B * T, HV, V)
    assert torch.equal(o_rows[r0:r1], torch.zeros_like(o_rows[r0:r1]))
    assert torch.equal(ht[pad], torch.zeros_like(ht[pad]))
    assert torch.isnan(inter[r0:r1]).all(), "a padding sequence's per-token rows must not be written"
    assert not torch.isnan(inter[:r0]).any() and not torch.isnan(inter[r1:]).any()
    assert torch.equal(pool[N], before[N]) and torch.equal(pool[pad], before[pad])
    live = [n for n in range(N) if n != pad]
    for n in live:
        s0, s1 = _seqs(cu, B, T)[n]
        flat = [x.reshape(B * T, *x.shape[2:]) for x in inp.args()]
        o_n, ht_n = naive_kla(*(x[None, s0:s1] for x in flat), normalize_q=True, output_final_state=True,
                              initial_state=before[n:n + 1])
        assert torch.allclose(o_rows[s0:s1], o_n[0], rtol=1e-12, atol=1e-14)
        assert torch.allclose(pool[n], ht_n[0], rtol=1e-12, atol=1e-14) and torch.equal(ht[n], pool[n])


def test_rollback_to_the_last_accepted_draft_token_continues_the_sequence():
    """Verify 5 draft tokens per sequence without touching the pool, accept 3 and 1, copy the state after the last
    accepted token into the slot, decode one more token: equals the sequence of accepted tokens run in one go."""
    cu, accepted = [0, 5, 10], [3, 1]
    inp = make_inputs(1, 10, H, HV, K, V, dtype=torch.float64, cu_seqlens=cu)
    nxt = make_inputs(2, 1, H, HV, K, V, dtype=torch.float64)
    pool = 0.1 * torch.randn(4, HV, K, V, dtype=torch.float64)
    idx = _idx(3, 0)
    start = pool[idx.long()].clone()
    inter = torch.empty(10, HV, K, V, dtype=torch.float64)
    fused_recurrent_kla_reference(*inp.args(), normalize_q=True, initial_state=pool, state_indices=idx,
                                  intermediate_states=inter, cu_seqlens=inp.cu_seqlens)
    for n, m in enumerate(accepted):
        pool[idx[n]] = inter[cu[n] + m - 1]
    o_next = kla_decode_reference(*nxt.args(), pool, state_indices=idx, normalize_q=True)
    for n, m in enumerate(accepted):
        seq = [torch.cat([x[0, cu[n]:cu[n] + m], y[n]])[None] for x, y in zip(inp.args(), nxt.args())]
        o_want, ht_want = naive_kla(*seq, normalize_q=True, output_final_state=True, initial_state=start[n:n + 1])
        assert torch.allclose(o_next[n, 0], o_want[0, -1], rtol=1e-12, atol=1e-14)
        assert torch.allclose(pool[idx[n]], ht_want[0], rtol=1e-12, atol=1e-14)


def test_bf16_buffers_hold_the_float32_states_rounded_once():
    """Arithmetic stays float32; a bf16 per-token buffer / pool receives each float32 state rounded once."""
    inp = make_inputs(2, 4, H, HV, K, V, dtype=torch.float32)
    pool = (0.1 * torch.randn(3, HV, K, V)).to(torch.bfloat16)
    idx = _idx(2, 0)
    start = pool[idx.long()].float()
    inter = torch.empty(8, HV, K, V, dtype=torch.bfloat16)
    fused_recurrent_kla_reference(*inp.args(), initial_state=pool, state_indices=idx, inplace_final_state=True,
                                  intermediate_states=inter)
    _, ht, states = naive_kla(*inp.args(), initial_state=start, output_final_state=True, return_all_states=True)
    assert torch.equal(inter, states.reshape(8, HV, K, V).to(torch.bfloat16))
    assert torch.equal(pool[idx.long()], ht.to(torch.bfloat16))


def test_public_api_on_cpu_is_the_reference():
    cu = [0, 2, 7]
    a = make_inputs(1, 7, H, HV, K, V, dtype=torch.float32, cu_seqlens=cu)
    pool_a = 0.1 * torch.randn(5, HV, K, V)
    pool_b = pool_a.clone()
    inter_a = torch.full((7, HV, K, V), float("nan"))
    inter_b = inter_a.clone()
    idx = _idx(4, -1)
    kw = dict(normalize_q=True, output_final_state=True, state_indices=idx, inplace_final_state=True,
              cu_seqlens=a.cu_seqlens)
    o_a, ht_a = fused_recurrent_kla(*a.args(), initial_state=pool_a, intermediate_states=inter_a, **kw)
    o_b, ht_b = fused_recurrent_kla_reference(*a.args(), initial_state=pool_b, intermediate_states=inter_b, **kw)
    assert torch.equal(o_a, o_b) and torch.equal(ht_a, ht_b) and torch.equal(pool_a, pool_b)
    assert torch.equal(inter_a.isnan(), inter_b.isnan()) and torch.equal(inter_a[:2], inter_b[:2])


def test_all_tokens_empty_returns_the_initial_states():
    """Varlen with only empty sequences: o is empty, the final state is the slot's (zeros for padding), nothing is
    written."""
    inp = make_inputs(1, 0, H, HV, K, V, dtype=torch.float64, cu_seqlens=[0, 0, 0])
    pool = 0.1 * torch.randn(3, HV, K, V, dtype=torch.float64)
    before = pool.clone()
    o, ht = fused_recurrent_kla_reference(*inp.args(), output_final_state=True, initial_state=pool,
                                          state_indices=_idx(2, -1), inplace_final_state=True,
                                          intermediate_states=torch.empty(0, HV, K, V, dtype=torch.float64),
                                          cu_seqlens=inp.cu_seqlens)
    assert o.shape == (1, 0, HV, V)
    assert torch.equal(ht[0], before[2]) and torch.equal(ht[1], torch.zeros_like(ht[1]))
    assert torch.equal(pool, before)
