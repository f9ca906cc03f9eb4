"""CPU tests of the ``kla-tl info`` and ``kla-tl check`` subcommands."""

from __future__ import annotations

import json

import torch

from kla_tl.cli import main


def test_info_json_reports_versions_device_and_schedules(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) >= {"python", "kla_tl", "torch", "triton", "tilelang"}
    assert (info["device"] is None) == (not torch.cuda.is_available())
    assert info["schedules"]


def test_info_text_names_the_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kla_tl:" in out and "schedules:" in out
    if not torch.cuda.is_available():
        assert "no CUDA device" in out


def test_check_small_shape_passes_and_prints_every_quantity(capsys):
    assert main(["check", "--shape", "small", "--no-compile"]) == 0
    out = capsys.readouterr().out
    for col in ("impl", "o", "ht", "dq", "dk", "dv", "dg", "deta", "dh0", "fwd ms", "bwd ms"):
        assert col in out
    assert "B2 T100 H2 HV4 K64 V64" in out and "FAIL" not in out


def test_check_fails_when_an_error_exceeds_the_tolerance(capsys, monkeypatch):
    import kla_tl.cli.check as check

    monkeypatch.setitem(check.TOLERANCES, "float32", (0.0, 0.0))
    monkeypatch.setitem(check.TOLERANCES, "bfloat16", (0.0, 0.0))
    assert main(["check", "--shape", "small", "--no-compile"]) == 1
    assert "FAIL" in capsys.readouterr().out
