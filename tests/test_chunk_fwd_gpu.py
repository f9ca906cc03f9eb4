"""GPU tests of the chunkwise forward kernels (both code paths) against the float64 reference and fla's Triton kernel.

Every case draws fresh inputs, NaN-poisons every buffer the library allocates, and compares o and the final state
with the float64 chunk reference by the norm-relative error (tolerances from ``helpers.TOL``).
"""

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for

import kla_tl
from kla_tl.reference import chunk_kla_reference

pytestmark = pytest.mark.gpu

#: code paths: Hopper, and Ampere run on the Hopper GPU
PATHS = ["sm_90a", "sm_80"]
#: input dtypes of the grid: bf16 (tensor cores) and float32 (exact-fp32 FMA products; tolerance 1e-3)
DTYPES = [torch.bfloat16, torch.float32]
_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])


@pytest.fixture
def path(request, monkeypatch):
    """Select the code path (Ampere runs on Hopper with wgmma/TMA/WS disabled) and poison every torch.empty."""
    arch = request.param
    cap = torch.cuda.get_device_capability()
    if arch == "sm_90a" and cap[0] != 9:
        pytest.skip("the sm_90a path needs a Hopper GPU")
    monkeypatch.setenv("KLA_TL_ARCH", arch)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        x = empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", poisoned)
    return arch


def _check(inp, *, normalize_q=True, dtype=torch.bfloat16, output_final_state=True):
    from kla_tl.chunk import chunk_refusal
    from kla_tl.conventions import check_inputs

    prob, _ = check_inputs("test", *inp.args(), normalize_q=normalize_q, **inp.kwargs())
    assert chunk_refusal(prob, inp.q.device, needs_grad=False) is None, "kernels must serve this case"
    before = inp.clone()
    o, ht = kla_tl.chunk_kla(*inp.args(), normalize_q=normalize_q, output_final_state=output_final_state,
                             **inp.kwargs())
    torch.cuda.synchronize()
    for name, x in inp:
        assert torch.equal(x, getattr(before, name)), f"chunk_kla modified the caller's {name}"
    ref = inp.to(torch.float64)
    o_ref, ht_ref = chunk_kla_reference(*ref.args(), normalize_q=normalize_q, output_final_state=True,
                                        **ref.kwargs())
    assert torch.isfinite(o).all(), "o has non-finite entries"
    assert_rel_close("o", o, o_ref, tol_for(dtype, "o"))
    if output_final_state:
        assert torch.isfinite(ht).all(), "final state has non-finite entries"
        assert ht.dtype == torch.float32
        assert_rel_close("ht", ht, ht_ref, tol_for(dtype, "ht"))
    return o, ht


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@_dtypes
def test_tails_match_reference(path, T, dtype):
    inp = make_inputs(2, T, 4, 4, 128, 128, dtype, "cuda", with_h0=True)
    _check(inp, dtype=dtype)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@_dtypes
def test_flags_off_no_initial_state(path, dtype):
    inp = make_inputs(2, 200, 4, 4, 128, 128, dtype, "cuda")
    _check(inp, normalize_q=False, dtype=dtype)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("K,V,dtype", [(64, 64, torch.bfloat16), (256, 256, torch.bfloat16), (96, 192, torch.bfloat16),
                                       (64, 64, torch.float32), (256, 256, torch.float32), (96, 192, torch.float32),
                                       (48, 96, torch.float32), (128, 256, torch.float32)])
def test_head_dims(path, K, V, dtype):
    inp = make_inputs(2, 130, 2, 2, K, V, dtype, "cuda", with_h0=True)
    _check(inp, dtype=dtype)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@_dtypes
def test_varlen_gva_empty_and_short_sequences(path, dtype):
    cu = [0, 0, 1, 1, 300, 301, 2000]
    inp = make_inputs(1, 2000, 16, 32, 128, 128, dtype, "cuda", cu_seqlens=cu, with_h0=True)
    _check(inp, dtype=dtype)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("case", ["zero_rows", "norm_1e-3", "norm_1e3", "norm_spread", "gate_0", "gate_-30"])
@_dtypes
def test_adversarial_keys_and_gates(path, case, dtype):
    key_norm = {"norm_1e-3": 1e-3, "norm_1e3": 1e3, "norm_spread": (1e-3, 1e3)}.get(case)
    inp = make_inputs(2, 200, 4, 4, 128, 128, dtype, "cuda", with_h0=True, key_norm=key_norm)
    if case == "zero_rows":
        inp.k[:, ::3] = 0
    elif case == "gate_0":
        inp.g.zero_()
    elif case == "gate_-30":
        inp.g[:, ::2] = -30.0
    _check(inp, dtype=dtype)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@_dtypes
def test_long_sequence(path, dtype):
    inp = make_inputs(1, 32768, 4, 4, 128, 128, dtype, "cuda", with_h0=True)
    _check(inp, dtype=dtype)


@pytest.mark.parametrize("path", ["sm_90a"], indirect=True)
def test_agrees_with_fla_triton(path, monkeypatch):
    fla = pytest.importorskip("fla.ops.gated_delta_rule")
    monkeypatch.setenv("FLA_DISABLE_BACKEND_DISPATCH", "1")
    inp = make_inputs(2, 1000, 4, 8, 128, 128, torch.bfloat16, "cuda", with_h0=True)
    o, ht = _check(inp)
    q = kla_tl.reference.l2norm(inp.q.float()).to(inp.q.dtype)
    beta = kla_tl.reference.beta_from_eta(inp.k, inp.eta.float())
    o_fla, ht_fla = fla.chunk_gated_delta_rule(q, inp.k, inp.v, inp.g.float(), beta,
                                               initial_state=inp.initial_state, output_final_state=True)
    assert_rel_close("o vs fla", o, o_fla, tol_for(torch.bfloat16, "o"))
    assert_rel_close("ht vs fla", ht, ht_fla, tol_for(torch.bfloat16, "ht"))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_states_kernel_stores_the_state_entering_every_chunk(path):
    """The backward's state recurrence (kla_tl.kernels.chunk_states): hs[coff[n] + c] equals the float64 reference's final state after the
    first 64 c tokens of sequence n (varlen with an empty sequence, an initial state, a partial last chunk)."""
    from kla_tl import chunk as CH
    from kla_tl.conventions import check_inputs

    inp = make_inputs(1, 330, 2, 4, 128, 128, torch.bfloat16, "cuda", with_h0=True, cu_seqlens=[0, 130, 130, 330])
    prob, cul = check_inputs("test", *inp.args(), normalize_q=True, **inp.kwargs())
    arch, on_hopper = CH.select_arch(inp.q.device)
    scale = 128 ** -0.5
    run = CH.bwd_prepared(*inp.args(), prob=prob, cu=cul, initial_state=inp.initial_state, arch=arch,
                          on_hopper=on_hopper, scale=scale, eps=1e-6)
    run.states(CH.build_states_kernel(prob, arch, on_hopper, use_h0=True))
    torch.cuda.synchronize()
    ref = inp.to(torch.float64)
    bounds = cul
    coff = run.coff.tolist()
    for n in range(len(bounds) - 1):
        s0, e0 = bounds[n], bounds[n + 1]
        for c in range(-(-(e0 - s0) // 64)):
            t = s0 + 64 * c
            sl = slice(s0, t)
            h0 = ref.initial_state[n:n + 1]
            if t == s0:
                want = h0[0]
            else:
                _, want = chunk_kla_reference(ref.q[:, sl], ref.k[:, sl], ref.v[:, sl], ref.g[:, sl], ref.eta[:, sl],
                                              normalize_q=True, initial_state=h0, output_final_state=True)
                want = want[0]
            assert_rel_close(f"hs seq {n} chunk {c}", run.hs[coff[n] + c].float(), want, tol_for(torch.bfloat16, "ht"))


@pytest.mark.parametrize("path", ["sm_90a", "sm_80"], indirect=True)
@pytest.mark.parametrize("K,V", [(128, 128), (96, 192)])
def test_dstates_kernel_matches_the_reference_backward(path, K, V):
    """The backward's reverse state-gradient kernel (kla_tl.kernels.chunk_states): dh0 equals the
    float64 reference backward's initial-state gradient, and the gradient at the state leaving chunk c of a sequence
    equals dh0 of the reference backward of the rest of that sequence started from the true state there (varlen
    with an empty sequence, a partial last chunk, dht given); the chunk tails it writes for dg (``tp``) equal that
    gradient's inner product with the state the state kernel stored."""
    from kla_tl import chunk as CH
    from kla_tl.conventions import check_inputs
    from kla_tl.reference_bwd import chunk_kla_reference_bwd

    cu = [0, 130, 130, 330]
    inp = make_inputs(1, 330, 2, 4, K, V, torch.bfloat16, "cuda", with_h0=True, cu_seqlens=cu)
    do = torch.randn(1, 330, 4, V, device="cuda").bfloat16()
    dht = torch.randn(3, 4, K, V, device="cuda")
    prob, cul = check_inputs("test", *inp.args(), normalize_q=True, **inp.kwargs())
    arch, on_hopper = CH.select_arch(inp.q.device)
    scale = K ** -0.5
    run = CH.bwd_prepared(*inp.args(), prob=prob, cu=cul, initial_state=inp.initial_state, arch=arch,
                          on_hopper=on_hopper, scale=scale, eps=1e-6)
    run.states(CH.build_states_kernel(prob, arch, on_hopper, use_h0=True))       # N, read by the dstates kernel
    run.dstates(CH.build_dstates_kernel(prob, arch, on_hopper, scale=scale, use_dht=True), do, dht,
                CH.zparts(prob, arch), CH.tparts(prob, arch))
    torch.cuda.synchronize()
    tol = tol_for(torch.bfloat16, "grad")                   # gradients: the backward's bf16 tolerance
    ref = inp.to(torch.float64)
    do64, dht64 = do.double(), dht.double()
    full = chunk_kla_reference_bwd(*ref.args(), do64, dht=dht64, normalize_q=True, **ref.kwargs())
    assert_rel_close("dh0", run.dh0, full["dh0"], tol)
    coff = run.coff.tolist()
    tails = []
    for n in range(len(cu) - 1):
        s0, e0 = cu[n], cu[n + 1]
        for c in range(-(-(e0 - s0) // 64)):
            t = min(s0 + 64 * (c + 1), e0)                  # the state leaving chunk c
            if t == e0:
                want = dht64[n]
            else:
                h0 = ref.initial_state[n:n + 1]
                if t > s0:
                    sl = slice(s0, t)
                    _, h0 = chunk_kla_reference(ref.q[:, sl], ref.k[:, sl], ref.v[:, sl], ref.g[:, sl],
                                                ref.eta[:, sl], normalize_q=True, initial_state=h0,
                                                output_final_state=True)
                rest = slice(t, e0)
                want = chunk_kla_reference_bwd(ref.q[:, rest], ref.k[:, rest], ref.v[:, rest], ref.g[:, rest],
                                               ref.eta[:, rest], do64[:, rest], dht=dht64[n:n + 1],
                                               normalize_q=True, initial_state=h0)["dh0"][0]
            assert_rel_close(f"dhs seq {n} chunk {c}", run.dhs[coff[n] + c].float(), want, tol)
            # dg's chunk tail <dS_out, S_in> per value head, from the kernel's fp32 dS and its stored state
            tails.append((run.tp[:, coff[n] + c].sum(0).double(), (want * run.hs[coff[n] + c].double()).sum((-2, -1))))
    assert_rel_close("chunk tails", torch.stack([t for t, _ in tails]), torch.stack([w for _, w in tails]), tol)
