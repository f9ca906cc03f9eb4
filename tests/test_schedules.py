"""CPU tests of kla_tl.schedules: file keys, the schedule file round trip, lookup fallbacks, malformed files.

Written against a toy KernelSpec registered for the test only (no TileLang, nothing is built), so they do not depend
on the real kernels; one test validates the shipped files against the real registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kla_tl import schedules
from kla_tl.kernels import registry

ROOT = Path(__file__).resolve().parent.parent

H100 = schedules.Device("NVIDIA H100 80GB HBM3", (9, 0))
H200 = schedules.Device("NVIDIA H200", (9, 0))
A100 = schedules.Device("NVIDIA A100-SXM4-80GB", (8, 0))

TOY_SPACE = {"block": (64, 128, 256), "threads": (128, 256), "fast": (False, True)}


def _toy_default(arch, key):
    return {"block": 128 if arch == "sm_90a" else 64, "threads": 128, "fast": False}


def _toy_bucket(key):
    return f"N{key['N']}"


def _unbuildable(*args, **kwargs):
    raise AssertionError("the schedule tests never build")


TOY = registry.KernelSpec(name="toy_lookup", space=TOY_SPACE, default=_toy_default, bucket=_toy_bucket,
                          build=_unbuildable, example_keys=[{"N": 1024}])


@pytest.fixture
def sdir(tmp_path, monkeypatch):
    """An empty schedule directory searched instead of the shipped one, with the toy kernel registered."""
    monkeypatch.setitem(registry._REGISTRY, TOY.name, TOY)
    monkeypatch.setenv(schedules.ENV_DIR, str(tmp_path))
    schedules.clear_cache()
    yield tmp_path
    schedules.clear_cache()


def _doc(gpu, arch, entries, tuned=True):
    doc = schedules.new_document(gpu, arch, {"device": "test", "date": "2025-01-01T00:00:00Z", "commit": "abc",
                                             "tuned": tuned}, tilelang_version="0.1.15")
    doc["kernels"] = {TOY.name: entries} if entries else {}
    return doc


def _entry(block, threads=128, fast=False, **extra):
    return {"schedule": {"block": block, "threads": threads, "fast": fast}, **extra}


def _write(d, gpu, doc):
    (Path(d) / f"{gpu}.json").write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H100 PCIe", "h100"),  # family key: PCIe and SXM parts share one file
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GH200 480GB", "gh200_480gb"),  # not H200: whole-word match only
    ("NVIDIA GeForce RTX 4090", "geforce_rtx_4090"),
    ("Tesla V100-SXM2-16GB", "tesla_v100_sxm2_16gb"),
])
def test_gpu_key_maps_the_named_gpus_and_sanitises_others(name, key):
    assert schedules.gpu_key(name) == key


def test_arch_for_capability_and_search_path_order(sdir):
    assert schedules.arch_for((9, 0)) == "sm_90a"
    assert schedules.arch_for((8, 6)) == "sm_80"
    assert [p.name for p in schedules.search_path(H100, "sm_90a")] == ["h100.json", "sm90.json"]
    assert [p.name for p in schedules.search_path(A100, "sm_80")] == ["a100.json", "sm80.json"]


# ------------------------------------------------------------------------------------------------ round trip


def test_schedule_file_round_trip_is_canonical(sdir):
    doc = _doc("h100", "sm_90a", {"N4096": _entry(256, ms=0.1, default_ms=0.2, tuned=True, key={"N": 4096}),
                                  "N1024": _entry(64, fast=True)})
    path = schedules.save(doc, sdir / "h100.json")
    text = path.read_text()
    assert schedules.load(path) == doc
    assert list(json.loads(text)["kernels"][TOY.name]) == ["N1024", "N4096"]  # buckets sorted
    schedules.clear_cache()
    schedules.save(schedules.load(path), path)
    assert path.read_text() == text  # a second round trip changes nothing


def test_save_refuses_an_invalid_document(sdir):
    doc = _doc("h100", "sm_90a", {"N1024": _entry(100)})
    with pytest.raises(ValueError, match=r"h100\.json.*kernels\.toy_lookup\.N1024\.schedule\.block"):
        schedules.save(doc, sdir / "h100.json")
    assert not (sdir / "h100.json").exists()


# ---------------------------------------------------------------------------------------------------- lookup


def test_lookup_without_files_returns_the_builtin_default(sdir):
    assert schedules.lookup(TOY.name, H100, {"N": 1024}) == (_toy_default("sm_90a", {}), schedules.BUILTIN)
    assert schedules.lookup(TOY.name, A100, {"N": 1024}) == (_toy_default("sm_80", {}), schedules.BUILTIN)


def test_lookup_prefers_gpu_file_then_arch_file_then_default(sdir):
    _write(sdir, "h100", _doc("h100", "sm_90a", {"N1024": _entry(256)}))
    _write(sdir, "sm90", _doc("sm90", "sm_90a", {"N1024": _entry(64), "N2048": _entry(128, 256)}, tuned=False))
    sch, src = schedules.lookup(TOY.name, H100, {"N": 1024})
    assert sch["block"] == 256 and src == f"{sdir / 'h100.json'} [toy_lookup/N1024]"
    sch, src = schedules.lookup(TOY.name, H100, {"N": 2048})  # no entry in h100.json
    assert sch == {"block": 128, "threads": 256, "fast": False} and "sm90.json [toy_lookup/N2048]" in src
    sch, src = schedules.lookup(TOY.name, H100, {"N": 8192})  # no entry anywhere
    assert (sch, src) == (_toy_default("sm_90a", {}), schedules.BUILTIN)
    sch, src = schedules.lookup(TOY.name, H200, {"N": 1024})  # no h200.json: the arch file
    assert sch["block"] == 64 and "sm90.json" in src


def test_lookup_names_shipped_files_relative_to_the_package(monkeypatch):
    """Records carry the source string: a shipped file is ``schedules/<name>`` wherever the package is installed."""
    monkeypatch.delenv(schedules.ENV_DIR, raising=False)
    shipped = schedules.shipped_dir() / "h100.json"
    assert schedules._display(shipped) == "schedules/h100.json"
    assert schedules._display(Path("/elsewhere/h100.json")) == str(Path("/elsewhere/h100.json"))


def test_lookup_skips_files_of_another_arch(sdir):
    _write(sdir, "h100", _doc("h100", "sm_90a", {"N1024": _entry(256)}))
    _write(sdir, "sm80", _doc("sm80", "sm_80", {"N1024": _entry(128)}, tuned=False))
    sch, src = schedules.lookup(TOY.name, H100, {"N": 1024}, arch="sm_80")  # Ampere path on a Hopper GPU
    assert sch["block"] == 128 and "sm80.json" in src
    sch, src = schedules.lookup(TOY.name, A100, {"N": 1024})
    assert sch["block"] == 128 and "sm80.json" in src


def test_env_directory_replaces_the_shipped_one(sdir, tmp_path_factory, monkeypatch):
    other = tmp_path_factory.mktemp("other")
    _write(other, "h100", _doc("h100", "sm_90a", {"N1024": _entry(256)}))
    assert schedules.lookup(TOY.name, H100, {"N": 1024})[1] == schedules.BUILTIN  # sdir is empty
    monkeypatch.setenv(schedules.ENV_DIR, str(other))
    assert schedules.search_dir() == other
    assert "other" in schedules.lookup(TOY.name, H100, {"N": 1024})[1]
    monkeypatch.delenv(schedules.ENV_DIR)
    assert schedules.search_dir() == schedules.shipped_dir()


def test_lookup_returns_a_copy_and_rereads_a_changed_file(sdir):
    _write(sdir, "h100", _doc("h100", "sm_90a", {"N1024": _entry(256)}))
    sch, _ = schedules.lookup(TOY.name, H100, {"N": 1024})
    sch["block"] = 1
    assert schedules.lookup(TOY.name, H100, {"N": 1024})[0]["block"] == 256
    _write(sdir, "h100", _doc("h100", "sm_90a", {"N1024": _entry(64, threads=256)}))
    os.utime(sdir / "h100.json", ns=(1, 10**18))  # a distinct mtime even on coarse-grained file systems
    assert schedules.lookup(TOY.name, H100, {"N": 1024})[0] == {"block": 64, "threads": 256, "fast": False}


def test_lookup_rejects_an_unknown_kernel(sdir):
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        schedules.lookup("nope", H100, {"N": 1024})


# -------------------------------------------------------------------------------------------- malformed files


def _mutations():
    def drop(*path):
        def f(d):
            obj = d
            for p in path[:-1]:
                obj = obj[p]
            del obj[path[-1]]
        return f

    def setv(value, *path):
        def f(d):
            obj = d
            for p in path[:-1]:
                obj = obj[p]
            obj[path[-1]] = value
        return f

    sch = ("kernels", TOY.name, "N1024", "schedule")
    return [
        ("missing-provenance", drop("provenance"), r"field provenance: missing"),
        ("missing-tuned", drop("provenance", "tuned"), r"field provenance\.tuned: missing"),
        ("missing-kernels", drop("kernels"), r"field kernels: missing"),
        ("schema-version", setv(2, "schema_version"), r"field schema_version: must be 1"),
        ("gpu-not-file-name", setv("h200", "gpu"), r"field gpu: 'h200' does not match the file name 'h100'"),
        ("unknown-arch", setv("sm_70", "arch"), r"field arch: must be one of"),
        ("unknown-top-field", setv(1, "kernel"), r"field kernel: unknown field"),
        ("unknown-kernel", setv({}, "kernels", "nope"), r"field kernels\.nope: unknown kernel"),
        ("unknown-knob", setv(4, *sch, "unroll"), r"field kernels\.toy_lookup\.N1024\.schedule\.unroll: unknown knob"),
        ("missing-knob", drop(*sch, "threads"), r"field kernels\.toy_lookup\.N1024\.schedule: missing knob 'threads'"),
        ("value-not-in-space", setv(96, *sch, "block"),
         r"field kernels\.toy_lookup\.N1024\.schedule\.block: value 96 is not in the kernel's space \[64, 128, 256\]"),
        ("bool-for-int", setv(True, *sch, "threads"), r"schedule\.threads: value True is not in the kernel's space"),
        ("missing-schedule", drop(*sch), r"field kernels\.toy_lookup\.N1024\.schedule: missing"),
        ("key-in-other-bucket", setv({"N": 2048}, "kernels", TOY.name, "N1024", "key"),
         r"field kernels\.toy_lookup\.N1024\.key: falls in bucket 'N2048'"),
        ("negative-ms", setv(-1.0, "kernels", TOY.name, "N1024", "ms"), r"N1024\.ms: must be a positive number"),
        ("unknown-entry-field", setv(1, "kernels", TOY.name, "N1024", "speed"), r"N1024\.speed: unknown field"),
    ]


@pytest.mark.parametrize("name, mutate, message", _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_file_error_names_the_file_and_the_field(sdir, name, mutate, message):
    doc = _doc("h100", "sm_90a", {"N1024": _entry(128, key={"N": 1024}, ms=0.5)})
    mutate(doc)
    _write(sdir, "h100", doc)
    with pytest.raises(ValueError, match=r"schedules file \S*h100\.json: .*" + message):
        schedules.lookup(TOY.name, H100, {"N": 1024})


def test_bad_json_error_names_the_file_and_position(sdir):
    (sdir / "sm90.json").write_text('{"schema_version": 1,,}')
    with pytest.raises(ValueError, match=r"schedules file .*sm90\.json: not valid JSON: .* line 1 column"):
        schedules.lookup(TOY.name, H100, {"N": 1024})


# ------------------------------------------------------------------------------------------------- describe


def test_describe_lookup_names_the_file_and_entry_a_call_uses(sdir):
    _write(sdir, "sm90", _doc("sm90", "sm_90a", {"N1024": _entry(64)}, tuned=False))
    text = schedules.describe_lookup(TOY.name, {"N": 1024}, device=H100)
    assert "file key 'h100'" in text and "h100.json: absent" in text and "untuned defaults" in text
    assert "sm90.json [toy_lookup/N1024]" in text and "'block': 64" in text
    assert "toy_lookup buckets in sm90.json: ['N1024']" in schedules.describe_lookup(TOY.name, device=H100)


def test_describe_lookup_reports_a_malformed_file_instead_of_raising(sdir):
    (sdir / "sm90.json").write_text("[]")
    text = schedules.describe_lookup(device=H100)
    assert "INVALID" in text and "sm90.json" in text


def test_describe_lookup_without_a_gpu_lists_the_search(sdir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _write(sdir, "sm80", _doc("sm80", "sm_80", {"N1024": _entry(64)}, tuned=False))
    text = schedules.describe_lookup()
    assert "no CUDA device" in text and "sm80.json" in text and str(sdir) in text


# ------------------------------------------------------------------------------------------- shipped files


def test_shipped_files_validate_and_untuned_ones_say_so():
    files = sorted(schedules.shipped_dir().glob("*.json"))
    names = {p.stem for p in files}
    assert {"sm90", "sm80", "a100"} <= names
    schedules.clear_cache()
    for p in files:
        doc = schedules.load(p)  # validates against the real registry (imports the kernel modules)
        entries = [e for b in doc["kernels"].values() for e in b.values()]
        assert doc["provenance"]["tuned"] == any(e.get("tuned", False) for e in entries), p
    for stem in ("sm90", "sm80", "a100"):
        assert schedules.load(schedules.shipped_dir() / f"{stem}.json")["provenance"]["tuned"] is False


# --------------------------------------------------------------------------------------------------- import


def test_import_probes_no_device_and_works_from_a_bare_checkout(tmp_path):
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    code = ("import sys, kla_tl.schedules as s, kla_tl.autotune as a; "
            "print(s.__file__); print(a.__file__); print('tilelang' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(schedules.ENV_DIR, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert Path(out[0]).resolve() == ROOT / "schedules" / "__init__.py"
    assert Path(out[1]).resolve() == ROOT / "autotune" / "__init__.py"
    assert out[2] == "False"
