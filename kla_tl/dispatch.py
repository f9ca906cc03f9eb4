"""Backend choice: TileLang kernels for CUDA tensors of a supported problem, the torch reference otherwise.

Each kernel family declares ``refusal(problem, tensors) -> str | None`` (None = it serves the call). A CUDA call that
falls back to the reference warns once per (op, reason), so a fallback is never silent.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .conventions import KERNEL_K, KERNEL_V, Problem

_WARNED: set = set()

#: Environment switch: ``KLA_TL_BACKEND=reference`` forces the reference everywhere (debugging, A/B checks).
BACKEND_ENV = "KLA_TL_BACKEND"


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
    if os.environ.get(BACKEND_ENV, "") == "reference":
        return f"{BACKEND_ENV}=reference"
    if prob.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {str(prob.dtype).replace('torch.', '')} (kernels take float16, bfloat16, float32)"
    if prob.K not in KERNEL_K:
        return f"K={prob.K} (kernels built for K in {KERNEL_K})"
    if prob.V not in KERNEL_V:
        return f"V={prob.V} (kernels built for V in {KERNEL_V})"
    major = torch.cuda.get_device_capability(device)[0]
    if major < 8:
        return f"compute capability {major}.x (kernels need sm_80 or newer)"
    return None


def arch_of(device: torch.device) -> str:
    """TileLang arch string of a CUDA device: ``sm_90a`` on Hopper, ``sm_80`` on Ampere and other >= 8.0 parts."""
    major, _ = torch.cuda.get_device_capability(device)
    return "sm_90a" if major == 9 else "sm_80"
