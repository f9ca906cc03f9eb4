"""CPU tests of the torch references and of the public API's CPU path.

The token recurrence ``naive_kla`` is the definition (KLA.md section 2). Everything else is checked against it in
float64: the chunkwise WY form at several chunk sizes, varlen packing, GVA, state hand-over, the GDN equivalence
(section 4), the beta chain rule (section 6), the decode step (section 7), and autograd through all of them.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TOL, assert_rel_close, make_inputs
from kla_tl import chunk_kla, fused_recurrent_kla, kla_decode
from kla_tl.conventions import DEFAULT_EPS, QNORM_EPS
from kla_tl.reference import beta_from_eta, chunk_kla_reference, kla_decode_reference, l2norm, naive_kla

F64 = torch.float64
EXACT = TOL[(F64, "o")]  # two exact algorithms in float64: 1e-10
REFS = {"naive": naive_kla, "chunk16": lambda *a, **kw: chunk_kla_reference(*a, chunk_size=16, **kw)}


def _run(fn, x, **kw):
    return fn(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, output_final_state=True, **kw)


# ---------------------------------------------------------------------------------------------------------------
# naive vs chunkwise
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 63, 65, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk", [16, 32, 64], ids=lambda c: f"C{c}")
def test_chunk_reference_equals_recurrence_in_fp64(chunk, T):
    # T=1: a single one-row chunk; 63/65: one short of / one past a 64-chunk boundary; 200: several chunks + tail.
    x = make_inputs(2, T, 2, 4, 8, 6, F64, seed=1000 + T, with_h0=(T % 2 == 1))
    normalize_q = T >= 65
    o_n, h_n = _run(naive_kla, x, normalize_q=normalize_q)
    o_c, h_c = _run(chunk_kla_reference, x, normalize_q=normalize_q, chunk_size=chunk)
    assert o_c.dtype == F64 and h_c.dtype == F64
    assert_rel_close("o", o_c, o_n, EXACT)
    assert_rel_close("ht", h_c, h_n, EXACT)


def test_chunk_reference_handles_key_norm_spread_inside_a_chunk():
    # key norms spread over 1e-3..1e3 inside each chunk: A carries norm ratios up to 1e6 (KLA.md section 4)
    x = make_inputs(1, 130, 1, 2, 16, 8, F64, seed=7, key_norm=(1e-3, 1e3), with_h0=True)
    o_n, h_n = _run(naive_kla, x)
    o_c, h_c = _run(chunk_kla_reference, x)
    assert_rel_close("o", o_c, o_n, 1e-9)
    assert_rel_close("ht", h_c, h_n, 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# varlen, GVA, state hand-over
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("ref", list(REFS), ids=list(REFS))
def test_varlen_equals_a_loop_over_sequences(ref, cu_dtype):
    fn = REFS[ref]
    cu = [0, 0, 17, 17, 50, 51, 51]  # empty sequences first, in the middle and last; a one-token sequence
    x = make_inputs(1, cu[-1], 2, 4, 8, 6, F64, seed=11, with_h0=True, cu_seqlens=cu, cu_dtype=cu_dtype)
    o, ht = _run(fn, x, normalize_q=True)
    assert o.shape == (1, cu[-1], 4, 6) and ht.shape == (len(cu) - 1, 4, 8, 6)
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        args = [t[:, a:b] for t in x.args()]
        o_i, h_i = naive_kla(*args, initial_state=x.initial_state[i:i + 1], output_final_state=True, normalize_q=True)
        assert_rel_close(f"o[seq {i}]", o[:, a:b], o_i, EXACT)
        assert_rel_close(f"ht[seq {i}]", ht[i:i + 1], h_i, EXACT)
    # an empty sequence passes its initial state through unchanged
    assert torch.equal(ht[0], x.initial_state[0]) and torch.equal(ht[5], x.initial_state[5])


@pytest.mark.parametrize("ref", list(REFS), ids=list(REFS))
def test_gva_equals_repeating_qk_heads(ref):
    fn = REFS[ref]
    H, HV = 2, 6  # groups of 3 value heads per q/k head
    x = make_inputs(2, 37, H, HV, 8, 5, F64, seed=12, with_h0=True)
    o, ht = _run(fn, x, normalize_q=True)
    q_rep = x.q.repeat_interleave(HV // H, dim=2)
    k_rep = x.k.repeat_interleave(HV // H, dim=2)
    o_r, h_r = naive_kla(q_rep, k_rep, x.v, x.g, x.eta, initial_state=x.initial_state, output_final_state=True,
                         normalize_q=True)
    assert_rel_close("o", o, o_r, EXACT)
    assert_rel_close("ht", ht, h_r, EXACT)


@pytest.mark.parametrize("split", [1, 40, 64], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("ref", list(REFS), ids=list(REFS))
def test_split_sequence_with_state_handover_equals_whole(ref, split):
    fn = REFS[ref]
    x = make_inputs(2, 90, 1, 2, 8, 6, F64, seed=13, with_h0=True)
    o, ht = _run(fn, x)
    first = [t[:, :split] for t in x.args()]
    second = [t[:, split:] for t in x.args()]
    o1, h1 = fn(*first, initial_state=x.initial_state, output_final_state=True)
    o2, h2 = fn(*second, initial_state=h1, output_final_state=True)
    assert_rel_close("o", torch.cat([o1, o2], 1), o, EXACT)
    assert_rel_close("ht", h2, ht, EXACT)


# ---------------------------------------------------------------------------------------------------------------
# KLA == GDN with normalized keys and rescaled values (KLA.md section 4)
# ---------------------------------------------------------------------------------------------------------------

def _gdn_recurrence(q, k, v, g, beta, scale, h0):
    """Gated DeltaNet, float64, one sequence per batch row, heads already matched: S~ = e^g S; S = S~ + beta k^T (v - k S~)."""
    B, T, HV, K = k.shape
    S = h0.clone()
    out = torch.zeros(B, T, HV, v.shape[-1], dtype=F64)
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S
        e = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t][..., None, None] * k[:, t][..., :, None] * e[..., None, :]
        out[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    return out, S


@pytest.mark.parametrize("normalize_q", [False, True], ids=["raw_q", "normalize_q"])
def test_kla_equals_gdn_with_normalized_keys_and_rescaled_values(normalize_q):
    H, HV, K = 2, 4, 8
    x = make_inputs(2, 30, H, HV, K, 6, F64, seed=14, key_norm=(1e-2, 1e2), with_h0=True)
    o, ht = _run(naive_kla, x, normalize_q=normalize_q)
    r = torch.sqrt((x.k * x.k).sum(-1) + DEFAULT_EPS)                  # [B, T, H]
    k_hat = (x.k / r[..., None]).repeat_interleave(HV // H, dim=2)      # l2norm with eps inside the sqrt
    v_prime = x.v / r.repeat_interleave(HV // H, dim=2)[..., None]
    q = x.q / torch.sqrt((x.q * x.q).sum(-1, keepdim=True) + QNORM_EPS) if normalize_q else x.q
    o_g, h_g = _gdn_recurrence(q.repeat_interleave(HV // H, dim=2), k_hat, v_prime, x.g, x.eta, K ** -0.5,
                               x.initial_state)
    assert_rel_close("o", o, o_g, 1e-12)
    assert_rel_close("ht", ht, h_g, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------

def _tiny(seed, **kw):
    # tiny: gradcheck differentiates numerically every element of every input
    return make_inputs(1, 5, 1, 2, 3, 2, F64, seed=seed, requires_grad=True, **kw)


GRADCHECK_CASES = {
    "naive": (naive_kla, {}),
    "naive-normalize_q": (naive_kla, {"normalize_q": True}),
    "chunk2": (chunk_kla_reference, {"chunk_size": 2}),
    "chunk2-normalize_q": (chunk_kla_reference, {"chunk_size": 2, "normalize_q": True}),
    "chunk3-scale": (chunk_kla_reference, {"chunk_size": 3, "scale": 0.7}),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES), ids=list(GRADCHECK_CASES))
def test_gradcheck_in_fp64(case):
    fn, kw = GRADCHECK_CASES[case]
    x = _tiny(20, with_h0=True)
    names = list(x.tensors())

    def f(*ts):
        o, ht = fn(*ts[:5], initial_state=ts[5], output_final_state=True, **kw)
        return o, ht

    assert torch.autograd.gradcheck(f, tuple(x.tensors().values()), eps=1e-6, atol=1e-7, rtol=1e-5), names


def test_gradcheck_chunk_reference_varlen():
    cu = [0, 2, 2, 5]
    x = make_inputs(1, 5, 1, 2, 3, 2, F64, seed=21, requires_grad=True, with_h0=True, cu_seqlens=cu)

    def f(*ts):
        return chunk_kla_reference(*ts[:5], initial_state=ts[5], output_final_state=True, cu_seqlens=x.cu_seqlens,
                                   chunk_size=2, normalize_q=True)

    assert torch.autograd.gradcheck(f, tuple(x.tensors().values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("H,HV", [(2, 2), (2, 6)], ids=["no_gva", "gva3"])
def test_beta_closed_form_gradient_matches_autograd(H, HV):
    # d beta / d eta = 1/D,  grad_k beta = -(2 beta / D) k, summed over the value heads sharing a q/k head
    x = make_inputs(2, 7, H, HV, 5, 3, F64, seed=22, key_norm=(1e-2, 10.0))
    k = x.k.clone().requires_grad_(True)
    eta = x.eta.clone().requires_grad_(True)
    beta = beta_from_eta(k, eta)
    dbeta = torch.randn(beta.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    dk, deta = torch.autograd.grad(beta, (k, eta), dbeta)
    G = HV // H
    D = (x.k * x.k).sum(-1) + DEFAULT_EPS                               # [B, T, H]
    D_v = D.repeat_interleave(G, dim=-1)                                 # [B, T, HV]
    beta_closed = x.eta / D_v
    assert_rel_close("beta", beta.detach(), beta_closed, 1e-14)
    assert_rel_close("deta", deta, dbeta / D_v, 1e-13)
    coef = (2 * beta_closed * dbeta / D_v).reshape(*D.shape, G).sum(-1)  # [B, T, H]
    assert_rel_close("dk", dk, -coef[..., None] * x.k, 1e-13)


@pytest.mark.parametrize("normalize_q", [False, True], ids=["raw_q", "normalize_q"])
def test_chunk_reference_grads_equal_recurrence_grads(normalize_q):
    x = make_inputs(2, 70, 1, 2, 8, 4, F64, seed=23, with_h0=True)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(2, 70, 2, 4, dtype=F64, generator=gen)
    dht = torch.randn(2, 2, 8, 4, dtype=F64, generator=gen)
    grads = {}
    for name, fn in (("naive", naive_kla), ("chunk", chunk_kla_reference)):
        xi = x.to(requires_grad=True)
        o, ht = _run(fn, xi, normalize_q=normalize_q)
        torch.autograd.backward((o, ht), (do, dht))
        grads[name] = xi.grads()
    for n in grads["naive"]:
        assert_rel_close(f"d{n}", grads["chunk"][n], grads["naive"][n], TOL[(F64, "grad")])


# ---------------------------------------------------------------------------------------------------------------
# adversarial values
# ---------------------------------------------------------------------------------------------------------------

def _adv_zero_keys(x):
    x.k[:, 3:9] = 0  # D = eps, beta = eta / eps, but k = 0 writes nothing


def _adv_all_zero_keys(x):
    x.k.zero_()


def _adv_keys_1e_4(x):
    x.k.mul_(1e-4 / x.k.norm(dim=-1, keepdim=True))


def _adv_keys_1e3(x):
    x.k.mul_(1e3 / x.k.norm(dim=-1, keepdim=True))


def _adv_g_zero(x):
    x.g.zero_()  # no decay at all


def _adv_g_minus_30(x):
    x.g.fill_(-30.0)  # the state is all but erased every token


def _adv_g_mixed(x):
    x.g[:, ::3] = -30.0
    x.g[:, 1::3] = 0.0


def _adv_eta_near_0(x):
    x.eta.fill_(1e-7)


def _adv_eta_near_1(x):
    x.eta.fill_(1 - 1e-7)  # near-exact projection: transition eigenvalue alpha (1 - beta ||k||^2) ~ 1e-7 alpha


def _adv_q_zero(x):
    x.q.zero_()  # with normalize_q: q / sqrt(0 + 1e-6) = 0, no NaN


ADVERSARIAL = {
    "zero_keys": _adv_zero_keys,
    "all_zero_keys": _adv_all_zero_keys,
    "key_norm_1e-4": _adv_keys_1e_4,
    "key_norm_1e3": _adv_keys_1e3,
    "g_0": _adv_g_zero,
    "g_-30": _adv_g_minus_30,
    "g_mixed_0_-30": _adv_g_mixed,
    "eta_near_0": _adv_eta_near_0,
    "eta_near_1": _adv_eta_near_1,
    "q_0_normalize_q": _adv_q_zero,
}


@pytest.mark.parametrize("case", list(ADVERSARIAL), ids=list(ADVERSARIAL))
def test_adversarial_values_are_finite_and_naive_equals_chunk(case):
    x = make_inputs(1, 40, 1, 2, 8, 4, F64, seed=30, with_h0=True)
    with torch.no_grad():
        ADVERSARIAL[case](x)
    results = {}
    for name, fn in (("naive", naive_kla), ("chunk", lambda *a, **kw: chunk_kla_reference(*a, chunk_size=16, **kw))):
        xi = x.to(requires_grad=True)
        o, ht = _run(fn, xi, normalize_q=True)
        (o.sum() + ht.square().sum()).backward()
        results[name] = {"o": o.detach(), "ht": ht.detach(), **{f"d{n}": gr for n, gr in xi.grads().items()}}
    for n, t in results["naive"].items():
        assert torch.isfinite(t).all(), f"{case}: naive {n} is not finite"
        assert torch.isfinite(results["chunk"][n]).all(), f"{case}: chunk {n} is not finite"
        assert_rel_close(f"{case}: {n}", results["chunk"][n], t, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_keys_in_low_precision_stay_finite(dtype):
    # beta reaches eta / eps = 1e6 eta: it must never be stored in a 16-bit type (KLA.md section 4)
    x = make_inputs(1, 70, 1, 2, 16, 8, dtype, seed=31, key_norm=(1e-4, 1e-2))
    o, ht = _run(chunk_kla_reference, x, normalize_q=True)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    o64, h64 = _run(naive_kla, x.to(F64), normalize_q=True)
    assert_rel_close("o", o, o64, TOL[(dtype, "o")])
    assert_rel_close("ht", ht, h64, TOL[(dtype, "ht")])


# ---------------------------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_decode_steps_equal_recurrence(dtype):
    B, T, H, HV, K, V = 3, 12, 1, 2, 8, 4
    x = make_inputs(B, T, H, HV, K, V, dtype, seed=40, with_h0=True)
    pool = x.initial_state.clone()
    outs = []
    for t in range(T):
        s = slice(t, t + 1)
        outs.append(kla_decode_reference(x.q[:, s], x.k[:, s], x.v[:, s], x.g[:, s], x.eta[:, s], pool,
                                         normalize_q=True))
    o_ref, h_ref = _run(naive_kla, x.to(F64), normalize_q=True)
    tol = EXACT if dtype == F64 else TOL[(torch.float32, "o")] / 100  # fp32 arithmetic, 12 steps: ~1e-7
    assert_rel_close("o", torch.cat(outs, 1), o_ref, tol)
    assert_rel_close("state", pool, h_ref, tol)


def test_decode_padding_rows_output_zeros_and_leave_slots_untouched():
    B, H, HV, K, V, slots = 4, 1, 2, 8, 4, 6
    x = make_inputs(B, 1, H, HV, K, V, torch.float32, seed=41)
    pool = torch.randn(slots, HV, K, V, generator=torch.Generator().manual_seed(5))
    before = pool.clone()
    idx = torch.tensor([4, -1, 1, -1], dtype=torch.int32)
    o = kla_decode_reference(*x.args(), pool, state_indices=idx)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.equal(o[3], torch.zeros_like(o[3]))
    for s in (0, 2, 3, 5):  # slots no row names are bit-for-bit unchanged
        assert torch.equal(pool[s], before[s]), f"slot {s} changed"
    # the live rows equal a one-token recurrence from their slot
    for row, slot in ((0, 4), (2, 1)):
        args = [t[row:row + 1] for t in x.args()]
        o_r, h_r = naive_kla(*args, initial_state=before[slot:slot + 1], output_final_state=True)
        assert_rel_close(f"o[row {row}]", o[row:row + 1], o_r, 1e-6)
        assert_rel_close(f"pool[{slot}]", pool[slot:slot + 1], h_r, 1e-6)


def test_decode_bf16_pool():
    B, T, H, HV, K, V = 2, 8, 1, 2, 16, 8
    x = make_inputs(B, T, H, HV, K, V, torch.bfloat16, seed=42)
    pool = torch.zeros(5, HV, K, V, dtype=torch.bfloat16)
    idx = torch.tensor([3, 0], dtype=torch.int32)
    outs = []
    for t in range(T):
        s = slice(t, t + 1)
        outs.append(kla_decode(x.q[:, s], x.k[:, s], x.v[:, s], x.g[:, s], x.eta[:, s], pool, state_indices=idx))
    assert pool.dtype == torch.bfloat16 and outs[0].dtype == torch.bfloat16
    o_ref, h_ref = _run(naive_kla, x.to(F64))
    # the pool is rounded to bf16 after every step: T roundings of 2**-9 accumulate at most linearly
    assert_rel_close("o", torch.cat(outs, 1), o_ref, 2e-2)
    assert_rel_close("state", pool[idx.long()], h_ref, 2e-2)
    assert torch.equal(pool[[1, 2, 4]], torch.zeros_like(pool[[1, 2, 4]]))


# ---------------------------------------------------------------------------------------------------------------
# public API on CPU
# ---------------------------------------------------------------------------------------------------------------

def _snapshot(tensors: dict) -> dict:
    return {n: t.detach().clone() for n, t in tensors.items() if isinstance(t, torch.Tensor)}


def _assert_unchanged(before: dict, after: dict):
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), f"caller tensor {n} was modified"


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("api,ref", [(chunk_kla, chunk_kla_reference), (fused_recurrent_kla, naive_kla)],
                         ids=["chunk_kla", "fused_recurrent_kla"])
def test_public_api_on_cpu_equals_reference_and_leaves_inputs_alone(api, ref, varlen):
    cu = [0, 9, 9, 40] if varlen else None
    x = make_inputs(1 if varlen else 2, 40, 2, 4, 8, 6, torch.float32, seed=50, with_h0=True, cu_seqlens=cu)
    before = _snapshot(dict(x))
    o, ht = api(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, output_final_state=True,
                normalize_q=True, scale=0.3, eps=1e-5)
    _assert_unchanged(before, dict(x))
    o_r, h_r = ref(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, output_final_state=True,
                   normalize_q=True, scale=0.3, eps=1e-5)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert torch.equal(o, o_r) and torch.equal(ht, h_r)
    o_64, h_64 = _run(naive_kla, x.to(F64), normalize_q=True, scale=0.3, eps=1e-5)
    assert_rel_close("o", o, o_64, TOL[(torch.float32, "o")])
    assert_rel_close("ht", ht, h_64, TOL[(torch.float32, "ht")])


@pytest.mark.parametrize("api", [chunk_kla, fused_recurrent_kla], ids=["chunk_kla", "fused_recurrent_kla"])
def test_public_api_without_final_state_returns_none(api):
    x = make_inputs(1, 5, 1, 1, 4, 4, torch.float32, seed=51)
    o, ht = api(*x.args())
    assert ht is None and o.shape == (1, 5, 1, 4)


def test_kla_decode_on_cpu_equals_reference_and_leaves_inputs_alone():
    B, H, HV, K, V = 3, 1, 2, 8, 4
    x = make_inputs(B, 1, H, HV, K, V, torch.float32, seed=52)
    pool = torch.randn(5, HV, K, V, generator=torch.Generator().manual_seed(6))
    idx = torch.tensor([2, -1, 0], dtype=torch.int32)
    before = _snapshot({**dict(x), "state_indices": idx})
    pool_ref = pool.clone()
    out = torch.full((B, 1, HV, V), float("nan"))
    got = kla_decode(*x.args(), pool, state_indices=idx, normalize_q=True, out=out)
    assert got is out and torch.isfinite(out).all()
    _assert_unchanged(before, {**dict(x), "state_indices": idx})
    want = kla_decode_reference(*x.args(), pool_ref, state_indices=idx, normalize_q=True)
    assert torch.equal(out, want) and torch.equal(pool, pool_ref)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_autograd_through_chunk_kla_on_cpu(varlen):
    cu = [0, 20, 20, 33] if varlen else None
    x = make_inputs(1 if varlen else 2, 33, 1, 2, 8, 4, torch.float32, seed=53, with_h0=True, cu_seqlens=cu,
                    requires_grad=True)
    o, ht = chunk_kla(*x.args(), initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, output_final_state=True,
                      normalize_q=True)
    gen = torch.Generator().manual_seed(7)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    torch.autograd.backward((o, ht), (do, dht))
    x64 = x.to(F64, requires_grad=True)
    o64, h64 = _run(naive_kla, x64, normalize_q=True)
    torch.autograd.backward((o64, h64), (do.double(), dht.double()))
    for n, gr in x.grads().items():
        assert gr is not None, f"no gradient for {n}"
        assert gr.dtype == x.tensors()[n].dtype
        assert_rel_close(f"d{n}", gr, x64.grads()[n], TOL[(torch.float32, "grad")])
