"""GPU tests of the backward kernels, stage by stage and end to end.

- chunk_bwd_dqk after prepare -> chunk_states -> chunk_dstates, on bf16 inputs, against the float64 stages of
  :mod:`kla_tl.bwd_normalized` (the spec, itself float64-equal to the raw-key reference backward): dq (per value
  head), the output and state-update part of dk^, dW = -dN S_in^T and the matching part of dg (with the chunk tail);
- the whole kernel backward (:func:`kla_tl.chunk.chunk_bwd`) against the float64 reference backward.
"""

import pytest
import torch

from helpers import assert_rel_close, make_inputs, tol_for

from kla_tl import bwd_normalized as BN
from kla_tl.conventions import QNORM_EPS

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


def _oracle_partials(inp, do, dht, cu, scale, normalize_q):
    """float64 dq (per value head), dkh (output + state-update paths), dw [1, TT, HV, K] and dga [1, TT, HV] (see
    the kernel)."""
    ref = inp.to(torch.float64)
    _, TT, H, K = ref.q.shape
    HV, V = ref.v.shape[2:]
    G = HV // H
    qe, ke = ref.q.repeat_interleave(G, 2), ref.k.repeat_interleave(G, 2)
    do64 = do.double()
    out = {n: torch.zeros(1, TT, HV, K, dtype=torch.float64, device=do.device) for n in ("dq", "dkh", "dw")}
    out["dga"] = torch.zeros(1, TT, HV, dtype=torch.float64, device=do.device)
    s = scale
    for i in range(len(cu) - 1):
        bounds = [(c0, min(c0 + 64, cu[i + 1])) for c0 in range(cu[i], cu[i + 1], 64)]
        rows = lambda x, c0, c1: x[0, c0:c1].transpose(0, 1)              # noqa: E731
        chunks = [BN.prepare_chunk(*(rows(x, c0, c1) for x in (qe, ke, ref.v, ref.g, ref.eta)), scale=s, eps=1e-6,
                                   normalize_q=normalize_q) for c0, c1 in bounds]
        S_in, Ns, _ = BN.state_sweep(chunks, ref.initial_state[i])
        dOs = [rows(do64, c0, c1) for c0, c1 in bounds]
        dS_out, dNs, _ = BN.dstate_sweep(chunks, dOs, dht[i].double())
        for (c0, c1), ch, S, N, dS, dN, dO in zip(bounds, chunks, S_in, Ns, dS_out, dNs, dOs):
            n = c1 - c0
            idx = torch.arange(n, device=do.device)
            lower, strict = idx[:, None] >= idx[None, :], idx[:, None] > idx[None, :]
            dAqk = (dO @ N.mT).masked_fill(~lower, 0.0)
            dAG = dAqk * ch.Gam
            dOSt, NdS = dO @ S.mT, N @ dS.mT
            dqh = (s * ch.eg)[..., None] * dOSt + s * (dAG @ ch.kh)
            if normalize_q:          # dq = rho (dq^ - (q^ . dq^) q^), rho = 1 / ||q|| (q^ = ch.qh)
                rho = torch.rsqrt((rows(qe, c0, c1) ** 2).sum(-1, keepdim=True) + QNORM_EPS)
                dqh = rho * (dqh - (ch.qh * dqh).sum(-1, keepdim=True) * ch.qh)
            parts = {"dq": dqh,
                     "dkh": s * (dAG.mT @ ch.qh) + ch.egn[..., None] * NdS,
                     "dw": -(dN @ S.mT)}
            ZG = dAqk * ch.Aqk
            direct = s * ch.eg * (ch.qh * dOSt).sum(-1)
            z = ch.egn * (ch.kh * NdS).sum(-1)
            up = lower.mT.double()
            dga = (((up @ ZG) * strict).sum(-1) + (up @ direct[..., None]).squeeze(-1)
                   + (strict.double() @ z[..., None]).squeeze(-1)
                   + (ch.eg[..., -1] * (dS * S).sum((-2, -1)))[..., None])     # the chunk tail e^{gamma_n} <dS, S>
            for name, x in parts.items():
                out[name][0, c0:c1] = x.transpose(0, 1)
            out["dga"][0, c0:c1] = dga.transpose(0, 1)
    return out


@pytest.mark.parametrize("path", ["sm_90a", "sm_80"], indirect=True)
@pytest.mark.parametrize("K,V", [(128, 128), (96, 192), (64, 64)])
@pytest.mark.parametrize("normalize_q", [True, False])
def test_dqk_kernel_matches_the_spec(path, K, V, normalize_q):
    from kla_tl import chunk as CH
    from kla_tl.conventions import check_inputs

    cu = [0, 130, 130, 330]
    inp = make_inputs(1, 330, 2, 4, K, V, torch.bfloat16, "cuda", with_h0=True, cu_seqlens=cu)
    do = torch.randn(1, 330, 4, V, device="cuda").bfloat16()
    dht = torch.randn(3, 4, K, V, device="cuda")
    prob, cul = check_inputs("test", *inp.args(), normalize_q=normalize_q, **inp.kwargs())
    arch, on_hopper = CH.select_arch(inp.q.device)
    scale = K ** -0.5
    prep, _ = CH.build_kernels(prob, arch, on_hopper, scale=scale, eps=1e-6, use_h0=True, device=inp.q.device)
    run = CH._Launch(*inp.args(), prob=prob, cu=cul, initial_state=inp.initial_state)
    run.prepare(prep)
    run.states(CH.build_states_kernel(prob, arch, on_hopper, use_h0=True))
    run.dstates(CH.build_dstates_kernel(prob, arch, on_hopper, scale=scale, use_dht=True), do, dht)
    run.bwd_dqk(CH.build_bwd_dqk_kernel(prob, arch, on_hopper, scale=scale))
    torch.cuda.synchronize()
    want = _oracle_partials(inp, do, dht, cul, scale, normalize_q)
    tol = tol_for(torch.bfloat16, "grad")
    for name in ("dq", "dkh", "dw", "dga"):
        got = getattr(run, name)
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        assert_rel_close(name, got, want[name], tol)


@pytest.mark.parametrize("path", ["sm_90a", "sm_80"], indirect=True)
@pytest.mark.parametrize("K,V", [(128, 128), (96, 192), (64, 64)])
@pytest.mark.parametrize("normalize_q", [True, False])
def test_backward_kernel_chain_matches_the_reference_backward(path, K, V, normalize_q):
    """kla_tl.chunk.chunk_bwd (prepare -> chunk_states -> chunk_dstates -> chunk_bwd_dqk -> chunk_bwd_wy): every gradient
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
