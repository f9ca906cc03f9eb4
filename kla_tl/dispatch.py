"""Backend choice: TileLang kernels for CUDA tensors of a supported problem, the torch reference otherwise.

Each kernel family declares ``refusal(problem, tensors) -> str | None`` (None = it serves the call). A CUDA call that
falls back to the reference warns once per (op, reason), so a fallback is never silent.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from .conventions import KERNEL_K, KERNEL_V, Problem

_WARNED: set = set()

#: Environment switch: ``KLA_TL_BACKEND=reference`` forces the reference everywhere (debugging, A/B checks).
BACKEND_ENV = "KLA_TL_BACKEND"

#: os.environ's backing dict and the encoded key of BACKEND_ENV (CPython keeps it in sync with os.environ): a read
#: costs ~0.05 us where os.environ.get of a missing key costs ~0.5-1 us (a caught KeyError), on every kernel call.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(BACKEND_ENV) if hasattr(os.environ, "encodekey") else None


def _backend_env() -> str:
    """The value of KLA_TL_BACKEND ("" when unset)."""
    if _ENV_DATA is not None and _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return os.environ.decodevalue(raw) if raw else ""
    return os.environ.get(BACKEND_ENV, "")


@functools.lru_cache(maxsize=None)
def _capability(index) -> tuple:
    """Compute capability of CUDA device ``index``."""
    return tuple(torch.cuda.get_device_capability(index))


def capability(device: torch.device) -> tuple:
    """``torch.cuda.get_device_capability(device)``, queried once per device index."""
    index = device.index
    if index is None:
        index = torch.cuda.current_device()
    return _capability(index)


def warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"kla_tl.{op}: CUDA call runs on the torch reference (slow): {reason}", RuntimeWarning,
                      stacklevel=3)


def common_refusal(prob: Problem, device: torch.device) -> Optional[str]:
    """Reasons shared by every kernel family, or None."""
    if device.type != "cuda":
        return f"device {device.type} (kernels need CUDA)"
    if _backend_env() == "reference":
        return f"{BACKEND_ENV}=reference"
    if prob.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {str(prob.dtype).replace('torch.', '')} (kernels take float16, bfloat16, float32)"
    if prob.K not in KERNEL_K:
        return f"K={prob.K} (kernels built for K in {KERNEL_K})"
    if prob.V not in KERNEL_V:
        return f"V={prob.V} (kernels built for V in {KERNEL_V})"
    major = capability(device)[0]
    if major < 8:
        return f"compute capability {major}.x (kernels need sm_80 or newer)"
    return None


def arch_of(device: torch.device) -> str:
    """TileLang arch string of a CUDA device: ``sm_90a`` on Hopper, ``sm_80`` on Ampere and other >= 8.0 parts."""
    major, _ = capability(device)
    return "sm_90a" if major == 9 else "sm_80"
