"""CPU tests of the benchmark tooling: roofline counts, suites, `kla-tl bench` records and merge, `kla-tl report`.

The timer is stubbed (the kernels are not): on the CPU `chunk_kla` / `kla_decode` run the torch reference, so the
bench's check-then-time path runs for real on a tiny suite and only the clock is fake.
"""

from __future__ import annotations

import copy
import json

import pytest

from kla_tl import roofline
from kla_tl.bench import harness, peers, records, report, suites, timing
from kla_tl.cli import main

TINY_SUITES = {
    "defaults": {"K": 16, "V": 32, "normalize_q": True},
    "shapes": {
        "dense": {"B": 2, "T": 70, "H": 2, "HV": 4},                         # T tail (70 = 64 + 6), GVA
        "ragged": {"B": 1, "T": 100, "H": 2, "HV": 2, "varlen": [30, 70]},   # varlen
        "dec": {"B": 3, "H": 1, "HV": 2},
    },
    "suites": {
        "tiny": [
            {"op": "chunk_fwd", "shapes": ["dense", "ragged"], "dtypes": ["bfloat16"]},
            {"op": "chunk_fwdbwd", "shapes": ["dense"], "dtypes": ["bfloat16"]},
            {"op": "decode", "shapes": ["dec"], "dtypes": ["bfloat16"], "state_dtypes": ["float32", "bfloat16"]},
        ],
    },
}

CEILINGS = {"copy_tbps": 3.0, "bf16_tflops": 700.0, "gemm_n": 8192}


@pytest.fixture
def fake_clock(monkeypatch):
    """Every timing returns `fake_clock.ms` (median) with a 1 % band; the ceilings are fixed numbers."""
    class Clock:
        ms = 1.0
        calls = 0

    def bench_eager(fns, *, device, warmup_ms=0, rep_ms=0, grad_to_none=None):
        Clock.calls += 1
        for f in fns[:2]:                       # run the real call (on the CPU reference), not the measurement
            f()
        return timing.Timing(Clock.ms, 0.995 * Clock.ms, 1.005 * Clock.ms)

    monkeypatch.setattr(timing, "bench_eager", bench_eager)
    monkeypatch.setattr(timing, "measure_ceilings", lambda device, **kw: dict(CEILINGS))
    monkeypatch.setattr(timing, "l2_bytes", lambda device: 1 << 30)  # more sets than --max-sets 3 needed
    return Clock


@pytest.fixture
def suites_file(tmp_path):
    p = tmp_path / "suites.json"
    p.write_text(json.dumps(TINY_SUITES))
    return str(p)


def _bench(suites_file, out, *extra):
    return main(["bench", "--suites-file", suites_file, "--suite", "tiny", "--impls", "kla_tl", "--peers", "none",
                 "--device", "cpu", "--time-fallback", "--no-progress", "--max-sets", "3", "--out", str(out), *extra])


# ------------------------------------------------------------------------------------------------------------------
# roofline
# ------------------------------------------------------------------------------------------------------------------

def test_forward_flops_match_peers_count_for_k128_full_tiles():
    # PEERS.md section 4: 1.82e5 FLOP per token and value head (full tiles), 1.41e5 with the masks exploited
    assert roofline.chunk_fwd_flops_per_token_head(128, 128) == pytest.approx(1.82e5, rel=0.01)
    assert roofline.chunk_fwd_flops_per_token_head(128, 128, masked=True) == pytest.approx(1.41e5, rel=0.01)
    cost = roofline.chunk_fwd(B=8, T=4096, H=16, HV=16, K=128, V=128)
    assert cost.flops == pytest.approx(9.5e10, rel=0.01)           # PEERS.md section 6: 524,288 token-heads


def test_roofline_bytes_and_backward_match_peers_figures():
    assert roofline.chunk_fwd_bytes_per_token_head(128, 128) == 1032       # fused forward minimum, H = HV
    dec = roofline.decode(B=64, H=32, HV=32, K=128, V=128, state_dtype="float32")
    assert dec.bytes / (64 * 32) == pytest.approx(132e3, rel=0.01)           # 132 KB per (sequence, head)
    assert dec.intensity == pytest.approx(0.87, rel=0.01)
    ratio = roofline.chunk_bwd_flops_per_token_head(128, 128) / roofline.chunk_fwd_flops_per_token_head(128, 128)
    assert 2.0 <= ratio <= 2.6                                               # "about 2-2.5x forward"
    gva = roofline.chunk_fwd(B=1, T=32768, H=16, HV=64, K=128, V=128)
    assert gva.flops == pytest.approx(3.8e11, rel=0.01)                     # PEERS.md section 4 example


def test_cost_of_reads_record_shapes():
    shape = {"B": 4, "T": 1, "H": 16, "HV": 32, "K": 128, "V": 128, "dtype": "bfloat16", "state_dtype": "bfloat16",
             "varlen": None}
    c = roofline.cost_of("decode", shape)
    assert c.bytes == pytest.approx(roofline.decode(B=4, H=16, HV=32, K=128, V=128, state_dtype="bfloat16").bytes)
    with pytest.raises(ValueError, match="unknown op"):
        roofline.cost_of("nope", shape)


# ------------------------------------------------------------------------------------------------------------------
# suites
# ------------------------------------------------------------------------------------------------------------------

def test_packaged_suites_cover_the_issue_shapes():
    data = suites.load()
    full = suites.expand(data, "full")
    fwd = {(c.B, c.T, c.H, c.HV, c.K, c.V) for c in full if c.op == "chunk_fwd"}
    for shape in [(8, 4096, 16, 16, 128, 128), (2, 16384, 16, 16, 128, 128), (1, 32768, 32, 32, 128, 128),
                  (8, 4096, 12, 12, 96, 192), (1, 32768, 16, 32, 128, 128), (1, 32768, 16, 64, 128, 128)]:
        assert shape in fwd, shape
    varlen = [c for c in full if c.op == "chunk_fwd" and c.varlen]
    assert {c.HV for c in varlen} == {32, 64}
    assert all(len(c.varlen) == 8 and sum(c.varlen) == c.T == 32768 and len(set(c.varlen)) > 1 for c in varlen)
    dec = {(c.B, c.state_dtype) for c in full if c.op == "decode" and c.HV == 32 and c.K == c.V == 128}
    assert dec >= {(b, s) for b in (1, 8, 64, 256, 1024) for s in ("float32", "bfloat16")}
    assert {c.op for c in full} == {"chunk_fwd", "chunk_fwdbwd", "decode"}
    assert {c.op for c in suites.expand(data, "quick")} == {"chunk_fwd", "chunk_fwdbwd", "decode"}


def test_suites_validation_names_the_bad_entry():
    bad = copy.deepcopy(TINY_SUITES)
    bad["suites"]["tiny"][0]["shapes"].append("missing")
    with pytest.raises(ValueError, match="unknown shape 'missing'"):
        suites.validate(bad)
    bad = copy.deepcopy(TINY_SUITES)
    bad["shapes"]["ragged"]["varlen"] = [30, 71]
    with pytest.raises(ValueError, match="sum"):
        suites.validate(bad)


# ------------------------------------------------------------------------------------------------------------------
# bench: records and merge
# ------------------------------------------------------------------------------------------------------------------

def test_bench_writes_a_valid_results_file(fake_clock, suites_file, tmp_path):
    out = tmp_path / "cpu.json"
    assert _bench(suites_file, out) == 0
    data = records.load(str(out))
    assert records.validate(data) == []
    assert data["device"]["key"] == "cpu" and data["ceilings"] == CEILINGS
    assert set(data["versions"]) >= {"torch", "triton", "tilelang", "cuda", "fla", "flash_qla"}
    recs = data["records"]
    assert {(r["op"], r["graph"]) for r in recs} == {("chunk_fwd", False), ("chunk_fwdbwd", False),
                                                     ("decode", False), ("decode", True)}
    for r in recs:
        assert set(r["shape"]) == set(records.SHAPE_KEYS)
        assert r["backend"].startswith("reference")
        if r["op"] == "decode" and r["graph"]:
            assert r["ms"] is None and "CUDA" in r["error"]                 # no graphs on the CPU
            continue
        assert r["ms"] == 1.0 and r["spread"] == pytest.approx(0.01)
        assert r["sets"] == 3                                                # rotation, capped by --max-sets
        cost = roofline.cost_of(r["op"], r["shape"])
        assert r["tflops"] == pytest.approx(cost.flops / 1e-3 / 1e12)
        assert r["frac_bw"] == pytest.approx(r["gbps"] / 3000.0)
        assert max(r["check"].values()) < 2e-2                               # bf16 vs the float64 reference
    fwdbwd = next(r for r in recs if r["op"] == "chunk_fwdbwd")
    assert set(fwdbwd["check"]) == {"o", "dq", "dk", "dv", "dg", "deta"}
    varlen = next(r for r in recs if r["shape"]["varlen"])
    assert varlen["shape"]["varlen"] == [30, 70] and varlen["shape"]["B"] == 1


def test_bench_records_no_time_when_the_check_fails(fake_clock, suites_file, tmp_path, monkeypatch):
    monkeypatch.setitem(harness.TOLERANCES, "bfloat16", {"o": 0.0, "state": 0.0, "grad": 0.0})
    out = tmp_path / "cpu.json"
    assert _bench(suites_file, out, "--ops", "chunk_fwd") == 0
    recs = records.load(str(out))["records"]
    assert recs and all(r["ms"] is None and "check against the float64 reference failed" in r["error"] for r in recs)
    assert all(r["check"]["o"] > 0 for r in recs)
    assert fake_clock.calls == 0


def test_bench_merge_replaces_same_identity_and_keeps_the_rest(fake_clock, suites_file, tmp_path):
    out = tmp_path / "cpu.json"
    assert _bench(suites_file, out, "--ops", "chunk_fwd") == 0
    first = records.load(str(out))["records"]
    fake_clock.ms = 2.0
    assert _bench(suites_file, out, "--ops", "chunk_fwd", "--shapes", "dense", "--merge") == 0
    assert _bench(suites_file, out, "--ops", "decode", "--merge") == 0
    merged = records.load(str(out))
    assert records.validate(merged) == []
    by = {(r["op"], r["case"], r["graph"], r["shape"]["state_dtype"]): r["ms"] for r in merged["records"]}
    assert by[("chunk_fwd", "dense", False, None)] == 2.0                   # replaced
    assert by[("chunk_fwd", "ragged", False, None)] == 1.0                  # kept
    assert by[("decode", "dec", False, "float32")] == 2.0                   # added
    assert len(merged["records"]) == len(first) + 4                          # 2 state dtypes x (eager, graph)
    # without --merge the file is replaced
    assert _bench(suites_file, out, "--ops", "decode") == 0
    assert {r["op"] for r in records.load(str(out))["records"]} == {"decode"}


def test_merge_semantics_on_records():
    def rec(impl, ms, graph=False, B=1):
        return {"op": "decode", "impl": impl, "graph": graph, "ms": ms, "spread": 0.01,
                "shape": {"B": B, "T": 1, "H": 1, "HV": 1, "K": 8, "V": 8, "dtype": "bfloat16",
                          "state_dtype": "float32", "varlen": None}}
    old = [rec("kla_tl", 1.0), rec("kla_tl", 1.0, graph=True), rec("fla_triton", 3.0)]
    new = [rec("kla_tl", 0.5), rec("kla_tl", 9.0, B=2)]
    got = records.merge_records(old, new)
    assert [(r["impl"], r["graph"], r["shape"]["B"], r["ms"]) for r in got] == [
        ("kla_tl", False, 1, 0.5), ("kla_tl", True, 1, 1.0), ("fla_triton", False, 1, 3.0), ("kla_tl", False, 2, 9.0)]
    with pytest.raises(ValueError, match="another --out"):
        records.merge({"device": {"key": "h100"}, "records": []}, {"device": {"key": "a100"}, "records": []})


def test_device_keys_from_gpu_names():
    assert records.device_key("NVIDIA H100 80GB HBM3") == "h100"
    assert records.device_key("NVIDIA H200") == "h200"
    assert records.device_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert records.device_key("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert records.device_key("NVIDIA L40S") == "l40s"


def test_peers_needing_another_import_environment_go_to_a_child_process():
    here, away = peers.process_groups(["kla_tl", "fla", "fla_triton", "flash_qla"], environ_={})
    assert here == ["kla_tl", "fla", "flash_qla"]
    assert away == [({"FLA_DISABLE_BACKEND_DISPATCH": "1"}, ["fla_triton"])]
    here, away = peers.process_groups(["fla", "fla_triton"], environ_={"FLA_DISABLE_BACKEND_DISPATCH": "1"})
    assert here == ["fla_triton"] and away == [({"FLA_DISABLE_BACKEND_DISPATCH": "0"}, ["fla"])]


def test_literal_kla_inputs_make_beta_from_raw_keys():
    import torch
    k = torch.randn(1, 3, 2, 8)
    eta = torch.rand(1, 3, 4)
    q = torch.randn(1, 3, 2, 8)
    qn, beta = peers.literal_kla_inputs(q, k, eta, normalize_q=True)
    d = (k ** 2).sum(-1) + 1e-6
    assert torch.allclose(beta, eta / d.repeat_interleave(2, dim=2))      # value head hv reads q/k head hv // 2
    assert torch.allclose(qn.norm(dim=-1), torch.ones(1, 3, 2), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------

def _shape(**kw):
    s = {"B": 8, "T": 4096, "H": 16, "HV": 16, "K": 128, "V": 128, "dtype": "bfloat16", "state_dtype": None,
         "varlen": None}
    s.update(kw)
    return s


def _results(kla_ms=1.0, peer_ms=2.0, spread=0.01, key="h100"):
    recs = []
    for impl, ms in (("kla_tl", kla_ms), ("fla_triton", peer_ms), ("flash_qla", None)):
        r = {"op": "chunk_fwd", "impl": impl, "shape": _shape(), "ms": ms, "spread": spread if ms else None,
             "graph": False}
        if ms is None:
            r["error"] = "unsupported: test"
        recs.append(records.derive(r, CEILINGS))
    dec = {"op": "decode", "impl": "kla_tl", "shape": _shape(B=64, T=1, HV=32, state_dtype="float32"),
           "ms": 0.1 * kla_ms, "spread": spread, "graph": True}
    recs.append(records.derive(dec, CEILINGS))
    return {"schema": 1, "device": {"name": f"NVIDIA {key.upper()}", "key": key, "capability": [9, 0]},
            "versions": {"torch": "x", "fla": "0.6.0", "flash_qla": None}, "commit": "abc", "dirty": False,
            "date": "2026-01-01T00:00:00Z", "ceilings": dict(CEILINGS), "settings": {}, "records": recs}


def _report(tmp_path, results, baseline, *extra):
    rp, bp = tmp_path / "results.json", tmp_path / "baseline.json"
    records.save(results, str(rp))
    if baseline is not None:
        records.save(baseline, str(bp))
    outdir = tmp_path / "rep"
    rc = main(["report", "--results", str(rp), "--baseline", str(bp), "--out", str(outdir), "--no-plots", *extra])
    return rc, (outdir / "report.md").read_text()


def _slowed(res, factor, impls=("kla_tl",), spread=None):
    out = copy.deepcopy(res)
    for r in out["records"]:
        if r["impl"] in impls and r["ms"]:
            r["ms"] *= factor
            if spread is not None:
                r["spread"] = spread
            records.derive(r, out["ceilings"])
    return out


def test_report_identical_results_pass(tmp_path, capsys):
    rc, md = _report(tmp_path, _results(), _results())
    assert rc == 0
    assert "No kla-tl regression" in md
    assert "| B8 T4096 H16/16 K128 V128 bf16 | 1.000 ±1% | 2.000 ±1% | unsupported | 2.00× |" in md
    assert "| B64 H16/32 K128 V128 bf16 state fp32 | graph | 0.100 ±1% |" in md
    assert "# kla-tl benchmark report" in capsys.readouterr().out                  # printed to stdout too


def test_report_fails_on_a_kla_tl_slowdown_beyond_threshold_and_noise(tmp_path):
    base = _results()
    rc, md = _report(tmp_path, _slowed(base, 1.2), base)
    assert rc == 1
    assert "+20.0% **REGRESSION**" in md
    assert "2 kla-tl regression(s)" in md


def test_report_passes_a_slowdown_within_the_spread(tmp_path):
    base = _results(spread=0.3)
    rc, md = _report(tmp_path, _slowed(base, 1.2, spread=0.3), base)
    assert rc == 0 and "REGRESSION" not in md


def test_report_passes_a_slowdown_below_the_threshold(tmp_path):
    base = _results()
    rc, _ = _report(tmp_path, _slowed(base, 1.04), base)
    assert rc == 0


def test_report_does_not_fail_on_a_peer_slowdown(tmp_path):
    base = _results()
    rc, md = _report(tmp_path, _slowed(base, 1.5, impls=("fla_triton",)), base)
    assert rc == 0
    assert "slower (peer)" in md and "3.00×" in md


def test_report_without_a_baseline_file_or_from_another_gpu_compares_nothing(tmp_path):
    res = _results()
    rc, md = _report(tmp_path, _slowed(res, 2.0), None)
    assert rc == 0 and "not found: no comparison" in md
    rc, md = _report(tmp_path, _slowed(res, 2.0), _results(key="a100"))
    assert rc == 0 and "another GPU" in md


def test_report_lists_kla_tl_records_that_lost_their_time(tmp_path):
    base = _results()
    now = copy.deepcopy(base)
    now["records"][0].update(ms=None, spread=None, error="check against the float64 reference failed: o 1e-1 > 2e-2")
    rc, md = _report(tmp_path, now, base)
    assert "timed in the baseline but not now" in md and "check failed" in md


def test_report_build_is_usable_without_files():
    text, deltas, regs, _ = report.build(_slowed(_results(), 0.5), _results(), threshold=0.05)
    assert len(deltas) == 3 and not regs and "faster" in text


def test_a_kla_tl_call_that_partly_falls_back_is_not_timed(fake_clock):
    import warnings

    import torch

    class PartlyKernels(peers.KlaTl):
        def backend(self, case, inputs, device):
            return "kernels"                     # the refusal says kernels serve the call ...

        def chunk(self, *args, **kwargs):
            from kla_tl import dispatch
            dispatch.warn_once("chunk_kla", "backward recomputes through the torch reference")  # ... but not all
            return super().chunk(*args, **kwargs)

    case = suites.expand(TINY_SUITES, "tiny", ops=["chunk_fwd"])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = harness.run_job(PartlyKernels(), case, torch.device("cpu"))
        timed = harness.run_job(PartlyKernels(), case, torch.device("cpu"), time_fallback=True)
    assert recs[0]["ms"] is None and "partly reference: chunk_kla: backward" in recs[0]["error"]
    assert timed[0]["ms"] == 1.0 and timed[0]["backend"].startswith("partly reference")


def test_rotation_makes_the_input_sets_exceed_the_l2():
    mib = 1 << 20
    assert timing.rotation_count(10 * mib, 50 * mib) == 6                  # 6 x 10 MiB > 50 MiB
    assert timing.rotation_count(200 * mib, 50 * mib) == 1                 # one set already exceeds the L2
    assert timing.rotation_count(1 * mib, 50 * mib, max_sets=8) == 8
    assert timing.rotation_count(10 * mib, 50 * mib, mem_budget=25 * mib) == 2
    t = timing._quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.ms == 3.0 and t.p20 < t.ms < t.p80 and t.spread == pytest.approx((t.p80 - t.p20) / 3.0)


def test_report_writes_plots_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    rp = tmp_path / "results.json"
    records.save(_results(), str(rp))
    assert main(["report", "--results", str(rp), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "roofline.png").is_file() and (tmp_path / "speedup_chunk_fwd.png").is_file()
    assert "![roofline](roofline.png)" in (tmp_path / "report.md").read_text()


def test_host_timer_counts_host_time_per_call():
    import time as _time
    calls = []

    def fn():
        calls.append(1)
        _time.sleep(0.002)
    t = timing.bench_host([fn, fn], device=__import__("torch").device("cpu"), calls=5, batches=3)
    assert len(calls) == 10 + 15
    assert 1.9 <= t.ms <= 20.0 and t.p20 <= t.ms <= t.p80


def test_bench_results_survive_a_run_cut_off_after_the_first_job(fake_clock, suites_file, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    real = harness.run_job
    n = []

    def run_job(*a, **kw):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt          # a time limit killing the run after the first job
        return real(*a, **kw)
    monkeypatch.setattr(harness, "run_job", run_job)
    with pytest.raises(KeyboardInterrupt):
        _bench(suites_file, out)
    data = records.load(str(out))
    assert len(data["records"]) >= 1 and not records.validate(data)


def test_child_process_records_merge_into_the_parents_file_with_its_ceilings(fake_clock, suites_file, tmp_path,
                                                                             monkeypatch):
    """A peer that needs another import environment runs in a child `kla-tl bench` that merges its records into the
    parent's --out as it goes; the parent's ceilings stay (the child measures none)."""
    out = tmp_path / "r.json"
    monkeypatch.setattr(peers, "process_groups", lambda names, environ_=None: (
        [], [({"KLA_TL_TEST_CHILD": "1"}, list(names))]))
    rc = main(["bench", "--suites-file", suites_file, "--suite", "tiny", "--impls", "kla_tl", "--peers", "none",
               "--ops", "decode", "--device", "cpu", "--time-fallback", "--no-progress", "--max-sets", "2",
               "--out", str(out)])
    assert rc == 0
    data = records.load(str(out))
    assert not records.validate(data)
    assert data["ceilings"] == CEILINGS                              # the parent's, measured before the child ran
    eager = [r for r in data["records"] if r["op"] == "decode" and not r["graph"]]
    assert len(eager) == 2 and all(r["impl"] == "kla_tl" and r["ms"] for r in eager)   # timed by the child
    assert all("frac_bw" in r for r in eager)                        # derived with the parent's ceilings


def test_results_carry_tuned_against_default_from_the_gpus_schedule_file():
    s = records.schedule_summary("h100")
    assert s and s["file"] == "schedules/h100.json" and s["provenance"]["tuned"]
    kernels = {e["kernel"] for e in s["entries"]}
    assert "decode" in kernels and all(e["default_ms"] > 0 and e["tuned_ms"] > 0 for e in s["entries"])
    assert records.schedule_summary("cpu") is None and records.schedule_summary(None) is None
    text = report.build({"device": {"key": "h100"}, "records": [], "schedules": s}, None)[0]
    assert "Tuned against default schedules" in text and "decode" in text
