"""Orchestration of the chunkwise kernels behind ``chunk_kla``. Kernel builders live in :mod:`kla_tl.kernels`."""

from __future__ import annotations

from typing import Optional

import torch

from .conventions import Problem
from . import dispatch


def chunk_refusal(prob: Problem, device: torch.device, *, needs_grad: bool) -> Optional[str]:
    reason = dispatch.common_refusal(prob, device)
    if reason is not None:
        return reason
    return "the TileLang chunk kernels are not built yet"


def chunk_kla_kernel(*args, **kwargs):
    raise NotImplementedError
