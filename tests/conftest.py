"""pytest setup: hardware markers, the slow-test switch, and NaN poisoning of kla_tl allocations.

Markers (declared in pyproject.toml, re-declared here so the file works alone):

- ``gpu``: needs a CUDA device; skipped with the reason when ``torch.cuda.is_available()`` is False.
- ``sm90``: needs a Hopper (compute capability 9.x) device; skipped elsewhere.
- ``slow``: long CPU test (e.g. builds kernels with nvcc); skipped unless ``--run-slow`` or ``KLA_TL_RUN_SLOW=1``.

Fixtures:

- ``nan_poison``: while active, ``torch.empty`` / ``torch.empty_like`` / ``torch.empty_strided`` /
  ``Tensor.new_empty`` return NaN-filled floating tensors, so any output or scratch element a kernel fails to write
  shows up as NaN instead of stale memory.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

# Make the checkout importable when the package is not installed (plain `pytest` from the repository root).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import kla_tl  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, _ROOT)

from helpers import nan_poison_  # noqa: E402

#: environment switch equivalent to --run-slow
RUN_SLOW_ENV = "KLA_TL_RUN_SLOW"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help=f"run tests marked slow (also: {RUN_SLOW_ENV}=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped elsewhere, with the reason)")
    config.addinivalue_line("markers", "sm90: needs a Hopper GPU (compute capability 9.x)")
    config.addinivalue_line("markers", "slow: long CPU test (compiles kernels with nvcc)")


@functools.lru_cache(maxsize=1)
def _cuda_capability():
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def pytest_collection_modifyitems(config, items):
    cap = _cuda_capability()
    run_slow = config.getoption("--run-slow") or os.environ.get(RUN_SLOW_ENV, "") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    skip_sm90 = pytest.mark.skip(reason=f"needs a Hopper GPU (sm_90); found "
                                        f"{'no CUDA device' if cap is None else 'sm_%d%d' % cap}")
    skip_slow = pytest.mark.skip(reason=f"slow test: run with --run-slow or {RUN_SLOW_ENV}=1")
    for item in items:
        if "gpu" in item.keywords and cap is None:
            item.add_marker(skip_gpu)
        if "sm90" in item.keywords and (cap is None or cap[0] != 9):
            item.add_marker(skip_sm90)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


def _poisoning(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return nan_poison_(fn(*args, **kwargs))
    return wrapper


@pytest.fixture
def nan_poison(monkeypatch):
    """NaN-fill every floating tensor made by ``torch.empty*`` / ``Tensor.new_empty`` during the test.

    Yields :func:`helpers.nan_poison_` for poisoning caller-owned buffers (e.g. ``out=``) explicitly.
    """
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoning(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoning(torch.Tensor.new_empty))
    yield nan_poison_
