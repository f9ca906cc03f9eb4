"""CPU tests of the normalized-form backward (kla_tl/bwd_normalized.py), the spec of the TileLang backward kernels.

In float64 every gradient of ``chunk_kla_normalized_bwd`` must equal the raw-key oracle ``chunk_kla_reference_bwd``
to 1e-10 (norm-relative): T in {1, 63, 64, 65, 130} x chunk sizes 16 / 64 x initial state x dht x q normalization,
all with GVA (H = 2, HV = 4); varlen with empty sequences; adversarial keys (zero rows, norms 1e-3 / 1e3 / mixed) and
gates (0 and -30 alternating, -inf). Stage tests: the recomputed forward gives the reference o and final state;
stage 2's dN, dS_out and dh0 equal autograd through the normalized forward, and dS_out / dh0 equal the float64
transcription of the chunk_states state-gradient kernel (tests/test_chunk_states.py). float32 against the float64 oracle.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for
from kla_tl.bwd_normalized import chunk_kla_normalized_bwd, chunk_output, dstate_sweep, prepare_chunk, state_sweep
from kla_tl.reference import chunk_kla_reference
from kla_tl.reference_bwd import chunk_kla_reference_bwd

F32, F64 = torch.float32, torch.float64
TOL = tol_for(F64, "grad")
KEYS = ("dq", "dk", "dv", "dg", "deta", "dh0")
H, HV, K, V = 2, 4, 8, 6


def _cotangents(x, with_dht, seed=0):
    """do [B, T, HV, V] and dht [N, HV, K, V] (or None) in float64."""
    gen = torch.Generator().manual_seed(seed)
    B, T = x.v.shape[:2]
    N = B if x.cu_seqlens is None else x.cu_seqlens.numel() - 1
    do = torch.randn(B, T, x.v.shape[2], x.v.shape[3], generator=gen, dtype=F64)
    dht = torch.randn(N, x.v.shape[2], x.q.shape[-1], x.v.shape[3], generator=gen, dtype=F64) if with_dht else None
    return do, dht


def _check(x, *, with_dht=True, tol=TOL, **kw):
    """Compare every gradient with the oracle; return the largest relative error."""
    do, dht = _cotangents(x, with_dht)
    args = dict(dht=dht, initial_state=x.initial_state, cu_seqlens=x.cu_seqlens, **kw)
    ref = chunk_kla_reference_bwd(*x.args(), do, **args)
    got = chunk_kla_normalized_bwd(*x.args(), do, **args)
    worst = 0.0
    for key in KEYS:
        if ref[key] is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == ref[key].dtype, key
        assert torch.isfinite(got[key]).all(), key
        worst = max(worst, assert_rel_close(f"{key} (seed {x.seed})", got[key], ref[key], tol))
    return worst


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("with_h0", [False, True], ids=["", "h0"])
@pytest.mark.parametrize("with_dht", [False, True], ids=["", "dht"])
@pytest.mark.parametrize("normalize_q", [False, True], ids=["", "qnorm"])
def test_dense_gva(T, chunk, with_h0, with_dht, normalize_q):
    x = make_inputs(2, T, H, HV, K, V, F64, with_h0=with_h0)
    _check(x, with_dht=with_dht, normalize_q=normalize_q, chunk_size=chunk)


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("cu", [[0, 0, 70, 70, 130], [0, 0, 1, 1, 131, 131, 195, 196, 261, 278]],
                         ids=["4seqs", "9seqs"])
@pytest.mark.parametrize("with_h0,with_dht,normalize_q", [(False, False, False), (True, True, True)],
                         ids=["bare", "h0-dht-qnorm"])
def test_varlen_with_empty_sequences(cu, chunk, with_h0, with_dht, normalize_q):
    x = make_inputs(1, cu[-1], H, HV, K, V, F64, with_h0=with_h0, cu_seqlens=cu)
    _check(x, with_dht=with_dht, normalize_q=normalize_q, chunk_size=chunk, scale=0.7)


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("case", ["zero_keys", "norm_1e-3", "norm_1e3", "mixed_norms", "gates_0_-30", "gates_-inf",
                                  "all"])
def test_adversarial(case, chunk):
    T = 130
    key_norm = {"norm_1e-3": 1e-3, "norm_1e3": 1e3, "mixed_norms": (1e-3, 1e3), "all": (1e-3, 1e3)}.get(case)
    x = make_inputs(1, T, H, HV, K, V, F64, with_h0=True, key_norm=key_norm)
    if case in ("zero_keys", "all"):
        x.k[0, [0, 15, 16, 63, 64, 100, 129]] = 0.0          # first / last rows of chunks, inside, the last token
    if case in ("gates_0_-30", "all"):
        x.g[0, 0::2] = 0.0
        x.g[0, 1::2] = -30.0
    if case in ("gates_-inf", "all"):
        x.g[0, [0, 3, 64, 70, 129], 1] = -torch.inf        # one head, then every head of a token
        x.g[0, 90] = -torch.inf
    _check(x, normalize_q=True, chunk_size=chunk)
    if case in ("gates_-inf", "all"):
        do, dht = _cotangents(x, True)
        got = chunk_kla_normalized_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state, chunk_size=chunk)
        assert (got["dg"][0, 90] == 0).all() and (got["dg"][0, [0, 3, 64, 70, 129], 1] == 0).all()


def test_empty_sequence_axis_passes_dht_through():
    x = make_inputs(2, 0, H, HV, K, V, F64, with_h0=True)
    do, dht = _cotangents(x, True)
    got = chunk_kla_normalized_bwd(*x.args(), do, dht=dht, initial_state=x.initial_state)
    assert torch.equal(got["dh0"], dht) and got["dq"].shape == x.q.shape


@pytest.mark.parametrize("case", ["randn", "mixed_norms"])
def test_float32_against_float64_oracle(case):
    key_norm = (1e-3, 1e3) if case == "mixed_norms" else None
    x64 = make_inputs(2, 130, H, HV, 16, 12, F64, with_h0=True, key_norm=key_norm)
    do, dht = _cotangents(x64, True, seed=5)
    ref = chunk_kla_reference_bwd(*x64.args(), do, dht=dht, initial_state=x64.initial_state, normalize_q=True)
    x32 = x64.to(F32)
    got = chunk_kla_normalized_bwd(*x32.args(), do.to(F32), dht=dht.to(F32), initial_state=x32.initial_state,
                                   normalize_q=True)
    for key in KEYS:
        assert got[key].dtype == F32, key
        assert_rel_close(f"{key} (seed {x64.seed})", got[key], ref[key], tol_for(F32, "grad"))


# ---------------------------------------------------------------------------------------------------------------
# stage by stage (one dense sequence per batch row)
# ---------------------------------------------------------------------------------------------------------------

def _stage1(x, b, chunk, normalize_q, scale):
    G = HV // H
    rows = lambda t, c0, c1: t[b, c0:c1].transpose(0, 1)
    qe, ke = x.q.repeat_interleave(G, 2), x.k.repeat_interleave(G, 2)
    T = x.q.shape[1]
    bounds = [(c0, min(c0 + chunk, T)) for c0 in range(0, T, chunk)]
    chunks = [prepare_chunk(*(rows(t, c0, c1) for t in (qe, ke, x.v, x.g, x.eta)), scale=scale, eps=1e-6,
                            normalize_q=normalize_q) for c0, c1 in bounds]
    return bounds, chunks


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_stage1_forward_recompute_gives_the_reference_forward(chunk):
    x = make_inputs(2, 150, H, HV, K, V, F64, with_h0=True, key_norm=(1e-3, 1e3))
    o_ref, ht_ref = chunk_kla_reference(*x.args(), initial_state=x.initial_state, output_final_state=True,
                                        normalize_q=True, chunk_size=chunk)
    for b in range(2):
        bounds, chunks = _stage1(x, b, chunk, True, K ** -0.5)
        S_in, Ns, ht = state_sweep(chunks, x.initial_state[b])
        o = torch.cat([chunk_output(ch, S, N) for ch, S, N in zip(chunks, S_in, Ns)], dim=1).transpose(0, 1)
        assert_rel_close("o", o, o_ref[b], tol_for(F64, "stage"))
        assert_rel_close("ht", ht, ht_ref[b], tol_for(F64, "stage"))


@pytest.mark.parametrize("chunk", [16, 64], ids=lambda c: f"C{c}")
def test_stage2_dN_dS_out_dh0_equal_autograd(chunk):
    """dN, dS_out and dh0 are the gradients of <o, do> + <S_final, dht> w.r.t. N, the state leaving each chunk and h0
    (autograd through stage 1's forward with zero perturbations added to N and to S_out)."""
    x = make_inputs(1, 150, H, HV, K, V, F64, with_h0=True, key_norm=(1e-3, 1e3))
    do, dht = _cotangents(x, True)
    bounds, chunks = _stage1(x, 0, chunk, True, K ** -0.5)
    dOs = [do[0, c0:c1].transpose(0, 1) for c0, c1 in bounds]
    dS_out, dN, dh0 = dstate_sweep(chunks, dOs, dht[0])
    h0 = x.initial_state[0].clone().requires_grad_()
    pN = [torch.zeros_like(ch.U, requires_grad=True) for ch in chunks]
    pS = [torch.zeros_like(h0, requires_grad=True) for _ in chunks]
    S, loss = h0, 0.0
    for ch, dO, a, c in zip(chunks, dOs, pN, pS):
        N = ch.U - ch.W @ S + a
        loss = loss + (chunk_output(ch, S, N) * dO).sum()
        S = ch.eg[..., -1, None, None] * S + ch.kh.mT @ (ch.egn[..., None] * N) + c
    loss = loss + (S * dht[0]).sum()
    grads = torch.autograd.grad(loss, [h0, *pN, *pS])
    tol = tol_for(F64, "stage")
    assert_rel_close("dh0", dh0, grads[0], tol)
    for i in range(len(chunks)):
        assert_rel_close(f"dN[{i}]", dN[i], grads[1 + i], tol)
        assert_rel_close(f"dS_out[{i}]", dS_out[i], grads[1 + len(chunks) + i], tol)


def test_stage2_equals_the_chunk_states_kernel_transcription():
    """dS_out of chunk c is the dh0 of the suffix that starts after it, so chunk_states' float64 transcription
    (dense, C = 64) run on every chunk-aligned suffix gives every dS_out, and on the whole sequence dh0."""
    from test_chunk_states import _dstates_emulated

    x = make_inputs(2, 150, H, HV, K, V, F64, with_h0=True, key_norm=(1e-3, 1e3))
    do, dht = _cotangents(x, True)
    scale = K ** -0.5
    for b in range(2):
        bounds, chunks = _stage1(x, b, 64, True, scale)
        dS_out, _, dh0 = dstate_sweep(chunks, [do[b, c0:c1].transpose(0, 1) for c0, c1 in bounds], dht[b])
        for (_, c1), dS in zip(bounds, dS_out):
            sl = lambda t: t[b:b + 1, c1:]
            want = _dstates_emulated(sl(x.q), sl(x.k), sl(x.g), sl(x.eta), sl(do), dht[b:b + 1], scale=scale)[0]
            assert_rel_close(f"dS_out (row {b}, ends {c1})", dS, want, tol_for(F64, "stage"))
        want = _dstates_emulated(x.q[b:b + 1], x.k[b:b + 1], x.g[b:b + 1], x.eta[b:b + 1], do[b:b + 1],
                                 dht[b:b + 1], scale=scale)[0]
        assert_rel_close("dh0", dh0, want, tol_for(F64, "stage"))
