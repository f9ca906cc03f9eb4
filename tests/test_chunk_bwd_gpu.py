"""GPU tests of the whole kernel backward (:func:`kla_tl.chunk.chunk_bwd`: prepare -> chunk_states -> chunk_dstates
-> chunk_bwd_grads) against the float64 reference backward, below autograd; the state kernels alone are tested in
tests/test_chunk_fwd_gpu.py, the gradients through ``chunk_kla`` in tests/test_chunk_grad_gpu.py."""

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for


pytestmark = pytest.mark.gpu


@pytest.fixture
def path(request, monkeypatch):
    cap = torch.cuda.get_device_capability()
    if request.param == "sm_90a" and cap[0] != 9:
        pytest.skip("the sm_90a path needs a Hopper GPU")
    monkeypatch.setenv("KLA_TL_ARCH", request.param)
    empty = torch.empty

    def poisoned(*args, **kwargs):                      # every buffer the library allocates starts as NaN
        x = empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", poisoned)
    return request.param


@pytest.mark.parametrize("path", ["sm_90a", "sm_80"], indirect=True)
@pytest.mark.parametrize("K,V", [(128, 128), (96, 192), (64, 64)])
@pytest.mark.parametrize("normalize_q", [True, False])
def test_backward_kernel_chain_matches_the_reference_backward(path, K, V, normalize_q):
    """kla_tl.chunk.chunk_bwd (prepare -> chunk_states -> chunk_dstates -> chunk_bwd_grads): every gradient
    against the float64 reference backward (varlen with an empty sequence and a partial chunk, GVA 2/4, initial
    state, final-state gradient), bf16 gradient tolerance."""
    from kla_tl import chunk as CH
    from kla_tl.conventions import check_inputs
    from kla_tl.reference_bwd import chunk_kla_reference_bwd

    cu = [0, 130, 130, 330]
    inp = make_inputs(1, 330, 2, 4, K, V, torch.bfloat16, "cuda", with_h0=True, cu_seqlens=cu)
    do = torch.randn(1, 330, 4, V, device="cuda").bfloat16()
    dht = torch.randn(3, 4, K, V, device="cuda")
    prob, cul = check_inputs("test", *inp.args(), normalize_q=normalize_q, **inp.kwargs())
    scale = K ** -0.5
    got = CH.chunk_bwd(*inp.args(), do, dht, prob=prob, cu=cul, scale=scale, eps=1e-6, normalize_q=normalize_q,
                       initial_state=inp.initial_state)
    torch.cuda.synchronize()
    ref = inp.to(torch.float64)
    want = chunk_kla_reference_bwd(ref.q, ref.k, ref.v, ref.g, ref.eta, do.double(), dht=dht.double(), scale=scale,
                                   normalize_q=normalize_q, initial_state=ref.initial_state,
                                   cu_seqlens=ref.cu_seqlens)
    tol = tol_for(torch.bfloat16, "grad")
    shapes = {"dq": ref.q.shape, "dk": ref.k.shape, "dv": ref.v.shape, "dg": ref.g.shape, "deta": ref.eta.shape}
    for name, shape in shapes.items():
        x = got[name].reshape(shape)
        assert torch.isfinite(x).all(), f"{name} has non-finite entries"
        assert_rel_close(name, x, want[name], tol)
    assert_rel_close("dh0", got["dh0"], want["dh0"], tol)


@pytest.mark.parametrize("path", ["sm_90a", "sm_80"], indirect=True)
@pytest.mark.parametrize("K,V,dtype", [(128, 128, torch.bfloat16), (96, 192, torch.bfloat16), (64, 64, torch.float32)],
                         ids=["128-128-bf16", "96-192-bf16", "64-64-fp32"])
def test_backward_from_the_forwards_saved_intermediates_equals_the_full_recomputation(path, K, V, dtype):
    """A forward with ``save=True`` keeps L beside Aqk, the cumulative gates and the norms; the backward given them
    recomputes only w and u (chunk_prepare with ``given_l``). Same arithmetic on the same bits as recomputing
    everything, so every gradient must be bit-identical to :func:`kla_tl.chunk.chunk_bwd` without them, and the
    forward's output must not change (varlen with an empty sequence and partial chunks, GVA 2/4, initial state,
    final-state gradient; every buffer starts as NaN)."""
    from kla_tl import chunk as CH
    from kla_tl.conventions import check_inputs

    cu = [0, 130, 130, 330]
    inp = make_inputs(1, 330, 2, 4, K, V, dtype, "cuda", with_h0=True, cu_seqlens=cu)
    do = torch.randn(1, 330, 4, V, device="cuda").to(dtype)
    dht = torch.randn(3, 4, K, V, device="cuda")
    prob, cul = check_inputs("test", *inp.args(), normalize_q=True, **inp.kwargs())
    kw = dict(prob=prob, cu=cul, scale=K ** -0.5, eps=1e-6, normalize_q=True, initial_state=inp.initial_state)
    o_plain, ht_plain, none = CH.chunk_fwd(*inp.args(), output_final_state=True, **kw)
    o, ht, saved = CH.chunk_fwd(*inp.args(), output_final_state=True, save=True, **kw)
    assert none is None and saved is not None
    assert torch.equal(o, o_plain) and torch.equal(ht, ht_plain), "saving L changed the forward's results"
    full = CH.chunk_bwd(*inp.args(), do, dht, **kw)
    given = CH.chunk_bwd(*inp.args(), do, dht, saved=saved, **kw)
    torch.cuda.synchronize()
    for name in ("dq", "dk", "dv", "dg", "deta", "dh0"):
        a, b = given[name], full[name]
        assert torch.isfinite(a).all(), f"{name} has non-finite entries"
        assert torch.equal(a, b), f"{name}: max |difference| {(a.float() - b.float()).abs().max().item():.3e}"
