"""CPU tests of the backward's state recurrences (:mod:`kla_tl.kernels.chunk_states`): the chunk-offset table, the
schedule, (slow) both kernels building on every code path without spills with the launcher's arguments matching
their signatures, and the state-gradient recurrence transcribed in float64 against the reference backward. The
kernels' numerics run on a GPU (tests/test_chunk_fwd_gpu.py)."""

import pytest
import torch

from kla_tl import chunk as CH
from kla_tl.conventions import Problem


def test_chunk_offsets_index_each_sequences_first_chunk(monkeypatch):
    monkeypatch.setattr(CH, "_TABLES", {})
    prob = Problem(B=1, T=330, H=2, HV=2, K=64, V=64, N=4, dtype=torch.bfloat16, is_varlen=True, use_h0=False,
                   normalize_q=False)
    seqs, chunks, coff = CH._tables(prob, [0, 130, 130, 131, 330], torch.device("cpu"))
    assert coff.tolist() == [0, 3, 3, 4]                         # 3 chunks, empty, 1 chunk, 4 chunks
    assert chunks.shape[0] == 8 and chunks[3].tolist() == [130, 131] and chunks[4].tolist() == [131, 330]
    assert seqs.tolist() == [[0, 130], [130, 130], [130, 131], [131, 330]]


def test_row_tiles_pad_k_to_the_wgmma_tile_and_refuse_multi_stage_loops_when_padded():
    from kla_tl.kernels._tl import k_tile, row_tile_io

    assert [k_tile(K) for K in (48, 64, 96, 128, 160, 256)] == [64, 64, 128, 128, 192, 256]
    row_tile_io(128, 2)                      # unpadded: any number of stages
    row_tile_io(96, 1)
    with pytest.raises(ValueError, match="num_stages=2 with K=96 padded to 128"):
        row_tile_io(96, 2)


def test_state_schedule_defaults():
    assert CH.state_schedule("sm_90a", {"K": 128, "tiles": "many"}) == {"block_v": 64, "threads": 128}
    assert CH.state_schedule("sm_80", {"K": 128, "tiles": "few"}) == {"block_v": 32, "threads": 128}
    assert CH.state_schedule("sm_90a", {"K": 256, "tiles": "many"})["threads"] == 256
    assert CH.state_schedule("sm_90a", {"K": 128, "tiles": "many", "dtype": "float32"}) == {"block_v": 32,
                                                                                         "threads": 256}


#: (path, K, V, dtype): every path and head dim in bfloat16; float32 (the exact-FMA builds) once
_STATE_BUILDS = ([(p, K, V, torch.bfloat16) for p in ("sm_90a", "sm_80", "sm_80_on_hopper")
                  for K, V in ((128, 128), (96, 192), (64, 64), (256, 256))]
                 + [("sm_90a", 64, 64, torch.float32)])


@pytest.mark.slow
@pytest.mark.parametrize("path,K,V,dtype", _STATE_BUILDS,
                         ids=lambda x: str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else None)
def test_state_kernels_build_without_spills_and_match_the_launcher(path, K, V, dtype, monkeypatch):
    pytest.importorskip("tilelang")
    from kla_tl.kernels.resources import resource_report

    arch = "sm_80" if path.startswith("sm_80") else "sm_90a"
    H, HV, B, T = 2, 4, 2, 100
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B, dtype=dtype, is_varlen=False, use_h0=True,
                   normalize_q=True)
    states = CH.build_states_kernel(prob, arch, path == "sm_80_on_hopper", use_h0=True)
    dstates = CH.build_dstates_kernel(prob, arch, path == "sm_80_on_hopper", scale=K ** -0.5, use_dht=True)
    kernels = [states, dstates]
    if K <= 128:                                        # the chunk-gradient kernel has no K blocks yet
        kernels.append(CH.build_bwd_grads_kernel(prob, arch, path == "sm_80_on_hopper", scale=K ** -0.5, eps=1e-6))
    smem = 163 * 1024 if path == "sm_80" else 227 * 1024          # an A100's and an H100's shared memory per block
    for kern in kernels:
        for name, r in resource_report(kern).items():
            # the chunk-gradient kernel runs 512 threads (128 registers each: 1.8x faster than 256 threads on an
            # H100); some builds spill a few bytes (the mma build of the Ampere path holds GEMM operands in
            # registers: 16 B stored and 24 B loaded with GVA at K = V = 128 since dg's chunk tail moved to the
            # state-gradient kernel, 8-12 B before; the fused GVA group at K = 96, V = 192 on Hopper: 4 B)
            spill = 24 if name.startswith("chunk_bwd_grads") else 0
            assert r["spill_stores"] <= spill and r["spill_loads"] <= spill, (name, r)
            assert r["dyn_smem"] <= smem, (name, r)
    monkeypatch.setattr(CH, "_TABLES", {})
    x = [torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype),
         torch.randn(B, T, HV, V, dtype=dtype), -torch.rand(B, T, HV), torch.rand(B, T, HV)]
    run = CH._Launch(*x, prob=prob, cu=None, initial_state=torch.zeros(B, HV, K, V), backward=True)
    calls = []

    def record(*a):             # the arguments, and the names they have on the launch object at the call
        calls.append((a, {id(t): n for n, t in vars(run).items() if isinstance(t, torch.Tensor)}))

    run.states(record)
    run.dstates(record, torch.randn(B, T, HV, V, dtype=dtype), torch.randn(B, HV, K, V), CH.zparts(prob, arch),
                CH.tparts(prob, arch))
    run.grads(record, CH.fuse_group(prob, arch))
    dims = {"TT": B * T, "N": B, "NCT": run.chunks.shape[0], "NC": run.chunks.shape[0]}
    for kern, (args, attr) in zip(kernels, calls):
        f = kern.prim_func
        params = [p for p in f.params if p in f.buffer_map]
        assert len(params) == len(args)
        for p, a in zip(params, args):
            name, buf = str(p.name).removesuffix("_handle"), f.buffer_map[p]
            assert attr[id(a)] == name, (name, attr[id(a)])
            shape = tuple(dims[str(d)] if not str(d).isdigit() else int(d) for d in buf.shape)
            assert tuple(a.shape) == shape and str(a.dtype).replace("torch.", "") == str(buf.dtype), name


def _dstates_emulated(q, k, g, eta, do, dht, *, scale, eps=1e-6, C=64):
    """float64 torch transcription of the recurrence :func:`kla_tl.kernels.chunk_states.build_chunk_dstates`
    implements (normalized form, raw q/k with their row scalings, GVA), one dense sequence per batch row."""
    B, T, H, K = q.shape
    HV = g.shape[2]
    dh0 = torch.zeros_like(dht)
    for b in range(B):
        for hv in range(HV):
            hk, dS = hv // (HV // H), dht[b, hv].clone()
            for c in reversed(range(-(-T // C))):
                sl = slice(c * C, min(T, c * C + C))
                kk, qq, dO = k[b, sl, hk], q[b, sl, hk], do[b, sl, hv]
                rk = (kk.pow(2).sum(-1) + eps).rsqrt()
                rq = (qq.pow(2).sum(-1) + 1e-6).rsqrt()
                kh, qh = kk * rk[:, None], qq * rq[:, None]
                gam, e = g[b, sl, hv].cumsum(0), eta[b, sl, hv]
                gmat = torch.exp(gam[:, None] - gam[None, :])
                L = torch.linalg.inv(torch.eye(len(gam), dtype=q.dtype) + torch.tril(e[:, None] * (kh @ kh.T) * gmat, -1))
                W = L @ (e[:, None] * gam.exp()[:, None] * kh)
                aqk = torch.tril(scale * (qh @ kh.T) * gmat)
                dN = aqk.T @ dO + (rk * torch.exp(gam[-1] - gam))[:, None] * (kk @ dS)
                dS = gam[-1].exp() * dS + qq.T @ ((scale * rq * gam.exp())[:, None] * dO) - W.T @ dN
            dh0[b, hv] = dS
    return dh0


def test_dstates_recurrence_is_the_reference_backwards_initial_state_gradient():
    """The formulas of the backward's state-gradient kernel (its docstring), transcribed in float64 torch, give the
    hand-written reference backward's dh0 (tails, GVA, q normalization, mixed key norms)."""
    from kla_tl.reference_bwd import chunk_kla_reference_bwd

    B, T, H, HV, K, V = 2, 150, 2, 4, 16, 8
    f = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, **f), torch.randn(B, T, H, K, **f) * 10 ** (3 * torch.rand(B, T, H, 1, **f) - 1.5)
    v, do = torch.randn(B, T, HV, V, **f), torch.randn(B, T, HV, V, **f)
    g, eta = -torch.rand(B, T, HV, **f), torch.rand(B, T, HV, **f)
    h0, dht = torch.randn(B, HV, K, V, **f), torch.randn(B, HV, K, V, **f)
    want = chunk_kla_reference_bwd(q, k, v, g, eta, do, dht=dht, normalize_q=True, initial_state=h0)["dh0"]
    got = _dstates_emulated(q, k, g, eta, do, dht, scale=K ** -0.5)
    assert ((got - want).norm() / want.norm()).item() < 1e-10


@pytest.mark.parametrize("store_l", [False, True])
def test_launch_allocates_what_a_forward_keeps_in_the_saved_layout(store_l):
    """The forward's aqk, gcum, rk, rq have the shapes and dtypes of ``saved_shapes`` (aqk 128 wide when L is
    stored for the backward, 64 otherwise), which the operator's fake implementation also promises."""
    B, T, H, HV, K, V = 2, 70, 2, 4, 64, 32
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B, dtype=torch.bfloat16, is_varlen=False, use_h0=False,
                   normalize_q=True)
    x = [torch.randn(B, T, H, K).bfloat16(), torch.randn(B, T, H, K).bfloat16(), torch.randn(B, T, HV, V).bfloat16(),
         -torch.rand(B, T, HV), torch.rand(B, T, HV)]
    run = CH._Launch(*x, prob=prob, cu=None, initial_state=None, store_l=store_l)
    want = CH.saved_shapes(B * T, H, HV, torch.bfloat16, 2 * CH.CHUNK if store_l else CH.CHUNK)
    got = tuple((tuple(t.shape), t.dtype) for t in (run.aqk, run.gcum, run.rk, run.rq))
    assert got == want
    assert want[0][0][-1] == (128 if store_l else 64)
