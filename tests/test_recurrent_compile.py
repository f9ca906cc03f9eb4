"""CPU tests of the token-by-token kernels (``decode``, ``fused_recurrent``): they build without a GPU for both code
paths, ptxas reports no local-memory spills, the generated code uses 128-bit state accesses, the lane layout covers
every state element exactly once, and the launchers pass arguments that match the compiled signatures.

Nothing here launches a kernel. Tests that run nvcc are marked ``slow`` (about 2 s per kernel without a warm
``TILELANG_CACHE_DIR``).
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import make_inputs

from kla_tl import recurrent as rec
from kla_tl.conventions import KERNEL_K, KERNEL_V, check_decode_inputs, check_inputs, check_recurrent_inputs
from kla_tl.kernels.registry import AMPERE_ON_HOPPER_PASS_CONFIGS, target_for
from kla_tl.reference import fused_recurrent_kla_reference, kla_decode_reference, naive_kla

R = pytest.importorskip("kla_tl.kernels.recurrent", reason="tilelang is not importable")

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")

#: (K, V) pairs the compile matrix covers: the common GDN size, the published KLA model's and the largest (the
#: default doubles the warps along K there).
DIMS = [(128, 128), (96, 192), (256, 256)]


# ------------------------------------------------------------------------------------------------ lane layout


@pytest.mark.parametrize("state_bytes", [4, 2])
def test_lane_layout_covers_each_state_element_once_and_reductions_stay_in_column_groups(state_bytes):
    """Every valid (block_v, threads, warps_k) of the space: each (row, col) of the K x block_v tile has one owner,
    the output lanes (first row group of the warps at wk = 0) write each column once, the publishing lanes (first
    row group of every warp) cover every (warp along K, column) once, and the xor shuffles combine exactly the lanes
    holding the same columns."""
    n = 0
    for K in KERNEL_K:
        for V in KERNEL_V:
            for bv in R.DECODE_SPACE["block_v"]:
                for th in R.DECODE_SPACE["threads"]:
                    for wk_n in R.DECODE_SPACE["warps_k"]:
                        if not R._layout_ok(K, V, bv, th, state_bytes, wk_n):
                            continue
                        lay = R.lane_layout(K, bv, th, state_bytes, wk_n)
                        vec, L, rows, passes, wv_n = lay.vec, lay.L, lay.rows, lay.passes, lay.warps_v
                        assert wv_n * wk_n * R.WARP == th
                        owner, out_cols, published = {}, [], []
                        for tx in range(th):
                            lane, warp = tx % R.WARP, tx // R.WARP
                            wv, wk = warp % wv_n, warp // wv_n
                            r0 = wk * (K // wk_n) + lane // L
                            cl = wv * (L * vec) + (lane % L) * vec
                            for p in range(passes):
                                for j in range(vec):
                                    cell = (p * rows + r0, cl + j)
                                    assert cell not in owner, f"K={K} block_v={bv} threads={th}: {cell} owned twice"
                                    owner[cell] = tx
                            if lane < L:
                                published += [(wk, cl + j) for j in range(vec)]
                                if wk == 0:
                                    out_cols += [cl + j for j in range(vec)]
                        assert len(owner) == K * bv and all(0 <= r < K and 0 <= c < bv for r, c in owner)
                        assert sorted(out_cols) == list(range(bv))
                        assert sorted(published) == [(w, c) for w in range(wk_n) for c in range(bv)]
                        offsets = [L << i for i in range((R.WARP // L).bit_length() - 1)]
                        for lane in range(R.WARP):
                            group = {lane}
                            for d in offsets:
                                group |= {x ^ d for x in group}
                            assert group == {x for x in range(R.WARP) if x % L == lane % L}
                        n += 1
    assert n > 0


@pytest.mark.parametrize("spec_name", ["decode", "fused_recurrent"])
def test_defaults_are_valid_members_of_the_space_for_every_kernel_head_dim(spec_name):
    spec = R.DECODE_SPEC if spec_name == "decode" else R.FUSED_RECURRENT_SPEC
    for arch in ("sm_90a", "sm_80"):
        for K in KERNEL_K:
            for V in KERNEL_V:
                for sdt in (("float32", "bfloat16") if spec_name == "decode" else ("float32",)):
                    key = {"H": 2, "HV": 4, "K": K, "V": V, "dtype": "bfloat16", "state_dtype": sdt}
                    sch = spec.default(arch, key)
                    assert set(sch) == set(spec.space)
                    assert all(sch[n] in spec.space[n] for n in sch), sch
                    assert spec.valid(arch, key, sch), (key, sch)


def test_bench_hooks_give_labelled_cases_for_every_example_key():
    """KernelSpec.bench builds its cases lazily: no GPU is touched until make_inputs runs."""
    for spec, n in ((R.DECODE_SPEC, 2), (R.FUSED_RECURRENT_SPEC, 2)):
        for key in spec.example_keys:
            cases = spec.bench("sm_90a", key)
            assert len(cases) == n and len({c.label for c in cases}) == n
            assert all(callable(c.make_inputs) and callable(c.run) and callable(c.check) for c in cases)


@pytest.mark.parametrize("state_bytes", [4, 2])
def test_max_regs_prunes_caps_that_leave_no_room_beside_the_tile(state_bytes):
    key = {"H": 2, "HV": 4, "K": 128, "V": 128, "dtype": "bfloat16",
           "state_dtype": "float32" if state_bytes == 4 else "bfloat16"}
    full = {"block_v": 128, "threads": 256, "warps_k": 8}          # 64 values per thread
    assert R.DECODE_SPEC.valid("sm_90a", key, {**full, "max_regs": 128})
    assert R.DECODE_SPEC.valid("sm_90a", key, {**full, "max_regs": 64}) == (state_bytes == 2)
    assert R.min_blocks(256, 128) == 2 and R.min_blocks(128, 80) == 6 and R.min_blocks(512, 255) == 1


# ----------------------------------------------------------------------------------------- code path, schedules


def test_code_path_honours_kla_tl_arch(monkeypatch):
    monkeypatch.setattr(rec.dispatch, "arch_of", lambda device: "sm_90a")
    dev = torch.device("cpu")
    assert rec._code_path(dev, None) == ("sm_90a", None, None)
    assert rec._code_path(dev, "sm_90a") == ("sm_90a", None, None)
    arch, target_arch, configs = rec._code_path(dev, "sm_80")
    assert (arch, target_arch) == ("sm_80", "sm_90a") and configs == AMPERE_ON_HOPPER_PASS_CONFIGS
    with pytest.raises(ValueError, match="KLA_TL_ARCH"):
        rec._code_path(dev, "sm_90")
    monkeypatch.setattr(rec.dispatch, "arch_of", lambda device: "sm_80")
    arch, target_arch, configs = rec._code_path(dev, "sm_80")
    assert (arch, target_arch, configs) == ("sm_80", "sm_80", target_for("sm_80")[1])


def test_invalid_tuned_schedule_falls_back_to_default_with_a_warning(monkeypatch):
    class FakeSchedules:
        @staticmethod
        def lookup(kernel, device, key, *, arch=None):
            return {"block_v": 48, "threads": 128, "warps_k": 1, "max_regs": 255}, "fake.json"

    monkeypatch.setitem(sys.modules, "kla_tl.schedules", FakeSchedules)
    key = {"H": 2, "HV": 4, "K": 128, "V": 128, "dtype": "bfloat16", "state_dtype": "float32"}
    with pytest.warns(RuntimeWarning, match="does not fit"):
        sch, source = rec._schedule("decode", R.DECODE_SPEC, torch.device("cpu"), key, "sm_90a")
    assert sch == R.DECODE_SPEC.default("sm_90a", key) and "default" in source


def test_refusals_name_missing_backward_and_unsupported_pools(monkeypatch):
    monkeypatch.setattr(rec.dispatch, "common_refusal", lambda prob, device: None)
    inp = make_inputs(1, 3, 2, 2, 64, 64, dtype=torch.bfloat16)
    prob, _ = check_inputs("t", *inp.args())
    assert "no backward kernel" in rec.recurrent_refusal(prob, torch.device("cpu"), needs_grad=True)
    assert rec.recurrent_refusal(prob, torch.device("cpu"), needs_grad=False) is None
    d = make_inputs(2, 1, 2, 2, 64, 64, dtype=torch.bfloat16)
    pool = torch.zeros(2, 2, 64, 64, dtype=torch.float64)
    dprob = check_decode_inputs("t", *d.args(), pool)
    assert "float64" in rec.decode_refusal(dprob, torch.device("cpu"), pool)
    assert rec.decode_refusal(dprob, torch.device("cpu"), pool.float()) is None


# -------------------------------------------------------------------------------------------------- compilation


def _ptxas_report(kernel, arch: str, pass_configs: dict) -> str:
    """ptxas -v of the generated source, compiled the way TileLang does (independent of the kernel cache)."""
    import tempfile

    import tilelang

    tl = os.path.dirname(tilelang.__file__)
    inc = [os.path.join(tl, "src"), os.path.join(tl, "3rdparty", "cutlass", "include")]
    inc = [p for p in inc if os.path.isdir(p)] or [os.path.join(tl, "3rdparty", "..", "src")]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.cu")
        with open(src, "w") as f:
            f.write(kernel.get_kernel_source())
        cmd = [NVCC, "--cubin", "-O3", f"-arch={arch}", "-std=c++20", "--ptxas-options=--verbose", "-w",
               "-o", os.path.join(d, "k.cubin"), src] + [f"-I{p}" for p in inc]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout + res.stderr


def _check_resources(report: str, name: str):
    regs = re.findall(r"Used (\d+) registers", report)
    assert regs, f"{name}: no ptxas register report in:\n{report}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert all(int(s) == 0 and int(l) == 0 for s, l in spills), f"{name}: local-memory spills:\n{report}"
    stack = re.findall(r"(\d+) bytes stack frame", report)
    assert all(int(s) == 0 for s in stack), f"{name}: stack frame (local arrays in memory):\n{report}"
    return int(regs[0])


def _keys(K, V):
    dec = {"H": 2, "HV": 4, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "state_dtype": "float32",
           "use_indices": True, "normalize_q": True}
    fused = {"H": 2, "HV": 4, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "use_h0": True,
             "store_ht": True, "is_varlen": True, "normalize_q": True}
    return [("decode", R.DECODE_SPEC, dec), ("decode", R.DECODE_SPEC, {**dec, "state_dtype": "bfloat16"}),
            ("fused_recurrent", R.FUSED_RECURRENT_SPEC, fused)]


def test_decode_default_builds_for_hopper_with_128_bit_state_accesses():
    """The one quick build: decode, K = V = 128, fp32 pool, sm_90a (no nvcc run beyond TileLang's own): 128-bit
    state accesses, 64-bit pool offsets, one grid axis, the register cap of max_regs, and block barriers only for
    the exchange between warps stacked along K (two)."""
    key = _keys(128, 128)[0][2]
    sch = R.DECODE_SPEC.default("sm_90a", key)
    kernel = R.DECODE_SPEC.build("sm_90a", key, sch)
    src = kernel.get_kernel_source()
    assert re.search(r"\*\(float4\*\)\(state \+", src), "fp32 state loads are not 128-bit"
    assert "(int64_t)sl" in src, "pool offsets are not 64-bit"
    assert "blockIdx.y" not in src and "blockIdx.z" not in src, "decode grid must be one axis"
    assert f"__launch_bounds__({sch['threads']}, {R.min_blocks(sch['threads'], sch['max_regs'])})" in src
    assert "__shfl_xor_sync" in src
    assert src.count("__syncthreads()") == (2 if sch["warps_k"] > 1 else 0)


@pytest.mark.slow
def _path_target(path: str):
    """(arch, target arch, pass configs) of a code path: sm_90a, sm_80, or the Ampere path built for an H100."""
    arch = "sm_80" if path.startswith("sm_80") else "sm_90a"
    if path == "sm_80_on_hopper":
        target, configs = target_for("sm_80", run_on_hopper=True)
        return arch, target["arch"], configs
    return arch, arch, target_for(arch)[1]


@needs_nvcc
@pytest.mark.parametrize("path", ["sm_90a", "sm_80", "sm_80_on_hopper"])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"K{d[0]}_V{d[1]}")
def test_default_schedules_build_without_spills(path, dims):
    arch, target_arch, configs = _path_target(path)
    for name, spec, key in _keys(*dims):
        sch = spec.default(arch, key)
        kernel = spec.build(arch, key, sch, target_arch=target_arch, pass_configs=configs)
        src = kernel.get_kernel_source()
        if name == "decode":
            vec_type = "float4" if key["state_dtype"] == "float32" else "uint4"
            assert re.search(rf"\*\({vec_type}\*\)\(state \+", src), \
                f"{name} {key['state_dtype']}: no 128-bit state load"
        regs = _check_resources(_ptxas_report(kernel, target_arch, configs), f"{name} {path} {dims}")
        assert regs <= 255


# ------------------------------------------------------------------------------- fused_recurrent serving variants


def _serving_key(K, V, *, pool="bfloat16", inplace=True, inter="bfloat16", varlen=True):
    """A fused_recurrent key with the serving flags (pool through state_indices, optional in-place final state and
    per-token states)."""
    return {"H": 2, "HV": 4, "K": K, "V": V, "dtype": "bfloat16", "gate_dtype": "float32", "use_h0": True,
            "store_ht": True, "is_varlen": varlen, "normalize_q": True, "state_dtype": pool, "use_indices": True,
            "is_inplace": inplace, "store_inter": inter is not None, "inter_dtype": inter or "float32"}


def _fused_params(key):
    sch = R.FUSED_RECURRENT_SPEC.default("sm_90a", key)
    func = R.build_fused_recurrent(H=key["H"], HV=key["HV"], K=key["K"], V=key["V"], dtype=key["dtype"],
                                   gate_dtype=key["gate_dtype"], use_h0=key["use_h0"], store_ht=key["store_ht"],
                                   is_varlen=key["is_varlen"], normalize_q=key["normalize_q"],
                                   **R.fused_serving_flags(key), **sch)
    return [str(p.name).replace("_handle", "") for p in func.params]


def test_serving_flags_select_the_extended_signature_and_plain_keys_keep_theirs():
    """Plain keys (no serving flag, as rec.fused_key writes them) build the original prim_func, so their TileLang
    cache entries stay valid; any of use_indices / store_inter builds the serving one."""
    plain = ["q", "k", "v", "g", "eta", "h0", "ht", "cu_seqlens", "o", "scale", "eps"]
    serving = ["q", "k", "v", "g", "eta", "h0", "ht", "cu_seqlens", "state_indices", "inter", "o", "scale", "eps"]
    key = _keys(128, 128)[2][2]
    assert not R.fused_is_serving(key) and _fused_params(key) == plain
    assert _fused_params(_serving_key(128, 128)) == serving
    assert _fused_params({**key, "store_inter": True}) == serving
    prob, _ = check_inputs("t", *make_inputs(1, 3, 2, 4, 64, 64, dtype=torch.bfloat16).args())
    plain_key = rec.fused_key(prob, dtype=torch.bfloat16, gate_dtype=torch.float32, use_h0=True, store_ht=True,
                              normalize_q=True)
    assert set(plain_key) == {"H", "HV", "K", "V", "dtype", "gate_dtype", "use_h0", "store_ht", "is_varlen",
                              "normalize_q"}
    assert R.FUSED_RECURRENT_SPEC.space == {"block_v": (16, 32, 64, 128), "threads": (32, 64, 128, 256),
                                            "block_t": (8, 16, 32)}, "shipped schedule files validate against it"


#: (K, V, key flags) of the serving builds: everything on (bf16 pool in place, bf16 per-token states, varlen) for
#: every head-dim pair, and the verify flavour (fp32 pool read-only, fp32 states, dense rows) once.
SERVING_BUILDS = [(K, V, {}) for K, V in DIMS] + [
    (128, 128, {"pool": "float32", "inplace": False, "inter": "float32", "varlen": False})]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("path", ["sm_90a", "sm_80", "sm_80_on_hopper"])
@pytest.mark.parametrize("build", SERVING_BUILDS,
                         ids=lambda b: f"K{b[0]}_V{b[1]}" + ("_verify_fp32" if b[2] else "_inplace_bf16"))
def test_serving_variants_build_without_spills(path, build):
    """The serving variant builds on both code paths without spills; the padding branch guards the pool, the pool
    and per-token offsets are 64-bit, and the fp32 buffers keep 128-bit accesses (bf16: 64-bit, 4 values)."""
    K, V, flags = build
    key = _serving_key(K, V, **flags)
    arch, target_arch, configs = _path_target(path)
    kernel = R.FUSED_RECURRENT_SPEC.build(arch, key, R.FUSED_RECURRENT_SPEC.default(arch, key),
                                          target_arch=target_arch, pass_configs=configs)
    src = kernel.get_kernel_source()
    assert "if (sl < 0)" in src and "if (0 <= sl)" in src, "pool accesses are not guarded by the padding branch"
    assert "((int64_t)sl) *" in src, "pool offsets are not 64-bit"
    assert re.search(r"\(\(int64_t\)bb\) \* \(\(int64_t\)T\)\) \* \(int64_t\)\d+", src), \
        "per-token offsets are not 64-bit"
    vec = {"float32": "float4", "bfloat16": "uint2"}
    assert re.search(rf"\*\({vec[key['state_dtype']]}\*\)\(h0 \+", src), "pool accesses are not vectorized"
    assert re.search(rf"\*\({vec[key['inter_dtype']]}\*\)\(inter \+", src), "per-token stores are not vectorized"
    regs = _check_resources(_ptxas_report(kernel, target_arch, configs), f"fused serving {path} {K}x{V} {flags}")
    assert regs <= 255


# --------------------------------------------------------------------------------------- launcher <-> signature


class _CheckedLaunch:
    """Stands in for the compiled executable: checks every argument against the compiled signature (what TileLang's
    host code checks on a GPU: count, dtypes, ranks, static dims, shared dynamic dims, packed strides, alignment),
    then runs the float64 reference in its place so the launcher's output handling can be checked too."""

    def __init__(self, kernel, emulate):
        self.kernel, self.emulate, self.calls = kernel, emulate, 0
        self.names = [str(p.name).replace("_handle", "") for p in kernel.prim_func.params]

    def __call__(self, *args):
        params = self.kernel.params
        assert len(args) == len(params), f"{len(args)} arguments for {self.names}"
        dyn = {}
        for name, p, a in zip(self.names, params, args):
            if len(p.shape) == 0:
                assert isinstance(a, float), f"{name}: expected a float scalar, got {type(a).__name__}"
                continue
            assert isinstance(a, torch.Tensor), f"{name}: expected a tensor"
            assert a.dtype == p.torch_dtype(), f"{name}: dtype {a.dtype} != {p.torch_dtype()}"
            assert a.dim() == len(p.shape), f"{name}: rank {a.dim()} != {len(p.shape)}"
            for i, (want, got) in enumerate(zip(p.shape, a.shape)):
                if hasattr(want, "name"):
                    assert dyn.setdefault(want.name, got) == got, f"{name}: dim {i} ({want.name}) inconsistent"
                else:
                    assert int(want) == got, f"{name}: dim {i} is {got}, kernel built for {int(want)}"
            assert a.stride() == rec._packed_strides(a.shape), f"{name}: strides {a.stride()} not packed"
            align = 16 if name in ("v", "o", "state", "h0", "ht", "inter") else a.element_size()
            assert a.data_ptr() % align == 0, f"{name}: not {align}-byte aligned"
        self.calls += 1
        self.emulate(dict(zip(self.names, args)))


def _fake_launch(monkeypatch, emulate):
    launches = []

    def launch_for(name, device, key):
        spec = R.DECODE_SPEC if name == "decode" else R.FUSED_RECURRENT_SPEC
        kernel = spec.build("sm_90a", key, spec.default("sm_90a", key))
        fake = _CheckedLaunch(kernel, emulate)
        launches.append((key, fake))

        class L:
            fn = fake
        return L

    monkeypatch.setattr(rec, "_launch_for", launch_for)
    return launches


def _emulate_decode(a):
    idx = a.get("state_indices")
    o = kla_decode_reference(a["q"], a["k"], a["v"], a["g"], a["eta"], a["state"], state_indices=idx,
                             scale=a["scale"], eps=a["eps"], normalize_q=True)
    a["o"].copy_(o)


@pytest.mark.slow
@pytest.mark.parametrize("use_indices", [True, False])
def test_decode_launcher_matches_signature_and_fills_out(monkeypatch, use_indices):
    launches = _fake_launch(monkeypatch, _emulate_decode)
    B, H, HV, K, V = 3, 2, 4, 64, 64
    big = make_inputs(B, 4, H, HV, K, V, dtype=torch.bfloat16)
    q, k, v, g, eta = (x[:, 2:3] for x in big.args())   # strided [B, 1, ...] slices: the launcher must pack them
    pool = torch.randn(B + 2, HV, K, V) if use_indices else torch.randn(B, HV, K, V)
    idx = torch.tensor([4, -1, 0], dtype=torch.int32) if use_indices else None
    prob = check_decode_inputs("t", q, k, v, g, eta, pool, state_indices=idx, normalize_q=True)
    want_pool = pool.clone()
    want = kla_decode_reference(q, k, v, g, eta, want_pool, state_indices=idx, normalize_q=True)
    out = torch.full((B, 1, HV, V), float("nan"), dtype=torch.bfloat16)
    got = rec.kla_decode_kernel(q, k, v, g, eta, pool, prob=prob, state_indices=idx, normalize_q=True, out=out)
    assert got is out and launches[0][1].calls == 1
    assert launches[0][0]["use_indices"] is use_indices
    assert torch.equal(out, want) and torch.equal(pool, want_pool)
    # a non-contiguous out is filled through a temporary
    out2 = torch.full((B, 1, V, HV), float("nan"), dtype=torch.bfloat16).transpose(2, 3)
    pool2 = want_pool.clone()
    rec.kla_decode_kernel(q, k, v, g, eta, pool2, prob=prob, state_indices=idx, normalize_q=True, out=out2)
    assert not torch.isnan(out2).any()
    with pytest.raises(ValueError, match="state"):
        rec.kla_decode_kernel(q, k, v, g, eta, pool.transpose(2, 3), prob=prob, state_indices=idx,
                              normalize_q=True)


def _emulate_fused(a, *, cu, use_h0, store_ht):
    x = {n: a[n] for n in ("q", "k", "v", "g", "eta")}
    o, ht = naive_kla(*x.values(), scale=a["scale"], eps=a["eps"], normalize_q=True,
                      initial_state=a["h0"] if use_h0 else None, output_final_state=True, cu_seqlens=cu)
    a["o"].copy_(o)
    if store_ht:
        a["ht"].copy_(ht)


@pytest.mark.slow
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("use_h0", [False, True])
def test_fused_recurrent_launcher_matches_signature(monkeypatch, varlen, use_h0):
    cu = [0, 0, 3, 7, 7] if varlen else None
    B, T = (1, 7) if varlen else (2, 5)
    inp = make_inputs(B, T, 2, 4, 64, 64, dtype=torch.bfloat16, with_h0=use_h0, cu_seqlens=cu,
                      cu_dtype=torch.int64)
    cu_t = inp.cu_seqlens
    launches = _fake_launch(monkeypatch, lambda a: _emulate_fused(a, cu=cu_t, use_h0=use_h0, store_ht=True))
    prob, cu_list = check_inputs("t", *inp.args(), normalize_q=True, **inp.kwargs())
    o, ht = rec.fused_recurrent_kla_kernel(*inp.args(), prob=prob, cu=cu_list, normalize_q=True,
                                           output_final_state=True, **inp.kwargs())
    o_ref, ht_ref = naive_kla(*inp.args(), normalize_q=True, output_final_state=True, **inp.kwargs())
    assert launches[0][0]["is_varlen"] is varlen and launches[0][0]["use_h0"] is use_h0
    assert torch.equal(o, o_ref) and torch.allclose(ht, ht_ref)


@pytest.mark.slow
@pytest.mark.parametrize("inplace", [False, True], ids=["verify", "inplace"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fused_recurrent_serving_launcher_matches_signature(monkeypatch, varlen, inplace):
    """The serving launch passes the pool, int32 state_indices and the per-token buffer in place (same memory as
    the caller's), strided indices packed, and the placeholders that match the compiled signature."""
    cu = [0, 2, 2, 6, 7] if varlen else None
    B, T = (1, 7) if varlen else (4, 3)
    N = 4
    inp = make_inputs(B, T, 2, 4, 64, 64, dtype=torch.bfloat16, cu_seqlens=cu)
    pool = (0.1 * torch.randn(N + 2, 4, 64, 64)).to(torch.bfloat16)
    idx = torch.tensor([5, 0, -1, 0, 1, 0, 2, 0], dtype=torch.int32)[::2]            # strided: packed by the launcher
    inter = torch.full((B * T, 4, 64, 64), float("nan"))
    ptrs = (pool.data_ptr(), inter.data_ptr())
    kw = dict(state_indices=idx, inplace_final_state=inplace, intermediate_states=inter)

    def emulate(a):
        assert (a["h0"].data_ptr(), a["inter"].data_ptr()) == ptrs, "pool / per-token buffer must not be copied"
        o, ht = fused_recurrent_kla_reference(a["q"], a["k"], a["v"], a["g"], a["eta"], scale=a["scale"],
                                              eps=a["eps"], normalize_q=True, output_final_state=True,
                                              initial_state=a["h0"], state_indices=a["state_indices"],
                                              inplace_final_state=inplace, intermediate_states=a["inter"],
                                              cu_seqlens=inp.cu_seqlens)
        a["o"].copy_(o)
        a["ht"].copy_(ht)

    launches = _fake_launch(monkeypatch, emulate)
    want_pool, want_inter = pool.clone(), inter.clone()
    o_ref, ht_ref = fused_recurrent_kla_reference(*inp.args(), normalize_q=True, output_final_state=True,
                                                  initial_state=want_pool, state_indices=idx,
                                                  inplace_final_state=inplace, intermediate_states=want_inter,
                                                  cu_seqlens=inp.cu_seqlens)
    prob, cu_list = check_recurrent_inputs("t", *inp.args(), normalize_q=True, initial_state=pool,
                                           cu_seqlens=inp.cu_seqlens, **kw)
    o, ht = rec.fused_recurrent_kla_kernel(*inp.args(), prob=prob, cu=cu_list, normalize_q=True,
                                           output_final_state=True, initial_state=pool, cu_seqlens=inp.cu_seqlens,
                                           **kw)
    key = launches[0][0]
    assert (key["use_indices"], key["is_inplace"], key["store_inter"]) == (True, inplace, True)
    assert (key["state_dtype"], key["inter_dtype"], key["is_varlen"]) == ("bfloat16", "float32", varlen)
    assert launches[0][1].calls == 1
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)
    assert torch.equal(pool, want_pool) and torch.equal(inter.nan_to_num(7.0), want_inter.nan_to_num(7.0))
