"""The chunk forward as ``kla-tl autotune`` sees it: schedule buckets (the scan's by tiles class), defaults, and the
GPU bench hooks of both stages (run on a GPU only)."""

import pytest
import torch

from kla_tl.chunk import BENCH_SHAPES, chunk_bench_cases, problem_key
from kla_tl.conventions import Problem
from kla_tl.kernels import chunk_fwd as CF


def _prob(N, HV, V=128, K=128, H=None):
    return Problem(B=N, T=64, H=H or HV, HV=HV, K=K, V=V, N=N, dtype=torch.bfloat16, is_varlen=False, use_h0=False,
                   normalize_q=True)


@pytest.mark.parametrize("N,HV,V,want", [(8, 16, 128, "many"), (2, 16, 128, "few"), (1, 64, 128, "few"),
                                         (1, 66, 128, "many"), (8, 64, 128, "many"), (1, 32, 192, "few")])
def test_tiles_class_counts_sequence_head_column_tiles(N, HV, V, want):
    assert CF.tiles_class(N, HV, V) == want
    assert problem_key(_prob(N, HV, V), use_h0=False, store_ht=True)["tiles"] == want


def test_scan_buckets_split_by_tiles_and_prepare_buckets_do_not():
    many = problem_key(_prob(8, 16), use_h0=False, store_ht=True)
    few = problem_key(_prob(2, 16), use_h0=False, store_ht=True)
    assert CF.SCAN.bucket(many) == "K128_V128_bfloat16_many" and CF.SCAN.bucket(few) == "K128_V128_bfloat16_few"
    assert CF.PREPARE.bucket(many) == CF.PREPARE.bucket(few) == "K128_V128_bfloat16"
    assert {CF.SCAN.bucket(k) for k in CF.SCAN.example_keys} >= {"K128_V128_bfloat16_many", "K128_V128_bfloat16_few"}


def test_scan_default_follows_the_tiles_class():
    many = problem_key(_prob(8, 16), use_h0=False, store_ht=True)
    few = problem_key(_prob(2, 16), use_h0=False, store_ht=True)
    assert CF.scan_default("sm_90a", many) == {"block_v": 64, "threads": 128, "num_stages": 1,
                                               "warp_specialize": False}
    assert CF.scan_default("sm_90a", few) == {"block_v": 32, "threads": 128, "num_stages": 2,
                                              "warp_specialize": True}
    assert not CF.scan_default("sm_80", few)["warp_specialize"]           # no warp specialization on Ampere
    padded = problem_key(_prob(2, 16, V=192, K=96), use_h0=False, store_ht=True)
    assert not CF.scan_default("sm_90a", padded)["warp_specialize"]      # masked loads: no specialization
    for key in CF.SCAN.example_keys:
        for arch in ("sm_90a", "sm_80"):
            assert CF.scan_valid(arch, key, CF.scan_default(arch, key))


def test_float32_takes_the_fma_schedule_and_lean_layouts_for_wide_heads(monkeypatch):
    """float32 runs exact FMA products: no warp specialization (nothing for TMA/wgmma to overlap), 32 state columns
    and 256 threads per CTA (twice the tile bytes); wide float32 heads take the lean layouts, so the kernels serve
    every head dim in float32 (float16 stays refused)."""
    from kla_tl import chunk as CH, dispatch
    from kla_tl.kernels._tl import lean_prepare, lean_scan

    fp32 = dict(problem_key(_prob(2, 16), use_h0=False, store_ht=True), dtype="float32")
    for arch in ("sm_90a", "sm_80"):
        sch = CF.scan_default(arch, fp32)
        assert sch == {"block_v": 32, "threads": 256, "num_stages": 1, "warp_specialize": False}
        assert not CF.scan_valid(arch, fp32, dict(sch, warp_specialize=True, num_stages=2))
    assert lean_prepare("float32", 256, 256) and lean_prepare("float32", 128, 256) and lean_scan("float32", 256)
    assert not lean_prepare("float32", 96, 192) and not lean_scan("float32", 128) and not lean_scan("float32", 96)
    assert not lean_prepare("bfloat16", 256, 256) and not lean_scan("bfloat16", 256)
    monkeypatch.setattr(dispatch, "common_refusal", lambda prob, device: None)   # the dtype clauses alone
    dev = torch.device("cuda")
    ok = dict(B=2, T=64, H=2, HV=2, N=2, dtype=torch.float32, is_varlen=False, use_h0=False, normalize_q=True)
    for K, V in ((128, 128), (96, 192), (64, 64), (48, 96), (256, 256), (256, 128), (128, 256)):
        assert CH.chunk_refusal(Problem(K=K, V=V, **ok), dev, needs_grad=False) is None
    why = CH.chunk_refusal(Problem(K=128, V=128, **dict(ok, dtype=torch.float16)), dev, needs_grad=False)
    assert why is not None and "float16" in why


def test_both_stages_have_bench_hooks_with_representative_shapes():
    assert CF.PREPARE.bench is not None and CF.SCAN.bench is not None
    assert set(BENCH_SHAPES) == {"many", "few"}
    for tiles, (B, T) in BENCH_SHAPES.items():           # the bench shape lands in its own bucket at K = V = 128
        assert CF.tiles_class(B, 16, 128) == tiles and T % 64 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["prepare", "scan"])
@pytest.mark.parametrize("key", [CF.SCAN_EXAMPLE_KEYS[0], CF.SCAN_EXAMPLE_KEYS[-1], CF.SCAN_EXAMPLE_KEYS[1]],
                         ids=["K128-many", "K128-few", "K96xV192"])
def test_bench_hook_cases_run_and_pass_their_check(stage, key):
    """What ``kla-tl autotune`` does with a candidate (here the default schedule): run, check against the float64
    reference, and a poisoned output caught by the check."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = CF.PREPARE if stage == "prepare" else CF.SCAN
    built = spec.build("sm_90a", key, spec.default("sm_90a", key))
    for case in chunk_bench_cases(stage, key):
        x = case.make_inputs(1)
        (x["run"].o if stage == "scan" else x["run"].u).fill_(float("nan"))   # poisoned: the stage must write it
        out = case.run(built, x)
        torch.cuda.synchronize()
        assert out.isfinite().all()
        assert case.check(x, out) is None
        x["run"].o.fill_(0.0)
        bad = dict(x, built=lambda *a: None)                # a "kernel" that writes nothing: the check must fail
        assert case.check(bad, out) is not None


@pytest.mark.slow
@pytest.mark.parametrize("K,V,HV,h0", [(128, 128, 8, True), (96, 192, 4, False)])
def test_launch_arguments_match_the_kernel_signatures(K, V, HV, h0, monkeypatch):
    """Without a GPU: the tensors the forward launcher passes to each stage match the compiled kernels' parameters
    by position (name, shape with the dynamic token/sequence dims bound, dtype), so an argument-order slip fails here."""
    pytest.importorskip("tilelang")
    from kla_tl import chunk as CH

    H, B, T = 4, 2, 100
    prob = Problem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=B, dtype=torch.bfloat16, is_varlen=False, use_h0=h0,
                   normalize_q=True)
    prep, scan = CH.build_kernels(prob, "sm_90a", False, scale=K ** -0.5, eps=1e-6, use_h0=h0)
    monkeypatch.setattr(CH, "_TABLES", {})
    x = [torch.randn(B, T, H, K).bfloat16(), torch.randn(B, T, H, K).bfloat16(), torch.randn(B, T, HV, V).bfloat16(),
         -torch.rand(B, T, HV), torch.rand(B, T, HV)]
    run = CH._Launch(*x, prob=prob, cu=None, initial_state=torch.zeros(B, HV, K, V) if h0 else None)
    dims = {"TT": B * T, "N": B, "NC": run.chunks.shape[0]}
    for kernel, stage in ((prep, run.prepare), (scan, run.scan)):
        got = []
        stage(lambda *args: got.extend(args))
        f = kernel.prim_func
        names = [str(p.name).removesuffix("_handle") for p in f.params if p in f.buffer_map]
        assert len(got) == len(names), (names, len(got))
        attr = {id(t): n for n, t in reversed(list(vars(run).items())) if isinstance(t, torch.Tensor)}
        for name, p, a in zip(names, [p for p in f.params if p in f.buffer_map], got):
            want = "ht" if (name == "h0" and not h0) else name       # without h0 the launcher passes ht (unread)
            assert attr[id(a)] == want, (name, attr[id(a)])
            buf = f.buffer_map[p]
            shape = tuple(dims[str(s)] if not str(s).isdigit() else int(s) for s in buf.shape)
            assert tuple(a.shape) == shape, (name, tuple(a.shape), shape)
            assert str(a.dtype).replace("torch.", "") == str(buf.dtype), (name, a.dtype, buf.dtype)
